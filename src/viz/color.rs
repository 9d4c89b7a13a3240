//! Perceptual colormaps (viridis, inferno, magma, plasma from `colorous`), value ranges and
//! the mapping from a value to a colour that every picture shares.

use std::str::FromStr;

use image::Rgb;

use crate::{Error, Result};

/// A sequential, perceptually uniform colormap: low values dark, high values bright.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Colormap {
    /// Blue-purple to green to yellow (matplotlib's default).
    #[default]
    Viridis,
    /// Black to purple to orange to pale yellow.
    Inferno,
    /// Black to purple to pink to pale yellow.
    Magma,
    /// Blue to purple to orange to yellow.
    Plasma,
}

/// The colour of values that are not finite (NaN, ±∞): mid grey.
pub const MISSING: Rgb<u8> = Rgb([128, 128, 128]);

impl Colormap {
    /// All colormaps, in the order of [`Colormap::name`]s listed in errors.
    pub const ALL: [Colormap; 4] = [
        Colormap::Viridis,
        Colormap::Inferno,
        Colormap::Magma,
        Colormap::Plasma,
    ];

    /// The lower-case name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Colormap::Viridis => "viridis",
            Colormap::Inferno => "inferno",
            Colormap::Magma => "magma",
            Colormap::Plasma => "plasma",
        }
    }

    fn gradient(self) -> colorous::Gradient {
        match self {
            Colormap::Viridis => colorous::VIRIDIS,
            Colormap::Inferno => colorous::INFERNO,
            Colormap::Magma => colorous::MAGMA,
            Colormap::Plasma => colorous::PLASMA,
        }
    }

    /// The colour at position `t` in `[0, 1]` (clamped); a non-finite `t` gives [`MISSING`].
    pub fn color(self, t: f32) -> Rgb<u8> {
        if !t.is_finite() {
            return MISSING;
        }
        let c = self.gradient().eval_continuous(t.clamp(0.0, 1.0) as f64);
        Rgb([c.r, c.g, c.b])
    }

    /// The colour of `v` on a scale from `lo` (bottom colour) to `hi` (top colour).
    pub fn color_in(self, v: f32, lo: f32, hi: f32) -> Rgb<u8> {
        self.color(unit(v, lo, hi))
    }
}

impl FromStr for Colormap {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        Colormap::ALL
            .into_iter()
            .find(|c| c.name() == lower)
            .ok_or_else(|| Error::Unknown {
                kind: "colormap",
                name: s.to_string(),
                hint: " (known: viridis, inferno, magma, plasma)".to_string(),
            })
    }
}

/// `v` mapped linearly from `[lo, hi]` to `[0, 1]` (not clamped; NaN stays NaN).
pub(crate) fn unit(v: f32, lo: f32, hi: f32) -> f32 {
    if hi > lo {
        (v - lo) / (hi - lo)
    } else {
        0.5
    }
}

/// The range a scale should span: `range` if given, otherwise the minimum and maximum of
/// the finite values. An empty or constant range is widened by 0.5 on each side so that
/// every picture has a proper colour bar.
pub(crate) fn value_range(values: &[f32], range: Option<(f32, f32)>) -> (f32, f32) {
    let (lo, hi) = range.unwrap_or_else(|| {
        values
            .iter()
            .filter(|v| v.is_finite())
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            })
    });
    if !(lo.is_finite() && hi.is_finite()) {
        (0.0, 1.0)
    } else if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    }
}

/// Relative luminance in `[0, 1]` (sRGB weights), to choose black or white text on a colour.
pub(crate) fn luminance(c: Rgb<u8>) -> f32 {
    (0.2126 * c[0] as f32 + 0.7152 * c[1] as f32 + 0.0722 * c[2] as f32) / 255.0
}

/// Ten distinct colours for line series (Tableau 10).
pub(crate) fn category(i: usize) -> Rgb<u8> {
    let c = colorous::TABLEAU10[i % colorous::TABLEAU10.len()];
    Rgb([c.r, c.g, c.b])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colormap_endpoints() {
        // viridis runs from #440154 to #fde725, inferno from #000004 to #fcffa4.
        assert_eq!(Colormap::Viridis.color(0.0), Rgb([0x44, 0x01, 0x54]));
        assert_eq!(Colormap::Viridis.color(1.0), Rgb([0xfd, 0xe7, 0x25]));
        assert_eq!(Colormap::Inferno.color(0.0), Rgb([0x00, 0x00, 0x04]));
        assert_eq!(Colormap::Inferno.color(1.0), Rgb([0xfc, 0xff, 0xa4]));
        // Out of range clamps; NaN is grey.
        assert_eq!(Colormap::Viridis.color(7.0), Colormap::Viridis.color(1.0));
        assert_eq!(Colormap::Viridis.color(-1.0), Colormap::Viridis.color(0.0));
        assert_eq!(Colormap::Viridis.color(f32::NAN), MISSING);
        assert_eq!(
            Colormap::Inferno.color_in(5.0, 1.0, 5.0),
            Colormap::Inferno.color(1.0)
        );
    }

    #[test]
    fn names_and_ranges() {
        for c in Colormap::ALL {
            assert_eq!(c.name().parse::<Colormap>().unwrap(), c);
        }
        assert_eq!("Inferno".parse::<Colormap>().unwrap(), Colormap::Inferno);
        assert!(matches!(
            "jet".parse::<Colormap>(),
            Err(Error::Unknown { .. })
        ));
        assert_eq!(value_range(&[3.0, f32::NAN, -1.0], None), (-1.0, 3.0));
        assert_eq!(value_range(&[2.0, 2.0], None), (1.5, 2.5));
        assert_eq!(value_range(&[], None), (0.0, 1.0));
        assert_eq!(value_range(&[5.0], Some((-1.0, 1.0))), (-1.0, 1.0));
    }
}
