//! One photo at a time, from its file to the model's input size: decoding to interleaved
//! pixels, timm's evaluation geometry (resize the shorter side to `size / crop_pct`, center
//! crop) and torchvision's `RandomResizedCrop` for training. Pixels stay `u8`; the loader
//! flips, normalises and erases them afterwards like any image in memory.

use std::path::Path;

use fast_image_resize::{images::Image, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::DynamicImage;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::dataset::ResizeFilter;
use super::rng::{below, uniform};
use crate::files::MAX_IMAGE_BYTES;
use crate::{Error, Result};

/// A decoded image: `height` rows of `width` pixels of `channels` bytes each (H×W×C).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    pub data: Vec<u8>,
    pub width: usize,
    pub height: usize,
    pub channels: usize,
}

impl Pixels {
    /// The image as 1 (luma) or 3 (RGB) channels; alpha is dropped.
    pub fn from_image(img: &DynamicImage, channels: usize) -> Result<Pixels> {
        let (data, (w, h)) = match channels {
            1 => {
                let g = img.to_luma8();
                let d = g.dimensions();
                (g.into_raw(), d)
            }
            3 => {
                let g = img.to_rgb8();
                let d = g.dimensions();
                (g.into_raw(), d)
            }
            c => {
                return Err(Error::Invalid(format!(
                    "images can feed 1- or 3-channel models, not {c}-channel ones"
                )))
            }
        };
        if w == 0 || h == 0 {
            return Err(Error::Invalid("image has no pixels".into()));
        }
        Ok(Pixels {
            data,
            width: w as usize,
            height: h as usize,
            channels,
        })
    }

    /// Decodes the image file `path` (within [`crate::files::decode_image`]'s limits) to
    /// `channels` channels.
    pub fn read(path: &Path, channels: usize) -> Result<Pixels> {
        let img = crate::files::decode_image(path)?;
        Pixels::from_image(&img, channels).map_err(|e| Error::format(path, e.to_string()))
    }

    /// Rows `top..top+h`, columns `left..left+w`. The box must lie inside the image.
    pub fn crop(&self, CropBox { top, left, h, w }: CropBox) -> Pixels {
        debug_assert!(top + h <= self.height && left + w <= self.width);
        let c = self.channels;
        let mut data = Vec::with_capacity(h * w * c);
        for y in top..top + h {
            let row = (y * self.width + left) * c;
            data.extend_from_slice(&self.data[row..row + w * c]);
        }
        Pixels {
            data,
            width: w,
            height: h,
            channels: c,
        }
    }

    /// The image resampled to `height`×`width` with PIL's antialiased filters (bilinear,
    /// or bicubic with a = −0.5), as torchvision and timm resize PIL images. Same size:
    /// unchanged.
    pub fn resize(self, (height, width): (usize, usize), filter: ResizeFilter) -> Result<Pixels> {
        if (height, width) == (self.height, self.width) {
            return Ok(self);
        }
        let bytes = height
            .checked_mul(width)
            .and_then(|v| v.checked_mul(self.channels));
        if height == 0 || width == 0 || bytes.is_none_or(|b| b as u64 > MAX_IMAGE_BYTES) {
            return Err(Error::Invalid(format!(
                "cannot resize a {}x{} image to {width}x{height}",
                self.width, self.height
            )));
        }
        let pt = if self.channels == 1 {
            PixelType::U8
        } else {
            PixelType::U8x3
        };
        let err = |e: &dyn std::fmt::Display| Error::Invalid(format!("resizing image: {e}"));
        let src = Image::from_vec_u8(self.width as u32, self.height as u32, self.data, pt)
            .map_err(|e| err(&e))?;
        let mut dst = Image::new(width as u32, height as u32, pt);
        let filter = match filter {
            ResizeFilter::Bilinear => FilterType::Bilinear,
            ResizeFilter::Bicubic => FilterType::CatmullRom,
        };
        Resizer::new()
            .resize(
                &src,
                &mut dst,
                &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter)),
            )
            .map_err(|e| err(&e))?;
        Ok(Pixels {
            data: dst.into_vec(),
            width,
            height,
            channels: self.channels,
        })
    }

    /// Channel-major copy (C×H×W), the layout of images in memory.
    pub fn planar(&self) -> Vec<u8> {
        let (c, plane) = (self.channels, self.width * self.height);
        let mut out = vec![0u8; c * plane];
        for (i, px) in self.data.chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                out[ch * plane + i] = v;
            }
        }
        out
    }
}

