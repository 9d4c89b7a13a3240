//! `vit patches`: how an image becomes tokens, drawn as the numbered patch grid and the
//! sheet of flattened patches.

use std::path::Path;

use image::{imageops, DynamicImage, RgbImage};

use super::{create_dir, display_image, save, Explained};
use crate::models::{ModelConfig, Preprocess, ViTConfig};
use crate::predict::{eval_transform, load_image};
use crate::viz;
use crate::{Error, Result};

/// The most patches `patches` draws; more would make pictures of hundreds of megapixels.
pub const MAX_PATCHES: usize = 4096;

/// How an image becomes tokens: writes `patch_grid.png` (the image with its patch grid drawn
/// and every patch numbered in sequence order, see [`viz::patch_grid`]) and
/// `patch_sheet.png` (the flattened patches in sequence order, see [`viz::patch_sheet`]) to
/// `out_dir`, which is created if missing.
///
/// With `img_size = Some(n)` the image is first brought to `n × n` as timm's evaluation
/// transform does with `crop_pct = 1`: the shorter side is resized to `n` (bicubic,
/// keeping the aspect ratio), then the centre is cropped; `n` must be a multiple of
/// `patch_size`. Without it the image is used as it is when the patch size divides both
/// sides; otherwise its centre is cropped to the largest multiples of the patch size
/// (torchvision's centre-crop rounding) and a note says so. Colour images are drawn in
/// colour, grayscale ones in gray.
pub fn patches(
    image_path: &Path,
    patch_size: usize,
    img_size: Option<usize>,
    out_dir: &Path,
) -> Result<Explained> {
    if patch_size == 0 {
        return Err(Error::Invalid("the patch size must be positive".into()));
    }
    let src = load_image(image_path)?;
    let mut notes = Vec::new();
    let img = match img_size {
        Some(n) => {
            if n == 0 || n % patch_size != 0 {
                return Err(Error::Invalid(format!(
                    "image size {n} is not a positive multiple of the patch size {patch_size}"
                )));
            }
            resize_square(&src, n, patch_size)?
        }
        None => {
            let rgb = src.to_rgb8();
            let (w, h) = rgb.dimensions();
            let p = patch_size as u32;
            if w < p || h < p {
                return Err(Error::Invalid(format!(
                    "{}: a {w}×{h} image is smaller than one {patch_size}×{patch_size} patch",
                    image_path.display()
                )));
            }
            let (cw, ch) = (w / p * p, h / p * p);
            if (cw, ch) == (w, h) {
                rgb
            } else {
                // torchvision CenterCrop: int(round((size - crop) / 2)), half to even.
                let left = ((w - cw) as f64 / 2.0).round_ties_even() as u32;
                let top = ((h - ch) as f64 / 2.0).round_ties_even() as u32;
                notes.push(format!(
                    "the {w}×{h} image was center-cropped to {cw}×{ch} so that \
                     {patch_size}×{patch_size} patches tile it"
                ));
                imageops::crop_imm(&rgb, left, top, cw, ch).to_image()
            }
        }
    };
    let n = (img.width() as usize / patch_size) * (img.height() as usize / patch_size);
    if n > MAX_PATCHES {
        return Err(Error::Invalid(format!(
            "a {}×{} image makes {n} patches of {patch_size} px, more than {MAX_PATCHES} \
             can be drawn legibly; pass a smaller image size",
            img.width(),
            img.height()
        )));
    }
    create_dir(out_dir)?;
    let mut files = Vec::new();
    save(
        &viz::patch_grid(&img, patch_size)?,
        out_dir,
        "patch_grid.png",
        &mut files,
    )?;
    save(
        &viz::patch_sheet(&img, patch_size)?,
        out_dir,
        "patch_sheet.png",
        &mut files,
    )?;
    Ok(Explained { files, notes })
}

/// `n × n` RGB by timm's evaluation transform with `crop_pct = 1`, mean 0 and std 1, so
/// the tensor holds the resized pixels / 255 exactly.
fn resize_square(img: &DynamicImage, n: usize, patch: usize) -> Result<RgbImage> {
    let cfg = ModelConfig::Vit(ViTConfig {
        image_size: [n, n],
        in_channels: 3,
        ..ViTConfig::timm(n, patch, 4, 1, 1)
    });
    let pre = Preprocess {
        mean: vec![0.0; 3],
        std: vec![1.0; 3],
        ..Preprocess::vit_default(3)
    };
    display_image(&eval_transform(img, &cfg, &pre)?, &pre)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn patches_crop_resize_and_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("img.png");
        let img = RgbImage::from_fn(21, 13, |x, y| Rgb([x as u8 * 10, y as u8 * 10, 0]));
        img.save(&src).unwrap();
        let out = dir.path().join("out");
        let r = patches(&src, 4, None, &out).unwrap();
        assert_eq!(
            r.files,
            [out.join("patch_grid.png"), out.join("patch_sheet.png")]
        );
        assert!(
            r.notes[0].contains("21×13") && r.notes[0].contains("20×12"),
            "{r:?}"
        );
        // The square resize of an image the size it already has changes nothing.
        let sq = RgbImage::from_fn(8, 8, |x, y| Rgb([x as u8 * 30, y as u8 * 30, 7]));
        let resized = resize_square(&DynamicImage::ImageRgb8(sq.clone()), 8, 4).unwrap();
        assert_eq!(resized, sq);
        let r = patches(&src, 4, Some(8), &out).unwrap();
        assert!(r.notes.is_empty());
        assert!(patches(&src, 4, Some(6), &out).is_err());
        assert!(patches(&src, 0, None, &out).is_err());
        assert!(patches(&src, 16, None, &out).is_err());
    }
}
