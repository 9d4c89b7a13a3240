//! Per-sample augmentation and normalisation: random crop with zero padding, random
//! horizontal flip, then `(x/255 - mean) / std` per channel into `f32`, then (optionally)
//! random erasing of one rectangle with noise, as timm's `RandomErasing` in its `pixel`
//! mode. Random choices come from a generator keyed by (seed, epoch, sample index), never
//! by batch or thread.

use super::dataset::Dataset;
use rand::Rng;

use super::rng::{below, coin, keyed_rng, uniform, STREAM_AUGMENT};
use super::spec::DatasetSpec;
use crate::{Error, Result};

/// What to do to each training image.
#[derive(Debug, Clone, PartialEq)]
pub struct AugmentConfig {
    /// Zero padding on every side before a random crop back to the original size
    /// (0 = no cropping). Padding is black in pixel space, i.e. `-mean/std` once
    /// normalised, as in torchvision's `RandomCrop(padding=pad)`.
    pub pad: usize,
    /// Mirror left-right with probability 1/2.
    pub hflip: bool,
    /// Probability of erasing one random rectangle (2%–1/3 of the area, aspect ratio
    /// 0.3–3.3) with standard-normal noise after normalisation (timm `--reprob`; 0 = off).
    pub erase_prob: f64,
    /// Per-channel mean of pixel values in [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation of pixel values in [0, 1].
    pub std: Vec<f32>,
}

/// The random choices for one sample: crop offset into the padded image and the flip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AugmentParams {
    /// Row offset of the crop in the padded image, in `0..=2*pad`.
    pub dy: usize,
    /// Column offset of the crop in the padded image, in `0..=2*pad`.
    pub dx: usize,
    /// Whether the crop is mirrored.
    pub flip: bool,
    /// The rectangle to erase, if any.
    pub erase: Option<Erase>,
}

/// One erased rectangle: rows `top..top+h`, columns `left..left+w` of every channel get
/// standard-normal noise drawn from a generator seeded with `noise_seed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erase {
    pub top: usize,
    pub left: usize,
    pub h: usize,
    pub w: usize,
    pub noise_seed: u64,
}

/// timm's `RandomErasing` defaults: the erased area as a fraction of the image and the
/// range of aspect ratios (sampled log-uniformly).
const ERASE_AREA: (f64, f64) = (0.02, 1.0 / 3.0);
const ERASE_ASPECT: (f64, f64) = (0.3, 1.0 / 0.3);
/// Tries at a rectangle that fits before giving up on erasing this sample.
const ERASE_ATTEMPTS: usize = 10;

impl AugmentConfig {
    /// Normalisation only: no crop, no flip.
    pub fn normalize_only(mean: Vec<f32>, std: Vec<f32>) -> Self {
        AugmentConfig {
            pad: 0,
            hflip: false,
            erase_prob: 0.0,
            mean,
            std,
        }
    }

    /// The dataset's statistics (adapted to `channels`) and default flip, with `pad`.
    pub fn for_spec(spec: &DatasetSpec, channels: usize, pad: usize) -> Self {
        let (mean, std) = spec.normalization(channels);
        AugmentConfig {
            pad,
            hflip: spec.default_hflip(),
            erase_prob: 0.0,
            mean,
            std,
        }
    }

    /// The same normalisation with the random parts turned off (for evaluation).
    pub fn deterministic(&self) -> Self {
        Self::normalize_only(self.mean.clone(), self.std.clone())
    }

    /// Whether any random transform is enabled.
    pub fn is_random(&self) -> bool {
        self.pad > 0 || self.hflip || self.erase_prob > 0.0
    }

