//! Fused batch normalisation over channels-last f32 tensors (B, H, W, C), as N = B·H·W rows
//! of C channels.
//!
//! Training ([`batch_norm_train`]): per channel c over its N values, the mean μ and the
//! biased variance σ², then y = (x − μ)·w/√(σ² + ε) + b. Backward, with x̂ = (x − μ)/√(σ² + ε):
//!
//!   db = Σ g,   dw = Σ g·x̂,   dx = w/√(σ² + ε) · (g − db/N − x̂·dw/N)
//!
//! Evaluation ([`channel_affine`]): y = x·scale_c + shift_c with the running statistics
//! folded into scale and shift by the caller; backward dx = g·scale_c, dscale = Σ g·x,
//! dshift = Σ g.
//!
//! Every pass runs over blocks of whole rows ([`rows_per_block`] of C, about 64 KiB) in
//! parallel, with the channels as the vector lanes. A block's sums are per channel in f32
//! (its mean, then the squares about that mean while the block is in cache); the blocks'
//! are combined in block order in f64 (Chan et al.'s pairwise update for the variance).
//! Blocks are a function of the shape only, so results never depend on the number of
//! threads or the instruction set.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::par::{new_row_blocks, rows_per_block};
use super::simd::simd;
use super::storage::{f32_slice, with_f32};

/// (rows N, channels C) of a channels-last shape (…, C).
fn dims(shape: &[usize]) -> Result<(usize, usize)> {
    match *shape {
        [b, h, w, c] => Ok((b * h * w, c)),
        _ => bail!("batch norm: expected (B, H, W, C), got {shape:?}"),
    }
}

/// `f(rows, block)` over consecutive blocks of whole rows of the (N, C) matrices, in
/// parallel, through [`simd!`] (mark the closure `#[inline(always)]`): what each block
/// returned, in block order. `rows` is the block's row range.
fn per_block<R: Send>(
    (n, c): (usize, usize),
    f: impl Fn(std::ops::Range<usize>) -> R + Sync + Send,
) -> Vec<R> {
    let rows = rows_per_block(c);
    (0..n.div_ceil(rows))
        .into_par_iter()
        .map(|i| simd!(f(i * rows..((i + 1) * rows).min(n))))
        .collect()
}

/// Σ over the rows `rows` of `f(a, b, p)`, per channel (p is the channel's entry of `p`),
/// in f32 lanes: the channels' sums of one block.
#[inline(always)]
fn column_sums(
    a: &[f32],
    b: &[f32],
    p: &[f32],
    rows: std::ops::Range<usize>,
    f: impl Fn(f32, f32, f32) -> f32,
) -> Vec<f32> {
    let c = p.len();
    let mut acc = vec![0f32; c];
    for r in rows {
        let (ar, br) = (&a[r * c..][..c], &b[r * c..][..c]);
        for (((s, &x), &y), &p) in acc.iter_mut().zip(ar).zip(br).zip(p) {
            *s += f(x, y, p);
        }
    }
    acc
}

/// Per channel, the batch mean and biased variance of x (N, C): each block's mean and sum
/// of squares about it, combined in block order in f64.
fn moments(x: &[f32], (n, c): (usize, usize)) -> (Vec<f64>, Vec<f64>) {
    let blocks = per_block(
        (n, c),
        #[inline(always)]
        |rows: std::ops::Range<usize>| {
            let len = rows.len() as f32;
            let zeros = vec![0f32; c];
            let sums = column_sums(x, x, &zeros, rows.clone(), |v, _, _| v);
            let mean: Vec<f32> = sums.iter().map(|s| s / len).collect();
            let m2 = column_sums(x, x, &mean, rows.clone(), |v, _, m| (v - m) * (v - m));
            (rows.len(), mean, m2)
        },
    );
    // Chan et al.: merging (n_a, μ_a, M2_a) with (n_b, μ_b, M2_b) gives
    // μ = μ_a + δ·n_b/n, M2 = M2_a + M2_b + δ²·n_a·n_b/n, with δ = μ_b − μ_a.
    let (mut count, mut mean, mut m2) = (0f64, vec![0f64; c], vec![0f64; c]);
    for (len, bm, bm2) in blocks {
        let nb = len as f64;
        let total = count + nb;
        for j in 0..c {
            let delta = bm[j] as f64 - mean[j];
            mean[j] += delta * nb / total;
            m2[j] += bm2[j] as f64 + delta * delta * count * nb / total;
        }
        count = total;
    }
    let var = m2.iter().map(|v| v / count.max(1.0)).collect();
    (mean, var)
}

