//! The Vision Transformer (Dosovitskiy et al. 2020) as timm builds it: patch embedding,
//! class token, position embedding, transformer blocks, final norm, pooling, linear head.
//! Struct nesting mirrors timm's checkpoint names; `model` never touches files.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{NormPlacement, Pool, PosEmbed, ViTConfig};
use crate::ops;
use crate::Result;

/// Training-time randomness for dropout and stochastic depth; `None` is evaluation mode.
pub type Rng<'a> = Option<&'a mut ChaCha8Rng>;

/// A linear layer's parameters, applied with [`ops::linear_cached`].
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor, // (out, in)
    pub bias: Option<Tensor>,
    /// The CPU kernels' packed copy of an inference weight (see [`ops::WeightCache`]).
    pub packed: ops::WeightCache,
}

impl Linear {
    fn new(vb: &VarBuilder, out_dim: usize, in_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            packed: ops::WeightCache::default(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear_cached(x, &self.weight, self.bias.as_ref(), false, &self.packed)
    }

    /// `gelu(forward(x))`, fused where the device allows.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear_cached(x, &self.weight, self.bias.as_ref(), true, &self.packed)
    }
}

/// LayerNorm parameters over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    fn new(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// Cuts the image into P×P patches and projects each to D: a stride-P convolution,
/// done as a reshape and one matrix product.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    pub weight: Tensor, // (D, C, P, P), as timm's conv `patch_embed.proj.weight`
    pub bias: Tensor,   // (D,)
    pub patch_size: usize,
}

impl PatchEmbed {
    fn new(vb: &VarBuilder, cfg: &ViTConfig) -> Result<Self> {
        let vb = vb.pp("proj");
        let (d, c, p) = (cfg.embed_dim, cfg.in_channels, cfg.patch_size);
        Ok(PatchEmbed {
            weight: vb.get((d, c, p, p), "weight")?,
            bias: vb.get(d, "bias")?,
            patch_size: p,
        })
    }

    /// (B, C, H, W) → (B, N, D) with N = (H/P)·(W/P), patches in row-major order.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let patches = x
            .reshape(vec![b, c, gh, p, gw, p])? // (B, C, gh, P, gw, P)
            .permute(vec![0, 2, 4, 1, 3, 5])? // (B, gh, gw, C, P, P)
            .reshape((b, gh * gw, c * p * p))?; // (B, N, C·P·P)
        let d = self.weight.dim(0)?;
        let w = self.weight.reshape((d, c * p * p))?; // (D, C·P·P)
        ops::linear(&patches, &w, Some(&self.bias)) // (B, N, D)
    }
}

/// Multi-head self-attention with one fused qkv projection.
#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: Linear,  // D → 3·D
    pub proj: Linear, // D → D
    pub num_heads: usize,
    pub attn_drop: f64,
    pub proj_drop: f64,
}

impl Attention {
    fn new(vb: &VarBuilder, cfg: &ViTConfig) -> Result<Self> {
        let d = cfg.embed_dim;
        Ok(Attention {
            qkv: Linear::new(&vb.pp("qkv"), 3 * d, d, cfg.qkv_bias)?,
            proj: Linear::new(&vb.pp("proj"), d, d, true)?,
            num_heads: cfg.num_heads,
            attn_drop: cfg.attn_dropout,
            proj_drop: cfg.proj_dropout,
        })
    }

