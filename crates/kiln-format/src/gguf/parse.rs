//! Validating GGUF parser.
//!
//! Every count and length in the file is checked against the bytes that remain before it is
//! used, so no allocation is ever sized by an unchecked header field, and every error names
//! the key or tensor being read.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::Path;

use super::value::{type_id, MetadataValue};
use super::{TensorInfo, ALIGNMENT_KEY, DEFAULT_ALIGNMENT};
use crate::ggml::GgmlType;
use crate::FormatError;

/// `GGUF` at the byte level.
pub(crate) const MAGIC: [u8; 4] = *b"GGUF";
/// Versions kiln reads. Version 1 used 32-bit counts and lengths and predates every model
/// kiln targets.
pub(crate) const MIN_VERSION: u32 = 2;
pub(crate) const MAX_VERSION: u32 = 3;
/// GGUF allows at most four dimensions (ggml's `GGML_MAX_DIMS`).
pub(crate) const MAX_DIMS: u32 = 4;
/// Arrays may nest; deeper than this is treated as hostile (no real model nests at all).
pub(crate) const MAX_ARRAY_DEPTH: usize = 4;
/// The longest array accepted. Each parsed element takes far more memory than its bytes in
/// the file (a u8 becomes a 32-byte value), so the bound by remaining bytes alone would let a
/// hostile header demand many times the file size; real tokenizer arrays are a few hundred
/// thousand entries.
pub(crate) const MAX_ARRAY_LEN: u64 = 1 << 24;
/// The most metadata values (array elements included) a file may hold in total, for the same
/// reason as [`MAX_ARRAY_LEN`]: it bounds the memory a hostile file can make the parser use
/// (about 1 GiB) independently of the file's size. Real models hold around a million.
pub(crate) const MAX_METADATA_VALUES: u64 = 1 << 25;
/// Metadata keys are at most 65535 bytes (GGUF spec).
pub(crate) const MAX_KEY_LEN: u64 = 65535;

/// Fewest bytes a metadata entry can take: key length (8) + one key byte + type (4) + a
/// one-byte value.
const MIN_KV_BYTES: u64 = 8 + 1 + 4 + 1;
/// Fewest bytes a tensor info can take: name length (8) + one name byte + n_dims (4) + one
/// dimension (8) + type (4) + offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 1 + 4 + 8 + 4 + 8;

pub(crate) struct Parsed {
    pub version: u32,
    pub alignment: u64,
    pub metadata: Vec<(String, MetadataValue)>,
    pub metadata_index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    pub tensor_index: HashMap<String, usize>,
    pub data_offset: u64,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Metadata values parsed so far, against [`MAX_METADATA_VALUES`].
    values: u64,
}

impl<'a> Cursor<'a> {
    fn invalid(&self, message: impl Into<String>) -> FormatError {
        FormatError::invalid(self.path, message)
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    /// Takes `n` bytes, or reports truncation while reading `what`.
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], FormatError> {
        if n > self.remaining() {
            return Err(self.invalid(format!(
                "truncated file: {} needs {n} bytes at offset {}, but the file ends at {}",
                what(),
                self.pos,
                self.buf.len()
            )));
        }
        // n <= remaining, which fits in usize.
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.buf[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], FormatError> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, FormatError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, FormatError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A GGUF string (u64 length, then UTF-8 bytes).
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<&'a str, FormatError> {
        let len_at = self.pos;
        let len = self.u64(&|| format!("length of {}", what()))?;
        if len > self.remaining() {
            return Err(self.invalid(format!(
                "{} has length {len} (at offset {len_at}), but only {} bytes remain in the file",
                what(),
                self.remaining()
            )));
        }
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|e| {
            self.invalid(format!(
                "{} is not valid UTF-8 ({e}; string at offset {})",
                what(),
                len_at + 8
            ))
        })
    }
}

fn align_up(pos: u64, alignment: u64) -> Option<u64> {
    let rem = pos % alignment;
    if rem == 0 {
        Some(pos)
    } else {
        pos.checked_add(alignment - rem)
    }
}

/// Smallest encoding of one value of type `ty`, or `None` for an unknown type.
fn min_value_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        type_id::U8 | type_id::I8 | type_id::BOOL => 1,
        type_id::U16 | type_id::I16 => 2,
        type_id::U32 | type_id::I32 | type_id::F32 => 4,
        type_id::U64 | type_id::I64 | type_id::F64 => 8,
        type_id::STRING => 8,
        type_id::ARRAY => 4 + 8,
        _ => return None,
    })
}

