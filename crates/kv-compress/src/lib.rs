//! KV-cache compression (kvpress's layout: a press is a small scoring rule; the budget and the
//! eviction are separate). A press scores every slot of a layer's [`KvCache`]; [`compress`] keeps
//! the highest-scoring `keep_count(len, ratio)` slots, in position order, with
//! [`KvCache::retain`]: the evicted entries are really gone (the cache's `bytes()` falls), positions
//! travel with the kept slots (so masks, windows and sinks stay right) and new tokens continue from
//! the original length.
//!
//! Presses (one file each): [`streaming_llm`] (sinks + recent window), [`knorm`] (lowest key L2
//! norm first), [`random`] (a seeded baseline), and three that score by attention, from queries the
//! cache observes ([`KvCache::set_observe`], turned on by [`observe_model`]): [`tova`] (the last
//! query's attention), [`snapkv`] (an observation window's attention, pooled) and [`h2o`]
//! (attention accumulated over every query since the slot was written, plus a recent window). The
//! cache stores one set of slots for every head and batch row, so a press's per-head scores are
//! averaged into one score per slot; ragged per-head budgets are future work (issue 15), as are
//! quantisation and decode-time compression.
//!
//! ```
//! use zoo_core::candle_core::{DType, Device, Tensor};
//! use zoo_core::state::KvCache;
//! use zoo_kv_compress::{compress, PressConfig};
//! let mut c = KvCache::with_capacity(8, None);
//! let k = Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((1, 1, 6, 1))?; // key norms 0..5
//! c.append(&k, &k)?;
//! let press = PressConfig::Knorm.build()?;
//! assert_eq!(compress(&mut c, press.as_ref(), 0.5, 0)?, 3); // evicts 3 of 6 (layer 0)
//! assert_eq!(c.positions(), &[0, 1, 2]); // the three smallest key norms stay
//! # Ok::<(), zoo_core::candle_core::Error>(())
//! ```

pub mod duo;
pub mod h2o;
pub mod kivi;
pub mod knorm;
pub mod qfilters;
pub mod random;
pub mod snapkv;
pub mod streaming_llm;
pub mod tova;

use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{bail, DType, Result, Tensor};
use zoo_core::model::Lm;
use zoo_core::state::{KvCache, LayerState};

/// What a press sees of one layer's cache at a compression.
pub struct Slots<'a> {
    /// Keys and values of the used slots (B, Hkv, len, hd).
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    /// Absolute position of each slot.
    pub pos: &'a [usize],
    /// The queries the cache observed (B, H, w, hd) and their positions, when the press asks for
    /// them ([`Press::observe`]).
    pub queries: Option<(&'a Tensor, &'a [usize])>,
    /// Running scores after this compression's [`Press::accumulate`] (accumulating presses only).
    pub running: Option<&'a [f32]>,
    /// How many slots the compression keeps.
    pub keep: usize,
    /// The layer's index in the model's stack (presses with per-layer parameters, Q-Filters).
    pub layer: usize,
}

/// A scoring rule: one score per used slot of a layer's cache (higher = keep).
pub trait Press: Send + Sync {
    fn score(&self, s: &Slots) -> Result<Vec<f32>>;

    /// How many of the latest queries the cache must keep for this press (None: it needs none).
    fn observe(&self) -> Option<usize> {
        None
    }

    /// For presses whose scores add up over compressions (H2O): this compression's addition to
    /// each slot's running score, from the queries observed since the last one (which it then
    /// consumes); [`Press::score`] sees the totals in [`Slots::running`].
    fn accumulate(&self, _s: &Slots) -> Result<Option<Vec<f32>>> {
        Ok(None)
    }
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
    /// Keep the slots the last query attends to most.
    Tova,
    /// Keep the slots the last `window` queries attend to most (pooled over `kernel` neighbouring
    /// positions), and the window itself.
    #[serde(rename = "snapkv")]
    SnapKv {
        #[serde(default = "sixty_four")]
        window: usize,
        #[serde(default = "five")]
        kernel: usize,
    },
    /// Keep the most recent `recent` share of the budget and, for the rest, the slots with the
    /// most attention accumulated over all queries.
    H2o {
        #[serde(default = "half")]
        recent: f64,
    },
    /// Keep the keys with the largest projection on a calibrated per-head filter (`zoo kv
    /// calibrate` writes the file).
    QFilters { path: std::path::PathBuf },
}

