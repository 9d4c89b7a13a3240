//! Swin Transformer (Liu et al., 2021) as timm builds it: a patch embedding (P×P patches,
//! linear, LayerNorm) onto a (H/P, W/P) grid, then stages of blocks that attend within
//! non-overlapping M×M windows, every second block with the windows shifted by M/2 (a
//! cyclic roll and a mask, so that tokens attend only to tokens that were neighbours
//! before the roll); each stage after the first starts with patch merging (2×2
//! neighbours concatenated, LayerNorm, linear 4C → 2C), halving the resolution and
//! doubling the width. A final LayerNorm, global average pooling, the classifier
//! `head.fc`. Attention within a window adds a learned bias per head and relative
//! position (`relative_position_bias_table`).
//!
//! Tensors are (B, H, W, C) throughout, as timm's. Parameter names and order are timm's
//! (`patch_embed.proj`, `layers.{i}.downsample.reduction`, `layers.{i}.blocks.{j}.attn.qkv`,
//! ..., `head.fc`), so its state dicts load unchanged. What timm does not store is computed
//! here the same way: the relative position index and the shifted-window mask. As in timm,
//! a stage whose map is no larger than the window uses the map as its window, unshifted.

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::layers::{trunc_normal, DropPath, Dropout, LayerNorm, Linear, Mlp, Mode, PatchEmbed};
use super::vit::check_indices;
use super::{
    Architecture, Cells, Classifier, Intermediates, LocalAttention, ModelConfig, Preprocess, Preset,
};
use crate::{ops, Error, Result};

fn default_eps() -> f64 {
    1e-5
}

/// A Swin Transformer: input, classes, patch size, width of the first stage (doubled by
/// each later one), blocks and heads per stage, window size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwinConfig {
    /// Input size as [height, width] in pixels, divisible by `patch_size`.
    pub image_size: [usize; 2],
    /// Input channels: 3 for RGB, 1 for grayscale. Default 3.
    #[serde(default = "super::default_channels")]
    pub in_channels: usize,
    /// Classes of `head.fc`; 0 means no classifier (the model returns pooled features).
    pub num_classes: usize,
    /// Side of a patch in pixels (4 in timm's presets).
    pub patch_size: usize,
    /// Width C of the first stage; stage i has C·2^i.
    pub embed_dim: usize,
    /// Blocks in each stage, e.g. [2, 2, 6, 2] for Swin-T.
    pub depths: Vec<usize>,
    /// Attention heads in each stage, e.g. [3, 6, 12, 24].
    pub num_heads: Vec<usize>,
    /// Side M of the attention windows (7 in timm's presets).
    pub window_size: usize,
    /// MLP hidden width as a multiple of the stage width. Default 4.
    #[serde(default = "super::default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Bias on the qkv projection. Default true.
    #[serde(default = "super::default_true")]
    pub qkv_bias: bool,
    /// Dropout on attention probabilities.
    #[serde(default)]
    pub attn_dropout: f64,
    /// Dropout after the attention projection and in the MLP.
    #[serde(default)]
    pub proj_dropout: f64,
    /// Dropout on the pooled features before the head (timm's `drop_rate`).
    #[serde(default)]
    pub head_dropout: f64,
    /// Stochastic depth of the deepest block, linear from 0 over all blocks (timm).
    #[serde(default)]
    pub drop_path: f64,
    /// LayerNorm epsilon. Default 1e-5 (PyTorch's, which timm's Swin uses).
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

/// One stage's sizes.
#[derive(Debug, Clone, PartialEq)]
struct StageSpec {
    /// Width of the stage's input (the previous stage's) and of the stage.
    in_dim: usize,
    dim: usize,
    heads: usize,
    depth: usize,
    /// The stage's token map (rows, columns), after its patch merging.
    res: (usize, usize),
    /// Window (rows, columns): the configured size, or the map where that is smaller.
    window: (usize, usize),
    /// Shift of the odd blocks' windows: half the window, 0 where the map fits in one.
    shift: (usize, usize),
}

impl StageSpec {
    /// The map padded to whole windows.
    fn padded(&self) -> (usize, usize) {
        let (h, w) = self.res;
        let (wh, ww) = self.window;
        (h.div_ceil(wh) * wh, w.div_ceil(ww) * ww)
    }
    fn window_area(&self) -> usize {
        self.window.0 * self.window.1
    }
    /// Windows per image.
    fn windows(&self) -> usize {
        let (hp, wp) = self.padded();
        (hp / self.window.0) * (wp / self.window.1)
    }
}

impl SwinConfig {
    /// timm's Swin for ImageNet: 224×224×3, 1000 classes, 4×4 patches, 7×7 windows.
    pub fn timm(embed_dim: usize, depths: &[usize], num_heads: &[usize]) -> Self {
        SwinConfig {
            image_size: [224, 224],
            in_channels: 3,
            num_classes: 1000,
            patch_size: 4,
            embed_dim,
            depths: depths.to_vec(),
            num_heads: num_heads.to_vec(),
            window_size: 7,
            mlp_ratio: 4.0,
            qkv_bias: true,
            attn_dropout: 0.0,
            proj_dropout: 0.0,
            head_dropout: 0.0,
            drop_path: 0.0,
            layer_norm_eps: default_eps(),
        }
    }

    /// The patch grid (rows, columns).
    pub fn grid(&self) -> (usize, usize) {
        let [h, w] = self.image_size;
        (h / self.patch_size, w / self.patch_size)
    }

    /// Width after the last stage.
    pub fn num_features(&self) -> usize {
        self.embed_dim << self.depths.len().saturating_sub(1)
    }

