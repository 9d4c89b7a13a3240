//! End-to-end tests of the inference journeys: `vit predict` on folders, in batches, in
//! every output format and into a closed pipe; `--device` on predict, eval and attention;
//! output folders created by convert and eval.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{fails, fixture, ok, p, write_idx_dataset};

fn weights() -> PathBuf {
    fixture("timm_tiny/model.safetensors")
}

fn config() -> PathBuf {
    fixture("timm_tiny/config.json")
}

/// `vit predict IMAGES... --weights timm_tiny --config ... EXTRA...`.
fn predict(images: &[&Path], extra: &[&str]) -> String {
    let (w, c) = (weights(), config());
    let mut args = vec!["predict"];
    args.extend(images.iter().map(|i| p(i)));
    args.extend(["--weights", p(&w), "--config", p(&c)]);
    args.extend(extra);
    ok(&args)
}

/// A folder of images: a.png, sub/b.PNG, sub/deeper/c.JPG (a PNG under a .JPG name:
/// formats are guessed from the content), plus files that are skipped.
fn image_folder(root: &Path) -> PathBuf {
    let dir = root.join("images");
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let rgb = fixture("predict/image_rgb.png");
    std::fs::copy(&rgb, dir.join("a.png")).unwrap();
    std::fs::copy(fixture("predict/image_40x48.png"), dir.join("sub/b.PNG")).unwrap();
    std::fs::copy(&rgb, dir.join("sub/deeper/c.JPG")).unwrap();
    std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
    std::fs::write(dir.join("sub/labels.csv"), "a,b").unwrap();
    dir
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn predict_walks_folders_in_name_order_and_batches_like_one_by_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = image_folder(tmp.path());
    let one = predict(
        &[&dir],
        &["--format", "jsonl", "--logits", "--batch-size", "1"],
    );
    let lines = json_lines(&one);
    let images: Vec<&str> = lines.iter().map(|v| v["image"].as_str().unwrap()).collect();
    let want: Vec<String> = ["a.png", "sub/b.PNG", "sub/deeper/c.JPG"]
        .iter()
        .map(|f| dir.join(f).display().to_string())
        .collect();
    assert_eq!(images, want);
    // One forward per batch of 2 (and a last batch of 1) gives the same numbers.
    let batched = predict(
        &[&dir],
        &["--format", "jsonl", "--logits", "--batch-size", "2"],
    );
    for (a, b) in lines.iter().zip(json_lines(&batched)) {
        assert_eq!(a["top_k"], b["top_k"]);
        for (x, y) in a["logits"]
            .as_array()
            .unwrap()
            .iter()
            .zip(b["logits"].as_array().unwrap())
        {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() <= 1e-5, "{x} vs {y}");
        }
    }
    // `json` stays what it was: one object per line, the same as jsonl.
    let json = predict(
        &[&dir],
        &["--format", "json", "--logits", "--batch-size", "1"],
    );
    assert_eq!(json, one);
    // Folders and files mix, in the order given.
    let rgb = fixture("predict/image_rgb.png");
    let mixed = json_lines(&predict(&[&rgb, &dir.join("sub")], &["--format", "jsonl"]));
    assert_eq!(mixed.len(), 3);
    assert_eq!(mixed[0]["image"], rgb.display().to_string());
}

#[test]
fn predict_writes_csv_with_quoted_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("a, \"quoted\" name.png");
    std::fs::copy(fixture("predict/image_rgb.png"), &img).unwrap();
    let out = predict(&[&img], &["--format", "csv", "--top-k", "3"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "image,rank,index,label,probability");
    assert_eq!(lines.len(), 4, "{out}");
    let quoted = format!("\"{}\"", img.display().to_string().replace('"', "\"\""));
    for (rank, line) in lines[1..].iter().enumerate() {
        let rest = line
            .strip_prefix(&quoted)
            .unwrap_or_else(|| panic!("{line}"));
        let fields: Vec<&str> = rest[1..].split(',').collect();
        assert_eq!(fields[0], (rank + 1).to_string(), "{line}");
        let prob: f64 = fields[3].parse().unwrap();
        assert!((0.0..=1.0).contains(&prob), "{line}");
    }
    // Labels come from the checkpoint (the HF fixture's are CIFAR-10's).
    let hf = ok(&[
        "predict",
        p(&fixture("predict/image_rgb.png")),
        "--weights",
        p(&fixture("hf_tiny/model.safetensors")),
        "--format",
        "csv",
        "--top-k",
        "1",
    ]);
    assert!(hf.lines().nth(1).unwrap().contains(",1,9,truck,"), "{hf}");
}

