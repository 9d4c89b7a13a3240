//! See what the model sees: the logic behind `vit patches`, `vit attention` and
//! `vit pos-embed`. Each function prepares the numbers (image, captured attention, position
//! embeddings), draws them with [`crate::viz`], writes PNG/`.npy` files and returns their paths.
//! One file per command: `patches.rs`, `attention.rs` (with `local_attention.rs`, its
//! pictures for Swin and PVT), `pos_embed.rs`; this file holds what they share (the token geometry, the display image, file writing).

mod attention;
mod inspect;
mod local_attention;
mod patches;
mod pos_embed;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use image::{Rgb, RgbImage};

use crate::models::{Architecture, ModelConfig, Preprocess};
use crate::viz;
use crate::{Error, Result};

pub use attention::{attention, AttentionOptions, Method};
pub use inspect::{hottest, Inspection, Layout, Query};
use local_attention::local_attention;
pub use patches::{patches, MAX_PATCHES};
pub use pos_embed::{pos_embed, pos_embed_similarity, PosSimilarity};

/// What a command produced: the files written, in order, and things the user should know
/// (a crop that was applied, a fallback that was used, an option that was ignored).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Explained {
    pub files: Vec<PathBuf>,
    pub notes: Vec<String>,
}

/// Token layout of a model: `prefix` tokens, then a `gh × gw` patch grid of `patch` px.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    t: usize,
    prefix: usize,
    gh: usize,
    gw: usize,
    patch: usize,
}

impl Geometry {
    /// The layout of a model made of patch tokens; an error names a model that is not.
    fn of(cfg: &ModelConfig) -> Result<Self> {
        let t = cfg.tokens().ok_or_else(|| {
            Error::Invalid(format!(
                "a {} model has no patch tokens: nothing to draw",
                cfg.arch()
            ))
        })?;
        let (gh, gw) = t.grid;
        Ok(Geometry {
            t: t.prefix + gh * gw,
            prefix: t.prefix,
            gh,
            gw,
            patch: t.patch_size,
        })
    }

    /// The patch map of a `t × t` attention or rollout matrix: the class token's row, or
    /// the mean over patch queries without a class token; divided by its maximum.
    fn map(&self, m: &[f32]) -> Result<Vec<f32>> {
        if self.prefix > 0 {
            viz::cls_map(m, self.t, self.prefix, self.gh, self.gw)
        } else {
            viz::mean_query_map(m, self.t, self.prefix, self.gh, self.gw)
        }
    }

    /// What [`Geometry::map`] shows, for titles.
    fn map_name(&self) -> &'static str {
        if self.prefix > 0 {
            "CLS attention"
        } else {
            "mean-query attention"
        }
    }
}

/// A model input (1, C, H, W) normalised with `p` back to displayable pixels:
/// `round(255·(v·std + mean))`, clamped; one channel becomes gray.
pub fn display_image(x: &Tensor, p: &Preprocess) -> Result<RgbImage> {
    let (_, c, h, w) = x.dims4()?;
    if c != 1 && c != 3 || p.mean.len() != c || p.std.len() != c {
        return Err(Error::Invalid(format!(
            "cannot display a {c}-channel input with {} means and {} stds",
            p.mean.len(),
            p.std.len()
        )));
    }
    let v = x.squeeze(0)?.flatten_all()?.to_vec1::<f32>()?;
    let px = |ch: usize, y: usize, x: usize| {
        let raw = v[(ch * h + y) * w + x] * p.std[ch] + p.mean[ch];
        (raw * 255.0).round().clamp(0.0, 255.0) as u8
    };
    Ok(RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let (x, y) = (x as usize, y as usize);
        if c == 1 {
            let g = px(0, y, x);
            Rgb([g, g, g])
        } else {
            Rgb([px(0, y, x), px(1, y, x), px(2, y, x)])
        }
    }))
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

fn save(img: &RgbImage, dir: &Path, name: &str, files: &mut Vec<PathBuf>) -> Result<()> {
    let path = dir.join(name);
    viz::save_png(img, &path)?;
    files.push(path);
    Ok(())
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::{Path, PathBuf};

    use candle_core::Tensor;

    use crate::predict::{LoadOptions, Predictor};
    use crate::weights::Arch;

    pub fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(rel)
    }

    pub fn predictor(name: &str) -> Predictor {
        let opts = LoadOptions {
            arch: Arch::File(fixture(&format!("{name}/config.json"))),
            ..Default::default()
        };
        Predictor::load(&fixture(&format!("{name}/model.safetensors")), &opts).unwrap()
    }

    pub fn image() -> PathBuf {
        fixture("predict/image_rgb.png")
    }

    /// Shape and data of a `.npy` file, every header rule checked (`viz` test helper).
    pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
        crate::viz::io::read_npy(&std::fs::read(path).unwrap())
    }

    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }
}
