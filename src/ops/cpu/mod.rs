//! Fused CPU kernels behind [`crate::ops`]: candle custom ops over contiguous f32 data, each
//! with its backward written by hand next to its forward. `ops` picks them for CPU f32
//! tensors; every other device or dtype keeps the composed candle version.
//!
//! Row-wise kernels split their rows into fixed blocks of about [`BLOCK_ELEMS`] elements and
//! run the blocks on rayon's global pool, the pool candle's matmul (gemm) already uses, so
//! the two never compete for cores. Block boundaries depend only on the shape, never on the
//! thread count, and reductions over rows (LayerNorm's dweight/dbias) add the per-block
//! partial sums in block order: results are bit-for-bit reproducible.

mod add;
mod attention;
mod cross_entropy;
mod gelu;
mod gemm;
mod layer_norm;
mod linear;
mod matrix;
#[cfg(target_arch = "x86_64")]
mod sgemm;
mod softmax;

pub(crate) use add::add;
pub(crate) use attention::attention;
pub(crate) use cross_entropy::cross_entropy;
pub(crate) use gelu::gelu;
pub(crate) use gemm::provider as matmul_provider;
pub(crate) use layer_norm::layer_norm;
pub(crate) use linear::{linear, Activation, PackedWeight};
pub(crate) use softmax::softmax_last_dim;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// A raw pointer to an output buffer that may cross threads: each parallel task writes only
/// its own disjoint part of the buffer.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks sharing a SendPtr write disjoint elements while the buffer outlives them.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Elements per parallel task: enough work to amortise rayon's scheduling (~µs).
const BLOCK_ELEMS: usize = 1 << 14;

/// Whether `t` may take a fused path (CPU, f32). Contiguity is arranged by the caller.
pub(crate) fn eligible(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The f32 elements of `storage` under `layout`, which must be contiguous.
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = storage else {
        bail!("fused op: expected f32, got {:?}", storage.dtype())
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => bail!("fused op: input is not contiguous"),
    }
}

/// Runs `f` on the f32 data of CPU tensors, made contiguous first (a no-op when they
/// are). The backward passes use it: they get tensors rather than storages, and gradients
/// may arrive as broadcast views.
fn with_f32<R, const N: usize>(ts: [&Tensor; N], f: impl FnOnce([&[f32]; N]) -> R) -> Result<R> {
    let ts = ts.map(|t| t.contiguous());
    let mut owned = Vec::with_capacity(N);
    for t in ts {
        owned.push(t?);
    }
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(cpu) => slices.push(f32_slice(cpu, layout)?),
            _ => bail!("fused op: expected a CPU tensor"),
        }
    }
    let slices: [&[f32]; N] = slices.try_into().expect("one slice per tensor");
    Ok(f(slices))
}

/// Lanes of the row reductions below: sixteen independent partial sums, which the compiler
/// keeps in vector registers (a single running f32 sum is a serial chain it may not
/// reorder). The order of additions is fixed, so results stay deterministic and the same on
/// every instruction set. The loops run over `as_chunks` arrays: no bounds checks, which
/// would stop the compiler vectorising them.
const LANES: usize = 16;

/// Σ f(a_i, b_i) over the shorter length, with [`LANES`] interleaved partial sums.
#[inline(always)]
fn lane_sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (ac, at) = a[..n].as_chunks::<LANES>();
    let (bc, bt) = b[..n].as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for (ca, cb) in ac.iter().zip(bc) {
        for l in 0..LANES {
            acc[l] += f(ca[l], cb[l]);
        }
    }
    let mut tail = 0f32;
    for (&x, &y) in at.iter().zip(bt) {
        tail += f(x, y);
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ f(x_i), with [`LANES`] interleaved partial sums.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    lane_sum2(x, x, |v, _| f(v))
}

/// max x (−∞ for an empty slice), with [`LANES`] interleaved partial maxima so it
/// vectorises (a single running `f32::max` does not).
#[inline(always)]
pub(super) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let (blocks, tail) = x.as_chunks::<LANES>();
    for b in blocks {
        for l in 0..LANES {
            acc[l] = acc[l].max(b[l]);
        }
    }
    let tail = tail.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    acc.iter().copied().fold(tail, f32::max)
}

/// Σ x.
#[inline(always)]
pub(super) fn sum(x: &[f32]) -> f32 {
    lane_sum(x, |v| v)
}

/// Σ a ⊙ b (over the shorter length).
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    lane_sum2(a, b, |a, b| a * b)
}

