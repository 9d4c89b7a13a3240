//! ResNet (He et al., 2015) as timm builds it: a stem (7×7 convolution with stride 2,
//! BatchNorm, ReLU, 3×3 max-pool with stride 2), four stages of residual blocks whose first
//! block halves the resolution (all but the first stage) through a strided convolution and a
//! 1×1 projection shortcut, global average pooling and a linear classifier `fc`. Basic
//! blocks (two 3×3 convolutions: ResNet-18/34) or bottlenecks (1×1, 3×3, 1×1 widening by 4:
//! ResNet-50). Parameter names are timm's (`conv1`, `bn1`, `layer{1..4}.{i}.conv1`, ...,
//! `downsample.{0,1}`, `fc`), so its state dicts load unchanged.
//!
//! For small images (28×28, 32×32) the stem is a 3×3 convolution with stride 1 and no pool
//! (`stem = "small"`, as CIFAR ResNets do), keeping the resolution the stages need.

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::layers::{normal, BatchNorm2d, Conv2d, DropPath, Linear, Mode};
use super::vit::check_indices;
use super::{Architecture, Classifier, Intermediates, ModelConfig, Preprocess, Preset};
use crate::{ops, Error, Result};

/// The residual block of every stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Block {
    /// Two 3×3 convolutions (ResNet-18, -34).
    Basic,
    /// 1×1 reduce, 3×3, 1×1 expand by 4 (ResNet-50 and deeper).
    Bottleneck,
}

impl Block {
    /// Output channels per unit of stage width.
    pub fn expansion(self) -> usize {
        match self {
            Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }
}

/// The stem in front of the stages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stem {
    /// 7×7 convolution with stride 2, then a 3×3 max-pool with stride 2 (ImageNet ResNets).
    #[default]
    Imagenet,
    /// 3×3 convolution with stride 1 and no pool (small images: CIFAR, Fashion-MNIST).
    Small,
}

fn default_widths() -> Vec<usize> {
    vec![64, 128, 256, 512]
}

fn default_stem_width() -> usize {
    64
}

/// A ResNet: input, classes, block kind, blocks per stage, stage widths, stem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    /// Input size as [height, width] in pixels.
    pub image_size: [usize; 2],
    /// Input channels: 3 for RGB, 1 for grayscale. Default 3.
    #[serde(default = "super::default_channels")]
    pub in_channels: usize,
    /// Classes of `fc`; 0 means no classifier (the model returns pooled features).
    pub num_classes: usize,
    pub block: Block,
    /// Blocks in each stage, e.g. [2, 2, 2, 2] for ResNet-18.
    pub layers: Vec<usize>,
    /// Width of each stage (a bottleneck's output is 4 times it). Default 64, 128, 256, 512.
    #[serde(default = "default_widths")]
    pub channels: Vec<usize>,
    /// Output channels of the stem convolution. Default 64.
    #[serde(default = "default_stem_width")]
    pub stem_width: usize,
    #[serde(default)]
    pub stem: Stem,
    /// Stochastic depth of the deepest block, linear from 0 over all blocks (timm).
    #[serde(default)]
    pub drop_path: f64,
}

impl ResNetConfig {
    /// timm's ResNet for ImageNet: 224×224×3, 1000 classes.
    pub fn timm(block: Block, layers: &[usize]) -> Self {
        ResNetConfig {
            image_size: [224, 224],
            in_channels: 3,
            num_classes: 1000,
            block,
            layers: layers.to_vec(),
            channels: default_widths(),
            stem_width: default_stem_width(),
            stem: Stem::Imagenet,
            drop_path: 0.0,
        }
    }

    /// The same blocks with the small-image stem.
    pub fn small(block: Block, layers: &[usize], size: usize, channels: usize) -> Self {
        ResNetConfig {
            image_size: [size, size],
            in_channels: channels,
            num_classes: 10,
            stem: Stem::Small,
            ..Self::timm(block, layers)
        }
    }

    /// Feature channels after the last stage.
    pub fn num_features(&self) -> usize {
        self.channels.last().copied().unwrap_or(0) * self.block.expansion()
    }

    /// (kernel, stride) of the stem convolution.
    fn stem_conv(&self) -> (usize, usize) {
        match self.stem {
            Stem::Imagenet => (7, 2),
            Stem::Small => (3, 1),
        }
    }

