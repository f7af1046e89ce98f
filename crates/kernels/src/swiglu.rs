//! SwiGLU's gating product (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6):
//! `z = silu(g) ⊙ u` with `g = x W₁`, `u = x W₃`, forward in one kernel and the backward in one
//! more that writes both gradients (`dg = dz ⊙ u ⊙ σ(g)(1 + g(1 − σ(g)))`, `du = dz ⊙ silu(g)`),
//! in place of candle's silu, product and their backward ops (about 7 kernels and as many
//! (B·T, hidden) temporaries).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let g = Tensor::new(&[0f32, 2.0], &Device::Cpu)?;
//! let u = Tensor::new(&[5f32, 1.0], &Device::Cpu)?;
//! let z = zoo_kernels::swiglu::swiglu(&g, &u)?.to_vec1::<f32>()?;
//! assert_eq!(z[0], 0.0); // silu(0) = 0
//! assert!((z[1] - 2.0 / (1.0 + (-2f32).exp())).abs() < 1e-6);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// Why the fused kernel cannot run here (`None`: it can).
pub fn unsupported(g: &Tensor, u: &Tensor) -> Option<String> {
    if let Some(why) = crate::unavailable_unless_cpu_form(g.device(), true) {
        return Some(why);
    }
    if g.dims() != u.dims() || g.dtype() != u.dtype() {
        return Some(format!("g {:?} {:?}, u {:?} {:?}", g.dims(), g.dtype(), u.dims(), u.dtype()));
    }
    if !matches!(g.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Some(format!("dtype {:?}", g.dtype()));
    }
    None
}

/// silu(g) ⊙ u for g and u of one shape and dtype (f32, bf16, f16); differentiable in both.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dims() != u.dims() || g.dtype() != u.dtype() {
        candle_core::bail!("swiglu: g {:?} {:?} and u {:?} {:?} differ", g.dims(), g.dtype(), u.dims(), u.dtype())
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "zoo-swiglu"
    }

    /// The CPU form: one pass in parallel chunks, e^x vectorised.
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (g, u) = (crate::cpu_f32(s1, l1, "swiglu")?, crate::cpu_f32(s2, l2, "swiglu")?);
        let mut z = vec![0f32; g.len()];
        const N: usize = crate::cpu::ELEMS_PER_TASK;
        z.par_chunks_mut(N).enumerate().for_each(|(c, zc)| {
            crate::cpu::simd(|| {
                for ((zv, &a), &b) in zc.iter_mut().zip(&g[c * N..]).zip(&u[c * N..]) {
                    *zv = a * crate::cpu::sigmoid(a) * b;
                }
            })
        });
        Ok((crate::cpu_from_f32(z, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda_addr::{alloc, storage_addr, suffix};
        let dev = s1.device.clone();
        let n = l1.shape().elem_count();
        let (z, zp) = alloc(&dev, s1.dtype(), n)?;
        let f = dev.get_or_load_custom_func(&format!("zoo_swiglu_fwd_{}", suffix(s1.dtype())?), cuda::MODULE, cuda::PTX)?;
        let (gp, up, n64) = (storage_addr(s1, l1)?, storage_addr(s2, l2)?, n as i64);
        let mut b = f.builder();
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        b.arg(&gp).arg(&up).arg(&zp).arg(&n64);
        cuda::launch(b, n)?;
        Ok((z, l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, dz: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dz = dz.to_dtype(g.dtype())?.contiguous()?;
        if g.device().is_cuda() {
            #[cfg(feature = "cuda")]
            {
                let (dg, du) = cuda::backward(g, u, &dz)?;
                return Ok((Some(dg), Some(du)));
            }
            #[cfg(not(feature = "cuda"))]
            candle_core::bail!("swiglu: CUDA tensors in a build without the cuda feature")
        }
        // The CPU form: both gradients in one parallel pass.
        use rayon::prelude::*;
        let n = g.elem_count();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        crate::cpu::with_f32([g, u, &dz], "swiglu", |[gv, uv, dv]| {
            const N: usize = crate::cpu::ELEMS_PER_TASK;
            dg.par_chunks_mut(N).zip(du.par_chunks_mut(N)).enumerate().for_each(|(c, (dgc, duc))| {
                crate::cpu::simd(|| {
                    let r = c * N..(c * N + dgc.len());
                    for ((((dgv, duv), &a), &b), &d) in dgc.iter_mut().zip(duc.iter_mut()).zip(&gv[r.clone()]).zip(&uv[r.clone()]).zip(&dv[r]) {
                        let s = crate::cpu::sigmoid(a);
                        *dgv = d * b * s * (1.0 + a * (1.0 - s));
                        *duv = d * a * s;
                    }
                })
            })
        })?;
        let t = |x: Vec<f32>| Tensor::from_vec(x, g.shape(), g.device())?.to_dtype(g.dtype());
        Ok((Some(t(dg)?), Some(t(du)?)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::cuda_addr::{suffix, tensor_addr};
    use candle_core::cuda_backend::cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{Result, Tensor};

    pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));
    pub const MODULE: &str = "zoo_swiglu";

    pub fn launch(mut b: LaunchArgs<'_>, n: usize) -> Result<()> {
        let blocks = n.div_ceil(256).clamp(1, 1 << 16) as u32;
        // SAFETY: every buffer the caller passed holds n elements of the kernel's type.
        unsafe { b.launch(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.w()?;
        Ok(())
    }

    pub fn backward(g: &Tensor, u: &Tensor, dz: &Tensor) -> Result<(Tensor, Tensor)> {
        let candle_core::Device::Cuda(dev) = g.device() else { candle_core::bail!("swiglu: not on CUDA") };
        let (g, u) = (g.contiguous()?, u.contiguous()?);
        let (dg, du) = (g.zeros_like()?, u.zeros_like()?);
        let f = dev.get_or_load_custom_func(&format!("zoo_swiglu_bwd_{}", suffix(g.dtype())?), MODULE, PTX)?;
        let (gp, up, zp, dgp, dup, n64) = (tensor_addr(&g)?, tensor_addr(&u)?, tensor_addr(dz)?, tensor_addr(&dg)?, tensor_addr(&du)?, g.elem_count() as i64);
        let mut b = f.builder();
        b.arg(&gp).arg(&up).arg(&zp).arg(&dgp).arg(&dup).arg(&n64);
        launch(b, g.elem_count())?;
        Ok((dg, du))
    }
}
