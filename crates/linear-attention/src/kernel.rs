//! The gated linear recurrence every mixer of this crate reduces to, in its three forms (fla's
//! layout: a naive reference, a chunked parallel form for training/prefill, a one-step form for
//! decode):
//!
//! `S_t = Diag(α_t) S_{t−1} + k_tᵀ v_t,   o_t = q_t S_t`
//!
//! with q, k (B, H, T, d_k), v (B, H, T, d_v), state S (B, H, d_k, d_v) and the decay given in log
//! space, `g_t = log α_t`, shaped (B, H, T, d_k) for a per-channel gate (GLA), (B, H, T, 1) for a
//! scalar per head (RetNet, Lightning), or absent (α = 1: plain linear attention). State and decay
//! arithmetic run in f32.
//!
//! Chunked form (GLA paper §3.3, Lightning Attention-2 tiling): with b the inclusive cumulative sum
//! of g inside a chunk, `o_t = (q_t ⊙ e^{b_t}) S_0 + Σ_{s≤t} ((q_t ⊙ e^{b_t}) · (k_s ⊙ e^{−b_s})) v_s` and
//! `S_C = e^{b_C} ⊙ S_0 + (k ⊙ e^{b_C − b})ᵀ v`. Every exponent is ≤ 0: the intra-chunk scores are
//! formed from the differences b_t − b_s (masked to s ≤ t before exp), never from e^{−b_s} alone,
//! which overflows once a strongly negative gate (logsigmoid is unbounded below) accumulates in a
//! chunk. The per-channel case forms them elementwise over (c, c, d_k), so its chunk is capped at
//! [`VECTOR_CHUNK`]. All chunks are formed at once over a chunk axis; only the state hand-over
//! between chunks is sequential.

use zoo_core::candle_core::{DType, Device, Result, Tensor};

/// The largest chunk the per-channel (GLA) decay uses.
pub const VECTOR_CHUNK: usize = 16;

/// The recurrent state to start from, in f32: the given S_0, or zeros of `shape` (B, H, d_k, d_v).
pub fn initial_state(s0: Option<&Tensor>, shape: (usize, usize, usize, usize), dev: &Device) -> Result<Tensor> {
    match s0 {
        Some(s) => s.to_dtype(DType::F32),
        None => Tensor::zeros(shape, DType::F32, dev),
    }
}

/// Reference: loop over time. Returns (o (B, H, T, d_v), S_T).
pub fn naive(q: &Tensor, k: &Tensor, v: &Tensor, g: Option<&Tensor>, s0: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let (b, h, t, dk) = q.dims4()?;
    let dv = v.dim(3)?;
    let (q, k, v) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
    let g = g.map(|g| g.to_dtype(DType::F32)?.contiguous()).transpose()?;
    let g = g.as_ref();
    let mut s = initial_state(s0, (b, h, dk, dv), q.device())?;
    let mut outs = Vec::with_capacity(t);
    for i in 0..t {
        let qi = q.narrow(2, i, 1)?; // (B, H, 1, dk)
        let ki = k.narrow(2, i, 1)?;
        let vi = v.narrow(2, i, 1)?;
        if let Some(g) = g {
            let a = g.narrow(2, i, 1)?.exp()?.transpose(2, 3)?; // (B, H, dk|1, 1)
            s = s.broadcast_mul(&a)?;
        }
        s = (s + ki.transpose(2, 3)?.matmul(&vi)?)?;
        outs.push(qi.matmul(&s)?);
    }
    Ok((Tensor::cat(&outs, 2)?, s))
}

/// One decode step (T = 1): the recurrence itself.
pub fn step(q: &Tensor, k: &Tensor, v: &Tensor, g: Option<&Tensor>, s0: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    naive(q, k, v, g, s0)
}

/// (B, H, T, d) -> f32 (B·H, N, C, d) with N = ⌈T / C⌉, zero-padded at the end of T (candle's
/// matmul takes at most two batch axes, so B and H share one). The chunked forms here and in
/// [`crate::delta_rule`] cut their sequences with it.
pub(crate) fn chunks(x: &Tensor, c: usize) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let n = t.div_ceil(c);
    let x = x.to_dtype(DType::F32)?;
    let x = if n * c > t { x.pad_with_zeros(2, 0, n * c - t)? } else { x };
    x.reshape((b * h, n, c, d))
}

