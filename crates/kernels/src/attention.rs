//! Fused causal attention: FlashAttention-2's tiled online softmax (Dao 2023, "FlashAttention-2:
//! Faster Attention with Better Parallelism and Work Partitioning", Algorithms 1 and 2), with
//! zoo's masks: causal at absolute positions, a sliding window, learned sink slots, GQA/MQA.
//!
//! `O = softmax(scale · Q Kᵀ + mask) V` per head. The forward keeps only O and the row
//! log-sum-exp; the backward recomputes P from it (dQ over query rows, dK/dV over key rows,
//! summed over the query heads of a GQA group), so nothing of size Tq × Tk is stored. Inputs f32,
//! bf16 or f16; every sum in f32. With 16-bit inputs the matrix products run on tensor cores
//! (`mma.sync` m16n8k16 or WMMA 16×16×16; the backward for d ≤ 128); f32 inputs and decoding
//! steps run on CUDA cores (`src/cuda/attention.cu`), decoding steps optionally split over the
//! keys (Flash-Decoding, Dao, Haziza, Massa and Sizov 2023: [`decode_kernel`]). On the CPU the
//! op's CPU form runs (`attention_cpu`: the same blocked algorithm with its products on `gemm`),
//! the model's attention there in fused mode; the composition (`zoo_core::attention::sdpa`) stays
//! the reference both are tested against and runs with `ZOO_KERNELS=naive`.
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

    /// Whether the query at absolute position `qp` sees key column `c` (sinks first): the mask's
    /// definition, which the CPU form's key ranges are tested against.
    #[cfg(test)]
    pub(crate) fn visible(&self, qp: usize, c: usize) -> bool {
        if c < self.n_sink {
            return true;
        }
        let kp = self.k_start + c - self.n_sink;
        kp <= qp && self.window.is_none_or(|w| qp - kp < w)
    }
}

/// Which attention kernel set 16-bit prefill and training use on CUDA, from the environment:
/// `cudnn` (the default in a build with cuDNN compiled in, i.e. `scripts/build-cuda.sh`'s; or
/// ZOO_FLASH_CUDNN=1: cuDNN's fused attention where it applies, [`crate::attention_cudnn`], the
/// `mma` kernels elsewhere and where the library cannot be opened; ZOO_FLASH_CUDNN=0 turns it off),
/// `mma` (the default otherwise: `mma.sync` with register tiles at head dims 32-128, WMMA at other
/// head dims), `mma2` (ZOO_FLASH_MMA=2: the same with `ldmatrix` fragment loads, no mask on the
/// tiles a warp sees whole and `cp.async` double-buffered tile loads), `wmma` (ZOO_FLASH_MMA=0) or
/// `simt` (ZOO_FLASH_TC=0: the CUDA-core kernels). Naming ZOO_FLASH_MMA picks our kernels over the
/// default cuDNN. Decoding steps and f32 always take the CUDA-core kernels. Result JSONs record it
/// beside `kernels`.
pub fn flash_kernel_set() -> &'static str {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let cudnn = match var("ZOO_FLASH_CUDNN").as_str() {
        "1" => true,
        "0" => false,
        _ => cfg!(zoo_cudnn) && std::env::var_os("ZOO_FLASH_MMA").is_none(),
    };
    if var("ZOO_FLASH_TC") == "0" {
        "simt"
    } else if cudnn {
        "cudnn"
    } else {
        match var("ZOO_FLASH_MMA").as_str() {
            "0" => "wmma",
            "2" => "mma2",
            _ => "mma",
        }
    }
}

/// Which kernel a decoding step (at most [`DECODE_ROWS`] queries) takes on CUDA, from the
/// environment: `split` (the default since stop 36: the split-KV kernel, the keys cut into chunks
/// over many blocks, Flash-Decoding; it reads K and V in place from a narrowed cache view) or
/// `rows` (ZOO_FLASH_DECODE=rows: the CUDA-core forward, one block per 16 query rows of a head,
/// walking every key). On an H100 (8L/512, T = 4096, `results/bench/decode-h100-split.json`) split
/// decoded 467 / 8432 tok/s at B = 1 / 32 against rows' 253 / 2180. Result JSONs record it as
/// `flash_decode`.
pub fn decode_kernel() -> &'static str {
    match std::env::var("ZOO_FLASH_DECODE").as_deref() {
        Ok("rows") => "rows",
        _ => "split",
    }
}