fn four() -> usize {
    4
}
fn five() -> usize {
    5
}
fn sixty_four() -> usize {
    64
}
fn half() -> f64 {
    0.5
}

impl PressConfig {
    /// Refuse settings no press can use; the error names the field.
    pub fn check(&self) -> std::result::Result<(), String> {
        match *self {
            PressConfig::SnapKv { window, kernel } => {
                if window == 0 {
                    return Err("press.window: must be at least 1".into());
                }
                if kernel % 2 == 0 {
                    return Err(format!("press.kernel: {kernel} must be odd (a centred pooling window)"));
                }
            }
            PressConfig::H2o { recent } if !(0.0..=1.0).contains(&recent) => {
                return Err(format!("press.recent: {recent} must be in [0, 1] (a share of the kept budget)"));
            }
            _ => {}
        }
        Ok(())
    }

    /// The press; fails only when it needs a file that cannot be read (Q-Filters).
    pub fn build(&self) -> Result<Box<dyn Press>> {
        Ok(match self {
            PressConfig::StreamingLlm { sinks } => Box::new(streaming_llm::StreamingLlm { sinks: *sinks }),
            PressConfig::Knorm => Box::new(knorm::Knorm),
            PressConfig::Random { seed } => Box::new(random::Random { seed: *seed }),
            PressConfig::Tova => Box::new(tova::Tova),
            PressConfig::SnapKv { window, kernel } => Box::new(snapkv::SnapKv { window: *window, kernel: *kernel }),
            PressConfig::H2o { recent } => Box::new(h2o::H2o { recent: *recent }),
            PressConfig::QFilters { path } => Box::new(qfilters::QFilters::load(path)?),
        })
    }
}

/// How a compression's budget is spread over the attention layers (`budget = { type = ... }`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Budget {
    /// Every layer keeps the same number of entries.
    #[default]
    Uniform,
    /// Linear decay with depth at the same total (PyramidKV, Cai et al. 2024, §3.3; the
    /// allocation PyramidInfer ablates): the top layer keeps keep/β, the bottom 2·keep − keep/β.
    Pyramid {
        #[serde(default = "twenty")]
        beta: f64,
    },
    /// Every layer keeps the same number of entries per KV head on average, but the heads of a
    /// layer share that total by score (AdaKV's allocation, Feng et al. 2024, §3: the layer's
    /// highest scores over all its heads), each head really storing only its own
    /// ([`KvCache::retain_heads`]). Each head first keeps its own best `min_share · keep` slots
    /// (at least one; default share 0); the rest of the total goes by score over all heads.
    Ragged {
        #[serde(default, skip_serializing_if = "is_zero")]
        min_share: f64,
    },
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn twenty() -> f64 {
    20.0
}

impl Budget {
    /// Refuse settings no budget can use; the error names the field.
    pub fn check(&self) -> std::result::Result<(), String> {
        match *self {
            Budget::Pyramid { beta } if !(beta >= 1.0 && beta.is_finite()) => {
                Err(format!("budget.beta: {beta} must be at least 1 (the top layer keeps keep / beta)"))
            }
            Budget::Ragged { min_share } if !(0.0..=1.0).contains(&min_share) => {
                Err(format!("budget.min_share: {min_share} must be in [0, 1] (the share of a head's even budget it always keeps)"))
            }
            _ => Ok(()),
        }
    }

