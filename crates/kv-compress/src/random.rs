//! A random press (kvpress's `RandomPress`): every slot gets a score drawn from a seeded stream,
//! so a given seed evicts the same slots every time. The baseline every other press must beat.

use crate::{Press, Slots};
use zoo_core::candle_core::Result;
use zoo_core::rng::Rng;

pub struct Random {
    pub seed: u64,
}

impl Press for Random {
    fn score(&self, s: &Slots) -> Result<Vec<f32>> {
        let mut r = Rng::new(self.seed);
        Ok(s.pos.iter().map(|_| r.uniform() as f32).collect())
    }
}