    /// Every block as (stage, index, input channels, stage width, stride, has a projection).
    fn blocks(&self) -> Vec<BlockSpec> {
        let mut out = Vec::new();
        let mut c_in = self.stem_width;
        for (s, (&n, &width)) in self.layers.iter().zip(&self.channels).enumerate() {
            let c_out = width * self.block.expansion();
            for i in 0..n {
                let stride = if i == 0 && s > 0 { 2 } else { 1 };
                out.push(BlockSpec {
                    name: format!("layer{}.{i}", s + 1),
                    stage: s,
                    c_in,
                    width,
                    c_out,
                    stride,
                    project: i == 0 && (stride != 1 || c_in != c_out),
                });
                c_in = c_out;
            }
        }
        out
    }

    /// Spatial size after the stem, then after each stage (a stride-2 step maps h to
    /// ⌈h/2⌉ for every kernel ResNet uses).
    fn sizes(&self) -> (Vec<(usize, usize)>, (usize, usize)) {
        let half = |(h, w): (usize, usize)| (h.div_ceil(2), w.div_ceil(2));
        let [h, w] = self.image_size;
        let stem = match self.stem {
            Stem::Imagenet => half((h, w)),
            Stem::Small => (h, w),
        };
        let mut size = match self.stem {
            Stem::Imagenet => half(stem),
            Stem::Small => stem,
        };
        let mut stages = Vec::new();
        for s in 0..self.layers.len() {
            if s > 0 {
                size = half(size);
            }
            stages.push(size);
        }
        (stages, stem)
    }

    /// FLOPs of convolutions and the classifier (a multiply-add counts 2); `None` beyond
    /// u64.
    fn checked_flops(&self) -> Option<u64> {
        let conv = |k: usize, c_in: usize, c_out: usize, (h, w): (usize, usize)| {
            [2, k * k, c_in, c_out, h, w]
                .iter()
                .try_fold(1u64, |acc, &x| acc.checked_mul(x as u64))
        };
        let (stages, stem_size) = self.sizes();
        let (k, _) = self.stem_conv();
        let mut total = conv(k, self.in_channels, self.stem_width, stem_size)?;
        for b in self.blocks() {
            let out = stages[b.stage];
            // A stride-2 block reads the previous stage's resolution.
            let input = if b.stride == 2 {
                stages[b.stage - 1]
            } else {
                out
            };
            let convs = match self.block {
                Block::Basic => [
                    conv(3, b.c_in, b.width, out)?,
                    conv(3, b.width, b.c_out, out)?,
                    0,
                ],
                Block::Bottleneck => [
                    conv(1, b.c_in, b.width, input)?,
                    conv(3, b.width, b.width, out)?,
                    conv(1, b.width, b.c_out, out)?,
                ],
            };
            let project = if b.project {
                conv(1, b.c_in, b.c_out, out)?
            } else {
                0
            };
            for f in convs.into_iter().chain([project]) {
                total = total.checked_add(f)?;
            }
        }
        let fc = (self.num_features() as u64).checked_mul(self.num_classes as u64)?;
        total.checked_add(fc.checked_mul(2)?)
    }
}

/// One residual block's place and widths.
struct BlockSpec {
    /// `layer{s}.{i}`.
    name: String,
    /// 0-based stage.
    stage: usize,
    c_in: usize,
    width: usize,
    c_out: usize,
    stride: usize,
    /// Whether the shortcut is a 1×1 convolution and BatchNorm (`downsample.{0,1}`).
    project: bool,
}

/// ImageNet's mean and std, bicubic, crop 0.95: the preprocessing of timm's default
/// ResNet weights (the `a1_in1k` recipe).
fn timm_pretrained(_: &ResNetConfig) -> Preprocess {
    Preprocess::imagenet(0.95)
}

