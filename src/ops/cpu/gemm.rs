//! The matrix-multiply provider of the fused kernels: one entry point, [`sgemm`], over
//! strided f32 views, always called single-threaded (the kernels parallelise across
//! independent products themselves, so threads never nest). Three implementations:
//!
//! - our own packed AVX-512 kernel ([`super::sgemm`]), the default on CPUs with avx512f, for
//!   large products (m·n·k ≥ [`OWN_MIN_MNK`], n and k ≥ [`OWN_MIN`]: the layers of
//!   ViT-B/16 and up); the pure-Rust `gemm` crate for the smaller ones (attention's
//!   per-head products, the small models' layers), where it is faster. The choice is by
//!   shape, CPU and environment only, never by timing, so a given product always rounds
//!   the same way. `VIT_GEMM=rust` uses the `gemm` crate for everything, for comparison;
//!   `VIT_SIMD=avx2` or `baseline` turns our AVX-512 kernel off with the rest;
//! - the `gemm` crate (the one candle uses, its AVX-512 kernels compiled in with the
//!   `avx512` cargo feature, on by default), the default elsewhere;
//! - a system BLAS loaded at run time on request ([`blas`]: MKL, OpenBLAS or BLIS through
//!   `dlopen`, nothing needed at build time), used for the views it accepts, the above for
//!   the rest. `VIT_BLAS=auto` takes the first of MKL, OpenBLAS, BLIS that is installed;
//!   `VIT_BLAS=<library>` names one. It takes precedence over `VIT_GEMM`.
//!
//! Why the BLAS is opt-in: which is faster depends on the library build, its kernel choice
//! and the shapes. On the 2-core AMD EPYC of BENCHMARKS.md, Debian's OpenBLAS 0.3.21 with
//! its AVX-512 kernels beats `gemm` at ViT-B/16 inference (9.1 against 6.6 images/s) but
//! loses at training the small models (the products are small); with the AVX2 kernels it
//! picks by itself there, it loses everywhere. An automatic choice by timing would make
//! results depend on timing noise, so the choice is the user's. [`provider`] names what
//! runs.

