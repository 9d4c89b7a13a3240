//! The Vision Transformer (Dosovitskiy et al. 2020) as timm builds it: patch embedding,
//! class token, position embedding, transformer blocks, final norm, pooling, linear head.
//! `ViTConfig` is the architecture as one flat serde struct with its named presets;
//! struct nesting mirrors timm's checkpoint names. With a `backbone` it is the paper's hybrid:
//! the tokens come from a CNN's feature map (`hybrid.rs`) instead of the image's patches.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::hybrid::{HybridBackbone, HybridEmbed};
use super::layers::{
    normal, trunc_normal, Attention, DropPath, Dropout, LayerNorm, Linear, Mlp, Mode, PatchEmbed,
};
use super::{
    Architecture, Classifier, Intermediates, ModelConfig, Preprocess, Preset, Staged, Tokens,
};
use crate::{ops, Error, Result};

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

fn default_eps() -> f64 {
    1e-6
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
    #[serde(default = "super::default_channels")]
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
    #[serde(default = "super::default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Whether the fused qkv projection has a bias. Default true.
    #[serde(default = "super::default_true")]
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
    #[serde(default = "super::default_true")]
    pub class_token: bool,
    /// DeiT's distillation token after the class token, read by a second head
    /// (`head_dist`); the two heads' logits are averaged (timm `VisionTransformerDistilled`).
    /// Default false.
    #[serde(default)]
    pub distilled: bool,
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
    /// The hybrid ViT's CNN (timm's `HybridEmbed` backbone): when set, `patch_size` cuts its
    /// feature map, not the image. Default none: the plain ViT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone: Option<HybridBackbone>,
}

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
            distilled: false,
            norm: NormPlacement::Pre,
            layer_norm_eps: 1e-6,
            embed_dropout: 0.0,
            attn_dropout: 0.0,
            proj_dropout: 0.0,
            head_dropout: 0.0,
            drop_path: 0.0,
            backbone: None,
        }
    }

    /// timm's hybrid: the ViT on `backbone`'s feature map, cut into `patch`×`patch` cells.
    pub fn hybrid(
        backbone: HybridBackbone,
        img: usize,
        patch: usize,
        dim: usize,
        depth: usize,
        heads: usize,
    ) -> Self {
        ViTConfig {
            backbone: Some(backbone),
            ..ViTConfig::timm(img, patch, dim, depth, heads)
        }
    }

    /// Checks that the numbers fit together; every error names the fields involved.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        let [h, w] = self.image_size;
        if self.patch_size == 0 || h == 0 || w == 0 {
            return bad("image_size and patch_size must be positive".into());
        }
        if let Some(bb) = &self.backbone {
            bb.validate()?;
            let (fh, fw) = bb.feature_size(self.image_size);
            if fh % self.patch_size != 0 || fw % self.patch_size != 0 {
                return bad(format!(
                    "the backbone's {fh}x{fw} feature map (of a {h}x{w} image) is not \
                     divisible by patch_size {}",
                    self.patch_size
                ));
            }
        } else if h % self.patch_size != 0 || w % self.patch_size != 0 {
            return bad(format!(
                "image_size {h}x{w} is not divisible by patch_size {}",
                self.patch_size
            ));
        }
        // Sizes far beyond any real ViT are refused before anything is computed or
        // allocated from them (ViT-H/14 at 518 px has 1,370 tokens and width 1,280).
        for (name, value, most) in [
            ("image_size", h.max(w), 1 << 14),
            ("in_channels", self.in_channels, 1 << 10),
            ("embed_dim", self.embed_dim, 1 << 16),
            ("depth", self.depth, 1 << 10),
            ("num_classes", self.num_classes, 1 << 20),
            (
                "tokens (image_size / patch_size)²",
                self.num_patches(),
                1 << 16,
            ),
        ] {
            if value > most {
                return bad(format!("{name} is {value}, more than the {most} allowed"));
            }
        }
        crate::error::check_finite([
            ("mlp_ratio", self.mlp_ratio),
            ("layer_norm_eps", self.layer_norm_eps),
            ("embed_dropout", self.embed_dropout),
            ("attn_dropout", self.attn_dropout),
            ("proj_dropout", self.proj_dropout),
            ("head_dropout", self.head_dropout),
            ("drop_path", self.drop_path),
        ])?;
        if self.mlp_ratio > 64.0 {
            return bad(format!(
                "mlp_ratio is {}, more than the 64 allowed",
                self.mlp_ratio
            ));
        }
        if self.in_channels == 0 {
            return bad("in_channels must be positive".into());
        }
        // Each size within its bound, all of them together can still be beyond counting.
        if self.checked_flops().is_none() {
            return bad(format!(
                "embed_dim {}, depth {}, mlp_ratio {} and {} tokens together need more than \
                 2^64 FLOPs per image",
                self.embed_dim,
                self.depth,
                self.mlp_ratio,
                self.num_tokens()
            ));
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
        if self.mlp_ratio <= 0.0 || self.mlp_hidden_dim() == 0 {
            return bad(format!("mlp_ratio {} gives an empty MLP", self.mlp_ratio));
        }
        if self.distilled && !(self.class_token && self.pool == Pool::Cls && !self.fc_norm) {
            return bad(
                "distilled = true (DeiT) needs class_token = true, pool = \"cls\" and \
                 fc_norm = false: its heads read the class and distillation tokens"
                    .into(),
            );
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
        if self.layer_norm_eps <= 0.0 {
            return bad(format!(
                "layer_norm_eps must be positive, got {}",
                self.layer_norm_eps
            ));
        }
        crate::error::check_rates([
            ("embed_dropout", self.embed_dropout),
            ("attn_dropout", self.attn_dropout),
            ("proj_dropout", self.proj_dropout),
            ("head_dropout", self.head_dropout),
            ("drop_path", self.drop_path),
        ])?;
        Ok(())
    }

    /// Patch grid as (rows, columns): of the image, or of the hybrid's feature map.
    pub fn grid(&self) -> (usize, usize) {
        let (h, w) = match &self.backbone {
            Some(bb) => bb.feature_size(self.image_size),
            None => (self.image_size[0], self.image_size[1]),
        };
        (h / self.patch_size, w / self.patch_size)
    }

    /// Channels of what the patch projection cuts: the image's, or the feature map's.
    pub fn patch_channels(&self) -> usize {
        match &self.backbone {
            Some(bb) => bb.feature_dim(),
            None => self.in_channels,
        }
    }

    /// Number of patches N.
    pub fn num_patches(&self) -> usize {
        let (gh, gw) = self.grid();
        gh * gw
    }

    /// Tokens in front of the patches: the class token, and DeiT's distillation token.
    pub fn num_prefix_tokens(&self) -> usize {
        usize::from(self.class_token) + usize::from(self.distilled)
    }

    /// Sequence length seen by the blocks: N + prefix tokens.
    pub fn num_tokens(&self) -> usize {
        self.num_patches() + self.num_prefix_tokens()
    }

    /// MLP hidden width, floor(D · mlp_ratio) as timm computes it.
    pub fn mlp_hidden_dim(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Flattened patch length C·P·P (C the feature map's channels in a hybrid).
    pub fn patch_dim(&self) -> usize {
        self.patch_channels() * self.patch_size * self.patch_size
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
        if self.distilled {
            add("dist_token".into(), vec![1, 1, d]);
        }
        if let Some(bb) = &self.backbone {
            for (name, shape) in bb.param_shapes("patch_embed.backbone", self.in_channels) {
                add(name, shape);
            }
        }
        let (c, ps) = (self.patch_channels(), self.patch_size);
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
            for head in self.head_names() {
                add(format!("{head}.weight"), vec![self.num_classes, d]);
                add(format!("{head}.bias"), vec![self.num_classes]);
            }
        }
        p
    }

    /// The classifier heads: `head`, and DeiT's `head_dist`.
    pub fn head_names(&self) -> Vec<&'static str> {
        if self.distilled {
            vec!["head", "head_dist"]
        } else {
            vec!["head"]
        }
    }

    /// How one image's shape changes through the network: (stage, shape without batch).
    pub fn shape_flow(&self) -> Vec<(String, Vec<usize>)> {
        let [h, w] = self.image_size;
        let (n, t, d) = (self.num_patches(), self.num_tokens(), self.embed_dim);
        let mut flow = vec![("image".to_string(), vec![self.in_channels, h, w])];
        let (gh, gw) = self.grid();
        if let Some(bb) = &self.backbone {
            flow.extend(bb.shape_flow(self.image_size));
            flow.push((
                format!(
                    "feature-map cells ({gh}x{gw} of {p}x{p})",
                    p = self.patch_size
                ),
                vec![n, self.patch_dim()],
            ));
        } else {
            flow.push((
                format!("patches ({gh}x{gw} of {}px)", self.patch_size),
                vec![n, self.patch_dim()],
            ));
        }
        flow.push(("patch embedding".to_string(), vec![n, d]));
        if self.distilled {
            flow.push(("+ class and distillation tokens".to_string(), vec![t, d]));
        } else if self.class_token {
            flow.push(("+ class token".to_string(), vec![t, d]));
        }
        flow.push((format!("{} blocks", self.depth), vec![t, d]));
        flow.push((
            format!("attention per block ({} heads)", self.num_heads),
            vec![self.num_heads, t, t],
        ));
        let pool = match self.pool {
            Pool::Cls if self.distilled => "pool (class and distillation tokens)",
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
    /// counting the matrix products (a hybrid's backbone convolutions, patch embedding, qkv, attention scores and weighted sum,
    /// output projection, MLP, head); norms, softmax and activations are left out, as in
    /// timm's and fvcore's tables (which report half of this figure as MACs).
    /// Saturates at `u64::MAX`, which only a config [`ViTConfig::validate`] refuses reaches.
    pub fn flops(&self) -> u64 {
        self.checked_flops().unwrap_or(u64::MAX)
    }

    /// [`ViTConfig::flops`], or `None` when the count does not fit in a u64.
    fn checked_flops(&self) -> Option<u64> {
        let prod = |xs: &[u64]| xs.iter().try_fold(1u64, |a, &x| a.checked_mul(x));
        let t = self.num_tokens() as u64;
        let n = self.num_patches() as u64;
        let d = self.embed_dim as u64;
        let h = self.mlp_hidden_dim() as u64;
        let mut embed = prod(&[2, n, self.patch_dim() as u64, d])?;
        if let Some(bb) = &self.backbone {
            embed = embed.checked_add(bb.flops(self.in_channels, self.image_size)?)?;
        }
        let attn = prod(&[2, t, d, 3, d])?
            .checked_add(prod(&[2, 2, t, t, d])?)?
            .checked_add(prod(&[2, t, d, d])?)?;
        let mlp = prod(&[2, 2, t, d, h])?;
        let head = prod(&[
            2,
            d,
            self.num_classes as u64,
            self.head_names().len() as u64,
        ])?;
        prod(&[self.depth as u64, attn.checked_add(mlp)?])?
            .checked_add(embed)?
            .checked_add(head)
    }
}

/// timm's ViT presets and ours, by name, in the order `vit info` lists them. timm names
/// follow timm's `vision_transformer.py` exactly (parameter counts match timm), and their
/// preprocessing is that of timm's default pretrained weights for the name.
pub const PRESETS: &[Preset<ViTConfig>] = &[
    // timm vit_tiny_patch16_224 (DeiT-Ti dims): 5,717,416 parameters.
    timm("vit_tiny_patch16_224", || {
        ViTConfig::timm(224, 16, 192, 12, 3)
    }),
    // timm vit_small_patch16_224: 22,050,664.
    timm("vit_small_patch16_224", || {
        ViTConfig::timm(224, 16, 384, 12, 6)
    }),
    // timm vit_small_patch32_224: 22,878,952.
    timm("vit_small_patch32_224", || {
        ViTConfig::timm(224, 32, 384, 12, 6)
    }),
    // timm vit_base_patch16_224 (ViT-B/16 of the paper): 86,567,656.
    timm("vit_base_patch16_224", || {
        ViTConfig::timm(224, 16, 768, 12, 12)
    }),
    // timm vit_base_patch32_224: 88,224,232.
    timm("vit_base_patch32_224", || {
        ViTConfig::timm(224, 32, 768, 12, 12)
    }),
    // timm vit_base_patch16_384: 86,859,496. Its weights take the whole image squashed
    // to 384×384 (timm crop_pct 1.0, crop_mode 'squash').
    Preset {
        name: "vit_base_patch16_384",
        config: || ViTConfig::timm(384, 16, 768, 12, 12),
        pretrained: |_| Preprocess {
            resize: "exact".into(),
            ..Preprocess::vit_default(3)
        },
    },
    // timm vit_large_patch16_224 (ViT-L/16): 304,326,632.
    timm("vit_large_patch16_224", || {
        ViTConfig::timm(224, 16, 1024, 24, 16)
    }),
    // timm vit_huge_patch14_224 (ViT-H/14) with a 1000-class head: 632,045,800.
    timm("vit_huge_patch14_224", || {
        ViTConfig::timm(224, 14, 1280, 32, 16)
    }),
    // timm deit_*: DeiT (Touvron et al. 2021), the ViT trained on ImageNet alone; the
    // `_distilled_` ones add a distillation token and head (5,910,800 / 22,436,432 /
    // 87,338,192 parameters).
    deit("deit_tiny_patch16_224", || {
        ViTConfig::timm(224, 16, 192, 12, 3)
    }),
    deit("deit_small_patch16_224", || {
        ViTConfig::timm(224, 16, 384, 12, 6)
    }),
    deit("deit_base_patch16_224", || {
        ViTConfig::timm(224, 16, 768, 12, 12)
    }),
    deit("deit_tiny_distilled_patch16_224", || ViTConfig {
        distilled: true,
        ..ViTConfig::timm(224, 16, 192, 12, 3)
    }),
    deit("deit_small_distilled_patch16_224", || ViTConfig {
        distilled: true,
        ..ViTConfig::timm(224, 16, 384, 12, 6)
    }),
    deit("deit_base_distilled_patch16_224", || ViTConfig {
        distilled: true,
        ..ViTConfig::timm(224, 16, 768, 12, 12)
    }),
    // timm's hybrids (the paper's §3.1): the ViT on a ResNetV2's feature map.
    // vit_tiny_r_s16_p8_224: the stem alone (stride 4), 8×8 cells of its map: 6,337,704.
    timm("vit_tiny_r_s16_p8_224", || {
        ViTConfig::hybrid(HybridBackbone::resnetv2(&[]), 224, 8, 192, 12, 3)
    }),
    // vit_small_r26_s32_224: R26 (stride 32), 1×1 cells: 36,431,912.
    timm("vit_small_r26_s32_224", || {
        ViTConfig::hybrid(HybridBackbone::resnetv2(&[2, 2, 2, 2]), 224, 1, 384, 12, 6)
    }),
    // vit_base_r50_s16_384: the paper's R50+ViT-B/16, R50's first three stages (stride 16),
    // fine-tuned at 384: 98,950,952. Its weights take the shorter side resized to 384 and
    // the center (timm crop_pct 1.0).
    Preset {
        name: "vit_base_r50_s16_384",
        config: || ViTConfig::hybrid(HybridBackbone::resnetv2(&[3, 4, 9]), 384, 1, 768, 12, 12),
        pretrained: |_| Preprocess::vit_default(3),
    },
    // Ours: Fashion-MNIST / MNIST, 28×28×1, 7×7 patches of 4 px. Sized to train to 90% test
    // accuracy on 2 CPU cores within minutes (see BENCHMARKS.md).
    ours("vit_fmnist", || ViTConfig {
        in_channels: 1,
        num_classes: 10,
        mlp_ratio: 2.0,
        ..ViTConfig::timm(28, 4, 64, 6, 4)
    }),
    // Ours: vit_fmnist with DeiT's distillation token and head.
    ours("deit_fmnist", || ViTConfig {
        in_channels: 1,
        num_classes: 10,
        mlp_ratio: 2.0,
        distilled: true,
        ..ViTConfig::timm(28, 4, 64, 6, 4)
    }),
    // Ours: vit_fmnist's transformer on a small CNN's 7×7 map instead of 4-px patches: three
    // 3×3 convolutions (the first of stride 2) and a max-pool, 1×1 cells.
    ours("hybrid_fmnist", || ViTConfig {
        in_channels: 1,
        num_classes: 10,
        mlp_ratio: 2.0,
        ..ViTConfig::hybrid(small_stem(), 28, 1, 64, 6, 4)
    }),
    // Ours: vit_cifar_tiny's transformer on the same stem's 8×8 map of a 32×32 image.
    ours("hybrid_cifar", || ViTConfig {
        num_classes: 10,
        ..ViTConfig::hybrid(small_stem(), 32, 1, 192, 12, 3)
    }),
    // Ours: CIFAR-10 at 32×32, 8×8 patches of 4 px, DeiT-Ti / DeiT-S widths.
    ours("vit_cifar_tiny", || ViTConfig {
        num_classes: 10,
        ..ViTConfig::timm(32, 4, 192, 12, 3)
    }),
    ours("vit_cifar_small", || ViTConfig {
        num_classes: 10,
        ..ViTConfig::timm(32, 4, 384, 12, 6)
    }),
];

/// The small-image hybrids' CNN: timm's deep "SAME" stem of 32, 32 and 64 channels (the
/// first convolution of stride 2) and its 3×3 stride-2 max-pool: a quarter of the image's
/// resolution, no stages.
fn small_stem() -> HybridBackbone {
    HybridBackbone {
        stem: super::hybrid::Stem::DeepSame,
        ..HybridBackbone::resnetv2(&[])
    }
}

/// A timm preset with timm's default ViT pretrained preprocessing: mean and std 0.5,
/// bicubic, the shorter side resized to size / 0.9, then the center cropped (crop_pct 0.9).
const fn timm(name: &'static str, config: fn() -> ViTConfig) -> Preset<ViTConfig> {
    Preset {
        name,
        config,
        pretrained: |_| Preprocess {
            crop_pct: 0.9,
            ..Preprocess::vit_default(3)
        },
    }
}

/// A timm DeiT preset with its pretrained preprocessing: ImageNet mean and std, bicubic,
/// crop_pct 0.9.
const fn deit(name: &'static str, config: fn() -> ViTConfig) -> Preset<ViTConfig> {
    Preset {
        name,
        config,
        pretrained: |_| Preprocess::imagenet(0.9),
    }
}

/// One of our presets: trained by this tool, whose checkpoints say their preprocessing; the
/// ViT default (mean and std 0.5, no crop) otherwise.
const fn ours(name: &'static str, config: fn() -> ViTConfig) -> Preset<ViTConfig> {
    Preset {
        name,
        config,
        pretrained: |c| Preprocess::vit_default(c.in_channels),
    }
}

/// One transformer block: attention and MLP, each a residual branch with stochastic depth.
#[derive(Debug, Clone)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub drop_path: DropPath,
    pub placement: NormPlacement,
}

impl Block {
    fn new(vb: &VarBuilder, cfg: &ViTConfig, drop_path: f64) -> Result<Self> {
        let (d, eps) = (cfg.embed_dim, cfg.layer_norm_eps);
        Ok(Block {
            norm1: LayerNorm::new(&vb.pp("norm1"), d, eps)?,
            attn: Attention::new(
                &vb.pp("attn"),
                d,
                cfg.num_heads,
                cfg.qkv_bias,
                cfg.attn_dropout,
                cfg.proj_dropout,
            )?,
            norm2: LayerNorm::new(&vb.pp("norm2"), d, eps)?,
            mlp: Mlp::new(&vb.pp("mlp"), d, cfg.mlp_hidden_dim(), cfg.proj_dropout)?,
            drop_path: DropPath(drop_path),
            placement: cfg.norm,
        })
    }

    /// (B, T, D) → (B, T, D).
    pub fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        self.forward_with(x, mode, |x, mode| self.attn.forward(x, mode))
    }

    /// Evaluation forward that also returns the attention probabilities (B, heads, T, T).
    pub fn forward_with_attention(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut probs = None;
        let y = self.forward_with(x, &mut Mode::Eval, |x, _| {
            let (out, p) = self.attn.forward_with_probs(x)?;
            probs = Some(p);
            Ok(out)
        })?;
        Ok((y, probs.expect("the block ran its attention")))
    }

    /// The block around a given attention branch `attn`.
    fn forward_with(
        &self,
        x: &Tensor,
        mode: &mut Mode,
        mut attn: impl FnMut(&Tensor, &mut Mode) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let dp = self.drop_path;
        match self.placement {
            NormPlacement::Pre => {
                // x = x + attn(norm1(x)); x = x + mlp(norm2(x))
                let a = attn(&self.norm1.forward(x)?, mode)?;
                let x = ops::add(x, &dp.forward(&a, mode)?)?;
                let m = self.mlp.forward(&self.norm2.forward(&x)?, mode)?;
                ops::add(&x, &dp.forward(&m, mode)?)
            }
            NormPlacement::Post => {
                // x = norm1(x + attn(x)); x = norm2(x + mlp(x))
                let a = attn(x, mode)?;
                let x = self.norm1.forward(&ops::add(x, &dp.forward(&a, mode)?)?)?;
                let m = self.mlp.forward(&x, mode)?;
                self.norm2.forward(&ops::add(&x, &dp.forward(&m, mode)?)?)
            }
        }
    }
}

