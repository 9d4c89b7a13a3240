//! Which dataset to use: [`DatasetSpec`] parsed from a string (`fashion-mnist`, `mnist`,
//! `cifar10`, `cifar100`, `folder:PATH`), the [`Split`], and per-dataset facts: class
//! names, normalisation statistics, default augmentation and where to download from.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::{Error, Result};

/// The names accepted by [`DatasetSpec::from_str`], for messages.
pub const KNOWN_DATASETS: &str = "fashion-mnist, mnist, cifar10, cifar100, folder:PATH";

/// Which part of a dataset to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training set.
    Train,
    /// The held-out test set (for image folders: `val/`, else `test/`).
    Test,
}

impl Split {
    /// `"train"` or `"test"`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A dataset named on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DatasetSpec {
    /// Zalando's Fashion-MNIST: 28×28 grayscale, 10 clothing classes.
    FashionMnist,
    /// LeCun's MNIST handwritten digits: 28×28 grayscale, 10 classes.
    Mnist,
    /// CIFAR-10: 32×32 RGB, 10 classes.
    Cifar10,
    /// CIFAR-100 (fine labels): 32×32 RGB, 100 classes.
    Cifar100,
    /// An image folder `PATH/{train,val|test}/<class>/*.{png,jpg,jpeg}`.
    Folder(PathBuf),
}

const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// One file of a dataset as published upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteFile {
    /// File name, appended to the base URL.
    pub name: &'static str,
    /// Published MD5 of the file, lowercase hex.
    pub md5: &'static str,
}

const FASHION_BASE: &str = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/";
const MNIST_BASE: &str = "https://ossci-datasets.s3.amazonaws.com/mnist/";
const CIFAR_BASE: &str = "https://www.cs.toronto.edu/~kriz/";

