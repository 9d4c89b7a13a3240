"""Reference fixtures for the `vit` crate's parity tests, made with timm and transformers.

Dev-only: CI never runs this script; its outputs under tests/fixtures/ (and
src/imagenet_classes.txt) are committed. Regenerate from the repository root with

    .venv/bin/python scripts/make_fixtures.py

(the venv needs torch, timm, transformers, safetensors, numpy and pillow; CPU only).
It is deterministic (fixed seeds, float32) and doubles as the executable spec of what
each fixture contains:

  timm_tiny/       timm ViT (cls pool, qkv bias): weights, our config, input/logits/
                   features/attention probs, pos-embed resampling (timm + HF style),
                   32 -> 48 px resolution change through timm's checkpoint filter
  timm_meanpool/   timm ViT without class token, mean pool + fc_norm, 1 channel, 24x32
  hf_tiny/         transformers ViTForImageClassification in HF format (+ processor),
                   expected outputs, and ours_config.json (our config for it)
  predict/         two PNG images and logits after timm / HF preprocessing
  grad_tiny/       loss, gradients, grad norm and two clipped AdamW steps (timm naming)
  deit_tiny/       timm distilled DeiT (class + distillation tokens, two heads averaged):
                   weights, our config, input/logits/features/attention probs, and the
                   32 -> 48 px resolution change (two prefix tokens kept)
  cnn_simple/      the reference documents' SimpleCNN (conv 3x3 + ReLU + max-pool stages,
                   global average pool, linear classifier) at small widths, non-square
                   input: weights, our config, input/logits/features
  resnet_tiny/     timm ResNets at small widths, each with BatchNorm statistics: a basic-block
                   one with timm's stem on a non-square input, a bottleneck one with the
                   small-image stem (3x3 stride 1, no pool); eval-mode logits/features/
                   stage outputs, and one training-mode pass: logits, loss, every
                   parameter's gradient and the running statistics after it
  swin_tiny/       timm Swin Transformers at small widths: `pad` (a 20x12 input, 3x3 windows:
                   padded maps, shifts in one direction only, odd sizes merged) and `fmnist`
                   (28x28x1, 2x2 patches, 7x7 windows: swin_fmnist's first two stages); eval
                   logits/features/stage outputs, one training pass with every parameter's
                   gradient, and timm's state-dict key order
  pvt_tiny/        a timm PVT v2 at small widths on a 30x22 input (spatial reduction 2 in the
                   first stage, none in the second; depth-wise convolutions in the MLPs):
                   eval logits/features/stage outputs, one training pass with every
                   parameter's gradient, and timm's state-dict key order
  hybrid_tiny/     timm hybrid ViTs (HybridEmbed over a ResNetV2 of weight-standardised SAME
                   convolutions and GroupNorm) at small widths: `r` (the 7x7 stem and two
                   bottleneck stages on a 38x30 input: uneven and even padding, a strided
                   stage, a block without downsample; 1x1 cells) and `deep` (the small-image
                   presets' deep stem alone, 2x2 cells of its map); eval logits/features/
                   the backbone's feature map, one training pass with every parameter's
                   gradient, and timm's state-dict key order
  jax_tiny/        small random ViTs written in the layout of google-research/vision_transformer's
                   .npz checkpoints (stored; `stem` and `r` deflated, as np.savez_compressed)
                   and read back by timm's own `_load_weights` (which must give the original
                   weights): `vit` (a plain ViT under the `opt/target/` prefix),
                   `stem` (the stem-only hybrid), `r` (ResNetV2 stages; with our config, as
                   GroupNorm's group count is not in the archive), each with timm's logits
  timm_hub/        a folder as timm's save_for_hf and the Hub's timm/* repos lay it out (a ViT with
                   model_args, pretrained_cfg and label_names in config.json), with the logits of
                   the model timm builds from the folder
  timm_param_counts.json  parameter counts of standard timm ViTs, DeiTs, ResNets, Swins, PVTs,
                   hybrid ViTs (num_classes=1000)

`scripts/make_fixtures.py NAME...` remakes only the named parts (timm_tiny, timm_meanpool,
hf_tiny+predict, grad_tiny, imagenet_classes, deit_tiny, cnn_simple, resnet_tiny,
swin_tiny, pvt_tiny, hybrid_tiny, jax_tiny, timm_hub, param_counts).

All parameters are perturbed after construction (LayerNorm weights 1 + 0.1*randn,
biases 0.02*randn, other tensors get noise) so that no weight is trivially 0 or 1.
"""

import json
import math
import os
import sys

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import save_file
from timm.data import ImageNetInfo, create_transform
from timm.layers import resample_abs_pos_embed
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")

torch.set_num_threads(2)
torch.manual_seed(0)


def seed(n):
    torch.manual_seed(n)
    np.random.seed(n)


