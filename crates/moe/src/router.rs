//! Token-choice top-k routing (Shazeer et al. 2017, "Outrageously Large Neural Networks", eq. 3-5;
//! Switch Transformer, Fedus et al. 2022, eq. 4 for the auxiliary loss; ST-MoE, Zoph et al. 2022,
//! eq. 5 for the router z-loss; DeepSeek-V3 §2.1.2 for the auxiliary-loss-free bias).
//!
//! For tokens x (N, d) and router weights W_r (d, E): logits `z = x W_r`; scores `s = softmax(z/τ)`
//! or `σ(z)`; each token picks the k experts with the largest `s + b` (the bias b is used for the
//! selection only and carries no gradient); its gate weights are the picked scores, renormalised to
//! sum to 1 if asked.
//!
//! - aux loss: `α · E · Σ_i f_i P_i`, f_i the fraction of the N·k assignments that went to expert
//!   i (no gradient), P_i the mean score of expert i over tokens;
//! - z-loss: `β · mean_t (logsumexp_i z_ti)²`;
//! - bias balancing: after each optimiser step, `b_i += γ · sign(mean load − load_i)` from the
//!   loads the training steps saw since the previous update.
//!
//! Options around that rule:
//! - an activation before the softmax, `s = softmax(act(z)/τ)` with act = tanh or sigmoid (the
//!   activation dense-to-sparse gate of Nguyen et al. 2024, "Is Temperature Sample Efficient for
//!   Softmax Gaussian Mixture of Experts?", which restores polynomial estimation rates);
//! - training-only noise: Switch's jitter (the router input times U(1 − ε, 1 + ε), Fedus et al.
//!   2022 §2.4) or Shazeer's noisy top-k (`z += ε · softplus(x W_noise)`, ε ~ N(0, 1), eq. 4; W_noise
//!   starts at zero), drawn from (seed, step, micro-batch, layer), so runs and resumes repeat;
//! - the selection: token choice (above); expert choice (Zhou et al. 2022, "Mixture-of-Experts with
//!   Expert Choice Routing": each expert takes the C = ⌈c · N·k/E⌉ tokens of the batch with the
//!   highest score, weights the scores; it looks at every token of the batch, later ones
//!   included, so it is not causal: a training-study option, whose validation losses use the
//!   same batch-level choice); or EvoMoE's dense-to-sparse gate (Nie et al. 2021: in training
//!   `p = softmax((z + g)/τ)`, g ~ Gumbel(0, 1), τ annealed linearly from τ_start to τ_end, each
//!   token sent to its top k and to every expert with p above a threshold, weighted by p; in
//!   evaluation the top k of z, weighted by the softmax over the picked logits).

use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use zoo_core::candle_core::{DType, Result, Tensor, Var, D};
use zoo_core::nn::{Linear, INIT_STD};
use zoo_core::params::{Group, Init, Pb};
use zoo_core::rng::Rng;

/// How router logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Score {
    #[default]
    Softmax,
    Sigmoid,
}

/// Load balancing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Balance {
    /// None: the load may collapse (the ablation's control).
    #[default]
    None,
    /// Switch's auxiliary loss with weight α.
    AuxLoss { alpha: f64 },
    /// The auxiliary-loss-free selection bias, updated at rate γ after each optimiser step.
    Bias { gamma: f64 },
}

/// A function applied to the router logits before the (tempered) softmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    #[default]
    None,
    Tanh,
    Sigmoid,
}

/// Router noise, in training steps only ([`zoo_core::state::train_step`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Noise {
    #[default]
    None,
    /// Switch: the router input multiplied elementwise by U(1 − eps, 1 + eps).
    Jitter { eps: f64 },
    /// Shazeer: `z += ε · softplus(x W_noise)`, ε ~ N(0, 1), W_noise learned from zero.
    NoisyTopK,
}

/// Which side chooses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Selection {
    /// Each token picks its top k experts.
    #[default]
    TokenChoice,
    /// Each expert picks its top ⌈capacity_factor · N·k / E⌉ tokens of the batch (non-causal).
    ExpertChoice {
        #[serde(default = "crate::one")]
        capacity_factor: f64,
    },
    /// EvoMoE's dense-to-sparse gate: Gumbel-softmax with τ annealed from `tau_start` to
    /// `tau_end` over `anneal_steps` (default: the whole run); experts with p > `threshold` are
    /// active besides the top k.
    DenseToSparse {
        #[serde(default = "tau_start")]
        tau_start: f64,
        #[serde(default = "tau_end")]
        tau_end: f64,
        #[serde(default)]
        anneal_steps: Option<usize>,
        #[serde(default = "dts_threshold")]
        threshold: f64,
    },
}