/// Whether the split-KV kernel's blocks hold only as many query rows as a kv head has (the
/// smallest of 1, 2, 4, 8): the default since stop 37, or always 8 (4 at head dims ≥ 192) with
/// `ZOO_FLASH_DEC_ROWS=8`. At head dim 64 in bf16 ptxas gives the kernel 32 registers a thread with
/// one row and 92 with eight, so a one-query step of a plain multi-head model (one live row per
/// block) keeps 16 blocks of 4 warps per SM where eight rows' registers allow 5. Checked on an H100
/// in stop 37: the flash tests under it (`split_kv_decoding_matches_the_composition` included), and
/// decode of the 8L/512 twin at T 4096 (`results/bench/decode-h100-fit.json`): B = 32 10744 tok/s
/// against 8447 with 8 rows, B = 1 375 against 309.
pub fn decode_rows_fit() -> bool {
    std::env::var("ZOO_FLASH_DEC_ROWS").as_deref() != Ok("8")
}

/// Query rows up to which a forward is a decoding step (the CUDA-core kernels' rows per block).
pub const DECODE_ROWS: usize = 16;

/// Why the fused kernel cannot run on these inputs (`None`: it can): `ZOO_KERNELS=naive`, a
/// device that is neither the CPU nor CUDA in a CUDA build, dtype, head dim, head counts.
/// On the CPU (fused mode) the op's CPU form runs for any head dim.
pub fn unsupported(q: &Tensor, k: &Tensor, v: &Tensor) -> Option<String> {
    if let Some(why) = crate::unavailable_unless_cpu_form(q.device(), true) {
        return Some(why);
    }
    shape_problem(q, k, v).or_else(|| {
        let d = q.dim(3).unwrap_or(0);
        if !matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            Some(format!("dtype {:?}", q.dtype()))
        } else if q.device().is_cuda() && !HEAD_DIMS.contains(&d) {
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

/// The fused op on any device (CPU: its CPU form). q (B, H, Tq, d); k, v (B, Hkv, Tk, d)
/// with the sink slots first; H a multiple of Hkv. Differentiable in q, k and v.
pub fn flash_attention_op(q: &Tensor, k: &Tensor, v: &Tensor, o: &FlashOpts) -> Result<Tensor> {
    flash_op(q, k, v, o, decode_kernel() == "split")
}

/// [`flash_attention_op`] with a decoding step (at most [`DECODE_ROWS`] queries) on CUDA always
/// taking the split-KV kernel, whatever [`decode_kernel`] says (its tests call this).
pub fn flash_decode_op(q: &Tensor, k: &Tensor, v: &Tensor, o: &FlashOpts) -> Result<Tensor> {
    flash_op(q, k, v, o, true)
}

fn flash_op(q: &Tensor, k: &Tensor, v: &Tensor, o: &FlashOpts, split_decode: bool) -> Result<Tensor> {
    if let Some(why) = shape_problem(q, k, v) {
        candle_core::bail!("flash attention: {why}")
    }
    // The split-KV kernel reads K and V through their strides (a view of a larger cache is not
    // copied); it needs only the head dim contiguous. The CPU form reads f32 K and V in place
    // where each head's rows are contiguous (a prefix of a cache's rows).
    let split = split_decode && q.device().is_cuda() && (1..=DECODE_ROWS).contains(&q.dim(2)?);
    let rows_ok = |t: &Tensor| t.stride()[3] == 1;
    let cpu_ok = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && crate::attention_cpu::heads_in_place(t.layout());
    let kv = |t: &Tensor| if (split && rows_ok(t)) || cpu_ok(t) { Ok(t.clone()) } else { t.contiguous() };
    let op = Flash { o: *o, split, lse: Mutex::new(None) };
    q.contiguous()?.apply_op3_arc(&kv(k)?, &kv(v)?, Arc::new(Box::new(op)))
}

/// The row log-sum-exps of the last forward: base 2 of the scaled scores on CUDA, natural log
/// on the CPU.
enum Saved {
    Cpu(Vec<f32>),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>),
    /// cuDNN's statistics (natural log), and the call that made them.
    #[cfg(zoo_cudnn)]
    Cudnn(candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>, crate::attention_cudnn::Sdpa),
}

struct Flash {
    o: FlashOpts,
    /// A decoding step on CUDA: the split-KV kernel (K and V may be strided views).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    split: bool,
    lse: Mutex<Option<Saved>>,
}

#[cfg(zoo_cudnn)]
impl Flash {
    /// The cuDNN call for this forward when [`flash_kernel_set`] is `cudnn`, cuDNN is open, and the
    /// call is a 16-bit prefill or training step cuDNN can express; otherwise `None`, with the
    /// reason noted once where cuDNN was asked for.
    fn cudnn_plan(&self, n: &Dims, q: &candle_core::CudaStorage) -> Option<crate::attention_cudnn::Sdpa> {
        use candle_core::backend::BackendStorage;
        if self.split || flash_kernel_set() != "cudnn" || n.tq <= DECODE_ROWS || q.dtype() == DType::F32 {
            return None;
        }
        let plan = crate::attention_cudnn::available()
            .and_then(|_| crate::attention_cudnn::plan(&self.o, n, q.dtype(), q.device.cuda_stream().context().ordinal()));
        plan.map_err(|why| crate::note_fallback_to("flash attention (cuDNN)", &why, "zoo's own kernel")).ok()
    }
}

pub(crate) struct Dims {
    pub(crate) b: usize,
    pub(crate) h: usize,
    pub(crate) hkv: usize,
    pub(crate) tq: usize,
    pub(crate) tk: usize,
    pub(crate) d: usize,
}

fn dims(q: &Layout, k: &Layout) -> Result<Dims> {
    let (b, h, tq, d) = q.shape().dims4()?;
    let (_, hkv, tk, _) = k.shape().dims4()?;
    Ok(Dims { b, h, hkv, tq, tk, d })
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
        let (k, v) = (crate::attention_cpu::Heads::of(s2, l2, OP)?, crate::attention_cpu::Heads::of(s3, l3, OP)?);
        let (out, lse) = crate::attention_cpu::forward(&self.o, &n, &crate::cpu_f32(s1, l1, OP)?, &k, &v);
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
        #[cfg(zoo_cudnn)]
        if let Some(p) = self.cudnn_plan(&n, s1) {
            match crate::attention_cudnn::forward(&p, (s1, l1), (s2, l2), (s3, l3)) {
                Ok((out, stats)) => {
                    *self.lse.lock().unwrap() = Some(Saved::Cudnn(stats, p));
                    return Ok((out, l1.shape().clone()));
                }
                Err(e) => crate::note_fallback_to("flash attention (cuDNN)", &e.to_string(), "zoo's own kernel"),
            }
        }
        let (out, lse) = if self.split {
            cuda::decode(&self.o, &n, [(s1, l1), (s2, l2), (s3, l3)])?
        } else {
            cuda::forward(&self.o, &n, (s1, l1), (s2, l2), (s3, l3))?
        };
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
        // D_i = rowsum(dO ∘ O) (FlashAttention-2, Alg. 2 line 4); cuDNN makes its own.
        let dlt = || (g.to_dtype(DType::F32)? * res.to_dtype(DType::F32)?)?.sum(3)?.contiguous();
        let saved = self.lse.lock().unwrap();
        let (dq, dk, dv) = match saved.as_ref() {
            Some(Saved::Cpu(lse)) => {
                let f = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
                let [dq, dk, dv] = crate::attention_cpu::backward(&self.o, &n, &f(q)?, &f(k)?, &f(v)?, &f(&g)?, lse, &dlt()?.flatten_all()?.to_vec1()?);
                let dev = q.device();
                (Tensor::from_vec(dq, q.shape(), dev)?, Tensor::from_vec(dk, k.shape(), dev)?, Tensor::from_vec(dv, v.shape(), dev)?)
            }
            #[cfg(feature = "cuda")]
            Some(Saved::Cuda(lse)) => cuda::backward(&self.o, &n, q, k, v, &g, lse, &dlt()?)?,
            #[cfg(zoo_cudnn)]
            Some(Saved::Cudnn(stats, p)) => {
                if crate::attention_cudnn::backward_through_cudnn(p) {
                    crate::attention_cudnn::backward(p, q, k, v, res, &g, stats)?
                } else {
                    // GQA/MQA: zoo's dK/dV kernel sums the group's query heads in f32 (see
                    // `backward_through_cudnn`); it takes the LSE in base 2.
                    let lse = crate::attention_cudnn::lse_base2(q.device(), stats)?;
                    cuda::backward(&self.o, &n, q, k, v, &g, &lse, &dlt()?)?
                }
            }
            None => candle_core::bail!("flash attention: backward before forward"),
        };
        let dt = q.dtype();
        Ok((Some(dq.to_dtype(dt)?), Some(dk.to_dtype(dt)?), Some(dv.to_dtype(dt)?)))
    }
}

/// How the split-KV decoding kernel cuts the keys (attention.cu, `dec_split`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    /// Query rows (heads of a GQA group × queries) per block, a template parameter of the kernel:
    /// 8 (4 at head dims ≥ 192), or with [`decode_rows_fit`] the smallest of 1, 2, 4, 8 (at most
    /// 4 there) that holds a kv head's rows.
    pub rows_per_block: usize,
    /// The first non-sink key column any of the queries may see.
    pub c_lo: usize,
    /// Virtual columns: the sink slots, then the keys from `c_lo` that some query may see.
    pub n_cols: usize,
    /// Virtual columns per split (0 when there are none) and the number of splits (≥ 1).
    pub chunk: usize,
    pub splits: usize,
}

