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
    assert_eq!(compress(&mut c, PressConfig::Knorm.build()?.as_ref(), 0.4, 0)?, 2);
    assert_eq!(c.positions(), &[1, 3, 4]);
    Ok(())
}

#[test]
fn streaming_llm_keeps_sinks_and_the_recent_window() -> Result<()> {
    let mut c = cache(10, |j| [j as f32, 1.0])?;
    let press = PressConfig::StreamingLlm { sinks: 2 }.build()?;
    assert_eq!(compress(&mut c, press.as_ref(), 0.5, 0)?, 5);
    assert_eq!(c.positions(), &[0, 1, 7, 8, 9]);
    // A second round works on what is left, by position.
    compress(&mut c, press.as_ref(), 0.4, 0)?;
    assert_eq!(c.positions(), &[0, 1, 9]);
    Ok(())
}

#[test]
fn random_press_is_seeded() -> Result<()> {
    let kept = |seed| -> Result<Vec<usize>> {
        let mut c = cache(20, |j| [j as f32, 0.0])?;
        compress(&mut c, PressConfig::Random { seed }.build()?.as_ref(), 0.5, 0)?;
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
    let e = compress(&mut c, PressConfig::Knorm.build().unwrap().as_ref(), 1.0, 0).unwrap_err().to_string();
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
            compress_model(&mut st, PressConfig::Knorm.build()?.as_ref(), r)?;
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

/// At ratio 0 every press (those scored by attention observing the prompt's queries) leaves the
/// decoded logits bit for bit those of the uncompressed cache; at 0.5 each changes them.
#[test]
fn every_press_at_ratio_zero_gives_the_uncompressed_logits() -> Result<()> {
    let (lm, _store) = tiny_lm(2, 8, 32)?;
    let prompt = Tensor::new(&[[1u32, 5, 2, 7, 3, 9, 4, 11, 6, 8, 10, 12]], &Device::Cpu)?;
    let next = Tensor::new(&[[13u32]], &Device::Cpu)?;
    let decode = |press: Option<&dyn zoo_kv_compress::Press>, ratio: f64| -> Result<Vec<f32>> {
        let mut st = lm.new_cache();
        if let Some(p) = press {
            zoo_kv_compress::observe_model(&mut st, p);
        }
        lm.forward(&prompt, Some(&mut st), None)?;
        if let Some(p) = press {
            zoo_kv_compress::compress_seen(&mut st, p, ratio, &Default::default())?;
        }
        lm.forward(&next, Some(&mut st), None)?.logits.flatten_all()?.to_vec1::<f32>()
    };
    let full = decode(None, 0.0)?;
    for cfg in [
        PressConfig::StreamingLlm { sinks: 2 },
        PressConfig::Knorm,
        PressConfig::Random { seed: 0 },
        PressConfig::Tova,
        PressConfig::SnapKv { window: 4, kernel: 3 },
        PressConfig::H2o { recent: 0.5 },
    ] {
        let press = cfg.build()?;
        assert_eq!(decode(Some(press.as_ref()), 0.0)?, full, "{cfg:?} at ratio 0");
        assert_ne!(decode(Some(press.as_ref()), 0.5)?, full, "{cfg:?} at ratio 0.5 changed nothing");
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
    let knorm = PressConfig::Knorm.build()?;
    for chunk in [1, 7, 64] {
        let (sum, n, _) = streaming_nll(&lm, &ids, chunk, Some(knorm.as_ref()), 0.0, &Default::default())?;
        assert_eq!(n, 39);
        assert!((sum - full).abs() < 1e-4 * full.abs(), "chunk {chunk}: {sum} vs {full}");
    }
    let (sum, n, held) = streaming_nll(&lm, &ids, 8, Some(knorm.as_ref()), 0.5, &Default::default())?;
    assert_eq!(n, 39);
    assert!((sum - full).abs() > 1e-6, "ratio 0.5 changed nothing");
    // After chunks ending at 8, 16, 24, 32, 39 tokens the cache holds 4, 8, 12, 16, 20 entries.
    assert!((held - 12.0).abs() < 1e-9, "{held}");
    // A token budget: the cache is cut back to 10 entries once it holds more (8 after the first
    // chunk, then 10, 10, 10, 10).
    let (sum10, n, held) = streaming_nll(&lm, &ids, 8, Some(knorm.as_ref()), zoo_kv_compress::Keep::Tokens(10), &Default::default())?;
    assert_eq!(n, 39);
    assert!((held - 9.6).abs() < 1e-9, "{held}");
    assert!((sum10 - full).abs() > 1e-6, "a 10-token budget changed nothing");
    // A budget above everything read keeps everything: the full-context NLL.
    let (sum_all, _, _) = streaming_nll(&lm, &ids, 8, Some(knorm.as_ref()), zoo_kv_compress::Keep::Tokens(64), &Default::default())?;
    assert!((sum_all - full).abs() < 1e-4 * full.abs(), "{sum_all} vs {full}");
    Ok(())
}

/// `Keep`: a ratio keeps `keep_count`, tokens keep that many (all while fewer were seen); zero
/// tokens and ratios outside [0, 1) are refused by name.
#[test]
fn keep_by_ratio_or_tokens() {
    use zoo_kv_compress::{keep_count, Keep};
    assert_eq!(Keep::from(0.75).of(100), keep_count(100, 0.75));
    assert_eq!((Keep::Tokens(16).of(100), Keep::Tokens(16).of(10), Keep::Tokens(16).of(0)), (16, 10, 0));
    assert!(Keep::Tokens(1).evicts() && !Keep::Ratio(0.0).evicts() && Keep::Ratio(0.5).evicts());
    assert!(Keep::Tokens(0).check().unwrap_err().starts_with("keep_tokens"));
    assert!(Keep::Ratio(1.0).check().unwrap_err().starts_with("ratio"));
    assert!(Keep::Tokens(3).check().is_ok() && Keep::Ratio(0.0).check().is_ok());
}

/// A cache of `n` slots over 2 heads with head dim 2 (keys `key(j)`, values equal), observing
/// `observe` queries, and the queries `q(i)` of its last `nq` tokens handed to it.
fn observed_cache(n: usize, key: impl Fn(usize) -> [f32; 2], observe: usize, nq: usize, q: impl Fn(usize) -> [f32; 2]) -> Result<KvCache> {
    let mut c = cache(n, key)?;
    c.set_observe(Some(observe));
    let mut data = Vec::new();
    for _h in 0..2 {
        for i in 0..nq {
            data.extend(q(i));
        }
    }
    c.observe(&Tensor::from_vec(data, (1, 2, nq, 2), &Device::Cpu)?)?;
    Ok(c)
}

/// The presses' attention equals softmax(q·k/√d) computed by hand, with grouped heads (query head h
/// reads kv head h / 2) and keys after a query's position hidden from it.
#[test]
fn attention_matches_a_hand_computation() -> Result<()> {
    let dev = Device::Cpu;
    let (h, hkv, w, n, d) = (4, 2, 3, 4, 2);
    let qv: Vec<f32> = (0..h * w * d).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
    let kv: Vec<f32> = (0..hkv * n * d).map(|i| ((i * 53 % 13) as f32 - 6.0) / 4.0).collect();
    let (qpos, kpos) = ([3usize, 5, 8], [0usize, 2, 5, 7]);
    let q = Tensor::from_vec(qv.clone(), (1, h, w, d), &dev)?;
    let k = Tensor::from_vec(kv.clone(), (1, hkv, n, d), &dev)?;
    let got = zoo_kv_compress::attention(&q, &qpos, &k, &kpos)?.flatten_all()?.to_vec1::<f32>()?;
    for hh in 0..h {
        let g = hh / (h / hkv);
        for i in 0..w {
            let s: Vec<f32> = (0..n)
                .map(|j| {
                    let dot: f32 = (0..d).map(|e| qv[(hh * w + i) * d + e] * kv[(g * n + j) * d + e]).sum();
                    if kpos[j] <= qpos[i] { dot / (d as f32).sqrt() } else { f32::NEG_INFINITY }
                })
                .collect();
            let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = s.iter().map(|x| (x - m).exp()).sum();
            for j in 0..n {
                let want = (s[j] - m).exp() / z;
                let at = (hh * w + i) * n + j;
                assert!((got[at] - want).abs() < 1e-6, "h {hh} q {i} k {j}: {} vs {want}", got[at]);
            }
        }
    }
    // The query at position 3 sees keys 0 and 2 only.
    assert_eq!(got[2], 0.0);
    assert_eq!(got[3], 0.0);
    Ok(())
}

/// Keys on a circle; the last query points along key 2 and then key 5: TOVA keeps the slots
/// nearest in angle to it, and refuses to run without an observed query.
#[test]
fn tova_keeps_what_the_last_query_attends_to() -> Result<()> {
    let key = |j: usize| {
        let a = j as f32 * 0.6;
        [3.0 * a.cos(), 3.0 * a.sin()]
    };
    let q = |_i: usize| {
        let a = 2.0f32 * 0.6;
        [3.0 * a.cos(), 3.0 * a.sin()]
    };
    let mut c = observed_cache(8, key, 1, 1, q)?;
    compress(&mut c, PressConfig::Tova.build()?.as_ref(), 0.625, 0)?; // keep 3
    assert_eq!(c.positions(), &[1, 2, 3]);
    // Without observation: a clear error, not a silent fallback.
    let mut c = cache(8, key)?;
    let e = compress(&mut c, PressConfig::Tova.build()?.as_ref(), 0.5, 0).unwrap_err().to_string();
    assert!(e.contains("observe_model"), "{e}");
    Ok(())
}

/// One slot (4) draws nearly all the window's attention: with pooling over 3 positions its
/// neighbours 3 and 5 share the vote, and the window's own slots (8, 9) are always kept.
#[test]
fn snapkv_pools_votes_and_keeps_its_window() -> Result<()> {
    let key = |j: usize| if j == 4 { [10.0, 0.0] } else { [0.0, 0.0] };
    let q = |_i: usize| [5.0, 0.0];
    let kept = |kernel: usize| -> Result<Vec<usize>> {
        let mut c = observed_cache(10, key, 2, 2, q)?;
        compress(&mut c, PressConfig::SnapKv { window: 2, kernel }.build()?.as_ref(), 0.5, 0)?;
        Ok(c.positions().to_vec())
    };
    assert_eq!(kept(3)?, vec![3, 4, 5, 8, 9]);
    // A cache observing more queries than the window (another press asked for more) votes with
    // the window's queries only: same slots kept.
    let mut c = observed_cache(10, key, 5, 5, q)?;
    compress(&mut c, PressConfig::SnapKv { window: 2, kernel: 3 }.build()?.as_ref(), 0.5, 0)?;
    assert_eq!(c.positions(), &[3, 4, 5, 8, 9]);
    let no_pool = kept(1)?;
    assert!(no_pool.contains(&4) && no_pool.contains(&8) && no_pool.contains(&9), "{no_pool:?}");
    assert_ne!(no_pool, vec![3, 4, 5, 8, 9]);
    // Settings no press can use are refused, naming the field.
    assert!(PressConfig::SnapKv { window: 2, kernel: 4 }.check().unwrap_err().starts_with("press.kernel"));
    assert!(PressConfig::SnapKv { window: 0, kernel: 5 }.check().unwrap_err().starts_with("press.window"));
    assert!(PressConfig::H2o { recent: 1.5 }.check().unwrap_err().starts_with("press.recent"));
    Ok(())
}

/// H2O's scores add up over compressions: slot 1 drew the first round's attention and survives a
/// second round whose queries look elsewhere (slot 3), which a press without memory would not
/// allow; with a recent share the newest positions stay whatever their scores.
#[test]
fn h2o_accumulates_attention_over_compressions() -> Result<()> {
    let key = |j: usize| match j {
        1 => [10.0, 0.0],
        3 => [0.0, 10.0],
        _ => [0.0, 0.0],
    };
    let press = PressConfig::H2o { recent: 0.0 }.build()?;
    let mut c = observed_cache(6, key, 4096, 2, |_| [5.0, 0.0])?;
    compress(&mut c, press.as_ref(), 0.2, 0)?; // keep 5 of 6
    assert!(c.positions().contains(&1));
    // Two new tokens (zero keys), whose queries attend to slot 3.
    let z = Tensor::zeros((1, 2, 2, 2), DType::F32, &Device::Cpu)?;
    c.append(&z, &z)?;
    c.observe(&Tensor::from_vec([0.0f32, 5.0, 0.0, 5.0, 0.0, 5.0, 0.0, 5.0].to_vec(), (1, 2, 2, 2), &Device::Cpu)?)?;
    compress_to_keep(&mut c, press.as_ref(), 2)?;
    assert_eq!(c.positions(), &[1, 3]);
    // The running sums went with the evicted slots, and the observed queries were consumed:
    // a third compression without new queries changes nothing.
    compress_to_keep(&mut c, press.as_ref(), 2)?;
    assert_eq!(c.positions(), &[1, 3]);
    // recent = 0.5 of a budget of 4: the two newest positions, then the two heaviest.
    let mut c = observed_cache(8, key, 4096, 1, |_| [5.0, 0.0])?;
    compress_to_keep(&mut c, PressConfig::H2o { recent: 0.5 }.build()?.as_ref(), 4)?;
    assert_eq!(c.positions()[2..], [6, 7]);
    assert!(c.positions().contains(&1));
    Ok(())
}

fn compress_to_keep(c: &mut KvCache, press: &dyn zoo_kv_compress::Press, keep: usize) -> Result<usize> {
    zoo_kv_compress::compress_to(c, press, keep, 0)
}

/// On a model: the queries a layer's cache observed, scored by the presses' `attention`, give the
/// attention probabilities the layer itself used (its probe), RoPE and all; TOVA then compresses
/// every layer.
#[test]
fn observed_queries_reproduce_the_layers_attention() -> Result<()> {
    use zoo_kv_compress::observe_model;
    let (lm, _store) = tiny_lm(3, 8, 32)?;
    let prompt = Tensor::new(&[[1u32, 5, 2, 7, 3, 9, 4, 11, 6, 8]], &Device::Cpu)?;
    let snap = PressConfig::SnapKv { window: 10, kernel: 1 }.build()?;
    let mut st = lm.new_cache();
    observe_model(&mut st, snap.as_ref());
    let mut probe = zoo_core::model::ModelProbe::default();
    lm.forward(&prompt, Some(&mut st), Some(&mut probe))?;
    for (l, s) in st.iter_mut().enumerate() {
        let c = s.kv()?;
        let (q, qpos) = c.observed().expect("observed");
        let (k, _) = c.kv()?.expect("filled");
        let ours = zoo_kv_compress::attention(q, qpos, &k, c.positions())?;
        let layer = probe.layers[l].attn.as_ref().expect("probe attention");
        let diff = (ours - layer.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "layer {l}: {diff}");
    }
    let tova = PressConfig::Tova.build()?;
    let mut st = lm.new_cache();
    observe_model(&mut st, tova.as_ref());
    lm.forward(&prompt, Some(&mut st), None)?;
    assert_eq!(compress_model(&mut st, tova.as_ref(), 0.5)?, vec![5, 5]);
    Ok(())
}

/// The calibration maths: the top eigenvector of a Gram matrix (a rotated diagonal with known
/// axes) and Spearman's rank correlation (monotone, reversed, and with ties against a hand value).
#[test]
fn qfilters_eigenvector_and_spearman() {
    use zoo_kv_compress::qfilters::{spearman, top_eigenvector};
    // G = R diag(5, 1) Rᵀ with R a rotation by 30°: the top eigenvector is R's first column.
    let (c, s) = (30f64.to_radians().cos(), 30f64.to_radians().sin());
    let g = [5.0 * c * c + s * s, (5.0 - 1.0) * c * s, (5.0 - 1.0) * c * s, 5.0 * s * s + c * c];
    let v = top_eigenvector(&g, 2);
    let dot = v[0] * c + v[1] * s;
    assert!((dot.abs() - 1.0).abs() < 1e-9, "{v:?}");
    assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 25.0, 100.0]) - 1.0).abs() < 1e-12);
    assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
    // Ranks of [1, 2, 2, 3] are [0, 1.5, 1.5, 3]; against [0, 1, 2, 3]: r = 4.5 / sqrt(4.5 · 5).
    let r = spearman(&[1.0, 2.0, 2.0, 3.0], &[0.0, 1.0, 2.0, 3.0]);
    assert!((r - 4.5 / (4.5f64 * 5.0).sqrt()).abs() < 1e-12, "{r}");
}

