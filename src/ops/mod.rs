//! The differentiable building blocks the model is made of, behind one interface:
//! LayerNorm, linear, GELU, softmax, attention, residual add, cross-entropy, dropout, and
//! the convolution networks' batch normalisation and stem max-pool.
//! Each is composed of candle ops that record gradients (candle-nn's fused
//! `softmax_last_dim`, `layer_norm` and `sdpa` do not), so every parameter trains.

use candle_core::{DType, Device, Tensor, D};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use crate::Result;

mod cpu;

/// The matrix-multiply provider of the fused CPU kernels and the instruction set it uses on
/// this machine, e.g. "gemm (pure Rust, AVX-512)" or the system BLAS loaded at run time
/// (for benchmark reports; `VIT_BLAS` chooses, see `ops/cpu/gemm.rs`).
pub fn matmul_provider() -> String {
    cpu::matmul_provider()
}

/// Sets the precision of inference products for the whole process (a command sets it once,
/// before it runs a model). `Bf16` runs them on the AVX512_BF16 kernel: operands rounded to
/// bfloat16, sums and everything else (LayerNorm, softmax, the attention products) in f32.
/// An error names a CPU without AVX512_BF16 (or a `VIT_SIMD` cap below AVX-512); on
/// other devices the setting does nothing (their products are candle's).
pub fn set_inference_dtype(dtype: Precision) -> Result<()> {
    cpu::set_bf16_inference(dtype == Precision::Bf16).map_err(crate::Error::Invalid)
}

/// The precision of matrix products: f32, or bf16 operands with f32 results. For inference
/// ([`set_inference_dtype`], `--dtype`) it applies to a linear layer's weight that tracks no
/// gradient; for training ([`autocast`], `vit train --precision`) it is mixed precision as
/// PyTorch's `autocast(dtype=torch.bfloat16)`: the products of linear layers and of
/// attention take bf16 operands, while the weights (the master copy the optimizer
/// updates), their gradients, LayerNorm, softmax, GELU and the loss stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(crate::Error::Unknown {
                kind: "precision",
                name: s.into(),
                hint: " (known: f32, bf16)".into(),
            }),
        }
    }
}

thread_local! {
    /// Whether this thread's products run in bf16 ([`autocast`]).
    static AUTOCAST_BF16: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the matrix products of [`linear`], [`attention`] and [`attention_biased`]
/// in `precision` on this thread (an autocast region: the forward pass of a training step).
/// The casts are recorded in the graph, so backward needs no region: each product's
/// gradients come back through bf16 to the f32 tensors. Inside it those products use
/// candle's own kernels (bf16 is what the device's matrix units run; the fused f32 CPU
/// kernels are for f32).
pub fn autocast<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    let before = AUTOCAST_BF16.with(|a| a.replace(precision == Precision::Bf16));
    let out = f();
    AUTOCAST_BF16.with(|a| a.set(before));
    out
}

/// Whether products of this f32 tensor run in bf16 here ([`autocast`]).
fn in_bf16(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && AUTOCAST_BF16.with(|a| a.get())
}

/// The matrix product a · b (batched over leading dimensions), in bf16 within an
/// [`autocast`] region: the attention products models write out themselves (when they
/// need the probabilities, for dropout or to return them).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if in_bf16(a) {
        return matmul_bf16(a, b);
    }
    Ok(a.matmul(b)?)
}

/// a · b with bf16 operands and an f32 result.
fn matmul_bf16(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a, b) = (a.to_dtype(DType::BF16)?, b.to_dtype(DType::BF16)?);
    Ok(a.matmul(&b)?.to_dtype(DType::F32)?)
}

/// The instruction set the fused CPU kernels' own loops run with here: "AVX-512", "AVX2"
/// or "baseline" (chosen at run time; `VIT_SIMD=baseline|avx2` lowers it).
pub fn kernel_isa() -> &'static str {
    match cpu::simd_level() {
        cpu::SimdLevel::Avx512 => "AVX-512",
        cpu::SimdLevel::Avx2 => "AVX2",
        cpu::SimdLevel::Baseline => "baseline",
    }
}

/// LayerNorm over the last dimension: (x − mean) / sqrt(var + eps) · weight + bias.
/// Fused kernel on the CPU in f32 (`ops::cpu`), composed candle ops elsewhere.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if cpu::eligible(x) && cpu::eligible(weight) && cpu::eligible(bias) {
        return Ok(cpu::layer_norm(x, weight, bias, eps)?);
    }
    layer_norm_composed(x, weight, bias, eps)
}

/// [`layer_norm`] from candle ops: any device and dtype.
fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?; // (..., 1)
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?; // biased variance, as PyTorch
    let xn = xc.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    Ok(xn.broadcast_mul(weight)?.broadcast_add(bias)?)
}

/// `x · weightᵀ + bias` for x of shape (..., in) and weight (out, in), as `nn.Linear`.
/// Fused kernel (bias added while the output is in cache) on the CPU in f32 with a bias,
/// composed candle ops otherwise.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_act(x, weight, bias, cpu::Activation::Identity, None)
}

/// A linear layer's weight as the CPU kernels' matrix multiply lays it out, kept between
/// calls: with it, [`linear_cached`] repacks an inference weight (one that tracks no
/// gradient, so cannot change) only when it is a different tensor than last time, instead
/// of on every call (3–4% of ViT-B/16 inference). It holds one more copy of the weight once
/// used, and stays empty for trained weights and on other devices. Clones share it.
#[derive(Clone, Default)]
pub struct WeightCache(std::sync::Arc<cpu::PackedWeight>);

