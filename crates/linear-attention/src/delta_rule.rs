//! The delta-rule ops (fla's `ops/delta_rule`, `ops/gated_delta_rule`) behind
//! [`crate::deltanet`]: `S_t = α_t (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t`, in three forms that
//! agree to float precision: [`naive`] (loop over time, the reference), [`step`] (one token,
//! decode) and [`chunked`] (the chunkwise WY form of Yang et al. 2024, §3; see [`crate::deltanet`]
//! for its equations). Beside [`crate::kernel`], the diagonal-decay recurrence.

use crate::kernel::initial_state;
use zoo_core::candle_core::{DType, Result, Tensor, D};

/// Reference: loop over time. q, k (B, H, T, d_k), v (B, H, T, d_v), β (B, H, T, 1), log α
/// (B, H, T, 1) or none, S_0 (B, H, d_k, d_v). Returns (o (B, H, T, d_v), S_T), f32.
pub fn naive(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    beta: &Tensor,
    g: Option<&Tensor>,
    s0: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (b, h, t, dk) = q.dims4()?;
    let dv = v.dim(3)?;
    let f = |x: &Tensor| x.to_dtype(DType::F32);
    let (q, k, v, beta) = (f(q)?, f(k)?, f(v)?, f(beta)?);
    let g = g.map(f).transpose()?;
    let mut s = initial_state(s0, (b, h, dk, dv), q.device())?;
    let mut outs = Vec::with_capacity(t);
    for i in 0..t {
        let (qi, ki, vi, bi) = (q.narrow(2, i, 1)?, k.narrow(2, i, 1)?, v.narrow(2, i, 1)?, beta.narrow(2, i, 1)?);
        if let Some(g) = &g {
            s = s.broadcast_mul(&g.narrow(2, i, 1)?.exp()?)?;
        }
        // S ← S + β kᵀ (v − k S): the delta rule's error-correcting write.
        let u = (vi - ki.matmul(&s)?)?.broadcast_mul(&bi)?;
        s = (s + ki.transpose(2, 3)?.matmul(&u)?)?;
        outs.push(qi.matmul(&s)?);
    }
    Ok((Tensor::cat(&outs, 2)?, s))
}

/// One decode step (T = 1): the recurrence itself.
pub fn step(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    beta: &Tensor,
    g: Option<&Tensor>,
    s0: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    naive(q, k, v, beta, g, s0)
}

/// (I + L)⁻¹ for strictly lower-triangular L (X, C, C), by block doubling: with the inverse's
/// diagonal blocks of size s known (Inv_s), those of size 2s are `Inv_s − Inv_s L_s Inv_s`, where
/// L_s keeps the lower-left s×s block inside each 2s×2s diagonal block.
pub fn unit_lower_inverse(l: &Tensor) -> Result<Tensor> {
    let c = l.dim(D::Minus1)?;
    let mut inv: Option<Tensor> = None; // None = the identity (Inv_1)
    let mut s = 1;
    while s < c {
        let mask: Vec<f32> = (0..c * c)
            .map(|ij| {
                let (i, j) = (ij / c, ij % c);
                f32::from(i / (2 * s) == j / (2 * s) && i / s != j / s && i > j)
            })
            .collect();
        let lb = l.broadcast_mul(&Tensor::from_vec(mask, (c, c), l.device())?)?;
        inv = Some(match inv {
            None => {
                let eye = Tensor::eye(c, DType::F32, l.device())?;
                lb.neg()?.broadcast_add(&eye)?
            }
            Some(a) => (&a - a.matmul(&lb.matmul(&a)?)?)?,
        });
        s *= 2;
    }
    match inv {
        Some(a) => Ok(a),
        None => Tensor::eye(c, DType::F32, l.device())?.broadcast_as(l.shape())?.contiguous(),
    }
}