fn tau_start() -> f64 {
    2.0
}
fn tau_end() -> f64 {
    0.3
}
fn dts_threshold() -> f64 {
    0.001
}

impl Activation {
    /// The activation on router logits (before the tempered softmax).
    pub fn apply(self, logits: Tensor) -> Result<Tensor> {
        match self {
            Activation::None => Ok(logits),
            Activation::Tanh => logits.tanh(),
            Activation::Sigmoid => zoo_core::candle_nn::ops::sigmoid(&logits),
        }
    }
}

impl Selection {
    /// The dense-to-sparse temperature at a training step: linear from τ_start to τ_end.
    pub fn tau_at(&self, step: usize, total: usize) -> Option<f64> {
        match *self {
            Selection::DenseToSparse { tau_start, tau_end, anneal_steps, .. } => {
                let n = anneal_steps.unwrap_or(total).max(1);
                let f = (step as f64 / n as f64).min(1.0);
                Some(tau_start + (tau_end - tau_start) * f)
            }
            _ => None,
        }
    }
}

/// The routing decision for N tokens.
#[derive(Debug)]
pub struct Routing {
    /// (N, k) chosen experts, u32.
    pub experts: Tensor,
    /// (N, k) gate weights (with gradient to the router).
    pub weights: Tensor,
    /// (N, E) scores.
    pub scores: Tensor,
    /// (N, E) logits, f32.
    pub logits: Tensor,
    /// Assignments per expert (host), length E (kept ones only under a capacity).
    pub load: Vec<f64>,
    /// `experts` on the host, flattened (slot t·k + j): read once, used by the capacity and the
    /// dispatch.
    pub assignments: Vec<u32>,
    /// Per assignment (N·k, slot t·k + j): kept, or dropped by the capacity.
    pub kept: Vec<bool>,
    /// One slot per expert (expert choice, dense-to-sparse): `kept` marks the experts a token
    /// uses, not drops.
    pub all_experts: bool,
}

impl Routing {
    /// Each expert's share of the (kept) assignments, the coefficient of variation of the shares,
    /// and the largest share over the mean (1 when balanced, E when one expert takes everything).
    pub fn load_shares(&self) -> (Vec<f32>, f64, f64) {
        let total: f64 = self.load.iter().sum();
        let share: Vec<f32> = self.load.iter().map(|&l| (l / total.max(1.0)) as f32).collect();
        let mean = 1.0 / share.len() as f64;
        let var = share.iter().map(|&s| (s as f64 - mean).powi(2)).sum::<f64>() / share.len() as f64;
        let max_share = share.iter().fold(0f64, |m, &s| m.max(s as f64));
        (share, var.sqrt() / mean, max_share / mean)
    }

    /// Mean number of slots in use per token.
    pub fn active_per_token(&self) -> f64 {
        let n = self.kept.len() / self.experts.dim(1).unwrap_or(1).max(1);
        self.kept.iter().filter(|k| **k).count() as f64 / n.max(1) as f64
    }

    /// Share of the N·k assignments the capacity dropped; with one slot per expert, the share of
    /// tokens no expert took.
    pub fn dropped_fraction(&self) -> f64 {
        if self.all_experts {
            let e = self.load.len().max(1);
            let n = self.kept.len() / e;
            return self.kept.chunks(e).filter(|c| !c.iter().any(|k| *k)).count() as f64 / n.max(1) as f64;
        }
        self.kept.iter().filter(|k| !**k).count() as f64 / self.kept.len().max(1) as f64
    }

    /// Drop assignments beyond `capacity = ceil(factor · N·k / E)` per expert, in token order
    /// (Switch Transformer §2.2: earlier tokens first); dropped assignments contribute nothing
    /// (the token keeps only its residual path for that slot).
    pub fn apply_capacity(&mut self, factor: f64) -> Result<()> {
        let e = self.load.len();
        let cap = capacity(factor, self.kept.len(), e);
        let (kept, count) = keep_first(&self.assignments, e, cap);
        self.kept = kept;
        self.load = count.iter().map(|&c| c.min(cap) as f64).collect();
        Ok(())
    }
}

