//! Gated Linear Attention (Yang et al. 2024, eq. 3–4 and §4.1): `S_t = Diag(α_t) S_{t−1} + k_tᵀ v_t`
//! with a data-dependent per-channel decay from a rank-16 projection,
//! `log α_t = logsigmoid(x_t W_1 W_2 + b) / 16`, kept in log space, the state in f32; the output
//! is normalised per head (RMSNorm) and gated: `Y = (RMSNorm(O) ⊙ swish(X W_r)) W_O`.

use crate::kernel::log_sigmoid;
use crate::{check_heads_chunk, default_chunk, heads, norm_gate_out, recur, state_bytes, QkvConv};
use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{DType, Result, Tensor};
use zoo_core::mixer::{BuildCtx, LayerCache, LayerProbe, Mixer};
use zoo_core::nn::{residual_std, Linear, INIT_STD};
use zoo_core::params::{Group, Init, Pb};

fn default_rank() -> usize {
    16
}
fn default_norm() -> f64 {
    16.0
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
    #[serde(default = "default_chunk")]
    pub chunk: usize,
}

impl GlaConfig {
    pub fn validate(&self, d_model: usize) -> std::result::Result<(), String> {
        check_heads_chunk(self.n_heads, d_model, self.chunk)?;
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
    r: Linear,
    o: Linear,
    norm: Tensor,
    conv: Option<QkvConv>,
    d: usize,
}

impl Gla {
    pub fn new(cfg: &GlaConfig, ctx: &BuildCtx, pb: &Pb) -> Result<Self> {
        let d = ctx.d_model;
        Ok(Self {
            q: Linear::new(&pb.pp("q_proj"), d, d, false, INIT_STD)?,
            k: Linear::new(&pb.pp("k_proj"), d, d, false, INIT_STD)?,
            v: Linear::new(&pb.pp("v_proj"), d, d, false, INIT_STD)?,
            gk1: Linear::new(&pb.pp("gk_proj.0"), d, cfg.gate_rank, false, INIT_STD)?,
            gk2: Linear::new(&pb.pp("gk_proj.1"), cfg.gate_rank, d, true, INIT_STD)?,
            r: Linear::new(&pb.pp("g_proj"), d, d, false, INIT_STD)?,
            o: Linear::new(&pb.pp("o_proj"), d, d, false, residual_std(ctx.n_layers))?,
            norm: pb.get("g_norm.weight", d / cfg.n_heads, Init::Const(1.0), Group::NoDecay)?,
            conv: QkvConv::new(&pb.pp("qkv_conv"), [d, d, d], cfg.short_conv)?,
            cfg: cfg.clone(),
            d,
        })
    }
}

impl Mixer for Gla {
    fn forward(&self, x: &Tensor, cache: Option<&mut LayerCache>, _probe: Option<&mut LayerProbe>) -> Result<Tensor> {
        let h = self.cfg.n_heads;
        let scale = 1.0 / ((self.d / h) as f64).sqrt();
        let mut cache = cache;
        let (q, k, v, hist) = crate::maybe_conv(&self.conv, [&self.q, &self.k, &self.v], x, cache.as_deref())?;
        let q = (heads(&q, h)? * scale)?;
        let (k, v) = (heads(&k, h)?, heads(&v, h)?);
        let logits = self.gk2.forward(&self.gk1.forward(x)?)?.to_dtype(DType::F32)?;
        let g = heads(&(log_sigmoid(&logits)? / self.cfg.gate_normalizer)?, h)?;
        let o = recur(&q, &k, &v, Some(&g), cache.as_deref_mut(), self.cfg.chunk)?;
        crate::keep_hist(cache, hist);
        norm_gate_out(&o, &self.norm, &self.r, &self.o, x)
    }

    fn cache_bytes(&self, batch: usize, _seq_len: usize, dtype: DType) -> usize {
        let hd = self.d / self.cfg.n_heads;
        state_bytes(batch, self.cfg.n_heads, hd, hd) + self.conv.as_ref().map_or(0, |c| c.cache_bytes(batch, dtype))
    }

    fn kind(&self) -> String {
        "gla".into()
    }
}