def out_dir(name):
    d = os.path.join(FIX, name)
    os.makedirs(d, exist_ok=True)
    return d


def save(tensors, path):
    save_file({k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in tensors.items()}, path)


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


@torch.no_grad()
def perturb(model):
    """LayerNorm weights 1 + 0.1*randn, biases 0.02*randn, matrices + N(0, 1/fan_in)
    noise (so attention is far from uniform), cls/pos tokens + 0.2*randn."""
    for name, p in model.named_parameters():
        if p.ndim == 1 and name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn_like(p))
        elif p.ndim == 1:
            p.copy_(0.02 * torch.randn_like(p))
        elif "cls_token" in name or "pos" in name:
            p.add_(0.2 * torch.randn_like(p))
        else:
            p.add_(torch.randn_like(p) / math.sqrt(p[0].numel()))
        assert (p != 0).all() and (p != 1).all(), name


def ours(image_size, patch_size, in_channels, num_classes, embed_dim, depth, num_heads,
         mlp_ratio, qkv_bias, pool, fc_norm, class_token, eps):
    """Our Rust config (JSON field names of vit::Config)."""
    return dict(image_size=list(image_size), patch_size=patch_size, in_channels=in_channels,
                num_classes=num_classes, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                mlp_ratio=float(mlp_ratio), qkv_bias=qkv_bias, pool=pool, fc_norm=fc_norm,
                pos_embed="learned", class_token=class_token, norm="pre", layer_norm_eps=eps)


def timm_run(model, x):
    """logits, forward_features and per-block softmax attention probabilities."""
    probs = []
    hooks = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(
            lambda mod, inp, out: probs.append(inp[0].detach().clone())))
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-6)
    assert len(probs) == len(model.blocks)
    for a in probs:
        assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)
    out = {"logits": logits, "features": feats}
    out.update({f"attn{i}": a for i, a in enumerate(probs)})
    return out


def hf_style_resample(pos, new_size, num_prefix=1):
    """What HF's ViTEmbeddings.interpolate_pos_encoding does: bicubic, no antialias."""
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    n = int(math.sqrt(grid.shape[1]))
    grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode="bicubic", align_corners=False)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)


# ---------------------------------------------------------------- A. timm_tiny
def make_timm_tiny():
    seed(1)
    kw = dict(patch_size=8, in_chans=3, num_classes=10, embed_dim=64, depth=2, num_heads=4,
              mlp_ratio=4.0, qkv_bias=True)
    model = VisionTransformer(img_size=32, **kw).eval()
    perturb(model)
    d = out_dir("timm_tiny")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save(sd, os.path.join(d, "model.safetensors"))
    write_json(ours((32, 32), 8, 3, 10, 64, 2, 4, 4.0, True, "cls", False, True, 1e-6),
               os.path.join(d, "config.json"))

    x = torch.randn(2, 3, 32, 32)
    exp = {"input": x, **timm_run(model, x)}
    pos = model.pos_embed.detach()
    exp["pos_embed"] = pos
    for h, w in [(6, 5), (3, 2)]:
        exp[f"pos_timm_{h}x{w}"] = resample_abs_pos_embed(pos, new_size=(h, w), num_prefix_tokens=1)
        exp[f"pos_hf_{h}x{w}"] = hf_style_resample(pos, (h, w))

    # 32 px weights -> 48 px model via timm's own checkpoint filter (grid 4x4 -> 6x6).
    model48 = VisionTransformer(img_size=48, **kw).eval()
    model48.load_state_dict(checkpoint_filter_fn(sd, model48))
    x48 = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        exp["input_48"] = x48
        exp["logits_48"] = model48(x48)
    exp["pos_timm_6x6"] = model48.pos_embed.detach()
    assert torch.allclose(exp["pos_timm_6x6"],
                          resample_abs_pos_embed(pos, new_size=(6, 6), num_prefix_tokens=1))
    save(exp, os.path.join(d, "expected.safetensors"))
    return model


# ---------------------------------------------------------------- A2. deit_tiny
def make_deit_tiny():
    seed(7)
    kw = dict(patch_size=8, in_chans=3, num_classes=10, embed_dim=64, depth=2, num_heads=4,
              mlp_ratio=4.0, qkv_bias=True)
    model = VisionTransformerDistilled(img_size=32, **kw).eval()
    perturb(model)
    d = out_dir("deit_tiny")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save(sd, os.path.join(d, "model.safetensors"))
    cfg = ours((32, 32), 8, 3, 10, 64, 2, 4, 4.0, True, "cls", False, True, 1e-6)
    cfg["distilled"] = True
    write_json(cfg, os.path.join(d, "config.json"))

    x = torch.randn(2, 3, 32, 32)
    exp = {"input": x, **timm_run(model, x)}
    with torch.no_grad():
        feats = exp["features"]
        exp["logits_cls"] = model.head(feats[:, 0])
        exp["logits_dist"] = model.head_dist(feats[:, 1])
    assert torch.allclose(exp["logits"], (exp["logits_cls"] + exp["logits_dist"]) / 2, atol=1e-6)
    # 32 px weights -> 48 px model: both prefix tokens kept, the 4x4 grid resampled to 6x6.
    model48 = VisionTransformerDistilled(img_size=48, **kw).eval()
    sd48 = dict(sd)
    sd48["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=(6, 6),
                                               num_prefix_tokens=2)
    model48.load_state_dict(sd48)
    x48 = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        exp["input_48"] = x48
        exp["logits_48"] = model48(x48)
    save(exp, os.path.join(d, "expected.safetensors"))
    return model


