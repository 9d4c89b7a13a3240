//! The layers every model is built from, in timm's naming: `PatchEmbed`, `Linear`, `LayerNorm`, `Mlp`,
//! multi-head `Attention`, `Dropout` and `DropPath`, the convolution networks' `Conv2d` and
//! `BatchNorm2d`, the hybrid ViT backbone's `StdConv2d` and `GroupNorm`, and the forward [`Mode`] (evaluation, or training with its random stream). Numerics come from [`crate::ops`] only.

use std::sync::{Arc, Mutex};

use candle_core::{Tensor, Var};
use candle_nn::VarBuilder;
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use crate::ops;
use crate::Result;

/// How a forward pass runs: evaluation, or training, with the random stream that dropout
/// and stochastic depth draw from (so a run is a function of its seed) or without one (no
/// dropout: the benchmark, gradient checks). Training normalises BatchNorm by the batch.
pub enum Mode<'a> {
    Eval,
    Train(Option<&'a mut ChaCha8Rng>),
}

impl Mode<'_> {
    /// Whether this is a training pass (BatchNorm by batch statistics).
    pub fn is_training(&self) -> bool {
        matches!(self, Mode::Train(_))
    }

    /// Whether dropout and drop-path are active: training with a random stream.
    pub fn draws(&self) -> bool {
        matches!(self, Mode::Train(Some(_)))
    }

    /// `f` with the random stream when there is one; `x` unchanged otherwise.
    fn train_only(
        &mut self,
        x: &Tensor,
        f: impl FnOnce(&mut ChaCha8Rng) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match self {
            Mode::Train(Some(rng)) => f(rng),
            _ => Ok(x.clone()),
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

/// A linear layer's parameters, applied with [`ops::linear_cached`], or with
/// [`ops::linear_int8`] when the checkpoint holds the weight as int8 (`vit quantize`).
#[derive(Debug, Clone)]
pub struct Linear {
    /// (out, in) f32; for an int8 layer the same tensor as `int8.values` (u8 bytes of i8).
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// The CPU kernels' packed copy of an inference weight (see [`ops::WeightCache`]).
    pub packed: ops::WeightCache,
    /// The int8 weight and its per-channel scales, when the checkpoint has `weight_scale`.
    pub int8: Option<ops::Int8Weight>,
}

impl Linear {
    /// Tensors `weight` (and `bias`) under `vb`; with a `weight_scale` beside them, the
    /// weight is int8 (a quantized checkpoint) and the layer runs inference only.
    pub fn new(vb: &VarBuilder, out_dim: usize, in_dim: usize, bias: bool) -> Result<Self> {
        let int8 = if vb.contains_tensor(INT8_SCALE) {
            let values = vb.get_unchecked_dtype("weight", candle_core::DType::U8)?;
            if values.dims() != [out_dim, in_dim] {
                return Err(crate::Error::Invalid(format!(
                    "{}: int8 weight {:?}, expected {:?}",
                    vb.prefix(),
                    values.dims(),
                    [out_dim, in_dim]
                )));
            }
            let q = ops::Int8Weight::new(values, vb.get(out_dim, INT8_SCALE)?)?;
            Some(q.named(&vb.prefix(), input_range(vb)?)?)
        } else {
            None
        };
        let weight = match &int8 {
            Some(q) => q.values.clone(),
            None => vb.get((out_dim, in_dim), "weight")?,
        };
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            packed: ops::WeightCache::default(),
            int8,
        })
    }

    /// (..., in) → (..., out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.int8 {
            Some(q) => ops::linear_int8(x, q, self.bias.as_ref(), false),
            None => ops::linear_cached(x, &self.weight, self.bias.as_ref(), false, &self.packed),
        }
    }

    /// `gelu(forward(x))`, fused where the device allows.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        match &self.int8 {
            Some(q) => ops::linear_int8(x, q, self.bias.as_ref(), true),
            None => ops::linear_cached(x, &self.weight, self.bias.as_ref(), true, &self.packed),
        }
    }
}

/// The name, beside a linear layer's `weight`, of the per-channel scales of an int8 weight.
pub const INT8_SCALE: &str = "weight_scale";

/// The name, beside an int8 layer's weight, of its calibrated input range [lo, hi]
/// (`vit quantize --calibrate`: static activations).
pub const INT8_INPUT_RANGE: &str = "input_range";