    /// Checks the config against images with `channels` channels.
    pub fn validate(&self, channels: usize) -> Result<()> {
        if self.mean.len() != channels || self.std.len() != channels {
            return Err(Error::Invalid(format!(
                "normalisation has {} means and {} stds for {channels}-channel images",
                self.mean.len(),
                self.std.len()
            )));
        }
        if let Some(s) = self.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(Error::Invalid(format!(
                "normalisation std must be positive and finite, got {s}"
            )));
        }
        if !(0.0..=1.0).contains(&self.erase_prob) {
            return Err(Error::Invalid(format!(
                "random-erasing probability must be in [0, 1], got {}",
                self.erase_prob
            )));
        }
        if let Some(m) = self.mean.iter().find(|m| !m.is_finite()) {
            return Err(Error::Invalid(format!(
                "normalisation mean {m} is not finite"
            )));
        }
        Ok(())
    }

    /// The random choices for sample `index` in `epoch` under `seed` for a `h`×`w`
    /// image. Identical inputs give identical choices on any thread or platform; the
    /// crop and flip do not depend on whether erasing is on.
    pub fn draw(
        &self,
        seed: u64,
        epoch: u64,
        index: usize,
        (h, w): (usize, usize),
    ) -> AugmentParams {
        if !self.is_random() {
            return AugmentParams::default();
        }
        let mut rng = keyed_rng(STREAM_AUGMENT, seed, epoch, index as u64);
        let mut p = AugmentParams::default();
        if self.pad > 0 {
            let span = 2 * self.pad as u64 + 1;
            p.dy = below(&mut rng, span) as usize;
            p.dx = below(&mut rng, span) as usize;
        }
        if self.hflip {
            p.flip = coin(&mut rng);
        }
        if self.erase_prob > 0.0 && uniform(&mut rng) < self.erase_prob {
            p.erase = draw_erase(&mut rng, h, w);
        }
        p
    }

    /// Writes image `index` of `ds`, augmented for (`seed`, `epoch`) and normalised, into
    /// `out` (C×H×W, `ds.image_len()` values). The config must have been validated.
    pub fn apply(&self, ds: &Dataset, index: usize, seed: u64, epoch: u64, out: &mut [f32]) {
        let (_, h, w) = ds.image_shape();
        let params = self.draw(seed, epoch, index, (h, w));
        self.apply_params(ds.image(index), ds.image_shape(), params, out);
    }

    /// Like [`apply`](Self::apply) but returns a new vector.
    pub fn augment(&self, ds: &Dataset, index: usize, seed: u64, epoch: u64) -> Vec<f32> {
        let mut out = vec![0.0; ds.image_len()];
        self.apply(ds, index, seed, epoch, &mut out);
        out
    }

    /// Applies given choices to one C×H×W image: output pixel (y, x) is padded-image pixel
    /// (y + dy, x' + dx) with x' = W-1-x when flipped, x otherwise; outside the original
    /// image it is 0. Then normalises, then fills the erased rectangle (if any) with
    /// standard-normal noise, channel by channel, row by row.
    pub fn apply_params(
        &self,
        image: &[u8],
        (c, h, w): (usize, usize, usize),
        p: AugmentParams,
        out: &mut [f32],
    ) {
        let pad = self.pad;
        for ch in 0..c {
            let scale = 1.0 / (255.0 * self.std[ch]);
            let shift = self.mean[ch] / self.std[ch];
            let src = &image[ch * h * w..(ch + 1) * h * w];
            let dst = &mut out[ch * h * w..(ch + 1) * h * w];
            for y in 0..h {
                // Source row in the unpadded image, if inside it.
                let sy = (y + p.dy).checked_sub(pad).filter(|&sy| sy < h);
                for x in 0..w {
                    let xx = if p.flip { w - 1 - x } else { x };
                    let sx = (xx + p.dx).checked_sub(pad).filter(|&sx| sx < w);
                    let v = match (sy, sx) {
                        (Some(sy), Some(sx)) => f32::from(src[sy * w + sx]),
                        _ => 0.0,
                    };
                    dst[y * w + x] = v * scale - shift;
                }
            }
        }
        if let Some(e) = p.erase {
            let mut rng = keyed_rng(STREAM_AUGMENT, e.noise_seed, 0, 0);
            for ch in 0..c {
                for y in e.top..e.top + e.h {
                    let row = (ch * h + y) * w;
                    for v in &mut out[row + e.left..row + e.left + e.w] {
                        *v = standard_normal(&mut rng);
                    }
                }
            }
        }
    }
}

/// timm's `RandomErasing._erase` rectangle for an `h`×`w` image: up to ten tries at a
/// target area and log-uniform aspect ratio that fits strictly inside the image.
fn draw_erase<R: Rng>(rng: &mut R, h: usize, w: usize) -> Option<Erase> {
    let area = (h * w) as f64;
    let (lo, hi) = (ERASE_ASPECT.0.ln(), ERASE_ASPECT.1.ln());
    for _ in 0..ERASE_ATTEMPTS {
        let target = (ERASE_AREA.0 + (ERASE_AREA.1 - ERASE_AREA.0) * uniform(rng)) * area;
        let aspect = (lo + (hi - lo) * uniform(rng)).exp();
        let eh = (target * aspect).sqrt().round() as usize;
        let ew = (target / aspect).sqrt().round() as usize;
        if eh > 0 && ew > 0 && eh < h && ew < w {
            let top = below(rng, (h - eh + 1) as u64) as usize;
            let left = below(rng, (w - ew + 1) as u64) as usize;
            return Some(Erase {
                top,
                left,
                h: eh,
                w: ew,
                noise_seed: rng.next_u64(),
            });
        }
    }
    None
}