impl DatasetSpec {
    /// The canonical short name (`folder` for image folders).
    pub fn name(&self) -> &'static str {
        match self {
            DatasetSpec::FashionMnist => "fashion-mnist",
            DatasetSpec::Mnist => "mnist",
            DatasetSpec::Cifar10 => "cifar10",
            DatasetSpec::Cifar100 => "cifar100",
            DatasetSpec::Folder(_) => "folder",
        }
    }

    /// Channels of the images as published (`None` for folders: known after loading).
    pub fn channels(&self) -> Option<usize> {
        match self {
            DatasetSpec::FashionMnist | DatasetSpec::Mnist => Some(1),
            DatasetSpec::Cifar10 | DatasetSpec::Cifar100 => Some(3),
            DatasetSpec::Folder(_) => None,
        }
    }

    /// Image (height, width) as published (`None` for folders).
    pub fn image_size(&self) -> Option<(usize, usize)> {
        match self {
            DatasetSpec::FashionMnist | DatasetSpec::Mnist => Some((28, 28)),
            DatasetSpec::Cifar10 | DatasetSpec::Cifar100 => Some((32, 32)),
            DatasetSpec::Folder(_) => None,
        }
    }

    /// Number of classes (`None` for folders).
    pub fn num_classes(&self) -> Option<usize> {
        match self {
            DatasetSpec::FashionMnist | DatasetSpec::Mnist | DatasetSpec::Cifar10 => Some(10),
            DatasetSpec::Cifar100 => Some(100),
            DatasetSpec::Folder(_) => None,
        }
    }

    /// Fixed class names, where the dataset has them. CIFAR-100 names come from the
    /// archive's `fine_label_names.txt` and folders' from directory names, so `None`.
    pub fn class_names(&self) -> Option<Vec<String>> {
        let list: Vec<String> = match self {
            DatasetSpec::FashionMnist => FASHION_CLASSES.iter().map(|s| s.to_string()).collect(),
            DatasetSpec::Mnist => (0..10).map(|d| d.to_string()).collect(),
            DatasetSpec::Cifar10 => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
            DatasetSpec::Cifar100 | DatasetSpec::Folder(_) => return None,
        };
        Some(list)
    }

    /// Whether random horizontal flips are a sensible default: off for digits (a
    /// mirrored 2 is not a 2), on for clothing, CIFAR and folders.
    pub fn default_hflip(&self) -> bool {
        !matches!(self, DatasetSpec::Mnist)
    }

    /// Per-channel (mean, std) of pixel values scaled to [0, 1], computed on the
    /// training set as published; 0.5/0.5 for folders.
    pub fn stats(&self) -> (Vec<f32>, Vec<f32>) {
        match self {
            DatasetSpec::FashionMnist => (vec![0.2860], vec![0.3530]),
            DatasetSpec::Mnist => (vec![0.1307], vec![0.3081]),
            DatasetSpec::Cifar10 => (vec![0.4914, 0.4822, 0.4465], vec![0.2470, 0.2435, 0.2616]),
            DatasetSpec::Cifar100 => (vec![0.5071, 0.4865, 0.4409], vec![0.2673, 0.2564, 0.2762]),
            DatasetSpec::Folder(_) => (vec![0.5; 3], vec![0.5; 3]),
        }
    }

    /// [`stats`](Self::stats) adapted to images with `channels` channels (after
    /// [`Dataset::with_channels`](super::Dataset::with_channels)): a single value is
    /// replicated; three are combined with luminance weights (an approximation for the
    /// std). Other counts repeat the first value.
    pub fn normalization(&self, channels: usize) -> (Vec<f32>, Vec<f32>) {
        let (mean, std) = self.stats();
        let adapt = |v: Vec<f32>| -> Vec<f32> {
            if v.len() == channels {
                v
            } else if v.len() == 3 && channels == 1 {
                vec![0.299 * v[0] + 0.587 * v[1] + 0.114 * v[2]]
            } else {
                vec![v[0]; channels]
            }
        };
        (adapt(mean), adapt(std))
    }

    /// Subfolder of the cache directory for this dataset (`None` for folders).
    pub fn cache_subdir(&self) -> Option<&'static str> {
        match self {
            DatasetSpec::Folder(_) => None,
            other => Some(other.name()),
        }
    }

    /// Official base URL the files are downloaded from (`None` for folders).
    pub fn default_base_url(&self) -> Option<&'static str> {
        match self {
            DatasetSpec::FashionMnist => Some(FASHION_BASE),
            DatasetSpec::Mnist => Some(MNIST_BASE),
            DatasetSpec::Cifar10 | DatasetSpec::Cifar100 => Some(CIFAR_BASE),
            DatasetSpec::Folder(_) => None,
        }
    }

    /// The upstream files needed for `split`, with their published MD5s.
    pub fn remote_files(&self, split: Split) -> Vec<RemoteFile> {
        let f = |name, md5| RemoteFile { name, md5 };
        match (self, split) {
            (DatasetSpec::FashionMnist, Split::Train) => vec![
                f(
                    "train-images-idx3-ubyte.gz",
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                ),
                f(
                    "train-labels-idx1-ubyte.gz",
                    "25c81989df183df01b3e8a0aad5dffbe",
                ),
            ],
            (DatasetSpec::FashionMnist, Split::Test) => vec![
                f(
                    "t10k-images-idx3-ubyte.gz",
                    "bef4ecab320f06d8554ea6380940ec79",
                ),
                f(
                    "t10k-labels-idx1-ubyte.gz",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                ),
            ],
            (DatasetSpec::Mnist, Split::Train) => vec![
                f(
                    "train-images-idx3-ubyte.gz",
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                ),
                f(
                    "train-labels-idx1-ubyte.gz",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                ),
            ],
            (DatasetSpec::Mnist, Split::Test) => vec![
                f(
                    "t10k-images-idx3-ubyte.gz",
                    "9fb629c4189551a2d022fa330f9573f3",
                ),
                f(
                    "t10k-labels-idx1-ubyte.gz",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                ),
            ],
            (DatasetSpec::Cifar10, _) => vec![f(
                "cifar-10-binary.tar.gz",
                "c32a1d4ab5d03f1284b67883e8d87530",
            )],
            (DatasetSpec::Cifar100, _) => vec![f(
                "cifar-100-binary.tar.gz",
                "03b5dce01913d631647c71ecec9e9cb8",
            )],
            (DatasetSpec::Folder(_), _) => vec![],
        }
    }
}

