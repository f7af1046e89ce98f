//! Mixture-of-head attention (Jin et al. 2025, "MoH: Multi-Head Attention as Mixture-of-Head
//! Attention", eq. 2-5): the heads of causal softmax attention as experts,
//! `MoH(X) = Σ_i g_i H_i W_O^i`, with
//!
//! - `h_s` shared heads, always on: `g_i = α_1 · softmax(x W_s)_i`;
//! - routed heads, the top k per token: `g_i = α_2 · softmax(x W_r)_i` if i is in the top k of the
//!   routed scores, else 0;
//! - `[α_1, α_2] = softmax(x W_h)` (the paper's two-stage routing);
//! - a load-balancing loss on the routed heads, `β · h_r · Σ_i f_i P_i` (f_i the share of the
//!   N·k picks that went to head i, P_i its mean routed score: Switch's form, as
//!   [`crate::router::aux_loss`]).
//!
//! Every head is computed and the unpicked ones are multiplied by zero: this shows MoH's effect on
//! quality, not its compute saving (which needs the picked heads gathered per token). Statistics:
//! `head_load` (share of picks per routed head), `head_load_cv`, `shared_weight` (mean α_1).
//!
//! ```
//! use zoo_core::candle_core::{DType, Device, Tensor};
//! use zoo_core::mixer::{BuildCtx, Mixer, MixerSpec, Phase};
//! use zoo_core::params::ParamStore;
//! use zoo_moe::moh::MohConfig;
//! let cfg: MohConfig = zoo_core::mixer::examples_from_toml(&["attention = { n_heads = 4 }, shared_heads = 1, top_k = 2"]).remove(0);
//! let ctx = BuildCtx { d_model: 16, n_layers: 1, layer: 0, max_seq_len: 8, kind_layer: 0, kind_layers: 1 };
//! cfg.validate(&ctx).unwrap();
//! let store = ParamStore::new(0, DType::F32, &Device::Cpu);
//! let moh = cfg.build(&ctx, &store.root())?;
//! let y = moh.forward(&Tensor::ones((1, 8, 16), DType::F32, &Device::Cpu)?, Phase::Train, None, None)?;
//! assert_eq!(y.dims(), &[1, 8, 16]);
//! assert!(moh.take_aux().unwrap().aux_loss.is_some());
//! # Ok::<(), zoo_core::candle_core::Error>(())
//! ```

use crate::router::{aux_loss, route_logits, Score};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use zoo_core::attention::{Attention, AttentionConfig};
use zoo_core::candle_core::{DType, Result, Tensor, D};
use zoo_core::mixer::{BuildCtx, LayerProbe, LayerState, Mixer, MixerAux, Phase, Stat, StatShape};
use zoo_core::nn::{Linear, INIT_STD};
use zoo_core::params::Pb;

fn beta() -> f64 {
    0.01
}

/// `type = "moh"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MohConfig {
    /// The attention (every option of plain attention; `n_heads` counts shared and routed heads).
    pub attention: AttentionConfig,
    /// Heads always on.
    pub shared_heads: usize,
    /// Routed heads each token uses.
    pub top_k: usize,
    /// Weight β of the routed heads' load-balancing loss (0: none).
    #[serde(default = "beta")]
    pub aux_loss: f64,
}

impl MohConfig {
    fn check(&self, d_model: usize, max_seq_len: usize) -> std::result::Result<(), String> {
        use zoo_core::mixer::MixerSpec;
        let ctx = BuildCtx { d_model, n_layers: 1, layer: 0, max_seq_len, kind_layer: 0, kind_layers: 1 };
        self.attention.validate(&ctx).map_err(|e| format!("attention.{e}"))?;
        let h = self.attention.n_heads;
        if self.shared_heads >= h {
            return Err(format!("shared_heads: {} must leave routed heads among the {h}", self.shared_heads));
        }
        if self.top_k == 0 || self.top_k > h - self.shared_heads {
            return Err(format!("top_k: {} must be in 1..={} (routed heads)", self.top_k, h - self.shared_heads));
        }
        if !(self.aux_loss.is_finite() && self.aux_loss >= 0.0) {
            return Err(format!("aux_loss: {} must be finite and >= 0", self.aux_loss));
        }
        Ok(())
    }
}

pub struct Moh {
    cfg: MohConfig,
    attn: Attention,
    /// W_s (d → h_s), absent with fewer than two shared heads (one head's softmax is 1); W_r
    /// (d → h_r); W_h (d → 2).
    shared: Option<Linear>,
    routed: Linear,
    stage: Linear,
    last: Mutex<Option<MixerAux>>,
}

