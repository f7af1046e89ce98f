//! Config → model + task → training → result JSON.

use crate::config::{DataConfig, PlannedRun, RunConfig, TokenizerConfig};
use crate::env::{self, Env};
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use zoo_core::data::{TextData, Tokenizer, TokenizerSpec};
use zoo_core::mixer::BuildCtx;
use zoo_core::model::{Lm, LmShape};
use zoo_core::optim::{AdamWParams, Schedule};
use zoo_core::params::{Group, ParamStore};
use zoo_core::task::{MqarTask, Task, TextTask};
use zoo_core::train::{train, TrainOpts};

/// Build the model a config describes, with weights initialised from `seed`.
pub fn build_model(cfg: &RunConfig, vocab: usize, env: &Env) -> Result<(Lm, ParamStore)> {
    let shape = LmShape {
        vocab_size: cfg.model.vocab_size.unwrap_or(vocab),
        d_model: cfg.model.d_model,
        n_layers: cfg.model.n_layers,
        tie_embeddings: cfg.model.tie_embeddings,
        norm_eps: cfg.model.norm_eps,
        max_seq_len: cfg.max_seq_len(),
    };
    let Some(init) = &cfg.init else {
        return build_lm(&shape, &cfg.layer_mixers()?, &cfg.model.ffn, cfg.seed, env);
    };
    // The pretrained weights, as the store's parameters are created; parameters the checkpoint
    // lacks (from the layer overrides, already in the resolved mixers) start from their fresh
    // initialisation with `seed`. The checkpoint alone is loaded: the overrides' variant model
    // would be built here only to be built again.
    let p = crate::pretrained::load_with(&init.pretrained, env, crate::pretrained::LoadOpts::default())?;
    let store = ParamStore::preset_extending(p.store.tensors(), cfg.seed, zoo_core::candle_core::DType::F32, &env.device);
    drop(p);
    let model = build_lm_in(&store, &shape, &cfg.layer_mixers()?, &cfg.model.ffn, env)
        .and_then(|m| store.finish_preset().map(|_| m))
        .with_context(|| format!("model.pretrained: {}: the weights do not fit the model section", init.pretrained.display()))?;
    Ok((model, store))
}

/// Build a model of this shape from one mixer config per layer and the feed-forward config.
pub fn build_lm(
    shape: &LmShape,
    mixers: &[crate::registry::MixerConfig],
    ffn: &crate::registry::FfnConfig,
    seed: u64,
    env: &Env,
) -> Result<(Lm, ParamStore)> {
    let store = ParamStore::new(seed, zoo_core::candle_core::DType::F32, &env.device);
    Ok((build_lm_in(&store, shape, mixers, ffn, env)?, store))
}

/// [`build_lm`] into an existing store (e.g. a [`ParamStore::preset`] of loaded weights).
pub fn build_lm_in(
    store: &ParamStore,
    shape: &LmShape,
    mixers: &[crate::registry::MixerConfig],
    ffn: &crate::registry::FfnConfig,
    env: &Env,
) -> Result<Lm> {
    let kinds = crate::registry::kind_positions(mixers);
    let model = Lm::new(shape, env.dtype, &store.root(), |ctx, pb| {
        let ctx = BuildCtx { kind_layer: kinds[ctx.layer].0, kind_layers: kinds[ctx.layer].1, ..*ctx };
        Ok((
            zoo_core::mixer::MixerSpec::build(&mixers[ctx.layer], &ctx, &pb.pp("mixer"))?,
            zoo_core::mixer::FfnSpec::build(ffn, &ctx, &pb.pp("ffn"))?,
        ))
    })?;
    Ok(model)
}

/// Read and tokenise a text corpus as the config says (`init`: the pretrained source, whose
/// tokenizer `TokenizerConfig::Model` names).
pub fn load_text(paths: &[PathBuf], tok: &TokenizerConfig, init: Option<&crate::pretrained::PretrainedSource>) -> Result<(String, Tokenizer)> {
    let mut text = String::new();
    for p in paths {
        text.push_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?);
    }
    let tokenizer = match tok {
        TokenizerConfig::Bytes => Tokenizer::bytes(),
        TokenizerConfig::Chars => Tokenizer::chars_from(&text),
        TokenizerConfig::Hf { path } => Tokenizer::hf(path)?,
        TokenizerConfig::Model => {
            let src = init.context("data.tokenizer: `model` needs `[model] pretrained = ...`")?;
            crate::pretrained::model_tokenizer(&src.pretrained)?
        }
    };
    Ok((text, tokenizer))
}

