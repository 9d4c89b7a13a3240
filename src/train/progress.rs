//! Training progress on the terminal: one indicatif bar per epoch with loss, accuracy,
//! learning rate, images/second and the share of time spent waiting for data; plain lines
//! when stdout is not a terminal; or quiet.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use super::EpochMetrics;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A live bar per epoch (stdout is a terminal).
    Bar,
    /// A plain line every tenth of an epoch.
    Lines,
    /// Nothing but warnings.
    Quiet,
}

impl ProgressMode {
    /// Bars on a terminal, plain lines otherwise, nothing when `quiet`.
    pub fn auto(quiet: bool) -> Self {
        if quiet {
            ProgressMode::Quiet
        } else if std::io::stdout().is_terminal() {
            ProgressMode::Bar
        } else {
            ProgressMode::Lines
        }
    }
}

/// Receives the training loop's events and shows them.
pub struct Progress {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    epoch: usize,
    epochs: usize,
    total: u64,
}

impl Progress {
    pub fn new(mode: ProgressMode) -> Self {
        Progress {
            mode,
            bar: None,
            epoch: 0,
            epochs: 0,
            total: 0,
        }
    }

    pub fn is_quiet(&self) -> bool {
        self.mode == ProgressMode::Quiet
    }

    /// A message shown unless quiet (what the run is about to do).
    pub fn info(&self, msg: &str) {
        if self.mode != ProgressMode::Quiet {
            println!("{msg}");
        }
    }

    /// A message that is always shown (warnings).
    pub fn note(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    pub(super) fn start_epoch(&mut self, epoch: usize, epochs: usize, batches: u64, done: u64) {
        self.epoch = epoch;
        self.epochs = epochs;
        self.total = batches;
        if self.mode == ProgressMode::Bar {
            let bar = ProgressBar::new(batches);
            bar.set_style(
                ProgressStyle::with_template(
                    "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("{epoch}/{epochs}"));
            bar.set_position(done);
            self.bar = Some(bar);
        }
    }

    /// One batch done: running loss and accuracy, learning rate, images per second, and the
    /// shares of the time spent waiting for data, running the teacher and (data-parallel) in
    /// collectives, where there are any.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn step(
        &mut self,
        batch: u64,
        loss: f64,
        acc: f64,
        lr: f64,
        ips: f64,
        wait: f64,
        teacher: Option<f64>,
        sync: Option<f64>,
    ) {
        let mut msg = format!(
            "loss {loss:.4} acc {:.2}% lr {lr:.2e} {ips:.0} img/s data-wait {:.0}%",
            100.0 * acc,
            100.0 * wait
        );
        if let Some(t) = teacher {
            msg.push_str(&format!(" teacher {:.0}%", 100.0 * t));
        }
        if let Some(s) = sync {
            msg.push_str(&format!(" sync {:.0}%", 100.0 * s));
        }
        match self.mode {
            ProgressMode::Bar => {
                if let Some(b) = &self.bar {
                    b.set_position(batch);
                    b.set_message(msg);
                }
            }
            ProgressMode::Lines => {
                let tenth = (self.total / 10).max(1);
                if batch.is_multiple_of(tenth) {
                    println!(
                        "epoch {}/{} batch {batch}/{} {msg}",
                        self.epoch, self.epochs, self.total
                    );
                }
            }
            ProgressMode::Quiet => {}
        }
    }

    pub(super) fn end_epoch(&mut self, m: &EpochMetrics) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if self.mode != ProgressMode::Quiet {
            println!("{}", m.summary_line(self.epochs));
        }
    }
}
