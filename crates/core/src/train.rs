//! The training loop: AdamW + schedule + clipping + accumulation, periodic eval, checkpoints that
//! resume bit-exactly on CPU, and a hard stop on a non-finite loss.

use crate::mixer::{Stat, StatValue};
use crate::model::Lm;
use crate::optim::{AdamW, AdamWParams, Grads, Schedule};
use crate::params::ParamStore;
use crate::rng::Rng;
use crate::spikes::SpikeDetector;
use crate::task::{EvalOut, Task};
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct TrainOpts {
    pub steps: usize,
    pub grad_accum: usize,
    pub schedule: Schedule,
    pub adamw: AdamWParams,
    pub grad_clip: Option<f64>,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: usize,
    /// Also evaluate before the first step (kept as [`TrainState::initial_val`]): the starting
    /// point of a run from pretrained weights.
    pub eval_at_start: bool,
    /// Save a checkpoint every this many steps (and at the end), if `checkpoint_dir` is set.
    pub checkpoint_every: Option<usize>,
    pub checkpoint_dir: Option<PathBuf>,
    /// Stop (as if killed) after this many steps in this invocation; for resume tests.
    pub stop_after: Option<usize>,
    /// Saved with each checkpoint (the resolved config, the tokenizer).
    pub meta: serde_json::Value,
    /// Set (to the signal number) by a SIGINT/SIGTERM handler: the loop finishes its step, writes
    /// a checkpoint and returns [`Interrupted`].
    pub stop_signal: Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
    /// Data parallelism ([`crate::dist`]): this rank's communicator. Each rank trains on its slice
    /// of every global batch; gradients, the logged loss and stop signals are reduced over ranks;
    /// only rank 0 writes checkpoints. `None`: one device, as before.
    pub comm: Option<std::sync::Arc<dyn crate::dist::Comm>>,
}

/// Training stopped on a signal after finishing a step; the checkpoint (if any) holds that step.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: usize,
    pub step: usize,
    pub checkpoint: Option<PathBuf>,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped by signal {} after step {}", self.signal, self.step)?;
        match &self.checkpoint {
            Some(p) => write!(f, "; checkpoint saved at {} (continue with --resume)", p.display()),
            None => write!(f, "; no checkpoint directory was set, progress is lost"),
        }
    }
}
impl std::error::Error for Interrupted {}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CurvePoint {
    pub step: usize,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub lr: f64,
    pub tokens_per_s: f64,
    /// Mean auxiliary loss (already weighted, included in `train_loss`) since the last point;
    /// only for models whose feed-forwards have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f64>,
    /// The feed-forwards' statistics of the last training batch before this point, per layer,
    /// reduced only to their shape; only for models that report any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Vec<BTreeMap<String, StatValue>>>,
}

/// Everything needed to continue a run exactly where it stopped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub step: usize,
    /// Data RNG: batches are drawn from it, so its state is the data position.
    pub rng: Rng,
    pub best_val: Option<f64>,
    pub curve: Vec<CurvePoint>,
    pub tokens_seen: usize,
    /// Seconds spent in training steps (evals excluded).
    pub train_seconds: f64,
    pub last_eval: Option<(f64, BTreeMap<String, f64>)>,
    /// Train loss sum, step count and seconds since the last curve point (so that a resumed run
    /// averages the same steps as an uninterrupted one).
    pub window: (f64, usize, f64),
    /// Loss-spike events of the per-step train loss ([`crate::spikes`]). (Checkpoints written before
    /// it hold `spikes` and `running_min` of the old rule: ignored on resume, and the detector starts
    /// afresh.)
    #[serde(default)]
    pub spike_detector: SpikeDetector,
    /// Sum of the auxiliary loss since the last curve point (steps counted in `window`).
    #[serde(default)]
    pub aux_window: Option<f64>,
    /// The first step's train loss: the reference of the divergence rule ([`diverged`]).
    #[serde(default)]
    pub first_loss: Option<f64>,
    /// The validation loss before the first step ([`TrainOpts::eval_at_start`]).
    #[serde(default)]
    pub initial_val: Option<f64>,
}

