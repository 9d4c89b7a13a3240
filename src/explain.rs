//! See what the model sees: the logic behind `vit patches`, `vit attention` and
//! `vit pos-embed`. Each function prepares the numbers (image, captured attention, position
//! embeddings), draws them with [`crate::viz`], writes PNG/`.npy` files and returns their paths.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use image::{imageops, DynamicImage, Rgb, RgbImage};

use crate::config::{PosEmbed, Preprocess, ViTConfig};
use crate::predict::{eval_transform, load_image, top_k_of, Predictor};
use crate::viz::{self, Colormap, HeadFusion, HeatmapOpts, MapGridOpts};
use crate::{Error, Result, VisionTransformer};

/// What a command produced: the files written, in order, and things the user should know
/// (a crop that was applied, a fallback that was used, an option that was ignored).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Explained {
    pub files: Vec<PathBuf>,
    pub notes: Vec<String>,
}

/// The most patches `patches` draws; more would make pictures of hundreds of megapixels.
pub const MAX_PATCHES: usize = 4096;

/// Panels of the attention pictures are magnified (nearest neighbour, integer factor, at
/// most 8) until their longer side reaches this many pixels.
const PANEL_PX: u32 = 192;

// ---------------------------------------------------------------------------------------
// Patches
// ---------------------------------------------------------------------------------------

/// How an image becomes tokens: writes `patch_grid.png` (the image with its patch grid drawn
/// and every patch numbered in sequence order, see [`viz::patch_grid`]) and
/// `patch_sheet.png` (the flattened patches in sequence order, see [`viz::patch_sheet`]) to
/// `out_dir`, which is created if missing.
///
/// With `img_size = Some(n)` the image is first brought to `n × n` as timm's evaluation
/// transform does with `crop_pct = 1`: the shorter side is resized to `n` (bicubic,
/// keeping the aspect ratio), then the centre is cropped; `n` must be a multiple of
/// `patch_size`. Without it the image is used as it is when the patch size divides both
/// sides; otherwise its centre is cropped to the largest multiples of the patch size
/// (torchvision's centre-crop rounding) and a note says so. Colour images are drawn in
/// colour, grayscale ones in gray.
pub fn patches(
    image_path: &Path,
    patch_size: usize,
    img_size: Option<usize>,
    out_dir: &Path,
) -> Result<Explained> {
    if patch_size == 0 {
        return Err(Error::Invalid("the patch size must be positive".into()));
    }
    let src = load_image(image_path)?;
    let mut notes = Vec::new();
    let img = match img_size {
        Some(n) => {
            if n == 0 || n % patch_size != 0 {
                return Err(Error::Invalid(format!(
                    "image size {n} is not a positive multiple of the patch size {patch_size}"
                )));
            }
            resize_square(&src, n, patch_size)?
        }
        None => {
            let rgb = src.to_rgb8();
            let (w, h) = rgb.dimensions();
            let p = patch_size as u32;
            if w < p || h < p {
                return Err(Error::Invalid(format!(
                    "{}: a {w}×{h} image is smaller than one {patch_size}×{patch_size} patch",
                    image_path.display()
                )));
            }
            let (cw, ch) = (w / p * p, h / p * p);
            if (cw, ch) == (w, h) {
                rgb
            } else {
                // torchvision CenterCrop: int(round((size - crop) / 2)), half to even.
                let left = ((w - cw) as f64 / 2.0).round_ties_even() as u32;
                let top = ((h - ch) as f64 / 2.0).round_ties_even() as u32;
                notes.push(format!(
                    "the {w}×{h} image was center-cropped to {cw}×{ch} so that \
                     {patch_size}×{patch_size} patches tile it"
                ));
                imageops::crop_imm(&rgb, left, top, cw, ch).to_image()
            }
        }
    };
    let n = (img.width() as usize / patch_size) * (img.height() as usize / patch_size);
    if n > MAX_PATCHES {
        return Err(Error::Invalid(format!(
            "a {}×{} image makes {n} patches of {patch_size} px, more than {MAX_PATCHES} \
             can be drawn legibly; pass a smaller image size",
            img.width(),
            img.height()
        )));
    }
    create_dir(out_dir)?;
    let mut files = Vec::new();
    save(
        &viz::patch_grid(&img, patch_size)?,
        out_dir,
        "patch_grid.png",
        &mut files,
    )?;
    save(
        &viz::patch_sheet(&img, patch_size)?,
        out_dir,
        "patch_sheet.png",
        &mut files,
    )?;
    Ok(Explained { files, notes })
}

