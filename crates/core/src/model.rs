//! The decoder-only language model: token embedding (optionally tied to the head), pre-norm
//! blocks `h += mixer(norm(h)); h += ffn(norm(h))`, final norm, LM head (GPT-2 / Llama layout).

use crate::mixer::{BuildCtx, FeedForward, LayerProbe, LayerState, Mixer, Phase, Stat};
use crate::nn::{Embedding, Linear, RmsNorm, INIT_STD};
use crate::params::Pb;
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Shape of the model outside its layers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LmShape {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub tie_embeddings: bool,
    pub norm_eps: f64,
    pub max_seq_len: usize,
}

pub struct Block {
    pub norm1: RmsNorm,
    pub mixer: Box<dyn Mixer>,
    pub ffn: Option<(RmsNorm, Box<dyn FeedForward>)>,
}

/// A layer as built by the harness: its mixer and (optional) feed-forward.
pub type LayerParts = (Box<dyn Mixer>, Option<Box<dyn FeedForward>>);

pub struct Lm {
    pub shape: LmShape,
    pub embed: Embedding,
    pub blocks: Vec<Block>,
    pub norm_f: RmsNorm,
    pub head: Option<Linear>,
    /// Activation dtype (f32 on CPU, bf16 on CUDA, f64 in gradient checks).
    pub dtype: DType,
}

/// Per-forward diagnostics, filled only when asked.
#[derive(Debug, Default)]
pub struct ModelProbe {
    pub layers: Vec<LayerProbe>,
    /// max |h| of the residual stream after each block, scalar tensors.
    pub max_abs: Vec<Tensor>,
    /// FFN statistics per layer.
    pub ffn_stats: Vec<Vec<Stat>>,
}

/// What [`Lm::loss`] gives back.
pub struct LossOutput {
    /// The masked mean cross-entropy (f32; f64 for an f64 model), without the auxiliary loss.
    pub loss: Tensor,
    /// Sum of the feed-forwards' auxiliary losses, if any.
    pub aux_loss: Option<Tensor>,
    /// The feed-forwards' statistics of this forward, per layer.
    pub stats: Vec<Vec<Stat>>,
}

pub struct LmOutput {
    /// (B, T, V)
    pub logits: Tensor,
    /// Sum of the feed-forwards' auxiliary losses, if any.
    pub aux_loss: Option<Tensor>,
    /// The feed-forwards' statistics of this forward, per layer (empty lists for plain MLPs).
    pub stats: Vec<Vec<Stat>>,
}

impl Lm {
    /// Build the model; `layer` builds each layer's parts from its context.
    pub fn new(
        shape: &LmShape,
        dtype: DType,
        pb: &Pb,
        mut layer: impl FnMut(&BuildCtx, &Pb) -> Result<LayerParts>,
    ) -> Result<Self> {
        let embed = Embedding::new(&pb.pp("embed"), shape.vocab_size, shape.d_model)?;
        let mut blocks = Vec::with_capacity(shape.n_layers);
        for i in 0..shape.n_layers {
            let ctx = BuildCtx {
                d_model: shape.d_model,
                n_layers: shape.n_layers,
                layer: i,
                max_seq_len: shape.max_seq_len,
                kind_layer: i,
                kind_layers: shape.n_layers,
            };
            let lpb = pb.pp(format!("layers.{i}"));
            let (mixer, ffn) = layer(&ctx, &lpb)?;
            let norm1 = RmsNorm::new(&lpb.pp("norm1"), shape.d_model, shape.norm_eps)?;
            let ffn = match ffn {
                Some(f) => Some((RmsNorm::new(&lpb.pp("norm2"), shape.d_model, shape.norm_eps)?, f)),
                None => None,
            };
            blocks.push(Block { norm1, mixer, ffn });
        }
        let norm_f = RmsNorm::new(&pb.pp("norm_f"), shape.d_model, shape.norm_eps)?;
        let head = if shape.tie_embeddings {
            None
        } else {
            Some(Linear::new(&pb.pp("head"), shape.d_model, shape.vocab_size, false, INIT_STD)?)
        };
        Ok(Self { shape: shape.clone(), embed, blocks, norm_f, head, dtype })
    }

