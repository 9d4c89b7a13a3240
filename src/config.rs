//! `ViTConfig`: the architecture as one flat serde struct, its named presets, validation,
//! the list of parameters it implies (timm naming) and its analytic cost.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How the token sequence becomes one vector per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The class token's output (the paper; timm `global_pool='token'`).
    #[serde(alias = "token")]
    Cls,
    /// The mean over patch tokens (timm `global_pool='avg'`).
    #[serde(alias = "avg")]
    Mean,
}

/// Which position embedding is added to the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PosEmbed {
    /// A learned parameter `pos_embed` of shape (1, tokens, D), as in the paper and timm.
    Learned,
    /// Fixed 2-D sine-cosine embedding (MAE / "simple ViT"); no parameter.
    Sincos2d,
    /// No position information at all.
    None,
}

/// Where each block's LayerNorms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormPlacement {
    /// `x = x + attn(norm1(x))`: the paper, timm and HF.
    Pre,
    /// `x = norm1(x + attn(x))`: the original Transformer, as in one reference tutorial.
    Post,
}

fn default_true() -> bool {
    true
}
fn default_eps() -> f64 {
    1e-6
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_pool() -> Pool {
    Pool::Cls
}
fn default_pos_embed() -> PosEmbed {
    PosEmbed::Learned
}
fn default_norm() -> NormPlacement {
    NormPlacement::Pre
}
fn default_channels() -> usize {
    3
}

/// A Vision Transformer's architecture. Field names follow timm where timm has one.
/// Serialised as TOML or JSON; fields with a default may be left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViTConfig {
    /// Input size as [height, width] in pixels.
    pub image_size: [usize; 2],
    /// Side of the square patches, in pixels. Both image sides must be multiples of it.
    pub patch_size: usize,
    /// Input channels: 3 for RGB, 1 for grayscale. Default 3.
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    /// Classes of the linear head; 0 means no head (the model returns pooled features).
    pub num_classes: usize,
    /// Token width D.
    pub embed_dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads; must divide `embed_dim`.
    pub num_heads: usize,
    /// MLP hidden width = floor(embed_dim · mlp_ratio). Default 4.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Whether the fused qkv projection has a bias. Default true.
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    /// Pooling: "cls" (default) or "mean".
    #[serde(default = "default_pool")]
    pub pool: Pool,
    /// timm's `fc_norm`: the final LayerNorm is applied after pooling (named `fc_norm`)
    /// instead of to every token (named `norm`). timm turns it on for mean pooling. Default false.
    #[serde(default)]
    pub fc_norm: bool,
    /// Position embedding: "learned" (default), "sincos2d" or "none".
    #[serde(default = "default_pos_embed")]
    pub pos_embed: PosEmbed,
    /// Whether a class token is prepended. Default true.
    #[serde(default = "default_true")]
    pub class_token: bool,
    /// Block norm placement: "pre" (default) or "post".
    #[serde(default = "default_norm")]
    pub norm: NormPlacement,
    /// LayerNorm epsilon: 1e-6 in timm (default), 1e-12 in HuggingFace checkpoints.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Dropout after adding position embeddings (timm `pos_drop_rate`). Default 0.
    #[serde(default)]
    pub embed_dropout: f64,
    /// Dropout on attention probabilities (timm `attn_drop_rate`). Default 0.
    #[serde(default)]
    pub attn_dropout: f64,
    /// Dropout after the attention and MLP output projections (timm `proj_drop_rate`). Default 0.
    #[serde(default)]
    pub proj_dropout: f64,
    /// Dropout before the head (timm `drop_rate`). Default 0.
    #[serde(default)]
    pub head_dropout: f64,
    /// Stochastic depth: the drop-path rate of the last block, rising linearly from 0. Default 0.
    #[serde(default)]
    pub drop_path: f64,
}

/// Names of all presets, in the order `vit info` lists them.
pub const PRESETS: &[&str] = &[
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_small_patch32_224",
    "vit_base_patch16_224",
    "vit_base_patch32_224",
    "vit_base_patch16_384",
    "vit_large_patch16_224",
    "vit_huge_patch14_224",
    "vit_fmnist",
    "vit_cifar_tiny",
    "vit_cifar_small",
];

