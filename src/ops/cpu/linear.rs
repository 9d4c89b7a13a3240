//! Fused linear layer: y = act(x Wᵀ + b) for x (rows, in), W (out, in), b (out), with `act`
//! the identity or exact GELU, applied to each block of rows while it is still in cache.
//!
//! Forward, per block of rows: fill with b, add x Wᵀ (gemm), apply GELU (keeping the
//! pre-activation z for backward); on our own kernel the bias and GELU are its epilogue,
//! applied to each tile as it is written. Backward, for G = ∂L/∂y and Gz = G ⊙ act'(z):
//!   dx = Gz W,   dW = Gzᵀ x,   db = Σ_rows Gz.
//! dW and db sum over rows: each fixed chunk of rows makes a partial sum, and the partials
//! are added in chunk order, so results never depend on the number of threads.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, TensorId};
use rayon::prelude::*;

use super::gelu;
use super::gemm::{
    bf16_inference, own_kernel_for, sgemm, sgemm_packed, Epilogue, Level, PackedB, MR,
};
use super::matrix::MatRef;
use super::par::{new_blocks, new_ranges_uninit, sum_in_order, tile_tasks, SendPtr};
use super::simd::simd;
use super::storage::{f32_slice, with_f32};

/// Rows per forward task: enough for an efficient gemm, small enough to stay in cache. Also
/// where the weight is packed once for all tasks (our own kernel): 396 and 792 measured the
/// same as 128 on ViT-B/16 inference (1576 rows) within noise, and 128 still splits small
/// batches (197 rows) over two cores.
const FWD_ROWS: usize = 128;
/// The first row of each forward task, then `rows`. On our own kernel (`own`): tasks of whole
/// micro-tiles (MR rows), as equal as the tiles allow, about [`FWD_ROWS`] rows each, and as
/// many as a multiple of the pool's `threads` so that the workers finish together. ViT-B/16's
/// 1,576 rows as 12 × 128 + 40 left one worker alone with the 40 and wasted a third of a tile
/// per block; as 12 × 132 they ran 6% faster (infer-b16 9.4 → 10.0 images/s, alternated).
/// Rows are independent, so the split never changes results. Elsewhere: blocks of
/// [`FWD_ROWS`].
fn fwd_bounds(rows: usize, own: bool, threads: usize) -> Vec<usize> {
    if !own {
        return (0..rows).step_by(FWD_ROWS).chain([rows]).collect();
    }
    tile_tasks(rows, MR, FWD_ROWS, threads)
}

/// Which of our own kernels the forward of `rows` rows runs on, with Wᵀ packed once for all
/// its row blocks, if any: a function of the CPU, the shape and the environment.
fn packs_weight(rows: usize, n: usize, k: usize) -> Option<Level> {
    (n > 0 && k > 0)
        .then(|| own_kernel_for(rows.min(FWD_ROWS), n, k))
        .flatten()
}

/// Wᵀ (in, out) of W (out = n, in = k) packed for our own kernel of `level`.
///
/// # Safety
/// `level` must come from [`packs_weight`] for the shape (it checks the instruction set);
/// `w` holds n rows of k.
unsafe fn pack_weight(level: Level, w: &[f32], n: usize, k: usize) -> PackedB {
    // SAFETY: the caller's contract; Wᵀ is W read with swapped strides.
    unsafe { PackedB::new(level, k, n, MatRef::new(w.as_ptr(), 1, k as isize)) }
}

/// At most this many row chunks in backward (each holds a partial dW of out × in).
const MAX_BWD_CHUNKS: usize = 8;
/// At least this many rows per backward chunk.
const MIN_BWD_ROWS: usize = 256;

/// The activation applied after the affine map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Activation {
    Identity,
    Gelu,
}

/// A weight packed for our own kernel, kept between calls (see [`linear`]): the tensor it
/// was packed from and its packing.
pub(crate) type PackedWeight = Mutex<Option<(TensorId, Arc<PackedB>)>>;

