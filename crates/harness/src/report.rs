//! `zoo report`: results folder → markdown table (mean ± std over seeds, best over learning rates).

use crate::schema::{RunResult, BENCH_SCHEMA, DUO_SCHEMA, GATE_STATS_SCHEMA, GENERATE_SCHEMA, KIVI_SCHEMA, NEEDLE_SCHEMA, PRESS_SCHEMA, RESULT_SCHEMA};
use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Every run result (`zoo.result/1`) in `dir`, in plan order; a file that is not valid JSON or not
/// a readable result is skipped with a warning naming it.
pub fn load_results(dir: &Path) -> Result<Vec<RunResult>> {
    let mut out: Vec<(std::path::PathBuf, RunResult)> = Vec::new();
    for (path, v) in load_schema_paths(dir, RESULT_SCHEMA)? {
        match crate::schema::parse_run(v, &path) {
            Ok(r) => out.push((path, r)),
            Err(e) => eprintln!("warning: skipping {e:#}"),
        }
    }
    // A result copied in from another experiment is not merged: the folder's experiment is the one
    // named by its folder, else by most of its results.
    let folder = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, r) in &out {
        *counts.entry(r.experiment.as_str()).or_default() += 1;
    }
    let own = if counts.contains_key(folder.as_str()) {
        folder.clone()
    } else {
        counts.iter().max_by_key(|(_, n)| **n).map(|(e, _)| e.to_string()).unwrap_or_default()
    };
    Ok(out
        .into_iter()
        .filter_map(|(path, r)| {
            if r.experiment == own {
                Some(r)
            } else {
                eprintln!(
                    "warning: skipping {}: it belongs to experiment `{}`, not `{own}`",
                    path.display(),
                    r.experiment
                );
                None
            }
        })
        .collect())
}

/// Every JSON in `dir` whose `schema` is `schema`, with its path, in plan order.
fn load_schema_paths(dir: &Path, schema: &str) -> Result<Vec<(std::path::PathBuf, Value)>> {
    let mut out = Vec::new();
    let mut entries: Vec<_> =
        std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            let v: Value = match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(e) => {
                    // A truncated or garbled file (a kill mid-copy) must not block the report.
                    eprintln!("warning: skipping {}: not valid JSON ({e})", p.display());
                    continue;
                }
            };
            if v.get("schema").and_then(|s| s.as_str()) == Some(schema) {
                out.push((p, v));
            }
        }
    }
    out.sort_by_key(|(_, v)| v["plan_index"].as_u64().unwrap_or(u64::MAX));
    Ok(out)
}

/// Mean and sample standard deviation.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let s = if xs.len() > 1 { (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (m, s)
}

fn metric(v: &RunResult, key: &str) -> Option<f64> {
    v.metric(key)
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

/// One row of the table: a run label at its best learning rate.
struct Group<'a> {
    label: String,
    best_lr: String,
    lr_count: usize,
    runs: Vec<&'a RunResult>,
}

/// One column of the table: its header and how a row's cell is computed.
struct Column<'a> {
    head: String,
    cell: Box<dyn Fn(&Group) -> String + 'a>,
}

impl<'a> Column<'a> {
    fn new(head: impl Into<String>, cell: impl Fn(&Group) -> String + 'a) -> Self {
        Self { head: head.into(), cell: Box::new(cell) }
    }
}

/// Mean ± std over a row's runs of one number per run; where only some of the row's runs have the
/// number (results written before a metric existed), the cell says how many: "0.0000 (1 of 3)".
fn over_runs<'a>(head: impl Into<String>, f: impl Fn(&RunResult) -> Option<f64> + 'a) -> Column<'a> {
    Column::new(head, move |g: &Group| {
        let xs: Vec<f64> = g.runs.iter().filter_map(|r| f(r)).collect();
        let cell = fmt_ms(&xs);
        if !xs.is_empty() && xs.len() < g.runs.len() {
            format!("{cell} ({} of {})", xs.len(), g.runs.len())
        } else {
            cell
        }
    })
}

