//! Multi-tensor AdamW with global grad-norm clipping (Loshchilov & Hutter 2019, "Decoupled Weight
//! Decay Regularization", Algorithm 2; the clip of `torch.nn.utils.clip_grad_norm_`).
//!
//! For N parameter tensors the composition in zoo-core (`optim.rs`) issues about 4N launches for
//! the norm, 2N to scale the gradients and 15N for the update, each allocating its output. The
//! fused step updates weights and both moments in place in two launches per 48 tensors plus one
//! for the norm, and keeps the norm on the device (no host round trip before the update):
//!
//! 1. `zoo_sumsq_f32`: per-block partial sums of g², one grid row per tensor;
//! 2. `zoo_clip_scale`: one block adds the partials in a fixed order (so the step is
//!    deterministic) into `[‖g‖₂, min(max_norm / (‖g‖₂ + 1e-6), 1)]`;
//! 3. `zoo_adamw_f32`: `g ← s·g; m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
//!    w ← w(1 − lr·wd) − lr·(m/bc₁)/(√(v/bc₂) + ε)`, decay only where the slot says so; when
//!    ‖g‖₂ is not finite it changes nothing (the caller reads the norm and stops).

use candle_core::{Result, Tensor};

/// Hyper-parameters of one step, bias corrections included (`bc = 1 − βᵗ`).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub bc1: f64,
    pub bc2: f64,
}

/// One parameter: weight, its gradient, the two moments (all updated in place but `g`), and
/// whether weight decay applies.
pub struct Slot<'a> {
    pub w: &'a Tensor,
    pub g: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub decay: bool,
}

/// Why the fused step cannot run on these slots, or `None` when it can.
pub fn unsupported(slots: &[Slot]) -> Option<String> {
    if crate::mode() == crate::Kernels::Naive {
        return Some("ZOO_KERNELS=naive".into());
    }
    if !crate::compiled() {
        return Some("built without the `cuda` feature".into());
    }
    let first = slots.first()?;
    if !first.w.device().is_cuda() {
        return Some("parameters are not on a CUDA device".into());
    }
    for s in slots {
        for (what, t) in [("weight", s.w), ("gradient", s.g), ("first moment", s.m), ("second moment", s.v)] {
            if t.dtype() != candle_core::DType::F32 {
                return Some(format!("a {what} is {:?}; the fused AdamW takes f32", t.dtype()));
            }
            if !t.is_contiguous() {
                return Some(format!("a {what} is not contiguous"));
            }
            if !t.device().same_device(first.w.device()) {
                return Some("parameters on more than one device".into());
            }
        }
        if s.g.elem_count() != s.w.elem_count() || s.m.elem_count() != s.w.elem_count() || s.v.elem_count() != s.w.elem_count()
        {
            return Some("a gradient or moment differs in size from its weight".into());
        }
        if s.w.elem_count() > u32::MAX as usize {
            return Some("a tensor has more than 2^32 elements".into());
        }
    }
    None
}

/// Clip the gradients to `max_norm` (if given) by their global L2 norm and apply one AdamW step
/// to every slot, in place. Returns `[‖g‖₂, clip scale]` as an f32 tensor of shape (2,) on the
/// device. Call only when [`unsupported`] returns `None`.
pub fn step(slots: &[Slot], hp: &AdamWStep, max_norm: Option<f64>) -> Result<Tensor> {
    step_with(slots, hp, max_norm, None)
}