/// e^x in f32, branch-free so loops over it vectorise (the C library's `expf` is an opaque
/// call). Cephes' method: x = n·ln2 + r with |r| ≤ ln2/2 (ln2 split in two for exactness),
/// e^r from a degree-7 polynomial, 2^n built in the exponent bits; n is rounded with the
/// 1.5·2²³ trick (plain SSE2 has no vector round). Within 2 ulp of `f32::exp` (tested);
/// 0 below −87.33, +∞ above 88 (the last 0.7 before f32 overflow are given up: our kernels
/// only take e^x of x ≤ 0), NaN for NaN.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const MIN: f32 = -87.336_55;
    const MAX: f32 = 88.0;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(MIN, MAX);
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n_bits = t.to_bits() as i32 - ROUND.to_bits() as i32; // n = round(x·log2 e)
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // 5.000_000_1e-1 in the source; the same f32
    let er = p * r * r + r + 1.0;
    let y = er * f32::from_bits(((n_bits + 127) as u32) << 23);
    if x < MIN {
        0.0
    } else if x > MAX {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// Runs `f` compiled for the widest vector registers this CPU has (AVX-512, else AVX2,
/// else the portable SSE2 build), chosen at run time. The kernels' loops are plain scalar
/// Rust that the compiler vectorises; inlined into [`avx512`] or [`avx2`] they get 16 or 8
/// lanes instead of SSE2's 4, with no build flag needed. Every version does the same
/// operations in the same order (Rust never fuses a multiply and an add on its own, and
/// row sums have fixed lanes), so results are identical bit for bit on every CPU (tested).
#[inline(always)]
pub(super) fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    match simd_level() {
        // SAFETY: the CPU has every feature these functions enable (checked at run time).
        SimdLevel::Avx512 => return unsafe { avx512(f) },
        SimdLevel::Avx2 => return unsafe { avx2(f) },
        SimdLevel::Baseline => {}
    }
    f()
}

/// `simd!(expr)`: evaluates `expr` (typically a call to an `#[inline(always)]` kernel)
/// through [`dispatch`], so its loops are compiled for each instruction set.
macro_rules! simd {
    ($e:expr) => {
        $crate::ops::cpu::dispatch(
            #[inline(always)]
            || $e,
        )
    };
}
pub(super) use simd;

/// The vector instruction sets [`dispatch`] can compile for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SimdLevel {
    Avx512,
    Avx2,
    Baseline,
}

/// The level [`dispatch`] uses on this CPU (`VIT_SIMD=baseline|avx2` lowers it, for comparison).
pub(crate) fn simd_level() -> SimdLevel {
    static LEVEL: std::sync::OnceLock<SimdLevel> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = std::env::var("VIT_SIMD").ok();
        let allow = |name: &str| match cap.as_deref() {
            Some("baseline") => false,
            Some("avx2") => name == "avx2",
            _ => true,
        };
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("bmi1") && has!("bmi2");
            let avx512 = avx2 && has!("avx512f") && has!("avx512vl") && has!("avx512bw");
            if avx512 && has!("avx512dq") && allow("avx512") {
                return SimdLevel::Avx512;
            }
            if avx2 && allow("avx2") {
                return SimdLevel::Avx2;
            }
        }
        let _ = allow;
        SimdLevel::Baseline
    })
}

/// `f` compiled with AVX-512 (what [`dispatch`] inlines the kernels' loops into).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi1,bmi2")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `f` compiled with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi1,bmi2")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Rows per block for rows of `width` elements.
fn rows_per_block(width: usize) -> usize {
    (BLOCK_ELEMS / width.max(1)).max(1)
}

/// A new buffer of `len` f32, filled by `f(block_index, block)` for consecutive blocks of
/// `chunk` elements, in parallel when there is more than one. Each task zeroes its own block
/// just before `f` writes it, while the block is in cache: allocating with `vec![0; len]`
/// instead zeroes the whole buffer on the calling thread while the pool waits (5% of ViT-B/16
/// inference time when it did).
fn new_blocks<F>(len: usize, chunk: usize, f: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    // SAFETY: every block is zeroed before anything else touches it.
    unsafe {
        new_blocks_uninit(len, chunk, |i, ptr, n| {
            std::ptr::write_bytes(ptr, 0, n);
            f(i, std::slice::from_raw_parts_mut(ptr, n))
        })
    }
}

