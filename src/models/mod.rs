//! The model family. Each architecture is one file (`vit.rs`, ...) built from the shared
//! layers in `layers.rs`; its config implements [`Architecture`] (what the tool knows of it
//! without building it) and its network implements [`Classifier`] (what the tool runs).
//! [`ModelConfig`] is the tagged union of all configs (`arch = "vit"`), and the registry
//! below maps preset names to configs. The rest of the tool uses only these two traits.
//!
//! Adding an architecture: a file here with its config (`Architecture`), its network
//! (`Classifier`) and its `PRESETS` table, then one line in each of the three registry
//! places marked `registry:` below (the variant, the `each_arch!` arm, the table chained
//! in `registry()`).

pub mod cnn;
pub mod hybrid;
pub mod layers;
mod preprocess;
pub mod pvt;
pub mod resnet;
pub mod swin;
pub mod vit;

use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Error, Result};

pub use cnn::{CnnConfig, SimpleCnn};
pub use layers::Mode;
pub use preprocess::Preprocess;
pub use pvt::{PvtConfig, PyramidVisionTransformer};
pub use resnet::{ResNet, ResNetConfig};
pub use swin::{SwinConfig, SwinTransformer};
pub use vit::{ViTConfig, VisionTransformer};

/// How a model's tokens lie on the image, for models that cut it into patches: what
/// attention maps, position-embedding pictures and position-embedding resampling need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tokens {
    /// Tokens in front of the patches (class, distillation).
    pub prefix: usize,
    /// Patch grid (rows, columns).
    pub grid: (usize, usize),
    /// Side of a patch in pixels.
    pub patch_size: usize,
    /// Whether the model has a learned `pos_embed` of shape (1, prefix + rows·cols, D).
    pub learned_pos_embed: bool,
}

/// What every architecture's config tells the tool without building the network.
pub trait Architecture {
    /// Checks that the numbers fit together; errors name the fields.
    fn validate(&self) -> Result<()>;
    /// Input size [height, width] in pixels.
    fn image_size(&self) -> [usize; 2];
    fn set_image_size(&mut self, size: [usize; 2]);
    fn in_channels(&self) -> usize;
    /// Classes of the head; 0 means no head (the model returns pooled features).
    fn num_classes(&self) -> usize;
    fn set_num_classes(&mut self, k: usize);
    /// Stochastic-depth rate (of the deepest block).
    fn set_drop_path(&mut self, rate: f64);
    /// Every parameter with its shape, in timm naming and timm's state-dict order. The one
    /// place that knows which trainable tensors a config implies.
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)>;
    /// Every buffer with its shape: state that is saved and loaded with the parameters but
    /// not trained by the optimizer (BatchNorm's running statistics, timm naming).
    fn buffer_shapes(&self) -> Vec<(String, Vec<usize>)> {
        vec![]
    }
    /// The classifier heads' parameter prefixes, the main one first (`head` as timm's ViT:
    /// `head.weight`, `head.bias`; DeiT adds `head_dist`).
    fn head_names(&self) -> Vec<&'static str> {
        vec!["head"]
    }
    /// The token layout, for models made of patch tokens.
    fn tokens(&self) -> Option<Tokens> {
        None
    }
    /// Blocks that [`Classifier::forward_intermediates`] indexes.
    fn depth(&self) -> usize;
    /// Heads of every block's global self-attention over all tokens, for models that have
    /// one (what attention maps and rollout draw).
    fn attention_heads(&self) -> Option<usize> {
        None
    }
    /// Forward-pass floating-point operations for one image (a multiply-add counts 2).
    fn flops(&self) -> u64;
    /// How one image's shape changes through the network: (stage, shape without batch).
    fn shape_flow(&self) -> Vec<(String, Vec<usize>)>;
    /// The evaluation preprocessing when a checkpoint does not say.
    fn default_preprocess(&self) -> Preprocess;
    /// Fresh parameters (and buffers) as timm initialises them, drawn from a portable seeded
    /// generator.
    fn init_params(&self, seed: u64, dev: &Device) -> Result<Vec<(String, Tensor)>>;
    /// Builds the network from tensors in timm naming.
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Classifier>>;
}

