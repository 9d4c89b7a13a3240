//! `vit quantize`: write an int8 copy of a checkpoint for faster, smaller inference.

use std::path::PathBuf;

use clap::Args;
use vit::quant::{quantize_checkpoint, Calibration};

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
    /// Static activations: fix each int8 layer's input range from this dataset's training
    /// images (fashion-mnist | mnist | cifar10 | cifar100 | folder:PATH) instead of
    /// quantizing each row's own range as it runs.
    #[arg(long, value_name = "DATASET")]
    calibrate: Option<String>,
    /// Images to calibrate on, spread evenly over the training split.
    #[arg(long, default_value_t = 256, requires = "calibrate")]
    calibrate_images: usize,
    /// Where the calibration dataset lives (as `vit train --data-dir`).
    #[arg(long, requires = "calibrate")]
    data_dir: Option<PathBuf>,
}

pub fn run(a: QuantizeArgs) -> anyhow::Result<()> {
    let (input, output) = match (&a.hub.hf, a.output) {
        (Some(_), None) => (a.hub.or(None)?, a.input),
        (Some(_), Some(_)) => anyhow::bail!("with --hf give only the file to write"),
        (None, Some(out)) => (a.input, out),
        (None, None) => anyhow::bail!("give the checkpoint to read and the file to write"),
    };
    let calibration = a.calibrate.map(|dataset| Calibration {
        dataset,
        data_dir: a.data_dir,
        images: a.calibrate_images,
        quiet: false,
    });
    let report = quantize_checkpoint(&input, &output, &a.arch.arch(), calibration.as_ref())?;
    for w in report.warnings {
        eprintln!("warning: {w}");
    }
    let mb = |b: u64| b as f64 / 1e6;
    out!(
        "wrote {}: {} linear layers int8 (weights per channel; activations {}); {:.1} MB from \
         {:.1} MB",
        output.display(),
        report.layers.len(),
        report.activations,
        mb(report.bytes_out),
        mb(report.bytes_in)
    );
    Ok(())
}