    fn mlp_hidden(&self, dim: usize) -> usize {
        (dim as f64 * self.mlp_ratio) as usize
    }

    /// Every stage's sizes (timm's `SwinTransformerStage` and `_calc_window_shift`).
    fn stages(&self) -> Vec<StageSpec> {
        let mut res = self.grid();
        let mut in_dim = self.embed_dim;
        let m = self.window_size;
        let fit = |r: usize| if r <= m { (r, 0) } else { (m, m / 2) };
        (0..self.depths.len())
            .map(|i| {
                if i > 0 {
                    res = (res.0.div_ceil(2), res.1.div_ceil(2));
                }
                let dim = self.embed_dim << i;
                let ((wh, sh), (ww, sw)) = (fit(res.0), fit(res.1));
                let spec = StageSpec {
                    in_dim,
                    dim,
                    heads: self.num_heads[i],
                    depth: self.depths[i],
                    res,
                    window: (wh, ww),
                    shift: (sh, sw),
                };
                in_dim = dim;
                spec
            })
            .collect()
    }

    /// Stochastic-depth rate of block `j` of all blocks: linear from 0 to `drop_path`
    /// (`torch.linspace`, as timm).
    fn drop_path_rate(&self, j: usize) -> f64 {
        super::linear_rate(self.drop_path, j, self.depths.iter().sum())
    }

    /// Forward FLOPs of the matrix products (a multiply-add counts 2; LayerNorm, softmax
    /// and additions not counted, as fvcore and timm's figures); `None` beyond u64.
    fn checked_flops(&self) -> Option<u64> {
        let mul = super::mul_add_flops;
        let (gh, gw) = self.grid();
        let p = self.patch_size;
        let mut total = mul(&[gh * gw, self.in_channels * p * p, self.embed_dim])?;
        for (i, s) in self.stages().iter().enumerate() {
            let tokens = s.res.0 * s.res.1;
            if i > 0 {
                total = total.checked_add(mul(&[tokens, 4 * s.in_dim, s.dim])?)?;
            }
            let (hp, wp) = s.padded();
            let per_block = [
                mul(&[hp * wp, s.dim, 3 * s.dim])?, // qkv (padded tokens too)
                mul(&[hp * wp, s.window_area(), s.dim])?.checked_mul(2)?, // q kᵀ and p v
                mul(&[hp * wp, s.dim, s.dim])?,     // proj
                mul(&[tokens, s.dim, self.mlp_hidden(s.dim)])?.checked_mul(2)?, // fc1, fc2
            ];
            for f in per_block {
                total = total.checked_add(f.checked_mul(s.depth as u64)?)?;
            }
        }
        total.checked_add(mul(&[self.num_features(), self.num_classes])?)
    }
}

/// ImageNet's mean and std, bicubic, crop 0.9: timm's Swin weights.
fn timm_pretrained(_: &SwinConfig) -> Preprocess {
    Preprocess::imagenet(0.9)
}

/// timm's Swin-T, -S, -B at 224 px, and ours for small images.
pub const PRESETS: &[Preset<SwinConfig>] = &[
    Preset {
        name: "swin_tiny_patch4_window7_224",
        config: || SwinConfig::timm(96, &[2, 2, 6, 2], &[3, 6, 12, 24]),
        pretrained: timm_pretrained,
    },
    Preset {
        name: "swin_small_patch4_window7_224",
        config: || SwinConfig::timm(96, &[2, 2, 18, 2], &[3, 6, 12, 24]),
        pretrained: timm_pretrained,
    },
    Preset {
        name: "swin_base_patch4_window7_224",
        config: || SwinConfig::timm(128, &[2, 2, 18, 2], &[4, 8, 16, 32]),
        pretrained: timm_pretrained,
    },
    // Fashion-MNIST / MNIST (28×28×1): 2×2 patches give a 14×14 map, four 7×7 windows
    // (shifted in every second block), then 7×7 (one window) and 4×4.
    Preset {
        name: "swin_fmnist",
        config: || SwinConfig {
            image_size: [28, 28],
            in_channels: 1,
            num_classes: 10,
            patch_size: 2,
            ..SwinConfig::timm(32, &[2, 2, 2], &[2, 4, 8])
        },
        pretrained: |c| Preprocess::vit_default(c.in_channels),
    },
    // CIFAR-10 (32×32×3): 16×16 map, windows of 4 (16, then 4, then 1 per image).
    Preset {
        name: "swin_cifar",
        config: || SwinConfig {
            image_size: [32, 32],
            in_channels: 3,
            num_classes: 10,
            patch_size: 2,
            window_size: 4,
            ..SwinConfig::timm(48, &[2, 2, 2], &[3, 6, 12])
        },
        pretrained: |c| Preprocess::vit_default(c.in_channels),
    },
];