/// A Q-Filters press scores keys by their projection on its layer's filter: layer 0's filter
/// points along x, layer 1's along y, so the same cache keeps different slots per layer. Filters
/// that do not fit the cache are refused, naming the layer.
#[test]
fn qfilters_press_projects_keys_on_the_layers_filter() -> Result<()> {
    let path = std::env::temp_dir().join(format!("zoo-qfilters-{}.safetensors", std::process::id()));
    let f = Tensor::from_vec(vec![1f32, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0], (2, 2, 2), &Device::Cpu)?;
    zoo_core::candle_core::safetensors::save(&std::collections::HashMap::from([("filters".to_string(), f)]), &path)?;
    let press = PressConfig::QFilters { path: path.clone() }.build()?;
    let keys = [[3.0, 0.0], [0.0, 3.0], [2.0, 1.0], [1.0, 2.0]];
    let mut c = cache(4, |j| keys[j])?;
    compress(&mut c, press.as_ref(), 0.5, 0)?;
    assert_eq!(c.positions(), &[0, 2]);
    let mut c = cache(4, |j| keys[j])?;
    compress(&mut c, press.as_ref(), 0.5, 1)?;
    assert_eq!(c.positions(), &[1, 3]);
    let mut c = cache(4, |j| keys[j])?;
    let e = compress(&mut c, press.as_ref(), 0.5, 2).unwrap_err().to_string();
    assert!(e.contains("layer 2"), "{e}");
    let e = PressConfig::QFilters { path: "/nonexistent/f.safetensors".into() }.build().err().expect("no file").to_string();
    assert!(e.contains("/nonexistent/f.safetensors"), "{e}");
    Ok(())
}

