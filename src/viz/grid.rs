//! Many small pictures in one: a grid of labelled maps sharing one colour scale (CLS
//! attention of every layer and head; the ViT paper's figure 7 of position-embedding
//! similarity, one map per patch position) and a grid of labelled images.

use image::RgbImage;

use super::canvas::{self, Align, DARK};
use super::color::{value_range, Colormap};
use super::heatmap::{LABEL_FONT, MARGIN, MIN_BAR_H, TICK_FONT, TITLE_FONT};
use crate::{Error, Result};

/// Options for [`map_grid`].
#[derive(Debug, Clone)]
pub struct MapGridOpts {
    /// Title above the grid; empty for none.
    pub title: String,
    /// Maps per row of the grid (at least 1).
    pub cols: usize,
    /// Side in pixels of one cell of a map.
    pub cell_px: u32,
    /// Colormap shared by all maps.
    pub colormap: Colormap,
    /// The shared value range; `None` spans the minimum to maximum over all maps. Use
    /// `Some((-1.0, 1.0))` for cosine similarities.
    pub range: Option<(f32, f32)>,
    /// Label under the grid, e.g. "head" or "input patch column"; empty for none.
    pub x_label: String,
    /// Label beside the grid, e.g. "layer" or "input patch row"; empty for none.
    pub y_label: String,
    /// Whether to number the grid's columns along the bottom and its rows along the left
    /// (0-based), as in the ViT paper's figure 7.
    pub number_axes: bool,
}

impl Default for MapGridOpts {
    fn default() -> Self {
        MapGridOpts {
            title: String::new(),
            cols: 4,
            cell_px: 4,
            colormap: Colormap::Viridis,
            range: None,
            x_label: String::new(),
            y_label: String::new(),
            number_axes: false,
        }
    }
}

const PANEL_FONT: f32 = 12.0;

/// What surrounds the panels of a grid.
#[derive(Debug, Clone, Copy)]
struct Frame<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    number_axes: bool,
    /// Width of the widest panel label; `None` when no panel is labelled.
    label_w: Option<i32>,
    /// The colour bar's value range, if there is one.
    bar: Option<(f32, f32)>,
    /// Whether the colour bar spans only the first row of panels (images) rather than
    /// the whole grid (maps).
    bar_one_row: bool,
}

/// Where the parts of a grid of panels go.
#[derive(Debug, Clone)]
pub(crate) struct GridLayout {
    pub width: i32,
    pub height: i32,
    /// Top-left corner of the first panel's content (below its label).
    pub x0: i32,
    pub y0: i32,
    /// Distance between neighbouring panels' content, horizontally and vertically.
    pub pitch_x: i32,
    pub pitch_y: i32,
    /// Content size of a panel.
    pub pw: i32,
    pub ph: i32,
    pub rows: usize,
    /// Left edge of the first column of panels (labels included).
    left: i32,
    /// Bottom edge of the last row of panels.
    grid_bottom: i32,
    bar_x: i32,
    bar_h: i32,
    label_h: i32,
    x_label_mid: i32,
    y_label_mid: i32,
}

