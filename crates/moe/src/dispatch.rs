//! The data movement of grouped dispatch, with backward passes made of gathers only.
//!
//! A routing sends token t to the experts of its k slots a = t·k + j. Grouped dispatch sorts the
//! kept slots by expert into rows, each expert's rows padded to a common capacity C (the busiest
//! expert's count) so that all experts run as one batched matmul over (E, C, d): row r holds token
//! `rows[r]` for slot `slots[r]` (padding rows: token N, slot N·k, reading zeros), and `inv[a]` is
//! slot a's row (R, the row count, when the slot is dropped). Then
//!
//! - [`Plan::gather`]: `xs[r] = x[rows[r]]` (R, d), backward `dx[t] = Σ_j dxs[inv[t·k + j]]`;
//! - [`Plan::combine`]: `y[t] = Σ_j w[t, j] · ys[inv[t·k + j]]` (N, d), backward
//!   `dys[r] = w[slots[r]] · dy[rows[r]]` and `dw[t, j] = ⟨dy[t], ys[inv[t·k + j]]⟩`.
//!
//! Both directions are gathers (`index_select`, one thread per output element on CUDA), so the
//! results do not depend on float addition order. The plain composition (`index_select` for the
//! gather, `index_add` for the scatter of the outputs) has `index_add` in both passes, and
//! candle's CUDA `index_add` runs d threads that each walk all the indices: on the H200 it made an
//! E8 k2 LM train step (4 layers, d = 128, 2048 tokens) take 42 ms against the dense twin's 5.5
//! (`results/bench/moe-cuda`). [`Dispatch::Looped`](crate::Dispatch) keeps that composition as the
//! reference the tests compare with.
//!
//! On CUDA (fused mode; `ZOO_MOE_DISPATCH_KERNELS=0` opts out) both
//! passes of both ops run as `zoo_kernels::moe_dispatch`'s two gather kernels (`gather_sum`,
//! `gather_dot`: one pass each, f32 sums) in place of the `cat` of a zero
//! row, `index_select`, `broadcast_mul` and `sum` of the composition below, which stays the CPU
//! path and the reference ([`Plan::with_ops`] picks either on any device, for the tests).
//!
//! The custom backward is attached by [`zoo_core::grad::with_grad`]: an op whose forward copies a
//! value computed from detached inputs, and whose backward is a closure over tensors.
//!
//! ```
//! use zoo_core::candle_core::{Device, Tensor, Var};
//! use zoo_moe::dispatch::Plan;
//! // 3 tokens, k = 2; token 1's second slot is dropped; experts of the kept slots: 1, 0, 0, 1, 1.
//! let (plan, lens) = Plan::new(&[1, 0, 0, 7, 1, 1], &[true, true, true, false, true, true], 2, 2, false, &Device::Cpu)?;
//! assert_eq!((lens, plan.capacity()), (vec![2, 3], 3)); // expert 0's rows padded from 2 to 3
//! let x = Var::new(&[[1f32], [2.], [3.]], &Device::Cpu)?;
//! let xs = plan.gather(x.as_tensor())?;
//! assert_eq!(xs.flatten_all()?.to_vec1::<f32>()?, vec![1., 2., 0., 1., 3., 3.]);
//! let w = Tensor::new(&[[0.5f32, 0.5], [1., 0.], [0.25, 0.75]], &Device::Cpu)?;
//! let y = plan.combine(&(xs * 10.)?, &w)?; // each expert multiplies by 10
//! assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![10., 20., 30.]);
//! let g = y.sum_all()?.backward()?;
//! assert_eq!(g.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?, vec![10., 10., 10.]);
//! # Ok::<(), zoo_core::candle_core::Error>(())
//! ```

use zoo_core::candle_core::{Device, Result, Tensor, D};
use zoo_core::grad::{with_grad, with_grad2};
use zoo_core::zoo_kernels::moe_dispatch::{self as ops, Weights};

/// The sorted (and padded) rows of one routing.
#[derive(Clone)]
pub struct Plan {
    /// (R,) u32: the token of each row (N for a padding row).
    rows: Tensor,
    /// (R,) u32: the slot t·k + j of each row (N·k for a padding row).
    slots: Tensor,
    /// (N·k,) u32: the row of each slot, R when dropped.
    inv: Tensor,
    n: usize,
    k: usize,
    r: usize,
    cap: usize,
    /// Gather and combine as `zoo_kernels::moe_dispatch`'s ops (else the composition).
    ops: bool,
}

