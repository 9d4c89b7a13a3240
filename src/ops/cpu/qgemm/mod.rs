//! int8 matrix products for inference with a quantized checkpoint (`vit quantize`):
//!
//! ```text
//! y[m, n] = act( sa[m] · sw[n] · (Σ_k aq[m, k] · wq[n, k] − zp[m] · Σ_k wq[n, k]) + b[n] )
//! ```
//!
//! with the weight W (n, k) stored as int8 wq ∈ [−127, 127] with one scale sw per output
//! channel (symmetric), and each row of activations x (m, k) quantized when the product
//! runs ([`quantize_row`], as ONNX Runtime's `quantize_dynamic`, but per row): unsigned aq ∈
//! [0, L] with its own scale sa and zero point zp, so that x ≈ sa · (aq − zp). The sums are
//! exact in i32 (|Σ| ≤ 255 · 127 · k < 2³¹ for k < 66,000); dequantization, bias and GELU
//! are the epilogue of each tile.
//!
//! Kernels ([`QLevel`]), chosen at run time by CPU (and `VIT_SIMD`):
//! - AVX-512 VNNI ([`vnni`]): `vpdpbusd` multiplies four u8 × s8 pairs per 32-bit lane and
//!   adds them to the lane in i32, without intermediate rounding or saturation; 12 × 32
//!   tiles in 24 zmm accumulators, as the f32 kernel. L = 255.
//! - AVX2 ([`avx2`]): `vpmaddwd` on operands widened to i16 multiplies pairs and adds each
//!   pair's products into an i32, exactly; 6 × 16 tiles. (`vpmaddubsw` works on the bytes
//!   but adds its pairs into i16 with saturation, which 2 · 255 · 127 > 32,767 reaches: it
//!   needs 7-bit activations, which measured ViT-B/16's logits at cosine 0.9988 to f32
//!   instead of 0.9994, for 1.86× our f32 instead of about 1.6×.)
//! - portable code otherwise.
//!
//! L = 255 everywhere and every sum is exact, so an int8 model gives the same numbers on
//! every CPU.
//!
//! The weight is packed once ([`QPacked`]) into panels of NR output channels: for each
//! group of four consecutive k (two, as i16, for AVX2), NR × 4 bytes (channel j's values
//! together, the order the instructions read a 32-bit lane in), zero past n and k; with it its per-channel
//! sums (for the zero point) and scales. Activations are quantized per block of rows into
//! rows of ⌈k/4⌉·4 bytes (zero past k). Loops: for each panel of B (k·NR bytes, in L2), for
//! each MR-row tile of the block: the whole depth in one pass, then the epilogue.

use super::gelu;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod vnni;

/// The largest quantized activation, L, on every kernel.
pub(crate) const ACT_MAX: u8 = 255;

/// The largest tile of any kernel, in i32 (12 × 32).
const MAX_TILE: usize = 12 * 32;

/// The longest depth of an int8 product: its i32 sums (and the zero-point term) stay below
/// 255 · 127 · 2¹⁵ < 2³⁰ in size.
pub(crate) const MAX_K: usize = 1 << 15;

/// Which int8 kernel runs the products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QLevel {
    /// AVX-512 VNNI, 8-bit activations.
    Vnni,
    /// AVX2, 8-bit activations widened to i16.
    Avx2,
    /// Portable code, 8-bit activations.
    Scalar,
}

impl QLevel {
    /// Rows of a tile.
    pub(crate) fn mr(self) -> usize {
        match self {
            QLevel::Vnni => 12,
            QLevel::Avx2 => 6,
            QLevel::Scalar => 4,
        }
    }

    /// Bytes per value in the kernel's operands: 1, or 2 for the AVX2 kernel, which
    /// multiplies i16 pairs (the u8 activations and i8 weights widened).
    fn width(self) -> usize {
        match self {
            QLevel::Avx2 => 2,
            QLevel::Vnni | QLevel::Scalar => 1,
        }
    }

    /// Output channels of a tile (and of a packed panel).
    fn nr(self) -> usize {
        match self {
            QLevel::Vnni => 32,
            QLevel::Avx2 | QLevel::Scalar => 16,
        }
    }

    /// Name, for reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            QLevel::Vnni => "AVX-512 VNNI",
            QLevel::Avx2 => "AVX2",
            QLevel::Scalar => "portable",
        }
    }
}

