//! Datasets for training and evaluation: loading (IDX, CIFAR binary) into memory, image
//! folders streamed from disk,
//! locating and downloading files with checksums, validation splits, augmentation and
//! background batch loading.
//!
//! Typical use:
//! ```no_run
//! use vit::data::{load, split_validation, AugmentConfig, DataLoader, DatasetSpec,
//!                 LoadOptions, LoaderConfig, Split, ValSize};
//! # fn main() -> vit::Result<()> {
//! let spec: DatasetSpec = "fashion-mnist".parse()?;
//! let full = load(&spec, Split::Train, None, &LoadOptions::default())?;
//! let (train, val) = split_validation(&full, ValSize::Count(5000), 0)?;
//! let augment = AugmentConfig::for_spec(&spec, train.channels, 2);
//! let loader = DataLoader::new(train, LoaderConfig::train(128, 0, augment))?;
//! for batch in loader.epoch(0)? {
//!     let batch = batch?;
//!     // batch.images is B×C×H×W f32, batch.labels is B u32
//! #   let _ = batch;
//! }
//! # let _ = val;
//! # Ok(()) }
//! ```

mod augment;
pub mod cifar;
mod dataset;
pub mod download;
pub mod folder;
pub mod idx;
mod load;
mod loader;
pub mod photo;
mod rng;
mod spec;
mod split;
#[cfg(test)]
mod testutil;

pub use augment::{AugmentConfig, AugmentParams};
pub use dataset::{Dataset, ResizeFilter};
pub use download::{cache_root, download, verify_file, Checksum, CACHE_ENV};
pub use folder::ImageFiles;
pub use load::{cache_dir_for, load, open, LoadOptions, MIRROR_ENV, SYSTEM_FASHION_MNIST};
pub use loader::{default_workers, Batch, Batches, DataLoader, Images, LoaderConfig, PREFETCH};
pub use photo::{CenterCrop, PhotoCrop, RandomResizedCrop};
pub use spec::{DatasetSpec, RemoteFile, Split, KNOWN_DATASETS};
pub use split::{class_balanced_fraction, split_indices, split_validation, ValSize};
