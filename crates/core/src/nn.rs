//! Differentiable building blocks: linear maps, embeddings, RMSNorm and RoPE.
//!
//! Every module here records a backward pass. Weights are stored in the master dtype (f32, or f64 in
//! gradient checks) and cast to the activation dtype at use, so bf16 training on CUDA keeps f32 master
//! weights: `to_dtype` is differentiable, and the gradient arrives at the f32 `Var` in f32.

use crate::params::{Group, Init, Pb};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Result, Tensor};

/// GPT-2 / nanoGPT initialisation: N(0, 0.02) for every weight matrix.
pub const INIT_STD: f64 = 0.02;

/// `std` for residual output projections: 0.02 / sqrt(2 · n_layers) (GPT-2 §2.3, nanoGPT `c_proj`).
pub fn residual_std(n_layers: usize) -> f64 {
    INIT_STD / (2.0 * n_layers as f64).sqrt()
}

/// y = x Wᵀ (+ b). Weight shape (out, in), as in PyTorch and candle-nn.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// A quantized copy of `weight` (e.g. a GGUF file's Q4_1 blocks) for inference matmuls on the
    /// CPU, from [`crate::params::ParamStore::set_quantized`]. It has no backward, so only
    /// inference entry points set it; `weight` stays the (dequantized) parameter.
    pub quant: Option<Quant>,
}

/// A quantized copy of a weight matrix for inference matmuls on the CPU.
#[derive(Clone, Debug)]
pub enum Quant {
    /// candle's quantized matmul (its block types with SIMD kernels: Q4_0, Q8_0, k-quants).
    Candle(QMatMul),
    /// A GGUF file's Q4_1 blocks with zoo's AVX2 kernel ([`crate::q4_1`]).
    Q4_1(std::sync::Arc<crate::q4_1::Q41Matrix>),
}

impl Quant {
    /// x (…, in) f32 contiguous → (…, out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Quant::Candle(q) => x.contiguous()?.apply(q),
            Quant::Q4_1(w) => {
                let mut dims = x.dims().to_vec();
                let cols = *dims.last().expect("rank >= 1");
                if cols != w.cols {
                    candle_core::bail!("Q4_1 matmul: input width {cols}, matrix has {} columns", w.cols)
                }
                let n = x.elem_count() / cols;
                let y = w.matmul(&x.flatten_all()?.to_vec1::<f32>()?, n);
                *dims.last_mut().expect("rank >= 1") = w.rows;
                Tensor::from_vec(y, dims, x.device())
            }
        }
    }
}

impl Linear {
    pub fn new(pb: &Pb, d_in: usize, d_out: usize, bias: bool, std: f64) -> Result<Self> {
        let weight = pb.get("weight", (d_out, d_in), Init::Normal(std), Group::Decay)?;
        let bias = if bias { Some(pb.get("bias", d_out, Init::Const(0.0), Group::NoDecay)?) } else { None };
        Ok(Self { weight, bias, quant: pb.quantized("weight") })
    }

    /// A linear map from existing tensors (no parameter store).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, quant: None }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.quant {
            Some(q) if use_quantized(x) => q.forward(x)?,
            _ => self.dense(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }

    fn dense(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.to_dtype(x.dtype())?;
        match x.dims() {
            [b, t, d] => matmul_t(&x.reshape((b * t, *d))?, &w)?.reshape((*b, *t, ())),
            [_, _] => matmul_t(x, &w),
            _ => x.broadcast_matmul(&w.t()?),
        }
    }
}

/// x (rows, k) times wᵀ for w (n, k): on the CPU, for a decoding step's few rows, the skinny op
/// (`zoo_kernels::skinny`: each row of W read once, not packed for gemm); else candle's matmul.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if zoo_kernels::skinny::unsupported(x, w).is_none() {
        return zoo_kernels::skinny::matmul_t(x, w);
    }
    x.matmul(&w.t()?)
}

/// At most this many rows (tokens) go through a quantized matmul: decoding. Longer inputs (prefill,
/// scoring a text) use the dense f32 weights, which candle's gemm runs several times faster than its
/// row-by-row quantized kernels.
pub const QUANTIZED_MAX_ROWS: usize = 8;

/// Whether `x` (…, d) takes a quantized matmul: f32 on the CPU, few rows.
pub fn use_quantized(x: &Tensor) -> bool {
    let rows = x.elem_count() / x.dim(candle_core::D::Minus1).unwrap_or(1).max(1);
    x.device().is_cpu() && x.dtype() == DType::F32 && rows <= QUANTIZED_MAX_ROWS
}

/// Token embedding table (vocab, d).
#[derive(Clone, Debug)]
pub struct Embedding {
    pub weight: Tensor,
    /// A quantized copy of the table, used as the tied LM head in inference (see [`Linear::quant`]).
    pub quant: Option<Quant>,
}

impl Embedding {
    pub fn new(pb: &Pb, vocab: usize, d: usize) -> Result<Self> {
        let weight = pb.get("weight", (vocab, d), Init::Normal(INIT_STD), Group::Embedding)?;
        Ok(Self { weight, quant: pb.quantized("weight") })
    }

    /// ids (B, T) u32 -> (B, T, d) in `dtype`.
    pub fn forward(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        zoo_kernels::embedding::embedding(&self.weight, &flat)?.to_dtype(dtype)?.reshape((b, t, ()))
    }
}

/// Root-mean-square norm (Zhang & Sennrich 2019): y = x / sqrt(mean(x²) + ε) · g.
/// Computed in f32 from primitive ops so that it records a backward pass (candle's fused
/// `ops::rms_norm` does not).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(pb: &Pb, d: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: pb.get("weight", d, Init::Const(1.0), Group::NoDecay)?, eps })
    }

    /// The fused op (`zoo_kernels::rms_norm`: the kernel on CUDA, its CPU form on the CPU) runs
    /// unless `ZOO_KERNELS=naive`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::head_rms_norm(x, &self.weight, self.eps)
    }
}

pub use crate::ops::rms_normalize;

/// Rotary position embedding tables (Su et al. 2021, RoFormer eq. 34), half-split layout
/// (GPT-NeoX / Llama), with base θ.
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(head_dim: usize, max_len: usize, theta: f64, device: &Device) -> Result<Self> {
        assert!(head_dim % 2 == 0, "RoPE needs an even head dim");
        let half = head_dim / 2;
        let inv: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)).collect();
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for p in 0..max_len {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_len, half), device)?,
            sin: Tensor::from_vec(sin, (max_len, half), device)?,
        })
    }

    pub fn max_len(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// The cos and sin rows (T, head_dim / 2) of positions `offset .. offset + t`.
    pub fn tables(&self, offset: usize, t: usize) -> Result<(Tensor, Tensor)> {
        Ok((self.cos.narrow(0, offset, t)?, self.sin.narrow(0, offset, t)?))
    }

    /// x: (B, H, T, Dh) at absolute positions offset..offset+T. Differentiable (the kernel's
    /// backward, or `rope_slow`'s).
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        if offset + t > self.max_len() {
            candle_core::bail!("RoPE table holds {} positions, asked for {}", self.max_len(), offset + t)
        }
        let (cos, sin) = self.tables(offset, t)?;
        // The fused op (the kernel on CUDA, its CPU form on the CPU; forward and backward), else
        // candle's composition.
        if zoo_kernels::applies("rope", zoo_kernels::rope::unsupported(x), x.device()) {
            return zoo_kernels::rope::rope(x, &cos, &sin);
        }
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        candle_nn::rotary_emb::rope_slow(&x.contiguous()?, &cos, &sin)
    }
}
