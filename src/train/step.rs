//! One training step on a micro-batch: the model as trainable variables, the forward and
//! backward of its shards side by side, and the per-step random streams. Knows nothing of
//! files, epochs or schedules.

use std::collections::HashMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::distill::{distillation_loss, Distill};
use super::eval::count_correct;
use super::{AdamW, AdamWConfig};
use crate::dist::{self, Collective};
use crate::models::layers::BnPass;
use crate::models::{Architecture, Classifier, Mode, ModelConfig, Staged};
use crate::{ops, Error, Result};

/// A model whose parameters are trainable `Var`s, in `param_shapes` order, and whose
/// buffers (BatchNorm's running statistics) are `Var`s the forward passes update.
pub struct Trainable {
    pub model: Box<dyn Classifier>,
    pub params: Vec<(String, Var)>,
    pub buffers: Vec<(String, Var)>,
}

impl Trainable {
    /// Builds the model from tensors (timm naming) as trainable variables.
    pub fn new(cfg: &ModelConfig, tensors: &HashMap<String, Tensor>, dev: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vars = |shapes: Vec<(String, Vec<usize>)>| -> Result<Vec<(String, Var)>> {
            let mut data = varmap.data().lock().expect("varmap lock");
            let mut out = Vec::new();
            for (name, _) in shapes {
                let t = tensors
                    .get(&name)
                    .ok_or_else(|| Error::Invalid(format!("no initial value for tensor {name}")))?;
                // A copy (`Var::from_tensor` of a plain tensor): training changes it in place.
                let var = Var::from_tensor(&t.to_device(dev)?.to_dtype(DType::F32)?)?;
                data.insert(name.clone(), var.clone());
                out.push((name, var));
            }
            Ok(out)
        };
        let params = vars(cfg.param_shapes())?;
        let buffers = vars(cfg.buffer_shapes())?;
        let model = cfg.build(VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
        Ok(Trainable {
            model,
            params,
            buffers,
        })
    }

    /// Current weights and buffers by name.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .chain(&self.buffers)
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// The model on the current weights, detached from the variables (sharing their
    /// storage): for evaluation, which must not record a backward graph. (Run on the
    /// variables themselves, every batch would keep all its activations for a backward
    /// pass that never comes: 17 GB for ViT-Ti/16 at 224 px and batch 500.)
    pub fn frozen(&self, cfg: &ModelConfig) -> Result<Box<dyn Classifier>> {
        let tensors: HashMap<String, Tensor> = self
            .params
            .iter()
            .chain(&self.buffers)
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        let dev = self
            .params
            .first()
            .map_or(Device::Cpu, |(_, v)| v.device().clone());
        cfg.build(VarBuilder::from_tensors(tensors, DType::F32, &dev))
    }

    /// An AdamW optimizer over all parameters, in `param_shapes` order.
    pub fn adamw(&self, cfg: AdamWConfig) -> AdamW {
        AdamW::new(self.params.clone(), cfg)
    }
}

/// What [`forward_backward`] did with one micro-batch.
pub struct MicroStep {
    /// (b, classes) of this process's samples, for accuracy.
    pub logits: Tensor,
    /// The label-smoothed cross-entropy of the whole micro-batch (all processes); not
    /// finite means backward was skipped.
    pub loss: f64,
    /// Samples of the whole micro-batch whose top class is the label.
    pub correct: u64,
    /// Wall time of the forward pass and the loss.
    pub forward: Duration,
    /// Wall time of backward and of adding the gradients into the optimizer.
    pub backward: Duration,
    /// Wall time in collectives with the other processes (part of `forward`).
    pub sync: Duration,
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

/// How a micro-batch of `len` samples is split into shards of consecutive samples, and
/// which of them this process runs.
///
/// There are [`shard_count`] shards, raised to a multiple of the job's process count, so
/// every process of a data-parallel run takes the same number of whole shards (rank r the
/// r-th run of them). Each shard has its own random stream and its own gradient, added in
/// shard order. One process on the CPU and two processes both split a micro-batch in two:
/// the same shards, streams and sums, so the two runs give the same weights bit for bit.
#[derive(Debug, Clone, PartialEq)]
pub struct Shards {
    /// (start, end) samples of every shard of the micro-batch.
    bounds: Vec<(usize, usize)>,
    /// The shards this process runs.
    own: Range<usize>,
}

impl Shards {
    /// The shards of a micro-batch of `len` for process `rank` of `processes`.
    pub fn new(dev: &Device, len: usize, rank: usize, processes: usize) -> Result<Self> {
        let processes = processes.max(1);
        let count = shard_count(dev, len).div_ceil(processes) * processes;
        if len < count {
            return Err(Error::Config(format!(
                "a micro-batch of {len} images cannot be shared by {processes} processes: \
                 make batch_size / accum_steps at least {count}"
            )));
        }
        let per = count / processes;
        Ok(Shards {
            bounds: (0..count)
                .map(|i| (i * len / count, (i + 1) * len / count))
                .collect(),
            own: rank * per..(rank + 1) * per,
        })
    }