/// `act(x · weightᵀ + bias)` for CPU f32 tensors x (rows, in), weight (out, in), bias (out).
///
/// With `cache`, a weight that tracks no gradient (inference: it cannot change between
/// calls) is packed for our own kernel once and kept there for the next calls with the same
/// tensor; without it, or for a trained weight, each call packs it anew.
pub(crate) fn linear(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    act: Activation,
    cache: Option<&PackedWeight>,
) -> Result<Tensor> {
    let (_, k) = x.dims2()?;
    let (n, kw) = w.dims2()?;
    if k != kw || b.dims1()? != n {
        bail!(
            "linear: input {:?}, weight {:?} and bias {:?} do not fit",
            x.dims(),
            w.dims(),
            b.dims()
        )
    }
    let w = w.contiguous()?;
    let rows = x.elem_count() / k.max(1);
    // An inference weight runs on the bf16 kernel whatever its shape when `--dtype bf16`
    // asked for it, else on our own f32 kernel where that takes the shape.
    let level = if bf16_inference() {
        (n > 0 && k > 0).then_some(Level::Bf16)
    } else {
        packs_weight(rows, n, k)
    };
    let packed = match (cache, level) {
        (Some(cache), Some(level)) if !w.track_op() => {
            let mut slot = cache.lock().expect("packed weight lock");
            match &*slot {
                Some((id, p)) if *id == w.id() && p.level() == level => Some(p.clone()),
                _ => {
                    // SAFETY: the level comes from packs_weight, or is bf16, which
                    // set_bf16_inference allows only where the CPU has it; W holds n rows of k.
                    let p = Arc::new(with_f32([&w], |[w]| unsafe {
                        pack_weight(level, w, n, k)
                    })?);
                    *slot = Some((w.id(), p.clone()));
                    Some(p)
                }
            }
        }
        _ => None,
    };
    let op = Linear {
        act,
        // Only a pass that backward will see needs the pre-activation (inference skips it).
        keep_pre: act == Activation::Gelu && (x.track_op() || w.track_op() || b.track_op()),
        pre: Mutex::new(None),
        packed,
    };
    x.contiguous()?.apply_op3(&w, &b.contiguous()?, op)
}

struct Linear {
    act: Activation,
    /// Whether forward keeps the pre-activation (GELU with gradients tracked).
    keep_pre: bool,
    /// The pre-activation z (rows, out), kept for the GELU backward.
    pre: Mutex<Option<Vec<f32>>>,
    /// Wᵀ already packed for our own kernel (a cached inference weight).
    packed: Option<Arc<PackedB>>,
}

