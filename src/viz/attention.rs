//! Attention analysis on plain row-major `f32` slices: head fusion, attention rollout
//! (Abnar & Zuidema 2020), class-token and mean-query maps over the patch grid, and the
//! cosine similarity of position embeddings. No tensors, no drawing.

use std::str::FromStr;

use crate::{Error, Result};

/// How the heads of one layer's attention (heads × t × t) are combined into one t × t matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadFusion {
    /// The element-wise mean over heads (Abnar & Zuidema's rollout).
    #[default]
    Mean,
    /// The element-wise maximum over heads.
    Max,
    /// The element-wise minimum over heads.
    Min,
}

impl HeadFusion {
    /// The lower-case name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            HeadFusion::Mean => "mean",
            HeadFusion::Max => "max",
            HeadFusion::Min => "min",
        }
    }
}

impl FromStr for HeadFusion {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "mean" => Ok(HeadFusion::Mean),
            "max" => Ok(HeadFusion::Max),
            "min" => Ok(HeadFusion::Min),
            _ => Err(Error::Unknown {
                kind: "head fusion",
                name: s.to_string(),
                hint: " (known: mean, max, min)".to_string(),
            }),
        }
    }
}

/// Checks that `data` holds exactly the elements of `shape`.
fn check_len(name: &str, data: &[f32], shape: &[usize]) -> Result<()> {
    let expected: usize = shape.iter().product();
    if data.len() == expected {
        Ok(())
    } else {
        Err(Error::Shape {
            name: name.to_string(),
            expected: shape.to_vec(),
            found: vec![data.len()],
        })
    }
}

/// Checks that `t` tokens are `prefix` leading tokens followed by a `grid_h × grid_w` grid.
fn check_grid(t: usize, prefix: usize, grid_h: usize, grid_w: usize) -> Result<()> {
    if prefix + grid_h * grid_w == t {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{t} tokens are not {prefix} prefix token(s) followed by a {grid_h}×{grid_w} patch grid"
        )))
    }
}

/// Combines one layer's attention, `heads × t × t` row-major (head, query, key), into one
/// `t × t` matrix by the element-wise mean, maximum or minimum over heads.
pub fn fuse_heads(attn: &[f32], heads: usize, t: usize, fusion: HeadFusion) -> Result<Vec<f32>> {
    check_len("attention", attn, &[heads, t, t])?;
    if heads == 0 {
        return Err(Error::Invalid("attention with 0 heads".into()));
    }
    let tt = t * t;
    let mut out = attn[..tt].to_vec();
    for h in attn.chunks_exact(tt).skip(1) {
        for (o, &v) in out.iter_mut().zip(h) {
            *o = match fusion {
                HeadFusion::Mean => *o + v,
                HeadFusion::Max => o.max(v),
                HeadFusion::Min => o.min(v),
            };
        }
    }
    if fusion == HeadFusion::Mean {
        let inv = 1.0 / heads as f32;
        out.iter_mut().for_each(|o| *o *= inv);
    }
    Ok(out)
}

/// Zeroes the smallest entries of a fused `t × t` attention matrix, sparing the class-token
/// column.
///
/// The candidates are the `t·(t−1)` entries in key columns `1..t`; column 0 (attention *to*
/// the class token) is never touched. The `floor(ratio · t·(t−1))` smallest candidates are
/// set to 0, ties going to the earlier row-major position. (jacobgil's
/// `vit_rollout.py` instead takes the lowest `floor(ratio · t²)` of the whole flattened
/// matrix and then spares only the entry at flat index 0, i.e. [0, 0].)
fn discard_lowest(m: &mut [f32], t: usize, ratio: f32) {
    let k = (ratio as f64 * (t * (t - 1)) as f64).floor() as usize;
    if k == 0 {
        return;
    }
    let mut idx: Vec<usize> = (0..t * t).filter(|i| i % t != 0).collect();
    idx.sort_by(|&a, &b| m[a].total_cmp(&m[b]).then(a.cmp(&b)));
    for &i in &idx[..k] {
        m[i] = 0.0;
    }
}

