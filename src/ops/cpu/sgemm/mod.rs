//! Our own single-threaded sgemm (BLIS/GotoBLAS style), with an AVX-512 micro-kernel
//! ([`avx512`]: 12 × 32 tiles), an AVX2 + FMA one ([`avx2`]: 6 × 16 tiles) and, for
//! inference with `--dtype bf16`, an AVX512_BF16 one ([`bf16`]: operands rounded to
//! bfloat16 when packed, f32 sums), the blocking loops below generic over them ([`Isa`]);
//! see [`super::gemm`] for when each runs.
//!
//! Blocking, for `dst (m, n) = scale · lhs (m, k) · rhs (k, n)`:
//!
//! ```text
//! for each column block of nc columns (jc)              packed B: kc × nc, in L2/L3
//!   for each depth block of kc (pc)       ── pack B (kc × nc) into NR-wide column panels
//!     for each row block of mc rows (ic)  ── pack A (mc × kc) into MR-tall row panels (L2)
//!       for each NR-wide panel of B (jr)            B micro-panel kc × NR, L1/L2
//!         for each MR-tall panel of A (ir)          A micro-panel MR × kc, from L2
//!           micro-kernel: an MR × NR tile of dst += A panel · B panel
//! ```
//!
//! Packing absorbs every stride: a row-major operand is copied with vector loads, a
//! transposed one (the `x · Wᵀ` of a linear layer, the `Q Kᵀ` of attention) goes through a
//! 16 × 16 in-register transpose, any other view element by element. Panels are zero-padded
//! to whole MR × NR tiles, so the micro-kernel has no edge cases; the edges of `dst` are
//! written with masked loads and stores (or through a small tile when its column stride is
//! not 1). The micro-kernel keeps an MR × NR = 12 × 32 tile in 24 zmm accumulators; each
//! step of k loads two vectors of packed B and broadcasts twelve elements of packed A into
//! 24 `vfmadd231ps`, so the two 512-bit FMA pipes of a Zen 5 core stay busy (4-cycle
//! latency × 2 pipes needs at least 8 independent chains; 24 leave room for the loads).
//!
//! A right-hand side used by many products (a linear layer's weight Wᵀ, the same for every
//! row block of a forward) can be packed once beforehand: [`PackedB`] holds every (kc, nc)
//! block of B in the panel layout `pack_b` writes (column block jc, depth block pc at float
//! `jc·k + ncb_padded·pc`, all on cache lines), with kc and nc fixed from (k, n) at pack
//! time, and [`sgemm_packed`] runs the same micro-kernel over it with the loops reordered:
//!
//! ```text
//! for each depth block of kc (pc)
//!   for each row block of mc rows (ic)    ── pack A once, for every column block
//!     for each column block of nc (jc)    ── packed B block, from L3
//!       for each NR-wide panel, each MR-tall panel: micro-kernel (as above)
//! ```
//!
//! The depth blocks are the same as [`sgemm`]'s and stay outermost, so each element of dst
//! sums the same partial products in the same order: the two agree bit for bit.
//!
//! The depth block is split evenly (k = 768 → 1 × 768, k = 3072 → 4 × 768, k = 197 →
//! 1 × 197) and so are the row and column blocks, all by shape only: the result is a fixed
//! function of the inputs. Packing buffers live in thread-local storage, reused from call to
//! call (the kernels run `sgemm` from rayon's workers concurrently, one product per thread).
//!
//! Choices, measured on one core of the 2-core AMD EPYC (Zen 5) of BENCHMARKS.md with
//! `tests::bench_against_gemm_crate` and `tests::bench_blocking` (GFLOP/s; the machine's
//! noise is about ±5%):
//!
//! - tile: 12 × 32 against 8 × 48, 14 × 32 and 6 × 64. All reach 190–220 on products that
//!   fit in cache; 8 × 48 wastes a third of its tile on attention's 64-wide heads (PV:
//!   122 against 169) and 6 × 64 is slowest on the large layers; 14 × 32 ties with 12 × 32,
//!   which wastes less of the 128-row blocks of the linear layers.
//! - kc = 768, mc = 144, nc = 960: kc ≥ 384 beats 256 on ViT-B/16's layers by 5–10% (fewer
//!   passes over dst and longer runs when packing a transposed weight); mc and nc within
//!   noise.
//!
//! | product (m × n × k)              | ours    | `gemm` crate |
//! |----------------------------------|---------|--------------|
//! | B/16 qkv, x·Wᵀ, 128 × 2304 × 768 | 136–142 | 139          |
//! | B/16 proj, 128 × 768 × 768       | 158–179 | 157–163      |
//! | B/16 fc1, 128 × 3072 × 768       | 141     | 140–141      |
//! | B/16 fc2, 128 × 768 × 3072       | 151–158 | 76–79        |
//! | FM fc1, 128 × 768 × 192          | 197–198 | 189–193      |
//! | FM fc2, 128 × 192 × 768          | 187–196 | 166–173      |
//! | FM qkv dx, G·W, 400 × 192 × 576  | 202     | 219–222      |
//! | FM qkv dW, Gᵀ·x, 576 × 192 × 400 | 217–220 | 199–201      |
//! | B/16 attention QKᵀ, 197² × 64    | 169–172 | 169–170      |
//! | B/16 attention PV, 197 × 64 × 197| 166–172 | 214–221      |
//! | FM attention PV, 50 × 64 × 50    | 139–143 | 200–207      |
//!
//! The large layers stay below the in-cache rate because each 128-row block packs the whole
//! weight again (7–9 MB, from L3) for only 128 uses of each element: hence [`PackedB`],
//! which the linear layer's forward packs once for all its row blocks. One run of the
//! benchmark with a "packed" column (B packed once outside the timing), on a machine busy
//! with another job (±30% noise), ours / packed / `gemm`: qkv 128 / 173 / 133, proj
//! 143 / 163 / 150, fc1 91 / 159 / 87, fc2 94 / 91 / 52. A profile (`perf`) of ViT-B/16
//! inference: the packing of B fell from 20% of the samples to 2% (the one packing per
//! layer), the micro-kernel rose from 50% to 62%; per forward of 8 images, 1.74 CPU
//! seconds against 2.15 (packing per block) and 2.60 (`VIT_GEMM=rust`). Row blocks of 396
//! or 792 instead of 128 measured the same within noise.
//!
//! End to end (`vit bench`, alternating with `VIT_GEMM=rust`, another training job
//! sharing the machine): ViT-B/16 inference 3.4–3.7 against 2.6–3.1 images/s before
//! [`PackedB`], 4.4–4.7 (one outlier at 3.4) against 2.7–2.9 with it; a
//! TRAIN-FM step took 5–10% longer when this kernel ran its products (forward 670–730
//! against 600–640 ms), though they tie in isolation. Hence the rule in [`super::gemm`]:
//! this kernel for large products only (m·n·k ≥ 2^26, n, k ≥ 128), the `gemm` crate below.
//!
//! The AVX2 kernel (CPUs without AVX-512; `VIT_SIMD=avx2` on those with it) has the same
//! loops with 6 × 16 tiles and kc = 256. Against the `gemm` crate's AVX2 kernels (a build
//! without the `avx512` feature), one Zen 5 core held to 256-bit vectors,
//! `bench_against_gemm_crate` (GFLOP/s, ours / ours with B packed once / `gemm`): the
//! ViT-B/16 layers 121–123 / 125–128 / 115–119, TRAIN-FM's forward products 122–125 /
//! 126–130 / 118–119, their backward products 126–129 / 123–132 / 123–133, attention's PV
//! 109–118 / 108–121 / 119–129, QKᵀ 83–119 / 89–121 / 79–115. Both run at 85–100% of the
//! core's 256-bit FMA rate, so the same rule holds: ours for the large products, where
//! its B packed once per layer gives 5–10%, the crate below.

