//! Fused multi-head self-attention core: from the fused qkv projection (B, T, 3·D) straight
//! to the heads' concatenated output (B, T, D), without materialising q, k, v per head.
//!
//! For each (batch, head) unit, with Q, K, V the head's (T, hd) slices read in place from
//! qkv through strides:
//!   S = scale · Q Kᵀ (+ A)    (T, T); A an optional additive bias (Swin's relative
//!                             position bias and shifted-window mask)
//!   P = softmax_rows(S)       kept for the backward pass (and only then)
//!   O = P V                   written into the head's columns of the output
//! Backward, for G = ∂L/∂O:
//!   dP = G Vᵀ,  dV = Pᵀ G,  dS = P ⊙ (dP − rowsum(P ⊙ dP)),
//!   dQ = scale · dS K,  dK = scale · dSᵀ Q   (written into dqkv's q, k, v columns),
//!   dA = Σ dS over the units that share a bias block, in batch order.
//! Units run in parallel on rayon's pool; each unit's products are single-threaded gemm
//! calls over its own disjoint output columns, so results do not depend on thread count.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::sgemm;
use super::math::{dot, exp, max, sum};
use super::matrix::MatRef;
use super::par::{new_blocks, SendPtr, BLOCK_ELEMS};
use super::simd::simd;
use super::storage::{f32_slice, with_f32};

/// Scaled dot-product self-attention of `heads` heads over a CPU f32 `qkv` (B, T, 3·D)
/// laid out as timm's fused projection (q, k, v blocks of D, each split into heads).
/// Returns (B, T, D).
pub(crate) fn attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    check_heads(qkv, heads)?;
    qkv.contiguous()?
        .apply_op1(Attention::new(heads, scale, 0, qkv.track_op()))
}

/// [`attention`] with an additive bias on the scores: `bias` (G, heads, T, T), where batch
/// item b uses block b mod G (Swin: G windows per image, batch items image-major). The
/// bias receives a gradient.
pub(crate) fn attention_biased(
    qkv: &Tensor,
    bias: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    check_heads(qkv, heads)?;
    let (b, t, _) = qkv.dims3()?;
    let (g, bh, bt, bt2) = bias.dims4()?;
    if g == 0 || b % g != 0 || bh != heads || bt != t || bt2 != t {
        bail!(
            "attention bias: expected (G, {heads}, {t}, {t}) with G dividing the batch {b}, \
             got {:?}",
            bias.dims()
        )
    }
    let op = Attention::new(heads, scale, g, qkv.track_op() || bias.track_op());
    qkv.contiguous()?.apply_op2(&bias.contiguous()?, op)
}

fn check_heads(qkv: &Tensor, heads: usize) -> Result<()> {
    let (_, _, d3) = qkv.dims3()?;
    if heads == 0 || d3 % (3 * heads) != 0 {
        bail!("attention: qkv width {d3} does not split into 3 × {heads} heads")
    }
    Ok(())
}

struct Attention {
    heads: usize,
    scale: f32,
    /// Bias blocks G (0: no bias).
    groups: usize,
    /// Whether forward keeps the probabilities (gradients tracked).
    keep_probs: bool,
    /// The softmax probabilities (B, heads, T, T) of the forward pass, for backward.
    probs: Mutex<Option<Vec<f32>>>,
}

impl Attention {
    /// `keep_probs`: whether backward will run (a tracked input); inference skips keeping
    /// the probabilities.
    fn new(heads: usize, scale: f64, groups: usize, keep_probs: bool) -> Self {
        Attention {
            heads,
            scale: scale as f32,
            groups,
            keep_probs,
            probs: Mutex::new(None),
        }
    }

    fn dims(&self, shape: &Shape) -> Result<Dims> {
        let (_, t, d3) = shape.dims3()?;
        Ok(Dims {
            t,
            d: d3 / 3,
            hd: d3 / 3 / self.heads,
            heads: self.heads,
        })
    }

