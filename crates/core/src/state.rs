//! Typed per-layer state for prefill and decode, and the phase a forward pass runs in.
//!
//! - [`Phase`]: `Train` (the full-sequence form, backward available; training and evaluation
//!   losses), `Prefill` (T ≥ 2 tokens appended to a state) or `Decode` (one token). Ops without a
//!   backward pass may run only outside `Train` ([`Phase::forbid_train`]).
//! - [`KvCache`]: softmax attention's keys and values, written in place into a preallocated buffer
//!   (grown ×2 when full, or sized up front from the expected length), each slot stored with its
//!   absolute position, so masks, windows and sinks come from positions and entries can be evicted
//!   ([`KvCache::retain`]) without breaking them.
//! - [`RecurrentState`]: a recurrent mixer's state tensor and its short-convolution history.
//!
//! ```
//! use zoo_core::candle_core::{DType, Device, Tensor};
//! use zoo_core::state::KvCache;
//! let dev = Device::Cpu;
//! let mut c = KvCache::with_capacity(8, None);
//! let k = Tensor::zeros((1, 2, 3, 4), DType::F32, &dev)?; // (B, H, T, hd)
//! c.append(&k, &k)?;
//! c.append(&k.narrow(2, 0, 1)?, &k.narrow(2, 0, 1)?)?;
//! assert_eq!((c.len(), c.seen()), (4, 4));
//! c.retain(&[0, 3])?; // evict the middle two
//! assert_eq!(c.positions(), &[0, 3]);
//! assert_eq!(c.bytes(), 2 * 2 * 2 * 4 * 4); // K and V of 2 tokens, 2 heads, hd 4, f32
//! assert_eq!(c.allocated_bytes(), 2 * 8 * 2 * 4 * 4); // buffers of capacity 8
//! # Ok::<(), zoo_core::candle_core::Error>(())
//! ```

use candle_core::{bail, Result, Tensor};

/// What a forward pass is for; passed down to every mixer so kernels choose by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The full-sequence form, no state: training, and evaluation losses. Differentiable.
    Train,
    /// Two or more tokens appended to a layer state (the prompt, or a chunk of it).
    Prefill,
    /// One token appended to a layer state.
    Decode,
}

/// The optimiser step a forward pass belongs to, set by the training loop around each
/// micro-batch's forward ([`enter_train_step`]); `None` in evaluation, scoring and generation, which
/// also run [`Phase::Train`]'s full-sequence form. Layers with training-only randomness (router
/// noise, Gumbel gates) or step schedules (an annealed gate temperature) read it with
/// [`train_step`], and derive their noise from (seed, step, micro, layer): deterministic, and the
/// same after a resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainStep {
    /// Optimiser steps done before this one (0-based).
    pub step: usize,
    /// The run's total steps.
    pub total: usize,
    /// Micro-batch within the step (gradient accumulation).
    pub micro: usize,
    /// The run's seed.
    pub seed: u64,
}

thread_local! {
    static TRAIN_STEP: std::cell::Cell<Option<TrainStep>> = const { std::cell::Cell::new(None) };
}

/// The training step the current forward pass belongs to (see [`TrainStep`]).
pub fn train_step() -> Option<TrainStep> {
    TRAIN_STEP.with(|c| c.get())
}

/// Mark forward passes on this thread as part of a training step until the guard is dropped.
///
/// ```
/// use zoo_core::state::{enter_train_step, train_step, TrainStep};
/// let s = TrainStep { step: 3, total: 10, micro: 0, seed: 1 };
/// {
///     let _g = enter_train_step(s);
///     assert_eq!(train_step(), Some(s));
/// }
/// assert_eq!(train_step(), None);
/// ```
pub fn enter_train_step(s: TrainStep) -> TrainStepGuard {
    TrainStepGuard(TRAIN_STEP.with(|c| c.replace(Some(s))))
}

/// Restores the previous [`train_step`] when dropped.
pub struct TrainStepGuard(Option<TrainStep>);

impl Drop for TrainStepGuard {
    fn drop(&mut self) {
        TRAIN_STEP.with(|c| c.set(self.0));
    }
}

impl Phase {
    /// The phase of a model call: `Train` without a state, else `Decode` for one token and
    /// `Prefill` for more.
    pub fn of(has_state: bool, t: usize) -> Self {
        match (has_state, t) {
            (false, _) => Phase::Train,
            (true, 1) => Phase::Decode,
            (true, _) => Phase::Prefill,
        }
    }

