//! Depth-wise 3×3 convolution with padding 1 and a bias on channels-last maps (PVT v2's
//! `dwconv`): each channel convolved with its own 3×3 taps, the channels as vector lanes.
//!
//!   y[b, h, w, c] = bias[c] + Σ_{i,j} x[b, h+i−1, w+j−1, c] · W[c, i, j]
//! Backward, for G = ∂L/∂y:
//!   dx[b, r, s, c] = Σ_{i,j} G[b, r−i+1, s−j+1, c] · W[c, i, j]
//!   dW[c, i, j]    = Σ_{b,h,w} G[b, h, w, c] · x[b, h+i−1, w+j−1, c],  dbias[c] = Σ G
//! Output rows (b, h) are independent, in parallel blocks; dW and dbias are per-block
//! partial sums added in block order, so results do not depend on the thread count.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::par::{new_row_blocks, rows_per_block, sum_in_order};
use super::simd::simd;
use super::storage::{f32_slice, with_f32};

/// Depth-wise 3×3 convolution (padding 1, stride 1) of a CPU f32 `x` (B, H, W, C) with
/// `weight` (C, 1, 3, 3) and `bias` (C,).
pub(crate) fn depthwise_conv3x3(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, _, _, c) = x.dims4()?;
    if weight.dims() != [c, 1, 3, 3] || bias.dims() != [c] {
        bail!(
            "depth-wise convolution: {c} channels need weight (C, 1, 3, 3) and bias (C,), got \
             {:?} and {:?}",
            weight.dims(),
            bias.dims()
        )
    }
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Depthwise)
}

struct Depthwise;

/// Map geometry.
#[derive(Clone, Copy)]
struct Dims {
    h: usize,
    w: usize,
    c: usize,
}

/// The taps as (9, C): tap i·3 + j of every channel, contiguous over channels.
fn taps(weight: &[f32], c: usize) -> Vec<f32> {
    let mut t = vec![0f32; 9 * c];
    for ch in 0..c {
        for k in 0..9 {
            t[k * c + ch] = weight[ch * 9 + k];
        }
    }
    t
}

/// acc[..] += a[..] · b[..].
#[inline(always)]
fn fma_into(acc: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, &x), &t) in acc.iter_mut().zip(a).zip(b) {
        *o += x * t;
    }
}

/// One output row of the convolution of `src` (one image, H × W × C) with `taps`, reading
/// source rows `row + i − 1` (i = 0, 1, 2) shifted by `j − 1` columns; `flip` reads
/// `row − i + 1` and `j` mirrored instead (the input gradient's transposed convolution).
#[inline(always)]
fn conv_row(src: &[f32], taps: &[f32], d: Dims, row: usize, flip: bool, out: &mut [f32]) {
    let (w, c) = (d.w, d.c);
    for i in 0..3 {
        let r = if flip { row + 1 } else { row + i };
        let r = r.wrapping_sub(if flip { i } else { 1 });
        if r >= d.h {
            continue;
        }
        let src_row = &src[r * w * c..(r + 1) * w * c];
        for j in 0..3 {
            let tap = &taps[(i * 3 + j) * c..(i * 3 + j + 1) * c];
            for col in 0..w {
                let s = if flip { col + 1 } else { col + j };
                let s = s.wrapping_sub(if flip { j } else { 1 });
                if s >= w {
                    continue;
                }
                fma_into(
                    &mut out[col * c..(col + 1) * c],
                    &src_row[s * c..(s + 1) * c],
                    tap,
                );
            }
        }
    }
}

/// The convolution of `src` (B, H, W, C) with `taps`, plus `bias` if given, in parallel
/// blocks of output rows.
fn convolve(src: &[f32], taps: &[f32], bias: Option<&[f32]>, d: Dims, flip: bool) -> Vec<f32> {
    let width = d.w * d.c;
    let image = d.h * width;
    new_row_blocks(
        src.len(),
        width,
        #[inline(always)]
        |first, block| {
            for (k, out) in block.chunks_exact_mut(width).enumerate() {
                let (bi, row) = ((first + k) / d.h, (first + k) % d.h);
                if let Some(bias) = bias {
                    for px in out.chunks_exact_mut(d.c) {
                        px.copy_from_slice(bias);
                    }
                }
                conv_row(&src[bi * image..(bi + 1) * image], taps, d, row, flip, out);
            }
        },
    )
}

