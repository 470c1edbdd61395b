//! Per-row top-k selection and softmax of the kept logits.
//!
//! Indices are exactly those of `torch.topk(x, k, dim=-1, largest=True, sorted=True)` on CPU,
//! ties included. torch (`topk_impl_loop`) fills a queue of `(value as f32, column)` pairs and,
//! with `comp(a, b) = a.value > b.value`, runs libstdc++'s `std::partial_sort(q, q + k, end)`
//! when `k * 64 <= n`, else `std::nth_element(q, q + k - 1, end)` then
//! `std::sort(q, q + k - 1)`, and returns `q[..k]`. Which of several equal logits wins, and in
//! what order, is whatever those algorithms happen to do, so `stl` ports them step for step.
//!
//! The softmax (`softmax`) follows torch's kernel step by step, `m = max kept`,
//! `e_j = exp(x_j - m)`, `w_j = e_j * (1 / sum(e))`, so a row whose kept logits are all `-inf`
//! gives NaN weights, as torch does. A NaN logit is an error naming its row.
//!
//! Parts: `scan` (the vector building blocks per SIMD level), `stl` (the port of torch's
//! selection order), `selector` (one row: a fast path exact for rows whose top `k` values are
//! distinct, else the streamed heap select or `nth_element`), this file (rows in parallel).
//! Whether the first pass prefetches the row after next is measured per CPU (`prefetch`); why
//! the scan is shaped as it is, with the measurements, is in `docs/kernels.md`.

mod prefetch;
mod scan;
mod selector;
pub(crate) mod softmax;
pub(crate) mod stl;
#[cfg(test)]
pub(crate) mod tests;

pub use prefetch::topk_prefetch;
pub(crate) use prefetch::{run_tasks, Prefetch};
#[cfg(target_arch = "x86_64")]
pub(crate) use scan::{avx2_scan, avx512_scan};
pub(crate) use scan::{portable_scan, Scan};
pub(crate) use selector::Selector;

use crate::element::Element;
use crate::error::KernelError;
use crate::matrix::MatRef;
use crate::simd::{level_wrappers, Level};

/// [`dispatch!`] at `$level` with the prefetch variant `$pf` (a [`Prefetch`]) as the const
/// `$c` the AVX2 and AVX-512 calls name (the portable scan never prefetches).
macro_rules! dispatch_prefetch {
    ($level:expr, $pf:expr, $portable:expr, |$c:ident| $avx2:expr, $avx512:expr) => {
        match $pf {
            $crate::topk::Prefetch::Off => {
                const $c: bool = false;
                $crate::simd::dispatch!($level, $portable, $avx2, $avx512)
            }
            $crate::topk::Prefetch::On => {
                const $c: bool = true;
                $crate::simd::dispatch!($level, $portable, $avx2, $avx512)
            }
        }
    };
}
pub(crate) use dispatch_prefetch;

/// Rows handed to one rayon task.
pub(crate) const ROWS_PER_TASK: usize = 64;

/// Checks `1 <= k <= n`.
pub(crate) fn check_k(k: usize, n: usize) -> Result<(), KernelError> {
    if (1..=n).contains(&k) {
        Ok(())
    } else {
        Err(KernelError::TopK { k, n })
    }
}

/// One task's rows (`first_row..`), writing `k` indices and weights per row; returns the first
/// row holding a NaN, if any.
#[inline(always)]
fn topk_rows<T: Element>(
    logits: MatRef<'_, T>,
    k: usize,
    first_row: usize,
    idx_out: &mut [i64],
    w_out: &mut [f32],
    kept_logits: bool,
    scan: impl Scan,
) -> Option<usize> {
    let mut sel = Selector::new(k);
    for (r, (idx_row, w_row)) in idx_out.chunks_mut(k).zip(w_out.chunks_mut(k)).enumerate() {
        let row = first_row + r;
        let next = logits.row((row + 2).min(logits.rows() - 1));
        if sel.select(logits.row(row), next, scan).is_err() {
            return Some(row);
        }
        for (o, &i) in idx_row.iter_mut().zip(sel.indices()) {
            // A column index is below the row length, itself a slice length, so it fits.
            *o = i as i64;
        }
        if kept_logits {
            sel.values_into(w_row);
        } else {
            sel.softmax_into(w_row);
        }
    }
    None
}

level_wrappers! {
    /// [`topk_rows`] with the level's [`Scan`], prefetching the row after next if `PREFETCH`.
    fn topk_rows_avx2, topk_rows_avx512 [T: Element, const PREFETCH: bool] (
        logits: MatRef<'_, T>,
        k: usize,
        first_row: usize,
        idx_out: &mut [i64],
        w_out: &mut [f32],
        kept_logits: bool,
    ) -> Option<usize> {
        avx2: topk_rows(logits, k, first_row, idx_out, w_out, kept_logits, avx2_scan::<PREFETCH>()),
        avx512: topk_rows(logits, k, first_row, idx_out, w_out, kept_logits, avx512_scan::<PREFETCH>()),
    }
}

