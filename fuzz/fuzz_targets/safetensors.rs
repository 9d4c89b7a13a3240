//! A checkpoint's bytes through `Checkpoint::from_bytes` (framing, header JSON, dtypes,
//! shapes, offsets, our `vit.*` metadata, HF renaming), then what a command does next:
//! the config it describes, validated, and the fit of its tensors to that config.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vit::weights::{Arch, Checkpoint, PosResample};
use vit::Architecture;

fuzz_target!(|data: &[u8]| {
    // In a folder that does not exist: no HF sidecar (config.json) is found beside it.
    let path = Path::new("/nonexistent/vit-fuzz/input.safetensors");
    let Ok(ck) = Checkpoint::from_bytes(data, path) else {
        return;
    };
    let Ok(cfg) = ck.resolve_config(&Arch::FromCheckpoint, None) else {
        return;
    };
    let _ = (cfg.num_params(), cfg.flops(), cfg.shape_flow());
    let resample = if data.len() % 2 == 0 {
        PosResample::Timm
    } else {
        PosResample::Hf
    };
    let _ = ck.fit(&cfg, resample, None);
});
