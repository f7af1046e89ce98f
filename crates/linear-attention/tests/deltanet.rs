//! Delta rule parity (fla's protocol): the chunked WY form vs the naive loop (outputs, final state,
//! gradients of every input), prefill + decode steps vs the full forward, with and without the
//! Gated DeltaNet decay; relative error ‖a−b‖/‖b‖ < 1e-4.

use zoo_core::candle_core::{DType, Device, Result, Tensor, Var, D};
use zoo_core::rng::Rng;

mod common;
use common::{randn, rel};
use zoo_linear_attention::deltanet::{chunked, naive, step, unit_lower_inverse};
use zoo_linear_attention::kernel::log_sigmoid;

fn l2(x: &Tensor) -> Tensor {
    x.broadcast_div(&x.sqr().unwrap().sum_keepdim(D::Minus1).unwrap().sqrt().unwrap()).unwrap()
}

const B: usize = 2;
const H: usize = 3;
const T: usize = 37;
const DK: usize = 8;
const DV: usize = 5;

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    s0: Tensor,
}

fn inputs(r: &mut Rng) -> Inputs {
    Inputs {
        q: randn(r, &[B, H, T, DK], 0.5),
        k: l2(&randn(r, &[B, H, T, DK], 1.0)),
        v: randn(r, &[B, H, T, DV], 1.0),
        beta: zoo_core::candle_nn::ops::sigmoid(&randn(r, &[B, H, T, 1], 1.0)).unwrap(),
        s0: randn(r, &[B, H, DK, DV], 0.3),
    }
}

/// No gate (DeltaNet) and a per-head scalar log decay (Gated DeltaNet).
fn gates(r: &mut Rng) -> Vec<(&'static str, Option<Tensor>)> {
    vec![("delta", None), ("gated", Some(log_sigmoid(&(randn(r, &[B, H, T, 1], 1.0) + 2.0).unwrap()).unwrap()))]
}

#[test]
fn unit_lower_inverse_inverts() -> Result<()> {
    let mut r = Rng::new(7);
    for c in [1, 2, 5, 16, 37, 64] {
        let strict = Tensor::tril2(c, DType::F32, &Device::Cpu)?.sub(&Tensor::eye(c, DType::F32, &Device::Cpu)?)?;
        let l = randn(&mut r, &[3, c, c], 0.2).broadcast_mul(&strict)?;
        let m = l.broadcast_add(&Tensor::eye(c, DType::F32, &Device::Cpu)?)?;
        let prod = m.matmul(&unit_lower_inverse(&l)?)?;
        let eye = Tensor::eye(c, DType::F32, &Device::Cpu)?.broadcast_as((3, c, c))?.contiguous()?;
        assert!(rel(&prod, &eye) < 1e-5, "C = {c}: ‖(I + L) inv − I‖ rel {}", rel(&prod, &eye));
    }
    Ok(())
}

#[test]
fn chunked_matches_naive_outputs_state_and_gradients() -> Result<()> {
    let mut r = Rng::new(11);
    for (name, g) in gates(&mut r) {
        for chunk in [1, 8, 16, 64] {
            let x = inputs(&mut r);
            let vars: Vec<Var> = [&x.q, &x.k, &x.v, &x.beta, &x.s0]
                .into_iter()
                .chain(g.as_ref())
                .map(Var::from_tensor)
                .collect::<Result<_>>()?;
            let w = randn(&mut r, &[B, H, T, DV], 1.0);
            let ws = randn(&mut r, &[B, H, DK, DV], 1.0);
            let run = |chunked_form: bool| -> Result<(Tensor, Tensor, Vec<Tensor>)> {
                let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
                let gt = t.get(5).copied();
                let (o, s) = if chunked_form {
                    chunked(t[0], t[1], t[2], t[3], gt, Some(t[4]), chunk)?
                } else {
                    naive(t[0], t[1], t[2], t[3], gt, Some(t[4]))?
                };
                let loss = ((&o * &w)?.sum_all()? + (&s * &ws)?.sum_all()?)?;
                let grads = loss.backward()?;
                let gs = vars.iter().map(|v| grads.get(v.as_tensor()).expect("gradient").clone()).collect();
                Ok((o, s, gs))
            };
            let (on, sn, gn) = run(false)?;
            let (oc, sc, gc) = run(true)?;
            assert!(rel(&oc, &on) < 1e-4, "{name} chunk {chunk}: output rel err {}", rel(&oc, &on));
            assert!(rel(&sc, &sn) < 1e-4, "{name} chunk {chunk}: state rel err {}", rel(&sc, &sn));
            for (i, (a, b)) in gc.iter().zip(&gn).enumerate() {
                let e = rel(a, b);
                assert!(e < 1e-4, "{name} chunk {chunk}: gradient {i} (q, k, v, β, s0, g) rel err {e}");
            }
        }
    }
    Ok(())
}

