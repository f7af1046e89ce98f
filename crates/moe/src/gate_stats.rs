//! The synthetic Gaussian-MoE study of Nguyen, Akbarian & Ho (ICML 2024), "Is Temperature Sample
//! Efficient for Softmax Gaussian Mixture of Experts?": how fast maximum-likelihood estimates of
//! a mixture of experts' parameters approach the truth as the sample size n grows, for the
//! temperature gate `softmax((β x + b) / τ)` against the activation gate
//! `softmax(act(β x + b) / τ)` (§3-4 of the paper; the catalogue's experiment 2.2).
//!
//! Model (scalar input, k Gaussian experts, τ learned):
//! `p(y | x) = Σ_i w_i(x) · N(y; a_i x + c_i, σ_i²)`, `w(x) = softmax_i(g(β_i x + b_i) / τ)`,
//! g the identity (temperature gate), tanh or sigmoid; the last expert's gate parameters are
//! fixed at 0 (softmax is unchanged by a common shift of its logits, so one expert is the
//! reference). Data: x ~ N(0, 1), an expert drawn from w(x) under the true parameters, y from it.
//! Fit: Adam (learning rate decayed linearly to 0) on the mean negative log-likelihood, full batch, from `restarts` starts near the
//! truth (each parameter perturbed by N(0, init_noise²)), the best likelihood kept; the fitted
//! experts are matched to the true ones by the permutation with the least error.
//!
//! Errors: the sum of absolute differences over every parameter (β, b, a, c, σ of each expert,
//! and τ), and over the identifiable gate quantities (β/τ, b/τ for the temperature gate, where
//! only the ratio enters; β, b, τ for an activation gate). With g the identity, β and τ enter only
//! as β/τ: the likelihood is flat along (β, b, τ) → (sβ, sb, sτ), so no sample size pins β or τ
//! down (the interaction the paper writes as a PDE between them), while the ratios can converge.

use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{bail, DType, Device, Result, Tensor, Var, D};
use zoo_core::candle_nn::{AdamW, Optimizer, ParamsAdamW};

/// The gate's function before the softmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateKind {
    /// `softmax((β x + b) / τ)`.
    Temperature,
    /// `softmax(tanh(β x + b) / τ)`.
    Tanh,
    /// `softmax(sigmoid(β x + b) / τ)`.
    Sigmoid,
}

impl GateKind {
    pub fn name(self) -> &'static str {
        match self {
            GateKind::Temperature => "temperature",
            GateKind::Tanh => "tanh",
            GateKind::Sigmoid => "sigmoid",
        }
    }

    fn apply(self, z: &Tensor) -> Result<Tensor> {
        match self {
            GateKind::Temperature => Ok(z.clone()),
            GateKind::Tanh => z.tanh(),
            GateKind::Sigmoid => zoo_core::candle_nn::ops::sigmoid(z),
        }
    }
}

/// One true expert: gate (β, b; the last expert's are ignored and taken as 0) and the Gaussian
/// (mean a x + c, standard deviation σ).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrueExpert {
    pub beta: f64,
    pub b: f64,
    pub a: f64,
    pub c: f64,
    pub sigma: f64,
}

/// `configs/moe-gate-stats.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateStatsConfig {
    pub experiment: String,
    #[serde(default)]
    pub description: String,
    pub seed: u64,
    pub gates: Vec<GateKind>,
    pub sample_sizes: Vec<usize>,
    /// Independent data sets per (gate, n).
    pub replicates: usize,
    /// Starts per fit; the best likelihood is kept.
    pub restarts: usize,
    pub steps: usize,
    pub lr: f64,
    /// Standard deviation of the perturbation of the truth that a start is.
    pub init_noise: f64,
    pub tau: f64,
    pub experts: Vec<TrueExpert>,
}

impl GateStatsConfig {
    /// Reject a config that cannot run, naming the field.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.gates.is_empty() {
            return Err("gates: give at least one".into());
        }
        if self.sample_sizes.is_empty() || self.sample_sizes.iter().any(|&n| n < 2) {
            return Err("sample_sizes: give sizes of at least 2".into());
        }
        if self.replicates == 0 || self.restarts == 0 || self.steps == 0 {
            return Err("replicates, restarts and steps: must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.tau > 0.0 && self.init_noise >= 0.0) {
            return Err("lr and tau: must be positive; init_noise: not negative".into());
        }
        if !(2..=4).contains(&self.experts.len()) {
            return Err(format!("experts: {} given, 2 to 4 supported (errors match experts by permutation)", self.experts.len()));
        }
        if let Some(i) = self.experts.iter().position(|e| e.sigma.is_nan() || e.sigma <= 0.0) {
            return Err(format!("experts[{i}].sigma: must be positive"));
        }
        Ok(())
    }
}

