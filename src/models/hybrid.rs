//! The hybrid ViT's convolutional front (Dosovitskiy et al. 2020, §3.1 "Hybrid
//! Architecture"; timm's `HybridEmbed` over its `ResNetV2`): a ResNet-v2 (BiT) backbone of
//! weight-standardised convolutions with "SAME" padding and GroupNorm turns the image into a
//! feature map, and a P×P projection (1×1 in the paper) turns each cell into a token. The
//! ViT (`vit.rs`) takes it in place of its patch embedding when its config names a
//! `backbone`; everything after the tokens is the plain ViT.
//!
//! The backbone runs channels last (B, H, W, C), so the map's cells come out as tokens in
//! row-major order without a transpose. Names are timm's: `patch_embed.backbone.stem.conv`,
//! `patch_embed.backbone.stages.{s}.blocks.{b}.{downsample.conv,conv1,norm1,…}`, and without
//! stages (timm's `vit_tiny_r_s16_p8_224`) the stem's layers straight under
//! `patch_embed.backbone`.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::layers::{GroupNorm, StdConv2d};
use crate::{ops, Error, Result};

/// The backbone's stem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stem {
    /// timm `stem_type='same'` (the paper's R50): a 7×7 stride-2 convolution, GroupNorm +
    /// ReLU, a 3×3 stride-2 max-pool.
    Same,
    /// timm `stem_type='deep_same'`: three 3×3 convolutions (stride 2, 1, 1; widths C/2,
    /// C/2, C), each with GroupNorm + ReLU, then the max-pool. Our small-image presets' stem.
    DeepSame,
}

fn default_stem() -> Stem {
    Stem::Same
}
fn default_stem_channels() -> usize {
    64
}
fn default_stage_channels() -> Vec<usize> {
    vec![256, 512, 1024, 2048]
}
fn default_norm_groups() -> usize {
    GroupNorm::GROUPS
}

/// The CNN in front of a hybrid ViT: timm's `ResNetV2(preact=False)` with `StdConv2dSame`
/// and GroupNorm (32 groups), without its head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HybridBackbone {
    /// Bottleneck blocks in each stage (timm `layers`: [3, 4, 9] for R50's first three
    /// stages, [2, 2, 2, 2] for R26); empty for the stem alone. The first stage keeps the
    /// stem's resolution, each later one halves it.
    #[serde(default)]
    pub layers: Vec<usize>,
    /// "same" (default) or "deep_same".
    #[serde(default = "default_stem")]
    pub stem: Stem,
    /// The stem's output width. Default 64.
    #[serde(default = "default_stem_channels")]
    pub stem_channels: usize,
    /// Each stage's output width (its bottleneck width is a quarter); the first
    /// `layers.len()` are used. Default [256, 512, 1024, 2048].
    #[serde(default = "default_stage_channels")]
    pub channels: Vec<usize>,
    /// Groups of every GroupNorm (timm's `norm_layer=partial(GroupNormAct, num_groups=…)`).
    /// Default 32.
    #[serde(default = "default_norm_groups")]
    pub norm_groups: usize,
}

/// A stem convolution: (conv name, norm name, out channels, in channels, kernel, stride).
pub type StemLayer = (&'static str, &'static str, usize, usize, usize, usize);

/// One tensor-producing step of the backbone, in timm's module order.
#[derive(Debug, Clone, PartialEq)]
enum Unit {
    /// A weight-standardised k×k convolution.
    Conv {
        name: String,
        c_out: usize,
        c_in: usize,
        k: usize,
        stride: usize,
    },
    /// A GroupNorm's weight and bias.
    Norm { name: String, c: usize },
    /// The stem's 3×3 stride-2 max-pool.
    Pool,
}

impl HybridBackbone {
    /// A backbone of `layers` bottleneck stages on the usual 7×7 stem, timm's widths.
    pub fn resnetv2(layers: &[usize]) -> Self {
        HybridBackbone {
            layers: layers.to_vec(),
            stem: Stem::Same,
            stem_channels: 64,
            channels: default_stage_channels(),
            norm_groups: GroupNorm::GROUPS,
        }
    }