/// A rectangle of an image: rows `top..top+h`, columns `left..left+w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub h: usize,
    pub w: usize,
}

/// The most elongated image (longer side : shorter side) the evaluation transform resizes:
/// resizing the shorter side of a 16384×1 strip to 248 pixels would take gigabytes.
pub const MAX_ASPECT: usize = 64;

/// timm's evaluation geometry: resize the shorter side to `floor(size / crop_pct)` keeping
/// the aspect ratio (or, `exact`, straight to `size / crop_pct` as HF does), then crop the
/// center `size`. An image already of the target size with `crop_pct` 1 is not resampled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CenterCrop {
    pub crop_pct: f64,
    pub exact: bool,
    pub filter: ResizeFilter,
}

impl CenterCrop {
    /// Checks `crop_pct` (a fraction in (0, 1]).
    pub fn validate(&self) -> Result<()> {
        if !(self.crop_pct > 0.0 && self.crop_pct <= 1.0) {
            return Err(Error::Invalid(format!(
                "crop_pct must be in (0, 1], got {}",
                self.crop_pct
            )));
        }
        Ok(())
    }

    /// The `th`×`tw` center of the resized image.
    pub fn apply(&self, px: Pixels, (th, tw): (usize, usize)) -> Result<Pixels> {
        self.validate()?;
        let (h, w) = (px.height, px.width);
        if !self.exact && h.max(w) > MAX_ASPECT * h.min(w) {
            return Err(Error::Invalid(format!(
                "a {w}x{h} image is too elongated to resize and center-crop (more than \
                 {MAX_ASPECT}:1)"
            )));
        }
        let (rh, rw) = if self.exact {
            (th, tw)
        } else if th == tw {
            let short = (th as f64 / self.crop_pct).floor() as usize;
            if h <= w {
                (short, (short as f64 * w as f64 / h as f64) as usize)
            } else {
                ((short as f64 * h as f64 / w as f64) as usize, short)
            }
        } else {
            (
                (th as f64 / self.crop_pct).floor() as usize,
                (tw as f64 / self.crop_pct).floor() as usize,
            )
        };
        if rh.saturating_mul(rw).saturating_mul(px.channels) as u64 > MAX_IMAGE_BYTES {
            return Err(Error::Invalid(format!(
                "a {w}x{h} image is too elongated to resize to {rw}x{rh} for a {tw}x{th} \
                 center crop"
            )));
        }
        let px = px.resize((rh, rw), self.filter)?;
        if rh < th || rw < tw {
            return Err(Error::Invalid(format!(
                "resized image {rw}x{rh} is smaller than the input size {tw}x{th}"
            )));
        }
        // torchvision CenterCrop: int(round((size - crop) / 2)), round half to even.
        let top = ((rh - th) as f64 / 2.0).round_ties_even() as usize;
        let left = ((rw - tw) as f64 / 2.0).round_ties_even() as usize;
        Ok(px.crop(CropBox {
            top,
            left,
            h: th,
            w: tw,
        }))
    }
}

/// torchvision's `RandomResizedCrop`: a box covering a random `scale` fraction of the
/// image's area with a random aspect ratio in `ratio` (sampled log-uniformly), resized
/// (bilinear) to the output size. timm's default training transform for photos.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RandomResizedCrop {
    /// Range of the box's area as a fraction of the image's.
    pub scale: [f64; 2],
    /// Range of the box's aspect ratio (width / height).
    pub ratio: [f64; 2],
}

/// Tries at a box that fits before falling back to a center crop (torchvision's 10).
const RRC_ATTEMPTS: usize = 10;

impl Default for RandomResizedCrop {
    /// timm's and torchvision's defaults: scale 0.08–1, ratio 3/4–4/3.
    fn default() -> Self {
        RandomResizedCrop {
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
        }
    }
}

