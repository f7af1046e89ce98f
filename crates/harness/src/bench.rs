//! `zoo bench`: train-step, prefill and decode throughput and peak memory of a config's model over
//! sequence lengths, with warm-up iterations and device synchronisation around every timing.

use crate::config::RunConfig;
use crate::env::{self, Env};
use crate::runner::build_model;
use anyhow::Result;
use serde_json::json;
use std::time::Instant;
use zoo_core::candle_core::{DType, Tensor};
use zoo_core::optim::{AdamW, AdamWParams, Grads};
use zoo_core::rng::Rng;

pub struct BenchOpts {
    pub seq_lens: Vec<usize>,
    pub batch: usize,
    pub warmup: usize,
    pub iters: usize,
    pub decode_tokens: usize,
    pub skip_train: bool,
    /// CUDA: also time the train step and the prefill as a captured CUDA graph ([`graph_time`]).
    pub cuda_graph: bool,
    /// Data parallelism (`zoo launch --gpus N bench`): `batch` is the global batch, each rank
    /// trains on its share and the gradients are all-reduced inside the timed step; only the
    /// train step is measured (prefill and decode are per-device work).
    pub comm: Option<std::sync::Arc<dyn zoo_core::dist::Comm>>,
}

/// How long mimalloc (the `zoo` binary's allocator) keeps memory that was freed before it
/// returns it to the OS, unless `MIMALLOC_PURGE_DELAY` says otherwise: an hour (the bundled
/// mimalloc v3's default is 1 s). A training step frees and allocates the same large buffers every
/// step; returned to the OS, each of them is faulted in and zeroed again at its next use
/// (`results/bench/cpu-purge`: configs/bench-baseline-cpu.toml's train step 2620 ms with a 10 ms
/// delay, 1125 ms with this one, for a resident peak of 1389 MiB instead of 1295).
/// [`PeakMem::reset`]'s `mi_collect(true)` still returns everything freed, since a delayed purge is
/// scheduled (a disabled one, −1, is not).
pub const PURGE_DELAY_MS: i64 = 3_600_000;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (the same index in its v2 and v3 headers;
/// libmimalloc-sys does not export the constant).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Apply [`PURGE_DELAY_MS`] (call first thing in `main`).
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options; the purge delay is read each time a purge is
        // scheduled.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as _) };
    }
}

#[cfg(test)]
mod tests {
    /// The option index is mimalloc's purge delay: its default (v3: 1000 ms) reads back, as set
    /// by the environment when that sets it.
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        let want = std::env::var("MIMALLOC_PURGE_DELAY").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
        // SAFETY: reads one of mimalloc's options.
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) }, want);
    }
}

/// Peak memory of the process (CPU: resident set high-water mark) or the device (CUDA: the memory
/// pool's high-water mark), resettable between phases.
pub struct PeakMem<'a> {
    env: &'a Env,
}

impl<'a> PeakMem<'a> {
    pub fn reset(&self) {
        if self.env.device.is_cpu() {
            // Return the memory freed by earlier phases to the OS (the binary's allocator is
            // mimalloc; `keep_freed_memory` only delays that), then reset VmHWM to the current
            // RSS (Linux: write 5 to clear_refs).
            // SAFETY: mi_collect only releases free pages of mimalloc's own heaps.
            unsafe { libmimalloc_sys::mi_collect(true) };
            let _ = std::fs::write("/proc/self/clear_refs", "5");
        } else {
            cuda_mem::reset_peak();
        }
    }

    pub fn read(&self) -> Option<u64> {
        if self.env.device.is_cpu() {
            let s = std::fs::read_to_string("/proc/self/status").ok()?;
            let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            l.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
        } else {
            cuda_mem::peak()
        }
    }

