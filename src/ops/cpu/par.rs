//! The parallel-block helpers every kernel builds on: output buffers allocated and filled
//! block by block on rayon's global pool (each task zeroing, or only writing, its own block
//! while it is in cache), row blocks of a fixed size, and the `Send` pointer the tasks share.

use rayon::prelude::*;

use super::simd::simd;

/// A raw pointer to an output buffer that may cross threads: each parallel task writes only
/// its own disjoint part of the buffer.
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);
// SAFETY: tasks sharing a SendPtr write disjoint elements while the buffer outlives them.
unsafe impl Send for SendPtr {}
// SAFETY: as for Send: the pointer itself is only copied; every task dereferences it only
// at offsets of its own part of the buffer, which no other task reads or writes.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Elements per parallel task: enough work to amortise rayon's scheduling (~µs).
pub(super) const BLOCK_ELEMS: usize = 1 << 14;

/// Rows per block for rows of `width` elements.
pub(super) fn rows_per_block(width: usize) -> usize {
    (BLOCK_ELEMS / width.max(1)).max(1)
}

/// A new buffer of `len` f32, filled by `f(block_index, block)` for consecutive blocks of
/// `chunk` elements, in parallel when there is more than one. Each task zeroes its own block
/// just before `f` writes it, while the block is in cache: allocating with `vec![0; len]`
/// instead zeroes the whole buffer on the calling thread while the pool waits (5% of ViT-B/16
/// inference time when it did).
pub(super) fn new_blocks<F>(len: usize, chunk: usize, f: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    let zero_then_fill = |i: usize, ptr: *mut f32, n: usize| {
        // SAFETY: `ptr` is valid for writes of the block's `n` floats, which belong to this
        // task alone; once zeroed they are initialised f32s, so the slice may be formed.
        let block = unsafe {
            std::ptr::write_bytes(ptr, 0, n);
            std::slice::from_raw_parts_mut(ptr, n)
        };
        f(i, block)
    };
    // SAFETY: zero_then_fill writes every float of its block (zeroes) before anything reads
    // it, which is new_blocks_uninit's contract.
    unsafe { new_blocks_uninit(len, chunk, zero_then_fill) }
}

/// As [`new_blocks`] without the zeroing: `f(block_index, ptr, n)` gets the block's `n`
/// floats uninitialised, for a writer that fills all of them without reading them first
/// (our matrix multiply without `accumulate`).
///
/// # Safety
/// `f` must write every float of its block and read none before writing it.
pub(super) unsafe fn new_blocks_uninit<F>(len: usize, chunk: usize, f: F) -> Vec<f32>
where
    F: Fn(usize, *mut f32, usize) + Sync + Send,
{
    let chunk = chunk.max(1);
    let bounds: Vec<usize> = (0..len).step_by(chunk).chain([len]).collect();
    // SAFETY: the caller's contract, passed on.
    unsafe { new_ranges_uninit(&bounds, f) }
}

/// The first row of each task, then `rows`, for a kernel of `tile`-row tiles: tasks of whole
/// tiles, as equal as the tiles allow, about `target` rows each, and as many as a multiple of
/// the pool's `threads` so that the workers finish together (the linear layers' forward).
pub(super) fn tile_tasks(rows: usize, tile: usize, target: usize, threads: usize) -> Vec<usize> {
    let tiles = rows.div_ceil(tile);
    let mut tasks = tiles.div_ceil(target.div_ceil(tile)).max(1);
    if tasks > 1 {
        tasks = tasks.next_multiple_of(threads.max(1)).min(tiles);
    }
    (0..=tasks)
        .map(|i| (i * tiles / tasks * tile).min(rows))
        .collect()
}

