//! ONNX export: a ViT, DeiT or hybrid ViT as a standard ONNX graph (opset 17 and up), the path to every
//! runtime we do not have (ONNX Runtime, TensorRT, OpenVINO, CoreML, the browser).
//!
//! The graph is the model's forward in evaluation mode, op for op: the patch embedding as a
//! strided `Conv` (after a hybrid's ResNetV2, `hybrid.rs`), `LayerNormalization`, `MatMul` + `Add` for every linear layer (weights
//! stored transposed, as PyTorch's exporter stores them), `Softmax` attention, GELU in its
//! erf form, `Gemm` heads. Its input is the normalised image (B, C, H, W) named
//! `pixel_values`; its output `logits` (B, K), or `features` (B, D) without a head. The
//! preprocessing that makes the input (mean, std, crop, interpolation, size) and the class
//! names go into the model's metadata. `onnx` knows the ViT's tensors by their timm names and
//! nothing of training, files other than the one it writes, or other runtimes.

mod hybrid;
mod proto;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::models::vit::{NormPlacement, Pool, PosEmbed};
use crate::models::{ModelConfig, Preprocess, ViTConfig};
use crate::{Error, Result};
use proto::{Attr, Dim, Msg};

/// What `vit export` asks for.
#[derive(Debug, Clone, Copy)]
pub struct ExportOptions {
    /// The ONNX operator set, 17 to 21.
    pub opset: i64,
    /// A symbolic batch dimension instead of batch 1.
    pub dynamic_batch: bool,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Exported {
    pub nodes: usize,
    pub bytes: usize,
    pub output: &'static str,
}

/// Exports the checkpoint at `input` (any naming `weights` reads; its architecture from
/// `arch`) to `out`. Returns what was written and the fitting's warnings.
pub fn export_checkpoint(
    input: &Path,
    arch: &crate::weights::Arch,
    opts: ExportOptions,
    out: &Path,
) -> Result<(Exported, Vec<String>)> {
    let fitted = crate::weights::load_fitted(input, arch, Default::default())?;
    fitted.require_f32("ONNX export")?;
    let pre = fitted.preprocess(arch);
    let names = fitted.checkpoint.class_names.as_deref();
    let done = export(&fitted.config, &fitted.tensors, &pre, names, opts, out)?;
    Ok((done, fitted.warnings))
}

/// Writes the model of `cfg` with `tensors` (timm names, as `weights::load_fitted` gives
/// them) to `out` as an ONNX file, atomically.
pub fn export(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    preprocess: &Preprocess,
    class_names: Option<&[String]>,
    opts: ExportOptions,
    out: &Path,
) -> Result<Exported> {
    let Some(vit) = cfg.as_vit() else {
        return Err(Error::Invalid(format!(
            "ONNX export covers the ViT, DeiT and hybrid ViT (arch \"vit\"); a {} model is not \
             exported yet",
            cfg.arch()
        )));
    };
    if !(17..=21).contains(&opts.opset) {
        return Err(Error::Invalid(format!(
            "opset {} is not supported: 17 to 21 (LayerNormalization needs 17)",
            opts.opset
        )));
    }
    let mut g = Graph {
        opset: opts.opset,
        ..Graph::default()
    };
    let output = vit_graph(vit, tensors, &mut g)?;
    let batch = || {
        if opts.dynamic_batch {
            Dim::Named("batch".into())
        } else {
            Dim::Fixed(1)
        }
    };
    let [h, w] = vit.image_size;
    let input = proto::value_info(
        "pixel_values",
        &[
            batch(),
            Dim::Fixed(vit.in_channels as i64),
            Dim::Fixed(h as i64),
            Dim::Fixed(w as i64),
        ],
    );
    let width = if vit.num_classes > 0 {
        vit.num_classes
    } else {
        vit.embed_dim
    };
    let out_name: &'static str = if vit.num_classes > 0 {
        "logits"
    } else {
        "features"
    };
    g.nodes.push(proto::node(
        "Identity",
        "output",
        &[&output],
        &[out_name],
        &[],
    ));
    let output_info = proto::value_info(out_name, &[batch(), Dim::Fixed(width as i64)]);

    let mut graph = Msg::default();
    for n in &g.nodes {
        graph = graph.msg(1, n);
    }
    graph = graph.str(2, "vit");
    for t in &g.inits {
        graph = graph.msg(5, t);
    }
    graph = graph.msg(11, &input).msg(12, &output_info);

