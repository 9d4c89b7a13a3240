//! AdamW with decoupled weight decay (PyTorch's update, term for term), global-norm
//! gradient clipping, gradient accumulation, and the warmup + cosine learning-rate schedule.
//! Moments live in flat f32 buffers, one per parameter, and the step's gradients in one
//! buffer for all parameters (summed over a data-parallel run's processes in one pass).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::dist::Collective;
use crate::{Error, Result};

/// One trainable tensor with its optimizer state.
struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Vec<f32>, // first moment
    v: Vec<f32>, // second moment
    /// Where its gradient lies in [`AdamW::grad`].
    at: std::ops::Range<usize>,
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW over a fixed, ordered list of parameters.
///
/// The step's gradient of every parameter lies in one flat buffer (in parameter order), so
/// a data-parallel run sums it over its processes in one pass ([`AdamW::reduce`]). A step
/// whose micro-batches are split into shards may accumulate each shard into a buffer of
/// its own (a *lane*): the gradient is then the lanes added in shard order, the same
/// order in which a data-parallel run adds its processes' gradients.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Accumulated gradients of the current step: lane 0 (where the step reads them).
    grad: Vec<f32>,
    /// Lanes 1.. (allocated when first used).
    lanes: Vec<Vec<f32>>,
    /// Optimizer steps taken (PyTorch's `state['step']`).
    pub step: u64,
}

/// Whether a parameter gets weight decay: matrices do; biases, norms, the position
/// embedding, the class and distillation tokens do not (timm's `param_groups_weight_decay`
/// with its `no_weight_decay` names).
pub fn decays(name: &str, rank: usize) -> bool {
    rank >= 2 && !matches!(name, "pos_embed" | "cls_token" | "dist_token")
}

