//! safetensors: Hugging Face's tensor container, and the sharded folders made of it.
//!
//! A file is an 8-byte little-endian header length `N`, `N` bytes of UTF-8 JSON, then the data
//! section. The JSON object maps each tensor name to `{"dtype", "shape", "data_offsets":
//! [begin, end]}`, offsets relative to the start of the data section; the optional key
//! `__metadata__` maps strings to strings. Shapes are row-major and outermost first (the
//! reverse of ggml's order); data is little-endian.
//!
//! A model too large for one file is split into shards, and `model.safetensors.index.json`
//! (`{"metadata": {...}, "weight_map": {tensor: shard file}}`) says which shard holds which
//! tensor.
//!
//! [`SafetensorsFile::open`] maps a file and validates all of it up front — header length,
//! JSON, every dtype, shape and offset, overlaps, duplicate names — so that later accessors
//! cannot fail; [`ShardedSafetensors`] does the same across the shards of a folder and checks
//! the index against them. [`SafetensorsWriter`] writes single files and sharded folders,
//! atomically.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::file_io::{write_atomic, Storage};
use crate::ggml::{self, GgmlType};
use crate::FormatError;

/// The weights file of an unsharded Hugging Face model folder.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded Hugging Face model folder.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The header key that holds free-form string metadata rather than a tensor.
pub const METADATA_KEY: &str = "__metadata__";
/// The largest header accepted: real headers are a few megabytes at most, and this bounds
/// the memory a hostile header can make the parser use independently of the file's size
/// (the reference implementation uses the same limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;
/// The largest index file accepted (real ones are well under a megabyte).
pub const MAX_INDEX_LEN: u64 = 64 << 20;

/// The name writer errors carry in place of a file path: they concern the tensors handed to
/// the writer, before any file exists.
const WRITER_PATH: &str = "<safetensors writer>";

/// Element types of safetensors tensors (the byte-sized ones; sub-byte float formats are
/// refused as unsupported).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// Boolean, one byte (0 or 1).
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float, 5 exponent and 2 mantissa bits.
    F8E5M2,
    /// 8-bit float, 4 exponent and 3 mantissa bits.
    F8E4M3,
    /// 8-bit exponent-only scale (microscaling formats).
    F8E8M0,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE binary32.
    F32,
    /// IEEE binary64.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl Dtype {
    /// Every dtype, in the order of their names in messages.
    pub const ALL: [Dtype; 16] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8E5M2,
        Dtype::F8E4M3,
        Dtype::F8E8M0,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    /// The name the header uses (`"BF16"`, `"F8_E4M3"`, …).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    /// The dtype a header name stands for.
    pub fn from_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.iter().copied().find(|d| d.name() == name)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E5M2 | Dtype::F8E4M3 | Dtype::F8E8M0 => {
                1
            }
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }

    /// The ggml element type with the same bytes, for the float types ggml has (F32, F16,
    /// BF16): a row-major safetensors tensor of one of these is a ggml tensor with its
    /// dimensions reversed.
    pub fn ggml_type(self) -> Option<GgmlType> {
        match self {
            Dtype::F32 => Some(GgmlType::F32),
            Dtype::F16 => Some(GgmlType::F16),
            Dtype::BF16 => Some(GgmlType::BF16),
            _ => None,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of a safetensors file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Row-major shape, outermost dimension first; empty for a scalar.
    pub shape: Vec<u64>,
    /// `[begin, end)` of the data, relative to the start of the data section.
    pub data_offsets: [u64; 2],
    /// Product of the shape (1 for a scalar).
    pub n_elements: u64,
}

impl TensorInfo {
    /// Size of the data in bytes.
    pub fn n_bytes(&self) -> u64 {
        self.data_offsets[1] - self.data_offsets[0]
    }
}

/// An open, fully validated safetensors file. Tensor data stays in the memory map.
pub struct SafetensorsFile {
    path: PathBuf,
    storage: Storage,
    data_offset: u64,
    metadata: BTreeMap<String, String>,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

impl fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("data_offset", &self.data_offset)
            .field("tensors", &self.tensors.len())
            .field("file_size", &self.storage.bytes().len())
            .finish()
    }
}

