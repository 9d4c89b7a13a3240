//! What a run leaves behind besides checkpoints: `metrics.jsonl` (one object per epoch),
//! `curves.png`, `confusion.png` and `report.md`. All written atomically.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{EvalResult, Recipe};
use crate::atomic::write_atomic;
use crate::models::ModelConfig;
use crate::viz::{self, HeatmapOpts};
use crate::{Error, Result};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch.
    pub epoch: usize,
    /// Optimizer steps done at the end of the epoch.
    pub step: u64,
    pub train_loss: f64,
    pub train_acc: f64,
    pub val_loss: Option<f64>,
    pub val_acc: Option<f64>,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    pub seconds: f64,
    pub images_per_second: f64,
    /// A data-parallel run: the share of the epoch's training time spent in collectives
    /// (the gradient all-reduce, the loss sums, BatchNorm's statistics), waiting for the
    /// slowest process included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_share: Option<f64>,
}

impl EpochMetrics {
    /// The one-line summary printed after each epoch.
    pub fn summary_line(&self, epochs: usize) -> String {
        let val = match (self.val_loss, self.val_acc) {
            (Some(l), Some(a)) => format!("val loss {l:.4} acc {:.2}%", 100.0 * a),
            _ => "no validation set".into(),
        };
        format!(
            "epoch {}/{epochs}: train loss {:.4} acc {:.2}% | {val} | lr {:.2e} | {:.0}s, {:.0} img/s",
            self.epoch,
            self.train_loss,
            100.0 * self.train_acc,
            self.lr,
            self.seconds,
            self.images_per_second
        )
    }
}

/// The metrics of the first `completed` epochs of an earlier (interrupted) run.
pub(super) fn read_metrics(path: &Path, completed: u64) -> Result<Vec<EpochMetrics>> {
    if !path.exists() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let m: EpochMetrics = serde_json::from_str(line)
            .map_err(|e| Error::format(path, format!("line {}: {e}", i + 1)))?;
        if (m.epoch as u64) <= completed {
            out.push(m);
        }
    }
    Ok(out)
}

