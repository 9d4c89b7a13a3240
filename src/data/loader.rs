//! Batching for training and evaluation: [`DataLoader`] fixes the images and settings;
//! [`DataLoader::epoch`] yields one epoch's [`Batch`]es, prepared in the background
//! through a bounded channel, in a seeded order that can resume mid-epoch.
//!
//! Images in memory ([`Dataset`]) are augmented on one background thread. Image files
//! ([`ImageFiles`]) are decoded and cropped for each batch by a small pool of worker
//! threads of the lowest scheduling priority, so they use the cores only when the model's
//! threads leave them idle; at most [`PREFETCH`] finished batches wait in memory. Every
//! random choice is keyed by (seed, epoch, sample index), never by thread or timing.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rayon::prelude::*;

use super::augment::AugmentConfig;
use super::dataset::Dataset;
use super::folder::ImageFiles;
use super::photo::{PhotoCrop, Pixels};
use super::rng::{keyed_rng, permutation, STREAM_CROP, STREAM_SHUFFLE};
use crate::{Error, Result};

/// Batches prepared ahead of the consumer.
pub const PREFETCH: usize = 2;

/// The images a loader reads: decoded in memory, or files decoded batch by batch.
#[derive(Debug, Clone)]
pub enum Images {
    Memory(Arc<Dataset>),
    Files(Arc<ImageFiles>),
}

impl From<Dataset> for Images {
    fn from(d: Dataset) -> Self {
        Images::Memory(Arc::new(d))
    }
}

impl From<ImageFiles> for Images {
    fn from(f: ImageFiles) -> Self {
        Images::Files(Arc::new(f))
    }
}

impl Images {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels().len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One label per image.
    pub fn labels(&self) -> &[u32] {
        match self {
            Images::Memory(d) => &d.labels,
            Images::Files(f) => &f.labels,
        }
    }

    /// The class names; their count is the number of classes.
    pub fn class_names(&self) -> &[String] {
        match self {
            Images::Memory(d) => &d.class_names,
            Images::Files(f) => &f.class_names,
        }
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.class_names().len()
    }

    /// (C, H, W) of each image as the loader hands it out.
    pub fn image_shape(&self) -> (usize, usize, usize) {
        match self {
            Images::Memory(d) => d.image_shape(),
            Images::Files(f) => (f.channels, f.height, f.width),
        }
    }

    /// The images at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Result<Images> {
        Ok(match self {
            Images::Memory(d) => d.subset(indices)?.into(),
            Images::Files(f) => f.subset(indices)?.into(),
        })
    }

    /// No images, with the same classes and shape.
    pub fn empty(&self) -> Result<Images> {
        self.subset(&[])
    }
}

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
    /// How an image file is brought to the output size (files only; `augment.pad` must
    /// then be 0).
    pub crop: PhotoCrop,
    /// Threads decoding image files (files only; at least 1).
    pub workers: usize,
}

/// Decoding threads by default: one per core (they run at the lowest priority).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl LoaderConfig {
    /// Training: shuffled, augmented with `augment`, last partial batch kept; files get
    /// timm's default random resized crop.
    pub fn train(batch_size: usize, seed: u64, augment: AugmentConfig) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: true,
            drop_last: false,
            seed,
            augment,
            crop: PhotoCrop::Random(Default::default()),
            workers: default_workers(),
        }
    }

    /// Evaluation: dataset order, normalisation only, every image once; files are resized
    /// and center-cropped ([`PhotoCrop::FULL`] unless changed).
    pub fn eval(batch_size: usize, mean: Vec<f32>, std: Vec<f32>) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: false,
            drop_last: false,
            seed: 0,
            augment: AugmentConfig::normalize_only(mean, std),
            crop: PhotoCrop::FULL,
            workers: default_workers(),
        }
    }
}

/// Images with batching settings; hands out one [`Batches`] iterator per epoch.
#[derive(Debug, Clone)]
pub struct DataLoader {
    images: Images,
    config: LoaderConfig,
    /// The file decoders (files only).
    pool: Option<Arc<rayon::ThreadPool>>,
    /// Only these samples of every batch ([`DataLoader::part`]).
    part: Option<std::ops::Range<usize>>,
}

