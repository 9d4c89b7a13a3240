//! `vit eval`: accuracy, loss, per-class accuracy and confusion matrix of a checkpoint.

use std::path::PathBuf;

use clap::Args;
use vit::train::{confusion_picture, eval_checkpoint};

use super::{ArchArgs, DeviceArgs, ReportFormat as Format};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Checkpoint to evaluate (a file, a checkpoint folder or the paper's .npz).
    #[arg(long, required_unless_present = "hf")]
    checkpoint: Option<PathBuf>,
    #[command(flatten)]
    hub: super::HubArgs,
    /// A second checkpoint to run on the same images (e.g. the f32 one an int8 checkpoint was
    /// quantized from): reports its accuracy, top-1 agreement and the logits' cosine similarity.
    #[arg(long)]
    reference: Option<PathBuf>,
    #[command(flatten)]
    arch: ArchArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// fashion-mnist | mnist | cifar10 | cifar100 | folder:PATH (its test split).
    #[arg(long, default_value = "fashion-mnist")]
    dataset: String,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Folder for confusion.png, created if missing (default: the checkpoint's folder; with
    /// --hf, the current one).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let dev = a.device.device()?;
    let quiet = matches!(a.format, Format::Json);
    let checkpoint = a.hub.or(a.checkpoint.as_deref())?;
    let r = eval_checkpoint(
        &checkpoint,
        a.reference.as_deref(),
        &a.arch.arch(),
        &a.dataset,
        a.data_dir.as_deref(),
        a.batch_size,
        quiet,
        &dev,
    )?;
    // Not into the Hugging Face cache: beside a local checkpoint, else here.
    let out = a.out.clone().unwrap_or_else(|| {
        let dir = if a.hub.hf.is_some() {
            Some(std::path::Path::new("."))
        } else if checkpoint.is_dir() {
            Some(checkpoint.as_path())
        } else {
            checkpoint.parent()
        };
        dir.map(|p| p.to_path_buf()).unwrap_or_default()
    });
    std::fs::create_dir_all(&out).map_err(|e| vit::Error::io(&out, e))?;
    let png = out.join("confusion.png");
    vit::viz::save_png(&confusion_picture(&r, "Confusion matrix")?, &png)?;
    match a.format {
        Format::Json => out!("{}", serde_json::to_string(&r)?),
        Format::Text => {
            out!(
                "{} images: accuracy {:.2}%, loss {:.4}",
                r.images,
                100.0 * r.accuracy,
                r.loss
            );
            if let Some(g) = &r.reference {
                out!(
                    "reference: accuracy {:.2}%; top-1 agreement {:.2}%; logits' cosine mean {:.5}, min {:.5}",
                    100.0 * g.accuracy,
                    100.0 * g.top1_agreement,
                    g.mean_logit_cosine,
                    g.min_logit_cosine
                );
            }
            out!("\nper-class accuracy:");
            for (i, acc) in r.per_class_accuracy.iter().enumerate() {
                out!("  {i:>3} {:<24} {:>6.2}%", r.class_names[i], 100.0 * acc);
            }
            out!("\nconfusion matrix (rows: true class, columns: predicted):");
            for row in &r.confusion {
                let cells: Vec<String> = row.iter().map(|c| format!("{c:>5}")).collect();
                out!("  {}", cells.join(""));
            }
            out!("\nwrote {}", png.display());
        }
    }
    Ok(())
}