    /// Whether gradients may flow through this pass.
    pub fn differentiable(self) -> bool {
        self == Phase::Train
    }

    /// The guard every backward-less op calls: an error in `Train`, naming the op.
    pub fn forbid_train(self, op: &str) -> Result<()> {
        if self == Phase::Train {
            bail!("{op} has no backward pass and cannot run in Phase::Train")
        }
        Ok(())
    }
}

/// One layer's state between calls; each mixer says which kind it keeps
/// ([`crate::mixer::Mixer::new_state`]).
#[derive(Debug, Clone)]
pub enum LayerState {
    Kv(KvCache),
    Recurrent(RecurrentState),
}

impl LayerState {
    /// Tokens consumed so far.
    pub fn seen(&self) -> usize {
        match self {
            LayerState::Kv(c) => c.seen(),
            LayerState::Recurrent(r) => r.seen,
        }
    }

    /// Bytes of the state held now (a KV cache: its used slots).
    pub fn bytes(&self) -> usize {
        match self {
            LayerState::Kv(c) => c.bytes(),
            LayerState::Recurrent(r) => r.bytes(),
        }
    }

    /// Bytes allocated now (a KV cache: its capacity).
    pub fn allocated_bytes(&self) -> usize {
        match self {
            LayerState::Kv(c) => c.allocated_bytes(),
            LayerState::Recurrent(r) => r.bytes(),
        }
    }

    pub fn kv(&mut self) -> Result<&mut KvCache> {
        match self {
            LayerState::Kv(c) => Ok(c),
            LayerState::Recurrent(_) => bail!("layer state: expected a KV cache, found a recurrent state"),
        }
    }

    pub fn recurrent(&mut self) -> Result<&mut RecurrentState> {
        match self {
            LayerState::Recurrent(r) => Ok(r),
            LayerState::Kv(_) => bail!("layer state: expected a recurrent state, found a KV cache"),
        }
    }
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// A recurrent mixer's state: `s` (e.g. the f32 matrix S of linear attention) and `conv`, the last
/// k − 1 inputs of a short causal convolution. Both are replaced, not grown, at each call.
#[derive(Debug, Clone, Default)]
pub struct RecurrentState {
    pub s: Option<Tensor>,
    pub conv: Option<Tensor>,
    pub seen: usize,
}

impl RecurrentState {
    pub fn bytes(&self) -> usize {
        self.s.iter().chain(self.conv.iter()).map(tensor_bytes).sum()
    }
}

/// A rule that stores a KV cache's older tokens in fewer bytes (quantisation: KIVI, …). The
/// cache calls [`KvPacker::pack`] on its oldest `block()` full-precision slots whenever it holds
/// `residual() + block()` of them, and unpacks every packed block when a query attends.
pub trait KvPacker: Send + Sync + std::fmt::Debug {
    /// Tokens per packed block (≥ 1).
    fn block(&self) -> usize;
    /// The most recent tokens always kept at full precision.
    fn residual(&self) -> usize;
    /// Pack one block: k, v (B, Hkv, block, hd).
    fn pack(&self, k: &Tensor, v: &Tensor) -> Result<Box<dyn PackedKv>>;
}

/// One packed block of a [`KvCache`]: what it unpacks to, and the bytes it holds.
pub trait PackedKv: Send + Sync + std::fmt::Debug {
    /// K and V (B, Hkv, block, hd) in the cache's dtype.
    fn unpack(&self) -> Result<(Tensor, Tensor)>;
    /// Bytes of the tensors held (codes, scales, zero points).
    fn bytes(&self) -> usize;
    fn clone_box(&self) -> Box<dyn PackedKv>;
    fn as_any(&self) -> &dyn std::any::Any;
    /// Absorb `next`, the block packed after this one by the same packer, so that the cache
    /// unpacks one store instead of many blocks (false: this kind cannot; the cache keeps both).
    fn merge(&mut self, _next: &dyn PackedKv) -> Result<bool> {
        Ok(false)
    }
}

/// One KV head's own slots after a per-head eviction ([`KvCache::retain_heads`]): keys and values
/// (B, 1, capacity, hd), written in place and grown ×2 when full, and each slot's position.
#[derive(Debug)]
struct HeadSlots {
    k: Tensor,
    v: Tensor,
    pos: Vec<usize>,
}

impl HeadSlots {
    fn used(&self) -> Result<(Tensor, Tensor)> {
        let n = self.pos.len();
        Ok((self.k.narrow(2, 0, n)?, self.v.narrow(2, 0, n)?))
    }

