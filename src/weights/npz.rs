//! The paper's own checkpoints: the `.npz` archives of google-research/vision_transformer
//! (ViT, AugReg, and the R50/R26/Ti hybrids), NumPy arrays of JAX/Flax parameters named like
//! `Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel`. [`load`] reads
//! one into timm's names and layouts, as timm's `_load_weights` converts them (kernels from
//! HWIO and (in, out) to PyTorch's orders, per-head query/key/value into one `qkv`), and
//! reads off the ViT it describes, so it needs no preset.
//!
//! The archive is read with bounds from the file itself: each array's declared size must
//! match its bytes, and no entry may claim more than its compressed size allows, so a
//! hostile archive costs no memory it does not hold.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::{Checkpoint, Naming};
use crate::models::hybrid::HybridBackbone;
use crate::models::{ModelConfig, ViTConfig};
use crate::{Error, Result};

/// Whether `path` is meant as a `.npz`: named so, or a zip archive (what NumPy's `savez`
/// writes) by its first bytes.
pub(super) fn is_npz(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npz"))
        || std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
            && magic == *b"PK\x03\x04"
}

/// Reads a `.npz` checkpoint of the original JAX ViT into timm's names, with its config
/// where the arrays give one.
pub(super) fn load(path: &Path) -> Result<Checkpoint> {
    let bad = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let arrays = read_arrays(path).map_err(&bad)?;
    let prefix = ["", "opt/target/", "params/"]
        .into_iter()
        .find(|p| arrays.contains_key(&format!("{p}embedding/kernel")))
        .ok_or_else(|| {
            bad("a .npz without embedding/kernel: not a checkpoint of the original JAX ViT".into())
        })?;
    let mut w: HashMap<String, Tensor> = arrays
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v)))
        .collect();
    if w.contains_key("pos_embedding")
        || w.contains_key("Transformer/encoderblock/LayerNorm_0/scale")
    {
        return Err(bad(
            "a big_vision checkpoint (scanned blocks, top-level pos_embedding): only the \
             google-research/vision_transformer layout is read"
                .into(),
        ));
    }
    let (tensors, cfg) = convert(&mut w).map_err(|e| match e {
        Error::Checkpoint { msg, .. } | Error::Invalid(msg) | Error::Config(msg) => bad(msg),
        other => other,
    })?;
    let mut ignored: Vec<String> = w.into_keys().collect();
    ignored.sort();
    Ok(Checkpoint {
        path: path.to_path_buf(),
        naming: Naming::Jax,
        tensors,
        train_state: HashMap::new(),
        ignored,
        config: cfg.map(ModelConfig::Vit),
        preprocess: None,
        class_names: None,
        metadata: HashMap::new(),
    })
}

/// timm's `_n2p`: a JAX array in PyTorch's order. With `t`, kernels are transposed: 4-D
/// (HWIO) to (O, I, H, W), 3-D (a, b, c) to (c, a, b), 2-D (in, out) to (out, in).
fn n2p(x: &Tensor, t: bool) -> Result<Tensor> {
    let d = x.dims().to_vec();
    let x = if d.len() == 4 && d[0] == 1 && d[1] == 1 && d[2] == 1 {
        x.flatten_all()?
    } else {
        x.clone()
    };
    if !t {
        return Ok(x);
    }
    Ok(match x.rank() {
        4 => x.permute((3, 2, 0, 1))?.contiguous()?,
        3 => x.permute((2, 0, 1))?.contiguous()?,
        2 => x.t()?.contiguous()?,
        _ => x,
    })
}

