//! A patch-level map (attention, rollout) laid over the input image: bilinear upsampling
//! with PyTorch's `align_corners=False` semantics, then a colour blend whose weight is the
//! map value itself, so pixels where the map is 0 are the input pixels exactly.

use image::{Rgb, RgbImage};

use super::color::Colormap;
use crate::{Error, Result};

/// Resizes a `src_h × src_w` row-major map to `dst_h × dst_w` by bilinear interpolation,
/// as `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`: output pixel
/// `x` samples source coordinate `(x + 0.5)·src_w/dst_w − 0.5`, clamped to the edge cells.
pub fn upsample_bilinear(
    map: &[f32],
    src_h: usize,
    src_w: usize,
    dst_h: usize,
    dst_w: usize,
) -> Result<Vec<f32>> {
    if map.len() != src_h * src_w || src_h == 0 || src_w == 0 {
        return Err(Error::Shape {
            name: "map".into(),
            expected: vec![src_h, src_w],
            found: vec![map.len()],
        });
    }
    // For each output coordinate: the two source indices and the weight of the second.
    let axis = |src: usize, dst: usize| -> Vec<(usize, usize, f32)> {
        let scale = src as f32 / dst as f32;
        (0..dst)
            .map(|o| {
                let s = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (s.floor() as usize).min(src - 1);
                let i1 = (i0 + 1).min(src - 1);
                (i0, i1, s - i0 as f32)
            })
            .collect()
    };
    let (ys, xs) = (axis(src_h, dst_h), axis(src_w, dst_w));
    let mut out = Vec::with_capacity(dst_h * dst_w);
    for &(y0, y1, wy) in &ys {
        for &(x0, x1, wx) in &xs {
            let top = map[y0 * src_w + x0] * (1.0 - wx) + map[y0 * src_w + x1] * wx;
            let bot = map[y1 * src_w + x0] * (1.0 - wx) + map[y1 * src_w + x1] * wx;
            out.push(top * (1.0 - wy) + bot * wy);
        }
    }
    Ok(out)
}

/// Lays a `grid_h × grid_w` map with values in `[0, 1]` (e.g. from
/// [`cls_map`](super::cls_map)) over `image`: the map is upsampled to the image size
/// ([`upsample_bilinear`]), clamped to `[0, 1]` (NaN counts as 0), and each pixel becomes
///
/// `out = (1 − alpha·m)·pixel + alpha·m·colormap(m)`,
///
/// rounded to the nearest integer. Where `m = 0` the output equals the input pixel exactly;
/// where `m = 1` it is the colormap's top colour at opacity `alpha`. `alpha` is clamped to
/// `[0, 1]`. The result has the image's size.
pub fn overlay(
    image: &RgbImage,
    map: &[f32],
    grid_h: usize,
    grid_w: usize,
    alpha: f32,
    colormap: Colormap,
) -> Result<RgbImage> {
    let (w, h) = image.dimensions();
    let up = upsample_bilinear(map, grid_h, grid_w, h as usize, w as usize)?;
    let alpha = if alpha.is_nan() {
        0.0
    } else {
        alpha.clamp(0.0, 1.0)
    };
    let mut out = image.clone();
    for (p, &m) in out.pixels_mut().zip(&up) {
        let m = if m.is_nan() { 0.0 } else { m.clamp(0.0, 1.0) };
        let a = alpha * m;
        if a == 0.0 {
            continue;
        }
        let c = colormap.color(m);
        *p = Rgb(std::array::from_fn(|k| {
            ((1.0 - a) * p[k] as f32 + a * c[k] as f32).round() as u8
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_matches_align_corners_false() {
        // torch.nn.functional.interpolate(tensor([[0, 1], [2, 3]]), size=4, mode="bilinear",
        // align_corners=False): x samples 0.5·x − 0.25 → clamp → 0, .25, .75, 1 along a row.
        let up = upsample_bilinear(&[0.0, 1.0, 2.0, 3.0], 2, 2, 4, 4).unwrap();
        let expected = [
            0.0, 0.25, 0.75, 1.0, //
            0.5, 0.75, 1.25, 1.5, //
            1.5, 1.75, 2.25, 2.5, //
            2.0, 2.25, 2.75, 3.0,
        ];
        for (a, b) in up.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{up:?}");
        }
        // Same size is the identity; 1×1 is constant.
        let m = [0.1, 0.7, 0.3, 0.9, 0.2, 0.4];
        assert_eq!(upsample_bilinear(&m, 2, 3, 2, 3).unwrap(), m.to_vec());
        assert_eq!(upsample_bilinear(&[0.5], 1, 1, 2, 3).unwrap(), vec![0.5; 6]);
        assert!(upsample_bilinear(&m, 2, 2, 4, 4).is_err());
    }

    #[test]
    fn overlay_keeps_pixels_where_the_map_is_zero() {
        // A 4×4 map that is 1 at the bottom-right cell only, over a 32×32 gradient image:
        // the top-left quarter and more have m = 0 and stay exactly as they were.
        let img = RgbImage::from_fn(32, 32, |x, y| Rgb([x as u8 * 7, y as u8 * 5, 100]));
        let mut map = vec![0.0f32; 16];
        map[15] = 1.0;
        let out = overlay(&img, &map, 4, 4, 0.6, Colormap::Viridis).unwrap();
        assert_eq!(out.dimensions(), img.dimensions());
        for y in 0..20 {
            for x in 0..20 {
                assert_eq!(out.get_pixel(x, y), img.get_pixel(x, y), "at ({x}, {y})");
            }
        }
        // The bottom-right corner has m = 1: 0.4·pixel + 0.6·yellow (#fde725).
        let p = img.get_pixel(31, 31);
        let top = [0xfd, 0xe7, 0x25];
        let expected: [u8; 3] =
            std::array::from_fn(|k| (0.4 * p[k] as f32 + 0.6 * top[k] as f32).round() as u8);
        assert_eq!(out.get_pixel(31, 31).0, expected);
        // alpha = 0 leaves the image untouched everywhere.
        assert_eq!(
            overlay(&img, &map, 4, 4, 0.0, Colormap::Inferno).unwrap(),
            img
        );
    }
}
