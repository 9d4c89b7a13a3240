//! Pyramid Vision Transformer v2 (Wang et al., 2022) as timm builds it: an overlapping
//! patch embedding (7×7 convolution, stride 4, LayerNorm), then stages that each start
//! (after the first) with another overlapping embedding (3×3, stride 2) that halves the map
//! and widens it, so the features form a pyramid at strides 4, 8, 16, 32. Blocks use
//! spatial-reduction attention: queries from every token, keys and values from the map
//! shrunk by a strided convolution (R×R, stride R, LayerNorm), so attention costs N·N/R²;
//! their MLP has a depth-wise 3×3 convolution between its two layers, which gives the
//! positions (there is no position embedding). Each stage ends with a LayerNorm; global
//! average pooling and the classifier `head`.
//!
//! Maps are channels last (B, H, W, C) inside; stage outputs and features are channels
//! first (B, C, h, w), as timm's. Parameter names and order are timm's (`patch_embed.proj`,
//! `stages.{i}.downsample.proj`, `stages.{i}.blocks.{j}.attn.{q,kv,proj,sr,norm}`,
//! `...mlp.{fc1,dwconv,fc2}`, `stages.{i}.norm`, `head`). timm's LayerNorms differ in
//! epsilon: 1e-5 in the embeddings and the reduction, 1e-6 in the blocks and stage norms.

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::layers::{normal, trunc_normal, Conv2d, DropPath, Dropout, LayerNorm, Linear, Mode};
use super::vit::check_indices;
use super::{
    Architecture, Cells, Classifier, Intermediates, LocalAttention, ModelConfig, Preprocess, Preset,
};
use crate::{ops, Error, Result};

/// PyTorch's `nn.LayerNorm` epsilon (embeddings, reduction).
const EPS_TORCH: f64 = 1e-5;
/// timm's `LayerNorm` epsilon (blocks, stage norms).
const EPS_TIMM: f64 = 1e-6;

fn default_sr() -> Vec<usize> {
    vec![8, 4, 2, 1]
}
fn default_mlp() -> Vec<f64> {
    vec![8.0, 8.0, 4.0, 4.0]
}

/// A PVT v2: input, classes, and per stage its blocks, width, heads, spatial-reduction ratio
/// and MLP ratio.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PvtConfig {
    /// Input size as [height, width] in pixels.
    pub image_size: [usize; 2],
    /// Input channels: 3 for RGB, 1 for grayscale. Default 3.
    #[serde(default = "super::default_channels")]
    pub in_channels: usize,
    /// Classes of `head`; 0 means no classifier (the model returns pooled features).
    pub num_classes: usize,
    /// Blocks in each stage, e.g. [2, 2, 2, 2] for b0 and b1.
    pub depths: Vec<usize>,
    /// Width of each stage, e.g. [64, 128, 320, 512].
    pub embed_dims: Vec<usize>,
    /// Attention heads of each stage, e.g. [1, 2, 5, 8].
    pub num_heads: Vec<usize>,
    /// Spatial-reduction ratio R of each stage's keys and values. Default 8, 4, 2, 1.
    #[serde(default = "default_sr")]
    pub sr_ratios: Vec<usize>,
    /// MLP hidden width as a multiple of the stage width. Default 8, 8, 4, 4.
    #[serde(default = "default_mlp")]
    pub mlp_ratios: Vec<f64>,
    /// Bias on q and kv. Default true.
    #[serde(default = "super::default_true")]
    pub qkv_bias: bool,
    /// Dropout on attention probabilities.
    #[serde(default)]
    pub attn_dropout: f64,
    /// Dropout after the attention projection and in the MLP.
    #[serde(default)]
    pub proj_dropout: f64,
    /// Dropout on the pooled features before the head.
    #[serde(default)]
    pub head_dropout: f64,
    /// Stochastic depth of the deepest block, linear from 0 over all blocks (timm).
    #[serde(default)]
    pub drop_path: f64,
}

/// One stage's sizes.
#[derive(Debug, Clone, PartialEq)]
struct StageSpec {
    in_dim: usize,
    dim: usize,
    heads: usize,
    depth: usize,
    sr: usize,
    hidden: usize,
    /// The stage's map (rows, columns), after its embedding.
    res: (usize, usize),
}

