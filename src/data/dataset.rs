//! The in-memory [`Dataset`]: `u8` images stored N×C×H×W (channel-major per image) with
//! `u32` labels and class names, plus its whole-dataset transforms (subset, resize,
//! grayscale⇄RGB). Every loader in this module produces one of these.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use rayon::prelude::*;

use crate::{Error, Result};

/// Interpolation used when resizing images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizeFilter {
    /// Bilinear (triangle) filter; the default.
    #[default]
    Bilinear,
    /// Bicubic Catmull–Rom filter: sharper, slightly slower.
    Bicubic,
}

impl ResizeFilter {
    fn alg(self) -> ResizeAlg {
        match self {
            ResizeFilter::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
            ResizeFilter::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
        }
    }
}

/// A labelled image dataset held in memory.
///
/// Invariants (checked by [`Dataset::new`] and [`Dataset::validate`]):
/// `images.len() == labels.len() * channels * height * width`, every label is below
/// `class_names.len()`, and `channels`, `height`, `width` are positive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// Pixel values, image after image, each image channel-major (C×H×W).
    pub images: Vec<u8>,
    /// One label per image, an index into `class_names`.
    pub labels: Vec<u32>,
    /// Channels per image (1 = grayscale, 3 = RGB).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Human-readable class names; `num_classes()` is their count.
    pub class_names: Vec<String>,
}

impl Dataset {
    /// Builds a dataset and checks its invariants.
    pub fn new(
        images: Vec<u8>,
        labels: Vec<u32>,
        channels: usize,
        height: usize,
        width: usize,
        class_names: Vec<String>,
    ) -> Result<Self> {
        let ds = Dataset {
            images,
            labels,
            channels,
            height,
            width,
            class_names,
        };
        ds.validate()?;
        Ok(ds)
    }

    /// Checks the invariants listed on [`Dataset`].
    pub fn validate(&self) -> Result<()> {
        if self.channels == 0 || self.height == 0 || self.width == 0 {
            return Err(Error::Invalid(format!(
                "dataset images must have positive size, got {}x{}x{} (CxHxW)",
                self.channels, self.height, self.width
            )));
        }
        let expected = self
            .channels
            .checked_mul(self.height)
            .and_then(|v| v.checked_mul(self.width))
            .and_then(|v| v.checked_mul(self.labels.len()));
        if expected != Some(self.images.len()) {
            return Err(Error::Invalid(format!(
                "dataset holds {} pixel bytes but {} images of {}x{}x{} need {}",
                self.images.len(),
                self.labels.len(),
                self.channels,
                self.height,
                self.width,
                expected.map_or_else(|| "more than usize::MAX".to_string(), |v| v.to_string())
            )));
        }
        let classes = self.class_names.len();
        if let Some((i, &label)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= classes)
        {
            return Err(Error::Invalid(format!(
                "label {label} of image {i} is out of range for {classes} classes"
            )));
        }
        Ok(())
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the dataset holds no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of classes (the length of `class_names`).
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Bytes per image: `channels * height * width`.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Shape of one image as (C, H, W).
    pub fn image_shape(&self) -> (usize, usize, usize) {
        (self.channels, self.height, self.width)
    }

    /// The pixels of image `i`, C×H×W. Panics if `i >= len()`, like slice indexing.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// Number of images per class, indexed by label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes()];
        for &l in &self.labels {
            if let Some(c) = counts.get_mut(l as usize) {
                *c += 1;
            }
        }
        counts
    }

    /// A new dataset holding the images at `indices`, in that order (repeats allowed).
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset> {
        let n = self.image_len();
        let mut images = Vec::with_capacity(indices.len() * n);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            if i >= self.len() {
                return Err(Error::Invalid(format!(
                    "subset index {i} is out of range for a dataset of {} images",
                    self.len()
                )));
            }
            images.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        Ok(Dataset {
            images,
            labels,
            channels: self.channels,
            height: self.height,
            width: self.width,
            class_names: self.class_names.clone(),
        })
    }

    /// All images resized to `height`×`width` with a bilinear filter (no-op if equal).
    pub fn resized(self, height: usize, width: usize) -> Result<Dataset> {
        self.resized_with(height, width, ResizeFilter::Bilinear)
    }

