//! `vit convert`: rewrite a checkpoint in timm or HuggingFace naming.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use vit::weights::{convert, Target};

use super::ArchArgs;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum To {
    /// timm names, with our config and preprocessing in the metadata.
    Timm,
    /// HuggingFace names, with config.json and preprocessor_config.json beside.
    Hf,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Checkpoint to read (timm or HuggingFace naming).
    input: PathBuf,
    /// File to write, its folder created if missing (for --to hf, the folder also gets config.json).
    output: PathBuf,
    /// Output naming.
    #[arg(long, value_enum, default_value_t = To::Timm)]
    to: To,
    #[command(flatten)]
    arch: ArchArgs,
}

pub fn run(a: ConvertArgs) -> anyhow::Result<()> {
    let target = match a.to {
        To::Timm => Target::Timm,
        To::Hf => Target::Hf,
    };
    let (written, warnings) = convert(&a.input, &a.output, target, &a.arch.arch())?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    for p in written {
        out!("wrote {}", p.display());
    }
    Ok(())
}
