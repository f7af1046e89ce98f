//! Row-wise cross-entropy without materialising the softmax: `nll[i] = logsumexp(x[i]) - x[i, t[i]]`,
//! and in the backward `dx[i, j] = g[i] · (softmax(x[i])[j] − [j = t[i]])`, written once in the
//! logits' type. The composition (`log_softmax` in f32, then `gather`) keeps an f32 copy of the
//! (B·T, V) logits and several more in its backward; this op keeps one f32 per row (the lse).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let x = Tensor::new(&[[0f32, 0.0], [0.0, 2.0f32.ln()]], &Device::Cpu)?;
//! let t = Tensor::new(&[0u32, 1], &Device::Cpu)?;
//! let nll = zoo_kernels::cross_entropy::nll_op(&x, &t)?.to_vec1::<f32>()?;
//! assert!((nll[0] - 2f32.ln()).abs() < 1e-6 && (nll[1] - (3f32 / 2.0).ln()).abs() < 1e-6);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// Why the fused kernel cannot run here (`None`: it can).
pub fn unsupported(logits: &Tensor, targets: &Tensor) -> Option<String> {
    if let Some(why) = crate::unavailable(logits.device()) {
        return Some(why);
    }
    if !matches!(logits.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Some(format!("logits dtype {:?}", logits.dtype()));
    }
    if targets.dtype() != DType::U32 {
        return Some(format!("targets dtype {:?}", targets.dtype()));
    }
    None
}

/// logits (N, V), targets (N,) u32 → nll (N,) f32, differentiable in the logits. A target
/// outside the vocabulary gives NaN (the CPU form: an error).
pub fn nll_op(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.dims() != [n] {
        candle_core::bail!("cross-entropy: targets {:?} for logits {:?}", targets.dims(), logits.dims())
    }
    let op = Nll { v, lse: Mutex::new(None) };
    logits.contiguous()?.apply_op2_arc(&targets.contiguous()?, Arc::new(Box::new(op)))
}

struct Nll {
    v: usize,
    /// The forward's per-row log-sum-exp, f32 (a tensor on the op's device).
    lse: Mutex<Option<Tensor>>,
}

impl CustomOp2 for Nll {
    fn name(&self) -> &'static str {
        "zoo-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if matches!(s1, CpuStorage::F64(_)) {
            candle_core::bail!("cross-entropy: unsupported logits dtype f64")
        }
        let x = crate::cpu_f32(s1, l1, "cross-entropy")?;
        let (a, z) = l2.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("cross-entropy: targets not contiguous".into()))?;
        let t = &s2.as_slice::<u32>()?[a..z];
        let v = self.v;
        let (mut nll, mut lse) = (Vec::with_capacity(t.len()), Vec::with_capacity(t.len()));
        for (i, &ti) in t.iter().enumerate() {
            let row = &x[i * v..(i + 1) * v];
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let l = m + row.iter().map(|&r| (r - m).exp()).sum::<f32>().ln();
            let Some(&xt) = row.get(ti as usize) else { candle_core::bail!("cross-entropy: target {ti} outside the vocabulary of {v}") };
            lse.push(l);
            nll.push(l - xt);
        }
        *self.lse.lock().unwrap() = Some(Tensor::from_vec(lse, t.len(), &candle_core::Device::Cpu)?);
        Ok((CpuStorage::F32(nll), Shape::from(t.len())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = l2.shape().elem_count();
        let (nll, lse) = cuda::forward(s1, l1, s2, l2, n, self.v)?;
        *self.lse.lock().unwrap() = Some(lse);
        Ok((nll, Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, t: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().unwrap().clone().ok_or_else(|| candle_core::Error::Msg("cross-entropy: backward before forward".into()))?;
        let g = grad.to_dtype(DType::F32)?.contiguous()?;
        let dx = if x.device().is_cuda() {
            #[cfg(feature = "cuda")]
            {
                cuda::backward(x, t, &lse, &g, self.v)?
            }
            #[cfg(not(feature = "cuda"))]
            candle_core::bail!("cross-entropy: CUDA tensors in a build without the cuda feature")
        } else {
            // softmax − one-hot, scaled by g: the reference form.
            let p = x.to_dtype(DType::F32)?.broadcast_sub(&lse.unsqueeze(1)?)?.exp()?;
            let onehot = t.unsqueeze(1)?.broadcast_eq(&Tensor::arange(0u32, self.v as u32, x.device())?.unsqueeze(0)?)?.to_dtype(DType::F32)?;
            (p - onehot)?.broadcast_mul(&g.unsqueeze(1)?)?.to_dtype(x.dtype())?
        };
        Ok((Some(dx), None))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::cuda_addr::{storage_addr, tensor_addr};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Device, Layout, Result, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx"));
    const MODULE: &str = "zoo_ce";

    fn suffix(dt: DType) -> Result<&'static str> {
        Ok(match dt {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            t => candle_core::bail!("cross-entropy: no kernel for {t:?}"),
        })
    }

    fn cfg(n: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (n.clamp(1, 65_535) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    pub fn forward(x: &CudaStorage, xl: &Layout, t: &CudaStorage, tl: &Layout, n: usize, v: usize) -> Result<(CudaStorage, Tensor)> {
        let dev = x.device.clone();
        let f = dev.get_or_load_custom_func(&format!("zoo_ce_fwd_{}", suffix(x.dtype())?), MODULE, PTX)?;
        let nll = dev.alloc_zeros::<f32>(n)?;
        let lse = Tensor::zeros(n, DType::F32, &Device::Cuda(dev.clone()))?;
        let (xp, tp, lp) = (storage_addr(x, xl)?, storage_addr(t, tl)?, tensor_addr(&lse)?);
        let stream = dev.cuda_stream();
        let (np, _sync) = nll.device_ptr(&stream);
        let (n32, v32) = (n as u32, v as u32);
        let mut b = f.builder();
        b.arg(&xp).arg(&tp).arg(&np).arg(&lp).arg(&n32).arg(&v32);
        // SAFETY: x holds n·v elements, t n u32, nll and lse n f32; one block per row.
        unsafe { b.launch(cfg(n)) }.w()?;
        drop(_sync);
        Ok((CudaStorage::wrap_cuda_slice(nll, dev), lse))
    }

    pub fn backward(x: &Tensor, t: &Tensor, lse: &Tensor, g: &Tensor, v: usize) -> Result<Tensor> {
        let Device::Cuda(dev) = x.device() else { candle_core::bail!("cross-entropy: not on CUDA") };
        let (x, t) = (x.contiguous()?, t.contiguous()?);
        let n = t.elem_count();
        let dx = Tensor::zeros(x.shape(), x.dtype(), x.device())?;
        let f = dev.get_or_load_custom_func(&format!("zoo_ce_bwd_{}", suffix(x.dtype())?), MODULE, PTX)?;
        let (xp, tp, lp, gp, dp) = (tensor_addr(&x)?, tensor_addr(&t)?, tensor_addr(lse)?, tensor_addr(g)?, tensor_addr(&dx)?);
        let (n32, v32) = (n as u32, v as u32);
        let mut b = f.builder();
        b.arg(&xp).arg(&tp).arg(&lp).arg(&gp).arg(&dp).arg(&n32).arg(&v32);
        // SAFETY: as in the forward; dx has the logits' shape and type.
        unsafe { b.launch(cfg(n)) }.w()?;
        Ok(dx)
    }
}
