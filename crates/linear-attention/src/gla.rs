//! Gated Linear Attention (Yang et al. 2024, eq. 3–4 and §4.1): `S_t = Diag(α_t) S_{t−1} + k_tᵀ v_t`
//! with a data-dependent per-channel decay from a rank-16 projection,
//! `log α_t = logsigmoid(x_t W_1 W_2 + b) / 16`, kept in log space, the state in f32; the output
//! is normalised per head (RMSNorm) and gated: `Y = (RMSNorm(O) ⊙ swish(X W_r)) W_O`.
//!
//! Defaults follow fla's `GatedLinearAttention` layer (`fla/layers/gla.py`), which is also the layer
//! Zoology's GLA MQAR runs use (`zoology/mixers/gla.py`): key width `0.5·d` (`expand_k`), value
//! width `d` (`expand_v`), rank-16 gate, normaliser 16, swish output gate, no short convolution.

use crate::kernel::log_sigmoid;
use crate::{check_heads_chunk, default_chunk, heads, recur, GatedOutput, OutputGate, OutputNorm, QkvConv};
use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{DType, Result, Tensor};
use zoo_core::mixer::{BuildCtx, LayerProbe, LayerState, Mixer, Phase};
use zoo_core::nn::{Linear, INIT_STD};
use zoo_core::params::Pb;

fn default_rank() -> usize {
    16
}
fn default_norm() -> f64 {
    16.0
}
fn half() -> f64 {
    0.5
}

/// `type = "gla"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlaConfig {
    pub n_heads: usize,
    /// Rank of the gate projection W_1 W_2.
    #[serde(default = "default_rank")]
    pub gate_rank: usize,
    /// The gate logit normaliser (log α = logsigmoid(·) / this).
    #[serde(default = "default_norm")]
    pub gate_normalizer: f64,
    /// Kernel size of an optional short causal conv + SiLU on q, k, v (fla's `use_short_conv`); 0 = off.
    #[serde(default)]
    pub short_conv: usize,
    /// Key (and decay) width as a multiple of d_model (fla's `expand_k`, default 0.5).
    #[serde(default = "half")]
    pub expand_k: f64,
    /// Value width as a multiple of d_model (fla's `expand_v`, default 1).
    #[serde(default = "crate::one")]
    pub expand_v: f64,
    /// Output gate activation, or `none` (fla's `use_output_gate` / `gate_fn`; default swish).
    #[serde(default)]
    pub output_gate: OutputGate,
    #[serde(default = "default_chunk")]
    pub chunk: usize,
}

impl GlaConfig {
    /// (key width, value width).
    pub fn widths(&self, d_model: usize) -> std::result::Result<(usize, usize), String> {
        crate::kv_widths(d_model, self.expand_k, self.expand_v, self.n_heads)
    }

    fn check(&self, d_model: usize) -> std::result::Result<(), String> {
        check_heads_chunk(self.n_heads, d_model, self.chunk)?;
        self.widths(d_model)?;
        if self.gate_rank == 0 {
            return Err("gate_rank: must be at least 1".into());
        }
        if self.gate_normalizer <= 0.0 {
            return Err("gate_normalizer: must be positive".into());
        }
        Ok(())
    }
}

pub struct Gla {
    cfg: GlaConfig,
    q: Linear,
    k: Linear,
    v: Linear,
    gk1: Linear,
    gk2: Linear,
    out: GatedOutput,
    conv: Option<QkvConv>,
    dk: usize,
    dv: usize,
}

impl Gla {
    pub fn new(cfg: &GlaConfig, ctx: &BuildCtx, pb: &Pb) -> Result<Self> {
        let d = ctx.d_model;
        let (dk, dv) = cfg.widths(d).map_err(zoo_core::candle_core::Error::msg)?;
        Ok(Self {
            q: Linear::new(&pb.pp("q_proj"), d, dk, false, INIT_STD)?,
            k: Linear::new(&pb.pp("k_proj"), d, dk, false, INIT_STD)?,
            v: Linear::new(&pb.pp("v_proj"), d, dv, false, INIT_STD)?,
            gk1: Linear::new(&pb.pp("gk_proj.0"), d, cfg.gate_rank, false, INIT_STD)?,
            gk2: Linear::new(&pb.pp("gk_proj.1"), cfg.gate_rank, dk, true, INIT_STD)?,
            out: GatedOutput::new(pb, ctx, dv, cfg.n_heads, cfg.output_gate, OutputNorm::RmsNorm, "g_norm.weight")?,
            conv: QkvConv::new(&pb.pp("qkv_conv"), [dk, dk, dv], cfg.short_conv)?,
            cfg: cfg.clone(),
            dk,
            dv,
        })
    }
}

impl Mixer for Gla {
    fn forward(
        &self,
        x: &Tensor,
        _phase: Phase,
        cache: Option<&mut LayerState>,
        _probe: Option<&mut LayerProbe>,
    ) -> Result<Tensor> {
        let h = self.cfg.n_heads;
        let scale = 1.0 / ((self.dk / h) as f64).sqrt();
        let mut cache = cache;
        let (q, k, v) = crate::maybe_conv(&self.conv, [&self.q, &self.k, &self.v], x, cache.as_deref_mut())?;
        let q = (heads(&q, h)? * scale)?;
        let (k, v) = (heads(&k, h)?, heads(&v, h)?);
        let logits = self.gk2.forward(&self.gk1.forward(x)?)?.to_dtype(DType::F32)?;
        let g = heads(&(log_sigmoid(&logits)? / self.cfg.gate_normalizer)?, h)?;
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
        "gla".into()
    }
}

zoo_core::mixer_spec!(GlaConfig => Gla, check(d_model), [
    r#"n_heads = 2, chunk = 4, gate_rank = 4"#,
    r#"n_heads = 2, chunk = 4, short_conv = 4"#,
    r#"n_heads = 2, chunk = 3, expand_k = 1.0, expand_v = 2.0, output_gate = "none""#,
    r#"n_heads = 1, output_gate = "sigmoid", short_conv = 2, gate_normalizer = 4.0"#,
]);
