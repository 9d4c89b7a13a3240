//! A hybrid ViT's ResNetV2 as ONNX nodes: weight-standardised "SAME" convolutions (the
//! standardisation done at export, the weights being constants; the padding as `Conv`'s
//! explicit, possibly uneven, pads), GroupNorm from reshapes and reductions (opset 17 has no
//! GroupNormalization), ReLU, the stem's `MaxPool`, bottlenecks with their shortcuts.

use std::collections::HashMap;

use candle_core::Tensor;

use super::proto::Attr;
use super::{get, reduce_mean, Graph};
use crate::models::hybrid::HybridBackbone;
use crate::models::layers::{GroupNorm, StdConv2d};
use crate::ops::same_padding;
use crate::Result;

/// The convolution `name` of x (B, C, h, w) at `stride`; returns y and its (h, w).
fn std_conv(
    g: &mut Graph,
    w: &HashMap<String, Tensor>,
    x: &str,
    name: &str,
    stride: usize,
    (h, wd): (usize, usize),
) -> Result<(String, (usize, usize))> {
    let conv = StdConv2d {
        weight: get(w, &format!("{name}.weight"))?.clone(),
        stride,
        eps: StdConv2d::EPS,
    };
    let k = conv.weight.dim(2)?;
    let weight = g.init(&format!("{name}.weight"), &conv.standardized_weight()?)?;
    let (top, bottom) = same_padding(h, k, stride);
    let (left, right) = same_padding(wd, k, stride);
    let pads = [top, left, bottom, right].map(|p| p as i64).to_vec();
    let (k, s) = (k as i64, stride as i64);
    let y = g.op(
        "Conv",
        &[x, &weight],
        &[
            ("kernel_shape", Attr::Ints(vec![k, k])),
            ("strides", Attr::Ints(vec![s, s])),
            ("pads", Attr::Ints(pads)),
        ],
    );
    Ok((y, (h.div_ceil(stride), wd.div_ceil(stride))))
}

/// The GroupNorm `name` of x (B, C, h, w) in `groups` groups, then a ReLU if `relu`.
fn group_norm(
    g: &mut Graph,
    w: &HashMap<String, Tensor>,
    x: &str,
    name: &str,
    groups: usize,
    relu: bool,
) -> Result<String> {
    let weight = get(w, &format!("{name}.weight"))?;
    let c = weight.dim(0)?;
    let split = g.ints(&[0, groups as i64, -1]);
    let xg = g.op("Reshape", &[x, &split], &[]); // (B, G, C/G·h·w)
    let mean = reduce_mean(g, &xg, 2, true);
    let centred = g.op("Sub", &[&xg, &mean], &[]);
    let sq = g.op("Mul", &[&centred, &centred], &[]);
    let var = reduce_mean(g, &sq, 2, true); // biased
    let eps = g.scalar(GroupNorm::EPS as f32);
    let var = g.op("Add", &[&var, &eps], &[]);
    let sd = g.op("Sqrt", &[&var], &[]);
    let xn = g.op("Div", &[&centred, &sd], &[]);
    let shape = g.op("Shape", &[x], &[]);
    let xn = g.op("Reshape", &[&xn, &shape], &[]); // (B, C, h, w)
    let scale = g.init(&format!("{name}.weight"), &weight.reshape((c, 1, 1))?)?;
    let bias = get(w, &format!("{name}.bias"))?.reshape((c, 1, 1))?;
    let shift = g.init(&format!("{name}.bias"), &bias)?;
    let y = g.op("Mul", &[&xn, &scale], &[]);
    let y = g.op("Add", &[&y, &shift], &[]);
    Ok(if relu { g.op("Relu", &[&y], &[]) } else { y })
}

/// The backbone from `pixel_values` (B, C, H, W) of an `image` [H, W] to its feature map
/// (B, F, h, w); returns its name.
pub(super) fn backbone(
    g: &mut Graph,
    w: &HashMap<String, Tensor>,
    bb: &HybridBackbone,
    image: [usize; 2],
) -> Result<String> {
    let pre = "patch_embed.backbone";
    let stem = format!("{pre}.{}", bb.stem_prefix());
    let gn = bb.norm_groups;
    let mut size = (image[0], image[1]);
    let mut x = "pixel_values".to_string();
    // The channel counts are the weights' own; names and strides are the config's.
    for (conv, norm, _, _, _, stride) in bb.stem_layers(0) {
        let (y, s) = std_conv(g, w, &x, &format!("{stem}{conv}"), stride, size)?;
        x = group_norm(g, w, &y, &format!("{stem}{norm}"), gn, true)?;
        size = s;
    }
    // The 3×3 stride-2 max-pool, "SAME" padded (ONNX's padding never wins a maximum).
    let (top, bottom) = same_padding(size.0, 3, 2);
    let (left, right) = same_padding(size.1, 3, 2);
    let pads = [top, left, bottom, right].map(|p| p as i64).to_vec();
    x = g.op(
        "MaxPool",
        &[&x],
        &[
            ("kernel_shape", Attr::Ints(vec![3, 3])),
            ("strides", Attr::Ints(vec![2, 2])),
            ("pads", Attr::Ints(pads)),
        ],
    );
    size = (size.0.div_ceil(2), size.1.div_ceil(2));
    for (s, &n) in bb.layers.iter().enumerate() {
        for b in 0..n {
            let p = format!("{pre}.stages.{s}.blocks.{b}");
            let stride = HybridBackbone::block_stride(s, b);
            let shortcut = if b == 0 {
                let (y, _) = std_conv(g, w, &x, &format!("{p}.downsample.conv"), stride, size)?;
                group_norm(g, w, &y, &format!("{p}.downsample.norm"), gn, false)?
            } else {
                x.clone()
            };
            let (y, _) = std_conv(g, w, &x, &format!("{p}.conv1"), 1, size)?;
            let y = group_norm(g, w, &y, &format!("{p}.norm1"), gn, true)?;
            let (y, out) = std_conv(g, w, &y, &format!("{p}.conv2"), stride, size)?;
            let y = group_norm(g, w, &y, &format!("{p}.norm2"), gn, true)?;
            let (y, _) = std_conv(g, w, &y, &format!("{p}.conv3"), 1, out)?;
            let y = group_norm(g, w, &y, &format!("{p}.norm3"), gn, false)?;
            let sum = g.op("Add", &[&y, &shortcut], &[]);
            x = g.op("Relu", &[&sum], &[]);
            size = out;
        }
    }
    Ok(x) // (B, F, h, w)
}