/// Per channel, Σ of `f(a, b, p)` over all rows (p: the channel's entry of `p`): the
/// blocks' f32 sums added in block order in f64.
fn channel_sums(
    a: &[f32],
    b: &[f32],
    p: &[f32],
    n: usize,
    f: impl Fn(f32, f32, f32) -> f32 + Sync + Send + Copy,
) -> Vec<f64> {
    let c = p.len();
    let blocks = per_block(
        (n, c),
        #[inline(always)]
        |rows| column_sums(a, b, p, rows, f),
    );
    let mut total = vec![0f64; c];
    for part in blocks {
        for (t, v) in total.iter_mut().zip(part) {
            *t += v as f64;
        }
    }
    total
}

/// A new (N, C) buffer of `f(a, b, p, q, r)` element by element (p, q, r: the channel's
/// entries of the three parameter slices), in parallel blocks of rows.
fn per_element(
    a: &[f32],
    b: &[f32],
    [p, q, r]: [&[f32]; 3],
    f: impl Fn(f32, f32, f32, f32, f32) -> f32 + Sync + Send,
) -> Vec<f32> {
    let c = p.len();
    new_row_blocks(
        a.len(),
        c,
        #[inline(always)]
        |row0, block| {
            let (a, b) = (&a[row0 * c..], &b[row0 * c..]);
            for ((yr, ar), br) in block.chunks_exact_mut(c).zip(a.chunks(c)).zip(b.chunks(c)) {
                let params = p.iter().zip(q).zip(r);
                for (((y, &x), &v), ((&p, &q), &r)) in yr.iter_mut().zip(ar).zip(br).zip(params) {
                    *y = f(x, v, p, q, r);
                }
            }
        },
    )
}