    /// All images resized to `height`×`width` with the given filter (no-op if equal).
    /// Runs on the rayon pool.
    pub fn resized_with(
        self,
        height: usize,
        width: usize,
        filter: ResizeFilter,
    ) -> Result<Dataset> {
        if height == self.height && width == self.width {
            return Ok(self);
        }
        if height == 0 || width == 0 {
            return Err(Error::Invalid(format!(
                "cannot resize images to {height}x{width}"
            )));
        }
        let c = self.channels;
        let src_len = self.image_len();
        let dst_len = c
            .checked_mul(height)
            .and_then(|v| v.checked_mul(width))
            .ok_or_else(|| Error::Invalid(format!("image size {height}x{width} is too large")))?;
        let mut images = vec![0u8; dst_len * self.len()];
        if !images.is_empty() {
            images
                .par_chunks_mut(dst_len)
                .zip(self.images.par_chunks(src_len))
                .try_for_each_init(Resizer::new, |resizer, (dst, src)| {
                    resize_image(
                        resizer,
                        src,
                        (c, self.height, self.width),
                        dst,
                        (height, width),
                        filter,
                    )
                })?;
        }
        Ok(Dataset {
            images,
            height,
            width,
            ..self
        })
    }

    /// The dataset with `channels` channels: 1→3 replicates the gray plane, 3→1 takes
    /// the luminance (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B). Same count is a no-op.
    pub fn with_channels(self, channels: usize) -> Result<Dataset> {
        if channels == self.channels {
            return Ok(self);
        }
        let plane = self.height * self.width;
        let images = match (self.channels, channels) {
            (1, 3) => {
                let mut out = Vec::with_capacity(self.images.len() * 3);
                for img in self.images.chunks_exact(plane) {
                    for _ in 0..3 {
                        out.extend_from_slice(img);
                    }
                }
                out
            }
            (3, 1) => {
                let mut out = Vec::with_capacity(self.images.len() / 3);
                for img in self.images.chunks_exact(3 * plane) {
                    let (r, gb) = img.split_at(plane);
                    let (g, b) = gb.split_at(plane);
                    out.extend(
                        r.iter()
                            .zip(g)
                            .zip(b)
                            .map(|((&r, &g), &b)| luminance(r, g, b)),
                    );
                }
                out
            }
            (from, to) => {
                return Err(Error::Invalid(format!(
                    "cannot convert images from {from} to {to} channels (only 1 <-> 3)"
                )))
            }
        };
        Ok(Dataset {
            images,
            channels,
            ..self
        })
    }
}

/// BT.601 luma of an RGB pixel, rounded.
pub(crate) fn luminance(r: u8, g: u8, b: u8) -> u8 {
    ((299 * u32::from(r) + 587 * u32::from(g) + 114 * u32::from(b) + 500) / 1000) as u8
}

