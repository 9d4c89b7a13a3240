//! Fused group normalisation over channels-last f32 tensors (B, H, W, C) with G groups of
//! C/G consecutive channels (PyTorch's `GroupNorm`; the hybrid ViT's backbone).
//!
//! Per image and group, over its n = H·W·C/G values: the mean μ, the biased variance σ²
//! and r = 1/√(σ² + ε); then y = x·s_c + t_c with s_c = r·w_c, t_c = b_c − μ·s_c.
//! Backward, with x̂ = (x − μ)·r and per image A_c = Σ_rows g, B_c = Σ_rows g·x̂:
//!
//!   db_c = Σ_images A_c,   dw_c = Σ_images B_c,
//!   dx = r·(g·w_c − m1 − x̂·m2),  m1 = Σ_{c∈group} w_c·A_c / n,  m2 = Σ_{c∈group} w_c·B_c / n
//!
//! computed as dx = g·(r·w_c) + x·a + k with a = −r²·m2 and k = −r·m1 + r²·m2·μ. The
//! statistics are recomputed in backward (one pass over x) rather than kept.
//!
//! Images run in parallel; within an image the rows go in blocks of [`ROWS`], each block's
//! per-channel sums in f32 added in block order in f64, and the weight and bias gradients
//! add the images' sums in image order: results never depend on the number of threads or
//! the instruction set.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::simd::simd;
use super::storage::{f32_slice, with_f32};

/// Rows per block of an image's per-channel sums.
const ROWS: usize = 32;

/// (images B, rows H·W, channels C) of a channels-last shape whose C the groups divide.
fn dims(shape: &[usize], groups: usize) -> Result<(usize, usize, usize)> {
    match *shape {
        [b, h, w, c] if groups > 0 && c % groups == 0 => Ok((b, h * w, c)),
        _ => bail!("group norm: expected (B, H, W, C) with C divisible by {groups}, got {shape:?}"),
    }
}

/// Per channel, Σ over the image's rows of `f(a, b, p_c)` (a, b: the rows of two (rows, C)
/// slices; p_c the channel's entry of `p`): f32 per block of rows, f64 across blocks.
#[inline(always)]
fn sums(a: &[f32], b: &[f32], p: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> Vec<f64> {
    let c = p.len();
    let mut total = vec![0f64; c];
    let mut acc = vec![0f32; c];
    for (ab, bb) in a.chunks(ROWS * c).zip(b.chunks(ROWS * c)) {
        acc.fill(0.0);
        for (ar, br) in ab.chunks_exact(c).zip(bb.chunks_exact(c)) {
            for (((s, &x), &y), &p) in acc.iter_mut().zip(ar).zip(br).zip(p) {
                *s += f(x, y, p);
            }
        }
        for (t, &s) in total.iter_mut().zip(&acc) {
            *t += s as f64;
        }
    }
    total
}

/// Per-channel values of per-group numbers: `per_group[c / (C/G)]` for each channel.
fn spread(per_group: &[f64], c: usize) -> Vec<f64> {
    let cg = c / per_group.len();
    (0..c).map(|j| per_group[j / cg]).collect()
}

/// Σ over each group's channels of `v`.
fn group_sums(v: &[f64], groups: usize) -> Vec<f64> {
    v.chunks(v.len() / groups).map(|g| g.iter().sum()).collect()
}

/// One image's (rows, C) values: per channel, its group's mean μ and 1/√(σ² + ε).
#[inline(always)]
fn stats(x: &[f32], c: usize, groups: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let n = (x.len() / groups) as f64;
    let zeros = vec![0f32; c];
    let mean = spread(
        &group_sums(&sums(x, x, &zeros, |v, _, _| v), groups)
            .iter()
            .map(|s| s / n)
            .collect::<Vec<_>>(),
        c,
    );
    let mu: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
    let sq = group_sums(&sums(x, x, &mu, |v, _, m| (v - m) * (v - m)), groups);
    let inv: Vec<f64> = sq.iter().map(|s| 1.0 / (s / n + eps).sqrt()).collect();
    (mean, spread(&inv, c))
}

/// y = x·s_c + t_c row by row.
#[inline(always)]
fn affine_rows(y: &mut [f32], x: &[f32], s: &[f32], t: &[f32]) {
    let c = s.len();
    for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        for (((y, &x), &s), &t) in yr.iter_mut().zip(xr).zip(s).zip(t) {
            *y = x * s + t;
        }
    }
}

