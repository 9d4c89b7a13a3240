//! `vit attention`: where a model looks in an image: the class token's attention per
//! layer and head, attention rollout, and every layer at once.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use image::{imageops, DynamicImage, RgbImage};

use super::{create_dir, display_image, save, Explained, Geometry};
use crate::models::Architecture;
use crate::predict::{eval_transform, load_image, top_k_of, Predictor};
use crate::viz::{self, Colormap, HeadFusion, HeatmapOpts, MapGridOpts};
use crate::{Error, Result};

/// Panels of the attention pictures are magnified (nearest neighbour, integer factor, at
/// most 8) until their longer side reaches this many pixels.
const PANEL_PX: u32 = 192;

/// What `vit attention` draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// One layer: the class token's attention to every patch, per head and averaged over
    /// heads, plus the layer's full attention matrix.
    #[default]
    Cls,
    /// Attention rollout (Abnar & Zuidema 2020) through the layers up to the chosen one.
    Rollout,
    /// One grid of the class-token maps of every layer and head.
    All,
}

/// Options of [`attention`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionOptions {
    /// The layer (block) drawn by `Cls`, and the last layer of `Rollout`; 0-based, default
    /// the last block. Ignored by `All`.
    pub layer: Option<usize>,
    /// One head (0-based) instead of all heads and their mean; used by `Cls` only.
    pub head: Option<usize>,
    pub method: Method,
    /// How `Rollout` fuses the heads of each layer.
    pub head_fusion: HeadFusion,
    /// Fraction of the weakest attention entries `Rollout` discards per layer, in [0, 1).
    pub discard_ratio: f32,
    /// Opacity of the map over the image at its strongest, in [0, 1].
    pub alpha: f32,
    pub colormap: Colormap,
    /// Also write the captured attention and the rollout map as `.npy`.
    pub save_raw: bool,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        AttentionOptions {
            layer: None,
            head: None,
            method: Method::Cls,
            head_fusion: HeadFusion::Mean,
            discard_ratio: 0.0,
            alpha: 0.6,
            colormap: Colormap::Inferno,
            save_raw: false,
        }
    }
}

