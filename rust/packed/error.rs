//! The error of the packed format: every message names the metadata field, tensor or argument at
//! fault (the Python binding prefixes the file path); an I/O failure keeps the operating system's
//! error and the file it concerns (the binding raises it as `OSError`).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum PackedError {
    /// The operating system failed us while `what` (e.g. "reading") on `path`.
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    /// The safetensors layer rejected the bytes (truncation, lying offsets, bad header JSON).
    Safetensors(String),
    /// The safetensors layer refused to serialise tensors the encoder had checked (a bug of ours).
    Serialize(String),
    /// A `__metadata__` entry is missing, unparseable or out of range.
    Metadata { field: String, reason: String },
    /// A tensor is missing or its dtype, shape or values are wrong.
    Tensor { name: String, reason: String },
    /// An argument of `encode` is inconsistent (what the encoder refuses to write).
    Argument { name: String, reason: String },
}

impl PackedError {
    pub(crate) fn io(path: &Path, what: &'static str, source: io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    }

    pub(crate) fn metadata(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Metadata {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn tensor(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Tensor {
            name: name.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn argument(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Argument {
            name: name.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for PackedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PackedError::Io { path, what, source } => {
                write!(f, "{what} {}: {source}", path.display())
            }
            PackedError::Safetensors(msg) => write!(f, "not a readable safetensors file: {msg}"),
            PackedError::Serialize(msg) => write!(f, "could not serialise the tensors: {msg}"),
            PackedError::Metadata { field, reason } => {
                write!(f, "metadata field `{field}` {reason}")
            }
            PackedError::Tensor { name, reason } => write!(f, "tensor `{name}` {reason}"),
            PackedError::Argument { name, reason } => write!(f, "argument `{name}` {reason}"),
        }
    }
}

impl std::error::Error for PackedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PackedError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_part_at_fault() {
        assert_eq!(
            PackedError::metadata("topk", "is missing").to_string(),
            "metadata field `topk` is missing"
        );
        assert_eq!(
            PackedError::tensor("topk_weights", "has dtype I32").to_string(),
            "tensor `topk_weights` has dtype I32"
        );
    }
}
