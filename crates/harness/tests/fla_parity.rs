//! Outside-reference parity: zoo's linear-attention layers against fla's (flash-linear-attention
//! 0.6.0, `fla/layers/*.py`), from the fixtures `scripts/fla-fixtures.py` wrote on a GPU machine
//! in f32 (tests/fla/*.safetensors: fla's weights, an input, the output and, for
//! loss = Σ y ⊙ dy, the gradients of the input and of every weight; tests/fla/index.json: the zoo
//! mixer config that must reproduce each layer).
//!
//! Each fla weight is loaded into the zoo layer by name ([`zoo_name`]); then the output, the input
//! gradient and every weight gradient must match with relative error ‖a − b‖ / ‖b‖ ≤ 1e-4. No
//! PyTorch is needed to run this.
//!
//! Fixtures: GLA (fla defaults; and with short conv, no output gate), MultiScaleRetention (zoo's
//! `norm = "rms_norm"`), SimpleGatedLinearAttention (data-dependent decay), DeltaNet, GatedDeltaNet
//! (with and without its output gate), Based, LinearAttention (elu, normalised, no output norm).
//! fla 0.6.0 refuses the chunked backward of Simple GLA and Gated DeltaNet on Hopper with the
//! GPU machine's Triton 3.6 ("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results
//! for gated chunk_bwd_dqkwg"), so their fixtures ran fla's layer with fla's naive PyTorch op
//! (index.json: `op`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use zoo_core::candle_core::{DType, Device, Tensor, Var};
use zoo_core::mixer::{BuildCtx, MixerSpec, Phase};
use zoo_core::params::ParamStore;
use zoo_harness::registry::MixerConfig;

const TOL: f64 = 1e-4;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fla")
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let n = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    (d / n.max(1e-30)).sqrt()
}

/// fla's q/k/v short convolutions (C, 1, K) are zoo's one depthwise conv over [q; k; v].
const CONVS: [&str; 3] = ["q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight"];

/// fla parameter name -> zoo parameter name (under the mixer's prefix), for everything but the
/// convolutions and Gated DeltaNet's A/Δ offsets, which [`load`] handles.
fn zoo_name(fla: &str) -> String {
    match fla {
        // The fused RMSNorm + swish gate holds the norm gain.
        "g_norm_swish_gate.weight" => "g_norm.weight".into(),
        other => other.into(),
    }
}

struct Case {
    name: String,
    t: BTreeMap<String, Tensor>,
    cfg: MixerConfig,
}

fn cases() -> Vec<Case> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join("index.json")).expect("tests/fla/index.json")).unwrap();
    let cases = index["cases"].as_object().expect("cases");
    for want in [
        "gla",
        "gla_conv_nogate",
        "retnet",
        "simple_gla",
        "deltanet",
        "gated_deltanet",
        "gated_deltanet_nogate",
        "based",
        "linear_attention",
    ] {
        assert!(cases.contains_key(want), "fixture `{want}` is missing from tests/fla");
    }
    cases
        .iter()
        .map(|(name, c)| {
            let t = zoo_core::candle_core::safetensors::load(dir().join(format!("{name}.safetensors")), &Device::Cpu)
                .unwrap()
                .into_iter()
                .collect();
            let cfg: MixerConfig = toml::from_str(c["zoo_config"].as_str().unwrap()).unwrap();
            Case { name: name.clone(), t, cfg }
        })
        .collect()
}

/// Build the zoo layer for a case on `dev` and load fla's weights into it.
fn load(case: &Case, dev: &Device) -> (Box<dyn zoo_core::mixer::Mixer>, ParamStore) {
    let (_, t, d) = case.t["x"].dims3().unwrap();
    let store = ParamStore::new(0, DType::F32, dev);
    let ctx = BuildCtx { d_model: d, n_layers: 1, layer: 0, max_seq_len: t, kind_layer: 0, kind_layers: 1 };
    case.cfg.validate(&ctx).unwrap();
    let mixer = case.cfg.build(&ctx, &store.root()).unwrap();
    let mut w = BTreeMap::new();
    let fla: BTreeMap<&str, &Tensor> =
        case.t.iter().filter_map(|(k, v)| k.strip_prefix("w.").map(|n| (n, v))).collect();
    for (&n, &v) in &fla {
        if CONVS.contains(&n) {
            continue;
        }
        let v = match n {
            // zoo trains offsets from fixed per-head initial values (deltanet::gated_init).
            "A_log" | "dt_bias" => {
                let (a0, dt0) = zoo_linear_attention::deltanet::gated_init(v.dim(0).unwrap());
                let base = if n == "A_log" { a0 } else { dt0 };
                (v - Tensor::new(base, &Device::Cpu).unwrap()).unwrap()
            }
            _ => v.clone(),
        };
        w.insert(zoo_name(n), v.to_device(dev).unwrap());
    }
    if fla.contains_key(CONVS[0]) {
        let parts: Vec<Tensor> = CONVS.iter().map(|c| fla[c].squeeze(1).unwrap()).collect();
        w.insert("qkv_conv.weight".into(), Tensor::cat(&parts, 0).unwrap().to_device(dev).unwrap());
    }
    store.load(&w).unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
    (mixer, store)
}

