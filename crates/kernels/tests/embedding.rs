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