/// The timm state dict and the config the JAX arrays `w` describe (`None` where they do not
/// make a valid one); what it uses is taken out of `w`, so what is left was not used.
fn convert(
    w: &mut HashMap<String, Tensor>,
) -> Result<(HashMap<String, Tensor>, Option<ViTConfig>)> {
    let mut out = HashMap::new();
    let dim = |t: &Tensor, i: usize| -> Result<usize> {
        t.dims().get(i).copied().ok_or_else(|| {
            Error::Invalid(format!("an array of shape {:?} has no axis {i}", t.dims()))
        })
    };

    // The hybrid's backbone: conv_root/gn_root, then block{s}/unit{b} (1-based).
    let hybrid = w.contains_key("conv_root/kernel");
    let mut backbone = None;
    if hybrid {
        let root = take(w, "conv_root/kernel")?; // (7, 7, C_in, C_stem)
        let stem_channels = dim(&root, 3)?;
        let mut layers = Vec::new();
        let mut channels = Vec::new();
        while w.contains_key(&format!("block{}/unit1/conv1/kernel", layers.len() + 1)) {
            let s = layers.len() + 1;
            let units = (1..)
                .take_while(|u| w.contains_key(&format!("block{s}/unit{u}/conv1/kernel")))
                .count();
            let last = &w[&format!("block{s}/unit1/conv3/kernel")];
            channels.push(dim(last, 3)?);
            layers.push(units);
        }
        let stem = if layers.is_empty() {
            "patch_embed.backbone"
        } else {
            "patch_embed.backbone.stem"
        };
        out.insert(format!("{stem}.conv.weight"), n2p(&root, true)?);
        out.insert(
            format!("{stem}.norm.weight"),
            n2p(&take(w, "gn_root/scale")?, true)?,
        );
        out.insert(
            format!("{stem}.norm.bias"),
            n2p(&take(w, "gn_root/bias")?, true)?,
        );
        for (s, &units) in layers.iter().enumerate() {
            for u in 0..units {
                let jp = format!("block{}/unit{}", s + 1, u + 1);
                let tp = format!("patch_embed.backbone.stages.{s}.blocks.{u}");
                for (jax, ours) in [
                    ("conv1", "conv1"),
                    ("conv2", "conv2"),
                    ("conv3", "conv3"),
                    ("conv_proj", "downsample.conv"),
                ] {
                    if jax == "conv_proj" && u > 0 {
                        continue;
                    }
                    let norm = format!("gn{}", &jax[4..]);
                    let tnorm = ours.replace("conv", "norm");
                    out.insert(
                        format!("{tp}.{ours}.weight"),
                        n2p(&take(w, &format!("{jp}/{jax}/kernel"))?, true)?,
                    );
                    for (j, t) in [("scale", "weight"), ("bias", "bias")] {
                        out.insert(
                            format!("{tp}.{tnorm}.{t}"),
                            n2p(&take(w, &format!("{jp}/{norm}/{j}"))?, true)?,
                        );
                    }
                }
            }
        }
        channels.extend([256, 512, 1024, 2048].iter().skip(channels.len()).copied());
        backbone = Some(HybridBackbone {
            layers,
            stem_channels,
            channels,
            ..HybridBackbone::resnetv2(&[])
        });
    }

    let embed = take(w, "embedding/kernel")?; // (P, P, C, D)
    if embed.rank() != 4 {
        return Err(Error::Invalid(format!(
            "embedding/kernel has shape {:?}, not a convolution's (P, P, C, D)",
            embed.dims()
        )));
    }
    let (patch, d) = (dim(&embed, 0)?, dim(&embed, 3)?);
    out.insert("patch_embed.proj.weight".into(), n2p(&embed, true)?);
    out.insert(
        "patch_embed.proj.bias".into(),
        n2p(&take(w, "embedding/bias")?, true)?,
    );
    let class_token = w.contains_key("cls");
    if class_token {
        out.insert("cls_token".into(), n2p(&take(w, "cls")?, false)?);
    }
    let pos = n2p(&take(w, "Transformer/posembed_input/pos_embedding")?, false)?;
    let tokens = dim(&pos, 1)?;
    out.insert("pos_embed".into(), pos);
    out.insert(
        "norm.weight".into(),
        n2p(&take(w, "Transformer/encoder_norm/scale")?, true)?,
    );
    out.insert(
        "norm.bias".into(),
        n2p(&take(w, "Transformer/encoder_norm/bias")?, true)?,
    );
    let mut num_classes = 0;
    if w.contains_key("head/kernel") {
        let head = n2p(&take(w, "head/kernel")?, true)?; // (K, D)
        num_classes = dim(&head, 0)?;
        out.insert("head.weight".into(), head);
        out.insert("head.bias".into(), n2p(&take(w, "head/bias")?, true)?);
    }

    let depth = (0..)
        .take_while(|i| w.contains_key(&format!("Transformer/encoderblock_{i}/LayerNorm_0/scale")))
        .count();
    let (mut heads, mut hidden) = (1, 4 * d);
    for i in 0..depth {
        let jp = format!("Transformer/encoderblock_{i}");
        let mha = format!("{jp}/MultiHeadDotProductAttention_1");
        let tp = format!("blocks.{i}");
        for (jax, ours) in [("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")] {
            for (j, t) in [("scale", "weight"), ("bias", "bias")] {
                out.insert(
                    format!("{tp}.{ours}.{t}"),
                    n2p(&take(w, &format!("{jp}/{jax}/{j}"))?, true)?,
                );
            }
        }
        // query/key/value kernels (D, heads, D/heads) → rows of one (3D, D) matrix.
        let (mut qkv_w, mut qkv_b) = (Vec::new(), Vec::new());
        for part in ["query", "key", "value"] {
            let k = take(w, &format!("{mha}/{part}/kernel"))?;
            heads = dim(&k, 1)?;
            qkv_w.push(n2p(&k, false)?.flatten_from(1)?.t()?);
            qkv_b.push(n2p(&take(w, &format!("{mha}/{part}/bias"))?, false)?.flatten_all()?);
        }
        out.insert(
            format!("{tp}.attn.qkv.weight"),
            Tensor::cat(&qkv_w, 0)?.contiguous()?,
        );
        out.insert(format!("{tp}.attn.qkv.bias"), Tensor::cat(&qkv_b, 0)?);
        let proj = n2p(&take(w, &format!("{mha}/out/kernel"))?, true)?; // (D, heads, D/heads)
        out.insert(format!("{tp}.attn.proj.weight"), proj.flatten_from(1)?);
        out.insert(
            format!("{tp}.attn.proj.bias"),
            n2p(&take(w, &format!("{mha}/out/bias"))?, true)?,
        );
        for r in 0..2 {
            let dense = format!("{jp}/MlpBlock_3/Dense_{r}");
            let k = n2p(&take(w, &format!("{dense}/kernel"))?, true)?;
            if r == 0 {
                hidden = dim(&k, 0)?;
            }
            out.insert(format!("{tp}.mlp.fc{}.weight", r + 1), k);
            out.insert(
                format!("{tp}.mlp.fc{}.bias", r + 1),
                n2p(&take(w, &format!("{dense}/bias"))?, true)?,
            );
        }
    }
    if depth == 0 {
        return Err(Error::Invalid(
            "no Transformer/encoderblock_0: not a ViT checkpoint".into(),
        ));
    }

    // The grid is square in every published checkpoint: its side from the token count.
    let cells = tokens.saturating_sub(usize::from(class_token));
    let side = (cells as f64).sqrt().round() as usize;
    if side == 0 || side * side != cells {
        return Err(Error::Invalid(format!(
            "{tokens} position embeddings are not a square grid{}",
            if class_token {
                " plus a class token"
            } else {
                ""
            }
        )));
    }
    // Pixels per token: the patch, times the backbone's stride in a hybrid (4 for its
    // stem, doubled by every stage after the first).
    let stride = match &backbone {
        Some(bb) => 4 << bb.layers.len().saturating_sub(1),
        None => 1,
    };
    let in_channels = match out
        .get("patch_embed.backbone.conv.weight")
        .or(out.get("patch_embed.backbone.stem.conv.weight"))
    {
        Some(root) => dim(root, 1)?,
        None => dim(&out["patch_embed.proj.weight"], 1)?,
    };
    let img = side * patch * stride;
    let cfg = ViTConfig {
        in_channels,
        num_classes,
        mlp_ratio: hidden as f64 / d as f64,
        class_token,
        pool: if class_token {
            crate::models::vit::Pool::Cls
        } else {
            crate::models::vit::Pool::Mean
        },
        backbone,
        ..ViTConfig::timm(img, patch, d, depth, heads)
    };
    // GroupNorm's group count is not in the archive: 32 in every published hybrid. Where
    // the widths do not allow it (or anything else does not fit) the archive does not
    // describe its model, and a preset or config must.
    Ok((out, cfg.validate().is_ok().then_some(cfg)))
}

