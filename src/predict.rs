//! Inference on image files: resolving the architecture and preprocessing of a checkpoint,
//! timm's evaluation transform (resize, center crop, normalise) and top-k predictions.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::DynamicImage;
use serde::Serialize;

use crate::data::photo::{CenterCrop, Pixels};
use crate::data::ResizeFilter;
use crate::models::{self, Architecture, Classifier, ModelConfig, Preprocess};
use crate::weights::{self, Arch, FitOptions, Fitted, PosResample};
use crate::{Error, Result};

/// The 1000 ImageNet-1k class names in index order (timm's `ImageNetInfo`).
pub const IMAGENET_CLASSES: &str = include_str!("imagenet_classes.txt");

/// Options of `vit predict` (and of every command that runs a checkpoint on images).
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub arch: Arch,
    /// Square input size overriding the config's (the position embedding is resampled).
    pub img_size: Option<usize>,
    pub crop_pct: Option<f64>,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    pub pos_resample: PosResample,
    /// Where the model runs (default the CPU); images are prepared on the CPU and moved.
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            arch: Arch::default(),
            img_size: None,
            crop_pct: None,
            mean: None,
            std: None,
            pos_resample: PosResample::default(),
            device: Device::Cpu,
        }
    }
}

/// A model ready to run on images, with how to prepare them and what its classes are called.
#[derive(Debug)]
pub struct Predictor {
    pub model: Box<dyn Classifier>,
    pub config: ModelConfig,
    pub preprocess: Preprocess,
    pub class_names: Vec<String>,
    /// Things the user should know (resampled position embedding, ignored tensors).
    pub warnings: Vec<String>,
    /// The device the model's weights live on; [`Predictor::input`] moves images there.
    pub device: Device,
}

impl Predictor {
    /// Loads `weights` and resolves config, preprocessing and class names: explicit options
    /// first, then the checkpoint's metadata, then the ViT defaults of timm and HF.
    pub fn load(weights: &Path, opts: &LoadOptions) -> Result<Self> {
        let fit = FitOptions {
            img_size: opts.img_size,
            resample: opts.pos_resample,
            new_head: None,
        };
        let (model, loaded) = load_model(weights, &opts.arch, fit, &opts.device)?;
        let Fitted {
            checkpoint: ck,
            config,
            mut warnings,
            ..
        } = loaded;
        if !ck.ignored.is_empty() {
            warnings.push(format!(
                "ignored tensors not used by the model: {}",
                ck.ignored.join(", ")
            ));
        }
        // The checkpoint's own preprocessing, else the preset's pretrained one (timm's
        // `pretrained_cfg`), else the architecture's default.
        let preset = match &opts.arch {
            Arch::Preset(name) => models::preset_preprocess(name),
            _ => None,
        };
        let mut preprocess = ck
            .preprocess
            .clone()
            .or(preset)
            .unwrap_or_else(|| config.default_preprocess());
        if let Some(c) = opts.crop_pct {
            preprocess.crop_pct = c;
        }
        if let Some(m) = &opts.mean {
            preprocess.mean = m.clone();
        }
        if let Some(s) = &opts.std {
            preprocess.std = s.clone();
        }
        preprocess.validate(config.in_channels())?;
        let k = config.num_classes();
        let class_names = match &ck.class_names {
            Some(n) if n.len() == k => n.clone(),
            _ if k == 1000 => IMAGENET_CLASSES.lines().map(String::from).collect(),
            _ => (0..k).map(|i| i.to_string()).collect(),
        };
        Ok(Predictor {
            model,
            config,
            preprocess,
            class_names,
            warnings,
            device: opts.device.clone(),
        })
    }

    /// Reads and prepares one image file: (1, C, H, W) on the predictor's device.
    pub fn input(&self, path: &Path) -> Result<Tensor> {
        let img = load_image(path)?;
        Ok(eval_transform(&img, &self.config, &self.preprocess)?.to_device(&self.device)?)
    }

    /// Top-k classes and logits for one image file.
    pub fn predict(&self, path: &Path, top_k: usize) -> Result<Prediction> {
        self.check_top_k(top_k)?;
        let logits = self.model.forward(&self.input(path)?)?.squeeze(0)?; // (classes,)
        let logits = logits.to_vec1::<f32>()?;
        check_finite(&logits, path)?;
        Ok(Prediction {
            image: path.display().to_string(),
            top_k: top_k_of(&logits, top_k, &self.class_names),
            logits,
        })
    }

