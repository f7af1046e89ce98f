//! The linear-scan op (forward, and the gradients of q, k, v and the gate) against candle's
//! autograd of the naive recurrence `S_t = Diag(e^{g_t}) S_{t−1} + k_tᵀ v_t, o_t = q_t S_t`, on
//! CPU (the op's semantics, the four scans as loops); in a CUDA build on a GPU, the kernels
//! against that CPU form. The shapes cross every tile edge of the kernels: T = 37 over 32-step
//! tiles, d_k = 40 over 32-row tiles, d_v = 70 over 64-column blocks.
mod common;
use candle_core::{DType, Device, Result, Tensor, Var};
use zoo_kernels::linear_scan::linear_scan;

#[derive(Clone, Copy, Debug)]
enum Gate {
    None,
    PerStep,
    PerChannel,
}

struct Inputs {
    q: Var,
    k: Var,
    v: Var,
    g: Option<Var>,
    /// Weights of the scalar loss Σ o ⊙ c.
    c: Tensor,
}

fn inputs(dev: &Device, gate: Gate, (b, h, t, dk, dv): (usize, usize, usize, usize, usize)) -> Result<Inputs> {
    let r = |shape: (usize, usize, usize, usize), s: f32| -> Result<Tensor> { (Tensor::randn(0f32, 1.0, shape, &Device::Cpu)? * s as f64)?.to_device(dev) };
    let gw = match gate {
        Gate::None => 0,
        Gate::PerStep => 1,
        Gate::PerChannel => dk,
    };
    // Log-decays from logsigmoid of N(1, 1) logits, as in GLA (between about −3 and 0).
    let g = if gw == 0 {
        None
    } else {
        let logits = (Tensor::randn(0f32, 1.0, (b, h, t, gw), &Device::Cpu)? + 1.0)?;
        let ls = (logits.neg()?.exp()? + 1.0)?.log()?.neg()?;
        Some(Var::from_tensor(&ls.to_device(dev)?)?)
    };
    Ok(Inputs {
        q: Var::from_tensor(&r((b, h, t, dk), 0.3)?)?,
        k: Var::from_tensor(&r((b, h, t, dk), 0.3)?)?,
        v: Var::from_tensor(&r((b, h, t, dv), 1.0)?)?,
        g,
        c: r((b, h, t, dv), 1.0)?,
    })
}

/// The recurrence one step at a time, in candle ops (differentiable by candle's autograd).
fn naive(q: &Tensor, k: &Tensor, v: &Tensor, g: Option<&Tensor>) -> Result<Tensor> {
    let (b, h, t, dk) = q.dims4()?;
    let dv = v.dim(3)?;
    let mut s = Tensor::zeros((b, h, dk, dv), DType::F32, q.device())?;
    let mut out = Vec::with_capacity(t);
    for i in 0..t {
        if let Some(g) = g {
            s = s.broadcast_mul(&g.narrow(2, i, 1)?.exp()?.transpose(2, 3)?)?;
        }
        s = (s + k.narrow(2, i, 1)?.transpose(2, 3)?.matmul(&v.narrow(2, i, 1)?)?)?;
        out.push(q.narrow(2, i, 1)?.matmul(&s)?);
    }
    Tensor::cat(&out, 2)
}

/// (o, [dq, dk, dv, dg]) of Σ o ⊙ c, by the op or by the naive form.
fn run(x: &Inputs, op: bool) -> Result<(Tensor, Vec<Tensor>)> {
    let g = x.g.as_ref().map(|g| g.as_tensor());
    let o = if op { linear_scan(&x.q, &x.k, &x.v, g)? } else { naive(&x.q, &x.k, &x.v, g)? };
    let grads = (&o * &x.c)?.sum_all()?.backward()?;
    let mut gs = vec![];
    for v in [Some(&x.q), Some(&x.k), Some(&x.v), x.g.as_ref()].into_iter().flatten() {
        gs.push(grads.get(v).expect("every input gets a gradient").clone());
    }
    Ok((o, gs))
}

const SHAPE: (usize, usize, usize, usize, usize) = (2, 2, 37, 40, 70);
const NAMES: [&str; 4] = ["dq", "dk", "dv", "dg"];

#[test]
fn linear_scan_matches_the_naive_recurrence_and_its_gradients_on_cpu() -> Result<()> {
    for gate in [Gate::None, Gate::PerStep, Gate::PerChannel] {
        let x = inputs(&Device::Cpu, gate, SHAPE)?;
        common::assert_matches(&format!("{gate:?}"), &run(&x, true)?, &run(&x, false)?, &NAMES, true)?;
    }
    Ok(())
}

/// A gate that is neither per step nor per key channel is an error naming its shape.
#[test]
fn a_gate_shape_the_op_does_not_take_is_refused() -> Result<()> {
    let x = Tensor::zeros((1, 2, 5, 4), DType::F32, &Device::Cpu)?;
    let g = Tensor::zeros((1, 2, 5, 3), DType::F32, &Device::Cpu)?;
    let e = linear_scan(&x, &x, &x, Some(&g)).unwrap_err().to_string();
    assert!(e.contains("gate [1, 2, 5, 3]"), "{e}");
    Ok(())
}

#[test]
fn linear_scan_cuda_matches_cpu() -> Result<()> {
    let Ok(dev) = Device::new_cuda(0) else {
        eprintln!("skipped: no CUDA device in this build or machine");
        return Ok(());
    };
    for gate in [Gate::None, Gate::PerStep, Gate::PerChannel] {
        // Also a large shape, as MQAR's GLA at d = 256 (B = 64, 2 heads, d_k = 64, d_v = 128).
        for shape in [SHAPE, (64, 2, 256, 64, 128)] {
            let cpu = inputs(&Device::Cpu, gate, shape)?;
            let gpu = Inputs {
                q: Var::from_tensor(&cpu.q.to_device(&dev)?)?,
                k: Var::from_tensor(&cpu.k.to_device(&dev)?)?,
                v: Var::from_tensor(&cpu.v.to_device(&dev)?)?,
                g: cpu.g.as_ref().map(|g| Var::from_tensor(&g.to_device(&dev)?)).transpose()?,
                c: cpu.c.to_device(&dev)?,
            };
            common::assert_matches(&format!("{gate:?} {shape:?}"), &run(&gpu, true)?, &run(&cpu, true)?, &NAMES, false)?;
        }
    }
    Ok(())
}