/// The loss-based divergence rule, checked at every eval point besides NaN/inf: a run has diverged
/// when the mean train loss since the previous eval point exceeds the first step's loss by more
/// than 50% and by at least 1 nat. (A run at learning rate 10 sits at losses of 250-860 with
/// finite numbers; a healthy run's loss falls below its first value within a few steps.)
pub fn diverged(first_loss: f64, window_mean: f64) -> bool {
    window_mean > first_loss * 1.5 && window_mean > first_loss + 1.0
}

pub struct TrainReport {
    pub state: TrainState,
    /// True when `stop_after` ended the run early.
    pub stopped_early: bool,
}

/// What the loop reports after each step (for progress bars).
pub struct Progress<'a> {
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    pub eval: Option<&'a EvalOut>,
}

/// A non-finite loss, gradient norm or parameter, or a diverged loss ([`diverged`]): training stopped, and the last good checkpoint
/// (if any) was left as it was.
#[derive(Debug)]
pub struct NonFiniteLoss {
    pub step: usize,
    /// What went non-finite, e.g. "loss became NaN".
    pub what: String,
    /// The kept checkpoint and the step it holds.
    pub checkpoint: Option<(PathBuf, usize)>,
    /// The training state when it stopped (curve, spikes), for divergence reports.
    pub state: Box<TrainState>,
}

impl std::fmt::Display for NonFiniteLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at step {}; training stopped", self.what, self.step + 1)?;
        match &self.checkpoint {
            Some((p, s)) => write!(f, "; the last good checkpoint (step {s}) is kept at {}", p.display()),
            None => write!(f, "; no good checkpoint exists yet (set train.checkpoint_every to keep one)"),
        }
    }
}
impl std::error::Error for NonFiniteLoss {}