impl StageSpec {
    /// The keys' and values' map after the reduction.
    fn reduced(&self) -> (usize, usize) {
        (self.res.0 / self.sr, self.res.1 / self.sr)
    }
}

impl PvtConfig {
    /// timm's PVT v2 for ImageNet: 224×224×3, 1000 classes, ratios 8-4-2-1 and 8-8-4-4.
    pub fn timm(depths: &[usize], embed_dims: &[usize], num_heads: &[usize]) -> Self {
        PvtConfig {
            image_size: [224, 224],
            in_channels: 3,
            num_classes: 1000,
            depths: depths.to_vec(),
            embed_dims: embed_dims.to_vec(),
            num_heads: num_heads.to_vec(),
            sr_ratios: default_sr(),
            mlp_ratios: default_mlp(),
            qkv_bias: true,
            attn_dropout: 0.0,
            proj_dropout: 0.0,
            head_dropout: 0.0,
            drop_path: 0.0,
        }
    }

    /// Width after the last stage.
    pub fn num_features(&self) -> usize {
        self.embed_dims.last().copied().unwrap_or(0)
    }

    /// Every stage's sizes: the first embedding maps a side s to ⌈s/4⌉, each later one to
    /// ⌈s/2⌉ (7×7 stride 4 padding 3; 3×3 stride 2 padding 1).
    fn stages(&self) -> Vec<StageSpec> {
        let [h, w] = self.image_size;
        let mut res = (h.div_ceil(4), w.div_ceil(4));
        let mut in_dim = self.embed_dims.first().copied().unwrap_or(0);
        (0..self.depths.len())
            .map(|i| {
                if i > 0 {
                    res = (res.0.div_ceil(2), res.1.div_ceil(2));
                }
                let dim = self.embed_dims[i];
                let spec = StageSpec {
                    in_dim,
                    dim,
                    heads: self.num_heads[i],
                    depth: self.depths[i],
                    sr: self.sr_ratios[i],
                    hidden: (dim as f64 * self.mlp_ratios[i]) as usize,
                    res,
                };
                in_dim = dim;
                spec
            })
            .collect()
    }

    fn drop_path_rate(&self, j: usize) -> f64 {
        super::linear_rate(self.drop_path, j, self.depths.iter().sum())
    }

    /// Forward FLOPs of convolutions and matrix products (a multiply-add counts 2); `None`
    /// beyond u64.
    fn checked_flops(&self) -> Option<u64> {
        let mul = super::mul_add_flops;
        let mut total = 0u64;
        for (i, s) in self.stages().iter().enumerate() {
            let n = s.res.0 * s.res.1;
            let (k, c_in) = if i == 0 {
                (7, self.in_channels)
            } else {
                (3, s.in_dim)
            };
            let (rh, rw) = s.reduced();
            let m = rh * rw;
            let sr_conv = if s.sr > 1 {
                mul(&[m, s.sr * s.sr, s.dim, s.dim])?
            } else {
                0
            };
            let block = [
                mul(&[n, s.dim, s.dim])?,                    // q
                sr_conv,                                     // reduction
                mul(&[m, s.dim, 2 * s.dim])?,                // kv
                mul(&[n, m, s.dim])?.checked_mul(2)?,        // q kᵀ and p v
                mul(&[n, s.dim, s.dim])?,                    // proj
                mul(&[n, s.dim, s.hidden])?.checked_mul(2)?, // fc1, fc2
                mul(&[n, 9, s.hidden])?,                     // depth-wise convolution
            ];
            total = total.checked_add(mul(&[n, k * k, c_in, s.dim])?)?;
            for f in block {
                total = total.checked_add(f.checked_mul(s.depth as u64)?)?;
            }
        }
        total.checked_add(mul(&[self.num_features(), self.num_classes])?)
    }
}

/// ImageNet's mean and std, bicubic, crop 0.9: timm's PVT v2 weights.
fn timm_pretrained(_: &PvtConfig) -> Preprocess {
    Preprocess::imagenet(0.9)
}