/// The task and its vocabulary size (and tokenizer, for text).
pub fn build_task(cfg: &RunConfig, env: &Env) -> Result<(Box<dyn Task>, usize, Option<TokenizerSpec>)> {
    match &cfg.data {
        DataConfig::Mqar { vocab_size, train, test } => {
            let task = MqarTask::new(*vocab_size, train, test, cfg.train.batch_size, cfg.seed, &env.device)?;
            Ok((Box::new(task), *vocab_size, None))
        }
        DataConfig::Text { paths, tokenizer, val_fraction } => {
            let (text, tok) = load_text(paths, tokenizer, cfg.init.as_ref())?;
            if let Some(v) = cfg.model.vocab_size.filter(|&v| v < tok.vocab_size()) {
                anyhow::bail!("model.vocab_size: {v} is smaller than the tokenizer's {} tokens", tok.vocab_size());
            }
            let ids = tok.encode(&text)?;
            let data = TextData::new(ids, *val_fraction, &tok)?;
            let task = TextTask {
                data,
                batch_size: cfg.train.batch_size,
                seq_len: cfg.train.seq_len.expect("validated"),
                eval_batches: cfg.train.eval_batches,
                device: env.device.clone(),
                report_bpb: true,
            };
            Ok((Box::new(task), cfg.model.vocab_size.unwrap_or(tok.vocab_size()), Some(tok.spec())))
        }
    }
}

pub struct RunOpts {
    pub results_dir: PathBuf,
    pub runs_dir: PathBuf,
    pub resume: bool,
    /// Start over even where a checkpoint of this run exists (it is deleted).
    pub force: bool,
    pub quiet: bool,
    /// Testing aid: stop after this many steps, as if killed.
    pub stop_after: Option<usize>,
    /// Data parallelism: this rank's communicator (`zoo launch`). Only rank 0 takes the run's
    /// lock, shows progress and writes the result and checkpoints.
    pub comm: Option<Arc<dyn zoo_core::dist::Comm>>,
}

impl RunOpts {
    /// Whether this process writes results (one device, or rank 0).
    pub fn writer(&self) -> bool {
        self.comm.as_ref().is_none_or(|c| c.rank() == 0)
    }
}

pub fn result_path(results_dir: &Path, run: &PlannedRun) -> PathBuf {
    results_dir.join(&run.config.experiment).join(format!("{}.json", run.id))
}

pub fn checkpoint_dir(runs_dir: &Path, run: &PlannedRun) -> PathBuf {
    runs_dir.join(&run.config.experiment).join(&run.id).join("checkpoint")
}

/// A per-run lock file beside the checkpoint (`lock`, holding the pid): two processes never
/// train one run. A lock left by a process that no longer exists is taken over. Removed on drop.
pub struct RunLock {
    path: PathBuf,
}

impl RunLock {
    pub fn acquire(ckpt: &Path, run_id: &str) -> Result<Self> {
        let dir = ckpt.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("lock");
        let me = std::process::id();
        // The pid is written to a private file first and hard-linked into place, which fails if a
        // lock exists: a lock file is never seen half-written.
        let mine = dir.join(format!("lock.{me}"));
        std::fs::write(&mine, me.to_string()).with_context(|| format!("writing {}", mine.display()))?;
        let result = (|| -> Result<Self> {
            for _ in 0..2 {
                match std::fs::hard_link(&mine, &path) {
                    Ok(()) => return Ok(Self { path: path.clone() }),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let holder = std::fs::read_to_string(&path).unwrap_or_default();
                        let alive =
                            holder.trim().parse::<u32>().is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists());
                        if alive {
                            return Err(RunLocked {
                                run_id: run_id.into(),
                                pid: holder.trim().into(),
                                lock: path.clone(),
                            }
                            .into());
                        }
                        // Stale (its process is gone): take it over.
                        let _ = std::fs::remove_file(&path);
                    }
                    Err(e) => return Err(e).with_context(|| format!("creating lock {}", path.display())),
                }
            }
            anyhow::bail!("run `{run_id}`: could not take the lock {}", path.display())
        })();
        let _ = std::fs::remove_file(&mine);
        result
    }
}

