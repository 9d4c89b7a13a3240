//! Image-folder datasets: `ROOT/train/<class>/*.{png,jpg,jpeg}` and `ROOT/val/...` (or
//! `ROOT/test/...`) for the test split. Classes are the sorted subfolder names of
//! `train/`. [`ImageFiles::scan`] lists a split for the loader to stream;
//! [`load_folder`] decodes it whole into memory, resized to one common size.

use std::path::{Path, PathBuf};

use fast_image_resize::Resizer;
use image::ImageReader;
use rayon::prelude::*;

use super::dataset::{resize_image, Dataset, ResizeFilter};
use super::photo::Pixels;
use super::spec::Split;
use crate::{Error, Result};

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

fn not_found(path: &Path, msg: String) -> Error {
    Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, msg))
}

/// The folder holding `split`: `train/`, or `val/` (preferred) or `test/`.
pub fn split_dir(root: &Path, split: Split) -> Result<PathBuf> {
    let candidates: &[&str] = match split {
        Split::Train => &["train"],
        Split::Test => &["val", "test"],
    };
    candidates
        .iter()
        .map(|c| root.join(c))
        .find(|p| p.is_dir())
        .ok_or_else(|| {
            not_found(
                root,
                format!(
                    "no {} folder (expected {}/<class>/*.png|jpg|jpeg)",
                    candidates.join("/ or "),
                    candidates.join(" or ")
                ),
            )
        })
}

/// Sorted names of the subfolders of `dir`.
fn class_dirs(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| Error::format(dir.join(&n), "class folder name is not valid UTF-8"))?;
        if !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Sorted image files (by extension) directly inside the class folder `dir`. Hidden files
/// (`.DS_Store`) and subfolders are skipped; any other file is an error naming it, rather
/// than a silently smaller dataset.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)));
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden || !path.is_file() {
            continue;
        }
        if !is_image {
            return Err(Error::format(
                &path,
                "not an image file: class folders may hold only *.png, *.jpg and *.jpeg \
                 files (remove or move it)",
            ));
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

fn decode_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::format(path, format!("cannot decode image: {e}"))
}

/// (height, width) read from an image header without decoding pixels.
fn dimensions(path: &Path) -> Result<(usize, usize)> {
    let reader = ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| decode_error(path, e))?;
    Ok((h as usize, w as usize))
}

/// Decodes one image to channel-major bytes at `size`; channels are `force`d or kept
/// (1 for gray, 3 for colour; alpha is dropped).
fn decode(
    path: &Path,
    size: (usize, usize),
    force: Option<usize>,
    resizer: &mut Resizer,
) -> Result<(usize, Vec<u8>)> {
    let img = crate::files::decode_image(path)?;
    let channels = force.unwrap_or(if img.color().has_color() { 3 } else { 1 });
    let px = Pixels::from_image(&img, channels).map_err(|e| Error::format(path, e.to_string()))?;
    let mut out = vec![0u8; channels * size.0 * size.1];
    resize_image(
        resizer,
        &px.planar(),
        (channels, px.height, px.width),
        &mut out,
        size,
        ResizeFilter::Bilinear,
    )
    .map_err(|e| Error::format(path, e.to_string()))?;
    Ok((channels, out))
}

/// An image folder split, listed but not decoded: the loader decodes each file when a batch
/// needs it, at `channels` channels, brought to `height`×`width` by its crop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFiles {
    /// The image files, class by class, in name order.
    pub paths: Vec<PathBuf>,
    /// One label per file, an index into `class_names`.
    pub labels: Vec<u32>,
    /// The sorted class folder names of `train/`.
    pub class_names: Vec<String>,
    /// 1 (luma) or 3 (RGB).
    pub channels: usize,
    /// Output height in pixels.
    pub height: usize,
    /// Output width in pixels.
    pub width: usize,
}