/// Train `model` (whose parameters live in `store`) on `task`. With `resume`, continue from the
/// checkpoint in `opts.checkpoint_dir` if one exists.
pub fn train(
    model: &Lm,
    store: &ParamStore,
    task: &dyn Task,
    opts: &TrainOpts,
    seed: u64,
    resume: bool,
    on_step: &mut dyn FnMut(&Progress),
) -> Result<TrainReport> {
    let mut opt = AdamW::new(store, opts.adamw)?;
    let mut st = TrainState {
        step: 0,
        rng: Rng::new(seed).fork(7),
        best_val: None,
        curve: Vec::new(),
        tokens_seen: 0,
        train_seconds: 0.0,
        last_eval: None,
        window: (0.0, 0, 0.0),
        spike_detector: SpikeDetector::default(),
        aux_window: None,
        first_loss: None,
        initial_val: None,
    };
    // The checkpoint on disk that holds finite weights, and its step.
    let mut good_ckpt: Option<(PathBuf, usize)> = None;
    if resume {
        if let Some(dir) = &opts.checkpoint_dir {
            let multi = opts.comm.as_deref().filter(|c| c.world() > 1);
            if multi.is_none_or(|c| c.rank() == 0) {
                recover_checkpoint(dir)?;
            }
            if let Some(c) = multi {
                // A barrier: no rank reads the checkpoint before rank 0 has recovered it.
                c.all_reduce_sum(&Tensor::zeros(1, DType::F32, &candle_core::Device::Cpu)?)?;
            }
            if dir.join("state.json").exists() {
                st = load_checkpoint(dir, store, &mut opt)?;
                good_ckpt = Some((dir.clone(), st.step));
            }
        }
    }
    if opts.eval_at_start && st.step == 0 && st.initial_val.is_none() {
        st.initial_val = Some(task.evaluate(model)?.loss);
    }
    let vars: Vec<_> = opt.vars().cloned().collect();
    let _dist = crate::dist::enter(opts.comm.clone().filter(|c| c.world() > 1));
    let accum = opts.grad_accum.max(1);
    // Steps replayed from a CUDA graph (opt-in: crate::graph); None: every step eagerly.
    let multi_rank = opts.comm.as_deref().is_some_and(|c| c.world() > 1);
    let dev = vars.first().map_or(candle_core::Device::Cpu, |v| v.device().clone());
    let mut graph = crate::graph::GraphTrainer::new(&dev, accum, multi_rank);
    let step_tokens = task.batch_tokens() * accum;
    let mut steps_here = 0;
    while st.step < opts.steps {
        if opts.stop_after.is_some_and(|n| steps_here >= n) {
            return Ok(TrainReport { state: st, stopped_early: true });
        }
        let lr = opts.schedule.at(st.step);
        let t0 = Instant::now();
        let mut grads = Grads::default();
        let mut loss_acc: Option<Tensor> = None;
        let mut aux_acc: Option<f64> = None;
        let mut aux_parts: Vec<Tensor> = Vec::new();
        let mut stats = Vec::new();
        // The graph path (one micro-batch, one rank): the step's loss and gradient norm, or
        // None when this step runs eagerly (on the same batch: the data order does not change).
        let mut graph_batch = None;
        let mut graph_out = None;
        if let Some(g) = graph.as_mut() {
            let b = task.train_batch(&mut st.rng)?;
            let ts = crate::state::TrainStep { step: st.step, total: opts.steps, micro: 0, seed };
            let args = crate::graph::StepArgs { model, opt: &mut opt, vars: &vars, batch: &b, lr, clip: opts.grad_clip, ts };
            graph_out = g.step(args)?;
            graph_batch = Some(b);
        }
        // Eagerly unless the graph path ran the step.
        let micro_batches = if graph_out.is_some() { 0 } else { accum };
        for micro in 0..micro_batches {
            let b = match graph_batch.take() {
                Some(b) => b,
                None => task.train_batch(&mut st.rng)?,
            };
            // Data parallelism: every rank drew the same global batch; keep this rank's rows.
            let b = match &opts.comm {
                Some(c) => {
                    let (at, len) = crate::dist::rank_rows(b.inputs.dim(0)?, c.rank(), c.world())?;
                    let rows = |t: &Tensor| t.narrow(0, at, len);
                    crate::data::Batch { inputs: rows(&b.inputs)?, targets: rows(&b.targets)?, mask: b.mask.as_ref().map(rows).transpose()? }
                }
                None => b,
            };
            let out = {
                let _g = crate::state::enter_train_step(crate::state::TrainStep { step: st.step, total: opts.steps, micro, seed });
                model.loss(&b.inputs, &b.targets, b.mask.as_ref())?
            };
            let mut loss = out.loss;
            if let (Some(c), Some(m)) = (opts.comm.as_deref().filter(|c| c.world() > 1), &b.mask) {
                // Weight this rank's mean by its share of the counted tokens: the ranks' mean
                // gradient is then the global batch's. (Without a mask every rank counts the
                // same number of tokens: weight 1.)
                let counted = m.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
                let w = crate::dist::token_weight(c, counted)?;
                if w != 1.0 {
                    loss = (loss * w)?;
                }
            }
            if let Some(a) = out.aux_loss {
                let a = a.to_dtype(DType::F32)?;
                // Read after the step's backward is queued (below), not here: reading it now would
                // make the host wait for the forward before it could launch the backward.
                aux_parts.push(a.detach());
                loss = (loss + a)?;
            }
            stats = out.stats;
            let loss = (loss / accum as f64)?;
            grads.accumulate(&loss.backward()?, vars.iter(), 1.0)?;
            loss_acc = Some(match loss_acc {
                Some(l) => (l + loss)?,
                None => loss,
            });
        }
        let (mut loss, graph_norm) = match (graph_out, loss_acc) {
            (Some(g), _) => {
                aux_acc = g.aux;
                stats = g.stats;
                (g.loss, Some(g.norm))
            }
            (None, l) => (l.expect("accum >= 1").to_dtype(DType::F64)?.to_scalar::<f64>()?, None),
        };
        for a in aux_parts {
            *aux_acc.get_or_insert(0.0) += a.to_dtype(DType::F64)?.to_scalar::<f64>()? / accum as f64;
        }
        // Data parallelism: mean the gradients over ranks; agree on the logged loss (the global
        // batch's) and on whether any rank was asked to stop, so that every rank takes the same
        // branches below.
        let mut any_signal = 0usize;
        if let Some(c) = opts.comm.as_deref().filter(|c| c.world() > 1) {
            grads.all_reduce_mean(c, vars.iter())?;
            let sig = opts.stop_signal.as_ref().map_or(0, |f| f.load(std::sync::atomic::Ordering::SeqCst));
            let r = c.all_reduce_sum(&Tensor::new(&[loss as f32, sig as f32], &candle_core::Device::Cpu)?)?.to_vec1::<f32>()?;
            loss = r[0] as f64 / c.world() as f64;
            any_signal = r[1] as usize;
        }
        let stop = |what: String| NonFiniteLoss {
            step: st.step,
            what,
            checkpoint: good_ckpt.clone(),
            state: Box::new(st.clone()),
        };
        if !loss.is_finite() {
            return Err(stop(format!("loss became {loss}")).into());
        }
        // Clip + update (done already on the graph path); with a non-finite norm nothing is
        // updated and the run stops here.
        let norm = match graph_norm {
            Some(n) => Some(n),
            None => opt.step_clipped(&mut grads, opts.grad_clip, lr)?.map(|n| n.to_scalar::<f32>()).transpose()?,
        };
        if let Some(n) = norm {
            if !n.is_finite() {
                return Err(stop(format!("gradient norm became {n}")).into());
            }
        }
        st.spike_detector.observe(st.step + 1, loss);
        model.after_step()?;
        if let Some(a) = aux_acc {
            *st.aux_window.get_or_insert(0.0) += a;
        }
        st.step += 1;
        steps_here += 1;
        let dt = t0.elapsed().as_secs_f64();
        st.train_seconds += dt;
        st.tokens_seen += step_tokens;
        st.window.0 += loss;
        st.window.1 += 1;
        st.window.2 += dt;
        let tps = step_tokens as f64 / dt.max(1e-9);
        let last = st.step == opts.steps;
        st.first_loss.get_or_insert(loss);
        let eval = if st.step % opts.eval_every.max(1) == 0 || last {
            let window_mean = st.window.0 / st.window.1 as f64;
            if let Some(first) = st.first_loss.filter(|&f| diverged(f, window_mean)) {
                let from = st.step + 1 - st.window.1;
                return Err(NonFiniteLoss {
                    step: st.step - 1,
                    what: format!(
                        "loss diverged: mean train loss {window_mean:.4} over steps {from}-{} exceeds the first step's {first:.4} by more than 50% and 1 nat",
                        st.step
                    ),
                    checkpoint: good_ckpt,
                    state: Box::new(st.clone()),
                }
                .into());
            }
            let e = task.evaluate(model)?;
            st.best_val = Some(st.best_val.map_or(e.loss, |b: f64| b.min(e.loss)));
            st.curve.push(CurvePoint {
                step: st.step,
                train_loss: st.window.0 / st.window.1 as f64,
                val_loss: Some(e.loss),
                lr,
                tokens_per_s: (st.window.1 * step_tokens) as f64 / st.window.2.max(1e-9),
                aux_loss: st.aux_window.map(|a| a / st.window.1 as f64),
                stats: reduce_stats(&stats)?,
            });
            st.window = (0.0, 0, 0.0);
            st.aux_window = None;
            st.last_eval = Some((e.loss, e.metrics.clone()));
            Some(e)
        } else {
            None
        };
        on_step(&Progress { step: st.step, steps: opts.steps, loss, lr, tokens_per_s: tps, eval: eval.as_ref() });
        let writer = opts.comm.as_ref().is_none_or(|c| c.rank() == 0);
        if let Some(dir) = &opts.checkpoint_dir {
            if last || opts.checkpoint_every.is_some_and(|n| st.step % n == 0) {
                // Never replace a good checkpoint with non-finite weights. (Every rank checks its
                // weights, which are the same on every rank, so all stop here together.)
                if let Some(name) = first_non_finite(store)? {
                    return Err(NonFiniteLoss {
                        step: st.step - 1,
                        what: format!("parameter `{name}` became non-finite"),
                        checkpoint: good_ckpt,
                        state: Box::new(st.clone()),
                    }
                    .into());
                }
                if writer {
                    save_checkpoint(dir, store, &opt, &st, &opts.meta)?;
                }
                good_ckpt = Some((dir.clone(), st.step));
            }
        }
        let local = opts.stop_signal.as_ref().map_or(0, |f| f.load(std::sync::atomic::Ordering::SeqCst));
        // With several ranks only the signal state they agreed on counts (a signal arriving since
        // then waits for the next step on every rank alike).
        let signal = match opts.comm.as_deref().filter(|c| c.world() > 1) {
            Some(_) if any_signal == 0 => 0,
            Some(_) if local == 0 => 15, // another rank was stopped
            _ => local,
        };
        if signal != 0 && st.step < opts.steps {
            let mut checkpoint = None;
            if let Some(dir) = &opts.checkpoint_dir {
                if writer && good_ckpt.as_ref().is_none_or(|(_, s)| *s != st.step) && first_non_finite(store)?.is_none() {
                    save_checkpoint(dir, store, &opt, &st, &opts.meta)?;
                }
                checkpoint = Some(dir.clone());
            }
            return Err(Interrupted { signal, step: st.step, checkpoint }.into());
        }
    }
    Ok(TrainReport { state: st, stopped_early: false })
}