/// Parameters of one mixture, one entry per expert (the last expert's β, b unused: 0).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Params {
    pub beta: Vec<f64>,
    pub b: Vec<f64>,
    pub a: Vec<f64>,
    pub c: Vec<f64>,
    pub sigma: Vec<f64>,
    pub tau: f64,
}

impl Params {
    pub fn truth(cfg: &GateStatsConfig) -> Self {
        let k = cfg.experts.len();
        let gate = |f: fn(&TrueExpert) -> f64| cfg.experts.iter().enumerate().map(|(i, e)| if i + 1 == k { 0.0 } else { f(e) }).collect();
        Params {
            beta: gate(|e| e.beta),
            b: gate(|e| e.b),
            a: cfg.experts.iter().map(|e| e.a).collect(),
            c: cfg.experts.iter().map(|e| e.c).collect(),
            sigma: cfg.experts.iter().map(|e| e.sigma).collect(),
            tau: cfg.tau,
        }
    }

    /// The gate weights w (n, k) at inputs x (n,).
    fn weights(&self, gate: GateKind, x: &[f64]) -> Vec<Vec<f64>> {
        x.iter()
            .map(|&xi| {
                let z: Vec<f64> = (0..self.beta.len())
                    .map(|i| {
                        let u = self.beta[i] * xi + self.b[i];
                        let g = match gate {
                            GateKind::Temperature => u,
                            GateKind::Tanh => u.tanh(),
                            GateKind::Sigmoid => 1.0 / (1.0 + (-u).exp()),
                        };
                        g / self.tau
                    })
                    .collect();
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.iter().map(|v| v / s).collect()
            })
            .collect()
    }
}

/// A small deterministic generator (splitmix64) with uniform and normal draws.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// n samples (x, y) from the mixture `p` with gate `gate`.
pub fn sample(p: &Params, gate: GateKind, n: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let mut r = Draw(seed);
    let x: Vec<f64> = (0..n).map(|_| r.normal()).collect();
    let w = p.weights(gate, &x);
    let y = x
        .iter()
        .zip(&w)
        .map(|(&xi, wi)| {
            let u = r.uniform();
            let mut acc = 0.0;
            let mut i = wi.len() - 1;
            for (j, &wj) in wi.iter().enumerate() {
                acc += wj;
                if u < acc {
                    i = j;
                    break;
                }
            }
            p.a[i] * xi + p.c[i] + p.sigma[i] * r.normal()
        })
        .collect();
    (x, y)
}

/// Mean negative log-likelihood of (x, y) under the parameters held by `v`
/// ([β, b] of the first k − 1 experts, a, c, log σ, log τ).
fn nll(gate: GateKind, v: &[Var], x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (beta, b, a, c, log_sigma, log_tau) = (v[0].as_tensor(), v[1].as_tensor(), v[2].as_tensor(), v[3].as_tensor(), v[4].as_tensor(), v[5].as_tensor());
    let n = x.dim(0)?;
    let xc = x.unsqueeze(1)?; // (n, 1)
    let zero = Tensor::zeros((1, 1), DType::F64, x.device())?;
    let beta = Tensor::cat(&[&beta.unsqueeze(0)?, &zero], 1)?; // (1, k)
    let b = Tensor::cat(&[&b.unsqueeze(0)?, &zero], 1)?;
    let logits = gate.apply(&xc.broadcast_mul(&beta)?.broadcast_add(&b)?)?.broadcast_div(&log_tau.exp()?)?; // (n, k)
    let log_w = zoo_core::candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let mu = xc.broadcast_mul(&a.unsqueeze(0)?)?.broadcast_add(&c.unsqueeze(0)?)?;
    let sigma = log_sigma.exp()?.unsqueeze(0)?;
    let r = y.unsqueeze(1)?.broadcast_sub(&mu)?.broadcast_div(&sigma)?;
    let log_n = ((r.sqr()? * -0.5)?.broadcast_sub(&log_sigma.unsqueeze(0)?)? - 0.5 * (2.0 * std::f64::consts::PI).ln())?;
    let joint = (log_w + log_n)?; // (n, k)
    let m = joint.max_keepdim(D::Minus1)?;
    let lse = (joint.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?;
    (lse.sum_all()? * (-1.0 / n as f64))?.to_dtype(DType::F64)
}

/// The maximum-likelihood fit of one data set: the best of `restarts` Adam runs from perturbed
/// truths. Returns the parameters and their mean NLL.
pub fn fit(cfg: &GateStatsConfig, gate: GateKind, x: &[f64], y: &[f64], seed: u64) -> Result<(Params, f64)> {
    let truth = Params::truth(cfg);
    let k = truth.a.len();
    let dev = Device::Cpu;
    let (xt, yt) = (Tensor::new(x, &dev)?, Tensor::new(y, &dev)?);
    let mut r = Draw(seed ^ 0x5EED);
    let mut best: Option<(Params, f64)> = None;
    for _ in 0..cfg.restarts {
        let mut jitter = |v: &[f64]| -> Vec<f64> { v.iter().map(|&p| p + cfg.init_noise * r.normal()).collect() };
        let vars = [
            Var::new(jitter(&truth.beta[..k - 1]), &dev)?,
            Var::new(jitter(&truth.b[..k - 1]), &dev)?,
            Var::new(jitter(&truth.a), &dev)?,
            Var::new(jitter(&truth.c), &dev)?,
            Var::new(jitter(&truth.sigma.iter().map(|s| s.ln()).collect::<Vec<_>>()), &dev)?,
            Var::new(jitter(&[truth.tau.ln()])[0], &dev)?,
        ];
        let mut opt = AdamW::new(vars.to_vec(), ParamsAdamW { lr: cfg.lr, weight_decay: 0.0, ..Default::default() })?;
        // Linear decay to 0, so that the last steps settle on the optimum instead of circling it
        // at Adam's step size.
        for step in 0..cfg.steps {
            opt.set_learning_rate(cfg.lr * (1.0 - step as f64 / cfg.steps as f64));
            let loss = nll(gate, &vars, &xt, &yt)?;
            opt.backward_step(&loss)?;
        }
        let loss = nll(gate, &vars, &xt, &yt)?.to_scalar::<f64>()?;
        if !loss.is_finite() {
            continue;
        }
        let get = |i: usize| vars[i].as_tensor().flatten_all().and_then(|t| t.to_vec1::<f64>());
        let mut beta = get(0)?;
        beta.push(0.0);
        let mut b = get(1)?;
        b.push(0.0);
        let p = Params {
            beta,
            b,
            a: get(2)?,
            c: get(3)?,
            sigma: get(4)?.iter().map(|s| s.exp()).collect(),
            tau: get(5)?[0].exp(),
        };
        if best.as_ref().is_none_or(|(_, l)| loss < *l) {
            best = Some((p, loss));
        }
    }
    match best {
        Some(b) => Ok(b),
        None => bail!("gate stats: every start diverged (lower lr)"),
    }
}

/// Errors of a fit against the truth, the fitted experts matched to the true ones by the
/// permutation (of all experts but the reference, whose gate is fixed) with the least total error.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Errors {
    /// Σ |Δ| over β, b, a, c, σ of every expert and τ.
    pub total: f64,
    /// The identifiable gate quantities: β/τ, b/τ (temperature gate) or β, b, τ (activation).
    pub gate: f64,
    /// a, c, σ of every expert.
    pub experts: f64,
}