# ---------------------------------------------------------------- A3. cnn_simple
class SimpleCNN(nn.Module):
    """The reference documents' SimpleCNN, its widths a parameter (theirs: 64-128-256-512;
    their `nn.AdaptiveAvgPool2d(1, 1)` written as the `(1, 1)` it means)."""

    def __init__(self, num_classes=10, in_chans=3, widths=(64, 128, 256, 512)):
        super().__init__()
        layers, c = [], in_chans
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, kernel_size=3, padding=1), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if i + 1 < len(widths) else [nn.AdaptiveAvgPool2d((1, 1))]
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


def make_cnn_simple():
    seed(11)
    full = SimpleCNN(num_classes=10)
    n = sum(p.numel() for p in full.parameters())
    print(f"  SimpleCNN(num_classes=10): {n:,d} parameters")
    assert n == 1_556_106
    model = SimpleCNN(num_classes=5, in_chans=3, widths=(8, 16, 24, 32)).eval()
    perturb(model)
    d = out_dir("cnn_simple")
    save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(d, "model.safetensors"))
    write_json(dict(arch="cnn", image_size=[20, 24], in_channels=3, num_classes=5,
                    widths=[8, 16, 24, 32]), os.path.join(d, "config.json"))
    x = torch.randn(2, 3, 20, 24)
    with torch.no_grad():
        feats = model.features[:-1](x)  # before the global average pool
        exp = {"input": x, "logits": model(x), "features": feats}
    save(exp, os.path.join(d, "expected.safetensors"))


# ---------------------------------------------------------------- A4. resnet_tiny
@torch.no_grad()
def perturb_bn_stats(model):
    """Running means 0.1*randn, running variances 1 + 0.3*rand: not the init values."""
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.1 * torch.randn_like(b))
        elif name.endswith("running_var"):
            b.copy_(1 + 0.3 * torch.rand_like(b))