/// What [`Classifier::forward_intermediates`] returns.
#[derive(Debug, Clone)]
pub struct Intermediates {
    /// (B, classes), or pooled features without a head.
    pub logits: Tensor,
    /// The output of each requested block, in the order asked.
    pub blocks: Vec<Tensor>,
    /// The attention probabilities (B, heads, T, T) of each requested block, in the order
    /// asked; empty for models without attention.
    pub attention: Vec<Tensor>,
}

/// What [`Classifier::local_attention`] returns for one block of a model whose attention
/// is not over one global set of tokens (Swin's windows, PVT's reduced keys).
#[derive(Debug, Clone)]
pub struct LocalAttention {
    /// The block in timm's naming (`layers.1.blocks.0`).
    pub name: String,
    /// (B, heads, h, w) over the map of the block's keys: for each key, the attention it
    /// receives averaged over the queries that see it (Swin: the queries of its window,
    /// with the shift undone; PVT: every query of the stage, over the reduced map).
    pub received: Tensor,
    pub cells: Cells,
}

/// How a [`LocalAttention`]'s keys lie on the block's token map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cells {
    /// Swin: a key per token; windows of `size` (rows, columns) tokens, shifted by `shift`.
    Windows {
        size: (usize, usize),
        shift: (usize, usize),
    },
    /// PVT: a key per `ratio`×`ratio` tokens of the map (spatial reduction).
    Reduced { ratio: usize },
}

/// A network that classifies images, as the tool runs it. Forward passes follow timm:
/// `forward_features` (image → features), `forward_head` (features → logits), `forward`
/// (both); the `_t` forms take the [`Mode`] (training draws dropout from its stream).
pub trait Classifier: Send + Sync + std::fmt::Debug {
    /// The architecture this network was built from.
    fn config(&self) -> ModelConfig;
    fn forward_features_t(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor>;
    fn forward_head_t(&self, feats: &Tensor, mode: &mut Mode) -> Result<Tensor>;
    /// Evaluation forward that also returns what the blocks listed in `indices` (0-based)
    /// computed (timm's `forward_intermediates`, DINOv2's `get_intermediate_layers`).
    fn forward_intermediates(&self, x: &Tensor, indices: &[usize]) -> Result<Intermediates>;
    /// For models whose attention is not over one global set of tokens (Swin, PVT):
    /// evaluation logits and every block's [`LocalAttention`], in order. `None` for the
    /// others.
    fn local_attention(&self, _x: &Tensor) -> Result<Option<(Tensor, Vec<LocalAttention>)>> {
        Ok(None)
    }
    /// The position embedding (1, T, D) added to the tokens, for models that have one.
    fn pos_embed(&self) -> Option<&Tensor> {
        None
    }

    /// The network as stem → blocks → head, each part callable on its own, for gradient
    /// checkpointing (`train::step`); `None` for models not built that way.
    fn staged(&self) -> Option<&dyn Staged> {
        None
    }

    /// The model's BatchNorm layers, whose running statistics the training step moves once
    /// per micro-batch (see [`layers::BatchNorm2d`]); none for models without BatchNorm.
    fn batch_norms(&self) -> Vec<&layers::BatchNorm2d> {
        vec![]
    }

    /// Training with a teacher (DeiT): images → the logits of the class head and of the
    /// distillation head, each (B, classes). A model without a distillation head gives its
    /// logits twice, as DeiT's loss then treats them.
    fn forward_heads_t(&self, x: &Tensor, mode: &mut Mode) -> Result<(Tensor, Tensor)> {
        let logits = self.forward_t(x, mode)?;
        Ok((logits.clone(), logits))
    }

    /// Images (B, C, H, W) → logits (B, classes), in `mode`.
    fn forward_t(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let feats = self.forward_features_t(x, mode)?;
        self.forward_head_t(&feats, mode)
    }
    /// Images (B, C, H, W) → logits (B, classes), in evaluation mode.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, &mut Mode::Eval)
    }
    fn forward_features(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_features_t(x, &mut Mode::Eval)
    }
    fn forward_head(&self, feats: &Tensor) -> Result<Tensor> {
        self.forward_head_t(feats, &mut Mode::Eval)
    }
}

