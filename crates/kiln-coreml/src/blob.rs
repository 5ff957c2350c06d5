//! The weight blob storage file (`weights/weight.bin`), format version 2.
//!
//! Layout (all integers little-endian, every record 64-byte aligned):
//! - a 64-byte header: `count: u32`, `version: u32` (2), then reserved bytes;
//! - per blob, a 64-byte metadata record: `sentinel: u32` (0xDEADBEEF), `dtype: u32`,
//!   `size_in_bytes: u64`, `data_offset: u64`, `padding_size_in_bits: u64`, reserved bytes;
//!   followed (at `data_offset`) by the blob's bytes.
//!
//! A program's `BlobFileValue.offset` is the offset of the metadata record.

use crate::value::{decode_bytes, Arr, DType, TensorSig};
use crate::CoreMlError;
use std::path::{Path, PathBuf};

/// The sentinel that opens every metadata record.
pub const BLOB_SENTINEL: u32 = 0xDEAD_BEEF;
/// The alignment of headers, metadata records and data.
pub const BLOB_ALIGNMENT: u64 = 64;
const RECORD: u64 = 64;

/// The element type codes of the blob format.
fn blob_dtype(code: u32) -> Option<DType> {
    Some(match code {
        1 => DType::F16,
        2 => DType::F32,
        3 => DType::U8,
        4 => DType::I8,
        5 => DType::BF16,
        6 => DType::I16,
        7 => DType::U16,
        8 => DType::I4,
        9 => DType::U1,
        10 => DType::U2,
        11 => DType::U4,
        12 => DType::U3,
        13 => DType::U6,
        14 => DType::I32,
        15 => DType::U32,
        16 => DType::F8E4M3,
        17 => DType::F8E5M2,
        _ => return None,
    })
}

/// One blob's metadata record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// Offset of the metadata record (what programs refer to).
    pub metadata_offset: u64,
    /// The element type code.
    pub dtype_code: u32,
    /// Bytes of data.
    pub size: u64,
    /// Offset of the data.
    pub data_offset: u64,
    /// Unused bits at the end of sub-byte data.
    pub padding_bits: u64,
}

enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

/// An open weight file.
pub(crate) struct BlobFile {
    package: String,
    /// The name programs use for it, e.g. `@model_path/weights/weight.bin`.
    name: String,
    bytes: Bytes,
}

