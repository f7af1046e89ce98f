//! Depthwise causal convolution over time, with an optional SiLU, forward and backward in three
//! kernels: H3's shift filter and Zoology's BaseConv (`zoo-core`'s `CausalConv1d`), and the short
//! q/k/v convolution of GLA, DeltaNet and Based (fla's `ShortConvolution`, mamba's
//! `causal_conv1d`):
//!
//! `p[b, t, c] = Σ_{j<K} w[c, j] · x[b, t − K + 1 + j, c]` (zero before the sequence),
//! `y = p` or `y = silu(p)`.
//!
//! Backward, with `gp = dL/dp` (`g`, or `g · σ(p)(1 + p(1 − σ(p)))` for the SiLU, p recomputed):
//! `dx[b, s, c] = Σ_j w[c, j] · gp[b, s + K − 1 − j, c]`, `dw[c, j] = Σ_{b,t} gp[b, t, c] · x[b, t − K + 1 + j, c]`.
//!
//! The composition (K shifted slices times a broadcast weight, summed) launches about 2K ops in the
//! forward and 4K in the backward, each a strided broadcast over the whole (B, T, C) tensor: in an
//! `ncu` trace of an MQAR step (GLA + short conv, d = 128, batch 256 × T 256, bf16, H200) those
//! broadcast multiplies and adds took most of the step's 49 ms of GPU time. Here the forward and
//! dx are one elementwise kernel each and dw one reduction (partial sums over chunks of 64 rows,
//! then one fixed-order sum), in f32 arithmetic with the weights read in f32.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! // One channel, kernel [0.5, 1]: y_t = 0.5·x_{t−1} + x_t.
//! let x = Tensor::new(&[[[1f32], [2.], [4.]]], &Device::Cpu)?;
//! let w = Tensor::new(&[[0.5f32, 1.0]], &Device::Cpu)?;
//! let y = zoo_kernels::conv1d::causal_conv1d(&x, &w, false)?;
//! assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![1.0, 2.5, 5.0]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// The longest kernel the CUDA kernels take.
pub const MAX_K: usize = 16;
/// (rows per chunk, chunks) of the weight gradient's partial sums on CUDA: 64 rows (b, t) a
/// chunk, more where the grid's second dimension (at most 65,535 chunks) needs it.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn chunking(rows: usize) -> (usize, usize) {
    let per = 64usize.max(rows.div_ceil(65_535));
    (per, rows.div_ceil(per).max(1))
}

/// Why the fused kernel cannot run here (`None`: it can). As the scans', the op's CPU form also
/// runs on the CPU, where it beats the composition's strided broadcasts (`ZOO_KERNELS=naive` keeps
/// the composition).
pub fn unsupported(x: &Tensor, w: &Tensor) -> Option<String> {
    if let Some(why) = crate::unavailable_unless_cpu_form(x.device(), true) {
        return Some(why);
    }
    if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Some(format!("dtype {:?}", x.dtype()));
    }
    shape_problem(x, w)
}

fn shape_problem(x: &Tensor, w: &Tensor) -> Option<String> {
    match (x.dims3(), w.dims2()) {
        (Ok((b, t, c)), Ok((wc, k))) if wc == c && (1..=MAX_K).contains(&k) && b * t * c <= i32::MAX as usize => None,
        _ => Some(format!("x {:?}, w {:?} (x (B, T, C), w (C, K) with K ≤ {MAX_K})", x.dims(), w.dims())),
    }
}

/// x (B, T, C), w (C, K) → y (B, T, C) in x's dtype, differentiable in x and w (w's gradient in
/// f32). On any device: the CPU form is loops over each sequence's rows, in parallel (tested
/// against the composition), CUDA runs the kernels.
pub fn causal_conv1d(x: &Tensor, w: &Tensor, silu: bool) -> Result<Tensor> {
    if let Some(why) = shape_problem(x, w) {
        candle_core::bail!("causal conv1d: {why}")
    }
    let w = w.to_dtype(DType::F32)?.contiguous()?;
    x.contiguous()?.apply_op2(&w, Conv { silu })
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    c: usize,
    k: usize,
}

fn dims(x: &Layout, w: &Layout) -> Result<Dims> {
    let (b, t, c) = x.shape().dims3()?;
    let (_, k) = w.shape().dims2()?;
    Ok(Dims { b, t, c, k })
}

struct Conv {
    silu: bool,
}

/// The backward's two parts: dx (B, T, C) in x's dtype, or the weight gradient's partial sums
/// (chunks, C, K) in f32.
#[derive(Clone, Copy, PartialEq)]
enum Part {
    Dx,
    Dw,
}

struct Grad {
    silu: bool,
    part: Part,
}

fn silu_grad(p: f32) -> f32 {
    let s = crate::cpu::sigmoid(p);
    s * (1.0 + p * (1.0 - s))
}

mod cpu {
    //! The CPU forms: x, g (B·T·C), w (C·K), all f32. Each sequence's rows in parallel on rayon's
    //! pool, every row a vector over the channels (compiled for AVX2 where the CPU has it; the
    //! same bits either way).
    use super::{silu_grad, Dims};
    use crate::cpu::simd;
    use rayon::prelude::*;