/// Another live process holds the run's lock: the sweep skips the run (it is not a failure).
#[derive(Debug)]
pub struct RunLocked {
    pub run_id: String,
    pub pid: String,
    pub lock: PathBuf,
}

impl std::fmt::Display for RunLocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.lock.as_os_str().is_empty() {
            return write!(f, "run `{}`: {} finished it meanwhile", self.run_id, self.pid);
        }
        write!(
            f,
            "run `{}`: process {} is training it (lock {}); delete the lock if that process is gone",
            self.run_id,
            self.pid,
            self.lock.display()
        )
    }
}
impl std::error::Error for RunLocked {}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Before training: recover an interrupted checkpoint save; with `--resume`, refuse a checkpoint
/// made from another config (naming the first differing field); without it, refuse to overwrite
/// this run's saved progress unless `--force` (which deletes it). A checkpoint from another config
/// is replaced when the new run saves its first one.
fn check_checkpoint(run: &PlannedRun, ckpt: &Path, resolved: &serde_json::Value, opts: &RunOpts) -> Result<()> {
    if let Some(note) = zoo_core::train::recover_checkpoint(ckpt)? {
        eprintln!("run `{}`: {note}", run.id);
    }
    let Some(step) = zoo_core::train::checkpoint_step(ckpt) else { return Ok(()) };
    let meta_path = ckpt.join("meta.json");
    let meta: serde_json::Value = std::fs::read(&meta_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .with_context(|| format!("reading {}", meta_path.display()))?;
    let same = meta["config"] == *resolved;
    match (opts.resume, same, opts.force) {
        (true, false, _) => anyhow::bail!(
            "run `{}`: --resume: the checkpoint {} was made from a different config (differs at {}); \
             rerun without --resume to start over",
            run.id,
            ckpt.display(),
            first_difference(&meta["config"], resolved, "")
        ),
        (false, true, false) if step > 0 => anyhow::bail!(
            "run `{}`: a checkpoint at step {step} exists ({}); --resume continues it, --force starts over and deletes it",
            run.id,
            ckpt.display()
        ),
        (false, _, true) => {
            std::fs::remove_dir_all(ckpt).with_context(|| format!("removing {}", ckpt.display()))?;
            Ok(())
        }
        _ => Ok(()),
    }
}

/// What is at a run's result path.
#[derive(Debug, PartialEq)]
pub enum Existing {
    Missing,
    /// Readable, and made from this run's resolved config.
    Valid,
    /// Present but not to be trusted, and why (unreadable, truncated, another experiment or run, or
    /// a different config).
    Stale(String),
}

/// Check a run's existing result file against the run: results are keyed by content (the resolved
/// config), not only by their file name.
pub fn existing_result(run: &PlannedRun, path: &Path) -> Existing {
    let Ok(bytes) = std::fs::read(path) else {
        return if path.exists() { Existing::Stale("unreadable".into()) } else { Existing::Missing };
    };
    let v: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return Existing::Stale(format!("not valid JSON: {e}")),
    };
    let r = match crate::schema::parse_run(v, path) {
        Ok(r) => r,
        Err(e) => return Existing::Stale(format!("{e:#}")),
    };
    if r.experiment != run.config.experiment || r.run_id != run.id {
        return Existing::Stale(format!("it belongs to experiment `{}`, run `{}`", r.experiment, r.run_id));
    }
    match serde_json::to_value(&run.config) {
        Ok(c) if c == r.config => Existing::Valid,
        Ok(c) => Existing::Stale(format!(
            "made from a different config (differs at {})",
            first_difference(&r.config, &c, "")
        )),
        Err(e) => Existing::Stale(e.to_string()),
    }
}

/// The dotted path of the first field where two JSON values differ.
pub fn first_difference(a: &serde_json::Value, b: &serde_json::Value, at: &str) -> String {
    use serde_json::Value::Object;
    match (a, b) {
        (Object(x), Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) if p == q => {}
                    (Some(p), Some(q)) => return first_difference(p, q, &path),
                    _ => return path,
                }
            }
            at.to_string()
        }
        _ => at.to_string(),
    }
}

