//! Vision Transformers in Rust: build, train, fine-tune, evaluate, explain and run ViTs.
//!
//! Layers, bottom up: [`ops`] (differentiable kernels), [`model`] (the network, configured
//! by [`config`]), [`weights`] (checkpoints), [`data`] (datasets), [`predict`] (inference on
//! image files), [`viz`] (pictures), [`explain`] (what the model sees), [`bench`] (timing).
//! The `vit` binary only parses arguments and prints.
//!
//! Unsafe code is confined by the compiler: it is denied here, for the whole crate, and
//! allowed only in `ops::cpu` (the fused kernels; their `mod.rs` allows it and makes every
//! `unsafe` block carry a `// SAFETY:` comment) and in [`runtime`] (one call to glibc's
//! `mallopt`).

#![deny(unsafe_code)]

pub mod atomic;
pub mod bench;
pub mod config;
pub mod data;
pub mod error;
pub mod explain;
pub mod model;
pub mod ops;
pub mod predict;
#[allow(unsafe_code)] // libc::mallopt
pub mod runtime;
pub mod viz;
pub mod weights;

pub use config::ViTConfig;
pub use error::{Error, Result};
pub use model::VisionTransformer;
pub mod train;
