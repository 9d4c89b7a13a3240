//! Checkpoints: safetensors in timm naming (ours, self-describing through metadata) and in
//! HuggingFace naming (with `config.json` beside), both directions; the paper's JAX `.npz`
//! (`npz.rs`), read; fitting a checkpoint to
//! a config (position-embedding resampling, head replacement). `weights` never builds layers.

mod hf;
pub mod hub;
mod npz;
pub mod resample;
mod timm_hub;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;

use crate::models::{Architecture, ModelConfig, Preprocess};
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
    /// The original JAX/Flax `.npz` of google-research/vision_transformer.
    Jax,
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
    pub config: Option<ModelConfig>,
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
    /// This config, used as it is (a training run's own).
    Config(ModelConfig),
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
        // A checkpoint folder (timm's or HF's layout, as on the Hub): its model.safetensors.
        let file;
        let path = if path.is_dir() {
            file = path.join("model.safetensors");
            if !file.is_file() {
                return Err(Error::Checkpoint {
                    path: path.to_path_buf(),
                    msg: "the folder holds no model.safetensors".into(),
                });
            }
            file.as_path()
        } else {
            path
        };
        if npz::is_npz(path) {
            return npz::load(path);
        }
        let bytes = read_safetensors(path).map_err(|e| as_checkpoint_error(e, path))?;
        Self::from_bytes(&bytes, path)
    }

    /// A checkpoint from the bytes of a safetensors file, checked as [`Checkpoint::load`]
    /// checks a file; `path` names it in errors and is where HF sidecars are looked for.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        let len = bytes.len() as u64;
        let n = header_len(bytes, len, path).map_err(|e| as_checkpoint_error(e, path))?;
        check_layout(&bytes[8..8 + n as usize], len, path)
            .map_err(|e| as_checkpoint_error(e, path))?;
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("not a valid safetensors file ({e})")))?;
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a valid safetensors file ({e})")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();

        let mut raw = HashMap::new();
        let mut int8 = Vec::new();
        for (name, view) in st.tensors() {
            use candle_core::safetensors::Load;
            let t = if view.dtype() == safetensors::Dtype::I8 {
                // An int8 weight (`vit quantize`): its bytes kept as u8 (candle has no i8).
                int8.push(name.clone());
                Tensor::from_raw_buffer(view.data(), DType::U8, view.shape(), &Device::Cpu)
            } else {
                view.load(&Device::Cpu)
            }
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
            } else if int8.contains(&name)
                || (t.dtype().is_float() && !name.ends_with(".attn_mask"))
            {
                let t = if t.dtype().is_float() {
                    t.to_dtype(DType::F32)?
                } else {
                    t
                };
                ck.tensors.insert(name, t);
            } else {
                // Integer tensors (BatchNorm's `num_batches_tracked`, Swin's
                // `relative_position_index`) and Swin's shifted-window `attn_mask`, which
                // older timm checkpoints hold: buffers the model computes, set aside.
                ck.ignored.push(name);
            }
        }
        if naming == Naming::Hf {
            let (tensors, ignored) = hf::from_hf_names(std::mem::take(&mut ck.tensors), path)?;
            ck.tensors = tensors;
            ck.ignored.extend(ignored);
            hf::read_sidecars(&mut ck)?;
        } else {
            ck.read_timm_config()?;
        }
        swin_original_to_timm(&mut ck.tensors);
        ck.ignored.sort();
        ck.read_metadata()?;
        Ok(ck)
    }

    /// timm's `config.json` beside a timm-named checkpoint (a timm Hub folder), when there is
    /// one: the architecture, preprocessing and class names. Our metadata, read after,
    /// overrides it.
    fn read_timm_config(&mut self) -> Result<()> {
        let p = self
            .path
            .parent()
            .unwrap_or(Path::new("."))
            .join("config.json");
        if !p.is_file() {
            return Ok(());
        }
        let text = crate::files::read_text(&p)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&p, format!("invalid JSON: {e}")))?;
        if timm_hub::is_timm_config(&v) {
            let (cfg, pre, names) = timm_hub::from_timm_config(&v, &p)?;
            self.config = Some(cfg);
            self.preprocess = pre;
            self.class_names = names;
        }
        Ok(())
    }

    fn read_metadata(&mut self) -> Result<()> {
        let path = self.path.clone();
        let parse_err = |key: &str, e: serde_json::Error| Error::Checkpoint {
            path: path.clone(),
            msg: format!("metadata '{key}' is not valid: {e}"),
        };
        if let Some(s) = self.metadata.get(META_CONFIG) {
            let cfg: ModelConfig =
                serde_json::from_str(s).map_err(|e| parse_err(META_CONFIG, e))?;
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
    pub fn resolve_config(&self, arch: &Arch, img_size: Option<usize>) -> Result<ModelConfig> {
        let mut config = match arch {
            Arch::File(p) => ModelConfig::from_file(p)?,
            Arch::Config(c) => c.clone(),
            Arch::Preset(name) => {
                let mut c = ModelConfig::preset(name)?;
                if let Some(k) = self.head_classes(c.head_names()[0]) {
                    c.set_num_classes(k);
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
            config.set_image_size([s, s]);
        }
        config.validate()?;
        Ok(config)
    }

    /// Number of classes of the checkpoint's head (`{head}.weight`), if it has one.
    pub fn head_classes(&self, head: &str) -> Option<usize> {
        self.tensors
            .get(&format!("{head}.weight"))
            .and_then(|w| w.dim(0).ok())
    }

    /// Fits the checkpoint's tensors to `cfg`: resamples the position embedding to the
    /// config's grid, replaces a head of another class count with `new_head` (when given:
    /// fresh tensors for fine-tuning; otherwise it is an error), and checks that every
    /// tensor is present with the expected shape. Returns the tensors and the warnings.
    pub fn fit(
        &self,
        cfg: &ModelConfig,
        resample: PosResample,
        new_head: Option<HashMap<String, Tensor>>,
    ) -> Result<(HashMap<String, Tensor>, Vec<String>)> {
        let mut warnings = Vec::new();
        let mut tensors = self.tensors.clone();
        let err = |msg: String| Error::Checkpoint {
            path: self.path.clone(),
            msg,
        };

        let expected = cfg.state_shapes();
        let shape_of = |name: &str| expected.iter().find(|(n, _)| n == name).map(|(_, s)| s);

        // A distilled DeiT checkpoint for a config without its token (or the reverse) would
        // otherwise fail on the position embedding's token count.
        let wants_dist = shape_of("dist_token").is_some();
        if tensors.contains_key("dist_token") != wants_dist {
            return Err(err(if wants_dist {
                "the config is a distilled DeiT but the checkpoint has no dist_token: use the \
                 preset without `distilled` (e.g. deit_tiny_patch16_224)"
                    .into()
            } else {
                "the checkpoint is a distilled DeiT (it has dist_token and head_dist): use a \
                 deit_*_distilled_* preset, or distilled = true in the config"
                    .into()
            }));
        }
        // Likewise a hybrid ViT's checkpoint for a plain ViT's config, or the reverse, would
        // fail on the patch projection's shape.
        let is_backbone = |n: &String| n.starts_with("patch_embed.backbone.");
        let wants_backbone = cfg.as_vit().is_some_and(|v| v.backbone.is_some());
        let has_backbone = tensors.keys().any(is_backbone);
        if cfg.as_vit().is_some() && has_backbone != wants_backbone {
            return Err(err(if wants_backbone {
                "the config is a hybrid ViT (a backbone) but the checkpoint has no \
                 patch_embed.backbone tensors: use a plain ViT preset or config"
                    .into()
            } else {
                "the checkpoint is a hybrid ViT (it has patch_embed.backbone tensors): use a \
                 hybrid preset (vit_*_r*, hybrid_*) or a [model.backbone] table in the config"
                    .into()
            }));
        }

        // A position embedding of another grid is resampled to the config's grid, once
        // everything else is known to fit: the resampled one is as large as the config
        // says, which a small file naming a large model must not get to allocate.
        let tokens = cfg.tokens();
        let resample_pos = match (tokens, shape_of("pos_embed"), tensors.get("pos_embed")) {
            (Some(tokens), Some(want), Some(pos)) => {
                pos.rank() == 3
                    && pos.dim(1)? != want[1]
                    && pos.dim(2)? == want[2]
                    && pos.dim(1)? > tokens.prefix
            }
            _ => false,
        };

        // Heads of another class count (or absent).
        let num_classes = cfg.num_classes();
        for head in cfg.head_names() {
            let (head_w, head_b) = (format!("{head}.weight"), format!("{head}.bias"));
            let fresh = new_head
                .as_ref()
                .and_then(|t| Some((t.get(&head_w)?.clone(), t.get(&head_b)?.clone())));
            if num_classes == 0 {
                for k in [&head_w, &head_b] {
                    if tensors.remove(k).is_some() {
                        warnings.push(format!("{k} ignored: the config has no head"));
                    }
                }
                continue;
            }
            let replace = match self.head_classes(head) {
                Some(found) if found != num_classes => {
                    if fresh.is_none() {
                        return Err(err(format!(
                            "its {head} has {found} classes but the config asks for \
                             {num_classes}"
                        )));
                    }
                    Some(format!(
                        "{head} dropped: the checkpoint has {found} classes, the config \
                         {num_classes}; a new {head} is initialised"
                    ))
                }
                Some(_) => None,
                None if !tensors.contains_key(&head_w) && fresh.is_some() => Some(format!(
                    "the checkpoint has no {head}; a new {head} is initialised"
                )),
                None => None,
            };
            if let (Some(warning), Some((w, b))) = (replace, fresh) {
                warnings.push(warning);
                tensors.insert(head_w, w);
                tensors.insert(head_b, b);
            }
        }

        // Every expected tensor present with its shape (a position embedding to resample:
        // after resampling); nothing unexpected.
        let mut missing = Vec::new();
        for (name, shape) in &expected {
            match tensors.get(name) {
                None => missing.push(name.clone()),
                Some(_) if resample_pos && name == "pos_embed" => {}
                Some(t) if t.dims() != shape.as_slice() => {
                    // A Swin's table is sized by its window, which a stage smaller than the
                    // window shrinks to the stage's map.
                    let hint = if name.ends_with("relative_position_bias_table") {
                        ": at this image size the block's attention window differs from the \
                         checkpoint's; use the image size it was trained at (resizing \
                         relative position tables is not supported)"
                    } else {
                        ""
                    };
                    return Err(err(format!(
                        "tensor {name}: expected {shape:?}, found {:?}{hint}",
                        t.dims()
                    )));
                }
                Some(_) => {}
            }
        }
        // An int8 checkpoint (`vit quantize`): each int8 weight with its per-channel scales
        // beside it, and only in layers that run on the int8 kernels (any other layer would
        // read the bytes as numbers).
        let mut scales = Vec::new();
        for (name, t) in &tensors {
            if t.dtype() != DType::U8 {
                continue;
            }
            if !crate::quant::quantizable(cfg, name) {
                return Err(err(format!(
                    "tensor {name} is int8, but only a ViT's patch projection and the linear layers of its blocks (qkv, \
                     proj, fc1, fc2) can be"
                )));
            }
            // Static activations: the calibrated input range beside it, if any.
            let range = int8_input_range_name(name);
            if let Some(r) = tensors.get(&range) {
                if r.dtype() != DType::F32 || r.dims() != [2] {
                    return Err(err(format!(
                        "tensor {range}: expected f32 [2], found {:?} {:?}",
                        r.dtype(),
                        r.dims()
                    )));
                }
                scales.push(range);
            }
            let scale = int8_scale_name(name);
            match tensors.get(&scale) {
                Some(s) if s.dtype() == DType::F32 && s.dims() == [t.dim(0)?] => {}
                Some(s) => {
                    return Err(err(format!(
                        "tensor {scale}: expected f32 [{}], found {:?} {:?}",
                        t.dim(0)?,
                        s.dtype(),
                        s.dims()
                    )))
                }
                None => {
                    return Err(err(format!(
                        "tensor {name} is int8 but its scales {scale} are missing"
                    )))
                }
            }
            scales.push(scale);
        }
        scales.sort();
        let known: std::collections::HashSet<&str> = expected
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(scales.iter().map(|s| s.as_str()))
            .collect();
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
        if let (true, Some(tokens), Some(want)) = (resample_pos, tokens, shape_of("pos_embed")) {
            let pos = &tensors["pos_embed"];
            let prefix = tokens.prefix;
            let old_grid = self.grid_of(pos.dim(1)? - prefix)?;
            let resampled = resample_pos_embed(pos, prefix, old_grid, tokens.grid, resample)?;
            if resampled.dims() != want.as_slice() {
                return Err(err(format!(
                    "tensor pos_embed: expected {want:?}, found {:?} after resampling",
                    resampled.dims()
                )));
            }
            warnings.push(format!(
                "position embedding resampled from a {}x{} to a {}x{} grid ({})",
                old_grid.0,
                old_grid.1,
                tokens.grid.0,
                tokens.grid.1,
                match resample {
                    PosResample::Timm => "bicubic, antialias: timm",
                    PosResample::Hf => "bicubic: HuggingFace",
                }
            ));
            tensors.insert("pos_embed".into(), resampled);
        }
        // One pass over the values: a NaN or an infinity in a weight would only show as a
        // meaningless output later.
        for name in expected.iter().map(|(n, _)| n).chain(&scales) {
            let t = &tensors[name];
            let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(err(format!(
                    "tensor {name} holds a non-finite value ({} at flat index {i})",
                    values[i]
                )));
            }
        }
        Ok((tensors, warnings))
    }

    /// The patch grid of a position embedding with `n` patch positions: from the
    /// checkpoint's own config when it has one, else square.
    fn grid_of(&self, n: usize) -> Result<(usize, usize)> {
        if let Some(t) = self.config.as_ref().and_then(|c| c.tokens()) {
            if t.grid.0 * t.grid.1 == n {
                return Ok(t.grid);
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

impl Fitted {
    /// The evaluation preprocessing of this checkpoint read as `arch`: its own, else the
    /// preset's pretrained one (timm's `pretrained_cfg`), else the architecture's default.
    pub fn preprocess(&self, arch: &Arch) -> Preprocess {
        let preset = match arch {
            Arch::Preset(name) => crate::models::preset_preprocess(name),
            _ => None,
        };
        self.checkpoint
            .preprocess
            .clone()
            .or(preset)
            .unwrap_or_else(|| self.config.default_preprocess())
    }

    /// Whether the checkpoint holds int8 weights (`vit quantize`).
    pub fn is_int8(&self) -> bool {
        self.tensors.values().any(|t| t.dtype() == DType::U8)
    }

    /// An error for an int8 checkpoint given to a command that needs f32 weights (`what`:
    /// "training", "ONNX export", ...).
    pub fn require_f32(&self, what: &str) -> Result<()> {
        if self.is_int8() {
            return Err(Error::Checkpoint {
                path: self.checkpoint.path.clone(),
                msg: format!(
                    "an int8 checkpoint (vit quantize) runs inference only; {what} needs the \
                     f32 checkpoint it was quantized from"
                ),
            });
        }
        Ok(())
    }
}

/// Options of [`load_fitted`].
#[derive(Debug, Clone, Default)]
pub struct FitOptions {
    /// Square input size overriding the config's (the position embedding is resampled).
    pub img_size: Option<usize>,
    pub resample: PosResample,
    /// Fresh head tensors by name (`head.weight`, `head.bias`, and those of every other
    /// head the config has) for heads of another class count (fine-tuning).
    pub new_head: Option<HashMap<String, Tensor>>,
}

/// A checkpoint fitted to the config it runs with.
#[derive(Debug)]
pub struct Fitted {
    /// The checkpoint as read (metadata, training state, ignored tensors).
    pub checkpoint: Checkpoint,
    pub config: ModelConfig,
    /// Model parameters in timm naming, fitting `config` exactly.
    pub tensors: HashMap<String, Tensor>,
    /// Things the user should know (resampled position embedding, replaced head).
    pub warnings: Vec<String>,
}

/// Checkpoint → config → fit: reads `path`, resolves its architecture from `arch` and fits
/// its tensors to it ([`Checkpoint::fit`]). The one way every command turns a weights file
/// into the tensors of a model.
pub fn load_fitted(path: &Path, arch: &Arch, opts: FitOptions) -> Result<Fitted> {
    let checkpoint = Checkpoint::load(path)?;
    let config = checkpoint.resolve_config(arch, opts.img_size)?;
    let (tensors, warnings) = checkpoint.fit(&config, opts.resample, opts.new_head)?;
    Ok(Fitted {
        checkpoint,
        config,
        tensors,
        warnings,
    })
}

/// The bytes of a safetensors file, checked before they are read: a regular file whose
/// 8-byte header length is within the format's 100 MB limit and whose header and tensor
/// data, as the header lays them out, are exactly the file's size. So a device, a pipe, a
/// file of zeros or a header claiming more than the file holds costs no memory.
fn read_safetensors(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let (mut file, len) = crate::files::open_regular(path)?;
    let mut first = [0u8; 8];
    // Fewer than 8 bytes: none, which `header_len` refuses.
    let got = if file.read_exact(&mut first).is_ok() {
        8
    } else {
        0
    };
    let n = header_len(&first[..got], len, path)?;
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    check_layout(&header, len, path)?;
    let (file, len) = crate::files::open_regular(path)?;
    crate::files::read_exactly(file, len, path)
}

/// The header length that the first bytes of a safetensors file of `len` bytes give:
/// positive, within the format's 100 MB limit and within the file.
fn header_len(first: &[u8], len: u64, path: &Path) -> Result<u64> {
    const MAX_HEADER: u64 = 100_000_000;
    let bad = |msg: String| Error::format(path, msg);
    let Some(n) = first.first_chunk::<8>() else {
        return Err(bad(format!(
            "not a valid safetensors file ({len} bytes, no header)"
        )));
    };
    let n = u64::from_le_bytes(*n);
    if n == 0 || n > MAX_HEADER || n > len.saturating_sub(8) {
        return Err(bad(format!(
            "not a valid safetensors file (header length {n} in a file of {len} bytes)"
        )));
    }
    Ok(n)
}

/// Checks that a safetensors header (the JSON after the 8-byte length) lays out tensor
/// data ending exactly at the end of the file of `len` bytes.
fn check_layout(header: &[u8], len: u64, path: &Path) -> Result<()> {
    let bad = |msg: String| Error::format(path, msg);
    let n = header.len() as u64;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| bad(format!("not a valid safetensors file (header: {e})")))?;
    let data_end = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    // An offset near u64::MAX must not wrap around to the file's length.
    let Some(laid_out) = data_end.checked_add(8 + n) else {
        return Err(bad(format!(
            "not a valid safetensors file (its header lays out more than 2^64 bytes, \
             the file has {len})"
        )));
    };
    if laid_out != len {
        return Err(bad(format!(
            "not a valid safetensors file (its header lays out {laid_out} bytes, the file has \
             {len})"
        )));
    }
    Ok(())
}

/// A format error about a checkpoint's bytes as a checkpoint error naming `path`.
fn as_checkpoint_error(e: Error, path: &Path) -> Error {
    match e {
        Error::Format { msg, .. } => Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        },
        e => e,
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
    pub config: Option<&'a ModelConfig>,
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
    let stored = all.iter().map(|(k, t)| {
        let int8 = t.dtype() == DType::U8 && tensors.contains_key(&int8_scale_name(k));
        (k.as_str(), Stored { t, int8 })
    });
    let bytes = safetensors::serialize(stored, Some(metadata))
        .map_err(|e| Error::Invalid(format!("{}: cannot serialise: {e}", path.display())))?;
    crate::atomic::write_atomic(path, &bytes)
}

/// The name of the per-channel scales beside an int8 weight `name` (`X.weight` →
/// `X.weight_scale`).
pub fn int8_scale_name(name: &str) -> String {
    format!("{name}_scale")
}

/// The name of the calibrated input range of the int8 layer whose weight is `name`
/// (`X.weight` → `X.input_range`; `layers::Linear` reads it, and the tests check the two
/// agree).
pub fn int8_input_range_name(name: &str) -> String {
    format!(
        "{}.input_range",
        name.strip_suffix(".weight").unwrap_or(name)
    )
}

/// A tensor as [`save`] stores it: as is, or (an int8 weight, held as u8 bytes) as I8.
struct Stored<'a> {
    t: &'a Tensor,
    int8: bool,
}

impl safetensors::View for Stored<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        if self.int8 {
            safetensors::Dtype::I8
        } else {
            safetensors::View::dtype(self.t)
        }
    }
    fn shape(&self) -> &[usize] {
        self.t.dims()
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        safetensors::View::data(self.t)
    }
    fn data_len(&self) -> usize {
        safetensors::View::data_len(self.t)
    }
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

/// Reads a checkpoint in either naming and writes it in `to`'s naming, creating the output
/// file's folder if missing. Returns the files written and the warnings.
pub fn convert(
    input: &Path,
    output: &Path,
    to: Target,
    arch: &Arch,
) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let fitted = load_fitted(input, arch, FitOptions::default())?;
    fitted.require_f32("vit convert")?;
    let pre = fitted.preprocess(arch);
    let Fitted {
        checkpoint: ck,
        config: cfg,
        tensors,
        warnings,
    } = fitted;
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
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
            let vit = cfg.as_vit().ok_or_else(|| {
                Error::Invalid(format!(
                    "HuggingFace's ViT naming has no {} models; convert to timm",
                    cfg.arch()
                ))
            })?;
            let config_json = hf_config_json(vit, names)?;
            let hf = to_hf_names(&tensors)?;
            save(output, &hf, &HashMap::new(), &SaveMeta::default())?;
            let dir = output.parent().unwrap_or(Path::new("."));
            for (name, text) in [
                ("config.json", config_json),
                ("preprocessor_config.json", hf_preprocessor_json(vit, &pre)),
            ] {
                let p = dir.join(name);
                crate::atomic::write_atomic(&p, text.as_bytes())?;
                written.push(p);
            }
        }
    }
    Ok((written, warnings))
}

