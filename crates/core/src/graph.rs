//! Training steps replayed from a CUDA graph: opt-in (`ZOO_CUDA_GRAPH=1`, or [`set_enabled`]),
//! for models whose step is bound by kernel launches (candle launches every op from the host; a
//! small model's step is mostly that).
//!
//! The first step of a run takes the graph path eagerly, with candle's cache of small
//! host-to-device uploads on (`CudaDevice::enable_cuda_graph_htod_cache`: the dims and strides its
//! kernels read), the second is captured into a graph and launched, every later one is a replay.
//! The step reads its batch, and the optimiser its learning rate and bias corrections
//! ([`AdamW::next_hp`]), from device buffers written before each replay; the loss and the
//! gradient norm come back through two more. A replay runs the captured kernels with their
//! captured arguments, so it computes exactly what the eager step computes; only the host work
//! (launches, the autograd graph, allocations) is gone.
//!
//! A model's auxiliary loss and statistics (MoE) come back through buffers of their own. What
//! cannot be captured falls back to the eager step, with the reason printed once: a step that
//! reads from the device (the grouped and looped MoE dispatches read the expert lengths; the
//! tiled one does not) or uploads new host data (router noise), an optimiser step the fused AdamW
//! does not take (`ZOO_KERNELS=naive`, CPU), gradient accumulation, data parallelism, and a batch
//! of another shape than the captured one (that step alone runs eagerly).

use crate::data::Batch;
use crate::model::{cross_entropy, Lm};
use crate::optim::{AdamW, Grads};
use crate::state::TrainStep;
use candle_core::{Result, Var};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// 0: follow `ZOO_CUDA_GRAPH`; 1: on; 2: off.
static MODE: AtomicU8 = AtomicU8::new(0);
static REPLAYS: AtomicUsize = AtomicUsize::new(0);

/// Turn the graph path on or off for this process (over `ZOO_CUDA_GRAPH`).
pub fn set_enabled(on: bool) {
    MODE.store(if on { 1 } else { 2 }, Ordering::SeqCst);
}

/// Whether training steps go through a CUDA graph where they can.
pub fn enabled() -> bool {
    match MODE.load(Ordering::SeqCst) {
        1 => true,
        2 => false,
        _ => std::env::var("ZOO_CUDA_GRAPH").is_ok_and(|v| v == "1"),
    }
}

/// Training steps launched from a captured graph in this process (the capture's own launch
/// included): what tests check to know the path ran.
pub fn launches() -> usize {
    REPLAYS.load(Ordering::SeqCst)
}

/// The graph path of one training run.
pub struct GraphTrainer {
    #[cfg(feature = "cuda")]
    inner: imp::Inner,
}

impl GraphTrainer {
    /// A trainer for this run, or `None` where the graph path is off or cannot apply (not CUDA,
    /// gradient accumulation, data parallelism); the reason is printed when it was asked for.
    pub fn new(device: &candle_core::Device, accum: usize, data_parallel: bool) -> Option<Self> {
        if !enabled() {
            return None;
        }
        let why = if !device.is_cuda() {
            Some("not on CUDA")
        } else if !cfg!(feature = "cuda") {
            Some("built without the cuda feature")
        } else if accum > 1 {
            Some("gradient accumulation")
        } else if data_parallel {
            Some("data parallelism")
        } else {
            None
        };
        if let Some(why) = why {
            eprintln!("zoo: CUDA graph not used ({why}); training eagerly");
            return None;
        }
        #[cfg(feature = "cuda")]
        {
            Some(Self { inner: imp::Inner::default() })
        }
        #[cfg(not(feature = "cuda"))]
        {
            None
        }
    }

