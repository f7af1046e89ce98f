//! Passkey retrieval under KV compression (`zoo kv needle`; the passkey task of Mohtashami &
//! Jaggi 2023, "Landmark Attention", §4.2, which Q-Filters and the L2-norm paper use as their
//! needle-in-a-haystack test). A prompt of `length` tokens: an instruction, generated filler
//! ("The grass is green. The sky is blue. …", repeated), at relative `depth` of the filler a
//! sentence giving a random 5-digit pass key, and the question "What is the pass key? The pass key
//! is". The model reads the prompt once (its cache observing the queries every press needs); for
//! each press and ratio a copy of the cache is compressed and the model greedily writes a few
//! tokens; a hit is an answer containing the key. Every cell is (length, depth, press, ratio) over
//! `trials` keys.

use crate::pretrained::{sample, GenOpts, Pretrained};
use anyhow::{Context, Result};
use zoo_core::candle_core::{DType, Tensor};
use zoo_kv_compress::{compress_seen, PressConfig};

pub const FILLER: &str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
const INSTRUCTION: &str =
    "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the pass key.\n";
const QUESTION: &str = "\nWhat is the pass key? The pass key is";

pub struct NeedleOpts {
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub ratios: Vec<f64>,
    pub trials: usize,
    pub seed: u64,
    /// Tokens written after the question.
    pub answer_tokens: usize,
    /// How every press's kept entries are spread over layers and heads (`--budget`).
    pub budget: zoo_kv_compress::Budget,
}

/// The prompt's token ids: instruction, filler up to `length` tokens in all, the key sentence
/// inserted at `depth` ∈ [0, 1] of the filler, the question. Pieces are tokenized separately.
pub fn prompt_ids(tok: &tokenizers::Tokenizer, length: usize, depth: f64, key: &str) -> Result<Vec<u32>> {
    let enc = |s: &str| -> Result<Vec<u32>> { Ok(tok.encode(s, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec()) };
    let (head, needle, tail) = (enc(INSTRUCTION)?, enc(&format!(" The pass key is {key}. Remember it. {key} is the pass key. "))?, enc(QUESTION)?);
    let fixed = head.len() + needle.len() + tail.len();
    anyhow::ensure!(length > fixed, "--lengths: {length} tokens cannot hold the instruction, key and question ({fixed})");
    let unit = enc(FILLER)?;
    let filler: Vec<u32> = unit.iter().copied().cycle().take(length - fixed).collect();
    let at = ((depth.clamp(0.0, 1.0) * filler.len() as f64).round() as usize).min(filler.len());
    Ok([head, filler[..at].to_vec(), needle, filler[at..].to_vec(), tail].concat())
}

/// Run the grid; returns the JSON (schema `zoo.needle/1`) with one cell per (length, depth,
/// press, ratio); the full cache is run once per prompt, presses at every ratio above 0. After
/// each (length, depth) `progress` gets the JSON so far (`"complete": false`), so a caller can
/// write it and a killed run keeps what it finished.
pub fn run(
    p: &Pretrained,
    presses: &[PressConfig],
    o: &NeedleOpts,
    mut progress: impl FnMut(&str, &serde_json::Value) -> Result<()>,
) -> Result<serde_json::Value> {
    let tok = p.tokenizer.as_ref().context("the model has no tokenizer")?;
    let dev = p.model.embed.weight.device().clone();
    let built: Vec<_> = presses.iter().map(|c| c.build()).collect::<zoo_core::candle_core::Result<_>>()?;
    let window = built.iter().filter_map(|b| b.observe()).max();
    let greedy = GenOpts { max_tokens: o.answer_tokens, temperature: 0.0, top_p: 1.0, seed: 0, packer: None, duo: None };
    let mut cells = Vec::new();
    let mut rng = zoo_core::rng::Rng::new(o.seed);
    for &length in &o.lengths {
        anyhow::ensure!(length <= p.context_length, "--lengths: {length} exceeds the model's context of {}", p.context_length);
        for &depth in &o.depths {
            // (press index or None for the full cache, ratio) -> hits and answers.
            let mut tally: Vec<(Option<usize>, f64, usize, Vec<String>)> = vec![(None, 0.0, 0, vec![])];
            for (i, _) in presses.iter().enumerate() {
                for &r in o.ratios.iter().filter(|&&r| r > 0.0) {
                    tally.push((Some(i), r, 0, vec![]));
                }
            }
            for _ in 0..o.trials {
                let key = format!("{:05}", rng.below(100_000));
                let ids = prompt_ids(tok, length, depth, &key)?;
                let mut cache = p.model.new_cache_with_capacity(ids.len() + o.answer_tokens);
                zoo_kv_compress::observe_window(&mut cache, window);
                let x = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
                let logits = p.model.forward_keep(&x, Some(&mut cache), None, Some(1))?.logits;
                let row: Vec<f32> = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                for (press, ratio, hits, answers) in tally.iter_mut() {
                    let mut c = cache.clone();
                    if let Some(i) = press {
                        compress_seen(&mut c, built[*i].as_ref(), *ratio, &o.budget)?;
                    }
                    let mut r = row.clone();
                    let mut out = Vec::new();
                    let mut rng0 = zoo_core::rng::Rng::new(0);
                    for step in 0..o.answer_tokens {
                        let next = sample(&r, &greedy, &mut rng0);
                        out.push(next);
                        if step + 1 < o.answer_tokens {
                            let x = Tensor::new(&[next], &dev)?.unsqueeze(0)?;
                            r = p.model.forward(&x, Some(&mut c), None)?.logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                        }
                    }
                    let text = tok.decode(&out, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
                    *hits += usize::from(text.contains(&key));
                    answers.push(format!("{key}: {}", text.trim()));
                }
            }
            for (press, ratio, hits, answers) in tally {
                cells.push(serde_json::json!({
                    "length": length,
                    "depth": depth,
                    "press": press.map(|i| serde_json::to_value(&presses[i])).transpose()?,
                    "ratio": ratio,
                    "budget": press.map(|_| serde_json::to_value(&o.budget)).transpose()?,
                    "hits": hits,
                    "trials": o.trials,
                    "answers": answers,
                }));
            }
            progress(&format!("length {length}, depth {depth} done"), &summary(o, &cells, false))?;
        }
    }
    Ok(summary(o, &cells, true))
}

fn summary(o: &NeedleOpts, cells: &[serde_json::Value], complete: bool) -> serde_json::Value {
    serde_json::json!({
        "schema": crate::schema::NEEDLE_SCHEMA,
        "lengths": o.lengths,
        "depths": o.depths,
        "ratios": o.ratios,
        "trials": o.trials,
        "seed": o.seed,
        "filler": FILLER,
        "complete": complete,
        "cells": cells,
    })
}
