//! HuggingFace `transformers` ViT naming: the one place that maps it onto timm's names
//! (split q/k/v ↔ fused qkv) and reads/writes HF's `config.json` and
//! `preprocessor_config.json`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::{json, Value};

use super::Checkpoint;
use crate::models::vit::NormPlacement;
use crate::models::{ModelConfig, Preprocess, ViTConfig};
use crate::{Error, Result};

/// True for the names of HF's ViT body (`vit.embeddings...`, `encoder.layer...`).
pub(super) fn is_hf_name(name: &str) -> bool {
    // The body's names: `classifier.` alone is also the head of other models (the
    // documents' SimpleCNN), whose checkpoints are not HF ViTs.
    let n = name.strip_prefix("vit.").unwrap_or(name);
    n.starts_with("embeddings.") || n.starts_with("encoder.layer.")
}

/// Renames HF tensors to timm names, fusing query/key/value into qkv. Returns the renamed
/// tensors and the names it ignored (HF's pooler, mask token).
pub(super) fn from_hf_names(
    hf: HashMap<String, Tensor>,
    path: &Path,
) -> Result<(HashMap<String, Tensor>, Vec<String>)> {
    let mut out = HashMap::new();
    let mut ignored = Vec::new();
    // blocks.{i}.attn.{q,k,v}.{weight,bias} collected here, fused at the end.
    let mut qkv: HashMap<(usize, String), [Option<Tensor>; 3]> = HashMap::new();
    for (name, t) in hf {
        let n = name.strip_prefix("vit.").unwrap_or(&name);
        let timm = if let Some(rest) = n.strip_prefix("encoder.layer.") {
            let (i, rest) = rest.split_once('.').unwrap_or((rest, ""));
            let Ok(i) = i.parse::<usize>() else {
                ignored.push(name);
                continue;
            };
            let (module, param) = rest.rsplit_once('.').unwrap_or((rest, ""));
            let slot = match module {
                "attention.attention.query" => Some(0),
                "attention.attention.key" => Some(1),
                "attention.attention.value" => Some(2),
                _ => None,
            };
            if let Some(s) = slot {
                qkv.entry((i, param.to_string())).or_default()[s] = Some(t);
                continue;
            }
            let m = match module {
                "layernorm_before" => "norm1",
                "attention.output.dense" => "attn.proj",
                "layernorm_after" => "norm2",
                "intermediate.dense" => "mlp.fc1",
                "output.dense" => "mlp.fc2",
                _ => {
                    ignored.push(name);
                    continue;
                }
            };
            format!("blocks.{i}.{m}.{param}")
        } else {
            match n {
                "embeddings.cls_token" => "cls_token".into(),
                "embeddings.position_embeddings" => "pos_embed".into(),
                "embeddings.patch_embeddings.projection.weight" => "patch_embed.proj.weight".into(),
                "embeddings.patch_embeddings.projection.bias" => "patch_embed.proj.bias".into(),
                "layernorm.weight" => "norm.weight".into(),
                "layernorm.bias" => "norm.bias".into(),
                "classifier.weight" => "head.weight".into(),
                "classifier.bias" => "head.bias".into(),
                _ => {
                    ignored.push(name);
                    continue;
                }
            }
        };
        out.insert(timm, t);
    }
    for ((i, param), parts) in qkv {
        let [Some(q), Some(k), Some(v)] = parts else {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                msg: format!("layer {i}: query, key and value {param} must all be present"),
            });
        };
        out.insert(
            format!("blocks.{i}.attn.qkv.{param}"),
            Tensor::cat(&[q, k, v], 0)?,
        );
    }
    Ok((out, ignored))
}

