//! CPU time of the gated linear recurrence's two training forms, forward + backward, at the shapes
//! the CPU configs use: the chunked candle composition (`kernel::chunked`) and the fused scan
//! (`zoo_kernels::linear_scan`, its CPU form). Medians of 7 after 2 warm-ups, in one process.
//!
//!     cargo run --release -p zoo-linear-attention --example scan_cpu
use std::time::Instant;
use zoo_core::candle_core::{Device, Result, Tensor, Var};
use zoo_core::zoo_kernels::delta_scan::delta_scan;
use zoo_core::zoo_kernels::linear_scan::linear_scan;
use zoo_linear_attention::kernel::chunked;

fn median(f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    let mut ts = Vec::new();
    for _ in 0..7 {
        let t0 = Instant::now();
        f()?;
        ts.push(t0.elapsed().as_secs_f64());
    }
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(ts[3])
}

/// Times `forward(fused)` and the backward of Σ o ⊙ r, both forms, and prints one table row.
fn row(label: &str, r: &Tensor, forward: &dyn Fn(bool) -> Result<Tensor>) -> Result<()> {
    let run = |fused: bool| -> Result<()> {
        (forward(fused)? * r)?.sum_all()?.backward()?;
        Ok(())
    };
    let c = median(&mut || run(false))?;
    let s = median(&mut || run(true))?;
    println!("| {label} | {:.2} | {:.2} | {:.2} |", c * 1e3, s * 1e3, c / s);
    Ok(())
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    // (name, B, H, T, d_k, d_v, gate width: 0 none, 1 per head, d_k per channel)
    let shapes = [
        ("quickstart GLA d128", 32, 1, 64, 128, 128, 128),
        ("quickstart GLA d64", 32, 1, 64, 64, 64, 64),
        ("GLA fla widths d128 2 heads", 32, 2, 64, 32, 64, 32),
        ("RetNet-like scalar decay", 32, 2, 64, 32, 64, 1),
        ("RetNet d64 1 head (recall-gate-ablation)", 32, 1, 64, 64, 128, 1),
        ("linear attention, no decay", 32, 2, 64, 32, 64, 0),
        ("GLA T=256", 8, 2, 256, 32, 64, 32),
    ];
    println!("| shape | chunked fwd+bwd ms | scan fwd+bwd ms | chunked / scan |");
    println!("|---|---|---|---|");
    for (name, b, h, t, dk, dv, gw) in shapes {
        let q = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (b, h, t, dk), &dev)? / (dk as f64).sqrt())?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, dk), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, dv), &dev)?)?;
        let g = if gw == 0 {
            None
        } else {
            Some(Var::from_tensor(&(Tensor::rand(0f32, 1.0, (b, h, t, gw), &dev)? * -0.1)?)?)
        };
        let r = Tensor::randn(0f32, 1.0, (b, h, t, dv), &dev)?;
        let gt = g.as_ref().map(|g| g.as_tensor().clone());
        let label = format!("{name} (B {b}, H {h}, T {t}, d_k {dk}, d_v {dv}, gate {gw})");
        row(&label, &r, &|fused| if fused { linear_scan(&q, &k, &v, gt.as_ref()) } else { Ok(chunked(&q, &k, &v, gt.as_ref(), None, 64)?.0) })?;
    }
    // The delta rule: the chunked WY form against the delta scan.
    for (name, b, h, t, dk, dv, gated) in [
        ("DeltaNet d128 2 heads", 32, 2, 64, 64, 64, false),
        ("Gated DeltaNet d128 2 heads, expand_v 2", 32, 2, 64, 64, 128, true),
        ("DeltaNet T=256", 8, 2, 256, 64, 64, false),
    ] {
        let unit = |x: Tensor| -> Result<Tensor> { x.broadcast_div(&x.sqr()?.sum_keepdim(3)?.sqrt()?) };
        let q = Var::from_tensor(&(unit(Tensor::randn(0f32, 1.0, (b, h, t, dk), &dev)?)? / (dk as f64).sqrt())?)?;
        let k = Var::from_tensor(&unit(Tensor::randn(0f32, 1.0, (b, h, t, dk), &dev)?)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, dv), &dev)?)?;
        let beta = Var::from_tensor(&Tensor::rand(0f32, 1.0, (b, h, t, 1), &dev)?)?;
        let g = if gated { Some(Var::from_tensor(&(Tensor::rand(0f32, 1.0, (b, h, t, 1), &dev)? * -0.1)?)?) } else { None };
        let gt = g.as_ref().map(|g| g.as_tensor().clone());
        let r = Tensor::randn(0f32, 1.0, (b, h, t, dv), &dev)?;
        let label = format!("{name} (B {b}, H {h}, T {t}, d_k {dk}, d_v {dv})");
        row(&label, &r, &|fused| {
            if fused {
                delta_scan(&q, &k, &v, &beta, gt.as_ref())
            } else {
                Ok(zoo_linear_attention::delta_rule::chunked(&q, &k, &v, &beta, gt.as_ref(), None, 64)?.0)
            }
        })?;
    }
    Ok(())
}
