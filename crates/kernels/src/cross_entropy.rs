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

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// Why the fused kernel cannot run here (`None`: it can). On the CPU the op's CPU form runs (rows
/// in parallel, the gradient written in one pass), in place of the composition's passes over the
/// (B·T, V) logits; `ZOO_KERNELS=naive` keeps the composition.
pub fn unsupported(logits: &Tensor, targets: &Tensor) -> Option<String> {
    if let Some(why) = crate::unavailable_unless_cpu_form(logits.device(), true) {
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
    if targets.dims() != [n] || v == 0 {
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
        let t = targets(s2, l2, self.v)?;
        let out = nll_lse_rows(&x, t, self.v);
        let (nll, lse): (Vec<f32>, Vec<f32>) = out.chunks_exact(2).map(|o| (o[0], o[1])).unzip();
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
            x.apply_op3_no_bwd(t, &Tensor::stack(&[&lse, &g], 1)?, &NllGrad { v: self.v })?
        };
        Ok((Some(dx), None))
    }
}

/// The targets of a CPU storage (u32, contiguous), each checked to lie inside a vocabulary of `v`.
fn targets<'a>(s: &'a CpuStorage, l: &Layout, v: usize) -> Result<&'a [u32]> {
    let (a, z) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("cross-entropy: targets not contiguous".into()))?;
    let t = &s.as_slice::<u32>()?[a..z];
    if let Some(&bad) = t.iter().find(|&&ti| ti as usize >= v) {
        candle_core::bail!("cross-entropy: target {bad} outside the vocabulary of {v}")
    }
    Ok(t)
}

/// (nll, lse) of each row of x (N·V f32, targets checked), the rows in parallel.
fn nll_lse_rows(x: &[f32], t: &[u32], v: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; 2 * t.len()];
    out.par_chunks_mut(2).zip(x.par_chunks(v)).zip(t.par_iter()).with_min_len(8).for_each(|((o, row), &ti)| {
        let l = crate::cpu::simd(|| crate::cpu::logsumexp(row));
        o[0] = l - row[ti as usize];
        o[1] = l;
    });
    out
}

/// [nll, lse] (N, 2) of CPU logits (N, V) and targets, no backward: the forward of [`linear_nll`].
struct NllLse {
    v: usize,
}

impl CustomOp2 for NllLse {
    fn name(&self) -> &'static str {
        "zoo-cross-entropy-rows"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::cpu_f32(s1, l1, "cross-entropy")?;
        let t = targets(s2, l2, self.v)?;
        Ok((CpuStorage::F32(nll_lse_rows(&x, t, self.v)), Shape::from((t.len(), 2))))
    }
}

/// Rows of logits per chunk of [`linear_nll`]: about 16M logits (64 MB of f32) at a time. For the
/// 4-layer d 256 model at T 256 × 8 and vocab 32768 (4 chunks; the logits recomputed in the
/// backward, before [`linear_nll_keep_bytes`], build 4837972) the train step took 1.41-1.43 s
/// and 1.28 GB at 16M, 1.65-1.72 s at 4M (thin matmuls), 1.49 s and 1.53 GB at 64M (one chunk).
pub fn linear_nll_chunk(v: usize) -> usize {
    (16usize << 20).div_ceil(v.max(1)).max(1)
}

