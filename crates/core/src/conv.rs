//! Short causal depthwise convolution: the "shift" filter of H3 (Fu et al. 2023, §3.1) and the
//! BaseConv layer Zoology (Arora et al. 2023, §4) puts in front of every MQAR mixer. Also the
//! short q/k/v convolution of GLA / Based / DeltaNet variants.

use crate::mixer::{BuildCtx, LayerProbe, LayerState, Mixer, Phase, RecurrentState};
use crate::nn::{residual_std, Linear, INIT_STD};
use crate::params::{Group, Init, Pb};
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Depthwise causal conv over time: y_t[c] = Σ_{j<k} w[c, j] · x_{t−k+1+j}[c] (zero history).
#[derive(Clone, Debug)]
pub struct CausalConv1d {
    /// (channels, kernel)
    pub weight: Tensor,
    pub kernel: usize,
}

impl CausalConv1d {
    pub fn new(pb: &Pb, channels: usize, kernel: usize) -> Result<Self> {
        // PyTorch Conv1d's default bound for a depthwise filter: 1/sqrt(kernel).
        let weight = pb.get("weight", (channels, kernel), Init::Uniform(1.0 / (kernel as f64).sqrt()), Group::Decay)?;
        Ok(Self { weight, kernel })
    }

    /// x (B, T, C). With `state` (the last k−1 inputs, (B, k−1, C), created if empty), the
    /// convolution continues from earlier calls and the state is updated (decode / prefill).
    pub fn forward(&self, x: &Tensor, state: Option<&mut Option<Tensor>>) -> Result<Tensor> {
        self.forward_act(x, state, false)
    }

    /// [`Self::forward`], then SiLU when `silu` (the short q/k/v convolution of GLA and DeltaNet).
    /// Without a state, on CUDA, the fused kernel (`zoo_kernels::conv1d`) runs unless
    /// `ZOO_KERNELS=naive`.
    pub fn forward_act(&self, x: &Tensor, state: Option<&mut Option<Tensor>>, silu: bool) -> Result<Tensor> {
        if state.is_none() && zoo_kernels::applies("causal conv1d", zoo_kernels::conv1d::unsupported(x, &self.weight), x.device()) {
            return zoo_kernels::conv1d::causal_conv1d(x, &self.weight, silu);
        }
        let y = self.forward_naive(x, state)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }

    /// The composition: K shifted slices times the weight's columns, summed (the reference).
    pub fn forward_naive(&self, x: &Tensor, state: Option<&mut Option<Tensor>>) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let k = self.kernel;
        let hist = match state.as_ref().and_then(|s| s.as_ref()) {
            Some(h) => h.clone(),
            None => Tensor::zeros((b, k - 1, c), x.dtype(), x.device())?,
        };
        let xp = if k > 1 { Tensor::cat(&[&hist, x], 1)? } else { x.clone() };
        let w = self.weight.to_dtype(x.dtype())?;
        let mut y: Option<Tensor> = None;
        for j in 0..k {
            let term = xp.narrow(1, j, t)?.broadcast_mul(&w.narrow(1, j, 1)?.squeeze(1)?)?;
            y = Some(match y {
                Some(acc) => (acc + term)?,
                None => term,
            });
        }
        if let Some(s) = state {
            if k > 1 {
                *s = Some(xp.narrow(1, t, k - 1)?.contiguous()?);
            }
        }
        y.expect("kernel >= 1").reshape((b, t, c))
    }
}

fn default_kernel() -> usize {
    3
}

/// `type = "short_conv"`: Zoology's BaseConv, y = W_o((W_a x) ⊙ conv_k(W_b x)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShortConvConfig {
    #[serde(default = "default_kernel")]
    pub kernel_size: usize,
}

impl ShortConvConfig {
    fn check(&self, _d_model: usize, seq_len: usize) -> std::result::Result<(), String> {
        if self.kernel_size == 0 {
            return Err("kernel_size: must be at least 1".into());
        }
        if self.kernel_size > seq_len.max(1) {
            return Err(format!("kernel_size: {} is longer than the sequence length {seq_len}", self.kernel_size));
        }
        Ok(())
    }
}

pub struct ShortConv {
    a: Linear,
    b: Linear,
    conv: CausalConv1d,
    o: Linear,
    d: usize,
}

impl ShortConv {
    pub fn new(cfg: &ShortConvConfig, ctx: &BuildCtx, pb: &Pb) -> Result<Self> {
        let d = ctx.d_model;
        Ok(Self {
            a: Linear::new(&pb.pp("a_proj"), d, d, false, INIT_STD)?,
            b: Linear::new(&pb.pp("b_proj"), d, d, false, INIT_STD)?,
            conv: CausalConv1d::new(&pb.pp("conv"), d, cfg.kernel_size)?,
            o: Linear::new(&pb.pp("o_proj"), d, d, false, residual_std(ctx.n_layers))?,
            d,
        })
    }
}

impl Mixer for ShortConv {
    fn forward(
        &self,
        x: &Tensor,
        _phase: Phase,
        state: Option<&mut LayerState>,
        _probe: Option<&mut LayerProbe>,
    ) -> Result<Tensor> {
        let u = self.b.forward(x)?;
        let y = match state {
            None => self.conv.forward(&u, None)?,
            Some(st) => {
                let r = st.recurrent()?;
                let y = self.conv.forward(&u, Some(&mut r.conv))?;
                r.seen += x.dim(1)?;
                y
            }
        };
        self.o.forward(&(self.a.forward(x)? * y)?)
    }

    fn new_state(&self, _capacity: usize) -> LayerState {
        LayerState::Recurrent(RecurrentState::default())
    }

    fn cache_bytes(&self, batch: usize, _seq_len: usize, dtype: DType) -> usize {
        batch * (self.conv.kernel - 1) * self.d * dtype.size_in_bytes()
    }

    fn kind(&self) -> String {
        "short_conv".into()
    }
}

crate::mixer_spec!(ShortConvConfig => ShortConv, check(d_model, max_seq_len), [
    r#"kernel_size = 3"#,
    r#"kernel_size = 1"#,
]);