use super::matrix::MatRef;
use super::settings::{settings, BlasChoice};

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
                    // SAFETY: (i, j) is inside dst's (m, n) view, which the caller vouches for.
                    unsafe { *dst.add(i * dst_rs + j * dst_cs) = 0.0 };
                }
            }
        }
        return;
    }
    if let Some(b) = blas() {
        // SAFETY: the caller's contract (m, n, k ≥ 1 here); try_sgemm reads and writes
        // nothing when it declines the views.
        if unsafe { b.try_sgemm(m, n, k, dst, dst_rs, dst_cs, lhs, rhs, scale, accumulate) } {
            return;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(level) = own_shape(m, n, k) {
        // SAFETY: own_kernel() checked the level's instruction set; the views are the
        // caller's.
        unsafe {
            super::sgemm::sgemm(
                level, m, n, k, dst, dst_rs, dst_cs, lhs, rhs, scale, accumulate,
            )
        };
        return;
    }
    // SAFETY: the caller's contract, with m, n, k ≥ 1 here.
    unsafe { rust_sgemm(m, n, k, dst, dst_rs, dst_cs, lhs, rhs, scale, accumulate) };
}

#[cfg(target_arch = "x86_64")]
pub(crate) use super::sgemm::{sgemm_packed, Epilogue, Level, PackedB, MR};

/// Stand-in for our kernels' instruction sets where they are not compiled: none exists.
#[cfg(not(target_arch = "x86_64"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {}

/// Rows of our kernel's micro-tile (where it is not compiled, nothing is tiled by it).
#[cfg(not(target_arch = "x86_64"))]
pub(crate) const MR: usize = 1;

/// Stand-in for our kernel's packed right-hand side where it is not compiled: never built
/// ([`own_kernel_for`] is always false there).
#[cfg(not(target_arch = "x86_64"))]
pub(crate) enum PackedB {}

#[cfg(not(target_arch = "x86_64"))]
impl PackedB {
    /// Never called (see [`PackedB`]); panics.
    ///
    /// # Safety
    /// As our kernel's `PackedB::new` (nothing here relies on it).
    pub(crate) unsafe fn new(level: Level, _k: usize, _n: usize, _rhs: MatRef) -> PackedB {
        match level {}
    }

    /// Never called (see [`PackedB`]).
    pub(crate) fn n(&self) -> usize {
        match *self {}
    }

    /// Never called (see [`PackedB`]).
    pub(crate) fn level(&self) -> Level {
        match *self {}
    }
}

/// Stand-in for our kernel's `sgemm_packed` where it is not compiled: no [`PackedB`] exists
/// to call it with.
///
/// # Safety
/// As our kernel's `sgemm_packed` (nothing here relies on it).
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_packed(
    _m: usize,
    _dst: *mut f32,
    _dst_rs: usize,
    _dst_cs: usize,
    _lhs: MatRef,
    b: &PackedB,
    _scale: f32,
    _accumulate: bool,
    _epi: Epilogue,
) {
    match *b {}
}

/// Stand-in for our kernel's epilogue where it is not compiled.
#[cfg(not(target_arch = "x86_64"))]
#[derive(Clone, Copy)]
pub(crate) struct Epilogue;

#[cfg(not(target_arch = "x86_64"))]
impl Epilogue {
    pub(crate) fn new(_bias: Option<&[f32]>, _gelu: bool) -> Epilogue {
        Epilogue
    }
}

/// The smallest n and k our own kernel takes.
const OWN_MIN: usize = 128;
/// The smallest m·n·k our own kernel takes: the layers of ViT-B/16 and up (128-row blocks:
/// 75–302 M), not those of the small models (TRAIN-FM's are ≤ 59 M). Smaller products go
/// to the `gemm` crate, which is faster there: n = 64 (attention's per-head products):
/// 200–220 against 140–170 GFLOP/s on one Zen 5 core; TRAIN-FM's layers tie in isolation
/// (ours 190–220, the crate 165–222) but a whole TRAIN-FM step took 5–10% longer with ours.
/// Where the crate falls off, ViT-B/16's fc2 (k = 3072), ours runs at 150–160 against
/// 75–80. See `super::sgemm`.
const OWN_MIN_MNK: usize = 1 << 26;

/// Which of our own kernels [`sgemm`] runs a product of this shape on, if any (no system
/// BLAS loaded, the CPU has the instruction set, `VIT_GEMM` allows it, and the shape is
/// large enough): a function of the CPU, the shape and the environment only. The linear
/// layer asks it to decide whether to pack its weight once for all its row blocks
/// ([`PackedB`]).
pub(crate) fn own_kernel_for(m: usize, n: usize, k: usize) -> Option<Level> {
    if blas().is_some() {
        return None;
    }
    own_shape(m, n, k)
}

/// Which of our own kernels runs a product of this shape that the system BLAS (if any)
/// declined.
fn own_shape(m: usize, n: usize, k: usize) -> Option<Level> {
    let large =
        n >= OWN_MIN && k >= OWN_MIN && m.saturating_mul(n).saturating_mul(k) >= OWN_MIN_MNK;
    own_kernel().filter(|_| large)
}

/// Which of our own kernels [`sgemm`] may use: AVX-512 where the CPU has it, else AVX2 +
/// FMA, as far as `VIT_SIMD` allows (the kernels' instruction set follows
/// [`super::simd_level`]); none with `VIT_GEMM=rust` or below AVX2 (looked up once).
#[cfg(target_arch = "x86_64")]
fn own_kernel() -> Option<Level> {
    static OWN: std::sync::OnceLock<Option<Level>> = std::sync::OnceLock::new();
    use super::settings::GemmChoice;
    use super::simd::{simd_level, SimdLevel};
    *OWN.get_or_init(|| match (settings().gemm, simd_level()) {
        (GemmChoice::Rust, _) | (_, SimdLevel::Baseline) => None,
        (GemmChoice::Vit, SimdLevel::Avx512) => Some(Level::Avx512),
        (GemmChoice::Vit, SimdLevel::Avx2) => Some(Level::Avx2),
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn own_kernel() -> Option<Level> {
    None
}

/// [`sgemm`] by the pure-Rust `gemm` crate (any strides; m, n, k ≥ 1).
///
/// # Safety
/// As [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn rust_sgemm(
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
    // SAFETY: the caller's contract is what `gemm::gemm` needs: views covering their
    // matrices inside live allocations, and a dst that overlaps neither operand and that no
    // one else writes (dst is read only with `accumulate`).
    unsafe {
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
}

/// A system BLAS's `cblas_sgemm`, loaded at run time.
pub(crate) struct Blas {
    /// The library and, where it tells, its version and kernel family.
    name: String,
    sgemm: CblasSgemm,
}

type CblasSgemm = unsafe extern "C" fn(
    layout: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const f32,
    lda: i32,
    b: *const f32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
);

const CBLAS_ROW_MAJOR: i32 = 101;
const CBLAS_NO_TRANS: i32 = 111;
const CBLAS_TRANS: i32 = 112;

/// Libraries tried in order with `VIT_BLAS=auto`: MKL, OpenBLAS, BLIS.
const BLAS_LIBRARIES: [&str; 6] = [
    "libmkl_rt.so.2",
    "libmkl_rt.so",
    "libopenblas.so.0",
    "libopenblas.so",
    "libblis.so.4",
    "libblis.so",
];

/// The system BLAS in use, if `VIT_BLAS` asks for one and it loads (looked for once).
pub(crate) fn blas() -> Option<&'static Blas> {
    static BLAS: std::sync::OnceLock<Option<Blas>> = std::sync::OnceLock::new();
    BLAS.get_or_init(|| blas_from(&settings().blas)).as_ref()
}

/// The BLAS a `VIT_BLAS` choice selects ([`BlasChoice`]): none; `auto` → the first of
/// [`BLAS_LIBRARIES`] that loads; a library → that one.
fn blas_from(choice: &BlasChoice) -> Option<Blas> {
    match choice {
        BlasChoice::None => None,
        BlasChoice::Auto => {
            let found = BLAS_LIBRARIES.iter().find_map(|lib| Blas::load(lib));
            if found.is_none() {
                tracing::warn!("VIT_BLAS=auto: no MKL, OpenBLAS or BLIS found; using gemm");
            }
            found
        }
        BlasChoice::Library(lib) => {
            let found = Blas::load(lib);
            if found.is_none() {
                tracing::warn!("VIT_BLAS={lib}: no cblas_sgemm could be loaded; using gemm");
            }
            found
        }
    }
}

impl Blas {
    /// Opens `lib` and finds `cblas_sgemm`; sets the library to one thread (it runs inside
    /// our parallel blocks). `None` if the library or the symbol is missing.
    #[cfg(unix)]
    fn load(lib: &str) -> Option<Blas> {
        use std::ffi::{CStr, CString};
        let path = CString::new(lib).ok()?;
        // SAFETY: dlopen/dlsym get valid NUL-terminated strings; the handle is never closed,
        // so the symbols stay valid for the life of the process. Each non-null symbol is cast
        // to the signature its library documents and only then called: the thread setters
        // with 1, openblas_get_config with nothing (it returns a static NUL-terminated
        // string, which CStr::from_ptr only reads).
        unsafe {
            let handle = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            if handle.is_null() {
                return None;
            }
            let sym = |name: &CStr| libc::dlsym(handle, name.as_ptr());
            let sgemm = sym(c"cblas_sgemm");
            if sgemm.is_null() {
                return None;
            }
            let set_threads_i32 = [c"openblas_set_num_threads", c"MKL_Set_Num_Threads"];
            for name in set_threads_i32 {
                let f = sym(name);
                if !f.is_null() {
                    std::mem::transmute::<*mut libc::c_void, unsafe extern "C" fn(i32)>(f)(1);
                }
            }
            let f = sym(c"bli_thread_set_num_threads");
            if !f.is_null() {
                std::mem::transmute::<*mut libc::c_void, unsafe extern "C" fn(i64)>(f)(1);
            }
            let mut name = lib.to_string();
            let config = sym(c"openblas_get_config");
            if !config.is_null() {
                let get = std::mem::transmute::<
                    *mut libc::c_void,
                    unsafe extern "C" fn() -> *const libc::c_char,
                >(config);
                name = format!("{lib}: {}", CStr::from_ptr(get()).to_string_lossy().trim());
            }
            Some(Blas {
                name,
                sgemm: std::mem::transmute::<*mut libc::c_void, CblasSgemm>(sgemm),
            })
        }
    }

    #[cfg(not(unix))]
    fn load(_lib: &str) -> Option<Blas> {
        None
    }

    /// [`sgemm`] through the BLAS when the views are ones it accepts (row-major output,
    /// each operand row-major or transposed with a valid leading dimension, sizes within
    /// i32); returns false, doing nothing, otherwise.
    ///
    /// # Safety
    /// As [`sgemm`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn try_sgemm(
        &self,
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
    ) -> bool {
        let fits = |v: usize| i32::try_from(v).ok();
        let (Some(mi), Some(ni), Some(ki), Some(ldc)) = (fits(m), fits(n), fits(k), fits(dst_rs))
        else {
            return false;
        };
        if dst_cs != 1 || dst_rs < n {
            return false;
        }
        let (Some((ta, lda)), Some((tb, ldb))) = (cblas_view(lhs, m, k), cblas_view(rhs, k, n))
        else {
            return false;
        };
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: `sgemm` is the library's cblas_sgemm (see load); the flags and leading
        // dimensions describe exactly the caller's views (checked above), which cover their
        // matrices, with dst overlapping neither operand (the caller's contract).
        unsafe {
            (self.sgemm)(
                CBLAS_ROW_MAJOR,
                ta,
                tb,
                mi,
                ni,
                ki,
                scale,
                lhs.ptr,
                lda,
                rhs.ptr,
                ldb,
                beta,
                dst,
                ldc,
            );
        }
        true
    }
}

/// How a row-major CBLAS call reads the (rows, cols) view `v`: (transpose flag, leading
/// dimension), or `None` when neither stride is 1 or the other is too small.
fn cblas_view(v: MatRef, rows: usize, cols: usize) -> Option<(i32, i32)> {
    let ld = |s: isize, min: usize| {
        (s >= min.max(1) as isize)
            .then(|| i32::try_from(s).ok())
            .flatten()
    };
    if v.cs == 1 && (rows == 1 || ld(v.rs, cols).is_some()) {
        Some((CBLAS_NO_TRANS, ld(v.rs, cols).unwrap_or(cols.max(1) as i32)))
    } else if v.rs == 1 && (cols == 1 || ld(v.cs, rows).is_some()) {
        Some((CBLAS_TRANS, ld(v.cs, rows).unwrap_or(rows.max(1) as i32)))
    } else {
        None
    }
}

/// The provider as benchmark reports name it: the system BLAS if one was loaded, else our
/// own AVX-512 kernel where it runs (with the `gemm` crate for small products), else
/// `gemm` with the kernel family it picks on this CPU at run time: AVX-512 (compiled in
/// through the `x86-v4` feature in Cargo.toml) where the CPU has avx512f, else AVX2/FMA
/// where it has fma, else portable code.
pub(crate) fn provider() -> String {
    if let Some(b) = blas() {
        return format!(
            "{} (system BLAS; {} for other strides)",
            b.name,
            base_provider()
        );
    }
    match settings().blas.value() {
        None => base_provider(),
        Some(lib) => format!(
            "{} (VIT_BLAS={lib}: no BLAS could be loaded)",
            base_provider()
        ),
    }
}

/// What runs without a system BLAS.
fn base_provider() -> String {
    let f32_provider = match own_kernel() {
        #[cfg(target_arch = "x86_64")]
        Some(level) => format!(
            "vit {} sgemm ({} below 2^26 m·n·k or n, k < 128)",
            match level {
                Level::Avx512 | Level::Bf16 => "AVX-512",
                Level::Avx2 => "AVX2",
            },
            rust_provider()
        ),
        _ => rust_provider().to_string(),
    };
    if bf16_inference() {
        format!("vit bf16 sgemm (AVX512_BF16) for inference weights; {f32_provider}")
    } else {
        f32_provider
    }
}

/// Whether an inference weight's products run on the bf16 kernel (`--dtype bf16`).
static BF16_INFERENCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes the products of inference weights (a linear layer's cached packed weight) run
/// with both operands rounded to bfloat16 and f32 sums, on the AVX512_BF16 kernel, or back
/// to f32. Process-wide: set once by a command before it runs a model. An error names a
/// CPU (or a `VIT_SIMD` cap) without the instructions.
pub(crate) fn set_bf16_inference(on: bool) -> Result<(), String> {
    if on && !bf16_supported() {
        return Err(
            "--dtype bf16 needs AVX512_BF16 (vdpbf16ps), which this CPU does not have \
             (or VIT_SIMD caps below AVX-512): use --dtype f32"
                .into(),
        );
    }
    BF16_INFERENCE.store(on, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Whether [`set_bf16_inference`] turned bf16 on.
pub(crate) fn bf16_inference() -> bool {
    BF16_INFERENCE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether this CPU, under `VIT_SIMD`, runs the bf16 kernel.
fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd::{simd_level, SimdLevel};
        simd_level() == SimdLevel::Avx512 && super::sgemm::bf16_available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn rust_provider() -> &'static str {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if cfg!(feature = "avx512") && std::arch::is_x86_feature_detected!("avx512f") {
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
                    // SAFETY: (i, p) and (p, j) lie inside the views, which the callers make
                    // cover their (m, k) and (k, n) matrices.
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

    /// An `sgemm` implementation under test.
    type Impl<'a> = &'a dyn Fn(usize, usize, usize, *mut f32, usize, MatRef, MatRef, f32, bool);

    /// `sgemm` against the triple loop on strided views: lhs read transposed from a wider
    /// buffer, rhs row-major with a row stride > n, plain and accumulating.
    fn check_against_triple_loop(f: Impl) {
        let data: Vec<f32> = (0..8000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 33, 9), (50, 16, 50), (64, 1, 65)] {
            let a = MatRef::new(data.as_ptr(), 1, (m + 2) as isize); // column-major (m, k)
            let b = MatRef::new(data[7..].as_ptr(), (n + 3) as isize, 1);
            let want = reference(m, n, k, a, b, 0.5);
            let mut got = vec![1f32; m * n];
            f(m, n, k, got.as_mut_ptr(), n, a, b, 0.5, false);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "{m}x{n}x{k}: {g} vs {w}"
                );
            }
            // Accumulating adds onto what is there.
            f(m, n, k, got.as_mut_ptr(), n, a, b, 0.5, true);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - 2.0 * w).abs() < 2e-4 * (1.0 + w.abs()));
            }
        }
    }

    #[test]
    fn strided_products_match_the_triple_loop() {
        // The provider in use (the system BLAS where one is installed).
        // SAFETY: check_against_triple_loop passes views and a dst covering their matrices,
        // from separate buffers.
        check_against_triple_loop(&|m, n, k, d, ld, a, b, s, acc| unsafe {
            sgemm(m, n, k, d, ld, 1, a, b, s, acc)
        });
        // The pure-Rust provider itself.
        // SAFETY: the same views and dst as above, and every shape there has m, n, k ≥ 1
        // (rust_sgemm's further condition).
        check_against_triple_loop(&|m, n, k, d, ld, a, b, s, acc| unsafe {
            rust_sgemm(m, n, k, d, ld, 1, a, b, s, acc)
        });
    }

    #[test]
    fn system_blas_matches_the_triple_loop_where_installed() {
        let from = |v| blas_from(&BlasChoice::parse(v));
        assert!(from(None).is_none() && from(Some("none")).is_none());
        assert!(from(Some("/nonexistent/libblas.so")).is_none());
        let Some(blas) = from(Some("auto")) else {
            eprintln!("no system BLAS found (CI installs OpenBLAS); skipped");
            return;
        };
        let blas = &blas;
        // SAFETY: as in strided_products_match_the_triple_loop.
        check_against_triple_loop(&|m, n, k, d, ld, a, b, s, acc| unsafe {
            assert!(
                blas.try_sgemm(m, n, k, d, ld, 1, a, b, s, acc),
                "{m}x{n}x{k} declined"
            );
        });
        // Views CBLAS cannot express are declined, leaving the output alone.
        let data = [1f32; 64];
        let strided = MatRef::new(data.as_ptr(), 4, 2); // neither stride 1
        let plain = MatRef::new(data.as_ptr(), 2, 1);
        let mut out = [7f32; 4];
        // SAFETY: 2 × 2 views inside `data` (64 floats), dst inside `out`.
        assert!(!unsafe {
            blas.try_sgemm(2, 2, 2, out.as_mut_ptr(), 2, 1, strided, plain, 1.0, false)
        });
        // SAFETY: as above (dst (2, 2) at strides (1, 2) reaches element 3 of `out`).
        assert!(!unsafe {
            blas.try_sgemm(2, 2, 2, out.as_mut_ptr(), 1, 2, plain, plain, 1.0, false)
        });
        assert_eq!(out, [7.0; 4]);
    }

    #[test]
    fn cblas_views() {
        let (n, t) = (Some(CBLAS_NO_TRANS), Some(CBLAS_TRANS));
        // (row stride, column stride, rows, cols) → (transpose flag, leading dimension).
        let cases = [
            ((4, 1, 3, 4), n.zip(Some(4))), // row-major (3, 4)
            ((9, 1, 3, 4), n.zip(Some(9))), // wider rows
            ((1, 5, 3, 4), t.zip(Some(5))), // column-major: a transpose
            ((0, 1, 1, 4), n.zip(Some(4))), // one row
            ((1, 0, 3, 1), t.zip(Some(3))), // one column
            ((2, 1, 3, 4), None),           // overlapping rows
            ((8, 2, 3, 4), None),           // no unit stride
            ((-4, 1, 3, 4), None),          // negative stride
        ];
        for ((rs, cs, rows, cols), want) in cases {
            let v = MatRef::new(std::ptr::null(), rs, cs);
            assert_eq!(cblas_view(v, rows, cols), want, "{rs} {cs} {rows} {cols}");
        }
    }

    #[test]
    fn empty_inner_dimension_gives_zeros() {
        let mut out = vec![3f32; 6];
        let z = MatRef::new(std::ptr::null(), 0, 0);
        // SAFETY: with k = 0 the operands are never read; dst covers 2 × 3 floats of `out`.
        unsafe { sgemm(2, 3, 0, out.as_mut_ptr(), 3, 1, z, z, 1.0, false) };
        assert_eq!(out, vec![0.0; 6]);
    }
}
