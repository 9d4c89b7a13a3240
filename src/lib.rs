//! Vision Transformers in Rust: build, train, fine-tune, evaluate, explain and run ViTs.
//!
//! Layers, bottom up: [`ops`] (differentiable kernels), [`model`] (the network),
//! [`weights`] (checkpoints), [`data`] (datasets), [`train`] (the loop), [`viz`] (pictures).
//! The `vit` binary only parses arguments and prints.

pub mod data;
pub mod error;

pub use error::{Error, Result};
pub mod config;
pub mod model;
pub mod ops;
pub mod viz;

pub use config::ViTConfig;
pub use model::VisionTransformer;
pub mod atomic;
pub mod predict;
pub mod weights;
