//! End-to-end tests of `vit patches`, `vit attention` and `vit pos-embed`: the real binary
//! on the committed timm fixtures — files written, picture sizes, pixels at known places,
//! `.npy` shapes — and one clear error line for bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{fails, fixture, load, p};

fn vit_in(dir: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vit"));
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd.args(args).output().expect("vit runs")
}

/// Runs a command that must succeed; returns (stdout, stderr).
fn ok_in(dir: Option<&Path>, args: &[&str]) -> (String, String) {
    let out = vit_in(dir, args);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "vit {args:?} failed: {err}");
    (String::from_utf8(out.stdout).unwrap(), err)
}

fn ok(args: &[&str]) -> (String, String) {
    ok_in(None, args)
}

/// The printed file list, checked to exist.
fn files(stdout: &str) -> Vec<PathBuf> {
    let files: Vec<PathBuf> = stdout.lines().map(PathBuf::from).collect();
    for f in &files {
        assert!(f.is_file(), "{} was printed but not written", f.display());
    }
    files
}

fn names(files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn png(path: &Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

/// The shape in a `.npy` header, and the number of f32 values after it.
fn npy_shape(path: &Path) -> (Vec<usize>, usize) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
    let total = 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let dict = std::str::from_utf8(&bytes[10..total]).unwrap();
    assert!(dict.contains("'descr': '<f4'"), "{dict}");
    let start = dict.find("'shape': (").unwrap() + 10;
    let inner = &dict[start..start + dict[start..].find(')').unwrap()];
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    (shape, (bytes.len() - total) / 4)
}

/// Whether the picture contains `color` anywhere.
fn contains(img: &image::RgbImage, color: [u8; 3]) -> bool {
    img.pixels().any(|px| px.0 == color)
}

const INFERNO_TOP: [u8; 3] = [0xfc, 0xff, 0xa4];
const VIRIDIS_TOP: [u8; 3] = [0xfd, 0xe7, 0x25];

struct Tiny {
    image: PathBuf,
    weights: PathBuf,
    config: PathBuf,
}

fn tiny() -> Tiny {
    Tiny {
        image: fixture("predict/image_rgb.png"),
        weights: fixture("timm_tiny/model.safetensors"),
        config: fixture("timm_tiny/config.json"),
    }
}

/// `vit attention` on the tiny model and image, with `extra` arguments.
fn attention_args<'a>(t: &'a Tiny, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "attention",
        p(&t.image),
        "--weights",
        p(&t.weights),
        "--config",
        p(&t.config),
        "--out",
        p(out),
    ];
    a.extend_from_slice(extra);
    a
}

#[test]
fn patches_draws_the_numbered_grid_and_the_token_sheet() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("new/patches");
    let t = tiny();
    let (stdout, _) = ok(&[
        "patches",
        p(&t.image),
        "--patch-size",
        "8",
        "--out",
        p(&out),
    ]);
    let f = files(&stdout);
    assert_eq!(names(&f), ["patch_grid.png", "patch_sheet.png"]);
    // 32×32 image, 4×4 patches of 8 px magnified ×4 to 128×128 under a caption line.
    let grid = png(&f[0]);
    assert_eq!(grid.dimensions(), (398, 183));
    let (x0, y0) = (135, 41); // where the magnified image starts
                              // The boundary between patch columns 0 and 1, in patch row 1 below its number box,
                              // is a white grid line; a pixel beside it is the image's own pixel (10, 15).
    assert_eq!(grid.get_pixel(x0 + 32, y0 + 60).0, [255, 255, 255]);
    let src = png(&t.image);
    assert_eq!(grid.get_pixel(x0 + 40, y0 + 60), src.get_pixel(10, 15));
    // 16 patches in one row of the sheet.
    assert_eq!(png(&f[1]).dimensions(), (690, 103));

    // --img-size resizes to a square first (48 = 6×6 patches); an image that 16 px patches
    // do not tile is center-cropped, with a note.
    let (stdout, _) = ok(&[
        "patches",
        p(&t.image),
        "--patch-size",
        "8",
        "--img-size",
        "48",
        "--out",
        p(&out),
    ]);
    assert_eq!(png(&files(&stdout)[0]).height(), 41 + 48 * 4 + 14);
    let (stdout, stderr) = ok(&[
        "patches",
        p(&fixture("predict/image_40x48.png")),
        "--patch-size",
        "16",
        "--out",
        p(&out),
    ]);
    assert!(stderr.contains("center-cropped to 48×32"), "{stderr}");
    assert_eq!(files(&stdout).len(), 2);
}