def resnet_case(d, tag, model, cfg, x):
    """Weights and config as `{tag}.safetensors` / `{tag}.json`; eval outputs, then one
    training-mode pass (cross-entropy against fixed labels, no smoothing) with gradients
    and the running statistics after it, in `{tag}_expected.safetensors`."""
    perturb(model)
    perturb_bn_stats(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save(sd, os.path.join(d, f"{tag}.safetensors"))
    write_json(cfg, os.path.join(d, f"{tag}.json"))
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        exp = {"input": x, "logits": model.forward_head(feats), "features": feats}
        _, levels = model.forward_intermediates(x[:1])  # one image keeps the file small
        for i, t in enumerate(levels):
            exp[f"level{i}"] = t
    model.train()
    y = torch.arange(x.shape[0]) % cfg["num_classes"]
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    exp.update({"labels": y.to(torch.int64), "train_logits": logits.detach(),
                "train_loss": loss.detach().reshape(1)})
    for name, p in model.named_parameters():
        exp[f"grad.{name}"] = p.grad
    for name, b in model.named_buffers():
        if "running" in name:
            exp[f"after.{name}"] = b
    save(exp, os.path.join(d, f"{tag}_expected.safetensors"))


def make_resnet_tiny():
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet
    d = out_dir("resnet_tiny")
    seed(13)
    # Basic blocks, timm's stem (7x7 stride 2 + max-pool), 20x26: odd sizes after strides.
    # (timm's plain stem is 64 wide whatever `stem_width` says: ours says 64.)
    basic = ResNet(BasicBlock, layers=(2, 1, 1, 1), channels=(8, 16, 16, 24), in_chans=3,
                   num_classes=5)
    resnet_case(d, "basic", basic,
                dict(arch="resnet", image_size=[20, 26], in_channels=3, num_classes=5,
                     block="basic", layers=[2, 1, 1, 1], channels=[8, 16, 16, 24],
                     stem_width=64, stem="imagenet"),
                torch.randn(4, 3, 20, 26))
    # Bottlenecks with the small-image stem (3x3 stride 1, no pool), 1 channel, 13x11.
    seed(14)
    bottle = ResNet(Bottleneck, layers=(1, 2, 1, 1), channels=(4, 8, 8, 4), in_chans=1,
                    num_classes=3)
    bottle.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    bottle.maxpool = nn.Identity()
    resnet_case(d, "bottleneck", bottle,
                dict(arch="resnet", image_size=[13, 11], in_channels=1, num_classes=3,
                     block="bottleneck", layers=[1, 2, 1, 1], channels=[4, 8, 8, 4],
                     stem_width=64, stem="small"),
                torch.randn(4, 1, 13, 11))


# ------------------------------------------------------------------ A5. swin_tiny
def timm_case(d, tag, model, cfg, x, eval_extra):
    """Weights and config as `{tag}.safetensors` / `{tag}.json`, timm's state-dict keys in
    order as `{tag}_keys.json`; eval outputs (logits, features, and what `eval_extra(model, x)`
    adds), then one training-mode pass (no dropout, no drop-path) with every parameter's
    gradient in `{tag}_expected.safetensors`."""
    perturb(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save(sd, os.path.join(d, f"{tag}.safetensors"))
    write_json(list(sd.keys()), os.path.join(d, f"{tag}_keys.json"))
    write_json(cfg, os.path.join(d, f"{tag}.json"))
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        exp = {"input": x, "logits": model.forward_head(feats), "features": feats}
        exp.update(eval_extra(model, x))
    model.train()
    y = torch.arange(x.shape[0]) % cfg["num_classes"]
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    exp.update({"labels": y.to(torch.int64), "train_logits": logits.detach(),
                "train_loss": loss.detach().reshape(1)})
    for name, p in model.named_parameters():
        exp[f"grad.{name}"] = p.grad
    save(exp, os.path.join(d, f"{tag}_expected.safetensors"))


def swin_case(d, tag, model, cfg, x):
    """(Swin and PVT.) `timm_case` with the NCHW stage outputs as `level{i}`."""
    timm_case(d, tag, model, cfg, x,
              lambda m, x: {f"level{i}": t for i, t in enumerate(m.forward_intermediates(x)[1])})


def make_swin_tiny():
    from timm.models.swin_transformer import SwinTransformer
    d = out_dir("swin_tiny")
    seed(15)
    # 10x6 patch grid, window 3: stage 0 padded to 12x6 and shifted both ways; stage 1
    # (5x3) shifted along rows only; stage 2 (3x2) one 3x2 window; no qkv bias.
    pad = SwinTransformer(img_size=(20, 12), patch_size=2, in_chans=2, num_classes=3,
                          embed_dim=8, depths=(2, 2, 1), num_heads=(2, 2, 4), window_size=3,
                          mlp_ratio=2.0, qkv_bias=False, drop_path_rate=0.0)
    swin_case(d, "pad", pad,
              dict(arch="swin", image_size=[20, 12], in_channels=2, num_classes=3,
                   patch_size=2, embed_dim=8, depths=[2, 2, 1], num_heads=[2, 2, 4],
                   window_size=3, mlp_ratio=2.0, qkv_bias=False),
              torch.randn(3, 2, 20, 12))
    # The swin_fmnist geometry (its first two stages) at a smaller width.
    seed(16)
    fm = SwinTransformer(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=8,
                         depths=(2, 2), num_heads=(1, 2), window_size=7,
                         drop_path_rate=0.0)
    swin_case(d, "fmnist", fm,
              dict(arch="swin", image_size=[28, 28], in_channels=1, num_classes=10,
                   patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[1, 2],
                   window_size=7),
              torch.randn(2, 1, 28, 28))


# ------------------------------------------------------------------- A6. pvt_tiny
def make_pvt_tiny():
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
    d = out_dir("pvt_tiny")
    seed(17)
    model = PyramidVisionTransformerV2(in_chans=2, num_classes=3, depths=(2, 1),
                                       embed_dims=(8, 12), num_heads=(2, 3), sr_ratios=(2, 1),
                                       mlp_ratios=(2.0, 1.5))
    swin_case(d, "pvt", model,
              dict(arch="pvt", image_size=[30, 22], in_channels=2, num_classes=3,
                   depths=[2, 1], embed_dims=[8, 12], num_heads=[2, 3], sr_ratios=[2, 1],
                   mlp_ratios=[2.0, 1.5]),
              torch.randn(3, 2, 30, 22))


# ---------------------------------------------------------------- A7. hybrid_tiny
def hybrid_case(d, tag, model, cfg, x):
    """A hybrid ViT: `timm_case` with the backbone's feature map (NCHW) as `feature_map`."""
    timm_case(d, tag, model, cfg, x, lambda m, x: {"feature_map": m.patch_embed.backbone(x)})


def make_hybrid_tiny():
    from functools import partial
    from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2, create_resnetv2_stem
    d = out_dir("hybrid_tiny")
    conv = partial(StdConv2dSame, eps=1e-8)
    norm = partial(GroupNormAct, num_groups=4)
    vit = dict(depth=1, num_heads=2, mlp_ratio=2.0, drop_path_rate=0.0)
    # ResNetV2 stages (one block, then two; the second strided), the 7x7 stem; a 38x30
    # image gives odd and even sides (19x15 after the stem's convolution, 10x8 after its
    # pool, 5x4 after stage 1), so SAME padding is uneven and even in turn; 1x1 cells.
    seed(18)
    backbone = ResNetV2(layers=(1, 2), channels=(16, 32), in_chans=2, stem_chs=8,
                        stem_type="same", preact=False, conv_layer=conv, norm_layer=norm,
                        num_classes=0, global_pool="")
    model = VisionTransformer(img_size=(38, 30), patch_size=1, in_chans=2, num_classes=3,
                              embed_dim=16, embed_layer=partial(HybridEmbed, backbone=backbone),
                              **vit)
    bb = dict(layers=[1, 2], stem="same", stem_channels=8, channels=[16, 32], norm_groups=4)
    hybrid_case(d, "r", model,
                dict(arch="vit", image_size=[38, 30], patch_size=1, in_channels=2,
                     num_classes=3, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
                     backbone=bb),
                torch.randn(3, 2, 38, 30))
    # The small-image presets' deep stem alone, cut into 2x2 cells (as vit_tiny_r_s16_p8
    # cuts its stem's map into 8x8), on a grayscale 32x24 image: an 8x6 map, 4x3 tokens.
    seed(19)
    stem = create_resnetv2_stem(1, 16, stem_type="deep_same", preact=False, conv_layer=conv,
                                norm_layer=norm)
    model = VisionTransformer(img_size=(32, 24), patch_size=2, in_chans=1, num_classes=4,
                              embed_dim=16, embed_layer=partial(HybridEmbed, backbone=stem),
                              **vit)
    bb = dict(layers=[], stem="deep_same", stem_channels=16, norm_groups=4)
    hybrid_case(d, "deep", model,
                dict(arch="vit", image_size=[32, 24], patch_size=2, in_channels=1,
                     num_classes=4, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
                     backbone=bb),
                torch.randn(2, 1, 32, 24))


# ------------------------------------------------------------------- A8. jax_tiny
def jax_arrays(model, prefix=""):
    """A timm ViT (plain or hybrid) in the layout of google-research/vision_transformer's .npz:
    the inverse of timm's `_load_weights`."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    conv = lambda w: w.transpose(2, 3, 1, 0)  # noqa: E731  OIHW -> HWIO
    out = {}
    for k, v in sd.items():
        if k.startswith("patch_embed.backbone."):
            rest = k[len("patch_embed.backbone."):]
            rest = rest[len("stem."):] if rest.startswith("stem.") else rest
            parts = rest.split(".")
            if parts[0] in ("conv", "norm"):
                name = {"conv.weight": "conv_root/kernel", "norm.weight": "gn_root/scale",
                        "norm.bias": "gn_root/bias"}[rest]
            else:  # stages.S.blocks.B.(conv1|norm1|downsample.conv|...).(weight|bias)
                s, b = int(parts[1]), int(parts[3])
                mod = ".".join(parts[4:-1])
                mod = {"downsample.conv": "conv_proj", "downsample.norm": "gn_proj"}.get(
                    mod, mod.replace("norm", "gn"))
                leaf = {"weight": "kernel" if mod.startswith("conv") else "scale",
                        "bias": "bias"}[parts[-1]]
                name = f"block{s + 1}/unit{b + 1}/{mod}/{leaf}"
            out[prefix + name] = conv(v) if v.ndim == 4 else v
    out[prefix + "embedding/kernel"] = conv(sd["patch_embed.proj.weight"])
    out[prefix + "embedding/bias"] = sd["patch_embed.proj.bias"]
    out[prefix + "cls"] = sd["cls_token"]
    out[prefix + "Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
    out[prefix + "Transformer/encoder_norm/scale"] = sd["norm.weight"]
    out[prefix + "Transformer/encoder_norm/bias"] = sd["norm.bias"]
    out[prefix + "head/kernel"] = sd["head.weight"].T
    out[prefix + "head/bias"] = sd["head.bias"]
    d = sd["cls_token"].shape[-1]
    for i, blk in enumerate(model.blocks):
        heads = blk.attn.num_heads
        p = f"{prefix}Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        g = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = g("norm1.weight"), g("norm1.bias")
        out[p + "LayerNorm_2/scale"], out[p + "LayerNorm_2/bias"] = g("norm2.weight"), g("norm2.bias")
        w, bias = g("attn.qkv.weight"), g("attn.qkv.bias")
        for j, part in enumerate(("query", "key", "value")):
            out[mha + part + "/kernel"] = w[j * d:(j + 1) * d].T.reshape(d, heads, d // heads)
            out[mha + part + "/bias"] = bias[j * d:(j + 1) * d].reshape(heads, d // heads)
        out[mha + "out/kernel"] = g("attn.proj.weight").reshape(d, heads, d // heads).transpose(1, 2, 0)
        out[mha + "out/bias"] = g("attn.proj.bias")
        for r in range(2):
            out[p + f"MlpBlock_3/Dense_{r}/kernel"] = g(f"mlp.fc{r + 1}.weight").T
            out[p + f"MlpBlock_3/Dense_{r}/bias"] = g(f"mlp.fc{r + 1}.bias")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def jax_case(d, tag, make, cfg, x, prefix="", compressed=False):
    """`{tag}.npz` in the JAX layout (written by np.savez, or np.savez_compressed), read back by timm's own `_load_weights` into a fresh model
    (which must equal the original), and that model's logits."""
    from timm.models.vision_transformer import _load_weights
    model = make()
    perturb(model)
    path = os.path.join(d, f"{tag}.npz")
    (np.savez_compressed if compressed else np.savez)(path, **jax_arrays(model, prefix))
    loaded = make()
    _load_weights(loaded, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    loaded.eval()
    with torch.no_grad():
        save({"input": x, "logits": loaded(x)}, os.path.join(d, f"{tag}_expected.safetensors"))
    if cfg is not None:
        write_json(cfg, os.path.join(d, f"{tag}.json"))


def make_jax_tiny():
    from functools import partial
    from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2, create_resnetv2_stem
    d = out_dir("jax_tiny")
    conv = partial(StdConv2dSame, eps=1e-8)
    # A plain ViT whose config the archive alone gives (patch 4 on 16 px, 2 blocks, 2 heads).
    seed(20)
    jax_case(d, "vit", lambda: VisionTransformer(
        img_size=16, patch_size=4, num_classes=5, embed_dim=16, depth=2, num_heads=2,
        mlp_ratio=2.0), None, torch.randn(1, 3, 16, 16), prefix="opt/target/")
    # The stem-only hybrid (32 channels, GroupNorm's 32 groups), 2x2 cells: also self-describing.
    seed(21)
    jax_case(d, "stem", lambda: VisionTransformer(
        img_size=16, patch_size=2, num_classes=4, embed_dim=16, depth=1, num_heads=2,
        embed_layer=partial(HybridEmbed, backbone=create_resnetv2_stem(
            3, 32, stem_type="same", preact=False, conv_layer=conv))), None,
        torch.randn(1, 3, 16, 16), compressed=True)
    # ResNetV2 stages at small widths (GroupNorm of 4 groups, which the archive cannot say:
    # read with our config).
    seed(22)
    bb = dict(layers=[1, 2], stem="same", stem_channels=8, channels=[16, 32], norm_groups=4)
    jax_case(d, "r", lambda: VisionTransformer(
        img_size=16, patch_size=1, num_classes=3, embed_dim=16, depth=1, num_heads=2,
        embed_layer=partial(HybridEmbed, backbone=ResNetV2(
            layers=(1, 2), channels=(16, 32), stem_chs=8, stem_type="same", preact=False,
            conv_layer=conv, norm_layer=partial(GroupNormAct, num_groups=4), num_classes=0,
            global_pool=""))),
        dict(arch="vit", image_size=[16, 16], patch_size=1, num_classes=3, embed_dim=16,
             depth=1, num_heads=2, backbone=bb),
        torch.randn(1, 3, 16, 16), compressed=True)


# ------------------------------------------------------------------- A9. timm_hub
def make_timm_hub():
    """A folder as timm's `save_for_hf` (and the Hub's timm/* repos) lays it out: model.safetensors
    and a config.json with architecture, model_args, pretrained_cfg and label_names; and the
    logits of the model timm builds from that folder."""
    from timm.models._hub import save_for_hf
    d = out_dir("timm_hub")
    seed(23)
    kw = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    perturb(model)
    save_for_hf(model, d, model_config={"label_names": ["cat", "dog", "fish"]}, model_args=kw,
                safe_serialization=True)
    again = timm.create_model(f"local-dir:{d}", pretrained=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        save({"input": x, "logits": again(x)}, os.path.join(d, "expected.safetensors"))


# ------------------------------------------------------------ B. timm_meanpool
def make_timm_meanpool():
    seed(2)
    model = VisionTransformer(img_size=(24, 32), patch_size=8, in_chans=1, num_classes=5,
                              embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, qkv_bias=False,
                              global_pool="avg", class_token=False).eval()
    assert isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.LayerNorm)
    perturb(model)
    d = out_dir("timm_meanpool")
    save(model.state_dict(), os.path.join(d, "model.safetensors"))
    write_json(ours((24, 32), 8, 1, 5, 48, 2, 3, 2.0, False, "mean", True, False, 1e-6),
               os.path.join(d, "config.json"))
    x = torch.randn(2, 1, 24, 32)
    save({"input": x, **timm_run(model, x)}, os.path.join(d, "expected.safetensors"))


# ------------------------------------------------------------------ C. hf_tiny
LABELS = ["airplane", "automobile", "bird", "cat", "deer",
          "dog", "frog", "horse", "ship", "truck"]


def make_hf_tiny():
    seed(3)
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=256, num_labels=10, hidden_act="gelu",
        layer_norm_eps=1e-12, qkv_bias=True, id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)}, attn_implementation="eager")
    model = transformers.ViTForImageClassification(cfg).eval()
    assert model.config._attn_implementation == "eager"
    perturb(model)
    d = out_dir("hf_tiny")
    model.save_pretrained(d)  # transformers 5 always writes model.safetensors
    processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(d)
    write_json(ours((32, 32), 8, 3, 10, 64, 2, 4, 4.0, True, "cls", False, True, 1e-12),
               os.path.join(d, "ours_config.json"))

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=x, output_attentions=True)
        feats = model.vit(pixel_values=x).last_hidden_state
    assert len(out.attentions) == 2
    for a in out.attentions:
        assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)
    save({"input": x, "logits": out.logits, "features": feats,
          "attn0": out.attentions[0], "attn1": out.attentions[1]},
         os.path.join(d, "expected.safetensors"))
    return model, processor


