//! Q4_1 matrix × f32 rows on the CPU, for decoding with a GGUF file's own 4-bit blocks.
//!
//! ggml's Q4_1 (llama.cpp `block_q4_1`): each run of 32 weights is `d·q + m` with q ∈ 0..15, the
//! scale d and offset m in f16, the 32 nibbles packed in 16 bytes (low nibbles = weights 0..15,
//! high = 16..31). As in llama.cpp, each activation row is quantized per 32-block to 8 bits
//! (`Q8_1`: scale d8, values q8, and s = d8·Σq8), so a block's dot product is
//! `d·d8·Σ q·q8 + m·s`. candle has this type only as scalar code (slower than f32 here), so this
//! module keeps the scales as f32 and runs the integer dot products with AVX2 where the CPU has it
//! (a scalar loop otherwise, and the reference in tests).
//!
//! ```
//! use zoo_core::q4_1::Q41Matrix;
//! // One row of 32 weights: q = 0..15 then 0..15, d = 0.5, m = -1.
//! let mut block = vec![0u8; 20];
//! block[0..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
//! block[2..4].copy_from_slice(&half::f16::from_f32(-1.0).to_le_bytes());
//! for j in 0..16 { block[4 + j] = (j as u8) | ((j as u8) << 4); }
//! let w = Q41Matrix::from_ggml(&block, 1, 32).unwrap();
//! let y = w.matmul(&[1.0; 32], 1);
//! // Σ (0.5·q − 1) over q = 0..15 twice = 2·(0.5·120 − 16) = 88.
//! assert!((y[0] - 88.0).abs() < 0.5);
//! ```

/// Bytes of one Q4_1 block in a GGUF file: d (f16), m (f16), 16 bytes of nibbles.
pub const BLOCK_BYTES: usize = 20;
/// Weights per block.
pub const BLOCK: usize = 32;

/// A (rows × cols) Q4_1 matrix, row-major, scales unpacked to f32.
#[derive(Debug, Clone)]
pub struct Q41Matrix {
    pub rows: usize,
    pub cols: usize,
    d: Vec<f32>,
    m: Vec<f32>,
    qs: Vec<u8>,
}

/// An activation row quantized per 32-block: scales, Σ-terms, and the 8-bit values.
struct Q8Row {
    d: Vec<f32>,
    s: Vec<f32>,
    q: Vec<i8>,
}

fn quantize_row(x: &[f32]) -> Q8Row {
    let nb = x.len() / BLOCK;
    let (mut d, mut s, mut q) = (Vec::with_capacity(nb), Vec::with_capacity(nb), vec![0i8; x.len()]);
    for b in 0..nb {
        let xs = &x[b * BLOCK..(b + 1) * BLOCK];
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (j, v) in xs.iter().enumerate() {
            let qv = (v * inv).round() as i32;
            q[b * BLOCK + j] = qv as i8;
            sum += qv;
        }
        d.push(scale);
        s.push(scale * sum as f32);
    }
    Q8Row { d, s, q }
}

impl Q41Matrix {
    /// From a GGUF tensor's raw Q4_1 bytes of shape (rows, cols); cols a multiple of 32.
    pub fn from_ggml(data: &[u8], rows: usize, cols: usize) -> Result<Self, String> {
        if cols % BLOCK != 0 {
            return Err(format!("Q4_1: {cols} columns is not a multiple of {BLOCK}"));
        }
        let nb = rows * cols / BLOCK;
        if data.len() != nb * BLOCK_BYTES {
            return Err(format!("Q4_1: {} bytes for a {rows}x{cols} matrix (expected {})", data.len(), nb * BLOCK_BYTES));
        }
        let (mut d, mut m, mut qs) = (Vec::with_capacity(nb), Vec::with_capacity(nb), Vec::with_capacity(nb * 16));
        for blk in data.chunks_exact(BLOCK_BYTES) {
            d.push(half::f16::from_le_bytes([blk[0], blk[1]]).to_f32());
            m.push(half::f16::from_le_bytes([blk[2], blk[3]]).to_f32());
            qs.extend_from_slice(&blk[4..]);
        }
        Ok(Self { rows, cols, d, m, qs })
    }

