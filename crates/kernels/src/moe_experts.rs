//! The routed SwiGLU experts of a top-k mixture-of-experts layer, dispatch included, as one op
//! (CPU only): `y_t = Σ_j w_{t,j} · E_{e(t,j)}(x_t)` (Shazeer et al. 2017, "Outrageously Large
//! Neural Networks", eq. 1, over the kept top-k slots), each expert a SwiGLU feed-forward
//! `E_e(x) = (silu(x W₁ₑ) ⊙ x W₃ₑ) W₂ₑ` (Shazeer 2020, eq. 6).
//!
//! The composition it replaces (zoo-moe's grouped dispatch: a gather into rows sorted by expert,
//! three matmuls per expert on slices, candle's SwiGLU product, a weighted combine, and the
//! backward of each, every one with its own buffer) took 26.5 ms forward + backward at the MoE
//! bench's shape (2048 tokens, d 128, E8 k2, experts of 176) and this op 9.2 ms, against 10.5 ms
//! for the dense SwiGLU of equal active parameters (zoo-moe's `examples/moe_cpu.rs`, one run on 2
//! cores: a printout, not a committed result). Each expert is one parallel
//! task that gathers its rows, runs its three products on `gemm` and keeps `x W₁`, `x W₃` and the
//! expert outputs for the backward; a pass over tokens combines. The backward, per expert:
//! `dys = w · dy`, `dz = dys W₂ᵀ`, `dW₂ = zᵀ dys`, `da = dz ⊙ b ⊙ silu'(a)`, `db = dz ⊙ silu(a)`,
//! `dW₁ = xsᵀ da`, `dW₃ = xsᵀ db`, `dxs = da W₁ᵀ + db W₃ᵀ`; then per token `dx_t = Σ_j dxs_{t,j}`
//! and `dw_{t,j} = ⟨dy_t, ys_{t,j}⟩`. Every sum runs in a fixed order: the results do not depend
//! on the thread count. On CUDA, in naive mode and for other dtypes than f32, the composition runs
//! ([`unsupported`] says why).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! // 2 tokens, d = 1, 2 experts of hidden 1, k = 1: token 0 to expert 1, token 1 to expert 0.
//! let x = Tensor::new(&[[1f32], [2.]], &Device::Cpu)?;
//! let w1 = Tensor::new(&[[[0f32]], [[1.]]], &Device::Cpu)?; // expert 0: silu(0) = 0
//! let (w3, w2) = (Tensor::ones((2, 1, 1), candle_core::DType::F32, &Device::Cpu)?, Tensor::ones((2, 1, 1), candle_core::DType::F32, &Device::Cpu)?);
//! let w = Tensor::new(&[[0.5f32], [1.]], &Device::Cpu)?;
//! let y = zoo_kernels::moe_experts::experts_swiglu(&x, &w1, &w3, &w2, &w, &[1, 0], &[true, true])?.to_vec2::<f32>()?;
//! let silu1 = 1.0 / (1.0 + (-1f32).exp());
//! assert!((y[0][0] - 0.5 * silu1).abs() < 1e-6 && y[1][0] == 0.0);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

const OP: &str = "moe experts";

/// Why the CPU form cannot run here (`None`: it can): not the CPU, naive mode, or not f32.
pub fn unsupported(x: &Tensor, w1: &Tensor) -> Option<String> {
    crate::cpu_only_f32(x, w1)
}