    /// Fresh buffers of `cap` slots holding the used ones.
    fn reallocate(&mut self, cap: usize) -> Result<()> {
        let cap = cap.max(self.pos.len()).max(1);
        let (nk, nv) = (KvCache::alloc(&self.k, cap)?, KvCache::alloc(&self.v, cap)?);
        if !self.pos.is_empty() {
            let (k, v) = self.used()?;
            nk.slice_set(&k.contiguous()?, 2, 0)?;
            nv.slice_set(&v.contiguous()?, 2, 0)?;
        }
        self.k = nk;
        self.v = nv;
        Ok(())
    }

    fn push(&mut self, k: &Tensor, v: &Tensor, new_pos: &[usize]) -> Result<()> {
        let need = self.pos.len() + new_pos.len();
        let cap = self.k.dim(2)?;
        if need > cap {
            self.reallocate(need.max(2 * cap))?;
        }
        self.k.slice_set(&k.contiguous()?, 2, self.pos.len())?;
        self.v.slice_set(&v.contiguous()?, 2, self.pos.len())?;
        self.pos.extend_from_slice(new_pos);
        Ok(())
    }

    /// Bytes of K and V per slot.
    fn slot_bytes(&self) -> usize {
        (tensor_bytes(&self.k) + tensor_bytes(&self.v)) / self.k.dim(2).unwrap_or(1).max(1)
    }
}

/// Softmax attention's keys and values, (B, H, capacity, hd) each, written in place; slot j holds
/// the token at absolute position `positions()[j]`. Slots are shared by all heads.
///
/// Without a window, a fresh cache allocates exactly what its first append needs (or the capacity
/// given to [`KvCache::with_capacity`]) and doubles when full. With a window of w tokens it keeps at
/// most w slots and a one-token append overwrites the oldest slot (a ring: the order of keys does
/// not matter to attention, their positions do).
#[derive(Debug)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    pos: Vec<usize>,
    seen: usize,
    capacity: usize,
    window: Option<usize>,
    /// Queries kept for presses that score slots by attention (TOVA, SnapKV, H2O): the last
    /// `observe` queries appended, (B, H, ≤ observe, hd) as the layer attends with them, and their
    /// positions. Off (None) unless [`KvCache::set_observe`] turns it on.
    observe: Option<usize>,
    queries: Option<Tensor>,
    qpos: Vec<usize>,
    /// Per-position running score (H2O's accumulated attention), dropped with its slot.
    acc: std::collections::HashMap<usize, f32>,
    /// Packing of older tokens ([`KvCache::set_packer`]): the rule, the packed blocks (oldest
    /// first) and their tokens' positions. `pos`, `k` and `v` hold the full-precision rest.
    packer: Option<std::sync::Arc<dyn KvPacker>>,
    packed: Vec<Box<dyn PackedKv>>,
    packed_pos: Vec<usize>,
    /// Ragged per-head storage ([`KvCache::retain_heads`]): once set, each KV head keeps its own
    /// slots and `k`, `v`, `pos` are unused.
    heads: Option<Vec<HeadSlots>>,
}

/// A deep copy: the buffers are written in place, so a clone must not share them.
impl Clone for KvCache {
    fn clone(&self) -> Self {
        let copy = |t: &Option<Tensor>| t.as_ref().map(|t| t.copy().expect("copy of a KV buffer"));
        Self {
            k: copy(&self.k),
            v: copy(&self.v),
            pos: self.pos.clone(),
            seen: self.seen,
            capacity: self.capacity,
            window: self.window,
            observe: self.observe,
            queries: copy(&self.queries),
            qpos: self.qpos.clone(),
            acc: self.acc.clone(),
            packer: self.packer.clone(),
            packed: self.packed.iter().map(|p| p.clone_box()).collect(),
            packed_pos: self.packed_pos.clone(),
            heads: self.heads.as_ref().map(|hs| {
                hs.iter()
                    .map(|h| HeadSlots { k: h.k.copy().expect("copy of a KV buffer"), v: h.v.copy().expect("copy of a KV buffer"), pos: h.pos.clone() })
                    .collect()
            }),
        }
    }
}