impl std::fmt::Debug for WeightCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WeightCache")
    }
}

/// [`linear`], followed by [`gelu`] when `gelu` is set (fused on the CPU), keeping the
/// packed weight in `cache`.
pub fn linear_cached(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    gelu: bool,
    cache: &WeightCache,
) -> Result<Tensor> {
    let act = if gelu {
        cpu::Activation::Gelu
    } else {
        cpu::Activation::Identity
    };
    linear_act(x, weight, bias, act, Some(&cache.0))
}

fn linear_act(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    act: cpu::Activation,
    cache: Option<&cpu::PackedWeight>,
) -> Result<Tensor> {
    let mut out_dims = x.dims().to_vec();
    let (out_dim, in_dim) = weight.dims2()?;
    let last = out_dims.last_mut().ok_or_else(|| {
        crate::Error::Invalid("linear: input must have at least one dimension".into())
    })?;
    if *last != in_dim {
        return Err(crate::Error::Invalid(format!(
            "linear: input {:?} does not end in weight's input size {in_dim}",
            x.dims()
        )));
    }
    *last = out_dim;
    let x2 = x.reshape((x.elem_count() / in_dim.max(1), in_dim))?; // (rows, in)
    let y = match bias {
        _ if in_bf16(x) => {
            let y = matmul_bf16(&x2, &weight.t()?)?;
            let y = match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            match act {
                cpu::Activation::Identity => y,
                cpu::Activation::Gelu => gelu(&y)?,
            }
        }
        Some(b) if cpu::eligible(x) && cpu::eligible(weight) && cpu::eligible(b) => {
            cpu::linear(&x2, weight, b, act, cache)?
        }
        _ => {
            let y = linear_composed(&x2, weight, bias)?;
            match act {
                cpu::Activation::Identity => y,
                cpu::Activation::Gelu => gelu(&y)?,
            }
        }
    };
    Ok(y.reshape(out_dims)?)
}

/// A linear layer's weight quantized to int8 (`vit quantize`): W ≈ scale ⊙ values, with
/// `values` (out, in) in [−127, 127] held as the bytes of i8 in a U8 tensor (candle has no
/// i8) and one f32 `scale` per output channel (symmetric, per channel). Clones share the
/// CPU kernels' packing, made on first use.
#[derive(Clone)]
pub struct Int8Weight {
    pub values: Tensor, // (out, in) u8: two's-complement bytes of i8
    pub scale: Tensor,  // (out,) f32
    /// The calibrated range [lo, hi] of the layer's input (`vit quantize --calibrate`):
    /// activations quantized with its fixed scale and zero point; else per row as they come.
    pub input_range: Option<(f32, f32)>,
    /// The layer's name (its tensors' prefix), under which calibration records its inputs.
    pub name: String,
    packed: std::sync::Arc<cpu::QPackedWeight>,
}

impl std::fmt::Debug for Int8Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Int8Weight{:?}", self.values.dims())
    }
}

impl Int8Weight {
    /// From its parts: `values` a U8 (out, in) tensor of i8 bytes, `scale` f32 (out,).
    pub fn new(values: Tensor, scale: Tensor) -> Result<Self> {
        let (out, _) = values.dims2()?;
        if values.dtype() != DType::U8 || scale.dtype() != DType::F32 || scale.dims() != [out] {
            return Err(crate::Error::Invalid(format!(
                "int8 weight: values {:?} {:?} and scales {:?} {:?} do not fit (want u8 (out, in) \
                 and f32 (out))",
                values.dtype(),
                values.dims(),
                scale.dtype(),
                scale.dims()
            )));
        }
        Ok(Int8Weight {
            values,
            scale,
            input_range: None,
            name: String::new(),
            packed: Default::default(),
        })
    }

    /// The same weight named `name` (its layer's tensor prefix), with static activations
    /// over `range` when given: [lo, hi] with lo ≤ 0 ≤ hi, both finite.
    pub fn named(mut self, name: &str, range: Option<(f32, f32)>) -> Result<Self> {
        if let Some((lo, hi)) = range {
            if !(lo.is_finite() && hi.is_finite() && lo <= 0.0 && 0.0 <= hi) {
                return Err(crate::Error::Invalid(format!(
                    "{name}: input range [{lo}, {hi}] must be finite and hold 0"
                )));
            }
        }
        self.name = name.to_string();
        self.input_range = range;
        Ok(self)
    }

    /// Quantizes an f32 weight (out, in): per output channel, scale = max |w| / 127 and
    /// values = round(w / scale) (ties to even), so |w − scale · value| ≤ scale / 2. A
    /// channel of zeros has scale 0. Non-finite weights are an error.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(crate::Error::Invalid(format!(
                "cannot quantize a weight holding {} (at flat index {i})",
                data[i]
            )));
        }
        let mut values = vec![0u8; out * inp];
        let mut scale = vec![0f32; out];
        for (c, row) in data.chunks(inp.max(1)).enumerate().take(out) {
            let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
            if amax == 0.0 {
                continue;
            }
            let s = amax / 127.0;
            let inv = 1.0 / s;
            for (q, v) in values[c * inp..(c + 1) * inp].iter_mut().zip(row) {
                *q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8 as u8;
            }
            scale[c] = s;
        }
        let dev = w.device();
        Self::new(
            Tensor::from_vec(values, (out, inp), dev)?,
            Tensor::from_vec(scale, out, dev)?,
        )
    }

    /// The values as i8, row-major (out, in).
    pub fn to_i8(&self) -> Result<Vec<i8>> {
        Ok(self
            .values
            .flatten_all()?
            .to_vec1::<u8>()?
            .into_iter()
            .map(|v| v as i8)
            .collect())
    }

    /// scale ⊙ values as f32 (out, in), on the values' device.
    pub fn dequantize(&self) -> Result<Tensor> {
        let v = self.values.to_dtype(DType::F32)?;
        // The bytes of a negative i8 read as u8 are v + 256.
        let neg = self.values.ge(128u8)?.to_dtype(DType::F32)?;
        let signed = (v - (neg * 256.0)?)?;
        Ok(signed.broadcast_mul(&self.scale.unsqueeze(1)?)?)
    }
}

