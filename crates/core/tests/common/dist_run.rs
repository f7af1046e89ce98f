//! The data-parallel tests' training run (crates/core/tests/dist.rs on CPU threads,
//! crates/core/tests/nccl.rs on the GPU): a tiny attention LM on MQAR through the real loop.

#![allow(dead_code)]

use std::sync::Arc;
use zoo_core::attention::{Attention, AttentionConfig};
use zoo_core::candle_core::{DType, Device};
use zoo_core::data::MqarSegment;
use zoo_core::dist::Comm;
use zoo_core::mixer::{examples_from_toml, FeedForward, Mixer};
use zoo_core::model::{Lm, LmShape};
use zoo_core::optim::{AdamWParams, Schedule};
use zoo_core::params::ParamStore;
use zoo_core::task::MqarTask;
use zoo_core::train::{train, TrainOpts};

pub const STEPS: usize = 4;

/// Parameters by name (sorted) and the logged train losses.
pub type Outcome = (Vec<(String, Vec<f32>)>, Vec<f64>);

/// Train a tiny attention LM on MQAR (global batch 8, accumulation 2) with `comm`; return its
/// parameters by name and the logged train losses.
pub fn run(comm: Option<Arc<dyn Comm>>) -> anyhow::Result<Outcome> {
    run_with(comm, None)
}

/// [`run`] with a checkpoint folder, saving every 2 steps: `(dir, stop_after, resume)`.
pub fn run_with(
    comm: Option<Arc<dyn Comm>>,
    ckpt: Option<(&std::path::Path, Option<usize>, bool)>,
) -> anyhow::Result<Outcome> {
    run_on(&Device::Cpu, comm, ckpt)
}

/// [`run_with`] on a device.
pub fn run_on(
    dev: &Device,
    comm: Option<Arc<dyn Comm>>,
    ckpt: Option<(&std::path::Path, Option<usize>, bool)>,
) -> anyhow::Result<Outcome> {
    run_accum(dev, comm, ckpt, 2)
}

/// [`run_on`] with `accum` micro-batches per step (global batch 8 · accum / 2).
pub fn run_accum(
    dev: &Device,
    comm: Option<Arc<dyn Comm>>,
    ckpt: Option<(&std::path::Path, Option<usize>, bool)>,
    accum: usize,
) -> anyhow::Result<Outcome> {
    run_dtype(dev, comm, ckpt, accum, DType::F32)
}

/// [`run_accum`] with activations in `dtype`; for 16-bit runs the model is wide enough (d 64, head
/// dim 32) for the attention kernels, cuDNN's where the build has it (at head dim 8 or 16 the
/// composition runs).
pub fn run_dtype(
    dev: &Device,
    comm: Option<Arc<dyn Comm>>,
    ckpt: Option<(&std::path::Path, Option<usize>, bool)>,
    accum: usize,
    dtype: DType,
) -> anyhow::Result<Outcome> {
    let dev = dev.clone();
    let store = ParamStore::new(3, DType::F32, &dev);
    let d_model = if dtype == DType::F32 { 16 } else { 64 };
    let shape =
        LmShape { vocab_size: 32, d_model, n_layers: 2, tie_embeddings: true, norm_eps: 1e-5, max_seq_len: 32 };
    let attn: AttentionConfig = examples_from_toml(&["n_heads = 2"]).remove(0);
    let model = Lm::new(&shape, dtype, &store.root(), |ctx, pb| {
        let m: Box<dyn Mixer> = Box::new(Attention::new(&attn, ctx, &pb.pp("mixer"))?);
        Ok((m, None::<Box<dyn FeedForward>>))
    })?;
    // Segments of two lengths and pair counts: the ranks' slices count different numbers of
    // answer tokens in some batches.
    let seg = [
        MqarSegment { seq_len: 32, kv_pairs: 4, examples: 64 },
        MqarSegment { seq_len: 32, kv_pairs: 2, examples: 64 },
    ];
    let task = MqarTask::new(32, &seg, &seg, 8, 0, &dev)?;
    let opts = TrainOpts {
        steps: STEPS,
        grad_accum: accum,
        schedule: Schedule { lr: 3e-3, min_lr: 3e-4, warmup_steps: 1, decay_steps: STEPS },
        adamw: AdamWParams { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, decay_embeddings: false },
        grad_clip: Some(0.5),
        eval_every: 2,
        eval_at_start: false,
        checkpoint_every: ckpt.map(|_| 2),
        checkpoint_dir: ckpt.map(|c| c.0.to_path_buf()),
        stop_after: ckpt.and_then(|c| c.1),
        meta: serde_json::Value::Null,
        stop_signal: None,
        comm,
    };
    let mut losses = vec![];
    train(&model, &store, &task, &opts, 0, ckpt.is_some_and(|c| c.2), &mut |p| losses.push(p.loss))?;
    let mut params = vec![];
    for (name, t) in store.tensors() {
        params.push((name.clone(), t.flatten_all()?.to_vec1::<f32>()?));
    }
    params.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((params, losses))
}

/// The largest difference between two runs' parameters (matched by name), and the largest
/// magnitude of `b`'s: (max |a - b|, max |b|).
pub fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> (f32, f32) {
    let (mut d, mut scale) = (0f32, 0f32);
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            d = d.max((x - y).abs());
            scale = scale.max(y.abs());
        }
    }
    (d, scale)
}
