//! Gated attention, after "Gated Attention for Large Language Models: Non-linearity, Sparsity, and
//! Attention-Sink-Free" (Qiu et al., NeurIPS 2025). The paper's winner is a head-specific sigmoid
//! gate on the SDPA output (G1), computed from the same normalised hidden state as q, k and v:
//! `Y'_i = SDPA(Q_i, K_i, V_i) ⊙ σ(X W_θ,i)`, then `concat_i(Y'_i) W_O`.
//!
//! [`GateConfig`] spans the paper's ablation space (§3 and Table 1/2 of the paper): position
//! (G1–G5), granularity (headwise / elementwise), sharing across heads, activation (sigmoid /
//! SiLU), combine rule (multiplicative / additive), the gate's input, and its initialisation.
//! [`layout`] converts to and from the reference release's widened `q_proj`.
//!
//! ```
//! use zoo_core::candle_core::{DType, Device, Tensor};
//! use zoo_core::mixer::{examples_from_toml, BuildCtx, MixerSpec, Phase};
//! use zoo_core::params::ParamStore;
//! use zoo_gated_attention::GatedAttentionConfig;
//! let store = ParamStore::new(0, DType::F32, &Device::Cpu);
//! let ctx = BuildCtx { d_model: 16, n_layers: 1, layer: 0, max_seq_len: 8, kind_layer: 0, kind_layers: 1 };
//! // G1: a head-specific sigmoid gate on the SDPA output.
//! let cfg: GatedAttentionConfig = examples_from_toml(&[
//!     r#"attention = { n_heads = 4 }, gate = { position = "sdpa_output", granularity = "headwise" }"#,
//! ])
//! .remove(0);
//! let layer = cfg.build(&ctx, &store.root())?;
//! let y = layer.forward(&Tensor::ones((2, 8, 16), DType::F32, &Device::Cpu)?, Phase::Train, None, None)?;
//! assert_eq!(y.dims(), &[2, 8, 16]);
//! # Ok::<(), zoo_core::candle_core::Error>(())
//! ```

pub mod gate;
pub mod gated_attention;
pub mod layout;

pub use gate::{
    Gate, GateActivation, GateCombine, GateConfig, GateGranularity, GateInit, GateInput, GatePosition, GateSharing,
};
pub use gated_attention::{GatedAttention, GatedAttentionConfig};