/// One image's forward into `y`.
#[inline(always)]
fn image_forward(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], groups: usize, eps: f64) {
    let c = w.len();
    let (mean, inv) = stats(x, c, groups, eps);
    let s: Vec<f32> = (0..c).map(|j| (inv[j] * w[j] as f64) as f32).collect();
    let t: Vec<f32> = (0..c)
        .map(|j| (b[j] as f64 - mean[j] * inv[j] * w[j] as f64) as f32)
        .collect();
    affine_rows(y, x, &s, &t);
}

/// One image's backward: dx into `dx`; returns its (Σ g·x̂, Σ g) per channel.
#[inline(always)]
fn image_backward(
    dx: &mut [f32],
    x: &[f32],
    g: &[f32],
    w: &[f32],
    groups: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>) {
    let c = w.len();
    let n = (x.len() / groups) as f64;
    let (mean, inv) = stats(x, c, groups, eps);
    let mu: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
    let zeros = vec![0f32; c];
    let sum_g = sums(g, g, &zeros, |gv, _, _| gv);
    let sum_gx: Vec<f64> = sums(x, g, &mu, |v, gv, m| gv * (v - m))
        .iter()
        .zip(&inv)
        .map(|(s, r)| s * r)
        .collect();
    let weighted = |v: &[f64]| -> Vec<f64> {
        let wv: Vec<f64> = v.iter().zip(w).map(|(s, &w)| s * w as f64 / n).collect();
        spread(&group_sums(&wv, groups), c)
    };
    let (m1, m2) = (weighted(&sum_g), weighted(&sum_gx));
    let mut k = vec![0f32; c];
    let mut a = vec![0f32; c];
    let mut shift = vec![0f32; c];
    for j in 0..c {
        let r = inv[j];
        k[j] = (r * w[j] as f64) as f32;
        a[j] = (-r * r * m2[j]) as f32;
        shift[j] = (-r * m1[j] + r * r * m2[j] * mean[j]) as f32;
    }
    for ((dr, xr), gr) in dx
        .chunks_exact_mut(c)
        .zip(x.chunks_exact(c))
        .zip(g.chunks_exact(c))
    {
        for i in 0..c {
            dr[i] = gr[i] * k[i] + xr[i] * a[i] + shift[i];
        }
    }
    (sum_gx, sum_g)
}

/// Group normalisation of x (B, H, W, C) with weight and bias (C,).
pub(crate) fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let (_, _, c) = dims(x.dims(), groups)?;
    if weight.dims1()? != c || bias.dims1()? != c {
        bail!(
            "group norm: weight {:?} and bias {:?} for {c} channels",
            weight.dims(),
            bias.dims()
        )
    }
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        GroupNorm { groups, eps },
    )
}

