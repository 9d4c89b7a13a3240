//! Batching for training and evaluation: [`DataLoader`] fixes the dataset and settings;
//! [`DataLoader::epoch`] yields one epoch's [`Batch`]es, prepared on one background
//! thread through a bounded channel, in a seeded order that can resume mid-epoch.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::augment::AugmentConfig;
use super::dataset::Dataset;
use super::rng::{keyed_rng, permutation, STREAM_SHUFFLE};
use crate::{Error, Result};

/// Batches prepared ahead of the consumer.
const PREFETCH: usize = 2;

/// One batch, ready to become a (B, C, H, W) tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Normalised pixels, B×C×H×W.
    pub images: Vec<f32>,
    /// Labels, B.
    pub labels: Vec<u32>,
    /// Dataset index of each image.
    pub indices: Vec<usize>,
    /// Position of this batch within its epoch.
    pub batch_index: usize,
    /// `[B, C, H, W]`.
    pub shape: [usize; 4],
}

impl Batch {
    /// Number of images in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch is empty (never produced by the loader).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// How to batch a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Images per batch (the last may be smaller unless `drop_last`).
    pub batch_size: usize,
    /// Visit images in a seeded random order that changes every epoch.
    pub shuffle: bool,
    /// Drop a final batch smaller than `batch_size`.
    pub drop_last: bool,
    /// Seed of the order and the augmentation.
    pub seed: u64,
    /// Augmentation and normalisation applied to each image.
    pub augment: AugmentConfig,
}

impl LoaderConfig {
    /// Training: shuffled, augmented with `augment`, last partial batch kept.
    pub fn train(batch_size: usize, seed: u64, augment: AugmentConfig) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: true,
            drop_last: false,
            seed,
            augment,
        }
    }

    /// Evaluation: dataset order, normalisation only, every image once.
    pub fn eval(batch_size: usize, mean: Vec<f32>, std: Vec<f32>) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: false,
            drop_last: false,
            seed: 0,
            augment: AugmentConfig::normalize_only(mean, std),
        }
    }
}

/// A dataset with batching settings; hands out one [`Batches`] iterator per epoch.
#[derive(Debug, Clone)]
pub struct DataLoader {
    dataset: Arc<Dataset>,
    config: LoaderConfig,
}

impl DataLoader {
    /// Checks the settings against the dataset.
    pub fn new(dataset: impl Into<Arc<Dataset>>, config: LoaderConfig) -> Result<Self> {
        let dataset = dataset.into();
        if config.batch_size == 0 {
            return Err(Error::Invalid("batch size must be positive".into()));
        }
        config.augment.validate(dataset.channels)?;
        dataset.validate()?;
        Ok(DataLoader { dataset, config })
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        let (n, b) = (self.dataset.len(), self.config.batch_size);
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The order in which epoch `epoch` visits dataset indices: a permutation keyed by
    /// (seed, epoch) when shuffling, else `0..len`.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let n = self.dataset.len();
        if self.config.shuffle {
            permutation(
                &mut keyed_rng(STREAM_SHUFFLE, self.config.seed, epoch, 0),
                n,
            )
        } else {
            (0..n).collect()
        }
    }

    /// All batches of epoch `epoch`.
    pub fn epoch(&self, epoch: u64) -> Result<Batches> {
        self.epoch_from(epoch, 0)
    }

    /// The batches of epoch `epoch` from batch `start` on: exactly what an uninterrupted
    /// run would produce after its first `start` batches. `start == num_batches()`
    /// gives an empty iterator; beyond that is an error.
    pub fn epoch_from(&self, epoch: u64, start: usize) -> Result<Batches> {
        let total = self.num_batches();
        if start > total {
            return Err(Error::Invalid(format!(
                "cannot start at batch {start}: an epoch has {total} batches"
            )));
        }
        let order = self.order(epoch);
        let dataset = Arc::clone(&self.dataset);
        let config = self.config.clone();
        let (tx, rx) = sync_channel(PREFETCH);
        let handle = std::thread::Builder::new()
            .name("vit-data".into())
            .spawn(move || {
                for b in start..total {
                    let batch = make_batch(&dataset, &config, &order, epoch, b);
                    if tx.send(batch).is_err() {
                        break; // consumer dropped
                    }
                }
            })
            .map_err(|e| Error::Invalid(format!("cannot start the data loader thread: {e}")))?;
        Ok(Batches {
            rx: Some(rx),
            handle: Some(handle),
            remaining: total - start,
        })
    }
}

