//! KV-cache compression (kvpress's layout: a press is a small scoring rule; the budget and the
//! eviction are separate). A press scores every slot of a layer's [`KvCache`]; [`compress`] keeps
//! the highest-scoring `keep_count(len, ratio)` slots, in position order, with
//! [`KvCache::retain`]: the evicted entries are really gone (the cache's `bytes()` falls), positions
//! travel with the kept slots (so masks, windows and sinks stay right) and new tokens continue from
//! the original length.
//!
//! Presses so far (one file each): [`streaming_llm`] (sinks + recent window), [`knorm`] (lowest
//! key L2 norm first), [`random`] (a seeded baseline). The cache stores one set of slots for every
//! head and batch row, so a press's per-head scores are averaged into one score per slot; ragged
//! per-head budgets are future work (issue 15), as are the attention-based presses (H2O, TOVA,
//! SnapKV), quantisation and decode-time compression.
//!
//! ```
//! use zoo_core::candle_core::{DType, Device, Tensor};
//! use zoo_core::state::KvCache;
//! use zoo_kv_compress::{compress, PressConfig};
//! let mut c = KvCache::with_capacity(8, None);
//! let k = Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((1, 1, 6, 1))?; // key norms 0..5
//! c.append(&k, &k)?;
//! let press = PressConfig::Knorm.build();
//! assert_eq!(compress(&mut c, press.as_ref(), 0.5)?, 3); // evicts 3 of 6
//! assert_eq!(c.positions(), &[0, 1, 2]); // the three smallest key norms stay
//! # Ok::<(), zoo_core::candle_core::Error>(())
//! ```

pub mod knorm;
pub mod random;
pub mod streaming_llm;

use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{bail, DType, Result, Tensor};
use zoo_core::model::Lm;
use zoo_core::state::{KvCache, LayerState};

/// A scoring rule: one score per used slot of a layer's cache (higher = keep).
pub trait Press: Send + Sync {
    /// `k`, `v`: the used slots (B, H, len, hd); `pos`: their absolute positions.
    fn score(&self, k: &Tensor, v: &Tensor, pos: &[usize]) -> Result<Vec<f32>>;
}

/// `press = { type = ... }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PressConfig {
    /// Keep the first `sinks` positions and the most recent ones.
    StreamingLlm {
        #[serde(default = "four")]
        sinks: usize,
    },
    /// Keep the keys with the smallest L2 norm.
    Knorm,
    /// Keep a seeded random subset.
    Random {
        #[serde(default)]
        seed: u64,
    },
}

fn four() -> usize {
    4
}

impl PressConfig {
    pub fn build(&self) -> Box<dyn Press> {
        match *self {
            PressConfig::StreamingLlm { sinks } => Box::new(streaming_llm::StreamingLlm { sinks }),
            PressConfig::Knorm => Box::new(knorm::Knorm),
            PressConfig::Random { seed } => Box::new(random::Random { seed }),
        }
    }
}

/// The compression ratio: the share of entries evicted, in [0, 1).
pub fn check_ratio(ratio: f64) -> std::result::Result<(), String> {
    if !(ratio.is_finite() && (0.0..1.0).contains(&ratio)) {
        return Err(format!("ratio: {ratio} must be in [0, 1) (the share of the cache evicted)"));
    }
    Ok(())
}

/// Entries kept from `len` at `ratio`: `len − ⌊len·ratio⌋`, at least one when `len > 0`.
pub fn keep_count(len: usize, ratio: f64) -> usize {
    (len - (len as f64 * ratio).floor() as usize).max(len.min(1))
}

/// Evict from one cache the `len − keep_count(len, ratio)` lowest-scoring slots (ties: the earlier
/// position goes first); returns how many were evicted.
pub fn compress(cache: &mut KvCache, press: &dyn Press, ratio: f64) -> Result<usize> {
    if let Err(e) = check_ratio(ratio) {
        bail!("{e}")
    }
    let keep = keep_count(cache.len(), ratio);
    compress_to(cache, press, keep)
}

