//! GFLOP/s of candle's CPU matmul (the `gemm` crate) at the CPU twins' shapes (scripts/twin-bench-cpu.py's
//! 6L-384 model at T 256 × 4: 1024 rows), for the forward and both backward products of a linear
//! layer and of the LM head. Medians of 7 after 2 warm-ups, f32, on RAYON_NUM_THREADS threads.
//! `scripts/matmul-cpu.py` runs it beside PyTorch's matmul at the same shapes, in one command, into
//! results/bench/matmul-cpu.json; with `--json` it prints one JSON object per shape.
//!
//!     cargo run --release -p zoo-core --example matmul_cpu [-- --json]
use candle_core::{Device, Result, Tensor};
use std::time::Instant;

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let json = std::env::args().any(|a| a == "--json");
    // (name, m, k, n): x (m, k) · w (k, n).
    let shapes = [
        ("qkv/o fwd", 1024, 384, 384),
        ("mlp up fwd", 1024, 384, 1024),
        ("mlp down fwd", 1024, 1024, 384),
        ("head fwd", 1024, 384, 32768),
        ("head dW = Pᵀ h", 32768, 1024, 384),
        ("mlp up dW", 384, 1024, 1024),
    ];
    for (name, m, k, n) in shapes {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (k, n), &dev)?;
        let mut ts = vec![];
        for i in 0..9 {
            let t0 = Instant::now();
            let c = a.matmul(&b)?;
            let _ = c.dims();
            if i >= 2 {
                ts.push(t0.elapsed().as_secs_f64());
            }
        }
        ts.sort_by(|x, y| x.partial_cmp(y).unwrap());
        let s = ts[ts.len() / 2];
        if json {
            println!(r#"{{"name": "{name}", "m": {m}, "k": {k}, "n": {n}, "seconds": {s}}}"#);
        } else {
            println!("{name:16} {m:6} x {k:5} x {n:6}: {:8.2} ms, {:6.1} GFLOP/s", s * 1e3, 2.0 * (m * k * n) as f64 / s / 1e9);
        }
    }
    Ok(())
}
