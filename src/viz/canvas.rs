//! Drawing primitives shared by the pictures: text in the embedded font (rasterised with
//! ab_glyph), filled rectangles, pasted images, tick values and the vertical colour bar.

use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use image::{Rgb, RgbImage};

use super::color::Colormap;
use crate::Error;

/// DejaVu Sans 2.37 (Bitstream Vera license, see `assets/fonts/LICENSE-DejaVu.txt`).
static FONT_TTF: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Font sizes are ab_glyph pixel scales: the font's ascent + descent in pixels. DejaVu
/// Sans's digits and capitals are 1493 of those 2384 font units high; this is half that
/// fraction, the distance from the baseline to their middle per pixel of size.
const CAP_MIDDLE: f32 = 0.5 * 1493.0 / 2384.0;

pub(crate) const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
pub(crate) const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
pub(crate) const DARK: Rgb<u8> = Rgb([40, 40, 40]);
pub(crate) const GREY: Rgb<u8> = Rgb([110, 110, 110]);

fn font_ref() -> &'static FontRef<'static> {
    static FONT_REF: OnceLock<FontRef<'static>> = OnceLock::new();
    FONT_REF.get_or_init(|| {
        FontRef::try_from_slice(FONT_TTF)
            .expect("the embedded font assets/fonts/DejaVuSans.ttf is a valid font")
    })
}

/// A plotters drawing failure (drawing into memory: a defect, not bad input).
pub(crate) fn draw_err(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("drawing failed: {e}"))
}

/// Pen positions (x offsets from the start of the line) of the glyphs of `s`.
fn layout_line(s: &str, size: f32) -> (Vec<(ab_glyph::GlyphId, f32)>, f32) {
    let f = font_ref().as_scaled(PxScale::from(size));
    let mut x = 0.0;
    let mut prev = None;
    let mut glyphs = Vec::with_capacity(s.len());
    for c in s.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            x += f.kern(p, id);
        }
        glyphs.push((id, x));
        x += f.h_advance(id);
        prev = Some(id);
    }
    (glyphs, x)
}

/// The advance width of `s` in pixels at `size`, rounded up.
pub(crate) fn text_width(s: &str, size: f32) -> i32 {
    layout_line(s, size).1.ceil() as i32
}

/// Horizontal anchor of a line of text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Align {
    Left,
    Center,
    Right,
}

/// Rasterises `s` with its pen starting at `(x, baseline)` in line coordinates, handing
/// every covered pixel (line x, line y, coverage) to `put`.
fn rasterise(s: &str, size: f32, x: f32, baseline: f32, mut put: impl FnMut(i32, i32, f32)) {
    let f = font_ref();
    let (glyphs, _) = layout_line(s, size);
    for (id, gx) in glyphs {
        let glyph = id.with_scale_and_position(PxScale::from(size), point(x + gx, baseline));
        if let Some(outline) = f.outline_glyph(glyph) {
            let b = outline.px_bounds();
            outline.draw(|px, py, cov| {
                put(b.min.x as i32 + px as i32, b.min.y as i32 + py as i32, cov);
            });
        }
    }
}

/// Blends `color` with weight `cov` into the pixel at `(x, y)` if it is inside the image.
fn blend(img: &mut RgbImage, x: i32, y: i32, color: Rgb<u8>, cov: f32) {
    if x < 0 || y < 0 || x >= img.width() as i32 || y >= img.height() as i32 {
        return;
    }
    let a = cov.clamp(0.0, 1.0);
    let p = img.get_pixel_mut(x as u32, y as u32);
    for k in 0..3 {
        p[k] = (p[k] as f32 * (1.0 - a) + color[k] as f32 * a).round() as u8;
    }
}

/// Draws one line of text whose digits and capitals are vertically centred on `y_mid`;
/// `x` is its left end, middle or right end according to `align`.
pub(crate) fn text(
    img: &mut RgbImage,
    s: &str,
    x: i32,
    y_mid: i32,
    size: f32,
    color: Rgb<u8>,
    align: Align,
) {
    let w = layout_line(s, size).1;
    // Pixel (x, y) covers [x, x + 1) × [y, y + 1): centre on its middle.
    let left = match align {
        Align::Left => x as f32,
        Align::Center => x as f32 + 0.5 - w / 2.0,
        Align::Right => x as f32 - w,
    };
    let baseline = (y_mid as f32 + 0.5 + CAP_MIDDLE * size).round();
    rasterise(s, size, left.round(), baseline, |px, py, cov| {
        blend(img, px, py, color, cov)
    });
}

/// Draws one line of text reading upwards (rotated a quarter turn anticlockwise), centred
/// on `(x_mid, y_mid)`: a vertical axis label.
pub(crate) fn text_up(
    img: &mut RgbImage,
    s: &str,
    x_mid: i32,
    y_mid: i32,
    size: f32,
    color: Rgb<u8>,
) {
    let w = layout_line(s, size).1;
    text_up_from(img, s, x_mid, y_mid + (w / 2.0).round() as i32, size, color)
}

