//! The training recipe: one flat serde struct (TOML), its defaults (the README quick
//! start: Fashion-MNIST with `vit_fmnist`) and validation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::DistillKind;
use crate::data::{CenterCrop, DatasetSpec, RandomResizedCrop, ResizeFilter};
use crate::models::{Architecture, ModelConfig};
use crate::{Error, Result};

/// Everything a training run needs. Every field has a CLI flag of the same name
/// (`--batch-size` for `batch_size`) that overrides the recipe file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    /// fashion-mnist | mnist | cifar10 | cifar100 | folder:PATH
    pub dataset: String,
    /// Folder holding the dataset files (else cache, system copy, download).
    pub data_dir: Option<PathBuf>,
    /// Model preset (see `vit info`); ignored when `model` is given.
    pub preset: String,
    /// A full model config instead of a preset.
    pub model: Option<ModelConfig>,
    /// Stochastic-depth rate overriding the model config's.
    pub drop_path: Option<f64>,
    /// Class count overriding the model config's. Unset when fine-tuning (`init`): the
    /// dataset's class count, with a fresh head.
    pub num_classes: Option<usize>,
    pub epochs: usize,
    /// Images per optimizer step (split into `accum_steps` micro-batches).
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed before each optimizer step.
    pub accum_steps: usize,
    /// Peak learning rate after warmup.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub label_smoothing: f64,
    /// Global gradient-norm clipping threshold (0 = off).
    pub clip_grad: f64,
    /// Random-crop padding in pixels (0 = off).
    pub crop_pad: usize,
    /// Random horizontal flips; default per dataset (off for digits).
    pub hflip: Option<bool>,
    /// Probability of erasing a random rectangle with noise (timm `--reprob`; 0 = off).
    pub random_erase: f64,
    /// Image folders: the range of the random resized crop's area, as a fraction of the
    /// image's (timm `--scale`).
    pub scale: [f64; 2],
    /// Image folders: the range of the random resized crop's aspect ratio (timm `--ratio`).
    pub ratio: [f64; 2],
    /// Image folders: the fraction of the resized image kept by the evaluation center crop;
    /// unset: the preset's pretrained value (timm `--crop-pct`).
    pub crop_pct: Option<f64>,
    /// Image folders: threads decoding images, at the lowest priority; unset: one per core
    /// (timm `--workers`).
    pub workers: Option<usize>,
    /// Train on this fraction of the training images (after the validation split): a
    /// seeded, class-balanced subset, to measure how accuracy grows with data. Default 1.
    pub train_fraction: f64,
    /// Images held out of the training set for validation; unset: 10% of the training
    /// set, at most 5,000 ([`crate::data::ValSize::DEFAULT`]).
    pub val_size: Option<usize>,
    /// Images per batch when evaluating; unset: the training batch size (as timm's
    /// validation batch size).
    pub eval_batch_size: Option<usize>,
    pub seed: u64,
    /// Stop after this many optimizer steps (quick runs, tests).
    pub max_steps: Option<u64>,
    /// Also write `checkpoint-last` every this many optimizer steps (0 = each epoch only).
    pub checkpoint_every: u64,
    /// Gradient checkpointing (timm's `set_grad_checkpointing`): keep only each block's
    /// input in the forward and recompute the block in backward; the same gradients, less
    /// memory, one more forward of the blocks. ViT-family models.
    pub grad_checkpoint: bool,
    /// The precision of the matrix products: "f32", or "bf16" (mixed precision as PyTorch's
    /// bf16 autocast: linear layers' and attention's products on bf16 operands, weights,
    /// gradients, LayerNorm, softmax and the loss in f32).
    pub precision: String,
    /// Distil from this trained model (DeiT): any checkpoint the tool reads that says its
    /// architecture (ours, or HF with config.json), with the student's classes.
    pub teacher: Option<PathBuf>,
    /// "hard" (the teacher's top class, DeiT's default) or "soft" (its distribution).
    pub distill: DistillKind,
    /// Weight of the distillation term (the class head's loss gets 1 − α).
    pub distill_alpha: f64,
    /// Temperature of soft distillation.
    pub distill_tau: f64,
    /// Label every training image with the teacher once, un-augmented, before the first
    /// epoch, and distil from those logits at every step instead of running the teacher on
    /// each augmented batch ([`super::TeacherCache`]): the teacher's cost once, not every
    /// epoch.
    pub teacher_cache: bool,
    /// Start from these weights (fine-tuning; timm or HF naming, any resolution).
    pub init: Option<PathBuf>,
    /// Output folder (default `runs/<timestamp>`).
    pub out: Option<PathBuf>,
    /// "cpu" or "cuda" (needs the `cuda` feature).
    pub device: String,
}