/// As [`new_blocks_uninit`] over blocks of any sizes: block i is `bounds[i]..bounds[i + 1]`
/// of a new buffer of `bounds.last()` floats (`bounds` starts at 0 and never decreases).
///
/// # Safety
/// As [`new_blocks_uninit`].
pub(super) unsafe fn new_ranges_uninit<F>(bounds: &[usize], f: F) -> Vec<f32>
where
    F: Fn(usize, *mut f32, usize) + Sync + Send,
{
    use std::mem::MaybeUninit;
    let len = bounds.last().copied().unwrap_or(0);
    debug_assert!(bounds.first().is_none_or(|&b| b == 0));
    let mut buf: Vec<MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit elements need no initialisation.
    unsafe { buf.set_len(len) };
    let mut blocks = Vec::with_capacity(bounds.len());
    let mut rest = &mut buf[..];
    for w in bounds.windows(2) {
        let (block, tail) = rest.split_at_mut(w[1] - w[0]);
        blocks.push(block);
        rest = tail;
    }
    let run = |i: usize, block: &mut [MaybeUninit<f32>]| {
        f(i, block.as_mut_ptr().cast::<f32>(), block.len())
    };
    if blocks.len() <= 1 {
        blocks.into_iter().for_each(|b| run(0, b));
    } else {
        blocks
            .into_par_iter()
            .enumerate()
            .for_each(|(i, block)| run(i, block));
    }
    let mut buf = std::mem::ManuallyDrop::new(buf);
    // SAFETY: `f` initialised every element (the caller's contract); the pointer, length
    // and capacity come from a Vec of a type with f32's size and alignment.
    unsafe { Vec::from_raw_parts(buf.as_mut_ptr().cast::<f32>(), buf.len(), buf.capacity()) }
}

/// A new buffer of `len` elements, rows of `width`: calls `f(first_row, block)` for
/// consecutive blocks of whole rows, in parallel when there is more than one block (see
/// [`new_blocks`]), through [`simd!`] (so pass `f` as an `#[inline(always)]` closure for its
/// loops to be compiled for each instruction set).
pub(super) fn new_row_blocks<F>(len: usize, width: usize, f: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if width == 0 {
        return vec![0.0; len];
    }
    let rows = rows_per_block(width);
    new_blocks(len, rows * width, |i, block| simd!(f(i * rows, block)))
}

/// A new buffer of `f(x_i)`, element by element in parallel blocks (see [`new_row_blocks`];
/// pass `f` as an `#[inline(always)]` closure).
#[inline(always)]
pub(super) fn map1<F>(x: &[f32], f: F) -> Vec<f32>
where
    F: Fn(f32) -> f32 + Sync + Send,
{
    new_row_blocks(
        x.len(),
        1,
        #[inline(always)]
        |i0, block| {
            for (y, &x) in block.iter_mut().zip(&x[i0..]) {
                *y = f(x);
            }
        },
    )
}

/// A new buffer of `f(a_i, b_i)` over `a`'s length (`b` at least as long), element by
/// element in parallel blocks (see [`map1`]).
#[inline(always)]
pub(super) fn map2<F>(a: &[f32], b: &[f32], f: F) -> Vec<f32>
where
    F: Fn(f32, f32) -> f32 + Sync + Send,
{
    new_row_blocks(
        a.len(),
        1,
        #[inline(always)]
        |i0, block| {
            for ((y, &a), &b) in block.iter_mut().zip(&a[i0..]).zip(&b[i0..]) {
                *y = f(a, b);
            }
        },
    )
}

/// As [`new_row_blocks`] over an existing buffer, collecting one value per block, in block
/// order.
pub(super) fn map_row_blocks<F, R>(out: &mut [f32], width: usize, f: F) -> Vec<R>
where
    F: Fn(usize, &mut [f32]) -> R + Sync + Send,
    R: Send,
{
    let rows = rows_per_block(width);
    let chunk = rows * width.max(1);
    if out.len() <= chunk {
        vec![simd!(f(0, out))]
    } else {
        out.par_chunks_mut(chunk)
            .enumerate()
            .map(|(i, block)| simd!(f(i * rows, block)))
            .collect()
    }
}

/// Σ of the buffers (partial sums of the chunks of a reduction), added in buffer order
/// element by element: the same bits as a serial loop over them, computed in parallel
/// blocks. Zeros of `len` when there are none.
pub(super) fn sum_in_order(mut parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    if parts.is_empty() {
        return vec![0f32; len];
    }
    let mut total = parts.remove(0);
    total
        .par_chunks_mut(BLOCK_ELEMS)
        .enumerate()
        .for_each(|(bi, block)| {
            for part in &parts {
                for (t, &v) in block.iter_mut().zip(&part[bi * BLOCK_ELEMS..]) {
                    *t += v;
                }
            }
        });
    total
}