/// The table's columns for these results: identity, every metric (primary first), the p-value
/// against a `baseline` label, probes, gate statistics, state size and throughput, each only where
/// some result has it.
fn columns<'a>(results: &'a [RunResult], primary: &'static str, baseline: Option<Vec<f64>>) -> Vec<Column<'a>> {
    let mut metric_keys: Vec<String> = results
        .iter()
        .flat_map(|r| r.metrics.keys().cloned())
        .filter(|k| k != "eval_tokens")
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    // Uninformative columns: divergence when nothing diverged; the old `loss_spikes` (1.5 × the
    // running minimum: it counted most steps of converged recall runs) is never shown. Its
    // replacement is `loss_spikes,robust` (zoo_core::spikes); results written before it show "–".
    let all_zero = |k: &str| results.iter().all(|r| metric(r, k).is_none_or(|v| v == 0.0));
    metric_keys.retain(|k| !(k == "diverged" && all_zero(k)) && k != "loss_spikes");
    // Primary metric first.
    metric_keys.sort_by_key(|k| (k != primary, k.clone()));
    let mut cols = vec![
        Column::new("run", |g: &Group| g.label.clone()),
        Column::new("params", |g: &Group| human(g.runs[0].params.total)),
        Column::new("seeds", |g: &Group| g.runs.len().to_string()),
        Column::new("lr", |g: &Group| {
            if g.lr_count > 1 {
                format!("{} (best of {})", g.best_lr, g.lr_count)
            } else {
                g.best_lr.clone()
            }
        }),
    ];
    for k in metric_keys {
        cols.push(over_runs(k.clone(), move |r| metric(r, &k)));
    }
    if let Some(base) = baseline {
        cols.push(Column::new(format!("p vs baseline ({primary})"), move |g: &Group| {
            let xs: Vec<f64> = g.runs.iter().filter_map(|r| metric(r, primary)).collect();
            match crate::stats::welch_p(&xs, &base) {
                Some(p) if g.label != "baseline" => format!("{p:.3}"),
                _ => "–".into(),
            }
        }));
    }
    if results.iter().any(|r| r.probes.is_some()) {
        cols.push(over_runs("first-token share", |r| layer_mean(&r.probes.as_ref()?.first_token_share)));
        cols.push(over_runs("max abs act", |r| {
            Some(r.probes.as_ref()?.max_abs_activation.iter().copied().fold(f64::NAN, f64::max))
        }));
    }
    if results.iter().any(|r| r.probe_stat("gate_mean").is_some()) {
        cols.push(over_runs("gate mean", |r| r.probe_stat("gate_mean")));
        cols.push(over_runs("gate < 0.1", |r| r.probe_stat("gate_frac_below_0.1")));
    }
    // Routing statistics (MoE feed-forwards, mixture-of-head attention): load balance and drops at
    // the last evaluation, active experts in the last training step.
    if results.iter().any(|r| r.probe_stat("load_cv").is_some()) {
        cols.push(over_runs("load cv", |r| r.probe_stat("load_cv")));
        cols.push(over_runs("max/mean load", |r| r.probe_stat("max_load")));
        cols.push(over_runs("dropped", |r| r.probe_stat("dropped_fraction")));
        cols.push(over_runs("active experts (train)", |r| r.train_stat("active_experts")));
    }
    if results.iter().any(|r| r.probe_stat("head_load_cv").is_some()) {
        cols.push(over_runs("head load cv", |r| r.probe_stat("head_load_cv")));
    }
    if results.iter().any(|r| !r.state_bytes.is_empty()) {
        for t in ["256", "4096"] {
            cols.push(Column::new(format!("state @T={t}"), move |g: &Group| {
                g.runs[0].state_bytes.get(t).copied().map_or("–".into(), bytes)
            }));
        }
    }
    cols.push(Column::new("train tok/s", |g: &Group| {
        let tps: Vec<f64> = g.runs.iter().map(|r| r.throughput.train_tokens_per_s).collect();
        match (tps.is_empty(), g.runs.iter().any(|r| r.shared_device())) {
            (true, _) => "–".into(),
            (false, false) => format!("{:.0}", mean_std(&tps).0),
            (false, true) => format!("({:.0})", mean_std(&tps).0),
        }
    }));
    cols
}

/// The markdown table for a set of results.
pub fn table(results: &[RunResult]) -> String {
    let (primary, recall) = objective(results);
    let better = |a: f64, b: f64| if recall { a > b } else { a < b };
    let best = best_runs(results, primary, &better);
    let baseline: Option<Vec<f64>> = best
        .iter()
        .find(|(label, _, _)| label == "baseline")
        .map(|(_, _, runs)| runs.iter().filter_map(|r| metric(r, primary)).collect());
    let cols = columns(results, primary, baseline);
    let mut out = String::new();
    out.push_str(&format!("| {} |\n", cols.iter().map(|c| c.head.as_str()).collect::<Vec<_>>().join(" | ")));
    out.push_str(&format!("|{}\n", cols.iter().map(|_| "---|").collect::<String>()));
    for (label, best_lr, runs) in best {
        let lr_count = results
            .iter()
            .filter(|r| r.label == label)
            .map(|r| r.lr_text())
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let g = Group { label, best_lr, lr_count, runs };
        let row: Vec<String> = cols.iter().map(|c| (c.cell)(&g)).collect();
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    if let Some(r) = results.first() {
        out.push_str(&format!(
            "\n{}, dtype {}. Mean ± sample std over seeds; with several learning rates, the best by mean `{primary}`.\n",
            devices_text(results),
            r.env.dtype
        ));
    }
    if results.iter().any(|r| r.shared_device()) {
        out.push_str("Train tok/s in parentheses: runs that shared the device with other runs (`concurrent_runs` in their JSON), so not a throughput measurement; use `zoo bench` for that.\n");
    }
    out
}

/// "Device: NAME (N threads)" when every run had the same device, else each device with its run
/// count, so a grid finished over several machines says so.
fn devices_text(results: &[RunResult]) -> String {
    let mut by_device: std::collections::BTreeMap<String, usize> = Default::default();
    for r in results {
        *by_device.entry(format!("{} ({} threads)", r.env.device.name, r.env.device.threads)).or_default() += 1;
    }
    if by_device.len() == 1 {
        return format!("Device: {}", by_device.keys().next().unwrap());
    }
    let mut by_name: std::collections::BTreeMap<&str, usize> = Default::default();
    for r in results {
        *by_name.entry(r.env.device.name.as_str()).or_default() += 1;
    }
    if by_name.len() == 1 {
        return format!("Device: {}", by_name.keys().next().unwrap());
    }
    let parts: Vec<String> = by_name.iter().map(|(name, n)| format!("{name} ({n} run{})", if *n == 1 { "" } else { "s" })).collect();
    format!("Devices: {}", parts.join(", "))
}

/// The metric that picks the best learning rate, and whether higher is better: MQAR accuracy for
/// recall tasks, else the best validation loss.
fn objective(results: &[RunResult]) -> (&'static str, bool) {
    let recall = results.iter().any(|r| metric(r, "mqar_acc,none").is_some());
    (if recall { "mqar_acc,none" } else { "val_loss,best" }, recall)
}

/// Per label (in plan order): the best learning rate by mean `primary`, and its runs.
fn best_runs<'a>(
    results: &'a [RunResult],
    primary: &str,
    better: &dyn Fn(f64, f64) -> bool,
) -> Vec<(String, String, Vec<&'a RunResult>)> {
    let mut groups: BTreeMap<String, BTreeMap<String, Vec<&RunResult>>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for r in results {
        let label = r.label.clone();
        if !groups.contains_key(&label) {
            order.push(label.clone());
        }
        groups.entry(label).or_default().entry(r.lr_text()).or_default().push(r);
    }
    order
        .into_iter()
        .map(|label| {
            let (lr, runs) = groups[&label]
                .iter()
                .map(|(lr, runs)| {
                    let xs: Vec<f64> = runs.iter().filter_map(|r| metric(r, primary)).collect();
                    (lr, runs, if xs.is_empty() { f64::NAN } else { mean_std(&xs).0 })
                })
                .fold(None::<(&String, &Vec<&RunResult>, f64)>, |acc, cur| match acc {
                    None => Some(cur),
                    Some(a) if cur.2.is_nan() || (!a.2.is_nan() && !better(cur.2, a.2)) => Some(a),
                    Some(_) => Some(cur),
                })
                .map(|(lr, runs, _)| (lr.clone(), runs.clone()))
                .unwrap();
            (label, lr, runs)
        })
        .collect()
}