/// [`linear_cached`] with an int8 weight: on the CPU the int8 kernels, activations
/// quantized per row as the product runs (`ops/cpu/qgemm`); elsewhere the dequantized
/// weight through candle. Inference only.
pub fn linear_int8(
    x: &Tensor,
    weight: &Int8Weight,
    bias: Option<&Tensor>,
    gelu_after: bool,
) -> Result<Tensor> {
    let mut out_dims = x.dims().to_vec();
    let (out_dim, in_dim) = weight.values.dims2()?;
    match out_dims.last_mut() {
        Some(last) if *last == in_dim => *last = out_dim,
        _ => {
            return Err(crate::Error::Invalid(format!(
                "linear: input {:?} does not end in weight's input size {in_dim}",
                x.dims()
            )))
        }
    }
    let x2 = x.reshape((x.elem_count() / in_dim.max(1), in_dim))?; // (rows, in)
    record_input_range(&weight.name, &x2)?;
    let y = if cpu::eligible(x) && weight.values.device().is_cpu() {
        let q = cpu::QInput {
            values: &weight.values,
            scale: &weight.scale,
            range: weight.input_range,
        };
        cpu::qlinear(&x2, q, bias, gelu_after, &weight.packed)?
    } else {
        let y = linear_composed(&x2, &weight.dequantize()?.to_dtype(x.dtype())?, bias)?;
        if gelu_after {
            gelu(&y)?
        } else {
            y
        }
    };
    Ok(y.reshape(out_dims)?)
}

/// Input ranges [lo, hi] by int8 layer name, as [`calibrate`] records them.
pub type InputRanges = std::collections::HashMap<String, (f32, f32)>;

/// Whether [`calibrate`] is running.
static CALIBRATING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The input ranges recorded while [`calibrate`] runs.
static CALIBRATION: std::sync::Mutex<Option<InputRanges>> = std::sync::Mutex::new(None);

/// Runs `f` (forward passes of a model with int8 layers) recording the range of every int8
/// layer's inputs, widened to hold 0: `vit quantize --calibrate`'s statistics. Returns f's
/// result and the ranges by layer name. Calibration is process-wide: one at a time.
pub fn calibrate<R>(f: impl FnOnce() -> Result<R>) -> Result<(R, InputRanges)> {
    use std::sync::atomic::Ordering;
    let lock = || CALIBRATION.lock().unwrap_or_else(|e| e.into_inner());
    *lock() = Some(Default::default());
    CALIBRATING.store(true, Ordering::Release);
    let r = f();
    CALIBRATING.store(false, Ordering::Release);
    let ranges = lock().take().unwrap_or_default();
    Ok((r?, ranges))
}

/// Adds the range of `x` to layer `name`'s while [`calibrate`] runs (a non-finite input is
/// an error: it would make a meaningless range).
fn record_input_range(name: &str, x: &Tensor) -> Result<()> {
    // Outside calibration (every inference): one atomic load, no lock.
    if !CALIBRATING.load(std::sync::atomic::Ordering::Acquire) {
        return Ok(());
    }
    let mut guard = CALIBRATION.lock().unwrap_or_else(|e| e.into_inner());
    let Some(ranges) = guard.as_mut() else {
        return Ok(());
    };
    let flat = x.flatten_all()?.to_dtype(DType::F32)?;
    let (lo, hi) = (
        flat.min(0)?.to_scalar::<f32>()?,
        flat.max(0)?.to_scalar::<f32>()?,
    );
    if !(lo.is_finite() && hi.is_finite()) {
        return Err(crate::Error::Numeric(format!(
            "calibration: the input of {name} holds a non-finite value"
        )));
    }
    let r = ranges.entry(name.to_string()).or_insert((0.0, 0.0));
    *r = (r.0.min(lo), r.1.max(hi));
    Ok(())
}

/// The int8 kernel this CPU runs (`vit bench` reports it): "AVX-512 VNNI", "AVX2" (i16
/// activations) or "portable".
pub fn int8_kernel() -> &'static str {
    cpu::qlevel().name()
}

/// [`linear`] of a 2-D input from candle ops: any device and dtype.
fn linear_composed(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&weight.t()?)?; // (rows, out)
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Exact (erf) GELU, as `nn.GELU()` in timm and `"gelu"` in HuggingFace.
/// Fused kernel on the CPU in f32 (`ops::cpu`), candle's `gelu_erf` elsewhere.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if cpu::eligible(x) {
        return Ok(cpu::gelu(x)?);
    }
    Ok(x.gelu_erf()?)
}