/// Training-mode batch normalisation of x (B, H, W, C) with weight and bias (C,): returns y
/// and the batch mean and biased variance of each channel.
pub(crate) fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Vec<f32>, Vec<f32>)> {
    let (_, c) = dims(x.dims())?;
    if weight.dims1()? != c || bias.dims1()? != c {
        bail!(
            "batch norm: weight {:?} and bias {:?} for {c} channels",
            weight.dims(),
            bias.dims()
        )
    }
    let stats = Arc::new(Mutex::new(None));
    let op = BatchNormTrain {
        eps,
        stats: stats.clone(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    // Cloned, not taken: backward reads them again.
    let Some((mean, var, _)) = stats.lock().expect("batch-norm statistics").clone() else {
        bail!("batch norm: forward left no statistics")
    };
    Ok((y, mean, var))
}

/// Per channel, from forward: mean, biased variance, 1/√(var + eps).
type Stats = (Vec<f32>, Vec<f32>, Vec<f32>);

struct BatchNormTrain {
    eps: f64,
    stats: Arc<Mutex<Option<Stats>>>,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "vit-batch-norm"
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
        let d = dims(xl.dims())?;
        let (mean, var) = moments(x, d);
        let inv: Vec<f64> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let scale: Vec<f32> = (0..d.1).map(|j| (w[j] as f64 * inv[j]) as f32).collect();
        let shift: Vec<f32> = (0..d.1)
            .map(|j| (b[j] as f64 - mean[j] * w[j] as f64 * inv[j]) as f32)
            .collect();
        let zeros = vec![0f32; d.1];
        let y = per_element(x, x, [&scale, &shift, &zeros], |v, _, s, t, _| v * s + t);
        *self.stats.lock().expect("batch-norm statistics") = Some((
            mean.iter().map(|&v| v as f32).collect(),
            var.iter().map(|&v| v as f32).collect(),
            inv.iter().map(|&v| v as f32).collect(),
        ));
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
        let Some((mean, _, inv)) = self.stats.lock().expect("batch-norm statistics").clone() else {
            bail!("batch norm backward: no statistics from forward")
        };
        let d = dims(x.dims())?;
        let n = d.0 as f64;
        let (dx, dw, db) = with_f32([x, w, g], |[x, w, g]| {
            let zeros = vec![0f32; d.1];
            let sg = channel_sums(g, g, &zeros, d.0, |gv, _, _| gv);
            let sgx = channel_sums(x, g, &mean, d.0, |v, gv, m| gv * (v - m));
            // Per channel, with k = w/√(σ² + ε), Σg/N and Σg·x̂/N:
            // dx = k·(g − Σg/N − x̂·Σg·x̂/N) = k·g + a·x + b, a = −k·r·Σg·x̂/N with
            // r = 1/√(σ² + ε), b = −k·Σg/N − a·μ.
            let dw: Vec<f32> = (0..d.1).map(|j| (sgx[j] * inv[j] as f64) as f32).collect();
            let (mut k, mut a, mut b) = (vec![0f32; d.1], vec![0f32; d.1], vec![0f32; d.1]);
            for j in 0..d.1 {
                let kj = w[j] as f64 * inv[j] as f64;
                let aj = -kj * inv[j] as f64 * dw[j] as f64 / n;
                k[j] = kj as f32;
                a[j] = aj as f32;
                b[j] = (-kj * sg[j] / n - aj * mean[j] as f64) as f32;
            }
            let dx = per_element(x, g, [&k, &a, &b], |v, gv, k, a, b| gv * k + v * a + b);
            let db: Vec<f32> = sg.iter().map(|&s| s as f32).collect();
            (dx, dw, db)
        })?;
        let dev = x.device();
        let c = d.1;
        Ok((
            Some(Tensor::from_vec(dx, x.dims(), dev)?),
            Some(Tensor::from_vec(dw, c, dev)?),
            Some(Tensor::from_vec(db, c, dev)?),
        ))
    }
}

/// y = x·scale_c + shift_c for x (B, H, W, C) and scale, shift (C,): evaluation-mode batch
/// normalisation once the running statistics are folded in.
pub(crate) fn channel_affine(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let (_, c) = dims(x.dims())?;
    if scale.dims1()? != c || shift.dims1()? != c {
        bail!(
            "channel affine: scale {:?} and shift {:?} for {c} channels",
            scale.dims(),
            shift.dims()
        )
    }
    x.contiguous()?
        .apply_op3(&scale.contiguous()?, &shift.contiguous()?, ChannelAffine)
}

struct ChannelAffine;

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "vit-channel-affine"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
        hs: &CpuStorage,
        hl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, scale, shift) = (f32_slice(xs, xl)?, f32_slice(ss, sl)?, f32_slice(hs, hl)?);
        let d = dims(xl.dims())?;
        let zeros = vec![0f32; d.1];
        let y = per_element(x, x, [scale, shift, &zeros], |v, _, s, t, _| v * s + t);
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _shift: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = dims(x.dims())?;
        let (dx, dscale, dshift) = with_f32([x, scale, g], |[x, scale, g]| {
            let zeros = vec![0f32; d.1];
            let dx = per_element(g, g, [scale, &zeros, &zeros], |gv, _, s, _, _| gv * s);
            let dscale = channel_sums(x, g, &zeros, d.0, |v, gv, _| gv * v);
            let dshift = channel_sums(g, g, &zeros, d.0, |gv, _, _| gv);
            let f32s = |v: Vec<f64>| v.into_iter().map(|s| s as f32).collect::<Vec<_>>();
            (dx, f32s(dscale), f32s(dshift))
        })?;
        let dev = x.device();
        let c = d.1;
        Ok((
            Some(Tensor::from_vec(dx, x.dims(), dev)?),
            Some(Tensor::from_vec(dscale, c, dev)?),
            Some(Tensor::from_vec(dshift, c, dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use candle_core::{DType, Tensor};

    fn fused(t: &[Tensor]) -> Tensor {
        super::batch_norm_train(&t[0], &t[1], &t[2], 1e-5)
            .unwrap()
            .0
    }

    /// Training-mode normalisation from candle ops: any dtype (the f64 oracle too).
    fn composed(t: &[Tensor]) -> Tensor {
        let (x, w, b) = (&t[0], &t[1], &t[2]);
        let mean = x.mean_keepdim((0, 1, 2)).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim((0, 1, 2)).unwrap();
        let xn = xc
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap();
        xn.broadcast_mul(w).unwrap().broadcast_add(b).unwrap()
    }

    fn affine(t: &[Tensor]) -> Tensor {
        super::channel_affine(&t[0], &t[1], &t[2]).unwrap()
    }

    fn affine_composed(t: &[Tensor]) -> Tensor {
        t[0].broadcast_mul(&t[1])
            .unwrap()
            .broadcast_add(&t[2])
            .unwrap()
    }

    /// (B, H, W, C): one value per sample, odd sizes, more rows than one block (16384 / C),
    /// and channels past one vector's lanes.
    const SHAPES: &[[usize; 4]] = &[
        [2, 1, 1, 1],
        [3, 5, 4, 2],
        [8, 7, 7, 5],
        [64, 4, 4, 3],
        [4, 16, 16, 70],
    ];

    #[test]
    fn matches_composed_values_and_gradients_and_the_statistics() {
        for (i, &[b, h, w, c]) in SHAPES.iter().enumerate() {
            let s = i as u64 * 5;
            let x = (rand(&[b, h, w, c], 2.0, s) + 0.5).unwrap();
            let inp = vec![x.clone(), rand(&[c], 1.0, s + 1), rand(&[c], 1.0, s + 2)];
            let cot = cotangent(&[b, h, w, c], s);
            for (f, g) in [
                (
                    fused as fn(&[Tensor]) -> Tensor,
                    composed as fn(&[Tensor]) -> Tensor,
                ),
                (affine, affine_composed),
            ] {
                let (yf, gf) = value_and_grads(f, &inp, &cot);
                let (yc, gc) = value_and_grads(g, &inp, &cot);
                assert!(max_rel_diff(&yf, &yc) < 1e-4, "{b}x{h}x{w}x{c} forward");
                for j in 0..3 {
                    let tol = 1e-4 * (1.0 + (b * h * w) as f64).sqrt();
                    assert!(
                        max_rel_diff(&gf[j], &gc[j]) < tol,
                        "{b}x{h}x{w}x{c} grad {j}"
                    );
                }
            }
            let (_, mean, var) = super::batch_norm_train(&inp[0], &inp[1], &inp[2], 1e-5).unwrap();
            let m = x.mean_keepdim((0, 1, 2)).unwrap().flatten_all().unwrap();
            let v = x
                .broadcast_sub(&x.mean_keepdim((0, 1, 2)).unwrap())
                .unwrap()
                .sqr()
                .unwrap();
            let v = v.mean_keepdim((0, 1, 2)).unwrap().flatten_all().unwrap();
            let close = |a: &[f32], b: &Tensor| {
                let b = b.to_vec1::<f32>().unwrap();
                a.iter()
                    .zip(&b)
                    .all(|(p, q)| (p - q).abs() < 1e-5 * (1.0 + q.abs()))
            };
            assert!(close(&mean, &m) && close(&var, &v), "statistics");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let inp = vec![
            rand(&[3, 2, 3, 2], 1.0, 1),
            rand(&[2], 1.0, 2),
            rand(&[2], 1.0, 3),
        ];
        let cot = cotangent(&[3, 2, 3, 2], 4);
        for (f, g) in [
            (
                fused as fn(&[Tensor]) -> Tensor,
                composed as fn(&[Tensor]) -> Tensor,
            ),
            (affine, affine_composed),
        ] {
            let (_, gf) = value_and_grads(f, &inp, &cot);
            let fd = finite_diff(g, &inp, &cot);
            for j in 0..3 {
                let fd = fd[j].to_dtype(DType::F32).unwrap();
                assert!(max_rel_diff(&gf[j], &fd) < 1e-3, "grad {j}");
            }
        }
    }

    /// The same bits on one thread as on several: blocks of rows, not threads, split the
    /// sums (100 blocks of 256 rows at 64 channels).
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let inp = vec![
            rand(&[100, 16, 16, 64], 1.0, 1),
            rand(&[64], 1.0, 2),
            rand(&[64], 1.0, 3),
        ];
        let cot = cotangent(&[100, 16, 16, 64], 4);
        assert_thread_count_free(fused, &inp, &cot);
    }
}
