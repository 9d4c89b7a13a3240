#!/usr/bin/env python3
"""The `vit bench` workloads in PyTorch + timm (eager), for bench/compare.sh.

  train-fm   one training step: forward, CrossEntropyLoss(label_smoothing=0.1), backward,
             clip_grad_norm_(1.0), AdamW; batch 128 of random 1x28x28 images, timm
             VisionTransformer(img 28, patch 4, 1 channel, 10 classes, width 192, depth 12,
             3 heads, MLP ratio 4, qkv bias, class-token pooling).
  train-resnet  the same training step for timm's resnet18 with the small-image stem of
             `resnet18_fmnist` (conv1 3x3 stride 1, no max-pool), 1 channel, 10 classes, in
             training mode (BatchNorm on batch statistics); batch 128 of random 1x28x28 images.
  infer-b16  ViT-B/16 (vit_base_patch16_224 dims) forward on 8 random 3x224x224 images under
             inference_mode; then the same model exported to ONNX and run in ONNX Runtime
             (2 intra-op threads) when onnxruntime is importable.
  infer-swin-t  the same for timm's swin_tiny_patch4_window7_224 (random weights).
  infer-b16-int8  the infer-b16 model in int8: PyTorch's dynamic quantization of its
             nn.Linear layers (torch.ao.quantization.quantize_dynamic, qint8, the x86/fbgemm
             engine), and ONNX Runtime on the fp32 export passed through
             onnxruntime.quantization.quantize_dynamic (QInt8 weights, per channel; dynamic
             uint8 activations; MatMul and Conv).

Each iteration is timed after --warmup untimed ones. Prints one JSON object with the fields
of `vit bench --format json`: images_per_second and step_ms as {median, min, max},
iteration_ms, peak_rss_bytes (getrusage maxrss, taken before ONNX Runtime starts), threads,
provider, phases; for the infer- workloads also "onnxruntime" (an object like the above, or null with
"onnxruntime_skipped" saying why).
"""

import argparse
import contextlib
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time

import torch
import timm
from timm.models.vision_transformer import VisionTransformer

# The same hyper-parameters as src/bench.rs.
LR = 2e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.05
LABEL_SMOOTHING = 0.1
CLIP = 1.0
# infer-b16-int8: ONNX Runtime weights per channel, as ours (ORT_PER_CHANNEL=0: per tensor).
PER_CHANNEL = os.environ.get("ORT_PER_CHANNEL", "1") != "0"


def stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def peak_rss_bytes():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def torch_provider():
    """PyTorch's version, BLAS and the CPU kernels it dispatches to here."""
    blas = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    return (
        f"PyTorch {torch.__version__} eager (BLAS {blas.group(1) if blas else 'unknown'}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}), timm {timm.__version__}"
    )


def time_loop(step, warmup, iters, batch, phase_names):
    """Runs step() warmup + iters times; step returns per-phase seconds."""
    for _ in range(warmup):
        step()
    times, phases = [], [[] for _ in phase_names]
    for _ in range(iters):
        start = time.perf_counter()
        parts = step()
        times.append(time.perf_counter() - start)
        for series, t in zip(phases, parts):
            series.append(t)
    step_ms = [1e3 * t for t in times]
    return {
        "images_per_second": stats([batch / t for t in times]),
        "step_ms": stats(step_ms),
        "iteration_ms": step_ms,
        "phases": [
            {"name": n, "median_ms": 1e3 * statistics.median(s)}
            for n, s in zip(phase_names, phases)
        ],
    }


def resnet18_fmnist():
    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    return model


def train_fm(args, resnet=False):
    torch.manual_seed(0)
    if resnet:
        model = resnet18_fmnist().train()
    else:
        model = VisionTransformer(
            img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=192, depth=12,
            num_heads=3, mlp_ratio=4.0, qkv_bias=True, global_pool="token",
        ).train()
    # Weight decay on matrices only, as src/train/optim.rs (`decays`).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and name not in ("pos_embed", "cls_token") else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=BETAS, eps=EPS,
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
    batch = 128
    x = torch.rand(batch, 1, 28, 28) * 2 - 1
    y = torch.randint(0, 10, (batch,))

    def step():
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss).item():
            raise SystemExit(f"loss became {loss.item()}")
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    phases = ["forward + loss", "backward", "optimizer (clip + AdamW)"]
    return model, batch, time_loop(step, args.warmup, args.iters, batch, phases)


