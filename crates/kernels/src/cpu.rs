//! Helpers of the ops' CPU forms (the scans, the cross-entropy): a fixed-order dot product, a
//! log-sum-exp and an e^x that vectorise, and a way to run a loop compiled for AVX2 where the CPU
//! has it.

/// Runs `f` compiled with AVX2 enabled where the CPU has it, else as it is. It only widens the
/// vectors of the loops inlined into `f`: no fused multiply-adds, no reordering, so the results are
/// the same bits on every x86-64 CPU.
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2(f) };
    }
    f()
}

/// e^x in f32 to about 2 ulp, in plain arithmetic that vectorises (libm's `expf` is a call per
/// element, which kept the cross-entropy's passes over the (N, V) logits scalar): x = n ln 2 + r
/// with |r| ≤ ln 2 / 2, e^r from its degree-6 Taylor polynomial, 2^n put into exponent bits.
/// Below −87.3 (where e^x leaves the normal range) it is 0, above 88.7 infinity, NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HI is exact for |n| < 2^9 (Cody and Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Rounding by the magic number 1.5 · 2^23 (to nearest even, and the integer in the low bits)
    // keeps every step plain float and bit arithmetic, which vectorises; a first version with
    // `round_ties_even` and a float-to-int cast (saturating in Rust) compiled to scalar code.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.max(-87.3).min(88.7);
    let nm = xc * LOG2E + MAGIC;
    let n = nm - MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n in two halves: n reaches 128 near the top and −126 near the bottom, where one power
    // of two would overflow the exponent or lose p's bits.
    let n = (nm.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let h = n >> 1;
    let e = p * f32::from_bits(((h + 127) as u32) << 23) * f32::from_bits(((n - h + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        e
    }
}

/// Elements per parallel task of an elementwise CPU form: about 16K (rayon's split costs about a
/// microsecond).
pub(crate) const ELEMS_PER_TASK: usize = 1 << 14;

/// Rows of `row_len` elements per parallel task of a row-wise CPU form: about
/// [`ELEMS_PER_TASK`] elements a task, at least one row.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    ELEMS_PER_TASK.div_ceil(row_len.max(1)).max(1)
}

/// σ(a) = 1 / (1 + e^{−a}) on [`exp`], which vectorises (0 and 1 at the ends, NaN stays NaN).
#[inline(always)]
pub(crate) fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + exp(-a))
}

/// The contiguous f32 elements of CPU tensors, borrowed (converted when 16-bit), for a CPU form's
/// backward: `f` sees them while their storages are read-locked, without the copy of `to_vec1`.
pub(crate) fn with_f32<const N: usize, R>(ts: [&candle_core::Tensor; N], op: &str, f: impl FnOnce([&[f32]; N]) -> R) -> candle_core::Result<R> {
    let ts = ts.map(|t| t.contiguous());
    let ts: Vec<candle_core::Tensor> = ts.into_iter().collect::<candle_core::Result<_>>()?;
    let locked: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let data = locked
        .iter()
        .map(|(st, l)| match &**st {
            candle_core::Storage::Cpu(cs) => crate::cpu_f32(cs, l, op),
            _ => candle_core::bail!("{op}: tensor not on the CPU"),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(f(std::array::from_fn(|i| &*data[i])))
}

/// The maximum of a row (−∞ for an empty one), in eight interleaved lanes.
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut mx = [f32::NEG_INFINITY; 8];
    let c = x.chunks_exact(8);
    let rest = c.remainder();
    for ch in c {
        for z in 0..8 {
            mx[z] = mx[z].max(ch[z]);
        }
    }
    rest.iter().fold(mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)), |a, &b| a.max(b))
}

/// The eight lanes' partial sums added in a fixed order, plus the tail's.
#[inline(always)]
fn lanes(acc: [f32; 8], tail: f32) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// log Σ_j e^{x_j} of a row, from its maximum (a fixed order: eight interleaved lanes).
#[inline(always)]
pub(crate) fn logsumexp(x: &[f32]) -> f32 {
    let m = max(x);
    if m == f32::NEG_INFINITY {
        return m;
    }
    let mut acc = [0f32; 8];
    let c = x.chunks_exact(8);
    let rest = c.remainder();
    for ch in c {
        for z in 0..8 {
            acc[z] += exp(ch[z] - m);
        }
    }
    let tail: f32 = rest.iter().map(|&r| exp(r - m)).sum();
    m + lanes(acc, tail).ln()
}