    /// The output (B, T, D) of `qkv` (B, T, 3D), with `bias` (G, heads, T, T) if any.
    fn forward(&self, qkv: &[f32], shape: &Shape, bias: Option<&[f32]>) -> Result<Vec<f32>> {
        let (b, t, _) = shape.dims3()?;
        let dims = self.dims(shape)?;
        let d = dims.d;
        // Zeroed by the pool; each unit then writes its head's columns.
        let mut out = new_blocks(b * t * d, BLOCK_ELEMS, |_, _| {});
        let out_ptr = SendPtr(out.as_mut_ptr());
        let qkv_ptr = qkv.as_ptr() as usize;
        let scale = self.scale;
        let groups = self.groups.max(1);
        // One (batch item, head) unit: S = scale · Q Kᵀ (+ A), P = softmax(S) in `p` (T, T),
        // then O = P V into columns h·hd.. of the output rows.
        let unit = |unit: usize, p: &mut [f32]| {
            let (bi, h) = (unit / dims.heads, unit % dims.heads);
            let base = qkv_ptr as *const f32;
            // SAFETY: base is qkv's (B, T, 3D) buffer, bi < B, h < heads, and T ≥ 1 (units
            // run only when there are tokens).
            let (q, k, v) = unsafe { dims.qkv(base, bi, h) };
            let pm = MatRef::new(p.as_ptr(), t as isize, 1);
            // S = scale · Q Kᵀ
            // SAFETY: q and k are (T, hd) views inside qkv, which nothing writes during the
            // call; `p` is this unit's own T × T floats and overlaps neither.
            unsafe { sgemm(t, t, dims.hd, p.as_mut_ptr(), t, 1, q, k.t(), scale, false) };
            if let Some(bias) = bias {
                let block = ((bi % groups) * dims.heads + h) * t * t;
                add_into(p, &bias[block..block + t * t]);
            }
            simd!(softmax_rows(p, t));
            // O = P V
            // SAFETY: element (bi, 0, h·hd) of the (B, T, D) output, inside it (bi < B,
            // h·hd < D, T ≥ 1).
            let o = unsafe { out_ptr.get().add(bi * t * d + h * dims.hd) };
            // SAFETY: pm views `p` (T × T), v a (T, hd) view inside qkv; the T rows of hd
            // columns at `o` (row stride D) lie inside the output, which overlaps neither, and
            // this unit alone writes columns h·hd.. of batch item bi's rows.
            unsafe { sgemm(t, dims.hd, t, o, d, 1, pm, v, 1.0, false) };
        };
        let units = b * self.heads;
        let work = t > 0 && dims.hd > 0;
        if self.keep_probs {
            let probs = if work {
                new_blocks(units * t * t, t * t, unit)
            } else {
                Vec::new()
            };
            *self.probs.lock().expect("attention probs lock") = Some(probs);
        } else if work {
            // Inference: one (T, T) scratch per thread instead of all the probabilities.
            (0..units)
                .into_par_iter()
                .for_each_init(|| vec![0f32; t * t], |p, i| unit(i, p));
        }
        Ok(out)
    }

