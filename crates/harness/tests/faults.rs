//! Fault suite: bad settings, absurd sizes, divergence, stale or broken results and bad CLI
//! arguments each end in an error naming the field or file (never a panic or an allocation), and a
//! seeded config fuzzer checks that for thousands of mutated configs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use zoo_harness::config;
use zoo_harness::env::Env;
use zoo_harness::runner::{self, RunOpts};

const BASE: &str = r#"experiment = "f"
seed = 1
[model]
d_model = 16
n_layers = 2
norm_eps = 1e-5
mixer = { type = "attention", n_heads = 2 }
ffn = { type = "swiglu" }
[data]
type = "mqar"
vocab_size = 32
train = [{ seq_len = 16, kv_pairs = 2, examples = 64 }]
test = [{ seq_len = 16, kv_pairs = 2, examples = 16 }]
[train]
steps = 6
batch_size = 4
lr = 3e-3
min_lr = 3e-4
warmup_steps = 1
weight_decay = 0.1
grad_clip = 1.0
eval_every = 3
eval_batches = 2
checkpoint_every = 3
"#;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("zoo-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn plan_err(text: &str) -> String {
    match config::plan(text, Path::new(".")) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => format!("{e:#}"),
    }
}

fn cpu() -> Env {
    Env::parse("cpu", "f32").unwrap()
}

fn opts(dir: &Path) -> RunOpts {
    RunOpts {
        results_dir: dir.join("results"),
        runs_dir: dir.join("runs"),
        resume: false,
        force: false,
        quiet: true,
        stop_after: None,
        comm: None,
    }
}

#[test]
fn meaningless_and_nan_settings_fail_by_name() {
    let cases = [
        ("checkpoint_every = 3", "checkpoint_every = 0", "train.checkpoint_every"),
        ("eval_batches = 2", "eval_batches = 0", "train.eval_batches"),
        ("grad_clip = 1.0", "grad_clip = nan", "train.grad_clip"),
        ("weight_decay = 0.1", "weight_decay = nan", "train.weight_decay"),
        ("weight_decay = 0.1", "weight_decay = -1.0", "train.weight_decay"),
        ("min_lr = 3e-4", "min_lr = nan", "train.min_lr"),
        ("norm_eps = 1e-5", "norm_eps = -1e-5", "model.norm_eps"),
        ("norm_eps = 1e-5", "norm_eps = inf", "model.norm_eps"),
        ("lr = 3e-3", "lr = nan", "train.lr"),
        ("steps = 6", "steps = 6\ndecay_steps = 0", "train.decay_steps"),
        (r#"experiment = "f""#, r#"experiment = "..""#, "experiment"),
        (r#"experiment = "f""#, r#"experiment = "a/../../b""#, "experiment"),
    ];
    for (from, to, field) in cases {
        assert!(BASE.contains(from), "{from}");
        let e = plan_err(&BASE.replace(from, to));
        assert!(e.contains(field), "{to}: error should name {field}: {e}");
    }
}

/// Sizes no machine here can hold are refused from the config, before data or weights exist.
#[test]
fn absurd_sizes_are_refused_before_any_allocation() {
    let plan_cases = [
        ("vocab_size = 32", "vocab_size = 2000000000", "data.vocab_size"),
        (
            "train = [{ seq_len = 16, kv_pairs = 2, examples = 64 }]",
            "train = [{ seq_len = 1000000000, kv_pairs = 2, examples = 64 }]",
            "data.train",
        ),
        ("n_layers = 2", "n_layers = 1000000", "model.n_layers"),
    ];
    for (from, to, field) in plan_cases {
        let e = plan_err(&BASE.replace(from, to));
        assert!(e.contains(field), "{to}: {e}");
    }
    // Valid shapes whose footprint exceeds the device: refused by run_one in well under a second.
    for (from, to) in [("d_model = 16", "d_model = 1000000000"), ("n_layers = 2", "n_layers = 10000\nd_model = 4096")] {
        let text = BASE.replace(from, to).replace("n_heads = 2", "n_heads = 1");
        let text = if to.contains("4096") { text.replace("d_model = 16\n", "") } else { text };
        let run = config::plan(&text, Path::new(".")).unwrap().remove(0);
        let mut env = cpu();
        env.max_memory = Some(24 << 30);
        let t0 = Instant::now();
        let e = format!("{:#}", runner::run_one(&run, &env, &opts(&tmpdir("absurd"))).unwrap_err());
        assert!(t0.elapsed().as_secs_f64() < 2.0, "{to}: took {:?}", t0.elapsed());
        assert!(e.contains("model.d_model") && e.contains("GiB") && e.contains("--max-memory"), "{to}: {e}");
    }
}

/// `zoo bench --skip-train` checks the inference footprint: the 8L/512 model's decode at B = 32,
/// T = 4096 (issue 11's decode shape, refused on the 139 GiB H200 by the training estimate of
/// ~520 GiB) fits, while a training step at that shape is still refused, and inference at a
/// length whose T×T scores alone exceed the limit is refused too.
#[test]
fn inference_is_checked_against_its_own_footprint() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join("configs/bench-baseline.toml")).unwrap();
    let run = config::plan(&text, &root).unwrap().remove(0);
    let vocab = zoo_harness::vocab_size(&run.config).unwrap();
    let h200 = 139.8 * (1u64 << 30) as f64;
    let (train, infer) = (run.config.footprint_at(vocab, 32, 4128), run.config.inference_footprint_at(vocab, 32, 4128));
    assert!(train.check(h200, "bench").is_err(), "{train:?}");
    assert!(infer.check(h200, "bench").is_ok(), "{infer:?}");
    assert_eq!(train.params, infer.params);
    assert!(infer.weight_bytes * 4.0 == train.weight_bytes && infer.activation_bytes < train.activation_bytes / 10.0);
    let e = format!("{}", run.config.inference_footprint_at(vocab, 32, 1 << 17).check(h200, "bench").unwrap_err());
    assert!(e.contains("train.batch_size / sequence length") && e.contains("--max-memory"), "{e}");
}

