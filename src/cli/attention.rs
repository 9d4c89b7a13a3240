//! `vit attention`: where a checkpoint looks in an image — class-token attention per head,
//! attention rollout, or every layer and head at once — as heatmaps and overlays.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use vit::explain::{AttentionOptions, Explained, Method};
use vit::predict::Predictor;
use vit::viz::{Colormap, HeadFusion};

use super::predict::PreprocessArgs;
use super::{DeviceArgs, ModelArgs};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MethodArg {
    /// The class token's attention in one layer, per head and averaged, plus the matrix.
    Cls,
    /// Attention rollout (Abnar & Zuidema 2020) through the layers up to --layer.
    Rollout,
    /// One grid of the class-token maps of every layer and head.
    All,
}

#[derive(Debug, Args)]
pub struct AttentionArgs {
    /// Image file (PNG or JPEG).
    image: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    pre: PreprocessArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Layer to draw (0-based; default the last); rollout runs through layers 0..=L.
    #[arg(long)]
    layer: Option<usize>,
    /// One head (0-based) instead of every head and their mean (cls method only).
    #[arg(long)]
    head: Option<usize>,
    /// What to draw.
    #[arg(long, value_enum, default_value_t = MethodArg::Cls)]
    method: MethodArg,
    /// How rollout fuses the heads of a layer: mean, max or min.
    #[arg(long, value_parser = parse_fusion, default_value = "mean")]
    head_fusion: HeadFusion,
    /// Fraction of the weakest attention entries rollout discards per layer, in [0, 1).
    #[arg(long, default_value_t = 0.0)]
    discard_ratio: f32,
    /// Opacity of the overlay where attention is strongest, in [0, 1].
    #[arg(long, default_value_t = 0.6)]
    alpha: f32,
    /// Colormap: viridis, inferno, magma or plasma.
    #[arg(long, value_parser = parse_colormap, default_value = "inferno")]
    colormap: Colormap,
    /// Also write the attention (heads, T, T) per layer and the rollout map as .npy.
    #[arg(long)]
    save_raw: bool,
    /// Output folder, created if missing.
    #[arg(long, default_value = "vit-attention")]
    out: PathBuf,
}

fn parse_fusion(s: &str) -> Result<HeadFusion, String> {
    s.parse().map_err(|e: vit::Error| e.to_string())
}

fn parse_colormap(s: &str) -> Result<Colormap, String> {
    s.parse().map_err(|e: vit::Error| e.to_string())
}

pub fn run(a: AttentionArgs) -> anyhow::Result<()> {
    let p = Predictor::load(
        &a.model.path()?,
        &a.pre.load_options(&a.model.arch, &a.device)?,
    )?;
    for w in &p.warnings {
        eprintln!("warning: {w}");
    }
    let opts = AttentionOptions {
        layer: a.layer,
        head: a.head,
        method: match a.method {
            MethodArg::Cls => Method::Cls,
            MethodArg::Rollout => Method::Rollout,
            MethodArg::All => Method::All,
        },
        head_fusion: a.head_fusion,
        discard_ratio: a.discard_ratio,
        alpha: a.alpha,
        colormap: a.colormap,
        save_raw: a.save_raw,
    };
    let r = vit::explain::attention(&p, &a.image, &opts, &a.out)?;
    print_explained(&r)?;
    Ok(())
}

/// Prints the notes on stderr ("note: ...") and the files written on stdout, one per line.
pub(super) fn print_explained(r: &Explained) -> anyhow::Result<()> {
    for n in &r.notes {
        eprintln!("note: {n}");
    }
    for f in &r.files {
        out!("{}", f.display());
    }
    Ok(())
}
