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

use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use zoo_core::candle_core::{DType, Result, Tensor, D};
use zoo_core::nn::{Linear, INIT_STD};
use zoo_core::params::Pb;

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
}

impl Routing {
    /// Share of the N·k assignments the capacity dropped.
    pub fn dropped_fraction(&self) -> f64 {
        self.kept.iter().filter(|k| !**k).count() as f64 / self.kept.len().max(1) as f64
    }

    /// Drop assignments beyond `capacity = ceil(factor · N·k / E)` per expert, in token order
    /// (Switch Transformer §2.2: earlier tokens first); dropped assignments contribute nothing
    /// (the token keeps only its residual path for that slot).
    pub fn apply_capacity(&mut self, factor: f64) -> Result<()> {
        let e = self.load.len();
        let cap = (factor * self.kept.len() as f64 / e as f64).ceil() as usize;
        let mut count = vec![0usize; e];
        for (a, &x) in self.assignments.iter().enumerate() {
            let x = x as usize;
            self.kept[a] = count[x] < cap;
            count[x] += 1;
        }
        self.load = count.iter().map(|&c| c.min(cap) as f64).collect();
        Ok(())
    }
}

pub struct Router {
    pub proj: Linear,
    pub n_experts: usize,
    pub top_k: usize,
    pub score: Score,
    pub temperature: f64,
    pub renormalize: bool,
    /// Selection bias (aux-loss-free balancing), and the loads seen since its last update.
    bias: Mutex<(Vec<f32>, Vec<f64>)>,
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
            bias: Mutex::new((vec![0.0; n_experts], vec![0.0; n_experts])),
        })
    }

    /// The current selection bias.
    pub fn bias(&self) -> Vec<f32> {
        self.bias.lock().unwrap().0.clone()
    }

    /// Route tokens x (N, d).
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let logits = self.proj.forward(x)?.to_dtype(DType::F32)?;
        route_logits(&logits, &self.bias(), self.top_k, self.score, self.temperature, self.renormalize)
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
        let mut b = self.bias.lock().unwrap();
        let (bias, load) = &mut *b;
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
    let scores = match score {
        Score::Softmax => zoo_core::candle_nn::ops::softmax(&(logits / temperature)?, D::Minus1)?,
        Score::Sigmoid => zoo_core::candle_nn::ops::sigmoid(logits)?,
    };
    let b = Tensor::from_vec(bias.to_vec(), (1, e), logits.device())?;
    let select = scores.detach().broadcast_add(&b)?;
    let experts = select.arg_sort_last_dim(false)?.narrow(1, 0, top_k)?.contiguous()?;
    let mut weights = scores.gather(&experts, 1)?;
    if renormalize {
        weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
    }
    let mut load = vec![0.0; e];
    let assignments = experts.flatten_all()?.to_vec1::<u32>()?;
    for &i in &assignments {
        load[i as usize] += 1.0;
    }
    let kept = vec![true; assignments.len()];
    Ok(Routing { experts, weights, scores, logits: logits.clone(), load, assignments, kept })
}

/// Switch's auxiliary loss `α · E · Σ_i f_i P_i` (f from the assignments, no gradient).
pub fn aux_loss(r: &Routing, alpha: f64) -> Result<Tensor> {
    let e = r.load.len();
    let total: f64 = r.load.iter().sum();
    let f: Vec<f32> = r.load.iter().map(|&l| (l / total.max(1.0)) as f32).collect();
    let f = Tensor::from_vec(f, e, r.scores.device())?;
    let p = r.scores.mean(0)?; // (E,)
    (p * f)?.sum_all()? * (alpha * e as f64)
}

/// ST-MoE's router z-loss `β · mean_t (logsumexp_i z_ti)²`.
pub fn z_loss(r: &Routing, beta: f64) -> Result<Tensor> {
    let m = r.logits.max_keepdim(1)?.detach();
    let lse = (r.logits.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + &m)?;
    lse.sqr()?.mean_all()? * beta
}
