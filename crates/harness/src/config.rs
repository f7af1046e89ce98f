//! Experiment configs: typed TOML (`deny_unknown_fields` everywhere), sweeps over any field, and
//! validation that names the field and the reason before any work starts.

use crate::registry::{FfnConfig, MixerConfig};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use zoo_core::data::MqarSegment;

fn yes() -> bool {
    true
}
fn default_eps() -> f64 {
    1e-5
}
fn default_val_fraction() -> f64 {
    0.1
}

/// One experiment = one run. A file may add a `[sweep]` table to expand into many runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Name of the results folder: `results/<experiment>/`.
    pub experiment: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub seed: u64,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    /// Where the weights start: a pretrained model (`[model] pretrained = ...` in the file, which
    /// [`plan`] resolves into this and the model's architecture in `model`); none: a fresh
    /// initialisation from `seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<crate::pretrained::PretrainedSource>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub d_model: usize,
    pub n_layers: usize,
    /// Tie the LM head to the token embedding (nanoGPT default).
    #[serde(default = "yes")]
    pub tie_embeddings: bool,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    /// The mixer of every layer (unless `pattern` says otherwise).
    #[serde(default)]
    pub mixer: Option<MixerConfig>,
    /// Named mixers that `pattern` refers to.
    #[serde(default)]
    pub mixers: BTreeMap<String, MixerConfig>,
    #[serde(default)]
    pub pattern: Option<Pattern>,
    /// The feed-forward of every layer; default SwiGLU.
    #[serde(default = "default_ffn")]
    pub ffn: FfnConfig,
    /// The vocabulary (embedding rows); default the data's. A pretrained model's sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
}

impl ModelConfig {
    /// The model's own sizes (its layers are checked by [`validate`] with the build context).
    pub fn validate_shape(&self) -> Result<()> {
        if self.d_model == 0 {
            bail!("model.d_model: must be at least 1");
        }
        if self.n_layers == 0 || self.n_layers > MAX_LAYERS {
            bail!("model.n_layers: {} must be in 1..={MAX_LAYERS}", self.n_layers);
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            bail!("model.norm_eps: {} must be positive and finite", self.norm_eps);
        }
        Ok(())
    }
}

fn default_ffn() -> FfnConfig {
    FfnConfig::Swiglu(zoo_core::mlp::MlpConfig { hidden: None, bias: false })
}

/// Which named mixer each layer uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Pattern {
    /// Cycle through these names: `["gla", "gla", "gla", "attn"]` gives 3:1 hybrids.
    Repeat(Vec<String>),
    /// One name per layer.
    List(Vec<String>),
    /// `default` everywhere except the listed layers: `{ default = "gla", at = { attn = [3, 7] } }`.
    At { default: String, at: BTreeMap<String, Vec<usize>> },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataConfig {
    /// Zoology's multi-query associative recall; needs no download.
    Mqar { vocab_size: usize, train: Vec<MqarSegment>, test: Vec<MqarSegment> },
    /// A local text file (or files, concatenated in the given order).
    Text {
        paths: Vec<PathBuf>,
        tokenizer: TokenizerConfig,
        #[serde(default = "default_val_fraction")]
        val_fraction: f64,
    },
}

/// The deepest stack a config may ask for.
pub const MAX_LAYERS: usize = 10_000;
/// The largest vocabulary a config may ask for.
pub const MAX_VOCAB: usize = 1 << 24;
/// The most MQAR tokens one split may hold in memory (4 bytes each for inputs and targets).
pub const MAX_DATA_TOKENS: f64 = 2.5e8;

