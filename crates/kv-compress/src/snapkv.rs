//! SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation", §4.2,
//! Listing 1): the last `window` queries (the observation window) vote for the slots before it by
//! their attention, averaged over the window; votes are smoothed by average pooling over `kernel`
//! neighbouring positions (zero-padded, as `avg_pool1d`), averaged over heads (and batch rows);
//! the window's own slots score above every other. kvpress's `SnapKVPress`.

use crate::{attention, Press, Slots};
use zoo_core::candle_core::{bail, DType, Result};

pub struct SnapKv {
    pub window: usize,
    pub kernel: usize,
}

impl Press for SnapKv {
    fn score(&self, s: &Slots) -> Result<Vec<f32>> {
        let Some((q, qpos)) = s.queries else { bail!("snapkv: needs the observation window's queries (observe_model)") };
        // The cache may observe more queries than this press's window (another press sharing it
        // asked for more): vote with the last `window` only.
        let w = qpos.len().min(self.window);
        let (q, qpos) = (&q.narrow(2, qpos.len() - w, w)?, &qpos[qpos.len() - w..]);
        // (B, H, w, n) -> mean over the window and heads and batch rows -> (n,)
        let a = attention(q, qpos, s.k, s.pos)?.to_dtype(DType::F32)?;
        let votes = a.mean(2)?.mean(1)?.mean(0)?.to_vec1::<f32>()?;
        // Pool along positions (slots sorted by position; caches keep them so, but be sure).
        let mut order: Vec<usize> = (0..s.pos.len()).collect();
        order.sort_by_key(|&j| s.pos[j]);
        let half = self.kernel / 2;
        let first_window = qpos.iter().copied().min().unwrap_or(usize::MAX);
        let mut scores = vec![0f32; s.pos.len()];
        for (r, &j) in order.iter().enumerate() {
            scores[j] = if s.pos[j] >= first_window {
                f32::MAX
            } else {
                let (lo, hi) = (r.saturating_sub(half), (r + half + 1).min(order.len()));
                order[lo..hi].iter().map(|&i| votes[i]).sum::<f32>() / self.kernel as f32
            };
        }
        Ok(scores)
    }

    fn observe(&self) -> Option<usize> {
        Some(self.window)
    }
}
