//! Helpers shared by the kernel parity tests.

use zoo_core::candle_core::{Device, Tensor};
use zoo_core::rng::Rng;

pub fn randn(r: &mut Rng, shape: &[usize], scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| (r.normal() * scale) as f32).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
}

pub fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let num = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
    num / den.max(1e-12)
}