/// The routed experts' output (N, d) for tokens `x` (N, d), stacked expert weights `w1`, `w3`
/// (E, d, h) and `w2` (E, h, d), gate weights `w` (N, k), the expert of each slot t·k + j
/// (`assignments`, N·k) and whether the slot is kept (`kept`: a slot dropped by a capacity adds
/// nothing). Differentiable in x, the three weights and w. f32, on the CPU.
pub fn experts_swiglu(x: &Tensor, w1: &Tensor, w3: &Tensor, w2: &Tensor, w: &Tensor, assignments: &[u32], kept: &[bool]) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    let (e, d1, h) = w1.dims3()?;
    let k = w.dim(1)?;
    if w3.dims() != [e, d, h] || w2.dims() != [e, h, d] || d1 != d || w.dims() != [n, k] || assignments.len() != n * k || kept.len() != n * k {
        candle_core::bail!(
            "{OP}: x {:?}, w1 {:?}, w3 {:?}, w2 {:?}, w {:?}, {} assignments, {} kept flags",
            x.dims(),
            w1.dims(),
            w3.dims(),
            w2.dims(),
            w.dims(),
            assignments.len(),
            kept.len()
        );
    }
    if let Some(bad) = (0..n * k).find(|&s| kept[s] && assignments[s] as usize >= e) {
        candle_core::bail!("{OP}: slot {bad}'s expert {} of {e}", assignments[bad]);
    }
    let plan = Plan::new(assignments, kept, n, k, e);
    // The three weights travel as one argument (a custom op takes three); the concatenation's
    // backward hands each weight its slice of the gradient.
    let ws = Tensor::cat(&[w1.flatten_all()?, w3.flatten_all()?, w2.flatten_all()?], 0)?;
    let op = MoeExperts { plan, n, d, h, e, k, saved: Mutex::new(None) };
    x.contiguous()?.apply_op3(&ws, &w.to_dtype(x.dtype())?.contiguous()?, op)
}

/// The kept slots sorted by expert: row r (in expert order, then slot order) is slot `slots[r]`,
/// `inv[a]` the row of slot a (`NONE` when dropped), expert e's rows `start[e]..start[e + 1]`.
struct Plan {
    slots: Vec<u32>,
    inv: Vec<u32>,
    start: Vec<usize>,
}

const NONE: u32 = u32::MAX;

impl Plan {
    fn new(assignments: &[u32], kept: &[bool], n: usize, k: usize, e: usize) -> Self {
        debug_assert_eq!(assignments.len(), n * k);
        let ExpertOrder { slots, inv, start, .. } = expert_order(assignments, kept, e, false);
        Plan { slots, inv, start }
    }

    fn rows(&self) -> usize {
        self.slots.len()
    }

    /// Expert e's rows.
    fn span(&self, e: usize) -> std::ops::Range<usize> {
        self.start[e]..self.start[e + 1]
    }
}

/// The kept slots of a routing grouped by expert: what [`expert_order`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertOrder {
    /// The slot of each row ([`NONE_SLOT`] for a padding row).
    pub slots: Vec<u32>,
    /// The row of each slot ([`NONE_SLOT`] when the slot is dropped).
    pub inv: Vec<u32>,
    /// Expert e's rows begin at `start[e]`; `start[E]` is the row count. Its kept slots are the
    /// first `lens[e]` of them (the rest, when padded, are padding).
    pub start: Vec<usize>,
    /// Kept slots per expert.
    pub lens: Vec<usize>,
}

/// The marker of "no slot" / "no row" in an [`ExpertOrder`].
pub const NONE_SLOT: u32 = NONE;

/// Groups the kept slots (`assignments[a]`: the expert of slot a) by expert with one stable
/// counting sort (slot order within an expert). `padded`: every expert gets as many rows as the
/// busiest one (one batched matmul over (E, C, d)); otherwise each expert's rows follow the
/// previous expert's. The CPU form of the experts here and the MoE crate's dispatch plan both
/// order their rows with it.
///
/// ```
/// use zoo_kernels::moe_experts::{expert_order, NONE_SLOT as X};
/// // Slots 0..6 to experts 1, 0, 0, 7 (dropped), 1, 1.
/// let kept = [true, true, true, false, true, true];
/// let packed = expert_order(&[1, 0, 0, 7, 1, 1], &kept, 2, false);
/// assert_eq!((packed.slots, packed.start, packed.lens), (vec![1, 2, 0, 4, 5], vec![0, 2, 5], vec![2, 3]));
/// let padded = expert_order(&[1, 0, 0, 7, 1, 1], &kept, 2, true);
/// assert_eq!((padded.slots, padded.inv), (vec![1, 2, X, 0, 4, 5], vec![3, 0, 1, X, 4, 5]));
/// ```
pub fn expert_order(assignments: &[u32], kept: &[bool], n_experts: usize, padded: bool) -> ExpertOrder {
    order_by_expert(assignments, kept, n_experts, padded.then_some(1))
}