#[test]
fn attention_cls_draws_maps_overlays_and_the_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("att");
    let t = tiny();
    let (stdout, stderr) = ok(&attention_args(&t, &out, &[]));
    assert!(stderr.is_empty(), "{stderr}");
    let f = files(&stdout);
    assert_eq!(
        names(&f),
        ["attention_maps_layer1.png", "attention_matrix_layer1.png"]
    );
    // Two rows of 6 panels (input, 4 heads, mean) of 192 px; every map's strongest patch
    // has the colormap's top colour (inferno by default).
    let maps = png(&f[0]);
    assert_eq!(maps.dimensions(), (1284, 487));
    assert!(contains(&maps, INFERNO_TOP));
    // The 17×17 token matrix.
    assert_eq!(png(&f[1]).dimensions(), (558, 510));

    // One head of layer 0, viridis.
    let (stdout, _) = ok(&attention_args(
        &t,
        &out,
        &["--layer", "0", "--head", "2", "--colormap", "viridis"],
    ));
    let f = files(&stdout);
    assert_eq!(
        names(&f),
        [
            "attention_maps_layer0.png",
            "attention_matrix_layer0_head2.png"
        ]
    );
    let maps = png(&f[0]);
    assert_eq!(maps.dimensions(), (678, 487));
    assert!(contains(&maps, VIRIDIS_TOP) && !contains(&maps, INFERNO_TOP));
    assert_eq!(png(&f[1]).dimensions(), (536, 510));
}

#[test]
fn attention_rollout_and_all_with_raw_arrays() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("att");
    let t = tiny();
    let (stdout, _) = ok(&attention_args(
        &t,
        &out,
        &[
            "--method",
            "rollout",
            "--head-fusion",
            "max",
            "--discard-ratio",
            "0.9",
            "--save-raw",
        ],
    ));
    let f = files(&stdout);
    assert_eq!(
        names(&f),
        [
            "rollout.png",
            "rollout.npy",
            "attention_layer0.npy",
            "attention_layer1.npy"
        ]
    );
    let roll = png(&f[0]);
    assert_eq!(roll.dimensions(), (678, 273));
    assert!(contains(&roll, INFERNO_TOP));
    assert_eq!(npy_shape(&f[1]), (vec![4, 4], 16));
    assert_eq!(npy_shape(&f[2]), (vec![4, 17, 17], 4 * 17 * 17));
    assert_eq!(npy_shape(&f[3]), (vec![4, 17, 17], 4 * 17 * 17));
    // Each saved query row is a probability distribution over the keys.
    let bytes = std::fs::read(&f[3]).unwrap();
    let data: Vec<f32> = bytes[bytes.len() - 4 * 4 * 17 * 17..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    for row in data.chunks_exact(17) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }

    let (stdout, _) = ok(&attention_args(&t, &out, &["--method", "all"]));
    let f = files(&stdout);
    assert_eq!(names(&f), ["attention_all_layers.png"]);
    let all = png(&f[0]);
    assert_eq!(all.dimensions(), (467, 233));
    assert!(contains(&all, INFERNO_TOP));
}

#[test]
fn attention_without_class_token_says_it_uses_the_mean_query_map() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, stderr) = ok(&[
        "attention",
        p(&fixture("predict/image_rgb.png")),
        "--weights",
        p(&fixture("timm_meanpool/model.safetensors")),
        "--config",
        p(&fixture("timm_meanpool/config.json")),
        "--out",
        p(dir.path()),
    ]);
    assert!(
        stderr.contains("note: the model has no class token"),
        "{stderr}"
    );
    assert!(stderr.contains("converted to grayscale"), "{stderr}");
    assert_eq!(files(&stdout).len(), 2);
}

#[test]
fn attention_default_output_folder() {
    let dir = tempfile::tempdir().unwrap();
    let t = tiny();
    let (stdout, _) = ok_in(
        Some(dir.path()),
        &[
            "attention",
            p(&t.image),
            "--weights",
            p(&t.weights),
            "--config",
            p(&t.config),
            "--method",
            "rollout",
        ],
    );
    assert_eq!(stdout.trim(), "vit-attention/rollout.png");
    assert!(dir.path().join("vit-attention/rollout.png").is_file());
}

