//! `vit compare`: finished runs side by side, as a table and a picture.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use vit::train::{compare_picture, compare_runs, table};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// An aligned table.
    Text,
    /// A Markdown table.
    Md,
    /// One JSON array of rows.
    Json,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Run folders (written by `vit train`).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Folder for compare.png, created if missing.
    #[arg(long, default_value = ".")]
    out: PathBuf,
}

pub fn run(a: CompareArgs) -> anyhow::Result<()> {
    let rows = compare_runs(&a.runs)?;
    std::fs::create_dir_all(&a.out).map_err(|e| vit::Error::io(&a.out, e))?;
    let png = a.out.join("compare.png");
    vit::viz::save_png(&compare_picture(&rows)?, &png)?;
    match a.format {
        Format::Json => out!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Text | Format::Md => {
            out!("{}", table(&rows, a.format == Format::Md).trim_end());
            out!("wrote {}", png.display());
        }
    }
    Ok(())
}