/// A network that runs as a stem, a chain of blocks and a head, each part on its own:
/// `head(block_{L-1}(… block_0(stem(x))))` is the training forward, drawing from `mode`'s
/// random stream in that order. Gradient checkpointing keeps only the blocks' inputs and
/// recomputes each block in backward (timm's `checkpoint_seq`).
pub trait Staged: Send + Sync {
    /// Images (B, C, H, W) → the first block's input (tokens).
    fn stem(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor>;
    fn num_blocks(&self) -> usize;
    /// Block `i` (0-based) on its input.
    fn block(&self, i: usize, x: &Tensor, mode: &mut Mode) -> Result<Tensor>;
    /// The last block's output → the logits of the class head and of the distillation head
    /// (the same logits twice without one), as [`Classifier::forward_heads_t`].
    fn heads(&self, x: &Tensor, mode: &mut Mode) -> Result<(Tensor, Tensor)>;
}

/// Serde defaults the architectures' configs share: 3 input channels, flags on, an MLP 4
/// times as wide as its input.
fn default_channels() -> usize {
    3
}
fn default_true() -> bool {
    true
}
fn default_mlp_ratio() -> f64 {
    4.0
}

/// Stochastic-depth rate of block `j` of `total`: linear from 0 to `rate`
/// (`torch.linspace(0, rate, total)`, as timm's hierarchical models).
fn linear_rate(rate: f64, j: usize, total: usize) -> f64 {
    if total <= 1 {
        return 0.0;
    }
    rate * j as f64 / (total - 1) as f64
}

/// 2·Π`dims` (the FLOPs of that many multiply-adds), `None` beyond u64.
fn mul_add_flops(dims: &[usize]) -> Option<u64> {
    dims.iter()
        .try_fold(2u64, |acc, &x| acc.checked_mul(x as u64))
}

/// A config error unless `depths` (the field `depths_name`) lists 1 to 8 stages of 1 to 64
/// blocks each and every `(field, length)` of `per_stage` gives one value per stage.
fn check_stages(depths_name: &str, depths: &[usize], per_stage: &[(&str, usize)]) -> Result<()> {
    let stages = depths.len();
    if !(1..=8).contains(&stages) {
        return Err(Error::Config(format!(
            "{depths_name} must list 1 to 8 stages, got {stages}"
        )));
    }
    if let Some((name, len)) = per_stage.iter().find(|(_, len)| *len != stages) {
        return Err(Error::Config(format!(
            "{name} must give one value per stage: {depths_name} has {stages}, {name} {len}"
        )));
    }
    match depths.iter().find(|&&n| !(1..=64).contains(&n)) {
        Some(n) => Err(Error::Config(format!(
            "each stage must have 1 to 64 blocks, got {n}"
        ))),
        None => Ok(()),
    }
}

/// An error unless `x` is a batch (B, C, H, W) of the config's channels and image size.
fn check_images(x: &Tensor, cfg: &impl Architecture) -> Result<()> {
    let [h, w] = cfg.image_size();
    let want = [cfg.in_channels(), h, w];
    let dims = x.dims();
    if dims.len() != 4 || dims[1..] != want {
        return Err(Error::Shape {
            name: "input images".into(),
            expected: vec![0, want[0], want[1], want[2]],
            found: dims.to_vec(),
        });
    }
    Ok(())
}

/// Any architecture's config, tagged by `arch` in TOML and JSON (`arch = "vit"`). A config
/// without the tag is a ViT: recipes and checkpoints written before the tag load unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "snake_case", remote = "Self")]
pub enum ModelConfig {
    // registry: one variant per architecture.
    Vit(ViTConfig),
    Cnn(CnnConfig),
    Resnet(ResNetConfig),
    Swin(SwinConfig),
    Pvt(PvtConfig),
}

/// `match` over the variants of [`ModelConfig`], binding the inner config to `$c`.
macro_rules! each_arch {
    ($self:expr, $c:ident => $body:expr) => {
        match $self {
            // registry: one arm per architecture.
            ModelConfig::Vit($c) => $body,
            ModelConfig::Cnn($c) => $body,
            ModelConfig::Resnet($c) => $body,
            ModelConfig::Swin($c) => $body,
            ModelConfig::Pvt($c) => $body,
        }
    };
}

/// The [`Architecture`] accessors of a config with the fields `image_size`, `in_channels`
/// and `num_classes` (every architecture's): expands inside its `impl Architecture`.
macro_rules! input_and_classes_fields {
    () => {
        fn image_size(&self) -> [usize; 2] {
            self.image_size
        }
        fn set_image_size(&mut self, size: [usize; 2]) {
            self.image_size = size;
        }
        fn in_channels(&self) -> usize {
            self.in_channels
        }
        fn num_classes(&self) -> usize {
            self.num_classes
        }
        fn set_num_classes(&mut self, k: usize) {
            self.num_classes = k;
        }
    };
}
use input_and_classes_fields;

/// A named preset of an architecture's config `C`.
pub struct Preset<C> {
    pub name: &'static str,
    pub config: fn() -> C,
    /// How the preset's pretrained weights expect images (timm's `pretrained_cfg`: mean,
    /// std, crop fraction, interpolation), for checkpoints that do not say.
    pub pretrained: fn(&C) -> Preprocess,
}

/// Every preset of every architecture, in the order `vit info` lists them.
pub fn presets() -> impl Iterator<Item = (&'static str, ModelConfig)> {
    registry().map(|(name, _, config)| (name, config))
}

/// The preprocessing a preset's pretrained weights expect; `None` for an unknown name.
pub fn preset_preprocess(name: &str) -> Option<Preprocess> {
    registry()
        .find(|(n, _, _)| *n == name)
        .map(|(_, pre, _)| pre)
}

/// (name, pretrained preprocessing, config) of every preset.
fn registry() -> impl Iterator<Item = (&'static str, Preprocess, ModelConfig)> {
    // registry: one table per architecture (`.chain` the next one).
    vit::PRESETS
        .iter()
        .map(|p| {
            let c = (p.config)();
            (p.name, (p.pretrained)(&c), ModelConfig::Vit(c))
        })
        .chain(cnn::PRESETS.iter().map(|p| {
            let c = (p.config)();
            (p.name, (p.pretrained)(&c), ModelConfig::Cnn(c))
        }))
        .chain(resnet::PRESETS.iter().map(|p| {
            let c = (p.config)();
            (p.name, (p.pretrained)(&c), ModelConfig::Resnet(c))
        }))
        .chain(swin::PRESETS.iter().map(|p| {
            let c = (p.config)();
            (p.name, (p.pretrained)(&c), ModelConfig::Swin(c))
        }))
        .chain(pvt::PRESETS.iter().map(|p| {
            let c = (p.config)();
            (p.name, (p.pretrained)(&c), ModelConfig::Pvt(c))
        }))
}

/// Up to three known names closest to `name` (edit distance), for "did you mean".
fn closest<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut scored: Vec<(usize, &str)> = known.map(|k| (edit_distance(name, k), k)).collect();
    scored.sort();
    let limit = (name.chars().count() / 3).max(2);
    scored
        .into_iter()
        .take_while(|(d, _)| *d <= limit)
        .take(3)
        .map(|(_, k)| k)
        .collect()
}