// The AVX-512 intrinsics are stable since Rust 1.89, as is the `avx512f` target feature
// that `super::simd::dispatch` already enables: the crate needs 1.89 whatever Cargo.toml's
// `rust-version` says.

mod avx2;
mod avx512;
mod bf16;

use std::cell::Cell;

use super::gelu::gelu_in_place;
use super::matrix::MatRef;

pub(super) use avx512::{mask, transpose16};
pub(crate) use bf16::available as bf16_available;

/// Callers that split the rows of a product among tasks split them at multiples of this, a
/// multiple of every micro-kernel's MR (12 and 6), so only the product's last tile is partial.
pub(crate) const MR: usize = 12;
const _: () = assert!(MR.is_multiple_of(avx512::Avx512::MR) && MR.is_multiple_of(avx2::Avx2::MR));

/// The instruction set of our micro-kernels a product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    /// avx512f: [`avx512::Avx512`].
    Avx512,
    /// avx2 + fma: [`avx2::Avx2`].
    Avx2,
    /// avx512f + avx512bf16, operands rounded to bfloat16 (inference only): [`bf16::Bf16`].
    Bf16,
}

/// `on_isa!(level, I => expr)`: `expr` with `I` the [`Isa`] of `level`.
macro_rules! on_isa {
    ($level:expr, $I:ident => $body:expr) => {
        match $level {
            Level::Avx512 => {
                type $I = avx512::Avx512;
                $body
            }
            Level::Avx2 => {
                type $I = avx2::Avx2;
                $body
            }
            Level::Bf16 => {
                type $I = bf16::Bf16;
                $body
            }
        }
    };
}

/// One instruction set's micro-kernel and packing, which the blocking loops are generic over.
pub(super) trait Isa {
    /// Rows of the micro-tile.
    const MR: usize;
    /// Columns of the micro-tile, a multiple of 16 (rows of a packed B panel fill cache lines).
    const NR: usize;
    /// The cache blocking of [`sgemm_with`] and [`PackedB`].
    const BLOCKING: Blocking;

    /// The micro-kernel: the mr × nr corner (mr ≤ MR, nr ≤ NR) of
    /// `scale · A panel (MR × kc) · B panel (kc × NR)` stored to `c` (row stride `c_rs`,
    /// column stride 1), or added to it with `accumulate`, then the epilogue: + bias (as
    /// `fmadd(acc, scale, bias)`; only without `accumulate`), then GELU over the stored tile.
    ///
    /// # Safety
    /// The CPU has the instruction set; `a` holds kc·MR floats, `b` kc·NR floats and is
    /// 64-byte aligned; `c` covers the mr × nr corner; the epilogue's bias, if any, holds nr
    /// floats.
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        c_rs: usize,
        mr: usize,
        nr: usize,
        scale: f32,
        accumulate: bool,
        epi: Epilogue,
    );

    /// Packs the (kc, nc) block `src` of B into NR-wide column panels: panel q holds
    /// columns q·NR.. as kc rows of NR floats (zero past column nc), at `out + q·kc·NR`.
    ///
    /// # Safety
    /// The CPU has the instruction set; `src` covers kc × nc; `out` holds
    /// kc · nc.next_multiple_of(NR) floats, 64-byte aligned.
    unsafe fn pack_b(kc: usize, nc: usize, src: MatRef, out: *mut f32);

    /// Packs the (mc, kc) block `src` of A into MR-tall row panels: panel q holds rows
    /// q·MR.. as kc columns of MR floats (zero past row mc), at `out + q·kc·MR`.
    ///
    /// # Safety
    /// The CPU has the instruction set; `src` covers mc × kc; `out` holds
    /// mc.next_multiple_of(MR) · kc floats.
    unsafe fn pack_a(mc: usize, kc: usize, src: MatRef, out: *mut f32);
}

/// Cache blocking: depth (kc), rows (mc, a multiple of the kernel's MR) and columns (nc, a
/// multiple of its NR) of the packed blocks, upper bounds (the actual blocks split each dimension
/// evenly).
#[derive(Clone, Copy, Debug)]
pub(super) struct Blocking {
    pub kc: usize,
    pub mc: usize,
    pub nc: usize,
}

/// 64 bytes, 64-byte aligned: the unit of the packing buffers, so packed panels start on
/// cache lines and the micro-kernel's loads of packed B are aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

thread_local! {
    /// This thread's packing buffers (A, B), kept between calls.
    static PACK: Cell<(Vec<Line>, Vec<Line>)> = const { Cell::new((Vec::new(), Vec::new())) };
}

/// `dst (m, n) = scale · lhs (m, k) · rhs (k, n)`, or `dst += …` with `accumulate`; the
/// contract of [`super::gemm::sgemm`], with m, n, k ≥ 1.
///
/// # Safety
/// The CPU must have `level`'s instruction set. Every view must cover its matrix inside one
/// live allocation, and `dst` must not overlap `lhs` or `rhs` or be written concurrently.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sgemm(
    level: Level,
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
    // SAFETY: the caller's contract, passed on.
    unsafe {
        on_isa!(level, I => sgemm_with::<I>(
            I::BLOCKING,
            m,
            n,
            k,
            dst,
            dst_rs,
            dst_cs,
            lhs,
            rhs,
            scale,
            accumulate,
        ))
    }
}

/// [`sgemm`] with the given blocking (the microbenchmark tries others).
///
/// # Safety
/// As [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sgemm_with<I: Isa>(
    bl: Blocking,
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
    debug_assert!(m > 0 && n > 0 && k > 0);
    debug_assert!(bl.nc.is_multiple_of(I::NR));
    // Even splits of each dimension into blocks no larger than the bounds.
    let kc = split(k, bl.kc, 1);
    let mc = split(m, bl.mc, I::MR);
    let nc = split(n, bl.nc, I::NR);

    let (mut a_buf, mut b_buf) = PACK.take();
    grow(&mut a_buf, mc.min(m.next_multiple_of(I::MR)) * kc);
    grow(&mut b_buf, nc.min(n.next_multiple_of(I::NR)) * kc);
    let a_pack = a_buf.as_mut_ptr() as *mut f32;
    let b_pack = b_buf.as_mut_ptr() as *mut f32;

    // SAFETY: the packing buffers hold the blocks just sized; the caller's views cover
    // their matrices, and every block below stays inside them (offsets are < m, n, k).
    unsafe {
        for jc in (0..n).step_by(nc) {
            let ncb = nc.min(n - jc);
            for pc in (0..k).step_by(kc) {
                let kcb = kc.min(k - pc);
                I::pack_b(kcb, ncb, rhs.at(pc, jc), b_pack);
                // Later depth blocks add onto the earlier ones' result.
                let acc = accumulate || pc > 0;
                let c = dst.add(jc * dst_cs);
                let lhs = lhs.at(0, pc);
                macro_block::<I>(
                    m, mc, ncb, kcb, lhs, a_pack, b_pack, c, dst_rs, dst_cs, scale, acc,
                );
            }
        }
    }
    PACK.set((a_buf, b_buf));
}