/// timm's PVT v2 b0, b1, b2, and ours for Fashion-MNIST.
pub const PRESETS: &[Preset<PvtConfig>] = &[
    Preset {
        name: "pvt_v2_b0",
        config: || PvtConfig::timm(&[2, 2, 2, 2], &[32, 64, 160, 256], &[1, 2, 5, 8]),
        pretrained: timm_pretrained,
    },
    Preset {
        name: "pvt_v2_b1",
        config: || PvtConfig::timm(&[2, 2, 2, 2], &[64, 128, 320, 512], &[1, 2, 5, 8]),
        pretrained: timm_pretrained,
    },
    Preset {
        name: "pvt_v2_b2",
        config: || PvtConfig::timm(&[3, 4, 6, 3], &[64, 128, 320, 512], &[1, 2, 5, 8]),
        pretrained: timm_pretrained,
    },
    // Fashion-MNIST / MNIST (28×28×1): maps of 7×7, 4×4 and 2×2; the first stage's keys
    // and values from a 3×3 reduction of its map.
    Preset {
        name: "pvt_fmnist",
        config: || PvtConfig {
            image_size: [28, 28],
            in_channels: 1,
            num_classes: 10,
            sr_ratios: vec![2, 1, 1],
            mlp_ratios: vec![8.0, 8.0, 4.0],
            ..PvtConfig::timm(&[2, 2, 2], &[32, 64, 128], &[1, 2, 4])
        },
        pretrained: |c| Preprocess::vit_default(c.in_channels),
    },
];

