//! Simple GLA / Lightning: linear attention with one scalar decay per head,
//! `S_t = λ_{h,t} S_{t−1} + k_tᵀ v_t`.
//!
//! - `decay = "lightning"`: data-independent, TransNormerLLM / Lightning Attention-2's schedule:
//!   λ_h = exp(−s_h · (1 − l/(L−1) + 1e−5)) for layer l of L, with the ALiBi slopes s_h
//!   (Press et al. 2022; `_build_slope_tensor` in the lightning-attention reference). l and L count
//!   only the stack's Simple GLA layers ([`BuildCtx::kind_layer`]), not the convolutions or
//!   attention layers around them: TransNormerLLM's stack is all Lightning layers.
//! - `decay = "data_dependent"`: log λ_t = logsigmoid(x_t w_h) / `gate_normalizer` (fla's
//!   `SimpleGatedLinearAttention`, `fla/layers/simple_gla.py`).
//!
//! Output as in GLA: per-head RMSNorm and a swish gate, `Y = (RMSNorm(O) ⊙ swish(X W_r)) W_O`.
//! Defaults follow fla's layer (key and value width d, swish output gate, a short convolution of
//! size 4 on q, k and v), except the decay: `lightning` unless `decay = "data_dependent"` (fla's
//! only decay). TransNormerLLM's Lightning layers have no short convolution: set `short_conv = 0`.

use crate::kernel::log_sigmoid;
use crate::{check_heads_chunk, default_chunk, heads, recur, GatedOutput, OutputGate, OutputNorm, QkvConv};
use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{DType, Result, Tensor};
use zoo_core::mixer::{BuildCtx, LayerProbe, LayerState, Mixer, Phase};
use zoo_core::nn::{Linear, INIT_STD};
use zoo_core::params::Pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScalarDecay {
    #[default]
    Lightning,
    DataDependent,
}

fn default_norm() -> f64 {
    16.0
}

fn default_conv() -> usize {
    4
}

/// `type = "simple_gla"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimpleGlaConfig {
    pub n_heads: usize,
    #[serde(default)]
    pub decay: ScalarDecay,
    /// `data_dependent` only: log λ = logsigmoid(·) / this (fla's `gate_logit_normalizer`, 16).
    #[serde(default = "default_norm")]
    pub gate_normalizer: f64,
    /// Key width as a multiple of d_model (fla's `expand_k`, default 1).
    #[serde(default = "crate::one")]
    pub expand_k: f64,
    /// Value width as a multiple of d_model (fla's `expand_v`, default 1).
    #[serde(default = "crate::one")]
    pub expand_v: f64,
    /// Output gate activation, or `none` (default swish).
    #[serde(default)]
    pub output_gate: OutputGate,
    /// Kernel size of a short causal conv + SiLU on q, k, v (fla's `use_short_conv`, `conv_size`);
    /// 0 = off. Default 4, as fla's layer.
    #[serde(default = "default_conv")]
    pub short_conv: usize,
    #[serde(default = "default_chunk")]
    pub chunk: usize,
}

impl SimpleGlaConfig {
    /// (key width, value width).
    pub fn widths(&self, d_model: usize) -> std::result::Result<(usize, usize), String> {
        crate::kv_widths(d_model, self.expand_k, self.expand_v, self.n_heads)
    }

