//! End-to-end tests of `vit train` and `vit eval` on tiny generated datasets: the loss
//! falls, runs resume exactly (also after SIGKILL), and bad input fails clearly.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fails, ok, p, tiny_recipe, vit, weights, write_idx_dataset};

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn setup(extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    write_idx_dataset(&dir.path().join("data"), 400, 100, true);
    let recipe = dir.path().join("recipe.toml");
    std::fs::write(&recipe, tiny_recipe(&dir.path().join("data"), extra)).unwrap();
    (dir, recipe)
}

/// As [`setup`], with `model` (the lines of a `[model]` table on 28×28×1 images, 10
/// classes) in place of the recipe's ViT.
fn setup_model(extra: &str, model: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let (dir, recipe) = setup(extra);
    let text = std::fs::read_to_string(&recipe).unwrap();
    let text = format!(
        "{}[model]\nimage_size = [28, 28]\nin_channels = 1\nnum_classes = 10\n{model}",
        &text[..text.find("[model]").unwrap()]
    );
    std::fs::write(&recipe, text).unwrap();
    (dir, recipe)
}

#[test]
fn training_lowers_the_loss_and_writes_the_run() {
    let (dir, recipe) = setup("epochs = 6\nval_size = 50\n");
    let run = dir.path().join("run");
    let out = ok(&["train", "--config", p(&recipe), "--out", p(&run), "--quiet"]);
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
        p(&run.join("checkpoint-best.safetensors")),
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        p(&dir.path().join("data")),
        "--format",
        "json",
        "--out",
        p(&dir.path().join("eval")),
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
        p(&run.join("checkpoint-best.safetensors")),
        "--data-dir",
        p(&dir.path().join("data")),
        "--out",
        p(&dir.path().join("eval")),
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
        p(&img),
        "--weights",
        p(&run.join("checkpoint-best.safetensors")),
    ]);
    assert!(pred.contains("1. "), "{pred}");

    // int8: quantize, evaluate against the f32 checkpoint, and refuse to train from it.
    let best = run.join("checkpoint-best.safetensors");
    let int8 = dir.path().join("q/int8.safetensors");
    let out = ok(&["quantize", p(&best), p(&int8)]);
    // One block: qkv, proj, fc1, fc2, and the patch projection.
    assert!(out.contains("5 linear layers int8"), "{out}");
    // `vit eval CK --reference best` as JSON.
    let against_best = |ck: &Path, out: &str| -> serde_json::Value {
        let json = ok(&[
            "eval",
            "--checkpoint",
            p(ck),
            "--reference",
            p(&best),
            "--data-dir",
            p(&dir.path().join("data")),
            "--format",
            "json",
            "--out",
            p(&dir.path().join(out)),
        ]);
        serde_json::from_str(&json).unwrap()
    };
    let q = against_best(&int8, "eval-int8");
    let r = &q["reference"];
    assert_eq!(
        r["accuracy"].as_f64().unwrap(),
        acc,
        "the reference is the f32 checkpoint"
    );
    assert!(r["top1_agreement"].as_f64().unwrap() >= 0.97, "{r}");
    assert!(r["mean_logit_cosine"].as_f64().unwrap() >= 0.999, "{r}");
    assert!((q["accuracy"].as_f64().unwrap() - acc).abs() <= 0.03, "{q}");
    let pred = ok(&["predict", p(&img), "--weights", p(&int8)]);
    assert!(pred.contains("1. "), "{pred}");
    // Static activations, calibrated on 64 training images.
    let calibrated = dir.path().join("q/static.safetensors");
    let out = ok(&[
        "quantize",
        p(&best),
        p(&calibrated),
        "--calibrate",
        "fashion-mnist",
        "--data-dir",
        p(&dir.path().join("data")),
        "--calibrate-images",
        "64",
    ]);
    assert!(out.contains("calibrated on 64 training images"), "{out}");
    let s = against_best(&calibrated, "eval-static");
    assert!(
        s["reference"]["top1_agreement"].as_f64().unwrap() >= 0.95,
        "{s}"
    );
    assert_ne!(
        s["loss"], q["loss"],
        "static and dynamic activations differ"
    );
    let e = fails(&[
        "quantize",
        p(&best),
        p(&dir.path().join("q/none.safetensors")),
        "--calibrate",
        "fashion-mnist",
        "--data-dir",
        p(&dir.path().join("data")),
        "--calibrate-images",
        "0",
    ]);
    assert!(e.contains("at least 1"), "{e}");
    let e = fails(&[
        "train",
        "--config",
        p(&recipe),
        "--init",
        p(&int8),
        "--out",
        p(&dir.path().join("from-int8")),
        "--quiet",
    ]);
    assert!(
        e.contains("int8 checkpoint (vit quantize) runs inference only"),
        "{e}"
    );
    for args in [
        vec!["export", p(&int8), "--onnx", p(&dir.path().join("m.onnx"))],
        vec!["convert", p(&int8), p(&dir.path().join("c.safetensors"))],
        vec!["quantize", p(&int8), p(&dir.path().join("qq.safetensors"))],
    ] {
        let e = fails(&args);
        assert!(e.contains("int8"), "{args:?}: {e}");
    }
    assert!(!dir.path().join("from-int8").exists());
}

/// Starts `vit train ARGS` and kills it (SIGKILL) soon after its first `checkpoint-last`
/// appears in `run` (the run needs `checkpoint_every`).
fn kill_after_first_checkpoint(run: &Path, args: &[&str]) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vit"))
        .args(args)
        .spawn()
        .unwrap();
    let last = run.join("checkpoint-last.safetensors");
    let start = std::time::Instant::now();
    while !last.exists() && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(30));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(last.exists());
}

/// Trains `recipe` for 30 steps (its schedule fitted into them) twice, once straight and
/// once killed after its first checkpoint and resumed; asserts the last checkpoints' model
/// tensors are identical and returns the two run folders (full, part).
fn resumed_equals_uninterrupted(dir: &Path, recipe: &Path) -> (PathBuf, PathBuf) {
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--config",
            p(recipe),
            "--out",
            p(out),
            "--quiet",
            "--max-steps",
            "30",
            "--checkpoint-every",
            "1",
        ]
        .map(String::from)
        .to_vec()
    };
    let full = dir.join("full");
    let a = args(&full);
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let part = dir.join("part");
    let a = args(&part);
    kill_after_first_checkpoint(&part, &a.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&["train", "--resume", p(&part), "--quiet"]);
    assert_eq!(
        weights(&full.join("checkpoint-last.safetensors")),
        weights(&part.join("checkpoint-last.safetensors"))
    );
    (full, part)
}

