//! Model-level checks on tiny models: a finite-difference gradient check in f64, and decode with a
//! cache matching the full forward.

use zoo_core::attention::{Attention, AttentionConfig};
use zoo_core::candle_core::{DType, Device, Result, Tensor};
use zoo_core::mixer::Mixer;
use zoo_core::mlp::{MlpConfig, SwiGlu};
use zoo_core::model::{cross_entropy, Lm, LmShape};
use zoo_core::params::ParamStore;
use zoo_core::rng::Rng;

fn attn(n_heads: usize, kv: usize, qk_norm: bool, window: Option<usize>, sinks: usize) -> AttentionConfig {
    AttentionConfig {
        n_heads,
        n_kv_heads: Some(kv),
        rope_theta: 10_000.0,
        qk_norm,
        window,
        sink_tokens: sinks,
        bias: true,
        o_bias: None,
        head_dim: None,
        qk_norm_gain: false,
        qk_norm_eps: None,
    }
}

fn tiny(dtype: DType, cfg: AttentionConfig, tie: bool, seed: u64) -> Result<(Lm, ParamStore)> {
    let dev = Device::Cpu;
    let store = ParamStore::new(seed, dtype, &dev);
    let shape =
        LmShape { vocab_size: 11, d_model: 8, n_layers: 2, tie_embeddings: tie, norm_eps: 1e-5, max_seq_len: 16 };
    let model = Lm::new(&shape, dtype, &store.root(), |ctx, pb| {
        let m: Box<dyn Mixer> = Box::new(Attention::new(&cfg, ctx, &pb.pp("mixer"))?);
        let f: Box<dyn zoo_core::mixer::FeedForward> =
            Box::new(SwiGlu::new(&MlpConfig { hidden: Some(12), bias: false }, ctx, &pb.pp("ffn"))?);
        Ok((m, Some(f)))
    })?;
    Ok((model, store))
}

fn ids(rng: &mut Rng, b: usize, t: usize, v: usize) -> Result<Tensor> {
    Tensor::from_vec((0..b * t).map(|_| rng.below(v) as u32).collect::<Vec<_>>(), (b, t), &Device::Cpu)
}

/// Central differences on every parameter tensor (a few coordinates each) against backprop.
#[test]
fn finite_difference_gradients_f64() -> Result<()> {
    for (cfg, tie) in [(attn(2, 1, true, Some(4), 1), false), (attn(2, 2, false, None, 0), true)] {
        let (model, store) = tiny(DType::F64, cfg, tie, 3)?;
        // Larger weights than the 0.02 init, so that second-order terms are exercised.
        let mut r = Rng::new(9);
        for (_, p) in store.params() {
            let n = p.var.elem_count();
            let noise: Vec<f64> = (0..n).map(|_| r.normal() * 0.3).collect();
            p.var.set(&(p.var.as_tensor() + Tensor::from_vec(noise, p.var.shape(), &Device::Cpu)?)?)?;
        }
        let x = ids(&mut r, 2, 7, 11)?;
        let y = ids(&mut r, 2, 7, 11)?;
        let loss_of =
            || -> Result<f64> { cross_entropy(&model.forward(&x, None, None)?.logits, &y, None)?.to_scalar::<f64>() };
        let grads = cross_entropy(&model.forward(&x, None, None)?.logits, &y, None)?.backward()?;
        let eps = 1e-6;
        let mut checked = 0;
        for (name, p) in store.params() {
            let g = grads.get(p.var.as_tensor()).unwrap_or_else(|| panic!("no grad for {name}"));
            let g: Vec<f64> = g.flatten_all()?.to_vec1()?;
            let base: Vec<f64> = p.var.as_tensor().flatten_all()?.to_vec1()?;
            for k in 0..base.len().min(3) {
                let idx = (k * 7919) % base.len();
                let mut plus = base.clone();
                plus[idx] += eps;
                p.var.set(&Tensor::from_vec(plus, p.var.shape(), &Device::Cpu)?)?;
                let lp = loss_of()?;
                let mut minus = base.clone();
                minus[idx] -= eps;
                p.var.set(&Tensor::from_vec(minus, p.var.shape(), &Device::Cpu)?)?;
                let lm = loss_of()?;
                p.var.set(&Tensor::from_vec(base.clone(), p.var.shape(), &Device::Cpu)?)?;
                let fd = (lp - lm) / (2.0 * eps);
                let err = (fd - g[idx]).abs() / (fd.abs().max(g[idx].abs()).max(1e-7));
                assert!(
                    err < 1e-4,
                    "{name}[{idx}]: finite difference {fd:e} vs backprop {:e} (rel err {err:e})",
                    g[idx]
                );
                checked += 1;
            }
        }
        assert!(checked > 40, "checked only {checked} coordinates");
    }
    Ok(())
}

