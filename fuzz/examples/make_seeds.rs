//! Writes the seed inputs of the fuzz targets into `fuzz/seeds/<target>/`: a few small
//! valid files per target, made by the crate's own writers where it has them.
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example make_seeds
//!
//! Safetensors seeds differ from run to run only in the order of their metadata keys.

use std::collections::HashMap;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use vit::train::Recipe;
use vit::weights::{save, to_hf_names, SaveMeta};
use vit::{Architecture, ModelConfig, ViTConfig};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repo = root.parent().ok_or("no repository above fuzz/")?;
    let seeds = root.join("seeds");
    safetensors(&seeds.join("safetensors"))?;
    idx(&seeds.join("idx"))?;
    cifar(&seeds.join("cifar"))?;
    images(&seeds.join("image"), repo)?;
    recipes(&seeds.join("recipe"), repo)?;
    model_configs(&seeds.join("model_config"), repo)?;
    regressions(&seeds)?;
    check(&seeds)
}

/// The smallest inputs of the bugs found while writing these targets (see the regression
/// tests beside the fixes), named `regress-*`: each must now be an error, not a panic or a
/// large allocation, and they start the fuzzers near those paths.
fn regressions(seeds: &Path) -> Result<()> {
    // An end offset near u64::MAX overflowed the layout sum.
    let header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 4]);
    let st = seeds.join("safetensors");
    write(&st, "regress-offset-overflow.safetensors", &bytes)?;
    // A 65,536-token config with only a 2-position embedding of width 512: resampled
    // (128 MiB) before the missing tensors were noticed.
    let big = ModelConfig::Vit(ViTConfig {
        in_channels: 1,
        num_classes: 0,
        mlp_ratio: 1.0,
        ..ViTConfig::timm(4096, 16, 512, 1, 1)
    });
    write(
        &st,
        "regress-resample-first.safetensors",
        &raw_safetensors(&big, &[1, 2, 512])?,
    )?;
    // A position embedding without patch positions: its patch count underflowed.
    write(
        &st,
        "regress-empty-pos.safetensors",
        &raw_safetensors(&tiny(4), &[1, 0, 4])?,
    )?;
    // A 100-byte archive whose member claims 400 MB, reserved in full.
    let mut header = tar::Header::new_gnu();
    header.set_path("cifar-10-batches-bin/test_batch.bin")?;
    header.set_size(400_000_000);
    header.set_cksum();
    let mut tar = header.as_bytes().to_vec();
    tar.extend_from_slice(&[0; 512]);
    let gz = gzip(&tar, flate2::Compression::none())?;
    write(
        &seeds.join("cifar"),
        "regress-member-claim.tar.gz",
        &selected(6, &gz),
    )?;
    // Every size within its bound, the FLOP count overflowed a u64.
    let flops = "image_size = [4096, 4096]\npatch_size = 16\nnum_classes = 10\n\
                 embed_dim = 65536\ndepth = 1024\nnum_heads = 1\nmlp_ratio = 64.0\n";
    write(
        &seeds.join("model_config"),
        "regress-flops-overflow.toml",
        flops.as_bytes(),
    )
}

/// A safetensors file holding our config and one zero F16 `pos_embed` of `shape`.
fn raw_safetensors(cfg: &ModelConfig, shape: &[usize]) -> Result<Vec<u8>> {
    let n: usize = shape.iter().product::<usize>() * 2;
    let config = serde_json::to_string(&serde_json::to_string(cfg)?)?;
    let header = format!(
        r#"{{"pos_embed":{{"dtype":"F16","shape":{shape:?},"data_offsets":[0,{n}]}},"__metadata__":{{"vit.config":{config}}}}}"#
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + n, 0);
    Ok(bytes)
}

