//! End-to-end checks of the harness: gradient flow for every registered variant, determinism,
//! kill-and-resume, non-finite loss, bad configs, sweeps and shards, eval.

use std::path::{Path, PathBuf};
use std::process::Command;
use zoo_core::mixer::Phase;
use zoo_harness::config::{self, PlannedRun};
use zoo_harness::env::Env;
use zoo_harness::runner::{self, RunOpts};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("zoo-test-{}-{}", name, std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cpu() -> Env {
    Env::parse("cpu", "f32").unwrap()
}

const MQAR: &str = r#"
experiment = "t"
seed = 3
[model]
d_model = 16
n_layers = 2
mixer = { type = "attention", n_heads = 2 }
ffn = { type = "none" }
[data]
type = "mqar"
vocab_size = 32
train = [{ seq_len = 16, kv_pairs = 2, examples = 64 }]
test = [{ seq_len = 16, kv_pairs = 2, examples = 16 }]
[train]
steps = 8
batch_size = 4
lr = 3e-3
warmup_steps = 2
eval_every = 2
checkpoint_every = 2
"#;

fn one(text: &str) -> PlannedRun {
    let mut runs = config::plan(text, Path::new(".")).unwrap();
    assert_eq!(runs.len(), 1);
    runs.remove(0)
}

/// Every registered mixer's example configs (each method file lists its own in `examples()`).
fn mixers() -> Vec<zoo_harness::registry::MixerConfig> {
    <zoo_harness::registry::MixerConfig as zoo_core::mixer::MixerSpec>::examples()
}

/// A planned run from `text` with its single mixer replaced by `m`.
fn one_with(text: &str, m: &zoo_harness::registry::MixerConfig) -> PlannedRun {
    let mut run = one(text);
    run.config.model.mixer = Some(m.clone());
    run
}

/// Lightning's depth schedule counts only the Simple GLA layers of the stack: in Zoology's
/// [conv, mixer, conv, mixer] layout the two mixers are layers 0 and 1 of 2 (not 1 and 3 of 4,
/// which left the last one with a log-decay of ≈ −1e-5·slope: plain linear attention).
#[test]
fn lightning_depth_counts_its_own_layers() {
    use zoo_harness::registry::{kind_positions, MixerConfig};
    let conv: MixerConfig = toml::from_str(r#"type = "short_conv""#).unwrap();
    let sg: MixerConfig = toml::from_str("type = \"simple_gla\"\nn_heads = 2").unwrap();
    let pos = kind_positions(&[conv.clone(), sg.clone(), conv, sg]);
    assert_eq!(pos, vec![(0, 2), (0, 2), (1, 2), (1, 2)]);
    // And the layer built from that position gets the schedule of mixer layer 1 of 2.
    let store = zoo_core::params::ParamStore::new(0, zoo_core::candle_core::DType::F32, &cpu().device);
    let ctx = zoo_core::mixer::BuildCtx {
        d_model: 8,
        n_layers: 4,
        layer: 3,
        max_seq_len: 16,
        kind_layer: pos[3].0,
        kind_layers: pos[3].1,
    };
    let cfg: zoo_linear_attention::simple_gla::SimpleGlaConfig = toml::from_str("n_heads = 2").unwrap();
    let layer = zoo_linear_attention::simple_gla::SimpleGla::new(&cfg, &ctx, &store.root()).unwrap();
    let got: Vec<f32> = layer.fixed_log_decay().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let want = zoo_linear_attention::simple_gla::lightning_log_decay(2, 1, 2);
    for (g, w) in got.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
    // The first mixer (stack layer 1) is Lightning layer 0 of 2: the full slope (2 heads: 2^-4,
    // 2^-8), not 2/3 of it as layer 1 of 4 gave.
    let first = zoo_linear_attention::simple_gla::lightning_log_decay(2, pos[1].0, pos[1].1);
    assert!((first[0] + 0.0625 * (1.0 + 1e-5)).abs() < 1e-12, "{first:?}");
    let old = zoo_linear_attention::simple_gla::lightning_log_decay(2, 1, 4);
    assert!((old[0] - first[0]).abs() > 0.02);
}

/// Finite differences: for every linear mixer example configuration, the analytic directional
/// derivative ⟨∇L, u⟩ (L = Σ y ⊙ r over a random input, u a random direction over the input and all
/// parameters, 0.05·N(0, 1) per element) equals the central difference (L(θ + εu) − L(θ − εu)) / 2ε.
/// The layers compute in f32, so ε = 3e-3 (where the difference agrees to ~1e-4 on every config)
/// and a 1% tolerance; a wrong or missing gradient term is off by O(1).
#[test]
fn linear_mixers_match_finite_differences() {
    use zoo_core::candle_core::{Device, Tensor, Var};
    use zoo_core::mixer::MixerSpec;
    let linear = ["linear_attention", "retnet", "gla", "simple_gla", "based", "deltanet"];
    let mut rng = zoo_core::rng::Rng::new(9);
    let mut randn = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| rng.normal() as f32).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
    };
    let (b, t, d) = (1, 9, 16);
    let mut checked = 0;
    for cfg in mixers() {
        let m = format!("{cfg:?}");
        if !linear.contains(&cfg.kind().as_str()) {
            continue;
        }
        let store = zoo_core::params::ParamStore::new(1, zoo_core::candle_core::DType::F32, &Device::Cpu);
        let ctx = zoo_core::mixer::BuildCtx {
            d_model: d,
            n_layers: 2,
            layer: 0,
            max_seq_len: t,
            kind_layer: 0,
            kind_layers: 2,
        };
        let mixer = cfg.build(&ctx, &store.root()).unwrap();
        let x = Var::from_tensor(&randn(&[b, t, d])).unwrap();
        let r = randn(&[b, t, d]);
        let mut vars: Vec<Var> = store.vars().into_iter().map(|(_, v)| v).collect();
        vars.push(x.clone());
        // Perturb every tensor (norm gains and biases included) so no term sits at a special point.
        for v in &vars {
            let n = randn(v.dims());
            v.set(&(v.as_tensor() + (n * 0.05).unwrap()).unwrap()).unwrap();
        }
        let loss = |x: &Tensor| -> f64 {
            let y = mixer.forward(x, Phase::Train, None, None).unwrap();
            (y * &r).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
        };
        let y = mixer.forward(x.as_tensor(), Phase::Train, None, None).unwrap();
        let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for trial in 0..2 {
            // Steps of 0.05 ε per element: small next to the weights (N(0, 0.02) at init).
            let us: Vec<Tensor> = vars.iter().map(|v| (randn(v.dims()) * 0.05).unwrap()).collect();
            let analytic: f64 = vars
                .iter()
                .zip(&us)
                .map(|(v, u)| match grads.get(v.as_tensor()) {
                    Some(g) => (g * u).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64,
                    None => 0.0,
                })
                .sum();
            let orig: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
            let eps = 3e-3;
            let at = |sign: f64| {
                for ((v, o), u) in vars.iter().zip(&orig).zip(&us) {
                    v.set(&(o + (u * (sign * eps)).unwrap()).unwrap()).unwrap();
                }
                loss(x.as_tensor())
            };
            let numeric = (at(1.0) - at(-1.0)) / (2.0 * eps);
            for (v, o) in vars.iter().zip(&orig) {
                v.set(o).unwrap();
            }
            let err = (analytic - numeric).abs() / numeric.abs().max(1e-2);
            assert!(err < 1e-2, "{m} (trial {trial}): analytic {analytic:.6} vs finite difference {numeric:.6}");
        }
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} linear mixer configs checked");
}

