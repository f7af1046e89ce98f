//! KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", §3-4):
//! keys quantised per channel, values per token, asymmetric round-to-nearest with a scale and a
//! zero point per group, the most recent tokens kept at full precision.
//!
//! For a group of values x: `z = min x`, `s = (max x − z) / (2^b − 1)`, `code = round((x − z) / s)`
//! in `[0, 2^b − 1]`, `x̂ = z + s · code` (s and z stored in f16, as KIVI does, and the codes
//! computed from the stored values). Groups:
//! - per channel (KIVI's keys): each channel of a block of `group` tokens, so outlier channels get
//!   their own range (the paper's §3 observation on key outliers);
//! - per token (KIVI's values): each run of `group` channels of one token (all of `hd` if smaller).
//!
//! The cache ([`KvCache::set_packer`]) keeps the latest `residual` tokens and the partial block at
//! full precision and packs the oldest `group` tokens whenever `residual + group` are held (KIVI's
//! keys work this way; its values are quantised token by token as they leave the residual, which
//! stores the same codes, up to `group − 1` tokens later here). Codes are packed `8 / b` to a byte
//! (u8 tensors); scales and zero points count in the bytes. A query attends over the blocks
//! unpacked (a transient copy) followed by the full-precision slots.
//!
//! ```
//! use zoo_core::candle_core::{Device, Tensor};
//! use zoo_core::state::KvPacker;
//! use zoo_kv_compress::kivi::{Axis, Kivi, KiviConfig};
//! let cfg = KiviConfig { bits: 2, key_axis: Axis::Channel, value_axis: Axis::Token, group: 4, residual: 0 };
//! let kivi = Kivi::new(&cfg, 4)?;
//! // One head, 4 tokens, hd 4: every group holds the levels 0, 1, 2, 3 exactly.
//! let x = Tensor::new(&[[0f32, 1., 2., 3.], [1., 2., 3., 0.], [2., 3., 0., 1.], [3., 0., 1., 2.]], &Device::Cpu)?
//!     .reshape((1, 1, 4, 4))?;
//! let p = kivi.pack(&x, &x)?;
//! let (k, v) = p.unpack()?;
//! assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, x.flatten_all()?.to_vec1::<f32>()?);
//! assert_eq!(v.flatten_all()?.to_vec1::<f32>()?, x.flatten_all()?.to_vec1::<f32>()?);
//! // K and V: 16 two-bit codes each (4 bytes), 4 groups of an f16 scale and zero (16 bytes).
//! assert_eq!(p.bytes(), 2 * (4 + 16));
//! # Ok::<(), zoo_core::candle_core::Error>(())
//! ```

use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{bail, DType, Result, Tensor, D};
use zoo_core::state::{KvPacker, PackedKv};

/// Along which axis a group of quantised values runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    /// One group per channel over a block of tokens (KIVI's keys).
    Channel,
    /// One group per token over `group` channels (KIVI's values).
    Token,
}

impl Axis {
    pub fn name(self) -> &'static str {
        match self {
            Axis::Channel => "channel",
            Axis::Token => "token",
        }
    }
}

fn channel() -> Axis {
    Axis::Channel
}
fn token() -> Axis {
    Axis::Token
}
fn thirty_two() -> usize {
    32
}
fn one_twenty_eight() -> usize {
    128
}

/// `kivi = { bits = 2, ... }` (the defaults are the paper's: keys per channel, values per token,
/// group 32, residual 128).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KiviConfig {
    /// 2, 4 or 8.
    pub bits: u8,
    #[serde(default = "channel")]
    pub key_axis: Axis,
    #[serde(default = "token")]
    pub value_axis: Axis,
    /// Tokens per block (per-channel groups) and channels per group (per-token groups).
    #[serde(default = "thirty_two")]
    pub group: usize,
    /// The most recent tokens kept at full precision.
    #[serde(default = "one_twenty_eight")]
    pub residual: usize,
}

impl KiviConfig {
    /// A short label: `KIVI-2 K/channel V/token G32 R128`.
    pub fn label(&self) -> String {
        format!("KIVI-{} K/{} V/{} G{} R{}", self.bits, self.key_axis.name(), self.value_axis.name(), self.group, self.residual)
    }
}