#[test]
fn stopped_and_resumed_run_equals_uninterrupted_run() {
    // A --max-steps run (its schedule fitted into 30 steps, ending mid-epoch 2), killed
    // and resumed with the same max_steps, equals the uninterrupted one.
    let (dir, recipe) = setup("epochs = 2\nval_size = 50\nlabel_smoothing = 0.1\n");
    let (full, part) = resumed_equals_uninterrupted(dir.path(), &recipe);
    let (a, b) = (metrics(&full), metrics(&part));
    assert_eq!(a.len(), 2);
    assert_eq!(b.len(), 2);
    assert_eq!(a[1]["step"], 30);
    for key in ["train_loss", "val_loss", "val_acc", "step", "lr"] {
        assert_eq!(a[1][key], b[1][key], "{key}");
    }
}

#[test]
fn finished_runs_say_so_and_max_steps_runs_extend() {
    // 350 training images, batch 16: 21 steps per epoch, 42 in the run.
    let (dir, recipe) = setup("epochs = 2\nval_size = 50\n");
    let run = dir.path().join("run");
    let out = ok(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&run),
        "--quiet",
        "--max-steps",
        "5",
    ]);
    assert!(out.contains("best validation accuracy"), "{out}");
    // Shorter than an epoch: one point, drawn over steps; the schedule ends at step 5.
    let m = metrics(&run);
    assert_eq!((m.len(), m[0]["step"].as_u64()), (1, Some(5)));
    assert!(m[0]["lr"].as_f64().unwrap() < 1e-3, "{m:?}");
    assert!(run.join("curves.png").exists());

    // Resumed as it is: finished, nothing to do, its result shown, nothing written.
    let before = std::fs::read(run.join("checkpoint-last.safetensors")).unwrap();
    let out = ok(&["train", "--resume", p(&run), "--quiet"]);
    assert!(
        out.contains(&format!(
            "run {} is already finished (1 epoch / 5 steps); nothing to do",
            run.display()
        )) && out.contains("test accuracy"),
        "{out}"
    );
    assert_eq!(
        std::fs::read(run.join("checkpoint-last.safetensors")).unwrap(),
        before
    );

    // A larger --max-steps continues it.
    ok(&["train", "--resume", p(&run), "--quiet", "--max-steps", "10"]);
    let m = metrics(&run);
    assert_eq!((m.len(), m[0]["step"].as_u64()), (1, Some(10)));
    let out = ok(&["train", "--resume", p(&run), "--quiet"]);
    assert!(out.contains("(1 epoch / 10 steps); nothing to do"), "{out}");

    // Past all epochs: the run ends with its last epoch, and then is finished too.
    ok(&[
        "train",
        "--resume",
        p(&run),
        "--quiet",
        "--max-steps",
        "1000000",
    ]);
    let m = metrics(&run);
    assert_eq!((m.len(), m[1]["step"].as_u64()), (2, Some(42)));
    let out = ok(&["train", "--resume", p(&run), "--quiet"]);
    assert!(
        out.contains("(2 epochs / 42 steps); nothing to do"),
        "{out}"
    );
}

#[test]
fn a_run_without_validation_set_speaks_of_train_accuracy() {
    let (dir, recipe) = setup("epochs = 1\nval_size = 0\n");
    let run = dir.path().join("run");
    let out = ok(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&run),
        "--quiet",
        "--max-steps",
        "3",
    ]);
    assert!(
        out.contains("final train accuracy") && !out.contains("validation accuracy"),
        "{out}"
    );
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(!report.contains("validation accuracy"), "{report}");
    assert!(report.contains("no validation set"), "{report}");
    assert!(run.join("curves.png").exists());
}

/// Writes an image folder `root/{train,test}/cK/i.png` of 28×28 grayscale images, `per_class`
/// training and 2 test images per class; class k is a flat gray level of its own.
fn gray_folder(root: &Path, classes: usize, per_class: usize) {
    for (split, n) in [("train", per_class), ("test", 2)] {
        for c in 0..classes {
            let d = root.join(split).join(format!("c{c}"));
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                let v = (40 + 60 * c + i % 20) as u8;
                image::GrayImage::from_pixel(28, 28, image::Luma([v]))
                    .save(d.join(format!("{i}.png")))
                    .unwrap();
            }
        }
    }
}

#[test]
fn fine_tuning_takes_the_class_count_from_the_dataset() {
    // A 10-class checkpoint (2 steps on the IDX set), fine-tuned on a 3-class folder.
    let (dir, recipe) = setup("epochs = 1\nval_size = 20\n");
    let pre = dir.path().join("pre");
    ok(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&pre),
        "--quiet",
        "--max-steps",
        "2",
    ]);
    let imgs = dir.path().join("imgs");
    gray_folder(&imgs, 3, 8);
    let dataset = format!("folder:{}", imgs.display());
    let init = pre.join("checkpoint-last.safetensors");

    // Without --init and --num-classes, the mismatch is an error that names the flag, and
    // the failed start leaves no run folder.
    let bad = dir.path().join("bad");
    let e = fails(&[
        "train",
        "--config",
        p(&recipe),
        "--dataset",
        &dataset,
        "--out",
        p(&bad),
    ]);
    assert!(
        e.contains("3 classes") && e.contains("num_classes = 10") && e.contains("--num-classes 3"),
        "{e}"
    );
    assert!(!bad.exists());

    // With --init: the dataset's 3 classes, a fresh head.
    let ft = dir.path().join("ft");
    let out = vit(&[
        "train",
        "--config",
        p(&recipe),
        "--dataset",
        &dataset,
        "--init",
        p(&init),
        "--val-size",
        "3",
        "--batch-size",
        "7",
        "--out",
        p(&ft),
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("head dropped: the checkpoint has 10 classes, the config 3"),
        "{err}"
    );
    let saved = std::fs::read_to_string(ft.join("config.toml")).unwrap();
    assert!(saved.contains("num_classes = 3"), "{saved}");
    let report = std::fs::read_to_string(ft.join("report.md")).unwrap();
    assert!(report.contains("c2"), "{report}");
    // The resumed run builds the same 3-class model and continues.
    ok(&["train", "--resume", p(&ft), "--quiet", "--epochs", "2"]);
    assert_eq!(metrics(&ft).len(), 2);

    // --num-classes sets the class count explicitly, without --init too.
    ok(&[
        "train",
        "--config",
        p(&recipe),
        "--dataset",
        &dataset,
        "--num-classes",
        "3",
        "--val-size",
        "3",
        "--batch-size",
        "7",
        "--out",
        p(&dir.path().join("scratch")),
        "--quiet",
    ]);
}