impl Architecture for PvtConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        super::check_stages(
            "depths",
            &self.depths,
            &[
                ("embed_dims", self.embed_dims.len()),
                ("num_heads", self.num_heads.len()),
                ("sr_ratios", self.sr_ratios.len()),
                ("mlp_ratios", self.mlp_ratios.len()),
            ],
        )?;
        if let Some(&d) = self
            .embed_dims
            .iter()
            .find(|&&d| !(1..=1 << 14).contains(&d))
        {
            return bad(format!(
                "each embed_dims value must be in 1..=16384, got {d}"
            ));
        }
        let [h, w] = self.image_size;
        for (name, value, least, most) in [
            ("image_size", h.min(w), 1, 1 << 14),
            ("image_size", h.max(w), 1, 1 << 14),
            ("in_channels", self.in_channels, 1, 1 << 10),
            ("num_classes", self.num_classes, 0, 1 << 20),
        ] {
            if !(least..=most).contains(&value) {
                return bad(format!("{name} is {value}, not in {least}..={most}"));
            }
        }
        let first = h.div_ceil(4) * w.div_ceil(4);
        if first > 1 << 20 {
            return bad(format!(
                "image_size {h}x{w} gives {first} tokens in the first stage, more than 2^20"
            ));
        }
        crate::error::check_finite(
            [
                ("attn_dropout", self.attn_dropout),
                ("proj_dropout", self.proj_dropout),
                ("head_dropout", self.head_dropout),
                ("drop_path", self.drop_path),
            ]
            .into_iter()
            .chain(self.mlp_ratios.iter().map(|&r| ("mlp_ratios", r))),
        )?;
        for s in self.stages() {
            if s.heads == 0 || s.dim % s.heads != 0 {
                return bad(format!(
                    "a stage of width {} cannot have {} heads: num_heads must divide embed_dims",
                    s.dim, s.heads
                ));
            }
            if s.sr == 0 || s.reduced().0 == 0 || s.reduced().1 == 0 {
                return bad(format!(
                    "sr_ratio {} does not fit a {}x{} map: each stage's ratio must be at least \
                     1 and at most its map's side",
                    s.sr, s.res.0, s.res.1
                ));
            }
            if s.hidden == 0 || s.hidden > 1 << 16 {
                return bad(format!(
                    "mlp_ratios give an MLP of width {} for a stage of width {}: it must be \
                     in 1..=65536",
                    s.hidden, s.dim
                ));
            }
        }
        crate::error::check_rates([
            ("attn_dropout", self.attn_dropout),
            ("proj_dropout", self.proj_dropout),
            ("head_dropout", self.head_dropout),
            ("drop_path", self.drop_path),
        ])?;
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
        let mut p: Vec<(String, Vec<usize>)> = Vec::new();
        // A weight of shape `w` and a bias of its first dimension.
        fn pair(p: &mut Vec<(String, Vec<usize>)>, name: &str, w: Vec<usize>) {
            let out = w[0];
            p.push((format!("{name}.weight"), w));
            p.push((format!("{name}.bias"), vec![out]));
        }
        for (i, s) in self.stages().iter().enumerate() {
            let embed = if i == 0 {
                pair(
                    &mut p,
                    "patch_embed.proj",
                    vec![s.dim, self.in_channels, 7, 7],
                );
                "patch_embed".to_string()
            } else {
                let e = format!("stages.{i}.downsample");
                pair(&mut p, &format!("{e}.proj"), vec![s.dim, s.in_dim, 3, 3]);
                e
            };
            pair(&mut p, &format!("{embed}.norm"), vec![s.dim]);
            for j in 0..s.depth {
                let b = format!("stages.{i}.blocks.{j}");
                pair(&mut p, &format!("{b}.norm1"), vec![s.dim]);
                if self.qkv_bias {
                    pair(&mut p, &format!("{b}.attn.q"), vec![s.dim, s.dim]);
                    pair(&mut p, &format!("{b}.attn.kv"), vec![2 * s.dim, s.dim]);
                } else {
                    p.push((format!("{b}.attn.q.weight"), vec![s.dim, s.dim]));
                    p.push((format!("{b}.attn.kv.weight"), vec![2 * s.dim, s.dim]));
                }
                pair(&mut p, &format!("{b}.attn.proj"), vec![s.dim, s.dim]);
                if s.sr > 1 {
                    let sr = vec![s.dim, s.dim, s.sr, s.sr];
                    pair(&mut p, &format!("{b}.attn.sr"), sr);
                    pair(&mut p, &format!("{b}.attn.norm"), vec![s.dim]);
                }
                pair(&mut p, &format!("{b}.norm2"), vec![s.dim]);
                pair(&mut p, &format!("{b}.mlp.fc1"), vec![s.hidden, s.dim]);
                pair(&mut p, &format!("{b}.mlp.dwconv"), vec![s.hidden, 1, 3, 3]);
                pair(&mut p, &format!("{b}.mlp.fc2"), vec![s.dim, s.hidden]);
            }
            pair(&mut p, &format!("stages.{i}.norm"), vec![s.dim]);
        }
        if self.num_classes > 0 {
            pair(&mut p, "head", vec![self.num_classes, self.num_features()]);
        }
        p
    }
    /// The stages (timm's `forward_intermediates` indexes them).
    fn depth(&self) -> usize {
        self.depths.len()
    }
    fn flops(&self) -> u64 {
        self.checked_flops().unwrap_or(u64::MAX)
    }
    fn shape_flow(&self) -> Vec<(String, Vec<usize>)> {
        let [h, w] = self.image_size;
        let mut flow = vec![("image".to_string(), vec![self.in_channels, h, w])];
        for (i, s) in self.stages().iter().enumerate() {
            let embed = if i == 0 {
                "patch embed 7x7/4"
            } else {
                "embed 3x3/2"
            };
            let (rh, rw) = s.reduced();
            flow.push((
                format!(
                    "stages.{i}: {embed}, {} blocks, {} heads, keys {rh}x{rw}",
                    s.depth, s.heads
                ),
                vec![s.dim, s.res.0, s.res.1],
            ));
        }
        flow.push(("global average pool".into(), vec![self.num_features()]));
        if self.num_classes > 0 {
            flow.push(("head: logits".into(), vec![self.num_classes]));
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
    /// timm's initialisation: linear weights trunc-normal(0, 0.02) cut at ±2 and biases 0;
    /// convolutions normal(0, √(2/fan_out)) with fan_out = k·k·C_out/groups and biases 0;
    /// LayerNorm 1 and 0. From ChaCha8 seeded with `seed`.
    fn init_params(&self, seed: u64, dev: &Device) -> Result<Vec<(String, Tensor)>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::new();
        for (name, shape) in self.param_shapes() {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with(".bias") {
                vec![0.0; n]
            } else if shape.len() == 4 {
                // Depth-wise: one input channel per group, C_out groups.
                let groups = if shape[1] == 1 { shape[0] } else { 1 };
                let fan_out = shape[2] * shape[3] * shape[0] / groups;
                let std = (2.0 / fan_out as f32).sqrt();
                (0..n).map(|_| normal(&mut rng) * std).collect()
            } else if shape.len() == 1 {
                vec![1.0; n] // LayerNorm weight
            } else {
                (0..n).map(|_| trunc_normal(&mut rng, 0.02)).collect()
            };
            out.push((name, Tensor::from_vec(values, shape, dev)?));
        }
        Ok(out)
    }
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Classifier>> {
        Ok(Box::new(PyramidVisionTransformer::new(self, vb)?))
    }
}