impl KvCache {
    /// An empty cache; `capacity` slots are allocated at the first append (0: as many as it
    /// brings). `window`: keep only keys the next query can still see.
    pub fn with_capacity(capacity: usize, window: Option<usize>) -> Self {
        Self {
            k: None,
            v: None,
            pos: Vec::new(),
            seen: 0,
            capacity,
            window,
            observe: None,
            queries: None,
            qpos: Vec::new(),
            acc: Default::default(),
            packer: None,
            packed: Vec::new(),
            packed_pos: Vec::new(),
            heads: None,
        }
    }

    /// Whether each KV head keeps its own slots ([`KvCache::retain_heads`]).
    pub fn is_ragged(&self) -> bool {
        self.heads.is_some()
    }

    /// Slots held by each KV head (ragged or not).
    pub fn head_lens(&self) -> Vec<usize> {
        match &self.heads {
            Some(hs) => hs.iter().map(|h| h.pos.len()).collect(),
            None => vec![self.len(); self.k.as_ref().map_or(0, |k| k.dim(1).unwrap_or(0))],
        }
    }

    /// KV head `h`'s keys, values (B, 1, n_h, hd) and positions: its own in a ragged cache, the
    /// shared slots' otherwise.
    pub fn head_kv(&self, h: usize) -> Result<Option<(Tensor, Tensor, Vec<usize>)>> {
        match &self.heads {
            Some(hs) => {
                let Some(hd) = hs.get(h) else { bail!("KvCache::head_kv: no head {h} ({} stored)", hs.len()) };
                if hd.pos.is_empty() {
                    return Ok(None);
                }
                let (k, v) = hd.used()?;
                Ok(Some((k, v, hd.pos.clone())))
            }
            None => match self.kv()? {
                Some((k, v)) => Ok(Some((k.narrow(1, h, 1)?, v.narrow(1, h, 1)?, self.all_positions()))),
                None => Ok(None),
            },
        }
    }

    /// Keep, for each KV head h, only its slots `slots[h]` (indices into that head's current slots,
    /// in the given order): per-head ragged budgets that really store fewer entries. The cache
    /// then keeps one buffer per head; positions travel with their slots and `seen` is unchanged.
    /// Not for a windowed (ring) or packed cache.
    pub fn retain_heads(&mut self, slots: &[Vec<usize>]) -> Result<()> {
        if self.window.is_some() || !self.packed.is_empty() {
            bail!("KvCache::retain_heads: a windowed or packed cache cannot keep per-head slots")
        }
        let lens = self.head_lens();
        if slots.len() != lens.len() {
            bail!("KvCache::retain_heads: {} slot lists for {} KV heads", slots.len(), lens.len())
        }
        for (h, (s, &n)) in slots.iter().zip(&lens).enumerate() {
            if let Some(&bad) = s.iter().find(|&&j| j >= n) {
                bail!("KvCache::retain_heads: head {h} has no slot {bad} ({n} used)")
            }
            if s.is_empty() {
                bail!("KvCache::retain_heads: head {h} would keep no slot (its queries would attend to nothing)")
            }
        }
        let mut heads = Vec::with_capacity(slots.len());
        for (h, s) in slots.iter().enumerate() {
            let (k, v, pos) = self.head_kv(h)?.expect("every head has slots");
            let idx = Tensor::new(s.iter().map(|&j| j as u32).collect::<Vec<_>>(), k.device())?;
            let (kk, vk) = (k.contiguous()?.index_select(&idx, 2)?.contiguous()?, v.contiguous()?.index_select(&idx, 2)?.contiguous()?);
            heads.push(HeadSlots { k: kk, v: vk, pos: s.iter().map(|&j| pos[j]).collect() });
        }
        self.heads = Some(heads);
        self.k = None;
        self.v = None;
        self.pos.clear();
        self.acc.clear();
        Ok(())
    }

