//! `vit attention` for models whose attention is not over one global set of tokens: Swin
//! (each block's attention within its windows, stitched back onto the image with the
//! window shift undone) and PVT (the attention its spatially reduced keys receive). With no
//! class token, a block's map shows, for each key, the attention it receives averaged over
//! the queries that see it ([`crate::models::LocalAttention`]).

use std::path::{Path, PathBuf};

use image::RgbImage;

use super::attention::{channel_note, magnified, prediction_label, AttentionOptions, Method};
use super::{create_dir, display_image, save, Explained};
use crate::models::{Architecture, Cells, LocalAttention};
use crate::predict::{eval_transform, load_image, Predictor};
use crate::viz::{self, MapGridOpts};
use crate::{Error, Result};

/// Draws the local attention of `predictor`'s model on one image, or `None` when the model
/// has none. Files written to `out_dir`, by method:
///
/// * `Cls`: `local_attention_block{L}.png` — top row the input and block L's map per head
///   and their mean (or the one `head`), each divided by its maximum; bottom row the input
///   with the block's cells drawn where they lie on the image (Swin: its windows, offset by
///   the shift in shifted blocks; PVT: the area each reduced key pools) and the maps laid
///   over it. L counts blocks over all stages, default the last.
/// * `All`: `local_attention_all_blocks.png` — the mean-of-heads map of every block, on
///   the first block's grid (coarser maps repeated).
/// * `Rollout` does not apply: the stages have different token counts.
/// * With `save_raw`: `local_attention_block{L}.npy`, shape (heads, h, w), for every block
///   drawn.
///
/// Maps are spread over the whole image. Where a PVT's ratio does not divide its map (a
/// 7×7 map reduced by 2 gives 3×3 keys over 6×6 tokens), the last rows and columns of
/// tokens reach no key and the picture stretches the keys over them.
pub fn local_attention(
    predictor: &Predictor,
    image_path: &Path,
    opts: &AttentionOptions,
    out_dir: &Path,
) -> Result<Option<Explained>> {
    let cfg = &predictor.config;
    let img = load_image(image_path)?;
    let mut notes: Vec<String> = channel_note(&img, cfg.in_channels()).into_iter().collect();
    let x = eval_transform(&img, cfg, &predictor.preprocess)?;
    let Some((logits, blocks)) = predictor
        .model
        .local_attention(&x.to_device(&predictor.device)?)?
    else {
        return Ok(None);
    };
    if opts.method == Method::Rollout {
        return Err(Error::Invalid(format!(
            "rollout needs one set of tokens through every layer, but a {} model's stages \
             have different token counts: use --method cls or all",
            cfg.arch()
        )));
    }
    let depth = blocks.len();
    if let Some(l) = opts.layer.filter(|&l| l >= depth) {
        return Err(Error::Invalid(format!(
            "layer {l} does not exist: the model has {depth} blocks (valid: 0..={})",
            depth - 1
        )));
    }
    let layer = opts.layer.unwrap_or(depth - 1);
    let input = display_image(&x, &predictor.preprocess)?;
    let (big, _) = magnified(&input);
    let predicted = prediction_label(&logits, predictor)?;
    let title = |what: String| {
        if predicted.is_empty() {
            what
        } else {
            format!("{what} — {predicted}")
        }
    };
    notes.push(match blocks[0].cells {
        Cells::Windows { .. } => "window attention has no class token: maps show the \
                                  attention each token receives, averaged over the queries of \
                                  its window, with the window shift undone"
            .into(),
        Cells::Reduced { .. } => "spatial-reduction attention has no class token: maps show \
                                  the attention each reduced key receives, averaged over all \
                                  queries"
            .into(),
    });

    create_dir(out_dir)?;
    let mut files = Vec::new();
    let drawn: Vec<usize> = match opts.method {
        Method::All => {
            if opts.layer.is_some() {
                notes.push(
                    "the layer option is ignored by the all method, which draws every block".into(),
                );
            }
            if opts.head.is_some() {
                notes.push("the head option applies to the cls method only".into());
            }
            draw_all(&blocks, &title, opts, out_dir, &mut files)?;
            (0..depth).collect()
        }
        _ => {
            let b = Block::of(&blocks[layer])?;
            if let Some(h) = opts.head.filter(|&h| h >= b.heads) {
                return Err(Error::Invalid(format!(
                    "head {h} does not exist: block {layer} ({}) has {} heads (valid: 0..={})",
                    blocks[layer].name,
                    b.heads,
                    b.heads - 1
                )));
            }
            let what = format!("Block {layer} ({})", blocks[layer].name);
            draw_block(&b, &big, &title(what), opts, out_dir, layer, &mut files)?;
            vec![layer]
        }
    };
    if opts.save_raw {
        for l in drawn {
            let b = Block::of(&blocks[l])?;
            let path = out_dir.join(format!("local_attention_block{l}.npy"));
            viz::write_npy(&path, &[b.heads, b.h, b.w], &b.values)?;
            files.push(path);
        }
    }
    Ok(Some(Explained { files, notes }))
}