/// Each expert's first `cap` assignments in slot order kept (Switch Transformer §2.2: earlier
/// tokens first), the rest dropped: the keep flags and every expert's routed count (dropped ones
/// included). The rule of [`Routing::apply_capacity`] and of tiled dispatch's CPU form.
pub fn keep_first(assignments: &[u32], n_experts: usize, cap: usize) -> (Vec<bool>, Vec<usize>) {
    let mut count = vec![0usize; n_experts];
    let kept = assignments
        .iter()
        .map(|&x| {
            let c = &mut count[x as usize];
            *c += 1;
            *c <= cap
        })
        .collect();
    (kept, count)
}

/// Rows per expert under a capacity factor: `ceil(factor · slots / experts)` (Switch Transformer
/// §2.2), the rule of [`Routing::apply_capacity`] and of tiled dispatch's capacity plan.
pub fn capacity(factor: f64, slots: usize, experts: usize) -> usize {
    (factor * slots as f64 / experts.max(1) as f64).ceil() as usize
}

pub struct Router {
    pub proj: Linear,
    pub n_experts: usize,
    pub top_k: usize,
    pub score: Score,
    pub temperature: f64,
    pub renormalize: bool,
    pub activation: Activation,
    pub noise: Noise,
    pub selection: Selection,
    /// W_noise (d, E) of noisy top-k.
    noise_proj: Option<Linear>,
    /// The layer's index, for its noise stream.
    layer: usize,
    /// Selection bias (aux-loss-free balancing; unused when `bias_var` holds it), and the loads
    /// seen since its last update.
    bias: Mutex<(Vec<f32>, Vec<f64>)>,
    /// The bias as a buffer of the parameter store (saved with checkpoints), when the layer
    /// balances by bias ([`Router::with_bias_state`]).
    bias_var: Option<Var>,
}