    /// Append t new keys and values (B, Hkv, t, hd) to a ragged cache, each head to its own slots;
    /// returns what each head's queries attend over: its keys, values and their positions.
    pub fn append_heads(&mut self, k: &Tensor, v: &Tensor) -> Result<Vec<(Tensor, Tensor, Vec<usize>)>> {
        let t = k.dim(2)?;
        let new_pos: Vec<usize> = (self.seen..self.seen + t).collect();
        let Some(hs) = self.heads.as_mut() else { bail!("KvCache::append_heads: the cache is not ragged (use append)") };
        if k.dim(1)? != hs.len() {
            bail!("KvCache::append_heads: {} KV heads appended to a cache of {}", k.dim(1)?, hs.len())
        }
        self.seen += t;
        let mut out = Vec::with_capacity(hs.len());
        for (h, hd) in hs.iter_mut().enumerate() {
            hd.push(&k.narrow(1, h, 1)?, &v.narrow(1, h, 1)?, &new_pos)?;
            let (kk, vv) = hd.used()?;
            out.push((kk, vv, hd.pos.clone()));
        }
        Ok(out)
    }

    /// Store older tokens packed by `packer` (None: all at full precision). Only on an empty cache
    /// without a window (a ring overwrites slots in place; packing moves them).
    pub fn set_packer(&mut self, packer: Option<std::sync::Arc<dyn KvPacker>>) -> Result<()> {
        if self.seen > 0 {
            bail!("KvCache::set_packer: the cache already holds tokens")
        }
        if packer.is_some() && self.window.is_some() {
            bail!("KvCache::set_packer: a windowed cache cannot pack its tokens")
        }
        if packer.as_ref().is_some_and(|p| p.block() == 0) {
            bail!("KvCache::set_packer: a packer's block must be at least 1 token")
        }
        self.packer = packer;
        Ok(())
    }

    /// Tokens held packed, and the bytes they take.
    pub fn packed(&self) -> (usize, usize) {
        (self.packed_pos.len(), self.packed.iter().map(|p| p.bytes()).sum())
    }

    /// Move the oldest full-precision slots into packed blocks while `residual + block` of them
    /// are held.
    fn settle(&mut self) -> Result<()> {
        let Some(p) = self.packer.clone() else { return Ok(()) };
        let (blk, res) = (p.block(), p.residual());
        let n = self.pos.len();
        let blocks = n.saturating_sub(res) / blk;
        if blocks == 0 {
            return Ok(());
        }
        let (k, v) = self.buf_kv()?.expect("slots in use");
        for i in 0..blocks {
            let (kb, vb) = (k.narrow(2, i * blk, blk)?.contiguous()?, v.narrow(2, i * blk, blk)?.contiguous()?);
            let block = p.pack(&kb, &vb)?;
            let merged = match self.packed.last_mut() {
                Some(last) => last.merge(block.as_ref())?,
                None => false,
            };
            if !merged {
                self.packed.push(block);
            }
        }
        let moved = blocks * blk;
        let rest: Vec<usize> = (moved..n).collect();
        self.packed_pos.extend(self.pos[..moved].iter().copied());
        // Shift the rest to the front of the buffer.
        if rest.is_empty() {
            self.pos.clear();
        } else {
            let idx = Tensor::new(rest.iter().map(|&j| j as u32).collect::<Vec<_>>(), k.device())?;
            let (kk, vk) = (k.contiguous()?.index_select(&idx, 2)?, v.contiguous()?.index_select(&idx, 2)?);
            self.k.as_ref().expect("allocated").slice_set(&kk, 2, 0)?;
            self.v.as_ref().expect("allocated").slice_set(&vk, 2, 0)?;
            self.pos = rest.iter().map(|&j| self.pos[j]).collect();
        }
        // The buffer never needs more than `residual + block` slots again (one-token appends pack
        // as soon as it is full): give back what a long prefill or an up-front reservation took.
        let want = (res + blk).max(self.pos.len());
        if self.capacity() > want {
            let like = self.k.clone().expect("allocated");
            self.reallocate(&like, want)?;
        }
        Ok(())
    }

    /// Keep the last `w` queries the layer attends with (0 or None: keep none), for presses
    /// that score slots by attention. The attention mixers hand their queries to
    /// [`KvCache::observe`] after each append.
    pub fn set_observe(&mut self, w: Option<usize>) {
        self.observe = w.filter(|&w| w > 0);
        if self.observe.is_none() {
            self.queries = None;
            self.qpos.clear();
        }
    }