impl Architecture for SwinConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let stages = self.depths.len();
        super::check_stages(
            "depths",
            &self.depths,
            &[("num_heads", self.num_heads.len())],
        )?;
        let [h, w] = self.image_size;
        for (name, value, least, most) in [
            ("image_size", h.min(w), 1, 1 << 14),
            ("image_size", h.max(w), 1, 1 << 14),
            ("patch_size", self.patch_size, 1, 1 << 10),
            ("in_channels", self.in_channels, 1, 1 << 10),
            ("num_classes", self.num_classes, 0, 1 << 20),
            ("window_size", self.window_size, 1, 64),
            ("embed_dim", self.embed_dim, 1, 1 << 12),
        ] {
            if !(least..=most).contains(&value) {
                return bad(format!("{name} is {value}, not in {least}..={most}"));
            }
        }
        if h % self.patch_size != 0 || w % self.patch_size != 0 {
            return bad(format!(
                "image_size {h}x{w} is not divisible by patch_size {}",
                self.patch_size
            ));
        }
        // The shifted-window mask holds window-area values per token of the first stage.
        let (gh, gw) = self.grid();
        let area = self.window_size.min(gh) * self.window_size.min(gw);
        if gh * gw > 1 << 20 || gh * gw * area > 1 << 26 {
            return bad(format!(
                "a {gh}x{gw} patch grid with {}x{} windows is beyond the 2^20 tokens and \
                 2^26 token-window pairs allowed",
                self.window_size, self.window_size
            ));
        }
        if self.num_features() > 1 << 16 {
            return bad(format!(
                "embed_dim {} doubled over {stages} stages gives width {}, more than 65536",
                self.embed_dim,
                self.num_features()
            ));
        }
        for s in self.stages() {
            if s.heads == 0 || s.dim % s.heads != 0 {
                return bad(format!(
                    "a stage of width {} cannot have {} heads: num_heads must divide each \
                     stage's width (embed_dim · 2^stage)",
                    s.dim, s.heads
                ));
            }
        }
        crate::error::check_finite([
            ("mlp_ratio", self.mlp_ratio),
            ("layer_norm_eps", self.layer_norm_eps),
            ("attn_dropout", self.attn_dropout),
            ("proj_dropout", self.proj_dropout),
            ("head_dropout", self.head_dropout),
            ("drop_path", self.drop_path),
        ])?;
        if !(self.mlp_ratio > 0.0 && self.mlp_ratio <= 64.0) || self.mlp_hidden(self.embed_dim) == 0
        {
            return bad(format!(
                "mlp_ratio must give a non-empty MLP and be at most 64, got {}",
                self.mlp_ratio
            ));
        }
        if self.layer_norm_eps <= 0.0 {
            return bad(format!(
                "layer_norm_eps must be positive, got {}",
                self.layer_norm_eps
            ));
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
        let mut push = |name: String, shape: Vec<usize>| p.push((name, shape));
        let (c, d, k) = (self.in_channels, self.embed_dim, self.patch_size);
        push("patch_embed.proj.weight".into(), vec![d, c, k, k]);
        push("patch_embed.proj.bias".into(), vec![d]);
        push("patch_embed.norm.weight".into(), vec![d]);
        push("patch_embed.norm.bias".into(), vec![d]);
        for (i, s) in self.stages().iter().enumerate() {
            let stage = format!("layers.{i}");
            if i > 0 {
                push(
                    format!("{stage}.downsample.norm.weight"),
                    vec![4 * s.in_dim],
                );
                push(format!("{stage}.downsample.norm.bias"), vec![4 * s.in_dim]);
                push(
                    format!("{stage}.downsample.reduction.weight"),
                    vec![s.dim, 4 * s.in_dim],
                );
            }
            let (wh, ww) = s.window;
            let hidden = self.mlp_hidden(s.dim);
            for j in 0..s.depth {
                let b = format!("{stage}.blocks.{j}");
                push(format!("{b}.norm1.weight"), vec![s.dim]);
                push(format!("{b}.norm1.bias"), vec![s.dim]);
                push(
                    format!("{b}.attn.relative_position_bias_table"),
                    vec![(2 * wh - 1) * (2 * ww - 1), s.heads],
                );
                push(format!("{b}.attn.qkv.weight"), vec![3 * s.dim, s.dim]);
                if self.qkv_bias {
                    push(format!("{b}.attn.qkv.bias"), vec![3 * s.dim]);
                }
                push(format!("{b}.attn.proj.weight"), vec![s.dim, s.dim]);
                push(format!("{b}.attn.proj.bias"), vec![s.dim]);
                push(format!("{b}.norm2.weight"), vec![s.dim]);
                push(format!("{b}.norm2.bias"), vec![s.dim]);
                push(format!("{b}.mlp.fc1.weight"), vec![hidden, s.dim]);
                push(format!("{b}.mlp.fc1.bias"), vec![hidden]);
                push(format!("{b}.mlp.fc2.weight"), vec![s.dim, hidden]);
                push(format!("{b}.mlp.fc2.bias"), vec![s.dim]);
            }
        }
        let f = self.num_features();
        push("norm.weight".into(), vec![f]);
        push("norm.bias".into(), vec![f]);
        if self.num_classes > 0 {
            push("head.fc.weight".into(), vec![self.num_classes, f]);
            push("head.fc.bias".into(), vec![self.num_classes]);
        }
        p
    }
    fn head_names(&self) -> Vec<&'static str> {
        vec!["head.fc"]
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
        let (gh, gw) = self.grid();
        let p = self.patch_size;
        let mut flow = vec![
            ("image (C, H, W)".to_string(), vec![self.in_channels, h, w]),
            (
                format!("patch embed {p}x{p} + LayerNorm (H, W, C)"),
                vec![gh, gw, self.embed_dim],
            ),
        ];
        for (i, s) in self.stages().iter().enumerate() {
            let merge = if i > 0 { "patch merging, " } else { "" };
            let (wh, ww) = s.window;
            let shifted = if s.shift != (0, 0) && s.depth > 1 {
                ", shifted"
            } else {
                ""
            };
            flow.push((
                format!(
                    "layers.{i}: {merge}{} blocks, {} heads, {wh}x{ww} windows{shifted}",
                    s.depth, s.heads
                ),
                vec![s.res.0, s.res.1, s.dim],
            ));
        }
        flow.push((
            "LayerNorm, global average pool".into(),
            vec![self.num_features()],
        ));
        if self.num_classes > 0 {
            flow.push(("head.fc: logits".into(), vec![self.num_classes]));
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
    /// timm's initialisation: linear weights and relative position bias tables
    /// trunc-normal(0, 0.02) cut at ±2, linear biases 0, LayerNorm 1 and 0, the patch
    /// projection PyTorch's convolution default (uniform ±1/√fan_in). From ChaCha8 seeded
    /// with `seed`.
    fn init_params(&self, seed: u64, dev: &Device) -> Result<Vec<(String, Tensor)>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let fan_in = (self.in_channels * self.patch_size * self.patch_size) as f32;
        let mut out = Vec::new();
        for (name, shape) in self.param_shapes() {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.starts_with("patch_embed.proj.") {
                let bound = 1.0 / fan_in.sqrt();
                (0..n)
                    .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
                    .collect()
            } else if name.ends_with(".bias") {
                vec![0.0; n]
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
        Ok(Box::new(SwinTransformer::new(self, vb)?))
    }
}

/// For each pair of tokens of a wh×ww window (row-major), the row of their relative
/// position in the bias table: (Δrow + wh − 1)·(2ww − 1) + Δcol + ww − 1 (timm's
/// `get_relative_position_index`).
fn relative_position_index(wh: usize, ww: usize) -> Vec<u32> {
    let n = wh * ww;
    let mut idx = Vec::with_capacity(n * n);
    for a in 0..n {
        for b in 0..n {
            let dr = (a / ww + wh - 1) - b / ww;
            let dc = (a % ww + ww - 1) - b % ww;
            idx.push((dr * (2 * ww - 1) + dc) as u32);
        }
    }
    idx
}

/// The additive mask of shifted windows, (windows, N, N): 0 between tokens of the same
/// region of the rolled map, −100 between tokens the roll brought together; regions as
/// timm's `get_attn_mask` labels them (Python slices of the padded map).
fn shifted_window_mask(s: &StageSpec) -> Vec<f32> {
    let (hp, wp) = s.padded();
    let (wh, ww) = s.window;
    let (sh, sw) = s.shift;
    // The range of a Python slice [start:end] of a sequence of `len`.
    let slice = |start: isize, end: Option<isize>, len: usize| {
        let at = |i: isize| {
            if i < 0 {
                (len as isize + i).max(0) as usize
            } else {
                (i as usize).min(len)
            }
        };
        let (a, b) = (at(start), end.map_or(len, at));
        a..b.max(a)
    };
    let bands = |m: usize, s: usize| {
        let (m, s) = (m as isize, s as isize);
        [(0, Some(-m)), (-m, Some(-s)), (-s, None)]
    };
    let mut label = vec![0u32; hp * wp];
    let mut count = 0;
    for (r0, r1) in bands(wh, sh) {
        for (c0, c1) in bands(ww, sw) {
            for r in slice(r0, r1, hp) {
                for c in slice(c0, c1, wp) {
                    label[r * wp + c] = count;
                }
            }
            count += 1;
        }
    }
    let n = wh * ww;
    let mut mask = Vec::with_capacity(s.windows() * n * n);
    for wr in 0..hp / wh {
        for wc in 0..wp / ww {
            let at = |t: usize| label[(wr * wh + t / ww) * wp + wc * ww + t % ww];
            for a in 0..n {
                for b in 0..n {
                    mask.push(if at(a) == at(b) { 0.0 } else { -100.0 });
                }
            }
        }
    }
    mask
}

/// Multi-head self-attention within each window, with a learned bias per head and
/// relative position (timm `WindowAttention`).
#[derive(Debug, Clone)]
struct WindowAttention {
    qkv: Linear,  // C → 3C
    proj: Linear, // C → C
    /// ((2wh − 1)(2ww − 1), heads).
    relative_position_bias_table: Tensor,
    /// (N·N,) rows of the table for each pair of tokens.
    relative_position_index: Tensor,
    heads: usize,
    /// Tokens per window, N.
    area: usize,
    scale: f64,
    attn_drop: Dropout,
    proj_drop: Dropout,
}

impl WindowAttention {
    fn new(vb: &VarBuilder, cfg: &SwinConfig, s: &StageSpec) -> Result<Self> {
        let (wh, ww) = s.window;
        let index = relative_position_index(wh, ww);
        let n = index.len();
        Ok(WindowAttention {
            qkv: Linear::new(&vb.pp("qkv"), 3 * s.dim, s.dim, cfg.qkv_bias)?,
            proj: Linear::new(&vb.pp("proj"), s.dim, s.dim, true)?,
            relative_position_bias_table: vb.get(
                ((2 * wh - 1) * (2 * ww - 1), s.heads),
                "relative_position_bias_table",
            )?,
            relative_position_index: Tensor::from_vec(index, n, vb.device())?,
            heads: s.heads,
            area: wh * ww,
            scale: 1.0 / ((s.dim / s.heads) as f64).sqrt(),
            attn_drop: Dropout(cfg.attn_dropout),
            proj_drop: Dropout(cfg.proj_dropout),
        })
    }

    /// The relative position bias (1, heads, N, N).
    fn bias(&self) -> Result<Tensor> {
        let n = self.area;
        Ok(self
            .relative_position_bias_table
            .index_select(&self.relative_position_index, 0)? // (N·N, heads)
            .reshape((n, n, self.heads))?
            .permute((2, 0, 1))? // (heads, N, N)
            .unsqueeze(0)?)
    }

    /// The scores' additive bias: the relative position bias (1, heads, N, N), plus the
    /// shifted windows' `mask` (nW, N, N) when given: (nW, heads, N, N).
    fn scores_bias(&self, mask: Option<&Tensor>) -> Result<Tensor> {
        let bias = self.bias()?;
        Ok(match mask {
            Some(m) => bias.broadcast_add(&m.unsqueeze(1)?)?,
            None => bias,
        })
    }

    /// Windows (B·nW, N, C) → (B·nW, N, C); `mask` (nW, N, N) for shifted windows. The
    /// attention core is fused where it can be; dropout on the probabilities needs them in
    /// the open, so it takes the composed path.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, mode: &mut Mode) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?; // (B·nW, N, 3C)
        let bias = self.scores_bias(mask)?; // (nW or 1, heads, N, N)
        let out = if mode.draws() && self.attn_drop.0 > 0.0 {
            let (v, probs) = self.probs(&qkv, &bias)?;
            let probs = self.attn_drop.forward(&probs, mode)?;
            ops::merge_heads(&ops::matmul(&probs, &v)?)?
        } else {
            ops::attention_biased(&qkv, &bias, self.heads, self.scale)? // (B·nW, N, C)
        };
        self.proj_drop.forward(&self.proj.forward(&out)?, mode)
    }

    /// Evaluation forward that also returns the probabilities (B·nW, heads, N, N).
    fn forward_with_probs(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let qkv = self.qkv.forward(x)?;
        let (v, probs) = self.probs(&qkv, &self.scores_bias(mask)?)?;
        let out = ops::merge_heads(&ops::matmul(&probs, &v)?)?;
        Ok((self.proj.forward(&out)?, probs.detach()))
    }

    /// v (B·nW, heads, N, hd) and softmax(scale · q kᵀ + bias) (B·nW, heads, N, N).
    fn probs(&self, qkv: &Tensor, bias: &Tensor) -> Result<(Tensor, Tensor)> {
        let (q, k, v) = ops::split_heads(qkv, self.heads)?; // each (B·nW, heads, N, hd)
        let scores = ops::matmul(&(q * self.scale)?, &k.t()?)?; // (B·nW, heads, N, N)
        let scores = ops::add_attention_bias(&scores, bias)?;
        Ok((v, ops::softmax_last_dim(&scores)?))
    }
}

