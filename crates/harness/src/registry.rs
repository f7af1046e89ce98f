//! Where the method crates meet: the config enums naming every sequence mixer and feed-forward, and
//! the function that builds a layer from them. Adding a mixer = one enum variant + one match arm.

use serde::{Deserialize, Serialize};
use zoo_core::attention::{Attention, AttentionConfig};
use zoo_core::candle_core::Result;
use zoo_core::conv::{ShortConv, ShortConvConfig};
use zoo_core::mixer::{BuildCtx, FeedForward, Mixer};
use zoo_core::mlp::{GeluMlp, MlpConfig, SwiGlu};
use zoo_core::params::Pb;
use zoo_gated_attention::{GatedAttention, GatedAttentionConfig};
use zoo_linear_attention::based::{Based, BasedConfig};
use zoo_linear_attention::deltanet::{DeltaNet, DeltaNetConfig};
use zoo_linear_attention::gla::{Gla, GlaConfig};
use zoo_linear_attention::linear::{LinearAttention, LinearAttentionConfig};
use zoo_linear_attention::retnet::{RetNetConfig, Retention};
use zoo_linear_attention::simple_gla::{SimpleGla, SimpleGlaConfig};

/// A sequence mixer, chosen by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MixerConfig {
    /// Causal softmax attention (zoo-core).
    Attention(AttentionConfig),
    /// Zoology's BaseConv: a gated short causal convolution (zoo-core).
    ShortConv(ShortConvConfig),
    /// Softmax attention with a gate at G1–G5 (zoo-gated-attention).
    GatedAttention(GatedAttentionConfig),
    /// Katharopoulos linear attention (zoo-linear-attention).
    LinearAttention(LinearAttentionConfig),
    /// RetNet retention (zoo-linear-attention).
    Retnet(RetNetConfig),
    /// Gated linear attention (zoo-linear-attention).
    Gla(GlaConfig),
    /// Simple GLA / Lightning: scalar per-head decay (zoo-linear-attention).
    SimpleGla(SimpleGlaConfig),
    /// Based: Taylor-feature linear attention (zoo-linear-attention).
    Based(BasedConfig),
    /// DeltaNet / Gated DeltaNet: the delta rule (zoo-linear-attention).
    Deltanet(DeltaNetConfig),
}

impl MixerConfig {
    /// Check against the model width and the longest sequence; the error starts with the field.
    pub fn validate(&self, d_model: usize, seq_len: usize) -> std::result::Result<(), String> {
        match self {
            MixerConfig::Attention(c) => c.validate(d_model, seq_len),
            MixerConfig::ShortConv(c) => c.validate(d_model, seq_len),
            MixerConfig::GatedAttention(c) => c.validate(d_model, seq_len),
            MixerConfig::LinearAttention(c) => c.validate(d_model),
            MixerConfig::Retnet(c) => c.validate(d_model),
            MixerConfig::Gla(c) => c.validate(d_model),
            MixerConfig::SimpleGla(c) => c.validate(d_model),
            MixerConfig::Based(c) => c.validate(d_model),
            MixerConfig::Deltanet(c) => c.validate(d_model),
        }
    }

    pub fn build(&self, ctx: &BuildCtx, pb: &Pb) -> Result<Box<dyn Mixer>> {
        Ok(match self {
            MixerConfig::Attention(c) => Box::new(Attention::new(c, ctx, pb)?),
            MixerConfig::ShortConv(c) => Box::new(ShortConv::new(c, ctx, pb)?),
            MixerConfig::GatedAttention(c) => Box::new(GatedAttention::new(c, ctx, pb)?),
            MixerConfig::LinearAttention(c) => Box::new(LinearAttention::new(c, ctx, pb)?),
            MixerConfig::Retnet(c) => Box::new(Retention::new(c, ctx, pb)?),
            MixerConfig::Gla(c) => Box::new(Gla::new(c, ctx, pb)?),
            MixerConfig::SimpleGla(c) => Box::new(SimpleGla::new(c, ctx, pb)?),
            MixerConfig::Based(c) => Box::new(Based::new(c, ctx, pb)?),
            MixerConfig::Deltanet(c) => Box::new(DeltaNet::new(c, ctx, pb)?),
        })
    }
}

/// For each layer, (its index among the layers with the same mixer `type`, how many there are).
pub fn kind_positions(mixers: &[MixerConfig]) -> Vec<(usize, usize)> {
    let kind = |m: &MixerConfig| std::mem::discriminant(m);
    mixers
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let before = mixers[..i].iter().filter(|o| kind(o) == kind(m)).count();
            (before, mixers.iter().filter(|o| kind(o) == kind(m)).count())
        })
        .collect()
}

/// A feed-forward, chosen by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FfnConfig {
    Swiglu(MlpConfig),
    Gelu(MlpConfig),
    /// No feed-forward: mixer-only blocks (Zoology's MQAR models).
    None,
}

impl FfnConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        match self {
            FfnConfig::Swiglu(c) | FfnConfig::Gelu(c) if c.hidden == Some(0) => {
                Err("hidden: must be at least 1".into())
            }
            _ => Ok(()),
        }
    }

    pub fn build(&self, ctx: &BuildCtx, pb: &Pb) -> Result<Option<Box<dyn FeedForward>>> {
        Ok(match self {
            FfnConfig::Swiglu(c) => Some(Box::new(SwiGlu::new(c, ctx, pb)?)),
            FfnConfig::Gelu(c) => Some(Box::new(GeluMlp::new(c, ctx, pb)?)),
            FfnConfig::None => None,
        })
    }
}
