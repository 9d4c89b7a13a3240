//! End-to-end tests of `vit info`, `vit predict` and `vit convert`: the real binary on
//! the committed timm/HF fixtures and on broken inputs.

mod common;

use candle_core::Tensor;
use common::{assert_close, fails, fixture, load, ok, p};

/// Logits of the first JSON line printed by `vit predict --format json --logits`.
fn json_logits(stdout: &str) -> Tensor {
    let v: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    let l: Vec<f32> = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let n = l.len();
    Tensor::from_vec(l, (1, n), &candle_core::Device::Cpu).unwrap()
}

#[test]
fn info_lists_presets_with_timm_parameter_counts() {
    let out = ok(&["info"]);
    for (name, count) in [
        ("vit_tiny_patch16_224", "5,717,416"),
        ("vit_small_patch16_224", "22,050,664"),
        ("vit_small_patch32_224", "22,878,952"),
        ("vit_base_patch16_224", "86,567,656"),
        ("vit_base_patch32_224", "88,224,232"),
        ("vit_base_patch16_384", "86,859,496"),
        ("vit_large_patch16_224", "304,326,632"),
        ("vit_huge_patch14_224", "632,045,800"),
    ] {
        let line = out.lines().find(|l| l.starts_with(name)).unwrap();
        assert!(line.contains(count), "{line}");
    }
    let detail = ok(&["info", "vit_base_patch16_224"]);
    assert!(detail.contains("blocks.11"), "{detail}");
    assert!(
        detail.contains("(196, 768)") && detail.contains("(12, 197, 197)"),
        "{detail}"
    );
}

/// `info --config` takes a training recipe as well as a model config: the recipe's
/// `[model]` table or its preset.
#[test]
fn info_shows_the_model_of_a_recipe() {
    let recipe = |name: &str| format!("{}/recipes/{name}", env!("CARGO_MANIFEST_DIR"));
    for (file, count) in [
        ("resnet10-quarter-fmnist.toml", "parameters 308,538"),
        ("deit-fmnist-distilled.toml", "parameters 206,740"),
    ] {
        let out = ok(&["info", "--config", &recipe(file)]);
        assert!(out.contains(count), "{file}: {out}");
    }
}

#[test]
fn predict_timm_checkpoint_prints_timm_logits() {
    let want = load("predict/expected.safetensors");
    let out = ok(&[
        "predict",
        p(&fixture("predict/image_rgb.png")),
        "--weights",
        p(&fixture("timm_tiny/model.safetensors")),
        "--config",
        p(&fixture("timm_tiny/config.json")),
        "--format",
        "json",
        "--logits",
    ]);
    assert_close(
        "timm_logits",
        &json_logits(&out),
        &want["timm_logits"],
        1e-4,
    );
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["top_k"].as_array().unwrap().len(), 5);
    assert!(out.find("\"top_k\"").unwrap() < out.find("\"logits\"").unwrap());
}

#[test]
fn predict_with_resize_and_center_crop_follows_timm_eval_transform() {
    // 40x48 image, crop_pct 0.875: shorter side to 36 (PIL bicubic), center crop 32.
    // Our resampler is not bit-identical to PIL on u8, so the tolerance is looser.
    let want = load("predict/expected.safetensors");
    let out = ok(&[
        "predict",
        p(&fixture("predict/image_40x48.png")),
        "--weights",
        p(&fixture("timm_tiny/model.safetensors")),
        "--config",
        p(&fixture("timm_tiny/config.json")),
        "--crop-pct",
        "0.875",
        "--format",
        "json",
        "--logits",
    ]);
    assert_close(
        "timm_logits_resized",
        &json_logits(&out),
        &want["timm_logits_resized"],
        2e-2,
    );
}

#[test]
fn predict_hf_checkpoint_prints_transformers_logits_and_labels() {
    let want = load("predict/expected.safetensors");
    let out = ok(&[
        "predict",
        p(&fixture("predict/image_rgb.png")),
        "--weights",
        p(&fixture("hf_tiny/model.safetensors")),
        "--format",
        "json",
        "--logits",
        "--top-k",
        "2",
    ]);
    assert_close("hf_logits", &json_logits(&out), &want["hf_logits"], 1e-4);
    assert!(out.contains("\"label\":\"truck\""), "{out}");
    let text = ok(&[
        "predict",
        p(&fixture("predict/image_rgb.png")),
        "--weights",
        p(&fixture("hf_tiny/model.safetensors")),
    ]);
    assert!(text.contains("1. truck"), "{text}");
}

#[test]
fn convert_both_ways_keeps_the_logits() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf/model.safetensors");
    std::fs::create_dir_all(hf.parent().unwrap()).unwrap();
    ok(&[
        "convert",
        p(&fixture("timm_tiny/model.safetensors")),
        p(&hf),
        "--to",
        "hf",
        "--config",
        p(&fixture("timm_tiny/config.json")),
    ]);
    assert!(dir.path().join("hf/config.json").exists());
    let timm = dir.path().join("back.safetensors");
    ok(&["convert", p(&hf), p(&timm), "--to", "timm"]);
    let want = load("predict/expected.safetensors");
    for weights in [&hf, &timm] {
        // Both outputs describe themselves: no --config needed.
        let out = ok(&[
            "predict",
            p(&fixture("predict/image_rgb.png")),
            "--weights",
            p(weights),
            "--format",
            "json",
            "--logits",
            "--crop-pct",
            "1",
        ]);
        assert_close("converted", &json_logits(&out), &want["timm_logits"], 1e-4);
    }
}

