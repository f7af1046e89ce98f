//! DuoAttention-style heads (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference
//! with Retrieval and Streaming Heads", §3): retrieval heads keep the full cache, streaming heads
//! keep only the attention sinks and a recent window.
//!
//! Which heads stream is chosen once per model by a scoring pass that is saved and reused
//! (`zoo kv duo-calibrate`). The paper learns a gate per head by distillation on synthetic
//! passkey data; here each KV head is scored by the output deviation that the paper's objective
//! penalises, measured directly on calibration text: for the observed queries,
//! `‖o_full − o_stream‖ / ‖o_full‖`, where `o_stream` renormalises the head's attention over the
//! sinks and the window only. Heads with the largest deviation become retrieval heads: a share
//! `retrieval` of all KV heads of the model, ranked globally as the paper thresholds its gates.
//! Applying the plan is a per-head eviction ([`KvCache::retain_heads`]): streaming heads really
//! hold sinks + window entries.

use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{bail, DType, Result, Tensor, D};
use zoo_core::state::{KvCache, LayerState};

/// A model's head scores (`zoo kv duo-calibrate` writes it as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DuoScores {
    pub sinks: usize,
    pub window: usize,
    /// Per attention layer (bottom first), per KV head: the mean relative output deviation of
    /// streaming attention.
    pub deviation: Vec<Vec<f32>>,
}

/// `duo = { path = "…", retrieval = 0.5 }` on the command line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DuoConfig {
    pub path: std::path::PathBuf,
    /// Share of the model's KV heads kept as retrieval heads (full cache), in [0, 1].
    pub retrieval: f64,
}

impl DuoConfig {
    /// Read the scores and pick the heads.
    pub fn build(&self) -> Result<DuoPlan> {
        if !(0.0..=1.0).contains(&self.retrieval) {
            bail!("duo.retrieval: {} must be in [0, 1]", self.retrieval)
        }
        let text = std::fs::read_to_string(&self.path).map_err(|e| zoo_core::candle_core::Error::Msg(format!("duo.path: {}: {e}", self.path.display())))?;
        let scores: DuoScores = serde_json::from_str(&text).map_err(|e| zoo_core::candle_core::Error::Msg(format!("duo.path: {}: {e}", self.path.display())))?;
        Ok(DuoPlan::new(&scores, self.retrieval))
    }
}

/// Which KV heads of each attention layer are retrieval heads, and the streaming heads' budget.
#[derive(Debug, Clone, PartialEq)]
pub struct DuoPlan {
    pub sinks: usize,
    pub window: usize,
    pub retrieval: Vec<Vec<bool>>,
}

impl DuoPlan {
    /// The `share` of all heads with the largest deviation are retrieval heads (ties: lower
    /// layer, then lower head first).
    pub fn new(s: &DuoScores, share: f64) -> Self {
        let mut all: Vec<(f32, usize, usize)> = Vec::new();
        for (l, hs) in s.deviation.iter().enumerate() {
            for (h, &d) in hs.iter().enumerate() {
                all.push((d, l, h));
            }
        }
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let n = (share * all.len() as f64).round() as usize;
        let mut retrieval: Vec<Vec<bool>> = s.deviation.iter().map(|hs| vec![false; hs.len()]).collect();
        for &(_, l, h) in &all[..n.min(all.len())] {
            retrieval[l][h] = true;
        }
        DuoPlan { sinks: s.sinks, window: s.window, retrieval }
    }

    /// Evict, in every attention layer's cache (the i-th attention layer takes row i of the plan),
    /// each streaming head's entries outside the sinks and the window; retrieval heads keep all.
    pub fn apply(&self, states: &mut [LayerState]) -> Result<()> {
        let mut i = 0;
        for s in states.iter_mut() {
            if let LayerState::Kv(c) = s {
                let Some(row) = self.retrieval.get(i) else { bail!("duo: the plan has {} layers, the model more", self.retrieval.len()) };
                self.apply_layer(c, row)?;
                i += 1;
            }
        }
        if i != self.retrieval.len() {
            bail!("duo: the plan has {} layers, the model {i} attention layers", self.retrieval.len())
        }
        Ok(())
    }

    fn apply_layer(&self, c: &mut KvCache, retrieval: &[bool]) -> Result<()> {
        let lens = c.head_lens();
        if lens.len() != retrieval.len() {
            bail!("duo: {} KV heads in the plan, {} in the cache", retrieval.len(), lens.len())
        }
        if c.is_empty() {
            return Ok(());
        }
        let seen = c.seen();
        let mut slots = Vec::with_capacity(lens.len());
        for (h, &keep_all) in retrieval.iter().enumerate() {
            let pos = c.head_kv(h)?.map(|(_, _, p)| p).unwrap_or_default();
            let keep: Vec<usize> = (0..pos.len()).filter(|&j| keep_all || pos[j] < self.sinks || pos[j] + self.window >= seen).collect();
            slots.push(keep);
        }
        c.retain_heads(&slots)
    }
}

/// Per KV head, the mean over batch rows, query heads of its group and observed queries of
/// `‖o_full − o_stream‖ / ‖o_full‖`: q (B, H, w, hd) at `qpos`, k and v (B, Hkv, n, hd) at `kpos`.
pub fn streaming_deviation(q: &Tensor, qpos: &[usize], k: &Tensor, v: &Tensor, kpos: &[usize], sinks: usize, window: usize) -> Result<Vec<f32>> {
    let (b, h, w, _) = q.dims4()?;
    let (_, hkv, n, hd) = v.dims4()?;
    let p = crate::attention(q, qpos, k, kpos)?; // (B, H, w, n), causal
    let keep: Vec<f32> = qpos
        .iter()
        .flat_map(|&qp| kpos.iter().map(move |&kp| if kp < sinks || (kp <= qp && qp - kp < window) { 1.0 } else { 0.0 }))
        .collect();
    let m = Tensor::from_vec(keep, (w, n), q.device())?;
    let ps = p.broadcast_mul(&m)?;
    let ps = ps.broadcast_div(&(ps.sum_keepdim(D::Minus1)? + 1e-30)?)?;
    let g = h / hkv;
    let vf = v.to_dtype(DType::F32)?.contiguous()?;
    // (B, Hkv, g·w, n) @ (B, Hkv, n, hd) per group.
    let out = |p: &Tensor| -> Result<Tensor> { p.reshape((b, hkv, g * w, n))?.matmul(&vf)?.reshape((b, hkv, g, w, hd)) };
    let (of, os) = (out(&p)?, out(&ps)?);
    let num = (&of - &os)?.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    let den = (of.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-12)?;
    // Mean over B, g, w per KV head.
    let r = num.broadcast_div(&den)?.squeeze(4)?.permute((1, 0, 2, 3))?.reshape((hkv, ()))?.mean(1)?;
    r.to_vec1::<f32>()
}
