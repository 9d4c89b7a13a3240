//! The AVX2 + FMA micro-kernel and packing of [`super`], for CPUs without AVX-512 (and for
//! `VIT_SIMD=avx2` on those with it): a 6 × 16 tile in 12 ymm accumulators, which with the
//! two vectors of packed B and one broadcast of A fills 15 of the 16 ymm registers. Each
//! step of k issues 12 independent `vfmadd231ps`, enough to keep two 256-bit FMA pipes of
//! 4–5 cycles' latency busy. Panels are packed with masked loads and 8 × 8 in-register
//! transposes.

use std::arch::x86_64::*;

use super::super::gelu::gelu_in_place;
use super::super::matrix::MatRef;
use super::{Blocking, Epilogue, Isa};

/// Rows of the micro-tile.
const MR: usize = 6;
/// Vectors of 8 lanes per micro-tile row.
const NV: usize = 2;
/// Columns of the micro-tile.
const NR: usize = 8 * NV;

/// The AVX2 + FMA kernels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2;

impl Isa for Avx2 {
    const MR: usize = MR;
    const NR: usize = NR;
    // An A micro-panel (kc × 6) stays in L1 (32 KB on Zen 3) beside a B micro-panel
    // (kc × 16, 16 KB at kc = 256); a packed A block (mc × kc, 144 KB) in L2 (512 KB).
    const BLOCKING: Blocking = Blocking {
        kc: 256,
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
        // SAFETY: the trait's contract (avx2 and fma among it), passed on.
        unsafe { kernel(kc, a, b, c, c_rs, mr, nr, scale, accumulate, epi) }
    }

    unsafe fn pack_b(kc: usize, nc: usize, src: MatRef, out: *mut f32) {
        // SAFETY: the trait's contract, passed on.
        unsafe { pack_b(kc, nc, src, out) }
    }

    unsafe fn pack_a(mc: usize, kc: usize, src: MatRef, out: *mut f32) {
        // SAFETY: the trait's contract, passed on.
        unsafe { pack_a(mc, kc, src, out) }
    }
}

/// The mask of the first `lanes` lanes (all of them from 8 on), for `maskload`/`maskstore`.
#[inline(always)]
fn mask(lanes: usize) -> __m256i {
    const LANES: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
    let start = 8 - lanes.min(8);
    // SAFETY: start ≤ 8, so the 8 lanes read lie inside LANES.
    unsafe { _mm256_loadu_si256(LANES.as_ptr().add(start) as *const __m256i) }
}

/// The first `lanes` floats at `p` (zero past them); only those are read.
///
/// # Safety
/// avx2; `p` holds `lanes.min(8)` floats.
#[inline(always)]
unsafe fn load(p: *const f32, lanes: usize) -> __m256 {
    // SAFETY: the caller's contract: a full load when 8 floats are there, else masked.
    unsafe {
        if lanes >= 8 {
            _mm256_loadu_ps(p)
        } else {
            _mm256_maskload_ps(p, mask(lanes))
        }
    }
}

/// Stores the first `lanes` lanes of `x` at `p`; only those are written.
///
/// # Safety
/// avx2; `p` holds `lanes.min(8)` floats.
#[inline(always)]
unsafe fn store(p: *mut f32, lanes: usize, x: __m256) {
    // SAFETY: the caller's contract, as in `load`.
    unsafe {
        if lanes >= 8 {
            _mm256_storeu_ps(p, x)
        } else {
            _mm256_maskstore_ps(p, mask(lanes), x)
        }
    }
}

