//! The error type of the streaming merge. Every message starts with the file at fault and, where
//! one is, names the tensor; the Python binding passes them through as `VBLoRAError`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum StreamError {
    /// An operating-system error while `what` (e.g. "reading tensor x") on `path`.
    Io {
        path: PathBuf,
        what: String,
        source: io::Error,
    },
    /// `path` holds something we refuse: a malformed header, a tensor of the wrong shape...
    Invalid { path: PathBuf, what: String },
    /// The progress callback asked to stop (the binding keeps the reason, e.g. Ctrl-C).
    Cancelled,
}

impl StreamError {
    pub fn io(path: &Path, what: impl Into<String>, source: io::Error) -> Self {
        StreamError::Io {
            path: path.to_path_buf(),
            what: what.into(),
            source,
        }
    }

    pub fn invalid(path: &Path, what: impl Into<String>) -> Self {
        StreamError::Invalid {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Io { path, what, source } => {
                write!(f, "{}: {what}: {source}", path.display())
            }
            StreamError::Invalid { path, what } => write!(f, "{}: {what}", path.display()),
            StreamError::Cancelled => f.write_str("cancelled by the progress callback"),
        }
    }
}

impl std::error::Error for StreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StreamError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_start_with_the_file() {
        let e = StreamError::invalid(Path::new("/m/a.safetensors"), "tensor w has 3 dimensions");
        assert_eq!(e.to_string(), "/m/a.safetensors: tensor w has 3 dimensions");
        let e = StreamError::io(
            Path::new("b"),
            "writing tensor x",
            io::Error::new(io::ErrorKind::StorageFull, "disk full"),
        );
        assert_eq!(e.to_string(), "b: writing tensor x: disk full");
    }
}