/// One block's map of the first image, on the CPU.
struct Block {
    heads: usize,
    h: usize,
    w: usize,
    /// (heads, h, w).
    values: Vec<f32>,
    cells: Cells,
}

impl Block {
    fn of(m: &LocalAttention) -> Result<Self> {
        let r = m.received.get(0)?; // (heads, h, w)
        let (heads, h, w) = r.dims3()?;
        Ok(Block {
            heads,
            h,
            w,
            values: r.flatten_all()?.to_vec1::<f32>()?,
            cells: m.cells,
        })
    }

    /// Head `i`'s map divided by its maximum.
    fn head(&self, i: usize) -> Vec<f32> {
        normalised(&self.values[i * self.h * self.w..][..self.h * self.w])
    }

    /// The mean over heads divided by its maximum.
    fn mean(&self) -> Vec<f32> {
        let n = self.h * self.w;
        let mut m = vec![0f32; n];
        for head in self.values.chunks_exact(n) {
            for (a, v) in m.iter_mut().zip(head) {
                *a += v;
            }
        }
        normalised(&m)
    }
}

/// `v` divided by its maximum (all zeros stay zeros).
fn normalised(v: &[f32]) -> Vec<f32> {
    let max = v.iter().copied().fold(0f32, f32::max);
    if max > 0.0 {
        v.iter().map(|x| x / max).collect()
    } else {
        v.to_vec()
    }
}

/// Maps per head and their mean for one block, bare and over the image (see
/// [`local_attention`]).
fn draw_block(
    b: &Block,
    big: &RgbImage,
    title: &str,
    opts: &AttentionOptions,
    out: &Path,
    layer: usize,
    files: &mut Vec<PathBuf>,
) -> Result<()> {
    let mut maps: Vec<(String, Vec<f32>)> = match opts.head {
        Some(h) => vec![(format!("head {h}"), b.head(h))],
        None => (0..b.heads)
            .map(|h| (format!("head {h}"), b.head(h)))
            .collect(),
    };
    maps.push(("mean of heads".into(), b.mean()));
    let (w, h) = big.dimensions();
    let bare = |m: &[f32]| {
        RgbImage::from_fn(w, h, |x, y| {
            let (r, c) = (
                (y as usize * b.h) / h as usize,
                (x as usize * b.w) / w as usize,
            );
            opts.colormap.color(m[r * b.w + c])
        })
    };
    let mut panels = vec![("input".to_string(), big.clone())];
    for (label, m) in &maps {
        panels.push((label.clone(), bare(m)));
    }
    let cells = match b.cells {
        Cells::Windows { .. } => "windows",
        Cells::Reduced { .. } => "keys",
    };
    panels.push((cells.to_string(), with_cells(big, b)));
    for (label, m) in &maps {
        let o = viz::overlay(big, m, b.h, b.w, opts.alpha, opts.colormap)?;
        panels.push((format!("{label} overlay"), o));
    }
    let what = match b.cells {
        Cells::Windows { size, shift } => format!(
            "{title}: attention received within {}x{} windows{} (each map ÷ its max)",
            size.0,
            size.1,
            if shift != (0, 0) { ", shifted" } else { "" }
        ),
        Cells::Reduced { ratio } => format!(
            "{title}: attention received by {}x{} keys, each pooling {ratio}x{ratio} tokens \
             (mean over queries; each map ÷ its max)",
            b.h, b.w
        ),
    };
    let pic = viz::image_grid(
        &panels,
        maps.len() + 1,
        &what,
        Some((opts.colormap, 0.0, 1.0)),
    )?;
    save(
        &pic,
        out,
        &format!("local_attention_block{layer}.png"),
        files,
    )
}

