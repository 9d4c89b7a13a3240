//! `vit pos-embed`: how similar a checkpoint's position embeddings are to each other
//! (the ViT paper's figure 7), as pictures and optionally as a `.npy` matrix.

use std::path::PathBuf;

use clap::Args;
use vit::predict::{LoadOptions, Predictor};

use super::ModelArgs;

#[derive(Debug, Args)]
pub struct PosEmbedArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output folder, created if missing.
    #[arg(long, default_value = "vit-pos-embed")]
    out: PathBuf,
    /// Also write the similarity matrix as pos_embed_similarity.npy.
    #[arg(long)]
    save_raw: bool,
}

pub fn run(a: PosEmbedArgs) -> anyhow::Result<()> {
    let opts = LoadOptions {
        arch: a.model.arch.arch(),
        ..Default::default()
    };
    let p = Predictor::load(&a.model.path()?, &opts)?;
    for w in &p.warnings {
        eprintln!("warning: {w}");
    }
    let r = vit::explain::pos_embed(p.model.as_ref(), &a.out, a.save_raw)?;
    super::attention::print_explained(&r)?;
    Ok(())
}
