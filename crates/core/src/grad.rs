//! Custom backward passes for compositions: [`with_grad`] attaches a closure as the gradient of a
//! value computed from detached inputs (an op whose forward copies the value and whose backward
//! calls the closure), for ops whose autograd would be slow or whose forward has no backward in
//! candle. [`softmax_last_dim`]: candle's fused softmax forward with the softmax backward
//! `dx = y ⊙ (g − Σ g ⊙ y)`.
//!
//! ```
//! use zoo_core::candle_core::{Device, Tensor, Var};
//! let x = Var::new(&[[1f32, 2., 3.]], &Device::Cpu)?;
//! let y = zoo_core::grad::softmax_last_dim(x.as_tensor())?;
//! let g = (y.narrow(1, 0, 1)?.sum_all()?).backward()?;
//! let (p, dx) = (y.to_vec2::<f32>()?[0].clone(), g.get(x.as_tensor()).unwrap().to_vec2::<f32>()?[0].clone());
//! // d p0 / d x_j = p0 (δ0j − p_j)
//! assert!((dx[0] - p[0] * (1. - p[0])).abs() < 1e-6 && (dx[2] + p[0] * p[2]).abs() < 1e-6);
//! # Ok::<(), zoo_core::candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

/// Softmax over the last dimension: candle's fused kernel forward (one launch), and the softmax
/// backward as four ops (candle's `softmax_last_dim` has no backward; the composition takes six
/// ops forward and more backward).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach().contiguous()?)?;
    let y_ = y.clone();
    with_grad(&y, x, move |g| {
        let dot = (g * &y_)?.sum_keepdim(D::Minus1)?;
        y_.mul(&g.broadcast_sub(&dot)?)
    })
}

type Bwd1 = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;
type Bwd2 = Box<dyn Fn(&Tensor) -> Result<(Tensor, Tensor)> + Send + Sync>;

/// `value` (computed from detached inputs; fresh, contiguous) as a function of `input` whose
/// gradient is `bwd(grad of the result)`. The result is a copy of `value` (the op's forward).
pub fn with_grad(
    value: &Tensor,
    input: &Tensor,
    bwd: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    value.contiguous()?.apply_op2(input, Attach1(Box::new(bwd)))
}

/// As [`with_grad`] for two inputs.
pub fn with_grad2(
    value: &Tensor,
    a: &Tensor,
    b: &Tensor,
    bwd: impl Fn(&Tensor) -> Result<(Tensor, Tensor)> + Send + Sync + 'static,
) -> Result<Tensor> {
    value.contiguous()?.apply_op3(a, b, Attach2(Box::new(bwd)))
}

struct Attach1(Bwd1);
struct Attach2(Bwd2);

/// The forward of the attach ops: a copy of the value's storage.
fn copy_cpu(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    check(l)?;
    Ok((s.try_clone(l)?, l.shape().clone()))
}

fn copy_cuda(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    check(l)?;
    Ok((s.try_clone(l)?, l.shape().clone()))
}

fn check(l: &Layout) -> Result<()> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("with_grad: the attached value must be a fresh contiguous tensor");
    }
    Ok(())
}

impl CustomOp2 for Attach1 {
    fn name(&self) -> &'static str {
        "zoo-grad-attach1"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        copy_cpu(s, l)
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        copy_cuda(s, l)
    }
    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((None, Some((self.0)(&g.contiguous()?)?)))
    }
}

impl CustomOp3 for Attach2 {
    fn name(&self) -> &'static str {
        "zoo-grad-attach2"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_cpu(s, l)
    }
    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        copy_cuda(s, l)
    }
    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (da, db) = (self.0)(&g.contiguous()?)?;
        Ok((None, Some(da), Some(db)))
    }
}
