//! Fused exact GELU: y = x·Φ(x) = ½x·(1 + erf(x/√2)), with erf from `libm` (the musl port
//! candle's own `gelu_erf` uses, so the forward is bit-identical). The backward recomputes
//! Φ and φ from x: dy/dx = Φ(x) + x·φ(x).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::f32::consts::FRAC_1_SQRT_2;

use super::{f32_slice, for_row_blocks, with_f32};

/// 1/√(2π), the standard normal density at 0.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Exact GELU of a CPU f32 tensor, elementwise.
pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

struct Gelu;

/// Φ(x), the standard normal CDF.
#[inline]
pub(super) fn cdf(x: f32) -> f32 {
    0.5 * (1.0 + libm::erff(x * FRAC_1_SQRT_2))
}

/// d/dx [x·Φ(x)] = Φ(x) + x·φ(x), φ(x) = exp(−x²/2)/√(2π).
#[inline]
pub(super) fn derivative(x: f32) -> f32 {
    cdf(x) + x * INV_SQRT_2PI * (-0.5 * x * x).exp()
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "vit-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let mut y = vec![0f32; x.len()];
        // Elementwise: treat the data as rows of one element each, in blocks.
        for_row_blocks(&mut y, 1, |i0, block| {
            for (y, &x) in block.iter_mut().zip(&x[i0..]) {
                *y = x * cdf(x);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    /// dx = g ⊙ GELU'(x).
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_f32([x, g], |[x, g]| {
            let mut dx = vec![0f32; x.len()];
            for_row_blocks(&mut dx, 1, |i0, block| {
                for ((dx, &x), &g) in block.iter_mut().zip(&x[i0..]).zip(&g[i0..]) {
                    *dx = g * derivative(x);
                }
            });
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use candle_core::{DType, Tensor};

    fn fused(t: &[Tensor]) -> Tensor {
        super::gelu(&t[0]).unwrap()
    }

    fn composed(t: &[Tensor]) -> Tensor {
        t[0].gelu_erf().unwrap()
    }

    #[test]
    fn matches_candle_gelu_erf_values_and_gradients() {
        for (k, shape) in SHAPES.iter().enumerate() {
            let inp = vec![rand(shape, 6.0, k as u64)];
            let c = cotangent(shape, k as u64);
            let (yf, gf) = value_and_grads(fused, &inp, &c);
            let (yc, gc) = value_and_grads(composed, &inp, &c);
            let inp64 = vec![inp[0].to_dtype(DType::F64).unwrap()];
            let (y64, g64) = value_and_grads(composed, &inp64, &c);
            assert!(max_rel_diff(&yf, &yc) < 1e-6, "{shape:?} forward");
            assert!(max_rel_diff(&yf, &y64) < 1e-6, "{shape:?} forward f64");
            // candle's own backward rounds 1/√(2π) to 0.398942 (≈1e-6 relative).
            assert!(max_rel_diff(&gf[0], &gc[0]) < 1e-5, "{shape:?} grad");
            assert!(max_rel_diff(&gf[0], &g64[0]) < 1e-5, "{shape:?} grad f64");
        }
    }

    #[test]
    fn gradients_match_central_differences() {
        let inp = vec![rand(&[4, 9], 5.0, 11)];
        let c = cotangent(&[4, 9], 12);
        let (_, analytic) = value_and_grads(fused, &inp, &c);
        let numeric = finite_diff(composed, &inp, &c);
        let e = max_rel_diff(&analytic[0], &numeric[0]);
        assert!(e < 1e-6, "{e}");
    }

    #[test]
    fn known_values() {
        let x = Tensor::new(&[0f32, 1.0, -1.0, 3.0, -10.0], &candle_core::Device::Cpu).unwrap();
        let y = fused(&[x]).to_vec1::<f32>().unwrap();
        // x·Φ(x) from scipy.stats.norm.cdf.
        let want = [0.0, 0.841_344_7, -0.158_655_25, 2.995_950_5, -0.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }
}