/// Runs `predictor` on one image, capturing attention probabilities, and draws where the
/// model looks. Files written to `out_dir` (created if missing), by method:
///
/// * `Cls`: `attention_maps_layer{L}.png` — top row the input and the class token's
///   attention to the patches on the patch grid, one map per head and their mean (or the
///   one `head`); bottom row the input with its patch grid and the same maps laid over it
///   (bilinear upsampling, [`viz::overlay`]). `attention_matrix_layer{L}.png` (or
///   `..._head{H}.png`) — the layer's full query × key attention, mean over heads or the
///   one head. Token 0 is the class token, token `1 + i` is patch `i`.
/// * `Rollout`: `rollout.png` — input, rollout map on the patch grid, overlay. The map is
///   the class-token row of the rollout through layers `0..=L` ([`viz::rollout`]) over the
///   patch columns, divided by its maximum.
/// * `All`: `attention_all_layers.png` — the class-token map of every layer (rows) and
///   head (columns), each divided by its maximum.
/// * With `save_raw`: `attention_layer{L}.npy`, shape (heads, T, T) with T = tokens
///   (class token included), for every layer the pictures use; and for `Rollout`
///   `rollout.npy`, shape (grid_h, grid_w), the map as drawn.
///
/// Every map is divided by its own maximum, so it shows *where* attention goes, not how
/// much. A model without a class token has no class-token row: its maps show the attention
/// each patch receives averaged over all patch queries ([`viz::mean_query_map`]), and a
/// note says so.
///
/// The image goes through the predictor's evaluation transform, which converts it to the
/// model's channel count as timm does (`convert('RGB')`; luminance for 1-channel models),
/// with a note when that changes it. The background of the overlays is that model input,
/// un-normalised to [0, 255].
pub fn attention(
    predictor: &Predictor,
    image_path: &Path,
    opts: &AttentionOptions,
    out_dir: &Path,
) -> Result<Explained> {
    let cfg = &predictor.config;
    check_numbers(opts)?;
    if cfg.tokens().is_none() {
        if let Some(done) = super::local_attention(predictor, image_path, opts, out_dir)? {
            return Ok(done);
        }
    }
    let g = Geometry::of(cfg)?;
    let (depth, heads) = match cfg.attention_heads() {
        Some(heads) => (cfg.depth(), heads),
        None => {
            return Err(Error::Invalid(format!(
                "a {} model has no global attention to draw",
                cfg.arch()
            )))
        }
    };
    check_options(opts, depth, heads)?;
    let layer = opts.layer.unwrap_or(depth - 1);
    let mut notes = Vec::new();

    let img = load_image(image_path)?;
    if let Some(n) = channel_note(&img, cfg.in_channels()) {
        notes.push(n);
    }
    let x = eval_transform(&img, cfg, &predictor.preprocess)?;
    let input = display_image(&x, &predictor.preprocess)?;

    let layers: Vec<usize> = match opts.method {
        Method::Cls => vec![layer],
        Method::Rollout => (0..=layer).collect(),
        Method::All => (0..depth).collect(),
    };
    if opts.head.is_some() && opts.method != Method::Cls {
        notes.push(format!(
            "the head option applies to the cls method only; {} uses every head",
            match opts.method {
                Method::Rollout => "rollout",
                _ => "all",
            }
        ));
    }
    if opts.layer.is_some() && opts.method == Method::All {
        notes.push("the layer option is ignored by the all method, which draws every layer".into());
    }
    let taken = predictor
        .model
        .forward_intermediates(&x.to_device(&predictor.device)?, &layers)?;
    let logits = taken.logits;
    let attn: Vec<Vec<f32>> = taken
        .attention
        .iter()
        .map(|a| Ok(a.squeeze(0)?.flatten_all()?.to_vec1::<f32>()?))
        .collect::<Result<_>>()?;

    if g.prefix == 0 {
        notes.push(
            "the model has no class token: maps show the attention each patch receives, \
             averaged over all patch queries (mean-query map), instead of the class token's row"
                .into(),
        );
    }
    let predicted = prediction_label(&logits, predictor)?;
    let (big, scale) = magnified(&input);
    let ctx = Ctx {
        g,
        heads,
        big,
        scale,
        opts,
        predicted,
    };

    create_dir(out_dir)?;
    let mut files = Vec::new();
    match opts.method {
        Method::Cls => ctx.draw_cls(layer, &attn[0], out_dir, &mut files)?,
        Method::Rollout => ctx.draw_rollout(&attn, out_dir, &mut files)?,
        Method::All => ctx.draw_all(&attn, out_dir, &mut files)?,
    }
    if opts.save_raw {
        for (&l, a) in layers.iter().zip(&attn) {
            let path = out_dir.join(format!("attention_layer{l}.npy"));
            viz::write_npy(&path, &[heads, g.t, g.t], a)?;
            files.push(path);
        }
    }
    Ok(Explained { files, notes })
}

/// Checks the numeric options.
fn check_numbers(o: &AttentionOptions) -> Result<()> {
    if !(0.0..1.0).contains(&o.discard_ratio) {
        return Err(Error::Invalid(format!(
            "discard ratio must lie in [0, 1), got {}",
            o.discard_ratio
        )));
    }
    if !(0.0..=1.0).contains(&o.alpha) {
        return Err(Error::Invalid(format!(
            "alpha must lie in [0, 1], got {}",
            o.alpha
        )));
    }
    Ok(())
}

/// Checks the layer and head against the model.
fn check_options(o: &AttentionOptions, depth: usize, heads: usize) -> Result<()> {
    if let Some(l) = o.layer.filter(|&l| l >= depth) {
        return Err(Error::Invalid(format!(
            "layer {l} does not exist: the model has {depth} layers (valid: 0..={})",
            depth - 1
        )));
    }
    if let Some(h) = o.head.filter(|&h| h >= heads) {
        return Err(Error::Invalid(format!(
            "head {h} does not exist: the model has {heads} heads per layer (valid: 0..={})",
            heads - 1
        )));
    }
    Ok(())
}

/// The input magnified for the panels (nearest neighbour, by an integer factor of at most 8,
/// until its longer side reaches [`PANEL_PX`]), and the factor.
pub(super) fn magnified(input: &RgbImage) -> (RgbImage, u32) {
    let scale = PANEL_PX
        .div_ceil(input.width().max(input.height()).max(1))
        .clamp(1, 8);
    let (w, h) = (input.width() * scale, input.height() * scale);
    (
        imageops::resize(input, w, h, imageops::FilterType::Nearest),
        scale,
    )
}

