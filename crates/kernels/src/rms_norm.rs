//! RMS normalisation over the last dimension with a gain (Zhang & Sennrich 2019, eq. 4),
//! forward and backward as one op: the block norms of `zoo-core`'s model, GLA's per-head output
//! norm, attention's q/k norm.
//!
//! `y = x · r · γ` with `r = 1/sqrt(mean(x²) + ε)` per row (f32 arithmetic, r saved for the
//! backward); with `u = g ⊙ γ`: `dx = r·u − x · r³ · (Σ u ⊙ x) / d`, `dγ = Σ_rows g ⊙ x · r`.
//!
//! The composition (`rms_normalize` then a broadcast multiply) casts to f32, squares, reduces,
//! divides by a broadcast (B, T, 1) column and casts back, and its backward is about ten more
//! full-size ops. Here the forward and dx are one kernel each (a warp per row) and dγ one
//! column reduction over chunks of 64 rows with one fixed-order sum.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let x = Tensor::new(&[[3f32, 4.0]], &Device::Cpu)?; // mean(x²) = 12.5
//! let y = zoo_kernels::rms_norm::rms_norm(&x, None, 0.0)?.flatten_all()?.to_vec1::<f32>()?;
//! let r = 1.0 / 12.5f32.sqrt();
//! assert!((y[0] - 3.0 * r).abs() < 1e-6 && (y[1] - 4.0 * r).abs() < 1e-6);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// (rows per chunk, chunks) of the gain gradient's partial sums on CUDA: 64 rows a chunk, more
/// where the grid's second dimension (at most 65,535 chunks) needs it.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn chunking(rows: usize) -> (usize, usize) {
    let per = 64usize.max(rows.div_ceil(65_535));
    (per, rows.div_ceil(per).max(1))
}

/// Why the fused kernel cannot run here (`None`: it can).
pub fn unsupported(x: &Tensor) -> Option<String> {
    if let Some(why) = crate::unavailable_unless_cpu_form(x.device(), true) {
        return Some(why);
    }
    if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Some(format!("dtype {:?}", x.dtype()));
    }
    if x.rank() == 0 || x.elem_count() > i32::MAX as usize {
        return Some(format!("shape {:?}", x.dims()));
    }
    None
}

/// x (…, d), gain (d) or none (γ = 1) → y with x's shape and dtype, differentiable in x and the
/// gain (its gradient in f32). On any device: the CPU form is rows in parallel tasks (tested
/// against the composition; the model's norm on the CPU in fused mode), CUDA runs the kernels.
pub fn rms_norm(x: &Tensor, gain: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let gamma = match gain {
        Some(g) if g.dims() == [d] => g.to_dtype(DType::F32)?.contiguous()?,
        Some(g) => candle_core::bail!("rms norm: gain {:?} for rows of {d}", g.dims()),
        None => Tensor::ones(d, DType::F32, x.device())?,
    };
    let op = Norm { d, eps: eps as f32, has_gain: gain.is_some(), r: Mutex::new(None) };
    x.contiguous()?.apply_op2_arc(&gamma, Arc::new(Box::new(op)))
}

struct Norm {
    d: usize,
    eps: f32,
    has_gain: bool,
    /// The forward's 1/rms per row, f32, on the op's device.
    r: Mutex<Option<Tensor>>,
}

#[derive(Clone, Copy, PartialEq)]
enum Part {
    /// dx, in x's dtype and shape.
    Dx,
    /// The gain's gradient as partial sums (chunks, d), f32.
    Dw,
}

struct Grad {
    d: usize,
    part: Part,
    r: Tensor,
}