/// The whole network. Build it with [`VisionTransformer::new`] from a `VarBuilder` holding
/// tensors in timm naming (see [`crate::weights`] and [`init_params`]).
/// Images to patch tokens: the paper's linear patch embedding, or the hybrid's CNN and
/// projection (both timm's `patch_embed`).
#[derive(Debug, Clone)]
pub enum Embed {
    Patches(PatchEmbed),
    Hybrid(HybridEmbed),
}

impl Embed {
    /// (B, C, H, W) → (B, N, D).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Embed::Patches(p) => p.forward(x),
            Embed::Hybrid(h) => h.forward(x),
        }
    }
}

#[derive(Debug, Clone)]
pub struct VisionTransformer {
    pub cfg: ViTConfig,
    pub patch_embed: Embed,
    pub cls_token: Option<Tensor>, // (1, 1, D)
    /// DeiT's distillation token, (1, 1, D).
    pub dist_token: Option<Tensor>,
    /// Learned parameter or fixed sin-cos table, (1, T, D); `None` without positions.
    pub pos_embed: Option<Tensor>,
    pub pos_drop: Dropout,
    pub blocks: Vec<Block>,
    /// Final LayerNorm: on every token (`norm`) or after pooling (`fc_norm`).
    pub norm: LayerNorm,
    pub head_drop: Dropout,
    pub head: Option<Linear>,
    /// DeiT's second head, on the distillation token.
    pub head_dist: Option<Linear>,
}