#[test]
fn a_600_image_folder_trains_with_the_default_validation_split() {
    // The default holds out 10% (60 images), not 5,000.
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("imgs");
    gray_folder(&imgs, 3, 200);
    let run = dir.path().join("run");
    let out = ok(&[
        "train",
        "--dataset",
        &format!("folder:{}", imgs.display()),
        "--num-classes",
        "3",
        "--max-steps",
        "2",
        "--out",
        p(&run),
        "--quiet",
    ]);
    assert!(out.contains("best validation accuracy"), "{out}");
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(!saved.contains("val_size"), "{saved}");
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(
        report.contains("on 6 images") || report.contains("| test images | 6 |"),
        "{report}"
    );
}

#[test]
fn run_killed_with_sigkill_resumes_to_identical_weights() {
    let (dir, recipe) = setup("epochs = 3\nval_size = 50\ncheckpoint_every = 1\n");
    let full = dir.path().join("full");
    ok(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&full),
        "--quiet",
    ]);
    let killed = dir.path().join("killed");
    kill_after_first_checkpoint(
        &killed,
        &[
            "train",
            "--config",
            p(&recipe),
            "--out",
            p(&killed),
            "--quiet",
        ],
    );
    let last = killed.join("checkpoint-last.safetensors");
    // Whatever instant the kill hit, the checkpoint is whole and the run resumes.
    ok(&["train", "--resume", p(&killed), "--quiet"]);
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
        p(&recipe),
        "--out",
        p(&dir.path().join("run")),
        "--quiet",
    ]);
    assert!(out.contains("on 50 images"), "{out}");
}

#[test]
fn bad_training_input_fails_clearly() {
    let (dir, recipe) = setup("epochs = 3\nval_size = 50\n");
    let run = dir.path().join("run");

    // Diverging run: the loss becomes NaN/inf; the error says so and names the last
    // checkpoint only if there is one.
    let e = fails(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&run),
        "--quiet",
        "--lr",
        "1e30",
        "--clip-grad",
        "0",
        "--warmup-epochs",
        "0",
    ]);
    assert!(e.contains("loss became"), "{e}");
    let last = run.join("checkpoint-last.safetensors");
    if last.exists() {
        assert!(e.contains(p(&last)), "{e}");
    } else {
        assert!(e.contains("no checkpoint was written before it"), "{e}");
    }

    // Missing dataset files.
    let e = fails(&[
        "train",
        "--config",
        p(&recipe),
        "--data-dir",
        p(&dir.path().join("nowhere")),
        "--out",
        p(&run),
        "--quiet",
    ]);
    assert!(e.contains("nowhere"), "{e}");

    // Truncated IDX file.
    let data = dir.path().join("data");
    let f = data.join("train-labels-idx1-ubyte.gz");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&["train", "--config", p(&recipe), "--out", p(&run), "--quiet"]);
    assert!(e.contains("train-labels-idx1-ubyte.gz"), "{e}");

    // Unknown recipe field, unknown dataset, unknown preset, inconsistent numbers.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "epoch = 3\n").unwrap();
    let e = fails(&["train", "--config", p(&bad)]);
    assert!(e.contains("bad.toml") && e.contains("epoch"), "{e}");
    let e = fails(&["train", "--dataset", "imagenet-22k", "--out", p(&run)]);
    assert!(e.contains("imagenet-22k"), "{e}");
    let e = fails(&["train", "--preset", "vit_nope", "--out", p(&run)]);
    assert!(e.contains("unknown preset 'vit_nope'"), "{e}");
    let e = fails(&[
        "train",
        "--batch-size",
        "10",
        "--accum-steps",
        "3",
        "--out",
        p(&run),
    ]);
    assert!(e.contains("not divisible by accum_steps"), "{e}");
    // timm's spelling of the random-erasing probability, out of range.
    let e = fails(&["train", "--reprob", "1.5", "--out", p(&run)]);
    assert!(e.contains("random_erase") && e.contains("1.5"), "{e}");
    let e = fails(&["train", "--resume", p(&dir.path().join("no-run"))]);
    assert!(e.contains("not a run folder"), "{e}");
}

/// A tiny recipe for 32×32×3 datasets (patch 8, dim 16, one block).
fn rgb_recipe(dataset: &str, data_dir: Option<&Path>, classes: usize) -> String {
    let dir = data_dir.map_or(String::new(), |d| {
        format!("data_dir = \"{}\"\n", d.display())
    });
    format!(
        "dataset = \"{dataset}\"\n{dir}batch_size = 8\nval_size = 8\nepochs = 2\nlr = 0.003\n\
         [model]\nimage_size = [32, 32]\npatch_size = 8\nin_channels = 3\nnum_classes = {classes}\n\
         embed_dim = 16\ndepth = 1\nnum_heads = 2\n"
    )
}

#[test]
fn cifar10_binary_folder_trains() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let record = |i: usize| {
        let c = (i % 10) as u8;
        let mut r = vec![c];
        r.extend((0..3072).map(|p| (p as u8).wrapping_mul(c + 1)));
        r
    };
    for name in [
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ] {
        let bytes: Vec<u8> = (0..10).flat_map(record).collect();
        std::fs::write(bin.join(format!("{name}.bin")), bytes).unwrap();
    }
    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, rgb_recipe("cifar10", Some(dir.path()), 10)).unwrap();
    let out = ok(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&dir.path().join("run")),
        "--quiet",
    ]);
    assert!(out.contains("on 10 images"), "{out}");
    let m = metrics(&dir.path().join("run"));
    assert_eq!(m.len(), 2);
}