/// Lays out `n` panels of `pw × ph` in `cols` columns.
fn grid_layout(n: usize, cols: usize, pw: i32, ph: i32, f: &Frame) -> GridLayout {
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols);
    let labelled = f.label_w.is_some();
    let gap = if labelled {
        10
    } else if pw.max(ph) < 40 {
        3
    } else {
        6
    };
    let label_h = if labelled { PANEL_FONT as i32 + 6 } else { 0 };
    let col_w = pw.max(f.label_w.map_or(0, |w| w + 4));
    let num_w = if f.number_axes {
        canvas::text_width(&(rows.max(cols) - 1).to_string(), TICK_FONT) + 8
    } else {
        0
    };
    let title_h = if f.title.is_empty() {
        0
    } else {
        TITLE_FONT as i32 + 12
    };
    let ylab_w = if f.y_label.is_empty() {
        0
    } else {
        LABEL_FONT as i32 + 10
    };
    let pitch_x = col_w + gap;
    let pitch_y = label_h + ph + gap;
    let mut left = MARGIN + ylab_w + num_w;
    let y0 = MARGIN + title_h + label_h;
    let grid_w = cols as i32 * pitch_x - gap;
    let grid_bottom = y0 + (rows as i32 - 1) * pitch_y + ph;
    let mut bottom = grid_bottom;
    if f.number_axes {
        bottom += TICK_FONT as i32 + 6;
    }
    let x_label_mid = bottom + 10 + LABEL_FONT as i32 / 2;
    if !f.x_label.is_empty() {
        bottom = x_label_mid + LABEL_FONT as i32 / 2;
    }
    let mut right = left + grid_w;
    let mut bar_x = right + 16;
    let span = if f.bar_one_row { ph } else { grid_bottom - y0 };
    let bar_h = span.max(MIN_BAR_H);
    if let Some((lo, hi)) = f.bar {
        right = bar_x + canvas::colorbar_width(lo, hi, bar_h);
        bottom = bottom.max(y0 + bar_h + 6);
    }
    // A title wider than the rest: centre the rest under it.
    let title_w = canvas::text_width(f.title, TITLE_FONT);
    let dx = ((title_w - (right - MARGIN)) / 2).max(0);
    left += dx;
    bar_x += dx;
    GridLayout {
        width: (right + MARGIN + dx).max(title_w + 2 * MARGIN),
        height: bottom + MARGIN,
        x0: left + (col_w - pw) / 2,
        y0,
        pitch_x,
        pitch_y,
        pw,
        ph,
        rows,
        left,
        grid_bottom,
        bar_x,
        bar_h,
        label_h,
        x_label_mid,
        y_label_mid: MARGIN + dx + LABEL_FONT as i32 / 2,
    }
}

/// Draws the parts common to both grids: panel labels, numbers, title, axis labels.
fn decorate(img: &mut RgbImage, l: &GridLayout, labels: &[&str], cols: usize, f: &Frame) {
    let cols = cols.clamp(1, labels.len().max(1));
    for (i, s) in labels.iter().enumerate() {
        let (px, py) = l.panel(i, cols);
        let mid = py - l.label_h / 2 - 1;
        canvas::text(img, s, px + l.pw / 2, mid, PANEL_FONT, DARK, Align::Center);
    }
    if f.number_axes {
        for c in 0..cols {
            let (px, _) = l.panel(c, cols);
            let y = l.grid_bottom + 5 + TICK_FONT as i32 / 2;
            canvas::text(
                img,
                &c.to_string(),
                px + l.pw / 2,
                y,
                TICK_FONT,
                DARK,
                Align::Center,
            );
        }
        for r in 0..l.rows {
            let (_, py) = l.panel(r * cols, cols);
            let x = l.left - 5;
            canvas::text(
                img,
                &r.to_string(),
                x,
                py + l.ph / 2,
                TICK_FONT,
                DARK,
                Align::Right,
            );
        }
    }
    let right = l.x0 + (cols as i32 - 1) * l.pitch_x + l.pw;
    if !f.title.is_empty() {
        let mid = MARGIN + TITLE_FONT as i32 / 2;
        canvas::text(
            img,
            f.title,
            l.width / 2,
            mid,
            TITLE_FONT,
            canvas::BLACK,
            Align::Center,
        );
    }
    if !f.x_label.is_empty() {
        let x = (l.x0 + right) / 2;
        canvas::text(
            img,
            f.x_label,
            x,
            l.x_label_mid,
            LABEL_FONT,
            canvas::BLACK,
            Align::Center,
        );
    }
    if !f.y_label.is_empty() {
        let mid = (l.y0 - l.label_h + l.grid_bottom) / 2;
        canvas::text_up(
            img,
            f.y_label,
            l.y_label_mid,
            mid,
            LABEL_FONT,
            canvas::BLACK,
        );
    }
}

impl GridLayout {
    /// Top-left corner of panel `i`'s content.
    pub(crate) fn panel(&self, i: usize, cols: usize) -> (i32, i32) {
        let (r, c) = ((i / cols) as i32, (i % cols) as i32);
        (self.x0 + c * self.pitch_x, self.y0 + r * self.pitch_y)
    }
}

