//! `vit bench`: times fixed workloads, the ones `bench/compare.sh` also runs in PyTorch.
//! `train-fm` is one full training step of a ViT as `train` takes it (forward,
//! label-smoothed cross-entropy, backward, clipping, AdamW); `train-resnet` the same for
//! ResNet-18 with the small-image stem; `infer-b16` is a ViT-B/16 forward pass.
//! Reports the median throughput over timed iterations, peak memory, threads and the
//! matmul provider.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::dist::Single;
use crate::models::{Architecture, Classifier, ModelConfig, ViTConfig};
use crate::train::{forward_backward, AdamW, AdamWConfig, Micro, Shards, StepOptions, Trainable};
use crate::{Error, Result};

/// The training step's hyper-parameters: the default recipe's peak learning rate, AdamW settings,
/// label smoothing and clipping. `bench/torch_bench.py` uses the same.
const LR: f64 = 2e-3;
const ADAMW: AdamWConfig = AdamWConfig {
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.05,
};
const LABEL_SMOOTHING: f64 = 0.1;
const CLIP: f64 = 1.0;

/// What is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// One AdamW training step on 128 random 1×28×28 images: image 28, patch 4, 10
    /// classes, width 192, depth 12, 3 heads, MLP 768 (DeiT-Ti widths).
    TrainFm,
    /// `vit_base_patch16_224` forward on 8 random 3×224×224 images, no gradient.
    InferB16,
    /// [`Workload::InferB16`] with the blocks' linear layers int8, as `vit quantize` writes
    /// them (per-channel weights, activations quantized per row as each product runs).
    InferB16Int8,
    /// One AdamW training step of `resnet18_fmnist` (ResNet-18, 3×3 stride-1 stem, no
    /// pool) on 128 random 1×28×28 images.
    TrainResnet,
    /// `swin_tiny_patch4_window7_224` forward on 8 random 3×224×224 images, no gradient.
    InferSwinT,
    /// One AdamW training step of `vit_base_patch16_224` on 32 random 3×224×224 images (the
    /// reference documents' memory-optimisation setting; with gradient checkpointing or not).
    TrainB16,
}

impl Workload {
    pub const ALL: [Workload; 6] = [
        Workload::TrainFm,
        Workload::InferB16,
        Workload::InferB16Int8,
        Workload::TrainResnet,
        Workload::InferSwinT,
        Workload::TrainB16,
    ];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::TrainFm => "train-fm",
            Workload::InferB16 => "infer-b16",
            Workload::InferB16Int8 => "infer-b16-int8",
            Workload::TrainResnet => "train-resnet",
            Workload::InferSwinT => "infer-swin-t",
            Workload::TrainB16 => "train-b16",
        }
    }

    /// The architecture.
    pub fn config(self) -> ModelConfig {
        let preset = |name| ModelConfig::preset(name).expect("a registered preset");
        match (self, self.vit_config()) {
            (_, Some(c)) => ModelConfig::Vit(c),
            (Workload::InferSwinT, None) => preset("swin_tiny_patch4_window7_224"),
            _ => preset("resnet18_fmnist"),
        }
    }

    /// The ViT workloads' config.
    fn vit_config(self) -> Option<ViTConfig> {
        match self {
            Workload::TrainFm => Some(ViTConfig {
                in_channels: 1,
                num_classes: 10,
                ..ViTConfig::timm(28, 4, 192, 12, 3)
            }),
            // timm vit_base_patch16_224.
            Workload::InferB16 | Workload::InferB16Int8 | Workload::TrainB16 => {
                Some(ViTConfig::timm(224, 16, 768, 12, 12))
            }
            Workload::TrainResnet | Workload::InferSwinT => None,
        }
    }

    /// Images per iteration.
    pub fn batch(self) -> usize {
        match self {
            Workload::TrainFm | Workload::TrainResnet => 128,
            Workload::TrainB16 => 32,
            Workload::InferB16 | Workload::InferB16Int8 | Workload::InferSwinT => 8,
        }
    }

    /// What one iteration does, in words.
    pub fn description(self) -> String {
        let vit = |what: &str, c: ViTConfig| {
            format!(
                "{what}: batch {} of {}x{}x{}, width {}, depth {}, {} heads, MLP {}",
                self.batch(),
                c.in_channels,
                c.image_size[0],
                c.image_size[1],
                c.embed_dim,
                c.depth,
                c.num_heads,
                c.mlp_hidden_dim()
            )
        };
        match (self, self.vit_config()) {
            (Workload::TrainFm, Some(c)) => vit("one AdamW training step", c),
            (Workload::TrainB16, Some(c)) => {
                vit("vit_base_patch16_224, one AdamW training step", c)
            }
            (Workload::InferB16, Some(c)) => vit("vit_base_patch16_224 forward, no gradient", c),
            (Workload::InferB16Int8, Some(c)) => vit(
                "vit_base_patch16_224 forward, blocks' linear layers int8, no gradient",
                c,
            ),
            (Workload::InferSwinT, _) => format!(
                "swin_tiny_patch4_window7_224 forward, no gradient: batch {} of 3x224x224",
                self.batch()
            ),
            _ => format!(
                "one AdamW training step: batch {} of 1x28x28, resnet18_fmnist (ResNet-18, \
                 3x3 stride-1 stem, no pool)",
                self.batch()
            ),
        }
    }

    /// The phases [`BenchReport::phases`] lists, in order.
    pub fn phases(self) -> &'static [&'static str] {
        match self {
            Workload::TrainFm | Workload::TrainResnet | Workload::TrainB16 => {
                &["forward + loss", "backward", "optimizer (clip + AdamW)"]
            }
            Workload::InferB16 | Workload::InferB16Int8 | Workload::InferSwinT => &["forward"],
        }
    }
}

