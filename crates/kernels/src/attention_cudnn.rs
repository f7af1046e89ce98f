//! cuDNN's fused attention (its SDPA engines: FlashAttention-2/3-style kernels tuned by NVIDIA for
//! each GPU, forward with the row log-sum-exp and backward recomputing P from it) as a backend of
//! [`crate::attention`]'s op for 16-bit prefill and training on CUDA.
//!
//! Why beside our own kernels: on the H200 our `mma.sync` kernels reached 0.14-0.41× of PyTorch's
//! `scaled_dot_product_attention` (results/bench/attention-h200.json), which on Hopper runs cuDNN's
//! or FlashAttention's warp-specialised WGMMA/TMA kernels; the issue allows cuDNN's fused attention
//! where it is faster. The C++ side (`src/cudnn/sdpa.cpp`, on the cuDNN frontend's header-only
//! graph API) is compiled in by build.rs when scripts/build-cuda.sh has fetched the headers, and
//! opens `libcudnn.so.9` at run time (`ZOO_CUDNN_LIB` names another path): no link-time cuDNN, and
//! a machine without it keeps our kernels.
//!
//! What it takes (anything else runs our kernels, `attention::cuda`): bf16/f16, no sink slots, and
//! masks cuDNN expresses: causal with query row 0 at key 0 (training, q_start = k_start) or with
//! the last query at the last key (a prefill after a cache, q_start - k_start = Tk - Tq), each with
//! an optional sliding window; GQA/MQA natively; head dims cuDNN supports (it says so when building
//! the graph, and that shape then falls back with the reason noted once). Its LSE is the natural
//! log of the scaled scores, so a forward through cuDNN is always differentiated through cuDNN.

use crate::attention::{Dims, FlashOpts};
use candle_core::DType;
#[cfg(zoo_cudnn)]
use candle_core::{
    backend::BackendStorage,
    cuda_backend::cudarc::driver::{CudaSlice, DevicePtr},
    cuda_backend::WrapErr,
    CudaStorage, Device, Layout, Result, Tensor,
};
use std::ffi::{c_char, CStr};
#[cfg(zoo_cudnn)]
use std::ffi::{c_void, CString};
use std::sync::OnceLock;

/// `struct ZooSdpa` of sdpa.cpp: one call's shape and mask.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(not(zoo_cudnn), allow(dead_code))]
pub(crate) struct Sdpa {
    b: i64,
    h: i64,
    hkv: i64,
    tq: i64,
    tk: i64,
    d: i64,
    dtype: i32,
    align: i32,
    window: i64,
    scale: f32,
    device: i32,
    /// 1: the backward's deterministic algorithm ([`crate::deterministic`]).
    deterministic: i32,
}

