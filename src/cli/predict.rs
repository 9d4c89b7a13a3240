//! `vit predict`: top-k classes of images, as text or JSON lines.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Serialize;
use vit::predict::{LoadOptions, Predictor, Ranked};
use vit::weights::PosResample;

use super::{parse_pos_resample, ArchArgs};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Image files (PNG or JPEG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Checkpoint (.safetensors, timm or HuggingFace naming).
    #[arg(long)]
    weights: PathBuf,
    #[command(flatten)]
    arch: ArchArgs,
    #[command(flatten)]
    pre: PreprocessArgs,
    /// How many classes to show.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Also print the raw logits.
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
    pub fn load_options(&self, arch: &ArchArgs) -> LoadOptions {
        LoadOptions {
            arch: arch.arch(),
            img_size: self.img_size,
            crop_pct: self.crop_pct,
            mean: self.mean.clone(),
            std: self.std.clone(),
            pos_resample: self.pos_resample,
        }
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
    let p = Predictor::load(&a.weights, &a.pre.load_options(&a.arch))?;
    for w in &p.warnings {
        eprintln!("warning: {w}");
    }
    for image in &a.images {
        let mut pred = p.predict(image, a.top_k)?;
        match a.format {
            Format::Json => {
                let line = JsonLine {
                    image: &pred.image,
                    top_k: &pred.top_k,
                    logits: a.logits.then_some(pred.logits.as_slice()),
                };
                println!("{}", serde_json::to_string(&line)?);
            }
            Format::Text => {
                println!("{}", pred.image);
                for (rank, r) in pred.top_k.iter().enumerate() {
                    println!(
                        "  {}. {:<40} {:>6.2}%  (class {})",
                        rank + 1,
                        r.label,
                        100.0 * r.probability,
                        r.index
                    );
                }
                if a.logits {
                    let l: Vec<String> = pred.logits.drain(..).map(|x| format!("{x:.6}")).collect();
                    println!("  logits: [{}]", l.join(", "));
                }
            }
        }
    }
    Ok(())
}