#[test]
fn predict_bad_options_and_folders_give_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = image_folder(tmp.path());
    let (w, c) = (weights(), config());
    let base = ["predict", p(&dir), "--weights", p(&w), "--config", p(&c)];
    let run = |extra: &[&str]| fails(&[&base[..], extra].concat());
    let e = run(&["--top-k", "0"]);
    assert!(e.contains("top-k"), "{e}");
    let e = run(&["--batch-size", "0"]);
    assert!(e.contains("batch-size"), "{e}");
    let e = run(&["--format", "csv", "--logits"]);
    assert!(e.contains("--logits") && e.contains("csv"), "{e}");
    let e = fails(&[
        "predict",
        p(&dir.join("empty")),
        "--weights",
        p(&w),
        "--config",
        p(&c),
    ]);
    assert!(e.contains("empty") && e.contains("no images"), "{e}");
    let no_images = tmp.path().join("texts");
    std::fs::create_dir_all(&no_images).unwrap();
    std::fs::write(no_images.join("readme.md"), "hello").unwrap();
    let e = fails(&[
        "predict",
        p(&no_images),
        "--weights",
        p(&w),
        "--config",
        p(&c),
    ]);
    assert!(e.contains("texts") && e.contains("no images"), "{e}");
}

#[test]
fn predict_into_a_closed_pipe_ends_quietly() {
    // Far more output than a pipe holds: the writes after the reader leaves fail.
    let (w, c) = (weights(), config());
    let img = fixture("predict/image_rgb.png");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vit"))
        .args(["predict", "--weights", p(&w), "--config", p(&c), "--logits"])
        .args(["--batch-size", "4"])
        .args(std::iter::repeat_n(p(&img), 400))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("image_rgb.png"), "{first}");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "{err}");
}

#[test]
fn device_flag_on_predict_eval_and_attention() {
    let tmp = tempfile::tempdir().unwrap();
    let (w, c) = (weights(), config());
    let img = fixture("predict/image_rgb.png");
    let data = tmp.path().join("data");
    write_idx_dataset(&data, 10, 20, false);
    let legacy = fixture("legacy_run/checkpoint-last.safetensors");
    let attn_out = tmp.path().join("attn");
    let eval_out = tmp.path().join("eval");
    let commands = |device: &'static str| -> Vec<Vec<String>> {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        vec![
            s(&[
                "predict",
                p(&img),
                "--weights",
                p(&w),
                "--config",
                p(&c),
                "--device",
                device,
            ]),
            s(&[
                "attention",
                p(&img),
                "--weights",
                p(&w),
                "--config",
                p(&c),
                "--out",
                p(&attn_out),
                "--device",
                device,
            ]),
            s(&[
                "eval",
                "--checkpoint",
                p(&legacy),
                "--data-dir",
                p(&data),
                "--out",
                p(&eval_out),
                "--device",
                device,
            ]),
        ]
    };
    // Without the cuda feature (CI's build), --device cuda (or cuda:N) says how to get it.
    for args in ["cuda", "cuda:1"]
        .into_iter()
        .flat_map(commands)
        .filter(|_| !cfg!(feature = "cuda"))
    {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let e = fails(&args);
        assert_eq!(
            e,
            "error: this vit was built without CUDA; rebuild with \
             `cargo build --release --features cuda` (or `bash scripts/build-cuda.sh`)\n",
            "{args:?}"
        );
    }
    for args in commands("cuda:x") {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let e = fails(&args);
        assert!(
            e.contains("'cuda:x': a GPU is cuda or cuda:N"),
            "{args:?}: {e}"
        );
    }
    // train resolves its device through the same function, before touching any file.
    if !cfg!(feature = "cuda") {
        let run = tmp.path().join("run");
        let e = fails(&["train", "--device", "cuda", "--out", p(&run)]);
        assert!(
            e.contains("rebuild with `cargo build --release --features cuda`"),
            "{e}"
        );
        assert!(!run.exists());
    }
    for args in commands("tpu") {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let e = fails(&args);
        assert!(
            e.contains("unknown device 'tpu' (known: cpu, cuda, cuda:N)"),
            "{args:?}: {e}"
        );
    }
    assert!(!attn_out.exists() && !eval_out.exists());
    for args in commands("cpu") {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&args);
    }
    assert!(attn_out.is_dir());
    assert!(eval_out.join("confusion.png").exists());
}

