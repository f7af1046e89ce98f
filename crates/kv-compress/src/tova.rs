//! TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs", §4, Eq. 4): keep the slots the
//! latest query attends to most, its attention averaged over heads (and batch rows). kvpress's
//! `TOVAPress`, which also averages over heads.

use crate::{attention, per_slot, Press, Slots};
use zoo_core::candle_core::{bail, Result};

pub struct Tova;

impl Press for Tova {
    fn score(&self, s: &Slots) -> Result<Vec<f32>> {
        let Some((q, qpos)) = s.queries else { bail!("tova: needs the last query (observe_model)") };
        let w = qpos.len();
        let last = attention(&q.narrow(2, w - 1, 1)?, &qpos[w - 1..], s.k, s.pos)?; // (B, H, 1, n)
        per_slot(&last.squeeze(2)?)
    }

    fn observe(&self) -> Option<usize> {
        Some(1)
    }
}
