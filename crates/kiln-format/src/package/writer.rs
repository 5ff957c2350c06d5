//! Writing a package: tensors streamed into shards, hashed as they are written, the manifest
//! last, and the finished folder renamed into place.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::manifest::{Manifest, ShardEntry, TensorEntry, TensorQuality};
use super::{ALIGNMENT, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE};
use crate::kiln_types::TensorFormat;
use crate::FormatError;

/// The default shard size cap: under the ~1 GB at which single weight files stop loading on
/// iPhones.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 950 << 20;

/// The marker between a package's name and the writer's process id in its temporary folder.
const TEMP_MARKER: &str = ".tmp-";
/// The marker of a previous package moved aside while its replacement is renamed into place.
const OLD_MARKER: &str = ".old-";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file's contents, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, FormatError> {
    let mut file = File::open(path).map_err(|e| FormatError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| FormatError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// sha256 of bytes in memory, lowercase hex.
pub(crate) fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The shard being filled.
struct OpenShard {
    name: String,
    path: PathBuf,
    out: BufWriter<File>,
    hasher: Sha256,
    size: u64,
}

impl OpenShard {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
        Ok(())
    }

    fn close(self) -> Result<ShardEntry, FormatError> {
        let file = self
            .out
            .into_inner()
            .map_err(|e| FormatError::io(&self.path, e.into_error()))?;
        file.sync_all()
            .map_err(|e| FormatError::io(&self.path, e))?;
        Ok(ShardEntry {
            file: self.name,
            size: self.size,
            sha256: hex(&self.hasher.finalize()),
        })
    }
}

/// Writes a package folder. Nothing appears under the final name until
/// [`PackageWriter::finish`] succeeds: the data goes to a sibling `NAME.kiln.tmp-<pid>`
/// folder, removed again if the writer is dropped unfinished. A temporary folder left by a
/// killed writer is removed by the next writer of the same package.
pub struct PackageWriter {
    out: PathBuf,
    tmp: PathBuf,
    max_shard_bytes: u64,
    current: Option<OpenShard>,
    shards: Vec<ShardEntry>,
    files: Vec<ShardEntry>,
    tensors: Vec<TensorEntry>,
    finished: bool,
}