/// As [`new_blocks`] without the zeroing: `f(block_index, ptr, n)` gets the block's `n`
/// floats uninitialised, for a writer that fills all of them without reading them first
/// (our matrix multiply without `accumulate`).
///
/// # Safety
/// `f` must write every float of its block and read none before writing it.
unsafe fn new_blocks_uninit<F>(len: usize, chunk: usize, f: F) -> Vec<f32>
where
    F: Fn(usize, *mut f32, usize) + Sync + Send,
{
    let chunk = chunk.max(1);
    let bounds: Vec<usize> = (0..len).step_by(chunk).chain([len]).collect();
    // SAFETY: the caller's contract, passed on.
    unsafe { new_ranges_uninit(&bounds, f) }
}

/// As [`new_blocks_uninit`] over blocks of any sizes: block i is `bounds[i]..bounds[i + 1]`
/// of a new buffer of `bounds.last()` floats (`bounds` starts at 0 and never decreases).
///
/// # Safety
/// As [`new_blocks_uninit`].
unsafe fn new_ranges_uninit<F>(bounds: &[usize], f: F) -> Vec<f32>
where
    F: Fn(usize, *mut f32, usize) + Sync + Send,
{
    use std::mem::MaybeUninit;
    let len = bounds.last().copied().unwrap_or(0);
    debug_assert!(bounds.first().is_none_or(|&b| b == 0));
    let mut buf: Vec<MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit elements need no initialisation.
    unsafe { buf.set_len(len) };
    let mut blocks = Vec::with_capacity(bounds.len());
    let mut rest = &mut buf[..];
    for w in bounds.windows(2) {
        let (block, tail) = rest.split_at_mut(w[1] - w[0]);
        blocks.push(block);
        rest = tail;
    }
    let run = |i: usize, block: &mut [MaybeUninit<f32>]| {
        f(i, block.as_mut_ptr().cast::<f32>(), block.len())
    };
    if blocks.len() <= 1 {
        blocks.into_iter().for_each(|b| run(0, b));
    } else {
        blocks
            .into_par_iter()
            .enumerate()
            .for_each(|(i, block)| run(i, block));
    }
    let mut buf = std::mem::ManuallyDrop::new(buf);
    // SAFETY: `f` initialised every element (the caller's contract); the pointer, length
    // and capacity come from a Vec of a type with f32's size and alignment.
    unsafe { Vec::from_raw_parts(buf.as_mut_ptr().cast::<f32>(), buf.len(), buf.capacity()) }
}

/// A new buffer of `len` elements, rows of `width`: calls `f(first_row, block)` for
/// consecutive blocks of whole rows, in parallel when there is more than one block (see
/// [`new_blocks`]), through [`simd!`] (so pass `f` as an `#[inline(always)]` closure for its
/// loops to be compiled for each instruction set).
fn new_row_blocks<F>(len: usize, width: usize, f: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if width == 0 {
        return vec![0.0; len];
    }
    let rows = rows_per_block(width);
    new_blocks(len, rows * width, |i, block| simd!(f(i * rows, block)))
}

