//! Position-wise feed-forwards: SwiGLU (Shazeer 2020, eq. 6) and the GPT-2 GELU MLP.

use crate::mixer::{BuildCtx, FeedForward, FfnOut};
use crate::nn::{residual_std, Linear, INIT_STD};
use crate::params::Pb;
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// Feed-forward config for the built-in MLPs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Hidden width. Default: 4·d for GELU, and 8/3·d rounded up to a multiple of 8 for SwiGLU
    /// (the same parameter count as the 4·d GELU MLP).
    #[serde(default)]
    pub hidden: Option<usize>,
    #[serde(default)]
    pub bias: bool,
}

/// SwiGLU: W2 (silu(x W1) ⊙ x W3).
pub struct SwiGlu {
    w1: Linear,
    w3: Linear,
    w2: Linear,
}

impl SwiGlu {
    pub fn new(cfg: &MlpConfig, ctx: &BuildCtx, pb: &Pb) -> Result<Self> {
        let d = ctx.d_model;
        let h = cfg.hidden.unwrap_or_else(|| (8 * d / 3).div_ceil(8) * 8);
        Ok(Self {
            w1: Linear::new(&pb.pp("w1"), d, h, cfg.bias, INIT_STD)?,
            w3: Linear::new(&pb.pp("w3"), d, h, cfg.bias, INIT_STD)?,
            w2: Linear::new(&pb.pp("w2"), h, d, cfg.bias, residual_std(ctx.n_layers))?,
        })
    }
}

impl FeedForward for SwiGlu {
    fn forward(&self, x: &Tensor) -> Result<FfnOut> {
        let z = silu_mul(&self.w1.forward(x)?, &self.w3.forward(x)?)?;
        Ok(FfnOut::plain(self.w2.forward(&z)?))
    }
    fn kind(&self) -> String {
        "swiglu".into()
    }
}

/// SwiGLU's product silu(g) ⊙ u: the fused op (the kernel on CUDA, its CPU form on the CPU;
/// forward and backward), or with `ZOO_KERNELS=naive` the composition.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if zoo_kernels::applies("swiglu", zoo_kernels::swiglu::unsupported(g, u), g.device()) {
        zoo_kernels::swiglu::swiglu(g, u)
    } else {
        g.silu()? * u
    }
}

/// GPT-2 MLP: W2 gelu(x W1) (tanh approximation, as GPT-2).
pub struct GeluMlp {
    fc: Linear,
    proj: Linear,
}

impl GeluMlp {
    pub fn new(cfg: &MlpConfig, ctx: &BuildCtx, pb: &Pb) -> Result<Self> {
        let d = ctx.d_model;
        let h = cfg.hidden.unwrap_or(4 * d);
        Ok(Self {
            fc: Linear::new(&pb.pp("fc"), d, h, cfg.bias, INIT_STD)?,
            proj: Linear::new(&pb.pp("proj"), h, d, cfg.bias, residual_std(ctx.n_layers))?,
        })
    }
}

impl FeedForward for GeluMlp {
    fn forward(&self, x: &Tensor) -> Result<FfnOut> {
        Ok(FfnOut::plain(self.proj.forward(&self.fc.forward(x)?.gelu()?)?))
    }
    fn kind(&self) -> String {
        "gelu".into()
    }
}

/// No feed-forward (zoology's MQAR models): the block is mixer-only. Returns `None` from the
/// builder; the block then skips its second residual branch.
pub struct NoFfn;
