//! CPU time of the cross-entropy's two forms, forward + backward, at a language model's logits
//! shape: the composition (log_softmax, gather: `zoo_core::model::cross_entropy` on the CPU) and
//! the op (`zoo_kernels::cross_entropy::nll_op`, its CPU form). Medians of 5 after 1 warm-up.
//!
//!     cargo run --release -p zoo-core --example ce_cpu
use candle_core::{DType, Device, Result, Tensor, Var};
use std::time::Instant;

fn main() -> Result<()> {
    let dev = Device::Cpu;
    for (n, v) in [(2048usize, 32768usize), (1024, 32768), (4096, 256)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (n, v), &dev)?)?;
        let t = Tensor::arange(0u32, n as u32, &dev)?.affine(7.0, 3.0)?.to_dtype(DType::F32)?;
        let t = (t.clone() - ((t / v as f64)?.floor()? * v as f64)?)?.to_dtype(DType::U32)?;
        let run = |op: bool| -> Result<f64> {
            let t0 = Instant::now();
            let l = if op {
                zoo_core::zoo_kernels::cross_entropy::nll_op(x.as_tensor(), &t)?.mean(0)?
            } else {
                let lp = candle_nn::ops::log_softmax(x.as_tensor(), 1)?;
                lp.gather(&t.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?.mean(0)?
            };
            let g = l.backward()?;
            let _ = g.get(x.as_tensor()).unwrap().sum_all()?.to_scalar::<f32>()?;
            Ok(t0.elapsed().as_secs_f64())
        };
        for op in [false, true] {
            run(op)?;
            let mut ts: Vec<f64> = (0..5).map(|_| run(op)).collect::<Result<_>>()?;
            ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!("N {n} V {v} {}: {:.1} ms", if op { "op (CPU form)" } else { "composition" }, ts[2] * 1e3);
        }
    }
    Ok(())
}