impl Router {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pb: &Pb,
        d: usize,
        n_experts: usize,
        top_k: usize,
        score: Score,
        temperature: f64,
        renormalize: bool,
    ) -> Result<Self> {
        Ok(Self {
            proj: Linear::new(pb, d, n_experts, false, INIT_STD)?,
            n_experts,
            top_k,
            score,
            temperature,
            renormalize,
            activation: Activation::None,
            noise: Noise::None,
            selection: Selection::TokenChoice,
            noise_proj: None,
            layer: 0,
            bias: Mutex::new((vec![0.0; n_experts], vec![0.0; n_experts])),
            bias_var: None,
        })
    }

    /// Keep the selection bias in the parameter store as a buffer (`selection_bias`, not trained),
    /// so that a checkpoint holds it and a resumed run routes as an uninterrupted one.
    pub fn with_bias_state(mut self, pb: &Pb) -> Result<Self> {
        pb.get("selection_bias", self.n_experts, Init::Const(0.0), Group::Buffer)?;
        let name = if pb.prefix().is_empty() { "selection_bias".to_string() } else { format!("{}.selection_bias", pb.prefix()) };
        self.bias_var = Some(pb.store().params()[&name].var.clone());
        Ok(self)
    }

    /// Set the activation, noise and selection; `pb` holds W_noise for noisy top-k, `layer` names
    /// the noise stream.
    pub fn with_options(mut self, pb: &Pb, layer: usize, activation: Activation, noise: Noise, selection: Selection) -> Result<Self> {
        if noise == Noise::NoisyTopK {
            let d = self.proj.weight.dim(1)?;
            self.noise_proj = Some(Linear::new(&pb.pp("noise"), d, self.n_experts, false, 0.0)?);
        }
        self.activation = activation;
        self.noise = noise;
        self.selection = selection;
        self.layer = layer;
        Ok(self)
    }

    /// The current selection bias.
    pub fn bias(&self) -> Vec<f32> {
        match &self.bias_var {
            Some(v) => v.as_tensor().to_dtype(DType::F32).and_then(|t| t.to_vec1::<f32>()).expect("selection bias"),
            None => self.bias.lock().unwrap().0.clone(),
        }
    }

    /// Route tokens x (N, d). In a training step ([`zoo_core::state::train_step`]) the noise and
    /// the dense-to-sparse schedule apply; elsewhere the routing is deterministic.
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let ts = zoo_core::state::train_step();
        let mut rng = ts.map(|t| Rng::new(t.seed).fork(0x6d6f65).fork(self.layer as u64).fork(t.step as u64).fork(t.micro as u64));
        let (n, d) = x.dims2()?;
        let e = self.n_experts;
        let dev = x.device();
        let x_in = match (&self.noise, rng.as_mut()) {
            (Noise::Jitter { eps }, Some(r)) => {
                let u: Vec<f32> = (0..n * d).map(|_| (1.0 - eps + 2.0 * eps * r.uniform()) as f32).collect();
                (x * Tensor::from_vec(u, (n, d), dev)?.to_dtype(x.dtype())?)?
            }
            _ => x.clone(),
        };
        let mut logits = self.proj.forward(&x_in)?.to_dtype(DType::F32)?;
        if let (Some(w), Some(r)) = (&self.noise_proj, rng.as_mut()) {
            let eps: Vec<f32> = (0..n * e).map(|_| r.normal() as f32).collect();
            let scale = softplus(&w.forward(x)?.to_dtype(DType::F32)?)?;
            logits = (logits + (Tensor::from_vec(eps, (n, e), dev)? * scale)?)?;
        }
        let logits = self.activation.apply(logits)?;
        match self.selection {
            Selection::TokenChoice => {
                // The store's bias stays on the device (reading it to the host would wait for the
                // GPU); without bias balancing there is none to add.
                let bias = match &self.bias_var {
                    Some(v) => Some(v.as_tensor().to_dtype(DType::F32)?.reshape((1, e))?),
                    None => {
                        let b = self.bias();
                        b.iter().any(|&x| x != 0.0).then(|| Tensor::from_vec(b, (1, e), dev)).transpose()?
                    }
                };
                route_with_bias(&logits, bias.as_ref(), self.top_k, self.score, self.temperature, self.renormalize)
            }
            Selection::ExpertChoice { capacity_factor } => {
                let cap = ((capacity_factor * (n * self.top_k) as f64) / e as f64).ceil() as usize;
                route_expert_choice(&logits, cap.clamp(1, n), self.temperature)
            }
            Selection::DenseToSparse { threshold, .. } => match (ts, rng.as_mut()) {
                (Some(t), Some(r)) => {
                    let g: Vec<f32> = (0..n * e).map(|_| -((-(r.uniform().max(1e-20)).ln()).ln()) as f32).collect();
                    let tau = self.selection.tau_at(t.step, t.total).expect("dense-to-sparse");
                    route_dense_to_sparse(&logits, Some(&Tensor::from_vec(g, (n, e), dev)?), tau, threshold, self.top_k)
                }
                _ => route_dense_to_sparse(&logits, None, 1.0, threshold, self.top_k),
            },
        }
    }

    /// Token-choice routing that stays on the device (no expert index read to the host): the
    /// scores (N, E), the top-k experts (N, k) u32 and their weights (N, k), and the logits
    /// (for the z-loss). Only without noise and selection bias ([`crate::Dispatch::Tiled`]'s
    /// conditions, checked by the config).
    pub fn route_on_device(&self, x: &Tensor) -> Result<DeviceRouting> {
        if !matches!(self.noise, Noise::None) || self.bias_var.is_some() || self.selection != Selection::TokenChoice {
            zoo_core::candle_core::bail!("route_on_device: token choice without noise or selection bias only");
        }
        let logits = self.proj.forward(x)?.to_dtype(DType::F32)?;
        let logits = self.activation.apply(logits)?;
        let (scores, experts, weights) = top_k(&logits, None, self.top_k, self.score, self.temperature, self.renormalize)?;
        Ok(DeviceRouting { experts, weights, scores, logits })
    }

    /// Record a training step's loads (for the bias update).
    pub fn observe(&self, load: &[f64]) {
        let mut b = self.bias.lock().unwrap();
        for (acc, l) in b.1.iter_mut().zip(load) {
            *acc += l;
        }
    }

    /// The aux-loss-free update: `b_i += γ · sign(mean load − load_i)` over the loads observed
    /// since the last update (then forgotten).
    pub fn update_bias(&self, gamma: f64) {
        let mut bias = self.bias();
        let mut b = self.bias.lock().unwrap();
        let (host, load) = &mut *b;
        // Data parallelism: every rank updates from the loads of all ranks, so the biases stay
        // identical.
        if let Some(c) = zoo_core::dist::current() {
            let local: Vec<f32> = load.iter().map(|&l| l as f32).collect();
            let n = local.len();
            let sum = Tensor::from_vec(local, n, &zoo_core::candle_core::Device::Cpu)
                .and_then(|t| c.all_reduce_sum(&t))
                .and_then(|t| t.to_vec1::<f32>())
                .expect("all-reduce of the expert loads");
            load.iter_mut().zip(sum).for_each(|(l, s)| *l = s as f64);
        }
        if load.iter().all(|&l| l == 0.0) {
            return;
        }
        let mean = load.iter().sum::<f64>() / load.len() as f64;
        for (bi, &li) in bias.iter_mut().zip(load.iter()) {
            let s = if li < mean {
                1.0
            } else if li > mean {
                -1.0
            } else {
                0.0
            };
            *bi += (gamma * s) as f32;
        }
        load.iter_mut().for_each(|l| *l = 0.0);
        // The bias lives in the store buffer when there is one, else on the host.
        match &self.bias_var {
            Some(v) => {
                let t = Tensor::from_vec(bias, load.len(), v.device()).and_then(|t| t.to_dtype(v.dtype()));
                t.and_then(|t| v.set(&t)).expect("selection bias update");
            }
            None => *host = bias,
        }
    }
}