    /// Entries each of `n` attention layers (bottom first) keeps when on average they keep
    /// `keep`: together n·keep (rounded down per layer, the remainder handed out from the bottom).
    pub fn layer_keeps(&self, keep: usize, n: usize) -> Vec<usize> {
        match *self {
            Budget::Pyramid { beta } if n > 1 => {
                let top = keep as f64 / beta;
                let bottom = 2.0 * keep as f64 - top;
                let mut k: Vec<usize> =
                    (0..n).map(|l| (bottom - (bottom - top) * l as f64 / (n - 1) as f64).floor() as usize).collect();
                let mut rest = (n * keep).saturating_sub(k.iter().sum());
                for x in k.iter_mut() {
                    if rest == 0 {
                        break;
                    }
                    *x += 1;
                    rest -= 1;
                }
                k
            }
            _ => vec![keep; n],
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

/// How much a compression keeps: a share of the tokens seen ([`Keep::Ratio`], the share evicted)
/// or a fixed number of tokens ([`Keep::Tokens`]: the cache is compressed to that size, e.g. every
/// n decoded tokens to a target size). An `f64` converts to a ratio, so the ratio-taking calls
/// take either.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    Ratio(f64),
    Tokens(usize),
}

impl From<f64> for Keep {
    fn from(r: f64) -> Self {
        Keep::Ratio(r)
    }
}

impl Keep {
    /// Refuse a ratio outside [0, 1) and zero tokens; the error names the setting.
    pub fn check(&self) -> std::result::Result<(), String> {
        match *self {
            Keep::Ratio(r) => check_ratio(r),
            Keep::Tokens(0) => Err("keep_tokens: must be at least 1".into()),
            Keep::Tokens(_) => Ok(()),
        }
    }

    /// Entries kept from `seen`: [`keep_count`] for a ratio; for tokens, that many (all of them
    /// while fewer were seen).
    pub fn of(&self, seen: usize) -> usize {
        match *self {
            Keep::Ratio(r) => keep_count(seen, r),
            Keep::Tokens(n) => n.min(seen),
        }
    }

    /// Whether it can evict anything (a ratio of 0 cannot).
    pub fn evicts(&self) -> bool {
        match *self {
            Keep::Ratio(r) => r > 0.0,
            Keep::Tokens(_) => true,
        }
    }
}

/// Entries kept from `len` at `ratio`: `len − ⌊len·ratio⌋`, at least one when `len > 0`.
pub fn keep_count(len: usize, ratio: f64) -> usize {
    (len - (len as f64 * ratio).floor() as usize).max(len.min(1))
}

/// Evict from one cache the `len − keep_count(len, ratio)` lowest-scoring slots (ties: the earlier
/// position goes first); returns how many were evicted.
pub fn compress(cache: &mut KvCache, press: &dyn Press, ratio: f64, layer: usize) -> Result<usize> {
    if let Err(e) = check_ratio(ratio) {
        bail!("{e}")
    }
    let keep = keep_count(cache.len(), ratio);
    compress_to(cache, press, keep, layer)
}

/// Evict the lowest-scoring slots until at most `keep` remain; returns how many were evicted.
/// An accumulating press (H2O) adds the observed queries' attention to its running scores even
/// when nothing is evicted, so no query goes uncounted.
pub fn compress_to(cache: &mut KvCache, press: &dyn Press, keep: usize, layer: usize) -> Result<usize> {
    let Some((k, v)) = cache.kv()? else { return Ok(0) };
    let n = cache.len();
    let pos = cache.positions().to_vec();
    let queries = cache.observed().map(|(q, p)| (q.clone(), p.to_vec()));
    let mut slots = Slots { k: &k, v: &v, pos: &pos, queries: queries.as_ref().map(|(q, p)| (q, p.as_slice())), running: None, keep, layer };
    let running = match press.accumulate(&slots)? {
        Some(delta) => {
            cache.clear_observed();
            Some(cache.accumulate(&delta)?)
        }
        None => None,
    };
    if press.observe().is_some() && slots.queries.is_none() && running.is_none() {
        bail!("this press scores slots by attention, but the cache observed no queries (call observe_model before the forward pass)")
    }
    if keep >= n {
        return Ok(0);
    }
    slots.running = running.as_deref();
    let scores = press.score(&slots)?;
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

/// Have every attention layer's cache keep the queries `press` scores with (a no-op for presses
/// that need none). Call before the forward passes whose queries should count.
pub fn observe_model(states: &mut [LayerState], press: &dyn Press) {
    observe_window(states, press.observe());
}

/// Have every attention layer's cache keep its last `w` queries (None: none).
pub fn observe_window(states: &mut [LayerState], w: Option<usize>) {
    for s in states.iter_mut() {
        if let LayerState::Kv(c) = s {
            c.set_observe(w);
        }
    }
}

/// Have every attention layer's (empty) cache pack its older tokens by `packer` (KIVI).
pub fn pack_model(states: &mut [LayerState], packer: std::sync::Arc<dyn zoo_core::state::KvPacker>) -> Result<()> {
    for s in states.iter_mut() {
        if let LayerState::Kv(c) = s {
            c.set_packer(Some(packer.clone()))?;
        }
    }
    Ok(())
}

/// Compress every attention layer's cache to keep (1 − ratio) of the tokens it has seen
/// (`keep_count(seen, ratio)` on average, spread over the layers by `budget`), or a fixed number
/// of tokens ([`Keep::Tokens`]), each scored as its layer; returns the entries each attention
/// layer holds after, bottom first.
pub fn compress_seen(states: &mut [LayerState], press: &dyn Press, ratio: impl Into<Keep>, budget: &Budget) -> Result<Vec<usize>> {
    let keep = ratio.into();
    if let Err(e) = keep.check() {
        bail!("{e}")
    }
    let seen: Vec<usize> = states.iter().filter_map(|s| if let LayerState::Kv(c) = s { Some(c.seen()) } else { None }).collect();
    let Some(&first) = seen.first() else { return Ok(vec![]) };
    let mut keeps = budget.layer_keeps(keep.of(first), seen.len()).into_iter();
    let mut held = Vec::with_capacity(seen.len());
    for (l, s) in states.iter_mut().enumerate() {
        if let LayerState::Kv(c) = s {
            let keep = keeps.next().expect("one keep per attention layer");
            if let Budget::Ragged { min_share } = *budget {
                let floor = (min_share * keep as f64).floor() as usize;
                compress_heads(c, press, keep, l, floor)?;
                // Entries per head on average.
                let lens = c.head_lens();
                held.push(lens.iter().sum::<usize>() / lens.len().max(1));
            } else {
                compress_to(c, press, keep, l)?;
                held.push(c.len());
            }
        }
    }
    Ok(held)
}

/// Per-head ragged eviction: every KV head's slots are scored as a one-head cache (its keys, its
/// positions, its group of observed queries); each head keeps its own `min_per_head` best (at
/// least one), and the rest of the layer's `keep × heads` goes to the highest scores over all
/// heads; each head then stores only its own ([`KvCache::retain_heads`]). Returns the slots each
/// head keeps. Presses that accumulate (H2O) or hold per-head parameters (Q-Filters) do not
/// score single heads here: an error.
pub fn compress_heads(cache: &mut KvCache, press: &dyn Press, keep: usize, layer: usize, min_per_head: usize) -> Result<Vec<usize>> {
    let lens = cache.head_lens();
    let hkv = lens.len();
    if hkv == 0 || cache.is_empty() {
        return Ok(lens);
    }
    let queries = cache.observed().map(|(q, p)| (q.clone(), p.to_vec()));
    if press.observe().is_some() && queries.is_none() {
        bail!("this press scores slots by attention, but the cache observed no queries (call observe_model before the forward pass)")
    }
    let group = match &queries {
        Some((q, _)) => q.dim(1)? / hkv,
        None => 1,
    };
    // (score, head, slot) over every head.
    let mut all: Vec<(f32, usize, usize)> = Vec::new();
    for h in 0..hkv {
        let Some((k, v, pos)) = cache.head_kv(h)? else { continue };
        let qh = match &queries {
            Some((q, p)) => Some((q.narrow(1, h * group, group)?, p.clone())),
            None => None,
        };
        let slots = Slots { k: &k, v: &v, pos: &pos, queries: qh.as_ref().map(|(q, p)| (q, p.as_slice())), running: None, keep, layer };
        if press.accumulate(&slots)?.is_some() {
            bail!("per-head budgets: a press that accumulates scores over compressions (H2O) is not supported")
        }
        let scores = press.score(&slots)?;
        if scores.len() != pos.len() {
            bail!("press returned {} scores for {} slots of head {h}", scores.len(), pos.len())
        }
        all.extend(scores.into_iter().enumerate().map(|(j, sc)| (sc, h, j)));
    }
    cache.clear_observed();
    let total = keep * hkv;
    if total >= all.len() {
        return Ok(lens);
    }
    // Highest first; ties: the later slot first (the earlier goes), then the lower head.
    all.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.2.cmp(&a.2)).then(a.1.cmp(&b.1)));
    let mut kept: Vec<Vec<usize>> = vec![Vec::new(); hkv];
    let mut taken: Vec<Vec<bool>> = lens.iter().map(|&n| vec![false; n]).collect();
    // Each head's own best slots first (at least one, so no head is left without keys).
    let floor = min_per_head.max(1);
    for &(_, h, j) in &all {
        if kept[h].len() < floor {
            kept[h].push(j);
            taken[h][j] = true;
        }
    }
    let mut n = kept.iter().map(Vec::len).sum::<usize>();
    for &(_, h, j) in &all {
        if n >= total.max(hkv) {
            break;
        }
        if !taken[h][j] {
            kept[h].push(j);
            taken[h][j] = true;
            n += 1;
        }
    }
    for k in kept.iter_mut() {
        k.sort_unstable();
    }
    cache.retain_heads(&kept)?;
    Ok(kept.iter().map(Vec::len).collect())
}

/// [`compress`] every softmax-attention layer of a model's state (recurrent states are left as they
/// are); returns the entries evicted per layer (0 for layers without a KV cache).
pub fn compress_model(states: &mut [LayerState], press: &dyn Press, ratio: f64) -> Result<Vec<usize>> {
    states
        .iter_mut()
        .enumerate()
        .map(|(l, s)| match s {
            LayerState::Kv(c) => compress(c, press, ratio, l),
            _ => Ok(0),
        })
        .collect()
}

/// Negative log-likelihood of `ids` read in chunks of `chunk` tokens through the model's cache,
/// the press keeping the cache of every attention layer at `keep_count(seen, ratio)` entries after
/// each chunk (`seen`: tokens read so far; spread over layers by `budget`), so every later token is scored from the compressed
/// cache. Returns (NLL sum, tokens scored, mean entries held per layer after each compression).
/// With ratio 0 (or no press) this is the model's plain full-context NLL, chunk by chunk.
pub fn streaming_nll(model: &Lm, ids: &[u32], chunk: usize, press: Option<&dyn Press>, ratio: impl Into<Keep>, budget: &Budget) -> Result<(f64, usize, f64)> {
    let s = streaming_nll_with(model, ids, chunk, press, ratio, budget, None, None)?;
    Ok((s.sum, s.n, s.held))
}

/// The head dimension of the model's attention caches (None: no attention layer), read off the
/// cache of a one-token forward pass (so a packer's config can be checked before any work).
pub fn kv_head_dim(model: &Lm) -> Result<Option<usize>> {
    let dev = model.embed.weight.device();
    let mut cache = model.new_cache_with_capacity(1);
    model.forward(&Tensor::new(&[[0u32]], dev)?, Some(&mut cache), None)?;
    for s in &cache {
        if let LayerState::Kv(c) = s {
            if let Some((k, _)) = c.kv()? {
                return Ok(Some(k.dim(3)?));
            }
        }
    }
    Ok(None)
}

/// What [`streaming_nll_with`] measured.
#[derive(Debug, Clone, Copy)]
pub struct StreamNll {
    /// Summed NLL (nats) over the `n` scored tokens.
    pub sum: f64,
    pub n: usize,
    /// Mean entries held per attention layer after compressions (NaN without compression).
    pub held: f64,
    /// KV bytes held at the end, over every attention layer ([`KvCache::bytes`]: packed blocks
    /// included), and what full-precision slots for every token read would take.
    pub bytes: usize,
    pub full_bytes: usize,
}

/// [`streaming_nll`], with every attention layer's cache packing its older tokens by `packer`
/// (KIVI: [`kivi::Kivi`]) when given, or DuoAttention's streaming heads evicting after every chunk
/// (`duo`), and the bytes held at the end.
#[allow(clippy::too_many_arguments)]
pub fn streaming_nll_with(
    model: &Lm,
    ids: &[u32],
    chunk: usize,
    press: Option<&dyn Press>,
    ratio: impl Into<Keep>,
    budget: &Budget,
    packer: Option<std::sync::Arc<dyn zoo_core::state::KvPacker>>,
    duo: Option<&duo::DuoPlan>,
) -> Result<StreamNll> {
    let keep = ratio.into();
    if let Err(e) = keep.check() {
        bail!("{e}")
    }
    if chunk == 0 {
        bail!("chunk: must be at least 1")
    }
    if packer.is_some() && press.is_some_and(|_| keep.evicts()) {
        bail!("a packed (quantised) cache cannot also be compressed by a press")
    }
    let dev = model.embed.weight.device();
    let mut cache = model.new_cache_with_capacity(ids.len());
    if let Some(p) = press {
        observe_model(&mut cache, p);
    }
    if let Some(pk) = packer {
        pack_model(&mut cache, pk)?;
    }
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
        if let Some(p) = press.filter(|_| keep.evicts()) {
            // Every layer has seen the `end` tokens read so far.
            let per_layer = compress_seen(&mut cache, p, keep, budget)?;
            held += per_layer.iter().sum::<usize>() as f64 / per_layer.len().max(1) as f64;
            points += 1;
        }
        if let Some(plan) = duo {
            plan.apply(&mut cache)?;
            // Entries per KV head, averaged over heads and layers.
            let lens: Vec<f64> = cache
                .iter()
                .filter_map(|s| if let LayerState::Kv(c) = s { let l = c.head_lens(); Some(l.iter().sum::<usize>() as f64 / l.len().max(1) as f64) } else { None })
                .collect();
            held += lens.iter().sum::<f64>() / lens.len().max(1) as f64;
            points += 1;
        }
    }
    let (mut bytes, mut full_bytes) = (0, 0);
    for s in &cache {
        if let LayerState::Kv(c) = s {
            bytes += c.bytes();
            full_bytes += c.slot_bytes() * c.seen();
        }
    }
    Ok(StreamNll { sum, n, held: if points > 0 { held / points as f64 } else { f64::NAN }, bytes, full_bytes })
}