    fn check(&self, d_model: usize) -> std::result::Result<(), String> {
        check_heads_chunk(self.n_heads, d_model, self.chunk)?;
        if !(self.gate_normalizer > 0.0) || !self.gate_normalizer.is_finite() {
            return Err("gate_normalizer: must be positive".into());
        }
        self.widths(d_model).map(|_| ())
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
    /// Data-dependent: the per-head gate projection.
    g: Option<Linear>,
    /// Lightning: fixed log λ_h, (1, H, 1, 1).
    fixed: Option<Tensor>,
    out: GatedOutput,
    conv: Option<QkvConv>,
    dk: usize,
    dv: usize,
}

impl SimpleGla {
    pub fn new(cfg: &SimpleGlaConfig, ctx: &BuildCtx, pb: &Pb) -> Result<Self> {
        let d = ctx.d_model;
        let h = cfg.n_heads;
        let (dk, dv) = cfg.widths(d).map_err(zoo_core::candle_core::Error::msg)?;
        let (g, fixed) = match cfg.decay {
            ScalarDecay::DataDependent => (Some(Linear::new(&pb.pp("gk_proj"), d, h, true, INIT_STD)?), None),
            ScalarDecay::Lightning => {
                let lg: Vec<f32> =
                    lightning_log_decay(h, ctx.kind_layer, ctx.kind_layers).into_iter().map(|x| x as f32).collect();
                (None, Some(Tensor::from_vec(lg, (1, h, 1, 1), pb.device())?))
            }
        };
        Ok(Self {
            q: Linear::new(&pb.pp("q_proj"), d, dk, false, INIT_STD)?,
            k: Linear::new(&pb.pp("k_proj"), d, dk, false, INIT_STD)?,
            v: Linear::new(&pb.pp("v_proj"), d, dv, false, INIT_STD)?,
            out: GatedOutput::new(pb, ctx, dv, h, cfg.output_gate, OutputNorm::RmsNorm, "g_norm.weight")?,
            conv: QkvConv::new(&pb.pp("qkv_conv"), [dk, dk, dv], cfg.short_conv)?,
            g,
            fixed,
            cfg: cfg.clone(),
            dk,
            dv,
        })
    }

    /// log λ of this layer's Lightning schedule, (1, H, 1, 1); `None` for the data-dependent decay.
    pub fn fixed_log_decay(&self) -> Option<&Tensor> {
        self.fixed.as_ref()
    }
}

impl Mixer for SimpleGla {
    fn forward(
        &self,
        x: &Tensor,
        _phase: Phase,
        cache: Option<&mut LayerState>,
        _probe: Option<&mut LayerProbe>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let h = self.cfg.n_heads;
        let mut cache = cache;
        let (q, k, v) = crate::maybe_conv(&self.conv, [&self.q, &self.k, &self.v], x, cache.as_deref_mut())?;
        let q = (heads(&q, h)? * (1.0 / ((self.dk / h) as f64).sqrt()))?;
        let (k, v) = (heads(&k, h)?, heads(&v, h)?);
        let g = match (&self.g, &self.fixed) {
            (Some(proj), _) => {
                let logits = proj.forward(x)?.to_dtype(DType::F32)?; // (B, T, H)
                (log_sigmoid(&logits)? / self.cfg.gate_normalizer)?.transpose(1, 2)?.unsqueeze(3)?
                // (B, H, T, 1)
            }
            (None, Some(f)) => f.broadcast_as((b, h, t, 1))?,
            (None, None) => unreachable!("one decay source is always built"),
        };
        let o = recur(&q, &k, &v, Some(&g), cache.as_deref_mut(), self.cfg.chunk)?;
        self.out.forward(&o, x)
    }

    fn new_state(&self, _capacity: usize) -> LayerState {
        crate::recurrent_state()
    }

    fn cache_bytes(&self, batch: usize, _seq_len: usize, dtype: DType) -> usize {
        crate::recurrent_bytes(batch, self.cfg.n_heads, self.dk, self.dv, &self.conv, dtype)
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

zoo_core::mixer_spec!(SimpleGlaConfig => SimpleGla, check(d_model), [
    r#"n_heads = 2, chunk = 4"#,
    r#"n_heads = 2, decay = "data_dependent", chunk = 3"#,
    r#"n_heads = 2, decay = "data_dependent", expand_k = 0.5, short_conv = 4, output_gate = "none""#,
    r#"n_heads = 2, expand_v = 2.0, gate_normalizer = 8.0, chunk = 5"#,
]);
