//! Gated attention, after "Gated Attention for Large Language Models: Non-linearity, Sparsity, and
//! Attention-Sink-Free" (Qiu et al., NeurIPS 2025). The paper's winner is a head-specific sigmoid
//! gate on the SDPA output (G1), computed from the same normalised hidden state as q, k and v:
//! `Y'_i = SDPA(Q_i, K_i, V_i) ⊙ σ(X W_θ,i)`, then `concat_i(Y'_i) W_O`.
//!
//! [`GateConfig`] spans the paper's ablation space (§3 and Table 1/2 of the paper): position
//! (G1–G5), granularity (headwise / elementwise), sharing across heads, activation (sigmoid /
//! SiLU), combine rule (multiplicative / additive), the gate's input, and its initialisation.
//! [`layout`] converts to and from the reference release's widened `q_proj`.

pub mod gate;
pub mod gated_attention;
pub mod layout;

pub use gate::{
    Gate, GateActivation, GateCombine, GateConfig, GateGranularity, GateInit, GateInput, GatePosition, GateSharing,
};
pub use gated_attention::{GatedAttention, GatedAttentionConfig};