#[test]
fn convert_and_eval_create_missing_output_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let timm = tmp.path().join("new/deeper/model.safetensors");
    ok(&["convert", p(&weights()), p(&timm), "--config", p(&config())]);
    assert!(timm.exists());
    let hf = tmp.path().join("hf/out/model.safetensors");
    ok(&["convert", p(&timm), p(&hf), "--to", "hf"]);
    assert!(hf.exists() && tmp.path().join("hf/out/config.json").exists());

    let data = tmp.path().join("data");
    write_idx_dataset(&data, 10, 20, false);
    let out = tmp.path().join("eval/a/b");
    let json = ok(&[
        "eval",
        "--checkpoint",
        p(&fixture("legacy_run/checkpoint-last.safetensors")),
        "--data-dir",
        p(&data),
        "--out",
        p(&out),
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["images"].as_u64().unwrap(), 20);
    assert!(out.join("confusion.png").exists());
}

/// A timm checkpoint folder (as on the Hub) is given as `--weights DIR`, with no preset: its
/// config.json names the model and its classes; an HF folder works the same. A folder without
/// a model says so.
#[test]
fn a_timm_folder_predicts_with_its_class_names() {
    let image = fixture("predict/image_rgb.png");
    let out = ok(&["predict", p(&image), "--weights", p(&fixture("timm_hub"))]);
    assert!(
        ["cat", "dog", "fish"].iter().any(|n| out.contains(n)),
        "{out}"
    );
    // transformers' layout, as a folder too.
    let hf = ok(&["predict", p(&image), "--weights", p(&fixture("hf_tiny"))]);
    assert!(hf.contains("1. "), "{hf}");
    let empty = tempfile::tempdir().unwrap();
    let e = fails(&["predict", p(&image), "--weights", p(empty.path())]);
    assert!(e.contains("the folder holds no model.safetensors"), "{e}");
}

