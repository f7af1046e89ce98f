//! `zoo report`: results folder → markdown table (mean ± std over seeds, best over learning rates).

use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

pub fn load_results(dir: &Path) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut entries: Vec<_> =
        std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            let v: Value =
                serde_json::from_slice(&std::fs::read(&p)?).with_context(|| format!("parsing {}", p.display()))?;
            if v.get("schema").and_then(|s| s.as_str()) == Some("zoo.result/1") {
                out.push(v);
            }
        }
    }
    out.sort_by_key(|v| v["plan_index"].as_u64().unwrap_or(u64::MAX));
    Ok(out)
}

/// Mean and sample standard deviation.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let s = if xs.len() > 1 { (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (m, s)
}

fn metric(v: &Value, key: &str) -> Option<f64> {
    v["metrics"].get(key).and_then(|x| x.as_f64())
}

fn fmt_ms(xs: &[f64]) -> String {
    if xs.is_empty() {
        return "–".into();
    }
    let (m, s) = mean_std(xs);
    let digits = if m.abs() >= 100.0 {
        1
    } else if m.abs() >= 1.0 {
        3
    } else {
        4
    };
    if xs.len() > 1 {
        format!("{m:.digits$} ± {s:.digits$}")
    } else {
        format!("{m:.digits$}")
    }
}

/// The markdown table for a set of results.
pub fn table(results: &[Value]) -> String {
    // Is this a recall task (maximise accuracy) or LM (minimise loss)?
    let recall = results.iter().any(|r| metric(r, "mqar_acc,none").is_some());
    let primary = if recall { "mqar_acc,none" } else { "val_loss,best" };
    let better = |a: f64, b: f64| if recall { a > b } else { a < b };
    // label -> lr -> runs
    let mut groups: BTreeMap<String, BTreeMap<String, Vec<&Value>>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for r in results {
        let label = r["label"].as_str().unwrap_or("?").to_string();
        if !groups.contains_key(&label) {
            order.push(label.clone());
        }
        groups.entry(label).or_default().entry(format!("{}", r["lr"])).or_default().push(r);
    }
    let mut metric_keys: Vec<String> = results
        .iter()
        .flat_map(|r| r["metrics"].as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()).unwrap_or_default())
        .filter(|k| k != "eval_tokens")
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    // Primary metric first.
    metric_keys.sort_by_key(|k| (k != primary, k.clone()));
    let mut head = vec!["run".to_string(), "params".into(), "seeds".into(), "lr".into()];
    head.extend(metric_keys.iter().cloned());
    head.push("train tok/s".into());
    let mut out = String::new();
    out.push_str(&format!("| {} |\n", head.join(" | ")));
    out.push_str(&format!("|{}\n", head.iter().map(|_| "---|").collect::<String>()));
    for label in order {
        let by_lr = &groups[&label];
        let lr_count = by_lr.len();
        // Best LR by mean primary metric.
        let (best_lr, runs) = by_lr
            .iter()
            .map(|(lr, runs)| {
                let xs: Vec<f64> = runs.iter().filter_map(|r| metric(r, primary)).collect();
                (lr, runs, if xs.is_empty() { f64::NAN } else { mean_std(&xs).0 })
            })
            .fold(None::<(&String, &Vec<&Value>, f64)>, |acc, cur| match acc {
                None => Some(cur),
                Some(a) if cur.2.is_nan() || (!a.2.is_nan() && !better(cur.2, a.2)) => Some(a),
                Some(_) => Some(cur),
            })
            .map(|(lr, runs, _)| (lr.clone(), runs.clone()))
            .unwrap();
        let params = runs[0]["params"]["total"].as_u64().unwrap_or(0);
        let mut row = vec![
            label.clone(),
            human(params),
            runs.len().to_string(),
            if lr_count > 1 { format!("{best_lr} (best of {lr_count})") } else { best_lr },
        ];
        for k in &metric_keys {
            let xs: Vec<f64> = runs.iter().filter_map(|r| metric(r, k)).collect();
            row.push(fmt_ms(&xs));
        }
        let tps: Vec<f64> = runs.iter().filter_map(|r| r["throughput"]["train_tokens_per_s"].as_f64()).collect();
        row.push(if tps.is_empty() { "–".into() } else { format!("{:.0}", mean_std(&tps).0) });
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    if let Some(r) = results.first() {
        out.push_str(&format!(
            "\nDevice: {} ({} threads), dtype {}. Mean ± sample std over seeds; with several learning rates, the best by mean `{primary}`.\n",
            r["env"]["device"]["name"].as_str().unwrap_or("?"),
            r["env"]["device"]["threads"],
            r["env"]["dtype"].as_str().unwrap_or("?")
        ));
    }
    out
}

fn human(n: u64) -> String {
    if n >= 1_000_000 {
        format!("{:.2}M", n as f64 / 1e6)
    } else if n >= 1000 {
        format!("{:.1}k", n as f64 / 1e3)
    } else {
        n.to_string()
    }
}

/// Print the table for a results folder and write it to `report.md` inside it.
pub fn report(dir: &Path) -> Result<String> {
    let results = load_results(dir)?;
    anyhow::ensure!(!results.is_empty(), "no result JSON in {}", dir.display());
    let name = results[0]["experiment"].as_str().unwrap_or("results").to_string();
    let md = format!("# {name}\n\n{}", table(&results));
    crate::env::write_atomic(&dir.join("report.md"), md.as_bytes())?;
    Ok(md)
}
