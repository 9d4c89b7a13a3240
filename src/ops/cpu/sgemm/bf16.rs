//! The bf16 micro-kernel of [`super`] for inference (`--dtype bf16`) on CPUs with
//! AVX512_BF16: both operands rounded to bfloat16 (round to nearest even) when packed,
//! products summed in f32 by `vdpbf16ps`, which multiplies a pair of bf16 values per 32-bit
//! lane and adds both products to an f32 accumulator. The tile is the AVX-512 kernel's,
//! 12 × 32 in 24 zmm accumulators, and so are its stores and epilogue ([`avx512::store_tile`]).
//!
//! Packed panels hold pairs of consecutive k (element 2p in the low half of a 32-bit slot,
//! 2p + 1 in the high half; zero past k): a panel of kc rows takes ⌈kc/2⌉ rows of slots,
//! laid out where the f32 kernels' panel of kc rows would start, so the blocking loops and
//! [`super::PackedB`] are the same for all kernels.

use std::arch::x86_64::*;

use super::super::matrix::MatRef;
use super::avx512::{self, store_tile, MR, NR, NV};
use super::{Blocking, Epilogue, Isa};

/// The bf16 kernels (avx512f + avx512bf16).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bf16;

impl Isa for Bf16 {
    const MR: usize = MR;
    const NR: usize = NR;
    // Twice the AVX-512 kernel's depth in the same bytes: a B micro-panel of 768 k is 48 KB.
    const BLOCKING: Blocking = Blocking {
        kc: 768,
        mc: 144,
        nc: 960,
    };

    unsafe fn kernel(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        c_rs: usize,
        mr: usize,
        nr: usize,
        scale: f32,
        accumulate: bool,
        epi: Epilogue,
    ) {
        // SAFETY: the trait's contract (avx512bf16 among it), passed on.
        unsafe {
            kernel(
                kc,
                a as *const u32,
                b as *const u32,
                c,
                c_rs,
                mr,
                nr,
                scale,
                accumulate,
                epi,
            )
        }
    }

    unsafe fn pack_b(kc: usize, nc: usize, src: MatRef, out: *mut f32) {
        // SAFETY: the trait's contract, passed on.
        unsafe { pack_b(kc, nc, src, out as *mut u32) }
    }

    unsafe fn pack_a(mc: usize, kc: usize, src: MatRef, out: *mut f32) {
        // SAFETY: the trait's contract, passed on.
        unsafe { pack_a(mc, kc, src, out as *mut u32) }
    }
}

/// `x` rounded to bfloat16 as `vcvtne2ps2bf16` does: to nearest with ties to even, a
/// subnormal input taken as zero (of its sign), NaN kept NaN.
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    if x.is_subnormal() {
        return ((b >> 16) & 0x8000) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Two bfloat16 values in one 32-bit slot: `lo` (even k) in the low half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

/// [`Isa::kernel`] with bf16 pairs.
///
/// # Safety
/// As [`Isa::kernel`], with avx512f and avx512bf16; the panels hold ⌈kc/2⌉ rows of pairs.
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    kc: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    c_rs: usize,
    mr: usize,
    nr: usize,
    scale: f32,
    accumulate: bool,
    epi: Epilogue,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    // SAFETY: reads stay inside the panels (⌈kc/2⌉ rows of MR and NR slots), B's aligned.
    unsafe {
        let (mut a, mut b) = (a, b);
        for _ in 0..kc.div_ceil(2) {
            let mut bv = [_mm512_setzero_si512(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm512_load_si512(b.add(16 * v) as *const __m512i);
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(i) as i32));
                for (x, &bx) in row.iter_mut().zip(&bv) {
                    *x = _mm512_dpbf16_ps(*x, ai, std::mem::transmute::<__m512i, __m512bh>(bx));
                }
            }
            a = a.add(MR);
            b = b.add(NR);
        }
        store_tile(&acc, c, c_rs, mr, nr, scale, accumulate, epi)
    }
}

