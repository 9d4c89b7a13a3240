//! Image-grid resampling that reproduces `torch.nn.functional.interpolate` on float32 CPU
//! tensors (`align_corners=False`, bilinear and bicubic, with and without antialiasing).
//! Used to resample ViT position embeddings and to upsample attention maps.

/// Interpolation mode, as in `torch.nn.functional.interpolate` with `align_corners=False`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    /// Two-tap linear interpolation per axis (`mode="bilinear"`).
    Bilinear,
    /// Four-tap cubic convolution per axis (`mode="bicubic"`): `a = -0.75` without
    /// antialiasing, `a = -0.5` (Keys, as in PIL) with it, as PyTorch does.
    Bicubic,
}

impl Interpolation {
    /// Number of taps of the un-widened kernel (PyTorch's `interp_size`).
    fn interp_size(self) -> usize {
        match self {
            Interpolation::Bilinear => 2,
            Interpolation::Bicubic => 4,
        }
    }
}

/// Resizes `src` (`channels × in_h × in_w`, channel-major, row-major) to
/// `channels × out_h × out_w`, like `torch.nn.functional.interpolate(x, size=(out_h, out_w),
/// mode=..., align_corners=False, antialias=...)` on a float32 NCHW tensor holding one image.
///
/// Without `antialias` the kernel is PyTorch's plain one: source coordinate
/// `(dst + 0.5) * in / out - 0.5`, two taps (bilinear) or four taps with `a = -0.75` and
/// border-clamped indices (bicubic). With `antialias` the kernel is PIL-style: when
/// downsampling it is widened by the scale; taps outside the image are dropped and the
/// weights renormalised; it is applied as a horizontal pass followed by a vertical pass; the
/// antialiased bicubic uses `a = -0.5`.
///
/// One deliberate difference: for antialiased resizes to an output width of 1 (with a
/// height change), PyTorch's CPU kernel (as of 2.15) applies the first output row's vertical
/// weights to every row of a contiguous NCHW tensor; this function gives the correct result,
/// which is what PyTorch returns for the same image in channels-last layout.
///
/// # Precision
///
/// Beyond the algorithm (`aten/src/ATen/native/cpu/UpSampleKernel.cpp`), the arithmetic
/// follows the float32 rounding of PyTorch's x86-64 CPU kernels, whose compiler fuses some
/// multiply-adds into FMAs and vectorises some sums. That pattern was measured against
/// torch 2.15 and reproduces it bit for bit in every case tested; builds that round
/// differently (no FMA, other architectures) differ from it by a few ulps.
///
/// # Errors
///
/// Returns an error (never panics) when a size is zero, when `src.len()` is not
/// `channels * in_h * in_w`, or when the sizes overflow `usize`.
#[allow(clippy::too_many_arguments)] // plain sizes, mirroring the NCHW shape
pub fn resize(
    src: &[f32],
    channels: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    mode: Interpolation,
    antialias: bool,
) -> Result<Vec<f32>, String> {
    if channels == 0 || in_h == 0 || in_w == 0 || out_h == 0 || out_w == 0 {
        return Err(format!(
            "resize: all sizes must be non-zero, got {channels} channels, \
             input {in_h}x{in_w}, output {out_h}x{out_w}"
        ));
    }
    let in_len = channels
        .checked_mul(in_h)
        .and_then(|n| n.checked_mul(in_w))
        .ok_or_else(|| format!("resize: input size {channels}x{in_h}x{in_w} overflows usize"))?;
    if src.len() != in_len {
        return Err(format!(
            "resize: input has {} values but {channels}x{in_h}x{in_w} needs {in_len}",
            src.len()
        ));
    }
    // The output and the intermediate `channels × in_h × out_w` buffer must be addressable.
    channels
        .checked_mul(in_h.max(out_h))
        .and_then(|n| n.checked_mul(out_w))
        .ok_or_else(|| format!("resize: output size {channels}x{out_h}x{out_w} overflows usize"))?;

    let out = match (mode, antialias) {
        (_, true) => resize_separable(src, channels, in_h, in_w, out_h, out_w, mode),
        (Interpolation::Bicubic, false) => {
            let ys = plain_taps(in_h, out_h, mode, true);
            let xs = plain_taps(in_w, out_w, mode, true);
            resize_direct(src, in_h, in_w, &ys, &xs)
        }
        // PyTorch takes its channels-last bilinear kernel for small outputs
        // (`_use_vectorized_kernel_cond_2d`) and the generic one otherwise; they round
        // differently.
        (Interpolation::Bilinear, false) if out_h + out_w <= 128 => {
            let ys = plain_taps(in_h, out_h, mode, true);
            let xs = plain_taps(in_w, out_w, mode, true);
            resize_bilinear_small(src, in_h, in_w, &ys, &xs)
        }
        (Interpolation::Bilinear, false) => {
            let ys = plain_taps(in_h, out_h, mode, false);
            let xs = plain_taps(in_w, out_w, mode, false);
            resize_direct(src, in_h, in_w, &ys, &xs)
        }
    };
    Ok(out)
}