/// Budgets: uniform keeps the same everywhere; the pyramid decays linearly from the bottom to
/// keep/β at the top with the same total; β < 1 is refused. On a model, a pyramid keeps more in
/// the first layer than the last, and the mean held per layer is the uniform one.
#[test]
fn pyramid_budget_keeps_the_total_and_decays_with_depth() -> Result<()> {
    use zoo_kv_compress::{streaming_nll, Budget};
    assert_eq!(Budget::Uniform.layer_keeps(7, 3), vec![7, 7, 7]);
    let k = Budget::Pyramid { beta: 20.0 }.layer_keeps(100, 5);
    assert_eq!(k.iter().sum::<usize>(), 500);
    assert!(k.windows(2).all(|w| w[0] > w[1]), "{k:?}");
    // 195, 147.5, 100, 52.5, 5 floored sum to 499; the remaining one goes to the bottom layer.
    assert_eq!(k, vec![196, 147, 100, 52, 5]);
    assert_eq!(Budget::Pyramid { beta: 2.0 }.layer_keeps(10, 1), vec![10]);
    assert!(Budget::Pyramid { beta: 0.5 }.check().unwrap_err().starts_with("budget.beta"));
    let (lm, _store) = tiny_lm(1, 16, 64)?;
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 7 + 3) % 16).collect();
    let knorm = PressConfig::Knorm.build()?;
    let (_, _, uniform) = streaming_nll(&lm, &ids, 8, Some(knorm.as_ref()), 0.75, &Budget::Uniform)?;
    let (_, _, pyramid) = streaming_nll(&lm, &ids, 8, Some(knorm.as_ref()), 0.75, &Budget::Pyramid { beta: 4.0 })?;
    assert!((uniform - pyramid).abs() < 1e-9, "{uniform} vs {pyramid}");
    Ok(())
}