/// [`Isa::kernel`] for 6 × 16 tiles.
///
/// # Safety
/// As [`Isa::kernel`], with avx2 and fma.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
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
    let mut acc = [[_mm256_setzero_ps(); NV]; MR];
    // SAFETY: reads stay inside the panels (kc steps of MR and NR floats), B's aligned.
    unsafe {
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            let mut bv = [_mm256_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm256_load_ps(b.add(8 * v));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm256_broadcast_ss(&*a.add(i));
                for (x, &bx) in row.iter_mut().zip(&bv) {
                    *x = _mm256_fmadd_ps(ai, bx, *x);
                }
            }
            a = a.add(MR);
            b = b.add(NR);
        }
    }
    let sv = _mm256_set1_ps(scale);
    // Constant trip counts (a runtime row index would push the accumulators to memory).
    for (i, row) in acc.iter().enumerate() {
        if i >= mr {
            break;
        }
        // SAFETY: row i < mr of the tile; lanes past nr are neither read nor written.
        unsafe {
            let ci = c.add(i * c_rs);
            for (v, &x) in row.iter().enumerate() {
                let cols = nr.saturating_sub(8 * v);
                if cols == 0 {
                    break;
                }
                let p = ci.add(8 * v);
                let bias = (!epi.bias.is_null()).then(|| load(epi.bias.add(8 * v), cols));
                // The bias comes only without `accumulate` (see sgemm_packed).
                let y = match (accumulate, bias) {
                    (true, _) => _mm256_fmadd_ps(x, sv, load(p, cols)),
                    (false, Some(b)) => _mm256_fmadd_ps(x, sv, b),
                    (false, None) => _mm256_mul_ps(x, sv),
                };
                store(p, cols, y);
            }
        }
    }
    if epi.gelu {
        for i in 0..mr {
            // SAFETY: row i of the tile, nr floats, all just stored.
            let row = unsafe { std::slice::from_raw_parts_mut(c.add(i * c_rs), nr) };
            gelu_in_place(row);
        }
    }
}

/// [`Isa::pack_b`] into 16-wide panels.
///
/// # Safety
/// As [`Isa::pack_b`], with avx2.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_b(kc: usize, nc: usize, src: MatRef, out: *mut f32) {
    for (q, j0) in (0..nc).step_by(NR).enumerate() {
        let width = NR.min(nc - j0);
        // SAFETY: every read is inside the (kc, nc) block (masked past it), every write
        // inside panel q (aligned: panels and their rows are whole cache lines).
        unsafe {
            let panel = out.add(q * kc * NR);
            let src = src.at(0, j0);
            if src.cs == 1 {
                // Row-major: each row of the panel is NR consecutive floats.
                for p in 0..kc {
                    let row = src.ptr.offset(p as isize * src.rs);
                    for v in 0..NV {
                        let x = load_or_zero(row.add(8 * v), width.saturating_sub(8 * v));
                        _mm256_store_ps(panel.add(p * NR + 8 * v), x);
                    }
                }
            } else if src.rs == 1 {
                // Transposed: columns are contiguous; 8 × 8 blocks through registers.
                for v in 0..NV {
                    let cols = width.saturating_sub(8 * v).min(8);
                    transpose_into(
                        MatRef::new(src.ptr.offset(8 * v as isize * src.cs), src.cs, 1),
                        cols,
                        kc,
                        panel.add(8 * v),
                        NR,
                        8,
                    );
                }
            } else {
                for p in 0..kc {
                    for j in 0..NR {
                        *panel.add(p * NR + j) = if j < width { *src.at(p, j).ptr } else { 0.0 };
                    }
                }
            }
        }
    }
}

/// [`load`] of `lanes` floats, or zeros (reading nothing) when `lanes` is 0.
///
/// # Safety
/// As [`load`].
#[inline(always)]
unsafe fn load_or_zero(p: *const f32, lanes: usize) -> __m256 {
    if lanes == 0 {
        // SAFETY: the caller's contract includes avx2.
        unsafe { _mm256_setzero_ps() }
    } else {
        // SAFETY: the caller's contract.
        unsafe { load(p, lanes) }
    }
}

