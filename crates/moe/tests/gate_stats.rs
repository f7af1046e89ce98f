//! The gate study's pieces: sampling, the error's matching and identifiability, the fit, slopes,
//! config errors.

use zoo_moe::gate_stats::{errors, fit, log_log_slope, sample, GateKind, GateStatsConfig, Params};

fn cfg() -> GateStatsConfig {
    toml::from_str(
        r#"
experiment = "t"
seed = 0
gates = ["temperature", "tanh"]
sample_sizes = [100]
replicates = 1
restarts = 1
steps = 300
lr = 0.03
init_noise = 0.2
tau = 1.0
experts = [
  { beta = 2.0, b = 0.5, a = -1.0, c = 1.0, sigma = 0.5 },
  { beta = -1.5, b = -0.5, a = 1.0, c = -1.0, sigma = 0.4 },
  { beta = 0.0, b = 0.0, a = 0.5, c = 0.0, sigma = 0.3 },
]
"#,
    )
    .unwrap()
}

#[test]
fn sampling_is_seeded_and_follows_the_experts() {
    let c = cfg();
    let p = Params::truth(&c);
    assert_eq!(sample(&p, GateKind::Tanh, 50, 7), sample(&p, GateKind::Tanh, 50, 7));
    assert_ne!(sample(&p, GateKind::Tanh, 50, 7), sample(&p, GateKind::Tanh, 50, 8));
    // With one expert taking all the weight (huge b), y - (a x + c) has that expert's spread.
    let mut q = p.clone();
    q.b = vec![50.0, 0.0, 0.0];
    let (x, y) = sample(&q, GateKind::Temperature, 20000, 1);
    let r: Vec<f64> = x.iter().zip(&y).map(|(x, y)| y - (q.a[0] * x + q.c[0])).collect();
    let sd = (r.iter().map(|v| v * v).sum::<f64>() / r.len() as f64).sqrt();
    assert!((sd - q.sigma[0]).abs() < 0.02, "sd {sd}");
}

#[test]
fn errors_match_experts_and_see_only_identifiable_gate_quantities() {
    let c = cfg();
    let t = Params::truth(&c);
    assert_eq!(errors(GateKind::Tanh, &t, &t).total, 0.0);
    // The first two experts swapped: matched back, no error.
    let mut s = t.clone();
    for v in [&mut s.beta, &mut s.b, &mut s.a, &mut s.c, &mut s.sigma] {
        v.swap(0, 1);
    }
    assert!(errors(GateKind::Tanh, &s, &t).total < 1e-12);
    // Scaling β, b and τ together leaves the temperature gate unchanged: its gate error (the
    // ratios) is 0, the total is not.
    let mut z = t.clone();
    z.beta.iter_mut().chain(z.b.iter_mut()).for_each(|v| *v *= 2.0);
    z.tau *= 2.0;
    let e = errors(GateKind::Temperature, &z, &t);
    assert!(e.gate < 1e-12 && e.experts == 0.0 && e.total > 1.0, "{e:?}");
    assert!(errors(GateKind::Tanh, &z, &t).gate > 1.0);
}

#[test]
fn the_fit_recovers_the_truth_from_enough_samples() {
    let c = cfg();
    let t = Params::truth(&c);
    let (x, y) = sample(&t, GateKind::Tanh, 3000, 3);
    let (p, nll) = fit(&c, GateKind::Tanh, &x, &y, 3).unwrap();
    let e = errors(GateKind::Tanh, &p, &t);
    assert!(nll.is_finite() && e.experts < 0.3, "{e:?}");
    // More data, smaller error (same seed family).
    let (x2, y2) = sample(&t, GateKind::Tanh, 300, 3);
    let e2 = errors(GateKind::Tanh, &fit(&c, GateKind::Tanh, &x2, &y2, 3).unwrap().0, &t);
    assert!(e.total < e2.total, "n 3000 {e:?} vs n 300 {e2:?}");
}

#[test]
fn slope_of_a_power_law_is_its_exponent() {
    let pts: Vec<(f64, f64)> = [100.0, 1000.0, 10000.0].iter().map(|&n: &f64| (n, 3.0 * n.powf(-0.5))).collect();
    assert!((log_log_slope(&pts) + 0.5).abs() < 1e-12);
    assert!(log_log_slope(&pts[..1]).is_nan());
}

#[test]
fn bad_configs_name_the_field() {
    let mut c = cfg();
    c.experts[1].sigma = 0.0;
    assert!(c.check().unwrap_err().contains("experts[1].sigma"));
    let mut c = cfg();
    c.experts.truncate(1);
    assert!(c.check().unwrap_err().contains("experts"));
    let mut c = cfg();
    c.sample_sizes = vec![1];
    assert!(c.check().unwrap_err().contains("sample_sizes"));
    let e = toml::from_str::<GateStatsConfig>("experiment = \"t\"\nseeds = 1").unwrap_err().to_string();
    assert!(e.contains("seeds"), "{e}");
    assert!(toml::from_str::<GateStatsConfig>(&format!("{}\ngates = [\"relu\"]", "")).is_err());
}
