//! Knorm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
//! Compression", §3): keys with a low L2 norm draw high attention, so the slots with the largest
//! key norms are evicted first: score = −‖k‖₂ (mean over heads and batch rows). kvpress's
//! `KnormPress`.

use crate::{per_slot, Press, Slots};
use zoo_core::candle_core::Result;

pub struct Knorm;

impl Press for Knorm {
    fn score(&self, s: &Slots) -> Result<Vec<f32>> {
        per_slot(&s.k.to_dtype(zoo_core::candle_core::DType::F32)?.sqr()?.sum(3)?.sqrt()?.neg()?)
    }
}