/// Row ranges of the backward chunks for `rows` rows: a function of the shape only.
fn bwd_chunks(rows: usize) -> Vec<(usize, usize)> {
    let n = rows.div_ceil(MIN_BWD_ROWS).clamp(1, MAX_BWD_CHUNKS);
    let per = rows.div_ceil(n).max(1);
    (0..rows)
        .step_by(per)
        .map(|r0| (r0, (r0 + per).min(rows)))
        .collect()
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        match self.act {
            Activation::Identity => "vit-linear",
            Activation::Gelu => "vit-linear-gelu",
        }
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
        let (rows, k) = xl.shape().dims2()?;
        let n = b.len();
        // The pre-activation buffer, zeroed by the pool (each forward block then fills its rows).
        let mut pre = if self.keep_pre {
            new_blocks(rows * n, FWD_ROWS * n.max(1), |_, _| {})
        } else {
            Vec::new()
        };
        let pre_ptr = SendPtr(pre.as_mut_ptr());
        let (act, keep_pre) = (self.act, self.keep_pre);
        // Where our own kernel runs the blocks' products, Wᵀ is packed once here for all of
        // them instead of once per block (unless the caller's cache already holds it).
        let fresh = packs_weight(rows, n, k)
            .filter(|_| self.packed.is_none())
            // SAFETY: the level comes from packs_weight; W holds n rows of k, unmodified here.
            .map(|level| unsafe { pack_weight(level, w, n, k) });
        let packed = fresh.as_ref().or(self.packed.as_deref());
        let bounds = fwd_bounds(rows, packed.is_some(), rayon::current_num_threads());
        let y = if n > 0 {
            let elems: Vec<usize> = bounds.iter().map(|r| r * n).collect();
            let fill = |i: usize, yb: *mut f32, len: usize| {
                let r0 = bounds[i];
                let xb = &x[r0 * k..];
                // SAFETY: block i owns rows r0.. of the pre-activation buffer (rows · n
                // floats, zeroed, alive until after the tasks): its `len` floats there are
                // initialised and no other task touches them.
                let zb = keep_pre.then(|| unsafe {
                    std::slice::from_raw_parts_mut(pre_ptr.get().add(r0 * n), len)
                });
                // SAFETY: yb is valid for writes of the block's `len` floats, whole rows of n
                // (new_ranges_uninit's blocks are `bounds` rows times n).
                simd!(unsafe { fwd_block(xb, w, b, packed, act, (yb, len), zb) });
            };
            // SAFETY: fill writes every float of its block (fwd_block does) before reading
            // it, which is new_ranges_uninit's contract.
            unsafe { new_ranges_uninit(&elems, fill) }
        } else {
            Vec::new()
        };
        if self.keep_pre {
            *self.pre.lock().expect("linear pre-activation lock") = Some(pre);
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, k) = x.dims2()?;
        let n = b.dims1()?;
        let pre = match self.act {
            Activation::Gelu => match self.pre.lock().expect("linear pre-activation lock").take() {
                Some(p) => Some(p),
                None => {
                    bail!("linear backward: the pre-activation is missing (backward run twice?)")
                }
            },
            Activation::Identity => None,
        };
        let chunks = bwd_chunks(rows);
        let mut dx = vec![0f32; rows * k];
        let dx_ptr = SendPtr(dx.as_mut_ptr());
        let partials = with_f32([x, w, g], |[x, w, g]| {
            chunks
                .par_iter()
                .map(|&(r0, r1)| {
                    let z = pre.as_deref().map(|z| &z[r0 * n..r1 * n]);
                    // SAFETY: row r0 ≤ rows of dx (rows × k floats): inside it or one past.
                    let dxb = unsafe { dx_ptr.get().add(r0 * k) };
                    let (xb, gb) = (&x[r0 * k..r1 * k], &g[r0 * n..r1 * n]);
                    // SAFETY: chunk (r0, r1) owns rows r0..r1 of dx: dxb is valid for their
                    // (r1 − r0) · k floats, which no other chunk reads or writes.
                    simd!(unsafe { bwd_chunk(xb, w, gb, z, (n, k), dxb) })
                })
                .collect::<Vec<_>>()
        })?;
        let (pw, pb): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
        let (dw, db) = (sum_in_order(pw, n * k), sum_in_order(pb, n));
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (rows, k), dev)?),
            Some(Tensor::from_vec(dw, (n, k), dev)?),
            Some(Tensor::from_vec(db, n, dev)?),
        ))
    }
}

/// Forward of one block of m rows, x (m, in), W (out, in), b (out): y = act(x Wᵀ + b) into
/// the `len` = m · out floats at `yb`, which start uninitialised, keeping the pre-activation
/// in `zb` when given. `packed` is Wᵀ packed for our own kernel, when the caller packed it:
/// the kernel then adds the bias (and applies GELU, unless the pre-activation is kept) to
/// each tile as it writes it. Otherwise y is filled with the bias and the product added.
///
/// # Safety
/// `yb` must be valid for writes of `len` floats (a whole number of rows of out).
#[inline(always)]
unsafe fn fwd_block(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    packed: Option<&PackedB>,
    act: Activation,
    (yb, len): (*mut f32, usize),
    zb: Option<&mut [f32]>,
) {
    let n = b.len();
    let (m, k) = (len / n, w.len() / n);
    let xm = MatRef::new(x.as_ptr(), k as isize, 1); // (m, in)
    let gelu_pending = match packed {
        Some(p) => {
            let in_kernel = act == Activation::Gelu && zb.is_none();
            let epi = Epilogue::new(Some(b), in_kernel);
            // SAFETY: x has m rows of k, yb m rows of n (written, not read); the packed Wᵀ
            // is (k, n), and exists only where our kernel runs (avx512f).
            unsafe { sgemm_packed(m, yb, n, 1, xm, p, 1.0, false, epi) };
            act == Activation::Gelu && !in_kernel
        }
        None => {
            for i in 0..m {
                // SAFETY: row i of yb, n floats.
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), yb.add(i * n), n) };
            }
            // Wᵀ (in, out).
            let wt = MatRef::new(w.as_ptr(), 1, k as isize);
            // SAFETY: x has m rows of k, yb m rows of n (initialised above), W n rows of k.
            unsafe { sgemm(m, n, k, yb, n, 1, xm, wt, 1.0, true) };
            act == Activation::Gelu
        }
    };
    // SAFETY: every float of yb is written by now.
    let yb = unsafe { std::slice::from_raw_parts_mut(yb, len) };
    if let Some(zb) = zb {
        zb.copy_from_slice(yb);
    }
    if gelu_pending {
        gelu::gelu_in_place(yb);
    }
}

