//! Errors of the runtime.

use std::path::{Path, PathBuf};

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model file is malformed or unreadable.
    #[error(transparent)]
    Format(#[from] kiln_format::FormatError),
    /// The file is well-formed but does not describe a model kiln can run as it claims.
    #[error("{path}: {message}")]
    Bad {
        /// The model file.
        path: PathBuf,
        /// What is wrong, naming the tensor or key.
        message: String,
    },
    /// A valid model that uses something this runtime does not implement.
    #[error("{path}: {message}")]
    Unsupported {
        /// The model file.
        path: PathBuf,
        /// What is not supported.
        message: String,
    },
    /// A request the model cannot serve (e.g. a prompt longer than the context).
    #[error("{0}")]
    Request(String),
}

impl ModelError {
    /// A malformed-model error for `path`.
    pub fn bad(path: &Path, message: impl Into<String>) -> ModelError {
        ModelError::Bad {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    /// An unsupported-feature error for `path`.
    pub fn unsupported(path: &Path, message: impl Into<String>) -> ModelError {
        ModelError::Unsupported {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}
