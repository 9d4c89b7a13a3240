//! Fused softmax cross-entropy with label smoothing, from logits (B, K) and class indices
//! (B,), as PyTorch's `CrossEntropyLoss(label_smoothing=ε)` with mean reduction:
//!   lse_i = log Σ_k e^{x_ik},   −log p_ik = lse_i − x_ik,
//!   loss = mean_i [ (1 − ε)(lse_i − x_i,t_i) + ε (lse_i − mean_k x_ik) ].
//! Backward, for the upstream gradient g of the scalar loss:
//!   ∂loss/∂x_ik = g/B · (p_ik − (1 − ε)·[k = t_i] − ε/K),
//! with p recomputed from the logits (one pass over a row already needed). One pass per row
//! each way instead of the composed version's log-softmax, gather, means and their backward.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::math::{exp, lane_sum, max, sum};
use super::par::new_row_blocks;
use super::storage::{f32_slice, with_f32};

/// Mean label-smoothed cross-entropy of CPU f32 `logits` (B, K) against u32 `targets` (B,).
pub(crate) fn cross_entropy(logits: &Tensor, targets: &Tensor, smoothing: f64) -> Result<Tensor> {
    let (b, k) = logits.dims2()?;
    if targets.dims1()? != b {
        bail!(
            "cross_entropy: {b} rows of logits but {} targets",
            targets.dim(0)?
        )
    }
    if b == 0 || k == 0 {
        bail!(
            "cross_entropy: logits {:?} have no rows or no classes",
            logits.dims()
        )
    }
    let targets = targets.to_dtype(candle_core::DType::U32)?;
    let op = CrossEntropy {
        smoothing: smoothing as f32,
    };
    logits.contiguous()?.apply_op2(&targets.contiguous()?, op)
}

struct CrossEntropy {
    smoothing: f32,
}

/// The targets as indices, each checked against the K classes.
fn indices(s: &CpuStorage, l: &Layout, k: usize) -> Result<Vec<usize>> {
    let CpuStorage::U32(v) = s else {
        bail!("cross_entropy: targets must be u32, got {:?}", s.dtype())
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("cross_entropy: targets are not contiguous")
    };
    v[start..end]
        .iter()
        .map(|&t| match t as usize {
            t if t < k => Ok(t),
            t => bail!("cross_entropy: target class {t} out of range for {k} classes"),
        })
        .collect()
}

/// log Σ e^x of one row, max-subtracted.
#[inline(always)]
fn log_sum_exp(row: &[f32]) -> f32 {
    let m = max(row);
    m + lane_sum(row, |x| exp(x - m)).ln()
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "vit-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1)?;
        let (b, k) = l1.shape().dims2()?;
        let t = indices(s2, l2, k)?;
        let eps = self.smoothing;
        // Per row, in f64 and row order: the mean does not depend on the thread count.
        let total: f64 = x
            .chunks_exact(k)
            .zip(&t)
            .map(|(row, &ti)| {
                let lse = log_sum_exp(row);
                let nll = lse - row[ti];
                let smooth = lse - sum(row) / k as f32;
                ((1.0 - eps) * nll + eps * smooth) as f64
            })
            .sum();
        Ok((
            CpuStorage::F32(vec![(total / b as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, k) = logits.dims2()?;
        let g = g.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let t: Vec<u32> = targets.to_vec1()?;
        let (eps, scale) = (self.smoothing, g / b as f32);
        let dx = with_f32([logits], |[x]| {
            new_row_blocks(
                x.len(),
                k,
                #[inline(always)]
                |row0, block| {
                    for (i, dr) in block.chunks_exact_mut(k).enumerate() {
                        let xr = &x[(row0 + i) * k..][..k];
                        let lse = log_sum_exp(xr);
                        for (d, &v) in dr.iter_mut().zip(xr) {
                            *d = (exp(v - lse) - eps / k as f32) * scale;
                        }
                        dr[t[row0 + i] as usize] -= (1.0 - eps) * scale;
                    }
                },
            )
        })?;
        Ok((Some(Tensor::from_vec(dx, (b, k), logits.device())?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::ops::cross_entropy_composed;
    use candle_core::{Device, Tensor};

    fn targets(b: usize, k: usize, seed: u64) -> Tensor {
        let t: Vec<u32> = (0..b)
            .map(|i| ((i as u64 * 7 + seed) % k as u64) as u32)
            .collect();
        Tensor::from_vec(t, b, &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_composed_values_and_gradients() {
        for (i, &(b, k)) in [(1, 1), (1, 10), (7, 3), (128, 10), (33, 100), (5, 1001)]
            .iter()
            .enumerate()
        {
            let t = targets(b, k, i as u64);
            for eps in [0.0, 0.1, 1.0] {
                let fused = |x: &[Tensor]| super::cross_entropy(&x[0], &t, eps).unwrap();
                let composed = |x: &[Tensor]| cross_entropy_composed(&x[0], &t, eps).unwrap();
                let inp = vec![rand(&[b, k], 8.0, 50 + i as u64)];
                let c = Tensor::new(1.7f32, &Device::Cpu).unwrap();
                let (yf, gf) = value_and_grads(fused, &inp, &c);
                let (yc, gc) = value_and_grads(composed, &inp, &c);
                let inp64 = vec![inp[0].to_dtype(candle_core::DType::F64).unwrap()];
                let (y64, g64) = value_and_grads(composed, &inp64, &c);
                assert!(yf.dims().is_empty(), "scalar loss");
                assert!(max_rel_diff(&yf, &yc) < 1e-5, "{b}x{k} ε {eps} forward");
                assert!(
                    max_rel_diff(&yf, &y64) < 1e-5,
                    "{b}x{k} ε {eps} forward f64"
                );
                assert!(max_rel_diff(&gf[0], &gc[0]) < 1e-5, "{b}x{k} ε {eps} grad");
                assert!(
                    max_rel_diff(&gf[0], &g64[0]) < 1e-5,
                    "{b}x{k} ε {eps} grad f64"
                );
            }
        }
    }

    #[test]
    fn gradients_match_central_differences() {
        let t = targets(4, 5, 3);
        let fused = |x: &[Tensor]| super::cross_entropy(&x[0], &t, 0.1).unwrap();
        let composed = |x: &[Tensor]| cross_entropy_composed(&x[0], &t, 0.1).unwrap();
        let inp = vec![rand(&[4, 5], 3.0, 9)];
        let c = Tensor::new(1f32, &Device::Cpu).unwrap();
        let (_, analytic) = value_and_grads(fused, &inp, &c);
        let numeric = finite_diff(composed, &inp, &c);
        let e = max_rel_diff(&analytic[0], &numeric[0]);
        assert!(e < 1e-5, "{e}");
    }

    #[test]
    fn extreme_logits_stay_finite() {
        let x = Tensor::new(
            &[[1000f32, -1000.0, 0.0], [-1e30, -1e30, -1e30]],
            &Device::Cpu,
        )
        .unwrap();
        let loss = super::cross_entropy(&x, &targets(2, 3, 0), 0.1).unwrap();
        let v = loss.to_scalar::<f32>().unwrap();
        assert!(v.is_finite(), "{v}");
    }

    #[test]
    fn bad_targets_are_errors() {
        let x = rand(&[2, 3], 1.0, 1);
        let out_of_range = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
        let e = super::cross_entropy(&x, &out_of_range, 0.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("out of range"), "{e}");
        let e = super::cross_entropy(&x, &targets(3, 3, 0), 0.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("targets"), "{e}");
    }
}
