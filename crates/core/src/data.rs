//! Data: tokenizers (bytes, characters, any HF `tokenizer.json`), text corpora with a deterministic
//! train/val split, and the synthetic MQAR task of Zoology (Arora et al. 2023, §3.1).

use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// A training / eval batch: inputs and next-token targets (B, T) u32, and a {0,1} mask (B, T) of
/// the positions that count toward loss and accuracy (None: all).
#[derive(Debug, Clone)]
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub mask: Option<Tensor>,
}

// ---------------------------------------------------------------- tokenizers

/// A tokenizer, serialisable into a checkpoint so that `zoo eval` reproduces the training ids.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TokenizerSpec {
    /// UTF-8 bytes, vocab 256.
    Bytes,
    /// Characters; `chars` is the vocabulary in id order (built from the corpus).
    Chars { chars: Vec<char> },
    /// A HuggingFace `tokenizer.json` file, with the FNV-1a 64 hash of its bytes at training time
    /// (checked when the spec is loaded again; absent in checkpoints from before it).
    Hf {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hash: Option<String>,
    },
}

/// FNV-1a 64 of a byte string, as 16 hex digits: a content fingerprint (not a cryptographic hash).
pub fn fnv1a_hex(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub enum Tokenizer {
    Bytes,
    Chars { chars: Vec<char>, index: HashMap<char, u32> },
    Hf { tok: Box<tokenizers::Tokenizer>, path: String, hash: String },
}

impl Tokenizer {
    pub fn bytes() -> Self {
        Tokenizer::Bytes
    }

    /// Character vocabulary from a corpus: its distinct characters, sorted (nanoGPT's recipe).
    pub fn chars_from(text: &str) -> Self {
        let mut chars: Vec<char> = text.chars().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        chars.sort();
        Self::from_chars(chars)
    }

    fn from_chars(chars: Vec<char>) -> Self {
        let index = chars.iter().enumerate().map(|(i, &c)| (c, i as u32)).collect();
        Tokenizer::Chars { chars, index }
    }

    pub fn hf(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("reading tokenizer {}: {e}", path.display()))?;
        let tok = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", path.display()))?;
        Ok(Tokenizer::Hf { tok: Box::new(tok), path: path.display().to_string(), hash: fnv1a_hex(&bytes) })
    }

    /// A tokenizer built in memory (e.g. from a GGUF file's metadata), named by `source`; its hash
    /// is that of its JSON serialisation.
    pub fn from_hf(tok: tokenizers::Tokenizer, source: &str) -> Result<Self> {
        let json = tok.to_string(false).map_err(|e| anyhow::anyhow!("serialising tokenizer {source}: {e}"))?;
        Ok(Tokenizer::Hf { tok: Box::new(tok), path: source.to_string(), hash: fnv1a_hex(json.as_bytes()) })
    }

    pub fn from_spec(spec: &TokenizerSpec) -> Result<Self> {
        Ok(match spec {
            TokenizerSpec::Bytes => Tokenizer::Bytes,
            TokenizerSpec::Chars { chars } => Self::from_chars(chars.clone()),
            TokenizerSpec::Hf { path, hash } => {
                let tok = Self::hf(Path::new(path))?;
                if let (Some(want), Tokenizer::Hf { hash: got, .. }) = (hash, &tok) {
                    anyhow::ensure!(
                        want == got,
                        "tokenizer {path} changed since training (hash {got}, trained with {want}): its ids would not \
                         match the checkpoint's"
                    );
                }
                tok
            }
        })
    }

    pub fn spec(&self) -> TokenizerSpec {
        match self {
            Tokenizer::Bytes => TokenizerSpec::Bytes,
            Tokenizer::Chars { chars, .. } => TokenizerSpec::Chars { chars: chars.clone() },
            Tokenizer::Hf { path, hash, .. } => TokenizerSpec::Hf { path: path.clone(), hash: Some(hash.clone()) },
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Chars { chars, .. } => chars.len(),
            Tokenizer::Hf { tok, .. } => tok.get_vocab_size(true),
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Chars { index, .. } => text
                .chars()
                .map(|c| index.get(&c).copied().with_context(|| format!("character {c:?} is not in the vocabulary")))
                .collect(),
            Tokenizer::Hf { tok, .. } => {
                Ok(tok.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec())
            }
        }
    }

    /// UTF-8 bytes a token stands for (for bits-per-byte).
    pub fn token_bytes(&self, id: u32) -> usize {
        match self {
            Tokenizer::Bytes => 1,
            Tokenizer::Chars { chars, .. } => chars.get(id as usize).map_or(1, |c| c.len_utf8()),
            Tokenizer::Hf { tok, .. } => tok.decode(&[id], false).map(|s| s.len()).unwrap_or(1),
        }
    }
}

