//! Evaluation: loss, accuracy, per-class accuracy and the confusion matrix of a model on a
//! dataset (no augmentation, plain cross-entropy).

use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::data::{DataLoader, Images, LoaderConfig, PhotoCrop};
use std::path::Path;

use crate::data::{self, Split};
use crate::dist::{Collective, Single};
use crate::models::{Architecture, Classifier};
use crate::predict::{center_crop, load_model};
use crate::weights::{self, FitOptions};
use crate::{ops, Error, Result};

/// Results of [`evaluate`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalResult {
    pub images: usize,
    /// Mean cross-entropy (no label smoothing).
    pub loss: f64,
    pub accuracy: f64,
    /// Accuracy per true class (NaN-free: classes without images get 0).
    pub per_class_accuracy: Vec<f64>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
    pub class_names: Vec<String>,
    /// How a reference model ([`eval_checkpoint`]'s `reference`, e.g. the f32 checkpoint an
    /// int8 one was quantized from) does on the same images, and how often the two agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Agreement>,
}

/// A reference model beside the evaluated one, on the same images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Agreement {
    /// The reference's accuracy.
    pub accuracy: f64,
    /// The share of images where both models' top-1 class is the same.
    pub top1_agreement: f64,
    /// The mean and the smallest cosine similarity between the two models' logits.
    pub mean_logit_cosine: f64,
    pub min_logit_cosine: f64,
}

/// Number of rows of `logits` (B, K) whose argmax equals `y` (B,).
pub fn count_correct(logits: &Tensor, y: &Tensor) -> Result<u64> {
    let pred = logits.argmax(D::Minus1)?;
    Ok(pred
        .eq(y)?
        .to_dtype(candle_core::DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as u64)
}

/// Evaluates `model` on every image of `images`, prepared as `config` says (an evaluation
/// config: [`LoaderConfig::eval`], with the center crop for image files).
pub fn evaluate(
    model: &dyn Classifier,
    images: &Images,
    config: LoaderConfig,
    dev: &Device,
) -> Result<EvalResult> {
    evaluate_against(model, None, images, config, dev)
}

/// [`evaluate`], with a `reference` model run on the same batches ([`EvalResult::reference`]).
pub fn evaluate_against(
    model: &dyn Classifier,
    reference: Option<&dyn Classifier>,
    images: &Images,
    config: LoaderConfig,
    dev: &Device,
) -> Result<EvalResult> {
    evaluate_shared(model, reference, images, config, dev, &Single)
}

/// [`evaluate`] by every process of a data-parallel run together: each evaluates every
/// `size`-th batch, and all get the whole result, the same as one process alone (the
/// batches' losses are added in batch order whichever process computed them).
pub fn evaluate_on(
    model: &dyn Classifier,
    images: &Images,
    config: LoaderConfig,
    dev: &Device,
    world: &dyn Collective,
) -> Result<EvalResult> {
    evaluate_shared(model, None, images, config, dev, world)
}

fn evaluate_shared(
    model: &dyn Classifier,
    reference: Option<&dyn Classifier>,
    images: &Images,
    config: LoaderConfig,
    dev: &Device,
    world: &dyn Collective,
) -> Result<EvalResult> {
    if images.is_empty() {
        return Err(Error::Invalid(
            "the dataset to evaluate on has no images".into(),
        ));
    }
    if reference.is_some() && world.size() > 1 {
        return Err(Error::Invalid(
            "a reference model is evaluated by one process".into(),
        ));
    }
    let k = images.num_classes();
    let loader = DataLoader::new(images.clone(), config)?;
    // Each batch's summed loss, then the confusion counts: this process's, then everyone's.
    let batches = loader.num_batches();
    let mut sums = vec![0f64; batches + k * k];
    // The reference's correct count, agreeing count, and cosine sum and minimum.
    let (mut ref_correct, mut agree, mut cos_sum, mut cos_min) = (0u64, 0u64, 0f64, f64::INFINITY);
    for batch in loader.epoch_strided(0, world.rank(), world.size())? {
        let batch = batch?;
        let n = batch.labels.len();
        let x = Tensor::from_vec(batch.images, batch.shape.to_vec(), dev)?;
        let y = Tensor::from_vec(batch.labels.clone(), n, dev)?;
        let logits = super::forward_sharded(model, &x)?;
        let loss = ops::cross_entropy(&logits, &y, 0.0)?.to_scalar::<f32>()? as f64;
        if !loss.is_finite() {
            return Err(Error::Numeric(format!(
                "the model's output is not finite (loss {loss}): the weights or the \
                 normalisation hold NaN or infinite values"
            )));
        }
        sums[batch.batch_index] = loss * n as f64;
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        if let Some(r) = reference {
            let r_logits = super::forward_sharded(r, &x)?;
            let r_pred = r_logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let (a, b) = (logits.to_vec2::<f32>()?, r_logits.to_vec2::<f32>()?);
            for i in 0..n {
                ref_correct += (r_pred[i] == batch.labels[i]) as u64;
                agree += (r_pred[i] == pred[i]) as u64;
                let c = cosine(&a[i], &b[i]);
                cos_sum += c;
                cos_min = cos_min.min(c);
            }
        }
        for (t, p) in batch.labels.iter().zip(pred) {
            sums[batches + *t as usize * k + p as usize] += 1.0;
        }
    }
    world.sum_f64(&mut sums)?;
    let loss_sum = sums[..batches].iter().fold(0.0, |acc, l| acc + l);
    let confusion: Vec<Vec<u64>> = sums[batches..]
        .chunks(k)
        .map(|row| row.iter().map(|&c| c as u64).collect())
        .collect();
    let class_names = images.class_names().to_vec();
    let images = images.len();
    let per_image = |c: u64| c as f64 / images.max(1) as f64;
    let reference = reference.map(|_| Agreement {
        accuracy: per_image(ref_correct),
        top1_agreement: per_image(agree),
        mean_logit_cosine: cos_sum / images.max(1) as f64,
        min_logit_cosine: cos_min,
    });
    let correct: u64 = (0..k).map(|i| confusion[i][i]).sum();
    let per_class_accuracy = confusion
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let total: u64 = row.iter().sum();
            if total == 0 {
                0.0
            } else {
                row[i] as f64 / total as f64
            }
        })
        .collect();
    Ok(EvalResult {
        images,
        loss: loss_sum / images.max(1) as f64,
        accuracy: correct as f64 / images.max(1) as f64,
        per_class_accuracy,
        confusion,
        class_names,
        reference,
    })
}

