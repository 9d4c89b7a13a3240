//! `vit pos-embed`: how similar a model's position embeddings are to each other (the ViT
//! paper's figure 7), as a grid of maps, the full matrix and a plot against offset.

use std::path::Path;

use serde::Serialize;

use super::{create_dir, save, Explained, Geometry};
use crate::models::{Architecture, Classifier};
use crate::viz::{self, Colormap, HeatmapOpts, MapGridOpts};
use crate::{Error, Result};

/// How similar the position embeddings of the patches are (the class token's is left
/// out). Writes to `out_dir` (created if missing):
///
/// * `pos_embed_similarity.png`: for every patch position, the cosine similarity of its
///   embedding with those of all positions, as a small map placed at that position in
///   the patch grid (the ViT paper's figure 7), on one scale from −1 to 1.
/// * `pos_embed_matrix.png`: the full N × N similarity matrix (patch i vs patch j).
/// * `pos_embed_adjacent.png`: the similarity against distance: for each column offset
///   Δ, the mean similarity of positions (r, c) and (r, c + Δ) over all rows and columns
///   (Δ = 1 is horizontal neighbours), and the same for row offsets.
/// * with `save_raw`: `pos_embed_similarity.npy`, the N × N matrix.
///
/// A fixed sin-cos embedding is drawn the same way; a model without a position
/// embedding is an error.
pub fn pos_embed(model: &dyn Classifier, out_dir: &Path, save_raw: bool) -> Result<Explained> {
    let cfg = model.config();
    let g = Geometry::of(&cfg)?;
    let PosSimilarity {
        n, sim, learned, ..
    } = pos_embed_similarity(model)?;
    let mut notes = Vec::new();
    let kind = if learned {
        "learned"
    } else {
        notes.push("the position embedding is the fixed 2-D sin-cos table, not learned".into());
        "fixed sin-cos"
    };

    create_dir(out_dir)?;
    let mut files = Vec::new();
    let maps: Vec<(String, Vec<f32>)> = sim
        .chunks_exact(n)
        .map(|row| (String::new(), row.to_vec()))
        .collect();
    let o = MapGridOpts {
        title: format!("Cosine similarity of {kind} position embeddings"),
        cols: g.gw,
        cell_px: (48 / g.gh.max(g.gw) as u32).clamp(2, 12),
        colormap: Colormap::Viridis,
        range: Some((-1.0, 1.0)),
        x_label: "input patch column".into(),
        y_label: "input patch row".into(),
        number_axes: true,
    };
    let grid = viz::map_grid(&maps, g.gh, g.gw, &o)?;
    save(&grid, out_dir, "pos_embed_similarity.png", &mut files)?;

    let o = HeatmapOpts {
        title: format!("Position embedding similarity, {n} patches (row-major)"),
        x_label: "patch".into(),
        y_label: "patch".into(),
        cell_px: (640 / n as u32).clamp(1, 24),
        range: Some((-1.0, 1.0)),
        ..Default::default()
    };
    let matrix = viz::heatmap(&sim, n, n, &o)?;
    save(&matrix, out_dir, "pos_embed_matrix.png", &mut files)?;

    let series = offset_similarity(&sim, g.gh, g.gw);
    let plot = viz::line_plot(
        &series,
        "Mean cosine similarity of position embeddings vs. offset",
        "offset (patches)",
        "mean cosine similarity",
    )?;
    save(&plot, out_dir, "pos_embed_adjacent.png", &mut files)?;

    if save_raw {
        let path = out_dir.join("pos_embed_similarity.npy");
        viz::write_npy(&path, &[n, n], &sim)?;
        files.push(path);
    }
    Ok(Explained { files, notes })
}

/// The cosine similarity of the position embeddings of every pair of patches.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PosSimilarity {
    pub grid_h: usize,
    pub grid_w: usize,
    /// Patches: `grid_h · grid_w`.
    pub n: usize,
    /// `n × n` row-major: patch i against patch j, in [−1, 1].
    pub sim: Vec<f32>,
    /// Learned (else the fixed sin-cos table).
    pub learned: bool,
}

