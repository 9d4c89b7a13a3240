//! Matrix transpose of row-major f32 data: 16 × 16 blocks through AVX-512 registers where
//! the CPU has avx512f, cache-sized tiles of scalar copies elsewhere. Pure data movement,
//! so every path gives the same bits. The convolution's layout changes (channels first ↔
//! channels last, the weight in patch order) run on it.

/// dst (cols, rows) = srcᵀ for a row-major src (rows, cols).
///
/// # Panics
/// When a slice is shorter than rows · cols.
pub(super) fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    let (src, dst) = (&src[..rows * cols], &mut dst[..rows * cols]);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: avx512f was just detected; both slices hold rows · cols floats.
        unsafe { transpose_avx512(src.as_ptr(), rows, cols, dst.as_mut_ptr()) };
        return;
    }
    transpose_tiled(src, rows, cols, dst);
}

/// [`transpose`] by scalar copies in 16 × 16 tiles (the path without avx512f).
fn transpose_tiled(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const T: usize = 16;
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                for c in c0..(c0 + T).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
}

/// [`transpose`] through 16 × 16 register blocks, masked at the edges.
///
/// # Safety
/// avx512f; `src` and `dst` each cover rows · cols floats and do not overlap.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_avx512(src: *const f32, rows: usize, cols: usize, dst: *mut f32) {
    use super::sgemm::{mask, transpose16};
    use std::arch::x86_64::*;
    for r0 in (0..rows).step_by(16) {
        let nr = (rows - r0).min(16);
        let store = mask(nr);
        for c0 in (0..cols).step_by(16) {
            let nc = (cols - c0).min(16);
            let load = mask(nc);
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, x) in r.iter_mut().enumerate().take(nr) {
                // SAFETY: row r0 + i < rows, columns c0..c0 + nc (masked) < cols.
                *x = unsafe { _mm512_maskz_loadu_ps(load, src.add((r0 + i) * cols + c0)) };
            }
            let t = transpose16(r);
            for (j, &x) in t.iter().enumerate().take(nc) {
                // SAFETY: output row c0 + j < cols, columns r0..r0 + nr (masked) < rows.
                unsafe { _mm512_mask_storeu_ps(dst.add((c0 + j) * rows + r0), store, x) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn transposes_every_shape_exactly() {
        for (rows, cols) in [(1, 1), (1, 17), (16, 16), (17, 5), (33, 40), (3, 100)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 3.0).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            super::transpose(&src, rows, cols, &mut dst);
            let mut tiled = vec![f32::NAN; rows * cols];
            super::transpose_tiled(&src, rows, cols, &mut tiled);
            assert_eq!(dst, tiled);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * cols + c],
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
        }
    }
}