/// The calibrated input range under `vb`, if the checkpoint has one.
fn input_range(vb: &VarBuilder) -> Result<Option<(f32, f32)>> {
    if !vb.contains_tensor(INT8_INPUT_RANGE) {
        return Ok(None);
    }
    let r = vb.get(2, INT8_INPUT_RANGE)?.to_vec1::<f32>()?;
    Ok(Some((r[0], r[1])))
}

/// Cuts the image into P×P patches and projects each to D: a stride-P convolution,
/// done as a reshape and one matrix product.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    /// (D, C, P, P), as timm's conv `patch_embed.proj.weight`; for an int8 projection the
    /// same tensor as `int8.values`, as u8 bytes of i8.
    pub weight: Tensor,
    pub bias: Tensor, // (D,)
    pub patch_size: usize,
    /// The int8 projection (D, C·P·P) and its per-channel scales, when the checkpoint has
    /// `proj.weight_scale`.
    pub int8: Option<ops::Int8Weight>,
}

impl PatchEmbed {
    /// D = `dim` outputs from `in_channels`-channel patches of side `patch`; tensors at
    /// `proj.weight` and `proj.bias` under `vb`.
    pub fn new(vb: &VarBuilder, dim: usize, in_channels: usize, patch: usize) -> Result<Self> {
        let vb = vb.pp("proj");
        let (d, c, p) = (dim, in_channels, patch);
        let (weight, int8) = if vb.contains_tensor(INT8_SCALE) {
            let values = vb.get_unchecked_dtype("weight", candle_core::DType::U8)?;
            if values.dims() != [d, c, p, p] {
                return Err(crate::Error::Invalid(format!(
                    "{}: int8 weight {:?}, expected {:?}",
                    vb.prefix(),
                    values.dims(),
                    [d, c, p, p]
                )));
            }
            let q = ops::Int8Weight::new(values.reshape((d, c * p * p))?, vb.get(d, INT8_SCALE)?)?;
            (values, Some(q.named(&vb.prefix(), input_range(&vb)?)?))
        } else {
            (vb.get((d, c, p, p), "weight")?, None)
        };
        Ok(PatchEmbed {
            weight,
            bias: vb.get(d, "bias")?,
            patch_size: p,
            int8,
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
        if let Some(q) = &self.int8 {
            return ops::linear_int8(&patches, q, Some(&self.bias), false); // (B, N, D)
        }
        let d = self.weight.dim(0)?;
        let w = self.weight.reshape((d, c * p * p))?; // (D, C·P·P)
        ops::linear(&patches, &w, Some(&self.bias)) // (B, N, D)
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

/// A 2-D convolution on channels-last images (B, H, W, C), without bias (the ResNets'; the
/// bias is the following BatchNorm's) or with one (PVT's); the weight is PyTorch's
/// (C_out, C_in, k, k), so checkpoints are timm's unchanged.
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub weight: Tensor,       // (C_out, C_in, k, k)
    pub bias: Option<Tensor>, // (C_out,)
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    /// A k×k convolution with timm's padding for it (k / 2).
    pub fn new(
        vb: &VarBuilder,
        c_out: usize,
        c_in: usize,
        k: usize,
        stride: usize,
    ) -> Result<Self> {
        Ok(Conv2d {
            weight: vb.get((c_out, c_in, k, k), "weight")?,
            bias: None,
            stride,
            padding: k / 2,
        })
    }

    /// A k×k convolution with a bias and the given padding.
    pub fn with_bias(
        vb: &VarBuilder,
        c_out: usize,
        c_in: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Conv2d {
            weight: vb.get((c_out, c_in, k, k), "weight")?,
            bias: Some(vb.get(c_out, "bias")?),
            stride,
            padding,
        })
    }

    /// (B, H, W, C_in) → (B, H', W', C_out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = ops::conv2d_nhwc(x, &self.weight, self.stride, self.padding)?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }
}

/// A weight-standardised convolution with TensorFlow's "SAME" padding on channels-last
/// images (timm's `StdConv2dSame`, BiT's and the hybrid ViT's): each output channel's
/// weights are used as (w − mean)/√(var + eps) over their C_in·k·k values, so only their
/// direction is learned. No bias. Output ⌈H/stride⌉ × ⌈W/stride⌉.
#[derive(Debug, Clone)]
pub struct StdConv2d {
    pub weight: Tensor, // (C_out, C_in, k, k), as stored
    pub stride: usize,
    pub eps: f64,
}

impl StdConv2d {
    /// timm's epsilon in the hybrid ViT's backbone.
    pub const EPS: f64 = 1e-8;

    pub fn new(
        vb: &VarBuilder,
        c_out: usize,
        c_in: usize,
        k: usize,
        stride: usize,
    ) -> Result<Self> {
        Ok(StdConv2d {
            weight: vb.get((c_out, c_in, k, k), "weight")?,
            stride,
            eps: Self::EPS,
        })
    }

    /// The weight as the convolution uses it, standardised per output channel.
    pub fn standardized_weight(&self) -> Result<Tensor> {
        let (o, i, k, _) = self.weight.dims4()?;
        let w = self.weight.reshape((o, i * k * k))?;
        let centred = w.broadcast_sub(&w.mean_keepdim(1)?)?;
        let var = centred.sqr()?.mean_keepdim(1)?; // biased, as timm's batch_norm trick
        Ok(centred
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .reshape((o, i, k, k))?)
    }

    /// (B, H, W, C_in) → (B, ⌈H/s⌉, ⌈W/s⌉, C_out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, h, w, _) = x.dims4()?;
        let k = self.weight.dim(2)?;
        let (top, bottom) = ops::same_padding(h, k, self.stride);
        let (left, right) = ops::same_padding(w, k, self.stride);
        let weight = self.standardized_weight()?;
        if top == bottom && left == right && top == left {
            return ops::conv2d_nhwc(x, &weight, self.stride, top);
        }
        // Uneven padding (a stride-2 window over an even side): pad first, then convolve.
        let x = x
            .pad_with_zeros(1, top, bottom)?
            .pad_with_zeros(2, left, right)?;
        ops::conv2d_nhwc(&x, &weight, self.stride, 0)
    }
}

/// Group normalisation over channels-last (B, H, W, C), optionally followed by a ReLU
/// (timm's `GroupNormAct`, by default 32 groups, eps 1e-5): parameters `weight` and `bias`, no buffers,
/// the same in training and evaluation.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    pub weight: Tensor, // (C,)
    pub bias: Tensor,   // (C,)
    pub groups: usize,
    pub eps: f64,
    pub relu: bool,
}