    /// Record the queries (B, H, t, hd) of the t tokens just appended (positions `seen − t..seen`),
    /// keeping the last `observe` of them; a no-op when observation is off.
    pub fn observe(&mut self, q: &Tensor) -> Result<()> {
        let Some(w) = self.observe else { return Ok(()) };
        let t = q.dim(2)?;
        if t > self.seen {
            bail!("KvCache::observe: {t} queries but only {} tokens appended", self.seen)
        }
        let q = q.detach();
        if t >= w {
            // The new queries alone fill the window (every decode step of a one-query press):
            // no concatenation with the old ones.
            self.queries = Some(if t > w { q.narrow(2, t - w, w)?.contiguous()? } else { q });
            self.qpos = (self.seen - w..self.seen).collect();
            return Ok(());
        }
        let (all, mut pos) = match self.queries.take() {
            Some(old) => (Tensor::cat(&[&old, &q], 2)?, std::mem::take(&mut self.qpos)),
            None => (q, Vec::new()),
        };
        pos.extend(self.seen - t..self.seen);
        let n = pos.len();
        let drop = n.saturating_sub(w);
        self.queries = Some(if drop > 0 { all.narrow(2, drop, n - drop)?.contiguous()? } else { all });
        self.qpos = pos[drop..].to_vec();
        Ok(())
    }

    /// The observed queries (B, H, w, hd) and their positions, if any.
    pub fn observed(&self) -> Option<(&Tensor, &[usize])> {
        self.queries.as_ref().map(|q| (q, self.qpos.as_slice()))
    }

    /// Forget the observed queries (a press that accumulates consumes them once).
    pub fn clear_observed(&mut self) {
        self.queries = None;
        self.qpos.clear();
    }

    /// Add `delta[j]` to the running score of used slot j; returns the running scores of all used
    /// slots (0 for a slot never scored). A slot's score is dropped with the slot.
    pub fn accumulate(&mut self, delta: &[f32]) -> Result<Vec<f32>> {
        if delta.len() != self.pos.len() {
            bail!("KvCache::accumulate: {} scores for {} slots", delta.len(), self.pos.len())
        }
        Ok(self
            .pos
            .iter()
            .zip(delta)
            .map(|(p, d)| {
                let e = self.acc.entry(*p).or_insert(0.0);
                *e += d;
                *e
            })
            .collect())
    }

    /// Drop running scores of positions no longer stored.
    fn prune_acc(&mut self) {
        if !self.acc.is_empty() {
            let live: std::collections::HashSet<usize> = self.pos.iter().copied().collect();
            self.acc.retain(|p, _| live.contains(p));
        }
    }

