//! Linear attention mixers for zoo: each reduces to the gated recurrence of [`kernel`]
//! (`S_t = Diag(α_t) S_{t−1} + k_tᵀ v_t`, `o_t = q_t S_t`), trained with the chunked form, decoded
//! with the one-step form (the state S is the layer cache), and checked against the naive loop.
//!
//! - [`based::Based`]: Arora et al. 2024, Based (2nd-order Taylor feature map, d′ = 16).
//! - [`linear::LinearAttention`]: Katharopoulos et al. 2020 (α = 1, feature maps, normaliser).
//! - [`retnet::Retention`]: Sun et al. 2023, RetNet (fixed multi-scale per-head decay γ_h).
//! - [`simple_gla::SimpleGla`]: Simple GLA / Lightning (scalar per-head decay, fixed or data-dependent).
//! - [`gla::Gla`]: Yang et al. 2024, GLA (data-dependent per-channel decay, low-rank gate).
//! - [`deltanet::DeltaNet`]: the delta rule (Yang et al. 2024) and Gated DeltaNet (Yang et al.
//!   2025); its own ops ([`delta_rule`], chunked WY form), since its transition is not diagonal.
//!
//! A layer from its config, run in the training form and then prefilled and decoded from its
//! recurrent state (the outputs agree):
//!
//! ```
//! use zoo_core::candle_core::{DType, Device, Tensor};
//! use zoo_core::mixer::{examples_from_toml, BuildCtx, MixerSpec, Phase};
//! use zoo_core::params::ParamStore;
//! use zoo_linear_attention::gla::GlaConfig;
//! let store = ParamStore::new(0, DType::F32, &Device::Cpu);
//! let ctx = BuildCtx { d_model: 16, n_layers: 1, layer: 0, max_seq_len: 8, kind_layer: 0, kind_layers: 1 };
//! let cfg: GlaConfig = examples_from_toml(&["n_heads = 2, chunk = 4"]).remove(0);
//! cfg.validate(&ctx).unwrap(); // MixerSpec: checks against d_model and the sequence length
//! let gla = cfg.build(&ctx, &store.root())?;
//! let x = Tensor::randn(0f32, 1.0, (1, 8, 16), &Device::Cpu)?;
//! let full = gla.forward(&x, Phase::Train, None, None)?;
//! let mut state = gla.new_state(0);
//! let a = gla.forward(&x.narrow(1, 0, 7)?, Phase::Prefill, Some(&mut state), None)?;
//! let b = gla.forward(&x.narrow(1, 7, 1)?, Phase::Decode, Some(&mut state), None)?;
//! let inc = Tensor::cat(&[&a, &b], 1)?;
//! let err = (inc - &full)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(err < 1e-5, "{err}");
//! # Ok::<(), zoo_core::candle_core::Error>(())
//! ```

pub mod based;
pub mod delta_rule;
pub mod deltanet;
pub mod gla;
pub mod kernel;
pub mod linear;
pub mod retnet;
pub mod simple_gla;

use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{DType, Result, Tensor};
use zoo_core::conv::CausalConv1d;
use zoo_core::mixer::{BuildCtx, LayerState};
use zoo_core::nn::{residual_std, Linear, INIT_STD};
use zoo_core::params::{Group, Init, Pb};

fn default_chunk() -> usize {
    64
}

/// Run the recurrence in the form the call needs: on CUDA without a state (training, scoring) the
/// fused scan (`zoo_kernels::linear_scan`, unless `ZOO_KERNELS=naive`); otherwise chunked
/// (training on CPU; prefill: T > 1) or one step (decode). The state holds the f32 matrix
/// S (B, H, d_k, d_v).
pub(crate) fn recur(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: Option<&Tensor>,
    cache: Option<&mut LayerState>,
    chunk: usize,
) -> Result<Tensor> {
    // Training and scoring (no state kept) on CUDA: the fused scan, one kernel per pass, unless
    // `ZOO_LINEAR_SCAN=chunked` asks for the chunked composition (to compare the two at long T).
    if cache.is_none() && !chunked_forced() {
        match zoo_core::zoo_kernels::linear_scan::unsupported(q, k, v, g) {
            None => return zoo_core::zoo_kernels::linear_scan::linear_scan(q, k, v, g),
            Some(why) if q.device().is_cuda() && zoo_core::zoo_kernels::mode() == zoo_core::zoo_kernels::Kernels::Fused => {
                zoo_core::zoo_kernels::note_fallback("linear scan", &why)
            }
            Some(_) => {}
        }
    }
    recur_with(cache, q.dim(2)?, |s0, decode| {
        if decode {
            kernel::step(q, k, v, g, s0)
        } else {
            kernel::chunked(q, k, v, g, s0, chunk)
        }
    })
}