#[test]
fn image_folder_trains_and_names_classes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("shapes");
    for (split, n) in [("train", 12), ("test", 4)] {
        for (c, class) in ["circle", "square"].iter().enumerate() {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                let v = (60 + 120 * c + i) as u8;
                image::RgbImage::from_pixel(32, 32, image::Rgb([v, 255 - v, v / 2]))
                    .save(d.join(format!("{i}.png")))
                    .unwrap();
            }
        }
    }
    let recipe = dir.path().join("r.toml");
    std::fs::write(
        &recipe,
        rgb_recipe(&format!("folder:{}", root.display()), None, 2),
    )
    .unwrap();
    let run = dir.path().join("run");
    let out = ok(&["train", "--config", p(&recipe), "--out", p(&run), "--quiet"]);
    assert!(out.contains("on 8 images"), "{out}");
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(
        report.contains("circle") && report.contains("square"),
        "{report}"
    );
    // Wrong class count for the dataset: a clear error.
    std::fs::write(
        &recipe,
        rgb_recipe(&format!("folder:{}", root.display()), None, 3),
    )
    .unwrap();
    let e = fails(&["train", "--config", p(&recipe), "--out", p(&run)]);
    assert!(
        e.contains("2 classes") && e.contains("num_classes = 3"),
        "{e}"
    );
}

#[test]
fn fine_tuning_from_a_timm_checkpoint_resamples_positions_and_replaces_the_head() {
    // timm_tiny: 32×32, patch 8, 10 classes. Fine-tune at 48×48 on a 2-class folder.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("two");
    for (split, n) in [("train", 10), ("test", 4)] {
        for (c, class) in ["a", "b"].iter().enumerate() {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                let v = (50 + 150 * c + i) as u8;
                image::RgbImage::from_pixel(48, 48, image::Rgb([v, v, v]))
                    .save(d.join(format!("{i}.png")))
                    .unwrap();
            }
        }
    }
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/timm_tiny");
    let recipe = dir.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "dataset = \"folder:{}\"\nbatch_size = 4\nval_size = 4\nepochs = 1\n\
             init = \"{}\"\n[model]\nimage_size = [48, 48]\npatch_size = 8\nnum_classes = 2\n\
             embed_dim = 64\ndepth = 2\nnum_heads = 4\n",
            root.display(),
            fixture.join("model.safetensors").display()
        ),
    )
    .unwrap();
    let out = vit(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&dir.path().join("run")),
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("4x4 to a 6x6 grid"), "{err}");
    assert!(
        err.contains("head dropped: the checkpoint has 10 classes, the config 2"),
        "{err}"
    );

    // An init checkpoint that does not fit the architecture names the tensor.
    let bad = recipe.with_file_name("bad.toml");
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("embed_dim = 64", "embed_dim = 32");
    std::fs::write(&bad, text).unwrap();
    let e = fails(&[
        "train",
        "--config",
        p(&bad),
        "--out",
        p(&dir.path().join("run2")),
    ]);
    assert!(e.contains("expected") && e.contains("found"), "{e}");
}

#[test]
fn optimizer_flags_are_checked_like_recipe_fields() {
    // --beta2, --eps and --eval-batch-size set the recipe fields of the same name and are
    // validated like them, before any data is loaded or any folder is written.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let e = fails(&["train", "--beta2", "1.5", "--out", p(&run)]);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("beta2"), "{e}");
    let e = fails(&["train", "--eval-batch-size", "0", "--out", p(&run)]);
    assert!(e.contains("eval_batch_size"), "{e}");
    assert!(!run.exists());
}

/// Writes `root/{train,test}/{red,blue}/i.{png,jpg}`: photos of varied sizes and aspect
/// ratios, reddish or bluish with a gradient.
fn photo_folder(root: &Path, per_class: [usize; 2]) {
    for (split, n) in [("train", per_class[0]), ("test", per_class[1])] {
        for (c, class) in ["red", "blue"].iter().enumerate() {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                let (w, h) = (40 + (7 * i % 30) as u32, 36 + (5 * i % 40) as u32);
                let img = image::RgbImage::from_fn(w, h, |x, y| {
                    let g = ((x + y) * 3) as u8;
                    if c == 0 {
                        image::Rgb([200, g, 40])
                    } else {
                        image::Rgb([40, g, 200])
                    }
                });
                let ext = if i % 2 == 0 { "png" } else { "jpg" };
                img.save(d.join(format!("{i}.{ext}"))).unwrap();
            }
        }
    }
}

#[test]
fn a_streamed_photo_folder_trains_resumes_exactly_and_evaluates_as_trained() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("photos");
    photo_folder(&root, [14, 3]);
    let recipe = dir.path().join("r.toml");
    std::fs::write(
        &recipe,
        rgb_recipe(&format!("folder:{}", root.display()), None, 2),
    )
    .unwrap();
    let args = |out: &Path, workers: &'static str| -> Vec<String> {
        [
            "train",
            "--config",
            p(&recipe),
            "--out",
            p(out),
            "--max-steps",
            "5",
            "--batch-size",
            "4",
            "--checkpoint-every",
            "1",
            "--workers",
            workers,
            "--scale",
            "0.3,1",
        ]
        .map(String::from)
        .to_vec()
    };
    let strs = |a: &[String]| a.iter().map(String::clone).collect::<Vec<_>>();
    // Uninterrupted, with progress lines: they report the share of time spent waiting.
    let full = dir.path().join("full");
    let a = strs(&args(&full, "2"));
    let out = ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("data-wait"), "{out}");
    // Killed after its first checkpoint and resumed, with another worker count: the same
    // weights and numbers.
    let part = dir.path().join("part");
    let mut a = strs(&args(&part, "1"));
    a.push("--quiet".into());
    kill_after_first_checkpoint(&part, &a.iter().map(String::as_str).collect::<Vec<_>>());
    let resumed = ok(&["train", "--resume", p(&part), "--quiet"]);
    assert_eq!(
        weights(&full.join("checkpoint-last.safetensors")),
        weights(&part.join("checkpoint-last.safetensors"))
    );
    let (m, n) = (metrics(&full), metrics(&part));
    for key in ["train_loss", "val_loss", "val_acc", "step"] {
        assert_eq!(m[0][key], n[0][key], "{key}");
    }
    // `vit eval` on the test folder prepares images as the run's final test did.
    let line = |s: &str| {
        s.lines()
            .find(|l| l.contains("test accuracy"))
            .unwrap()
            .split(" on ")
            .next()
            .unwrap()
            .to_string()
    };
    let eval = ok(&[
        "eval",
        "--checkpoint",
        p(&part.join("checkpoint-best.safetensors")),
        "--dataset",
        &format!("folder:{}", root.display()),
    ]);
    let acc = line(&resumed).replace("test accuracy ", "");
    let acc = acc.split(' ').next().unwrap();
    assert!(
        eval.contains(&format!("6 images: accuracy {acc}")),
        "{eval} vs {resumed}"
    );
    // A file that stops decoding mid-run stops the run with its name.
    let bad = root.join("train/blue/3.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff not really a jpeg").unwrap();
    let e = fails(&[
        "train",
        "--resume",
        p(&part),
        "--max-steps",
        "40",
        "--quiet",
    ]);
    assert!(e.contains("3.jpg") && e.contains("cannot decode"), "{e}");
}

