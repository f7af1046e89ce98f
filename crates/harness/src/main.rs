//! `zoo`: run configured experiments and sweeps, report tables, evaluate checkpoints, benchmark.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use zoo_harness::{bench, config, env::Env, report, runner};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "zoo", version, about = "Efficient-attention model zoo and experiment harness")]
struct Cli {
    /// Compute device: cpu or cuda:N.
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    /// Activation dtype: f32 (CPU/CUDA) or bf16 / f16 (CUDA; master weights stay f32).
    #[arg(long, global = true, default_value = "f32")]
    dtype: String,
    /// Memory a run or bench may plan for, e.g. 24GiB (default: the device's total memory). Runs
    /// whose estimated footprint exceeds it are refused before any allocation.
    #[arg(long, global = true)]
    max_memory: Option<String>,
    /// Ops with a fused CUDA kernel, or on the CPU a CPU form (attention, RMS norm, RoPE, SwiGLU,
    /// the cross-entropy, GLA's scan, the delta rule, the causal conv): `fused` (default) or
    /// `naive` (the candle compositions), as `ZOO_KERNELS` sets it; every result and bench JSON
    /// records which ran.
    #[arg(long, global = true, value_parser = ["fused", "naive"])]
    kernels: Option<String>,
    /// No progress output.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one experiment, or every run of its sweep; writes results/<experiment>/<run>.json.
    Run {
        config: PathBuf,
        /// Run only slice i of n of the sweep (0-based), e.g. `--shard 3/8` for a job array.
        #[arg(long)]
        shard: Option<String>,
        /// Continue runs from their checkpoints (after a kill).
        #[arg(long)]
        resume: bool,
        /// Rerun runs whose result JSON exists.
        #[arg(long)]
        force: bool,
        /// Validate the config and list the runs without training.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, default_value = "results")]
        results_dir: PathBuf,
        /// Where checkpoints go.
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        /// Stop each run after N steps, as if killed (for resume tests).
        #[arg(long, hide = true)]
        stop_after: Option<usize>,
    },
    /// Data-parallel training on this machine's GPUs: run `zoo ARGS` as N ranks, one process per
    /// GPU, gradients all-reduced through NCCL (`zoo --device cuda --dtype bf16 launch --gpus 2 run
    /// CONFIG`). Rank 0 writes the results and checkpoints; `--resume` works with any number of GPUs.
    Launch {
        /// Ranks (GPUs) to start.
        #[arg(long)]
        gpus: usize,
        /// The zoo command every rank runs (e.g. `run CONFIG`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    /// Print and write the markdown table for a results folder.
    Report {
        dir: PathBuf,
        /// Published numbers to set beside the runs (a TOML file: metric, source, rows of run
        /// label, name and value; e.g. configs/references/zoology-mqar.toml).
        #[arg(long)]
        reference: Option<PathBuf>,
    },
    /// Perplexity of a checkpoint, or of a pretrained model, on a text file.
    Eval {
        /// A checkpoint folder (runs/<experiment>/<run>/checkpoint).
        #[arg(long, required_unless_present = "model", conflicts_with = "model")]
        checkpoint: Option<PathBuf>,
        /// A pretrained model: a GGUF file of the llama architecture (e.g. SmolLM2) or an HF folder
        /// (Llama, Qwen2, Qwen3: config.json, safetensors, tokenizer.json), or a model id in the
        /// offline HF cache (HF_HOME). Scored over
        /// every position with a sliding window (--seq-len, default 1024; stride half of it).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        text: PathBuf,
        /// Window length (default: the training seq_len).
        #[arg(long)]
        seq_len: Option<usize>,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Keep a GGUF file's quantized blocks for the matmuls (CPU): faster, logits close to but
        /// not equal to the dequantized f32 model's.
        #[arg(long)]
        quantized: bool,
        /// With --model: a KV press as inline TOML, e.g. 'type = "knorm"',
        /// 'type = "streaming_llm", sinks = 4', 'type = "tova"', 'type = "snapkv", window = 64,
        /// kernel = 5', 'type = "h2o", recent = 0.5' or 'type = "random", seed = 0': the text is read through the cache in --chunk-token
        /// pieces and after each the press keeps (1 − --ratio) of the tokens read.
        #[arg(long)]
        press: Option<String>,
        /// Share of the cache the press evicts, in [0, 1).
        #[arg(long, default_value_t = 0.0)]
        ratio: f64,
        /// With --press, instead of --ratio: the tokens every attention layer keeps after each
        /// chunk (a fixed budget).
        #[arg(long)]
        keep_tokens: Option<usize>,
        #[arg(long, default_value_t = 128)]
        chunk: usize,
        /// With --press: how the kept entries are spread over layers, inline TOML:
        /// 'type = "uniform"' (default), 'type = "pyramid", beta = 20', or 'type = "ragged"' (per-head
        /// budgets: each KV head keeps its own entries, the layer's total shared by score).
        #[arg(long)]
        budget: Option<String>,
        /// With --model, instead of --press: DuoAttention heads, inline TOML 'path = "duo.json",
        /// retrieval = 0.5' (scores from `zoo kv duo-calibrate`; that share of the KV heads keeps
        /// everything, the rest sinks + window, evicted after every chunk).
        #[arg(long)]
        duo: Option<String>,
        /// With --model, instead of --press: read the text through a KIVI-quantised cache, inline
        /// TOML: 'bits = 2' (2, 4, 8), key_axis / value_axis = "channel" | "token" (defaults:
        /// channel / token), group (default 32), residual (default 128 tokens at full precision).
        #[arg(long)]
        kivi: Option<String>,
    },
    /// Continue a prompt with a pretrained model (GGUF file or HF folder), streaming to stdout;
    /// prompt and generation speed go to stderr at the end.
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Wrap the prompt as a user message in the model's chat template (and open the
        /// assistant's turn); an error if the model has none.
        #[arg(long)]
        chat: bool,
        /// Keep going past the end-of-sequence token (for timing a fixed number of tokens).
        #[arg(long)]
        ignore_eos: bool,
        /// Also write the counts and timings as JSON here.
        #[arg(long)]
        stats: Option<PathBuf>,
        /// A KV press as inline TOML (as `eval --press`): after the prefill (and every
        /// --compress-every tokens) each attention layer keeps (1 − --ratio) of the tokens seen.
        #[arg(long)]
        press: Option<String>,
        #[arg(long, default_value_t = 0.0)]
        ratio: f64,
        /// With --press, instead of --ratio: the tokens every attention layer keeps after each
        /// compression (a target size).
        #[arg(long = "keep-tokens")]
        gen_keep_tokens: Option<usize>,
        #[arg(long)]
        compress_every: Option<usize>,
        /// With --press: how the kept entries are spread over layers and heads, as `eval --budget`.
        #[arg(long = "budget")]
        gen_budget: Option<String>,
        /// DuoAttention heads, inline TOML as `eval --duo`: applied after the prefill and every
        /// --compress-every tokens (default 16).
        #[arg(long = "duo")]
        gen_duo: Option<String>,
        /// KIVI-quantised caches instead of a press, inline TOML as `eval --kivi`
        /// ('bits = 2, residual = 128'); --stats records the bytes held.
        #[arg(long)]
        kivi: Option<String>,
        /// Untimed runs of the prompt plus two tokens first (allocator pages, CUDA kernels loaded),
        /// as benchmarks warm up their twins.
        #[arg(long, default_value_t = 0)]
        warmup: usize,
        /// Keep a GGUF file's quantized blocks for the matmuls (CPU): faster, logits close to but
        /// not equal to the dequantized f32 model's.
        #[arg(long)]
        quantized: bool,
    },
    /// Export a checkpoint whose layers are plain softmax attention + SwiGLU as an HF Llama folder
    /// (config.json, model.safetensors, and tokenizer.json when it was trained with one).
    Export {
        /// A checkpoint folder (runs/<experiment>/<run>/checkpoint).
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Throughput and memory of a config's model over sequence lengths.
    Bench {
        config: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "256,1024")]
        seq_lens: Vec<usize>,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        #[arg(long, default_value_t = 32)]
        decode_tokens: usize,
        #[arg(long)]
        skip_train: bool,
        /// CUDA: also time the train step and the prefill captured once into a CUDA graph and
        /// replayed (`train_graph_*`, `prefill_graph_*`; or why the capture failed, `*_graph_error`):
        /// what the launches cost. An experiment: the replayed step keeps the captured learning rate.
        #[arg(long)]
        cuda_graph: bool,
        /// Which run of a sweep to benchmark (by index in the plan).
        #[arg(long, default_value_t = 0)]
        run_index: usize,
        /// Output JSON (default results/bench/<experiment>-<device>.json).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Issue 14's synthetic gate study (configs/moe-gate-stats.toml): Gaussian-MoE parameter
    /// errors against sample size for the temperature and activation gates; writes
    /// results/<experiment>/gate-stats.json (tabulate with `zoo report`).
    GateStats {
        config: PathBuf,
        #[arg(long, default_value = "results")]
        results_dir: PathBuf,
    },
    /// KV-cache compression tools.
    Kv {
        #[command(subcommand)]
        cmd: KvCmd,
    },
    /// Attention microbenchmark: the fused kernel and the composition, forward and
    /// forward+backward, causal, at (B, H, T, d) shapes; JSON to stdout (TFLOP/s).
    BenchAttention {
        /// Shapes B:H:T:d, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1:16:4096:128,4:16:2048:64,8:8:1024:64")]
        shapes: Vec<String>,
        #[arg(long, default_value_t = 10)]
        iters: usize,
    },
}

