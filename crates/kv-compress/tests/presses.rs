//! Presses on hand-made caches, the budget arithmetic, and a model's caches compressed in place.

use zoo_core::attention::{Attention, AttentionConfig};
use zoo_core::candle_core::{DType, Device, Result, Tensor};
use zoo_core::mixer::Mixer;
use zoo_core::model::{Lm, LmShape};
use zoo_core::params::ParamStore;
use zoo_core::state::KvCache;
use zoo_kv_compress::{check_ratio, compress, compress_model, keep_count, PressConfig};

/// A cache of `n` slots, 2 heads, head dim 2; slot j's keys are `key(j)` on both heads.
fn cache(n: usize, key: impl Fn(usize) -> [f32; 2]) -> Result<KvCache> {
    let mut data = Vec::new();
    for _h in 0..2 {
        for j in 0..n {
            data.extend(key(j));
        }
    }
    let k = Tensor::from_vec(data, (1, 2, n, 2), &Device::Cpu)?;
    let mut c = KvCache::with_capacity(n, None);
    c.append(&k, &k)?;
    Ok(c)
}

/// A 2-layer, 2-head softmax-attention LM over 16 tokens.
fn tiny_lm(seed: u64, d_model: usize, max_seq_len: usize) -> Result<(Lm, ParamStore)> {
    let store = ParamStore::new(seed, DType::F32, &Device::Cpu);
    let shape = LmShape { vocab_size: 16, d_model, n_layers: 2, tie_embeddings: true, norm_eps: 1e-5, max_seq_len };
    let cfg: AttentionConfig = zoo_core::mixer::examples_from_toml(&["n_heads = 2"]).remove(0);
    let lm = Lm::new(&shape, DType::F32, &store.root(), |ctx, pb| {
        Ok((Box::new(Attention::new(&cfg, ctx, &pb.pp("mixer"))?) as Box<dyn Mixer>, None))
    })?;
    Ok((lm, store))
}

#[test]
fn knorm_evicts_the_largest_key_norms() -> Result<()> {
    // Norms 5, 1, 4, 2, 3 (3-4-5 triangles and axis keys).
    let keys = [[3.0, 4.0], [1.0, 0.0], [0.0, 4.0], [0.0, 2.0], [3.0, 0.0]];
    let mut c = cache(5, |j| keys[j])?;
    assert_eq!(compress(&mut c, PressConfig::Knorm.build().as_ref(), 0.4)?, 2);
    assert_eq!(c.positions(), &[1, 3, 4]);
    Ok(())
}

#[test]
fn streaming_llm_keeps_sinks_and_the_recent_window() -> Result<()> {
    let mut c = cache(10, |j| [j as f32, 1.0])?;
    let press = PressConfig::StreamingLlm { sinks: 2 }.build();
    assert_eq!(compress(&mut c, press.as_ref(), 0.5)?, 5);
    assert_eq!(c.positions(), &[0, 1, 7, 8, 9]);
    // A second round works on what is left, by position.
    compress(&mut c, press.as_ref(), 0.4)?;
    assert_eq!(c.positions(), &[0, 1, 9]);
    Ok(())
}

#[test]
fn random_press_is_seeded() -> Result<()> {
    let kept = |seed| -> Result<Vec<usize>> {
        let mut c = cache(20, |j| [j as f32, 0.0])?;
        compress(&mut c, PressConfig::Random { seed }.build().as_ref(), 0.5)?;
        Ok(c.positions().to_vec())
    };
    let (a, b, other) = (kept(1)?, kept(1)?, kept(2)?);
    assert_eq!(a.len(), 10);
    assert_eq!(a, b);
    assert_ne!(a, other);
    Ok(())
}