fn unknown_type(c: &Cursor<'_>, ty: u32, context: &str) -> FormatError {
    c.invalid(format!(
        "{context} has unknown value type {ty} (expected 0 to 12)"
    ))
}

/// Reads one value of type `ty`; `context` names it ("metadata key 'x'", "… element 3").
fn read_value(
    c: &mut Cursor<'_>,
    ty: u32,
    context: &str,
    depth: usize,
) -> Result<MetadataValue, FormatError> {
    let what = || format!("value of {context}");
    Ok(match ty {
        type_id::U8 => MetadataValue::U8(c.array::<1>(&what)?[0]),
        type_id::I8 => MetadataValue::I8(i8::from_le_bytes(c.array(&what)?)),
        type_id::U16 => MetadataValue::U16(u16::from_le_bytes(c.array(&what)?)),
        type_id::I16 => MetadataValue::I16(i16::from_le_bytes(c.array(&what)?)),
        type_id::U32 => MetadataValue::U32(u32::from_le_bytes(c.array(&what)?)),
        type_id::I32 => MetadataValue::I32(i32::from_le_bytes(c.array(&what)?)),
        type_id::U64 => MetadataValue::U64(u64::from_le_bytes(c.array(&what)?)),
        type_id::I64 => MetadataValue::I64(i64::from_le_bytes(c.array(&what)?)),
        type_id::F32 => MetadataValue::F32(f32::from_le_bytes(c.array(&what)?)),
        type_id::F64 => MetadataValue::F64(f64::from_le_bytes(c.array(&what)?)),
        type_id::BOOL => {
            let at = c.pos;
            match c.array::<1>(&what)?[0] {
                0 => MetadataValue::Bool(false),
                1 => MetadataValue::Bool(true),
                other => {
                    return Err(c.invalid(format!(
                        "{context} is a bool stored as {other} at offset {at}, expected 0 or 1"
                    )))
                }
            }
        }
        type_id::STRING => MetadataValue::String(c.string(&what)?.to_owned()),
        type_id::ARRAY => read_array(c, context, depth)?,
        other => return Err(unknown_type(c, other, context)),
    })
}

fn read_array(
    c: &mut Cursor<'_>,
    context: &str,
    depth: usize,
) -> Result<MetadataValue, FormatError> {
    if depth >= MAX_ARRAY_DEPTH {
        return Err(c.invalid(format!(
            "{context} nests arrays more than {MAX_ARRAY_DEPTH} deep"
        )));
    }
    let elem_ty = c.u32(&|| format!("array element type of {context}"))?;
    let len_at = c.pos;
    let len = c.u64(&|| format!("array length of {context}"))?;
    let Some(min) = min_value_bytes(elem_ty) else {
        return Err(unknown_type(c, elem_ty, &format!("array {context}")));
    };
    if len > MAX_ARRAY_LEN {
        return Err(c.invalid(format!(
            "{context} is an array of {len} elements (length at offset {len_at}); \
             kiln accepts at most {MAX_ARRAY_LEN}"
        )));
    }
    // len <= 2^24 and min <= 12, so this cannot overflow.
    if len * min > c.remaining() {
        return Err(c.invalid(format!(
            "{context} is an array of {len} {} elements (length at offset {len_at}), which \
             needs at least {} bytes, but only {} remain in the file",
            type_id::name(elem_ty),
            len * min,
            c.remaining()
        )));
    }
    c.values += len;
    if c.values > MAX_METADATA_VALUES {
        return Err(c.invalid(format!(
            "{context} brings the metadata to more than {MAX_METADATA_VALUES} values in \
             total, more than kiln accepts"
        )));
    }
    let mut items = Vec::with_capacity(len as usize);
    for i in 0..len {
        items.push(read_value(
            c,
            elem_ty,
            &format!("{context} element {i}"),
            depth + 1,
        )?);
    }
    Ok(MetadataValue::Array(items))
}