#[cfg(zoo_cudnn)]
unsafe extern "C" {
    fn zoo_cudnn_load(path: *const c_char, version: *mut i64, err: *mut c_char, len: usize) -> i32;
    fn zoo_cudnn_sdpa_prepare(p: *const Sdpa, bwd: i32, workspace: *mut i64, err: *mut c_char, len: usize) -> i32;
    fn zoo_cudnn_sdpa_fwd(
        p: *const Sdpa,
        stream: *mut c_void,
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        o: *mut c_void,
        stats: *mut f32,
        workspace: *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn zoo_cudnn_sdpa_bwd(
        p: *const Sdpa,
        stream: *mut c_void,
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        o: *const c_void,
        d_o: *const c_void,
        stats: *const f32,
        dq: *mut c_void,
        dk: *mut c_void,
        dv: *mut c_void,
        workspace: *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> i32;
}

/// Runs one C call with an error buffer; its message on failure.
#[cfg_attr(not(zoo_cudnn), allow(dead_code))]
fn call(f: impl FnOnce(*mut c_char, usize) -> i32) -> std::result::Result<(), String> {
    let mut buf = vec![0 as c_char; 1024];
    if f(buf.as_mut_ptr(), buf.len()) == 0 {
        Ok(())
    } else {
        // SAFETY: the C side wrote a NUL-terminated message into the buffer (snprintf).
        Err(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
    }
}

/// cuDNN's version (e.g. 91300 for 9.13.0) once the library is open, or why it is not: not
/// compiled in, or `libcudnn.so.9` (`ZOO_CUDNN_LIB`) cannot be opened. Opened once per process.
pub fn available() -> std::result::Result<i64, String> {
    static LOADED: OnceLock<std::result::Result<i64, String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            #[cfg(zoo_cudnn)]
            {
                let path = CString::new(std::env::var("ZOO_CUDNN_LIB").unwrap_or_default()).map_err(|e| e.to_string())?;
                let mut version = 0i64;
                // SAFETY: path is NUL-terminated; version and the error buffer are valid for writes.
                call(|e, n| unsafe { zoo_cudnn_load(path.as_ptr(), &mut version, e, n) }).map(|_| version)
            }
            #[cfg(not(zoo_cudnn))]
            {
                Err("cuDNN attention not compiled in (build with scripts/build-cuda.sh, which fetches the cuDNN frontend's headers)".into())
            }
        })
        .clone()
}

/// The cuDNN call for these dims and mask, or why cuDNN cannot express it (the caller then runs
/// our kernels). Head dims and lengths cuDNN itself refuses are found when its graph is built.
#[cfg_attr(not(zoo_cudnn), allow(dead_code))]
pub(crate) fn plan(o: &FlashOpts, n: &Dims, dt: DType, device: usize) -> std::result::Result<Sdpa, String> {
    let dtype = match dt {
        DType::BF16 => 0,
        DType::F16 => 1,
        t => return Err(format!("dtype {t:?} (cuDNN attention takes bf16 and f16)")),
    };
    if o.n_sink > 0 {
        return Err("sink slots".into());
    }
    if n.tk < n.tq {
        return Err(format!("fewer keys ({}) than queries ({})", n.tk, n.tq));
    }
    let offset = o.q_start as i64 - o.k_start as i64;
    let align = if offset == 0 {
        1
    } else if offset == (n.tk - n.tq) as i64 {
        2
    } else {
        return Err(format!("queries from position {} over keys from {} (Tq {}, Tk {})", o.q_start, o.k_start, n.tq, n.tk));
    };
    let i = |x: usize| x as i64;
    Ok(Sdpa {
        b: i(n.b),
        h: i(n.h),
        hkv: i(n.hkv),
        tq: i(n.tq),
        tk: i(n.tk),
        d: i(n.d),
        dtype,
        align,
        window: o.window.map_or(0, |w| w as i64),
        scale: o.scale as f32,
        device: device as i32,
        deterministic: i32::from(crate::deterministic()),
    })
}

/// Device workspace for `p`'s forward (`bwd` false) or backward graph, building it if new.
#[cfg(zoo_cudnn)]
fn workspace(dev: &candle_core::CudaDevice, p: &Sdpa, bwd: bool) -> Result<Option<CudaSlice<u8>>> {
    let mut bytes = 0i64;
    // SAFETY: p and bytes are valid; the graph is built on the thread's handle (context bound).
    call(|e, n| unsafe { zoo_cudnn_sdpa_prepare(p, bwd as i32, &mut bytes, e, n) }).map_err(candle_core::Error::Msg)?;
    // SAFETY: cuDNN's scratch space, written before read by its kernels.
    Ok(if bytes > 0 { Some(unsafe { dev.alloc::<u8>(bytes as usize)? }) } else { None })
}

/// Forwards that ran through cuDNN in this process (for tests that must see it used).
pub fn forward_calls() -> u64 {
    CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg_attr(not(zoo_cudnn), allow(dead_code))]
static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The forward through cuDNN: O (B, H, Tq, d) in the inputs' dtype and the natural-log LSE per row.
/// q, k, v contiguous.
#[cfg(zoo_cudnn)]
pub(crate) fn forward(p: &Sdpa, q: (&CudaStorage, &Layout), k: (&CudaStorage, &Layout), v: (&CudaStorage, &Layout)) -> Result<(CudaStorage, CudaSlice<f32>)> {
    use crate::cuda_addr::storage_addr;
    let dev = q.0.device.clone();
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().w()?;
    let ws = workspace(&dev, p, false)?;
    let rows = (p.b * p.h * p.tq) as usize;
    let (out, op) = crate::cuda_addr::alloc(&dev, q.0.dtype(), rows * p.d as usize)?;
    // SAFETY: cuDNN writes every row's statistic.
    let stats = unsafe { dev.alloc::<f32>(rows)? };
    let (qp, kp, vp) = (storage_addr(q.0, q.1)?, storage_addr(k.0, k.1)?, storage_addr(v.0, v.1)?);
    let (sp, _s1) = stats.device_ptr(&stream);
    let wp = ws.as_ref().map_or(0, |w| w.device_ptr(&stream).0);
    let a = |x: u64| x as *mut c_void;
    // SAFETY: the buffers hold the shapes of p (checked by the caller's dims), live across the call,
    // and cuDNN's kernels are queued on candle's stream, which orders them with every other op.
    call(|e, n| unsafe {
        zoo_cudnn_sdpa_fwd(p, stream.cu_stream() as *mut c_void, a(qp), a(kp), a(vp), a(op), sp as *mut f32, a(wp), e, n)
    })
    .map_err(candle_core::Error::Msg)?;
    drop(_s1);
    drop(ws);
    CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok((out, stats))
}

/// Whether the backward of a forward that ran through cuDNN runs through cuDNN too: yes without
/// GQA/MQA; with a group of query heads per K/V head (`hkv < h`), zoo's own backward kernels (on
/// cuDNN's LSE, [`lse_base2`]) unless `ZOO_CUDNN_GQA_BWD=1`.
///
/// Why: cuDNN frontend's backward graph (`CompositeSDPABackwardNode`,
/// cudnn_frontend/node/scaled_dot_product_flash_attention.h) computes dK and dV per *query* head in
/// the inputs' 16-bit type (`dK_fullhead`, `dV_fullhead`) and then sums the group, as
/// FlashAttention-2's GQA backward does: each head's term is rounded to bf16 before the sum, whose
/// terms largely cancel. At MQA 8:1 (flash test case 3, bf16) that put dK 2.05e-2 from the f32
/// composition, over the 2e-2 bound our kernels meet; they sum the group in f32 registers. The
/// switch keeps cuDNN's faster backward for whoever prefers it.
#[cfg_attr(not(zoo_cudnn), allow(dead_code))]
pub(crate) fn backward_through_cudnn(p: &Sdpa) -> bool {
    p.hkv == p.h || std::env::var("ZOO_CUDNN_GQA_BWD").is_ok_and(|v| v == "1")
}

/// cuDNN's row statistics (natural log of the scaled scores' sum of exponentials) as the base-2
/// LSE zoo's backward kernels take (`attention.cu`: m + log2 l over scores · scale · log2 e):
/// the same number times log2 e.
#[cfg(zoo_cudnn)]
pub(crate) fn lse_base2(dev: &Device, stats: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
    let Device::Cuda(dev) = dev else { candle_core::bail!("cuDNN attention: not on CUDA") };
    let n = stats.len();
    let t = Tensor::from_storage(candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(stats.clone(), dev.clone())), n, candle_core::op::BackpropOp::none(), false)
        .affine(std::f64::consts::LOG2_E, 0.0)?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        candle_core::Storage::Cuda(c) if l.start_offset() == 0 && l.is_contiguous() => Ok(c.as_cuda_slice::<f32>()?.clone()),
        _ => candle_core::bail!("cuDNN attention: LSE conversion gave a non-CUDA or offset tensor"),
    }
}