/// The cosine similarity of two vectors, in f64 (1 for two zero vectors).
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum();
    if na == 0.0 && nb == 0.0 {
        1.0
    } else {
        dot / (na * nb).sqrt()
    }
}

/// Evaluates a checkpoint on a dataset's test split (`vit eval`): the architecture comes
/// from `arch` or the checkpoint, normalisation from the checkpoint's preprocessing
/// (else the dataset's statistics). Runs on `dev`. With `reference`, that checkpoint (its
/// own architecture) runs on the same images too ([`EvalResult::reference`]).
#[allow(clippy::too_many_arguments)]
pub fn eval_checkpoint(
    path: &Path,
    reference: Option<&Path>,
    arch: &weights::Arch,
    dataset: &str,
    data_dir: Option<&Path>,
    batch_size: usize,
    quiet: bool,
    dev: &Device,
) -> Result<EvalResult> {
    if batch_size == 0 {
        return Err(Error::Invalid("batch size must be at least 1".into()));
    }
    let (model, fitted) = load_model(path, arch, FitOptions::default(), dev)?;
    let reference = match reference {
        Some(p) => {
            let (r, rf) = load_model(
                p,
                &weights::Arch::FromCheckpoint,
                FitOptions::default(),
                dev,
            )?;
            if rf.config.num_classes() != fitted.config.num_classes()
                || rf.config.image_size() != fitted.config.image_size()
            {
                return Err(Error::Config(format!(
                    "the reference {} does not take the same images or give the same classes",
                    p.display()
                )));
            }
            Some(r)
        }
        None => None,
    };
    let (ck, cfg) = (fitted.checkpoint, fitted.config);
    let spec: data::DatasetSpec = dataset.parse()?;
    let opts = data::LoadOptions {
        quiet,
        image_size: Some((cfg.image_size()[0], cfg.image_size()[1])),
        channels: Some(cfg.in_channels()),
        ..Default::default()
    };
    let test = data::open(&spec, Split::Test, data_dir, &opts)?;
    if test.is_empty() {
        return Err(Error::Invalid(format!(
            "dataset {dataset} has no test images to evaluate on"
        )));
    }
    if test.num_classes() != cfg.num_classes() {
        return Err(Error::Config(format!(
            "dataset {dataset} has {} classes but the checkpoint's model has {}",
            test.num_classes(),
            cfg.num_classes()
        )));
    }
    let config = match &ck.preprocess {
        Some(p) => {
            let mut c = LoaderConfig::eval(batch_size, p.mean.clone(), p.std.clone());
            c.crop = PhotoCrop::Center(center_crop(p));
            c
        }
        None => {
            let (mean, std) = spec.normalization(cfg.in_channels());
            LoaderConfig::eval(batch_size, mean, std)
        }
    };
    config.augment.validate(cfg.in_channels())?;
    evaluate_against(model.as_ref(), reference.as_deref(), &test, config, dev)
}
