//! Elementwise sum of two tensors of one shape, for the residual connections: y = a + b,
//! split into blocks over rayon's pool (candle's own add runs on one thread here, since our
//! kernels own the pool). Backward: da = db = g.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::par::map2;
use super::storage::f32_slice;

/// `a + b` for CPU f32 tensors of the same shape.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        bail!("add: shapes {:?} and {:?} differ", a.dims(), b.dims())
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, Add)
}

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "vit-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let y = map2(
            a,
            b,
            #[inline(always)]
            |a, b| a + b,
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.clone()), Some(g.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;

    fn fused(t: &[candle_core::Tensor]) -> candle_core::Tensor {
        super::add(&t[0], &t[1]).unwrap()
    }

    fn composed(t: &[candle_core::Tensor]) -> candle_core::Tensor {
        (&t[0] + &t[1]).unwrap()
    }

    #[test]
    fn matches_candle_add_values_and_gradients() {
        for (k, shape) in SHAPES.iter().enumerate() {
            let inp = vec![rand(shape, 3.0, k as u64), rand(shape, 3.0, 100 + k as u64)];
            let c = cotangent(shape, k as u64);
            let (yf, gf) = value_and_grads(fused, &inp, &c);
            let (yc, gc) = value_and_grads(composed, &inp, &c);
            assert_eq!(flat(&yf), flat(&yc), "{shape:?} forward");
            for i in 0..2 {
                assert_eq!(flat(&gf[i]), flat(&gc[i]), "{shape:?} grad {i}");
            }
        }
    }

    #[test]
    fn strided_inputs_and_mismatched_shapes() {
        let a = rand(&[5, 7], 2.0, 3).t().unwrap(); // (7, 5), strided
        let b = rand(&[7, 5], 2.0, 4);
        let got = fused(&[a.clone(), b.clone()]);
        assert_eq!(flat(&got), flat(&composed(&[a, b.clone()])));
        let err = super::add(&b, &rand(&[5, 7], 1.0, 5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("differ"), "{err}");
    }
}