    /// Checks the numbers fit together; every error names the fields (under `backbone.`).
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(format!("backbone: {msg}")));
        if self.layers.len() > 4 {
            return bad(format!(
                "layers lists {} stages, at most 4",
                self.layers.len()
            ));
        }
        if self.channels.len() < self.layers.len() {
            return bad(format!(
                "channels gives {} widths for {} stages",
                self.channels.len(),
                self.layers.len()
            ));
        }
        if let Some(&n) = self.layers.iter().find(|&&n| !(1..=64).contains(&n)) {
            return bad(format!("a stage of {n} blocks; each has 1 to 64"));
        }
        if let Some(&c) = std::iter::once(&self.stem_channels)
            .chain(&self.channels)
            .find(|&&c| c % 8 != 0)
        {
            return bad(format!(
                "a width of {c}: stem_channels and channels must be multiples of 8 (timm \
                 rounds them so)"
            ));
        }
        let g = self.norm_groups;
        if g == 0 || g > 1 << 14 {
            return bad(format!("norm_groups is {g}, not in 1 to {}", 1 << 14));
        }
        let widths = self.norm_widths();
        if let Some(&c) = widths
            .iter()
            .find(|&&c| c == 0 || c > 1 << 14 || c % g != 0)
        {
            return bad(format!(
                "a GroupNorm over {c} channels: stem_channels{} and channels (and their \
                 quarters, the bottleneck widths) must be positive multiples of norm_groups \
                 ({g}) up to {}",
                if self.stem == Stem::DeepSame {
                    " (and its half, the deep stem's width)"
                } else {
                    ""
                },
                1 << 14
            ));
        }
        Ok(())
    }

    /// Every width a GroupNorm normalises.
    fn norm_widths(&self) -> Vec<usize> {
        self.units(1)
            .into_iter()
            .filter_map(|u| match u {
                Unit::Norm { c, .. } => Some(c),
                _ => None,
            })
            .collect()
    }

    /// The feature map's channels: the last stage's width, or the stem's.
    pub fn feature_dim(&self) -> usize {
        match self.layers.len() {
            0 => self.stem_channels,
            s => self.channels[s - 1],
        }
    }

    /// The feature map's (rows, columns) for an image of [h, w]: every stride-2 step rounds up.
    pub fn feature_size(&self, [h, w]: [usize; 2]) -> (usize, usize) {
        self.units(1).iter().fold((h, w), |(h, w), u| match u {
            Unit::Conv { stride, .. } if stride_taken(u) => {
                (h.div_ceil(*stride), w.div_ceil(*stride))
            }
            Unit::Pool => (h.div_ceil(2), w.div_ceil(2)),
            _ => (h, w),
        })
    }

    /// The backbone's tensors under `prefix` (timm's `patch_embed.backbone`), in timm's
    /// state-dict order.
    pub fn param_shapes(&self, prefix: &str, in_channels: usize) -> Vec<(String, Vec<usize>)> {
        let mut p = Vec::new();
        for u in self.units(in_channels) {
            match u {
                Unit::Conv {
                    name,
                    c_out,
                    c_in,
                    k,
                    ..
                } => p.push((format!("{prefix}.{name}.weight"), vec![c_out, c_in, k, k])),
                Unit::Norm { name, c } => {
                    p.push((format!("{prefix}.{name}.weight"), vec![c]));
                    p.push((format!("{prefix}.{name}.bias"), vec![c]));
                }
                Unit::Pool => {}
            }
        }
        p
    }

    /// Forward FLOPs of the convolutions for one [h, w] image (a multiply-add counts 2), or
    /// `None` beyond a u64.
    pub fn flops(&self, in_channels: usize, [h, w]: [usize; 2]) -> Option<u64> {
        let (mut h, mut w) = (h, w);
        let mut total = 0u64;
        for u in self.units(in_channels) {
            match &u {
                Unit::Conv {
                    c_out,
                    c_in,
                    k,
                    stride,
                    ..
                } => {
                    // A shortcut's input is its block's, the main path's current size.
                    let (oh, ow) = (h.div_ceil(*stride), w.div_ceil(*stride));
                    let f = super::mul_add_flops(&[oh, ow, *c_out, *c_in, k * k])?;
                    total = total.checked_add(f)?;
                    if stride_taken(&u) {
                        (h, w) = (oh, ow);
                    }
                }
                Unit::Pool => (h, w) = (h.div_ceil(2), w.div_ceil(2)),
                Unit::Norm { .. } => {}
            }
        }
        Some(total)
    }

    /// The backbone's part of `vit info`'s shape flow: (step, [C, H, W]).
    pub fn shape_flow(&self, image: [usize; 2]) -> Vec<(String, Vec<usize>)> {
        let stem = match self.stem {
            Stem::Same => "stem (7x7/2 conv, max-pool/2)",
            Stem::DeepSame => "stem (3 3x3 convs, max-pool/2)",
        };
        let stem_only = HybridBackbone {
            layers: vec![],
            ..self.clone()
        };
        let mut size = stem_only.feature_size(image);
        let mut flow = vec![(stem.to_string(), vec![self.stem_channels, size.0, size.1])];
        for (s, &n) in self.layers.iter().enumerate() {
            if s > 0 {
                size = (size.0.div_ceil(2), size.1.div_ceil(2));
            }
            flow.push((
                format!("stage {s} ({n} bottlenecks)"),
                vec![self.channels[s], size.0, size.1],
            ));
        }
        flow
    }

    /// Where the stem's tensors are under the backbone: without stages timm's backbone is
    /// the stem itself, with them it is `stem`.
    pub fn stem_prefix(&self) -> &'static str {
        if self.layers.is_empty() {
            ""
        } else {
            "stem."
        }
    }

    /// The stem's convolutions in order, each followed by GroupNorm + ReLU: (conv name, norm
    /// name, out channels, in channels, kernel, stride).
    pub fn stem_layers(&self, in_channels: usize) -> Vec<StemLayer> {
        let c = self.stem_channels;
        match self.stem {
            Stem::Same => vec![("conv", "norm", c, in_channels, 7, 2)],
            Stem::DeepSame => vec![
                ("conv1", "norm1", c / 2, in_channels, 3, 2),
                ("conv2", "norm2", c / 2, c / 2, 3, 1),
                ("conv3", "norm3", c, c / 2, 3, 1),
            ],
        }
    }

    /// The stride of block `b` of stage `s`: 2 in the first block of every stage after the
    /// first (its 3×3 convolution and its shortcut), else 1.
    pub fn block_stride(s: usize, b: usize) -> usize {
        if s > 0 && b == 0 {
            2
        } else {
            1
        }
    }

    /// The backbone's units in timm's module order.
    fn units(&self, in_channels: usize) -> Vec<Unit> {
        let conv = |name: String, c_out, c_in, k, stride| Unit::Conv {
            name,
            c_out,
            c_in,
            k,
            stride,
        };
        let norm = |name: String, c| Unit::Norm { name, c };
        let sp = self.stem_prefix();
        let mut u = Vec::new();
        for (cn, nn, c_out, c_in, k, stride) in self.stem_layers(in_channels) {
            u.push(conv(format!("{sp}{cn}"), c_out, c_in, k, stride));
            u.push(norm(format!("{sp}{nn}"), c_out));
        }
        u.push(Unit::Pool);
        let mut prev = self.stem_channels;
        for (s, &n) in self.layers.iter().enumerate() {
            let out = self.channels[s];
            let mid = bottleneck_width(out);
            for b in 0..n {
                let p = format!("stages.{s}.blocks.{b}");
                let stride = Self::block_stride(s, b);
                if b == 0 {
                    u.push(conv(format!("{p}.downsample.conv"), out, prev, 1, stride));
                    u.push(norm(format!("{p}.downsample.norm"), out));
                }
                u.push(conv(format!("{p}.conv1"), mid, prev, 1, 1));
                u.push(norm(format!("{p}.norm1"), mid));
                u.push(conv(format!("{p}.conv2"), mid, mid, 3, stride));
                u.push(norm(format!("{p}.norm2"), mid));
                u.push(conv(format!("{p}.conv3"), out, mid, 1, 1));
                u.push(norm(format!("{p}.norm3"), out));
                prev = out;
            }
        }
        u
    }
}

