//! CPU time of RMS norm, RoPE and SwiGLU's product, forward + backward, in their two forms: the
//! candle compositions (`rms_normalize_naive` times the gain, `rope_slow`, `silu(g) ⊙ u`) and the
//! ops' CPU forms (`zoo_kernels::{rms_norm, rope, swiglu}`), at the 6L-384 CPU twin's shapes
//! (T 256 × B 4, d 384, 6 heads of 64, SwiGLU hidden 1024). The loss is Σ y ⊙ W; its own cost,
//! timed on an identity, is subtracted from both. Medians of 9 after 1 warm-up.
//!
//!     cargo run --release -p zoo-core --example elementwise_cpu
use candle_core::{DType, Device, Result, Tensor, Var};
use zoo_core::check::median_ms;
use zoo_core::zoo_kernels as zk;

type Case<'a> = (&'static str, Box<dyn Fn() -> Result<()> + 'a>, Box<dyn Fn() -> Result<()> + 'a>, Box<dyn Fn() -> Result<()> + 'a>);

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let var = |dims: &[usize]| Var::from_tensor(&Tensor::randn(0f32, 1.0, dims, &dev)?);
    let (x, gain, q, g, u) = (var(&[4, 256, 384])?, var(&[384])?, var(&[4, 6, 256, 64])?, var(&[4, 256, 1024])?, var(&[4, 256, 1024])?);
    let (cos, sin) = zoo_core::nn::Rope::new(64, 1024, 10_000.0, &dev)?.tables(0, 256)?;
    let (cos, sin) = (cos.to_dtype(DType::F32)?, sin.to_dtype(DType::F32)?);
    let w = |t: &Var| Tensor::randn(0f32, 1.0, t.dims(), &dev);
    let (wx, wq, wg) = (w(&x)?, w(&q)?, w(&g)?);
    let loss = |y: Tensor, w: &Tensor| -> Result<()> { (y * w)?.sum_all()?.backward().map(|_| ()) };
    let cases: Vec<Case> = vec![
        (
            "rms norm (1024 x 384, gain)",
            Box::new(|| loss((x.as_tensor() * 1.0)?, &wx)),
            Box::new(|| loss(zoo_core::ops::rms_normalize_naive(x.as_tensor(), 1e-5)?.broadcast_mul(gain.as_tensor())?, &wx)),
            Box::new(|| loss(zk::rms_norm::rms_norm(x.as_tensor(), Some(gain.as_tensor()), 1e-5)?, &wx)),
        ),
        (
            "rope (4, 6, 256, 64)",
            Box::new(|| loss((q.as_tensor() * 1.0)?, &wq)),
            Box::new(|| loss(candle_nn::rotary_emb::rope_slow(q.as_tensor(), &cos, &sin)?, &wq)),
            Box::new(|| loss(zk::rope::rope(q.as_tensor(), &cos, &sin)?, &wq)),
        ),
        (
            "swiglu (1024 x 1024)",
            Box::new(|| loss((g.as_tensor() * 1.0)?, &wg)),
            Box::new(|| loss((g.as_tensor().silu()? * u.as_tensor())?, &wg)),
            Box::new(|| loss(zk::swiglu::swiglu(g.as_tensor(), u.as_tensor())?, &wg)),
        ),
    ];
    for (name, identity, comp, op) in cases {
        let z = median_ms(9, &*identity)?;
        let (c, o) = (median_ms(9, &*comp)? - z, median_ms(9, &*op)? - z);
        println!("{name}: composition {c:.2} ms, op (CPU form) {o:.2} ms, {:.1}x (the loss's {z:.2} ms subtracted)", c / o);
    }
    Ok(())
}