# ------------------------------------------------------------------ D. predict
def make_image(h, w, rng):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * xx / (w - 1)
    g = 255 * yy / (h - 1)
    b = 127.5 + 100 * np.sin(xx / 3.0) * np.cos(yy / 4.0)
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, size=(h, w, 3))
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), mode="RGB")


def make_predict(timm_model, hf_model, processor):
    rng = np.random.RandomState(4)
    d = out_dir("predict")
    make_image(32, 32, rng).save(os.path.join(d, "image_rgb.png"))
    make_image(40, 48, rng).save(os.path.join(d, "image_40x48.png"))
    img = Image.open(os.path.join(d, "image_rgb.png")).convert("RGB")
    img2 = Image.open(os.path.join(d, "image_40x48.png")).convert("RGB")
    assert img2.size == (48, 40)  # PIL: (width, height)

    tf = dict(input_size=(3, 32, 32), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    t_full = create_transform(crop_pct=1.0, **tf)
    t_crop = create_transform(crop_pct=0.875, **tf)
    print("timm transform crop_pct=0.875:", t_crop, sep="\n")
    resize = t_crop.transforms[0]
    assert resize.size == 36 == math.floor(32 / 0.875), resize.size  # shorter side -> 36
    print("  40x48 resized to", resize(img2).size[::-1], "(h, w) then center crop 32x32")

    exp = {}
    with torch.no_grad():
        exp["timm_input"] = t_full(img).unsqueeze(0)
        exp["timm_logits"] = timm_model(exp["timm_input"])
        exp["timm_input_resized"] = t_crop(img2).unsqueeze(0)
        exp["timm_logits_resized"] = timm_model(exp["timm_input_resized"])
        exp["hf_input"] = processor(images=img, return_tensors="pt")["pixel_values"]
        exp["hf_logits"] = hf_model(pixel_values=exp["hf_input"]).logits
    save(exp, os.path.join(d, "expected.safetensors"))


# ---------------------------------------------------------------- E. grad_tiny
TRAIN = dict(loss="cross_entropy", label_smoothing=0.1, reduction="mean", optimizer="adamw",
             lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.05,
             no_weight_decay="params with ndim < 2, pos_embed, cls_token",
             clip_grad_norm=1.0, steps=2, same_batch_each_step=True,
             adamw="torch.optim.AdamW: p *= 1 - lr*wd; m,v updates; "
                   "p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)")


def make_grad_tiny():
    seed(5)
    model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=32,
                              depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True,
                              drop_rate=0.0, pos_drop_rate=0.0, proj_drop_rate=0.0,
                              attn_drop_rate=0.0, drop_path_rate=0.0)
    perturb(model)
    model.train()
    d = out_dir("grad_tiny")
    save(model.state_dict(), os.path.join(d, "model.safetensors"))
    write_json(ours((16, 16), 4, 1, 5, 32, 2, 2, 2.0, True, "cls", False, True, 1e-6),
               os.path.join(d, "config.json"))

    x = torch.randn(4, 1, 16, 16)
    labels = torch.randint(0, 5, (4,), dtype=torch.int64)
    params = dict(model.named_parameters())
    no_decay = {"pos_embed", "cls_token"}
    decay = [n for n, p in params.items() if p.ndim >= 2 and n not in no_decay]
    rest = [n for n in params if n not in decay]
    opt = torch.optim.AdamW(
        [{"params": [params[n] for n in decay], "weight_decay": TRAIN["weight_decay"]},
         {"params": [params[n] for n in rest], "weight_decay": 0.0}],
        lr=TRAIN["lr"], betas=tuple(TRAIN["betas"]), eps=TRAIN["eps"])
    criterion = nn.CrossEntropyLoss(label_smoothing=TRAIN["label_smoothing"])

    exp = {"input": x, "labels": labels}
    for step in range(TRAIN["steps"]):
        opt.zero_grad()
        loss = criterion(model(x), labels)
        loss.backward()
        if step == 0:
            exp["loss"] = loss.detach().reshape(1)
            exp.update({f"grad.{n}": p.grad.clone() for n, p in params.items()})
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=TRAIN["clip_grad_norm"])
        exp["grad_norm" if step == 0 else f"grad_norm{step + 1}"] = norm.detach().reshape(1)
        opt.step()
    exp["loss2"] = loss.detach().reshape(1)
    exp.update({f"after2.{n}": p.detach().clone() for n, p in params.items()})
    save(exp, os.path.join(d, "expected.safetensors"))
    write_json({**TRAIN, "decay_params": decay, "no_decay_params": rest},
               os.path.join(d, "train.json"))
    print(f"grad_tiny: loss {exp['loss'].item():.6f} grad_norm {exp['grad_norm'].item():.6f} "
          f"loss2 {exp['loss2'].item():.6f}")