/// Draws text reading upwards that starts at `y_start` (its bottom end) with its capitals
/// centred on column `x_mid`: a rotated tick label.
pub(crate) fn text_up_from(
    img: &mut RgbImage,
    s: &str,
    x_mid: i32,
    y_start: i32,
    size: f32,
    color: Rgb<u8>,
) {
    // Line coordinates (lx, ly) with the baseline at ly = 0 map to the image point
    // (x_base + ly, y_start − lx): the line runs upwards, glyph tops point left.
    let x_base = (x_mid as f32 + 0.5 + CAP_MIDDLE * size).round() as i32;
    rasterise(s, size, 0.0, 0.0, |lx, ly, cov| {
        blend(img, x_base + ly, y_start - lx, color, cov)
    });
}

/// Fills the rectangle `[x0, x1) × [y0, y1)`, clipped to the image.
pub(crate) fn fill(img: &mut RgbImage, x0: i32, y0: i32, x1: i32, y1: i32, c: Rgb<u8>) {
    let (w, h) = (img.width() as i32, img.height() as i32);
    for y in y0.max(0)..y1.min(h) {
        for x in x0.max(0)..x1.min(w) {
            img.put_pixel(x as u32, y as u32, c);
        }
    }
}

/// Blends `c` with weight `a` into the rectangle `[x0, x1) × [y0, y1)`, clipped.
pub(crate) fn shade(img: &mut RgbImage, x0: i32, y0: i32, x1: i32, y1: i32, c: Rgb<u8>, a: f32) {
    let (w, h) = (img.width() as i32, img.height() as i32);
    for y in y0.max(0)..y1.min(h) {
        for x in x0.max(0)..x1.min(w) {
            let p = img.get_pixel_mut(x as u32, y as u32);
            for k in 0..3 {
                p[k] = (p[k] as f32 * (1.0 - a) + c[k] as f32 * a).round() as u8;
            }
        }
    }
}

/// Draws the 1-pixel outline just outside `[x0, x1) × [y0, y1)`.
pub(crate) fn frame(img: &mut RgbImage, x0: i32, y0: i32, x1: i32, y1: i32, c: Rgb<u8>) {
    fill(img, x0 - 1, y0 - 1, x1 + 1, y0, c);
    fill(img, x0 - 1, y1, x1 + 1, y1 + 1, c);
    fill(img, x0 - 1, y0, x0, y1, c);
    fill(img, x1, y0, x1 + 1, y1, c);
}

/// Copies `src` into `img` with its top-left corner at `(x, y)`, clipped.
pub(crate) fn paste(img: &mut RgbImage, src: &RgbImage, x: i32, y: i32) {
    let (w, h) = (img.width() as i32, img.height() as i32);
    for (sx, sy, p) in src.enumerate_pixels() {
        let (dx, dy) = (x + sx as i32, y + sy as i32);
        if (0..w).contains(&dx) && (0..h).contains(&dy) {
            img.put_pixel(dx as u32, dy as u32, *p);
        }
    }
}

/// A white canvas.
pub(crate) fn blank(w: i32, h: i32) -> RgbImage {
    RgbImage::from_pixel(w.max(1) as u32, h.max(1) as u32, WHITE)
}

/// Round tick values inside `[lo, hi]`, at most about `max_ticks` of them, with the number
/// of decimals that shows them exactly.
pub(crate) fn nice_ticks(lo: f32, hi: f32, max_ticks: usize) -> (Vec<f64>, usize) {
    let (lo, hi) = (lo as f64, hi as f64);
    if lo.is_nan() || hi.is_nan() || hi <= lo || max_ticks < 2 {
        return (vec![lo], 2);
    }
    let raw = (hi - lo) / (max_ticks - 1) as f64;
    let e = raw.log10().floor() as i32;
    let mant = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .find(|&m| m * 10f64.powi(e) >= raw * (1.0 - 1e-6))
        .unwrap_or(10.0);
    let step = mant * 10f64.powi(e);
    let decimals = (0..12)
        .find(|&d| {
            let scaled = step * 10f64.powi(d);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
        })
        .unwrap_or(12) as usize;
    let first = (lo / step - 1e-6).ceil() as i64;
    let last = (hi / step + 1e-6).floor() as i64;
    let ticks = (first..=last).map(|k| k as f64 * step).collect();
    (ticks, decimals)
}

/// Formats a tick value with `decimals` decimals, without a "-0".
pub(crate) fn fmt_tick(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
        s[1..].to_string()
    } else {
        s
    }
}

