//! The two plug-in interfaces of a block: the sequence mixer and the feed-forward.
//!
//! A method crate (gated attention, linear attention, MoE, ...) implements one of these traits and is
//! registered in the harness's config enum; the core never needs to know the concrete type.

use crate::params::Pb;
use candle_core::{DType, Result, Tensor};

pub use crate::state::{KvCache, LayerState, Phase, RecurrentState};

/// What a layer constructor needs to know about its place in the model.
#[derive(Debug, Clone, Copy)]
pub struct BuildCtx {
    pub d_model: usize,
    pub n_layers: usize,
    /// 0-based index of this layer.
    pub layer: usize,
    /// Longest sequence the model will see (RoPE tables, windows).
    pub max_seq_len: usize,
    /// 0-based index of this layer among the stack's layers of the same mixer type, and their
    /// count (depth schedules such as Lightning's count only their own layers). [`crate::model::Lm::new`]
    /// sets them to `layer` and `n_layers`; the builder of a mixed stack overrides them.
    pub kind_layer: usize,
    pub kind_layers: usize,
}

/// What a statistic's values index: nothing (one number), heads, or experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatShape {
    Scalar,
    PerHead,
    PerExpert,
}

/// A named statistic a module reports. `Scalar`: the mean of all of `value`; `PerHead` /
/// `PerExpert`: the last dimension of `value` is the head / expert axis and the leading dimensions
/// are averaged, so a load vector stays a vector.
#[derive(Debug, Clone)]
pub struct Stat {
    pub name: String,
    pub shape: StatShape,
    pub value: Tensor,
}

/// A [`Stat`] reduced to host numbers, as results store it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StatValue {
    pub shape: StatShape,
    pub values: Vec<f64>,
}

impl Stat {
    pub fn new(name: impl Into<String>, shape: StatShape, value: Tensor) -> Self {
        Self { name: name.into(), shape, value }
    }

    pub fn reduce(&self) -> Result<StatValue> {
        let v = self.value.to_dtype(DType::F64)?;
        let values = match self.shape {
            StatShape::Scalar => vec![v.mean_all()?.to_scalar::<f64>()?],
            StatShape::PerHead | StatShape::PerExpert => {
                let n = v.dims().last().copied().unwrap_or(1);
                v.reshape(((), n))?.mean(0)?.to_vec1::<f64>()?
            }
        };
        Ok(StatValue { shape: self.shape, values })
    }
}

/// Eval-time diagnostics a mixer may record when asked (never on the training path).
#[derive(Debug, Default)]
pub struct LayerProbe {
    /// Softmax attention probabilities over the real tokens, (B, H, T, T).
    pub attn: Option<Tensor>,
    /// Named statistics (e.g. gate scores).
    pub stats: Vec<Stat>,
}

/// A sequence mixer: maps (B, T, D) to (B, T, D), mixing information only from the past.
///
/// Three forms share one entry point, told apart by the [`Phase`]:
/// - `Train`, `state = None`: the full-sequence form; must be differentiable.
/// - `Prefill`, a fresh or earlier state and T ≥ 2: appends T tokens, filling the state.
/// - `Decode`, T = 1: incremental decode; the output must equal the matching rows of the
///   full-sequence form.
pub trait Mixer: Send + Sync {
    fn forward(
        &self,
        x: &Tensor,
        phase: Phase,
        state: Option<&mut LayerState>,
        probe: Option<&mut LayerProbe>,
    ) -> Result<Tensor>;

    /// A fresh state of the kind this mixer keeps. `capacity`: the number of tokens it is expected
    /// to hold (a KV cache allocates that many slots at its first write; 0 = what the first write
    /// brings, then doubling).
    fn new_state(&self, capacity: usize) -> LayerState;

    /// Exact size in bytes of this layer's cache/state after `seq_len` tokens of `batch` sequences
    /// with activations in `dtype` (must equal [`LayerState::bytes`] after such a prefill into a
    /// fresh state of capacity 0).
    fn cache_bytes(&self, batch: usize, seq_len: usize, dtype: DType) -> usize;

    /// A short name for tables and logs.
    fn kind(&self) -> String;

    /// Update non-gradient state after each optimiser step (e.g. a balancing bias); default none.
    fn after_step(&self) -> Result<()> {
        Ok(())
    }

    /// What the last `forward` produced besides its output, handed over once: an auxiliary loss
    /// (already weighted; [`crate::model::Lm::forward`] adds it to the feed-forwards' and the
    /// training loop to the loss) and named statistics (reported with the layer's feed-forward
    /// statistics). Mixers with a router (mixture-of-heads) keep them from their forward; default
    /// none.
    fn take_aux(&self) -> Option<MixerAux> {
        None
    }
}