/// Levenshtein distance between two strings, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1)
                .min(row[j] + 1)
                .min(diag + usize::from(ca != *cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

impl Serialize for ModelConfig {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        ModelConfig::serialize(self, s)
    }
}

impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        // Read as a TOML value from any format (it keeps NaN and infinities, which
        // `validate` then names by field), the tag added when missing, then as the enum.
        let mut v = toml::Value::deserialize(d)?;
        if let Some(fields) = v.as_table_mut() {
            fields.entry("arch").or_insert_with(|| "vit".into());
        }
        ModelConfig::deserialize(v).map_err(serde::de::Error::custom)
    }
}

impl ModelConfig {
    /// A named preset (see [`presets`]); an unknown name suggests the closest ones and
    /// lists all.
    pub fn preset(name: &str) -> Result<Self> {
        if let Some((_, c)) = presets().find(|(n, _)| *n == name) {
            return Ok(c);
        }
        let near = closest(name, presets().map(|(n, _)| n));
        let mean = if near.is_empty() {
            String::new()
        } else {
            format!("; did you mean {}?", near.join(" or "))
        };
        Err(Error::Unknown {
            kind: "preset",
            name: name.to_string(),
            hint: format!(
                "{mean} (known: {})",
                presets().map(|(n, _)| n).collect::<Vec<_>>().join(", ")
            ),
        })
    }