impl AdamW {
    /// `params` in a fixed order (the config's `param_shapes` order).
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Self {
        let mut total = 0;
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                let n = var.elem_count();
                total += n;
                Slot {
                    decay: decays(&name, var.rank()),
                    name,
                    var,
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                    at: total - n..total,
                }
            })
            .collect();
        AdamW {
            cfg,
            slots,
            grad: vec![0.0; total],
            lanes: vec![],
            step: 0,
        }
    }

    /// Adds this backward pass's gradients into the step's buffers (lane 0). A parameter
    /// without a gradient is an error: it would silently never train.
    pub fn accumulate(&mut self, grads: &GradStore) -> Result<()> {
        self.accumulate_lane(grads, 0)
    }

    /// [`AdamW::accumulate`] into lane `lane` (see [`AdamW`]).
    pub fn accumulate_lane(&mut self, grads: &GradStore, lane: usize) -> Result<()> {
        let total = self.grad.len();
        if lane > self.lanes.len() {
            self.lanes.resize_with(lane, || vec![0.0; total]);
        }
        let buf = match lane {
            0 => &mut self.grad,
            _ => &mut self.lanes[lane - 1],
        };
        for s in &self.slots {
            let g = grads.get(s.var.as_tensor()).ok_or_else(|| {
                Error::Numeric(format!("parameter {} received no gradient", s.name))
            })?;
            let g = g.flatten_all()?.to_vec1::<f32>()?;
            for (acc, x) in buf[s.at.clone()].iter_mut().zip(g) {
                *acc += x;
            }
        }
        Ok(())
    }

    /// Makes the step's gradient whole: adds the lanes into lane 0 in lane order (clearing
    /// them), then sums lane 0 over the job's processes. Call it once per step, before
    /// [`AdamW::step`]; with one process and one lane it changes nothing.
    pub fn reduce(&mut self, world: &dyn Collective) -> Result<()> {
        for lane in &mut self.lanes {
            for (g, l) in self.grad.iter_mut().zip(lane.iter_mut()) {
                *g += std::mem::take(l);
            }
        }
        world.sum_f32(&mut self.grad)
    }

    /// The accumulated gradient of parameter `name`.
    #[cfg(test)]
    pub(crate) fn grad(&self, name: &str) -> Option<&[f32]> {
        let slot = self.slots.iter().find(|s| s.name == name)?;
        Some(&self.grad[slot.at.clone()])
    }

    /// L2 norm of all accumulated gradients together.
    pub fn grad_norm(&self) -> f64 {
        self.grad
            .iter()
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
            .sqrt()
    }

    /// Clips (when `max_norm` is given, as `torch.nn.utils.clip_grad_norm_`), applies one
    /// AdamW update with learning rate `lr`, and clears the gradients. Returns the
    /// gradient norm before clipping.
    pub fn step(&mut self, lr: f64, max_norm: Option<f64>) -> Result<f64> {
        let norm = self.grad_norm();
        let scale = match max_norm {
            Some(max) => (max / (norm + 1e-6)).min(1.0) as f32,
            None => 1.0,
        };
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt() as f32;
        let step_size = (lr / bc1) as f32;
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        for s in &mut self.slots {
            let mut p = s.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let decay = if s.decay {
                (1.0 - lr * c.weight_decay) as f32
            } else {
                1.0
            };
            let grad = &mut self.grad[s.at.clone()];
            let state = s.m.iter_mut().zip(s.v.iter_mut()).zip(grad.iter_mut());
            for (p, ((m, v), grad)) in p.iter_mut().zip(state) {
                let g = *grad * scale;
                // PyTorch: param.mul_(1 − lr·wd); exp_avg.lerp_(grad, 1 − β1);
                // exp_avg_sq.mul_(β2).addcmul_(grad, grad, 1 − β2);
                // denom = sqrt(exp_avg_sq)/sqrt(bc2) + eps; param −= lr/bc1 · exp_avg/denom.
                *p *= decay;
                *m += (1.0 - b1) * (g - *m);
                *v = *v * b2 + (1.0 - b2) * g * g;
                let denom = v.sqrt() / bc2_sqrt + eps;
                *p -= step_size * *m / denom;
                *grad = 0.0;
            }
            let t = Tensor::from_vec(p, s.var.shape(), s.var.device())?;
            s.var.set(&t)?;
        }
        Ok(norm)
    }

    /// Clears accumulated gradients without stepping.
    pub fn zero_grad(&mut self) {
        for buf in std::iter::once(&mut self.grad).chain(&mut self.lanes) {
            buf.iter_mut().for_each(|g| *g = 0.0);
        }
    }

    /// Moments and step count as tensors, for checkpoints (`adam.m.<name>`, ...).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let dev = candle_core::Device::Cpu;
        let mut out = HashMap::new();
        for s in &self.slots {
            let shape = s.var.shape().clone();
            out.insert(
                format!("adam.m.{}", s.name),
                Tensor::from_slice(&s.m, shape.clone(), &dev)?,
            );
            out.insert(
                format!("adam.v.{}", s.name),
                Tensor::from_slice(&s.v, shape, &dev)?,
            );
        }
        out.insert("adam.step".into(), Tensor::new(&[self.step as i64], &dev)?);
        Ok(out)
    }

    /// Restores what [`state`](Self::state) saved.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |k: &str| {
            state
                .get(k)
                .ok_or_else(|| Error::Invalid(format!("checkpoint has no optimizer state {k}")))
        };
        for s in &mut self.slots {
            s.m = get(&format!("adam.m.{}", s.name))?
                .flatten_all()?
                .to_vec1::<f32>()?;
            s.v = get(&format!("adam.v.{}", s.name))?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if s.m.len() != s.at.len() || s.v.len() != s.at.len() {
                return Err(Error::Invalid(format!(
                    "optimizer state of {} has the wrong size",
                    s.name
                )));
            }
        }
        self.step = get("adam.step")?.to_vec1::<i64>()?[0] as u64;
        Ok(())
    }
}

/// Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to `min_lr`
/// at `total` steps (evaluated per optimizer step).
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub peak: f64,
    pub min_lr: f64,
    pub warmup: u64,
    pub total: u64,
}