impl GroupNorm {
    /// timm's defaults in ResNetV2.
    pub const GROUPS: usize = 32;
    pub const EPS: f64 = 1e-5;

    pub fn new(vb: &VarBuilder, c: usize, groups: usize, relu: bool) -> Result<Self> {
        Ok(GroupNorm {
            weight: vb.get(c, "weight")?,
            bias: vb.get(c, "bias")?,
            groups,
            eps: Self::EPS,
            relu,
        })
    }

    /// (B, H, W, C) → (B, H, W, C).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = ops::group_norm_nhwc(x, &self.weight, &self.bias, self.groups, self.eps)?;
        if self.relu {
            ops::relu(&y)
        } else {
            Ok(y)
        }
    }
}

/// Batch normalisation over channels-last (B, H, W, C) with running statistics (PyTorch
/// `BatchNorm2d`, whose tensors are (B, C, H, W): the same per-channel statistics, and the
/// same names and values in a checkpoint): training normalises by the batch's statistics
/// and moves the running ones towards them by `momentum`; evaluation normalises by the
/// running ones.
///
/// The running statistics are buffers, not parameters: no gradient, no optimizer. When the
/// network is built from trainable variables they are variables too, updated in place (as
/// PyTorch updates its buffers), so a checkpoint of the variables holds them; a network
/// built from plain tensors (evaluation, a teacher) never changes them.
///
/// A training step runs a micro-batch as shards side by side (`train::step`): each shard
/// is normalised by its own statistics (as `DistributedDataParallel` without
/// `SyncBatchNorm` does), and the running statistics move once per micro-batch, from the
/// statistics of all its shards together: the step takes each layer's passes
/// ([`BatchNorm2d::take_pending`], the layers from [`super::Classifier::batch_norms`]),
/// gathers those of every process in a data-parallel run, and commits them
/// ([`BatchNorm2d::commit_passes`]). The update is then independent of the order in which
/// the shards finish and of the processes that ran them, so training stays a function of
/// its seed.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    pub weight: Tensor,       // (C,)
    pub bias: Tensor,         // (C,)
    pub running_mean: Tensor, // (C,)
    pub running_var: Tensor,  // (C,), unbiased
    pub eps: f64,
    pub momentum: f64,
    /// The training passes since the last commit.
    pending: Arc<Mutex<Vec<BnPass>>>,
}