/// lr = 10 keeps the loss finite but far above where it started: the loss rule catches it and the
/// result records the divergence.
#[test]
fn a_finite_but_diverged_run_is_recorded_as_diverged() {
    let text = BASE
        .replace("lr = 3e-3", "lr = 10.0")
        .replace("min_lr = 3e-4", "min_lr = 1.0")
        .replace("checkpoint_every = 3", "checkpoint_every = 3\nrecord_divergence = true");
    let run = config::plan(&text, Path::new(".")).unwrap().remove(0);
    let res = runner::run_one(&run, &cpu(), &opts(&tmpdir("lr10"))).unwrap().unwrap();
    assert_eq!(res["metrics"]["diverged"], 1.0, "{:#}", res["metrics"]);
    let msg = res["divergence"].as_str().unwrap();
    assert!(msg.contains("diverged") || msg.contains("NaN") || msg.contains("inf"), "{msg}");
}

#[test]
fn the_divergence_rule() {
    use zoo_core::train::diverged;
    assert!(!diverged(3.5, 3.4));
    assert!(!diverged(3.5, 4.4)); // +0.9 nat
    assert!(!diverged(3.5, 5.2)); // +1.7 nat but < 1.5x
    assert!(diverged(3.5, 5.3));
    assert!(diverged(3.5, 250.0));
    assert!(!diverged(0.5, 1.2)); // 2.4x but < 1 nat
}

fn zoo(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_zoo")).args(args).current_dir(dir).output().unwrap()
}