/// [`expert_order`] padded, with the common capacity (the busiest expert's count) rounded up to a
/// multiple of `multiple` (≥ 1): fewer distinct shapes for the batched expert matmuls when the
/// routing changes from step to step.
///
/// ```
/// use zoo_kernels::moe_experts::expert_order_padded_to;
/// let o = expert_order_padded_to(&[1, 0, 0, 1, 1], &[true; 5], 2, 4);
/// assert_eq!((o.start, o.lens), (vec![0, 4, 8], vec![2, 3])); // capacity 3 rounded to 4
/// ```
pub fn expert_order_padded_to(assignments: &[u32], kept: &[bool], n_experts: usize, multiple: usize) -> ExpertOrder {
    order_by_expert(assignments, kept, n_experts, Some(multiple.max(1)))
}

fn order_by_expert(assignments: &[u32], kept: &[bool], n_experts: usize, pad_multiple: Option<usize>) -> ExpertOrder {
    let (padded, multiple) = (pad_multiple.is_some(), pad_multiple.unwrap_or(1));
    let mut lens = vec![0usize; n_experts];
    for (&a, &kp) in assignments.iter().zip(kept) {
        if kp {
            lens[a as usize] += 1;
        }
    }
    let cap = lens.iter().copied().max().unwrap_or(0).div_ceil(multiple) * multiple;
    let mut start = vec![0usize; n_experts + 1];
    for e in 0..n_experts {
        start[e + 1] = start[e] + if padded { cap } else { lens[e] };
    }
    let mut next = start.clone();
    let mut slots = vec![NONE; start[n_experts]];
    let mut inv = vec![NONE; assignments.len()];
    for (s, (&a, &kp)) in assignments.iter().zip(kept).enumerate() {
        if kp {
            let r = next[a as usize];
            next[a as usize] += 1;
            slots[r] = s as u32;
            inv[s] = r as u32;
        }
    }
    ExpertOrder { slots, inv, start, lens }
}

/// `buf` (rows × width) cut into each expert's rows, for one parallel task per expert.
fn per_expert<'a>(plan: &Plan, mut buf: &'a mut [f32], width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(plan.start.len() - 1);
    for e in 0..plan.start.len() - 1 {
        let (head, tail) = buf.split_at_mut(plan.span(e).len() * width);
        out.push(head);
        buf = tail;
    }
    out
}

/// What the forward keeps for the backward: `a = xs W₁`, `b = xs W₃` (rows × h) and the expert
/// outputs `ys` (rows × d).
struct Saved {
    a: Vec<f32>,
    b: Vec<f32>,
    ys: Vec<f32>,
}

struct MoeExperts {
    plan: Plan,
    n: usize,
    d: usize,
    h: usize,
    e: usize,
    k: usize,
    saved: Mutex<Option<Saved>>,
}

