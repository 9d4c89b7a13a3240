//! One matrix as a picture: an attention matrix (query × key), a similarity matrix or a
//! confusion matrix, one square cell per entry, with title, axis labels, tick labels,
//! optional numbers in the cells and a colour bar.

use image::RgbImage;

use super::canvas::{self, Align, DARK};
use super::color::{luminance, value_range, Colormap};
use crate::{Error, Result};

/// Options for [`heatmap`].
#[derive(Debug, Clone)]
pub struct HeatmapOpts {
    /// Title above the matrix; empty for none.
    pub title: String,
    /// Label under the columns, e.g. "key token" or "predicted class"; empty for none.
    pub x_label: String,
    /// Label beside the rows, e.g. "query token" or "true class"; empty for none.
    pub y_label: String,
    /// Colormap; the bottom of the range gets its first colour, the top its last.
    pub colormap: Colormap,
    /// Side of one cell in pixels (at least 1).
    pub cell_px: u32,
    /// Whether to draw a colour bar to the right.
    pub colorbar: bool,
    /// Whether to write each value in its cell; done only where the numbers fit.
    pub annotate: bool,
    /// The value range of the colours; `None` spans the data's minimum to maximum.
    pub range: Option<(f32, f32)>,
    /// Names of the columns (e.g. class names); empty for 0-based indices.
    pub x_names: Vec<String>,
    /// Names of the rows; empty for 0-based indices.
    pub y_names: Vec<String>,
}

impl Default for HeatmapOpts {
    fn default() -> Self {
        HeatmapOpts {
            title: String::new(),
            x_label: String::new(),
            y_label: String::new(),
            colormap: Colormap::Viridis,
            cell_px: 16,
            colorbar: true,
            annotate: false,
            range: None,
            x_names: Vec::new(),
            y_names: Vec::new(),
        }
    }
}

pub(crate) const MARGIN: i32 = 14;
pub(crate) const TITLE_FONT: f32 = 17.0;
pub(crate) const LABEL_FONT: f32 = 14.0;
pub(crate) const TICK_FONT: f32 = 12.0;
const TICK_LEN: i32 = 4;
/// The smallest colour bar, for matrices only a few cells high.
pub(crate) const MIN_BAR_H: i32 = 80;

/// The smallest step in 1, 2, 5, 10, 20, 50, … such that `step` cells span `min_px`.
pub(crate) fn tick_step(cell: i32, min_px: i32) -> usize {
    let mut base = 1;
    loop {
        for m in [1, 2, 5] {
            if (m * base) as i32 * cell.max(1) >= min_px {
                return m * base;
            }
        }
        base *= 10;
    }
}

/// Tick names: the given names, or 0-based indices.
fn names(given: &[String], n: usize) -> Vec<String> {
    if given.is_empty() {
        (0..n).map(|i| i.to_string()).collect()
    } else {
        given.to_vec()
    }
}

/// How the numbers written in cells look, when they fit.
struct Annotation {
    texts: Vec<String>,
    font: f32,
}

fn annotation(values: &[f32], cell: i32) -> Option<Annotation> {
    let finite = values.iter().filter(|v| v.is_finite());
    let integral = finite.clone().all(|v| v.fract() == 0.0 && v.abs() < 1e7);
    let amax = finite.fold(0.0f32, |m, v| m.max(v.abs()));
    let decimals = if integral || amax >= 100.0 {
        0
    } else if amax >= 10.0 {
        1
    } else {
        2
    };
    let texts: Vec<String> = values
        .iter()
        .map(|v| {
            if v.is_finite() {
                canvas::fmt_tick(*v as f64, decimals)
            } else {
                String::new()
            }
        })
        .collect();
    let longest = texts.iter().max_by_key(|s| s.len())?;
    let mut font = (cell as f32 * 0.42).min(14.0);
    while font >= 8.0 {
        if canvas::text_width(longest, font) <= cell - 4 {
            return Some(Annotation { texts, font });
        }
        font -= 1.0;
    }
    None
}

