//! Training and evaluation: the loop from batch to weight update (forward, label-smoothed
//! cross-entropy, backward, accumulation, clipping, AdamW, schedule), per-epoch validation,
//! crash-safe checkpoints with exact resume, metrics, and the final report.

mod eval;
mod optim;
mod progress;
mod recipe;
mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::config::{Preprocess, ViTConfig};
use crate::data::{self, AugmentConfig, DataLoader, Dataset, LoaderConfig, Split, ValSize};
use crate::model::init_params;
use crate::weights::{self, Checkpoint, PosResample, SaveMeta};
use crate::{ops, Error, Result, VisionTransformer};

pub use eval::{evaluate, EvalResult};
pub use optim::{decays, AdamW, AdamWConfig, Schedule};
pub use progress::{Progress, ProgressMode};
pub use recipe::Recipe;
pub use report::{confusion_picture, curves_picture, EpochMetrics};

/// File names inside a run folder.
pub const LAST: &str = "checkpoint-last.safetensors";
pub const BEST: &str = "checkpoint-best.safetensors";
pub const METRICS: &str = "metrics.jsonl";
pub const RECIPE: &str = "config.toml";

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub out: PathBuf,
    pub epochs: Vec<EpochMetrics>,
    pub test: EvalResult,
    pub best_val_acc: f64,
    pub seconds: f64,
    /// Files written at the end (report, pictures).
    pub files: Vec<PathBuf>,
}

/// Where training is within the run; saved in every checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Position {
    epoch: u64,
    /// Next batch of `epoch` to train on.
    batch: u64,
    /// Optimizer steps done.
    step: u64,
    best_val_acc: f64,
    // Running sums of the current epoch, so a mid-epoch resume reports the same numbers.
    loss_sum: f64,
    correct: u64,
    seen: u64,
    seconds: f64,
}

impl Position {
    fn to_tensors(self) -> Result<HashMap<String, Tensor>> {
        let dev = Device::Cpu;
        let ints = [self.epoch, self.batch, self.step, self.correct, self.seen];
        let floats = [self.best_val_acc, self.loss_sum, self.seconds];
        Ok(HashMap::from([
            (
                "position.ints".to_string(),
                Tensor::new(&ints.map(|x| x as i64), &dev)?,
            ),
            ("position.floats".to_string(), Tensor::new(&floats, &dev)?),
        ]))
    }

    fn from_tensors(state: &HashMap<String, Tensor>) -> Result<Self> {
        let missing = || Error::Invalid("checkpoint has no training position".into());
        let i = state
            .get("position.ints")
            .ok_or_else(missing)?
            .to_vec1::<i64>()?;
        let f = state
            .get("position.floats")
            .ok_or_else(missing)?
            .to_vec1::<f64>()?;
        if i.len() != 5 || f.len() != 3 {
            return Err(missing());
        }
        Ok(Position {
            epoch: i[0] as u64,
            batch: i[1] as u64,
            step: i[2] as u64,
            correct: i[3] as u64,
            seen: i[4] as u64,
            best_val_acc: f[0],
            loss_sum: f[1],
            seconds: f[2],
        })
    }
}

/// The device named by a recipe.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::new_cuda(0)?),
        other => Err(Error::Unknown {
            kind: "device",
            name: other.into(),
            hint: " (known: cpu, cuda)".into(),
        }),
    }
}

/// The datasets of a run: training, validation (held out of training) and test.
pub struct Data {
    pub train: Dataset,
    pub val: Dataset,
    pub test: Dataset,
    pub augment: AugmentConfig,
}

