//! Exporting models to Core ML ML Program packages.
//!
//! - [`BlobWriter`] writes weight files (blob storage format version 2);
//! - [`PackageWriter`] lays out `Manifest.json`, `Data/com.apple.CoreML/model.mlmodel` and
//!   `weights/weight.bin`, and moves the package into place only once it is complete;
//! - [`ProgramBuilder`] builds a typed MIL program (specification version 9, opset
//!   `CoreML8`) and derives the model description from the function signature;
//! - [`export_llama`] turns a loaded Llama-family [`kiln_runtime::Model`] into a stateful
//!   fp16 package; [`export_path`] does the same from a GGUF file or Hugging Face folder.
//!
//! What is exported can be checked with this crate's own reader: [`crate::MlPackage::verify`]
//! and [`crate::Executor`].

mod blob_writer;
mod llama;
mod mil;
mod package_writer;

pub use blob_writer::{BlobType, BlobWriter};
pub use llama::export_llama;
pub use mil::{Arg, InputDim, ProgramBuilder, Var, OPSET, SPECIFICATION_VERSION, WEIGHT_FILE};
pub use package_writer::PackageWriter;

use std::path::{Path, PathBuf};

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A file could not be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The source model could not be loaded.
    #[error("{0}")]
    Load(#[from] kiln_runtime::ModelError),
    /// The model uses a feature the exporter does not build yet.
    #[error("{0}")]
    Unsupported(String),
    /// The request or the model is inconsistent (options out of range, odd shapes).
    #[error("{0}")]
    Invalid(String),
    /// The program under construction is inconsistent: a defect of the exporter.
    #[error("building the ML Program: {0}")]
    Build(String),
}

impl ExportError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> ExportError {
        ExportError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What to export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportOptions {
    /// Positions the key/value caches hold (the largest `past + q`).
    pub context: usize,
    /// The largest number of tokens one call may take (`input_ids` is `[1, 1..=max_query]`).
    pub max_query: usize,
}

impl Default for ExportOptions {
    fn default() -> ExportOptions {
        ExportOptions {
            context: 512,
            max_query: 64,
        }
    }
}

/// What an export wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSummary {
    /// The package.
    pub path: PathBuf,
    /// Size of the weight file.
    pub weight_bytes: u64,
    /// Blobs in the weight file.
    pub blobs: usize,
    /// Operations in the program, constants included.
    pub ops: usize,
    /// Positions the caches hold.
    pub context: usize,
    /// The largest query length.
    pub max_query: usize,
}

/// Loads the model at `src` (a GGUF file or a Hugging Face folder) and exports it to `dest`.
pub fn export_path(
    src: &Path,
    dest: &Path,
    opts: &ExportOptions,
) -> Result<ExportSummary, ExportError> {
    let model = kiln_runtime::Model::load(src)?;
    export_llama(&model, dest, opts)
}