impl Default for Recipe {
    /// The default recipe: Fashion-MNIST, `vit_fmnist`, AdamW with warmup + cosine.
    fn default() -> Self {
        Recipe {
            dataset: "fashion-mnist".into(),
            data_dir: None,
            preset: "vit_fmnist".into(),
            model: None,
            drop_path: None,
            num_classes: None,
            epochs: 24,
            batch_size: 64,
            accum_steps: 1,
            lr: 2e-3,
            min_lr: 1e-5,
            warmup_epochs: 0.5,
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            label_smoothing: 0.1,
            clip_grad: 1.0,
            crop_pad: 1,
            hflip: None,
            random_erase: 0.0,
            scale: RandomResizedCrop::default().scale,
            ratio: RandomResizedCrop::default().ratio,
            crop_pct: None,
            workers: None,
            train_fraction: 1.0,
            val_size: None,
            eval_batch_size: None,
            seed: 0,
            max_steps: None,
            checkpoint_every: 0,
            grad_checkpoint: false,
            precision: "f32".into(),
            teacher: None,
            distill: DistillKind::Hard,
            distill_alpha: 0.5,
            distill_tau: 1.0,
            teacher_cache: false,
            init: None,
            out: None,
            device: "cpu".into(),
        }
    }
}

impl Recipe {
    /// Reads a recipe TOML file; missing fields take the defaults.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_toml(&crate::files::read_text(path)?, path)
    }

    /// Parses a recipe's TOML text as [`Recipe::from_file`] does; `path` names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self> {
        toml::from_str(text)
            .map_err(|e| Error::format(path, e.to_string().lines().collect::<Vec<_>>().join(" ")))
    }

    /// The model a file describes, for `vit info --config`: a model config (TOML or JSON, as
    /// [`ModelConfig::from_file`]) or a training recipe (its `[model]` table or preset, with
    /// its overrides). A TOML file with a `model` table, or a `preset`, `dataset` or
    /// `epochs` key, is read as a recipe, and its errors are a recipe's.
    pub fn model_of_file(path: &Path) -> Result<ModelConfig> {
        let text = crate::files::read_text(path)?;
        let is_json = path.extension().is_some_and(|e| e == "json");
        let recipe_keys = ["model", "preset", "dataset", "epochs"];
        let is_recipe = !is_json
            && toml::from_str::<toml::Table>(&text)
                .is_ok_and(|t| recipe_keys.iter().any(|k| t.contains_key(*k)));
        match is_recipe {
            true => Self::from_toml(&text, path)?.model_config(),
            false => ModelConfig::from_text(&text, path),
        }
    }

    /// The recipe saved in a run folder (for `--resume`).
    pub fn of_run(dir: &Path) -> Result<Self> {
        let path = dir.join(super::RECIPE);
        if !path.exists() {
            return Err(Error::Invalid(format!(
                "{} is not a run folder: it has no {}",
                dir.display(),
                super::RECIPE
            )));
        }
        Self::from_file(&path)
    }

    /// The model's name in tables and reports: the preset, or "custom <arch>" for a
    /// `model` table (e.g. "custom resnet").
    pub fn model_name(&self) -> String {
        match &self.model {
            Some(c) => format!("custom {}", c.arch()),
            None => self.preset.clone(),
        }
    }

    /// The precision of the run's matrix products, from the `precision` field.
    pub fn precision(&self) -> Result<crate::ops::Precision> {
        self.precision.parse()
    }

    /// The model config this recipe trains.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let mut c = match &self.model {
            Some(c) => c.clone(),
            None => ModelConfig::preset(&self.preset)?,
        };
        if let Some(d) = self.drop_path {
            c.set_drop_path(d);
        }
        if let Some(k) = self.num_classes {
            c.set_num_classes(k);
        }
        c.validate()?;
        Ok(c)
    }

    /// The dataset named by `dataset`.
    pub fn dataset_spec(&self) -> Result<DatasetSpec> {
        self.dataset.parse()
    }

    /// Images per evaluation batch.
    pub fn eval_batch(&self) -> usize {
        self.eval_batch_size.unwrap_or(self.batch_size)
    }

    /// The distillation settings (used with a teacher).
    pub fn distillation(&self) -> super::Distill {
        super::Distill {
            kind: self.distill,
            alpha: self.distill_alpha,
            tau: self.distill_tau,
        }
    }

    /// The training crop for image folders.
    pub fn random_resized_crop(&self) -> RandomResizedCrop {
        RandomResizedCrop {
            scale: self.scale,
            ratio: self.ratio,
        }
    }

    /// Checks the numbers fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        self.precision()?;
        if self.epochs == 0 {
            return bad("epochs must be at least 1".into());
        }
        if self.batch_size == 0 || self.accum_steps == 0 || self.eval_batch_size == Some(0) {
            return bad("batch_size, accum_steps and eval_batch_size must be positive".into());
        }
        if !self.batch_size.is_multiple_of(self.accum_steps) {
            return bad(format!(
                "batch_size {} is not divisible by accum_steps {}",
                self.batch_size, self.accum_steps
            ));
        }
        if self.max_steps == Some(0) {
            return bad("max_steps must be at least 1".into());
        }
        crate::error::check_finite(
            [
                ("lr", self.lr),
                ("min_lr", self.min_lr),
                ("warmup_epochs", self.warmup_epochs),
                ("weight_decay", self.weight_decay),
                ("beta1", self.beta1),
                ("beta2", self.beta2),
                ("eps", self.eps),
                ("label_smoothing", self.label_smoothing),
                ("clip_grad", self.clip_grad),
                ("random_erase", self.random_erase),
                ("scale", self.scale[0]),
                ("scale", self.scale[1]),
                ("ratio", self.ratio[0]),
                ("ratio", self.ratio[1]),
                ("train_fraction", self.train_fraction),
                ("distill_alpha", self.distill_alpha),
                ("distill_tau", self.distill_tau),
            ]
            .into_iter()
            .chain(self.drop_path.map(|d| ("drop_path", d)))
            .chain(self.crop_pct.map(|c| ("crop_pct", c))),
        )?;
        self.random_resized_crop().validate().map_err(cfg_err)?;
        if let Some(c) = self.crop_pct {
            let crop = CenterCrop {
                crop_pct: c,
                exact: false,
                filter: ResizeFilter::Bicubic,
            };
            crop.validate().map_err(cfg_err)?;
        }
        if !(self.train_fraction > 0.0 && self.train_fraction <= 1.0) {
            return bad(format!(
                "train_fraction must be in (0, 1], got {}",
                self.train_fraction
            ));
        }
        if !(0.0..=1.0).contains(&self.distill_alpha) {
            return bad(format!(
                "distill_alpha must be in [0, 1], got {}",
                self.distill_alpha
            ));
        }
        if self.distill_tau <= 0.0 {
            return bad(format!("distill_tau must be > 0, got {}", self.distill_tau));
        }
        if self.teacher_cache && self.teacher.is_none() {
            return bad("teacher_cache needs a teacher (--teacher CHECKPOINT)".into());
        }
        if self.workers == Some(0) {
            return bad("workers must be at least 1".into());
        }
        if self.lr <= 0.0 || self.min_lr < 0.0 || self.min_lr > self.lr {
            return bad(format!(
                "need 0 <= min_lr <= lr and lr > 0, got lr {} and min_lr {}",
                self.lr, self.min_lr
            ));
        }
        if !(0.0..=1.0).contains(&self.random_erase) {
            return bad(format!(
                "random_erase must be a probability in [0, 1], got {}",
                self.random_erase
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(format!(
                "label_smoothing must be in [0, 1), got {}",
                self.label_smoothing
            ));
        }
        for (name, v) in [
            ("weight_decay", self.weight_decay),
            ("clip_grad", self.clip_grad),
            ("warmup_epochs", self.warmup_epochs),
        ] {
            if v < 0.0 {
                return bad(format!("{name} must be >= 0, got {v}"));
            }
        }
        if self.eps <= 0.0 {
            return bad(format!("eps must be > 0, got {}", self.eps));
        }
        if self.num_classes == Some(0) {
            return bad("num_classes must be at least 1".into());
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(format!("{name} must be in [0, 1), got {v}"));
            }
        }
        if let Some(d) = self.drop_path {
            if !(0.0..1.0).contains(&d) {
                return bad(format!("drop_path must be in [0, 1), got {d}"));
            }
        }
        self.model_config()?;
        self.dataset_spec()?;
        Ok(())
    }
}