/// Loads the recipe's dataset at the model's input size and channel count.
pub fn load_data(recipe: &Recipe, cfg: &ViTConfig, quiet: bool) -> Result<Data> {
    let spec = recipe.dataset_spec()?;
    let opts = data::LoadOptions {
        quiet,
        image_size: Some((cfg.image_size[0], cfg.image_size[1])),
        channels: Some(cfg.in_channels),
        ..Default::default()
    };
    let full = data::load(&spec, Split::Train, recipe.data_dir.as_deref(), &opts)?;
    let test = data::load(&spec, Split::Test, recipe.data_dir.as_deref(), &opts)?;
    if full.num_classes() != cfg.num_classes {
        return Err(Error::Config(format!(
            "dataset {} has {} classes but the model has num_classes = {}",
            recipe.dataset,
            full.num_classes(),
            cfg.num_classes
        )));
    }
    let (train, val) = if recipe.val_size == 0 {
        (
            full,
            Dataset::new(
                vec![],
                vec![],
                test.channels,
                test.height,
                test.width,
                test.class_names.clone(),
            )?,
        )
    } else {
        data::split_validation(&full, ValSize::Count(recipe.val_size), recipe.seed)?
    };
    let mut augment = AugmentConfig::for_spec(&spec, cfg.in_channels, recipe.crop_pad);
    if let Some(f) = recipe.hflip {
        augment.hflip = f;
    }
    augment.erase_prob = recipe.random_erase;
    Ok(Data {
        train,
        val,
        test,
        augment,
    })
}

/// A model whose parameters are trainable `Var`s, in `param_shapes` order.
pub struct Trainable {
    pub model: VisionTransformer,
    pub params: Vec<(String, Var)>,
}

impl Trainable {
    /// Builds the model from tensors (timm naming) as trainable variables.
    pub fn new(cfg: &ViTConfig, tensors: &HashMap<String, Tensor>, dev: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let mut params = Vec::new();
        {
            let mut data = varmap.data().lock().expect("varmap lock");
            for (name, _) in cfg.param_shapes() {
                let t = tensors.get(&name).ok_or_else(|| {
                    Error::Invalid(format!("no initial value for parameter {name}"))
                })?;
                let var = Var::from_tensor(&t.to_device(dev)?.to_dtype(DType::F32)?)?;
                data.insert(name.clone(), var.clone());
                params.push((name, var));
            }
        }
        let model = VisionTransformer::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
        Ok(Trainable { model, params })
    }

    /// Current weights by name.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// An AdamW optimizer over all parameters, in `param_shapes` order.
    pub fn adamw(&self, cfg: AdamWConfig) -> AdamW {
        AdamW::new(self.params.clone(), cfg)
    }
}

/// What [`forward_backward`] did with one micro-batch.
pub struct MicroStep {
    /// (B, classes), for accuracy.
    pub logits: Tensor,
    /// The label-smoothed cross-entropy; not finite means backward was skipped.
    pub loss: f64,
    /// Wall time of the forward pass and the loss.
    pub forward: Duration,
    /// Wall time of backward and of adding the gradients into the optimizer.
    pub backward: Duration,
}

/// The randomness of one shard of a micro-batch: `rngs(shard)` gives shard `shard` its
/// dropout / drop-path stream (`None`: no randomness, as in the benchmark).
pub type ShardRngs<'a> = &'a (dyn Fn(usize) -> Option<ChaCha8Rng> + Sync);

/// Fewest samples in a shard: smaller micro-batches run whole.
const MIN_SHARD: usize = 8;

/// How many shards of consecutive samples a micro-batch of `batch` is split into: two on
/// the CPU (run side by side, one per core of a 2-core machine, each shard's kernels still
/// free to use more), one elsewhere. A function of the batch only, never of the thread
/// count, so a run's numbers do not depend on the machine it runs on.
pub fn shard_count(dev: &Device, batch: usize) -> usize {
    if dev.is_cpu() && batch >= 2 * MIN_SHARD {
        2
    } else {
        1
    }
}

/// The (start, end) sample ranges of the [`shard_count`] shards of a batch of `n`.
fn shard_bounds(dev: &Device, n: usize) -> Vec<(usize, usize)> {
    let shards = shard_count(dev, n);
    (0..shards)
        .map(|i| (i * n / shards, (i + 1) * n / shards))
        .collect()
}

