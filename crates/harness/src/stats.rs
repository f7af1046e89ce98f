//! Welch's two-sample t-test, for "is this variant different from the baseline?" in reports.

/// ln Γ(x) (statrs).
pub fn ln_gamma(x: f64) -> f64 {
    statrs::function::gamma::ln_gamma(x)
}

/// Regularised incomplete beta I_x(a, b) (statrs).
pub fn inc_beta(x: f64, a: f64, b: f64) -> f64 {
    statrs::function::beta::beta_reg(a, b, x)
}

/// Two-sided p-value of Welch's t-test for a difference in means; None with fewer than 2 samples
/// in either group or zero variance in both.
pub fn welch_p(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let (ma, va) = mean_var(a);
    let (mb, vb) = mean_var(b);
    let (sa, sb) = (va / a.len() as f64, vb / b.len() as f64);
    if sa + sb == 0.0 {
        return None;
    }
    let t = (ma - mb) / (sa + sb).sqrt();
    let nu = (sa + sb).powi(2) / (sa * sa / (a.len() as f64 - 1.0) + sb * sb / (b.len() as f64 - 1.0));
    Some(inc_beta(nu / (nu + t * t), nu / 2.0, 0.5))
}

fn mean_var(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n;
    (m, x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-12);
        assert!((inc_beta(0.5, 2.0, 2.0) - 0.5).abs() < 1e-12);
        // scipy.stats.ttest_ind([1,2,3,4],[3,4,5,6], equal_var=False): t = -2.1909, p = 0.0710
        let p = welch_p(&[1.0, 2.0, 3.0, 4.0], &[3.0, 4.0, 5.0, 6.0]).unwrap();
        assert!((p - 0.07098).abs() < 1e-4, "{p}");
        // Identical groups: p = 1.
        assert!((welch_p(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]).unwrap() - 1.0).abs() < 1e-12);
    }
}