/// Chunked parallel form; equal to [`naive`] up to float rounding.
///
/// Every chunk's intra-chunk scores, outputs and state contribution are formed at once, over a
/// chunk axis (B·H, N, C, ·): the number of ops does not grow with T. Only the state hand-over
/// between chunks, `S_n = e^{b_C(n)} ⊙ S_{n−1} + U_n`, runs chunk by chunk (three small ops each).
/// T is zero-padded to a multiple of the chunk (zero k, v and g leave the state unchanged) and the
/// padding cut from the output.
pub fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: Option<&Tensor>,
    s0: Option<&Tensor>,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    let (b, h, t, dk) = q.dims4()?;
    let dv = v.dim(3)?;
    let dev = q.device();
    let s = initial_state(s0, (b, h, dk, dv), dev)?;
    // The per-channel form holds (C, C, d_k) scores per chunk: cap its chunk at 16 (fla's GLA
    // kernels use 16-token sub-chunks for the same part of the computation).
    let per_channel = g.is_some_and(|g| g.dim(3).is_ok_and(|d| d > 1));
    let c = if per_channel { chunk.min(VECTOR_CHUNK) } else { chunk }.min(t.max(1));
    let n = t.div_ceil(c);
    let (qc, kc, vc) = (chunks(q, c)?, chunks(k, c)?, chunks(v, c)?);
    let causal = Tensor::tril2(c, DType::F32, dev)?; // s ≤ t inside a chunk
    let (o_intra, o_inter_q, k_state, a_chunk) = match g {
        None => {
            let a = qc.matmul(&kc.transpose(2, 3)?)?.broadcast_mul(&causal)?;
            (a.matmul(&vc)?, qc, kc, None)
        }
        Some(g) => {
            let bcum = chunks(g, c)?.cumsum(2)?; // (BH, N, C, dg): inclusive, within each chunk
            let b_last = bcum.narrow(2, c - 1, 1)?; // (BH, N, 1, dg)
            let a = if !per_channel {
                // Scalar decay: e^{b_t − b_s}, exponent masked to ≤ 0 before exp.
                let diff = bcum.broadcast_sub(&bcum.transpose(2, 3)?)?; // (BH, N, C, C)
                let decay = diff.broadcast_mul(&causal)?.exp()?.broadcast_mul(&causal)?;
                (qc.matmul(&kc.transpose(2, 3)?)? * decay)?
            } else {
                // Per-channel decay: Σ_d q_td k_sd e^{b_td − b_sd}, formed elementwise with the
                // exponent masked to ≤ 0 before exp, so no gate value can overflow it.
                let diff = bcum.unsqueeze(3)?.broadcast_sub(&bcum.unsqueeze(2)?)?; // (BH, N, C, C, dk)
                let mask = causal.unsqueeze(2)?; // (C, C, 1)
                let decay = diff.broadcast_mul(&mask)?.exp()?.broadcast_mul(&mask)?;
                let qk = qc.unsqueeze(3)?.broadcast_mul(&kc.unsqueeze(2)?)?; // (BH, N, C, C, dk)
                (qk * decay)?.sum(4)?
            };
            let q_dec = qc.broadcast_mul(&bcum.exp()?)?;
            let k_tail = kc.broadcast_mul(&b_last.broadcast_sub(&bcum)?.exp()?)?;
            // e^{b_C} per chunk as (BH, N, dg, 1), to scale the rows of S.
            let a_chunk = b_last.exp()?.transpose(2, 3)?;
            (a.matmul(&vc)?, q_dec, k_tail, Some(a_chunk))
        }
    };
    // Each chunk's own contribution to the state: U_n = (k ⊙ e^{b_C − b})ᵀ v, (BH, N, dk, dv).
    let u = k_state.transpose(2, 3)?.matmul(&vc)?;
    // The state entering each chunk, S_{n−1}, then the final one.
    let mut s = s.reshape((b * h, dk, dv))?;
    let mut before = Vec::with_capacity(n);
    for i in 0..n {
        before.push(s.unsqueeze(1)?);
        let ui = u.narrow(1, i, 1)?.squeeze(1)?;
        s = match &a_chunk {
            Some(a) => (s.broadcast_mul(&a.narrow(1, i, 1)?.squeeze(1)?)? + ui)?,
            None => (s + ui)?,
        };
    }
    let s_before = Tensor::cat(&before, 1)?; // (BH, N, dk, dv)
    let o = (o_intra + o_inter_q.matmul(&s_before)?)?.reshape((b, h, n * c, dv))?;
    let o = if n * c > t { o.narrow(2, 0, t)? } else { o };
    Ok((o, s.reshape((b, h, dk, dv))?))
}

pub use zoo_core::ops::{head_layer_norm, head_rms_norm, log_sigmoid};
