//! Model file formats for kiln.
//!
//! - [`ggml`]: the ggml tensor element types (block quantization layouts), with scalar reference
//!   dequantization, fused row dot products and reference quantizers.
//! - [`gguf`]: a validating, memory-mapped GGUF reader ([`gguf::GgufFile`]) and a writer
//!   ([`gguf::GgufWriter`]).
//! - [`kiln_types`]: the package's own tensor formats (int8 per channel, int4 in blocks of 64,
//!   lookup tables) and [`kiln_types::TensorFormat`], a ggml type or one of them.
//! - [`package`]: the kiln package (a folder of a JSON manifest and 64-byte-aligned shards,
//!   every shard's sha256 checked on open): [`package::PackageWriter`], [`package::Package`].
//! - [`quant`]: weight quantization schemes (int8 per channel, int4 per block, k-means lookup
//!   tables), their quantizers, scalar reference kernels and quality metrics.
//! - [`safetensors`]: a validating, memory-mapped safetensors reader for single files and
//!   sharded Hugging Face folders ([`safetensors::ShardedSafetensors`]), and a writer
//!   ([`safetensors::SafetensorsWriter`]).
//!
//! Every error is a [`FormatError`] that names the file it concerns.

#![warn(missing_docs)]

pub mod ggml;
pub mod gguf;
pub mod kiln_types;
pub mod package;
pub mod quant;
pub mod read_order;
pub mod safetensors;

mod file_io;

mod error;
pub use error::FormatError;
pub use file_io::WeightArena;
