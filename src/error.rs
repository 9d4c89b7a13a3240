//! The library's one error type. Every variant names what it is about (a file, a tensor,
//! a config field) so the binary can print it as one line.

use std::path::PathBuf;

/// Errors from the library. Messages are complete sentences without a trailing period,
/// suitable for `error: {e}` on one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file exists but its contents are not what its format requires.
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },

    /// A configuration is inconsistent or names something unknown.
    #[error("invalid config: {0}")]
    Config(String),

    /// A name (preset, dataset, subcommand value) that we do not know.
    #[error("unknown {kind} '{name}'{hint}")]
    Unknown {
        kind: &'static str,
        name: String,
        /// Extra text, e.g. " (known: a, b, c)".
        hint: String,
    },

    /// A checkpoint does not fit the architecture.
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },

    /// A tensor had the wrong shape.
    #[error("tensor {name}: expected {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A download failed (network, HTTP status, truncated transfer).
    #[error("download {url}: {msg}")]
    Download { url: String, msg: String },

    /// A file's checksum does not match the published one.
    #[error("{}: checksum mismatch (expected {expected}, found {found})", path.display())]
    Checksum {
        path: PathBuf,
        expected: String,
        found: String,
    },

    /// Training diverged or hit another unrecoverable numeric condition.
    #[error("{0}")]
    Numeric(String),

    /// Any other invalid argument passed by the caller.
    #[error("{0}")]
    Invalid(String),

    /// An error from the tensor engine.
    #[error("tensor engine: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A config error naming the first of `rates` (dropout, stochastic depth) outside [0, 1),
/// NaN included.
pub fn check_rates<'a>(rates: impl IntoIterator<Item = (&'a str, f64)>) -> Result<()> {
    match rates.into_iter().find(|(_, p)| !(0.0..1.0).contains(p)) {
        Some((name, p)) => Err(Error::Config(format!("{name} must be in [0, 1), got {p}"))),
        None => Ok(()),
    }
}

/// A config error naming the first of `fields` that is not a finite number (NaN passes no
/// range comparison, so each field is checked and named here first).
pub fn check_finite<'a>(fields: impl IntoIterator<Item = (&'a str, f64)>) -> Result<()> {
    match fields.into_iter().find(|(_, v)| !v.is_finite()) {
        Some((name, v)) => Err(Error::Config(format!(
            "{name} must be a finite number, got {v}"
        ))),
        None => Ok(()),
    }
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error for `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