/// The paper's `.npz` checkpoints: predicted from, and converted to timm's safetensors, with
/// no preset (the archive gives the model); damaged archives give one line each.
#[test]
fn jax_npz_checkpoints_predict_and_convert_without_a_preset() {
    let tmp = tempfile::tempdir().unwrap();
    let npz = fixture("jax_tiny/vit.npz");
    let image = fixture("predict/image_rgb.png");
    let direct = ok(&["predict", p(&image), "--weights", p(&npz), "--logits"]);
    assert!(direct.contains("1. "), "{direct}");
    let timm = tmp.path().join("vit.safetensors");
    ok(&["convert", p(&npz), p(&timm)]);
    let converted = ok(&["predict", p(&image), "--weights", p(&timm), "--logits"]);
    assert_eq!(direct.replace(p(&npz), ""), converted.replace(p(&timm), ""));

    // Cut short, not a zip at all, and a zip of something else.
    let bytes = std::fs::read(&npz).unwrap();
    let cut = tmp.path().join("cut.npz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let text = tmp.path().join("text.npz");
    std::fs::write(&text, "not an archive").unwrap();
    let other = tmp.path().join("other.npz");
    {
        let f = std::fs::File::create(&other).unwrap();
        let mut z = zip::ZipWriter::new(f);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("x.npy", opts).unwrap();
        std::io::Write::write_all(&mut z, b"\x93NUMPY\x01\x00").unwrap();
        z.finish().unwrap();
    }
    for (bad, why) in [
        (&cut, "not a readable .npz (zip) archive"),
        (&text, "not a readable .npz (zip) archive"),
        (&other, "array x: not a .npy array"),
    ] {
        let e = fails(&["predict", p(&image), "--weights", p(bad)]);
        assert!(e.starts_with("error: ") && e.contains(why), "{e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    }
}

/// `--dtype bf16`: on a CPU with AVX512_BF16 the same top class as f32 and logits within
/// bfloat16's rounding; held to AVX2 (or on a CPU without it), one clear line.
#[test]
fn bf16_inference_where_the_cpu_has_it_and_one_line_where_not() {
    let image = fixture("predict/image_rgb.png");
    let (w, c) = (weights(), config());
    let args = |dtype: &'static str| {
        let mut a = vec!["predict", p(&image), "--weights", p(&w), "--config", p(&c)];
        a.extend([
            "--format", "json", "--logits", "--top-k", "1", "--dtype", dtype,
        ]);
        a
    };
    let f32_out = json_lines(&ok(&args("f32")));
    #[cfg(target_arch = "x86_64")]
    let bf16_cpu = std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let bf16_cpu = false;
    if bf16_cpu {
        let bf16_out = json_lines(&ok(&args("bf16")));
        assert_eq!(
            bf16_out[0]["top_k"][0]["index"],
            f32_out[0]["top_k"][0]["index"]
        );
        let logits = |v: &serde_json::Value| -> Vec<f64> {
            v["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let (a, b) = (logits(&f32_out[0]), logits(&bf16_out[0]));
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(diff > 0.0, "bf16 changed nothing: was it used?");
        assert!(diff < 2e-2, "bf16 logits differ by {diff}");
    } else {
        let e = fails(&args("bf16"));
        assert!(e.contains("AVX512_BF16"), "{e}");
    }
    // Held to AVX2, as on a CPU without AVX-512: refused in one line, no panic.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vit"))
        .args(args("bf16"))
        .env("VIT_SIMD", "avx2")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.starts_with("error: --dtype bf16 needs AVX512_BF16"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    let out = common::vit(&["predict", p(&image), "--weights", p(&w), "--dtype", "fp8"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown dtype 'fp8'"));
}

#[test]
fn int8_checkpoints_predict_and_draw_attention_on_every_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let image = fixture("predict/image_rgb.png");
    let (w, c) = (weights(), config());
    let q = dir.path().join("int8.safetensors");
    let out = ok(&["quantize", p(&w), "--config", p(&c), p(&q)]);
    assert!(out.contains("linear layers int8"), "{out}");
    let logits = |weights: &Path, simd: Option<&str>| -> (Vec<f64>, u64) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vit"));
        cmd.args([
            "predict",
            p(&image),
            "--weights",
            p(weights),
            "--format",
            "json",
        ]);
        cmd.args(["--logits", "--top-k", "1"]);
        if weights == w.as_path() {
            cmd.args(["--config", p(&c)]);
        }
        if let Some(s) = simd {
            cmd.env("VIT_SIMD", s);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = &json_lines(&String::from_utf8(out.stdout).unwrap())[0];
        let l = v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap());
        (l.collect(), v["top_k"][0]["index"].as_u64().unwrap())
    };
    let (f, top) = logits(&w, None);
    // The VNNI kernel where the CPU has it, AVX2 (7-bit activations), portable code.
    for simd in [None, Some("avx2"), Some("baseline")] {
        let (g, t) = logits(&q, simd);
        assert_eq!(t, top, "{simd:?}");
        let dot: f64 = f.iter().zip(&g).map(|(a, b)| a * b).sum();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let cos = dot / (norm(&f) * norm(&g));
        assert!(cos > 0.999, "{simd:?}: cosine {cos}");
        assert_ne!(f, g, "{simd:?}: the int8 path ran");
    }
    let attn = dir.path().join("attn");
    ok(&[
        "attention",
        p(&image),
        "--weights",
        p(&q),
        "--out",
        p(&attn),
    ]);
    assert!(std::fs::read_dir(&attn).unwrap().count() > 0);
}
