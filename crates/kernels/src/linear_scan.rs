//! The gated linear recurrence of GLA, RetNet, Simple GLA / Lightning and linear attention, one
//! step after another with the state in registers, forward and backward (the layout of fla's
//! `fused_recurrent` kernels; the recurrence is eq. 3 of Yang et al. 2024, "Gated Linear
//! Attention Transformers with Hardware-Efficient Training"):
//!
//! `S_t = Diag(α_t) S_{t−1} + k_tᵀ v_t,   o_t = q_t S_t,   α_t = exp(g_t)`
//!
//! per (batch, head), with the log-decay g given per key channel (GLA), once per step (RetNet,
//! Lightning) or not at all (α = 1). The candle form of the same map, `zoo-linear-attention`'s
//! chunked recurrence, launches dozens of small ops per layer; here the whole sequence is one
//! kernel, and the backward is three more, each its own scan over time:
//!
//! - `dq_t = S_t do_t` (forward in time, the state recomputed),
//! - `dk_t = dS_t v_t`, `dv_t = dS_tᵀ k_t` (reverse in time) with
//!   `dS_t = Diag(α_{t+1}) dS_{t+1} + q_tᵀ do_t`,
//! - `dg_t = Σ_{s ≥ t} (q_s ⊙ dq_s − k_s ⊙ dk_s)` (summed over channels for a per-step gate):
//!   g_t enters exactly the terms (s < t ≤ u) that q_u's gradient counts and k_s's does not.
//!
//! Everything runs in f32 from the start of the sequence (no initial state, no final state out:
//! the training and scoring forward; prefill with a cache and decoding keep the chunked and
//! one-step forms). The CPU form of the op runs the same four scans as loops over each (batch,
//! head) sequence, in parallel; it is the CPU's training path for GLA (see [`unsupported`]) and is tested
//! here, the gate gradient included, against candle's autograd of the naive recurrence; the CUDA
//! kernels (`src/cuda/linear_scan.cu`) are tested against the CPU form on the GPU machine.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! // One head, two steps, d_k = d_v = 1, decay e^{ln 0.5}: o = [1·1, 1·(0.5·1 + 1)].
//! let one = Tensor::ones((1, 1, 2, 1), candle_core::DType::F32, &Device::Cpu)?;
//! let g = (one.clone() * 0.5f64.ln())?;
//! let o = zoo_kernels::linear_scan::linear_scan(&one, &one, &one, Some(&g))?;
//! assert_eq!(o.flatten_all()?.to_vec1::<f32>()?, vec![1.0, 1.5]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// Why the fused scan cannot run here (`None`: it can): the device, or a shape it does not take.
/// On the CPU, the op's CPU form runs in place of the chunked composition for a per-channel decay
/// (GLA), where it is 17-33× faster (the composition forms (C, C, d_k) decay tensors); with a
/// scalar decay or none the composition's matmuls are as fast (0.87-1.44×), so it keeps them
/// (`examples/scan_cpu.rs` of zoo-linear-attention). `ZOO_KERNELS=naive` keeps the composition
/// everywhere.
pub fn unsupported(q: &Tensor, k: &Tensor, v: &Tensor, g: Option<&Tensor>) -> Option<String> {
    let per_channel = g.is_some_and(|g| g.dim(3).is_ok_and(|w| w > 1));
    if let Some(why) = crate::unavailable_unless_cpu_form(q.device(), per_channel) {
        return Some(why);
    }
    shape_problem(q, k, v, g)
}

