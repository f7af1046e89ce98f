//! Training tasks: where batches come from and how a model is scored.

use crate::data::{padded_batch, Batch, Mqar, MqarSegment, TextData};
use crate::model::{cross_entropy, Lm};
use crate::rng::Rng;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use std::collections::BTreeMap;

/// The result of an evaluation: the validation loss (the number training curves track) and named
/// metrics with lm-eval-style keys (`"perplexity,none"`).
#[derive(Debug, Clone, Default)]
pub struct EvalOut {
    pub loss: f64,
    pub metrics: BTreeMap<String, f64>,
}

pub trait Task {
    /// A training micro-batch; all randomness comes from `rng` (its state is the data position).
    fn train_batch(&self, rng: &mut Rng) -> Result<Batch>;
    fn evaluate(&self, model: &Lm) -> Result<EvalOut>;
    /// Tokens per training micro-batch.
    fn batch_tokens(&self) -> usize;
    /// A fixed held-out batch for eval-time probes (attention sink, massive activations).
    fn probe_batch(&self) -> Result<Batch>;
}

/// Next-token prediction on a text corpus.
pub struct TextTask {
    pub data: TextData,
    pub batch_size: usize,
    pub seq_len: usize,
    pub eval_batches: usize,
    pub device: Device,
    /// Report bits per byte (the tokenizer maps to known byte counts).
    pub report_bpb: bool,
}

impl Task for TextTask {
    fn train_batch(&self, rng: &mut Rng) -> Result<Batch> {
        self.data.train_batch(rng, self.batch_size, self.seq_len, &self.device)
    }

    fn evaluate(&self, model: &Lm) -> Result<EvalOut> {
        let batches = self.data.val_batches(self.batch_size, self.seq_len, self.eval_batches, &self.device)?;
        let (mut sum, mut n) = (0.0, 0usize);
        for b in &batches {
            let out = model.forward(&b.inputs, None, None)?;
            let tokens = b.inputs.elem_count();
            sum +=
                cross_entropy(&out.logits, &b.targets, None)?.to_dtype(DType::F64)?.to_scalar::<f64>()? * tokens as f64;
            n += tokens;
        }
        let loss = sum / n as f64;
        let mut metrics = BTreeMap::new();
        metrics.insert("perplexity,none".into(), loss.exp());
        if self.report_bpb {
            metrics.insert("bits_per_byte,none".into(), loss / std::f64::consts::LN_2 / self.data.val_bytes_per_token);
        }
        metrics.insert("eval_tokens".into(), n as f64);
        Ok(EvalOut { loss, metrics })
    }

    fn batch_tokens(&self) -> usize {
        self.batch_size * self.seq_len
    }

    fn probe_batch(&self) -> Result<Batch> {
        Ok(self.data.val_batches(self.batch_size, self.seq_len, 1, &self.device)?.remove(0))
    }
}

/// Multi-query associative recall: train on a mixture of segments, test on held-out examples.
pub struct MqarTask {
    pub train: Vec<Mqar>,
    pub test: Vec<Mqar>,
    pub batch_size: usize,
    pub device: Device,
}

impl MqarTask {
    pub fn new(
        vocab: usize,
        train: &[MqarSegment],
        test: &[MqarSegment],
        batch_size: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        // Train and test draw from different streams, so test examples are unseen.
        let mut rtrain = Rng::new(seed).fork(11);
        let mut rtest = Rng::new(seed).fork(12);
        Ok(Self {
            train: train.iter().map(|s| Mqar::generate(vocab, s, 0.01, &mut rtrain)).collect::<Result<_>>()?,
            test: test.iter().map(|s| Mqar::generate(vocab, s, 0.01, &mut rtest)).collect::<Result<_>>()?,
            batch_size,
            device: device.clone(),
        })
    }
}

impl Task for MqarTask {
    fn train_batch(&self, rng: &mut Rng) -> Result<Batch> {
        // Zoology pools every training example and shuffles them together, so one batch mixes
        // lengths and pair counts. Draw each row uniformly from the pool; shorter rows are padded
        // to the batch's longest.
        let total: usize = self.train.iter().map(|s| s.len()).sum();
        let rows: Vec<(usize, usize)> = (0..self.batch_size)
            .map(|_| {
                let mut r = rng.below(total);
                let mut seg = 0;
                while r >= self.train[seg].len() {
                    r -= self.train[seg].len();
                    seg += 1;
                }
                (seg, r)
            })
            .collect();
        let rows: Vec<_> = rows.iter().map(|&(s, i)| self.train[s].row(i)).collect();
        padded_batch(&rows, &self.device)
    }