impl SafetensorsFile {
    /// Maps and validates the safetensors file at `path`.
    ///
    /// Any structural problem — a header length past the end of the file, malformed JSON, a
    /// non-string metadata value, an unknown dtype, a duplicate or empty name, data offsets
    /// outside the data section or overlapping another tensor's, a byte length unlike
    /// shape × dtype size — is an error naming the file and the tensor.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile, FormatError> {
        let path = path.as_ref();
        Self::from_storage(path.to_path_buf(), Storage::map(path)?)
    }

    /// Validates a safetensors image already in memory; `path` only names it in errors.
    pub fn from_bytes(
        path: impl Into<PathBuf>,
        bytes: Vec<u8>,
    ) -> Result<SafetensorsFile, FormatError> {
        Self::from_storage(path.into(), Storage::Owned(bytes))
    }

    fn from_storage(path: PathBuf, storage: Storage) -> Result<SafetensorsFile, FormatError> {
        let parsed = parse(&path, storage.bytes())?;
        Ok(SafetensorsFile {
            path,
            storage,
            data_offset: parsed.data_offset,
            metadata: parsed.metadata,
            index: parsed
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            tensors: parsed.tensors,
        })
    }

    /// The file's path, as given to [`SafetensorsFile::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file image.
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// Offset of the data section from the start of the file (8 + header length).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The `__metadata__` entries (empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// All tensors, in header order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Offset of a tensor's data from the start of the file.
    pub fn tensor_file_offset(&self, t: &TensorInfo) -> u64 {
        self.data_offset + t.data_offsets[0]
    }

    /// The raw bytes of a tensor's data.
    ///
    /// # Panics
    ///
    /// Never for a [`TensorInfo`] taken from this file (its range was validated at open). A
    /// hand-made `TensorInfo` whose range lies outside the file panics.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let range = self
            .data_offset
            .checked_add(t.data_offsets[0])
            .zip(self.data_offset.checked_add(t.data_offsets[1]))
            .and_then(|(s, e)| Some(usize::try_from(s).ok()?..usize::try_from(e).ok()?));
        match range.and_then(|r| self.storage.bytes().get(r)) {
            Some(bytes) => bytes,
            None => panic!(
                "{}: tensor '{}' (offsets {:?}) does not belong to this file",
                self.path.display(),
                t.name,
                t.data_offsets
            ),
        }
    }

    /// A tensor of a float dtype (F32, F16, BF16, F64) converted to f32, in row-major order.
    pub fn tensor_f32(&self, t: &TensorInfo) -> Result<Vec<f32>, FormatError> {
        let data = self.tensor_data(t);
        let n = usize::try_from(t.n_elements).map_err(|_| {
            FormatError::invalid(
                &self.path,
                format!(
                    "tensor '{}' has too many elements to hold in memory",
                    t.name
                ),
            )
        })?;
        if t.dtype == Dtype::F64 {
            return Ok(data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8-byte chunk")) as f32)
                .collect());
        }
        let ty = t.dtype.ggml_type().ok_or_else(|| {
            FormatError::unsupported(
                &self.path,
                format!(
                    "tensor '{}' has dtype {}, which is not a float type",
                    t.name, t.dtype
                ),
            )
        })?;
        let mut out = vec![0.0f32; n];
        ggml::dequantize(ty, data, &mut out)
            .map_err(|e| FormatError::invalid(&self.path, format!("tensor '{}': {e}", t.name)))?;
        Ok(out)
    }
}

/// The header as written: entries in file order, duplicates detected while reading (a JSON
/// map would silently keep the last of two equal keys).
struct RawHeader {
    metadata: Option<BTreeMap<String, String>>,
    entries: Vec<(String, RawEntry)>,
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct HeaderVisitor;
        impl<'de> Visitor<'de> for HeaderVisitor {
            type Value = RawHeader;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object mapping tensor names to {dtype, shape, data_offsets}")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
                let mut seen = HashSet::new();
                let mut header = RawHeader {
                    metadata: None,
                    entries: Vec::new(),
                };
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format!(
                            "'{key}' appears more than once in the header"
                        )));
                    }
                    if key == METADATA_KEY {
                        let m = map.next_value::<BTreeMap<String, String>>().map_err(|e| {
                            de::Error::custom(format!(
                                "'{METADATA_KEY}' must map strings to strings: {e}"
                            ))
                        })?;
                        header.metadata = Some(m);
                    } else {
                        let entry = map
                            .next_value::<RawEntry>()
                            .map_err(|e| de::Error::custom(format!("tensor '{key}': {e}")))?;
                        header.entries.push((key, entry));
                    }
                }
                Ok(header)
            }
        }
        d.deserialize_map(HeaderVisitor)
    }
}

