//! Primitive ops shared by the mixers, each in the form the [`Phase`] allows: the place where fused
//! kernels plug in. An op without a backward pass checks the phase and refuses
//! [`Phase::Train`], so it cannot cut gradients silently.
//!
//! ```
//! use zoo_core::candle_core::{Device, Tensor};
//! use zoo_core::ops::softmax_last_dim_fused;
//! use zoo_core::state::Phase;
//! let x = Tensor::new(&[[0f32, 0.0]], &Device::Cpu)?;
//! let p = softmax_last_dim_fused(&x, Phase::Decode)?;
//! assert_eq!(p.to_vec2::<f32>()?, vec![vec![0.5, 0.5]]);
//! assert!(softmax_last_dim_fused(&x, Phase::Train).is_err());
//! # Ok::<(), zoo_core::candle_core::Error>(())
//! ```

use crate::state::Phase;
use candle_core::{Result, Tensor};

/// candle's fused softmax over the last dimension (no backward pass): prefill and decode only.
pub fn softmax_last_dim_fused(x: &Tensor, phase: Phase) -> Result<Tensor> {
    phase.forbid_train("softmax_last_dim (fused, no backward)")?;
    candle_nn::ops::softmax_last_dim(x)
}
