//! Model file formats for kiln.
//!
//! - [`ggml`]: the ggml tensor element types (block quantization layouts), with scalar reference
//!   dequantization, fused row dot products and reference quantizers.
//! - [`gguf`]: a validating, memory-mapped GGUF reader ([`gguf::GgufFile`]) and a writer
//!   ([`gguf::GgufWriter`]).
//! - [`safetensors`]: a validating, memory-mapped safetensors reader for single files and
//!   sharded Hugging Face folders ([`safetensors::ShardedSafetensors`]), and a writer
//!   ([`safetensors::SafetensorsWriter`]).
//!
//! Every error is a [`FormatError`] that names the file it concerns.

#![warn(missing_docs)]

pub mod ggml;
pub mod gguf;
pub mod safetensors;

mod file_io;

mod error;
pub use error::FormatError;
