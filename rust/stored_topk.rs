//! THE validity rule of a stored top-K row, one for every reader (the packed file in
//! `crate::packed`, PEFT's `save_only_topk_weights` tensors in `crate::stream`, and the Python
//! loaders through `check_topk_rows`), so that what loads also packs and merges.
//!
//! A row holds `k` bank indices and the first `k - 1` softmax weights (the last is 1 minus their
//! sum). It is valid when:
//! * every index lies in `[0, num_vectors)`;
//! * no index repeats (PEFT saves the indices of `topk`, which are distinct; a repeat would make
//!   PEFT's dense logits keep only one of the entries, whichever its scatter writes last);
//! * every stored weight is finite and `>= 0` (`-0.0` passes);
//! * the stored weights sum, in f64, to at most `1 + SUM_TOLERANCE` (the last weight, 1 minus the
//!   sum, may be a rounding below 0 and then counts as 0).

use crate::element::Element;

/// How far above 1 the k-1 stored weights of a row may sum.
pub const SUM_TOLERANCE: f64 = 1e-6;

/// Rows up to this many indices check for repeats pairwise; longer ones sort a copy.
const PAIRWISE_MAX: usize = 16;

/// What is wrong with a row.
#[derive(Debug, Clone, PartialEq)]
pub enum RowProblem {
    IndexOutside { value: i64, bound: usize },
    RepeatedIndex { value: i64 },
    NonFinite { value: f32 },
    Negative { value: f32 },
    SumAboveOne { sum: f64 },
}

impl RowProblem {
    /// The reason, without the row (callers say where the row is).
    pub fn reason(&self) -> String {
        match self {
            RowProblem::IndexOutside { value, bound } => {
                format!("holds index {value}, outside [0, {bound})")
            }
            RowProblem::RepeatedIndex { value } => format!("repeats index {value}"),
            RowProblem::NonFinite { value } => {
                format!("holds weight {value}, weights must be finite")
            }
            RowProblem::Negative { value } => format!("holds weight {value}, weights must be >= 0"),
            RowProblem::SumAboveOne { sum } => format!(
                "has weights summing to {sum}, above 1 + {SUM_TOLERANCE} (the last weight, 1 minus \
                 that sum, would be negative)"
            ),
        }
    }

    /// Whether the problem is in the indices (else in the weights).
    pub fn in_indices(&self) -> bool {
        matches!(
            self,
            RowProblem::IndexOutside { .. } | RowProblem::RepeatedIndex { .. }
        )
    }
}

/// Checks one row's indices.
pub fn check_indices(indices: &[i64], num_vectors: usize) -> Result<(), RowProblem> {
    let bound = i64::try_from(num_vectors).unwrap_or(i64::MAX);
    if let Some(&value) = indices.iter().find(|&&i| i < 0 || i >= bound) {
        return Err(RowProblem::IndexOutside {
            value,
            bound: num_vectors,
        });
    }
    if indices.len() <= PAIRWISE_MAX {
        for j in 1..indices.len() {
            if indices[..j].contains(&indices[j]) {
                return Err(RowProblem::RepeatedIndex { value: indices[j] });
            }
        }
    } else {
        let mut sorted = indices.to_vec();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(RowProblem::RepeatedIndex { value: w[0] });
        }
    }
    Ok(())
}

/// Checks one row's `k - 1` stored weights.
pub fn check_weights<T: Element>(weights: &[T]) -> Result<(), RowProblem> {
    let mut sum = 0.0_f64;
    for w in weights {
        let value = w.to_f32();
        if !value.is_finite() {
            return Err(RowProblem::NonFinite { value });
        }
        if value < 0.0 {
            return Err(RowProblem::Negative { value });
        }
        sum += f64::from(value);
    }
    if sum > 1.0 + SUM_TOLERANCE {
        return Err(RowProblem::SumAboveOne { sum });
    }
    Ok(())
}

/// Checks `indices (rows, k)` and `weights (rows, k - 1)`, row-major; the first bad row and why.
/// Indices are checked before weights within a row. The lengths must match (`rows * k` and
/// `rows * (k - 1)`); `k` must be at least 1.
pub fn check_rows<T: Element>(
    indices: &[i64],
    weights: &[T],
    k: usize,
    num_vectors: usize,
) -> Result<(), (usize, RowProblem)> {
    assert!(k >= 1, "k must be at least 1");
    assert_eq!(indices.len() / k * (k - 1), weights.len(), "weights length");
    let width = k - 1;
    for (row, idx) in indices.chunks_exact(k).enumerate() {
        check_indices(idx, num_vectors).map_err(|p| (row, p))?;
        check_weights(&weights[row * width..(row + 1) * width]).map_err(|p| (row, p))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule() {
        assert_eq!(check_rows(&[0, 3], &[0.5_f32], 2, 4), Ok(()));
        assert_eq!(check_rows(&[0, 3], &[-0.0_f32], 2, 4), Ok(()));
        let bad = |i: &[i64], w: &[f32]| check_rows(i, w, 2, 4).unwrap_err();
        assert_eq!(
            bad(&[0, 1, 2, 4], &[0.5, 0.5]),
            (1, RowProblem::IndexOutside { value: 4, bound: 4 })
        );
        assert_eq!(
            bad(&[-1, 1], &[0.5]).1,
            RowProblem::IndexOutside {
                value: -1,
                bound: 4
            }
        );
        assert_eq!(
            bad(&[2, 2], &[0.5]).1,
            RowProblem::RepeatedIndex { value: 2 }
        );
        assert!(matches!(
            bad(&[0, 1], &[f32::NAN]).1,
            RowProblem::NonFinite { .. }
        ));
        assert_eq!(
            bad(&[0, 1], &[-0.25]).1,
            RowProblem::Negative { value: -0.25 }
        );
        assert!(matches!(
            bad(&[0, 1], &[1.001]).1,
            RowProblem::SumAboveOne { .. }
        ));
        // A sum a rounding above 1 passes.
        assert_eq!(
            check_rows(&[0, 1, 2], &[0.5_f32, 0.500_000_3], 3, 4),
            Ok(())
        );
    }

    #[test]
    fn long_rows_find_repeats_by_sorting() {
        let mut idx: Vec<i64> = (0..40).collect();
        assert_eq!(check_indices(&idx, 40), Ok(()));
        idx[39] = 7;
        assert_eq!(
            check_indices(&idx, 40),
            Err(RowProblem::RepeatedIndex { value: 7 })
        );
    }

    #[test]
    fn k_one_has_no_weights() {
        assert_eq!(check_rows::<f32>(&[3, 0], &[], 1, 4), Ok(()));
    }
}
