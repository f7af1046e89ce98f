//! Eval-time summaries of a [`ModelProbe`]: the attention sink (share of attention on the first
//! token, Xiao et al. 2024), attention entropy, and massive activations (Sun et al. 2024: the
//! largest |h| in the residual stream per layer). Computed on request only, never in training.

use crate::mixer::StatValue;
use crate::model::{Lm, ModelProbe};
use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Per-layer summaries; `None` where a layer has no softmax attention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ProbeSummary {
    /// Mean over batch, heads and queries of the attention probability on position 0.
    pub first_token_share: Vec<Option<f64>>,
    /// Mean over batch, heads and queries of −Σ_j p_j ln p_j (nats).
    pub attn_entropy: Vec<Option<f64>>,
    /// max |h| of the residual stream after each block.
    pub max_abs_activation: Vec<f64>,
    /// Means of the named statistics mixers and feed-forwards recorded, per layer.
    pub stats: Vec<BTreeMap<String, f64>>,
    /// The same statistics reduced only to their shape (per head / per expert vectors kept), per
    /// layer; absent when no layer reports any.
    #[serde(default, skip_serializing_if = "no_stats")]
    pub stats_by_shape: Vec<BTreeMap<String, StatValue>>,
}

fn no_stats(s: &[BTreeMap<String, StatValue>]) -> bool {
    s.iter().all(|m| m.is_empty())
}

/// First-token share and entropy of attention probabilities (B, H, T, T) over the real tokens.
pub fn attention_summary(p: &Tensor) -> Result<(f64, f64)> {
    let p = p.to_dtype(DType::F64)?;
    let first = p.narrow(D::Minus1, 0, 1)?.mean_all()?.to_scalar::<f64>()?;
    // 0 · ln 0 = 0: clamp before the log, the product is then 0 where p is 0.
    let ent = (p.clamp(1e-300, 1.0)?.log()? * &p)?.sum(D::Minus1)?.neg()?.mean_all()?.to_scalar::<f64>()?;
    Ok((first, ent))
}

pub fn summarize(probe: &ModelProbe) -> Result<ProbeSummary> {
    let mut s = ProbeSummary::default();
    for (i, layer) in probe.layers.iter().enumerate() {
        match &layer.attn {
            Some(a) => {
                let (f, e) = attention_summary(a)?;
                s.first_token_share.push(Some(f));
                s.attn_entropy.push(Some(e));
            }
            None => {
                s.first_token_share.push(None);
                s.attn_entropy.push(None);
            }
        }
        s.max_abs_activation.push(probe.max_abs[i].to_dtype(DType::F64)?.to_scalar::<f64>()?);
        let mut m = BTreeMap::new();
        let mut shaped = BTreeMap::new();
        for st in layer.stats.iter().chain(probe.ffn_stats.get(i).into_iter().flatten()) {
            m.insert(st.name.clone(), st.value.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?);
            shaped.insert(st.name.clone(), st.reduce()?);
        }
        s.stats.push(m);
        s.stats_by_shape.push(shaped);
    }
    Ok(s)
}

/// Run `model` on `ids` with probes on and summarise.
pub fn probe(model: &Lm, ids: &Tensor) -> Result<ProbeSummary> {
    let mut p = ModelProbe::default();
    model.forward(ids, None, Some(&mut p))?;
    summarize(&p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hand_made_patterns() -> Result<()> {
        // Two queries over 4 keys: one puts all mass on token 0, one is uniform over 4 keys.
        let p = Tensor::new(&[[[[1.0f32, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]]], &Device::Cpu)?;
        let (first, ent) = attention_summary(&p)?;
        assert!((first - 0.625).abs() < 1e-12, "{first}");
        assert!((ent - 0.5 * (4f64).ln()).abs() < 1e-6, "{ent}");
        Ok(())
    }
}