/// Per-layer statistics reduced to their shapes; `None` when no layer reports any.
fn reduce_stats(stats: &[Vec<Stat>]) -> Result<Option<Vec<BTreeMap<String, StatValue>>>> {
    if stats.iter().all(|l| l.is_empty()) {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(stats.len());
    for layer in stats {
        let mut m = BTreeMap::new();
        for s in layer {
            m.insert(s.name.clone(), s.reduce()?);
        }
        out.push(m);
    }
    Ok(Some(out))
}

/// The first parameter (by name) holding a NaN or infinity.
pub fn first_non_finite(store: &ParamStore) -> Result<Option<String>> {
    for (name, p) in store.params() {
        let s = p.var.as_tensor().abs()?.max_keepdim(candle_core::D::Minus1)?.flatten_all()?.max(0)?;
        if !s.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_finite() {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

fn to_hash(m: BTreeMap<String, Tensor>) -> HashMap<String, Tensor> {
    m.into_iter().collect()
}

/// The marker file that makes a checkpoint folder complete.
pub const COMPLETE: &str = "COMPLETE";

fn complete(dir: &Path) -> bool {
    dir.join(COMPLETE).is_file()
}

/// Bring a checkpoint folder back to a complete state after a kill at any point of
/// [`save_checkpoint`]: `dir` complete (or from before the marker existed: `state.json` present
/// and no save in flight) is kept; else a complete `dir.tmp` (killed between the renames) or a
/// complete `dir.old` (killed before the new one was complete) takes its place. Returns what was
/// done, if anything.
pub fn recover_checkpoint(dir: &Path) -> Result<Option<String>> {
    let (tmp, old) = (dir.with_extension("tmp"), dir.with_extension("old"));
    let legacy = dir.join("state.json").is_file() && !tmp.exists() && !old.exists();
    if complete(dir) || legacy {
        return Ok(None);
    }
    for (src, what) in [(&tmp, "the checkpoint being saved when the run was killed"), (&old, "the previous checkpoint")]
    {
        if complete(src) {
            if dir.exists() {
                std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
            }
            std::fs::rename(src, dir).with_context(|| format!("renaming {} to {}", src.display(), dir.display()))?;
            return Ok(Some(format!("recovered {what} into {}", dir.display())));
        }
    }
    if dir.exists() && !dir.join("state.json").is_file() {
        anyhow::bail!(
            "checkpoint {}: incomplete (no state.json) and no complete .tmp or .old beside it",
            dir.display()
        );
    }
    Ok(None)
}

/// The step a complete checkpoint holds, if there is one.
pub fn checkpoint_step(dir: &Path) -> Option<usize> {
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("state.json")).ok()?).ok()?;
    state["train"]["step"].as_u64().map(|s| s as usize)
}

/// Write `model.safetensors`, `optim.safetensors`, `state.json`, `meta.json` and last the
/// [`COMPLETE`] marker into a temporary folder, then swap it into place: a kill at any point
/// leaves a complete checkpoint that [`recover_checkpoint`] finds.
pub fn save_checkpoint(
    dir: &Path,
    store: &ParamStore,
    opt: &AdamW,
    st: &TrainState,
    meta: &serde_json::Value,
) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    candle_core::safetensors::save(&to_hash(store.tensors()), tmp.join("model.safetensors"))?;
    candle_core::safetensors::save(&to_hash(opt.state_tensors()), tmp.join("optim.safetensors"))?;
    let state = serde_json::json!({ "train": st, "optimizer_t": opt.t, "adamw": opt.params });
    std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(&state)?)?;
    std::fs::write(tmp.join("meta.json"), serde_json::to_vec_pretty(meta)?)?;
    // The commit point: a checkpoint folder is complete iff it holds this marker, written last.
    std::fs::write(tmp.join(COMPLETE), format!("{}\n", st.step))?;
    let old = dir.with_extension("old");
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&tmp, dir)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// Load model weights (only) from a checkpoint folder into `store`.
pub fn load_weights(dir: &Path, store: &ParamStore) -> Result<()> {
    let path = dir.join("model.safetensors");
    let t =
        candle_core::safetensors::load(&path, store.device()).with_context(|| format!("reading {}", path.display()))?;
    store.load(&t.into_iter().collect())
}

