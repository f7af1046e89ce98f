//! The CPU form of [`crate::attention`]'s op: FlashAttention-2's blocked forward and backward
//! (Dao 2023, Algorithms 1 and 2) with the matrix products on `gemm`, the same crate candle's CPU
//! matmul calls.
//!
//! Each (batch, query head) is one task on rayon's pool; a task walks its queries in blocks of
//! [`BLOCK`] rows and, for each block, only the key columns some row of it may see (the sink
//! slots, then the keys between the window's start and the causal end), so a causal square costs
//! about half the products of the full score matrix. Per block: `S = scale · Q Kᵀ` (one product
//! for the sinks, one for the keys), the mask and a row softmax in place, `O = P V`. The forward
//! keeps O and the row log-sum-exp (natural log); the backward recomputes P from it and forms
//! `dV += Pᵀ dO`, `dS = P ⊙ (dO Vᵀ − D)`, `dQ = scale · dS K`, `dK += scale · dSᵀ Q`, with
//! `D = rowsum(dO ⊙ O)`. A GQA group's query heads write their own dK and dV, summed over the
//! group afterwards. Nothing of size Tq × Tk is kept: a block's scores live in the task's
//! buffer of `BLOCK × Tk`.
//!
//! The composition it replaces materialises the (B, H, Tq, Tk) scores, the mask, the softmax's
//! intermediates and their gradients as whole tensors, a pass each.

use crate::attention::{Dims, FlashOpts};
use candle_core::{CpuStorage, Layout, Result};
use rayon::prelude::*;
use std::borrow::Cow;

/// K or V: (B, Hkv, Tk, d) elements whose rows of one head are contiguous, each head at its own
/// offset (a decoding step's view of a longer cache is read in place, not copied).
pub(crate) struct Heads<'a> {
    data: Cow<'a, [f32]>,
    base: Vec<usize>,
    len: usize,
}

/// Whether K or V (B, Hkv, Tk, d) with this layout can be read in place by [`Heads::of`]: each
/// head's rows contiguous (any strides over batch and head; a prefix of a cache's rows).
pub(crate) fn heads_in_place(l: &Layout) -> bool {
    let st = l.stride();
    st.len() == 4 && st[3] == 1 && st[2] == l.dims()[3]
}

impl<'a> Heads<'a> {
    /// The heads of a K or V storage: as they lie where [`heads_in_place`] (f32), else through a
    /// contiguous f32 copy.
    pub(crate) fn of(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<Self> {
        let (b, h, t, d) = l.shape().dims4()?;
        let st = l.stride();
        if let (CpuStorage::F32(v), false) = (s, l.is_contiguous()) {
            if heads_in_place(l) {
                let base: Vec<usize> = (0..b * h).map(|i| l.start_offset() + (i / h) * st[0] + (i % h) * st[1]).collect();
                if base.iter().all(|&o| o + t * d <= v.len()) {
                    return Ok(Self { data: Cow::Borrowed(&v[..]), base, len: t * d });
                }
            }
        }
        let data = crate::cpu_f32(s, l, op)?;
        let base = (0..b * h).map(|i| i * t * d).collect();
        Ok(Self { data, base, len: t * d })
    }

    fn head(&self, i: usize) -> &[f32] {
        &self.data[self.base[i]..self.base[i] + self.len]
    }
}

/// Query rows per block.
pub(crate) const BLOCK: usize = 64;

/// The keys (indices after the sink slots, `lo..hi`) that some query of rows `i0..i1` may see.
fn key_range(o: &FlashOpts, keys: usize, i0: usize, i1: usize) -> (usize, usize) {
    // Key j sits at k_start + j; the query at p sees it when k_start + j ≤ p and, with a window
    // w, p − (k_start + j) < w.
    let hi = (o.q_start + i1).saturating_sub(o.k_start).min(keys);
    let lo = o.window.map_or(0, |w| (o.q_start + i0 + 1).saturating_sub(w + o.k_start)).min(hi);
    (lo, hi)
}

/// The query blocks of a head that see some key: (first row, rows, the block's keys lo..hi after
/// the sinks), for `tq` queries over `keys` keys.
fn blocks(o: &FlashOpts, tq: usize, keys: usize) -> impl Iterator<Item = (usize, usize, (usize, usize))> + '_ {
    (0..tq)
        .step_by(BLOCK)
        .map(move |i0| {
            let m = BLOCK.min(tq - i0);
            (i0, m, key_range(o, keys, i0, i0 + m))
        })
        .filter(move |&(_, _, (lo, hi))| o.n_sink + hi - lo > 0)
}

