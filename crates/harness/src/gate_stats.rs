//! `zoo gate-stats CONFIG`: issue 14's synthetic study of the temperature against the activation
//! gate ([`zoo_moe::gate_stats`]): for every gate, sample size and replicate, sample a data set
//! from the true mixture, fit it by maximum likelihood and record the parameter errors; the JSON
//! (schema `zoo.gate-stats/1`) is rewritten whole after every sample size, marked complete at the
//! end, so a killed run keeps what it finished. `zoo report` tabulates it with the fitted
//! log-log slopes and plots error against n.

use crate::env::{write_atomic, Env};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use zoo_moe::gate_stats::{errors, fit, log_log_slope, sample, GateStatsConfig, Params};

pub fn load(path: &Path) -> Result<GateStatsConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: GateStatsConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("in config {}: {e}", path.display()))?;
    cfg.check().map_err(|e| anyhow::anyhow!("in config {}: {e}", path.display()))?;
    Ok(cfg)
}

/// Mean error per (gate, n) for one error kind, and the slope of its log-log fit per gate.
pub fn slopes(rows: &[Value], kind: &str) -> Vec<(String, f64, Vec<(f64, f64)>)> {
    let mut gates: Vec<String> = Vec::new();
    for r in rows {
        let g = r["gate"].as_str().unwrap_or("?").to_string();
        if !gates.contains(&g) {
            gates.push(g);
        }
    }
    gates
        .into_iter()
        .map(|g| {
            let mut ns: Vec<u64> = rows.iter().filter(|r| r["gate"] == g.as_str()).filter_map(|r| r["n"].as_u64()).collect();
            ns.sort();
            ns.dedup();
            let points: Vec<(f64, f64)> = ns
                .iter()
                .map(|&n| {
                    let e: Vec<f64> = rows.iter().filter(|r| r["gate"] == g.as_str() && r["n"] == n).filter_map(|r| r["errors"][kind].as_f64()).collect();
                    (n as f64, e.iter().sum::<f64>() / e.len().max(1) as f64)
                })
                .collect();
            (g, log_log_slope(&points), points)
        })
        .collect()
}

pub fn run(config: &Path, results_dir: &Path, env: &Env) -> Result<PathBuf> {
    let cfg = load(config)?;
    let truth = Params::truth(&cfg);
    let dir = results_dir.join(&cfg.experiment);
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("gate-stats.json");
    let mut rows: Vec<Value> = Vec::new();
    let started = std::time::Instant::now();
    let write = |rows: &[Value], complete: bool| -> Result<()> {
        let slope = |kind: &str| -> Value {
            slopes(rows, kind).into_iter().map(|(g, s, _)| (g, json!(if s.is_finite() { Some(s) } else { None }))).collect::<serde_json::Map<_, _>>().into()
        };
        let j = json!({
            "schema": crate::schema::GATE_STATS_SCHEMA,
            "experiment": cfg.experiment,
            "description": cfg.description,
            "config": cfg,
            "truth": truth,
            "complete": complete,
            "rows": rows,
            "slopes": { "total": slope("total"), "gate": slope("gate"), "experts": slope("experts") },
            "wall_seconds": started.elapsed().as_secs_f64(),
            "env": env.record(),
        });
        write_atomic(&out, serde_json::to_string_pretty(&j)?.as_bytes())
    };
    for (gi, &gate) in cfg.gates.iter().enumerate() {
        for &n in &cfg.sample_sizes {
            for r in 0..cfg.replicates {
                let seed = cfg.seed.wrapping_mul(1_000_003).wrapping_add((gi as u64) << 40 ^ (n as u64) << 8 ^ r as u64);
                let (x, y) = sample(&truth, gate, n, seed);
                let t = std::time::Instant::now();
                let (p, nll) = fit(&cfg, gate, &x, &y, seed)?;
                let e = errors(gate, &p, &truth);
                eprintln!(
                    "gate-stats: {} n = {n} replicate {r}: error {:.4} (gate {:.4}, experts {:.4}), nll {nll:.4}, {:.1} s",
                    gate.name(),
                    e.total,
                    e.gate,
                    e.experts,
                    t.elapsed().as_secs_f64()
                );
                rows.push(json!({ "gate": gate.name(), "n": n, "replicate": r, "nll": nll, "errors": e, "fit": p }));
            }
            write(&rows, false)?;
        }
    }
    write(&rows, true)?;
    Ok(out)
}
