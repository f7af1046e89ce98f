//! Causal softmax attention (Vaswani et al. 2017, eq. 1) with the options modern baselines use:
//! grouped-query / multi-query attention (Ainslie et al. 2023), QK-norm (Henry et al. 2020; RMS
//! over the head dim), a sliding window (Beltagy et al. 2020), learnable sink tokens (Xiao et al.
//! 2024, StreamingLLM §3.3), and RoPE with configurable θ.

use crate::mixer::{BuildCtx, KvCache, LayerProbe, LayerState, Mixer, Phase};
use crate::nn::{residual_std, rms_normalize, Linear, Rope, INIT_STD};
use crate::params::{Group, Init, Pb};
use candle_core::{DType, Device, Result, Tensor, D};
use serde::{Deserialize, Serialize};

fn default_theta() -> f64 {
    10_000.0
}

/// Softmax attention layer config (`type = "attention"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionConfig {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (GQA); `1` is MQA. Defaults to `n_heads` (MHA).
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    /// RoPE base θ.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// RMS-normalise q and k per head before RoPE.
    #[serde(default)]
    pub qk_norm: bool,
    /// Sliding window: each query sees itself and the `window - 1` previous tokens.
    #[serde(default)]
    pub window: Option<usize>,
    /// Learnable position-free key/value slots every query can attend to.
    #[serde(default)]
    pub sink_tokens: usize,
    /// Biases on the q/k/v/o projections.
    #[serde(default)]
    pub bias: bool,
    /// Bias on the output projection, when it differs from `bias` (Qwen2: q/k/v biases, none on o).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub o_bias: Option<bool>,
    /// Width of each head; default d_model / n_heads (Qwen3 sets it apart from d_model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// A learnable per-channel gain on the QK-norm (Qwen3's `q_norm` / `k_norm`); needs `qk_norm`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub qk_norm_gain: bool,
    /// ε of the QK-norm (default 1e-6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qk_norm_eps: Option<f64>,
}

impl AttentionConfig {
    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    /// Check the config against the model width and sequence length. The error says which field
    /// is wrong and why.
    /// The width of each head.
    pub fn head_dim(&self, d_model: usize) -> usize {
        self.head_dim.unwrap_or(d_model / self.n_heads.max(1))
    }

    fn check(&self, d_model: usize, seq_len: usize) -> std::result::Result<(), String> {
        if self.n_heads == 0 {
            return Err("n_heads: must be at least 1".into());
        }
        match self.head_dim {
            Some(0) => return Err("head_dim: must be at least 2".into()),
            Some(hd) if hd % 2 != 0 => return Err(format!("head_dim: {hd} must be even for RoPE")),
            Some(_) => {}
            None if d_model % self.n_heads != 0 => {
                return Err(format!("n_heads: {} heads do not divide d_model = {}", self.n_heads, d_model))
            }
            None if (d_model / self.n_heads) % 2 != 0 => {
                return Err(format!("n_heads: head dim {} must be even for RoPE", d_model / self.n_heads))
            }
            None => {}
        }
        if self.qk_norm_gain && !self.qk_norm {
            return Err("qk_norm_gain: needs qk_norm = true".into());
        }
        if self.qk_norm_eps.is_some_and(|e| !(e.is_finite() && e > 0.0)) {
            return Err("qk_norm_eps: must be positive and finite".into());
        }
        let kv = self.kv_heads();
        if kv == 0 || self.n_heads % kv != 0 {
            return Err(format!("n_kv_heads: n_heads = {} is not a multiple of n_kv_heads = {}", self.n_heads, kv));
        }
        if let Some(w) = self.window {
            if w == 0 {
                return Err("window: must be at least 1".into());
            }
            if w > seq_len {
                return Err(format!("window: {w} is larger than the sequence length {seq_len}"));
            }
        }
        if self.rope_theta <= 0.0 {
            return Err("rope_theta: must be positive".into());
        }
        Ok(())
    }
}

/// The attention module. Fields are public so that method crates (e.g. gated attention) can reuse
/// the projections and [`sdpa`] and insert their own operations between them.
pub struct Attention {
    pub cfg: AttentionConfig,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub rope: Rope,
    pub sink_k: Option<Tensor>,
    pub sink_v: Option<Tensor>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub qk_eps: f64,
    /// Learnable QK-norm gains (head_dim,), with `qk_norm_gain`.
    pub q_gain: Option<Tensor>,
    pub k_gain: Option<Tensor>,
    /// The full-sequence mask of the last length seen (training reuses it every step).
    mask_cache: std::sync::Mutex<Option<(usize, Tensor)>>,
}