impl MoeExperts {
    /// Expert e's three weight matrices inside the concatenated weights.
    fn weights<'a>(&self, ws: &'a [f32], e: usize) -> (&'a [f32], &'a [f32], &'a [f32]) {
        let m = self.d * self.h;
        let w1 = &ws[e * m..(e + 1) * m];
        let w3 = &ws[(self.e + e) * m..(self.e + e + 1) * m];
        let w2 = &ws[(2 * self.e + e) * m..(2 * self.e + e + 1) * m];
        (w1, w3, w2)
    }

    /// Expert e's rows of x gathered: (rows × d).
    fn gather(&self, x: &[f32], e: usize) -> Vec<f32> {
        let d = self.d;
        let mut xs = Vec::with_capacity(self.plan.span(e).len() * d);
        for &s in &self.plan.slots[self.plan.span(e)] {
            let t = s as usize / self.k;
            xs.extend_from_slice(&x[t * d..(t + 1) * d]);
        }
        xs
    }

    /// The experts on their rows: a, b and ys.
    fn experts(&self, x: &[f32], ws: &[f32]) -> Saved {
        let (d, h, r) = (self.d, self.h, self.plan.rows());
        let (mut a, mut b, mut ys) = (vec![0f32; r * h], vec![0f32; r * h], vec![0f32; r * d]);
        let tasks: Vec<_> = per_expert(&self.plan, &mut a, h)
            .into_iter()
            .zip(per_expert(&self.plan, &mut b, h))
            .zip(per_expert(&self.plan, &mut ys, d))
            .enumerate()
            .filter(|(e, _)| !self.plan.span(*e).is_empty())
            .collect();
        tasks.into_par_iter().for_each(|(e, ((ae, be), ye))| {
            let m = self.plan.span(e).len();
            let xs = self.gather(x, e);
            let (w1, w3, w2) = self.weights(ws, e);
            crate::cpu::mm((m, h, d), ae, h, false, (&xs, d, 1), (w1, h, 1), 1.0);
            crate::cpu::mm((m, h, d), be, h, false, (&xs, d, 1), (w3, h, 1), 1.0);
            let z = crate::cpu::simd(|| ae.iter().zip(be.iter()).map(|(&g, &u)| g * crate::cpu::sigmoid(g) * u).collect::<Vec<f32>>());
            crate::cpu::mm((m, d, h), ye, d, false, (&z, h, 1), (w2, d, 1), 1.0);
        });
        Saved { a, b, ys }
    }

    /// Σ_j w[t, j] · rows[inv[t·k + j]] for every token: (N × d).
    fn combine(&self, rows: &[f32], w: Option<&[f32]>) -> Vec<f32> {
        let (d, k) = (self.d, self.k);
        let mut y = vec![0f32; self.n * d];
        y.par_chunks_mut(crate::cpu::rows_per_task(d) * d).enumerate().for_each(|(c, yc)| {
            crate::cpu::simd(|| {
                let t0 = c * crate::cpu::rows_per_task(d);
                for (i, yt) in yc.chunks_mut(d).enumerate() {
                    let t = t0 + i;
                    for j in 0..k {
                        let r = self.plan.inv[t * k + j];
                        if r == NONE {
                            continue;
                        }
                        let wt = w.map_or(1.0, |w| w[t * k + j]);
                        let row = &rows[r as usize * d..(r as usize + 1) * d];
                        yt.iter_mut().zip(row).for_each(|(o, &v)| *o += wt * v);
                    }
                }
            })
        });
        y
    }
}

