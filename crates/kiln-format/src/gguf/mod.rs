//! GGUF: ggml's single-file model format.
//!
//! A GGUF file is a header (magic `GGUF`, version, tensor count, metadata count), typed metadata
//! key/value pairs, tensor infos (name, dimensions, ggml type, offset), padding to the file's
//! alignment, then the tensor data. Everything is little-endian. See ggml's `docs/gguf.md`.
//!
//! [`GgufFile::open`] maps the file and validates all of it up front — every length, count,
//! offset and type — so that later accessors ([`GgufFile::tensor_data`] in particular) cannot
//! fail. [`GgufWriter`] produces files the reader accepts, and is also how the tests craft
//! hostile ones.

mod parse;
mod value;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use value::MetadataValue;
pub use writer::GgufWriter;

use crate::file_io::Storage;
use crate::ggml::{self, GgmlType};
use crate::FormatError;

/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that sets the tensor data alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// The metadata key naming the model architecture.
pub const ARCHITECTURE_KEY: &str = "general.architecture";

/// Where a tensor lives in a GGUF file and how it is encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous row length.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section (a multiple of the alignment).
    pub offset: u64,
    /// Product of the dimensions.
    pub n_elements: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Elements per row (`dims[0]`).
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(0)
    }

    /// Number of rows: the product of every dimension but the first.
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> u64 {
        let len = self.row_len();
        len / self.ty.block_len() as u64 * self.ty.block_bytes() as u64
    }
}

/// An open, fully validated GGUF file.
///
/// Metadata is parsed into memory; tensor data stays in the memory map and is handed out as
/// borrowed byte slices. Tensor data of a mapped file is aligned in memory to the file's
/// alignment (the map starts on a page boundary).
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetadataValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("data_offset", &self.data_offset)
            .field("file_size", &self.file_size())
            .finish()
    }
}

