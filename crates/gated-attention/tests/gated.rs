use std::collections::BTreeMap;
use zoo_core::attention::{Attention, AttentionConfig};
use zoo_core::candle_core::{DType, Device, Result, Tensor};
use zoo_core::mixer::{FeedForward, Mixer};
use zoo_core::mlp::{MlpConfig, SwiGlu};
use zoo_core::model::{Lm, LmShape};
use zoo_core::params::ParamStore;
use zoo_core::rng::Rng;
use zoo_gated_attention::layout::{export_reference_attention, import_reference_attention, GateLayout};
use zoo_gated_attention::*;

const D: usize = 16;
const V: usize = 13;

fn attn_cfg(kv: usize) -> AttentionConfig {
    AttentionConfig {
        n_heads: 4,
        n_kv_heads: Some(kv),
        rope_theta: 10_000.0,
        qk_norm: false,
        window: None,
        sink_tokens: 0,
        bias: false,
        o_bias: None,
        head_dim: None,
        qk_norm_gain: false,
        qk_norm_eps: None,
    }
}

fn shape() -> LmShape {
    LmShape { vocab_size: V, d_model: D, n_layers: 2, tie_embeddings: true, norm_eps: 1e-5, max_seq_len: 16 }
}

fn ffn(ctx: &zoo_core::mixer::BuildCtx, pb: &zoo_core::params::Pb) -> Result<Option<Box<dyn FeedForward>>> {
    Ok(Some(Box::new(SwiGlu::new(&MlpConfig { hidden: Some(24), bias: false }, ctx, &pb.pp("ffn"))?)))
}

fn gated(cfg: &GatedAttentionConfig, seed: u64) -> (Lm, ParamStore) {
    let store = ParamStore::new(seed, DType::F32, &Device::Cpu);
    let m = Lm::new(&shape(), DType::F32, &store.root(), |ctx, pb| {
        Ok((Box::new(GatedAttention::new(cfg, ctx, &pb.pp("mixer"))?) as Box<dyn Mixer>, ffn(ctx, pb)?))
    })
    .unwrap();
    (m, store)
}

fn plain(cfg: &AttentionConfig, seed: u64) -> (Lm, ParamStore) {
    let store = ParamStore::new(seed, DType::F32, &Device::Cpu);
    let m = Lm::new(&shape(), DType::F32, &store.root(), |ctx, pb| {
        Ok((Box::new(Attention::new(cfg, ctx, &pb.pp("mixer"))?) as Box<dyn Mixer>, ffn(ctx, pb)?))
    })
    .unwrap();
    (m, store)
}

