//! A training run, epoch by epoch: the data, the model and optimizer (fresh, from `--init`,
//! or resumed), the loop over batches with its schedule, per-epoch validation and
//! checkpoints, and the final test and report.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};

use super::distill::{Teacher, TeacherCache};
use super::eval::{evaluate_on, EvalResult};
use super::run_dir::{self, default_out_dir, Position, BEST, LAST, METRICS, RECIPE};
use super::step::{forward_backward, step_rng, Micro, MicroStep, Shards, StepOptions, Trainable};
use super::{report, AdamW, AdamWConfig, EpochMetrics, Progress, Recipe, RunSummary, Schedule};
use crate::data::{
    self, AugmentConfig, DataLoader, Images, LoaderConfig, PhotoCrop, Split, ValSize,
};
use crate::dist::Collective;
use crate::models::{self, Architecture, ModelConfig, Preprocess};
use crate::predict::{center_crop, load_model};
use crate::weights::{self, Arch, FitOptions, SaveMeta};
use crate::{Error, Result};

/// The device named by a recipe or a command's `--device`: `cpu`, or `cuda` / `cuda:N`
/// (the first or the N-th GPU, as PyTorch names them), which needs a build with the `cuda`
/// feature; without it, `cuda` is an error that says how to rebuild.
pub fn device(name: &str) -> Result<Device> {
    let gpu = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match name.strip_prefix("cuda:") {
            Some(n) => n.parse::<usize>().map_err(|_| {
                Error::Invalid(format!("'{name}': a GPU is cuda or cuda:N, N a GPU index"))
            })?,
            None => {
                return Err(Error::Unknown {
                    kind: "device",
                    name: name.into(),
                    hint: " (known: cpu, cuda, cuda:N)".into(),
                })
            }
        },
    };
    if !cfg!(feature = "cuda") {
        return Err(Error::Invalid(
            "this vit was built without CUDA; rebuild with \
             `cargo build --release --features cuda` (or `bash scripts/build-cuda.sh`)"
                .into(),
        ));
    }
    Ok(Device::new_cuda(gpu)?)
}

/// The datasets of a run: training, validation (held out of training) and test, with how
/// their images are prepared.
pub struct Data {
    pub train: Images,
    pub val: Images,
    pub test: Images,
    /// Training augmentation (its random parts off for evaluation).
    pub augment: AugmentConfig,
    /// Image files: the training crop (random resized) and the evaluation one.
    pub train_crop: PhotoCrop,
    pub eval_crop: PhotoCrop,
    /// Image files: decoding threads.
    pub workers: usize,
    /// How the trained model's inputs are prepared, saved with its checkpoints.
    pub preprocess: Preprocess,
}

impl Data {
    /// The loader settings for evaluating on `val` or `test`.
    pub fn eval_config(&self, batch_size: usize) -> LoaderConfig {
        LoaderConfig {
            crop: self.eval_crop,
            workers: self.workers,
            ..LoaderConfig::eval(
                batch_size,
                self.augment.mean.clone(),
                self.augment.std.clone(),
            )
        }
    }
}

