//! Evaluation: loss, accuracy, per-class accuracy and the confusion matrix of a model on a
//! dataset (no augmentation, plain cross-entropy).

use candle_core::{Device, Tensor, D};
use serde::Serialize;

use crate::data::{AugmentConfig, DataLoader, Dataset, LoaderConfig};
use crate::{ops, Result, VisionTransformer};

/// Results of [`evaluate`].
#[derive(Debug, Clone, Serialize)]
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

/// Evaluates `model` on every image of `data`, normalised as `augment` says (its random
/// parts are turned off).
pub fn evaluate(
    model: &VisionTransformer,
    data: &Dataset,
    batch_size: usize,
    augment: &AugmentConfig,
    dev: &Device,
) -> Result<EvalResult> {
    let k = data.num_classes();
    let loader = DataLoader::new(
        data.clone(),
        LoaderConfig::eval(batch_size, augment.mean.clone(), augment.std.clone()),
    )?;
    let mut confusion = vec![vec![0u64; k]; k];
    let mut loss_sum = 0.0;
    for batch in loader.epoch(0)? {
        let n = batch.labels.len();
        let x = Tensor::from_vec(batch.images, batch.shape.to_vec(), dev)?;
        let y = Tensor::from_vec(batch.labels.clone(), n, dev)?;
        let logits = super::forward_sharded(model, &x)?;
        loss_sum += ops::cross_entropy(&logits, &y, 0.0)?.to_scalar::<f32>()? as f64 * n as f64;
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for (t, p) in batch.labels.iter().zip(pred) {
            confusion[*t as usize][p as usize] += 1;
        }
    }
    let images = data.len();
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
        class_names: data.class_names.clone(),
    })
}