/// Overlapping patch embedding: a strided convolution with padding, then LayerNorm:
/// (B, H, W, C_in) → (B, H', W', C).
#[derive(Debug, Clone)]
struct OverlapEmbed {
    proj: Conv2d,
    norm: LayerNorm,
}

impl OverlapEmbed {
    fn new(vb: &VarBuilder, c_in: usize, c_out: usize, k: usize, stride: usize) -> Result<Self> {
        Ok(OverlapEmbed {
            proj: Conv2d::with_bias(&vb.pp("proj"), c_out, c_in, k, stride, k / 2)?,
            norm: LayerNorm::new(&vb.pp("norm"), c_out, EPS_TORCH)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(&self.proj.forward(x)?)
    }
}

/// Spatial-reduction attention: queries from every token, keys and values from the map
/// reduced by an R×R convolution with stride R and a LayerNorm (R = 1: the map itself).
#[derive(Debug, Clone)]
struct SrAttention {
    q: Linear,
    kv: Linear,
    proj: Linear,
    /// The reduction and its norm, for R > 1.
    sr: Option<(Conv2d, LayerNorm)>,
    heads: usize,
    scale: f64,
    attn_drop: Dropout,
    proj_drop: Dropout,
}

impl SrAttention {
    fn new(vb: &VarBuilder, cfg: &PvtConfig, s: &StageSpec) -> Result<Self> {
        let d = s.dim;
        let sr = if s.sr > 1 {
            Some((
                Conv2d::with_bias(&vb.pp("sr"), d, d, s.sr, s.sr, 0)?,
                LayerNorm::new(&vb.pp("norm"), d, EPS_TORCH)?,
            ))
        } else {
            None
        };
        Ok(SrAttention {
            q: Linear::new(&vb.pp("q"), d, d, cfg.qkv_bias)?,
            kv: Linear::new(&vb.pp("kv"), 2 * d, d, cfg.qkv_bias)?,
            proj: Linear::new(&vb.pp("proj"), d, d, true)?,
            sr,
            heads: s.heads,
            scale: 1.0 / ((d / s.heads) as f64).sqrt(),
            attn_drop: Dropout(cfg.attn_dropout),
            proj_drop: Dropout(cfg.proj_dropout),
        })
    }

    /// (B, H, W, C) → (B, H, W, C).
    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        Ok(self.attend(x, mode)?.0)
    }

    /// The output, and the probabilities (B, heads, N, M) over the M reduced keys.
    fn attend(&self, x: &Tensor, mode: &mut Mode) -> Result<(Tensor, Tensor)> {
        let (b, h, w, c) = x.dims4()?;
        let hd = c / self.heads;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let tokens = x.reshape((b, h * w, c))?;
        let q = heads(self.q.forward(&tokens)?, h * w)?; // (B, heads, N, hd)
        let reduced = match &self.sr {
            Some((conv, norm)) => norm.forward(&conv.forward(x)?)?, // (B, H/R, W/R, C)
            None => x.clone(),
        };
        let (_, rh, rw, _) = reduced.dims4()?;
        let m = rh * rw;
        let kv = self.kv.forward(&reduced.reshape((b, m, c))?)?; // (B, M, 2C)
        let kv = kv
            .reshape((b, m, 2, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let (k, v) = (kv.get(0)?.contiguous()?, kv.get(1)?.contiguous()?); // (B, heads, M, hd)
        let scores = ops::matmul(&(q * self.scale)?, &k.t()?)?; // (B, heads, N, M)
        let probs = ops::softmax_last_dim(&scores)?;
        let dropped = self.attn_drop.forward(&probs, mode)?;
        let out = ops::merge_heads(&ops::matmul(&dropped, &v)?)?; // (B, N, C)
        let out = self.proj_drop.forward(&self.proj.forward(&out)?, mode)?;
        Ok((out.reshape((b, h, w, c))?, probs))
    }

    /// Evaluation forward that also returns the attention each reduced key receives,
    /// averaged over all queries: (B, heads, H/R, W/R).
    fn forward_with_received(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, w, _) = x.dims4()?;
        let (out, probs) = self.attend(x, &mut Mode::Eval)?;
        let r = self.sr.as_ref().map_or(1, |(conv, _)| conv.stride);
        let received = probs
            .detach()
            .mean(2)?
            .reshape((b, self.heads, h / r, w / r))?;
        Ok((out, received))
    }
}

/// The MLP with a depth-wise 3×3 convolution between its layers: fc1, dwconv, GELU, fc2.
#[derive(Debug, Clone)]
struct DwMlp {
    fc1: Linear,
    dw_weight: Tensor, // (hidden, 1, 3, 3)
    dw_bias: Tensor,   // (hidden,)
    fc2: Linear,
    drop: Dropout,
}

impl DwMlp {
    fn new(vb: &VarBuilder, dim: usize, hidden: usize, drop: f64) -> Result<Self> {
        let dw = vb.pp("dwconv");
        Ok(DwMlp {
            fc1: Linear::new(&vb.pp("fc1"), hidden, dim, true)?,
            dw_weight: dw.get((hidden, 1, 3, 3), "weight")?,
            dw_bias: dw.get(hidden, "bias")?,
            fc2: Linear::new(&vb.pp("fc2"), dim, hidden, true)?,
            drop: Dropout(drop),
        })
    }

    /// (B, H, W, C) → (B, H, W, C).
    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let h = self.fc1.forward(x)?; // (B, H, W, hidden)
        let h = ops::depthwise_conv3x3_nhwc(&h, &self.dw_weight, &self.dw_bias)?;
        let h = self.drop.forward(&ops::gelu(&h)?, mode)?;
        self.drop.forward(&self.fc2.forward(&h)?, mode)
    }
}

/// A PVT block: x + attn(norm1 x); x + mlp(norm2 x).
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    attn: SrAttention,
    norm2: LayerNorm,
    mlp: DwMlp,
    drop_path: DropPath,
}