#[test]
fn a_train_fraction_trains_on_a_class_balanced_part() {
    let (dir, recipe) = setup("epochs = 1\nval_size = 50\n");
    let line = |args: &[&str]| {
        let out = ok(args);
        out.lines()
            .find(|l| l.starts_with("data: "))
            .unwrap_or_else(|| panic!("no data line in {out}"))
            .to_string()
    };
    let full = line(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&dir.path().join("full")),
        "--max-steps",
        "1",
    ]);
    assert!(
        full.starts_with("data: 350 training images, 50 validation, 100 test"),
        "{full}"
    );
    let half = line(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&dir.path().join("half")),
        "--max-steps",
        "1",
        "--train-fraction",
        "0.5",
    ]);
    let n: usize = half["data: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((170..=180).contains(&n), "{half}");
    assert!(half.contains("(50% of them, class-balanced)"), "{half}");
    // The fraction is part of the run: a resume keeps it.
    let resumed = line(&[
        "train",
        "--resume",
        p(&dir.path().join("half")),
        "--max-steps",
        "2",
    ]);
    assert!(
        resumed.starts_with(&format!("data: {n} training images")),
        "{resumed}"
    );
}

#[test]
fn a_distilled_deit_trains_resumes_and_evaluates() {
    // The recipe's model table with DeiT's distillation token and second head.
    let (dir, recipe) = setup("epochs = 1\nval_size = 50\n");
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("mlp_ratio = 2.0\n", "mlp_ratio = 2.0\ndistilled = true\n");
    std::fs::write(&recipe, text).unwrap();
    let run = dir.path().join("run");
    let args = ["train", "--config", p(&recipe), "--out", p(&run), "--quiet"];
    ok(&[&args[..], &["--max-steps", "3"]].concat());
    let ck = weights(&run.join("checkpoint-last.safetensors"));
    for name in ["dist_token", "head_dist.weight", "head.weight"] {
        assert!(ck.iter().any(|(n, _)| n == name), "{name} missing");
    }
    let resumed = ok(&["train", "--resume", p(&run), "--max-steps", "6", "--quiet"]);
    assert!(resumed.contains("test accuracy"), "{resumed}");
    let eval = ok(&[
        "eval",
        "--checkpoint",
        p(&run.join("checkpoint-best.safetensors")),
        "--data-dir",
        p(&dir.path().join("data")),
    ]);
    assert!(eval.contains("100 images: accuracy"), "{eval}");
    let info = ok(&["info", "deit_tiny_distilled_patch16_224"]);
    assert!(
        info.contains("5,910,800") || info.contains("5910800"),
        "{info}"
    );
}

#[test]
fn a_deit_student_learns_from_a_teacher_and_resumes_exactly() {
    let (dir, recipe) = setup("epochs = 2\nval_size = 50\n");
    // The teacher: the recipe's plain ViT, a few steps.
    let teacher = dir.path().join("teacher");
    ok(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&teacher),
        "--max-steps",
        "8",
        "--quiet",
    ]);
    let teacher_ck = teacher.join("checkpoint-best.safetensors");
    // The student: the same with DeiT's distillation token, soft distillation.
    let student = dir.path().join("student.toml");
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("mlp_ratio = 2.0\n", "mlp_ratio = 2.0\ndistilled = true\n");
    std::fs::write(&student, text).unwrap();
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--config",
            p(&student),
            "--out",
            p(out),
            "--teacher",
            p(&teacher_ck),
            "--distill",
            "soft",
            "--distill-tau",
            "2",
            "--max-steps",
            "30",
            "--checkpoint-every",
            "1",
        ]
        .map(String::from)
        .to_vec()
    };
    let full = dir.path().join("full");
    let a = args(&full);
    let out = ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("teacher"), "{out}");
    let part = dir.path().join("part");
    let mut a = args(&part);
    a.push("--quiet".into());
    kill_after_first_checkpoint(&part, &a.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&["train", "--resume", p(&part), "--quiet"]);
    assert_eq!(
        weights(&full.join("checkpoint-last.safetensors")),
        weights(&part.join("checkpoint-last.safetensors"))
    );
    // Another alpha is another run: the teacher's term counts.
    let other = dir.path().join("other");
    let mut a = args(&other);
    a.extend(["--distill-alpha", "0", "--quiet"].map(String::from));
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_ne!(
        weights(&full.join("checkpoint-last.safetensors")),
        weights(&other.join("checkpoint-last.safetensors"))
    );
    // The teacher's logits cached once, un-augmented: another run (the teacher saw other
    // crops), said in the output, and resumed exactly as well.
    let cached = dir.path().join("cached");
    let mut a = args(&cached);
    a.push("--teacher-cache".into());
    let out = ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("teacher: labelled the"), "{out}");
    assert_ne!(
        weights(&full.join("checkpoint-last.safetensors")),
        weights(&cached.join("checkpoint-last.safetensors"))
    );
    let cached_part = dir.path().join("cached-part");
    let mut a = args(&cached_part);
    a.extend(["--teacher-cache", "--quiet"].map(String::from));
    kill_after_first_checkpoint(
        &cached_part,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    ok(&["train", "--resume", p(&cached_part), "--quiet"]);
    assert_eq!(
        weights(&cached.join("checkpoint-last.safetensors")),
        weights(&cached_part.join("checkpoint-last.safetensors"))
    );
    // A teacher of another class count: one clear line, no run folder.
    let imgs = dir.path().join("imgs");
    gray_folder(&imgs, 3, 8);
    let three = dir.path().join("three");
    ok(&[
        "train",
        "--config",
        p(&recipe),
        "--dataset",
        &format!("folder:{}", imgs.display()),
        "--num-classes",
        "3",
        "--val-size",
        "0",
        "--out",
        p(&three),
        "--max-steps",
        "1",
        "--quiet",
    ]);
    let bad = dir.path().join("bad");
    let e = fails(&[
        "train",
        "--config",
        p(&student),
        "--out",
        p(&bad),
        "--teacher",
        p(&three.join("checkpoint-last.safetensors")),
    ]);
    assert!(
        e.contains("the teacher has 3 classes but the student 10"),
        "{e}"
    );
    assert!(!bad.exists());
}

