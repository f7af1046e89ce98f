//! A small, seedable, serialisable RNG (SplitMix64). Everything random in zoo (weight init, data
//! sampling, MQAR generation) draws from it, so a run is a pure function of its seed and a
//! checkpoint can store the exact generator state.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng {
    pub state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Mix the seed so that small seeds give unrelated streams.
        let mut r = Rng { state: seed ^ 0x9E37_79B9_7F4A_7C15 };
        r.next_u64();
        r
    }

    /// A child generator for an independent stream (e.g. `fork(1)` for data, `fork(2)` for init).
    pub fn fork(&self, stream: u64) -> Self {
        Rng::new(self.state.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ stream.wrapping_mul(0xA24B_AED4_963E_E407))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0)");
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i + 1);
            xs.swap(i, j);
        }
    }

    /// The first `k` items of a uniform random permutation of `xs` (a partial Fisher–Yates
    /// shuffle: O(k), so drawing a few keys from a vocabulary of 8192 stays cheap). Reorders `xs`.
    pub fn sample_distinct<T: Copy>(&mut self, xs: &mut [T], k: usize) -> Vec<T> {
        assert!(k <= xs.len());
        for i in 0..k {
            let j = i + self.below(xs.len() - i);
            xs.swap(i, j);
        }
        xs[..k].to_vec()
    }

    /// `k` distinct indices from `0..n` drawn with probabilities proportional to `weights`
    /// (sequential sampling without replacement, as `numpy.random.choice(replace=False, p=...)`).
    pub fn choose_weighted_distinct(&mut self, weights: &[f64], k: usize) -> Vec<usize> {
        assert!(k <= weights.len());
        let mut w = weights.to_vec();
        let mut out = Vec::with_capacity(k);
        for _ in 0..k {
            let total: f64 = w.iter().sum();
            let mut r = self.uniform() * total;
            let mut pick = w.len() - 1;
            for (i, &wi) in w.iter().enumerate() {
                if wi <= 0.0 {
                    continue;
                }
                if r < wi {
                    pick = i;
                    break;
                }
                r -= wi;
            }
            // Guard against rounding leaving `pick` on a zero-weight slot.
            if w[pick] <= 0.0 {
                pick = w.iter().rposition(|&x| x > 0.0).unwrap();
            }
            out.push(pick);
            w[pick] = 0.0;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_distinct_streams() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let mut c = Rng::new(8);
        let xa: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        let xb: Vec<u64> = (0..4).map(|_| b.next_u64()).collect();
        let xc: Vec<u64> = (0..4).map(|_| c.next_u64()).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
    }

    #[test]
    fn normal_moments() {
        let mut r = Rng::new(1);
        let n = 20000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }

    #[test]
    fn weighted_distinct() {
        let mut r = Rng::new(3);
        let picks = r.choose_weighted_distinct(&[1.0, 0.0, 5.0, 2.0], 3);
        let mut s = picks.clone();
        s.sort();
        assert_eq!(s, vec![0, 2, 3]);
    }
}
