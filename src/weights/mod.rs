//! Checkpoints: safetensors in timm naming (ours, self-describing through metadata) and in
//! HuggingFace naming (with `config.json` beside), both directions; fitting a checkpoint to
//! a config (position-embedding resampling, head replacement). `weights` never builds layers.

mod hf;
pub mod resample;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;

use crate::config::{PosEmbed, Preprocess, ViTConfig};
use crate::{Error, Result};

pub use hf::{hf_config_json, hf_preprocessor_json, to_hf_names};

/// Metadata keys of our checkpoints.
const META_CONFIG: &str = "vit.config";
const META_PREPROCESS: &str = "vit.preprocess";
const META_CLASSES: &str = "vit.class_names";

/// Prefix of tensors that are training state (optimizer moments, ...), not model weights.
pub const TRAIN_STATE_PREFIX: &str = "train_state.";

/// Which naming a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// timm's `VisionTransformer` state dict (also ours).
    Timm,
    /// HuggingFace `ViTModel` / `ViTForImageClassification`.
    Hf,
}

/// A loaded checkpoint: model tensors renamed to timm naming, plus what it says about itself.
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub naming: Naming,
    /// Model parameters in timm naming, f32.
    pub tensors: HashMap<String, Tensor>,
    /// Training state stored beside the weights (names without [`TRAIN_STATE_PREFIX`]).
    pub train_state: HashMap<String, Tensor>,
    /// Tensors that are neither (e.g. HF's pooler), ignored.
    pub ignored: Vec<String>,
    /// The architecture, when the checkpoint carries it (our metadata or HF `config.json`).
    pub config: Option<ViTConfig>,
    /// Evaluation preprocessing (our metadata or HF `preprocessor_config.json`).
    pub preprocess: Option<Preprocess>,
    /// Class names (our metadata or HF `id2label`).
    pub class_names: Option<Vec<String>>,
    /// All string metadata of the safetensors header.
    pub metadata: HashMap<String, String>,
}

/// Where the architecture comes from, besides the checkpoint itself.
#[derive(Debug, Clone, Default)]
pub enum Arch {
    /// Use the checkpoint's own config (our metadata or HF `config.json`).
    #[default]
    FromCheckpoint,
    /// A named preset; its class count follows the checkpoint's head.
    Preset(String),
    /// A config file, used as written.
    File(PathBuf),
}

/// How to resample a position embedding to a new grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PosResample {
    /// timm's `resample_abs_pos_embed`: bicubic with antialias (the default).
    #[default]
    Timm,
    /// HuggingFace's `interpolate_pos_encoding`: bicubic without antialias.
    Hf,
}

impl Checkpoint {
    /// Reads a safetensors checkpoint; recognises timm and HF naming. Corrupt or truncated
    /// files are errors naming the file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a valid safetensors file ({e})")))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a valid safetensors file ({e})")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();

        let mut raw = HashMap::new();
        for (name, view) in st.tensors() {
            use candle_core::safetensors::Load;
            let t = view
                .load(&Device::Cpu)
                .map_err(|e| bad(format!("tensor {name}: {e}")))?;
            raw.insert(name, t);
        }
        let naming = if raw.keys().any(|k| hf::is_hf_name(k)) {
            Naming::Hf
        } else {
            Naming::Timm
        };