/// Opens the recipe's dataset at the model's input size and channel count, and holds out
/// its validation set (`val_size` images; unset: [`ValSize::DEFAULT`]), then keeps
/// `train_fraction` of the rest (class-balanced). Image folders are
/// streamed (random resized crops for training, the preset's resize and center crop for
/// evaluation, normalised with the preset's pretrained statistics); other datasets are
/// held in memory, padded-cropped and normalised with the dataset's statistics. The class
/// count is checked against the model by [`train`] (which may take it from the data).
pub fn load_data(recipe: &Recipe, cfg: &ModelConfig, quiet: bool) -> Result<Data> {
    let spec = recipe.dataset_spec()?;
    let opts = data::LoadOptions {
        quiet,
        image_size: Some((cfg.image_size()[0], cfg.image_size()[1])),
        channels: Some(cfg.in_channels()),
        ..Default::default()
    };
    let full = data::open(&spec, Split::Train, recipe.data_dir.as_deref(), &opts)?;
    let test = data::open(&spec, Split::Test, recipe.data_dir.as_deref(), &opts)?;
    if test.is_empty() {
        return Err(Error::Invalid(format!(
            "dataset {} has no test images to evaluate the trained model on",
            recipe.dataset
        )));
    }
    let (train, val) = if recipe.val_size == Some(0) {
        let none = full.empty()?;
        (full, none)
    } else {
        let size = recipe.val_size.map_or(ValSize::DEFAULT, ValSize::Count);
        let (t, v) = data::split_indices(full.len(), size, recipe.seed)?;
        (full.subset(&t)?, full.subset(&v)?)
    };
    let train = if recipe.train_fraction < 1.0 {
        let keep =
            data::class_balanced_fraction(train.labels(), recipe.train_fraction, recipe.seed)?;
        train.subset(&keep)?
    } else {
        train
    };
    let mut augment = AugmentConfig::for_spec(&spec, cfg.in_channels(), recipe.crop_pad);
    if let Some(f) = recipe.hflip {
        augment.hflip = f;
    }
    augment.erase_prob = recipe.random_erase;
    let mut preprocess = Preprocess {
        mean: augment.mean.clone(),
        std: augment.std.clone(),
        crop_pct: 1.0,
        interpolation: "bicubic".into(),
        resize: "shorter".into(),
    };
    if let Images::Files(_) = &train {
        // timm's data config: the preset's pretrained preprocessing (the model's default
        // for a custom config), crop_pct as the recipe says.
        let mut p = match &recipe.model {
            None => models::preset_preprocess(&recipe.preset),
            Some(_) => None,
        }
        .unwrap_or_else(|| cfg.default_preprocess());
        if let Some(c) = recipe.crop_pct {
            p.crop_pct = c;
        }
        p.validate(cfg.in_channels())?;
        augment.pad = 0;
        augment.mean = p.mean.clone();
        augment.std = p.std.clone();
        preprocess = p;
    }
    Ok(Data {
        train,
        val,
        test,
        augment,
        train_crop: PhotoCrop::Random(recipe.random_resized_crop()),
        eval_crop: PhotoCrop::Center(center_crop(&preprocess)),
        workers: recipe.workers.unwrap_or_else(data::default_workers),
        preprocess,
    })
}

/// Makes the model's class count the dataset's where the recipe lets it: a fine-tuning
/// run (`init` set) without an explicit `num_classes` takes the dataset's (the checkpoint's
/// head is then replaced by a fresh one), and records it in the recipe so that a resume
/// builds the same model. Any other mismatch is an error.
fn fit_num_classes(recipe: &mut Recipe, cfg: &mut ModelConfig, classes: usize) -> Result<()> {
    if classes == cfg.num_classes() {
        return Ok(());
    }
    if recipe.init.is_some() && recipe.num_classes.is_none() {
        cfg.set_num_classes(classes);
        recipe.num_classes = Some(classes);
        return cfg.validate();
    }
    Err(Error::Config(format!(
        "dataset {} has {classes} classes but the model has num_classes = {}; train a model \
         for it with --num-classes {classes} (num_classes = {classes} in a recipe)",
        recipe.dataset,
        cfg.num_classes()
    )))
}

/// Fresh or `init` weights for a new run (`init` fitted to the run's config, its head
/// replaced by a fresh one when the class count differs).
fn initial_weights(
    recipe: &Recipe,
    cfg: &ModelConfig,
    dev: &Device,
) -> Result<(HashMap<String, Tensor>, Vec<String>)> {
    let fresh: HashMap<String, Tensor> = cfg.init_params(recipe.seed, dev)?.into_iter().collect();
    let Some(path) = &recipe.init else {
        return Ok((fresh, vec![]));
    };
    let new_head: HashMap<String, Tensor> = cfg
        .head_names()
        .iter()
        .flat_map(|h| [format!("{h}.weight"), format!("{h}.bias")])
        .filter_map(|n| Some((n.clone(), fresh.get(&n)?.clone())))
        .collect();
    let new_head = (!new_head.is_empty()).then_some(new_head);
    let fitted = weights::load_fitted(
        path,
        &Arch::Config(cfg.clone()),
        FitOptions {
            new_head,
            ..FitOptions::default()
        },
    )?;
    fitted.require_f32("training")?;
    Ok((fitted.tensors, fitted.warnings))
}