/// Interpolation taps along one axis: for output index `o`, the source indices
/// `idx[o * stride..][..len[o]]` with the weights at the same positions of `w`.
struct Taps {
    stride: usize,
    len: Vec<usize>,
    idx: Vec<usize>,
    w: Vec<f32>,
}

impl Taps {
    /// Number of output positions along the axis.
    fn out_size(&self) -> usize {
        self.len.len()
    }

    /// Source indices and weights of output position `o`.
    fn of(&self, o: usize) -> (&[usize], &[f32]) {
        let start = o * self.stride;
        let end = start + self.len[o];
        (&self.idx[start..end], &self.w[start..end])
    }
}

/// PyTorch's `area_pixel_compute_scale` for `align_corners=False` and no explicit scale
/// factor: `float(in) / out`, in float32.
fn pixel_scale(in_size: usize, out_size: usize) -> f32 {
    in_size as f32 / out_size as f32
}

/// Cubic convolution kernel for `0 <= x < 1` (PyTorch `cubic_convolution1`), in float32;
/// `fuse_last` says whether the final multiply-add is fused (see `resize`'s Precision).
fn cubic_conv1(x: f32, a: f32, fuse_last: bool) -> f32 {
    let p = (a + 2.0).mul_add(x, -(a + 3.0)) * x;
    if fuse_last {
        p.mul_add(x, 1.0)
    } else {
        p * x + 1.0
    }
}

/// Cubic convolution kernel for `1 <= x < 2` (PyTorch `cubic_convolution2`), in float32;
/// `fuse_last` says whether the final multiply-add is fused (see `resize`'s Precision).
fn cubic_conv2(x: f32, a: f32, fuse_last: bool) -> f32 {
    let p = a.mul_add(x, -(5.0 * a)).mul_add(x, 8.0 * a);
    if fuse_last {
        p.mul_add(x, -(4.0 * a))
    } else {
        p * x - 4.0 * a
    }
}

/// Floor of `real` as an index capped at `in_size - 1`, and the fractional part clamped to
/// `[0, 1]` (PyTorch `guard_index_and_lambda`). The index may be negative (bicubic).
fn guard_index_and_lambda(real: f32, in_size: usize) -> (i64, f32) {
    let index = (real.floor() as i64).min(in_size as i64 - 1);
    let lambda = (real - index as f32).clamp(0.0, 1.0);
    (index, lambda)
}