impl FromStr for Workload {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| Error::Unknown {
                kind: "workload",
                name: s.into(),
                hint: " (known: train-fm, infer-b16, infer-b16-int8, train-resnet, \
                       infer-swin-t, train-b16)"
                    .into(),
            })
    }
}

/// How to run a benchmark.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    pub workload: Workload,
    /// Timed iterations; at least 1.
    pub iters: usize,
    /// Untimed iterations before them (caches, allocator, thread pool).
    pub warmup: usize,
    /// Also report the median time of each phase.
    pub profile: bool,
    /// Training workloads: gradient checkpointing (see `train::forward_backward`).
    pub grad_checkpoint: bool,
    /// Inference workloads: the precision of the layers' products ([`crate::ops::set_inference_dtype`]).
    pub dtype: crate::ops::Precision,
}

/// Median, minimum and maximum of a series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    /// `None` for an empty series. The median of an even count is the mean of the two
    /// middle values.
    pub fn of(xs: &[f64]) -> Option<Stats> {
        let mut v = xs.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Some(Stats {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// The median time of one phase of an iteration.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseTime {
    pub name: &'static str,
    pub median_ms: f64,
}

/// The result of a benchmark; serialised as the JSON `vit bench --format json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub workload: &'static str,
    pub description: String,
    /// Images per iteration.
    pub batch: usize,
    pub params: usize,
    pub iters: usize,
    pub warmup: usize,
    /// Per timed iteration: batch / wall time.
    pub images_per_second: Stats,
    /// Per timed iteration: wall time in milliseconds.
    pub step_ms: Stats,
    /// Every timed iteration's wall time in milliseconds, in order.
    pub iteration_ms: Vec<f64>,
    /// Peak resident memory of the process (VmHWM); `None` where it cannot be read.
    pub peak_rss_bytes: Option<u64>,
    /// candle's (and rayon's) thread count.
    pub threads: usize,
    /// The matrix-multiply provider and the instruction set it uses here.
    pub provider: String,
    /// The instruction set of the fused kernels' own loops.
    pub kernels: &'static str,
    /// The int8 kernel (int8 workloads): "AVX-512 VNNI", "AVX2" or "portable".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub int8_kernel: Option<&'static str>,
    /// With `profile`: each phase's median, in [`Workload::phases`] order.
    pub phases: Option<Vec<PhaseTime>>,
}

/// Builds the workload's model and random batch, runs `warmup` then `iters` iterations
/// and measures each.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    if opts.iters == 0 {
        return Err(Error::Invalid(
            "bench needs at least 1 timed iteration (--iters)".into(),
        ));
    }
    let w = opts.workload;
    let inference = matches!(
        w,
        Workload::InferB16 | Workload::InferB16Int8 | Workload::InferSwinT
    );
    if opts.dtype != crate::ops::Precision::F32 && !inference {
        return Err(Error::Invalid(format!(
            "--dtype bf16 is for the inference workloads, not {}",
            w.name()
        )));
    }
    if opts.grad_checkpoint && inference {
        return Err(Error::Invalid(format!(
            "--grad-checkpoint is for the training workloads, not {}",
            w.name()
        )));
    }
    crate::ops::set_inference_dtype(opts.dtype)?;
    let mut runner = Runner::new(w, &Device::Cpu, opts.grad_checkpoint)?;
    for _ in 0..opts.warmup {
        runner.iteration()?;
    }
    let mut step_ms = Vec::with_capacity(opts.iters);
    let mut phase_ms = vec![Vec::with_capacity(opts.iters); w.phases().len()];
    for _ in 0..opts.iters {
        let start = Instant::now();
        let phases = runner.iteration()?;
        step_ms.push(ms(start.elapsed()));
        for (series, t) in phase_ms.iter_mut().zip(phases) {
            series.push(ms(t));
        }
    }
    let batch = w.batch() as f64;
    let ips: Vec<f64> = step_ms.iter().map(|t| batch * 1e3 / t).collect();
    let phases: Option<Vec<PhaseTime>> = opts.profile.then(|| {
        w.phases()
            .iter()
            .zip(&phase_ms)
            .map(|(&name, series)| PhaseTime {
                name,
                median_ms: Stats::of(series).map_or(0.0, |s| s.median),
            })
            .collect()
    });
    Ok(BenchReport {
        workload: w.name(),
        description: w.description(),
        batch: w.batch(),
        params: w.config().num_params(),
        iters: opts.iters,
        warmup: opts.warmup,
        images_per_second: Stats::of(&ips).expect("iters >= 1"),
        step_ms: Stats::of(&step_ms).expect("iters >= 1"),
        iteration_ms: step_ms,
        peak_rss_bytes: peak_rss_bytes(),
        threads: candle_core::utils::get_num_threads(),
        provider: crate::ops::matmul_provider(),
        kernels: crate::ops::kernel_isa(),
        int8_kernel: (w == Workload::InferB16Int8).then(crate::ops::int8_kernel),
        phases,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A workload ready to run: model (with optimizer) and one fixed random batch.
enum Runner {
    Train {
        net: Trainable,
        opt: AdamW,
        x: Tensor,
        y: Tensor,
        checkpoint: bool,
    },
    Infer {
        model: Box<dyn Classifier>,
        x: Tensor,
    },
}

impl Runner {
    fn new(w: Workload, dev: &Device, checkpoint: bool) -> Result<Self> {
        let cfg = w.config();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let b = w.batch();
        let ([ih, iw], ch) = (cfg.image_size(), cfg.in_channels());
        let shape = (b, ch, ih, iw);
        let n = b * ch * ih * iw;
        let pixels: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        let x = Tensor::from_vec(pixels, shape, dev)?; // (B, C, H, W) in [-1, 1)
        Ok(match w {
            Workload::TrainFm | Workload::TrainResnet | Workload::TrainB16 => {
                let labels: Vec<u32> = (0..b)
                    .map(|_| rng.random_range(0..cfg.num_classes() as u32))
                    .collect();
                let params: HashMap<String, Tensor> =
                    cfg.init_params(0, dev)?.into_iter().collect();
                let net = Trainable::new(&cfg, &params, dev)?;
                let opt = net.adamw(ADAMW);
                Runner::Train {
                    net,
                    opt,
                    x,
                    y: Tensor::from_vec(labels, b, dev)?,
                    checkpoint,
                }
            }
            Workload::InferB16 | Workload::InferSwinT => Runner::Infer {
                // Plain tensors, not `Var`s: candle records no graph.
                model: cfg.init_model(0, dev)?,
                x,
            },
            Workload::InferB16Int8 => {
                // The same weights as infer-b16, quantized as `vit quantize` does.
                let mut params: HashMap<String, Tensor> =
                    cfg.init_params(0, dev)?.into_iter().collect();
                crate::quant::quantize_tensors(&cfg, &mut params)?;
                let vb = candle_nn::VarBuilder::from_tensors(params, candle_core::DType::F32, dev);
                Runner::Infer {
                    model: cfg.build(vb)?,
                    x,
                }
            }
        })
    }

    /// One iteration; returns the wall time of each of the workload's phases.
    fn iteration(&mut self) -> Result<Vec<Duration>> {
        match self {
            Runner::Train {
                net,
                opt,
                x,
                y,
                checkpoint,
            } => {
                // The same calls as one step of `train::train` with accum_steps = 1.
                let shards = Shards::whole(x.device(), x.dim(0)?);
                let micro = Micro {
                    x,
                    y,
                    shards: &shards,
                    teacher: None,
                };
                let opts = StepOptions {
                    label_smoothing: LABEL_SMOOTHING,
                    accum_steps: 1,
                    checkpoint: *checkpoint,
                    precision: crate::ops::Precision::F32,
                };
                let m = forward_backward(net, opt, &micro, opts, &|_| None, &Single)?;
                if !m.loss.is_finite() {
                    return Err(Error::Numeric(format!("bench: loss became {}", m.loss)));
                }
                let start = Instant::now();
                opt.step(LR, Some(CLIP))?;
                Ok(vec![m.forward, m.backward, start.elapsed()])
            }
            Runner::Infer { model, x } => {
                let start = Instant::now();
                model.forward(x)?;
                Ok(vec![start.elapsed()])
            }
        }
    }
}

/// One model measured without training, as the reference documents' `compare_vision_models`
/// prints it, but timed properly (warm-up, then the median of several runs).
#[derive(Debug, Clone, Serialize)]
pub struct ModelProfile {
    pub name: String,
    /// Input size [height, width] measured.
    pub image_size: [usize; 2],
    pub params: usize,
    /// Forward-pass GFLOPs of one image (a multiply-add counted as 2).
    pub gflops: f64,
    /// Output of one image (the logits' shape without the batch).
    pub output_shape: Vec<usize>,
    /// Forward pass of one image, milliseconds.
    pub latency_ms: Stats,
    /// Images per second of a forward pass at `batch`.
    pub images_per_second: Stats,
    pub batch: usize,
    /// Peak resident memory while this model was built and run (VmHWM after a reset);
    /// `None` where it cannot be read.
    pub peak_rss_bytes: Option<u64>,
}

/// Builds `cfg` with fresh weights and times its inference: `iters` runs of one image and
/// of a batch of `batch` images, after `warmup` runs of each.
pub fn profile_model(
    name: &str,
    cfg: &ModelConfig,
    batch: usize,
    iters: usize,
    warmup: usize,
) -> Result<ModelProfile> {
    if iters == 0 || batch == 0 {
        return Err(Error::Invalid(
            "compare needs at least 1 timed iteration and a batch of at least 1".into(),
        ));
    }
    let reset = reset_peak_rss();
    let dev = Device::Cpu;
    let params = cfg.init_params(0, &dev)?.into_iter().collect();
    let model = cfg.build(candle_nn::VarBuilder::from_tensors(
        params,
        candle_core::DType::F32,
        &dev,
    ))?;
    let [h, w] = cfg.image_size();
    let input = |b: usize| Tensor::randn(0f32, 1.0, (b, cfg.in_channels(), h, w), &dev);
    let time = |x: &Tensor| -> Result<Vec<f64>> {
        for _ in 0..warmup {
            model.forward(x)?;
        }
        (0..iters)
            .map(|_| {
                let start = Instant::now();
                model.forward(x)?;
                Ok(ms(start.elapsed()))
            })
            .collect()
    };
    let one = input(1)?;
    let output_shape = model.forward(&one)?.dims()[1..].to_vec();
    let latency = time(&one)?;
    let many = time(&input(batch)?)?;
    let ips: Vec<f64> = many.iter().map(|t| batch as f64 * 1e3 / t).collect();
    Ok(ModelProfile {
        name: name.to_string(),
        image_size: cfg.image_size(),
        params: cfg.num_params(),
        gflops: cfg.flops() as f64 / 1e9,
        output_shape,
        latency_ms: Stats::of(&latency).expect("iters >= 1"),
        images_per_second: Stats::of(&ips).expect("iters >= 1"),
        batch,
        peak_rss_bytes: if reset { peak_rss_bytes() } else { None },
    })
}

/// How cost grows with image size: GFLOPs per image and the latency of one image against
/// the pixel count, one line per model (rows of the same `name` at several sizes, in order),
/// two plots side by side. Global attention (a ViT), quadratic in the tokens, bends
/// upwards; windowed attention (Swin) is a straight line, as a CNN's.
pub fn scaling_picture(rows: &[ModelProfile]) -> Result<image::RgbImage> {
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        if !names.contains(&r.name.as_str()) {
            names.push(&r.name);
        }
    }
    let series = |y: &dyn Fn(&ModelProfile) -> f64| -> Vec<(String, Vec<(f32, f32)>)> {
        names
            .iter()
            .map(|&n| {
                let pts = rows
                    .iter()
                    .filter(|r| r.name == n)
                    .map(|r| {
                        let pixels = (r.image_size[0] * r.image_size[1]) as f32 / 1e3;
                        (pixels, y(r) as f32)
                    })
                    .collect();
                (n.to_string(), pts)
            })
            .collect()
    };
    let side = "pixels per image (thousands)";
    let flops = crate::viz::line_plot(&series(&|r| r.gflops), "GFLOPs per image", side, "GFLOPs")?;
    let time = crate::viz::line_plot(
        &series(&|r| r.latency_ms.median),
        "Latency of one image (median)",
        side,
        "ms",
    )?;
    crate::viz::image_grid(
        &[(String::new(), flops), (String::new(), time)],
        2,
        "Cost against image size",
        None,
    )
}

/// Resets this process's peak resident memory to its current size (Linux: writing 5 to
/// `/proc/self/clear_refs`), so the next reading is the peak since now. Whether it did.
pub fn reset_peak_rss() -> bool {
    cfg!(target_os = "linux") && std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident memory of this process in bytes (Linux: VmHWM); `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    if cfg!(target_os = "linux") {
        parse_vm_hwm(&std::fs::read_to_string("/proc/self/status").ok()?)
    } else {
        None
    }
}

/// The `VmHWM:   1234 kB` line of a `/proc/<pid>/status` text, in bytes.
pub fn parse_vm_hwm(status: &str) -> Option<u64> {
    let rest = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    let mut words = rest.split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next()? {
        "kB" => value.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_take_the_middle_of_odd_and_even_series() {
        let s = Stats::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!(
            s,
            Stats {
                median: 3.0,
                min: 1.0,
                max: 5.0
            }
        );
        let s = Stats::of(&[4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 10.0));
        assert_eq!(Stats::of(&[7.5]).unwrap().median, 7.5);
        assert_eq!(Stats::of(&[]), None);
    }

    #[test]
    fn vm_hwm_is_read_in_bytes() {
        let status = "Name:\tvit\nVmPeak:\t  900 kB\nVmHWM:\t  123456 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(123_456 * 1024));
        assert_eq!(parse_vm_hwm("Name:\tvit\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\tlots kB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\t12 MB\n"), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn this_process_has_a_peak_rss() {
        assert!(peak_rss_bytes().unwrap() > 0);
    }

    #[test]
    fn workloads_parse_by_name_and_match_the_issue() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>().unwrap(), w);
        }
        let e = "train".parse::<Workload>().unwrap_err().to_string();
        assert!(
            e.contains("unknown workload 'train'") && e.contains("infer-b16"),
            "{e}"
        );

        let c = Workload::TrainFm.vit_config().unwrap();
        assert_eq!(
            (c.image_size, c.patch_size, c.in_channels),
            ([28, 28], 4, 1)
        );
        assert_eq!((c.embed_dim, c.depth, c.num_heads), (192, 12, 3));
        assert_eq!(
            (c.mlp_hidden_dim(), c.num_classes, c.num_tokens()),
            (768, 10, 50)
        );
        assert!(c.qkv_bias && c.pool == crate::models::vit::Pool::Cls);
        assert_eq!(Workload::InferB16.config().num_params(), 86_567_656);
        assert_eq!(Workload::TrainResnet.config().arch(), "resnet");
        assert_eq!(Workload::InferSwinT.config().num_params(), 28_288_354);
    }

    #[test]
    fn options_for_the_other_kind_of_workload_are_refused() {
        let opts = |workload, grad_checkpoint, dtype| BenchOptions {
            workload,
            iters: 1,
            warmup: 0,
            profile: false,
            grad_checkpoint,
            dtype,
        };
        let e = run(&opts(Workload::TrainFm, false, crate::ops::Precision::Bf16))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--dtype bf16 is for the inference workloads"),
            "{e}"
        );
        let e = run(&opts(Workload::InferB16, true, crate::ops::Precision::F32))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--grad-checkpoint is for the training workloads"),
            "{e}"
        );
    }

    #[test]
    fn zero_iterations_is_an_error() {
        let e = run(&BenchOptions {
            workload: Workload::TrainFm,
            iters: 0,
            warmup: 0,
            profile: false,
            grad_checkpoint: false,
            dtype: Default::default(),
        })
        .unwrap_err();
        assert!(e.to_string().contains("--iters"), "{e}");
    }
}