/// As [`new_row_blocks`] over an existing buffer, collecting one value per block, in block
/// order.
fn map_row_blocks<F, R>(out: &mut [f32], width: usize, f: F) -> Vec<R>
where
    F: Fn(usize, &mut [f32]) -> R + Sync + Send,
    R: Send,
{
    let rows = rows_per_block(width);
    let chunk = rows * width.max(1);
    if out.len() <= chunk {
        vec![simd!(f(0, out))]
    } else {
        out.par_chunks_mut(chunk)
            .enumerate()
            .map(|(i, block)| simd!(f(i * rows, block)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_within_2_ulp_of_std() {
        let mut worst = 0f32;
        let mut x = -87.3f32;
        while x < 88.0 {
            let (a, b) = (super::exp(x), x.exp());
            worst = worst.max((a - b).abs() / b);
            x += 0.000_37;
        }
        assert!(worst < 2.4e-7, "{worst}");
        assert_eq!(super::exp(0.0), 1.0);
        assert_eq!(super::exp(-1000.0), 0.0);
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(1000.0), f32::INFINITY);
        assert!(super::exp(f32::NAN).is_nan());
    }

    #[test]
    fn lane_sums_match_plain_sums() {
        for n in [0usize, 1, 7, 8, 9, 64, 65, 1000] {
            let x: Vec<f32> = (0..n).map(|i| (i % 13) as f32 - 6.0).collect();
            let y: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 0.5).collect();
            assert_eq!(super::sum(&x), x.iter().sum::<f32>());
            let d: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
            assert_eq!(super::dot(&x, &y), d);
        }
    }

    #[test]
    fn lane_max_matches_a_plain_fold() {
        for n in [0usize, 1, 7, 8, 9, 64, 65, 1000] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 - 500.0).collect();
            let want = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(super::max(&x), want, "{n}");
        }
        assert_eq!(super::max(&[f32::NAN, 1.0]), 1.0); // as f32::max: NaN is ignored
    }

    /// The kernels' building blocks, as the kernels use them, over values covering their
    /// ranges; the bit patterns of the results.
    #[inline(always)]
    fn building_blocks(xs: &[f32]) -> Vec<u32> {
        let mut out = Vec::new();
        for chunk in xs.chunks(37) {
            out.push(super::sum(chunk).to_bits());
            out.push(super::dot(chunk, xs).to_bits());
            out.push(super::max(chunk).to_bits());
        }
        for &x in xs {
            out.push(super::exp(x).to_bits());
            out.push(super::gelu::cdf(x).to_bits());
            out.push(super::gelu::derivative(x).to_bits());
        }
        out
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let xs: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.0) * 0.0131).collect();
        let portable = building_blocks(&xs);
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("bmi1") && has!("bmi2") {
                // SAFETY: the features were just detected.
                let v = unsafe {
                    super::avx2(
                        #[inline(always)]
                        || building_blocks(&xs),
                    )
                };
                assert!(v == portable, "AVX2 results differ");
            }
            if super::simd_level() == super::SimdLevel::Avx512 {
                // SAFETY: simd_level checked the features.
                let v = unsafe {
                    super::avx512(
                        #[inline(always)]
                        || building_blocks(&xs),
                    )
                };
                assert!(v == portable, "AVX-512 results differ");
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Shared helpers for the kernels' tests: random tensors and comparisons.
    use candle_core::{DType, Device, Tensor, Var};
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A seeded tensor of uniform values in [-scale, scale).
    pub fn rand(shape: &[usize], scale: f32, seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// All elements of `t`, flattened.
    pub fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Max |a − b| / (1 + |b|) over all elements (both flattened to f64).
    pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let (a, b) = (a.to_vec1::<f64>().unwrap(), b.to_vec1::<f64>().unwrap());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0.0, f64::max)
    }

    /// The fixed random weighting used as the upstream gradient: loss = Σ y ⊙ c.
    pub fn cotangent(shape: &[usize], seed: u64) -> Tensor {
        rand(shape, 1.0, seed ^ 0x5eed)
    }

    /// The value of f(inputs) and the gradients of Σ f(inputs) ⊙ c with respect to every
    /// input, through candle's autograd (`backward()`).
    pub fn value_and_grads(
        f: impl Fn(&[Tensor]) -> Tensor,
        inputs: &[Tensor],
        c: &Tensor,
    ) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        let loss = (&y * c.to_dtype(y.dtype()).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let g = ts.iter().map(|t| grads.get(t).unwrap().clone()).collect();
        (y, g)
    }

    /// Central differences of Σ f(inputs) ⊙ c in f64 (inputs promoted to f64, step 1e-6):
    /// an oracle independent of any backward pass. Tiny shapes only (2 calls per element).
    pub fn finite_diff(
        f: impl Fn(&[Tensor]) -> Tensor,
        inputs: &[Tensor],
        c: &Tensor,
    ) -> Vec<Tensor> {
        let h = 1e-6;
        let c = c.to_dtype(DType::F64).unwrap();
        let base: Vec<Vec<f64>> = inputs
            .iter()
            .map(|t| {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        let loss = |vals: &[Vec<f64>]| -> f64 {
            let ts: Vec<Tensor> = vals
                .iter()
                .zip(inputs)
                .map(|(v, t)| Tensor::from_slice(v, t.dims(), &Device::Cpu).unwrap())
                .collect();
            (f(&ts) * &c)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        (0..inputs.len())
            .map(|i| {
                let grad: Vec<f64> = (0..base[i].len())
                    .map(|k| {
                        let mut v = base.clone();
                        v[i][k] = base[i][k] + h;
                        let up = loss(&v);
                        v[i][k] = base[i][k] - h;
                        (up - loss(&v)) / (2.0 * h)
                    })
                    .collect();
                Tensor::from_vec(grad, inputs[i].dims(), &Device::Cpu).unwrap()
            })
            .collect()
    }

    /// Shapes with odd row counts and widths, including 1.
    pub const SHAPES: &[&[usize]] = &[
        &[1, 1],
        &[1, 3],
        &[7, 64],
        &[33, 65],
        &[2, 3, 5],
        &[300, 64],  // several rayon blocks at width 64
        &[1, 20000], // one row wider than a block
    ];
}
