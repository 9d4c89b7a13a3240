use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

/// The whole product aq (m, k) · wqᵀ (n, k) in i32 through the packing and the tiles of
/// `level`.
fn int_product(level: QLevel, aq: &[u8], m: usize, k: usize, wq: &[i8], n: usize) -> Vec<i32> {
    let p = QPacked::new(level, wq, &vec![1.0; n], n, k);
    let k4 = p.k4;
    let rs = k4 * level.width();
    let mut rows = vec![0u8; m * rs];
    for i in 0..m {
        let mut one = vec![0u8; k4];
        one[..k].copy_from_slice(&aq[i * k..(i + 1) * k]);
        if level.width() == 1 {
            rows[i * rs..(i + 1) * rs].copy_from_slice(&one);
        } else {
            widen(&one, &mut rows[i * rs..(i + 1) * rs]);
        }
    }
    let (mr, nr) = (level.mr(), level.nr());
    let mut out = vec![0i32; m * n];
    for pi in 0..n.div_ceil(nr) {
        for i0 in (0..m).step_by(mr) {
            let r = mr.min(m - i0);
            let mut t = [0i32; MAX_TILE];
            // SAFETY: as qgemm_block; the level is available on this CPU.
            unsafe {
                tile(
                    level,
                    k4,
                    rows.as_ptr().add(i0 * rs),
                    rs,
                    r,
                    p.data[pi * rs * nr..].as_ptr(),
                    &mut t,
                )
            };
            for i in 0..r {
                for j in 0..nr.min(n - pi * nr) {
                    out[(i0 + i) * n + pi * nr + j] = t[i * nr + j];
                }
            }
        }
    }
    out
}

fn shapes() -> Vec<(usize, usize, usize)> {
    vec![
        (1, 1, 1),
        (3, 5, 7),
        (13, 33, 9),
        (12, 32, 4),
        (25, 70, 131),
        (5, 17, 768),
        (40, 48, 3),
    ]
}

#[test]
fn int8_tiles_match_the_exact_integer_product_on_every_level() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for level in available_levels() {
        for (m, n, k) in shapes() {
            let max = ACT_MAX;
            let aq: Vec<u8> = (0..m * k).map(|_| rng.random_range(0..=max)).collect();
            let mut wq: Vec<i8> = (0..n * k).map(|_| rng.random_range(-127..=127)).collect();
            // The extremes too, where saturation would show.
            wq[0] = 127;
            wq[n * k - 1] = -127;
            let got = int_product(level, &aq, m, k, &wq, n);
            for i in 0..m {
                for j in 0..n {
                    let want: i64 = (0..k)
                        .map(|t| aq[i * k + t] as i64 * wq[j * k + t] as i64)
                        .sum();
                    assert_eq!(
                        got[i * n + j] as i64,
                        want,
                        "{level:?} {m}x{n}x{k} at ({i},{j})"
                    );
                }
            }
        }
    }
}

#[test]
fn int8_tiles_do_not_saturate_at_the_largest_values() {
    for level in available_levels() {
        let (m, n, k) = (3, 20, 64);
        let max = ACT_MAX;
        let aq = vec![max; m * k];
        for w in [127i8, -127] {
            let wq = vec![w; n * k];
            let got = int_product(level, &aq, m, k, &wq, n);
            assert!(
                got.iter()
                    .all(|&v| v as i64 == max as i64 * w as i64 * k as i64),
                "{level:?}"
            );
        }
    }
}

#[test]
fn quantize_row_is_within_half_a_step_and_keeps_zero_exact() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for max in [127u8, 255] {
        for len in [1usize, 5, 64, 300] {
            for shift in [-3.0f32, 0.0, 2.5] {
                let x: Vec<f32> = (0..len)
                    .map(|_| rng.random_range(-1.0..1.0f32) + shift)
                    .collect();
                let mut q = vec![9u8; len + 3];
                let (s, zp) = quantize_row(&x, max, None, &mut q);
                assert!(s > 0.0 && (0..=max as i32).contains(&zp));
                assert_eq!(&q[len..], &[0, 0, 0], "padding zeroed");
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (v, &qi) in x.iter().zip(&q) {
                    let back = s * (qi as i32 - zp) as f32;
                    assert!(
                        (back - v).abs() <= 0.5 * s + 1e-6 * amax,
                        "{v} -> {back} (step {s})"
                    );
                }
                // Zero maps to the zero point exactly.
                let mut z = [0u8; 1];
                let inv = 1.0 / s;
                z[0] = ((0.0f32 * inv).round_ties_even() + zp as f32) as u8;
                assert_eq!(s * (z[0] as i32 - zp) as f32, 0.0);
            }
        }
    }
}

