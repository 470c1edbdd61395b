//! The Python binding `vblora_rs._native`, and nothing else: it borrows numpy arrays as
//! validated C-contiguous slices, releases the GIL around the kernel, and turns the crate's
//! errors into Python's (`error.rs`: `VBLoRAError`, a `ValueError`, for bad values; `OSError`
//! for I/O failures). No kernel logic lives here.

mod arrays;
mod error;
mod packed;
mod stream;

use numpy::{PyArray, PyArray2, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::error::KernelError;
use crate::matrix::{MatMut, MatRef};
use arrays::{Array, FloatArray, FloatArrayMut, FloatSlice, FloatSliceMut};
use error::{error, VBLoRAError};

/// Runs `$body` with `$s` bound to the typed slice inside a [`FloatSlice`] or [`FloatSliceMut`].
macro_rules! dispatch {
    ($kind:ident, $slice:expr, $s:ident => $body:expr) => {
        match $slice {
            $kind::F32($s) => $body,
            $kind::F16($s) => $body,
            $kind::BF16($s) => $body,
        }
    };
}

/// A Python int of at least `min` as `usize`, else an error naming `name`. (Upper bounds, such
/// as `k <= n`, are the kernels' to check.)
fn count(name: &str, value: i64, min: usize) -> PyResult<usize> {
    usize::try_from(value)
        .ok()
        .filter(|v| *v >= min)
        .ok_or_else(|| error(format!("{name} must be >= {min}, got {value}")))
}

/// A 2-D numpy array over `data` (no copy: numpy takes ownership of the `Vec`).
///
/// A Ctrl-C that arrived while the GIL was released is raised here as `KeyboardInterrupt` first:
/// numpy's first use imports its C API, and an import that runs with the interrupt pending fails
/// inside rust-numpy as a panic (`PanicException`) instead of the interrupt.
fn to_numpy<T: numpy::Element>(
    py: Python<'_>,
    data: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'_, PyArray2<T>>> {
    py.check_signals()?;
    PyArray::from_vec(py, data).reshape([rows, cols])
}

/// `(indices, weights)` as returned by `topk_softmax`.
type TopK<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f32>>);

#[pyfunction]
fn topk_softmax<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    k: i64,
    num_threads: i64,
) -> PyResult<TopK<'py>> {
    let logits = FloatArray::extract("logits", logits)?;
    let (rows, n) = logits.shape();
    let k = count("k", k, 1)?;
    let threads = count("num_threads", num_threads, 0)?;
    let (indices, weights) = dispatch!(FloatSlice, logits.slice()?, s => py.detach(|| {
        crate::topk::topk_softmax(MatRef::new("logits", s, rows, n)?, k, threads)
    }))?;
    Ok((
        to_numpy(py, indices, rows, k)?,
        to_numpy(py, weights, rows, k)?,
    ))
}

/// Top-k of several matrices: softmax weights, or the kept logits themselves.
fn many<T: crate::Element>(
    mats: &[MatRef<'_, T>],
    k: usize,
    kept_logits: bool,
    threads: usize,
) -> Result<(Vec<i64>, Vec<f32>), KernelError> {
    if kept_logits {
        crate::topk::topk_kept_many(mats, k, threads)
    } else {
        crate::topk::topk_softmax_many(mats, k, threads)
    }
}

/// The typed slices of several float arrays of one dtype, as `MatRef`s.
fn same_dtype_mats<'a, T>(
    slices: &'a [FloatSlice<'a>],
    shapes: &[(usize, usize)],
    pick: impl Fn(&FloatSlice<'a>) -> Option<&'a [T]>,
) -> Result<Vec<MatRef<'a, T>>, KernelError> {
    slices
        .iter()
        .zip(shapes)
        .map(|(s, &(rows, cols))| {
            let data = pick(s).ok_or(KernelError::Mixed { arg: "logits" })?;
            MatRef::new("logits", data, rows, cols)
        })
        .collect()
}

