//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019, Alg. 2), global gradient-norm
//! clipping (Pascanu et al. 2013), and the warmup + cosine schedule of nanoGPT.
//!
//! candle-nn's `AdamW` has one hyper-parameter group and keeps its moments private; zoo needs
//! per-group decay and checkpointable state, so it has its own. All arithmetic stays on the device.

use crate::params::{Group, ParamStore};
use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Apply weight decay to embedding tables too.
    pub decay_embeddings: bool,
}

impl AdamWParams {
    /// Adam's bias corrections `(1 − β₁ᵗ, 1 − β₂ᵗ)` of update t (1-based): every form of the step
    /// (composition, in place on the CPU, the fused kernels) takes them from here.
    pub fn bias_corrections(&self, t: usize) -> (f64, f64) {
        (1.0 - self.beta1.powi(t as i32), 1.0 - self.beta2.powi(t as i32))
    }
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, decay_embeddings: false }
    }
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    slots: Vec<Slot>,
    pub params: AdamWParams,
    /// Number of updates applied.
    pub t: usize,
}

impl AdamW {
    pub fn new(store: &ParamStore, params: AdamWParams) -> Result<Self> {
        let mut slots = Vec::new();
        for (name, p) in store.params() {
            let decay = match p.group {
                Group::Decay => true,
                Group::NoDecay => false,
                Group::Embedding => params.decay_embeddings,
                Group::Buffer => continue,
            };
            let m = p.var.zeros_like()?;
            let v = p.var.zeros_like()?;
            slots.push(Slot { name, var: p.var, decay, m, v });
        }
        Ok(Self { slots, params, t: 0 })
    }

    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.slots.iter().map(|s| &s.var)
    }

    /// Clip the gradients to `max_norm` (if given) by their global norm, then take one step;
    /// returns the norm before clipping (`None` without gradients). When the norm is not finite
    /// nothing is updated, so the caller can stop on it with the weights intact.
    ///
    /// On CUDA with f32 weights this is zoo-kernels' multi-tensor AdamW (two launches per 48
    /// tensors plus one for the norm, which stays on the device); elsewhere, and with `ZOO_KERNELS=naive`, the
    /// composition below, which is its reference (`crates/core/tests/fused.rs`).
    pub fn step_clipped(&mut self, grads: &mut Grads, max_norm: Option<f64>, lr: f64) -> Result<Option<Tensor>> {
        if let Some(norm) = self.step_fused(grads, max_norm, lr)? {
            return Ok(Some(norm));
        }
        if self.inplace_applies(grads) {
            // The composition's clip and step, the clip's scaling folded into the step's pass.
            let norm = grads.global_norm()?;
            if let Some(n) = &norm {
                if !n.to_scalar::<f32>()?.is_finite() {
                    return Ok(norm);
                }
            }
            let scale = match (&norm, max_norm) {
                (Some(n), Some(c)) => Some(clip_scale(n, c)?.to_scalar::<f32>()?),
                _ => None,
            };
            self.step_inplace(grads, lr, scale)?;
            return Ok(norm);
        }
        let norm = match max_norm {
            Some(c) => grads.clip(c)?,
            None => grads.global_norm()?,
        };
        if let Some(n) = &norm {
            if !n.to_dtype(DType::F32)?.to_scalar::<f32>()?.is_finite() {
                return Ok(norm);
            }
        }
        self.step(grads, lr)?;
        Ok(norm)
    }

    /// [`AdamW::step_clipped`]'s fused CUDA step with the learning rate and bias corrections read
    /// from `hp`, an f32 `[lr, bc1, bc2]` on the device that the caller fills with
    /// [`AdamW::next_hp`] before the step runs: the form of a step captured into a CUDA graph
    /// (`crate::graph`), whose replays repeat kernel arguments but read memory afresh. `lr` is
    /// unused. `None` (nothing done) where the fused step does not apply.
    pub fn step_clipped_device_hp(&mut self, grads: &Grads, max_norm: Option<f64>, hp: &Tensor) -> Result<Option<Tensor>> {
        self.step_fused_with(grads, max_norm, 0.0, Some(hp))
    }

    /// `[lr, bc1, bc2]` of the next step (t + 1) at learning rate `lr`, as the fused step computes them.
    pub fn next_hp(&self, lr: f64) -> [f32; 3] {
        let t = self.t + 1;
        let p = self.params;
        let (bc1, bc2) = p.bias_corrections(t);
        [lr as f32, bc1 as f32, bc2 as f32]
    }

    /// Count one more update without running it here (a replayed CUDA graph ran it).
    pub fn advance(&mut self) {
        self.t += 1;
    }

    /// The fused step, or `None` (nothing done) where it does not apply.
    fn step_fused(&mut self, grads: &Grads, max_norm: Option<f64>, lr: f64) -> Result<Option<Tensor>> {
        self.step_fused_with(grads, max_norm, lr, None)
    }

    fn step_fused_with(&mut self, grads: &Grads, max_norm: Option<f64>, lr: f64, hp_device: Option<&Tensor>) -> Result<Option<Tensor>> {
        let mut slots = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            if let Some(g) = grads.get(&s.var) {
                slots.push(zoo_kernels::adamw::Slot { w: s.var.as_tensor(), g, m: &s.m, v: &s.v, decay: s.decay });
            }
        }
        if slots.is_empty() {
            return Ok(None);
        }
        if let Some(why) = zoo_kernels::adamw::unsupported(&slots) {
            if slots[0].w.device().is_cuda() && zoo_kernels::mode() == zoo_kernels::Kernels::Fused {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| eprintln!("zoo: fused AdamW not used ({why}); using the composition"));
            }
            return Ok(None);
        }
        let t = self.t + 1;
        let p = self.params;
        let (bc1, bc2) = p.bias_corrections(t);
        let hp = zoo_kernels::adamw::AdamWStep {
            lr,
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            weight_decay: p.weight_decay,
            bc1,
            bc2,
        };
        let out = zoo_kernels::adamw::step_with(&slots, &hp, max_norm, hp_device)?;
        self.t = t;
        Ok(Some(out.get(0)?))
    }

    /// One update with the given (already clipped) gradients at learning rate `lr`. Parameters
    /// without a gradient are left unchanged. f32 tensors on the CPU are updated in place
    /// ([`cpu_inplace`]: three passes, no temporaries, bit for bit the composition's arithmetic);
    /// the rest by the composition ([`AdamW::step_composed`]), the reference of both fused steps.
    pub fn step(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        if self.inplace_applies(grads) {
            self.step_inplace(grads, lr, None)
        } else {
            self.step_composed(grads, lr)
        }
    }

    /// Whether every weight, gradient and moment is a contiguous f32 tensor on the CPU.
    fn inplace_applies(&self, grads: &Grads) -> bool {
        self.slots.iter().all(|s| {
            [Some(s.var.as_tensor()), grads.get(&s.var), Some(&s.m), Some(&s.v)]
                .iter()
                .all(|t| t.is_none_or(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()))
        })
    }

    /// The in-place step, each gradient first multiplied by `scale` when given (the clip's).
    fn step_inplace(&mut self, grads: &Grads, lr: f64, scale: Option<f32>) -> Result<()> {
        self.t += 1;
        let h = cpu_inplace::Hyper::new(&self.params, self.t, lr);
        for s in &self.slots {
            let Some(g) = grads.get(&s.var) else { continue };
            let moment = |beta, one_minus, square| cpu_inplace::Moment { beta, one_minus, square, scale };
            s.m.inplace_op2(g, &moment(h.beta1, h.one_minus_beta1, false))?;
            s.v.inplace_op2(g, &moment(h.beta2, h.one_minus_beta2, true))?;
            s.var.as_tensor().inplace_op3(&s.m, &s.v, &cpu_inplace::Update { h, decay: s.decay })?;
        }
        Ok(())
    }

    /// [`AdamW::step`] as a composition of tensor ops, on any device and dtype.
    pub fn step_composed(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        self.t += 1;
        let p = self.params;
        let (bc1, bc2) = p.bias_corrections(self.t);
        for s in self.slots.iter_mut() {
            let Some(g) = grads.get(&s.var) else { continue };
            let g = g.to_dtype(s.var.dtype())?;
            s.m = ((&s.m * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            s.v = ((&s.v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let mhat = (&s.m / bc1)?;
            let vhat = (&s.v / bc2)?;
            let upd = (mhat / (vhat.sqrt()? + p.eps)?)?;
            let mut w = s.var.as_tensor().clone();
            if s.decay && p.weight_decay > 0.0 {
                w = (w * (1.0 - lr * p.weight_decay))?;
            }
            s.var.set(&(w - (upd * lr)?)?)?;
        }
        Ok(())
    }

    /// Moments by name (`m.<param>`, `v.<param>`) for checkpoints. They share storage with the
    /// optimiser's, which the next step updates in place (the fused steps, CUDA and CPU): save or
    /// copy them before stepping again.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            out.insert(format!("m.{}", s.name), s.m.clone());
            out.insert(format!("v.{}", s.name), s.v.clone());
        }
        out
    }

    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: usize) -> anyhow::Result<()> {
        for s in self.slots.iter_mut() {
            let dev = s.var.device().clone();
            let get = |k: String| -> anyhow::Result<Tensor> {
                let x = tensors.get(&k).ok_or_else(|| anyhow::anyhow!("optimizer state lacks `{k}`"))?;
                Ok(x.to_dtype(s.var.dtype())?.to_device(&dev)?)
            };
            s.m = get(format!("m.{}", s.name))?;
            s.v = get(format!("v.{}", s.name))?;
        }
        self.t = t;
        Ok(())
    }
}

