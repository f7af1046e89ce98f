//! Where the method crates meet: the config enums naming every sequence mixer and feed-forward.
//! Each mixer config is a [`MixerSpec`] (it validates and builds itself, next to its struct);
//! adding a mixer = one line in [`mixers!`].

use serde::{Deserialize, Serialize};
use zoo_core::attention::AttentionConfig;
use zoo_core::candle_core::Result;
use zoo_core::conv::ShortConvConfig;
use zoo_core::mixer::{BuildCtx, FeedForward, FfnSpec, Mixer, MixerSpec};
use zoo_core::mlp::{GeluMlp, MlpConfig, SwiGlu};
use zoo_core::params::Pb;
use zoo_gated_attention::GatedAttentionConfig;
use zoo_linear_attention::based::BasedConfig;
use zoo_linear_attention::deltanet::DeltaNetConfig;
use zoo_linear_attention::gla::GlaConfig;
use zoo_linear_attention::linear::LinearAttentionConfig;
use zoo_linear_attention::retnet::RetNetConfig;
use zoo_linear_attention::simple_gla::SimpleGlaConfig;

/// One line per mixer: its `type` (the variant in snake_case, or a `serde(rename)`), its config (a
/// [`MixerSpec`]) and a doc line. The macro writes the enum and the dispatch: adding a mixer is one
/// file in its method crate (config + layer + `impl MixerSpec`) and one line here.
macro_rules! mixers {
    ($($(#[$doc:meta])* $variant:ident($cfg:ty),)*) => {
        /// A sequence mixer, chosen by `type`.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        pub enum MixerConfig {
            $($(#[$doc])* $variant($cfg),)*
        }

        impl MixerSpec for MixerConfig {
            fn validate(&self, ctx: &BuildCtx) -> std::result::Result<(), String> {
                match self {
                    $(MixerConfig::$variant(c) => <$cfg as MixerSpec>::validate(c, ctx),)*
                }
            }

            fn build(&self, ctx: &BuildCtx, pb: &Pb) -> Result<Box<dyn Mixer>> {
                match self {
                    $(MixerConfig::$variant(c) => <$cfg as MixerSpec>::build(c, ctx, pb),)*
                }
            }

            /// Every registered variant's examples.
            fn examples() -> Vec<Self> {
                let mut all = Vec::new();
                $(all.extend(<$cfg as MixerSpec>::examples().into_iter().map(MixerConfig::$variant));)*
                all
            }
        }
    };
}

mixers! {
    /// Causal softmax attention (zoo-core).
    Attention(AttentionConfig),
    /// Zoology's BaseConv: a gated short causal convolution (zoo-core).
    ShortConv(ShortConvConfig),
    /// Softmax attention with a gate at G1–G5 (zoo-gated-attention).
    GatedAttention(GatedAttentionConfig),
    /// Katharopoulos linear attention (zoo-linear-attention).
    LinearAttention(LinearAttentionConfig),
    /// RetNet retention (zoo-linear-attention).
    #[serde(rename = "retnet")]
    RetNet(RetNetConfig),
    /// Gated linear attention (zoo-linear-attention).
    Gla(GlaConfig),
    /// Simple GLA / Lightning: scalar per-head decay (zoo-linear-attention).
    SimpleGla(SimpleGlaConfig),
    /// Based: Taylor-feature linear attention (zoo-linear-attention).
    Based(BasedConfig),
    /// DeltaNet / Gated DeltaNet: the delta rule (zoo-linear-attention).
    #[serde(rename = "deltanet")]
    DeltaNet(DeltaNetConfig),
    /// Mixture-of-head attention: shared and top-k routed heads (zoo-moe).
    Moh(zoo_moe::moh::MohConfig),
}

impl MixerConfig {
    /// The mixer's `type` name, as written in configs.
    pub fn kind(&self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v["type"].as_str().map(String::from)).unwrap_or_default()
    }
}

/// For each layer, (its index among the layers with the same mixer `type`, how many there are).
pub fn kind_positions(mixers: &[MixerConfig]) -> Vec<(usize, usize)> {
    let kind = |m: &MixerConfig| std::mem::discriminant(m);
    let mut total = std::collections::HashMap::new();
    for m in mixers {
        *total.entry(kind(m)).or_insert(0usize) += 1;
    }
    let mut seen = std::collections::HashMap::new();
    mixers
        .iter()
        .map(|m| {
            let i = seen.entry(kind(m)).or_insert(0usize);
            *i += 1;
            (*i - 1, total[&kind(m)])
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
    /// Mixture of SwiGLU experts with a top-k router (zoo-moe).
    Moe(zoo_moe::MoeConfig),
}

impl FfnSpec for FfnConfig {
    fn validate(&self, _ctx: &BuildCtx) -> std::result::Result<(), String> {
        match self {
            FfnConfig::Swiglu(c) | FfnConfig::Gelu(c) if c.hidden == Some(0) => {
                Err("hidden: must be at least 1".into())
            }
            FfnConfig::Moe(c) => c.validate(),
            _ => Ok(()),
        }
    }

    fn build(&self, ctx: &BuildCtx, pb: &Pb) -> Result<Option<Box<dyn FeedForward>>> {
        Ok(match self {
            FfnConfig::Swiglu(c) => Some(Box::new(SwiGlu::new(c, ctx, pb)?)),
            FfnConfig::Gelu(c) => Some(Box::new(GeluMlp::new(c, ctx, pb)?)),
            FfnConfig::None => None,
            FfnConfig::Moe(c) => Some(Box::new(zoo_moe::Moe::new(c, ctx, pb)?)),
        })
    }

    fn examples() -> Vec<Self> {
        zoo_core::mixer::examples_from_toml(&[
            r#"type = "swiglu""#,
            r#"type = "gelu", bias = true"#,
            r#"type = "none""#,
            r#"type = "moe", n_experts = 4, top_k = 2, expert_hidden = 16, balance = { type = "aux_loss", alpha = 0.01 }, z_loss = 0.001"#,
            r#"type = "moe", n_experts = 4, top_k = 1, expert_hidden = 16, shared_experts = 1, shared_gate = true, activation = "tanh", noise = { type = "jitter", eps = 0.01 }"#,
            r#"type = "moe", n_experts = 4, top_k = 2, expert_hidden = 16, routing = { type = "expert_choice" }"#,
            r#"type = "moe", n_experts = 4, top_k = 2, expert_hidden = 16, routing = { type = "dense_to_sparse" }"#,
        ])
    }
}