impl GgufFile {
    /// Maps and validates the GGUF file at `path`.
    ///
    /// Any structural problem — truncation, bad magic, an unsupported version, absurd counts
    /// or lengths, invalid UTF-8, an unknown value or tensor type, bad dimensions, misaligned,
    /// overlapping or out-of-file tensor data, duplicate keys or names, a bad
    /// `general.alignment` — is an error naming the file and the offending key or tensor.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, FormatError> {
        let path = path.as_ref();
        let storage = Storage::map(path)?;
        Self::from_storage(path.to_path_buf(), storage)
    }

    /// Validates a GGUF image already in memory. `path` is only used to name the data in
    /// errors. Unlike a mapped file, tensor data in memory is not guaranteed to be aligned.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile, FormatError> {
        Self::from_storage(path.into(), Storage::Owned(bytes))
    }

    fn from_storage(path: PathBuf, storage: Storage) -> Result<GgufFile, FormatError> {
        let parsed = parse::parse(&path, storage.bytes())?;
        Ok(GgufFile {
            path,
            storage,
            version: parsed.version,
            alignment: parsed.alignment,
            metadata: parsed.metadata,
            metadata_index: parsed.metadata_index,
            tensors: parsed.tensors,
            tensor_index: parsed.tensor_index,
            data_offset: parsed.data_offset,
        })
    }

    /// The file's path, as given to [`GgufFile::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version: 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The tensor data alignment: `general.alignment`, or 32 when absent.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Offset of the tensor data section from the start of the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Size of the file in bytes.
    pub fn file_size(&self) -> u64 {
        self.storage.bytes().len() as u64
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, MetadataValue)] {
        &self.metadata
    }

    /// The metadata value for `key`, if present.
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &MetadataValue) -> FormatError {
        FormatError::invalid(
            &self.path,
            format!(
                "metadata key '{key}' is {}, expected {expected}",
                found.describe()
            ),
        )
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        convert: impl Fn(&'a MetadataValue) -> Option<T>,
    ) -> Result<Option<T>, FormatError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => convert(v)
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, expected, v)),
        }
    }

    fn typed_array<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        convert: impl Fn(&'a MetadataValue) -> Option<T>,
    ) -> Result<Option<Vec<T>>, FormatError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let Some(items) = value.as_array() else {
            return Err(self.wrong_type(key, &format!("an array of {expected}"), value));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                convert(item).ok_or_else(|| {
                    FormatError::invalid(
                        &self.path,
                        format!(
                            "metadata key '{key}' element {i} is {}, expected {expected}",
                            item.describe()
                        ),
                    )
                })
            })
            .collect::<Result<Vec<T>, _>>()
            .map(Some)
    }

    fn missing(&self, key: &str) -> FormatError {
        FormatError::invalid(&self.path, format!("missing required metadata key '{key}'"))
    }

    /// `key` as a non-negative integer of any width; `Ok(None)` when absent.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, FormatError> {
        self.typed(key, "a non-negative integer", MetadataValue::as_u64)
    }

    /// `key` as an f32 (from any float or integer); `Ok(None)` when absent.
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>, FormatError> {
        self.typed(key, "a number", |v| v.as_f64().map(|f| f as f32))
    }

    /// `key` as a bool; `Ok(None)` when absent.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, FormatError> {
        self.typed(key, "a bool", MetadataValue::as_bool)
    }

    /// `key` as a string; `Ok(None)` when absent.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>, FormatError> {
        self.typed(key, "a string", MetadataValue::as_str)
    }

    /// `key` as an array of strings; `Ok(None)` when absent.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>, FormatError> {
        self.typed_array(key, "strings", MetadataValue::as_str)
    }

    /// `key` as an array of f32 (from any floats or integers); `Ok(None)` when absent.
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>, FormatError> {
        self.typed_array(key, "numbers", |v| v.as_f64().map(|f| f as f32))
    }

    /// `key` as an array of i64 (from integers of any width); `Ok(None)` when absent.
    pub fn get_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>, FormatError> {
        self.typed_array(key, "integers", MetadataValue::as_i64)
    }

    /// Like [`GgufFile::get_u64`], but a missing key is an error.
    pub fn require_u64(&self, key: &str) -> Result<u64, FormatError> {
        self.get_u64(key)?.ok_or_else(|| self.missing(key))
    }

    /// Like [`GgufFile::get_f32`], but a missing key is an error.
    pub fn require_f32(&self, key: &str) -> Result<f32, FormatError> {
        self.get_f32(key)?.ok_or_else(|| self.missing(key))
    }

    /// Like [`GgufFile::get_str`], but a missing key is an error.
    pub fn require_str(&self, key: &str) -> Result<&str, FormatError> {
        self.get_str(key)?.ok_or_else(|| self.missing(key))
    }

    /// `general.architecture`, which every GGUF model must have.
    pub fn architecture(&self) -> Result<&str, FormatError> {
        self.require_str(ARCHITECTURE_KEY)
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor named `name`, or an error naming the file and the tensor.
    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo, FormatError> {
        self.tensor(name)
            .ok_or_else(|| FormatError::invalid(&self.path, format!("missing tensor '{name}'")))
    }

    /// The whole file image (header, metadata and tensor data), as mapped.
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// Lets the OS drop `range` of the file image from resident memory: bytes the caller has
    /// copied and reads from its copy. Reading them again stays valid (they are mapped back
    /// in from the file); a file read into memory keeps them.
    pub fn release_range(&self, range: std::ops::Range<usize>) {
        self.storage.release(range);
    }

    /// Offset of a tensor's data from the start of the file image.
    pub fn tensor_file_offset(&self, t: &TensorInfo) -> u64 {
        self.data_offset + t.offset
    }

    /// The raw bytes of a tensor's data.
    ///
    /// # Panics
    ///
    /// Never for a [`TensorInfo`] taken from this file (its range was validated at open). A
    /// hand-made `TensorInfo` whose range lies outside the file panics.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let range = self.data_offset.checked_add(t.offset).and_then(|start| {
            let end = start.checked_add(t.n_bytes)?;
            Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
        });
        match range.and_then(|r| self.storage.bytes().get(r)) {
            Some(bytes) => bytes,
            None => panic!(
                "{}: tensor '{}' (offset {}, {} bytes) does not belong to this file",
                self.path.display(),
                t.name,
                t.offset,
                t.n_bytes
            ),
        }
    }

    /// Dequantizes a whole tensor to f32, in ggml element order.
    pub fn tensor_f32(&self, t: &TensorInfo) -> Result<Vec<f32>, FormatError> {
        let n = usize::try_from(t.n_elements).map_err(|_| {
            FormatError::invalid(
                &self.path,
                format!(
                    "tensor '{}' has {} elements, too many to hold in memory",
                    t.name, t.n_elements
                ),
            )
        })?;
        let mut out = vec![0.0f32; n];
        ggml::dequantize(t.ty, self.tensor_data(t), &mut out)
            .map_err(|e| FormatError::invalid(&self.path, format!("tensor '{}': {e}", t.name)))?;
        Ok(out)
    }
}