impl Moh {
    pub fn new(cfg: &MohConfig, ctx: &BuildCtx, pb: &Pb) -> Result<Self> {
        let d = ctx.d_model;
        let h = cfg.attention.n_heads;
        let hs = cfg.shared_heads;
        Ok(Self {
            attn: Attention::new(&cfg.attention, ctx, pb)?,
            shared: if hs > 1 { Some(Linear::new(&pb.pp("router_shared"), d, hs, false, INIT_STD)?) } else { None },
            routed: Linear::new(&pb.pp("router"), d, h - hs, false, INIT_STD)?,
            stage: Linear::new(&pb.pp("router_stage"), d, 2, false, INIT_STD)?,
            cfg: cfg.clone(),
            last: Mutex::new(None),
        })
    }

    /// Per-token head weights g (B, T, H) for x (B, T, d), the routed heads' aux loss and stats.
    pub fn gates(&self, x: &Tensor) -> Result<(Tensor, MixerAux)> {
        let (b, t, d) = x.dims3()?;
        let flat = x.reshape((b * t, d))?;
        let sm = |z: Tensor| zoo_core::candle_nn::ops::softmax(&z.to_dtype(DType::F32)?, D::Minus1);
        let hr = self.cfg.attention.n_heads - self.cfg.shared_heads;
        let r = route_logits(&self.routed.forward(&flat)?.to_dtype(DType::F32)?, &vec![0.0; hr], self.cfg.top_k, Score::Softmax, 1.0, false)?;
        // Dense routed gates: the scores on the picked heads, zero elsewhere.
        let ids = Tensor::arange(0u32, hr as u32, x.device())?;
        let picked = r.experts.unsqueeze(2)?.broadcast_eq(&ids.reshape((1, 1, hr))?)?.to_dtype(DType::F32)?.sum(1)?;
        let alpha = sm(self.stage.forward(&flat)?)?; // (N, 2)
        let routed = (&r.scores * picked)?.broadcast_mul(&alpha.narrow(1, 1, 1)?)?;
        let g = match (&self.shared, self.cfg.shared_heads) {
            (_, 0) => routed,
            (Some(ws), _) => Tensor::cat(&[&sm(ws.forward(&flat)?)?.broadcast_mul(&alpha.narrow(1, 0, 1)?)?, &routed], 1)?,
            (None, _) => Tensor::cat(&[&alpha.narrow(1, 0, 1)?, &routed], 1)?,
        };
        let aux_loss = if self.cfg.aux_loss > 0.0 { Some(aux_loss(&r, self.cfg.aux_loss)?) } else { None };
        let (share, cv, _) = r.load_shares();
        let dev = x.device();
        let stats = vec![
            Stat::new("head_load", StatShape::PerExpert, Tensor::from_vec(share, hr, dev)?),
            Stat::new("head_load_cv", StatShape::Scalar, Tensor::new(&[cv as f32], dev)?),
            Stat::new("shared_weight", StatShape::Scalar, alpha.narrow(1, 0, 1)?.mean_all()?.detach().reshape(1)?),
        ];
        Ok((g.reshape((b, t, self.cfg.attention.n_heads))?, MixerAux { aux_loss, stats }))
    }
}

impl Mixer for Moh {
    fn forward(&self, x: &Tensor, phase: Phase, cache: Option<&mut LayerState>, probe: Option<&mut LayerProbe>) -> Result<Tensor> {
        let a = &self.attn;
        let offset = cache.as_ref().map_or(0, |c| c.seen());
        let q = a.position_q(&a.split_heads(&a.q_proj.forward(x)?, a.n_heads)?, offset)?;
        let k = a.position_k(&a.split_heads(&a.k_proj.forward(x)?, a.n_kv_heads)?, offset)?;
        let v = a.split_heads(&a.v_proj.forward(x)?, a.n_kv_heads)?;
        let (k, v, kpos) = a.update_cache(&q, k, v, cache)?;
        let y = a.attend(&q, &k, &v, offset, &kpos, phase, probe)?; // (B, H, T, hd)
        let (g, aux) = self.gates(x)?;
        let y = y.broadcast_mul(&g.transpose(1, 2)?.unsqueeze(3)?.to_dtype(y.dtype())?)?;
        *self.last.lock().unwrap() = Some(aux);
        a.o_proj.forward(&a.merge_heads(&y)?)
    }

    fn new_state(&self, capacity: usize) -> LayerState {
        self.attn.new_state(capacity)
    }

    fn cache_bytes(&self, batch: usize, seq_len: usize, dtype: DType) -> usize {
        self.attn.cache_bytes(batch, seq_len, dtype)
    }

    fn kind(&self) -> String {
        format!("moh(s{}k{})", self.cfg.shared_heads, self.cfg.top_k)
    }

    fn take_aux(&self) -> Option<MixerAux> {
        self.last.lock().unwrap().take()
    }
}

zoo_core::mixer_spec!(MohConfig => Moh, check(d_model, max_seq_len), [
    r#"attention = { n_heads = 4 }, shared_heads = 1, top_k = 2"#,
    r#"attention = { n_heads = 4, n_kv_heads = 2 }, shared_heads = 0, top_k = 1, aux_loss = 0.0"#,
    r#"attention = { n_heads = 4 }, shared_heads = 2, top_k = 1"#,
]);
