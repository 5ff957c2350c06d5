use std::path::{Path, PathBuf};

/// An error reading or writing a model file. The message always names the file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The operating system refused an operation on the file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is malformed, truncated or hostile, or lacks something required
    /// (a metadata key, a tensor), or holds a value of the wrong type.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong, naming the key or tensor and what was expected.
        message: String,
    },
    /// The file is well formed but uses something kiln does not implement
    /// (a format version, a tensor element type).
    #[error("{}: {message}", path.display())]
    Unsupported {
        /// The file concerned.
        path: PathBuf,
        /// What is unsupported, naming the tensor or field.
        message: String,
    },
}

impl FormatError {
    /// An [`FormatError::Invalid`] for `path`.
    pub fn invalid(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        FormatError::Invalid {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// An [`FormatError::Unsupported`] for `path`.
    pub fn unsupported(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        FormatError::Unsupported {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// An [`FormatError::Io`] for `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        FormatError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// The file the error concerns.
    pub fn path(&self) -> &Path {
        match self {
            FormatError::Io { path, .. }
            | FormatError::Invalid { path, .. }
            | FormatError::Unsupported { path, .. } => path,
        }
    }
}