impl ViTConfig {
    /// The plain ViT of the paper and timm: pre-norm, class token, learned positions,
    /// qkv bias, MLP ratio 4, 1000 ImageNet classes.
    pub fn timm(img: usize, patch: usize, dim: usize, depth: usize, heads: usize) -> Self {
        ViTConfig {
            image_size: [img, img],
            patch_size: patch,
            in_channels: 3,
            num_classes: 1000,
            embed_dim: dim,
            depth,
            num_heads: heads,
            mlp_ratio: 4.0,
            qkv_bias: true,
            pool: Pool::Cls,
            fc_norm: false,
            pos_embed: PosEmbed::Learned,
            class_token: true,
            norm: NormPlacement::Pre,
            layer_norm_eps: 1e-6,
            embed_dropout: 0.0,
            attn_dropout: 0.0,
            proj_dropout: 0.0,
            head_dropout: 0.0,
            drop_path: 0.0,
        }
    }

    /// A named preset. timm names follow timm's `vision_transformer.py` exactly (parameter
    /// counts match timm); the small-image presets are ours.
    pub fn preset(name: &str) -> Result<Self> {
        let c = match name {
            // timm vit_tiny_patch16_224 (DeiT-Ti dims): 5,717,416 parameters.
            "vit_tiny_patch16_224" => Self::timm(224, 16, 192, 12, 3),
            // timm vit_small_patch16_224: 22,050,664.
            "vit_small_patch16_224" => Self::timm(224, 16, 384, 12, 6),
            // timm vit_small_patch32_224: 22,878,952.
            "vit_small_patch32_224" => Self::timm(224, 32, 384, 12, 6),
            // timm vit_base_patch16_224 (ViT-B/16 of the paper): 86,567,656.
            "vit_base_patch16_224" => Self::timm(224, 16, 768, 12, 12),
            // timm vit_base_patch32_224: 88,224,232.
            "vit_base_patch32_224" => Self::timm(224, 32, 768, 12, 12),
            // timm vit_base_patch16_384: 86,859,496.
            "vit_base_patch16_384" => Self::timm(384, 16, 768, 12, 12),
            // timm vit_large_patch16_224 (ViT-L/16): 304,326,632.
            "vit_large_patch16_224" => Self::timm(224, 16, 1024, 24, 16),
            // timm vit_huge_patch14_224 (ViT-H/14) with a 1000-class head: 632,045,800.
            "vit_huge_patch14_224" => Self::timm(224, 14, 1280, 32, 16),
            // Ours: Fashion-MNIST / MNIST, 28×28×1, 7×7 patches of 4 px. Sized to train to
            // 90% test accuracy on 2 CPU cores within minutes (see BENCHMARKS.md).
            "vit_fmnist" => ViTConfig {
                in_channels: 1,
                num_classes: 10,
                mlp_ratio: 2.0,
                ..Self::timm(28, 4, 64, 6, 4)
            },
            // Ours: CIFAR-10 at 32×32, 8×8 patches of 4 px, DeiT-Ti / DeiT-S widths.
            "vit_cifar_tiny" => ViTConfig {
                num_classes: 10,
                ..Self::timm(32, 4, 192, 12, 3)
            },
            "vit_cifar_small" => ViTConfig {
                num_classes: 10,
                ..Self::timm(32, 4, 384, 12, 6)
            },
            _ => {
                return Err(Error::Unknown {
                    kind: "preset",
                    name: name.to_string(),
                    hint: format!(" (known: {})", PRESETS.join(", ")),
                })
            }
        };
        Ok(c)
    }

