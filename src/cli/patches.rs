//! `vit patches`: how an image is cut into the tokens a ViT sees — the patch grid,
//! numbered in sequence order, and the sheet of flattened patches.

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub struct PatchesArgs {
    /// Image file (PNG or JPEG).
    image: PathBuf,
    /// Side of the square patches, in pixels.
    #[arg(long)]
    patch_size: usize,
    /// Resize to this square size first (shorter side, then center crop, as timm);
    /// without it an image the patches do not tile is center-cropped to fit.
    #[arg(long)]
    img_size: Option<usize>,
    /// Output folder, created if missing.
    #[arg(long, default_value = "vit-patches")]
    out: PathBuf,
}

pub fn run(a: PatchesArgs) -> anyhow::Result<()> {
    let r = vit::explain::patches(&a.image, a.patch_size, a.img_size, &a.out)?;
    super::attention::print_explained(&r)?;
    Ok(())
}
