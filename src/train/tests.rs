//! Golden tests of one training step against PyTorch (fixture `grad_tiny`, made by
//! `scripts/make_fixtures.py`): every parameter gradient, and two clipped AdamW steps.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use super::step::{
    forward_backward, shard_bounds, step_rng, Micro, MicroStep, ShardRngs, Shards, StepOptions,
    Teaching, Trainable,
};
use super::AdamW;
use crate::dist::Single;

/// The golden fixture's AdamW settings.
const ADAMW: AdamWConfig = AdamWConfig {
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.05,
};

/// [`forward_backward`] of a whole micro-batch by one process.
#[allow(clippy::too_many_arguments)]
fn step(
    net: &Trainable,
    opt: &mut AdamW,
    x: &Tensor,
    y: &Tensor,
    label_smoothing: f64,
    accum_steps: usize,
    rngs: ShardRngs,
    teacher: Teaching,
    checkpoint: bool,
) -> crate::Result<MicroStep> {
    let shards = Shards::whole(x.device(), x.dim(0)?);
    let micro = Micro {
        x,
        y,
        shards: &shards,
        teacher,
    };
    let opts = StepOptions {
        label_smoothing,
        accum_steps,
        checkpoint,
        precision: crate::ops::Precision::F32,
    };
    forward_backward(net, opt, &micro, opts, rngs, &Single)
}
use super::*;
use crate::models::{Architecture, Mode, ModelConfig};
use crate::ops;
use crate::weights::{Checkpoint, PosResample};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/grad_tiny")
        .join(rel)
}

struct Golden {
    cfg: ModelConfig,
    net: Trainable,
    want: HashMap<String, Tensor>,
    x: Tensor,
    y: Tensor,
}

fn golden() -> Golden {
    let cfg = ModelConfig::from_file(&fixture("config.json")).unwrap();
    let ck = Checkpoint::load(&fixture("model.safetensors")).unwrap();
    let (tensors, _) = ck.fit(&cfg, PosResample::Timm, None).unwrap();
    let net = Trainable::new(&cfg, &tensors, &Device::Cpu).unwrap();
    let want =
        candle_core::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap();
    let x = want["input"].clone();
    let y = want["labels"].to_dtype(DType::U32).unwrap();
    Golden {
        cfg,
        net,
        want,
        x,
        y,
    }
}

/// max |got − want| / max |want| over the tensor.
fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    let diff = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff / scale.max(1e-12)
}

#[test]
fn every_gradient_matches_pytorch() {
    let g = golden();
    let logits = g.net.model.forward_t(&g.x, &mut Mode::Eval).unwrap();
    let loss = ops::cross_entropy(&logits, &g.y, 0.1).unwrap();
    let want_loss = g.want["loss"].to_vec1::<f32>().unwrap()[0];
    assert!((loss.to_scalar::<f32>().unwrap() - want_loss).abs() < 1e-5);
    let grads = loss.backward().unwrap();
    assert_eq!(g.net.params.len(), g.cfg.param_shapes().len());
    for (name, var) in &g.net.params {
        let got = grads.get(var.as_tensor()).unwrap();
        let err = rel_err(got, &g.want[&format!("grad.{name}")]);
        assert!(err <= 1e-4, "grad.{name}: relative error {err:e}");
    }
}