/// Every seed is accepted by the reader its target fuzzes (so the fuzzers start deep).
fn check(seeds: &Path) -> Result<()> {
    use vit::data::{cifar, idx, Split};
    use vit::weights::{Arch, Checkpoint, PosResample};
    let at = |target: &str, name: &str| -> Result<(PathBuf, Vec<u8>)> {
        let path = seeds.join(target).join(name);
        let bytes = std::fs::read(&path)?;
        Ok((path, bytes))
    };
    for name in ["timm", "resample", "hf", "bf16"] {
        let (path, bytes) = at("safetensors", &format!("{name}.safetensors"))?;
        let ck = Checkpoint::from_bytes(&bytes, &path)?;
        let cfg = ck.resolve_config(&Arch::FromCheckpoint, None)?;
        ck.fit(&cfg, PosResample::Timm, None)?;
    }
    let (path, bytes) = at("safetensors", "metadata_only.safetensors")?;
    Checkpoint::from_bytes(&bytes, &path)?.resolve_config(&Arch::FromCheckpoint, None)?;
    for (name, ndims) in [
        ("images", 3),
        ("labels", 1),
        ("images.gz", 3),
        ("labels.gz", 1),
    ] {
        let (path, bytes) = at("idx", name)?;
        idx::read_idx_from(&bytes[1..], bytes.len() as u64 - 1, &path, ndims)?;
    }
    let (path, bytes) = at("idx", "images.stored.gz")?;
    idx::read_idx_from(&bytes[1..], bytes.len() as u64 - 1, &path, 3)?;
    let (path, bytes) = at("cifar", "cifar10.bin")?;
    cifar::parse_records(&bytes[1..], &path, cifar::CifarKind::Cifar10)?;
    let (path, bytes) = at("cifar", "cifar100.bin")?;
    cifar::parse_records(&bytes[1..], &path, cifar::CifarKind::Cifar100)?;
    for (name, kind) in [
        ("cifar10-test.tar.gz", cifar::CifarKind::Cifar10),
        ("cifar100-test.tar.gz", cifar::CifarKind::Cifar100),
    ] {
        let (path, bytes) = at("cifar", name)?;
        let file = &bytes[1..];
        cifar::read_cifar_archive(file, file.len() as u64, &path, kind, Split::Test)?;
    }
    let valid = |target: &str| -> Result<Vec<PathBuf>> {
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(seeds.join(target))? {
            let path = entry?.path();
            if !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("regress-"))
            {
                paths.push(path);
            }
        }
        Ok(paths)
    };
    for path in valid("image")? {
        vit::files::decode_image_bytes(&std::fs::read(&path)?, &path)?;
    }
    for path in valid("recipe")? {
        Recipe::from_toml(&std::fs::read_to_string(&path)?, &path)?.validate()?;
    }
    for path in valid("model_config")? {
        ModelConfig::from_text(&std::fs::read_to_string(&path)?, &path)?;
    }
    println!("every seed is read without error");

    let refused = |r: std::result::Result<(), vit::Error>, name: &str| -> Result<()> {
        match r {
            Err(e) => Ok(println!("{name}: refused: {e}")),
            Ok(()) => Err(format!("{name} was accepted").into()),
        }
    };
    for name in [
        "regress-offset-overflow.safetensors",
        "regress-resample-first.safetensors",
        "regress-empty-pos.safetensors",
    ] {
        let (path, bytes) = at("safetensors", name)?;
        let r = Checkpoint::from_bytes(&bytes, &path).and_then(|ck| {
            let cfg = ck.resolve_config(&Arch::FromCheckpoint, None)?;
            ck.fit(&cfg, PosResample::Timm, None).map(|_| ())
        });
        refused(r, name)?;
    }
    let (path, bytes) = at("cifar", "regress-member-claim.tar.gz")?;
    let file = &bytes[1..];
    let r = cifar::read_cifar_archive(
        file,
        file.len() as u64,
        &path,
        cifar::CifarKind::Cifar10,
        Split::Test,
    );
    refused(r.map(|_| ()), "regress-member-claim.tar.gz")?;
    // Decoder panics (zune-jpeg 0.5.15): contained, an error where they happen (a CPU
    // without AVX2 may decode the IDCT ones). The hook keeps the caught panics quiet.
    vit::files::quiet_decoder_panics();
    for name in [
        "regress-jpeg-idct-unwrap-704.jpg",
        "regress-jpeg-idct-unwrap.jpg",
        "regress-jpeg-dc-overflow.jpg",
    ] {
        let (path, bytes) = at("image", name)?;
        let r = vit::files::decode_image_bytes(&bytes, &path);
        println!(
            "{name}: {}",
            r.map_or_else(|e| e.to_string(), |_| "decoded".into())
        );
    }
    let (path, bytes) = at("model_config", "regress-flops-overflow.toml")?;
    let r = ModelConfig::from_text(std::str::from_utf8(&bytes)?, &path);
    refused(r.map(|_| ()), "regress-flops-overflow.toml")?;
    Ok(())
}

fn dir(path: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(path)?;
    Ok(path.to_path_buf())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    std::fs::write(dir.join(name), bytes)?;
    println!("{:>6} {}", bytes.len(), dir.join(name).display());
    Ok(())
}