/// The array `name`, taken out of `w`.
fn take(w: &mut HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    w.remove(name)
        .ok_or_else(|| Error::Invalid(format!("array {name} is missing")))
}

/// The arrays of a `.npz` archive by name (".npy" cut off), as f32; an error message
/// otherwise.
fn read_arrays(path: &Path) -> std::result::Result<HashMap<String, Tensor>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| format!("not a readable .npz (zip) archive: {e}"))?;
    let mut arrays = HashMap::new();
    let mut total = 0u64;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| format!("archive entry {i}: {e}"))?;
        let name = entry
            .name()
            .map_err(|e| format!("archive entry {i}: {e}"))?
            .trim_end_matches(".npy")
            .to_string();
        let size = entry.size();
        // Deflate expands at most about 1032 to 1; a stored entry is as large as it says.
        if size > entry.compressed_size().saturating_mul(1032) + 1024 || size > file_len * 1032 {
            return Err(format!(
                "array {name} claims {size} bytes, more than its archive holds"
            ));
        }
        total = total.saturating_add(size);
        if total > 1 << 36 {
            return Err("the archive's arrays exceed 64 GiB".into());
        }
        let mut bytes = Vec::with_capacity(size as usize);
        entry
            .by_ref()
            .take(size)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("array {name}: {e}"))?;
        let t = parse_npy(&bytes).map_err(|m| format!("array {name}: {m}"))?;
        arrays.insert(name, t);
    }
    Ok(arrays)
}