impl DataConfig {
    /// Check the data section (and the train fields that depend on it).
    pub fn validate(&self, tc: &TrainConfig) -> Result<()> {
        match self {
            DataConfig::Mqar { vocab_size, train, test } => {
                if train.is_empty() || test.is_empty() {
                    bail!("data.train / data.test: MQAR needs at least one segment each");
                }
                if *vocab_size > MAX_VOCAB {
                    bail!("data.vocab_size: {vocab_size} exceeds {MAX_VOCAB} (token ids are u32 and embeddings d × V)");
                }
                for (which, segs) in [("train", train), ("test", test)] {
                    let tokens: f64 = segs.iter().map(|s| s.seq_len as f64 * s.examples as f64).sum();
                    if tokens > MAX_DATA_TOKENS {
                        bail!("data.{which}: {tokens:.3e} tokens (seq_len × examples) exceed {MAX_DATA_TOKENS:.0e} held in memory");
                    }
                    for (i, s) in segs.iter().enumerate() {
                        zoo_core::data::Mqar::validate(*vocab_size, s).map_err(|e| anyhow!("data.{which}[{i}].{e}"))?;
                    }
                }
                if tc.seq_len.is_some() {
                    bail!("train.seq_len: not used with MQAR data (segments set their own lengths)");
                }
            }
            DataConfig::Text { paths, val_fraction, tokenizer } => {
                if paths.is_empty() {
                    bail!("data.paths: needs at least one file");
                }
                for p in paths {
                    if !p.is_file() {
                        bail!(
                            "data.paths: file {} not found (run scripts/fetch-data.sh for the Shakespeare corpus)",
                            p.display()
                        );
                    }
                }
                if let TokenizerConfig::Hf { path } = tokenizer {
                    if !path.is_file() {
                        bail!("data.tokenizer.path: file {} not found", path.display());
                    }
                }
                if !(*val_fraction > 0.0 && *val_fraction < 1.0) {
                    bail!("data.val_fraction: {val_fraction} must be in (0, 1)");
                }
                if tc.seq_len.unwrap_or(0) == 0 {
                    bail!("train.seq_len: required for text data");
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenizerConfig {
    Bytes,
    /// Characters seen in the corpus.
    Chars,
    /// A HuggingFace `tokenizer.json`.
    Hf {
        path: PathBuf,
    },
    /// The pretrained model's own tokenizer (`[model] pretrained = ...`: an HF folder's
    /// `tokenizer.json`, a GGUF file's tokenizer metadata).
    Model,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    /// Context length for text data (MQAR uses its segments' lengths).
    #[serde(default)]
    pub seq_len: Option<usize>,
    pub lr: f64,
    /// Final LR of the cosine; default lr / 10.
    #[serde(default)]
    pub min_lr: Option<f64>,
    #[serde(default)]
    pub warmup_steps: usize,
    /// Steps of cosine decay; default `steps`.
    #[serde(default)]
    pub decay_steps: Option<usize>,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    #[serde(default)]
    pub decay_embeddings: bool,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Global gradient-norm clip; `0` disables.
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    #[serde(default = "default_one")]
    pub grad_accum: usize,
    #[serde(default = "default_eval_every")]
    pub eval_every: usize,
    /// Batches per text eval.
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    /// Checkpoint every N steps (always at the end).
    #[serde(default)]
    pub checkpoint_every: Option<usize>,
    /// On a non-finite loss, write a result marked `"diverged"` instead of failing the run
    /// (learning-rate stability sweeps).
    #[serde(default)]
    pub record_divergence: bool,
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            bail!("train.steps: must be at least 1");
        }
        if self.batch_size == 0 {
            bail!("train.batch_size: must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("train.lr: {} must be positive", self.lr);
        }
        if self.min_lr.is_some_and(|x| !(x.is_finite() && x >= 0.0 && x <= self.lr)) {
            bail!("train.min_lr: must be in [0, lr]");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("train.weight_decay: {} must be finite and >= 0", self.weight_decay);
        }
        if self.decay_steps == Some(0) {
            bail!("train.decay_steps: must be at least 1");
        }
        if self.eval_batches == 0 {
            bail!("train.eval_batches: must be at least 1");
        }
        if self.checkpoint_every == Some(0) {
            bail!("train.checkpoint_every: must be at least 1 (leave it out for a checkpoint at the end only)");
        }
        if self.warmup_steps > self.steps {
            bail!("train.warmup_steps: {} exceeds steps = {}", self.warmup_steps, self.steps);
        }
        if self.grad_accum == 0 {
            bail!("train.grad_accum: must be at least 1");
        }
        if self.eval_every == 0 {
            bail!("train.eval_every: must be at least 1");
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            bail!("train.beta1 / train.beta2: must be in [0, 1)");
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            bail!("train.grad_clip: must be finite and >= 0 (0 disables)");
        }
        Ok(())
    }
}

fn default_wd() -> f64 {
    0.1
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_clip() -> f64 {
    1.0
}
fn default_one() -> usize {
    1
}
fn default_eval_every() -> usize {
    250
}
fn default_eval_batches() -> usize {
    20
}

/// `[sweep]`: runs = variants × grid × lrs × seeds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    #[serde(default)]
    pub seeds: Vec<u64>,
    /// Learning rates (override `train.lr`); the report keeps the best per variant.
    #[serde(default)]
    pub lrs: Vec<f64>,
    /// Cartesian product over dotted field paths: `"model.d_model" = [64, 128]`.
    #[serde(default)]
    pub grid: BTreeMap<String, Vec<toml::Value>>,
    /// Named override sets, one per variant: `{ name = "g1", set = { "model.mixer.type" = "gated" } }`.
    #[serde(default)]
    pub variants: Vec<Variant>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    #[serde(default)]
    pub set: BTreeMap<String, toml::Value>,
}

/// One fully resolved run of a sweep.
#[derive(Debug, Clone)]
pub struct PlannedRun {
    /// Position in the expanded sweep (tables keep this order).
    pub index: usize,
    pub id: String,
    /// Variant name plus grid values: what the report groups by (seeds and lrs aside).
    pub label: String,
    pub variant: String,
    pub overrides: BTreeMap<String, toml::Value>,
    pub config: RunConfig,
}

/// Parse a config file and expand its sweep into validated runs. Any error names the field.
pub fn load(path: &Path) -> Result<Vec<PlannedRun>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    plan(&text, base_dir).with_context(|| format!("in config {}", path.display()))
}

/// Like [`load`], from text; relative data paths resolve against the current directory.
pub fn plan(text: &str, _base_dir: &Path) -> Result<Vec<PlannedRun>> {
    let mut root: toml::Value = toml::from_str(text).map_err(|e| anyhow!("{e}"))?;
    let table = root.as_table_mut().ok_or_else(|| anyhow!("config must be a table"))?;
    if table.contains_key("init") {
        bail!("init: set by `[model] pretrained = ...`, not written by hand");
    }
    // `[model] pretrained = ...`: the checkpoint's architecture becomes the model section (loaded
    // once here, on the CPU), and the source the run's `init`.
    if let Some(model) = table.get("model").filter(|m| m.get("pretrained").is_some()).cloned() {
        let src: crate::pretrained::PretrainedSource = typed(model, "model")?;
        let resolved = crate::pretrained::architecture(&src)?;
        table.insert("model".into(), toml::Value::try_from(resolved).context("model: the resolved architecture")?);
        table.insert("init".into(), toml::Value::try_from(src).context("init")?);
    }
    let sweep: Sweep = match table.remove("sweep") {
        Some(v) => typed(v, "sweep")?,
        None => Sweep::default(),
    };
    let variants = if sweep.variants.is_empty() {
        vec![Variant { name: String::new(), set: BTreeMap::new() }]
    } else {
        sweep.variants.clone()
    };
    let mut names = std::collections::BTreeSet::new();
    for v in &sweep.variants {
        check_name("sweep.variants.name", &v.name)?;
    }
    for v in &variants {
        if !names.insert(v.name.clone()) {
            bail!("sweep.variants: name `{}` appears twice", v.name);
        }
    }
    // Cartesian product of the grid.
    let mut points: Vec<Vec<(String, toml::Value)>> = vec![vec![]];
    for (k, vals) in &sweep.grid {
        if vals.is_empty() {
            bail!("sweep.grid.\"{k}\": needs at least one value");
        }
        points = points
            .into_iter()
            .flat_map(|p| vals.iter().map(move |v| [p.clone(), vec![(k.clone(), v.clone())]].concat()))
            .collect();
    }
    let lrs: Vec<Option<f64>> =
        if sweep.lrs.is_empty() { vec![None] } else { sweep.lrs.iter().map(|&l| Some(l)).collect() };
    let seeds: Vec<Option<u64>> =
        if sweep.seeds.is_empty() { vec![None] } else { sweep.seeds.iter().map(|&s| Some(s)).collect() };
    let mut runs = Vec::new();
    for var in &variants {
        for point in &points {
            for lr in &lrs {
                for seed in &seeds {
                    let mut v = root.clone();
                    let mut overrides = BTreeMap::new();
                    for (k, val) in var.set.iter().chain(point.iter().map(|(k, v)| (k, v))) {
                        set_path(&mut v, k, val.clone()).with_context(|| format!("sweep override `{k}`"))?;
                        overrides.insert(k.clone(), val.clone());
                    }
                    if let Some(lr) = lr {
                        set_path(&mut v, "train.lr", toml::Value::Float(*lr))?;
                    }
                    if let Some(s) = seed {
                        set_path(&mut v, "seed", toml::Value::Integer(*s as i64))?;
                    }
                    let config: RunConfig = typed(v, "")?;
                    let label = label_of(&var.name, point);
                    let id = sanitize(&format!("{}__lr={}__seed={}", label, config.train.lr, config.seed));
                    validate(&config).with_context(|| format!("run `{id}`"))?;
                    runs.push(PlannedRun {
                        index: runs.len(),
                        id,
                        label,
                        variant: var.name.clone(),
                        overrides,
                        config,
                    });
                }
            }
        }
    }
    Ok(runs)
}

fn label_of(variant: &str, point: &[(String, toml::Value)]) -> String {
    let mut parts: Vec<String> = Vec::new();
    if !variant.is_empty() {
        parts.push(variant.to_string());
    }
    for (k, v) in point {
        let key = k.rsplit('.').next().unwrap_or(k);
        let val = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Table(t) => t.get("type").and_then(|x| x.as_str()).unwrap_or("table").to_string(),
            other => other.to_string(),
        };
        parts.push(format!("{key}={val}"));
    }
    if parts.is_empty() {
        "default".into()
    } else {
        parts.join(",")
    }
}

/// Run ids are file names: letters, digits, '.', '_' and '-' only (`d_model=64,lr=0.01` becomes
/// `d_model-64_lr-0.01`).
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '=' => '-',
            c if c.is_ascii_alphanumeric() || "._-".contains(c) => c,
            _ => '_',
        })
        .collect()
}