/// A bottleneck's inner width for output width `out`: a quarter, rounded to a multiple of 8
/// (at least 8) as timm's `make_divisible` rounds it.
fn bottleneck_width(out: usize) -> usize {
    let v = out as f64 / 4.0;
    let rounded = (((v + 4.0) as usize) / 8 * 8).max(8);
    if (rounded as f64) < 0.9 * v {
        rounded + 8
    } else {
        rounded
    }
}

/// Whether a convolution's stride moves the main path's size (the shortcut's does not: its
/// block's `conv2` takes the same stride).
fn stride_taken(u: &Unit) -> bool {
    matches!(u, Unit::Conv { name, .. } if !name.ends_with("downsample.conv"))
}

/// A convolution and its GroupNorm (with ReLU unless it feeds a residual sum).
#[derive(Debug, Clone)]
struct ConvNorm {
    conv: StdConv2d,
    norm: GroupNorm,
}

impl ConvNorm {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: &VarBuilder,
        conv: &str,
        norm: &str,
        c_out: usize,
        c_in: usize,
        k: usize,
        stride: usize,
        relu: bool,
        groups: usize,
    ) -> Result<Self> {
        Ok(ConvNorm {
            conv: StdConv2d::new(&vb.pp(conv), c_out, c_in, k, stride)?,
            norm: GroupNorm::new(&vb.pp(norm), c_out, groups, relu)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(&self.conv.forward(x)?)
    }
}

/// ResNet v1.5's bottleneck as ResNetV2 builds it without pre-activation: 1×1 down to a
/// quarter, 3×3 (with the stage's stride), 1×1 back up, added to the shortcut, ReLU.
#[derive(Debug, Clone)]
struct Bottleneck {
    downsample: Option<ConvNorm>,
    conv1: ConvNorm,
    conv2: ConvNorm,
    conv3: ConvNorm,
}

impl Bottleneck {
    fn new(
        vb: &VarBuilder,
        (c_in, c_out): (usize, usize),
        stride: usize,
        first: bool,
        g: usize,
    ) -> Result<Self> {
        let mid = bottleneck_width(c_out);
        let downsample = first
            .then(|| {
                let (conv, norm) = ("downsample.conv", "downsample.norm");
                ConvNorm::new(vb, conv, norm, c_out, c_in, 1, stride, false, g)
            })
            .transpose()?;
        Ok(Bottleneck {
            downsample,
            conv1: ConvNorm::new(vb, "conv1", "norm1", mid, c_in, 1, 1, true, g)?,
            conv2: ConvNorm::new(vb, "conv2", "norm2", mid, mid, 3, stride, true, g)?,
            conv3: ConvNorm::new(vb, "conv3", "norm3", c_out, mid, 1, 1, false, g)?,
        })
    }

    /// (B, H, W, C_in) → (B, H/s, W/s, C_out).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        let y = self.conv1.forward(x)?; // (B, H, W, C/4)
        let y = self.conv2.forward(&y)?; // (B, H/s, W/s, C/4)
        let y = self.conv3.forward(&y)?; // (B, H/s, W/s, C_out)
        ops::add_relu(&y, &shortcut)
    }
}