/// One `.npy` file's array (format versions 1 to 3; little-endian f32 or f64, C order) as
/// an f32 tensor.
fn parse_npy(bytes: &[u8]) -> std::result::Result<Tensor, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy array".into());
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    let header = bytes
        .get(start..start.saturating_add(header_len))
        .ok_or("the .npy header is cut short")?;
    let header = std::str::from_utf8(header).map_err(|_| "the .npy header is not text")?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr").ok_or("the .npy header has no descr")?;
    let item = if descr.starts_with("'<f4'") || descr.starts_with("'=f4'") {
        4
    } else if descr.starts_with("'<f8'") || descr.starts_with("'=f8'") {
        8
    } else {
        let d: String = descr.chars().take_while(|&c| c != ',').collect();
        return Err(format!(
            "dtype {d} is not supported (float32 or float64 only)"
        ));
    };
    if field("fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let shape_text = field("shape").ok_or("the .npy header has no shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("the .npy shape is not a tuple")?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape entry '{s}'"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &x| a.checked_mul(x))
        .ok_or("the .npy shape overflows")?;
    let data = &bytes[start + header_len..];
    if Some(data.len()) != count.checked_mul(item) {
        return Err(format!(
            "shape {shape:?} needs {} bytes of data, the array has {}",
            count.saturating_mul(item),
            data.len()
        ));
    }
    let values: Vec<f32> = if item == 4 {
        data.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        data.chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect()
    };
    Tensor::from_vec(values, shape, &Device::Cpu).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(header.len() as u16).to_le_bytes());
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn npy_arrays_parse_and_bad_ones_say_why() {
        let data: Vec<u8> = [1f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let t = parse_npy(&npy("<f4", "(2, 3)", &data)).unwrap();
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
        );
        let s = parse_npy(&npy("<f8", "()", &7f64.to_le_bytes())).unwrap();
        assert_eq!(s.dims(), &[] as &[usize]);
        for (bytes, want) in [
            (
                npy("<f4", "(2, 4)", &data),
                "needs 32 bytes of data, the array has 24",
            ),
            (npy("<i8", "(3,)", &data), "dtype '<i8' is not supported"),
            (
                npy("<f4", "(99999999999999, 99999999999)", &data),
                "overflows",
            ),
            (b"PK\x03\x04 not numpy".to_vec(), "not a .npy array"),
        ] {
            let e = parse_npy(&bytes).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }
}
