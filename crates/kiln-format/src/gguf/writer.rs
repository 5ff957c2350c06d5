//! GGUF writer.

use std::io::{self, Write};
use std::path::Path;

use super::parse::{MAGIC, MAX_DIMS};
use super::value::{type_id, MetadataValue};
use super::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT};
use crate::file_io::write_atomic;
use crate::ggml::{self, GgmlType};
use crate::FormatError;

/// The name writer errors carry in place of a file path: they concern the tensors and values
/// handed to the writer, before any file exists.
const WRITER_PATH: &str = "<gguf writer>";

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

/// Builds a GGUF file: metadata and tensors in insertion order, tensor data aligned.
///
/// The writer checks what it is given (tensor sizes, dimensions, homogeneous arrays), so its
/// output always parses — except where a test deliberately asks for something the reader
/// refuses (an old version via [`GgufWriter::set_version`], a bad alignment via
/// [`GgufWriter::set_alignment`] or a hand-written `general.alignment`).
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty GGUF v3 file with the default alignment of 32.
    pub fn new() -> Self {
        GgufWriter {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Sets the version number written in the header. The layout is always that of v2/v3
    /// (64-bit counts and lengths), which is all the two versions differ from v1 in.
    pub fn set_version(&mut self, v: u32) {
        self.version = v;
    }

    /// Sets the tensor data alignment. Unless `general.alignment` was added explicitly, a
    /// value other than 32 is also recorded as `general.alignment` (u32). The writer lays
    /// data out with any nonzero value, so tests can produce files the reader must refuse;
    /// 0 is recorded as given but laid out as 1.
    pub fn set_alignment(&mut self, a: u64) {
        self.alignment = a;
    }

    /// Adds (or replaces, keeping its position) a metadata entry.
    ///
    /// # Panics
    ///
    /// If `value` contains an array whose elements are not all of one type, which GGUF cannot
    /// represent. [`GgufWriter::try_add_metadata`] reports that as an error instead.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: MetadataValue) {
        if let Err(e) = self.try_add_metadata(key, value) {
            panic!("{e}");
        }
    }

    /// Adds (or replaces, keeping its position) a metadata entry, refusing empty keys and
    /// arrays whose elements are not all of one type.
    pub fn try_add_metadata(
        &mut self,
        key: impl Into<String>,
        value: MetadataValue,
    ) -> Result<(), FormatError> {
        let key = key.into();
        if key.is_empty() {
            return Err(FormatError::invalid(WRITER_PATH, "empty metadata key"));
        }
        check_homogeneous(&key, &value)?;
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key, value)),
        }
        Ok(())
    }

    /// Adds a tensor with already-encoded data. `dims` are in ggml order (`dims[0]` is the
    /// row length). Checks the name is new and non-empty, there are 1 to 4 nonzero
    /// dimensions, the row length is a whole number of blocks and `data` has exactly the size
    /// the type and dimensions imply.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> Result<(), FormatError> {
        let name = name.into();
        let n_elements = self.check_tensor(&name, dims, ty)?;
        let expected = usize::try_from(n_elements)
            .ok()
            .and_then(|n| ty.row_bytes(n));
        if expected != Some(data.len()) {
            return Err(FormatError::invalid(
                WRITER_PATH,
                format!(
                    "tensor '{name}' {dims:?} of {ty} needs {} bytes, got {}",
                    expected.map_or("an impossible number of".to_string(), |n| n.to_string()),
                    data.len()
                ),
            ));
        }
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            ty,
            data,
        });
        Ok(())
    }

    /// Adds a tensor given as f32 values in ggml element order, quantized to `ty` with
    /// [`ggml::quantize`].
    pub fn add_tensor_f32(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        values: &[f32],
    ) -> Result<(), FormatError> {
        let name = name.into();
        let n_elements = self.check_tensor(&name, dims, ty)?;
        if n_elements != values.len() as u64 {
            return Err(FormatError::invalid(
                WRITER_PATH,
                format!(
                    "tensor '{name}' {dims:?} has {n_elements} elements, got {} values",
                    values.len()
                ),
            ));
        }
        let data = ggml::quantize(ty, values)
            .map_err(|e| FormatError::invalid(WRITER_PATH, format!("tensor '{name}': {e}")))?;
        self.add_tensor(name, dims, ty, data)
    }

    /// Validates a tensor's name, dimensions and type; returns its element count.
    fn check_tensor(&self, name: &str, dims: &[u64], ty: GgmlType) -> Result<u64, FormatError> {
        let fail = |msg: String| Err(FormatError::invalid(WRITER_PATH, msg));
        if name.is_empty() {
            return fail("empty tensor name".to_string());
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return fail(format!("tensor '{name}' added twice"));
        }
        if dims.is_empty() || dims.len() > MAX_DIMS as usize {
            return fail(format!(
                "tensor '{name}' has {} dimensions, expected 1 to {MAX_DIMS}",
                dims.len()
            ));
        }
        if dims.contains(&0) {
            return fail(format!("tensor '{name}' has a zero dimension: {dims:?}"));
        }
        if dims[0] % ty.block_len() as u64 != 0 {
            return fail(format!(
                "tensor '{name}' has rows of {} elements, not a multiple of the {ty} block \
                 length {}",
                dims[0],
                ty.block_len()
            ));
        }
        match dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
        {
            Some(n) => Ok(n),
            None => fail(format!(
                "tensor '{name}' dimensions {dims:?} overflow the element count"
            )),
        }
    }

    /// Layout: effective alignment for padding (0 is treated as 1).
    fn pad_alignment(&self) -> u64 {
        self.alignment.max(1)
    }

    /// The metadata as written: the caller's entries, preceded by `general.alignment` when a
    /// non-default alignment was set and the caller did not write the key.
    fn effective_metadata(&self) -> Vec<(&str, MetadataValue)> {
        let mut out = Vec::with_capacity(self.metadata.len() + 1);
        let has_key = self.metadata.iter().any(|(k, _)| k == ALIGNMENT_KEY);
        if self.alignment != DEFAULT_ALIGNMENT && !has_key {
            let value = match u32::try_from(self.alignment) {
                Ok(a) => MetadataValue::U32(a),
                Err(_) => MetadataValue::U64(self.alignment),
            };
            out.push((ALIGNMENT_KEY, value));
        }
        out.extend(self.metadata.iter().map(|(k, v)| (k.as_str(), v.clone())));
        out
    }

    /// Tensor data offsets relative to the data section.
    fn tensor_offsets(&self) -> Vec<u64> {
        let align = self.pad_alignment();
        let mut offsets = Vec::with_capacity(self.tensors.len());
        let mut pos = 0u64;
        for t in &self.tensors {
            pos = pos.div_ceil(align) * align;
            offsets.push(pos);
            pos += t.data.len() as u64;
        }
        offsets
    }

    /// Streams the file to `w`.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let align = self.pad_alignment();
        let mut w = Counting { inner: w, pos: 0 };

        let metadata = self.effective_metadata();
        w.put(&MAGIC)?;
        w.put(&self.version.to_le_bytes())?;
        w.put(&(self.tensors.len() as u64).to_le_bytes())?;
        w.put(&(metadata.len() as u64).to_le_bytes())?;
        let mut scratch = Vec::new();
        for (key, value) in &metadata {
            scratch.clear();
            encode_string(&mut scratch, key);
            scratch.extend_from_slice(&value.type_id().to_le_bytes());
            encode_value(&mut scratch, value);
            w.put(&scratch)?;
        }
        let offsets = self.tensor_offsets();
        for (t, &offset) in self.tensors.iter().zip(&offsets) {
            scratch.clear();
            encode_string(&mut scratch, &t.name);
            scratch.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                scratch.extend_from_slice(&d.to_le_bytes());
            }
            scratch.extend_from_slice(&t.ty.id().to_le_bytes());
            scratch.extend_from_slice(&offset.to_le_bytes());
            w.put(&scratch)?;
        }
        if self.tensors.is_empty() {
            return Ok(());
        }
        let data_start = w.pos.div_ceil(align) * align;
        w.pad_to(data_start)?;
        for (t, &offset) in self.tensors.iter().zip(&offsets) {
            w.pad_to(data_start + offset)?;
            w.put(&t.data)?;
        }
        Ok(())
    }

    /// The whole file in memory.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = self.write_to(&mut out);
        out
    }

    /// Writes the file to `path` atomically: into a temporary file in the same directory,
    /// flushed to disk, then renamed over `path`. Readers never see a partial file, and a
    /// reader holding the old file mapped keeps its (unchanged) copy.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), FormatError> {
        write_atomic(path.as_ref(), |mut w| self.write_to(&mut w))
    }
}