pub(crate) fn parse(path: &Path, buf: &[u8]) -> Result<Parsed, FormatError> {
    let mut c = Cursor {
        buf,
        pos: 0,
        path,
        values: 0,
    };
    let file_size = buf.len() as u64;

    let magic = c.array::<4>(&|| "the GGUF magic".to_string())?;
    if magic != MAGIC {
        return Err(c.invalid(format!(
            "not a GGUF file: starts with bytes {:02x} {:02x} {:02x} {:02x}, expected \"GGUF\" \
             (47 47 55 46)",
            magic[0], magic[1], magic[2], magic[3]
        )));
    }
    let version = c.u32(&|| "the GGUF version".to_string())?;
    if !(MIN_VERSION..=MAX_VERSION).contains(&version) {
        let hint = if (MIN_VERSION..=MAX_VERSION).contains(&version.swap_bytes()) {
            " (this looks like a big-endian GGUF file, which kiln does not read)"
        } else {
            ""
        };
        return Err(FormatError::unsupported(
            path,
            format!(
                "GGUF version {version} is not supported; kiln reads versions \
                 {MIN_VERSION} and {MAX_VERSION}{hint}"
            ),
        ));
    }
    let tensor_count = c.u64(&|| "the tensor count".to_string())?;
    let kv_count = c.u64(&|| "the metadata entry count".to_string())?;

    let needed = tensor_count
        .checked_mul(MIN_TENSOR_INFO_BYTES)
        .and_then(|t| kv_count.checked_mul(MIN_KV_BYTES)?.checked_add(t));
    if needed.is_none_or(|n| n > c.remaining()) {
        return Err(c.invalid(format!(
            "header claims {tensor_count} tensors and {kv_count} metadata entries, but the \
             {} bytes after the header cannot hold that many (each tensor info takes at least \
             {MIN_TENSOR_INFO_BYTES} bytes, each metadata entry {MIN_KV_BYTES}): the file is \
             truncated or corrupt",
            c.remaining()
        )));
    }
    // Both counts are now bounded by the file size.

    let mut metadata = Vec::with_capacity(kv_count as usize);
    let mut metadata_index = HashMap::with_capacity(kv_count as usize);
    for i in 0..kv_count {
        let key_at = c.pos;
        let key = c.string(&|| format!("metadata key #{i}"))?;
        if key.is_empty() {
            return Err(c.invalid(format!("metadata key #{i} (at offset {key_at}) is empty")));
        }
        if key.len() as u64 > MAX_KEY_LEN {
            return Err(c.invalid(format!(
                "metadata key #{i} (at offset {key_at}) is {} bytes long; keys are at most \
                 {MAX_KEY_LEN}",
                key.len()
            )));
        }
        let context = format!("metadata key '{key}'");
        let ty = c.u32(&|| format!("value type of {context}"))?;
        let value = read_value(&mut c, ty, &context, 0)?;
        match metadata_index.entry(key.to_owned()) {
            Entry::Occupied(_) => {
                return Err(c.invalid(format!(
                    "metadata key '{key}' appears more than once (again at offset {key_at})"
                )))
            }
            Entry::Vacant(v) => {
                v.insert(metadata.len());
            }
        }
        metadata.push((key.to_owned(), value));
    }

    let alignment = match metadata_index.get(ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some(&i) => {
            let value = &metadata[i].1;
            match value.as_u64() {
                Some(a) if a != 0 && a.is_power_of_two() => a,
                Some(_) => {
                    return Err(c.invalid(format!(
                        "metadata key '{ALIGNMENT_KEY}' is {}, expected a nonzero power of two",
                        value.describe()
                    )))
                }
                None => {
                    return Err(c.invalid(format!(
                        "metadata key '{ALIGNMENT_KEY}' is {}, expected an unsigned integer \
                         (a nonzero power of two)",
                        value.describe()
                    )))
                }
            }
        }
    };

    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(tensor_count as usize);
    let mut tensor_index = HashMap::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let info_at = c.pos;
        let name = c.string(&|| format!("name of tensor #{i}"))?;
        if name.is_empty() {
            return Err(c.invalid(format!(
                "tensor #{i} (info at offset {info_at}) has an empty name"
            )));
        }
        let t = read_tensor_info(&mut c, name, alignment)?;
        match tensor_index.entry(t.name.clone()) {
            Entry::Occupied(_) => {
                return Err(c.invalid(format!(
                    "tensor name '{name}' appears more than once (again at offset {info_at})"
                )))
            }
            Entry::Vacant(v) => {
                v.insert(tensors.len());
            }
        }
        tensors.push(t);
    }

    let data_offset = align_up(c.pos as u64, alignment).ok_or_else(|| {
        c.invalid(format!(
            "the data section offset overflows when aligning {} to {alignment}",
            c.pos
        ))
    })?;

    check_tensor_ranges(&c, &tensors, data_offset, file_size)?;

    Ok(Parsed {
        version,
        alignment,
        metadata,
        metadata_index,
        tensors,
        tensor_index,
        data_offset,
    })
}

