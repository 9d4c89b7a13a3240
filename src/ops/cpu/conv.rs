//! Fused 2-D convolution over f32 images, channels last (B, H, W, C) or channels first
//! (B, C, H, W): a square k×k kernel, zero padding, a stride, no bias, no dilation, one
//! group (every convolution of the ResNets), lowered onto the matrix-multiply provider by
//! im2col in channels-last order. The weight is PyTorch's (C_out, C_in, k, k) either way.
//!
//! The batch is cut into groups of consecutive images, enough of them that a group's output
//! has at least [`GROUP_COLUMNS`] positions (one image at 28×28, sixteen at 4×4), so every
//! product is large enough to run efficiently. Per group of n images, P = H'·W' output
//! positions each:
//!
//!   xt    = x, channels last                          (n, H, W, C_in)
//!   cols  = im2col(xt), one patch per output position  (n·P, k·k·C_in), patch order (ki, kj, c)
//!   Wt    = W as (k·k·C_in, C_out), rows in patch order
//!   forward   yt = cols · Wt                          (n·P, C_out) = y, channels last
//!   backward  Gt = the output gradient, channels last (n·P, C_out)
//!             dWt += colsᵀ · Gt,  dcols = Gt · Wtᵀ,  dxt = col2im(dcols)
//!
//! Channels last makes every copy of the lowering a contiguous run: a patch row is k runs
//! of k·C_in floats (fewer at the image's edges), where channels-first order copies runs of
//! W' floats (4 at ResNet's last stage), so im2col and col2im stay a small share of the
//! products at every stage. Channels-last tensors are used as they are; channels-first ones
//! are transposed per group (x, y, the output gradient and dx: one pass over each, 9% of a
//! ResNet training step when the ResNets ran channels first). Scratch buffers are per
//! thread and reused from call to call, never zeroed: every element is written before it
//! is read.
//!
//! Groups run in parallel on rayon's pool; their boundaries depend only on the shape and
//! each group's y and dx are its own. In backward, the groups are cut into at most
//! [`MAX_CHUNKS`] runs of consecutive groups (by count only); each run accumulates its dW in
//! group order, and the runs' dW are added in run order, so results never depend on the
//! number of threads. The weight (and its transpose, in backward) is packed once per call
//! for every group where our own matrix kernel runs the products. cols is recomputed in
//! backward rather than kept (it is k² times the input).

use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{own_kernel_for, sgemm, sgemm_packed, Epilogue, PackedB};
use super::matrix::MatRef;
use super::par::{new_blocks, sum_in_order, SendPtr};
use super::simd::simd;
use super::storage::{f32_slice, with_f32};
use super::transpose::transpose;

/// Fewest output positions (images × H' × W') of a group's products.
const GROUP_COLUMNS: usize = 256;

/// The shapes of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
    /// Whether x and y are (B, H, W, C), not (B, C, H, W).
    channels_last: bool,
}

impl Geometry {
    fn new(
        x: &[usize],
        w: &[usize],
        stride: usize,
        pad: usize,
        channels_last: bool,
    ) -> Result<Self> {
        let (&[batch, a, b, c], &[c_out, wc, k, k2]) = (x, w) else {
            bail!("conv2d: input {x:?} and weight {w:?} must both have 4 dimensions")
        };
        let (c_in, h, wd) = if channels_last { (c, a, b) } else { (a, b, c) };
        if wc != c_in || k != k2 || k == 0 || stride == 0 {
            bail!("conv2d: input {x:?}, weight {w:?} and stride {stride} do not fit")
        }
        if h + 2 * pad < k || wd + 2 * pad < k {
            bail!("conv2d: input {x:?} with padding {pad} is smaller than the kernel {k}x{k}")
        }
        Ok(Geometry {
            batch,
            c_in,
            h,
            w: wd,
            c_out,
            k,
            stride,
            pad,
            oh: (h + 2 * pad - k) / stride + 1,
            ow: (wd + 2 * pad - k) / stride + 1,
            channels_last,
        })
    }