impl Attention {
    pub fn new(cfg: &AttentionConfig, ctx: &BuildCtx, pb: &Pb) -> Result<Self> {
        let d = ctx.d_model;
        let (h, kv) = (cfg.n_heads, cfg.kv_heads());
        let hd = cfg.head_dim(d);
        let gain = |name: &str| {
            cfg.qk_norm_gain.then(|| pb.get(&format!("{name}.weight"), hd, Init::Const(1.0), Group::NoDecay)).transpose()
        };
        let sink_k = (cfg.sink_tokens > 0)
            .then(|| pb.get("sink_k", (kv, cfg.sink_tokens, hd), Init::Normal(INIT_STD), Group::NoDecay))
            .transpose()?;
        let sink_v = (cfg.sink_tokens > 0)
            .then(|| pb.get("sink_v", (kv, cfg.sink_tokens, hd), Init::Normal(INIT_STD), Group::NoDecay))
            .transpose()?;
        Ok(Self {
            q_proj: Linear::new(&pb.pp("q_proj"), d, h * hd, cfg.bias, INIT_STD)?,
            k_proj: Linear::new(&pb.pp("k_proj"), d, kv * hd, cfg.bias, INIT_STD)?,
            v_proj: Linear::new(&pb.pp("v_proj"), d, kv * hd, cfg.bias, INIT_STD)?,
            o_proj: Linear::new(&pb.pp("o_proj"), h * hd, d, cfg.o_bias.unwrap_or(cfg.bias), residual_std(ctx.n_layers))?,
            rope: Rope::new(hd, ctx.max_seq_len.max(1), cfg.rope_theta, pb.device())?,
            sink_k,
            sink_v,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: hd,
            qk_eps: cfg.qk_norm_eps.unwrap_or(1e-6),
            q_gain: gain("q_norm")?,
            k_gain: gain("k_norm")?,
            mask_cache: std::sync::Mutex::new(None),
            cfg: cfg.clone(),
        })
    }

    /// (B, T, n·hd) -> (B, n, T, hd)
    pub fn split_heads(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        crate::ops::split_heads(x, n)
    }

