//! `--hf REPO`: checkpoints fetched from a Hugging Face Hub, here a small server on 127.0.0.1
//! that answers as the Hub does (a `resolve` URL; LFS files redirected to a CDN URL with the
//! Hub's `x-linked-etag` (their SHA-256) and `x-repo-commit`; byte ranges) with tiny repos
//! in timm's and transformers' layouts, a gated repo, and one whose weights arrive cut short.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use common::{fixture, p};
use sha2::{Digest, Sha256};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A repo's files by name.
type Repo = HashMap<String, Vec<u8>>;

fn repo(dir: &str, files: &[&str]) -> Repo {
    files
        .iter()
        .map(|f| {
            (
                f.to_string(),
                std::fs::read(fixture(&format!("{dir}/{f}"))).unwrap(),
            )
        })
        .collect()
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Starts the server; returns its base URL.
fn hub(repos: HashMap<String, Repo>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let repos = Arc::new(repos);
    let base2 = base.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (repos, base) = (repos.clone(), base2.clone());
            std::thread::spawn(move || serve(stream, &repos, &base));
        }
    });
    base
}

fn serve(mut stream: TcpStream, repos: &HashMap<String, Repo>, base: &str) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
            let (a, b) = v.trim().split_once('-').unwrap();
            range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().ok()));
        }
    }
    let send = |stream: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in headers {
            head += &format!("{k}: {v}\r\n");
        }
        head += &format!("Content-Length: {}\r\n\r\n", body.len());
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body);
    };
    // /{owner}/{name}/resolve/{rev}/{file} or /cdn/{owner}/{name}/{file}
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (cdn, repo_id, file) = match parts[..] {
        ["cdn", o, n, f] => (true, format!("{o}/{n}"), f.to_string()),
        [o, n, "resolve", _, f] => (false, format!("{o}/{n}"), f.to_string()),
        _ => return send(&mut stream, "404 Not Found", &[], b""),
    };
    if repo_id == "acme/gated" {
        return send(&mut stream, "401 Unauthorized", &[], b"gated");
    }
    let Some(body) = repos.get(&repo_id).and_then(|r| r.get(&file)) else {
        return send(
            &mut stream,
            "404 Not Found",
            &[("X-Error-Code".into(), "EntryNotFound".into())],
            b"",
        );
    };
    let lfs = file.ends_with(".safetensors");
    if lfs && !cdn {
        let etag = if repo_id == "acme/cut" {
            // The Hub's hash is of the whole file; the CDN below sends half of it.
            sha256(&repos["acme/cut-whole"][&file])
        } else {
            sha256(body)
        };
        let headers = [
            (
                "Location".to_string(),
                format!("{base}/cdn/{repo_id}/{file}"),
            ),
            ("X-Repo-Commit".to_string(), COMMIT.to_string()),
            ("X-Linked-Etag".to_string(), format!("\"{etag}\"")),
            ("X-Linked-Size".to_string(), body.len().to_string()),
        ];
        return send(&mut stream, "302 Found", &headers, b"");
    }
    let size = body.len();
    let (a, b) = match range {
        Some((a, b)) => (a.min(size), b.map_or(size, |b| (b + 1).min(size))),
        None => (0, size),
    };
    let mut headers = vec![
        (
            "Content-Range".to_string(),
            format!("bytes {a}-{}/{size}", b.max(1) - 1),
        ),
        ("X-Repo-Commit".to_string(), COMMIT.to_string()),
    ];
    if !lfs {
        let git = format!("{:040x}", body.len()); // any 40-hex git hash
        headers.push(("ETag".to_string(), format!("\"{git}\"")));
    }
    let status = if range.is_some() {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    send(&mut stream, status, &headers, &body[a..b]);
}