    fn evaluate(&self, model: &Lm) -> Result<EvalOut> {
        let (mut loss_sum, mut loss_n) = (0.0, 0.0);
        let (mut hit_all, mut n_all) = (0.0, 0.0);
        let mut metrics = BTreeMap::new();
        for seg in &self.test {
            let (mut hit, mut n) = (0.0, 0.0);
            let idx: Vec<usize> = (0..seg.len()).collect();
            for chunk in idx.chunks(self.batch_size) {
                let b = seg.batch(chunk, &self.device)?;
                let mask = b.mask.as_ref().expect("mqar batches have masks");
                let out = model.forward(&b.inputs, None, None)?;
                let m = mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
                let l = cross_entropy(&out.logits, &b.targets, Some(mask))?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                let pred = out.logits.argmax(D::Minus1)?;
                let correct = pred.eq(&b.targets)?.to_dtype(DType::F32)?;
                hit += (correct * mask)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                n += m;
                loss_sum += l * m;
                loss_n += m;
            }
            metrics.insert(format!("mqar_acc,T={},kv={}", seg.seq_len, seg.kv_pairs), hit / n);
            hit_all += hit;
            n_all += n;
        }
        metrics.insert("mqar_acc,none".into(), hit_all / n_all);
        Ok(EvalOut { loss: loss_sum / loss_n, metrics })
    }

    /// Real (unpadded) tokens per batch on average: batch size × the pool's mean length.
    fn batch_tokens(&self) -> usize {
        let total: usize = self.train.iter().map(|s| s.len()).sum();
        let toks: usize = self.train.iter().map(|s| s.len() * s.seq_len).sum();
        (self.batch_size * toks).checked_div(total).unwrap_or(0)
    }

    fn probe_batch(&self) -> Result<Batch> {
        let seg = &self.test[0];
        seg.batch(&(0..self.batch_size.min(seg.len())).collect::<Vec<_>>(), &self.device)
    }
}

/// Perplexity of `model` on a token stream, over non-overlapping windows of `seq_len`
/// (every token scored once, except the first of each window's context), in batches.
pub fn perplexity(model: &Lm, tokens: &[u32], seq_len: usize, batch: usize, device: &Device) -> Result<(f64, usize)> {
    let n_windows = tokens.len().saturating_sub(1) / seq_len;
    anyhow::ensure!(n_windows > 0, "text has {} tokens, fewer than seq_len + 1 = {}", tokens.len(), seq_len + 1);
    let (mut sum, mut n) = (0.0, 0usize);
    let starts: Vec<usize> = (0..n_windows).map(|i| i * seq_len).collect();
    for chunk in starts.chunks(batch) {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for &s in chunk {
            x.extend_from_slice(&tokens[s..s + seq_len]);
            y.extend_from_slice(&tokens[s + 1..s + seq_len + 1]);
        }
        let x = Tensor::from_vec(x, (chunk.len(), seq_len), device)?;
        let y = Tensor::from_vec(y, (chunk.len(), seq_len), device)?;
        let out = model.forward(&x, None, None)?;
        let tok = chunk.len() * seq_len;
        sum += cross_entropy(&out.logits, &y, None)?.to_dtype(DType::F64)?.to_scalar::<f64>()? * tok as f64;
        n += tok;
    }
    Ok(((sum / n as f64).exp(), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zoology pools all training examples: one batch holds rows of every segment, each row equal
    /// to a stored example on its own positions and masked out on its padding.
    #[test]
    fn mqar_batches_mix_segments_and_mask_padding() -> Result<()> {
        let segs = [
            MqarSegment { seq_len: 16, kv_pairs: 2, examples: 50 },
            MqarSegment { seq_len: 32, kv_pairs: 4, examples: 50 },
        ];
        let task = MqarTask::new(64, &segs, &segs[..1], 64, 0, &Device::Cpu)?;
        let mut rng = Rng::new(3);
        let b = task.train_batch(&mut rng)?;
        assert_eq!(b.inputs.dims(), &[64, 32]);
        let x: Vec<Vec<u32>> = b.inputs.to_vec2()?;
        let m: Vec<Vec<f32>> = b.mask.as_ref().unwrap().to_vec2()?;
        let (mut short, mut long) = (0, 0);
        for (row, mask) in x.iter().zip(&m) {
            // A row is one stored example of the short segment (then padding) or of the long one.
            let is_short = (0..50).any(|i| task.train[0].row(i).0 == &row[..16]) && row[16..].iter().all(|&t| t == 0);
            let is_long = (0..50).any(|i| task.train[1].row(i).0 == &row[..]);
            assert!(is_short || is_long, "row {row:?} is no stored example");
            if is_short && !is_long {
                short += 1;
                assert!(mask[16..].iter().all(|&v| v == 0.0), "padding must not count");
                assert_eq!(mask[..16].iter().sum::<f32>(), 2.0, "both queries of the short example count");
            } else {
                long += 1;
                assert_eq!(mask.iter().sum::<f32>(), 4.0);
            }
        }
        assert!(short > 10 && long > 10, "a batch of 64 mixes both segments: {short} short, {long} long");
        // Tokens per batch: the mean real length (16 and 32 equally often).
        assert_eq!(task.batch_tokens(), 64 * 24);
        Ok(())
    }
}