/// Taps of the plain (non-antialiased) kernels, PyTorch `compute_indices_weights` of
/// `HelperInterpLinear` / `HelperInterpCubic` and `compute_source_index_and_lambda`, in
/// float32. `fused_index` says whether the source coordinate `scale * (o + 0.5) - 0.5` is
/// computed with one FMA, as the bicubic and the small-output bilinear kernels do.
fn plain_taps(in_size: usize, out_size: usize, mode: Interpolation, fused_index: bool) -> Taps {
    let stride = mode.interp_size();
    let mut idx = Vec::with_capacity(out_size * stride);
    let mut w = Vec::with_capacity(out_size * stride);
    let scale = pixel_scale(in_size, out_size);
    let last = in_size as i64 - 1;
    for o in 0..out_size {
        let centre = o as f32 + 0.5;
        let real = if fused_index {
            scale.mul_add(centre, -0.5)
        } else {
            scale * centre - 0.5
        };
        match mode {
            Interpolation::Bilinear if in_size == out_size => {
                idx.extend([o, o]);
                w.extend([1.0, 0.0]);
            }
            Interpolation::Bilinear => {
                let (i0, lambda1) = guard_index_and_lambda(real.max(0.0), in_size);
                let i1 = if i0 < last { i0 + 1 } else { i0 };
                idx.extend([i0 as usize, i1 as usize]);
                w.extend([1.0 - lambda1, lambda1]);
            }
            Interpolation::Bicubic => {
                const A: f32 = -0.75;
                let (i, t) = guard_index_and_lambda(real, in_size);
                let u = 1.0 - t;
                w.extend([
                    cubic_conv2(t + 1.0, A, false),
                    cubic_conv1(t, A, false),
                    cubic_conv1(u, A, false),
                    cubic_conv2(u + 1.0, A, false),
                ]);
                idx.extend((-1..3).map(|k| (i + k).clamp(0, last) as usize));
            }
        }
    }
    Taps {
        stride,
        len: vec![stride; out_size],
        idx,
        w,
    }
}

/// Antialiasing filter (PyTorch `aa_filter`): a triangle for bilinear, the Keys cubic with
/// `a = -0.5` for bicubic, in float32.
fn aa_filter(mode: Interpolation, x: f32) -> f32 {
    let x = x.abs();
    match mode {
        Interpolation::Bilinear if x < 1.0 => 1.0 - x,
        Interpolation::Bicubic if x < 1.0 => cubic_conv1(x, -0.5, true),
        Interpolation::Bicubic if x < 2.0 => cubic_conv2(x, -0.5, true),
        _ => 0.0,
    }
}

/// Taps of the antialiased kernels (PyTorch `_compute_indices_min_size_weights_aa`): the
/// support is widened by the scale when downsampling, taps are limited to the image and the
/// weights normalised by their sum. Mirrors PyTorch's mix of float32 variables and float64
/// literals such as `0.5`.
fn aa_taps(in_size: usize, out_size: usize, mode: Interpolation) -> Taps {
    let scale = pixel_scale(in_size, out_size);
    let half = mode.interp_size() as f64 * 0.5;
    let (support, invscale) = if scale >= 1.0 {
        (
            (half * f64::from(scale)) as f32,
            (1.0 / f64::from(scale)) as f32,
        )
    } else {
        (half as f32, 1.0)
    };
    let stride = support.ceil() as usize * 2 + 1;
    let mut len = Vec::with_capacity(out_size);
    let mut idx = vec![0; out_size * stride];
    let mut w = vec![0.0; out_size * stride];
    for o in 0..out_size {
        let centre = (f64::from(scale) * (o as f64 + 0.5)) as f32;
        let xmin = ((f64::from(centre - support) + 0.5) as i64).max(0);
        let xmax = ((f64::from(centre + support) + 0.5) as i64).min(in_size as i64);
        let xsize = (xmax - xmin).clamp(0, stride as i64) as usize;
        let xmin = xmin as usize;
        let ws = &mut w[o * stride..][..xsize];
        let mut total = 0.0f32;
        for (j, wj) in ws.iter_mut().enumerate() {
            let offset = (xmin + j) as f32 - centre;
            *wj = aa_filter(
                mode,
                ((f64::from(offset) + 0.5) * f64::from(invscale)) as f32,
            );
            total += *wj;
        }
        if total != 0.0 {
            ws.iter_mut().for_each(|wj| *wj /= total);
        }
        for (j, ij) in idx[o * stride..][..xsize].iter_mut().enumerate() {
            *ij = xmin + j;
        }
        len.push(xsize);
    }
    Taps {
        stride,
        len,
        idx,
        w,
    }
}