/// Where the parts of a heatmap go.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub width: i32,
    pub height: i32,
    /// Top-left corner of cell (0, 0).
    pub grid_x: i32,
    pub grid_y: i32,
    pub cell: i32,
    x_step: usize,
    y_step: usize,
    x_vertical: bool,
    x_names: Vec<String>,
    y_names: Vec<String>,
    bar_x: i32,
    bar_h: i32,
    x_label_mid: i32,
    y_label_mid: i32,
    range: (f32, f32),
}

pub(crate) fn layout(values: &[f32], rows: usize, cols: usize, o: &HeatmapOpts) -> Layout {
    let cell = o.cell_px.max(1) as i32;
    let (gw, gh) = (cols as i32 * cell, rows as i32 * cell);
    let range = value_range(values, o.range);
    let x_names = names(&o.x_names, cols);
    let y_names = names(&o.y_names, rows);
    let width_of = |v: &[String], step: usize| {
        v.iter()
            .step_by(step)
            .map(|s| canvas::text_width(s, TICK_FONT))
            .max()
            .unwrap_or(0)
    };
    let y_step = tick_step(cell, TICK_FONT as i32 + 3);
    let yt_w = width_of(&y_names, y_step);
    let x_all_w = width_of(&x_names, 1);
    let (x_step, x_vertical) = if o.x_names.is_empty() || x_all_w + 4 <= cell {
        (tick_step(cell, x_all_w + 8), false)
    } else {
        (tick_step(cell, TICK_FONT as i32 + 3), true)
    };
    let xt_h = if x_vertical {
        width_of(&x_names, x_step)
    } else {
        TICK_FONT as i32
    };
    let title_h = if o.title.is_empty() {
        0
    } else {
        TITLE_FONT as i32 + 12
    };
    let ylab_w = if o.y_label.is_empty() {
        0
    } else {
        LABEL_FONT as i32 + 10
    };
    let mut grid_x = MARGIN + ylab_w + yt_w + TICK_LEN + 4;
    let grid_y = MARGIN + title_h;
    let ticks_bottom = grid_y + gh + TICK_LEN + 5 + xt_h;
    let x_label_mid = ticks_bottom + 10 + LABEL_FONT as i32 / 2;
    let mut bottom = if o.x_label.is_empty() {
        ticks_bottom
    } else {
        x_label_mid + LABEL_FONT as i32 / 2
    };
    let mut bar_x = grid_x + gw + 16;
    let mut right = grid_x + gw;
    let mut bar_h = 0;
    if o.colorbar {
        bar_h = gh.max(MIN_BAR_H);
        right = bar_x + canvas::colorbar_width(range.0, range.1, bar_h);
        bottom = bottom.max(grid_y + bar_h + 6);
    }
    // A title wider than the rest: centre the rest under it.
    let title_w = canvas::text_width(&o.title, TITLE_FONT);
    let dx = ((title_w - (right - MARGIN)) / 2).max(0);
    grid_x += dx;
    bar_x += dx;
    Layout {
        width: (right + MARGIN + dx).max(title_w + 2 * MARGIN),
        height: bottom + MARGIN,
        grid_x,
        grid_y,
        cell,
        x_step,
        y_step,
        x_vertical,
        x_names,
        y_names,
        bar_x,
        bar_h,
        x_label_mid,
        y_label_mid: MARGIN + dx + LABEL_FONT as i32 / 2,
        range,
    }
}