/// `a + b` for tensors of one shape (the residual connections).
/// Parallel kernel on the CPU in f32 (`ops::cpu`), candle's add elsewhere.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if cpu::eligible(a) && cpu::eligible(b) && a.dims() == b.dims() {
        return Ok(cpu::add(a, b)?);
    }
    Ok((a + b)?)
}

/// `max(x, 0)`, with PyTorch's gradient (passed where the output is positive).
/// Parallel kernel on the CPU in f32 (`ops::cpu`), candle's relu elsewhere.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if cpu::eligible(x) {
        return Ok(cpu::relu(x)?);
    }
    Ok(x.relu()?)
}

/// `max(a + b, 0)` for tensors of one shape (a ResNet block's output).
/// Parallel kernel on the CPU in f32 (`ops::cpu`), candle ops elsewhere.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if cpu::eligible(a) && cpu::eligible(b) && a.dims() == b.dims() {
        return Ok(cpu::add_relu(a, b)?);
    }
    Ok((a + b)?.relu()?)
}

/// Softmax over the last dimension, max-subtracted for stability.
/// Fused kernel on the CPU in f32 (`ops::cpu`), composed candle ops elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if cpu::eligible(x) {
        return Ok(cpu::softmax_last_dim(x)?);
    }
    softmax_composed(x)
}

/// [`softmax_last_dim`] from candle ops: any device and dtype.
fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// Multi-head self-attention core from timm's fused projection: `qkv` (B, T, 3·D) holds
/// q, k and v blocks of D columns, each split into `heads` heads of D/heads. Returns
/// softmax(scale · q kᵀ) v per head, heads concatenated: (B, T, D).
/// Fused kernel on the CPU in f32 (`ops::cpu`), composed candle ops elsewhere.
pub fn attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    if in_bf16(qkv) {
        let (q, k, v) = split_heads(qkv, heads)?;
        let probs = softmax_last_dim(&matmul_bf16(&(q * scale)?, &k.t()?)?)?;
        return merge_heads(&matmul_bf16(&probs, &v)?);
    }
    if cpu::eligible(qkv) {
        return Ok(cpu::attention(qkv, heads, scale)?);
    }
    attention_composed(qkv, heads, scale)
}

/// [`attention`] from candle ops: any device and dtype.
fn attention_composed(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (q, k, v) = split_heads(qkv, heads)?;
    let probs = softmax_composed(&(q * scale)?.matmul(&k.t()?)?)?; // (B, heads, T, T)
    merge_heads(&probs.matmul(&v)?)
}

/// [`attention`] with an additive bias on the scores before the softmax:
/// softmax(scale · q kᵀ + A) v, where `bias` is (G, heads, T, T) and batch item b takes
/// block b mod G (Swin: the relative position bias plus, for shifted windows, each window's
/// mask; batch items are image-major windows). The bias receives a gradient.
/// Fused kernel on the CPU in f32 (`ops::cpu`), composed candle ops elsewhere.
pub fn attention_biased(qkv: &Tensor, bias: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    if in_bf16(qkv) {
        let (q, k, v) = split_heads(qkv, heads)?;
        let scores = add_attention_bias(&matmul_bf16(&(q * scale)?, &k.t()?)?, bias)?;
        return merge_heads(&matmul_bf16(&softmax_last_dim(&scores)?, &v)?);
    }
    if cpu::eligible(qkv) && cpu::eligible(bias) {
        return Ok(cpu::attention_biased(qkv, bias, heads, scale)?);
    }
    attention_biased_composed(qkv, bias, heads, scale)
}

/// [`attention_biased`] from candle ops: any device and dtype.
fn attention_biased_composed(
    qkv: &Tensor,
    bias: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (q, k, v) = split_heads(qkv, heads)?;
    let scores = add_attention_bias(&(q * scale)?.matmul(&k.t()?)?, bias)?;
    merge_heads(&softmax_composed(&scores)?.matmul(&v)?)
}

/// Scores (B, heads, T, T) plus `bias` (G, heads, T, T), batch item b taking block b mod G.
pub fn add_attention_bias(scores: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, h, t, t2) = scores.dims4()?;
    let g = bias.dim(0)?;
    if g == 0 || b % g != 0 || bias.dims()[1..] != [h, t, t2] {
        return Err(crate::Error::Invalid(format!(
            "attention bias {:?} does not fit scores {:?}",
            bias.dims(),
            scores.dims()
        )));
    }
    Ok(scores
        .reshape((b / g, g, h, t, t2))?
        .broadcast_add(&bias.unsqueeze(0)?)?
        .reshape((b, h, t, t2))?)
}

/// (B, T, 3·D) → q, k, v, each (B, heads, T, D/heads) and contiguous.
pub fn split_heads(qkv: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, d3) = qkv.dims3()?;
    if heads == 0 || d3 % (3 * heads) != 0 {
        return Err(crate::Error::Invalid(format!(
            "attention: qkv width {d3} does not split into 3 × {heads} heads"
        )));
    }
    let qkv = qkv
        .reshape((b, t, 3, heads, d3 / 3 / heads))?
        .permute((2, 0, 3, 1, 4))?; // (3, B, heads, T, hd)
    Ok((
        qkv.get(0)?.contiguous()?,
        qkv.get(1)?.contiguous()?,
        qkv.get(2)?.contiguous()?,
    ))
}

