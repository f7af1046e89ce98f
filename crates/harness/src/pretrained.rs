//! Pretrained models loaded into the zoo `Lm` (same blocks, mixers and FFNs as a model trained
//! here, so every variant applies to them). First slice of issue 13: GGUF files of the llama
//! architecture (e.g. SmolLM2), weights dequantized to f32, q/k rows un-permuted from GGUF's
//! interleaved-RoPE order back to the half-split order zoo's RoPE (and HF's) uses, and the BPE
//! tokenizer rebuilt from the GGUF metadata.

use crate::config::ModelConfig;
use crate::env::Env;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use zoo_core::candle_core::quantized::gguf_file::{Content, Value};
use zoo_core::candle_core::{Device, Tensor};
use zoo_core::model::{Lm, LmShape};
use zoo_core::params::ParamStore;

/// A loaded model, its architecture as a zoo model config, and its tokenizer.
pub struct Pretrained {
    pub model: Lm,
    pub store: ParamStore,
    pub config: ModelConfig,
    pub tokenizer: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub context_length: usize,
}

fn meta<'a>(c: &'a Content, file: &Path, key: &str) -> Result<&'a Value> {
    c.metadata.get(key).with_context(|| format!("{}: GGUF metadata lacks `{key}`", file.display()))
}

fn meta_u32(c: &Content, file: &Path, key: &str) -> Result<u32> {
    meta(c, file, key)?.to_u32().with_context(|| format!("{}: GGUF `{key}` is not a u32", file.display()))
}

fn meta_f32(c: &Content, file: &Path, key: &str) -> Result<f32> {
    meta(c, file, key)?.to_f32().with_context(|| format!("{}: GGUF `{key}` is not an f32", file.display()))
}

/// GGUF's llama q/k rows are permuted for interleaved RoPE: per head, HF row `i·(hd/2)+j`
/// (half i ∈ {0, 1}, pair j) sits at GGUF row `2j+i`. Undo it: (h, hd/2, 2, in) -> (h, 2, hd/2, in).
pub fn unpermute_qk(w: &Tensor, heads: usize) -> zoo_core::candle_core::Result<Tensor> {
    let (out, d_in) = w.dims2()?;
    let hd = out / heads;
    w.reshape((heads, hd / 2, 2, d_in))?.transpose(1, 2)?.reshape((out, d_in))
}