    /// Reads a config from a `.toml` or `.json` file and validates it.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let is_json = path.extension().is_some_and(|e| e == "json");
        let cfg: ViTConfig = if is_json {
            serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?
        } else {
            toml::from_str(&text).map_err(|e| Error::format(path, one_line(&e.to_string())))?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the numbers fit together; every error names the fields involved.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        let [h, w] = self.image_size;
        if self.patch_size == 0 || h == 0 || w == 0 {
            return bad("image_size and patch_size must be positive".into());
        }
        if h % self.patch_size != 0 || w % self.patch_size != 0 {
            return bad(format!(
                "image_size {h}x{w} is not divisible by patch_size {}",
                self.patch_size
            ));
        }
        if self.in_channels == 0 {
            return bad("in_channels must be positive".into());
        }
        if self.embed_dim == 0 || self.num_heads == 0 || self.depth == 0 {
            return bad("embed_dim, num_heads and depth must be positive".into());
        }
        if !self.embed_dim.is_multiple_of(self.num_heads) {
            return bad(format!(
                "embed_dim {} is not divisible by num_heads {}",
                self.embed_dim, self.num_heads
            ));
        }
        if self.mlp_hidden_dim() == 0 {
            return bad(format!("mlp_ratio {} gives an empty MLP", self.mlp_ratio));
        }
        if self.pool == Pool::Cls && !self.class_token {
            return bad("pool = \"cls\" needs class_token = true".into());
        }
        if self.pos_embed == PosEmbed::Sincos2d && !self.embed_dim.is_multiple_of(4) {
            return bad(format!(
                "pos_embed = \"sincos2d\" needs embed_dim divisible by 4, got {}",
                self.embed_dim
            ));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return bad("layer_norm_eps must be positive".into());
        }
        for (name, p) in [
            ("embed_dropout", self.embed_dropout),
            ("attn_dropout", self.attn_dropout),
            ("proj_dropout", self.proj_dropout),
            ("head_dropout", self.head_dropout),
            ("drop_path", self.drop_path),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} must be in [0, 1), got {p}"));
            }
        }
        Ok(())
    }

    /// Patch grid as (rows, columns).
    pub fn grid(&self) -> (usize, usize) {
        (
            self.image_size[0] / self.patch_size,
            self.image_size[1] / self.patch_size,
        )
    }

    /// Number of patches N.
    pub fn num_patches(&self) -> usize {
        let (gh, gw) = self.grid();
        gh * gw
    }

    /// Tokens in front of the patches (1 with a class token, else 0).
    pub fn num_prefix_tokens(&self) -> usize {
        usize::from(self.class_token)
    }

    /// Sequence length seen by the blocks: N + prefix tokens.
    pub fn num_tokens(&self) -> usize {
        self.num_patches() + self.num_prefix_tokens()
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// MLP hidden width, floor(D · mlp_ratio) as timm computes it.
    pub fn mlp_hidden_dim(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Flattened patch length C·P·P.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.patch_size * self.patch_size
    }

    /// Every parameter with its shape, in timm naming and timm's state-dict order.
    /// This is the one place that knows which tensors a config implies.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.embed_dim;
        let hid = self.mlp_hidden_dim();
        let mut p: Vec<(String, Vec<usize>)> = Vec::new();
        let mut add = |name: String, shape: Vec<usize>| p.push((name, shape));
        if self.class_token {
            add("cls_token".into(), vec![1, 1, d]);
        }
        if self.pos_embed == PosEmbed::Learned {
            add("pos_embed".into(), vec![1, self.num_tokens(), d]);
        }
        let (c, ps) = (self.in_channels, self.patch_size);
        add("patch_embed.proj.weight".into(), vec![d, c, ps, ps]);
        add("patch_embed.proj.bias".into(), vec![d]);
        for i in 0..self.depth {
            let b = format!("blocks.{i}");
            add(format!("{b}.norm1.weight"), vec![d]);
            add(format!("{b}.norm1.bias"), vec![d]);
            add(format!("{b}.attn.qkv.weight"), vec![3 * d, d]);
            if self.qkv_bias {
                add(format!("{b}.attn.qkv.bias"), vec![3 * d]);
            }
            add(format!("{b}.attn.proj.weight"), vec![d, d]);
            add(format!("{b}.attn.proj.bias"), vec![d]);
            add(format!("{b}.norm2.weight"), vec![d]);
            add(format!("{b}.norm2.bias"), vec![d]);
            add(format!("{b}.mlp.fc1.weight"), vec![hid, d]);
            add(format!("{b}.mlp.fc1.bias"), vec![hid]);
            add(format!("{b}.mlp.fc2.weight"), vec![d, hid]);
            add(format!("{b}.mlp.fc2.bias"), vec![d]);
        }
        let final_norm = if self.fc_norm { "fc_norm" } else { "norm" };
        add(format!("{final_norm}.weight"), vec![d]);
        add(format!("{final_norm}.bias"), vec![d]);
        if self.num_classes > 0 {
            add("head.weight".into(), vec![self.num_classes, d]);
            add("head.bias".into(), vec![self.num_classes]);
        }
        p
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Parameter counts per top-level module, in order: `patch_embed`, `cls_token`,
    /// `pos_embed`, one entry per block, the final norm and the head.
    pub fn param_groups(&self) -> Vec<(String, usize)> {
        let mut groups: Vec<(String, usize)> = Vec::new();
        for (name, shape) in self.param_shapes() {
            let parts: Vec<&str> = name.split('.').collect();
            let key = if parts[0] == "blocks" {
                format!("blocks.{}", parts[1])
            } else {
                parts[0].to_string()
            };
            let n: usize = shape.iter().product();
            match groups.last_mut() {
                Some((k, c)) if *k == key => *c += n,
                _ => groups.push((key, n)),
            }
        }
        groups
    }

    /// How one image's shape changes through the network: (stage, shape without batch).
    pub fn shape_flow(&self) -> Vec<(String, Vec<usize>)> {
        let [h, w] = self.image_size;
        let (n, t, d) = (self.num_patches(), self.num_tokens(), self.embed_dim);
        let mut flow = vec![
            ("image".to_string(), vec![self.in_channels, h, w]),
            (
                format!(
                    "patches ({}x{} of {}px)",
                    self.grid().0,
                    self.grid().1,
                    self.patch_size
                ),
                vec![n, self.patch_dim()],
            ),
            ("patch embedding".to_string(), vec![n, d]),
        ];
        if self.class_token {
            flow.push(("+ class token".to_string(), vec![t, d]));
        }
        flow.push((format!("{} blocks", self.depth), vec![t, d]));
        flow.push((
            format!("attention per block ({} heads)", self.num_heads),
            vec![self.num_heads, t, t],
        ));
        let pool = match self.pool {
            Pool::Cls => "pool (class token)",
            Pool::Mean => "pool (mean of patches)",
        };
        flow.push((pool.to_string(), vec![d]));
        if self.num_classes > 0 {
            flow.push(("head: logits".to_string(), vec![self.num_classes]));
        }
        flow
    }

    /// Forward-pass floating-point operations for one image (a multiply-add counts 2),
    /// counting the matrix products (patch embedding, qkv, attention scores and weighted sum,
    /// output projection, MLP, head); norms, softmax and activations are left out, as in
    /// timm's and fvcore's tables (which report half of this figure as MACs).
    pub fn flops(&self) -> u64 {
        let t = self.num_tokens() as u64;
        let n = self.num_patches() as u64;
        let d = self.embed_dim as u64;
        let h = self.mlp_hidden_dim() as u64;
        let embed = 2 * n * self.patch_dim() as u64 * d;
        let attn = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d;
        let mlp = 2 * 2 * t * d * h;
        let head = 2 * d * self.num_classes as u64;
        embed + self.depth as u64 * (attn + mlp) + head
    }
}