/// Keys per split at the least (16 per warp; fewer only when there are fewer keys): below that
/// the merge costs more than it spreads.
pub const DECODE_MIN_CHUNK: usize = 64;

/// The split of a decoding step's keys over about `target_blocks` blocks (16 per SM, 4 warps each:
/// a warp has one key row in flight ahead of the one it uses, so memory-level parallelism comes
/// from the number of warps; at 4 per SM a B = 32, T = 4096 step read its cache at ~0.35 TB/s): the keys
/// the queries at positions `q_start..q_start + tq` may see (FlashAttention's `key_range`),
/// cut into chunks of at least [`DECODE_MIN_CHUNK`].
/// With `fit_rows` ([`decode_rows_fit`]) a block holds the smallest power of two of rows (1, 2, 4,
/// 8) that takes a kv head's rows, else always 8 (4 at head dims ≥ 192).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn decode_plan(o: &FlashOpts, n: &Dims, target_blocks: usize, fit_rows: bool) -> DecodePlan {
    let rows = n.h / n.hkv * n.tq;
    let most = if n.d >= 192 { 4 } else { 8 };
    let rows_per_block = if fit_rows { rows.max(1).next_power_of_two().min(most) } else { most };
    let groups = rows.div_ceil(rows_per_block);
    let keys = n.tk - o.n_sink;
    let (qlo, qhi) = (o.q_start as i64, (o.q_start + n.tq) as i64 - 1);
    let lo = o.window.map_or(0, |w| qlo - w as i64 + 1 - o.k_start as i64).max(0);
    let hi = (qhi - o.k_start as i64 + 1).min(keys as i64);
    let n_cols = o.n_sink + (hi - lo).max(0) as usize;
    let base = (n.b * n.hkv * groups).max(1);
    let splits = target_blocks.div_ceil(base).clamp(1, (n_cols / DECODE_MIN_CHUNK).max(1));
    let chunk = n_cols.div_ceil(splits);
    let splits = if chunk == 0 { 1 } else { n_cols.div_ceil(chunk) };
    DecodePlan { rows_per_block, c_lo: o.n_sink + lo as usize, n_cols, chunk, splits }
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
            "mma" | "cudnn" if matches!(d, 32 | 64 | 96 | 128) => "mma_",
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

    /// `struct DecParams` of attention.cu.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct DecParams {
        p: Params,
        kb: i64,
        kh: i64,
        kr: i64,
        vb: i64,
        vh: i64,
        vr: i64,
        c_lo: i32,
        n_cols: i32,
        chunk: i32,
        splits: i32,
    }
    // SAFETY: plain old data with the C layout of `struct DecParams`.
    unsafe impl DeviceRepr for DecParams {}

    /// Warps per block of the split-KV kernels (attention.cu: DEC_WARPS).
    const DEC_WARPS: usize = 4;
    /// Blocks per SM the split-KV kernel's split count aims at.
    const DEC_BLOCKS_PER_SM: usize = 16;

    /// Streaming multiprocessors of the device (for the split count), read once.
    fn sm_count(dev: &candle_core::CudaDevice) -> usize {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
        static SMS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        *SMS.get_or_init(|| {
            let a = CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
            dev.cuda_stream().context().attribute(a).map(|n| n.max(1) as usize).unwrap_or(132)
        })
    }

    /// The split-KV decoding forward (`dec_split` then `dec_combine`, attention.cu): O and the LSE
    /// as [`forward`] gives them. K and V may be strided views with a contiguous head dim.
    pub fn decode(o: &FlashOpts, n: &Dims, qkv: [(&CudaStorage, &Layout); 3]) -> Result<(CudaStorage, CudaSlice<f32>)> {
        let [q, k, v] = qkv;
        let dev = q.0.device.clone();
        let dt = q.0.dtype();
        let strides = |l: &Layout| -> Result<(i64, i64, i64)> {
            match l.stride() {
                [sb, sh, sr, 1] => Ok((*sb as i64, *sh as i64, *sr as i64)),
                s => candle_core::bail!("flash attention (split-KV): head dim not contiguous, strides {s:?}"),
            }
        };
        let ((kb, kh, kr), (vb, vh, vr)) = (strides(k.1)?, strides(v.1)?);
        let plan = super::decode_plan(o, n, DEC_BLOCKS_PER_SM * sm_count(&dev), super::decode_rows_fit());
        let dp = DecParams {
            p: params(o, n)?,
            kb,
            kh,
            kr,
            vb,
            vh,
            vr,
            c_lo: plan.c_lo as i32,
            n_cols: plan.n_cols as i32,
            chunk: plan.chunk as i32,
            splits: plan.splits as i32,
        };
        let s = suffix(dt)?;
        let fs = dev.get_or_load_custom_func(&format!("zoo_flash_dec_split_{s}_{}_r{}", n.d, plan.rows_per_block), MODULE, PTX)?;
        let fc = dev.get_or_load_custom_func(&format!("zoo_flash_dec_combine_{s}_{}", n.d), MODULE, PTX)?;
        let total = n.b * n.h * n.tq;
        let len = total * n.d;
        // SAFETY: dec_split writes every (split, row) of both workspaces; dec_combine every row of
        // out and lse.
        let part_o = unsafe { dev.alloc::<f32>(plan.splits * len)? };
        let part_ml = unsafe { dev.alloc::<f32>(plan.splits * total * 2)? };
        let lse = unsafe { dev.alloc::<f32>(total)? };
        let (out, op) = crate::cuda_addr::alloc(&dev, dt, len)?;
        let (qp, kp, vp) = (storage_addr(q.0, q.1)?, view_addr(k.0, k.1)?, view_addr(v.0, v.1)?);
        let stream = dev.cuda_stream();
        let (pop, _s1) = part_o.device_ptr(&stream);
        let (pml, _s2) = part_ml.device_ptr(&stream);
        let (lp, _s3) = lse.device_ptr(&stream);
        let threads = (32 * DEC_WARPS) as u32;
        let mut b = fs.builder();
        b.arg(&qp).arg(&kp).arg(&vp).arg(&pop).arg(&pml).arg(&dp);
        let groups = (n.h / n.hkv * n.tq).div_ceil(plan.rows_per_block);
        let cfg = LaunchConfig {
            grid_dim: (plan.splits as u32, (n.b * n.hkv) as u32, groups as u32),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: q is contiguous (B, H, Tq, d); k and v are read at b·kb + hk·kh + c·kr + e for the
        // checked shapes (their views); the workspaces hold splits × rows (× d) floats.
        unsafe { b.launch(cfg) }.w()?;
        let mut b = fc.builder();
        b.arg(&pop).arg(&pml).arg(&op).arg(&lp).arg(&dp);
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(DEC_WARPS) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: out holds B·H·Tq·d elements of dt and lse B·H·Tq floats.
        unsafe { b.launch(cfg) }.w()?;
        drop((_s1, _s2, _s3));
        Ok((out, lse))
    }

    fn suffix(dt: DType) -> Result<&'static str> {
        Ok(match dt {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            t => candle_core::bail!("flash attention: no kernel for {t:?}"),
        })
    }

    use crate::cuda_addr::{storage_addr, tensor_addr, view_addr};

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

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(b: usize, h: usize, hkv: usize, tq: usize, tk: usize, d: usize) -> Dims {
        Dims { b, h, hkv, tq, tk, d }
    }

    /// The split of a decoding step: enough blocks for the device, chunks of at least
    /// DECODE_MIN_CHUNK keys, every key a query may see in exactly one chunk, none it may not.
    #[test]
    fn decode_plan_covers_the_visible_keys_once() {
        let at = |q_start: usize, window: Option<usize>, n_sink: usize| FlashOpts { q_start, window, n_sink, ..FlashOpts::causal(64) };
        // One query at position 4095 over 4096 keys, 8 heads, 528 blocks wanted: 64 chunks of 64.
        let p = decode_plan(&at(4095, None, 0), &dims(1, 8, 8, 1, 4096, 64), 528, true);
        // One row per kv head (no GQA, one query): blocks of one row (fitted).
        assert_eq!(p, DecodePlan { rows_per_block: 1, c_lo: 0, n_cols: 4096, chunk: 64, splits: 64 });
        // B = 32: 256 blocks before splitting, so 3 splits (of 1366, 1366, 1364 keys).
        let p = decode_plan(&at(4095, None, 0), &dims(32, 8, 8, 1, 4096, 64), 528, true);
        assert_eq!((p.chunk, p.splits), (1366, 3));
        // GQA 8:1 with 2 queries: 16 rows, 2 groups of 8 per kv head; head dim 256: groups of 4.
        assert_eq!(decode_plan(&at(10, None, 0), &dims(1, 8, 1, 2, 12, 64), 528, true).splits, 1);
        assert_eq!(decode_plan(&at(10, None, 0), &dims(1, 8, 1, 2, 12, 256), 528, true).rows_per_block, 4);
        assert_eq!(decode_plan(&at(10, None, 0), &dims(1, 8, 1, 2, 12, 64), 528, true).rows_per_block, 8);
        // GQA 4:1 with one query: 4 rows; 3 queries of a plain model: 3 rows in a block of 4.
        assert_eq!(decode_plan(&at(10, None, 0), &dims(1, 8, 2, 1, 12, 64), 528, true).rows_per_block, 4);
        assert_eq!(decode_plan(&at(10, None, 0), &dims(1, 8, 8, 3, 12, 64), 528, true).rows_per_block, 4);
        // Without fitting (ZOO_FLASH_DEC_ROWS=8), always 8 rows (4 at head dims >= 192).
        assert_eq!(decode_plan(&at(10, None, 0), &dims(1, 8, 8, 1, 12, 64), 528, false).rows_per_block, 8);
        assert_eq!(decode_plan(&at(10, None, 0), &dims(1, 8, 8, 1, 12, 192), 528, false).rows_per_block, 4);
        // A window of 1000 at position 4095 with 4 sinks: columns 0..4 and 4 + 3096 .. 4 + 4096.
        let p = decode_plan(&at(4095, Some(1000), 4), &dims(1, 8, 8, 1, 4 + 4096, 64), 528, true);
        assert_eq!((p.c_lo, p.n_cols), (4 + 3096, 4 + 1000));
        assert_eq!(p.splits, (p.n_cols).div_ceil(p.chunk));
        assert!(p.chunk >= DECODE_MIN_CHUNK && (p.splits - 1) * p.chunk < p.n_cols);
        // Keys after the queries (k_start beyond): only the sinks are visible; none at all: one empty split.
        let late = FlashOpts { k_start: 100, ..at(50, None, 2) };
        assert_eq!(decode_plan(&late, &dims(1, 2, 2, 1, 2 + 30, 32), 528, true).n_cols, 2);
        let none = FlashOpts { k_start: 100, ..at(50, None, 0) };
        let p = decode_plan(&none, &dims(1, 2, 2, 1, 30, 32), 528, true);
        assert_eq!((p.n_cols, p.chunk, p.splits), (0, 0, 1));
        // Queries at 5..=9 over keys from position 0 in a cache of 20: keys 0..=9 only.
        let p = decode_plan(&at(5, None, 0), &dims(1, 4, 2, 5, 20, 64), 528, true);
        assert_eq!((p.c_lo, p.n_cols, p.splits), (0, 10, 1));
    }
}