impl PackageWriter {
    /// Starts a package at `out` with shards of at most `max_shard_bytes` (a tensor larger
    /// than that gets a shard of its own). An existing package at `out` is replaced when the
    /// new one is finished; anything else there is refused.
    pub fn create(out: &Path, max_shard_bytes: u64) -> Result<PackageWriter, FormatError> {
        if max_shard_bytes == 0 {
            return Err(FormatError::invalid(
                out,
                "the shard size cap must be positive",
            ));
        }
        if out.exists() && !super::is_package(out) {
            return Err(FormatError::invalid(
                out,
                "exists and is not a kiln package; refusing to replace it",
            ));
        }
        remove_stale_temps(out)?;
        let tmp = sibling(out, &format!("{TEMP_MARKER}{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| FormatError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| FormatError::io(&tmp, e))?;
        Ok(PackageWriter {
            out: out.to_path_buf(),
            tmp,
            max_shard_bytes,
            current: None,
            shards: Vec::new(),
            files: Vec::new(),
            tensors: Vec::new(),
            finished: false,
        })
    }

    /// The temporary folder being written.
    pub fn temp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Appends a tensor. `data` must be exactly what `shape` takes in `format` (a ggml type
    /// or a kiln format).
    pub fn add_tensor(
        &mut self,
        name: &str,
        shape: &[u64],
        format: impl Into<TensorFormat>,
        data: &[u8],
        quality: Option<TensorQuality>,
    ) -> Result<(), FormatError> {
        let format: TensorFormat = format.into();
        let expected = super::reader::data_length(shape, format);
        if expected != Some(data.len() as u64) {
            return Err(FormatError::invalid(
                &self.tmp,
                format!(
                    "tensor '{name}': {} bytes given, but shape {shape:?} in {format} takes {}",
                    data.len(),
                    expected.map_or("an impossible size".to_string(), |n| n.to_string())
                ),
            ));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(FormatError::invalid(
                &self.tmp,
                format!("tensor '{name}' added twice"),
            ));
        }
        let len = data.len() as u64;
        let needs_new = match &self.current {
            None => true,
            Some(s) => {
                s.size > 0 && s.size.next_multiple_of(ALIGNMENT) + len > self.max_shard_bytes
            }
        };
        if needs_new {
            if let Some(s) = self.current.take() {
                self.shards.push(s.close()?);
            }
            let name = format!("shard-{:05}.bin", self.shards.len() + 1);
            let path = self.tmp.join(&name);
            let file = File::create(&path).map_err(|e| FormatError::io(&path, e))?;
            self.current = Some(OpenShard {
                name,
                path,
                out: BufWriter::with_capacity(1 << 20, file),
                hasher: Sha256::new(),
                size: 0,
            });
        }
        let shard = self.current.as_mut().expect("a shard is open");
        let pad = (shard.size.next_multiple_of(ALIGNMENT) - shard.size) as usize;
        let written = shard
            .put(&[0u8; ALIGNMENT as usize][..pad])
            .and_then(|()| shard.put(data));
        if let Err(e) = written {
            return Err(FormatError::io(&shard.path, e));
        }
        let offset = shard.size - len;
        self.tensors.push(TensorEntry {
            name: name.to_string(),
            shape: shape.to_vec(),
            format: format.name(),
            shard: shard.name.clone(),
            offset,
            length: len,
            quality,
        });
        Ok(())
    }

    /// Adds an auxiliary file (e.g. `tokenizer.json`), listed with its hash in the manifest.
    pub fn add_file(&mut self, name: &str, bytes: &[u8]) -> Result<(), FormatError> {
        if !super::reader::plain_file_name(name)
            || name == MANIFEST_FILE
            || name.starts_with("shard-")
            || self.files.iter().any(|f| f.file == name)
        {
            return Err(FormatError::invalid(
                &self.tmp,
                format!("'{name}' cannot be added as a package file"),
            ));
        }
        let path = self.tmp.join(name);
        std::fs::write(&path, bytes).map_err(|e| FormatError::io(&path, e))?;
        self.files.push(ShardEntry {
            file: name.to_string(),
            size: bytes.len() as u64,
            sha256: sha256_bytes(bytes),
        });
        Ok(())
    }

    /// Writes the manifest and moves the package into place. `manifest` supplies the model
    /// description, tokenizer, source and settings; its format, alignment, shard, file and
    /// tensor fields are filled in here. Returns the manifest as written.
    pub fn finish(mut self, mut manifest: Manifest) -> Result<Manifest, FormatError> {
        if let Some(s) = self.current.take() {
            self.shards.push(s.close()?);
        }
        manifest.format = FORMAT_NAME.to_string();
        manifest.format_version = FORMAT_VERSION;
        manifest.alignment = ALIGNMENT;
        manifest.shards = std::mem::take(&mut self.shards);
        manifest.files = std::mem::take(&mut self.files);
        manifest.tensors = std::mem::take(&mut self.tensors);
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| {
            FormatError::invalid(&self.tmp, format!("cannot encode the manifest: {e}"))
        })?;
        let path = self.tmp.join(MANIFEST_FILE);
        let mut file = File::create(&path).map_err(|e| FormatError::io(&path, e))?;
        file.write_all(&json)
            .and_then(|()| file.sync_all())
            .map_err(|e| FormatError::io(&path, e))?;
        sync_dir(&self.tmp);
        // A folder cannot be renamed over a non-empty one: move the old package aside first,
        // so the final name only ever holds a complete package.
        let old = sibling(&self.out, &format!("{OLD_MARKER}{}", std::process::id()));
        let replacing = self.out.exists();
        if replacing {
            std::fs::rename(&self.out, &old).map_err(|e| FormatError::io(&self.out, e))?;
        }
        if let Err(e) = std::fs::rename(&self.tmp, &self.out) {
            if replacing {
                let _ = std::fs::rename(&old, &self.out);
            }
            return Err(FormatError::io(&self.out, e));
        }
        self.finished = true;
        if replacing {
            let _ = std::fs::remove_dir_all(&old);
        }
        if let Some(parent) = self.out.parent() {
            sync_dir(parent);
        }
        Ok(manifest)
    }
}

impl Drop for PackageWriter {
    fn drop(&mut self) {
        if !self.finished {
            drop(self.current.take());
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// `out` with `suffix` appended to its file name.
fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "package".into());
    out.with_file_name(format!("{name}{suffix}"))
}

/// Removes the temporary (and moved-aside) folders of earlier writers of `out` whose
/// process is gone.
fn remove_stale_temps(out: &Path) -> Result<(), FormatError> {
    let Some(name) = out.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(());
    };
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let entry_name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = entry_name.strip_prefix(name.as_str()) else {
            continue;
        };
        let pid = [TEMP_MARKER, OLD_MARKER]
            .iter()
            .find_map(|m| rest.strip_prefix(m))
            .and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if pid != std::process::id() && process_alive(pid) {
            continue;
        }
        let path = entry.path();
        std::fs::remove_dir_all(&path).map_err(|e| FormatError::io(&path, e))?;
    }
    Ok(())
}

/// Whether process `pid` runs; where that cannot be told, it is taken as gone.
fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    proc.is_dir() && proc.join(pid.to_string()).exists()
}

/// Persists a folder's entries (renames, new files); not every platform can, and the data is
/// already flushed, so failure is ignored.
fn sync_dir(dir: &Path) {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
