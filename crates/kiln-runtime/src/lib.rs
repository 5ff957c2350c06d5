//! kiln's CPU runtime: kernels, model forward passes, KV cache, sampling and generation.

pub mod sampling;
