//! Opening a package: the manifest parsed and checked against the shards, which are mapped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::manifest::{Manifest, ShardEntry, TensorEntry};
use super::writer::sha256_bytes;
use super::{
    ALIGNMENT, EXTENSION, FORMAT_NAME, FORMAT_VERSION, I8_CH_CODES_FIRST_VERSION, MANIFEST_FILE,
    OLDEST_FORMAT_VERSION,
};
use crate::file_io::Storage;
use crate::kiln_types::TensorFormat;
use crate::FormatError;

/// The largest manifest accepted (a large vocabulary's tokenizer makes it tens of MB).
const MAX_MANIFEST_LEN: u64 = 512 << 20;

/// How much [`Package::open`] checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Structure, sizes and every file's sha256 (the default).
    Full,
    /// Structure and sizes only: faster to open, but damage inside a shard goes unnoticed.
    StructureOnly,
}

/// Whether `path` is a package folder: a directory holding a `manifest.json` whose `format`
/// is a kiln package, or a directory named `*.kiln`.
pub fn is_package(path: &Path) -> bool {
    if !path.is_dir() {
        return false;
    }
    if path.extension().is_some_and(|e| e == EXTENSION) {
        return true;
    }
    let manifest = path.join(MANIFEST_FILE);
    std::fs::read(&manifest)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            v.get("format")
                .and_then(|f| f.as_str())
                .map(|f| f == FORMAT_NAME)
        })
        .unwrap_or(false)
}

/// Bytes `shape` takes in `format`, if it is a valid shape for it.
pub(crate) fn data_length(shape: &[u64], format: TensorFormat) -> Option<u64> {
    format.data_length(shape)
}

/// A file name with no directory part that stays inside the package.
pub(crate) fn plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && !name.starts_with('.')
}

/// One mapped file of a package.
pub struct PackageFile {
    path: PathBuf,
    storage: Storage,
}

impl PackageFile {
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its contents, as mapped.
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// Drops the pages of `range` from resident memory where the shard is mapped (they read
    /// back unchanged, from the page cache or the file): for a reader that has copied them.
    pub fn release_range(&self, range: std::ops::Range<usize>) {
        self.storage.release(range);
    }
}

/// Where one tensor's checked data lies.
#[derive(Clone)]
pub struct PackageTensor {
    /// The shard holding it, mapped.
    pub shard: Arc<PackageFile>,
    /// Offset of the data in the shard.
    pub offset: usize,
    /// Length of the data in bytes.
    pub length: usize,
    /// Dimensions in ggml order.
    pub shape: Vec<u64>,
    /// Storage format: a ggml block type or a kiln format.
    pub format: TensorFormat,
}

impl PackageTensor {
    /// The tensor's bytes.
    pub fn data(&self) -> &[u8] {
        // In bounds: checked when the package was opened.
        &self.shard.bytes()[self.offset..self.offset + self.length]
    }
}

/// An open, checked package.
pub struct Package {
    dir: PathBuf,
    manifest: Manifest,
    shards: HashMap<String, Arc<PackageFile>>,
    tensors: HashMap<String, usize>,
}

impl std::fmt::Debug for Package {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Package")
            .field("dir", &self.dir)
            .field("shards", &self.manifest.shards.len())
            .field("tensors", &self.manifest.tensors.len())
            .finish()
    }
}

impl Package {
    /// Opens the package folder `dir` and checks it: the manifest's format and version, every
    /// shard and file present with its stated size (and sha256 with [`Verify::Full`]), and
    /// every tensor's format, shape, length, alignment and range inside its shard, with no two
    /// tensors overlapping. Errors name the shard, file or tensor at fault.
    pub fn open(dir: impl AsRef<Path>, verify: Verify) -> Result<Package, FormatError> {
        let dir = dir.as_ref();
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest = read_manifest(dir, &manifest_path)?;
        let bad = |message: String| FormatError::invalid(&manifest_path, message);
        if manifest.format != FORMAT_NAME {
            return Err(bad(format!(
                "format is '{}', expected '{FORMAT_NAME}'",
                manifest.format
            )));
        }
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&manifest.format_version) {
            return Err(FormatError::unsupported(
                &manifest_path,
                format!(
                    "package format version {} (this kiln reads versions \
                     {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})",
                    manifest.format_version
                ),
            ));
        }
        if manifest.format_version < I8_CH_CODES_FIRST_VERSION {
            // Version 1 stored each I8_CH row as its scale then its codes: the same length as
            // today's layout, so reading it as today's would give wrong weights silently.
            // Every other format is unchanged, so such packages still load.
            if let Some(t) = manifest.tensors.iter().find(|t| t.format == "I8_CH") {
                return Err(FormatError::unsupported(
                    &manifest_path,
                    format!(
                        "package format version {} stores I8_CH tensors (such as '{}') in a \
                         row layout this kiln no longer reads; convert the source model again \
                         (kiln convert SRC -o OUT --quant int8-channel)",
                        manifest.format_version, t.name
                    ),
                ));
            }
        }
        if manifest.alignment != ALIGNMENT {
            return Err(bad(format!(
                "alignment {} (expected {ALIGNMENT})",
                manifest.alignment
            )));
        }

        let mut shards = HashMap::new();
        let mut seen_files = HashMap::new();
        for (entry, is_shard) in manifest
            .shards
            .iter()
            .map(|s| (s, true))
            .chain(manifest.files.iter().map(|f| (f, false)))
        {
            if !plain_file_name(&entry.file) || entry.file == MANIFEST_FILE {
                return Err(bad(format!(
                    "file name '{}' is not a plain file name inside the package",
                    entry.file
                )));
            }
            if seen_files.insert(entry.file.clone(), ()).is_some() {
                return Err(bad(format!("file '{}' is listed twice", entry.file)));
            }
            let file = open_checked(dir, entry, verify)?;
            if is_shard {
                shards.insert(entry.file.clone(), Arc::new(file));
            }
        }