/// The smallest ViT worth the name: 1 channel, 4×4 pixels in 2×2 patches, width 4.
fn tiny(image: usize) -> ModelConfig {
    ModelConfig::Vit(ViTConfig {
        in_channels: 1,
        num_classes: 2,
        mlp_ratio: 1.0,
        ..ViTConfig::timm(image, 2, 4, 1, 1)
    })
}

fn safetensors(out: &Path) -> Result<()> {
    let out = dir(out)?;
    let tmp = std::env::temp_dir().join(format!("vit-make-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let cfg = tiny(4);
    let params: HashMap<String, Tensor> = cfg.init_params(0, &Device::Cpu)?.into_iter().collect();
    let pre = cfg.default_preprocess();
    let names = vec!["zero".to_string(), "one".to_string()];
    let state = HashMap::from([("step".to_string(), Tensor::new(&[7i64], &Device::Cpu)?)]);
    let save_as = |name: &str,
                   tensors: &HashMap<String, Tensor>,
                   state: &HashMap<String, Tensor>,
                   meta: &SaveMeta|
     -> Result<()> {
        let path = tmp.join(name);
        save(&path, tensors, state, meta)?;
        write(&out, name, &std::fs::read(&path)?)
    };
    let ours = SaveMeta {
        config: Some(&cfg),
        preprocess: Some(&pre),
        class_names: Some(&names),
        extra: vec![],
    };
    // Ours, fitting its config exactly, with training state.
    save_as("timm.safetensors", &params, &state, &ours)?;
    // Its config asks for 8×8 pixels: the position embedding is resampled to the grid.
    let bigger = tiny(8);
    let resample = SaveMeta {
        config: Some(&bigger),
        ..ours.clone()
    };
    save_as("resample.safetensors", &params, &HashMap::new(), &resample)?;
    // HF names (fused qkv split), our config in the metadata.
    let hf = to_hf_names(&params)?;
    save_as("hf.safetensors", &hf, &HashMap::new(), &ours)?;
    // Half-precision weights and an integer tensor that is neither weight nor state.
    let mut half: HashMap<String, Tensor> = params
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_dtype(DType::BF16)?)))
        .collect::<Result<_>>()?;
    half.insert("counts".into(), Tensor::new(&[1u8, 2, 3], &Device::Cpu)?);
    save_as("bf16.safetensors", &half, &HashMap::new(), &ours)?;
    std::fs::remove_dir_all(&tmp)?;
    // No tensors, only our metadata: the smallest file the header checks accept.
    let config = serde_json::to_string(&serde_json::to_string(&cfg)?)?;
    let header = format!(r#"{{"__metadata__":{{"vit.config":{config}}}}}"#);
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    write(&out, "metadata_only.safetensors", &bytes)
}

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

fn gzip(data: &[u8], level: flate2::Compression) -> Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), level);
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

/// Seeds of a target whose first byte selects what the rest is read as.
fn selected(select: u8, file: &[u8]) -> Vec<u8> {
    let mut out = vec![select];
    out.extend_from_slice(file);
    out
}

fn idx(out: &Path) -> Result<()> {
    let out = dir(out)?;
    let pixels: Vec<u8> = (0..18).collect();
    let images = idx_bytes(&[2, 3, 3], &pixels);
    let labels = idx_bytes(&[2], &[7, 1]);
    let best = flate2::Compression::best();
    // Selector 1: three dimensions; 0: one.
    write(&out, "images", &selected(1, &images))?;
    write(&out, "labels", &selected(0, &labels))?;
    write(&out, "images.gz", &selected(1, &gzip(&images, best)?))?;
    write(&out, "labels.gz", &selected(0, &gzip(&labels, best)?))?;
    // Stored (uncompressed) deflate blocks: the header stays visible to mutations.
    let stored = gzip(&images, flate2::Compression::none())?;
    write(&out, "images.stored.gz", &selected(1, &stored))
}

fn record(label: u8, coarse: Option<u8>) -> Vec<u8> {
    let mut out: Vec<u8> = coarse.into_iter().chain([label]).collect();
    out.extend((0..3 * 32 * 32).map(|i| (i % 251) as u8));
    out
}

fn tar_gz(entries: &[(&str, &[u8])]) -> Result<Vec<u8>> {
    // Stored deflate blocks: the tar headers stay visible to mutations.
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    let mut builder = tar::Builder::new(enc);
    for (path, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, path, *data)?;
    }
    Ok(builder.into_inner()?.finish()?)
}

