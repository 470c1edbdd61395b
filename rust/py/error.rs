//! The binding's one error mapping: a `From` for each crate error, so every Python function
//! returns its kernel's error with `?`.
//!
//! - A value problem (a bad argument, a malformed file, data that would overflow) is
//!   `VBLoRAError`, a `ValueError`, its message naming the argument, file, tensor or row.
//! - An operating-system failure (file not found, permission, full disk, name too long ...) is an
//!   `OSError` built as Python's own `open()` builds it: `OSError(errno, strerror, filename)`,
//!   which Python turns into the matching subclass (`FileNotFoundError`, `PermissionError`, ...;
//!   a full disk stays `OSError` with `errno == ENOSPC`). `strerror` says what we were doing.
//!   An `io::Error` without an errno gets its kind's errno, or else keeps its kind's subclass with
//!   a message naming the file.

use std::io;
use std::path::{Path, PathBuf};

use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::PyErr;

use crate::error::KernelError;
use crate::packed::PackedError;
use crate::stream::StreamError;

create_exception!(
    vblora_rs._native,
    VBLoRAError,
    PyValueError,
    "Bad input to a vblora_rs kernel; the message names the argument and, for data errors, the row."
);

/// A `VBLoRAError` with message `msg`.
pub(crate) fn error(msg: impl Into<String>) -> PyErr {
    VBLoRAError::new_err(msg.into())
}

/// The errno of `e`: its own, or else its kind's (the `tempfile` crate, which safetensors' writer
/// uses, wraps the OS error in a message naming the temporary file, dropping the errno).
fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| kind_errno(e.kind()))
}

#[cfg(unix)]
fn kind_errno(kind: io::ErrorKind) -> Option<i32> {
    use io::ErrorKind as K;
    Some(match kind {
        K::NotFound => libc::ENOENT,
        K::PermissionDenied => libc::EACCES,
        K::AlreadyExists => libc::EEXIST,
        K::IsADirectory => libc::EISDIR,
        K::NotADirectory => libc::ENOTDIR,
        K::StorageFull => libc::ENOSPC,
        K::QuotaExceeded => libc::EDQUOT,
        K::FileTooLarge => libc::EFBIG,
        K::ReadOnlyFilesystem => libc::EROFS,
        K::InvalidFilename => libc::ENAMETOOLONG,
        _ => return None,
    })
}

#[cfg(not(unix))]
fn kind_errno(_: io::ErrorKind) -> Option<i32> {
    None
}

/// The `OSError` of `source`, raised while `what` (e.g. "reading") on `path`.
fn os_error(path: &Path, what: &str, source: &io::Error) -> PyErr {
    match errno(source) {
        Some(n) => {
            // io::Error's text is strerror plus " (os error N)"; Python prints "[Errno N]" itself.
            let text = io::Error::from_raw_os_error(n).to_string();
            let suffix = format!(" (os error {n})");
            let strerror = text.strip_suffix(&suffix).unwrap_or(&text);
            let filename = path.to_string_lossy().into_owned();
            PyOSError::new_err((n, format!("{strerror} ({what})"), filename))
        }
        None => PyErr::from(io::Error::new(
            source.kind(),
            format!("{}: {what}: {source}", path.display()),
        )),
    }
}

impl From<KernelError> for PyErr {
    fn from(e: KernelError) -> Self {
        error(e.to_string())
    }
}

impl From<StreamError> for PyErr {
    fn from(e: StreamError) -> Self {
        match &e {
            StreamError::Io { path, what, source } => os_error(path, what, source),
            StreamError::Invalid { .. } | StreamError::Cancelled => error(e.to_string()),
        }
    }
}

/// A packed-format error met while working on the file `path`: value problems are prefixed with
/// the path, I/O failures name their own file (for `unpack_packed`, the one being written).
pub(crate) struct InFile(pub PathBuf, pub PackedError);

impl From<InFile> for PyErr {
    fn from(InFile(path, e): InFile) -> Self {
        match &e {
            PackedError::Io { path, what, source } => os_error(path, what, source),
            _ => error(format!("{}: {e}", path.display())),
        }
    }
}
