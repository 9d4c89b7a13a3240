//! How an image file becomes a model's input at evaluation time: timm's `pretrained_cfg`
//! preprocessing (mean, std, crop fraction, interpolation) and HF's `preprocessor_config.json`.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How an image file becomes the model's input at evaluation time (timm's `pretrained_cfg`
/// and HF's `preprocessor_config.json`). Stored in our checkpoints' metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Per-channel mean subtracted after scaling pixels to [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by.
    pub std: Vec<f32>,
    /// Fraction of the resized image kept by the center crop (timm `crop_pct`): the shorter
    /// side is resized to size / crop_pct, then the center is cropped. 1.0 keeps it all.
    pub crop_pct: f64,
    /// Resampling filter: "bicubic" (timm's default for ViT) or "bilinear".
    pub interpolation: String,
    /// "shorter" (timm: keep the aspect ratio, resize the shorter side, center crop) or
    /// "exact" (HF ViTImageProcessor: resize straight to the input size).
    #[serde(default = "default_resize")]
    pub resize: String,
}

fn default_resize() -> String {
    "shorter".into()
}

impl Preprocess {
    /// The ViT default of timm and HF: mean and std 0.5 for every channel, bicubic,
    /// no crop.
    pub fn vit_default(channels: usize) -> Self {
        Preprocess {
            mean: vec![0.5; channels],
            std: vec![0.5; channels],
            crop_pct: 1.0,
            interpolation: "bicubic".into(),
            resize: default_resize(),
        }
    }

    /// ImageNet's mean and std (timm's `IMAGENET_DEFAULT_*`), bicubic, center crop
    /// `crop_pct`: the preprocessing of timm's DeiT, ResNet, Swin and PVT weights.
    pub fn imagenet(crop_pct: f64) -> Self {
        Preprocess {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
            crop_pct,
            ..Preprocess::vit_default(3)
        }
    }

    /// Checks lengths against the channel count and value ranges.
    pub fn validate(&self, channels: usize) -> Result<()> {
        if self.mean.len() != channels || self.std.len() != channels {
            return Err(Error::Config(format!(
                "mean and std need {channels} values for {channels}-channel input, got {} and {}",
                self.mean.len(),
                self.std.len()
            )));
        }
        if let Some(m) = self.mean.iter().find(|m| !m.is_finite()) {
            return Err(Error::Config(format!(
                "mean values must be finite numbers, got {m}"
            )));
        }
        if let Some(s) = self.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(Error::Config(format!(
                "std values must be finite and positive, got {s}"
            )));
        }
        if !(self.crop_pct > 0.0 && self.crop_pct <= 1.0) {
            return Err(Error::Config(format!(
                "crop_pct must be in (0, 1], got {}",
                self.crop_pct
            )));
        }
        if !matches!(self.interpolation.as_str(), "bicubic" | "bilinear") {
            return Err(Error::Config(format!(
                "interpolation must be bicubic or bilinear, got '{}'",
                self.interpolation
            )));
        }
        if !matches!(self.resize.as_str(), "shorter" | "exact") {
            return Err(Error::Config(format!(
                "resize must be shorter or exact, got '{}'",
                self.resize
            )));
        }
        Ok(())
    }
}
