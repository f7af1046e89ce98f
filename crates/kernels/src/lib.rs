//! zoo-kernels: fused CUDA kernels for zoo, called behind the functions the model already uses.
//!
//! Every kernel has a composition of candle ops that does the same work (in zoo-core); that
//! composition runs on the CPU (unless the op has a CPU form, below), when a kernel does not
//! apply (it says why), and when `ZOO_KERNELS=naive`. It is the reference every kernel
//! is tested against (`crates/core/tests/fused.rs` and `flash.rs`, run on the GPU machine). On the
//! CPU, in fused mode, eight ops run their own CPU forms in place of the compositions, which they
//! beat several times over: attention (blocked, its products on `gemm`, `examples/attention_cpu.rs`
//! in zoo-core), RMS norm, RoPE and SwiGLU's product (rows or chunks in parallel,
//! `examples/elementwise_cpu.rs`), the linear scan with a per-channel decay (GLA), the delta scan
//! (zoo-linear-attention's `examples/scan_cpu.rs`), the causal conv1d (`scripts/cpu-forms-bench.sh`
//! for whole models) and the cross-entropy (zoo-core's `examples/ce_cpu.rs`). The same tests check
//! them against the compositions in CI. Two ops exist only as CPU forms: [`skinny`] and
//! [`moe_experts`] (zoo-moe's grouped dispatch; its composition runs on CUDA).
//!
//! Kernels so far:
//! - [`adamw`]: multi-tensor AdamW with global grad-norm clipping in two launches per 48
//!   tensors plus one for the norm, in place, instead of about twenty launches per parameter tensor.
//! - [`attention`]: tiled online-softmax attention forward and backward (FlashAttention-2's
//!   algorithm on CUDA cores, f32 sums) with causal positions, windows, sinks and GQA; on the CPU
//!   its blocked form (`attention_cpu`). In a build with cuDNN compiled in (scripts/build-cuda.sh),
//!   16-bit prefill and training calls cuDNN expresses run cuDNN's fused SDPA instead
//!   ([`attention_cudnn`], opened at run time; `ZOO_FLASH_CUDNN=0` keeps our kernels).
//! - [`cross_entropy`]: the loss per row from its log-sum-exp, the gradient written once (no
//!   f32 softmax of the (B·T, V) logits kept).
//! - [`linear_scan`]: the gated linear recurrence of GLA, RetNet, Lightning and linear attention,
//!   forward and backward, one scan over time per pass with the state in registers.
//! - [`delta_scan`]: the delta rule of DeltaNet and Gated DeltaNet, forward and backward, one
//!   scan over time per pass with the state in registers (the backward replays 16-step chunks
//!   from checkpoints).
//! - [`conv1d`]: the depthwise causal convolution (BaseConv, short q/k/v convolutions) with an
//!   optional SiLU, forward and backward in three kernels instead of about 6K strided broadcasts.
//! - [`rms_norm`]: RMS normalisation with a gain, forward and backward (a warp per row).
//! - [`rope`]: rotary position embedding on q or k, one kernel forward, the inverse rotation
//!   backward.
//! - [`swiglu`]: SwiGLU's silu(g) ⊙ u, forward and a backward writing both gradients.
//! - [`moe_experts`] (CPU only): an MoE layer's routed SwiGLU experts with the gather and the
//!   weighted combine, forward and backward, one parallel task per expert.
//! - [`skinny`] (CPU only): `x Wᵀ` for a decoding step's few rows, reading each row of W once
//!   instead of packing W for `gemm`.
//! - [`embedding`]: the token lookup with a sorted, deterministic backward (a radix sort of the
//!   positions by id, then each id's rows summed in order) in place of candle's `index_add`.
//!
//! The CUDA sources (`src/cuda/*.cu`) are compiled to PTX by `build.rs` with the nvcc on PATH
//! (scripts/build-cuda.sh) and loaded once per device.

pub mod adamw;
pub mod attention;
mod attention_cpu;
pub mod attention_cudnn;
pub mod conv1d;
mod cpu;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cuda_addr;
pub mod delta_scan;
pub mod embedding;
pub mod linear_scan;
pub mod moe_dispatch;
pub mod moe_experts;
pub mod moe_plan;
pub mod rms_norm;
pub mod rope;
pub mod skinny;
pub mod swiglu;

use std::sync::atomic::{AtomicU8, Ordering};

/// Which implementation the model's ops use where a kernel exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// The candle compositions everywhere (the reference).
    Naive,
    /// Fused kernels where they apply (CUDA, supported dtype and layout); compositions elsewhere.
    Fused,
}

impl Kernels {
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Naive => "naive",
            Kernels::Fused => "fused",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "naive" => Some(Kernels::Naive),
            "fused" => Some(Kernels::Fused),
            _ => None,
        }
    }
}

// 0: not yet read from the environment; 1: naive; 2: fused.
static MODE: AtomicU8 = AtomicU8::new(0);

/// The process-wide kernel mode: `set_mode`, else `ZOO_KERNELS` (`naive` or `fused`), else fused.
pub fn mode() -> Kernels {
    match MODE.load(Ordering::Relaxed) {
        1 => Kernels::Naive,
        2 => Kernels::Fused,
        _ => {
            let k = std::env::var("ZOO_KERNELS").ok().and_then(|v| Kernels::parse(&v)).unwrap_or(Kernels::Fused);
            set_mode(k);
            k
        }
    }
}