/// (B, heads, T, hd) → (B, T, heads·hd).
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, hd) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, t, h * hd))?)
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Mean cross-entropy of `logits` (B, K) against class indices `targets` (B,) u32,
/// with label smoothing ε as PyTorch's `CrossEntropyLoss(label_smoothing=ε)`:
/// loss = (1 − ε)·NLL + ε·mean_k(−log p_k).
/// Fused kernel on the CPU in f32 (`ops::cpu`), composed candle ops elsewhere.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, smoothing: f64) -> Result<Tensor> {
    if cpu::eligible(logits) {
        return Ok(cpu::cross_entropy(logits, targets, smoothing)?);
    }
    cross_entropy_composed(logits, targets, smoothing)
}

/// [`cross_entropy`] from candle ops: any device and dtype.
fn cross_entropy_composed(logits: &Tensor, targets: &Tensor, smoothing: f64) -> Result<Tensor> {
    let logp = log_softmax_last_dim(logits)?; // (B, K)
    let nll = logp.gather(&targets.unsqueeze(1)?, 1)?.neg()?.mean_all()?;
    if smoothing == 0.0 {
        return Ok(nll);
    }
    let smooth = logp.mean(D::Minus1)?.neg()?.mean_all()?;
    Ok(((nll * (1.0 - smoothing))? + (smooth * smoothing)?)?)
}

/// Inverted dropout: zeroes each element with probability `p` and scales the rest by
/// 1/(1−p). The mask comes from our seeded RNG, so training is reproducible.
pub fn dropout(x: &Tensor, p: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let mask = bernoulli_mask(x.dims(), p, rng, x.device())?;
    Ok(x.broadcast_mul(&mask.to_dtype(x.dtype())?)?)
}

/// Stochastic depth on a residual branch `x` (B, ...): drops whole samples with
/// probability `p`, scaling the kept ones by 1/(1−p) (timm `DropPath`).
pub fn drop_path(x: &Tensor, p: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let mut shape = vec![1; x.rank()];
    shape[0] = x.dim(0)?;
    let mask = bernoulli_mask(&shape, p, rng, x.device())?;
    Ok(x.broadcast_mul(&mask.to_dtype(x.dtype())?)?)
}

/// A tensor of 0 and 1/(1−p), each kept with probability 1−p.
fn bernoulli_mask(shape: &[usize], p: f64, rng: &mut ChaCha8Rng, dev: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let keep = (1.0 - p) as f32;
    let scale = 1.0 / keep;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            if rng.random::<f32>() < keep {
                scale
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, dev)?.to_dtype(DType::F32)?)
}

/// Batch normalisation's training forward over channels-last x (B, H, W, C) with weight and
/// bias (C,): each channel normalised by the batch's statistics over its B·H·W values, then
/// scaled and shifted. Returns y, and the batch mean and biased batch variance (C,),
/// detached (what the running statistics move towards). Fused kernel on the CPU in f32
/// (`ops/cpu/batch_norm.rs`), composed candle ops elsewhere.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    if cpu::eligible(x) && cpu::eligible(weight) && cpu::eligible(bias) {
        let (y, mean, var) = cpu::batch_norm_train(x, weight, bias, eps)?;
        let c = mean.len();
        let dev = x.device();
        return Ok((
            y,
            Tensor::from_vec(mean, c, dev)?,
            Tensor::from_vec(var, c, dev)?,
        ));
    }
    let mean = x.mean_keepdim((0, 1, 2))?; // (1, 1, 1, C)
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim((0, 1, 2))?; // (1, 1, 1, C), biased
    let inv_std = (var.clone() + eps)?.sqrt()?.recip()?;
    let y = centred
        .broadcast_mul(&inv_std)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)?;
    Ok((y, mean.flatten_all()?.detach(), var.flatten_all()?.detach()))
}

/// Batch normalisation's evaluation forward over channels-last x (B, H, W, C): by the
/// running statistics (C,), folded with weight and bias into one scale and shift per
/// channel.
pub fn batch_norm_eval(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    // y = x·scale + shift with scale = w/√(var + eps), shift = b − mean·scale.
    let scale = (weight / (running_var + eps)?.sqrt()?)?;
    let shift = (bias - (running_mean * &scale)?)?;
    if cpu::eligible(x) && cpu::eligible(&scale) {
        return Ok(cpu::channel_affine(x, &scale, &shift)?);
    }
    Ok(x.broadcast_mul(&scale)?.broadcast_add(&shift)?)
}

/// Depth-wise 3×3 convolution with padding 1 and a bias (PVT v2's `dwconv`, PyTorch's
/// `Conv2d(C, C, 3, padding=1, groups=C)`) of a channels-last `x` (B, H, W, C); `weight` is
/// PyTorch's (C, 1, 3, 3).
/// Fused kernel on the CPU in f32 (`ops::cpu`), composed candle ops elsewhere.
pub fn depthwise_conv3x3_nhwc(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if cpu::eligible(x) && cpu::eligible(weight) && cpu::eligible(bias) {
        return Ok(cpu::depthwise_conv3x3(x, weight, bias)?);
    }
    depthwise_conv3x3_composed(x, weight, bias)
}