struct Parsed {
    data_offset: u64,
    metadata: BTreeMap<String, String>,
    tensors: Vec<TensorInfo>,
}

fn parse(path: &Path, buf: &[u8]) -> Result<Parsed, FormatError> {
    let invalid = |m: String| FormatError::invalid(path, m);
    let file_size = buf.len() as u64;
    let Some(len_bytes) = buf.get(..8) else {
        return Err(invalid(format!(
            "truncated file: {file_size} bytes, too short for the 8-byte header length of a \
             safetensors file"
        )));
    };
    let header_len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    if header_len > file_size - 8 {
        return Err(invalid(format!(
            "header length {header_len} reaches past the end of the file ({file_size} bytes): \
             truncated, or not a safetensors file"
        )));
    }
    if header_len > MAX_HEADER_LEN {
        return Err(invalid(format!(
            "header length {header_len} exceeds the {MAX_HEADER_LEN} bytes kiln accepts"
        )));
    }
    // Both bounds are below the file size, which fits in usize.
    let data_offset = 8 + header_len;
    let header_bytes = &buf[8..data_offset as usize];
    if header_bytes.first() != Some(&b'{') {
        return Err(invalid(
            "the header does not start with '{': not a safetensors file".to_string(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(header_bytes);
    let raw = RawHeader::deserialize(&mut de)
        .and_then(|h| de.end().map(|()| h))
        .map_err(|e| invalid(format!("malformed JSON header: {e}")))?;
    let data_len = file_size - data_offset;

    let mut tensors = Vec::with_capacity(raw.entries.len());
    for (name, e) in raw.entries {
        if name.is_empty() {
            return Err(invalid("a tensor has an empty name".to_string()));
        }
        let dtype = Dtype::from_name(&e.dtype).ok_or_else(|| {
            let known: Vec<&str> = Dtype::ALL.iter().map(|d| d.name()).collect();
            FormatError::unsupported(
                path,
                format!(
                    "tensor '{name}' has dtype '{}', which kiln does not read (known: {})",
                    e.dtype,
                    known.join(", ")
                ),
            )
        })?;
        let n_elements = e
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                invalid(format!(
                    "tensor '{name}' has shape {:?}, whose element count overflows",
                    e.shape
                ))
            })?;
        let [begin, end] = e.data_offsets;
        if begin > end {
            return Err(invalid(format!(
                "tensor '{name}' has data_offsets [{begin}, {end}]: the end is before the start"
            )));
        }
        if end > data_len {
            return Err(invalid(format!(
                "tensor '{name}' data occupies bytes {begin}..{end} of the data section, past \
                 its end at {data_len} bytes"
            )));
        }
        let expected = n_elements.checked_mul(dtype.size() as u64);
        if expected != Some(end - begin) {
            return Err(invalid(format!(
                "tensor '{name}' of shape {:?} and dtype {dtype} needs {} bytes, but its \
                 data_offsets [{begin}, {end}] span {}",
                e.shape,
                expected.map_or("an overflowing number of".to_string(), |n| n.to_string()),
                end - begin
            )));
        }
        tensors.push(TensorInfo {
            name,
            dtype,
            shape: e.shape,
            data_offsets: e.data_offsets,
            n_elements,
        });
    }
    check_overlaps(path, &tensors)?;
    Ok(Parsed {
        data_offset,
        metadata: raw.metadata.unwrap_or_default(),
        tensors,
    })
}

/// No two tensors may share a byte (empty tensors occupy none).
fn check_overlaps(path: &Path, tensors: &[TensorInfo]) -> Result<(), FormatError> {
    let mut ranges: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes() > 0).collect();
    ranges.sort_by_key(|t| t.data_offsets);
    for pair in ranges.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b.data_offsets[0] < a.data_offsets[1] {
            return Err(FormatError::invalid(
                path,
                format!(
                    "tensor '{}' (bytes {}..{}) overlaps tensor '{}' (bytes {}..{})",
                    a.name,
                    a.data_offsets[0],
                    a.data_offsets[1],
                    b.name,
                    b.data_offsets[0],
                    b.data_offsets[1]
                ),
            ));
        }
    }
    Ok(())
}

