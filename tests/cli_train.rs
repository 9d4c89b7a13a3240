//! End-to-end tests of `vit train` and `vit eval` on tiny generated datasets: the loss
//! falls, runs resume exactly (also after SIGKILL), and bad input fails clearly.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{tiny_recipe, write_idx_dataset};

fn vit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vit"))
        .args(args)
        .output()
        .expect("vit runs")
}

fn ok(args: &[&str]) -> String {
    let out = vit(args);
    assert!(
        out.status.success(),
        "vit {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = vit(args);
    assert!(!out.status.success(), "vit {args:?} should fail");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("error: ") && !err.contains("panicked"),
        "{err}"
    );
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Model tensors of a checkpoint (training state left out), as raw bytes by name.
fn weights(path: &Path) -> Vec<(String, Vec<u8>)> {
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

fn setup(extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    write_idx_dataset(&dir.path().join("data"), 400, 100, true);
    let recipe = dir.path().join("recipe.toml");
    std::fs::write(&recipe, tiny_recipe(&dir.path().join("data"), extra)).unwrap();
    (dir, recipe)
}

#[test]
fn training_lowers_the_loss_and_writes_the_run() {
    let (dir, recipe) = setup("epochs = 6\nval_size = 50\n");
    let run = dir.path().join("run");
    let out = ok(&["train", "--config", s(&recipe), "--out", s(&run), "--quiet"]);
    assert!(out.contains("test accuracy"), "{out}");
    let m = metrics(&run);
    assert_eq!(m.len(), 6);
    let (first, last) = (
        m[0]["train_loss"].as_f64().unwrap(),
        m[5]["train_loss"].as_f64().unwrap(),
    );
    assert!(last < 0.85 * first, "loss did not fall: {first} → {last}");
    for key in [
        "epoch",
        "step",
        "train_acc",
        "val_loss",
        "val_acc",
        "lr",
        "seconds",
        "images_per_second",
    ] {
        assert!(m[5].get(key).is_some(), "metrics.jsonl lacks {key}");
    }
    for f in [
        "checkpoint-last.safetensors",
        "checkpoint-best.safetensors",
        "config.toml",
        "report.md",
        "curves.png",
        "confusion.png",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(
        report.contains("test accuracy") && report.contains("curves.png"),
        "{report}"
    );

    // vit eval on the best checkpoint reproduces the report's test accuracy.
    let json = ok(&[
        "eval",
        "--checkpoint",
        s(&run.join("checkpoint-best.safetensors")),
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        s(&dir.path().join("data")),
        "--format",
        "json",
        "--out",
        s(&dir.path().join("eval")),
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let acc = v["accuracy"].as_f64().unwrap();
    assert!(
        report.contains(&format!("| test accuracy | {:.2}% |", 100.0 * acc)),
        "{acc} {report}"
    );
    assert_eq!(v["confusion"].as_array().unwrap().len(), 10);
    assert_eq!(v["images"].as_u64().unwrap(), 100);
    assert!(dir.path().join("eval/confusion.png").exists());
    let text = ok(&[
        "eval",
        "--checkpoint",
        s(&run.join("checkpoint-best.safetensors")),
        "--data-dir",
        s(&dir.path().join("data")),
        "--out",
        s(&dir.path().join("eval")),
    ]);
    assert!(
        text.contains("per-class accuracy") && text.contains("Ankle boot"),
        "{text}"
    );

    // The checkpoint describes itself: vit predict needs no --config.
    let img = dir.path().join("x.png");
    image::GrayImage::from_pixel(28, 28, image::Luma([30]))
        .save(&img)
        .unwrap();
    let pred = ok(&[
        "predict",
        s(&img),
        "--weights",
        s(&run.join("checkpoint-best.safetensors")),
    ]);
    assert!(pred.contains("1. "), "{pred}");
}

#[test]
fn stopped_and_resumed_run_equals_uninterrupted_run() {
    let (dir, recipe) = setup("epochs = 2\nval_size = 50\nlabel_smoothing = 0.1\n");
    let full = dir.path().join("full");
    ok(&[
        "train",
        "--config",
        s(&recipe),
        "--out",
        s(&full),
        "--quiet",
    ]);
    // Stop after 5 optimizer steps (mid-epoch), then resume to the end.
    let part = dir.path().join("part");
    ok(&[
        "train",
        "--config",
        s(&recipe),
        "--out",
        s(&part),
        "--quiet",
        "--max-steps",
        "5",
    ]);
    assert_eq!(metrics(&part).len(), 1);
    ok(&[
        "train",
        "--resume",
        s(&part),
        "--quiet",
        "--max-steps",
        "1000000",
    ]);
    assert_eq!(
        weights(&full.join("checkpoint-last.safetensors")),
        weights(&part.join("checkpoint-last.safetensors"))
    );
    let (a, b) = (metrics(&full), metrics(&part));
    assert_eq!(a.len(), 2);
    assert_eq!(b.len(), 2);
    for key in ["train_loss", "val_loss", "val_acc", "step"] {
        assert_eq!(a[1][key], b[1][key], "{key}");
    }
}

#[test]
fn run_killed_with_sigkill_resumes_to_identical_weights() {
    let (dir, recipe) = setup("epochs = 3\nval_size = 50\ncheckpoint_every = 1\n");
    let full = dir.path().join("full");
    ok(&[
        "train",
        "--config",
        s(&recipe),
        "--out",
        s(&full),
        "--quiet",
    ]);
    let killed = dir.path().join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vit"))
        .args([
            "train",
            "--config",
            s(&recipe),
            "--out",
            s(&killed),
            "--quiet",
        ])
        .spawn()
        .unwrap();
    let last = killed.join("checkpoint-last.safetensors");
    let start = std::time::Instant::now();
    while !last.exists() && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(30));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(last.exists());
    // Whatever instant the kill hit, the checkpoint is whole and the run resumes.
    ok(&["train", "--resume", s(&killed), "--quiet"]);
    assert_eq!(
        weights(&full.join("checkpoint-last.safetensors")),
        weights(&last)
    );
    let leftovers: Vec<_> = std::fs::read_dir(&killed)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.len() <= 1, "temporary files left: {leftovers:?}");
}

#[test]
fn raw_idx_files_train_too() {
    let dir = tempfile::tempdir().unwrap();
    write_idx_dataset(&dir.path().join("data"), 100, 50, false);
    let recipe = dir.path().join("r.toml");
    std::fs::write(
        &recipe,
        tiny_recipe(&dir.path().join("data"), "epochs = 1\nval_size = 20\n"),
    )
    .unwrap();
    let out = ok(&[
        "train",
        "--config",
        s(&recipe),
        "--out",
        s(&dir.path().join("run")),
        "--quiet",
    ]);
    assert!(out.contains("on 50 images"), "{out}");
}

#[test]
fn bad_training_input_fails_clearly() {
    let (dir, recipe) = setup("epochs = 3\nval_size = 50\n");
    let run = dir.path().join("run");

    // Diverging run: the loss becomes NaN/inf; the error says so and names the checkpoint.
    let e = fails(&[
        "train",
        "--config",
        s(&recipe),
        "--out",
        s(&run),
        "--quiet",
        "--lr",
        "1e30",
        "--clip-grad",
        "0",
        "--warmup-epochs",
        "0",
    ]);
    assert!(
        e.contains("loss became") && e.contains("checkpoint-last"),
        "{e}"
    );

    // Missing dataset files.
    let e = fails(&[
        "train",
        "--config",
        s(&recipe),
        "--data-dir",
        s(&dir.path().join("nowhere")),
        "--out",
        s(&run),
        "--quiet",
    ]);
    assert!(e.contains("nowhere"), "{e}");

    // Truncated IDX file.
    let data = dir.path().join("data");
    let f = data.join("train-labels-idx1-ubyte.gz");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&["train", "--config", s(&recipe), "--out", s(&run), "--quiet"]);
    assert!(e.contains("train-labels-idx1-ubyte.gz"), "{e}");

    // Unknown recipe field, unknown dataset, unknown preset, inconsistent numbers.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "epoch = 3\n").unwrap();
    let e = fails(&["train", "--config", s(&bad)]);
    assert!(e.contains("bad.toml") && e.contains("epoch"), "{e}");
    let e = fails(&["train", "--dataset", "imagenet-22k", "--out", s(&run)]);
    assert!(e.contains("imagenet-22k"), "{e}");
    let e = fails(&["train", "--preset", "vit_nope", "--out", s(&run)]);
    assert!(e.contains("unknown preset 'vit_nope'"), "{e}");
    let e = fails(&[
        "train",
        "--batch-size",
        "10",
        "--accum-steps",
        "3",
        "--out",
        s(&run),
    ]);
    assert!(e.contains("not divisible by accum_steps"), "{e}");
    let e = fails(&["train", "--resume", s(&dir.path().join("no-run"))]);
    assert!(e.contains("not a run folder"), "{e}");
}