/// [`Isa::pack_b`] into 32-wide panels of bf16 pairs: row p of panel q holds, for each of
/// its NR columns j, the pair (B[2p][j], B[2p+1][j]).
///
/// # Safety
/// As [`Isa::pack_b`], with avx512f and avx512bf16.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_b(kc: usize, nc: usize, src: MatRef, out: *mut u32) {
    let at = |p: usize, j: usize| {
        // SAFETY: the caller's contract: (p, j) inside the (kc, nc) block when read below.
        unsafe { *src.at(p, j).ptr }
    };
    for (q, j0) in (0..nc).step_by(NR).enumerate() {
        let width = NR.min(nc - j0);
        // SAFETY: every write lies inside panel q (⌈kc/2⌉ rows of NR slots).
        unsafe {
            let panel = out.add(q * kc * NR);
            for p in 0..kc.div_ceil(2) {
                for j in 0..NR {
                    let v = if j < width {
                        let hi = if 2 * p + 1 < kc {
                            at(2 * p + 1, j0 + j)
                        } else {
                            0.0
                        };
                        pair(at(2 * p, j0 + j), hi)
                    } else {
                        0
                    };
                    *panel.add(p * NR + j) = v;
                }
            }
        }
    }
}

/// [`Isa::pack_a`] into 12-tall panels of bf16 pairs: row p of panel q holds, for each of
/// its MR rows i, the pair (A[i][2p], A[i][2p+1]).
///
/// # Safety
/// As [`Isa::pack_a`], with avx512f and avx512bf16.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_a(mc: usize, kc: usize, src: MatRef, out: *mut u32) {
    let at = |i: usize, p: usize| {
        // SAFETY: the caller's contract: (i, p) inside the (mc, kc) block when read below.
        unsafe { *src.at(i, p).ptr }
    };
    for (q, i0) in (0..mc).step_by(MR).enumerate() {
        let height = MR.min(mc - i0);
        // SAFETY: every write lies inside panel q (⌈kc/2⌉ rows of MR slots).
        unsafe {
            let panel = out.add(q * kc * MR);
            if src.cs == 1 {
                // Row-major (the activations of a linear layer): a row's consecutive floats,
                // rounded, are its pairs in order; 16 pairs of each row through a 16 × 16
                // transpose of 32-bit slots.
                let row0 = src.at(i0, 0);
                for p0 in (0..kc.div_ceil(2)).step_by(16) {
                    let lanes = kc - 2 * p0; // floats left in each row
                    let mut r = [_mm512_setzero_ps(); 16];
                    for (i, x) in r.iter_mut().enumerate().take(height) {
                        let row = row0.ptr.offset(i as isize * src.rs + 2 * p0 as isize);
                        let lo = _mm512_maskz_loadu_ps(avx512::mask(lanes), row);
                        let hi = _mm512_maskz_loadu_ps(
                            avx512::mask(lanes.saturating_sub(16)),
                            row.add(16.min(lanes)),
                        );
                        *x = std::mem::transmute::<__m512bh, __m512>(_mm512_cvtne2ps_pbh(hi, lo));
                    }
                    let t = avx512::transpose16(r);
                    for (pp, &x) in t.iter().enumerate().take((kc.div_ceil(2) - p0).min(16)) {
                        _mm512_mask_storeu_ps(
                            panel.add((p0 + pp) * MR) as *mut f32,
                            avx512::mask(MR),
                            x,
                        );
                    }
                }
                continue;
            }
            for p in 0..kc.div_ceil(2) {
                for i in 0..MR {
                    let v = if i < height {
                        let hi = if 2 * p + 1 < kc {
                            at(i0 + i, 2 * p + 1)
                        } else {
                            0.0
                        };
                        pair(at(i0 + i, 2 * p), hi)
                    } else {
                        0
                    };
                    *panel.add(p * MR + i) = v;
                }
            }
        }
    }
}

/// Whether this CPU runs the bf16 kernels.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (1 + 2^-6).
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(1.0 + 1.5 / 256.0), 0x3f81);
        assert_eq!(to_bf16(-2.0), 0xc000);
        assert!(f32::from_bits((to_bf16(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        let _ = avx512::MR;
    }
}