/// Deserialize with the path of the failing field in the message.
fn typed<T: serde::de::DeserializeOwned>(v: toml::Value, prefix: &str) -> Result<T> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let full = match (prefix.is_empty(), path == ".") {
            (true, true) => String::new(),
            (true, false) => path,
            (false, true) => prefix.to_string(),
            (false, false) => format!("{prefix}.{path}"),
        };
        if full.is_empty() {
            anyhow!("{}", e.inner())
        } else {
            anyhow!("{full}: {}", e.inner())
        }
    })
}

/// Set a dotted path (`model.mixer.n_heads`) in a TOML tree, creating tables as needed.
pub fn set_path(root: &mut toml::Value, path: &str, val: toml::Value) -> Result<()> {
    let mut cur = root;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        let t = cur.as_table_mut().ok_or_else(|| anyhow!("`{}` is not a table", parts[..i].join(".")))?;
        if i + 1 == parts.len() {
            t.insert(p.to_string(), val);
            return Ok(());
        }
        cur = t.entry(p.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
    }
    unreachable!()
}

impl RunConfig {
    /// The longest sequence the model sees.
    pub fn max_seq_len(&self) -> usize {
        match &self.data {
            DataConfig::Mqar { train, test, .. } => train.iter().chain(test).map(|s| s.seq_len).max().unwrap_or(0),
            DataConfig::Text { .. } => self.train.seq_len.unwrap_or(0),
        }
    }