/// The backbone as a network.
#[derive(Debug, Clone)]
pub struct ResNetV2 {
    stem: Vec<ConvNorm>,
    stages: Vec<Vec<Bottleneck>>,
}

impl ResNetV2 {
    pub fn new(cfg: &HybridBackbone, in_channels: usize, vb: &VarBuilder) -> Result<Self> {
        let stem_vb = match cfg.stem_prefix() {
            "" => vb.clone(),
            p => vb.pp(p.trim_end_matches('.')),
        };
        let g = cfg.norm_groups;
        let stem = cfg
            .stem_layers(in_channels)
            .into_iter()
            .map(|(cn, nn, c_out, c_in, k, stride)| {
                ConvNorm::new(&stem_vb, cn, nn, c_out, c_in, k, stride, true, g)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut prev = cfg.stem_channels;
        let mut stages = Vec::new();
        for (s, &n) in cfg.layers.iter().enumerate() {
            let out = cfg.channels[s];
            let blocks = (0..n)
                .map(|b| {
                    let vb = vb.pp(format!("stages.{s}.blocks.{b}"));
                    let stride = HybridBackbone::block_stride(s, b);
                    let c_in = if b == 0 { prev } else { out };
                    Bottleneck::new(&vb, (c_in, out), stride, b == 0, g)
                })
                .collect::<Result<Vec<_>>>()?;
            stages.push(blocks);
            prev = out;
        }
        Ok(ResNetV2 { stem, stages })
    }

    /// Channels-last images (B, H, W, C) → the feature map (B, h, w, F).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.stem {
            x = layer.forward(&x)?;
        }
        let mut x = ops::max_pool_3x3_s2_same_after_relu(&x)?; // (B, H/4, W/4, C_stem)
        for block in self.stages.iter().flatten() {
            x = block.forward(&x)?;
        }
        Ok(x)
    }
}