/// The int8 kernel of this CPU: VNNI where the AVX-512 level has it, AVX2 where the CPU
/// (or `VIT_SIMD`) stops there, portable code below (looked up once).
pub(crate) fn qlevel() -> QLevel {
    static LEVEL: std::sync::OnceLock<QLevel> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use super::simd::{simd_level, SimdLevel};
            match simd_level() {
                SimdLevel::Avx512 if std::arch::is_x86_feature_detected!("avx512vnni") => {
                    QLevel::Vnni
                }
                SimdLevel::Avx512 | SimdLevel::Avx2 => QLevel::Avx2,
                SimdLevel::Baseline => QLevel::Scalar,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        QLevel::Scalar
    })
}

/// The levels this CPU can run (for tests: each against the exact reference).
#[cfg(test)]
pub(crate) fn available_levels() -> Vec<QLevel> {
    let mut out = vec![QLevel::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") {
            out.push(QLevel::Avx2);
        }
        if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
            out.push(QLevel::Vnni);
        }
    }
    out
}

/// A weight W (n, k) as int8 with per-channel scales, packed for one [`QLevel`].
#[derive(Debug)]
pub(crate) struct QPacked {
    level: QLevel,
    n: usize,
    k: usize,
    /// k rounded up to a multiple of 4.
    k4: usize,
    /// ⌈n/NR⌉ panels of k4 · NR bytes.
    data: Vec<i8>,
    /// Σ_k wq[n, k], per channel.
    colsum: Vec<i32>,
    /// sw, per channel.
    scale: Vec<f32>,
    /// The calibrated range [lo, hi] of the input (static activations), if any.
    input_range: Option<(f32, f32)>,
}

impl QPacked {
    /// Packs `wq` (n rows of k int8 values) with its `scale` (n) for `level`.
    pub(crate) fn new(level: QLevel, wq: &[i8], scale: &[f32], n: usize, k: usize) -> Self {
        assert!(
            wq.len() == n * k && scale.len() == n && k <= MAX_K,
            "int8 weight shape"
        );
        let (nr, width) = (level.nr(), level.width());
        let k4 = k.next_multiple_of(4);
        let panel = k4 * nr * width;
        let mut data = vec![0i8; n.div_ceil(nr) * panel];
        // A group of g = 4 / width consecutive k per channel and lane (4 bytes).
        let g = 4 / width;
        for (c, row) in wq.chunks_exact(k.max(1)).enumerate().take(n) {
            let (p, j) = (c / nr, c % nr);
            let dst = &mut data[p * panel..(p + 1) * panel];
            for (kk, &v) in row.iter().enumerate() {
                let at = ((kk / g) * nr * g + j * g + kk % g) * width;
                dst[at] = v;
                if width == 2 {
                    dst[at + 1] = if v < 0 { -1 } else { 0 }; // the i16's high byte
                }
            }
        }
        let colsum = (0..n)
            .map(|c| wq[c * k..(c + 1) * k].iter().map(|&v| v as i32).sum())
            .collect();
        QPacked {
            level,
            n,
            k,
            k4,
            data,
            colsum,
            scale: scale.to_vec(),
            input_range: None,
        }
    }

    /// Quantizes inputs with the fixed scale and zero point of the calibrated range [lo, hi]
    /// (lo ≤ 0 ≤ hi) instead of each row's own.
    pub(crate) fn with_input_range(mut self, range: Option<(f32, f32)>) -> Self {
        self.input_range = range;
        self
    }

    pub(crate) fn level(&self) -> QLevel {
        self.level
    }
}

/// The scale and zero point that map [lo, hi] (lo ≤ 0 ≤ hi) onto [0, `max`] with zero
/// exact: the range over `max` steps; (0, 0) for an empty range.
#[inline(always)]
pub(crate) fn range_params(lo: f32, hi: f32, max: u8) -> (f32, f32) {
    if hi == lo {
        return (0.0, 0.0);
    }
    let levels = max as f32;
    let scale = (hi - lo) / levels;
    (scale, round(-lo / scale).clamp(0.0, levels))
}