/// Train one planned run and write its result JSON. Returns the result (None if stopped early).
pub fn run_one(run: &PlannedRun, env: &Env, opts: &RunOpts) -> Result<Option<serde_json::Value>> {
    let cfg = &run.config;
    let started = env::now_rfc3339();
    let t0 = Instant::now();
    // Training steps launched from a CUDA graph by this run (the counter is the process's).
    let graph_launches0 = zoo_core::graph::launches();
    // Before any allocation: the run must fit the device (MQAR's data is bounded by validation).
    cfg.footprint(crate::vocab_size(cfg)?).check(env.memory_limit(), &format!("run `{}`", run.id))?;
    let (task, vocab, tok) = build_task(cfg, env)?;
    let (model, store) = build_model(cfg, vocab, env)?;
    let t = &cfg.train;
    let ckpt = checkpoint_dir(&opts.runs_dir, run);
    let resolved = serde_json::to_value(cfg)?;
    let _lock = if opts.writer() { Some(RunLock::acquire(&ckpt, &run.id)?) } else { None };
    // Another process may have finished it between our check and the lock.
    if opts.writer() && !opts.force && existing_result(run, &result_path(&opts.results_dir, run)) == Existing::Valid {
        return Err(RunLocked { run_id: run.id.clone(), pid: "another process".into(), lock: PathBuf::new() }.into());
    }
    if opts.writer() {
        check_checkpoint(run, &ckpt, &resolved, opts)?;
    }
    let meta = json!({ "config": resolved, "tokenizer": tok, "vocab_size": vocab, "run_id": run.id });
    let mut train_opts = train_opts(t, ckpt.clone(), opts.stop_after, meta);
    train_opts.comm = opts.comm.clone();
    // A run from pretrained weights records where it starts (`val_loss,initial`).
    train_opts.eval_at_start = cfg.init.is_some();
    let pb = progress_bar(run, opts.quiet || !opts.writer());
    let mut last_val = f64::NAN;
    let report = train(&model, &store, task.as_ref(), &train_opts, cfg.seed, opts.resume, &mut |p| {
        if let Some(e) = p.eval {
            last_val = e.loss;
        }
        pb.set_position(p.step as u64);
        pb.set_message(format!("loss {:.4} val {:.4} lr {:.2e} {:.0} tok/s", p.loss, last_val, p.lr, p.tokens_per_s));
    });
    pb.finish_and_clear();
    let (st, diverged) = match report {
        Ok(r) if r.stopped_early => return Ok(None),
        Ok(r) => (r.state, None),
        Err(e) => match e.downcast::<zoo_core::train::NonFiniteLoss>() {
            Ok(nf) if t.record_divergence => {
                let msg = nf.to_string();
                (*nf.state, Some((nf.step + 1, msg)))
            }
            Ok(nf) => return Err(anyhow::Error::new(nf).context(format!("run `{}`", run.id))),
            Err(e) => return Err(e.context(format!("run `{}`", run.id))),
        },
    };
    let metrics = metrics_of(&st, diverged.as_ref());
    // Probes only on a healthy model.
    let probes = match diverged {
        None => Some(zoo_core::probe::probe(&model, &task.probe_batch()?.inputs)?),
        Some(_) => None,
    };
    let total = store.num_params();
    let emb = store.num_params_in(Group::Embedding);
    if !opts.writer() {
        return Ok(None);
    }
    let mut device: crate::schema::DeviceRecord = serde_json::from_value(env.describe())?;
    device.world_size = opts.comm.as_ref().map(|c| c.world() as u64).filter(|&n| n > 1);
    if env.device.is_cuda() && zoo_core::graph::enabled() {
        // `cuda_graph` says the graph path was asked for; this says whether it ran: a capture that
        // failed trains eagerly (steps since a resume, for a resumed run).
        let n = zoo_core::graph::launches() - graph_launches0;
        device.extra.insert("cuda_graph_steps".into(), serde_json::json!(n));
    }
    let result = crate::schema::RunResult {
        schema: crate::schema::RESULT_SCHEMA.into(),
        run_id: run.id.clone(),
        plan_index: run.index as u64,
        experiment: cfg.experiment.clone(),
        variant: run.variant.clone(),
        label: run.label.clone(),
        overrides: serde_json::to_value(&run.overrides)?,
        seed: cfg.seed,
        lr: cfg.train.lr,
        config: resolved.clone(),
        layers: model.describe(),
        env: crate::schema::EnvRecord {
            git: env::git_state(),
            versions: serde_json::from_value(env::versions())?,
            device,
            dtype: env.dtype_name().into(),
        },
        params: crate::schema::Params { total: total as u64, non_embedding: (total - emb) as u64 },
        // Recurrent state / KV cache of one sequence at length T, all layers (Zoology's state axis).
        state_bytes: cfg
            .state_report_lens()
            .into_iter()
            .map(|t| (t.to_string(), model.cache_bytes(1, t) as u64))
            .collect(),
        metrics,
        probes,
        divergence: diverged.as_ref().map(|(_, m)| m.clone()),
        curve: st.curve,
        throughput: crate::schema::Throughput {
            train_tokens_per_s: st.tokens_seen as f64 / st.train_seconds.max(1e-9),
            tokens_seen: st.tokens_seen as u64,
            train_seconds: st.train_seconds,
        },
        wall_time_s: t0.elapsed().as_secs_f64(),
        started_at: started,
        finished_at: env::now_rfc3339(),
    };
    let result = result.to_json()?;
    env::write_atomic(&result_path(&opts.results_dir, run), &serde_json::to_vec_pretty(&result)?)?;
    Ok(Some(result))
}