    /// dqkv (B, T, 3D) for the output gradient `g` (B, T, D), and the bias gradient
    /// (G, heads, T, T) when there is a bias.
    fn backward(&self, qkv: &Tensor, g: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t, d3) = qkv.dims3()?;
        let dims = self.dims(qkv.shape())?;
        let probs = self.probs.lock().expect("attention probs lock").take();
        let Some(mut probs) = probs else {
            bail!("attention backward: forward probabilities are missing (backward run twice?)")
        };
        let biased = self.groups > 0;
        // Without a bias dS is scaled as it is made; with one, dS itself is the bias's
        // gradient, and the scale goes into the products for dQ and dK.
        let (ds_scale, alpha) = if biased {
            (1.0, self.scale)
        } else {
            (self.scale, 1.0)
        };
        let mut dqkv = vec![0f32; b * t * d3];
        let dq_ptr = SendPtr(dqkv.as_mut_ptr());
        with_f32([qkv, g], |[qkv, g]| {
            let (qkv_ptr, g_ptr) = (qkv.as_ptr() as usize, g.as_ptr() as usize);
            let d = dims.d;
            if t == 0 || dims.hd == 0 {
                return;
            }
            probs.par_chunks_mut(t * t).enumerate().for_each_init(
                || vec![0f32; t * t],
                |ds, (unit, p)| {
                    let (bi, h) = (unit / dims.heads, unit % dims.heads);
                    let base = qkv_ptr as *const f32;
                    // SAFETY: base is qkv's (B, T, 3D) buffer, bi < B, h < heads, T ≥ 1 (no
                    // unit runs without tokens).
                    let (q, k, v) = unsafe { dims.qkv(base, bi, h) };
                    // SAFETY: element (bi, 0, h·hd) of g, which is (B, T, D): inside it.
                    let go_ptr = unsafe { (g_ptr as *const f32).add(bi * t * d + h * dims.hd) };
                    let go = MatRef::new(go_ptr, d as isize, 1);
                    let pm = MatRef::new(p.as_ptr(), t as isize, 1);
                    let dbase = dq_ptr.get() as *const f32;
                    // SAFETY: dbase is dqkv's (B, T, 3D) buffer, with bi, h and T as above.
                    let dst = |which| unsafe { dims.part(dbase, bi, h, which) }.ptr as *mut f32;
                    let ld = 3 * d;
                    // SAFETY: go, v (inside g and qkv, only read) and pm (this unit's T × T
                    // probabilities) are (T, hd), (T, hd) and (T, T) views; `ds` is this unit's
                    // own T × T scratch; dst(2) is this unit's head columns of dqkv's v block
                    // (T rows at stride 3D), written by no other unit and overlapping no input.
                    unsafe {
                        // dP = G Vᵀ
                        sgemm(t, t, dims.hd, ds.as_mut_ptr(), t, 1, go, v.t(), 1.0, false);
                        // dV = Pᵀ G
                        sgemm(t, dims.hd, t, dst(2), ld, 1, pm.t(), go, 1.0, false);
                    }
                    simd!(softmax_grad_rows(p, ds, t, ds_scale));
                    let dsm = MatRef::new(ds.as_ptr(), t as isize, 1);
                    // SAFETY: dsm views this unit's T × T scratch, k and q (T, hd) views inside
                    // qkv; dst(0) and dst(1) are this unit's head columns of dqkv's q and k
                    // blocks, written by no other unit and overlapping no input.
                    unsafe {
                        // dQ = dS K,  dK = dSᵀ Q
                        sgemm(t, dims.hd, t, dst(0), ld, 1, dsm, k, alpha, false);
                        sgemm(t, dims.hd, t, dst(1), ld, 1, dsm.t(), q, alpha, false);
                    }
                    if biased {
                        // The probabilities are spent: their buffer keeps dS for dA.
                        p.copy_from_slice(ds);
                    }
                },
            );
        })?;
        let dqkv = Tensor::from_vec(dqkv, (b, t, d3), qkv.device())?;
        if !biased {
            return Ok((dqkv, None));
        }
        // dA: each (group, head) block sums the dS of batch items group, group + G, ... in
        // that order.
        let (groups, heads) = (self.groups, self.heads);
        let mut dbias = vec![0f32; groups * heads * t * t];
        if t > 0 {
            let ds = &probs;
            dbias
                .par_chunks_mut(t * t)
                .enumerate()
                .for_each(|(block, acc)| {
                    let (gi, h) = (block / heads, block % heads);
                    for bi in (gi..b).step_by(groups) {
                        let unit = (bi * heads + h) * t * t;
                        add_into(acc, &ds[unit..unit + t * t]);
                    }
                });
        }
        let dbias = Tensor::from_vec(dbias, (groups, heads, t, t), qkv.device())?;
        Ok((dqkv, Some(dbias)))
    }
}

/// acc += x, elementwise.
fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}

/// Geometry of one forward or backward call.
#[derive(Clone, Copy)]
struct Dims {
    t: usize,
    d: usize,
    hd: usize,
    heads: usize,
}

impl Dims {
    /// The (T, hd) slice of part `which` (0 q, 1 k, 2 v) of head `h` in batch item `b` of
    /// a (B, T, 3D) buffer starting at `base`.
    ///
    /// # Safety
    /// `base` must point to a (B, T, 3D) buffer of these dims, with b < B, h < heads and
    /// which < 3, and T ≥ 1 (the slice's first element must lie inside the buffer).
    unsafe fn part(&self, base: *const f32, b: usize, h: usize, which: usize) -> MatRef {
        let off = b * self.t * 3 * self.d + which * self.d + h * self.hd;
        // SAFETY: the caller's contract puts element (b, 0, which·D + h·hd) inside the buffer.
        MatRef::new(unsafe { base.add(off) }, 3 * self.d as isize, 1)
    }