/// Gradients keyed by variable, accumulated over micro-batches. Kept in insertion order (the
/// parameter-name order of the store) so that reductions over them, like the global norm, sum in
/// the same order every run: a hash-ordered sum differs in the last bit between runs.
#[derive(Default)]
pub struct Grads {
    index: HashMap<candle_core::TensorId, usize>,
    grads: Vec<Tensor>,
}

impl Grads {
    pub fn get(&self, v: &Var) -> Option<&Tensor> {
        self.index.get(&v.as_tensor().id()).map(|&i| &self.grads[i])
    }

    /// Add `scale ·` the gradients of `vars` from a backward pass.
    pub fn accumulate<'a>(&mut self, store: &GradStore, vars: impl Iterator<Item = &'a Var>, scale: f64) -> Result<()> {
        for v in vars {
            if let Some(g) = store.get(v.as_tensor()) {
                let g = if scale == 1.0 { g.clone() } else { (g * scale)? };
                match self.index.get(&v.as_tensor().id()) {
                    Some(&i) => self.grads[i] = (&self.grads[i] + g)?,
                    None => {
                        self.index.insert(v.as_tensor().id(), self.grads.len());
                        self.grads.push(g);
                    }
                }
            }
        }
        Ok(())
    }

    /// Replace every gradient by its mean over the ranks of `comm` (data parallelism). The ranks
    /// first agree on which variables have a gradient anywhere (a variable no rank touched, such
    /// as an expert that got no tokens, stays without one and is not updated, as on one device);
    /// one that has a gradient elsewhere but not here gets zeros, so every rank reduces the same
    /// tensors in the same order (`vars`' order).
    pub fn all_reduce_mean<'a>(&mut self, comm: &dyn crate::dist::Comm, vars: impl Iterator<Item = &'a Var>) -> Result<()> {
        if comm.world() == 1 {
            return Ok(());
        }
        let vars: Vec<&Var> = vars.collect();
        let here: Vec<f32> = vars.iter().map(|v| f32::from(self.index.contains_key(&v.as_tensor().id()))).collect();
        let n = here.len();
        let anywhere = comm.all_reduce_sum(&Tensor::from_vec(here, n, &candle_core::Device::Cpu)?)?.to_vec1::<f32>()?;
        let mut order = Vec::new();
        for (v, &count) in vars.iter().zip(&anywhere) {
            if count == 0.0 {
                continue;
            }
            let id = v.as_tensor().id();
            let i = match self.index.get(&id) {
                Some(&i) => i,
                None => {
                    self.index.insert(id, self.grads.len());
                    self.grads.push(v.as_tensor().zeros_like()?);
                    self.grads.len() - 1
                }
            };
            order.push(i);
        }
        let mut gs: Vec<Tensor> = order.iter().map(|&i| self.grads[i].clone()).collect();
        crate::dist::all_reduce_mean(comm, &mut gs)?;
        for (&i, g) in order.iter().zip(gs) {
            self.grads[i] = g;
        }
        Ok(())
    }

    /// Global L2 norm of all gradients, as a scalar f32 tensor on the device (no host sync).
    pub fn global_norm(&self) -> Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        for g in &self.grads {
            let s = g.to_dtype(DType::F32)?.sqr()?.sum_all()?;
            total = Some(match total {
                Some(t) => (t + s)?,
                None => s,
            });
        }
        total.map(|t| t.sqrt()).transpose()
    }

    /// Scale all gradients so that their global norm is at most `max_norm`; returns the norm before
    /// clipping. The scale min(1, max_norm / norm) is computed on the device.
    pub fn clip(&mut self, max_norm: f64) -> Result<Option<Tensor>> {
        let Some(norm) = self.global_norm()? else { return Ok(None) };
        let scale = clip_scale(&norm, max_norm)?;
        for g in self.grads.iter_mut() {
            *g = g.broadcast_mul(&scale.to_dtype(g.dtype())?)?;
        }
        Ok(Some(norm))
    }

    pub fn len(&self) -> usize {
        self.grads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }
}