/// A Swin block: (shifted) window attention and MLP, each a pre-norm residual branch.
#[derive(Debug, Clone)]
struct SwinBlock {
    norm1: LayerNorm,
    attn: WindowAttention,
    norm2: LayerNorm,
    mlp: Mlp,
    drop_path: DropPath,
    window: (usize, usize),
    shift: (usize, usize),
    /// (nW, N, N) when the windows are shifted.
    mask: Option<Tensor>,
}

impl SwinBlock {
    /// (B, H, W, C) → (B, H, W, C).
    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let windows = self.split_windows(&self.norm1.forward(x)?)?; // (B·nW, N, C)
        let a = self.attn.forward(&windows, self.mask.as_ref(), mode)?;
        let a = self.merge_windows(&a, x.dims4()?)?; // (B, H, W, C)
        self.mlp_branch(x, &a, mode)
    }

    /// Evaluation forward that also returns what the block's attention shows: for each
    /// token, the attention it receives averaged over the queries of its window, on the
    /// block's map with the shift undone, (B, heads, H, W).
    fn forward_with_map(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let windows = self.split_windows(&self.norm1.forward(x)?)?;
        let (a, probs) = self.attn.forward_with_probs(&windows, self.mask.as_ref())?;
        let dims = x.dims4()?;
        let a = self.merge_windows(&a, dims)?;
        // (B·nW, heads, N, N) → mean over queries, channels last → (B·nW, N, heads).
        let received = probs.mean(2)?.transpose(1, 2)?.contiguous()?;
        let received = self.merge_windows(&received, dims)?; // (B, H, W, heads)
        let y = self.mlp_branch(x, &a, &mut Mode::Eval)?;
        Ok((y, received.permute((0, 3, 1, 2))?.contiguous()?))
    }

    /// x + drop_path(a), then x + drop_path(mlp(norm2 x)): (B, H, W, C).
    fn mlp_branch(&self, x: &Tensor, a: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let x = ops::add(x, &self.drop_path.forward(a, mode)?)?.reshape((b, h * w, c))?;
        let m = self.mlp.forward(&self.norm2.forward(&x)?, mode)?;
        Ok(ops::add(&x, &self.drop_path.forward(&m, mode)?)?.reshape((b, h, w, c))?)
    }

    /// The map rolled by minus the shift, padded to whole windows and cut into them:
    /// (B, H, W, C) → (B·nW, N, C), windows image-major and row-major.
    fn split_windows(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let (wh, ww) = self.window;
        let x = self.roll(x.clone(), -1)?;
        let (hp, wp) = (h.div_ceil(wh) * wh, w.div_ceil(ww) * ww);
        let x = x
            .pad_with_zeros(1, 0, hp - h)?
            .pad_with_zeros(2, 0, wp - w)?;
        Ok(x.reshape((b, hp / wh, wh, wp / ww, ww, c))?
            .permute((0, 1, 3, 2, 4, 5))? // (B, nh, nw, wh, ww, C)
            .reshape((b * (hp / wh) * (wp / ww), wh * ww, c))?)
    }

    /// The inverse of [`SwinBlock::split_windows`] for windows of K channels: (B·nW, N, K) →
    /// (B, H, W, K) for a map of `dims` (B, H, W, _).
    fn merge_windows(&self, x: &Tensor, dims: (usize, usize, usize, usize)) -> Result<Tensor> {
        let (b, h, w, _) = dims;
        let k = x.dim(2)?;
        let (wh, ww) = self.window;
        let (nh, nw) = (h.div_ceil(wh), w.div_ceil(ww));
        let x = x
            .reshape((b, nh, nw, wh, ww, k))?
            .permute((0, 1, 3, 2, 4, 5))?
            .reshape((b, nh * wh, nw * ww, k))?
            .narrow(1, 0, h)?
            .narrow(2, 0, w)?; // (B, H, W, K)
        self.roll(x, 1)
    }

    /// The map rolled by `sign` times the shift along rows and columns.
    fn roll(&self, mut x: Tensor, sign: isize) -> Result<Tensor> {
        for (dim, s) in [(1, self.shift.0), (2, self.shift.1)] {
            if s > 0 {
                x = x.roll((sign * s as isize) as i32, dim)?;
            }
        }
        Ok(x)
    }
}