def infer(args, swin=False, int8=False):
    torch.manual_seed(0)
    if swin:
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    else:
        model = VisionTransformer(
            img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
            num_heads=12, mlp_ratio=4.0, qkv_bias=True, global_pool="token",
        ).eval()
    batch = 8
    x = torch.rand(batch, 3, 224, 224) * 2 - 1
    timed = model
    if int8:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timed = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    # --dtype bf16: the reference documents' mixed precision, torch.autocast on the CPU
    # (matrix products in bf16, LayerNorm and softmax in f32).
    bf16 = args.dtype == "bf16"

    def step():
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            timed(x)
        return (time.perf_counter() - t0,)

    return model, batch, time_loop(step, args.warmup, args.iters, batch, ["forward"])


@contextlib.contextmanager
def stdout_to_stderr():
    """Keeps stdout for the one JSON object: the exporters print progress there."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def export_onnx(model, x, path):
    """Exports with the TorchScript exporter, else the dynamo one; returns its name."""
    errors = []
    for dynamo in (False, True):
        try:
            with torch.no_grad(), stdout_to_stderr():
                torch.onnx.export(
                    model, (x,), path, input_names=["x"], output_names=["logits"],
                    opset_version=17 if not dynamo else None, dynamo=dynamo,
                )
            return "dynamo" if dynamo else "torchscript"
        except Exception as e:  # noqa: BLE001 - any failure means: skip ORT, say why
            first = (str(e).strip().splitlines() or [""])[0]
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(e).__name__}: {first[:300]}")
    raise RuntimeError("; ".join(errors))


def onnxruntime_infer(model, batch, args, int8=False):
    """ONNX Runtime on the exported model (with `int8`, its quantize_dynamic): (result, None) or
    (None, why it was skipped)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return None, f"onnxruntime is not importable ({e})"
    x = torch.rand(batch, 3, 224, 224) * 2 - 1
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:
            exporter = export_onnx(model, x, path)
        except Exception as e:  # noqa: BLE001
            return None, f"ONNX export failed: {e}"
        if int8:
            try:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                qpath = os.path.join(tmp, "model-int8.onnx")
                with stdout_to_stderr():
                    quantize_dynamic(path, qpath, weight_type=QuantType.QInt8, per_channel=PER_CHANNEL)
                path = qpath
                exporter += f", quantize_dynamic QInt8 per {'channel' if PER_CHANNEL else 'tensor'}"
            except Exception as e:  # noqa: BLE001
                return None, f"ONNX Runtime quantize_dynamic failed: {type(e).__name__}: {e}"
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            return None, f"ONNX Runtime could not load the export ({type(e).__name__}: {e})"
    feed = {sess.get_inputs()[0].name: x.numpy()}

    def step():
        t0 = time.perf_counter()
        sess.run(None, feed)
        return (time.perf_counter() - t0,)

    r = time_loop(step, args.warmup, args.iters, batch, ["forward"])
    r.update(
        runtime="onnxruntime",
        provider=f"ONNX Runtime {ort.__version__} (CPUExecutionProvider, exported by torch {exporter})",
        threads=args.threads,
    )
    return r, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", required=True, choices=["train-fm", "infer-b16", "infer-b16-int8", "train-resnet", "infer-swin-t"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-onnxruntime", action="store_true", help="skip ONNX Runtime (inference)")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                    help="inference: bf16 runs under torch.autocast (ONNX Runtime is then skipped)")
    args = ap.parse_args()
    if args.iters < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("need --iters >= 1, --warmup >= 0 and --threads >= 1")
    torch.set_num_threads(args.threads)

    run = {
        "train-fm": train_fm,
        "train-resnet": lambda a: train_fm(a, resnet=True),
        "infer-b16": infer,
        "infer-b16-int8": lambda a: infer(a, int8=True),
        "infer-swin-t": lambda a: infer(a, swin=True),
    }[args.workload]
    model, batch, r = run(args)
    out = {
        "workload": args.workload,
        "runtime": "pytorch",
        "batch": batch,
        "params": sum(p.numel() for p in model.parameters()),
        "iters": args.iters,
        "warmup": args.warmup,
        **r,
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
        "provider": torch_provider()
        + (", bf16 autocast" if args.dtype == "bf16" else "")
        + (f", dynamic int8 nn.Linear ({torch.backends.quantized.engine} engine)" if args.workload.endswith("-int8") else ""),
    }
    if args.dtype == "bf16":
        out["onnxruntime"], out["onnxruntime_skipped"] = None, "no bf16 CPU path to compare"
    elif args.workload.startswith("infer-") and not args.no_onnxruntime:
        out["onnxruntime"], why = onnxruntime_infer(model, batch, args, int8=args.workload.endswith("-int8"))
        if why:
            out["onnxruntime_skipped"] = why
    print(json.dumps(out))


if __name__ == "__main__":
    main()