/// timm's ResNets and our small-image variants.
pub const PRESETS: &[Preset<ResNetConfig>] = &[
    Preset {
        name: "resnet18",
        config: || ResNetConfig::timm(Block::Basic, &[2, 2, 2, 2]),
        pretrained: timm_pretrained,
    },
    Preset {
        name: "resnet34",
        config: || ResNetConfig::timm(Block::Basic, &[3, 4, 6, 3]),
        pretrained: timm_pretrained,
    },
    Preset {
        name: "resnet50",
        config: || ResNetConfig::timm(Block::Bottleneck, &[3, 4, 6, 3]),
        pretrained: timm_pretrained,
    },
    // ResNet-18 with the small stem for Fashion-MNIST / MNIST (28×28×1).
    Preset {
        name: "resnet18_fmnist",
        config: || ResNetConfig::small(Block::Basic, &[2, 2, 2, 2], 28, 1),
        pretrained: |c| Preprocess::vit_default(c.in_channels),
    },
    // The same for CIFAR-10 (32×32×3).
    Preset {
        name: "resnet18_cifar",
        config: || ResNetConfig::small(Block::Basic, &[2, 2, 2, 2], 32, 3),
        pretrained: |c| Preprocess::vit_default(c.in_channels),
    },
];

impl Architecture for ResNetConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        super::check_stages("layers", &self.layers, &[("channels", self.channels.len())])?;
        let widths = self.channels.iter().chain([&self.stem_width]);
        if let Some(&c) = widths.into_iter().find(|&&c| c == 0 || c > 1 << 13) {
            return bad(format!(
                "each width (channels, stem_width) must be in 1..=8192, got {c}"
            ));
        }
        if !(1..=1 << 10).contains(&self.in_channels) {
            return bad(format!(
                "in_channels must be in 1..=1024, got {}",
                self.in_channels
            ));
        }
        if self.num_classes > 1 << 20 {
            return bad(format!(
                "num_classes must be at most 1048576, got {}",
                self.num_classes
            ));
        }
        let [h, w] = self.image_size;
        if !(1..=1 << 14).contains(&h) || !(1..=1 << 14).contains(&w) {
            return bad(format!(
                "image_size {h}x{w} must be between 1 and 16384 a side"
            ));
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            return bad(format!(
                "drop_path must be in [0, 1), got {}",
                self.drop_path
            ));
        }
        if self.checked_flops().is_none() {
            return bad(format!(
                "image_size {h}x{w} with these widths needs more than 2^64 FLOPs per image"
            ));
        }
        Ok(())
    }
    super::input_and_classes_fields!();
    fn set_drop_path(&mut self, rate: f64) {
        self.drop_path = rate;
    }
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut p = Vec::new();
        let conv = |p: &mut Vec<_>, name: &str, c_out, c_in, k| {
            p.push((format!("{name}.weight"), vec![c_out, c_in, k, k]));
        };
        let bn = |p: &mut Vec<_>, name: &str, c| {
            for n in BatchNorm2d::param_names(name) {
                p.push((n, vec![c]));
            }
        };
        let (k, _) = self.stem_conv();
        conv(&mut p, "conv1", self.stem_width, self.in_channels, k);
        bn(&mut p, "bn1", self.stem_width);
        for b in self.blocks() {
            let n = &b.name;
            match self.block {
                Block::Basic => {
                    conv(&mut p, &format!("{n}.conv1"), b.width, b.c_in, 3);
                    bn(&mut p, &format!("{n}.bn1"), b.width);
                    conv(&mut p, &format!("{n}.conv2"), b.c_out, b.width, 3);
                    bn(&mut p, &format!("{n}.bn2"), b.c_out);
                }
                Block::Bottleneck => {
                    conv(&mut p, &format!("{n}.conv1"), b.width, b.c_in, 1);
                    bn(&mut p, &format!("{n}.bn1"), b.width);
                    conv(&mut p, &format!("{n}.conv2"), b.width, b.width, 3);
                    bn(&mut p, &format!("{n}.bn2"), b.width);
                    conv(&mut p, &format!("{n}.conv3"), b.c_out, b.width, 1);
                    bn(&mut p, &format!("{n}.bn3"), b.c_out);
                }
            }
            if b.project {
                conv(&mut p, &format!("{n}.downsample.0"), b.c_out, b.c_in, 1);
                bn(&mut p, &format!("{n}.downsample.1"), b.c_out);
            }
        }
        if self.num_classes > 0 {
            p.push((
                "fc.weight".into(),
                vec![self.num_classes, self.num_features()],
            ));
            p.push(("fc.bias".into(), vec![self.num_classes]));
        }
        p
    }
    /// The running mean and variance of every BatchNorm, beside its weight and bias.
    fn buffer_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.param_shapes()
            .into_iter()
            .filter_map(|(name, shape)| {
                let bn = name.strip_suffix(".weight").filter(|_| shape.len() == 1)?;
                Some(BatchNorm2d::buffer_names(bn).map(|n| (n, shape.clone())))
            })
            .flatten()
            .collect()
    }
    fn head_names(&self) -> Vec<&'static str> {
        vec!["fc"]
    }
    /// The stem, then each stage (timm's `forward_intermediates` feature levels).
    fn depth(&self) -> usize {
        self.layers.len() + 1
    }
    fn flops(&self) -> u64 {
        self.checked_flops().unwrap_or(u64::MAX)
    }
    fn shape_flow(&self) -> Vec<(String, Vec<usize>)> {
        let [h, w] = self.image_size;
        let (stages, (sh, sw)) = self.sizes();
        let (k, s) = self.stem_conv();
        let mut flow = vec![
            ("image".to_string(), vec![self.in_channels, h, w]),
            (
                format!("stem: conv {k}x{k}/{s} + BN + ReLU"),
                vec![self.stem_width, sh, sw],
            ),
        ];
        if self.stem == Stem::Imagenet {
            let (ph, pw) = (sh.div_ceil(2), sw.div_ceil(2));
            flow.push((
                "max-pool 3x3 stride 2".into(),
                vec![self.stem_width, ph, pw],
            ));
        }
        let kind = match self.block {
            Block::Basic => "basic",
            Block::Bottleneck => "bottleneck",
        };
        for (i, ((&n, &c), (h, w))) in self
            .layers
            .iter()
            .zip(&self.channels)
            .zip(stages)
            .enumerate()
        {
            flow.push((
                format!("layer{}: {n} {kind} blocks", i + 1),
                vec![c * self.block.expansion(), h, w],
            ));
        }
        flow.push(("global average pool".into(), vec![self.num_features()]));
        if self.num_classes > 0 {
            flow.push(("fc: logits".into(), vec![self.num_classes]));
        }
        flow
    }
    fn default_preprocess(&self) -> Preprocess {
        if self.in_channels == 3 {
            timm_pretrained(self)
        } else {
            Preprocess::vit_default(self.in_channels)
        }
    }
    /// timm's initialisation: convolutions Kaiming-normal (fan-out, ReLU gain), BatchNorm
    /// weight 1 and bias 0 except the last BatchNorm of each block, whose weight is 0 (each
    /// block starts as the identity; timm's `zero_init_last`), running mean 0 and variance
    /// 1, `fc` PyTorch's linear default (uniform ±1/√fan_in). From ChaCha8 seeded with
    /// `seed`.
    fn init_params(&self, seed: u64, dev: &Device) -> Result<Vec<(String, Tensor)>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let last_bn = match self.block {
            Block::Basic => ".bn2.weight",
            Block::Bottleneck => ".bn3.weight",
        };
        let fc_bound = 1.0 / (self.num_features() as f32).sqrt();
        let mut out = Vec::new();
        for (name, shape) in self.param_shapes().into_iter().chain(self.buffer_shapes()) {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if shape.len() == 4 {
                let fan_out = shape[0] * shape[2] * shape[3];
                let std = (2.0 / fan_out as f32).sqrt();
                (0..n).map(|_| normal(&mut rng) * std).collect()
            } else if name.starts_with("fc.") {
                (0..n)
                    .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * fc_bound)
                    .collect()
            } else if name.ends_with(last_bn) {
                vec![0.0; n]
            } else if name.ends_with(".weight") || name.ends_with(".running_var") {
                vec![1.0; n]
            } else {
                vec![0.0; n] // BatchNorm bias, running mean
            };
            out.push((name, Tensor::from_vec(values, shape, dev)?));
        }
        Ok(out)
    }
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Classifier>> {
        Ok(Box::new(ResNet::new(self, vb)?))
    }
}

