//! Lays out an `.mlpackage` folder and moves it into place only once it is complete.
//!
//! The package is assembled in a hidden temporary folder beside the destination and renamed
//! onto it at the end, so an interrupted export never leaves a half-written package where a
//! runtime would look for one.

use super::blob_writer::BlobWriter;
use super::ExportError;
use crate::proto;
use prost::Message;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// The package's model specification, relative to `Data/`.
const MODEL_PATH: &str = "com.apple.CoreML/model.mlmodel";
/// The package's weights folder, relative to `Data/`.
const WEIGHTS_PATH: &str = "com.apple.CoreML/weights";

/// A package being written.
pub struct PackageWriter {
    dest: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

fn sibling(dest: &Path, tag: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "package".into());
    dest.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// A random-looking but reproducible-per-call identifier in UUID form, as manifests use.
fn identifier(seed: &str, salt: u64) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    seed.hash(&mut h);
    salt.hash(&mut h);
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .hash(&mut h);
    let a = h.finish();
    a.hash(&mut h);
    let b = h.finish();
    let x = ((a as u128) << 64) | b as u128;
    let hex = format!("{x:032x}");
    // Version 4 and variant bits, so the string is a well-formed UUID.
    format!(
        "{}-{}-4{}-{}{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        ["8", "9", "a", "b"][(x >> 3) as usize & 3],
        &hex[17..20],
        &hex[20..32]
    )
}

impl PackageWriter {
    /// Starts a package that will end up at `dest` (an existing package there is replaced
    /// on [`PackageWriter::commit`]; anything else there is refused now).
    pub fn create(dest: &Path) -> Result<PackageWriter, ExportError> {
        if dest.exists() && !(dest.is_dir() && crate::cli_support::is_mlpackage(dest)) {
            return Err(ExportError::Invalid(format!(
                "{} exists and is not a Core ML package; refusing to replace it",
                dest.display()
            )));
        }
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| ExportError::io(parent, e))?;
        }
        let tmp = sibling(dest, "partial");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| ExportError::io(&tmp, e))?;
        }
        let weights = tmp.join("Data").join(WEIGHTS_PATH);
        std::fs::create_dir_all(&weights).map_err(|e| ExportError::io(&weights, e))?;
        Ok(PackageWriter {
            dest: dest.to_path_buf(),
            tmp,
            committed: false,
        })
    }

    /// Opens the package's weight file for writing.
    pub fn weights(&self) -> Result<BlobWriter, ExportError> {
        BlobWriter::create(&self.tmp.join("Data").join(WEIGHTS_PATH).join("weight.bin"))
    }

    /// Writes the model specification and the manifest, then moves the package into place.
    pub fn commit(mut self, model: &proto::Model) -> Result<PathBuf, ExportError> {
        let data = self.tmp.join("Data");
        let model_path = data.join(MODEL_PATH);
        std::fs::write(&model_path, model.encode_to_vec())
            .map_err(|e| ExportError::io(&model_path, e))?;
        let seed = self.dest.display().to_string();
        let (model_id, weights_id) = (identifier(&seed, 1), identifier(&seed, 2));
        let manifest = serde_json::json!({
            "fileFormatVersion": "1.0.0",
            "itemInfoEntries": {
                model_id.clone(): {
                    "author": "com.apple.CoreML",
                    "description": "CoreML Model Specification",
                    "name": "model.mlmodel",
                    "path": MODEL_PATH,
                },
                weights_id: {
                    "author": "com.apple.CoreML",
                    "description": "CoreML Model Weights",
                    "name": "weights",
                    "path": WEIGHTS_PATH,
                },
            },
            "rootModelIdentifier": model_id,
        });
        let manifest_path = self.tmp.join("Manifest.json");
        let text = serde_json::to_string_pretty(&manifest).expect("a JSON value serializes");
        std::fs::write(&manifest_path, text).map_err(|e| ExportError::io(&manifest_path, e))?;
        // Replace an older package only once the new one is whole.
        let old = sibling(&self.dest, "old");
        if self.dest.exists() {
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(|e| ExportError::io(&old, e))?;
            }
            std::fs::rename(&self.dest, &old).map_err(|e| ExportError::io(&self.dest, e))?;
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| ExportError::io(&self.dest, e))?;
        self.committed = true;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| ExportError::io(&old, e))?;
        }
        Ok(self.dest.clone())
    }
}

impl Drop for PackageWriter {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: a failed export should not leave its scratch folder behind.
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}
