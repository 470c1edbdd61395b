//! Python functions of the streaming merge (`crate::stream`), registered by `register`: they
//! borrow arguments, release the GIL around the work and return `StreamError` with `?`
//! (`error.rs` maps it: `OSError` for I/O failures, `VBLoRAError` for the rest).
//! `merge_safetensors` re-acquires the GIL briefly after every chunk to check for signals and
//! call the progress callback, so Ctrl-C interrupts a long merge with `KeyboardInterrupt`.

use std::collections::HashMap;
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use safetensors::tensor::Dtype;

use super::arrays::Array;
use super::error::error;
use super::{count, to_numpy};
use crate::matrix::MatRef;
use crate::stream::{self, AdapterConfig, Options, StreamError, Update, Want};

/// `(tensors, metadata, data_bytes)`: tensors as `{name: (dtype, shape)}` in data order.
type HeaderInfo<'py> = (Bound<'py, PyDict>, Option<HashMap<String, String>>, u64);

#[pyfunction]
fn safetensors_header(py: Python<'_>, path: PathBuf) -> PyResult<HeaderInfo<'_>> {
    let header = py.detach(move || stream::read_header(&path))?;
    let tensors = PyDict::new(py);
    for (name, info) in header.tensors() {
        let shape = PyTuple::new(py, &info.shape)?;
        tensors.set_item(name, (info.dtype.to_string(), shape))?;
    }
    let metadata = header.metadata.metadata().clone();
    Ok((tensors, metadata, header.data_len()))
}

/// `{module: (rank, fan_in, fan_out)}`.
fn shapes_dict<'py>(
    py: Python<'py>,
    modules: &std::collections::BTreeMap<String, stream::Module>,
) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    for (name, m) in modules {
        out.set_item(name, (m.shape.rank, m.shape.fan_in, m.shape.fan_out))?;
    }
    Ok(out)
}

/// `{module: (A, B)}` as numpy arrays, for the modules that were built.
fn factors_dict(
    py: Python<'_>,
    modules: std::collections::BTreeMap<String, stream::Module>,
) -> PyResult<Bound<'_, PyDict>> {
    let out = PyDict::new(py);
    for (module, m) in modules {
        if let Some(f) = m.factors {
            let a = to_numpy(py, f.a, f.rank, f.fan_in)?;
            let b = to_numpy(py, f.b, f.fan_out, f.rank)?;
            out.set_item(module, (a, b))?;
        }
    }
    Ok(out)
}

fn adapter_config(topk: i64, num_vectors: i64, vector_length: i64) -> PyResult<AdapterConfig> {
    Ok(AdapterConfig {
        topk: count("topk", topk, 1)?,
        num_vectors: count("num_vectors", num_vectors, 1)?,
        vector_length: count("vector_length", vector_length, 1)?,
    })
}

/// Every module's `(rank, fan_in, fan_out)` after validating the whole file; builds nothing.
#[pyfunction]
fn adapter_shapes<'py>(
    py: Python<'py>,
    path: PathBuf,
    topk: i64,
    num_vectors: i64,
    vector_length: i64,
    num_threads: i64,
) -> PyResult<Bound<'py, PyDict>> {
    let config = adapter_config(topk, num_vectors, vector_length)?;
    let threads = count("num_threads", num_threads, 0)?;
    let modules =
        py.detach(move || stream::adapter_modules(&path, &config, Want::Shapes, threads))?;
    shapes_dict(py, &modules)
}

/// `{module: (A, B)}` for `modules` (every module when None).
#[pyfunction]
#[pyo3(signature = (path, topk, num_vectors, vector_length, num_threads, modules=None))]
fn adapter_factors<'py>(
    py: Python<'py>,
    path: PathBuf,
    topk: i64,
    num_vectors: i64,
    vector_length: i64,
    num_threads: i64,
    modules: Option<Vec<String>>,
) -> PyResult<Bound<'py, PyDict>> {
    let config = adapter_config(topk, num_vectors, vector_length)?;
    let threads = count("num_threads", num_threads, 0)?;
    let built = py.detach(move || {
        let names = match modules {
            Some(names) => names,
            None => stream::adapter_modules(&path, &config, Want::Shapes, threads)?
                .into_keys()
                .collect(),
        };
        stream::adapter_modules(&path, &config, Want::Factors(&names), threads)
    })?;
    factors_dict(py, built)
}

/// `(config_json, {module: (rank, fan_in, fan_out)})` of a packed file, validated whole.
#[pyfunction]
fn packed_adapter_shapes<'py>(
    py: Python<'py>,
    path: PathBuf,
    num_threads: i64,
) -> PyResult<(String, Bound<'py, PyDict>)> {
    let threads = count("num_threads", num_threads, 0)?;
    let (config, modules) =
        py.detach(move || stream::packed_modules(&path, Want::Shapes, threads))?;
    Ok((config, shapes_dict(py, &modules)?))
}