        let mut ck = Checkpoint {
            path: path.to_path_buf(),
            naming,
            tensors: HashMap::new(),
            train_state: HashMap::new(),
            ignored: Vec::new(),
            config: None,
            preprocess: None,
            class_names: None,
            metadata,
        };
        for (name, t) in raw {
            if let Some(rest) = name.strip_prefix(TRAIN_STATE_PREFIX) {
                ck.train_state.insert(rest.to_string(), t);
            } else if t.dtype().is_float() {
                ck.tensors.insert(name, t.to_dtype(DType::F32)?);
            } else {
                ck.ignored.push(name);
            }
        }
        if naming == Naming::Hf {
            let (tensors, ignored) = hf::from_hf_names(std::mem::take(&mut ck.tensors), path)?;
            ck.tensors = tensors;
            ck.ignored.extend(ignored);
            hf::read_sidecars(&mut ck)?;
        }
        ck.ignored.sort();
        ck.read_metadata()?;
        Ok(ck)
    }

    fn read_metadata(&mut self) -> Result<()> {
        let path = self.path.clone();
        let parse_err = |key: &str, e: serde_json::Error| Error::Checkpoint {
            path: path.clone(),
            msg: format!("metadata '{key}' is not valid: {e}"),
        };
        if let Some(s) = self.metadata.get(META_CONFIG) {
            let cfg: ViTConfig = serde_json::from_str(s).map_err(|e| parse_err(META_CONFIG, e))?;
            self.config = Some(cfg);
        }
        if let Some(s) = self.metadata.get(META_PREPROCESS) {
            let p: Preprocess =
                serde_json::from_str(s).map_err(|e| parse_err(META_PREPROCESS, e))?;
            self.preprocess = Some(p);
        }
        if let Some(s) = self.metadata.get(META_CLASSES) {
            let c: Vec<String> = serde_json::from_str(s).map_err(|e| parse_err(META_CLASSES, e))?;
            self.class_names = Some(c);
        }
        Ok(())
    }

    /// The config to run this checkpoint with: a config file as written, a preset with the
    /// checkpoint's class count, or the checkpoint's own; `img_size` overrides the input size.
    pub fn resolve_config(&self, arch: &Arch, img_size: Option<usize>) -> Result<ViTConfig> {
        let mut config = match arch {
            Arch::File(p) => ViTConfig::from_file(p)?,
            Arch::Preset(name) => {
                let mut c = ViTConfig::preset(name)?;
                if let Some(k) = self.head_classes() {
                    c.num_classes = k;
                }
                c
            }
            Arch::FromCheckpoint => self.config.clone().ok_or_else(|| Error::Checkpoint {
                path: self.path.clone(),
                msg: "does not describe its architecture; pass --preset NAME or --config FILE"
                    .into(),
            })?,
        };
        if let Some(s) = img_size {
            config.image_size = [s, s];
        }
        config.validate()?;
        Ok(config)
    }

    /// Number of classes of the checkpoint's head, if it has one.
    pub fn head_classes(&self) -> Option<usize> {
        self.tensors.get("head.weight").and_then(|w| w.dim(0).ok())
    }

    /// Fits the checkpoint's tensors to `cfg`: resamples the position embedding to the
    /// config's grid, replaces a head of another class count with `new_head` (when given:
    /// fresh tensors for fine-tuning; otherwise it is an error), and checks that every
    /// tensor is present with the expected shape. Returns the tensors and the warnings.
    pub fn fit(
        &self,
        cfg: &ViTConfig,
        resample: PosResample,
        new_head: Option<(Tensor, Tensor)>,
    ) -> Result<(HashMap<String, Tensor>, Vec<String>)> {
        let mut warnings = Vec::new();
        let mut tensors = self.tensors.clone();
        let err = |msg: String| Error::Checkpoint {
            path: self.path.clone(),
            msg,
        };

        // Position embedding of another grid: resample the patch part.
        if cfg.pos_embed == PosEmbed::Learned {
            if let Some(pos) = tensors.get("pos_embed") {
                let want = cfg.num_tokens();
                if pos.rank() == 3 && pos.dim(1)? != want && pos.dim(2)? == cfg.embed_dim {
                    let prefix = cfg.num_prefix_tokens();
                    let old_grid = self.grid_of(pos.dim(1)? - prefix)?;
                    let resampled =
                        resample_pos_embed(pos, prefix, old_grid, cfg.grid(), resample)?;
                    warnings.push(format!(
                        "position embedding resampled from a {}x{} to a {}x{} grid ({})",
                        old_grid.0,
                        old_grid.1,
                        cfg.grid().0,
                        cfg.grid().1,
                        match resample {
                            PosResample::Timm => "bicubic, antialias: timm",
                            PosResample::Hf => "bicubic: HuggingFace",
                        }
                    ));
                    tensors.insert("pos_embed".into(), resampled);
                }
            }
        }

        // Head of another class count.
        if let (Some(found), true) = (self.head_classes(), cfg.num_classes > 0) {
            if found != cfg.num_classes {
                let Some((w, b)) = new_head else {
                    return Err(err(format!(
                        "its head has {found} classes but the config asks for {}",
                        cfg.num_classes
                    )));
                };
                warnings.push(format!(
                    "head dropped: the checkpoint has {found} classes, the config {}; \
                     a new head is initialised",
                    cfg.num_classes
                ));
                tensors.insert("head.weight".into(), w);
                tensors.insert("head.bias".into(), b);
            }
        } else if cfg.num_classes > 0 && !tensors.contains_key("head.weight") {
            if let Some((w, b)) = new_head {
                warnings.push("the checkpoint has no head; a new head is initialised".into());
                tensors.insert("head.weight".into(), w);
                tensors.insert("head.bias".into(), b);
            }
        }
        if cfg.num_classes == 0 {
            for k in ["head.weight", "head.bias"] {
                if tensors.remove(k).is_some() {
                    warnings.push(format!("{k} ignored: the config has no head"));
                }
            }
        }

        // Every expected tensor present with its shape; nothing unexpected.
        let expected = cfg.param_shapes();
        let mut missing = Vec::new();
        for (name, shape) in &expected {
            match tensors.get(name) {
                None => missing.push(name.clone()),
                Some(t) if t.dims() != shape.as_slice() => {
                    return Err(err(format!(
                        "tensor {name}: expected {shape:?}, found {:?}",
                        t.dims()
                    )))
                }
                Some(_) => {}
            }
        }
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        let mut unexpected: Vec<&String> = tensors
            .keys()
            .filter(|k| !known.contains(k.as_str()))
            .collect();
        unexpected.sort();
        missing.sort();
        if !missing.is_empty() || !unexpected.is_empty() {
            let mut parts = Vec::new();
            if !missing.is_empty() {
                parts.push(format!("missing tensors: {}", list(&missing)));
            }
            if !unexpected.is_empty() {
                parts.push(format!("unexpected tensors: {}", list(&unexpected)));
            }
            return Err(err(format!(
                "does not fit the architecture ({})",
                parts.join("; ")
            )));
        }
        Ok((tensors, warnings))
    }

    /// The patch grid of a position embedding with `n` patch positions: from the
    /// checkpoint's own config when it has one, else square.
    fn grid_of(&self, n: usize) -> Result<(usize, usize)> {
        if let Some(c) = &self.config {
            if c.num_patches() == n {
                return Ok(c.grid());
            }
        }
        let side = (n as f64).sqrt().round() as usize;
        if side * side == n {
            return Ok((side, side));
        }
        Err(Error::Checkpoint {
            path: self.path.clone(),
            msg: format!(
                "position embedding has {n} patch positions, not a square grid, and the \
                 checkpoint does not say its image size"
            ),
        })
    }
}

