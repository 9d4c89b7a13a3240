//! Carving a validation set out of a training set: a seeded, portable (ChaCha8) random
//! choice of images, so the same seed always holds out the same images.

use super::dataset::Dataset;
use super::rng::{keyed_rng, permutation, STREAM_FRACTION, STREAM_SPLIT};
use crate::{Error, Result};

/// How many training images to hold out for validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValSize {
    /// Exactly this many images.
    Count(usize),
    /// This fraction of the images (in [0, 1)), rounded to the nearest count.
    Fraction(f64),
    /// This fraction of the images, rounded to the nearest count, but at most this many.
    FractionUpTo(f64, usize),
}

impl ValSize {
    /// A training recipe's default: 10% of the images, at most 5,000 (so Fashion-MNIST's
    /// and CIFAR's 50,000-60,000 training images hold out exactly 5,000).
    pub const DEFAULT: ValSize = ValSize::FractionUpTo(0.1, 5000);

    /// The number of images this means for a dataset of `n` images.
    pub fn count(self, n: usize) -> Result<usize> {
        let k = match self {
            ValSize::Count(k) => k,
            ValSize::Fraction(f) => ValSize::FractionUpTo(f, usize::MAX).count(n)?,
            ValSize::FractionUpTo(f, cap) => {
                if !(0.0..1.0).contains(&f) {
                    return Err(Error::Invalid(format!(
                        "validation fraction must be in [0, 1), got {f}"
                    )));
                }
                ((f * n as f64).round() as usize).min(cap)
            }
        };
        if k > n || (k == n && n > 0) {
            return Err(Error::Invalid(format!(
                "cannot hold out {k} validation images from {n}: nothing would be left to train on"
            )));
        }
        Ok(k)
    }
}

/// Splits `dataset` into (train, validation). The validation images are a random choice
/// determined by `seed` alone; both parts keep the original relative order of images.
pub fn split_validation(dataset: &Dataset, size: ValSize, seed: u64) -> Result<(Dataset, Dataset)> {
    let (train_idx, val_idx) = split_indices(dataset.len(), size, seed)?;
    Ok((dataset.subset(&train_idx)?, dataset.subset(&val_idx)?))
}

/// The (train, validation) indices of [`split_validation`] for `n` images, each sorted.
pub fn split_indices(n: usize, size: ValSize, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    let k = size.count(n)?;
    let mut rng = keyed_rng(STREAM_SPLIT, seed, n as u64, 0);
    let order = permutation(&mut rng, n);
    let mut val_idx = order[..k].to_vec();
    let mut train_idx = order[k..].to_vec();
    val_idx.sort_unstable();
    train_idx.sort_unstable();
    Ok((train_idx, val_idx))
}

/// A seeded, class-balanced choice of `fraction` (in (0, 1]) of the images with `labels`:
/// from each class, round(fraction × its count) images (at least one), chosen by a
/// permutation keyed by `seed`, returned sorted. The same seed and labels always give the
/// same subset; a larger fraction is not a superset of a smaller one.
pub fn class_balanced_fraction(labels: &[u32], fraction: f64, seed: u64) -> Result<Vec<usize>> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(Error::Invalid(format!(
            "train fraction must be in (0, 1], got {fraction}"
        )));
    }
    let classes = labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    let mut chosen = Vec::new();
    for (c, members) in by_class.iter().enumerate() {
        if members.is_empty() {
            continue;
        }
        let k = ((fraction * members.len() as f64).round() as usize).clamp(1, members.len());
        let mut rng = keyed_rng(STREAM_FRACTION, seed, c as u64, members.len() as u64);
        let order = permutation(&mut rng, members.len());
        chosen.extend(order[..k].iter().map(|&j| members[j]));
    }
    chosen.sort_unstable();
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(n: usize) -> Dataset {
        // Image i is one pixel holding i; label i % 3.
        Dataset::new(
            (0..n).map(|i| i as u8).collect(),
            (0..n).map(|i| (i % 3) as u32).collect(),
            1,
            1,
            1,
            vec!["a".into(), "b".into(), "c".into()],
        )
        .unwrap()
    }

    #[test]
    fn split_is_a_deterministic_partition() {
        let ds = numbered(100);
        let (train, val) = split_validation(&ds, ValSize::Fraction(0.2), 42).unwrap();
        assert_eq!((train.len(), val.len()), (80, 20));
        let mut all: Vec<u8> = train.images.iter().chain(&val.images).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).map(|i| i as u8).collect::<Vec<_>>());
        // Labels travel with their images; order is preserved within each part.
        for part in [&train, &val] {
            for i in 0..part.len() {
                assert_eq!(part.labels[i], u32::from(part.images[i]) % 3);
            }
            assert!(part.images.windows(2).all(|w| w[0] < w[1]));
        }
        let (train2, val2) = split_validation(&ds, ValSize::Count(20), 42).unwrap();
        assert_eq!((train2, val2.clone()), (train, val.clone()));
        let (_, val3) = split_validation(&ds, ValSize::Count(20), 43).unwrap();
        assert_ne!(val3, val2);
        assert_eq!(val.class_names, ds.class_names);
    }

    #[test]
    fn sizes_are_checked() {
        let ds = numbered(10);
        assert_eq!(ValSize::Fraction(0.25).count(10).unwrap(), 3); // 2.5 rounds to 3
        assert!(split_validation(&ds, ValSize::Count(10), 0).is_err());
        assert!(split_validation(&ds, ValSize::Fraction(1.0), 0).is_err());
        assert!(split_validation(&ds, ValSize::Fraction(-0.1), 0).is_err());
        let (t, v) = split_validation(&ds, ValSize::Count(0), 0).unwrap();
        assert_eq!((t.len(), v.len()), (10, 0));
        // The recipes' default: 10%, at most 5,000; Fashion-MNIST's 60,000 give 5,000.
        assert_eq!(ValSize::DEFAULT.count(600).unwrap(), 60);
        assert_eq!(ValSize::DEFAULT.count(60_000).unwrap(), 5000);
        assert_eq!(ValSize::DEFAULT.count(4).unwrap(), 0);
        // Same count, same split: the default equals the old explicit 5,000.
        let big = Dataset::new(
            vec![0; 60_000],
            (0..60_000).map(|i| (i % 3) as u32).collect(),
            1,
            1,
            1,
            vec!["a".into(), "b".into(), "c".into()],
        )
        .unwrap();
        assert_eq!(
            split_validation(&big, ValSize::DEFAULT, 3).unwrap(),
            split_validation(&big, ValSize::Count(5000), 3).unwrap()
        );
    }

    #[test]
    fn a_fraction_keeps_every_class_in_proportion() {
        // 100 of class 0, 30 of class 1, 1 of class 2.
        let labels: Vec<u32> = (0..131)
            .map(|i| match i {
                0..100 => 0,
                100..130 => 1,
                _ => 2,
            })
            .collect();
        let pick = class_balanced_fraction(&labels, 0.1, 7).unwrap();
        let count = |c: u32| pick.iter().filter(|&&i| labels[i] == c).count();
        assert_eq!((count(0), count(1), count(2)), (10, 3, 1));
        assert!(pick.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(pick, class_balanced_fraction(&labels, 0.1, 7).unwrap());
        assert_ne!(pick, class_balanced_fraction(&labels, 0.1, 8).unwrap());
        assert_eq!(
            class_balanced_fraction(&labels, 1.0, 7).unwrap(),
            (0..131).collect::<Vec<_>>()
        );
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            let e = class_balanced_fraction(&labels, bad, 0).unwrap_err();
            assert!(e.to_string().contains("train fraction"), "{e}");
        }
    }
}
