//! Q-Filters (Godey et al. 2025, "Q-Filters: Leveraging QK Geometry for Efficient KV Cache
//! Compression", arXiv 2503.02812, §3): queries and keys of a head share an anisotropic direction,
//! so the projection of a key on one context-agnostic vector per (layer, KV head) estimates the
//! attention it will receive, without the attention weights. The filter is the first right singular
//! vector of the head's queries on calibration text (under GQA the group's queries pooled), its
//! sign chosen on that text so that the projection rank-correlates positively with the attention
//! each key actually received (the sign is otherwise arbitrary). Score: ⟨k, f⟩, averaged over KV
//! heads (and batch rows); the lowest go. Filters come from `zoo kv calibrate` and are saved as
//! safetensors: `filters` (layers, KV heads, head dim) f32, `spearman` (layers, KV heads).

use crate::{per_slot, Press, Slots};
use std::path::Path;
use zoo_core::candle_core::{bail, DType, Device, Result, Tensor};

pub struct QFilters {
    /// (layers, KV heads, head dim), f32.
    pub filters: Tensor,
}

impl QFilters {
    pub fn load(path: &Path) -> Result<Self> {
        let mut t = zoo_core::candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| zoo_core::candle_core::Error::Msg(format!("q_filters: reading {}: {e}", path.display())))?;
        let Some(filters) = t.remove("filters") else { bail!("q_filters: {} has no `filters` tensor", path.display()) };
        if filters.rank() != 3 {
            bail!("q_filters: `filters` in {} is {:?}, expected (layers, KV heads, head dim)", path.display(), filters.dims())
        }
        Ok(Self { filters: filters.to_dtype(DType::F32)? })
    }
}

impl Press for QFilters {
    fn score(&self, s: &Slots) -> Result<Vec<f32>> {
        let (layers, heads, hd) = self.filters.dims3()?;
        let (_, hkv, _, khd) = s.k.dims4()?;
        if s.layer >= layers || hkv != heads || khd != hd {
            bail!("q_filters: filters for {layers} layers x {heads} KV heads x {hd} do not fit layer {} with {hkv} KV heads x {khd}", s.layer)
        }
        let f = self.filters.get(s.layer)?.to_device(s.k.device())?.reshape((1, heads, 1, hd))?;
        per_slot(&s.k.to_dtype(DType::F32)?.broadcast_mul(&f)?.sum(3)?)
    }
}

/// The unit eigenvector of the largest eigenvalue of a symmetric positive semi-definite d×d
/// matrix (row-major), by power iteration from a fixed start: the first right singular vector
/// of Q when `gram` = QᵀQ. Its sign is arbitrary (see [`spearman`] for the orientation rule).
pub fn top_eigenvector(gram: &[f64], d: usize) -> Vec<f64> {
    assert_eq!(gram.len(), d * d, "top_eigenvector: {} entries for d = {d}", gram.len());
    let mut v: Vec<f64> = (0..d).map(|i| 1.0 + 0.01 * i as f64).collect();
    for _ in 0..500 {
        let w: Vec<f64> = (0..d).map(|i| (0..d).map(|j| gram[i * d + j] * v[j]).sum()).collect();
        let n = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        if n == 0.0 {
            break;
        }
        v = w.into_iter().map(|x| x / n).collect();
    }
    v
}

/// Spearman rank correlation (ties share their mean rank); NaN with fewer than two points or a
/// constant input.
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let ranks = |x: &[f64]| -> Vec<f64> {
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
        let mut r = vec![0.0; x.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
                j += 1;
            }
            for &k in &idx[i..=j] {
                r[k] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    };
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}