/// The tensors of one safetensors file or of all the shards an index names, looked up by
/// name across files.
#[derive(Debug)]
pub struct ShardedSafetensors {
    origin: PathBuf,
    files: Vec<Arc<SafetensorsFile>>,
    /// (file, tensor) positions, shard by shard in header order.
    entries: Vec<(usize, usize)>,
    index: HashMap<String, usize>,
}

impl ShardedSafetensors {
    /// The weights of a Hugging Face model folder: `model.safetensors`, else the shards
    /// `model.safetensors.index.json` names (the order transformers looks for them in).
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<ShardedSafetensors, FormatError> {
        let dir = dir.as_ref();
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_file(single);
        }
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(index);
        }
        Err(FormatError::invalid(
            dir,
            format!("no weights: the folder holds neither {SINGLE_FILE} nor {INDEX_FILE}"),
        ))
    }

    /// One safetensors file.
    pub fn open_file(path: impl AsRef<Path>) -> Result<ShardedSafetensors, FormatError> {
        let path = path.as_ref();
        let file = Arc::new(SafetensorsFile::open(path)?);
        let entries: Vec<(usize, usize)> = (0..file.tensors().len()).map(|i| (0, i)).collect();
        let index = file
            .tensors()
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(ShardedSafetensors {
            origin: path.to_path_buf(),
            files: vec![file],
            entries,
            index,
        })
    }

    /// The shards a `model.safetensors.index.json` names, which must lie beside it. Every
    /// tensor of the index must be in the shard it names, and no tensor may be in two shards.
    pub fn open_index(index_path: impl AsRef<Path>) -> Result<ShardedSafetensors, FormatError> {
        let index_path = index_path.as_ref();
        let invalid = |m: String| FormatError::invalid(index_path, m);
        let weight_map = read_weight_map(index_path)?;
        let dir = index_path.parent().unwrap_or(Path::new("."));

        // Open each shard once, in name order.
        let mut first_tensor: BTreeMap<&str, &str> = BTreeMap::new();
        for (tensor, shard) in &weight_map {
            if !is_plain_file_name(shard) {
                return Err(invalid(format!(
                    "weight_map places tensor '{tensor}' in '{shard}', which is not a file name \
                     in the index's folder"
                )));
            }
            first_tensor
                .entry(shard.as_str())
                .or_insert(tensor.as_str());
        }
        let mut files = Vec::with_capacity(first_tensor.len());
        let mut shard_index = HashMap::with_capacity(first_tensor.len());
        for (shard, tensor) in &first_tensor {
            let path = dir.join(shard);
            if !path.is_file() {
                return Err(invalid(format!(
                    "weight_map places tensor '{tensor}' in shard '{shard}', which is missing \
                     ({})",
                    path.display()
                )));
            }
            shard_index.insert(*shard, files.len());
            files.push(Arc::new(SafetensorsFile::open(&path)?));
        }
        for (tensor, shard) in &weight_map {
            let file = &files[shard_index[shard.as_str()]];
            if file.tensor(tensor).is_none() {
                return Err(invalid(format!(
                    "weight_map places tensor '{tensor}' in shard '{shard}', which does not \
                     hold it"
                )));
            }
        }
        let mut entries: Vec<(usize, usize)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (fi, file) in files.iter().enumerate() {
            for (ti, t) in file.tensors().iter().enumerate() {
                if let Some(&other) = index.get(&t.name) {
                    let other_file = &files[entries[other].0];
                    return Err(invalid(format!(
                        "tensor '{}' is in two shards: {} and {}",
                        t.name,
                        file_name(other_file.path()),
                        file_name(file.path())
                    )));
                }
                index.insert(t.name.clone(), entries.len());
                entries.push((fi, ti));
            }
        }
        Ok(ShardedSafetensors {
            origin: index_path.to_path_buf(),
            files,
            entries,
            index,
        })
    }

    /// The file or index the tensors were opened from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The open files (one per shard).
    pub fn files(&self) -> &[Arc<SafetensorsFile>] {
        &self.files
    }

    /// The tensor named `name` and the file holding it.
    pub fn tensor(&self, name: &str) -> Option<(&Arc<SafetensorsFile>, &TensorInfo)> {
        self.index.get(name).map(|&i| self.entry(i))
    }

    /// Every tensor with the file holding it, shard by shard in header order.
    pub fn tensors(&self) -> impl Iterator<Item = (&Arc<SafetensorsFile>, &TensorInfo)> {
        (0..self.entries.len()).map(|i| self.entry(i))
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no tensors at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn entry(&self, i: usize) -> (&Arc<SafetensorsFile>, &TensorInfo) {
        let (f, t) = self.entries[i];
        let file = &self.files[f];
        (file, &file.tensors()[t])
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    )
}