/// The multiple the padded capacity is rounded up to (`ZOO_MOE_CAP_MULTIPLE`, default 1: none).
/// A hypothesis, no measured gain: when the routing changes from step to step (`zoo run`), so
/// does the busiest expert's count, and with it the shapes of the batched expert matmuls, and
/// cuBLAS picks a kernel for every new shape; rounding (e.g. to 64) bounds the number of shapes
/// for at most `multiple − 1` padding rows per expert. Stop 36 saw `zoo run` take 109 ms a step
/// for an E8 k2 LM that `zoo bench` (the same batch every step) times at 46 ms; in stop 37, on
/// another H100, `zoo run` took 51.8 ms unrounded and 46.4 at 64, one run each, inside the dense
/// runs' spread (`results/bench/moe-zoo-run-cap`).
pub fn capacity_multiple() -> usize {
    std::env::var("ZOO_MOE_CAP_MULTIPLE").ok().and_then(|v| v.parse().ok()).filter(|&m: &usize| m >= 1).unwrap_or(1)
}

/// Whether a plan on `dev` moves its rows with `zoo_kernels::moe_dispatch` by default: where its
/// kernels run (CUDA, fused mode, a CUDA build) and are not switched off (`ZOO_MOE_DISPATCH_KERNELS=0`).
fn ops_by_default(dev: &Device) -> bool {
    zoo_core::zoo_kernels::unavailable(dev).is_none() && ops::enabled()
}

impl Plan {
    /// From the experts of the N·k slots (`assignments`, slot t·k + j) and which are kept: the
    /// plan, and the number of kept slots of each of the `n_experts` experts. Rows are sorted by
    /// expert, then by slot; with `packed` each expert's rows follow the previous expert's, else
    /// every expert gets `capacity()` rows (the largest count), the rest padding.
    pub fn new(
        assignments: &[u32],
        kept: &[bool],
        k: usize,
        n_experts: usize,
        packed: bool,
        dev: &Device,
    ) -> Result<(Self, Vec<usize>)> {
        let total = assignments.len();
        if k == 0 || !total.is_multiple_of(k) || kept.len() != total {
            zoo_core::candle_core::bail!("dispatch plan: {total} slots, {} kept flags, k = {k}", kept.len());
        }
        // One stable counting sort by expert (slot order within an expert), shared with the
        // experts' CPU form; here the "no slot" / "no row" markers are N·k and R.
        use zoo_core::zoo_kernels::moe_experts::{expert_order, expert_order_padded_to};
        let order = if packed {
            expert_order(assignments, kept, n_experts, false)
        } else {
            expert_order_padded_to(assignments, kept, n_experts, capacity_multiple())
        };
        let none = zoo_core::zoo_kernels::moe_experts::NONE_SLOT;
        let (lens, r) = (order.lens, order.start[n_experts]);
        // Padded: every expert's rows span the (rounded) capacity; packed: the busiest count.
        let cap = if packed { lens.iter().copied().max().unwrap_or(0) } else { order.start[1] - order.start[0] };
        let n = total / k;
        let slots: Vec<u32> = order.slots.iter().map(|&a| if a == none { total as u32 } else { a }).collect();
        let inv: Vec<u32> = order.inv.iter().map(|&row| if row == none { r as u32 } else { row }).collect();
        let rows: Vec<u32> = slots.iter().map(|&a| if a as usize == total { n as u32 } else { a / k as u32 }).collect();
        let plan = Plan {
            rows: Tensor::new(rows, dev)?,
            slots: Tensor::new(slots, dev)?,
            inv: Tensor::new(inv, dev)?,
            n,
            k,
            r,
            cap,
            ops: ops_by_default(dev),
        };
        Ok((plan, lens))
    }

    /// A plan made elsewhere (on the device: `zoo_kernels::moe_plan`): `rows` (R,) token of each
    /// row (N for padding), `slots` (R,) slot of each row (N·k for padding), `inv` (N·k,) row of
    /// each slot; `cap` rows per expert group (the tile).
    pub fn from_parts(rows: Tensor, slots: Tensor, inv: Tensor, n: usize, k: usize, cap: usize) -> Result<Self> {
        let r = rows.dim(0)?;
        if slots.dim(0)? != r || inv.dim(0)? != n * k {
            zoo_core::candle_core::bail!("dispatch plan: {r} rows, {} slots of rows, {} slots for {n} tokens, k = {k}", slots.dim(0)?, inv.dim(0)?);
        }
        let ops = ops_by_default(rows.device());
        Ok(Plan { rows, slots, inv, n, k, r, cap, ops })
    }