// ---------------------------------------------------------------- text corpora

/// A tokenised corpus split into train (first `1 - val_fraction`) and val (the rest), as nanoGPT.
pub struct TextData {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
    /// Mean UTF-8 bytes per val token (for bits-per-byte).
    pub val_bytes_per_token: f64,
}

impl TextData {
    pub fn new(tokens: Vec<u32>, val_fraction: f64, tok: &Tokenizer) -> Result<Self> {
        if !(0.0..1.0).contains(&val_fraction) || val_fraction == 0.0 {
            bail!("val_fraction: {val_fraction} must be in (0, 1)");
        }
        let n_val = ((tokens.len() as f64) * val_fraction) as usize;
        let split = tokens.len() - n_val;
        let val = tokens[split..].to_vec();
        let bytes: usize = val.iter().map(|&t| tok.token_bytes(t)).sum();
        Ok(Self { train: tokens[..split].to_vec(), val_bytes_per_token: bytes as f64 / val.len().max(1) as f64, val })
    }

    /// `batch` random windows of `seq_len + 1` tokens from the train split (nanoGPT `get_batch`).
    pub fn train_batch(&self, rng: &mut Rng, batch: usize, seq_len: usize, device: &Device) -> Result<Batch> {
        if self.train.len() <= seq_len + 1 {
            bail!("train split has {} tokens, fewer than seq_len + 1 = {}", self.train.len(), seq_len + 1);
        }
        let starts: Vec<usize> = (0..batch).map(|_| rng.below(self.train.len() - seq_len - 1)).collect();
        windows(&self.train, &starts, seq_len, device)
    }

    /// Deterministic val batches: up to `max_batches` batches of non-overlapping windows spread evenly
    /// over the val split.
    pub fn val_batches(&self, batch: usize, seq_len: usize, max_batches: usize, device: &Device) -> Result<Vec<Batch>> {
        let n_windows = (self.val.len().saturating_sub(1)) / seq_len;
        if n_windows == 0 {
            bail!("val split has {} tokens, fewer than seq_len + 1 = {}", self.val.len(), seq_len + 1);
        }
        let want = (max_batches * batch).min(n_windows);
        let stride = n_windows / want;
        let starts: Vec<usize> = (0..want).map(|i| i * stride * seq_len).collect();
        starts.chunks(batch).map(|c| windows(&self.val, c, seq_len, device)).collect()
    }
}

fn windows(tokens: &[u32], starts: &[usize], seq_len: usize, device: &Device) -> Result<Batch> {
    let mut x = Vec::with_capacity(starts.len() * seq_len);
    let mut y = Vec::with_capacity(starts.len() * seq_len);
    for &s in starts {
        x.extend_from_slice(&tokens[s..s + seq_len]);
        y.extend_from_slice(&tokens[s + 1..s + seq_len + 1]);
    }
    let b = starts.len();
    Ok(Batch {
        inputs: Tensor::from_vec(x, (b, seq_len), device)?,
        targets: Tensor::from_vec(y, (b, seq_len), device)?,
        mask: None,
    })
}

// ---------------------------------------------------------------- MQAR

/// One MQAR example set: `examples` sequences of length `seq_len` with `kv_pairs` key-value pairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqarSegment {
    pub seq_len: usize,
    pub kv_pairs: usize,
    pub examples: usize,
}

/// Generated MQAR examples (Zoology's `multiquery_ar`): the sequence opens with `kv_pairs`
/// key-value pairs (keys from [1, V/2), values from [V/2, V), each drawn without replacement),
/// then each key is queried once, at a gap drawn from the power law p(g) ∝ g^(α−1) (α = 0.01);
/// the answer (the key's value) is the target at the query position, and only those positions
/// count. Other query-region tokens are random noise from [0, V).
pub struct Mqar {
    pub seq_len: usize,
    pub kv_pairs: usize,
    /// (N · seq_len) inputs, targets and mask, row-major.
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub mask: Vec<f32>,
}

