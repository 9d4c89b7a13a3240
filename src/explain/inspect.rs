//! The numbers behind `vit explore`: one image run once through the model with every
//! layer's attention kept, then any map asked for — one layer and head (or their mean),
//! the class token's row, the mean over patch queries or one patch's own row, rollout with
//! head fusion and discard ratio — computed from what was kept, without running the model
//! again. The page that shows them only draws.

use candle_core::Tensor;
use image::{DynamicImage, RgbImage};
use serde::Serialize;

use super::{display_image, Geometry};
use crate::models::{Architecture, Classifier};
use crate::predict::{eval_transform, top_k_of, Predictor, Ranked};
use crate::viz::{self, HeadFusion};
use crate::{Error, Result};

/// How a model's tokens lie over its input, and how much attention it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Layout {
    /// Tokens before the patches (class, distillation, register tokens).
    pub prefix: usize,
    pub grid_h: usize,
    pub grid_w: usize,
    /// Side of one patch (or backbone cell) in input pixels.
    pub patch: usize,
    /// All tokens: `prefix + grid_h · grid_w`.
    pub tokens: usize,
    pub depth: usize,
    pub heads: usize,
    /// Model input height and width in pixels.
    pub image_h: usize,
    pub image_w: usize,
    /// Whether token 0 is a class token (else the maps are mean-query maps).
    pub class_token: bool,
}

impl Layout {
    /// The layout of a model with global attention over patch tokens; an error names a
    /// model that has none (a CNN, Swin's windows, PVT's reduced keys).
    pub fn of(model: &dyn Classifier) -> Result<Self> {
        let cfg = model.config();
        let heads = cfg
            .attention_heads()
            .filter(|_| cfg.tokens().is_some())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "a {} model has no global attention over its patches to explore \
                     (draw its attention with `vit attention`)",
                    cfg.arch()
                ))
            })?;
        let g = Geometry::of(&cfg)?;
        let [image_h, image_w] = cfg.image_size();
        Ok(Layout {
            prefix: g.prefix,
            grid_h: g.gh,
            grid_w: g.gw,
            patch: g.patch,
            tokens: g.t,
            depth: cfg.depth(),
            heads,
            image_h,
            image_w,
            class_token: g.prefix > 0,
        })
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            t: self.tokens,
            prefix: self.prefix,
            gh: self.grid_h,
            gw: self.grid_w,
            patch: self.patch,
        }
    }
}

/// Which row of an attention (or rollout) matrix a map shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// The class token's row (token 0).
    Cls,
    /// The mean over the patch query rows: the attention each patch receives.
    MeanQuery,
    /// Patch `i`'s own row (token `prefix + i`): where that token looks.
    Patch(usize),
}

/// One image through the model: its prediction, the model input as displayed, and the
/// attention probabilities of every layer.
#[derive(Debug)]
pub struct Inspection {
    pub layout: Layout,
    /// The most probable classes, best first (empty for a model without a head).
    pub top_k: Vec<Ranked>,
    /// The model input un-normalised to pixels (what the model saw, after resize and crop).
    pub input: RgbImage,
    /// Things the user should know (a channel conversion).
    pub notes: Vec<String>,
    /// Per layer, (heads, T, T) row-major.
    attention: Vec<Vec<f32>>,
}

