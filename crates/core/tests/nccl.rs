//! The NCCL communicator with one rank on the GPU machine (a second GPU is not lent; two ranks on
//! one GPU are refused by NCCL): NCCL loads, the group forms through the id file, and an
//! all-reduce over one rank returns its input bit for bit, for a buffer the size of a gradient
//! bucket too. Skipped without a CUDA build, a GPU, or NCCL (set ZOO_NCCL_LIB or LD_LIBRARY_PATH).

#[cfg(feature = "cuda")]
#[test]
fn nccl_with_one_rank_forms_a_group_and_all_reduce_is_the_identity() -> anyhow::Result<()> {
    use zoo_core::candle_core::{Device, Tensor};
    use zoo_core::dist::{nccl::Nccl, Comm, World};
    let Ok(dev) = Device::new_cuda(0) else {
        eprintln!("skipped: no CUDA device");
        return Ok(());
    };
    let id = std::env::temp_dir().join(format!("zoo-nccl-test-{}.id", std::process::id()));
    let world = World { rank: 0, size: 1, local_rank: 0 };
    let c = match Nccl::new(world, &dev, &id, std::time::Duration::from_secs(10)) {
        Ok(c) => c,
        Err(e) if e.to_string().contains("cannot load") => {
            eprintln!("skipped: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    assert!(id.exists(), "rank 0 wrote the id file");
    assert_eq!((c.rank(), c.world(), c.backend()), (0, 1, "nccl"));
    for n in [1usize, 1000, 1 << 23] {
        let x = Tensor::randn(0f32, 1.0, n, &dev)?;
        let y = c.all_reduce_sum(&x)?;
        assert_eq!(y.device().location(), dev.location());
        let d = (&y - &x)?.abs()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "n = {n}");
    }
    // A CPU tensor (the loss and token counts) comes back on the CPU.
    let s = c.all_reduce_sum(&Tensor::new(&[2.5f32, 3.0], &Device::Cpu)?)?;
    assert!(s.device().is_cpu());
    assert_eq!(s.to_vec1::<f32>()?, vec![2.5, 3.0]);
    let _ = std::fs::remove_file(&id);
    Ok(())
}