/// How an image file becomes the model's input at evaluation time (timm's `pretrained_cfg`
/// and HF's `preprocessor_config.json`). Stored in our checkpoints' metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Per-channel mean subtracted after scaling pixels to [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by.
    pub std: Vec<f32>,
    /// Fraction of the resized image kept by the center crop (timm `crop_pct`): the shorter
    /// side is resized to size / crop_pct, then the center is cropped. 1.0 keeps it all.
    pub crop_pct: f64,
    /// Resampling filter: "bicubic" (timm's default for ViT) or "bilinear".
    pub interpolation: String,
    /// "shorter" (timm: keep the aspect ratio, resize the shorter side, center crop) or
    /// "exact" (HF ViTImageProcessor: resize straight to the input size).
    #[serde(default = "default_resize")]
    pub resize: String,
}

fn default_resize() -> String {
    "shorter".into()
}

impl Preprocess {
    /// The ViT default of timm and HF: mean and std 0.5 for every channel, bicubic,
    /// no crop.
    pub fn vit_default(channels: usize) -> Self {
        Preprocess {
            mean: vec![0.5; channels],
            std: vec![0.5; channels],
            crop_pct: 1.0,
            interpolation: "bicubic".into(),
            resize: default_resize(),
        }
    }

    /// Checks lengths against the channel count and value ranges.
    pub fn validate(&self, channels: usize) -> Result<()> {
        if self.mean.len() != channels || self.std.len() != channels {
            return Err(Error::Config(format!(
                "mean and std need {channels} values for {channels}-channel input, got {} and {}",
                self.mean.len(),
                self.std.len()
            )));
        }
        if self.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return Err(Error::Config("std values must be positive".into()));
        }
        if !(self.crop_pct > 0.0 && self.crop_pct <= 1.0) {
            return Err(Error::Config(format!(
                "crop_pct must be in (0, 1], got {}",
                self.crop_pct
            )));
        }
        if !matches!(self.interpolation.as_str(), "bicubic" | "bilinear") {
            return Err(Error::Config(format!(
                "interpolation must be bicubic or bilinear, got '{}'",
                self.interpolation
            )));
        }
        if !matches!(self.resize.as_str(), "shorter" | "exact") {
            return Err(Error::Config(format!(
                "resize must be shorter or exact, got '{}'",
                self.resize
            )));
        }
        Ok(())
    }
}