impl Mqar {
    pub fn validate(vocab: usize, seg: &MqarSegment) -> std::result::Result<(), String> {
        if vocab < 4 || vocab % 2 != 0 {
            return Err(format!("vocab_size: {vocab} must be even and at least 4"));
        }
        if seg.kv_pairs == 0 {
            return Err("kv_pairs: must be at least 1".into());
        }
        if seg.kv_pairs > vocab / 2 - 1 {
            return Err(format!(
                "kv_pairs: {} exceeds the {} distinct keys of vocab {vocab}",
                seg.kv_pairs,
                vocab / 2 - 1
            ));
        }
        let ctx = 2 * seg.kv_pairs;
        if seg.seq_len < ctx + 2 || (seg.seq_len - ctx) / 2 < seg.kv_pairs {
            return Err(format!(
                "seq_len: {} leaves no room to query {} pairs (need at least {})",
                seg.seq_len,
                seg.kv_pairs,
                4 * seg.kv_pairs
            ));
        }
        if seg.examples == 0 {
            return Err("examples: must be at least 1".into());
        }
        Ok(())
    }

    pub fn generate(vocab: usize, seg: &MqarSegment, power_a: f64, rng: &mut Rng) -> Result<Self> {
        Self::validate(vocab, seg).map_err(|e| anyhow::anyhow!(e))?;
        let (t, kv) = (seg.seq_len, seg.kv_pairs);
        let ctx = 2 * kv;
        let space = (t - ctx) / 2;
        let p: Vec<f64> = (1..=space).map(|g| power_a * (g as f64).powf(power_a - 1.0)).collect();
        let half = vocab / 2;
        let mut key_pool: Vec<u32> = (1..half as u32).collect();
        let mut val_pool: Vec<u32> = (half as u32..vocab as u32).collect();
        let mut inputs = Vec::with_capacity(seg.examples * t);
        let mut targets = Vec::with_capacity(seg.examples * t);
        let mut mask = Vec::with_capacity(seg.examples * t);
        for _ in 0..seg.examples {
            let keys = rng.sample_distinct(&mut key_pool, kv);
            let vals = rng.sample_distinct(&mut val_pool, kv);
            // Full sequence of t + 1 tokens; inputs = seq[..t], targets = seq[1..].
            let mut seq = vec![0u32; t + 1];
            let mut lab = vec![None::<u32>; t + 1];
            for i in 0..kv {
                seq[2 * i] = keys[i];
                seq[2 * i + 1] = vals[i];
            }
            let gaps = rng.choose_weighted_distinct(&p, kv);
            for (i, g) in gaps.into_iter().enumerate() {
                seq[ctx + 2 * g] = keys[i];
                lab[ctx + 2 * g + 1] = Some(vals[i]);
            }
            let is_query: Vec<bool> = (0..=t).map(|j| j >= ctx && j + 1 <= t && lab[j + 1].is_some()).collect();
            for j in ctx..=t {
                if seq[j] == 0 && !is_query[j] {
                    seq[j] = rng.below(vocab) as u32;
                }
            }
            for j in 0..t {
                inputs.push(seq[j]);
                match lab[j + 1] {
                    Some(v) => {
                        targets.push(v);
                        mask.push(1.0);
                    }
                    None => {
                        targets.push(seq[j + 1]);
                        mask.push(0.0);
                    }
                }
            }
        }
        Ok(Self { seq_len: t, kv_pairs: kv, inputs, targets, mask })
    }

    pub fn len(&self) -> usize {
        self.inputs.len() / self.seq_len
    }

    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// Example `i`: its inputs, targets and mask.
    pub fn row(&self, i: usize) -> (&[u32], &[u32], &[f32]) {
        let t = self.seq_len;
        let r = i * t..(i + 1) * t;
        (&self.inputs[r.clone()], &self.targets[r.clone()], &self.mask[r])
    }

    /// The examples at `idx` as a batch.
    pub fn batch(&self, idx: &[usize], device: &Device) -> Result<Batch> {
        let rows: Vec<_> = idx.iter().map(|&i| self.row(i)).collect();
        padded_batch(&rows, device)
    }
}

