//! The delta rule of DeltaNet and Gated DeltaNet, one step after another with the state in
//! registers, forward and backward (fla's `fused_recurrent_delta_rule` layout; the recurrence is
//! eq. 1 of Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
//! Sequence Length", with the gate of Yang et al. 2025, "Gated Delta Networks", eq. 10):
//!
//! `S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,   o_t = S_tᵀ q_t`
//!
//! per (batch, head), S of (d_k, d_v), α_t = e^{g_t} one decay per head and step (or 1). Written
//! as the kernel computes it, with S̃ = α_t S_{t−1}: `w = S̃ᵀ k_t`, `u = β_t (v_t − w)`,
//! `S_t = S̃ + k_t uᵀ`. The backward walks time in reverse with dS (the gradient of S_t):
//!
//! - `dS += q_t dO_tᵀ`, `dq_t = S_t dO_t`, `du = dSᵀ k_t`, `dv_t = β_t du`,
//!   `dβ_t = du · (v_t − w)`, `dw = −β_t du`;
//! - `dk_t = dS u + S̃ dw`, `dS̃ = dS + k_t dwᵀ`, `dg_t = α_t Σ S_{t−1} ⊙ dS̃`, and
//!   `dS ← α_t dS̃` for step t − 1.
//!
//! The states S_{t−1} it needs are recomputed: one forward pass keeps the state at every 16th
//! step, then each 16-step chunk is replayed from its checkpoint. The candle form of the same map,
//! `zoo-linear-attention`'s chunked WY form, launches dozens of small ops per chunk; here each pass
//! is one kernel. Everything runs in f32 from a zero state (the training and scoring forward;
//! prefill with a cache and decoding keep the chunked and one-step forms). The CPU form of the op
//! runs the same equations, the (batch, head) sequences in parallel and the backward from the same
//! 16-step checkpoints; it is the CPU's training path (see [`unsupported`]) and is tested against
//! candle's autograd of the naive recurrence; the CUDA kernels (`src/cuda/delta_scan.cu`) are tested against the CPU form on
//! the GPU machine.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! // One head, d_k = d_v = 1, k = 1, β = 0.5, v = [2, 2]: S = 1, then 1 + 0.5 (2 − 1) = 1.5.
//! let one = Tensor::ones((1, 1, 2, 1), candle_core::DType::F32, &Device::Cpu)?;
//! let beta = (&one * 0.5)?;
//! let o = zoo_kernels::delta_scan::delta_scan(&one, &one, &(&one * 2.0)?, &beta, None)?;
//! assert_eq!(o.flatten_all()?.to_vec1::<f32>()?, vec![1.0, 1.5]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// The largest key width the kernels take (four threads of 32 state rows per column).
pub const MAX_DK: usize = 128;

/// Why the fused kernel cannot run here (`None`: it can): the device, or a shape it does not take.
/// As the linear scan's, the CPU form also runs on the CPU, where it beats the chunked WY
/// composition (`examples/scan_cpu.rs` of zoo-linear-attention); `ZOO_KERNELS=naive` keeps the
/// composition everywhere.
pub fn unsupported(q: &Tensor, k: &Tensor, v: &Tensor, beta: &Tensor, g: Option<&Tensor>) -> Option<String> {
    if let Some(why) = crate::unavailable_unless_cpu_form(q.device(), true) {
        return Some(why);
    }
    shape_problem(q, k, v, beta, g)
}

