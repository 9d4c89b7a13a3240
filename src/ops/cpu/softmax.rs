//! Fused softmax over the last dimension: y = exp(x − max) / Σ exp(x − max) per row.
//! The backward needs only the saved output y (candle hands it to `bwd` as `res`):
//! dx = y ⊙ (g − Σ g ⊙ y).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::math::{dot, exp, max, sum};
use super::par::new_row_blocks;
use super::storage::{f32_slice, with_f32};

/// Softmax over the last dimension of a CPU f32 tensor.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "vit-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let d = *l.dims().last().unwrap_or(&1);
        let y = new_row_blocks(
            x.len(),
            d,
            #[inline(always)]
            |row0, block| {
                for (i, yr) in block.chunks_exact_mut(d).enumerate() {
                    let xr = &x[(row0 + i) * d..][..d];
                    let max = max(xr);
                    for (y, &x) in yr.iter_mut().zip(xr) {
                        *y = exp(x - max);
                    }
                    let inv = 1.0 / sum(yr);
                    yr.iter_mut().for_each(|y| *y *= inv);
                }
            },
        );
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    /// With y = softmax(x), ∂y_j/∂x_k = y_j(δ_jk − y_k), so for g = ∂L/∂y:
    /// dx_k = Σ_j g_j y_j (δ_jk − y_k) = y_k·(g_k − Σ_j g_j y_j).
    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let d = x.dims().last().copied().unwrap_or(1);
        let dx = with_f32([y, g], |[y, g]| {
            new_row_blocks(
                y.len(),
                d,
                #[inline(always)]
                |row0, block| {
                    for (i, dxr) in block.chunks_exact_mut(d).enumerate() {
                        let yr = &y[(row0 + i) * d..][..d];
                        let gr = &g[(row0 + i) * d..][..d];
                        let yg = dot(yr, gr);
                        for j in 0..d {
                            dxr[j] = yr[j] * (gr[j] - yg);
                        }
                    }
                },
            )
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::ops::softmax_composed;
    use candle_core::{DType, Device, Tensor};

    fn fused(t: &[Tensor]) -> Tensor {
        super::softmax_last_dim(&t[0]).unwrap()
    }

    fn composed(t: &[Tensor]) -> Tensor {
        softmax_composed(&t[0]).unwrap()
    }

    #[test]
    fn matches_composed_values_and_gradients() {
        for (k, shape) in SHAPES.iter().enumerate() {
            let inp = vec![rand(shape, 4.0, k as u64)];
            let c = cotangent(shape, k as u64);
            let (yf, gf) = value_and_grads(fused, &inp, &c);
            let (yc, gc) = value_and_grads(composed, &inp, &c);
            let inp64 = vec![inp[0].to_dtype(DType::F64).unwrap()];
            let (y64, g64) = value_and_grads(composed, &inp64, &c);
            assert!(max_rel_diff(&yf, &yc) < 1e-6, "{shape:?} forward");
            assert!(max_rel_diff(&yf, &y64) < 1e-6, "{shape:?} forward f64");
            assert!(max_rel_diff(&gf[0], &gc[0]) < 1e-5, "{shape:?} grad");
            assert!(max_rel_diff(&gf[0], &g64[0]) < 1e-5, "{shape:?} grad f64");
        }
    }

    #[test]
    fn gradients_match_central_differences() {
        for shape in [&[1usize, 1][..], &[3, 5], &[2, 2, 4]] {
            let inp = vec![rand(shape, 3.0, 5)];
            let c = cotangent(shape, 6);
            let (_, analytic) = value_and_grads(fused, &inp, &c);
            let numeric = finite_diff(composed, &inp, &c);
            let e = max_rel_diff(&analytic[0], &numeric[0]);
            assert!(e < 1e-5, "{shape:?}: {e}");
        }
    }

    #[test]
    fn extreme_rows_stay_finite_and_normalised() {
        let x = Tensor::new(
            &[[1000f32, 0.0, -1000.0], [-1e30, -1e30, -1e30]],
            &Device::Cpu,
        )
        .unwrap();
        let y = fused(&[x]).to_vec2::<f32>().unwrap();
        assert_eq!(y[0], vec![1.0, 0.0, 0.0]);
        for v in &y[1] {
            assert!((v - 1.0 / 3.0).abs() < 1e-6);
        }
    }

    #[test]
    fn non_contiguous_input_is_handled() {
        let x = rand(&[5, 7], 2.0, 3).t().unwrap(); // (7, 5), strided
        let a = fused(std::slice::from_ref(&x));
        let b = composed(&[x]);
        assert!(max_rel_diff(&a, &b) < 1e-6);
    }
}
