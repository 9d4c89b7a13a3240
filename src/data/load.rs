//! Finding a dataset's files and loading a split: an explicit `--data-dir`, else the
//! cache, else the system copy (Debian's Fashion-MNIST), else a verified download into
//! the cache. Errors say where files were looked for and how to provide them.

use std::path::{Path, PathBuf};

use super::cifar::{find_cifar, load_cifar, CifarKind, CifarSource};
use super::dataset::Dataset;
use super::download::{cache_root, download, Checksum};
use super::folder::{load_folder, ImageFiles};
use super::idx::{find_idx_file, idx_file_names, load_idx_pair};
use super::loader::Images;
use super::spec::{DatasetSpec, Split};
use crate::{Error, Result};

/// Environment variable replacing the official base URL of downloads (e.g. a mirror
/// or a local test server); file names are appended to it.
pub const MIRROR_ENV: &str = "VIT_DATA_MIRROR";

/// Where Debian's `dataset-fashion-mnist` package installs the files.
pub const SYSTEM_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// How [`load`] finds and post-processes data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Hide download progress bars.
    pub quiet: bool,
    /// Allow downloading missing files into the cache.
    pub download: bool,
    /// Cache root to use instead of `$VIT_CACHE` / `$XDG_CACHE_HOME/vit` / `~/.cache/vit`.
    pub cache_dir: Option<PathBuf>,
    /// Base URL to download from instead of the official one (else `$VIT_DATA_MIRROR`).
    pub mirror: Option<String>,
    /// Resize every image to (height, width).
    pub image_size: Option<(usize, usize)>,
    /// Convert every image to this many channels (1 or 3).
    pub channels: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            quiet: false,
            download: true,
            cache_dir: None,
            mirror: None,
            image_size: None,
            channels: None,
        }
    }
}

/// Loads `split` of `spec`.
///
/// With `data_dir`, files are read only from there (or its `<dataset>/` subfolder):
/// IDX files `train-images-idx3-ubyte[.gz]` etc., CIFAR `.tar.gz` archives or their
/// extracted folders. Without it, the cache folder `<cache>/<dataset>/` is tried, then
/// [`SYSTEM_FASHION_MNIST`] for Fashion-MNIST, then the files are downloaded into the
/// cache and verified against their published MD5s. `folder:PATH` datasets ignore
/// `data_dir`. `opts.channels` and `opts.image_size` are applied last.
pub fn load(
    spec: &DatasetSpec,
    split: Split,
    data_dir: Option<&Path>,
    opts: &LoadOptions,
) -> Result<Dataset> {
    let remote: Vec<(String, Checksum)> = spec
        .remote_files(split)
        .into_iter()
        .map(|f| (f.name.to_string(), Checksum::Md5(f.md5.to_string())))
        .collect();
    load_with_remote(spec, split, data_dir, opts, &remote)
}

/// Opens `split` of `spec` for a loader: image folders are listed to be streamed from disk
/// ([`ImageFiles`], at `opts.image_size` with `opts.channels`, 3 by default), every other
/// dataset is loaded into memory by [`load`].
pub fn open(
    spec: &DatasetSpec,
    split: Split,
    data_dir: Option<&Path>,
    opts: &LoadOptions,
) -> Result<Images> {
    match spec {
        DatasetSpec::Folder(root) => {
            Ok(ImageFiles::scan(root, split, opts.image_size, opts.channels)?.into())
        }
        _ => Ok(load(spec, split, data_dir, opts)?.into()),
    }
}

/// Candidate folders, and the cache folder downloads go to (if any).
struct Places {
    dirs: Vec<PathBuf>,
    cache: Option<PathBuf>,
    /// Why there is no cache folder, for messages.
    cache_problem: Option<String>,
}

