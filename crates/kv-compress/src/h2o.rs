//! H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
//! Language Models", §3.2, Algorithm 1): a slot's score is the attention it has received from every
//! query since it was written, summed (averaged over heads and batch rows); the kept budget is
//! split between the most recent tokens (`recent` share) and the heavy hitters. The running sums
//! live in the cache ([`zoo_core::state::KvCache::accumulate`]) and grow at each compression by the
//! attention of the queries observed since the last one (at most [`H2o::MAX_QUERIES`]; the
//! paper updates after every query, which a compression every token reproduces).

use crate::{attention, per_slot, Press, Slots};
use zoo_core::candle_core::{bail, Result};

pub struct H2o {
    pub recent: f64,
}

impl H2o {
    /// Queries kept between compressions; earlier ones are not counted.
    pub const MAX_QUERIES: usize = 4096;
}

impl Press for H2o {
    fn accumulate(&self, s: &Slots) -> Result<Option<Vec<f32>>> {
        let Some((q, qpos)) = s.queries else { return Ok(Some(vec![0.0; s.pos.len()])) };
        // (B, H, w, n) summed over the queries, then averaged over heads and batch rows.
        Ok(Some(per_slot(&attention(q, qpos, s.k, s.pos)?.sum(2)?)?))
    }

    fn score(&self, s: &Slots) -> Result<Vec<f32>> {
        let Some(run) = s.running else { bail!("h2o: no running scores") };
        let recent = (s.keep as f64 * self.recent).round() as usize;
        let mut by_pos: Vec<usize> = s.pos.to_vec();
        by_pos.sort_unstable();
        let cut = by_pos.len().checked_sub(recent).map_or(0, |i| by_pos.get(i).copied().unwrap_or(usize::MAX));
        Ok(s.pos.iter().zip(run).map(|(&p, &r)| if recent > 0 && p >= cut { f32::MAX } else { r }).collect())
    }

    fn observe(&self) -> Option<usize> {
        Some(Self::MAX_QUERIES)
    }
}