/// `n × n` RGB by timm's evaluation transform with `crop_pct = 1`, mean 0 and std 1, so
/// the tensor holds the resized pixels / 255 exactly.
fn resize_square(img: &DynamicImage, n: usize, patch: usize) -> Result<RgbImage> {
    let cfg = ViTConfig {
        image_size: [n, n],
        in_channels: 3,
        ..ViTConfig::timm(n, patch, 4, 1, 1)
    };
    let pre = Preprocess {
        mean: vec![0.0; 3],
        std: vec![1.0; 3],
        ..Preprocess::vit_default(3)
    };
    display_image(&eval_transform(img, &cfg, &pre)?, &pre)
}

// ---------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------

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
    let (depth, heads) = (cfg.depth, cfg.num_heads);
    check_options(opts, depth, heads)?;
    let layer = opts.layer.unwrap_or(depth - 1);
    let mut notes = Vec::new();

    let img = load_image(image_path)?;
    if let Some(n) = channel_note(&img, cfg.in_channels) {
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
    let (logits, captured) = predictor.model.forward_with_attention(&x, &layers)?;
    let attn: Vec<Vec<f32>> = captured
        .iter()
        .map(|a| Ok(a.squeeze(0)?.flatten_all()?.to_vec1::<f32>()?))
        .collect::<Result<_>>()?;

    let g = Geometry::of(cfg);
    if g.prefix == 0 {
        notes.push(
            "the model has no class token: maps show the attention each patch receives, \
             averaged over all patch queries (mean-query map), instead of the class token's row"
                .into(),
        );
    }
    let predicted = prediction_label(&logits, predictor)?;
    let scale = PANEL_PX
        .div_ceil(input.width().max(input.height()).max(1))
        .clamp(1, 8);
    let big = imageops::resize(
        &input,
        input.width() * scale,
        input.height() * scale,
        imageops::FilterType::Nearest,
    );
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

/// Checks the numeric options and the layer and head against the model.
fn check_options(o: &AttentionOptions, depth: usize, heads: usize) -> Result<()> {
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

/// A note when the evaluation transform changes the image's channels for the model.
fn channel_note(img: &DynamicImage, channels: usize) -> Option<String> {
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
fn prediction_label(logits: &Tensor, p: &Predictor) -> Result<String> {
    if p.config.num_classes == 0 {
        return Ok(String::new());
    }
    let logits = logits.squeeze(0)?.to_vec1::<f32>()?;
    Ok(top_k_of(&logits, 1, &p.class_names)
        .first()
        .map(|r| format!("predicted: {} ({:.0}%)", r.label, 100.0 * r.probability))
        .unwrap_or_default())
}

/// Token layout of a model: `prefix` tokens, then a `gh × gw` patch grid of `patch` px.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    t: usize,
    prefix: usize,
    gh: usize,
    gw: usize,
    patch: usize,
}

impl Geometry {
    fn of(cfg: &ViTConfig) -> Self {
        let (gh, gw) = cfg.grid();
        Geometry {
            t: cfg.num_tokens(),
            prefix: cfg.num_prefix_tokens(),
            gh,
            gw,
            patch: cfg.patch_size,
        }
    }

    /// The patch map of a `t × t` attention or rollout matrix: the class token's row, or
    /// the mean over patch queries without a class token; divided by its maximum.
    fn map(&self, m: &[f32]) -> Result<Vec<f32>> {
        if self.prefix > 0 {
            viz::cls_map(m, self.t, self.prefix, self.gh, self.gw)
        } else {
            viz::mean_query_map(m, self.t, self.prefix, self.gh, self.gw)
        }
    }

    /// What [`Geometry::map`] shows, for titles.
    fn map_name(&self) -> &'static str {
        if self.prefix > 0 {
            "CLS attention"
        } else {
            "mean-query attention"
        }
    }
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

// ---------------------------------------------------------------------------------------
// Position embedding
// ---------------------------------------------------------------------------------------

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
pub fn pos_embed(model: &VisionTransformer, out_dir: &Path, save_raw: bool) -> Result<Explained> {
    let cfg = &model.cfg;
    let pos = model.pos_embed.as_ref().ok_or_else(|| {
        Error::Invalid(
            "the model has no position embedding (pos_embed = \"none\"): nothing to draw".into(),
        )
    })?;
    let g = Geometry::of(cfg);
    let n = g.gh * g.gw;
    let d = cfg.embed_dim;
    let patches = pos.squeeze(0)?.narrow(0, g.prefix, n)?; // (N, D)
    let sim = viz::cosine_similarity_matrix(&patches.flatten_all()?.to_vec1::<f32>()?, n, d)?;
    let mut notes = Vec::new();
    let kind = match cfg.pos_embed {
        PosEmbed::Sincos2d => {
            notes.push("the position embedding is the fixed 2-D sin-cos table, not learned".into());
            "fixed sin-cos"
        }
        _ => "learned",
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

// ---------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------

/// A model input (1, C, H, W) normalised with `p` back to displayable pixels:
/// `round(255·(v·std + mean))`, clamped; one channel becomes gray.
pub fn display_image(x: &Tensor, p: &Preprocess) -> Result<RgbImage> {
    let (_, c, h, w) = x.dims4()?;
    if c != 1 && c != 3 || p.mean.len() != c || p.std.len() != c {
        return Err(Error::Invalid(format!(
            "cannot display a {c}-channel input with {} means and {} stds",
            p.mean.len(),
            p.std.len()
        )));
    }
    let v = x.squeeze(0)?.flatten_all()?.to_vec1::<f32>()?;
    let px = |ch: usize, y: usize, x: usize| {
        let raw = v[(ch * h + y) * w + x] * p.std[ch] + p.mean[ch];
        (raw * 255.0).round().clamp(0.0, 255.0) as u8
    };
    Ok(RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let (x, y) = (x as usize, y as usize);
        if c == 1 {
            let g = px(0, y, x);
            Rgb([g, g, g])
        } else {
            Rgb([px(0, y, x), px(1, y, x), px(2, y, x)])
        }
    }))
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

fn save(img: &RgbImage, dir: &Path, name: &str, files: &mut Vec<PathBuf>) -> Result<()> {
    let path = dir.join(name);
    viz::save_png(img, &path)?;
    files.push(path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::LoadOptions;
    use crate::weights::Arch;
    use candle_core::Device;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(rel)
    }

    fn predictor(name: &str) -> Predictor {
        let opts = LoadOptions {
            arch: Arch::File(fixture(&format!("{name}/config.json"))),
            ..Default::default()
        };
        Predictor::load(&fixture(&format!("{name}/model.safetensors")), &opts).unwrap()
    }

    fn image() -> PathBuf {
        fixture("predict/image_rgb.png")
    }

    /// Shape and data of a `.npy` file, every header rule checked (`viz` test helper).
    fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
        crate::viz::io::read_npy(&std::fs::read(path).unwrap())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The captured probabilities are the ones each block multiplies the values with:
    /// rebuilding every block's output from them (and the block's own weights) gives the
    /// block's output, and they are what `forward_with_attention` returns.
    #[test]
    fn captured_attention_is_what_each_block_uses() {
        let p = predictor("timm_tiny");
        let m = &p.model;
        let x = p.input(&image()).unwrap();
        let (_, via_model) = m.forward_with_attention(&x, &[0, 1]).unwrap();
        let mut h = m.patch_embed.forward(&x).unwrap();
        let cls = m.cls_token.as_ref().unwrap();
        h = Tensor::cat(&[cls, &h], 1).unwrap();
        h = h.broadcast_add(m.pos_embed.as_ref().unwrap()).unwrap();
        for (i, block) in m.blocks.iter().enumerate() {
            let (out, probs) = block.forward(&h, &mut None, true).unwrap();
            let probs = probs.unwrap(); // (1, heads, T, T)
            assert_eq!(max_diff(&probs, &via_model[i]), 0.0);
            let (b, t, d) = h.dims3().unwrap();
            let heads = block.attn.num_heads;
            let qkv = block
                .attn
                .qkv
                .forward(&block.norm1.forward(&h).unwrap())
                .unwrap()
                .reshape((b, t, 3, heads, d / heads))
                .unwrap()
                .permute((2, 0, 3, 1, 4))
                .unwrap();
            let v = qkv.get(2).unwrap().contiguous().unwrap();
            let mixed = probs
                .matmul(&v)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, d))
                .unwrap();
            let after_attn = (&h + block.attn.proj.forward(&mixed).unwrap()).unwrap();
            let mlp = block
                .mlp
                .forward(&block.norm2.forward(&after_attn).unwrap(), &mut None)
                .unwrap();
            let rebuilt = (&after_attn + mlp).unwrap();
            assert!(max_diff(&rebuilt, &out) < 1e-5, "block {i}");
            h = out;
        }
    }

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
        let (_, attn) = p.model.forward_with_attention(&x, &[0]).unwrap();
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

    #[test]
    fn patches_crop_resize_and_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("img.png");
        let img = RgbImage::from_fn(21, 13, |x, y| Rgb([x as u8 * 10, y as u8 * 10, 0]));
        img.save(&src).unwrap();
        let out = dir.path().join("out");
        let r = patches(&src, 4, None, &out).unwrap();
        assert_eq!(
            r.files,
            [out.join("patch_grid.png"), out.join("patch_sheet.png")]
        );
        assert!(
            r.notes[0].contains("21×13") && r.notes[0].contains("20×12"),
            "{r:?}"
        );
        // The square resize of an image the size it already has changes nothing.
        let sq = RgbImage::from_fn(8, 8, |x, y| Rgb([x as u8 * 30, y as u8 * 30, 7]));
        let resized = resize_square(&DynamicImage::ImageRgb8(sq.clone()), 8, 4).unwrap();
        assert_eq!(resized, sq);
        let r = patches(&src, 4, Some(8), &out).unwrap();
        assert!(r.notes.is_empty());
        assert!(patches(&src, 4, Some(6), &out).is_err());
        assert!(patches(&src, 0, None, &out).is_err());
        assert!(patches(&src, 16, None, &out).is_err());
    }

    #[test]
    fn pos_embed_learned_sincos_and_none() {
        let p = predictor("timm_tiny");
        let dir = tempfile::tempdir().unwrap();
        let r = pos_embed(&p.model, dir.path(), true).unwrap();
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
        let m = crate::model::init_model(&cfg, 0, &Device::Cpu).unwrap();
        let r = pos_embed(&m, dir.path(), false).unwrap();
        assert!(r.notes[0].contains("sin-cos"));
        let none = ViTConfig {
            pos_embed: PosEmbed::None,
            ..cfg
        };
        let m = crate::model::init_model(&none, 0, &Device::Cpu).unwrap();
        let e = pos_embed(&m, dir.path(), false).unwrap_err().to_string();
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