/// Trains as the recipe says, writing checkpoints, metrics and a report into its output
/// folder. With `resume`, continues the run in that folder exactly where its last
/// checkpoint left off; pass the folder's saved recipe ([`Recipe::of_run`]), changed only
/// where a change is meant (more epochs or steps). A resumed run that has nothing left to
/// do writes nothing and reports its result ([`RunSummary::already_finished`]).
///
/// The output folder is created only once the data and the model are ready, so a run
/// that fails to start leaves no folder behind.
///
/// `world`: the processes that train together ([`crate::dist::Single`] alone). In a
/// data-parallel run every process runs this with the same recipe; each takes its shards
/// of every micro-batch ([`Shards`]), the step's gradient is summed over all of them, and
/// rank 0 alone writes the run's files (the others return no [`RunSummary::files`]). With
/// the same seed, one process and two give the same weights bit for bit.
pub fn train(
    recipe: &Recipe,
    resume: Option<&Path>,
    progress: &mut Progress,
    world: &dyn Collective,
) -> Result<RunSummary> {
    let out = match resume {
        Some(dir) => dir.to_path_buf(),
        None => recipe.out.clone().unwrap_or_else(default_out_dir),
    };
    // Rank 0's folder (a default one is named after the time, which differs by process).
    let out = if world.size() > 1 {
        let name = out
            .to_str()
            .ok_or_else(|| Error::Invalid(format!("{}: not a UTF-8 path", out.display())))?;
        let name = world.broadcast(name.as_bytes().to_vec())?;
        PathBuf::from(String::from_utf8_lossy(&name).into_owned())
    } else {
        out
    };
    let writer = world.rank() == 0;
    let mut recipe = recipe.clone();
    recipe.validate()?;
    let mut cfg = recipe.model_config()?;
    let dev = device(&recipe.device)?;

    let data = load_data(&recipe, &cfg, progress.is_quiet())?;
    fit_num_classes(&mut recipe, &mut cfg, data.train.num_classes())?;
    if data.train.len() < recipe.batch_size {
        return Err(Error::Config(format!(
            "the training set has {} images, fewer than one batch of {}",
            data.train.len(),
            recipe.batch_size
        )));
    }
    let fraction = if recipe.train_fraction < 1.0 {
        format!(
            " ({}% of them, class-balanced)",
            100.0 * recipe.train_fraction
        )
    } else {
        String::new()
    };
    progress.info(&format!(
        "data: {} training images{fraction}, {} validation, {} test, {} classes",
        data.train.len(),
        data.val.len(),
        data.test.len(),
        data.train.num_classes()
    ));
    let class_names = data.train.class_names().to_vec();
    let preprocess = data.preprocess.clone();
    let micro = recipe.batch_size / recipe.accum_steps;
    let shards = Shards::new(&dev, micro, world.rank(), world.size())?;
    let loader = DataLoader::new(
        data.train.clone(),
        LoaderConfig {
            batch_size: micro,
            shuffle: true,
            drop_last: true,
            seed: recipe.seed,
            augment: data.augment.clone(),
            crop: data.train_crop,
            workers: data.workers,
        },
    )?
    .part(shards.samples())?;
    let steps_per_epoch = (loader.num_batches() / recipe.accum_steps) as u64;
    if steps_per_epoch == 0 {
        return Err(Error::Config("an epoch has no full optimizer step".into()));
    }
    let batches_per_epoch = steps_per_epoch * recipe.accum_steps as u64;
    // The recipe's warmup + cosine, fitted into the run's real length (`max_steps`).
    let full_steps = recipe.epochs as u64 * steps_per_epoch;
    let schedule = Schedule::fitted(
        recipe.lr,
        recipe.min_lr,
        (recipe.warmup_epochs * steps_per_epoch as f64).round() as u64,
        full_steps,
        recipe.max_steps.unwrap_or(full_steps),
    );

    // Model, optimizer and position: fresh, or from the last checkpoint.
    let (tensors, mut pos, opt_state) = match resume {
        Some(dir) => {
            let r = run_dir::resume_state(dir, &cfg)?;
            let before = r.position.processes.max(1) as usize;
            let layout = Shards::new(&dev, micro, 0, before).map(|s| s.count());
            if layout.ok() != Some(shards.count()) {
                return Err(Error::Config(format!(
                    "this run was trained by {before} process{}, which split a micro-batch \
                     differently from {}; resume it with {before} (mpirun -np {before})",
                    if before == 1 { "" } else { "es" },
                    world.size()
                )));
            }
            (r.tensors, r.position, Some(r.state))
        }
        None => {
            let (t, warnings) = initial_weights(&recipe, &cfg, &dev)?;
            for w in warnings {
                progress.note(&format!("warning: {w}"));
            }
            (t, Position::default(), None)
        }
    };
    let finished = |pos: &Position| {
        pos.epoch >= recipe.epochs as u64 || recipe.max_steps.is_some_and(|m| pos.step >= m)
    };
    pos.processes = world.size() as u64;
    if resume.is_some() && finished(&pos) {
        // Nothing to train: report the run's result as it stands, writing nothing.
        let history = report::read_metrics(&out.join(METRICS), u64::MAX)?;
        let test = test_result(&out, &cfg, &data, &recipe, &dev, world)?;
        return Ok(RunSummary {
            best_val_acc: best_val_acc(&history),
            out,
            epochs: history,
            test,
            seconds: 0.0,
            files: vec![],
            already_finished: true,
        });
    }
    let teacher = match &recipe.teacher {
        Some(path) => Some(Teacher::load(
            path,
            &cfg,
            &data.augment.mean,
            &data.augment.std,
            &dev,
        )?),
        None => None,
    };
    // Teacher logits once for the whole training set, or per batch in the loop.
    let cache = match (&teacher, recipe.teacher_cache) {
        (Some(t), true) => {
            let started = Instant::now();
            let cache = TeacherCache::build(
                t,
                &data.train,
                data.eval_config(recipe.eval_batch()),
                &dev,
                world,
            )?;
            progress.info(&format!(
                "teacher: labelled the {} training images once, in {:.1} s",
                data.train.len(),
                started.elapsed().as_secs_f64()
            ));
            Some(cache)
        }
        _ => None,
    };
    let distill = recipe.distillation();
    let precision = recipe.precision()?;
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
    // Every process must start from the same recipe, data and weights.
    same_everywhere(world, "recipe", || Ok(text.as_bytes().to_vec()))?;
    same_everywhere(world, "training images", || {
        Ok((data.train.len() as u64).to_le_bytes().to_vec())
    })?;
    same_everywhere(world, "starting weights", || weights_digest(&net))?;
    if writer {
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        crate::atomic::write_atomic(&out.join(RECIPE), text.as_bytes())?;
    }

    let clip = (recipe.clip_grad > 0.0).then_some(recipe.clip_grad);
    let meta = SaveMeta {
        config: Some(&cfg),
        preprocess: Some(&preprocess),
        class_names: Some(&class_names),
        extra: vec![("vit.recipe".to_string(), text.clone())],
    };
    let save = |path: &Path, net: &Trainable, opt: &AdamW, pos: Position| match writer {
        true => run_dir::save_checkpoint(path, net, opt, pos, &meta),
        false => Ok(()),
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
        let mut batches = loader.epoch_from(pos.epoch, pos.batch as usize)?;
        // Time spent waiting for the loader, as a share of this epoch's time so far.
        // And the time the teacher took, and the time spent in collectives.
        let (since, mut waited, mut teaching, mut synced) = (Instant::now(), 0.0, 0.0, 0.0);
        loop {
            let asked = Instant::now();
            let Some(batch) = batches.next() else { break };
            waited += asked.elapsed().as_secs_f64();
            let batch = batch?;
            if batch.batch_index as u64 >= batches_per_epoch {
                break;
            }
            let micro_idx = batch.batch_index as u64 % recipe.accum_steps as u64;
            let x = Tensor::from_vec(batch.images, batch.shape.to_vec(), &dev)?;
            let asked = Instant::now();
            let taught = match (&cache, &teacher) {
                (Some(c), _) => Some(c.rows(&batch.indices, &dev)?),
                (None, Some(t)) => Some(t.logits_in(&x, &shards)?),
                (None, None) => None,
            };
            teaching += asked.elapsed().as_secs_f64();
            let y = Tensor::from_vec(batch.labels, x.dim(0)?, &dev)?;
            let step = pos.step;
            let rngs = move |shard| Some(step_rng(recipe.seed, step, micro_idx, shard));
            let micro_batch = Micro {
                x: &x,
                y: &y,
                shards: &shards,
                teacher: taught.as_ref().map(|t| (t, &distill)),
            };
            let step_opts = StepOptions {
                label_smoothing: recipe.label_smoothing,
                accum_steps: recipe.accum_steps,
                checkpoint: recipe.grad_checkpoint,
                precision,
            };
            let MicroStep {
                loss: loss_value,
                correct,
                sync,
                ..
            } = forward_backward(&net, &mut opt, &micro_batch, step_opts, &rngs, world)?;
            synced += sync.as_secs_f64();
            let n = shards.len(); // the whole micro-batch's samples
            if !loss_value.is_finite() {
                let last = out.join(LAST);
                let kept = if last.exists() {
                    format!("the last good checkpoint is {}", last.display())
                } else {
                    "no checkpoint was written before it".to_string()
                };
                return Err(Error::Numeric(format!(
                    "loss became {loss_value} at epoch {} step {}; stopped ({kept})",
                    pos.epoch + 1,
                    pos.step,
                )));
            }
            pos.loss_sum += loss_value * n as f64;
            pos.correct += correct;
            pos.seen += n as u64;
            pos.batch += 1;
            let lr = schedule.lr(pos.step);
            if micro_idx + 1 == recipe.accum_steps as u64 {
                let asked = Instant::now();
                opt.reduce(world)?;
                synced += asked.elapsed().as_secs_f64();
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
                waited / since.elapsed().as_secs_f64().max(1e-9),
                teacher
                    .is_some()
                    .then(|| teaching / since.elapsed().as_secs_f64().max(1e-9)),
                (world.size() > 1).then(|| synced / since.elapsed().as_secs_f64().max(1e-9)),
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

        let sync_share =
            (world.size() > 1).then(|| synced / since.elapsed().as_secs_f64().max(1e-9));

        // End of epoch (or of a --max-steps run): validate, record, checkpoint.
        let val = if data.val.is_empty() {
            None
        } else {
            Some(evaluate_on(
                net.frozen(&cfg)?.as_ref(),
                &data.val,
                data.eval_config(recipe.eval_batch()),
                &dev,
                world,
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
            sync_share,
        };
        progress.end_epoch(&m);
        history.push(m.clone());
        // Every process must still hold the same weights.
        same_everywhere(world, "weights", || weights_digest(&net))?;
        if writer {
            report::write_metrics(&out.join(METRICS), &history)?;
        }
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
        // A --max-steps run that ends mid-epoch keeps its exact position for a resume. The
        // best first: `checkpoint-last` is what a resume starts from, so once it says an
        // epoch is done, that epoch's best checkpoint must already be on disk (killed
        // between the two, the run redoes the epoch's end instead of finding no best).
        if is_best {
            save(&out.join(BEST), &net, &opt, pos)?;
        }
        save(&out.join(LAST), &net, &opt, pos)?;
    }

    // Final report on the test set, with the best checkpoint's weights (once rank 0 has
    // written them).
    world.barrier()?;
    let test = test_result(&out, &cfg, &data, &recipe, &dev, world)?;
    let files = match writer {
        true => report::write_report(&out, &saved, &cfg, &history, &test, &class_names)?,
        false => vec![],
    };
    Ok(RunSummary {
        out,
        best_val_acc: best_val_acc(&history),
        epochs: history,
        test,
        seconds: run_start.elapsed().as_secs_f64(),
        files,
        already_finished: false,
    })
}

/// The best validation accuracy of a run's epochs; `None` without a validation set.
fn best_val_acc(history: &[EpochMetrics]) -> Option<f64> {
    history.iter().filter_map(|m| m.val_acc).reduce(f64::max)
}

/// The run's best checkpoint on the test set.
fn test_result(
    out: &Path,
    cfg: &ModelConfig,
    data: &Data,
    recipe: &Recipe,
    dev: &Device,
    world: &dyn Collective,
) -> Result<EvalResult> {
    let (best_model, _) = load_model(
        &out.join(BEST),
        &Arch::Config(cfg.clone()),
        FitOptions::default(),
        dev,
    )?;
    evaluate_on(
        best_model.as_ref(),
        &data.test,
        data.eval_config(recipe.eval_batch()),
        dev,
        world,
    )
}

/// An error unless `bytes()` (their digest) are the same on every process: a data-parallel
/// run whose processes disagree on `what` would train nonsense. One process computes
/// nothing.
fn same_everywhere(
    world: &dyn Collective,
    what: &str,
    bytes: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<()> {
    if world.size() == 1 {
        return Ok(());
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes()?);
    let all = world.gather(&digest)?;
    match all.iter().position(|d| d[..] != all[0][..]) {
        None => Ok(()),
        Some(r) => Err(Error::Invalid(format!(
            "process {r} of the data-parallel run has other {what} than process 0"
        ))),
    }
}

/// A digest of the model's weights and buffers, in parameter order.
fn weights_digest(net: &Trainable) -> Result<Vec<u8>> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (_, v) in net.params.iter().chain(&net.buffers) {
        for x in v.as_tensor().flatten_all()?.to_vec1::<f32>()? {
            h.update(x.to_le_bytes());
        }
    }
    Ok(h.finalize().to_vec())
}