impl ImageFiles {
    /// Lists an image folder split (see [`load_folder`] for the layout and the rules).
    /// `size` = (height, width) of the output, else the size of the first training image;
    /// `channels` 1 or 3, else 3.
    pub fn scan(
        root: &Path,
        split: Split,
        size: Option<(usize, usize)>,
        channels: Option<usize>,
    ) -> Result<ImageFiles> {
        let (files, class_names, size) = list_folder(root, split, size, channels)?;
        let (labels, paths) = files.into_iter().unzip();
        Ok(ImageFiles {
            paths,
            labels,
            class_names,
            channels: channels.unwrap_or(3),
            height: size.0,
            width: size.1,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// The files at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Result<ImageFiles> {
        if let Some(&i) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(Error::Invalid(format!(
                "subset index {i} is out of range for a folder of {} images",
                self.len()
            )));
        }
        Ok(ImageFiles {
            paths: indices.iter().map(|&i| self.paths[i].clone()).collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            class_names: self.class_names.clone(),
            ..*self
        })
    }
}

/// Checks the arguments and lists a split: (label, file) pairs, the class names and the
/// output size.
#[allow(clippy::type_complexity)]
fn list_folder(
    root: &Path,
    split: Split,
    size: Option<(usize, usize)>,
    channels: Option<usize>,
) -> Result<(Vec<(u32, PathBuf)>, Vec<String>, (usize, usize))> {
    if let Some(c) = channels.filter(|&c| c != 1 && c != 3) {
        return Err(Error::Invalid(format!(
            "image folders can be loaded with 1 or 3 channels, not {c}"
        )));
    }
    if let Some((h, w)) = size.filter(|&(h, w)| h == 0 || w == 0) {
        return Err(Error::Invalid(format!("cannot resize images to {h}x{w}")));
    }
    if !root.is_dir() {
        return Err(not_found(root, "image folder does not exist".into()));
    }
    let dir = split_dir(root, split)?;
    let train_dir = root.join("train");
    let classes = if train_dir.is_dir() {
        class_dirs(&train_dir)?
    } else {
        class_dirs(&dir)?
    };
    if classes.is_empty() {
        return Err(not_found(
            &dir,
            "no class folders (expected <class>/*.png|jpg|jpeg)".into(),
        ));
    }
    for name in class_dirs(&dir)? {
        if classes.binary_search(&name).is_err() {
            return Err(Error::format(
                dir.join(&name),
                format!("class folder has no counterpart in {}", train_dir.display()),
            ));
        }
    }
    let mut files: Vec<(u32, PathBuf)> = Vec::new();
    for (label, name) in classes.iter().enumerate() {
        let class_dir = dir.join(name);
        if class_dir.is_dir() {
            let images = image_files(&class_dir)?;
            if images.is_empty() {
                return Err(Error::format(
                    &class_dir,
                    "class folder has no images (*.png, *.jpg, *.jpeg)",
                ));
            }
            files.extend(images.into_iter().map(|p| (label as u32, p)));
        }
    }
    if files.is_empty() {
        return Err(not_found(
            &dir,
            "no images (*.png, *.jpg, *.jpeg) in the class folders".into(),
        ));
    }
    let size = match size {
        Some(s) => s,
        None => {
            let reference = if split == Split::Test && train_dir.is_dir() {
                first_image(&train_dir, &classes)?
            } else {
                None
            };
            match reference {
                Some(p) => dimensions(&p)?,
                None => dimensions(&files[0].1)?,
            }
        }
    };
    Ok((files, classes, size))
}

/// Loads an image folder split into memory. `size` = (height, width) to resize every
/// image to, else the size of the first training image (first of this split if there is
/// no `train/`). `channels` forces 1 or 3 channels, else grayscale stays grayscale and a
/// mix of gray and colour becomes RGB. (Training and evaluation stream folders instead,
/// through [`ImageFiles`].)
pub fn load_folder(
    root: &Path,
    split: Split,
    size: Option<(usize, usize)>,
    channels: Option<usize>,
) -> Result<Dataset> {
    let (files, classes, size) = list_folder(root, split, size, channels)?;
    let decoded: Vec<(usize, Vec<u8>)> = files
        .par_iter()
        .map_init(Resizer::new, |resizer, (_, path)| {
            decode(path, size, channels, resizer)
        })
        .collect::<Result<_>>()?;
    let out_channels = decoded.iter().map(|d| d.0).max().unwrap_or(1);
    let plane = size.0 * size.1;
    let mut images = Vec::with_capacity(decoded.len() * out_channels * plane);
    for (c, pixels) in &decoded {
        if *c == out_channels {
            images.extend_from_slice(pixels);
        } else {
            // Gray image in a colour dataset: replicate the plane.
            for _ in 0..out_channels {
                images.extend_from_slice(pixels);
            }
        }
    }
    let labels = files.iter().map(|(l, _)| *l).collect();
    Dataset::new(images, labels, out_channels, size.0, size.1, classes)
}

/// The first image of the first non-empty class folder of `dir`.
fn first_image(dir: &Path, classes: &[String]) -> Result<Option<PathBuf>> {
    for name in classes {
        if let Some(p) = image_files(&dir.join(name))?.into_iter().next() {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, RgbImage};

    fn gray(path: &Path, w: u32, h: u32, v: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        GrayImage::from_pixel(w, h, image::Luma([v]))
            .save(path)
            .unwrap();
    }

    fn rgb(path: &Path, w: u32, h: u32, px: [u8; 3]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        RgbImage::from_pixel(w, h, image::Rgb(px))
            .save(path)
            .unwrap();
    }

    #[test]
    fn two_class_gray_folder() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        gray(&r.join("train/dog/b.png"), 4, 3, 20);
        gray(&r.join("train/dog/a.png"), 4, 3, 10);
        gray(&r.join("train/cat/x.png"), 8, 6, 30); // other size: resized
        std::fs::write(r.join("train/cat/notes.txt"), "not an image").unwrap();
        gray(&r.join("test/dog/c.PNG"), 4, 3, 40);
        // A non-image file in a class folder is an error naming it, not a smaller dataset.
        let e = load_folder(r, Split::Train, None, None).unwrap_err();
        assert!(e.to_string().contains("notes.txt"), "{e}");
        std::fs::remove_file(r.join("train/cat/notes.txt")).unwrap();

        let ds = load_folder(r, Split::Train, None, None).unwrap();
        assert_eq!(ds.class_names, vec!["cat", "dog"]);
        assert_eq!(ds.labels, vec![0, 1, 1]);
        // First image (cat/x.png, 8x6) sets the size: height 6, width 8.
        assert_eq!((ds.channels, ds.height, ds.width), (1, 6, 8));
        assert!(ds.image(0).iter().all(|&v| v == 30));
        assert!(ds.image(1).iter().all(|&v| v == 10)); // dog/a before dog/b
        assert!(ds.image(2).iter().all(|&v| v == 20));

        // Test split: classes and size from train/, only dog present.
        let t = load_folder(r, Split::Test, None, None).unwrap();
        assert_eq!(t.class_names, vec!["cat", "dog"]);
        assert_eq!(t.labels, vec![1]);
        assert_eq!((t.height, t.width), (6, 8));
        assert!(t.image(0).iter().all(|&v| v == 40));

        let small = load_folder(r, Split::Train, Some((2, 2)), Some(3)).unwrap();
        assert_eq!((small.channels, small.height, small.width), (3, 2, 2));
        assert_eq!(small.image(2), &[20; 12]);
    }

    #[test]
    fn mixed_gray_and_rgb_becomes_rgb_with_planar_layout() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        rgb(&r.join("train/a/1.png"), 2, 2, [200, 100, 50]);
        gray(&r.join("train/b/1.png"), 2, 2, 77);
        let ds = load_folder(r, Split::Train, None, None).unwrap();
        assert_eq!(ds.channels, 3);
        assert_eq!(
            ds.image(0),
            &[200, 200, 200, 200, 100, 100, 100, 100, 50, 50, 50, 50]
        );
        assert_eq!(ds.image(1), &[77; 12]);
        // `val/` is used for the test split when present.
        rgb(&r.join("val/b/9.jpg"), 2, 2, [0, 0, 255]);
        let t = load_folder(r, Split::Test, None, None).unwrap();
        assert_eq!((t.len(), t.labels[0], t.channels), (1, 1, 3));
        let gray_t = load_folder(r, Split::Test, None, Some(1)).unwrap();
        assert_eq!(gray_t.channels, 1);
    }