/// The clip's factor min(1, max_norm / (norm + 1e-6)), computed on the norm's device.
fn clip_scale(norm: &Tensor, max_norm: f64) -> Result<Tensor> {
    ((norm.clone() + 1e-6)?.recip()? * max_norm)?.minimum(1.0)
}

/// Linear warmup to `lr`, then cosine decay to `min_lr` at `decay_steps`, then flat (nanoGPT).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Schedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub decay_steps: usize,
}

impl Schedule {
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        if step >= self.decay_steps {
            return self.min_lr;
        }
        let span = (self.decay_steps - self.warmup_steps).max(1) as f64;
        let ratio = (step - self.warmup_steps) as f64 / span;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.lr - self.min_lr)
    }
}

/// AdamW's update in place on f32 CPU tensors: the composition's arithmetic (candle's
/// `x * a + b` for every op with a scalar, then the tensor ops), element by element and in the
/// same order, so the result is bit for bit the composition's, without its dozen temporaries.
mod cpu_inplace {
    use super::AdamWParams;
    use candle_core::{bail, CpuStorage, InplaceOp2, InplaceOp3, Layout, Result};
    use rayon::prelude::*;

    /// Elements per task of the passes (elementwise: the split does not change any result).
    const CHUNK: usize = 1 << 15;

