//! `x Wᵀ` for a few rows of x (a decoding step's tokens) on the CPU: each row of W is read once
//! and dotted with every row of x, the rows of W split over rayon's pool.
//!
//! A linear layer stores W as (out, in), so a decoding step's `x Wᵀ` has a handful of rows
//! against a wide W. `gemm` (candle's CPU matmul) transposes that problem to suit its kernels and
//! packs W into its panel layout first: at 6L-384, B = 4, a `perf` profile of `zoo bench`'s
//! decode put 43% of the samples in that packing, a copy of every weight of the model each step.
//! Here W's rows are already what each output needs: `y[i, j] = x_i · W_j`, W streamed from
//! memory once. The backward is the composition's (`dx = g W`, `dW = gᵀ x`, candle matmuls), so
//! the op may also run where gradients flow.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let x = Tensor::new(&[[1f32, 2.0]], &Device::Cpu)?;
//! let w = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &Device::Cpu)?;
//! let y = zoo_kernels::skinny::matmul_t(&x, &w)?.to_vec2::<f32>()?;
//! assert_eq!(y, vec![vec![1.0, 2.0, 3.0]]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// At most this many rows of x take the op (decoding: a batch of one token each).
pub const MAX_ROWS: usize = 16;

/// Rows of W per parallel task.
const W_ROWS: usize = 64;

/// Why the op does not run on these inputs (`None`: it does): naive mode, not the CPU, not f32,
/// more than [`MAX_ROWS`] rows, shapes that do not multiply.
pub fn unsupported(x: &Tensor, w: &Tensor) -> Option<String> {
    if let Some(why) = crate::cpu_only_f32(x, w) {
        return Some(why);
    }
    match (x.dims(), w.dims()) {
        ([m, k], [_, kw]) if *m <= MAX_ROWS && k == kw => None,
        (xd, wd) => Some(format!("x {xd:?}, w {wd:?}")),
    }
}

/// x (m, k) times wᵀ for w (n, k): (m, n). Differentiable in both.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let ((m, k), (n, kw)) = (x.dims2()?, w.dims2()?);
    if k != kw {
        candle_core::bail!("skinny matmul: x ({m}, {k}) against w ({n}, {kw})")
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Skinny)
}

struct Skinny;

impl CustomOp2 for Skinny {
    fn name(&self) -> &'static str {
        "zoo-skinny-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (x, w) = (crate::cpu_f32(s1, l1, "skinny matmul")?, crate::cpu_f32(s2, l2, "skinny matmul")?);
        let ((m, k), (n, _)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        // yᵀ (n, m) first, so that each task writes one contiguous block.
        let mut yt = vec![0f32; n * m];
        if m > 0 && k > 0 {
            yt.par_chunks_mut(W_ROWS * m).enumerate().for_each(|(c, yc)| {
                crate::cpu::simd(|| {
                    for (r, yr) in yc.chunks_exact_mut(m).enumerate() {
                        let j = c * W_ROWS + r;
                        let wr = &w[j * k..(j + 1) * k];
                        for (i, y) in yr.iter_mut().enumerate() {
                            *y = crate::cpu::dot(&x[i * k..(i + 1) * k], wr);
                        }
                    }
                })
            });
        }
        let mut y = vec![0f32; m * n];
        for (j, col) in yt.chunks_exact(m.max(1)).enumerate().take(n) {
            for (i, &v) in col.iter().enumerate() {
                y[i * n + j] = v;
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.matmul(w)?), Some(g.t()?.matmul(x)?)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Result, Tensor, Var};

    /// Against candle's matmul, outputs and both gradients, at one row, a batch of rows and the
    /// limit, with a W whose rows span several tasks and an odd inner size.
    #[test]
    fn skinny_matmul_matches_the_matmul() -> Result<()> {
        for (m, k, n) in [(1, 7, 5), (4, 384, 200), (16, 33, 130)] {
            let x0 = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
            let w0 = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
            let g = Tensor::randn(0f32, 1.0, (m, n), &Device::Cpu)?;
            let run = |op: bool| -> Result<Vec<Tensor>> {
                let (x, w) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?);
                let y = if op { super::matmul_t(x.as_tensor(), w.as_tensor())? } else { x.as_tensor().matmul(&w.as_tensor().t()?)? };
                let grads = (&y * &g)?.sum_all()?.backward()?;
                Ok(vec![y, grads.get(x.as_tensor()).unwrap().clone(), grads.get(w.as_tensor()).unwrap().clone()])
            };
            let (a, b) = (run(true)?, run(false)?);
            for (name, (p, q)) in ["y", "dx", "dw"].iter().zip(a.iter().zip(&b)) {
                let e = (p - q)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                let s = q.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(e <= 1e-5 * s.max(1.0), "({m}, {k}) x ({n}, {k})ᵀ: {name} error {e:e} at scale {s}");
            }
        }
        assert!(super::unsupported(&Tensor::zeros((17, 4), candle_core::DType::F32, &Device::Cpu)?, &Tensor::zeros((3, 4), candle_core::DType::F32, &Device::Cpu)?).is_some());
        Ok(())
    }
}