fn shape_problem(q: &Tensor, k: &Tensor, v: &Tensor, g: Option<&Tensor>) -> Option<String> {
    let (Ok((b, h, t, dk)), Ok(kd), Ok((vb, vh, vt, _))) = (q.dims4(), k.dims4(), v.dims4()) else {
        return Some("q, k, v must be (B, H, T, d)".into());
    };
    if kd != (b, h, t, dk) || (vb, vh, vt) != (b, h, t) {
        return Some(format!("shapes q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims()));
    }
    if let Some(g) = g {
        match g.dims4() {
            Ok((gb, gh, gt, gw)) if (gb, gh, gt) == (b, h, t) && (gw == 1 || gw == dk) => {}
            _ => return Some(format!("gate {:?} for q {:?} (per step: last dim 1; per channel: d_k)", g.dims(), q.dims())),
        }
    }
    if b * h * t * dk.max(v.dim(3).unwrap_or(0)) > i32::MAX as usize {
        return Some("too many elements".into());
    }
    None
}

/// q, k (B, H, T, d_k), v (B, H, T, d_v), g: log-decays (B, H, T, d_k) or (B, H, T, 1), or none.
/// Returns o (B, H, T, d_v) in f32, differentiable in q, k, v and g; the recurrence starts from a
/// zero state. Inputs of any float type are read as f32.
pub fn linear_scan(q: &Tensor, k: &Tensor, v: &Tensor, g: Option<&Tensor>) -> Result<Tensor> {
    if let Some(why) = shape_problem(q, k, v, g) {
        candle_core::bail!("linear scan: {why}")
    }
    let f = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    // The gate travels in the same rows as q ([q | g]), so that one three-input op is
    // differentiable in all four.
    let (qg, gw) = match g {
        Some(g) => (Tensor::cat(&[&f(q)?, &f(g)?], 3)?, g.dim(3)?),
        None => (f(q)?, 0),
    };
    let op = Scan { dk: q.dim(3)?, gw };
    qg.apply_op3_arc(&f(k)?, &f(v)?, Arc::new(Box::new(op)))
}

struct Scan {
    dk: usize,
    /// Gate width: 0, 1 or d_k.
    gw: usize,
}

/// Sizes of one call: batch·heads, steps, key and value widths, gate width.
#[derive(Clone, Copy)]
struct Dims {
    bh: usize,
    t: usize,
    dk: usize,
    dv: usize,
    gw: usize,
}

/// Which scan: `Col` writes d_v-wide outputs `Σ_i X[i, j] m[i]`, `Row` d_k-wide ones
/// `Σ_j X[i, j] m[j]`; the state is `X_t = Diag(A) X + l_tᵀ r_t` either way.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Col,
    Row,
}

/// A strided input: row (bh, t) starts at `off + (bh·T + t)·stride`.
#[derive(Clone, Copy)]
struct Src<'a> {
    x: &'a [f32],
    off: usize,
    stride: usize,
}

impl<'a> Src<'a> {
    /// The first `width` elements of row (bh, t) of a sequence of `t_len` steps.
    fn row(&self, t_len: usize, bh: usize, t: usize, width: usize) -> &'a [f32] {
        let a = self.off + (bh * t_len + t) * self.stride;
        &self.x[a..a + width]
    }
}

/// The CPU form of one scan (the kernels' semantics): the (batch, head) sequences in parallel on
/// rayon's pool, each one pass over its d_k × d_v state per step. Every element is computed in the
/// same order whatever the CPU (the AVX2 build of the loop only widens its vectors; no fused
/// multiply-adds), so results do not depend on the machine or the thread count.
fn cpu_scan(kind: Kind, l: Src, r: Src, m: Src, g: Option<Src>, n: Dims, forward: bool) -> Vec<f32> {
    use rayon::prelude::*;
    let width = if kind == Kind::Col { n.dv } else { n.dk };
    let mut out = vec![0f32; n.bh * n.t * width];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(n.t * width).enumerate().for_each(|(b, ob)| crate::cpu::simd(|| scan_one(kind, l, r, m, g, n, forward, b, ob)));
    out
}

