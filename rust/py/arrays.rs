//! Borrowing numpy arguments as validated, C-contiguous slices.

use half::{bf16, f16};
use numpy::{
    Element as NpElement, PyArray2, PyArrayMethods, PyReadonlyArray2, PyReadwriteArray2,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use super::error::error;

/// The 2-D, C-contiguous numpy array behind `obj`; `name` is the argument in messages.
fn untyped<'a, 'py>(
    name: &str,
    obj: &'a Bound<'py, PyAny>,
) -> PyResult<&'a Bound<'py, PyUntypedArray>> {
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        let ty = obj
            .get_type()
            .name()
            .map_or_else(|_| "?".to_owned(), |n| n.to_string());
        error(format!("{name} must be a numpy array, got {ty}"))
    })?;
    if arr.ndim() != 2 {
        return Err(error(format!("{name} must be 2-D, got {}-D", arr.ndim())));
    }
    // `as_slice` alone would also accept Fortran order, which would silently transpose.
    if !arr.is_c_contiguous() {
        return Err(error(format!("{name} must be C-contiguous")));
    }
    Ok(arr)
}

fn wrong_dtype(name: &str, arr: &Bound<'_, PyUntypedArray>, expected: &str) -> PyErr {
    error(format!("{name} must be {expected}, got {}", arr.dtype()))
}

/// A read-only, validated 2-D array of one fixed dtype.
pub(crate) struct Array<'py, T: NpElement> {
    name: &'static str,
    arr: PyReadonlyArray2<'py, T>,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

impl<'py, T: NpElement> Array<'py, T> {
    fn borrow(name: &'static str, arr: &Bound<'py, PyArray2<T>>) -> PyResult<Self> {
        let (rows, cols) = (arr.shape()[0], arr.shape()[1]);
        // A tensor read from a safetensors file whose header is not padded to 8 bytes (legal, and PEFT loads
        // it) can start at any byte: borrow an aligned copy rather than refuse it.
        let copy;
        let arr = if (arr.data() as usize).is_multiple_of(std::mem::align_of::<T>()) {
            arr
        } else {
            copy = arr.call_method0("copy")?.cast_into::<PyArray2<T>>()?;
            &copy
        };
        let arr = arr
            .try_readonly()
            .map_err(|e| error(format!("{name} cannot be borrowed: {e}")))?;
        Ok(Self {
            name,
            arr,
            rows,
            cols,
        })
    }

    /// `obj` as a 2-D C-contiguous array of `T`, else an error naming `expected`.
    pub(crate) fn extract(
        name: &'static str,
        obj: &Bound<'py, PyAny>,
        expected: &str,
    ) -> PyResult<Self> {
        let arr = untyped(name, obj)?;
        match obj.cast::<PyArray2<T>>() {
            Ok(typed) => Self::borrow(name, typed),
            Err(_) => Err(wrong_dtype(name, arr, expected)),
        }
    }

    pub(crate) fn slice(&self) -> PyResult<&[T]> {
        self.arr
            .as_slice()
            .map_err(|_| error(format!("{} must be aligned", self.name)))
    }
}

/// A writeable, validated 2-D array of one fixed dtype.
pub(crate) struct ArrayMut<'py, T: NpElement> {
    name: &'static str,
    arr: PyReadwriteArray2<'py, T>,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

impl<'py, T: NpElement> ArrayMut<'py, T> {
    fn borrow(name: &'static str, arr: &Bound<'py, PyArray2<T>>) -> PyResult<Self> {
        let (rows, cols) = (arr.shape()[0], arr.shape()[1]);
        let arr = arr.try_readwrite().map_err(|e| match e {
            numpy::BorrowError::NotWriteable => error(format!("{name} must be writeable")),
            _ => error(format!("{name} overlaps another argument or is in use")),
        })?;
        Ok(Self {
            name,
            arr,
            rows,
            cols,
        })
    }

    pub(crate) fn slice_mut(&mut self) -> PyResult<&mut [T]> {
        let name = self.name;
        self.arr
            .as_slice_mut()
            .map_err(|_| error(format!("{name} must be aligned")))
    }
}

const FLOAT_DTYPES: &str = "float32, float16 or uint16 (bfloat16 bits)";

/// A float array over `$array` ([`Array`] or [`ArrayMut`]): float32, float16, or uint16 holding
/// bfloat16 bits, with `extract` and `shape`; the slice accessors are written per type below.
macro_rules! float_array {
    ($(#[$doc:meta])* $name:ident, $array:ident) => {
        $(#[$doc])*
        pub(crate) enum $name<'py> {
            F32($array<'py, f32>),
            F16($array<'py, f16>),
            BF16($array<'py, u16>),
        }

        impl<'py> $name<'py> {
            pub(crate) fn extract(name: &'static str, obj: &Bound<'py, PyAny>) -> PyResult<Self> {
                let arr = untyped(name, obj)?;
                if let Ok(a) = obj.cast::<PyArray2<f32>>() {
                    $array::borrow(name, a).map(Self::F32)
                } else if let Ok(a) = obj.cast::<PyArray2<f16>>() {
                    $array::borrow(name, a).map(Self::F16)
                } else if let Ok(a) = obj.cast::<PyArray2<u16>>() {
                    $array::borrow(name, a).map(Self::BF16)
                } else {
                    Err(wrong_dtype(name, arr, FLOAT_DTYPES))
                }
            }

            pub(crate) fn shape(&self) -> (usize, usize) {
                match self {
                    Self::F32(a) => (a.rows, a.cols),
                    Self::F16(a) => (a.rows, a.cols),
                    Self::BF16(a) => (a.rows, a.cols),
                }
            }
        }
    };
}

float_array!(
    /// A read-only float array: float32, float16, or uint16 holding bfloat16 bits.
    FloatArray,
    Array
);

float_array!(
    /// A writeable float array: float32, float16, or uint16 holding bfloat16 bits.
    FloatArrayMut,
    ArrayMut
);

/// The slice of a [`FloatArray`], bfloat16 bits reinterpreted as `bf16`.
pub(crate) enum FloatSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl FloatArray<'_> {
    pub(crate) fn slice(&self) -> PyResult<FloatSlice<'_>> {
        Ok(match self {
            Self::F32(a) => FloatSlice::F32(a.slice()?),
            Self::F16(a) => FloatSlice::F16(a.slice()?),
            // bf16 is a `Pod` u16 newtype of the same size and alignment: the cast cannot fail.
            Self::BF16(a) => FloatSlice::BF16(bytemuck::cast_slice(a.slice()?)),
        })
    }
}

/// The mutable slice of a [`FloatArrayMut`].
pub(crate) enum FloatSliceMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
}

impl FloatArrayMut<'_> {
    pub(crate) fn slice_mut(&mut self) -> PyResult<FloatSliceMut<'_>> {
        Ok(match self {
            Self::F32(a) => FloatSliceMut::F32(a.slice_mut()?),
            Self::F16(a) => FloatSliceMut::F16(a.slice_mut()?),
            // Same layout argument as `FloatArray::slice`.
            Self::BF16(a) => FloatSliceMut::BF16(bytemuck::cast_slice_mut(a.slice_mut()?)),
        })
    }
}