    /// (B, H, T, hd) -> (B, T, H·hd)
    pub fn merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::merge_heads(x)
    }

    /// Queries (B, H, T, hd): QK-norm (if configured, with its gain) and RoPE at absolute
    /// position `offset`.
    pub fn position_q(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        self.position(x, self.q_gain.as_ref(), offset)
    }

    /// Keys (B, Hkv, T, hd), as [`Attention::position_q`].
    pub fn position_k(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        self.position(x, self.k_gain.as_ref(), offset)
    }

    fn position(&self, x: &Tensor, gain: Option<&Tensor>, offset: usize) -> Result<Tensor> {
        let x = if self.cfg.qk_norm { rms_normalize(x, self.qk_eps)? } else { x.clone() };
        let x = match gain {
            Some(g) => x.broadcast_mul(&g.to_dtype(x.dtype())?)?,
            None => x,
        };
        self.rope.apply(&x, offset)
    }

    /// Append new keys/values to the layer's [`KvCache`] (if any) and return what the new queries
    /// attend over: K, V and the keys' absolute positions. The queries `q` (B, H, T, hd, as
    /// attended with) go to the cache's observation window when it has one
    /// ([`KvCache::observe`]), for presses that score by attention.
    pub fn update_cache(
        &self,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        state: Option<&mut LayerState>,
    ) -> Result<(Tensor, Tensor, KeyPositions)> {
        let Some(st) = state else { return Ok((k, v, KeyPositions::From(0))) };
        let cache = st.kv()?;
        let (k, v, pos) = cache.append(&k, &v)?;
        cache.observe(q)?;
        Ok((k, v, KeyPositions::of(pos)))
    }

    /// A ragged cache ([`KvCache::retain_heads`]): append k, v to each KV head's own slots, then
    /// attend each group of query heads over its KV head's keys at their positions.
    fn attend_ragged(&self, q: &Tensor, k: &Tensor, v: &Tensor, q_start: usize, st: &mut LayerState, phase: Phase) -> Result<Tensor> {
        if self.sink_k.is_some() {
            candle_core::bail!("attention: learned sinks with a ragged per-head cache are not supported")
        }
        let cache = st.kv()?;
        let parts = cache.append_heads(k, v)?;
        cache.observe(q)?;
        let g = self.n_heads / self.n_kv_heads;
        let mut ys = Vec::with_capacity(parts.len());
        for (h, (kh, vh, ph)) in parts.into_iter().enumerate() {
            let qh = q.narrow(1, h * g, g)?;
            ys.push(self.attend(&qh, &kh, &vh, q_start, &KeyPositions::of(ph), phase, None)?);
        }
        Tensor::cat(&ys, 1)
    }

    /// Scaled dot-product attention of q (B, H, T, hd) at positions `q_start..` over k, v
    /// (B, Hkv, Tk, hd) at positions `kpos`, with sinks, causal mask and window. Outside
    /// [`Phase::Train`] the fused (no-backward) softmax runs.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        q_start: usize,
        kpos: &KeyPositions,
        phase: Phase,
        probe: Option<&mut LayerProbe>,
    ) -> Result<Tensor> {
        let (k, v, n_sink) = match (&self.sink_k, &self.sink_v) {
            (Some(sk), Some(sv)) => {
                let b = k.dim(0)?;
                let sk = sk.to_dtype(k.dtype())?.unsqueeze(0)?.broadcast_as((b, sk.dim(0)?, sk.dim(1)?, sk.dim(2)?))?;
                let sv = sv.to_dtype(v.dtype())?.unsqueeze(0)?.broadcast_as((b, sv.dim(0)?, sv.dim(1)?, sv.dim(2)?))?;
                (Tensor::cat(&[&sk, k], 2)?, Tensor::cat(&[&sv, v], 2)?, self.cfg.sink_tokens)
            }
            _ => (k.clone(), v.clone(), 0),
        };
        let tk = k.dim(2)? - n_sink;
        // One query that sees every stored key (a window's ring while decoding, a cache after
        // eviction): the kernel may take the keys as consecutive positions ending at the query's,
        // which it sees all of too (attention does not depend on the keys' order).
        let sees_all = |pos: &[usize]| {
            q.dim(2).is_ok_and(|t| t == 1)
                && tk <= q_start + 1
                && self.cfg.window.is_none_or(|w| tk <= w)
                && pos.iter().all(|&p| p <= q_start && self.cfg.window.is_none_or(|w| q_start - p < w))
        };
        let kernel_start = match kpos {
            KeyPositions::From(k_start) => Some(*k_start),
            KeyPositions::List(pos) if sees_all(pos) => Some(q_start + 1 - tk),
            KeyPositions::List(_) => None,
        };
        if let (Some(k_start), None) = (kernel_start, probe.as_ref()) {
            // One query over a long cache: the split-KV kernel (the default) spreads the keys
            // over many blocks and takes every length. The per-row kernel (ZOO_FLASH_DECODE=rows)
            // gives each (batch, head) one block that walks every key, and candle's matmuls
            // spread the work better (H200, 8L/512, B = 4: 393 tok/s with the kernel against 649
            // without at T = 4096; 832 against 634 at T = 1024; results/bench/twins-h200.json).
            // On the CPU the op's CPU form takes every length (it reads the cache in place).
            let long_decode = q.device().is_cuda()
                && q.dim(2)? == 1
                && k.dim(2)? > DECODE_KERNEL_MAX_KEYS
                && zoo_kernels::attention::decode_kernel() != "split";
            if !long_decode {
                match zoo_kernels::attention::unsupported(q, &k, &v) {
                    None => {
                        let o = zoo_kernels::attention::FlashOpts {
                            scale: 1.0 / (q.dim(3)? as f64).sqrt(),
                            q_start,
                            k_start,
                            n_sink,
                            window: self.cfg.window,
                        };
                        return zoo_kernels::attention::flash_attention_op(q, &k, &v, &o);
                    }
                    Some(why) if q.device().is_cuda() && zoo_kernels::mode() == zoo_kernels::Kernels::Fused => {
                        zoo_kernels::note_fallback("attention", &why)
                    }
                    Some(_) => {}
                }
            }
        }
        let mask = match kpos {
            KeyPositions::From(k_start) => self.mask(q.dim(2)?, q_start, tk, *k_start, n_sink, phase, q.device())?,
            // One query that sees every stored key: no mask.
            KeyPositions::List(pos) if sees_all(pos) => None,
            KeyPositions::List(pos) => {
                Some(attention_mask_at(q_start, q.dim(2)?, pos, self.cfg.window, n_sink, q.device())?)
            }
        };
        sdpa(q, &k, &v, mask.as_ref(), phase, probe.map(|p| (p, n_sink)))
    }
}