impl Schedule {
    /// The schedule of a run cut short: a recipe's schedule of `full` steps with `warmup`
    /// warmup steps, fitted into the `total <= full` steps the run really takes (a
    /// `max_steps` run), so the cosine reaches `min_lr` at the run's last step. Warmup keeps
    /// its share of the run, but at least a tenth of it (never more than `warmup`): a
    /// 200-step cut of a 24-epoch recipe warms up over 20 steps. `total == full` gives the
    /// recipe's schedule unchanged.
    pub fn fitted(peak: f64, min_lr: f64, warmup: u64, full: u64, total: u64) -> Schedule {
        let total = total.min(full);
        let share = (warmup as f64 * total as f64 / full.max(1) as f64).round() as u64;
        Schedule {
            peak,
            min_lr,
            warmup: share.max(warmup.min(total / 10)).min(warmup),
            total,
        }
    }

    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let t = ((step - self.warmup) as f64 / span as f64).min(1.0);
        self.min_lr + 0.5 * (self.peak - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let s = Schedule {
            peak: 1.0,
            min_lr: 0.1,
            warmup: 4,
            total: 14,
        };
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert!((s.lr(4) - 1.0).abs() < 1e-12);
        assert!((s.lr(9) - 0.55).abs() < 1e-12);
        assert!((s.lr(14) - 0.1).abs() < 1e-12);
        assert!((s.lr(100) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn a_cut_schedule_fits_into_the_run() {
        // The full length: the recipe's schedule.
        let s = Schedule::fitted(1.0, 0.0, 430, 20616, 20616);
        assert_eq!((s.warmup, s.total), (430, 20616));
        // The default recipe cut at 200 steps: a tenth warms up, the cosine ends at 200.
        let s = Schedule::fitted(1.0, 0.0, 430, 20616, 200);
        assert_eq!((s.warmup, s.total), (20, 200));
        assert!(s.lr(199) < 1e-3);
        // Nearly full: warmup keeps its share.
        assert_eq!(Schedule::fitted(1.0, 0.0, 430, 1000, 999).warmup, 430);
        assert_eq!(Schedule::fitted(1.0, 0.0, 430, 1000, 500).warmup, 215);
        // No warmup stays none; a total past the full length is the full length.
        assert_eq!(Schedule::fitted(1.0, 0.0, 0, 100, 30).warmup, 0);
        assert_eq!(Schedule::fitted(1.0, 0.0, 5, 100, 300).total, 100);
    }

    #[test]
    fn one_step_matches_hand_computed_adamw() {
        let w = Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0]], &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.5f32], &Device::Cpu).unwrap()).unwrap();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(vec![("w".into(), w.clone()), ("b".into(), b.clone())], cfg);
        // loss = 3·w0 + w1 + 2·b → grads (3, 1) and 2.
        let loss = ((w.as_tensor().sum_all().unwrap()
            + (w.as_tensor().narrow(1, 0, 1).unwrap().sum_all().unwrap() * 2.0).unwrap())
        .unwrap()
            + (b.as_tensor().sum_all().unwrap() * 2.0).unwrap())
        .unwrap();
        opt.accumulate(&loss.backward().unwrap()).unwrap();
        let norm = opt.step(0.01, None).unwrap();
        assert!((norm - (9.0f64 + 1.0 + 4.0).sqrt()).abs() < 1e-6);
        // First step: m̂/(√v̂+eps) = sign(g) (up to eps); decay only on the matrix.
        let wv = w.as_tensor().to_vec2::<f32>().unwrap();
        assert!(
            (wv[0][0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6,
            "{wv:?}"
        );
        assert!((wv[0][1] - (-2.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6);
        let bv = b.as_tensor().to_vec1::<f32>().unwrap();
        assert!((bv[0] - (0.5 - 0.01)).abs() < 1e-6);
        assert_eq!(opt.grad_norm(), 0.0);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let w = Var::from_tensor(&Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()).unwrap();
        let cfg = AdamWConfig {
            beta1: 0.0,
            beta2: 0.0,
            eps: 0.0,
            weight_decay: 0.0,
        };
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg);
        // loss = ½‖w‖² → grad = w = (3, 4), norm 5; clipped to norm 1 → (0.6, 0.8)
        let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        opt.accumulate(&loss.backward().unwrap()).unwrap();
        let norm = opt.step(1.0, Some(1.0)).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        // β = 0: update = lr · g/|g| elementwise = 1 per element regardless of clipping.
        let v = w.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (v[0] - 2.0).abs() < 1e-5 && (v[1] - 3.0).abs() < 1e-5,
            "{v:?}"
        );
    }
}