fn make_batch(
    ds: &Dataset,
    config: &LoaderConfig,
    order: &[usize],
    epoch: u64,
    batch_index: usize,
) -> Batch {
    let b = config.batch_size;
    let end = ((batch_index + 1) * b).min(order.len());
    let indices = order[batch_index * b..end].to_vec();
    let per = ds.image_len();
    let mut images = vec![0.0f32; indices.len() * per];
    for (out, &i) in images.chunks_exact_mut(per).zip(&indices) {
        config.augment.apply(ds, i, config.seed, epoch, out);
    }
    let labels = indices.iter().map(|&i| ds.labels[i]).collect();
    Batch {
        images,
        labels,
        shape: [indices.len(), ds.channels, ds.height, ds.width],
        indices,
        batch_index,
    }
}

/// One epoch of batches, produced by a background thread. Dropping it early stops the
/// thread and waits for it.
#[derive(Debug)]
pub struct Batches {
    rx: Option<Receiver<Batch>>,
    handle: Option<JoinHandle<()>>,
    remaining: usize,
}

impl Batches {
    fn join_worker(&mut self) {
        if let Some(h) = self.handle.take() {
            if let Err(panic) = h.join() {
                if !std::thread::panicking() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }
}

impl Iterator for Batches {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let batch = self.rx.as_ref().and_then(|rx| rx.recv().ok());
        match batch {
            Some(b) => {
                self.remaining = self.remaining.saturating_sub(1);
                Some(b)
            }
            None => {
                // Finished, or the worker panicked: surface its panic rather than
                // silently ending the epoch early.
                self.rx = None;
                self.join_worker();
                self.remaining = 0;
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Batches {}

impl Drop for Batches {
    fn drop(&mut self) {
        // Closing the receiver makes the worker's next send fail, so it exits.
        self.rx = None;
        self.join_worker();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` RGB 2x2 images; image i has every pixel equal to i; label i % 4.
    fn numbered(n: usize) -> Dataset {
        Dataset::new(
            (0..n)
                .flat_map(|i| std::iter::repeat_n(i as u8, 12))
                .collect(),
            (0..n).map(|i| (i % 4) as u32).collect(),
            3,
            2,
            2,
            (0..4).map(|i| format!("c{i}")).collect(),
        )
        .unwrap()
    }

    fn identity() -> AugmentConfig {
        AugmentConfig::normalize_only(vec![0.0; 3], vec![1.0 / 255.0; 3])
    }

    fn train(batch: usize, seed: u64, drop_last: bool) -> DataLoader {
        let mut aug = identity();
        aug.pad = 1;
        aug.hflip = true;
        let mut cfg = LoaderConfig::train(batch, seed, aug);
        cfg.drop_last = drop_last;
        DataLoader::new(numbered(10), cfg).unwrap()
    }

    #[test]
    fn eval_is_sequential_and_unaugmented() {
        let loader = DataLoader::new(
            numbered(10),
            LoaderConfig::eval(4, vec![0.0; 3], vec![1.0 / 255.0; 3]),
        )
        .unwrap();
        assert_eq!(loader.num_batches(), 3);
        let batches: Vec<Batch> = loader.epoch(5).unwrap().collect();
        assert_eq!(batches.len(), 3);
        assert_eq!(batches[0].indices, vec![0, 1, 2, 3]);
        assert_eq!(batches[2].indices, vec![8, 9]);
        assert_eq!(batches[2].shape, [2, 3, 2, 2]);
        assert_eq!(batches[1].labels, vec![0, 1, 2, 3]);
        assert_eq!(batches[1].batch_index, 1);
        // Image 9 in batch 2, position 1: all twelve values are 9.
        assert!(batches[2].images[12..]
            .iter()
            .all(|v| (v - 9.0).abs() < 1e-4));
        assert_eq!(batches[2].images.len(), 2 * 12);
    }

    #[test]
    fn same_seed_same_batches_and_epochs_differ() {
        let a: Vec<Batch> = train(3, 7, false).epoch(2).unwrap().collect();
        let b: Vec<Batch> = train(3, 7, false).epoch(2).unwrap().collect();
        assert_eq!(a, b);
        assert_eq!(a.len(), 4);
        let mut seen: Vec<usize> = a.iter().flat_map(|b| b.indices.clone()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        let c: Vec<Batch> = train(3, 7, false).epoch(3).unwrap().collect();
        assert_ne!(
            a.iter().map(|b| &b.indices).collect::<Vec<_>>(),
            c.iter().map(|b| &b.indices).collect::<Vec<_>>()
        );
        let d: Vec<Batch> = train(3, 8, false).epoch(2).unwrap().collect();
        assert_ne!(a, d);
        // Labels follow indices.
        for batch in &a {
            for (l, i) in batch.labels.iter().zip(&batch.indices) {
                assert_eq!(*l as usize, i % 4);
            }
        }
    }

    #[test]
    fn starting_at_k_equals_skipping_k() {
        let loader = train(3, 11, false);
        let full: Vec<Batch> = loader.epoch(4).unwrap().collect();
        for k in 0..=full.len() {
            let resumed: Vec<Batch> = loader.epoch_from(4, k).unwrap().collect();
            assert_eq!(resumed, full[k..].to_vec(), "start at {k}");
        }
        assert!(loader.epoch_from(4, full.len() + 1).is_err());
    }

    #[test]
    fn augmentation_does_not_depend_on_batching() {
        // The same sample in the same epoch is augmented identically whatever the batch
        // size, because its randomness is keyed by (seed, epoch, index).
        let per_sample = |loader: &DataLoader| {
            let mut v: Vec<(usize, Vec<f32>)> = Vec::new();
            for b in loader.epoch(1).unwrap() {
                for (j, &i) in b.indices.iter().enumerate() {
                    v.push((i, b.images[j * 12..(j + 1) * 12].to_vec()));
                }
            }
            v.sort_by_key(|(i, _)| *i);
            v
        };
        assert_eq!(
            per_sample(&train(3, 5, false)),
            per_sample(&train(4, 5, false))
        );
    }

    #[test]
    fn drop_last_and_counts() {
        let loader = train(3, 1, true);
        assert_eq!(loader.num_batches(), 3);
        let batches: Vec<Batch> = loader.epoch(0).unwrap().collect();
        assert!(batches.iter().all(|b| b.len() == 3));
        let it = train(3, 1, false).epoch(0).unwrap();
        assert_eq!(it.len(), 4);
        let empty = DataLoader::new(
            Dataset::new(vec![], vec![], 3, 2, 2, vec!["a".into()]).unwrap(),
            LoaderConfig::eval(4, vec![0.0; 3], vec![1.0; 3]),
        )
        .unwrap();
        assert_eq!(empty.num_batches(), 0);
        assert_eq!(empty.epoch(0).unwrap().count(), 0);
    }

    #[test]
    fn dropping_early_stops_the_worker() {
        let ds =
            Dataset::new(vec![0; 1000 * 12], vec![0; 1000], 3, 2, 2, vec!["a".into()]).unwrap();
        let loader = DataLoader::new(ds, LoaderConfig::train(1, 0, identity())).unwrap();
        let mut it = loader.epoch(0).unwrap();
        assert_eq!(it.next().map(|b| b.batch_index), Some(0));
        assert_eq!(it.len(), 999);
        drop(it); // joins the thread; would hang if the worker kept blocking on send
    }

    #[test]
    fn invalid_settings_are_rejected() {
        let bad_batch = LoaderConfig::train(0, 0, identity());
        assert!(DataLoader::new(numbered(2), bad_batch).is_err());
        let gray_stats = LoaderConfig::eval(2, vec![0.5], vec![0.5]);
        let err = DataLoader::new(numbered(2), gray_stats).unwrap_err();
        assert!(err.to_string().contains("3-channel"), "{err}");
    }
}