impl Block {
    /// (B, H, W, C) → (B, H, W, C).
    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let a = self.attn.forward(&self.norm1.forward(x)?, mode)?;
        self.mlp_branch(x, &a, mode)
    }

    /// Evaluation forward that also returns the attention its reduced keys receive.
    fn forward_with_received(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (a, received) = self.attn.forward_with_received(&self.norm1.forward(x)?)?;
        Ok((self.mlp_branch(x, &a, &mut Mode::Eval)?, received))
    }

    /// x + drop_path(a), then x + drop_path(mlp(norm2 x)).
    fn mlp_branch(&self, x: &Tensor, a: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let x = ops::add(x, &self.drop_path.forward(a, mode)?)?;
        let m = self.mlp.forward(&self.norm2.forward(&x)?, mode)?;
        ops::add(&x, &self.drop_path.forward(&m, mode)?)
    }
}

/// A stage: its embedding, blocks and final norm.
#[derive(Debug, Clone)]
struct Stage {
    embed: OverlapEmbed,
    blocks: Vec<Block>,
    norm: LayerNorm,
}

impl Stage {
    /// (B, H, W, C_in) → (B, H', W', C).
    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let mut x = self.embed.forward(x)?;
        for block in &self.blocks {
            x = block.forward(&x, mode)?;
        }
        self.norm.forward(&x)
    }
}

/// The network of a [`PvtConfig`].
#[derive(Debug, Clone)]
pub struct PyramidVisionTransformer {
    cfg: PvtConfig,
    stages: Vec<Stage>,
    head_drop: Dropout,
    head: Option<Linear>,
}