/// A convolution and its BatchNorm.
#[derive(Debug, Clone)]
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl ConvBn {
    fn new(
        vb: &VarBuilder,
        conv: &str,
        bn: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
    ) -> Result<Self> {
        Ok(ConvBn {
            conv: Conv2d::new(&vb.pp(conv), c_out, c_in, k, stride)?,
            bn: BatchNorm2d::new(&vb.pp(bn), c_out)?,
        })
    }

    fn forward(&self, x: &Tensor, mode: &Mode) -> Result<Tensor> {
        self.bn.forward(&self.conv.forward(x)?, mode)
    }
}

/// A residual block: its convolutions (two for a basic block, three for a bottleneck),
/// the projection shortcut of a stage's first block, stochastic depth on the branch.
#[derive(Debug, Clone)]
struct ResBlock {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
    drop_path: DropPath,
}

impl ResBlock {
    fn new(cfg: &ResNetConfig, b: &BlockSpec, drop_path: f64, vb: &VarBuilder) -> Result<Self> {
        let vb = vb.pp(&b.name);
        let convs = match cfg.block {
            Block::Basic => vec![
                ConvBn::new(&vb, "conv1", "bn1", b.c_in, b.width, 3, b.stride)?,
                ConvBn::new(&vb, "conv2", "bn2", b.width, b.c_out, 3, 1)?,
            ],
            Block::Bottleneck => vec![
                ConvBn::new(&vb, "conv1", "bn1", b.c_in, b.width, 1, 1)?,
                ConvBn::new(&vb, "conv2", "bn2", b.width, b.width, 3, b.stride)?,
                ConvBn::new(&vb, "conv3", "bn3", b.width, b.c_out, 1, 1)?,
            ],
        };
        let downsample = if b.project {
            let v = vb.pp("downsample");
            Some(ConvBn::new(&v, "0", "1", b.c_in, b.c_out, 1, b.stride)?)
        } else {
            None
        };
        Ok(ResBlock {
            convs,
            downsample,
            drop_path: DropPath(drop_path),
        })
    }

