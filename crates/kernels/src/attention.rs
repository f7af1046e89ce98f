//! Fused causal attention: FlashAttention-2's tiled online softmax (Dao 2023, "FlashAttention-2:
//! Faster Attention with Better Parallelism and Work Partitioning", Algorithms 1 and 2), with
//! zoo's masks: causal at absolute positions, a sliding window, learned sink slots, GQA/MQA.
//!
//! `O = softmax(scale · Q Kᵀ + mask) V` per head. The forward keeps only O and the row
//! log-sum-exp; the backward recomputes P from it (dQ over query rows, dK/dV over key rows,
//! summed over the query heads of a GQA group), so nothing of size Tq × Tk is stored. Inputs f32,
//! bf16 or f16; every sum in f32. With 16-bit inputs the matrix products run on tensor cores
//! (WMMA 16×16×16; the backward for d ≤ 128); f32 inputs and decoding steps run on CUDA cores
//! (`src/cuda/attention.cu`); the CPU
//! form of the op is a plain loop of the same algorithm's result, used to test the op's semantics
//! here against the composition (`zoo_core::attention::sdpa`), which stays the reference and the
//! CPU path of the model.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use zoo_kernels::attention::{flash_attention_op, FlashOpts};
//! let q = Tensor::ones((1, 2, 3, 32), candle_core::DType::F32, &Device::Cpu)?;
//! let v = Tensor::arange(0f32, 3.0, &Device::Cpu)?.reshape((1, 1, 3, 1))?.broadcast_as((1, 1, 3, 32))?.contiguous()?;
//! let o = flash_attention_op(&q, &q.narrow(1, 0, 1)?, &v, &FlashOpts::causal(32))?;
//! // Equal scores: query i averages the values of keys 0..=i.
//! assert_eq!(o.narrow(3, 0, 1)?.flatten_all()?.to_vec1::<f32>()?, vec![0.0, 0.5, 1.0, 0.0, 0.5, 1.0]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

const OP: &str = "flash attention";

/// Head dims the CUDA kernels are compiled for.
pub const HEAD_DIMS: [usize; 6] = [32, 64, 96, 128, 192, 256];

/// Where the queries and keys sit, and what each query may see.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlashOpts {
    /// Multiplies QKᵀ (usually 1/√d).
    pub scale: f64,
    /// Absolute position of query row 0.
    pub q_start: usize,
    /// Absolute position of the first key after the sink slots.
    pub k_start: usize,
    /// Leading key/value rows that are learned sink slots, visible to every query.
    pub n_sink: usize,
    /// Each query sees keys at positions p - window < k ≤ p.
    pub window: Option<usize>,
}

impl FlashOpts {
    /// Plain causal self-attention from position 0.
    pub fn causal(head_dim: usize) -> Self {
        Self { scale: 1.0 / (head_dim as f64).sqrt(), q_start: 0, k_start: 0, n_sink: 0, window: None }
    }

    fn visible(&self, qp: usize, c: usize) -> bool {
        if c < self.n_sink {
            return true;
        }
        let kp = self.k_start + c - self.n_sink;
        kp <= qp && self.window.is_none_or(|w| qp - kp < w)
    }
}

/// Which attention kernel set 16-bit prefill and training use on CUDA, from the environment:
/// `mma` (the default: `mma.sync` with register tiles at head dims 32-128, WMMA at other head
/// dims), `mma2` (ZOO_FLASH_MMA=2: the same with `ldmatrix` fragment loads, no mask on the tiles
/// a warp sees whole and `cp.async` double-buffered tile loads; opt-in until its check has passed
/// on the GPU), `wmma` (ZOO_FLASH_MMA=0) or
/// `simt` (ZOO_FLASH_TC=0: the CUDA-core kernels). Decoding steps and f32 always take the
/// CUDA-core kernels. Result JSONs record it beside `kernels`.
pub fn flash_kernel_set() -> &'static str {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    if var("ZOO_FLASH_TC") == "0" {
        "simt"
    } else {
        match var("ZOO_FLASH_MMA").as_str() {
            "0" => "wmma",
            "2" => "mma2",
            _ => "mma",
        }
    }
}