#[test]
fn two_clipped_adamw_steps_match_pytorch() {
    let g = golden();
    let mut opt = AdamW::new(g.net.params.clone(), ADAMW);
    let mut norms = vec![];
    for _ in 0..2 {
        let logits = g.net.model.forward_t(&g.x, &mut Mode::Eval).unwrap();
        let loss = ops::cross_entropy(&logits, &g.y, 0.1).unwrap();
        opt.accumulate(&loss.backward().unwrap()).unwrap();
        norms.push(opt.step(1e-3, Some(1.0)).unwrap());
    }
    let want_norm = g.want["grad_norm"].to_vec1::<f32>().unwrap()[0] as f64;
    assert!(
        (norms[0] - want_norm).abs() / want_norm < 1e-4,
        "{norms:?} vs {want_norm}"
    );
    let d = g.cfg.as_vit().unwrap().embed_dim;
    for (name, var) in &g.net.params {
        let (mut got, mut want) = (
            var.as_tensor().clone(),
            g.want[&format!("after2.{name}")].clone(),
        );
        if name.ends_with("attn.qkv.bias") {
            // The key bias adds the same q·b_k to every score of a row, which softmax
            // ignores: its true gradient is 0 and both frameworks compute rounding noise
            // (~1e-9). Adam divides that noise by its own size (m/√v), so the key-bias
            // update is noise in PyTorch and here alike. Compare the query and value parts.
            let pick = |t: &Tensor| {
                Tensor::cat(
                    &[t.narrow(0, 0, d).unwrap(), t.narrow(0, 2 * d, d).unwrap()],
                    0,
                )
                .unwrap()
            };
            let key_grad = g.want[&format!("grad.{name}")].narrow(0, d, d).unwrap();
            let key_max = key_grad
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                key_max < 1e-6,
                "{name}: key-bias gradient {key_max:e} is not ~0"
            );
            (got, want) = (pick(&got), pick(&want));
        }
        let err = rel_err(&got, &want);
        assert!(err <= 1e-4, "after2.{name}: relative error {err:e}");
    }
}

#[test]
fn one_process_and_two_split_a_micro_batch_the_same_way() {
    let cpu = Device::Cpu;
    let one = Shards::whole(&cpu, 19);
    assert_eq!((one.count(), one.samples()), (2, 0..19));
    assert_eq!(one.local_bounds(), vec![(0, 9), (9, 19)]);
    let (r0, r1) = (
        Shards::new(&cpu, 19, 0, 2).unwrap(),
        Shards::new(&cpu, 19, 1, 2).unwrap(),
    );
    assert_eq!((r0.count(), r0.samples(), r1.samples()), (2, 0..9, 9..19));
    assert_eq!(r1.local_bounds(), vec![(0, 10)]);
    // Three processes: three shards, one each.
    let r2 = Shards::new(&cpu, 19, 2, 3).unwrap();
    assert_eq!((r2.count(), r2.samples()), (3, 12..19));
    // A small micro-batch runs whole alone, but is still split for two processes.
    assert_eq!(Shards::whole(&cpu, 8).count(), 1);
    assert_eq!(Shards::new(&cpu, 8, 1, 2).unwrap().samples(), 4..8);
    let e = Shards::new(&cpu, 2, 0, 3).unwrap_err().to_string();
    assert!(e.contains("cannot be shared by 3 processes"), "{e}");
}

#[test]
fn bf16_autocast_gives_the_f32_gradients_within_bf16_rounding() {
    let g = golden();
    let n = 19;
    let pixels = (0..n * 256).map(|i| (i as f32 * 0.37).sin()).collect();
    let x = Tensor::from_vec(pixels, (n, 1, 16, 16), &Device::Cpu).unwrap();
    let y = Tensor::from_vec((0..n as u32).map(|i| i % 3).collect(), n, &Device::Cpu).unwrap();
    let run = |precision| {
        let mut opt = AdamW::new(g.net.params.clone(), ADAMW);
        let shards = Shards::whole(&Device::Cpu, n);
        let micro = Micro {
            x: &x,
            y: &y,
            shards: &shards,
            teacher: None,
        };
        let opts = StepOptions {
            label_smoothing: 0.1,
            accum_steps: 1,
            checkpoint: false,
            precision,
        };
        let m = forward_backward(&g.net, &mut opt, &micro, opts, &|_| None, &Single).unwrap();
        (opt, m.loss)
    };
    let (f32_run, f32_loss) = run(ops::Precision::F32);
    let (bf16_run, bf16_loss) = run(ops::Precision::Bf16);
    assert!(f32_loss != bf16_loss, "the bf16 products were not used");
    assert!(
        (f32_loss - bf16_loss).abs() < 1e-2 * f32_loss,
        "{f32_loss} vs {bf16_loss}"
    );
    for (name, _) in &g.net.params {
        let (a, b) = (f32_run.grad(name).unwrap(), bf16_run.grad(name).unwrap());
        assert!(b.iter().any(|&v| v != 0.0), "{name}: no gradient in bf16");
        let diff: f64 = a.iter().zip(b).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
        let norm: f64 = a.iter().map(|&p| (p as f64).powi(2)).sum();
        // bf16 keeps 8 bits of mantissa (relative rounding 2⁻⁹ ≈ 0.2% per operand).
        assert!(
            diff.sqrt() <= 0.05 * norm.sqrt() + 1e-6,
            "{name}: relative error {}",
            (diff / norm).sqrt()
        );
    }
}