    /// The shape of a tensor of `c` channels of h × w in this convolution's layout.
    fn shape(&self, c: usize, h: usize, w: usize) -> Shape {
        match self.channels_last {
            true => Shape::from((self.batch, h, w, c)),
            false => Shape::from((self.batch, c, h, w)),
        }
    }

    /// n images of `c` channels and `p` positions from `src` in channels-last order: `src`
    /// itself where the layout is channels last, else transposed into `buf`.
    fn channels_last_view<'a>(
        &self,
        src: &'a [f32],
        n: usize,
        c: usize,
        p: usize,
        buf: &'a mut [f32],
    ) -> &'a [f32] {
        if self.channels_last {
            &src[..n * c * p]
        } else {
            transpose_images(src, n, c, p, buf);
            buf
        }
    }

    /// Floats of a group's channels-last copy of n images of `c` channels and `p`
    /// positions: none where the layout is channels last already.
    fn copy_len(&self, n: usize, c: usize, p: usize) -> usize {
        if self.channels_last {
            0
        } else {
            n * c * p
        }
    }

    /// Length of a patch, the columns of cols: k·k·C_in.
    fn patch(&self) -> usize {
        self.k * self.k * self.c_in
    }

    fn in_image(&self) -> usize {
        self.c_in * self.h * self.w
    }

    fn out_plane(&self) -> usize {
        self.oh * self.ow
    }

    fn out_image(&self) -> usize {
        self.c_out * self.out_plane()
    }

    /// Images per group (the last group may have fewer): a function of the shape only.
    fn per_group(&self) -> usize {
        GROUP_COLUMNS
            .div_ceil(self.out_plane().max(1))
            .clamp(1, self.batch.max(1))
    }

    /// The image ranges of the groups: consecutive runs of [`Geometry::per_group`] images.
    fn groups(&self) -> Vec<(usize, usize)> {
        let per = self.per_group();
        (0..self.batch)
            .step_by(per)
            .map(|i| (i, (i + per).min(self.batch)))
            .collect()
    }

    /// The kernel offsets [lo, hi) along one axis whose input index o·stride + kk − pad
    /// lies in 0..len, for output index `o`, and the input index of `lo`; consecutive
    /// offsets read consecutive inputs.
    fn inside(&self, o: usize, len: usize) -> (usize, usize, usize) {
        let start = o * self.stride;
        let lo = self.pad.saturating_sub(start).min(self.k);
        let hi = (len + self.pad).saturating_sub(start).min(self.k).max(lo);
        (lo, hi, (start + lo).saturating_sub(self.pad))
    }

    /// cols (n·P, k·k·C_in) of the n channels-last images `xt` (n, H, W, C_in).
    fn im2col(&self, xt: &[f32], n: usize, cols: &mut [f32]) {
        let (c, k, patch) = (self.c_in, self.k, self.patch());
        for j in 0..n {
            let img = &xt[j * self.in_image()..][..self.in_image()];
            for oy in 0..self.oh {
                let (ylo, yhi, iy0) = self.inside(oy, self.h);
                for ox in 0..self.ow {
                    let (xlo, xhi, ix0) = self.inside(ox, self.w);
                    let row = (j * self.oh + oy) * self.ow + ox;
                    let dst = &mut cols[row * patch..][..patch];
                    for ki in 0..k {
                        let seg = &mut dst[ki * k * c..][..k * c];
                        if ki < ylo || ki >= yhi {
                            seg.fill(0.0);
                            continue;
                        }
                        let src = ((iy0 + ki - ylo) * self.w + ix0) * c;
                        seg[..xlo * c].fill(0.0);
                        seg[xlo * c..xhi * c].copy_from_slice(&img[src..][..(xhi - xlo) * c]);
                        seg[xhi * c..].fill(0.0);
                    }
                }
            }
        }
    }

    /// dxt += col2im(dcols) for n channels-last images (the adjoint of [`Geometry::im2col`]).
    /// Call it through [`simd!`], so its additions use the widest vectors the CPU has.
    #[inline(always)]
    fn col2im_add(&self, dcols: &[f32], n: usize, dxt: &mut [f32]) {
        let (c, k, patch) = (self.c_in, self.k, self.patch());
        for j in 0..n {
            let img = &mut dxt[j * self.in_image()..][..self.in_image()];
            for oy in 0..self.oh {
                let (ylo, yhi, iy0) = self.inside(oy, self.h);
                for ox in 0..self.ow {
                    let (xlo, xhi, ix0) = self.inside(ox, self.w);
                    let row = (j * self.oh + oy) * self.ow + ox;
                    let src = &dcols[row * patch..][..patch];
                    for ki in ylo..yhi {
                        let dst = ((iy0 + ki - ylo) * self.w + ix0) * c;
                        let run = &src[(ki * k + xlo) * c..(ki * k + xhi) * c];
                        for (d, &v) in img[dst..][..run.len()].iter_mut().zip(run) {
                            *d += v;
                        }
                    }
                }
            }
        }
    }
}