        let mut tensors = HashMap::new();
        let mut ranges: HashMap<&str, Vec<(u64, u64, &str)>> = HashMap::new();
        for (i, t) in manifest.tensors.iter().enumerate() {
            if tensors.insert(t.name.clone(), i).is_some() {
                return Err(bad(format!("tensor '{}' is listed twice", t.name)));
            }
            let shard = shards.get(&t.shard).ok_or_else(|| {
                bad(format!(
                    "tensor '{}' is in shard '{}', which the manifest does not list",
                    t.name, t.shard
                ))
            })?;
            check_tensor(t, shard.bytes().len() as u64)
                .map_err(|m| bad(format!("tensor '{}' (in shard {}): {m}", t.name, t.shard)))?;
            ranges.entry(t.shard.as_str()).or_default().push((
                t.offset,
                t.offset + t.length,
                t.name.as_str(),
            ));
        }
        for (shard, list) in &mut ranges {
            list.sort_unstable();
            for pair in list.windows(2) {
                if pair[1].0 < pair[0].1 {
                    return Err(bad(format!(
                        "tensors '{}' and '{}' overlap in shard {shard}",
                        pair[0].2, pair[1].2
                    )));
                }
            }
        }
        Ok(Package {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            tensors,
        })
    }

    /// The package folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The tensor called `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<PackageTensor> {
        let t = &self.manifest.tensors[*self.tensors.get(name)?];
        Some(PackageTensor {
            shard: Arc::clone(self.shards.get(&t.shard)?),
            // Both fit in usize: the range lies inside a mapped shard.
            offset: t.offset as usize,
            length: t.length as usize,
            shape: t.shape.clone(),
            format: TensorFormat::from_name(&t.format)?,
        })
    }

    /// Every tensor name, in manifest order.
    pub fn names(&self) -> Vec<String> {
        self.manifest
            .tensors
            .iter()
            .map(|t| t.name.clone())
            .collect()
    }

    /// Total bytes of the shards.
    pub fn shard_bytes(&self) -> u64 {
        self.manifest.shards.iter().map(|s| s.size).sum()
    }
}

fn read_manifest(dir: &Path, path: &Path) -> Result<Manifest, FormatError> {
    if !dir.is_dir() {
        return Err(FormatError::invalid(dir, "not a kiln package folder"));
    }
    let meta = std::fs::metadata(path).map_err(|e| FormatError::io(path, e))?;
    if meta.len() > MAX_MANIFEST_LEN {
        return Err(FormatError::invalid(
            path,
            format!(
                "{} bytes, more than the {MAX_MANIFEST_LEN} a manifest may take",
                meta.len()
            ),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| FormatError::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| FormatError::invalid(path, format!("malformed manifest: {e}")))
}

/// Maps a listed file and checks its size and, with [`Verify::Full`], its hash.
fn open_checked(
    dir: &Path,
    entry: &ShardEntry,
    verify: Verify,
) -> Result<PackageFile, FormatError> {
    let path = dir.join(&entry.file);
    if !path.is_file() {
        return Err(FormatError::invalid(
            &path,
            format!(
                "shard or file '{}' listed in the manifest is missing",
                entry.file
            ),
        ));
    }
    let storage = Storage::map(&path)?;
    let size = storage.bytes().len() as u64;
    if size != entry.size {
        return Err(FormatError::invalid(
            &path,
            format!(
                "'{}' is {size} bytes, the manifest says {} (truncated or replaced)",
                entry.file, entry.size
            ),
        ));
    }
    if verify == Verify::Full {
        let digest = sha256_bytes(storage.bytes());
        if !digest.eq_ignore_ascii_case(&entry.sha256) {
            return Err(FormatError::invalid(
                &path,
                format!(
                    "'{}' fails its integrity check: sha256 {digest}, the manifest says {} \
                     (the file is damaged or was modified)",
                    entry.file, entry.sha256
                ),
            ));
        }
    }
    Ok(PackageFile { path, storage })
}

/// Checks one tensor's description against a shard of `shard_len` bytes.
fn check_tensor(t: &TensorEntry, shard_len: u64) -> Result<(), String> {
    let format = TensorFormat::from_name(&t.format)
        .ok_or_else(|| format!("unknown format '{}'", t.format))?;
    if t.shape.is_empty() || t.shape.len() > 4 {
        return Err(format!("shape {:?} must have 1 to 4 dimensions", t.shape));
    }
    let expected = data_length(&t.shape, format).ok_or_else(|| {
        format!(
            "shape {:?} does not fit {format} (rows must be a whole number of its blocks, \
             and a table group must divide the rows)",
            t.shape
        )
    })?;
    if expected != t.length {
        return Err(format!(
            "length {} bytes, but shape {:?} in {format} takes {expected}",
            t.length, t.shape
        ));
    }
    if t.offset % ALIGNMENT != 0 {
        return Err(format!(
            "offset {} is not a multiple of {ALIGNMENT}",
            t.offset
        ));
    }
    match t.offset.checked_add(t.length) {
        Some(end) if end <= shard_len => Ok(()),
        _ => Err(format!(
            "bytes {}..{} lie past the end of the shard ({shard_len} bytes)",
            t.offset,
            t.offset.saturating_add(t.length)
        )),
    }
}