/// The process-wide kernel mode that the CPU test switches: the tests here take turns.
static MODE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    MODE.lock().unwrap_or_else(|e| e.into_inner())
}

/// On the CPU, both training paths: the ops' CPU forms (the default: `zoo_kernels::linear_scan`
/// for GLA, `delta_scan`, `conv1d`) and the compositions (`ZOO_KERNELS=naive`).
#[test]
fn zoo_layers_match_fla_outputs_and_gradients() {
    use zoo_core::zoo_kernels::{mode, set_mode, Kernels};
    let _turn = turn();
    struct Restore(Kernels);
    impl Drop for Restore {
        fn drop(&mut self) {
            set_mode(self.0)
        }
    }
    let _restore = Restore(mode());
    for k in [Kernels::Fused, Kernels::Naive] {
        println!("kernels: {}", k.name());
        set_mode(k);
        check(&Device::Cpu)
    }
}

/// The same on CUDA in f32, where GLA, RetNet, Simple GLA, Based and linear attention run the
/// fused linear-scan kernels (`zoo_kernels::linear_scan`) in place of the chunked composition.
#[test]
fn zoo_layers_match_fla_on_cuda_with_the_kernels() {
    let _turn = turn();
    match Device::new_cuda(0) {
        Ok(dev) => check(&dev),
        Err(_) => eprintln!("skipped: no CUDA device in this build or machine"),
    }
}

fn check(dev: &Device) {
    let mut report = Vec::new();
    let mut worst: f64 = 0.0;
    for case in cases() {
        let (mixer, store) = load(&case, dev);
        let x = Var::from_tensor(&case.t["x"].to_device(dev).unwrap()).unwrap();
        let y = mixer.forward(x.as_tensor(), Phase::Train, None, None).unwrap().to_device(&Device::Cpu).unwrap();
        let mut errs = vec![("y".to_string(), rel(&y, &case.t["y"]))];
        let loss = (&y * &case.t["dy"]).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
        errs.push(("dx".into(), rel(&cpu(grads.get(x.as_tensor()).unwrap()), &case.t["dx"])));
        let ours: BTreeMap<String, Var> = store.vars().into_iter().collect();
        let grad_of = |zoo: &str| cpu(grads.get(ours[zoo].as_tensor()).unwrap());
        for (k, want) in case.t.iter().filter(|(k, _)| k.starts_with("g.")) {
            let n = &k[2..];
            let got = match CONVS.iter().position(|c| c == &n) {
                Some(i) => {
                    let widths: Vec<usize> = CONVS.iter().map(|c| case.t[&format!("w.{c}")].dim(0).unwrap()).collect();
                    let off: usize = widths[..i].iter().sum();
                    grad_of("qkv_conv.weight").narrow(0, off, widths[i]).unwrap().unsqueeze(1).unwrap()
                }
                None => grad_of(&zoo_name(n)),
            };
            errs.push((format!("d{n}"), rel(&got, want)));
        }
        for (what, e) in &errs {
            worst = worst.max(*e);
            report.push(format!("{:<24} {:<28} {e:.2e}", case.name, what));
        }
    }
    let text = report.join("\n");
    println!("{text}");
    let bad: Vec<&String> =
        report.iter().filter(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() > TOL).collect();
    assert!(
        bad.is_empty(),
        "relative errors above {TOL}:\n{}",
        bad.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
    );
    assert!(worst.is_finite());
}

/// The check can fail: one weight matrix off by about 1% is caught. (Not a uniform scale: the
/// output's RMSNorm would cancel that.)
#[test]
fn a_perturbed_weight_is_caught() {
    let _turn = turn();
    let case = cases().into_iter().find(|c| c.name == "gla").expect("gla fixture");
    let (mixer, store) = load(&case, &Device::Cpu);
    let (name, var) = store.vars().into_iter().find(|(n, _)| n.ends_with("k_proj.weight")).unwrap();
    let w = var.as_tensor();
    var.set(&(w + ((w * 1000.0).unwrap().sin().unwrap() * 0.01).unwrap()).unwrap()).unwrap();
    let y = mixer.forward(&case.t["x"], Phase::Train, None, None).unwrap();
    let e = rel(&y, &case.t["y"]);
    assert!(e > TOL, "{name} perturbed still matches ({e:.2e})");
}