impl Attention {
    /// The additive mask for `tq` queries from `q_start` over `tk` keys from `k_start`, built
    /// without a host round-trip on the hot paths: the full-sequence training mask is cached (a
    /// prefill builds its own and keeps nothing: a T×T mask per layer would outlive the prompt),
    /// and a one-token decode step needs none, or a device-side fill for the window edge.
    #[allow(clippy::too_many_arguments)]
    fn mask(
        &self,
        tq: usize,
        q_start: usize,
        tk: usize,
        k_start: usize,
        n_sink: usize,
        phase: Phase,
        dev: &Device,
    ) -> Result<Option<Tensor>> {
        if tq == 1 {
            // The query is the newest token, every cached key is in its past.
            let hidden = match self.cfg.window {
                Some(w) if tk > w => tk - w,
                _ => 0,
            };
            if hidden == 0 {
                return Ok(None);
            }
            let m = Tensor::cat(
                &[
                    Tensor::zeros((1, n_sink), DType::F32, dev)?,
                    Tensor::full(f32::NEG_INFINITY, (1, hidden), dev)?,
                    Tensor::zeros((1, tk - hidden), DType::F32, dev)?,
                ],
                1,
            )?;
            return Ok(Some(m));
        }
        let full_seq = phase == Phase::Train && q_start == 0 && k_start == 0 && tq == tk;
        if full_seq {
            if let Some((t, m)) = self.mask_cache.lock().unwrap().as_ref() {
                if *t == tq {
                    return Ok(Some(m.clone()));
                }
            }
        }
        let m = attention_mask(tq, q_start, tk, k_start, self.cfg.window, n_sink, dev)?;
        if full_seq {
            *self.mask_cache.lock().unwrap() = Some((tq, m.clone()));
        }
        Ok(Some(m))
    }
}

/// Additive mask (Tq, n_sink + Tk) in f32: 0 where query i (position q_start + i) may see key j
/// (position k_start + j), -inf elsewhere. Sink columns are always visible. Built on the device
/// from `arange`, so no host round-trip.
pub fn attention_mask(
    tq: usize,
    q_start: usize,
    tk: usize,
    k_start: usize,
    window: Option<usize>,
    n_sink: usize,
    device: &Device,
) -> Result<Tensor> {
    let qpos = Tensor::arange(q_start as i64, (q_start + tq) as i64, device)?.reshape((tq, 1))?;
    let kpos = Tensor::arange(k_start as i64, (k_start + tk) as i64, device)?.reshape((1, tk))?;
    let diff = qpos.broadcast_sub(&kpos)?; // q - k
    let mut ok = diff.ge(0i64)?;
    if let Some(w) = window {
        ok = (ok.to_dtype(DType::U8)? * diff.lt(w as i64)?.to_dtype(DType::U8)?)?;
    }
    let zeros = Tensor::zeros((tq, tk), DType::F32, device)?;
    let ninf = Tensor::full(f32::NEG_INFINITY, (tq, tk), device)?;
    let m = ok.where_cond(&zeros, &ninf)?;
    if n_sink > 0 {
        Tensor::cat(&[&Tensor::zeros((tq, n_sink), DType::F32, device)?, &m], 1)
    } else {
        Ok(m)
    }
}

/// A one-query step over more keys than this takes the composition (see `Attention::attend`),
/// unless the split-KV decoding kernel is on (`zoo_kernels::attention::decode_kernel`).
pub const DECODE_KERNEL_MAX_KEYS: usize = 2048;

/// The absolute positions of the keys a query block attends over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPositions {
    /// Consecutive positions from this one (no cache, or a cache never evicted from).
    From(usize),
    /// Any positions, one per key (after eviction, or a window's ring).
    List(Vec<usize>),
}

impl KeyPositions {
    pub fn of(pos: Vec<usize>) -> Self {
        match pos.first() {
            Some(&p0) if pos.iter().enumerate().all(|(j, &p)| p == p0 + j) => KeyPositions::From(p0),
            None => KeyPositions::From(0),
            _ => KeyPositions::List(pos),
        }
    }
}