/// [`depthwise_conv3x3_nhwc`] from candle ops (nine shifted slices, each scaled per
/// channel): any device and dtype.
fn depthwise_conv3x3_composed(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, h, w, c) = x.dims4()?;
    let taps = weight.reshape((c, 9))?.t()?.contiguous()?; // (9, C)
    let xp = x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?; // (B, H+2, W+2, C)
    let mut y = bias
        .reshape((1, 1, 1, c))?
        .broadcast_as(x.shape())?
        .contiguous()?;
    for i in 0..3 {
        for j in 0..3 {
            let tap = taps.get(i * 3 + j)?; // (C,)
            let shifted = xp.narrow(1, i, h)?.narrow(2, j, w)?;
            y = (y + shifted.broadcast_mul(&tap)?)?;
        }
    }
    Ok(y)
}

/// Max-pooling with a 3×3 window, stride 2 and padding 1 (ResNet's stem pool), of a
/// non-negative channels-last `x` (B, H, W, C), as it is after a ReLU: the padding is
/// zeros, which then equals PyTorch's −∞ padding. Output (B, ⌈H/2⌉, ⌈W/2⌉, C). Composed of
/// slices and element-wise maxima, so it records gradients (candle's own pool does not for
/// a window larger than its stride).
pub fn max_pool_3x3_s2_after_relu(x: &Tensor) -> Result<Tensor> {
    let x = pool_3_2_along(x, 1, |_| 1)?; // (B, ⌈H/2⌉, W, C)
    pool_3_2_along(&x, 2, |_| 1) // (B, ⌈H/2⌉, ⌈W/2⌉, C)
}

/// [`max_pool_3x3_s2_after_relu`] with TensorFlow's "SAME" padding (timm's
/// `MaxPool2dSame`, the hybrid ViT's stem pool): the one or two padded positions split as
/// evenly as they can, the odd one at the end, so an even side is padded only behind.
pub fn max_pool_3x3_s2_same_after_relu(x: &Tensor) -> Result<Tensor> {
    let front = |len: usize| same_padding(len, 3, 2).0;
    let x = pool_3_2_along(x, 1, front)?; // (B, ⌈H/2⌉, W, C)
    pool_3_2_along(&x, 2, front) // (B, ⌈H/2⌉, ⌈W/2⌉, C)
}

/// TensorFlow's "SAME" padding of a side of `len` for a `k`-wide window at `stride`
/// (timm's `pad_same`): (before, after), the output ⌈len/stride⌉ long.
pub fn same_padding(len: usize, k: usize, stride: usize) -> (usize, usize) {
    let total = ((len.div_ceil(stride) - 1) * stride + k).saturating_sub(len);
    (total / 2, total - total / 2)
}

/// out[i] = max(xp[2i], xp[2i+1], xp[2i+2]) along `dim` of xp, x with `front(len)` zeros in
/// front (0 or 1) and as many behind as the last window needs.
fn pool_3_2_along(x: &Tensor, dim: usize, front: impl Fn(usize) -> usize) -> Result<Tensor> {
    let len = x.dim(dim)?;
    let out = len.div_ceil(2);
    let before = front(len);
    let xp = x.pad_with_zeros(dim, before, 2 * out + 2 - len - before)?;
    let mut pairs = xp.dims().to_vec();
    pairs[dim] = out + 1;
    pairs.insert(dim + 1, 2);
    let xp = xp.reshape(pairs)?; // (..., out + 1, 2, ...)
    let even = xp.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)?; // xp[2i], i ≤ out
    let odd = xp.narrow(dim + 1, 1, 1)?.squeeze(dim + 1)?; // xp[2i + 1]
    let first = even.narrow(dim, 0, out)?;
    let next = even.narrow(dim, 1, out)?;
    Ok(first.maximum(&odd.narrow(dim, 0, out)?)?.maximum(&next)?)
}

/// Group normalisation (PyTorch's `GroupNorm`) of channels-last x (B, H, W, C): the C
/// channels in `groups` consecutive groups, each image's group normalised by the mean and
/// biased variance of its H·W·C/G values, then each channel scaled and shifted by weight
/// and bias (C,). Fused kernel on the CPU in f32 (`ops/cpu/group_norm.rs`), composed candle
/// ops elsewhere.
pub fn group_norm_nhwc(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    if cpu::eligible(x) && cpu::eligible(weight) && cpu::eligible(bias) {
        return Ok(cpu::group_norm(x, weight, bias, groups, eps)?);
    }
    group_norm_composed(x, weight, bias, groups, eps)
}

/// [`group_norm_nhwc`] from candle ops: any device and dtype.
fn group_norm_composed(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let xg = x.reshape((b, h * w, groups, c / groups))?; // (B, HW, G, C/G)
    let mean = xg.mean_keepdim((1, 3))?; // (B, 1, G, 1)
    let centred = xg.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim((1, 3))?; // biased
    let y = centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape((b, h, w, c))?;
    Ok(y.broadcast_mul(weight)?.broadcast_add(bias)?)
}

/// 2-D convolution (B, C_in, H, W) * (C_out, C_in, k, k) → (B, C_out, H', W') with zero
/// `padding` and `stride` (square kernel, no dilation, one group). Fused kernel on the CPU
/// in f32 (im2col onto the matrix-multiply provider, `ops/cpu/conv.rs`), composed candle
/// ops elsewhere.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if cpu::eligible(x) && cpu::eligible(w) {
        return Ok(cpu::conv2d(x, w, stride, padding, false)?);
    }
    conv2d_composed(x, w, stride, padding)
}