/// `ZOO_LINEAR_SCAN=chunked`: training and scoring run the chunked composition on every device, in
/// place of the fused scan and its CPU form (the scan's work per step is one pass over time on
/// B·H·d_v threads: at batch 1 and long T it is slower than softmax attention,
/// `results/crossover-h100`). CUDA result JSONs record it as `linear_scan`.
pub fn chunked_forced() -> bool {
    std::env::var("ZOO_LINEAR_SCAN").as_deref() == Ok("chunked")
}

/// The state protocol of every recurrent mixer here: `run(S_0, decode)` returns (o, S_T); the
/// state lives in [`RecurrentState::s`](zoo_core::mixer::RecurrentState) (its `conv` history is
/// [`QkvConv`]'s).
pub(crate) fn recur_with(
    cache: Option<&mut LayerState>,
    t: usize,
    run: impl FnOnce(Option<&Tensor>, bool) -> Result<(Tensor, Tensor)>,
) -> Result<Tensor> {
    match cache {
        None => Ok(run(None, false)?.0),
        Some(st) => {
            let r = st.recurrent()?;
            let (o, s) = run(r.s.as_ref(), t == 1)?;
            r.s = Some(s);
            r.seen += t;
            Ok(o)
        }
    }
}

/// A fresh state for the recurrent mixers here.
pub(crate) fn recurrent_state() -> LayerState {
    LayerState::Recurrent(zoo_core::mixer::RecurrentState::default())
}

/// The optional short causal convolution + SiLU on q, k, v (fla's `ShortConvolution`, used by
/// DeltaNet, GLA and Based variants): one depthwise conv over the concatenated channels. Its
/// decode history (the last k−1 inputs) is the state's `conv`.
pub struct QkvConv {
    conv: CausalConv1d,
    widths: [usize; 3],
}

impl QkvConv {
    /// `kernel = 0` means no convolution.
    pub fn new(pb: &Pb, widths: [usize; 3], kernel: usize) -> Result<Option<Self>> {
        if kernel == 0 {
            return Ok(None);
        }
        Ok(Some(Self { conv: CausalConv1d::new(pb, widths.iter().sum(), kernel)?, widths }))
    }

    /// Returns the convolved q, k, v; with a state, its convolution history is read and updated.
    pub fn forward(&self, [q, k, v]: [Tensor; 3], cache: Option<&mut LayerState>) -> Result<(Tensor, Tensor, Tensor)> {
        let x = Tensor::cat(&[&q, &k, &v], 2)?;
        let y = match cache {
            Some(st) => self.conv.forward_act(&x, Some(&mut st.recurrent()?.conv), true)?,
            None => self.conv.forward_act(&x, None, true)?,
        };
        let [a, b, c] = self.widths;
        Ok((y.narrow(2, 0, a)?, y.narrow(2, a, b)?, y.narrow(2, a + b, c)?))
    }

    pub fn cache_bytes(&self, batch: usize, dtype: DType) -> usize {
        batch * (self.conv.kernel - 1) * self.widths.iter().sum::<usize>() * dtype.size_in_bytes()
    }
}

/// Project q, k, v from x, then apply the short convolution if the mixer has one.
pub(crate) fn maybe_conv(
    conv: &Option<QkvConv>,
    [q, k, v]: [&zoo_core::nn::Linear; 3],
    x: &Tensor,
    cache: Option<&mut LayerState>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (q, k, v) = (q.forward(x)?, k.forward(x)?, v.forward(x)?);
    match conv {
        None => Ok((q, k, v)),
        Some(c) => c.forward([q, k, v], cache),
    }
}

/// The output gate of the GLA family (fla's `use_output_gate` and `gate_fn`):
/// `Y = (Norm(O) ⊙ act(X W_g)) W_O`, or `Y = Norm(O) W_O` with `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OutputGate {
    /// swish(x) = x·σ(x): fla's default `gate_fn` and the GLA / RetNet papers' gate.
    #[default]
    Swish,
    Sigmoid,
    /// No gate (fla's `use_output_gate = False`; Zoology's (Gated) DeltaNet MQAR configs).
    None,
}

/// The per-head normalisation of the recurrence output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OutputNorm {
    /// RMSNorm per head (GLA paper §4.1; fla uses it in every layer, RetNet's included).
    #[default]
    RmsNorm,
    /// LayerNorm per head without bias: the GroupNorm of the RetNet paper (eq. 8).
    GroupNorm,
}

