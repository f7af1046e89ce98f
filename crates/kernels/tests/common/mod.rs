//! Helpers shared by the scan ops' tests.
use candle_core::{Device, Result, Tensor};

/// max |a − b| / max |b| (on the CPU).
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_device(&Device::Cpu)?;
    let b = b.to_device(&Device::Cpu)?;
    let err = (&a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1e-6);
    Ok(err / scale)
}

/// Assert an op's output and gradients (named `names`) against a reference's: output within
/// 1e-5, gradients within 1e-4 (relative), and, with `nonzero`, no reference gradient all zero.
pub fn assert_matches(case: &str, (o, g): &(Tensor, Vec<Tensor>), (o_ref, g_ref): &(Tensor, Vec<Tensor>), names: &[&str], nonzero: bool) -> Result<()> {
    let e = rel_err(o, o_ref)?;
    assert!(e < 1e-5, "{case}: output differs by {e} (relative)");
    assert_eq!(g.len(), g_ref.len(), "{case}: gradient count");
    for (i, (a, b)) in g.iter().zip(g_ref).enumerate() {
        let e = rel_err(a, b)?;
        assert!(e < 1e-4, "{case}: {} differs by {e} (relative)", names[i]);
        if nonzero {
            assert!(b.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{case}: {} is zero", names[i]);
        }
    }
    Ok(())
}