/// Top-k routing from logits (N, E) f32 with a selection bias (length E).
pub fn route_logits(
    logits: &Tensor,
    bias: &[f32],
    top_k: usize,
    score: Score,
    temperature: f64,
    renormalize: bool,
) -> Result<Routing> {
    let e = logits.dim(1)?;
    let b = Tensor::from_vec(bias.to_vec(), (1, e), logits.device())?;
    route_with_bias(logits, Some(&b), top_k, score, temperature, renormalize)
}

/// A token-choice routing kept on the device ([`Router::route_on_device`]).
pub struct DeviceRouting {
    /// (N, k) u32.
    pub experts: Tensor,
    /// (N, k): the picked scores (renormalised if asked).
    pub weights: Tensor,
    /// (N, E).
    pub scores: Tensor,
    pub logits: Tensor,
}

/// Scores (N, E), the top-k experts (N, k) by score (plus the selection bias `b`, (1, E), when
/// given) and their weights, all on the logits' device.
fn top_k(logits: &Tensor, b: Option<&Tensor>, top_k: usize, score: Score, temperature: f64, renormalize: bool) -> Result<(Tensor, Tensor, Tensor)> {
    let scores = match score {
        // The fused softmax with its backward (one launch forward instead of six).
        Score::Softmax => zoo_core::grad::softmax_last_dim(&(logits / temperature)?)?,
        Score::Sigmoid => zoo_core::candle_nn::ops::sigmoid(logits)?,
    };
    let select = match b {
        Some(b) => scores.detach().broadcast_add(b)?,
        None => scores.detach(),
    };
    let experts = select.arg_sort_last_dim(false)?.narrow(1, 0, top_k)?.contiguous()?;
    let mut weights = scores.gather(&experts, 1)?;
    if renormalize {
        weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
    }
    Ok((scores, experts, weights))
}

/// [`route_logits`] with the bias as a (1, E) f32 tensor on the logits' device (None: no bias).
fn route_with_bias(logits: &Tensor, b: Option<&Tensor>, top_k: usize, score: Score, temperature: f64, renormalize: bool) -> Result<Routing> {
    let e = logits.dim(1)?;
    let (scores, experts, weights) = self::top_k(logits, b, top_k, score, temperature, renormalize)?;
    let mut load = vec![0.0; e];
    let assignments = experts.flatten_all()?.to_vec1::<u32>()?;
    for &i in &assignments {
        load[i as usize] += 1.0;
    }
    let kept = vec![true; assignments.len()];
    Ok(Routing { experts, weights, scores, logits: logits.clone(), load, assignments, kept, all_experts: false })
}

/// softplus(x) = ln(1 + eˣ), computed as max(x, 0) + ln(1 + e^{−|x|}) (differentiable).
fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// A routing where every token has one slot per expert (slot t·E + i is expert i), `kept`
/// marking the slots in use; `weights` (N, E).
fn all_slots(logits: &Tensor, scores: Tensor, weights: Tensor, kept: Vec<bool>) -> Result<Routing> {
    let (n, e) = logits.dims2()?;
    let assignments: Vec<u32> = (0..n * e).map(|a| (a % e) as u32).collect();
    let mut load = vec![0.0; e];
    for (a, &k) in kept.iter().enumerate() {
        if k {
            load[a % e] += 1.0;
        }
    }
    let experts = Tensor::from_vec(assignments.clone(), (n, e), logits.device())?;
    Ok(Routing { experts, weights, scores, logits: logits.clone(), load, assignments, kept, all_experts: true })
}

