//! The gated attention mixer: zoo-core's causal softmax attention with one [`Gate`] inserted at the
//! configured position (paper §3.1, eq. 5: `Y' = g(Y, X, W_θ, σ) = Y ⊙ σ(X W_θ)`).

use crate::gate::{Gate, GateConfig, GatePosition};
use serde::{Deserialize, Serialize};
use zoo_core::attention::{Attention, AttentionConfig};
use zoo_core::candle_core::{DType, Result, Tensor};
use zoo_core::mixer::{BuildCtx, LayerProbe, LayerState, Mixer, Phase, Stat, StatShape};
use zoo_core::params::Pb;

/// `type = "gated_attention"`: `attention = { ... }` takes every option of plain attention
/// (GQA, QK-norm, window, sinks, RoPE θ), `gate = { ... }` the gate (see [`GateConfig`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatedAttentionConfig {
    pub attention: AttentionConfig,
    #[serde(default)]
    pub gate: GateConfig,
}

impl GatedAttentionConfig {
    fn check(&self, d_model: usize, seq_len: usize) -> std::result::Result<(), String> {
        let ctx = BuildCtx { d_model, max_seq_len: seq_len, n_layers: 1, layer: 0, kind_layer: 0, kind_layers: 1 };
        zoo_core::mixer::MixerSpec::validate(&self.attention, &ctx).map_err(|e| format!("attention.{e}"))?;
        self.gate.validate(d_model)
    }
}

pub struct GatedAttention {
    pub attn: Attention,
    pub gate: Gate,
}

impl GatedAttention {
    pub fn new(cfg: &GatedAttentionConfig, ctx: &BuildCtx, pb: &Pb) -> Result<Self> {
        let attn = Attention::new(&cfg.attention, ctx, pb)?;
        let (heads, width) = match cfg.gate.position {
            GatePosition::SdpaOutput | GatePosition::Query => (attn.n_heads, attn.head_dim),
            GatePosition::Key | GatePosition::Value => (attn.n_kv_heads, attn.head_dim),
            // The o_proj output viewed as n_heads chunks, so that "headwise" stays one gate per head.
            GatePosition::DenseOutput => (attn.n_heads, ctx.d_model / attn.n_heads),
        };
        let gate = Gate::new(&cfg.gate, ctx.d_model, heads, width, &pb.pp("gate"))?;
        Ok(Self { attn, gate })
    }
}

impl Mixer for GatedAttention {
    fn forward(
        &self,
        x: &Tensor,
        phase: Phase,
        cache: Option<&mut LayerState>,
        probe: Option<&mut LayerProbe>,
    ) -> Result<Tensor> {
        let a = &self.attn;
        let pos = self.gate.cfg.position;
        let offset = cache.as_ref().map_or(0, |c| c.seen());
        let g = self.gate.scores(x)?;
        let at = |p: GatePosition, y: Tensor| if pos == p { self.gate.apply(&y, &g) } else { Ok(y) };
        let q = at(GatePosition::Query, a.q_proj.forward(x)?)?;
        let k = at(GatePosition::Key, a.k_proj.forward(x)?)?;
        let v = at(GatePosition::Value, a.v_proj.forward(x)?)?;
        let q = a.position_q(&a.split_heads(&q, a.n_heads)?, offset)?;
        let k = a.position_k(&a.split_heads(&k, a.n_kv_heads)?, offset)?;
        let v = a.split_heads(&v, a.n_kv_heads)?;
        let (k, v, kpos) = a.update_cache(&q, k, v, cache)?;
        let mut probe = probe;
        let y = a.attend(&q, &k, &v, offset, &kpos, phase, probe.as_deref_mut())?;
        let y = at(GatePosition::SdpaOutput, a.merge_heads(&y)?)?;
        let out = at(GatePosition::DenseOutput, a.o_proj.forward(&y)?)?;
        if let Some(p) = probe {
            let gf = g.to_dtype(DType::F32)?;
            p.stats.push(Stat::new("gate_mean", StatShape::Scalar, gf.clone()));
            p.stats.push(Stat::new("gate_frac_below_0.1", StatShape::Scalar, gf.lt(0.1f32)?.to_dtype(DType::F32)?));
        }
        Ok(out)
    }

    fn new_state(&self, capacity: usize) -> LayerState {
        self.attn.new_state(capacity)
    }

    fn cache_bytes(&self, batch: usize, seq_len: usize, dtype: DType) -> usize {
        self.attn.cache_bytes(batch, seq_len, dtype)
    }

    fn kind(&self) -> String {
        let c = &self.gate.cfg;
        format!("gated_attention({:?},{:?})", c.position, c.granularity).to_lowercase()
    }
}

zoo_core::mixer_spec!(GatedAttentionConfig => GatedAttention, check(d_model, max_seq_len), [
    r#"attention = { n_heads = 4, n_kv_heads = 2 }, gate = { position = "sdpa_output", granularity = "headwise" }"#,
    r#"attention = { n_heads = 4 }, gate = { position = "value", sharing = "shared", input = { first_k = 8 }, init = { bias = 2.0 } }"#,
]);
