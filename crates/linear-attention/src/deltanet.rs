//! DeltaNet (Schlag et al. 2021; Yang et al. 2024, "Parallelizing Linear Transformers with the Delta
//! Rule over Sequence Length") and Gated DeltaNet (Yang et al. 2025, "Gated Delta Networks").
//!
//! Recurrence, with the state S (d_k, d_v) read as `o_t = q_t S_t` (row vectors):
//!
//! `S_t = α_t (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t`
//!
//! α_t = 1 for DeltaNet; for Gated DeltaNet `log α_t = −e^{A_h} · softplus(x_t w_h + b_h)` (Mamba-2's
//! decay parametrisation). β_t = σ(x_t w_β) per head; q and k are L2-normalised per head (so the
//! transition `I − β k kᵀ` has spectral norm ≤ 1), q is scaled by 1/√d_k. Output: per-head RMSNorm,
//! an optional output gate (`output_gate`; fla's defaults: none for DeltaNet, swish for Gated
//! DeltaNet), then W_O. A short causal convolution + SiLU on q, k, v precedes all this, as in fla's
//! layers (on by default, k = 4). Key width d; value width `expand_v · d` (fla: 1 for DeltaNet,
//! 2 for Gated DeltaNet; default 1 here for both).
//!
//! The ops live in [`crate::delta_rule`] (fla's `layers/` vs `ops/` split), in three forms:
//! [`naive`] (loop over time), [`step`] (decode) and [`chunked`], the chunkwise WY form (Yang et al. 2024, §3): inside a chunk with cumulative log decay b_t
//! (b = 0 without a gate) and Γ_{ts} = e^{b_t − b_s} (t ≥ s), the pseudo-values
//! `U = (I + StrictTril(diag(β) (K Kᵀ ⊙ Γ)))⁻¹ diag(β) (V − diag(e^b) K S_0)` give
//! `O = diag(e^b) Q S_0 + Tril(Q Kᵀ ⊙ Γ) U` and `S_C = e^{b_C} S_0 + (K ⊙ e^{b_C − b})ᵀ U`.
//! Every decay factor is ≤ 1, so this stays finite for any gate. The unit lower-triangular inverse
//! is taken by recursive block doubling (each level is a true sub-block of the inverse, as stable
//! as forward substitution), in log₂ C rounds of batched matmuls.

use crate::{
    check_heads_chunk, default_chunk, expanded, heads, recur_with, GatedOutput, OutputGate, OutputNorm, QkvConv,
};
use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{DType, Result, Tensor};
use zoo_core::mixer::{BuildCtx, LayerProbe, LayerState, Mixer, Phase};
use zoo_core::nn::{Linear, INIT_STD};
use zoo_core::params::{Group, Init, Pb};

fn default_conv() -> usize {
    4
}

/// `type = "deltanet"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaNetConfig {
    pub n_heads: usize,
    /// Gated DeltaNet: add the per-head decay α_t and the swish output gate.
    #[serde(default)]
    pub gated: bool,
    /// Kernel size of the short causal convolution on q, k, v (fla's default 4); `0` turns it off.
    #[serde(default = "default_conv")]
    pub short_conv: usize,
    /// Value width as a multiple of d_model (fla's `expand_v`; default 1).
    #[serde(default = "crate::one")]
    pub expand_v: f64,
    /// Output gate activation, or `none`. Unset: swish when `gated`, none otherwise (fla's
    /// `use_gate` defaults for GatedDeltaNet and DeltaNet).
    #[serde(default)]
    pub output_gate: Option<OutputGate>,
    #[serde(default = "default_chunk")]
    pub chunk: usize,
}

impl DeltaNetConfig {
    fn check(&self, d_model: usize) -> std::result::Result<(), String> {
        check_heads_chunk(self.n_heads, d_model, self.chunk)?;
        expanded("expand_v", d_model, self.expand_v, self.n_heads).map(|_| ())
    }

    /// The output gate in effect.
    pub fn gate(&self) -> OutputGate {
        self.output_gate.unwrap_or(if self.gated { OutputGate::Swish } else { OutputGate::None })
    }
}

/// Gated DeltaNet's fixed per-head initial values (A_h, the softplus⁻¹ of Δ_h) that the trainable
/// `A_log` and `dt_bias` offsets add to: A_h spread over [1, 16] and Δ_h over [0.001, 0.1]
/// log-uniformly (Mamba-2's ranges, made deterministic). Returns (ln A_h, softplus⁻¹(Δ_h)).
pub fn gated_init(h: usize) -> (Vec<f32>, Vec<f32>) {
    let spread = |i: usize| if h == 1 { 0.5 } else { i as f64 / (h - 1) as f64 };
    let a0 = (0..h).map(|i| (1.0 + 15.0 * spread(i)).ln() as f32).collect();
    let dt0 = (0..h)
        .map(|i| {
            let dt = (0.001f64.ln() + spread(i) * (0.1f64.ln() - 0.001f64.ln())).exp();
            (dt + (-(-dt).exp_m1()).ln()) as f32 // softplus⁻¹(Δ) = Δ + ln(1 − e^{−Δ})
        })
        .collect();
    (a0, dt0)
}

pub use crate::delta_rule::{chunked, naive, step, unit_lower_inverse};

/// Gated DeltaNet's decay `log α_t = −e^{A_h} softplus(x_t w_h + b_h)`. A and b are trainable
/// offsets from fixed per-head initial values ([`gated_init`]).
struct Decay {
    proj: Linear,
    a_log: Tensor,
    dt_bias: Tensor,
    a0: Tensor,
    dt0: Tensor,
}