/// Grows a packing buffer to hold at least `floats` floats.
fn grow(buf: &mut Vec<Line>, floats: usize) {
    let lines = floats.div_ceil(16);
    if buf.len() < lines {
        *buf = vec![Line([0.0; 16]); lines];
    }
}

/// An even split of `len` into blocks of at most `max`, each rounded up to a multiple of
/// `unit`: the block size.
fn split(len: usize, max: usize, unit: usize) -> usize {
    let blocks = len.div_ceil(max);
    len.div_ceil(blocks).next_multiple_of(unit)
}

/// The product of all m rows of `lhs` (m, kcb) with one packed (kcb, ncb) block of B at
/// `b_pack`, into `c` (m, ncb): for each block of mc rows, pack A and run [`tiles`].
///
/// # Safety
/// The instruction set of `I`; `lhs` covers m × kcb, `b_pack` holds the packed block
/// (64-byte aligned), `a_pack` mc.min(m.next_multiple_of(MR)) · kcb floats, `c` covers
/// m × ncb under (c_rs, c_cs) and is not written concurrently.
#[allow(clippy::too_many_arguments)]
unsafe fn macro_block<I: Isa>(
    m: usize,
    mc: usize,
    ncb: usize,
    kcb: usize,
    lhs: MatRef,
    a_pack: *mut f32,
    b_pack: *const f32,
    c: *mut f32,
    c_rs: usize,
    c_cs: usize,
    scale: f32,
    acc: bool,
) {
    // SAFETY: every offset below stays inside the blocks the caller vouches for.
    unsafe {
        for ic in (0..m).step_by(mc) {
            let mcb = mc.min(m - ic);
            I::pack_a(mcb, kcb, lhs.at(ic, 0), a_pack);
            let c = c.add(ic * c_rs);
            tiles::<I>(
                mcb,
                ncb,
                kcb,
                a_pack,
                b_pack,
                c,
                c_rs,
                c_cs,
                scale,
                acc,
                Epilogue::NONE,
            );
        }
    }
}

/// The micro-kernel over every MR × NR tile of a packed (mcb, kcb) block of A times a packed
/// (kcb, ncb) block of B, into `c` (mcb, ncb). The loops shared by [`sgemm_with`] and
/// [`sgemm_packed`], so the two round identically.
///
/// # Safety
/// The instruction set of `I`; `a_pack` and `b_pack` hold the packed blocks (B 64-byte
/// aligned), `c` covers mcb × ncb under (c_rs, c_cs) and is not written concurrently.
#[allow(clippy::too_many_arguments)]
unsafe fn tiles<I: Isa>(
    mcb: usize,
    ncb: usize,
    kcb: usize,
    a_pack: *const f32,
    b_pack: *const f32,
    c: *mut f32,
    c_rs: usize,
    c_cs: usize,
    scale: f32,
    acc: bool,
    epi: Epilogue,
) {
    // SAFETY: every panel and tile below lies inside the blocks the caller vouches for.
    unsafe {
        for jr in (0..ncb).step_by(I::NR) {
            let nr = I::NR.min(ncb - jr);
            let b_panel = b_pack.add(jr * kcb);
            let epi = epi.at(jr);
            for ir in (0..mcb).step_by(I::MR) {
                let mr = I::MR.min(mcb - ir);
                let a_panel = a_pack.add(ir * kcb);
                let c = c.add(ir * c_rs + jr * c_cs);
                if c_cs == 1 {
                    I::kernel(kcb, a_panel, b_panel, c, c_rs, mr, nr, scale, acc, epi);
                } else {
                    kernel_strided::<I>(
                        kcb, a_panel, b_panel, c, c_rs, c_cs, mr, nr, scale, acc, epi,
                    );
                }
            }
        }
    }
}

/// What the micro-kernel applies to the tiles it writes: a bias per column added to the
/// product, then exact GELU (the fused linear layer's bias and activation, done while the
/// tile is in registers or L1 rather than in passes over the whole output).
#[derive(Clone, Copy)]
pub(crate) struct Epilogue {
    /// The bias of the tile's first column (null: none).
    bias: *const f32,
    gelu: bool,
}

impl Epilogue {
    /// Nothing: dst is the scaled product (plus dst with `accumulate`).
    pub(crate) const NONE: Epilogue = Epilogue {
        bias: std::ptr::null(),
        gelu: false,
    };

    /// `bias` (one value per column of dst) added, then GELU when `gelu`.
    pub(crate) fn new(bias: Option<&[f32]>, gelu: bool) -> Epilogue {
        Epilogue {
            bias: bias.map_or(std::ptr::null(), |b| b.as_ptr()),
            gelu,
        }
    }

    /// The epilogue of the tiles starting at column `j` (relative to this one's).
    ///
    /// # Safety
    /// Column j must lie inside the bias, if any.
    unsafe fn at(self, j: usize) -> Epilogue {
        let bias = if self.bias.is_null() {
            self.bias
        } else {
            // SAFETY: the caller's contract: column j lies inside the bias.
            unsafe { self.bias.add(j) }
        };
        Epilogue {
            bias,
            gelu: self.gelu,
        }
    }

    /// This epilogue for one depth block of a product: the bias goes with the first block
    /// (it is added once), GELU with the last (it applies to the finished sum).
    fn for_depth_block(self, first: bool, last: bool) -> Epilogue {
        Epilogue {
            bias: if first { self.bias } else { std::ptr::null() },
            gelu: self.gelu && last,
        }
    }
}

/// A right-hand side B (k, n) packed once for many products `lhs · B` (a layer's weight
/// Wᵀ, shared by every row block of a forward): every (kc, nc) block in the panel layout
/// the micro-kernel reads, with the depth and column blocking fixed at pack time. Read-only
/// after construction, so it is shared across threads.
pub(crate) struct PackedB {
    /// The micro-kernel the panels are laid out for.
    level: Level,
    k: usize,
    n: usize,
    /// Depth block, as [`sgemm`] splits k (so products round as [`sgemm`]'s do).
    kc: usize,
    /// Column block, a multiple of the kernel's NR.
    nc: usize,
    /// Column block jc (its first column), depth block pc (its first row) start at float
    /// `jc · k + ncb.next_multiple_of(NR) · pc`, as [`Isa::pack_b`] lays out a block; in
    /// all n.next_multiple_of(NR) · k floats, every block on a cache line.
    buf: Vec<Line>,
}