fn cifar(out: &Path) -> Result<()> {
    let out = dir(out)?;
    // Bit 0: CIFAR-100; bit 1: archive; bit 2: test split.
    write(&out, "cifar10.bin", &selected(0, &record(3, None)))?;
    write(&out, "cifar100.bin", &selected(1, &record(42, Some(8))))?;
    let ten = tar_gz(&[("cifar-10-batches-bin/test_batch.bin", &record(9, None))])?;
    write(&out, "cifar10-test.tar.gz", &selected(6, &ten))?;
    let names: String = (0..100).map(|i| format!("c{i}\n")).collect();
    let hundred = tar_gz(&[
        ("cifar-100-binary/fine_label_names.txt", names.as_bytes()),
        ("cifar-100-binary/test.bin", &record(99, Some(19))),
    ])?;
    write(&out, "cifar100-test.tar.gz", &selected(7, &hundred))
}

fn encode(img: image::DynamicImage, format: image::ImageFormat) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format)?;
    Ok(out.into_inner())
}

fn images(out: &Path, repo: &Path) -> Result<()> {
    use image::{DynamicImage as D, ImageFormat::*};
    let out = dir(out)?;
    let rgb = image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 50, y as u8 * 80, 7]));
    let gray = image::GrayImage::from_fn(4, 4, |x, y| image::Luma([(x * 16 + y * 4) as u8]));
    let rgba = image::RgbaImage::from_fn(2, 2, |x, y| image::Rgba([x as u8, y as u8, 9, 128]));
    let gray16 = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(3, 2, |x, y| {
        image::Luma([(x * 20000 + y * 300) as u16])
    });
    write(&out, "rgb.png", &encode(D::ImageRgb8(rgb.clone()), Png)?)?;
    write(&out, "gray.png", &encode(D::ImageLuma8(gray.clone()), Png)?)?;
    write(&out, "rgba.png", &encode(D::ImageRgba8(rgba), Png)?)?;
    write(&out, "gray16.png", &encode(D::ImageLuma16(gray16), Png)?)?;
    write(&out, "rgb.jpg", &encode(D::ImageRgb8(rgb), Jpeg)?)?;
    write(&out, "gray.jpg", &encode(D::ImageLuma8(gray), Jpeg)?)?;
    let fixture = repo.join("tests/fixtures/predict/image_rgb.png");
    write(&out, "fixture_rgb.png", &std::fs::read(fixture)?)
}

fn recipes(out: &Path, repo: &Path) -> Result<()> {
    let out = dir(out)?;
    for (name, file) in [
        ("fashion-mnist-long.toml", "recipes/fashion-mnist-long.toml"),
        ("legacy_run.toml", "tests/fixtures/legacy_run/config.toml"),
    ] {
        write(&out, name, &std::fs::read(repo.join(file))?)?;
    }
    write(
        &out,
        "default.toml",
        toml::to_string(&Recipe::default())?.as_bytes(),
    )?;
    let overrides = "dataset = \"folder:/data/pets\"\npreset = \"vit_tiny_patch16_224\"\n\
                     drop_path = 0.1\nnum_classes = 37\nbatch_size = 12\naccum_steps = 3\n\
                     hflip = true\nmax_steps = 5\ninit = \"w.safetensors\"\n";
    write(&out, "overrides.toml", overrides.as_bytes())
}

fn model_configs(out: &Path, repo: &Path) -> Result<()> {
    let out = dir(out)?;
    for (name, file) in [
        ("timm_tiny.json", "tests/fixtures/timm_tiny/config.json"),
        (
            "timm_meanpool.json",
            "tests/fixtures/timm_meanpool/config.json",
        ),
        (
            "hf_tiny_ours.json",
            "tests/fixtures/hf_tiny/ours_config.json",
        ),
    ] {
        write(&out, name, &std::fs::read(repo.join(file))?)?;
    }
    let fmnist = ModelConfig::preset("vit_fmnist")?;
    write(
        &out,
        "vit_fmnist.toml",
        toml::to_string(&fmnist)?.as_bytes(),
    )?;
    write(
        &out,
        "tiny.json",
        serde_json::to_string(&tiny(4))?.as_bytes(),
    )?;
    let flat = "image_size = [32, 32]\npatch_size = 8\nnum_classes = 10\n\
                embed_dim = 64\ndepth = 2\nnum_heads = 4\n";
    write(&out, "flat.toml", flat.as_bytes())
}