impl RandomResizedCrop {
    /// Checks the ranges: `0 < scale_min <= scale_max <= 1`, `0 < ratio_min <= ratio_max`,
    /// all finite.
    pub fn validate(&self) -> Result<()> {
        let [s0, s1] = self.scale;
        let [r0, r1] = self.ratio;
        if !(s0 > 0.0 && s0 <= s1 && s1 <= 1.0) {
            return Err(Error::Invalid(format!(
                "scale must satisfy 0 < min <= max <= 1, got {s0},{s1}"
            )));
        }
        if !(r0 > 0.0 && r0 <= r1 && r1.is_finite()) {
            return Err(Error::Invalid(format!(
                "ratio must satisfy 0 < min <= max (finite), got {r0},{r1}"
            )));
        }
        Ok(())
    }

    /// torchvision's `RandomResizedCrop.get_params` for an `h`×`w` image.
    pub fn draw<R: Rng>(&self, rng: &mut R, h: usize, w: usize) -> CropBox {
        let area = (h * w) as f64;
        let (lo, hi) = (self.ratio[0].ln(), self.ratio[1].ln());
        for _ in 0..RRC_ATTEMPTS {
            let target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * uniform(rng));
            let aspect = (lo + (hi - lo) * uniform(rng)).exp();
            let cw = (target * aspect).sqrt().round() as usize;
            let ch = (target / aspect).sqrt().round() as usize;
            if 0 < cw && cw <= w && 0 < ch && ch <= h {
                let top = below(rng, (h - ch + 1) as u64) as usize;
                let left = below(rng, (w - cw + 1) as u64) as usize;
                return CropBox {
                    top,
                    left,
                    h: ch,
                    w: cw,
                };
            }
        }
        // Fallback: the whole image, cut to the nearest allowed aspect ratio, centered.
        let in_ratio = w as f64 / h as f64;
        let (ch, cw) = if in_ratio < self.ratio[0] {
            ((w as f64 / self.ratio[0]).round() as usize, w)
        } else if in_ratio > self.ratio[1] {
            (h, (h as f64 * self.ratio[1]).round() as usize)
        } else {
            (h, w)
        };
        let (ch, cw) = (ch.clamp(1, h), cw.clamp(1, w));
        CropBox {
            top: (h - ch) / 2,
            left: (w - cw) / 2,
            h: ch,
            w: cw,
        }
    }

    /// The box `b` of `px` resized (bilinear) to `size`.
    pub fn apply(&self, px: &Pixels, b: CropBox, size: (usize, usize)) -> Result<Pixels> {
        px.crop(b).resize(size, ResizeFilter::Bilinear)
    }
}

/// How a loader brings a photo file to the output size: a random resized crop (training)
/// or timm's resize and center crop (evaluation). Images already in memory at the output
/// size ignore it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PhotoCrop {
    Random(RandomResizedCrop),
    Center(CenterCrop),
}

impl PhotoCrop {
    /// Evaluation without resampling margins: resize the shorter side to the output size,
    /// center crop (crop_pct 1, bicubic).
    pub const FULL: PhotoCrop = PhotoCrop::Center(CenterCrop {
        crop_pct: 1.0,
        exact: false,
        filter: ResizeFilter::Bicubic,
    });

    /// Checks the crop's numbers.
    pub fn validate(&self) -> Result<()> {
        match self {
            PhotoCrop::Random(r) => r.validate(),
            PhotoCrop::Center(c) => c.validate(),
        }
    }

