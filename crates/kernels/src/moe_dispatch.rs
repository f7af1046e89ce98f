//! The data movement of grouped MoE dispatch (Lepikhin et al. 2020, GShard; Fedus et al. 2021,
//! Switch Transformer: tokens sorted into per-expert rows and the outputs combined back with their
//! gate weights) as two gather ops, each one pass:
//!
//! - [`gather_sum`]: `out[i] = Σ_{j<m} c_ij · src[idx[i·m + j]]`, skipping indices past `src`'s
//!   rows, with `c_ij` 1, a weight per term, or a weight gathered by a second index. With m = 1 it
//!   is the gather of tokens into rows (and the combine's backward), with m = k the weighted
//!   combine (and the gather's backward).
//! - [`gather_dot`]: `out[i] = ⟨a[i / k], b[idx[i]]⟩`, the gradient of the combine's weights.
//!
//! On CUDA each is one kernel (`src/cuda/moe_dispatch.cu`, f32 sums; zoo-moe's default there,
//! [`enabled`]) in place of candle's
//! `cat` (a zero row for the padding index) + `index_select` + `broadcast_mul` + `sum`: in an
//! `ncu` trace of an E8 k2 LM step (8 layers, d 512, 8192 tokens, H100) those four took 47 of the
//! 79 ms of GPU time that the MoE run spent beyond its dense twin's over 3 steps and 2 evaluations.
//! The CPU form is a plain loop: the semantics, tested against the composition.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use zoo_kernels::moe_dispatch::{gather_dot, gather_sum, Weights};
//! let src = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)?;
//! // Rows 1, 0 and a padding index (2: past src's rows), one term each.
//! let idx = Tensor::new(&[1u32, 0, 2], &Device::Cpu)?;
//! let y = gather_sum(&src, &idx, 1, Weights::None)?;
//! assert_eq!(y.to_vec2::<f32>()?, vec![vec![3., 4.], vec![1., 2.], vec![0., 0.]]);
//! // Two terms per output, weighted: 0.5·src[1] + 2·src[0].
//! let (idx, w) = (Tensor::new(&[1u32, 0], &Device::Cpu)?, Tensor::new(&[0.5f32, 2.], &Device::Cpu)?);
//! assert_eq!(gather_sum(&src, &idx, 2, Weights::Slot(&w))?.to_vec2::<f32>()?, vec![vec![3.5, 6.]]);
//! // ⟨a[i / 2], src[idx[i]]⟩ for a = [[1, 1]].
//! let a = Tensor::new(&[[1f32, 1.]], &Device::Cpu)?;
//! assert_eq!(gather_dot(&a, &src, &idx, 2)?.to_vec1::<f32>()?, vec![7., 3.]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{DType, Result, Tensor};

/// The coefficient of each term of [`gather_sum`].
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    /// Every term counts once.
    None,
    /// Term (i, j) is scaled by `w[i·m + j]` (w has M·m elements).
    Slot(&'a Tensor),
    /// Term (i, j) is scaled by `w[widx[i·m + j]]`, or dropped when that index is past w's end.
    Indexed(&'a Tensor, &'a Tensor),
}

/// Whether zoo-moe's dispatch moves its rows with these ops on CUDA: the default since stop 37
/// (`ZOO_MOE_DISPATCH_KERNELS=0` opts out), when zoo-moe's `grouped_dispatch_equals_the_loop_on_cuda`
/// (every one of their five uses, forward and backward, against the per-expert loop, dropped
/// slots included) passed on an H100 and the E8 k2 LM's train step of `configs/moe-bench-512.toml`
/// took 45.4 ms against 47.2 with the composition (medians of 3 alternating rounds,
/// `results/bench/moe-dispatch-ab-93165cf`; on another H100 34.2 against 41.9,
/// `results/bench/moe-dispatch-ab`). Result JSONs record it as `moe_dispatch`.
pub fn enabled() -> bool {
    std::env::var("ZOO_MOE_DISPATCH_KERNELS").as_deref() != Ok("0")
}

/// Whether the ops (CPU form and kernels) take elements of `dt`: f32, bf16, f16.
pub fn supports(dt: DType) -> bool {
    matches!(dt, DType::F32 | DType::BF16 | DType::F16)
}