    /// The sequence lengths a result reports the state / KV-cache size at: the task's own
    /// lengths, plus 256 and 4096 (the linear-vs-softmax comparison points).
    pub fn state_report_lens(&self) -> Vec<usize> {
        let mut ls: Vec<usize> = match &self.data {
            DataConfig::Mqar { train, test, .. } => train.iter().chain(test).map(|s| s.seq_len).collect(),
            DataConfig::Text { .. } => self.train.seq_len.into_iter().collect(),
        };
        ls.extend([256, 4096]);
        ls.sort_unstable();
        ls.dedup();
        ls
    }

    /// The mixer of each layer, resolved from `mixer` / `mixers` + `pattern`.
    pub fn layer_mixers(&self) -> Result<Vec<MixerConfig>> {
        self.model.layer_mixers()
    }
}

impl ModelConfig {
    /// Each layer's mixer config, from `mixer` or `mixers` + `pattern`.
    pub fn layer_mixers(&self) -> Result<Vec<MixerConfig>> {
        let m = self;
        let n = m.n_layers;
        let get = |name: &str| -> Result<MixerConfig> {
            m.mixers.get(name).cloned().ok_or_else(|| {
                anyhow!(
                    "model.pattern: no mixer named `{name}` in model.mixers (have: {:?})",
                    m.mixers.keys().collect::<Vec<_>>()
                )
            })
        };
        match (&m.mixer, &m.pattern) {
            (Some(_), Some(_)) => bail!("model: give either `mixer` or `mixers` + `pattern`, not both"),
            (None, None) => bail!("model.mixer: missing (or give `mixers` + `pattern`)"),
            (Some(mx), None) => Ok(vec![mx.clone(); n]),
            (None, Some(Pattern::Repeat(names))) => {
                if names.is_empty() {
                    bail!("model.pattern.repeat: empty");
                }
                (0..n).map(|i| get(&names[i % names.len()])).collect()
            }
            (None, Some(Pattern::List(names))) => {
                if names.len() != n {
                    bail!("model.pattern.list: {} names for n_layers = {n}", names.len());
                }
                names.iter().map(|s| get(s)).collect()
            }
            (None, Some(Pattern::At { default, at })) => {
                let mut out = vec![get(default)?; n];
                for (name, layers) in at {
                    for &l in layers {
                        if l >= n {
                            bail!("model.pattern.at.{name}: layer {l} out of range (n_layers = {n})");
                        }
                        out[l] = get(name)?;
                    }
                }
                Ok(out)
            }
        }
    }
}

