//! Token embedding with a scatter backward: `out[i] = W[ids[i]]`, `dW[v] = Σ_{i: ids[i] = v} g[i]`.
//!
//! The composition is candle's `index_select`, whose backward `index_add` runs on CUDA as d
//! threads that each walk all N ids: 36 ms of a 87 ms MQAR training step (N = 65,536 tokens,
//! d = 128, H200; one `ncu` trace). The op here scatters one row per block with `atomicAdd`
//! (float addition order, and so the last bits of dW, may vary between runs). An id outside the
//! table is an error on CPU; on CUDA the kernel cannot raise one and gives a zero row (and no
//! gradient): zoo's tasks and tokenizers only produce ids below the model's vocabulary size.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu)?;
//! let ids = Tensor::new(&[2u32, 0, 2], &Device::Cpu)?;
//! let y = zoo_kernels::embedding::embedding_op(&w, &ids)?;
//! assert_eq!(y.to_vec2::<f32>()?, vec![vec![5., 6.], vec![1., 2.], vec![5., 6.]]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// W (V, d) f32 and ids (N,) u32 -> (N, d): the fused op where it applies (CUDA, f32 table, u32
/// ids, `ZOO_KERNELS` not `naive`), else `index_select` (the reference).
pub fn embedding(w: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let fused = crate::mode() == crate::Kernels::Fused
        && crate::compiled()
        && w.device().is_cuda()
        && w.dtype() == DType::F32
        && ids.dtype() == DType::U32
        && w.rank() == 2
        && ids.rank() == 1;
    if fused {
        embedding_op(w, ids)
    } else {
        w.embedding(ids)
    }
}

/// The op itself, on any device (its CPU form is a plain loop: the semantics, tested against
/// `index_select`).
pub fn embedding_op(w: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (vocab, d) = w.dims2()?;
    w.contiguous()?.apply_op2(&ids.contiguous()?, Lookup { vocab, d })
}

struct Lookup {
    vocab: usize,
    d: usize,
}

/// (ids (N,), g (N, d)) -> dW (V, d); forward-only.
struct Scatter {
    vocab: usize,
    d: usize,
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("embedding: {what} must be contiguous"),
    }
}

impl CustomOp2 for Lookup {
    fn name(&self) -> &'static str {
        "zoo-embedding"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = contiguous(s1.as_slice::<f32>()?, l1, "the table")?;
        let ids = contiguous(s2.as_slice::<u32>()?, l2, "the ids")?;
        let d = self.d;
        let mut out = Vec::with_capacity(ids.len() * d);
        for &id in ids {
            let id = id as usize;
            if id >= self.vocab {
                candle_core::bail!("embedding: id {id} is outside the table of {} rows", self.vocab);
            }
            out.extend_from_slice(&w[id * d..(id + 1) * d]);
        }
        Ok((CpuStorage::F32(out), Shape::from((ids.len(), d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = l2.shape().elem_count();
        let out = cuda::launch("zoo_embedding_fwd_f32", s2, l2, s1, l1, n, self.vocab, self.d, false)?;
        Ok((out, Shape::from((n, self.d))))
    }

    fn bwd(&self, _w: &Tensor, ids: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F32)?.contiguous()?;
        let dw = ids.apply_op2_no_bwd(&g, &Scatter { vocab: self.vocab, d: self.d })?;
        Ok((Some(dw), None))
    }
}

impl CustomOp2 for Scatter {
    fn name(&self) -> &'static str {
        "zoo-embedding-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let ids = contiguous(s1.as_slice::<u32>()?, l1, "the ids")?;
        let g = contiguous(s2.as_slice::<f32>()?, l2, "the gradient")?;
        let d = self.d;
        let mut dw = vec![0f32; self.vocab * d];
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id < self.vocab {
                for (a, b) in dw[id * d..(id + 1) * d].iter_mut().zip(&g[i * d..(i + 1) * d]) {
                    *a += b;
                }
            }
        }
        Ok((CpuStorage::F32(dw), Shape::from((self.vocab, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = l1.shape().elem_count();
        let out = cuda::launch("zoo_embedding_bwd_f32", s1, l1, s2, l2, n, self.vocab, self.d, true)?;
        Ok((out, Shape::from((self.vocab, self.d))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/embedding.ptx"));

    /// Launch `func` over n rows: ids (n,), `src` (the table for the lookup, the gradient for the
    /// scatter); output (n, d) for the lookup or zeroed (vocab, d) for the scatter.
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        func: &str,
        ids: &CudaStorage,
        ids_l: &Layout,
        src: &CudaStorage,
        src_l: &Layout,
        n: usize,
        vocab: usize,
        d: usize,
        scatter: bool,
    ) -> Result<CudaStorage> {
        let (Some((i0, i1)), Some((s0, s1))) = (ids_l.contiguous_offsets(), src_l.contiguous_offsets()) else {
            candle_core::bail!("embedding: inputs must be contiguous");
        };
        let dev = src.device.clone();
        let ids = ids.as_cuda_slice::<u32>()?.slice(i0..i1);
        let src = src.as_cuda_slice::<f32>()?.slice(s0..s1);
        let out = if scatter { dev.alloc_zeros::<f32>(vocab * d)? } else { unsafe { dev.alloc::<f32>(n * d)? } };
        let f = dev.get_or_load_custom_func(func, "zoo_embedding", PTX)?;
        let threads = (d.div_ceil(32) * 32).clamp(32, 256) as u32;
        let cfg = LaunchConfig { grid_dim: (n.clamp(1, 65_535) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let (n32, d32, v32) = (n as u32, d as u32, vocab as u32);
        let mut b = f.builder();
        b.arg(&ids).arg(&src).arg(&out).arg(&n32).arg(&d32).arg(&v32);
        // SAFETY: ids holds n u32, src n·d (scatter) or vocab·d (lookup) f32, out vocab·d
        // (scatter) or n·d (lookup); the kernels index within those bounds.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}
