//! Rotary position embedding (Su et al. 2021, RoFormer, eq. 34, in the half-split layout of
//! GPT-NeoX and Llama): for a head vector x = [x₁ | x₂] at position p,
//! `y = [x₁ ⊙ cos θ_p − x₂ ⊙ sin θ_p | x₂ ⊙ cos θ_p + x₁ ⊙ sin θ_p]`, one kernel for q or k instead
//! of candle's composition (`rope_slow`: two concatenations, a rotate-half of two narrows, a
//! negation and a concatenation, two broadcast products and a sum, about 8 kernels forward and as
//! many backward). The map is a rotation, so its backward is the same kernel with the angle negated.
//! Differentiable in x (cos and sin are tables, not parameters).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! // One head of width 2 at one position with angle π/2: (1, 0) turns to (0, 1).
//! let x = Tensor::new(&[[[[1f32, 0.0]]]], &Device::Cpu)?;
//! let (cos, sin) = (Tensor::new(&[[0f32]], &Device::Cpu)?, Tensor::new(&[[1f32]], &Device::Cpu)?);
//! let y = zoo_kernels::rope::rope(&x, &cos, &sin)?;
//! assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![0.0, 1.0]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// Why the fused kernel cannot run here (`None`: it can).
pub fn unsupported(x: &Tensor) -> Option<String> {
    if let Some(why) = crate::unavailable_unless_cpu_form(x.device(), true) {
        return Some(why);
    }
    if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Some(format!("dtype {:?}", x.dtype()));
    }
    None
}

/// x (B, H, T, D) with D even, cos and sin (T, D/2) (any float type; used in f32). Returns y in
/// x's dtype.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    if d % 2 != 0 || cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
        candle_core::bail!("rope: x {:?} needs cos and sin of ({t}, {}), got {:?} and {:?}", x.dims(), d / 2, cos.dims(), sin.dims())
    }
    let f = |a: &Tensor| a.to_dtype(DType::F32)?.contiguous();
    let op = Rope { cos: f(cos)?, sin: f(sin)?, t, h: d / 2, sign: 1.0 };
    x.contiguous()?.apply_op1_arc(Arc::new(Box::new(op)))
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
    t: usize,
    h: usize,
    /// +1 forward, −1 for the backward (the inverse rotation).
    sign: f32,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "zoo-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::cpu_f32(s, l, "rope")?;
        let (cos, sin) = (self.cos.flatten_all()?.to_vec1::<f32>()?, self.sin.flatten_all()?.to_vec1::<f32>()?);
        let (t, h) = (self.t, self.h);
        let mut y = vec![0f32; x.len()];
        // Rows (one head vector at one position) in parallel tasks.
        use rayon::prelude::*;
        if h > 0 {
            let k = crate::cpu::rows_per_task(2 * h);
            y.par_chunks_mut(k * 2 * h).enumerate().for_each(|(c, yc)| {
                crate::cpu::simd(|| {
                    for (i, yr) in yc.chunks_exact_mut(2 * h).enumerate() {
                        let row = c * k + i;
                        let pos = row % t;
                        let (cs, sn) = (&cos[pos * h..(pos + 1) * h], &sin[pos * h..(pos + 1) * h]);
                        let (xa, xb) = x[row * 2 * h..(row + 1) * 2 * h].split_at(h);
                        let (ya, yb) = yr.split_at_mut(h);
                        for i in 0..h {
                            let (c, s) = (cs[i], self.sign * sn[i]);
                            ya[i] = xa[i] * c - xb[i] * s;
                            yb[i] = xb[i] * c + xa[i] * s;
                        }
                    }
                })
            });
        }
        Ok((crate::cpu_from_f32(y, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda_addr::{alloc, storage_addr, suffix, tensor_addr};
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rope.ptx"));
        let dev = s.device.clone();
        let n = l.shape().elem_count();
        let (y, yp) = alloc(&dev, s.dtype(), n)?;
        let (xp, cp, sp) = (storage_addr(s, l)?, tensor_addr(&self.cos)?, tensor_addr(&self.sin)?);
        let f = dev.get_or_load_custom_func(&format!("zoo_rope_{}", suffix(s.dtype())?), "zoo_rope", PTX)?;
        let (pairs, t32, h32) = ((n / 2) as i64, self.t as i32, self.h as i32);
        let mut b = f.builder();
        b.arg(&xp).arg(&cp).arg(&sp).arg(&yp).arg(&pairs).arg(&t32).arg(&h32).arg(&self.sign);
        let blocks = (n / 2).div_ceil(256).clamp(1, 1 << 16) as u32;
        // SAFETY: x and y hold n elements, cos and sin t·h f32 (checked in `rope`).
        unsafe { b.launch(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.w()?;
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inv = Rope { cos: self.cos.clone(), sin: self.sin.clone(), t: self.t, h: self.h, sign: -self.sign };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inv)?))
    }
}