/// Semantic checks. Errors start with the dotted field.
pub fn validate(c: &RunConfig) -> Result<()> {
    check_name("experiment", &c.experiment)?;
    c.model.validate_shape()?;
    c.data.validate(&c.train)?;
    if let DataConfig::Text { tokenizer: TokenizerConfig::Model, .. } = &c.data {
        if c.init.is_none() {
            bail!("data.tokenizer: `model` is the pretrained model's tokenizer; set `[model] pretrained = ...`");
        }
    }
    match (c.model.vocab_size, &c.data) {
        (Some(0), _) => bail!("model.vocab_size: must be at least 1"),
        (Some(v), DataConfig::Mqar { vocab_size, .. }) if v < *vocab_size => {
            bail!("model.vocab_size: {v} is smaller than data.vocab_size ({vocab_size})")
        }
        _ => {}
    }
    validate_layers(c)?;
    c.train.validate()
}

/// Rough upper estimates of what one run allocates, from the config alone (before any
/// allocation): parameters (embeddings + ~16 d² per layer, which covers attention + SwiGLU and the
/// linear mixers' wider projections), and the bytes of a training step: f32 weights, gradients and
/// two AdamW moments (16 bytes per parameter) plus activations (~40 d floats per token and layer,
/// 3 vocab-wide f32 tensors per token for the loss, and 3 f32 T×T score tensors per head and layer
/// where a layer has softmax attention's heads).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Footprint {
    pub params: f64,
    pub weight_bytes: f64,
    pub activation_bytes: f64,
}

impl Footprint {
    pub fn total(&self) -> f64 {
        self.weight_bytes + self.activation_bytes
    }

    /// An error naming the fields that drive the estimate when it exceeds `limit` bytes.
    pub fn check(&self, limit: f64, what: &str) -> Result<()> {
        if self.total() <= limit {
            return Ok(());
        }
        let gib = |b: f64| b / (1u64 << 30) as f64;
        let fields = if self.weight_bytes >= self.activation_bytes {
            "model.d_model / model.n_layers / data.vocab_size"
        } else {
            "train.batch_size / sequence length / model.d_model"
        };
        bail!(
            "{fields}: {what} needs an estimated {:.1} GiB ({:.3e} parameters: {:.1} GiB of weights, gradients and \
             AdamW state; {:.1} GiB of activations), more than the {:.1} GiB of this device (override with --max-memory)",
            gib(self.total()),
            self.params,
            gib(self.weight_bytes),
            gib(self.activation_bytes),
            gib(limit)
        )
    }
}

impl RunConfig {
    /// [`Footprint`] of a training step at batch `batch` and length `t` with `vocab` tokens.
    pub fn footprint_at(&self, vocab: usize, batch: usize, t: usize) -> Footprint {
        let m = &self.model;
        let (d, l, v) = (m.d_model as f64, m.n_layers as f64, vocab as f64);
        let params = self.param_estimate(vocab);
        let heads = self.max_heads();
        let (b, t) = (batch as f64, t as f64);
        let activation_bytes = 4.0 * b * t * (40.0 * d * l + 3.0 * v) + 4.0 * 3.0 * b * heads * t * t * l;
        Footprint { params, weight_bytes: 16.0 * params, activation_bytes }
    }

    /// Parameters by the estimate of [`Footprint`]: embeddings (two tables unless tied) and
    /// ~16 d² per layer.
    fn param_estimate(&self, vocab: usize) -> f64 {
        let m = &self.model;
        let (d, l, v) = (m.d_model as f64, m.n_layers as f64, vocab as f64);
        v * d * if m.tie_embeddings { 1.0 } else { 2.0 } + l * 16.0 * d * d
    }