#[test]
fn compare_puts_runs_side_by_side() {
    let (dir, recipe) = setup("epochs = 2\nval_size = 50\n");
    let (a, b) = (dir.path().join("run-a"), dir.path().join("run-b"));
    for (run, lr) in [(&a, "0.005"), (&b, "0.001")] {
        ok(&[
            "train",
            "--config",
            p(&recipe),
            "--out",
            p(run),
            "--lr",
            lr,
            "--quiet",
        ]);
    }
    let out_dir = dir.path().join("cmp");
    let text = ok(&["compare", p(&a), p(&b), "--out", p(&out_dir)]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("run ") && lines[0].contains("best val"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("run-a") && lines[2].starts_with("run-b"),
        "{text}"
    );
    assert!(out_dir.join("compare.png").exists());
    let md = ok(&[
        "compare",
        p(&a),
        p(&b),
        "--format",
        "md",
        "--out",
        p(&out_dir),
    ]);
    assert!(md.starts_with("| run | model |"), "{md}");
    let json = ok(&[
        "compare",
        p(&a),
        p(&b),
        "--format",
        "json",
        "--out",
        p(&out_dir),
    ]);
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    let report = std::fs::read_to_string(a.join("report.md")).unwrap();
    let acc = rows[0]["test_acc"].as_f64().unwrap();
    assert!(
        report.contains(&format!("| test accuracy | {:.2}% |", 100.0 * acc)),
        "{report}"
    );
    assert_eq!(rows[1]["epochs"], 2);
    assert!(rows[0]["params"].as_u64().unwrap() > 0);
    let e = fails(&[
        "compare",
        p(&a),
        p(&dir.path().join("data")),
        "--out",
        p(&out_dir),
    ]);
    assert!(e.contains("not a run folder"), "{e}");
}

#[test]
fn the_documents_cnn_trains_evaluates_and_compares_with_a_vit() {
    let (dir, recipe) = setup("epochs = 1\nval_size = 50\n");
    let cnn = dir.path().join("cnn.toml");
    let text = std::fs::read_to_string(&recipe).unwrap();
    let body = text.split("[model]").next().unwrap();
    std::fs::write(
        &cnn,
        format!(
            "{body}[model]\narch = \"cnn\"\nimage_size = [28, 28]\nin_channels = 1\n\
             num_classes = 10\nwidths = [4, 8, 8]\n"
        ),
    )
    .unwrap();
    let (c, v) = (dir.path().join("cnn"), dir.path().join("vit"));
    ok(&[
        "train",
        "--config",
        p(&cnn),
        "--out",
        p(&c),
        "--max-steps",
        "4",
        "--quiet",
    ]);
    ok(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&v),
        "--max-steps",
        "4",
        "--quiet",
    ]);
    let eval = ok(&[
        "eval",
        "--checkpoint",
        p(&c.join("checkpoint-best.safetensors")),
        "--data-dir",
        p(&dir.path().join("data")),
    ]);
    assert!(eval.contains("100 images: accuracy"), "{eval}");
    let table = ok(&["compare", p(&c), p(&v), "--out", p(dir.path())]);
    assert!(table.contains("custom cnn"), "{table}");
    // A CNN has no attention to draw: one clear line.
    let img = dir.path().join("x.png");
    image::GrayImage::new(28, 28).save(&img).unwrap();
    let e = fails(&[
        "attention",
        p(&img),
        "--weights",
        p(&c.join("checkpoint-best.safetensors")),
        "--out",
        p(&dir.path().join("att")),
    ]);
    assert!(e.starts_with("error: "), "{e}");
}