    #[test]
    fn errors_name_the_problem() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let msg = load_folder(&r.join("missing"), Split::Train, None, None)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("missing") && msg.contains("does not exist"),
            "{msg}"
        );
        let msg = load_folder(r, Split::Train, None, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no train folder"), "{msg}");
        std::fs::create_dir_all(r.join("train/a")).unwrap();
        let msg = load_folder(r, Split::Train, None, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no images"), "{msg}");
        gray(&r.join("train/a/ok.png"), 2, 2, 1);
        std::fs::write(r.join("train/a/broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let err = load_folder(r, Split::Train, None, None).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err:?}");
        assert!(err.to_string().contains("broken.png"), "{err}");
        std::fs::remove_file(r.join("train/a/broken.png")).unwrap();
        gray(&r.join("test/zebra/1.png"), 2, 2, 1);
        let msg = load_folder(r, Split::Test, None, None)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("zebra") && msg.contains("no counterpart"),
            "{msg}"
        );
        assert!(load_folder(r, Split::Train, None, Some(2)).is_err());
        // Truncated PNG: decoding fails with the file named, no panic.
        let bytes = std::fs::read(r.join("train/a/ok.png")).unwrap();
        std::fs::write(r.join("train/a/short.png"), &bytes[..bytes.len() / 2]).unwrap();
        let msg = load_folder(r, Split::Train, None, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("short.png"), "{msg}");
    }
}