/// Shortens a long list of names for a one-line message.
fn list<S: AsRef<str>>(names: &[S]) -> String {
    const SHOW: usize = 6;
    let shown: Vec<&str> = names.iter().take(SHOW).map(|s| s.as_ref()).collect();
    if names.len() > SHOW {
        format!("{} and {} more", shown.join(", "), names.len() - SHOW)
    } else {
        shown.join(", ")
    }
}

/// Resamples the patch part of a position embedding (1, prefix + gh·gw, D) to a new grid,
/// keeping the prefix (class token) rows untouched, as timm's `resample_abs_pos_embed`.
pub fn resample_pos_embed(
    pos: &Tensor,
    prefix: usize,
    old_grid: (usize, usize),
    new_grid: (usize, usize),
    mode: PosResample,
) -> Result<Tensor> {
    let (_, t, d) = pos.dims3()?;
    let (oh, ow) = old_grid;
    let (nh, nw) = new_grid;
    if t != prefix + oh * ow {
        return Err(Error::Shape {
            name: "pos_embed".into(),
            expected: vec![1, prefix + oh * ow, d],
            found: pos.dims().to_vec(),
        });
    }
    let head = pos.narrow(1, 0, prefix)?;
    // (1, gh·gw, D) → (D, gh, gw), channel-major as the resampler expects.
    let grid = pos
        .narrow(1, prefix, oh * ow)?
        .squeeze(0)?
        .t()?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let antialias = mode == PosResample::Timm;
    let out = resample::resize(
        &grid,
        d,
        oh,
        ow,
        nh,
        nw,
        resample::Interpolation::Bicubic,
        antialias,
    )
    .map_err(Error::Invalid)?;
    let out = Tensor::from_vec(out, (d, nh * nw), pos.device())?
        .t()?
        .unsqueeze(0)?; // (1, nh·nw, D)
    Ok(Tensor::cat(&[&head, &out], 1)?.contiguous()?)
}

