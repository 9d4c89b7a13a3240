//! The matrix-multiply provider of the fused kernels: one entry point, [`sgemm`], over
//! strided f32 views. It is backed by the pure-Rust `gemm` crate (the one candle uses, with
//! its AVX-512 path picked at run time), called single-threaded: the kernels parallelise
//! across independent products themselves, so threads never nest. [`provider`] names it
//! for benchmark reports.

/// A read-only strided view of an f32 matrix: element (i, j) is at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a MatRef is a read-only view; the kernels that share one across threads keep
// the viewed buffer alive and unmodified for the duration of the parallel section.
unsafe impl Send for MatRef {}
unsafe impl Sync for MatRef {}

impl MatRef {
    pub fn new(ptr: *const f32, rs: isize, cs: isize) -> Self {
        MatRef { ptr, rs, cs }
    }

    /// The transpose (a view, no copy).
    pub fn t(self) -> Self {
        MatRef {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst (m, n) = scale · lhs (m, k) · rhs (k, n)`, or `dst += …` with `accumulate`.
/// `dst` has row stride `dst_rs` and column stride `dst_cs`.
///
/// # Safety
/// Every view must cover its matrix inside one live allocation, and `dst` must not
/// overlap `lhs` or `rhs` or be written concurrently.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    dst_cs: usize,
    lhs: MatRef,
    rhs: MatRef,
    scale: f32,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.add(i * dst_rs + j * dst_cs) = 0.0;
                }
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// The provider as benchmark reports name it, with the kernel family `gemm` picks on this
/// CPU at run time: AVX-512 (compiled in through the `x86-v4` feature in Cargo.toml) where
/// the CPU has avx512f, else AVX2/FMA where it has fma, else portable code.
pub(crate) fn provider() -> &'static str {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "gemm (pure Rust, AVX-512)";
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return "gemm (pure Rust, AVX2/FMA)";
        }
    }
    "gemm (pure Rust)"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook triple loop over the same strided views.
    fn reference(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, scale: f32) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    unsafe {
                        let x = *a.ptr.offset(i as isize * a.rs + p as isize * a.cs);
                        let y = *b.ptr.offset(p as isize * b.rs + j as isize * b.cs);
                        s += x as f64 * y as f64;
                    }
                }
                out[i * n + j] = scale * s as f32;
            }
        }
        out
    }

    #[test]
    fn strided_products_match_the_triple_loop() {
        let data: Vec<f32> = (0..8000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 33, 9), (50, 16, 50), (64, 1, 65)] {
            // lhs read transposed from a wider buffer, rhs with a row stride > n.
            let a = MatRef::new(data.as_ptr(), 1, (m + 2) as isize); // column-major (m, k)
            let b = MatRef::new(data[7..].as_ptr(), (n + 3) as isize, 1);
            let want = reference(m, n, k, a, b, 0.5);
            let mut got = vec![1f32; m * n];
            unsafe { sgemm(m, n, k, got.as_mut_ptr(), n, 1, a, b, 0.5, false) };
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "{m}x{n}x{k}: {g} vs {w}"
                );
            }
            // Accumulating adds onto what is there.
            unsafe { sgemm(m, n, k, got.as_mut_ptr(), n, 1, a, b, 0.5, true) };
            for (g, w) in got.iter().zip(&want) {
                assert!((g - 2.0 * w).abs() < 2e-4 * (1.0 + w.abs()));
            }
        }
    }

    #[test]
    fn empty_inner_dimension_gives_zeros() {
        let mut out = vec![3f32; 6];
        let z = MatRef::new(std::ptr::null(), 0, 0);
        unsafe { sgemm(2, 3, 0, out.as_mut_ptr(), 3, 1, z, z, 1.0, false) };
        assert_eq!(out, vec![0.0; 6]);
    }
}
