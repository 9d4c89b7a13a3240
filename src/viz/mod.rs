//! Pictures and attention analysis: pure functions from numbers to [`image::RgbImage`]s
//! (heatmaps, attention overlays, patch grids, map grids, line plots) and from attention
//! matrices to maps (rollout, class-token maps), plus atomic PNG and `.npy` writers.
//!
//! Nothing here touches the model or tensors: callers pass row-major `f32` slices with
//! their shapes. Text is drawn with DejaVu Sans, embedded in the library, so no system font
//! is needed. Every numbered index (tokens, patches, rows, columns) is 0-based.

mod attention;
mod canvas;
mod color;
mod grid;
mod heatmap;
pub(crate) mod io;
mod overlay;
mod patches;
mod plot;

pub use attention::{
    cls_map, cosine_similarity_matrix, fuse_heads, mean_query_map, query_map, rollout, HeadFusion,
};
pub use color::{Colormap, MISSING};
pub use grid::{image_grid, map_grid, MapGridOpts};
pub use heatmap::{heatmap, HeatmapOpts};
pub use io::{save_png, write_npy};
pub use overlay::{overlay, upsample_bilinear};
pub use patches::{patch_grid, patch_sheet, GRID_LINE};
pub use plot::{line_plot, PLOT_SIZE};
