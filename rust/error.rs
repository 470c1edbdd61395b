//! The one error type of the kernels. Messages name the argument and, for data errors, the row;
//! the Python binding passes them through unchanged as `VBLoRAError`.

use std::fmt;

/// Which dimension of another argument a shape is compared against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Rows,
    Columns,
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dim::Rows => "rows",
            Dim::Columns => "columns",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// A buffer's length is not `rows * cols`.
    Length {
        arg: &'static str,
        len: usize,
        rows: usize,
        cols: usize,
    },
    /// `arg` of shape `shape` does not fit `other`'s `dim`, which is `expected`.
    Shape {
        arg: &'static str,
        shape: (usize, usize),
        other: &'static str,
        dim: Dim,
        expected: usize,
    },
    /// `k` outside `1..=n`.
    TopK { k: usize, n: usize },
    /// A NaN in row `row` of `arg`.
    Nan { arg: &'static str, row: usize },
    /// The arrays passed as `arg` do not all have the same dtype.
    Mixed { arg: &'static str },
    /// An index outside `[0, bound)` in row `row` of `arg`.
    Index {
        arg: &'static str,
        row: usize,
        value: i64,
        bound: usize,
    },
    /// A finite value of `arg` became infinite or NaN at `(row, col)`: the result overflows `dtype`.
    Overflow {
        arg: &'static str,
        row: usize,
        col: usize,
        dtype: &'static str,
    },
    /// The thread pool could not be built.
    ThreadPool(String),
    /// The OpenMP runtime at `path` cannot run the kernels (`why`).
    OpenMp { path: String, why: &'static str },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::Length {
                arg,
                len,
                rows,
                cols,
            } => write!(
                f,
                "{arg} holds {len} elements, but its shape ({rows}, {cols}) needs {}",
                rows.saturating_mul(*cols)
            ),
            KernelError::Shape {
                arg,
                shape,
                other,
                dim,
                expected,
            } => write!(
                f,
                "{arg} has shape ({}, {}) but {other} has {expected} {dim}",
                shape.0, shape.1
            ),
            KernelError::TopK { k, n } => write!(
                f,
                "k = {k} must satisfy 1 <= k <= {n}, the number of logits columns"
            ),
            KernelError::Nan { arg, row } => write!(f, "{arg} row {row} contains NaN"),
            KernelError::Mixed { arg } => {
                write!(f, "every array of {arg} must have the same dtype")
            }
            KernelError::Index {
                arg,
                row,
                value,
                bound,
            } => write!(f, "{arg} row {row} holds {value}, outside [0, {bound})"),
            KernelError::Overflow {
                arg,
                row,
                col,
                dtype,
            } => write!(
                f,
                "{arg} at ({row}, {col}) is finite but its merged value is not: the result overflows {dtype}"
            ),
            KernelError::ThreadPool(msg) => write!(f, "could not build the thread pool: {msg}"),
            KernelError::OpenMp { path, why } => {
                write!(f, "cannot use the OpenMP runtime {path}: {why}")
            }
        }
    }
}

impl std::error::Error for KernelError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_argument_and_row() {
        let e = KernelError::Nan {
            arg: "logits",
            row: 17,
        };
        assert_eq!(e.to_string(), "logits row 17 contains NaN");
        let e = KernelError::Index {
            arg: "indices",
            row: 3,
            value: 300,
            bound: 256,
        };
        assert_eq!(e.to_string(), "indices row 3 holds 300, outside [0, 256)");
        let e = KernelError::Shape {
            arg: "u",
            shape: (8, 4),
            other: "weight",
            dim: Dim::Rows,
            expected: 10,
        };
        assert_eq!(e.to_string(), "u has shape (8, 4) but weight has 10 rows");
    }
}