    /// w (C, K) as its K columns, (K, C).
    fn columns(w: &[f32], n: Dims) -> Vec<f32> {
        (0..n.k).flat_map(|j| (0..n.c).map(move |c| w[c * n.k + j])).collect()
    }

    fn row(x: &[f32], n: Dims, t: usize) -> &[f32] {
        &x[t * n.c..(t + 1) * n.c]
    }

    /// The pre-activation of one sequence (T × C rows) into `p`: taps in ascending order, as the
    /// composition adds them.
    #[inline(always)]
    fn pre(xb: &[f32], wt: &[f32], n: Dims, p: &mut [f32]) {
        p.fill(0.0);
        for (t, pr) in p.chunks_exact_mut(n.c).enumerate() {
            for j in (n.k - 1).saturating_sub(t)..n.k {
                let (xr, wr) = (row(xb, n, t + j + 1 - n.k), row(wt, n, j));
                pr.iter_mut().zip(xr).zip(wr).for_each(|((e, &x), &w)| *e += w * x);
            }
        }
    }

    /// dL/dp of one sequence into `gp`.
    #[inline(always)]
    fn gpre(xb: &[f32], wt: &[f32], gb: &[f32], n: Dims, silu: bool, gp: &mut [f32]) {
        if silu {
            pre(xb, wt, n, gp);
            gp.iter_mut().zip(gb).for_each(|(p, &g)| *p = g * silu_grad(*p));
        } else {
            gp.copy_from_slice(gb);
        }
    }

    pub fn forward(x: &[f32], w: &[f32], n: Dims, silu: bool) -> Vec<f32> {
        let mut y = vec![0f32; n.b * n.t * n.c];
        if y.is_empty() {
            return y;
        }
        let wt = columns(w, n);
        y.par_chunks_mut(n.t * n.c).zip(x.par_chunks(n.t * n.c)).for_each(|(yb, xb)| {
            simd(|| {
                pre(xb, &wt, n, yb);
                if silu {
                    yb.iter_mut().for_each(|p| *p *= crate::cpu::sigmoid(*p));
                }
            })
        });
        y
    }

    pub fn dx(x: &[f32], w: &[f32], g: &[f32], n: Dims, silu: bool) -> Vec<f32> {
        let mut dx = vec![0f32; n.b * n.t * n.c];
        if dx.is_empty() {
            return dx;
        }
        let wt = columns(w, n);
        let len = n.t * n.c;
        dx.par_chunks_mut(len).zip(x.par_chunks(len).zip(g.par_chunks(len))).for_each(|(db, (xb, gb))| {
            simd(|| {
                let mut gp = vec![0f32; len];
                gpre(xb, &wt, gb, n, silu, &mut gp);
                // dx[s] = Σ_j w[:, j] ⊙ gp[s + K − 1 − j] over the taps that stay inside T.
                for (s, dr) in db.chunks_exact_mut(n.c).enumerate() {
                    for j in 0..n.k {
                        let t = s + n.k - 1 - j;
                        if t < n.t {
                            let (gr, wr) = (row(&gp, n, t), row(&wt, n, j));
                            dr.iter_mut().zip(gr).zip(wr).for_each(|((e, &g), &w)| *e += w * g);
                        }
                    }
                }
            })
        });
        dx
    }