/// A note when the evaluation transform changes the image's channels for the model.
pub(super) fn channel_note(img: &DynamicImage, channels: usize) -> Option<String> {
    let color = img.color().has_color();
    match (channels, color) {
        (1, true) => Some(
            "the colour image was converted to grayscale (luminance) for the 1-channel model"
                .into(),
        ),
        (3, false) => Some(
            "the grayscale image was repeated over 3 channels for the RGB model (as timm's \
             convert('RGB'))"
                .into(),
        ),
        _ => None,
    }
}

/// "predicted: NAME (P%)" for picture titles, or nothing for a model without a head.
pub(super) fn prediction_label(logits: &Tensor, p: &Predictor) -> Result<String> {
    if p.config.num_classes() == 0 {
        return Ok(String::new());
    }
    let logits = logits.squeeze(0)?.to_vec1::<f32>()?;
    Ok(top_k_of(&logits, 1, &p.class_names)
        .first()
        .map(|r| format!("predicted: {} ({:.0}%)", r.label, 100.0 * r.probability))
        .unwrap_or_default())
}

/// Everything the pictures of one `attention` call share.
struct Ctx<'a> {
    g: Geometry,
    heads: usize,
    /// The model input as the model sees it, magnified by `scale` for display.
    big: RgbImage,
    scale: u32,
    opts: &'a AttentionOptions,
    predicted: String,
}

