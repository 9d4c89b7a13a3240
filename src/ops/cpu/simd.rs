//! Run-time choice of instruction set for the kernels' loops: [`dispatch`] (and the
//! [`simd!`] macro over it) runs a closure compiled for AVX-512, AVX2 or plain SSE2, the
//! widest this CPU has and `VIT_SIMD` allows, with identical results on each.

use super::settings::settings;

/// Runs `f` compiled for the widest vector registers this CPU has (AVX-512, else AVX2,
/// else the portable SSE2 build), chosen at run time. The kernels' loops are plain scalar
/// Rust that the compiler vectorises; inlined into [`avx512`] or [`avx2`] they get 16 or 8
/// lanes instead of SSE2's 4, with no build flag needed. Every version does the same
/// operations in the same order (Rust never fuses a multiply and an add on its own, and
/// row sums have fixed lanes), so results are identical bit for bit on every CPU (tested).
#[inline(always)]
pub(super) fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    match simd_level() {
        // SAFETY: simd_level() says Avx512 only after detecting every feature avx512()
        // enables (avx512f/vl/bw/dq, avx2, fma, bmi1, bmi2) on this CPU.
        SimdLevel::Avx512 => return unsafe { avx512(f) },
        // SAFETY: simd_level() says Avx2 only after detecting avx2, fma, bmi1 and bmi2, the
        // features avx2() enables.
        SimdLevel::Avx2 => return unsafe { avx2(f) },
        SimdLevel::Baseline => {}
    }
    f()
}

/// `simd!(expr)`: evaluates `expr` (typically a call to an `#[inline(always)]` kernel)
/// through [`dispatch`], so its loops are compiled for each instruction set.
macro_rules! simd {
    ($e:expr) => {
        $crate::ops::cpu::simd::dispatch(
            #[inline(always)]
            || $e,
        )
    };
}
pub(super) use simd;

/// The vector instruction sets [`dispatch`] can compile for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SimdLevel {
    Avx512,
    Avx2,
    Baseline,
}

/// The level [`dispatch`] uses on this CPU (`VIT_SIMD=baseline|avx2` lowers it, for
/// comparison: [`SimdCap`](super::settings::SimdCap)).
pub(crate) fn simd_level() -> SimdLevel {
    static LEVEL: std::sync::OnceLock<SimdLevel> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = settings().simd_cap;
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("bmi1") && has!("bmi2");
            let avx512 = avx2 && has!("avx512f") && has!("avx512vl") && has!("avx512bw");
            if avx512 && has!("avx512dq") && cap.allows_avx512() {
                return SimdLevel::Avx512;
            }
            if avx2 && cap.allows_avx2() {
                return SimdLevel::Avx2;
            }
        }
        let _ = cap;
        SimdLevel::Baseline
    })
}

/// `f` compiled with AVX-512 (what [`dispatch`] inlines the kernels' loops into).
///
/// # Safety
/// The CPU must have every feature enabled here (as [`simd_level`] checks for
/// [`SimdLevel::Avx512`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi1,bmi2")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `f` compiled with AVX2 and FMA.
///
/// # Safety
/// The CPU must have avx2, fma, bmi1 and bmi2 (as [`simd_level`] checks for
/// [`SimdLevel::Avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi1,bmi2")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    use super::super::gelu;
    use super::super::math::{dot, exp, max, sum};

    /// The kernels' building blocks, as the kernels use them, over values covering their
    /// ranges; the bit patterns of the results.
    #[inline(always)]
    fn building_blocks(xs: &[f32]) -> Vec<u32> {
        let mut out = Vec::new();
        for chunk in xs.chunks(37) {
            out.push(sum(chunk).to_bits());
            out.push(dot(chunk, xs).to_bits());
            out.push(max(chunk).to_bits());
        }
        for &x in xs {
            out.push(exp(x).to_bits());
            out.push(gelu::cdf(x).to_bits());
            out.push(gelu::derivative(x).to_bits());
        }
        out
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let xs: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.0) * 0.0131).collect();
        let portable = building_blocks(&xs);
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("bmi1") && has!("bmi2") {
                // SAFETY: the features were just detected.
                let v = unsafe {
                    super::avx2(
                        #[inline(always)]
                        || building_blocks(&xs),
                    )
                };
                assert!(v == portable, "AVX2 results differ");
            }
            if super::simd_level() == super::SimdLevel::Avx512 {
                // SAFETY: simd_level checked the features.
                let v = unsafe {
                    super::avx512(
                        #[inline(always)]
                        || building_blocks(&xs),
                    )
                };
                assert!(v == portable, "AVX-512 results differ");
            }
        }
    }
}