    /// Whether the ops move rows of `t` (a dtype they take; else the composition).
    fn ops_for(&self, t: &Tensor) -> bool {
        self.ops && ops::supports(t.dtype())
    }

    /// The same plan moving its rows with `zoo_kernels::moe_dispatch`'s ops (`true`: their CPU
    /// form on the CPU, their kernels on CUDA) or with the composition (`false`).
    pub fn with_ops(mut self, ops: bool) -> Self {
        self.ops = ops;
        self
    }

    /// Rows per expert when padded: the busiest expert's count, rounded up to a multiple of
    /// [`capacity_multiple`].
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Number of rows (kept slots, and padding unless packed).
    pub fn rows(&self) -> usize {
        self.r
    }

    /// `ys` (rows, d) with a zero row appended: the row a sentinel index reads.
    fn padded(&self, ys: &Tensor) -> Result<Tensor> {
        let d = ys.dim(1)?;
        Tensor::cat(&[ys, &Tensor::zeros((1, d), ys.dtype(), ys.device())?], 0)
    }

    /// Σ_j ys[inv[t·k + j]] (weighted by w (N, k) when given): (N, d).
    fn sum_slots(&self, ys: &Tensor, w: Option<&Tensor>) -> Result<Tensor> {
        if self.ops_for(ys) {
            let w = w.map(|w| w.flatten_all()).transpose()?;
            return ops::gather_sum(ys, &self.inv, self.k, w.as_ref().map_or(Weights::None, Weights::Slot));
        }
        let d = ys.dim(1)?;
        let picked = self.padded(ys)?.index_select(&self.inv, 0)?.reshape((self.n, self.k, d))?;
        let picked = match w {
            Some(w) => picked.broadcast_mul(&w.unsqueeze(2)?)?,
            None => picked,
        };
        picked.sum(1)
    }

    /// The tokens of the rows: x (N, d) -> (R, d), differentiable in x.
    pub fn gather(&self, x: &Tensor) -> Result<Tensor> {
        let value = if self.ops_for(x) {
            ops::gather_sum(&x.detach(), &self.rows, 1, Weights::None)?
        } else {
            self.padded(&x.detach())?.index_select(&self.rows, 0)?
        };
        let me = self.clone();
        with_grad(&value, x, move |g| me.sum_slots(g, None))
    }

    /// The weighted sum of each token's rows: ys (R, d) and w (N, k) -> (N, d), differentiable
    /// in both (w is cast to ys's dtype).
    pub fn combine(&self, ys: &Tensor, w: &Tensor) -> Result<Tensor> {
        let w = w.to_dtype(ys.dtype())?;
        if ys.dim(0)? != self.r || w.dims() != [self.n, self.k] {
            zoo_core::candle_core::bail!(
                "combine: ys {:?}, w {:?} for {} rows, {} tokens, k = {}",
                ys.dims(),
                w.dims(),
                self.r,
                self.n,
                self.k
            );
        }
        let value = self.sum_slots(&ys.detach(), Some(&w.detach()))?;
        let (me, ys_, w_) = (self.clone(), ys.detach(), w.detach());
        with_grad2(&value, ys, &w, move |g| {
            if me.ops_for(g) {
                // dys[r] = w[slots[r]] · dy[rows[r]]; dw[t, j] = ⟨dy[t], ys[inv[t·k + j]]⟩.
                let w_flat = w_.flatten_all()?;
                let dys = ops::gather_sum(g, &me.rows, 1, Weights::Indexed(&w_flat, &me.slots))?;
                let dw = ops::gather_dot(g, &ys_, &me.inv, me.k)?.reshape((me.n, me.k))?;
                return Ok((dys, dw));
            }
            let w_pad = Tensor::cat(&[&w_.flatten_all()?, &Tensor::zeros(1, w_.dtype(), w_.device())?], 0)?;
            let w_rows = w_pad.index_select(&me.slots, 0)?.unsqueeze(1)?;
            let dys = me.padded(g)?.index_select(&me.rows, 0)?.broadcast_mul(&w_rows)?;
            let d = g.dim(1)?;
            let picked = me.padded(&ys_)?.index_select(&me.inv, 0)?.reshape((me.n, me.k, d))?;
            let dw = picked.broadcast_mul(&g.unsqueeze(1)?)?.sum(D::Minus1)?;
            Ok((dys, dw))
        })
    }
}