/// The image with the block's cell boundaries: Swin's windows, whose rows start at token
/// rows r with r ≡ shift (mod window), as the roll put them; PVT's reduced keys, one cell
/// of the map each.
fn with_cells(big: &RgbImage, b: &Block) -> RgbImage {
    let mut img = big.clone();
    let (w, h) = img.dimensions();
    let ((wh, ww), (sh, sw)) = match b.cells {
        Cells::Windows { size, shift } => (size, shift),
        Cells::Reduced { .. } => ((1, 1), (0, 0)),
    };
    // The first pixel of token row r (column c) of the block's map.
    let row_px = |r: usize| (r * h as usize / b.h) as u32;
    let col_px = |c: usize| (c * w as usize / b.w) as u32;
    let rows: Vec<u32> = (0..b.h)
        .filter(|r| (r + wh - sh % wh) % wh == 0)
        .map(row_px)
        .collect();
    let cols: Vec<u32> = (0..b.w)
        .filter(|c| (c + ww - sw % ww) % ww == 0)
        .map(col_px)
        .collect();
    for (x, y, p) in img.enumerate_pixels_mut() {
        if rows.contains(&y) || cols.contains(&x) || x == w - 1 || y == h - 1 {
            *p = viz::GRID_LINE;
        }
    }
    img
}

/// The mean-of-heads map of every block on one grid (see [`local_attention`]).
fn draw_all(
    blocks: &[LocalAttention],
    title: &dyn Fn(String) -> String,
    opts: &AttentionOptions,
    out: &Path,
    files: &mut Vec<PathBuf>,
) -> Result<()> {
    let first = Block::of(&blocks[0])?;
    let (gh, gw) = (first.h, first.w);
    let mut maps = Vec::with_capacity(blocks.len());
    for m in blocks {
        let b = Block::of(m)?;
        let mean = b.mean();
        // Nearest-neighbour onto the first stage's grid.
        let up: Vec<f32> = (0..gh * gw)
            .map(|i| mean[(i / gw) * b.h / gh * b.w + (i % gw) * b.w / gw])
            .collect();
        maps.push((String::new(), up));
    }
    let o = MapGridOpts {
        title: title("Attention of every block, mean of heads".into()),
        cols: blocks.len().min(6),
        cell_px: (96 / gh.max(gw) as u32).clamp(1, 16),
        colormap: opts.colormap,
        range: Some((0.0, 1.0)),
        x_label: "block".into(),
        y_label: String::new(),
        number_axes: true,
    };
    let pic = viz::map_grid(&maps, gh, gw, &o)?;
    save(&pic, out, "local_attention_all_blocks.png", files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::testutil::*;
    use crate::predict::LoadOptions;
    use crate::weights::Arch;

    /// timm's Swin of the parity fixture (28x28x1, two stages of two blocks).
    fn swin() -> Predictor {
        let fx = |f: &str| fixture(&format!("swin_tiny/{f}"));
        let opts = LoadOptions {
            arch: Arch::File(fx("fmnist.json")),
            ..Default::default()
        };
        Predictor::load(&fx("fmnist.safetensors"), &opts).unwrap()
    }

    #[test]
    fn a_block_is_drawn_and_saved_as_the_model_computed_it() {
        let p = swin();
        let dir = tempfile::tempdir().unwrap();
        let opts = AttentionOptions {
            layer: Some(1),
            save_raw: true,
            ..Default::default()
        };
        let r = super::super::attention(&p, &image(), &opts, dir.path()).unwrap();
        let names: Vec<String> = r
            .files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["local_attention_block1.png", "local_attention_block1.npy"]
        );
        assert!(r.notes.iter().any(|n| n.contains("window shift undone")));
        let (shape, data) = read_npy(&dir.path().join("local_attention_block1.npy"));
        assert_eq!(shape, [1, 14, 14]);
        let x = p.input(&image()).unwrap();
        let (_, maps) = p.model.local_attention(&x).unwrap().unwrap();
        let windows = Cells::Windows {
            size: (7, 7),
            shift: (3, 3),
        };
        assert_eq!(maps[1].cells, windows);
        let want = maps[1]
            .received
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(data, want);
        // Four windows of 49 tokens: the map sums to 4.
        assert!((data.iter().sum::<f32>() - 4.0).abs() < 1e-4);

        let bad = AttentionOptions {
            layer: Some(2),
            head: Some(2),
            ..Default::default()
        };
        let e = super::super::attention(&p, &image(), &bad, dir.path()).unwrap_err();
        assert!(
            e.to_string()
                .contains("block 2 (layers.1.blocks.0) has 2 heads"),
            "{e}"
        );
    }
}