/// A standard-normal `f32` (Box–Muller on two uniforms).
fn standard_normal<R: Rng>(rng: &mut R) -> f32 {
    let u1 = 1.0 - uniform(rng); // (0, 1]: ln is finite
    let u2 = uniform(rng);
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One 1×3×4 image with values 1..=12 row-major.
    fn tiny() -> Dataset {
        Dataset::new((1..=12).collect(), vec![0], 1, 3, 4, vec!["a".into()]).unwrap()
    }

    /// Config mapping pixel v to exactly v (mean 0, std 1/255).
    fn identity(pad: usize, hflip: bool) -> AugmentConfig {
        AugmentConfig {
            pad,
            hflip,
            erase_prob: 0.0,
            mean: vec![0.0],
            std: vec![1.0 / 255.0],
        }
    }

    fn run(cfg: &AugmentConfig, p: AugmentParams) -> Vec<f32> {
        let ds = tiny();
        let mut out = vec![f32::NAN; 12];
        cfg.apply_params(ds.image(0), ds.image_shape(), p, &mut out);
        out.iter().map(|v| v.round()).collect()
    }

    #[test]
    fn no_augmentation_is_identity() {
        let out = run(&identity(0, false), AugmentParams::default());
        assert_eq!(out, (1..=12).map(|v| v as f32).collect::<Vec<_>>());
    }

    #[test]
    fn flip_mirrors_rows() {
        let p = AugmentParams {
            flip: true,
            ..Default::default()
        };
        let out = run(&identity(0, true), p);
        assert_eq!(out, vec![4., 3., 2., 1., 8., 7., 6., 5., 12., 11., 10., 9.]);
    }

    #[test]
    fn crop_shifts_with_zero_fill() {
        // pad 1, offset (0, 0): content moves down-right by one, zeros enter top/left.
        let p = AugmentParams {
            dy: 0,
            dx: 0,
            flip: false,
            ..Default::default()
        };
        let out = run(&identity(1, false), p);
        assert_eq!(out, vec![0., 0., 0., 0., 0., 1., 2., 3., 0., 5., 6., 7.]);
        // Offset (2, 2): content moves up-left by one.
        let p = AugmentParams {
            dy: 2,
            dx: 2,
            flip: false,
            ..Default::default()
        };
        let out = run(&identity(1, false), p);
        assert_eq!(out, vec![6., 7., 8., 0., 10., 11., 12., 0., 0., 0., 0., 0.]);
        // Centre offset is the identity.
        let p = AugmentParams {
            dy: 1,
            dx: 1,
            flip: false,
            ..Default::default()
        };
        assert_eq!(
            run(&identity(1, false), p),
            (1..=12).map(|v| v as f32).collect::<Vec<_>>()
        );
        // Crop then flip: row 1 of the (2,2) crop is [10, 11, 12, 0] mirrored.
        let p = AugmentParams {
            dy: 2,
            dx: 2,
            flip: true,
            ..Default::default()
        };
        let out = run(&identity(1, true), p);
        assert_eq!(out[4..8], [0., 12., 11., 10.]);
    }

    #[test]
    fn normalisation_values() {
        let ds = Dataset::new(vec![0, 255, 51, 102], vec![0], 2, 1, 2, vec!["a".into()]).unwrap();
        let cfg = AugmentConfig::normalize_only(vec![0.5, 0.2], vec![0.25, 0.4]);
        cfg.validate(2).unwrap();
        let out = cfg.augment(&ds, 0, 1, 2);
        let expected = [
            (0.0 - 0.5) / 0.25,
            (1.0 - 0.5) / 0.25,
            (0.2 - 0.2) / 0.4,
            (0.4 - 0.2) / 0.4,
        ];
        for (o, e) in out.iter().zip(expected) {
            assert!((o - e).abs() < 1e-6, "{out:?} vs {expected:?}");
        }
        // Padding is black: (0 - mean) / std.
        let fm = AugmentConfig::for_spec(&DatasetSpec::FashionMnist, 1, 4);
        assert!(fm.hflip && fm.pad == 4);
        let padded = AugmentParams {
            dy: 0,
            dx: 0,
            flip: false,
            ..Default::default()
        };
        let mut out = vec![0.0; 12];
        fm.apply_params(tiny().image(0), (1, 3, 4), padded, &mut out);
        assert!((out[0] - (-0.2860 / 0.3530)).abs() < 1e-6);
    }

    #[test]
    fn draws_are_reproducible_and_vary() {
        let cfg = identity(4, true);
        assert_eq!(cfg.draw(7, 3, 11, (3, 4)), cfg.draw(7, 3, 11, (3, 4)));
        let all: Vec<AugmentParams> = (0..200).map(|i| cfg.draw(7, 3, i, (3, 4))).collect();
        assert!(all.iter().all(|p| p.dy <= 8 && p.dx <= 8));
        assert!(all.iter().any(|p| p.flip) && all.iter().any(|p| !p.flip));
        assert!(all.iter().any(|p| p.dy == 0) && all.iter().any(|p| p.dy == 8));
        let other_epoch: Vec<AugmentParams> = (0..200).map(|i| cfg.draw(7, 4, i, (3, 4))).collect();
        assert_ne!(all, other_epoch);
        let other_seed: Vec<AugmentParams> = (0..200).map(|i| cfg.draw(8, 3, i, (3, 4))).collect();
        assert_ne!(all, other_seed);
        // Augmenting a fixed sample twice gives the same floats.
        let ds = tiny();
        assert_eq!(cfg.augment(&ds, 0, 5, 1), cfg.augment(&ds, 0, 5, 1));
        // Deterministic config ignores the seed.
        assert_eq!(
            cfg.deterministic().draw(1, 2, 3, (3, 4)),
            AugmentParams::default()
        );
    }

    #[test]
    fn erasing_fills_one_rectangle_with_noise() {
        let mut cfg = identity(2, true);
        let (h, w) = (28, 28);
        let plain: Vec<AugmentParams> = (0..400).map(|i| cfg.draw(3, 1, i, (h, w))).collect();
        cfg.erase_prob = 0.25;
        let erased: Vec<AugmentParams> = (0..400).map(|i| cfg.draw(3, 1, i, (h, w))).collect();
        // Turning erasing on leaves every crop and flip as it was.
        for (a, b) in plain.iter().zip(&erased) {
            assert_eq!((a.dy, a.dx, a.flip), (b.dy, b.dx, b.flip));
        }
        let rects: Vec<Erase> = erased.iter().filter_map(|p| p.erase).collect();
        // About a quarter of the samples (400 * 0.25 = 100; timm's tries rarely all fail).
        assert!((70..=130).contains(&rects.len()), "{} erased", rects.len());
        for r in &rects {
            assert!(r.h >= 1 && r.w >= 1 && r.top + r.h <= h && r.left + r.w <= w);
            let frac = (r.h * r.w) as f64 / (h * w) as f64;
            assert!((0.005..=0.45).contains(&frac), "area fraction {frac}");
        }
        assert!(rects.iter().any(|r| r.h > r.w) && rects.iter().any(|r| r.w > r.h));
        // Applying: outside the rectangle, the plain result; inside, noise with unit scale.
        let img: Vec<u8> = (0..h * w).map(|i| (i % 251) as u8).collect();
        let i = erased.iter().position(|p| p.erase.is_some()).unwrap();
        let p = erased[i];
        let r = p.erase.unwrap();
        let mut with = vec![0.0; h * w];
        let mut without = vec![0.0; h * w];
        cfg.apply_params(&img, (1, h, w), p, &mut with);
        let plain_p = AugmentParams { erase: None, ..p };
        cfg.apply_params(&img, (1, h, w), plain_p, &mut without);
        let mut noise = Vec::new();
        for y in 0..h {
            for x in 0..w {
                let inside =
                    (r.top..r.top + r.h).contains(&y) && (r.left..r.left + r.w).contains(&x);
                if inside {
                    noise.push(with[y * w + x]);
                } else {
                    assert_eq!(with[y * w + x], without[y * w + x]);
                }
            }
        }
        let n = noise.len() as f32;
        let mean = noise.iter().sum::<f32>() / n;
        let var = noise.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n;
        assert!(
            noise.len() >= 10 && mean.abs() < 0.6 && (0.3..3.0).contains(&var),
            "{mean} {var}"
        );
        // Same choices, same floats.
        let mut again = vec![0.0; h * w];
        cfg.apply_params(&img, (1, h, w), p, &mut again);
        assert_eq!(with, again);
    }

    #[test]
    fn validate_rejects_bad_stats() {
        assert!(identity(0, false).validate(3).is_err());
        assert!(AugmentConfig::normalize_only(vec![0.5], vec![0.0])
            .validate(1)
            .is_err());
        assert!(AugmentConfig::normalize_only(vec![f32::NAN], vec![1.0])
            .validate(1)
            .is_err());
        let mut cfg = identity(0, false);
        cfg.erase_prob = 1.5;
        assert!(cfg.validate(1).is_err());
    }
}