    /// The most heads of any layer that may form T×T attention scores: softmax attention, gated
    /// attention, mixture-of-head attention, and Based (its sliding-window attention, when the
    /// composition runs). The linear mixers' `n_heads` do not count: their chunked form holds
    /// C×C blocks and their scan nothing T-squared (counting them refused linear-lm's linear model
    /// at batch 16, T 8192 on an H100 with an estimate of 212 GiB; it peaks at 4.0 GiB at batch 4).
    fn max_heads(&self) -> f64 {
        self.layer_mixers()
            .unwrap_or_default()
            .iter()
            .filter(|mx| matches!(mx.kind().as_str(), "attention" | "gated_attention" | "moh" | "based"))
            .filter_map(|mx| max_field(&serde_json::to_value(mx).ok()?, "n_heads"))
            .fold(0.0, f64::max)
    }

    /// [`Footprint`] of inference at batch `batch` and length `t` (prefill, then decode): f32
    /// weights alone (4 bytes per parameter; no gradients or optimiser state) and one forward's
    /// transient activations, held a layer at a time (~10 d floats per token, the vocab-wide
    /// logits, one layer's f32 T×T scores per head where the composition runs), plus the KV cache
    /// (2 d floats per token and layer). `zoo bench --skip-train` checks this instead of
    /// [`RunConfig::footprint_at`].
    pub fn inference_footprint_at(&self, vocab: usize, batch: usize, t: usize) -> Footprint {
        let params = self.param_estimate(vocab);
        let m = &self.model;
        let (d, l, v) = (m.d_model as f64, m.n_layers as f64, vocab as f64);
        let heads = self.max_heads();
        let (b, t) = (batch as f64, t as f64);
        let activation_bytes = 4.0 * b * t * (10.0 * d + v + 2.0 * d * l) + 4.0 * b * heads * t * t;
        Footprint { params, weight_bytes: 4.0 * params, activation_bytes }
    }

    /// [`Footprint`] of this run's training step.
    pub fn footprint(&self, vocab: usize) -> Footprint {
        self.footprint_at(vocab, self.train.batch_size, self.max_seq_len())
    }
}

/// The largest number under key `key` anywhere in a JSON value.
fn max_field(v: &serde_json::Value, key: &str) -> Option<f64> {
    let fold = |a: Option<f64>, x: f64| Some(a.map_or(x, |a| a.max(x)));
    match v {
        serde_json::Value::Object(m) => {
            m.iter().filter_map(|(k, x)| if k == key { x.as_f64() } else { max_field(x, key) }).fold(None, fold)
        }
        serde_json::Value::Array(xs) => xs.iter().filter_map(|x| max_field(x, key)).fold(None, fold),
        _ => None,
    }
}

/// A name that becomes a file or folder name: letters, digits, `.`, `_`, `-`, not starting with
/// `.` (so never `..`), at most 100 characters.
fn check_name(field: &str, name: &str) -> Result<()> {
    let ok_char = |ch: char| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-');
    if name.is_empty() || name.len() > 100 || name.starts_with('.') || !name.chars().all(ok_char) {
        bail!("{field}: {name:?} must be 1-100 characters of letters, digits, '.', '_', '-', not starting with '.'");
    }
    Ok(())
}

/// Every layer's mixer and the feed-forward, against the model width and the longest sequence.
fn validate_layers(c: &RunConfig) -> Result<()> {
    let m = &c.model;
    let seq = c.max_seq_len();
    let mixers = c.layer_mixers()?;
    let kinds = crate::registry::kind_positions(&mixers);
    for (i, mx) in mixers.iter().enumerate() {
        let ctx = zoo_core::mixer::BuildCtx {
            d_model: m.d_model,
            n_layers: mixers.len(),
            layer: i,
            max_seq_len: seq,
            kind_layer: kinds[i].0,
            kind_layers: kinds[i].1,
        };
        zoo_core::mixer::MixerSpec::validate(mx, &ctx).map_err(|e| anyhow!("model.mixer (layer {i}).{e}"))?;
    }
    let ctx = zoo_core::mixer::BuildCtx {
        d_model: m.d_model,
        n_layers: mixers.len(),
        layer: 0,
        max_seq_len: seq,
        kind_layer: 0,
        kind_layers: mixers.len(),
    };
    zoo_core::mixer::FfnSpec::validate(&m.ffn, &ctx).map_err(|e| anyhow!("model.ffn.{e}"))?;
    Ok(())
}