/// 2×2 neighbours concatenated (timm's channel order: column offset, then row offset),
/// LayerNorm, linear 4C → C': (B, H, W, C) → (B, ⌈H/2⌉, ⌈W/2⌉, C'), odd sizes padded.
#[derive(Debug, Clone)]
struct PatchMerging {
    norm: LayerNorm,
    reduction: Linear,
}

impl PatchMerging {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let x = x.pad_with_zeros(1, 0, h % 2)?.pad_with_zeros(2, 0, w % 2)?;
        let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
        let x = x
            .reshape((b, h2, 2, w2, 2, c))?
            .permute((0, 1, 3, 4, 2, 5))? // (B, H/2, W/2, dw, dh, C)
            .reshape((b, h2, w2, 4 * c))?;
        self.reduction.forward(&self.norm.forward(&x)?)
    }
}

/// A stage: patch merging (all but the first), then its blocks.
#[derive(Debug, Clone)]
struct Stage {
    downsample: Option<PatchMerging>,
    blocks: Vec<SwinBlock>,
}

impl Stage {
    fn new(vb: &VarBuilder, cfg: &SwinConfig, s: &StageSpec, first_block: usize) -> Result<Self> {
        let eps = cfg.layer_norm_eps;
        let downsample = if first_block > 0 {
            let v = vb.pp("downsample");
            Some(PatchMerging {
                norm: LayerNorm::new(&v.pp("norm"), 4 * s.in_dim, eps)?,
                reduction: Linear::new(&v.pp("reduction"), s.dim, 4 * s.in_dim, false)?,
            })
        } else {
            None
        };
        let mask = if s.shift != (0, 0) {
            let n = s.window_area();
            let m = shifted_window_mask(s);
            Some(Tensor::from_vec(m, (s.windows(), n, n), vb.device())?.to_dtype(vb.dtype())?)
        } else {
            None
        };
        let blocks = (0..s.depth)
            .map(|j| {
                let v = vb.pp(format!("blocks.{j}"));
                let shifted = j % 2 == 1;
                Ok(SwinBlock {
                    norm1: LayerNorm::new(&v.pp("norm1"), s.dim, eps)?,
                    attn: WindowAttention::new(&v.pp("attn"), cfg, s)?,
                    norm2: LayerNorm::new(&v.pp("norm2"), s.dim, eps)?,
                    mlp: Mlp::new(&v.pp("mlp"), s.dim, cfg.mlp_hidden(s.dim), cfg.proj_dropout)?,
                    drop_path: DropPath(cfg.drop_path_rate(first_block + j)),
                    window: s.window,
                    shift: if shifted { s.shift } else { (0, 0) },
                    mask: if shifted { mask.clone() } else { None },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Stage { downsample, blocks })
    }

    /// (B, H, W, C) → (B, H', W', C').
    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let mut x = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        for block in &self.blocks {
            x = block.forward(&x, mode)?;
        }
        Ok(x)
    }
}

/// The network of a [`SwinConfig`].
#[derive(Debug, Clone)]
pub struct SwinTransformer {
    cfg: SwinConfig,
    patch_embed: PatchEmbed,
    patch_norm: LayerNorm,
    layers: Vec<Stage>,
    norm: LayerNorm,
    head_drop: Dropout,
    head: Option<Linear>,
}

impl SwinTransformer {
    pub fn new(cfg: &SwinConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let eps = cfg.layer_norm_eps;
        let pe = vb.pp("patch_embed");
        let mut first_block = 0;
        let layers = cfg
            .stages()
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let stage = Stage::new(&vb.pp(format!("layers.{i}")), cfg, s, first_block);
                first_block += s.depth;
                stage
            })
            .collect::<Result<Vec<_>>>()?;
        let f = cfg.num_features();
        let head = if cfg.num_classes > 0 {
            Some(Linear::new(&vb.pp("head.fc"), cfg.num_classes, f, true)?)
        } else {
            None
        };
        Ok(SwinTransformer {
            cfg: cfg.clone(),
            patch_embed: PatchEmbed::new(&pe, cfg.embed_dim, cfg.in_channels, cfg.patch_size)?,
            patch_norm: LayerNorm::new(&pe.pp("norm"), cfg.embed_dim, eps)?,
            layers,
            norm: LayerNorm::new(&vb.pp("norm"), f, eps)?,
            head_drop: Dropout(cfg.head_dropout),
            head,
        })
    }