/// A mixer's auxiliary loss and statistics from one forward ([`Mixer::take_aux`]).
#[derive(Debug, Default)]
pub struct MixerAux {
    pub aux_loss: Option<Tensor>,
    pub stats: Vec<Stat>,
}

/// A mixer's config (burn's `Config::init` style): it checks itself against the build context,
/// builds its layer, and names small example configs covering its main options. The shared contract
/// checks ([`crate::check::mixer_contract`]: gradient flow, decode parity, cache bytes, determinism)
/// iterate `examples()`, so a new mixer is covered by construction.
pub trait MixerSpec: Sized + std::fmt::Debug {
    /// Check against the model width and the longest sequence (`ctx.max_seq_len`); the error
    /// starts with the field's name.
    fn validate(&self, ctx: &BuildCtx) -> std::result::Result<(), String>;

    fn build(&self, ctx: &BuildCtx, pb: &Pb) -> Result<Box<dyn Mixer>>;

    /// Small configs (valid at d_model = 16, sequences ≥ 8) covering the main options.
    fn examples() -> Vec<Self>;
}

/// A feed-forward's config, as [`MixerSpec`] for mixers: it validates against the build context,
/// builds its module (`None`: a mixer-only block), and lists example configs that the harness's
/// test matrix iterates.
pub trait FfnSpec: Sized + std::fmt::Debug {
    fn validate(&self, ctx: &BuildCtx) -> std::result::Result<(), String>;
    fn build(&self, ctx: &BuildCtx, pb: &Pb) -> Result<Option<Box<dyn FeedForward>>>;
    fn examples() -> Vec<Self>;
}

/// Implements [`MixerSpec`] for a config whose layer is built by `Layer::new(&cfg, ctx, pb)` and
/// which checks itself with a private `check` taking the named [`BuildCtx`] fields, e.g.
/// `mixer_spec!(GlaConfig => Gla, check(d_model), ["n_heads = 2, chunk = 4"]);`.
#[macro_export]
macro_rules! mixer_spec {
    ($cfg:ty => $layer:ty, check($($arg:ident),*), [$($ex:expr),* $(,)?]) => {
        impl $crate::mixer::MixerSpec for $cfg {
            fn validate(&self, ctx: &$crate::mixer::BuildCtx) -> std::result::Result<(), String> {
                <$cfg>::check(self, $(ctx.$arg),*)
            }

            fn build(
                &self,
                ctx: &$crate::mixer::BuildCtx,
                pb: &$crate::params::Pb,
            ) -> $crate::candle_core::Result<Box<dyn $crate::mixer::Mixer>> {
                Ok(Box::new(<$layer>::new(self, ctx, pb)?))
            }

            fn examples() -> Vec<Self> {
                $crate::mixer::examples_from_toml(&[$($ex),*])
            }
        }
    };
}

/// Parse example configs written as the inside of a TOML inline table, e.g.
/// `"n_heads = 4, qk_norm = true"`: how [`MixerSpec::examples`] implementations list theirs.
pub fn examples_from_toml<T: serde::de::DeserializeOwned>(items: &[&str]) -> Vec<T> {
    items
        .iter()
        .map(|s| {
            let table: toml::Table =
                toml::from_str(&format!("x = {{ {s} }}")).unwrap_or_else(|e| panic!("example `{s}`: {e}"));
            table["x"].clone().try_into().unwrap_or_else(|e| panic!("example `{s}`: {e}"))
        })
        .collect()
}

/// A feed-forward's output: the value, an optional auxiliary loss to add to the LM loss (already
/// weighted; the training loop adds it and logs it), and named statistics (e.g. MoE expert load,
/// [`StatShape::PerExpert`]), which training keeps unreduced at its eval points.
#[derive(Debug)]
pub struct FfnOut {
    pub y: Tensor,
    pub aux_loss: Option<Tensor>,
    pub stats: Vec<Stat>,
}

impl FfnOut {
    pub fn plain(y: Tensor) -> Self {
        Self { y, aux_loss: None, stats: Vec::new() }
    }
}

/// A position-wise feed-forward: (B, T, D) -> (B, T, D).
pub trait FeedForward: Send + Sync {
    fn forward(&self, x: &Tensor) -> Result<FfnOut>;
    fn kind(&self) -> String;

    /// Update non-gradient state after each optimiser step (the aux-loss-free MoE bias); default
    /// none.
    fn after_step(&self) -> Result<()> {
        Ok(())
    }
}
