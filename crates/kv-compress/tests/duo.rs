//! DuoAttention heads: choosing retrieval heads from scores, streaming heads' eviction, and the
//! deviation score.

use zoo_core::candle_core::{Device, Result, Tensor};
use zoo_core::state::{KvCache, LayerState};
use zoo_kv_compress::duo::{streaming_deviation, DuoConfig, DuoPlan, DuoScores};

fn scores() -> DuoScores {
    DuoScores { sinks: 1, window: 2, deviation: vec![vec![0.9, 0.1], vec![0.2, 0.5]] }
}

#[test]
fn the_share_with_the_largest_deviation_retrieves() {
    let s = scores();
    assert_eq!(DuoPlan::new(&s, 0.5).retrieval, vec![vec![true, false], vec![false, true]]);
    assert_eq!(DuoPlan::new(&s, 0.25).retrieval, vec![vec![true, false], vec![false, false]]);
    assert_eq!(DuoPlan::new(&s, 0.0).retrieval, vec![vec![false, false], vec![false, false]]);
    assert_eq!(DuoPlan::new(&s, 1.0).retrieval, vec![vec![true, true], vec![true, true]]);
}

#[test]
fn streaming_heads_keep_sinks_and_window() -> Result<()> {
    let k = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 2, 8, 1))?;
    let mut c = KvCache::with_capacity(8, None);
    c.append(&k, &k)?;
    let full = c.bytes();
    let mut states = vec![LayerState::Kv(c)];
    let plan = DuoPlan { sinks: 1, window: 2, retrieval: vec![vec![false, true]] };
    plan.apply(&mut states)?;
    let LayerState::Kv(c) = &states[0] else { unreachable!() };
    assert_eq!(c.head_kv(0)?.unwrap().2, vec![0, 6, 7]);
    assert_eq!(c.head_kv(1)?.unwrap().2, (0..8).collect::<Vec<_>>());
    assert_eq!(c.bytes() * 16, full * 11);
    // A plan for another number of layers is refused.
    let two = DuoPlan { sinks: 1, window: 2, retrieval: vec![vec![false, true]; 2] };
    assert!(two.apply(&mut states).is_err());
    Ok(())
}

#[test]
fn deviation_is_zero_when_the_window_covers_everything_and_grows_with_far_attention() -> Result<()> {
    // One KV head, two query heads, 6 keys; the last query attends mostly to key 1.
    let mut kd = vec![0f32; 6 * 2];
    kd[2] = 8.0; // key 1 = (8, 0)
    let k = Tensor::from_vec(kd, (1, 1, 6, 2), &Device::Cpu)?;
    let v = Tensor::from_vec((0..12).map(|i| i as f32).collect::<Vec<f32>>(), (1, 1, 6, 2), &Device::Cpu)?;
    let q = Tensor::from_vec(vec![1f32, 0.0, 1.0, 0.0], (1, 2, 1, 2), &Device::Cpu)?;
    let pos: Vec<usize> = (0..6).collect();
    let all = streaming_deviation(&q, &[5], &k, &v, &pos, 0, 6)?;
    assert!(all[0].abs() < 1e-6, "{all:?}");
    let near = streaming_deviation(&q, &[5], &k, &v, &pos, 1, 2)?;
    assert!(near[0] > 0.1, "{near:?}");
    Ok(())
}

#[test]
fn configs_are_checked() {
    let e = DuoConfig { path: "/nonexistent/duo.json".into(), retrieval: 1.5 }.build().unwrap_err().to_string();
    assert!(e.contains("duo.retrieval"), "{e}");
    let e = DuoConfig { path: "/nonexistent/duo.json".into(), retrieval: 0.5 }.build().unwrap_err().to_string();
    assert!(e.contains("duo.path"), "{e}");
}
