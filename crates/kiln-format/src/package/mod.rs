//! The kiln package: a folder `NAME.kiln/` holding `manifest.json` and shard files of raw
//! tensor data, laid out so a runtime can map the shards and read every tensor in place.
//!
//! - Every tensor's data starts at a multiple of [`ALIGNMENT`] bytes in its shard (a mapped
//!   shard starts on a page boundary, so the data is aligned in memory too).
//! - Tensors are stored in ggml block formats under their canonical (GGUF) names, with shapes
//!   in ggml order (`shape[0]` is the contiguous row length).
//! - The manifest lists every shard with its size and sha256, and every tensor with its shard,
//!   offset and length; [`Package::open`] checks all of it (hashes by default).
//! - [`PackageWriter`] writes into a temporary sibling folder and renames it into place, so a
//!   killed conversion never leaves a partial package under the final name.
//!
//! The model description (`config`) and tokenizer are carried as JSON values this crate does
//! not interpret; the runtime defines them. See `docs/kiln-package.md` for the full format.

mod manifest;
mod reader;
mod writer;

pub use manifest::{
    CalibrationInfo, Conversion, FileHash, Manifest, ShardEntry, SourceInfo, TensorEntry,
    TensorQuality, FORMAT_NAME, FORMAT_VERSION, I8_CH_CODES_FIRST_VERSION, OLDEST_FORMAT_VERSION,
};
pub use reader::{is_package, Package, PackageFile, PackageTensor, Verify};
pub use writer::{sha256_file, PackageWriter, DEFAULT_MAX_SHARD_BYTES};

/// Alignment of every tensor's data within its shard, in bytes.
pub const ALIGNMENT: u64 = 64;
/// The manifest's file name inside a package folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The extension of a package folder.
pub const EXTENSION: &str = "kiln";
