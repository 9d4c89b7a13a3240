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
