//! CPU time of causal attention, forward + backward (loss Σ O), in its two forms: the composition
//! (`zoo_core::attention::sdpa` with the additive causal mask: scores, mask, softmax and their
//! gradients as whole tensors) and the op's CPU form (`zoo_kernels::attention::flash_attention_op`:
//! blocked, on `gemm`, nothing of size T × T kept). Medians of 7 after 1 warm-up.
//!
//!     cargo run --release -p zoo-core --example attention_cpu
use candle_core::{Device, Result, Tensor, Var};
use zoo_core::check::median_ms;
use zoo_core::attention::{attention_mask, sdpa};
use zoo_core::state::Phase;
use zoo_core::zoo_kernels::attention::{flash_attention_op, FlashOpts};

fn main() -> Result<()> {
    let dev = Device::Cpu;
    // (B, H, T, d): the 6L-384 CPU twin's attention, and one longer sequence.
    for (b, h, t, d) in [(4usize, 6usize, 256usize, 64usize), (1, 6, 1024, 64)] {
        let var = |s: f32| Var::from_tensor(&Tensor::randn(0f32, s, (b, h, t, d), &dev)?);
        let (q, k, v) = (var(1.0)?, var(1.0)?, var(1.0)?);
        let mask = attention_mask(t, 0, t, 0, None, 0, &dev)?;
        let backward = |o: Tensor| -> Result<()> {
            let g = o.sum_all()?.backward()?;
            let _ = g.get(q.as_tensor()).map(|x| x.dims().len());
            Ok(())
        };
        let comp = median_ms(7, &|| backward(sdpa(q.as_tensor(), k.as_tensor(), v.as_tensor(), Some(&mask), Phase::Train, None)?))?;
        let op = median_ms(7, &|| backward(flash_attention_op(q.as_tensor(), k.as_tensor(), v.as_tensor(), &FlashOpts::causal(d))?))?;
        println!("B {b} H {h} T {t} d {d}: composition {comp:.1} ms, op (CPU form) {op:.1} ms, {:.2}x", comp / op);
    }
    Ok(())
}