    /// A fresh, empty state per layer for prefill and decode; KV caches allocate as they fill.
    pub fn new_cache(&self) -> Vec<LayerState> {
        self.new_cache_with_capacity(0)
    }

    /// A fresh state per layer whose KV caches allocate `capacity` tokens at their first write
    /// (prompt + tokens to generate: decode then allocates nothing more).
    pub fn new_cache_with_capacity(&self, capacity: usize) -> Vec<LayerState> {
        self.blocks.iter().map(|b| b.mixer.new_state(capacity)).collect()
    }

    /// ids (B, T) u32 -> logits (B, T, V) for every position.
    /// `cache = None` is the training form ([`Phase::Train`]); with a cache, T new tokens are
    /// appended ([`Phase::Prefill`], or [`Phase::Decode`] for one token).
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut [LayerState]>, probe: Option<&mut ModelProbe>) -> Result<LmOutput> {
        self.forward_keep(ids, cache, probe, None)
    }

    /// [`Lm::forward`] with logits for the last `keep` positions only (`None`: all), as
    /// transformers' `logits_to_keep`: a prompt's prefill needs one row, not (T, V).
    pub fn forward_keep(
        &self,
        ids: &Tensor,
        cache: Option<&mut [LayerState]>,
        probe: Option<&mut ModelProbe>,
        keep: Option<usize>,
    ) -> Result<LmOutput> {
        let (h, aux_loss, stats) = self.trunk(ids, cache, probe, keep)?;
        let logits = match &self.head {
            Some(head) => head.forward(&h)?,
            None if self.embed.quant.is_some() && crate::nn::use_quantized(&h) => {
                self.embed.quant.as_ref().expect("checked").forward(&h)?
            }
            None => {
                let (b, t, d) = h.dims3()?;
                let w = self.embed.weight.to_dtype(h.dtype())?;
                crate::nn::matmul_t(&h.reshape((b * t, d))?, &w)?.reshape((b, t, ()))?
            }
        };
        Ok(LmOutput { logits, aux_loss, stats })
    }

    /// The training loss of a batch, the masked mean cross-entropy of `targets` (as
    /// [`cross_entropy`] of [`Lm::forward`]'s logits), with the forward's auxiliary loss and
    /// statistics (the auxiliary loss is not added). On the CPU in f32 the LM head is fused into
    /// the loss (`zoo_kernels::cross_entropy::linear_nll`): the (B·T, V) logits are made a chunk of
    /// rows at a time and their gradient never enters the autograd's store
    /// (`ZOO_KERNELS=naive`: the logits, then [`cross_entropy`]).
    pub fn loss(&self, ids: &Tensor, targets: &Tensor, mask: Option<&Tensor>) -> Result<LossOutput> {
        let fused = ids.device().is_cpu() && self.dtype == DType::F32 && zoo_kernels::mode() == zoo_kernels::Kernels::Fused;
        let head_w = match &self.head {
            Some(l) if l.bias.is_none() && l.quant.is_none() => Some(&l.weight),
            Some(_) => None,
            None if self.embed.quant.is_none() => Some(&self.embed.weight),
            None => None,
        };
        match head_w.filter(|w| fused && w.dtype() == DType::F32) {
            Some(w) => {
                let (h, aux_loss, stats) = self.trunk(ids, None, None, None)?;
                let (b, t, d) = h.dims3()?;
                let nll = zoo_kernels::cross_entropy::linear_nll(&h.reshape((b * t, d))?, w, &targets.flatten_all()?)?;
                Ok(LossOutput { loss: masked_mean(&nll, mask, DType::F32)?, aux_loss, stats })
            }
            None => {
                let out = self.forward(ids, None, None)?;
                Ok(LossOutput { loss: cross_entropy(&out.logits, targets, mask)?, aux_loss: out.aux_loss, stats: out.stats })
            }
        }
    }

    /// The embedding and the blocks, then the final norm: (h (B, T', d) of the last `keep`
    /// positions, the summed auxiliary loss, the statistics per layer).
    #[allow(clippy::type_complexity)]
    fn trunk(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut [LayerState]>,
        mut probe: Option<&mut ModelProbe>,
        keep: Option<usize>,
    ) -> Result<(Tensor, Option<Tensor>, Vec<Vec<Stat>>)> {
        let phase = Phase::of(cache.is_some(), ids.dim(1)?);
        let mut h = self.embed.forward(ids, self.dtype)?;
        let mut aux: Option<Tensor> = None;
        let mut all_stats = Vec::with_capacity(self.blocks.len());
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| &mut c[i]);
            let mut lp = probe.as_ref().map(|_| LayerProbe::default());
            let y = block.mixer.forward(&block.norm1.forward(&h)?, phase, layer_cache, lp.as_mut())?;
            h = (h + y)?;
            let mut stats = Vec::new();
            let mut add_aux = |a: Option<Tensor>| -> Result<()> {
                if let Some(a) = a {
                    aux = Some(match aux.take() {
                        Some(s) => (s + a)?,
                        None => a,
                    });
                }
                Ok(())
            };
            if let Some(m) = block.mixer.take_aux() {
                add_aux(m.aux_loss)?;
                stats = m.stats;
            }
            if let Some((norm2, ffn)) = &block.ffn {
                let out = ffn.forward(&norm2.forward(&h)?)?;
                h = (h + out.y)?;
                add_aux(out.aux_loss)?;
                stats.extend(out.stats);
            }
            if let Some(p) = probe.as_mut() {
                p.layers.push(lp.unwrap_or_default());
                p.max_abs.push(h.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F32)?);
                p.ffn_stats.push(stats.clone());
            }
            all_stats.push(stats);
        }
        let h = match keep {
            Some(k) if k < h.dim(1)? => h.narrow(1, h.dim(1)? - k, k)?,
            _ => h,
        };
        Ok((self.norm_f.forward(&h)?, aux, all_stats))
    }

    /// Let every mixer and feed-forward update its non-gradient state; the training loop calls this
    /// after each optimiser step.
    pub fn after_step(&self) -> Result<()> {
        for b in &self.blocks {
            b.mixer.after_step()?;
            if let Some((_, f)) = &b.ffn {
                f.after_step()?;
            }
        }
        Ok(())
    }

    /// Exact cache/state bytes of the whole model after `seq_len` tokens.
    pub fn cache_bytes(&self, batch: usize, seq_len: usize) -> usize {
        self.blocks.iter().map(|b| b.mixer.cache_bytes(batch, seq_len, self.dtype)).sum()
    }

    /// "attention×4" style summary of the layer stack.
    pub fn describe(&self) -> String {
        let names: Vec<String> = self.blocks.iter().map(|b| b.mixer.kind()).collect();
        names.join(",")
    }
}