/// Ragged per-head storage: each KV head keeps its own slots and positions, the bytes held are
/// the sum over heads, appends continue every head at the original length, and the shared-slot
/// operations refuse a ragged cache.
#[test]
fn ragged_heads_store_their_own_slots() -> Result<()> {
    let k = Tensor::arange(0f32, 24.0, &Device::Cpu)?.reshape((1, 2, 6, 2))?;
    let mut c = KvCache::with_capacity(6, None);
    c.append(&k, &k)?;
    let per_head_slot = 2 * 2 * 4; // K and V, hd 2, f32
    assert!(c.retain_heads(&[vec![0, 1], vec![]]).is_err(), "a head must keep a slot");
    assert!(c.retain_heads(&[vec![0, 9], vec![1]]).is_err());
    c.retain_heads(&[vec![0, 2, 5], vec![3, 4]])?;
    assert!(c.is_ragged());
    assert_eq!(c.head_lens(), vec![3, 2]);
    assert_eq!(c.bytes(), 5 * per_head_slot);
    let (k1, _, p1) = c.head_kv(1)?.unwrap();
    assert_eq!(p1, vec![3, 4]);
    // Head 1's slot 3 holds key (12 + 2·3, 12 + 2·3 + 1).
    assert_eq!(k1.flatten_all()?.to_vec1::<f32>()?, vec![18., 19., 20., 21.]);
    let one = Tensor::full(100f32, (1, 2, 1, 2), &Device::Cpu)?;
    let parts = c.append_heads(&one, &one)?;
    assert_eq!(parts[0].2, vec![0, 2, 5, 6]);
    assert_eq!(parts[1].2, vec![3, 4, 6]);
    assert_eq!((c.seen(), c.head_lens()), (7, vec![4, 3]));
    // Again, within each head's own slots.
    c.retain_heads(&[vec![3], vec![0, 2]])?;
    assert_eq!(c.head_kv(0)?.unwrap().2, vec![6]);
    assert_eq!(c.head_kv(1)?.unwrap().2, vec![3, 6]);
    assert_eq!(c.bytes(), 3 * per_head_slot);
    assert!(c.append(&one, &one).is_err() && c.retain(&[0]).is_err() && c.kv().is_err());
    // shrink_to: each head its slots plus the room the capacity leaves beyond the longest head.
    assert_eq!(c.shrink_to(2)?, c.bytes());
    assert_eq!(c.shrink_to(3)?, c.bytes() + 2 * per_head_slot);
    Ok(())
}