/// Load a llama-architecture GGUF file as a zoo model on `env`'s device (f32 weights).
pub fn load_gguf(path: &Path, env: &Env) -> Result<Pretrained> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = Content::read(&mut f).map_err(|e| anyhow::anyhow!("{}: not a readable GGUF file: {e}", path.display()))?;
    let arch = meta(&content, path, "general.architecture")?
        .to_string()
        .map_err(|e| anyhow::anyhow!("{}: general.architecture: {e}", path.display()))?
        .clone();
    if arch != "llama" {
        bail!("{}: unsupported architecture `{arch}` (zoo loads GGUF files of the llama architecture)", path.display());
    }
    let key = |k: &str| format!("llama.{k}");
    let d = meta_u32(&content, path, &key("embedding_length"))? as usize;
    let n_layers = meta_u32(&content, path, &key("block_count"))? as usize;
    let heads = meta_u32(&content, path, &key("attention.head_count"))? as usize;
    let kv_heads = match content.metadata.get(&key("attention.head_count_kv")) {
        Some(v) => v.to_u32().map_err(|e| anyhow::anyhow!("{}: head_count_kv: {e}", path.display()))? as usize,
        None => heads,
    };
    let hidden = meta_u32(&content, path, &key("feed_forward_length"))? as usize;
    let eps = meta_f32(&content, path, &key("attention.layer_norm_rms_epsilon"))? as f64;
    let theta = match content.metadata.get(&key("rope.freq_base")) {
        Some(v) => v.to_f32().map_err(|e| anyhow::anyhow!("{}: rope.freq_base: {e}", path.display()))? as f64,
        None => 10_000.0,
    };
    let context_length = meta_u32(&content, path, &key("context_length"))? as usize;
    if content.metadata.contains_key(&key("rope.scaling.type")) {
        bail!("{}: RoPE scaling (`llama.rope.scaling.type`) is not supported yet", path.display());
    }

    // Every tensor, dequantized to f32 on the CPU, under zoo's parameter names.
    let mut tensors = BTreeMap::new();
    let tied = !content.tensor_infos.contains_key("output.weight");
    let mut vocab = 0;
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut f, name, &Device::Cpu).with_context(|| format!("{}: reading tensor `{name}`", path.display()))?;
        let t = q.dequantize(&Device::Cpu).with_context(|| format!("{}: dequantizing `{name}`", path.display()))?;
        let ours = match name.as_str() {
            "token_embd.weight" => {
                vocab = t.dim(0)?;
                "embed.weight".to_string()
            }
            "output_norm.weight" => "norm_f.weight".into(),
            "output.weight" => "head.weight".into(),
            n => {
                let rest = n.strip_prefix("blk.").with_context(|| format!("{}: unexpected tensor `{n}`", path.display()))?;
                let (i, part) = rest.split_once('.').with_context(|| format!("{}: unexpected tensor `{n}`", path.display()))?;
                let l = format!("layers.{i}");
                match part {
                    "attn_norm.weight" => format!("{l}.norm1.weight"),
                    "ffn_norm.weight" => format!("{l}.norm2.weight"),
                    "attn_q.weight" => {
                        tensors.insert(format!("{l}.mixer.q_proj.weight"), unpermute_qk(&t, heads)?);
                        continue;
                    }
                    "attn_k.weight" => {
                        tensors.insert(format!("{l}.mixer.k_proj.weight"), unpermute_qk(&t, kv_heads)?);
                        continue;
                    }
                    "attn_v.weight" => format!("{l}.mixer.v_proj.weight"),
                    "attn_output.weight" => format!("{l}.mixer.o_proj.weight"),
                    "ffn_gate.weight" => format!("{l}.ffn.w1.weight"),
                    "ffn_up.weight" => format!("{l}.ffn.w3.weight"),
                    "ffn_down.weight" => format!("{l}.ffn.w2.weight"),
                    other => bail!("{}: unexpected tensor `blk.{i}.{other}`", path.display()),
                }
            }
        };
        tensors.insert(ours, t);
    }
    if vocab == 0 {
        bail!("{}: no `token_embd.weight` tensor", path.display());
    }

    let config: ModelConfig = toml::from_str(&format!(
        "d_model = {d}\nn_layers = {n_layers}\ntie_embeddings = {tied}\nnorm_eps = {eps:e}\n\
         mixer = {{ type = \"attention\", n_heads = {heads}, n_kv_heads = {kv_heads}, rope_theta = {theta:.1} }}\n\
         ffn = {{ type = \"swiglu\", hidden = {hidden} }}\n"
    ))
    .context("building the model config")?;
    let shape = LmShape { vocab_size: vocab, d_model: d, n_layers, tie_embeddings: tied, norm_eps: eps, max_seq_len: context_length };
    let mixers = vec![config.mixer.clone().expect("set above"); n_layers];
    let (model, store) = crate::runner::build_lm(&shape, &mixers, &config.ffn, 0, env)?;
    store.load(&tensors).with_context(|| format!("{}: loading weights", path.display()))?;
    let (tokenizer, bos, eos) = gguf_tokenizer(&content, path)?;
    Ok(Pretrained { model, store, config, tokenizer, bos, eos, context_length })
}

/// The BPE tokenizer of a GGUF file (`tokenizer.ggml.model = "gpt2"`): tokens and merges from the
/// metadata, byte-level pre-tokenisation (digits split one by one first for SmolLM's `smollm`
/// pre-tokenizer, as its tokenizer.json does), control tokens as special tokens.
pub fn gguf_tokenizer(c: &Content, file: &Path) -> Result<(tokenizers::Tokenizer, Option<u32>, Option<u32>)> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence};
    use tokenizers::{AddedToken, PreTokenizerWrapper};
    let model = meta(c, file, "tokenizer.ggml.model")?.to_string().map_err(|e| anyhow::anyhow!("{e}"))?.clone();
    if model != "gpt2" {
        bail!("{}: tokenizer model `{model}` is not supported (zoo builds `gpt2` BPE tokenizers)", file.display());
    }
    let strings = |k: &str| -> Result<Vec<String>> {
        let v = meta(c, file, k)?.to_vec().map_err(|e| anyhow::anyhow!("{}: `{k}`: {e}", file.display()))?;
        v.iter()
            .map(|x| x.to_string().cloned().map_err(|e| anyhow::anyhow!("{}: `{k}`: {e}", file.display())))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').with_context(|| format!("{}: merge `{m}` has no space", file.display()))?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<_>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| anyhow::anyhow!("BPE: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let pre = match c.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map(String::as_str) {
        Some("smollm") => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ])),
        _ => PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    };
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    if let Some(types) = c.metadata.get("tokenizer.ggml.token_type") {
        let types = types.to_vec().map_err(|e| anyhow::anyhow!("{e}"))?;
        let special: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| t.to_i32().is_ok_and(|t| t == 3))
            .map(|(_, s)| AddedToken::from(s.clone(), true))
            .collect();
        tok.add_special_tokens(special).map_err(|e| anyhow::anyhow!("special tokens: {e}"))?;
    }
    let id = |k: &str| c.metadata.get(k).and_then(|v| v.to_u32().ok());
    Ok((tok, id("tokenizer.ggml.bos_token_id"), id("tokenizer.ggml.eos_token_id")))
}