#[pyfunction]
fn topk_many<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyList>,
    k: i64,
    kept_logits: bool,
    num_threads: i64,
) -> PyResult<TopK<'py>> {
    let items: Vec<Bound<'py, PyAny>> = logits.iter().collect();
    let arrays = items
        .iter()
        .map(|a| FloatArray::extract("logits", a))
        .collect::<PyResult<Vec<_>>>()?;
    let shapes: Vec<(usize, usize)> = arrays.iter().map(FloatArray::shape).collect();
    let slices = arrays
        .iter()
        .map(FloatArray::slice)
        .collect::<PyResult<Vec<_>>>()?;
    let k = count("k", k, 1)?;
    let threads = count("num_threads", num_threads, 0)?;
    let rows: usize = shapes.iter().map(|s| s.0).sum();
    let (indices, weights) = py.detach(|| match slices.first() {
        None => Ok((Vec::new(), Vec::new())),
        Some(FloatSlice::F32(_)) => {
            let mats = same_dtype_mats(&slices, &shapes, |s| match s {
                FloatSlice::F32(x) => Some(*x),
                _ => None,
            })?;
            many(&mats, k, kept_logits, threads)
        }
        Some(FloatSlice::F16(_)) => {
            let mats = same_dtype_mats(&slices, &shapes, |s| match s {
                FloatSlice::F16(x) => Some(*x),
                _ => None,
            })?;
            many(&mats, k, kept_logits, threads)
        }
        Some(FloatSlice::BF16(_)) => {
            let mats = same_dtype_mats(&slices, &shapes, |s| match s {
                FloatSlice::BF16(x) => Some(*x),
                _ => None,
            })?;
            many(&mats, k, kept_logits, threads)
        }
    })?;
    Ok((
        to_numpy(py, indices, rows, k)?,
        to_numpy(py, weights, rows, k)?,
    ))
}

#[pyfunction]
fn low_rank_from_logits<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    bank: &Bound<'py, PyAny>,
    k: i64,
    num_threads: i64,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let logits = FloatArray::extract("logits", logits)?;
    let bank = FloatArray::extract("bank", bank)?;
    let (rows, n) = logits.shape();
    let (num_vectors, len) = bank.shape();
    let k = count("k", k, 1)?;
    let threads = count("num_threads", num_threads, 0)?;
    let out = dispatch!(FloatSlice, logits.slice()?, l => dispatch!(FloatSlice, bank.slice()?, b => {
        py.detach(|| {
            let l = MatRef::new("logits", l, rows, n)?;
            let b = MatRef::new("bank", b, num_vectors, len)?;
            crate::lowrank::low_rank_from_logits(l, b, k, threads)
        })
    }))?;
    to_numpy(py, out, rows, len)
}

#[pyfunction]
fn low_rank_from_topk<'py>(
    py: Python<'py>,
    indices: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    bank: &Bound<'py, PyAny>,
    num_threads: i64,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let indices = Array::<i64>::extract("indices", indices, "int64")?;
    let weights = Array::<f32>::extract("weights", weights, "float32")?;
    let bank = FloatArray::extract("bank", bank)?;
    let (num_vectors, len) = bank.shape();
    let threads = count("num_threads", num_threads, 0)?;
    let (idx, w) = (indices.slice()?, weights.slice()?);
    let out = dispatch!(FloatSlice, bank.slice()?, b => py.detach(|| {
        let i = MatRef::new("indices", idx, indices.rows, indices.cols)?;
        let w = MatRef::new("weights", w, weights.rows, weights.cols)?;
        let b = MatRef::new("bank", b, num_vectors, len)?;
        crate::lowrank::low_rank_from_topk(i, w, b, threads)
    }))?;
    to_numpy(py, out, indices.rows, len)
}

#[pyfunction]
fn rank_update_<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    u: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    num_threads: i64,
) -> PyResult<()> {
    // Borrow the factors first, so a weight that overlaps them fails numpy's borrow check.
    let u = Array::<f32>::extract("u", u, "float32")?;
    let v = Array::<f32>::extract("v", v, "float32")?;
    let mut weight = FloatArrayMut::extract("weight", weight)?;
    let (m, n) = weight.shape();
    let threads = count("num_threads", num_threads, 0)?;
    let (us, vs) = (u.slice()?, v.slice()?);
    dispatch!(FloatSliceMut, weight.slice_mut()?, w => py.detach(|| {
        let w = MatMut::new("weight", w, m, n)?;
        let u = MatRef::new("u", us, u.rows, u.cols)?;
        let v = MatRef::new("v", vs, v.rows, v.cols)?;
        crate::merge::rank_update(w, u, v, threads)
    }))?;
    Ok(())
}

