//! Line plots: training curves (loss and accuracy per epoch, train and validation) and
//! other curves such as the similarity of neighbouring position embeddings. plotters maps
//! coordinates and draws the lines; ticks, labels and the legend are drawn like the rest.

use image::{Rgb, RgbImage};
use plotters::prelude::{
    BitMapBackend, ChartBuilder, Circle, Color, IntoDrawingArea, LineSeries, PathElement, RGBColor,
};

use super::canvas::{self, draw_err, Align, DARK};
use super::color::category;
use super::heatmap::MARGIN;
use crate::{Error, Result};

/// Size of a line plot in pixels.
pub const PLOT_SIZE: (u32, u32) = (800, 480);

/// Series with at most this many points also get a dot at each point.
const MAX_DOTTED: usize = 60;

/// A corner of the plotting area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Corner {
    UpperRight,
    LowerRight,
    UpperLeft,
    LowerLeft,
}

/// The plotting area in pixels, `[left, right) × [top, bottom)`, and the data ranges it shows.
#[derive(Debug, Clone, Copy)]
struct Area {
    left: i32,
    right: i32,
    top: i32,
    bottom: i32,
    x: (f32, f32),
    y: (f32, f32),
}

impl Area {
    /// The pixel position of a data point.
    fn pixel(&self, (x, y): (f32, f32)) -> (f32, f32) {
        let u = (x - self.x.0) / (self.x.1 - self.x.0);
        let v = (y - self.y.0) / (self.y.1 - self.y.0);
        (
            self.left as f32 + u * (self.right - self.left) as f32,
            self.bottom as f32 - v * (self.bottom - self.top) as f32,
        )
    }
}

const LEGEND_INSET: i32 = 12;
const LEGEND_PAD: i32 = 9;
const LEGEND_ROW: i32 = 21;
const LEGEND_LINE: i32 = 24;

/// The legend box `(x0, y0, x1, y1)` for `names` in `corner` of the plotting area.
fn legend_box(names: &[&str], corner: Corner, a: &Area) -> (i32, i32, i32, i32) {
    let text_w = names
        .iter()
        .map(|s| canvas::text_width(s, LEGEND_FONT))
        .max()
        .unwrap_or(0);
    let w = 2 * LEGEND_PAD + LEGEND_LINE + 8 + text_w;
    let h = 2 * LEGEND_PAD + LEGEND_ROW * names.len() as i32 - 4;
    let right = matches!(corner, Corner::UpperRight | Corner::LowerRight);
    let upper = matches!(corner, Corner::UpperRight | Corner::UpperLeft);
    let x0 = if right {
        a.right - LEGEND_INSET - w
    } else {
        a.left + LEGEND_INSET
    };
    let y0 = if upper {
        a.top + LEGEND_INSET
    } else {
        a.bottom - LEGEND_INSET - h
    };
    (x0, y0, x0 + w, y0 + h)
}

/// The corner (upper right, lower right, upper left, lower left, in that order of
/// preference) where the legend box covers the least of the drawn lines, measured by
/// points sampled densely along every segment.
fn legend_corner(series: &[(String, Vec<(f32, f32)>)], names: &[&str], a: &Area) -> Corner {
    let samples: Vec<(f32, f32)> = series
        .iter()
        .flat_map(|(_, pts)| {
            let single = (pts.len() == 1).then(|| a.pixel(pts[0]));
            pts.windows(2)
                .flat_map(|w| {
                    let (p, q) = (a.pixel(w[0]), a.pixel(w[1]));
                    (0..=16).map(move |k| {
                        let t = k as f32 / 16.0;
                        (p.0 + t * (q.0 - p.0), p.1 + t * (q.1 - p.1))
                    })
                })
                .chain(single)
        })
        .collect();
    let covered = |corner| {
        let (x0, y0, x1, y1) = legend_box(names, corner, a);
        let (x0, y0, x1, y1) = (
            (x0 - 4) as f32,
            (y0 - 4) as f32,
            (x1 + 4) as f32,
            (y1 + 4) as f32,
        );
        samples
            .iter()
            .filter(|(x, y)| (x0..=x1).contains(x) && (y0..=y1).contains(y))
            .count()
    };
    [
        Corner::UpperRight,
        Corner::LowerRight,
        Corner::UpperLeft,
        Corner::LowerLeft,
    ]
    .into_iter()
    .min_by_key(|&c| covered(c))
    .unwrap_or(Corner::UpperRight)
}

/// The range of finite coordinates, padded by `pad` of its length on each side (a single
/// non-zero value gets ±5% of its magnitude, zero ±0.5).
fn padded(values: impl Iterator<Item = f32>, pad: f32) -> Option<(f32, f32)> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if lo > hi {
        return None;
    }
    if hi == lo {
        let d = if lo == 0.0 { 0.5 } else { lo.abs() * 0.05 };
        return Some((lo - d, hi + d));
    }
    let d = (hi - lo) * pad;
    Some((lo - d, hi + d))
}

