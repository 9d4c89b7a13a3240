//! The layers every model is built from, in timm's naming: `Linear`, `LayerNorm`, `Mlp`,
//! multi-head `Attention`, `Dropout` and `DropPath`, and the forward [`Mode`] (evaluation,
//! or training with its random stream). Numerics come from [`crate::ops`] only.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use crate::ops;
use crate::Result;

/// How a forward pass runs: evaluation, or training with the random stream that dropout
/// and stochastic depth draw from (so a run is a function of its seed).
pub enum Mode<'a> {
    Eval,
    Train(&'a mut ChaCha8Rng),
}

impl<'a> Mode<'a> {
    /// Training mode when a random stream is given, evaluation mode otherwise.
    pub fn from_rng(rng: Option<&'a mut ChaCha8Rng>) -> Self {
        rng.map_or(Mode::Eval, Mode::Train)
    }

    /// Whether dropout and drop-path are active.
    pub fn is_training(&self) -> bool {
        matches!(self, Mode::Train(_))
    }

    /// `f` with the random stream in training mode; `x` unchanged in evaluation mode.
    fn train_only(
        &mut self,
        x: &Tensor,
        f: impl FnOnce(&mut ChaCha8Rng) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match self {
            Mode::Train(rng) => f(rng),
            Mode::Eval => Ok(x.clone()),
        }
    }
}

/// Inverted dropout with rate `p` (timm `nn.Dropout`); the identity in evaluation mode.
#[derive(Debug, Clone, Copy)]
pub struct Dropout(pub f64);

impl Dropout {
    pub fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        mode.train_only(x, |rng| ops::dropout(x, self.0, rng))
    }
}

/// Stochastic depth with rate `p` on a residual branch (timm `DropPath`): whole samples
/// dropped; the identity in evaluation mode.
#[derive(Debug, Clone, Copy)]
pub struct DropPath(pub f64);

impl DropPath {
    pub fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        mode.train_only(x, |rng| ops::drop_path(x, self.0, rng))
    }
}

/// A linear layer's parameters, applied with [`ops::linear_cached`].
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor, // (out, in)
    pub bias: Option<Tensor>,
    /// The CPU kernels' packed copy of an inference weight (see [`ops::WeightCache`]).
    pub packed: ops::WeightCache,
}

impl Linear {
    pub fn new(vb: &VarBuilder, out_dim: usize, in_dim: usize, bias: bool) -> Result<Self> {
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

    /// (..., in) → (..., out).
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
    pub fn new(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
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

/// The transformer MLP (timm `Mlp`): fc1 (D → hidden), GELU, dropout, fc2 (hidden → D),
/// dropout.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub drop: Dropout,
}

impl Mlp {
    pub fn new(vb: &VarBuilder, dim: usize, hidden: usize, drop: f64) -> Result<Self> {
        Ok(Mlp {
            fc1: Linear::new(&vb.pp("fc1"), hidden, dim, true)?,
            fc2: Linear::new(&vb.pp("fc2"), dim, hidden, true)?,
            drop: Dropout(drop),
        })
    }

    /// (B, T, D) → (B, T, D).
    pub fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let h = self.drop.forward(&self.fc1.forward_gelu(x)?, mode)?; // (B, T, hidden)
        self.drop.forward(&self.fc2.forward(&h)?, mode) // (B, T, D)
    }
}

/// Multi-head self-attention with one fused qkv projection (timm `Attention`).
#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: Linear,  // D → 3·D
    pub proj: Linear, // D → D
    pub num_heads: usize,
    /// 1/√head_dim.
    pub scale: f64,
    pub attn_drop: Dropout,
    pub proj_drop: Dropout,
}

impl Attention {
    pub fn new(
        vb: &VarBuilder,
        dim: usize,
        num_heads: usize,
        qkv_bias: bool,
        attn_drop: f64,
        proj_drop: f64,
    ) -> Result<Self> {
        Ok(Attention {
            qkv: Linear::new(&vb.pp("qkv"), 3 * dim, dim, qkv_bias)?,
            proj: Linear::new(&vb.pp("proj"), dim, dim, true)?,
            num_heads,
            scale: 1.0 / ((dim / num_heads) as f64).sqrt(),
            attn_drop: Dropout(attn_drop),
            proj_drop: Dropout(proj_drop),
        })
    }

    /// (B, T, D) → (B, T, D). The attention core is fused where it can be; dropout on the
    /// probabilities needs them in the open, so it takes the composed path.
    pub fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?; // (B, T, 3·D)
        let out = if mode.is_training() && self.attn_drop.0 > 0.0 {
            let (v, probs) = self.probs(&qkv)?;
            let probs = self.attn_drop.forward(&probs, mode)?;
            ops::merge_heads(&probs.matmul(&v)?)? // (B, T, D)
        } else {
            ops::attention(&qkv, self.num_heads, self.scale)? // (B, T, D)
        };
        self.proj_drop.forward(&self.proj.forward(&out)?, mode)
    }

    /// Evaluation forward that also returns the softmax probabilities (B, heads, T, T).
    pub fn forward_with_probs(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let qkv = self.qkv.forward(x)?; // (B, T, 3·D)
        let (v, probs) = self.probs(&qkv)?;
        let out = ops::merge_heads(&probs.matmul(&v)?)?; // (B, T, D)
        Ok((self.proj.forward(&out)?, probs.detach()))
    }

    /// v (B, heads, T, hd) and softmax(scale · q kᵀ) (B, heads, T, T) from qkv (B, T, 3·D).
    fn probs(&self, qkv: &Tensor) -> Result<(Tensor, Tensor)> {
        let (q, k, v) = ops::split_heads(qkv, self.num_heads)?; // each (B, heads, T, hd)
        let scores = (q * self.scale)?.matmul(&k.t()?)?; // (B, heads, T, T)
        Ok((v, ops::softmax_last_dim(&scores)?))
    }
}

/// A standard normal sample (Box–Muller; portable across machines).
pub fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// normal(0, std) resampled until it lies within ±2 (timm's `trunc_normal_` bounds are absolute).
pub fn trunc_normal(rng: &mut ChaCha8Rng, std: f32) -> f32 {
    loop {
        let v = normal(rng) * std;
        if (-2.0..=2.0).contains(&v) {
            return v;
        }
    }
}