/// A name that stays in its folder: one normal path component.
fn is_plain_file_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(parts.next(), Some(Component::Normal(_))) && parts.next().is_none()
}

/// The `weight_map` of an index file, checked to map strings to strings.
fn read_weight_map(path: &Path) -> Result<BTreeMap<String, String>, FormatError> {
    let invalid = |m: String| FormatError::invalid(path, m);
    let len = std::fs::metadata(path)
        .map_err(|e| FormatError::io(path, e))?
        .len();
    if len > MAX_INDEX_LEN {
        return Err(invalid(format!(
            "the index is {len} bytes long, more than the {MAX_INDEX_LEN} kiln accepts"
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| FormatError::io(path, e))?;
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("malformed JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .ok_or_else(|| invalid("no 'weight_map' object".to_string()))?
        .as_object()
        .ok_or_else(|| invalid("'weight_map' is not an object".to_string()))?;
    map.iter()
        .map(|(tensor, shard)| match shard.as_str() {
            Some(s) => Ok((tensor.clone(), s.to_string())),
            None => Err(invalid(format!(
                "weight_map entry for tensor '{tensor}' is {shard}, expected a file name"
            ))),
        })
        .collect()
}

struct PendingTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    data: Vec<u8>,
}

/// Builds safetensors files: tensors in insertion order, the data section 8-byte aligned.
///
/// The writer checks what it is given (names, sizes), so its output always parses.
#[derive(Default)]
pub struct SafetensorsWriter {
    metadata: BTreeMap<String, String>,
    tensors: Vec<PendingTensor>,
}

impl SafetensorsWriter {
    /// An empty file.
    pub fn new() -> SafetensorsWriter {
        SafetensorsWriter::default()
    }

    /// Sets a `__metadata__` entry (transformers writes `"format": "pt"`).
    pub fn add_metadata(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.metadata.insert(key.into(), value.into());
    }

    /// Adds a tensor with already-encoded little-endian data. `shape` is row-major, outermost
    /// first. Checks the name is new, non-empty and not `__metadata__`, and that `data` has
    /// exactly the size the shape and dtype imply.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dtype: Dtype,
        shape: &[u64],
        data: Vec<u8>,
    ) -> Result<(), FormatError> {
        let name = name.into();
        let fail = |m: String| Err(FormatError::invalid(WRITER_PATH, m));
        if name.is_empty() || name == METADATA_KEY {
            return fail(format!("'{name}' cannot name a tensor"));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return fail(format!("tensor '{name}' added twice"));
        }
        let expected = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size() as u64));
        if expected != Some(data.len() as u64) {
            return fail(format!(
                "tensor '{name}' {shape:?} of {dtype} needs {} bytes, got {}",
                expected.map_or("an overflowing number of".to_string(), |n| n.to_string()),
                data.len()
            ));
        }
        self.tensors.push(PendingTensor {
            name,
            dtype,
            shape: shape.to_vec(),
            data,
        });
        Ok(())
    }

    /// Adds a tensor given as f32 values in row-major order, stored as `dtype` (F32, F16 or
    /// BF16, rounded to nearest even).
    pub fn add_tensor_f32(
        &mut self,
        name: impl Into<String>,
        dtype: Dtype,
        shape: &[u64],
        values: &[f32],
    ) -> Result<(), FormatError> {
        let name = name.into();
        let ty = dtype.ggml_type().ok_or_else(|| {
            FormatError::invalid(
                WRITER_PATH,
                format!("tensor '{name}': cannot store f32 values as {dtype}"),
            )
        })?;
        let data = ggml::quantize(ty, values)
            .map_err(|e| FormatError::invalid(WRITER_PATH, format!("tensor '{name}': {e}")))?;
        self.add_tensor(name, dtype, shape, data)
    }

    /// Bytes of tensor data added so far.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.data.len() as u64).sum()
    }

    /// The header JSON for `tensors`, padded with spaces so the data section starts on an
    /// 8-byte boundary (as the reference writer does, which lets readers cast in place).
    fn header(&self, tensors: &[&PendingTensor]) -> Vec<u8> {
        let mut obj = serde_json::Map::new();
        if !self.metadata.is_empty() {
            obj.insert(
                METADATA_KEY.to_string(),
                serde_json::to_value(&self.metadata).expect("strings serialize"),
            );
        }
        let mut pos = 0u64;
        for t in tensors {
            let end = pos + t.data.len() as u64;
            obj.insert(
                t.name.clone(),
                serde_json::json!({
                    "dtype": t.dtype.name(),
                    "shape": t.shape,
                    "data_offsets": [pos, end],
                }),
            );
            pos = end;
        }
        let mut header = serde_json::to_vec(&obj).expect("JSON values serialize");
        while (8 + header.len()) % 8 != 0 {
            header.push(b' ');
        }
        header
    }

    fn write_tensors(&self, tensors: &[&PendingTensor], w: &mut dyn Write) -> io::Result<()> {
        let header = self.header(tensors);
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for t in tensors {
            w.write_all(&t.data)?;
        }
        Ok(())
    }

    /// Streams the whole file to `w`.
    pub fn write_to(&self, w: &mut dyn Write) -> io::Result<()> {
        let all: Vec<&PendingTensor> = self.tensors.iter().collect();
        self.write_tensors(&all, w)
    }

    /// The whole file in memory.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = self.write_to(&mut out);
        out
    }

    /// Writes the file to `path` atomically (temporary file, then rename).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), FormatError> {
        write_atomic(path.as_ref(), |w| self.write_to(w))
    }

    /// Writes the tensors into `dir` as shards of at most `max_shard_bytes` of data each (a
    /// larger tensor gets a shard of its own), named `model-00001-of-0000N.safetensors` as
    /// transformers names them, plus `model.safetensors.index.json`. Every file is written
    /// atomically, the index last, so the index never names a shard that is not complete.
    /// Returns the shard paths.
    pub fn write_sharded(
        &self,
        dir: impl AsRef<Path>,
        max_shard_bytes: u64,
    ) -> Result<Vec<PathBuf>, FormatError> {
        let dir = dir.as_ref();
        let mut shards: Vec<Vec<&PendingTensor>> = Vec::new();
        let mut current_bytes = 0u64;
        for t in &self.tensors {
            let n = t.data.len() as u64;
            match shards.last_mut() {
                Some(shard) if current_bytes + n <= max_shard_bytes => {
                    shard.push(t);
                    current_bytes += n;
                }
                _ => {
                    shards.push(vec![t]);
                    current_bytes = n;
                }
            }
        }
        if shards.is_empty() {
            shards.push(Vec::new());
        }
        let n_shards = shards.len();
        let mut weight_map = BTreeMap::new();
        let mut paths = Vec::with_capacity(n_shards);
        for (i, shard) in shards.iter().enumerate() {
            let name = format!("model-{:05}-of-{n_shards:05}.safetensors", i + 1);
            let path = dir.join(&name);
            write_atomic(&path, |w| self.write_tensors(shard, w))?;
            for t in shard {
                weight_map.insert(t.name.clone(), name.clone());
            }
            paths.push(path);
        }
        let index = serde_json::json!({
            "metadata": { "total_size": self.data_bytes() },
            "weight_map": weight_map,
        });
        let text = serde_json::to_vec_pretty(&index).expect("JSON values serialize");
        write_atomic(&dir.join(INDEX_FILE), |w| w.write_all(&text))?;
        Ok(paths)
    }
}