fn check_idx(idx: &Tensor, op: &str) -> Result<usize> {
    if idx.dtype() != DType::U32 || idx.rank() != 1 {
        candle_core::bail!("{op}: indices {:?} {:?}, want (n,) u32", idx.dims(), idx.dtype());
    }
    idx.dim(0)
}

/// `out[i] = Σ_{j<m} c_ij · src[idx[i·m + j]]`: src (S, d), idx (M·m,) u32 -> (M, d) in src's
/// dtype; an index ≥ S adds nothing. Not differentiable (zoo-moe's `dispatch::Plan` builds both
/// passes from it).
pub fn gather_sum(src: &Tensor, idx: &Tensor, m: usize, w: Weights) -> Result<Tensor> {
    let (s, d) = src.dims2()?;
    let len = check_idx(idx, "gather_sum")?;
    if m == 0 || !len.is_multiple_of(m) {
        candle_core::bail!("gather_sum: {len} indices in groups of {m}");
    }
    match w {
        Weights::Slot(w) if w.elem_count() != len => {
            candle_core::bail!("gather_sum: {} weights for {len} terms", w.elem_count())
        }
        Weights::Indexed(_, wi) if check_idx(wi, "gather_sum")? != len => {
            candle_core::bail!("gather_sum: {} weight indices for {len} terms", wi.dim(0)?)
        }
        _ => {}
    }
    let rows = len / m;
    match src.device() {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => cuda::gather_sum(dev, src, idx, m, w, rows, s, d),
        _ => cpu_gather_sum(src, idx, m, w, rows, s, d),
    }
}

/// `out[i] = ⟨a[i / k], b[idx[i]]⟩`: a (N, d), b (R, d), idx (N·k,) u32 -> (N·k,) in a's dtype
/// (f32 sums); 0 where idx[i] ≥ R. Not differentiable.
pub fn gather_dot(a: &Tensor, b: &Tensor, idx: &Tensor, k: usize) -> Result<Tensor> {
    let (n, d) = a.dims2()?;
    let (r, db) = b.dims2()?;
    let len = check_idx(idx, "gather_dot")?;
    if db != d || k == 0 || len != n * k || a.dtype() != b.dtype() {
        candle_core::bail!("gather_dot: a {:?} {:?}, b {:?} {:?}, {len} indices, k = {k}", a.dims(), a.dtype(), b.dims(), b.dtype());
    }
    match a.device() {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => cuda::gather_dot(dev, a, b, idx, k, len, d, r),
        _ => {
            let (av, bv, iv) = (f32s(a)?, f32s(b)?, idx.to_vec1::<u32>()?);
            let out: Vec<f32> = iv
                .iter()
                .enumerate()
                .map(|(i, &row)| {
                    let row = row as usize;
                    if row >= r {
                        return 0.0;
                    }
                    let (x, y) = (&av[(i / k) * d..(i / k + 1) * d], &bv[row * d..(row + 1) * d]);
                    x.iter().zip(y).map(|(p, q)| p * q).sum()
                })
                .collect();
            Tensor::from_vec(out, len, a.device())?.to_dtype(a.dtype())
        }
    }
}

fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