    let ir_version = match opts.opset {
        17 | 18 => 8,
        19 | 20 => 9,
        _ => 10,
    };
    let mut model = Msg::default()
        .int(1, ir_version)
        .str(2, "vit")
        .str(3, env!("CARGO_PKG_VERSION"))
        .msg(7, &graph)
        .msg(8, &Msg::default().str(1, "").int(2, opts.opset));
    for (k, v) in metadata(cfg, preprocess, class_names)? {
        model = model.msg(14, &Msg::default().str(1, &k).str(2, &v));
    }
    let bytes = model.into_bytes();
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::atomic::write_atomic(out, &bytes)?;
    Ok(Exported {
        nodes: g.nodes.len(),
        bytes: bytes.len(),
        output: out_name,
    })
}

/// The model's metadata: the preprocessing constants, the config (TOML) and class names.
fn metadata(
    cfg: &ModelConfig,
    p: &Preprocess,
    class_names: Option<&[String]>,
) -> Result<Vec<(String, String)>> {
    let list = |v: &[f32]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let [h, w] = crate::models::Architecture::image_size(cfg);
    let mut m = vec![
        ("mean".to_string(), list(&p.mean)),
        ("std".to_string(), list(&p.std)),
        ("crop_pct".to_string(), p.crop_pct.to_string()),
        ("interpolation".to_string(), p.interpolation.clone()),
        ("resize".to_string(), p.resize.clone()),
        ("input_size".to_string(), format!("{h},{w}")),
        (
            "input_layout".to_string(),
            "NCHW, (pixel/255 - mean)/std".to_string(),
        ),
        (
            "config".to_string(),
            toml::to_string(cfg).map_err(|e| Error::Invalid(format!("config as TOML: {e}")))?,
        ),
    ];
    if let Some(names) = class_names {
        m.push((
            "class_names".to_string(),
            serde_json::to_string(names).map_err(|e| Error::Invalid(e.to_string()))?,
        ));
    }
    Ok(m)
}

/// Nodes and initializers being built; values get fresh names.
#[derive(Default)]
struct Graph {
    nodes: Vec<Msg>,
    inits: Vec<Msg>,
    opset: i64,
    count: usize,
}

impl Graph {
    /// Appends `op` over `inputs`; returns its output's name.
    fn op(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        self.count += 1;
        let out = format!("{}_{}", op.to_lowercase(), self.count);
        self.nodes
            .push(proto::node(op, &out, inputs, &[&out], attrs));
        out
    }

    /// An f32 initializer.
    fn init(&mut self, name: &str, t: &Tensor) -> Result<String> {
        let dims: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        self.inits.push(proto::f32_tensor(name, &dims, &values));
        Ok(name.to_string())
    }

    fn ints(&mut self, values: &[i64]) -> String {
        self.count += 1;
        let name = format!("const_{}", self.count);
        self.inits
            .push(proto::i64_tensor(&name, &[values.len() as i64], values));
        name
    }

    fn scalar(&mut self, v: f32) -> String {
        self.count += 1;
        let name = format!("const_{}", self.count);
        self.inits.push(proto::f32_tensor(&name, &[], &[v]));
        name
    }
}

/// The tensor `name` of the model.
fn get<'a>(w: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    w.get(name)
        .ok_or_else(|| Error::Invalid(format!("the model has no tensor {name}")))
}

/// x·Wᵀ + b for the linear layer `prefix` (timm's (out, in) weight), over the last axis.
fn linear(g: &mut Graph, w: &HashMap<String, Tensor>, x: &str, prefix: &str) -> Result<String> {
    let wt = get(w, &format!("{prefix}.weight"))?.t()?.contiguous()?;
    let wt = g.init(&format!("{prefix}.weight_t"), &wt)?;
    let y = g.op("MatMul", &[x, &wt], &[]);
    match w.get(&format!("{prefix}.bias")) {
        Some(b) => {
            let b = g.init(&format!("{prefix}.bias"), b)?;
            Ok(g.op("Add", &[&y, &b], &[]))
        }
        None => Ok(y),
    }
}

fn layer_norm(
    g: &mut Graph,
    w: &HashMap<String, Tensor>,
    x: &str,
    prefix: &str,
    eps: f64,
) -> Result<String> {
    let scale = g.init(
        &format!("{prefix}.weight"),
        get(w, &format!("{prefix}.weight"))?,
    )?;
    let bias = g.init(
        &format!("{prefix}.bias"),
        get(w, &format!("{prefix}.bias"))?,
    )?;
    Ok(g.op(
        "LayerNormalization",
        &[x, &scale, &bias],
        &[
            ("axis", Attr::Int(-1)),
            ("epsilon", Attr::Float(eps as f32)),
        ],
    ))
}

/// 0.5·x·(1 + erf(x/√2)).
fn gelu(g: &mut Graph, x: &str) -> String {
    let sqrt2 = g.scalar(std::f32::consts::SQRT_2);
    let (one, half) = (g.scalar(1.0), g.scalar(0.5));
    let e = g.op("Div", &[x, &sqrt2], &[]);
    let e = g.op("Erf", &[&e], &[]);
    let e = g.op("Add", &[&e, &one], &[]);
    let y = g.op("Mul", &[x, &e], &[]);
    g.op("Mul", &[&y, &half], &[])
}