/// A ragged cache whose heads keep the same slots decodes exactly as the shared eviction of those
/// slots; different slots per head change the output.
#[test]
fn ragged_with_equal_slots_decodes_as_a_shared_eviction() -> Result<()> {
    let (lm, _store) = tiny_lm(1, 8, 32)?;
    let prompt = Tensor::new(&[[1u32, 5, 2, 7, 3, 9, 4, 11, 6, 8]], &Device::Cpu)?;
    let keep = vec![0usize, 2, 5, 7, 9];
    let decode = |how: u8| -> Result<Vec<f32>> {
        let mut st = lm.new_cache();
        lm.forward(&prompt, Some(&mut st), None)?;
        for s in st.iter_mut() {
            if let zoo_core::state::LayerState::Kv(c) = s {
                match how {
                    0 => c.retain(&keep)?,
                    1 => c.retain_heads(&[keep.clone(), keep.clone()])?,
                    _ => c.retain_heads(&[keep.clone(), vec![1, 3, 4, 8, 9]])?,
                }
            }
        }
        let mut out = Vec::new();
        for t in [13u32, 14, 15] {
            out.extend(lm.forward(&Tensor::new(&[[t]], &Device::Cpu)?, Some(&mut st), None)?.logits.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    };
    let (shared, ragged, other) = (decode(0)?, decode(1)?, decode(2)?);
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff(&shared, &ragged) < 1e-5, "{}", diff(&shared, &ragged));
    assert!(diff(&shared, &other) > 1e-4);
    Ok(())
}

/// compress_heads spreads a layer's budget over its heads by score (at least one slot each):
/// with Knorm, the head whose keys are small keeps more.
#[test]
fn compress_heads_spreads_the_budget_by_score() -> Result<()> {
    // Head 0: key norms 1, 2, 3, 4; head 1: 10, 20, 30, 40.
    let data: Vec<f32> = [1f32, 2., 3., 4., 10., 20., 30., 40.].iter().flat_map(|&x| [x, 0.0]).collect();
    let k = Tensor::from_vec(data, (1, 2, 4, 2), &Device::Cpu)?;
    let mut c = KvCache::with_capacity(4, None);
    c.append(&k, &k)?;
    let kept = zoo_kv_compress::compress_heads(&mut c, PressConfig::Knorm.build()?.as_ref(), 2, 0, 0)?;
    assert_eq!(kept, vec![3, 1]);
    assert_eq!(c.head_kv(0)?.unwrap().2, vec![0, 1, 2]);
    assert_eq!(c.head_kv(1)?.unwrap().2, vec![0]);
    // H2O accumulates over compressions: refused per head.
    let mut d = KvCache::with_capacity(4, None);
    d.set_observe(Some(4));
    d.append(&k, &k)?;
    d.observe(&k)?;
    assert!(zoo_kv_compress::compress_heads(&mut d, PressConfig::H2o { recent: 0.5 }.build()?.as_ref(), 2, 0, 0).is_err());
    // A floor of 2 per head: head 1 keeps its own best two (the smallest norms, slots 0 and 1),
    // head 0 the rest of the total 4.
    let mut e = KvCache::with_capacity(4, None);
    e.append(&k, &k)?;
    let kept = zoo_kv_compress::compress_heads(&mut e, PressConfig::Knorm.build()?.as_ref(), 2, 0, 2)?;
    assert_eq!(kept, vec![2, 2]);
    assert_eq!((e.head_kv(0)?.unwrap().2, e.head_kv(1)?.unwrap().2), (vec![0, 1], vec![0, 1]));
    // The share is checked by name.
    let bad = zoo_kv_compress::Budget::Ragged { min_share: 1.5 };
    assert!(bad.check().unwrap_err().contains("budget.min_share"));
    Ok(())
}

/// A ragged budget through streaming NLL: ratio 0 is the full context's NLL; at 0.5 the heads
/// hold half the tokens read on average.
#[test]
fn ragged_budget_in_streaming_nll() -> Result<()> {
    use zoo_kv_compress::{streaming_nll, Budget};
    let (lm, _store) = tiny_lm(2, 8, 64)?;
    let ids: Vec<u32> = (0..40).map(|i| (i * 7 % 16) as u32).collect();
    let knorm = PressConfig::Knorm.build()?;
    let (full, n, _) = streaming_nll(&lm, &ids, 8, Some(knorm.as_ref()), 0.0, &Budget::Ragged { min_share: 0.0 })?;
    let (shared, _, _) = streaming_nll(&lm, &ids, 8, Some(knorm.as_ref()), 0.0, &Budget::Uniform)?;
    assert!((full - shared).abs() < 1e-9 && n == 39);
    let (half, _, held) = streaming_nll(&lm, &ids, 8, Some(knorm.as_ref()), 0.5, &Budget::Ragged { min_share: 0.0 })?;
    assert!(half.is_finite() && (half - full).abs() > 1e-6);
    assert!(held > 0.0 && held < 24.0, "held {held}");
    Ok(())
}
