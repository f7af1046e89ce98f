//! The embedding op's forward and backward against candle's `index_select` (the composition), on
//! CPU (the op's semantics) and, in a CUDA build on a GPU, its kernels.
use candle_core::{Device, Result, Tensor, Var};

fn check(dev: &Device) -> Result<()> {
    let (vocab, d, n) = (50, 37, 1000);
    let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (vocab, d), &Device::Cpu)?.to_device(dev)?)?;
    // Repeated ids (20 rows per id on average), some ids never used.
    let ids: Vec<u32> = (0..n).map(|i| ((i * 7919) % 43) as u32).collect();
    let ids = Tensor::new(ids.as_slice(), dev)?;
    let c = Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu)?.to_device(dev)?;
    let (y_ref, y) = (w.embedding(&ids)?, zoo_kernels::embedding::embedding_op(&w, &ids)?);
    assert_eq!(y.to_vec2::<f32>()?, y_ref.to_vec2::<f32>()?, "forward");
    let g_ref = (y_ref * &c)?.sum_all()?.backward()?.get(&w).unwrap().clone();
    let g = (y * &c)?.sum_all()?.backward()?.get(&w).unwrap().clone();
    let err = (&g - &g_ref)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let scale = g_ref.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(err <= 1e-5 * scale, "gradient differs by {err} (scale {scale})");
    // Rows of ids never seen get exactly zero.
    assert_eq!(g.get(49)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    Ok(())
}

#[test]
fn embedding_matches_index_select_on_cpu() -> Result<()> {
    check(&Device::Cpu)
}

#[test]
fn embedding_matches_index_select_on_cuda() -> Result<()> {
    match Device::new_cuda(0) {
        Ok(dev) => check(&dev),
        Err(_) => {
            eprintln!("skipped: no CUDA device in this build or machine");
            Ok(())
        }
    }
}

#[test]
fn out_of_range_id_is_an_error_on_cpu() -> Result<()> {
    let w = Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu)?;
    let ids = Tensor::new(&[1u32, 3], &Device::Cpu)?;
    let e = zoo_kernels::embedding::embedding_op(&w, &ids).unwrap_err().to_string();
    assert!(e.contains("id 3 is outside the table of 3 rows"), "{e}");
    Ok(())
}

/// The CUDA backward (ids sorted by a radix sort, each id's rows summed in position order) on
/// shapes that stress each of its steps: every id the same (one bucket of 100,000 rows, thousands of
/// pieces), a vocabulary needing three 8-bit radix passes (70,000 rows), ids at and past the table's
/// end, a single id, and N not a multiple of the sort's tile. Each gradient must equal the f64 sum
/// of its rows to within f32 rounding of the rows' absolute sum, rows no id names must be exactly
/// zero, and three runs must give the same bits (the atomic scatter it replaces did not promise
/// that).
#[test]
fn sorted_backward_is_exact_and_repeats_on_cuda() -> Result<()> {
    let Ok(dev) = Device::new_cuda(0) else {
        eprintln!("skipped: no CUDA device in this build or machine");
        return Ok(());
    };
    let cases: [(usize, usize, usize, &dyn Fn(usize) -> u32); 5] = [
        (3, 64, 100_000, &|_| 1),
        (70_000, 24, 5_000, &|i| ((i as u64 * 2_654_435_761) % 70_000) as u32),
        (1024, 130, 65_537, &|i| ((i * 7919) % 997) as u32 * (1 + (i % 3 == 0) as u32)),
        (10, 8, 1, &|_| 9),
        // Ids 40..60 are past the 40-row table: no gradient anywhere from them.
        (40, 33, 3_001, &|i| ((i * 31) % 60) as u32),
    ];
    for (vocab, d, n, id) in cases {
        let ids: Vec<u32> = (0..n).map(id).collect();
        let g: Vec<f32> = (0..n * d).map(|i| (((i as u64 * 48_271) % 2_147_483_647) as f32 / 2.147e9 - 0.5) * 3.0).collect();
        // The f64 reference and each row's absolute sum.
        let (mut want, mut mag) = (vec![0f64; vocab * d], vec![0f64; vocab * d]);
        for (i, &v) in ids.iter().enumerate() {
            if (v as usize) < vocab {
                for j in 0..d {
                    want[v as usize * d + j] += g[i * d + j] as f64;
                    mag[v as usize * d + j] += (g[i * d + j] as f64).abs();
                }
            }
        }
        let ids_t = Tensor::new(ids.as_slice(), &dev)?;
        let g_t = Tensor::from_vec(g, (n, d), &dev)?;
        let w = Var::from_tensor(&Tensor::zeros((vocab, d), candle_core::DType::F32, &dev)?)?;
        let grad = || -> Result<Vec<f32>> {
            let y = zoo_kernels::embedding::embedding_op(w.as_tensor(), &ids_t)?;
            let gw = (y * &g_t)?.sum_all()?.backward()?.get(&w).unwrap().clone();
            gw.flatten_all()?.to_vec1::<f32>()
        };
        let first = grad()?;
        for k in 0..vocab * d {
            let tol = 2e-6 * mag[k] + 1e-30;
            assert!(
                (first[k] as f64 - want[k]).abs() <= tol,
                "V {vocab} d {d} N {n}: dW[{}, {}] = {} against {} (tolerance {tol})",
                k / d,
                k % d,
                first[k],
                want[k]
            );
            if mag[k] == 0.0 {
                assert_eq!(first[k].to_bits(), 0, "V {vocab} N {n}: row {} has no ids but a gradient", k / d);
            }
        }
        for run in 1..3 {
            let again = grad()?;
            let same = first.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "V {vocab} d {d} N {n}: run {run} gave other bits than run 0");
        }
    }
    Ok(())
}
