//! The typed layer state and the explicit phase: a KV cache with evicted (non-contiguous) entries
//! still decodes exactly, preallocated caches do not grow, and backward-less ops refuse training.

use zoo_core::attention::{sdpa, Attention, AttentionConfig};
use zoo_core::candle_core::{DType, Device, Result, Tensor};
use zoo_core::mixer::{BuildCtx, KvCache, LayerState, Mixer, Phase};
use zoo_core::params::ParamStore;
use zoo_core::rng::Rng;

fn layer(cfg: &AttentionConfig, d: usize) -> Result<(Attention, ParamStore)> {
    let store = ParamStore::new(3, DType::F32, &Device::Cpu);
    let ctx = BuildCtx { d_model: d, n_layers: 1, layer: 0, max_seq_len: 32, kind_layer: 0, kind_layers: 1 };
    Ok((Attention::new(cfg, &ctx, &store.root())?, store))
}

fn randn(rng: &mut Rng, shape: (usize, usize, usize)) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2;
    Tensor::from_vec((0..n).map(|_| rng.normal() as f32).collect::<Vec<_>>(), shape, &Device::Cpu)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Reference: the full-sequence projections, and for query `i` softmax attention over the keys at
/// positions `keep` only (a hand-built mask over all T keys), then the output projection.
fn reference_row(a: &Attention, x: &Tensor, i: usize, keep: &[usize]) -> Result<Tensor> {
    let t = x.dim(1)?;
    let q = a.position_q(&a.split_heads(&a.q_proj.forward(x)?, a.n_heads)?, 0)?;
    let k = a.position_k(&a.split_heads(&a.k_proj.forward(x)?, a.n_kv_heads)?, 0)?;
    let v = a.split_heads(&a.v_proj.forward(x)?, a.n_kv_heads)?;
    let mask: Vec<f32> = (0..t).map(|j| if keep.contains(&j) { 0.0 } else { f32::NEG_INFINITY }).collect();
    let mask = Tensor::from_vec(mask, (1, t), &Device::Cpu)?;
    let y = sdpa(&q.narrow(2, i, 1)?, &k, &v, Some(&mask), Phase::Train, None)?;
    a.o_proj.forward(&a.merge_heads(&y)?)
}

/// Prefill 9 tokens, evict the middle entries by hand, decode two more: each decoded token equals
/// attention over exactly the kept keys at their original positions (RoPE applied before caching,
/// new positions continuing from the original length), and differs from attention over all keys.
#[test]
fn kv_cache_with_evicted_entries_decodes_over_the_kept_keys() -> Result<()> {
    let cfg = AttentionConfig {
        n_heads: 4,
        n_kv_heads: Some(2),
        rope_theta: 10_000.0,
        qk_norm: true,
        window: None,
        sink_tokens: 0,
        bias: false,
        o_bias: None,
        head_dim: None,
        qk_norm_gain: false,
        qk_norm_eps: None,
    };
    let (a, _store) = layer(&cfg, 16)?;
    let mut rng = Rng::new(7);
    let x = randn(&mut rng, (2, 11, 16))?;
    let mut st = a.new_state(0);
    a.forward(&x.narrow(1, 0, 9)?, Phase::Prefill, Some(&mut st), None)?;
    st.kv()?.retain(&[0, 1, 2, 7, 8])?;
    assert_eq!(st.kv()?.positions(), &[0, 1, 2, 7, 8]);
    assert_eq!(st.seen(), 9);
    let mut keep = vec![0, 1, 2, 7, 8];
    for i in [9, 10] {
        let y = a.forward(&x.narrow(1, i, 1)?, Phase::Decode, Some(&mut st), None)?;
        keep.push(i);
        let want = reference_row(&a, &x, i, &keep)?;
        let d = max_diff(&y, &want)?;
        assert!(d < 1e-5, "token {i}: decode after eviction differs from attention over {keep:?} by {d}");
        let all: Vec<usize> = (0..=i).collect();
        let unevicted = reference_row(&a, &x, i, &all)?;
        assert!(max_diff(&y, &unevicted)? > 1e-3, "token {i}: eviction had no effect");
    }
    assert_eq!(st.kv()?.positions(), &[0, 1, 2, 7, 8, 9, 10]);
    Ok(())
}