/// `a · b` for square `t × t` row-major matrices.
fn matmul(a: &[f32], b: &[f32], t: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; t * t];
    for i in 0..t {
        let row = &mut out[i * t..(i + 1) * t];
        for k in 0..t {
            let aik = a[i * t + k];
            if aik == 0.0 {
                continue;
            }
            for (o, &bkj) in row.iter_mut().zip(&b[k * t..(k + 1) * t]) {
                *o += aik * bkj;
            }
        }
    }
    out
}

/// Attention rollout (Abnar & Zuidema 2020): how much each token's final representation
/// draws on each input token, through the residual connections of all layers.
///
/// `layers` are the attention probabilities of consecutive blocks, first block first, each
/// `heads × t × t` row-major. For each layer, the heads are fused, the lowest
/// `discard_ratio` of the entries outside the class-token column are zeroed (see below),
/// the residual path is added and rows are renormalised:
/// `Â_l = rownorm(0.5·fuse(A_l) + 0.5·I)`. The result is `R = Â_L ··· Â_2 · Â_1` (each later
/// layer multiplies on the left), a `t × t` matrix whose rows sum to 1: row `i` is query
/// token `i`, column `j` input token `j`.
///
/// `discard_ratio` must lie in `[0, 1)`; 0 keeps everything. The entries considered for
/// discarding are the `t·(t−1)` entries of key columns `1..t`; the `floor(discard_ratio ·
/// t·(t−1))` smallest are set to zero (ties: earlier row-major position first), and column 0,
/// the attention to the class token, is always kept. This differs from jacobgil's
/// `vit_rollout.py`, which ranks all `t²` entries and spares only the single entry [0, 0].
/// With no class token, column 0 is an ordinary patch and is still spared.
pub fn rollout(
    layers: &[Vec<f32>],
    heads: usize,
    t: usize,
    fusion: HeadFusion,
    discard_ratio: f32,
) -> Result<Vec<f32>> {
    if layers.is_empty() {
        return Err(Error::Invalid(
            "attention rollout needs at least one layer".into(),
        ));
    }
    if !(0.0..1.0).contains(&discard_ratio) {
        return Err(Error::Invalid(format!(
            "discard ratio must lie in [0, 1), got {discard_ratio}"
        )));
    }
    let mut r: Option<Vec<f32>> = None;
    for (l, attn) in layers.iter().enumerate() {
        check_len(&format!("attention of layer {l}"), attn, &[heads, t, t])?;
        let mut a = fuse_heads(attn, heads, t, fusion)?;
        discard_lowest(&mut a, t, discard_ratio);
        for i in 0..t {
            let row = &mut a[i * t..(i + 1) * t];
            row.iter_mut().for_each(|v| *v *= 0.5);
            row[i] += 0.5;
            let sum: f32 = row.iter().sum();
            if sum > 0.0 {
                row.iter_mut().for_each(|v| *v /= sum);
            }
        }
        r = Some(match r {
            None => a,
            Some(prev) => matmul(&a, &prev, t),
        });
    }
    Ok(r.expect("at least one layer"))
}

/// Divides by the maximum when it is positive, so the largest value becomes 1.
fn normalise_max(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max > 0.0 && max.is_finite() {
        v.iter_mut().for_each(|x| *x /= max);
    }
}

/// The class token's row of a `t × t` attention or rollout matrix over the patch columns
/// `prefix..t`, as a `grid_h × grid_w` row-major map divided by its maximum (so the
/// strongest patch is 1; an all-zero row stays zero).
///
/// `prefix` is the number of tokens before the patches (1 with a class token); the class
/// token must be token 0. For models without a class token use [`mean_query_map`].
pub fn cls_map(
    r: &[f32],
    t: usize,
    prefix: usize,
    grid_h: usize,
    grid_w: usize,
) -> Result<Vec<f32>> {
    check_len("attention", r, &[t, t])?;
    check_grid(t, prefix, grid_h, grid_w)?;
    if prefix == 0 {
        return Err(Error::Invalid(
            "a class-token map needs a class token (prefix ≥ 1); use the mean-query map".into(),
        ));
    }
    query_map(r, t, prefix, grid_h, grid_w, 0)
}

