//! Fused CPU kernels behind [`crate::ops`]: candle custom ops over contiguous f32 data, each
//! with its backward written by hand next to its forward. `ops` picks them for CPU f32
//! tensors; every other device or dtype keeps the composed candle version.
//!
//! Row-wise kernels split their rows into fixed blocks of about [`par::BLOCK_ELEMS`]
//! elements and run the blocks on rayon's global pool, the pool candle's matmul (gemm)
//! already uses, so the two never compete for cores. Block boundaries depend only on the
//! shape, never on the thread count, and reductions over rows (LayerNorm's dweight/dbias) add
//! the per-block partial sums in block order: results are bit-for-bit reproducible.
//!
//! One file per kernel (`add`, `attention`, `batch_norm`, `conv`, `cross_entropy`, `depthwise`, `gelu`, `group_norm`, `layer_norm`,
//! `linear`, `relu`, `softmax`); what they share: `par` (parallel blocks and output buffers),
//! `simd` (the instruction-set dispatch), `math` (lane reductions, `exp`), `storage` (f32
//! slices of candle data), `settings` (the `VIT_*` environment switches, read once),
//! `matrix` (the strided matrix view), `transpose` (layout changes), `gemm` (the
//! matrix-multiply provider) over `sgemm`
//! (our AVX-512 kernel).
//!
//! The one place in the crate, with `runtime`, where unsafe code is allowed (the crate
//! denies it elsewhere): raw output buffers shared by parallel tasks, strided matrix views,
//! SIMD intrinsics and a `dlopen`ed BLAS. Every `unsafe` block and impl carries a
//! `// SAFETY:` comment saying why it is sound, and every `unsafe fn` a `# Safety` section;
//! the lints below enforce the comments and an explicit block for each unsafe operation.

#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(clippy::missing_safety_doc)]

mod add;
mod attention;
mod batch_norm;
mod conv;
mod cross_entropy;
mod depthwise;
mod gelu;
mod gemm;
mod group_norm;
mod layer_norm;
mod linear;
mod math;
mod matrix;
mod par;
mod qgemm;
mod qlinear;
mod relu;
mod settings;
#[cfg(target_arch = "x86_64")]
mod sgemm;
mod simd;
mod softmax;
mod storage;
#[cfg(test)]
mod testing;
mod transpose;

pub(crate) use add::add;
pub(crate) use attention::{attention, attention_biased};
pub(crate) use batch_norm::{batch_norm_train, channel_affine};
pub(crate) use conv::conv2d;
pub(crate) use cross_entropy::cross_entropy;
pub(crate) use depthwise::depthwise_conv3x3;
pub(crate) use gelu::gelu;
pub(crate) use gemm::{provider as matmul_provider, set_bf16_inference};
pub(crate) use group_norm::group_norm;
pub(crate) use layer_norm::layer_norm;
pub(crate) use linear::{linear, Activation, PackedWeight};
pub(crate) use qgemm::qlevel;
pub(crate) use qlinear::{qlinear, QInput, QPackedWeight};
pub(crate) use relu::{add_relu, relu};
pub(crate) use simd::{simd_level, SimdLevel};
pub(crate) use softmax::softmax_last_dim;

use candle_core::{DType, Tensor};

/// Whether `t` may take a fused path (CPU, f32). Contiguity is arranged by the caller.
pub(crate) fn eligible(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}