    /// Tokens consumed so far (the absolute position of the next token).
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Tokens held (packed and full-precision; in a ragged cache, the most any head holds).
    pub fn len(&self) -> usize {
        match &self.heads {
            Some(hs) => hs.iter().map(|h| h.pos.len()).max().unwrap_or(0),
            None => self.packed_pos.len() + self.pos.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Absolute position of the token in each full-precision slot (after the packed tokens, if
    /// any: see [`KvCache::all_positions`]).
    pub fn positions(&self) -> &[usize] {
        &self.pos
    }

    /// Positions of every token held: the packed ones (oldest first), then the slots'.
    pub fn all_positions(&self) -> Vec<usize> {
        let mut p = self.packed_pos.clone();
        p.extend(&self.pos);
        p
    }

    /// Allocated slots (in a ragged cache, the largest head's).
    pub fn capacity(&self) -> usize {
        if let Some(hs) = &self.heads {
            return hs.iter().map(|h| h.k.dim(2).unwrap_or(0)).max().unwrap_or(0);
        }
        self.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    /// Bytes of the keys and values held: the used slots, plus the packed blocks.
    pub fn bytes(&self) -> usize {
        if let Some(hs) = &self.heads {
            return hs.iter().map(|h| h.slot_bytes() * h.pos.len()).sum();
        }
        self.slot_bytes() * self.pos.len() + self.packed().1
    }

    /// Bytes one token takes at full precision (K and V, every head and batch row); 0 before the
    /// first append.
    pub fn slot_bytes(&self) -> usize {
        if let Some(hs) = &self.heads {
            return hs.iter().map(HeadSlots::slot_bytes).sum();
        }
        self.buffer_bytes().checked_div(self.capacity()).unwrap_or(0)
    }

    fn buffer_bytes(&self) -> usize {
        self.k.iter().chain(self.v.iter()).map(tensor_bytes).sum()
    }

    /// Bytes allocated: both buffers at their capacity, plus the packed blocks (≥ [`KvCache::bytes`]).
    pub fn allocated_bytes(&self) -> usize {
        if let Some(hs) = &self.heads {
            return hs.iter().map(|h| tensor_bytes(&h.k) + tensor_bytes(&h.v)).sum();
        }
        self.buffer_bytes() + self.packed().1
    }

    /// Every token held: K and V (B, H, len, hd), the packed blocks unpacked first.
    pub fn kv(&self) -> Result<Option<(Tensor, Tensor)>> {
        if self.heads.is_some() {
            bail!("KvCache::kv: the cache keeps ragged per-head slots (read them with head_kv)")
        }
        let buf = self.buf_kv()?;
        if self.packed.is_empty() {
            return Ok(buf);
        }
        let mut ks = Vec::with_capacity(self.packed.len() + 1);
        let mut vs = Vec::with_capacity(self.packed.len() + 1);
        for p in &self.packed {
            let (k, v) = p.unpack()?;
            ks.push(k);
            vs.push(v);
        }
        if let Some((k, v)) = buf {
            ks.push(k);
            vs.push(v);
        }
        Ok(Some((Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?)))
    }

    /// The used full-precision slots: K and V (B, H, slots, hd).
    fn buf_kv(&self) -> Result<Option<(Tensor, Tensor)>> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) if !self.pos.is_empty() => {
                let n = self.pos.len();
                Ok(Some((k.narrow(2, 0, n)?, v.narrow(2, 0, n)?)))
            }
            _ => Ok(None),
        }
    }

    fn alloc(like: &Tensor, cap: usize) -> Result<Tensor> {
        let (b, h, _, d) = like.dims4()?;
        Tensor::zeros((b, h, cap, d), like.dtype(), like.device())
    }

    /// Make room for `extra` more slots, doubling (or, with a window, capping at the window).
    fn reserve(&mut self, like: &Tensor, extra: usize) -> Result<()> {
        let need = self.pos.len() + extra;
        let cap = self.capacity();
        if need <= cap {
            return Ok(());
        }
        let mut new_cap = if cap == 0 { need.max(self.capacity) } else { need.max(2 * cap) };
        if let Some(w) = self.window {
            new_cap = new_cap.min(w.max(need));
        }
        self.reallocate(like, new_cap)
    }

    /// Move the used slots into fresh buffers of `cap` slots (≥ the slots in use).
    fn reallocate(&mut self, like: &Tensor, cap: usize) -> Result<()> {
        let (nk, nv) = (Self::alloc(like, cap)?, Self::alloc(like, cap)?);
        if let Some((k, v)) = self.buf_kv()? {
            nk.slice_set(&k.contiguous()?, 2, 0)?;
            nv.slice_set(&v.contiguous()?, 2, 0)?;
        }
        self.k = Some(nk);
        self.v = Some(nv);
        Ok(())
    }

    /// Append t new keys and values (B, H, t, hd) at positions `seen..seen + t`.
    ///
    /// Returns what the new queries attend over: the keys, values and their positions. That is the
    /// stored slots after the write, except for a multi-token append to a windowed cache, where it
    /// is the old slots followed by all t new keys (the earliest new queries still see keys that
    /// the window then drops).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor, Vec<usize>)> {
        if self.heads.is_some() {
            bail!("KvCache::append: the cache keeps ragged per-head slots (use append_heads)")
        }
        let t = k.dim(2)?;
        let new_pos: Vec<usize> = (self.seen..self.seen + t).collect();
        self.seen += t;
        match self.window {
            Some(w) if t == 1 && self.pos.len() >= w => {
                // Ring: overwrite the oldest slot, which the new query can no longer see.
                let (j, _) = self.pos.iter().enumerate().min_by_key(|(_, &p)| p).expect("window ≥ 1");
                self.k.as_ref().expect("allocated").slice_set(&k.contiguous()?, 2, j)?;
                self.v.as_ref().expect("allocated").slice_set(&v.contiguous()?, 2, j)?;
                self.acc.remove(&self.pos[j]);
                self.pos[j] = new_pos[0];
                let (ka, va) = self.buf_kv()?.expect("non-empty");
                Ok((ka, va, self.pos.clone()))
            }
            Some(w) if self.pos.len() + t > w => {
                // Attend over old + new, then keep the last w positions.
                let (ka, va, pa) = match self.buf_kv()? {
                    Some((ok, ov)) => {
                        let mut pa = self.pos.clone();
                        pa.extend(&new_pos);
                        (Tensor::cat(&[&ok, k], 2)?, Tensor::cat(&[&ov, v], 2)?, pa)
                    }
                    None => (k.clone(), v.clone(), new_pos.clone()),
                };
                let mut order: Vec<usize> = (0..pa.len()).collect();
                order.sort_by_key(|&j| pa[j]);
                let keep: Vec<usize> = order[order.len() - w..].to_vec();
                let idx = Tensor::new(keep.iter().map(|&j| j as u32).collect::<Vec<_>>(), k.device())?;
                let (kk, vk) = (ka.contiguous()?.index_select(&idx, 2)?, va.contiguous()?.index_select(&idx, 2)?);
                if self.capacity() < w {
                    self.k = Some(Self::alloc(k, w)?);
                    self.v = Some(Self::alloc(k, w)?);
                }
                self.k.as_ref().expect("allocated").slice_set(&kk, 2, 0)?;
                self.v.as_ref().expect("allocated").slice_set(&vk, 2, 0)?;
                self.pos = keep.iter().map(|&j| pa[j]).collect();
                self.prune_acc();
                Ok((ka, va, pa))
            }
            _ => {
                self.reserve(k, t)?;
                let at = self.pos.len();
                self.k.as_ref().expect("reserved").slice_set(&k.contiguous()?, 2, at)?;
                self.v.as_ref().expect("reserved").slice_set(&v.contiguous()?, 2, at)?;
                self.pos.extend(new_pos);
                self.settle()?;
                let (ka, va) = self.kv()?.expect("non-empty");
                Ok((ka, va, self.all_positions()))
            }
        }
    }