/// The original Swin Transformer checkpoints (Microsoft's) put patch merging at the end of a
/// stage (`layers.0.downsample` exists) and the classifier at `head`; timm puts it at the
/// start of the next stage and the classifier at `head.fc`. Renamed as timm's
/// `checkpoint_filter_fn` does; any other checkpoint is left as it is.
fn swin_original_to_timm(tensors: &mut HashMap<String, Tensor>) {
    if !tensors.contains_key("layers.0.downsample.reduction.weight") {
        return;
    }
    let renamed: Vec<(String, String)> = tensors
        .keys()
        .filter_map(|k| {
            if let Some(rest) = k.strip_prefix("head.") {
                return Some((k.clone(), format!("head.fc.{rest}")));
            }
            let rest = k.strip_prefix("layers.")?;
            let (stage, tail) = rest.split_once('.')?;
            let stage: usize = stage.parse().ok()?;
            tail.starts_with("downsample.")
                .then(|| (k.clone(), format!("layers.{}.{tail}", stage + 1)))
        })
        .collect();
    let moved: Vec<(String, Tensor)> = renamed
        .into_iter()
        .filter_map(|(old, new)| Some((new, tensors.remove(&old)?)))
        .collect();
    tensors.extend(moved);
}

#[cfg(test)]
mod tests;