/// Quantizes one row `x` of activations to `out` (at least x.len() bytes; what lies past
/// x.len() is zeroed) in [0, `max`] and returns (scale, zero point) with x ≈ scale · (q −
/// zp). Dynamic (`fixed` None): the row's range [min(x, 0), max(x, 0)] over `max` steps
/// ([`range_params`]); static: the calibrated (scale, zero point) given, values outside
/// clamped. A row of zeros (dynamic) has scale 0. A row holding a NaN or an infinity gets a
/// NaN scale, so its outputs are NaN as the f32 product's would be, not a silently finite
/// number.
#[inline(always)]
pub(crate) fn quantize_row(
    x: &[f32],
    max: u8,
    fixed: Option<(f32, f32)>,
    out: &mut [u8],
) -> (f32, i32) {
    // Minimum, maximum and Σ v·0 (NaN once any v is not finite) over 16 lanes, so that
    // the loop vectorises; a single running minimum does not.
    const L: usize = 16;
    let (chunks, rest) = x.as_chunks::<L>();
    let (mut lo, mut hi, mut nan) = ([0f32; L], [0f32; L], [0f32; L]);
    for c in chunks {
        for l in 0..L {
            lo[l] = if c[l] < lo[l] { c[l] } else { lo[l] };
            hi[l] = if c[l] > hi[l] { c[l] } else { hi[l] };
            nan[l] += c[l] * 0.0;
        }
    }
    for (l, &v) in rest.iter().enumerate() {
        lo[l] = if v < lo[l] { v } else { lo[l] };
        hi[l] = if v > hi[l] { v } else { hi[l] };
        nan[l] += v * 0.0;
    }
    let lo = lo.iter().fold(0f32, |a, &v| a.min(v));
    let hi = hi.iter().fold(0f32, |a, &v| a.max(v));
    let finite = nan.iter().sum::<f32>() == 0.0;
    let (head, tail) = out.split_at_mut(x.len());
    tail.fill(0);
    if !finite {
        head.fill(0);
        return (f32::NAN, 0);
    }
    let (scale, zp) = fixed.unwrap_or_else(|| range_params(lo, hi, max));
    if scale == 0.0 {
        head.fill(0);
        return (0.0, 0);
    }
    let levels = max as f32;
    let inv = 1.0 / scale;
    for (o, &v) in head.iter_mut().zip(x) {
        // round(v / scale) + zp, as zp is a whole number: rounding after the shift is the
        // same. The clamped t lies in [0, 255]: t + 1.5 · 2²³ rounds it to a whole number
        // (see `round`) held in the low bits of the sum, read directly (a saturating
        // float-to-int cast does not vectorise).
        let t = (v * inv + zp).clamp(0.0, levels);
        *o = (t + MAGIC).to_bits() as u8;
    }
    (scale, zp as i32)
}

/// The u8 values of `q` as little-endian u16 into `out` (twice as long): the AVX2 kernel's
/// rows.
#[inline(always)]
pub(crate) fn widen(q: &[u8], out: &mut [u8]) {
    for (o, &v) in out.chunks_exact_mut(2).zip(q) {
        o[0] = v;
        o[1] = 0;
    }
}

/// `t` rounded to the nearest whole number, ties to even, for |t| < 2²²: adding and
/// subtracting 1.5 · 2²³ leaves no fraction bits, and f32 addition rounds to nearest even.
/// Unlike `f32::round_ties_even` (a libm call when not vectorised) it vectorises to two adds.
#[inline(always)]
fn round(t: f32) -> f32 {
    (t + MAGIC) - MAGIC
}

/// 1.5 · 2²³: see [`round`].
const MAGIC: f32 = 12_582_912.0;