pub(super) fn write_metrics(path: &Path, history: &[EpochMetrics]) -> Result<()> {
    let mut text = String::new();
    for m in history {
        text.push_str(&serde_json::to_string(m).map_err(|e| Error::Invalid(e.to_string()))?);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

/// Loss and accuracy curves (train and validation) per epoch, as one picture; a run of
/// less than two epochs is drawn over optimizer steps (a single point for one epoch, or
/// one partial epoch). An error for a run with no recorded epoch.
pub fn curves_picture(history: &[EpochMetrics]) -> Result<image::RgbImage> {
    if history.is_empty() {
        return Err(Error::Invalid("training curves: no epoch recorded".into()));
    }
    let by_step = history.len() < 2;
    let x_label = if by_step { "optimizer step" } else { "epoch" };
    let pts = |f: &dyn Fn(&EpochMetrics) -> Option<f64>| -> Vec<(f32, f32)> {
        history
            .iter()
            .filter_map(|m| {
                let x = if by_step {
                    m.step as f32
                } else {
                    m.epoch as f32
                };
                Some((x, f(m)? as f32))
            })
            .collect()
    };
    // Series without points (validation, in a run without a validation set) are left out.
    let drawn = |series: Vec<(String, Vec<(f32, f32)>)>| -> Vec<(String, Vec<(f32, f32)>)> {
        series.into_iter().filter(|(_, p)| !p.is_empty()).collect()
    };
    let loss = viz::line_plot(
        &drawn(vec![
            ("train loss".into(), pts(&|m| Some(m.train_loss))),
            ("validation loss".into(), pts(&|m| m.val_loss)),
        ]),
        "Loss",
        x_label,
        "cross-entropy",
    )?;
    let acc = viz::line_plot(
        &drawn(vec![
            ("train accuracy".into(), pts(&|m| Some(100.0 * m.train_acc))),
            (
                "validation accuracy".into(),
                pts(&|m| m.val_acc.map(|a| 100.0 * a)),
            ),
        ]),
        "Accuracy",
        x_label,
        "accuracy (%)",
    )?;
    viz::image_grid(
        &[("".into(), loss), ("".into(), acc)],
        2,
        "Training curves",
        None,
    )
}

/// The confusion matrix (true × predicted) with counts, as a picture.
pub fn confusion_picture(eval: &EvalResult, title: &str) -> Result<image::RgbImage> {
    let k = eval.confusion.len();
    let values: Vec<f32> = eval.confusion.iter().flatten().map(|&c| c as f32).collect();
    viz::heatmap(
        &values,
        k,
        k,
        &HeatmapOpts {
            title: title.into(),
            x_label: "predicted class".into(),
            y_label: "true class".into(),
            cell_px: if k <= 20 { 44 } else { 8 },
            annotate: k <= 20,
            x_names: eval.class_names.clone(),
            y_names: eval.class_names.clone(),
            ..Default::default()
        },
    )
}

/// Writes `curves.png`, `confusion.png` and `report.md`; returns their paths.
pub(super) fn write_report(
    out: &Path,
    recipe: &Recipe,
    cfg: &ModelConfig,
    history: &[EpochMetrics],
    test: &EvalResult,
    class_names: &[String],
) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    if !history.is_empty() {
        let curves = out.join("curves.png");
        viz::save_png(&curves_picture(history)?, &curves)?;
        files.push(curves);
    }
    let test_json = out.join(super::run_dir::TEST);
    let json = serde_json::to_string_pretty(test).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::atomic::write_atomic(&test_json, json.as_bytes())?;
    files.push(test_json);
    let confusion = out.join("confusion.png");
    viz::save_png(
        &confusion_picture(test, "Confusion matrix (test set)")?,
        &confusion,
    )?;
    files.push(confusion);

    let mut md = String::new();
    let last = history.last();
    let _ = writeln!(md, "# Training report\n");
    let _ = writeln!(
        md,
        "Dataset `{}`, model `{}` ({} parameters), {} epochs of {} images per step.\n",
        recipe.dataset,
        recipe.model_name(),
        cfg.num_params(),
        history.len(),
        recipe.batch_size
    );
    let _ = writeln!(md, "| metric | value |\n|---|---|");
    let _ = writeln!(md, "| test accuracy | {:.2}% |", 100.0 * test.accuracy);
    let _ = writeln!(md, "| test loss | {:.4} |", test.loss);
    let _ = writeln!(md, "| test images | {} |", test.images);
    if let Some(m) = last {
        let best = history
            .iter()
            .filter_map(|m| m.val_acc)
            .fold(f64::NAN, f64::max);
        if best.is_finite() {
            let _ = writeln!(md, "| best validation accuracy | {:.2}% |", 100.0 * best);
        }
        let _ = writeln!(md, "| final train accuracy | {:.2}% |", 100.0 * m.train_acc);
        let secs: f64 = history.iter().map(|m| m.seconds).sum();
        let _ = writeln!(md, "| training time | {:.0} s |", secs);
        let _ = writeln!(md, "| optimizer steps | {} |", m.step);
    }
    let has_val = history.iter().any(|m| m.val_acc.is_some());
    let _ = writeln!(
        md,
        "\nThe test numbers use `checkpoint-best.safetensors` ({}).\n",
        if has_val {
            "best validation accuracy"
        } else {
            "best train accuracy: the run has no validation set"
        }
    );
    let _ = writeln!(
        md,
        "![training curves](curves.png)\n\n![confusion matrix](confusion.png)\n"
    );
    let _ = writeln!(
        md,
        "## Per-class test accuracy\n\n| class | accuracy |\n|---|---|"
    );
    for (i, a) in test.per_class_accuracy.iter().enumerate() {
        let name = class_names.get(i).map_or("?", |s| s.as_str());
        let _ = writeln!(md, "| {i} {name} | {:.2}% |", 100.0 * a);
    }
    let _ = writeln!(md, "\n## Epochs\n\n| epoch | train loss | train acc | val loss | val acc | lr | s |\n|---|---|---|---|---|---|---|");
    for m in history {
        let _ = writeln!(
            md,
            "| {} | {:.4} | {:.2}% | {} | {} | {:.2e} | {:.0} |",
            m.epoch,
            m.train_loss,
            100.0 * m.train_acc,
            m.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
            m.val_acc
                .map_or("-".into(), |v| format!("{:.2}%", 100.0 * v)),
            m.lr,
            m.seconds
        );
    }
    let recipe_toml = toml::to_string(recipe).map_err(|e| Error::Invalid(e.to_string()))?;
    let cfg_toml = toml::to_string(cfg).map_err(|e| Error::Invalid(e.to_string()))?;
    let _ = writeln!(
        md,
        "\n## Recipe\n\n```toml\n{recipe_toml}```\n\n## Model\n\n```toml\n{cfg_toml}```"
    );
    let report = out.join("report.md");
    write_atomic(&report, md.as_bytes())?;
    files.push(report);
    Ok(files)
}