    /// The weight gradient's partial sums, one (C, K) per sequence: (B, C, K).
    pub fn dw(x: &[f32], w: &[f32], g: &[f32], n: Dims, silu: bool) -> Vec<f32> {
        let len = n.t * n.c;
        if n.b * len == 0 {
            return vec![0f32; n.b.max(1) * n.c * n.k];
        }
        let wt = columns(w, n);
        let parts: Vec<Vec<f32>> = x
            .par_chunks(len)
            .zip(g.par_chunks(len))
            .map(|(xb, gb)| {
                simd(|| {
                    let mut gp = vec![0f32; len];
                    gpre(xb, &wt, gb, n, silu, &mut gp);
                    // (K, C): dw[:, j] = Σ_t gp[t] ⊙ x[t − K + 1 + j].
                    let mut acc = vec![0f32; n.k * n.c];
                    for t in 0..n.t {
                        let gr = row(&gp, n, t);
                        for j in (n.k - 1).saturating_sub(t)..n.k {
                            let xr = row(xb, n, t + j + 1 - n.k);
                            acc[j * n.c..(j + 1) * n.c].iter_mut().zip(gr).zip(xr).for_each(|((e, &g), &x)| *e += g * x);
                        }
                    }
                    acc
                })
            })
            .collect();
        parts.iter().flat_map(|acc| (0..n.c).flat_map(move |c| (0..n.k).map(move |j| acc[j * n.c + c]))).collect()
    }
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "zoo-causal-conv1d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = dims(l1, l2)?;
        let (x, w) = (crate::cpu_f32(s1, l1, "causal conv1d")?, crate::cpu_f32(s2, l2, "causal conv1d")?);
        let y = cpu::forward(&x, &w, n, self.silu);
        Ok((crate::cpu_from_f32(y, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = dims(l1, l2)?;
        let y = cuda::launch(Kernel::Fwd, s1, l1, s2, l2, None, n, self.silu)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(x.dtype())?.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &Grad { silu: self.silu, part: Part::Dx })?;
        let dw = x.apply_op3_no_bwd(w, &g, &Grad { silu: self.silu, part: Part::Dw })?.sum(0)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for Grad {
    fn name(&self) -> &'static str {
        "zoo-causal-conv1d-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = dims(l1, l2)?;
        let what = "causal conv1d backward";
        let (x, w, g) = (crate::cpu_f32(s1, l1, what)?, crate::cpu_f32(s2, l2, what)?, crate::cpu_f32(s3, l3, what)?);
        Ok(match self.part {
            Part::Dx => (crate::cpu_from_f32(cpu::dx(&x, &w, &g, n, self.silu), s1.dtype())?, l1.shape().clone()),
            Part::Dw => (CpuStorage::F32(cpu::dw(&x, &w, &g, n, self.silu)), Shape::from((n.b.max(1), n.c, n.k))),
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = dims(l1, l2)?;
        Ok(match self.part {
            Part::Dx => (cuda::launch(Kernel::Dx, s1, l1, s2, l2, Some((s3, l3)), n, self.silu)?, l1.shape().clone()),
            Part::Dw => {
                let (_, chunks) = chunking(n.b * n.t);
                (cuda::launch(Kernel::Dw, s1, l1, s2, l2, Some((s3, l3)), n, self.silu)?, Shape::from((chunks, n.c, n.k)))
            }
        })
    }
}

#[cfg(feature = "cuda")]
#[derive(Clone, Copy)]
enum Kernel {
    Fwd,
    Dx,
    Dw,
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{chunking, Dims, Kernel};
    use crate::cuda_addr::{alloc, storage_addr, suffix};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/conv1d.ptx"));
    const MODULE: &str = "zoo_conv1d";
    const THREADS: usize = 256;

    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        kernel: Kernel,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        g: Option<(&CudaStorage, &Layout)>,
        n: Dims,
        silu: bool,
    ) -> Result<CudaStorage> {
        let dev = x.device.clone();
        if w.dtype() != DType::F32 {
            candle_core::bail!("causal conv1d: weights must be f32")
        }
        if let Some((g, _)) = g {
            if g.dtype() != x.dtype() {
                candle_core::bail!("causal conv1d: gradient {:?} for input {:?}", g.dtype(), x.dtype())
            }
        }
        let (xp, wp) = (storage_addr(x, xl)?, storage_addr(w, wl)?);
        let gp = match g {
            Some((g, gl)) => storage_addr(g, gl)?,
            None => 0,
        };
        let elems = n.b * n.t * n.c;
        let (b, t, c, k, s) = (n.b as i32, n.t as i32, n.c as i32, n.k as i32, silu as i32);
        let (name, out, cfg) = match kernel {
            Kernel::Fwd | Kernel::Dx => {
                let blocks = elems.div_ceil(THREADS).clamp(1, 1 << 20) as u32;
                let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
                let name = if matches!(kernel, Kernel::Fwd) { "fwd" } else { "dx" };
                (name, alloc(&dev, x.dtype(), elems)?, cfg)
            }
            Kernel::Dw => {
                let (_, chunks) = chunking(n.b * n.t);
                let threads = n.c.div_ceil(32).clamp(1, THREADS / 32) * 32;
                let cfg = LaunchConfig {
                    grid_dim: (n.c.div_ceil(threads) as u32, chunks as u32, 1),
                    block_dim: (threads as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                ("dw", alloc(&dev, DType::F32, chunks * n.c * n.k)?, cfg)
            }
        };
        let f = dev.get_or_load_custom_func(&format!("zoo_conv_{name}_{}", suffix(x.dtype())?), MODULE, PTX)?;
        let (storage, op) = out;
        let mut bld = f.builder();
        match kernel {
            Kernel::Fwd => {
                bld.arg(&xp).arg(&wp).arg(&op).arg(&b).arg(&t).arg(&c).arg(&k).arg(&s);
            }
            Kernel::Dx => {
                bld.arg(&xp).arg(&wp).arg(&gp).arg(&op).arg(&b).arg(&t).arg(&c).arg(&k).arg(&s);
            }
            Kernel::Dw => {
                let rows = chunking(n.b * n.t).0 as i32;
                bld.arg(&xp).arg(&wp).arg(&gp).arg(&op).arg(&b).arg(&t).arg(&c).arg(&k).arg(&s).arg(&rows);
                // SAFETY: x and g hold B·T·C elements, w C·K f32, the output chunks·C·K f32; the
                // kernel reads and writes within those.
                unsafe { bld.launch(cfg) }.w()?;
                return Ok(storage);
            }
        }
        // SAFETY: x (and g) hold B·T·C elements of x's type, w C·K f32, the output B·T·C; one
        // thread per output element in a grid-stride loop.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(storage)
    }
}