impl DataLoader {
    /// Checks the settings against the images.
    pub fn new(images: impl Into<Images>, config: LoaderConfig) -> Result<Self> {
        let images = images.into();
        if config.batch_size == 0 {
            return Err(Error::Invalid("batch size must be positive".into()));
        }
        let (channels, _, _) = images.image_shape();
        config.augment.validate(channels)?;
        let pool = match &images {
            Images::Memory(d) => {
                d.validate()?;
                None
            }
            Images::Files(f) => {
                config.crop.validate()?;
                if config.augment.pad != 0 {
                    return Err(Error::Invalid(
                        "padded random crops apply to images in memory; image files use \
                         random resized crops"
                            .into(),
                    ));
                }
                if config.workers == 0 {
                    return Err(Error::Invalid("workers must be at least 1".into()));
                }
                if f.labels.len() != f.paths.len()
                    || f.labels.iter().any(|&l| l as usize >= f.class_names.len())
                {
                    return Err(Error::Invalid(
                        "image files and their labels do not match".into(),
                    ));
                }
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(config.workers)
                    .thread_name(|i| format!("vit-decode-{i}"))
                    .start_handler(|_| crate::runtime::lowest_thread_priority())
                    .build()
                    .map_err(|e| {
                        Error::Invalid(format!("cannot start the image decoding threads: {e}"))
                    })?;
                Some(Arc::new(pool))
            }
        };
        Ok(DataLoader {
            images,
            config,
            pool,
            part: None,
        })
    }

    /// The loader that makes only samples `part` of every batch (a data-parallel process's
    /// share), each exactly as in the whole batch: the order, batch count and each image's
    /// augmentation depend on the whole batch size, never on the part.
    pub fn part(mut self, part: std::ops::Range<usize>) -> Result<Self> {
        if part.is_empty() || part.end > self.config.batch_size {
            return Err(Error::Invalid(format!(
                "samples {part:?} are not a part of a batch of {}",
                self.config.batch_size
            )));
        }
        self.part = Some(part);
        Ok(self)
    }

    /// The images.
    pub fn images(&self) -> &Images {
        &self.images
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        let (n, b) = (self.images.len(), self.config.batch_size);
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The order in which epoch `epoch` visits dataset indices: a permutation keyed by
    /// (seed, epoch) when shuffling, else `0..len`.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let n = self.images.len();
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
        self.batches(epoch, (start..total).collect())
    }

    /// Every `step`-th batch of epoch `epoch` from batch `first` on (a data-parallel
    /// process's share of an evaluation).
    pub fn epoch_strided(&self, epoch: u64, first: usize, step: usize) -> Result<Batches> {
        let total = self.num_batches();
        self.batches(epoch, (first..total).step_by(step.max(1)).collect())
    }

    /// Batches `which` of epoch `epoch`, made in that order by a background thread.
    fn batches(&self, epoch: u64, which: Vec<usize>) -> Result<Batches> {
        let remaining = which.len();
        let order = self.order(epoch);
        let loader = self.clone();
        let (tx, rx) = sync_channel(PREFETCH);
        let handle = std::thread::Builder::new()
            .name("vit-data".into())
            .spawn(move || {
                for b in which {
                    let batch = loader.make_batch(&order, epoch, b);
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        break; // consumer dropped, or the epoch cannot go on
                    }
                }
            })
            .map_err(|e| Error::Invalid(format!("cannot start the data loader thread: {e}")))?;
        Ok(Batches {
            rx: Some(rx),
            handle: Some(handle),
            remaining,
        })
    }

    fn make_batch(&self, order: &[usize], epoch: u64, batch_index: usize) -> Result<Batch> {
        let b = self.config.batch_size;
        let end = ((batch_index + 1) * b).min(order.len());
        let mut indices = &order[batch_index * b..end];
        if let Some(part) = &self.part {
            indices = &indices[part.start.min(indices.len())..part.end.min(indices.len())];
        }
        let indices = indices.to_vec();
        let (c, h, w) = self.images.image_shape();
        let per = c * h * w;
        let mut images = vec![0.0f32; indices.len() * per];
        let cfg = &self.config;
        match (&self.images, &self.pool) {
            (Images::Files(files), Some(pool)) => pool.install(|| {
                images
                    .par_chunks_exact_mut(per)
                    .zip(indices.par_iter())
                    .try_for_each(|(out, &i)| self.load_file(files, i, epoch, out))
            })?,
            (Images::Memory(ds), _) => {
                for (out, &i) in images.chunks_exact_mut(per).zip(&indices) {
                    cfg.augment.apply(ds, i, cfg.seed, epoch, out);
                }
            }
            (Images::Files(_), None) => unreachable!("DataLoader::new starts the pool"),
        }
        let labels = indices.iter().map(|&i| self.images.labels()[i]).collect();
        Ok(Batch {
            images,
            labels,
            shape: [indices.len(), c, h, w],
            indices,
            batch_index,
        })
    }

    /// File `i` decoded, cropped to the output size ([`LoaderConfig::crop`], its random
    /// box keyed by (seed, epoch, i)), then flipped, normalised and erased as `augment`
    /// says, into `out` (C×H×W).
    fn load_file(&self, files: &ImageFiles, i: usize, epoch: u64, out: &mut [f32]) -> Result<()> {
        let cfg = &self.config;
        let path = &files.paths[i];
        let size = (files.height, files.width);
        let px = Pixels::read(path, files.channels)?;
        let px = match &cfg.crop {
            PhotoCrop::Random(rrc) => {
                let mut rng = keyed_rng(STREAM_CROP, cfg.seed, epoch, i as u64);
                let b = rrc.draw(&mut rng, px.height, px.width);
                rrc.apply(&px, b, size)
            }
            PhotoCrop::Center(c) => c.apply(px, size),
        }
        .map_err(|e| Error::format(path, e.to_string()))?;
        let shape = (files.channels, files.height, files.width);
        let params = cfg.augment.draw(cfg.seed, epoch, i, size);
        cfg.augment.apply_params(&px.planar(), shape, params, out);
        Ok(())
    }
}