    /// Reads a config from a `.toml` or `.json` file and validates it.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_text(&crate::files::read_text(path)?, path)
    }

    /// Parses and validates a config's text as [`ModelConfig::from_file`] does: JSON when
    /// `path` ends in `.json`, else TOML; `path` names it in errors.
    pub fn from_text(text: &str, path: &Path) -> Result<Self> {
        let is_json = path.extension().is_some_and(|e| e == "json");
        let cfg: ModelConfig = if is_json {
            serde_json::from_str(text).map_err(|e| Error::format(path, e.to_string()))?
        } else {
            toml::from_str(text).map_err(|e| Error::format(path, one_line(&e.to_string())))?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The architecture's name as in the `arch` tag.
    pub fn arch(&self) -> &'static str {
        match self {
            ModelConfig::Vit(_) => "vit",
            ModelConfig::Cnn(_) => "cnn",
            ModelConfig::Resnet(_) => "resnet",
            ModelConfig::Swin(_) => "swin",
            ModelConfig::Pvt(_) => "pvt",
        }
    }

    /// The ViT config, for what only a plain ViT has (HuggingFace's naming).
    pub fn as_vit(&self) -> Option<&ViTConfig> {
        match self {
            ModelConfig::Vit(c) => Some(c),
            ModelConfig::Cnn(_)
            | ModelConfig::Resnet(_)
            | ModelConfig::Swin(_)
            | ModelConfig::Pvt(_) => None,
        }
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Parameters and buffers: every tensor a checkpoint of this config holds.
    pub fn state_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut all = self.param_shapes();
        all.extend(self.buffer_shapes());
        all
    }

    /// Parameter counts per top-level module in state-dict order; a numbered sequence
    /// (`blocks.3`, `layer1.0`) counts per element.
    pub fn param_groups(&self) -> Vec<(String, usize)> {
        let mut groups: Vec<(String, usize)> = Vec::new();
        for (name, shape) in self.param_shapes() {
            // A hybrid ViT's backbone counts its stem and each stage apart.
            let (prefix, rest) = match name.strip_prefix("patch_embed.backbone.") {
                Some(rest) if rest.starts_with("stages.") => ("patch_embed.backbone.", rest),
                Some(_) => ("patch_embed.backbone.", "stem"),
                None => ("", name.as_str()),
            };
            let parts: Vec<&str> = rest.split('.').collect();
            let key = match parts.get(1) {
                Some(i) if i.parse::<usize>().is_ok() => format!("{prefix}{}.{i}", parts[0]),
                _ => format!("{prefix}{}", parts[0]),
            };
            let n: usize = shape.iter().product();
            match groups.last_mut() {
                Some((k, c)) if *k == key => *c += n,
                _ => groups.push((key, n)),
            }
        }
        groups
    }

    /// Fresh parameters ([`Architecture::init_params`]) as a network.
    pub fn init_model(&self, seed: u64, dev: &Device) -> Result<Box<dyn Classifier>> {
        let params = self.init_params(seed, dev)?.into_iter().collect();
        self.build(VarBuilder::from_tensors(
            params,
            candle_core::DType::F32,
            dev,
        ))
    }
}