#[test]
fn pos_embed_draws_similarity_grid_matrix_and_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let t = tiny();
    let (stdout, _) = ok(&[
        "pos-embed",
        "--weights",
        p(&t.weights),
        "--config",
        p(&t.config),
        "--out",
        p(dir.path()),
        "--save-raw",
    ]);
    let f = files(&stdout);
    assert_eq!(
        names(&f),
        [
            "pos_embed_similarity.png",
            "pos_embed_matrix.png",
            "pos_embed_adjacent.png",
            "pos_embed_similarity.npy"
        ]
    );
    let grid = png(&f[0]);
    assert_eq!(grid.dimensions(), (386, 309));
    // Every position is most similar to itself: cosine 1 is viridis' top colour.
    assert!(contains(&grid, VIRIDIS_TOP));
    assert_eq!(png(&f[1]).dimensions(), (516, 486));
    assert_eq!(png(&f[2]).dimensions(), (800, 480));
    assert_eq!(npy_shape(&f[3]), (vec![16, 16], 256));
}

#[test]
fn bad_inputs_give_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let t = tiny();

    let e = fails(&attention_args(&t, &out, &["--layer", "99"]));
    assert!(
        e.contains("layer 99 does not exist") && e.contains("0..=1"),
        "{e}"
    );
    let e = fails(&attention_args(&t, &out, &["--head", "99"]));
    assert!(
        e.contains("head 99 does not exist") && e.contains("0..=3"),
        "{e}"
    );
    let e = fails(&attention_args(&t, &out, &["--discard-ratio", "1.5"]));
    assert!(
        e.contains("discard ratio must lie in [0, 1), got 1.5"),
        "{e}"
    );
    let e = fails(&attention_args(&t, &out, &["--alpha", "2"]));
    assert!(e.contains("alpha"), "{e}");
    // A value clap rejects: its usual usage error, first line ours.
    let bad = vit_in(None, &attention_args(&t, &out, &["--colormap", "jet"]));
    assert_eq!(bad.status.code(), Some(2));
    let e = String::from_utf8(bad.stderr).unwrap();
    assert!(
        e.lines().next().unwrap().contains("unknown colormap 'jet'"),
        "{e}"
    );
    assert!(!out.exists(), "nothing is written for refused options");

    let missing = dir.path().join("no_such.png");
    let mut args = attention_args(&t, &out, &[]);
    args[1] = p(&missing);
    let e = fails(&args);
    assert!(
        e.contains("no_such.png") && e.contains("No such file"),
        "{e}"
    );
    let e = fails(&["patches", p(&missing), "--patch-size", "8"]);
    assert!(e.contains("no_such.png"), "{e}");
    let e = fails(&["patches", p(&t.image), "--patch-size", "64"]);
    assert!(e.contains("smaller than one 64×64 patch"), "{e}");
    let e = fails(&[
        "patches",
        p(&t.image),
        "--patch-size",
        "8",
        "--img-size",
        "30",
    ]);
    assert!(
        e.contains("not a positive multiple of the patch size 8"),
        "{e}"
    );

    // Weights that do not fit the config.
    let mut args = attention_args(&t, &out, &[]);
    let meanpool = fixture("timm_meanpool/config.json");
    args[5] = p(&meanpool);
    let e = fails(&args);
    assert!(
        e.contains("model.safetensors") && e.contains("the config asks for 5"),
        "{e}"
    );
    let mut args = attention_args(&t, &out, &[]);
    args[4] = "--preset";
    args[5] = "vit_cifar_tiny";
    let e = fails(&args);
    assert!(e.contains("expected") && e.contains("found"), "{e}");

    // pos-embed with pos_embed = "none": the tiny weights (which have one) do not fit, and
    // weights without one give the model nothing to draw.
    let cfg_text = std::fs::read_to_string(&t.config)
        .unwrap()
        .replace("\"learned\"", "\"none\"");
    let none_cfg = dir.path().join("none.json");
    std::fs::write(&none_cfg, cfg_text).unwrap();
    let e = fails(&[
        "pos-embed",
        "--weights",
        p(&t.weights),
        "--config",
        p(&none_cfg),
    ]);
    assert!(e.contains("unexpected tensors: pos_embed"), "{e}");
    let mut tensors = load("timm_tiny/model.safetensors");
    tensors.remove("pos_embed");
    let stripped = dir.path().join("no_pos.safetensors");
    candle_core::safetensors::save(&tensors, &stripped).unwrap();
    let e = fails(&[
        "pos-embed",
        "--weights",
        p(&stripped),
        "--config",
        p(&none_cfg),
        "--out",
        p(&out),
    ]);
    assert!(e.contains("the model has no position embedding"), "{e}");
}