/// A 1:1 hybrid (GLA, attention) decodes across its mixed caches (a recurrent state and a KV cache).
const HYBRID: &str = r#"{ type = "gla", n_heads = 2, chunk = 4 }
mixers.attn = { type = "attention", n_heads = 2 }
mixers.lin = { type = "gla", n_heads = 2, chunk = 4 }
pattern = { repeat = ["lin", "attn"] }"#;

fn with_mixer(m: &str) -> String {
    MQAR.replace(r#"mixer = { type = "attention", n_heads = 2 }"#, &format!("mixer = {m}"))
}

/// Every registered layer configuration: each parameter gets a finite, non-zero gradient.
#[test]
fn gradient_flow_every_variant() {
    use zoo_core::mixer::FfnSpec;
    let ffns = zoo_harness::registry::FfnConfig::examples();
    assert_eq!(ffns.len(), 7);
    for m in mixers() {
        for f in &ffns {
            for tie in [true, false] {
                let text = with_mixer(&format!("{{ type = \"attention\", n_heads = 2 }}\ntie_embeddings = {tie}"));
                let mut run = one_with(&text, &m);
                run.config.model.ffn = f.clone();
                let (model, store) = runner::build_model(&run.config, 32, &cpu()).unwrap();
                let problems = zoo_core::check::gradient_flow(&model, &store, 2, 12, 0).unwrap();
                assert!(problems.is_empty(), "mixer {m:?} ffn {f:?} tie {tie}: {problems:?}");
            }
        }
    }
}

/// The gradient-flow check catches a fused, no-backward op: a mixer that normalises its input
/// with candle's fused `ops::rms_norm` cuts the gradient to everything below it.
#[test]
fn gradient_flow_catches_fused_norm() {
    use zoo_core::candle_core::{Result, Tensor};
    use zoo_core::mixer::{LayerProbe, LayerState, Mixer, Phase};
    struct FusedNormAttention {
        inner: zoo_core::attention::Attention,
        ones: Tensor,
    }
    impl Mixer for FusedNormAttention {
        fn forward(
            &self,
            x: &Tensor,
            ph: Phase,
            c: Option<&mut LayerState>,
            p: Option<&mut LayerProbe>,
        ) -> Result<Tensor> {
            let x = zoo_core::candle_nn::ops::rms_norm(&x.contiguous()?, &self.ones, 1e-5)?;
            self.inner.forward(&x, ph, c, p)
        }
        fn new_state(&self, capacity: usize) -> LayerState {
            self.inner.new_state(capacity)
        }
        fn cache_bytes(&self, b: usize, t: usize, d: zoo_core::candle_core::DType) -> usize {
            self.inner.cache_bytes(b, t, d)
        }
        fn kind(&self) -> String {
            "broken".into()
        }
    }
    let run = one(MQAR);
    let env = cpu();
    let store = zoo_core::params::ParamStore::new(0, zoo_core::candle_core::DType::F32, &env.device);
    let shape = zoo_core::model::LmShape {
        vocab_size: 32,
        d_model: 16,
        n_layers: 2,
        tie_embeddings: false,
        norm_eps: 1e-5,
        max_seq_len: 16,
    };
    let cfg = match &run.config.model.mixer {
        Some(zoo_harness::registry::MixerConfig::Attention(c)) => c.clone(),
        _ => unreachable!(),
    };
    let model = zoo_core::model::Lm::new(&shape, zoo_core::candle_core::DType::F32, &store.root(), |ctx, pb| {
        let inner = zoo_core::attention::Attention::new(&cfg, ctx, &pb.pp("mixer"))?;
        let ones = Tensor::ones(16, zoo_core::candle_core::DType::F32, &env.device)?;
        Ok((Box::new(FusedNormAttention { inner, ones }) as Box<dyn Mixer>, None))
    })
    .unwrap();
    let problems = zoo_core::check::gradient_flow(&model, &store, 2, 12, 0).unwrap();
    // The fused norm sits between norm1 and the attention projections: norm1's gain is cut off.
    assert!(problems.iter().any(|p| p.starts_with("layers.0.norm1.weight")), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("layers.1.norm1.weight")), "{problems:?}");
}