#[test]
fn bad_inputs_give_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let img = fixture("predict/image_rgb.png");
    let weights = fixture("timm_tiny/model.safetensors");
    let cfg = fixture("timm_tiny/config.json");

    let e = fails(&[
        "predict",
        "/no/such.png",
        "--weights",
        p(&weights),
        "--config",
        p(&cfg),
    ]);
    assert!(
        e.contains("/no/such.png") && e.contains("No such file"),
        "{e}"
    );

    let not_image = dir.path().join("notes.png");
    std::fs::write(&not_image, b"this is text").unwrap();
    let e = fails(&[
        "predict",
        p(&not_image),
        "--weights",
        p(&weights),
        "--config",
        p(&cfg),
    ]);
    assert!(
        e.contains("notes.png") && e.contains("cannot decode image"),
        "{e}"
    );

    let bytes = std::fs::read(&weights).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&[
        "predict",
        p(&img),
        "--weights",
        p(&truncated),
        "--config",
        p(&cfg),
    ]);
    assert!(
        e.contains("truncated.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );

    let corrupt = dir.path().join("corrupt.safetensors");
    let mut b = bytes.clone();
    b[8..40].copy_from_slice(&[b'#'; 32]);
    std::fs::write(&corrupt, &b).unwrap();
    let e = fails(&[
        "predict",
        p(&img),
        "--weights",
        p(&corrupt),
        "--config",
        p(&cfg),
    ]);
    assert!(e.contains("corrupt.safetensors"), "{e}");

    let e = fails(&[
        "predict",
        p(&img),
        "--weights",
        p(&dir.path().join("none.safetensors")),
    ]);
    assert!(e.contains("none.safetensors"), "{e}");

    let e = fails(&["info", "vit_gigantic"]);
    assert!(e.contains("unknown preset 'vit_gigantic'"), "{e}");
    let e = fails(&[
        "predict",
        p(&img),
        "--weights",
        p(&weights),
        "--preset",
        "vit_nope",
    ]);
    assert!(e.contains("unknown preset 'vit_nope'"), "{e}");

    let heads = dir.path().join("heads.toml");
    std::fs::write(
        &heads,
        "image_size = [32, 32]\npatch_size = 8\nnum_classes = 10\nembed_dim = 64\ndepth = 2\nnum_heads = 5\n",
    )
    .unwrap();
    let e = fails(&["info", "--config", p(&heads)]);
    assert!(
        e.contains("embed_dim 64 is not divisible by num_heads 5"),
        "{e}"
    );

    let patch = dir.path().join("patch.toml");
    std::fs::write(
        &patch,
        "image_size = [30, 32]\npatch_size = 8\nnum_classes = 10\nembed_dim = 64\ndepth = 2\nnum_heads = 4\n",
    )
    .unwrap();
    let e = fails(&[
        "predict",
        p(&img),
        "--weights",
        p(&weights),
        "--config",
        p(&patch),
    ]);
    assert!(e.contains("30x32 is not divisible by patch_size 8"), "{e}");

    // An architecture that does not fit: the small-image preset on the tiny checkpoint.
    let e = fails(&[
        "predict",
        p(&img),
        "--weights",
        p(&weights),
        "--preset",
        "vit_cifar_tiny",
    ]);
    assert!(
        e.contains("tensor") && e.contains("expected") && e.contains("found"),
        "{e}"
    );

    // A timm checkpoint without metadata and no architecture given.
    let e = fails(&["predict", p(&img), "--weights", p(&weights)]);
    assert!(e.contains("--preset NAME or --config FILE"), "{e}");

    // Grayscale model, RGB mean of the wrong length.
    let e = fails(&[
        "predict",
        p(&img),
        "--weights",
        p(&weights),
        "--config",
        p(&cfg),
        "--mean",
        "0.5,0.5",
    ]);
    assert!(e.contains("mean and std need 3 values"), "{e}");
}

#[test]
fn a_missing_file_shows_its_os_cause_once() {
    // The I/O error's message already ends with its cause; the cause is not repeated
    // below it as "caused by".
    let e = fails(&["train", "--config", "/no/such/recipe.toml"]);
    assert!(e.contains("/no/such/recipe.toml"), "{e}");
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
    let e = fails(&[
        "predict",
        "/no/such.png",
        "--weights",
        p(&fixture("timm_tiny/model.safetensors")),
        "--config",
        p(&fixture("timm_tiny/config.json")),
    ]);
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
    let e = fails(&[
        "predict",
        p(&fixture("predict/image_rgb.png")),
        "--weights",
        "/no/w.safetensors",
    ]);
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
}

/// Regression: `vit info | head` panicked ("failed printing to stdout") when the reader had
/// gone; every command's output now ends quietly on a closed pipe.
#[test]
fn printing_to_a_closed_pipe_ends_quietly() {
    for args in [
        &["info"][..],
        &["info", "vit_base_patch16_224"],
        &["bench", "--help"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vit"))
            .args(args)
            .stdout(writer)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(out.status.success(), "{args:?}: {:?} {err}", out.status);
    }
}