/// `vit ARGS` with the Hub at `endpoint` and the cache in `home`.
fn vit_hub(endpoint: &str, home: &Path, offline: bool, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vit"));
    c.args(args)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", home)
        .env_remove("HF_TOKEN");
    if offline {
        c.env("HF_HUB_OFFLINE", "1");
    }
    c.output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn checkpoints_come_from_the_hub_in_both_layouts_and_failures_say_why() {
    let timm = repo("timm_hub", &["model.safetensors", "config.json"]);
    let hf = repo(
        "hf_tiny",
        &[
            "model.safetensors",
            "config.json",
            "preprocessor_config.json",
        ],
    );
    let mut cut = timm.clone();
    let whole = cut["model.safetensors"].clone();
    cut.insert(
        "model.safetensors".into(),
        whole[..whole.len() / 2].to_vec(),
    );
    let repos: HashMap<String, Repo> = [
        ("timm/tiny-vit".to_string(), timm.clone()),
        ("google/tiny-vit".to_string(), hf),
        ("acme/cut".to_string(), cut),
        ("acme/cut-whole".to_string(), timm),
    ]
    .into_iter()
    .collect();
    let endpoint = hub(repos);
    let home = tempfile::tempdir().unwrap();
    let image = fixture("predict/image_rgb.png");
    let img = p(&image);

    // timm's layout: the model, its preprocessing and class names from config.json.
    let o = vit_hub(
        &endpoint,
        home.path(),
        false,
        &["predict", img, "--hf", "timm/tiny-vit"],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        ["cat", "dog", "fish"].iter().any(|n| out.contains(n)),
        "{out}"
    );
    // In the standard cache layout, verified and named by its SHA-256.
    let blobs = home.path().join("hub/models--timm--tiny-vit/blobs");
    let want = sha256(&std::fs::read(fixture("timm_hub/model.safetensors")).unwrap());
    assert!(blobs.join(&want).exists());
    // Offline, from the cache (the endpoint unreachable), the same answer.
    let o = vit_hub(
        "http://127.0.0.1:9",
        home.path(),
        true,
        &["predict", img, "--hf", "timm/tiny-vit"],
    );
    assert_eq!(text(&o).0, out, "{}", text(&o).1);

    // transformers' layout, with a revision; eval and export take --hf too.
    let o = vit_hub(
        &endpoint,
        home.path(),
        false,
        &["predict", img, "--hf", "google/tiny-vit@main"],
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let onnx = home.path().join("m.onnx");
    let o = vit_hub(
        &endpoint,
        home.path(),
        false,
        &["export", "--hf", "google/tiny-vit", "--onnx", p(&onnx)],
    );
    assert!(o.status.success() && onnx.exists(), "{}", text(&o).1);

    // convert --hf: the one path is the file to write, in timm's naming with the config.
    let local = home.path().join("local/model.safetensors");
    let o = vit_hub(
        &endpoint,
        home.path(),
        false,
        &["convert", "--hf", "timm/tiny-vit", p(&local)],
    );
    assert!(o.status.success() && local.exists(), "{}", text(&o).1);
    let o = vit_hub(
        &endpoint,
        home.path(),
        false,
        &["predict", img, "--weights", p(&local)],
    );
    assert_eq!(
        text(&o).0.replace(p(&local), ""),
        out.replace("timm/tiny-vit", "")
    );

    // Fine-tuning from the Hub: `train --hf` as `--init` with a file (a 2-class folder).
    let data = home.path().join("imgs");
    for split in ["train", "test"] {
        for c in 0..2u8 {
            let d = data.join(split).join(format!("c{c}"));
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..4u8 {
                let px = image::Rgb([60 * c + i, 100, 200 - 60 * c]);
                image::RgbImage::from_pixel(32, 32, px)
                    .save(d.join(format!("{i}.png")))
                    .unwrap();
            }
        }
    }
    let run = home.path().join("ft");
    let dataset = format!("folder:{}", data.display());
    let o = vit_hub(
        &endpoint,
        home.path(),
        false,
        &[
            "train",
            "--hf",
            "timm/tiny-vit",
            "--dataset",
            &dataset,
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--val-size",
            "2",
            "--out",
            p(&run),
            "--quiet",
        ],
    );
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("head dropped: the checkpoint has 3 classes"),
        "{err}"
    );

    // Failures: one line each, no panic.
    for (repo, offline, why) in [
        ("acme/missing", false, "no model.safetensors there (404"),
        ("acme/gated", false, "access refused (401)"),
        ("acme/cut", false, "arrived damaged or cut short"),
        ("acme/never-fetched", true, "not in the Hugging Face cache"),
        (
            "not a repo",
            false,
            "expected a Hub repo as owner/name[@revision]",
        ),
    ] {
        let o = vit_hub(
            &endpoint,
            home.path(),
            offline,
            &["predict", img, "--hf", repo],
        );
        let (_, err) = text(&o);
        assert!(!o.status.success(), "{repo}");
        assert!(
            err.starts_with("error: ") && err.contains(why),
            "{repo}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // The cut file did not stay in the cache as a checkpoint.
    let cut_blobs = home.path().join("hub/models--acme--cut/blobs");
    assert!(!cut_blobs.join(&want).exists());
}
