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

/// Writes a tiny 10-class Fashion-MNIST-shaped IDX dataset (28×28, raw or gzip) into `dir`:
/// class c has stripes of period c % 5 + 2 pixels, vertical for c < 5 and horizontal
/// otherwise, plus deterministic noise: every patch shows its class, so a small model
/// learns it within a few epochs.
pub fn write_idx_dataset(dir: &std::path::Path, train: usize, test: usize, gz: bool) {
    use std::io::Write;
    std::fs::create_dir_all(dir).unwrap();
    let mut state = 12345u32;
    let mut noise = move || {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
        (state >> 24) as u8 / 4
    };
    for (prefix, n) in [("train", train), ("t10k", test)] {
        let mut images = vec![0, 0, 8, 3, 0, 0, 0, 0, 0, 0, 0, 28, 0, 0, 0, 28];
        images[4..8].copy_from_slice(&(n as u32).to_be_bytes());
        let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 0];
        labels[4..8].copy_from_slice(&(n as u32).to_be_bytes());
        for i in 0..n {
            let c = (i * 7 + 3) % 10;
            labels.push(c as u8);
            let period = (c % 5 + 2) as f32;
            for r in 0..28 {
                for col in 0..28 {
                    let t = if c < 5 { col } else { r } as f32;
                    let v = 128.0 + 90.0 * (std::f32::consts::TAU * t / period).cos();
                    images.push(v as u8 / 2 + noise() / 2 + 40);
                }
            }
        }
        for (name, bytes) in [
            (format!("{prefix}-images-idx3-ubyte"), images),
            (format!("{prefix}-labels-idx1-ubyte"), labels),
        ] {
            if gz {
                let f = std::fs::File::create(dir.join(format!("{name}.gz"))).unwrap();
                let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
                e.write_all(&bytes).unwrap();
                e.finish().unwrap();
            } else {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }
}

/// A recipe TOML for a tiny model on 28×28×1 images (patch 7, dim 16, one block);
/// `extra` must set `epochs` and `val_size`.
pub fn tiny_recipe(data_dir: &std::path::Path, extra: &str) -> String {
    format!(
        "dataset = \"fashion-mnist\"\ndata_dir = \"{}\"\nbatch_size = 16\n\
         eval_batch_size = 100\nlr = 0.005\nwarmup_epochs = 0.3\n{extra}\n\
         [model]\nimage_size = [28, 28]\npatch_size = 7\nin_channels = 1\nnum_classes = 10\n\
         embed_dim = 16\ndepth = 1\nnum_heads = 2\nmlp_ratio = 2.0\n",
        data_dir.display()
    )
}

/// Runs the `vit` binary with `args`.
pub fn vit(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_vit"))
        .args(args)
        .output()
        .expect("vit runs")
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = vit(args);
    assert!(
        out.status.success(),
        "vit {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its stderr, checked to be one clear line (the
/// binary may add the error's causes, indented, below it) and no panic.
pub fn fails(args: &[&str]) -> String {
    let out = vit(args);
    assert!(!out.status.success(), "vit {args:?} should fail");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.lines().skip(1).all(|l| l.starts_with("  caused by: ")),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// A path as a command-line argument.
pub fn p(path: &std::path::Path) -> &str {
    path.to_str().unwrap()
}

/// Model tensors of a checkpoint (training state left out), as raw bytes by name.
pub fn weights(path: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("train_state."))
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect();
    out.sort();
    out
}