/// timm's `HybridEmbed`: the backbone, then a P×P stride-P projection of its feature map to
/// D-wide tokens.
#[derive(Debug, Clone)]
pub struct HybridEmbed {
    pub backbone: ResNetV2,
    pub weight: Tensor, // (D, F, P, P), timm's `patch_embed.proj.weight`
    pub bias: Tensor,   // (D,)
    pub patch_size: usize,
}

impl HybridEmbed {
    /// Tensors under `vb` (timm's `patch_embed`): `backbone.*`, `proj.weight`, `proj.bias`.
    pub fn new(
        cfg: &HybridBackbone,
        vb: &VarBuilder,
        dim: usize,
        in_channels: usize,
        patch: usize,
    ) -> Result<Self> {
        let f = cfg.feature_dim();
        Ok(HybridEmbed {
            backbone: ResNetV2::new(cfg, in_channels, &vb.pp("backbone"))?,
            weight: vb.pp("proj").get((dim, f, patch, patch), "weight")?,
            bias: vb.pp("proj").get(dim, "bias")?,
            patch_size: patch,
        })
    }

    /// (B, C, H, W) → (B, N, D), the feature map's P×P cells in row-major order.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.permute((0, 2, 3, 1))?.contiguous()?; // (B, H, W, C)
        let map = self.backbone.forward(&x)?; // (B, h, w, F)
        let (b, h, w, f) = map.dims4()?;
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let cells = if p == 1 {
            map.reshape((b, h * w, f))? // (B, N, F)
        } else {
            map.reshape(vec![b, gh, p, gw, p, f])? // (B, gh, P, gw, P, F)
                .permute(vec![0, 1, 3, 5, 2, 4])? // (B, gh, gw, F, P, P)
                .reshape((b, gh * gw, f * p * p))? // (B, N, F·P·P)
        };
        let d = self.weight.dim(0)?;
        let w = self.weight.reshape((d, f * p * p))?;
        ops::linear(&cells, &w, Some(&self.bias)) // (B, N, D)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_sizes_round_up_as_same_padding_does() {
        let r50 = HybridBackbone::resnetv2(&[3, 4, 9]);
        assert_eq!(r50.feature_size([384, 384]), (24, 24));
        assert_eq!(r50.feature_size([225, 100]), (15, 7));
        assert_eq!(r50.feature_dim(), 1024);
        let stem = HybridBackbone::resnetv2(&[]);
        assert_eq!(stem.feature_size([224, 224]), (56, 56));
        assert_eq!(stem.feature_dim(), 64);
        let deep = HybridBackbone {
            stem: Stem::DeepSame,
            ..stem
        };
        assert_eq!(deep.feature_size([28, 28]), (7, 7));
        assert_eq!(deep.feature_size([32, 32]), (8, 8));
    }

    #[test]
    fn bottleneck_widths_round_as_timm() {
        // timm's make_divisible(out * 0.25): at least 8, multiples of 8.
        for (out, mid) in [(16, 8), (32, 8), (48, 16), (256, 64), (1024, 256), (40, 16)] {
            assert_eq!(bottleneck_width(out), mid, "{out}");
        }
    }

    #[test]
    fn widths_groupnorm_cannot_split_are_refused() {
        let mut cfg = HybridBackbone::resnetv2(&[2, 2]);
        assert!(cfg.validate().is_ok());
        cfg.channels[1] = 320; // bottleneck width 80: not a multiple of 32
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("GroupNorm over 80 channels"), "{e}");
        cfg.channels = vec![256];
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("1 widths for 2 stages"), "{e}");
    }
}
