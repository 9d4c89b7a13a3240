//! The AVX2 int8 micro-kernel of [`super`]: a 4 × 16 tile of i32 sums in 8 ymm
//! accumulators. Each group of four k loads two vectors of the packed panel (16 channels ×
//! 4 bytes); per row, `vpmaddubsw` multiplies the row's four broadcast bytes (u8, at most
//! 127) by the channels' (s8) and adds adjacent pairs into i16 (at most 2 · 127 · 127 =
//! 32,258: no saturation), `vpmaddwd` by ones adds adjacent i16 pairs into i32, `vpaddd`
//! accumulates.

use std::arch::x86_64::*;

const MR: usize = 4;
const NR: usize = 16;

/// See [`super::tile`]: writes MR × NR i32 to `out`, NR apart.
///
/// # Safety
/// As [`super::tile`], on a CPU with avx2, activations at most 127; `out` is valid for
/// MR · NR writes.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn tile(
    k4: usize,
    a: *const u8,
    a_rs: usize,
    rows: usize,
    b: *const i8,
    out: *mut i32,
) {
    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
    let ones = _mm256_set1_epi16(1);
    // SAFETY: row min(i, rows − 1) lies inside a (the caller's contract).
    let ap: [*const u8; MR] = std::array::from_fn(|i| unsafe { a.add(i.min(rows - 1) * a_rs) });
    // SAFETY: reads stay inside the rows (k4 bytes each) and the panel (k4 · NR bytes);
    // the stores inside `out`'s MR · NR i32.
    unsafe {
        for q in 0..k4 / 4 {
            let b0 = _mm256_loadu_si256(b.add(q * 4 * NR) as *const __m256i);
            let b1 = _mm256_loadu_si256(b.add(q * 4 * NR + 32) as *const __m256i);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_epi32((ap[i].add(4 * q) as *const i32).read_unaligned());
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(av, b0), ones);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(av, b1), ones);
                row[0] = _mm256_add_epi32(row[0], p0);
                row[1] = _mm256_add_epi32(row[1], p1);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            _mm256_storeu_si256(out.add(i * NR) as *mut __m256i, row[0]);
            _mm256_storeu_si256(out.add(i * NR + 8) as *mut __m256i, row[1]);
        }
    }
}