    /// Images (B, C, H, W) → normalised patch embeddings (B, H/P, W/P, C).
    fn embed(&self, x: &Tensor) -> Result<Tensor> {
        super::check_images(x, &self.cfg)?;
        let (gh, gw) = self.cfg.grid();
        let tokens = self.patch_embed.forward(x)?; // (B, N, C)
        let (b, _, c) = tokens.dims3()?;
        self.patch_norm
            .forward(&tokens)?
            .reshape((b, gh, gw, c))
            .map_err(Into::into)
    }
}

impl Classifier for SwinTransformer {
    fn config(&self) -> ModelConfig {
        ModelConfig::Swin(self.cfg.clone())
    }

    /// Images → the last stage's normalised map (B, h, w, C), channels last as timm's.
    fn forward_features_t(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let mut x = self.embed(x)?;
        for stage in &self.layers {
            x = stage.forward(&x, mode)?;
        }
        self.norm.forward(&x)
    }

    /// Map (B, h, w, C) → global average pool (B, C) → dropout → logits (B, classes).
    fn forward_head_t(&self, feats: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let pooled = self.head_drop.forward(&feats.mean((1, 2))?, mode)?; // (B, C)
        match &self.head {
            Some(fc) => fc.forward(&pooled),
            None => Ok(pooled),
        }
    }