#[allow(clippy::too_many_arguments)]
fn cpu_gather_sum(src: &Tensor, idx: &Tensor, m: usize, w: Weights, rows: usize, s: usize, d: usize) -> Result<Tensor> {
    let (sv, iv) = (f32s(src)?, idx.to_vec1::<u32>()?);
    let coef: Box<dyn Fn(usize) -> f32> = match w {
        Weights::None => Box::new(|_| 1.0),
        Weights::Slot(w) => {
            let wv = f32s(w)?;
            Box::new(move |a| wv[a])
        }
        Weights::Indexed(w, wi) => {
            let (wv, wiv) = (f32s(w)?, wi.to_vec1::<u32>()?);
            Box::new(move |a| wv.get(wiv[a] as usize).copied().unwrap_or(0.0))
        }
    };
    let mut out = vec![0f32; rows * d];
    for (i, o) in out.chunks_mut(d.max(1)).enumerate().take(rows) {
        for j in 0..m {
            let r = iv[i * m + j] as usize;
            if r >= s {
                continue;
            }
            let c = coef(i * m + j);
            for (ov, &x) in o.iter_mut().zip(&sv[r * d..(r + 1) * d]) {
                *ov += c * x;
            }
        }
    }
    Tensor::from_vec(out, (rows, d), src.device())?.to_dtype(src.dtype())
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::Weights;
    use crate::cuda_addr::{alloc, suffix, tensor_addr};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{Result, Shape, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/moe_dispatch.ptx"));
    const MODULE: &str = "zoo_moe_dispatch";

    fn wrap(cs: candle_core::CudaStorage, shape: Shape) -> Tensor {
        Tensor::from_storage(candle_core::Storage::Cuda(cs), shape, candle_core::op::BackpropOp::none(), false)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn gather_sum(dev: &CudaDevice, src: &Tensor, idx: &Tensor, m: usize, w: Weights, rows: usize, s: usize, d: usize) -> Result<Tensor> {
        let dt = src.dtype();
        let (src, idx) = (src.contiguous()?, idx.contiguous()?);
        let (mode, wt, wi) = match w {
            Weights::None => (0i32, None, None),
            Weights::Slot(w) => (1, Some(w.to_dtype(dt)?.flatten_all()?.contiguous()?), None),
            Weights::Indexed(w, wi) => (2, Some(w.to_dtype(dt)?.flatten_all()?.contiguous()?), Some(wi.contiguous()?)),
        };
        let n_w = wt.as_ref().map_or(0, |w| w.elem_count()) as u32;
        let total = rows * d;
        let (out, op) = alloc(dev, dt, total)?;
        let f = dev.get_or_load_custom_func(&format!("zoo_moe_gather_sum_{}", suffix(dt)?), MODULE, PTX)?;
        let (sp, ip) = (tensor_addr(&src)?, tensor_addr(&idx)?);
        let wp = match &wt {
            Some(w) => tensor_addr(w)?,
            None => 0u64,
        };
        let wip = match &wi {
            Some(w) => tensor_addr(w)?,
            None => 0u64,
        };
        let (m64, m32, d32, s32) = (rows as i64, m as i32, d as i32, s as u32);
        let mut b = f.builder();
        b.arg(&sp).arg(&ip).arg(&wp).arg(&wip).arg(&op).arg(&m64).arg(&m32).arg(&d32).arg(&s32).arg(&n_w).arg(&mode);
        let blocks = total.div_ceil(256).clamp(1, 1 << 20) as u32;
        if total > 0 {
            // SAFETY: src holds S·d, idx M·m, w (modes 1, 2) M·m or n_w elements and widx M·m
            // u32; out M·d elements, each written once; the kernel reads only below those bounds.
            unsafe { b.launch(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.w()?;
        }
        Ok(wrap(out, Shape::from((rows, d))))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn gather_dot(dev: &CudaDevice, a: &Tensor, b: &Tensor, idx: &Tensor, k: usize, len: usize, d: usize, r: usize) -> Result<Tensor> {
        let dt = a.dtype();
        let (a, b, idx) = (a.contiguous()?, b.contiguous()?, idx.contiguous()?);
        let (out, op) = alloc(dev, dt, len)?;
        let f = dev.get_or_load_custom_func(&format!("zoo_moe_gather_dot_{}", suffix(dt)?), MODULE, PTX)?;
        let (ap, bp, ip) = (tensor_addr(&a)?, tensor_addr(&b)?, tensor_addr(&idx)?);
        let (n64, k32, d32, r32) = (len as i64, k as i32, d as i32, r as u32);
        let mut lb = f.builder();
        lb.arg(&ap).arg(&bp).arg(&ip).arg(&op).arg(&n64).arg(&k32).arg(&d32).arg(&r32);
        // A warp per output, 8 per block.
        let blocks = len.div_ceil(8).max(1) as u32;
        if len > 0 {
            // SAFETY: a holds (len / k)·d, b R·d elements, idx len u32; out len elements, one per warp.
            unsafe { lb.launch(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.w()?;
        }
        Ok(wrap(out, Shape::from(len)))
    }
}