/// One training pass of a [`BatchNorm2d`]: values per channel, and the batch's mean and
/// biased variance (C,).
pub type BnPass = (usize, Tensor, Tensor);

impl BatchNorm2d {
    /// PyTorch's defaults: eps 1e-5, momentum 0.1.
    pub const EPS: f64 = 1e-5;
    pub const MOMENTUM: f64 = 0.1;

    pub fn new(vb: &VarBuilder, c: usize) -> Result<Self> {
        Ok(BatchNorm2d {
            weight: vb.get(c, "weight")?,
            bias: vb.get(c, "bias")?,
            running_mean: vb.get(c, "running_mean")?,
            running_var: vb.get(c, "running_var")?,
            eps: Self::EPS,
            momentum: Self::MOMENTUM,
            pending: Arc::default(),
        })
    }

    /// The tensor names of a BatchNorm at `prefix`: its parameters and its buffers.
    pub fn param_names(prefix: &str) -> [String; 2] {
        [format!("{prefix}.weight"), format!("{prefix}.bias")]
    }
    pub fn buffer_names(prefix: &str) -> [String; 2] {
        [
            format!("{prefix}.running_mean"),
            format!("{prefix}.running_var"),
        ]
    }

    /// (B, H, W, C) → (B, H, W, C).
    pub fn forward(&self, x: &Tensor, mode: &Mode) -> Result<Tensor> {
        if !mode.is_training() {
            return ops::batch_norm_eval(
                x,
                &self.weight,
                &self.bias,
                &self.running_mean,
                &self.running_var,
                self.eps,
            );
        }
        let (b, h, w, _) = x.dims4()?;
        let n = b * h * w;
        if n < 2 {
            return Err(crate::Error::Invalid(format!(
                "batch normalisation in training needs more than one value per channel, got \
                 a batch of {b} at {h}x{w}: train with a larger batch"
            )));
        }
        let (y, mean, var) = ops::batch_norm_train(x, &self.weight, &self.bias, self.eps)?;
        if self.running_mean.is_variable() && self.running_var.is_variable() {
            self.pending
                .lock()
                .expect("batch-norm statistics lock")
                .push((n, mean, var));
        }
        Ok(y)
    }

    /// The training passes since the last commit, taken out.
    pub fn take_pending(&self) -> Vec<BnPass> {
        std::mem::take(&mut *self.pending.lock().expect("batch-norm statistics lock"))
    }

    /// Commits the training passes since the last commit ([`BatchNorm2d::commit_passes`]).
    pub fn commit(&self) -> Result<()> {
        self.commit_passes(self.take_pending())
    }

    /// Moves the running statistics towards those of `passes`, taken together as one batch
    /// of N values: running ← (1 − momentum)·running + momentum·batch, the batch variance
    /// made unbiased (N/(N−1)) as PyTorch does. With one pass this is PyTorch's update;
    /// with more, the pooled statistics are sums over the passes in their order (with two,
    /// sums of two terms, which do not depend on it). Nothing to do without passes (after
    /// evaluation).
    pub fn commit_passes(&self, passes: Vec<BnPass>) -> Result<()> {
        if passes.is_empty() {
            return Ok(());
        }
        let total: usize = passes.iter().map(|(n, _, _)| n).sum();
        let share = |n: usize| n as f64 / total as f64;
        let mut mean = passes[0].1.zeros_like()?;
        for (n, m, _) in &passes {
            mean = (mean + (m * share(*n))?)?;
        }
        // Pooled biased variance: Σ n·(var + (mean_i − mean)²) / N.
        let mut var = mean.zeros_like()?;
        for (n, m, v) in &passes {
            let spread = (v + m.sub(&mean)?.sqr()?)?;
            var = (var + (spread * share(*n))?)?;
        }
        let unbiased = (var * (total as f64 / (total - 1) as f64))?;
        let m = self.momentum;
        let new_mean = ((&self.running_mean * (1.0 - m))? + (mean * m)?)?;
        let new_var = ((&self.running_var * (1.0 - m))? + (unbiased * m)?)?;
        Var::from_tensor(&self.running_mean)?.set(&new_mean)?;
        Var::from_tensor(&self.running_var)?.set(&new_var)?;
        Ok(())
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
        let out = if mode.draws() && self.attn_drop.0 > 0.0 {
            let (v, probs) = self.probs(&qkv)?;
            let probs = self.attn_drop.forward(&probs, mode)?;
            ops::merge_heads(&ops::matmul(&probs, &v)?)? // (B, T, D)
        } else {
            ops::attention(&qkv, self.num_heads, self.scale)? // (B, T, D)
        };
        self.proj_drop.forward(&self.proj.forward(&out)?, mode)
    }