/// Mean cross-entropy over positions where `mask` is 1 (all positions if `mask` is None).
/// logits (B, T, V), targets (B, T) u32, mask (B, T) in {0, 1}. Computed in f32 (f64 stays f64)
/// from `log_softmax`, which records a backward pass; on CUDA by the fused kernel
/// (`zoo_kernels::cross_entropy`) unless `ZOO_KERNELS=naive`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let work = if logits.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let nll = match zoo_kernels::cross_entropy::unsupported(logits, targets) {
        // The fused kernel (CUDA): per-row lse, gradient written once in the logits' type.
        None => zoo_kernels::cross_entropy::nll_op(&logits.reshape((b * t, v))?, &targets.flatten_all()?)?,
        Some(_) => {
            let lp = candle_nn::ops::log_softmax(&logits.to_dtype(work)?.reshape((b * t, v))?, 1)?;
            lp.gather(&targets.reshape((b * t, 1))?, 1)?.reshape(b * t)?.neg()?
        }
    };
    masked_mean(&nll, mask, work)
}

/// The mean of per-position losses `nll` (B·T,) over the positions where `mask` (B, T) is 1 (all
/// without a mask), in `work`.
fn masked_mean(nll: &Tensor, mask: Option<&Tensor>, work: DType) -> Result<Tensor> {
    match mask {
        None => nll.mean(0),
        Some(m) => {
            let m = m.flatten_all()?.to_dtype(work)?;
            let n = m.sum_all()?.maximum(1.0)?;
            (nll * &m)?.sum_all()?.broadcast_div(&n)
        }
    }
}