/// Top-`k` indices (largest first, in `torch.topk`'s CPU order, ties included) and their softmax
/// weights for each row of `logits`, on `num_threads` threads (0: all cores). Returns
/// `(indices, weights)`, each `(rows, k)` row-major.
pub fn topk_softmax<T: Element>(
    logits: MatRef<'_, T>,
    k: usize,
    num_threads: usize,
) -> Result<(Vec<i64>, Vec<f32>), KernelError> {
    topk_softmax_at(Level::detected(), None, logits, k, num_threads)
}

/// [`topk_softmax`] at `level`, with the prefetch variant `prefetch` (None: the process's).
pub(crate) fn topk_softmax_at<T: Element>(
    level: Level,
    prefetch: Option<Prefetch>,
    logits: MatRef<'_, T>,
    k: usize,
    num_threads: usize,
) -> Result<(Vec<i64>, Vec<f32>), KernelError> {
    topk_many_at(level, prefetch, &[logits], k, false, num_threads)
}

/// [`topk_softmax`] of several matrices in one call, their rows concatenated in order in the
/// output (a NaN's row is counted across them). One hand-off to the thread pool for all: an
/// adapter has hundreds of small logits matrices (64 rows for a 4096-wide A at r = 4), and a
/// call each cost more in pool hand-offs and Python than the selection itself.
pub fn topk_softmax_many<T: Element>(
    mats: &[MatRef<'_, T>],
    k: usize,
    num_threads: usize,
) -> Result<(Vec<i64>, Vec<f32>), KernelError> {
    topk_many_at(Level::detected(), None, mats, k, false, num_threads)
}

/// Like [`topk_softmax_many`], but the second output holds the kept logits themselves (widened to
/// `f32`, exact) instead of their softmax: for callers that weigh them with another softmax
/// (torch's, for bit parity with PEFT).
pub fn topk_kept_many<T: Element>(
    mats: &[MatRef<'_, T>],
    k: usize,
    num_threads: usize,
) -> Result<(Vec<i64>, Vec<f32>), KernelError> {
    topk_many_at(Level::detected(), None, mats, k, true, num_threads)
}

fn topk_many_at<T: Element>(
    level: Level,
    prefetch: Option<Prefetch>,
    mats: &[MatRef<'_, T>],
    k: usize,
    kept_logits: bool,
    num_threads: usize,
) -> Result<(Vec<i64>, Vec<f32>), KernelError> {
    for logits in mats {
        check_k(k, logits.cols())?;
    }
    let total: usize = mats.iter().map(MatRef::rows).sum();
    let mut indices = vec![0_i64; total * k];
    let mut weights = vec![0.0_f32; total * k];
    // One flat list of tasks (up to ROWS_PER_TASK rows of one matrix each, with their slices of the
    // output) for one parallel pass: a fork-join per matrix cost ~20 us each, 9 ms for 448 matrices.
    let mut tasks = Vec::with_capacity(total / ROWS_PER_TASK + mats.len());
    let (mut idx_rest, mut w_rest) = (&mut indices[..], &mut weights[..]);
    let mut before = 0;
    for &logits in mats {
        for first in (0..logits.rows()).step_by(ROWS_PER_TASK) {
            let n = ROWS_PER_TASK.min(logits.rows() - first) * k;
            let (idx, idx_tail) = std::mem::take(&mut idx_rest).split_at_mut(n);
            let (w, w_tail) = std::mem::take(&mut w_rest).split_at_mut(n);
            (idx_rest, w_rest) = (idx_tail, w_tail);
            tasks.push((logits, first, before, idx, w));
        }
        before += logits.rows();
    }
    let bytes: usize = mats
        .iter()
        .map(|m| m.rows() * m.cols() * std::mem::size_of::<T>())
        .sum();
    let measurable = level != Level::Portable;
    let failed = run_tasks(
        num_threads,
        tasks,
        bytes,
        measurable,
        prefetch,
        |(logits, first, before, idx, w), pf| {
            let failed = dispatch_prefetch!(
                level,
                pf,
                topk_rows(logits, k, first, idx, w, kept_logits, portable_scan()),
                |PF| topk_rows_avx2::<T, PF>(logits, k, first, idx, w, kept_logits),
                topk_rows_avx512::<T, PF>(logits, k, first, idx, w, kept_logits)
            );
            failed.map(|row| before + row)
        },
    )?;
    match failed {
        Some(row) => Err(KernelError::Nan { arg: "logits", row }),
        None => Ok((indices, weights)),
    }
}