/// What a checkpoint says about itself, written into the safetensors metadata.
#[derive(Debug, Clone, Default)]
pub struct SaveMeta<'a> {
    pub config: Option<&'a ViTConfig>,
    pub preprocess: Option<&'a Preprocess>,
    pub class_names: Option<&'a [String]>,
    /// Further string metadata (training-run facts).
    pub extra: Vec<(String, String)>,
}

/// Writes tensors (timm naming) and training state to a safetensors file atomically.
/// `train_state` tensors are stored under [`TRAIN_STATE_PREFIX`].
pub fn save(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    train_state: &HashMap<String, Tensor>,
    meta: &SaveMeta,
) -> Result<()> {
    let mut metadata: HashMap<String, String> = HashMap::new();
    metadata.insert("format".into(), "pt".into());
    let json = |v: serde_json::Result<String>| v.map_err(|e| Error::Invalid(e.to_string()));
    if let Some(c) = meta.config {
        metadata.insert(META_CONFIG.into(), json(serde_json::to_string(c))?);
    }
    if let Some(p) = meta.preprocess {
        metadata.insert(META_PREPROCESS.into(), json(serde_json::to_string(p))?);
    }
    if let Some(c) = meta.class_names {
        metadata.insert(META_CLASSES.into(), json(serde_json::to_string(c))?);
    }
    for (k, v) in &meta.extra {
        metadata.insert(k.clone(), v.clone());
    }
    let mut all: Vec<(String, Tensor)> = Vec::new();
    for (k, t) in tensors {
        all.push((k.clone(), t.contiguous()?));
    }
    for (k, t) in train_state {
        all.push((format!("{TRAIN_STATE_PREFIX}{k}"), t.contiguous()?));
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = safetensors::serialize(all.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
        .map_err(|e| Error::Invalid(format!("{}: cannot serialise: {e}", path.display())))?;
    crate::atomic::write_atomic(path, &bytes)
}

/// Output naming of [`convert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// timm names with our metadata (config, preprocessing, class names) in the header.
    Timm,
    /// HF `ViTForImageClassification` names, with `config.json` and
    /// `preprocessor_config.json` written beside the output file.
    Hf,
}

/// Reads a checkpoint in either naming and writes it in `to`'s naming. Returns the files
/// written and the warnings.
pub fn convert(
    input: &Path,
    output: &Path,
    to: Target,
    arch: &Arch,
) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let ck = Checkpoint::load(input)?;
    let cfg = ck.resolve_config(arch, None)?;
    let (tensors, warnings) = ck.fit(&cfg, PosResample::Timm, None)?;
    let pre = ck
        .preprocess
        .clone()
        .unwrap_or_else(|| Preprocess::vit_default(cfg.in_channels));
    let names = ck.class_names.as_deref();
    let mut written = vec![output.to_path_buf()];
    match to {
        Target::Timm => {
            let meta = SaveMeta {
                config: Some(&cfg),
                preprocess: Some(&pre),
                class_names: names,
                extra: vec![],
            };
            save(output, &tensors, &HashMap::new(), &meta)?;
        }
        Target::Hf => {
            let config_json = hf_config_json(&cfg, names)?;
            let hf = to_hf_names(&tensors)?;
            save(output, &hf, &HashMap::new(), &SaveMeta::default())?;
            let dir = output.parent().unwrap_or(Path::new("."));
            for (name, text) in [
                ("config.json", config_json),
                ("preprocessor_config.json", hf_preprocessor_json(&cfg, &pre)),
            ] {
                let p = dir.join(name);
                crate::atomic::write_atomic(&p, text.as_bytes())?;
                written.push(p);
            }
        }
    }
    Ok((written, warnings))
}

#[cfg(test)]
mod tests;