/// [`conv2d`] on channels-last images: x (B, H, W, C_in) → (B, H', W', C_out), the weight
/// still PyTorch's (C_out, C_in, k, k). The fused CPU kernel works channels last, so this
/// layout spares it a transpose of every input, output and gradient; elsewhere candle's
/// convolution between two permutes.
pub fn conv2d_nhwc(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if cpu::eligible(x) && cpu::eligible(w) {
        return Ok(cpu::conv2d(x, w, stride, padding, true)?);
    }
    let y = conv2d_composed(&x.permute((0, 3, 1, 2))?.contiguous()?, w, stride, padding)?;
    Ok(y.permute((0, 2, 3, 1))?)
}

/// [`conv2d`] from candle's convolution, made differentiable for every input size:
/// candle's backward takes the transposed convolution's output padding from the
/// height alone, so when (H + 2p − k) mod s and (W + 2p − k) mod s differ its input
/// gradient has the wrong width. The axis with the smaller remainder is then padded with
/// zeros at its end up to the other's: no window reaches those zeros (the output size is
/// unchanged), and the remainders agree.
fn conv2d_composed(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    let k = w.dim(2)?;
    let rem = |n: usize| (n + 2 * padding).saturating_sub(k) % stride;
    let (rh, rw) = (rem(h), rem(wd));
    let x = if rh < rw {
        x.pad_with_zeros(2, 0, rw - rh)?
    } else if rw < rh {
        x.pad_with_zeros(3, 0, rh - rw)?
    } else {
        x.clone()
    };
    Ok(x.conv2d(w, padding, stride, 1, 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against candle's grouped convolution (channels first), values and, by finite
    /// differences of the f64 form, gradients.
    #[test]
    fn depthwise_matches_a_grouped_convolution() {
        use candle_core::{DType, Device, Var};
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (2, 5, 4, 3), &dev).unwrap();
        let w = Tensor::randn(0f64, 1.0, (3, 1, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f64, 1.0, 3, &dev).unwrap();
        let got = depthwise_conv3x3_composed(&x, &w, &b).unwrap();
        let nchw = x.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
        let want = nchw
            .conv2d(&w, 1, 1, 1, 3)
            .unwrap()
            .broadcast_add(&b.reshape((1, 3, 1, 1)).unwrap())
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
        // Every tap's weight and the bias get gradients: d(sum y)/d bias = B·H·W.
        let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
        let y = depthwise_conv3x3_nhwc(&x.to_dtype(DType::F64).unwrap(), &wv, &bv).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let gb = g.get(bv.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        assert!(gb.iter().all(|&v| (v - 40.0).abs() < 1e-9), "{gb:?}");
        let gw = g.get(wv.as_tensor()).unwrap().abs().unwrap();
        assert!(gw
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .all(|&v| v > 0.0));
    }
    use candle_core::Var;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn softmax_rows_sum_to_one_and_match_exp_ratio() {
        let x = t(&[1.0, 2.0, 3.0, -1.0, 0.0, 1000.0], &[2, 3]);
        let s = softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap();
        let e: f32 = (1f32).exp() + (2f32).exp() + (3f32).exp();
        assert!((s[0][2] - 3f32.exp() / e).abs() < 1e-6);
        assert!((s[1][2] - 1.0).abs() < 1e-6 && s[1][0] == 0.0);
        for row in s {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn layer_norm_normalises_and_has_gradients() {
        let x = Var::from_tensor(&t(&[1.0, 2.0, 4.0, 8.0], &[1, 4])).unwrap();
        let w = Var::from_tensor(&t(&[1.0, 2.0, 1.0, 1.0], &[4])).unwrap();
        let b = Var::from_tensor(&t(&[0.0, 0.0, 0.0, 0.5], &[4])).unwrap();
        let y = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6).unwrap();
        let v = y.to_vec2::<f32>().unwrap()[0].clone();
        // mean 3.75, var 7.1875
        let sd = (7.1875f32 + 1e-6).sqrt();
        assert!((v[0] - (1.0 - 3.75) / sd).abs() < 1e-5);
        assert!((v[1] - 2.0 * (2.0 - 3.75) / sd).abs() < 1e-5);
        assert!((v[3] - ((8.0 - 3.75) / sd + 0.5)).abs() < 1e-5);
        let g = (y * t(&[1.0, -1.0, 2.0, 0.5], &[1, 4]))
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = g.backward().unwrap();
        for var in [&x, &w, &b] {
            let gv = grads.get(var.as_tensor()).unwrap();
            assert!(
                gv.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            );
        }
    }

    #[test]
    fn cross_entropy_matches_hand_computation() {
        let logits = t(&[2.0, 0.0, 0.0, 0.0, 1.0, 3.0], &[2, 3]);
        let y = Tensor::from_slice(&[0u32, 2], 2, &Device::Cpu).unwrap();
        let lse0 = (2f32.exp() + 2.0).ln();
        let lse1 = (1.0 + 1f32.exp() + 3f32.exp()).ln();
        let nll = ((lse0 - 2.0) + (lse1 - 3.0)) / 2.0;
        let got = cross_entropy(&logits, &y, 0.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((got - nll).abs() < 1e-6);
        let smooth = ((3.0 * lse0 - 2.0) / 3.0 + (3.0 * lse1 - 4.0) / 3.0) / 2.0;
        let want = 0.9 * nll + 0.1 * smooth;
        let got = cross_entropy(&logits, &y, 0.1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((got - want).abs() < 1e-6, "{got} {want}");
    }

    #[test]
    fn dropout_is_seeded_and_preserves_expectation() {
        use rand::SeedableRng;
        let x = Tensor::ones((100, 100), DType::F32, &Device::Cpu).unwrap();
        let a = dropout(&x, 0.25, &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
        let b = dropout(&x, 0.25, &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        let mean = a.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((mean - 1.0).abs() < 0.05, "{mean}");
        let zeros = a
            .eq(0f32)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .mean_all()
            .unwrap();
        assert!((zeros.to_scalar::<f32>().unwrap() - 0.25).abs() < 0.03);
    }

    /// The stem pool against a direct 3×3 / stride 2 / padding 1 max over every small
    /// size, odd and even, with a gradient that reaches each window's maximum.
    #[test]
    fn stem_max_pool_matches_a_direct_one() {
        let dev = Device::Cpu;
        for (h, w) in [(1, 1), (2, 3), (5, 4), (6, 7)] {
            let x = Tensor::rand(0f32, 1.0, (2, 3, h, w), &dev).unwrap();
            let v = candle_core::Var::from_tensor(&x).unwrap();
            // Pooled channels last, compared channels first.
            let nhwc = v.as_tensor().permute((0, 2, 3, 1)).unwrap();
            let y = max_pool_3x3_s2_after_relu(&nhwc).unwrap();
            let y = y.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
            let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
            assert_eq!(y.dims(), &[2, 3, oh, ow]);
            let flat = x.reshape((6, h * w)).unwrap().to_vec2::<f32>().unwrap();
            let got = y.reshape((6, oh * ow)).unwrap().to_vec2::<f32>().unwrap();
            for (plane, (xp, yp)) in flat.iter().zip(&got).enumerate() {
                for i in 0..oh {
                    for j in 0..ow {
                        let mut m = f32::NEG_INFINITY;
                        for r in (2 * i).saturating_sub(1)..(2 * i + 2).min(h) {
                            for c in (2 * j).saturating_sub(1)..(2 * j + 2).min(w) {
                                m = m.max(xp[r * w + c]);
                            }
                        }
                        assert_eq!(yp[i * ow + j], m, "{h}x{w} plane {plane} ({i}, {j})");
                    }
                }
            }
            let grads = y.sum_all().unwrap().backward().unwrap();
            let g = grads.get(v.as_tensor()).unwrap().sum_all().unwrap();
            assert_eq!(g.to_scalar::<f32>().unwrap(), (2 * 3 * oh * ow) as f32);
        }
    }

    /// The composed convolution (other devices) agrees with the fused one in value and
    /// gradient where candle's own backward alone gets the input gradient's width wrong
    /// (different remainders of the two axes under stride 2).
    #[test]
    fn composed_convolution_has_the_right_gradient_at_any_size() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 13, 10), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (4, 3, 3, 3), &dev).unwrap()).unwrap();
        let c = Tensor::randn(0f32, 1.0, (2, 4, 7, 5), &dev).unwrap();
        let run = |f: fn(&Tensor, &Tensor, usize, usize) -> Result<Tensor>| {
            let y = f(x.as_tensor(), w.as_tensor(), 2, 1).unwrap();
            let g = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let gx = flat(g.get(x.as_tensor()).unwrap());
            let gw = flat(g.get(w.as_tensor()).unwrap());
            (flat(&y), gx, gw)
        };
        let (a, b) = (run(conv2d), run(conv2d_composed));
        for (u, v) in [(&a.0, &b.0), (&a.1, &b.1), (&a.2, &b.2)] {
            assert_eq!(u.len(), v.len());
            for (p, q) in u.iter().zip(v) {
                assert!((p - q).abs() < 1e-4 * (1.0 + q.abs()), "{p} vs {q}");
            }
        }
    }

    /// The channels-last convolution equals the channels-first one on permuted tensors, in
    /// value and both gradients: the fused kernel (f32) and the composed ops (f64, as on
    /// other devices).
    #[test]
    fn channels_last_convolution_matches_channels_first() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, 9, 8), &dev).unwrap();
            let x = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
            let w = Tensor::randn(0f32, 0.3, (4, 3, 3, 3), &dev).unwrap();
            let w = Var::from_tensor(&w.to_dtype(dtype).unwrap()).unwrap();
            let c = Tensor::randn(0f32, 1.0, (2, 4, 5, 4), &dev).unwrap();
            let c = c.to_dtype(dtype).unwrap();
            let flat = |t: &Tensor| {
                let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                t.to_vec1::<f64>().unwrap()
            };
            let first = conv2d(x.as_tensor(), w.as_tensor(), 2, 1).unwrap();
            let nhwc = x.as_tensor().permute((0, 2, 3, 1)).unwrap();
            let last = conv2d_nhwc(&nhwc, w.as_tensor(), 2, 1).unwrap();
            let last = last.permute((0, 3, 1, 2)).unwrap();
            let mut grads = vec![];
            for y in [&first, &last] {
                assert_eq!(y.dims(), &[2, 4, 5, 4]);
                let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
                let gx = flat(g.get(x.as_tensor()).unwrap());
                grads.push((flat(y), gx, flat(g.get(w.as_tensor()).unwrap())));
            }
            let (a, b) = (&grads[0], &grads[1]);
            for (u, v) in [(&a.0, &b.0), (&a.1, &b.1), (&a.2, &b.2)] {
                for (p, q) in u.iter().zip(v) {
                    assert!(
                        (p - q).abs() < 1e-5 * (1.0 + q.abs()),
                        "{dtype:?}: {p} vs {q}"
                    );
                }
            }
        }
    }
}
