//! Module statistics, auxiliary losses and the after-step hook through the real training loop: a
//! toy router feed-forward reports a per-expert load vector and an auxiliary loss and counts its
//! after-step calls; the curve keeps the vector unreduced at every eval point.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use zoo_core::attention::{Attention, AttentionConfig};
use zoo_core::candle_core::{DType, Device, Result, Tensor, D};
use zoo_core::data::MqarSegment;
use zoo_core::mixer::{examples_from_toml, FeedForward, FfnOut, Mixer, Stat, StatShape};
use zoo_core::model::{Lm, LmShape};
use zoo_core::nn::{Linear, INIT_STD};
use zoo_core::optim::{AdamWParams, Schedule};
use zoo_core::params::ParamStore;
use zoo_core::task::MqarTask;
use zoo_core::train::{train, TrainOpts};

const E: usize = 4;

struct ToyRouter {
    router: Linear,
    out: Linear,
    after_steps: Arc<AtomicUsize>,
}

impl FeedForward for ToyRouter {
    fn forward(&self, x: &Tensor) -> Result<FfnOut> {
        let p = zoo_core::candle_nn::ops::softmax(&self.router.forward(x)?.to_dtype(DType::F32)?, D::Minus1)?;
        let load = p.flatten_to(1)?.mean(0)?; // (E,)
        let aux = ((load.sqr()?.sum_all()? * E as f64)? * 0.01)?;
        Ok(FfnOut {
            y: self.out.forward(x)?,
            aux_loss: Some(aux),
            stats: vec![Stat::new("load", StatShape::PerExpert, load)],
        })
    }
    fn kind(&self) -> String {
        "toy_router".into()
    }
    fn after_step(&self) -> Result<()> {
        self.after_steps.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn training_keeps_vector_stats_logs_aux_loss_and_calls_after_step() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let store = ParamStore::new(0, DType::F32, &dev);
    let shape =
        LmShape { vocab_size: 32, d_model: 16, n_layers: 2, tie_embeddings: true, norm_eps: 1e-5, max_seq_len: 32 };
    let calls = Arc::new(AtomicUsize::new(0));
    let attn: AttentionConfig = examples_from_toml(&["n_heads = 2"]).remove(0);
    let model = Lm::new(&shape, DType::F32, &store.root(), |ctx, pb| {
        let m: Box<dyn Mixer> = Box::new(Attention::new(&attn, ctx, &pb.pp("mixer"))?);
        let f: Box<dyn FeedForward> = Box::new(ToyRouter {
            router: Linear::new(&pb.pp("router"), 16, E, false, INIT_STD)?,
            out: Linear::new(&pb.pp("out"), 16, 16, false, INIT_STD)?,
            after_steps: calls.clone(),
        });
        Ok((m, Some(f)))
    })?;
    let seg = [MqarSegment { seq_len: 32, kv_pairs: 4, examples: 64 }];
    let task = MqarTask::new(32, &seg, &seg, 8, 0, &dev)?;
    let opts = TrainOpts {
        steps: 4,
        grad_accum: 1,
        schedule: Schedule { lr: 1e-3, min_lr: 1e-4, warmup_steps: 1, decay_steps: 4 },
        adamw: AdamWParams { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0, decay_embeddings: false },
        grad_clip: Some(1.0),
        eval_every: 2,
        eval_at_start: false,
        checkpoint_every: None,
        checkpoint_dir: None,
        stop_after: None,
        meta: serde_json::Value::Null,
        stop_signal: None,
        comm: None,
    };
    let report = train(&model, &store, &task, &opts, 0, false, &mut |_| {})?;
    // Two layers, each called once per step.
    assert_eq!(calls.load(Ordering::SeqCst), 2 * 4);
    let curve = &report.state.curve;
    assert_eq!(curve.len(), 2);
    for p in curve {
        let aux = p.aux_loss.expect("aux loss logged");
        // Σ load² · E · 0.01 over two layers: ≥ 2 · 0.01 (uniform load), ≤ 2 · 0.01 · E.
        assert!((0.0199..=0.0801).contains(&aux), "aux {aux}");
        let stats = p.stats.as_ref().expect("stats kept");
        assert_eq!(stats.len(), 2);
        for layer in stats {
            let load = &layer["load"];
            assert_eq!(load.shape, StatShape::PerExpert);
            assert_eq!(load.values.len(), E);
            assert!((load.values.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{load:?}");
        }
    }
    // The JSON keeps the vector.
    let j = serde_json::to_value(&curve[1])?;
    assert_eq!(j["stats"][0]["load"]["values"].as_array().unwrap().len(), E);
    assert_eq!(j["stats"][0]["load"]["shape"], "per_expert");
    Ok(())
}

/// Checkpointed training state round-trips its floats exactly through state.json (serde_json's
/// `float_roundtrip`): without it, parsing can land one ulp away and a resumed run drifts. 100k
/// seeded doubles of every magnitude, plus the classic hard cases.
#[test]
fn state_json_floats_round_trip_exactly() {
    let mut rng = zoo_core::rng::Rng::new(5);
    let mut xs: Vec<f64> =
        vec![0.1 + 0.2, 1.0 / 3.0, 2.2250738585072014e-308, 9007199254740993.0, 5e-324, 1.7976931348623157e308];
    for _ in 0..100_000 {
        let mant = rng.normal();
        let exp = (rng.below(600) as i32) - 300;
        xs.push(mant * 10f64.powi(exp));
    }
    let text = serde_json::to_string(&xs).unwrap();
    let back: Vec<f64> = serde_json::from_str(&text).unwrap();
    let bad = xs.iter().zip(&back).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(bad, 0, "{bad} of {} doubles changed through JSON", xs.len());
}