    /// (B, T, D) → (B, T, D); with `capture`, also the softmax probabilities (B, heads, T, T).
    pub fn forward(
        &self,
        x: &Tensor,
        rng: &mut Rng,
        capture: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (_, _, d) = x.dims3()?;
        let (h, hd) = (self.num_heads, d / self.num_heads);
        let scale = 1.0 / (hd as f64).sqrt();
        let qkv = self.qkv.forward(x)?; // (B, T, 3·D)
        let drop_probs = rng.is_some() && self.attn_drop > 0.0;
        let (out, captured) = if !capture && !drop_probs {
            (ops::attention(&qkv, h, scale)?, None) // (B, T, D), fused where it can be
        } else {
            let (q, k, v) = ops::split_heads(&qkv, h)?; // each (B, heads, T, hd)
            let scores = (q * scale)?.matmul(&k.t()?)?; // (B, heads, T, T)
            let probs = ops::softmax_last_dim(&scores)?;
            let captured = capture.then(|| probs.detach());
            let probs = match rng.as_deref_mut() {
                Some(r) => ops::dropout(&probs, self.attn_drop, r)?,
                None => probs,
            };
            (ops::merge_heads(&probs.matmul(&v)?)?, captured) // (B, T, D)
        };
        let out = self.proj.forward(&out)?;
        let out = match rng.as_deref_mut() {
            Some(r) => ops::dropout(&out, self.proj_drop, r)?,
            None => out,
        };
        Ok((out, captured))
    }
}

/// The MLP: fc1 (D → hidden), GELU, fc2 (hidden → D).
#[derive(Debug, Clone)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub drop: f64,
}

impl Mlp {
    fn new(vb: &VarBuilder, cfg: &ViTConfig) -> Result<Self> {
        let (d, hid) = (cfg.embed_dim, cfg.mlp_hidden_dim());
        Ok(Mlp {
            fc1: Linear::new(&vb.pp("fc1"), hid, d, true)?,
            fc2: Linear::new(&vb.pp("fc2"), d, hid, true)?,
            drop: cfg.proj_dropout,
        })
    }

    /// (B, T, D) → (B, T, D).
    pub fn forward(&self, x: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let h = self.fc1.forward_gelu(x)?; // (B, T, hidden)
        let h = match rng.as_deref_mut() {
            Some(r) => ops::dropout(&h, self.drop, r)?,
            None => h,
        };
        let out = self.fc2.forward(&h)?; // (B, T, D)
        match rng.as_deref_mut() {
            Some(r) => ops::dropout(&out, self.drop, r),
            None => Ok(out),
        }
    }
}

/// One transformer block: attention and MLP, each with a residual connection.
#[derive(Debug, Clone)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub placement: NormPlacement,
    /// Stochastic-depth rate of this block.
    pub drop_path: f64,
}

impl Block {
    fn new(vb: &VarBuilder, cfg: &ViTConfig, drop_path: f64) -> Result<Self> {
        let (d, eps) = (cfg.embed_dim, cfg.layer_norm_eps);
        Ok(Block {
            norm1: LayerNorm::new(&vb.pp("norm1"), d, eps)?,
            attn: Attention::new(&vb.pp("attn"), cfg)?,
            norm2: LayerNorm::new(&vb.pp("norm2"), d, eps)?,
            mlp: Mlp::new(&vb.pp("mlp"), cfg)?,
            placement: cfg.norm,
            drop_path,
        })
    }

    /// (B, T, D) → (B, T, D), and the attention probabilities when `capture` is set.
    pub fn forward(
        &self,
        x: &Tensor,
        rng: &mut Rng,
        capture: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        match self.placement {
            NormPlacement::Pre => {
                // x = x + attn(norm1(x)); x = x + mlp(norm2(x))
                let (a, probs) = self.attn.forward(&self.norm1.forward(x)?, rng, capture)?;
                let x = ops::add(x, &self.residual(a, rng)?)?;
                let m = self.mlp.forward(&self.norm2.forward(&x)?, rng)?;
                Ok((ops::add(&x, &self.residual(m, rng)?)?, probs))
            }
            NormPlacement::Post => {
                // x = norm1(x + attn(x)); x = norm2(x + mlp(x))
                let (a, probs) = self.attn.forward(x, rng, capture)?;
                let x = self.norm1.forward(&ops::add(x, &self.residual(a, rng)?)?)?;
                let m = self.mlp.forward(&x, rng)?;
                Ok((
                    self.norm2
                        .forward(&ops::add(&x, &self.residual(m, rng)?)?)?,
                    probs,
                ))
            }
        }
    }