impl Inspection {
    /// Runs `img` through `predictor` with its evaluation transform, keeping every layer's
    /// attention. Non-finite logits are an error.
    pub fn run(predictor: &Predictor, img: &DynamicImage, top_k: usize) -> Result<Self> {
        let layout = Layout::of(predictor.model.as_ref())?;
        let mut notes = Vec::new();
        if let Some(n) = super::attention::channel_note(img, predictor.config.in_channels()) {
            notes.push(n);
        }
        let x = eval_transform(img, &predictor.config, &predictor.preprocess)?;
        let input = display_image(&x, &predictor.preprocess)?;
        let layers: Vec<usize> = (0..layout.depth).collect();
        let taken = predictor
            .model
            .forward_intermediates(&x.to_device(&predictor.device)?, &layers)?;
        let logits = taken.logits.squeeze(0)?.to_vec1::<f32>()?;
        if let Some(v) = logits.iter().find(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!(
                "the model's output is not finite ({v}): the weights hold NaN or infinite values"
            )));
        }
        let top_k = if predictor.config.num_classes() == 0 {
            Vec::new()
        } else {
            top_k_of(&logits, top_k, &predictor.class_names)
        };
        let attention = taken
            .attention
            .iter()
            .map(|a: &Tensor| Ok(a.squeeze(0)?.flatten_all()?.to_vec1::<f32>()?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Inspection {
            layout,
            top_k,
            input,
            notes,
            attention,
        })
    }

    /// Bytes held by the kept attention.
    pub fn attention_bytes(&self) -> usize {
        self.attention.iter().map(|a| a.len() * 4).sum()
    }

    /// One layer's map: head `head` or, with `None`, the mean over heads; the row chosen by
    /// `query`; over the patch grid (row-major), divided by its maximum.
    pub fn attention_map(
        &self,
        layer: usize,
        head: Option<usize>,
        query: Query,
    ) -> Result<Vec<f32>> {
        let l = &self.layout;
        let attn = self.layer(layer)?;
        let tt = l.tokens * l.tokens;
        match head {
            Some(h) if h >= l.heads => Err(Error::Invalid(format!(
                "head {h} does not exist: the model has {} heads per layer (valid: 0..={})",
                l.heads,
                l.heads - 1
            ))),
            Some(h) => self.row_map(&attn[h * tt..][..tt], query),
            None => self.row_map(
                &viz::fuse_heads(attn, l.heads, l.tokens, HeadFusion::Mean)?,
                query,
            ),
        }
    }

    /// Every layer's map of every head (layer-major), as [`Inspection::attention_map`].
    pub fn overview(&self, query: Query) -> Result<Vec<Vec<f32>>> {
        let l = &self.layout;
        let mut maps = Vec::with_capacity(l.depth * l.heads);
        for layer in 0..l.depth {
            for h in 0..l.heads {
                maps.push(self.attention_map(layer, Some(h), query)?);
            }
        }
        Ok(maps)
    }

    /// Attention rollout through layers `0..=layer` ([`viz::rollout`]), the row chosen by
    /// `query`, divided by its maximum.
    pub fn rollout_map(
        &self,
        layer: usize,
        fusion: HeadFusion,
        discard_ratio: f32,
        query: Query,
    ) -> Result<Vec<f32>> {
        self.layer(layer)?;
        let l = &self.layout;
        let r = viz::rollout(
            &self.attention[..=layer],
            l.heads,
            l.tokens,
            fusion,
            discard_ratio,
        )?;
        self.row_map(&r, query)
    }

    fn layer(&self, layer: usize) -> Result<&[f32]> {
        self.attention.get(layer).map(Vec::as_slice).ok_or_else(|| {
            Error::Invalid(format!(
                "layer {layer} does not exist: the model has {} layers (valid: 0..={})",
                self.layout.depth,
                self.layout.depth - 1
            ))
        })
    }

    fn row_map(&self, m: &[f32], query: Query) -> Result<Vec<f32>> {
        let g = self.layout.geometry();
        match query {
            Query::Cls => viz::cls_map(m, g.t, g.prefix, g.gh, g.gw),
            Query::MeanQuery => viz::mean_query_map(m, g.t, g.prefix, g.gh, g.gw),
            Query::Patch(i) if i >= g.gh * g.gw => Err(Error::Invalid(format!(
                "patch {i} does not exist: the grid has {} patches (valid: 0..={})",
                g.gh * g.gw,
                g.gh * g.gw - 1
            ))),
            Query::Patch(i) => viz::query_map(m, g.t, g.prefix, g.gh, g.gw, g.prefix + i),
        }
    }
}