    /// Reallocate both buffers to `capacity` slots (at least the slots in use), so memory that
    /// eviction left unused is really freed (or room is made ahead); returns the bytes allocated
    /// after. A windowed cache keeps at least its window.
    pub fn shrink_to(&mut self, capacity: usize) -> Result<usize> {
        if let Some(hs) = self.heads.as_mut() {
            // Each head: what it holds plus the room the shared capacity leaves beyond the longest.
            let longest = hs.iter().map(|h| h.pos.len()).max().unwrap_or(0);
            let room = capacity.saturating_sub(longest);
            for h in hs.iter_mut() {
                if h.k.dim(2)? != h.pos.len() + room {
                    h.reallocate(h.pos.len() + room)?;
                }
            }
            return Ok(self.allocated_bytes());
        }
        let Some(like) = self.k.clone() else { return Ok(0) };
        let cap = capacity.max(self.pos.len()).max(self.window.unwrap_or(0).min(self.capacity())).max(1);
        if cap != self.capacity() {
            self.reallocate(&like, cap)?;
        }
        Ok(self.allocated_bytes())
    }

    /// Keep only the given used slots, in the given order, and free nothing else: the eviction
    /// primitive of KV compression. Positions travel with their slots; `seen` is unchanged, so new
    /// tokens continue from the original length.
    pub fn retain(&mut self, slots: &[usize]) -> Result<()> {
        if let Some(&bad) = slots.iter().find(|&&j| j >= self.pos.len()) {
            bail!("KvCache::retain: slot {bad} is not in use ({} used)", self.pos.len())
        }
        if !self.packed.is_empty() {
            bail!("KvCache::retain: the cache holds packed (quantised) tokens, which cannot be evicted")
        }
        if self.heads.is_some() {
            bail!("KvCache::retain: the cache keeps ragged per-head slots (use retain_heads)")
        }
        let Some((k, v)) = self.buf_kv()? else { return Ok(()) };
        if !slots.is_empty() {
            let idx = Tensor::new(slots.iter().map(|&j| j as u32).collect::<Vec<_>>(), k.device())?;
            let (kk, vk) = (k.contiguous()?.index_select(&idx, 2)?, v.contiguous()?.index_select(&idx, 2)?);
            self.k.as_ref().expect("allocated").slice_set(&kk, 2, 0)?;
            self.v.as_ref().expect("allocated").slice_set(&vk, 2, 0)?;
        }
        self.pos = slots.iter().map(|&j| self.pos[j]).collect();
        self.prune_acc();
        Ok(())
    }
}