#[test]
fn a_resnet_trains_and_resumes_exactly_with_its_batch_norm_statistics() {
    // A tiny ResNet with the small-image stem; batch 16 runs as two shards, each
    // normalised by its own statistics, the running ones moved once per micro-batch.
    let (dir, recipe) = setup_model(
        "epochs = 2\nval_size = 50\n",
        "arch = \"resnet\"\nblock = \"basic\"\nlayers = [1, 1]\nchannels = [4, 8]\n\
         stem_width = 4\nstem = \"small\"\n",
    );
    let (full, _) = resumed_equals_uninterrupted(dir.path(), &recipe);
    let ck = weights(&full.join("checkpoint-last.safetensors"));
    // The running statistics are in the checkpoint and have moved from their start.
    let var = |name: &str| -> Vec<f32> {
        let (_, bytes) = ck.iter().find(|(n, _)| n == name).unwrap();
        bytes
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    assert!(var("bn1.running_var").iter().all(|&v| v != 1.0 && v > 0.0));
    assert!(var("layer2.0.downsample.1.running_mean")
        .iter()
        .all(|&v| v != 0.0));
    let eval = ok(&[
        "eval",
        "--checkpoint",
        p(&full.join("checkpoint-last.safetensors")),
        "--data-dir",
        p(&dir.path().join("data")),
    ]);
    assert!(eval.contains("100 images: accuracy"), "{eval}");
}

/// `vit attention --method rollout` on a model whose stages differ in token count (an
/// `arch` Swin or PVT checkpoint) fails with one line naming why.
fn rollout_is_refused(ck: &Path, image: &Path, out: &Path, arch: &str) {
    let e = fails(&[
        "attention",
        "--weights",
        p(ck),
        p(image),
        "--out",
        p(out),
        "--method",
        "rollout",
    ]);
    assert!(
        e.contains("rollout needs one set of tokens") && e.contains(arch),
        "{e}"
    );
}

/// Fine-tunes a timm parity fixture (`{fixture}.json` and `.safetensors`, a model of
/// `classes` classes) on a 3-class folder of gray images with `--init` for one epoch, and
/// checks that it says its `head` was replaced. Returns a test image of the folder and the
/// run's last checkpoint.
fn fine_tune_fixture(root: &Path, fixture: &str, head: &str, classes: usize) -> (PathBuf, PathBuf) {
    let imgs = root.join("imgs");
    gray_folder(&imgs, 3, 8);
    let cfg = std::fs::read_to_string(common::fixture(&format!("{fixture}.json"))).unwrap();
    let model: toml::Value = serde_json::from_str(&cfg).unwrap();
    // `[model]`, with any table of its own (`[model.backbone]`).
    let model = toml::Value::Table([("model".to_string(), model)].into_iter().collect());
    let recipe = root.join("ft.toml");
    let text = format!(
        "dataset = \"folder:{}\"\nbatch_size = 7\nval_size = 3\nepochs = 1\n\n{}",
        imgs.display(),
        toml::to_string(&model).unwrap()
    );
    std::fs::write(&recipe, text).unwrap();
    let ft = root.join("ft");
    let init = common::fixture(&format!("{fixture}.safetensors"));
    let out = vit(&[
        "train",
        "--config",
        p(&recipe),
        "--init",
        p(&init),
        "--out",
        p(&ft),
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let replaced = format!("{head} dropped: the checkpoint has {classes} classes, the config 3");
    assert!(err.contains(&replaced), "{err}");
    (
        imgs.join("test/c2/0.png"),
        ft.join("checkpoint-last.safetensors"),
    )
}

#[test]
fn a_swin_trains_resumes_exactly_and_fine_tunes_from_timm_weights() {
    // A tiny Swin: a 14x14 map in 7x7 windows (shifted in the second block), then 7x7.
    let (dir, recipe) = setup_model(
        "epochs = 2\nval_size = 50\n",
        "arch = \"swin\"\npatch_size = 2\nembed_dim = 8\ndepths = [2, 1]\n\
         num_heads = [1, 2]\nwindow_size = 7\nmlp_ratio = 2.0\n",
    );
    let (full, _) = resumed_equals_uninterrupted(dir.path(), &recipe);
    let ck = full.join("checkpoint-last.safetensors");
    let data = dir.path().join("data");
    let eval = ok(&["eval", "--checkpoint", p(&ck), "--data-dir", p(&data)]);
    assert!(eval.contains("100 images: accuracy"), "{eval}");

    // timm's weights (the parity fixture, 10 classes) fine-tuned on a 3-class folder: a
    // new head.fc, the rest loaded.
    let (image, ft_ck) = fine_tune_fixture(dir.path(), "swin_tiny/fmnist", "head.fc", 10);
    let pred = ok(&["predict", "--weights", p(&ft_ck), p(&image)]);
    assert!(pred.contains("1. "), "{pred}");
    // At 8 px the first stage's 4x4 map shrinks the window (and its bias table): refused,
    // saying why.
    let e = fails(&[
        "predict",
        "--weights",
        p(&ft_ck),
        p(&image),
        "--img-size",
        "8",
    ]);
    assert!(
        e.contains("relative_position_bias_table") && e.contains("window"),
        "{e}"
    );
    // Window attention pictures: the last of its 4 blocks by default; rollout does not
    // apply across stages of different token counts, which it says.
    let attn = dir.path().join("attn");
    let out = ok(&[
        "attention",
        "--weights",
        p(&ft_ck),
        p(&image),
        "--out",
        p(&attn),
    ]);
    assert!(out.contains("local_attention_block3.png"), "{out}");
    assert!(attn.join("local_attention_block3.png").exists());
    let all = ok(&[
        "attention",
        "--weights",
        p(&ft_ck),
        p(&image),
        "--out",
        p(&attn),
        "--method",
        "all",
    ]);
    assert!(all.contains("local_attention_all_blocks.png"), "{all}");
    rollout_is_refused(&ft_ck, &image, &attn, "swin");
}

#[test]
fn a_pvt_trains_resumes_exactly_and_draws_its_reduced_key_attention() {
    // A tiny PVT v2: 7x7 then 4x4 maps, keys from a 3x3 reduction in the first stage.
    let (dir, recipe) = setup_model(
        "epochs = 2\nval_size = 50\n",
        "arch = \"pvt\"\ndepths = [1, 1]\nembed_dims = [8, 16]\nnum_heads = [1, 2]\n\
         sr_ratios = [2, 1]\nmlp_ratios = [2.0, 2.0]\n",
    );
    let (full, _) = resumed_equals_uninterrupted(dir.path(), &recipe);
    let ck = full.join("checkpoint-last.safetensors");
    let data = dir.path().join("data");
    let eval = ok(&["eval", "--checkpoint", p(&ck), "--data-dir", p(&data)]);
    assert!(eval.contains("100 images: accuracy"), "{eval}");
    let image = common::fixture("predict/image_rgb.png");
    let pred = ok(&["predict", "--weights", p(&ck), p(&image)]);
    assert!(pred.contains("1. "), "{pred}");
    // The attention its reduced keys receive, for the last of its two blocks; no rollout.
    let attn = dir.path().join("attn");
    let out = ok(&[
        "attention",
        "--weights",
        p(&ck),
        p(&image),
        "--out",
        p(&attn),
    ]);
    assert!(out.contains("local_attention_block1.png"), "{out}");
    rollout_is_refused(&ck, &image, &attn, "pvt");
}

#[test]
fn a_hybrid_vit_trains_resumes_exactly_fine_tunes_from_timm_weights_and_draws_attention() {
    // A tiny hybrid: the deep stem (8, 8, 16 channels) and one bottleneck stage on a 28x28
    // image, a 7x7 map of 1x1 cells, then two blocks.
    let (dir, recipe) = setup_model(
        "epochs = 2\nval_size = 50\n",
        "patch_size = 1\nembed_dim = 16\ndepth = 2\nnum_heads = 2\nmlp_ratio = 2.0\n\n\
         [model.backbone]\nstem = \"deep_same\"\nstem_channels = 16\nlayers = [1]\n\
         channels = [32]\nnorm_groups = 4\n",
    );
    let (full, _) = resumed_equals_uninterrupted(dir.path(), &recipe);
    let ck = full.join("checkpoint-last.safetensors");
    let data = dir.path().join("data");
    let eval = ok(&["eval", "--checkpoint", p(&ck), "--data-dir", p(&data)]);
    assert!(eval.contains("100 images: accuracy"), "{eval}");
    let info = ok(&["info", "--config", p(&recipe)]);
    assert!(
        info.contains("patch_embed.backbone.stages.0") && info.contains("stage 0 (1 bottlenecks)"),
        "{info}"
    );

    // timm's weights (the parity fixture: the deep stem in 2x2 cells, 4 classes) fine-tuned
    // on a 3-class folder: a new head, the backbone and blocks loaded.
    let (image, ft_ck) = fine_tune_fixture(dir.path(), "hybrid_tiny/deep", "head", 4);
    let pred = ok(&["predict", "--weights", p(&ft_ck), p(&image)]);
    assert!(pred.contains("1. "), "{pred}");
    // At twice the resolution the feature map doubles and the position embedding follows.
    let big = ok(&[
        "predict",
        "--weights",
        p(&ck),
        p(&image),
        "--img-size",
        "56",
    ]);
    assert!(big.contains("1. "), "{big}");
    // A hybrid's checkpoint under a plain ViT's preset, and a plain one under a hybrid's:
    // one line naming the mismatch.
    let e = fails(&[
        "predict",
        "--weights",
        p(&ck),
        p(&image),
        "--preset",
        "vit_fmnist",
    ]);
    assert!(e.contains("the checkpoint is a hybrid ViT"), "{e}");
    let plain = common::fixture("timm_tiny/model.safetensors");
    let e = fails(&[
        "predict",
        "--weights",
        p(&plain),
        p(&image),
        "--preset",
        "hybrid_fmnist",
    ]);
    assert!(e.contains("the config is a hybrid ViT"), "{e}");
    // An image size whose map the 2x2 cells do not tile: one line saying so.
    let e = fails(&[
        "predict",
        "--weights",
        p(&ft_ck),
        p(&image),
        "--img-size",
        "36",
    ]);
    assert!(e.contains("not divisible by patch_size 2"), "{e}");

    // Its tokens are one set, so attention maps and rollout apply as in a plain ViT.
    let attn = dir.path().join("attn");
    let out = ok(&[
        "attention",
        "--weights",
        p(&ck),
        p(&image),
        "--out",
        p(&attn),
        "--method",
        "rollout",
    ]);
    assert!(out.contains("rollout"), "{out}");
}

#[test]
fn gradient_checkpointing_trains_to_the_same_weights() {
    // Dropout and drop-path drawing, two blocks: with --grad-checkpoint the run ends on
    // the same weights, bit for bit, as without (the recomputed blocks replay their random
    // streams), and a recipe's `grad_checkpoint = true` is what the flag sets.
    let (dir, recipe) = setup(
        "epochs = 1\nval_size = 50\nmax_steps = 6\nlabel_smoothing = 0.1\n\
         drop_path = 0.2\n",
    );
    let text = std::fs::read_to_string(&recipe).unwrap().replace(
        "depth = 1",
        "depth = 2\nproj_dropout = 0.1\nattn_dropout = 0.1",
    );
    std::fs::write(&recipe, text).unwrap();
    let (plain, ckpt) = (dir.path().join("plain"), dir.path().join("ckpt"));
    ok(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&plain),
        "--quiet",
    ]);
    ok(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&ckpt),
        "--quiet",
        "--grad-checkpoint",
    ]);
    let last = "checkpoint-last.safetensors";
    assert_eq!(weights(&plain.join(last)), weights(&ckpt.join(last)));
    let resolved = std::fs::read_to_string(ckpt.join("config.toml")).unwrap();
    assert!(resolved.contains("grad_checkpoint = true"), "{resolved}");

    // A model without blocks to recompute is refused in one line.
    let (dir, recipe) = setup_model(
        "epochs = 1\nval_size = 50\nmax_steps = 1\n",
        "arch = \"cnn\"\nwidths = [4, 8]\n",
    );
    let e = fails(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&dir.path().join("cnn")),
        "--grad-checkpoint",
    ]);
    assert!(
        e.contains("gradient checkpointing is built for ViT-family models"),
        "{e}"
    );
}