/// One block's scaled scores `S = scale · Q_blk K_colsᵀ` into `s` (m rows of `ns + hi − lo`
/// columns: the sinks, then keys lo..hi), masked to −∞ where a row may not look.
#[allow(clippy::too_many_arguments)]
fn scores(o: &FlashOpts, n: &Dims, s: &mut [f32], qb: &[f32], k: &[f32], i0: usize, m: usize, (lo, hi): (usize, usize)) {
    let (d, ns) = (n.d, o.n_sink);
    let cols = ns + hi - lo;
    let scale = o.scale as f32;
    crate::cpu::mm((m, ns, d), s, cols, false, (qb, d, 1), (k, 1, d), scale);
    crate::cpu::mm((m, hi - lo, d), &mut s[ns..], cols, false, (qb, d, 1), (&k[(ns + lo) * d..], 1, d), scale);
    let keys = n.tk - ns;
    for r in 0..m {
        let (lo_r, hi_r) = key_range(o, keys, i0 + r, i0 + r + 1);
        let row = &mut s[r * cols + ns..(r + 1) * cols];
        // Row r sees keys lo_r..hi_r, a sub-range of the block's lo..hi.
        row[..lo_r.max(lo) - lo].fill(f32::NEG_INFINITY);
        row[hi_r.max(lo) - lo..].fill(f32::NEG_INFINITY);
    }
}

/// Forward over all (batch, head) tasks: O (B, H, Tq, d) and the natural-log LSE per row (−∞
/// for a row that sees no key, whose output is 0).
pub(crate) fn forward(o: &FlashOpts, n: &Dims, q: &[f32], k: &Heads, v: &Heads) -> (Vec<f32>, Vec<f32>) {
    let (d, tq, tk) = (n.d, n.tq, n.tk);
    let mut out = vec![0f32; n.b * n.h * tq * d];
    let mut lse = vec![f32::NEG_INFINITY; n.b * n.h * tq];
    if tq == 0 || d == 0 {
        return (out, lse);
    }
    out.par_chunks_mut(tq * d).zip(lse.par_chunks_mut(tq)).enumerate().for_each(|(bh, (oh, lh))| {
        crate::cpu::simd(|| {
            let kv = (bh / n.h) * n.hkv + (bh % n.h) / (n.h / n.hkv);
            let (qh, kh, vh) = (&q[bh * tq * d..(bh + 1) * tq * d], k.head(kv), v.head(kv));
            let mut s = vec![0f32; BLOCK.min(tq) * tk];
            let ns = o.n_sink;
            for (i0, m, (lo, hi)) in blocks(o, tq, tk - ns) {
                let cols = ns + hi - lo;
                scores(o, n, &mut s, &qh[i0 * d..], kh, i0, m, (lo, hi));
                for r in 0..m {
                    let row = &mut s[r * cols..(r + 1) * cols];
                    let (mx, l) = crate::cpu::exp_shifted_in_place(row);
                    if mx == f32::NEG_INFINITY {
                        row.fill(0.0);
                        continue;
                    }
                    let inv = 1.0 / l;
                    row.iter_mut().for_each(|p| *p *= inv);
                    lh[i0 + r] = mx + l.ln();
                }
                let ob = &mut oh[i0 * d..];
                crate::cpu::mm((m, d, ns), ob, d, false, (&s, cols, 1), (vh, d, 1), 1.0);
                crate::cpu::mm((m, d, hi - lo), ob, d, true, (&s[ns..], cols, 1), (&vh[(ns + lo) * d..], d, 1), 1.0);
            }
        })
    });
    (out, lse)
}

