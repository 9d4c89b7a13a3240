//! ReLU, alone (after a BatchNorm) and on a residual sum (a ResNet block's output,
//! relu(a + b)), in parallel blocks over rayon's pool: one pass forward, one backward,
//! where candle's composed version makes several single-threaded passes. Backward as
//! PyTorch's: the gradient passes where the output is positive.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::par::{map1, map2};
use super::storage::{f32_slice, with_f32};

/// `max(x, 0)` for a CPU f32 tensor.
pub(crate) fn relu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Relu)
}

/// `max(a + b, 0)` for CPU f32 tensors of the same shape.
pub(crate) fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        bail!("add_relu: shapes {:?} and {:?} differ", a.dims(), b.dims())
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}

/// g where y > 0, else 0: the input gradient of both ops.
fn pass_positive(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let dx = with_f32([y, g], |[y, g]| {
        map2(
            y,
            g,
            #[inline(always)]
            |y, g| if y > 0.0 { g } else { 0.0 },
        )
    })?;
    Tensor::from_vec(dx, y.shape(), y.device())
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "vit-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let y = map1(
            x,
            #[inline(always)]
            |x| x.max(0.0),
        );
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(pass_positive(y, g)?))
    }
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "vit-add-relu"
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
            |a, b| (a + b).max(0.0),
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = pass_positive(y, g)?;
        Ok((Some(d.clone()), Some(d)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use candle_core::{DType, Tensor};

    /// PyTorch's ReLU from candle ops: the gradient passes where the output is positive.
    fn torch_relu(x: &Tensor) -> Tensor {
        let mask = x.gt(0.0).unwrap().to_dtype(x.dtype()).unwrap();
        (x * mask).unwrap()
    }

    #[test]
    fn match_the_composed_ops_values_and_gradients() {
        for (k, shape) in SHAPES.iter().enumerate() {
            let seed = k as u64;
            let one = vec![rand(shape, 3.0, seed)];
            let c = cotangent(shape, seed);
            let (yf, gf) = value_and_grads(|t| super::relu(&t[0]).unwrap(), &one, &c);
            let (yc, gc) = value_and_grads(|t| torch_relu(&t[0]), &one, &c);
            assert_eq!(flat(&yf), flat(&yc), "{shape:?} relu");
            assert_eq!(flat(&gf[0]), flat(&gc[0]), "{shape:?} relu grad");

            let two = vec![rand(shape, 3.0, seed), rand(shape, 3.0, 100 + seed)];
            let fused = |t: &[Tensor]| super::add_relu(&t[0], &t[1]).unwrap();
            let composed = |t: &[Tensor]| torch_relu(&(&t[0] + &t[1]).unwrap());
            let (yf, gf) = value_and_grads(fused, &two, &c);
            let (yc, gc) = value_and_grads(composed, &two, &c);
            assert_eq!(flat(&yf), flat(&yc), "{shape:?} add_relu");
            for i in 0..2 {
                assert_eq!(flat(&gf[i]), flat(&gc[i]), "{shape:?} add_relu grad {i}");
            }
        }
    }

    /// Against central differences in f64, away from the kink at 0.
    #[test]
    fn gradients_match_finite_differences() {
        let inp = vec![rand(&[3, 7], 2.0, 1), rand(&[3, 7], 2.0, 2)];
        let cot = cotangent(&[3, 7], 3);
        let (_, gf) = value_and_grads(|t| super::add_relu(&t[0], &t[1]).unwrap(), &inp, &cot);
        let fd = finite_diff(|t| (&t[0] + &t[1]).unwrap().relu().unwrap(), &inp, &cot);
        for j in 0..2 {
            let fd = fd[j].to_dtype(DType::F32).unwrap();
            assert!(max_rel_diff(&gf[j], &fd) < 1e-4, "grad {j}");
        }
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let err = super::add_relu(&rand(&[2, 3], 1.0, 1), &rand(&[3, 2], 1.0, 2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("differ"), "{err}");
    }
}
