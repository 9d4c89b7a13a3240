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
    /// Checkpoint to read (timm or HuggingFace naming, a checkpoint folder or the paper's .npz);
    /// with --hf, the one path given is the output.
    input: PathBuf,
    /// File to write, its folder created if missing (for --to hf, the folder also gets config.json).
    output: Option<PathBuf>,
    #[command(flatten)]
    hub: super::HubArgs,
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
    let (input, output) = match (&a.hub.hf, a.output) {
        (Some(_), None) => (a.hub.or(None)?, a.input),
        (Some(_), Some(_)) => anyhow::bail!("with --hf give only the file to write"),
        (None, Some(out)) => (a.input, out),
        (None, None) => anyhow::bail!("give the checkpoint to read and the file to write"),
    };
    let (written, warnings) = convert(&input, &output, target, &a.arch.arch())?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    for p in written {
        out!("wrote {}", p.display());
    }
    Ok(())
}
