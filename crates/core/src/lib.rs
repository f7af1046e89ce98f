//! zoo-core: a trainable decoder-only LM whose per-layer sequence mixer and feed-forward are
//! plug-ins ([`mixer::Mixer`], [`mixer::FeedForward`]), plus the data, optimiser and training loop
//! every experiment shares.
//!
//! Gradients are real: every training-path op records a backward pass ([`check::gradient_flow`]
//! checks every parameter; `tests/model.rs` checks gradients against finite differences).
//!
//! ```
//! use zoo_core::attention::{Attention, AttentionConfig};
//! use zoo_core::candle_core::{DType, Device, Tensor};
//! use zoo_core::mixer::Mixer;
//! use zoo_core::model::{Lm, LmShape};
//! use zoo_core::params::ParamStore;
//! let store = ParamStore::new(0, DType::F32, &Device::Cpu);
//! let shape = LmShape { vocab_size: 16, d_model: 8, n_layers: 2, tie_embeddings: true, norm_eps: 1e-5, max_seq_len: 8 };
//! let cfg: AttentionConfig = zoo_core::mixer::examples_from_toml(&["n_heads = 2"]).remove(0);
//! let lm = Lm::new(&shape, DType::F32, &store.root(), |ctx, pb| {
//!     Ok((Box::new(Attention::new(&cfg, ctx, &pb.pp("mixer"))?) as Box<dyn Mixer>, None))
//! })?;
//! let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
//! assert_eq!(lm.forward(&ids, None, None)?.logits.dims(), &[1, 3, 16]); // Phase::Train
//! let mut cache = lm.new_cache_with_capacity(4); // prefill 3, decode 1: one allocation
//! lm.forward(&ids, Some(&mut cache), None)?;
//! lm.forward(&Tensor::new(&[[4u32]], &Device::Cpu)?, Some(&mut cache), None)?;
//! assert_eq!(cache[0].seen(), 4);
//! # Ok::<(), zoo_core::candle_core::Error>(())
//! ```

pub mod attention;
pub mod check;
pub mod conv;
pub mod data;
pub mod dist;
pub mod grad;
pub mod graph;
pub mod mixer;
pub mod mlp;
pub mod model;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod params;
pub mod probe;
pub mod q4_1;
pub mod rng;
pub mod spikes;
pub mod state;
pub mod task;
pub mod train;

pub use candle_core;
pub use candle_nn;
pub use zoo_kernels;
