//! The AVX2 int8 micro-kernel of [`super`]: a 6 × 16 tile of i32 sums in 12 ymm
//! accumulators, on operands widened to i16 (activations u8 → u16, weights i8 → i16, when
//! quantized and packed). Each pair of consecutive k loads two vectors of the packed panel
//! (16 channels × 2 i16) and broadcasts each row's pair into `vpmaddwd`, which multiplies
//! the i16 pairs and adds each pair's two products into an i32 lane (at most 2 · 255 · 127:
//! exact), and `vpaddd` accumulates. (`vpmaddubsw` on the bytes themselves would add its
//! pairs into i16 with saturation, which 8-bit activations can reach.)

use std::arch::x86_64::*;

const MR: usize = 6;
const NR: usize = 16;

/// See [`super::tile`]: writes MR × NR i32 to `out`, NR apart; rows and panel hold i16.
///
/// # Safety
/// As [`super::tile`], on a CPU with avx2, with rows of k4 u16 (`a_rs` bytes apart) and a
/// panel of k4 · NR i16; `out` is valid for MR · NR writes.
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
    // SAFETY: row min(i, rows − 1) lies inside a (the caller's contract).
    let ap: [*const u8; MR] = std::array::from_fn(|i| unsafe { a.add(i.min(rows - 1) * a_rs) });
    // SAFETY: reads stay inside the rows (k4 · 2 bytes each) and the panel (k4 · NR · 2
    // bytes); the stores inside `out`'s MR · NR i32.
    unsafe {
        for t in 0..k4 / 2 {
            let b0 = _mm256_loadu_si256(b.add(t * 4 * NR) as *const __m256i);
            let b1 = _mm256_loadu_si256(b.add(t * 4 * NR + 32) as *const __m256i);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_epi32((ap[i].add(4 * t) as *const i32).read_unaligned());
                row[0] = _mm256_add_epi32(row[0], _mm256_madd_epi16(av, b0));
                row[1] = _mm256_add_epi32(row[1], _mm256_madd_epi16(av, b1));
            }
        }
        for (i, row) in acc.iter().enumerate() {
            _mm256_storeu_si256(out.add(i * NR) as *mut __m256i, row[0]);
            _mm256_storeu_si256(out.add(i * NR + 8) as *mut __m256i, row[1]);
        }
    }
}