fn load_checkpoint(dir: &Path, store: &ParamStore, opt: &mut AdamW) -> Result<TrainState> {
    load_weights(dir, store)?;
    let optim = dir.join("optim.safetensors");
    let o = candle_core::safetensors::load(&optim, store.device())
        .with_context(|| format!("reading {}", optim.display()))?;
    let sp = dir.join("state.json");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sp).with_context(|| format!("reading {}", sp.display()))?)
            .with_context(|| format!("parsing {}", sp.display()))?;
    let t = state["optimizer_t"].as_u64().with_context(|| format!("{}: optimizer_t", sp.display()))? as usize;
    opt.load_state(&o, t).with_context(|| format!("loading {}", optim.display()))?;
    serde_json::from_value(state["train"].clone()).with_context(|| format!("{}: train state", sp.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint's state.json from before the robust spike detector (`spikes` as a count,
    /// `running_min`) still resumes; its detector starts afresh.
    #[test]
    fn old_train_state_still_loads() {
        let old = r#"{"step": 7, "rng": {"state": 1}, "best_val": 1.5, "curve": [], "tokens_seen": 70,
            "train_seconds": 1.0, "last_eval": null, "window": [2.0, 1, 0.1], "spikes": 3, "running_min": 1.2}"#;
        let st: TrainState = serde_json::from_str(old).unwrap();
        assert_eq!(st.step, 7);
        assert_eq!(st.spike_detector, SpikeDetector::default());
    }
}