/// The output stage shared by GLA, Simple GLA, RetNet and (Gated) DeltaNet: per-head norm of the
/// recurrence output O (B, H, T, d_v), the optional gate from x, then W_O.
pub struct GatedOutput {
    gate: Option<Linear>,
    act: OutputGate,
    norm_kind: OutputNorm,
    norm: Tensor,
    o: Linear,
}

impl GatedOutput {
    /// `norm_name` is the gain's parameter name (it differs between the layers, as in fla).
    pub fn new(
        pb: &Pb,
        ctx: &BuildCtx,
        value_dim: usize,
        n_heads: usize,
        act: OutputGate,
        norm_kind: OutputNorm,
        norm_name: &str,
    ) -> Result<Self> {
        let d = ctx.d_model;
        let gate = match act {
            OutputGate::None => None,
            _ => Some(Linear::new(&pb.pp("g_proj"), d, value_dim, false, INIT_STD)?),
        };
        Ok(Self {
            gate,
            act,
            norm_kind,
            norm: pb.get(norm_name, value_dim / n_heads, Init::Const(1.0), Group::NoDecay)?,
            o: Linear::new(&pb.pp("o_proj"), value_dim, d, false, residual_std(ctx.n_layers))?,
        })
    }

    pub fn forward(&self, o: &Tensor, x: &Tensor) -> Result<Tensor> {
        let o = match self.norm_kind {
            OutputNorm::RmsNorm => kernel::head_rms_norm(o, &self.norm, 1e-5)?,
            OutputNorm::GroupNorm => kernel::head_layer_norm(o, &self.norm, 1e-5)?,
        };
        let o = merge(&o.to_dtype(x.dtype())?)?;
        let o = match (&self.gate, self.act) {
            (Some(g), OutputGate::Swish) => (o * g.forward(x)?.silu()?)?,
            (Some(g), OutputGate::Sigmoid) => (o * zoo_core::candle_nn::ops::sigmoid(&g.forward(x)?)?)?,
            _ => o,
        };
        self.o.forward(&o)
    }
}

/// A width `d · ratio` (fla's `expand_k` / `expand_v`), checked to split into `n_heads` heads.
pub(crate) fn expanded(field: &str, d_model: usize, ratio: f64, n_heads: usize) -> std::result::Result<usize, String> {
    let w = (d_model as f64 * ratio).round();
    if !(ratio > 0.0) || !ratio.is_finite() || w < 1.0 || (w - d_model as f64 * ratio).abs() > 1e-9 {
        return Err(format!("{field}: {ratio} × d_model = {d_model} is not a positive whole width"));
    }
    let w = w as usize;
    if w % n_heads != 0 {
        return Err(format!("{field}: width {w} (= {ratio} × {d_model}) does not split into {n_heads} heads"));
    }
    Ok(w)
}

/// (key width, value width) = (d·expand_k, d·expand_v), each checked to split into `n_heads` heads.
pub(crate) fn kv_widths(
    d_model: usize,
    expand_k: f64,
    expand_v: f64,
    n_heads: usize,
) -> std::result::Result<(usize, usize), String> {
    Ok((expanded("expand_k", d_model, expand_k, n_heads)?, expanded("expand_v", d_model, expand_v, n_heads)?))
}

/// Bytes of a recurrent mixer's cache: the f32 state (B, H, dk/H, dv/H) and, with a short
/// convolution, its history.
pub(crate) fn recurrent_bytes(
    batch: usize,
    h: usize,
    dk: usize,
    dv: usize,
    conv: &Option<QkvConv>,
    dtype: DType,
) -> usize {
    state_bytes(batch, h, dk / h, dv / h) + conv.as_ref().map_or(0, |c| c.cache_bytes(batch, dtype))
}

fn one() -> f64 {
    1.0
}

/// Bytes of an f32 state (B, H, d_k, d_v).
pub(crate) fn state_bytes(batch: usize, h: usize, dk: usize, dv: usize) -> usize {
    batch * h * dk * dv * DType::F32.size_in_bytes()
}

pub(crate) use zoo_core::ops::{merge_heads as merge, split_heads as heads};

/// The checks every linear mixer config shares: heads divide the width, chunk ≥ 1.
pub(crate) fn check_heads_chunk(n_heads: usize, d_model: usize, chunk: usize) -> std::result::Result<(), String> {
    if n_heads == 0 || d_model % n_heads != 0 {
        return Err(format!("n_heads: {n_heads} heads do not divide d_model = {d_model}"));
    }
    if chunk == 0 {
        return Err("chunk: must be at least 1".into());
    }
    Ok(())
}