    /// Evaluation forward that also returns the softmax probabilities (B, heads, T, T).
    pub fn forward_with_probs(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let qkv = self.qkv.forward(x)?; // (B, T, 3·D)
        let (v, probs) = self.probs(&qkv)?;
        let out = ops::merge_heads(&ops::matmul(&probs, &v)?)?; // (B, T, D)
        Ok((self.proj.forward(&out)?, probs.detach()))
    }

    /// v (B, heads, T, hd) and softmax(scale · q kᵀ) (B, heads, T, T) from qkv (B, T, 3·D).
    fn probs(&self, qkv: &Tensor) -> Result<(Tensor, Tensor)> {
        let (q, k, v) = ops::split_heads(qkv, self.num_heads)?; // each (B, heads, T, hd)
        let scores = ops::matmul(&(q * self.scale)?, &k.t()?)?; // (B, heads, T, T)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn batch_norm(c: usize) -> (VarMap, BatchNorm2d) {
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().unwrap();
            for (name, v) in [
                ("weight", 1.5f32),
                ("bias", 0.1),
                ("running_mean", 0.2),
                ("running_var", 2.0),
            ] {
                let t = Tensor::full(v, c, &Device::Cpu).unwrap();
                data.insert(name.to_string(), Var::from_tensor(&t).unwrap());
            }
        }
        let bn = BatchNorm2d::new(
            &VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
            c,
        )
        .unwrap();
        (varmap, bn)
    }

    fn running(varmap: &VarMap) -> (Vec<f32>, Vec<f32>) {
        let data = varmap.data().lock().unwrap();
        let v = |n: &str| data[n].as_tensor().to_vec1::<f32>().unwrap();
        (v("running_mean"), v("running_var"))
    }

    /// Two shards' passes committed together: the same bits whichever finished first, and
    /// the statistics of the whole batch (pooled mean and variance).
    #[test]
    fn shard_passes_commit_in_any_order_as_the_whole_batch() {
        let dev = Device::Cpu;
        let a = (Tensor::randn(0f32, 1.0, (3, 4, 5, 2), &dev).unwrap() * 2.0).unwrap();
        let b = (Tensor::randn(0f32, 1.0, (5, 4, 5, 2), &dev).unwrap() + 1.0).unwrap();
        let train = Mode::Train(None);
        let run = |parts: &[&Tensor]| {
            let (varmap, bn) = batch_norm(2);
            for x in parts {
                bn.forward(x, &train).unwrap();
            }
            bn.commit().unwrap();
            running(&varmap)
        };
        let ab = run(&[&a, &b]);
        assert_eq!(ab, run(&[&b, &a]));
        let whole = run(&[&Tensor::cat(&[&a, &b], 0).unwrap()]);
        for (x, y) in ab.0.iter().chain(&ab.1).zip(whole.0.iter().chain(&whole.1)) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
        // PyTorch's update by hand for the whole batch: 0.9·running + 0.1·batch, unbiased.
        let all = Tensor::cat(&[&a, &b], 0)
            .unwrap()
            .reshape((8 * 4 * 5, 2))
            .unwrap()
            .t()
            .unwrap()
            .contiguous()
            .unwrap();
        let v = all.get(0).unwrap().to_vec1::<f32>().unwrap();
        let n = v.len() as f32;
        let mean = v.iter().sum::<f32>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / (n - 1.0);
        assert!((whole.0[0] - (0.9 * 0.2 + 0.1 * mean)).abs() < 1e-5);
        assert!((whole.1[0] - (0.9 * 2.0 + 0.1 * var)).abs() < 1e-4);
        // One value per channel cannot be normalised in training.
        let (_, bn) = batch_norm(2);
        let one = Tensor::zeros((1, 1, 1, 2), DType::F32, &dev).unwrap();
        let e = bn.forward(&one, &train).unwrap_err().to_string();
        assert!(e.contains("more than one value per channel"), "{e}");
        assert!(bn.forward(&one, &Mode::Eval).is_ok());
    }
}
