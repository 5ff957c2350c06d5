//! Model file formats for kiln.
//!
//! - [`ggml`]: the ggml tensor element types (block quantization layouts), with scalar reference
//!   dequantization, fused row dot products and reference quantizers.
//! - [`gguf`]: a validating, memory-mapped GGUF reader ([`gguf::GgufFile`]) and a writer
//!   ([`gguf::GgufWriter`]).
//!
//! Every error is a [`FormatError`] that names the file it concerns.

#![warn(missing_docs)]

pub mod ggml;
pub mod gguf;

mod error;
pub use error::FormatError;
