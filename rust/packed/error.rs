//! The error of the packed format: every message names the metadata field, tensor or argument at
//! fault (the Python binding prefixes the file path).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackedError {
    /// Reading or writing the file failed.
    Io(String),
    /// The safetensors layer rejected the bytes (truncation, lying offsets, bad header JSON).
    Safetensors(String),
    /// A `__metadata__` entry is missing, unparseable or out of range.
    Metadata { field: String, reason: String },
    /// A tensor is missing or its dtype, shape or values are wrong.
    Tensor { name: String, reason: String },
    /// An argument of `encode` is inconsistent (what the encoder refuses to write).
    Argument { name: String, reason: String },
}

impl PackedError {
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
            PackedError::Io(msg) => write!(f, "I/O error: {msg}"),
            PackedError::Safetensors(msg) => write!(f, "not a readable safetensors file: {msg}"),
            PackedError::Metadata { field, reason } => {
                write!(f, "metadata field `{field}` {reason}")
            }
            PackedError::Tensor { name, reason } => write!(f, "tensor `{name}` {reason}"),
            PackedError::Argument { name, reason } => write!(f, "argument `{name}` {reason}"),
        }
    }
}

impl std::error::Error for PackedError {}

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