/// Chunkwise parallel form (WY representation); equal to [`naive`] up to float rounding. The
/// sequence is zero-padded to whole chunks (k = v = β = 0 rows leave the state unchanged).
pub fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    beta: &Tensor,
    g: Option<&Tensor>,
    s0: Option<&Tensor>,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    let (b, h, t, dk) = q.dims4()?;
    let dv = v.dim(3)?;
    let dev = q.device();
    let c = chunk.min(t).max(1);
    let n = t.div_ceil(c);
    // (B, H, T, d) -> (B·H·N, C, d), f32, zero-padded.
    let blocks = |x: &Tensor| -> Result<Tensor> {
        let x = crate::kernel::chunks(x, c)?;
        let d = x.dim(3)?;
        x.reshape((b * h * n, c, d))
    };
    let (q, k, v, beta) = (blocks(q)?, blocks(k)?, blocks(v)?, blocks(beta)?);
    let incl = Tensor::tril2(c, DType::F32, dev)?;
    let strict = (&incl - Tensor::eye(c, DType::F32, dev)?)?;
    let kt = k.t()?;
    let kk = k.matmul(&kt)?; // (X, C, C)
    let qk = q.matmul(&kt)?.broadcast_mul(&incl)?;
    // Decay factors: Γ (X, C, C), e^{b} (X, C, 1), e^{b_C − b} (X, C, 1), e^{b_C} (X, 1, 1).
    let decay = match g {
        None => None,
        Some(g) => {
            let bc = blocks(g)?.cumsum(1)?;
            let last = bc.narrow(1, c - 1, 1)?;
            let gamma = bc.broadcast_sub(&bc.t()?)?.broadcast_mul(&incl)?.exp()?.broadcast_mul(&incl)?;
            Some((gamma, bc.exp()?, last.broadcast_sub(&bc)?.exp()?, last.exp()?))
        }
    };
    let (l, a, kw) = match &decay {
        None => (kk.broadcast_mul(&strict)?, qk, k.broadcast_mul(&beta)?),
        Some((gamma, eb, _, _)) => {
            ((kk * gamma)?.broadcast_mul(&strict)?, (qk * gamma)?, k.broadcast_mul(&beta)?.broadcast_mul(eb)?)
        }
    };
    let tinv = unit_lower_inverse(&l.broadcast_mul(&beta)?)?;
    let u = tinv.matmul(&v.broadcast_mul(&beta)?)?; // (X, C, d_v)
    let w = tinv.matmul(&kw)?; // (X, C, d_k)
    let (qs, ktail, elast) = match &decay {
        None => (q, k, None),
        Some((_, eb, tail, last)) => {
            (q.broadcast_mul(eb)?, k.broadcast_mul(tail)?, Some(last.reshape((b * h, n, 1, 1))?))
        }
    };
    let per = |x: Tensor| -> Result<Tensor> {
        let (cc, d) = (x.dim(1)?, x.dim(2)?);
        x.reshape((b * h, n, cc, d))
    };
    let (u, w, a, qs, ktail) = (per(u)?, per(w)?, per(a)?, per(qs)?, per(ktail)?);
    let mut s = initial_state(s0, (b, h, dk, dv), dev)?.reshape((b * h, dk, dv))?;
    let mut outs = Vec::with_capacity(n);
    for i in 0..n {
        let at = |x: &Tensor| x.narrow(1, i, 1)?.squeeze(1);
        let ui = (at(&u)? - at(&w)?.matmul(&s)?)?;
        outs.push((at(&qs)?.matmul(&s)? + at(&a)?.matmul(&ui)?)?);
        let write = at(&ktail)?.t()?.matmul(&ui)?;
        s = match &elast {
            None => (s + write)?,
            Some(e) => (s.broadcast_mul(&at(e)?)? + write)?,
        };
    }
    let o = Tensor::cat(&outs, 1)?.narrow(1, 0, t)?.reshape((b, h, t, dv))?;
    Ok((o, s.reshape((b, h, dk, dv))?))
}