impl VisionTransformer {
    /// Builds the model from tensors named as in timm's state dict.
    pub fn new(cfg: &ViTConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.embed_dim;
        let cls_token = if cfg.class_token {
            Some(vb.get((1, 1, d), "cls_token")?)
        } else {
            None
        };
        let pos_embed = match cfg.pos_embed {
            PosEmbed::Learned => Some(vb.get((1, cfg.num_tokens(), d), "pos_embed")?),
            PosEmbed::Sincos2d => Some(sincos_2d(cfg, vb.device())?),
            PosEmbed::None => None,
        };
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(&vb.pp(format!("blocks.{i}")), cfg, drop_path_rate(cfg, i)))
            .collect::<Result<Vec<_>>>()?;
        let norm_name = if cfg.fc_norm { "fc_norm" } else { "norm" };
        let linear = |name: &str| Linear::new(&vb.pp(name), cfg.num_classes, d, true);
        let head = (cfg.num_classes > 0).then(|| linear("head")).transpose()?;
        let head_dist = (cfg.num_classes > 0 && cfg.distilled)
            .then(|| linear("head_dist"))
            .transpose()?;
        let dist_token = cfg
            .distilled
            .then(|| vb.get((1, 1, d), "dist_token"))
            .transpose()?;
        let (pe, c, p) = (vb.pp("patch_embed"), cfg.in_channels, cfg.patch_size);
        let patch_embed = match &cfg.backbone {
            Some(bb) => Embed::Hybrid(HybridEmbed::new(bb, &pe, d, c, p)?),
            None => Embed::Patches(PatchEmbed::new(&pe, d, c, p)?),
        };
        Ok(VisionTransformer {
            cfg: cfg.clone(),
            patch_embed,
            cls_token,
            dist_token,
            pos_embed,
            pos_drop: Dropout(cfg.embed_dropout),
            blocks,
            norm: LayerNorm::new(&vb.pp(norm_name), d, cfg.layer_norm_eps)?,
            head_drop: Dropout(cfg.head_dropout),
            head,
            head_dist,
        })
    }

    /// Images (B, C, H, W) → tokens (B, T, D) with positions added, before the blocks.
    fn embed(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        self.check_input(x)?;
        let x = self.patch_embed.forward(x)?; // (B, N, D)
        let (b, d) = (x.dim(0)?, x.dim(2)?);
        let mut parts = Vec::new();
        for token in [&self.cls_token, &self.dist_token].into_iter().flatten() {
            parts.push(token.broadcast_as((b, 1, d))?);
        }
        let mut x = if parts.is_empty() {
            x
        } else {
            parts.push(x);
            Tensor::cat(&parts, 1)? // (B, prefix + N, D)
        };
        if let Some(pos) = &self.pos_embed {
            x = x.broadcast_add(pos)?; // (B, T, D)
        }
        self.pos_drop.forward(&x, mode)
    }

    /// DeiT: the class token's logits and the distillation token's, (B, K) each (their
    /// features without a head).
    fn distilled_heads(&self, feats: &Tensor, mode: &mut Mode) -> Result<(Tensor, Tensor)> {
        let x = self
            .head_drop
            .forward(&feats.narrow(1, 0, 1)?.squeeze(1)?, mode)?; // (B, D)
        let x_dist = self
            .head_drop
            .forward(&feats.narrow(1, 1, 1)?.squeeze(1)?, mode)?;
        Ok(match (&self.head, &self.head_dist) {
            (Some(h), Some(hd)) => (h.forward(&x)?, hd.forward(&x_dist)?),
            _ => (x, x_dist),
        })
    }

    /// The final norm on every token, unless it comes after pooling (`fc_norm`).
    fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        if self.cfg.fc_norm {
            Ok(x.clone())
        } else {
            self.norm.forward(x)
        }
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        super::check_images(x, &self.cfg)
    }
}

