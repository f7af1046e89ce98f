//! Retention (Sun et al. 2023, RetNet, eq. 1–8): `S_t = γ_h S_{t−1} + k_tᵀ v_t`, `o_t = q_t S_t`,
//! with a fixed decay per head γ_h = 1 − 2^{−5−h} (multi-scale retention, §2.2), RoPE on q and k
//! (standing in for xPos), q·k scaled by d_k^{−1/2}, a per-head norm on the output and a swish
//! gate: `Y = (swish(X W_G) ⊙ GN(O)) W_O`.
//!
//! Widths follow the paper and fla's `MultiScaleRetention` (`fla/layers/multiscale_retention.py`):
//! key width d, value width 2d (`expand_v = 2`). The output norm is the paper's GroupNorm by
//! default; fla uses an RMSNorm per head instead (`norm = "rms_norm"` selects it).

use crate::{check_heads_chunk, default_chunk, heads, recur, GatedOutput, OutputGate, OutputNorm, QkvConv};
use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{DType, Result, Tensor};
use zoo_core::mixer::{BuildCtx, LayerProbe, LayerState, Mixer, Phase};
use zoo_core::nn::{Linear, Rope, INIT_STD};
use zoo_core::params::Pb;

fn default_theta() -> f64 {
    10_000.0
}
fn two() -> f64 {
    2.0
}
fn group_norm() -> OutputNorm {
    OutputNorm::GroupNorm
}

/// `type = "retnet"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetNetConfig {
    pub n_heads: usize,
    #[serde(default = "default_chunk")]
    pub chunk: usize,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Key width as a multiple of d_model (default 1, the paper's and fla's).
    #[serde(default = "crate::one")]
    pub expand_k: f64,
    /// Value width as a multiple of d_model (default 2, the paper's and fla's).
    #[serde(default = "two")]
    pub expand_v: f64,
    /// Output gate activation, or `none` (default swish).
    #[serde(default)]
    pub output_gate: OutputGate,
    /// Per-head output norm: `group_norm` (the paper, default) or `rms_norm` (fla).
    #[serde(default = "group_norm")]
    pub norm: OutputNorm,
    /// Kernel size of a short causal conv + SiLU on q, k, v (fla's `use_short_conv`); 0 = off.
    #[serde(default)]
    pub short_conv: usize,
    /// e of the decays γ_h = 1 − 2^{−e−h} (default 5, the paper's and fla's). A larger e keeps
    /// memories longer: with two heads and e = 5 the slowest γ is 1 − 2⁻⁶, a half-life of 44
    /// tokens. Left out of the resolved config at its default.
    #[serde(default = "five", skip_serializing_if = "is_five")]
    pub decay_exponent: u32,
}

fn five() -> u32 {
    5
}
fn is_five(e: &u32) -> bool {
    *e == 5
}

impl RetNetConfig {
    /// (key width, value width).
    pub fn widths(&self, d_model: usize) -> std::result::Result<(usize, usize), String> {
        crate::kv_widths(d_model, self.expand_k, self.expand_v, self.n_heads)
    }

    fn check(&self, d_model: usize) -> std::result::Result<(), String> {
        check_heads_chunk(self.n_heads, d_model, self.chunk)?;
        let (dk, _) = self.widths(d_model)?;
        if self.decay_exponent == 0 {
            return Err("decay_exponent: must be at least 1 (e = 0 makes the first head's γ zero)".into());
        }
        if (dk / self.n_heads) % 2 != 0 {
            return Err("expand_k: the key head dim must be even for RoPE".into());
        }
        Ok(())
    }
}

/// log γ_h of the multi-scale decay γ_h = 1 − 2^{−e−h} for `n_heads` heads (the paper: e = 5).
pub fn retnet_log_gamma(n_heads: usize, e: u32) -> Vec<f64> {
    (0..n_heads).map(|i| (1.0 - 2f64.powi(-(e as i32) - i as i32)).ln()).collect()
}