impl BlobFile {
    pub fn open(package: &str, name: &str, path: &Path) -> Result<BlobFile, CoreMlError> {
        let io = |e| CoreMlError::Io {
            path: PathBuf::from(path),
            source: e,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        // Mapping an empty file fails on some systems; small files are simply read.
        let bytes = if len < 1 << 20 {
            Bytes::Owned(std::fs::read(path).map_err(io)?)
        } else {
            // SAFETY: the mapping is read-only; kiln never writes through it, and a package
            // is not expected to change while it is open.
            Bytes::Mapped(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
        };
        let f = BlobFile {
            package: package.to_string(),
            name: name.to_string(),
            bytes,
        };
        f.header()?;
        Ok(f)
    }

    #[cfg(test)]
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<BlobFile, CoreMlError> {
        let f = BlobFile {
            package: "test".into(),
            name: name.into(),
            bytes: Bytes::Owned(bytes),
        };
        f.header()?;
        Ok(f)
    }

    fn data(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }

    pub fn len(&self) -> u64 {
        self.data().len() as u64
    }

    fn err(&self, offset: u64, message: impl Into<String>) -> CoreMlError {
        CoreMlError::Blob {
            package: self.package.clone(),
            file: self.name.clone(),
            offset,
            message: message.into(),
        }
    }

    fn u32_at(&self, at: u64) -> u32 {
        let b = self.data();
        let i = at as usize;
        u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
    }

    fn u64_at(&self, at: u64) -> u64 {
        let b = self.data();
        let i = at as usize;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    }

    /// The number of blobs the header announces; checks the format version.
    pub fn header(&self) -> Result<u32, CoreMlError> {
        if self.len() < RECORD {
            return Err(self.err(
                0,
                format!(
                    "the file is {} bytes, shorter than its 64-byte header",
                    self.len()
                ),
            ));
        }
        let version = self.u32_at(4);
        if version != 2 {
            return Err(self.err(0, format!("storage format version {version}, expected 2")));
        }
        Ok(self.u32_at(0))
    }

    /// Reads and checks the metadata record at `offset`, and that its data lies in the file.
    pub fn info(&self, offset: u64) -> Result<BlobInfo, CoreMlError> {
        let len = self.len();
        if offset % BLOB_ALIGNMENT != 0 {
            return Err(self.err(offset, "the metadata offset is not 64-byte aligned"));
        }
        if offset < RECORD || offset.checked_add(RECORD).is_none_or(|end| end > len) {
            return Err(self.err(
                offset,
                format!("the metadata record lies outside the file ({len} bytes, header at 0)"),
            ));
        }
        let sentinel = self.u32_at(offset);
        if sentinel != BLOB_SENTINEL {
            return Err(self.err(
                offset,
                format!("invalid sentinel 0x{sentinel:08X}, expected 0xDEADBEEF"),
            ));
        }
        let info = BlobInfo {
            metadata_offset: offset,
            dtype_code: self.u32_at(offset + 4),
            size: self.u64_at(offset + 8),
            data_offset: self.u64_at(offset + 16),
            padding_bits: self.u64_at(offset + 24),
        };
        let dt = blob_dtype(info.dtype_code).ok_or_else(|| {
            self.err(
                offset,
                format!("unknown data type code {}", info.dtype_code),
            )
        })?;
        if info.data_offset % BLOB_ALIGNMENT != 0 {
            return Err(self.err(
                offset,
                format!("data offset {} is not 64-byte aligned", info.data_offset),
            ));
        }
        if info.data_offset < offset + RECORD {
            return Err(self.err(
                offset,
                format!(
                    "data offset {} overlaps its own metadata record",
                    info.data_offset
                ),
            ));
        }
        match info.data_offset.checked_add(info.size) {
            Some(end) if end <= len => {}
            _ => {
                return Err(self.err(
                    offset,
                    format!(
                        "data of {} bytes at offset {} runs past the end of the file ({len} bytes)",
                        info.size, info.data_offset
                    ),
                ))
            }
        }
        if info.padding_bits != 0 {
            let ok = match dt.sub_byte_bits() {
                Some(_) => info.padding_bits < 8 && info.padding_bits < info.size * 8,
                None => false,
            };
            if !ok {
                return Err(self.err(
                    offset,
                    format!(
                        "{} bits of padding are invalid for {dt} data",
                        info.padding_bits
                    ),
                ));
            }
        }
        Ok(info)
    }

    /// Every blob, following the chain from the header as the format lays it out.
    pub fn walk(&self) -> Result<Vec<BlobInfo>, CoreMlError> {
        let count = self.header()?;
        let mut out = Vec::new();
        let mut at = RECORD;
        for _ in 0..count {
            let info = self.info(at)?;
            let end = info.data_offset + info.size;
            at = end.div_ceil(BLOB_ALIGNMENT) * BLOB_ALIGNMENT;
            out.push(info);
        }
        Ok(out)
    }

    /// Reads the blob at metadata `offset` as a value of signature `sig` (fixed shape).
    pub fn read(&self, offset: u64, sig: &TensorSig) -> Result<Arr, CoreMlError> {
        let info = self.info(offset)?;
        let dt = blob_dtype(info.dtype_code).expect("checked by info");
        // uint8 blobs also carry bool tensors; every other type must match exactly.
        let compatible = dt == sig.dt || (dt == DType::U8 && sig.dt == DType::Bool);
        if !compatible {
            return Err(self.err(
                offset,
                format!(
                    "the blob holds {dt} data but the program reads it as {}",
                    sig.dt
                ),
            ));
        }
        let shape = sig.fixed_shape().ok_or_else(|| {
            self.err(
                offset,
                format!("a weight needs a fixed shape, found {}", sig.describe()),
            )
        })?;
        let count = crate::value::volume(&shape)
            .ok_or_else(|| self.err(offset, format!("shape {shape:?} overflows")))?;
        let start = info.data_offset as usize;
        let bytes = &self.data()[start..start + info.size as usize];
        if let Some(bits) = dt.sub_byte_bits() {
            let used = info.size * 8 - info.padding_bits;
            if used != count as u64 * bits as u64 {
                return Err(self.err(
                    offset,
                    format!(
                        "the blob holds {used} bits of {dt} data, shape {shape:?} needs {}",
                        count as u64 * bits as u64
                    ),
                ));
            }
        }
        let data = decode_bytes(sig.dt, bytes, count)
            .map_err(|m| self.err(offset, format!("{m} (shape {shape:?})")))?;
        Ok(Arr {
            dt: sig.dt,
            shape,
            data,
        }
        .round_to_dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(blobs: &[(u32, &[u8])]) -> Vec<u8> {
        let mut out = vec![0u8; 64];
        out[0..4].copy_from_slice(&(blobs.len() as u32).to_le_bytes());
        out[4..8].copy_from_slice(&2u32.to_le_bytes());
        for (code, data) in blobs {
            let meta_at = out.len();
            let data_at = meta_at as u64 + 64;
            let mut meta = vec![0u8; 64];
            meta[0..4].copy_from_slice(&BLOB_SENTINEL.to_le_bytes());
            meta[4..8].copy_from_slice(&code.to_le_bytes());
            meta[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
            meta[16..24].copy_from_slice(&data_at.to_le_bytes());
            out.extend_from_slice(&meta);
            out.extend_from_slice(data);
            while out.len() % 64 != 0 {
                out.push(0);
            }
        }
        out
    }

    fn sig(dt: DType, dims: &[usize]) -> TensorSig {
        TensorSig {
            dt,
            dims: dims.iter().map(|&d| Some(d)).collect(),
        }
    }

    #[test]
    fn reads_and_walks() {
        let bytes = file_with(&[(1, &[0, 60, 0, 188]), (4, &[1, 255, 3])]);
        let f = BlobFile::from_bytes("w", bytes).unwrap();
        let infos = f.walk().unwrap();
        assert_eq!(infos.len(), 2);
        assert_eq!(infos[1].metadata_offset, 192);
        let a = f.read(64, &sig(DType::F16, &[2])).unwrap();
        assert_eq!(a.as_f().unwrap(), &[1.0, -1.0]);
        let b = f.read(192, &sig(DType::I8, &[3])).unwrap();
        assert_eq!(b.as_i().unwrap(), &[1, -1, 3]);
        assert!(f.read(192, &sig(DType::F16, &[3])).is_err());
        assert!(f.read(64, &sig(DType::F16, &[3])).is_err());
    }

    #[test]
    fn refuses_bad_records() {
        let mut bytes = file_with(&[(1, &[0, 60])]);
        assert!(BlobFile::from_bytes("w", bytes[..10].to_vec()).is_err());
        let f = BlobFile::from_bytes("w", bytes.clone()).unwrap();
        assert!(f.info(0).is_err());
        assert!(f.info(100).is_err());
        assert!(f.info(1 << 40).is_err());
        assert!(f.info(u64::MAX - 63).is_err());
        bytes[64] ^= 1;
        let f = BlobFile::from_bytes("w", bytes.clone()).unwrap();
        let e = f.info(64).unwrap_err().to_string();
        assert!(e.contains("sentinel"), "{e}");
        bytes[64] ^= 1;
        bytes[64 + 16..64 + 24].copy_from_slice(&u64::MAX.to_le_bytes());
        let f = BlobFile::from_bytes("w", bytes).unwrap();
        assert!(f.info(64).is_err());
        bytes_version();
    }

    fn bytes_version() {
        let mut bytes = file_with(&[]);
        bytes[4] = 1;
        let e = BlobFile::from_bytes("w", bytes).err().unwrap().to_string();
        assert!(e.contains("version 1"), "{e}");
    }
}
