//! Image-grid resampling that reproduces `torch.nn.functional.interpolate` (float32,
//! `align_corners=False`) for bilinear and bicubic modes, with and without antialiasing.
//! Used to resample ViT position embeddings and to upsample attention maps.

/// Interpolation mode, as in `torch.nn.functional.interpolate` with `align_corners=False`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    /// Two-tap linear interpolation per axis (`mode="bilinear"`).
    Bilinear,
    /// Four-tap cubic convolution per axis (`mode="bicubic"`): `a = -0.75` without
    /// antialiasing, `a = -0.5` (Keys / PIL) with it, as PyTorch does.
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
/// `channels × out_h × out_w`, matching `torch.nn.functional.interpolate(x, size=(out_h, out_w),
/// mode=..., align_corners=False, antialias=...)` on a float32 NCHW tensor with one image.
///
/// Without `antialias` the kernel is PyTorch's plain one: source coordinate
/// `(dst + 0.5) * in / out - 0.5`, two taps (bilinear) or four taps with `a = -0.75` and
/// border-clamped indices (bicubic). With `antialias` the kernel is PIL-style: when
/// downsampling it is widened by the scale, taps outside the image are dropped and the
/// weights renormalised, applied as a horizontal pass followed by a vertical pass; the
/// antialiased bicubic uses `a = -0.5`.
///
/// Returns an error (never panics) when a size is zero or `src.len()` is not
/// `channels * in_h * in_w`.
#[allow(clippy::too_many_arguments)] // the sizes are plain integers by design
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
            "resize: all sizes must be non-zero, got channels={channels}, \
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

    if antialias {
        Ok(resize_separable(
            src, channels, in_h, in_w, out_h, out_w, mode,
        ))
    } else {
        let wy = plain_taps(in_h, out_h, mode);
        let wx = plain_taps(in_w, out_w, mode);
        Ok(resize_direct(src, channels, in_h, in_w, &wy, &wx))
    }
}

/// Interpolation taps along one axis: for output index `o`, the source indices
/// `idx[o * stride .. o * stride + len[o]]` with weights at the same positions of `w`.
struct Taps {
    stride: usize,
    len: Vec<usize>,
    idx: Vec<usize>,
    w: Vec<f32>,
}

impl Taps {
    fn of(&self, o: usize) -> (&[usize], &[f32]) {
        let start = o * self.stride;
        let end = start + self.len[o];
        (&self.idx[start..end], &self.w[start..end])
    }
}

/// PyTorch's `area_pixel_compute_scale` for `align_corners=False` and no explicit scale
/// factor: `float(in) / out`, computed in float32.
fn pixel_scale(in_size: usize, out_size: usize) -> f32 {
    in_size as f32 / out_size as f32
}

/// Cubic convolution kernel for `0 <= x < 1` (PyTorch `cubic_convolution1`), in float32.
/// `fuse_last` selects whether the final multiply-add is fused (see [`CONTRACTION`]).
fn cubic_conv1(x: f32, a: f32, fuse_last: bool) -> f32 {
    let p = (a + 2.0).mul_add(x, -(a + 3.0)) * x;
    if fuse_last {
        p.mul_add(x, 1.0)
    } else {
        p * x + 1.0
    }
}

/// Cubic convolution kernel for `1 <= x < 2` (PyTorch `cubic_convolution2`), in float32.
/// `fuse_last` selects whether the final multiply-add is fused (see [`CONTRACTION`]).
fn cubic_conv2(x: f32, a: f32, fuse_last: bool) -> f32 {
    let p = a.mul_add(x, -(5.0 * a)).mul_add(x, 8.0 * a);
    if fuse_last {
        p.mul_add(x, -(4.0 * a))
    } else {
        p * x - 4.0 * a
    }
}

/// Floor of `real` as an index, capped at `in_size - 1`, and the fractional part clamped
/// to `[0, 1]` (PyTorch `guard_index_and_lambda`). The index may be negative.
fn guard_index_and_lambda(real: f32, in_size: usize) -> (i64, f32) {
    let index = (real.floor() as i64).min(in_size as i64 - 1);
    let lambda = (real - index as f32).clamp(0.0, 1.0);
    (index, lambda)
}