/// Perplexity of the model over `ids` as one sequence: exp of the mean next-token NLL over
/// positions 1..len (every position's logits, not only the last).
pub fn perplexity_of(model: &Lm, ids: &[u32], device: &Device) -> Result<f64> {
    anyhow::ensure!(ids.len() >= 2, "need at least 2 tokens, got {}", ids.len());
    let n = ids.len() - 1;
    let x = Tensor::from_vec(ids[..n].to_vec(), (1, n), device)?;
    let y = Tensor::from_vec(ids[1..].to_vec(), (1, n), device)?;
    let out = model.forward(&x, None, None)?;
    let nll = zoo_core::model::cross_entropy(&out.logits, &y, None)?.to_dtype(zoo_core::candle_core::DType::F64)?;
    Ok(nll.to_scalar::<f64>()?.exp())
}

/// Sum of next-token NLLs over a long token stream with a sliding window of `window` tokens and
/// stride `window / 2`: each window scores only the positions no earlier window scored, with up
/// to `window - stride` tokens of context before them (the first window scores all of its own).
/// Returns (sum of NLL, positions scored).
pub fn sliding_nll(model: &Lm, ids: &[u32], window: usize, device: &Device) -> Result<(f64, usize)> {
    anyhow::ensure!(window >= 2, "window must be at least 2 tokens");
    anyhow::ensure!(ids.len() >= 2, "the text has {} tokens; need at least 2", ids.len());
    let stride = (window / 2).max(1);
    let (mut sum, mut n, mut scored_to) = (0.0, 0usize, 0usize); // predictions of ids[1..scored_to] done
    let mut start = 0;
    loop {
        let end = (start + window).min(ids.len());
        let x = Tensor::from_vec(ids[start..end - 1].to_vec(), (1, end - 1 - start), device)?;
        let logits = model.forward(&x, None, None)?.logits; // (1, L, V): predicts ids[start+1..end]
        let first = scored_to.max(start + 1); // first target index not yet scored
        let k = end - first;
        let lg = logits.narrow(1, first - start - 1, k)?;
        let y = Tensor::from_vec(ids[first..end].to_vec(), (1, k), device)?;
        let nll = zoo_core::model::cross_entropy(&lg, &y, None)?.to_dtype(zoo_core::candle_core::DType::F64)?;
        sum += nll.to_scalar::<f64>()? * k as f64;
        n += k;
        scored_to = end;
        if end == ids.len() {
            break;
        }
        start += stride;
    }
    Ok((sum, n))
}

/// `zoo eval --model`: perplexity of a pretrained model over a text file, and tokens/s.
pub fn evaluate_model(model: &Path, text: &Path, window: usize, env: &Env) -> Result<serde_json::Value> {
    let t0 = std::time::Instant::now();
    let p = load_gguf(model, env)?;
    let load_s = t0.elapsed().as_secs_f64();
    let body = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let ids = p.tokenizer.encode(body.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", text.display()))?;
    let ids = ids.get_ids().to_vec();
    let window = window.min(p.context_length);
    let t1 = std::time::Instant::now();
    let (sum, n) = sliding_nll(&p.model, &ids, window, &env.device)?;
    env.sync()?;
    let secs = t1.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "model": model.display().to_string(),
        "text": text.display().to_string(),
        "tokens": ids.len(),
        "scored": n,
        "window": window,
        "stride": (window / 2).max(1),
        "perplexity": (sum / n as f64).exp(),
        "nll_per_token": sum / n as f64,
        "load_seconds": load_s,
        "eval_seconds": secs,
        "scored_tokens_per_s": n as f64 / secs,
        "device": env.describe(),
    }))
}