/// Up to this many bytes of (N, V) f32, [`linear_nll`] keeps each row's softmax − one-hot from
/// the forward for the backward, where a larger loss recomputes the logits: 1 GiB (N = 8192 rows
/// at V = 32768), unless `ZOO_CE_KEEP_BYTES` says otherwise (0: always recompute). Results:
/// results/bench/cpu-loss-keep (scripts/cpu-forms-bench.sh).
pub fn linear_nll_keep_bytes() -> usize {
    std::env::var("ZOO_CE_KEEP_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(1 << 30)
}

/// The cross-entropy fused with the LM head, on the CPU: nll (N,) of the logits `h wᵀ` for
/// h (N, d), w (V, d) (f32, CPU) and targets t (N,) u32, differentiable in h and w, made
/// [`linear_nll_chunk`] rows at a time so that the (N, V) logits never exist at once and their
/// gradient never enters the autograd's store (which would add it into a fresh (N, V) zero
/// tensor). With g the upstream gradient of row i, `dlogits[i] = g[i] · (softmax − one-hot)[i]`,
/// so `dh = g ⊙ (P w)` and `dw = Pᵀ (g ⊙ h)` for P = softmax − one-hot. Where (N, V) f32 fits in
/// [`linear_nll_keep_bytes`] the forward turns each chunk's logits into its P in place (one e^x
/// per logit) and keeps it, so the backward is the two matmuls; otherwise the forward keeps each
/// row's log-sum-exp and the backward recomputes each chunk's logits (one more matmul).
pub fn linear_nll(h: &Tensor, w: &Tensor, t: &Tensor) -> Result<Tensor> {
    let (n, v) = (h.dim(0)?, w.dim(0)?);
    linear_nll_chunked(h, w, t, linear_nll_chunk(v), n * v * 4 <= linear_nll_keep_bytes())
}

/// [`linear_nll`] with `chunk` rows of logits at a time, keeping P (`keep`) or recomputing it.
pub fn linear_nll_chunked(h: &Tensor, w: &Tensor, t: &Tensor, chunk: usize, keep: bool) -> Result<Tensor> {
    let ((n, d), (v, wd)) = (h.dims2()?, w.dims2()?);
    if d != wd || t.dims() != [n] || v == 0 || chunk == 0 || !h.device().is_cpu() || h.dtype() != DType::F32 || w.dtype() != DType::F32 {
        candle_core::bail!("linear cross-entropy: h {:?} {:?}, w {:?} {:?}, targets {:?}, chunk {chunk} (f32 on the CPU)", h.dims(), h.dtype(), w.dims(), w.dtype(), t.dims())
    }
    let (hd, wt) = (h.detach(), w.detach().t()?);
    let mut rows = Vec::with_capacity(n.div_ceil(chunk));
    let mut kept = Vec::new();
    for s in (0..n).step_by(chunk) {
        let len = chunk.min(n - s);
        let logits = hd.narrow(0, s, len)?.matmul(&wt)?;
        let tc = t.narrow(0, s, len)?.contiguous()?;
        if keep {
            let op = SoftmaxMinusOneHot { v, rows: Mutex::new(Vec::new()) };
            logits.inplace_op2(&tc, &op)?;
            let r = std::mem::take(&mut *op.rows.lock().unwrap());
            rows.push(Tensor::from_vec(r, (len, 2), h.device())?);
            kept.push(logits);
        } else {
            rows.push(logits.apply_op2_no_bwd(&tc, &NllLse { v })?);
        }
    }
    let rows = Tensor::cat(&rows, 0)?; // (N, 2): nll, lse
    let (nll, lse) = (rows.narrow(1, 0, 1)?.squeeze(1)?, rows.narrow(1, 1, 1)?.squeeze(1)?.contiguous()?);
    // The values come from the chunks above; the gradient from this op, whose forward is zero.
    let grad = h.apply_op2_arc(w, Arc::new(Box::new(LinearNllGrad { t: t.contiguous()?, lse, chunk, v, kept })))?;
    nll + grad
}

/// In place over a chunk of CPU logits (len, V) f32: each row becomes its softmax − one-hot of its
/// target (the gradient of its nll for g = 1), from one e^x per logit; [nll, lse] of each row go to
/// `rows`.
struct SoftmaxMinusOneHot {
    v: usize,
    rows: Mutex<Vec<f32>>,
}

impl candle_core::InplaceOp2 for SoftmaxMinusOneHot {
    fn name(&self) -> &'static str {
        "zoo-cross-entropy-keep"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        use rayon::prelude::*;
        let t = targets(s2, l2, self.v)?;
        let (a, z) = l1.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("cross-entropy: logits not contiguous".into()))?;
        let CpuStorage::F32(x) = s1 else { candle_core::bail!("cross-entropy: logits {:?}, not f32", s1.dtype()) };
        let mut out = vec![0f32; 2 * t.len()];
        out.par_chunks_mut(2).zip(x[a..z].par_chunks_mut(self.v)).zip(t.par_iter()).with_min_len(8).for_each(|((o, row), &ti)| {
            let xt = row[ti as usize];
            let (m, sum) = crate::cpu::simd(|| crate::cpu::exp_shifted_in_place(row));
            let lse = m + sum.ln();
            (o[0], o[1]) = (lse - xt, lse);
            let inv = 1.0 / sum;
            crate::cpu::simd(|| row.iter_mut().for_each(|p| *p *= inv));
            row[ti as usize] -= 1.0;
        });
        *self.rows.lock().unwrap() = out;
        Ok(())
    }
}

