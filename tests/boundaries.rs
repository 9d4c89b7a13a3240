//! The module boundaries ARCHITECTURE.md states, checked on the source: what each layer's
//! non-test code may not name. (The `unsafe` boundary is the compiler's: `deny(unsafe_code)`
//! at the crate root, allowed only in `ops::cpu` and `runtime`.)

use std::path::{Path, PathBuf};

/// (folder, names its code must not contain, the boundary in words).
const RULES: &[(&str, &[&str], &str)] = &[
    (
        "src/ops",
        &[
            "crate::models",
            "crate::weights",
            "crate::train",
            "crate::data",
            "crate::predict",
            "crate::explain",
            "crate::viz",
        ],
        "ops knows nothing of models, checkpoints, data or training",
    ),
    (
        "src/models",
        &[
            "crate::weights",
            "crate::train",
            "crate::data",
            "crate::predict",
            "crate::explain",
            "crate::viz",
            "crate::atomic",
            "crate::dist",
            "safetensors",
        ],
        "models know nothing of checkpoints, data, training or processes, and write no file",
    ),
    (
        "src/dist",
        &[
            "crate::models",
            "crate::train",
            "crate::data",
            "crate::weights",
            "crate::ops",
            "candle",
        ],
        "dist moves numbers and bytes between processes and knows nothing of models or training",
    ),
    (
        "src/weights",
        &[
            "crate::models::layers",
            "crate::train",
            "crate::data",
            ".build(",
            "VarBuilder",
        ],
        "weights never builds a network",
    ),
    (
        "src/onnx",
        &[
            "crate::train",
            "crate::data",
            "crate::explain",
            "crate::viz",
            "crate::predict",
        ],
        "onnx writes a model's graph and knows nothing of training, data or pictures",
    ),
    (
        "src/data",
        &[
            "crate::models",
            "crate::weights",
            "crate::train",
            "crate::ops",
        ],
        "data knows nothing of models",
    ),
    (
        "src/viz",
        &[
            "crate::models",
            "crate::weights",
            "crate::train",
            "crate::ops",
        ],
        "viz draws numbers and knows no model",
    ),
    (
        "src/explore",
        &[
            "forward",
            "crate::viz::rollout",
            "fuse_heads",
            "crate::train",
            "crate::data",
            "crate::weights",
        ],
        "explore computes no map and runs no model: it asks explain and serializes",
    ),
];

/// The Rust files of a module: its folder's, and its `<folder>.rs` beside the folder.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let file = dir.with_extension("rs");
    if file.is_file() {
        out.push(file);
    }
    if !dir.is_dir() {
        return;
    }
    walk(dir, out);
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("tests.rs") {
            out.push(path);
        }
    }
}

/// The code of a file up to its test module, comments left out.
fn code(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .enumerate()
        .take_while(|(_, l)| l.trim() != "#[cfg(test)]")
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect()
}

#[test]
fn each_layer_names_only_what_it_may() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut broken = Vec::new();
    for (dir, banned, why) in RULES {
        let mut files = Vec::new();
        rust_files(&root.join(dir), &mut files);
        assert!(!files.is_empty(), "{dir}: no source files");
        for f in files {
            for (n, line) in code(&f) {
                for b in *banned {
                    if line.contains(b) {
                        broken.push(format!("{}:{n}: `{b}` ({why})", f.display()));
                    }
                }
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}