    /// Logits and the output maps of the stages listed in `indices`, channels first
    /// (B, C, h, w) and before the final norm, as timm's `forward_intermediates`.
    fn forward_intermediates(&self, x: &Tensor, indices: &[usize]) -> Result<Intermediates> {
        check_indices(indices, self.cfg.depth())?;
        let mode = &mut Mode::Eval;
        let mut x = self.embed(x)?;
        let mut levels = Vec::new();
        for stage in &self.layers {
            x = stage.forward(&x, mode)?;
            levels.push(x.clone());
        }
        let logits = self.forward_head(&self.norm.forward(&x)?)?;
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
        let mode = &mut Mode::Eval;
        let mut x = self.embed(x)?;
        let mut maps = Vec::new();
        for (i, stage) in self.layers.iter().enumerate() {
            if let Some(d) = &stage.downsample {
                x = d.forward(&x)?;
            }
            for (j, block) in stage.blocks.iter().enumerate() {
                let (y, received) = block.forward_with_map(&x)?;
                x = y;
                maps.push(LocalAttention {
                    name: format!("layers.{i}.blocks.{j}"),
                    received,
                    cells: Cells::Windows {
                        size: block.window,
                        shift: block.shift,
                    },
                });
            }
        }
        let logits = self.forward_head_t(&self.norm.forward(&x)?, mode)?;
        Ok(Some((logits, maps)))
    }
}

