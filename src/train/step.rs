//! One training step on a micro-batch: the model as trainable variables, the forward and
//! backward of its shards side by side, and the per-step random streams. Knows nothing of
//! files, epochs or schedules.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::distill::{distillation_loss, Distill};
use super::{AdamW, AdamWConfig};
use crate::models::{Architecture, Classifier, Mode, ModelConfig};
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
pub(super) fn shard_bounds(dev: &Device, n: usize) -> Vec<(usize, usize)> {
    let shards = shard_count(dev, n);
    (0..shards)
        .map(|i| (i * n / shards, (i + 1) * n / shards))
        .collect()
}

/// Logits of `model` for the batch `x` (inference), its shards run side by side.
pub fn forward_sharded(model: &dyn Classifier, x: &Tensor) -> Result<Tensor> {
    let logits: Vec<Tensor> = shard_bounds(x.device(), x.dim(0)?)
        .par_iter()
        .map(|&(s0, s1)| model.forward(&x.narrow(0, s0, s1 - s0)?))
        .collect::<Result<_>>()?;
    Ok(Tensor::cat(&logits, 0)?)
}

/// A teacher's logits (B, K) for the micro-batch, and how to learn from them.
pub type Teaching<'a> = Option<(&'a Tensor, &'a Distill)>;