/// Every registered mixer keeps the shared contract on its examples (gradient flow, decode parity,
/// cache bytes, determinism).
#[test]
fn registered_mixers_keep_the_contract() {
    let problems = zoo_core::check::mixer_contract::<zoo_harness::registry::MixerConfig>().unwrap();
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(mixers().len() >= 28, "only {} examples", mixers().len());
}

/// Every registered mixer: prefill + one-token decode reproduces the full forward, and the cache
/// holds exactly `cache_bytes`.
#[test]
fn decode_matches_full_forward_every_variant() {
    use zoo_core::candle_core::Device;
    let hybrid = with_mixer(HYBRID).replacen("mixer = { type = \"gla\", n_heads = 2, chunk = 4 }\n", "", 1);
    let base = with_mixer(r#"{ type = "attention", n_heads = 2 }"#);
    let runs =
        mixers().into_iter().map(|m| (format!("{m:?}"), one_with(&base, &m))).chain([("hybrid".into(), one(&hybrid))]);
    for (m, run) in runs {
        let (model, _) = runner::build_model(&run.config, 32, &cpu()).unwrap();
        let x = zoo_core::check::random_ids(&mut zoo_core::rng::Rng::new(2), 2, 14, 32, &Device::Cpu).unwrap();
        let (rel, cache) = zoo_core::check::decode_parity(&model, &x, 6).unwrap();
        assert!(rel < 1e-5, "{m}: relative error {rel}");
        assert_eq!(cache.iter().map(|c| c.bytes()).sum::<usize>(), model.cache_bytes(2, 14), "{m}");
    }
}

fn opts(dir: &Path, stop_after: Option<usize>, resume: bool) -> RunOpts {
    RunOpts {
        results_dir: dir.join("results"),
        runs_dir: dir.join("runs"),
        resume,
        force: false,
        quiet: true,
        stop_after,
        comm: None,
    }
}

fn curve(res: &serde_json::Value) -> Vec<(u64, f64, f64, f64)> {
    res["curve"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["step"].as_u64().unwrap(),
                c["train_loss"].as_f64().unwrap(),
                c["val_loss"].as_f64().unwrap(),
                c["lr"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Same seed, same numbers; another seed, other numbers.
#[test]
fn training_is_deterministic_on_cpu() {
    let run = one(MQAR);
    let a = runner::run_one(&run, &cpu(), &opts(&tmpdir("det-a"), None, false)).unwrap().unwrap();
    let b = runner::run_one(&run, &cpu(), &opts(&tmpdir("det-b"), None, false)).unwrap().unwrap();
    assert_eq!(curve(&a), curve(&b));
    assert_eq!(a["metrics"], b["metrics"]);
    let other = one(&MQAR.replace("seed = 3", "seed = 4"));
    let c = runner::run_one(&other, &cpu(), &opts(&tmpdir("det-c"), None, false)).unwrap().unwrap();
    assert_ne!(curve(&a), curve(&c));
}

/// A run killed after 5 of 8 steps (last checkpoint at step 4) and resumed gives exactly the
/// loss curve of an uninterrupted run, through the `zoo` binary.
#[test]
fn kill_and_resume_matches_uninterrupted() {
    resume_matches(MQAR, "resume");
}

/// The same with an MoE whose routing carries state between steps (the aux-loss-free selection
/// bias, saved with the checkpoint) and draws training noise (from the step, so a resumed run
/// draws the same).
#[test]
fn kill_and_resume_matches_uninterrupted_with_router_state() {
    // γ = 1 makes the bias decide the selection from the first update on; a checkpoint every step,
    // and the kill after 3, so a resume that lost the bias routes step 4 differently (it did).
    let moe = r#"ffn = { type = "moe", n_experts = 4, top_k = 1, expert_hidden = 8, balance = { type = "bias", gamma = 1.0 }, noise = { type = "jitter", eps = 0.1 } }"#;
    let text = MQAR.replace(r#"ffn = { type = "none" }"#, moe).replace("checkpoint_every = 2", "checkpoint_every = 1");
    resume_matches(&text, "resume-moe");
}

fn resume_matches(text: &str, name: &str) {
    let dir = tmpdir(name);
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, text.replace("eval_every = 2", "eval_every = 3")).unwrap();
    let zoo = |args: &[&str], out: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_zoo"))
            .args(["run", cfg.to_str().unwrap(), "-q", "--results-dir", &format!("{}/{out}/results", dir.display())])
            .args(["--runs-dir", &format!("{}/{out}/runs", dir.display())])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    zoo(&[], "straight");
    zoo(&["--stop-after", "3"], "killed");
    let rid = one(text).id;
    let killed_result = dir.join(format!("killed/results/t/{rid}.json"));
    assert!(!killed_result.exists(), "a killed run must not leave a result");
    zoo(&["--resume"], "killed");
    let read = |p: PathBuf| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let a = read(dir.join(format!("straight/results/t/{rid}.json")));
    let b = read(killed_result);
    assert_eq!(curve(&a), curve(&b));
    assert_eq!(a["metrics"], b["metrics"]);
}

/// A non-finite loss stops the run with a clear error, keeps a finite checkpoint, writes no result.
#[test]
fn nan_loss_stops_and_keeps_checkpoint() {
    let dir = tmpdir("nan");
    let run = one(&MQAR
        .replace("lr = 3e-3", "lr = 1e30")
        .replace("warmup_steps = 2", "warmup_steps = 0")
        .replace("checkpoint_every = 2", "checkpoint_every = 1"));
    let err = runner::run_one(&run, &cpu(), &opts(&dir, None, false)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("non-finite") || msg.contains("became"), "{msg}");
    assert!(msg.contains("last good checkpoint (step 1) is kept"), "{msg}");
    let ckpt = runner::checkpoint_dir(&dir.join("runs"), &run);
    let t =
        zoo_core::candle_core::safetensors::load(ckpt.join("model.safetensors"), &zoo_core::candle_core::Device::Cpu)
            .unwrap();
    for (k, v) in t {
        let m = v.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(m.is_finite(), "{k} is not finite in the kept checkpoint");
    }
    assert!(!runner::result_path(&dir.join("results"), &run).exists());
}

/// With `record_divergence`, a non-finite loss ends the run with a result marked diverged (for LR
/// stability sweeps) instead of an error.
#[test]
fn divergence_is_recorded_when_asked() {
    let dir = tmpdir("diverge");
    let run = one(&MQAR
        .replace("lr = 3e-3", "lr = 1e30")
        .replace("warmup_steps = 2", "warmup_steps = 0\nrecord_divergence = true"));
    let res = runner::run_one(&run, &cpu(), &opts(&dir, None, false)).unwrap().unwrap();
    assert_eq!(res["metrics"]["diverged"], 1.0);
    let at = res["metrics"]["diverged_at_step"].as_u64().unwrap();
    assert!((1..=8).contains(&at), "{at}");
    assert!(res["metrics"].get("val_loss,final").is_none());
    assert!(
        res["divergence"].as_str().unwrap().contains("non-finite")
            || res["divergence"].as_str().unwrap().contains("became")
    );
    assert!(runner::result_path(&dir.join("results"), &run).exists());
    // A healthy run records no divergence.
    let ok = runner::run_one(&one(MQAR), &cpu(), &opts(&tmpdir("diverge-ok"), None, false)).unwrap().unwrap();
    assert_eq!(ok["metrics"]["diverged"], 0.0);
}

/// Bad configs: non-zero exit, an error naming the field and the reason, and nothing written.
#[test]
fn bad_configs_fail_early_with_named_field() {
    let cases: &[(&str, &str, &[&str])] = &[
        ("unknown field", &MQAR.replace("steps = 8", "steps = 8\nstepz = 3"), &["train", "unknown field `stepz`"]),
        (
            "unknown mixer field",
            &MQAR.replace("n_heads = 2 }", "n_heads = 2, heads = 3 }"),
            &["model.mixer", "unknown field `heads`"],
        ),
        ("heads", &MQAR.replace("n_heads = 2", "n_heads = 3"), &["n_heads", "do not divide d_model = 16"]),
        (
            "kv heads",
            &MQAR.replace("n_heads = 2", "n_heads = 4, n_kv_heads = 3"),
            &["n_kv_heads", "not a multiple of n_kv_heads = 3"],
        ),
        (
            "window",
            &MQAR.replace("n_heads = 2", "n_heads = 2, window = 64"),
            &["window", "larger than the sequence length 16"],
        ),
        (
            "missing file",
            r#"experiment = "t"
[model]
d_model = 16
n_layers = 1
mixer = { type = "attention", n_heads = 2 }
[data]
type = "text"
paths = ["/nonexistent/corpus.txt"]
tokenizer = { type = "chars" }
[train]
steps = 2
batch_size = 2
seq_len = 8
lr = 1e-3
"#,
            &["data.paths", "/nonexistent/corpus.txt", "not found"],
        ),
        (
            "model vocab below the data's",
            &MQAR.replace("n_layers = 2", "n_layers = 2\nvocab_size = 16"),
            &["model.vocab_size", "smaller than data.vocab_size (32)"],
        ),
        (
            "the model's tokenizer without a pretrained model",
            &MQAR.replace(
                "type = \"mqar\"\nvocab_size = 32\ntrain = [{ seq_len = 16, kv_pairs = 2, examples = 64 }]\ntest = [{ seq_len = 16, kv_pairs = 2, examples = 16 }]",
                "type = \"text\"\npaths = [\"Cargo.toml\"]\ntokenizer = { type = \"model\" }",
            ).replace("batch_size = 4", "batch_size = 4\nseq_len = 8"),
            &["data.tokenizer", "[model] pretrained"],
        ),
        (
            "unknown mixer type",
            &MQAR.replace(r#"type = "attention""#, r#"type = "attn""#),
            &["model.mixer", "unknown variant `attn`"],
        ),
        (
            "mqar too short",
            &MQAR.replace("kv_pairs = 2, examples = 64", "kv_pairs = 6, examples = 64"),
            &["data.train[0].seq_len"],
        ),
        (
            "sweep path",
            &format!("{MQAR}\n[sweep.grid]\n\"model.d_model\" = [\"wide\"]\n"),
            &["model.d_model", "invalid type"],
        ),
    ];
    for (name, text, needles) in cases {
        let dir = tmpdir(&format!("bad-{}", name.replace(' ', "-")));
        let cfg = dir.join("c.toml");
        std::fs::write(&cfg, text).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_zoo"))
            .args(["run", cfg.to_str().unwrap(), "-q", "--results-dir"])
            .arg(dir.join("results"))
            .arg("--runs-dir")
            .arg(dir.join("runs"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}: should fail");
        for n in *needles {
            assert!(err.contains(n), "{name}: error should mention `{n}`, got: {err}");
        }
        assert!(!dir.join("results").exists() && !dir.join("runs").exists(), "{name}: wrote files");
    }
}

/// Sweeps expand variants × grid × lrs × seeds; shards partition them; rerun skips finished runs.
#[test]
fn sweep_shards_and_skip() {
    let text = format!(
        "{MQAR}\n[sweep]\nseeds = [0, 1]\nlrs = [1e-3, 3e-3]\n[sweep.grid]\n\"model.d_model\" = [8, 16]\n[[sweep.variants]]\nname = \"mha\"\n[[sweep.variants]]\nname = \"mqa\"\nset = {{ \"model.mixer.n_kv_heads\" = 1 }}\n"
    );
    let runs = config::plan(&text, Path::new(".")).unwrap();
    assert_eq!(runs.len(), 2 * 2 * 2 * 2);
    let ids: std::collections::BTreeSet<_> = runs.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids.len(), runs.len(), "run ids are unique");
    assert!(runs.iter().any(|r| r.label == "mqa,d_model=8"));
    let dir = tmpdir("shard");
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, &text).unwrap();
    let mut all = Vec::new();
    for s in 0..3 {
        let o = Command::new(env!("CARGO_BIN_EXE_zoo"))
            .args(["run", cfg.to_str().unwrap(), "--dry-run", "--shard", &format!("{s}/3")])
            .output()
            .unwrap();
        assert!(o.status.success());
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        all.extend(out.lines().filter(|l| l.contains("__seed-")).map(String::from));
    }
    all.sort();
    assert_eq!(all, ids.into_iter().collect::<Vec<_>>());
    // Run one tiny shard twice: the second time everything is skipped.
    let small = dir.join("small.toml");
    std::fs::write(&small, MQAR.replace("steps = 8", "steps = 2")).unwrap();
    let go = || {
        Command::new(env!("CARGO_BIN_EXE_zoo"))
            .args(["run", small.to_str().unwrap(), "--results-dir"])
            .arg(dir.join("results"))
            .arg("--runs-dir")
            .arg(dir.join("runs"))
            .output()
            .unwrap()
    };
    assert!(go().status.success());
    let o = go();
    assert!(String::from_utf8_lossy(&o.stderr).contains("done already, skipping"));
    assert!(String::from_utf8_lossy(&o.stdout).contains("| run |"), "report table printed");
}

/// Text training with every tokenizer type, then `zoo eval` on the checkpoint.
#[test]
fn text_run_and_eval_checkpoint() {
    let dir = tmpdir("text");
    let corpus = dir.join("corpus.txt");
    let text: String =
        (0..400).map(|i| format!("the {} cat sat on the mat. ", ["red", "blue", "green"][i % 3])).collect();
    std::fs::write(&corpus, &text).unwrap();
    let cfg = format!(
        r#"experiment = "txt"
[model]
d_model = 16
n_layers = 1
mixer = {{ type = "attention", n_heads = 2 }}
[data]
type = "text"
paths = ["{}"]
tokenizer = {{ type = "chars" }}
[train]
steps = 30
batch_size = 4
seq_len = 16
lr = 1e-2
eval_every = 10
eval_batches = 4
"#,
        corpus.display()
    );
    let run = one(&cfg);
    let res = runner::run_one(&run, &cpu(), &opts(&dir, None, false)).unwrap().unwrap();
    let ppl = res["metrics"]["perplexity,none"].as_f64().unwrap();
    let bpb = res["metrics"]["bits_per_byte,none"].as_f64().unwrap();
    assert!(ppl > 1.0 && ppl < 8.0, "char ppl {ppl} should beat the uniform 16-char baseline");
    assert!(bpb > 0.0 && bpb.is_finite());
    assert!(res["params"]["non_embedding"].as_u64().unwrap() < res["params"]["total"].as_u64().unwrap());
    let ckpt = runner::checkpoint_dir(&dir.join("runs"), &run);
    let o = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(["eval", "--checkpoint"])
        .arg(&ckpt)
        .arg("--text")
        .arg(&corpus)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ev: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let eppl = ev["metrics"]["perplexity,none"].as_f64().unwrap();
    assert!(eppl > 1.0 && eppl < 8.0, "eval ppl {eppl}");
    // Bytes tokenizer too.
    let run = one(&cfg.replace(r#"type = "chars""#, r#"type = "bytes""#).replace("\"txt\"", "\"txt-bytes\""));
    let res = runner::run_one(&run, &cpu(), &opts(&dir, None, false)).unwrap().unwrap();
    assert!(res["metrics"]["perplexity,none"].as_f64().unwrap() < 256.0);
    // And a HuggingFace tokenizer.json (word level, whitespace pre-tokenizer), through `tokenizers`.
    let tok = dir.join("tokenizer.json");
    let words = ["the", "red", "blue", "green", "cat", "sat", "on", "mat.", "[UNK]"];
    let vocab: serde_json::Map<String, serde_json::Value> =
        words.iter().enumerate().map(|(i, w)| (w.to_string(), serde_json::json!(i))).collect();
    let tj = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": { "type": "WhitespaceSplit" }, "post_processor": null, "decoder": null,
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]" }
    });
    std::fs::write(&tok, serde_json::to_vec(&tj).unwrap()).unwrap();
    let t = zoo_core::data::Tokenizer::hf(&tok).unwrap();
    assert_eq!(t.vocab_size(), 9);
    assert_eq!(t.encode("the red cat sat on the mat.").unwrap(), vec![0, 1, 4, 5, 6, 0, 7]);
    let run = one(&cfg
        .replace(
            r#"tokenizer = { type = "chars" }"#,
            &format!(r#"tokenizer = {{ type = "hf", path = "{}" }}"#, tok.display()),
        )
        .replace("\"txt\"", "\"txt-hf\""));
    let res = runner::run_one(&run, &cpu(), &opts(&dir, None, false)).unwrap().unwrap();
    let ppl = res["metrics"]["perplexity,none"].as_f64().unwrap();
    assert!(ppl > 1.0 && ppl < 4.0, "word-level ppl {ppl} should beat the 3 colour choices per sentence");
}

/// A mixer's auxiliary loss and statistics reach the model's output through `Mixer::take_aux`
/// (mixture-of-head attention: its routed heads' balance loss and head load), next to the
/// feed-forward's (here a MoE's), and the loss changes with the loss weight.
#[test]
fn mixer_aux_loss_and_stats_reach_the_model_output() {
    let text = MQAR
        .replace(r#"mixer = { type = "attention", n_heads = 2 }"#, r#"mixer = { type = "moh", attention = { n_heads = 4 }, shared_heads = 1, top_k = 2, aux_loss = 0.5 }"#)
        .replace(r#"ffn = { type = "none" }"#, r#"ffn = { type = "moe", n_experts = 2, top_k = 1, expert_hidden = 8, balance = { type = "aux_loss", alpha = 0.01 } }"#);
    let run = one(&text);
    let (model, _) = runner::build_model(&run.config, 32, &cpu()).unwrap();
    let x = zoo_core::check::random_ids(&mut zoo_core::rng::Rng::new(2), 2, 12, 32, &zoo_core::candle_core::Device::Cpu).unwrap();
    let out = model.forward(&x, None, None).unwrap();
    let aux = out.aux_loss.expect("aux loss").to_scalar::<f32>().unwrap();
    // Switch's form is ≥ its weight at any load: 2 layers × (0.5 for the heads + 0.01 for the experts).
    assert!(aux >= 2.0 * 0.51 - 1e-4, "aux {aux}");
    for layer in &out.stats {
        let names: Vec<&str> = layer.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"head_load") && names.contains(&"load"), "{names:?}");
    }
}

/// `zoo report` on MoE runs draws the load heatmap (one cell per layer × expert × curve point
/// that has statistics, the expert's share × E) and the active experts per token over training.
#[test]
fn report_draws_moe_load_over_training() {
    let dir = tmpdir("moe-report");
    let text = MQAR.replace(
        r#"ffn = { type = "none" }"#,
        r#"ffn = { type = "moe", n_experts = 3, top_k = 1, expert_hidden = 8, balance = { type = "aux_loss", alpha = 0.01 } }"#,
    );
    let run = one(&text);
    runner::run_one(&run, &cpu(), &opts(&dir, None, false)).unwrap().unwrap();
    let res = dir.join("results").join("t");
    zoo_harness::report::report(&res).unwrap();
    let svg = std::fs::read_to_string(res.join("moe_load.svg")).unwrap();
    // 8 steps, eval every 2: 4 curve points; 2 layers × 3 experts.
    let cells = svg.matches("<rect x=").count() - 1; // less the panel's frame
    assert_eq!(cells, 4 * 2 * 3, "{svg}");
    let active = std::fs::read_to_string(res.join("moe_active_experts.svg")).unwrap();
    assert!(active.contains("<polyline"), "{active}");
}

/// `zoo report --reference`: the reference's rows beside ours (our value, seeds, the difference),
/// "not run yet" for a label without runs; a bad reference file names the field.
#[test]
fn report_sets_a_reference_beside_the_runs() {
    let dir = tmpdir("reference-report");
    let run = one(MQAR);
    let res = runner::run_one(&run, &cpu(), &opts(&dir, None, false)).unwrap().unwrap();
    let (label, acc) = (res["label"].as_str().unwrap().to_string(), res["metrics"]["mqar_acc,none"].as_f64().unwrap());
    let results = dir.join("results").join("t");
    let reference = dir.join("ref.toml");
    std::fs::write(
        &reference,
        format!(
            "metric = \"mqar_acc,none\"\nsource = \"a paper, Table 1\"\n[[rows]]\nlabel = \"{label}\"\nname = \"Attention\"\nvalue = 0.5\n[[rows]]\nlabel = \"gla\"\nname = \"GLA\"\nvalue = 0.25\n"
        ),
    )
    .unwrap();
    let md = zoo_harness::report::report_with(&results, Some(&reference)).unwrap();
    assert!(md.contains("beside a paper, Table 1"), "{md}");
    let ours = format!("| {label} | Attention | {acc:.3} | 1 | ");
    assert!(md.contains(&ours) && md.contains(&format!("| 0.500 | {:+.3} |", acc - 0.5)), "{md}");
    assert!(md.contains("| gla | GLA | not run yet | 0 | – | 0.250 | – |"), "{md}");
    std::fs::write(&reference, "metric = \"x\"\nsource = \"s\"\n[[rows]]\nlabel = \"a\"\nname = \"b\"\nvalu = 1.0\n").unwrap();
    let e = format!("{:#}", zoo_harness::report::report_with(&results, Some(&reference)).unwrap_err());
    assert!(e.contains("ref.toml") && e.contains("valu"), "{e}");
    // A grid finished on two machines names both, with their run counts.
    let name = res["env"]["device"]["name"].as_str().unwrap().to_string();
    assert!(md.contains(&format!("\nDevice: {name} (")), "{md}");
    let mut other = res.clone();
    other["seed"] = 7.into();
    other["env"]["device"]["name"] = "A GPU".into();
    // A result written before a metric existed: the row's cell says it covers 1 of the 2 runs.
    let spikes = res["metrics"]["loss_spikes,robust"].as_f64().expect("the robust spike count");
    other["metrics"].as_object_mut().unwrap().remove("loss_spikes,robust");
    std::fs::write(results.join("other-device.json"), serde_json::to_string(&other).unwrap()).unwrap();
    let md = zoo_harness::report::report(&results).unwrap();
    assert!(md.contains(&format!("Devices: A GPU (1 run), {name} (1 run),")), "{md}");
    assert!(md.contains(&format!("| {spikes:.4} (1 of 2) |")), "{md}");
}

/// `zoo report` on a folder of press evaluations: one row per press, one column per ratio, the
/// full cache beside them, and the plot; files of other schemas are ignored.
#[test]
fn report_tabulates_press_evaluations() {
    let dir = tmpdir("press-report");
    let eval = |press: serde_json::Value, ratio: f64, ppl: f64| {
        serde_json::json!({
            "schema": zoo_harness::schema::PRESS_SCHEMA, "model": "m.gguf", "text": "t.txt", "tokens": 100,
            "chunk": 16, "press": press, "ratio": ratio, "perplexity": ppl,
            "env": { "device": { "kind": "cpu", "name": "test cpu", "threads": 2 }, "dtype": "f32" },
        })
    };
    let files = [
        ("full", eval(serde_json::json!({"type": "knorm"}), 0.0, 10.0)),
        ("k5", eval(serde_json::json!({"type": "knorm"}), 0.5, 12.5)),
        ("k75", eval(serde_json::json!({"type": "knorm"}), 0.75, 15.25)),
        ("s5", eval(serde_json::json!({"type": "snapkv", "window": 64, "kernel": 5}), 0.5, 11.0)),
        ("p5", {
            let mut v = eval(serde_json::json!({"type": "knorm"}), 0.5, 12.0);
            v["budget"] = serde_json::json!({"type": "pyramid", "beta": 20.0});
            v
        }),
        ("other", serde_json::json!({"schema": "something/1"})),
    ];
    for (n, v) in &files {
        std::fs::write(dir.join(format!("{n}.json")), v.to_string()).unwrap();
    }
    let md = zoo_harness::report::report(&dir).unwrap();
    assert!(md.contains("| press | ratio 0 (full cache) | 0.5 | 0.75 |"), "{md}");
    assert!(md.contains("| knorm | 10.00 | 12.50 | 15.25 |"), "{md}");
    assert!(md.contains("| snapkv (kernel=5, window=64) | 10.00 | 11.00 | – |"), "{md}");
    assert!(md.contains("| knorm, pyramid (beta=20.0) | 10.00 | 12.00 | – |"), "{md}");
    assert!(dir.join("press_ppl.svg").exists() && dir.join("report.md").exists());
}

/// `zoo report` on `zoo generate --stats` JSONs: speed against the full cache of the same prompt
/// length, and the share of the full cache's bytes held.
#[test]
fn report_tabulates_generations_against_the_full_cache() {
    let dir = tmpdir("generate-report");
    let gen = |press: Option<&str>, ratio: f64, tps: f64, held: u64| {
        serde_json::json!({
            "schema": zoo_harness::schema::GENERATE_SCHEMA, "model": "m.gguf", "prompt_tokens": 100,
            "press": press.map(|p| serde_json::json!({"type": p})), "ratio": ratio,
            "decode_tokens_per_s": tps, "kv_bytes": held, "kv_allocated_bytes": held, "kv_full_bytes": 1000,
            "env": { "device": { "kind": "cpu", "name": "test cpu", "threads": 2 }, "dtype": "f32" },
        })
    };
    std::fs::write(dir.join("a.json"), gen(Some("knorm"), 0.875, 15.0, 125).to_string()).unwrap();
    std::fs::write(dir.join("b.json"), gen(None, 0.0, 10.0, 1000).to_string()).unwrap();
    let mut k = gen(None, 0.0, 8.0, 250);
    k["kivi"] = serde_json::json!({"bits": 2, "key_axis": "channel", "value_axis": "token", "group": 32, "residual": 128});
    std::fs::write(dir.join("c.json"), k.to_string()).unwrap();
    let mut d = gen(None, 0.0, 9.0, 500);
    d["duo"] = serde_json::json!({"path": "duo.json", "retrieval": 0.5});
    std::fs::write(dir.join("d.json"), d.to_string()).unwrap();
    let md = zoo_harness::report::report(&dir).unwrap();
    assert!(md.contains("test cpu (2 threads)"), "{md}");
    assert!(md.contains("| 100 | full cache | 10.0 | 1.00× |"), "{md}");
    assert!(md.contains("| 100 | knorm @ 0.875 | 15.0 | 1.50× | 125 B | 125 B | 1000 B | 0.125 |"), "{md}");
    // A KIVI generation is labelled by its config, not taken for the full cache.
    assert!(md.contains("| 100 | KIVI-2 K/channel V/token G32 R128 | 8.0 | 0.80× | 250 B | 250 B | 1000 B | 0.250 |"), "{md}");
    assert!(md.contains("| 100 | DuoAttention, retrieval share 0.5 | 9.0 | 0.90× | 500 B |"), "{md}");
    // Rounds of one (prompt length, press) make one row with the median speed.
    for (i, (press, tps)) in [(None, 20.0), (None, 40.0), (None, 30.0), (Some("knorm"), 12.0), (Some("knorm"), 18.0)].iter().enumerate() {
        let mut v = gen(*press, if press.is_some() { 0.875 } else { 0.0 }, *tps, 100);
        v["prompt_tokens"] = serde_json::json!(200);
        std::fs::write(dir.join(format!("r{i}.json")), v.to_string()).unwrap();
    }
    let md = zoo_harness::report::report(&dir).unwrap();
    assert!(md.contains("| 200 | full cache | 30.0 (median of 3: 20.0–40.0) | 1.00× |"), "{md}");
    assert!(md.contains("| 200 | knorm @ 0.875 | 15.0 (median of 2: 12.0–18.0) | 0.50× |"), "{md}");
    assert!(md.contains("| 100 | full cache | 10.0 | 1.00× |"), "{md}");
}

/// `zoo report` on KIVI evaluations: one row per config, sorted by bits (most first), with the
/// change against the full cache's press evaluation and the bytes held.
#[test]
fn report_tabulates_kivi_evaluations() {
    let dir = tmpdir("kivi-report");
    let env = serde_json::json!({ "device": { "kind": "cpu", "name": "test cpu", "threads": 2 }, "dtype": "f32" });
    let kivi = |bits: u64, axis: &str, res: u64, ppl: f64, bytes: u64| {
        serde_json::json!({
            "schema": zoo_harness::schema::KIVI_SCHEMA, "model": "m.gguf", "text": "t.txt", "tokens": 100, "chunk": 16,
            "kivi": {"bits": bits, "key_axis": axis, "value_axis": "token", "group": 32, "residual": res},
            "perplexity": ppl, "kv_bytes": bytes, "kv_full_bytes": 1000, "env": env,
        })
    };
    let full = serde_json::json!({
        "schema": zoo_harness::schema::PRESS_SCHEMA, "model": "m.gguf", "text": "t.txt", "tokens": 100,
        "chunk": 16, "press": {"type": "knorm"}, "ratio": 0.0, "perplexity": 10.0, "env": env,
    });
    std::fs::write(dir.join("full.json"), full.to_string()).unwrap();
    std::fs::write(dir.join("a.json"), kivi(2, "token", 0, 14.5, 100).to_string()).unwrap();
    std::fs::write(dir.join("b.json"), kivi(8, "channel", 32, 10.25, 280).to_string()).unwrap();
    let md = zoo_harness::report::report(&dir).unwrap();
    assert!(md.contains("Full cache: perplexity 10.00"), "{md}");
    let (b8, b2) = (md.find("| 8 | per channel").expect("8-bit row"), md.find("| 2 | per token").expect("2-bit row"));
    assert!(b8 < b2, "{md}");
    assert!(md.contains("| 8 | per channel | per token | 32 | 32 | 10.25 | +0.25 | 280 B | 0.280 |"), "{md}");
    assert!(md.contains("| 2 | per token | per token | 32 | 0 | 14.50 | +4.50 | 100 B | 0.100 |"), "{md}");
}

/// `zoo report` on needle JSONs: accuracy per (press, ratio) and length, and per depth at the
/// longest length.
#[test]
fn report_tabulates_needle_grids() {
    let dir = tmpdir("needle-report");
    let cell = |len: u64, depth: f64, press: Option<&str>, ratio: f64, hits: u64| {
        serde_json::json!({"length": len, "depth": depth, "press": press.map(|p| serde_json::json!({"type": p})),
                           "ratio": ratio, "hits": hits, "trials": 2, "answers": []})
    };
    let j = serde_json::json!({
        "schema": zoo_harness::schema::NEEDLE_SCHEMA, "trials": 2,
        "cells": [cell(100, 0.0, None, 0.0, 2), cell(100, 1.0, None, 0.0, 1), cell(100, 0.0, Some("knorm"), 0.5, 0),
                  cell(100, 1.0, Some("knorm"), 0.5, 2), cell(200, 0.0, None, 0.0, 2)],
    });
    std::fs::write(dir.join("n.json"), j.to_string()).unwrap();
    let md = zoo_harness::report::report(&dir).unwrap();
    assert!(md.contains("| full cache | 75% (3/4) | 100% (2/2) |"), "{md}");
    assert!(md.contains("| knorm @ 0.5 | 50% (2/4) | – |"), "{md}");
    assert!(md.contains("| full cache | 100% (2/2) | – |"), "{md}"); // by depth at 200 tokens
}

/// `[model] pretrained = ...` in a run config: the plan takes the checkpoint's architecture (HF
/// folder: the 2-layer Llama fixture) and records the source as `init`; the model starts from its
/// weights (a parameter equals the file's tensor) and trains; the pretrained tokenizer needs the
/// model to have one, and `init` cannot be written by hand.
#[test]
fn a_run_trains_from_a_pretrained_model() {
    let dir = tmpdir("pretrained-run");
    let text = dir.join("t.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog. ".repeat(40)).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf/llama");
    let cfg = |tokenizer: &str| {
        format!(
            "experiment = \"ft\"\nseed = 5\n[model]\npretrained = \"{}\"\n[data]\ntype = \"text\"\npaths = [\"{}\"]\n\
             tokenizer = {{ type = \"{tokenizer}\" }}\n[train]\nsteps = 2\nbatch_size = 2\nseq_len = 16\nlr = 1e-4\n\
             warmup_steps = 0\neval_every = 2\neval_batches = 1\n",
            fixture.display(),
            text.display()
        )
    };
    let runs = zoo_harness::config::plan(&cfg("chars"), &dir).unwrap();
    let c = &runs[0].config;
    assert_eq!((c.model.d_model, c.model.n_layers, c.model.vocab_size, c.model.tie_embeddings), (32, 2, Some(96), false));
    assert_eq!(c.init.as_ref().unwrap().pretrained, fixture);
    let (model, store) = runner::build_model(c, zoo_harness::vocab_size(c).unwrap(), &cpu()).unwrap();
    let file = zoo_core::candle_core::safetensors::load(fixture.join("model.safetensors"), &zoo_core::candle_core::Device::Cpu).unwrap();
    let vars = store.vars();
    let ours = &vars.iter().find(|(n, _)| n == "layers.1.ffn.w2.weight").unwrap().1;
    let theirs = &file["model.layers.1.mlp.down_proj.weight"];
    assert_eq!(ours.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let res = runner::run_one(&runs[0], &cpu(), &opts(&dir, None, false)).unwrap().unwrap();
    assert_eq!(res["config"]["init"]["pretrained"], fixture.display().to_string());
    // Where it started: the pretrained model's validation loss, evaluated before the first step.
    let (initial, fin) = (res["metrics"]["val_loss,initial"].as_f64().unwrap(), res["metrics"]["val_loss,final"].as_f64().unwrap());
    assert!(initial.is_finite() && fin.is_finite() && initial != fin, "{initial} {fin}");
    let (task, _, _) = runner::build_task(c, &cpu()).unwrap();
    let before = task.evaluate(&model).unwrap().loss;
    assert!((before - initial).abs() < 1e-6, "the untrained model's {before} against the recorded {initial}");
    // The fixture folder has no tokenizer.json.
    let run = &zoo_harness::config::plan(&cfg("model"), &dir).unwrap()[0];
    let e = format!("{:#}", runner::build_task(&run.config, &cpu()).err().expect("a model without tokenizer.json"));
    assert!(e.contains("data.tokenizer") && e.contains("tokenizer.json"), "{e}");
    let e = format!("{:#}", zoo_harness::config::plan(&format!("{}[init]\npretrained = \"x\"\n", cfg("chars")), &dir).unwrap_err());
    assert!(e.contains("init"), "{e}");
    let e = format!("{:#}", zoo_harness::config::plan(&cfg("chars").replace("pretrained = ", "pretrained_ = "), &dir).unwrap_err());
    assert!(e.contains("model"), "{e}");
}
