//! `vit quantize`: write an int8 copy of a checkpoint for faster, smaller inference.

use std::path::PathBuf;

use clap::Args;
use vit::quant::quantize_checkpoint;

use super::ArchArgs;

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// f32 checkpoint to read (ours, timm or HuggingFace naming, a checkpoint folder or the
    /// paper's .npz); with --hf, the one path given is the output.
    input: PathBuf,
    /// int8 checkpoint to write (safetensors: I8 weights with per-channel F32 scales beside
    /// them), its folder created if missing.
    output: Option<PathBuf>,
    #[command(flatten)]
    hub: super::HubArgs,
    #[command(flatten)]
    arch: ArchArgs,
}

pub fn run(a: QuantizeArgs) -> anyhow::Result<()> {
    let (input, output) = match (&a.hub.hf, a.output) {
        (Some(_), None) => (a.hub.or(None)?, a.input),
        (Some(_), Some(_)) => anyhow::bail!("with --hf give only the file to write"),
        (None, Some(out)) => (a.input, out),
        (None, None) => anyhow::bail!("give the checkpoint to read and the file to write"),
    };
    let report = quantize_checkpoint(&input, &output, &a.arch.arch())?;
    for w in report.warnings {
        eprintln!("warning: {w}");
    }
    let mb = |b: u64| b as f64 / 1e6;
    out!(
        "wrote {}: {} linear layers int8 (per-channel weights, activations per row at run time); \
         {:.1} MB from {:.1} MB",
        output.display(),
        report.layers.len(),
        mb(report.bytes_out),
        mb(report.bytes_in)
    );
    Ok(())
}
