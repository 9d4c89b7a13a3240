//! The AVX-512 VNNI int8 micro-kernel of [`super`]: a 12 × 32 tile of i32 sums in 24 zmm
//! accumulators; each group of four k loads two vectors of the packed panel (32 channels ×
//! 4 bytes) and broadcasts four bytes of each of the twelve rows into 24 `vpdpbusd`.

use std::arch::x86_64::*;

const MR: usize = 12;
const NR: usize = 32;

/// See [`super::tile`]: writes MR × NR i32 to `out`, NR apart.
///
/// # Safety
/// As [`super::tile`], on a CPU with avx512f, avx512bw and avx512vnni; `out` is valid for
/// MR · NR writes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn tile(
    k4: usize,
    a: *const u8,
    a_rs: usize,
    rows: usize,
    b: *const i8,
    out: *mut i32,
) {
    let mut acc = [[_mm512_setzero_si512(); 2]; MR];
    // SAFETY: row min(i, rows − 1) lies inside a (the caller's contract).
    let ap: [*const u8; MR] = std::array::from_fn(|i| unsafe { a.add(i.min(rows - 1) * a_rs) });
    // SAFETY: reads stay inside the rows (k4 bytes each) and the panel (k4 · NR bytes);
    // the stores inside `out`'s MR · NR i32.
    unsafe {
        for q in 0..k4 / 4 {
            let b0 = _mm512_loadu_si512(b.add(q * 4 * NR) as *const __m512i);
            let b1 = _mm512_loadu_si512(b.add(q * 4 * NR + 64) as *const __m512i);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_epi32((ap[i].add(4 * q) as *const i32).read_unaligned());
                row[0] = _mm512_dpbusd_epi32(row[0], av, b0);
                row[1] = _mm512_dpbusd_epi32(row[1], av, b1);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            _mm512_storeu_si512(out.add(i * NR) as *mut __m512i, row[0]);
            _mm512_storeu_si512(out.add(i * NR + 16) as *mut __m512i, row[1]);
        }
    }
}