#[pyfunction]
fn low_rank_product<'py>(
    py: Python<'py>,
    u: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    num_threads: i64,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let u = Array::<f32>::extract("u", u, "float32")?;
    let v = Array::<f32>::extract("v", v, "float32")?;
    let threads = count("num_threads", num_threads, 0)?;
    let (us, vs) = (u.slice()?, v.slice()?);
    // numpy's allocator (calloc plus MADV_HUGEPAGE on large arrays), not a Rust `Vec`: first
    // touch of the output is most of this kernel's cost, and huge pages make it much cheaper.
    let out = PyArray2::<f32>::zeros(py, [u.rows, v.cols], false);
    {
        let mut rw = out
            .try_readwrite()
            .map_err(|e| error(format!("out cannot be borrowed: {e}")))?;
        let os = rw
            .as_slice_mut()
            .map_err(|_| error("out must be contiguous"))?;
        py.detach(|| {
            let o = MatMut::new("out", os, u.rows, v.cols)?;
            let um = MatRef::new("u", us, u.rows, u.cols)?;
            let vm = MatRef::new("v", vs, v.rows, v.cols)?;
            crate::merge::low_rank_product_into(o, um, vm, threads)
        })?;
    }
    Ok(out)
}

#[pyfunction]
fn simd_level() -> &'static str {
    crate::simd::simd_level()
}

#[pyfunction]
fn simd_levels() -> Vec<&'static str> {
    crate::simd::simd_levels()
}

#[pyfunction]
fn topk_prefetch() -> (&'static str, &'static str) {
    crate::topk::topk_prefetch()
}

/// Runs the kernels on the team of the OpenMP runtime at `path`, already loaded (torch's).
#[pyfunction]
fn use_openmp(path: &str) -> PyResult<()> {
    Ok(crate::threads::use_openmp(path)?)
}

#[pyfunction]
fn thread_backend() -> &'static str {
    crate::threads::backend_name()
}

#[pymodule(gil_used = false)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(load_numpy_api, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("TORCH_SOFTMAX_MAX_K", crate::topk::softmax::MAX_K)?;
    m.add("VBLoRAError", m.py().get_type::<VBLoRAError>())?;
    m.add_function(wrap_pyfunction!(topk_softmax, m)?)?;
    m.add_function(wrap_pyfunction!(topk_many, m)?)?;
    m.add_function(wrap_pyfunction!(low_rank_from_logits, m)?)?;
    m.add_function(wrap_pyfunction!(low_rank_from_topk, m)?)?;
    m.add_function(wrap_pyfunction!(rank_update_, m)?)?;
    m.add_function(wrap_pyfunction!(low_rank_product, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(topk_prefetch, m)?)?;
    m.add_function(wrap_pyfunction!(use_openmp, m)?)?;
    m.add_function(wrap_pyfunction!(thread_backend, m)?)?;
    packed::register(m)?;
    stream::register(m)?;
    Ok(())
}

/// Loads NumPy's C API now. The `numpy` crate loads it on first use and panics if that fails;
/// the loading runs Python code (NumPy's version parsing), so a Ctrl-C landing there became a Rust
/// panic in whichever call came first. Called where numpy has just been imported (the CLI once its
/// commands are imported, `vblora_rs.ops` on import), a failure is an ordinary exception there (a
/// `KeyboardInterrupt` for a Ctrl-C) and the crate's later uses find the API loaded. The crate's
/// panic message is kept off stderr while this runs.
#[pyfunction]
fn load_numpy_api(py: Python<'_>) -> PyResult<()> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        numpy::npyffi::is_numpy_2(py)
    }));
    std::panic::set_hook(hook);
    match loaded {
        Ok(_) => Ok(()),
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            if message.contains("KeyboardInterrupt") {
                Err(pyo3::exceptions::PyKeyboardInterrupt::new_err(()))
            } else {
                Err(pyo3::exceptions::PyImportError::new_err(format!(
                    "vblora_rs._native: loading NumPy's C API failed: {message}"
                )))
            }
        }
    }
}