/// The shifted-window masks of a config's stages, for tests: (stage,
/// (nW, N, N) values) of each stage whose windows shift.
#[cfg(test)]
fn masks(cfg: &SwinConfig) -> Vec<(usize, Vec<f32>)> {
    cfg.stages()
        .iter()
        .enumerate()
        .filter(|(_, s)| s.shift != (0, 0))
        .map(|(i, s)| (i, shifted_window_mask(s)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::testutil;
    use super::*;
    use candle_core::DType;

    fn tiny() -> SwinConfig {
        SwinConfig {
            image_size: [20, 12],
            in_channels: 2,
            num_classes: 3,
            patch_size: 2,
            window_size: 3,
            ..SwinConfig::timm(8, &[2, 2, 1], &[2, 2, 4])
        }
    }

    #[test]
    fn stages_clamp_windows_and_shifts_as_timm() {
        // 10x6 map, window 3: padded to 12x6, shifted by 1; then 5x3 (columns fit in one
        // window: no shift there), then 3x2 (both fit: window 3x2, no shift).
        let s = tiny().stages();
        assert_eq!(
            (s[0].res, s[0].window, s[0].shift),
            ((10, 6), (3, 3), (1, 1))
        );
        assert_eq!(s[0].padded(), (12, 6));
        assert_eq!(
            (s[1].res, s[1].window, s[1].shift),
            ((5, 3), (3, 3), (1, 0))
        );
        assert_eq!(
            (s[2].res, s[2].window, s[2].shift),
            ((3, 2), (3, 2), (0, 0))
        );
        let swin_t = ModelConfig::preset("swin_tiny_patch4_window7_224").unwrap();
        let flow = swin_t.shape_flow();
        assert_eq!(flow[2].1, vec![56, 56, 96]);
        assert_eq!(flow[5].1, vec![7, 7, 768]);
        assert!(flow[5].0.contains("7x7 windows") && !flow[5].0.contains("shifted"));
    }

    #[test]
    fn relative_positions_index_the_table_as_timm() {
        // timm's get_relative_position_index(2, 3), row by row.
        let want: Vec<u32> = vec![
            7, 6, 5, 2, 1, 0, 8, 7, 6, 3, 2, 1, 9, 8, 7, 4, 3, 2, 12, 11, 10, 7, 6, 5, 13, 12, 11,
            8, 7, 6, 14, 13, 12, 9, 8, 7,
        ];
        assert_eq!(relative_position_index(2, 3), want);
    }

    #[test]
    fn the_shift_mask_separates_the_regions_the_roll_joins() {
        // A 4x4 map in 2x2 windows shifted by 1: the last window holds four regions.
        let cfg = SwinConfig {
            image_size: [4, 4],
            patch_size: 1,
            window_size: 2,
            ..SwinConfig::timm(4, &[2], &[1])
        };
        let (_, m) = &masks(&cfg)[0];
        assert_eq!(m.len(), 4 * 4 * 4);
        let window = |i: usize| &m[i * 16..(i + 1) * 16];
        assert!(window(0).iter().all(|&v| v == 0.0));
        // Window 1 (top right): columns 2 and 3, which the roll brought together.
        assert_eq!(window(1)[..4], [0.0, -100.0, 0.0, -100.0]);
        let last = window(3);
        let off_diagonal = (0..4).flat_map(|a| (0..4).map(move |b| (a, b)));
        for (a, b) in off_diagonal {
            assert_eq!(last[a * 4 + b], if a == b { 0.0 } else { -100.0 });
        }
    }

    #[test]
    fn presets_have_timms_flops() {
        // timm's table: Swin-T 4.51 GMACs, Swin-S 8.77, Swin-B 15.47.
        for (name, gmacs) in [
            ("swin_tiny_patch4_window7_224", 4.51),
            ("swin_small_patch4_window7_224", 8.77),
            ("swin_base_patch4_window7_224", 15.47),
        ] {
            let got = ModelConfig::preset(name).unwrap().flops() as f64 / 2e9;
            assert!((got / gmacs - 1.0).abs() < 0.01, "{name}: {got}");
        }
    }

    #[test]
    fn bad_configs_name_the_field() {
        let check = |c: SwinConfig, want: &str| {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        check(
            SwinConfig {
                num_heads: vec![2, 2],
                ..tiny()
            },
            "num_heads must give one value per stage",
        );
        check(
            SwinConfig {
                num_heads: vec![2, 3, 4],
                ..tiny()
            },
            "cannot have 3 heads",
        );
        check(
            SwinConfig {
                image_size: [21, 12],
                ..tiny()
            },
            "not divisible by patch_size",
        );
        check(
            SwinConfig {
                window_size: 0,
                ..tiny()
            },
            "window_size",
        );
        check(
            SwinConfig {
                image_size: [16384, 16384],
                patch_size: 1,
                ..tiny()
            },
            "2^20 tokens",
        );
        check(
            SwinConfig {
                mlp_ratio: f64::NAN,
                ..tiny()
            },
            "mlp_ratio must be a finite number",
        );
        check(
            SwinConfig {
                drop_path: 1.0,
                ..tiny()
            },
            "drop_path",
        );
        for (_, c) in super::super::presets() {
            c.validate().unwrap();
        }
    }

    /// The fused biased attention and the composed path that attention dropout takes give
    /// the same windows, shifted (with the mask) or not.
    #[test]
    fn fused_and_composed_window_attention_agree() {
        let cfg = tiny();
        let m = SwinTransformer::new(
            &cfg,
            VarBuilder::from_tensors(
                cfg.init_params(5, &Device::Cpu)
                    .unwrap()
                    .into_iter()
                    .collect(),
                DType::F32,
                &Device::Cpu,
            ),
        )
        .unwrap();
        for block in &m.layers[0].blocks {
            let attn = &block.attn;
            let n = attn.area;
            let x = Tensor::randn(0f32, 1.0, (2 * 8, n, 8), &Device::Cpu).unwrap();
            let fused = attn
                .forward(&x, block.mask.as_ref(), &mut Mode::Eval)
                .unwrap();
            let qkv = attn.qkv.forward(&x).unwrap();
            let bias = attn.scores_bias(block.mask.as_ref()).unwrap();
            let (v, probs) = attn.probs(&qkv, &bias).unwrap();
            let out = ops::merge_heads(&probs.matmul(&v).unwrap()).unwrap();
            let composed = attn.proj.forward(&out).unwrap();
            let diff = (fused - composed).unwrap().abs().unwrap();
            let diff = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{diff}");
        }
        assert!(m.layers[0].blocks[1].mask.is_some());
    }

    /// Window maps: one per block, on the block's map, each window's values summing to 1
    /// (every window is full here: no padding), the logits those of `forward`.
    #[test]
    fn window_maps_cover_every_block_and_sum_to_one_per_window() {
        let cfg = SwinConfig {
            image_size: [24, 12],
            ..tiny()
        };
        let m = ModelConfig::Swin(cfg).init_model(2, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 2, 24, 12), &Device::Cpu).unwrap();
        let (logits, maps) = m.local_attention(&x).unwrap().unwrap();
        let diff = (logits - m.forward(&x).unwrap()).unwrap().abs().unwrap();
        assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6);
        let names: Vec<&str> = maps.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "layers.0.blocks.0",
                "layers.0.blocks.1",
                "layers.1.blocks.0",
                "layers.1.blocks.1",
                "layers.2.blocks.0"
            ]
        );
        let first = &maps[1];
        assert_eq!(first.received.dims(), &[2, 2, 12, 6]);
        let windows = Cells::Windows {
            size: (3, 3),
            shift: (1, 1),
        };
        assert_eq!(first.cells, windows);
        // Sum over each unshifted window of block 0 (3x3 tiles from the corner): 1.
        let v: Vec<f32> = maps[0].received.flatten_all().unwrap().to_vec1().unwrap();
        for (b, h) in [(0, 0), (1, 1)] {
            let plane = &v[(b * 2 + h) * 72..][..72];
            for (wr, wc) in [(0, 0), (1, 1), (3, 0)] {
                let s: f32 = (0..9)
                    .map(|t| plane[(wr * 3 + t / 3) * 6 + wc * 3 + t % 3])
                    .sum();
                assert!((s - 1.0).abs() < 1e-5, "{s}");
            }
        }
    }

    /// Training-mode forward and backward through every kind of stage (padded, shifted,
    /// merged with odd sizes): every parameter, the bias tables included, gets a finite,
    /// non-zero gradient.
    #[test]
    fn every_parameter_receives_a_gradient() {
        let x = Tensor::randn(0f32, 1.0, (2, 2, 20, 12), &Device::Cpu).unwrap();
        let m =
            testutil::every_parameter_gets_a_gradient(&ModelConfig::Swin(tiny()), 3, &x, &[0, 2]);
        let taken = m.forward_intermediates(&x, &[0, 2]).unwrap();
        assert_eq!(taken.blocks[0].dims(), &[2, 8, 10, 6]);
        assert_eq!(taken.blocks[1].dims(), &[2, 32, 3, 2]);
        let diff = (taken.logits - m.forward(&x).unwrap())
            .unwrap()
            .abs()
            .unwrap();
        assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
