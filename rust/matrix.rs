//! Row-major 2-D views over flat slices, with the shape checked once at construction.

use crate::error::KernelError;

fn check_len(arg: &'static str, len: usize, rows: usize, cols: usize) -> Result<(), KernelError> {
    if rows.checked_mul(cols) == Some(len) {
        Ok(())
    } else {
        Err(KernelError::Length {
            arg,
            len,
            rows,
            cols,
        })
    }
}

/// A read-only `(rows, cols)` row-major matrix.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// Views `data` as `(rows, cols)`; `arg` names it in the error when `data.len() != rows * cols`.
    pub fn new(
        arg: &'static str,
        data: &'a [T],
        rows: usize,
        cols: usize,
    ) -> Result<Self, KernelError> {
        check_len(arg, data.len(), rows, cols)?;
        Ok(Self { data, rows, cols })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn data(&self) -> &'a [T] {
        self.data
    }

    /// Row `i`; panics when `i >= rows` (kernels only ask for validated rows).
    pub fn row(&self, i: usize) -> &'a [T] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// A mutable `(rows, cols)` row-major matrix.
#[derive(Debug)]
pub struct MatMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
}

impl<'a, T> MatMut<'a, T> {
    /// Views `data` as `(rows, cols)`; `arg` names it in the error when `data.len() != rows * cols`.
    pub fn new(
        arg: &'static str,
        data: &'a mut [T],
        rows: usize,
        cols: usize,
    ) -> Result<Self, KernelError> {
        check_len(arg, data.len(), rows, cols)?;
        Ok(Self { data, rows, cols })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn data_mut(&mut self) -> &mut [T] {
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_must_match_shape() {
        let data = [0.0_f32; 12];
        assert!(MatRef::new("x", &data, 3, 4).is_ok());
        let err = MatRef::new("x", &data, 5, 3).unwrap_err();
        assert_eq!(
            err.to_string(),
            "x holds 12 elements, but its shape (5, 3) needs 15"
        );
        assert!(MatRef::new("x", &data, usize::MAX, 2).is_err());
        assert_eq!(MatRef::new("x", &data, 3, 4).unwrap().row(2), &data[8..12]);
        assert!(MatRef::<f32>::new("x", &[], 7, 0).is_ok());
    }
}