/// [`step`], with the learning rate and both bias corrections read from `hp_device` when given
/// (an f32 tensor `[lr, bc1, bc2]` on the device; `hp.lr`, `hp.bc1`, `hp.bc2` are then unused):
/// the form a step captured into a CUDA graph needs, since a replay repeats the captured kernel
/// arguments but reads memory afresh. The same arithmetic, bit for bit.
pub fn step_with(slots: &[Slot], hp: &AdamWStep, max_norm: Option<f64>, hp_device: Option<&Tensor>) -> Result<Tensor> {
    if let Some(why) = unsupported(slots) {
        candle_core::bail!("fused AdamW does not apply: {why}");
    }
    if let Some(t) = hp_device {
        if t.dims() != [3] || t.dtype() != candle_core::DType::F32 || !t.is_contiguous() || !t.device().same_device(slots[0].w.device()) {
            candle_core::bail!("fused AdamW: the device hyper-parameters must be a contiguous f32 [lr, bc1, bc2] on the weights' device");
        }
    }
    imp::step(slots, hp, max_norm, hp_device)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;
    pub fn step(_: &[Slot], _: &AdamWStep, _: Option<f64>, _: Option<&Tensor>) -> Result<Tensor> {
        candle_core::bail!("zoo-kernels was built without the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{DType, Device, Storage};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));
    const MODULE: &str = "zoo_adamw";
    /// Tensors per launch; must equal MAXT in adamw.cu (the list travels as a kernel argument,
    /// 1.9 KB of the 4 KB a launch may carry).
    const MAXT: usize = 48;
    const THREADS: u32 = 256;
    /// Elements per thread before a tensor gets another block, and the cap on blocks per tensor.
    const PER_THREAD: usize = 4;
    const MAX_BLOCKS: usize = 512;

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct TensorList {
        w: [u64; MAXT],
        g: [u64; MAXT],
        m: [u64; MAXT],
        v: [u64; MAXT],
        n: [u32; MAXT],
        decay: [u32; MAXT],
        first: u32,
        count: u32,
    }
    // SAFETY: plain old data with the C layout of `struct TensorList` in adamw.cu.
    unsafe impl DeviceRepr for TensorList {}

    /// Device address of the first element of a contiguous f32 tensor.
    fn addr(t: &Tensor, dev: &CudaDevice) -> Result<u64> {
        let (st, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*st else { candle_core::bail!("fused AdamW: tensor not on CUDA") };
        let stream = dev.cuda_stream();
        let (p, _sync) = cs.as_cuda_slice::<f32>()?.device_ptr(&stream);
        // The buffer outlives this call (the caller holds the tensor); every use is on the
        // device's one stream, so stream order alone orders the kernels' reads and writes.
        Ok(p + (layout.start_offset() * 4) as u64)
    }

    pub fn step(slots: &[Slot], hp: &AdamWStep, max_norm: Option<f64>, hp_device: Option<&Tensor>) -> Result<Tensor> {
        let device = slots[0].w.device().clone();
        let Device::Cuda(dev) = &device else { candle_core::bail!("fused AdamW: not a CUDA device") };
        let slots: Vec<&Slot> = slots.iter().filter(|s| s.w.elem_count() > 0).collect();
        let max_n = slots.iter().map(|s| s.w.elem_count()).max().unwrap_or(1);
        let gx = max_n.div_ceil(THREADS as usize * PER_THREAD).clamp(1, MAX_BLOCKS);
        let mut lists = Vec::new();
        for (c, chunk) in slots.chunks(MAXT).enumerate() {
            let mut tl = TensorList {
                w: [0; MAXT],
                g: [0; MAXT],
                m: [0; MAXT],
                v: [0; MAXT],
                n: [0; MAXT],
                decay: [0; MAXT],
                first: (c * MAXT) as u32,
                count: chunk.len() as u32,
            };
            for (i, s) in chunk.iter().enumerate() {
                tl.w[i] = addr(s.w, dev)?;
                tl.g[i] = addr(s.g, dev)?;
                tl.m[i] = addr(s.m, dev)?;
                tl.v[i] = addr(s.v, dev)?;
                tl.n[i] = s.w.elem_count() as u32;
                tl.decay[i] = s.decay as u32;
            }
            lists.push(tl);
        }
        // [norm, scale]; zoo_clip_scale writes both.
        let out = Tensor::zeros(2, DType::F32, &device)?;
        let out_ptr = addr(&out, dev)?;
        let np = slots.len() * gx;
        // SAFETY: every partial is written by zoo_sumsq_f32 before zoo_clip_scale reads it.
        let partials = unsafe { dev.alloc::<f32>(np.max(1))? };
        let stream = dev.cuda_stream();
        let (partials_ptr, _sync) = partials.device_ptr(&stream);
        let use_scale = max_norm.is_some() as u32;

        let sumsq = dev.get_or_load_custom_func("zoo_sumsq_f32", MODULE, PTX)?;
        let clip = dev.get_or_load_custom_func("zoo_clip_scale", MODULE, PTX)?;
        let adamw_name = if hp_device.is_some() { "zoo_adamw_hp_f32" } else { "zoo_adamw_f32" };
        let adamw = dev.get_or_load_custom_func(adamw_name, MODULE, PTX)?;
        for tl in &lists {
            let cfg = LaunchConfig { grid_dim: (gx as u32, tl.count, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            let mut b = sumsq.builder();
            b.arg(tl).arg(&partials_ptr);
            // SAFETY: the list holds live device buffers of at least n[t] f32 each; the kernel
            // writes partials[(first + t) * gx + block] < np.
            unsafe { b.launch(cfg) }.w()?;
        }
        let (np32, mn) = (np as u32, max_norm.unwrap_or(0.0) as f32);
        let mut b = clip.builder();
        b.arg(&partials_ptr).arg(&np32).arg(&mn).arg(&out_ptr);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: reads np partials, writes two floats of `out`.
        unsafe { b.launch(cfg) }.w()?;
        let f = |x: f64| x as f32;
        let (lr, b1, b2, eps, wd, bc1, bc2) =
            (f(hp.lr), f(hp.beta1), f(hp.beta2), f(hp.eps), f(hp.weight_decay), f(hp.bc1), f(hp.bc2));
        let hp_ptr = hp_device.map(|t| addr(t, dev)).transpose()?;
        for tl in &lists {
            let cfg = LaunchConfig { grid_dim: (gx as u32, tl.count, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            let mut b = adamw.builder();
            b.arg(tl).arg(&out_ptr).arg(&use_scale);
            match &hp_ptr {
                // hp: [lr, bc1, bc2] (checked by step_with).
                Some(p) => b.arg(p).arg(&b1).arg(&b2).arg(&eps).arg(&wd),
                None => b.arg(&lr).arg(&b1).arg(&b2).arg(&eps).arg(&wd).arg(&bc1).arg(&bc2),
            };
            // SAFETY: as for zoo_sumsq_f32; w, m, v are distinct buffers updated element-wise.
            unsafe { b.launch(cfg) }.w()?;
        }
        // `partials` is freed when it goes out of scope, stream-ordered after the kernels above.
        Ok(out)
    }
}
