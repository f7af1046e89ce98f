//! StreamingLLM (Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks",
//! §3.2): keep the first `sinks` tokens (the attention sinks) and the most recent ones; the
//! window is whatever the budget leaves. Scores: sinks above everything, then by position.

use crate::{Press, Slots};
use zoo_core::candle_core::Result;

pub struct StreamingLlm {
    pub sinks: usize,
}

impl Press for StreamingLlm {
    fn score(&self, s: &Slots) -> Result<Vec<f32>> {
        Ok(s.pos.iter().map(|&p| if p < self.sinks { f32::INFINITY } else { p as f32 }).collect())
    }
}