impl Decay {
    /// (B, T, D) -> log α (B, H, T, 1), f32.
    fn log_alpha(&self, x: &Tensor) -> Result<Tensor> {
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let z = f(&self.proj.forward(x)?)?.broadcast_add(&(f(&self.dt_bias)? + &self.dt0)?)?;
        let lg = softplus(&z)?.broadcast_mul(&(f(&self.a_log)? + &self.a0)?.exp()?)?.neg()?; // (B, T, H)
        lg.transpose(1, 2)?.unsqueeze(3)
    }
}

pub struct DeltaNet {
    cfg: DeltaNetConfig,
    q: Linear,
    k: Linear,
    v: Linear,
    beta: Linear,
    conv: Option<QkvConv>,
    a: Option<Decay>,
    out: GatedOutput,
    d: usize,
    dv: usize,
}

impl DeltaNet {
    pub fn new(cfg: &DeltaNetConfig, ctx: &BuildCtx, pb: &Pb) -> Result<Self> {
        let d = ctx.d_model;
        let h = cfg.n_heads;
        let dv = expanded("expand_v", d, cfg.expand_v, h).map_err(zoo_core::candle_core::Error::msg)?;
        let a = if cfg.gated {
            // A and Δ as per-head offsets of zero-initialised trainable parameters (the same
            // gradient as training them directly).
            let (a0, dt0) = gated_init(h);
            Some(Decay {
                proj: Linear::new(&pb.pp("a_proj"), d, h, false, INIT_STD)?,
                a_log: pb.get("A_log", h, Init::Const(0.0), Group::NoDecay)?,
                dt_bias: pb.get("dt_bias", h, Init::Const(0.0), Group::NoDecay)?,
                a0: Tensor::from_vec(a0, h, pb.device())?,
                dt0: Tensor::from_vec(dt0, h, pb.device())?,
            })
        } else {
            None
        };
        Ok(Self {
            q: Linear::new(&pb.pp("q_proj"), d, d, false, INIT_STD)?,
            k: Linear::new(&pb.pp("k_proj"), d, d, false, INIT_STD)?,
            v: Linear::new(&pb.pp("v_proj"), d, dv, false, INIT_STD)?,
            beta: Linear::new(&pb.pp("b_proj"), d, h, false, INIT_STD)?,
            conv: QkvConv::new(&pb.pp("qkv_conv"), [d, d, dv], cfg.short_conv)?,
            a,
            out: GatedOutput::new(pb, ctx, dv, h, cfg.gate(), OutputNorm::RmsNorm, "o_norm.weight")?,
            cfg: cfg.clone(),
            d,
            dv,
        })
    }
}

use zoo_core::ops::{l2_normalize, softplus};

impl Mixer for DeltaNet {
    fn forward(
        &self,
        x: &Tensor,
        _phase: Phase,
        cache: Option<&mut LayerState>,
        _probe: Option<&mut LayerProbe>,
    ) -> Result<Tensor> {
        let h = self.cfg.n_heads;
        let mut cache = cache;
        let (q, k, v) = crate::maybe_conv(&self.conv, [&self.q, &self.k, &self.v], x, cache.as_deref_mut())?;
        let q = (l2_normalize(&heads(&q.to_dtype(DType::F32)?, h)?)? * (1.0 / ((self.d / h) as f64).sqrt()))?;
        let k = l2_normalize(&heads(&k.to_dtype(DType::F32)?, h)?)?;
        let v = heads(&v, h)?;
        let beta = zoo_core::candle_nn::ops::sigmoid(&self.beta.forward(x)?.to_dtype(DType::F32)?)?; // (B, T, H)
        let beta = beta.transpose(1, 2)?.unsqueeze(3)?;
        let g = self.a.as_ref().map(|a| a.log_alpha(x)).transpose()?;
        let chunk = self.cfg.chunk;
        // Training and scoring (no state kept) on CUDA: the fused delta-rule scan.
        use zoo_core::zoo_kernels::{applies, delta_scan};
        if cache.is_none() && applies("delta scan", delta_scan::unsupported(&q, &k, &v, &beta, g.as_ref()), q.device()) {
            let o = delta_scan::delta_scan(&q, &k, &v, &beta, g.as_ref())?;
            return self.out.forward(&o, x);
        }
        let o = recur_with(cache.as_deref_mut(), x.dim(1)?, |s0, decode| {
            if decode {
                step(&q, &k, &v, &beta, g.as_ref(), s0)
            } else {
                chunked(&q, &k, &v, &beta, g.as_ref(), s0, chunk)
            }
        })?;
        self.out.forward(&o, x)
    }

    fn new_state(&self, _capacity: usize) -> LayerState {
        crate::recurrent_state()
    }

    fn cache_bytes(&self, batch: usize, _seq_len: usize, dtype: DType) -> usize {
        crate::recurrent_bytes(batch, self.cfg.n_heads, self.d, self.dv, &self.conv, dtype)
    }

    fn kind(&self) -> String {
        if self.cfg.gated { "gated_deltanet" } else { "deltanet" }.into()
    }
}

zoo_core::mixer_spec!(DeltaNetConfig => DeltaNet, check(d_model), [
    r#"n_heads = 2, chunk = 4"#,
    r#"n_heads = 2, chunk = 5, short_conv = 0"#,
    r#"n_heads = 2, chunk = 4, gated = true, short_conv = 2"#,
    r#"n_heads = 2, chunk = 4, gated = true, output_gate = "none", expand_v = 2.0"#,
    r#"n_heads = 2, chunk = 3, output_gate = "sigmoid""#,
]);