/// A writer that knows how many bytes it has written, for padding.
struct Counting<'a, W: Write> {
    inner: &'a mut W,
    pos: u64,
}

impl<W: Write> Counting<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.pos += bytes.len() as u64;
        self.inner.write_all(bytes)
    }

    fn pad_to(&mut self, target: u64) -> io::Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        while self.pos < target {
            let k = (target - self.pos).min(ZEROS.len() as u64) as usize;
            self.put(&ZEROS[..k])?;
        }
        Ok(())
    }
}

fn check_homogeneous(key: &str, value: &MetadataValue) -> Result<(), FormatError> {
    if let MetadataValue::Array(items) = value {
        if let Some(first) = items.first() {
            let ty = first.type_id();
            if let Some((i, odd)) = items.iter().enumerate().find(|(_, v)| v.type_id() != ty) {
                return Err(FormatError::invalid(
                    WRITER_PATH,
                    format!(
                        "metadata key '{key}': array mixes {} and {} (element {i}); GGUF arrays \
                         hold one type",
                        first.type_name(),
                        odd.type_name()
                    ),
                ));
            }
        }
        for item in items {
            check_homogeneous(key, item)?;
        }
    }
    Ok(())
}

fn encode_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Encodes a value without its type id. Empty arrays are written with element type u8,
/// since the value carries no element type.
fn encode_value(out: &mut Vec<u8>, value: &MetadataValue) {
    match value {
        MetadataValue::U8(v) => out.push(*v),
        MetadataValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::Bool(v) => out.push(u8::from(*v)),
        MetadataValue::String(s) => encode_string(out, s),
        MetadataValue::Array(items) => {
            let elem = items.first().map_or(type_id::U8, MetadataValue::type_id);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                encode_value(out, item);
            }
        }
    }
}