    /// Whether the crop depends on a random draw.
    pub fn is_random(&self) -> bool {
        matches!(self, PhotoCrop::Random(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::rng::keyed_rng;

    /// A `w`×`h` RGB image whose pixel (y, x) is (y, x, 7).
    fn ramp(w: usize, h: usize) -> Pixels {
        let data = (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| [y as u8, x as u8, 7]))
            .collect();
        Pixels {
            data,
            width: w,
            height: h,
            channels: 3,
        }
    }

    #[test]
    fn crop_and_planar_keep_pixels_in_place() {
        let px = ramp(5, 4).crop(CropBox {
            top: 1,
            left: 2,
            h: 2,
            w: 3,
        });
        assert_eq!((px.width, px.height), (3, 2));
        assert_eq!(&px.data[..3], &[1, 2, 7]);
        let p = px.planar();
        assert_eq!(
            p,
            vec![1, 1, 1, 2, 2, 2, 2, 3, 4, 2, 3, 4, 7, 7, 7, 7, 7, 7]
        );
    }

    #[test]
    fn center_crop_is_timms_geometry() {
        // 40x20 image, size 16, crop_pct 0.8: shorter side to 20 (no resize), crop the
        // middle 16x16 of 40x20: top = round(2) = 2, left = round(12) = 12.
        let c = CenterCrop {
            crop_pct: 0.8,
            exact: false,
            filter: ResizeFilter::Bicubic,
        };
        let out = c.apply(ramp(40, 20), (16, 16)).unwrap();
        assert_eq!((out.width, out.height), (16, 16));
        assert_eq!(&out.data[..3], &[2, 12, 7]);
        // Resizing happens when the shorter side differs; the result has the output size.
        let out = c.apply(ramp(60, 30), (16, 16)).unwrap();
        assert_eq!((out.width, out.height), (16, 16));
        assert!(c.apply(ramp(3, 3), (16, 16)).is_ok());
        let bad = CenterCrop { crop_pct: 0.0, ..c };
        assert!(bad.apply(ramp(4, 4), (2, 2)).is_err());
    }

    #[test]
    fn an_absurd_aspect_ratio_is_refused_before_allocating() {
        // 1 pixel high and 100,000 wide: the shorter side to 224 would mean 22 million
        // pixels a row: refused instead of allocated; 64:1 is still resized.
        let px = Pixels {
            data: vec![0; 100_000 * 3],
            width: 100_000,
            height: 1,
            channels: 3,
        };
        let e = PhotoCrop::FULL;
        let PhotoCrop::Center(c) = e else {
            unreachable!()
        };
        let msg = c.apply(px, (224, 224)).unwrap_err().to_string();
        assert!(msg.contains("too elongated"), "{msg}");
        let strip = ramp(64, 1);
        assert_eq!(c.apply(strip, (8, 8)).unwrap().data.len(), 8 * 8 * 3);
    }

    #[test]
    fn random_resized_crop_boxes_fit_and_follow_the_ranges() {
        let rrc = RandomResizedCrop::default();
        let (h, w) = (120, 200);
        for i in 0..500 {
            let b = rrc.draw(&mut keyed_rng(1, 2, 3, i), h, w);
            assert!(b.top + b.h <= h && b.left + b.w <= w, "{b:?}");
            let frac = (b.h * b.w) as f64 / (h * w) as f64;
            assert!((0.07..=1.0).contains(&frac), "{b:?}");
            let ar = b.w as f64 / b.h as f64;
            assert!((0.7..=1.4).contains(&ar), "{b:?}");
        }
        // Same key, same box.
        assert_eq!(
            rrc.draw(&mut keyed_rng(9, 9, 9, 9), h, w),
            rrc.draw(&mut keyed_rng(9, 9, 9, 9), h, w)
        );
        // Nothing fits a 1x50 strip with ratio 3/4..4/3: the fallback is the centered
        // square-most box, 1x1 (4/3 of the height, rounded).
        let b = rrc.draw(&mut keyed_rng(0, 0, 0, 0), 1, 50);
        assert_eq!(
            b,
            CropBox {
                top: 0,
                left: 24,
                h: 1,
                w: 1
            }
        );
        let out = rrc.apply(&ramp(50, 1), b, (8, 8)).unwrap();
        assert_eq!((out.width, out.height, out.data.len()), (8, 8, 192));
    }

    #[test]
    fn validation_names_the_range() {
        let r = RandomResizedCrop {
            scale: [0.5, 0.2],
            ..Default::default()
        };
        assert!(r.validate().unwrap_err().to_string().contains("scale"));
        let r = RandomResizedCrop {
            ratio: [f64::NAN, 1.0],
            ..Default::default()
        };
        assert!(r.validate().unwrap_err().to_string().contains("ratio"));
        assert!(RandomResizedCrop::default().validate().is_ok());
    }
}