/// The index of the largest value (the first of equals); 0 for an empty map.
pub fn hottest(map: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in map.iter().enumerate() {
        if *v > map[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::testutil::*;
    use crate::explain::{attention, AttentionOptions, Method};

    fn inspected(name: &str) -> (Predictor, Inspection) {
        let p = predictor(name);
        let img = crate::predict::load_image(&image()).unwrap();
        let i = Inspection::run(&p, &img, 3).unwrap();
        (p, i)
    }

    /// The maps equal what `vit attention --save-raw` writes, layer by layer.
    #[test]
    fn maps_match_the_attention_command() {
        let (p, ins) = inspected("timm_tiny");
        let l = ins.layout;
        assert_eq!((l.prefix, l.grid_h, l.grid_w, l.tokens), (1, 4, 4, 17));
        assert_eq!(ins.top_k.len(), 3);
        let dir = tempfile::tempdir().unwrap();
        let opts = AttentionOptions {
            method: Method::All,
            save_raw: true,
            ..Default::default()
        };
        attention(&p, &image(), &opts, dir.path()).unwrap();
        for layer in 0..l.depth {
            let (_, raw) = read_npy(&dir.path().join(format!("attention_layer{layer}.npy")));
            let tt = l.tokens * l.tokens;
            for h in 0..l.heads {
                let want = viz::cls_map(&raw[h * tt..][..tt], l.tokens, 1, 4, 4).unwrap();
                assert_eq!(ins.attention_map(layer, Some(h), Query::Cls).unwrap(), want);
                // Patch 5 is token 6: its own row.
                let want = viz::query_map(&raw[h * tt..][..tt], l.tokens, 1, 4, 4, 6).unwrap();
                let got = ins.attention_map(layer, Some(h), Query::Patch(5)).unwrap();
                assert_eq!(got, want);
            }
            let mean = viz::fuse_heads(&raw, l.heads, l.tokens, HeadFusion::Mean).unwrap();
            let want = viz::mean_query_map(&mean, l.tokens, 1, 4, 4).unwrap();
            assert_eq!(
                ins.attention_map(layer, None, Query::MeanQuery).unwrap(),
                want
            );
        }
        let overview = ins.overview(Query::Cls).unwrap();
        assert_eq!(overview.len(), l.depth * l.heads);
        assert_eq!(
            overview[l.heads + 1],
            ins.attention_map(1, Some(1), Query::Cls).unwrap()
        );
    }

    #[test]
    fn rollout_matches_the_attention_command() {
        let (p, ins) = inspected("timm_tiny");
        let dir = tempfile::tempdir().unwrap();
        let opts = AttentionOptions {
            method: Method::Rollout,
            head_fusion: HeadFusion::Max,
            discard_ratio: 0.5,
            save_raw: true,
            ..Default::default()
        };
        attention(&p, &image(), &opts, dir.path()).unwrap();
        let (_, want) = read_npy(&dir.path().join("rollout.npy"));
        let last = ins.layout.depth - 1;
        let got = ins
            .rollout_map(last, HeadFusion::Max, 0.5, Query::Cls)
            .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn bad_requests_are_clear_errors() {
        let (_, ins) = inspected("timm_tiny");
        let l = ins.layout;
        let e = |r: Result<Vec<f32>>| r.unwrap_err().to_string();
        assert!(e(ins.attention_map(l.depth, None, Query::Cls)).contains("layer"));
        assert!(e(ins.attention_map(0, Some(l.heads), Query::Cls)).contains("head"));
        assert!(e(ins.attention_map(0, None, Query::Patch(16))).contains("patch 16"));
        assert!(e(ins.rollout_map(0, HeadFusion::Mean, 1.0, Query::Cls)).contains("discard"));
    }

    #[test]
    fn hottest_is_the_first_largest() {
        assert_eq!(hottest(&[0.1, 1.0, 0.3, 1.0]), 1);
        assert_eq!(hottest(&[]), 0);
    }
}
