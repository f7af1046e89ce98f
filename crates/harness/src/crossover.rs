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

/// One benchmarked model: its label and rows by sequence length. Benches that share a label (the
/// rounds of one variant, e.g. scripts/moe-bench.sh's `<variant>-r<round>.json`) are one model
/// whose rows hold, per numeric key, the median over the rounds, with the range under
/// `<key>:min` and `<key>:max`.
struct Model {
    label: String,
    rounds: usize,
    rows: Vec<Value>,
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The rows of several rounds at one sequence length folded into one: a numeric key equal in every
/// round as it is, one that differs by its median with the range beside it; other keys from the
/// first round that has them.
fn fold_rounds(rows: &[&Value]) -> Value {
    let mut out = serde_json::Map::new();
    for r in rows {
        for (k, v) in r.as_object().into_iter().flatten() {
            if v.is_number() || out.contains_key(k) {
                continue;
            }
            out.insert(k.clone(), v.clone());
        }
    }
    let keys: std::collections::BTreeSet<&String> =
        rows.iter().flat_map(|r| r.as_object().into_iter().flatten()).filter(|(_, v)| v.is_number()).map(|(k, _)| k).collect();
    for k in keys {
        let vals: Vec<&Value> = rows.iter().map(|r| &r[k.as_str()]).filter(|v| v.is_number()).collect();
        // Equal in every round (seq_len, batch, byte counts): kept as it is, integers included.
        if vals.iter().all(|v| *v == vals[0]) {
            out.insert(k.clone(), vals[0].clone());
            continue;
        }
        let mut xs: Vec<f64> = vals.iter().filter_map(|v| v.as_f64()).collect();
        let (lo, hi) = xs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        out.insert(k.clone(), serde_json::json!(median(&mut xs)));
        out.insert(format!("{k}:min"), serde_json::json!(lo));
        out.insert(format!("{k}:max"), serde_json::json!(hi));
    }
    Value::Object(out)
}

fn batch_of(b: &BenchResult) -> Option<u64> {
    b.rows.first().and_then(|r| r["batch"].as_u64())
}

/// Whether the benches were run at more than one batch size.
fn batches_differ(benches: &[BenchResult]) -> bool {
    benches.iter().any(|b| batch_of(b) != batch_of(&benches[0]))
}

/// The column a bench belongs to: its label (the sweep run's, or its layers). A folder may hold
/// benches of several configs (scripts/ab-builds-bench.sh), whose labels can coincide ("default"
/// for any config without a sweep): the experiment then names the column, and the batch where
/// the benches' batches differ, so that no two models fold into one median.
fn model_label(b: &BenchResult, experiments_differ: bool, batches_differ: bool) -> String {
    let mut label = b.label.clone().unwrap_or_else(|| b.layers.clone());
    if experiments_differ {
        label = if label == "default" { b.experiment.clone() } else { format!("{}: {label}", b.experiment) };
    }
    if let (true, Some(n)) = (batches_differ, batch_of(b)) {
        label = format!("{label} (B {n})");
    }
    label
}

fn models(benches: &[BenchResult]) -> Vec<Model> {
    let experiments_differ = benches.iter().any(|b| b.experiment != benches[0].experiment);
    let batches_differ = batches_differ(benches);
    let mut groups: Vec<(u64, String, Vec<&BenchResult>)> = Vec::new();
    for b in benches {
        let label = model_label(b, experiments_differ, batches_differ);
        let index = b.plan_index.unwrap_or(u64::MAX);
        match groups.iter_mut().find(|(_, l, _)| *l == label) {
            Some((i, _, bs)) => {
                *i = (*i).min(index);
                bs.push(b);
            }
            None => groups.push((index, label, vec![b])),
        }
    }
    groups.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    groups
        .into_iter()
        .map(|(_, label, bs)| {
            let mut ts: Vec<u64> = bs.iter().flat_map(|b| b.rows.iter().filter_map(|r| r["seq_len"].as_u64())).collect();
            ts.sort_unstable();
            ts.dedup();
            let rows = ts
                .iter()
                .map(|&t| {
                    let at: Vec<&Value> = bs.iter().flat_map(|b| b.rows.iter()).filter(|r| r["seq_len"].as_u64() == Some(t)).collect();
                    fold_rounds(&at)
                })
                .collect();
            Model { label, rounds: bs.len(), rows }
        })
        .collect()
}

fn row(m: &Model, t: u64) -> Option<&Value> {
    m.rows.iter().find(|r| r["seq_len"].as_u64() == Some(t))
}

/// A cell: the value, or the phase's recorded error (OOM shown as such), or a dash.
fn cell(r: Option<&Value>, key: &str, phase: &str, f: &dyn Fn(f64) -> String) -> String {
    let Some(r) = r else { return "–".into() };
    if let Some(x) = r[key].as_f64() {
        return match (r[format!("{key}:min")].as_f64(), r[format!("{key}:max")].as_f64()) {
            (Some(lo), Some(hi)) if f(lo) != f(hi) => format!("{} ({}–{})", f(x), f(lo), f(hi)),
            _ => f(x),
        };
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
    let batch_text = match batches_differ(benches) {
        true => "per model (in its column)".to_string(),
        false => batch_of(first).unwrap_or(1).to_string(),
    };
    let mut experiments: Vec<&str> = benches.iter().map(|b| b.experiment.as_str()).collect();
    experiments.sort_unstable();
    experiments.dedup();
    let mut md = format!(
        "# throughput crossover: {}\n\nDevice: {} ({} threads), dtype {}, batch {batch_text}. Protocol: {}; {}; {}. Memory: {}.\n",
        experiments.join(", "),
        first.env.device.name,
        first.env.device.threads,
        first.env.dtype,
        first.protocol["train_step"].as_str().unwrap_or("?"),
        first.protocol["prefill"].as_str().unwrap_or("?"),
        first.protocol["decode"].as_str().unwrap_or("?"),
        first.protocol["memory"].as_str().unwrap_or("?"),
    );
    let rounds = ms.iter().map(|m| m.rounds).max().unwrap_or(1);
    if rounds > 1 {
        let _ = write!(
            md,
            "\nEach model ran in up to {rounds} rounds (benches with the same label): cells give the median over the rounds, with the range in parentheses where the rounds differ.\n"
        );
    }
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
    // Speed against the same baseline at each T, from the (median) times: > 1 is faster.
    if let Some(base) = base {
        let _ = write!(
            md,
            "\n## speed relative to `{}`\n\nBaseline time over model time for the train step and prefill, model tokens/s over baseline tokens/s for decode (> 1: faster than the baseline).\n\n| model | T | train | prefill | decode |\n|---|---|---|---|---|\n",
            base.label
        );
        let ratio = |m: &Model, t: u64, key: &str, time: bool| -> String {
            match (row(m, t).and_then(|r| r[key].as_f64()), row(base, t).and_then(|r| r[key].as_f64())) {
                (Some(a), Some(b)) if a > 0.0 && b > 0.0 => format!("{:.2}", if time { b / a } else { a / b }),
                _ => "–".into(),
            }
        };
        for m in ms.iter().filter(|m| !std::ptr::eq(*m, base)) {
            for &t in &ts {
                let _ = writeln!(
                    md,
                    "| {} | {t} | {} | {} | {} |",
                    m.label,
                    ratio(m, t, "train_step_s", true),
                    ratio(m, t, "prefill_s", true),
                    ratio(m, t, "decode_tokens_per_s", false)
                );
            }
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
                        // Per token of the row's own batch (a folder may mix batch sizes).
                        let batch = r["batch"].as_f64().unwrap_or(1.0);
                        Some((t, if per_token { v / (t * batch) * 1e6 } else { v }))
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
        let base = Model { label: "transformer".into(), rounds: 1, rows: base_rows.to_vec() };
        let lin = Model { label: "linear".into(), rounds: 1, rows: lin_rows.to_vec() };
        let ts = [512, 1024, 2048, 4096];
        assert_eq!(crossover(&lin, &base, "train_step_s", &ts), Some(2048));
        assert_eq!(crossover(&base, &lin, "train_step_s", &ts), None);
        assert_eq!(cell(row(&base, 4096), "train_step_s", "train", &|x| x.to_string()), "OOM");
    }

    /// Two configs without a sweep are both labelled "default": in one folder they are two
    /// columns, named by experiment (and batch, where it differs), not one median of both.
    #[test]
    fn benches_of_different_configs_are_different_models() -> anyhow::Result<()> {
        let bench = |exp: &str, batch: u64, step: f64| -> anyhow::Result<BenchResult> {
            let env = crate::schema::EnvRecord {
                git: json!({"sha": "x", "dirty": false}),
                versions: Default::default(),
                device: crate::schema::DeviceRecord {
                    kind: "cpu".into(),
                    name: "cpu".into(),
                    threads: 2,
                    concurrent_runs: None,
                    world_size: None,
                    extra: Default::default(),
                },
                dtype: "f32".into(),
            };
            Ok(BenchResult {
                schema: "zoo.bench/1".into(),
                experiment: exp.into(),
                label: Some("default".into()),
                plan_index: Some(0),
                config: json!({}),
                layers: "attention".into(),
                env,
                params: json!({}),
                protocol: json!({}),
                vocab_size: 8,
                rows: vec![json!({"seq_len": 256, "batch": batch, "train_step_s": step})],
                finished_at: "t".into(),
            })
        };
        let same = [bench("a", 8, 1.0)?, bench("a", 8, 3.0)?];
        let ms = models(&same);
        assert_eq!(ms.len(), 1, "rounds of one config fold");
        assert_eq!((ms[0].label.as_str(), ms[0].rounds), ("default", 2));
        let mixed = [bench("small", 8, 1.0)?, bench("big", 4, 3.0)?, bench("small", 8, 1.2)?];
        let got: Vec<(String, usize)> = models(&mixed).into_iter().map(|m| (m.label, m.rounds)).collect();
        assert_eq!(got, [("big (B 4)".to_string(), 1), ("small (B 8)".to_string(), 2)]);
        Ok(())
    }

    #[test]
    fn rounds_fold_to_medians_with_their_range() {
        let r1 = json!({"seq_len": 128, "batch": 16, "train_step_s": 0.009, "decode_tokens_per_s": 100.0});
        let r2 = json!({"seq_len": 128, "batch": 16, "train_step_s": 0.0066, "decode_error": "x"});
        let r3 = json!({"seq_len": 128, "batch": 16, "train_step_s": 0.0094, "decode_tokens_per_s": 300.0});
        let f = fold_rounds(&[&r1, &r2, &r3]);
        assert_eq!(f["train_step_s"], json!(0.009));
        assert_eq!((f["train_step_s:min"].as_f64(), f["train_step_s:max"].as_f64()), (Some(0.0066), Some(0.0094)));
        // A key some rounds lack: the median of those that have it (two values: their mean).
        assert_eq!(f["decode_tokens_per_s"], json!(200.0));
        assert_eq!(f["decode_error"], json!("x"));
        assert_eq!((f["batch"].as_u64(), f["seq_len"].as_u64()), (Some(16), Some(128)));
        assert!(f.get("batch:min").is_none());
        let ms = |x: f64| format!("{:.1}", x * 1e3);
        assert_eq!(cell(Some(&f), "train_step_s", "train", &ms), "9.0 (6.6–9.4)");
        // One round: the value alone.
        assert_eq!(cell(Some(&fold_rounds(&[&r1])), "train_step_s", "train", &ms), "9.0");
        assert_eq!(median(&mut [3.0, 1.0, 2.0, 10.0]), 2.5);
    }
}
