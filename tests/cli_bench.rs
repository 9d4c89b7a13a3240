//! End-to-end tests of `vit bench`: the JSON report of one real training step, and bad
//! input. No timing is asserted, only that the numbers are there and consistent.

mod common;

use common::{fails, ok};
use serde_json::Value;

fn positive(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x > 0.0 && x.is_finite(), "{what} = {x}");
    x
}

#[test]
fn bench_train_fm_prints_one_json_object_with_every_field() {
    let out = ok(&[
        "bench",
        "--workload",
        "train-fm",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--profile",
        "--format",
        "json",
    ]);
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["workload"], "train-fm");
    assert_eq!(v["batch"], 128);
    assert_eq!(v["params"], 5_353_738);
    assert_eq!(
        (v["iters"].as_u64(), v["warmup"].as_u64()),
        (Some(1), Some(0))
    );
    assert!(
        v["description"].as_str().unwrap().contains("MLP 768"),
        "{v}"
    );

    for key in ["images_per_second", "step_ms"] {
        let s = &v[key];
        let (median, min, max) = (
            positive(&s["median"], key),
            positive(&s["min"], key),
            positive(&s["max"], key),
        );
        assert!(min <= median && median <= max, "{key}: {s}");
    }
    let step_ms = v["step_ms"]["median"].as_f64().unwrap();
    let ips = v["images_per_second"]["median"].as_f64().unwrap();
    assert!((ips * step_ms / 1e3 - 128.0).abs() < 1e-6, "{v}");
    assert_eq!(v["iteration_ms"].as_array().unwrap().len(), 1);

    if cfg!(target_os = "linux") {
        positive(&v["peak_rss_bytes"], "peak_rss_bytes");
    }
    assert!(v["threads"].as_u64().unwrap() >= 1);
    let provider = v["provider"].as_str().unwrap();
    assert!(
        provider.starts_with("gemm (pure Rust")
            || provider.starts_with("vit AVX-512 sgemm")
            || provider.starts_with("vit AVX2 sgemm")
            || provider.contains("(system BLAS;"),
        "{v}"
    );
    let kernels = v["kernels"].as_str().unwrap();
    assert!(["AVX-512", "AVX2", "baseline"].contains(&kernels), "{v}");

    let phases = v["phases"].as_array().unwrap();
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["forward + loss", "backward", "optimizer (clip + AdamW)"]
    );
    let sum: f64 = phases
        .iter()
        .map(|p| positive(&p["median_ms"], "phase"))
        .sum();
    assert!(
        sum <= step_ms * 1.001,
        "phases {sum} ms > step {step_ms} ms"
    );
}

#[test]
fn bench_bad_input_gives_one_clear_line() {
    let e = fails(&["bench", "--workload", "train"]);
    assert!(
        e.contains("unknown workload 'train'") && e.contains("train-fm, infer-b16"),
        "{e}"
    );
    let e = fails(&["bench", "--workload", "infer-b16", "--iters", "0"]);
    assert!(e.contains("at least 1") && e.contains("--iters"), "{e}");
}

#[test]
fn compare_measures_presets_at_several_sizes_and_draws_the_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let args = |format: &'static str| {
        let out = dir.path().to_str().unwrap().to_string();
        vec![
            "compare".to_string(),
            "--presets".into(),
            "vit_fmnist,swin_fmnist".into(),
            "--sizes".into(),
            "28,56".into(),
            "--batch".into(),
            "2".into(),
            "--iters".into(),
            "1".into(),
            "--warmup".into(),
            "0".into(),
            "--format".into(),
            format.into(),
            "--out".into(),
            out,
        ]
    };
    let run = |format| {
        let a = args(format);
        common::ok(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let rows: Vec<Value> = serde_json::from_str(&run("json")).unwrap();
    let at = |name: &str, size: u64| {
        rows.iter()
            .find(|r| r["name"] == name && r["image_size"][0] == size)
            .unwrap_or_else(|| panic!("{name} at {size}"))
    };
    assert_eq!(rows.len(), 4);
    let growth = |name: &str| {
        let (small, big) = (at(name, 28), at(name, 56));
        positive(&big["latency_ms"]["median"], "latency");
        positive(&big["gflops"], "gflops") / positive(&small["gflops"], "gflops")
    };
    // Four times the pixels: more than four times the FLOPs for the ViT (its attention is
    // quadratic in tokens); a little less for the Swin, whose last stage at 28 px rounds a
    // 3.5x3.5 map up to 4x4.
    let (v, s) = (growth("vit_fmnist"), growth("swin_fmnist"));
    assert!(v > 4.0 && (3.0..4.0).contains(&s), "{v} {s}");
    assert!(dir.path().join("scaling.png").exists());
    let text = run("text");
    assert!(text.contains("56x56") && text.contains("wrote "), "{text}");
    let e = common::fails(&["compare", "--presets", "vit_fmnist", "--sizes", "30"]);
    assert!(
        e.contains("vit_fmnist at 30x30") && e.contains("not divisible"),
        "{e}"
    );
}