impl FromStr for DatasetSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("folder:") {
            if path.is_empty() {
                return Err(Error::Invalid(
                    "dataset 'folder:' needs a path, e.g. folder:/data/pets".into(),
                ));
            }
            return Ok(DatasetSpec::Folder(PathBuf::from(path)));
        }
        match s.to_ascii_lowercase().as_str() {
            "fashion-mnist" | "fashion_mnist" | "fashionmnist" => Ok(DatasetSpec::FashionMnist),
            "mnist" => Ok(DatasetSpec::Mnist),
            "cifar10" | "cifar-10" => Ok(DatasetSpec::Cifar10),
            "cifar100" | "cifar-100" => Ok(DatasetSpec::Cifar100),
            _ => Err(Error::Unknown {
                kind: "dataset",
                name: s.to_string(),
                hint: format!(" (known: {KNOWN_DATASETS})"),
            }),
        }
    }
}

impl fmt::Display for DatasetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatasetSpec::Folder(p) => write!(f, "folder:{}", p.display()),
            other => f.write_str(other.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_known_names_and_round_trip() {
        for (s, spec) in [
            ("fashion-mnist", DatasetSpec::FashionMnist),
            ("Fashion_MNIST", DatasetSpec::FashionMnist),
            ("mnist", DatasetSpec::Mnist),
            ("cifar10", DatasetSpec::Cifar10),
            ("CIFAR-100", DatasetSpec::Cifar100),
            (
                "folder:/data/pets",
                DatasetSpec::Folder("/data/pets".into()),
            ),
        ] {
            let parsed: DatasetSpec = s.parse().unwrap();
            assert_eq!(parsed, spec);
            let again: DatasetSpec = parsed.to_string().parse().unwrap();
            assert_eq!(again, spec);
        }
    }

    #[test]
    fn parse_unknown_lists_known() {
        let err = "imagenet".parse::<DatasetSpec>().unwrap_err();
        assert!(matches!(
            err,
            Error::Unknown {
                kind: "dataset",
                ..
            }
        ));
        let msg = err.to_string();
        assert_eq!(
            msg,
            "unknown dataset 'imagenet' (known: fashion-mnist, mnist, cifar10, cifar100, folder:PATH)"
        );
        assert!(matches!(
            "folder:".parse::<DatasetSpec>(),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn facts_per_dataset() {
        let f = DatasetSpec::FashionMnist;
        assert_eq!(f.class_names().unwrap()[0], "T-shirt/top");
        assert_eq!(f.class_names().unwrap()[9], "Ankle boot");
        assert_eq!(f.stats(), (vec![0.2860], vec![0.3530]));
        assert!(f.default_hflip());
        assert!(!DatasetSpec::Mnist.default_hflip());
        assert_eq!(DatasetSpec::Mnist.class_names().unwrap()[7], "7");
        assert_eq!(DatasetSpec::Cifar10.class_names().unwrap()[9], "truck");
        assert_eq!(DatasetSpec::Cifar100.class_names(), None);
        assert_eq!(DatasetSpec::Cifar100.num_classes(), Some(100));
        assert_eq!(DatasetSpec::Cifar10.stats().1, vec![0.2470, 0.2435, 0.2616]);
        assert_eq!(
            DatasetSpec::Cifar100.stats().0,
            vec![0.5071, 0.4865, 0.4409]
        );
        let folder = DatasetSpec::Folder("x".into());
        assert!(folder.default_hflip());
        assert_eq!(folder.normalization(1), (vec![0.5], vec![0.5]));
        assert_eq!(folder.normalization(3), (vec![0.5; 3], vec![0.5; 3]));
        assert_eq!(DatasetSpec::Mnist.normalization(3).0, vec![0.1307; 3]);
        let (m, _) = DatasetSpec::Cifar10.normalization(1);
        assert!((m[0] - (0.299 * 0.4914 + 0.587 * 0.4822 + 0.114 * 0.4465)).abs() < 1e-6);
    }

    #[test]
    fn remote_files_have_md5s() {
        for spec in [
            DatasetSpec::FashionMnist,
            DatasetSpec::Mnist,
            DatasetSpec::Cifar10,
            DatasetSpec::Cifar100,
        ] {
            for split in [Split::Train, Split::Test] {
                let files = spec.remote_files(split);
                assert!(!files.is_empty());
                for f in files {
                    assert_eq!(f.md5.len(), 32);
                    assert!(f.md5.bytes().all(|b| b.is_ascii_hexdigit()));
                }
            }
        }
        assert_eq!(
            DatasetSpec::Mnist.remote_files(Split::Test)[0].name,
            "t10k-images-idx3-ubyte.gz"
        );
    }
}