    /// One training step through the graph path: the loss and the gradient norm when it ran,
    /// `None` when this step must run eagerly instead (nothing of it has run: the caller trains on
    /// the same batch). Errors are real failures.
    #[allow(unused_variables)]
    pub fn step(&mut self, a: StepArgs) -> Result<Option<StepOut>> {
        #[cfg(feature = "cuda")]
        {
            self.inner.step(a)
        }
        #[cfg(not(feature = "cuda"))]
        {
            Ok(None)
        }
    }
}

/// What a step on the graph path gives back, as the eager step reports it: the loss (the
/// auxiliary loss included), the gradient norm, the auxiliary loss, the statistics (copies).
pub struct StepOut {
    pub loss: f64,
    pub norm: f32,
    pub aux: Option<f64>,
    pub stats: Vec<Vec<crate::mixer::Stat>>,
}

/// What one step of [`GraphTrainer::step`] works on: the model, its optimiser and parameters,
/// the batch, the learning rate, the clip and the step's identity.
pub struct StepArgs<'a> {
    pub model: &'a Lm,
    pub opt: &'a mut AdamW,
    pub vars: &'a [Var],
    pub batch: &'a Batch,
    pub lr: f64,
    pub clip: Option<f64>,
    pub ts: TrainStep,
}

/// The captured step: forward, loss (plus the model's auxiliary loss, as the eager step adds it),
/// backward and the fused AdamW, on the buffers; the auxiliary loss and the device statistics are
/// copied into buffers of their own, made on the first (eager) step. `updated` is set once the
/// optimiser step has been issued (an error after it is not a reason to fall back).
#[allow(dead_code)]
fn body(model: &Lm, opt: &mut AdamW, vars: &[Var], bufs: &mut Buffers, clip: Option<f64>, ts: TrainStep, updated: &mut bool) -> Result<()> {
    let out = {
        let _g = crate::state::enter_train_step(ts);
        model.forward(&bufs.inputs, None, None)?
    };
    let f32 = candle_core::DType::F32;
    let first = bufs.stats.is_none();
    if first {
        // Buffers for the statistics on the device (host ones are constants, kept as they are).
        let stats = out
            .stats
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|s| {
                        let v = if s.value.device().is_cpu() { s.value.clone() } else { s.value.zeros_like()? };
                        Ok(crate::mixer::Stat::new(s.name.clone(), s.shape, v))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        bufs.stats = Some(stats);
        bufs.aux = out.aux_loss.as_ref().map(|_| candle_core::Tensor::zeros(1, f32, bufs.loss.device())).transpose()?;
    }
    let mut loss = cross_entropy(&out.logits, &bufs.targets, bufs.mask.as_ref())?;
    match (&out.aux_loss, &bufs.aux) {
        (Some(a), Some(buf)) => {
            let a = a.to_dtype(f32)?;
            buf.slice_set(&a.detach().reshape(1)?, 0, 0)?;
            loss = (loss + a)?;
        }
        (None, None) => {}
        _ => candle_core::bail!("the model's auxiliary loss came and went between steps"),
    }
    for (layer, kept) in out.stats.iter().zip(bufs.stats.as_ref().expect("made above")) {
        for (s, k) in layer.iter().zip(kept) {
            if !s.value.device().is_cpu() {
                k.value.slice_set(&s.value.detach().to_dtype(k.value.dtype())?.contiguous()?, 0, 0)?;
            }
        }
    }
    let mut grads = Grads::default();
    grads.accumulate(&loss.backward()?, vars.iter(), 1.0)?;
    let Some(norm) = opt.step_clipped_device_hp(&grads, clip, &bufs.hp)? else {
        candle_core::bail!("the fused AdamW does not apply (ZOO_KERNELS=naive, or weights not f32)");
    };
    *updated = true;
    bufs.loss.slice_set(&loss.to_dtype(f32)?.reshape(1)?, 0, 0)?;
    // The fused step returns the norm as a scalar.
    bufs.norm.slice_set(&norm.reshape(1)?, 0, 0)?;
    Ok(())
}

/// The device buffers a captured step reads and writes.
#[allow(dead_code)]
struct Buffers {
    inputs: candle_core::Tensor,
    targets: candle_core::Tensor,
    mask: Option<candle_core::Tensor>,
    /// `[lr, bc1, bc2]` of the step (AdamW's device hyper-parameters).
    hp: candle_core::Tensor,
    loss: candle_core::Tensor,
    norm: candle_core::Tensor,
    /// The auxiliary loss (when the model has one) and the statistics, from the first step on.
    aux: Option<candle_core::Tensor>,
    stats: Option<Vec<Vec<crate::mixer::Stat>>>,
}

#[allow(dead_code)]
impl Buffers {
    fn like(b: &Batch) -> Result<Self> {
        let dev = b.inputs.device();
        let f32 = candle_core::DType::F32;
        Ok(Self {
            inputs: b.inputs.zeros_like()?,
            targets: b.targets.zeros_like()?,
            mask: b.mask.as_ref().map(|m| m.zeros_like()).transpose()?,
            hp: candle_core::Tensor::zeros(3, f32, dev)?,
            loss: candle_core::Tensor::zeros(1, f32, dev)?,
            norm: candle_core::Tensor::zeros(1, f32, dev)?,
            aux: None,
            stats: None,
        })
    }

    /// Whether batch `b` fits these buffers (same shapes, a mask iff they have one).
    fn fits(&self, b: &Batch) -> bool {
        b.inputs.dims() == self.inputs.dims()
            && b.targets.dims() == self.targets.dims()
            && match (&b.mask, &self.mask) {
                (Some(m), Some(n)) => m.dims() == n.dims() && m.dtype() == n.dtype(),
                (None, None) => true,
                _ => false,
            }
    }

    /// Write the batch and the step's hyper-parameters (outside any capture).
    fn fill(&self, b: &Batch, hp: [f32; 3]) -> Result<()> {
        self.inputs.slice_set(&b.inputs.contiguous()?, 0, 0)?;
        self.targets.slice_set(&b.targets.contiguous()?, 0, 0)?;
        if let (Some(m), Some(n)) = (&b.mask, &self.mask) {
            n.slice_set(&m.contiguous()?, 0, 0)?;
        }
        self.hp.slice_set(&candle_core::Tensor::new(&hp, self.hp.device())?, 0, 0)
    }

    /// What the step left in the buffers (a wait for the device): the loss and gradient norm, the
    /// auxiliary loss, and copies of the statistics (the buffers are overwritten by the next step).
    fn read(&self) -> Result<StepOut> {
        let loss = self.loss.to_vec1::<f32>()?[0] as f64;
        let norm = self.norm.to_vec1::<f32>()?[0];
        let aux = self.aux.as_ref().map(|a| a.to_vec1::<f32>().map(|v| v[0] as f64)).transpose()?;
        let copy = |s: &crate::mixer::Stat| -> Result<crate::mixer::Stat> {
            Ok(crate::mixer::Stat::new(s.name.clone(), s.shape, s.value.copy()?))
        };
        let stats = match &self.stats {
            Some(layers) => layers.iter().map(|l| l.iter().map(copy).collect::<Result<Vec<_>>>()).collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        Ok(StepOut { loss, norm, aux, stats })
    }
}

/// Capture what `f` launches on `dev`'s stream into a CUDA graph, with candle's upload cache on
/// (the parameter uploads `f` makes must already be in it: run `f` once under the cache first).
/// The capture records and runs nothing. On failure the capture is ended (the stream is usable
/// again), the error cudarc recorded for the frees that failed with it is cleared (it would
/// surface at the next call), and the reason comes back.
#[cfg(feature = "cuda")]
pub fn capture<E: std::fmt::Display>(
    dev: &candle_core::CudaDevice,
    f: impl FnOnce() -> std::result::Result<(), E>,
) -> std::result::Result<candle_core::cuda_backend::cudarc::driver::CudaGraph, String> {
    use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let stream = dev.cuda_stream();
    let _cache = dev.enable_cuda_graph_htod_cache();
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(|e| format!("begin capture: {e:?}"))?;
    let r = f();
    let g = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    match (r, g) {
        (Ok(()), Ok(Some(g))) => Ok(g),
        (r, g) => {
            let _ = stream.context().check_err();
            Err(match (r, g) {
                (Err(e), _) => format!("capture: {e}"),
                (_, Err(e)) => format!("end capture: {e:?}"),
                _ => "the capture recorded nothing".into(),
            })
        }
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::CudaGraph;
    use candle_core::Device;

    #[derive(Default)]
    pub enum Phase {
        /// The next step runs eagerly with the upload cache on (and sets up the buffers).
        #[default]
        Warm,
        /// The next step is captured, then launched.
        Capture,
        Replay(CudaGraph),
        Off,
    }

    #[derive(Default)]
    pub struct Inner {
        phase: Phase,
        bufs: Option<Buffers>,
    }

    fn off(phase: &mut Phase, why: impl std::fmt::Display) {
        eprintln!("zoo: CUDA graph off ({why}); training eagerly");
        *phase = Phase::Off;
    }

    impl Inner {
        pub fn step(&mut self, a: StepArgs) -> Result<Option<StepOut>> {
            let StepArgs { model, opt, vars, batch: b, lr, clip, ts } = a;
            if matches!(self.phase, Phase::Off) {
                return Ok(None);
            }
            let Device::Cuda(dev) = b.inputs.device().clone() else { return Ok(None) };
            if self.bufs.is_none() {
                self.bufs = Some(Buffers::like(b)?);
            }
            let bufs = self.bufs.as_mut().expect("made above");
            if !bufs.fits(b) {
                return Ok(None); // another shape: this step runs eagerly
            }
            bufs.fill(b, opt.next_hp(lr))?;
            match std::mem::take(&mut self.phase) {
                Phase::Warm => {
                    let mut updated = false;
                    let r = {
                        let _cache = dev.enable_cuda_graph_htod_cache();
                        body(model, opt, vars, bufs, clip, ts, &mut updated)
                    };
                    match r {
                        Ok(()) => {
                            self.phase = Phase::Capture;
                            bufs.read().map(Some)
                        }
                        // The weights moved: the eager step must not run again.
                        Err(e) if updated => Err(e),
                        Err(e) => {
                            off(&mut self.phase, e);
                            Ok(None)
                        }
                    }
                }
                Phase::Capture => {
                    let t0 = opt.t;
                    let g = match capture(&dev, || body(model, opt, vars, bufs, clip, ts, &mut false)) {
                        Ok(g) => g,
                        Err(why) => {
                            // The capture ran nothing: undo the host's count of the step.
                            opt.t = t0;
                            off(&mut self.phase, why);
                            return Ok(None);
                        }
                    };
                    if let Err(e) = g.launch() {
                        opt.t = t0;
                        let _ = dev.cuda_stream().context().check_err();
                        off(&mut self.phase, format!("graph launch: {e:?}"));
                        return Ok(None);
                    }
                    REPLAYS.fetch_add(1, Ordering::SeqCst);
                    eprintln!("zoo: training steps replay a CUDA graph from step {}", ts.step + 1);
                    let out = bufs.read()?;
                    self.phase = Phase::Replay(g);
                    Ok(Some(out))
                }
                Phase::Replay(g) => {
                    g.launch().map_err(|e| candle_core::Error::Msg(format!("CUDA graph launch: {e:?}")))?;
                    opt.advance();
                    REPLAYS.fetch_add(1, Ordering::SeqCst);
                    let out = bufs.read()?;
                    self.phase = Phase::Replay(g);
                    Ok(Some(out))
                }
                Phase::Off => Ok(None),
            }
        }
    }
}