/// `(config_json, {module: (A, B)})` of a packed file, for `modules` (every module when None).
#[pyfunction]
#[pyo3(signature = (path, num_threads, modules=None))]
fn packed_adapter_factors<'py>(
    py: Python<'py>,
    path: PathBuf,
    num_threads: i64,
    modules: Option<Vec<String>>,
) -> PyResult<(String, Bound<'py, PyDict>)> {
    let threads = count("num_threads", num_threads, 0)?;
    let (config, built) = py.detach(move || {
        let names = match modules {
            Some(names) => names,
            None => stream::packed_modules(&path, Want::Shapes, threads)?
                .1
                .into_keys()
                .collect(),
        };
        stream::packed_modules(&path, Want::Factors(&names), threads)
    })?;
    Ok((config, factors_dict(py, built)?))
}

/// The first bad row of stored top-K `indices (rows, k)` and `weights (rows, k - 1)` by the one
/// rule of `crate::stored_topk`, as `(row, "indices" | "weights", reason)`, or None.
#[pyfunction]
fn check_topk_rows(
    py: Python<'_>,
    indices: &Bound<'_, PyAny>,
    weights: &Bound<'_, PyAny>,
    num_vectors: i64,
) -> PyResult<Option<(usize, &'static str, String)>> {
    let idx = Array::<i64>::extract("indices", indices, "int64")?;
    let w = Array::<f32>::extract("weights", weights, "float32")?;
    let nv = count("num_vectors", num_vectors, 1)?;
    let k = idx.cols;
    if k == 0 || w.rows != idx.rows || w.cols + 1 != k {
        return Err(error(format!(
            "indices ({}, {}) and weights ({}, {}) do not hold k and k - 1 entries per row",
            idx.rows, idx.cols, w.rows, w.cols
        )));
    }
    let (is, ws) = (idx.slice()?, w.slice()?);
    let found = py.detach(|| crate::stored_topk::check_rows(is, ws, k, nv));
    Ok(found.err().map(|(row, p)| {
        let part = if p.in_indices() { "indices" } else { "weights" };
        (row, part, p.reason())
    }))
}

fn parse_dtype(name: &str) -> PyResult<Dtype> {
    match name {
        "float32" => Ok(Dtype::F32),
        "float16" => Ok(Dtype::F16),
        "bfloat16" => Ok(Dtype::BF16),
        _ => Err(error(format!(
            "out_dtype must be 'float32', 'float16' or 'bfloat16', got {name:?}"
        ))),
    }
}

/// The borrowed `(u, v)` of one entry of `updates`.
struct Factors<'py> {
    name: String,
    u: Array<'py, f32>,
    v: Array<'py, f32>,
}

fn borrow_updates<'py>(updates: &Bound<'py, PyDict>) -> PyResult<Vec<Factors<'py>>> {
    let py = updates.py();
    let mut out = Vec::with_capacity(updates.len());
    for (key, value) in updates.iter() {
        let name: String = key.extract()?;
        let context = |e: PyErr| error(format!("updates[{name:?}]: {}", e.value(py)));
        let (u, v): (Bound<'py, PyAny>, Bound<'py, PyAny>) = value.extract().map_err(context)?;
        let u = Array::<f32>::extract("u", &u, "float32").map_err(context)?;
        let v = Array::<f32>::extract("v", &v, "float32").map_err(context)?;
        out.push(Factors { name, u, v });
    }
    Ok(out)
}

// pyo3 hands over paths as owned `PathBuf`s.
#[allow(clippy::needless_pass_by_value)]
#[pyfunction]
#[pyo3(signature = (src, dst, updates, out_dtype=None, num_threads=0, progress=None))]
fn merge_safetensors(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    updates: &Bound<'_, PyDict>,
    out_dtype: Option<&str>,
    num_threads: i64,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    let opts = Options {
        out_dtype: out_dtype.map(parse_dtype).transpose()?,
        num_threads: count("num_threads", num_threads, 0)?,
        ..Options::default()
    };
    let borrowed = borrow_updates(updates)?;
    let mut views = HashMap::with_capacity(borrowed.len());
    for f in &borrowed {
        let context = |e: crate::KernelError| error(format!("updates[{:?}]: {e}", f.name));
        let u = MatRef::new("u", f.u.slice()?, f.u.rows, f.u.cols).map_err(context)?;
        let v = MatRef::new("v", f.v.slice()?, f.v.rows, f.v.cols).map_err(context)?;
        views.insert(f.name.clone(), Update { u, v });
    }
    // The Python exception that stopped the merge (KeyboardInterrupt, or the callback's own).
    let mut stopped: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut report = |n: u64| {
            Python::attach(|py| {
                py.check_signals()
                    .and_then(|()| match &progress {
                        Some(cb) => cb.call1(py, (n,)).map(drop),
                        None => Ok(()),
                    })
                    .map_err(|e| {
                        stopped = Some(e);
                        StreamError::Cancelled
                    })
            })
        };
        stream::merge_file(&src, &dst, &views, &opts, &mut report)
    });
    match (result, stopped) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(e.into()),
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(safetensors_header, m)?)?;
    m.add_function(wrap_pyfunction!(adapter_shapes, m)?)?;
    m.add_function(wrap_pyfunction!(adapter_factors, m)?)?;
    m.add_function(wrap_pyfunction!(packed_adapter_shapes, m)?)?;
    m.add_function(wrap_pyfunction!(packed_adapter_factors, m)?)?;
    m.add_function(wrap_pyfunction!(check_topk_rows, m)?)?;
    m.add_function(wrap_pyfunction!(merge_safetensors, m)?)?;
    Ok(())
}
