//! `vit predict`: top-k classes of images, as text, JSON lines or CSV.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use vit::predict::{collect_images, LoadOptions, Prediction, Predictor, Ranked, CSV_HEADER};
use vit::weights::PosResample;

use super::{parse_pos_resample, ArchArgs, DeviceArgs, ModelArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The top-k list of each image, indented under its path.
    Text,
    /// One JSON object per line and image (the same as jsonl).
    Json,
    /// One JSON object per line and image: {"image", "top_k", "logits"?}.
    Jsonl,
    /// A header, then one row per image and rank: image,rank,index,label,probability.
    Csv,
}

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Image files (PNG or JPEG) or folders, searched recursively for .png/.jpg/.jpeg files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    pre: PreprocessArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// How many classes to show.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Also print the raw logits (text and JSON formats).
    #[arg(long)]
    logits: bool,
}

/// Preprocessing overrides shared by the commands that run a checkpoint on images.
#[derive(Debug, Args, Clone)]
pub struct PreprocessArgs {
    /// Square input size; the position embedding is resampled to it.
    #[arg(long)]
    img_size: Option<usize>,
    /// Center-crop fraction (timm crop_pct); default from the checkpoint, else 1.
    #[arg(long)]
    crop_pct: Option<f64>,
    /// Per-channel mean, e.g. 0.5,0.5,0.5; default from the checkpoint, else 0.5.
    #[arg(long, value_delimiter = ',')]
    mean: Option<Vec<f32>>,
    /// Per-channel std, e.g. 0.5,0.5,0.5; default from the checkpoint, else 0.5.
    #[arg(long, value_delimiter = ',')]
    std: Option<Vec<f32>>,
    /// Position-embedding resampling when the grid changes: timm (bicubic, antialias) or hf.
    #[arg(long, value_parser = parse_pos_resample, default_value = "timm")]
    pos_resample: PosResample,
}

impl PreprocessArgs {
    pub fn load_options(&self, arch: &ArchArgs, device: &DeviceArgs) -> vit::Result<LoadOptions> {
        Ok(LoadOptions {
            arch: arch.arch(),
            img_size: self.img_size,
            crop_pct: self.crop_pct,
            mean: self.mean.clone(),
            std: self.std.clone(),
            pos_resample: self.pos_resample,
            device: device.device()?,
        })
    }
}

/// One line of `--format json`: `{"image", "top_k", "logits"?}`.
#[derive(Serialize)]
struct JsonLine<'a> {
    image: &'a str,
    top_k: &'a [Ranked],
    #[serde(skip_serializing_if = "Option::is_none")]
    logits: Option<&'a [f32]>,
}

pub fn run(a: PredictArgs) -> anyhow::Result<()> {
    if a.logits && a.format == Format::Csv {
        anyhow::bail!("--logits is not available with --format csv (use json or jsonl)");
    }
    let p = Predictor::load(
        &a.model.path()?,
        &a.pre.load_options(&a.model.arch, &a.device)?,
    )?;
    for w in &p.warnings {
        eprintln!("warning: {w}");
    }
    let images = collect_images(&a.images)?;
    let bar = if images.len() > 1 && std::io::stderr().is_terminal() {
        ProgressBar::new(images.len() as u64).with_style(ProgressStyle::with_template(
            "{bar:40} {pos}/{len} images {elapsed} (eta {eta})",
        )?)
    } else {
        ProgressBar::hidden()
    };
    // Writes that fail (a closed pipe) return errors instead of panicking like println!.
    let mut out = std::io::stdout().lock();
    if a.format == Format::Csv {
        writeln!(out, "{CSV_HEADER}")?;
    }
    p.predict_all(&images, a.top_k, a.batch_size, |preds| {
        let n = preds.len() as u64;
        bar.suspend(|| {
            preds
                .into_iter()
                .try_for_each(|pred| print(&mut out, pred, a.format, a.logits))
        })
        .map_err(|e| vit::Error::io("standard output", e))?;
        bar.inc(n);
        Ok(())
    })?;
    bar.finish_and_clear();
    out.flush()?;
    Ok(())
}

/// Prints one image's prediction in `format`.
fn print(
    out: &mut impl Write,
    mut pred: Prediction,
    format: Format,
    logits: bool,
) -> std::io::Result<()> {
    match format {
        Format::Json | Format::Jsonl => {
            let line = JsonLine {
                image: &pred.image,
                top_k: &pred.top_k,
                logits: logits.then_some(pred.logits.as_slice()),
            };
            writeln!(out, "{}", serde_json::to_string(&line)?)?;
        }
        Format::Csv => {
            for row in pred.csv_rows() {
                writeln!(out, "{row}")?;
            }
        }
        Format::Text => {
            writeln!(out, "{}", pred.image)?;
            for (rank, r) in pred.top_k.iter().enumerate() {
                writeln!(
                    out,
                    "  {}. {:<40} {:>6.2}%  (class {})",
                    rank + 1,
                    r.label,
                    100.0 * r.probability,
                    r.index
                )?;
            }
            if logits {
                let l: Vec<String> = pred.logits.drain(..).map(|x| format!("{x:.6}")).collect();
                writeln!(out, "  logits: [{}]", l.join(", "))?;
            }
        }
    }
    Ok(())
}
