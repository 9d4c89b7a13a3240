//! Process-wide CPU settings for fast numeric work, applied once at start-up by the `vit`
//! binary (and by library users who call [`init`] before building tensors).
//!
//! - Allocator: glibc hands blocks above its mmap threshold back to the kernel on every
//!   free, and trims the heap top eagerly, so each training step re-faults and re-zeroes
//!   its activation buffers (≈20% of a step in `perf`). Raising both thresholds keeps freed
//!   buffers in the process for reuse; peak memory is unchanged.
//! - Threads: our fused kernels (and the `gemm` provider under them) run on rayon's global
//!   pool, one thread per core. candle runs its own elementwise ops on a second pool of
//!   spinning workers, which take cores from ours between ops (≈20% of samples spinning,
//!   and a training step 25% slower at batch 64). The elementwise work left to candle
//!   (residual adds, gradient sums) is small, so unless `CANDLE_NUM_THREADS` is set, candle's
//!   pool gets no workers and that work runs on the calling thread: one pool in all.

/// Applies the settings above. Idempotent; a no-op where they do not apply. Call it first
/// thing in `main`, before any thread starts (it sets an environment variable).
pub fn init() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called with valid options.
    unsafe {
        const MB: libc::c_int = 1 << 20;
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 * MB);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * MB);
    }
}
