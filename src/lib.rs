//! Vision Transformers in Rust: build, train, fine-tune, evaluate, explain and run ViTs.
//!
//! Layers, bottom up: [`ops`] (differentiable kernels), [`models`] (the architectures, their
//! configs and presets), [`weights`] (checkpoints), [`data`] (datasets), [`predict`]
//! (checkpoint to model, inference on image files), [`train`], [`viz`] (pictures),
//! [`explain`] (what the model sees), [`explore`] (the same in a local web page), [`onnx`]
//! (export), [`bench`] (timing).
//! The `vit` binary only parses arguments and prints.
//!
//! Unsafe code is confined by the compiler: it is denied here, for the whole crate, and
//! allowed only in `ops::cpu` (the fused kernels; their `mod.rs` allows it and makes every
//! `unsafe` block carry a `// SAFETY:` comment) and in [`runtime`] (one call to glibc's
//! `mallopt`).

#![deny(unsafe_code)]

pub mod atomic;
pub mod bench;
pub mod data;
pub mod dist;
pub mod error;
pub mod explain;
pub mod explore;
pub mod files;
pub mod models;
pub mod onnx;
pub mod ops;
pub mod predict;
pub mod quant;
#[allow(unsafe_code)] // libc::mallopt
pub mod runtime;
pub mod train;
pub mod viz;
pub mod weights;

pub use error::{Error, Result};
pub use models::{Architecture, Classifier, ModelConfig, ViTConfig, VisionTransformer};