/// Weighted sum of a plain kernel's 2 or 4 taps, rounded like PyTorch's compiled loop:
/// `fma(v0, w0, v1 * w1)`, then `fma(vk, wk, acc)` for the remaining taps.
#[inline]
fn dot_plain(idx: &[usize], w: &[f32], value: impl Fn(usize) -> f32) -> f32 {
    let mut acc = value(idx[0]).mul_add(w[0], value(idx[1]) * w[1]);
    for (&i, &wi) in idx.iter().zip(w).skip(2) {
        acc = value(i).mul_add(wi, acc);
    }
    acc
}

/// Weighted sum of an antialiased kernel's taps, rounded like PyTorch's compiled
/// (vectorised, in-order) loop: the first product; then, of the remaining terms, the largest
/// multiple of four as rounded products added in order; then the rest as fused
/// multiply-adds.
#[inline]
fn dot_aa(idx: &[usize], w: &[f32], value: impl Fn(usize) -> f32) -> f32 {
    let Some((&i0, &w0)) = idx.first().zip(w.first()) else {
        return 0.0;
    };
    let rest = idx.len() - 1;
    let blocked = rest - rest % 4;
    let mut acc = value(i0) * w0;
    for (k, (&i, &wi)) in idx.iter().zip(w).skip(1).enumerate() {
        acc = if k < blocked {
            acc + value(i) * wi
        } else {
            value(i).mul_add(wi, acc)
        };
    }
    acc
}

/// Plain kernels as PyTorch's generic kernel (`upsample_generic_Nd_kernel_impl`) evaluates
/// them: each output is a weighted sum over rows of weighted sums along each row. The row
/// sums are computed once per plane and reused (same values, far fewer operations).
fn resize_direct(src: &[f32], in_h: usize, in_w: usize, ys: &Taps, xs: &Taps) -> Vec<f32> {
    let (out_h, out_w) = (ys.out_size(), xs.out_size());
    let mut out = Vec::with_capacity(src.len() / (in_h * in_w) * out_h * out_w);
    let mut rows = vec![0.0f32; in_h * out_w];
    for plane in src.chunks_exact(in_h * in_w) {
        for (row, sums) in plane.chunks_exact(in_w).zip(rows.chunks_exact_mut(out_w)) {
            for (ow, sum) in sums.iter_mut().enumerate() {
                let (wi, ww) = xs.of(ow);
                *sum = dot_plain(wi, ww, |x| row[x]);
            }
        }
        for oh in 0..out_h {
            let (hi, hw) = ys.of(oh);
            for ow in 0..out_w {
                out.push(dot_plain(hi, hw, |h| rows[h * out_w + ow]));
            }
        }
    }
    out
}

/// Channels per vector in PyTorch's small-output bilinear kernel (8 floats, AVX2 width).
const BILINEAR_SMALL_LANES: usize = 8;

/// Bilinear as PyTorch's small-output kernel (`cpu_upsample_linear_channels_last`)
/// evaluates it: the four corner weights are products of the axis weights. That kernel
/// loops over channels innermost, vectorised: channels in whole vectors are summed as
/// `fma(i00, w00, fma(i01, w01, fma(i11, w11, i10 * w10)))`, the remaining ones as
/// `fma(i11, w11, fma(i10, w10, fma(i00, w00, i01 * w01)))`.
fn resize_bilinear_small(src: &[f32], in_h: usize, in_w: usize, ys: &Taps, xs: &Taps) -> Vec<f32> {
    let (out_h, out_w) = (ys.out_size(), xs.out_size());
    let channels = src.len() / (in_h * in_w);
    let vector_channels = channels - channels % BILINEAR_SMALL_LANES;
    let mut out = Vec::with_capacity(channels * out_h * out_w);
    for (c, plane) in src.chunks_exact(in_h * in_w).enumerate() {
        let vectorised = c < vector_channels;
        for oh in 0..out_h {
            let (hi, hw) = ys.of(oh);
            let (r0, r1) = (
                &plane[hi[0] * in_w..][..in_w],
                &plane[hi[1] * in_w..][..in_w],
            );
            for ow in 0..out_w {
                let (wi, ww) = xs.of(ow);
                let (w00, w01) = (hw[0] * ww[0], hw[0] * ww[1]);
                let (w10, w11) = (hw[1] * ww[0], hw[1] * ww[1]);
                let (i00, i01) = (r0[wi[0]], r0[wi[1]]);
                let (i10, i11) = (r1[wi[0]], r1[wi[1]]);
                out.push(if vectorised {
                    i00.mul_add(w00, i01.mul_add(w01, i11.mul_add(w11, i10 * w10)))
                } else {
                    i11.mul_add(w11, i10.mul_add(w10, i00.mul_add(w00, i01 * w01)))
                });
            }
        }
    }
    out
}