impl Classifier for VisionTransformer {
    fn config(&self) -> ModelConfig {
        ModelConfig::Vit(self.cfg.clone())
    }

    /// Images → token features after the final norm, (B, T, D), as timm's `forward_features`.
    fn forward_features_t(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let mut x = self.embed(x, mode)?; // (B, T, D)
        for block in &self.blocks {
            x = block.forward(&x, mode)?;
        }
        self.final_norm(&x)
    }

    /// Token features (B, T, D) → logits (B, classes) (or pooled features without a head),
    /// as timm's `forward_head`. DeiT: the class token's and the distillation token's logits,
    /// averaged (their features averaged without a head).
    fn forward_head_t(&self, feats: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        if self.cfg.distilled {
            let (a, b) = self.distilled_heads(feats, mode)?;
            return Ok(((a + b)? / 2.0)?);
        }
        let prefix = self.cfg.num_prefix_tokens();
        let pooled = match self.cfg.pool {
            Pool::Cls => feats.narrow(1, 0, 1)?.squeeze(1)?, // (B, D)
            Pool::Mean => {
                let n = feats.dim(1)? - prefix;
                feats.narrow(1, prefix, n)?.mean(1)? // (B, D)
            }
        };
        let pooled = if self.cfg.fc_norm {
            self.norm.forward(&pooled)?
        } else {
            pooled
        };
        let pooled = self.head_drop.forward(&pooled, mode)?;
        match &self.head {
            Some(head) => head.forward(&pooled), // (B, classes)
            None => Ok(pooled),
        }
    }

