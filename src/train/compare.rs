//! Finished runs side by side (`vit compare`): one row per run folder (model, parameters,
//! GFLOPs per image, training speed, best validation and test accuracy, time) and a
//! picture of their validation curves and of accuracy against size and compute.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::report::{read_metrics, EpochMetrics};
use super::run_dir::{METRICS, TEST};
use super::{EvalResult, Recipe};
use crate::models::Architecture;
use crate::{viz, Error, Result};

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    /// The run folder.
    pub run: PathBuf,
    /// Its name in tables and legends (the folder's name).
    pub name: String,
    /// The preset, or "custom <arch>" for a model table.
    pub model: String,
    pub dataset: String,
    pub params: usize,
    /// Forward-pass GFLOPs of one image (a multiply-add counted as 2).
    pub gflops: f64,
    /// Training images per second, over all epochs.
    pub images_per_second: f64,
    pub best_val_acc: Option<f64>,
    /// The test accuracy of the run's best checkpoint (absent while it has not finished).
    pub test_acc: Option<f64>,
    /// Training seconds, summed over epochs.
    pub seconds: f64,
    pub epochs: usize,
    /// The per-epoch metrics (for the curves).
    #[serde(skip)]
    pub history: Vec<EpochMetrics>,
}

/// Reads one run folder: its recipe, metrics and test result.
pub fn read_run(dir: &Path) -> Result<RunRow> {
    let recipe = Recipe::of_run(dir)?;
    let cfg = recipe.model_config()?;
    let history = read_metrics(&dir.join(METRICS), u64::MAX)?;
    let test_acc = match crate::files::read_text(&dir.join(TEST)) {
        Ok(text) => {
            let r: EvalResult = serde_json::from_str(&text)
                .map_err(|e| Error::format(dir.join(TEST), e.to_string()))?;
            Some(r.accuracy)
        }
        // Runs written before test.json: the test accuracy line of their report.
        Err(_) => crate::files::read_text(&dir.join("report.md"))
            .ok()
            .and_then(|md| {
                let line = md.lines().find(|l| l.starts_with("| test accuracy |"))?;
                let v = line.split('|').nth(2)?.trim().trim_end_matches('%');
                Some(v.parse::<f64>().ok()? / 100.0)
            }),
    };
    let seconds: f64 = history.iter().map(|m| m.seconds).sum();
    let images: f64 = history
        .iter()
        .map(|m| m.images_per_second * m.seconds)
        .sum();
    Ok(RunRow {
        run: dir.to_path_buf(),
        name: dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into()),
        model: recipe.model_name(),
        dataset: recipe.dataset.clone(),
        params: cfg.num_params(),
        gflops: cfg.flops() as f64 / 1e9,
        images_per_second: if seconds > 0.0 { images / seconds } else { 0.0 },
        best_val_acc: history.iter().filter_map(|m| m.val_acc).reduce(f64::max),
        test_acc,
        seconds,
        epochs: history.len(),
        history,
    })
}

/// Reads every run folder in `dirs`, in that order.
pub fn compare_runs(dirs: &[PathBuf]) -> Result<Vec<RunRow>> {
    if dirs.is_empty() {
        return Err(Error::Invalid(
            "name at least one run folder to compare".into(),
        ));
    }
    dirs.iter().map(|d| read_run(d)).collect()
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |a| format!("{:.2}%", 100.0 * a))
}

/// The rows as an aligned text table, or as a Markdown table.
pub fn table(rows: &[RunRow], markdown: bool) -> String {
    let head = [
        "run", "model", "params", "GFLOPs", "img/s", "best val", "test", "time",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.model.clone(),
                thousands(r.params),
                format!("{:.3}", r.gflops),
                format!("{:.0}", r.images_per_second),
                pct(r.best_val_acc),
                pct(r.test_acc),
                format!("{:.0} s", r.seconds),
            ]
        })
        .collect();
    let mut out = String::new();
    if markdown {
        let _ = writeln!(out, "| {} |", head.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(head.len()));
        for c in &cells {
            let _ = writeln!(out, "| {} |", c.join(" | "));
        }
        return out;
    }
    let width: Vec<usize> = (0..head.len())
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |c: Vec<&str>| {
        c.iter()
            .enumerate()
            .map(|(i, s)| {
                if i < 2 {
                    format!("{s:<w$}", w = width[i])
                } else {
                    format!("{s:>w$}", w = width[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let _ = writeln!(out, "{}", line(head.to_vec()));
    for c in &cells {
        let _ = writeln!(out, "{}", line(c.iter().map(String::as_str).collect()));
    }
    out
}

/// Three panels: the runs' validation accuracy by epoch, and each run's accuracy (test, or
/// best validation) against its parameters and against its GFLOPs per image.
pub fn compare_picture(rows: &[RunRow]) -> Result<image::RgbImage> {
    let curves: Vec<(String, Vec<(f32, f32)>)> = rows
        .iter()
        .map(|r| {
            let pts = r
                .history
                .iter()
                .filter_map(|m| Some((m.epoch as f32, 100.0 * m.val_acc? as f32)))
                .collect();
            (r.name.clone(), pts)
        })
        .collect();
    let accuracy = |r: &RunRow| r.test_acc.or(r.best_val_acc).map(|a| 100.0 * a as f32);
    let against = |x: &dyn Fn(&RunRow) -> f32| -> Vec<(String, Vec<(f32, f32)>)> {
        rows.iter()
            .map(|r| {
                (
                    r.name.clone(),
                    accuracy(r).map(|a| (x(r), a)).into_iter().collect(),
                )
            })
            .collect()
    };
    let mut panels = Vec::new();
    if curves.iter().any(|(_, p)| !p.is_empty()) {
        let plot = viz::line_plot(&curves, "Validation accuracy", "epoch", "accuracy (%)")?;
        panels.push((String::new(), plot));
    }
    if rows.iter().any(|r| accuracy(r).is_some()) {
        let y = "accuracy (%), test or best validation";
        let by_params = against(&|r| r.params as f32 / 1e6);
        panels.push((
            String::new(),
            viz::line_plot(&by_params, "Accuracy and size", "parameters (millions)", y)?,
        ));
        let by_flops = against(&|r| r.gflops as f32);
        panels.push((
            String::new(),
            viz::line_plot(&by_flops, "Accuracy and compute", "GFLOPs per image", y)?,
        ));
    }
    if panels.is_empty() {
        return Err(Error::Invalid(
            "the runs have no validation or test accuracy to draw yet".into(),
        ));
    }
    viz::image_grid(&panels, panels.len(), "Runs compared", None)
}