/// Multi-head self-attention of block `p` over x (B, T, D).
fn attention(
    g: &mut Graph,
    w: &HashMap<String, Tensor>,
    cfg: &ViTConfig,
    x: &str,
    p: &str,
) -> Result<String> {
    let (d, heads) = (cfg.embed_dim as i64, cfg.num_heads as i64);
    let qkv = linear(g, w, x, &format!("{p}.attn.qkv"))?; // (B, T, 3D)
    let split = g.ints(&[0, 0, 3, heads, d / heads]);
    let qkv = g.op("Reshape", &[&qkv, &split], &[]); // (B, T, 3, heads, hd)
    let qkv = g.op(
        "Transpose",
        &[&qkv],
        &[("perm", Attr::Ints(vec![2, 0, 3, 1, 4]))],
    );
    let mut parts = Vec::new();
    for i in 0..3 {
        let idx = g.ints(&[i]);
        let t = g.op("Gather", &[&qkv, &idx], &[("axis", Attr::Int(0))]); // (1, B, heads, T, hd)
        let axis0 = g.ints(&[0]);
        parts.push(g.op("Squeeze", &[&t, &axis0], &[])); // (B, heads, T, hd)
    }
    let kt = g.op(
        "Transpose",
        &[&parts[1]],
        &[("perm", Attr::Ints(vec![0, 1, 3, 2]))],
    );
    let scores = g.op("MatMul", &[&parts[0], &kt], &[]); // (B, heads, T, T)
    let scale = g.scalar(((cfg.embed_dim / cfg.num_heads) as f64).powf(-0.5) as f32);
    let scores = g.op("Mul", &[&scores, &scale], &[]);
    let probs = g.op("Softmax", &[&scores], &[("axis", Attr::Int(-1))]);
    let y = g.op("MatMul", &[&probs, &parts[2]], &[]); // (B, heads, T, hd)
    let y = g.op(
        "Transpose",
        &[&y],
        &[("perm", Attr::Ints(vec![0, 2, 1, 3]))],
    );
    let merge = g.ints(&[0, 0, d]);
    let y = g.op("Reshape", &[&y, &merge], &[]); // (B, T, D)
    linear(g, w, &y, &format!("{p}.attn.proj"))
}

fn mlp(g: &mut Graph, w: &HashMap<String, Tensor>, x: &str, p: &str) -> Result<String> {
    let h = linear(g, w, x, &format!("{p}.mlp.fc1"))?;
    let h = gelu(g, &h);
    linear(g, w, &h, &format!("{p}.mlp.fc2"))
}

/// The mean over `axis` (ReduceMean's axes are an attribute up to opset 17, an input after).
fn reduce_mean(g: &mut Graph, x: &str, axis: i64, keep: bool) -> String {
    let keepdims = ("keepdims", Attr::Int(i64::from(keep)));
    if g.opset >= 18 {
        let axes = g.ints(&[axis]);
        g.op("ReduceMean", &[x, &axes], &[keepdims])
    } else {
        g.op(
            "ReduceMean",
            &[x],
            &[("axes", Attr::Ints(vec![axis])), keepdims],
        )
    }
}

