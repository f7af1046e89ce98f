//! The primitive ops the mixers share, in one place: where fused kernels will plug in. Each is
//! built from differentiable candle primitives (it has a backward) unless its name says `fused`;
//! an op without a backward pass checks the [`Phase`] and refuses [`Phase::Train`], so it cannot
//! cut gradients silently.
//!
//! ```
//! use zoo_core::candle_core::{Device, Tensor};
//! use zoo_core::ops::softmax_last_dim_fused;
//! use zoo_core::state::Phase;
//! let x = Tensor::new(&[[0f32, 0.0]], &Device::Cpu)?;
//! let p = softmax_last_dim_fused(&x, Phase::Decode)?;
//! assert_eq!(p.to_vec2::<f32>()?, vec![vec![0.5, 0.5]]);
//! assert!(softmax_last_dim_fused(&x, Phase::Train).is_err());
//! # Ok::<(), zoo_core::candle_core::Error>(())
//! ```

use crate::state::Phase;
use candle_core::{DType, Result, Tensor, D};

/// candle's fused softmax over the last dimension (no backward pass): prefill and decode only.
pub fn softmax_last_dim_fused(x: &Tensor, phase: Phase) -> Result<Tensor> {
    phase.forbid_train("softmax_last_dim (fused, no backward)")?;
    candle_nn::ops::softmax_last_dim(x)
}

/// x / sqrt(mean(x², last dim) + ε), without a gain; accumulates in f32 (f64 stays f64).
/// The fused op (`zoo_kernels::rms_norm`: the kernel on CUDA, its CPU form on the CPU) runs unless
/// `ZOO_KERNELS=naive`.
pub fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    if zoo_kernels::applies("rms norm", zoo_kernels::rms_norm::unsupported(x), x.device()) {
        return zoo_kernels::rms_norm::rms_norm(x, None, eps);
    }
    rms_normalize_naive(x, eps)
}

/// The composition of [`rms_normalize`] (the reference the kernel is tested against).
pub fn rms_normalize_naive(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let work = if dt == DType::F64 { DType::F64 } else { DType::F32 };
    let xf = x.to_dtype(work)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    xf.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(dt)
}

/// Per-head RMS normalisation over the last dim with a gain of size d (GLA's output norm).
/// The fused op runs, as in [`rms_normalize`].
pub fn head_rms_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    if zoo_kernels::applies("rms norm", zoo_kernels::rms_norm::unsupported(x), x.device()) {
        return zoo_kernels::rms_norm::rms_norm(x, Some(gain), eps);
    }
    rms_normalize_naive(x, eps)?.broadcast_mul(&gain.to_dtype(x.dtype())?)
}

/// Per-head layer normalisation (RetNet's GroupNorm with one group per head), gain of size d.
pub fn head_layer_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mu = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mu)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dt)?.broadcast_mul(&gain.to_dtype(dt)?)
}

/// L2 normalisation over the last dim (fla's `l2norm`: x / sqrt(Σx² + 1e-6)).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)
}

/// log σ(x) = min(x, 0) − log(1 + e^{−|x|}), stable.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    x.minimum(0.0)? - (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// softplus(x) = max(x, 0) + log(1 + e^{−|x|}), stable.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// (B, T, H·d) -> (B, H, T, d), contiguous.
pub fn split_heads(x: &Tensor, h: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    x.reshape((b, t, h, c / h))?.transpose(1, 2)?.contiguous()
}

/// (B, H, T, d) -> (B, T, H·d)
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))
}

/// The attention scale 1/√d for head width d.
pub fn inv_sqrt(d: usize) -> f64 {
    1.0 / (d as f64).sqrt()
}