/// Stack example rows (inputs, targets, mask) into a batch, each right-padded to the longest with
/// token 0 and mask 0 (a causal model's real positions never see the padding, and padded
/// positions never count). Rows of one length are stacked as they are.
pub fn padded_batch(rows: &[(&[u32], &[u32], &[f32])], device: &Device) -> Result<Batch> {
    let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let n = rows.len() * t;
    let (mut x, mut y, mut m) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for &(xi, yi, mi) in rows {
        let pad = t - xi.len();
        x.extend_from_slice(xi);
        x.extend(std::iter::repeat_n(0u32, pad));
        y.extend_from_slice(yi);
        y.extend(std::iter::repeat_n(0u32, pad));
        m.extend_from_slice(mi);
        m.extend(std::iter::repeat_n(0f32, pad));
    }
    let b = rows.len();
    Ok(Batch {
        inputs: Tensor::from_vec(x, (b, t), device)?,
        targets: Tensor::from_vec(y, (b, t), device)?,
        mask: Some(Tensor::from_vec(m, (b, t), device)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqar_structure() {
        let seg = MqarSegment { seq_len: 64, kv_pairs: 8, examples: 20 };
        let d = Mqar::generate(128, &seg, 0.01, &mut Rng::new(0)).unwrap();
        assert_eq!(d.len(), 20);
        for e in 0..20 {
            let x = &d.inputs[e * 64..(e + 1) * 64];
            let y = &d.targets[e * 64..(e + 1) * 64];
            let m = &d.mask[e * 64..(e + 1) * 64];
            // kv pairs: keys in [1, 64), values in [64, 128).
            let mut kv = HashMap::new();
            for i in 0..8 {
                assert!((1..64).contains(&x[2 * i]) && (64..128).contains(&x[2 * i + 1]));
                kv.insert(x[2 * i], x[2 * i + 1]);
            }
            assert_eq!(kv.len(), 8, "keys are distinct");
            // exactly one query per key, answered by its value
            let answers: Vec<usize> = (0..64).filter(|&j| m[j] == 1.0).collect();
            assert_eq!(answers.len(), 8);
            let mut asked = std::collections::HashSet::new();
            for j in answers {
                assert!(j >= 16);
                assert_eq!(kv[&x[j]], y[j]);
                asked.insert(x[j]);
            }
            assert_eq!(asked.len(), 8);
        }
        // Seeded: same seed, same data; other seed, other data.
        let d2 = Mqar::generate(128, &seg, 0.01, &mut Rng::new(0)).unwrap();
        let d3 = Mqar::generate(128, &seg, 0.01, &mut Rng::new(1)).unwrap();
        assert_eq!(d.inputs, d2.inputs);
        assert_ne!(d.inputs, d3.inputs);
    }

    #[test]
    fn mqar_gaps_follow_power_law() {
        // Small gaps must dominate: with α = 0.01, p(g) ∝ g^-0.99.
        let seg = MqarSegment { seq_len: 256, kv_pairs: 4, examples: 400 };
        let d = Mqar::generate(256, &seg, 0.01, &mut Rng::new(5)).unwrap();
        let (mut near, mut far) = (0, 0);
        for e in 0..400 {
            for j in 0..256 {
                if d.mask[e * 256 + j] == 1.0 {
                    if j < 8 + 2 * 30 {
                        near += 1
                    } else {
                        far += 1
                    }
                }
            }
        }
        assert!(near > far, "near {near} far {far}");
    }

    #[test]
    fn mqar_bad_configs() {
        assert!(Mqar::validate(128, &MqarSegment { seq_len: 16, kv_pairs: 8, examples: 1 })
            .unwrap_err()
            .starts_with("seq_len"));
        assert!(Mqar::validate(127, &MqarSegment { seq_len: 64, kv_pairs: 4, examples: 1 })
            .unwrap_err()
            .starts_with("vocab_size"));
        assert!(Mqar::validate(16, &MqarSegment { seq_len: 64, kv_pairs: 8, examples: 1 })
            .unwrap_err()
            .starts_with("kv_pairs"));
    }

    #[test]
    fn char_tokenizer_and_split() {
        let tok = Tokenizer::chars_from("hello world");
        assert_eq!(tok.vocab_size(), 8);
        let ids = tok.encode("hello world").unwrap();
        assert!(tok.encode("z").is_err());
        let data = TextData::new(ids.clone(), 0.25, &tok).unwrap();
        assert_eq!(data.train.len() + data.val.len(), ids.len());
        assert_eq!(&data.val[..], &ids[ids.len() - 2..]);
    }
}
