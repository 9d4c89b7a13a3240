//! Fused LayerNorm over the last dimension: y = x̂·w + b with x̂ = (x − μ)·r and
//! r = 1/sqrt(σ² + ε) per row. The forward stores nothing besides y; the backward recomputes
//! μ and r per row (one cheap sweep over a row already in cache) and returns dx, dw, db.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::math::{dot, lane_sum, sum};
use super::par::{map_row_blocks, new_row_blocks, rows_per_block};
use super::storage::{f32_slice, with_f32};

/// `layer_norm(x, weight, bias)` for CPU f32 tensors; weight and bias have shape (D,) with
/// D the last dimension of x.
pub(crate) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let bias = bias.contiguous()?;
    x.apply_op3(&weight, &bias, LayerNorm { eps: eps as f32 })
}

struct LayerNorm {
    eps: f32,
}

/// Mean μ and r = 1/sqrt(σ² + ε) of one row, σ² the biased variance (as PyTorch). Two
/// sweeps (mean, then the centred sum of squares) rather than Σx² − μ²: no cancellation.
#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "vit-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let d = *l1.dims().last().unwrap_or(&1);
        if w.len() != d || b.len() != d {
            bail!(
                "layer_norm: weight/bias need {d} elements, got {}/{}",
                w.len(),
                b.len()
            )
        }
        let y = new_row_blocks(
            x.len(),
            d,
            #[inline(always)]
            |row0, block| {
                let (w, b) = (&w[..d], &b[..d]);
                for (i, yr) in block.chunks_exact_mut(d).enumerate() {
                    let xr = &x[(row0 + i) * d..][..d];
                    let (mean, r) = row_stats(xr, self.eps);
                    for (((y, &x), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                        *y = (x - mean) * r * w + b;
                    }
                }
            },
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// With g = ∂L/∂y and, per row, h = g ⊙ w (= ∂L/∂x̂):
    ///   db = Σ_rows g,   dw = Σ_rows g ⊙ x̂.
    /// For dx, differentiate x̂_j = (x_j − μ)·r with respect to x_k:
    ///   ∂μ/∂x_k = 1/D;  ∂σ²/∂x_k = 2(x_k − μ)/D (the −μ term sums to zero over j);
    ///   ∂r/∂x_k = −½ r³ ∂σ²/∂x_k = −r³ (x_k − μ)/D = −r² x̂_k / D;
    ///   ∂x̂_j/∂x_k = r(δ_jk − 1/D) + (x_j − μ) ∂r/∂x_k = r(δ_jk − 1/D − x̂_j x̂_k / D).
    /// So dx_k = Σ_j h_j ∂x̂_j/∂x_k = r·(h_k − mean(h) − x̂_k·mean(h ⊙ x̂)).
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dims().last().copied().unwrap_or(1);
        let eps = self.eps;
        let (dx, dw, db) = with_f32([x, w, g], |[x, w, g]| {
            let mut dx = vec![0f32; x.len()];
            let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
            if d == 0 {
                return (dx, dw, db);
            }
            // Per block of rows: write dx, return that block's partial dw and db.
            let partials = map_row_blocks(
                &mut dx,
                d,
                #[inline(always)]
                |row0, block| {
                    let (mut pw, mut pb) = (vec![0f32; d], vec![0f32; d]);
                    // x̂ and h = g ⊙ w of the current row.
                    let (mut xhat, mut h) = (vec![0f32; d], vec![0f32; d]);
                    let w = &w[..d];
                    for (i, dxr) in block.chunks_exact_mut(d).enumerate() {
                        let xr = &x[(row0 + i) * d..][..d];
                        let gr = &g[(row0 + i) * d..][..d];
                        let (mean, r) = row_stats(xr, eps);
                        let terms = xhat.iter_mut().zip(&mut h).zip(&mut pw).zip(&mut pb);
                        for ((((xh, h), pw), pb), ((&x, &g), &w)) in
                            terms.zip(xr.iter().zip(gr).zip(w))
                        {
                            *xh = (x - mean) * r;
                            *h = g * w;
                            *pw += g * *xh;
                            *pb += g;
                        }
                        let (mean_h, mean_hx) = (sum(&h) / d as f32, dot(&h, &xhat) / d as f32);
                        for ((dx, &h), &xh) in dxr.iter_mut().zip(&h).zip(&xhat) {
                            *dx = r * (h - mean_h - xh * mean_hx);
                        }
                    }
                    (pw, pb)
                },
            );
            debug_assert_eq!(
                partials.len(),
                x.len().div_ceil(rows_per_block(d) * d).max(1)
            );
            // Add the blocks' partial sums in block order: deterministic.
            for (pw, pb) in partials {
                dw.iter_mut().zip(&pw).for_each(|(a, b)| *a += b);
                db.iter_mut().zip(&pb).for_each(|(a, b)| *a += b);
            }
            (dx, dw, db)
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, b.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::ops::layer_norm_composed;
    use candle_core::{DType, Tensor};

    const EPS: f64 = 1e-5;

    fn inputs(shape: &[usize], seed: u64) -> Vec<Tensor> {
        let d = *shape.last().unwrap();
        vec![
            // An offset and a spread so that normalisation has work to do.
            (rand(shape, 3.0, seed) + 0.7).unwrap(),
            (rand(&[d], 1.0, seed + 1) + 1.0).unwrap(),
            rand(&[d], 0.5, seed + 2),
        ]
    }

    fn fused(t: &[Tensor]) -> Tensor {
        super::layer_norm(&t[0], &t[1], &t[2], EPS).unwrap()
    }

    fn composed(t: &[Tensor]) -> Tensor {
        layer_norm_composed(&t[0], &t[1], &t[2], EPS).unwrap()
    }

    #[test]
    fn matches_composed_values_and_gradients() {
        for (k, shape) in SHAPES.iter().enumerate() {
            let inp = inputs(shape, 10 * k as u64);
            let c = cotangent(shape, k as u64);
            let (yf, gf) = value_and_grads(fused, &inp, &c);
            let (yc, gc) = value_and_grads(composed, &inp, &c);
            // The f64 composed op is the precise oracle; f32 composed is the twin.
            let inp64: Vec<Tensor> = inp
                .iter()
                .map(|t| t.to_dtype(DType::F64).unwrap())
                .collect();
            let (y64, g64) = value_and_grads(composed, &inp64, &c);
            assert!(max_rel_diff(&yf, &yc) < 2e-5, "{shape:?} forward");
            assert!(max_rel_diff(&yf, &y64) < 2e-5, "{shape:?} forward f64");
            for (i, ((a, b), o)) in gf.iter().zip(&gc).zip(&g64).enumerate() {
                // Width-1 rows: x̂ = 0 and dx = 0 exactly; both agree.
                let (vs_f32, vs_f64) = (max_rel_diff(a, b), max_rel_diff(a, o));
                assert!(vs_f64 < 1e-4, "{shape:?} input {i}: fused vs f64 {vs_f64}");
                assert!(vs_f32 < 1e-4, "{shape:?} input {i}: fused vs f32 {vs_f32}");
            }
        }
    }

    #[test]
    fn gradients_match_central_differences() {
        for shape in [&[1usize, 1][..], &[3, 5], &[2, 1, 4]] {
            let inp = inputs(shape, 99);
            let c = cotangent(shape, 7);
            let (_, analytic) = value_and_grads(fused, &inp, &c);
            let numeric = finite_diff(composed, &inp, &c);
            for (i, (a, n)) in analytic.iter().zip(&numeric).enumerate() {
                let e = max_rel_diff(a, n);
                assert!(e < 1e-4, "{shape:?} input {i}: {e}");
            }
        }
    }

    #[test]
    fn large_values_and_constant_rows_are_finite() {
        let x = Tensor::new(
            &[[1e4f32, 1e4 + 1.0, 1e4 + 2.0], [5.0, 5.0, 5.0]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let w = Tensor::ones(3, DType::F32, x.device()).unwrap();
        let b = Tensor::zeros(3, DType::F32, x.device()).unwrap();
        let inp = [x, w, b];
        let y = fused(&inp).to_vec2::<f32>().unwrap();
        let sd = (2f32 / 3.0 + 1e-5).sqrt();
        assert!((y[0][0] + 1.0 / sd).abs() < 1e-3, "{y:?}");
        assert_eq!(y[1], vec![0.0; 3]);
        let (_, g) = value_and_grads(fused, &inp, &cotangent(&[2, 3], 1));
        for t in g {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|v| v.is_finite()));
        }
    }
}