    /// Top-k classes and logits for several image files in one forward pass: their
    /// evaluation-transformed inputs stacked into (B, C, H, W). The same results as
    /// [`Predictor::predict`] on each file (up to the rounding of a larger matrix product).
    pub fn predict_batch(&self, paths: &[PathBuf], top_k: usize) -> Result<Vec<Prediction>> {
        self.check_top_k(top_k)?;
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        let inputs = paths
            .iter()
            .map(|p| self.input(p))
            .collect::<Result<Vec<_>>>()?;
        let logits = self.model.forward(&Tensor::cat(&inputs, 0)?)?; // (B, classes)
        let logits = logits.to_vec2::<f32>()?;
        for (path, l) in paths.iter().zip(&logits) {
            check_finite(l, path)?;
        }
        Ok(paths
            .iter()
            .zip(logits)
            .map(|(path, logits)| Prediction {
                image: path.display().to_string(),
                top_k: top_k_of(&logits, top_k, &self.class_names),
                logits,
            })
            .collect())
    }

    /// Runs [`Predictor::predict_batch`] on `paths` in batches of `batch_size`, in order,
    /// handing each batch's predictions to `each` as soon as they are ready (to print them
    /// while the next batch runs). Stops at the first error, `each`'s included.
    pub fn predict_all(
        &self,
        paths: &[PathBuf],
        top_k: usize,
        batch_size: usize,
        mut each: impl FnMut(Vec<Prediction>) -> Result<()>,
    ) -> Result<()> {
        self.check_top_k(top_k)?;
        if batch_size == 0 {
            return Err(Error::Invalid("batch-size must be at least 1".into()));
        }
        for chunk in paths.chunks(batch_size) {
            each(self.predict_batch(chunk, top_k)?)?;
        }
        Ok(())
    }

    fn check_top_k(&self, top_k: usize) -> Result<()> {
        if self.config.num_classes() == 0 {
            return Err(Error::Invalid(
                "the model has no classification head (num_classes = 0)".into(),
            ));
        }
        if top_k == 0 {
            return Err(Error::Invalid("top-k must be at least 1".into()));
        }
        Ok(())
    }
}

/// An error when the model's output for the image `path` holds a NaN or an infinity
/// (non-finite weights or preprocessing), instead of a meaningless ranking.
fn check_finite(logits: &[f32], path: &Path) -> Result<()> {
    if let Some(v) = logits.iter().find(|v| !v.is_finite()) {
        return Err(Error::Invalid(format!(
            "the model's output is not finite ({v}) for {}: the weights or the \
             preprocessing hold NaN or infinite values",
            path.display()
        )));
    }
    Ok(())
}

/// File name extensions of the images [`collect_images`] finds in folders (any case).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The image files named by `inputs`, in order: a file stands for itself (whatever its
/// extension; a non-image fails when decoded), a folder for every file with an image
/// extension beneath it, walked recursively in name order (other files are skipped). A
/// folder without any image, or a path that does not exist, is an error naming it.
pub fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|e| Error::io(input, e))?;
        if meta.is_dir() {
            let before = out.len();
            let mut seen = std::collections::HashSet::new();
            walk_images(input, &mut seen, &mut out)?;
            if out.len() == before {
                return Err(Error::Invalid(format!(
                    "{}: no images in this folder (looked for .png, .jpg, .jpeg files)",
                    input.display()
                )));
            }
        } else {
            out.push(input.clone());
        }
    }
    Ok(out)
}

/// Appends the image files beneath `dir` in name order; `seen` holds the folders already
/// walked (canonical paths) so that a symbolic link cannot loop.
fn walk_images(
    dir: &Path,
    seen: &mut std::collections::HashSet<PathBuf>,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    let canonical = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    if !seen.insert(canonical) {
        return Ok(());
    }
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| Ok(e.map_err(|e| Error::io(dir, e))?.path()))
        .collect::<Result<Vec<_>>>()?;
    entries.sort();
    for path in entries {
        // Follows symbolic links; a dangling one is skipped like any other non-image.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            walk_images(&path, seen, out)?;
        } else if meta.is_file() && has_image_extension(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Checkpoint → config → fit → model ([`weights::load_fitted`], then the network on `dev`):
/// the one path from a weights file to a runnable model, used by predict, eval, explain
/// and training's final test. The tensors are plain (no gradient).
pub fn load_model(
    path: &Path,
    arch: &Arch,
    opts: FitOptions,
    dev: &Device,
) -> Result<(Box<dyn Classifier>, Fitted)> {
    let fitted = weights::load_fitted(path, arch, opts)?;
    let tensors = fitted
        .tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(dev)?)))
        .collect::<Result<_>>()?;
    let model = fitted
        .config
        .build(VarBuilder::from_tensors(tensors, DType::F32, dev))?;
    Ok((model, fitted))
}

