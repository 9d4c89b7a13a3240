//! Datasets for training and evaluation: loading (IDX, CIFAR binary, image folders),
//! locating and downloading files with checksums, validation splits, augmentation and
//! background batch loading.

pub mod cifar;
mod dataset;
pub mod download;
pub mod folder;
pub mod idx;
mod load;
mod spec;
#[cfg(test)]
mod testutil;

pub use dataset::{Dataset, ResizeFilter};
pub use download::{cache_root, download, verify_file, Checksum, CACHE_ENV};
pub use load::{cache_dir_for, load, LoadOptions, MIRROR_ENV, SYSTEM_FASHION_MNIST};
pub use spec::{DatasetSpec, RemoteFile, Split, KNOWN_DATASETS};
