//! The int8 linear layer of a quantized checkpoint: y = act(x Wᵀ + b) with W as int8 and
//! per-channel scales, x quantized per row when it runs, on the [`super::qgemm`] kernels.
//! Inference only: no gradient flows through it (a tracked input is refused).

use std::sync::OnceLock;

use candle_core::{bail, Result, Storage, Tensor};

use super::par::{new_ranges_uninit, tile_tasks};
use super::qgemm::{qgemm_block, qlevel, QPacked, MAX_K};
use super::simd::simd;
use super::storage::with_f32;

/// Rows per task: as the f32 linear layer's forward (a block of activations, k bytes a
/// row once quantized, stays in L2 while every panel of the weight passes over it).
const ROWS: usize = 128;

/// The packed int8 weight of a layer, made on first use and kept (it cannot change).
pub(crate) type QPackedWeight = OnceLock<QPacked>;

/// An int8 weight as [`qlinear`] takes it.
pub(crate) struct QInput<'a> {
    /// (n, k): the bytes of i8 in a U8 tensor.
    pub values: &'a Tensor,
    /// (n) f32, per output channel.
    pub scale: &'a Tensor,
    /// The calibrated input range (static activations), if any.
    pub range: Option<(f32, f32)>,
}

/// `act(x · Wᵀ + b)` for a CPU f32 x (rows, k), W the int8 weight `w`, and bias (n).
pub(crate) fn qlinear(
    x: &Tensor,
    w: QInput,
    bias: Option<&Tensor>,
    gelu: bool,
    cache: &QPackedWeight,
) -> Result<Tensor> {
    let (values, scale) = (w.values, w.scale);
    if x.track_op() {
        bail!(
            "an int8 layer runs inference only: it has no gradient (train from the f32 checkpoint)"
        )
    }
    let (rows, k) = x.dims2()?;
    let (n, kw) = values.dims2()?;
    if k > MAX_K {
        bail!("int8 linear: {k} inputs per output is more than the int8 kernels take ({MAX_K})")
    }
    if k != kw {
        bail!(
            "int8 linear: input {:?} does not fit weight {:?}",
            x.dims(),
            values.dims()
        )
    }
    let packed = match cache.get() {
        Some(p) => p,
        None => {
            let wq: Vec<i8> = values
                .flatten_all()?
                .to_vec1::<u8>()?
                .into_iter()
                .map(|v| v as i8)
                .collect();
            let sw = scale.to_vec1::<f32>()?;
            if sw.len() != n {
                bail!("int8 linear: {} scales for {n} channels", sw.len())
            }
            let _ = cache.set(QPacked::new(qlevel(), &wq, &sw, n, k).with_input_range(w.range));
            cache.get().expect("set above")
        }
    };
    let bias = match bias {
        Some(b) => Some(b.contiguous()?),
        None => None,
    };
    let b_vec = match &bias {
        Some(b) => {
            let (s, l) = b.storage_and_layout();
            let Storage::Cpu(cpu) = &*s else {
                bail!("int8 linear: bias is not on the CPU")
            };
            Some(super::storage::f32_slice(cpu, l)?.to_vec())
        }
        None => None,
    };
    let b_vec = b_vec.unwrap_or_else(|| vec![0.0; n]);
    if b_vec.len() != n {
        bail!("int8 linear: bias does not have {n} values")
    }
    let bounds = tile_tasks(
        rows,
        packed.level().mr(),
        ROWS,
        rayon::current_num_threads(),
    );
    let y = with_f32([&x.contiguous()?], |[x]| {
        let elems: Vec<usize> = bounds.iter().map(|r| r * n).collect();
        let fill = |i: usize, yb: *mut f32, _len: usize| {
            let xb = &x[bounds[i] * k..bounds[i + 1] * k];
            // SAFETY: yb holds this task's rows of n floats (the ranges are `bounds` rows
            // times n); the packing's level is this CPU's (qlevel).
            simd!(unsafe { qgemm_block(xb, packed, &b_vec, gelu, yb) });
        };
        if n == 0 {
            return Vec::new();
        }
        // SAFETY: qgemm_block writes every float of its rows (every column of every row).
        unsafe { new_ranges_uninit(&elems, fill) }
    })?;
    Tensor::from_vec(y, (rows, n), x.device())
}