pub struct Retention {
    cfg: RetNetConfig,
    q: Linear,
    k: Linear,
    v: Linear,
    out: GatedOutput,
    conv: Option<QkvConv>,
    rope: Rope,
    /// log γ_h, shaped (1, H, 1, 1).
    log_gamma: Tensor,
    dk: usize,
    dv: usize,
}

impl Retention {
    pub fn new(cfg: &RetNetConfig, ctx: &BuildCtx, pb: &Pb) -> Result<Self> {
        let d = ctx.d_model;
        let h = cfg.n_heads;
        let (dk, dv) = cfg.widths(d).map_err(zoo_core::candle_core::Error::msg)?;
        let lg: Vec<f32> = retnet_log_gamma(h, cfg.decay_exponent).into_iter().map(|x| x as f32).collect();
        let norm_name = match cfg.norm {
            OutputNorm::GroupNorm => "group_norm.weight",
            OutputNorm::RmsNorm => "g_norm.weight",
        };
        Ok(Self {
            q: Linear::new(&pb.pp("q_proj"), d, dk, false, INIT_STD)?,
            k: Linear::new(&pb.pp("k_proj"), d, dk, false, INIT_STD)?,
            v: Linear::new(&pb.pp("v_proj"), d, dv, false, INIT_STD)?,
            out: GatedOutput::new(pb, ctx, dv, h, cfg.output_gate, cfg.norm, norm_name)?,
            conv: QkvConv::new(&pb.pp("qkv_conv"), [dk, dk, dv], cfg.short_conv)?,
            rope: Rope::new(dk / h, ctx.max_seq_len.max(1), cfg.rope_theta, pb.device())?,
            log_gamma: Tensor::from_vec(lg, (1, h, 1, 1), pb.device())?,
            cfg: cfg.clone(),
            dk,
            dv,
        })
    }
}

impl Mixer for Retention {
    fn forward(
        &self,
        x: &Tensor,
        _phase: Phase,
        cache: Option<&mut LayerState>,
        _probe: Option<&mut LayerProbe>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let h = self.cfg.n_heads;
        let offset = cache.as_ref().map_or(0, |c| c.seen());
        let mut cache = cache;
        let (q, k, v) = crate::maybe_conv(&self.conv, [&self.q, &self.k, &self.v], x, cache.as_deref_mut())?;
        let q = (self.rope.apply(&heads(&q, h)?, offset)? * (1.0 / ((self.dk / h) as f64).sqrt()))?;
        let k = self.rope.apply(&heads(&k, h)?, offset)?;
        let v = heads(&v, h)?;
        let g = self.log_gamma.broadcast_as((b, h, t, 1))?;
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
        "retnet".into()
    }
}

zoo_core::mixer_spec!(RetNetConfig => Retention, check(d_model), [
    r#"n_heads = 2, chunk = 4"#,
    r#"n_heads = 2, chunk = 3, norm = "rms_norm", output_gate = "none", short_conv = 3"#,
    r#"n_heads = 1, expand_v = 1.0, output_gate = "sigmoid""#,
    r#"n_heads = 2, chunk = 4, decay_exponent = 9"#,
]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decays_follow_the_exponent_and_its_default_is_the_papers() {
        let g = retnet_log_gamma(2, 5);
        assert!((g[0].exp() - (1.0 - 1.0 / 32.0)).abs() < 1e-12 && (g[1].exp() - (1.0 - 1.0 / 64.0)).abs() < 1e-12, "{g:?}");
        let g = retnet_log_gamma(2, 9);
        assert!((g[1].exp() - (1.0 - 1.0 / 1024.0)).abs() < 1e-12, "{g:?}");
        let cfg: RetNetConfig = toml::from_str("n_heads = 2").unwrap();
        assert_eq!(cfg.decay_exponent, 5);
        // At its default the option is not written into resolved configs (older results stay equal).
        assert!(!toml::to_string(&cfg).unwrap().contains("decay_exponent"));
        let cfg: RetNetConfig = toml::from_str("n_heads = 2\ndecay_exponent = 0").unwrap();
        assert!(cfg.check(64).unwrap_err().contains("decay_exponent"));
    }
}