impl CustomOp3 for MoeExperts {
    fn name(&self) -> &'static str {
        "zoo-moe-experts"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, ws, w) = (crate::cpu_f32(s1, l1, OP)?, crate::cpu_f32(s2, l2, OP)?, crate::cpu_f32(s3, l3, OP)?);
        let saved = self.experts(&x, &ws);
        let y = self.combine(&saved.ys, Some(&w));
        *self.saved.lock().unwrap() = Some(saved);
        Ok((crate::cpu_from_f32(y, s1.dtype())?, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, ws: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (d, h, k, nr) = (self.d, self.h, self.k, self.plan.rows());
        let saved = self.saved.lock().unwrap().take();
        let dy = dy.to_dtype(x.dtype())?;
        let (dx, dws, dw) = crate::cpu::with_f32([x, ws, w, &dy], OP, |[x, ws, w, dy]| {
            // A second backward through the same forward recomputes what the first one took.
            let Saved { a, b, ys } = saved.unwrap_or_else(|| self.experts(x, ws));
            // dw[t, j] = ⟨dy_t, ys_{t,j}⟩.
            let dw: Vec<f32> = (0..self.n * k)
                .into_par_iter()
                .map(|s| {
                    let r = self.plan.inv[s];
                    if r == NONE {
                        return 0.0;
                    }
                    let t = s / k;
                    crate::cpu::dot(&dy[t * d..(t + 1) * d], &ys[r as usize * d..(r as usize + 1) * d])
                })
                .collect();
            let mut dxs = vec![0f32; nr * d];
            let mut dws = vec![0f32; ws.len()];
            let m = d * h;
            let (dw1, rest) = dws.split_at_mut(self.e * m);
            let (dw3, dw2) = rest.split_at_mut(self.e * m);
            let tasks: Vec<_> = per_expert(&self.plan, &mut dxs, d)
                .into_iter()
                .zip(dw1.chunks_mut(m).zip(dw3.chunks_mut(m)).zip(dw2.chunks_mut(m)))
                .enumerate()
                .filter(|(e, _)| !self.plan.span(*e).is_empty())
                .collect();
            tasks.into_par_iter().for_each(|(e, (dxe, ((dw1e, dw3e), dw2e)))| {
                let span = self.plan.span(e);
                let mr = span.len();
                let xs = self.gather(x, e);
                let (w1, w3, w2) = self.weights(ws, e);
                let (ae, be) = (&a[span.start * h..span.end * h], &b[span.start * h..span.end * h]);
                // dys = w · dy of each row's token; z = silu(a) ⊙ b.
                let mut dys = Vec::with_capacity(mr * d);
                for &s in &self.plan.slots[span.clone()] {
                    let t = s as usize / k;
                    dys.extend(dy[t * d..(t + 1) * d].iter().map(|&g| w[s as usize] * g));
                }
                let z: Vec<f32> = crate::cpu::simd(|| ae.iter().zip(be).map(|(&g, &u)| g * crate::cpu::sigmoid(g) * u).collect());
                let mut dz = vec![0f32; mr * h];
                crate::cpu::mm((mr, h, d), &mut dz, h, false, (&dys, d, 1), (w2, 1, d), 1.0);
                crate::cpu::mm((h, d, mr), dw2e, d, false, (&z, 1, h), (&dys, d, 1), 1.0);
                // da = dz ⊙ b ⊙ silu'(a), db = dz ⊙ silu(a), in place of dz and z.
                let (mut da, mut db) = (dz, z);
                crate::cpu::simd(|| {
                    for (((dav, dbv), &g), &u) in da.iter_mut().zip(db.iter_mut()).zip(ae).zip(be) {
                        let sg = crate::cpu::sigmoid(g);
                        let dzv = *dav;
                        *dav = dzv * u * sg * (1.0 + g * (1.0 - sg));
                        *dbv = dzv * g * sg;
                    }
                });
                crate::cpu::mm((d, h, mr), dw1e, h, false, (&xs, 1, d), (&da, h, 1), 1.0);
                crate::cpu::mm((d, h, mr), dw3e, h, false, (&xs, 1, d), (&db, h, 1), 1.0);
                crate::cpu::mm((mr, d, h), dxe, d, false, (&da, h, 1), (w1, 1, h), 1.0);
                crate::cpu::mm((mr, d, h), dxe, d, true, (&db, h, 1), (w3, 1, h), 1.0);
            });
            (self.combine(&dxs, None), dws, dw)
        })?;
        let t = |v: Vec<f32>, like: &Tensor| Tensor::from_vec(v, like.shape(), like.device());
        Ok((Some(t(dx, x)?), Some(t(dws, ws)?), Some(t(dw, w)?)))
    }
}