/// Evict the lowest-scoring slots until at most `keep` remain; returns how many were evicted.
pub fn compress_to(cache: &mut KvCache, press: &dyn Press, keep: usize) -> Result<usize> {
    let Some((k, v)) = cache.kv()? else { return Ok(0) };
    let n = cache.len();
    if keep >= n {
        return Ok(0);
    }
    let scores = press.score(&k, &v, cache.positions())?;
    if scores.len() != n {
        bail!("press returned {} scores for {n} slots", scores.len())
    }
    let mut order: Vec<usize> = (0..n).collect();
    // Highest score first; among equal scores the later slot first (the earlier goes).
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(b.cmp(&a)));
    let mut kept: Vec<usize> = order[..keep].to_vec();
    kept.sort_unstable();
    cache.retain(&kept)?;
    Ok(n - keep)
}

/// [`compress`] every softmax-attention layer of a model's state (recurrent states are left as they
/// are); returns the entries evicted per layer (0 for layers without a KV cache).
pub fn compress_model(states: &mut [LayerState], press: &dyn Press, ratio: f64) -> Result<Vec<usize>> {
    states
        .iter_mut()
        .map(|s| match s {
            LayerState::Kv(c) => compress(c, press, ratio),
            _ => Ok(0),
        })
        .collect()
}

/// Negative log-likelihood of `ids` read in chunks of `chunk` tokens through the model's cache,
/// the press keeping the cache of every attention layer at `keep_count(seen, ratio)` entries after
/// each chunk (`seen`: tokens read so far), so every later token is scored from the compressed
/// cache. Returns (NLL sum, tokens scored, mean entries held per layer after each compression).
/// With ratio 0 (or no press) this is the model's plain full-context NLL, chunk by chunk.
pub fn streaming_nll(model: &Lm, ids: &[u32], chunk: usize, press: Option<&dyn Press>, ratio: f64) -> Result<(f64, usize, f64)> {
    if let Err(e) = check_ratio(ratio) {
        bail!("{e}")
    }
    if chunk == 0 {
        bail!("chunk: must be at least 1")
    }
    let dev = model.embed.weight.device();
    let mut cache = model.new_cache_with_capacity(ids.len());
    let (mut sum, mut n) = (0f64, 0usize);
    let (mut held, mut points) = (0f64, 0usize);
    for start in (0..ids.len().saturating_sub(1)).step_by(chunk) {
        let end = (start + chunk).min(ids.len() - 1);
        let x = Tensor::new(&ids[start..end], dev)?.unsqueeze(0)?;
        let logits = model.forward(&x, Some(&mut cache), None)?.logits;
        let tgt = Tensor::new(&ids[start + 1..end + 1], dev)?.unsqueeze(0)?;
        let mean = zoo_core::model::cross_entropy(&logits, &tgt, None)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        sum += mean * (end - start) as f64;
        n += end - start;
        if let Some(p) = press.filter(|_| ratio > 0.0) {
            let keep = keep_count(end, ratio);
            let mut layers = 0usize;
            let mut total = 0usize;
            for s in cache.iter_mut() {
                if let LayerState::Kv(c) = s {
                    compress_to(c, p, keep)?;
                    total += c.len();
                    layers += 1;
                }
            }
            held += total as f64 / layers.max(1) as f64;
            points += 1;
        }
    }
    Ok((sum, n, if points > 0 { held / points as f64 } else { f64::NAN }))
}

/// Per-slot mean over batch rows and heads of a (B, H, len) score tensor.
pub(crate) fn per_slot(scores: &Tensor) -> Result<Vec<f32>> {
    scores.to_dtype(zoo_core::candle_core::DType::F32)?.mean(0)?.mean(0)?.to_vec1::<f32>()
}