/// Row `query` of a `t × t` attention or rollout matrix (where token `query` looks) over
/// the patch columns `prefix..t`, as a `grid_h × grid_w` row-major map divided by its
/// maximum. Token `prefix + i` is patch `i`.
pub fn query_map(
    r: &[f32],
    t: usize,
    prefix: usize,
    grid_h: usize,
    grid_w: usize,
    query: usize,
) -> Result<Vec<f32>> {
    check_len("attention", r, &[t, t])?;
    check_grid(t, prefix, grid_h, grid_w)?;
    if query >= t {
        return Err(Error::Invalid(format!(
            "token {query} does not exist: there are {t} tokens"
        )));
    }
    let mut map = r[query * t + prefix..(query + 1) * t].to_vec();
    normalise_max(&mut map);
    Ok(map)
}

/// For models without a class token: the attention each patch receives, averaged over the
/// patch query rows `prefix..t` of a `t × t` attention or rollout matrix, as a
/// `grid_h × grid_w` row-major map divided by its maximum.
pub fn mean_query_map(
    r: &[f32],
    t: usize,
    prefix: usize,
    grid_h: usize,
    grid_w: usize,
) -> Result<Vec<f32>> {
    check_len("attention", r, &[t, t])?;
    check_grid(t, prefix, grid_h, grid_w)?;
    let n = t - prefix;
    if n == 0 {
        return Err(Error::Invalid("no patch tokens".into()));
    }
    let mut map = vec![0.0f32; n];
    for row in r.chunks_exact(t).skip(prefix) {
        for (m, &v) in map.iter_mut().zip(&row[prefix..]) {
            *m += v;
        }
    }
    map.iter_mut().for_each(|m| *m /= n as f32);
    normalise_max(&mut map);
    Ok(map)
}