/// The similarity [`pos_embed`] draws, as numbers; a model without a position embedding
/// is an error.
pub fn pos_embed_similarity(model: &dyn Classifier) -> Result<PosSimilarity> {
    let cfg = model.config();
    let g = Geometry::of(&cfg)?;
    let pos = model.pos_embed().ok_or_else(|| {
        Error::Invalid(
            "the model has no position embedding (pos_embed = \"none\"): nothing to draw".into(),
        )
    })?;
    let n = g.gh * g.gw;
    let d = pos.dim(2)?;
    let patches = pos.squeeze(0)?.narrow(0, g.prefix, n)?; // (N, D)
    let sim = viz::cosine_similarity_matrix(&patches.flatten_all()?.to_vec1::<f32>()?, n, d)?;
    Ok(PosSimilarity {
        grid_h: g.gh,
        grid_w: g.gw,
        n,
        sim,
        learned: cfg.tokens().is_some_and(|t| t.learned_pos_embed),
    })
}

/// Mean similarity of position pairs `Δ` columns apart in a row ("horizontal") and `Δ`
/// rows apart in a column ("vertical"), for Δ = 0, 1, ….
fn offset_similarity(sim: &[f32], gh: usize, gw: usize) -> Vec<(String, Vec<(f32, f32)>)> {
    let n = gh * gw;
    let at = |r: usize, c: usize, r2: usize, c2: usize| sim[(r * gw + c) * n + r2 * gw + c2] as f64;
    let mut horizontal = Vec::new();
    for dc in 0..gw {
        let mut sum = 0.0;
        for r in 0..gh {
            for c in 0..gw - dc {
                sum += at(r, c, r, c + dc);
            }
        }
        horizontal.push((dc as f32, (sum / (gh * (gw - dc)) as f64) as f32));
    }
    let mut vertical = Vec::new();
    for dr in 0..gh {
        let mut sum = 0.0;
        for r in 0..gh - dr {
            for c in 0..gw {
                sum += at(r, c, r + dr, c);
            }
        }
        vertical.push((dr as f32, (sum / ((gh - dr) * gw) as f64) as f32));
    }
    vec![
        ("horizontal (same row, Δ columns)".into(), horizontal),
        ("vertical (same column, Δ rows)".into(), vertical),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::testutil::*;
    use crate::models::vit::PosEmbed;
    use crate::models::{ModelConfig, ViTConfig};
    use candle_core::Device;

    #[test]
    fn pos_embed_learned_sincos_and_none() {
        let p = predictor("timm_tiny");
        let dir = tempfile::tempdir().unwrap();
        let r = pos_embed(p.model.as_ref(), dir.path(), true).unwrap();
        assert_eq!(r.files.len(), 4);
        let (shape, sim) = read_npy(&dir.path().join("pos_embed_similarity.npy"));
        assert_eq!(shape, [16, 16]);
        for i in 0..16 {
            assert!((sim[i * 16 + i] - 1.0).abs() < 1e-5);
        }
        let cfg = ViTConfig {
            pos_embed: PosEmbed::Sincos2d,
            ..ViTConfig::timm(16, 4, 16, 1, 2)
        };
        let m = ModelConfig::Vit(cfg.clone())
            .init_model(0, &Device::Cpu)
            .unwrap();
        let r = pos_embed(m.as_ref(), dir.path(), false).unwrap();
        assert!(r.notes[0].contains("sin-cos"));
        let none = ViTConfig {
            pos_embed: PosEmbed::None,
            ..cfg
        };
        let m = ModelConfig::Vit(none).init_model(0, &Device::Cpu).unwrap();
        let e = pos_embed(m.as_ref(), dir.path(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no position embedding"), "{e}");
    }

    #[test]
    fn offset_similarity_by_hand() {
        // 2×2 grid; sim[i][j] = 1 on the diagonal, 0.5 for horizontal neighbours (0-1, 2-3),
        // -0.5 for vertical ones (0-2, 1-3), 0 diagonally.
        let sim = [
            1.0, 0.5, -0.5, 0.0, //
            0.5, 1.0, 0.0, -0.5, //
            -0.5, 0.0, 1.0, 0.5, //
            0.0, -0.5, 0.5, 1.0,
        ];
        let s = offset_similarity(&sim, 2, 2);
        assert_eq!(s[0].1, [(0.0, 1.0), (1.0, 0.5)]);
        assert_eq!(s[1].1, [(0.0, 1.0), (1.0, -0.5)]);
    }
}
