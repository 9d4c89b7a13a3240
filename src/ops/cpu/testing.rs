//! Shared helpers for the kernels' tests (compiled for tests only): seeded random tensors,
//! comparisons, autograd values and gradients, and a finite-difference oracle.

use candle_core::{DType, Device, Tensor, Var};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded tensor of uniform values in [-scale, scale).
pub fn rand(shape: &[usize], scale: f32, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// All elements of `t`, flattened.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Max |a − b| / (1 + |b|) over all elements (both flattened to f64).
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let (a, b) = (a.to_vec1::<f64>().unwrap(), b.to_vec1::<f64>().unwrap());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f64::max)
}

/// The fixed random weighting used as the upstream gradient: loss = Σ y ⊙ c.
pub fn cotangent(shape: &[usize], seed: u64) -> Tensor {
    rand(shape, 1.0, seed ^ 0x5eed)
}

/// The value of f(inputs) and the gradients of Σ f(inputs) ⊙ c with respect to every
/// input, through candle's autograd (`backward()`).
pub fn value_and_grads(
    f: impl Fn(&[Tensor]) -> Tensor,
    inputs: &[Tensor],
    c: &Tensor,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let loss = (&y * c.to_dtype(y.dtype()).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let g = ts.iter().map(|t| grads.get(t).unwrap().clone()).collect();
    (y, g)
}

/// Central differences of Σ f(inputs) ⊙ c in f64 (inputs promoted to f64, step 1e-6):
/// an oracle independent of any backward pass. Tiny shapes only (2 calls per element).
pub fn finite_diff(f: impl Fn(&[Tensor]) -> Tensor, inputs: &[Tensor], c: &Tensor) -> Vec<Tensor> {
    let h = 1e-6;
    let c = c.to_dtype(DType::F64).unwrap();
    let base: Vec<Vec<f64>> = inputs
        .iter()
        .map(|t| {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    let loss = |vals: &[Vec<f64>]| -> f64 {
        let ts: Vec<Tensor> = vals
            .iter()
            .zip(inputs)
            .map(|(v, t)| Tensor::from_slice(v, t.dims(), &Device::Cpu).unwrap())
            .collect();
        (f(&ts) * &c)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    (0..inputs.len())
        .map(|i| {
            let grad: Vec<f64> = (0..base[i].len())
                .map(|k| {
                    let mut v = base.clone();
                    v[i][k] = base[i][k] + h;
                    let up = loss(&v);
                    v[i][k] = base[i][k] - h;
                    (up - loss(&v)) / (2.0 * h)
                })
                .collect();
            Tensor::from_vec(grad, inputs[i].dims(), &Device::Cpu).unwrap()
        })
        .collect()
}

/// Asserts that `f`'s value and gradients ([`value_and_grads`]) are the same bits on a pool
/// of one thread as on one of three: blocks of work, not threads, split the sums.
pub fn assert_thread_count_free(
    f: impl Fn(&[Tensor]) -> Tensor + Sync,
    inputs: &[Tensor],
    c: &Tensor,
) {
    let on = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| value_and_grads(&f, inputs, c))
    };
    let ((y1, g1), (y3, g3)) = (on(1), on(3));
    assert_eq!(flat(&y1), flat(&y3));
    for (a, b) in g1.iter().zip(&g3) {
        assert_eq!(flat(a), flat(b));
    }
}

/// Shapes with odd row counts and widths, including 1.
pub const SHAPES: &[&[usize]] = &[
    &[1, 1],
    &[1, 3],
    &[7, 64],
    &[33, 65],
    &[2, 3, 5],
    &[300, 64],  // several rayon blocks at width 64
    &[1, 20000], // one row wider than a block
];

/// Whether the CPU has avx512f and nothing steers the matrix products away from our own
/// kernel (so a test of a large shape runs on it).
pub fn is_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use super::settings::{settings, BlasChoice, GemmChoice};
        std::arch::is_x86_feature_detected!("avx512f")
            && settings().gemm == GemmChoice::Vit
            && settings().blas == BlasChoice::None
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}