/// [`Isa::pack_a`] into 6-tall panels.
///
/// # Safety
/// As [`Isa::pack_a`], with avx2.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_a(mc: usize, kc: usize, src: MatRef, out: *mut f32) {
    for (q, i0) in (0..mc).step_by(MR).enumerate() {
        let height = MR.min(mc - i0);
        // SAFETY: every read is inside the (mc, kc) block (masked past it), every write
        // inside panel q.
        unsafe {
            let panel = out.add(q * kc * MR);
            let src = src.at(i0, 0);
            if src.rs == 1 {
                // Column-major (a transposed view): each column of the panel is contiguous.
                for p in 0..kc {
                    let x = load(src.ptr.offset(p as isize * src.cs), height);
                    store(panel.add(p * MR), MR, x);
                }
            } else if src.cs == 1 {
                // Row-major: rows are contiguous; transposed through registers.
                transpose_into(src, height, kc, panel, MR, MR);
            } else {
                for p in 0..kc {
                    for i in 0..MR {
                        *panel.add(p * MR + i) = if i < height { *src.at(i, p).ptr } else { 0.0 };
                    }
                }
            }
        }
    }
}

/// Writes the transpose of `rows` (≤ 8) rows of `len` contiguous floats (row stride
/// `src.rs`) to `out`: element (r, p) goes to `out[p·out_rs + r]`, and each of the `len`
/// output rows is written over `lanes` (≥ rows, ≤ 8) floats, zero past `rows`.
///
/// # Safety
/// avx2; `src` covers rows × len; `out` covers len rows of `lanes` floats at stride `out_rs`.
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose_into(
    src: MatRef,
    rows: usize,
    len: usize,
    out: *mut f32,
    out_rs: usize,
    lanes: usize,
) {
    for p0 in (0..len).step_by(8) {
        let n = len - p0;
        let mut r = [_mm256_setzero_ps(); 8];
        for (i, x) in r.iter_mut().enumerate().take(rows) {
            // SAFETY: row i < rows, columns p0.. up to len.
            *x = unsafe { load(src.ptr.offset(i as isize * src.rs + p0 as isize), n) };
        }
        let t = transpose8(r);
        for (pp, &x) in t.iter().enumerate().take(n.min(8)) {
            // SAFETY: output row p0 + pp < len, `lanes` floats.
            unsafe { store(out.add((p0 + pp) * out_rs), lanes, x) };
        }
    }
}

/// The transpose of an 8 × 8 block held as 8 row vectors.
#[target_feature(enable = "avx2,fma")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // 32-bit interleave of row pairs: t[2i] = (r0 r1 interleaved, low halves of each lane).
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    // 64-bit pairs: s0 holds, per 128-bit lane l, element 4l of rows 0–3, s1 element 4l+1, …
    let s0 = _mm256_shuffle_ps::<0b01_00_01_00>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0b11_10_11_10>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0b01_00_01_00>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0b11_10_11_10>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0b01_00_01_00>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0b11_10_11_10>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0b01_00_01_00>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0b11_10_11_10>(t5, t7);
    // 128-bit lanes: low lanes make columns 0–3, high lanes columns 4–7.
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose8_transposes_any_corner() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("no avx2/fma on this CPU: skipped");
            return;
        }
        let x: Vec<f32> = (0..8 * 11).map(|i| i as f32).collect();
        for (rows, len, lanes) in [(8, 8, 8), (6, 11, 6), (3, 5, 8), (1, 1, 6)] {
            let mut out = vec![-1f32; len * 8];
            // SAFETY: avx2 checked; `rows` rows of 11 floats in, len rows of 8 out.
            unsafe {
                transpose_into(
                    MatRef::new(x.as_ptr(), 11, 1),
                    rows,
                    len,
                    out.as_mut_ptr(),
                    8,
                    lanes,
                )
            };
            for p in 0..len {
                for r in 0..8 {
                    let want = if r < rows {
                        (r * 11 + p) as f32
                    } else if r < lanes {
                        0.0
                    } else {
                        -1.0
                    };
                    assert_eq!(
                        out[p * 8 + r],
                        want,
                        "{rows}×{len}, lanes {lanes}: ({p}, {r})"
                    );
                }
            }
        }
    }
}