/// Additive mask (Tq, n_sink + Tk) in f32 for queries at positions `q_start..q_start + tq` over
/// keys at the given positions (any order): 0 where the key is in the query's past (and within
/// the window), -inf elsewhere; sink columns always visible. Built on the host.
pub fn attention_mask_at(
    q_start: usize,
    tq: usize,
    kpos: &[usize],
    window: Option<usize>,
    n_sink: usize,
    device: &Device,
) -> Result<Tensor> {
    let tk = kpos.len();
    let mut m = vec![0f32; tq * (n_sink + tk)];
    for i in 0..tq {
        let qp = q_start + i;
        for (j, &kp) in kpos.iter().enumerate() {
            let visible = kp <= qp && window.is_none_or(|w| qp - kp < w);
            if !visible {
                m[i * (n_sink + tk) + n_sink + j] = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::from_vec(m, (tq, n_sink + tk), device)
}

/// softmax(q kᵀ / √d + mask) v with grouped heads: q (B, H, T, d), k and v (B, Hkv, Tk, d),
/// H a multiple of Hkv (query head h reads kv head h / (H / Hkv)). Scores and softmax in f32.
/// With a probe, the probabilities over the real (non-sink) keys are recorded as (B, H, T, Tk).
pub fn sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    phase: Phase,
    probe: Option<(&mut LayerProbe, usize)>,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (_, hkv, tk, _) = k.dims4()?;
    let rep = h / hkv;
    let dt = q.dtype();
    let work = if dt == DType::F64 { DType::F64 } else { DType::F32 };
    // Scale q (T·d elements) rather than the scores (T·Tk): one T² tensor fewer to keep for backward.
    let qg = (q * (1.0 / (d as f64).sqrt()))?.reshape((b, hkv, rep * t, d))?;
    let scores = qg.matmul(&k.contiguous()?.t()?)?.to_dtype(work)?;
    let scores = scores.reshape((b, hkv, rep, t, tk))?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(work)?)?,
        None => scores,
    };
    let probs = if phase.differentiable() {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        crate::ops::softmax_last_dim_fused(&scores.contiguous()?, phase)?
    };
    if let Some((p, n_sink)) = probe {
        p.attn = Some(probs.reshape((b, h, t, tk))?.narrow(3, n_sink, tk - n_sink)?.contiguous()?);
    }
    let probs = probs.reshape((b, hkv, rep * t, tk))?.to_dtype(dt)?;
    probs.matmul(&v.contiguous()?)?.reshape((b, h, t, d))
}

impl Mixer for Attention {
    fn forward(
        &self,
        x: &Tensor,
        phase: Phase,
        mut state: Option<&mut LayerState>,
        probe: Option<&mut LayerProbe>,
    ) -> Result<Tensor> {
        let offset = state.as_ref().map_or(0, |s| s.seen());
        let q = self.position_q(&self.split_heads(&self.q_proj.forward(x)?, self.n_heads)?, offset)?;
        let k = self.position_k(&self.split_heads(&self.k_proj.forward(x)?, self.n_kv_heads)?, offset)?;
        let v = self.split_heads(&self.v_proj.forward(x)?, self.n_kv_heads)?;
        if let Some(st) = state.as_deref_mut().filter(|s| matches!(s, LayerState::Kv(c) if c.is_ragged())) {
            let y = self.attend_ragged(&q, &k, &v, offset, st, phase)?;
            return self.o_proj.forward(&self.merge_heads(&y)?);
        }
        let (k, v, kpos) = self.update_cache(&q, k, v, state)?;
        let y = self.attend(&q, &k, &v, offset, &kpos, phase, probe)?;
        self.o_proj.forward(&self.merge_heads(&y)?)
    }

    fn new_state(&self, capacity: usize) -> LayerState {
        LayerState::Kv(KvCache::with_capacity(capacity, self.cfg.window))
    }

    fn cache_bytes(&self, batch: usize, seq_len: usize, dtype: DType) -> usize {
        let kept = self.cfg.window.map_or(seq_len, |w| seq_len.min(w));
        2 * batch * self.n_kv_heads * kept * self.head_dim * dtype.size_in_bytes()
    }

    fn kind(&self) -> String {
        "attention".into()
    }
}

crate::mixer_spec!(AttentionConfig => Attention, check(d_model, max_seq_len), [
    r#"n_heads = 4"#,
    r#"n_heads = 4, n_kv_heads = 2, qk_norm = true"#,
    r#"n_heads = 4, n_kv_heads = 2, head_dim = 6, qk_norm = true, qk_norm_gain = true, bias = true, o_bias = false"#,
    r#"n_heads = 4, n_kv_heads = 1, window = 4, sink_tokens = 2, bias = true"#,
]);