/// Logits of `model` for the batch `x` (inference), its shards run side by side.
pub fn forward_sharded(model: &VisionTransformer, x: &Tensor) -> Result<Tensor> {
    let logits: Vec<Tensor> = shard_bounds(x.device(), x.dim(0)?)
        .par_iter()
        .map(|&(s0, s1)| model.forward(&x.narrow(0, s0, s1 - s0)?))
        .collect::<Result<_>>()?;
    Ok(Tensor::cat(&logits, 0)?)
}

/// One micro-batch of training, up to the optimizer step: forward in training mode
/// (dropout and drop-path drawn from `rngs`), label-smoothed cross-entropy, backward of
/// loss / `accum_steps`, gradients added into `opt` (then [`AdamW::step`] clips and
/// updates). A loss that is not finite is returned before backward, nothing accumulated.
///
/// The micro-batch is split into [`shard_count`] shards run in parallel: each shard's
/// forward and backward is a chain of mostly small, serial candle operations, and two
/// chains side by side keep both cores busy where one would leave a core waiting. The
/// loss is the samples-weighted mean of the shards' losses, so the gradient is that of
/// the whole micro-batch; the shards' gradients are added in shard order (deterministic).
pub fn forward_backward(
    net: &Trainable,
    opt: &mut AdamW,
    x: &Tensor,
    y: &Tensor,
    label_smoothing: f64,
    accum_steps: usize,
    rngs: ShardRngs,
) -> Result<MicroStep> {
    let start = Instant::now();
    let n = x.dim(0)?;
    let bounds = shard_bounds(x.device(), n);
    // (logits, loss) of each shard, in shard order.
    let forward: Vec<(Tensor, Tensor)> = bounds
        .par_iter()
        .enumerate()
        .map(|(i, &(s0, s1))| -> Result<(Tensor, Tensor)> {
            let mut rng = rngs(i);
            let logits = net
                .model
                .forward_t(&x.narrow(0, s0, s1 - s0)?, &mut rng.as_mut())?;
            let loss = ops::cross_entropy(&logits, &y.narrow(0, s0, s1 - s0)?, label_smoothing)?;
            Ok((logits, loss))
        })
        .collect::<Result<_>>()?;
    let weight = |i: usize| (bounds[i].1 - bounds[i].0) as f64 / n as f64;
    let mut loss_value = 0f64;
    for (i, (_, loss)) in forward.iter().enumerate() {
        loss_value += weight(i) * loss.to_scalar::<f32>()? as f64;
    }
    let forward_time = start.elapsed();
    if loss_value.is_finite() {
        let grads: Vec<_> = forward
            .par_iter()
            .enumerate()
            .map(|(i, (_, loss))| (loss * (weight(i) / accum_steps as f64))?.backward())
            .collect::<std::result::Result<_, _>>()?;
        for g in &grads {
            opt.accumulate(g)?;
        }
    }
    let logits: Vec<Tensor> = forward.into_iter().map(|(l, _)| l).collect();
    Ok(MicroStep {
        logits: Tensor::cat(&logits, 0)?,
        loss: loss_value,
        forward: forward_time,
        backward: start.elapsed() - forward_time,
    })
}

/// Fresh or `init` weights for a new run.
fn initial_weights(
    recipe: &Recipe,
    cfg: &ViTConfig,
    dev: &Device,
) -> Result<(HashMap<String, Tensor>, Vec<String>)> {
    let fresh: HashMap<String, Tensor> = init_params(cfg, recipe.seed, dev)?.into_iter().collect();
    let Some(path) = &recipe.init else {
        return Ok((fresh, vec![]));
    };
    let ck = Checkpoint::load(path)?;
    let head = match (fresh.get("head.weight"), fresh.get("head.bias")) {
        (Some(w), Some(b)) => Some((w.clone(), b.clone())),
        _ => None,
    };
    ck.fit(cfg, PosResample::Timm, head)
}

