//! Training and evaluation: the loop from batch to weight update (forward, label-smoothed
//! cross-entropy, backward, accumulation, clipping, AdamW, schedule), per-epoch validation,
//! crash-safe checkpoints with exact resume, metrics, and the final report.
//!
//! A data-parallel run (`dist`) is the same loop in every process, each on its shards of
//! every micro-batch, the gradients summed before each optimizer step.
//!
//! `step` is one micro-batch (shards side by side, gradients into the optimizer), `distill`
//! the teacher and DeiT's distillation loss, `compare` finished runs side by side, `run_dir`
//! the run folder (checkpoints with training state), `run` the epoch loop, `eval` the
//! evaluation of a model or checkpoint, `optim` AdamW and the schedule, `recipe` the options.

mod compare;
mod distill;
mod eval;
mod optim;
mod progress;
mod recipe;
mod report;
mod run;
mod run_dir;
mod step;

use std::path::PathBuf;

pub use compare::{compare_picture, compare_runs, read_run, table, RunRow};
pub use distill::{distillation_loss, Distill, DistillKind, Teacher, TeacherCache};
pub use eval::{eval_checkpoint, evaluate, evaluate_against, evaluate_on, Agreement, EvalResult};
pub use optim::{decays, AdamW, AdamWConfig, Schedule};
pub use progress::{Progress, ProgressMode};
pub use recipe::Recipe;
pub use report::{confusion_picture, curves_picture, EpochMetrics};
pub use run::{device, load_data, train, Data};
pub use run_dir::{default_out_dir, BEST, LAST, METRICS, RECIPE, TEST};
pub use step::{
    forward_backward, forward_sharded, shard_count, Micro, MicroStep, ShardRngs, Shards,
    StepOptions, Teaching, Trainable,
};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub out: PathBuf,
    pub epochs: Vec<EpochMetrics>,
    pub test: EvalResult,
    /// The best validation accuracy of its epochs; `None` when the run has no validation set.
    pub best_val_acc: Option<f64>,
    /// Seconds this call trained (0 for a run that was already finished).
    pub seconds: f64,
    /// Files written at the end (report, pictures).
    pub files: Vec<PathBuf>,
    /// A resumed run that had nothing left to do: nothing was trained or written.
    pub already_finished: bool,
}

#[cfg(test)]
mod tests;
