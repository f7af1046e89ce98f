//! StreamingLLM (Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks",
//! §3.2): keep the first `sinks` tokens (the attention sinks) and the most recent ones; the
//! window is whatever the budget leaves. Scores: sinks above everything, then by position.

use crate::Press;
use zoo_core::candle_core::{Result, Tensor};

pub struct StreamingLlm {
    pub sinks: usize,
}

impl Press for StreamingLlm {
    fn score(&self, _k: &Tensor, _v: &Tensor, pos: &[usize]) -> Result<Vec<f32>> {
        Ok(pos.iter().map(|&p| if p < self.sinks { f32::INFINITY } else { p as f32 }).collect())
    }
}
