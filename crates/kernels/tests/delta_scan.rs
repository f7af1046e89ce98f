//! The delta-scan op (forward, and the gradients of q, k, v, β and the gate) against candle's
//! autograd of the naive delta rule `S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,
//! o_t = S_tᵀ q_t`, on CPU (the op's semantics as loops); in a CUDA build on a GPU, the kernels
//! against that CPU form. The shapes cross the kernels' edges: T = 37 over 16-step chunks, d_k =
//! 20, 40 and 100 (one, two and four threads per state column), d_v = 70 over 64-, 32- and
//! 16-column blocks.
mod common;
use candle_core::{DType, Device, Result, Tensor, Var};
use zoo_kernels::delta_scan::delta_scan;

struct Inputs {
    q: Var,
    k: Var,
    v: Var,
    beta: Var,
    g: Option<Var>,
    /// Weights of the scalar loss Σ o ⊙ c.
    c: Tensor,
}

/// Unit-norm keys and queries as DeltaNet feeds them (L2-normalised), β in (0, 1), log-decays
/// from logsigmoid of N(1, 1) logits.
fn inputs(dev: &Device, gated: bool, (b, h, t, dk, dv): (usize, usize, usize, usize, usize)) -> Result<Inputs> {
    let cpu = &Device::Cpu;
    let unit = |shape: (usize, usize, usize, usize)| -> Result<Tensor> {
        let x = Tensor::randn(0f32, 1.0, shape, cpu)?;
        x.broadcast_div(&x.sqr()?.sum_keepdim(3)?.sqrt()?)?.to_device(dev)
    };
    let logsig = |x: Tensor| -> Result<Tensor> { (x.neg()?.exp()? + 1.0)?.log()?.neg() };
    let g = if gated { Some(Var::from_tensor(&logsig((Tensor::randn(0f32, 1.0, (b, h, t, 1), cpu)? + 1.0)?)?.to_device(dev)?)?) } else { None };
    Ok(Inputs {
        q: Var::from_tensor(&unit((b, h, t, dk))?)?,
        k: Var::from_tensor(&unit((b, h, t, dk))?)?,
        v: Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, dv), cpu)?.to_device(dev)?)?,
        beta: Var::from_tensor(&logsig(Tensor::randn(0f32, 1.0, (b, h, t, 1), cpu)?)?.exp()?.to_device(dev)?)?,
        g,
        c: Tensor::randn(0f32, 1.0, (b, h, t, dv), cpu)?.to_device(dev)?,
    })
}

/// The recurrence one step at a time, in candle ops (differentiable by candle's autograd).
fn naive(q: &Tensor, k: &Tensor, v: &Tensor, beta: &Tensor, g: Option<&Tensor>) -> Result<Tensor> {
    let (b, h, t, dk) = q.dims4()?;
    let dv = v.dim(3)?;
    let mut s = Tensor::zeros((b, h, dk, dv), DType::F32, q.device())?;
    let mut out = Vec::with_capacity(t);
    for i in 0..t {
        if let Some(g) = g {
            s = s.broadcast_mul(&g.narrow(2, i, 1)?.exp()?)?;
        }
        let ki = k.narrow(2, i, 1)?;
        let u = (v.narrow(2, i, 1)? - ki.matmul(&s)?)?.broadcast_mul(&beta.narrow(2, i, 1)?)?;
        s = (s + ki.transpose(2, 3)?.matmul(&u)?)?;
        out.push(q.narrow(2, i, 1)?.matmul(&s)?);
    }
    Tensor::cat(&out, 2)
}

/// (o, [dq, dk, dv, dβ, dg]) of Σ o ⊙ c, by the op or by the naive form.
fn run(x: &Inputs, op: bool) -> Result<(Tensor, Vec<Tensor>)> {
    let g = x.g.as_ref().map(|g| g.as_tensor());
    let o = if op { delta_scan(&x.q, &x.k, &x.v, &x.beta, g)? } else { naive(&x.q, &x.k, &x.v, &x.beta, g)? };
    let grads = (&o * &x.c)?.sum_all()?.backward()?;
    let mut gs = vec![];
    for v in [Some(&x.q), Some(&x.k), Some(&x.v), Some(&x.beta), x.g.as_ref()].into_iter().flatten() {
        gs.push(grads.get(v).expect("every input gets a gradient").clone());
    }
    Ok((o, gs))
}

const NAMES: [&str; 5] = ["dq", "dk", "dv", "dβ", "dg"];

#[test]
fn delta_scan_matches_the_naive_delta_rule_and_its_gradients_on_cpu() -> Result<()> {
    for gated in [false, true] {
        for shape in [(2, 2, 37, 20, 70), (1, 2, 19, 40, 9)] {
            let x = inputs(&Device::Cpu, gated, shape)?;
            common::assert_matches(&format!("gated {gated} {shape:?}"), &run(&x, true)?, &run(&x, false)?, &NAMES, true)?;
        }
    }
    Ok(())
}

/// A β that is not one per head and step, or a key width over the kernels' limit, is an error
/// naming it.
#[test]
fn shapes_the_op_does_not_take_are_refused() -> Result<()> {
    let x = Tensor::zeros((1, 2, 5, 4), DType::F32, &Device::Cpu)?;
    let e = delta_scan(&x, &x, &x, &x, None).unwrap_err().to_string();
    assert!(e.contains("β [1, 2, 5, 4]"), "{e}");
    let wide = Tensor::zeros((1, 1, 3, 129), DType::F32, &Device::Cpu)?;
    let b = Tensor::zeros((1, 1, 3, 1), DType::F32, &Device::Cpu)?;
    let e = delta_scan(&wide, &wide, &wide, &b, None).unwrap_err().to_string();
    assert!(e.contains("d_k = 129"), "{e}");
    Ok(())
}

#[test]
fn delta_scan_cuda_matches_cpu() -> Result<()> {
    let Ok(dev) = Device::new_cuda(0) else {
        eprintln!("skipped: no CUDA device in this build or machine");
        return Ok(());
    };
    for gated in [false, true] {
        // d_k 20, 40, 100: one, two, four threads per column; and MQAR's Gated DeltaNet at d = 256
        // (B = 32 of its 256, 2 heads, d_k = 128, d_v = 256).
        for shape in [(2, 2, 37, 20, 70), (2, 2, 37, 40, 70), (2, 2, 37, 100, 70), (1, 3, 1, 64, 64), (32, 2, 256, 128, 256)] {
            let cpu = inputs(&Device::Cpu, gated, shape)?;
            let gpu = Inputs {
                q: Var::from_tensor(&cpu.q.to_device(&dev)?)?,
                k: Var::from_tensor(&cpu.k.to_device(&dev)?)?,
                v: Var::from_tensor(&cpu.v.to_device(&dev)?)?,
                beta: Var::from_tensor(&cpu.beta.to_device(&dev)?)?,
                g: cpu.g.as_ref().map(|g| Var::from_tensor(&g.to_device(&dev)?)).transpose()?,
                c: cpu.c.to_device(&dev)?,
            };
            common::assert_matches(&format!("gated {gated} {shape:?}"), &run(&gpu, true)?, &run(&cpu, true)?, &NAMES, false)?;
        }
    }
    Ok(())
}