fn map_frame<'a>(maps: &[(String, Vec<f32>)], o: &'a MapGridOpts) -> Frame<'a> {
    let all: Vec<f32> = maps.iter().flat_map(|(_, m)| m.iter().copied()).collect();
    let labelled = maps.iter().any(|(s, _)| !s.is_empty());
    Frame {
        title: &o.title,
        x_label: &o.x_label,
        y_label: &o.y_label,
        number_axes: o.number_axes,
        label_w: labelled.then(|| {
            maps.iter()
                .map(|(s, _)| canvas::text_width(s, PANEL_FONT))
                .max()
                .unwrap_or(0)
        }),
        bar: Some(value_range(&all, o.range)),
        bar_one_row: false,
    }
}

fn map_layout(
    maps: &[(String, Vec<f32>)],
    map_h: usize,
    map_w: usize,
    o: &MapGridOpts,
) -> GridLayout {
    let cell = o.cell_px.max(1) as i32;
    let f = map_frame(maps, o);
    grid_layout(
        maps.len(),
        o.cols,
        map_w as i32 * cell,
        map_h as i32 * cell,
        &f,
    )
}

/// Draws many `map_h × map_w` row-major maps, each with its label above it (labels may be
/// empty), `opts.cols` per row in the order given, on one shared colour scale with one
/// colour bar. For layers × heads pass the maps layer by layer with `cols` = heads; for the
/// ViT paper's figure 7 pass one similarity map per patch in sequence order with `cols` =
/// the grid width and range (-1, 1).
pub fn map_grid(
    maps: &[(String, Vec<f32>)],
    map_h: usize,
    map_w: usize,
    opts: &MapGridOpts,
) -> Result<RgbImage> {
    if maps.is_empty() || map_h == 0 || map_w == 0 {
        return Err(Error::Invalid("map grid: no maps to draw".into()));
    }
    for (label, m) in maps {
        if m.len() != map_h * map_w {
            return Err(Error::Shape {
                name: format!("map '{label}'"),
                expected: vec![map_h, map_w],
                found: vec![m.len()],
            });
        }
    }
    let f = map_frame(maps, opts);
    let (lo, hi) = f.bar.expect("maps have a colour bar");
    let l = map_layout(maps, map_h, map_w, opts);
    let cell = opts.cell_px.max(1) as i32;
    let cols = opts.cols.clamp(1, maps.len());
    let mut img = canvas::blank(l.width, l.height);
    for (i, (_, m)) in maps.iter().enumerate() {
        let (px, py) = l.panel(i, cols);
        for (k, &v) in m.iter().enumerate() {
            let (x, y) = (
                px + (k % map_w) as i32 * cell,
                py + (k / map_w) as i32 * cell,
            );
            canvas::fill(
                &mut img,
                x,
                y,
                x + cell,
                y + cell,
                opts.colormap.color_in(v, lo, hi),
            );
        }
    }
    let labels: Vec<&str> = maps.iter().map(|(s, _)| s.as_str()).collect();
    decorate(&mut img, &l, &labels, cols, &f);
    canvas::colorbar(&mut img, l.bar_x, l.y0, l.bar_h, opts.colormap, lo, hi);
    Ok(img)
}

/// Lays out labelled images (e.g. an input and its attention overlays) `cols` per row,
/// each centred in a cell as large as the largest image, with a title and, when
/// `colorbar` is given as (colormap, low, high), a colour bar for what the images show.
pub fn image_grid(
    images: &[(String, RgbImage)],
    cols: usize,
    title: &str,
    colorbar: Option<(Colormap, f32, f32)>,
) -> Result<RgbImage> {
    if images.is_empty() {
        return Err(Error::Invalid("image grid: no images to draw".into()));
    }
    let pw = images.iter().map(|(_, i)| i.width()).max().unwrap_or(1) as i32;
    let ph = images.iter().map(|(_, i)| i.height()).max().unwrap_or(1) as i32;
    let f = image_frame(images, title, colorbar);
    let l = grid_layout(images.len(), cols, pw, ph, &f);
    let cols = cols.clamp(1, images.len());
    let mut img = canvas::blank(l.width, l.height);
    for (i, (_, im)) in images.iter().enumerate() {
        let (px, py) = l.panel(i, cols);
        let (dx, dy) = ((pw - im.width() as i32) / 2, (ph - im.height() as i32) / 2);
        canvas::paste(&mut img, im, px + dx, py + dy);
    }
    let labels: Vec<&str> = images.iter().map(|(s, _)| s.as_str()).collect();
    decorate(&mut img, &l, &labels, cols, &f);
    if let (Some((cmap, _, _)), Some((lo, hi))) = (colorbar, f.bar) {
        canvas::colorbar(&mut img, l.bar_x, l.y0, l.bar_h, cmap, lo, hi);
    }
    Ok(img)
}