/// Expert choice: scores `softmax(z/τ)` over experts; each expert keeps the `capacity` tokens
/// with its highest scores (ties: the earlier token), weighted by those scores.
pub fn route_expert_choice(logits: &Tensor, capacity: usize, temperature: f64) -> Result<Routing> {
    let (n, e) = logits.dims2()?;
    let scores = zoo_core::candle_nn::ops::softmax(&(logits / temperature)?, D::Minus1)?;
    let by_expert = scores.detach().t()?.contiguous()?.arg_sort_last_dim(false)?.narrow(1, 0, capacity.min(n))?;
    let mut kept = vec![false; n * e];
    for (i, toks) in by_expert.to_vec2::<u32>()?.into_iter().enumerate() {
        for t in toks {
            kept[t as usize * e + i] = true;
        }
    }
    all_slots(logits, scores.clone(), scores, kept)
}

/// EvoMoE's dense-to-sparse gate. Training (`gumbel` given): `p = softmax((z + g)/τ)`; each token
/// uses its top k and every expert with p > `threshold`, weighted by p. Evaluation: the top k of
/// z, weighted by the softmax over the picked logits.
pub fn route_dense_to_sparse(logits: &Tensor, gumbel: Option<&Tensor>, tau: f64, threshold: f64, top_k: usize) -> Result<Routing> {
    let (n, e) = logits.dims2()?;
    match gumbel {
        Some(g) => {
            let p = zoo_core::candle_nn::ops::softmax(&((logits + g)? / tau)?, D::Minus1)?;
            let rank = p.detach().arg_sort_last_dim(false)?.to_vec2::<u32>()?;
            let pv = p.detach().to_vec2::<f32>()?;
            let mut kept = vec![false; n * e];
            for t in 0..n {
                for (j, &i) in rank[t].iter().enumerate() {
                    kept[t * e + i as usize] = j < top_k || pv[t][i as usize] as f64 > threshold;
                }
            }
            all_slots(logits, p.clone(), p, kept)
        }
        None => {
            let mut r = route_logits(logits, &vec![0.0; e], top_k, Score::Softmax, 1.0, false)?;
            let picked = logits.gather(&r.experts, 1)?;
            r.weights = zoo_core::candle_nn::ops::softmax(&picked, D::Minus1)?;
            Ok(r)
        }
    }
}

/// Switch's auxiliary loss `α · E · Σ_i f_i P_i` (f from the assignments, no gradient).
pub fn aux_loss(r: &Routing, alpha: f64) -> Result<Tensor> {
    let f = Tensor::from_vec(r.load_shares().0, r.load.len(), r.scores.device())?;
    aux_loss_of(&r.scores, &f, alpha)
}

/// ST-MoE's router z-loss `β · mean_t (logsumexp_i z_ti)²`.
pub fn z_loss(r: &Routing, beta: f64) -> Result<Tensor> {
    z_loss_of(&r.logits, beta)
}

/// [`z_loss`] of logits (N, E).
pub fn z_loss_of(logits: &Tensor, beta: f64) -> Result<Tensor> {
    let m = logits.max_keepdim(1)?.detach();
    let lse = (logits.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + &m)?;
    lse.sqr()?.mean_all()? * beta
}

/// [`aux_loss`] from the scores (N, E) and each expert's share of the assignments `f` (E,), on
/// the scores' device: `α · E · Σ_i f_i P_i`, P the mean score.
pub fn aux_loss_of(scores: &Tensor, f: &Tensor, alpha: f64) -> Result<Tensor> {
    let e = f.dim(0)?;
    (scores.mean(0)? * f.to_dtype(scores.dtype())?)?.sum_all()? * (alpha * e as f64)
}

/// The mean entropy of the score rows (N, E), nats: the `router_entropy` statistic.
pub fn entropy(scores: &Tensor) -> Result<Tensor> {
    (scores.clamp(1e-30, 1.0)?.log()? * scores)?.sum(zoo_core::candle_core::D::Minus1)?.neg()?.mean_all()
}