#[test]
fn budgets_and_bad_ratios() {
    assert_eq!(keep_count(10, 0.0), 10);
    assert_eq!(keep_count(10, 0.75), 3);
    assert_eq!(keep_count(10, 0.9375), 1);
    assert_eq!(keep_count(3, 0.99), 1); // never empty
    assert_eq!(keep_count(0, 0.5), 0);
    for bad in [1.0, -0.1, f64::NAN] {
        assert!(check_ratio(bad).unwrap_err().starts_with("ratio"), "{bad}");
    }
    let mut c = cache(4, |j| [j as f32, 0.0]).unwrap();
    let e = compress(&mut c, PressConfig::Knorm.build().as_ref(), 1.0).unwrap_err().to_string();
    assert!(e.starts_with("ratio"), "{e}");
    // Configs: an unknown press or field is refused with its name.
    let bad: std::result::Result<PressConfig, _> = toml::from_str(r#"type = "h3o""#);
    assert!(bad.unwrap_err().to_string().contains("h3o"));
    let bad: std::result::Result<PressConfig, _> = toml::from_str("type = \"streaming_llm\"\nwindow = 3");
    assert!(bad.unwrap_err().to_string().contains("window"));
}

/// On a model: ratio 0 leaves the next token's logits exactly as they were; a ratio evicts from
/// every attention layer, the bytes held fall to the kept share, and decoding continues at the
/// original length.
#[test]
fn model_caches_compress_in_place() -> Result<()> {
    let (lm, _store) = tiny_lm(0, 8, 32)?;
    let prompt = Tensor::new(&[[1u32, 5, 2, 7, 3, 9, 4, 11, 6, 8, 10, 12]], &Device::Cpu)?;
    let next = Tensor::new(&[[13u32]], &Device::Cpu)?;
    let decode = |ratio: Option<f64>| -> Result<(Tensor, Vec<zoo_core::state::LayerState>)> {
        let mut st = lm.new_cache();
        lm.forward(&prompt, Some(&mut st), None)?;
        if let Some(r) = ratio {
            compress_model(&mut st, PressConfig::Knorm.build().as_ref(), r)?;
        }
        Ok((lm.forward(&next, Some(&mut st), None)?.logits, st))
    };
    let (full, full_st) = decode(None)?;
    let (same, _) = decode(Some(0.0))?;
    assert_eq!(full.flatten_all()?.to_vec1::<f32>()?, same.flatten_all()?.to_vec1::<f32>()?);
    let (half, st) = decode(Some(0.5))?;
    let diff = (&full - &half)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff > 0.0, "evicting half the cache changed nothing");
    for (a, b) in full_st.iter().zip(&st) {
        // 12 prompt tokens: 6 kept, then the decoded token; the full cache holds 13.
        assert_eq!(b.bytes() * 13, a.bytes() * 7);
        assert_eq!(b.seen(), 13);
    }
    Ok(())
}

/// Streaming NLL through the cache: at ratio 0 it equals the full-sequence forward's NLL for any
/// chunk size; at ratio 0.5 the press changes it and the cache holds half the context read.
#[test]
fn streaming_nll_at_ratio_zero_is_the_full_context_nll() -> Result<()> {
    use zoo_kv_compress::streaming_nll;
    let (lm, _store) = tiny_lm(1, 16, 64)?;
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 7 + 3) % 16).collect();
    let x = Tensor::new(&ids[..39], &Device::Cpu)?.unsqueeze(0)?;
    let lp = zoo_core::candle_nn::ops::log_softmax(&lm.forward(&x, None, None)?.logits.squeeze(0)?, 1)?;
    let tgt = Tensor::new(&ids[1..], &Device::Cpu)?.unsqueeze(1)?;
    let full = -(lp.gather(&tgt, 1)?.sum_all()?.to_scalar::<f32>()? as f64);
    let knorm = PressConfig::Knorm.build();
    for chunk in [1, 7, 64] {
        let (sum, n, _) = streaming_nll(&lm, &ids, chunk, Some(knorm.as_ref()), 0.0)?;
        assert_eq!(n, 39);
        assert!((sum - full).abs() < 1e-4 * full.abs(), "chunk {chunk}: {sum} vs {full}");
    }
    let (sum, n, held) = streaming_nll(&lm, &ids, 8, Some(knorm.as_ref()), 0.5)?;
    assert_eq!(n, 39);
    assert!((sum - full).abs() > 1e-6, "ratio 0.5 changed nothing");
    // After chunks ending at 8, 16, 24, 32, 39 tokens the cache holds 4, 8, 12, 16, 20 entries.
    assert!((held - 12.0).abs() < 1e-9, "{held}");
    Ok(())
}