/// Width of the colour bar strip itself.
pub(crate) const BAR_W: i32 = 16;
/// Font size of colour bar tick labels.
const BAR_FONT: f32 = 12.0;

/// How many ticks a colour bar `h` pixels high can hold without crowding.
fn bar_ticks(h: i32) -> usize {
    (h / 26).clamp(2, 6) as usize
}

/// Total width a colour bar for `[lo, hi]`, `h` pixels high, takes: the strip, ticks and
/// tick labels.
pub(crate) fn colorbar_width(lo: f32, hi: f32, h: i32) -> i32 {
    let (ticks, dec) = nice_ticks(lo, hi, bar_ticks(h));
    let label = ticks
        .iter()
        .map(|&v| text_width(&fmt_tick(v, dec), BAR_FONT))
        .max()
        .unwrap_or(0);
    BAR_W + 5 + label
}

/// Draws a vertical colour bar, top = `hi`, bottom = `lo`, in `[x, x + BAR_W) × [y, y + h)`
/// with ticks and labels to its right.
pub(crate) fn colorbar(
    img: &mut RgbImage,
    x: i32,
    y: i32,
    h: i32,
    cmap: Colormap,
    lo: f32,
    hi: f32,
) {
    for py in 0..h {
        let t = if h > 1 {
            1.0 - py as f32 / (h - 1) as f32
        } else {
            1.0
        };
        fill(img, x, y + py, x + BAR_W, y + py + 1, cmap.color(t));
    }
    frame(img, x, y, x + BAR_W, y + h, DARK);
    let (ticks, dec) = nice_ticks(lo, hi, bar_ticks(h));
    for v in ticks {
        let t = (v as f32 - lo) / (hi - lo);
        let ty = y + ((1.0 - t) * (h - 1) as f32).round() as i32;
        fill(img, x + BAR_W, ty, x + BAR_W + 3, ty + 1, DARK);
        text(
            img,
            &fmt_tick(v, dec),
            x + BAR_W + 5,
            ty,
            BAR_FONT,
            DARK,
            Align::Left,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(
            nice_ticks(0.0, 1.0, 6),
            (vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0], 1)
        );
        let (t, d) = nice_ticks(-1.0, 1.0, 6);
        assert_eq!(t.len(), 5);
        assert_eq!(d, 1);
        assert_eq!(fmt_tick(t[2], d), "0.0");
        let (t, d) = nice_ticks(0.0, 90.0, 6);
        assert_eq!((t[1], d), (20.0, 0));
        let (t, d) = nice_ticks(0.0, 0.05, 6);
        assert_eq!(fmt_tick(t[1], d), "0.01");
        let (_, d) = nice_ticks(0.0, 10.0, 5); // step 2.5
        assert_eq!(d, 1);
    }

    #[test]
    fn font_is_embedded_and_draws() {
        assert!(text_width("0123", 12.0) > 20);
        assert_eq!(text_width("", 12.0), 0);
        let ink = |img: &RgbImage| -> Vec<(u32, u32)> {
            img.enumerate_pixels()
                .filter(|(_, _, p)| p[0] < 128)
                .map(|(x, y, _)| (x, y))
                .collect()
        };
        // Digits 14 px tall-ish (cap height 0.63 · 14 ≈ 9 px) centred on row 10, column 30.
        let mut img = blank(60, 20);
        text(&mut img, "88", 30, 10, 14.0, BLACK, Align::Center);
        let dots = ink(&img);
        assert!(dots.len() > 10, "text left {} dark pixels", dots.len());
        let (ys, xs): (Vec<u32>, Vec<u32>) = dots.iter().map(|&(x, y)| (y, x)).unzip();
        let (top, bottom) = (*ys.iter().min().unwrap(), *ys.iter().max().unwrap());
        assert!(
            (5..=6).contains(&top) && (14..=15).contains(&bottom),
            "rows {top}..={bottom}"
        );
        let (l, r) = (*xs.iter().min().unwrap(), *xs.iter().max().unwrap());
        assert!((l + r) / 2 >= 29 && (l + r) / 2 <= 31, "columns {l}..={r}");
        // The same text reading upwards, centred on (10, 30): rows and columns swap roles.
        let mut img = blank(20, 60);
        text_up(&mut img, "88", 10, 30, 14.0, BLACK);
        let dots = ink(&img);
        let (xs, ys): (Vec<u32>, Vec<u32>) = dots.iter().copied().unzip();
        let (l, r) = (*xs.iter().min().unwrap(), *xs.iter().max().unwrap());
        assert!(
            (5..=6).contains(&l) && (14..=15).contains(&r),
            "columns {l}..={r}"
        );
        let (t, b) = (*ys.iter().min().unwrap(), *ys.iter().max().unwrap());
        assert!((t + b) / 2 >= 29 && (t + b) / 2 <= 31, "rows {t}..={b}");
    }
}