/// Sequence `b` of [`cpu_scan`] into its output rows `ob` (T × width).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scan_one(kind: Kind, l: Src, r: Src, m: Src, g: Option<Src>, n: Dims, forward: bool, b: usize, ob: &mut [f32]) {
    let Dims { t: tl, dk, dv, gw, .. } = n;
    let (width, mw) = if kind == Kind::Col { (dv, dk) } else { (dk, dv) };
    let mut x = vec![0f32; dk * dv];
    let mut decay = vec![1f32; dk];
    for s in 0..tl {
        let t = if forward { s } else { tl - 1 - s };
        // The decay applied on entering step t: α_t forward, α_{t+1} in reverse (none past the end).
        let tg = if forward { t } else { t + 1 };
        let gated = match g.filter(|_| tg < tl) {
            Some(g) => {
                let gr = g.row(tl, b, tg, gw);
                if gw == 1 {
                    decay.fill(crate::cpu::exp(gr[0]));
                } else {
                    decay.iter_mut().zip(gr).for_each(|(a, &x)| *a = crate::cpu::exp(x));
                }
                true
            }
            None => false,
        };
        let (lr, rr, mr) = (l.row(tl, b, t, dk), r.row(tl, b, t, dv), m.row(tl, b, t, mw));
        let o = &mut ob[t * width..(t + 1) * width];
        for (i, xi) in x.chunks_exact_mut(dv).enumerate() {
            let li = lr[i];
            if gated {
                let a = decay[i];
                xi.iter_mut().zip(rr).for_each(|(e, &rj)| *e = *e * a + li * rj);
            } else {
                xi.iter_mut().zip(rr).for_each(|(e, &rj)| *e += li * rj);
            }
            match kind {
                Kind::Col => {
                    let mi = mr[i];
                    o.iter_mut().zip(xi.iter()).for_each(|(oj, &e)| *oj += e * mi);
                }
                Kind::Row => o[i] = crate::cpu::dot(xi, mr),
            }
        }
    }
}

impl Scan {
    fn dims(&self, k: &Layout, v: &Layout) -> Result<Dims> {
        let (b, h, t, dk) = k.shape().dims4()?;
        Ok(Dims { bh: b * h, t, dk, dv: v.shape().dims4()?.3, gw: self.gw })
    }
}

impl CustomOp3 for Scan {
    fn name(&self) -> &'static str {
        "zoo-linear-scan"
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
        let n = self.dims(l2, l3)?;
        let (qg, k, v) = (crate::cpu_f32(s1, l1, "linear scan")?, crate::cpu_f32(s2, l2, "linear scan")?, crate::cpu_f32(s3, l3, "linear scan")?);
        let w = self.dk + self.gw;
        let q = Src { x: &qg, off: 0, stride: w };
        let g = (self.gw > 0).then_some(Src { x: &qg, off: self.dk, stride: w });
        let o = cpu_scan(Kind::Col, Src { x: &k, off: 0, stride: n.dk }, Src { x: &v, off: 0, stride: n.dv }, q, g, n, true);
        Ok((CpuStorage::F32(o), l3.shape().clone()))
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
        use crate::cuda_addr::storage_addr;
        let n = self.dims(l2, l3)?;
        let (qg, k, v) = (storage_addr(s1, l1)?, storage_addr(s2, l2)?, storage_addr(s3, l3)?);
        let w = self.dk + self.gw;
        let g = (self.gw > 0).then_some((qg + 4 * self.dk as u64, w));
        let o = cuda::forward(&s1.device, n, (k, n.dk), (v, n.dv), (qg, w), g)?;
        Ok((o, l3.shape().clone()))
    }

    fn bwd(&self, qg: &Tensor, k: &Tensor, v: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = self.dims(k.layout(), v.layout())?;
        let d_o = grad.to_dtype(DType::F32)?.contiguous()?;
        let (dk_, gw, w) = (self.dk, self.gw, self.dk + self.gw);
        // dq: rows, forward (S_t do_t); dk: rows, reverse (dS_t v_t); dv: columns, reverse (dS_tᵀ k_t).
        let (dq, dk, dv) = if qg.device().is_cuda() {
            #[cfg(feature = "cuda")]
            {
                cuda::backward(qg, k, v, &d_o, n, dk_, w)?
            }
            #[cfg(not(feature = "cuda"))]
            candle_core::bail!("linear scan: CUDA tensors in a build without the cuda feature")
        } else {
            let vec = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            let (qgv, kv, vv, dov) = (vec(qg)?, vec(k)?, vec(v)?, vec(&d_o)?);
            let q = Src { x: &qgv, off: 0, stride: w };
            let g = (gw > 0).then_some(Src { x: &qgv, off: dk_, stride: w });
            let (ks, vs, dos) = (Src { x: &kv, off: 0, stride: n.dk }, Src { x: &vv, off: 0, stride: n.dv }, Src { x: &dov, off: 0, stride: n.dv });
            let dev = qg.device();
            let t = |x: Vec<f32>, like: &Tensor| Tensor::from_vec(x, like.shape(), dev);
            (
                t(cpu_scan(Kind::Row, ks, vs, dos, g, n, true), k)?,
                t(cpu_scan(Kind::Row, q, dos, vs, g, n, false), k)?,
                t(cpu_scan(Kind::Col, q, dos, ks, g, n, false), v)?,
            )
        };
        let dqg = if gw == 0 {
            dq
        } else {
            // dg_t = Σ_{s ≥ t} (q ⊙ dq − k ⊙ dk)_s: the total minus the running sum before t.
            let q = qg.narrow(3, 0, dk_)?;
            let x = ((&q * &dq)? - (k * &dk)?)?;
            let x = if gw == 1 { x.sum_keepdim(3)? } else { x };
            let dg = (x.sum_keepdim(2)?.broadcast_sub(&x.cumsum(2)?)? + &x)?;
            Tensor::cat(&[&dq, &dg], 3)?
        };
        Ok((Some(dqg), Some(dk), Some(dv)))
    }
}

