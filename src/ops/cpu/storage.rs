//! The f32 data of candle CPU storages and tensors as plain slices: what every kernel's
//! forward (given storages) and backward (given tensors, possibly strided) reads.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor};

/// The f32 elements of `storage` under `layout`, which must be contiguous.
pub(super) fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = storage else {
        bail!("fused op: expected f32, got {:?}", storage.dtype())
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => bail!("fused op: input is not contiguous"),
    }
}

/// Runs `f` on the f32 data of CPU tensors, made contiguous first (a no-op when they
/// are). The backward passes use it: they get tensors rather than storages, and gradients
/// may arrive as broadcast views.
pub(super) fn with_f32<R, const N: usize>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> Result<R> {
    let ts = ts.map(|t| t.contiguous());
    let mut owned = Vec::with_capacity(N);
    for t in ts {
        owned.push(t?);
    }
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(cpu) => slices.push(f32_slice(cpu, layout)?),
            _ => bail!("fused op: expected a CPU tensor"),
        }
    }
    let slices: [&[f32]; N] = slices.try_into().expect("one slice per tensor");
    Ok(f(slices))
}
