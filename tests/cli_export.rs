//! `vit export`: the ONNX file ONNX Runtime runs gives our logits. ONNX Runtime comes from
//! PyPI: `.ci/run` installs it into a virtual environment and names its Python in
//! `VIT_TEST_PYTHON` (and sets `VIT_REQUIRE_ONNXRUNTIME=1`, so that a missing runtime fails
//! CI instead of skipping); elsewhere the repository's `.venv` is used when it has it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{fails, fixture, load, ok, p};
use vit::weights::{load_fitted, Arch};
use vit::Architecture;

/// A Python with onnxruntime, or `None` (which CI does not allow).
fn python_with_onnxruntime() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates: Vec<PathBuf> = std::env::var_os("VIT_TEST_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([root.join(".venv/bin/python")])
        .collect();
    let found = candidates.into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import onnxruntime, numpy"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("VIT_REQUIRE_ONNXRUNTIME").is_none(),
            "VIT_REQUIRE_ONNXRUNTIME is set but no Python with onnxruntime was found"
        );
        eprintln!("skipped: no Python with onnxruntime (VIT_TEST_PYTHON or .venv)");
    }
    found
}

fn raw(t: &Tensor, path: &Path) {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

/// Exports `weights` (with `arch_args`) with a dynamic batch, runs it in ONNX Runtime on
/// `input` (a batch of 3 made from the fixture's input) and compares with our model's
/// logits.
fn check(
    py: &Path,
    dir: &Path,
    tag: &str,
    weights: &Path,
    arch_args: &[&str],
    arch: Arch,
    input: &Tensor,
) {
    let onnx = dir.join(format!("{tag}.onnx"));
    let mut args = vec!["export", p(weights), "--onnx", p(&onnx), "--dynamic-batch"];
    args.extend_from_slice(arch_args);
    let out = ok(&args);
    assert!(out.contains("wrote") && out.contains("opset 1"), "{out}");

    let fitted = load_fitted(weights, &arch, Default::default()).unwrap();
    let vb = VarBuilder::from_tensors(fitted.tensors, DType::F32, &Device::Cpu);
    let model = fitted.config.build(vb).unwrap();
    let ours = model.forward(input).unwrap();
    let (inp, want) = (
        dir.join(format!("{tag}.in")),
        dir.join(format!("{tag}.want")),
    );
    raw(input, &inp);
    raw(&ours, &want);
    let shape: Vec<String> = input.dims().iter().map(|d| d.to_string()).collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/onnx_check.py");
    let run = Command::new(py)
        .args([
            p(&script),
            p(&onnx),
            p(&inp),
            &shape.join(","),
            p(&want),
            "1e-4",
        ])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "{tag}: {said}");
    eprintln!("{tag}: {said}");
}

/// Three images: the fixture's first, scaled, and negated, so a batch of 3 is not batch 1.
fn batch_of_three(input: &Tensor) -> Tensor {
    let one = input.narrow(0, 0, 1).unwrap();
    Tensor::cat(&[&one, &(&one * 0.5).unwrap(), &one.neg().unwrap()], 0).unwrap()
}

#[test]
fn exported_models_give_our_logits_in_onnx_runtime() {
    let Some(py) = python_with_onnxruntime() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // timm naming (class token), HF naming (config.json beside), mean pooling with fc_norm
    // and no class token on a non-square grayscale input, and a distilled DeiT (two heads).
    for (tag, config) in [
        ("timm_tiny", Some("timm_tiny/config.json")),
        ("hf_tiny", None),
        ("timm_meanpool", Some("timm_meanpool/config.json")),
        ("deit_tiny", Some("deit_tiny/config.json")),
    ] {
        let weights = fixture(&format!("{tag}/model.safetensors"));
        let input = batch_of_three(&load(&format!("{tag}/expected.safetensors"))["input"]);
        match config {
            Some(c) => {
                let cfg = fixture(c);
                let arch = Arch::Config(vit::ModelConfig::from_file(&cfg).unwrap());
                // Mean pooling's ReduceMean takes its axes as an input from opset 18 on.
                let opset = if tag == "timm_meanpool" { "18" } else { "17" };
                let args = ["--config", p(&cfg), "--opset", opset];
                check(&py, dir.path(), tag, &weights, &args, arch, &input);
            }
            None => check(
                &py,
                dir.path(),
                tag,
                &weights,
                &[],
                Arch::FromCheckpoint,
                &input,
            ),
        }
    }
    // Hybrids: the ResNetV2 stages with uneven "SAME" padding (38x30 input), and the deep
    // stem cut into 2x2 cells.
    for tag in ["r", "deep"] {
        let weights = fixture(&format!("hybrid_tiny/{tag}.safetensors"));
        let cfg = fixture(&format!("hybrid_tiny/{tag}.json"));
        let arch = Arch::Config(vit::ModelConfig::from_file(&cfg).unwrap());
        let input = load(&format!("hybrid_tiny/{tag}_expected.safetensors"))["input"].clone();
        let name = format!("hybrid_{tag}");
        check(
            &py,
            dir.path(),
            &name,
            &weights,
            &["--config", p(&cfg)],
            arch,
            &input,
        );
    }
    // The paper's .npz, read with no preset, exported as any checkpoint is.
    let npz = fixture("jax_tiny/vit.npz");
    let input = batch_of_three(&load("jax_tiny/vit_expected.safetensors")["input"]);
    check(
        &py,
        dir.path(),
        "jax",
        &npz,
        &[],
        Arch::FromCheckpoint,
        &input,
    );
}

#[test]
fn what_cannot_be_exported_says_so_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    let swin = fixture("swin_tiny/pad.safetensors");
    let swin_cfg = fixture("swin_tiny/pad.json");
    let e = fails(&[
        "export",
        p(&swin),
        "--config",
        p(&swin_cfg),
        "--onnx",
        p(&out),
    ]);
    assert!(e.contains("a swin model is not exported yet"), "{e}");
    let timm = fixture("timm_tiny/model.safetensors");
    let cfg = fixture("timm_tiny/config.json");
    let e = fails(&[
        "export",
        p(&timm),
        "--config",
        p(&cfg),
        "--onnx",
        p(&out),
        "--opset",
        "16",
    ]);
    assert!(e.contains("opset 16 is not supported"), "{e}");
    assert!(!out.exists());
}