/// dQ, dK, dV through cuDNN from the forward's inputs, its output `o`, the upstream gradient `g`
/// and the forward's statistics; in the inputs' dtype.
#[cfg(zoo_cudnn)]
pub(crate) fn backward(p: &Sdpa, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, g: &Tensor, stats: &CudaSlice<f32>) -> Result<(Tensor, Tensor, Tensor)> {
    use crate::cuda_addr::tensor_addr;
    let device = q.device().clone();
    let Device::Cuda(dev) = &device else { candle_core::bail!("cuDNN attention: not on CUDA") };
    let dt = q.dtype();
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (o, g) = (o.to_dtype(dt)?.contiguous()?, g.to_dtype(dt)?.contiguous()?);
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().w()?;
    let ws = workspace(dev, p, true)?;
    let alloc = |t: &Tensor| -> Result<(Tensor, u64)> {
        let (cs, addr) = crate::cuda_addr::alloc(dev, dt, t.elem_count())?;
        let t = Tensor::from_storage(candle_core::Storage::Cuda(cs), t.shape().clone(), candle_core::op::BackpropOp::none(), false);
        Ok((t, addr))
    };
    let ((dq, dqp), (dk, dkp), (dv, dvp)) = (alloc(&q)?, alloc(&k)?, alloc(&v)?);
    let (qp, kp, vp, opp, gp) = (tensor_addr(&q)?, tensor_addr(&k)?, tensor_addr(&v)?, tensor_addr(&o)?, tensor_addr(&g)?);
    let (sp, _s1) = stats.device_ptr(&stream);
    let wp = ws.as_ref().map_or(0, |w| w.device_ptr(&stream).0);
    let a = |x: u64| x as *mut c_void;
    // SAFETY: as in the forward; dq, dk, dv are fresh buffers of q's, k's and v's sizes.
    call(|e, n| unsafe {
        zoo_cudnn_sdpa_bwd(p, stream.cu_stream() as *mut c_void, a(qp), a(kp), a(vp), a(opp), a(gp), sp as *const f32, a(dqp), a(dkp), a(dvp), a(wp), e, n)
    })
    .map_err(candle_core::Error::Msg)?;
    drop(_s1);
    drop(ws);
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(tq: usize, tk: usize) -> Dims {
        Dims { b: 2, h: 8, hkv: 2, tq, tk, d: 64 }
    }

    /// Training (q_start = k_start) is top-left causal; a prefill after a cache whose last query
    /// meets the last key is bottom-right; other offsets, sinks, f32 and fewer keys than queries
    /// are not for cuDNN.
    #[test]
    fn plan_maps_zoo_masks_to_cudnn_alignments() {
        let c = FlashOpts::causal(64);
        let p = plan(&c, &dims(100, 100), DType::BF16, 0).unwrap();
        assert_eq!((p.align, p.window, p.dtype, p.hkv), (1, 0, 0, 2));
        let prefill = FlashOpts { q_start: 30, ..c };
        assert_eq!(plan(&prefill, &dims(70, 100), DType::F16, 0).unwrap().align, 2);
        assert!(plan(&FlashOpts { q_start: 10, ..c }, &dims(70, 100), DType::BF16, 0).unwrap_err().contains("position 10"));
        let w = FlashOpts { window: Some(16), ..c };
        assert_eq!(plan(&w, &dims(100, 100), DType::BF16, 0).unwrap().window, 16);
        assert!(plan(&FlashOpts { n_sink: 4, ..c }, &dims(100, 104), DType::BF16, 0).unwrap_err().contains("sink"));
        assert!(plan(&c, &dims(100, 100), DType::F32, 0).unwrap_err().contains("F32"));
        assert!(plan(&c, &dims(100, 50), DType::BF16, 0).unwrap_err().contains("fewer keys"));
    }

    /// Without GQA cuDNN differentiates its own forward; with a group of query heads per K/V head
    /// the backward is zoo's (f32 group sums), unless ZOO_CUDNN_GQA_BWD=1.
    #[test]
    fn gqa_backward_leaves_cudnn() {
        let c = FlashOpts::causal(64);
        let mha = plan(&c, &Dims { hkv: 8, ..dims(100, 100) }, DType::BF16, 0).unwrap();
        let gqa = plan(&c, &dims(100, 100), DType::BF16, 0).unwrap();
        assert!(backward_through_cudnn(&mha));
        let forced = std::env::var("ZOO_CUDNN_GQA_BWD").is_ok_and(|v| v == "1");
        assert_eq!(backward_through_cudnn(&gqa), forced);
    }

    #[test]
    fn without_the_library_it_says_why() {
        #[cfg(not(zoo_cudnn))]
        assert!(available().unwrap_err().contains("not compiled in"));
        #[cfg(zoo_cudnn)]
        let _ = available();
    }
}