/// Taps of the non-antialiased kernels (PyTorch `compute_indices_weights` of
/// `HelperInterpLinear` / `HelperInterpCubic`), weights computed in float32.
fn plain_taps(in_size: usize, out_size: usize, mode: Interpolation) -> Taps {
    let stride = mode.interp_size();
    let mut idx = Vec::with_capacity(out_size * stride);
    let mut w = Vec::with_capacity(out_size * stride);
    let scale = pixel_scale(in_size, out_size);
    let last = in_size as i64 - 1;
    for o in 0..out_size {
        match mode {
            Interpolation::Bilinear => {
                if in_size == out_size {
                    idx.extend([o, o]);
                    w.extend([1.0, 0.0]);
                } else {
                    let real = scale.mul_add(o as f32 + 0.5, -0.5).max(0.0);
                    let (i0, lambda1) = guard_index_and_lambda(real, in_size);
                    let i1 = if i0 < last { i0 + 1 } else { i0 };
                    idx.extend([i0 as usize, i1 as usize]);
                    w.extend([1.0 - lambda1, lambda1]);
                }
            }
            Interpolation::Bicubic => {
                const A: f32 = -0.75;
                let real = scale.mul_add(o as f32 + 0.5, -0.5);
                let (i, t) = guard_index_and_lambda(real, in_size);
                let t2 = 1.0 - t;
                w.extend([
                    cubic_conv2(t + 1.0, A, false),
                    cubic_conv1(t, A, false),
                    cubic_conv1(t2, A, false),
                    cubic_conv2(t2 + 1.0, A, false),
                ]);
                for k in 0..4 {
                    idx.push((i + k - 1).clamp(0, last) as usize);
                }
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

/// Antialiasing filter of PyTorch's `aa_filter`: triangle for bilinear, Keys cubic with
/// `a = -0.5` for bicubic, in float32.
fn aa_filter(mode: Interpolation, x: f32) -> f32 {
    let x = x.abs();
    match mode {
        Interpolation::Bilinear => {
            if x < 1.0 {
                1.0 - x
            } else {
                0.0
            }
        }
        Interpolation::Bicubic => {
            const A: f32 = -0.5;
            if x < 1.0 {
                cubic_conv1(x, A, true)
            } else if x < 2.0 {
                cubic_conv2(x, A, true)
            } else {
                0.0
            }
        }
    }
}

/// Taps of the antialiased kernels (PyTorch `_compute_index_ranges_weights` with
/// `antialias=true`). Mirrors PyTorch's mix of float32 and float64 arithmetic: the C++
/// expressions mix `float` variables with `double` literals such as `0.5`.
fn aa_taps(in_size: usize, out_size: usize, mode: Interpolation) -> Taps {
    let scale = pixel_scale(in_size, out_size);
    let half = mode.interp_size() as f64 * 0.5;
    let support = if scale >= 1.0 {
        (half * f64::from(scale)) as f32
    } else {
        half as f32
    };
    let stride = support.ceil() as usize * 2 + 1;
    let invscale = if scale >= 1.0 {
        (1.0 / f64::from(scale)) as f32
    } else {
        1.0
    };
    let in_i = in_size as i64;
    let mut len = Vec::with_capacity(out_size);
    let mut idx = vec![0usize; out_size * stride];
    let mut w = vec![0f32; out_size * stride];
    for o in 0..out_size {
        let center = (f64::from(scale) * (o as f64 + 0.5)) as f32;
        let xmin = ((f64::from(center - support) + 0.5) as i64).max(0);
        let xmax = ((f64::from(center + support) + 0.5) as i64).min(in_i);
        let xsize = (xmax - xmin).clamp(0, stride as i64) as usize;
        let row = &mut w[o * stride..o * stride + xsize];
        let mut total = 0f32;
        for (j, wj) in row.iter_mut().enumerate() {
            let offset = (j as i64 + xmin) as f32 - center;
            let arg = ((f64::from(offset) + 0.5) * f64::from(invscale)) as f32;
            *wj = aa_filter(mode, arg);
            total += *wj;
        }
        if total != 0.0 {
            for wj in row.iter_mut() {
                *wj /= total;
            }
        }
        for (j, ij) in idx[o * stride..o * stride + xsize].iter_mut().enumerate() {
            *ij = xmin as usize + j;
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

/// Weighted sum `Σ w[k] * value(idx[k])`, accumulated left to right in float32 starting
/// from the first product, as PyTorch's CPU kernels do.
#[inline]
fn dot(idx: &[usize], w: &[f32], fused: bool, value: impl Fn(usize) -> f32) -> f32 {
    let mut pairs = idx.iter().zip(w);
    let Some((&i0, &w0)) = pairs.next() else {
        return 0.0;
    };
    let mut acc = value(i0) * w0;
    for (&i, &wi) in pairs {
        acc = if fused {
            value(i).mul_add(wi, acc)
        } else {
            acc + value(i) * wi
        };
    }
    acc
}

/// Non-separable evaluation of the plain kernels (PyTorch `upsample_generic_Nd_kernel_impl`):
/// each output is `Σ_h wy[h] * (Σ_w wx[w] * src[h, w])`.
fn resize_direct(
    src: &[f32],
    channels: usize,
    in_h: usize,
    in_w: usize,
    wy: &Taps,
    wx: &Taps,
) -> Vec<f32> {
    let out_h = wy.len.len();
    let out_w = wx.len.len();
    let mut out = Vec::with_capacity(channels * out_h * out_w);
    for plane in src.chunks_exact(in_h * in_w) {
        for oh in 0..out_h {
            let (hi, hw) = wy.of(oh);
            for ow in 0..out_w {
                let (wi, ww) = wx.of(ow);
                out.push(dot(hi, hw, flag("RS_FO"), |h| {
                    let row = &plane[h * in_w..(h + 1) * in_w];
                    dot(wi, ww, flag("RS_FI"), |x| row[x])
                }));
            }
        }
    }
    out
}

/// Separable antialiased evaluation (PyTorch `separable_upsample_generic_Nd_kernel_impl`):
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
        let wx = aa_taps(in_w, out_w, mode);
        let mut next = Vec::with_capacity(channels * in_h * out_w);
        for row in cur.chunks_exact(in_w) {
            for ow in 0..out_w {
                let (wi, ww) = wx.of(ow);
                next.push(dot(wi, ww, flag("RS_FH"), |x| row[x]));
            }
        }
        cur = next;
    }
    if out_h != in_h {
        let wy = aa_taps(in_h, out_h, mode);
        let mut next = Vec::with_capacity(channels * out_h * out_w);
        for plane in cur.chunks_exact(in_h * out_w) {
            for oh in 0..out_h {
                let (hi, hw) = wy.of(oh);
                for ow in 0..out_w {
                    next.push(dot(hi, hw, flag("RS_FV"), |h| plane[h * out_w + ow]));
                }
            }
        }
        cur = next;
    }
    cur
}

fn flag(name: &str) -> bool {
    std::env::var(name).map(|v| v == "1").unwrap_or(false)
}
