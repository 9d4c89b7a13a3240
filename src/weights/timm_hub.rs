//! timm's own checkpoint folders (what `timm.models.push_to_hf_hub` and `save_for_hf` write,
//! as on the Hub's `timm/*` repos): `model.safetensors` in timm's names beside a `config.json`
//! holding `architecture`, `num_classes`, `model_args` (the keyword arguments the model was
//! made with), `pretrained_cfg` (its preprocessing) and, where present, `label_names`. Read
//! here into our config, preprocessing and class names, so such a folder needs no preset.

use std::path::Path;

use serde_json::Value;

use crate::models::vit::Pool;
use crate::models::{Architecture, ModelConfig, Preprocess};
use crate::{Error, Result};

/// Whether a `config.json` is timm's (it names an `architecture`).
pub(super) fn is_timm_config(v: &Value) -> bool {
    v.get("architecture").is_some_and(Value::is_string)
}

/// Our config, preprocessing and class names from timm's `config.json` at `path`.
pub(super) fn from_timm_config(
    v: &Value,
    path: &Path,
) -> Result<(ModelConfig, Option<Preprocess>, Option<Vec<String>>)> {
    let bad = |msg: String| Error::format(path, msg);
    let arch = v["architecture"].as_str().unwrap_or_default();
    let mut cfg =
        ModelConfig::preset(arch).map_err(|e| bad(format!("timm architecture {arch}: {e}")))?;
    if let Some(args) = v.get("model_args").and_then(Value::as_object) {
        for (key, value) in args {
            apply_model_arg(&mut cfg, key, value).map_err(|m| bad(format!("model_args: {m}")))?;
        }
    }
    if let Some(k) = v.get("num_classes").and_then(Value::as_u64) {
        cfg.set_num_classes(k as usize);
    }
    let pre = v.get("pretrained_cfg");
    if let Some(size) = pre
        .and_then(|p| p.get("input_size"))
        .and_then(Value::as_array)
    {
        let dims: Vec<usize> = size
            .iter()
            .filter_map(|d| d.as_u64())
            .map(|d| d as usize)
            .collect();
        match dims[..] {
            [c, h, w] if c == cfg.in_channels() => cfg.set_image_size([h, w]),
            _ => {
                return Err(bad(format!(
                    "pretrained_cfg.input_size {dims:?} does not fit the model"
                )))
            }
        }
    }
    cfg.validate().map_err(|e| bad(e.to_string()))?;
    let preprocess = pre
        .map(|p| preprocess_from(p, cfg.in_channels()))
        .transpose()
        .map_err(bad)?;
    let names = v.get("label_names").and_then(Value::as_array).map(|a| {
        a.iter()
            .map(|n| n.as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    });
    let names = names.filter(|n| n.len() == cfg.num_classes() && !n.is_empty());
    Ok((cfg, preprocess, names))
}

/// One of timm's `model_args` applied to our config: the ViT's keyword arguments, and for
/// every architecture the ones all share.
fn apply_model_arg(cfg: &mut ModelConfig, key: &str, v: &Value) -> std::result::Result<(), String> {
    let int = || {
        v.as_u64()
            .map(|x| x as usize)
            .ok_or(format!("{key} = {v} is not a count"))
    };
    let bool_ = || {
        v.as_bool()
            .ok_or(format!("{key} = {v} is not true or false"))
    };
    match (key, &mut *cfg) {
        ("num_classes", c) => c.set_num_classes(int()?),
        ("img_size", c) => {
            let size = match v {
                Value::Array(a) => a
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as usize)
                    .collect(),
                _ => vec![int()?; 2],
            };
            match size[..] {
                [h, w] => c.set_image_size([h, w]),
                _ => return Err(format!("img_size = {v} is not a size")),
            }
        }
        ("in_chans", c) if int()? == c.in_channels() => {}
        ("pretrained_cfg_overlay", _) => {}
        (_, ModelConfig::Vit(c)) => match key {
            "patch_size" => c.patch_size = int()?,
            "embed_dim" => c.embed_dim = int()?,
            "depth" => c.depth = int()?,
            "num_heads" => c.num_heads = int()?,
            "in_chans" => c.in_channels = int()?,
            "mlp_ratio" => c.mlp_ratio = v.as_f64().ok_or(format!("mlp_ratio = {v}"))?,
            "qkv_bias" => c.qkv_bias = bool_()?,
            "class_token" => c.class_token = bool_()?,
            "fc_norm" => c.fc_norm = v.as_bool().unwrap_or(c.pool == Pool::Mean),
            "global_pool" => {
                c.pool = match v.as_str() {
                    Some("token") => Pool::Cls,
                    Some("avg") => Pool::Mean,
                    _ => return Err(format!("global_pool = {v} is not \"token\" or \"avg\"")),
                };
            }
            _ => return Err(format!("{key} is not one we read for a ViT")),
        },
        (_, c) => return Err(format!("{key} is not one we read for a {} model", c.arch())),
    }
    Ok(())
}

/// timm's `pretrained_cfg` preprocessing: mean, std, crop_pct, interpolation, crop_mode.
fn preprocess_from(p: &Value, channels: usize) -> std::result::Result<Preprocess, String> {
    let floats = |key: &str| -> Option<Vec<f32>> {
        let a = p.get(key)?.as_array()?;
        a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect()
    };
    let mut pre = Preprocess::vit_default(channels);
    if let Some(m) = floats("mean") {
        pre.mean = m;
    }
    if let Some(s) = floats("std") {
        pre.std = s;
    }
    if let Some(c) = p.get("crop_pct").and_then(Value::as_f64) {
        pre.crop_pct = c;
    }
    if let Some(i) = p.get("interpolation").and_then(Value::as_str) {
        pre.interpolation = i.to_string();
    }
    pre.resize = match p.get("crop_mode").and_then(Value::as_str) {
        Some("squash") => "exact".into(),
        Some("center") | None => "shorter".into(),
        Some(other) => {
            return Err(format!(
                "pretrained_cfg.crop_mode '{other}' is not supported"
            ))
        }
    };
    pre.validate(channels).map_err(|e| e.to_string())?;
    Ok(pre)
}