impl CustomOp3 for Depthwise {
    fn name(&self) -> &'static str {
        "vit-depthwise-conv3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, h, w, c) = l1.shape().dims4()?;
        let (x, weight, bias) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let y = convolve(x, &taps(weight, c), Some(bias), Dims { h, w, c }, false);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, h, w, c) = x.dims4()?;
        let d = Dims { h, w, c };
        let (dx, dweight, dbias) = with_f32([x, weight, g], |[x, weight, g]| {
            let dx = convolve(g, &taps(weight, c), None, d, true);
            // Per block of rows: Σ G·x per tap (9 × C), then Σ G (C).
            let width = w * c;
            let rows = x.len() / width.max(1);
            let per_block = rows_per_block(width);
            let parts: Vec<Vec<f32>> = (0..rows.div_ceil(per_block))
                .into_par_iter()
                .map(|blk| {
                    simd!(weight_grads(
                        x,
                        g,
                        d,
                        blk * per_block..(blk * per_block + per_block).min(rows)
                    ))
                })
                .collect();
            let sums = sum_in_order(parts, 10 * c);
            let mut dweight = vec![0f32; 9 * c];
            for ch in 0..c {
                for k in 0..9 {
                    dweight[ch * 9 + k] = sums[k * c + ch];
                }
            }
            (dx, dweight, sums[9 * c..].to_vec())
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dweight, (c, 1, 3, 3), dev)?),
            Some(Tensor::from_vec(dbias, c, dev)?),
        ))
    }
}

/// Over the output rows `rows` (flat b·H + h): Σ G·x for each tap, as (9, C), then Σ G (C).
#[inline(always)]
fn weight_grads(x: &[f32], g: &[f32], d: Dims, rows: std::ops::Range<usize>) -> Vec<f32> {
    let (w, c) = (d.w, d.c);
    let mut acc = vec![0f32; 10 * c];
    for flat in rows {
        let (bi, row) = (flat / d.h, flat % d.h);
        let g_row = &g[flat * w * c..(flat + 1) * w * c];
        for col in 0..w {
            let gp = &g_row[col * c..(col + 1) * c];
            for (a, &v) in acc[9 * c..].iter_mut().zip(gp) {
                *a += v;
            }
            for i in 0..3 {
                let r = (row + i).wrapping_sub(1);
                if r >= d.h {
                    continue;
                }
                for j in 0..3 {
                    let s = (col + j).wrapping_sub(1);
                    if s >= w {
                        continue;
                    }
                    let at = ((bi * d.h + r) * w + s) * c;
                    let k = i * 3 + j;
                    fma_into(&mut acc[k * c..(k + 1) * c], gp, &x[at..at + c]);
                }
            }
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use candle_core::Tensor;

    fn fused(t: &[Tensor]) -> Tensor {
        super::depthwise_conv3x3(&t[0], &t[1], &t[2]).unwrap()
    }

    fn composed(t: &[Tensor]) -> Tensor {
        crate::ops::depthwise_conv3x3_composed(&t[0], &t[1], &t[2]).unwrap()
    }

    /// (B, H, W, C): one pixel, one row, odd sizes, many channels.
    const SHAPES: &[[usize; 4]] = &[[1, 1, 1, 1], [2, 1, 5, 3], [2, 4, 3, 5], [1, 7, 6, 33]];

    #[test]
    fn matches_composed_values_and_gradients() {
        for (k, &shape) in SHAPES.iter().enumerate() {
            let c = shape[3];
            let inp = vec![
                rand(&shape, 2.0, k as u64),
                rand(&[c, 1, 3, 3], 1.0, 10 + k as u64),
                rand(&[c], 1.0, 20 + k as u64),
            ];
            let cot = cotangent(&shape, k as u64);
            let (yf, gf) = value_and_grads(fused, &inp, &cot);
            let (yc, gc) = value_and_grads(composed, &inp, &cot);
            assert!(max_rel_diff(&yf, &yc) < 1e-5, "{shape:?} forward");
            for i in 0..3 {
                assert!(max_rel_diff(&gf[i], &gc[i]) < 1e-4, "{shape:?} grad {i}");
            }
        }
    }

    #[test]
    fn gradients_match_central_differences() {
        let inp = vec![
            rand(&[2, 3, 4, 2], 1.0, 5),
            rand(&[2, 1, 3, 3], 1.0, 6),
            rand(&[2], 1.0, 7),
        ];
        let cot = cotangent(&[2, 3, 4, 2], 8);
        let (_, analytic) = value_and_grads(fused, &inp, &cot);
        let numeric = finite_diff(composed, &inp, &cot);
        for (a, n) in analytic.iter().zip(&numeric) {
            let e = max_rel_diff(a, n);
            assert!(e < 1e-4, "{e}");
        }
    }

    #[test]
    fn a_weight_of_another_shape_is_an_error() {
        let x = rand(&[1, 2, 2, 3], 1.0, 1);
        let e = super::depthwise_conv3x3(&x, &rand(&[3, 1, 5, 5], 1.0, 2), &rand(&[3], 1.0, 3));
        assert!(e.unwrap_err().to_string().contains("weight (C, 1, 3, 3)"));
    }
}