fn places(spec: &DatasetSpec, data_dir: Option<&Path>, opts: &LoadOptions) -> Places {
    let sub = spec.cache_subdir().unwrap_or("data");
    if let Some(d) = data_dir {
        return Places {
            dirs: vec![d.to_path_buf(), d.join(sub)],
            cache: None,
            cache_problem: None,
        };
    }
    let (cache, cache_problem) = match opts.cache_dir.clone().map(Ok).unwrap_or_else(cache_root) {
        Ok(root) => (Some(root.join(sub)), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let mut dirs: Vec<PathBuf> = cache.iter().cloned().collect();
    if *spec == DatasetSpec::FashionMnist {
        dirs.push(PathBuf::from(SYSTEM_FASHION_MNIST));
    }
    Places {
        dirs,
        cache,
        cache_problem,
    }
}

fn list(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The advice appended to "not found" and "download failed" errors.
fn advice(places: &Places, expected: &str) -> String {
    let mut s = format!(
        "looked in {}; to use local files pass --data-dir DIR with {expected}",
        if places.dirs.is_empty() {
            "no folder".to_string()
        } else {
            list(&places.dirs)
        }
    );
    match (&places.cache, &places.cache_problem) {
        (Some(c), _) => s.push_str(&format!(", or put them in {}", c.display())),
        (None, Some(p)) => s.push_str(&format!(" ({p})")),
        (None, None) => {}
    }
    s
}

fn not_found(places: &Places, what: String, expected: &str) -> Error {
    let path = places.dirs.first().cloned().unwrap_or_default();
    Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{what} not found; {}", advice(places, expected)),
        ),
    )
}

/// Downloads every `remote` file missing from `target`.
fn fetch(
    spec: &DatasetSpec,
    target: &Path,
    remote: &[(String, Checksum)],
    opts: &LoadOptions,
    places: &Places,
    expected: &str,
) -> Result<()> {
    let base = opts
        .mirror
        .clone()
        .or_else(|| std::env::var(MIRROR_ENV).ok().filter(|m| !m.is_empty()))
        .or_else(|| spec.default_base_url().map(String::from))
        .unwrap_or_default();
    let base = if base.ends_with('/') {
        base
    } else {
        format!("{base}/")
    };
    for (name, checksum) in remote {
        let dest = target.join(name);
        if dest.is_file() {
            continue;
        }
        let url = format!("{base}{name}");
        if !opts.quiet {
            tracing::info!("downloading {url} to {}", dest.display());
        }
        download(&url, &dest, checksum, opts.quiet).map_err(|e| match e {
            Error::Download { url, msg } => Error::Download {
                url,
                msg: format!("{msg}; {}", advice(places, expected)),
            },
            other => other,
        })?;
    }
    Ok(())
}

/// [`load`] with explicit remote files and checksums (tests use their own).
pub(crate) fn load_with_remote(
    spec: &DatasetSpec,
    split: Split,
    data_dir: Option<&Path>,
    opts: &LoadOptions,
    remote: &[(String, Checksum)],
) -> Result<Dataset> {
    let ds = match spec {
        DatasetSpec::Folder(root) => {
            return load_folder(root, split, opts.image_size, opts.channels);
        }
        DatasetSpec::FashionMnist | DatasetSpec::Mnist => {
            load_idx_spec(spec, split, data_dir, opts, remote)?
        }
        DatasetSpec::Cifar10 => {
            load_cifar_spec(spec, CifarKind::Cifar10, split, data_dir, opts, remote)?
        }
        DatasetSpec::Cifar100 => {
            load_cifar_spec(spec, CifarKind::Cifar100, split, data_dir, opts, remote)?
        }
    };
    let ds = match opts.channels {
        Some(c) => ds.with_channels(c)?,
        None => ds,
    };
    match opts.image_size {
        Some((h, w)) => ds.resized(h, w),
        None => Ok(ds),
    }
}

fn load_idx_spec(
    spec: &DatasetSpec,
    split: Split,
    data_dir: Option<&Path>,
    opts: &LoadOptions,
    remote: &[(String, Checksum)],
) -> Result<Dataset> {
    let (images, labels) = idx_file_names(split);
    let names = spec.class_names().unwrap_or_default();
    let places = places(spec, data_dir, opts);
    for dir in &places.dirs {
        if let (Some(i), Some(l)) = (find_idx_file(dir, images), find_idx_file(dir, labels)) {
            return load_idx_pair(&i, &l, names);
        }
    }
    let expected = format!("{images}.gz and {labels}.gz (or uncompressed)");
    let what = format!("{spec} {split} files");
    match (&places.cache, opts.download) {
        (Some(cache), true) => {
            fetch(spec, cache, remote, opts, &places, &expected)?;
            match (find_idx_file(cache, images), find_idx_file(cache, labels)) {
                (Some(i), Some(l)) => load_idx_pair(&i, &l, names),
                _ => Err(not_found(&places, what, &expected)),
            }
        }
        _ => Err(not_found(&places, what, &expected)),
    }
}

fn load_cifar_spec(
    spec: &DatasetSpec,
    kind: CifarKind,
    split: Split,
    data_dir: Option<&Path>,
    opts: &LoadOptions,
    remote: &[(String, Checksum)],
) -> Result<Dataset> {
    let places = places(spec, data_dir, opts);
    for dir in &places.dirs {
        if let Some(source) = find_cifar(dir, kind, split) {
            return load_cifar(&source, kind, split);
        }
    }
    let expected = format!(
        "{} or its extracted {}/ folder",
        kind.archive_name(),
        kind.dir_name()
    );
    let what = format!("{spec} {split} files");
    match (&places.cache, opts.download) {
        (Some(cache), true) => {
            fetch(spec, cache, remote, opts, &places, &expected)?;
            let archive = CifarSource::Archive(cache.join(kind.archive_name()));
            load_cifar(&archive, kind, split)
        }
        _ => Err(not_found(&places, what, &expected)),
    }
}

/// Where [`load`] would put downloads of `spec` (`None` for folders or without a cache).
pub fn cache_dir_for(spec: &DatasetSpec, opts: &LoadOptions) -> Option<PathBuf> {
    let sub = spec.cache_subdir()?;
    let root = opts
        .cache_dir
        .clone()
        .map(Ok)
        .unwrap_or_else(cache_root)
        .ok()?;
    Some(root.join(sub))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::{gzip, idx_bytes, tar_gz, Reply, Server};
    use md5::{Digest, Md5};
    use std::collections::HashMap;

    fn offline(cache: &Path) -> LoadOptions {
        LoadOptions {
            quiet: true,
            download: false,
            cache_dir: Some(cache.to_path_buf()),
            ..LoadOptions::default()
        }
    }

    /// Tiny IDX pair: `n` 28x28 images with value i, labels i % 10.
    fn idx_pair(n: usize) -> (Vec<u8>, Vec<u8>) {
        let pixels: Vec<u8> = (0..n).flat_map(|i| vec![i as u8; 28 * 28]).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        (idx_bytes(&[n, 28, 28], &pixels), idx_bytes(&[n], &labels))
    }

    fn md5_hex(b: &[u8]) -> String {
        Md5::digest(b).iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn cache_is_used_before_system_and_download() {
        let cache = tempfile::tempdir().unwrap();
        let dir = cache.path().join("fashion-mnist");
        std::fs::create_dir_all(&dir).unwrap();
        let (img, lab) = idx_pair(3);
        std::fs::write(dir.join("t10k-images-idx3-ubyte.gz"), gzip(&img)).unwrap();
        std::fs::write(dir.join("t10k-labels-idx1-ubyte"), &lab).unwrap();
        let ds = load(
            &DatasetSpec::FashionMnist,
            Split::Test,
            None,
            &offline(cache.path()),
        )
        .unwrap();
        assert_eq!(ds.len(), 3);
        assert_eq!(ds.labels, vec![0, 1, 2]);
        assert_eq!(ds.class_names[9], "Ankle boot");
        assert_eq!(
            cache_dir_for(&DatasetSpec::FashionMnist, &offline(cache.path())),
            Some(dir)
        );
    }

    #[test]
    fn data_dir_and_post_processing() {
        let dir = tempfile::tempdir().unwrap();
        let (img, lab) = idx_pair(2);
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), &img).unwrap();
        std::fs::write(dir.path().join("train-labels-idx1-ubyte"), &lab).unwrap();
        let opts = LoadOptions {
            channels: Some(3),
            image_size: Some((32, 32)),
            ..offline(dir.path())
        };
        let ds = load(&DatasetSpec::Mnist, Split::Train, Some(dir.path()), &opts).unwrap();
        assert_eq!((ds.len(), ds.channels, ds.height, ds.width), (2, 3, 32, 32));
        assert!(ds.image(1).iter().all(|&v| v == 1));
        assert_eq!(ds.class_names[3], "3");

        // The test split is missing: the error names the folder and the files.
        let err = load(&DatasetSpec::Mnist, Split::Test, Some(dir.path()), &opts).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Io { .. }));
        assert!(msg.contains("mnist test files not found"), "{msg}");
        assert!(msg.contains("t10k-images-idx3-ubyte.gz"), "{msg}");
        assert!(msg.contains("--data-dir"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    }

    #[test]
    fn cifar_from_data_dir_subfolder() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = vec![3u8];
        rec.extend(vec![9u8; 3072]);
        let sub = dir.path().join("cifar10");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(
            sub.join("cifar-10-binary.tar.gz"),
            tar_gz(&[("cifar-10-batches-bin/test_batch.bin", &rec)]),
        )
        .unwrap();
        let opts = LoadOptions {
            channels: Some(1),
            ..offline(dir.path())
        };
        let ds = load(&DatasetSpec::Cifar10, Split::Test, Some(dir.path()), &opts).unwrap();
        assert_eq!((ds.len(), ds.channels, ds.labels[0]), (1, 1, 3));
        assert_eq!(ds.class_names[3], "cat");
        assert!(ds.images.iter().all(|&v| v == 9));
    }

    #[test]
    fn nothing_found_without_download_explains_where_to_put_files() {
        let cache = tempfile::tempdir().unwrap();
        let err = load(
            &DatasetSpec::Cifar100,
            Split::Train,
            None,
            &offline(cache.path()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cifar100 train files not found"), "{err}");
        assert!(err.contains("cifar-100-binary.tar.gz"), "{err}");
        assert!(
            err.contains(&cache.path().join("cifar100").display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn download_through_mirror_into_cache() {
        let (img, lab) = idx_pair(4);
        let (img_gz, lab_gz) = (gzip(&img), gzip(&lab));
        let mut routes = HashMap::new();
        routes.insert(
            "m/t10k-images-idx3-ubyte.gz".to_string(),
            Reply::ok(&img_gz),
        );
        routes.insert(
            "m/t10k-labels-idx1-ubyte.gz".to_string(),
            Reply::ok(&lab_gz),
        );
        let server = Server::start(routes, 2);
        let cache = tempfile::tempdir().unwrap();
        let opts = LoadOptions {
            download: true,
            mirror: Some(format!("{}m", server.base_url)), // no trailing slash on purpose
            ..offline(cache.path())
        };
        let remote = vec![
            (
                "t10k-images-idx3-ubyte.gz".to_string(),
                Checksum::Md5(md5_hex(&img_gz)),
            ),
            (
                "t10k-labels-idx1-ubyte.gz".to_string(),
                Checksum::Md5(md5_hex(&lab_gz)),
            ),
        ];
        let ds = load_with_remote(&DatasetSpec::Mnist, Split::Test, None, &opts, &remote).unwrap();
        assert_eq!(ds.labels, vec![0, 1, 2, 3]);
        assert_eq!(server.finish().len(), 2);
        let mut files: Vec<String> = std::fs::read_dir(cache.path().join("mnist"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            vec!["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
        );
        // Now cached: loads without any server.
        let again = load(
            &DatasetSpec::Mnist,
            Split::Test,
            None,
            &offline(cache.path()),
        )
        .unwrap();
        assert_eq!(again, ds);
    }

    #[test]
    fn mirror_serving_other_bytes_fails_the_published_checksum() {
        let (img, _) = idx_pair(1);
        let mut routes = HashMap::new();
        routes.insert(
            "t10k-images-idx3-ubyte.gz".to_string(),
            Reply::ok(&gzip(&img)),
        );
        let server = Server::start(routes, 1);
        let cache = tempfile::tempdir().unwrap();
        let opts = LoadOptions {
            download: true,
            mirror: Some(server.base_url.clone()),
            ..offline(cache.path())
        };
        let err = load(&DatasetSpec::Mnist, Split::Test, None, &opts).unwrap_err();
        match &err {
            Error::Checksum { expected, .. } => {
                assert_eq!(expected, "md5:9fb629c4189551a2d022fa330f9573f3")
            }
            other => panic!("expected a checksum error, got {other:?}"),
        }
        let dir = cache.path().join("mnist");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "partial file left"
        );
    }

    #[test]
    fn offline_error_says_how_to_provide_files() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let cache = tempfile::tempdir().unwrap();
        let opts = LoadOptions {
            download: true,
            mirror: Some(format!("http://{addr}/")),
            ..offline(cache.path())
        };
        let err = load(&DatasetSpec::Cifar10, Split::Train, None, &opts).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Download { .. }), "{err:?}");
        assert!(msg.contains("cifar-10-binary.tar.gz"), "{msg}");
        assert!(msg.contains("--data-dir"), "{msg}");
        assert!(
            msg.contains(&cache.path().join("cifar10").display().to_string()),
            "{msg}"
        );
    }

    #[test]
    fn folder_spec_loads_the_folder() {
        let root = tempfile::tempdir().unwrap();
        let p = root.path().join("train/only/a.png");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        image::GrayImage::from_pixel(3, 3, image::Luma([5]))
            .save(&p)
            .unwrap();
        let spec: DatasetSpec = format!("folder:{}", root.path().display()).parse().unwrap();
        let ds = load(&spec, Split::Train, None, &LoadOptions::default()).unwrap();
        assert_eq!(
            (ds.len(), ds.class_names.clone()),
            (1, vec!["only".to_string()])
        );
    }

    #[test]
    fn real_fashion_mnist_test_split_if_installed() {
        if !Path::new(SYSTEM_FASHION_MNIST).is_dir() {
            println!("skipped: {SYSTEM_FASHION_MNIST} is not installed");
            return;
        }
        // Empty cache and no downloads: the system copy must be found.
        let cache = tempfile::tempdir().unwrap();
        let ds = load(
            &DatasetSpec::FashionMnist,
            Split::Test,
            None,
            &offline(cache.path()),
        )
        .unwrap();
        assert_eq!(
            (ds.len(), ds.channels, ds.height, ds.width),
            (10_000, 1, 28, 28)
        );
        assert!(ds.labels.iter().all(|&l| l < 10));
        assert_eq!(ds.class_counts(), vec![1000; 10]);
        assert_eq!(ds.labels[..3], [9, 2, 1]); // ankle boot, pullover, trouser
        let mean = ds.images.iter().map(|&v| f64::from(v)).sum::<f64>() / ds.images.len() as f64;
        assert!(
            (mean / 255.0 - 0.2868).abs() < 0.01,
            "mean {}",
            mean / 255.0
        );
    }
}
