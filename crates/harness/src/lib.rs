//! The zoo harness as a library (the `zoo` binary is a thin CLI over it): typed configs
//! ([`config`]), the mixer registry ([`registry`]), training runs ([`runner`]), benchmarks
//! ([`bench`]), the result schema ([`schema`]) and reports ([`report`]).
//!
//! A config expands into its sweep's runs before any work, and a wrong field fails by name:
//!
//! ```
//! use std::path::Path;
//! let text = r#"
//! experiment = "demo"
//! [model]
//! d_model = 16
//! n_layers = 2
//! mixer = { type = "gla", n_heads = 2 }
//! [data]
//! type = "mqar"
//! vocab_size = 32
//! train = [{ seq_len = 16, kv_pairs = 2, examples = 64 }]
//! test = [{ seq_len = 16, kv_pairs = 2, examples = 16 }]
//! [train]
//! steps = 4
//! batch_size = 4
//! lr = 1e-3
//! [sweep]
//! seeds = [0, 1]
//! lrs = [1e-3, 3e-3]
//! "#;
//! let runs = zoo_harness::config::plan(text, Path::new(".")).unwrap();
//! assert_eq!(runs.len(), 4);
//! let bad = text.replace("n_heads = 2", "n_heads = 3");
//! let e = zoo_harness::config::plan(&bad, Path::new(".")).unwrap_err();
//! assert!(format!("{e:#}").contains("n_heads"), "{e:#}");
//! ```

pub mod bench;
pub mod config;
pub mod crossover;
pub mod dist;
pub mod env;
pub mod gate_stats;
pub mod needle;
pub mod plot;
pub mod pretrained;
pub mod registry;
pub mod report;
pub mod runner;
pub mod schema;
pub mod stats;

use anyhow::{Context, Result};
use std::path::Path;
use zoo_core::data::TokenizerSpec;

/// The vocabulary size a config's model will have.
pub fn vocab_size(cfg: &config::RunConfig) -> Result<usize> {
    if let Some(v) = cfg.model.vocab_size {
        return Ok(v);
    }
    Ok(match &cfg.data {
        config::DataConfig::Mqar { vocab_size, .. } => *vocab_size,
        config::DataConfig::Text { paths, tokenizer, .. } => runner::load_text(paths, tokenizer, cfg.init.as_ref())?.1.vocab_size(),
    })
}

/// A checkpoint read back: its run config, tokenizer spec, and the model with its weights.
pub struct Checkpoint {
    pub cfg: config::RunConfig,
    pub spec: Option<TokenizerSpec>,
    pub model: zoo_core::model::Lm,
    pub store: zoo_core::params::ParamStore,
}

/// Read a checkpoint folder (meta.json + weights) and rebuild its model.
pub fn load_checkpoint(ckpt: &Path, env: &env::Env) -> Result<Checkpoint> {
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(ckpt.join("meta.json"))
            .with_context(|| format!("{} is not a zoo checkpoint", ckpt.display()))?,
    )?;
    let cfg: config::RunConfig = serde_json::from_value(meta["config"].clone()).context("meta.json: config")?;
    let vocab = meta["vocab_size"].as_u64().context("meta.json: vocab_size")? as usize;
    let spec: Option<TokenizerSpec> = serde_json::from_value(meta["tokenizer"].clone())?;
    // The checkpoint holds every weight: a run from a pretrained model is rebuilt without loading
    // that model again.
    let (model, store) = runner::build_model(&config::RunConfig { init: None, ..cfg.clone() }, vocab, env)?;
    zoo_core::train::load_weights(ckpt, &store)?;
    Ok(Checkpoint { cfg, spec, model, store })
}

/// `zoo eval`: perplexity of a checkpoint on a text file, with the tokenizer it was trained with.
pub fn evaluate_checkpoint(
    ckpt: &Path,
    text: &Path,
    seq_len: Option<usize>,
    batch: usize,
    env: &env::Env,
) -> Result<serde_json::Value> {
    let Checkpoint { cfg, spec, model, .. } = load_checkpoint(ckpt, env)?;
    let tok = pretrained::tokenizer_from_spec(&spec.context("this checkpoint was not trained on text (no tokenizer)")?)?;
    let s = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let ids = tok.encode(&s)?;
    let t = seq_len.unwrap_or(cfg.max_seq_len());
    anyhow::ensure!(t <= cfg.max_seq_len(), "--seq-len {t} exceeds the model's {}", cfg.max_seq_len());
    let (ppl, n) = zoo_core::task::perplexity(&model, &ids, t, batch, &env.device)?;
    let bytes: usize = ids.iter().take(n + 1).map(|&i| tok.token_bytes(i)).sum();
    Ok(serde_json::json!({
        "checkpoint": ckpt.display().to_string(),
        "text": text.display().to_string(),
        "tokens_scored": n,
        "seq_len": t,
        "metrics": {
            "perplexity,none": ppl,
            "bits_per_byte,none": ppl.ln() * n as f64 / std::f64::consts::LN_2 / bytes as f64,
        },
    }))
}

/// `zoo export`: a checkpoint as an HF Llama folder (see [`pretrained::export_llama`]).
pub fn export_checkpoint(ckpt: &Path, out: &Path, env: &env::Env) -> Result<()> {
    let Checkpoint { cfg, spec, model, store } = load_checkpoint(ckpt, env)?;
    let tokenizer = match &spec {
        // A GGUF file's tokenizer has no tokenizer.json to copy.
        Some(TokenizerSpec::Hf { path, .. }) if !path.ends_with(".gguf") => Some(std::path::PathBuf::from(path)),
        _ => None,
    };
    pretrained::export_llama(&cfg.layer_mixers()?, &cfg.model.ffn, &model.shape, &store, out, tokenizer.as_deref())
}

/// A markdown table of a bench result.
pub fn bench_table(res: &serde_json::Value) -> String {
    let mut s = format!(
        "{} on {} ({})\n\n| T | batch | train tok/s | prefill tok/s | decode tok/s | train peak MiB | cache MiB at T |\n|---|---|---|---|---|---|---|\n",
        res["layers"].as_str().unwrap_or("?"),
        res["env"]["device"]["name"].as_str().unwrap_or("?"),
        res["env"]["dtype"].as_str().unwrap_or("?"),
    );
    let f = |v: &serde_json::Value| v.as_f64().map_or("–".to_string(), |x| format!("{x:.0}"));
    let mib = |v: &serde_json::Value| v.as_f64().map_or("–".to_string(), |x| format!("{:.1}", x / 1048576.0));
    for r in res["rows"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r["seq_len"],
            r["batch"],
            f(&r["train_tokens_per_s"]),
            f(&r["prefill_tokens_per_s"]),
            f(&r["decode_tokens_per_s"]),
            mib(&r["train_peak_bytes"]),
            mib(&r["cache_bytes_at_seq_len"]),
        ));
    }
    s
}