/// One micro-batch of training, up to the optimizer step: forward in training mode
/// (dropout and drop-path drawn from `rngs`), label-smoothed cross-entropy (with a
/// `teacher`: DeiT's distillation loss on the class and distillation heads), backward of
/// loss / `accum_steps`, gradients added into `opt` (then [`AdamW::step`] clips and
/// updates). A loss that is not finite is returned before backward, nothing accumulated.
///
/// The micro-batch is split into [`shard_count`] shards run in parallel: each shard's
/// forward and backward is a chain of mostly small, serial candle operations, and two
/// chains side by side keep both cores busy where one would leave a core waiting. The
/// loss is the samples-weighted mean of the shards' losses, so the gradient is that of
/// the whole micro-batch; the shards' gradients are added in shard order (deterministic).
///
/// With `checkpoint` (gradient checkpointing, for models that are [`Staged`]), see
/// [`checkpointed`]: the same gradients, the blocks' activations recomputed instead of kept.
#[allow(clippy::too_many_arguments)] // the step's inputs, each used once
pub fn forward_backward(
    net: &Trainable,
    opt: &mut AdamW,
    x: &Tensor,
    y: &Tensor,
    label_smoothing: f64,
    accum_steps: usize,
    rngs: ShardRngs,
    teacher: Teaching,
    checkpoint: bool,
) -> Result<MicroStep> {
    if checkpoint {
        return checkpointed(net, opt, x, y, label_smoothing, accum_steps, rngs, teacher);
    }
    let start = Instant::now();
    let n = x.dim(0)?;
    let bounds = shard_bounds(x.device(), n);
    // (logits, loss) of each shard, in shard order.
    let forward: Vec<(Tensor, Tensor)> = bounds
        .par_iter()
        .enumerate()
        .map(|(i, &(s0, s1))| -> Result<(Tensor, Tensor)> {
            let mut rng = rngs(i);
            let mut mode = Mode::Train(rng.as_mut());
            let (x, y) = (x.narrow(0, s0, s1 - s0)?, y.narrow(0, s0, s1 - s0)?);
            if let Some((t, d)) = teacher {
                let (cls, dist) = net.model.forward_heads_t(&x, &mut mode)?;
                let t = t.narrow(0, s0, s1 - s0)?;
                let loss = distillation_loss(&cls, &dist, &y, &t, label_smoothing, d)?;
                return Ok((((cls + dist)? / 2.0)?, loss)); // the inference output
            }
            let logits = net.model.forward_t(&x, &mut mode)?;
            let loss = ops::cross_entropy(&logits, &y, label_smoothing)?;
            Ok((logits, loss))
        })
        .collect::<Result<_>>()?;
    net.model.commit_running_stats()?;
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

/// [`forward_backward`] with gradient checkpointing (timm's `checkpoint_seq`): the forward
/// runs the stem and each block without keeping their graphs, only each block's input and
/// the random stream's state before it; the head and loss keep theirs. Backward goes back
/// block by block: block i is run again on its kept input (a fresh variable) with the same
/// random stream, and `(block_i(x) · g).sum()` is differentiated, where g is the gradient
/// arriving at its output; that gives the block's parameter gradients and g for the block
/// before. The stem last. Peak memory holds one block's activations instead of all of them;
/// the cost is a second forward of the blocks. Every parameter lives in one part, so its
/// gradient is the same vector-Jacobian product as without checkpointing.
#[allow(clippy::too_many_arguments)]
fn checkpointed(
    net: &Trainable,
    opt: &mut AdamW,
    x: &Tensor,
    y: &Tensor,
    label_smoothing: f64,
    accum_steps: usize,
    rngs: ShardRngs,
    teacher: Teaching,
) -> Result<MicroStep> {
    let staged = net.model.staged().ok_or_else(|| {
        Error::Invalid(format!(
            "gradient checkpointing is built for ViT-family models (ViT, DeiT, hybrid ViT), \
             not for a {} model",
            net.model.config().arch()
        ))
    })?;
    let start = Instant::now();
    let n = x.dim(0)?;
    let bounds = shard_bounds(x.device(), n);
    let forward: Vec<Kept> = bounds
        .par_iter()
        .enumerate()
        .map(|(i, &(s0, s1))| -> Result<Kept> {
            let mut rng = rngs(i);
            let (x, y) = (x.narrow(0, s0, s1 - s0)?, y.narrow(0, s0, s1 - s0)?);
            let mut streams = vec![rng.clone()];
            let mut inputs = vec![staged.stem(&x, &mut Mode::Train(rng.as_mut()))?.detach()];
            for b in 0..staged.num_blocks() {
                streams.push(rng.clone());
                let h = staged.block(b, &inputs[b], &mut Mode::Train(rng.as_mut()))?;
                inputs.push(h.detach());
            }
            let last = Var::from_tensor(inputs.last().expect("the stem's output"))?;
            let (cls, dist) = staged.heads(last.as_tensor(), &mut Mode::Train(rng.as_mut()))?;
            let (logits, loss) = match teacher {
                Some((t, d)) => {
                    let t = t.narrow(0, s0, s1 - s0)?;
                    let loss = distillation_loss(&cls, &dist, &y, &t, label_smoothing, d)?;
                    (((cls + dist)? / 2.0)?, loss)
                }
                None => {
                    let loss = ops::cross_entropy(&cls, &y, label_smoothing)?;
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
        })
        .collect::<Result<_>>()?;
    net.model.commit_running_stats()?;
    let weight = |i: usize| (bounds[i].1 - bounds[i].0) as f64 / n as f64;
    let mut loss_value = 0f64;
    for (i, k) in forward.iter().enumerate() {
        loss_value += weight(i) * k.loss.to_scalar::<f32>()? as f64;
    }
    let forward_time = start.elapsed();
    let mut logits = Vec::new();
    if loss_value.is_finite() {
        let grads: Vec<_> = forward
            .par_iter()
            .enumerate()
            .map(|(i, k)| -> Result<candle_core::backprop::GradStore> {
                let mut grads = (&k.loss * (weight(i) / accum_steps as f64))?.backward()?;
                let mut g = grads
                    .remove(k.last.as_tensor())
                    .ok_or_else(|| Error::Numeric("the head received no gradient".into()))?;
                for b in (0..staged.num_blocks()).rev() {
                    let mut rng = k.streams[b + 1].clone();
                    let input = Var::from_tensor(&k.inputs[b])?;
                    let out = staged.block(b, input.as_tensor(), &mut Mode::Train(rng.as_mut()))?;
                    let mut part = (out * &g)?.sum_all()?.backward()?;
                    g = part.remove(input.as_tensor()).ok_or_else(|| {
                        Error::Numeric(format!("block {b}'s input received no gradient"))
                    })?;
                    keep_params(&mut grads, part, &net.params);
                }
                let mut rng = k.streams[0].clone();
                let xs = x.narrow(0, bounds[i].0, bounds[i].1 - bounds[i].0)?;
                let stem = staged.stem(&xs, &mut Mode::Train(rng.as_mut()))?;
                keep_params(&mut grads, (stem * &g)?.sum_all()?.backward()?, &net.params);
                Ok(grads)
            })
            .collect::<Result<_>>()?;
        for g in &grads {
            opt.accumulate(g)?;
        }
    }
    for k in forward {
        logits.push(k.logits);
    }
    Ok(MicroStep {
        logits: Tensor::cat(&logits, 0)?,
        loss: loss_value,
        forward: forward_time,
        backward: start.elapsed() - forward_time,
    })
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
