//! How an image becomes tokens: the image with its patch grid drawn and every patch
//! numbered in sequence order, and the sheet of flattened patches in that order. Patches
//! are numbered from 0, row by row (the token index is one more with a class token).

use image::{imageops, Rgb, RgbImage};

use super::canvas::{self, Align, DARK};
use super::heatmap::MARGIN;
use crate::{Error, Result};

/// Colour of the patch grid lines drawn by [`patch_grid`].
pub const GRID_LINE: Rgb<u8> = Rgb([255, 255, 255]);

const NUMBER_FONT: f32 = 12.0;
const CAPTION_FONT: f32 = 15.0;
/// Largest integer magnification.
const MAX_SCALE: u32 = 16;

/// The patch grid (rows, columns) of an image, if the patch size divides both sides.
fn grid_of(image: &RgbImage, patch: usize) -> Result<(u32, u32)> {
    let (w, h) = image.dimensions();
    let p = patch as u32;
    if patch == 0 || w == 0 || h == 0 || w % p != 0 || h % p != 0 {
        return Err(Error::Invalid(format!(
            "a {w}×{h} image cannot be cut into {patch}×{patch} patches: \
             both sides must be positive multiples of the patch size"
        )));
    }
    Ok((h / p, w / p))
}

/// The smallest integer factor that makes a patch at least `min_px` pixels wide.
fn scale_for(patch: u32, min_px: i32) -> u32 {
    (min_px.max(1) as u32).div_ceil(patch).clamp(1, MAX_SCALE)
}

fn caption_top(caption: &str) -> i32 {
    if caption.is_empty() {
        MARGIN
    } else {
        MARGIN + CAPTION_FONT as i32 + 12
    }
}

fn draw_caption(img: &mut RgbImage, caption: &str) {
    let (w, mid) = (img.width() as i32, MARGIN + CAPTION_FONT as i32 / 2);
    canvas::text(
        img,
        caption,
        w / 2,
        mid,
        CAPTION_FONT,
        canvas::BLACK,
        Align::Center,
    )
}

/// Where [`patch_grid`] puts the scaled image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PatchGridLayout {
    pub scale: u32,
    pub x0: i32,
    pub y0: i32,
    pub width: i32,
    pub height: i32,
}

fn patch_grid_layout(image: &RgbImage, patch: usize, caption: &str) -> Result<PatchGridLayout> {
    let (gh, gw) = grid_of(image, patch)?;
    let widest = canvas::text_width(&(gh * gw - 1).to_string(), NUMBER_FONT);
    let scale = scale_for(patch as u32, (widest + 12).max(32));
    let (sw, sh) = (
        (image.width() * scale) as i32,
        (image.height() * scale) as i32,
    );
    let width = sw.max(canvas::text_width(caption, CAPTION_FONT)) + 2 * MARGIN;
    let y0 = caption_top(caption);
    Ok(PatchGridLayout {
        scale,
        x0: (width - sw) / 2,
        y0,
        width,
        height: y0 + sh + MARGIN,
    })
}

fn grid_caption(gh: u32, gw: u32, patch: usize) -> String {
    let n = gh * gw;
    format!(
        "{gh}×{gw} = {n} patches of {patch}×{patch} px, numbered 0–{} row by row",
        n - 1
    )
}

/// The image, magnified by the smallest integer factor (nearest neighbour, at most 16) that
/// makes the numbers legible, with the patch boundaries drawn as 1-pixel [`GRID_LINE`]
/// lines (on the first pixel row/column of each patch and the last of the image) and each
/// patch's sequence number (0-based, row-major) in a dark box at its top-left corner,
/// under a caption giving the grid. The patch size must divide both sides of the image.
pub fn patch_grid(image: &RgbImage, patch: usize) -> Result<RgbImage> {
    let (gh, gw) = grid_of(image, patch)?;
    let caption = grid_caption(gh, gw, patch);
    let l = patch_grid_layout(image, patch, &caption)?;
    let s = l.scale;
    let big = imageops::resize(
        image,
        image.width() * s,
        image.height() * s,
        imageops::FilterType::Nearest,
    );
    let mut img = canvas::blank(l.width, l.height);
    draw_caption(&mut img, &caption);
    canvas::paste(&mut img, &big, l.x0, l.y0);
    let (sw, sh) = (big.width() as i32, big.height() as i32);
    let step = (patch as u32 * s) as i32;
    for k in (0..sw).step_by(step as usize).chain([sw - 1]) {
        canvas::fill(&mut img, l.x0 + k, l.y0, l.x0 + k + 1, l.y0 + sh, GRID_LINE);
    }
    for k in (0..sh).step_by(step as usize).chain([sh - 1]) {
        canvas::fill(&mut img, l.x0, l.y0 + k, l.x0 + sw, l.y0 + k + 1, GRID_LINE);
    }
    let box_h = NUMBER_FONT as i32 + 3;
    for i in 0..gh * gw {
        let (r, c) = ((i / gw) as i32, (i % gw) as i32);
        let (x, y) = (l.x0 + c * step + 1, l.y0 + r * step + 1);
        let label = i.to_string();
        let tw = canvas::text_width(&label, NUMBER_FONT);
        canvas::shade(&mut img, x, y, x + tw + 5, y + box_h, canvas::BLACK, 0.6);
        canvas::text(
            &mut img,
            &label,
            x + 3,
            y + box_h / 2,
            NUMBER_FONT,
            canvas::WHITE,
            Align::Left,
        );
    }
    Ok(img)
}