    fn forward_heads_t(&self, x: &Tensor, mode: &mut Mode) -> Result<(Tensor, Tensor)> {
        let feats = self.forward_features_t(x, mode)?; // (B, T, D)
        if self.cfg.distilled {
            self.distilled_heads(&feats, mode)
        } else {
            let logits = self.forward_head_t(&feats, mode)?;
            Ok((logits.clone(), logits))
        }
    }

    /// Logits, with the outputs (B, T, D) and attention probabilities (B, heads, T, T) of the
    /// blocks listed in `indices` (0-based), in that order. Other blocks run as usual.
    fn forward_intermediates(&self, x: &Tensor, indices: &[usize]) -> Result<Intermediates> {
        check_indices(indices, self.blocks.len())?;
        let mut taken: Vec<Option<(Tensor, Tensor)>> = vec![None; self.blocks.len()];
        let mut x = self.embed(x, &mut Mode::Eval)?; // (B, T, D)
        for (i, block) in self.blocks.iter().enumerate() {
            if indices.contains(&i) {
                let (y, probs) = block.forward_with_attention(&x)?;
                taken[i] = Some((y.clone(), probs));
                x = y;
            } else {
                x = block.forward(&x, &mut Mode::Eval)?;
            }
        }
        let logits = self.forward_head(&self.final_norm(&x)?)?;
        let (blocks, attention) = indices
            .iter()
            .map(|&i| taken[i].clone().expect("an index checked above"))
            .unzip();
        Ok(Intermediates {
            logits,
            blocks,
            attention,
        })
    }

    fn pos_embed(&self) -> Option<&Tensor> {
        self.pos_embed.as_ref()
    }

    fn staged(&self) -> Option<&dyn Staged> {
        Some(self)
    }
}

impl Staged for VisionTransformer {
    fn stem(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        self.embed(x, mode) // (B, T, D)
    }

    fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    fn block(&self, i: usize, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        self.blocks[i].forward(x, mode) // (B, T, D)
    }

    fn heads(&self, x: &Tensor, mode: &mut Mode) -> Result<(Tensor, Tensor)> {
        let feats = self.final_norm(x)?;
        if self.cfg.distilled {
            self.distilled_heads(&feats, mode)
        } else {
            let logits = self.forward_head_t(&feats, mode)?; // (B, classes)
            Ok((logits.clone(), logits))
        }
    }
}

/// An error naming the first index that is not a block of a `depth`-block model.
pub(super) fn check_indices(indices: &[usize], depth: usize) -> Result<()> {
    match indices.iter().find(|&&l| l >= depth) {
        Some(bad) => Err(Error::Invalid(format!(
            "layer {bad} does not exist: the model has {depth} blocks (0..={})",
            depth.saturating_sub(1)
        ))),
        None => Ok(()),
    }
}

impl Architecture for ViTConfig {
    fn validate(&self) -> Result<()> {
        ViTConfig::validate(self)
    }
    super::input_and_classes_fields!();
    fn set_drop_path(&mut self, rate: f64) {
        self.drop_path = rate;
    }
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        ViTConfig::param_shapes(self)
    }
    fn head_names(&self) -> Vec<&'static str> {
        ViTConfig::head_names(self)
    }
    fn tokens(&self) -> Option<Tokens> {
        Some(Tokens {
            prefix: self.num_prefix_tokens(),
            grid: self.grid(),
            // A hybrid's token covers its feature-map cell: the image over the grid.
            patch_size: self.image_size[0] / self.grid().0.max(1),
            learned_pos_embed: self.pos_embed == PosEmbed::Learned,
        })
    }
    fn depth(&self) -> usize {
        self.depth
    }
    fn attention_heads(&self) -> Option<usize> {
        Some(self.num_heads)
    }
    fn flops(&self) -> u64 {
        ViTConfig::flops(self)
    }
    fn shape_flow(&self) -> Vec<(String, Vec<usize>)> {
        ViTConfig::shape_flow(self)
    }
    fn default_preprocess(&self) -> Preprocess {
        Preprocess::vit_default(self.in_channels)
    }
    fn init_params(&self, seed: u64, dev: &Device) -> Result<Vec<(String, Tensor)>> {
        init_params(self, seed, dev)
    }
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Classifier>> {
        Ok(Box::new(VisionTransformer::new(self, vb)?))
    }
}