/// Why the fused kernel cannot run on these inputs (`None`: it can): not a CUDA build, not on
/// CUDA, `ZOO_KERNELS=naive`, dtype, head dim, head counts.
pub fn unsupported(q: &Tensor, k: &Tensor, v: &Tensor) -> Option<String> {
    if let Some(why) = crate::unavailable(q.device()) {
        return Some(why);
    }
    shape_problem(q, k, v).or_else(|| {
        let d = q.dim(3).unwrap_or(0);
        if !matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            Some(format!("dtype {:?}", q.dtype()))
        } else if !HEAD_DIMS.contains(&d) {
            Some(format!("head dim {d} (kernels for {HEAD_DIMS:?})"))
        } else {
            None
        }
    })
}

fn shape_problem(q: &Tensor, k: &Tensor, v: &Tensor) -> Option<String> {
    let (Ok((b, h, _, d)), Ok((bk, hk, tk, dk))) = (q.dims4(), k.dims4()) else {
        return Some("q and k must be (B, H, T, d)".into());
    };
    if v.dims() != k.dims() || bk != b || dk != d || hk == 0 || h % hk != 0 || tk == 0 {
        return Some(format!("shapes q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims()));
    }
    if q.dtype() != k.dtype() || k.dtype() != v.dtype() {
        return Some("q, k, v dtypes differ".into());
    }
    None
}

/// The fused op on any device (CPU: the reference loop). q (B, H, Tq, d); k, v (B, Hkv, Tk, d)
/// with the sink slots first; H a multiple of Hkv. Differentiable in q, k and v.
pub fn flash_attention_op(q: &Tensor, k: &Tensor, v: &Tensor, o: &FlashOpts) -> Result<Tensor> {
    if let Some(why) = shape_problem(q, k, v) {
        candle_core::bail!("flash attention: {why}")
    }
    let op = Flash { o: *o, lse: Mutex::new(None) };
    q.contiguous()?.apply_op3_arc(&k.contiguous()?, &v.contiguous()?, Arc::new(Box::new(op)))
}

/// The row log-sum-exps of the last forward, base 2 of the scaled scores.
enum Saved {
    Cpu(Vec<f32>),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>),
}

struct Flash {
    o: FlashOpts,
    lse: Mutex<Option<Saved>>,
}

struct Dims {
    b: usize,
    h: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    d: usize,
}

fn dims(q: &Layout, k: &Layout) -> Result<Dims> {
    let (b, h, tq, d) = q.shape().dims4()?;
    let (_, hkv, tk, _) = k.shape().dims4()?;
    Ok(Dims { b, h, hkv, tq, tk, d })
}

impl Flash {
    /// CPU forward: O (f32) and the base-2 LSE per row.
    fn cpu(&self, q: &[f32], k: &[f32], v: &[f32], n: &Dims) -> (Vec<f32>, Vec<f32>) {
        let (d, group) = (n.d, n.h / n.hkv);
        let sc = self.o.scale as f32 * std::f32::consts::LOG2_E;
        let mut out = vec![0f32; n.b * n.h * n.tq * d];
        let mut lse = vec![f32::NEG_INFINITY; n.b * n.h * n.tq];
        let mut s = vec![0f32; n.tk];
        for b in 0..n.b {
            for h in 0..n.h {
                let kv = (b * n.hkv + h / group) * n.tk * d;
                for i in 0..n.tq {
                    let row = (b * n.h + h) * n.tq + i;
                    let qr = &q[row * d..(row + 1) * d];
                    let mut m = f32::NEG_INFINITY;
                    for (c, sc_c) in s.iter_mut().enumerate() {
                        *sc_c = if self.o.visible(self.o.q_start + i, c) {
                            qr.iter().zip(&k[kv + c * d..kv + (c + 1) * d]).map(|(a, b)| a * b).sum::<f32>() * sc
                        } else {
                            f32::NEG_INFINITY
                        };
                        m = m.max(*sc_c);
                    }
                    if m == f32::NEG_INFINITY {
                        continue;
                    }
                    let mut l = 0f32;
                    let or = &mut out[row * d..(row + 1) * d];
                    for (c, &sc_c) in s.iter().enumerate() {
                        let p = (sc_c - m).exp2();
                        l += p;
                        for (o, x) in or.iter_mut().zip(&v[kv + c * d..kv + (c + 1) * d]) {
                            *o += p * x;
                        }
                    }
                    or.iter_mut().for_each(|o| *o /= l);
                    lse[row] = m + l.log2();
                }
            }
        }
        (out, lse)
    }

    /// CPU backward: dQ, dK, dV (f32).
    #[allow(clippy::too_many_arguments)]
    fn cpu_bwd(&self, q: &[f32], k: &[f32], v: &[f32], g: &[f32], lse: &[f32], dlt: &[f32], n: &Dims) -> [Vec<f32>; 3] {
        let (d, group) = (n.d, n.h / n.hkv);
        let scale = self.o.scale as f32;
        let sc = scale * std::f32::consts::LOG2_E;
        let mut dq = vec![0f32; q.len()];
        let mut dk = vec![0f32; k.len()];
        let mut dv = vec![0f32; v.len()];
        for b in 0..n.b {
            for h in 0..n.h {
                let kv = (b * n.hkv + h / group) * n.tk * d;
                for i in 0..n.tq {
                    let row = (b * n.h + h) * n.tq + i;
                    if lse[row] == f32::NEG_INFINITY {
                        continue;
                    }
                    let (qr, gr) = (&q[row * d..(row + 1) * d], &g[row * d..(row + 1) * d]);
                    for c in 0..n.tk {
                        if !self.o.visible(self.o.q_start + i, c) {
                            continue;
                        }
                        let (kr, vr) = (&k[kv + c * d..kv + (c + 1) * d], &v[kv + c * d..kv + (c + 1) * d]);
                        let s: f32 = qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * sc;
                        let p = (s - lse[row]).exp2();
                        let dp: f32 = gr.iter().zip(vr).map(|(a, b)| a * b).sum();
                        let ds = p * (dp - dlt[row]) * scale;
                        for e in 0..d {
                            dq[row * d + e] += ds * kr[e];
                            dk[kv + c * d + e] += ds * qr[e];
                            dv[kv + c * d + e] += p * gr[e];
                        }
                    }
                }
            }
        }
        [dq, dk, dv]
    }
}

impl CustomOp3 for Flash {
    fn name(&self) -> &'static str {
        "zoo-flash-attention"
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
        let n = dims(l1, l2)?;
        let (out, lse) = self.cpu(&crate::cpu_f32(s1, l1, OP)?, &crate::cpu_f32(s2, l2, OP)?, &crate::cpu_f32(s3, l3, OP)?, &n);
        *self.lse.lock().unwrap() = Some(Saved::Cpu(lse));
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(out),
            CpuStorage::BF16(_) => CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect()),
            CpuStorage::F16(_) => CpuStorage::F16(out.into_iter().map(half::f16::from_f32).collect()),
            CpuStorage::F64(_) => CpuStorage::F64(out.into_iter().map(|x| x as f64).collect()),
            _ => candle_core::bail!("flash attention: unsupported dtype"),
        };
        Ok((out, l1.shape().clone()))
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
        let n = dims(l1, l2)?;
        let (out, lse) = cuda::forward(&self.o, &n, (s1, l1), (s2, l2), (s3, l3))?;
        *self.lse.lock().unwrap() = Some(Saved::Cuda(lse));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, tq, d) = q.dims4()?;
        let (_, hkv, tk, _) = k.dims4()?;
        let n = Dims { b, h, hkv, tq, tk, d };
        let g = grad.contiguous()?;
        // D_i = rowsum(dO ∘ O) (FlashAttention-2, Alg. 2 line 4).
        let dlt = (g.to_dtype(DType::F32)? * res.to_dtype(DType::F32)?)?.sum(3)?.contiguous()?;
        let saved = self.lse.lock().unwrap();
        let (dq, dk, dv) = match saved.as_ref() {
            Some(Saved::Cpu(lse)) => {
                let f = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
                let [dq, dk, dv] = self.cpu_bwd(&f(q)?, &f(k)?, &f(v)?, &f(&g)?, lse, &dlt.flatten_all()?.to_vec1()?, &n);
                let dev = q.device();
                (Tensor::from_vec(dq, q.shape(), dev)?, Tensor::from_vec(dk, k.shape(), dev)?, Tensor::from_vec(dv, v.shape(), dev)?)
            }
            #[cfg(feature = "cuda")]
            Some(Saved::Cuda(lse)) => cuda::backward(&self.o, &n, q, k, v, &g, lse, &dlt)?,
            None => candle_core::bail!("flash attention: backward before forward"),
        };
        let dt = q.dtype();
        Ok((Some(dq.to_dtype(dt)?), Some(dk.to_dtype(dt)?), Some(dv.to_dtype(dt)?)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{Dims, FlashOpts};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Device, Layout, Result, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
    const MODULE: &str = "zoo_flash";
    const ROWS: usize = 16;
    const THREADS: u32 = 128;
    /// fwd_tc's tile sizes (attention.cu: TC_WARPS, TC_BR, TC_BC).
    const TC_WARPS: usize = 4;
    const TC_BR: usize = 16 * TC_WARPS;
    const TC_BC: usize = 64;

    /// `struct Params` of attention.cu.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Params {
        b: i32,
        h: i32,
        hkv: i32,
        tq: i32,
        tk: i32,
        q_start: i32,
        k_start: i32,
        n_sink: i32,
        window: i32,
        scale: f32,
    }
    // SAFETY: plain old data with the C layout of `struct Params`.
    unsafe impl DeviceRepr for Params {}

    /// The attention kernel family for 16-bit inputs whose tile pointers are 16-byte aligned
    /// (`tc`; the tiles are loaded 16 bytes at a time) at head dim `d`, from [`super::flash_kernel_set`]
    /// read once: `Some("mma_")` / `Some("mma2_")` for the kernels on `mma.sync` with their tiles in
    /// registers (head dims 32-128; the default since their check passed on the H200 at build
    /// dc36ff4, at 3.7-4.7x the WMMA kernels' forward TFLOP/s, results/bench/attention-h200.json),
    /// `Some("tc_")` for WMMA through shared memory (other head dims, or ZOO_FLASH_MMA=0), `None`
    /// for the CUDA-core kernels (not `tc`, or ZOO_FLASH_TC=0).
    fn tc_kind(tc: bool, d: usize) -> Option<&'static str> {
        let set = super::flash_kernel_set();
        if !tc || set == "simt" {
            return None;
        }
        Some(match set {
            "mma" if matches!(d, 32 | 64 | 96 | 128) => "mma_",
            "mma2" if matches!(d, 32 | 64 | 96 | 128) => "mma2_",
            _ => "tc_",
        })
    }

    fn params(o: &FlashOpts, n: &Dims) -> Result<Params> {
        let i = |x: usize, what: &str| -> Result<i32> {
            i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("flash attention: {what} {x} too large")))
        };
        Ok(Params {
            b: i(n.b, "batch")?,
            h: i(n.h, "heads")?,
            hkv: i(n.hkv, "kv heads")?,
            tq: i(n.tq, "queries")?,
            tk: i(n.tk, "keys")?,
            q_start: i(o.q_start, "q_start")?,
            k_start: i(o.k_start, "k_start")?,
            n_sink: i(o.n_sink, "sinks")?,
            window: i(o.window.unwrap_or(0), "window")?,
            scale: o.scale as f32,
        })
    }

    fn suffix(dt: DType) -> Result<&'static str> {
        Ok(match dt {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            t => candle_core::bail!("flash attention: no kernel for {t:?}"),
        })
    }

    use crate::cuda_addr::{storage_addr, tensor_addr};

    fn cfg(rows: usize, blocks_y: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.div_ceil(ROWS) as u32, blocks_y as u32, 1),
            block_dim: (THREADS, 1, 1),
            // 4096 f32 per staged tile pair (two tiles of 4096 / d rows), plus two rows of scalars.
            shared_mem_bytes: (2 * 4096 + 2 * 128) * 4,
        }
    }

    pub fn forward(
        o: &FlashOpts,
        n: &Dims,
        q: (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, CudaSlice<f32>)> {
        let dev = q.0.device.clone();
        let dt = q.0.dtype();
        let p = params(o, n)?;
        // Tensor cores for 16-bit inputs and more than a tile of queries (decoding steps take the
        // 16-row CUDA-core kernel); ZOO_FLASH_TC=0 turns them off (for comparisons).
        let (qp, kp, vp) = (storage_addr(q.0, q.1)?, storage_addr(k.0, k.1)?, storage_addr(v.0, v.1)?);
        let family = tc_kind(dt != DType::F32 && n.tq > ROWS && [qp, kp, vp].iter().all(|p| p % 16 == 0), n.d);
        let (tc, mma) = (family.is_some(), matches!(family, Some("mma_" | "mma2_")));
        let kind = family.unwrap_or("");
        let name = format!("zoo_flash_fwd_{kind}{}_{}", suffix(dt)?, n.d);
        let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let launch = if tc {
            let bytes = if mma {
                // fwd_mma: Q, K and V tiles in 16-bit, rows padded by 8 elements (MMA_PAD); mma2
                // double-buffers K and V.
                let kv_tiles = if kind == "mma2_" { 4 } else { 2 };
                (TC_BR + kv_tiles * TC_BC) * (n.d + 8) * 2
            } else {
                // fwd_tc: Q, K, V tiles and P in 16-bit, S and O in f32.
                (TC_BR * n.d + 2 * TC_BC * n.d + TC_WARPS * 16 * TC_BC) * 2 + (TC_WARPS * 16 * TC_BC + TC_WARPS * 16 * n.d) * 4
            };
            f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32).w()?;
            LaunchConfig {
                grid_dim: (n.tq.div_ceil(TC_BR) as u32, (n.b * n.h) as u32, 1),
                block_dim: (32 * TC_WARPS as u32, 1, 1),
                shared_mem_bytes: bytes as u32,
            }
        } else {
            cfg(n.tq, n.b * n.h)
        };
        let len = n.b * n.h * n.tq * n.d;
        let lse = dev.alloc_zeros::<f32>(n.b * n.h * n.tq)?;
        let out = match dt {
            DType::F32 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(len)? }, dev.clone()),
            DType::BF16 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::bf16>(len)? }, dev.clone()),
            _ => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::f16>(len)? }, dev.clone()),
        };
        let op = storage_addr(&out, &Layout::contiguous((len,)))?;
        let stream = dev.cuda_stream();
        let (lp, _sync) = lse.device_ptr(&stream);
        let mut b = f.builder();
        b.arg(&qp).arg(&kp).arg(&vp).arg(&op).arg(&lp).arg(&p);
        // SAFETY: q (B·H·Tq·d), k and v (B·Hkv·Tk·d) are contiguous inputs of the checked shapes;
        // out holds B·H·Tq·d elements and lse B·H·Tq; the kernel indexes within them.
        unsafe { b.launch(launch) }.w()?;
        drop(_sync);
        Ok((out, lse))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        o: &FlashOpts,
        n: &Dims,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g: &Tensor,
        lse: &CudaSlice<f32>,
        dlt: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let device = q.device().clone();
        let Device::Cuda(dev) = &device else { candle_core::bail!("flash attention: not on CUDA") };
        let dt = q.dtype();
        let p = params(o, n)?;
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let g = g.to_dtype(dt)?.contiguous()?;
        let dq = Tensor::zeros(q.shape(), DType::F32, &device)?;
        let dk = Tensor::zeros(k.shape(), DType::F32, &device)?;
        let dv = Tensor::zeros(v.shape(), DType::F32, &device)?;
        let (qp, kp, vp, gp) = (tensor_addr(&q)?, tensor_addr(&k)?, tensor_addr(&v)?, tensor_addr(&g)?);
        let (dqp, dkp, dvp, dlp) = (tensor_addr(&dq)?, tensor_addr(&dk)?, tensor_addr(&dv)?, tensor_addr(dlt)?);
        let stream = dev.cuda_stream();
        let (lp, _sync) = lse.device_ptr(&stream);
        let s = suffix(dt)?;
        // Tensor cores for 16-bit inputs with d <= 128 (shared memory of larger tiles does not fit).
        let family = tc_kind(dt != DType::F32 && n.d <= 128 && [qp, kp, vp, gp].iter().all(|p| p % 16 == 0), n.d);
        let (tc, mma) = (family.is_some(), matches!(family, Some("mma_" | "mma2_")));
        let t = family.unwrap_or("");
        let fq = dev.get_or_load_custom_func(&format!("zoo_flash_dq_{t}{s}_{}", n.d), MODULE, PTX)?;
        let fkv = dev.get_or_load_custom_func(&format!("zoo_flash_dkv_{t}{s}_{}", n.d), MODULE, PTX)?;
        let (cq, ckv) = if tc {
            let (dq_bytes, dkv_bytes) = if mma {
                // bwd_dq_mma / bwd_dkv_mma: four 64-row tiles in 16-bit with padded rows, 128 floats;
                // mma2 double-buffers the dQ kernel's K and V tiles (two more tiles) and the dK/dV
                // kernel's Q and dO tiles with their LSEs and D_i (two more tiles, 128 more floats).
                let b = |tiles: usize, floats: usize| tiles * TC_BR * (n.d + 8) * 2 + floats * 4;
                if t == "mma2_" {
                    (b(6, 2 * TC_BR), b(6, 4 * TC_BR))
                } else {
                    (b(4, 2 * TC_BR), b(4, 2 * TC_BR))
                }
            } else {
                // Shared memory of bwd_dq_tc / bwd_dkv_tc (attention.cu).
                (
                    (4 * TC_BR * n.d + TC_WARPS * 16 * TC_BC) * 2 + (TC_WARPS * 16 * TC_BC + TC_WARPS * 16 * n.d + 2 * TC_BR) * 4,
                    (4 * TC_BR * n.d + TC_WARPS * 16 * TC_BR) * 2 + (TC_WARPS * 16 * TC_BR + 2 * TC_WARPS * 16 * n.d + 2 * TC_BR) * 4,
                )
            };
            let attr = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            fq.set_attribute(attr, dq_bytes as i32).w()?;
            fkv.set_attribute(attr, dkv_bytes as i32).w()?;
            let c = |rows: usize, y: usize, bytes: usize| LaunchConfig {
                grid_dim: (rows.div_ceil(TC_BR) as u32, y as u32, 1),
                block_dim: (32 * TC_WARPS as u32, 1, 1),
                shared_mem_bytes: bytes as u32,
            };
            (c(n.tq, n.b * n.h, dq_bytes), c(n.tk, n.b * n.hkv, dkv_bytes))
        } else {
            (cfg(n.tq, n.b * n.h), cfg(n.tk, n.b * n.hkv))
        };
        let mut b = fq.builder();
        b.arg(&qp).arg(&kp).arg(&vp).arg(&gp).arg(&lp).arg(&dlp).arg(&dqp).arg(&p);
        // SAFETY: as in the forward; dq (B·H·Tq·d), dlt and lse (B·H·Tq) f32.
        unsafe { b.launch(cq) }.w()?;
        let mut b = fkv.builder();
        b.arg(&qp).arg(&kp).arg(&vp).arg(&gp).arg(&lp).arg(&dlp).arg(&dkp).arg(&dvp).arg(&p);
        // SAFETY: dk, dv (B·Hkv·Tk·d) f32; each row is written by the one thread group owning it.
        unsafe { b.launch(ckv) }.w()?;
        drop(_sync);
        Ok((dq, dk, dv))
    }
}