impl CustomOp2 for Norm {
    fn name(&self) -> &'static str {
        "zoo-rms-norm"
    }

    /// The CPU form: rows in parallel tasks, the sums of squares in eight lanes.
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (x, gain) = (crate::cpu_f32(s1, l1, "rms norm")?, crate::cpu_f32(s2, l2, "rms norm")?);
        let d = self.d;
        let rows = x.len() / d.max(1);
        let mut y = vec![0f32; x.len()];
        let mut r = vec![0f32; rows];
        if d > 0 {
            let k = crate::cpu::rows_per_task(d);
            y.par_chunks_mut(k * d).zip(r.par_chunks_mut(k)).enumerate().for_each(|(c, (yc, rc))| {
                crate::cpu::simd(|| {
                    for (i, (yr, ri)) in yc.chunks_exact_mut(d).zip(rc.iter_mut()).enumerate() {
                        let xr = &x[(c * k + i) * d..(c * k + i + 1) * d];
                        *ri = 1.0 / (crate::cpu::dot(xr, xr) / d as f32 + self.eps).sqrt();
                        for ((yv, &xv), &gv) in yr.iter_mut().zip(xr).zip(gain.iter()) {
                            *yv = xv * *ri * gv;
                        }
                    }
                })
            });
        }
        *self.r.lock().unwrap() = Some(Tensor::from_vec(r, rows, &candle_core::Device::Cpu)?);
        Ok((crate::cpu_from_f32(y, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (y, r) = cuda::forward(s1, l1, s2, l2, self.d, self.eps)?;
        *self.r.lock().unwrap() = Some(r);
        Ok((y, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, gain: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let r = self.r.lock().unwrap().clone().ok_or_else(|| candle_core::Error::Msg("rms norm: backward before forward".into()))?;
        let g = grad.to_dtype(x.dtype())?.contiguous()?;
        let dx = x.apply_op3_no_bwd(gain, &g, &Grad { d: self.d, part: Part::Dx, r: r.clone() })?;
        let dw = if self.has_gain { Some(x.apply_op3_no_bwd(gain, &g, &Grad { d: self.d, part: Part::Dw, r })?.sum(0)?) } else { None };
        Ok((Some(dx), dw))
    }
}

impl CustomOp3 for Grad {
    fn name(&self) -> &'static str {
        "zoo-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "rms norm backward";
        let (x, gain, g) = (crate::cpu_f32(s1, l1, what)?, crate::cpu_f32(s2, l2, what)?, crate::cpu_f32(s3, l3, what)?);
        use rayon::prelude::*;
        let d = self.d;
        let k = crate::cpu::rows_per_task(d);
        let r = self.r.to_vec1::<f32>()?;
        Ok(match self.part {
            Part::Dx => {
                let mut dx = vec![0f32; x.len()];
                if d > 0 {
                    dx.par_chunks_mut(k * d).enumerate().for_each(|(c, dc)| {
                        crate::cpu::simd(|| {
                            let mut u = vec![0f32; d];
                            for (i, dr) in dc.chunks_exact_mut(d).enumerate() {
                                let row = (c * k + i) * d..(c * k + i + 1) * d;
                                let (xr, gr, ri) = (&x[row.clone()], &g[row], r[c * k + i]);
                                u.iter_mut().zip(gr).zip(gain.iter()).for_each(|((uv, &a), &b)| *uv = a * b);
                                let cf = ri * ri * ri * crate::cpu::dot(xr, &u) / d as f32;
                                for ((dv, &uv), &xv) in dr.iter_mut().zip(&u).zip(xr) {
                                    *dv = ri * uv - xv * cf;
                                }
                            }
                        })
                    });
                }
                (crate::cpu_from_f32(dx, s1.dtype())?, l1.shape().clone())
            }
            Part::Dw => {
                // One partial sum per task (rows k·c..), summed by the caller.
                let parts: Vec<Vec<f32>> = if d == 0 {
                    vec![]
                } else {
                    x.par_chunks(k * d)
                        .zip(g.par_chunks(k * d))
                        .enumerate()
                        .map(|(c, (xc, gc))| {
                            crate::cpu::simd(|| {
                                let mut dw = vec![0f32; d];
                                for (i, (xr, gr)) in xc.chunks_exact(d).zip(gc.chunks_exact(d)).enumerate() {
                                    let ri = r[c * k + i];
                                    dw.iter_mut().zip(xr).zip(gr).for_each(|((w, &a), &b)| *w += b * a * ri);
                                }
                                dw
                            })
                        })
                        .collect()
                };
                let n = parts.len().max(1);
                let mut flat: Vec<f32> = parts.concat();
                flat.resize(n * d, 0.0);
                (CpuStorage::F32(flat), Shape::from((n, d)))
            }
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let rows = l1.shape().elem_count() / self.d.max(1);
        match self.part {
            Part::Dx => Ok((cuda::dx(s1, l1, s2, l2, s3, l3, &self.r, self.d)?, l1.shape().clone())),
            Part::Dw => Ok((cuda::dw(s1, l1, s3, l3, &self.r, self.d)?, Shape::from((chunking(rows).1, self.d)))),
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::chunking;
    use crate::cuda_addr::{alloc, storage_addr, suffix, tensor_addr};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Device, Layout, Result, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));
    const MODULE: &str = "zoo_rms_norm";
    const THREADS: usize = 256;

    /// A warp per row.
    fn rows_cfg(rows: usize) -> LaunchConfig {
        let blocks = rows.div_ceil(THREADS / 32).clamp(1, 1 << 20) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 }
    }

    fn check(x: &CudaStorage, gain: &CudaStorage) -> Result<()> {
        if gain.dtype() != DType::F32 {
            candle_core::bail!("rms norm: the gain must be f32")
        }
        suffix(x.dtype()).map(|_| ())
    }

    pub fn forward(x: &CudaStorage, xl: &Layout, gain: &CudaStorage, gl: &Layout, d: usize, eps: f32) -> Result<(CudaStorage, Tensor)> {
        check(x, gain)?;
        let dev = x.device.clone();
        let n = xl.shape().elem_count();
        let rows = n / d.max(1);
        let (y, yp) = alloc(&dev, x.dtype(), n)?;
        let r = Tensor::zeros(rows, DType::F32, &Device::Cuda(dev.clone()))?;
        let (xp, gp, rp) = (storage_addr(x, xl)?, storage_addr(gain, gl)?, tensor_addr(&r)?);
        let f = dev.get_or_load_custom_func(&format!("zoo_rms_fwd_{}", suffix(x.dtype())?), MODULE, PTX)?;
        let (n32, d32) = (rows as i32, d as i32);
        let mut b = f.builder();
        b.arg(&xp).arg(&gp).arg(&yp).arg(&rp).arg(&n32).arg(&d32).arg(&eps);
        // SAFETY: x and y hold rows·d elements, the gain d f32, r rows f32; a warp per row.
        unsafe { b.launch(rows_cfg(rows)) }.w()?;
        Ok((y, r))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn dx(x: &CudaStorage, xl: &Layout, gain: &CudaStorage, gl: &Layout, g: &CudaStorage, gdl: &Layout, r: &Tensor, d: usize) -> Result<CudaStorage> {
        check(x, gain)?;
        if g.dtype() != x.dtype() {
            candle_core::bail!("rms norm: gradient {:?} for input {:?}", g.dtype(), x.dtype())
        }
        let dev = x.device.clone();
        let n = xl.shape().elem_count();
        let rows = n / d.max(1);
        let (dx, dp) = alloc(&dev, x.dtype(), n)?;
        let (xp, wp, gp, rp) = (storage_addr(x, xl)?, storage_addr(gain, gl)?, storage_addr(g, gdl)?, tensor_addr(r)?);
        let f = dev.get_or_load_custom_func(&format!("zoo_rms_dx_{}", suffix(x.dtype())?), MODULE, PTX)?;
        let (n32, d32) = (rows as i32, d as i32);
        let mut b = f.builder();
        b.arg(&xp).arg(&wp).arg(&gp).arg(&rp).arg(&dp).arg(&n32).arg(&d32);
        // SAFETY: x, g and dx hold rows·d elements, the gain d f32, r rows f32; a warp per row.
        unsafe { b.launch(rows_cfg(rows)) }.w()?;
        Ok(dx)
    }

    pub fn dw(x: &CudaStorage, xl: &Layout, g: &CudaStorage, gdl: &Layout, r: &Tensor, d: usize) -> Result<CudaStorage> {
        if g.dtype() != x.dtype() {
            candle_core::bail!("rms norm: gradient {:?} for input {:?}", g.dtype(), x.dtype())
        }
        let dev = x.device.clone();
        let rows = xl.shape().elem_count() / d.max(1);
        let (per, chunks) = chunking(rows);
        let (part, pp) = alloc(&dev, DType::F32, chunks * d)?;
        let (xp, gp, rp) = (storage_addr(x, xl)?, storage_addr(g, gdl)?, tensor_addr(r)?);
        let f = dev.get_or_load_custom_func(&format!("zoo_rms_dw_{}", suffix(x.dtype())?), MODULE, PTX)?;
        let (n32, d32, c32) = (rows as i32, d as i32, per as i32);
        let threads = d.div_ceil(32).clamp(1, THREADS / 32) * 32;
        let cfg = LaunchConfig { grid_dim: (d.div_ceil(threads) as u32, chunks as u32, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 };
        let mut b = f.builder();
        b.arg(&xp).arg(&gp).arg(&rp).arg(&pp).arg(&n32).arg(&d32).arg(&c32);
        // SAFETY: x and g hold rows·d elements, r rows f32, part chunks·d f32.
        unsafe { b.launch(cfg) }.w()?;
        Ok(part)
    }
}
