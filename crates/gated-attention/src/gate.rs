//! The gate: `g = act(X W_θ + b)`, combined with a target tensor `Y` as `Y ⊙ g` or `Y + g`.

use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{Result, Tensor};
use zoo_core::nn::{Linear, INIT_STD};
use zoo_core::params::{Group, Init, Pb};

/// Where the gate acts (paper §3.1, Figure 1: positions G1–G5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GatePosition {
    /// G1: after softmax·V, before the heads are merged and before o_proj (the paper's best).
    #[default]
    SdpaOutput,
    /// G2: after v_proj.
    Value,
    /// G3: after k_proj.
    Key,
    /// G4: after q_proj.
    Query,
    /// G5: after o_proj.
    DenseOutput,
}

/// One gate value per head, or one per channel (paper §3.1, "granularity").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GateGranularity {
    Headwise,
    #[default]
    Elementwise,
}

/// Head-specific gate weights, or one gate shared by all heads (paper §3.1, "head specific or shared").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GateSharing {
    #[default]
    HeadSpecific,
    Shared,
}

/// Gate non-linearity (paper §3.1, "activation function").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GateActivation {
    #[default]
    Sigmoid,
    Silu,
}

/// `Y ⊙ g` or `Y + g` (paper §3.1, "multiplicative or additive").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GateCombine {
    #[default]
    Multiplicative,
    Additive,
}

/// The gate's input: the block's normalised hidden state (paper default), or only its first k
/// channels (the low-cost variant of the modded-nanogpt speedrun).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GateInput {
    #[default]
    Hidden,
    FirstK(usize),
}

/// Initialisation of the gate projection.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GateInit {
    /// N(0, 0.02) weights, zero bias: sigmoid gates start near 0.5 (the reference widens q_proj,
    /// so its gate rows get q_proj's init).
    #[default]
    Default,
    /// Zero weights and bias: sigmoid gates start at exactly 0.5 (SiLU gates at 0).
    Zero,
    /// N(0, 0.02) weights and bias b: a large b starts a sigmoid gate near the identity.
    Bias(f64),
}

/// The gate of a [`crate::GatedAttention`] layer (`gate = { ... }` in the mixer config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GateConfig {
    #[serde(default)]
    pub position: GatePosition,
    #[serde(default)]
    pub granularity: GateGranularity,
    #[serde(default)]
    pub sharing: GateSharing,
    #[serde(default)]
    pub activation: GateActivation,
    #[serde(default)]
    pub combine: GateCombine,
    #[serde(default)]
    pub input: GateInput,
    #[serde(default)]
    pub init: GateInit,
    /// A learnable bias on the gate projection (always present with `init = { bias = b }`).
    #[serde(default)]
    pub bias: bool,
}

impl GateConfig {
    pub fn validate(&self, d_model: usize) -> std::result::Result<(), String> {
        if let GateInput::FirstK(k) = self.input {
            if k == 0 || k > d_model {
                return Err(format!("gate.input.first_k: {k} must be in 1..={d_model} (d_model)"));
            }
        }
        Ok(())
    }
}

/// A gate over a target viewed as (B, T, heads, width).
pub struct Gate {
    pub cfg: GateConfig,
    pub proj: Linear,
    /// Gate heads: `heads`, or 1 when shared.
    pub n: usize,
    /// Values per gate head: 1 (headwise) or the target's width (elementwise).
    pub w: usize,
    /// The target's head count and width.
    pub heads: usize,
    pub width: usize,
}

impl Gate {
    /// A gate for a target of `heads` × `width` channels, reading a `d_model`-wide input.
    pub fn new(cfg: &GateConfig, d_model: usize, heads: usize, width: usize, pb: &Pb) -> Result<Self> {
        let n = if cfg.sharing == GateSharing::Shared { 1 } else { heads };
        let w = if cfg.granularity == GateGranularity::Headwise { 1 } else { width };
        let d_in = match cfg.input {
            GateInput::Hidden => d_model,
            GateInput::FirstK(k) => k,
        };
        let (w_init, b_init) = match cfg.init {
            GateInit::Default => (Init::Normal(INIT_STD), 0.0),
            GateInit::Zero => (Init::Const(0.0), 0.0),
            GateInit::Bias(b) => (Init::Normal(INIT_STD), b),
        };
        let has_bias = cfg.bias || matches!(cfg.init, GateInit::Bias(_));
        let weight = pb.pp("proj").get("weight", (n * w, d_in), w_init, Group::Decay)?;
        let bias =
            if has_bias { Some(pb.pp("proj").get("bias", n * w, Init::Const(b_init), Group::NoDecay)?) } else { None };
        Ok(Self { cfg: cfg.clone(), proj: Linear::from_weights(weight, bias), n, w, heads, width })
    }

    /// Gate scores act(x W + b) as (B, T, n, w).
    pub fn scores(&self, x: &Tensor) -> Result<Tensor> {
        let x = match self.cfg.input {
            GateInput::Hidden => x.clone(),
            GateInput::FirstK(k) => x.narrow(2, 0, k)?,
        };
        let logits = self.proj.forward(&x)?;
        let g = match self.cfg.activation {
            GateActivation::Sigmoid => zoo_core::candle_nn::ops::sigmoid(&logits)?,
            GateActivation::Silu => logits.silu()?,
        };
        let (b, t, _) = g.dims3()?;
        g.reshape((b, t, self.n, self.w))
    }

    /// Combine scores `g` (B, T, n, w) with `y` (B, T, heads·width).
    pub fn apply(&self, y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (b, t, c) = y.dims3()?;
        let y4 = y.reshape((b, t, self.heads, self.width))?;
        let g = g.to_dtype(y.dtype())?;
        let out = match self.cfg.combine {
            GateCombine::Multiplicative => y4.broadcast_mul(&g)?,
            GateCombine::Additive => y4.broadcast_add(&g)?,
        };
        out.reshape((b, t, c))
    }
}