/// The gradient path of [`linear_nll`]: forward zeros (N,), backward the chunked dh and dw.
struct LinearNllGrad {
    t: Tensor,
    lse: Tensor,
    chunk: usize,
    v: usize,
    /// Each chunk's softmax − one-hot (len, V), where the forward kept them.
    kept: Vec<Tensor>,
}

impl CustomOp2 for LinearNllGrad {
    fn name(&self) -> &'static str {
        "zoo-linear-cross-entropy"
    }

    fn cpu_fwd(&self, _s1: &CpuStorage, l1: &Layout, _s2: &CpuStorage, _l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = l1.shape().dims2()?.0;
        Ok((CpuStorage::F32(vec![0f32; n]), Shape::from(n)))
    }

    fn bwd(&self, h: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (h, w) = (h.detach(), w.detach());
        let n = h.dim(0)?;
        let g = grad.to_dtype(DType::F32)?.contiguous()?;
        let wt = w.t()?;
        let mut dh = Vec::with_capacity(n.div_ceil(self.chunk));
        let mut dw: Option<Tensor> = None;
        for (i, s) in (0..n).step_by(self.chunk).enumerate() {
            let len = self.chunk.min(n - s);
            let hc = h.narrow(0, s, len)?;
            let part = if let Some(p) = self.kept.get(i) {
                let gc = g.narrow(0, s, len)?.unsqueeze(1)?;
                dh.push(p.matmul(&w)?.broadcast_mul(&gc)?);
                p.t()?.matmul(&hc.broadcast_mul(&gc)?)?
            } else {
                let logits = hc.matmul(&wt)?;
                let lg = Tensor::stack(&[&self.lse.narrow(0, s, len)?, &g.narrow(0, s, len)?], 1)?;
                let dlogits = logits.apply_op3_no_bwd(&self.t.narrow(0, s, len)?, &lg, &NllGrad { v: self.v })?;
                dh.push(dlogits.matmul(&w)?);
                dlogits.t()?.matmul(&hc)?
            };
            dw = Some(match dw {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        Ok((Some(Tensor::cat(&dh, 0)?), dw))
    }
}

/// The CPU backward: `dx[i, j] = g[i] · (e^{x[i, j] − lse[i]} − [j = t[i]])` (softmax − one-hot,
/// scaled by g) from x, t and the rows [lse, g] (N, 2), written once in x's type, the rows in
/// parallel.
struct NllGrad {
    v: usize,
}

impl candle_core::CustomOp3 for NllGrad {
    fn name(&self) -> &'static str {
        "zoo-cross-entropy-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let x = crate::cpu_f32(s1, l1, "cross-entropy backward")?;
        let t = targets(s2, l2, self.v)?;
        let lg = crate::cpu_f32(s3, l3, "cross-entropy backward")?;
        let v = self.v;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(v).zip(x.par_chunks(v)).zip(t.par_iter().zip(lg.par_chunks(2))).with_min_len(8).for_each(|((d, row), (&ti, lg))| {
            let (lse, g) = (lg[0], lg[1]);
            crate::cpu::simd(|| d.iter_mut().zip(row).for_each(|(d, &x)| *d = crate::cpu::exp(x - lse) * g));
            d[ti as usize] -= g;
        });
        Ok((crate::cpu_from_f32(dx, s1.dtype())?, l1.shape().clone()))
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
