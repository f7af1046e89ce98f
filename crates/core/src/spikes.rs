//! Loss-spike detection on the per-step training loss.
//!
//! The detector watches the loss smoothed over the last [`SMOOTH`] steps (a single batch with a few
//! confidently wrong answers is noise, not an instability) and fits the last [`WINDOW`] smoothed
//! losses with a robust straight line (Theil–Sen: the median of pairwise
//! slopes, then the median intercept), so a falling loss early in training does not hide a spike
//! behind a lagging median. A step is a spike when its loss exceeds the fit's prediction by more
//! than [`K`] robust deviations of the residuals (1.4826 × their median absolute deviation, the
//! normal-consistent MAD) and by more than a floor: [`MIN_RISE`] nats and [`MIN_REL_RISE`] of the
//! prediction. Consecutive spike steps form one event, and events are what is counted. Medians
//! ignore the occasional outlier, so one spike does not hide the next; a loss that stays high moves
//! the fit up and ends the event. The floors keep a converged run (loss ≈ 0, where any noise is a
//! large *relative* jump) and ordinary batch-to-batch noise from counting.
//!
//! This replaces the rule "loss > 1.5 × running minimum", which counted most steps of runs that
//! converged to a loss near 0 and none of runs stuck at chance.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Steps averaged into the smoothed loss.
pub const SMOOTH: usize = 4;
/// Smoothed losses in the running window.
pub const WINDOW: usize = 50;
/// Steps observed before any spike can be declared.
pub const MIN_HISTORY: usize = 20;
/// Robust deviations above the median.
pub const K: f64 = 6.0;
/// The smallest rise (nats) of the smoothed loss that counts.
pub const MIN_RISE: f64 = 0.1;
/// The smallest rise relative to the median that counts.
pub const MIN_REL_RISE: f64 = 0.05;
/// At most this many event steps are kept (the count is exact regardless).
pub const MAX_LISTED: usize = 100;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SpikeDetector {
    /// The last [`SMOOTH`] raw losses.
    #[serde(default)]
    recent: VecDeque<f64>,
    /// The last [`WINDOW`] smoothed losses.
    window: VecDeque<f64>,
    in_spike: bool,
    /// Spike events so far.
    pub events: usize,
    /// The first step of each event (1-based steps as the loop counts them), up to [`MAX_LISTED`].
    pub steps: Vec<usize>,
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

impl SpikeDetector {
    /// The threshold a loss must exceed to be a spike, or `None` while the history is short.
    pub fn threshold(&self) -> Option<f64> {
        if self.window.len() < MIN_HISTORY {
            return None;
        }
        let y: Vec<f64> = self.window.iter().copied().collect();
        let n = y.len();
        let mut slopes = Vec::with_capacity(n * (n - 1) / 2);
        for i in 0..n {
            for j in i + 1..n {
                slopes.push((y[j] - y[i]) / (j - i) as f64);
            }
        }
        let slope = median(&mut slopes);
        let mut icept: Vec<f64> = y.iter().enumerate().map(|(i, v)| v - slope * i as f64).collect();
        let b = median(&mut icept);
        let mut dev: Vec<f64> = y.iter().enumerate().map(|(i, v)| (v - b - slope * i as f64).abs()).collect();
        let sigma = 1.4826 * median(&mut dev);
        let pred = b + slope * n as f64;
        Some(pred + (K * sigma).max(MIN_RISE).max(MIN_REL_RISE * pred.abs()))
    }

    /// Observe the loss of `step`; returns true when this step starts a new spike event.
    pub fn observe(&mut self, step: usize, loss: f64) -> bool {
        if !loss.is_finite() {
            return false;
        }
        self.recent.push_back(loss);
        if self.recent.len() > SMOOTH {
            self.recent.pop_front();
        }
        let loss = self.recent.iter().sum::<f64>() / self.recent.len() as f64;
        let spike = self.threshold().is_some_and(|th| loss > th);
        let starts = spike && !self.in_spike;
        if starts {
            self.events += 1;
            if self.steps.len() < MAX_LISTED {
                self.steps.push(step);
            }
        }
        self.in_spike = spike;
        self.window.push_back(loss);
        if self.window.len() > WINDOW {
            self.window.pop_front();
        }
        starts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn run(curve: &[f64]) -> SpikeDetector {
        let mut d = SpikeDetector::default();
        for (i, &l) in curve.iter().enumerate() {
            d.observe(i + 1, l);
        }
        d
    }

    /// A language-model-like curve: 5.5 → 1.5 with batch noise of σ = 0.03.
    fn lm_curve(rng: &mut Rng, n: usize) -> Vec<f64> {
        (0..n).map(|t| 1.5 + 4.0 * (-(t as f64) / 300.0).exp() + 0.03 * rng.normal()).collect()
    }

    #[test]
    fn smooth_noisy_decay_has_no_spikes() {
        let mut rng = Rng::new(1);
        for _ in 0..5 {
            let d = run(&lm_curve(&mut rng, 2000));
            assert_eq!(d.events, 0, "{:?}", d.steps);
        }
    }

    #[test]
    fn injected_spikes_are_all_found_once() {
        let mut rng = Rng::new(2);
        let mut c = lm_curve(&mut rng, 2000);
        // Spikes of different heights and lengths (1-3 steps), including a small one (+0.3 nats
        // for two steps, 12% of the loss there).
        let at = [(150, 1.0, 1), (400, 0.3, 2), (777, 2.0, 3), (1200, 0.6, 1), (1900, 1.5, 2)];
        for &(s, h, len) in &at {
            for j in 0..len {
                c[s + j] += h;
            }
        }
        let d = run(&c);
        assert_eq!(d.events, at.len(), "{:?}", d.steps);
        // Each event starts inside its spike (1-based steps): smoothing can delay a small one.
        for (&(s, _, len), &got) in at.iter().zip(&d.steps) {
            assert!((s + 1..=s + len).contains(&got), "spike at {s} (+{len}) found at {got}");
        }
    }

    #[test]
    fn converged_recall_run_with_confident_misses_is_quiet() {
        // A recall run at 99.8% accuracy: loss ≈ 0.005, plus per batch a Poisson(0.5) number of
        // confidently wrong answers among 256 predictions, each costing ~10 nats. Single batches
        // reach +0.1 nats; the smoothed loss does not.
        let mut rng = Rng::new(6);
        let c: Vec<f64> = (0..2000)
            .map(|_| {
                let mut k = 0;
                let mut p = (-0.5f64).exp();
                let mut u = rng.uniform();
                while u > p {
                    u -= p;
                    k += 1;
                    p *= 0.5 / k as f64;
                }
                0.005 * (1.0 + 0.3 * rng.normal()).abs() + k as f64 * 10.0 / 256.0
            })
            .collect();
        assert!(c.iter().any(|&x| x > 0.1), "the noise has single-batch outliers");
        assert_eq!(run(&c).events, 0, "{:?}", run(&c).steps);
    }

    #[test]
    fn converged_run_near_zero_is_quiet() {
        // Recall task after convergence: losses 1e-4..1e-2 with heavy-tailed noise. The old rule
        // (1.5 × running minimum) fired on most of these steps.
        let mut rng = Rng::new(3);
        let c: Vec<f64> = (0..1000)
            .map(|t| {
                let base = 2.0 * (-(t as f64) / 50.0).exp() + 1e-3;
                base * (1.0 + 0.5 * rng.normal().abs()) + if rng.uniform() < 0.05 { 0.02 } else { 0.0 }
            })
            .collect();
        assert_eq!(run(&c).events, 0);
    }

    #[test]
    fn a_divergence_plateau_is_one_event() {
        let mut rng = Rng::new(4);
        let mut c = lm_curve(&mut rng, 600);
        for x in c.iter_mut().skip(500) {
            *x += 3.0;
        }
        let d = run(&c);
        assert_eq!(d.steps, vec![501]);
    }

    #[test]
    fn resumes_identically_from_serialized_state() {
        let mut rng = Rng::new(5);
        let mut c = lm_curve(&mut rng, 400);
        c[300] += 1.0;
        let mut a = SpikeDetector::default();
        for (i, &l) in c[..200].iter().enumerate() {
            a.observe(i + 1, l);
        }
        let mut b: SpikeDetector = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        for (i, &l) in c[200..].iter().enumerate() {
            a.observe(201 + i, l);
            b.observe(201 + i, l);
        }
        assert_eq!(a, b);
        assert_eq!(a.steps, vec![301]);
    }
}