/// n images (n, C, P) ↔ (n, P, C): channels first to channels last, or back with C and P
/// swapped.
fn transpose_images(src: &[f32], n: usize, c: usize, p: usize, dst: &mut [f32]) {
    for j in 0..n {
        transpose(
            &src[j * c * p..][..c * p],
            c,
            p,
            &mut dst[j * c * p..][..c * p],
        );
    }
}

thread_local! {
    /// This thread's scratch buffers, kept between calls (see [`with_scratch`]).
    static SCRATCH: Cell<Vec<Vec<f32>>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on N scratch buffers of this thread with the given lengths, their contents
/// arbitrary. The buffers are taken out of the thread's store for the call and put back
/// after, so a nested call gets fresh ones.
fn with_scratch<R, const N: usize>(lens: [usize; N], f: impl FnOnce([&mut [f32]; N]) -> R) -> R {
    let mut bufs = SCRATCH.with(Cell::take);
    bufs.resize_with(bufs.len().max(N), Vec::new);
    for (b, &len) in bufs.iter_mut().zip(&lens) {
        if b.len() < len {
            b.resize(len, 0.0);
        }
    }
    let mut it = bufs.iter_mut().zip(lens).map(|(b, len)| &mut b[..len]);
    let slices: [&mut [f32]; N] = std::array::from_fn(|_| it.next().expect("N buffers"));
    let r = f(slices);
    SCRATCH.with(|s| s.set(bufs));
    r
}

/// `conv2d(x, w)` for CPU f32 tensors x and w (C_out, C_in, k, k) with zero `padding` and
/// `stride`: x (B, H, W, C_in) → (B, H', W', C_out) with `channels_last`, else
/// x (B, C_in, H, W) → (B, C_out, H', W').
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    channels_last: bool,
) -> Result<Tensor> {
    let geo = Geometry::new(x.dims(), w.dims(), stride, padding, channels_last)?;
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        Conv2d {
            geo,
            wt: OnceLock::new(),
        },
    )
}

struct Conv2d {
    geo: Geometry,
    /// The weight in patch order, see [`Conv2d::weight_t`].
    wt: OnceLock<Vec<f32>>,
}

impl Conv2d {
    /// W (C_out, C_in, k, k) as Wt (k·k·C_in, C_out), rows in patch order (ki, kj, c):
    /// computed once, in the forward, and kept for the backward.
    fn weight_t(&self, w: &[f32]) -> &[f32] {
        self.wt.get_or_init(|| {
            let g = self.geo;
            let mut by_channel = vec![0f32; w.len()]; // rows in order (c, ki, kj)
            transpose(w, g.c_out, g.patch(), &mut by_channel);
            let mut wt = vec![0f32; w.len()];
            reorder_rows(&by_channel, g.c_in, g.k * g.k, g.c_out, &mut wt);
            wt
        })
    }
}

/// Most chunks the backward cuts the groups into: each accumulates its groups' dW in one
/// buffer, and the chunks' buffers are added at the end.
const MAX_CHUNKS: usize = 16;