/// Backward of one chunk of m rows, x (m, in), G (m, out), with the pre-activation z (m, out)
/// when the activation is GELU: writes dx = Gz W to the m rows of `dx` and returns this
/// chunk's partial dW = Gzᵀ x and db = Σ_rows Gz.
///
/// # Safety
/// `dx` must be valid for writes of m · in floats (m = `g.len() / n`) that nothing else
/// reads or writes during the call.
#[inline(always)]
unsafe fn bwd_chunk(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    z: Option<&[f32]>,
    (n, k): (usize, usize),
    dx: *mut f32,
) -> (Vec<f32>, Vec<f32>) {
    let m = g.len() / n;
    // Gz: G itself, or G ⊙ GELU'(z).
    let gz: Cow<[f32]> = match z {
        None => Cow::Borrowed(g),
        Some(z) => {
            let mut gz = vec![0f32; g.len()];
            for ((o, &g), &z) in gz.iter_mut().zip(g).zip(z) {
                *o = g * gelu::derivative(z);
            }
            Cow::Owned(gz)
        }
    };
    let mut db = vec![0f32; n];
    for row in gz.chunks_exact(n) {
        db.iter_mut().zip(row).for_each(|(d, g)| *d += g);
    }
    let gm = MatRef::new(gz.as_ptr(), n as isize, 1); // (m, out)
    let xm = MatRef::new(x.as_ptr(), k as isize, 1); // (m, in)
    let wm = MatRef::new(w.as_ptr(), k as isize, 1); // (out, in)
    let mut dw = vec![0f32; n * k];
    // SAFETY: the views match the slices' shapes (G (m, n), x (m, k), W (n, k)); dx has m
    // rows of k (the caller's contract) and dw n rows of k, overlapping no operand.
    unsafe {
        sgemm(m, k, n, dx, k, 1, gm, wm, 1.0, false); // dx = Gz W
        sgemm(n, k, m, dw.as_mut_ptr(), k, 1, gm.t(), xm, 1.0, false); // dW = Gzᵀ x
    }
    (dw, db)
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::Activation;
    use crate::ops::linear_composed;
    use candle_core::Tensor;

    fn fused(act: Activation) -> impl Fn(&[Tensor]) -> Tensor {
        move |t| super::linear(&t[0], &t[1], &t[2], act, None).unwrap()
    }

    fn composed(act: Activation) -> impl Fn(&[Tensor]) -> Tensor {
        move |t| {
            let y = linear_composed(&t[0], &t[1], Some(&t[2])).unwrap();
            match act {
                Activation::Identity => y,
                Activation::Gelu => y.gelu_erf().unwrap(),
            }
        }
    }

    /// (rows, in, out): one row, odd sizes, several forward blocks and backward chunks.
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (3, 5, 7),
        (129, 17, 9),
        (1000, 64, 33),
        (2500, 8, 3),
    ];

    #[test]
    fn matches_composed_values_and_gradients() {
        for act in [Activation::Identity, Activation::Gelu] {
            for (i, &(r, k, n)) in SHAPES.iter().enumerate() {
                let s = i as u64;
                let inp = vec![
                    rand(&[r, k], 2.0, s),
                    rand(&[n, k], 0.5, s + 1),
                    rand(&[n], 0.5, s + 2),
                ];
                let c = cotangent(&[r, n], s);
                let (yf, gf) = value_and_grads(fused(act), &inp, &c);
                let (yc, gc) = value_and_grads(composed(act), &inp, &c);
                let inp64: Vec<Tensor> = inp
                    .iter()
                    .map(|t| t.to_dtype(candle_core::DType::F64).unwrap())
                    .collect();
                let (y64, g64) = value_and_grads(composed(act), &inp64, &c);
                assert!(max_rel_diff(&yf, &yc) < 1e-5, "{act:?} {r}x{k}x{n} forward");
                assert!(
                    max_rel_diff(&yf, &y64) < 1e-5,
                    "{act:?} {r}x{k}x{n} forward f64"
                );
                for j in 0..3 {
                    // dW and db sum over up to 2500 rows: compare relative to their scale.
                    let tol = 1e-4 * (1.0 + r as f64).sqrt();
                    assert!(
                        max_rel_diff(&gf[j], &gc[j]) < tol,
                        "{act:?} {r}x{k}x{n} grad {j}"
                    );
                    assert!(
                        max_rel_diff(&gf[j], &g64[j]) < tol,
                        "{act:?} {r}x{k}x{n} grad {j} f64"
                    );
                }
            }
        }
    }

    #[test]
    fn large_layers_match_composed() {
        // Large enough for our own kernel where the CPU has avx512f (Wᵀ packed once for all
        // row blocks): 200 rows (a full block and a partial one), in 768, out 700 (not a
        // multiple of the kernel's 32 columns).
        assert!(super::own_kernel_for(128, 700, 768).is_some() || !is_avx512f());
        let (r, k, n) = (200, 768, 700);
        for act in [Activation::Identity, Activation::Gelu] {
            let inp = vec![
                rand(&[r, k], 1.0, 21),
                rand(&[n, k], 0.05, 22),
                rand(&[n], 0.5, 23),
            ];
            let c = cotangent(&[r, n], 24);
            let (yf, gf) = value_and_grads(fused(act), &inp, &c);
            let (yc, gc) = value_and_grads(composed(act), &inp, &c);
            let e = max_rel_diff(&yf, &yc);
            assert!(e < 1e-5, "{act:?} forward: {e}");
            for j in 0..3 {
                let e = max_rel_diff(&gf[j], &gc[j]);
                assert!(e < 1e-4, "{act:?} grad {j}: {e}");
            }
        }
    }

    #[test]
    fn cached_weight_is_used_only_for_its_own_untracked_tensor() {
        use candle_core::Var;
        let (r, k, n) = (150, 512, 1024); // 128 · 512 · 1024 = 2^26: our kernel's size
        let x = rand(&[r, k], 1.0, 31);
        let (w1, w2, b) = (
            rand(&[n, k], 0.05, 32),
            rand(&[n, k], 0.05, 33),
            rand(&[n], 0.5, 34),
        );
        let cache = super::PackedWeight::default();
        let cached = |w: &Tensor| super::linear(&x, w, &b, Activation::Gelu, Some(&cache)).unwrap();
        let plain = |w: &Tensor| super::linear(&x, w, &b, Activation::Gelu, None).unwrap();
        let id = |c: &super::PackedWeight| c.lock().unwrap().as_ref().map(|(id, _)| *id);
        // Our own kernel runs this shape where the CPU has AVX-512 or AVX2 + FMA.
        let own = super::packs_weight(r, n, k).is_some();
        assert!(own || !is_avx512f());
        // Same bits as packing on every call, and again from the cache.
        assert_eq!(flat(&cached(&w1)), flat(&plain(&w1)));
        assert_eq!(id(&cache), own.then(|| w1.id()));
        assert_eq!(flat(&cached(&w1)), flat(&plain(&w1)));
        // Another tensor in the same cache: packed anew, never the old weight's results.
        assert_eq!(flat(&cached(&w2)), flat(&plain(&w2)));
        assert_eq!(id(&cache), own.then(|| w2.id()));
        // A trained weight (a Var) changes between calls: never cached, and it still learns.
        let v = Var::from_tensor(&w1).unwrap();
        let y = cached(v.as_tensor());
        assert_eq!(flat(&y), flat(&plain(&w1)));
        assert_eq!(id(&cache), own.then(|| w2.id()));
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(v.as_tensor()).is_some());
    }

    #[test]
    fn gradients_match_central_differences() {
        for act in [Activation::Identity, Activation::Gelu] {
            for (r, k, n) in [(1, 1, 1), (3, 4, 2), (5, 2, 3)] {
                let inp = vec![
                    rand(&[r, k], 1.5, 3),
                    rand(&[n, k], 1.0, 4),
                    rand(&[n], 1.0, 5),
                ];
                let c = cotangent(&[r, n], 6);
                let (_, analytic) = value_and_grads(fused(act), &inp, &c);
                let numeric = finite_diff(composed(act), &inp, &c);
                for j in 0..3 {
                    let e = max_rel_diff(&analytic[j], &numeric[j]);
                    assert!(e < 1e-4, "{act:?} {r}x{k}x{n} input {j}: {e}");
                }
            }
        }
    }

    #[test]
    fn untracked_forward_matches_composed() {
        // Plain tensors (no gradient tracking): the pre-activation is not kept.
        let inp = [
            rand(&[130, 9], 2.0, 7),
            rand(&[5, 9], 0.5, 8),
            rand(&[5], 0.5, 9),
        ];
        for act in [Activation::Identity, Activation::Gelu] {
            assert!(!inp[0].track_op());
            let e = max_rel_diff(&fused(act)(&inp), &composed(act)(&inp));
            assert!(e < 1e-5, "{act:?}: {e}");
        }
    }

    #[test]
    fn forward_tasks_cover_rows_in_whole_tiles_shared_evenly() {
        use super::{fwd_bounds, FWD_ROWS, MR};
        // ViT-B/16's 8 × 197 rows on two threads: twelve tasks of 132 (the last 124).
        let b = fwd_bounds(1576, true, 2);
        assert_eq!(b.len(), 13);
        assert!(b.windows(2).take(11).all(|w| w[1] - w[0] == 132), "{b:?}");
        for threads in [1, 2, 3, 8] {
            for rows in [0, 1, 11, 12, 13, 128, 197, 1576, 4616, 10_000] {
                for own in [false, true] {
                    let b = fwd_bounds(rows, own, threads);
                    assert_eq!((b[0], *b.last().unwrap()), (0, rows), "{rows} {own}");
                    assert!(b.windows(2).all(|w| w[0] <= w[1]), "{b:?}");
                    let tasks = b.len() - 1;
                    if own {
                        let inner = &b[1..tasks];
                        assert!(inner.iter().all(|r| r % MR == 0), "{b:?}");
                        assert!(
                            tasks == 1
                                || tasks.is_multiple_of(threads)
                                || tasks == rows.div_ceil(MR)
                        );
                        let sizes: Vec<usize> = b.windows(2).map(|w| w[1] - w[0]).collect();
                        let big = sizes.iter().max().unwrap();
                        assert!(*big <= FWD_ROWS + MR, "{rows}: {sizes:?}");
                    } else {
                        assert!(b.windows(2).all(|w| w[1] - w[0] <= FWD_ROWS));
                    }
                }
            }
        }
    }

    #[test]
    fn backward_chunks_cover_rows_once() {
        for rows in [0, 1, 255, 256, 257, 2048, 2049, 100_000] {
            let c = super::bwd_chunks(rows);
            assert!(c.len() <= super::MAX_BWD_CHUNKS);
            let mut next = 0;
            for (a, b) in c {
                assert_eq!(a, next);
                assert!(b > a);
                next = b;
            }
            assert_eq!(next, rows);
        }
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let x = rand(&[2, 3], 1.0, 1);
        assert!(super::linear(
            &x,
            &rand(&[4, 5], 1.0, 2),
            &rand(&[4], 1.0, 3),
            Activation::Identity,
            None
        )
        .is_err());
        assert!(super::linear(
            &x,
            &rand(&[4, 3], 1.0, 2),
            &rand(&[5], 1.0, 3),
            Activation::Identity,
            None
        )
        .is_err());
    }
}