/// Prefill a prefix, then decode token by token: logits match the full forward.
#[test]
fn decode_with_cache_matches_full_forward() -> Result<()> {
    let cases = [
        attn(4, 4, false, None, 0),
        attn(4, 2, true, None, 0),
        attn(4, 1, false, Some(3), 0),
        attn(4, 2, true, Some(5), 2),
    ];
    for cfg in cases {
        let (model, _) = tiny(DType::F32, AttentionConfig { ..cfg.clone() }, true, 1)?;
        let mut r = Rng::new(4);
        let x = ids(&mut r, 2, 12, 11)?;
        let full = model.forward(&x, None, None)?.logits;
        for prefix in [1, 5] {
            let mut cache = model.new_cache();
            let mut outs = vec![model.forward(&x.narrow(1, 0, prefix)?, Some(&mut cache), None)?.logits];
            for t in prefix..12 {
                outs.push(model.forward(&x.narrow(1, t, 1)?, Some(&mut cache), None)?.logits);
            }
            let inc = Tensor::cat(&outs, 1)?;
            let diff = (inc - &full)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "{cfg:?} prefix {prefix}: max |diff| {diff}");
            // The cache holds exactly what cache_bytes promises.
            assert_eq!(cache.iter().map(|c| c.bytes()).sum::<usize>(), model.cache_bytes(2, 12), "{cfg:?}");
        }
    }
    Ok(())
}

/// Sliding window: a token beyond the window has no influence.
#[test]
fn window_limits_receptive_field() -> Result<()> {
    let (model, _) = tiny(DType::F32, attn(2, 2, false, Some(2), 0), true, 2)?;
    // With window 2 and 2 layers, position 9 sees positions >= 7.
    let a = Tensor::from_vec(vec![1u32, 2, 3, 4, 5, 6, 7, 8, 9, 10], (1, 10), &Device::Cpu)?;
    let b = Tensor::from_vec(vec![5u32, 2, 3, 4, 5, 6, 7, 8, 9, 10], (1, 10), &Device::Cpu)?;
    let la = model.forward(&a, None, None)?.logits.narrow(1, 9, 1)?;
    let lb = model.forward(&b, None, None)?.logits.narrow(1, 9, 1)?;
    assert_eq!((la - lb)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?, 0.0);
    // ... but the first position does see it.
    let la = model.forward(&a, None, None)?.logits.narrow(1, 1, 1)?;
    let lb = model.forward(&b, None, None)?.logits.narrow(1, 1, 1)?;
    assert!((la - lb)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? > 0.0);
    Ok(())
}

/// GPT-2 style init gives a first loss near ln V (candle's defaults give ~34).
#[test]
fn initial_loss_is_near_ln_vocab() -> Result<()> {
    let (model, _) = tiny(DType::F32, attn(2, 2, false, None, 0), true, 5)?;
    let mut r = Rng::new(1);
    let x = ids(&mut r, 4, 16, 11)?;
    let y = ids(&mut r, 4, 16, 11)?;
    let l = cross_entropy(&model.forward(&x, None, None)?.logits, &y, None)?.to_scalar::<f32>()?;
    assert!((l - (11f32).ln()).abs() < 0.1, "first loss {l}, ln V = {}", (11f32).ln());
    Ok(())
}

/// Probes: attention rows are distributions over the past, and max |h| is recorded per layer.
#[test]
fn probes_record_causal_attention() -> Result<()> {
    let (model, _) = tiny(DType::F32, attn(2, 1, false, None, 1), true, 6)?;
    let x = ids(&mut Rng::new(2), 1, 6, 11)?;
    let mut probe = zoo_core::model::ModelProbe::default();
    model.forward(&x, None, Some(&mut probe))?;
    assert_eq!(probe.layers.len(), 2);
    assert_eq!(probe.max_abs.len(), 2);
    let a = probe.layers[0].attn.as_ref().unwrap();
    assert_eq!(a.dims(), &[1, 2, 6, 6]);
    let v: Vec<Vec<f32>> = a.get(0)?.get(0)?.to_vec2()?;
    for (i, row) in v.iter().enumerate() {
        for (j, &p) in row.iter().enumerate() {
            if j > i {
                assert_eq!(p, 0.0, "future position {j} visible from {i}");
            }
        }
        // With one sink token, real keys hold at most all of the mass.
        assert!(row.iter().sum::<f32>() <= 1.0 + 1e-5);
    }
    Ok(())
}