fn read_tensor_info(
    c: &mut Cursor<'_>,
    name: &str,
    alignment: u64,
) -> Result<TensorInfo, FormatError> {
    let n_dims = c.u32(&|| format!("dimension count of tensor '{name}'"))?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(c.invalid(format!(
            "tensor '{name}' has {n_dims} dimensions, expected 1 to {MAX_DIMS}"
        )));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for d in 0..n_dims {
        let dim = c.u64(&|| format!("dimension {d} of tensor '{name}'"))?;
        // ggml holds dimensions as int64_t.
        if dim == 0 || dim > i64::MAX as u64 {
            return Err(c.invalid(format!(
                "tensor '{name}' dimension {d} is {dim}, expected 1 to {}",
                i64::MAX
            )));
        }
        dims.push(dim);
    }
    let n_elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| {
            acc.checked_mul(d).filter(|&n| n <= i64::MAX as u64)
        })
        .ok_or_else(|| {
            c.invalid(format!(
                "tensor '{name}' has dimensions {dims:?} whose element count overflows"
            ))
        })?;
    let type_at = c.pos;
    let type_id = c.u32(&|| format!("type of tensor '{name}'"))?;
    let ty = GgmlType::from_id(type_id).ok_or_else(|| {
        let supported: Vec<String> = GgmlType::ALL
            .iter()
            .map(|t| format!("{}={}", t.name(), t.id()))
            .collect();
        FormatError::unsupported(
            c.path,
            format!(
                "tensor '{name}' has ggml type id {type_id} (at offset {type_at}), which kiln \
                 does not support (supported: {})",
                supported.join(", ")
            ),
        )
    })?;
    let offset = c.u64(&|| format!("data offset of tensor '{name}'"))?;

    let block_len = ty.block_len() as u64;
    if dims[0] % block_len != 0 {
        return Err(c.invalid(format!(
            "tensor '{name}' has rows of {} elements, which is not a multiple of the {ty} \
             block length {block_len}",
            dims[0]
        )));
    }
    let n_bytes = (n_elements / block_len)
        .checked_mul(ty.block_bytes() as u64)
        .ok_or_else(|| {
            c.invalid(format!(
                "tensor '{name}' of {n_elements} {ty} elements has a byte size that overflows"
            ))
        })?;
    if offset % alignment != 0 {
        return Err(c.invalid(format!(
            "tensor '{name}' has data offset {offset}, which is not a multiple of the \
             alignment {alignment}"
        )));
    }
    Ok(TensorInfo {
        name: name.to_owned(),
        dims,
        ty,
        offset,
        n_elements,
        n_bytes,
    })
}

/// Every tensor's data must lie inside the file, and no two may overlap.
fn check_tensor_ranges(
    c: &Cursor<'_>,
    tensors: &[TensorInfo],
    data_offset: u64,
    file_size: u64,
) -> Result<(), FormatError> {
    let mut ranges = Vec::with_capacity(tensors.len());
    for t in tensors {
        let range = data_offset
            .checked_add(t.offset)
            .and_then(|start| Some((start, start.checked_add(t.n_bytes)?)));
        match range {
            Some((start, end)) if end <= file_size => ranges.push((start, end, t)),
            Some((start, end)) => {
                return Err(c.invalid(format!(
                    "tensor '{}' data occupies bytes {start}..{end} ({} bytes of {}), past the \
                     end of the file at {file_size} bytes",
                    t.name, t.n_bytes, t.ty
                )))
            }
            None => {
                return Err(c.invalid(format!(
                    "tensor '{}' data offset {} + size {} overflows",
                    t.name, t.offset, t.n_bytes
                )))
            }
        }
    }
    ranges.sort_by_key(|&(start, end, _)| (start, end));
    for pair in ranges.windows(2) {
        let (a_start, a_end, a) = pair[0];
        let (b_start, b_end, b) = pair[1];
        if b_start < a_end {
            return Err(c.invalid(format!(
                "tensor '{}' (bytes {a_start}..{a_end}) overlaps tensor '{}' (bytes \
                 {b_start}..{b_end})",
                a.name, b.name
            )));
        }
    }
    Ok(())
}