/// Resizes one channel-major image `src` of shape `(c, h, w)` into `dst` of shape
/// `(c, new_h, new_w)`, plane by plane.
pub(crate) fn resize_image(
    resizer: &mut Resizer,
    src: &[u8],
    (c, h, w): (usize, usize, usize),
    dst: &mut [u8],
    (new_h, new_w): (usize, usize),
    filter: ResizeFilter,
) -> Result<()> {
    if (h, w) == (new_h, new_w) {
        dst.copy_from_slice(src);
        return Ok(());
    }
    let dim = |v: usize| {
        u32::try_from(v).map_err(|_| Error::Invalid(format!("image dimension {v} is too large")))
    };
    let (sw, sh, dw, dh) = (dim(w)?, dim(h)?, dim(new_w)?, dim(new_h)?);
    let options = ResizeOptions::new().resize_alg(filter.alg());
    let resize_err = |e: &dyn std::fmt::Display| Error::Invalid(format!("resizing image: {e}"));
    for (s, d) in src
        .chunks_exact(h * w)
        .zip(dst.chunks_exact_mut(new_h * new_w))
        .take(c)
    {
        let src_img = ImageRef::new(sw, sh, s, PixelType::U8).map_err(|e| resize_err(&e))?;
        let mut dst_img =
            Image::from_slice_u8(dw, dh, d, PixelType::U8).map_err(|e| resize_err(&e))?;
        resizer
            .resize(&src_img, &mut dst_img, &options)
            .map_err(|e| resize_err(&e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| i.to_string()).collect()
    }

    fn tiny_rgb() -> Dataset {
        // Two 3x2x2 images.
        let images = vec![
            10, 20, 30, 40, // R
            50, 60, 70, 80, // G
            90, 100, 110, 120, // B
            255, 255, 255, 255, //
            0, 0, 0, 0, //
            0, 0, 0, 0,
        ];
        Dataset::new(images, vec![1, 0], 3, 2, 2, names(2)).expect("valid dataset")
    }

    #[test]
    fn accessors() {
        let ds = tiny_rgb();
        assert_eq!(ds.len(), 2);
        assert!(!ds.is_empty());
        assert_eq!(ds.num_classes(), 2);
        assert_eq!(ds.image_len(), 12);
        assert_eq!(ds.image_shape(), (3, 2, 2));
        assert_eq!(ds.image(1)[..4], [255, 255, 255, 255]);
        assert_eq!(ds.image(0)[4], 50);
        assert_eq!(ds.class_counts(), vec![1, 1]);
    }

    #[test]
    fn new_rejects_inconsistent_data() {
        let err = Dataset::new(vec![0; 5], vec![0], 1, 2, 2, names(1)).unwrap_err();
        assert!(err.to_string().contains("5 pixel bytes"), "{err}");
        let err = Dataset::new(vec![0; 4], vec![3], 1, 2, 2, names(2)).unwrap_err();
        assert!(err.to_string().contains("label 3"), "{err}");
        assert!(Dataset::new(vec![], vec![], 0, 2, 2, names(1)).is_err());
        assert!(Dataset::new(vec![], vec![], 1, 2, 2, vec![]).is_ok());
    }

    #[test]
    fn subset_picks_images_in_order() {
        let ds = tiny_rgb();
        let s = ds.subset(&[1, 0, 1]).unwrap();
        assert_eq!(s.labels, vec![0, 1, 0]);
        assert_eq!(s.image(0), ds.image(1));
        assert_eq!(s.image(1), ds.image(0));
        assert!(ds.subset(&[2]).is_err());
    }

    #[test]
    fn gray_to_rgb_replicates_and_rgb_to_gray_uses_luminance() {
        let gray = Dataset::new(vec![1, 2, 3, 4], vec![0], 1, 2, 2, names(1)).unwrap();
        let rgb = gray.clone().with_channels(3).unwrap();
        assert_eq!(rgb.channels, 3);
        assert_eq!(rgb.images, vec![1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]);
        let back = rgb.with_channels(1).unwrap();
        assert_eq!(back, gray);

        let g = tiny_rgb().with_channels(1).unwrap();
        // 0.299*10 + 0.587*50 + 0.114*90 = 42.6 -> 43
        assert_eq!(g.image(0)[0], 43);
        // pure red 255 -> 76.245 -> 76
        assert_eq!(g.image(1), &[76, 76, 76, 76]);
        assert!(tiny_rgb().with_channels(2).is_err());
    }

    #[test]
    fn resize_constant_image_stays_constant_and_shapes_change() {
        let ds = Dataset::new(vec![200; 2 * 4 * 4], vec![0, 0], 1, 4, 4, names(1)).unwrap();
        for filter in [ResizeFilter::Bilinear, ResizeFilter::Bicubic] {
            let r = ds.clone().resized_with(8, 6, filter).unwrap();
            assert_eq!((r.height, r.width, r.len()), (8, 6, 2));
            assert_eq!(r.images.len(), 2 * 8 * 6);
            assert!(r.images.iter().all(|&v| v == 200), "{:?}", r.images);
        }
        let same = ds.clone().resized(4, 4).unwrap();
        assert_eq!(same, ds);
        assert!(ds.resized(0, 4).is_err());
    }

    #[test]
    fn resize_keeps_planes_separate() {
        // Channel 0 all 0, channel 1 all 255: no bleeding between planes.
        let mut images = vec![0u8; 16];
        images.extend(vec![255u8; 16]);
        let ds = Dataset::new(images, vec![0], 2, 4, 4, names(1)).unwrap();
        let r = ds.resized(2, 2).unwrap();
        assert_eq!(r.images, vec![0, 0, 0, 0, 255, 255, 255, 255]);
    }

    #[test]
    fn bilinear_downscale_averages() {
        // A 1x2 image [0, 200] shrunk to 1x1 averages to 100.
        let ds = Dataset::new(vec![0, 200], vec![0], 1, 1, 2, names(1)).unwrap();
        let r = ds.resized(1, 1).unwrap();
        assert_eq!(r.images, vec![100]);
    }
}