    /// All shards of a micro-batch of `len`, run by one process alone.
    pub fn whole(dev: &Device, len: usize) -> Self {
        Self::new(dev, len, 0, 1).unwrap_or(Shards {
            bounds: vec![(0, len)],
            own: 0..1,
        })
    }

    /// Samples in the whole micro-batch.
    pub fn len(&self) -> usize {
        self.bounds.last().map_or(0, |b| b.1)
    }

    /// Whether the micro-batch has no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shards of the micro-batch.
    pub fn count(&self) -> usize {
        self.bounds.len()
    }

    /// This process's samples of the micro-batch.
    pub fn samples(&self) -> Range<usize> {
        self.bounds[self.own.start].0..self.bounds[self.own.end - 1].1
    }

    /// This process's shards as (start, end) within [`Shards::samples`].
    pub fn local_bounds(&self) -> Vec<(usize, usize)> {
        self.local().iter().map(|&(_, s, n)| (s, s + n)).collect()
    }

    /// This process's shards: (shard index, first sample within [`Shards::samples`],
    /// samples), in shard order.
    fn local(&self) -> Vec<(usize, usize, usize)> {
        let first = self.samples().start;
        self.own
            .clone()
            .map(|i| {
                (
                    i,
                    self.bounds[i].0 - first,
                    self.bounds[i].1 - self.bounds[i].0,
                )
            })
            .collect()
    }
}

/// The (start, end) sample ranges of the [`shard_count`] shards of a batch of `n`.
pub(super) fn shard_bounds(dev: &Device, n: usize) -> Vec<(usize, usize)> {
    Shards::whole(dev, n).bounds
}

/// Logits of `model` for the batch `x` (inference), its shards run side by side.
pub fn forward_sharded(model: &dyn Classifier, x: &Tensor) -> Result<Tensor> {
    forward_in(model, x, &shard_bounds(x.device(), x.dim(0)?))
}

/// Logits of `model` for the batch `x` (inference), run in pieces `bounds` (start, end)
/// side by side.
pub(super) fn forward_in(
    model: &dyn Classifier,
    x: &Tensor,
    bounds: &[(usize, usize)],
) -> Result<Tensor> {
    let logits: Vec<Tensor> = bounds
        .par_iter()
        .map(|&(s0, s1)| model.forward(&x.narrow(0, s0, s1 - s0)?))
        .collect::<Result<_>>()?;
    Ok(Tensor::cat(&logits, 0)?)
}

/// A teacher's logits (B, K) for the micro-batch, and how to learn from them.
pub type Teaching<'a> = Option<(&'a Tensor, &'a Distill)>;

/// One micro-batch as a training step sees it.
pub struct Micro<'a> {
    /// This process's samples of the micro-batch ([`Shards::samples`]; alone, all of
    /// them): images (b, C, H, W) and labels (b,).
    pub x: &'a Tensor,
    pub y: &'a Tensor,
    /// How the whole micro-batch is split, and which shards are this process's.
    pub shards: &'a Shards,
    /// A teacher's logits for the same samples, and how to learn from them.
    pub teacher: Teaching<'a>,
}

/// How a step learns from its micro-batches.
#[derive(Debug, Clone, Copy)]
pub struct StepOptions {
    pub label_smoothing: f64,
    /// Micro-batches per optimizer step (their gradients add up).
    pub accum_steps: usize,
    /// Gradient checkpointing (see [`checkpointed_forward`]).
    pub checkpoint: bool,
    /// The precision of the forward pass's matrix products ([`ops::autocast`]).
    pub precision: ops::Precision,
}

/// One shard's forward pass, kept for its backward.
enum Pass {
    /// The whole graph from the shard's images to its loss.
    Plain { logits: Tensor, loss: Tensor },
    /// Gradient checkpointing: see [`Kept`].
    Checkpointed(Kept),
}

impl Pass {
    fn logits(&self) -> &Tensor {
        match self {
            Pass::Plain { logits, .. } => logits,
            Pass::Checkpointed(k) => &k.logits,
        }
    }
    fn loss(&self) -> &Tensor {
        match self {
            Pass::Plain { loss, .. } => loss,
            Pass::Checkpointed(k) => &k.loss,
        }
    }
}

/// One micro-batch of training, up to the optimizer step: forward in training mode
/// (dropout and drop-path drawn from `rngs`), label-smoothed cross-entropy (with a
/// teacher: DeiT's distillation loss on the class and distillation heads), backward of
/// loss / `accum_steps`, gradients added into `opt` (then [`AdamW::reduce`] and
/// [`AdamW::step`] finish the step). A loss that is not finite is returned before
/// backward, nothing accumulated.
///
/// The micro-batch is split into [`Shards`]; this process's run in parallel: each shard's
/// forward and backward is a chain of mostly small, serial candle operations, and two
/// chains side by side keep both cores busy where one would leave a core waiting. The
/// loss is the samples-weighted mean of the shards' losses, so the gradient is that of
/// the whole micro-batch. With one micro-batch per step the shards' gradients are added in
/// shard order into one buffer; with several, each shard has its own lane (see
/// [`AdamW`]), so the sum has the same order whether one process runs every shard or each
/// process of a data-parallel run (`world`) runs some.
///
/// With `checkpoint` (gradient checkpointing, for models that are [`Staged`]), see
/// [`checkpointed_forward`]: the same gradients, the blocks' activations recomputed
/// instead of kept.
pub fn forward_backward(
    net: &Trainable,
    opt: &mut AdamW,
    micro: &Micro,
    opts: StepOptions,
    rngs: ShardRngs,
    world: &dyn Collective,
) -> Result<MicroStep> {
    let start = Instant::now();
    let staged = match opts.checkpoint {
        false => None,
        true => Some(net.model.staged().ok_or_else(|| {
            Error::Invalid(format!(
                "gradient checkpointing is built for ViT-family models (ViT, DeiT, hybrid \
                 ViT), not for a {} model",
                net.model.config().arch()
            ))
        })?),
    };
    let shards = micro.shards.local();
    let passes: Vec<Pass> = shards
        .par_iter()
        .map(|&(i, s0, len)| -> Result<Pass> {
            ops::autocast(opts.precision, || {
                let mut rng = rngs(i);
                let (x, y) = (micro.x.narrow(0, s0, len)?, micro.y.narrow(0, s0, len)?);
                let teacher = match micro.teacher {
                    Some((t, d)) => Some((t.narrow(0, s0, len)?, d)),
                    None => None,
                };
                if let Some(staged) = staged {
                    let kept = checkpointed_forward(staged, &x, &y, &mut rng, teacher, opts)?;
                    return Ok(Pass::Checkpointed(kept));
                }
                let mut mode = Mode::Train(rng.as_mut());
                let (logits, loss) = match teacher {
                    Some((t, d)) => {
                        let (cls, dist) = net.model.forward_heads_t(&x, &mut mode)?;
                        let loss = distillation_loss(&cls, &dist, &y, &t, opts.label_smoothing, d)?;
                        (((cls + dist)? / 2.0)?, loss) // the inference output
                    }
                    None => {
                        let logits = net.model.forward_t(&x, &mut mode)?;
                        let loss = ops::cross_entropy(&logits, &y, opts.label_smoothing)?;
                        (logits, loss)
                    }
                };
                Ok(Pass::Plain { logits, loss })
            })
        })
        .collect::<Result<_>>()?;
    let synced = Instant::now();
    commit_running_stats(net.model.as_ref(), world)?;
    let mut sync = synced.elapsed();
    let n = micro.shards.len();
    let weight = |len: usize| len as f64 / n as f64;
    let logits: Vec<Tensor> = passes.iter().map(|p| p.logits().clone()).collect();
    let logits = Tensor::cat(&logits, 0)?;
    // The whole micro-batch's loss and correct count: this process's part, summed over all.
    let mut sums = [0f64, count_correct(&logits, micro.y)? as f64];
    for (p, &(_, _, len)) in passes.iter().zip(&shards) {
        sums[0] += weight(len) * p.loss().to_scalar::<f32>()? as f64;
    }
    let synced = Instant::now();
    world.sum_f64(&mut sums)?;
    sync += synced.elapsed();
    let forward_time = start.elapsed();
    if sums[0].is_finite() {
        let grads: Vec<GradStore> = passes
            .par_iter()
            .zip(&shards)
            .map(|(p, &(_, s0, len))| {
                let scale = weight(len) / opts.accum_steps as f64;
                match p {
                    Pass::Plain { loss, .. } => Ok((loss * scale)?.backward()?),
                    Pass::Checkpointed(k) => {
                        let x = micro.x.narrow(0, s0, len)?;
                        let staged = staged.expect("a checkpointed pass");
                        // The blocks run again: in the forward's precision.
                        ops::autocast(opts.precision, || {
                            checkpointed_backward(staged, net, k, &x, scale)
                        })
                    }
                }
            })
            .collect::<Result<_>>()?;
        for (lane, g) in grads.iter().enumerate() {
            opt.accumulate_lane(g, if opts.accum_steps == 1 { 0 } else { lane })?;
        }
    }
    Ok(MicroStep {
        logits,
        loss: sums[0],
        correct: sums[1] as u64,
        forward: forward_time,
        backward: start.elapsed() - forward_time,
        sync,
    })
}

/// Moves BatchNorm running statistics by the micro-batch's training passes, taken together
/// (see [`crate::models::layers::BatchNorm2d`]): in a data-parallel run, the passes of
/// every process, in rank order, so every process moves them the same way, and the same
/// way one process alone would.
fn commit_running_stats(model: &dyn Classifier, world: &dyn Collective) -> Result<()> {
    let norms = model.batch_norms();
    if norms.is_empty() {
        return Ok(());
    }
    let local: Vec<Vec<BnPass>> = norms.iter().map(|bn| bn.take_pending()).collect();
    if world.size() == 1 {
        for (bn, passes) in norms.iter().zip(local) {
            bn.commit_passes(passes)?;
        }
        return Ok(());
    }
    // Every layer's passes as f32: per layer, the pass count, then (n, mean, var) each.
    let mut packed = vec![];
    for passes in &local {
        packed.push(passes.len() as f32);
        for (n, mean, var) in passes {
            packed.push(*n as f32);
            packed.extend(mean.to_vec1::<f32>()?);
            packed.extend(var.to_vec1::<f32>()?);
        }
    }
    let all = world.gather(&dist::f32_bytes(&packed))?;
    let mut pooled: Vec<Vec<BnPass>> = vec![vec![]; norms.len()];
    for bytes in all {
        let values = dist::bytes_f32(&bytes)?;
        let mut at = values.iter().copied();
        let mut next = || {
            at.next()
                .ok_or_else(|| Error::Invalid("a process sent short BatchNorm statistics".into()))
        };
        for (bn, out) in norms.iter().zip(&mut pooled) {
            let c = bn.running_mean.elem_count();
            let dev = bn.running_mean.device();
            for _ in 0..next()? as usize {
                let n = next()? as usize;
                let mean: Vec<f32> = (0..c).map(|_| next()).collect::<Result<_>>()?;
                let var: Vec<f32> = (0..c).map(|_| next()).collect::<Result<_>>()?;
                out.push((n, Tensor::new(mean, dev)?, Tensor::new(var, dev)?));
            }
        }
    }
    for (bn, passes) in norms.iter().zip(pooled) {
        bn.commit_passes(passes)?;
    }
    Ok(())
}

/// What the checkpointed forward of one shard keeps for its backward.
struct Kept {
    /// The stem's output and each block's, detached: block i's input is `inputs[i]`.
    inputs: Vec<Tensor>,
    /// The shard's random stream before the stem (`streams[0]`) and before each block.
    streams: Vec<Option<ChaCha8Rng>>,
    /// The last block's output as a variable, the head's graph hanging from it.
    last: Var,
    logits: Tensor,
    loss: Tensor,
}

/// The forward pass of one shard with gradient checkpointing (timm's `checkpoint_seq`):
/// the stem and each block run without keeping their graphs, only each block's input and
/// the random stream's state before it; the head and loss keep theirs.
/// [`checkpointed_backward`] then goes back block by block: block i is run again on its
/// kept input (a fresh variable) with the same random stream, and `(block_i(x) · g).sum()`
/// is differentiated, where g is the gradient arriving at its output; that gives the
/// block's parameter gradients and g for the block before. The stem last. Peak memory
/// holds one block's activations instead of all of them; the cost is a second forward of
/// the blocks. Every parameter lives in one part, so its gradient is the same
/// vector-Jacobian product as without checkpointing.
fn checkpointed_forward(
    staged: &dyn Staged,
    x: &Tensor,
    y: &Tensor,
    rng: &mut Option<ChaCha8Rng>,
    teacher: Option<(Tensor, &Distill)>,
    opts: StepOptions,
) -> Result<Kept> {
    let mut streams = vec![rng.clone()];
    let mut inputs = vec![staged.stem(x, &mut Mode::Train(rng.as_mut()))?.detach()];
    for b in 0..staged.num_blocks() {
        streams.push(rng.clone());
        let h = staged.block(b, &inputs[b], &mut Mode::Train(rng.as_mut()))?;
        inputs.push(h.detach());
    }
    let last = Var::from_tensor(inputs.last().expect("the stem's output"))?;
    let (cls, dist) = staged.heads(last.as_tensor(), &mut Mode::Train(rng.as_mut()))?;
    let (logits, loss) = match teacher {
        Some((t, d)) => {
            let loss = distillation_loss(&cls, &dist, y, &t, opts.label_smoothing, d)?;
            (((cls + dist)? / 2.0)?, loss)
        }
        None => {
            let loss = ops::cross_entropy(&cls, y, opts.label_smoothing)?;
            (cls, loss)
        }
    };
    inputs.pop(); // the last output lives on as `last`
    Ok(Kept {
        inputs,
        streams,
        last,
        logits,
        loss,
    })
}

/// The backward pass of one checkpointed shard (see [`checkpointed_forward`]) of loss ×
/// `scale`.
fn checkpointed_backward(
    staged: &dyn Staged,
    net: &Trainable,
    k: &Kept,
    x: &Tensor,
    scale: f64,
) -> Result<GradStore> {
    let mut grads = (&k.loss * scale)?.backward()?;
    let mut g = grads
        .remove(k.last.as_tensor())
        .ok_or_else(|| Error::Numeric("the head received no gradient".into()))?;
    for b in (0..staged.num_blocks()).rev() {
        let mut rng = k.streams[b + 1].clone();
        let input = Var::from_tensor(&k.inputs[b])?;
        let out = staged.block(b, input.as_tensor(), &mut Mode::Train(rng.as_mut()))?;
        let mut part = (out * &g)?.sum_all()?.backward()?;
        g = part
            .remove(input.as_tensor())
            .ok_or_else(|| Error::Numeric(format!("block {b}'s input received no gradient")))?;
        keep_params(&mut grads, part, &net.params);
    }
    let mut rng = k.streams[0].clone();
    let stem = staged.stem(x, &mut Mode::Train(rng.as_mut()))?;
    keep_params(&mut grads, (stem * &g)?.sum_all()?.backward()?, &net.params);
    Ok(grads)
}

/// Moves the parameters' gradients from `part` into `grads`, dropping the rest of `part`
/// (the gradients of every intermediate tensor of a recomputed block: kept, they would add
/// up to the activations checkpointing saves).
fn keep_params(
    grads: &mut candle_core::backprop::GradStore,
    mut part: candle_core::backprop::GradStore,
    params: &[(String, Var)],
) {
    for (_, var) in params {
        if let Some(g) = part.remove(var.as_tensor()) {
            grads.insert(var.as_tensor(), g);
        }
    }
}

/// Per-step randomness (dropout, drop-path): a ChaCha stream derived from (seed, step,
/// micro-batch, shard), so a resumed run draws exactly what an uninterrupted one would.
pub(super) fn step_rng(seed: u64, step: u64, micro: u64, shard: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_d20b_0000_0000);
    let micro_shard = micro.wrapping_mul(16).wrapping_add(shard as u64);
    rng.set_stream(step.wrapping_mul(1 << 20).wrapping_add(micro_shard));
    rng
}
