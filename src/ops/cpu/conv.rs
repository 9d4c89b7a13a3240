//! Fused 2-D convolution over NCHW f32 tensors: a square k×k kernel, zero padding, a stride,
//! no bias, no dilation, one group (every convolution of the ResNets), lowered onto the
//! matrix-multiply provider by im2col.
//!
//! The batch is cut into groups of consecutive images, enough of them that a group's output
//! has at least [`GROUP_COLUMNS`] positions (one image at 28×28, sixteen at 4×4), so every
//! product is large enough to run efficiently. Per group, with cols = im2col(x) of shape
//! (C_in·k·k, images·H'·W') and W viewed as (C_out, C_in·k·k):
//!
//!   forward   y = W · cols                     (C_out, images·H'·W'), scattered to NCHW
//!   backward  dW += G · colsᵀ,  dcols = Wᵀ · G, dx = col2im(dcols)
//!
//! with G the group's output gradient gathered as (C_out, images·H'·W'). Groups run in
//! parallel on rayon's pool; their boundaries depend only on the shape, each group's dx is its
//! own, and the groups' partial dW are added in group order, so results never depend on the
//! number of threads. cols is recomputed in backward rather than kept (it is k² times the
//! input).

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::sgemm;
use super::matrix::MatRef;
use super::par::SendPtr;
use super::storage::{f32_slice, with_f32};

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
}

