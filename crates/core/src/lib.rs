//! zoo-core: a trainable decoder-only LM whose per-layer sequence mixer and feed-forward are
//! plug-ins ([`mixer::Mixer`], [`mixer::FeedForward`]), plus the data, optimiser and training loop
//! every experiment shares.
//!
//! Gradients are real: every training-path op records a backward pass (see `tests/gradients.rs`).

pub mod attention;
pub mod check;
pub mod conv;
pub mod data;
pub mod mixer;
pub mod mlp;
pub mod model;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod params;
pub mod probe;
pub mod rng;
pub mod spikes;
pub mod state;
pub mod task;
pub mod train;

pub use candle_core;
pub use candle_nn;
