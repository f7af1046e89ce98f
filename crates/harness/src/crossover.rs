//! The throughput-crossover report (`zoo report` on a folder of `zoo bench` JSONs): per sequence
//! length, train-step and prefill time, peak memory and decode speed of each benchmarked model,
//! the length where each model overtakes the softmax baseline, and whether its per-token cost
//! stays flat as T grows (Lightning Attention-2's claim for linear forms).

use crate::plot::{line_chart_axes, Series};
use crate::schema::BenchResult;
use anyhow::Result;
use serde_json::Value;
use std::fmt::Write;
use std::path::Path;

/// One benchmarked model: its label and rows by sequence length.
struct Model<'a> {
    label: String,
    rows: Vec<&'a Value>,
}

fn models(benches: &[BenchResult]) -> Vec<Model<'_>> {
    let mut ms: Vec<(u64, Model)> = benches
        .iter()
        .map(|b| {
            let label = b.label.clone().unwrap_or_else(|| b.layers.clone());
            let mut rows: Vec<&Value> = b.rows.iter().collect();
            rows.sort_by_key(|r| r["seq_len"].as_u64());
            (b.plan_index.unwrap_or(u64::MAX), Model { label, rows })
        })
        .collect();
    ms.sort_by_key(|(i, m)| (*i, m.label.clone()));
    ms.into_iter().map(|(_, m)| m).collect()
}

fn row<'a>(m: &Model<'a>, t: u64) -> Option<&'a Value> {
    m.rows.iter().copied().find(|r| r["seq_len"].as_u64() == Some(t))
}

/// A cell: the value, or the phase's recorded error (OOM shown as such), or a dash.
fn cell(r: Option<&Value>, key: &str, phase: &str, f: &dyn Fn(f64) -> String) -> String {
    let Some(r) = r else { return "–".into() };
    if let Some(x) = r[key].as_f64() {
        return f(x);
    }
    match r[format!("{phase}_error")].as_str() {
        Some(e) if e.to_lowercase().contains("out of memory") || e.contains("OUT_OF_MEMORY") => "OOM".into(),
        Some(_) => "error".into(),
        None => "–".into(),
    }
}

/// The smallest T from which `m` stays faster than `base` (per `key`, lower is better) at every
/// longer measured length, counting a baseline failure (OOM) as slower.
fn crossover(m: &Model, base: &Model, key: &str, ts: &[u64]) -> Option<u64> {
    let faster = |t: u64| match (row(m, t).and_then(|r| r[key].as_f64()), row(base, t).and_then(|r| r[key].as_f64())) {
        (Some(a), Some(b)) => Some(a < b),
        (Some(_), None) => Some(true),
        (None, _) => None,
    };
    let mut first = None;
    for &t in ts {
        match faster(t) {
            Some(true) => {
                first.get_or_insert(t);
            }
            Some(false) => first = None,
            None => {}
        }
    }
    first
}

