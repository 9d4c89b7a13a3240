//! `vit pos-embed`: how similar a checkpoint's position embeddings are to each other
//! (the ViT paper's figure 7), as pictures and optionally as a `.npy` matrix.

use std::path::PathBuf;

use clap::Args;
use vit::predict::{LoadOptions, Predictor};

use super::ArchArgs;

#[derive(Debug, Args)]
pub struct PosEmbedArgs {
    /// Checkpoint: a .safetensors (timm or HuggingFace naming), a checkpoint folder or the
    /// paper's .npz.
    #[arg(long, required_unless_present = "hf")]
    weights: Option<PathBuf>,
    #[command(flatten)]
    hub: super::HubArgs,
    #[command(flatten)]
    arch: ArchArgs,
    /// Output folder, created if missing.
    #[arg(long, default_value = "vit-pos-embed")]
    out: PathBuf,
    /// Also write the similarity matrix as pos_embed_similarity.npy.
    #[arg(long)]
    save_raw: bool,
}

pub fn run(a: PosEmbedArgs) -> anyhow::Result<()> {
    let opts = LoadOptions {
        arch: a.arch.arch(),
        ..Default::default()
    };
    let p = Predictor::load(&a.hub.or(a.weights.as_deref())?, &opts)?;
    for w in &p.warnings {
        eprintln!("warning: {w}");
    }
    let r = vit::explain::pos_embed(p.model.as_ref(), &a.out, a.save_raw)?;
    super::attention::print_explained(&r)?;
    Ok(())
}