pub fn set_mode(k: Kernels) {
    MODE.store(if k == Kernels::Naive { 1 } else { 2 }, Ordering::Relaxed);
}

/// `ZOO_DETERMINISTIC=1`: CUDA training repeats itself bit for bit. zoo's own kernels and the
/// embedding's sorted backward are deterministic anyway; this switch adds cuDNN's deterministic
/// attention backward (dQ without atomics, through a workspace of B·H·Tq·Tk 16-bit scores), which
/// cuDNN otherwise leaves out. Result JSONs record it as `deterministic`.
pub fn deterministic() -> bool {
    std::env::var("ZOO_DETERMINISTIC").as_deref() == Ok("1")
}

/// Whether this build carries the CUDA kernels.
pub fn compiled() -> bool {
    cfg!(feature = "cuda")
}

/// Why no fused kernel can run on `device` at all (`None`: one may): `ZOO_KERNELS=naive`, a build
/// without CUDA, a tensor not on CUDA. Each op adds its own dtype and shape conditions.
pub fn unavailable(device: &candle_core::Device) -> Option<String> {
    if mode() == Kernels::Naive {
        Some("ZOO_KERNELS=naive".into())
    } else if !compiled() {
        Some("built without the cuda feature".into())
    } else if !device.is_cuda() {
        Some("not on CUDA".into())
    } else {
        None
    }
}

/// [`unavailable`] for an op whose CPU form also runs on the CPU, where it beats the composition:
/// there, in fused mode and when `cpu_form` (the op's own condition for it) holds, nothing stops
/// the op.
pub fn unavailable_unless_cpu_form(device: &candle_core::Device, cpu_form: bool) -> Option<String> {
    if cpu_form && device.is_cpu() && mode() == Kernels::Fused {
        None
    } else {
        unavailable(device)
    }
}

/// Why an op that exists only as a CPU form cannot run on `x` and `w` (`None`: it can): not on
/// the CPU, naive mode, or not both f32 ([`skinny`], [`moe_experts`]).
pub(crate) fn cpu_only_f32(x: &candle_core::Tensor, w: &candle_core::Tensor) -> Option<String> {
    if !x.device().is_cpu() {
        return Some("CPU only (the composition runs on CUDA)".into());
    }
    if let Some(why) = unavailable_unless_cpu_form(x.device(), true) {
        return Some(why);
    }
    if x.dtype() != candle_core::DType::F32 || w.dtype() != candle_core::DType::F32 {
        return Some(format!("dtypes {:?}, {:?}: the CPU form takes f32", x.dtype(), w.dtype()));
    }
    None
}

/// The contiguous elements of a CPU storage as f32, for the ops' CPU forms: borrowed when they are
/// f32 (no copy of a large tensor), converted from bf16, f16 or f64; `op` names the op in errors.
pub fn cpu_f32<'a>(s: &'a candle_core::CpuStorage, l: &candle_core::Layout, op: &str) -> candle_core::Result<std::borrow::Cow<'a, [f32]>> {
    use candle_core::CpuStorage;
    use std::borrow::Cow;
    let (a, z) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op}: input not contiguous")))?;
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(&v[a..z]),
        CpuStorage::BF16(v) => Cow::Owned(v[a..z].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F16(v) => Cow::Owned(v[a..z].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F64(v) => Cow::Owned(v[a..z].iter().map(|&x| x as f32).collect()),
        _ => candle_core::bail!("{op}: unsupported dtype"),
    })
}

/// Whether a fused kernel runs, given its op's `unsupported` answer: `None` yes; otherwise no, and
/// where a kernel was expected (CUDA, fused mode) [`note_fallback`] says why.
pub fn applies(op: &str, why: Option<String>, device: &candle_core::Device) -> bool {
    match why {
        None => true,
        Some(why) => {
            if device.is_cuda() && compiled() && mode() == Kernels::Fused {
                note_fallback(op, &why);
            }
            false
        }
    }
}

/// f32 values as a CPU storage of `dt` (f32, bf16, f16), for the ops' CPU forms.
pub fn cpu_from_f32(v: Vec<f32>, dt: candle_core::DType) -> candle_core::Result<candle_core::CpuStorage> {
    use candle_core::{CpuStorage, DType};
    Ok(match dt {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        t => candle_core::bail!("zoo-kernels: no CPU form for dtype {t:?}"),
    })
}

/// Say once per (op, reason) on stderr that a fused kernel did not apply and the composition ran.
/// Silent where kernels were never expected (CPU, naive mode, a build without CUDA).
pub fn note_fallback(op: &str, why: &str) {
    note_fallback_to(op, why, "the composition");
}

/// [`note_fallback`] where something other than the composition runs instead (`instead`).
pub fn note_fallback_to(op: &str, why: &str, instead: &str) {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let key = format!("{op}: {why}");
    let mut seen = SEEN.lock().unwrap();
    if seen.get_or_insert_with(HashSet::new).insert(key.clone()) {
        eprintln!("zoo-kernels: {key}; {instead} runs");
    }
}
