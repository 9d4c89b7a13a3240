//! The environment switches of the CPU kernels (`VIT_SIMD`, `VIT_GEMM`, `VIT_BLAS`), read
//! once, on first use, into one [`Settings`]: every kernel asks [`settings`], none reads the
//! environment itself, so a process never mixes two readings of a variable.
//!
//! | variable   | values                                     | unset             |
//! |------------|--------------------------------------------|-------------------|
//! | `VIT_SIMD` | `baseline`, `avx2` (anything else: no cap) | the CPU's widest  |
//! | `VIT_GEMM` | `vit` (`auto`, empty), `rust` (`gemm`)     | `vit`             |
//! | `VIT_BLAS` | `none` (`gemm`, empty), `auto`, a library  | none              |
//!
//! All three are for comparisons and benchmarks; the defaults are what the project
//! measures. A value that is not valid UTF-8 counts as unset.

use std::sync::OnceLock;

/// The kernels' environment switches, parsed (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Settings {
    /// `VIT_SIMD`: the widest instruction set the row kernels' loops may be compiled for
    /// (`ops/cpu/simd.rs`) and our own matrix-multiply kernels may use (`ops/cpu/gemm.rs`).
    /// It lowers the level the CPU supports, never raises it. The `gemm` crate does not
    /// read it: a build without the `avx512` feature keeps that crate to AVX2.
    pub simd_cap: SimdCap,
    /// `VIT_GEMM`: whether large products on CPUs with avx512f run on our own kernel
    /// (`ops/cpu/sgemm.rs`) or on the `gemm` crate (`ops/cpu/gemm.rs`).
    pub gemm: GemmChoice,
    /// `VIT_BLAS`: a system BLAS to load for the matrix products, if any
    /// (`ops/cpu/gemm.rs`). It takes precedence over `VIT_GEMM`.
    pub blas: BlasChoice,
}

/// `VIT_SIMD`: `baseline` → SSE2 only; `avx2` → at most AVX2; unset or any other value →
/// no cap (AVX-512 where the CPU has it). Other values are accepted silently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SimdCap {
    Uncapped,
    Avx2,
    Baseline,
}

/// `VIT_GEMM`: `rust` or `gemm` → the `gemm` crate for every product; unset, empty, `vit`
/// or `auto` → our own kernel for the large products where the CPU has avx512f; any other
/// value → the same, with a warning (once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GemmChoice {
    Vit,
    Rust,
}

/// `VIT_BLAS`: unset, empty, `none` or `gemm` → no system BLAS; `auto` → the first of MKL,
/// OpenBLAS, BLIS that loads; anything else → the library of that name or path. Whether it
/// loads is found out (and warned about) where it is loaded, `ops/cpu/gemm.rs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BlasChoice {
    None,
    Auto,
    Library(String),
}

impl SimdCap {
    /// Whether the cap allows AVX-512.
    pub(crate) fn allows_avx512(self) -> bool {
        self == SimdCap::Uncapped
    }

    /// Whether the cap allows AVX2.
    pub(crate) fn allows_avx2(self) -> bool {
        self != SimdCap::Baseline
    }

    fn parse(value: Option<&str>) -> SimdCap {
        match value {
            Some("baseline") => SimdCap::Baseline,
            Some("avx2") => SimdCap::Avx2,
            _ => SimdCap::Uncapped,
        }
    }
}

impl GemmChoice {
    fn parse(value: Option<&str>) -> GemmChoice {
        match value {
            Some("rust") | Some("gemm") => GemmChoice::Rust,
            None | Some("") | Some("vit") | Some("auto") => GemmChoice::Vit,
            Some(other) => {
                // Only where our own kernel exists does the choice mean anything.
                #[cfg(target_arch = "x86_64")]
                tracing::warn!("VIT_GEMM={other}: unknown (rust or vit); using vit");
                let _ = other;
                GemmChoice::Vit
            }
        }
    }
}

impl BlasChoice {
    pub(crate) fn parse(value: Option<&str>) -> BlasChoice {
        match value {
            None | Some("") | Some("none") | Some("gemm") => BlasChoice::None,
            Some("auto") => BlasChoice::Auto,
            Some(lib) => BlasChoice::Library(lib.to_string()),
        }
    }

    /// The variable's value as given (`None` when it asks for no BLAS), for messages.
    pub(crate) fn value(&self) -> Option<&str> {
        match self {
            BlasChoice::None => None,
            BlasChoice::Auto => Some("auto"),
            BlasChoice::Library(lib) => Some(lib),
        }
    }
}

impl Settings {
    /// The settings these values of `VIT_SIMD`, `VIT_GEMM` and `VIT_BLAS` select.
    pub(crate) fn parse(simd: Option<&str>, gemm: Option<&str>, blas: Option<&str>) -> Settings {
        Settings {
            simd_cap: SimdCap::parse(simd),
            gemm: GemmChoice::parse(gemm),
            blas: BlasChoice::parse(blas),
        }
    }

    /// The settings of this process's environment, read now.
    fn from_env() -> Settings {
        let var = |name| std::env::var(name).ok();
        Settings::parse(
            var("VIT_SIMD").as_deref(),
            var("VIT_GEMM").as_deref(),
            var("VIT_BLAS").as_deref(),
        )
    }
}

/// The process's settings, read from the environment on the first call (warnings for
/// unknown values are logged then, once) and fixed from then on: setting a variable later
/// changes nothing.
pub(crate) fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(Settings::from_env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_as_documented() {
        let s = Settings::parse(None, None, None);
        assert_eq!(
            s,
            Settings {
                simd_cap: SimdCap::Uncapped,
                gemm: GemmChoice::Vit,
                blas: BlasChoice::None
            }
        );
        for (v, cap) in [
            ("baseline", SimdCap::Baseline),
            ("avx2", SimdCap::Avx2),
            ("avx512", SimdCap::Uncapped),
            ("", SimdCap::Uncapped),
            ("AVX2", SimdCap::Uncapped),
        ] {
            assert_eq!(SimdCap::parse(Some(v)), cap, "{v}");
        }
        assert!(SimdCap::Uncapped.allows_avx512() && SimdCap::Uncapped.allows_avx2());
        assert!(!SimdCap::Avx2.allows_avx512() && SimdCap::Avx2.allows_avx2());
        assert!(!SimdCap::Baseline.allows_avx512() && !SimdCap::Baseline.allows_avx2());
        for (v, g) in [
            ("rust", GemmChoice::Rust),
            ("gemm", GemmChoice::Rust),
            ("vit", GemmChoice::Vit),
            ("auto", GemmChoice::Vit),
            ("", GemmChoice::Vit),
            ("blas", GemmChoice::Vit),
        ] {
            assert_eq!(GemmChoice::parse(Some(v)), g, "{v}");
        }
        for v in ["", "none", "gemm"] {
            assert_eq!(BlasChoice::parse(Some(v)), BlasChoice::None, "{v}");
        }
        assert_eq!(BlasChoice::parse(Some("auto")), BlasChoice::Auto);
        let lib = BlasChoice::parse(Some("/opt/libblis.so"));
        assert_eq!(lib, BlasChoice::Library("/opt/libblis.so".into()));
        assert_eq!(lib.value(), Some("/opt/libblis.so"));
        assert_eq!(BlasChoice::Auto.value(), Some("auto"));
        assert_eq!(BlasChoice::None.value(), None);
    }

    #[test]
    fn settings_are_the_environment_read_once() {
        assert!(std::ptr::eq(settings(), settings()));
        assert_eq!(*settings(), Settings::from_env());
    }
}
