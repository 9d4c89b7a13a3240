//! `vit info`: the preset table, or one architecture in detail.

use std::path::PathBuf;

use clap::Args;
use vit::models::{presets, Architecture, ModelConfig};
use vit::train::Recipe;

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Preset to show in detail; without it, all presets are listed.
    preset: Option<String>,
    /// Show the model of this file instead of a preset: a model config (TOML or JSON) or a
    /// training recipe (`vit train --config`).
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
}

pub fn run(a: InfoArgs) -> anyhow::Result<()> {
    let cfg = match (&a.preset, &a.config) {
        (Some(name), _) => ModelConfig::preset(name)?,
        (_, Some(path)) => Recipe::model_of_file(path)?,
        _ => {
            return print_table();
        }
    };
    let name = a
        .preset
        .clone()
        .unwrap_or_else(|| a.config.unwrap().display().to_string());
    print_detail(&name, &cfg)
}

fn print_table() -> anyhow::Result<()> {
    let presets: Vec<_> = presets().collect();
    let width = presets.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    out!(
        "{:<width$} {:>14} {:>9} {:>7} {:>11}",
        "preset",
        "params",
        "GFLOPs",
        "tokens",
        "resolution"
    );
    for (name, c) in presets {
        let [h, w] = c.image_size();
        out!(
            "{:<width$} {:>14} {:>9.2} {:>7} {:>11}",
            name,
            thousands(c.num_params()),
            c.flops() as f64 / 1e9,
            tokens(&c),
            format!("{h}x{w}x{}", c.in_channels())
        );
    }
    out!("\nGFLOPs: forward pass of one image, a multiply-add counted as 2 (timm lists GMACs = half).");
    Ok(())
}

/// The token count of a patch-token model, "-" for others.
fn tokens(c: &ModelConfig) -> String {
    c.tokens()
        .map_or("-".into(), |t| (t.prefix + t.grid.0 * t.grid.1).to_string())
}

fn print_detail(name: &str, c: &ModelConfig) -> anyhow::Result<()> {
    out!("{name}");
    out!(
        "  parameters {}   GFLOPs/image {:.3}   tokens {}\n",
        thousands(c.num_params()),
        c.flops() as f64 / 1e9,
        tokens(c)
    );
    out!("config:");
    for line in toml::to_string(c)?.lines() {
        out!("  {line}");
    }
    out!("\nparameters per module:");
    for (module, n) in c.param_groups() {
        out!("  {module:<16} {:>14}", thousands(n));
    }
    out!("\nshape flow (one image):");
    for (stage, shape) in c.shape_flow() {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        out!("  {stage:<34} ({})", dims.join(", "));
    }
    Ok(())
}

/// 5717416 → "5,717,416".
pub(super) fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
