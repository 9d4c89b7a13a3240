//! Fused batch normalisation over NCHW f32 tensors, one task per channel.
//!
//! Training ([`batch_norm_train`]): per channel c over its N = B·H·W values, the mean μ and
//! the biased variance σ² (sums in f64, in a fixed order), then y = (x − μ)·w/√(σ² + ε) + b
//! in the same task while the channel is in cache. Backward, with x̂ = (x − μ)/√(σ² + ε):
//!
//!   db = Σ g,   dw = Σ g·x̂,   dx = w/√(σ² + ε) · (g − db/N − x̂·dw/N)
//!
//! Evaluation ([`channel_affine`]): y = x·scale_c + shift_c with the running statistics
//! folded into scale and shift by the caller; backward dx = g·scale_c, dscale = Σ g·x,
//! dshift = Σ g.
//!
//! Every sum over a channel runs in one task in a fixed order (per plane over the fixed
//! lanes of `math`, in f32; across planes in f64), so results never depend on the number of
//! threads or the instruction set.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::math::{dot, lane_sum, lane_sum2, sum};
use super::par::SendPtr;
use super::simd::simd;
use super::storage::{f32_slice, with_f32};

/// (B, C, plane) of an NCHW shape.
fn dims(shape: &[usize]) -> Result<(usize, usize, usize)> {
    match *shape {
        [b, c, h, w] => Ok((b, c, h * w)),
        _ => bail!("batch norm: expected (B, C, H, W), got {shape:?}"),
    }
}

/// The values of channel `c` of `x`, plane by plane (B planes of `plane`).
fn planes(
    x: &[f32],
    c: usize,
    (b, ch, plane): (usize, usize, usize),
) -> impl Iterator<Item = &[f32]> {
    (0..b).map(move |i| &x[(i * ch + c) * plane..][..plane])
}

/// Runs `f(c, out_planes)` for every channel in parallel, where `out_planes` are channel c's
/// B planes of a new (B, C, plane) buffer; returns the buffer and what each call returned.
/// `f` runs through [`simd!`], compiled for the widest vectors the CPU has (mark the closure
/// `#[inline(always)]`). Each task zeroes its own planes just before `f` gets them, in
/// parallel and while they are in cache, instead of the whole buffer being zeroed on the
/// calling thread while the pool waits.
fn per_channel<R: Send>(
    (b, ch, plane): (usize, usize, usize),
    f: impl Fn(usize, &mut [&mut [f32]]) -> R + Sync,
) -> (Vec<f32>, Vec<R>) {
    let len = b * ch * plane;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let ptr = SendPtr(out.as_mut_ptr());
    let results = (0..ch)
        .into_par_iter()
        .map(|c| {
            let mut planes: Vec<&mut [f32]> = (0..b)
                .map(|i| {
                    // SAFETY: plane (i, c) lies inside `out`'s allocation of `len` floats
                    // (i < b, c < ch) and is disjoint from every other plane; channel c's task
                    // is the only one that touches channel c's planes, and `out` outlives the
                    // tasks (the slices live only in this closure). The plane is zeroed before
                    // the slice is formed, so the slice holds initialised f32s.
                    unsafe {
                        let p = ptr.get().add((i * ch + c) * plane);
                        std::ptr::write_bytes(p, 0, plane);
                        std::slice::from_raw_parts_mut(p, plane)
                    }
                })
                .collect();
            simd!(f(c, &mut planes))
        })
        .collect();
    // SAFETY: the channels' planes cover all `len` floats (every (i, c) for i < b, c < ch),
    // each zeroed by its task above, which have all finished; len ≤ capacity.
    unsafe { out.set_len(len) };
    (out, results)
}

