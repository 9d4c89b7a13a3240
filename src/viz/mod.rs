//! Attention analysis for the pictures of a Vision Transformer: head fusion, rollout and
//! the maps derived from them, as pure functions on row-major `f32` slices, plus atomic
//! PNG and `.npy` writers.
//!
//! Nothing here touches the model or tensors: callers pass slices with their shapes.
//! Every numbered index (tokens, patches, rows, columns) is 0-based.

mod attention;
mod io;

pub use attention::{
    cls_map, cosine_similarity_matrix, fuse_heads, mean_query_map, rollout, HeadFusion,
};
pub use io::{save_png, write_npy};