/// The training options a run's `[train]` section asks for.
fn train_opts(
    t: &crate::config::TrainConfig,
    ckpt: PathBuf,
    stop_after: Option<usize>,
    meta: serde_json::Value,
) -> TrainOpts {
    TrainOpts {
        steps: t.steps,
        grad_accum: t.grad_accum,
        schedule: Schedule {
            lr: t.lr,
            min_lr: t.min_lr.unwrap_or(t.lr / 10.0),
            warmup_steps: t.warmup_steps,
            decay_steps: t.decay_steps.unwrap_or(t.steps),
        },
        adamw: AdamWParams {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: 1e-8,
            weight_decay: t.weight_decay,
            decay_embeddings: t.decay_embeddings,
        },
        grad_clip: (t.grad_clip > 0.0).then_some(t.grad_clip),
        eval_every: t.eval_every,
        eval_at_start: false,
        checkpoint_every: t.checkpoint_every,
        checkpoint_dir: Some(ckpt),
        stop_after,
        meta,
        stop_signal: Some(stop_signal()),
        comm: None,
    }
}

/// The process-wide flag SIGINT and SIGTERM set (to their number), registered on first use.
pub fn stop_signal() -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::sync::{atomic::AtomicUsize, Arc, OnceLock};
    static FLAG: OnceLock<Arc<AtomicUsize>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let f = Arc::new(AtomicUsize::new(0));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // Without a handler the default (immediate exit) stays: progress since the last
            // checkpoint is then lost, as before.
            let _ = signal_hook::flag::register_usize(sig, f.clone(), sig as usize);
        }
        f
    })
    .clone()
}

/// A progress bar for the run's steps (hidden with `--quiet`).
fn progress_bar(run: &PlannedRun, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(run.config.train.steps as u64);
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({eta})").unwrap().progress_chars("=> "),
    );
    pb.set_prefix(run.id.clone());
    pb
}

/// The result's metrics: validation losses and task metrics of the last eval (a diverged run has no
/// final model to score), spike events, and divergence.
fn metrics_of(
    st: &zoo_core::train::TrainState,
    diverged: Option<&(usize, String)>,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut metrics = std::collections::BTreeMap::new();
    if let Some((final_val, eval_metrics)) = st.last_eval.clone() {
        metrics.insert("val_loss,best".into(), json!(st.best_val));
        // A diverged run has no final model to score.
        if diverged.is_none() {
            metrics.insert("val_loss,final".into(), json!(final_val));
            for (k, v) in eval_metrics {
                metrics.insert(k, json!(v));
            }
        }
    }
    // Spike events by the robust rule of zoo_core::spikes (results written before it recorded a
    // `loss_spikes` from the old 1.5 × running-minimum rule, which the report does not show).
    if let Some(v) = st.initial_val {
        metrics.insert("val_loss,initial".into(), json!(v));
    }
    metrics.insert("loss_spikes,robust".into(), json!(st.spike_detector.events));
    metrics.insert("diverged".into(), json!(if diverged.is_some() { 1.0 } else { 0.0 }));
    if let Some((step, _)) = diverged {
        metrics.insert("diverged_at_step".into(), json!(step));
    }
    metrics
}