/// Per-slot mean over batch rows and heads of a (B, H, len) score tensor.
pub(crate) fn per_slot(scores: &Tensor) -> Result<Vec<f32>> {
    scores.to_dtype(zoo_core::candle_core::DType::F32)?.mean(0)?.mean(0)?.to_vec1::<f32>()
}

/// Attention probabilities of observed queries `q` (B, H, w, hd) at positions `qpos` over the cached
/// keys `k` (B, Hkv, n, hd) at positions `kpos`, as the layer computes them (scale 1/√hd, query
/// head h reading kv head h / (H / Hkv), a query seeing only keys at or before its position):
/// (B, H, w, n) in f32. Learnable sink keys, if the layer has them, are not in the cache and so not
/// in the softmax.
pub fn attention(q: &Tensor, qpos: &[usize], k: &Tensor, kpos: &[usize]) -> Result<Tensor> {
    let (b, h, w, hd) = q.dims4()?;
    let (_, hkv, n, _) = k.dims4()?;
    if h % hkv != 0 || qpos.len() != w || kpos.len() != n {
        bail!("attention: q {:?} at {} positions over k {:?} at {} positions", q.dims(), qpos.len(), k.dims(), kpos.len())
    }
    let q = (q.to_dtype(DType::F32)? * (1.0 / (hd as f64).sqrt()))?.reshape((b, hkv, h / hkv * w, hd))?;
    let scores = q.matmul(&k.to_dtype(DType::F32)?.contiguous()?.t()?)?.reshape((b, h, w, n))?;
    let mask: Vec<f32> =
        qpos.iter().flat_map(|&qp| kpos.iter().map(move |&kp| if kp <= qp { 0.0 } else { f32::NEG_INFINITY })).collect();
    let mask = Tensor::from_vec(mask, (w, n), q.device())?;
    zoo_core::candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?.contiguous()?)
}