/// Stochastic-depth rate of block `i`: linear from 0 to `drop_path` (timm's schedule).
fn drop_path_rate(cfg: &ViTConfig, i: usize) -> f64 {
    if cfg.depth <= 1 {
        return cfg.drop_path;
    }
    cfg.drop_path * i as f64 / (cfg.depth - 1) as f64
}

/// Fixed 2-D sine-cosine position embedding (MAE `get_2d_sincos_pos_embed`), (1, T, D):
/// the first D/2 channels encode the column, the last D/2 the row; each half is
/// [sin(p·ω_k), cos(p·ω_k)] with ω_k = 10000^(−k/(D/4)). The class token gets zeros.
pub fn sincos_2d(cfg: &ViTConfig, dev: &Device) -> Result<Tensor> {
    let (gh, gw) = cfg.grid();
    let d = cfg.embed_dim;
    let quarter = d / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let prefix = cfg.num_prefix_tokens();
    let mut table = vec![0f32; (prefix + gh * gw) * d];
    for r in 0..gh {
        for c in 0..gw {
            let row = &mut table[(prefix + r * gw + c) * d..][..d];
            for (half, pos) in [(0, c as f64), (1, r as f64)] {
                for (k, w) in omega.iter().enumerate() {
                    row[half * d / 2 + k] = (pos * w).sin() as f32;
                    row[half * d / 2 + quarter + k] = (pos * w).cos() as f32;
                }
            }
        }
    }
    Ok(Tensor::from_vec(table, (1, prefix + gh * gw, d), dev)?)
}

