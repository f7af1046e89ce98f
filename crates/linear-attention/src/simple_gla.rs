//! Simple GLA / Lightning: linear attention with one scalar decay per head,
//! `S_t = λ_{h,t} S_{t−1} + k_tᵀ v_t`.
//!
//! - `decay = "lightning"`: data-independent, TransNormerLLM / Lightning Attention-2's schedule:
//!   λ_h = exp(−s_h · (1 − l/(L−1) + 1e−5)) for layer l of L, with the ALiBi slopes s_h
//!   (Press et al. 2022; `_build_slope_tensor` in the lightning-attention reference).
//! - `decay = "data_dependent"`: log λ_t = logsigmoid(x_t w_h) / 16 (fla's Simple GLA).
//!
//! Output as in GLA: per-head RMSNorm and a swish gate, `Y = (RMSNorm(O) ⊙ swish(X W_r)) W_O`.

use crate::kernel::log_sigmoid;
use crate::{check_heads_chunk, default_chunk, heads, norm_gate_out, recur, state_bytes};
use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{DType, Result, Tensor};
use zoo_core::mixer::{BuildCtx, LayerCache, LayerProbe, Mixer};
use zoo_core::nn::{residual_std, Linear, INIT_STD};
use zoo_core::params::{Group, Init, Pb};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScalarDecay {
    #[default]
    Lightning,
    DataDependent,
}

/// `type = "simple_gla"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimpleGlaConfig {
    pub n_heads: usize,
    #[serde(default)]
    pub decay: ScalarDecay,
    #[serde(default = "default_chunk")]
    pub chunk: usize,
}

impl SimpleGlaConfig {
    pub fn validate(&self, d_model: usize) -> std::result::Result<(), String> {
        check_heads_chunk(self.n_heads, d_model, self.chunk)
    }
}

/// ALiBi slopes for `n` heads: 2^(−8(h+1)/n) for a power of two, else the closest power of two's
/// slopes followed by every other slope of twice that many heads (Press et al. 2022).
pub fn alibi_slopes(n: usize) -> Vec<f64> {
    fn pow2(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
        (0..n).map(|i| start * start.powi(i as i32)).collect()
    }
    if n.is_power_of_two() {
        return pow2(n);
    }
    let closest = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let mut s = pow2(closest);
    s.extend(alibi_slopes(2 * closest).into_iter().step_by(2).take(n - closest));
    s
}

/// log λ_h of the Lightning schedule for layer `layer` of `n_layers`.
pub fn lightning_log_decay(n_heads: usize, layer: usize, n_layers: usize) -> Vec<f64> {
    let depth = if n_layers <= 1 { 1.0 + 1e-5 } else { 1.0 - layer as f64 / (n_layers - 1) as f64 + 1e-5 };
    alibi_slopes(n_heads).into_iter().map(|s| -s * depth).collect()
}

pub struct SimpleGla {
    cfg: SimpleGlaConfig,
    q: Linear,
    k: Linear,
    v: Linear,
    r: Linear,
    o: Linear,
    /// Data-dependent: the per-head gate projection.
    g: Option<Linear>,
    /// Lightning: fixed log λ_h, (1, H, 1, 1).
    fixed: Option<Tensor>,
    norm: Tensor,
    d: usize,
}

impl SimpleGla {
    pub fn new(cfg: &SimpleGlaConfig, ctx: &BuildCtx, pb: &Pb) -> Result<Self> {
        let d = ctx.d_model;
        let h = cfg.n_heads;
        let (g, fixed) = match cfg.decay {
            ScalarDecay::DataDependent => (Some(Linear::new(&pb.pp("gk_proj"), d, h, true, INIT_STD)?), None),
            ScalarDecay::Lightning => {
                let lg: Vec<f32> =
                    lightning_log_decay(h, ctx.layer, ctx.n_layers).into_iter().map(|x| x as f32).collect();
                (None, Some(Tensor::from_vec(lg, (1, h, 1, 1), pb.device())?))
            }
        };
        Ok(Self {
            q: Linear::new(&pb.pp("q_proj"), d, d, false, INIT_STD)?,
            k: Linear::new(&pb.pp("k_proj"), d, d, false, INIT_STD)?,
            v: Linear::new(&pb.pp("v_proj"), d, d, false, INIT_STD)?,
            r: Linear::new(&pb.pp("g_proj"), d, d, false, INIT_STD)?,
            o: Linear::new(&pb.pp("o_proj"), d, d, false, residual_std(ctx.n_layers))?,
            norm: pb.get("g_norm.weight", d / h, Init::Const(1.0), Group::NoDecay)?,
            g,
            fixed,
            cfg: cfg.clone(),
            d,
        })
    }
}

impl Mixer for SimpleGla {
    fn forward(&self, x: &Tensor, cache: Option<&mut LayerCache>, _probe: Option<&mut LayerProbe>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let h = self.cfg.n_heads;
        let q = (heads(&self.q.forward(x)?, h)? * (1.0 / ((self.d / h) as f64).sqrt()))?;
        let k = heads(&self.k.forward(x)?, h)?;
        let v = heads(&self.v.forward(x)?, h)?;
        let g = match (&self.g, &self.fixed) {
            (Some(proj), _) => {
                let logits = proj.forward(x)?.to_dtype(DType::F32)?; // (B, T, H)
                (log_sigmoid(&logits)? / 16.0)?.transpose(1, 2)?.unsqueeze(3)? // (B, H, T, 1)
            }
            (None, Some(f)) => f.broadcast_as((b, h, t, 1))?,
            (None, None) => unreachable!("one decay source is always built"),
        };
        let o = recur(&q, &k, &v, Some(&g), cache, self.cfg.chunk)?;
        norm_gate_out(&o, &self.norm, &self.r, &self.o, x)
    }

    fn cache_bytes(&self, batch: usize, _seq_len: usize, _dtype: DType) -> usize {
        let hd = self.d / self.cfg.n_heads;
        state_bytes(batch, self.cfg.n_heads, hd, hd)
    }

    fn kind(&self) -> String {
        format!("simple_gla({:?})", self.cfg.decay).to_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alibi_slopes_match_the_reference_schedule() {
        // 8 heads: 2^-1 .. 2^-8.
        let s = alibi_slopes(8);
        for (i, x) in s.iter().enumerate() {
            assert!((x - 2f64.powi(-(i as i32) - 1)).abs() < 1e-15);
        }
        // 6 heads: the 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then slopes 0 and 2 of 8 heads: 2^-1, 2^-3.
        let s = alibi_slopes(6);
        let want = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125];
        for (a, b) in s.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{s:?}");
        }
        // The first layer decays most, the last layer barely (1e-5 of the slope).
        let first = lightning_log_decay(8, 0, 4);
        let last = lightning_log_decay(8, 3, 4);
        assert!((first[0] + 0.5 * (1.0 + 1e-5)).abs() < 1e-12);
        assert!((last[0] + 0.5 * 1e-5).abs() < 1e-12);
    }
}
