//! Checks method crates reuse in their tests.

use crate::model::{cross_entropy, Lm};
use crate::params::ParamStore;
use crate::rng::Rng;
use candle_core::{DType, Result, Tensor};

/// One forward + backward on random tokens; returns a line for every parameter whose gradient is
/// missing, zero everywhere, or not finite. An empty list means gradients reach every weight.
///
/// This is the guard against candle ops that record no backward pass (fused softmax / norms /
/// RoPE): such an op silently cuts the gradient to everything upstream of it.
pub fn gradient_flow(model: &Lm, store: &ParamStore, batch: usize, seq_len: usize, seed: u64) -> Result<Vec<String>> {
    let mut rng = Rng::new(seed);
    let v = model.shape.vocab_size;
    let dev = store.device();
    let ids = random_ids(&mut rng, batch, seq_len, v, dev)?;
    let tgt = random_ids(&mut rng, batch, seq_len, v, dev)?;
    let out = model.forward(&ids, None, None)?;
    let mut loss = cross_entropy(&out.logits, &tgt, None)?;
    if let Some(a) = out.aux_loss {
        let dt = loss.dtype();
        loss = (loss + a.to_dtype(dt)?)?;
    }
    let grads = loss.backward()?;
    let mut problems = Vec::new();
    for (name, p) in store.params().into_iter().filter(|(_, p)| p.group != crate::params::Group::Buffer) {
        match grads.get(p.var.as_tensor()) {
            None => problems.push(format!("{name}: no gradient")),
            Some(g) => {
                let g = g.to_dtype(DType::F64)?.flatten_all()?;
                let max = g.abs()?.max(0)?.to_scalar::<f64>()?;
                let sum = g.sum_all()?.to_scalar::<f64>()?;
                if !max.is_finite() || !sum.is_finite() {
                    problems.push(format!("{name}: non-finite gradient"));
                } else if max == 0.0 {
                    problems.push(format!("{name}: gradient is zero everywhere"));
                }
            }
        }
    }
    Ok(problems)
}

/// `b × t` token ids drawn uniformly below `vocab` from `rng`, as a (b, t) u32 tensor.
pub fn random_ids(rng: &mut Rng, b: usize, t: usize, vocab: usize, dev: &candle_core::Device) -> Result<Tensor> {
    Tensor::from_vec((0..b * t).map(|_| rng.below(vocab) as u32).collect::<Vec<_>>(), (b, t), dev)
}

/// ‖a − b‖ / ‖b‖ in f64 (the relative error the parity tests bound).
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let d = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let n = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((d / n.max(1e-300)).sqrt())
}

/// Prefill `ids[.., ..prefix]` into a fresh cache, then decode the rest one token at a time;
/// returns the relative error of those logits against the full forward, and the cache.
pub fn decode_parity(model: &Lm, ids: &Tensor, prefix: usize) -> Result<(f64, Vec<crate::mixer::LayerState>)> {
    let t = ids.dim(1)?;
    let full = model.forward(ids, None, None)?.logits;
    let mut cache = model.new_cache();
    let mut outs = vec![model.forward(&ids.narrow(1, 0, prefix)?, Some(&mut cache), None)?.logits];
    for i in prefix..t {
        outs.push(model.forward(&ids.narrow(1, i, 1)?, Some(&mut cache), None)?.logits);
    }
    Ok((rel_err(&Tensor::cat(&outs, 1)?, &full)?, cache))
}

/// The contract every mixer signs, checked on each of `S::examples()` in a tiny LM (vocab 32,
/// d_model 16, two layers of the mixer, SwiGLU, f32): the config validates; every parameter gets a
/// finite, non-zero gradient ([`gradient_flow`]); prefill of 6 tokens then one-token decode to 14
/// reproduces the full forward (relative error < 1e-5) and leaves exactly `cache_bytes` in the
/// state; two builds from one seed give identical logits. Returns one line per broken promise
/// (empty: all kept), naming the example.
pub fn mixer_contract<S: crate::mixer::MixerSpec>() -> Result<Vec<String>> {
    use crate::mixer::{BuildCtx, FeedForward, Mixer, MixerSpec};
    use crate::mlp::{MlpConfig, SwiGlu};
    use crate::model::LmShape;
    let shape =
        LmShape { vocab_size: 32, d_model: 16, n_layers: 2, tie_embeddings: false, norm_eps: 1e-5, max_seq_len: 14 };
    let dev = candle_core::Device::Cpu;
    let mut problems = Vec::new();
    let examples = S::examples();
    if examples.is_empty() {
        problems.push("no examples: the contract checks nothing".to_string());
    }
    for ex in examples {
        let ctx = BuildCtx { d_model: 16, n_layers: 2, layer: 0, max_seq_len: 14, kind_layer: 0, kind_layers: 2 };
        if let Err(e) = MixerSpec::validate(&ex, &ctx) {
            problems.push(format!("{ex:?}: does not validate: {e}"));
            continue;
        }
        let build = || -> Result<(Lm, ParamStore)> {
            let store = ParamStore::new(5, DType::F32, &dev);
            let model = Lm::new(&shape, DType::F32, &store.root(), |ctx, pb| {
                let ctx = BuildCtx { kind_layer: ctx.layer, kind_layers: ctx.n_layers, ..*ctx };
                let m: Box<dyn Mixer> = ex.build(&ctx, &pb.pp("mixer"))?;
                let f: Box<dyn FeedForward> =
                    Box::new(SwiGlu::new(&MlpConfig { hidden: None, bias: false }, &ctx, &pb.pp("ffn"))?);
                Ok((m, Some(f)))
            })?;
            Ok((model, store))
        };
        let (model, store) = build()?;
        for p in gradient_flow(&model, &store, 2, 12, 0)? {
            problems.push(format!("{ex:?}: gradient flow: {p}"));
        }
        let x = random_ids(&mut Rng::new(2), 2, 14, 32, &dev)?;
        let full = model.forward(&x, None, None)?.logits;
        let (rel, cache) = decode_parity(&model, &x, 6)?;
        if rel.is_nan() || rel >= 1e-5 {
            problems.push(format!("{ex:?}: prefill + decode differs from the full forward (relative error {rel:e})"));
        }
        let held: usize = cache.iter().map(|c| c.bytes()).sum();
        if held != model.cache_bytes(2, 14) {
            problems
                .push(format!("{ex:?}: state holds {held} bytes, cache_bytes promises {}", model.cache_bytes(2, 14)));
        }
        let (again, _) = build()?;
        let d = (again.forward(&x, None, None)?.logits - &full)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        if d != 0.0 {
            problems.push(format!("{ex:?}: two builds from one seed differ by {d}"));
        }
    }
    Ok(problems)
}

/// The median wall time in milliseconds of `runs` calls of `f`, after one warm-up call: the
/// examples' timer for ops alone (whole models are timed by `zoo bench`).
///
/// ```
/// let ms = zoo_core::check::median_ms(3, &|| Ok(()))?;
/// assert!(ms >= 0.0);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn median_ms(runs: usize, f: &dyn Fn() -> Result<()>) -> Result<f64> {
    f()?;
    let mut ts = (0..runs.max(1))
        .map(|_| {
            let t0 = std::time::Instant::now();
            f().map(|_| t0.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<Vec<f64>>>()?;
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(ts[ts.len() / 2])
}