/// Keeps the first line of a multi-line parser message.
fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_param_counts_match_timm() {
        // Counts printed by timm 1.0 (`sum(p.numel() for p in create_model(name).parameters())`).
        let want = [
            ("vit_tiny_patch16_224", 5_717_416),
            ("vit_small_patch16_224", 22_050_664),
            ("vit_small_patch32_224", 22_878_952),
            ("vit_base_patch16_224", 86_567_656),
            ("vit_base_patch32_224", 88_224_232),
            ("vit_base_patch16_384", 86_859_496),
            ("vit_large_patch16_224", 304_326_632),
            ("vit_huge_patch14_224", 632_045_800),
        ];
        for (name, n) in want {
            assert_eq!(ViTConfig::preset(name).unwrap().num_params(), n, "{name}");
        }
    }

    #[test]
    fn all_presets_validate() {
        for name in PRESETS {
            ViTConfig::preset(name).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn base16_flops_match_published_macs() {
        // timm lists vit_base_patch16_224 at 17.6 GMACs (35.1 GFLOPs).
        let f = ViTConfig::preset("vit_base_patch16_224").unwrap().flops() as f64;
        assert!((f / 2e9 - 17.56).abs() < 0.05, "{}", f / 2e9);
    }

    #[test]
    fn groups_sum_to_the_total() {
        let c = ViTConfig::preset("vit_tiny_patch16_224").unwrap();
        let g = c.param_groups();
        assert_eq!(g.iter().map(|(_, n)| n).sum::<usize>(), c.num_params());
        assert_eq!(g[0], ("cls_token".to_string(), 192));
        assert_eq!(g[3], ("blocks.0".to_string(), 444_864));
        assert_eq!(g.len(), 3 + 12 + 2);
    }

    #[test]
    fn unknown_preset_lists_known_ones() {
        let e = ViTConfig::preset("vit_gigantic").unwrap_err().to_string();
        assert!(
            e.contains("unknown preset 'vit_gigantic'") && e.contains("vit_fmnist"),
            "{e}"
        );
    }

    #[test]
    fn inconsistent_configs_are_rejected() {
        let mut c = ViTConfig::preset("vit_fmnist").unwrap();
        c.num_heads = 5;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("not divisible by num_heads 5"), "{e}");
        let mut c = ViTConfig::preset("vit_fmnist").unwrap();
        c.patch_size = 5;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("28x28 is not divisible by patch_size 5"), "{e}");
    }

    #[test]
    fn toml_round_trip_with_defaults_and_aliases() {
        let text = "image_size = [32, 32]\npatch_size = 8\nnum_classes = 10\n\
                    embed_dim = 64\ndepth = 2\nnum_heads = 4\npool = \"avg\"\n";
        let c: ViTConfig = toml::from_str(text).unwrap();
        assert_eq!(c.pool, Pool::Mean);
        assert_eq!(c.in_channels, 3);
        assert_eq!(c.layer_norm_eps, 1e-6);
        let back: ViTConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