pub fn errors(gate: GateKind, fit: &Params, truth: &Params) -> Errors {
    let k = truth.a.len();
    let mut perms: Vec<Vec<usize>> = vec![vec![]];
    for _ in 0..k - 1 {
        let mut next = Vec::new();
        for p in &perms {
            for i in (0..k - 1).filter(|i| !p.contains(i)) {
                next.push([p.clone(), vec![i]].concat());
            }
        }
        perms = next;
    }
    let mut best: Option<Errors> = None;
    for mut p in perms {
        p.push(k - 1);
        let mut e = Errors { total: (fit.tau - truth.tau).abs(), gate: 0.0, experts: 0.0 };
        if gate != GateKind::Temperature {
            e.gate += (fit.tau - truth.tau).abs();
        }
        for (j, &i) in p.iter().enumerate() {
            let ex = (fit.a[i] - truth.a[j]).abs() + (fit.c[i] - truth.c[j]).abs() + (fit.sigma[i] - truth.sigma[j]).abs();
            let g = (fit.beta[i] - truth.beta[j]).abs() + (fit.b[i] - truth.b[j]).abs();
            e.total += ex + g;
            e.experts += ex;
            e.gate += match gate {
                GateKind::Temperature => (fit.beta[i] / fit.tau - truth.beta[j] / truth.tau).abs() + (fit.b[i] / fit.tau - truth.b[j] / truth.tau).abs(),
                _ => g,
            };
        }
        if best.is_none_or(|b| e.total < b.total) {
            best = Some(e);
        }
    }
    best.expect("at least one permutation")
}

/// Least-squares slope of log10(y) against log10(x) (points with y > 0).
pub fn log_log_slope(points: &[(f64, f64)]) -> f64 {
    let p: Vec<(f64, f64)> = points.iter().filter(|p| p.0 > 0.0 && p.1 > 0.0).map(|&(x, y)| (x.log10(), y.log10())).collect();
    let n = p.len() as f64;
    if p.len() < 2 {
        return f64::NAN;
    }
    let (mx, my) = (p.iter().map(|q| q.0).sum::<f64>() / n, p.iter().map(|q| q.1).sum::<f64>() / n);
    let sxy: f64 = p.iter().map(|q| (q.0 - mx) * (q.1 - my)).sum();
    let sxx: f64 = p.iter().map(|q| (q.0 - mx).powi(2)).sum();
    sxy / sxx
}