    /// (B, H, W, C_in) → relu(branch(x) + shortcut(x)) (B, H/s, W/s, C_out).
    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let last = self.convs.len() - 1;
        let mut y = x.clone();
        for (i, cb) in self.convs.iter().enumerate() {
            y = cb.forward(&y, mode)?;
            if i < last {
                y = ops::relu(&y)?;
            }
        }
        let y = self.drop_path.forward(&y, mode)?;
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x, mode)?,
            None => x.clone(),
        };
        ops::add_relu(&y, &shortcut)
    }
}

/// The network of a [`ResNetConfig`].
#[derive(Debug, Clone)]
pub struct ResNet {
    cfg: ResNetConfig,
    stem: ConvBn,
    blocks: Vec<ResBlock>,
    /// Blocks per stage, to cut `blocks` into stages.
    stage_ends: Vec<usize>,
    fc: Option<Linear>,
}

impl ResNet {
    pub fn new(cfg: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (k, s) = cfg.stem_conv();
        let stem = ConvBn::new(&vb, "conv1", "bn1", cfg.in_channels, cfg.stem_width, k, s)?;
        let specs = cfg.blocks();
        let n = specs.len();
        let blocks = specs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let rate = if n > 1 {
                    cfg.drop_path * i as f64 / (n - 1) as f64
                } else {
                    cfg.drop_path
                };
                ResBlock::new(cfg, b, rate, &vb)
            })
            .collect::<Result<Vec<_>>>()?;
        let stage_ends = cfg
            .layers
            .iter()
            .scan(0, |end, &n| {
                *end += n;
                Some(*end)
            })
            .collect();
        let fc = if cfg.num_classes > 0 {
            Some(Linear::new(
                &vb.pp("fc"),
                cfg.num_classes,
                cfg.num_features(),
                true,
            )?)
        } else {
            None
        };
        Ok(ResNet {
            cfg: cfg.clone(),
            stem,
            blocks,
            stage_ends,
            fc,
        })
    }

    /// Images (B, C, H, W) → the stem's output after its ReLU, channels last
    /// (B, H', W', stem_width), before the pool. The network runs channels last from here
    /// on (the layout of the fused convolution, see `ops::conv2d_nhwc`).
    fn stem(&self, x: &Tensor, mode: &Mode) -> Result<Tensor> {
        super::check_images(x, &self.cfg)?;
        let x = x.permute((0, 2, 3, 1))?; // (B, H, W, C)
        ops::relu(&self.stem.forward(&x, mode)?)
    }

    /// Stage `s` (0-based) on `x`; the stem's pool in front of the first.
    fn stage(&self, s: usize, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let mut x = if s == 0 && self.cfg.stem == Stem::Imagenet {
            ops::max_pool_3x3_s2_after_relu(x)? // (B, ⌈H/2⌉, ⌈W/2⌉, C)
        } else {
            x.clone()
        };
        let start = if s == 0 { 0 } else { self.stage_ends[s - 1] };
        for block in &self.blocks[start..self.stage_ends[s]] {
            x = block.forward(&x, mode)?;
        }
        Ok(x)
    }
}

