//! Errors found while reading a spec. Each names the file and the key or column at fault.

use std::path::{Path, PathBuf};

/// An error in a pipeline spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec or its SQL file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax or an unknown / mistyped key.
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// A well-formed spec that says something impossible.
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    /// A `${name}` reference or `--param` that names no parameter.
    #[error("unknown parameter `{name}` in {context}{hint}")]
    UnknownParam {
        name: String,
        context: String,
        hint: String,
    },
    /// A text that substitution of `${param}` values grows past the limit.
    #[error(
        "{context} grows past {limit} bytes with its ${{param}} values substituted (all texts of \
         the spec together); keep large values in the files the spec reads, not in parameters"
    )]
    TooLarge { context: String, limit: usize },
    /// A column type in a `[source.schema]` contract that is not understood.
    #[error("source `{source_name}`, column `{column}`: {message}")]
    Contract {
        source_name: String,
        column: String,
        message: String,
    },
    /// A `partition_by` entry that is not a known transform.
    #[error("[target] partition_by `{entry}`: {message}")]
    Partition { entry: String, message: String },
}

impl SpecError {
    pub(crate) fn invalid(path: &Path, message: impl Into<String>) -> Self {
        SpecError::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}