pub fn report(dir: &Path, benches: &[BenchResult]) -> Result<String> {
    let ms = models(benches);
    let mut ts: Vec<u64> = ms.iter().flat_map(|m| m.rows.iter().filter_map(|r| r["seq_len"].as_u64())).collect();
    ts.sort_unstable();
    ts.dedup();
    let first = &benches[0];
    let batch = first.rows.first().and_then(|r| r["batch"].as_u64()).unwrap_or(1);
    let mut md = format!(
        "# throughput crossover: {}\n\nDevice: {} ({} threads), dtype {}, batch {batch}. Protocol: {}; {}; {}. Memory: {}.\n",
        first.experiment,
        first.env.device.name,
        first.env.device.threads,
        first.env.dtype,
        first.protocol["train_step"].as_str().unwrap_or("?"),
        first.protocol["prefill"].as_str().unwrap_or("?"),
        first.protocol["decode"].as_str().unwrap_or("?"),
        first.protocol["memory"].as_str().unwrap_or("?"),
    );
    let ms_f = |x: f64| format!("{:.1}", x * 1e3);
    let mib = |x: f64| format!("{:.0}", x / 1048576.0);
    let tok = |x: f64| format!("{x:.0}");
    let kib = |x: f64| format!("{:.0}", x / 1024.0);
    let tables: [(&str, &str, &str, &dyn Fn(f64) -> String); 6] = [
        ("train step (ms)", "train_step_s", "train", &ms_f),
        ("prefill (ms)", "prefill_s", "prefill", &ms_f),
        ("decode tokens/s after a prefill of T", "decode_tokens_per_s", "decode", &tok),
        ("train peak memory (MiB)", "train_peak_bytes", "train", &mib),
        ("prefill peak memory (MiB)", "prefill_peak_bytes", "prefill", &mib),
        ("state / KV cache at T (KiB, whole batch)", "cache_bytes_at_seq_len", "prefill", &kib),
    ];
    for (title, key, phase, f) in tables {
        let _ = write!(md, "\n## {title}\n\n| T |");
        for m in &ms {
            let _ = write!(md, " {} |", m.label);
        }
        let _ = write!(md, "\n|---|{}\n", "---|".repeat(ms.len()));
        for &t in &ts {
            let _ = write!(md, "| {t} |");
            for m in &ms {
                let _ = write!(md, " {} |", cell(row(m, t), key, phase, f));
            }
            md.push('\n');
        }
    }
    // Crossover against the softmax baseline: the label `transformer`, else the first model.
    let base = ms.iter().find(|m| m.label == "transformer").or(ms.first());
    if let Some(base) = base {
        let _ = write!(
            md,
            "\n## crossover vs `{}`\n\nThe shortest T from which the model is faster at every longer measured T (an OOM of the baseline counts as slower); the per-token cost growth is time per token at the longest T over that at the shortest, where both exist (1.0 = flat).\n\n| model | train faster from T | prefill faster from T | train per-token growth | prefill per-token growth |\n|---|---|---|---|---|\n",
            base.label
        );
        for m in ms.iter() {
            let growth = |key: &str| -> String {
                let per = |r: &Value| Some(r[key].as_f64()? / r["seq_len"].as_f64()?);
                let pts: Vec<(u64, f64)> =
                    m.rows.iter().filter_map(|r| Some((r["seq_len"].as_u64()?, per(r)?))).collect();
                match (pts.first(), pts.last()) {
                    (Some(a), Some(b)) if b.0 > a.0 => format!("{:.2} ({}→{})", b.1 / a.1, a.0, b.0),
                    _ => "–".into(),
                }
            };
            let show = |x: Option<u64>| x.map_or("never".into(), |t| t.to_string());
            let (tr, pf) = if std::ptr::eq(m, base) {
                ("–".to_string(), "–".to_string())
            } else {
                (show(crossover(m, base, "train_step_s", &ts)), show(crossover(m, base, "prefill_s", &ts)))
            };
            let _ =
                writeln!(md, "| {} | {tr} | {pf} | {} | {} |", m.label, growth("train_step_s"), growth("prefill_s"));
        }
    }
    let plot = |key: &str, per_token: bool| -> Vec<Series> {
        ms.iter()
            .map(|m| Series {
                name: m.label.clone(),
                points: m
                    .rows
                    .iter()
                    .filter_map(|r| {
                        let t = r["seq_len"].as_f64()?;
                        let v = r[key].as_f64()?;
                        Some((t, if per_token { v / (t * batch as f64) * 1e6 } else { v }))
                    })
                    .collect(),
            })
            .collect()
    };
    let charts = [
        ("prefill_per_token.svg", "prefill time per token", "µs per token", plot("prefill_s", true), true),
        ("train_per_token.svg", "training-step time per token", "µs per token", plot("train_step_s", true), true),
        ("decode.svg", "decode speed after a prefill of T", "tokens/s", plot("decode_tokens_per_s", false), true),
        ("train_memory.svg", "training-step peak memory", "bytes", plot("train_peak_bytes", false), true),
    ];
    for (file, title, ylabel, series, log_y) in charts {
        if series.iter().all(|s| s.points.is_empty()) {
            continue;
        }
        let svg = line_chart_axes(title, "sequence length T (log scale)", ylabel, &series, true, log_y);
        crate::env::write_atomic(&dir.join(file), svg.as_bytes())?;
        let _ = write!(md, "\n![{file}]({file})\n");
    }
    crate::env::write_atomic(&dir.join("report.md"), md.as_bytes())?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn crossover_is_the_first_length_of_a_lasting_win() {
        let base_rows = [
            json!({"seq_len": 512, "train_step_s": 1.0}),
            json!({"seq_len": 1024, "train_step_s": 2.0}),
            json!({"seq_len": 2048, "train_step_s": 3.0}),
            json!({"seq_len": 4096, "train_error": "out of memory"}),
        ];
        let lin_rows = [
            json!({"seq_len": 512, "train_step_s": 0.5}),  // faster, but not lasting
            json!({"seq_len": 1024, "train_step_s": 2.5}), // slower
            json!({"seq_len": 2048, "train_step_s": 2.9}), // faster from here on
            json!({"seq_len": 4096, "train_step_s": 6.0}), // baseline OOM counts as slower
        ];
        let base = Model { label: "transformer".into(), rows: base_rows.iter().collect() };
        let lin = Model { label: "linear".into(), rows: lin_rows.iter().collect() };
        let ts = [512, 1024, 2048, 4096];
        assert_eq!(crossover(&lin, &base, "train_step_s", &ts), Some(2048));
        assert_eq!(crossover(&base, &lin, "train_step_s", &ts), None);
        assert_eq!(cell(row(&base, 4096), "train_step_s", "train", &|x| x.to_string()), "OOM");
    }
}
