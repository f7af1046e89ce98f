//! The embedding's CUDA backward, sorted (deterministic, the default) against the atomic scatter
//! (`ZOO_EMBEDDING_BWD=atomic`), alone, at the shapes zoo trains: MQAR (N = 65,536 tokens, vocab
//! 1024), a BPE LM (16,384 tokens, vocab 49,152, d 512), a char LM (65,536 tokens, vocab 65, d
//! 384) and one id everywhere. Per shape and form: the median of 50 calls (each synchronised, after
//! 5 warm-ups), and whether two calls gave the same bits. One JSON line per shape on stdout.
//!
//! `cargo run --release --features cuda -p zoo-kernels --example embedding_bwd` (a GPU machine).
use candle_core::{Device, Result, Tensor, Var};
use std::time::Instant;

fn main() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let shapes: [(&str, usize, usize, usize); 5] = [
        ("mqar d128", 65_536, 1024, 128),
        ("mqar d256", 65_536, 1024, 256),
        ("bpe lm", 16_384, 49_152, 512),
        ("char lm", 65_536, 65, 384),
        ("one id", 65_536, 1024, 256),
    ];
    for (name, n, vocab, d) in shapes {
        let ids: Vec<u32> = if name == "one id" {
            vec![7; n]
        } else if name == "char lm" {
            // Skewed like text: about 1 in 6 a space.
            (0..n).map(|i| if i % 6 == 0 { 0 } else { ((i as u64 * 2_654_435_761) % vocab as u64) as u32 }).collect()
        } else {
            (0..n).map(|i| ((i as u64 * 2_654_435_761) % vocab as u64) as u32).collect()
        };
        let ids = Tensor::new(ids.as_slice(), &dev)?;
        let g = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
        let w = Var::from_tensor(&Tensor::zeros((vocab, d), candle_core::DType::F32, &dev)?)?;
        let grad = || -> Result<Tensor> {
            let y = zoo_kernels::embedding::embedding_op(w.as_tensor(), &ids)?;
            Ok((y * &g)?.sum_all()?.backward()?.get(&w).unwrap().clone())
        };
        // The forward and the product are timed too; the same in both forms.
        let mut out = vec![];
        for form in ["atomic", "sorted"] {
            std::env::set_var("ZOO_EMBEDDING_BWD", form);
            for _ in 0..5 {
                grad()?;
            }
            dev.synchronize()?;
            let mut ms = vec![];
            for _ in 0..50 {
                let t = Instant::now();
                grad()?;
                dev.synchronize()?;
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
            ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let (a, b) = (grad()?.flatten_all()?.to_vec1::<f32>()?, grad()?.flatten_all()?.to_vec1::<f32>()?);
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            out.push(format!("\"{form}\": {{\"median_ms\": {:.4}, \"repeats_bits\": {same}}}", ms[ms.len() / 2]));
        }
        println!("{{\"shape\": \"{name}\", \"n\": {n}, \"vocab\": {vocab}, \"d\": {d}, {}}}", out.join(", "));
    }
    std::env::remove_var("ZOO_EMBEDDING_BWD");
    Ok(())
}