impl PyramidVisionTransformer {
    pub fn new(cfg: &PvtConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let mut first_block = 0;
        let mut stages = Vec::new();
        for (i, s) in cfg.stages().iter().enumerate() {
            let embed = if i == 0 {
                OverlapEmbed::new(&vb.pp("patch_embed"), cfg.in_channels, s.dim, 7, 4)?
            } else {
                OverlapEmbed::new(
                    &vb.pp(format!("stages.{i}.downsample")),
                    s.in_dim,
                    s.dim,
                    3,
                    2,
                )?
            };
            let blocks = (0..s.depth)
                .map(|j| {
                    let v = vb.pp(format!("stages.{i}.blocks.{j}"));
                    Ok(Block {
                        norm1: LayerNorm::new(&v.pp("norm1"), s.dim, EPS_TIMM)?,
                        attn: SrAttention::new(&v.pp("attn"), cfg, s)?,
                        norm2: LayerNorm::new(&v.pp("norm2"), s.dim, EPS_TIMM)?,
                        mlp: DwMlp::new(&v.pp("mlp"), s.dim, s.hidden, cfg.proj_dropout)?,
                        drop_path: DropPath(cfg.drop_path_rate(first_block + j)),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            first_block += s.depth;
            let norm = LayerNorm::new(&vb.pp(format!("stages.{i}.norm")), s.dim, EPS_TIMM)?;
            stages.push(Stage {
                embed,
                blocks,
                norm,
            });
        }
        let head = if cfg.num_classes > 0 {
            let f = cfg.num_features();
            Some(Linear::new(&vb.pp("head"), cfg.num_classes, f, true)?)
        } else {
            None
        };
        Ok(PyramidVisionTransformer {
            cfg: cfg.clone(),
            stages,
            head_drop: Dropout(cfg.head_dropout),
            head,
        })
    }

    /// Images (B, C, H, W) → every stage's output map, channels last.
    fn run(&self, x: &Tensor, mode: &mut Mode) -> Result<Vec<Tensor>> {
        super::check_images(x, &self.cfg)?;
        let mut x = x.permute((0, 2, 3, 1))?; // (B, H, W, C)
        let mut levels = Vec::new();
        for stage in &self.stages {
            x = stage.forward(&x, mode)?;
            levels.push(x.clone());
        }
        Ok(levels)
    }
}

impl Classifier for PyramidVisionTransformer {
    fn config(&self) -> ModelConfig {
        ModelConfig::Pvt(self.cfg.clone())
    }

    /// Images → the last stage's map (B, C, h, w), channels first as timm's.
    fn forward_features_t(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let levels = self.run(x, mode)?;
        let last = levels.last().expect("at least one stage");
        Ok(last.permute((0, 3, 1, 2))?)
    }

    /// Map (B, C, h, w) → global average pool (B, C) → dropout → logits (B, classes).
    fn forward_head_t(&self, feats: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let pooled = self.head_drop.forward(&feats.mean((2, 3))?, mode)?;
        match &self.head {
            Some(fc) => fc.forward(&pooled),
            None => Ok(pooled),
        }
    }

    /// Logits and the output maps (B, C, h, w) of the stages listed in `indices`, as
    /// timm's `forward_intermediates`; no global attention.
    fn forward_intermediates(&self, x: &Tensor, indices: &[usize]) -> Result<Intermediates> {
        check_indices(indices, self.cfg.depth())?;
        let levels = self.run(x, &mut Mode::Eval)?;
        let last = levels.last().expect("at least one stage");
        let logits = self.forward_head(&last.permute((0, 3, 1, 2))?)?;
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

    fn local_attention(&self, x: &Tensor) -> Result<Option<(Tensor, Vec<LocalAttention>)>> {
        super::check_images(x, &self.cfg)?;
        let mut x = x.permute((0, 2, 3, 1))?; // (B, H, W, C)
        let mut maps = Vec::new();
        for (i, (stage, spec)) in self.stages.iter().zip(self.cfg.stages()).enumerate() {
            x = stage.embed.forward(&x)?;
            for (j, block) in stage.blocks.iter().enumerate() {
                let (y, received) = block.forward_with_received(&x)?;
                x = y;
                maps.push(LocalAttention {
                    name: format!("stages.{i}.blocks.{j}"),
                    received,
                    cells: Cells::Reduced { ratio: spec.sr },
                });
            }
            x = stage.norm.forward(&x)?;
        }
        let logits = self.forward_head(&x.permute((0, 3, 1, 2))?)?;
        Ok(Some((logits, maps)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil;
    use super::*;

    fn tiny() -> PvtConfig {
        PvtConfig {
            image_size: [30, 22],
            in_channels: 2,
            num_classes: 3,
            sr_ratios: vec![2, 1],
            mlp_ratios: vec![2.0, 1.5],
            ..PvtConfig::timm(&[2, 1], &[8, 12], &[2, 3])
        }
    }

    #[test]
    fn stages_shrink_as_the_strided_embeddings_do() {
        // 30x22 → ⌈/4⌉ 8x6 → ⌈/2⌉ 4x3; keys 4x3 (R = 2), then 4x3 (R = 1).
        let s = tiny().stages();
        assert_eq!((s[0].res, s[0].reduced()), ((8, 6), (4, 3)));
        assert_eq!((s[1].res, s[1].reduced()), ((4, 3), (4, 3)));
        let flow = ModelConfig::preset("pvt_v2_b1").unwrap().shape_flow();
        assert_eq!(flow[1].1, vec![64, 56, 56]);
        assert!(flow[1].0.contains("keys 7x7"), "{}", flow[1].0);
        assert_eq!(flow[4].1, vec![512, 7, 7]);
    }

    #[test]
    fn presets_have_the_flops_pytorch_counts() {
        // torch.utils.flop_counter on timm's models at 224 px, GMACs: 0.5661, 2.1084, 4.0267.
        for (name, gmacs) in [
            ("pvt_v2_b0", 0.5661),
            ("pvt_v2_b1", 2.1084),
            ("pvt_v2_b2", 4.0267),
        ] {
            let got = ModelConfig::preset(name).unwrap().flops() as f64 / 2e9;
            assert!((got / gmacs - 1.0).abs() < 0.01, "{name}: {got}");
        }
    }

    #[test]
    fn bad_configs_name_the_field() {
        let check = |c: PvtConfig, want: &str| {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        check(
            PvtConfig {
                sr_ratios: vec![2],
                ..tiny()
            },
            "sr_ratios must give one value per stage",
        );
        check(
            PvtConfig {
                sr_ratios: vec![16, 1],
                ..tiny()
            },
            "does not fit a 8x6 map",
        );
        check(
            PvtConfig {
                num_heads: vec![3, 3],
                ..tiny()
            },
            "cannot have 3 heads",
        );
        check(
            PvtConfig {
                mlp_ratios: vec![f64::INFINITY, 1.0],
                ..tiny()
            },
            "mlp_ratios must be a finite number",
        );
        check(
            PvtConfig {
                image_size: [16384, 16384],
                ..tiny()
            },
            "more than 2^20",
        );
        for (_, c) in super::super::presets() {
            c.validate().unwrap();
        }
    }

    /// Training-mode forward and backward: every parameter gets a finite, non-zero
    /// gradient.
    #[test]
    fn every_parameter_receives_a_gradient() {
        let x = Tensor::randn(0f32, 1.0, (2, 2, 30, 22), &Device::Cpu).unwrap();
        let m =
            testutil::every_parameter_gets_a_gradient(&ModelConfig::Pvt(tiny()), 4, &x, &[0, 2]);
        let taken = m.forward_intermediates(&x, &[1]).unwrap();
        assert_eq!(taken.blocks[0].dims(), &[2, 12, 4, 3]);
        // The keys' maps: 4x3 after a reduction by 2 of the 8x6 map, then 4x3 itself; each
        // query's row sums to 1, so a map averaged over queries sums to 1.
        let (logits, maps) = m.local_attention(&x).unwrap().unwrap();
        let diff = (logits - m.forward(&x).unwrap()).unwrap().abs().unwrap();
        assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6);
        let dims: Vec<&[usize]> = maps.iter().map(|a| a.received.dims()).collect();
        assert_eq!(dims, [&[2, 2, 4, 3][..], &[2, 2, 4, 3], &[2, 3, 4, 3]]);
        assert_eq!(maps[0].cells, Cells::Reduced { ratio: 2 });
        let sums = maps[2].received.sum((2, 3)).unwrap().flatten_all().unwrap();
        for v in sums.to_vec1::<f32>().unwrap() {
            assert!((v - 1.0).abs() < 1e-5, "{v}");
        }
    }
}
