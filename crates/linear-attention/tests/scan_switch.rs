//! `ZOO_LINEAR_SCAN=chunked` (its own test binary: the switch is the process's environment). A
//! 2-layer GLA and a 2-layer RetNet LM on the CPU, one forward and backward with the scan (the CPU
//! form for GLA's per-channel decay; RetNet's scalar decay keeps the composition either way) and
//! one under the switch: losses and every gradient agree to 1e-4, and for GLA the two paths differ
//! in their last bits (so the switch did change the path).
use zoo_core::candle_core::{DType, Device, Result, Tensor};
use zoo_core::mixer::{examples_from_toml, FeedForward, Mixer};
use zoo_core::model::{Lm, LmShape};
use zoo_core::params::ParamStore;
use zoo_linear_attention::gla::{Gla, GlaConfig};
use zoo_linear_attention::retnet::{RetNetConfig, Retention};

/// (loss, gradients by parameter name) of one forward and backward of a fresh LM.
fn loss_and_grads(kind: &str) -> Result<(f32, Vec<(String, Vec<f32>)>)> {
    let dev = Device::Cpu;
    let store = ParamStore::new(5, DType::F32, &dev);
    let shape = LmShape { vocab_size: 40, d_model: 32, n_layers: 2, tie_embeddings: true, norm_eps: 1e-5, max_seq_len: 48 };
    let model = Lm::new(&shape, DType::F32, &store.root(), |ctx, pb| {
        let m: Box<dyn Mixer> = if kind == "gla" {
            let c: GlaConfig = examples_from_toml(&["n_heads = 2"]).remove(0);
            Box::new(Gla::new(&c, ctx, pb)?)
        } else {
            let c: RetNetConfig = examples_from_toml(&["n_heads = 2"]).remove(0);
            Box::new(Retention::new(&c, ctx, pb)?)
        };
        Ok((m, None::<Box<dyn FeedForward>>))
    })?;
    let ids: Vec<u32> = (0..2 * 48).map(|i| ((i * 7 + 3) % 40) as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 48), &dev)?;
    let tgt = ids.roll(-1, 1)?;
    let logits = model.forward(&ids, None, None)?.logits;
    let loss = zoo_core::model::cross_entropy(&logits, &tgt, None)?;
    let grads = loss.backward()?;
    let mut out = vec![];
    for (name, t) in store.tensors() {
        out.push((name.clone(), grads.get(&t).expect("gradient").flatten_all()?.to_vec1::<f32>()?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((loss.to_scalar::<f32>()?, out))
}

#[test]
fn the_chunked_switch_trains_as_the_scan() -> Result<()> {
    for kind in ["gla", "retnet"] {
        std::env::remove_var("ZOO_LINEAR_SCAN");
        assert!(!zoo_linear_attention::chunked_forced());
        let (la, ga) = loss_and_grads(kind)?;
        std::env::set_var("ZOO_LINEAR_SCAN", "chunked");
        assert!(zoo_linear_attention::chunked_forced());
        let (lb, gb) = loss_and_grads(kind)?;
        std::env::remove_var("ZOO_LINEAR_SCAN");
        assert!((la - lb).abs() <= 1e-4 * la.abs(), "{kind}: loss {la} with the scan, {lb} chunked");
        let mut bits_differ = la.to_bits() != lb.to_bits();
        for ((na, a), (nb, b)) in ga.iter().zip(&gb) {
            assert_eq!(na, nb);
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
            let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(err <= 1e-4 * scale, "{kind}: gradient of {na} differs by {err} (scale {scale})");
            bits_differ |= a.iter().zip(b).any(|(x, y)| x.to_bits() != y.to_bits());
        }
        if kind == "gla" {
            assert!(bits_differ, "gla: the switch left every bit as it was: did the path change?");
        }
    }
    Ok(())
}