/// Antialiased kernels as PyTorch evaluates them (`separable_upsample_generic_Nd_kernel_impl`):
/// a horizontal pass if the width changes, then a vertical pass if the height changes.
fn resize_separable(
    src: &[f32],
    channels: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    mode: Interpolation,
) -> Vec<f32> {
    let mut cur = src.to_vec();
    if out_w != in_w {
        let xs = aa_taps(in_w, out_w, mode);
        let mut next = Vec::with_capacity(channels * in_h * out_w);
        for row in cur.chunks_exact(in_w) {
            for ow in 0..out_w {
                let (wi, ww) = xs.of(ow);
                next.push(dot_aa(wi, ww, |x| row[x]));
            }
        }
        cur = next;
    }
    if out_h != in_h {
        let ys = aa_taps(in_h, out_h, mode);
        let mut next = Vec::with_capacity(channels * out_h * out_w);
        for plane in cur.chunks_exact(in_h * out_w) {
            for oh in 0..out_h {
                let (hi, hw) = ys.of(oh);
                for ow in 0..out_w {
                    next.push(dot_aa(hi, hw, |h| plane[h * out_w + ow]));
                }
            }
        }
        cur = next;
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;
    use Interpolation::{Bicubic, Bilinear};

    /// Exactly representable test input, the same formula as the torch script that produced
    /// the expected values: `x[i] = ((7 i) mod 11) / 4 - 1`.
    fn input(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7) % 11) as f32 * 0.25 - 1.0)
            .collect()
    }

    /// Resizes `input(c * ih * iw)` and compares every element with torch's output.
    fn check(
        c: usize,
        (ih, iw): (usize, usize),
        (oh, ow): (usize, usize),
        mode: Interpolation,
        antialias: bool,
        expected: &[f32],
    ) {
        let got = resize(&input(c * ih * iw), c, ih, iw, oh, ow, mode, antialias).unwrap();
        assert_eq!(got.len(), expected.len());
        for (k, (g, e)) in got.iter().zip(expected).enumerate() {
            assert!((g - e).abs() <= 1e-5, "element {k}: got {g}, torch {e}");
        }
    }

    // Expected values: torch 2.15 CPU, float32,
    // `F.interpolate(x, size=(oh, ow), mode=..., align_corners=False, antialias=...)`.

    #[test]
    fn bicubic_antialias_up_matches_torch() {
        #[rustfmt::skip]
        let expected = [
            -1.2909391, 0.10838028, 0.5329615, -0.2833709, -0.15297112, 0.45050126, 0.35536772,
            -0.37873137, 1.5522388, 0.9434051, 0.056594953, -0.5522388, 1.5082979, 0.81585693,
            -0.12555149, -0.7257463, 1.2833709, 0.67453706, -0.21227294, -0.82110673,
        ];
        check(1, (3, 3), (5, 4), Bicubic, true, &expected);
    }

    #[test]
    fn bicubic_antialias_down_matches_torch() {
        #[rustfmt::skip]
        let expected = [
            0.08453144, 0.50060076, 0.03697594, 0.2564863, 0.4022066, 0.18017805,
            0.30773327, 0.10395232, 0.3589661, 0.13840055, 0.20565826, 0.50607693,
        ];
        check(2, (6, 5), (3, 2), Bicubic, true, &expected);
    }

    #[test]
    fn bicubic_up_matches_torch() {
        #[rustfmt::skip]
        let expected = [
            -1.3663926, -0.3518566, 0.76794434, 0.2961558, -0.32805568, 0.6274541, 0.6950818,
            0.6175537, 0.004903283, -0.47844633, 1.8095744, 1.2513455, 0.3824463, -0.3233064,
            -0.71355385, 1.3280557, 0.9160551, 0.23205566, -0.45194417, -0.8639444,
        ];
        check(1, (3, 3), (4, 5), Bicubic, false, &expected);
    }

    #[test]
    fn bicubic_down_matches_torch() {
        let expected = [
            0.72289115,
            0.8267324,
            -0.9580078,
            0.041015625,
            0.11109311,
            0.4524557,
        ];
        check(1, (5, 5), (3, 2), Bicubic, false, &expected);
    }

    #[test]
    fn bilinear_up_matches_torch() {
        #[rustfmt::skip]
        let expected = [
            -1.0, -0.29999995, 0.75, 0.14999986, -0.25, 0.25, 0.40000004, 0.625, 0.024999857,
            -0.375, 1.5, 1.0999999, 0.5, -0.10000013, -0.5,
            1.25, 0.84999996, 0.25, -0.35000014, -0.75, 1.125, 0.72499996, 0.125, -0.47500014,
            -0.875, 1.0, 0.59999996, 0.0, -0.60000014, -1.0,
        ];
        check(2, (2, 3), (3, 5), Bilinear, false, &expected);
    }

    #[test]
    fn bilinear_antialias_down_matches_torch() {
        let expected = [-0.1, 0.37500003, 0.41250005, 0.14999999, 0.625, 0.04999986];
        check(1, (5, 4), (2, 3), Bilinear, true, &expected);
    }

    /// Outputs wider than PyTorch's small-output threshold take the generic path; a ramp
    /// stays a (border-clamped) ramp.
    #[test]
    fn bilinear_large_output_is_linear() {
        let out = resize(&[0.0, 1.0], 1, 1, 2, 1, 130, Bilinear, false).unwrap();
        for (o, v) in out.iter().enumerate() {
            let expected = ((o as f32 + 0.5) * 2.0 / 130.0 - 0.5).clamp(0.0, 1.0);
            assert!((v - expected).abs() <= 1e-6, "{o}: {v} vs {expected}");
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let sizes = [(1, 1), (1, 5), (3, 3), (4, 7), (14, 14), (24, 24), (37, 20)];
        for mode in [Bilinear, Bicubic] {
            for antialias in [false, true] {
                for &(ih, iw) in &sizes {
                    for &(oh, ow) in &sizes {
                        let src = vec![2.5f32; 3 * ih * iw];
                        let out = resize(&src, 3, ih, iw, oh, ow, mode, antialias).unwrap();
                        assert_eq!(out.len(), 3 * oh * ow);
                        for v in out {
                            assert!(
                                (v - 2.5).abs() <= 1e-5,
                                "{mode:?} aa={antialias} {ih}x{iw}->{oh}x{ow}: {v}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn same_size_is_identity() {
        let src = input(2 * 4 * 5);
        for mode in [Bilinear, Bicubic] {
            for antialias in [false, true] {
                assert_eq!(resize(&src, 2, 4, 5, 4, 5, mode, antialias).unwrap(), src);
            }
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        let src = vec![0.0; 12];
        assert!(resize(&src, 1, 3, 4, 2, 2, Bicubic, true).is_ok());
        let wrong_len = resize(&src, 1, 3, 5, 2, 2, Bicubic, true).unwrap_err();
        assert!(wrong_len.contains("12 values"), "{wrong_len}");
        for (c, ih, iw, oh, ow) in [
            (0, 3, 4, 2, 2),
            (1, 0, 4, 2, 2),
            (1, 3, 0, 2, 2),
            (1, 3, 4, 0, 2),
            (1, 3, 4, 2, 0),
        ] {
            let err = resize(&src, c, ih, iw, oh, ow, Bilinear, false).unwrap_err();
            assert!(err.contains("non-zero"), "{err}");
        }
        let huge = resize(&src, usize::MAX, 2, 2, 1, 1, Bilinear, false).unwrap_err();
        assert!(huge.contains("overflows"), "{huge}");
        let huge_out = resize(&src, 1, 3, 4, usize::MAX, 2, Bilinear, false).unwrap_err();
        assert!(huge_out.contains("overflows"), "{huge_out}");
    }
}