/// Backward: dQ (B, H, Tq, d), dK and dV (B, Hkv, Tk, d), from the forward's LSE and
/// `dlt = rowsum(dO ⊙ O)` (B, H, Tq).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(o: &FlashOpts, n: &Dims, q: &[f32], k: &[f32], v: &[f32], g: &[f32], lse: &[f32], dlt: &[f32]) -> [Vec<f32>; 3] {
    let (d, tq, tk, group) = (n.d, n.tq, n.tk, n.h / n.hkv);
    let mut dq = vec![0f32; n.b * n.h * tq * d];
    // dK, dV per query head; with one query head per kv head they are the result.
    let mut dk = vec![0f32; n.b * n.h * tk * d];
    let mut dv = vec![0f32; n.b * n.h * tk * d];
    if tq > 0 && d > 0 {
        dq.par_chunks_mut(tq * d).zip(dk.par_chunks_mut(tk * d)).zip(dv.par_chunks_mut(tk * d)).enumerate().for_each(
            |(bh, ((dqh, dkh), dvh))| {
                crate::cpu::simd(|| {
                    let kv = (bh / n.h) * n.hkv + (bh % n.h) / group;
                    let rows = bh * tq * d..(bh + 1) * tq * d;
                    let (qh, gh) = (&q[rows.clone()], &g[rows]);
                    let (kh, vh) = (&k[kv * tk * d..(kv + 1) * tk * d], &v[kv * tk * d..(kv + 1) * tk * d]);
                    let (lh, dh) = (&lse[bh * tq..(bh + 1) * tq], &dlt[bh * tq..(bh + 1) * tq]);
                    let mut p = vec![0f32; BLOCK.min(tq) * tk];
                    let mut ds = vec![0f32; BLOCK.min(tq) * tk];
                    let (ns, scale) = (o.n_sink, o.scale as f32);
                    for (i0, m, (lo, hi)) in blocks(o, tq, tk - ns) {
                        let cols = ns + hi - lo;
                        let (qb, gb) = (&qh[i0 * d..(i0 + m) * d], &gh[i0 * d..(i0 + m) * d]);
                        scores(o, n, &mut p, qb, kh, i0, m, (lo, hi));
                        // dP = dO V_colsᵀ
                        crate::cpu::mm((m, ns, d), &mut ds, cols, false, (gb, d, 1), (vh, 1, d), 1.0);
                        crate::cpu::mm((m, hi - lo, d), &mut ds[ns..], cols, false, (gb, d, 1), (&vh[(ns + lo) * d..], 1, d), 1.0);
                        for r in 0..m {
                            let (l, dd) = (lh[i0 + r], dh[i0 + r]);
                            let (pr, dr) = (&mut p[r * cols..(r + 1) * cols], &mut ds[r * cols..(r + 1) * cols]);
                            if l == f32::NEG_INFINITY {
                                pr.fill(0.0);
                                dr.fill(0.0);
                                continue;
                            }
                            for (pc, dc) in pr.iter_mut().zip(dr.iter_mut()) {
                                *pc = crate::cpu::exp(*pc - l);
                                *dc = *pc * (*dc - dd);
                            }
                        }
                        // dV_cols += Pᵀ dO, dK_cols += scale · dSᵀ Q
                        crate::cpu::mm((ns, d, m), dvh, d, true, (&p, 1, cols), (gb, d, 1), 1.0);
                        crate::cpu::mm((hi - lo, d, m), &mut dvh[(ns + lo) * d..], d, true, (&p[ns..], 1, cols), (gb, d, 1), 1.0);
                        crate::cpu::mm((ns, d, m), dkh, d, true, (&ds, 1, cols), (qb, d, 1), scale);
                        crate::cpu::mm((hi - lo, d, m), &mut dkh[(ns + lo) * d..], d, true, (&ds[ns..], 1, cols), (qb, d, 1), scale);
                        // dQ = scale · dS K_cols
                        let dqb = &mut dqh[i0 * d..(i0 + m) * d];
                        crate::cpu::mm((m, d, ns), dqb, d, false, (&ds, cols, 1), (kh, d, 1), scale);
                        crate::cpu::mm((m, d, hi - lo), dqb, d, true, (&ds[ns..], cols, 1), (&kh[(ns + lo) * d..], d, 1), scale);
                    }
                })
            },
        );
    }
    if group == 1 {
        return [dq, dk, dv];
    }
    // Sum each kv head's group of query heads.
    let sum_groups = |per_head: &[f32]| -> Vec<f32> {
        let mut out = vec![0f32; n.b * n.hkv * tk * d];
        out.par_chunks_mut(tk * d).enumerate().for_each(|(bk, ok)| {
            let first = (bk / n.hkv) * n.h + (bk % n.hkv) * group;
            for h in first..first + group {
                ok.iter_mut().zip(&per_head[h * tk * d..(h + 1) * tk * d]).for_each(|(a, b)| *a += b);
            }
        });
        out
    };
    let (dk, dv) = (sum_groups(&dk), sum_groups(&dv));
    [dq, dk, dv]
}

#[cfg(test)]
mod tests {
    use super::key_range;
    use crate::attention::FlashOpts;

    /// Every row's key range holds exactly the keys the mask's definition lets it see, and a
    /// block's range covers each of its rows'.
    #[test]
    fn key_ranges_are_the_visible_keys() {
        for (q_start, k_start, n_sink, window, tq, keys) in
            [(0, 0, 0, None, 9, 9), (15, 0, 0, None, 5, 20), (27, 4, 3, Some(12), 7, 30), (0, 0, 2, Some(3), 11, 11), (50, 100, 2, None, 1, 40)]
        {
            let o = FlashOpts { scale: 1.0, q_start, k_start, n_sink, window };
            for i in 0..tq {
                let (lo, hi) = key_range(&o, keys, i, i + 1);
                for j in 0..keys {
                    assert_eq!((lo..hi).contains(&j), o.visible(q_start + i, n_sink + j), "{o:?}: row {i}, key {j}");
                }
                assert!((0..n_sink).all(|c| o.visible(q_start + i, c)));
            }
            for i0 in 0..tq {
                for i1 in i0 + 1..=tq {
                    let (lo, hi) = key_range(&o, keys, i0, i1);
                    for i in i0..i1 {
                        let (l, h) = key_range(&o, keys, i, i + 1);
                        assert!(l == h || (lo <= l && h <= hi), "{o:?}: rows {i0}..{i1} ({lo}..{hi}) miss row {i} ({l}..{h})");
                    }
                }
            }
        }
    }
}