/// The group ranges [a, b) of the chunks of `groups` groups: at most [`MAX_CHUNKS`], sizes
/// differing by at most one, a function of the count only.
fn chunks(groups: usize) -> Vec<(usize, usize)> {
    let n = groups.clamp(1, MAX_CHUNKS);
    (0..n)
        .map(|i| (i * groups / n, (i + 1) * groups / n))
        .filter(|(a, b)| a < b)
        .collect()
}

/// The rows of a matrix of `a · b` rows of `len` floats, from order (i, j) (i < a, j < b)
/// to order (j, i).
fn reorder_rows(src: &[f32], a: usize, b: usize, len: usize, dst: &mut [f32]) {
    for i in 0..a {
        for j in 0..b {
            dst[(j * a + i) * len..][..len].copy_from_slice(&src[(i * b + j) * len..][..len]);
        }
    }
}

/// The right-hand side B (k, n) of one product per group, the same for every group of a
/// call (the weight): packed once for all of them where our own kernel runs the groups'
/// products ([`own_kernel_for`] of a full group's shape), passed to [`sgemm`] as it is
/// otherwise. Either way a product rounds as [`sgemm`] would round it.
enum SharedRhs {
    Packed(PackedB),
    Plain { k: usize, n: usize, rhs: MatRef },
}

impl SharedRhs {
    /// # Safety
    /// `rhs` must cover its (k, n) matrix inside one live allocation that outlives the
    /// value, unmodified meanwhile.
    unsafe fn new(group_rows: usize, k: usize, n: usize, rhs: MatRef) -> SharedRhs {
        let level = (k > 0 && n > 0)
            .then(|| own_kernel_for(group_rows, n, k))
            .flatten();
        if let Some(level) = level {
            // SAFETY: own_kernel_for checked the level's instruction set; the view is the
            // caller's.
            SharedRhs::Packed(unsafe { PackedB::new(level, k, n, rhs) })
        } else {
            SharedRhs::Plain { k, n, rhs }
        }
    }