/// A cache sized for prompt + generated tokens allocates once; one without a size doubles, keeping
/// its contents; `bytes` counts the tokens held, `allocated_bytes` the buffers.
#[test]
fn kv_cache_preallocates_and_grows_geometrically() -> Result<()> {
    let dev = Device::Cpu;
    let tok = |i: usize| Tensor::full(i as f32, (1, 2, 1, 4), &dev);
    let mut sized = KvCache::with_capacity(16, None);
    let mut grown = KvCache::with_capacity(0, None);
    let mut caps = Vec::new();
    for i in 0..10 {
        sized.append(&tok(i)?, &tok(i)?)?;
        grown.append(&tok(i)?, &tok(i)?)?;
        assert_eq!(sized.capacity(), 16);
        caps.push(grown.capacity());
    }
    assert_eq!(caps, vec![1, 2, 4, 4, 8, 8, 8, 8, 16, 16]);
    let (k, _) = grown.kv()?.unwrap();
    let got: Vec<f32> = k.narrow(1, 0, 1)?.narrow(3, 0, 1)?.flatten_all()?.to_vec1()?;
    assert_eq!(got, (0..10).map(|i| i as f32).collect::<Vec<_>>());
    assert_eq!(grown.bytes(), 2 * 10 * 2 * 4 * 4);
    assert_eq!(grown.allocated_bytes(), 2 * 16 * 2 * 4 * 4);
    // A clone is a deep copy: writing to it leaves the original alone.
    let mut c2 = grown.clone();
    c2.retain(&[9])?;
    assert_eq!(grown.positions().len(), 10);
    let (k, _) = grown.kv()?.unwrap();
    assert_eq!(k.narrow(2, 0, 1)?.flatten_all()?.to_vec1::<f32>()?[0], 0.0);
    assert!(grown.retain(&[10]).is_err());
    Ok(())
}

/// The phase reaches the ops: the fused softmax (no backward) refuses `Train`, and a state of the
/// wrong kind is an error naming what was expected.
#[test]
fn backward_less_ops_refuse_train_and_states_are_typed() -> Result<()> {
    let x = Tensor::new(&[[1f32, 2.0, 3.0]], &Device::Cpu)?;
    let e = zoo_core::ops::softmax_last_dim_fused(&x, Phase::Train).unwrap_err().to_string();
    assert!(e.contains("Phase::Train"), "{e}");
    for p in [Phase::Prefill, Phase::Decode] {
        zoo_core::ops::softmax_last_dim_fused(&x, p)?;
    }
    assert_eq!(Phase::of(false, 5), Phase::Train);
    assert_eq!(Phase::of(true, 1), Phase::Decode);
    assert_eq!(Phase::of(true, 5), Phase::Prefill);
    let mut st = LayerState::Recurrent(Default::default());
    assert!(st.kv().unwrap_err().to_string().contains("expected a KV cache"));
    Ok(())
}

