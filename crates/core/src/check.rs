//! Checks method crates reuse in their tests.

use crate::model::{cross_entropy, Lm};
use crate::params::ParamStore;
use crate::rng::Rng;
use candle_core::{DType, Result, Tensor};

/// One forward + backward on random tokens; returns a line for every parameter whose gradient is
/// missing, zero everywhere, or not finite. An empty list means gradients reach every weight.
///
/// This is the guard against candle ops that record no backward pass (fused softmax / norms /
/// RoPE): such an op silently cuts the gradient to everything upstream of it.
pub fn gradient_flow(model: &Lm, store: &ParamStore, batch: usize, seq_len: usize, seed: u64) -> Result<Vec<String>> {
    let mut rng = Rng::new(seed);
    let v = model.shape.vocab_size;
    let dev = store.device();
    let ids =
        Tensor::from_vec((0..batch * seq_len).map(|_| rng.below(v) as u32).collect::<Vec<_>>(), (batch, seq_len), dev)?;
    let tgt =
        Tensor::from_vec((0..batch * seq_len).map(|_| rng.below(v) as u32).collect::<Vec<_>>(), (batch, seq_len), dev)?;
    let out = model.forward(&ids, None, None)?;
    let mut loss = cross_entropy(&out.logits, &tgt, None)?;
    if let Some(a) = out.aux_loss {
        let dt = loss.dtype();
        loss = (loss + a.to_dtype(dt)?)?;
    }
    let grads = loss.backward()?;
    let mut problems = Vec::new();
    for (name, p) in store.params() {
        match grads.get(p.var.as_tensor()) {
            None => problems.push(format!("{name}: no gradient")),
            Some(g) => {
                let g = g.to_dtype(DType::F64)?.flatten_all()?;
                let max = g.abs()?.max(0)?.to_scalar::<f64>()?;
                let sum = g.sum_all()?.to_scalar::<f64>()?;
                if !max.is_finite() || !sum.is_finite() {
                    problems.push(format!("{name}: non-finite gradient"));
                } else if max == 0.0 {
                    problems.push(format!("{name}: gradient is zero everywhere"));
                }
            }
        }
    }
    Ok(problems)
}
