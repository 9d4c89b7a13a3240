//! Helpers shared by the integration tests: fixture paths and `assert_close`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// All tensors of a fixture safetensors file.
pub fn load(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).expect("fixture loads")
}

/// Asserts `got` and `want` have the same shape and agree within `tol` absolute,
/// printing the worst element on failure.
pub fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (mut worst, mut at) = (0f32, 0usize);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let d = (a - b).abs();
        if d > worst || d.is_nan() {
            worst = d;
            at = i;
        }
    }
    assert!(
        worst <= tol,
        "{name}: max abs diff {worst:e} at flat index {at} (got {}, want {}), tolerance {tol:e}",
        g[at],
        w[at]
    );
}
