//! `vit explore` end to end: the real binary serving the committed timm fixture, driven in
//! Debian's Chromium by Playwright (tests/browser/explore.mjs), the page's drawing checked
//! cell by cell against the numbers `vit attention` and `vit predict` give; and bad
//! input refused in one line.
//!
//! The browser test needs `node`, `tests/browser/node_modules` (`npm ci --prefix
//! tests/browser`) and Chromium (`/usr/bin/chromium` or `VIT_CHROMIUM`), which `.ci/run`
//! installs; without them it is skipped with a note, unless `VIT_REQUIRE_BROWSER=1`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{fails, fixture, ok, p};
use vit::viz::{self, HeadFusion};

/// The explorer process, stopped when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vit"))
            .arg("explore")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("vit runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line.trim().to_string();
        assert!(url.starts_with("http://127.0.0.1:"), "printed '{url}'");
        Server { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tiny() -> [String; 4] {
    [
        "--weights".into(),
        p(&fixture("timm_tiny/model.safetensors")).into(),
        "--config".into(),
        p(&fixture("timm_tiny/config.json")).into(),
    ]
}

/// The f32 values of a `.npy` file written by `vit attention --save-raw`.
fn npy(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let start = 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[start..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// What the browser needs to run, or why it cannot.
fn browser() -> Result<(PathBuf, PathBuf), String> {
    let node_ok = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node_ok {
        return Err("node is not installed".into());
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if !dir.join("node_modules/playwright-core").is_dir() {
        return Err("playwright-core is not installed (npm ci --prefix tests/browser)".into());
    }
    let chromium = std::env::var_os("VIT_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.is_file() {
        return Err(format!("{} is not installed", chromium.display()));
    }
    Ok((dir.join("explore.mjs"), chromium))
}

#[test]
fn the_explorer_works_in_a_real_browser() {
    let (script, chromium) = match browser() {
        Ok(b) => b,
        Err(why) if std::env::var("VIT_REQUIRE_BROWSER").as_deref() == Ok("1") => {
            panic!("the browser test cannot run: {why}")
        }
        Err(why) => {
            eprintln!("note: skipping the browser test: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let image = fixture("predict/image_rgb.png");
    let tiny = tiny();
    let tiny: Vec<&str> = tiny.iter().map(String::as_str).collect();

    // The numbers the page must show, from the other commands.
    let mut args = vec!["predict", p(&image), "--format", "json", "--top-k", "1"];
    args.extend(&tiny);
    let pred: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    let label = pred["top_k"][0]["label"].as_str().unwrap().to_string();
    let out = dir.path().join("attention");
    let mut args = vec!["attention", p(&image), "--method", "all", "--save-raw"];
    args.extend(["--out", p(&out)]);
    args.extend(&tiny);
    ok(&args);
    let (depth, heads, t, gh, gw) = (2, 4, 17, 4, 4);
    let cls_maps: Vec<Vec<f32>> = (0..depth)
        .map(|l| {
            let a = npy(&out.join(format!("attention_layer{l}.npy")));
            let mean = viz::fuse_heads(&a, heads, t, HeadFusion::Mean).unwrap();
            viz::cls_map(&mean, t, 1, gh, gw).unwrap()
        })
        .collect();
    let mut args = vec!["attention", p(&image), "--method", "rollout", "--save-raw"];
    args.extend(["--discard-ratio", "0.5", "--out", p(&out)]);
    args.extend(&tiny);
    ok(&args);
    let rollout = npy(&out.join("rollout.npy"));

    let bad = dir.path().join("notes.png");
    std::fs::write(&bad, "this is text, not a PNG").unwrap();
    let big = dir.path().join("big.png");
    let mut bytes = std::fs::read(&image).unwrap();
    bytes.resize(70 * 1024, 0);
    std::fs::write(&big, bytes).unwrap();

    let mut args = vec!["--port", "0", "--max-upload", "64K"];
    args.extend(&tiny);
    let server = Server::start(&args);
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("explore.png");
    let expected = serde_json::json!({
        "url": server.url,
        "image": image,
        "bad_file": bad,
        "big_file": big,
        "screenshot": screenshot,
        "chromium": chromium,
        "label": label,
        "grid_h": gh,
        "grid_w": gw,
        "depth": depth,
        "heads": heads,
        "cls_maps": cls_maps,
        "rollout": rollout,
    });
    let expected_path = dir.path().join("expected.json");
    std::fs::write(&expected_path, expected.to_string()).unwrap();
    let run = Command::new("node")
        .arg(&script)
        .arg(&expected_path)
        .output()
        .expect("node runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
    );
    assert!(run.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("explorer ok"), "{stdout}");
    assert!(screenshot.is_file());
    eprintln!("screenshot: {}", screenshot.display());
}

#[test]
fn bad_input_is_one_line() {
    let e = fails(&[
        "explore",
        "--weights",
        p(&fixture("cnn_simple/model.safetensors")),
        "--config",
        p(&fixture("cnn_simple/config.json")),
        "--port",
        "0",
    ]);
    assert!(e.contains("no global attention"), "{e}");
    let e = fails(&["explore", "--weights", "/nonexistent/model.safetensors"]);
    assert!(e.contains("/nonexistent/model.safetensors"), "{e}");
    let tiny = tiny();
    let mut args: Vec<&str> = vec!["explore", "--max-upload", "lots"];
    args.extend(tiny.iter().map(String::as_str));
    let out = common::vit(&args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a size"));

    // A port that is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let mut args: Vec<&str> = vec!["explore", "--port", &port];
    args.extend(tiny.iter().map(String::as_str));
    let e = fails(&args);
    assert!(e.contains("cannot listen on 127.0.0.1"), "{e}");
}
