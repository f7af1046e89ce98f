//! Weight-layout interop with the reference release (qiuzh20/gated_attention, `modeling_qwen3.py`).
//!
//! The reference has no separate gate projection: it widens `q_proj` to `H·d + H` (headwise) or
//! `2·H·d` (elementwise) outputs, views them as `[n_kv_heads, G·d + G·w]` (G = H / n_kv_heads query
//! heads per KV group, w = 1 or d) and splits each KV group into its G query heads followed by its
//! G gate blocks. zoo keeps a separate `gate.proj`; these functions convert in both directions.

use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use zoo_core::candle_core::Tensor;

/// Shapes needed to interleave: query heads, KV heads, head dim, gate values per head (1 or d).
#[derive(Debug, Clone, Copy)]
pub struct GateLayout {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub gate_width: usize,
}

impl GateLayout {
    fn groups(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Interleave our `q` (H·d, …) and `gate` (H·w, …) rows into the reference's widened rows.
    /// Works for weights (rows, d_model) and biases (rows,).
    pub fn to_reference(&self, q: &Tensor, gate: &Tensor) -> Result<Tensor> {
        let (kv, g) = (self.n_kv_heads, self.groups());
        let rest: Vec<usize> = q.dims()[1..].to_vec();
        let shape = |rows: usize| [vec![kv, rows], rest.clone()].concat();
        let q3 = q.reshape(shape(g * self.head_dim))?;
        let g3 = gate.reshape(shape(g * self.gate_width))?;
        let wide = Tensor::cat(&[&q3, &g3], 1)?;
        Ok(wide.reshape([vec![kv * g * (self.head_dim + self.gate_width)], rest].concat())?)
    }

    /// Split the reference's widened `q_proj` rows into our `q` and `gate` rows.
    pub fn from_reference(&self, wide: &Tensor) -> Result<(Tensor, Tensor)> {
        let (kv, g) = (self.n_kv_heads, self.groups());
        let rows = wide.dim(0)?;
        ensure!(
            rows == kv * g * (self.head_dim + self.gate_width),
            "widened q_proj has {rows} rows, expected {} for {self:?}",
            kv * g * (self.head_dim + self.gate_width)
        );
        let rest: Vec<usize> = wide.dims()[1..].to_vec();
        let w3 = wide.reshape([vec![kv, g * (self.head_dim + self.gate_width)], rest.clone()].concat())?;
        let q = w3.narrow(1, 0, g * self.head_dim)?.contiguous()?;
        let gate = w3.narrow(1, g * self.head_dim, g * self.gate_width)?.contiguous()?;
        Ok((
            q.reshape([vec![self.n_heads * self.head_dim], rest.clone()].concat())?,
            gate.reshape([vec![self.n_heads * self.gate_width], rest].concat())?,
        ))
    }
}

/// Convert one attention layer of a reference state dict (names under `ref_prefix`, e.g.
/// `model.layers.3.self_attn`) into zoo names under `zoo_prefix` (e.g. `layers.3.mixer`).
/// `q_proj` is split into `q_proj` and `gate.proj`; k/v/o projections are renamed.
pub fn import_reference_attention(
    tensors: &BTreeMap<String, Tensor>,
    ref_prefix: &str,
    zoo_prefix: &str,
    layout: &GateLayout,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for kind in ["weight", "bias"] {
        let key = format!("{ref_prefix}.q_proj.{kind}");
        if let Some(w) = tensors.get(&key) {
            let (q, g) = layout.from_reference(w).with_context(|| key.clone())?;
            out.insert(format!("{zoo_prefix}.q_proj.{kind}"), q);
            out.insert(format!("{zoo_prefix}.gate.proj.{kind}"), g);
        } else {
            ensure!(kind == "bias", "reference state dict lacks {key}");
        }
        for p in ["k_proj", "v_proj", "o_proj"] {
            if let Some(w) = tensors.get(&format!("{ref_prefix}.{p}.{kind}")) {
                out.insert(format!("{zoo_prefix}.{p}.{kind}"), w.clone());
            }
        }
    }
    Ok(out)
}

/// The inverse of [`import_reference_attention`].
pub fn export_reference_attention(
    tensors: &BTreeMap<String, Tensor>,
    zoo_prefix: &str,
    ref_prefix: &str,
    layout: &GateLayout,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for kind in ["weight", "bias"] {
        let q = tensors.get(&format!("{zoo_prefix}.q_proj.{kind}"));
        let g = tensors.get(&format!("{zoo_prefix}.gate.proj.{kind}"));
        match (q, g) {
            (Some(q), Some(g)) => {
                out.insert(format!("{ref_prefix}.q_proj.{kind}"), layout.to_reference(q, g)?);
            }
            (None, None) => ensure!(kind == "bias", "no {zoo_prefix}.q_proj.{kind}"),
            _ => anyhow::bail!(
                "{zoo_prefix}: q_proj.{kind} and gate.proj.{kind} must both exist (the reference widens q_proj)"
            ),
        }
        for p in ["k_proj", "v_proj", "o_proj"] {
            if let Some(w) = tensors.get(&format!("{zoo_prefix}.{p}.{kind}")) {
                out.insert(format!("{ref_prefix}.{p}.{kind}"), w.clone());
            }
        }
    }
    Ok(out)
}