impl Geometry {
    fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[batch, c_in, h, wd], &[c_out, wc, k, k2]) = (x, w) else {
            bail!("conv2d: input {x:?} and weight {w:?} must both have 4 dimensions")
        };
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
        })
    }

    /// Rows of cols: C_in·k·k.
    fn ckk(&self) -> usize {
        self.c_in * self.k * self.k
    }

    fn in_plane(&self) -> usize {
        self.h * self.w
    }

    fn out_plane(&self) -> usize {
        self.oh * self.ow
    }

    /// The image ranges of the groups: a function of the shape only.
    fn groups(&self) -> Vec<(usize, usize)> {
        let per = GROUP_COLUMNS
            .div_ceil(self.out_plane().max(1))
            .clamp(1, self.batch.max(1));
        (0..self.batch)
            .step_by(per)
            .map(|i| (i, (i + per).min(self.batch)))
            .collect()
    }

    /// The input row `iy` (or column) read by output position `o` at kernel offset `ki`,
    /// when it is inside the image.
    fn source(&self, o: usize, ki: usize, len: usize) -> Option<usize> {
        (o * self.stride + ki)
            .checked_sub(self.pad)
            .filter(|&i| i < len)
    }

    /// The output columns [lo, hi) whose input column at kernel offset `kj` is inside the
    /// image (ox·stride + kj − pad in 0..W); empty when none is.
    fn inside(&self, kj: usize) -> (usize, usize) {
        let lo = self
            .pad
            .saturating_sub(kj)
            .div_ceil(self.stride)
            .min(self.ow);
        // Largest ox with ox·stride + kj − pad ≤ W − 1.
        let hi = match (self.w + self.pad).checked_sub(kj + 1) {
            Some(last) => (last / self.stride + 1).min(self.ow),
            None => 0,
        };
        (lo, hi.max(lo))
    }

    /// cols (C_in·k·k, n·H'·W') of the n images in `x`, written into `cols`.
    fn im2col(&self, x: &[f32], n: usize, cols: &mut [f32]) {
        let (plane, oplane, ncols) = (self.in_plane(), self.out_plane(), n * self.out_plane());
        for c in 0..self.c_in {
            for ki in 0..self.k {
                for kj in 0..self.k {
                    let row = (c * self.k + ki) * self.k + kj;
                    let dst_row = &mut cols[row * ncols..(row + 1) * ncols];
                    for j in 0..n {
                        let src = &x[(j * self.c_in + c) * plane..][..plane];
                        for oy in 0..self.oh {
                            let dst = &mut dst_row[j * oplane + oy * self.ow..][..self.ow];
                            let Some(iy) = self.source(oy, ki, self.h) else {
                                dst.fill(0.0);
                                continue;
                            };
                            let src_row = &src[iy * self.w..][..self.w];
                            let (lo, hi) = self.inside(kj);
                            dst[..lo].fill(0.0);
                            dst[hi..].fill(0.0);
                            if lo == hi {
                                continue;
                            }
                            let first = lo * self.stride + kj - self.pad;
                            if self.stride == 1 {
                                dst[lo..hi].copy_from_slice(&src_row[first..first + hi - lo]);
                            } else {
                                let picked = src_row[first..].iter().step_by(self.stride);
                                for (d, &v) in dst[lo..hi].iter_mut().zip(picked) {
                                    *d = v;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// dx += col2im(dcols) for the n images of `dx` (the adjoint of [`Geometry::im2col`]).
    fn col2im_add(&self, dcols: &[f32], n: usize, dx: &mut [f32]) {
        let (plane, oplane, ncols) = (self.in_plane(), self.out_plane(), n * self.out_plane());
        for c in 0..self.c_in {
            for ki in 0..self.k {
                for kj in 0..self.k {
                    let row = (c * self.k + ki) * self.k + kj;
                    let src_row = &dcols[row * ncols..(row + 1) * ncols];
                    for j in 0..n {
                        let dst = &mut dx[(j * self.c_in + c) * plane..][..plane];
                        for oy in 0..self.oh {
                            let Some(iy) = self.source(oy, ki, self.h) else {
                                continue;
                            };
                            let src = &src_row[j * oplane + oy * self.ow..][..self.ow];
                            let dst_row = &mut dst[iy * self.w..][..self.w];
                            let (lo, hi) = self.inside(kj);
                            if lo == hi {
                                continue;
                            }
                            let first = lo * self.stride + kj - self.pad;
                            let targets = dst_row[first..].iter_mut().step_by(self.stride);
                            for (d, &v) in targets.zip(&src[lo..hi]) {
                                *d += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `conv2d(x, w)` for CPU f32 tensors x (B, C_in, H, W) and w (C_out, C_in, k, k) with zero
/// `padding` and `stride`: (B, C_out, H', W').
pub(crate) fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let geo = Geometry::new(x.dims(), w.dims(), stride, padding)?;
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv2d { geo })
}

struct Conv2d {
    geo: Geometry,
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
        let out_image = g.c_out * g.out_plane();
        let mut y = vec![0f32; g.batch * out_image];
        let y_ptr = SendPtr(y.as_mut_ptr());
        g.groups().par_iter().for_each(|&(i0, i1)| {
            let n = i1 - i0;
            let ncols = n * g.out_plane();
            let mut cols = vec![0f32; g.ckk() * ncols];
            g.im2col(&x[i0 * g.c_in * g.in_plane()..], n, &mut cols);
            let mut out = vec![0f32; g.c_out * ncols];
            // SAFETY: W is (C_out, C_in·k·k), cols (C_in·k·k, ncols) and out (C_out, ncols),
            // each a whole live Vec or slice; out overlaps neither operand.
            unsafe {
                sgemm(
                    g.c_out,
                    ncols,
                    g.ckk(),
                    out.as_mut_ptr(),
                    ncols,
                    1,
                    MatRef::new(w.as_ptr(), g.ckk() as isize, 1),
                    MatRef::new(cols.as_ptr(), ncols as isize, 1),
                    1.0,
                    false,
                )
            };
            // SAFETY: this group owns images i0..i1 of y (n · out_image floats from
            // i0 · out_image), which no other group reads or writes; y outlives the tasks.
            let yg = unsafe {
                std::slice::from_raw_parts_mut(y_ptr.get().add(i0 * out_image), n * out_image)
            };
            scatter(&out, n, g.c_out, g.out_plane(), yg);
        });
        let shape = Shape::from((g.batch, g.c_out, g.oh, g.ow));
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
        let in_image = g.c_in * g.in_plane();
        let out_image = g.c_out * g.out_plane();
        let mut dx = vec![0f32; g.batch * in_image];
        let dx_ptr = SendPtr(dx.as_mut_ptr());
        let partials = with_f32([x, w, grad], |[x, w, gy]| {
            g.groups()
                .par_iter()
                .map(|&(i0, i1)| {
                    let n = i1 - i0;
                    let ncols = n * g.out_plane();
                    let mut gt = vec![0f32; g.c_out * ncols];
                    gather(
                        &gy[i0 * out_image..][..n * out_image],
                        n,
                        g.c_out,
                        g.out_plane(),
                        &mut gt,
                    );
                    let mut cols = vec![0f32; g.ckk() * ncols];
                    g.im2col(&x[i0 * in_image..], n, &mut cols);
                    let mut dw = vec![0f32; g.c_out * g.ckk()];
                    let mut dcols = vec![0f32; g.ckk() * ncols];
                    let gm = MatRef::new(gt.as_ptr(), ncols as isize, 1); // (C_out, ncols)
                    let colsm = MatRef::new(cols.as_ptr(), ncols as isize, 1); // (ckk, ncols)
                    let wm = MatRef::new(w.as_ptr(), g.ckk() as isize, 1); // (C_out, ckk)
                                                                           // SAFETY: the views match their Vecs' shapes (G (C_out, ncols), cols
                                                                           // (ckk, ncols), W (C_out, ckk)); dw (C_out, ckk) and dcols (ckk, ncols)
                                                                           // are fresh and overlap no operand.
                    unsafe {
                        sgemm(
                            g.c_out,
                            g.ckk(),
                            ncols,
                            dw.as_mut_ptr(),
                            g.ckk(),
                            1,
                            gm,
                            colsm.t(),
                            1.0,
                            false,
                        );
                        sgemm(
                            g.ckk(),
                            ncols,
                            g.c_out,
                            dcols.as_mut_ptr(),
                            ncols,
                            1,
                            wm.t(),
                            gm,
                            1.0,
                            false,
                        );
                    }
                    // SAFETY: this group owns images i0..i1 of dx (n · in_image floats from
                    // i0 · in_image, zeroed), which no other group reads or writes.
                    let dxg = unsafe {
                        std::slice::from_raw_parts_mut(
                            dx_ptr.get().add(i0 * in_image),
                            n * in_image,
                        )
                    };
                    g.col2im_add(&dcols, n, dxg);
                    dw
                })
                .collect::<Vec<_>>()
        })?;
        let mut parts = partials.into_iter();
        let mut dw = parts
            .next()
            .unwrap_or_else(|| vec![0f32; g.c_out * g.ckk()]);
        for p in parts {
            dw.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (g.batch, g.c_in, g.h, g.w), dev)?),
            Some(Tensor::from_vec(dw, (g.c_out, g.c_in, g.k, g.k), dev)?),
        ))
    }
}

/// (C, n·P) grouped by channel → n images of (C, P).
fn scatter(grouped: &[f32], n: usize, c: usize, plane: usize, images: &mut [f32]) {
    for j in 0..n {
        for ch in 0..c {
            images[(j * c + ch) * plane..][..plane]
                .copy_from_slice(&grouped[ch * n * plane + j * plane..][..plane]);
        }
    }
}

/// n images of (C, P) → (C, n·P) grouped by channel.
fn gather(images: &[f32], n: usize, c: usize, plane: usize, grouped: &mut [f32]) {
    for j in 0..n {
        for ch in 0..c {
            grouped[ch * n * plane + j * plane..][..plane]
                .copy_from_slice(&images[(j * c + ch) * plane..][..plane]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use candle_core::{DType, Tensor};

    fn fused(stride: usize, pad: usize) -> impl Fn(&[Tensor]) -> Tensor {
        move |t| super::conv2d(&t[0], &t[1], stride, pad).unwrap()
    }

    /// candle's own convolution (forward and, through conv-transpose, backward).
    fn composed(stride: usize, pad: usize) -> impl Fn(&[Tensor]) -> Tensor {
        move |t| t[0].conv2d(&t[1], pad, stride, 1, 1).unwrap()
    }

    /// (batch, C_in, H, W, C_out, k, stride, padding): 1×1, 3×3 and 7×7 kernels, strides 1
    /// and 2, odd and even sizes (equal remainders on both axes, where candle's backward is
    /// right), several groups and one image larger than a group.
    const CASES: &[[usize; 8]] = &[
        [1, 1, 1, 1, 1, 1, 1, 0],
        [2, 3, 5, 5, 4, 3, 1, 1],
        [3, 2, 7, 9, 5, 3, 2, 1],
        [5, 4, 6, 6, 3, 1, 2, 0],
        [2, 3, 13, 13, 4, 7, 2, 3],
        [40, 3, 4, 4, 6, 3, 1, 1],
        [2, 2, 20, 18, 3, 3, 1, 1],
        [2, 1, 1, 1, 2, 7, 2, 3], // a 1×1 image under a 7×7 kernel: most offsets outside
        [1, 2, 3, 3, 2, 7, 2, 3],
    ];

    #[test]
    fn matches_candles_convolution_values_and_gradients() {
        for (i, &[b, c, h, w, co, k, s, p]) in CASES.iter().enumerate() {
            let seed = i as u64 * 3;
            let inp = vec![
                rand(&[b, c, h, w], 1.0, seed),
                rand(&[co, c, k, k], 0.5, seed + 1),
            ];
            let y = fused(s, p)(&inp);
            let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
            let cot = cotangent(&[b, co, oh, ow], seed);
            let (yf, gf) = value_and_grads(fused(s, p), &inp, &cot);
            let (yc, gc) = value_and_grads(composed(s, p), &inp, &cot);
            assert_eq!(y.dims(), yc.dims());
            assert!(max_rel_diff(&yf, &yc) < 1e-5, "case {i} forward");
            for j in 0..2 {
                let tol = 1e-4 * (1.0 + (b * oh * ow) as f64).sqrt();
                assert!(max_rel_diff(&gf[j], &gc[j]) < tol, "case {i} grad {j}");
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
            let (_, gf) = value_and_grads(fused(s, p), &inp, &cot);
            let f64_conv = |t: &[Tensor]| t[0].conv2d(&t[1], p, s, 1, 1).unwrap();
            let fd = finite_diff(f64_conv, &inp, &cot);
            for j in 0..2 {
                let fd = fd[j].to_dtype(DType::F32).unwrap();
                assert!(max_rel_diff(&gf[j], &fd) < 1e-4, "grad {j}");
            }
        }
    }

    /// The same numbers on one thread as on several: groups, not threads, split the work.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let inp = vec![rand(&[40, 3, 6, 6], 1.0, 1), rand(&[4, 3, 3, 3], 0.5, 2)];
        let cot = cotangent(&[40, 4, 6, 6], 3);
        let run = || value_and_grads(fused(1, 1), &inp, &cot);
        let (y1, g1) = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(run);
        let (y3, g3) = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(run);
        assert_eq!(flat(&y1), flat(&y3));
        for j in 0..2 {
            assert_eq!(flat(&g1[j]), flat(&g3[j]));
        }
    }
}