/// Per-step randomness (dropout, drop-path): a ChaCha stream derived from (seed, step,
/// micro-batch, shard), so a resumed run draws exactly what an uninterrupted one would.
fn step_rng(seed: u64, step: u64, micro: u64, shard: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_d20b_0000_0000);
    let micro_shard = micro.wrapping_mul(16).wrapping_add(shard as u64);
    rng.set_stream(step.wrapping_mul(1 << 20).wrapping_add(micro_shard));
    rng
}

/// The run folder's default name: `runs/<UTC timestamp>`.
pub fn default_out_dir() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    PathBuf::from(format!(
        "runs/{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    ))
}

/// Trains as the recipe says, writing checkpoints, metrics and a report into its output
/// folder. With `resume`, continues the run in that folder exactly where its last
/// checkpoint left off; pass the folder's saved recipe ([`Recipe::of_run`]), changed only
/// where a change is meant (more epochs or steps).
pub fn train(
    recipe: &Recipe,
    resume: Option<&Path>,
    progress: &mut Progress,
) -> Result<RunSummary> {
    let out = match resume {
        Some(dir) => dir.to_path_buf(),
        None => recipe.out.clone().unwrap_or_else(default_out_dir),
    };
    let recipe = recipe.clone();
    recipe.validate()?;
    let cfg = recipe.model_config()?;
    let dev = device(&recipe.device)?;
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;

    let data = load_data(&recipe, &cfg, progress.is_quiet())?;
    if data.train.len() < recipe.batch_size {
        return Err(Error::Config(format!(
            "the training set has {} images, fewer than one batch of {}",
            data.train.len(),
            recipe.batch_size
        )));
    }
    let class_names = data.train.class_names.clone();
    let preprocess = Preprocess {
        mean: data.augment.mean.clone(),
        std: data.augment.std.clone(),
        crop_pct: 1.0,
        interpolation: "bicubic".into(),
        resize: "shorter".into(),
    };

    // Model, optimizer and position: fresh, or from the last checkpoint.
    let (tensors, mut pos, opt_state) = match resume {
        Some(dir) => {
            let ck = Checkpoint::load(&dir.join(LAST))?;
            let (t, _) = ck.fit(&cfg, PosResample::Timm, None)?;
            (
                t,
                Position::from_tensors(&ck.train_state)?,
                Some(ck.train_state),
            )
        }
        None => {
            let (t, warnings) = initial_weights(&recipe, &cfg, &dev)?;
            for w in warnings {
                progress.note(&format!("warning: {w}"));
            }
            (t, Position::default(), None)
        }
    };
    let net = Trainable::new(&cfg, &tensors, &dev)?;
    let mut opt = net.adamw(AdamWConfig {
        beta1: recipe.beta1,
        beta2: recipe.beta2,
        eps: recipe.eps,
        weight_decay: recipe.weight_decay,
    });
    if let Some(state) = &opt_state {
        opt.load_state(state)?;
    }
    let mut history = report::read_metrics(&out.join(METRICS), pos.epoch)?;

    // The resolved recipe travels with the run.
    let saved = Recipe {
        out: Some(out.clone()),
        ..recipe.clone()
    };
    let text = toml::to_string(&saved).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::atomic::write_atomic(&out.join(RECIPE), text.as_bytes())?;

    let micro = recipe.batch_size / recipe.accum_steps;
    let loader = DataLoader::new(
        data.train.clone(),
        LoaderConfig {
            batch_size: micro,
            shuffle: true,
            drop_last: true,
            seed: recipe.seed,
            augment: data.augment.clone(),
        },
    )?;
    let steps_per_epoch = (loader.num_batches() / recipe.accum_steps) as u64;
    if steps_per_epoch == 0 {
        return Err(Error::Config("an epoch has no full optimizer step".into()));
    }
    let batches_per_epoch = steps_per_epoch * recipe.accum_steps as u64;
    let schedule = Schedule {
        peak: recipe.lr,
        min_lr: recipe.min_lr,
        warmup: (recipe.warmup_epochs * steps_per_epoch as f64).round() as u64,
        total: recipe.epochs as u64 * steps_per_epoch,
    };
    let clip = (recipe.clip_grad > 0.0).then_some(recipe.clip_grad);
    let meta_extra = vec![("vit.recipe".to_string(), text.clone())];
    let save = |path: &Path, net: &Trainable, opt: &AdamW, pos: Position| -> Result<()> {
        let mut state = opt.state()?;
        state.extend(pos.to_tensors()?);
        let meta = SaveMeta {
            config: Some(&cfg),
            preprocess: Some(&preprocess),
            class_names: Some(&class_names),
            extra: meta_extra.clone(),
        };
        weights::save(path, &net.tensors(), &state, &meta)
    };

    let run_start = Instant::now();
    let mut stopped = false;
    while pos.epoch < recipe.epochs as u64 && !stopped {
        if recipe.max_steps.is_some_and(|m| pos.step >= m) {
            break;
        }
        let epoch_start = Instant::now() - std::time::Duration::from_secs_f64(pos.seconds);
        progress.start_epoch(
            pos.epoch as usize + 1,
            recipe.epochs,
            batches_per_epoch,
            pos.batch,
        );
        let batches = loader.epoch_from(pos.epoch, pos.batch as usize)?;
        for batch in batches {
            if batch.batch_index as u64 >= batches_per_epoch {
                break;
            }
            let micro_idx = batch.batch_index as u64 % recipe.accum_steps as u64;
            let x = Tensor::from_vec(batch.images, batch.shape.to_vec(), &dev)?;
            let n = batch.labels.len();
            let y = Tensor::from_vec(batch.labels, n, &dev)?;
            let step = pos.step;
            let rngs = move |shard| Some(step_rng(recipe.seed, step, micro_idx, shard));
            let MicroStep {
                logits,
                loss: loss_value,
                ..
            } = forward_backward(
                &net,
                &mut opt,
                &x,
                &y,
                recipe.label_smoothing,
                recipe.accum_steps,
                &rngs,
            )?;
            if !loss_value.is_finite() {
                return Err(Error::Numeric(format!(
                    "loss became {loss_value} at epoch {} step {}; stopped. The last good \
                     checkpoint is {}",
                    pos.epoch + 1,
                    pos.step,
                    out.join(LAST).display()
                )));
            }
            pos.loss_sum += loss_value * n as f64;
            pos.correct += eval::count_correct(&logits, &y)?;
            pos.seen += n as u64;
            pos.batch += 1;
            let lr = schedule.lr(pos.step);
            if micro_idx + 1 == recipe.accum_steps as u64 {
                opt.step(lr, clip)?;
                pos.step += 1;
            }
            pos.seconds = epoch_start.elapsed().as_secs_f64();
            progress.step(
                pos.batch,
                pos.loss_sum / pos.seen as f64,
                pos.correct as f64 / pos.seen as f64,
                lr,
                pos.seen as f64 / pos.seconds.max(1e-9),
            );
            let at_limit = recipe.max_steps.is_some_and(|m| pos.step >= m);
            if micro_idx + 1 == recipe.accum_steps as u64
                && recipe.checkpoint_every > 0
                && pos.step % recipe.checkpoint_every == 0
                && !at_limit
            {
                save(&out.join(LAST), &net, &opt, pos)?;
            }
            if at_limit {
                stopped = true;
                break;
            }
        }

        // End of epoch (or of a --max-steps run): validate, record, checkpoint.
        let val = if data.val.is_empty() {
            None
        } else {
            Some(evaluate(
                &net.model,
                &data.val,
                recipe.eval_batch_size,
                &data.augment,
                &dev,
            )?)
        };
        let m = EpochMetrics {
            epoch: pos.epoch as usize + 1,
            step: pos.step,
            train_loss: pos.loss_sum / pos.seen.max(1) as f64,
            train_acc: pos.correct as f64 / pos.seen.max(1) as f64,
            val_loss: val.as_ref().map(|v| v.loss),
            val_acc: val.as_ref().map(|v| v.accuracy),
            lr: schedule.lr(pos.step.saturating_sub(1)),
            seconds: pos.seconds,
            images_per_second: pos.seen as f64 / pos.seconds.max(1e-9),
        };
        progress.end_epoch(&m);
        history.push(m.clone());
        report::write_metrics(&out.join(METRICS), &history)?;
        let acc = m.val_acc.unwrap_or(m.train_acc);
        let is_best = acc > pos.best_val_acc || pos.epoch == 0;
        if is_best {
            pos.best_val_acc = acc;
        }
        if !stopped {
            pos = Position {
                epoch: pos.epoch + 1,
                batch: 0,
                loss_sum: 0.0,
                correct: 0,
                seen: 0,
                seconds: 0.0,
                ..pos
            };
        }
        // A --max-steps run that ends mid-epoch keeps its exact position for a resume.
        save(&out.join(LAST), &net, &opt, pos)?;
        if is_best {
            save(&out.join(BEST), &net, &opt, pos)?;
        }
    }

    // Final report on the test set, with the best checkpoint's weights.
    let best = Checkpoint::load(&out.join(BEST))?;
    let (best_tensors, _) = best.fit(&cfg, PosResample::Timm, None)?;
    let best_model = VisionTransformer::new(
        &cfg,
        VarBuilder::from_tensors(best_tensors, DType::F32, &dev),
    )?;
    let test = evaluate(
        &best_model,
        &data.test,
        recipe.eval_batch_size,
        &data.augment,
        &dev,
    )?;
    let files = report::write_report(&out, &saved, &cfg, &history, &test, &class_names)?;
    Ok(RunSummary {
        out,
        epochs: history,
        test,
        best_val_acc: pos.best_val_acc,
        seconds: run_start.elapsed().as_secs_f64(),
        files,
    })
}

#[cfg(test)]
mod tests;

/// Evaluates a checkpoint on a dataset's test split (`vit eval`): the architecture comes
/// from `arch` or the checkpoint, normalisation from the checkpoint's preprocessing
/// (else the dataset's statistics).
pub fn eval_checkpoint(
    path: &Path,
    arch: &weights::Arch,
    dataset: &str,
    data_dir: Option<&Path>,
    batch_size: usize,
    quiet: bool,
) -> Result<EvalResult> {
    let ck = Checkpoint::load(path)?;
    let cfg = ck.resolve_config(arch, None)?;
    let (tensors, _) = ck.fit(&cfg, PosResample::Timm, None)?;
    let model = VisionTransformer::new(
        &cfg,
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
    )?;
    let spec: data::DatasetSpec = dataset.parse()?;
    let opts = data::LoadOptions {
        quiet,
        image_size: Some((cfg.image_size[0], cfg.image_size[1])),
        channels: Some(cfg.in_channels),
        ..Default::default()
    };
    let test = data::load(&spec, Split::Test, data_dir, &opts)?;
    if test.num_classes() != cfg.num_classes {
        return Err(Error::Config(format!(
            "dataset {dataset} has {} classes but the checkpoint's model has {}",
            test.num_classes(),
            cfg.num_classes
        )));
    }
    let augment = match &ck.preprocess {
        Some(p) => AugmentConfig::normalize_only(p.mean.clone(), p.std.clone()),
        None => AugmentConfig::for_spec(&spec, cfg.in_channels, 0).deterministic(),
    };
    augment.validate(cfg.in_channels)?;
    evaluate(&model, &test, batch_size.max(1), &augment, &Device::Cpu)
}