/// Renames timm tensors to HF `ViTForImageClassification` names (`vit.` prefix), splitting qkv.
pub fn to_hf_names(timm: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, t) in timm {
        if let Some(rest) = name.strip_prefix("blocks.") {
            let (i, rest) = rest.split_once('.').unwrap_or((rest, ""));
            let (module, param) = rest.rsplit_once('.').unwrap_or((rest, ""));
            let p = format!("vit.encoder.layer.{i}");
            if module == "attn.qkv" {
                let d = t.dim(0)? / 3;
                for (s, part) in ["query", "key", "value"].iter().enumerate() {
                    out.insert(
                        format!("{p}.attention.attention.{part}.{param}"),
                        t.narrow(0, s * d, d)?.contiguous()?,
                    );
                }
                continue;
            }
            let m = match module {
                "norm1" => "layernorm_before",
                "attn.proj" => "attention.output.dense",
                "norm2" => "layernorm_after",
                "mlp.fc1" => "intermediate.dense",
                "mlp.fc2" => "output.dense",
                other => {
                    return Err(Error::Invalid(format!(
                        "tensor blocks.{i}.{other}.{param} has no HuggingFace name"
                    )))
                }
            };
            out.insert(format!("{p}.{m}.{param}"), t.clone());
            continue;
        }
        let hf = match name.as_str() {
            "cls_token" => "vit.embeddings.cls_token",
            "pos_embed" => "vit.embeddings.position_embeddings",
            "patch_embed.proj.weight" => "vit.embeddings.patch_embeddings.projection.weight",
            "patch_embed.proj.bias" => "vit.embeddings.patch_embeddings.projection.bias",
            "norm.weight" => "vit.layernorm.weight",
            "norm.bias" => "vit.layernorm.bias",
            "head.weight" => "classifier.weight",
            "head.bias" => "classifier.bias",
            other => {
                return Err(Error::Invalid(format!(
                    "tensor {other} has no name in HuggingFace's ViT (which has no fc_norm, no DeiT distillation token and no hybrid backbone)"
                )))
            }
        };
        out.insert(hf.to_string(), t.clone());
    }
    Ok(out)
}

/// Reads `config.json` and `preprocessor_config.json` beside an HF checkpoint.
pub(super) fn read_sidecars(ck: &mut Checkpoint) -> Result<()> {
    let dir = ck.path.parent().unwrap_or(Path::new("."));
    let cfg_path = dir.join("config.json");
    if cfg_path.exists() {
        let v = read_json(&cfg_path)?;
        let (cfg, names) = config_from_hf(&v, &cfg_path, ck.head_classes("head"))?;
        ck.config = Some(ModelConfig::Vit(cfg));
        ck.class_names = names;
    }
    let pre_path = dir.join("preprocessor_config.json");
    if pre_path.exists() {
        let v = read_json(&pre_path)?;
        ck.preprocess = Some(preprocess_from_hf(&v, &pre_path)?);
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = crate::files::read_text(path)?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

/// Our config from HF's `config.json` (model_type "vit").
fn config_from_hf(
    v: &Value,
    path: &Path,
    head_classes: Option<usize>,
) -> Result<(ViTConfig, Option<Vec<String>>)> {
    let bad = |msg: String| Error::format(path, msg);
    let int = |key: &str| -> Result<usize> {
        v.get(key)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| bad(format!("missing or non-integer '{key}'")))
    };
    if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
        if act != "gelu" {
            return Err(bad(format!(
                "hidden_act '{act}' is not supported (only exact 'gelu')"
            )));
        }
    }
    let image = match v.get("image_size") {
        Some(Value::Array(a)) if a.len() == 2 => [
            a[0].as_u64().unwrap_or(0) as usize,
            a[1].as_u64().unwrap_or(0) as usize,
        ],
        _ => {
            let s = int("image_size")?;
            [s, s]
        }
    };
    let hidden = int("hidden_size")?;
    let inter = int("intermediate_size")?;
    let names = v.get("id2label").and_then(Value::as_object).map(|m| {
        let mut pairs: Vec<(usize, String)> = m
            .iter()
            .filter_map(|(k, l)| Some((k.parse().ok()?, l.as_str()?.to_string())))
            .collect();
        pairs.sort();
        pairs.into_iter().map(|(_, l)| l).collect::<Vec<_>>()
    });
    let num_classes = head_classes.unwrap_or(0);
    let names = names.filter(|n| n.len() == num_classes && num_classes > 0);
    let cfg = ViTConfig {
        image_size: image,
        patch_size: int("patch_size")?,
        in_channels: v.get("num_channels").and_then(Value::as_u64).unwrap_or(3) as usize,
        num_classes,
        embed_dim: hidden,
        depth: int("num_hidden_layers")?,
        num_heads: int("num_attention_heads")?,
        mlp_ratio: inter as f64 / hidden.max(1) as f64,
        qkv_bias: v.get("qkv_bias").and_then(Value::as_bool).unwrap_or(true),
        layer_norm_eps: v
            .get("layer_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-12),
        ..ViTConfig::timm(image[0], 1, hidden, 1, 1)
    };
    cfg.validate()
        .map_err(|e| bad(format!("describes an inconsistent model: {e}")))?;
    Ok((cfg, names))
}

/// Preprocessing from HF's `preprocessor_config.json` (ViTImageProcessor).
fn preprocess_from_hf(v: &Value, path: &Path) -> Result<Preprocess> {
    let floats = |key: &str| -> Option<Vec<f32>> {
        v.get(key)?
            .as_array()?
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32))
            .collect()
    };
    let mean = floats("image_mean").unwrap_or_else(|| vec![0.5; 3]);
    let std = floats("image_std").unwrap_or_else(|| vec![0.5; 3]);
    // PIL resample codes: 2 = bilinear, 3 = bicubic.
    let interpolation = match v.get("resample").and_then(Value::as_u64) {
        Some(3) => "bicubic",
        Some(2) | None => "bilinear",
        Some(other) => {
            return Err(Error::format(
                path,
                format!("resample {other} is not supported (2 bilinear, 3 bicubic)"),
            ))
        }
    };
    let do_resize = v.get("do_resize").and_then(Value::as_bool).unwrap_or(true);
    Ok(Preprocess {
        mean,
        std,
        crop_pct: 1.0,
        interpolation: interpolation.into(),
        resize: if do_resize { "exact" } else { "shorter" }.into(),
    })
}

