//! Linear attention (Katharopoulos et al. 2020, eq. 4–6): `o_t = φ(q_t) Σ_{s≤t} φ(k_s)ᵀ v_s`,
//! optionally divided by the normaliser `φ(q_t) Σ_{s≤t} φ(k_s)ᵀ`. The normaliser rides in the same
//! recurrence as an extra all-ones value column, so S is (d_k, d_v + 1).

use crate::{check_heads_chunk, default_chunk, heads, merge, recur, state_bytes};
use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{DType, Result, Tensor, D};
use zoo_core::mixer::{BuildCtx, LayerProbe, LayerState, Mixer, Phase};
use zoo_core::nn::{residual_std, Linear, INIT_STD};
use zoo_core::params::Pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FeatureMap {
    /// elu(x) + 1 (Katharopoulos et al. 2020, eq. 7).
    #[default]
    Elu1,
    Relu,
    Identity,
}

fn yes() -> bool {
    true
}

/// `type = "linear_attention"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearAttentionConfig {
    pub n_heads: usize,
    #[serde(default)]
    pub feature_map: FeatureMap,
    /// Divide by φ(q)·Σφ(k) (the paper's denominator).
    #[serde(default = "yes")]
    pub normalize: bool,
    #[serde(default = "default_chunk")]
    pub chunk: usize,
}

impl LinearAttentionConfig {
    fn check(&self, d_model: usize) -> std::result::Result<(), String> {
        check_heads_chunk(self.n_heads, d_model, self.chunk)?;
        if self.normalize && self.feature_map == FeatureMap::Identity {
            return Err("normalize: the identity feature map can make the denominator zero; use elu1 or relu".into());
        }
        Ok(())
    }
}

pub struct LinearAttention {
    cfg: LinearAttentionConfig,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    d: usize,
}

impl LinearAttention {
    pub fn new(cfg: &LinearAttentionConfig, ctx: &BuildCtx, pb: &Pb) -> Result<Self> {
        let d = ctx.d_model;
        Ok(Self {
            cfg: cfg.clone(),
            q: Linear::new(&pb.pp("q_proj"), d, d, false, INIT_STD)?,
            k: Linear::new(&pb.pp("k_proj"), d, d, false, INIT_STD)?,
            v: Linear::new(&pb.pp("v_proj"), d, d, false, INIT_STD)?,
            o: Linear::new(&pb.pp("o_proj"), d, d, false, residual_std(ctx.n_layers))?,
            d,
        })
    }

    fn phi(&self, x: &Tensor) -> Result<Tensor> {
        match self.cfg.feature_map {
            FeatureMap::Elu1 => x.elu(1.0)? + 1.0,
            FeatureMap::Relu => x.relu(),
            FeatureMap::Identity => Ok(x.clone()),
        }
    }
}

impl Mixer for LinearAttention {
    fn forward(
        &self,
        x: &Tensor,
        _phase: Phase,
        cache: Option<&mut LayerState>,
        _probe: Option<&mut LayerProbe>,
    ) -> Result<Tensor> {
        let h = self.cfg.n_heads;
        let q = self.phi(&heads(&self.q.forward(x)?, h)?)?;
        let k = self.phi(&heads(&self.k.forward(x)?, h)?)?;
        let mut v = heads(&self.v.forward(x)?, h)?;
        if self.cfg.normalize {
            let ones = Tensor::ones((v.dim(0)?, h, v.dim(2)?, 1), v.dtype(), v.device())?;
            v = Tensor::cat(&[&v, &ones], D::Minus1)?;
        }
        let o = recur(&q, &k, &v, None, cache, self.cfg.chunk)?;
        let o = if self.cfg.normalize {
            let dv = o.dim(3)? - 1;
            o.narrow(3, 0, dv)?.broadcast_div(&(o.narrow(3, dv, 1)? + 1e-6)?)?
        } else {
            o
        };
        self.o.forward(&merge(&o.to_dtype(x.dtype())?)?)
    }

    fn new_state(&self, _capacity: usize) -> LayerState {
        crate::recurrent_state()
    }

    fn cache_bytes(&self, batch: usize, _seq_len: usize, _dtype: DType) -> usize {
        let hd = self.d / self.cfg.n_heads;
        state_bytes(batch, self.cfg.n_heads, hd, hd + usize::from(self.cfg.normalize))
    }

    fn kind(&self) -> String {
        "linear_attention".into()
    }
}

zoo_core::mixer_spec!(LinearAttentionConfig => LinearAttention, check(d_model), [
    r#"n_heads = 2, chunk = 4"#,
    r#"n_heads = 2, feature_map = "relu", chunk = 5"#,
    r#"n_heads = 2, feature_map = "identity", normalize = false"#,
]);