#[derive(Subcommand)]
enum KvCmd {
    /// Calibrate Q-Filters (one direction per layer and KV head) on a text and save them for
    /// `--press 'type = "q_filters", path = "…"'`; prints a JSON summary.
    Calibrate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        text: PathBuf,
        /// Tokens per piece of text the model reads.
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// At most this many pieces.
        #[arg(long, default_value_t = 16)]
        pieces: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// DuoAttention's scoring pass: every KV head's output deviation when it attends only to the
    /// sinks and a recent window, averaged over pieces of a text; saved as JSON for
    /// `zoo eval --duo 'path = "…", retrieval = 0.5'`.
    DuoCalibrate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        #[arg(long, default_value_t = 8)]
        pieces: usize,
        #[arg(long, default_value_t = 4)]
        sinks: usize,
        #[arg(long, default_value_t = 64)]
        window: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Pass-key retrieval (needle in a haystack) over prompt lengths × depths × presses × ratios;
    /// writes one JSON (schema zoo.needle/1) for `zoo report`.
    Needle {
        #[arg(long)]
        model: PathBuf,
        /// A press as inline TOML (as `eval --press`); repeat for several. The full cache always runs.
        #[arg(long)]
        press: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "0.5,0.75,0.875")]
        ratios: Vec<f64>,
        #[arg(long, value_delimiter = ',', default_value = "512,1024,2048")]
        lengths: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1")]
        depths: Vec<f64>,
        /// Keys per cell.
        #[arg(long, default_value_t = 2)]
        trials: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// How every press's kept entries are spread over layers and heads, as `eval --budget`.
        #[arg(long)]
        budget: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
}

