//! Retention (Sun et al. 2023, RetNet, eq. 1–8): `S_t = γ_h S_{t−1} + k_tᵀ v_t`, `o_t = q_t S_t`,
//! with a fixed decay per head γ_h = 1 − 2^{−5−h} (multi-scale retention, §2.2), RoPE on q and k
//! (standing in for xPos), k scaled by d_k^{−1/2}, a per-head GroupNorm on the output and a swish
//! gate: `Y = (swish(X W_G) ⊙ GN(O)) W_O`.

use crate::kernel::head_layer_norm;
use crate::{check_heads_chunk, default_chunk, heads, merge, recur, state_bytes};
use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{DType, Result, Tensor};
use zoo_core::mixer::{BuildCtx, LayerCache, LayerProbe, Mixer};
use zoo_core::nn::{residual_std, Linear, Rope, INIT_STD};
use zoo_core::params::{Group, Init, Pb};

fn default_theta() -> f64 {
    10_000.0
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
}

impl RetNetConfig {
    pub fn validate(&self, d_model: usize) -> std::result::Result<(), String> {
        check_heads_chunk(self.n_heads, d_model, self.chunk)?;
        if (d_model / self.n_heads) % 2 != 0 {
            return Err("n_heads: head dim must be even for RoPE".into());
        }
        Ok(())
    }
}

pub struct Retention {
    cfg: RetNetConfig,
    q: Linear,
    k: Linear,
    v: Linear,
    gate: Linear,
    o: Linear,
    gn: Tensor,
    rope: Rope,
    /// log γ_h, shaped (1, H, 1, 1).
    log_gamma: Tensor,
    d: usize,
}

impl Retention {
    pub fn new(cfg: &RetNetConfig, ctx: &BuildCtx, pb: &Pb) -> Result<Self> {
        let d = ctx.d_model;
        let h = cfg.n_heads;
        let lg: Vec<f32> = (0..h).map(|i| (1.0 - 2f64.powi(-5 - i as i32)).ln() as f32).collect();
        Ok(Self {
            q: Linear::new(&pb.pp("q_proj"), d, d, false, INIT_STD)?,
            k: Linear::new(&pb.pp("k_proj"), d, d, false, INIT_STD)?,
            v: Linear::new(&pb.pp("v_proj"), d, d, false, INIT_STD)?,
            gate: Linear::new(&pb.pp("g_proj"), d, d, false, INIT_STD)?,
            o: Linear::new(&pb.pp("o_proj"), d, d, false, residual_std(ctx.n_layers))?,
            gn: pb.get("group_norm.weight", d / h, Init::Const(1.0), Group::NoDecay)?,
            rope: Rope::new(d / h, ctx.max_seq_len.max(1), cfg.rope_theta, pb.device())?,
            log_gamma: Tensor::from_vec(lg, (1, h, 1, 1), pb.device())?,
            cfg: cfg.clone(),
            d,
        })
    }
}

impl Mixer for Retention {
    fn forward(&self, x: &Tensor, cache: Option<&mut LayerCache>, _probe: Option<&mut LayerProbe>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let h = self.cfg.n_heads;
        let offset = cache.as_ref().map_or(0, |c| c.seen);
        let q = self.rope.apply(&heads(&self.q.forward(x)?, h)?, offset)?;
        let k = (self.rope.apply(&heads(&self.k.forward(x)?, h)?, offset)? * (1.0 / ((self.d / h) as f64).sqrt()))?;
        let v = heads(&self.v.forward(x)?, h)?;
        let g = self.log_gamma.broadcast_as((b, h, t, 1))?;
        let o = recur(&q, &k, &v, Some(&g), cache, self.cfg.chunk)?;
        let o = head_layer_norm(&o, &self.gn, 1e-5)?.to_dtype(x.dtype())?;
        self.o.forward(&(self.gate.forward(x)?.silu()? * merge(&o)?)?)
    }

    fn cache_bytes(&self, batch: usize, _seq_len: usize, _dtype: DType) -> usize {
        let hd = self.d / self.cfg.n_heads;
        state_bytes(batch, self.cfg.n_heads, hd, hd)
    }

    fn kind(&self) -> String {
        "retnet".into()
    }
}