    /// The hyper-parameters as the composition's scalar ops see them (f64, converted to f32 by
    /// candle's affine).
    #[derive(Clone, Copy)]
    pub struct Hyper {
        pub beta1: f32,
        pub one_minus_beta1: f32,
        pub beta2: f32,
        pub one_minus_beta2: f32,
        inv_bc1: f32,
        inv_bc2: f32,
        eps: f32,
        keep: f32,
        lr: f32,
        weight_decay: bool,
    }

    impl Hyper {
        pub fn new(p: &AdamWParams, t: usize, lr: f64) -> Self {
            let (bc1, bc2) = p.bias_corrections(t);
            Self {
                beta1: p.beta1 as f32,
                one_minus_beta1: (1.0 - p.beta1) as f32,
                beta2: p.beta2 as f32,
                one_minus_beta2: (1.0 - p.beta2) as f32,
                inv_bc1: (1.0 / bc1) as f32,
                inv_bc2: (1.0 / bc2) as f32,
                eps: p.eps as f32,
                keep: (1.0 - lr * p.weight_decay) as f32,
                lr: lr as f32,
                weight_decay: p.weight_decay > 0.0,
            }
        }
    }

    fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, z))) => Ok(&v[a..z]),
            _ => bail!("AdamW in place: {what} must be contiguous f32"),
        }
    }

    fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, z))) => Ok(&mut v[a..z]),
            _ => bail!("AdamW in place: {what} must be contiguous f32"),
        }
    }

    /// m ← m·β + g·(1 − β) (or with g² for the second moment), g first multiplied by `scale`
    /// when given (the clip's `g.broadcast_mul(scale)`).
    pub struct Moment {
        pub beta: f32,
        pub one_minus: f32,
        pub square: bool,
        pub scale: Option<f32>,
    }

    impl InplaceOp2 for Moment {
        fn name(&self) -> &'static str {
            "adamw-moment"
        }

        fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
            let (m, g) = (slice_mut(s1, l1, "moment")?, slice(s2, l2, "gradient")?);
            if m.len() != g.len() {
                bail!("AdamW in place: moment of {} elements, gradient of {}", m.len(), g.len())
            }
            // The composition: (m * β)? + ((g or g.sqr()) * (1 − β))?, each `* s` an affine `x·s + 0`.
            let pass = |m: &mut [f32], g: &[f32]| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = self.scale.map_or(g, |s| g * s);
                    let x = if self.square { g * g } else { g };
                    *m = (*m * self.beta + 0.0) + (x * self.one_minus + 0.0);
                }
            };
            m.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(m, g)| pass(m, g));
            Ok(())
        }
    }

    /// w ← w·(1 − lr·wd) − lr · (m / bc1) / (√(v / bc2) + ε), the decay only for decayed groups.
    pub struct Update {
        pub h: Hyper,
        pub decay: bool,
    }

    impl InplaceOp3 for Update {
        fn name(&self) -> &'static str {
            "adamw-update"
        }

        fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<()> {
            let (w, m, v) = (slice_mut(s1, l1, "weight")?, slice(s2, l2, "first moment")?, slice(s3, l3, "second moment")?);
            if w.len() != m.len() || w.len() != v.len() {
                bail!("AdamW in place: weight of {} elements, moments of {} and {}", w.len(), m.len(), v.len())
            }
            let h = &self.h;
            let decay = self.decay && h.weight_decay;
            let pass = |w: &mut [f32], m: &[f32], v: &[f32]| {
                for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                    let mhat = m * h.inv_bc1 + 0.0;
                    let vhat = v * h.inv_bc2 + 0.0;
                    let upd = mhat / (vhat.sqrt() * 1.0 + h.eps);
                    let kept = if decay { *w * h.keep + 0.0 } else { *w };
                    *w = kept - (upd * h.lr + 0.0);
                }
            };
            w.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK)).zip(v.par_chunks(CHUNK)).for_each(|((w, m), v)| pass(w, m, v));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A CPU f32 store of the named parameters (shape, group; N(0, 0.5) init) and its AdamW.
    fn store_and_opt(seed: u64, weight_decay: f64, params: &[(&str, &[usize], Group)]) -> Result<(ParamStore, AdamW)> {
        let store = ParamStore::new(seed, DType::F32, &Device::Cpu);
        let pb = store.root();
        for &(name, shape, group) in params {
            pb.get(name, shape, crate::params::Init::Normal(0.5), group)?;
        }
        let opt = AdamW::new(&store, AdamWParams { weight_decay, ..Default::default() })?;
        Ok((store, opt))
    }

    /// Every weight, then every optimiser state tensor, flattened into one vector.
    fn flat_state(store: &ParamStore, opt: &AdamW) -> Result<Vec<f32>> {
        let mut flat = vec![];
        for t in store.params().values().map(|p| p.var.as_tensor().clone()).chain(opt.state_tensors().into_values()) {
            flat.extend(t.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(flat)
    }

    #[test]
    fn schedule_shape() {
        let s = Schedule { lr: 1.0, min_lr: 0.1, warmup_steps: 10, decay_steps: 110 };
        assert!(s.at(0) < s.at(5) && s.at(5) < s.at(9));
        assert!((s.at(10) - 1.0).abs() < 1e-12);
        assert!((s.at(60) - 0.55).abs() < 1e-12);
        assert!((s.at(110) - 0.1).abs() < 1e-12);
        assert!((s.at(1000) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn clip_scales_to_max_norm() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::new(&[3.0f32, 0.0], &dev)?;
        let b = Var::new(&[0.0f32, 4.0], &dev)?;
        let loss = (((a.as_tensor() * a.as_tensor())?.sum_all()? * 0.5)?
            + ((b.as_tensor() * b.as_tensor())?.sum_all()? * 0.5)?)?;
        let gs = loss.backward()?;
        let mut grads = Grads::default();
        grads.accumulate(&gs, [&a, &b].into_iter(), 1.0)?;
        let n = grads.clip(1.0)?.unwrap().to_scalar::<f32>()?;
        assert!((n - 5.0).abs() < 1e-5);
        let n2 = grads.global_norm()?.unwrap().to_scalar::<f32>()?;
        assert!((n2 - 1.0).abs() < 1e-5, "{n2}");
        // A norm below the limit is untouched.
        let n3 = grads.clip(10.0)?.unwrap().to_scalar::<f32>()?;
        assert!((n3 - 1.0).abs() < 1e-5);
        Ok(())
    }

    /// The in-place CPU step is the composition bit for bit: weights and both moments over five
    /// steps of changing gradients and learning rates (the last two clipped), decayed and
    /// undecayed groups, a parameter without a gradient left alone.
    #[test]
    fn inplace_step_is_the_composition_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let make = || store_and_opt(7, 0.3, &[("w", &[3, 5], Group::Decay), ("b", &[5], Group::NoDecay), ("idle", &[4], Group::Decay)]);
        let ((sa, mut a), (sb, mut b)) = (make()?, make()?);
        for step in 0..5 {
            let lr = 1e-2 / (1.0 + step as f64);
            let mut all = vec![];
            for (inplace, store, opt) in [(true, &sa, &mut a), (false, &sb, &mut b)] {
                let p = store.params();
                let (w, bias) = (p["w"].var.as_tensor(), p["b"].var.as_tensor());
                let x = Tensor::arange(0f32, 15.0, &dev)?.reshape((3, 5))?.affine(0.37, step as f64)?.sin()?;
                let loss = ((w * &x)?.sqr()?.sum_all()? + bias.broadcast_mul(&x)?.exp()?.sum_all()?)?;
                let mut grads = Grads::default();
                grads.accumulate(&loss.backward()?, opt.vars().cloned().collect::<Vec<_>>().iter(), 1.0)?;
                // Steps 3 and 4 clip (to 0.1: the scaling applies), through step_clipped.
                let clip = (step >= 3).then_some(0.1);
                match (inplace, clip) {
                    (true, None) => opt.step(&grads, lr)?,
                    (true, Some(c)) => _ = opt.step_clipped(&mut grads, Some(c), lr)?,
                    (false, clip) => {
                        if let Some(c) = clip {
                            let n = grads.clip(c)?.unwrap().to_scalar::<f32>()?;
                            assert!(n > 0.1, "the clip scales ({n})");
                        }
                        opt.step_composed(&grads, lr)?
                    }
                }
                all.push(flat_state(store, opt)?);
            }
            assert!(all[0] == all[1], "step {step}: the in-place step differs from the composition");
        }
        let idle = sa.params()["idle"].var.as_tensor().to_vec1::<f32>()?;
        let fresh = make()?.0.params()["idle"].var.as_tensor().to_vec1::<f32>()?;
        assert_eq!(idle, fresh, "a parameter without a gradient is not updated");
        Ok(())
    }

    /// Since vendor/candle-core's backward keeps the first gradient to reach a node as it is, the
    /// gradients of different variables may share storage (both sides of an add get one tensor)
    /// or be views into a larger one at an offset (the pieces of a cat). The in-place step reads
    /// them and writes only weights and moments: each parameter moves by its own gradient, as the
    /// composition moves it. Also checks a node with fan-in (x used three times) accumulates.
    #[test]
    fn gradients_that_share_storage_update_each_parameter_by_its_own() -> Result<()> {
        let dev = Device::Cpu;
        let make = || store_and_opt(3, 0.1, &["a", "b", "c", "d", "x"].map(|n| (n, &[4usize][..], Group::Decay)));
        let ((sa, mut a), (sb, mut b)) = (make()?, make()?);
        let w = Tensor::new(&[0.5f32, -1.0, 2.0, 0.25, 1.5, -0.75, 3.0, -2.0], &dev)?;
        for step in 0..3 {
            let mut states = vec![];
            for (inplace, store, opt) in [(true, &sa, &mut a), (false, &sb, &mut b)] {
                let p = store.params();
                let t = |n: &str| p[n].var.as_tensor().clone();
                // a + b: one gradient tensor for both; cat(c, d): views of one buffer, d's at an
                // offset; x three times: its gradient 2x + cos x − 1 is a sum.
                let shared = (t("a") + t("b"))?.sum_all()?;
                let pieces = (Tensor::cat(&[t("c"), t("d")], 0)? * &w)?.sum_all()?;
                let x = t("x");
                let fan = ((&x * &x)?.sum_all()? + x.sin()?.sum_all()? - x.sum_all()?)?;
                let gs = (shared + pieces + fan)?.backward()?;
                let mut grads = Grads::default();
                grads.accumulate(&gs, opt.vars().cloned().collect::<Vec<_>>().iter(), 1.0)?;
                if step == 0 && inplace {
                    let g = |n: &str| grads.get(&p[n].var).unwrap().to_vec1::<f32>();
                    assert_eq!(g("a")?, vec![1.0; 4]);
                    assert_eq!(g("b")?, vec![1.0; 4]);
                    assert_eq!(g("c")?, w.narrow(0, 0, 4)?.to_vec1::<f32>()?);
                    assert_eq!(g("d")?, w.narrow(0, 4, 4)?.to_vec1::<f32>()?);
                    let xv = x.to_vec1::<f32>()?;
                    for (gx, x) in g("x")?.iter().zip(&xv) {
                        assert!((gx - (2.0 * x + x.cos() - 1.0)).abs() < 1e-5, "{gx} at x = {x}");
                    }
                }
                if inplace { opt.step(&grads, 1e-2)? } else { opt.step_composed(&grads, 1e-2)? }
                states.push(flat_state(store, opt)?);
            }
            assert!(states[0] == states[1], "step {step}: the in-place step differs from the composition");
        }
        Ok(())
    }

    #[test]
    fn adamw_first_step_and_decay() -> Result<()> {
        // After one step, Adam moves each coordinate by lr·sign(g) (bias-corrected), and decoupled
        // decay shrinks decayed weights by (1 - lr·wd) first.
        let dev = Device::Cpu;
        let store = ParamStore::new(0, DType::F32, &dev);
        let pb = store.root();
        let w = pb.get("w", 2, crate::params::Init::Const(1.0), Group::Decay)?;
        let g = pb.get("g", 2, crate::params::Init::Const(1.0), Group::NoDecay)?;
        let mut opt = AdamW::new(&store, AdamWParams { weight_decay: 0.5, ..Default::default() })?;
        let loss = ((w * 2.0)?.sum_all()? + (g * -3.0)?.sum_all()?)?;
        let gs = loss.backward()?;
        let mut grads = Grads::default();
        grads.accumulate(&gs, opt.vars().cloned().collect::<Vec<_>>().iter(), 1.0)?;
        opt.step(&grads, 0.1)?;
        let p = store.params();
        let wv = p["w"].var.as_tensor().to_vec1::<f32>()?;
        let gv = p["g"].var.as_tensor().to_vec1::<f32>()?;
        assert!((wv[0] - (1.0 * (1.0 - 0.05) - 0.1)).abs() < 1e-5, "{wv:?}");
        assert!((gv[0] - 1.1).abs() < 1e-5, "{gv:?}");
        Ok(())
    }
}