thread_local! {
    /// [`qgemm_block`]'s quantized rows, kept for this thread's next call.
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The i32 tile (MR × NR, row-major, NR apart) of rows `a` (`rows` of them, `a_rs` bytes
/// apart; rows past `rows` repeat the last) times one packed panel `b`, over k4 values (of
/// the level's width: u8, or u16 for AVX2).
///
/// # Safety
/// `a` holds `rows` ≥ 1 rows of k4 readable values `a_rs` bytes apart; `b` a whole panel of
/// `level`; the CPU has the level's instructions.
unsafe fn tile(
    level: QLevel,
    k4: usize,
    a: *const u8,
    a_rs: usize,
    rows: usize,
    b: *const i8,
    out: &mut [i32; MAX_TILE],
) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract (avx512f/bw/vnni for this level).
        QLevel::Vnni => unsafe { vnni::tile(k4, a, a_rs, rows, b, out.as_mut_ptr()) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract (avx2 for this level).
        QLevel::Avx2 => unsafe { avx2::tile(k4, a, a_rs, rows, b, out.as_mut_ptr()) },
        _ => {
            let (mr, nr) = (level.mr(), level.nr());
            out.fill(0);
            for i in 0..mr {
                // SAFETY: row min(i, rows − 1) of a, k4 bytes (the caller's contract).
                let ar = unsafe { std::slice::from_raw_parts(a.add(i.min(rows - 1) * a_rs), k4) };
                // SAFETY: a whole panel, k4 · nr bytes.
                let bp = unsafe { std::slice::from_raw_parts(b, k4 * nr) };
                for q in 0..k4 / 4 {
                    for j in 0..nr {
                        let mut s = 0i32;
                        for r in 0..4 {
                            s += ar[4 * q + r] as i32 * bp[q * nr * 4 + j * 4 + r] as i32;
                        }
                        out[i * nr + j] += s;
                    }
                }
            }
        }
    }
}

/// `y = act(dequant(quant(x) · Wᵀ) + b)` for one block of rows: x (m, k) with m = x.len() / k,
/// into y (m, n), with GELU when `gelu`; `bias` has n values.
///
/// # Safety
/// `y` is valid for writes of m · n floats; `p`'s level runs on this CPU ([`qlevel`], or
/// one of [`available_levels`] in tests).
#[inline(always)]
pub(crate) unsafe fn qgemm_block(x: &[f32], p: &QPacked, bias: &[f32], gelu: bool, y: *mut f32) {
    // Static activations: the calibrated range's scale and zero point for this level.
    let fixed = p.input_range.map(|(lo, hi)| range_params(lo, hi, ACT_MAX));
    let (n, k, k4) = (p.n, p.k, p.k4);
    let m = x.len() / k.max(1);
    if m == 0 || n == 0 {
        return;
    }
    let (mr, nr, max) = (p.level.mr(), p.level.nr(), ACT_MAX);
    let (width, rs) = (p.level.width(), k4 * p.level.width());
    // The quantized rows as the kernel reads them (rs bytes each), in this thread's scratch
    // buffer (reused from call to call: it is hundreds of KB, and every byte of each row is
    // written, so it needs no zeroing).
    let mut aq = SCRATCH.take();
    if aq.len() < m * rs {
        aq = vec![0u8; m * rs];
    }
    let mut one = vec![0u8; if width == 1 { 0 } else { k4 }];
    let mut sa = vec![0f32; m];
    let mut zp = vec![0i32; m];
    for i in 0..m {
        let xi = &x[i * k..(i + 1) * k];
        let row = &mut aq[i * rs..(i + 1) * rs];
        (sa[i], zp[i]) = if width == 1 {
            quantize_row(xi, max, fixed, row)
        } else {
            let r = quantize_row(xi, max, fixed, &mut one);
            widen(&one, row);
            r
        };
    }
    let mut acc = [0i32; MAX_TILE];
    for pi in 0..n.div_ceil(nr) {
        let (c0, cols) = (pi * nr, nr.min(n - pi * nr));
        let panel = &p.data[pi * rs * nr..(pi + 1) * rs * nr];
        let (sw, cs, b) = (
            &p.scale[c0..c0 + cols],
            &p.colsum[c0..c0 + cols],
            &bias[c0..c0 + cols],
        );
        for i0 in (0..m).step_by(mr) {
            let rows = mr.min(m - i0);
            // SAFETY: rows i0.. of aq (rs bytes each, `rows` ≥ 1 of them); a whole panel;
            // the level runs here (the caller's contract).
            unsafe {
                tile(
                    p.level,
                    k4,
                    aq.as_ptr().add(i0 * rs),
                    rs,
                    rows,
                    panel.as_ptr(),
                    &mut acc,
                )
            };
            for i in 0..rows {
                let r = i0 + i;
                // SAFETY: row r < m of y, columns c0..c0 + cols < n (the caller's contract).
                let yr = unsafe { std::slice::from_raw_parts_mut(y.add(r * n + c0), cols) };
                let (s, z) = (sa[r], zp[r]);
                let ar = &acc[i * nr..i * nr + cols];
                for j in 0..cols {
                    // Exact in i32 for k ≤ MAX_K (both terms are below 2³⁰ in size).
                    let d = ar[j].wrapping_sub(z.wrapping_mul(cs[j]));
                    yr[j] = d as f32 * (s * sw[j]) + b[j];
                }
                if gelu {
                    gelu::gelu_in_place(yr);
                }
            }
        }
    }
    SCRATCH.set(aq);
}

#[cfg(test)]
mod tests;
