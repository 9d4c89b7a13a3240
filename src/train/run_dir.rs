//! The run folder: its file names, checkpoints that carry the training state (optimizer
//! moments and the [`Position`] in the run) for an exact resume, and its default name.
//! Knows nothing of how a step is computed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::{AdamW, Trainable};
use crate::models::ModelConfig;
use crate::weights::{self, Arch, FitOptions, SaveMeta};
use crate::{Error, Result};

/// File names inside a run folder.
pub const LAST: &str = "checkpoint-last.safetensors";
pub const BEST: &str = "checkpoint-best.safetensors";
/// The best checkpoint's result on the test set (JSON of `EvalResult`).
pub const TEST: &str = "test.json";
pub const METRICS: &str = "metrics.jsonl";
pub const RECIPE: &str = "config.toml";

/// Where training is within the run; saved in every checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Position {
    pub(super) epoch: u64,
    /// Next batch of `epoch` to train on.
    pub(super) batch: u64,
    /// Optimizer steps done.
    pub(super) step: u64,
    pub(super) best_val_acc: f64,
    // Running sums of the current epoch, so a mid-epoch resume reports the same numbers.
    pub(super) loss_sum: f64,
    pub(super) correct: u64,
    pub(super) seen: u64,
    pub(super) seconds: f64,
    /// Processes that trained the run (data-parallel; 1 alone).
    pub(super) processes: u64,
}

impl Position {
    pub(super) fn to_tensors(self) -> Result<HashMap<String, Tensor>> {
        let dev = Device::Cpu;
        let ints = [self.epoch, self.batch, self.step, self.correct, self.seen];
        let floats = [self.best_val_acc, self.loss_sum, self.seconds];
        Ok(HashMap::from([
            (
                "position.ints".to_string(),
                Tensor::new(&ints.map(|x| x as i64), &dev)?,
            ),
            ("position.floats".to_string(), Tensor::new(&floats, &dev)?),
            (
                "position.processes".to_string(),
                Tensor::new(&[self.processes.max(1) as i64], &dev)?,
            ),
        ]))
    }

    pub(super) fn from_tensors(state: &HashMap<String, Tensor>) -> Result<Self> {
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
        // Written since data-parallel training; a run from before had one process.
        let processes = match state.get("position.processes") {
            Some(t) => t.to_vec1::<i64>()?.first().copied().unwrap_or(1).max(1) as u64,
            None => 1,
        };
        Ok(Position {
            epoch: i[0] as u64,
            batch: i[1] as u64,
            step: i[2] as u64,
            correct: i[3] as u64,
            seen: i[4] as u64,
            best_val_acc: f[0],
            loss_sum: f[1],
            seconds: f[2],
            processes,
        })
    }
}

/// Writes a checkpoint of `net` with the optimizer's state and the position in the run.
pub(super) fn save_checkpoint(
    path: &Path,
    net: &Trainable,
    opt: &AdamW,
    pos: Position,
    meta: &SaveMeta,
) -> Result<()> {
    let mut state = opt.state()?;
    state.extend(pos.to_tensors()?);
    weights::save(path, &net.tensors(), &state, meta)
}

/// What a resumed run starts from.
pub(super) struct Resumed {
    /// The last checkpoint's weights, fitted to the run's config.
    pub tensors: HashMap<String, Tensor>,
    pub position: Position,
    /// The training state stored beside them (optimizer moments and the position).
    pub state: HashMap<String, Tensor>,
}

/// Reads the last checkpoint of the run in `dir` for a resume.
pub(super) fn resume_state(dir: &Path, cfg: &ModelConfig) -> Result<Resumed> {
    let last = dir.join(LAST);
    if !last.exists() {
        return Err(Error::format(
            dir,
            format!(
                "the run has no {LAST} to resume from (it stopped before its first \
                 checkpoint); start it again without --resume"
            ),
        ));
    }
    let fitted = weights::load_fitted(&last, &Arch::Config(cfg.clone()), FitOptions::default())?;
    let state = fitted.checkpoint.train_state;
    Ok(Resumed {
        tensors: fitted.tensors,
        position: Position::from_tensors(&state)?,
        state,
    })
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