/// A run that fails does not stop the sweep: the other runs finish, and the exit code is 1.
#[test]
fn a_failed_run_does_not_stop_the_sweep() {
    let dir = tmpdir("sweep");
    let text = format!(
        "{BASE}[sweep]\n[[sweep.variants]]\nname = \"bad\"\nset = {{ \"train.lr\" = 10.0, \"train.min_lr\" = 1.0 }}\n[[sweep.variants]]\nname = \"good\"\n"
    );
    std::fs::write(dir.join("c.toml"), text).unwrap();
    let o = zoo(&["run", "c.toml", "-q"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("1 of 2 runs failed") && err.contains("bad"), "{err}");
    assert!(dir.join("results/f/good__lr-0.003__seed-1.json").is_file(), "{err}");
}

/// Results are keyed by content: after the config changes, or when the file is truncated, zoo run
/// does the run again; zoo report skips an unreadable file with a warning.
#[test]
fn stale_or_broken_results_are_not_trusted() {
    let dir = tmpdir("stale");
    std::fs::write(dir.join("c.toml"), BASE).unwrap();
    assert!(zoo(&["run", "c.toml", "-q"], &dir).status.success());
    let out = dir.join("results/f/default__lr-0.003__seed-1.json");
    let first = std::fs::read(&out).unwrap();
    // Unchanged: skipped (the file is not rewritten).
    let o = zoo(&["run", "c.toml"], &dir);
    assert!(String::from_utf8_lossy(&o.stderr).contains("done already"));
    assert_eq!(std::fs::read(&out).unwrap(), first);
    // Edited config: the old result is not trusted.
    std::fs::write(dir.join("c.toml"), BASE.replace("steps = 6", "steps = 3")).unwrap();
    let o = zoo(&["run", "c.toml"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not trusted") && err.contains("train.steps"), "{err}");
    let redone: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(redone["config"]["train"]["steps"], 3);
    // A result copied in from another experiment is not merged into the table.
    let mut alien: serde_json::Value = redone.clone();
    alien["experiment"] = "other-experiment".into();
    alien["run_id"] = "alien".into();
    std::fs::write(dir.join("results/f/alien.json"), serde_json::to_vec(&alien).unwrap()).unwrap();
    let o = zoo(&["report", "results/f"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("alien.json") && err.contains("other-experiment"), "{err}");
    std::fs::remove_file(dir.join("results/f/alien.json")).unwrap();
    // Truncated: not trusted, redone; meanwhile the report skips it with a warning.
    let bytes = std::fs::read(&out).unwrap();
    std::fs::write(&out, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(dir.join("results/f/other.json"), &bytes[..100]).unwrap();
    let o = zoo(&["report", "results/f"], &dir);
    assert!(String::from_utf8_lossy(&o.stderr).contains("skipping"), "{}", String::from_utf8_lossy(&o.stderr));
    // The run's final checkpoint is this config's progress: without --resume it is not
    // overwritten; with --resume the result is written again from it.
    let o = zoo(&["run", "c.toml"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not valid JSON") && err.contains("--resume continues it"), "{err}");
    assert_eq!(o.status.code(), Some(1), "{err}");
    let o = zoo(&["run", "c.toml", "--resume"], &dir);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(again["metrics"], redone["metrics"]);
    assert_eq!(again["curve"], redone["curve"]);
}

/// Checkpoints: a kill between the two renames of a save is recovered; `--resume` refuses a
/// checkpoint from another config, naming the field; a live lock refuses a second process and a
/// stale one is taken over.
#[test]
fn checkpoints_recover_refuse_and_lock() {
    let dir = tmpdir("ckpt");
    std::fs::write(dir.join("c.toml"), BASE.replace("steps = 6", "steps = 6\nrecord_divergence = false")).unwrap();
    let o = zoo(&["run", "c.toml", "-q", "--stop-after", "3"], &dir);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ck = dir.join("runs/f/default__lr-0.003__seed-1/checkpoint");
    assert!(ck.join("COMPLETE").is_file());
    // Killed after `dir` was renamed away and before `dir.tmp` took its place.
    std::fs::rename(&ck, ck.with_extension("tmp")).unwrap();
    let o = zoo(&["run", "c.toml", "-q", "--resume"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("recovered"), "{err}");
    let res: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("results/f/default__lr-0.003__seed-1.json")).unwrap()).unwrap();
    // Uninterrupted twin, for the curve.
    let twin = tmpdir("ckpt-twin");
    std::fs::write(twin.join("c.toml"), BASE.replace("steps = 6", "steps = 6\nrecord_divergence = false")).unwrap();
    assert!(zoo(&["run", "c.toml", "-q"], &twin).status.success());
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(twin.join("results/f/default__lr-0.003__seed-1.json")).unwrap()).unwrap();
    let strip = |c: &serde_json::Value| -> Vec<serde_json::Value> {
        c.as_array().unwrap().iter().map(|p| serde_json::json!([p["step"], p["train_loss"], p["val_loss"]])).collect()
    };
    assert_eq!(strip(&res["curve"]), strip(&want["curve"]));
    // --resume with a different config: refused by name.
    std::fs::write(dir.join("c.toml"), BASE.replace("weight_decay = 0.1", "weight_decay = 0.2")).unwrap();
    let o = zoo(&["run", "c.toml", "-q", "--resume", "--force"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("different config") && err.contains("train.weight_decay"), "{err}");
    // A lock held by a live process (this test's) refuses; a stale one is taken over.
    let lock = dir.join("runs/f/default__lr-0.003__seed-1/lock");
    std::fs::write(&lock, std::process::id().to_string()).unwrap();
    let o = zoo(&["run", "c.toml", "-q", "--force"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is training it") && err.contains("lock") && err.contains("skipping"), "{err}");
    std::fs::write(&lock, "999999999").unwrap();
    let o = zoo(&["run", "c.toml", "-q", "--force"], &dir);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!lock.exists());
}

#[test]
fn bench_and_eval_reject_zero_sizes() {
    let dir = tmpdir("cli");
    std::fs::write(dir.join("c.toml"), BASE).unwrap();
    for (args, field) in [
        (vec!["bench", "c.toml", "--iters", "0"], "--iters"),
        (vec!["bench", "c.toml", "--batch", "0"], "--batch"),
        (vec!["bench", "c.toml", "--seq-lens", "0"], "--seq-lens"),
        (vec!["bench", "c.toml", "--seq-lens", "1000000", "--max-memory", "1GiB"], "GiB"),
        (vec!["bench", "c.toml", "--cuda-graph"], "--cuda-graph: captures one device's step"),
        (vec!["eval", "--checkpoint", "x", "--text", "y", "--seq-len", "0"], "--seq-len"),
        (vec!["eval", "--checkpoint", "x", "--text", "y", "--batch", "0"], "--batch"),
        (vec!["run", "c.toml", "--max-memory", "lots"], "--max-memory"),
    ] {
        let o = zoo(&args, &dir);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(field) && !err.contains("panicked"), "{args:?}: {err}");
    }
}

/// A KV setting given both in the model file's `[kv]` section and on the command line is refused
/// before the model is read, naming the flag and the file.
#[test]
fn kv_settings_come_from_one_place() {
    let dir = tmpdir("kv-cli");
    std::fs::write(dir.join("m.toml"), "[model]\npretrained = \"nowhere.gguf\"\n[kv]\npress = { type = \"knorm\" }\nratio = 0.5\n").unwrap();
    for (args, msg) in [
        (vec!["eval", "--model", "m.toml", "--text", "t.txt", "--press", "type = \"tova\""], "--press: also set in m.toml"),
        (vec!["eval", "--model", "m.toml", "--text", "t.txt", "--ratio", "0.25"], "--ratio: also set in m.toml"),
        (vec!["generate", "--model", "m.toml", "--prompt", "x", "--press", "type = \"tova\""], "--press: also set in m.toml"),
        (vec!["kv", "needle", "--model", "m.toml", "--out", "n.json"], "[kv] section is for zoo eval and zoo generate"),
        (vec!["eval", "--model", "m.toml", "--text", "t.txt", "--keep-tokens", "64"], "--keep-tokens: give --ratio or --keep-tokens"),
        (vec!["generate", "--model", "x.gguf", "--prompt", "x", "--keep-tokens", "64"], "--keep-tokens: needs --press"),
        (vec!["generate", "--model", "x.gguf", "--prompt", "x", "--press", "type = \"knorm\"", "--keep-tokens", "0"], "--keep-tokens: must be at least 1"),
    ] {
        let o = zoo(&args, &dir);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(msg) && !err.contains("panicked"), "{args:?}: {err}");
    }
}

/// The linear mixers form no T×T scores, so their footprint has no term in T²: linear-lm's
/// linear-attention model at batch 16, T 8192 fits an H100 (it was refused at an estimated 212
/// GiB), while its softmax model there is still charged for its scores. The estimate stays above
/// what the linear model took on an H100 at batch 4, T 8192 (`results/bench/linear-scan-chunked-b4`:
/// 4.0 GiB peak through the chunked composition, 2.7 through the scan).
#[test]
fn linear_mixers_are_not_charged_for_attention_scores() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    // The corpus (scripts/fetch-data.sh) by its absolute path: the tests run in crates/harness.
    let corpus = root.join("data/shakespeare.txt").canonicalize().expect("data/shakespeare.txt (scripts/fetch-data.sh)");
    let text = std::fs::read_to_string(root.join("configs/linear-lm.toml"))
        .unwrap()
        .replace("\"data/shakespeare.txt\"", &format!("{:?}", corpus.display().to_string()));
    let runs = config::plan(&text, &root).unwrap();
    let pick = |label: &str| runs.iter().find(|r| r.id.starts_with(label)).unwrap();
    let (softmax, linear) = (pick("transformer__"), pick("linear__"));
    let vocab = zoo_harness::vocab_size(&linear.config).unwrap();
    let h100 = 79.2 * (1u64 << 30) as f64;
    let lin = linear.config.footprint_at(vocab, 16, 8192);
    assert!(lin.check(h100, "bench").is_ok(), "{lin:?}");
    let soft = softmax.config.footprint_at(vocab, 16, 8192);
    assert!(soft.activation_bytes > 10.0 * lin.activation_bytes, "{soft:?} against {lin:?}");
    let measured_b4 = 4006.0 * (1u64 << 20) as f64;
    assert!(linear.config.footprint_at(vocab, 4, 8192).total() > measured_b4);
}

/// Seeded config fuzzer: every `key = value` line of the base config is dropped, duplicated,
/// retyped, scaled by 1e9, set to NaN, zero or a negative number, alone and in pairs. No mutation
/// panics; each rejected config's error names a field (a dotted path or a backquoted key); each
/// accepted one's footprint is either within 24 GiB or refused by name.
#[test]
fn config_fuzzer() {
    let lines: Vec<&str> = BASE.lines().collect();
    let fields: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].contains(" = ")).collect();
    let mutate = |line: &str, how: u64| -> String {
        let (k, v) = line.split_once(" = ").unwrap();
        match how {
            0 => String::new(),
            1 => format!("{line}\n{line}"),
            2 => format!("{k} = \"x\""),
            3 => format!("{k} = {}", scale(v)),
            4 => format!("{k} = nan"),
            5 => format!("{k} = 0"),
            6 => format!("{k} = -3"),
            _ => format!("{k} = [1, 2]"),
        }
    };
    let mut rng = zoo_core::rng::Rng::new(12345);
    let (mut accepted, mut rejected) = (0, 0);
    for trial in 0..3000 {
        let mut ls: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        for _ in 0..1 + trial % 2 {
            let i = fields[rng.below(fields.len())];
            ls[i] = mutate(lines[i], rng.below(8) as u64);
        }
        let text = ls.join("\n");
        let r = std::panic::catch_unwind(|| config::plan(&text, Path::new(".")));
        let Ok(r) = r else { panic!("panic on:\n{text}") };
        match r {
            Err(e) => {
                let e = format!("{e:#}");
                let named = e.contains('`') || e.contains('.') && e.contains(':');
                assert!(named, "error names no field: {e}\n{text}");
                rejected += 1;
            }
            Ok(runs) => {
                for run in runs {
                    let vocab = zoo_harness::vocab_size(&run.config).unwrap();
                    let f = run.config.footprint(vocab);
                    if let Err(e) = f.check((24u64 << 30) as f64, "run") {
                        assert!(format!("{e}").contains("model.d_model"), "{e}");
                    }
                }
                accepted += 1;
            }
        }
    }
    assert!(accepted > 100 && rejected > 1000, "accepted {accepted}, rejected {rejected}");
}

fn scale(v: &str) -> String {
    match v.parse::<f64>() {
        Ok(x) if v.contains('.') || v.contains('e') => format!("{:e}", x * 1e9),
        Ok(x) => format!("{}", (x * 1e9) as i64),
        Err(_) => v.to_string(),
    }
}

fn curve_of(path: &Path) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v["curve"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| serde_json::json!([p["step"], p["train_loss"], p["val_loss"]]))
        .collect()
}

/// 40 steps with a checkpoint after every step.
fn kill_config() -> String {
    BASE.replace("steps = 6", "steps = 40\nrecord_divergence = false")
        .replace("checkpoint_every = 3", "checkpoint_every = 1")
        .replace("eval_every = 3", "eval_every = 10")
}

/// SIGINT and SIGTERM: the step finishes, a checkpoint is written and named, the exit code is
/// 128 + signal, and --resume ends with the uninterrupted curve.
#[test]
fn signals_checkpoint_and_exit_with_128_plus_signal() {
    let twin = tmpdir("sig-twin");
    std::fs::write(twin.join("c.toml"), kill_config()).unwrap();
    assert!(zoo(&["run", "c.toml", "-q"], &twin).status.success());
    let want = curve_of(&twin.join("results/f/default__lr-0.003__seed-1.json"));
    let mut landed = 0;
    for (sig, code) in [("-INT", 130), ("-TERM", 143)] {
        let dir = tmpdir(&format!("sig{sig}"));
        std::fs::write(dir.join("c.toml"), kill_config()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_zoo"))
            .args(["run", "c.toml", "-q"])
            .current_dir(&dir)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for the first checkpoint, so the signal lands mid-training.
        let ck = dir.join("runs/f/default__lr-0.003__seed-1/checkpoint/COMPLETE");
        let t0 = Instant::now();
        while !ck.exists() && t0.elapsed().as_secs() < 30 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap();
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.success() {
            continue; // finished before the signal arrived: nothing to check
        }
        landed += 1;
        assert_eq!(o.status.code(), Some(code), "{sig}: {err}");
        assert!(err.contains("checkpoint saved at") && err.contains("--resume"), "{sig}: {err}");
        let o = zoo(&["run", "c.toml", "-q", "--resume"], &dir);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(curve_of(&dir.join("results/f/default__lr-0.003__seed-1.json")), want, "{sig}");
    }
    assert!(landed >= 1, "no signal arrived before the run finished");
}

/// Kill -9 at 20 seeded random moments (checkpoints are written every step, so many kills land in
/// a save), then --resume until the run completes: the result's curve equals an uninterrupted run's
/// bit for bit.
#[test]
fn kill_nine_anywhere_then_resume_is_bit_identical() {
    let twin = tmpdir("k9-twin");
    std::fs::write(twin.join("c.toml"), kill_config()).unwrap();
    let t0 = Instant::now();
    assert!(zoo(&["run", "c.toml", "-q"], &twin).status.success());
    let full_ms = t0.elapsed().as_millis().max(20) as usize;
    let want = curve_of(&twin.join("results/f/default__lr-0.003__seed-1.json"));
    let mut rng = zoo_core::rng::Rng::new(99);
    let mut killed = 0;
    for trial in 0..20 {
        let dir = tmpdir(&format!("k9-{trial}"));
        std::fs::write(dir.join("c.toml"), kill_config()).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_zoo"))
            .args(["run", "c.toml", "-q"])
            .current_dir(&dir)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(rng.below(full_ms) as u64));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
        }
        child.wait().unwrap();
        let mut ok = false;
        for _ in 0..3 {
            let o = zoo(&["run", "c.toml", "-q", "--resume"], &dir);
            if o.status.success() {
                ok = true;
                break;
            }
            eprintln!("trial {trial}: resume failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        assert!(ok, "trial {trial}: resume never completed");
        assert_eq!(curve_of(&dir.join("results/f/default__lr-0.003__seed-1.json")), want, "trial {trial}");
    }
    assert!(killed >= 10, "only {killed} of 20 trials were killed mid-run");
}

/// Two processes on one sweep directory: every run is trained by exactly one of them, every result
/// exists once and parses, and both exit 0.
#[test]
fn two_processes_share_a_sweep() {
    let dir = tmpdir("two");
    let text = format!("{}[sweep]\nseeds = [0, 1, 2, 3, 4, 5]\n", BASE.replace("steps = 6", "steps = 12"));
    std::fs::write(dir.join("c.toml"), text).unwrap();
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_zoo"))
            .args(["run", "c.toml"])
            .current_dir(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let logs = [String::from_utf8_lossy(&a.stderr).to_string(), String::from_utf8_lossy(&b.stderr).to_string()];
    assert!(a.status.success() && b.status.success(), "{logs:#?}");
    for seed in 0..6 {
        let id = format!("default__lr-0.003__seed-{seed}");
        let trained: usize = logs.iter().map(|l| l.lines().filter(|x| x.ends_with(&format!("] {id}"))).count()).sum();
        let skipped_locked: usize = logs
            .iter()
            .map(|l| {
                l.matches(&format!("run `{id}`: process")).count() + l.matches(&format!("run `{id}`: another")).count()
            })
            .sum();
        // Started once for real; any second start found the lock (or the finished result).
        assert!(trained >= 1 && trained - skipped_locked == 1, "{id}: {logs:#?}");
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(format!("results/f/{id}.json"))).unwrap()).unwrap();
        assert_eq!(v["run_id"], id.as_str());
    }
}

/// A results path that is a file: the error names it.
#[test]
fn io_errors_name_their_path() {
    let dir = tmpdir("io");
    std::fs::write(dir.join("c.toml"), BASE).unwrap();
    std::fs::write(dir.join("blocked"), "a file where a folder should be").unwrap();
    let o = zoo(&["run", "c.toml", "-q", "--results-dir", "blocked"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("blocked"), "{err}");
}

/// Broken checkpoint files and unusable paths: each error names the file or folder.
#[test]
fn broken_checkpoints_and_bad_paths_name_the_file() {
    let dir = tmpdir("broken");
    std::fs::write(dir.join("c.toml"), BASE).unwrap();
    assert!(zoo(&["run", "c.toml", "-q", "--stop-after", "3"], &dir).status.success());
    let ck = dir.join("runs/f/default__lr-0.003__seed-1/checkpoint");
    // A truncated optimiser state, then a garbage state.json.
    let optim = std::fs::read(ck.join("optim.safetensors")).unwrap();
    std::fs::write(ck.join("optim.safetensors"), &optim[..optim.len() / 3]).unwrap();
    let o = zoo(&["run", "c.toml", "-q", "--resume"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("optim.safetensors"), "{err}");
    std::fs::write(ck.join("optim.safetensors"), &optim).unwrap();
    std::fs::write(ck.join("state.json"), "{ not json").unwrap();
    let o = zoo(&["run", "c.toml", "-q", "--resume"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("state.json"), "{err}");
    // A results folder that cannot be created (under /proc) and a config that cannot be read.
    let o = zoo(&["run", "c.toml", "-q", "--force", "--results-dir", "/proc/zoo-results"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/proc/zoo-results"), "{err}");
    let o = zoo(&["run", "missing.toml"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(2) && err.contains("missing.toml"), "{err}");
}

/// `--kernels` takes `fused` or `naive` and nothing else, before any work.
#[test]
fn kernels_flag_takes_fused_or_naive() {
    let dir = tmpdir("kernels");
    std::fs::write(dir.join("c.toml"), BASE).unwrap();
    let o = zoo(&["--kernels", "naive", "run", "c.toml", "--dry-run"], &dir);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = zoo(&["--kernels", "fast", "run", "c.toml", "--dry-run"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--kernels") && err.contains("fused, naive"), "{err}");
    assert!(!dir.join("results").exists());
}

/// Data-parallel launches fail before any work, naming what is wrong: a CPU device, a batch that
/// does not split over the ranks, a half-set world (exit 2, as every refused command), and `zoo
/// launch` returns the ranks' failure.
#[test]
fn data_parallel_misuse_is_refused_before_any_work() {
    let dir = tmpdir("dist");
    std::fs::write(dir.join("c.toml"), BASE).unwrap();
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_zoo")).args(args).envs(env.iter().copied()).current_dir(&dir).output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (code, err) = run(&[("WORLD_SIZE", "2"), ("RANK", "0")], &["run", "c.toml", "-q"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--device cpu") && err.contains("pass --device cuda"), "{err}");
    let (code, err) = run(&[("WORLD_SIZE", "3"), ("RANK", "0")], &["--device", "cuda", "run", "c.toml", "-q"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("train.batch_size = 4 does not split evenly over WORLD_SIZE = 3"), "{err}");
    let (code, err) = run(&[("WORLD_SIZE", "2")], &["run", "c.toml", "-q"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("WORLD_SIZE=2 is set but RANK is not"), "{err}");
    // The launcher starts both ranks; the first to refuse the CPU device fails the launch, which
    // stops the other (it may be stopped before it says anything) and exits with that status.
    let (code, err) = run(&[], &["launch", "--gpus", "2", "run", "c.toml", "-q"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("pass --device cuda") && err.contains("exited with 2; stopping the others"), "{err}");
    assert!(!dir.join("results").exists(), "nothing ran");
}