/// Training-mode batch normalisation of x (B, C, H, W) with weight and bias (C,): returns y
/// and the batch mean and biased variance of each channel.
pub(crate) fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Vec<f32>, Vec<f32>)> {
    let (_, c, _) = dims(x.dims())?;
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
        let n = (d.0 * d.2) as f64;
        let eps = self.eps;
        let (y, stats) = per_channel(
            d,
            #[inline(always)]
            |c, out| {
                // Per plane in f32 lanes, across planes in f64.
                let total: f64 = planes(x, c, d).map(|p| sum(p) as f64).sum();
                let mean = total / n.max(1.0);
                let m = mean as f32;
                let sq: f64 = planes(x, c, d)
                    .map(|p| lane_sum(p, |v| (v - m) * (v - m)) as f64)
                    .sum();
                let var = sq / n.max(1.0);
                let inv = 1.0 / (var + eps).sqrt();
                let scale = (w[c] as f64 * inv) as f32;
                let shift = (b[c] as f64 - mean * w[c] as f64 * inv) as f32;
                for (i, p) in planes(x, c, d).enumerate() {
                    for (o, &v) in out[i].iter_mut().zip(p) {
                        *o = v * scale + shift;
                    }
                }
                (mean as f32, var as f32, inv as f32)
            },
        );
        *self.stats.lock().expect("batch-norm statistics") = Some((
            stats.iter().map(|s| s.0).collect(),
            stats.iter().map(|s| s.1).collect(),
            stats.iter().map(|s| s.2).collect(),
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
        let n = (d.0 * d.2) as f64;
        let (dx, sums) = with_f32([x, w, g], |[x, w, g]| {
            per_channel(
                d,
                #[inline(always)]
                |c, out| {
                    let (mu, iv) = (mean[c], inv[c]);
                    let (mut sg, mut sgx) = (0f64, 0f64);
                    for (px, pg) in planes(x, c, d).zip(planes(g, c, d)) {
                        sg += sum(pg) as f64;
                        sgx += lane_sum2(px, pg, |v, gv| gv * (v - mu)) as f64;
                    }
                    let sgx = sgx * iv as f64; // Σ g·x̂
                    let (mg, mgx) = ((sg / n) as f32, (sgx / n) as f32);
                    let k = w[c] * iv;
                    for (i, (px, pg)) in planes(x, c, d).zip(planes(g, c, d)).enumerate() {
                        for ((o, &v), &gv) in out[i].iter_mut().zip(px).zip(pg) {
                            *o = k * (gv - mg - (v - mu) * iv * mgx);
                        }
                    }
                    (sgx as f32, sg as f32)
                },
            )
        })?;
        let dev = x.device();
        let dw: Vec<f32> = sums.iter().map(|s| s.0).collect();
        let db: Vec<f32> = sums.iter().map(|s| s.1).collect();
        let c = d.1;
        Ok((
            Some(Tensor::from_vec(dx, x.dims(), dev)?),
            Some(Tensor::from_vec(dw, c, dev)?),
            Some(Tensor::from_vec(db, c, dev)?),
        ))
    }
}

/// y = x·scale_c + shift_c for x (B, C, H, W) and scale, shift (C,): evaluation-mode batch
/// normalisation once the running statistics are folded in.
pub(crate) fn channel_affine(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let (_, c, _) = dims(x.dims())?;
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
        let (y, _) = per_channel(
            d,
            #[inline(always)]
            |c, out| {
                for (i, p) in planes(x, c, d).enumerate() {
                    for (o, &v) in out[i].iter_mut().zip(p) {
                        *o = v * scale[c] + shift[c];
                    }
                }
            },
        );
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
        let (dx, sums) = with_f32([x, scale, g], |[x, scale, g]| {
            per_channel(
                d,
                #[inline(always)]
                |c, out| {
                    let (mut sg, mut sgx) = (0f64, 0f64);
                    for (i, (px, pg)) in planes(x, c, d).zip(planes(g, c, d)).enumerate() {
                        sg += sum(pg) as f64;
                        sgx += dot(pg, px) as f64;
                        for (o, &gv) in out[i].iter_mut().zip(pg) {
                            *o = gv * scale[c];
                        }
                    }
                    (sgx as f32, sg as f32)
                },
            )
        })?;
        let dev = x.device();
        let c = d.1;
        Ok((
            Some(Tensor::from_vec(dx, x.dims(), dev)?),
            Some(Tensor::from_vec(
                sums.iter().map(|s| s.0).collect::<Vec<_>>(),
                c,
                dev,
            )?),
            Some(Tensor::from_vec(
                sums.iter().map(|s| s.1).collect::<Vec<_>>(),
                c,
                dev,
            )?),
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
        let c = w.dim(0).unwrap();
        let mean = x.mean_keepdim((0, 2, 3)).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim((0, 2, 3)).unwrap();
        let xn = xc
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap();
        xn.broadcast_mul(&w.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
    }

    fn affine(t: &[Tensor]) -> Tensor {
        super::channel_affine(&t[0], &t[1], &t[2]).unwrap()
    }

    fn affine_composed(t: &[Tensor]) -> Tensor {
        let c = t[1].dim(0).unwrap();
        t[0].broadcast_mul(&t[1].reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&t[2].reshape((1, c, 1, 1)).unwrap())
            .unwrap()
    }

    const SHAPES: &[[usize; 4]] = &[[2, 1, 1, 1], [3, 2, 5, 4], [8, 5, 7, 7], [64, 3, 4, 4]];

    #[test]
    fn matches_composed_values_and_gradients_and_the_statistics() {
        for (i, &[b, c, h, w]) in SHAPES.iter().enumerate() {
            let s = i as u64 * 5;
            let x = (rand(&[b, c, h, w], 2.0, s) + 0.5).unwrap();
            let inp = vec![x.clone(), rand(&[c], 1.0, s + 1), rand(&[c], 1.0, s + 2)];
            let cot = cotangent(&[b, c, h, w], s);
            for (f, g) in [
                (
                    fused as fn(&[Tensor]) -> Tensor,
                    composed as fn(&[Tensor]) -> Tensor,
                ),
                (affine, affine_composed),
            ] {
                let (yf, gf) = value_and_grads(f, &inp, &cot);
                let (yc, gc) = value_and_grads(g, &inp, &cot);
                assert!(max_rel_diff(&yf, &yc) < 1e-4, "{b}x{c}x{h}x{w} forward");
                for j in 0..3 {
                    let tol = 1e-4 * (1.0 + (b * h * w) as f64).sqrt();
                    assert!(
                        max_rel_diff(&gf[j], &gc[j]) < tol,
                        "{b}x{c}x{h}x{w} grad {j}"
                    );
                }
            }
            let (_, mean, var) = super::batch_norm_train(&inp[0], &inp[1], &inp[2], 1e-5).unwrap();
            let m = x.mean_keepdim((0, 2, 3)).unwrap().flatten_all().unwrap();
            let v = x
                .broadcast_sub(&x.mean_keepdim((0, 2, 3)).unwrap())
                .unwrap()
                .sqr()
                .unwrap();
            let v = v.mean_keepdim((0, 2, 3)).unwrap().flatten_all().unwrap();
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
            rand(&[3, 2, 2, 3], 1.0, 1),
            rand(&[2], 1.0, 2),
            rand(&[2], 1.0, 3),
        ];
        let cot = cotangent(&[3, 2, 2, 3], 4);
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
}