/// A build without the `mpi` feature started by an MPI launcher as one of several
/// processes: each would train alone and all would write the same files. Refused.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_be_one_of_several_processes() {
    let (dir, recipe) = setup("epochs = 1\n");
    let run = dir.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_vit"))
        .args(["train", "--config", p(&recipe), "--out", p(&run), "--quiet"])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("error: started as one of 2 MPI processes")
            && err.contains("--features mpi")
            && err.lines().count() == 1,
        "{err}"
    );
    assert!(!run.exists());
    // Slurm's srun with PMIx: the rank from PMIx, the step's size from Slurm.
    let out = Command::new(env!("CARGO_BIN_EXE_vit"))
        .args(["train", "--config", p(&recipe), "--out", p(&run), "--quiet"])
        .env("PMIX_RANK", "1")
        .env("SLURM_STEP_NUM_TASKS", "4")
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("error: started as one of 4 MPI processes"),
        "{err}"
    );
    assert!(!run.exists());
}

/// Mixed precision: `--precision bf16` trains (the loss falls as in f32) and resumes
/// exactly; an unknown precision is one clear line.
#[test]
fn bf16_mixed_precision_trains_and_resumes_exactly() {
    let (dir, recipe) = setup("epochs = 4\nval_size = 50\nprecision = \"bf16\"\n");
    let run = dir.path().join("run");
    ok(&["train", "--config", p(&recipe), "--out", p(&run), "--quiet"]);
    let m = metrics(&run);
    let (first, last) = (
        m[0]["train_loss"].as_f64().unwrap(),
        m[3]["train_loss"].as_f64().unwrap(),
    );
    assert!(last < 0.85 * first, "loss did not fall: {first} → {last}");
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(saved.contains("precision = \"bf16\""), "{saved}");
    // The f32 run of the same recipe differs: the products really were bf16.
    let f32_run = dir.path().join("f32");
    ok(&[
        "train",
        "--config",
        p(&recipe),
        "--out",
        p(&f32_run),
        "--quiet",
        "--precision",
        "f32",
    ]);
    assert_ne!(
        weights(&run.join("checkpoint-last.safetensors")),
        weights(&f32_run.join("checkpoint-last.safetensors"))
    );
    resumed_equals_uninterrupted(dir.path(), &recipe);
    let err = fails(&["train", "--config", p(&recipe), "--precision", "fp8"]);
    assert!(
        err.contains("unknown precision 'fp8'") && err.contains("f32, bf16"),
        "{err}"
    );
}