    fn residual(&self, branch: Tensor, rng: &mut Rng) -> Result<Tensor> {
        match rng.as_deref_mut() {
            Some(r) => ops::drop_path(&branch, self.drop_path, r),
            None => Ok(branch),
        }
    }
}

/// The whole network. Build it with [`VisionTransformer::new`] from a `VarBuilder` holding
/// tensors in timm naming (see [`crate::weights`] and [`init_params`]).
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    pub cfg: ViTConfig,
    pub patch_embed: PatchEmbed,
    pub cls_token: Option<Tensor>, // (1, 1, D)
    /// Learned parameter or fixed sin-cos table, (1, T, D); `None` without positions.
    pub pos_embed: Option<Tensor>,
    pub blocks: Vec<Block>,
    /// Final LayerNorm: on every token (`norm`) or after pooling (`fc_norm`).
    pub norm: LayerNorm,
    pub head: Option<Linear>,
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
        let head = if cfg.num_classes > 0 {
            Some(Linear::new(&vb.pp("head"), cfg.num_classes, d, true)?)
        } else {
            None
        };
        Ok(VisionTransformer {
            cfg: cfg.clone(),
            patch_embed: PatchEmbed::new(&vb.pp("patch_embed"), cfg)?,
            cls_token,
            pos_embed,
            blocks,
            norm: LayerNorm::new(&vb.pp(norm_name), d, cfg.layer_norm_eps)?,
            head,
        })
    }

    /// Images (B, C, H, W) → logits (B, classes), or pooled features (B, D) without a head.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, &mut None)
    }

    /// As [`forward`](Self::forward), in training mode when `rng` is given (dropout, drop-path).
    pub fn forward_t(&self, x: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let feats = self.forward_features_t(x, rng, &[])?.0;
        self.forward_head_t(&feats, rng)
    }

    /// Images → token features after the final norm, (B, T, D), as timm's `forward_features`.
    pub fn forward_features(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_features_t(x, &mut None, &[])?.0)
    }

    /// Logits together with the attention probabilities (B, heads, T, T) of the blocks
    /// listed in `layers` (0-based), in that order. Other blocks run as usual.
    pub fn forward_with_attention(
        &self,
        x: &Tensor,
        layers: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        if let Some(&bad) = layers.iter().find(|&&l| l >= self.blocks.len()) {
            return Err(crate::Error::Invalid(format!(
                "layer {bad} does not exist: the model has {} blocks (0..={})",
                self.blocks.len(),
                self.blocks.len() - 1
            )));
        }
        let (feats, captured) = self.forward_features_t(x, &mut None, layers)?;
        let logits = self.forward_head_t(&feats, &mut None)?;
        let attn = layers
            .iter()
            .map(|l| captured[*l].clone().expect("captured layer"))
            .collect();
        Ok((logits, attn))
    }

    fn forward_features_t(
        &self,
        x: &Tensor,
        rng: &mut Rng,
        capture: &[usize],
    ) -> Result<(Tensor, Vec<Option<Tensor>>)> {
        self.check_input(x)?;
        let mut x = self.patch_embed.forward(x)?; // (B, N, D)
        let b = x.dim(0)?;
        if let Some(cls) = &self.cls_token {
            let d = cls.dim(2)?;
            x = Tensor::cat(&[&cls.broadcast_as((b, 1, d))?, &x], 1)?; // (B, N+1, D)
        }
        if let Some(pos) = &self.pos_embed {
            x = x.broadcast_add(pos)?; // (B, T, D)
        }
        if let Some(r) = rng.as_deref_mut() {
            x = ops::dropout(&x, self.cfg.embed_dropout, r)?;
        }
        let mut captured = Vec::with_capacity(self.blocks.len());
        for (i, block) in self.blocks.iter().enumerate() {
            let (y, probs) = block.forward(&x, rng, capture.contains(&i))?;
            x = y;
            captured.push(probs);
        }
        if !self.cfg.fc_norm {
            x = self.norm.forward(&x)?;
        }
        Ok((x, captured))
    }

    /// Token features (B, T, D) → logits (B, classes) (or pooled features without a head),
    /// as timm's `forward_head`.
    pub fn forward_head(&self, feats: &Tensor) -> Result<Tensor> {
        self.forward_head_t(feats, &mut None)
    }

    fn forward_head_t(&self, feats: &Tensor, rng: &mut Rng) -> Result<Tensor> {
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
        let pooled = match rng.as_deref_mut() {
            Some(r) => ops::dropout(&pooled, self.cfg.head_dropout, r)?,
            None => pooled,
        };
        match &self.head {
            Some(head) => head.forward(&pooled), // (B, classes)
            None => Ok(pooled),
        }
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let c = &self.cfg;
        let want = [c.in_channels, c.image_size[0], c.image_size[1]];
        let dims = x.dims();
        if dims.len() != 4 || dims[1..] != want {
            return Err(crate::Error::Shape {
                name: "input images".into(),
                expected: vec![0, want[0], want[1], want[2]],
                found: dims.to_vec(),
            });
        }
        Ok(())
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
/// and bias). Drawn from ChaCha8 seeded with `seed`, so every machine gets the same model.
pub fn init_params(cfg: &ViTConfig, seed: u64, dev: &Device) -> Result<Vec<(String, Tensor)>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let fan_in = cfg.patch_dim() as f32;
    let mut out = Vec::new();
    for (name, shape) in cfg.param_shapes() {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.starts_with("patch_embed.") {
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

/// A standard normal sample (Box–Muller; portable across machines).
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// normal(0, std) resampled until it lies within ±2 (timm's `trunc_normal_` bounds are absolute).
fn trunc_normal(rng: &mut ChaCha8Rng, std: f32) -> f32 {
    loop {
        let v = normal(rng) * std;
        if (-2.0..=2.0).contains(&v) {
            return v;
        }
    }
}

/// Builds a model with fresh timm-style parameters (see [`init_params`]).
pub fn init_model(cfg: &ViTConfig, seed: u64, dev: &Device) -> Result<VisionTransformer> {
    let params = init_params(cfg, seed, dev)?.into_iter().collect();
    VisionTransformer::new(cfg, VarBuilder::from_tensors(params, DType::F32, dev))
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let (_, attn) = m.forward_with_attention(&x, &[1]).unwrap();
        assert_eq!(attn[0].dims(), &[5, 2, 7, 7]);
    }

    #[test]
    fn capture_leaves_logits_unchanged_and_rows_sum_to_one() {
        let cfg = tiny(Pool::Mean);
        let m = init_model(&cfg, 1, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 2, 8, 12), &Device::Cpu).unwrap();
        let plain = m.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let (logits, attn) = m.forward_with_attention(&x, &[0, 1]).unwrap();
        assert_eq!(plain, logits.to_vec2::<f32>().unwrap());
        for a in attn {
            let sums = a.sum(D::Minus1).unwrap().flatten_all().unwrap();
            for s in sums.to_vec1::<f32>().unwrap() {
                assert!((s - 1.0).abs() < 1e-5);
            }
        }
        assert!(m.forward_with_attention(&x, &[2]).is_err());
    }

    #[test]
    fn patch_embed_equals_a_strided_convolution() {
        let cfg = tiny(Pool::Cls);
        let m = init_model(&cfg, 2, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 2, 8, 12), &Device::Cpu).unwrap();
        let ours = m.patch_embed.forward(&x).unwrap(); // (1, 6, 8)
        let conv = x
            .conv2d(&m.patch_embed.weight, 0, 4, 1, 1)
            .unwrap()
            .broadcast_add(&m.patch_embed.bias.reshape((1, 8, 1, 1)).unwrap())
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
        let cfg = ViTConfig::preset("vit_fmnist").unwrap();
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
}
