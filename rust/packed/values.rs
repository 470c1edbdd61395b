//! Float tensors of the format (bank and top-K weights) in their stored dtype, their little-endian
//! bytes, and the value checks both the encoder and the decoder run.

use std::borrow::Cow;

use half::{bf16, f16};
use safetensors::Dtype;

use crate::element::Element;
use crate::stored_topk::{self, RowProblem};

/// A flat float tensor, borrowed (encoding) or owned (decoded), in its stored dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum FloatData<'a> {
    F32(Cow<'a, [f32]>),
    F16(Cow<'a, [f16]>),
    BF16(Cow<'a, [bf16]>),
}

/// Runs `$body` with `$v` bound to the typed slice of a [`FloatData`].
macro_rules! with_slice {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            FloatData::F32(c) => {
                let $v: &[f32] = c;
                $body
            }
            FloatData::F16(c) => {
                let $v: &[f16] = c;
                $body
            }
            FloatData::BF16(c) => {
                let $v: &[bf16] = c;
                $body
            }
        }
    };
}

/// Little-endian bytes of `values`: the slice itself on little-endian machines.
fn le_bytes<T: bytemuck::Pod>(values: &[T]) -> Cow<'_, [u8]> {
    let bytes: &[u8] = bytemuck::cast_slice(values);
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytes)
    } else {
        let size = std::mem::size_of::<T>();
        Cow::Owned(
            bytes
                .chunks_exact(size)
                .flat_map(|c| c.iter().rev())
                .copied()
                .collect(),
        )
    }
}

/// Values of type `T` from little-endian `bytes` (any alignment; `bytes.len()` a multiple of
/// `size_of::<T>()`, which the safetensors layer has checked against dtype and shape).
fn from_le_bytes<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    let mut out = vec![T::zeroed(); bytes.len() / size];
    let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
    dst.copy_from_slice(&bytes[..dst.len()]);
    if cfg!(target_endian = "big") {
        dst.chunks_exact_mut(size).for_each(<[u8]>::reverse);
    }
    out
}

impl FloatData<'_> {
    pub fn len(&self) -> usize {
        with_slice!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> Dtype {
        match self {
            FloatData::F32(_) => Dtype::F32,
            FloatData::F16(_) => Dtype::F16,
            FloatData::BF16(_) => Dtype::BF16,
        }
    }

    /// torch's name of the dtype: "float32", "float16" or "bfloat16".
    pub fn dtype_name(&self) -> &'static str {
        match self {
            FloatData::F32(_) => f32::NAME,
            FloatData::F16(_) => f16::NAME,
            FloatData::BF16(_) => bf16::NAME,
        }
    }

    /// The values widened to `f32` (exact).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        with_slice!(self, v => v.iter().map(|x| x.to_f32()).collect())
    }

    pub(crate) fn le_bytes(&self) -> Cow<'_, [u8]> {
        with_slice!(self, v => le_bytes(v))
    }

    /// The tensor stored as `dtype` in `bytes`, or `None` when `dtype` is not F32, F16 or BF16.
    pub(crate) fn from_le_bytes(dtype: Dtype, bytes: &[u8]) -> Option<FloatData<'static>> {
        Some(match dtype {
            Dtype::F32 => FloatData::F32(Cow::Owned(from_le_bytes(bytes))),
            Dtype::F16 => FloatData::F16(Cow::Owned(from_le_bytes(bytes))),
            Dtype::BF16 => FloatData::BF16(Cow::Owned(from_le_bytes(bytes))),
            _ => None?,
        })
    }

    /// The position and value of the first NaN or infinity, if any.
    pub(crate) fn first_non_finite(&self) -> Option<(usize, f32)> {
        with_slice!(self, v => first_non_finite(v))
    }

    /// Checks every stored top-K row, `indices (rows, k)` with these `rows * (k - 1)` weights,
    /// by the one rule of `crate::stored_topk`; the first bad row and why.
    pub(crate) fn check_rows(
        &self,
        indices: &[i64],
        k: usize,
        num_vectors: usize,
    ) -> Result<(), (usize, RowProblem)> {
        with_slice!(self, v => stored_topk::check_rows(indices, v, k, num_vectors))
    }
}

fn first_non_finite<T: Element>(values: &[T]) -> Option<(usize, f32)> {
    values
        .iter()
        .map(|v| v.to_f32())
        .enumerate()
        .find(|(_, x)| !x.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_in_every_dtype() {
        let xs = [0.5_f32, -1.25, 3.0e-3];
        let cases = [
            FloatData::F32(Cow::Owned(xs.to_vec())),
            FloatData::F16(Cow::Owned(xs.iter().map(|&x| f16::from_f32(x)).collect())),
            FloatData::BF16(Cow::Owned(xs.iter().map(|&x| bf16::from_f32(x)).collect())),
        ];
        for data in cases {
            let bytes = data.le_bytes();
            // Decoding does not rely on alignment: read it from an odd offset too.
            let mut shifted = vec![0_u8];
            shifted.extend_from_slice(&bytes);
            let back = FloatData::from_le_bytes(data.dtype(), &shifted[1..]).unwrap();
            assert_eq!(back, data);
            assert_eq!(back.len(), 3);
        }
        assert_eq!(FloatData::from_le_bytes(Dtype::I32, &[0; 4]), None);
        assert_eq!(
            FloatData::F32(Cow::Owned(vec![1.0])).le_bytes().as_ref(),
            &1.0_f32.to_le_bytes()
        );
    }

    #[test]
    fn rows_are_checked_in_every_dtype() {
        let ok = FloatData::F32(Cow::Owned(vec![0.5, 0.25]));
        assert_eq!(ok.check_rows(&[0, 1, 2, 3], 2, 4), Ok(()));
        let bf = FloatData::BF16(Cow::Owned(vec![bf16::from_f32(0.5), bf16::from_f32(-2.0)]));
        assert_eq!(
            bf.check_rows(&[0, 1, 2, 3], 2, 4),
            Err((1, RowProblem::Negative { value: -2.0 }))
        );
        let half = FloatData::F16(Cow::Owned(vec![f16::from_f32(0.5)]));
        assert_eq!(
            half.check_rows(&[1, 1], 2, 4),
            Err((0, RowProblem::RepeatedIndex { value: 1 }))
        );
    }

    #[test]
    fn non_finite_values_are_found() {
        let data = FloatData::F16(Cow::Owned(vec![f16::ONE, f16::NEG_INFINITY]));
        assert_eq!(data.first_non_finite(), Some((1, f32::NEG_INFINITY)));
        assert_eq!(
            FloatData::F32(Cow::Owned(vec![1.0])).first_non_finite(),
            None
        );
    }
}
