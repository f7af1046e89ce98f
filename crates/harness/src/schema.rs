//! The result schema as types: what `zoo run` writes (`zoo.result/1`, [`RunResult`]) and what
//! `zoo bench` writes (`zoo.bench/1`, [`BenchResult`]), read back by `zoo report`, the crossover
//! report and `zoo run`'s summary. Fields that older results may lack default; maps whose keys are
//! open (metrics, overrides, the resolved config) stay JSON values.
//!
//! Written through `serde_json::Value`, whose maps are sorted: key order in the files is
//! alphabetical, as it was when these were `json!` literals.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use zoo_core::probe::ProbeSummary;
use zoo_core::train::CurvePoint;

pub const RESULT_SCHEMA: &str = "zoo.result/1";
pub const BENCH_SCHEMA: &str = "zoo.bench/1";
/// One `zoo eval --model … --press …` result: a press, a ratio, the perplexity.
pub const PRESS_SCHEMA: &str = "zoo.press-eval/1";
/// `zoo eval --kivi`: perplexity and KV bytes of a pretrained model reading a text through a
/// KIVI-quantised cache.
pub const KIVI_SCHEMA: &str = "zoo.kivi-eval/1";
/// `zoo eval --duo`: perplexity and KV bytes with DuoAttention's streaming heads.
pub const DUO_SCHEMA: &str = "zoo.duo-eval/1";
/// `zoo gate-stats`: parameter errors of Gaussian-MoE fits against sample size, per gate.
pub const GATE_STATS_SCHEMA: &str = "zoo.gate-stats/1";
/// The `--stats` JSON of `zoo generate`: counts, timings and KV bytes of one generation.
pub const GENERATE_SCHEMA: &str = "zoo.generate/1";
/// `zoo kv needle`: passkey retrieval per (length, depth, press, ratio).
pub const NEEDLE_SCHEMA: &str = "zoo.needle/1";

/// Where a result was produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvRecord {
    /// `{sha, dirty, build: {sha, dirty}}` of the checkout at write time and of the binary.
    pub git: Value,
    /// candle, rustc and zoo versions.
    pub versions: BTreeMap<String, String>,
    pub device: DeviceRecord,
    pub dtype: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// `cpu` or `cuda`.
    pub kind: String,
    pub name: String,
    pub threads: u64,
    /// Set when the run shared the device with other runs (its tok/s is then not a throughput).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_runs: Option<u64>,
    /// Set when the run trained data-parallel on several devices (`zoo launch`): tokens/s is then
    /// the global figure, over all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<u64>,
    /// Anything else the device reported (e.g. the host CPU of a GPU machine).
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Params {
    pub total: u64,
    pub non_embedding: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub train_tokens_per_s: f64,
    pub tokens_seen: u64,
    pub train_seconds: f64,
}

/// One run of `zoo run`: `results/<experiment>/<run_id>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub schema: String,
    pub run_id: String,
    /// Index in the sweep plan (report order).
    pub plan_index: u64,
    pub experiment: String,
    pub variant: String,
    /// Variant name plus the grid overrides, without lr and seed: runs with one label differ only
    /// by learning rate and seed.
    pub label: String,
    pub overrides: Value,
    pub seed: u64,
    pub lr: f64,
    /// The resolved config the run trained with.
    pub config: Value,
    /// The layer stack, e.g. "short_conv,attention,short_conv,attention".
    pub layers: String,
    pub env: EnvRecord,
    pub params: Params,
    /// Recurrent state / KV cache bytes of one sequence at length T (key: T), all layers (absent
    /// in results written before it).
    #[serde(default)]
    pub state_bytes: BTreeMap<String, u64>,
    /// `val_loss,best`, `val_loss,final`, task metrics, `loss_spikes,robust`, `diverged`, ...
    pub metrics: BTreeMap<String, Value>,
    /// End-of-run probes of a healthy model; null for a diverged one.
    pub probes: Option<ProbeSummary>,
    /// The divergence message, or null.
    pub divergence: Option<String>,
    pub curve: Vec<CurvePoint>,
    pub throughput: Throughput,
    pub wall_time_s: f64,
    pub started_at: String,
    pub finished_at: String,
}

impl RunResult {
    /// A numeric metric by key.
    pub fn metric(&self, key: &str) -> Option<f64> {
        self.metrics.get(key).and_then(|v| v.as_f64())
    }

    /// The learning rate as the table prints it (JSON's shortest form).
    pub fn lr_text(&self) -> String {
        Value::from(self.lr).to_string()
    }

    /// Whether the run shared its device with others.
    pub fn shared_device(&self) -> bool {
        self.env.device.concurrent_runs.is_some()
    }

    /// Mean over layers of a named probe statistic.
    pub fn probe_stat(&self, key: &str) -> Option<f64> {
        let xs: Vec<f64> = self.probes.as_ref()?.stats.iter().filter_map(|m| m.get(key).copied()).collect();
        (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
    }

    /// A scalar statistic at the last training curve point that has statistics, averaged over
    /// layers (measured in a training step: e.g. the dense-to-sparse gate's active experts, which
    /// evaluation, using the top k, does not show).
    pub fn train_stat(&self, key: &str) -> Option<f64> {
        let layers = self.curve.iter().rev().find_map(|c| c.stats.as_ref())?;
        let xs: Vec<f64> = layers.iter().filter_map(|m| m.get(key)).filter_map(|v| v.values.first().copied()).collect();
        (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
    }

    /// The JSON the file holds (sorted keys).
    pub fn to_json(&self) -> serde_json::Result<Value> {
        serde_json::to_value(self)
    }
}

/// One `zoo bench` run: protocol, environment and one row per sequence length. Rows stay open
/// objects (`seq_len`, `batch`, `train_tokens_per_s`, `prefill_tokens_per_s`, `decode_tokens_per_s`,
/// `*_peak_bytes`, `cache_*bytes*`, or `<phase>_error` for a phase that failed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    pub schema: String,
    pub experiment: String,
    /// Set by `zoo run`-style sweeps of benches (the crossover script): the run's label and plan
    /// index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_index: Option<u64>,
    pub config: Value,
    pub layers: String,
    pub env: EnvRecord,
    /// `total` parameters and their `bytes`.
    pub params: Value,
    /// Warm-up and timed iterations, decode tokens, and what each phase and the memory figure
    /// measure, in words.
    pub protocol: Value,
    pub vocab_size: u64,
    pub rows: Vec<Value>,
    pub finished_at: String,
}

impl BenchResult {
    pub fn to_json(&self) -> serde_json::Result<Value> {
        serde_json::to_value(self)
    }
}

/// Parse a result file's JSON, naming the file on error.
pub fn parse_run(v: Value, origin: &std::path::Path) -> anyhow::Result<RunResult> {
    serde_json::from_value(v).map_err(|e| anyhow::anyhow!("{}: not a zoo.result/1 file: {e}", origin.display()))
}

/// Parse a bench file's JSON, naming the file on error.
pub fn parse_bench(v: Value, origin: &std::path::Path) -> anyhow::Result<BenchResult> {
    serde_json::from_value(v).map_err(|e| anyhow::anyhow!("{}: not a zoo.bench/1 file: {e}", origin.display()))
}