impl PackedB {
    /// Packs `rhs` (k, n), any strides, for `level`'s kernel with [`sgemm`]'s blocking; the
    /// panels are packed in parallel on rayon's pool (a copy: the result does not depend
    /// on the threads).
    ///
    /// # Safety
    /// The CPU must have `level`'s instruction set; `rhs` must cover its (k, n) matrix
    /// inside one live allocation, unmodified during the call. k, n ≥ 1.
    pub(crate) unsafe fn new(level: Level, k: usize, n: usize, rhs: MatRef) -> PackedB {
        // SAFETY: the caller's contract, passed on.
        unsafe { on_isa!(level, I => Self::new_for::<I>(level, k, n, rhs)) }
    }

    /// [`PackedB::new`] for the kernel `I` of `level`.
    ///
    /// # Safety
    /// As [`PackedB::new`].
    unsafe fn new_for<I: Isa>(level: Level, k: usize, n: usize, rhs: MatRef) -> PackedB {
        use rayon::prelude::*;
        debug_assert!(k > 0 && n > 0);
        let (nr, bl) = (I::NR, I::BLOCKING);
        let kc = split(k, bl.kc, 1);
        let nc = split(n, bl.nc, nr);
        // Not zeroed first (a serial pass over the whole weight): the panels below tile the
        // buffer and pack_b writes every float of its panel, padding included.
        let lines = (n.next_multiple_of(nr) * k).div_ceil(16);
        let mut buf: Vec<std::mem::MaybeUninit<Line>> = Vec::with_capacity(lines);
        // SAFETY: MaybeUninit elements need no initialisation.
        unsafe { buf.set_len(lines) };
        // One task per NR-wide panel of each block: (float offset, depth block, first column).
        let mut panels = Vec::new();
        for jc in (0..n).step_by(nc) {
            let ncb_pad = nc.min(n - jc).next_multiple_of(nr);
            for pc in (0..k).step_by(kc) {
                let kcb = kc.min(k - pc);
                for jr in (0..ncb_pad).step_by(nr) {
                    panels.push((jc * k + ncb_pad * pc + jr * kcb, pc, jc + jr));
                }
            }
        }
        debug_assert_eq!(
            panels
                .iter()
                .map(|&(_, pc, _)| kc.min(k - pc) * nr)
                .sum::<usize>(),
            lines * 16
        );
        let out = super::par::SendPtr(buf.as_mut_ptr() as *mut f32);
        panels.par_iter().for_each(|&(off, pc, j0)| {
            let kcb = kc.min(k - pc);
            // SAFETY: panel (pc, j0) is inside rhs; its kcb · NR floats at `off` lie inside
            // buf, on a cache line (every term of `off` is a multiple of 16), and belong to
            // this task alone. The instruction set is the caller's.
            unsafe { I::pack_b(kcb, nr.min(n - j0), rhs.at(pc, j0), out.get().add(off)) };
        });
        let mut buf = std::mem::ManuallyDrop::new(buf);
        // SAFETY: the panels wrote every float (above); MaybeUninit<Line> has Line's layout.
        let buf =
            unsafe { Vec::from_raw_parts(buf.as_mut_ptr().cast::<Line>(), lines, buf.capacity()) };
        PackedB {
            level,
            k,
            n,
            kc,
            nc,
            buf,
        }
    }

    /// Columns of B.
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// The kernel the panels are laid out for.
    pub(crate) fn level(&self) -> Level {
        self.level
    }
}

/// [`sgemm`] with the right-hand side packed beforehand, and an epilogue:
/// `dst (m, n) = act(scale · lhs (m, k) · B + bias)`, or `dst = act(dst + scale · lhs · B)`
/// with `accumulate` (no bias then), for the (k, n) of `b`, with the bias and activation of
/// `epi`. Without an epilogue it rounds exactly as
/// [`sgemm`] (same depth blocks, same micro-kernel), and with a bias exactly as `sgemm`
/// accumulating onto a dst filled with the bias. Without `accumulate`, dst is only written:
/// it may start uninitialised.
///
/// # Safety
/// The CPU must have the instruction set `b` was packed for; m ≥ 1; `lhs` and `dst` must
/// cover their matrices inside live allocations, and `dst` must not overlap `lhs` or be
/// written concurrently.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_packed(
    m: usize,
    dst: *mut f32,
    dst_rs: usize,
    dst_cs: usize,
    lhs: MatRef,
    b: &PackedB,
    scale: f32,
    accumulate: bool,
    epi: Epilogue,
) {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        on_isa!(b.level, I => sgemm_packed_for::<I>(
            m, dst, dst_rs, dst_cs, lhs, b, scale, accumulate, epi,
        ))
    }
}

/// [`sgemm_packed`] on the kernel `I` that `b` was packed for.
///
/// # Safety
/// As [`sgemm_packed`].
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_packed_for<I: Isa>(
    m: usize,
    dst: *mut f32,
    dst_rs: usize,
    dst_cs: usize,
    lhs: MatRef,
    b: &PackedB,
    scale: f32,
    accumulate: bool,
    epi: Epilogue,
) {
    debug_assert!(m > 0);
    debug_assert!(
        !accumulate || epi.bias.is_null(),
        "a bias only without accumulate"
    );
    let (n, k, kc, nc) = (b.n, b.k, b.kc, b.nc);
    let mc = split(m, I::BLOCKING.mc, I::MR);
    let (mut a_buf, b_buf) = PACK.take();
    grow(&mut a_buf, mc.min(m.next_multiple_of(I::MR)) * kc);
    let a_pack = a_buf.as_mut_ptr() as *mut f32;
    let base = b.buf.as_ptr() as *const f32;
    // With all of B packed, each block of A is packed once and meets every column block
    // (B stays in L3); depth blocks stay outermost, so every element of dst sums the same
    // partial products in the same order as in [`sgemm_with`].
    // SAFETY: the A buffer holds a block just sized; the packed blocks lie where PackedB's
    // layout says; the caller's views cover lhs and dst.
    unsafe {
        for pc in (0..k).step_by(kc) {
            let kcb = kc.min(k - pc);
            let acc = accumulate || pc > 0;
            let epi = epi.for_depth_block(pc == 0, pc + kcb == k);
            for ic in (0..m).step_by(mc) {
                let mcb = mc.min(m - ic);
                I::pack_a(mcb, kcb, lhs.at(ic, pc), a_pack);
                for jc in (0..n).step_by(nc) {
                    let ncb = nc.min(n - jc);
                    let b_pack = base.add(jc * k + ncb.next_multiple_of(I::NR) * pc);
                    let c = dst.add(ic * dst_rs + jc * dst_cs);
                    let epi = epi.at(jc);
                    tiles::<I>(
                        mcb, ncb, kcb, a_pack, b_pack, c, dst_rs, dst_cs, scale, acc, epi,
                    );
                }
            }
        }
    }
    PACK.set((a_buf, b_buf));
}