/// Cosine similarity between every pair of the `n` rows of `pos` (`n × d`, row-major),
/// e.g. the learned position embeddings of the patches: an `n × n` row-major matrix.
/// A zero row has similarity 0 with everything, itself included.
pub fn cosine_similarity_matrix(pos: &[f32], n: usize, d: usize) -> Result<Vec<f32>> {
    check_len("position embedding", pos, &[n, d])?;
    if d == 0 {
        return Ok(vec![0.0; n * n]);
    }
    let norms: Vec<f64> = pos
        .chunks_exact(d)
        .map(|row| row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt())
        .collect();
    let mut out = vec![0.0f32; n * n];
    for i in 0..n {
        for j in i..n {
            let (a, b) = (&pos[i * d..(i + 1) * d], &pos[j * d..(j + 1) * d]);
            let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let den = norms[i] * norms[j];
            let s = if den > 0.0 { (dot / den) as f32 } else { 0.0 };
            out[i * n + j] = s;
            out[j * n + i] = s;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-6, "entry {i}: {x} != {y}\n{a:?}\n{b:?}");
        }
    }

    // Layer 1, two heads over t = 3 tokens:
    //   H0 = [1 0 0; .5 .5 0; 0 .5 .5]      H1 = [0 1 0; .5 .5 0; 0 .5 .5]
    fn layer1() -> Vec<f32> {
        vec![
            1.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.5, 0.5, //
            0.0, 1.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.5, 0.5,
        ]
    }
    // Layer 2, both heads [0 0 1; 0 0 1; 1 0 0].
    fn layer2() -> Vec<f32> {
        let h = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0];
        [h, h].concat()
    }

    #[test]
    fn fuse_heads_mean_max_min() {
        let a = layer1();
        close(
            &fuse_heads(&a, 2, 3, HeadFusion::Mean).unwrap(),
            &[0.5, 0.5, 0.0, 0.5, 0.5, 0.0, 0.0, 0.5, 0.5],
        );
        close(
            &fuse_heads(&a, 2, 3, HeadFusion::Max).unwrap(),
            &[1.0, 1.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.5, 0.5],
        );
        close(
            &fuse_heads(&a, 2, 3, HeadFusion::Min).unwrap(),
            &[0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.5, 0.5],
        );
        assert!(matches!(
            fuse_heads(&a, 3, 3, HeadFusion::Mean),
            Err(Error::Shape { .. })
        ));
        assert_eq!("MAX".parse::<HeadFusion>().unwrap(), HeadFusion::Max);
        assert!("median".parse::<HeadFusion>().is_err());
    }

    #[test]
    fn rollout_two_layers_by_hand() {
        // Mean fusion. Layer 1: F1 = [.5 .5 0; .5 .5 0; 0 .5 .5], rows already sum to 1, so
        //   Â1 = .5·F1 + .5·I = [.75 .25 0; .25 .75 0; 0 .25 .75].
        // Layer 2: F2 = [0 0 1; 0 0 1; 1 0 0] → Â2 = [.5 0 .5; 0 .5 .5; .5 0 .5].
        // R = Â2·Â1:
        //   row 0 = .5·[.75 .25 0] + .5·[0 .25 .75] = [.375 .25 .375]
        //   row 1 = .5·[.25 .75 0] + .5·[0 .25 .75] = [.125 .5 .375]
        //   row 2 = row 0                          = [.375 .25 .375]
        // (The wrong order Â1·Â2 would give row 0 = [.375 .125 .5].)
        let r = rollout(&[layer1(), layer2()], 2, 3, HeadFusion::Mean, 0.0).unwrap();
        close(
            &r,
            &[0.375, 0.25, 0.375, 0.125, 0.5, 0.375, 0.375, 0.25, 0.375],
        );
        for row in r.chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        // One layer: just Â1.
        let r1 = rollout(&[layer1()], 2, 3, HeadFusion::Mean, 0.0).unwrap();
        close(&r1, &[0.75, 0.25, 0.0, 0.25, 0.75, 0.0, 0.0, 0.25, 0.75]);
    }

    #[test]
    fn rollout_max_and_min_fusion_renormalise_rows() {
        // Max: F = [1 1 0; .5 .5 0; 0 .5 .5]; .5·F + .5·I = [1 .5 0; .25 .75 0; 0 .25 .75];
        // row 0 sums to 1.5 → [2/3 1/3 0].
        let r = rollout(&[layer1()], 2, 3, HeadFusion::Max, 0.0).unwrap();
        close(
            &r,
            &[2.0 / 3.0, 1.0 / 3.0, 0.0, 0.25, 0.75, 0.0, 0.0, 0.25, 0.75],
        );
        // Min: F = [0 0 0; .5 .5 0; 0 .5 .5]; row 0 of .5·F + .5·I is [.5 0 0] → [1 0 0].
        let r = rollout(&[layer1()], 2, 3, HeadFusion::Min, 0.0).unwrap();
        close(&r, &[1.0, 0.0, 0.0, 0.25, 0.75, 0.0, 0.0, 0.25, 0.75]);
        // Both layers with max fusion: rows of the product still sum to 1.
        let r = rollout(&[layer1(), layer2()], 2, 3, HeadFusion::Max, 0.0).unwrap();
        for row in r.chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn rollout_discard_spares_class_column() {
        // One head, F = [.5 .3 .2; .1 .6 .3; .2 .2 .6]. Candidates (columns 1, 2):
        // .3 .2 | .6 .3 | .2 .6 — six entries; ratio .34 → floor(2.04) = 2 discarded:
        // the two .2s at (0,2) and (2,1). The global minimum .1 at (1,0) is in the class
        // column and stays. F' = [.5 .3 0; .1 .6 .3; .2 0 .6];
        // .5·F' + .5·I = [.75 .15 0; .05 .8 .15; .1 0 .8], row sums .9, 1, .9 →
        // [.75/.9 .15/.9 0; .05 .8 .15; .1/.9 0 .8/.9].
        let f = [vec![0.5, 0.3, 0.2, 0.1, 0.6, 0.3, 0.2, 0.2, 0.6]];
        let r = rollout(&f, 1, 3, HeadFusion::Mean, 0.34).unwrap();
        close(
            &r,
            &[
                0.75 / 0.9,
                0.15 / 0.9,
                0.0,
                0.05,
                0.8,
                0.15,
                0.1 / 0.9,
                0.0,
                0.8 / 0.9,
            ],
        );
        for row in r.chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        // Ratio 0 changes nothing; out-of-range ratios are refused.
        let r0 = rollout(&f, 1, 3, HeadFusion::Mean, 0.0).unwrap();
        close(&r0, &[0.75, 0.15, 0.1, 0.05, 0.8, 0.15, 0.1, 0.1, 0.8]);
        assert!(rollout(&f, 1, 3, HeadFusion::Mean, 1.0).is_err());
        assert!(rollout(&f, 1, 3, HeadFusion::Mean, -0.1).is_err());
        assert!(rollout(&[], 1, 3, HeadFusion::Mean, 0.0).is_err());
    }

    #[test]
    fn cls_and_mean_query_maps() {
        // t = 5: class token + 2×2 grid. Row 0 = [.2 | .1 .4 .2 .1] → /.4 = [.25 1 .5 .25].
        let mut r = vec![0.0f32; 25];
        r[..5].copy_from_slice(&[0.2, 0.1, 0.4, 0.2, 0.1]);
        close(&cls_map(&r, 5, 1, 2, 2).unwrap(), &[0.25, 1.0, 0.5, 0.25]);
        assert!(cls_map(&r, 5, 1, 2, 3).is_err());
        assert!(cls_map(&r, 5, 0, 1, 5).is_err());

        // No class token, t = 4 (2×2): column means over all 4 query rows.
        let a = vec![
            0.4, 0.3, 0.2, 0.1, //
            0.1, 0.1, 0.4, 0.4, //
            0.3, 0.3, 0.2, 0.2, //
            0.0, 0.5, 0.2, 0.3,
        ];
        // column sums: .8 1.2 1.0 1.0 → means .2 .3 .25 .25 → / .3 = [2/3 1 5/6 5/6].
        close(
            &mean_query_map(&a, 4, 0, 2, 2).unwrap(),
            &[2.0 / 3.0, 1.0, 5.0 / 6.0, 5.0 / 6.0],
        );
        // With a prefix token, only the patch query rows 1..t and key columns 1..t count.
        // t = 3 = 1 + 1×2: rows 1, 2 = [x .2 .6], [x .4 .2] → means .3 .4 → [.75 1].
        let b = vec![0.9, 0.05, 0.05, 0.2, 0.2, 0.6, 0.4, 0.4, 0.2];
        close(&mean_query_map(&b, 3, 1, 1, 2).unwrap(), &[0.75, 1.0]);

        // A patch's own row: token 2 of b (patch 1) = [x .4 .2] → [1 .5].
        close(&query_map(&b, 3, 1, 1, 2, 2).unwrap(), &[1.0, 0.5]);
        assert!(query_map(&b, 3, 1, 1, 2, 3).is_err());
    }

    #[test]
    fn cosine_similarity_by_hand() {
        // Rows [1 0], [0 2], [1 1], [0 0]: cos(0,1) = 0, cos(0,2) = cos(1,2) = 1/√2, the
        // zero row gives 0 everywhere.
        let s = cosine_similarity_matrix(&[1.0, 0.0, 0.0, 2.0, 1.0, 1.0, 0.0, 0.0], 4, 2).unwrap();
        let h = std::f32::consts::FRAC_1_SQRT_2;
        close(
            &s,
            &[
                1.0, 0.0, h, 0.0, //
                0.0, 1.0, h, 0.0, //
                h, h, 1.0, 0.0, //
                0.0, 0.0, 0.0, 0.0,
            ],
        );
        assert!(cosine_similarity_matrix(&[1.0; 5], 2, 3).is_err());
    }
}