/// The whole forward from `pixel_values`; returns the output's name.
fn vit_graph(cfg: &ViTConfig, w: &HashMap<String, Tensor>, g: &mut Graph) -> Result<String> {
    let (d, p) = (cfg.embed_dim as i64, cfg.patch_size as i64);
    let eps = cfg.layer_norm_eps;
    // Patch embedding: a P×P stride-P convolution (of the image, or of a hybrid's feature
    // map), then (B, D, N) → (B, N, D).
    let input = match &cfg.backbone {
        Some(bb) => hybrid::backbone(g, w, bb, cfg.image_size)?,
        None => "pixel_values".to_string(),
    };
    let pw = g.init(
        "patch_embed.proj.weight",
        get(w, "patch_embed.proj.weight")?,
    )?;
    let pb = g.init("patch_embed.proj.bias", get(w, "patch_embed.proj.bias")?)?;
    let x = g.op(
        "Conv",
        &[&input, &pw, &pb],
        &[
            ("kernel_shape", Attr::Ints(vec![p, p])),
            ("strides", Attr::Ints(vec![p, p])),
        ],
    ); // (B, D, gh, gw)
    let flat = g.ints(&[0, d, -1]);
    let x = g.op("Reshape", &[&x, &flat], &[]);
    let mut x = g.op("Transpose", &[&x], &[("perm", Attr::Ints(vec![0, 2, 1]))]); // (B, N, D)

    // Prefix tokens, broadcast over the batch: shape (B, 1, D) from the tokens' shape.
    let prefix: Vec<&str> = [
        ("cls_token", cfg.class_token),
        ("dist_token", cfg.distilled),
    ]
    .into_iter()
    .filter(|(_, on)| *on)
    .map(|(n, _)| n)
    .collect();
    if !prefix.is_empty() {
        let shape = g.op("Shape", &[&x], &[]);
        let keep = g.ints(&[1, 0, 1]);
        let one = g.ints(&[0, 1, 0]);
        let shape = g.op("Mul", &[&shape, &keep], &[]);
        let shape = g.op("Add", &[&shape, &one], &[]); // [B, 1, D]
        let mut parts = Vec::new();
        for name in &prefix {
            let t = g.init(name, get(w, name)?)?;
            parts.push(g.op("Expand", &[&t, &shape], &[]));
        }
        parts.push(x.clone());
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        x = g.op("Concat", &refs, &[("axis", Attr::Int(1))]); // (B, T, D)
    }
    let pos = match cfg.pos_embed {
        PosEmbed::Learned => Some(get(w, "pos_embed")?.clone()),
        PosEmbed::Sincos2d => Some(crate::models::vit::sincos_2d(cfg, &Device::Cpu)?),
        PosEmbed::None => None,
    };
    if let Some(pos) = pos {
        let pos = g.init("pos_embed", &pos)?;
        x = g.op("Add", &[&x, &pos], &[]);
    }

    for i in 0..cfg.depth {
        let b = format!("blocks.{i}");
        x = match cfg.norm {
            NormPlacement::Pre => {
                let h = layer_norm(g, w, &x, &format!("{b}.norm1"), eps)?;
                let a = attention(g, w, cfg, &h, &b)?;
                let x = g.op("Add", &[&x, &a], &[]);
                let h = layer_norm(g, w, &x, &format!("{b}.norm2"), eps)?;
                let m = mlp(g, w, &h, &b)?;
                g.op("Add", &[&x, &m], &[])
            }
            NormPlacement::Post => {
                let a = attention(g, w, cfg, &x, &b)?;
                let x = g.op("Add", &[&x, &a], &[]);
                let x = layer_norm(g, w, &x, &format!("{b}.norm1"), eps)?;
                let m = mlp(g, w, &x, &b)?;
                let x = g.op("Add", &[&x, &m], &[]);
                layer_norm(g, w, &x, &format!("{b}.norm2"), eps)?
            }
        };
    }
    if !cfg.fc_norm {
        x = layer_norm(g, w, &x, "norm", eps)?;
    }

    // Pooling and heads.
    let token = |g: &mut Graph, x: &str, i: i64| {
        let idx = g.ints(&[i]);
        let t = g.op("Gather", &[x, &idx], &[("axis", Attr::Int(1))]); // (B, 1, D)
        let axis = g.ints(&[1]);
        g.op("Squeeze", &[&t, &axis], &[]) // (B, D)
    };
    let head = |g: &mut Graph, x: &str, name: &str| -> Result<String> {
        let wt = g.init(
            &format!("{name}.weight"),
            get(w, &format!("{name}.weight"))?,
        )?;
        let bt = g.init(&format!("{name}.bias"), get(w, &format!("{name}.bias"))?)?;
        Ok(g.op("Gemm", &[x, &wt, &bt], &[("transB", Attr::Int(1))]))
    };
    if cfg.distilled {
        let (c, dt) = (token(g, &x, 0), token(g, &x, 1));
        if cfg.num_classes == 0 {
            let sum = g.op("Add", &[&c, &dt], &[]);
            let half = g.scalar(0.5);
            return Ok(g.op("Mul", &[&sum, &half], &[]));
        }
        let (a, b) = (head(g, &c, "head")?, head(g, &dt, "head_dist")?);
        let sum = g.op("Add", &[&a, &b], &[]);
        let half = g.scalar(0.5);
        return Ok(g.op("Mul", &[&sum, &half], &[]));
    }
    let mut pooled = match cfg.pool {
        Pool::Cls => token(g, &x, 0),
        Pool::Mean => {
            let skip = cfg.num_prefix_tokens() as i64;
            let patches = if skip > 0 {
                let (starts, ends, axes) = (g.ints(&[skip]), g.ints(&[i64::MAX]), g.ints(&[1]));
                g.op("Slice", &[&x, &starts, &ends, &axes], &[])
            } else {
                x.clone()
            };
            reduce_mean(g, &patches, 1, false)
        }
    };
    if cfg.fc_norm {
        pooled = layer_norm(g, w, &pooled, "fc_norm", eps)?;
    }
    if cfg.num_classes == 0 {
        return Ok(pooled);
    }
    head(g, &pooled, "head")
}