impl Architecture for ModelConfig {
    fn validate(&self) -> Result<()> {
        each_arch!(self, c => c.validate())
    }
    fn image_size(&self) -> [usize; 2] {
        each_arch!(self, c => c.image_size())
    }
    fn set_image_size(&mut self, size: [usize; 2]) {
        each_arch!(self, c => c.set_image_size(size))
    }
    fn in_channels(&self) -> usize {
        each_arch!(self, c => c.in_channels())
    }
    fn num_classes(&self) -> usize {
        each_arch!(self, c => Architecture::num_classes(c))
    }
    fn set_num_classes(&mut self, k: usize) {
        each_arch!(self, c => c.set_num_classes(k))
    }
    fn set_drop_path(&mut self, rate: f64) {
        each_arch!(self, c => c.set_drop_path(rate))
    }
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        each_arch!(self, c => Architecture::param_shapes(c))
    }
    fn buffer_shapes(&self) -> Vec<(String, Vec<usize>)> {
        each_arch!(self, c => Architecture::buffer_shapes(c))
    }
    fn head_names(&self) -> Vec<&'static str> {
        each_arch!(self, c => Architecture::head_names(c))
    }
    fn tokens(&self) -> Option<Tokens> {
        each_arch!(self, c => c.tokens())
    }
    fn depth(&self) -> usize {
        each_arch!(self, c => c.depth())
    }
    fn attention_heads(&self) -> Option<usize> {
        each_arch!(self, c => c.attention_heads())
    }
    fn flops(&self) -> u64 {
        each_arch!(self, c => Architecture::flops(c))
    }
    fn shape_flow(&self) -> Vec<(String, Vec<usize>)> {
        each_arch!(self, c => Architecture::shape_flow(c))
    }
    fn default_preprocess(&self) -> Preprocess {
        each_arch!(self, c => c.default_preprocess())
    }
    fn init_params(&self, seed: u64, dev: &Device) -> Result<Vec<(String, Tensor)>> {
        each_arch!(self, c => c.init_params(seed, dev))
    }
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Classifier>> {
        each_arch!(self, c => c.build(vb))
    }
}