/// Fresh parameters as timm initialises a ViT: linear weights and the position embedding
/// trunc-normal(0, 0.02) cut at ±2, linear biases 0, LayerNorm 1 and 0, class token
/// normal(0, 1e-6), patch projection PyTorch's conv default (uniform ±1/√fan_in for weight
/// and bias); a hybrid's backbone as timm's ResNetV2 (convolutions He-normal by fan-out,
/// GroupNorm 1 and 0). Drawn from ChaCha8 seeded with `seed`, so every machine gets the same model.
pub fn init_params(cfg: &ViTConfig, seed: u64, dev: &Device) -> Result<Vec<(String, Tensor)>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let fan_in = cfg.patch_dim() as f32;
    let mut out = Vec::new();
    for (name, shape) in cfg.param_shapes() {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.starts_with("patch_embed.backbone.") {
            if shape.len() == 4 {
                let fan_out = shape[0] * shape[2] * shape[3];
                let std = (2.0 / fan_out as f32).sqrt();
                (0..n).map(|_| normal(&mut rng) * std).collect()
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                vec![1.0; n] // GroupNorm weight
            }
        } else if name.starts_with("patch_embed.") {
            let bound = 1.0 / fan_in.sqrt();
            (0..n)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
                .collect()
        } else if name == "cls_token" {
            (0..n).map(|_| normal(&mut rng) * 1e-6).collect()
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

/// Builds a model with fresh timm-style parameters (see [`init_params`]).
pub fn init_model(cfg: &ViTConfig, seed: u64, dev: &Device) -> Result<VisionTransformer> {
    let params = init_params(cfg, seed, dev)?.into_iter().collect();
    VisionTransformer::new(cfg, VarBuilder::from_tensors(params, DType::F32, dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vit_preset(name: &str) -> ViTConfig {
        ModelConfig::preset(name).unwrap().as_vit().unwrap().clone()
    }

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
            ("deit_tiny_patch16_224", 5_717_416),
            ("deit_small_patch16_224", 22_050_664),
            ("deit_base_patch16_224", 86_567_656),
            ("deit_tiny_distilled_patch16_224", 5_910_800),
            ("deit_small_distilled_patch16_224", 22_436_432),
            ("deit_base_distilled_patch16_224", 87_338_192),
            ("vit_tiny_r_s16_p8_224", 6_337_704),
            ("vit_small_r26_s32_224", 36_431_912),
            ("vit_base_r50_s16_384", 98_950_952),
        ];
        for (name, n) in want {
            assert_eq!(ModelConfig::preset(name).unwrap().num_params(), n, "{name}");
        }
    }

    #[test]
    fn all_presets_validate() {
        for Preset { name, .. } in PRESETS {
            ModelConfig::preset(name).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn base16_flops_match_published_macs() {
        // timm lists vit_base_patch16_224 at 17.6 GMACs (35.1 GFLOPs).
        let f = ModelConfig::preset("vit_base_patch16_224").unwrap().flops() as f64;
        assert!((f / 2e9 - 17.56).abs() < 0.05, "{}", f / 2e9);
    }

    /// Every size within its bound, the FLOP count overflowed a u64: a panic in debug
    /// builds, a wrong count in release. Seen while writing the fuzz targets;
    /// fuzz/seeds/model_config/regress-flops-overflow.toml keeps it.
    #[test]
    fn a_config_beyond_counting_is_refused_and_its_flops_saturate() {
        let c = ViTConfig {
            mlp_ratio: 64.0,
            ..ViTConfig::timm(4096, 16, 65536, 1024, 1)
        };
        assert_eq!(c.flops(), u64::MAX);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("more than 2^64 FLOPs per image"), "{e}");
        let fits = ViTConfig { depth: 64, ..c };
        fits.validate().unwrap();
        assert!(fits.flops() < u64::MAX);
    }

    #[test]
    fn groups_sum_to_the_total() {
        let c = ModelConfig::preset("vit_tiny_patch16_224").unwrap();
        let g = c.param_groups();
        assert_eq!(g.iter().map(|(_, n)| n).sum::<usize>(), c.num_params());
        assert_eq!(g[0], ("cls_token".to_string(), 192));
        assert_eq!(g[3], ("blocks.0".to_string(), 444_864));
        assert_eq!(g.len(), 3 + 12 + 2);
    }

    #[test]
    fn hybrids_count_flops_and_parameters_per_backbone_stage() {
        // torch.utils.flop_counter on timm's models (224 px; 384 for the R50).
        for (name, gflops) in [
            ("vit_tiny_r_s16_p8_224", 0.867_363_84),
            ("vit_small_r26_s32_224", 6.927_702_016),
            ("vit_base_r50_s16_384", 134.311_575_552),
        ] {
            let c = vit_preset(name);
            let ours = c.flops() as f64 / 1e9;
            assert!(
                (ours / gflops - 1.0).abs() < 1e-3,
                "{name}: {ours} vs {gflops}"
            );
        }
        let c = ModelConfig::preset("vit_base_r50_s16_384").unwrap();
        let g = c.param_groups();
        assert_eq!(g.iter().map(|(_, n)| n).sum::<usize>(), c.num_params());
        let names: Vec<&str> = g.iter().map(|(n, _)| n.as_str()).take(7).collect();
        assert_eq!(
            names,
            [
                "cls_token",
                "pos_embed",
                "patch_embed.backbone.stem",
                "patch_embed.backbone.stages.0",
                "patch_embed.backbone.stages.1",
                "patch_embed.backbone.stages.2",
                "patch_embed"
            ]
        );
        assert_eq!(vit_preset("vit_base_r50_s16_384").num_tokens(), 577);
        let tiny = vit_preset("vit_tiny_r_s16_p8_224");
        assert_eq!((tiny.grid(), tiny.patch_dim()), ((7, 7), 64 * 8 * 8));
    }

    #[test]
    fn a_hybrid_whose_map_the_cells_do_not_tile_is_refused() {
        let mut c = vit_preset("hybrid_fmnist");
        c.patch_size = 2;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains(
                "backbone's 7x7 feature map (of a 28x28 image) is not divisible by patch_size 2"
            ),
            "{e}"
        );
        let mut c = vit_preset("hybrid_fmnist");
        c.backbone.as_mut().unwrap().norm_groups = 5;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("backbone: a GroupNorm over 32 channels"), "{e}");
    }

    #[test]
    fn every_hybrid_parameter_receives_a_gradient() {
        let cfg = ModelConfig::Vit(ViTConfig {
            depth: 1,
            backbone: Some(HybridBackbone {
                layers: vec![1, 1],
                stem_channels: 8,
                channels: vec![16, 32],
                norm_groups: 4,
                ..HybridBackbone::resnetv2(&[])
            }),
            ..vit_preset("hybrid_fmnist")
        });
        let x = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu).unwrap();
        super::super::testutil::every_parameter_gets_a_gradient(&cfg, 4, &x, &[3, 7]);
        let small = ModelConfig::preset("hybrid_fmnist").unwrap();
        super::super::testutil::every_parameter_gets_a_gradient(&small, 5, &x, &[1, 2]);
    }

    #[test]
    fn unknown_preset_lists_known_ones() {
        let e = ModelConfig::preset("vit_gigantic").unwrap_err().to_string();
        assert!(
            e.contains("unknown preset 'vit_gigantic'") && e.contains("vit_fmnist"),
            "{e}"
        );
    }

    #[test]
    fn inconsistent_configs_are_rejected() {
        let mut c = vit_preset("vit_fmnist");
        c.num_heads = 5;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("not divisible by num_heads 5"), "{e}");
        let mut c = vit_preset("vit_fmnist");
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
    use candle_core::D;

    fn tiny(pool: Pool) -> ViTConfig {
        ViTConfig {
            image_size: [8, 12],
            in_channels: 2,
            num_classes: 3,
            pool,
            class_token: pool == Pool::Cls,
            fc_norm: pool == Pool::Mean,
            ..ViTConfig::timm(8, 4, 8, 2, 2)
        }
    }

    #[test]
    fn shapes_flow_from_image_to_logits() {
        let cfg = tiny(Pool::Cls);
        let m = init_model(&cfg, 0, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 2, 8, 12), &Device::Cpu).unwrap();
        assert_eq!(m.forward_features(&x).unwrap().dims(), &[5, 7, 8]);
        assert_eq!(m.forward(&x).unwrap().dims(), &[5, 3]);
        let taken = m.forward_intermediates(&x, &[1]).unwrap();
        assert_eq!(taken.attention[0].dims(), &[5, 2, 7, 7]);
        // The last block's output, normed, is what forward_features returns.
        let last = m.norm.forward(&taken.blocks[0]).unwrap();
        let feats = m.forward_features(&x).unwrap();
        let diff = (last - feats).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn capture_leaves_logits_unchanged_and_rows_sum_to_one() {
        let cfg = tiny(Pool::Mean);
        let m = init_model(&cfg, 1, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 2, 8, 12), &Device::Cpu).unwrap();
        let plain = m.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let Intermediates {
            logits, attention, ..
        } = m.forward_intermediates(&x, &[0, 1]).unwrap();
        assert_eq!(plain, logits.to_vec2::<f32>().unwrap());
        for a in attention {
            let sums = a.sum(D::Minus1).unwrap().flatten_all().unwrap();
            for s in sums.to_vec1::<f32>().unwrap() {
                assert!((s - 1.0).abs() < 1e-5);
            }
        }
        assert!(m.forward_intermediates(&x, &[2]).is_err());
    }

    /// Training mode draws dropout and drop-path from its stream (reproducibly); with every
    /// rate 0, or in evaluation mode, the forward is the evaluation one exactly.
    #[test]
    fn training_mode_draws_from_its_stream_only_where_rates_are_set() {
        let x = Tensor::randn(0f32, 1.0, (4, 2, 8, 12), &Device::Cpu).unwrap();
        let run = |cfg: &ViTConfig, seed: Option<u64>| {
            let m = init_model(cfg, 3, &Device::Cpu).unwrap();
            let mut rng = seed.map(ChaCha8Rng::seed_from_u64);
            m.forward_t(&x, &mut Mode::Train(rng.as_mut()))
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        let plain = tiny(Pool::Cls);
        assert_eq!(run(&plain, Some(1)), run(&plain, None));
        let drop = ViTConfig {
            embed_dropout: 0.1,
            attn_dropout: 0.1,
            proj_dropout: 0.1,
            head_dropout: 0.1,
            drop_path: 0.2,
            ..plain
        };
        assert_eq!(run(&drop, Some(1)), run(&drop, Some(1)));
        assert_ne!(run(&drop, Some(1)), run(&drop, Some(2)));
        assert_ne!(run(&drop, Some(1)), run(&drop, None));
    }

    #[test]
    fn patch_embed_equals_a_strided_convolution() {
        let cfg = tiny(Pool::Cls);
        let m = init_model(&cfg, 2, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 2, 8, 12), &Device::Cpu).unwrap();
        let Embed::Patches(pe) = &m.patch_embed else {
            panic!("a plain ViT embeds patches")
        };
        let ours = pe.forward(&x).unwrap(); // (1, 6, 8)
        let conv = x
            .conv2d(&pe.weight, 0, 4, 1, 1)
            .unwrap()
            .broadcast_add(&pe.bias.reshape((1, 8, 1, 1)).unwrap())
            .unwrap() // (1, 8, 2, 3)
            .flatten_from(2)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let diff = (ours - conv).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }

    #[test]
    fn init_is_seeded_and_has_timm_statistics() {
        let cfg = vit_preset("vit_fmnist");
        let a = init_params(&cfg, 7, &Device::Cpu).unwrap();
        let b = init_params(&cfg, 7, &Device::Cpu).unwrap();
        for ((na, ta), (_, tb)) in a.iter().zip(&b) {
            let (va, vb) = (ta.flatten_all().unwrap(), tb.flatten_all().unwrap());
            assert_eq!(
                va.to_vec1::<f32>().unwrap(),
                vb.to_vec1::<f32>().unwrap(),
                "{na}"
            );
        }
        let qkv = &a
            .iter()
            .find(|(n, _)| n == "blocks.0.attn.qkv.weight")
            .unwrap()
            .1;
        let v = qkv.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        assert!((std - 0.02).abs() < 0.001, "{std}");
    }

    /// Regression guard: candle-nn's fused softmax/layer_norm record no gradient, so a
    /// model built on them silently does not train. Every parameter must get a gradient.
    #[test]
    fn every_parameter_receives_a_nonzero_gradient() {
        use candle_nn::VarMap;
        for cfg in [
            tiny(Pool::Cls),
            tiny(Pool::Mean),
            ViTConfig {
                norm: NormPlacement::Post,
                qkv_bias: false,
                ..tiny(Pool::Cls)
            },
            ViTConfig {
                distilled: true,
                ..tiny(Pool::Cls)
            },
        ] {
            let dev = Device::Cpu;
            let varmap = VarMap::new();
            for (name, t) in init_params(&cfg, 3, &dev).unwrap() {
                varmap
                    .data()
                    .lock()
                    .unwrap()
                    .insert(name, candle_core::Var::from_tensor(&t).unwrap());
            }
            let m =
                VisionTransformer::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))
                    .unwrap();
            let x = Tensor::randn(0f32, 1.0, (3, 2, 8, 12), &dev).unwrap();
            let y = Tensor::new(&[0u32, 2, 1], &dev).unwrap();
            let loss = ops::cross_entropy(&m.forward(&x).unwrap(), &y, 0.1).unwrap();
            let grads = loss.backward().unwrap();
            let data = varmap.data().lock().unwrap();
            assert_eq!(data.len(), cfg.param_shapes().len());
            for (name, var) in data.iter() {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient"));
                let norm = g
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient {norm}");
            }
        }
    }

    #[test]
    fn sincos_table_matches_formula() {
        let cfg = ViTConfig {
            pos_embed: PosEmbed::Sincos2d,
            ..tiny(Pool::Cls)
        };
        let t = sincos_2d(&cfg, &Device::Cpu).unwrap(); // (1, 7, 8)
        let v = t.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        assert!(v[0].iter().all(|&x| x == 0.0)); // class token
                                                 // token 1 + (r=1)*3 + (c=2) = 6; quarter = 2, ω = [1, 0.01]
        let row = &v[6];
        assert!((row[0] - 2f32.sin()).abs() < 1e-6 && (row[2] - 2f32.cos()).abs() < 1e-6);
        assert!((row[4] - 1f32.sin()).abs() < 1e-6 && (row[5] - 0.01f32.sin()).abs() < 1e-6);
    }

    /// The captured probabilities are the ones each block multiplies the values with:
    /// rebuilding every block's output from them (and the block's own weights) gives the
    /// block's output, and they are what `forward_intermediates` returns.
    #[test]
    fn captured_attention_is_what_each_block_uses() {
        let p = crate::explain::testutil::predictor("timm_tiny");
        let x = p.input(&crate::explain::testutil::image()).unwrap();
        let cfg = p.config.as_vit().unwrap();
        let fitted = crate::weights::load_fitted(
            &crate::explain::testutil::fixture("timm_tiny/model.safetensors"),
            &crate::weights::Arch::Config(p.config.clone()),
            Default::default(),
        )
        .unwrap();
        let vb = VarBuilder::from_tensors(fitted.tensors, DType::F32, &Device::Cpu);
        let m = &VisionTransformer::new(cfg, vb).unwrap();
        let via_model = m.forward_intermediates(&x, &[0, 1]).unwrap().attention;
        let mut h = m.patch_embed.forward(&x).unwrap();
        let cls = m.cls_token.as_ref().unwrap();
        h = Tensor::cat(&[cls, &h], 1).unwrap();
        h = h.broadcast_add(m.pos_embed.as_ref().unwrap()).unwrap();
        for (i, block) in m.blocks.iter().enumerate() {
            let (out, probs) = block.forward_with_attention(&h).unwrap(); // probs (1, heads, T, T)
            assert_eq!(
                crate::explain::testutil::max_diff(&probs, &via_model[i]),
                0.0
            );
            let (b, t, d) = h.dims3().unwrap();
            let heads = block.attn.num_heads;
            let qkv = block
                .attn
                .qkv
                .forward(&block.norm1.forward(&h).unwrap())
                .unwrap()
                .reshape((b, t, 3, heads, d / heads))
                .unwrap()
                .permute((2, 0, 3, 1, 4))
                .unwrap();
            let v = qkv.get(2).unwrap().contiguous().unwrap();
            let mixed = probs
                .matmul(&v)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, d))
                .unwrap();
            let after_attn = (&h + block.attn.proj.forward(&mixed).unwrap()).unwrap();
            let mlp = block
                .mlp
                .forward(&block.norm2.forward(&after_attn).unwrap(), &mut Mode::Eval)
                .unwrap();
            let rebuilt = (&after_attn + mlp).unwrap();
            assert!(
                crate::explain::testutil::max_diff(&rebuilt, &out) < 1e-5,
                "block {i}"
            );
            h = out;
        }
    }
}