fn shape_problem(q: &Tensor, k: &Tensor, v: &Tensor, beta: &Tensor, g: Option<&Tensor>) -> Option<String> {
    let (Ok((b, h, t, dk)), Ok(kd), Ok((vb, vh, vt, dv))) = (q.dims4(), k.dims4(), v.dims4()) else {
        return Some("q, k, v must be (B, H, T, d)".into());
    };
    if kd != (b, h, t, dk) || (vb, vh, vt) != (b, h, t) {
        return Some(format!("shapes q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims()));
    }
    if beta.dims() != [b, h, t, 1] {
        return Some(format!("β {:?} for q {:?} (one per head and step: (B, H, T, 1))", beta.dims(), q.dims()));
    }
    if let Some(g) = g {
        if g.dims() != [b, h, t, 1] {
            return Some(format!("gate {:?} for q {:?} (one log-decay per head and step: (B, H, T, 1))", g.dims(), q.dims()));
        }
    }
    if dk > MAX_DK {
        return Some(format!("d_k = {dk} > {MAX_DK}"));
    }
    if b * h * t * (2 * dk + 2).max(dv) > i32::MAX as usize {
        return Some("too many elements".into());
    }
    None
}

/// q, k (B, H, T, d_k), v (B, H, T, d_v), β (B, H, T, 1), g: log-decays (B, H, T, 1) or none.
/// Returns o (B, H, T, d_v) in f32, differentiable in all five; the recurrence starts from a zero
/// state. Inputs of any float type are read as f32.
pub fn delta_scan(q: &Tensor, k: &Tensor, v: &Tensor, beta: &Tensor, g: Option<&Tensor>) -> Result<Tensor> {
    if let Some(why) = shape_problem(q, k, v, beta, g) {
        candle_core::bail!("delta scan: {why}")
    }
    let f = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    // One row [q | k | β | g] per step, so that one two-input op is differentiable in all five.
    let mut parts = vec![f(q)?, f(k)?, f(beta)?];
    if let Some(g) = g {
        parts.push(f(g)?);
    }
    let x = Tensor::cat(&parts, 3)?;
    let op = Delta { dk: q.dim(3)?, gated: g.is_some() };
    x.apply_op2_arc(&f(v)?, Arc::new(Box::new(op)))
}

struct Delta {
    dk: usize,
    gated: bool,
}

/// Sizes of one call: batch·heads, steps, key and value widths, row width of x.
#[derive(Clone, Copy)]
struct Dims {
    bh: usize,
    t: usize,
    dk: usize,
    dv: usize,
    ws: usize,
}

impl Delta {
    fn dims(&self, v: &Layout) -> Result<Dims> {
        let (b, h, t, dv) = v.shape().dims4()?;
        Ok(Dims { bh: b * h, t, dk: self.dk, dv, ws: 2 * self.dk + 1 + usize::from(self.gated) })
    }
}

/// Steps between the CPU backward's state checkpoints (as the kernels' `TT`).
const CPU_CHUNK: usize = 16;

/// One step of the recurrence on a state `s` (d_k × d_v, row-major) entering step t: decays it,
/// writes `w = S̃ᵀ k` and `u = β (v − w)` into the given buffers and adds `k uᵀ`. With `q`, also
/// returns `o = S_tᵀ q` into `o` (added to it).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn cpu_step(s: &mut [f32], row: &[f32], v: &[f32], n: Dims, gated: bool, w: &mut [f32], u: &mut [f32], o: Option<&mut [f32]>) {
    let (dk, dv) = (n.dk, n.dv);
    let (q, k, b) = (&row[..dk], &row[dk..2 * dk], row[2 * dk]);
    let a = if gated { row[2 * dk + 1].exp() } else { 1.0 };
    w.fill(0.0);
    for (si, &ki) in s.chunks_exact_mut(dv).zip(k) {
        if gated {
            si.iter_mut().for_each(|e| *e *= a);
        }
        w.iter_mut().zip(si.iter()).for_each(|(wj, &e)| *wj += ki * e);
    }
    u.iter_mut().zip(v).zip(w.iter()).for_each(|((uj, &vj), &wj)| *uj = b * (vj - wj));
    let mut o = o;
    for ((si, &ki), &qi) in s.chunks_exact_mut(dv).zip(k).zip(q) {
        si.iter_mut().zip(u.iter()).for_each(|(e, &uj)| *e += ki * uj);
        if let Some(o) = o.as_deref_mut() {
            o.iter_mut().zip(si.iter()).for_each(|(oj, &e)| *oj += qi * e);
        }
    }
}

/// The CPU forward: o (bh, t, dv), the (batch, head) sequences in parallel.
fn cpu_forward(x: &[f32], v: &[f32], n: Dims, gated: bool) -> Vec<f32> {
    use rayon::prelude::*;
    let Dims { t: tl, dk, dv, ws, .. } = n;
    let mut out = vec![0f32; n.bh * tl * dv];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(tl * dv).enumerate().for_each(|(b, ob)| {
        crate::cpu::simd(|| {
            let (mut s, mut w, mut u) = (vec![0f32; dk * dv], vec![0f32; dv], vec![0f32; dv]);
            for (t, o) in ob.chunks_exact_mut(dv).enumerate() {
                let r = b * tl + t;
                cpu_step(&mut s, &x[r * ws..(r + 1) * ws], &v[r * dv..(r + 1) * dv], n, gated, &mut w, &mut u, Some(o));
            }
        })
    });
    out
}

/// The CPU backward: (dx rows [dq | dk | dβ | dg], dv), the (batch, head) sequences in parallel.
/// As the kernels do, the forward keeps the state at every 16th step and each 16-step chunk is
/// replayed from its checkpoint, so memory does not grow with T·d_k·d_v.
fn cpu_backward(x: &[f32], v: &[f32], d_o: &[f32], n: Dims, gated: bool) -> (Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let Dims { bh, t: tl, dk, dv, ws } = n;
    let (mut dx, mut dvv) = (vec![0f32; bh * tl * ws], vec![0f32; bh * tl * dv]);
    if dvv.is_empty() {
        return (dx, dvv);
    }
    let sz = dk * dv;
    dx.par_chunks_mut(tl * ws).zip(dvv.par_chunks_mut(tl * dv)).enumerate().for_each(|(b, (dxb, dvb))| {
        crate::cpu::simd(|| {
            let row = |t: usize| &x[(b * tl + t) * ws..(b * tl + t + 1) * ws];
            let vrow = |t: usize| &v[(b * tl + t) * dv..(b * tl + t + 1) * dv];
            // The state entering each chunk.
            let (mut s, mut w, mut u) = (vec![0f32; sz], vec![0f32; dv], vec![0f32; dv]);
            let mut ckpt = Vec::with_capacity(tl.div_ceil(CPU_CHUNK) * sz);
            for t in 0..tl {
                if t % CPU_CHUNK == 0 {
                    ckpt.extend_from_slice(&s);
                }
                cpu_step(&mut s, row(t), vrow(t), n, gated, &mut w, &mut u, None);
            }
            // Per chunk, replayed: states[i] enters step t0 + i; w, u of each step.
            let mut states = vec![0f32; CPU_CHUNK * sz];
            let (mut ws_, mut us) = (vec![0f32; CPU_CHUNK * dv], vec![0f32; CPU_CHUNK * dv]);
            let (mut ds, mut du, mut dw) = (vec![0f32; sz], vec![0f32; dv], vec![0f32; dv]);
            for c in (0..tl.div_ceil(CPU_CHUNK)).rev() {
                let (t0, t1) = (c * CPU_CHUNK, ((c + 1) * CPU_CHUNK).min(tl));
                s.copy_from_slice(&ckpt[c * sz..(c + 1) * sz]);
                for t in t0..t1 {
                    let i = t - t0;
                    states[i * sz..(i + 1) * sz].copy_from_slice(&s);
                    let (wi, ui) = (&mut ws_[i * dv..(i + 1) * dv], &mut us[i * dv..(i + 1) * dv]);
                    cpu_step(&mut s, row(t), vrow(t), n, gated, wi, ui, None);
                }
                for t in (t0..t1).rev() {
                    let i = t - t0;
                    let r = row(t);
                    let (q, k, beta) = (&r[..dk], &r[dk..2 * dk], r[2 * dk]);
                    let a = if gated { r[2 * dk + 1].exp() } else { 1.0 };
                    let (w, u) = (&ws_[i * dv..(i + 1) * dv], &us[i * dv..(i + 1) * dv]);
                    let sp = &states[i * sz..(i + 1) * sz];
                    let dor = &d_o[(b * tl + t) * dv..(b * tl + t + 1) * dv];
                    let dxr = &mut dxb[t * ws..(t + 1) * ws];
                    // dS += q dOᵀ; dq = S_t dO = α S_{t−1} dO + k (u · dO); du = dSᵀ k.
                    let udo = crate::cpu::dot(u, dor);
                    du.fill(0.0);
                    for (((dsi, spi), &qi), (&ki, dqi)) in ds.chunks_exact_mut(dv).zip(sp.chunks_exact(dv)).zip(q).zip(k.iter().zip(dxr[..dk].iter_mut())) {
                        dsi.iter_mut().zip(dor).for_each(|(e, &dj)| *e += qi * dj);
                        *dqi = a * crate::cpu::dot(spi, dor) + ki * udo;
                        du.iter_mut().zip(dsi.iter()).for_each(|(d, &e)| *d += e * ki);
                    }
                    let dvr = &mut dvb[t * dv..(t + 1) * dv];
                    let mut dbeta = 0f32;
                    for j in 0..dv {
                        dvr[j] = beta * du[j];
                        dbeta += du[j] * (vrow(t)[j] - w[j]);
                        dw[j] = -beta * du[j];
                    }
                    dxr[2 * dk] = dbeta;
                    // dk = dS u + S̃ dw; dS̃ = dS + k dwᵀ; dα = Σ S_{t−1} ⊙ dS̃; dS ← α dS̃.
                    let mut dal = 0f32;
                    for ((dsi, spi), (&ki, dki)) in ds.chunks_exact_mut(dv).zip(sp.chunks_exact(dv)).zip(k.iter().zip(dxr[dk..2 * dk].iter_mut())) {
                        *dki = crate::cpu::dot(dsi, u) + a * crate::cpu::dot(spi, &dw);
                        dsi.iter_mut().zip(dw.iter()).for_each(|(e, &dwj)| *e += ki * dwj);
                        dal += crate::cpu::dot(spi, dsi);
                        dsi.iter_mut().for_each(|e| *e *= a);
                    }
                    if gated {
                        dxr[2 * dk + 1] = a * dal;
                    }
                }
            }
        })
    });
    (dx, dvv)
}

impl CustomOp2 for Delta {
    fn name(&self) -> &'static str {
        "zoo-delta-scan"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = self.dims(l2)?;
        let (x, v) = (crate::cpu_f32(s1, l1, "delta scan")?, crate::cpu_f32(s2, l2, "delta scan")?);
        Ok((CpuStorage::F32(cpu_forward(&x, &v, n, self.gated)), l2.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda_addr::storage_addr;
        let n = self.dims(l2)?;
        let o = cuda::forward(&s1.device, n, self.gated, storage_addr(s1, l1)?, storage_addr(s2, l2)?)?;
        Ok((o, l2.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, v: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = self.dims(v.layout())?;
        let d_o = grad.to_dtype(DType::F32)?.contiguous()?;
        let (dx, dv) = if x.device().is_cuda() {
            #[cfg(feature = "cuda")]
            {
                cuda::backward(x, v, &d_o, n, self.gated)?
            }
            #[cfg(not(feature = "cuda"))]
            candle_core::bail!("delta scan: CUDA tensors in a build without the cuda feature")
        } else {
            let vec = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            let (dx, dv) = cpu_backward(&vec(x)?, &vec(v)?, &vec(&d_o)?, n, self.gated);
            (Tensor::from_vec(dx, x.shape(), x.device())?, Tensor::from_vec(dv, v.shape(), v.device())?)
        };
        Ok((Some(dx), Some(dv)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::Dims;
    use crate::cuda_addr::tensor_addr;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, CudaStorage, Result, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/delta_scan.ptx"));
    const MODULE: &str = "zoo_delta";
    /// delta_scan.cu: threads per block, state rows per thread, steps per checkpoint.
    const NT: usize = 64;
    const RPT: usize = 32;
    const TT: usize = 16;

    /// `struct Delta` of delta_scan.cu.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Params {
        x: u64,
        ws: i32,
        v: u64,
        dout: u64,
        out: u64,
        part: u64,
        ckpt: u64,
        hist: u64,
        bh: i32,
        t: i32,
        dk: i32,
        dv: i32,
        gated: i32,
        tiles: i32,
    }
    // SAFETY: plain old data with the C layout of `struct Delta`.
    unsafe impl DeviceRepr for Params {}

    /// Threads per state column: the smallest of 1, 2, 4 with P·32 ≥ d_k.
    fn lanes(dk: usize) -> usize {
        match dk {
            0..=32 => 1,
            33..=64 => 2,
            _ => 4,
        }
    }

    fn params(n: Dims, gated: bool, x: u64, v: u64) -> (Params, usize, usize) {
        let p = lanes(n.dk);
        let tiles = n.dv.div_ceil(NT / p);
        let params = Params {
            x,
            ws: n.ws as i32,
            v,
            dout: 0,
            out: 0,
            part: 0,
            ckpt: 0,
            hist: 0,
            bh: n.bh as i32,
            t: n.t as i32,
            dk: n.dk as i32,
            dv: n.dv as i32,
            gated: gated as i32,
            tiles: tiles as i32,
        };
        (params, p, tiles)
    }

    fn launch(dev: &CudaDevice, name: &str, p: &Params, grid: (u32, u32)) -> Result<()> {
        let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let cfg = LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (NT as u32, 1, 1), shared_mem_bytes: 0 };
        let mut b = f.builder();
        b.arg(p);
        // SAFETY: x holds B·H·T rows of ws f32, v and dO B·H·T rows of d_v; out, part, ckpt and
        // hist are sized by the callers below for this grid.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    pub fn forward(dev: &CudaDevice, n: Dims, gated: bool, x: u64, v: u64) -> Result<CudaStorage> {
        let o = dev.alloc_zeros::<f32>(n.bh * n.t * n.dv)?;
        let stream = dev.cuda_stream();
        let (op, sync) = o.device_ptr(&stream);
        let (mut p, lanes, tiles) = params(n, gated, x, v);
        p.out = op;
        launch(dev, &format!("zoo_delta_fwd_p{lanes}"), &p, (n.bh as u32, tiles as u32))?;
        drop(sync);
        Ok(CudaStorage::wrap_cuda_slice(o, dev.clone()))
    }

    /// (dx, dv) for the contiguous f32 x = [q | k | β | g], v and dO.
    pub fn backward(x: &Tensor, v: &Tensor, d_o: &Tensor, n: Dims, gated: bool) -> Result<(Tensor, Tensor)> {
        let candle_core::Device::Cuda(dev) = x.device() else { candle_core::bail!("delta scan: not on CUDA") };
        let (dx, dv) = (x.zeros_like()?, v.zeros_like()?);
        let (mut p, lanes, tiles) = params(n, gated, tensor_addr(x)?, tensor_addr(v)?);
        let blocks = n.bh * tiles;
        let chunks = n.t.div_ceil(TT);
        let len = n.bh * n.t * n.ws;
        let ckpt = dev.alloc_zeros::<f32>(blocks * chunks * RPT * NT)?;
        let hist = dev.alloc_zeros::<f32>(blocks * TT * RPT * NT)?;
        let part = if tiles > 1 { Some(dev.alloc_zeros::<f32>(tiles * len)?) } else { None };
        let stream = dev.cuda_stream();
        let (cp, hp) = (ckpt.device_ptr(&stream), hist.device_ptr(&stream));
        let pp = part.as_ref().map(|x| x.device_ptr(&stream));
        p.dout = tensor_addr(d_o)?;
        p.out = tensor_addr(&dv)?;
        p.part = pp.as_ref().map_or(tensor_addr(&dx)?, |x| x.0);
        p.ckpt = cp.0;
        p.hist = hp.0;
        launch(dev, &format!("zoo_delta_bwd_p{lanes}"), &p, (n.bh as u32, tiles as u32))?;
        if let Some(pp) = &pp {
            crate::linear_scan::sum_tiles(dev, pp.0, tensor_addr(&dx)?, len, tiles)?;
        }
        drop((cp, hp, pp));
        drop((ckpt, hist, part));
        Ok((dx, dv))
    }
}