fn image_frame<'a>(
    images: &[(String, RgbImage)],
    title: &'a str,
    colorbar: Option<(Colormap, f32, f32)>,
) -> Frame<'a> {
    let labelled = images.iter().any(|(s, _)| !s.is_empty());
    Frame {
        title,
        x_label: "",
        y_label: "",
        number_axes: false,
        label_w: labelled.then(|| {
            images
                .iter()
                .map(|(s, _)| canvas::text_width(s, PANEL_FONT))
                .max()
                .unwrap_or(0)
        }),
        bar: colorbar.map(|(_, lo, hi)| value_range(&[], Some((lo, hi)))),
        bar_one_row: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn map_grid_places_maps_on_a_shared_scale() {
        // Three 2×2 maps, 2 per row; the shared range is 0..3 over all maps.
        let maps = vec![
            ("L0 H0".to_string(), vec![0.0, 1.0, 1.0, 1.0]),
            ("L0 H1".to_string(), vec![1.0, 1.0, 1.0, 3.0]),
            ("L1 H0".to_string(), vec![2.0, 2.0, 2.0, 2.0]),
        ];
        let o = MapGridOpts {
            title: "CLS attention".into(),
            cols: 2,
            cell_px: 10,
            ..Default::default()
        };
        let img = map_grid(&maps, 2, 2, &o).unwrap();
        let l = map_layout(&maps, 2, 2, &o);
        assert_eq!(map_frame(&maps, &o).bar, Some((0.0, 3.0)));
        assert_eq!(
            (img.width() as i32, img.height() as i32),
            (l.width, l.height)
        );
        let px = |i: usize, k: i32| {
            let (x, y) = l.panel(i, 2);
            *img.get_pixel((x + (k % 2) * 10 + 5) as u32, (y + (k / 2) * 10 + 5) as u32)
        };
        assert_eq!(px(0, 0), Colormap::Viridis.color(0.0));
        assert_eq!(px(1, 3), Rgb([0xfd, 0xe7, 0x25]));
        assert_eq!(px(2, 1), Colormap::Viridis.color(2.0 / 3.0));
        // The third map starts a second row.
        assert_eq!(l.panel(2, 2).0, l.panel(0, 2).0);
        assert!(l.panel(2, 2).1 > l.panel(0, 2).1 + 20);
        assert!(map_grid(&maps, 3, 2, &o).is_err());
    }

    #[test]
    fn image_grid_pastes_images_unchanged() {
        let a = RgbImage::from_pixel(30, 20, Rgb([200, 10, 10]));
        let b = RgbImage::from_pixel(30, 20, Rgb([10, 10, 200]));
        let images = [("input".to_string(), a), ("overlay".to_string(), b)];
        let img = image_grid(&images, 2, "", None).unwrap();
        let l = grid_layout(2, 2, 30, 20, &image_frame(&images, "", None));
        assert_eq!(
            (img.width() as i32, img.height() as i32),
            (l.width, l.height)
        );
        let (x, y) = l.panel(1, 2);
        assert_eq!(
            *img.get_pixel(x as u32 + 15, y as u32 + 10),
            Rgb([10, 10, 200])
        );
        let (x, y) = l.panel(0, 2);
        assert_eq!(*img.get_pixel(x as u32, y as u32), Rgb([200, 10, 10]));
    }
}