/// One image's result.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub image: String,
    pub top_k: Vec<Ranked>,
    pub logits: Vec<f32>,
}

/// The header of [`Prediction::csv_rows`].
pub const CSV_HEADER: &str = "image,rank,index,label,probability";

impl Prediction {
    /// One CSV row per class of the top-k list (rank from 1), under [`CSV_HEADER`]; the
    /// image and label are quoted when they hold a comma, quote or line break (RFC 4180).
    pub fn csv_rows(&self) -> Vec<String> {
        self.top_k
            .iter()
            .enumerate()
            .map(|(rank, r)| {
                format!(
                    "{},{},{},{},{}",
                    csv_field(&self.image),
                    rank + 1,
                    r.index,
                    csv_field(&r.label),
                    r.probability
                )
            })
            .collect()
    }
}

/// A CSV field: as is, or in double quotes with inner quotes doubled when it holds a
/// comma, a quote or a line break.
pub fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

/// One class of a top-k list.
#[derive(Debug, Clone, Serialize)]
pub struct Ranked {
    pub index: usize,
    pub label: String,
    pub probability: f32,
}

/// The `k` most probable classes under softmax(logits), best first.
pub fn top_k_of(logits: &[f32], k: usize, names: &[String]) -> Vec<Ranked> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = logits.iter().map(|l| ((l - max) as f64).exp()).collect();
    let sum: f64 = exp.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order
        .into_iter()
        .take(k)
        .map(|i| Ranked {
            index: i,
            label: names.get(i).cloned().unwrap_or_else(|| i.to_string()),
            probability: (exp[i] / sum) as f32,
        })
        .collect()
}

/// Decodes an image file (PNG or JPEG); a missing file or a non-image is a clear error.
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    crate::files::decode_image(path)
}

/// timm's evaluation transform, producing (1, C, H, W) f32:
/// resize (the shorter side to floor(size / crop_pct), keeping the aspect ratio; or straight
/// to the input size in HF's "exact" mode), center crop to the input size, scale to [0, 1],
/// normalise with mean and std. An image already of the target size with crop_pct 1 is
/// not resampled at all.
pub fn eval_transform(img: &DynamicImage, cfg: &ModelConfig, p: &Preprocess) -> Result<Tensor> {
    let c = cfg.in_channels();
    let [th, tw] = cfg.image_size();
    let px = center_crop(p).apply(Pixels::from_image(img, c)?, (th, tw))?;
    let mut out = vec![0f32; c * th * tw];
    for ch in 0..c {
        let (m, s) = (p.mean[ch], p.std[ch]);
        for (i, o) in out[ch * th * tw..(ch + 1) * th * tw].iter_mut().enumerate() {
            let v = px.data[i * c + ch] as f32 / 255.0;
            *o = (v - m) / s;
        }
    }
    Ok(Tensor::from_vec(out, (1, c, th, tw), &Device::Cpu)?)
}