/// The packer: [`KiviConfig`] checked against the model's head dimension.
#[derive(Debug, Clone)]
pub struct Kivi {
    cfg: KiviConfig,
    /// Channels per per-token group.
    channels: usize,
}

impl Kivi {
    pub fn new(cfg: &KiviConfig, head_dim: usize) -> Result<Self> {
        if ![2, 4, 8].contains(&cfg.bits) {
            bail!("kivi.bits: {} (2, 4 or 8)", cfg.bits)
        }
        if cfg.group == 0 || cfg.group % (8 / cfg.bits as usize) != 0 {
            bail!("kivi.group: {} must be a positive multiple of {} (codes per byte at {} bits)", cfg.group, 8 / cfg.bits, cfg.bits)
        }
        let channels = cfg.group.min(head_dim);
        if head_dim % channels != 0 || channels % (8 / cfg.bits as usize) != 0 {
            bail!("kivi.group: {} does not split the head dimension {head_dim} into whole per-token groups", cfg.group)
        }
        Ok(Self { cfg: cfg.clone(), channels })
    }
}

impl KvPacker for Kivi {
    fn block(&self) -> usize {
        self.cfg.group
    }

    fn residual(&self) -> usize {
        self.cfg.residual
    }

    fn pack(&self, k: &Tensor, v: &Tensor) -> Result<Box<dyn PackedKv>> {
        Ok(Box::new(KiviBlock {
            k: quantize(k, self.cfg.key_axis, self.cfg.bits, self.channels)?,
            v: quantize(v, self.cfg.value_axis, self.cfg.bits, self.channels)?,
        }))
    }
}

/// One tensor quantised: packed codes (u8), f16 scale and zero point per group, laid out so that
/// later blocks of tokens append along dim 1 ([`Quantized::append`]):
/// - per channel: codes (B·H·hd, n·bits/8), scale and zero (B·H·hd, n / group_len);
/// - per token: codes (B·H, n·hd·bits/8), scale and zero (B·H, n·hd / group_len).
#[derive(Debug, Clone)]
pub struct Quantized {
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    /// (B, H, n, hd) and the original dtype.
    dims: (usize, usize, usize, usize),
    dtype: DType,
    axis: Axis,
    bits: u8,
    /// Values per group.
    group_len: usize,
}

impl Quantized {
    pub fn bytes(&self) -> usize {
        self.codes.elem_count() + 2 * (self.scale.elem_count() + self.zero.elem_count())
    }

    /// Append `next`, quantised the same way from the tokens after these (false: it was not).
    pub fn append(&mut self, next: &Quantized) -> Result<bool> {
        let (b, h, _, hd) = self.dims;
        let (nb, nh, nn, nhd) = next.dims;
        if (b, h, hd) != (nb, nh, nhd) || (self.axis, self.bits, self.group_len, self.dtype) != (next.axis, next.bits, next.group_len, next.dtype) {
            return Ok(false);
        }
        self.codes = Tensor::cat(&[&self.codes, &next.codes], 1)?;
        self.scale = Tensor::cat(&[&self.scale, &next.scale], 1)?;
        self.zero = Tensor::cat(&[&self.zero, &next.zero], 1)?;
        self.dims.2 += nn;
        Ok(true)
    }
}

/// Quantise x (B, H, n, hd) along `axis` with `bits` bits; per-token groups hold `channels` channels.
pub fn quantize(x: &Tensor, axis: Axis, bits: u8, channels: usize) -> Result<Quantized> {
    let (b, h, n, hd) = x.dims4()?;
    let xf = x.to_dtype(DType::F32)?;
    // Rows of one group each.
    let (rows, group_len) = match axis {
        Axis::Channel => (xf.transpose(2, 3)?.contiguous()?.reshape((b * h * hd, n))?, n),
        Axis::Token => (xf.contiguous()?.reshape((b * h * n * hd / channels, channels))?, channels),
    };
    let levels = ((1u32 << bits) - 1) as f64;
    let zero = rows.min_keepdim(D::Minus1)?.to_dtype(DType::F16)?;
    let range = (rows.max_keepdim(D::Minus1)? - zero.to_dtype(DType::F32)?)?;
    let scale = (range / levels)?.to_dtype(DType::F16)?;
    // Codes from the stored (f16) scale and zero, so that unpacking reproduces them exactly; a
    // constant group (scale 0) has every code 0.
    let (s, z) = (scale.to_dtype(DType::F32)?, zero.to_dtype(DType::F32)?);
    let safe = s.maximum(1e-30)?;
    let codes = rows.broadcast_sub(&z)?.broadcast_div(&safe)?.round()?.clamp(0.0, levels)?;
    let codes = pack(&codes.flatten_all()?, bits)?;
    let lead = match axis {
        Axis::Channel => b * h * hd,
        Axis::Token => b * h,
    };
    Ok(Quantized {
        codes: codes.reshape((lead, ()))?,
        scale: scale.reshape((lead, ()))?,
        zero: zero.reshape((lead, ()))?,
        dims: (b, h, n, hd),
        dtype: x.dtype(),
        axis,
        bits,
        group_len,
    })
}