/// `--budget` (inline TOML, e.g. `type = "ragged"`), checked; the uniform budget when absent.
fn parse_budget(b: Option<&String>) -> Result<zoo_kv_compress::Budget> {
    match b {
        Some(b) => {
            let b: zoo_kv_compress::Budget = parse_inline("budget", b)?;
            b.check().map_err(|e| anyhow::anyhow!("--{e}"))?;
            Ok(b)
        }
        None => Ok(Default::default()),
    }
}

fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let (i, n) = s.split_once('/').context("--shard: expected i/n")?;
    let (i, n): (usize, usize) = (i.parse().context("--shard i")?, n.parse().context("--shard n")?);
    if n == 0 || i >= n {
        bail!("--shard: need 0 <= i < n, got {i}/{n}");
    }
    Ok((i, n))
}

/// Exit codes: 0 success; 1 a sweep finished but some runs failed (each is reported, the others
/// ran); 2 an error before or outside the runs (bad config, bad arguments, I/O).
fn main() {
    match real_main() {
        Ok(0) => {}
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn env_of(cli: &Cli) -> Result<Env> {
    device_env(cli, &cli.device)
}

fn device_env(cli: &Cli, device: &str) -> Result<Env> {
    let mut env = Env::parse(device, &cli.dtype)?;
    env.max_memory = cli.max_memory.as_deref().map(zoo_harness::env::parse_bytes).transpose()?;
    Ok(env)
}

/// The environment of this process: one rank's GPU in a data-parallel launch, else `--device`.
fn rank_env(cli: &Cli, world: Option<&zoo_core::dist::World>) -> Result<Env> {
    match world {
        Some(w) => device_env(cli, &zoo_harness::dist::rank_device(&cli.device, w)?),
        None => env_of(cli),
    }
}

fn real_main() -> Result<i32> {
    bench::keep_freed_memory();
    let cli = Cli::parse();
    if let Some(k) = cli.kernels.as_deref().and_then(zoo_kernels::Kernels::parse) {
        zoo_kernels::set_mode(k);
    }
    let env = || env_of(&cli);
    match &cli.cmd {
        Cmd::Run { config, shard, resume, force, dry_run, results_dir, runs_dir, stop_after } => {
            let (resume, force, dry_run, stop_after) = (*resume, *force, *dry_run, *stop_after);
            // Everything is validated before any work starts.
            let runs = config::load(config)?;
            let shard = shard.as_deref().map(parse_shard).transpose()?;
            // Data parallelism (`zoo launch`, torchrun's or Slurm's variables): this rank's GPU.
            let world = zoo_core::dist::World::from_env().map_err(|e| anyhow::anyhow!("data-parallel launch: {e}"))?;
            if let Some(w) = &world {
                zoo_harness::dist::check_batches(runs.iter(), w)?;
            }
            let env = rank_env(&cli, world.as_ref())?;
            let mine: Vec<_> = runs
                .iter()
                .enumerate()
                .filter(|(i, _)| shard.is_none_or(|(s, n)| i % n == s))
                .map(|(_, r)| r)
                .collect();
            if dry_run {
                for r in &mine {
                    println!("{}", r.id);
                }
                println!("{} runs ({} in this shard), config OK", runs.len(), mine.len());
                return Ok(0);
            }
            let comm = world.map(|w| zoo_harness::dist::communicator(w, &env.device)).transpose()?;
            let writer = comm.as_ref().is_none_or(|c| c.rank() == 0);
            let opts = runner::RunOpts {
                results_dir: results_dir.clone(),
                runs_dir: runs_dir.clone(),
                resume,
                force,
                quiet: cli.quiet || !writer,
                stop_after,
                comm,
            };
            let total = mine.len();
            let mut failed = Vec::new();
            for (k, r) in mine.iter().enumerate() {
                let out = runner::result_path(results_dir, r);
                if !force {
                    // Trust an existing result only if it is readable and was made from this
                    // run's resolved config; otherwise say why and run it again.
                    match runner::existing_result(r, &out) {
                        runner::Existing::Valid => {
                            if !opts.quiet {
                                eprintln!("[{}/{total}] {} — done already, skipping", k + 1, r.id);
                            }
                            continue;
                        }
                        runner::Existing::Missing => {}
                        runner::Existing::Stale(why) => {
                            eprintln!(
                                "[{}/{total}] {}: the existing result is not trusted ({why}); running again",
                                k + 1,
                                r.id
                            )
                        }
                    }
                }
                if !opts.quiet {
                    eprintln!("[{}/{total}] {}", k + 1, r.id);
                }
                let res = match runner::run_one(r, &env, &opts) {
                    Ok(res) => res,
                    Err(e) if e.downcast_ref::<runner::RunLocked>().is_some() => {
                        // Another process of this sweep has it: not ours to run, not a failure.
                        eprintln!("    skipping: {e:#}");
                        continue;
                    }
                    Err(e) if e.downcast_ref::<zoo_core::train::Interrupted>().is_some() => {
                        // SIGINT/SIGTERM: the step finished and was saved; stop the sweep, exit
                        // 128 + signal as a shell expects.
                        let sig = e.downcast_ref::<zoo_core::train::Interrupted>().map_or(2, |i| i.signal);
                        eprintln!("    run {}: {e:#}", r.id);
                        return Ok(128 + sig as i32);
                    }
                    Err(e) => {
                        // One failed run never stops the sweep: report it, go on, exit 1 at the end.
                        eprintln!("    run {} failed: {e:#}", r.id);
                        failed.push(r.id.clone());
                        continue;
                    }
                };
                match res {
                    Some(res) if !opts.quiet => {
                        let res = zoo_harness::schema::parse_run(res, &out)?;
                        eprintln!(
                            "    val_loss best {:.4}  {}",
                            res.metric("val_loss,best").unwrap_or(f64::NAN),
                            res.metric("mqar_acc,none").map(|a| format!("mqar_acc {a}")).unwrap_or_default()
                        )
                    }
                    Some(_) => {}
                    None if !writer => {}
                    None => eprintln!("    stopped early after --stop-after steps; resume with --resume"),
                }
            }
            if let Some(first) = runs.first().filter(|_| writer) {
                let dir = results_dir.join(&first.config.experiment);
                if dir.is_dir() && stop_after.is_none() {
                    // The table is a convenience here: its failure does not fail the sweep.
                    match report::report(&dir) {
                        Ok(md) => println!("{md}"),
                        Err(e) => eprintln!("warning: no report for {}: {e:#}", dir.display()),
                    }
                }
            }
            if !failed.is_empty() {
                eprintln!("{} of {total} runs failed: {}", failed.len(), failed.join(", "));
                return Ok(1);
            }
        }
        Cmd::Launch { gpus, args } => {
            // The global options travel to every rank.
            let mut global = vec!["--device".to_string(), cli.device.clone(), "--dtype".into(), cli.dtype.clone()];
            if let Some(m) = &cli.max_memory {
                global.extend(["--max-memory".into(), m.clone()]);
            }
            if let Some(k) = &cli.kernels {
                global.extend(["--kernels".into(), k.clone()]);
            }
            if cli.quiet {
                global.push("--quiet".into());
            }
            return zoo_harness::dist::launch(*gpus, &global, args);
        }
        Cmd::Report { dir, reference } => println!("{}", report::report_with(dir, reference.as_deref())?),
        Cmd::Eval { checkpoint, model, text, seq_len, batch, quantized, press, ratio, keep_tokens, chunk, budget, kivi, duo } => {
            let kv = kv_settings(model.as_ref(), press.as_ref(), *ratio, *keep_tokens, budget.as_ref(), None, kivi.as_ref(), duo.as_ref())?;
            // What every reading of a text through a pretrained model's cache needs.
            let reading = |flag: &str| -> Result<&PathBuf> {
                let m = model.as_ref().with_context(|| format!("--{flag}: needs --model (a pretrained model)"))?;
                if *chunk == 0 {
                    bail!("--chunk: must be at least 1");
                }
                Ok(m)
            };
            if let Some(cfg) = &kv.duo {
                if kv.press.is_some() || kv.kivi.is_some() {
                    bail!("--duo: give it alone (not with --press or --kivi)");
                }
                let m = reading("duo")?;
                let out = zoo_harness::pretrained::evaluate_model_duo(m, text, cfg, *chunk, &env()?)?;
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(0);
            }
            if kv.budget.is_some() && kv.press.is_none() {
                bail!("--budget: needs --press");
            }
            if let Some(cfg) = &kv.kivi {
                if kv.press.is_some() {
                    bail!("--kivi: a quantised cache and a press do not combine (give one)");
                }
                let m = reading("kivi")?;
                let out = zoo_harness::pretrained::evaluate_model_kivi(m, text, cfg, *chunk, &env()?)?;
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(0);
            }
            if let Some(cfg) = &kv.press {
                let m = reading("press")?;
                zoo_kv_compress::check_ratio(kv.ratio).map_err(|e| anyhow::anyhow!("--{e}"))?;
                let budget = kv.budget.clone().unwrap_or_default();
                let out = zoo_harness::pretrained::evaluate_model_press(m, text, cfg, kv.keep(), &budget, *chunk, &env()?)?;
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(0);
            }
            if kv.ratio != 0.0 {
                bail!("--ratio: needs --press");
            }
            if *seq_len == Some(0) {
                bail!("--seq-len: must be at least 1");
            }
            if model.is_some() && *seq_len == Some(1) {
                bail!("--seq-len: a sliding window over a pretrained model needs at least 2 tokens");
            }
            if *batch == 0 {
                bail!("--batch: must be at least 1");
            }
            let out = match (checkpoint, model) {
                (Some(c), _) => zoo_harness::evaluate_checkpoint(c, text, *seq_len, *batch, &env()?)?,
                (None, Some(m)) => zoo_harness::pretrained::evaluate_model(m, text, seq_len.unwrap_or(1024), *quantized, &env()?)?,
                (None, None) => bail!("zoo eval: give --checkpoint or --model"),
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Cmd::Generate {
            model,
            prompt,
            max_tokens,
            temperature,
            top_p,
            seed,
            chat,
            ignore_eos,
            stats: stats_path,
            quantized,
            warmup,
            press,
            ratio,
            gen_keep_tokens,
            compress_every,
            gen_budget,
            gen_duo,
            kivi,
        } => {
            let kv = kv_settings(
                Some(model),
                press.as_ref(),
                *ratio,
                *gen_keep_tokens,
                gen_budget.as_ref(),
                *compress_every,
                kivi.as_ref(),
                gen_duo.as_ref(),
            )?;
            let (press_cfg, ratio, compress_every) = (kv.press.clone(), &kv.ratio, &kv.every);
            if press_cfg.is_none() && (*ratio != 0.0 || (compress_every.is_some() && kv.duo.is_none())) {
                bail!("--ratio / --compress-every: need --press (or --duo, for --compress-every)");
            }
            zoo_kv_compress::check_ratio(*ratio).map_err(|e| anyhow::anyhow!("--{e}"))?;
            if *compress_every == Some(0) {
                bail!("--compress-every: must be at least 1");
            }
            if !(temperature.is_finite() && *temperature >= 0.0) {
                bail!("--temperature: must be 0 (greedy) or positive");
            }
            if !(*top_p > 0.0 && *top_p <= 1.0) {
                bail!("--top-p: must be in (0, 1]");
            }
            let env = env()?;
            let opts = zoo_harness::pretrained::LoadOpts { quantized: *quantized };
            let p = zoo_harness::pretrained::load_with(model, &env, opts)?;
            let tok = p.tokenizer.as_ref().with_context(|| format!("{}: no tokenizer", model.display()))?;
            let text = if *chat {
                let t = p.chat_template.as_deref().with_context(|| format!("--chat: {} has no chat template", model.display()))?;
                zoo_harness::pretrained::apply_chat_template(t, &[("user", prompt.as_str())], true)?
            } else {
                prompt.clone()
            };
            let ids = tok.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
            if ids.len() + *max_tokens > p.context_length {
                bail!(
                    "--max-tokens: the prompt's {} tokens plus {max_tokens} new ones exceed the model's context of {}",
                    ids.len(),
                    p.context_length
                );
            }
            let kivi_cfg = kv.kivi.clone();
            let packer: Option<std::sync::Arc<dyn zoo_core::state::KvPacker>> = match &kivi_cfg {
                Some(cfg) => {
                    if press_cfg.is_some() {
                        bail!("--kivi: a quantised cache and a press do not combine (give one)");
                    }
                    let hd = zoo_kv_compress::kv_head_dim(&p.model)?.context("--kivi: the model has no attention layer")?;
                    Some(std::sync::Arc::new(zoo_kv_compress::kivi::Kivi::new(cfg, hd).map_err(|e| anyhow::anyhow!("--{e}"))?))
                }
                None => None,
            };
            let duo_plan = match &kv.duo {
                Some(cfg) => {
                    if press_cfg.is_some() || kivi_cfg.is_some() {
                        bail!("--duo: give it alone (not with --press or --kivi)");
                    }
                    Some((cfg.build().map_err(|e| anyhow::anyhow!("--{e}"))?, compress_every.unwrap_or(16)))
                }
                None => None,
            };
            let o = zoo_harness::pretrained::GenOpts { max_tokens: *max_tokens, temperature: *temperature, top_p: *top_p, seed: *seed, packer, duo: duo_plan };
            let built = press_cfg.as_ref().map(|c| c.build()).transpose()?;
            if kv.budget.is_some() && press_cfg.is_none() {
                bail!("--budget: needs --press");
            }
            let budget = kv.budget.clone().unwrap_or_default();
            let budget_json = serde_json::to_value(&budget)?;
            let gp = built.as_ref().map(|b| zoo_harness::pretrained::GenPress { press: b.as_ref(), keep: kv.keep(), every: *compress_every, budget: budget.clone() });
            for _ in 0..*warmup {
                let w = zoo_harness::pretrained::GenOpts { max_tokens: 2, ..o.clone() };
                zoo_harness::pretrained::generate(&p.model, ids.get_ids(), None, &w, &env.device, gp.as_ref(), |_| Ok(()))?;
            }
            // Stream: print the new suffix of the decoded text after every token.
            let mut all = Vec::new();
            let mut shown = 0;
            let eos = if *ignore_eos { None } else { p.eos };
            let stats = zoo_harness::pretrained::generate(&p.model, ids.get_ids(), eos, &o, &env.device, gp.as_ref(), |id| {
                use std::io::Write;
                all.push(id);
                let text = tok.decode(&all, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
                if text.len() > shown && text.is_char_boundary(shown) {
                    print!("{}", &text[shown..]);
                    std::io::stdout().flush()?;
                    shown = text.len();
                }
                Ok(())
            })?;
            println!();
            let n = stats.generated.len();
            if let Some(path) = stats_path {
                let j = serde_json::json!({
                    "schema": zoo_harness::schema::GENERATE_SCHEMA,
                    "model": model.display().to_string(),
                    "quantized": quantized,
                    "warmup": warmup,
                    "prompt_tokens": stats.prompt_tokens,
                    "generated_tokens": n,
                    "prefill_seconds": stats.prefill_seconds,
                    "decode_seconds": stats.decode_seconds,
                    "prefill_tokens_per_s": stats.prompt_tokens as f64 / stats.prefill_seconds.max(1e-9),
                    "decode_tokens_per_s": n.saturating_sub(1) as f64 / stats.decode_seconds.max(1e-9),
                    "press": press_cfg.as_ref().map(serde_json::to_value).transpose()?,
                    "kivi": kivi_cfg.as_ref().map(serde_json::to_value).transpose()?,
                    "budget": budget_json,
                    "duo": kv.duo.as_ref().map(serde_json::to_value).transpose()?,
                    "ratio": ratio,
                    "keep_tokens": kv.keep_tokens,
                    "compress_every": compress_every,
                    "compressions": stats.compressions,
                    "kv_bytes": stats.kv_bytes,
                    "kv_allocated_bytes": stats.kv_allocated_bytes,
                    "kv_full_bytes": stats.kv_full_bytes,
                    "generated": stats.generated,
                    "env": env.record(),
                });
                zoo_harness::env::write_atomic(path, &serde_json::to_vec_pretty(&j)?)?;
            }
            eprintln!(
                "prompt {} tokens: {:.1} tok/s; generated {n}: {:.1} tok/s",
                stats.prompt_tokens,
                stats.prompt_tokens as f64 / stats.prefill_seconds.max(1e-9),
                n.saturating_sub(1) as f64 / stats.decode_seconds.max(1e-9)
            );
        }
        Cmd::Export { checkpoint, out } => {
            zoo_harness::export_checkpoint(checkpoint, out, &env()?)?;
            println!("exported {} to {}", checkpoint.display(), out.display());
        }
        Cmd::Kv { cmd: KvCmd::Calibrate { model, text, seq_len, pieces, out } } => {
            if *pieces == 0 {
                bail!("--pieces: must be at least 1");
            }
            let j = zoo_harness::pretrained::calibrate_qfilters_to(model, text, *seq_len, *pieces, out, &env()?)?;
            println!("{}", serde_json::to_string_pretty(&j)?);
        }
        Cmd::Kv { cmd: KvCmd::DuoCalibrate { model, text, seq_len, pieces, sinks, window, out } } => {
            if *pieces == 0 {
                bail!("--pieces: must be at least 1");
            }
            let env = env()?;
            let p = zoo_harness::pretrained::load_with(model, &env, Default::default())?;
            let ids = zoo_harness::pretrained::text_ids(&p, model, text)?;
            let scores = zoo_harness::pretrained::calibrate_duo(&p, &ids, *seq_len, *pieces, *sinks, *window)?;
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            zoo_harness::env::write_atomic(out, serde_json::to_string_pretty(&scores)?.as_bytes())?;
            println!("{}", serde_json::to_string_pretty(&scores)?);
        }
        Cmd::GateStats { config, results_dir } => {
            let out = zoo_harness::gate_stats::run(config, results_dir, &env()?)?;
            eprintln!("wrote {}", out.display());
        }
        Cmd::Kv { cmd: KvCmd::Needle { model, press, ratios, lengths, depths, trials, seed, budget, out } } => {
            if zoo_harness::pretrained::kv_section(model)?.is_some() {
                bail!("--model: {}'s [kv] section is for zoo eval and zoo generate; the needle grid takes --press, --ratios and --budget", model.display());
            }
            let presses = press.iter().map(|p| parse_press(p)).collect::<Result<Vec<_>>>()?;
            let budget = parse_budget(budget.as_ref())?;
            for r in ratios.iter() {
                zoo_kv_compress::check_ratio(*r).map_err(|e| anyhow::anyhow!("--ratios: {e}"))?;
            }
            if let Some(d) = depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
                bail!("--depths: {d} must be in [0, 1]");
            }
            if *trials == 0 || lengths.is_empty() || depths.is_empty() {
                bail!("--trials, --lengths, --depths: need at least one each");
            }
            let env = env()?;
            let p = zoo_harness::pretrained::load_with(model, &env, Default::default())?;
            let o = zoo_harness::needle::NeedleOpts {
                lengths: lengths.clone(),
                depths: depths.clone(),
                ratios: ratios.clone(),
                trials: *trials,
                seed: *seed,
                answer_tokens: 8,
                budget,
            };
            let t0 = std::time::Instant::now();
            let run_env = env.record();
            let write = |mut j: serde_json::Value| -> Result<()> {
                j["model"] = serde_json::json!(model.display().to_string());
                j["seconds"] = serde_json::json!(t0.elapsed().as_secs_f64());
                j["env"] = run_env.clone();
                zoo_harness::env::write_atomic(out, &serde_json::to_vec_pretty(&j)?)
            };
            let j = zoo_harness::needle::run(&p, &presses, &o, |m, partial| {
                eprintln!("{m}");
                write(partial.clone())
            })?;
            write(j)?;
            eprintln!("wrote {}", out.display());
        }
        Cmd::BenchAttention { shapes, iters } => {
            let env = env()?;
            let shapes = shapes
                .iter()
                .map(|s| {
                    let v: Vec<usize> = s.split(':').map(|x| x.parse()).collect::<std::result::Result<_, _>>().context("--shapes: B:H:T:d")?;
                    anyhow::ensure!(v.len() == 4 && v.iter().all(|&x| x > 0), "--shapes: `{s}` is not B:H:T:d");
                    Ok((v[0], v[1], v[2], v[3]))
                })
                .collect::<Result<Vec<_>>>()?;
            let out = bench::attention(&shapes, (*iters).max(1), &env)?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Cmd::Bench { config, seq_lens, batch, warmup, iters, decode_tokens, skip_train, cuda_graph, run_index, out } => {
            let (batch, run_index) = (*batch, *run_index);
            if *iters == 0 {
                bail!("--iters: must be at least 1 (timed iterations)");
            }
            if batch == 0 {
                bail!("--batch: must be at least 1");
            }
            if seq_lens.is_empty() || seq_lens.contains(&0) {
                bail!("--seq-lens: needs one or more lengths, each at least 1");
            }
            let runs = config::load(config)?;
            let run = runs
                .get(run_index)
                .with_context(|| format!("--run-index {run_index}: the config has {} runs", runs.len()))?;
            let world = zoo_core::dist::World::from_env().map_err(|e| anyhow::anyhow!("data-parallel launch: {e}"))?;
            if let Some(w) = world.filter(|w| batch % w.size != 0) {
                bail!("--batch {batch}: the global batch does not split evenly over WORLD_SIZE = {} ranks", w.size);
            }
            let env = rank_env(&cli, world.as_ref())?;
            if *cuda_graph && (!env.device.is_cuda() || world.is_some()) {
                bail!("--cuda-graph: captures one device's step; needs --device cuda:N and no data-parallel launch");
            }
            let comm = world.map(|w| zoo_harness::dist::communicator(w, &env.device)).transpose()?;
            let writer = comm.as_ref().is_none_or(|c| c.rank() == 0);
            let vocab = zoo_harness::vocab_size(&run.config)?;
            let longest = seq_lens.iter().max().copied().unwrap_or(0) + decode_tokens;
            // Without the training step, only inference has to fit (weights, one forward, the cache).
            let footprint = if *skip_train {
                run.config.inference_footprint_at(vocab, batch, longest)
            } else {
                run.config.footprint_at(vocab, batch, longest)
            };
            footprint.check(env.memory_limit(), &format!("bench at T = {longest}"))?;
            let o = bench::BenchOpts {
                seq_lens: seq_lens.clone(),
                batch,
                warmup: *warmup,
                iters: *iters,
                decode_tokens: *decode_tokens,
                skip_train: *skip_train,
                cuda_graph: *cuda_graph,
                comm,
            };
            let mut res = bench::bench(&run.config, vocab, &env, &o, cli.quiet)?;
            if !writer {
                return Ok(0);
            }
            res["label"] = serde_json::json!(run.label);
            res["plan_index"] = serde_json::json!(run.index);
            let dev = if env.device.is_cpu() { "cpu".to_string() } else { format!("cuda-{}", env.dtype_name()) };
            let out = out.clone().unwrap_or_else(|| {
                PathBuf::from(format!("results/bench/{}-{}-{dev}.json", run.config.experiment, run.id))
            });
            zoo_harness::env::write_atomic(&out, &serde_json::to_vec_pretty(&res)?)?;
            println!("{}", zoo_harness::bench_table(&res));
            println!("wrote {}", out.display());
        }
    }
    Ok(0)
}

/// A press given on the command line: the inside of an inline table (`type = "knorm", …`).
/// The KV settings of `zoo eval` / `zoo generate`: the command line's flags and the model file's
/// `[kv]` section (`pretrained::KvSection`), each setting from one of the two.
struct KvSettings {
    press: Option<zoo_kv_compress::PressConfig>,
    ratio: f64,
    keep_tokens: Option<usize>,
    budget: Option<zoo_kv_compress::Budget>,
    every: Option<usize>,
    kivi: Option<zoo_kv_compress::kivi::KiviConfig>,
    duo: Option<zoo_kv_compress::duo::DuoConfig>,
}

#[allow(clippy::too_many_arguments)]
fn kv_settings(
    model: Option<&PathBuf>,
    press: Option<&String>,
    ratio: f64,
    keep_tokens: Option<usize>,
    budget: Option<&String>,
    every: Option<usize>,
    kivi: Option<&String>,
    duo: Option<&String>,
) -> Result<KvSettings> {
    let file = model.map(|m| zoo_harness::pretrained::kv_section(m)).transpose()?.flatten().unwrap_or_default();
    let name = model.map(|m| m.display().to_string()).unwrap_or_default();
    fn one<T>(flag: &str, cli: Option<T>, file: Option<T>, name: &str) -> Result<Option<T>> {
        match (cli, file) {
            (Some(_), Some(_)) => bail!("--{flag}: also set in {name}'s [kv] section (give it in one place)"),
            (c, f) => Ok(c.or(f)),
        }
    }
    let kv = KvSettings {
        press: one("press", press.map(|p| parse_press(p)).transpose()?, file.press, &name)?,
        ratio: one("ratio", (ratio != 0.0).then_some(ratio), file.ratio, &name)?.unwrap_or(0.0),
        keep_tokens: one("keep-tokens", keep_tokens, file.keep_tokens, &name)?,
        budget: one("budget", budget.map(|b| parse_budget(Some(b))).transpose()?, file.budget, &name)?,
        every: one("compress-every", every, file.compress_every, &name)?,
        kivi: one("kivi", kivi.map(|k| parse_inline("kivi", k)).transpose()?, file.kivi, &name)?,
        duo: one("duo", duo.map(|d| parse_inline("duo", d)).transpose()?, file.duo, &name)?,
    };
    if let Some(n) = kv.keep_tokens {
        if kv.ratio != 0.0 {
            bail!("--keep-tokens: give --ratio or --keep-tokens, not both");
        }
        if kv.press.is_none() {
            bail!("--keep-tokens: needs --press");
        }
        zoo_kv_compress::Keep::Tokens(n).check().map_err(|e| anyhow::anyhow!("--{}", e.replace('_', "-")))?;
    }
    Ok(kv)
}

impl KvSettings {
    /// What the press keeps: --keep-tokens, else --ratio.
    fn keep(&self) -> zoo_kv_compress::Keep {
        match self.keep_tokens {
            Some(n) => zoo_kv_compress::Keep::Tokens(n),
            None => zoo_kv_compress::Keep::Ratio(self.ratio),
        }
    }
}

fn parse_press(text: &str) -> anyhow::Result<zoo_kv_compress::PressConfig> {
    let cfg: zoo_kv_compress::PressConfig = parse_inline("press", text)?;
    cfg.check().map_err(|e| anyhow::anyhow!("--{e}"))?;
    Ok(cfg)
}

/// `--flag 'type = "…", …'`: the text is the inside of an inline table, read as `flag = { text }`
/// so errors name the flag's fields (`press.window`, `budget.beta`).
fn parse_inline<T: serde::de::DeserializeOwned>(flag: &str, text: &str) -> anyhow::Result<T> {
    let mut t: toml::Table = toml::from_str(&format!("{flag} = {{ {text} }}")).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))?;
    let v = t.remove(flag).expect("the table has the key just written");
    v.try_into().map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
}