# ---------------------------------------------------- F. ImageNet class names
def make_imagenet_classes():
    info = ImageNetInfo()
    names = [info.index_to_description(i) for i in range(info.num_classes())]
    assert len(names) == 1000 and names[0] == "tench, Tinca tinca"
    with open(os.path.join(ROOT, "src", "imagenet_classes.txt"), "w") as f:
        f.write("\n".join(names) + "\n")


# ------------------------------------------------------- timm parameter counts
VARIANTS = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_small_patch32_224",
            "vit_base_patch16_224", "vit_base_patch32_224", "vit_base_patch16_384",
            "vit_large_patch16_224", "vit_huge_patch14_224",
            "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
            "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224",
            "deit_base_distilled_patch16_224", "resnet18", "resnet34", "resnet50",
            "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
            "swin_base_patch4_window7_224", "pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2",
            "vit_tiny_r_s16_p8_224", "vit_small_r26_s32_224", "vit_base_r50_s16_384"]


def param_counts():
    counts = {}
    for name in VARIANTS:
        m = timm.create_model(name, pretrained=False, num_classes=1000, device="meta")
        counts[name] = sum(p.numel() for p in m.parameters())
        print(f"  {name:24s} {counts[name]:>12,d}")
    write_json(counts, os.path.join(FIX, "timm_param_counts.json"))
    cfg = timm.create_model("vit_base_patch16_224", pretrained=False, device="meta").pretrained_cfg
    print("vit_base_patch16_224 pretrained_cfg:",
          {k: cfg[k] for k in ("tag", "mean", "std", "crop_pct", "interpolation", "crop_mode")})