/// Each x_j of a row replaced by e^{x_j − m}, m its maximum; returns (m, Σ_j e^{x_j − m}) (the sum
/// in the order of [`logsumexp`], so m + ln Σ is its value). A row of −∞ is left as it is, (−∞, 0).
#[inline(always)]
pub(crate) fn exp_shifted_in_place(x: &mut [f32]) -> (f32, f32) {
    let m = max(x);
    if m == f32::NEG_INFINITY {
        return (m, 0.0);
    }
    let mut acc = [0f32; 8];
    let mut c = x.chunks_exact_mut(8);
    for ch in &mut c {
        for z in 0..8 {
            ch[z] = exp(ch[z] - m);
            acc[z] += ch[z];
        }
    }
    let mut tail = 0f32;
    for r in c.into_remainder() {
        *r = exp(*r - m);
        tail += *r;
    }
    (m, lanes(acc, tail))
}

/// Σ_j a_j b_j over the shorter of the two, in eight interleaved partial sums (a fixed order, so
/// that it vectorises).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for z in 0..8 {
            acc[z] += x[z] * y[z];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    lanes(acc, tail)
}

/// `dst (m × n) = [dst +] beta · lhs (m × k) · rhs (k × n)`, single-threaded, every matrix given
/// by its row and column strides in elements (`read`: add to dst, else overwrite it). The bounds
/// of all three are checked before the unchecked product.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    read: bool,
    (lhs, lhs_rs, lhs_cs): (&[f32], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[f32], usize, usize),
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * dst_rs + n <= dst.len(), "CPU product out of its destination");
    if k == 0 {
        if !read {
            (0..m).for_each(|i| dst[i * dst_rs..i * dst_rs + n].fill(0.0));
        }
        return;
    }
    assert!((m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len(), "CPU product: left factor out of range");
    assert!((k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len(), "CPU product: right factor out of range");
    // SAFETY: every index the product touches lies inside its slice (checked just above), and
    // dst does not alias lhs or rhs (a &mut and two & borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            read,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn logsumexp_matches_the_definition() {
        for n in [1, 7, 8, 13, 40] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7).collect();
            let want = x.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
            let got = super::logsumexp(&x) as f64;
            assert!((got - want).abs() < 1e-5, "n = {n}: {got} vs {want}");
        }
        assert_eq!(super::logsumexp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
    }

    #[test]
    fn exp_shifted_in_place_agrees_with_logsumexp() {
        for n in [1, 7, 8, 13, 40] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7).collect();
            let mut e = x.clone();
            let (m, s) = super::exp_shifted_in_place(&mut e);
            assert_eq!(m + s.ln(), super::logsumexp(&x), "n = {n}");
            let top = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            for (ei, xi) in e.iter().zip(&x) {
                assert!((ei - (xi - top).exp()).abs() < 1e-6, "n = {n}: {ei} for {xi}");
            }
        }
        let mut x = [f32::NEG_INFINITY; 3];
        assert_eq!(super::exp_shifted_in_place(&mut x), (f32::NEG_INFINITY, 0.0));
    }

    /// Against f64's exp over the whole range in small steps, and at the edges.
    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.5 {
            let (got, want) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / (want * f32::EPSILON as f64));
            x += 0.0137;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(super::exp(0.0), 1.0);
        assert_eq!(super::exp(-100.0), 0.0);
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(100.0), f32::INFINITY);
        assert!(super::exp(f32::NAN).is_nan());
        // The vectorised build gives the same bits as the plain one.
        let xs: Vec<f32> = (0..1000).map(|i| i as f32 * 0.173 - 86.0).collect();
        let plain: Vec<f32> = xs.iter().map(|&x| super::exp(x)).collect();
        let wide: Vec<f32> = super::simd(|| xs.iter().map(|&x| super::exp(x)).collect());
        assert_eq!(plain, wide);
    }

    #[test]
    fn dot_sums_every_product() {
        for n in [0, 1, 7, 8, 9, 16, 29] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 + 1.0).collect();
            let b: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { 1.0 } else { 2.0 }).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert_eq!(super::dot(&a, &b), want, "n = {n}");
            assert_eq!(super::simd(|| super::dot(&a, &b)), want, "n = {n}");
        }
    }
}
