//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong reading, validating or running an ML Program package.
///
/// Every variant names the package it concerns, and where it applies the operation (by its
/// name and type) or the weight blob (by file and offset), so a message alone tells the user
/// where to look.
#[derive(Debug, thiserror::Error)]
pub enum CoreMlError {
    /// A file of the package could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The package's structure, manifest, model protobuf or interface is malformed.
    #[error("{package}: {message}")]
    Package {
        /// The package (its path as given).
        package: String,
        /// What was found and what was expected.
        message: String,
    },
    /// A weight blob is malformed or out of bounds.
    #[error("{package}: blob at offset {offset} of {file}: {message}")]
    Blob {
        /// The package.
        package: String,
        /// The weight file, as the program names it.
        file: String,
        /// The offset of the blob's metadata record.
        offset: u64,
        /// What was found and what was expected.
        message: String,
    },
    /// An operation of the program is malformed, unsupported or failed while running.
    #[error("{package}: op {op} ({op_type}): {message}")]
    Op {
        /// The package.
        package: String,
        /// The operation's name (its `name` attribute, else its first output).
        op: String,
        /// The operation's type, e.g. `linear`.
        op_type: String,
        /// What was found and what was expected.
        message: String,
    },
    /// An input given to `predict` does not fit the model's interface.
    #[error("{package}: input {input}: {message}")]
    Input {
        /// The package.
        package: String,
        /// The input's name.
        input: String,
        /// What was given and what was expected.
        message: String,
    },
    /// A tensor was built with data that does not fit its shape.
    #[error("tensor: {0}")]
    Tensor(String),
}
