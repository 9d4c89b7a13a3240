//! The scalar building blocks of the kernels' loops, written so the compiler vectorises
//! them: row reductions over fixed lanes (`sum`, `dot`, `max`, `lane_sum`), whose order of
//! additions never depends on the instruction set, and a branch-free `exp`.

/// Lanes of the row reductions below: sixteen independent partial sums, which the compiler
/// keeps in vector registers (a single running f32 sum is a serial chain it may not
/// reorder). The order of additions is fixed, so results stay deterministic and the same on
/// every instruction set. The loops run over `as_chunks` arrays: no bounds checks, which
/// would stop the compiler vectorising them.
const LANES: usize = 16;

/// Σ f(a_i, b_i) over the shorter length, with [`LANES`] interleaved partial sums.
#[inline(always)]
pub(super) fn lane_sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (ac, at) = a[..n].as_chunks::<LANES>();
    let (bc, bt) = b[..n].as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for (ca, cb) in ac.iter().zip(bc) {
        for l in 0..LANES {
            acc[l] += f(ca[l], cb[l]);
        }
    }
    let mut tail = 0f32;
    for (&x, &y) in at.iter().zip(bt) {
        tail += f(x, y);
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ f(x_i), with [`LANES`] interleaved partial sums.
#[inline(always)]
pub(super) fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    lane_sum2(x, x, |v, _| f(v))
}

/// max x (−∞ for an empty slice), with [`LANES`] interleaved partial maxima so it
/// vectorises (a single running `f32::max` does not).
#[inline(always)]
pub(super) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let (blocks, tail) = x.as_chunks::<LANES>();
    for b in blocks {
        for l in 0..LANES {
            acc[l] = acc[l].max(b[l]);
        }
    }
    let tail = tail.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    acc.iter().copied().fold(tail, f32::max)
}

/// Σ x.
#[inline(always)]
pub(super) fn sum(x: &[f32]) -> f32 {
    lane_sum(x, |v| v)
}

/// Σ a ⊙ b (over the shorter length).
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    lane_sum2(a, b, |a, b| a * b)
}

/// e^x in f32, branch-free so loops over it vectorise (the C library's `expf` is an opaque
/// call). Cephes' method: x = n·ln2 + r with |r| ≤ ln2/2 (ln2 split in two for exactness),
/// e^r from a degree-7 polynomial, 2^n built in the exponent bits; n is rounded with the
/// 1.5·2²³ trick (plain SSE2 has no vector round). Within 2 ulp of `f32::exp` (tested);
/// 0 below −87.33, +∞ above 88 (the last 0.7 before f32 overflow are given up: our kernels
/// only take e^x of x ≤ 0), NaN for NaN.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const MIN: f32 = -87.336_55;
    const MAX: f32 = 88.0;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(MIN, MAX);
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n_bits = t.to_bits() as i32 - ROUND.to_bits() as i32; // n = round(x·log2 e)
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // 5.000_000_1e-1 in the source; the same f32
    let er = p * r * r + r + 1.0;
    let y = er * f32::from_bits(((n_bits + 127) as u32) << 23);
    if x < MIN {
        0.0
    } else if x > MAX {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_within_2_ulp_of_std() {
        let mut worst = 0f32;
        let mut x = -87.3f32;
        while x < 88.0 {
            let (a, b) = (super::exp(x), x.exp());
            worst = worst.max((a - b).abs() / b);
            x += 0.000_37;
        }
        assert!(worst < 2.4e-7, "{worst}");
        assert_eq!(super::exp(0.0), 1.0);
        assert_eq!(super::exp(-1000.0), 0.0);
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(1000.0), f32::INFINITY);
        assert!(super::exp(f32::NAN).is_nan());
    }

    #[test]
    fn lane_sums_match_plain_sums() {
        for n in [0usize, 1, 7, 8, 9, 64, 65, 1000] {
            let x: Vec<f32> = (0..n).map(|i| (i % 13) as f32 - 6.0).collect();
            let y: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 0.5).collect();
            assert_eq!(super::sum(&x), x.iter().sum::<f32>());
            let d: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
            assert_eq!(super::dot(&x, &y), d);
        }
    }

    #[test]
    fn lane_max_matches_a_plain_fold() {
        for n in [0usize, 1, 7, 8, 9, 64, 65, 1000] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 - 500.0).collect();
            let want = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(super::max(&x), want, "{n}");
        }
        assert_eq!(super::max(&[f32::NAN, 1.0]), 1.0); // as f32::max: NaN is ignored
    }
}