def main():
    print(f"torch {torch.__version__}, timm {timm.__version__}, "
          f"transformers {transformers.__version__}, python {sys.version.split()[0]}")
    only = set(sys.argv[1:])
    run = lambda name: not only or name in only  # noqa: E731
    if run("timm_tiny") or run("hf_tiny+predict"):
        tiny = make_timm_tiny()
    if run("timm_meanpool"):
        make_timm_meanpool()
    if run("hf_tiny+predict"):
        hf, processor = make_hf_tiny()
        make_predict(tiny, hf, processor)
    if run("grad_tiny"):
        make_grad_tiny()
    if run("imagenet_classes"):
        make_imagenet_classes()
    if run("deit_tiny"):
        make_deit_tiny()
    if run("cnn_simple"):
        make_cnn_simple()
    if run("resnet_tiny"):
        make_resnet_tiny()
    if run("swin_tiny"):
        make_swin_tiny()
    if run("pvt_tiny"):
        make_pvt_tiny()
    if run("hybrid_tiny"):
        make_hybrid_tiny()
    if run("jax_tiny"):
        make_jax_tiny()
    if run("timm_hub"):
        make_timm_hub()
    if run("param_counts"):
        print("timm parameter counts (num_classes=1000):")
        param_counts()
    total = 0
    for dirpath, _, files in sorted(os.walk(FIX)):
        for f in sorted(files):
            size = os.path.getsize(os.path.join(dirpath, f))
            total += size
            print(f"  {os.path.relpath(os.path.join(dirpath, f), ROOT):55s} {size:>9,d} B")
    print(f"fixtures total {total:,d} B")
    assert total < 3_600_000


if __name__ == "__main__":
    main()