const TITLE_FONT: f32 = 18.0;
const LABEL_FONT: f32 = 15.0;
const TICK_FONT: f32 = 13.0;
const LEGEND_FONT: f32 = 14.0;

/// Draws the legend box in the given corner of the plotting area.
fn legend(img: &mut RgbImage, names: &[&str], corner: Corner, a: &Area) {
    let (x0, y0, x1, y1) = legend_box(names, corner, a);
    canvas::shade(img, x0, y0, x1, y1, canvas::WHITE, 0.9);
    canvas::frame(img, x0, y0, x1, y1, Rgb([170, 170, 170]));
    for (i, name) in names.iter().enumerate() {
        let cy = y0 + LEGEND_PAD + 8 + i as i32 * LEGEND_ROW;
        let lx = x0 + LEGEND_PAD;
        canvas::fill(img, lx, cy - 1, lx + LEGEND_LINE, cy + 2, category(i));
        let tx = lx + LEGEND_LINE + 8;
        canvas::text(img, name, tx, cy, LEGEND_FONT, DARK, Align::Left);
    }
}

/// Draws named series of (x, y) points as coloured lines (with dots when a series has few
/// points) on shared axes, with a title, axis labels, round-valued ticks with grid lines
/// and a legend in the corner the lines leave most free. Non-finite points are skipped.
/// The picture is [`PLOT_SIZE`].
pub fn line_plot(
    series: &[(String, Vec<(f32, f32)>)],
    title: &str,
    x_label: &str,
    y_label: &str,
) -> Result<RgbImage> {
    let series: Vec<(String, Vec<(f32, f32)>)> = series
        .iter()
        .map(|(name, pts)| {
            let pts = pts
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            (name.clone(), pts)
        })
        .collect();
    let points = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let (Some(xr), Some(yr)) = (
        padded(points().map(|p| p.0), 0.02),
        padded(points().map(|p| p.1), 0.06),
    ) else {
        return Err(Error::Invalid(format!(
            "line plot '{title}': no finite points to draw"
        )));
    };
    let (x_ticks, xdec) = canvas::nice_ticks(xr.0, xr.1, 11);
    let (y_ticks, ydec) = canvas::nice_ticks(yr.0, yr.1, 9);
    let x_names: Vec<String> = x_ticks.iter().map(|&v| canvas::fmt_tick(v, xdec)).collect();
    let y_names: Vec<String> = y_ticks.iter().map(|&v| canvas::fmt_tick(v, ydec)).collect();
    let y_tick_w = y_names
        .iter()
        .map(|s| canvas::text_width(s, TICK_FONT))
        .max()
        .unwrap_or(0);

    // Plotting area [left, right) × [top, bottom).
    let (w, h) = (PLOT_SIZE.0 as i32, PLOT_SIZE.1 as i32);
    let margin = MARGIN + 4;
    let top = margin
        + if title.is_empty() {
            4
        } else {
            TITLE_FONT as i32 + 16
        };
    let tick_label_mid = |bottom: i32| bottom + 9 + TICK_FONT as i32 / 2;
    let x_label_mid = h - margin - LABEL_FONT as i32 / 2;
    let bottom = if x_label.is_empty() {
        h - margin - TICK_FONT as i32 - 9
    } else {
        x_label_mid - LABEL_FONT as i32 / 2 - 12 - TICK_FONT as i32 - 9
    };
    let y_label_mid = margin + LABEL_FONT as i32 / 2;
    let left = margin
        + y_tick_w
        + 9
        + if y_label.is_empty() {
            0
        } else {
            LABEL_FONT as i32 + 12
        };
    let right = w - margin - 12;

    let mut img = canvas::blank(w, h);
    let (x_px, y_px) = {
        let buf: &mut [u8] = &mut img;
        let root = BitMapBackend::with_buffer(buf, (w as u32, h as u32)).into_drawing_area();
        let area = root.margin(top, h - bottom, left, w - right);
        let mut chart = ChartBuilder::on(&area)
            .build_cartesian_2d(xr.0..xr.1, yr.0..yr.1)
            .map_err(draw_err)?;
        let grid = RGBColor(226, 226, 226);
        let lines = x_ticks
            .iter()
            .map(|&x| vec![(x as f32, yr.0), (x as f32, yr.1)])
            .chain(
                y_ticks
                    .iter()
                    .map(|&y| vec![(xr.0, y as f32), (xr.1, y as f32)]),
            );
        chart
            .draw_series(lines.map(|l| PathElement::new(l, grid)))
            .map_err(draw_err)?;
        for (i, (_, pts)) in series.iter().enumerate() {
            let c = category(i);
            let color = RGBColor(c[0], c[1], c[2]);
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(draw_err)?;
            if pts.len() <= MAX_DOTTED {
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(draw_err)?;
            }
        }
        root.present().map_err(draw_err)?;
        let x_px: Vec<i32> = x_ticks
            .iter()
            .map(|&x| chart.backend_coord(&(x as f32, yr.0)).0)
            .collect();
        let y_px: Vec<i32> = y_ticks
            .iter()
            .map(|&y| chart.backend_coord(&(xr.0, y as f32)).1)
            .collect();
        (x_px, y_px)
    };

    // Axes, ticks and tick labels.
    canvas::fill(&mut img, left - 1, top, left, bottom + 1, DARK);
    canvas::fill(&mut img, left - 1, bottom, right, bottom + 1, DARK);
    for (x, name) in x_px.iter().zip(&x_names) {
        canvas::fill(&mut img, *x, bottom + 1, x + 1, bottom + 6, DARK);
        canvas::text(
            &mut img,
            name,
            *x,
            tick_label_mid(bottom),
            TICK_FONT,
            DARK,
            Align::Center,
        );
    }
    for (y, name) in y_px.iter().zip(&y_names) {
        canvas::fill(&mut img, left - 6, *y, left - 1, y + 1, DARK);
        canvas::text(&mut img, name, left - 9, *y, TICK_FONT, DARK, Align::Right);
    }
    let cx = (left + right) / 2;
    if !title.is_empty() {
        let mid = margin + TITLE_FONT as i32 / 2;
        canvas::text(
            &mut img,
            title,
            cx,
            mid,
            TITLE_FONT,
            canvas::BLACK,
            Align::Center,
        );
    }
    if !x_label.is_empty() {
        canvas::text(
            &mut img,
            x_label,
            cx,
            x_label_mid,
            LABEL_FONT,
            canvas::BLACK,
            Align::Center,
        );
    }
    if !y_label.is_empty() {
        let cy = (top + bottom) / 2;
        canvas::text_up(
            &mut img,
            y_label,
            y_label_mid,
            cy,
            LABEL_FONT,
            canvas::BLACK,
        );
    }
    let names: Vec<&str> = series.iter().map(|(n, _)| n.as_str()).collect();
    if names.iter().any(|n| !n.is_empty()) {
        let area = Area {
            left,
            right,
            top,
            bottom,
            x: xr,
            y: yr,
        };
        let corner = legend_corner(&series, &names, &area);
        legend(&mut img, &names, corner, &area);
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_plot_draws_series_colours() {
        let train: Vec<(f32, f32)> = (1..=10).map(|e| (e as f32, 2.0 / e as f32)).collect();
        let val: Vec<(f32, f32)> = (1..=10).map(|e| (e as f32, 2.2 / e as f32 + 0.1)).collect();
        let img = line_plot(
            &[("train".into(), train), ("validation".into(), val)],
            "Loss",
            "epoch",
            "loss",
        )
        .unwrap();
        assert_eq!(img.dimensions(), PLOT_SIZE);
        // Both series' colours (Tableau blue and orange) appear.
        for i in 0..2 {
            let c = category(i);
            let n = img.pixels().filter(|p| **p == c).count();
            assert!(n > 100, "series {i}: {n} pixels of {c:?}");
        }
        // The legend goes where the lines are not: a falling line leaves the upper right
        // free, a rising one the lower right, a U shape with high ends the lower corners.
        let a = Area {
            left: 0,
            right: 600,
            top: 0,
            bottom: 400,
            x: (0.0, 1.0),
            y: (0.0, 1.0),
        };
        let corner = |pts: Vec<(f32, f32)>| legend_corner(&[("a".into(), pts)], &["a"], &a);
        assert_eq!(corner(vec![(0.0, 1.0), (1.0, 0.0)]), Corner::UpperRight);
        assert_eq!(corner(vec![(0.0, 0.0), (1.0, 1.0)]), Corner::LowerRight);
        let u = vec![(0.0, 1.0), (0.5, 0.5), (1.0, 1.0)];
        assert_eq!(corner(u), Corner::LowerRight);
        // Along the bottom, then up the right edge: only the upper left is free.
        let l = vec![(0.0, 0.06), (0.95, 0.06), (0.95, 1.0)];
        assert_eq!(corner(l), Corner::UpperLeft);
        assert!(line_plot(&[("x".into(), vec![(f32::NAN, 1.0)])], "t", "x", "y").is_err());
        // A single point still plots.
        assert!(line_plot(&[("x".into(), vec![(1.0, 1.0)])], "t", "x", "y").is_ok());
    }
}