/// Mean over the layers that have a value (attention layers for sink shares).
fn layer_mean(v: &[Option<f64>]) -> Option<f64> {
    let xs: Vec<f64> = v.iter().flatten().copied().collect();
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// The mean over runs of each run's (x, y) points, per x (to 1e-3), in x order.
fn mean_by(runs: &[&RunResult], pts: &dyn Fn(&RunResult) -> Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    let mut acc: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for r in runs {
        for (x, y) in pts(r) {
            acc.entry((x * 1000.0) as i64).or_default().push(y);
        }
    }
    acc.into_iter().map(|(x, ys)| (x as f64 / 1000.0, ys.iter().sum::<f64>() / ys.len() as f64)).collect()
}

/// SVG plots: validation loss against step, and the per-layer first-token attention share,
/// one line per run label (mean over seeds, at the best learning rate).
pub fn plots(results: &[RunResult]) -> Vec<(String, String)> {
    use crate::plot::{line_chart, Series};
    let (primary, recall) = objective(results);
    let better = |a: f64, b: f64| if recall { a > b } else { a < b };
    let best = best_runs(results, primary, &better);
    let curve = |r: &RunResult| -> Vec<(f64, f64)> {
        r.curve.iter().filter_map(|c| Some((c.step as f64, c.val_loss?))).collect()
    };
    let sink = |r: &RunResult| -> Vec<(f64, f64)> {
        let shares = r.probes.as_ref().map(|p| p.first_token_share.as_slice()).unwrap_or_default();
        shares.iter().enumerate().filter_map(|(i, v)| Some((i as f64, (*v)?))).collect()
    };
    let mut out = Vec::new();
    let loss: Vec<Series> =
        best.iter().map(|(l, _, runs)| Series { name: l.clone(), points: mean_by(runs, &curve) }).collect();
    out.push(("loss.svg".to_string(), line_chart("validation loss", "step", "val loss (nats/token)", &loss, false)));
    let sinks: Vec<Series> = best
        .iter()
        .map(|(l, _, runs)| Series { name: l.clone(), points: mean_by(runs, &sink) })
        .filter(|s| !s.points.is_empty())
        .collect();
    if !sinks.is_empty() {
        out.push((
            "first_token_share.svg".to_string(),
            line_chart("attention on the first token", "layer", "mean attention share", &sinks, false),
        ));
    }
    out.extend(recall_vs_state(&best));
    out.extend(moe_plots(&best));
    out
}

/// MoE routing over training, for runs whose feed-forwards report a per-expert `load`:
/// `moe_load.svg`, a heatmap per variant (rows: layer × expert, columns: the curve's steps; a
/// cell is the expert's share of its layer's assignments times E, so 1 is balanced), from the
/// variant's lowest seed (expert indices mean nothing across seeds); and `moe_active_experts.svg`,
/// experts in use per token (mean over layers, then seeds) against step.
fn moe_plots(best: &[(String, String, Vec<&RunResult>)]) -> Vec<(String, String)> {
    use crate::plot::{heatmaps, line_chart, HeatPanel, Series};
    use zoo_core::mixer::StatShape;
    let mut panels = Vec::new();
    let mut active = Vec::new();
    for (label, _, runs) in best {
        let Some(r) = runs.iter().min_by_key(|r| r.seed) else { continue };
        let pts: Vec<_> = r.curve.iter().filter_map(|c| Some((c.step as f64, c.stats.as_ref()?))).collect();
        let loads = |layers: &Vec<BTreeMap<String, zoo_core::mixer::StatValue>>| -> Vec<Vec<f64>> {
            layers
                .iter()
                .filter_map(|m| m.get("load").filter(|v| v.shape == StatShape::PerExpert).map(|v| v.values.clone()))
                .collect()
        };
        let Some(first) = pts.first().map(|(_, l)| loads(l)).filter(|l| !l.is_empty()) else { continue };
        let e = first[0].len();
        let mut values = vec![Vec::new(); first.len() * e];
        for (_, layers) in &pts {
            for (li, load) in loads(layers).iter().enumerate().take(first.len()) {
                for (j, v) in load.iter().enumerate().take(e) {
                    values[li * e + j].push(v * e as f64);
                }
            }
        }
        panels.push(HeatPanel { title: label.clone(), cols: pts.iter().map(|p| p.0).collect(), values, group: e });
        let mean_active = |r: &RunResult| -> Vec<(f64, f64)> {
            r.curve
                .iter()
                .filter_map(|c| {
                    let a: Vec<f64> = c.stats.as_ref()?.iter().filter_map(|m| m.get("active_experts")?.values.first().copied()).collect();
                    (!a.is_empty()).then(|| (c.step as f64, a.iter().sum::<f64>() / a.len() as f64))
                })
                .collect()
        };
        let points = mean_by(runs, &mean_active);
        if !points.is_empty() {
            active.push(Series { name: label.clone(), points });
        }
    }
    if panels.is_empty() {
        return Vec::new();
    }
    let note = "rows: layer × expert (lines between layers); cell: the expert's share of assignments × E (white 0, dark red ≥ 3; 1 = balanced)";
    let mut out = vec![("moe_load.svg".to_string(), heatmaps("expert load over training", "layer × expert", "step", note, &panels, 3.0, 4))];
    if !active.is_empty() {
        out.push(("moe_active_experts.svg".to_string(), line_chart("experts in use per token", "step", "active experts (mean over layers)", &active, false)));
    }
    out
}

/// Zoology's figure: per MQAR test point, accuracy against the state size (bytes of recurrent
/// state or KV cache for one sequence at that point's length, log scale), one line per variant
/// through its model widths (the labels of that variant, each at its best learning rate).
fn recall_vs_state(best: &[(String, String, Vec<&RunResult>)]) -> Vec<(String, String)> {
    use crate::plot::{line_chart_axes, Series};
    let points: std::collections::BTreeSet<String> = best
        .iter()
        .flat_map(|(_, _, runs)| runs.iter())
        .flat_map(|r| r.metrics.keys().cloned())
        .filter(|k| k.starts_with("mqar_acc,T="))
        .collect();
    let mut out = Vec::new();
    for key in points {
        let Some((t, kv)) = key.trim_start_matches("mqar_acc,T=").split_once(",kv=") else { continue };
        let mut by_variant: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        for (_, _, runs) in best {
            let variant = runs[0].variant.clone();
            let Some(state) = runs[0].state_bytes.get(t).map(|&b| b as f64) else { continue };
            let accs: Vec<f64> = runs.iter().filter_map(|r| metric(r, &key)).collect();
            if accs.is_empty() {
                continue;
            }
            if !by_variant.contains_key(&variant) {
                order.push(variant.clone());
            }
            by_variant.entry(variant).or_default().push((state, mean_std(&accs).0));
        }
        if by_variant.len() < 2 && by_variant.values().all(|p| p.len() < 2) {
            continue;
        }
        let series: Vec<Series> = order
            .into_iter()
            .map(|v| {
                let mut pts = by_variant.remove(&v).unwrap_or_default();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series { name: v, points: pts }
            })
            .collect();
        out.push((
            format!("mqar_state_T{t}_kv{kv}.svg"),
            line_chart_axes(
                &format!("MQAR recall vs state size (T = {t}, {kv} kv pairs)"),
                "state bytes per sequence (log scale)",
                "accuracy",
                &series,
                true,
                false,
            ),
        ));
    }
    out
}

/// Bytes in binary units.
fn bytes(n: u64) -> String {
    let x = n as f64;
    if x >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", x / (1024.0 * 1024.0))
    } else if x >= 1024.0 {
        format!("{:.1} KiB", x / 1024.0)
    } else {
        format!("{n} B")
    }
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

/// Print the table for a results folder and write it to `report.md` inside it. A folder of
/// `zoo bench` JSONs (no run results) gets the throughput-crossover report instead.
/// Published numbers to set beside a results folder's (`zoo report DIR --reference FILE`): one
/// metric, a source, and rows naming our run labels.
///
/// ```toml
/// metric = "mqar_acc,none"
/// source = "Zoology (Arora et al. 2023), Figure 2, read off the plot"
/// [[rows]]
/// label = "attention,d_model=64"   # a run label of the folder
/// name = "Attention"               # what the source calls it
/// value = 1.0
/// ```
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    pub metric: String,
    pub source: String,
    #[serde(default)]
    pub note: Option<String>,
    pub rows: Vec<ReferenceRow>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceRow {
    pub label: String,
    pub name: String,
    pub value: f64,
}

/// Read a [`Reference`] file; errors name the file and the field.
pub fn read_reference(path: &Path) -> Result<Reference> {
    let raw = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let de = toml::Deserializer::new(&raw);
    serde_path_to_error::deserialize(de).map_err(|e| anyhow::anyhow!("{}: {}: {}", path.display(), e.path(), e.inner().message()))
}

/// The reference's rows beside ours: per row, our mean ± std over seeds at the label's best
/// learning rate (the report's choice), the seeds, the reference value and the difference; rows
/// whose label has no runs yet say so.
pub fn reference_table(results: &[RunResult], r: &Reference) -> String {
    let (primary, recall) = objective(results);
    let better = |a: f64, b: f64| if recall { a > b } else { a < b };
    let best = best_runs(results, primary, &better);
    let mut md = format!(
        "\n## Against the reference\n\n`{}` beside {}.{}\n\n| run | reference name | ours (mean ± std) | seeds | lr | reference | ours − reference |\n|---|---|---|---|---|---|---|\n",
        r.metric,
        r.source,
        r.note.as_ref().map(|n| format!(" {n}")).unwrap_or_default()
    );
    for row in &r.rows {
        let found = best.iter().find(|(l, _, _)| *l == row.label);
        let xs: Vec<f64> = found.map(|(_, _, runs)| runs.iter().filter_map(|x| metric(x, &r.metric)).collect()).unwrap_or_default();
        if xs.is_empty() {
            md.push_str(&format!("| {} | {} | not run yet | 0 | – | {:.3} | – |\n", row.label, row.name, row.value));
            continue;
        }
        let (m, sd) = mean_std(&xs);
        let lr = found.map(|(_, lr, _)| lr.as_str()).unwrap_or("–");
        let ours = if xs.len() > 1 { format!("{m:.3} ± {sd:.3}") } else { format!("{m:.3}") };
        md.push_str(&format!("| {} | {} | {ours} | {} | {lr} | {:.3} | {:+.3} |\n", row.label, row.name, xs.len(), row.value, m - row.value));
    }
    md
}

pub fn report(dir: &Path) -> Result<String> {
    report_with(dir, None)
}

/// [`report`], with a [`Reference`] table appended to a results folder's report.
pub fn report_with(dir: &Path, reference: Option<&Path>) -> Result<String> {
    let reference = reference.map(read_reference).transpose()?;
    let results = load_results(dir)?;
    anyhow::ensure!(reference.is_none() || !results.is_empty(), "--reference: {} holds no run results", dir.display());
    if results.is_empty() {
        let mut benches = Vec::new();
        for (path, v) in load_schema_paths(dir, BENCH_SCHEMA)? {
            benches.push(crate::schema::parse_bench(v, &path)?);
        }
        if benches.is_empty() {
            let evals: Vec<Value> = load_schema_paths(dir, PRESS_SCHEMA)?.into_iter().map(|(_, v)| v).collect();
            let gens: Vec<Value> = load_schema_paths(dir, GENERATE_SCHEMA)?.into_iter().map(|(_, v)| v).collect();
            let needles: Vec<Value> = load_schema_paths(dir, NEEDLE_SCHEMA)?.into_iter().map(|(_, v)| v).collect();
            let kivis: Vec<Value> = load_schema_paths(dir, KIVI_SCHEMA)?.into_iter().map(|(_, v)| v).collect();
            let gates: Vec<Value> = load_schema_paths(dir, GATE_STATS_SCHEMA)?.into_iter().map(|(_, v)| v).collect();
            let duos: Vec<Value> = load_schema_paths(dir, DUO_SCHEMA)?.into_iter().map(|(_, v)| v).collect();
            anyhow::ensure!(
                !evals.is_empty() || !gens.is_empty() || !needles.is_empty() || !kivis.is_empty() || !gates.is_empty() || !duos.is_empty(),
                "no result, bench, press-eval, kivi-eval, duo-eval, gate-stats, generate or needle JSON in {}",
                dir.display()
            );
            let (md, plots) = if let Some(g) = gates.first() {
                gate_stats_report(g)
            } else if !duos.is_empty() {
                (duo_report(&duos, &evals), vec![])
            } else if !kivis.is_empty() {
                (kivi_report(&kivis, &evals), vec![])
            } else if !evals.is_empty() {
                press_report(&evals)?
            } else if !gens.is_empty() {
                (generate_report(&gens), vec![])
            } else {
                (needle_report(&needles), vec![])
            };
            let mut md = md;
            for (file, svg) in &plots {
                crate::env::write_atomic(&dir.join(file), svg.as_bytes())?;
                md.push_str(&format!("\n![{file}]({file})\n"));
            }
            crate::env::write_atomic(&dir.join("report.md"), md.as_bytes())?;
            return Ok(md);
        }
        return crate::crossover::report(dir, &benches);
    }
    let name = results[0].experiment.clone();
    let mut md = format!("# {name}\n\n{}", table(&results));
    if let Some(r) = &reference {
        md.push_str(&reference_table(&results, r));
    }
    let plots = plots(&results);
    for (file, svg) in &plots {
        crate::env::write_atomic(&dir.join(file), svg.as_bytes())?;
        md.push_str(&format!("\n![{file}]({file})\n"));
    }
    crate::env::write_atomic(&dir.join("report.md"), md.as_bytes())?;
    Ok(md)
}

/// KV-press evaluations (`zoo eval --press`, [`PRESS_SCHEMA`]): perplexity per press (rows) and
/// ratio (columns), the full cache (ratio 0) as its own row, and perplexity against the ratio.
fn press_report(evals: &[Value]) -> Result<(String, Vec<(String, String)>)> {
    use crate::plot::{line_chart, Series};
    let name = |v: &Value| match v["budget"]["type"].as_str() {
        Some(b) if b != "uniform" => format!("{}, {}", press_name(&v["press"]), press_name(&v["budget"])),
        _ => press_name(&v["press"]),
    };
    let ratio = |v: &Value| v["ratio"].as_f64().unwrap_or(f64::NAN);
    let ppl = |v: &Value| v["perplexity"].as_f64().unwrap_or(f64::NAN);
    let full = evals.iter().find(|v| ratio(v) == 0.0).map(ppl);
    let mut ratios: Vec<f64> = evals.iter().map(ratio).filter(|&r| r > 0.0).collect();
    ratios.sort_by(f64::total_cmp);
    ratios.dedup();
    let mut presses: Vec<String> = Vec::new();
    for v in evals.iter().filter(|v| ratio(v) > 0.0) {
        if !presses.contains(&name(v)) {
            presses.push(name(v));
        }
    }
    let mut md = format!(
        "# KV compression: perplexity vs ratio\n\n{}\n\n| press | ratio 0 (full cache) |",
        reading(&evals[0], "after each chunk the press keeps (1 − ratio) of the tokens read"),
    );
    for r in &ratios {
        md.push_str(&format!(" {r} |"));
    }
    md.push_str(&format!("\n|---|---|{}\n", "---|".repeat(ratios.len())));
    let cell = |x: Option<f64>| x.map_or("–".to_string(), |x| format!("{x:.2}"));
    let mut series = Vec::new();
    for p in &presses {
        md.push_str(&format!("| {p} | {} |", cell(full)));
        let mut points: Vec<(f64, f64)> = full.map(|f| vec![(0.0, f)]).unwrap_or_default();
        for &r in &ratios {
            let x = evals.iter().find(|v| name(v) == *p && ratio(v) == r).map(ppl);
            md.push_str(&format!(" {} |", cell(x)));
            if let Some(x) = x {
                points.push((r, x));
            }
        }
        md.push('\n');
        series.push(Series { name: p.clone(), points });
    }
    let svg = line_chart("Perplexity vs compression ratio", "ratio (share of the cache evicted)", "perplexity", &series, true);
    Ok((md, vec![("press_ppl.svg".to_string(), svg)]))
}

/// DuoAttention evaluations (`zoo eval --duo`, [`DUO_SCHEMA`]): perplexity and KV bytes per share
/// of retrieval heads, against the full cache when the folder holds its press evaluation at ratio 0.
fn duo_report(duos: &[Value], evals: &[Value]) -> String {
    let full = evals.iter().find(|v| v["ratio"].as_f64() == Some(0.0)).and_then(|v| v["perplexity"].as_f64());
    let share = |v: &Value| v["duo"]["retrieval"].as_f64().unwrap_or(f64::NAN);
    let mut rows: Vec<&Value> = duos.iter().collect();
    rows.sort_by(|a, b| share(b).total_cmp(&share(a)));
    let mut md = format!(
        "# DuoAttention heads: perplexity and KV bytes\n\n{} Streaming heads keep {} sinks and a window of {}. Full cache: {}.\n\n| retrieval share | retrieval heads | perplexity | vs full | entries per head (mean) | KV bytes | held / full |\n|---|---|---|---|---|---|---|\n",
        reading(rows[0], "after each chunk every streaming head evicts what lies outside its sinks and window"),
        rows[0]["sinks"],
        rows[0]["window"],
        full.map_or("no ratio-0 press evaluation here".to_string(), |f| format!("perplexity {f:.2}")),
    );
    for v in rows {
        let ppl = v["perplexity"].as_f64().unwrap_or(f64::NAN);
        let (b, fb) = (v["kv_bytes"].as_u64().unwrap_or(0), v["kv_full_bytes"].as_u64().unwrap_or(0));
        md.push_str(&format!(
            "| {} | {} of {} | {ppl:.2} | {} | {:.1} | {} | {:.3} |\n",
            share(v),
            v["retrieval_heads"],
            v["heads"],
            full.map_or("–".to_string(), |f| format!("{:+.2}", ppl - f)),
            v["mean_entries_held"].as_f64().unwrap_or(f64::NAN),
            bytes(b),
            b as f64 / fb.max(1) as f64,
        ));
    }
    md
}

/// `zoo gate-stats` ([`GATE_STATS_SCHEMA`]): mean parameter errors per (gate, n), their log-log
/// slopes against n, and a log-log plot of the total and gate errors.
fn gate_stats_report(v: &Value) -> (String, Vec<(String, String)>) {
    use crate::plot::{line_chart_axes, Series};
    let rows: Vec<Value> = v["rows"].as_array().cloned().unwrap_or_default();
    let kinds = ["total", "gate", "experts"];
    let per_kind: Vec<_> = kinds.iter().map(|k| crate::gate_stats::slopes(&rows, k)).collect();
    let mut md = format!(
        "# {}

{}{}. Device: {}. Each cell: the mean over {} replicates of Σ|Δ| between the fitted and true parameters (total: β, b, a, c, σ of every expert and τ; gate: β/τ, b/τ for the temperature gate, where only the ratios are identifiable, and β, b, τ for an activation gate; experts: a, c, σ).\n\n| gate | n | total | gate | experts |\n|---|---|---|---|---|\n",
        v["experiment"].as_str().unwrap_or("gate stats"),
        v["description"].as_str().unwrap_or(""),
        if v["complete"] == true { "" } else { " (incomplete: the run stopped early)" },
        device_name(&v["env"]["device"]),
        v["config"]["replicates"],
    );
    for (gi, (g, _, pts)) in per_kind[0].iter().enumerate() {
        for (pi, (n, total)) in pts.iter().enumerate() {
            let gate = per_kind[1][gi].2[pi].1;
            let ex = per_kind[2][gi].2[pi].1;
            md.push_str(&format!("| {g} | {n} | {total:.4} | {gate:.4} | {ex:.4} |\n"));
        }
    }
    md.push_str("\nLog-log slope of the mean error against n (−0.5: the parametric rate; near 0: no convergence):\n\n| gate | total | gate | experts |\n|---|---|---|---|\n");
    for (gi, (g, s, _)) in per_kind[0].iter().enumerate() {
        md.push_str(&format!("| {g} | {s:.3} | {:.3} | {:.3} |\n", per_kind[1][gi].1, per_kind[2][gi].1));
    }
    let mut series = Vec::new();
    for (k, per) in kinds.iter().zip(&per_kind).take(2) {
        for (g, _, pts) in per {
            series.push(Series { name: format!("{g}: {k}"), points: pts.clone() });
        }
    }
    let svg = line_chart_axes("Parameter error vs sample size", "log10 n", "mean Σ|Δ| (log)", &series, true, true);
    (md, vec![("gate_stats.svg".to_string(), svg)])
}

/// KIVI evaluations (`zoo eval --kivi`, [`KIVI_SCHEMA`]): perplexity and KV bytes per (bits, key
/// axis, residual), against the full cache when the folder holds its press evaluation at ratio 0.
fn kivi_report(kivis: &[Value], evals: &[Value]) -> String {
    let full = evals.iter().find(|v| v["ratio"].as_f64() == Some(0.0)).and_then(|v| v["perplexity"].as_f64());
    let mut rows: Vec<&Value> = kivis.iter().collect();
    let key = |v: &Value| {
        let k = &v["kivi"];
        (
            std::cmp::Reverse(k["bits"].as_u64().unwrap_or(0)),
            k["key_axis"].as_str().unwrap_or("").to_string(),
            k["value_axis"].as_str().unwrap_or("").to_string(),
            k["group"].as_u64().unwrap_or(0),
            k["residual"].as_u64().unwrap_or(0),
        )
    };
    rows.sort_by_key(|v| key(v));
    let mut md = format!(
        "# KIVI: perplexity and KV bytes\n\n{} Full cache: {}.\n\n| bits | keys | values | group | residual | perplexity | vs full | KV bytes | held / full precision |\n|---|---|---|---|---|---|---|---|---|\n",
        reading(rows[0], "each attention layer's cache keeps its latest `residual` tokens and any partial group at full precision and quantises the rest"),
        full.map_or("no ratio-0 press evaluation here".to_string(), |f| format!("perplexity {f:.2}")),
    );
    for v in rows {
        let k = &v["kivi"];
        let ppl = v["perplexity"].as_f64().unwrap_or(f64::NAN);
        let (b, fb) = (v["kv_bytes"].as_u64().unwrap_or(0), v["kv_full_bytes"].as_u64().unwrap_or(0));
        md.push_str(&format!(
            "| {} | per {} | per {} | {} | {} | {ppl:.2} | {} | {} | {:.3} |
",
            k["bits"],
            k["key_axis"].as_str().unwrap_or("?"),
            k["value_axis"].as_str().unwrap_or("?"),
            k["group"],
            k["residual"],
            full.map_or("–".to_string(), |f| format!("{:+.2}", ppl - f)),
            bytes(b),
            b as f64 / fb.max(1) as f64,
        ));
    }
    md
}

/// How a text was read through a cache (press and KIVI evaluations): model, text, tokens, chunk,
/// what happened after each chunk, device and dtype.
fn reading(v: &Value, after_each_chunk: &str) -> String {
    format!(
        "Model `{}`, text `{}` ({} tokens, read in chunks of {}; {after_each_chunk}). Device: {}, dtype {}.",
        v["model"].as_str().unwrap_or("?"),
        v["text"].as_str().unwrap_or("?"),
        v["tokens"],
        v["chunk"],
        device_name(&v["env"]["device"]),
        v["env"]["dtype"].as_str().unwrap_or("?"),
    )
}

/// `zoo generate --stats` JSONs ([`GENERATE_SCHEMA`]), e.g. one per (press, context): decode speed
/// and KV bytes, each against the full-cache generation of the same prompt length when there is
/// one (a press at ratio 0, or none).
fn generate_report(gens: &[Value]) -> String {
    let press = |v: &Value| -> String {
        if let Some(r) = v["duo"]["retrieval"].as_f64() {
            return format!("DuoAttention, retrieval share {r}");
        }
        if let Some(k) = v["kivi"].as_object() {
            let f = |key: &str| k.get(key).map_or("?".to_string(), |x| x.as_str().map_or(x.to_string(), str::to_string));
            return format!("KIVI-{} K/{} V/{} G{} R{}", f("bits"), f("key_axis"), f("value_axis"), f("group"), f("residual"));
        }
        match v["press"].as_object() {
            Some(o) if v["ratio"].as_f64().unwrap_or(0.0) > 0.0 || v["keep_tokens"].as_u64().is_some() => {
                let t = o.get("type").and_then(|t| t.as_str()).unwrap_or("?");
                let amount = match v["keep_tokens"].as_u64() {
                    Some(n) => format!("keeping {n} tokens"),
                    None => format!("@ {}", v["ratio"]),
                };
                match v["budget"]["type"].as_str() {
                    Some(b) if b != "uniform" => format!("{t} {amount}, {}", press_name(&v["budget"])),
                    _ => format!("{t} {amount}"),
                }
            }
            _ => "full cache".to_string(),
        }
    };
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let mut rows: Vec<&Value> = gens.iter().collect();
    rows.sort_by_key(|v| (v["prompt_tokens"].as_u64().unwrap_or(0), press(v) != "full cache", press(v)));
    // Repeated generations of one (prompt length, press), e.g. the rounds of scripts/kv-bench.sh:
    // one row, the median speed.
    let mut groups: Vec<(u64, String, Vec<&Value>)> = Vec::new();
    for v in &rows {
        let key = (v["prompt_tokens"].as_u64().unwrap_or(0), press(v));
        match groups.last_mut() {
            Some(g) if (g.0, &g.1) == (key.0, &key.1) => g.2.push(v),
            _ => groups.push((key.0, key.1, vec![v])),
        }
    }
    let median = |g: &[&Value]| -> f64 {
        let mut x: Vec<f64> = g.iter().map(|v| f(v, "decode_tokens_per_s")).collect();
        x.sort_by(f64::total_cmp);
        let n = x.len();
        if n % 2 == 1 { x[n / 2] } else { (x[n / 2 - 1] + x[n / 2]) / 2.0 }
    };
    let first = rows[0];
    let mut md = format!(
        "# KV compression while generating\n\nModel `{}`; device {}, dtype {}. Decode tok/s over the generated tokens after the first (compressions included); KV bytes: the keys and values held by every layer at the end, against what a full cache of the same tokens holds.\n\n| prompt tokens | press | decode tok/s | vs full | KV held | KV allocated | full KV | held / full |\n|---|---|---|---|---|---|---|---|\n",
        first["model"].as_str().unwrap_or("?"),
        device_name(&first["env"]["device"]),
        first["env"]["dtype"].as_str().unwrap_or("?"),
    );
    for (tokens, label, g) in &groups {
        let v = g[0];
        let full = groups.iter().find(|w| w.0 == *tokens && w.1 == "full cache");
        let speed = median(g);
        let vs = full.map_or("–".to_string(), |w| format!("{:.2}×", speed / median(&w.2)));
        let shown = if g.len() > 1 {
            let (lo, hi) = g.iter().map(|v| f(v, "decode_tokens_per_s")).fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
            format!("{speed:.1} (median of {}: {lo:.1}–{hi:.1})", g.len())
        } else {
            format!("{speed:.1}")
        };
        let b = |k: &str| v[k].as_u64().map_or("–".to_string(), bytes);
        md.push_str(&format!(
            "| {tokens} | {label} | {shown} | {vs} | {} | {} | {} | {:.3} |\n",
            b("kv_bytes"),
            b("kv_allocated_bytes"),
            b("kv_full_bytes"),
            f(v, "kv_bytes") / f(v, "kv_full_bytes"),
        ));
    }
    md
}

/// An `env.device` value as words: "NAME (N threads)" for the object form, the string as is.
fn device_name(d: &Value) -> String {
    match d {
        Value::String(s) => s.clone(),
        Value::Object(o) => {
            let name = o.get("name").and_then(|n| n.as_str()).unwrap_or("?");
            match o.get("threads").and_then(|t| t.as_u64()) {
                Some(t) => format!("{name} ({t} threads)"),
                None => name.to_string(),
            }
        }
        _ => "?".to_string(),
    }
}

/// `zoo kv needle` JSONs ([`NEEDLE_SCHEMA`]): pass-key accuracy per (press, ratio) and prompt
/// length, over depths and trials, and per depth at the longest length.
fn needle_report(files: &[Value]) -> String {
    let cells: Vec<&Value> = files.iter().flat_map(|f| f["cells"].as_array().into_iter().flatten()).collect();
    let label = |c: &Value| -> String {
        match c["press"].as_object() {
            Some(_) => match c["budget"].as_object().filter(|b| b.get("type").and_then(Value::as_str) != Some("uniform")) {
                // The budget's type and any settings: "ragged budget, min_share 0.5".
                Some(b) => {
                    let mut what = format!("{} budget", b.get("type").and_then(Value::as_str).unwrap_or("?"));
                    for (k, v) in b.iter().filter(|(k, _)| k.as_str() != "type") {
                        what.push_str(&format!(", {k} {v}"));
                    }
                    format!("{} @ {} ({what})", press_name(&c["press"]), c["ratio"])
                }
                None => format!("{} @ {}", press_name(&c["press"]), c["ratio"]),
            },
            None => "full cache".to_string(),
        }
    };
    let mut labels: Vec<String> = Vec::new();
    let mut lengths: Vec<u64> = Vec::new();
    let mut depths: Vec<f64> = Vec::new();
    for c in &cells {
        if !labels.contains(&label(c)) {
            labels.push(label(c));
        }
        let l = c["length"].as_u64().unwrap_or(0);
        if !lengths.contains(&l) {
            lengths.push(l);
        }
        let d = c["depth"].as_f64().unwrap_or(f64::NAN);
        if !depths.contains(&d) {
            depths.push(d);
        }
    }
    lengths.sort_unstable();
    let acc = |lab: &str, keep: &dyn Fn(&Value) -> bool| -> String {
        let (h, n) = cells.iter().filter(|c| label(c) == lab && keep(c)).fold((0u64, 0u64), |(h, n), c| {
            (h + c["hits"].as_u64().unwrap_or(0), n + c["trials"].as_u64().unwrap_or(0))
        });
        if n == 0 { "–".into() } else { format!("{:.0}% ({h}/{n})", 100.0 * h as f64 / n as f64) }
    };
    let mut md = format!(
        "# Pass-key retrieval under KV compression\n\nAccuracy over depths {depths:?} and {} keys per cell; the press compresses once after the prompt.\n\n| press | {} |\n|---|{}\n",
        files[0]["trials"],
        lengths.iter().map(|l| format!("{l} tokens")).collect::<Vec<_>>().join(" | "),
        "---|".repeat(lengths.len()),
    );
    if files.iter().any(|f| f["complete"] == Value::Bool(false)) {
        md.push_str("\n**Incomplete:** the run stopped before every cell ran; the table holds the cells it finished.\n\n");
    }
    for lab in &labels {
        let row: Vec<String> = lengths.iter().map(|&l| acc(lab, &|c: &Value| c["length"].as_u64() == Some(l))).collect();
        md.push_str(&format!("| {lab} | {} |\n", row.join(" | ")));
    }
    if let Some(&longest) = lengths.last() {
        md.push_str(&format!(
            "\nBy depth at {longest} tokens:\n\n| press | {} |\n|---|{}\n",
            depths.iter().map(|d| format!("depth {d}")).collect::<Vec<_>>().join(" | "),
            "---|".repeat(depths.len())
        ));
        for lab in &labels {
            let row: Vec<String> = depths
                .iter()
                .map(|&d| acc(lab, &|c: &Value| c["length"].as_u64() == Some(longest) && c["depth"].as_f64() == Some(d)))
                .collect();
            md.push_str(&format!("| {lab} | {} |\n", row.join(" | ")));
        }
    }
    md
}

/// A press config as a table label: its type, then its other fields (a file by its name).
fn press_name(p: &Value) -> String {
    let args: Vec<String> = p
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| *k != "type")
                .map(|(k, x)| match (k.as_str(), x.as_str()) {
                    // A file: its name is enough to tell presses apart in a table.
                    ("path", Some(path)) => format!("{k}={}", Path::new(path).file_name().map_or(path.into(), |f| f.to_string_lossy())),
                    _ => format!("{k}={x}"),
                })
                .collect()
        })
        .unwrap_or_default();
    let t = p["type"].as_str().unwrap_or("?").to_string();
    if args.is_empty() { t } else { format!("{t} ({})", args.join(", ")) }
}