/// [`Isa::kernel`] for a `dst` whose column stride is not 1: through a tile on the stack.
///
/// # Safety
/// As [`Isa::kernel`], with `c` covering the mr × nr corner under strides (c_rs, c_cs).
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_strided<I: Isa>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    c_rs: usize,
    c_cs: usize,
    mr: usize,
    nr: usize,
    scale: f32,
    accumulate: bool,
    epi: Epilogue,
) {
    // The largest tile of any kernel (12 × 32), on cache lines.
    let mut tile = [Line([0.0; 16]); 24];
    debug_assert!(I::MR * I::NR <= 24 * 16);
    let t = tile.as_mut_ptr() as *mut f32;
    // SAFETY: the tile holds MR rows of NR floats; the corner stays inside c's view.
    unsafe {
        I::kernel(
            kc,
            a,
            b,
            t,
            I::NR,
            mr,
            nr,
            scale,
            false,
            Epilogue { gelu: false, ..epi },
        );
        for i in 0..mr {
            let row = std::slice::from_raw_parts_mut(t.add(i * I::NR), nr);
            if accumulate {
                for (j, x) in row.iter_mut().enumerate() {
                    *x += *c.add(i * c_rs + j * c_cs);
                }
            }
            if epi.gelu {
                gelu_in_place(row);
            }
            for (j, &x) in row.iter().enumerate() {
                *c.add(i * c_rs + j * c_cs) = x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm::rust_sgemm;
    use super::*;

    thread_local! {
        /// The micro-kernel the products of [`each_level`]'s body run on.
        static LEVEL: std::cell::Cell<Option<Level>> = const { std::cell::Cell::new(None) };
    }

    /// Runs `body` once for each micro-kernel this CPU can run (saying so where it runs
    /// none); [`sgemm`] and [`packed`] below use that kernel.
    fn each_level(body: impl Fn()) {
        let mut levels = Vec::new();
        if is_x86_feature_detected!("avx512f") {
            levels.push(Level::Avx512);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            levels.push(Level::Avx2);
        }
        if levels.is_empty() {
            eprintln!("neither avx512f nor avx2 + fma on this CPU: skipped");
        }
        for l in levels {
            LEVEL.set(Some(l));
            body();
        }
        LEVEL.set(None);
    }

    fn level() -> Level {
        LEVEL.get().expect("inside each_level")
    }

    /// [`super::sgemm`] on [`each_level`]'s kernel.
    #[allow(clippy::too_many_arguments)]
    unsafe fn sgemm(
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
        // SAFETY: the caller's contract; each_level checked the instruction set.
        unsafe {
            super::sgemm(
                level(),
                m,
                n,
                k,
                dst,
                dst_rs,
                dst_cs,
                lhs,
                rhs,
                scale,
                accumulate,
            )
        }
    }

    /// [`PackedB::new`] for [`each_level`]'s kernel.
    unsafe fn packed(k: usize, n: usize, rhs: MatRef) -> PackedB {
        // SAFETY: the caller's contract; each_level checked the instruction set.
        unsafe { PackedB::new(level(), k, n, rhs) }
    }

    /// A small deterministic generator (xorshift), values in [-1, 1).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn f32(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        fn vec(&mut self, len: usize) -> Vec<f32> {
            (0..len).map(|_| self.f32()).collect()
        }
    }

    /// How a test lays out an operand of (rows, cols) in its buffer.
    #[derive(Clone, Copy, Debug)]
    enum Layout {
        /// Row-major, rows `pad` floats longer than needed.
        Rows(usize),
        /// Column-major (a transposed view), columns `pad` floats longer.
        Cols(usize),
        /// Neither stride 1: every other element of wider rows.
        Strided,
    }

    impl Layout {
        /// (row stride, column stride, buffer length) for a (rows, cols) matrix.
        fn strides(self, rows: usize, cols: usize) -> (usize, usize, usize) {
            match self {
                Layout::Rows(pad) => (cols + pad, 1, rows * (cols + pad)),
                Layout::Cols(pad) => (1, rows + pad, cols * (rows + pad)),
                Layout::Strided => (2 * cols + 1, 2, rows * (2 * cols + 1)),
            }
        }
    }

    /// One product checked against a triple loop in f64: dst (m, n) with row stride
    /// `dst_rs` ≥ n·dst_cs, operands in the given layouts.
    #[allow(clippy::too_many_arguments)]
    fn check(
        rng: &mut Rng,
        (m, n, k): (usize, usize, usize),
        la: Layout,
        lb: Layout,
        (dst_pad, dst_cs): (usize, usize),
        scale: f32,
        accumulate: bool,
    ) {
        let (ars, acs, alen) = la.strides(m, k);
        let (brs, bcs, blen) = lb.strides(k, n);
        let (a, b) = (rng.vec(alen), rng.vec(blen));
        let dst_rs = n * dst_cs + dst_pad;
        let before = rng.vec(m * dst_rs);
        let mut got = before.clone();
        let (am, bm) = (
            MatRef::new(a.as_ptr(), ars as isize, acs as isize),
            MatRef::new(b.as_ptr(), brs as isize, bcs as isize),
        );
        // SAFETY: the views cover their buffers; avx512f was checked by the caller.
        unsafe {
            sgemm(
                m,
                n,
                k,
                got.as_mut_ptr(),
                dst_rs,
                dst_cs,
                am,
                bm,
                scale,
                accumulate,
            )
        };
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut sa) = (0f64, 0f64);
                for p in 0..k {
                    let x = a[i * ars + p * acs] as f64 * b[p * brs + j * bcs] as f64;
                    s += x;
                    sa += x.abs();
                }
                let old = before[i * dst_rs + j * dst_cs] as f64;
                let want = scale as f64 * s + if accumulate { old } else { 0.0 };
                let g = got[i * dst_rs + j * dst_cs] as f64;
                // f32 rounding of k products summed, of the scaling and of the addition.
                let tol =
                    f32::EPSILON as f64 * ((k + 2) as f64 * sa * scale.abs() as f64 + old.abs());
                assert!(
                    (g - want).abs() <= tol + 1e-30,
                    "{m}x{n}x{k} {la:?} {lb:?} dst ({dst_pad}, {dst_cs}) acc {accumulate}: \
                     ({i}, {j}) = {g}, want {want}"
                );
            }
        }
        // Nothing outside the (m, n) view was written.
        for (idx, (g, w)) in got.iter().zip(&before).enumerate() {
            let (i, r) = (idx / dst_rs, idx % dst_rs);
            if r % dst_cs != 0 || r / dst_cs >= n || i >= m {
                assert_eq!(g.to_bits(), w.to_bits(), "wrote outside dst at {idx}");
            }
        }
    }

    #[test]
    fn random_shapes_and_strides_match_the_triple_loop() {
        each_level(|| {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let layouts = |rng: &mut Rng| match rng.below(4) {
                0 => Layout::Rows(0),
                1 => Layout::Rows(1 + rng.below(5)),
                2 => Layout::Cols(rng.below(3)),
                _ => Layout::Strided,
            };
            for case in 0..300 {
                let (m, n, k) = (1 + rng.below(70), 1 + rng.below(70), 1 + rng.below(70));
                let (la, lb) = (layouts(&mut rng), layouts(&mut rng));
                let dst = match case % 3 {
                    0 => (0, 1),
                    1 => (rng.below(7), 1),
                    _ => (rng.below(3), 2 + rng.below(2)),
                };
                let scale = [1.0, 0.125, -1.7][case % 3];
                check(&mut rng, (m, n, k), la, lb, dst, scale, case % 2 == 1);
            }
        });
    }

    #[test]
    fn every_stride_combination_on_block_edges() {
        each_level(|| {
            let mut rng = Rng(7);
            let all = [
                Layout::Rows(0),
                Layout::Rows(3),
                Layout::Cols(0),
                Layout::Cols(2),
                Layout::Strided,
            ];
            // Sizes around the tile and block edges (AVX-512: MR = 12, NR = 32, kc = 768;
            // AVX2: MR = 6, NR = 16, kc = 256).
            let shapes = [
                (1, 1, 1),
                (5, 15, 255),
                (6, 16, 256),
                (7, 17, 257),
                (11, 31, 513),
                (8, 48, 16),
                (9, 49, 17),
                (7, 47, 15),
                (17, 97, 257),
                (13, 33, 769),
                (50, 50, 64),
            ];
            for (s, &shape) in shapes.iter().enumerate() {
                for (x, &la) in all.iter().enumerate() {
                    for (y, &lb) in all.iter().enumerate() {
                        let dst = [(0, 1), (5, 1), (1, 3)][(s + x + y) % 3];
                        let acc = (s + x * 5 + y) % 2 == 0;
                        check(&mut rng, shape, la, lb, dst, 0.5, acc);
                    }
                }
            }
        });
    }

    /// The bf16 kernel against a triple loop in f64 over the operands rounded to bfloat16
    /// (as the kernel rounds them): every layout, edges of its tiles and depth blocks, odd k
    /// (a half-empty last pair); and the packed right-hand side rounds exactly as `sgemm`,
    /// its epilogue as bias, product, GELU.
    #[test]
    fn bf16_matches_the_triple_loop_on_rounded_operands() {
        if !bf16::available() {
            eprintln!("no avx512bf16 on this CPU: skipped");
            return;
        }
        let round = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&x| f32::from_bits((bf16::to_bf16(x) as u32) << 16))
                .collect()
        };
        let mut rng = Rng(0xbf16);
        let all = [
            Layout::Rows(0),
            Layout::Rows(3),
            Layout::Cols(1),
            Layout::Strided,
        ];
        let shapes = [
            (1, 1, 1),
            (13, 33, 3),
            (12, 32, 64),
            (25, 70, 769),
            (150, 97, 1537),
        ];
        for (s, &(m, n, k)) in shapes.iter().enumerate() {
            for (x, &la) in all.iter().enumerate() {
                let lb = all[(s + x) % all.len()];
                let (ars, acs, alen) = la.strides(m, k);
                let (brs, bcs, blen) = lb.strides(k, n);
                let (a, b) = (rng.vec(alen), rng.vec(blen));
                let (ra, rb) = (round(&a), round(&b));
                let am = MatRef::new(a.as_ptr(), ars as isize, acs as isize);
                let bm = MatRef::new(b.as_ptr(), brs as isize, bcs as isize);
                let (dst_rs, dst_cs) = if x == 3 { (2 * n + 1, 2) } else { (n + 1, 1) };
                let before = rng.vec(m * dst_rs);
                let acc = (s + x) % 2 == 0;
                let mut got = before.clone();
                // SAFETY: avx512bf16 checked; the views cover their buffers.
                unsafe {
                    super::sgemm(
                        Level::Bf16,
                        m,
                        n,
                        k,
                        got.as_mut_ptr(),
                        dst_rs,
                        dst_cs,
                        am,
                        bm,
                        0.5,
                        acc,
                    )
                };
                for i in 0..m {
                    for j in 0..n {
                        let (mut sum, mut abs) = (0f64, 0f64);
                        for p in 0..k {
                            let v = ra[i * ars + p * acs] as f64 * rb[p * brs + j * bcs] as f64;
                            sum += v;
                            abs += v.abs();
                        }
                        let old = before[i * dst_rs + j * dst_cs] as f64;
                        let want = 0.5 * sum + if acc { old } else { 0.0 };
                        let g = got[i * dst_rs + j * dst_cs] as f64;
                        let tol = f32::EPSILON as f64 * ((k + 2) as f64 * abs + old.abs());
                        assert!(
                            (g - want).abs() <= tol + 1e-30,
                            "{m}x{n}x{k} {la:?} {lb:?}: ({i}, {j}) = {g}, want {want}"
                        );
                    }
                }
                for (idx, (g, w)) in got.iter().zip(&before).enumerate() {
                    let (i, r) = (idx / dst_rs, idx % dst_rs);
                    if r % dst_cs != 0 || r / dst_cs >= n || i >= m {
                        assert_eq!(g.to_bits(), w.to_bits(), "wrote outside dst at {idx}");
                    }
                }
                // Packed once: the same bits as sgemm, with a bias and GELU as the linear
                // layer's fused epilogue.
                // SAFETY: as above.
                let packed = unsafe { PackedB::new(Level::Bf16, k, n, bm) };
                assert_eq!(packed.level(), Level::Bf16);
                let mut from_packed = before.clone();
                // SAFETY: as above.
                unsafe {
                    sgemm_packed(
                        m,
                        from_packed.as_mut_ptr(),
                        dst_rs,
                        dst_cs,
                        am,
                        &packed,
                        0.5,
                        acc,
                        Epilogue::NONE,
                    )
                };
                assert!(
                    from_packed
                        .iter()
                        .zip(&got)
                        .all(|(p, g)| p.to_bits() == g.to_bits()),
                    "{m}x{n}x{k}: packed B rounds differently"
                );
            }
        }
    }

    #[test]
    fn larger_products_match_the_triple_loop() {
        each_level(|| {
            let mut rng = Rng(42);
            // Several row, column and depth blocks (mc = 144, nc = 960, kc = 768), kept small
            // enough for the triple loop: the linear layer (x Wᵀ), its weight gradient
            // (Gᵀ x) and attention's P V into a wider output.
            #[rustfmt::skip]
        let cases = [
            ((197, 130, 1000), Layout::Rows(0), Layout::Cols(0), (0, 1), 1.0, true),
            ((300, 50, 520), Layout::Cols(0), Layout::Rows(0), (0, 1), 1.0, false),
            ((197, 64, 197), Layout::Rows(0), Layout::Rows(100), (700, 1), 1.0, false),
            ((20, 3100, 30), Layout::Rows(0), Layout::Cols(0), (0, 1), 0.125, true),
        ];
            for (shape, a, b, dst, scale, acc) in cases {
                check(&mut rng, shape, a, b, dst, scale, acc);
            }
        });
    }

    #[test]
    fn thread_local_buffers_serve_any_sequence_of_shapes() {
        each_level(|| {
            // Big then small then big again, on several threads at once.
            let l = level();
            std::thread::scope(|s| {
                for t in 0..3u64 {
                    s.spawn(move || {
                        LEVEL.set(Some(l));
                        let mut rng = Rng(100 + t);
                        for &shape in &[(150, 200, 300), (3, 2, 1), (60, 700, 40), (5, 5, 5)] {
                            check(
                                &mut rng,
                                shape,
                                Layout::Rows(0),
                                Layout::Cols(0),
                                (0, 1),
                                1.0,
                                false,
                            );
                        }
                    });
                }
            });
        });
    }

    #[test]
    fn packed_rhs_rounds_exactly_as_sgemm() {
        each_level(|| {
            let mut rng = Rng(0x5eed);
            // (m, n, k) around the blocks (MR = 12, NR = 32, mc = 144, nc = 960, kc = 768): k
            // crossing kc (769 → 2 × 385, 1600 → 3 × 534), n crossing nc and not a multiple of
            // 32, m not a multiple of 12 and crossing mc.
            let shapes = [
                (1, 1, 1),
                (13, 33, 769),
                (145, 97, 1000),
                (25, 1990, 130),
                (7, 961, 1600),
                (150, 200, 64),
            ];
            for (s, &(m, n, k)) in shapes.iter().enumerate() {
                // Wᵀ of a linear layer (column-major), row-major B (backward's G·W), strided.
                for (l, lb) in [Layout::Cols(0), Layout::Rows(3), Layout::Strided]
                    .into_iter()
                    .enumerate()
                {
                    let la = if (s + l) % 2 == 0 {
                        Layout::Rows(0)
                    } else {
                        Layout::Cols(1)
                    };
                    let (ars, acs, alen) = la.strides(m, k);
                    let (brs, bcs, blen) = lb.strides(k, n);
                    let (a, b) = (rng.vec(alen), rng.vec(blen));
                    let am = MatRef::new(a.as_ptr(), ars as isize, acs as isize);
                    let bm = MatRef::new(b.as_ptr(), brs as isize, bcs as isize);
                    let (dst_rs, dst_cs) = if l == 2 { (2 * n + 1, 2) } else { (n + 5, 1) };
                    let before = rng.vec(m * dst_rs);
                    // SAFETY: the views cover their buffers; avx512f checked.
                    let packed = unsafe { packed(k, n, bm) };
                    for (scale, acc) in [(1.0, true), (-0.375, false)] {
                        let (mut want, mut got) = (before.clone(), before.clone());
                        // SAFETY: as above; dst covers m rows of dst_rs.
                        unsafe {
                            sgemm(
                                m,
                                n,
                                k,
                                want.as_mut_ptr(),
                                dst_rs,
                                dst_cs,
                                am,
                                bm,
                                scale,
                                acc,
                            );
                            sgemm_packed(
                                m,
                                got.as_mut_ptr(),
                                dst_rs,
                                dst_cs,
                                am,
                                &packed,
                                scale,
                                acc,
                                Epilogue::NONE,
                            );
                        }
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                g.to_bits(),
                                w.to_bits(),
                                "{m}x{n}x{k} {la:?} {lb:?} scale {scale} acc {acc}: element {i}"
                            );
                        }
                    }
                    // One packed B shared by several threads at once, as the linear layer does.
                    let mut outs = vec![vec![0f32; m * n]; 3];
                    std::thread::scope(|sc| {
                        for out in outs.iter_mut() {
                            let packed = &packed;
                            sc.spawn(move || {
                                // SAFETY: as above, each thread its own dst.
                                unsafe {
                                    sgemm_packed(
                                        m,
                                        out.as_mut_ptr(),
                                        n,
                                        1,
                                        am,
                                        packed,
                                        1.0,
                                        false,
                                        Epilogue::NONE,
                                    )
                                }
                            });
                        }
                    });
                    let mut want = vec![0f32; m * n];
                    // SAFETY: as above.
                    unsafe { sgemm(m, n, k, want.as_mut_ptr(), n, 1, am, bm, 1.0, false) };
                    for out in &outs {
                        assert!(out
                            .iter()
                            .zip(&want)
                            .all(|(g, w)| g.to_bits() == w.to_bits()));
                    }
                }
            }
        });
    }

    #[test]
    fn epilogue_equals_bias_fill_then_product_then_gelu() {
        each_level(|| {
            let mut rng = Rng(0xe91);
            // The linear layer's old order, bit for bit: dst filled with the bias, the product
            // accumulated onto it, then GELU over the result. k crossing kc puts the bias in the
            // first depth block and GELU after the last; n crossing nc offsets the bias.
            for &(m, n, k) in &[(1, 1, 1), (13, 33, 769), (30, 1001, 1600), (145, 97, 200)] {
                let (x, w, bias) = (rng.vec(m * k), rng.vec(n * k), rng.vec(n));
                let xm = MatRef::new(x.as_ptr(), k as isize, 1);
                let wt = MatRef::new(w.as_ptr(), 1, k as isize);
                // SAFETY: W holds n rows of k; avx512f checked.
                let packed = unsafe { packed(k, n, wt) };
                for gelu in [false, true] {
                    let mut want: Vec<f32> = (0..m).flat_map(|_| bias.iter().copied()).collect();
                    let mut got = vec![f32::NAN; m * n]; // written, never read
                    let epi = Epilogue::new(Some(&bias), gelu);
                    // SAFETY: x holds m rows of k, want and got m rows of n.
                    unsafe {
                        sgemm(m, n, k, want.as_mut_ptr(), n, 1, xm, wt, 1.0, true);
                        sgemm_packed(m, got.as_mut_ptr(), n, 1, xm, &packed, 1.0, false, epi);
                    }
                    if gelu {
                        gelu_in_place(&mut want);
                    }
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(g.to_bits(), w.to_bits(), "{m}x{n}x{k} gelu {gelu}: {i}");
                    }
                    // A strided dst takes the tile path; the same values up to rounding.
                    let mut strided = vec![f32::NAN; 2 * m * n];
                    // SAFETY: strided covers m rows of 2n at column stride 2.
                    unsafe {
                        sgemm_packed(
                            m,
                            strided.as_mut_ptr(),
                            2 * n,
                            2,
                            xm,
                            &packed,
                            1.0,
                            false,
                            epi,
                        )
                    };
                    for (i, w) in want.iter().enumerate() {
                        let g = strided[2 * i];
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{m}x{n}x{k}: {g} {w}"
                        );
                    }
                }
            }
        });
    }

    #[test]
    fn packed_rhs_matches_the_triple_loop() {
        each_level(|| {
            // The exactness test above leans on sgemm; this one on nothing: a linear layer's
            // x·Wᵀ with k and n crossing their blocks, against f64.
            let mut rng = Rng(11);
            let (m, n, k) = (31, 1001, 800);
            let (x, w) = (rng.vec(m * k), rng.vec(n * k));
            let wt = MatRef::new(w.as_ptr(), 1, k as isize);
            // SAFETY: W holds n rows of k; avx512f checked.
            let packed = unsafe { packed(k, n, wt) };
            let mut got = vec![0f32; m * n];
            let xm = MatRef::new(x.as_ptr(), k as isize, 1);
            // SAFETY: x holds m rows of k, got m rows of n.
            unsafe {
                sgemm_packed(
                    m,
                    got.as_mut_ptr(),
                    n,
                    1,
                    xm,
                    &packed,
                    1.0,
                    false,
                    Epilogue::NONE,
                )
            };
            for i in 0..m {
                for j in 0..n {
                    let (mut s, mut sa) = (0f64, 0f64);
                    for p in 0..k {
                        let v = x[i * k + p] as f64 * w[j * k + p] as f64;
                        s += v;
                        sa += v.abs();
                    }
                    let g = got[i * n + j] as f64;
                    let tol = f32::EPSILON as f64 * (k + 2) as f64 * sa;
                    assert!((g - s).abs() <= tol, "({i}, {j}) = {g}, want {s}");
                }
            }
        });
    }

    /// One product of the benchmark: a name, (m, n, k), the operands' layouts (as the
    /// kernels call sgemm) and whether it accumulates.
    type Case = (&'static str, (usize, usize, usize), Layout, Layout, bool);

    /// The products of ViT-B/16 inference, TRAIN-FM training and the default tiny model.
    fn bench_cases() -> Vec<Case> {
        use Layout::*;
        let mut cases: Vec<Case> = Vec::new();
        // Linear forward: 128-row blocks, x (rows, in) · Wᵀ.
        for &(name, k, n) in &[
            ("b16 qkv fwd", 768, 2304),
            ("b16 proj fwd", 768, 768),
            ("b16 fc1 fwd", 768, 3072),
            ("b16 fc2 fwd", 3072, 768),
            ("fm qkv fwd", 192, 576),
            ("fm proj fwd", 192, 192),
            ("fm fc1 fwd", 192, 768),
            ("fm fc2 fwd", 768, 192),
            ("tiny qkv fwd", 64, 192),
            ("tiny fc1 fwd", 64, 128),
            ("tiny fc2 fwd", 128, 64),
        ] {
            cases.push((name, (128, n, k), Rows(0), Cols(0), true));
        }
        // Linear backward, 400-row chunks: dx = G W and dW = Gᵀ x.
        for &(name, k_in, n_out) in &[
            ("fm qkv", 192, 576),
            ("fm fc1", 192, 768),
            ("fm fc2", 768, 192),
            ("tiny fc1", 64, 128),
        ] {
            let dx: &'static str = Box::leak(format!("{name} dx").into_boxed_str());
            let dw: &'static str = Box::leak(format!("{name} dW").into_boxed_str());
            cases.push((dx, (400, k_in, n_out), Rows(0), Rows(0), false));
            cases.push((dw, (n_out, k_in, 400), Cols(0), Rows(0), false));
        }
        // Attention, per head: S = Q Kᵀ, O = P V, and backward's Pᵀ G, dSᵀ Q.
        for &(name, t, hd, d) in &[
            ("b16", 197, 64, 768),
            ("fm", 50, 64, 192),
            ("tiny", 50, 16, 64),
        ] {
            let qk: &'static str = Box::leak(format!("{name} attn QKᵀ").into_boxed_str());
            let pv: &'static str = Box::leak(format!("{name} attn PV").into_boxed_str());
            let ptg: &'static str = Box::leak(format!("{name} attn PᵀG").into_boxed_str());
            cases.push((qk, (t, t, hd), Rows(3 * d - hd), Cols(3 * d - hd), false));
            cases.push((pv, (t, hd, t), Rows(0), Rows(3 * d - hd), false));
            cases.push((ptg, (t, hd, t), Cols(0), Rows(d - hd), false));
        }
        cases
    }

    /// GFLOP/s of `f` on one case, best of a few timed batches of about 20 ms.
    fn gflops(
        case: &Case,
        f: &dyn Fn(usize, usize, usize, *mut f32, usize, MatRef, MatRef, bool),
    ) -> f64 {
        let &(_, (m, n, k), la, lb, acc) = case;
        let mut rng = Rng(1);
        let (ars, acs, alen) = la.strides(m, k);
        let (brs, bcs, blen) = lb.strides(k, n);
        let (a, b) = (rng.vec(alen), rng.vec(blen));
        let mut c = vec![0f32; m * n];
        let (am, bm) = (
            MatRef::new(a.as_ptr(), ars as isize, acs as isize),
            MatRef::new(b.as_ptr(), brs as isize, bcs as isize),
        );
        let flops = 2.0 * (m * n * k) as f64;
        let reps = ((2e9 * 0.02 / flops) as usize).max(1);
        let mut best = f64::MAX;
        for _ in 0..6 {
            let t = std::time::Instant::now();
            for _ in 0..reps {
                f(m, n, k, c.as_mut_ptr(), n, am, bm, acc);
            }
            best = best.min(t.elapsed().as_secs_f64() / reps as f64);
        }
        flops / best / 1e9
    }

    /// The microbenchmark behind the choice of tile and blocking: GFLOP/s of this kernel
    /// against the `gemm` crate on the real shapes, one thread. Run with
    /// `cargo test --release --lib sgemm::tests::bench -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_against_gemm_crate() {
        each_level(|| {
            println!(
                "{:<18} {:>16} {:>8} {:>8} {:>8}   ({:?})",
                "product",
                "m×n×k",
                "ours",
                "packed",
                "gemm",
                level()
            );
            for case in bench_cases() {
                let (m, n, k) = case.1;
                // SAFETY: the views cover the benchmark's buffers; avx512f checked.
                let ours = gflops(&case, &|m, n, k, c, ld, a, b, acc| unsafe {
                    sgemm(m, n, k, c, ld, 1, a, b, 1.0, acc)
                });
                // B packed once (on the first call) for all the timed calls, as the linear
                // layer packs its weight once for all its row blocks.
                let cell = std::cell::OnceCell::new();
                // SAFETY: as above.
                let packed = gflops(&case, &|m, n, k, c, ld, a, b, acc| unsafe {
                    let p = cell.get_or_init(|| packed(k, n, b));
                    sgemm_packed(m, c, ld, 1, a, p, 1.0, acc, Epilogue::NONE)
                });
                // SAFETY: as above.
                let theirs = gflops(&case, &|m, n, k, c, ld, a, b, acc| unsafe {
                    rust_sgemm(m, n, k, c, ld, 1, a, b, 1.0, acc)
                });
                println!(
                    "{:<18} {:>16} {ours:>8.1} {packed:>8.1} {theirs:>8.1}",
                    case.0,
                    format!("{m}×{n}×{k}")
                );
            }
        });
    }

    /// Blocking candidates on the large shapes (`--ignored --nocapture`, as above).
    #[test]
    #[ignore]
    fn bench_blocking() {
        each_level(|| {
            let cases: Vec<Case> = bench_cases()
                .into_iter()
                .filter(|c| c.1 .0 * c.1 .1 * c.1 .2 > 5_000_000)
                .collect();
            println!("{:?}", level());
            for kc in [128, 256, 384, 512, 768] {
                for mc in [96, 144, 240] {
                    for nc in [480, 960, 3072] {
                        let bl = Blocking { kc, mc, nc };
                        let mut line = format!("kc {kc:>3} mc {mc:>3} nc {nc:>4}:");
                        for case in &cases {
                            // SAFETY: as in bench_against_gemm_crate.
                            let g = gflops(case, &|m, n, k, c, ld, a, b, acc| unsafe {
                                on_isa!(level(), I => sgemm_with::<I>(
                                    bl, m, n, k, c, ld, 1, a, b, 1.0, acc,
                                ))
                            });
                            line += &format!(" {g:6.1}");
                        }
                        println!("{line}");
                    }
                }
            }
        });
    }
}
