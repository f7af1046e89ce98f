//! KIVI: packing, the quantisation error, per-channel against per-token groups, and a cache that
//! packs its older tokens (contents, positions, bytes, what it refuses).

use std::sync::Arc;
use zoo_core::candle_core::{DType, Device, Result, Tensor};
use zoo_core::state::{KvCache, KvPacker};
use zoo_kv_compress::kivi::{dequantize, pack, quantize, unpack, Axis, Kivi, KiviConfig};

fn max_abs(t: &Tensor) -> Result<f32> {
    t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Deterministic pseudo-random values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn kv(b: usize, h: usize, n: usize, hd: usize, seed: u64) -> Result<Tensor> {
    Tensor::from_vec(noise(b * h * n * hd, seed), (b, h, n, hd), &Device::Cpu)
}

#[test]
fn codes_pack_and_unpack_exactly() -> Result<()> {
    for bits in [2u8, 4, 8] {
        let levels = (1u32 << bits) as usize;
        let codes: Vec<f32> = (0..64).map(|i| ((i * 7 + 3) % levels) as f32).collect();
        let c = Tensor::new(codes.clone(), &Device::Cpu)?;
        let p = pack(&c, bits)?;
        assert_eq!(p.dtype(), DType::U8);
        assert_eq!(p.elem_count(), 64 * bits as usize / 8);
        assert_eq!(unpack(&p, bits)?.to_vec1::<f32>()?, codes, "{bits} bits");
    }
    Ok(())
}

#[test]
fn error_is_within_half_a_step_and_falls_with_bits() -> Result<()> {
    let x = kv(2, 3, 32, 16, 1)?;
    let mut last = f32::INFINITY;
    for bits in [2u8, 4, 8] {
        for axis in [Axis::Channel, Axis::Token] {
            let q = quantize(&x, axis, bits, 16)?;
            let err = max_abs(&(dequantize(&q)? - &x)?)?;
            // Range at most 2 per group; half a step, plus the f16 rounding of scale and zero.
            let step = 2.0 / ((1u32 << bits) - 1) as f32;
            assert!(err <= 0.5 * step * 1.3 + 2e-3, "{bits} bits, {axis:?}: error {err} for step {step}");
            if axis == Axis::Channel {
                assert!(err < last, "{bits} bits: error {err} not below {last}");
                last = err;
            }
        }
    }
    Ok(())
}

#[test]
fn per_channel_groups_isolate_an_outlier_channel() -> Result<()> {
    // Channel 3 is 20x larger (KIVI §3: key outliers sit in fixed channels).
    let x = kv(1, 2, 32, 16, 2)?;
    let scale: Vec<f32> = (0..16).map(|c| if c == 3 { 20.0 } else { 1.0 }).collect();
    let x = x.broadcast_mul(&Tensor::new(scale, &Device::Cpu)?)?;
    let err = |axis| -> Result<f32> {
        let d = (dequantize(&quantize(&x, axis, 2, 16)?)? - &x)?;
        // Error on the ordinary channels.
        d.narrow(3, 4, 12)?.abs()?.mean_all()?.to_scalar::<f32>()
    };
    let (ch, tok) = (err(Axis::Channel)?, err(Axis::Token)?);
    assert!(ch * 4.0 < tok, "per-channel {ch} vs per-token {tok}");
    Ok(())
}

fn kivi(bits: u8, group: usize, residual: usize) -> Result<Arc<dyn KvPacker>> {
    let cfg = KiviConfig { bits, key_axis: Axis::Channel, value_axis: Axis::Token, group, residual };
    Ok(Arc::new(Kivi::new(&cfg, 8)?))
}

#[test]
fn a_cache_packs_its_older_tokens() -> Result<()> {
    let (b, h, hd) = (1, 2, 8);
    let x = kv(b, h, 45, hd, 3)?;
    let mut full = KvCache::with_capacity(0, None);
    let mut c = KvCache::with_capacity(0, None);
    c.set_packer(Some(kivi(8, 8, 4)?))?;
    // 20 tokens at once, then one at a time.
    let mut appended = 0;
    for t in [20usize].into_iter().chain(std::iter::repeat_n(1, 25)) {
        let (k, v) = (x.narrow(2, appended, t)?, (x.narrow(2, appended, t)? * 0.5)?);
        let (ka, va, pa) = c.append(&k, &v)?;
        full.append(&k, &v)?;
        appended += t;
        // What the query attends over: every token so far, in position order.
        assert_eq!(pa, (0..appended).collect::<Vec<_>>());
        assert_eq!(ka.dim(2)?, appended);
        let (kf, vf) = full.kv()?.unwrap();
        assert!(max_abs(&(ka - kf)?)? < 0.01 && max_abs(&(va - vf)?)? < 0.01);
        // Packed: whole blocks of 8 beyond the 4 most recent tokens.
        let packed = appended.saturating_sub(4) / 8 * 8;
        assert_eq!(c.packed().0, packed, "after {appended} tokens");
        assert_eq!(c.len(), appended);
        assert_eq!(c.all_positions(), (0..appended).collect::<Vec<_>>());
    }
    // 45 tokens: 40 packed (5 blocks), 5 at full precision. Bytes per block at 8 bits: K codes
    // 2·8·8, K scale/zero per channel 2·(2·8)·2 bytes; V codes 2·8·8, V per token (group 8 = hd)
    // 2·(2·8)·2.
    let block = 2 * (2 * 8 * 8 + 2 * 2 * 16);
    assert_eq!(c.packed(), (40, 5 * block));
    assert_eq!(c.bytes(), 5 * block + 5 * 2 * h * hd * 4);
    assert!(c.bytes() < full.bytes());
    // The full-precision buffer gave back the 20-token prefill's room: at most residual + group
    // slots stay allocated beside the packed store.
    assert!(c.allocated_bytes() <= 5 * block + 12 * 2 * h * hd * 4, "{} allocated", c.allocated_bytes());
    // A clone is independent and equal.
    let d = c.clone();
    assert_eq!(d.packed(), c.packed());
    // Eviction and a late packer are refused.
    assert!(c.retain(&[0]).is_err());
    assert!(c.set_packer(None).is_err());
    let mut w = KvCache::with_capacity(0, Some(16));
    assert!(w.set_packer(Some(kivi(8, 8, 4)?)).is_err());
    Ok(())
}

#[test]
fn two_bits_hold_three_sixteenths_of_the_f16_bytes() -> Result<()> {
    // KIVI-2, group 32, head dim 64, 256 f16 tokens, no residual: everything packed.
    let (h, hd, n) = (3, 64, 256);
    let cfg = KiviConfig { bits: 2, key_axis: Axis::Channel, value_axis: Axis::Token, group: 32, residual: 0 };
    let mut c = KvCache::with_capacity(0, None);
    c.set_packer(Some(Arc::new(Kivi::new(&cfg, hd)?)))?;
    let x = kv(1, h, n, hd, 4)?.to_dtype(DType::F16)?;
    c.append(&x, &x)?;
    let full_f16 = 2 * h * n * hd * 2;
    // codes: 2 bits per value; K: one f16 scale + zero per channel per 32 tokens; V: one per 32
    // channels per token.
    let expect = 2 * h * n * hd / 4 + 2 * 2 * (h * hd * n / 32) + 2 * 2 * (h * n * hd / 32);
    assert_eq!(c.bytes(), expect);
    // 2 of 16 bits per value, plus 4 bytes of scale and zero per 32 values of 2 bytes: 1/8 + 1/16.
    assert!((c.bytes() as f64 / full_f16 as f64 - 0.1875).abs() < 1e-9);
    Ok(())
}

#[test]
fn configs_are_checked() {
    let bad = |bits, group, hd| Kivi::new(&KiviConfig { bits, key_axis: Axis::Channel, value_axis: Axis::Token, group, residual: 0 }, hd).is_err();
    assert!(bad(3, 32, 64));
    assert!(bad(2, 0, 64));
    assert!(bad(2, 6, 64)); // 2-bit codes come 4 to a byte
    assert!(bad(2, 24, 64)); // 24 does not divide 64
    assert!(!bad(2, 32, 64) && !bad(4, 128, 64) && !bad(8, 1, 64));
    let e = toml::from_str::<KiviConfig>("bits = 2\nkey = \"channel\"").unwrap_err().to_string();
    assert!(e.contains("key"), "{e}");
}