/// Draws a `rows × cols` row-major matrix as a grid of coloured square cells, row 0 at the
/// top and column 0 at the left, with the title, axis labels, tick labels (0-based indices
/// unless names are given, thinned out where they would overlap), a colour bar and, if
/// asked and where they fit, the values written in the cells (integers as such, e.g. the
/// counts of a confusion matrix). Non-finite values are grey.
pub fn heatmap(values: &[f32], rows: usize, cols: usize, o: &HeatmapOpts) -> Result<RgbImage> {
    if values.len() != rows * cols || rows == 0 || cols == 0 {
        return Err(Error::Shape {
            name: "heatmap values".into(),
            expected: vec![rows, cols],
            found: vec![values.len()],
        });
    }
    for (what, n, names) in [("column", cols, &o.x_names), ("row", rows, &o.y_names)] {
        if !names.is_empty() && names.len() != n {
            return Err(Error::Invalid(format!(
                "heatmap: {} {what} names for {n} {what}s",
                names.len()
            )));
        }
    }
    let l = layout(values, rows, cols, o);
    let (lo, hi) = l.range;
    let c = l.cell;
    let (gw, gh) = (cols as i32 * c, rows as i32 * c);
    let mut img = canvas::blank(l.width, l.height);

    for (i, &v) in values.iter().enumerate() {
        let (r, col) = ((i / cols) as i32, (i % cols) as i32);
        let (x, y) = (l.grid_x + col * c, l.grid_y + r * c);
        canvas::fill(&mut img, x, y, x + c, y + c, o.colormap.color_in(v, lo, hi));
    }
    canvas::frame(
        &mut img,
        l.grid_x,
        l.grid_y,
        l.grid_x + gw,
        l.grid_y + gh,
        DARK,
    );
    if o.annotate {
        if let Some(a) = annotation(values, c) {
            for (i, (s, &v)) in a.texts.iter().zip(values).enumerate() {
                let (r, col) = ((i / cols) as i32, (i % cols) as i32);
                let bg = o.colormap.color_in(v, lo, hi);
                let fg = if luminance(bg) > 0.5 {
                    canvas::BLACK
                } else {
                    canvas::WHITE
                };
                let (cx, cy) = (l.grid_x + col * c + c / 2, l.grid_y + r * c + c / 2);
                canvas::text(&mut img, s, cx, cy, a.font, fg, Align::Center);
            }
        }
    }

    // Ticks and tick labels.
    let tick_top = l.grid_y + gh + 1;
    for col in (0..cols).step_by(l.x_step) {
        let cx = l.grid_x + col as i32 * c + c / 2;
        canvas::fill(&mut img, cx, tick_top, cx + 1, tick_top + TICK_LEN, DARK);
        let label_top = tick_top + TICK_LEN + 3;
        if l.x_vertical {
            let w = canvas::text_width(&l.x_names[col], TICK_FONT);
            canvas::text_up_from(
                &mut img,
                &l.x_names[col],
                cx,
                label_top + w,
                TICK_FONT,
                DARK,
            );
        } else {
            let mid = label_top + TICK_FONT as i32 / 2;
            canvas::text(
                &mut img,
                &l.x_names[col],
                cx,
                mid,
                TICK_FONT,
                DARK,
                Align::Center,
            );
        }
    }
    for row in (0..rows).step_by(l.y_step) {
        let cy = l.grid_y + row as i32 * c + c / 2;
        let x1 = l.grid_x - 1;
        canvas::fill(&mut img, x1 - TICK_LEN, cy, x1, cy + 1, DARK);
        let right = x1 - TICK_LEN - 3;
        canvas::text(
            &mut img,
            &l.y_names[row],
            right,
            cy,
            TICK_FONT,
            DARK,
            Align::Right,
        );
    }

    // Title and axis labels.
    if !o.title.is_empty() {
        let mid = MARGIN + TITLE_FONT as i32 / 2;
        canvas::text(
            &mut img,
            &o.title,
            l.width / 2,
            mid,
            TITLE_FONT,
            canvas::BLACK,
            Align::Center,
        );
    }
    if !o.x_label.is_empty() {
        let (x, y) = (l.grid_x + gw / 2, l.x_label_mid);
        canvas::text(
            &mut img,
            &o.x_label,
            x,
            y,
            LABEL_FONT,
            canvas::BLACK,
            Align::Center,
        );
    }
    if !o.y_label.is_empty() {
        let (x, y) = (l.y_label_mid, l.grid_y + gh / 2);
        canvas::text_up(&mut img, &o.y_label, x, y, LABEL_FONT, canvas::BLACK);
    }
    if o.colorbar {
        canvas::colorbar(&mut img, l.bar_x, l.grid_y, l.bar_h, o.colormap, lo, hi);
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn cells_have_the_colormap_colours() {
        // 2×3 matrix; the max 5 gets viridis' top colour, the min -1 its bottom colour.
        let v = [0.0, 5.0, 1.0, -1.0, 2.0, 3.0];
        let o = HeatmapOpts {
            title: "Attention".into(),
            x_label: "key".into(),
            y_label: "query".into(),
            cell_px: 20,
            ..Default::default()
        };
        let img = heatmap(&v, 2, 3, &o).unwrap();
        let l = layout(&v, 2, 3, &o);
        assert_eq!(
            (img.width() as i32, img.height() as i32),
            (l.width, l.height)
        );
        let at = |r: i32, c: i32| {
            *img.get_pixel(
                (l.grid_x + c * 20 + 3) as u32,
                (l.grid_y + r * 20 + 3) as u32,
            )
        };
        assert_eq!(at(0, 1), Rgb([0xfd, 0xe7, 0x25]));
        assert_eq!(at(1, 0), Rgb([0x44, 0x01, 0x54]));
        assert_eq!(at(1, 2), Colormap::Viridis.color(4.0 / 6.0));
        // The colour bar's top row is the top colour too, its bottom row the bottom colour.
        assert_eq!(
            *img.get_pixel((l.bar_x + 8) as u32, l.grid_y as u32),
            Rgb([0xfd, 0xe7, 0x25])
        );
        let bottom = (l.grid_y + l.bar_h - 1) as u32;
        assert_eq!(
            *img.get_pixel((l.bar_x + 8) as u32, bottom),
            Rgb([0x44, 0x01, 0x54])
        );
        // The picture is wider than the grid plus colour bar and taller than the grid.
        assert!(l.width > l.grid_x + 3 * 20 + canvas::BAR_W);
        assert!(l.height >= l.grid_y + MIN_BAR_H);
    }

    #[test]
    fn confusion_matrix_counts_and_fixed_range() {
        let v = [50.0, 2.0, 0.0, 7.0, 40.0, 3.0, 1.0, 0.0, 44.0];
        let o = HeatmapOpts {
            cell_px: 40,
            annotate: true,
            colormap: Colormap::Inferno,
            range: Some((0.0, 100.0)),
            x_names: vec!["cat".into(), "dog".into(), "bird".into()],
            y_names: vec!["cat".into(), "dog".into(), "bird".into()],
            ..Default::default()
        };
        let img = heatmap(&v, 3, 3, &o).unwrap();
        let l = layout(&v, 3, 3, &o);
        // 50 of a fixed 0..100 range is the middle colour; cell corners are free of text.
        let corner = *img.get_pixel((l.grid_x + 1) as u32, (l.grid_y + 1) as u32);
        assert_eq!(corner, Colormap::Inferno.color(0.5));
        // The count is written: the middle of the "50" cell holds light text pixels.
        let ink = (l.grid_x + 8..l.grid_x + 32)
            .flat_map(|x| (l.grid_y + 12..l.grid_y + 28).map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x as u32, y as u32) != &corner)
            .count();
        assert!(ink > 20, "{ink} text pixels");
        assert!(annotation(&v, 40).is_some_and(|a| a.texts[0] == "50"));
        assert!(annotation(&v, 6).is_none());
        assert!(heatmap(&v, 3, 2, &o).is_err());
    }

    #[test]
    fn tick_steps_thin_out() {
        assert_eq!(tick_step(20, 15), 1);
        assert_eq!(tick_step(2, 15), 10);
        assert_eq!(tick_step(4, 15), 5);
    }
}
