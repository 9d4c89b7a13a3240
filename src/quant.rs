//! int8 checkpoints (`vit quantize`): which layers become int8 and the file they make.
//!
//! Scheme (the one ONNX Runtime's `quantize_dynamic` uses with `per_channel=True`, with
//! activations quantized per row instead of per tensor): each linear layer of a ViT's
//! blocks (attention qkv and proj, MLP fc1 and fc2: all but 2% of ViT-B/16's products)
//! and the patch projection (a stride-P convolution, as ONNX Runtime quantizes a `Conv`)
//! keep their weights as int8 with one symmetric f32 scale per output channel
//! ([`crate::ops::Int8Weight::quantize`]), stored as an I8 tensor under the weight's name and
//! an F32 tensor `<name>_scale` beside it; the safetensors metadata says so under
//! [`META_QUANT`]. LayerNorms, position embedding, head and the
//! attention products stay f32, and activations are quantized as each product runs
//! (`ops/cpu/qgemm`). Loading needs nothing more: a layer with `weight_scale` beside its
//! weight builds as int8 ([`crate::models::layers::Linear::new`]).
//!
//! This module knows the file and the layer names; it does not know the kernels.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::models::ModelConfig;
use crate::ops::Int8Weight;
use crate::weights::{self, int8_input_range_name, int8_scale_name, Arch, FitOptions, SaveMeta};
use crate::{Error, Result};

/// The metadata key holding a quantized checkpoint's [`Scheme`] (JSON).
pub const META_QUANT: &str = "vit.quantization";

/// What a quantized checkpoint says about its quantization.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Scheme {
    /// "int8, symmetric, per output channel".
    pub weights: String,
    /// "dynamic, per row".
    pub activations: String,
    /// The int8 layers' names (their weights).
    pub layers: Vec<String>,
}

/// The layer suffixes that become int8.
const LAYERS: [&str; 4] = [
    ".attn.qkv.weight",
    ".attn.proj.weight",
    ".mlp.fc1.weight",
    ".mlp.fc2.weight",
];

/// Whether tensor `name` of a model of `cfg` is a weight the int8 kernels run: a linear
/// layer of a ViT's (DeiT's, hybrid ViT's) blocks, or a plain ViT's patch projection.
pub fn quantizable(cfg: &ModelConfig, name: &str) -> bool {
    let Some(vit) = cfg.as_vit() else {
        return false;
    };
    (name.starts_with("blocks.") && LAYERS.iter().any(|s| name.ends_with(s)))
        || (name == PATCH && vit.backbone.is_none())
}

/// The patch projection (a stride-P convolution, run as a matrix product).
const PATCH: &str = "patch_embed.proj.weight";

/// Replaces every [`quantizable`] weight in `tensors` (timm names, f32) by its int8 values
/// and adds its scales; returns the quantized names, sorted. An error for an architecture
/// with none (Swin, PVT and the CNNs are not supported).
pub fn quantize_tensors(
    cfg: &ModelConfig,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<Vec<String>> {
    let mut names: Vec<String> = tensors
        .keys()
        .filter(|n| quantizable(cfg, n))
        .cloned()
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(Error::Invalid(format!(
            "int8 quantization supports the ViT family (ViT, DeiT, hybrid ViT); a {} model has \
             no layer it quantizes",
            cfg.arch()
        )));
    }
    for name in &names {
        // A convolution's (D, C, P, P) as the (D, C·P·P) matrix it multiplies by, and back.
        let w = &tensors[name];
        let dims = w.dims().to_vec();
        let q = Int8Weight::quantize(&w.flatten_from(1)?)?;
        tensors.insert(int8_scale_name(name), q.scale.clone());
        tensors.insert(name.clone(), q.values.reshape(dims)?);
    }
    Ok(names)
}

/// Static activations (`vit quantize --calibrate`): the images whose activations fix each
/// int8 layer's input range.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// A dataset as `vit train` names it; its training split is used.
    pub dataset: String,
    pub data_dir: Option<std::path::PathBuf>,
    /// How many images (spread evenly over the split).
    pub images: usize,
    pub quiet: bool,
}