    /// The dequantized matrix (rows × cols), row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for b in 0..self.d.len() {
            let q = &self.qs[b * 16..(b + 1) * 16];
            out.extend(q.iter().map(|&v| self.d[b] * (v & 0x0F) as f32 + self.m[b]));
            out.extend(q.iter().map(|&v| self.d[b] * (v >> 4) as f32 + self.m[b]));
        }
        out
    }

    /// The same matrix with its rows reordered: row i of the result is row `order[i]`.
    pub fn permute_rows(&self, order: &[usize]) -> Self {
        let nb = self.cols / BLOCK;
        let mut out = Self { rows: self.rows, cols: self.cols, d: Vec::new(), m: Vec::new(), qs: Vec::new() };
        for &r in order {
            out.d.extend_from_slice(&self.d[r * nb..(r + 1) * nb]);
            out.m.extend_from_slice(&self.m[r * nb..(r + 1) * nb]);
            out.qs.extend_from_slice(&self.qs[r * nb * 16..(r + 1) * nb * 16]);
        }
        out
    }

    /// y (n × rows) = x (n × cols) · Wᵀ, each x row quantized to Q8_1 first. Rows of W are split
    /// over rayon's threads.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        use rayon::prelude::*;
        assert_eq!(x.len(), n * self.cols, "Q4_1 matmul: x is not n x cols");
        let xq: Vec<Q8Row> = x.chunks_exact(self.cols).map(quantize_row).collect();
        let mut y = vec![0f32; n * self.rows];
        let avx2 = avx2();
        let chunk = 64;
        // Output columns (W rows) in chunks; each chunk writes its slot of every y row.
        let part = |c: usize| {
            let (r0, r1) = (c * chunk, ((c + 1) * chunk).min(self.rows));
            let mut out = Vec::with_capacity(n * (r1 - r0));
            for xr in &xq {
                for r in r0..r1 {
                    out.push(self.row_dot(r, xr, avx2));
                }
            }
            (r0, out)
        };
        let chunks = self.rows.div_ceil(chunk);
        // Handing a small product to rayon's workers costs more than it saves (the calling thread
        // sleeps and wakes for every one of a decode step's ~200 matmuls): one thread, or under
        // 2^20 multiply-adds, runs here.
        let parts: Vec<(usize, Vec<f32>)> = if rayon::current_num_threads() > 1 && n * self.rows * self.cols >= 1 << 20 {
            (0..chunks).into_par_iter().map(part).collect()
        } else {
            (0..chunks).map(part).collect()
        };
        for (r0, out) in parts {
            let w = out.len() / n;
            for (i, row) in out.chunks_exact(w).enumerate() {
                y[i * self.rows + r0..i * self.rows + r0 + w].copy_from_slice(row);
            }
        }
        y
    }

    fn row_dot(&self, r: usize, x: &Q8Row, avx2: bool) -> f32 {
        let nb = self.cols / BLOCK;
        let (d, m, qs) = (&self.d[r * nb..(r + 1) * nb], &self.m[r * nb..(r + 1) * nb], &self.qs[r * nb * 16..(r + 1) * nb * 16]);
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: AVX2 was detected at run time; slices hold nb blocks each.
            return unsafe { row_dot_avx2(d, m, qs, x) };
        }
        let _ = avx2;
        row_dot_scalar(d, m, qs, x)
    }
}

fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::env::var_os("ZOO_Q4_SCALAR").is_none() && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn row_dot_scalar(d: &[f32], m: &[f32], qs: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0f32;
    for b in 0..d.len() {
        let (q4, q8) = (&qs[b * 16..(b + 1) * 16], &x.q[b * BLOCK..(b + 1) * BLOCK]);
        let mut sum = 0i32;
        for j in 0..16 {
            sum += (q4[j] & 0x0F) as i32 * q8[j] as i32 + (q4[j] >> 4) as i32 * q8[j + 16] as i32;
        }
        acc += d[b] * x.d[b] * sum as f32 + m[b] * x.s[b];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_dot_avx2(d: &[f32], m: &[f32], qs: &[u8], x: &Q8Row) -> f32 {
    use std::arch::x86_64::*;
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut offs = 0f32;
    for b in 0..d.len() {
        // 16 bytes of nibbles -> 32 unsigned bytes: low nibbles (weights 0..15), then high (16..31).
        let raw = _mm_loadu_si128(qs.as_ptr().add(b * 16) as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
        let q4 = _mm256_and_si256(both, low);
        let q8 = _mm256_loadu_si256(x.q.as_ptr().add(b * BLOCK) as *const __m256i);
        // u8 x i8 pairs summed to i16, then pairs of i16 to i32: 8 partial sums.
        let s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d[b] * x.d[b]), _mm256_cvtepi32_ps(s32), acc);
        offs += m[b] * x.s[b];
    }
    let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    _mm_cvtss_f32(h) + offs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_q41(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut rng = crate::rng::Rng::new(seed);
        let mut data = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            data.extend_from_slice(&half::f16::from_f32((rng.uniform() * 0.1) as f32 + 0.01).to_le_bytes());
            data.extend_from_slice(&half::f16::from_f32((rng.uniform() - 0.5) as f32).to_le_bytes());
            for _ in 0..16 {
                data.push((rng.uniform() * 256.0) as u8);
            }
        }
        data
    }

    /// AVX2 = scalar (same integer sums; float order differs), and both ≈ the f32 product of the
    /// dequantized matrix (the Q8 rounding of x is the only difference).
    #[test]
    fn q4_1_matmul_matches_scalar_and_dense() {
        let (rows, cols, n) = (70, 96, 3);
        let w = Q41Matrix::from_ggml(&random_q41(rows, cols, 1), rows, cols).unwrap();
        let mut rng = crate::rng::Rng::new(2);
        let x: Vec<f32> = (0..n * cols).map(|_| rng.normal() as f32).collect();
        let y = w.matmul(&x, n);
        let dense = w.dequantize();
        for i in 0..n {
            let xq = quantize_row(&x[i * cols..(i + 1) * cols]);
            for r in 0..rows {
                let nb = cols / BLOCK;
                let s = row_dot_scalar(&w.d[r * nb..(r + 1) * nb], &w.m[r * nb..(r + 1) * nb], &w.qs[r * nb * 16..(r + 1) * nb * 16], &xq);
                let got = y[i * rows + r];
                assert!((got - s).abs() <= 1e-4 * s.abs().max(1.0), "row {r}: {got} vs scalar {s}");
                // The Q8 rounding of x: at most amax/254 per element, so within 1% of Σ|w·x| here.
                let exact: f32 = (0..cols).map(|c| dense[r * cols + c] * x[i * cols + c]).sum();
                let scale: f32 = (0..cols).map(|c| (dense[r * cols + c] * x[i * cols + c]).abs()).sum();
                assert!((got - exact).abs() <= 0.01 * scale, "row {r}: {got} vs dense {exact} (scale {scale})");
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(Q41Matrix::from_ggml(&[0; 20], 1, 31).is_err());
        assert!(Q41Matrix::from_ggml(&[0; 19], 1, 32).is_err());
    }
}