#[test]
fn prefill_then_steps_matches_full() -> Result<()> {
    let mut r = Rng::new(12);
    for (name, g) in gates(&mut r) {
        let x = inputs(&mut r);
        let (full, s_full) = chunked(&x.q, &x.k, &x.v, &x.beta, g.as_ref(), Some(&x.s0), 16)?;
        let p = 20;
        let cut = |t: &Tensor, a: usize, n: usize| t.narrow(2, a, n).unwrap();
        let gp = g.as_ref().map(|g| cut(g, 0, p));
        let (pre, mut s) = chunked(
            &cut(&x.q, 0, p),
            &cut(&x.k, 0, p),
            &cut(&x.v, 0, p),
            &cut(&x.beta, 0, p),
            gp.as_ref(),
            Some(&x.s0),
            16,
        )?;
        let mut outs = vec![pre];
        for t in p..T {
            let gt = g.as_ref().map(|g| cut(g, t, 1));
            let (o, s2) =
                step(&cut(&x.q, t, 1), &cut(&x.k, t, 1), &cut(&x.v, t, 1), &cut(&x.beta, t, 1), gt.as_ref(), Some(&s))?;
            outs.push(o);
            s = s2;
        }
        let inc = Tensor::cat(&outs, 2)?;
        assert!(rel(&inc, &full) < 1e-4, "{name}: rel err {}", rel(&inc, &full));
        assert!(rel(&s, &s_full) < 1e-4, "{name}: state rel err {}", rel(&s, &s_full));
    }
    Ok(())
}

/// β = 1 with one key repeated: the delta rule overwrites (S k = v_last exactly), where the
/// additive rule would sum the values; and a strong gate (log α = −20) stays finite when chunked.
#[test]
fn delta_rule_overwrites_and_strong_gates_are_stable() -> Result<()> {
    let mut r = Rng::new(13);
    let key = l2(&randn(&mut r, &[1, 1, 1, DK], 1.0));
    let k = key.broadcast_as((1, 1, 64, DK))?.contiguous()?;
    let v = randn(&mut r, &[1, 1, 64, DV], 1.0);
    let beta = Tensor::ones((1, 1, 64, 1), DType::F32, &Device::Cpu)?;
    let (_, s) = chunked(&k, &k, &v, &beta, None, None, 16)?;
    let read = key.matmul(&s)?;
    assert!(rel(&read, &v.narrow(2, 63, 1)?) < 1e-4, "S k ≠ v_T: {}", rel(&read, &v.narrow(2, 63, 1)?));
    let q = randn(&mut r, &[1, 1, 64, DK], 1.0);
    let kr = l2(&randn(&mut r, &[1, 1, 64, DK], 1.0));
    let g = (Tensor::ones((1, 1, 64, 1), DType::F32, &Device::Cpu)? * -20.0)?;
    let half = (&beta * 0.5)?;
    let (oc, _) = chunked(&q, &kr, &v, &half, Some(&g), None, 64)?;
    let (on, _) = naive(&q, &kr, &v, &half, Some(&g), None)?;
    assert!(rel(&oc, &on) < 1e-4, "{}", rel(&oc, &on));
    Ok(())
}
