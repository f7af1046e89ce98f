//! `zoo_kernels::moe_dispatch`'s gather ops against candle compositions (index_select of a
//! zero-padded table, broadcast_mul, sum) on CPU and, in a CUDA build on a GPU, its kernels, in f32
//! (to 1e-6 relative) and bf16 (to 2e-2).
use candle_core::{DType, Device, Result, Tensor, D};
use zoo_kernels::moe_dispatch::{gather_dot, gather_sum, Weights};

/// Pseudo-random u32 below `n + 1` (n: the padding index), `len` of them.
fn indices(len: usize, n: usize, seed: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 7919 + seed * 104729) % (n + 1)) as u32).collect()
}

/// Largest |a − b| over max |b|, compared on the CPU (a may be on the GPU, b is the CPU reference).
fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?;
    let scale = b.abs()?.max(0)?.to_scalar::<f32>()?.max(1e-20);
    Ok((a - b)?.abs()?.max(0)?.to_scalar::<f32>()? / scale)
}

/// The compositions the ops replace (zoo-moe's dispatch before them), in f32.
fn padded(t: &Tensor) -> Result<Tensor> {
    Tensor::cat(&[t, &Tensor::zeros((1, t.dim(1)?), t.dtype(), t.device())?], 0)
}

fn check(dev: &Device, dt: DType, tol: f32) -> Result<()> {
    let (n, k, r, d) = (300, 2, 700, 96);
    let x = Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu)?;
    let ys = Tensor::randn(0f32, 1.0, (r, d), &Device::Cpu)?;
    let w = Tensor::rand(0f32, 1.0, (n, k), &Device::Cpu)?;
    let rows = Tensor::new(indices(r, n, 1), &Device::Cpu)?; // token of each row, n = padding
    let inv = Tensor::new(indices(n * k, r, 2), &Device::Cpu)?; // row of each slot, r = dropped
    let slots = Tensor::new(indices(r, n * k, 3), &Device::Cpu)?; // slot of each row, n·k = padding
    // References on the CPU in f32.
    let gather_ref = padded(&x)?.index_select(&rows, 0)?;
    let picked = padded(&ys)?.index_select(&inv, 0)?.reshape((n, k, d))?;
    let combine_ref = picked.broadcast_mul(&w.unsqueeze(2)?)?.sum(1)?;
    let sum_ref = picked.sum(1)?;
    let w_pad = Tensor::cat(&[&w.flatten_all()?, &Tensor::zeros(1, DType::F32, &Device::Cpu)?], 0)?;
    let scaled_ref = padded(&x)?.index_select(&rows, 0)?.broadcast_mul(&w_pad.index_select(&slots, 0)?.unsqueeze(1)?)?;
    let dot_ref = picked.broadcast_mul(&x.unsqueeze(1)?)?.sum(D::Minus1)?.flatten_all()?;
    // The ops on `dev` in `dt`.
    let on = |t: &Tensor| -> Result<Tensor> { t.to_dtype(dt)?.to_device(dev) };
    let (xd, ysd, wd) = (on(&x)?, on(&ys)?, on(&w)?);
    let (rowsd, invd, slotsd) = (rows.to_device(dev)?, inv.to_device(dev)?, slots.to_device(dev)?);
    let wflat = wd.flatten_all()?;
    let cases = [
        ("gather", gather_sum(&xd, &rowsd, 1, Weights::None)?, gather_ref),
        ("sum of slots", gather_sum(&ysd, &invd, k, Weights::None)?, sum_ref),
        ("weighted combine", gather_sum(&ysd, &invd, k, Weights::Slot(&wflat))?, combine_ref),
        ("gathered weights", gather_sum(&xd, &rowsd, 1, Weights::Indexed(&wflat, &slotsd))?, scaled_ref),
        ("dot", gather_dot(&xd, &ysd, &invd, k)?, dot_ref),
    ];
    for (name, got, want) in cases {
        assert_eq!(got.dims(), want.dims(), "{name}: shape");
        assert_eq!(got.dtype(), dt, "{name}: dtype");
        let e = max_rel(&got, &want)?;
        assert!(e <= tol, "{name} on {dev:?} in {dt:?}: rel. error {e:.2e} > {tol:.0e}");
    }
    // Padding and dropped indices contribute exactly nothing.
    let pad: Vec<usize> = rows.to_vec1::<u32>()?.iter().enumerate().filter(|(_, &t)| t as usize == n).map(|(i, _)| i).collect();
    assert!(!pad.is_empty());
    let g = gather_sum(&xd, &rowsd, 1, Weights::None)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    for i in pad {
        assert_eq!(g.get(i)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0, "padding row {i}");
    }
    Ok(())
}

#[test]
fn gathers_match_the_composition_on_cpu() -> Result<()> {
    check(&Device::Cpu, DType::F32, 1e-6)?;
    check(&Device::Cpu, DType::BF16, 2e-2)
}

#[test]
fn gathers_match_the_composition_on_cuda() -> Result<()> {
    match Device::new_cuda(0) {
        Ok(dev) => {
            check(&dev, DType::F32, 1e-6)?;
            check(&dev, DType::BF16, 2e-2)
        }
        Err(_) => {
            eprintln!("skipped: no CUDA device in this build or machine");
            Ok(())
        }
    }
}

#[test]
fn bad_shapes_are_refused() -> Result<()> {
    let x = Tensor::zeros((4, 3), DType::F32, &Device::Cpu)?;
    let idx = Tensor::new(&[0u32, 1, 2], &Device::Cpu)?;
    assert!(gather_sum(&x, &idx, 2, Weights::None).is_err(), "3 indices in groups of 2");
    let w = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
    assert!(gather_sum(&x, &idx, 1, Weights::Slot(&w)).is_err(), "2 weights for 3 terms");
    assert!(gather_dot(&x, &x, &idx, 2).is_err(), "3 indices for 4 rows of k = 2");
    assert!(gather_sum(&x, &idx.to_dtype(DType::F32)?, 1, Weights::None).is_err(), "f32 indices");
    Ok(())
}
