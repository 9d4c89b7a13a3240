//! The AVX-512 micro-kernel and packing of [`super`]: a 12 × 32 tile in 24 zmm
//! accumulators, panels packed with masked loads and 16 × 16 in-register transposes.

use std::arch::x86_64::*;

use super::super::gelu::gelu_in_place;
use super::super::matrix::MatRef;
use super::{Blocking, Epilogue, Isa};

/// Rows of the micro-tile.
pub(super) const MR: usize = 12;
/// Vectors of 16 lanes per micro-tile row.
pub(super) const NV: usize = 2;
/// Columns of the micro-tile.
pub(super) const NR: usize = 16 * NV;

/// The AVX-512 kernels (avx512f).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512;

impl Isa for Avx512 {
    const MR: usize = MR;
    const NR: usize = NR;
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
        // SAFETY: the trait's contract (avx512f among it), passed on.
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

/// The mask of the first `lanes` (≤ 16) lanes.
#[inline(always)]
pub(in crate::ops::cpu) fn mask(lanes: usize) -> __mmask16 {
    if lanes >= 16 {
        0xffff
    } else {
        (1u16 << lanes) - 1
    }
}

/// [`Isa::kernel`] for 12 × 32 tiles.
///
/// # Safety
/// As [`Isa::kernel`], with avx512f.
#[target_feature(enable = "avx512f")]
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
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    // SAFETY: reads stay inside the panels (kc steps of MR and NR floats), B's aligned.
    unsafe {
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm512_load_ps(b.add(16 * v));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*a.add(i));
                for (x, &bx) in row.iter_mut().zip(&bv) {
                    *x = _mm512_fmadd_ps(ai, bx, *x);
                }
            }
            a = a.add(MR);
            b = b.add(NR);
        }
    }
    // SAFETY: the caller's contract covers the tile.
    unsafe { store_tile(&acc, c, c_rs, mr, nr, scale, accumulate, epi) }
}