/// HF `config.json` text for a model saved with [`to_hf_names`].
pub fn hf_config_json(cfg: &ViTConfig, class_names: Option<&[String]>) -> Result<String> {
    if cfg.fc_norm || !cfg.class_token || cfg.norm != NormPlacement::Pre {
        return Err(Error::Invalid(
            "HuggingFace's ViT has only pre-norm, class-token models without fc_norm".into(),
        ));
    }
    if cfg.backbone.is_some() {
        return Err(Error::Invalid(
            "a hybrid ViT has no HuggingFace ViT naming (transformers' ViTHybrid is another \
             model): keep timm's names"
                .into(),
        ));
    }
    let labels: Vec<String> = match class_names {
        Some(n) => n.to_vec(),
        None => (0..cfg.num_classes).map(|i| format!("LABEL_{i}")).collect(),
    };
    let id2label: serde_json::Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), json!(l)))
        .collect();
    let label2id: serde_json::Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), json!(i)))
        .collect();
    let v = json!({
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "image_size": cfg.image_size[0],
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_channels,
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_hidden_dim(),
        "hidden_act": "gelu",
        "layer_norm_eps": cfg.layer_norm_eps,
        "qkv_bias": cfg.qkv_bias,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "encoder_stride": cfg.patch_size,
        "id2label": id2label,
        "label2id": label2id,
    });
    if cfg.image_size[0] != cfg.image_size[1] {
        return Err(Error::Invalid(
            "HuggingFace's ViT config takes a square image_size".into(),
        ));
    }
    Ok(serde_json::to_string_pretty(&v).expect("JSON value serialises"))
}

/// HF `preprocessor_config.json` text.
pub fn hf_preprocessor_json(cfg: &ViTConfig, p: &Preprocess) -> String {
    let v = json!({
        "image_processor_type": "ViTImageProcessor",
        "do_resize": true,
        "size": {"height": cfg.image_size[0], "width": cfg.image_size[1]},
        "resample": if p.interpolation == "bicubic" { 3 } else { 2 },
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": p.mean,
        "image_std": p.std,
    });
    serde_json::to_string_pretty(&v).expect("JSON value serialises")
}