fn cfg_err(e: Error) -> Error {
    Error::Config(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recipes_shipped_in_the_repository_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let r = Recipe::from_file(&path).unwrap();
                r.validate().unwrap();
                r.model_config().unwrap();
                n += 1;
            }
        }
        assert!(n >= 1, "no recipe in {}", dir.display());
    }

    #[test]
    fn partial_toml_takes_defaults_and_rejects_unknown_fields() {
        let r: Recipe = toml::from_str("epochs = 3\nlr = 0.001\n").unwrap();
        assert_eq!(r.epochs, 3);
        assert_eq!(r.preset, "vit_fmnist");
        r.validate().unwrap();
        let e = Recipe::from_toml("epoch = 3\n", Path::new("r.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("r.toml") && e.contains("unknown field `epoch`"),
            "{e}"
        );
        let back: Recipe = toml::from_str(&toml::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn inconsistent_recipes_are_rejected() {
        let r = Recipe {
            batch_size: 10,
            accum_steps: 3,
            ..Recipe::default()
        };
        assert!(r
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not divisible"));
        let r = Recipe {
            dataset: "imagenet-22k".into(),
            ..Recipe::default()
        };
        assert!(r
            .validate()
            .unwrap_err()
            .to_string()
            .contains("imagenet-22k"));
        let r = Recipe {
            random_erase: 1.25,
            ..Recipe::default()
        };
        assert!(r
            .validate()
            .unwrap_err()
            .to_string()
            .contains("random_erase"));
    }
}