/// A checkpoint's HF tokenizer spec records the file's hash; loading it after the file changed is
/// an error naming the file (older specs without a hash still load).
#[test]
fn a_changed_tokenizer_file_is_refused() -> anyhow::Result<()> {
    use zoo_core::data::{Tokenizer, TokenizerSpec};
    let dir = std::env::temp_dir().join(format!("zoo-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("tokenizer.json");
    let tok = |vocab: &str| {
        format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
            "pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,
            "model":{{"type":"WordLevel","vocab":{vocab},"unk_token":"[UNK]"}}}}"#
        )
    };
    std::fs::write(&path, tok(r#"{"a":0,"b":1,"[UNK]":2}"#))?;
    let spec = Tokenizer::hf(&path)?.spec();
    let TokenizerSpec::Hf { hash: Some(_), .. } = &spec else { panic!("no hash in {spec:?}") };
    Tokenizer::from_spec(&spec)?;
    std::fs::write(&path, tok(r#"{"b":0,"a":1,"[UNK]":2}"#))?;
    let e = Tokenizer::from_spec(&spec).err().expect("changed file accepted").to_string();
    assert!(e.contains("changed since training") && e.contains("tokenizer.json"), "{e}");
    let old: TokenizerSpec =
        serde_json::from_str(&format!(r#"{{"type":"hf","path":{:?}}}"#, path.display().to_string()))?;
    Tokenizer::from_spec(&old)?;
    Ok(())
}

/// The observation window keeps the last w queries with their positions across appends; running
/// scores add up per position and leave with their slot.
#[test]
fn kv_cache_observes_queries_and_keeps_running_scores() -> Result<()> {
    let dev = Device::Cpu;
    let kv = |t: usize, x: f32| Tensor::full(x, (1, 1, t, 2), &dev);
    let mut c = KvCache::with_capacity(8, None);
    c.append(&kv(2, 1.0)?, &kv(2, 1.0)?)?;
    c.observe(&kv(2, 1.0)?)?; // off: nothing kept
    assert!(c.observed().is_none());
    c.set_observe(Some(3));
    c.append(&kv(2, 2.0)?, &kv(2, 2.0)?)?;
    c.observe(&kv(2, 2.0)?)?;
    c.append(&kv(2, 3.0)?, &kv(2, 3.0)?)?;
    c.observe(&kv(2, 3.0)?)?;
    let (q, qpos) = c.observed().expect("on");
    assert_eq!(qpos, &[3, 4, 5]);
    assert_eq!(q.flatten_all()?.to_vec1::<f32>()?, vec![2.0, 2.0, 3.0, 3.0, 3.0, 3.0]);
    // More queries than tokens appended is a caller's error.
    assert!(c.observe(&kv(7, 0.0)?).is_err());
    assert_eq!(c.accumulate(&[1.0; 6])?, vec![1.0; 6]);
    assert_eq!(c.accumulate(&[0.0, 2.0, 0.0, 0.0, 0.0, 0.5])?, vec![1.0, 3.0, 1.0, 1.0, 1.0, 1.5]);
    c.retain(&[1, 5])?;
    assert_eq!(c.accumulate(&[0.0, 0.0])?, vec![3.0, 1.5]);
    assert!(c.accumulate(&[0.0]).is_err());
    // Off again: the window is dropped.
    c.set_observe(None);
    assert!(c.observed().is_none());
    Ok(())
}

/// Shrinking reallocates to the slots in use plus the room asked for, keeping the contents, and
/// the cache still grows afterwards.
#[test]
fn kv_cache_shrinks_after_eviction() -> Result<()> {
    let dev = Device::Cpu;
    let k = Tensor::arange(0f32, 16.0, &dev)?.reshape((1, 1, 8, 2))?;
    let mut c = KvCache::with_capacity(32, None);
    c.append(&k, &k)?;
    assert_eq!(c.capacity(), 32);
    c.retain(&[1, 6])?;
    assert_eq!(c.shrink_to(c.len() + 1)?, 2 * 3 * 2 * 4); // K and V, 3 slots of 2 f32
    assert_eq!(c.capacity(), 3);
    let (kk, _) = c.kv()?.expect("kept");
    assert_eq!(kk.flatten_all()?.to_vec1::<f32>()?, vec![2.0, 3.0, 12.0, 13.0]);
    c.shrink_to(0)?; // never below the slots in use
    assert_eq!(c.capacity(), 2);
    c.append(&k.narrow(2, 0, 3)?, &k.narrow(2, 0, 3)?)?;
    assert_eq!((c.len(), c.positions()), (5, &[1usize, 6, 8, 9, 10][..]));
    Ok(())
}