struct GroupNorm {
    groups: usize,
    eps: f64,
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "vit-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?, f32_slice(bs, bl)?);
        let (_, rows, c) = dims(xl.dims(), self.groups)?;
        let image = (rows * c).max(1);
        let (groups, eps) = (self.groups, self.eps);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(image)
            .zip(x.par_chunks(image))
            .for_each(|(y, x)| simd!(image_forward(y, x, w, b, groups, eps)));
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, rows, c) = dims(x.dims(), self.groups)?;
        let image = (rows * c).max(1);
        let (groups, eps) = (self.groups, self.eps);
        let (dx, dw, db) = with_f32([x, w, g], |[x, w, g]| {
            let mut dx = vec![0f32; x.len()];
            let parts: Vec<(Vec<f64>, Vec<f64>)> = dx
                .par_chunks_mut(image)
                .zip(x.par_chunks(image))
                .zip(g.par_chunks(image))
                .map(|((dx, x), g)| simd!(image_backward(dx, x, g, w, groups, eps)))
                .collect();
            let (mut dw, mut db) = (vec![0f64; c], vec![0f64; c]);
            for (sgx, sg) in parts {
                for j in 0..c {
                    dw[j] += sgx[j];
                    db[j] += sg[j];
                }
            }
            let f32s = |v: Vec<f64>| v.into_iter().map(|s| s as f32).collect::<Vec<_>>();
            (dx, f32s(dw), f32s(db))
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.dims(), dev)?),
            Some(Tensor::from_vec(dw, c, dev)?),
            Some(Tensor::from_vec(db, c, dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use candle_core::{DType, Tensor};

    fn fused(groups: usize) -> impl Fn(&[Tensor]) -> Tensor {
        move |t| super::group_norm(&t[0], &t[1], &t[2], groups, 1e-5).unwrap()
    }

    /// The composed twin (`ops::group_norm_composed`): any dtype (the f64 oracle too).
    fn composed(groups: usize) -> impl Fn(&[Tensor]) -> Tensor {
        move |t| crate::ops::group_norm_composed(&t[0], &t[1], &t[2], groups, 1e-5).unwrap()
    }

    /// (B, H, W, C, groups): one channel per group, one group, a single pixel, rows past
    /// one block, channels past one vector's lanes.
    const CASES: &[([usize; 4], usize)] = &[
        ([2, 1, 1, 4], 2),
        ([3, 5, 4, 6], 3),
        ([2, 7, 7, 8], 8),
        ([1, 9, 8, 5], 1),
        ([3, 12, 10, 64], 32),
    ];

    #[test]
    fn matches_composed_values_and_gradients() {
        for (i, &([b, h, w, c], groups)) in CASES.iter().enumerate() {
            let s = i as u64 * 7;
            let inp = vec![
                (rand(&[b, h, w, c], 2.0, s) + 0.5).unwrap(),
                rand(&[c], 1.0, s + 1),
                rand(&[c], 1.0, s + 2),
            ];
            let cot = cotangent(&[b, h, w, c], s);
            let (yf, gf) = value_and_grads(fused(groups), &inp, &cot);
            let (yc, gc) = value_and_grads(composed(groups), &inp, &cot);
            assert!(
                max_rel_diff(&yf, &yc) < 1e-4,
                "{b}x{h}x{w}x{c}/{groups} forward"
            );
            for j in 0..3 {
                let tol = 1e-4 * (1.0 + (b * h * w) as f64).sqrt();
                let d = max_rel_diff(&gf[j], &gc[j]);
                assert!(d < tol, "{b}x{h}x{w}x{c}/{groups} grad {j}: {d}");
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let inp = vec![
            rand(&[2, 3, 2, 4], 1.0, 1),
            rand(&[4], 1.0, 2),
            rand(&[4], 1.0, 3),
        ];
        let cot = cotangent(&[2, 3, 2, 4], 4);
        let (_, gf) = value_and_grads(fused(2), &inp, &cot);
        let fd = finite_diff(composed(2), &inp, &cot);
        for j in 0..3 {
            let fd = fd[j].to_dtype(DType::F32).unwrap();
            assert!(max_rel_diff(&gf[j], &fd) < 1e-3, "grad {j}");
        }
    }

    /// The same bits on one thread as on several.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let inp = vec![
            rand(&[6, 20, 20, 64], 1.0, 1),
            rand(&[64], 1.0, 2),
            rand(&[64], 1.0, 3),
        ];
        let cot = cotangent(&[6, 20, 20, 64], 4);
        assert_thread_count_free(fused(32), &inp, &cot);
    }
}