/// Back to (B, H, n, hd) in the original dtype.
pub fn dequantize(q: &Quantized) -> Result<Tensor> {
    let (b, h, n, hd) = q.dims;
    // One row per group, its scale and zero point beside it.
    let codes = unpack(&q.codes.flatten_all()?, q.bits)?.reshape(((), q.group_len))?;
    let (s, z) = (q.scale.flatten_all()?.unsqueeze(1)?, q.zero.flatten_all()?.unsqueeze(1)?);
    let rows = codes.broadcast_mul(&s.to_dtype(DType::F32)?)?.broadcast_add(&z.to_dtype(DType::F32)?)?;
    let x = match q.axis {
        // Rows ordered (b, h, channel, block): channel-major within each (b, h).
        Axis::Channel => rows.reshape((b, h, hd, n))?.transpose(2, 3)?.contiguous()?,
        Axis::Token => rows.reshape((b, h, n, hd))?,
    };
    x.to_dtype(q.dtype)
}

/// Codes (N,) f32 in [0, 2^bits) → (N · bits / 8,) u8, code i of a byte at bits·i.
pub fn pack(codes: &Tensor, bits: u8) -> Result<Tensor> {
    let per = 8 / bits as usize;
    let n = codes.elem_count();
    if n % per != 0 {
        bail!("kivi: {n} codes do not fill whole bytes at {bits} bits")
    }
    let weights: Vec<f32> = (0..per).map(|i| (1u32 << (bits as usize * i)) as f32).collect();
    let w = Tensor::new(weights, codes.device())?;
    codes.reshape((n / per, per))?.broadcast_mul(&w)?.sum(1)?.to_dtype(DType::U8)
}

/// The inverse of [`pack`]: (N · bits / 8,) u8 → (N,) f32.
pub fn unpack(bytes: &Tensor, bits: u8) -> Result<Tensor> {
    let per = 8 / bits as usize;
    let m = (1u32 << bits) as f64;
    let div: Vec<f32> = (0..per).map(|i| (1u32 << (bits as usize * i)) as f32).collect();
    let d = Tensor::new(div, bytes.device())?;
    let x = bytes.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_div(&d)?.floor()?;
    // x mod 2^bits
    let hi = ((&x / m)?.floor()? * m)?;
    (x - hi)?.flatten_all()
}

/// A packed block: keys and values.
#[derive(Debug, Clone)]
pub struct KiviBlock {
    pub k: Quantized,
    pub v: Quantized,
}

impl PackedKv for KiviBlock {
    fn unpack(&self) -> Result<(Tensor, Tensor)> {
        Ok((dequantize(&self.k)?, dequantize(&self.v)?))
    }

    fn bytes(&self) -> usize {
        self.k.bytes() + self.v.bytes()
    }

    fn clone_box(&self) -> Box<dyn PackedKv> {
        Box::new(self.clone())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn merge(&mut self, next: &dyn PackedKv) -> Result<bool> {
        let Some(n) = next.as_any().downcast_ref::<KiviBlock>() else { return Ok(false) };
        // Both or neither: check before changing anything.
        let fits = |a: &Quantized, b: &Quantized| (a.dims.0, a.dims.1, a.dims.3, a.axis, a.bits, a.group_len, a.dtype) == (b.dims.0, b.dims.1, b.dims.3, b.axis, b.bits, b.group_len, b.dtype);
        if !fits(&self.k, &n.k) || !fits(&self.v, &n.v) {
            return Ok(false);
        }
        Ok(self.k.append(&n.k)? && self.v.append(&n.v)?)
    }
}
