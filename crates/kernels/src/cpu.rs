//! Helpers of the ops' CPU forms (the scans): a fixed-order dot product that vectorises, and a
//! way to run a loop compiled for AVX2 where the CPU has it.

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

/// log Σ_j e^{x_j} of a row, from its maximum (a fixed order: eight interleaved lanes).
#[inline(always)]
pub(crate) fn logsumexp(x: &[f32]) -> f32 {
    let mut mx = [f32::NEG_INFINITY; 8];
    let c = x.chunks_exact(8);
    let rest = c.remainder();
    for ch in c {
        for z in 0..8 {
            mx[z] = mx[z].max(ch[z]);
        }
    }
    let m = rest.iter().fold(mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)), |a, &b| a.max(b));
    if m == f32::NEG_INFINITY {
        return m;
    }
    let mut acc = [0f32; 8];
    let c = x.chunks_exact(8);
    let rest = c.remainder();
    for ch in c {
        for z in 0..8 {
            acc[z] += (ch[z] - m).exp();
        }
    }
    let tail: f32 = rest.iter().map(|&r| (r - m).exp()).sum();
    m + (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail).ln()
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
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
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