fn ids(seed: u64, b: usize, t: usize) -> Tensor {
    let mut r = Rng::new(seed);
    Tensor::from_vec((0..b * t).map(|_| r.below(V) as u32).collect::<Vec<_>>(), (b, t), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

const POSITIONS: [GatePosition; 5] =
    [GatePosition::SdpaOutput, GatePosition::Value, GatePosition::Key, GatePosition::Query, GatePosition::DenseOutput];

/// A multiplicative sigmoid gate initialised with a large bias is the identity: the model equals
/// the ungated baseline with the same weights (every position and granularity, MHA and GQA).
#[test]
fn large_bias_gate_equals_ungated_baseline() {
    for kv in [4, 2] {
        for position in POSITIONS {
            for granularity in [GateGranularity::Headwise, GateGranularity::Elementwise] {
                let gate = GateConfig { position, granularity, init: GateInit::Bias(40.0), ..Default::default() };
                let (g, gs) = gated(&GatedAttentionConfig { attention: attn_cfg(kv), gate }, 1);
                let (p, ps) = plain(&attn_cfg(kv), 2);
                // Copy the baseline's weights into every shared parameter of the gated model.
                let base = ps.params();
                let mut shared = 0;
                for (name, prm) in gs.params() {
                    if let Some(b) = base.get(&name) {
                        prm.var.set(b.var.as_tensor()).unwrap();
                        shared += 1;
                    }
                }
                assert_eq!(shared, base.len(), "gated model holds every baseline parameter");
                let x = ids(3, 2, 10);
                let d =
                    max_diff(&g.forward(&x, None, None).unwrap().logits, &p.forward(&x, None, None).unwrap().logits);
                assert!(d < 1e-5, "kv {kv} {position:?} {granularity:?}: max diff {d}");
            }
        }
    }
}

fn all_gates() -> Vec<GateConfig> {
    let mut out = Vec::new();
    for position in POSITIONS {
        for granularity in [GateGranularity::Headwise, GateGranularity::Elementwise] {
            for sharing in [GateSharing::HeadSpecific, GateSharing::Shared] {
                out.push(GateConfig { position, granularity, sharing, ..Default::default() });
            }
        }
        out.push(GateConfig { position, activation: GateActivation::Silu, ..Default::default() });
        out.push(GateConfig { position, combine: GateCombine::Additive, ..Default::default() });
        out.push(GateConfig { position, input: GateInput::FirstK(4), bias: true, ..Default::default() });
        out.push(GateConfig { position, init: GateInit::Zero, ..Default::default() });
    }
    out
}

/// Prefill + one-token decode with the KV cache reproduces the full forward, for every gate.
#[test]
fn decode_with_cache_equals_full_forward() {
    for gate in all_gates() {
        let (m, _) = gated(&GatedAttentionConfig { attention: attn_cfg(2), gate: gate.clone() }, 5);
        let x = ids(7, 2, 12);
        let full = m.forward(&x, None, None).unwrap().logits;
        let mut cache = m.new_cache();
        let mut outs = vec![m.forward(&x.narrow(1, 0, 4).unwrap(), Some(&mut cache), None).unwrap().logits];
        for t in 4..12 {
            outs.push(m.forward(&x.narrow(1, t, 1).unwrap(), Some(&mut cache), None).unwrap().logits);
        }
        let d = max_diff(&Tensor::cat(&outs, 1).unwrap(), &full);
        assert!(d < 1e-5, "{gate:?}: max diff {d}");
    }
}

/// Every parameter, gate weights included, gets a finite non-zero gradient.
/// (Excluded by construction: `init = zero` with SiLU, whose multiplicative gate is exactly 0 at
/// init and so cuts the attention path until the gate moves.)
#[test]
fn every_gate_parameter_gets_a_gradient() {
    for gate in all_gates() {
        for kv in [4, 1] {
            let (m, s) = gated(&GatedAttentionConfig { attention: attn_cfg(kv), gate: gate.clone() }, 9);
            let problems = zoo_core::check::gradient_flow(&m, &s, 2, 8, 1).unwrap();
            assert!(problems.is_empty(), "{gate:?} kv {kv}: {problems:?}");
            assert!(s.params().keys().any(|k| k.contains("gate.proj.weight")));
        }
    }
}

/// Our split layout round-trips through the reference's widened q_proj, and the reference's
/// view/split of the widened projection gives exactly our query and gate activations.
#[test]
fn reference_layout_round_trip() {
    for (granularity, w) in [(GateGranularity::Headwise, 1), (GateGranularity::Elementwise, 4)] {
        for kv in [4, 2, 1] {
            let mut attention = attn_cfg(kv);
            attention.bias = true;
            let gate = GateConfig { granularity, bias: true, ..Default::default() };
            let (m, s) = gated(&GatedAttentionConfig { attention, gate }, 11);
            drop(m);
            let ours: BTreeMap<String, Tensor> = s.tensors();
            let layout = GateLayout { n_heads: 4, n_kv_heads: kv, head_dim: 4, gate_width: w };
            let reference =
                export_reference_attention(&ours, "layers.0.mixer", "model.layers.0.self_attn", &layout).unwrap();
            let wide = &reference["model.layers.0.self_attn.q_proj.weight"];
            assert_eq!(wide.dims(), &[4 * 4 + 4 * w, D]);
            // Reference forward of the widened projection: view [kv, G·d + G·w], split, reshape.
            let x = Tensor::randn(0f32, 1.0, (3, D), &Device::Cpu).unwrap();
            let out = x.matmul(&wide.t().unwrap()).unwrap().reshape((3, kv, ())).unwrap();
            let g = 4 / kv;
            let ref_q = out.narrow(2, 0, g * 4).unwrap().reshape((3, 4, 4)).unwrap();
            let ref_gate = out.narrow(2, g * 4, g * w).unwrap().reshape((3, 4, w)).unwrap();
            let our_q =
                x.matmul(&ours["layers.0.mixer.q_proj.weight"].t().unwrap()).unwrap().reshape((3, 4, 4)).unwrap();
            let our_gate =
                x.matmul(&ours["layers.0.mixer.gate.proj.weight"].t().unwrap()).unwrap().reshape((3, 4, w)).unwrap();
            assert!(max_diff(&ref_q, &our_q) < 1e-6, "{granularity:?} kv {kv}: q");
            assert!(max_diff(&ref_gate, &our_gate) < 1e-6, "{granularity:?} kv {kv}: gate");
            // Back to our layout, bit for bit.
            let back =
                import_reference_attention(&reference, "model.layers.0.self_attn", "layers.0.mixer", &layout).unwrap();
            for (k, v) in &back {
                assert_eq!(max_diff(v, &ours[k]), 0.0, "{k}");
            }
            assert_eq!(back.len(), 8 + 2, "q/k/v/o weights and biases, gate weight and bias");
        }
    }
}

/// Gate probes: a zero-initialised sigmoid gate scores exactly 0.5 everywhere.
#[test]
fn gate_probe_statistics() {
    let gate = GateConfig { init: GateInit::Zero, ..Default::default() };
    let (m, _) = gated(&GatedAttentionConfig { attention: attn_cfg(4), gate }, 3);
    let s = zoo_core::probe::probe(&m, &ids(1, 2, 8)).unwrap();
    for layer in &s.stats {
        assert_eq!(layer["gate_mean"], 0.5);
        assert_eq!(layer["gate_frac_below_0.1"], 0.0);
    }
    assert_eq!(s.first_token_share.len(), 2);
    assert!(s.first_token_share.iter().all(|x| x.is_some()));
}
