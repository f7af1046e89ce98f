//! Based (Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
//! tradeoff", §3): linear attention with the 2nd-order Taylor feature map of exp on low-dimensional
//! (d′ = 16) projections,
//! `φ(q)·φ(k) = 1 + q·k/√d′ + (q·k)²/(2d′)`, via `φ(x) = [1, x/d′^{1/4}, (x ⊗ x)/(√2·√d′)]`
//! (1 + d′ + d′² features per head), with the denominator.
//! The paper pairs it with small sliding-window softmax attention (window 64); here that is a
//! hybrid pattern: `mixers.win = { type = "attention", n_heads = H, window = 64 }`.

use crate::{check_heads_chunk, default_chunk, heads, merge, recur, QkvConv};
use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{DType, Result, Tensor, D};
use zoo_core::mixer::{BuildCtx, LayerProbe, LayerState, Mixer, Phase};
use zoo_core::nn::{residual_std, Linear, INIT_STD};
use zoo_core::params::Pb;

fn default_feature_dim() -> usize {
    16
}

/// `type = "based"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasedConfig {
    pub n_heads: usize,
    /// d′: the per-head width of the q/k projections fed to the Taylor map.
    #[serde(default = "default_feature_dim")]
    pub feature_dim: usize,
    /// Kernel size of an optional short causal conv + SiLU on q, k, v; 0 = off.
    #[serde(default)]
    pub short_conv: usize,
    #[serde(default = "default_chunk")]
    pub chunk: usize,
}

impl BasedConfig {
    fn check(&self, d_model: usize) -> std::result::Result<(), String> {
        check_heads_chunk(self.n_heads, d_model, self.chunk)?;
        if self.feature_dim == 0 {
            return Err("feature_dim: must be at least 1".into());
        }
        Ok(())
    }
}

/// The Taylor feature map on the last dim: (…, d′) -> (…, 1 + d′ + d′²).
pub fn taylor_features(x: &Tensor) -> Result<Tensor> {
    let dp = x.dim(D::Minus1)?;
    let dims = x.dims().to_vec();
    let lead = &dims[..dims.len() - 1];
    let outer = x.unsqueeze(D::Minus1)?.broadcast_mul(&x.unsqueeze(x.rank() - 1)?)?; // (…, d′, d′)
    let outer = outer.reshape([lead, &[dp * dp]].concat())?;
    let ones = Tensor::ones([lead, &[1]].concat(), x.dtype(), x.device())?;
    let lin = (x / (dp as f64).powf(0.25))?;
    let quad = (outer / (2f64.sqrt() * (dp as f64).sqrt()))?;
    Tensor::cat(&[&ones, &lin, &quad], D::Minus1)
}

pub struct Based {
    cfg: BasedConfig,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    conv: Option<QkvConv>,
    d: usize,
}

impl Based {
    pub fn new(cfg: &BasedConfig, ctx: &BuildCtx, pb: &Pb) -> Result<Self> {
        let d = ctx.d_model;
        let f = cfg.feature_dim * cfg.n_heads;
        Ok(Self {
            q: Linear::new(&pb.pp("q_proj"), d, f, false, INIT_STD)?,
            k: Linear::new(&pb.pp("k_proj"), d, f, false, INIT_STD)?,
            v: Linear::new(&pb.pp("v_proj"), d, d, false, INIT_STD)?,
            o: Linear::new(&pb.pp("o_proj"), d, d, false, residual_std(ctx.n_layers))?,
            conv: QkvConv::new(&pb.pp("qkv_conv"), [f, f, d], cfg.short_conv)?,
            cfg: cfg.clone(),
            d,
        })
    }
}

impl Mixer for Based {
    fn forward(
        &self,
        x: &Tensor,
        _phase: Phase,
        cache: Option<&mut LayerState>,
        _probe: Option<&mut LayerProbe>,
    ) -> Result<Tensor> {
        let h = self.cfg.n_heads;
        let mut cache = cache;
        let (q, k, v) = crate::maybe_conv(&self.conv, [&self.q, &self.k, &self.v], x, cache.as_deref_mut())?;
        let q = taylor_features(&heads(&q, h)?)?;
        let k = taylor_features(&heads(&k, h)?)?;
        let v = heads(&v, h)?;
        // The denominator rides in the recurrence as an all-ones value column.
        let ones = Tensor::ones((v.dim(0)?, h, v.dim(2)?, 1), v.dtype(), v.device())?;
        let v = Tensor::cat(&[&v, &ones], D::Minus1)?;
        let o = recur(&q, &k, &v, None, cache.as_deref_mut(), self.cfg.chunk)?;
        let dv = o.dim(3)? - 1;
        // φ(q)·φ(k) ≥ 1/2 for all q, k (a quadratic in q·k), so the denominator is positive.
        let o = o.narrow(3, 0, dv)?.broadcast_div(&o.narrow(3, dv, 1)?)?;
        self.o.forward(&merge(&o.to_dtype(x.dtype())?)?)
    }

    fn new_state(&self, _capacity: usize) -> LayerState {
        crate::recurrent_state()
    }

    fn cache_bytes(&self, batch: usize, _seq_len: usize, dtype: DType) -> usize {
        let f = self.cfg.feature_dim;
        crate::state_bytes(batch, self.cfg.n_heads, 1 + f + f * f, self.d / self.cfg.n_heads + 1)
            + self.conv.as_ref().map_or(0, |c| c.cache_bytes(batch, dtype))
    }

    fn kind(&self) -> String {
        "based".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zoo_core::candle_core::Device;

    #[test]
    fn taylor_kernel_matches_the_closed_form() -> Result<()> {
        let q = Tensor::new(&[0.3f64, -1.2, 0.5, 2.0], &Device::Cpu)?;
        let k = Tensor::new(&[1.1f64, 0.4, -0.7, 0.2], &Device::Cpu)?;
        let got = (taylor_features(&q)? * taylor_features(&k)?)?.sum_all()?.to_scalar::<f64>()?;
        let qk = (&q * &k)?.sum_all()?.to_scalar::<f64>()?;
        let want = 1.0 + qk / 2.0 + qk * qk / 8.0; // d′ = 4: √d′ = 2, 2d′ = 8
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        assert_eq!(taylor_features(&q)?.dim(0)?, 1 + 4 + 16);
        Ok(())
    }
}

zoo_core::mixer_spec!(BasedConfig => Based, check(d_model), [
    r#"n_heads = 2, feature_dim = 4, chunk = 4"#,
    r#"n_heads = 2, feature_dim = 4, short_conv = 3"#,
]);
