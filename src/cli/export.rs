//! `vit export`: write a checkpoint's model as an ONNX file.

use std::path::PathBuf;

use clap::Args;
use vit::onnx::{export_checkpoint, ExportOptions};

use super::ArchArgs;

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Checkpoint to export (timm or HuggingFace naming, a checkpoint folder, or the paper's
    /// .npz).
    #[arg(required_unless_present = "hf")]
    checkpoint: Option<PathBuf>,
    #[command(flatten)]
    hub: super::HubArgs,
    /// The ONNX file to write (its folder created if missing).
    #[arg(long)]
    onnx: PathBuf,
    /// ONNX operator set, 17 to 21.
    #[arg(long, default_value_t = 17)]
    opset: i64,
    /// A symbolic batch dimension ("batch") instead of batch 1.
    #[arg(long)]
    dynamic_batch: bool,
    #[command(flatten)]
    arch: ArchArgs,
}

pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    let opts = ExportOptions {
        opset: a.opset,
        dynamic_batch: a.dynamic_batch,
    };
    let (done, warnings) = export_checkpoint(
        &a.hub.or(a.checkpoint.as_deref())?,
        &a.arch.arch(),
        opts,
        &a.onnx,
    )?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    out!(
        "wrote {} ({} nodes, {} bytes, opset {}; input pixel_values, output {})",
        a.onnx.display(),
        done.nodes,
        done.bytes,
        a.opset,
        done.output
    );
    Ok(())
}