/// Stores the mr × nr corner of a 12 × 32 tile of sums as [`Isa::kernel`] says: scaled, added
/// to `c` with `accumulate`, else plus the epilogue's bias; then GELU with the epilogue's.
///
/// # Safety
/// avx512f; `c` covers the mr × nr corner (row stride `c_rs`, column stride 1); the
/// epilogue's bias, if any, holds nr floats.
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn store_tile(
    acc: &[[__m512; NV]; MR],
    c: *mut f32,
    c_rs: usize,
    mr: usize,
    nr: usize,
    scale: f32,
    accumulate: bool,
    epi: Epilogue,
) {
    let sv = _mm512_set1_ps(scale);
    // Constant trip counts (a runtime row index would push the accumulators to memory).
    for (i, row) in acc.iter().enumerate() {
        if i >= mr {
            break;
        }
        // SAFETY: row i < mr of the tile; lanes past nr are masked off.
        unsafe {
            let ci = c.add(i * c_rs);
            for (v, &x) in row.iter().enumerate() {
                let cols = nr.saturating_sub(16 * v);
                if cols == 0 {
                    break;
                }
                let mk = mask(cols);
                let p = ci.add(16 * v);
                let bias =
                    (!epi.bias.is_null()).then(|| _mm512_maskz_loadu_ps(mk, epi.bias.add(16 * v)));
                // The bias comes only without `accumulate` (see sgemm_packed).
                let y = match (accumulate, bias) {
                    (true, _) => _mm512_fmadd_ps(x, sv, _mm512_maskz_loadu_ps(mk, p)),
                    (false, Some(b)) => _mm512_fmadd_ps(x, sv, b),
                    (false, None) => _mm512_mul_ps(x, sv),
                };
                _mm512_mask_storeu_ps(p, mk, y);
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

/// [`Isa::pack_b`] into 32-wide panels.
///
/// # Safety
/// As [`Isa::pack_b`], with avx512f.
#[target_feature(enable = "avx512f")]
unsafe fn pack_b(kc: usize, nc: usize, src: MatRef, out: *mut f32) {
    for (q, j0) in (0..nc).step_by(NR).enumerate() {
        let width = NR.min(nc - j0);
        // SAFETY: every read is inside the (kc, nc) block (masked past it), every write
        // inside panel q.
        unsafe {
            let panel = out.add(q * kc * NR);
            let src = src.at(0, j0);
            if src.cs == 1 {
                // Row-major: each row of the panel is NR consecutive floats.
                for p in 0..kc {
                    let row = src.ptr.offset(p as isize * src.rs);
                    for v in 0..NV {
                        let mk = mask(width.saturating_sub(16 * v));
                        let x = _mm512_maskz_loadu_ps(mk, row.add(16 * v));
                        _mm512_store_ps(panel.add(p * NR + 16 * v), x);
                    }
                }
            } else if src.rs == 1 {
                // Transposed: columns are contiguous; 16 × 16 blocks through registers.
                for v in 0..NV {
                    let cols = width.saturating_sub(16 * v).min(16);
                    transpose_into(
                        MatRef::new(src.ptr.offset(16 * v as isize * src.cs), src.cs, 1),
                        cols,
                        kc,
                        panel.add(16 * v),
                        NR,
                        16,
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

/// [`Isa::pack_a`] into 12-tall panels.
///
/// # Safety
/// As [`Isa::pack_a`], with avx512f.
#[target_feature(enable = "avx512f")]
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
                let mk = mask(height);
                for p in 0..kc {
                    let x = _mm512_maskz_loadu_ps(mk, src.ptr.offset(p as isize * src.cs));
                    _mm512_mask_storeu_ps(panel.add(p * MR), mask(MR), x);
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

/// Writes the transpose of `rows` (≤ 16) rows of `len` contiguous floats (row stride
/// `src.rs`) to `out`: element (r, p) goes to `out[p·out_rs + r]`, and each of the `len`
/// output rows is written over `lanes` (≥ rows, ≤ 16) floats, zero past `rows`.
///
/// # Safety
/// avx512f; `src` covers rows × len; `out` covers len rows of `lanes` floats at stride
/// `out_rs`, 64-byte aligned when `lanes` is 16.
#[target_feature(enable = "avx512f")]
unsafe fn transpose_into(
    src: MatRef,
    rows: usize,
    len: usize,
    out: *mut f32,
    out_rs: usize,
    lanes: usize,
) {
    let store_mask = mask(lanes);
    for p0 in (0..len).step_by(16) {
        let mk = mask(len - p0);
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, x) in r.iter_mut().enumerate().take(rows) {
            // SAFETY: row i < rows, columns p0.. masked to len.
            *x = unsafe {
                _mm512_maskz_loadu_ps(mk, src.ptr.offset(i as isize * src.rs + p0 as isize))
            };
        }
        let t = transpose16(r);
        for (pp, &x) in t.iter().enumerate().take((len - p0).min(16)) {
            // SAFETY: output row p0 + pp < len, `lanes` floats.
            unsafe {
                let o = out.add((p0 + pp) * out_rs);
                if lanes == 16 {
                    _mm512_store_ps(o, x);
                } else {
                    _mm512_mask_storeu_ps(o, store_mask, x);
                }
            }
        }
    }
}

/// The transpose of a 16 × 16 block held as 16 row vectors.
#[target_feature(enable = "avx512f")]
pub(in crate::ops::cpu) fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // 32-bit interleave of row pairs, then 64-bit interleave of pairs of pairs: vector
    // 4i+e then holds, in each 128-bit lane l, element 4l+e of rows 4i..4i+4.
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_ps(); 16];
    let pd = _mm512_castps_pd;
    let ps = _mm512_castpd_ps;
    for i in 0..4 {
        let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        u[4 * i] = ps(_mm512_unpacklo_pd(pd(a), pd(c)));
        u[4 * i + 1] = ps(_mm512_unpackhi_pd(pd(a), pd(c)));
        u[4 * i + 2] = ps(_mm512_unpacklo_pd(pd(b), pd(d)));
        u[4 * i + 3] = ps(_mm512_unpackhi_pd(pd(b), pd(d)));
    }
    // 128-bit lane shuffles: output row 4l+e gathers lane l of u[e], u[4+e], u[8+e], u[12+e].
    let mut o = [_mm512_setzero_ps(); 16];
    for e in 0..4 {
        let (x0, x1, x2, x3) = (u[e], u[4 + e], u[8 + e], u[12 + e]);
        let y0 = _mm512_shuffle_f32x4::<0b01_00_01_00>(x0, x1);
        let y1 = _mm512_shuffle_f32x4::<0b11_10_11_10>(x0, x1);
        let y2 = _mm512_shuffle_f32x4::<0b01_00_01_00>(x2, x3);
        let y3 = _mm512_shuffle_f32x4::<0b11_10_11_10>(x2, x3);
        o[e] = _mm512_shuffle_f32x4::<0b10_00_10_00>(y0, y2);
        o[4 + e] = _mm512_shuffle_f32x4::<0b11_01_11_01>(y0, y2);
        o[8 + e] = _mm512_shuffle_f32x4::<0b10_00_10_00>(y1, y3);
        o[12 + e] = _mm512_shuffle_f32x4::<0b11_01_11_01>(y1, y3);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::super::Line;
    use super::*;

    #[test]
    fn transpose16_transposes() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("no avx512f on this CPU: skipped");
            return;
        }
        let x: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let mut out = [Line([0.0; 16]); 16];
        // SAFETY: avx512f checked; 16 rows of 16 in, 16 aligned rows of 16 out.
        unsafe {
            let src = MatRef::new(x.as_ptr(), 16, 1);
            transpose_into(src, 16, 16, out.as_mut_ptr() as *mut f32, 16, 16);
        }
        for (p, row) in out.iter().enumerate() {
            for (r, &v) in row.0.iter().enumerate() {
                assert_eq!(v, (r * 16 + p) as f32);
            }
        }
    }
}
