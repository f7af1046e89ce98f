//! Token embedding with a scatter backward: `out[i] = W[ids[i]]`, `dW[v] = Σ_{i: ids[i] = v} g[i]`.
//!
//! The composition is candle's `index_select`, whose backward `index_add` runs on CUDA as d
//! threads that each walk all N ids: 36 ms of a 87 ms MQAR training step (N = 65,536 tokens,
//! d = 128, H200; one `ncu` trace). On CUDA the backward here sorts the positions by id (a stable
//! radix sort) and sums each id's gradient rows in ascending position, in pieces of 32 rows and
//! then the pieces in order: the same bits on every run, so a CUDA training run repeats itself
//! (with cuDNN's attention under [`crate::deterministic`]). Its first form scattered the rows with
//! `atomicAdd`, whose addition order, and so dW's last bits, varied run to run (issue 9's GLA at
//! d 256 gave 91.0% and 56.4% recall in two runs of one seed); `ZOO_EMBEDDING_BWD=atomic` still
//! runs it. An id outside the table is an error on CPU; on CUDA the kernel cannot raise one and
//! gives a zero row (and no gradient): zoo's tasks and tokenizers only produce ids below the
//! model's vocabulary size.
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

/// Whether the CUDA backward scatters with `atomicAdd` (`ZOO_EMBEDDING_BWD=atomic`) instead of the
/// sorted, deterministic sum (the default). Result JSONs record it as `embedding_bwd`.
pub fn atomic_backward() -> bool {
    std::env::var("ZOO_EMBEDDING_BWD").as_deref() == Ok("atomic")
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
        let out = if atomic_backward() {
            cuda::launch("zoo_embedding_bwd_f32", s1, l1, s2, l2, n, self.vocab, self.d, true)?
        } else {
            cuda::sorted_grad(s1, l1, s2, l2, n, self.vocab, self.d)?
        };
        Ok((out, Shape::from((self.vocab, self.d))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
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
        let dev = src.device.clone();
        let (ids, src) = views(ids, ids_l, src, src_l)?;
        let out = if scatter { dev.alloc_zeros::<f32>(vocab * d)? } else { unsafe { dev.alloc::<f32>(n * d)? } };
        let f = dev.get_or_load_custom_func(func, "zoo_embedding", PTX)?;
        let (n32, d32, v32) = (n as u32, d as u32, vocab as u32);
        let mut b = f.builder();
        b.arg(&ids).arg(&src).arg(&out).arg(&n32).arg(&d32).arg(&v32);
        // SAFETY: ids holds n u32, src n·d (scatter) or vocab·d (lookup) f32, out vocab·d
        // (scatter) or n·d (lookup); the kernels index within those bounds.
        unsafe { b.launch(row_cfg(n, d)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    /// The two inputs' contiguous elements: the u32 ids and the f32 rows (the table or the gradient).
    fn views<'a>(
        ids: &'a CudaStorage,
        ids_l: &Layout,
        src: &'a CudaStorage,
        src_l: &Layout,
    ) -> Result<(CudaView<'a, u32>, CudaView<'a, f32>)> {
        let (Some((i0, i1)), Some((s0, s1))) = (ids_l.contiguous_offsets(), src_l.contiguous_offsets()) else {
            candle_core::bail!("embedding: inputs must be contiguous");
        };
        Ok((ids.as_cuda_slice::<u32>()?.slice(i0..i1), src.as_cuda_slice::<f32>()?.slice(s0..s1)))
    }

    /// A block per row (grid-striding past 65,535 rows), its threads over the row's d columns.
    fn row_cfg(rows: usize, d: usize) -> LaunchConfig {
        let threads = (d.div_ceil(32) * 32).clamp(32, 256) as u32;
        LaunchConfig { grid_dim: (rows.clamp(1, 65_535) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
    }

    /// Rows of gradient summed per id in a piece.
    const PIECE: usize = 32;
    /// Keys per radix-sort tile (one warp walks a tile).
    const TILE: usize = 1024;

    /// The deterministic dW (embedding.cu's second half): count the ids, sort the positions by id
    /// (8-bit digits, as many passes as V needs), sum each id's rows in pieces, then the pieces.
    pub fn sorted_grad(
        ids: &CudaStorage,
        ids_l: &Layout,
        g: &CudaStorage,
        g_l: &Layout,
        n: usize,
        vocab: usize,
        d: usize,
    ) -> Result<CudaStorage> {
        if n >= u32::MAX as usize || vocab >= u32::MAX as usize {
            candle_core::bail!("embedding: {n} ids or {vocab} rows do not fit the kernels' u32 counts");
        }
        let dev = g.device.clone();
        let (ids, g) = views(ids, ids_l, g, g_l)?;
        let out = unsafe { dev.alloc::<f32>(vocab * d)? };
        let load = |name: &str| dev.get_or_load_custom_func(name, "zoo_embedding", PTX);
        let (n32, v32, d32) = (n as u32, vocab as u32, d as u32);
        let grid = |work: usize, per: usize| LaunchConfig {
            grid_dim: (work.div_ceil(per).clamp(1, 65_535) as u32, 1, 1),
            block_dim: (per as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        // Counts over V + 1 buckets (the last: ids past the table), their offsets and the pieces'.
        let counts = dev.alloc_zeros::<u32>(vocab + 1)?;
        let offsets = unsafe { dev.alloc::<u32>(vocab + 2)? };
        let poffsets = unsafe { dev.alloc::<u32>(vocab + 2)? };
        // SAFETY (every launch below): each kernel reads and writes within the lengths allocated
        // here for (n, vocab, d), as embedding.cu's comments give them.
        if n > 0 {
            let f = load("zoo_emb_count")?;
            let mut b = f.builder();
            b.arg(&ids).arg(&counts).arg(&n32).arg(&v32);
            unsafe { b.launch(grid(n, 256)) }.w()?;
        }
        let m = (vocab + 1) as u32;
        for (dst, piece) in [(&offsets, 0u32), (&poffsets, PIECE as u32)] {
            let f = load("zoo_emb_scan")?;
            let mut b = f.builder();
            b.arg(&counts).arg(dst).arg(&m).arg(&piece);
            unsafe { b.launch(one) }.w()?;
        }
        // The stable sort of positions by id: keys in [0, V], so ceil(bits(V) / 8) passes.
        let tiles = n.div_ceil(TILE).max(1);
        let bits = (u32::BITS - v32.leading_zeros()).max(1);
        let passes = bits.div_ceil(8);
        let hist = unsafe { dev.alloc::<u32>(256 * tiles)? };
        let base = unsafe { dev.alloc::<u32>(256 * tiles + 1)? };
        let mut keys = [unsafe { dev.alloc::<u32>(n.max(1))? }, unsafe { dev.alloc::<u32>(n.max(1))? }];
        let mut vals = [unsafe { dev.alloc::<u32>(n.max(1))? }, unsafe { dev.alloc::<u32>(n.max(1))? }];
        let tile_cfg = |threads: u32| LaunchConfig { grid_dim: (tiles as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        for pass in 0..passes {
            let (shift, first) = (8 * pass, u32::from(pass == 0));
            let (src, dst) = ((pass % 2) as usize, ((pass + 1) % 2) as usize);
            let (keys_in, keys_out) = split(&mut keys, src, dst);
            let (vals_in, vals_out) = split(&mut vals, src, dst);
            let f = load("zoo_emb_hist")?;
            let mut b = f.builder();
            if pass == 0 { b.arg(&ids) } else { b.arg(keys_in) };
            b.arg(&hist).arg(&n32).arg(&v32).arg(&shift).arg(&first);
            unsafe { b.launch(tile_cfg(256)) }.w()?;
            let (hm, zero) = ((256 * tiles) as u32, 0u32);
            let f = load("zoo_emb_scan")?;
            let mut b = f.builder();
            b.arg(&hist).arg(&base).arg(&hm).arg(&zero);
            unsafe { b.launch(one) }.w()?;
            let f = load("zoo_emb_scatter")?;
            let mut b = f.builder();
            // The first pass reads the ids and takes the positions as values (a null pointer).
            let null = 0u64;
            if pass == 0 { b.arg(&ids).arg(&null) } else { b.arg(keys_in).arg(vals_in) };
            b.arg(&base).arg(keys_out).arg(vals_out).arg(&n32).arg(&v32).arg(&shift).arg(&first);
            unsafe { b.launch(tile_cfg(32)) }.w()?;
        }
        let pos = &vals[(passes % 2) as usize];
        // Pieces: at most N / PIECE + min(V, N) of them.
        let bound = n.div_ceil(PIECE) + vocab.min(n);
        let pieces = unsafe { dev.alloc::<u32>(2 * bound.max(1))? };
        let partial = unsafe { dev.alloc::<f32>(bound.max(1) * d)? };
        let f = load("zoo_emb_pieces")?;
        let mut b = f.builder();
        b.arg(&offsets).arg(&poffsets).arg(&pieces).arg(&v32);
        unsafe { b.launch(grid(vocab, 256)) }.w()?;
        let f = load("zoo_emb_piece_sum")?;
        let mut b = f.builder();
        b.arg(&pieces).arg(&offsets).arg(&poffsets).arg(pos).arg(&g).arg(&partial).arg(&v32).arg(&d32);
        unsafe { b.launch(row_cfg(bound, d)) }.w()?;
        let f = load("zoo_emb_row_sum")?;
        let mut b = f.builder();
        b.arg(&poffsets).arg(&partial).arg(&out).arg(&v32).arg(&d32);
        unsafe { b.launch(row_cfg(vocab, d)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    /// Two distinct elements of a two-element array, the first shared, the second mutable.
    fn split<T>(a: &mut [T; 2], src: usize, dst: usize) -> (&T, &mut T) {
        let [x, y] = a;
        if src == 0 && dst == 1 { (x, y) } else { (y, x) }
    }
}