/// The fixed-order tile sum, shared with the delta scan.
#[cfg(feature = "cuda")]
pub(crate) use cuda::sum_tiles;

#[cfg(feature = "cuda")]
mod cuda {
    use super::{Dims, Kind};
    use crate::cuda_addr::tensor_addr;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, CudaStorage, Result, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/linear_scan.ptx"));
    const MODULE: &str = "zoo_scan";
    /// linear_scan.cu: threads per block (owned columns or rows) and state entries per thread.
    const OWN: usize = 64;
    const REG: usize = 32;

    /// `struct Scan` of linear_scan.cu.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Params {
        l: u64,
        ls: i32,
        r: u64,
        rs: i32,
        m: u64,
        ms: i32,
        g: u64,
        gs: i32,
        gw: i32,
        out: u64,
        bh: i32,
        t: i32,
        dk: i32,
        dv: i32,
        forward: i32,
    }
    // SAFETY: plain old data with the C layout of `struct Scan`.
    unsafe impl DeviceRepr for Params {}

    /// (address, row stride in elements) of an f32 input.
    type Src = (u64, usize);

    /// Run one scan into `out` (B·H·T·width f32): the kernel writes one partial output per tile
    /// of the summed dimension, then a fixed-order sum adds them (none when there is one tile).
    #[allow(clippy::too_many_arguments)]
    fn scan(dev: &CudaDevice, kind: Kind, l: Src, r: Src, m: Src, g: Option<Src>, n: Dims, forward: bool, out: u64) -> Result<()> {
        let (owned, summed, width) = match kind {
            Kind::Col => (n.dv, n.dk, n.dv),
            Kind::Row => (n.dk, n.dv, n.dk),
        };
        let tiles = summed.div_ceil(REG);
        let len = n.bh * n.t * width;
        let part = if tiles > 1 { Some(dev.alloc_zeros::<f32>(tiles * len)?) } else { None };
        let stream = dev.cuda_stream();
        let part_ptr = part.as_ref().map(|p| p.device_ptr(&stream));
        let target = part_ptr.as_ref().map_or(out, |p| p.0);
        let p = Params {
            l: l.0,
            ls: l.1 as i32,
            r: r.0,
            rs: r.1 as i32,
            m: m.0,
            ms: m.1 as i32,
            g: g.map_or(0, |g| g.0),
            gs: g.map_or(0, |g| g.1 as i32),
            gw: if g.is_some() { n.gw as i32 } else { 0 },
            out: target,
            bh: n.bh as i32,
            t: n.t as i32,
            dk: n.dk as i32,
            dv: n.dv as i32,
            forward: forward as i32,
        };
        let name = match kind {
            Kind::Col => "zoo_scan_col",
            Kind::Row => "zoo_scan_row",
        };
        let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let cfg = LaunchConfig { grid_dim: (n.bh as u32, owned.div_ceil(OWN) as u32, tiles as u32), block_dim: (OWN as u32, 1, 1), shared_mem_bytes: 0 };
        let mut b = f.builder();
        b.arg(&p);
        // SAFETY: every input holds B·H·T rows of its stride, within which the kernel reads its
        // columns; the target holds `tiles` outputs of B·H·T·width f32.
        unsafe { b.launch(cfg) }.w()?;
        if let Some(pp) = &part_ptr {
            sum_tiles(dev, pp.0, out, len, tiles)?;
        }
        drop(part_ptr);
        drop(part);
        Ok(())
    }

    /// `out[x] = Σ_z part[z][x]` over `tiles` partial outputs of `len` f32 each, in a fixed order
    /// (so the result does not depend on scheduling); also the delta scan's tile sum.
    pub(crate) fn sum_tiles(dev: &CudaDevice, part: u64, out: u64, len: usize, tiles: usize) -> Result<()> {
        let f = dev.get_or_load_custom_func("zoo_scan_sum", MODULE, PTX)?;
        let (n64, t32) = (len as i64, tiles as i32);
        let mut b = f.builder();
        b.arg(&part).arg(&out).arg(&n64).arg(&t32);
        let blocks = len.div_ceil(256).min(65_535) as u32;
        // SAFETY: part holds tiles·len f32, out len (the caller's buffers).
        unsafe { b.launch(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.w()?;
        Ok(())
    }

    pub fn forward(dev: &CudaDevice, n: Dims, k: Src, v: Src, q: Src, g: Option<Src>) -> Result<CudaStorage> {
        let o = dev.alloc_zeros::<f32>(n.bh * n.t * n.dv)?;
        let stream = dev.cuda_stream();
        let (op, sync) = o.device_ptr(&stream);
        scan(dev, Kind::Col, k, v, q, g, n, true, op)?;
        drop(sync);
        Ok(CudaStorage::wrap_cuda_slice(o, dev.clone()))
    }

    /// (dq, dk, dv) for the contiguous f32 [q | g], k, v and dO.
    pub fn backward(qg: &Tensor, k: &Tensor, v: &Tensor, d_o: &Tensor, n: Dims, dk_: usize, w: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let candle_core::Device::Cuda(dev) = qg.device() else { candle_core::bail!("linear scan: not on CUDA") };
        let (qa, ka, va, da) = (tensor_addr(qg)?, tensor_addr(k)?, tensor_addr(v)?, tensor_addr(d_o)?);
        let q = (qa, w);
        let g = (n.gw > 0).then_some((qa + 4 * dk_ as u64, w));
        let (ks, vs, dos) = ((ka, n.dk), (va, n.dv), (da, n.dv));
        let (dq, dk, dv) = (k.zeros_like()?, k.zeros_like()?, v.zeros_like()?);
        scan(dev, Kind::Row, ks, vs, dos, g, n, true, tensor_addr(&dq)?)?;
        scan(dev, Kind::Row, q, dos, vs, g, n, false, tensor_addr(&dk)?)?;
        scan(dev, Kind::Col, q, dos, ks, g, n, false, tensor_addr(&dv)?)?;
        Ok((dq, dk, dv))
    }
}