#[test]
fn quantize_row_of_zeros_and_of_non_finite_values() {
    let mut q = [1u8; 4];
    assert_eq!(quantize_row(&[0.0; 4], 255, None, &mut q), (0.0, 0));
    assert_eq!(q, [0; 4]);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let (s, _) = quantize_row(&[1.0, bad, -2.0], 255, None, &mut q);
        assert!(s.is_nan(), "{bad}");
    }
}

/// qgemm_block against f64 sums of the dequantized operands (what the int8 product means):
/// only f32 rounding of the epilogue apart.
#[test]
fn int8_block_matches_the_dequantized_product_in_f64() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for level in available_levels() {
        for (m, n, k) in shapes() {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..1.0f32)).collect();
            let wq: Vec<i8> = (0..n * k).map(|_| rng.random_range(-127..=127)).collect();
            let sw: Vec<f32> = (0..n).map(|_| rng.random_range(0.001..0.02f32)).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0f32)).collect();
            for (gelu, range) in [
                (false, None),
                (true, None),
                (false, Some((-1.5f32, 0.8f32))),
            ] {
                // Static activations: a calibrated range that clamps some of x.
                let p = QPacked::new(level, &wq, &sw, n, k).with_input_range(range);
                let mut y = vec![0f32; m * n];
                // SAFETY: y holds m · n floats; the level is available here.
                unsafe { qgemm_block(&x, &p, &b, gelu, y.as_mut_ptr()) };
                for i in 0..m {
                    let mut q = vec![0u8; k];
                    let (s, zp) = quantize_row(
                        &x[i * k..(i + 1) * k],
                        ACT_MAX,
                        p.input_range.map(|(lo, hi)| range_params(lo, hi, ACT_MAX)),
                        &mut q,
                    );
                    for j in 0..n {
                        let mut z: f64 = (0..k)
                            .map(|t| {
                                (s as f64 * (q[t] as i32 - zp) as f64)
                                    * (sw[j] as f64 * wq[j * k + t] as f64)
                            })
                            .sum::<f64>()
                            + b[j] as f64;
                        if gelu {
                            z *= 0.5 * (1.0 + libm_erf(z / std::f64::consts::SQRT_2));
                        }
                        let got = y[i * n + j] as f64;
                        assert!(
                            (got - z).abs() <= 1e-5 * (1.0 + z.abs()),
                            "{level:?} {m}x{n}x{k} gelu {gelu}: {got} vs {z}"
                        );
                    }
                }
            }
        }
    }
}

/// erf in f64 (Abramowitz–Stegun 7.1.26 is too coarse; a series/continued fraction is enough
/// at the tolerances above): via the complementary error function's continued fraction.
fn libm_erf(x: f64) -> f64 {
    // Taylor series converges fast for |x| < 3; beyond, erf is ±1 within 2e-5.
    if x.abs() > 4.0 {
        return x.signum();
    }
    let mut sum = x;
    let mut term = x;
    for n in 1..200 {
        term *= -x * x / n as f64;
        let add = term / (2 * n + 1) as f64;
        sum += add;
        if add.abs() < 1e-17 {
            break;
        }
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

#[test]
fn static_quantization_clamps_to_the_calibrated_range_and_keeps_nan() {
    let (s, zp) = range_params(-1.0, 3.0, 255);
    assert_eq!(zp, 64.0);
    let mut q = [0u8; 4];
    let got = quantize_row(&[-5.0, 0.0, 3.0, 9.0], 255, Some((s, zp)), &mut q);
    assert_eq!(got, (s, 64));
    assert_eq!(q, [0, 64, 255, 255], "outside the range: clamped");
    let (bad, _) = quantize_row(&[0.5, f32::NAN], 255, Some((s, zp)), &mut q);
    assert!(bad.is_nan());
}