impl Classifier for ResNet {
    fn config(&self) -> ModelConfig {
        ModelConfig::Resnet(self.cfg.clone())
    }

    fn batch_norms(&self) -> Vec<&BatchNorm2d> {
        let blocks = self
            .blocks
            .iter()
            .flat_map(|b| b.convs.iter().chain(&b.downsample));
        std::iter::once(&self.stem)
            .chain(blocks)
            .map(|cb| &cb.bn)
            .collect()
    }

    /// Images → the last stage's feature map (B, C, h, w), channels first as timm's.
    fn forward_features_t(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let mut x = self.stem(x, mode)?;
        for s in 0..self.stage_ends.len() {
            x = self.stage(s, &x, mode)?;
        }
        Ok(x.permute((0, 3, 1, 2))?) // (B, C, h, w)
    }

    /// Feature map (B, C, h, w) → global average pool (B, C) → logits (B, classes).
    fn forward_head_t(&self, feats: &Tensor, _mode: &mut Mode) -> Result<Tensor> {
        let pooled = feats.mean((2, 3))?; // (B, C)
        match &self.fc {
            Some(fc) => fc.forward(&pooled),
            None => Ok(pooled),
        }
    }

    /// Logits and the feature maps of the levels listed in `indices`: 0 the stem (before
    /// its pool), 1.. the stages, as timm's `forward_intermediates`; no attention.
    fn forward_intermediates(&self, x: &Tensor, indices: &[usize]) -> Result<Intermediates> {
        check_indices(indices, self.cfg.depth())?;
        let mode = &mut Mode::Eval;
        let mut x = self.stem(x, mode)?;
        let mut levels = vec![x.clone()];
        for s in 0..self.stage_ends.len() {
            x = self.stage(s, &x, mode)?;
            levels.push(x.clone());
        }
        let logits = self.forward_head(&x.permute((0, 3, 1, 2))?)?;
        // The levels asked for, channels first as timm gives them: (B, C, h, w).
        let blocks = indices
            .iter()
            .map(|&i| levels[i].permute((0, 3, 1, 2))?.contiguous())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Intermediates {
            logits,
            blocks,
            attention: vec![],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};
    use candle_nn::VarMap;

    fn tiny(block: Block, stem: Stem) -> ResNetConfig {
        ResNetConfig {
            image_size: [11, 9],
            in_channels: 2,
            num_classes: 3,
            block,
            layers: vec![2, 1, 1],
            channels: vec![4, 6, 8],
            stem_width: 5,
            stem,
            drop_path: 0.0,
        }
    }

    #[test]
    fn presets_have_timms_shapes_and_flops() {
        // timm's figures: ResNet-18 1.82 GMACs, ResNet-50 4.11 (ours count convolutions and
        // the classifier, a multiply-add as 2 FLOPs).
        let gmacs = |name: &str| ModelConfig::preset(name).unwrap().flops() as f64 / 2e9;
        assert!(
            (1.80..1.83).contains(&gmacs("resnet18")),
            "{}",
            gmacs("resnet18")
        );
        assert!(
            (4.05..4.12).contains(&gmacs("resnet50")),
            "{}",
            gmacs("resnet50")
        );
        let flow = ModelConfig::preset("resnet50").unwrap().shape_flow();
        assert_eq!(flow[2].1, vec![64, 56, 56]); // after the stem's pool
        assert_eq!(flow[flow.len() - 3].1, vec![2048, 7, 7]);
        let small = ModelConfig::preset("resnet18_fmnist").unwrap().shape_flow();
        assert_eq!(small[1].1, vec![64, 28, 28]);
        assert_eq!(small[small.len() - 3].1, vec![512, 4, 4]);
        assert_eq!(
            tiny(Block::Basic, Stem::Imagenet).shape_flow()[4].1,
            vec![6, 2, 2]
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        let check = |c: ResNetConfig, want: &str| {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        let t = || tiny(Block::Basic, Stem::Small);
        check(
            ResNetConfig {
                channels: vec![4, 6],
                ..t()
            },
            "one value per stage",
        );
        check(
            ResNetConfig {
                layers: vec![2, 0, 1],
                ..t()
            },
            "1 to 64 blocks",
        );
        check(
            ResNetConfig {
                stem_width: 0,
                ..t()
            },
            "stem_width",
        );
        check(
            ResNetConfig {
                image_size: [0, 9],
                ..t()
            },
            "image_size",
        );
        check(
            ResNetConfig {
                drop_path: 1.0,
                ..t()
            },
            "drop_path",
        );
        let huge = ResNetConfig {
            image_size: [16384, 16384],
            layers: vec![64; 8],
            channels: vec![8192; 8],
            stem_width: 8192,
            ..t()
        };
        check(huge, "2^64 FLOPs");
        let text = "arch = \"resnet\"\nimage_size = [8, 8]\nnum_classes = 2\n\
                    block = \"basicc\"\nlayers = [1]\nchannels = [4]\n";
        let e = ModelConfig::from_text(text, std::path::Path::new("r.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("basicc"), "{e}");
    }

    /// Training-mode forward and backward of both block kinds and stems: every parameter
    /// gets a finite, non-zero gradient (BatchNorm weights set to 1: timm starts the last
    /// one of each block at 0, which stops the gradient of the convolutions before it); the
    /// running statistics get none, and move only on commit.
    #[test]
    fn every_parameter_receives_a_gradient_and_buffers_none() {
        for (block, stem) in [
            (Block::Basic, Stem::Imagenet),
            (Block::Bottleneck, Stem::Small),
        ] {
            let cfg = ModelConfig::Resnet(tiny(block, stem));
            let dev = Device::Cpu;
            let varmap = VarMap::new();
            let buffers: Vec<String> = cfg.buffer_shapes().into_iter().map(|(n, _)| n).collect();
            // Two buffers for each BatchNorm (the parameters of rank 1 named `weight`).
            let norms = cfg.param_shapes().into_iter();
            let norms = norms.filter(|(n, s)| s.len() == 1 && n.ends_with(".weight"));
            assert_eq!(buffers.len(), 2 * norms.count());
            for (name, t) in cfg.init_params(1, &dev).unwrap() {
                let t = if name.ends_with(".weight") && t.rank() == 1 {
                    t.ones_like().unwrap()
                } else {
                    t
                };
                varmap
                    .data()
                    .lock()
                    .unwrap()
                    .insert(name, Var::from_tensor(&t).unwrap());
            }
            let m = cfg
                .build(VarBuilder::from_varmap(&varmap, DType::F32, &dev))
                .unwrap();
            let x = Tensor::randn(0f32, 1.0, (4, 2, 11, 9), &dev).unwrap();
            let logits = m.forward_t(&x, &mut Mode::Train(None)).unwrap();
            assert_eq!(logits.dims(), &[4, 3]);
            let y = Tensor::new(&[0u32, 1, 2, 1], &dev).unwrap();
            let grads = ops::cross_entropy(&logits, &y, 0.0)
                .unwrap()
                .backward()
                .unwrap();
            let data = varmap.data().lock().unwrap();
            assert_eq!(data.len(), cfg.state_shapes().len());
            for (name, var) in data.iter() {
                let g = grads.get(var.as_tensor());
                if buffers.contains(name) {
                    assert!(g.is_none(), "buffer {name} got a gradient");
                    continue;
                }
                let norm = g
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(norm > 0.0 && norm.is_finite(), "{name}: {norm}");
            }
            let mean = |d: &std::collections::HashMap<String, Var>| {
                d["bn1.running_mean"].as_tensor().to_vec1::<f32>().unwrap()
            };
            assert!(mean(&data).iter().all(|&v| v == 0.0));
            m.batch_norms().iter().for_each(|bn| bn.commit().unwrap());
            assert!(mean(&data).iter().all(|&v| v != 0.0));
            // Evaluation passes leave nothing to commit.
            m.forward(&x).unwrap();
            let before = mean(&data);
            m.batch_norms().iter().for_each(|bn| bn.commit().unwrap());
            assert_eq!(mean(&data), before);
        }
    }
}