/// Keeps the first line of a multi-line parser message.
fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the architectures' tests share.
#[cfg(test)]
pub(crate) mod testutil {
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};

    use super::{Architecture, Classifier, Mode, ModelConfig};

    /// Builds `cfg` from trainable variables (fresh parameters from `seed`), runs `x`
    /// forward in training mode and the cross-entropy against `labels` backward, and
    /// asserts that every parameter gets a finite, non-zero gradient. Returns the network.
    pub fn every_parameter_gets_a_gradient(
        cfg: &ModelConfig,
        seed: u64,
        x: &Tensor,
        labels: &[u32],
    ) -> Box<dyn Classifier> {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        for (name, t) in cfg.init_params(seed, &dev).unwrap() {
            let var = Var::from_tensor(&t).unwrap();
            varmap.data().lock().unwrap().insert(name, var);
        }
        let m = cfg
            .build(VarBuilder::from_varmap(&varmap, DType::F32, &dev))
            .unwrap();
        let logits = m.forward_t(x, &mut Mode::Train(None)).unwrap();
        assert_eq!(logits.dims(), &[labels.len(), cfg.num_classes()]);
        let y = Tensor::new(labels, &dev).unwrap();
        let grads = crate::ops::cross_entropy(&logits, &y, 0.0)
            .unwrap()
            .backward()
            .unwrap();
        let data = varmap.data().lock().unwrap();
        assert_eq!(data.len(), cfg.param_shapes().len());
        for (name, var) in data.iter() {
            let norm = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} got no gradient"))
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{name}: {norm}");
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAT: &str = "image_size = [32, 32]\npatch_size = 8\nnum_classes = 10\n\
                        embed_dim = 64\ndepth = 2\nnum_heads = 4\n";

    #[test]
    fn configs_are_tagged_and_untagged_ones_are_vits() {
        let untagged: ModelConfig = toml::from_str(FLAT).unwrap();
        let tagged: ModelConfig = toml::from_str(&format!("arch = \"vit\"\n{FLAT}")).unwrap();
        assert_eq!(untagged, tagged);
        assert_eq!(tagged.arch(), "vit");
        let json = serde_json::to_string(&tagged).unwrap();
        assert!(json.starts_with("{\"arch\":\"vit\","), "{json}");
        assert_eq!(serde_json::from_str::<ModelConfig>(&json).unwrap(), tagged);
        let e = toml::from_str::<ModelConfig>(&format!("arch = \"resnet99\"\n{FLAT}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("resnet99"), "{e}");
        let e = toml::from_str::<ModelConfig>(&format!("{FLAT}depht = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `depht`"), "{e}");
        let from_json = ModelConfig::from_text(&json, Path::new("c.json")).unwrap();
        assert_eq!(from_json, tagged);
        assert_eq!(
            ModelConfig::from_text(FLAT, Path::new("c.toml")).unwrap(),
            tagged
        );
        let e = ModelConfig::from_text(FLAT, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.json"), "{e}");
    }

    /// Checkpoints carry their config as JSON: its floats read back bit for bit (serde_json's
    /// default parser was one ulp off for some 17-digit values; found by the
    /// `model_config` fuzz target).
    #[test]
    fn config_floats_round_trip_through_json_exactly() {
        let text = format!("{FLAT}layer_norm_eps = 1.8908075047228926e-7\n");
        let cfg = ModelConfig::from_text(&text, Path::new("c.toml")).unwrap();
        let json = serde_json::to_string(&cfg).unwrap();
        let back = ModelConfig::from_text(&json, Path::new("c.json")).unwrap();
        assert_eq!(back, cfg, "{json}");
        let eps = |c: &ModelConfig| c.as_vit().unwrap().layer_norm_eps.to_bits();
        assert_eq!(eps(&back), eps(&cfg));
    }

    #[test]
    fn every_preset_is_found_by_name_and_validates() {
        let names: Vec<&str> = presets().map(|(n, _)| n).collect();
        assert!(names.len() >= 11 && names.contains(&"vit_fmnist"));
        for (name, c) in presets() {
            assert_eq!(ModelConfig::preset(name).unwrap(), c, "{name}");
            c.validate().unwrap();
        }
        assert!(preset_preprocess("vit_fmnist").is_some());
        assert!(preset_preprocess("vit_gigantic").is_none());
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "a preset name appears twice");
    }

    #[test]
    fn an_unknown_preset_suggests_the_closest_names() {
        let e = ModelConfig::preset("vit_tiny_patch16")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("unknown preset 'vit_tiny_patch16'; did you mean vit_tiny_patch16_224?"),
            "{e}"
        );
        let e = ModelConfig::preset("vit_base_patch61_224")
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean vit_base_patch16_224"), "{e}");
        let e = ModelConfig::preset("efficientnet_b0")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("did you mean") && e.contains("known: "), "{e}");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
