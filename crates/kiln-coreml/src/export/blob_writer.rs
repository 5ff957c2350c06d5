//! Writes weight blob storage files (format version 2), the layout [`crate::MlPackage`] reads:
//! a 64-byte header (`count: u32`, `version: u32`), then per blob a 64-byte metadata record
//! (`sentinel`, `dtype`, `size_in_bytes`, `data_offset`, `padding_size_in_bits`) followed by
//! the data, every record and every data start 64-byte aligned. Programs refer to a blob by
//! the offset of its metadata record.

use super::ExportError;
use crate::{BLOB_ALIGNMENT, BLOB_SENTINEL};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const RECORD: usize = 64;

/// Element types a blob can hold, with the storage format's type codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobType {
    /// IEEE half precision (code 1).
    F16,
    /// IEEE single precision (code 2).
    F32,
    /// Unsigned bytes (code 3).
    U8,
    /// Signed bytes (code 4).
    I8,
    /// Signed 4-bit integers, two per byte, low nibble first (code 8).
    I4,
    /// Unsigned 4-bit integers (code 11).
    U4,
    /// Unsigned 6-bit integers, least significant bit first (code 13).
    U6,
}

impl BlobType {
    fn code(self) -> u32 {
        match self {
            BlobType::F16 => 1,
            BlobType::F32 => 2,
            BlobType::U8 => 3,
            BlobType::I8 => 4,
            BlobType::I4 => 8,
            BlobType::U4 => 11,
            BlobType::U6 => 13,
        }
    }

    /// Bits per element.
    pub fn bits(self) -> usize {
        match self {
            BlobType::F16 => 16,
            BlobType::F32 => 32,
            BlobType::U8 | BlobType::I8 => 8,
            BlobType::I4 | BlobType::U4 => 4,
            BlobType::U6 => 6,
        }
    }
}

/// Streams blobs into a weight file; [`BlobWriter::finish`] writes the final blob count.
///
/// Blobs go straight to disk so a model's weights are never all held in memory at once.
#[derive(Debug)]
pub struct BlobWriter {
    path: PathBuf,
    out: BufWriter<File>,
    len: u64,
    count: u32,
}

impl BlobWriter {
    /// Creates (or truncates) the weight file at `path` and writes a provisional header.
    pub fn create(path: &Path) -> Result<BlobWriter, ExportError> {
        let file = File::create(path).map_err(|e| ExportError::io(path, e))?;
        let mut w = BlobWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, file),
            len: 0,
            count: 0,
        };
        w.write(&header(0))?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), ExportError> {
        self.out
            .write_all(bytes)
            .map_err(|e| ExportError::io(&self.path, e))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Appends one blob of raw little-endian element bytes and returns the offset of its
    /// metadata record (what a program's `BlobFileValue.offset` holds).
    pub fn append(&mut self, ty: BlobType, data: &[u8]) -> Result<u64, ExportError> {
        let elements = data.len() * 8 / ty.bits();
        self.append_packed(ty, data, elements)
    }

    /// Appends `elements` values of a (possibly sub-byte) type packed into `data`, least
    /// significant bit first; the bits left over in the last byte are recorded as padding.
    pub fn append_packed(
        &mut self,
        ty: BlobType,
        data: &[u8],
        elements: usize,
    ) -> Result<u64, ExportError> {
        let bits = elements * ty.bits();
        if bits.div_ceil(8) != data.len() {
            return Err(ExportError::Build(format!(
                "{elements} elements of {} bits do not fill {} bytes",
                ty.bits(),
                data.len()
            )));
        }
        if self.count == u32::MAX {
            return Err(ExportError::Invalid(
                "a weight file holds at most 2^32 - 1 blobs".into(),
            ));
        }
        let meta_at = self.len;
        debug_assert_eq!(meta_at % BLOB_ALIGNMENT, 0);
        let data_at = meta_at + RECORD as u64;
        let mut meta = [0u8; RECORD];
        meta[0..4].copy_from_slice(&BLOB_SENTINEL.to_le_bytes());
        meta[4..8].copy_from_slice(&ty.code().to_le_bytes());
        meta[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
        meta[16..24].copy_from_slice(&data_at.to_le_bytes());
        meta[24..32].copy_from_slice(&((data.len() * 8 - bits) as u64).to_le_bytes());
        self.write(&meta)?;
        self.write(data)?;
        let pad = (BLOB_ALIGNMENT - self.len % BLOB_ALIGNMENT) % BLOB_ALIGNMENT;
        self.write(&[0u8; RECORD][..pad as usize])?;
        self.count += 1;
        Ok(meta_at)
    }

    /// Appends `values` rounded to fp16.
    pub fn append_f16(&mut self, values: &[f32]) -> Result<u64, ExportError> {
        let mut bytes = Vec::with_capacity(values.len() * 2);
        for &v in values {
            bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
        self.append(BlobType::F16, &bytes)
    }

    /// Appends `values` as fp32.
    pub fn append_f32(&mut self, values: &[f32]) -> Result<u64, ExportError> {
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for &v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        self.append(BlobType::F32, &bytes)
    }

    /// Blobs written so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no blob was written yet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Writes the blob count into the header and flushes the file to disk.
    pub fn finish(self) -> Result<u64, ExportError> {
        let path = self.path.clone();
        let io = |e| ExportError::io(&path, e);
        let mut file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&header(self.count)).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(self.len)
    }
}

fn header(count: u32) -> [u8; RECORD] {
    let mut h = [0u8; RECORD];
    h[0..4].copy_from_slice(&count.to_le_bytes());
    h[4..8].copy_from_slice(&2u32.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::BlobFile;

    #[test]
    fn the_reader_accepts_what_the_writer_writes() {
        let dir = std::env::temp_dir().join(format!("kiln-blob-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("weight.bin");
        let mut w = BlobWriter::create(&path).unwrap();
        let a = w.append_f16(&[1.0, -2.0, 0.5]).unwrap();
        let b = w
            .append_f32(&(0..100).map(|i| i as f32).collect::<Vec<_>>())
            .unwrap();
        let c = w.append(BlobType::I8, &[1, 255]).unwrap();
        assert_eq!((a, w.count()), (64, 3));
        let len = w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(len % BLOB_ALIGNMENT, 0);
        let f = BlobFile::from_bytes("weight.bin", bytes).unwrap();
        assert_eq!(f.header().unwrap(), 3);
        let infos = f.walk().unwrap();
        let offsets: Vec<u64> = infos.iter().map(|i| i.metadata_offset).collect();
        assert_eq!(offsets, [a, b, c]);
        assert_eq!(infos[0].data_offset, a + 64);
        assert_eq!((infos[1].dtype_code, infos[1].size), (2, 400));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