    /// dst (m, n), row stride n, = lhs (m, k) · B.
    ///
    /// # Safety
    /// `lhs` must cover (m, k) and `dst` (m, n) inside live allocations; dst overlaps
    /// neither operand and no one else writes it.
    unsafe fn product(&self, m: usize, lhs: MatRef, dst: *mut f32) {
        // SAFETY: the caller's contract, and new's for B.
        unsafe {
            match *self {
                SharedRhs::Packed(ref b) => {
                    let epi = Epilogue::new(None, false);
                    sgemm_packed(m, dst, b.n(), 1, lhs, b, 1.0, false, epi)
                }
                SharedRhs::Plain { k, n, rhs } => sgemm(m, n, k, dst, n, 1, lhs, rhs, 1.0, false),
            }
        }
    }
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "vit-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geo;
        let (x, w) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?);
        let (hw, p) = (g.h * g.w, g.out_plane());
        // Wt (patch, C_out), kept in self.wt as long as the op, unchanged.
        let wm = MatRef::new(self.weight_t(w).as_ptr(), g.c_out as isize, 1);
        // SAFETY: wm covers Wt, which outlives `wt`.
        let wt = unsafe { SharedRhs::new(g.per_group() * p, g.patch(), g.c_out, wm) };
        let groups = g.groups();
        // Block i of y is group i's images.
        let y = new_blocks(
            g.batch * g.out_image(),
            g.per_group() * g.out_image(),
            |gi, yg| {
                let (i0, i1) = groups[gi];
                let n = i1 - i0;
                let lens = [
                    g.copy_len(n, g.c_in, hw),
                    n * p * g.patch(),
                    g.copy_len(n, g.c_out, p),
                ];
                with_scratch(lens, |[xbuf, cols, ybuf]| {
                    let xt = g.channels_last_view(&x[i0 * g.in_image()..], n, g.c_in, hw, xbuf);
                    g.im2col(xt, n, cols);
                    // The product lands in y itself where it is channels last.
                    let yt = if g.channels_last {
                        &mut *yg
                    } else {
                        &mut *ybuf
                    };
                    // SAFETY: cols is (n·P, patch) and yt (n·P, C_out), whole live buffers;
                    // yt overlaps neither operand.
                    unsafe {
                        let cm = MatRef::new(cols.as_ptr(), g.patch() as isize, 1);
                        wt.product(n * p, cm, yt.as_mut_ptr())
                    };
                    if !g.channels_last {
                        transpose_images(ybuf, n, p, g.c_out, yg);
                    }
                })
            },
        );
        let shape = g.shape(g.c_out, g.oh, g.ow);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.geo;
        let (hw, p, patch) = (g.h * g.w, g.out_plane(), g.patch());
        // The input's gradient only where something upstream needs it (not for the images
        // under a stem).
        let need_dx = x.track_op();
        // Uninitialised: each group zeroes its own images, in its task, before adding to them.
        let mut dx: Vec<f32> = Vec::with_capacity(g.batch * g.in_image());
        let dx_ptr = SendPtr(dx.as_mut_ptr());
        let groups = g.groups();
        let partials = with_f32([x, w, grad], |[x, w, gy]| {
            // Wt (patch, C_out), kept in self.wt as long as the op, unchanged.
            let wm = MatRef::new(self.weight_t(w).as_ptr(), g.c_out as isize, 1);
            // dcols = G · Wtᵀ for every group: Wtᵀ (C_out, patch) shared, packed once.
            // SAFETY: wm covers Wt, which outlives `wtt`.
            let wtt = need_dx
                .then(|| unsafe { SharedRhs::new(g.per_group() * p, g.c_out, patch, wm.t()) });
            chunks(groups.len())
                .into_par_iter()
                .map(|(a, b)| {
                    // This chunk's dWt, its groups' products accumulated in order.
                    let mut dwt = vec![0f32; patch * g.c_out];
                    for (k, &(i0, i1)) in groups[a..b].iter().enumerate() {
                        let n = i1 - i0;
                        let lens = [
                            g.copy_len(n, g.c_in, hw),
                            n * p * patch,
                            g.copy_len(n, g.c_out, p),
                            n * p * patch,
                        ];
                        with_scratch(lens, |[xbuf, cols, gbuf, dcols]| {
                            let x = &x[i0 * g.in_image()..];
                            let xt = g.channels_last_view(x, n, g.c_in, hw, xbuf);
                            g.im2col(xt, n, cols);
                            let gy = &gy[i0 * g.out_image()..];
                            let gt = g.channels_last_view(gy, n, g.c_out, p, gbuf);
                            // G (n·P, C_out) and cols (n·P, patch), row-major.
                            let gm = MatRef::new(gt.as_ptr(), g.c_out as isize, 1);
                            let cm = MatRef::new(cols.as_ptr(), patch as isize, 1);
                            // SAFETY: the views match their buffers' shapes; dwt (patch,
                            // C_out) and dcols (n·P, patch) are this task's own and overlap
                            // no operand.
                            unsafe {
                                sgemm(
                                    patch,
                                    g.c_out,
                                    n * p,
                                    dwt.as_mut_ptr(),
                                    g.c_out,
                                    1,
                                    cm.t(),
                                    gm,
                                    1.0,
                                    k > 0,
                                );
                                if let Some(wtt) = &wtt {
                                    wtt.product(n * p, gm, dcols.as_mut_ptr());
                                }
                            }
                            if !need_dx {
                                return;
                            }
                            // SAFETY: this group owns images i0..i1 of dx (n · in_image
                            // floats from i0 · in_image, inside its allocation), which no
                            // other group reads or writes; dx outlives the tasks. They are
                            // zeroed before the slice is formed.
                            let dxg = unsafe {
                                let p = dx_ptr.get().add(i0 * g.in_image());
                                std::ptr::write_bytes(p, 0, n * g.in_image());
                                std::slice::from_raw_parts_mut(p, n * g.in_image())
                            };
                            if g.channels_last {
                                simd!(g.col2im_add(dcols, n, dxg));
                            } else {
                                // xbuf is free again: the group's dx in channels-last order.
                                xbuf.fill(0.0);
                                simd!(g.col2im_add(dcols, n, xbuf));
                                transpose_images(xbuf, n, hw, g.c_in, dxg);
                            }
                        });
                    }
                    dwt
                })
                .collect::<Vec<_>>()
        })?;
        if need_dx {
            // SAFETY: the groups cover images 0..batch, and each group's task (all finished)
            // zeroed and then wrote its n · in_image floats; len ≤ capacity.
            unsafe { dx.set_len(g.batch * g.in_image()) };
        }
        let dwt = sum_in_order(partials, patch * g.c_out);
        // dWt (patch, C_out) back to W's layout (C_out, C_in, k, k).
        let mut by_channel = vec![0f32; dwt.len()];
        reorder_rows(&dwt, g.k * g.k, g.c_in, g.c_out, &mut by_channel);
        let mut dw = vec![0f32; dwt.len()];
        transpose(&by_channel, patch, g.c_out, &mut dw);
        let dev = x.device();
        let dx = match need_dx {
            true => Some(Tensor::from_vec(dx, g.shape(g.c_in, g.h, g.w), dev)?),
            false => None,
        };
        Ok((
            dx,
            Some(Tensor::from_vec(dw, (g.c_out, g.c_in, g.k, g.k), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use candle_core::{DType, Tensor};

    fn fused(stride: usize, pad: usize) -> impl Fn(&[Tensor]) -> Tensor {
        move |t| super::conv2d(&t[0], &t[1], stride, pad, false).unwrap()
    }

    /// The channels-last kernel between permutes, so it takes and gives channels first.
    fn fused_nhwc(stride: usize, pad: usize) -> impl Fn(&[Tensor]) -> Tensor {
        move |t| {
            let x = t[0].permute((0, 2, 3, 1)).unwrap();
            let y = super::conv2d(&x, &t[1], stride, pad, true).unwrap();
            y.permute((0, 3, 1, 2)).unwrap()
        }
    }

    /// candle's own convolution (forward and, through conv-transpose, backward).
    fn composed(stride: usize, pad: usize) -> impl Fn(&[Tensor]) -> Tensor {
        move |t| t[0].conv2d(&t[1], pad, stride, 1, 1).unwrap()
    }

    /// (batch, C_in, H, W, C_out, k, stride, padding): 1×1, 3×3 and 7×7 kernels, strides 1
    /// and 2, odd and even sizes (equal remainders on both axes, where candle's backward is
    /// right), several groups, several groups per chunk, and one image larger than a group.
    const CASES: &[[usize; 8]] = &[
        [1, 1, 1, 1, 1, 1, 1, 0],
        [2, 3, 5, 5, 4, 3, 1, 1],
        [3, 2, 7, 9, 5, 3, 2, 1],
        [5, 4, 6, 6, 3, 1, 2, 0],
        [2, 3, 13, 13, 4, 7, 2, 3],
        [40, 3, 4, 4, 6, 3, 1, 1],
        [2, 2, 20, 18, 3, 3, 1, 1],
        [2, 1, 1, 1, 2, 7, 2, 3], // a 1×1 image under a 7×7 kernel: most offsets outside
        [40, 2, 16, 16, 3, 3, 1, 1], // 40 groups in 16 chunks: dW accumulated across groups
        [1, 2, 3, 3, 2, 7, 2, 3],
    ];

    #[test]
    fn matches_candles_convolution_values_and_gradients() {
        for (i, case) in CASES.iter().enumerate() {
            matches_candle(i, *case);
        }
    }

    /// Large enough for our own kernels (AVX-512, or AVX2 under `VIT_SIMD=avx2`): the weight packed once for
    /// every group in forward, its transpose once in backward. Two 12×12 images per group,
    /// the last group one image, 128 → 256 channels.
    #[test]
    fn large_layers_match_candles_convolution() {
        let (rows, patch, c_out) = (2 * 144, 128 * 9, 256);
        let own = super::own_kernel_for(rows, c_out, patch).is_some()
            && super::own_kernel_for(rows, patch, c_out).is_some();
        assert!(own || !is_avx512f());
        matches_candle(0, [3, 128, 12, 12, c_out, 3, 1, 1]);
    }

    /// Case `[b, c, h, w, co, k, s, p]` of the fused convolution against candle's, values
    /// and both gradients.
    fn matches_candle(i: usize, [b, c, h, w, co, k, s, p]: [usize; 8]) {
        let seed = i as u64 * 3;
        let inp = vec![
            rand(&[b, c, h, w], 1.0, seed),
            rand(&[co, c, k, k], 0.5, seed + 1),
        ];
        let y = fused(s, p)(&inp);
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let cot = cotangent(&[b, co, oh, ow], seed);
        let (yc, gc) = value_and_grads(composed(s, p), &inp, &cot);
        assert_eq!(y.dims(), yc.dims());
        for layout in ["first", "last"] {
            let (yf, gf) = match layout {
                "first" => value_and_grads(fused(s, p), &inp, &cot),
                _ => value_and_grads(fused_nhwc(s, p), &inp, &cot),
            };
            // f32 sums of c·k² products, rounded once more per depth block of the kernel
            // (AVX2's are 256 deep).
            let tol = 1e-5 * (1.0 + (c * k * k) as f64 / 512.0).sqrt();
            let d = max_rel_diff(&yf, &yc);
            assert!(d < tol, "case {i} channels {layout} forward: {d}");
            for j in 0..2 {
                let tol = 1e-4 * (1.0 + (b * oh * ow) as f64).sqrt();
                let d = max_rel_diff(&gf[j], &gc[j]);
                assert!(d < tol, "case {i} channels {layout} grad {j}");
            }
        }
    }

    /// Against central differences in f64 on tiny shapes, an oracle without any backward.
    #[test]
    fn gradients_match_finite_differences() {
        for &[b, c, h, w, co, k, s, p] in &[[2, 2, 5, 4, 3, 3, 2, 1], [1, 1, 3, 3, 2, 1, 1, 0]] {
            let inp = vec![rand(&[b, c, h, w], 1.0, 7), rand(&[co, c, k, k], 0.5, 8)];
            let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
            let cot = cotangent(&[b, co, oh, ow], 9);
            let f64_conv = |t: &[Tensor]| t[0].conv2d(&t[1], p, s, 1, 1).unwrap();
            let fd = finite_diff(f64_conv, &inp, &cot);
            let first = value_and_grads(fused(s, p), &inp, &cot).1;
            let last = value_and_grads(fused_nhwc(s, p), &inp, &cot).1;
            for (layout, gf) in [("first", first), ("last", last)] {
                for j in 0..2 {
                    let fd = fd[j].to_dtype(DType::F32).unwrap();
                    assert!(
                        max_rel_diff(&gf[j], &fd) < 1e-4,
                        "channels {layout} grad {j}"
                    );
                }
            }
        }
    }

    /// An input that needs no gradient (the images under a stem) gets none, and the
    /// weight's gradient is the same as when it does.
    #[test]
    fn no_input_gradient_where_none_is_needed() {
        let (x, w) = (rand(&[3, 2, 9, 9], 1.0, 4), rand(&[5, 2, 3, 3], 0.5, 5));
        let wv = candle_core::Var::from_tensor(&w).unwrap();
        let y = super::conv2d(&x, wv.as_tensor(), 1, 1, false).unwrap();
        let cot = cotangent(&[3, 5, 9, 9], 6);
        let grads = (&y * &cot).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        let (_, both) = value_and_grads(fused(1, 1), &[x, w], &cot);
        assert_eq!(flat(grads.get(wv.as_tensor()).unwrap()), flat(&both[1]));
    }

    /// The same numbers on one thread as on several: groups and chunks, not threads, split
    /// the work (40 groups of one 16×16 image, in 16 chunks of two or three).
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let inp = vec![rand(&[40, 3, 16, 16], 1.0, 1), rand(&[4, 3, 3, 3], 0.5, 2)];
        let cot = cotangent(&[40, 4, 16, 16], 3);
        assert_thread_count_free(fused(1, 1), &inp, &cot);
    }
}
