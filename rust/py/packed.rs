//! Python functions of the packed adapter format: `encode_packed`, `decode_packed`, `unpack_packed`
//! and `packed_modules_outside`.
//! They only convert arguments and release the GIL around `crate::packed`; errors carry the file
//! path ([`InFile`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use half::bf16;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use super::arrays::{Array, FloatArray, FloatSlice};
use super::error::{error, InFile};
use super::to_numpy;
use crate::packed::{self, Extra, FloatData, Module, Packed, PackedError};

/// A `(name, safetensors dtype, shape, raw bytes)` extra tensor as Python passes it.
type PyExtra<'py> = (String, String, Vec<usize>, Bound<'py, PyBytes>);

fn borrowed<'a>(slice: &FloatSlice<'a>) -> FloatData<'a> {
    match *slice {
        FloatSlice::F32(s) => FloatData::F32(Cow::Borrowed(s)),
        FloatSlice::F16(s) => FloatData::F16(Cow::Borrowed(s)),
        FloatSlice::BF16(s) => FloatData::BF16(Cow::Borrowed(s)),
    }
}

/// `obj` extracted as `T`, a wrong type becoming a `VBLoRAError` that names the argument.
fn extract<'py, T: for<'a> FromPyObject<'a, 'py>>(
    name: &str,
    what: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<T> {
    obj.extract()
        .map_err(|_| error(format!("{name} must be {what}")))
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn encode_packed<'py>(
    py: Python<'py>,
    path: &Bound<'py, PyAny>,
    metadata: &Bound<'py, PyAny>,
    modules: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    bank: &Bound<'py, PyAny>,
    extras: &Bound<'py, PyAny>,
) -> PyResult<u64> {
    let path: PathBuf = extract("path", "a str or os.PathLike", path)?;
    let metadata: HashMap<String, String> = extract("metadata", "a dict of str to str", metadata)?;
    let modules: Vec<(String, i64, i64, i64)> = extract(
        "modules",
        "a list of (path, r, in_sub, out_sub) tuples",
        modules,
    )?;
    let extras: Vec<PyExtra<'py>> = extract(
        "extras",
        "a list of (name, dtype, shape, bytes) tuples",
        extras,
    )?;
    let indices = Array::<i64>::extract("indices", indices, "int64")?;
    let weights = FloatArray::extract("weights", weights)?;
    let bank = FloatArray::extract("bank", bank)?;

    let (rows, k) = (indices.rows, indices.cols);
    if weights.shape() != (rows, k.saturating_sub(1)) {
        let (r, c) = weights.shape();
        return Err(error(format!(
            "weights has shape ({r}, {c}), expected ({rows}, {}) for indices ({rows}, {k})",
            k.saturating_sub(1)
        )));
    }
    let dim = |path: &str, v: i64| {
        usize::try_from(v)
            .map_err(|_| error(format!("module {path:?}: dimension {v} must be >= 0")))
    };
    let modules = modules
        .into_iter()
        .map(|(path, r, a, b)| {
            Ok(Module {
                r: dim(&path, r)?,
                in_sub: dim(&path, a)?,
                out_sub: dim(&path, b)?,
                path,
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let extras = extras
        .iter()
        .map(|(name, dtype, shape, data)| {
            Ok(Extra {
                name: name.clone(),
                dtype: packed::parse_dtype(dtype)
                    .map_err(|e| error(format!("extra tensor {name:?}: {e}")))?,
                shape: shape.clone(),
                data: Cow::Borrowed(data.as_bytes()),
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let (num_vectors, vector_length) = bank.shape();
    let packed = Packed {
        metadata: metadata.into_iter().collect::<BTreeMap<_, _>>(),
        modules,
        num_vectors,
        vector_length,
        topk: k,
        indices: Cow::Borrowed(indices.slice()?),
        weights: borrowed(&weights.slice()?),
        bank: borrowed(&bank.slice()?),
        extras,
    };
    Ok(py
        .detach(|| packed::encode_to_file(&packed, &path))
        .map_err(|e| InFile(path, e))?)
}

/// A decoded float tensor as a 2-D numpy array (bfloat16 as uint16 bits) and its dtype name.
fn float_array<'py>(
    py: Python<'py>,
    data: FloatData<'_>,
    rows: usize,
    cols: usize,
) -> PyResult<(Bound<'py, PyAny>, &'static str)> {
    let name = data.dtype_name();
    let array = match data {
        FloatData::F32(v) => to_numpy(py, v.into_owned(), rows, cols)?.into_any(),
        FloatData::F16(v) => to_numpy(py, v.into_owned(), rows, cols)?.into_any(),
        FloatData::BF16(v) => {
            let bits: Vec<u16> = v.iter().map(|x| bf16::to_bits(*x)).collect();
            to_numpy(py, bits, rows, cols)?.into_any()
        }
    };
    Ok((array, name))
}

#[pyfunction]
fn decode_packed<'py>(py: Python<'py>, path: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    let path: PathBuf = extract("path", "a str or os.PathLike", path)?;
    let p = py
        .detach(|| packed::decode_file(&path))
        .map_err(|e| InFile(path, e))?;
    let bits = p.index_bits();
    let s = p.indices.len() / p.topk;
    let out = PyDict::new(py);
    out.set_item("metadata", p.metadata.into_pyobject(py)?)?;
    let modules: Vec<(String, usize, usize, usize)> = p
        .modules
        .into_iter()
        .map(|m| (m.path, m.r, m.in_sub, m.out_sub))
        .collect();
    out.set_item("modules", PyList::new(py, modules)?)?;
    out.set_item("num_vectors", p.num_vectors)?;
    out.set_item("vector_length", p.vector_length)?;
    out.set_item("topk", p.topk)?;
    out.set_item("index_bits", bits)?;
    out.set_item("indices", to_numpy(py, p.indices.into_owned(), s, p.topk)?)?;
    let (weights, weights_dtype) = float_array(py, p.weights, s, p.topk - 1)?;
    out.set_item("weights", weights)?;
    out.set_item("weights_dtype", weights_dtype)?;
    let (bank, bank_dtype) = float_array(py, p.bank, p.num_vectors, p.vector_length)?;
    out.set_item("bank", bank)?;
    out.set_item("bank_dtype", bank_dtype)?;
    let extras = p
        .extras
        .into_iter()
        .map(|e| {
            (
                e.name,
                e.dtype.to_string(),
                e.shape,
                PyBytes::new(py, &e.data),
            )
        })
        .collect::<Vec<_>>();
    out.set_item("extras", PyList::new(py, extras)?)?;
    Ok(out)
}

/// Decodes the packed file `src` and writes PEFT's top-K checkpoint of it to `dst` (a file the
/// caller moves into place). Returns the header facts the caller checks the config against:
/// metadata, dims, the module count, and `(path, r)` of the first module of each distinct rank.
#[pyfunction]
fn unpack_packed<'py>(
    py: Python<'py>,
    src: &Bound<'py, PyAny>,
    dst: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let src: PathBuf = extract("src", "a str or os.PathLike", src)?;
    let dst: PathBuf = extract("dst", "a str or os.PathLike", dst)?;
    let p = py.detach(|| {
        let p = packed::decode_file(&src)?;
        let bytes = packed::peft_checkpoint(&p, packed::MAX_HEADER_BYTES)?;
        std::fs::write(&dst, bytes).map_err(|e| PackedError::io(&dst, "writing", e))?;
        Ok::<_, PackedError>(p)
    });
    let p = p.map_err(|e| InFile(src, e))?;
    let mut ranks: Vec<(&str, usize)> = Vec::new();
    for m in &p.modules {
        if !ranks.iter().any(|(_, r)| *r == m.r) {
            ranks.push((&m.path, m.r));
        }
    }
    let out = PyDict::new(py);
    out.set_item("module_ranks", PyList::new(py, ranks)?)?;
    out.set_item("modules", p.modules.len())?;
    out.set_item("num_vectors", p.num_vectors)?;
    out.set_item("vector_length", p.vector_length)?;
    out.set_item("topk", p.topk)?;
    out.set_item("metadata", p.metadata.into_pyobject(py)?)?;
    Ok(out)
}

/// `(listed, outside, first)`: how many modules the packed file at `path` lists, how many of them
/// are not in `known`, and the first of those in file order (None if all are known). Reads the
/// header only; the data is not decoded.
#[pyfunction]
fn packed_modules_outside(
    py: Python<'_>,
    path: &Bound<'_, PyAny>,
    known: &Bound<'_, PyAny>,
) -> PyResult<(usize, usize, Option<String>)> {
    let path: PathBuf = extract("path", "a str or os.PathLike", path)?;
    let known: Vec<String> = extract("known", "a list of str", known)?;
    let found = py.detach(|| {
        let bytes = std::fs::read(&path).map_err(|e| PackedError::io(&path, "reading", e))?;
        let modules = packed::module_table(&bytes)?;
        let known: HashSet<&str> = known.iter().map(String::as_str).collect();
        let mut outside = modules.iter().filter(|m| !known.contains(m.path.as_str()));
        let first = outside.next().map(|m| m.path.clone());
        let count = outside.count() + usize::from(first.is_some());
        Ok((modules.len(), count, first))
    });
    Ok(found.map_err(|e| InFile(path, e))?)
}

/// Bits per stored index in a packed file for a bank of `num_vectors` vectors: the encoder's own rule
/// (`packed::index_bits`), so Python never spells it again.
#[pyfunction]
fn index_bits(num_vectors: u64) -> u32 {
    packed::index_bits(num_vectors)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(index_bits, m)?)?;
    m.add_function(wrap_pyfunction!(encode_packed, m)?)?;
    m.add_function(wrap_pyfunction!(decode_packed, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_packed, m)?)?;
    m.add_function(wrap_pyfunction!(packed_modules_outside, m)?)?;
    Ok(())
}
