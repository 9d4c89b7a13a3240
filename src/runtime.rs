//! Process-wide CPU settings for fast numeric work, applied once at start-up by the `vit`
//! binary (and by library users who call [`init`] before building tensors); also the panic
//! hook that keeps image decoders' caught panics quiet (`files::quiet_decoder_panics`).
//!
//! - Allocator: glibc hands blocks above its mmap threshold back to the kernel on every
//!   free, and trims the heap top eagerly, so each training step re-faults and re-zeroes
//!   its activation buffers (≈20% of a step in `perf`). Raising both thresholds keeps freed
//!   buffers in the process for reuse; peak memory is unchanged. One arena for all
//!   threads: training runs two shards of a batch on two threads, and with glibc's
//!   per-thread arenas a buffer freed by one is not reused by the other (peak memory of the
//!   TRAIN-FM benchmark 1,735 MiB with per-thread arenas, 1,267 MiB with one).
//! - Threads: our fused kernels (and the `gemm` provider under them) run on rayon's global
//!   pool, one thread per core. candle runs its own elementwise ops on a second pool of
//!   spinning workers, which take cores from ours between ops (≈20% of samples spinning,
//!   and a training step 25% slower at batch 64). The elementwise work left to candle
//!   (residual adds, gradient sums) is small, so unless `CANDLE_NUM_THREADS` is set, candle's
//!   pool gets no workers and that work runs on the calling thread: one pool in all. The
//!   processes of a data-parallel job on one machine (`mpirun -np N`) each get an equal
//!   share of its cores (unless `RAYON_NUM_THREADS` is set).
//! - System BLAS (used for matrix products when one is installed, see `ops/cpu/gemm.rs`):
//!   OpenBLAS 0.3.21 (Debian 12's) does not recognise AVX-512 AMD CPUs
//!   (Zen 4) and runs its AVX2 "Haswell" kernels there; on such a CPU, unless
//!   `OPENBLAS_CORETYPE` is set, we point it at its AVX-512 "SkylakeX" kernels, which the
//!   CPU runs (ViT-B/16 inference 1.45x faster here).

#![deny(clippy::undocumented_unsafe_blocks)]

/// Applies the settings above. Idempotent; a no-op where they do not apply. Call it first
/// thing in `main`, before any thread starts (it sets an environment variable).
pub fn init() {
    crate::files::quiet_decoder_panics();
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // Processes of a data-parallel job on this machine share its cores equally.
    if let Some(local) = crate::dist::local_processes().filter(|&n| n > 1) {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            std::env::set_var("RAYON_NUM_THREADS", (cores / local).max(1).to_string());
        }
    }
    if std::env::var_os("OPENBLAS_CORETYPE").is_none() && amd_with_avx512() {
        std::env::set_var("OPENBLAS_CORETYPE", "SkylakeX");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called with valid options.
    unsafe {
        const MB: libc::c_int = 1 << 20;
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 * MB);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * MB);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Whether this is an AMD CPU with the AVX-512 subsets OpenBLAS's SkylakeX kernels use.
fn amd_with_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let id = std::arch::x86_64::__cpuid(0); // leaf 0: the vendor string

        let amd = (id.ebx, id.edx, id.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163); // "AuthenticAMD"
        amd && has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Puts the calling thread at the lowest scheduling priority (`nice` 19 on Linux, where
/// priorities are per thread), so background work such as image decoding runs on cores
/// the model's threads leave idle instead of competing with them. A no-op elsewhere or if
/// refused.
pub fn lowest_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid has no preconditions; setpriority only reads its integer arguments
    // and affects the calling thread alone.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

#[cfg(test)]
mod tests {
    /// The nice value of the calling thread, from `/proc/thread-self/stat` (field 19).
    #[cfg(target_os = "linux")]
    fn thread_nice() -> i64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn lowest_priority_applies_to_the_calling_thread_only() {
        let before = thread_nice();
        let worker = std::thread::spawn(|| {
            super::lowest_thread_priority();
            thread_nice()
        })
        .join()
        .unwrap();
        assert_eq!(worker, 19);
        assert_eq!(thread_nice(), before);
    }
}
