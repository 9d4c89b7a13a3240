//! Portable seeded randomness for the data pipeline: ChaCha8 generators keyed by small
//! tuples of numbers, unbiased bounded integers and Fisher–Yates permutations. Results
//! depend only on ChaCha's output stream, so a seed means the same thing everywhere.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Stream used for the per-epoch sample order.
pub(crate) const STREAM_SHUFFLE: u64 = 0x5348_5546; // "SHUF"
/// Stream used for per-sample augmentation.
pub(crate) const STREAM_AUGMENT: u64 = 0x4155_474d; // "AUGM"
/// Stream used for the random resized crop of an image file.
pub(crate) const STREAM_CROP: u64 = 0x4352_4f50; // "CROP"
/// Stream used for a class-balanced fraction of the training set.
pub(crate) const STREAM_FRACTION: u64 = 0x4652_4143; // "FRAC"
/// Stream used for the train/validation split.
pub(crate) const STREAM_SPLIT: u64 = 0x5350_4c54; // "SPLT"

/// A ChaCha8 generator whose 256-bit key is exactly `(stream, a, b, c)` as little-endian
/// words. ChaCha is a pseudo-random function of its key, so distinct tuples give
/// independent streams without any hashing.
pub(crate) fn keyed_rng(stream: u64, a: u64, b: u64, c: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (chunk, word) in key.chunks_exact_mut(8).zip([stream, a, b, c]) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// A uniform integer in `0..n` (Lemire's multiply-and-reject; no modulo bias).
/// `n` must be positive.
pub(crate) fn below<R: Rng>(rng: &mut R, n: u64) -> u64 {
    debug_assert!(n > 0, "below(0)");
    let mut m = u128::from(rng.next_u64()) * u128::from(n);
    if (m as u64) < n {
        let threshold = n.wrapping_neg() % n;
        while (m as u64) < threshold {
            m = u128::from(rng.next_u64()) * u128::from(n);
        }
    }
    (m >> 64) as u64
}

/// A uniform `f64` in `[0, 1)` with 53 random bits.
pub(crate) fn uniform<R: Rng>(rng: &mut R) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A fair coin.
pub(crate) fn coin<R: Rng>(rng: &mut R) -> bool {
    rng.next_u32() >> 31 == 1
}

/// A uniformly random permutation of `0..n` (Fisher–Yates).
pub(crate) fn permutation<R: Rng>(rng: &mut R, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_rng_is_deterministic_and_key_sensitive() {
        let mut r1 = keyed_rng(1, 2, 3, 4);
        let mut r2 = keyed_rng(1, 2, 3, 4);
        let mut r3 = keyed_rng(1, 2, 3, 5);
        let x1: Vec<u64> = (0..4).map(|_| r1.next_u64()).collect();
        let x2: Vec<u64> = (0..4).map(|_| r2.next_u64()).collect();
        let x3: Vec<u64> = (0..4).map(|_| r3.next_u64()).collect();
        assert_eq!(x1, x2);
        assert_ne!(x1, x3);
        assert!(x1.windows(2).all(|w| w[0] != w[1]));
    }

    #[test]
    fn keyed_rng_known_value() {
        // Pins the key layout and the generator: changing either would silently change
        // every shuffle and augmentation of existing runs.
        let mut r = keyed_rng(0, 0, 0, 0);
        let mut reference = ChaCha8Rng::from_seed([0u8; 32]);
        assert_eq!(r.next_u64(), reference.next_u64());
        let mut r = keyed_rng(1, 0, 0, 0);
        let mut seed = [0u8; 32];
        seed[0] = 1;
        let mut reference = ChaCha8Rng::from_seed(seed);
        assert_eq!(r.next_u64(), reference.next_u64());
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = keyed_rng(9, 9, 9, 9);
        let mut seen = [0usize; 7];
        for _ in 0..7000 {
            let v = below(&mut rng, 7) as usize;
            seen[v] += 1;
        }
        for (v, &count) in seen.iter().enumerate() {
            assert!((800..1200).contains(&count), "value {v} seen {count} times");
        }
        assert_eq!(below(&mut rng, 1), 0);
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut rng = keyed_rng(STREAM_SHUFFLE, 1, 2, 0);
        let p = permutation(&mut rng, 100);
        let mut sorted = p.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(p, (0..100).collect::<Vec<_>>());
        assert!(permutation(&mut rng, 0).is_empty());
        assert_eq!(permutation(&mut rng, 1), vec![0]);
    }
}