/// The loss fused with the LM head (`zoo_kernels::cross_entropy::linear_nll`, chunks of 3 rows
/// over 10, the last one short; softmax − one-hot kept from the forward, and recomputed) against
/// the logits path (`h wᵀ`, then the composition's log-softmax): the per-row losses and the
/// gradients of h and w.
#[test]
fn linear_nll_matches_the_logits_path() -> Result<()> {
    use zoo_core::candle_core::Var;
    let dev = Device::Cpu;
    let (n, d, v) = (10, 5, 7);
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), &dev)?)?;
    let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (v, d), &dev)?)?;
    let t = Tensor::from_vec((0..n).map(|i| (i * 3 % v) as u32).collect::<Vec<_>>(), n, &dev)?;
    let r = Tensor::randn(0f32, 1.0, n, &dev)?; // weights per row, so every row's gradient counts
    let run = |fused: Option<bool>| -> Result<Vec<Tensor>> {
        let nll = if let Some(keep) = fused {
            zoo_core::zoo_kernels::cross_entropy::linear_nll_chunked(h.as_tensor(), w.as_tensor(), &t, 3, keep)?
        } else {
            let logits = h.as_tensor().matmul(&w.as_tensor().t()?)?;
            let lp = zoo_core::candle_nn::ops::log_softmax(&logits, 1)?;
            lp.gather(&t.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?
        };
        let g = (&nll * &r)?.sum_all()?.backward()?;
        Ok(vec![nll.clone(), g.get(h.as_tensor()).expect("dh").clone(), g.get(w.as_tensor()).expect("dw").clone()])
    };
    let b = run(None)?;
    for keep in [true, false] {
        let a = run(Some(keep))?;
        for ((x, y), what) in a.iter().zip(&b).zip(["nll", "dh", "dw"]) {
            let e = (x - y)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let s = y.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(e <= 1e-5 * s.max(1.0), "{what} (keep {keep}): max error {e:e} (scale {s})");
        }
    }
    Ok(())
}

/// `Lm::loss` (on the CPU in f32: the head fused into the loss) equals the cross-entropy of
/// `Lm::forward`'s logits, loss and every parameter's gradient, tied and untied, with and without
/// a mask.
#[test]
fn model_loss_matches_the_cross_entropy_of_the_logits() -> Result<()> {
    let mut rng = Rng::new(5);
    for tie in [true, false] {
        let (model, store) = tiny(DType::F32, attn(2, 2, false, None, 0), tie, 3)?;
        let x = ids(&mut rng, 2, 9, 11)?;
        let y = ids(&mut rng, 2, 9, 11)?;
        let keep: Vec<f32> = (0..18).map(|i| if i % 4 == 1 { 0.0 } else { 1.0 }).collect();
        let mask = Tensor::from_vec(keep, (2, 9), &Device::Cpu)?;
        for m in [None, Some(&mask)] {
            let a = model.loss(&x, &y, m)?.loss;
            let b = cross_entropy(&model.forward(&x, None, None)?.logits, &y, m)?;
            let (ga, gb) = (a.backward()?, b.backward()?);
            let (la, lb) = (a.to_scalar::<f32>()?, b.to_scalar::<f32>()?);
            assert!((la - lb).abs() <= 1e-5 * lb.abs(), "tie {tie}, mask {}: loss {la} vs {lb}", m.is_some());
            for (name, var) in store.vars() {
                let (p, q) = (ga.get(var.as_tensor()).expect("gradient"), gb.get(var.as_tensor()).expect("gradient"));
                let e = (p - q)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                let s = q.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(e <= 1e-5 * s.max(1e-3), "tie {tie}, mask {}: {name} max error {e:e} (scale {s})", m.is_some());
            }
        }
    }
    Ok(())
}
