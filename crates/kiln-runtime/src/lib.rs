//! kiln's CPU runtime: kernels, model forward passes, KV cache, sampling and generation.
//!
//! A [`Model`] is loaded from a GGUF file, a Hugging Face folder or a kiln package (its
//! weights stay memory-mapped in their stored format); a [`Session`] runs batches of tokens
//! through it with a key/value cache; the [`generate`] module drives sampling, stop
//! conditions and streaming on top.

pub mod arch;
pub mod bench;
pub mod bundle;
pub mod calibration;
pub mod config;
pub mod conversation;
pub mod convert;
pub mod error;
pub mod fp16;
pub mod fp16_fix;
pub mod generate;
pub mod hf;
pub mod kernels;
mod kiln_matmul;
pub mod model;
pub mod package;
pub mod perplexity;
pub mod pool;
pub mod sampling;
pub mod session;
pub mod validate;
pub mod weights;

pub use config::ModelConfig;
pub use error::ModelError;
pub use kernels::Precision;
pub use model::Model;
pub use pool::ThreadPool;
pub use session::{Logits, Session};