    /// Head `h`'s (q, k, v) slices of batch item `b` (see [`part`](Self::part)).
    ///
    /// # Safety
    /// As [`part`](Self::part), for each of the three parts.
    unsafe fn qkv(&self, base: *const f32, b: usize, h: usize) -> (MatRef, MatRef, MatRef) {
        // SAFETY: the caller's contract, for parts 0, 1 and 2.
        unsafe {
            (
                self.part(base, b, h, 0),
                self.part(base, b, h, 1),
                self.part(base, b, h, 2),
            )
        }
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "vit-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, d3) = l.shape().dims3()?;
        let out = self.forward(f32_slice(s, l)?, l.shape(), None)?;
        Ok((CpuStorage::F32(out), Shape::from((b, t, d3 / 3))))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(qkv, g)?.0))
    }
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "vit-attention-biased"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, t, d3) = l.shape().dims3()?;
        let out = self.forward(f32_slice(s, l)?, l.shape(), Some(f32_slice(bs, bl)?))?;
        Ok((CpuStorage::F32(out), Shape::from((b, t, d3 / 3))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        _bias: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dqkv, dbias) = self.backward(qkv, g)?;
        Ok((Some(dqkv), dbias))
    }
}

/// Softmax of each row of a (rows, t) buffer, in place, max-subtracted.
#[inline(always)]
fn softmax_rows(p: &mut [f32], t: usize) {
    for row in p.chunks_exact_mut(t) {
        let row_max = max(row);
        for x in row.iter_mut() {
            *x = exp(*x - row_max);
        }
        let inv = 1.0 / sum(row);
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

/// The softmax backward of each row, in place: dS = P ⊙ (dP − rowsum(P ⊙ dP)), scaled,
/// for probabilities `p` and their gradient `ds` (= dP on entry), both (rows, t).
#[inline(always)]
fn softmax_grad_rows(p: &[f32], ds: &mut [f32], t: usize, scale: f32) {
    for (pr, dr) in p.chunks_exact(t).zip(ds.chunks_exact_mut(t)) {
        let pd = dot(pr, dr);
        for (dv, &pv) in dr.iter_mut().zip(pr) {
            *dv = pv * (*dv - pd) * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::ops::attention_composed;
    use candle_core::Tensor;

    const HEADS: usize = 3;

    fn fused(t: &[Tensor]) -> Tensor {
        let hd = t[0].dim(2).unwrap() / 3 / HEADS;
        super::attention(&t[0], HEADS, 1.0 / (hd as f64).sqrt()).unwrap()
    }

    fn composed(t: &[Tensor]) -> Tensor {
        let hd = t[0].dim(2).unwrap() / 3 / HEADS;
        attention_composed(&t[0], HEADS, 1.0 / (hd as f64).sqrt()).unwrap()
    }

    /// (B, T, head dim): odd token counts, one token, one batch item, wide heads.
    const SHAPES: &[(usize, usize, usize)] =
        &[(1, 1, 1), (2, 5, 2), (3, 17, 4), (2, 50, 16), (1, 7, 33)];

    #[test]
    fn matches_composed_values_and_gradients() {
        for (i, &(b, t, hd)) in SHAPES.iter().enumerate() {
            let shape = [b, t, 3 * HEADS * hd];
            let inp = vec![rand(&shape, 2.0, i as u64)];
            let c = cotangent(&[b, t, HEADS * hd], i as u64);
            let (yf, gf) = value_and_grads(fused, &inp, &c);
            let (yc, gc) = value_and_grads(composed, &inp, &c);
            let inp64 = vec![inp[0].to_dtype(candle_core::DType::F64).unwrap()];
            let (y64, g64) = value_and_grads(composed, &inp64, &c);
            assert!(max_rel_diff(&yf, &yc) < 1e-5, "{shape:?} forward");
            assert!(max_rel_diff(&yf, &y64) < 1e-5, "{shape:?} forward f64");
            assert!(max_rel_diff(&gf[0], &gc[0]) < 1e-4, "{shape:?} grad");
            assert!(max_rel_diff(&gf[0], &g64[0]) < 1e-4, "{shape:?} grad f64");
        }
    }

    #[test]
    fn gradients_match_central_differences() {
        for (b, t, hd) in [(1, 1, 1), (2, 3, 2), (1, 4, 3)] {
            let shape = [b, t, 3 * HEADS * hd];
            let inp = vec![rand(&shape, 1.5, 11)];
            let c = cotangent(&[b, t, HEADS * hd], 12);
            let (_, analytic) = value_and_grads(fused, &inp, &c);
            let numeric = finite_diff(composed, &inp, &c);
            let e = max_rel_diff(&analytic[0], &numeric[0]);
            assert!(e < 1e-4, "{shape:?}: {e}");
        }
    }

    #[test]
    fn inference_pass_equals_the_training_pass() {
        // Without gradients the probabilities live in per-thread scratch, not one buffer.
        for (i, &(b, t, hd)) in SHAPES.iter().enumerate() {
            let x = rand(&[b, t, 3 * HEADS * hd], 2.0, 40 + i as u64);
            let c = cotangent(&[b, t, HEADS * hd], i as u64);
            let (tracked, _) = value_and_grads(fused, std::slice::from_ref(&x), &c);
            assert!(!x.track_op());
            assert_eq!(flat(&fused(&[x])), flat(&tracked), "{b} {t} {hd}");
        }
    }

    #[test]
    fn no_tokens_trains_to_an_empty_gradient() {
        let shape = [2, 0, 3 * HEADS * 2];
        let (y, g) = value_and_grads(fused, &[rand(&shape, 1.0, 1)], &cotangent(&[2, 0, 6], 2));
        assert_eq!((y.dims(), g[0].dims()), (&[2, 0, 6][..], &shape[..]));
    }

    /// (B, G, T, head dim) of the biased form: one bias block, several, one per item.
    const BIASED: &[(usize, usize, usize, usize)] =
        &[(1, 1, 1, 1), (4, 2, 5, 2), (6, 3, 9, 4), (2, 2, 16, 3)];

    fn fused_biased(t: &[Tensor]) -> Tensor {
        let hd = t[0].dim(2).unwrap() / 3 / HEADS;
        super::attention_biased(&t[0], &t[1], HEADS, 1.0 / (hd as f64).sqrt()).unwrap()
    }

    fn composed_biased(t: &[Tensor]) -> Tensor {
        let hd = t[0].dim(2).unwrap() / 3 / HEADS;
        crate::ops::attention_biased_composed(&t[0], &t[1], HEADS, 1.0 / (hd as f64).sqrt())
            .unwrap()
    }

    #[test]
    fn biased_matches_composed_values_and_gradients() {
        for (i, &(b, g, t, hd)) in BIASED.iter().enumerate() {
            let inp = vec![
                rand(&[b, t, 3 * HEADS * hd], 2.0, i as u64),
                rand(&[g, HEADS, t, t], 3.0, 20 + i as u64),
            ];
            let c = cotangent(&[b, t, HEADS * hd], i as u64);
            let (yf, gf) = value_and_grads(fused_biased, &inp, &c);
            let to64 = |x: &Tensor| x.to_dtype(candle_core::DType::F64).unwrap();
            let inp64: Vec<Tensor> = inp.iter().map(to64).collect();
            let (y64, g64) = value_and_grads(composed_biased, &inp64, &c);
            assert!(max_rel_diff(&yf, &y64) < 1e-5, "{b} {g} {t} forward");
            assert!(max_rel_diff(&gf[0], &g64[0]) < 1e-4, "{b} {g} {t} dqkv");
            assert!(max_rel_diff(&gf[1], &g64[1]) < 1e-4, "{b} {g} {t} dbias");
            // Without gradients: the same output.
            assert_eq!(flat(&fused_biased(&inp)), flat(&yf));
        }
    }

    #[test]
    fn biased_gradients_match_central_differences() {
        let inp = vec![
            rand(&[4, 3, 3 * HEADS * 2], 1.5, 31),
            rand(&[2, HEADS, 3, 3], 1.0, 32),
        ];
        let c = cotangent(&[4, 3, HEADS * 2], 33);
        let (_, analytic) = value_and_grads(fused_biased, &inp, &c);
        let numeric = finite_diff(composed_biased, &inp, &c);
        for (a, n) in analytic.iter().zip(&numeric) {
            let e = max_rel_diff(a, n);
            assert!(e < 1e-4, "{e}");
        }
    }

    #[test]
    fn a_bias_that_does_not_fit_is_an_error() {
        let x = rand(&[3, 2, 3 * HEADS], 1.0, 1);
        let e = super::attention_biased(&x, &rand(&[2, HEADS, 2, 2], 1.0, 2), HEADS, 1.0);
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("G dividing the batch 3"));
        assert!(super::attention_biased(&x, &rand(&[1, HEADS, 2, 3], 1.0, 2), HEADS, 1.0).is_err());
    }

    #[test]
    fn width_not_splitting_into_heads_is_an_error() {
        let x = rand(&[1, 2, 10], 1.0, 1);
        assert!(super::attention(&x, 3, 1.0).is_err());
    }
}