#[test]
fn sharded_micro_batch_gives_the_whole_batch_gradient() {
    let g = golden();
    let n = 19; // two shards of 9 and 10
    assert_eq!(shard_bounds(&Device::Cpu, n), vec![(0, 9), (9, 19)]);
    let pixels = (0..n * 256).map(|i| (i as f32 * 0.37).sin()).collect();
    let x = Tensor::from_vec(pixels, (n, 1, 16, 16), &Device::Cpu).unwrap();
    let y = Tensor::from_vec((0..n as u32).map(|i| i % 3).collect(), n, &Device::Cpu).unwrap();
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.05,
    };
    // Sharded, accumulated over two micro-batches (accum_steps 2), twice: deterministic.
    let sharded = || {
        let mut opt = AdamW::new(g.net.params.clone(), cfg);
        let mut losses = vec![];
        for _ in 0..2 {
            let m = step(&g.net, &mut opt, &x, &y, 0.1, 2, &|_| None, None, false).unwrap();
            assert_eq!(m.logits.dims(), &[n, g.cfg.num_classes()]);
            losses.push(m.loss);
        }
        opt.reduce(&Single).unwrap(); // the shards' lanes into one gradient
        (opt, losses)
    };
    let (a, losses) = sharded();
    let (b, _) = sharded();
    // The whole batch in one piece.
    let logits = g.net.model.forward_t(&x, &mut Mode::Eval).unwrap();
    let loss = ops::cross_entropy(&logits, &y, 0.1).unwrap();
    let whole = loss.backward().unwrap();
    let want_loss = loss.to_scalar::<f32>().unwrap() as f64;
    for l in losses {
        assert!((l - want_loss).abs() < 1e-6, "{l} vs {want_loss}");
    }
    for (name, var) in &g.net.params {
        let got = a.grad(name).unwrap();
        assert_eq!(got, b.grad(name).unwrap(), "{name}: not deterministic");
        let got = Tensor::from_slice(got, var.shape(), &Device::Cpu).unwrap();
        let want = whole.get(var.as_tensor()).unwrap();
        let err = rel_err(&got, want);
        assert!(err <= 1e-5, "{name}: relative error {err:e}");
    }
}

#[test]
fn no_decay_for_biases_norms_positions_and_class_token() {
    assert!(decays("blocks.0.attn.qkv.weight", 2));
    assert!(decays("patch_embed.proj.weight", 4));
    for (n, r) in [
        ("pos_embed", 3),
        ("cls_token", 3),
        ("norm.weight", 1),
        ("head.bias", 1),
    ] {
        assert!(!decays(n, r), "{n}");
    }
}

#[test]
fn step_rng_depends_only_on_seed_step_micro_batch_and_shard() {
    use rand::RngExt;
    let a: u64 = step_rng(1, 5, 0, 0).random();
    assert_eq!(a, step_rng(1, 5, 0, 0).random::<u64>());
    assert_ne!(a, step_rng(1, 6, 0, 0).random::<u64>());
    assert_ne!(a, step_rng(1, 5, 1, 0).random::<u64>());
    assert_ne!(a, step_rng(1, 5, 0, 1).random::<u64>());
    assert_ne!(a, step_rng(2, 5, 0, 0).random::<u64>());
}

