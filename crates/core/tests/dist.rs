//! Data parallelism through the real training loop, ranks as threads ([`ThreadComm`]) on CPU:
//! two and four ranks, each training its slice of every global batch, end with the same
//! parameters as each other (bit for bit) and as one device training the whole batch (to float
//! rounding: the sums run in another order), on MQAR, whose loss counts only the masked answer
//! tokens, so the ranks' token weights matter. One rank is the single-device path exactly.

mod common;
use common::dist_run::{max_diff, run, run_with, STEPS};
use std::sync::Arc;
use zoo_core::candle_core::{DType, Device};
use zoo_core::dist::{Comm, ThreadComm};

/// Every rank of a `world`-rank group, trained in threads.
fn ranks(world: usize) -> Vec<(Vec<(String, Vec<f32>)>, Vec<f64>)> {
    let handles: Vec<_> = ThreadComm::group(world)
        .into_iter()
        .map(|c| std::thread::spawn(move || run(Some(Arc::new(c) as Arc<dyn Comm>)).unwrap()))
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}


#[test]
fn data_parallel_ranks_agree_with_each_other_and_with_one_device() -> anyhow::Result<()> {
    let (single, single_loss) = run(None)?;
    assert!(run(None)?.0 == single, "training is deterministic on CPU");
    for world in [2, 4] {
        let out = ranks(world);
        for (r, (p, l)) in out.iter().enumerate().skip(1) {
            assert!(p == &out[0].0, "world {world}: rank {r}'s parameters differ from rank 0's");
            assert_eq!(l, &out[0].1, "world {world}: rank {r} logged other losses");
        }
        let (d, scale) = max_diff(&out[0].0, &single);
        assert!(d <= 1e-5 * scale.max(1.0), "world {world}: parameters differ from one device's by {d} (scale {scale})");
        for (a, b) in out[0].1.iter().zip(&single_loss) {
            assert!((a - b).abs() < 1e-5 * b.abs().max(1.0), "world {world}: loss {a} against one device's {b}");
        }
    }
    Ok(())
}

/// The weights matter: without them (each rank's plain mean), two ranks would train on another
/// loss than one device whenever the slices count different numbers of answer tokens.
#[test]
fn token_weights_make_the_ranks_mean_the_global_mean() -> anyhow::Result<()> {
    let comms = ThreadComm::group(2);
    let counts = [3.0, 9.0];
    let handles: Vec<_> = comms
        .into_iter()
        .map(|c| std::thread::spawn(move || zoo_core::dist::token_weight(&c, counts[c.rank()]).unwrap()))
        .collect();
    let w: Vec<f64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // Rank means m_r weighted by w_r, averaged: (w_0 m_0 + w_1 m_1) / 2 = (3 m_0 + 9 m_1) / 12.
    assert!((w[0] - 0.5).abs() < 1e-12 && (w[1] - 1.5).abs() < 1e-12, "{w:?}");
    Ok(())
}

/// A world of one takes the single-device path bit for bit.
#[test]
fn one_rank_is_the_single_device_path_exactly() -> anyhow::Result<()> {
    let (single, l1) = run(None)?;
    let (one, l2) = run(Some(Arc::new(ThreadComm::group(1).remove(0))))?;
    assert!(one == single && l1 == l2);
    Ok(())
}

/// Ranks agree on which variables have gradients: one with a gradient on one rank only is
/// averaged with zeros from the others; one no rank touched stays without a gradient (so AdamW
/// leaves it alone, as on one device).
#[test]
fn gradients_present_on_some_ranks_are_averaged_and_absent_ones_stay_absent() {
    use zoo_core::candle_core::Var;
    use zoo_core::optim::Grads;
    let handles: Vec<_> = ThreadComm::group(2)
        .into_iter()
        .map(|c| {
            std::thread::spawn(move || -> Vec<Option<Vec<f32>>> {
                let dev = Device::Cpu;
                let vars: Vec<Var> = (0..3).map(|_| Var::ones(2, DType::F32, &dev).unwrap()).collect();
                // Rank 0: a·1 + b·2; rank 1: a·3; c never used.
                let loss = if c.rank() == 0 {
                    (vars[0].as_tensor().sum_all().unwrap() + (vars[1].as_tensor() * 2.0).unwrap().sum_all().unwrap()).unwrap()
                } else {
                    (vars[0].as_tensor() * 3.0).unwrap().sum_all().unwrap()
                };
                let mut g = Grads::default();
                g.accumulate(&loss.backward().unwrap(), vars.iter(), 1.0).unwrap();
                g.all_reduce_mean(&c, vars.iter()).unwrap();
                vars.iter().map(|v| g.get(v).map(|t| t.to_vec1::<f32>().unwrap())).collect()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), vec![Some(vec![2.0, 2.0]), Some(vec![1.0, 1.0]), None]);
    }
}

/// A run resumes on another number of ranks: two ranks train 2 of 4 steps and stop (rank 0 saves
/// the checkpoint), one device finishes; and the other way round. Both end where one device
/// training all 4 steps ends (to float rounding: the data position is the global batch's).
#[test]
fn a_run_resumes_on_another_number_of_ranks() -> anyhow::Result<()> {
    let (single, _) = run(None)?;
    let ranks_then = |world: usize, dir: &std::path::Path, stop: Option<usize>, resume: bool| {
        let handles: Vec<_> = ThreadComm::group(world)
            .into_iter()
            .map(|c| {
                let dir = dir.to_path_buf();
                std::thread::spawn(move || run_with(Some(Arc::new(c) as Arc<dyn Comm>), Some((&dir, stop, resume))).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    };
    let base = std::env::temp_dir().join(format!("zoo-dist-resume-{}", std::process::id()));
    // 2 ranks, then one device.
    let dir = base.join("a").join("ckpt");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(dir.parent().unwrap())?;
    ranks_then(2, &dir, Some(2), false);
    assert!(dir.join("state.json").exists(), "rank 0 saved the step-2 checkpoint");
    let (resumed, steps) = run_with(None, Some((&dir, None, true)))?;
    assert_eq!(steps.len(), STEPS - 2, "the resumed run trained only the steps after the checkpoint");
    let (d, scale) = max_diff(&resumed, &single);
    assert!(d <= 1e-5 * scale.max(1.0), "2 ranks then 1: {d}");
    // One device, then 2 ranks.
    let dir = base.join("b").join("ckpt");
    std::fs::create_dir_all(dir.parent().unwrap())?;
    run_with(None, Some((&dir, Some(2), false)))?;
    let out = ranks_then(2, &dir, None, true);
    assert!(out[0].0 == out[1].0, "the resumed ranks agree");
    assert_eq!(out[0].1.len(), STEPS - 2, "the resumed ranks trained only the steps after the checkpoint");
    let (d, scale) = max_diff(&out[0].0, &single);
    assert!(d <= 1e-5 * scale.max(1.0), "1 then 2 ranks: {d}");
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