/// Runs the model of `cfg` with `tensors` (int8 layers, dynamic activations) on
/// `calibration`'s images, prepared as `pre` says, and adds each int8 layer's input range
/// (`<layer>.input_range`: [min, max] of its inputs, widened to hold 0) to `tensors`.
/// Returns a description of the data for the checkpoint's metadata.
pub fn calibrate(
    cfg: &ModelConfig,
    tensors: &mut HashMap<String, Tensor>,
    layers: &[String],
    pre: &crate::models::Preprocess,
    calibration: &Calibration,
) -> Result<String> {
    use crate::data::{self, DataLoader, LoaderConfig, PhotoCrop, Split};
    use crate::models::Architecture;
    if calibration.images == 0 {
        return Err(Error::Invalid(
            "--calibrate-images must be at least 1".into(),
        ));
    }
    let spec: data::DatasetSpec = calibration.dataset.parse()?;
    let [h, w] = cfg.image_size();
    let opts = data::LoadOptions {
        quiet: calibration.quiet,
        image_size: Some((h, w)),
        channels: Some(cfg.in_channels()),
        ..Default::default()
    };
    let all = data::open(&spec, Split::Train, calibration.data_dir.as_deref(), &opts)?;
    if all.is_empty() {
        return Err(Error::Invalid(format!(
            "dataset {} has no training images to calibrate on",
            calibration.dataset
        )));
    }
    let n = calibration.images.min(all.len());
    let picked: Vec<usize> = (0..n).map(|i| i * all.len() / n).collect();
    let images = all.subset(&picked)?;
    let dev = candle_core::Device::Cpu;
    let model = cfg.build(candle_nn::VarBuilder::from_tensors(
        tensors.clone(),
        candle_core::DType::F32,
        &dev,
    ))?;
    let mut config = LoaderConfig::eval(32, pre.mean.clone(), pre.std.clone());
    config.crop = PhotoCrop::Center(crate::predict::center_crop(pre));
    let loader = DataLoader::new(images, config)?;
    let ((), ranges) = crate::ops::calibrate(|| {
        for batch in loader.epoch(0)? {
            let batch = batch?;
            let x = Tensor::from_vec(batch.images, batch.shape.to_vec(), &dev)?;
            model.forward(&x)?;
        }
        Ok(())
    })?;
    for name in layers {
        let layer = name.strip_suffix(".weight").unwrap_or(name);
        let (lo, hi) = ranges
            .get(layer)
            .copied()
            .ok_or_else(|| Error::Invalid(format!("calibration: layer {layer} saw no input")))?;
        tensors.insert(int8_input_range_name(name), Tensor::new(&[lo, hi], &dev)?);
    }
    Ok(format!(
        "static, per tensor: calibrated on {n} training images of {}",
        calibration.dataset
    ))
}

/// What [`quantize_checkpoint`] did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The int8 layers.
    pub layers: Vec<String>,
    /// Sizes of the input and output files, in bytes.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// How activations are quantized ([`Scheme::activations`]).
    pub activations: String,
    /// Things the user should know (from loading the input).
    pub warnings: Vec<String>,
}

/// Reads the f32 checkpoint `input` (any form `vit predict` reads: ours, timm, HF, `.npz`),
/// quantizes its ViT blocks' linear layers to int8 and writes `output` (timm naming, our
/// metadata, written atomically). Activations are quantized per row as each product runs,
/// or, with `calibration`, with the fixed ranges [`calibrate`] finds.
pub fn quantize_checkpoint(
    input: &Path,
    output: &Path,
    arch: &Arch,
    calibration: Option<&Calibration>,
) -> Result<Report> {
    let fitted = weights::load_fitted(input, arch, FitOptions::default())?;
    if fitted.is_int8() {
        return Err(Error::Checkpoint {
            path: fitted.checkpoint.path.clone(),
            msg: "it is already int8".into(),
        });
    }
    let pre = fitted.preprocess(arch);
    let cfg = fitted.config;
    let mut tensors = fitted.tensors;
    let layers = quantize_tensors(&cfg, &mut tensors)?;
    let activations = match calibration {
        Some(c) => calibrate(&cfg, &mut tensors, &layers, &pre, c)?,
        None => "dynamic, per row".into(),
    };
    let scheme = Scheme {
        weights: "int8, symmetric, per output channel".into(),
        activations: activations.clone(),
        layers: layers.clone(),
    };
    let meta = SaveMeta {
        config: Some(&cfg),
        preprocess: Some(&pre),
        class_names: fitted.checkpoint.class_names.as_deref(),
        extra: vec![(
            META_QUANT.into(),
            serde_json::to_string(&scheme).map_err(|e| Error::Invalid(e.to_string()))?,
        )],
    };
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    weights::save(output, &tensors, &HashMap::new(), &meta)?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    Ok(Report {
        layers,
        bytes_in: size(&fitted.checkpoint.path),
        bytes_out: size(output),
        activations,
        warnings: fitted.warnings,
    })
}

#[cfg(test)]
mod tests;