#[test]
fn default_out_dir_is_a_timestamp() {
    let d = default_out_dir();
    let s = d.to_str().unwrap();
    assert!(
        s.starts_with("runs/20") && s.len() == "runs/20261121-223547".len(),
        "{s}"
    );
}

/// Gradient checkpointing: the same loss and the same gradients as the plain step, with
/// every kind of dropout and stochastic depth drawing (the recomputed blocks replay their
/// random streams), for a ViT and for a distilled DeiT learning from a teacher.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    use crate::models::ViTConfig;
    let dev = Device::Cpu;
    let n = 19; // two shards
    let pixels = (0..n * 256).map(|i| (i as f32 * 0.37).sin()).collect();
    let x = Tensor::from_vec(pixels, (n, 1, 16, 16), &dev).unwrap();
    let y = Tensor::from_vec((0..n as u32).map(|i| i % 3).collect(), n, &dev).unwrap();
    let teacher = Tensor::from_vec(
        (0..n * 3).map(|i| (i as f32 * 0.7).cos()).collect(),
        (n, 3),
        &dev,
    )
    .unwrap();
    let distill = distill::Distill {
        kind: distill::DistillKind::Soft,
        alpha: 0.5,
        tau: 2.0,
    };
    for distilled in [false, true] {
        let cfg = ModelConfig::Vit(ViTConfig {
            in_channels: 1,
            num_classes: 3,
            distilled,
            embed_dropout: 0.1,
            attn_dropout: 0.1,
            proj_dropout: 0.1,
            head_dropout: 0.1,
            drop_path: 0.2,
            ..ViTConfig::timm(16, 4, 32, 3, 2)
        });
        let params: HashMap<String, Tensor> =
            cfg.init_params(5, &dev).unwrap().into_iter().collect();
        let net = Trainable::new(&cfg, &params, &dev).unwrap();
        let teaching = distilled.then_some((&teacher, &distill));
        let run = |checkpoint: bool| {
            let mut opt = net.adamw(ADAMW);
            let rngs = |shard| Some(step_rng(7, 3, 1, shard));
            let m = step(&net, &mut opt, &x, &y, 0.1, 2, &rngs, teaching, checkpoint).unwrap();
            (opt, m.loss, m.logits)
        };
        let (plain, loss, logits) = run(false);
        let (ckpt, ckpt_loss, ckpt_logits) = run(true);
        assert_eq!(loss, ckpt_loss, "distilled {distilled}");
        assert_eq!(
            logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            ckpt_logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        for (name, _) in &net.params {
            let (a, b) = (plain.grad(name).unwrap(), ckpt.grad(name).unwrap());
            assert!(a.iter().any(|&v| v != 0.0), "{name}: no gradient");
            // Bit for bit: each parameter's gradient is the same vector-Jacobian product,
            // summed in the same order.
            assert_eq!(a, b, "distilled {distilled}, {name}");
        }
    }
}

#[test]
fn gradient_checkpointing_refuses_a_model_without_blocks_to_recompute() {
    let dev = Device::Cpu;
    let cfg = ModelConfig::preset("cnn_simple_fmnist").unwrap();
    let params: HashMap<String, Tensor> = cfg.init_params(0, &dev).unwrap().into_iter().collect();
    let net = Trainable::new(&cfg, &params, &dev).unwrap();
    let mut opt = net.adamw(AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    });
    let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &dev).unwrap();
    let y = Tensor::new(&[0u32, 1], &dev).unwrap();
    let e = step(&net, &mut opt, &x, &y, 0.0, 1, &|_| None, None, true)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("gradient checkpointing is built for ViT-family models"),
        "{e}"
    );
}