/// Where [`patch_sheet`] puts the patches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SheetLayout {
    pub scale: u32,
    pub cols: usize,
    pub x0: i32,
    pub y0: i32,
    pub pitch_x: i32,
    pub pitch_y: i32,
    pub width: i32,
    pub height: i32,
}

const SHEET_COLS: usize = 16;

fn sheet_caption(n: usize, patch: usize) -> String {
    format!(
        "Token sequence: {n} patches of {patch}×{patch} px, flattened in order 0–{}",
        n - 1
    )
}

fn sheet_layout(n: usize, patch: usize, caption: &str) -> SheetLayout {
    let scale = scale_for(patch as u32, 32);
    let d = (patch as u32 * scale) as i32;
    let cols = n.clamp(1, SHEET_COLS);
    let rows = n.div_ceil(cols) as i32;
    let widest = canvas::text_width(&(n.max(1) - 1).to_string(), NUMBER_FONT);
    let pitch_x = d.max(widest) + 10;
    let pitch_y = d + NUMBER_FONT as i32 + 14;
    let grid_w = cols as i32 * pitch_x - 10;
    let width = grid_w.max(canvas::text_width(caption, CAPTION_FONT)) + 2 * MARGIN;
    let y0 = caption_top(caption);
    SheetLayout {
        scale,
        cols,
        x0: (width - grid_w) / 2 + (pitch_x - 10 - d) / 2,
        y0,
        pitch_x,
        pitch_y,
        width,
        height: y0 + rows * pitch_y - 10 + MARGIN,
    }
}

/// The patches as the model receives them: cut row by row, magnified (nearest neighbour)
/// to at least 32 pixels and laid out in sequence order, 16 per row, each with its 0-based
/// index under it, under a caption giving the token count.
pub fn patch_sheet(image: &RgbImage, patch: usize) -> Result<RgbImage> {
    let (gh, gw) = grid_of(image, patch)?;
    let n = (gh * gw) as usize;
    let caption = sheet_caption(n, patch);
    let l = sheet_layout(n, patch, &caption);
    let p = patch as u32;
    let d = p * l.scale;
    let mut img = canvas::blank(l.width, l.height);
    draw_caption(&mut img, &caption);
    for i in 0..n {
        let (pr, pc) = (i as u32 / gw, i as u32 % gw);
        let tile = imageops::crop_imm(image, pc * p, pr * p, p, p).to_image();
        let tile = imageops::resize(&tile, d, d, imageops::FilterType::Nearest);
        let (x, y) = (
            l.x0 + (i % l.cols) as i32 * l.pitch_x,
            l.y0 + (i / l.cols) as i32 * l.pitch_y,
        );
        canvas::paste(&mut img, &tile, x, y);
        canvas::frame(&mut img, x, y, x + d as i32, y + d as i32, canvas::GREY);
        let mid = y + d as i32 + 4 + NUMBER_FONT as i32 / 2;
        canvas::text(
            &mut img,
            &i.to_string(),
            x + d as i32 / 2,
            mid,
            NUMBER_FONT,
            DARK,
            Align::Center,
        );
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 32×24 image of 8×8 patches (3 rows × 4 columns), each patch one colour that
    /// encodes its index.
    fn patches_image() -> RgbImage {
        RgbImage::from_fn(32, 24, |x, y| {
            let i = (y / 8) * 4 + x / 8;
            Rgb([20 * i as u8, 100, 255 - 20 * i as u8])
        })
    }

    #[test]
    fn patch_grid_lines_numbers_and_image() {
        let img = patches_image();
        let out = patch_grid(&img, 8).unwrap();
        let l = patch_grid_layout(&img, 8, &grid_caption(3, 4, 8)).unwrap();
        assert_eq!(l.scale, 4); // 8 px patches → 32 px
        assert_eq!(
            (out.width() as i32, out.height() as i32),
            (l.width, l.height)
        );
        let at = |x: i32, y: i32| *out.get_pixel((l.x0 + x) as u32, (l.y0 + y) as u32);
        // Lines: first column of patch column 2 (x = 64), first row of patch row 1 (y = 32),
        // and the image's last row and column.
        assert_eq!(at(64, 50), GRID_LINE);
        assert_eq!(at(100, 32), GRID_LINE);
        assert_eq!(at(127, 10), GRID_LINE);
        assert_eq!(at(10, 95), GRID_LINE);
        // Inside patch 6 (row 1, column 2) away from its number: the patch's own colour.
        assert_eq!(at(64 + 28, 32 + 28), Rgb([120, 100, 135]));
        assert_eq!(at(64 + 16, 32 + 24), Rgb([120, 100, 135]));
        // The number box darkens the top-left corner of each patch.
        let corner = at(2, 2);
        assert!(corner[2] < 255 / 2, "{corner:?}");
        assert!(patch_grid(&img, 7).is_err());
        assert!(patch_grid(&img, 0).is_err());
    }

    #[test]
    fn patch_sheet_in_sequence_order() {
        let img = patches_image();
        let out = patch_sheet(&img, 8).unwrap();
        let l = sheet_layout(12, 8, &sheet_caption(12, 8));
        assert_eq!((l.cols, l.scale), (12, 4));
        assert_eq!(
            (out.width() as i32, out.height() as i32),
            (l.width, l.height)
        );
        // Patch i sits at column i of the single row, filled with its own colour.
        for i in 0..12 {
            let (x, y) = (l.x0 + i * l.pitch_x + 16, l.y0 + 16);
            assert_eq!(
                *out.get_pixel(x as u32, y as u32),
                Rgb([20 * i as u8, 100, 255 - 20 * i as u8]),
                "patch {i}"
            );
        }
    }
}