/// The resize and center crop of a model's preprocessing: bilinear when it says so, else
/// bicubic (PIL's filters, antialiased when shrinking, as timm's eval transform).
pub fn center_crop(p: &Preprocess) -> CenterCrop {
    CenterCrop {
        crop_pct: p.crop_pct,
        exact: p.resize == "exact",
        filter: if p.interpolation == "bilinear" {
            ResizeFilter::Bilinear
        } else {
            ResizeFilter::Bicubic
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet_names_are_complete() {
        let names: Vec<&str> = IMAGENET_CLASSES.lines().collect();
        assert_eq!(names.len(), 1000);
        assert_eq!(names[0], "tench, Tinca tinca");
    }

    #[test]
    fn top_k_is_sorted_softmax() {
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let r = top_k_of(&[0.0, 2.0, 1.0], 2, &names);
        assert_eq!((r[0].index, r[1].index), (1, 2));
        let z = 1.0 + 2f32.exp() + 1f32.exp();
        assert!((r[0].probability - 2f32.exp() / z).abs() < 1e-6);
        assert_eq!(r[1].label, "c");
    }

    #[test]
    fn center_crop_and_normalise_without_resampling() {
        // 4x2 grayscale image, crop_pct 0.5 → resize shorter side 2 to floor(2/0.5)=4 would
        // resample; instead use a target equal to the image with crop 1: values pass through.
        let img = DynamicImage::ImageLuma8(
            image::GrayImage::from_raw(2, 2, vec![0, 51, 102, 255]).unwrap(),
        );
        let cfg = ModelConfig::Vit(crate::ViTConfig {
            in_channels: 1,
            ..crate::ViTConfig::timm(2, 1, 4, 1, 1)
        });
        let p = Preprocess::vit_default(1);
        let t = eval_transform(&img, &cfg, &p).unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, vec![-1.0, (0.2 - 0.5) / 0.5, (0.4 - 0.5) / 0.5, 1.0]);
    }

    /// A timm checkpoint (no metadata) run with `--preset` takes timm's pretrained
    /// preprocessing for that name (crop 0.9, bicubic, mean and std 0.5), not crop 1.
    #[test]
    fn a_preset_brings_its_pretrained_preprocessing() {
        let cfg = ModelConfig::preset("vit_tiny_patch16_224").unwrap();
        let tensors = cfg
            .init_params(0, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timm.safetensors");
        let none = std::collections::HashMap::new();
        crate::weights::save(&path, &tensors, &none, &Default::default()).unwrap();
        let opts = LoadOptions {
            arch: Arch::Preset("vit_tiny_patch16_224".into()),
            ..Default::default()
        };
        let p = Predictor::load(&path, &opts).unwrap();
        assert_eq!(p.preprocess.crop_pct, 0.9);
        assert_eq!(p.preprocess.interpolation, "bicubic");
        assert_eq!(p.preprocess.mean, vec![0.5; 3]);
        let wide = models::preset_preprocess("vit_base_patch16_384").unwrap();
        assert_eq!((wide.crop_pct, wide.resize.as_str()), (1.0, "exact"));
    }

    #[test]
    fn csv_quotes_commas_quotes_and_line_breaks_only() {
        assert_eq!(csv_field("truck"), "truck");
        assert_eq!(csv_field("tench, Tinca tinca"), "\"tench, Tinca tinca\"");
        assert_eq!(csv_field("a \"b\""), "\"a \"\"b\"\"\"");
        assert_eq!(csv_field("a\nb"), "\"a\nb\"");
        let p = Prediction {
            image: "x,y.png".into(),
            top_k: vec![Ranked {
                index: 3,
                label: "a\"b".into(),
                probability: 0.5,
            }],
            logits: vec![],
        };
        assert_eq!(p.csv_rows(), vec!["\"x,y.png\",1,3,\"a\"\"b\",0.5"]);
    }

    #[test]
    fn folders_are_walked_in_name_order_for_images_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("b/c")).unwrap();
        std::fs::create_dir_all(d.join("empty")).unwrap();
        for f in [
            "z.PNG",
            "a.jpg",
            "notes.txt",
            "b/c/y.JpEg",
            "b/x.png",
            "b/readme",
        ] {
            std::fs::write(d.join(f), b"").unwrap();
        }
        let got = collect_images(&[d.to_path_buf(), d.join("notes.txt")]).unwrap();
        let rel: Vec<_> = got
            .iter()
            .map(|p| p.strip_prefix(d).unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(
            rel,
            ["a.jpg", "b/c/y.JpEg", "b/x.png", "z.PNG", "notes.txt"]
        );
        let e = collect_images(&[d.join("empty")]).unwrap_err().to_string();
        assert!(e.contains("empty") && e.contains("no images"), "{e}");
        let e = collect_images(&[d.join("missing")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn a_batch_equals_one_image_at_a_time() {
        let p = crate::explain::testutil::predictor("timm_tiny");
        let fx = crate::explain::testutil::fixture("predict");
        let paths = vec![
            fx.join("image_rgb.png"),
            fx.join("image_40x48.png"),
            fx.join("image_rgb.png"),
        ];
        let batch = p.predict_batch(&paths, 3).unwrap();
        assert_eq!(batch.len(), 3);
        for (path, b) in paths.iter().zip(&batch) {
            let one = p.predict(path, 3).unwrap();
            assert_eq!(one.image, b.image);
            let idx = |r: &[Ranked]| r.iter().map(|r| r.index).collect::<Vec<_>>();
            assert_eq!(idx(&one.top_k), idx(&b.top_k));
            for (x, y) in one.logits.iter().zip(&b.logits) {
                assert!((x - y).abs() <= 1e-5, "{x} vs {y}");
            }
        }
        let mut seen = Vec::new();
        p.predict_all(&paths, 1, 2, |preds| {
            seen.push(preds.len());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [2, 1]);
        assert!(p.predict_all(&paths, 1, 0, |_| Ok(())).is_err());
        let e = p.predict_batch(&paths, 0).unwrap_err().to_string();
        assert!(e.contains("top-k"), "{e}");
    }
}
