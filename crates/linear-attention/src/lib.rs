//! Linear attention mixers for zoo: each reduces to the gated recurrence of [`kernel`]
//! (`S_t = Diag(α_t) S_{t−1} + k_tᵀ v_t`, `o_t = q_t S_t`), trained with the chunked form, decoded
//! with the one-step form (the state S is the layer cache), and checked against the naive loop.
//!
//! - [`based::Based`]: Arora et al. 2024, Based (2nd-order Taylor feature map, d′ = 16).
//! - [`linear::LinearAttention`]: Katharopoulos et al. 2020 (α = 1, feature maps, normaliser).
//! - [`retnet::Retention`]: Sun et al. 2023, RetNet (fixed multi-scale per-head decay γ_h).
//! - [`simple_gla::SimpleGla`]: Simple GLA / Lightning (scalar per-head decay, fixed or data-dependent).
//! - [`gla::Gla`]: Yang et al. 2024, GLA (data-dependent per-channel decay, low-rank gate).

pub mod based;
pub mod gla;
pub mod kernel;
pub mod linear;
pub mod retnet;
pub mod simple_gla;

use zoo_core::candle_core::{DType, Result, Tensor};
use zoo_core::mixer::LayerCache;

fn default_chunk() -> usize {
    64
}

/// Run the recurrence in the form the call needs: chunked (training: no cache; prefill: T > 1),
/// or one step (decode). The cache holds the f32 state S (B, H, d_k, d_v).
pub(crate) fn recur(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: Option<&Tensor>,
    cache: Option<&mut LayerCache>,
    chunk: usize,
) -> Result<Tensor> {
    match cache {
        None => Ok(kernel::chunked(q, k, v, g, None, chunk)?.0),
        Some(c) => {
            let t = q.dim(2)?;
            let s0 = c.tensors.first();
            let (o, s) = if t == 1 { kernel::step(q, k, v, g, s0)? } else { kernel::chunked(q, k, v, g, s0, chunk)? };
            c.tensors = vec![s];
            c.seen += t;
            Ok(o)
        }
    }
}

/// GLA-style output (GLA §4.1; also Simple GLA): per-head RMSNorm of the recurrence output,
/// a swish gate from `r`, then the output projection: `(RMSNorm(O) ⊙ swish(X W_r)) W_O`.
pub(crate) fn norm_gate_out(
    o: &Tensor,
    norm: &Tensor,
    r: &zoo_core::nn::Linear,
    out: &zoo_core::nn::Linear,
    x: &Tensor,
) -> Result<Tensor> {
    let o = kernel::head_rms_norm(o, norm, 1e-5)?.to_dtype(x.dtype())?;
    out.forward(&(merge(&o)? * r.forward(x)?.silu()?)?)
}

/// Bytes of an f32 state (B, H, d_k, d_v).
pub(crate) fn state_bytes(batch: usize, h: usize, dk: usize, dv: usize) -> usize {
    batch * h * dk * dv * DType::F32.size_in_bytes()
}

/// (B, T, H·d) -> (B, H, T, d)
pub(crate) fn heads(x: &Tensor, h: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    x.reshape((b, t, h, c / h))?.transpose(1, 2)?.contiguous()
}

/// (B, H, T, d) -> (B, T, H·d)
pub(crate) fn merge(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))
}

/// The checks every linear mixer config shares: heads divide the width, chunk ≥ 1.
pub(crate) fn check_heads_chunk(n_heads: usize, d_model: usize, chunk: usize) -> std::result::Result<(), String> {
    if n_heads == 0 || d_model % n_heads != 0 {
        return Err(format!("n_heads: {n_heads} heads do not divide d_model = {d_model}"));
    }
    if chunk == 0 {
        return Err("chunk: must be at least 1".into());
    }
    Ok(())
}