impl Ctx<'_> {
    fn title(&self, what: String) -> String {
        if self.predicted.is_empty() {
            what
        } else {
            format!("{what} — {}", self.predicted)
        }
    }

    fn big_input(&self) -> RgbImage {
        self.big.clone()
    }

    /// The map as a picture the size of the magnified input, one flat colour per patch.
    fn map_panel(&self, map: &[f32]) -> RgbImage {
        let (w, h) = self.big.dimensions();
        let (gw, gh) = (self.g.gw as u32, self.g.gh as u32);
        RgbImage::from_fn(w, h, |x, y| {
            let (r, c) = ((y * gh / h) as usize, (x * gw / w) as usize);
            self.opts.colormap.color(map[r * self.g.gw + c])
        })
    }

    fn overlay_panel(&self, map: &[f32]) -> Result<RgbImage> {
        viz::overlay(
            &self.big,
            map,
            self.g.gh,
            self.g.gw,
            self.opts.alpha,
            self.opts.colormap,
        )
    }

    /// The magnified input with 1-pixel patch boundaries.
    fn input_with_grid(&self) -> RgbImage {
        let mut img = self.big_input();
        let step = (self.g.patch as u32 * self.scale).max(1);
        let (w, h) = img.dimensions();
        for (x, y, p) in img.enumerate_pixels_mut() {
            if x % step == 0 || y % step == 0 || x == w - 1 || y == h - 1 {
                *p = viz::GRID_LINE;
            }
        }
        img
    }

    fn colorbar(&self) -> Option<(Colormap, f32, f32)> {
        Some((self.opts.colormap, 0.0, 1.0))
    }

    fn draw_cls(
        &self,
        layer: usize,
        attn: &[f32],
        out: &Path,
        files: &mut Vec<PathBuf>,
    ) -> Result<()> {
        let (t, tt) = (self.g.t, self.g.t * self.g.t);
        let mean = viz::fuse_heads(attn, self.heads, t, HeadFusion::Mean)?;
        let mut maps: Vec<(String, Vec<f32>)> = Vec::new();
        match self.opts.head {
            Some(h) => maps.push((format!("head {h}"), self.g.map(&attn[h * tt..][..tt])?)),
            None => {
                for h in 0..self.heads {
                    maps.push((format!("head {h}"), self.g.map(&attn[h * tt..][..tt])?));
                }
            }
        }
        maps.push(("mean of heads".into(), self.g.map(&mean)?));

        let mut panels = vec![("input".to_string(), self.big_input())];
        for (label, m) in &maps {
            panels.push((label.clone(), self.map_panel(m)));
        }
        panels.push(("patch grid".to_string(), self.input_with_grid()));
        for (label, m) in &maps {
            panels.push((format!("{label} overlay"), self.overlay_panel(m)?));
        }
        let title = self.title(format!(
            "Layer {layer} {} (each map ÷ its max)",
            self.g.map_name()
        ));
        let pic = viz::image_grid(&panels, maps.len() + 1, &title, self.colorbar())?;
        save(
            &pic,
            out,
            &format!("attention_maps_layer{layer}.png"),
            files,
        )?;

        let (matrix, name, what) = match self.opts.head {
            Some(h) => (
                attn[h * tt..][..tt].to_vec(),
                format!("attention_matrix_layer{layer}_head{h}.png"),
                format!("head {h}"),
            ),
            None => (
                mean,
                format!("attention_matrix_layer{layer}.png"),
                format!("mean of {} heads", self.heads),
            ),
        };
        let token0 = if self.g.prefix > 0 {
            "token 0 = CLS, token 1+i = patch i"
        } else {
            "token i = patch i"
        };
        let o = HeatmapOpts {
            title: format!("Layer {layer} attention, {what} ({token0})"),
            x_label: "key token".into(),
            y_label: "query token".into(),
            colormap: self.opts.colormap,
            cell_px: (640 / t as u32).clamp(1, 24),
            ..Default::default()
        };
        save(&viz::heatmap(&matrix, t, t, &o)?, out, &name, files)
    }

    fn draw_rollout(&self, attn: &[Vec<f32>], out: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
        let o = self.opts;
        let r = viz::rollout(attn, self.heads, self.g.t, o.head_fusion, o.discard_ratio)?;
        let map = self.g.map(&r)?;
        let panels = [
            ("input".to_string(), self.big_input()),
            ("rollout".to_string(), self.map_panel(&map)),
            ("overlay".to_string(), self.overlay_panel(&map)?),
        ];
        let last = attn.len() - 1;
        let title = self.title(format!(
            "Attention rollout, layers 0–{last}, {} fusion, discard {}",
            o.head_fusion.name(),
            o.discard_ratio
        ));
        let pic = viz::image_grid(&panels, 3, &title, self.colorbar())?;
        save(&pic, out, "rollout.png", files)?;
        if o.save_raw {
            let path = out.join("rollout.npy");
            viz::write_npy(&path, &[self.g.gh, self.g.gw], &map)?;
            files.push(path);
        }
        Ok(())
    }

    fn draw_all(&self, attn: &[Vec<f32>], out: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
        let tt = self.g.t * self.g.t;
        let mut maps = Vec::with_capacity(attn.len() * self.heads);
        for a in attn {
            for h in 0..self.heads {
                maps.push((String::new(), self.g.map(&a[h * tt..][..tt])?));
            }
        }
        let o = MapGridOpts {
            title: self.title(format!("{} of every layer and head", self.g.map_name())),
            cols: self.heads,
            cell_px: (64 / self.g.gh.max(self.g.gw) as u32).clamp(1, 16),
            colormap: self.opts.colormap,
            range: Some((0.0, 1.0)),
            x_label: "head".into(),
            y_label: "layer".into(),
            number_axes: true,
        };
        let pic = viz::map_grid(&maps, self.g.gh, self.g.gw, &o)?;
        save(&pic, out, "attention_all_layers.png", files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::testutil::*;

    #[test]
    fn cls_and_raw_attention_files_have_the_captured_shapes() {
        let p = predictor("timm_tiny");
        let dir = tempfile::tempdir().unwrap();
        let opts = AttentionOptions {
            layer: Some(0),
            save_raw: true,
            ..Default::default()
        };
        let r = attention(&p, &image(), &opts, dir.path()).unwrap();
        let names: Vec<String> = r
            .files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "attention_maps_layer0.png",
                "attention_matrix_layer0.png",
                "attention_layer0.npy"
            ]
        );
        assert!(r.notes.is_empty(), "{:?}", r.notes);
        let (shape, data) = read_npy(&dir.path().join("attention_layer0.npy"));
        assert_eq!(shape, [4, 17, 17]);
        let x = p.input(&image()).unwrap();
        let attn = p.model.forward_intermediates(&x, &[0]).unwrap().attention;
        let want = attn[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(data, want);
        for row in data.chunks_exact(17) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn rollout_of_the_real_model_is_a_grid_map_with_max_one() {
        let p = predictor("timm_tiny");
        let dir = tempfile::tempdir().unwrap();
        let opts = AttentionOptions {
            method: Method::Rollout,
            head_fusion: HeadFusion::Max,
            discard_ratio: 0.5,
            save_raw: true,
            ..Default::default()
        };
        attention(&p, &image(), &opts, dir.path()).unwrap();
        let (shape, map) = read_npy(&dir.path().join("rollout.npy"));
        assert_eq!(shape, [4, 4]);
        let max = map.iter().copied().fold(f32::MIN, f32::max);
        assert_eq!(max, 1.0);
        assert!(map.iter().all(|&v| (0.0..=1.0).contains(&v)));
        // It is the class-token row of the rollout of the saved layers, over the patches.
        let layers: Vec<Vec<f32>> = (0..2)
            .map(|l| read_npy(&dir.path().join(format!("attention_layer{l}.npy"))).1)
            .collect();
        let r = viz::rollout(&layers, 4, 17, HeadFusion::Max, 0.5).unwrap();
        assert_eq!(map, viz::cls_map(&r, 17, 1, 4, 4).unwrap());
        // Rollout up to layer 0 uses layer 0 only.
        let dir0 = tempfile::tempdir().unwrap();
        let opts0 = AttentionOptions {
            layer: Some(0),
            ..opts
        };
        let r0 = attention(&p, &image(), &opts0, dir0.path()).unwrap();
        assert!(r0.files.iter().any(|f| f.ends_with("attention_layer0.npy")));
        assert!(!dir0.path().join("attention_layer1.npy").exists());
    }

    #[test]
    fn model_without_class_token_uses_the_mean_query_map() {
        let p = predictor("timm_meanpool"); // 1 channel, 24×32, 3×4 grid, no class token
        let dir = tempfile::tempdir().unwrap();
        let opts = AttentionOptions {
            method: Method::Rollout,
            save_raw: true,
            ..Default::default()
        };
        let r = attention(&p, &image(), &opts, dir.path()).unwrap();
        assert!(
            r.notes.iter().any(|n| n.contains("no class token")),
            "{r:?}"
        );
        assert!(r.notes.iter().any(|n| n.contains("grayscale")), "{r:?}");
        let (shape, map) = read_npy(&dir.path().join("rollout.npy"));
        assert_eq!(shape, [3, 4]);
        let layers: Vec<Vec<f32>> = (0..2)
            .map(|l| {
                let (s, a) = read_npy(&dir.path().join(format!("attention_layer{l}.npy")));
                assert_eq!(s, [3, 12, 12]);
                a
            })
            .collect();
        let roll = viz::rollout(&layers, 3, 12, HeadFusion::Mean, 0.0).unwrap();
        assert_eq!(map, viz::mean_query_map(&roll, 12, 0, 3, 4).unwrap());
        // The cls and all methods draw too.
        for method in [Method::Cls, Method::All] {
            let o = AttentionOptions {
                method,
                ..Default::default()
            };
            attention(&p, &image(), &o, dir.path()).unwrap();
        }
    }

    #[test]
    fn bad_layer_head_and_ratios_are_refused_with_the_valid_range() {
        let p = predictor("timm_tiny");
        let dir = tempfile::tempdir().unwrap();
        let err = |o: AttentionOptions| {
            attention(&p, &image(), &o, dir.path())
                .unwrap_err()
                .to_string()
        };
        let d = AttentionOptions::default();
        let e = err(AttentionOptions {
            layer: Some(2),
            ..d
        });
        assert!(e.contains("layer 2") && e.contains("0..=1"), "{e}");
        let e = err(AttentionOptions { head: Some(4), ..d });
        assert!(e.contains("head 4") && e.contains("0..=3"), "{e}");
        let e = err(AttentionOptions {
            discard_ratio: 1.0,
            ..d
        });
        assert!(e.contains("discard ratio"), "{e}");
        let e = err(AttentionOptions { alpha: 1.5, ..d });
        assert!(e.contains("alpha"), "{e}");
        // Nothing was written for refused options.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn overlay_background_is_the_input_as_the_model_sees_it() {
        // 32×32 image, 32×32 model input, crop_pct 1: no resampling, so un-normalising the
        // model input gives the image's pixels back exactly.
        let p = predictor("timm_tiny");
        let x = p.input(&image()).unwrap();
        let shown = display_image(&x, &p.preprocess).unwrap();
        assert_eq!(shown, load_image(&image()).unwrap().to_rgb8());
    }
}