    pub fn what(&self) -> &'static str {
        if self.env.device.is_cpu() {
            "process peak resident set (VmHWM) after returning freed memory to the OS, bytes"
        } else {
            cuda_mem::WHAT
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda_mem {
    use zoo_core::candle_core::cuda_backend::cudarc::driver::sys;
    pub const WHAT: &str = "CUDA default memory pool used-memory high-water mark, bytes";

    fn pool() -> Option<sys::CUmemoryPool> {
        unsafe {
            let mut dev: sys::CUdevice = 0;
            if sys::cuCtxGetDevice(&mut dev) != sys::CUresult::CUDA_SUCCESS {
                return None;
            }
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            if sys::cuDeviceGetDefaultMemPool(&mut pool, dev) != sys::CUresult::CUDA_SUCCESS {
                return None;
            }
            Some(pool)
        }
    }

    pub fn reset_peak() {
        if let Some(p) = pool() {
            let mut zero: u64 = 0;
            unsafe {
                sys::cuMemPoolSetAttribute(
                    p,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut zero as *mut u64 as *mut _,
                );
            }
        }
    }

    pub fn peak() -> Option<u64> {
        let p = pool()?;
        let mut v: u64 = 0;
        let r = unsafe {
            sys::cuMemPoolGetAttribute(
                p,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut v as *mut u64 as *mut _,
            )
        };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda_mem {
    pub const WHAT: &str = "unavailable";
    pub fn reset_peak() {}
    pub fn peak() -> Option<u64> {
        None
    }
}

fn random_ids(rng: &mut Rng, b: usize, t: usize, vocab: usize, env: &Env) -> Result<Tensor> {
    let v: Vec<u32> = (0..b * t).map(|_| rng.below(vocab) as u32).collect();
    Ok(Tensor::from_vec(v, (b, t), &env.device)?)
}

/// Time `f` over `iters` runs after `warmup` runs; returns mean seconds per run.
/// `<phase>_graph_s` and `<phase>_graph_tokens_per_s`, or `<phase>_graph_error` (its first line).
fn record_graph(row: &mut serde_json::Map<String, serde_json::Value>, phase: &str, r: Result<Option<f64>>, tokens: usize) {
    match r {
        Ok(Some(s)) => {
            row.insert(format!("{phase}_graph_s"), json!(s));
            row.insert(format!("{phase}_graph_tokens_per_s"), json!(tokens as f64 / s));
        }
        Ok(None) => {}
        Err(e) => {
            let msg = format!("{e:#}");
            row.insert(format!("{phase}_graph_error"), json!(msg.lines().next().unwrap_or("").trim()));
        }
    }
}

fn time(env: &Env, warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    env.sync()?;
    let t0 = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    env.sync()?;
    Ok(t0.elapsed().as_secs_f64() / iters.max(1) as f64)
}

/// Seconds per replay of `f` captured once into a CUDA graph (after `warmup` plain calls, which
/// also fill candle's cache of small host-to-device uploads, so that the capture finds them
/// there), over `iters` replays; `Ok(None)` off CUDA. Capture fails where the step waits for the
/// host (a read to the host, an upload of new data) or allocates outside the stream's pool; the
/// error names the op. What the replay computes is what the capture recorded: the same inputs,
/// and the optimiser's scalars (learning rate, bias corrections) as they were then.
#[cfg(feature = "cuda")]
pub fn graph_time(env: &Env, warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Option<f64>> {
    let candle_core::Device::Cuda(dev) = &env.device else { return Ok(None) };
    {
        let _cache = dev.enable_cuda_graph_htod_cache();
        for _ in 0..warmup.max(2) {
            f()?;
        }
    }
    env.sync()?;
    let g = zoo_core::graph::capture(dev, f).map_err(|why| anyhow::anyhow!(why))?;
    g.upload().map_err(|e| anyhow::anyhow!("graph upload: {e:?}"))?;
    g.launch().map_err(|e| anyhow::anyhow!("graph launch: {e:?}"))?;
    env.sync()?;
    let t0 = Instant::now();
    for _ in 0..iters {
        g.launch().map_err(|e| anyhow::anyhow!("graph launch: {e:?}"))?;
    }
    env.sync()?;
    Ok(Some(t0.elapsed().as_secs_f64() / iters.max(1) as f64))
}

#[cfg(not(feature = "cuda"))]
pub fn graph_time(_: &Env, _: usize, _: usize, _: impl FnMut() -> Result<()>) -> Result<Option<f64>> {
    Ok(None)
}

pub fn bench(cfg: &RunConfig, vocab: usize, env: &Env, o: &BenchOpts, quiet: bool) -> Result<serde_json::Value> {
    let max_t = o.seq_lens.iter().copied().max().unwrap_or(0) + o.decode_tokens;
    let mut cfg = cfg.clone();
    cfg.train.seq_len = Some(max_t);
    if let crate::config::DataConfig::Mqar { train, .. } = &mut cfg.data {
        // Make the RoPE tables long enough for the benchmarked lengths.
        if let Some(s) = train.first_mut() {
            s.seq_len = s.seq_len.max(max_t);
        }
    }
    let (model, store) = build_model(&cfg, vocab, env)?;
    let mem = PeakMem { env };
    let mut rng = Rng::new(cfg.seed).fork(99);
    let mut rows = Vec::new();
    for &t in &o.seq_lens {
        let b = o.batch;
        let ids = random_ids(&mut rng, b, t, vocab, env)?;
        let targets = random_ids(&mut rng, b, t, vocab, env)?;
        // This rank's rows of the global batch (all of them on one device).
        let (ids_r, targets_r) = match &o.comm {
            Some(c) => {
                let (at, len) = zoo_core::dist::rank_rows(b, c.rank(), c.world())?;
                (ids.narrow(0, at, len)?, targets.narrow(0, at, len)?)
            }
            None => (ids.clone(), targets.clone()),
        };
        let mut row = serde_json::Map::new();
        row.insert("seq_len".into(), json!(t));
        row.insert("batch".into(), json!(b));
        // A phase that fails (e.g. out of memory at long T) is recorded in its row, and the
        // benchmark goes on with the next phase and length.
        let record = |row: &mut serde_json::Map<String, serde_json::Value>, phase: &str, r: Result<()>| {
            if let Err(e) = r {
                // candle's errors can carry a backtrace after the first line.
                let msg = format!("{e:#}");
                row.insert(format!("{phase}_error"), json!(msg.lines().next().unwrap_or("").trim()));
            }
        };
        if !o.skip_train {
            let r = (|| -> Result<()> {
                let mut opt = AdamW::new(&store, AdamWParams::default())?;
                let vars: Vec<_> = opt.vars().cloned().collect();
                mem.reset();
                let mut step = || -> Result<()> {
                    let loss = model.loss(&ids_r, &targets_r, None)?.loss;
                    let mut g = Grads::default();
                    g.accumulate(&loss.backward()?, vars.iter(), 1.0)?;
                    if let Some(c) = &o.comm {
                        g.all_reduce_mean(c.as_ref(), vars.iter())?;
                    }
                    opt.step_clipped(&mut g, Some(1.0), 1e-4)?;
                    Ok(())
                };
                let s = time(env, o.warmup, o.iters, &mut step)?;
                row.insert("train_step_s".into(), json!(s));
                row.insert("train_tokens_per_s".into(), json!((b * t) as f64 / s));
                row.insert("train_peak_bytes".into(), json!(mem.read()));
                if o.cuda_graph && o.comm.is_none() {
                    let g = graph_time(env, o.warmup, o.iters, &mut step);
                    record_graph(&mut row, "train", g, b * t);
                }
                Ok(())
            })();
            record(&mut row, "train", r);
        }
        let per_device = o.comm.is_none();
        let r = (|| -> Result<()> {
            if !per_device {
                return Ok(());
            }
            mem.reset();
            let prefill = || -> Result<()> {
                let mut cache = model.new_cache();
                let out = model.forward(&ids, Some(&mut cache), None)?;
                drop(out);
                Ok(())
            };
            let s = time(env, o.warmup, o.iters, prefill)?;
            row.insert("prefill_s".into(), json!(s));
            row.insert("prefill_tokens_per_s".into(), json!((b * t) as f64 / s));
            row.insert("prefill_peak_bytes".into(), json!(mem.read()));
            if o.cuda_graph {
                record_graph(&mut row, "prefill", graph_time(env, o.warmup, o.iters, prefill), b * t);
            }
            Ok(())
        })();
        record(&mut row, "prefill", r);
        // Decode: prefill T tokens, then generate greedily one token at a time.
        if o.decode_tokens > 0 && per_device {
            let r = (|| -> Result<()> {
                // Room for the prompt and every generated token: decode allocates no cache.
                let mut cache = model.new_cache_with_capacity(t + o.decode_tokens);
                let logits = model.forward(&ids, Some(&mut cache), None)?.logits;
                let mut next = logits.narrow(1, t - 1, 1)?.argmax(2)?.to_dtype(DType::U32)?;
                drop(logits); // (B, T, V): not part of what decode holds
                for _ in 0..o.warmup.min(2) {
                    // Warm-up steps on a throwaway copy of the cache.
                    let mut c2 = cache.clone();
                    model.forward(&next, Some(&mut c2), None)?;
                }
                env.sync()?;
                mem.reset();
                let t0 = Instant::now();
                for _ in 0..o.decode_tokens {
                    let out = model.forward(&next, Some(&mut cache), None)?;
                    next = out.logits.argmax(2)?.to_dtype(DType::U32)?;
                }
                env.sync()?;
                let s = t0.elapsed().as_secs_f64();
                row.insert("decode_tokens_per_s".into(), json!((b * o.decode_tokens) as f64 / s));
                row.insert("decode_peak_bytes".into(), json!(mem.read()));
                row.insert("cache_bytes_after_decode".into(), json!(cache.iter().map(|c| c.bytes()).sum::<usize>()));
                row.insert(
                    "cache_allocated_bytes_after_decode".into(),
                    json!(cache.iter().map(|c| c.allocated_bytes()).sum::<usize>()),
                );
                Ok(())
            })();
            record(&mut row, "decode", r);
        }
        row.insert("cache_bytes_at_seq_len".into(), json!(model.cache_bytes(b, t)));
        if !quiet && o.comm.as_ref().is_none_or(|c| c.rank() == 0) {
            eprintln!("bench T={t}: {}", serde_json::to_string(&row)?);
        }
        rows.push(serde_json::Value::Object(row));
    }
    let result = crate::schema::BenchResult {
        schema: crate::schema::BENCH_SCHEMA.into(),
        experiment: cfg.experiment.clone(),
        label: None,
        plan_index: None,
        layers: model.describe(),
        config: serde_json::to_value(&cfg)?,
        params: json!({
            "total": store.num_params(),
            "bytes": store.vars().iter().map(|(_, v)| v.elem_count() * v.dtype().size_in_bytes()).sum::<usize>(),
        }),
        vocab_size: vocab as u64,
        env: crate::schema::EnvRecord {
            git: env::git_state(),
            versions: serde_json::from_value(env::versions())?,
            device: {
                let mut d: crate::schema::DeviceRecord = serde_json::from_value(env.describe())?;
                d.world_size = o.comm.as_ref().map(|c| c.world() as u64).filter(|&n| n > 1);
                d
            },
            dtype: env.dtype_name().into(),
        },
        protocol: json!({
            "warmup_iters": o.warmup,
            "timed_iters": o.iters,
            "decode_tokens": o.decode_tokens,
            "train_step": "forward + cross-entropy + backward + clip + AdamW on random tokens (data parallel: each rank's share of the global batch, gradients all-reduced inside the step; tokens/s global)",
            "prefill": "forward with an empty cache (inference path)",
            "decode": "greedy, one token per call, after a prefill of seq_len tokens",
            "memory": mem.what(),
            "sync": "device synchronised before and after each timed block",
        }),
        rows,
        finished_at: env::now_rfc3339(),
    };
    Ok(result.to_json()?)
}

/// `zoo bench-attention`: median seconds of causal attention at each (B, H, T, d), forward and
/// forward + backward (loss sum(O ∘ W), reduced over the head dim and then the rest), for the fused kernel and the composition (`sdpa` with its
/// mask), in the env's dtype. FLOPs counted as FlashAttention-2 does: forward 4·B·H·T²·d / 2
/// (causal), forward + backward 3.5× that.
pub fn attention(shapes: &[(usize, usize, usize, usize)], iters: usize, env: &Env) -> Result<serde_json::Value> {
    use zoo_core::candle_core::{DType, Tensor, Var};
    use zoo_core::mixer::Phase;
    let dev = &env.device;
    let mut rows = Vec::new();
    for &(b, h, t, d) in shapes {
        let mk = |s: f64| -> Result<Tensor> { Ok((Tensor::randn(0f32, 1.0, (b, h, t, d), dev)? * s)?.to_dtype(env.dtype)?) };
        let (q, k, v, w) = (Var::from_tensor(&mk(1.0)?)?, Var::from_tensor(&mk(1.0)?)?, Var::from_tensor(&mk(1.0)?)?, mk(1.0)?.to_dtype(DType::F32)?);
        let opts = zoo_kernels::attention::FlashOpts::causal(d);
        let fused = |q: &Tensor, k: &Tensor, v: &Tensor| zoo_kernels::attention::flash_attention_op(q, k, v, &opts);
        let naive = |q: &Tensor, k: &Tensor, v: &Tensor| -> zoo_core::candle_core::Result<Tensor> {
            let mask = zoo_core::attention::attention_mask(t, 0, t, 0, None, 0, dev)?;
            zoo_core::attention::sdpa(q, k, v, Some(&mask), Phase::Train, None)
        };
        let flops = 4.0 * (b * h * t * t * d) as f64 / 2.0;
        let mut row = serde_json::json!({ "B": b, "H": h, "T": t, "d": d, "fwd_flops": flops, "fwd_bwd_flops": 3.5 * flops });
        for (name, f) in [("fused", &fused as &dyn Fn(&Tensor, &Tensor, &Tensor) -> zoo_core::candle_core::Result<Tensor>), ("composition", &naive)] {
            let time = |with_bwd: bool| -> Result<f64> {
                let mut ts = Vec::new();
                for i in 0..iters + 2 {
                    env.sync()?;
                    let t0 = std::time::Instant::now();
                    let o = f(q.as_tensor(), k.as_tensor(), v.as_tensor())?;
                    if with_bwd {
                        // Summed over the head dim first: candle's `sum_all` of the B·H·T·d
                        // products is one block on the GPU (0.6-1 ms at 8M elements, more than
                        // cuDNN's whole backward), which SDPA's side does not pay.
                        let g = (o.to_dtype(DType::F32)? * &w)?.sum(3)?.sum_all()?.backward()?;
                        drop(g);
                    }
                    env.sync()?;
                    if i >= 2 {
                        ts.push(t0.elapsed().as_secs_f64());
                    }
                }
                ts.sort_by(f64::total_cmp);
                Ok(ts[ts.len() / 2])
            };
            let (fwd, both) = match (time(false), time(true)) {
                (Ok(a), Ok(b)) => (Some(a), Some(b)),
                (a, b) => {
                    let e = a.err().or(b.err()).map(|e| format!("{e:#}"));
                    row[name] = serde_json::json!({ "error": e });
                    continue;
                }
            };
            row[name] = serde_json::json!({
                "fwd_seconds": fwd, "fwd_bwd_seconds": both,
                "fwd_tflops": fwd.map(|s| flops / s / 1e12),
                "fwd_bwd_tflops": both.map(|s| 3.5 * flops / s / 1e12),
            });
        }
        rows.push(row);
    }
    Ok(serde_json::json!({ "device": env.describe(), "dtype": env.dtype_name(), "iters": iters, "git": crate::env::git_state(), "shapes": rows }))
}