/// One epoch of batches, produced by a background thread. A batch that cannot be made (an
/// image file that does not decode) ends the epoch with its error. Dropping it early stops
/// the thread and waits for it.
#[derive(Debug)]
pub struct Batches {
    rx: Option<Receiver<Result<Batch>>>,
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
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        let batch = self.rx.as_ref().and_then(|rx| rx.recv().ok());
        match batch {
            Some(Ok(b)) => {
                self.remaining = self.remaining.saturating_sub(1);
                Some(Ok(b))
            }
            Some(Err(e)) => {
                self.rx = None;
                self.join_worker();
                self.remaining = 0;
                Some(Err(e))
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

    fn all(batches: Result<Batches>) -> Vec<Batch> {
        batches.unwrap().collect::<Result<_>>().unwrap()
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
        let batches: Vec<Batch> = all(loader.epoch(5));
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
    fn a_part_of_every_batch_is_that_part_of_the_whole_batch() {
        let whole: Vec<Batch> = all(train(4, 7, true).epoch(1));
        let part: Vec<Batch> = all(train(4, 7, true).part(1..3).unwrap().epoch(1));
        assert_eq!(part.len(), whole.len());
        for (p, w) in part.iter().zip(&whole) {
            assert_eq!(p.indices, w.indices[1..3]);
            assert_eq!(p.labels, w.labels[1..3]);
            assert_eq!(p.images, w.images[12..36]); // the same augmentation
            assert_eq!(p.shape, [2, 3, 2, 2]);
        }
        assert!(train(4, 7, true).part(2..5).is_err());
        assert!(train(4, 7, true).part(2..2).is_err());
    }

    #[test]
    fn strided_epochs_share_the_batches_out() {
        let loader = train(3, 7, false);
        let whole: Vec<Batch> = all(loader.epoch(2));
        let (a, b) = (
            all(loader.epoch_strided(2, 0, 2)),
            all(loader.epoch_strided(2, 1, 2)),
        );
        assert_eq!(a, [whole[0].clone(), whole[2].clone()]);
        assert_eq!(b, [whole[1].clone(), whole[3].clone()]);
    }

    #[test]
    fn same_seed_same_batches_and_epochs_differ() {
        let a: Vec<Batch> = all(train(3, 7, false).epoch(2));
        let b: Vec<Batch> = all(train(3, 7, false).epoch(2));
        assert_eq!(a, b);
        assert_eq!(a.len(), 4);
        let mut seen: Vec<usize> = a.iter().flat_map(|b| b.indices.clone()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        let c: Vec<Batch> = all(train(3, 7, false).epoch(3));
        assert_ne!(
            a.iter().map(|b| &b.indices).collect::<Vec<_>>(),
            c.iter().map(|b| &b.indices).collect::<Vec<_>>()
        );
        let d: Vec<Batch> = all(train(3, 8, false).epoch(2));
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
        let full: Vec<Batch> = all(loader.epoch(4));
        for k in 0..=full.len() {
            let resumed: Vec<Batch> = all(loader.epoch_from(4, k));
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
            for b in all(loader.epoch(1)) {
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
        let batches: Vec<Batch> = all(loader.epoch(0));
        assert!(batches.iter().all(|b| b.len() == 3));
        let it = train(3, 1, false).epoch(0).unwrap();
        assert_eq!(it.size_hint(), (4, Some(4)));
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
        assert_eq!(it.next().map(|b| b.unwrap().batch_index), Some(0));
        assert_eq!(it.size_hint().0, 999);
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

    /// `n` RGB PNGs of different sizes in two classes under `dir/train`, listed for
    /// 8x8 output.
    fn photos(dir: &std::path::Path, n: usize) -> ImageFiles {
        for i in 0..n {
            let (w, h) = (20 + 3 * i as u32, 16 + 2 * (i as u32 % 4));
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([(x * 7 + i as u32) as u8, (y * 5) as u8, 10 * i as u8])
            });
            let path = dir.join(format!("train/c{}/{i:03}.png", i % 2));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            img.save(path).unwrap();
        }
        ImageFiles::scan(dir, super::super::Split::Train, Some((8, 8)), Some(3)).unwrap()
    }

    fn file_train(files: &ImageFiles, workers: usize) -> DataLoader {
        let mut aug = identity();
        aug.hflip = true;
        aug.erase_prob = 0.5;
        let mut cfg = LoaderConfig::train(3, 5, aug);
        cfg.workers = workers;
        DataLoader::new(files.clone(), cfg).unwrap()
    }

    #[test]
    fn files_stream_deterministically_and_resume_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let files = photos(dir.path(), 7);
        let loader = file_train(&files, 2);
        let full = all(loader.epoch(1));
        assert_eq!(full.len(), 3);
        assert_eq!(full[0].shape, [3, 3, 8, 8]);
        assert_eq!(full[2].shape, [1, 3, 8, 8]);
        // Same seed and epoch: the same batches, whatever the number of workers.
        assert_eq!(all(file_train(&files, 1).epoch(1)), full);
        for k in 0..=full.len() {
            assert_eq!(
                all(loader.epoch_from(1, k)),
                full[k..].to_vec(),
                "start at {k}"
            );
        }
        // Another epoch: other crops of the same images.
        let other = all(loader.epoch(2));
        let first_of = |bs: &[Batch], i: usize| {
            bs.iter()
                .flat_map(|b| b.indices.iter().zip(b.images.chunks(192)))
                .find(|(j, _)| **j == i)
                .map(|(_, px)| px.to_vec())
                .unwrap()
        };
        assert_ne!(first_of(&full, 0), first_of(&other, 0));
        for b in &full {
            for (l, i) in b.labels.iter().zip(&b.indices) {
                assert_eq!(*l, files.labels[*i]);
            }
        }
        assert_eq!(files.labels, vec![0, 0, 0, 0, 1, 1, 1]);
    }

    #[test]
    fn file_evaluation_is_the_center_crop_of_each_image() {
        let dir = tempfile::tempdir().unwrap();
        let files = photos(dir.path(), 4);
        let cfg = LoaderConfig::eval(3, vec![0.0; 3], vec![1.0 / 255.0; 3]);
        let PhotoCrop::Center(crop) = cfg.crop else {
            unreachable!()
        };
        let batches = all(DataLoader::new(files.clone(), cfg).unwrap().epoch(0));
        let got: Vec<f32> = batches.iter().flat_map(|b| b.images.clone()).collect();
        let want: Vec<f32> = files
            .paths
            .iter()
            .flat_map(|p| {
                let px = crop.apply(Pixels::read(p, 3).unwrap(), (8, 8)).unwrap();
                px.planar().into_iter().map(f32::from)
            })
            .collect();
        assert_eq!(got.len(), want.len());
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-3));
    }

    #[test]
    fn a_file_that_does_not_decode_ends_the_epoch_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let files = photos(dir.path(), 6);
        std::fs::write(&files.paths[4], b"\x89PNG\r\n\x1a\nbroken").unwrap();
        let cfg = LoaderConfig::eval(2, vec![0.0; 3], vec![1.0; 3]);
        let mut it = DataLoader::new(files, cfg).unwrap().epoch(0).unwrap();
        assert!(it.next().unwrap().is_ok());
        assert!(it.next().unwrap().is_ok());
        let e = it.next().unwrap().unwrap_err().to_string();
        assert!(
            e.contains("c1/003.png") && e.contains("cannot decode"),
            "{e}"
        );
        assert!(it.next().is_none());
    }

    #[test]
    fn file_settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let files = photos(dir.path(), 2);
        let mut cfg = LoaderConfig::train(1, 0, identity());
        cfg.augment.pad = 2;
        let e = DataLoader::new(files.clone(), cfg.clone()).unwrap_err();
        assert!(e.to_string().contains("random resized crops"), "{e}");
        cfg.augment.pad = 0;
        cfg.workers = 0;
        assert!(DataLoader::new(files.clone(), cfg.clone()).is_err());
        cfg.workers = 1;
        cfg.crop = PhotoCrop::Random(crate::data::RandomResizedCrop {
            scale: [0.0, 1.0],
            ratio: [0.75, 1.25],
        });
        assert!(DataLoader::new(files, cfg).is_err());
    }
}
