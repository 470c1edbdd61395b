//! Low-rank factor rows as weighted sums of vector-bank rows:
//! `out[i, :] = sum_{j in 0..k} w[i, j] * bank[idx[i, j], :]`, summed in `f32` from `0.0` in
//! order `j`, the bank converted to `f32` per element.
//!
//! The fused entry point selects each row's top-k and gathers straight away, so nothing of size
//! `rows * num_vectors` is ever allocated (PEFT builds a dense `(rows, k, L)` gather first).

use crate::element::{Element, CHUNK};
use crate::error::{Dim, KernelError};
use crate::matrix::MatRef;
use crate::simd::{dispatch, level_wrappers, Level};
use crate::threads;
use crate::topk::{
    self, dispatch_prefetch, portable_scan, run_tasks, Prefetch, Scan, Selector, ROWS_PER_TASK,
};
#[cfg(target_arch = "x86_64")]
use crate::topk::{avx2_scan, avx512_scan};

/// `out = sum_j w[j] * bank[vecs[j]]` (from `0.0`, `j` in order), column chunk by column chunk:
/// the sum builds in a stack buffer and `out` is only written, never read. Reading first
/// would fault each fresh zero page of the output in read-only, then fault it again on the write
/// and shoot down the other threads' TLB entries: with two threads that made the kernel slower
/// than with one.
#[inline(always)]
fn gather_row<B: Element>(
    out: &mut [f32],
    w: &[f32],
    vecs: &[usize],
    bank: MatRef<'_, B>,
    buf: &mut [f32],
) {
    let mut acc = [0.0_f32; CHUNK];
    for (c, out) in out.chunks_mut(CHUNK).enumerate() {
        let start = c * CHUNK;
        let acc = &mut acc[..out.len()];
        acc.fill(0.0);
        for (&w, &v) in w.iter().zip(vecs) {
            let src = &bank.row(v)[start..start + acc.len()];
            let b = B::widen(src, buf);
            for (a, &x) in acc.iter_mut().zip(b) {
                *a += w * x;
            }
        }
        out.copy_from_slice(acc);
    }
}

/// One task's rows (`first..`) of [`low_rank_from_topk`]: `check_row` validates a row's indices
/// into `vecs`; returns the first error.
#[inline(always)]
fn gather_rows<B: Element>(
    out: &mut [f32],
    first: usize,
    k: usize,
    check_row: &impl Fn(usize, &mut Vec<usize>) -> Result<(), KernelError>,
    weights: MatRef<'_, f32>,
    bank: MatRef<'_, B>,
) -> Option<KernelError> {
    let mut buf = vec![0.0_f32; CHUNK];
    let mut vecs = Vec::with_capacity(k);
    for (r, out_row) in out.chunks_mut(bank.cols()).enumerate() {
        let row = first + r;
        if let Err(e) = check_row(row, &mut vecs) {
            return Some(e);
        }
        gather_row(out_row, weights.row(row), &vecs, bank, &mut buf);
    }
    None
}

level_wrappers! {
    /// [`gather_rows`] compiled for the level.
    fn gather_rows_avx2, gather_rows_avx512 [B: Element] (
        out: &mut [f32],
        first: usize,
        k: usize,
        check_row: &impl Fn(usize, &mut Vec<usize>) -> Result<(), KernelError>,
        weights: MatRef<'_, f32>,
        bank: MatRef<'_, B>,
    ) -> Option<KernelError> {
        avx2: gather_rows(out, first, k, check_row, weights, bank),
        avx512: gather_rows(out, first, k, check_row, weights, bank),
    }
}

/// `(rows, L)` from `indices (rows, k)` and `weights (rows, k)` against `bank (num_vectors, L)`.
/// An index outside `[0, num_vectors)` is an error naming the first such row.
pub fn low_rank_from_topk<B: Element>(
    indices: MatRef<'_, i64>,
    weights: MatRef<'_, f32>,
    bank: MatRef<'_, B>,
    num_threads: usize,
) -> Result<Vec<f32>, KernelError> {
    low_rank_from_topk_at(Level::detected(), indices, weights, bank, num_threads)
}

pub(crate) fn low_rank_from_topk_at<B: Element>(
    level: Level,
    indices: MatRef<'_, i64>,
    weights: MatRef<'_, f32>,
    bank: MatRef<'_, B>,
    num_threads: usize,
) -> Result<Vec<f32>, KernelError> {
    for (dim, expected, got) in [
        (Dim::Rows, indices.rows(), weights.rows()),
        (Dim::Columns, indices.cols(), weights.cols()),
    ] {
        if got != expected {
            return Err(KernelError::Shape {
                arg: "weights",
                shape: weights.shape(),
                other: "indices",
                dim,
                expected,
            });
        }
    }
    let rows = indices.rows();
    let (num_vectors, len) = bank.shape();
    // Row `row`'s indices as `usize` into `vecs`, or the error for its first bad one.
    let check_row = |row: usize, vecs: &mut Vec<usize>| {
        vecs.clear();
        for &v in indices.row(row) {
            match usize::try_from(v) {
                Ok(v) if v < num_vectors => vecs.push(v),
                _ => {
                    return Err(KernelError::Index {
                        arg: "indices",
                        row,
                        value: v,
                        bound: num_vectors,
                    })
                }
            }
        }
        Ok(())
    };
    let mut out = vec![0.0_f32; rows * len];
    if len == 0 {
        let mut vecs = Vec::new();
        return (0..rows)
            .try_for_each(|row| check_row(row, &mut vecs))
            .map(|()| out);
    }
    let tasks = out.chunks_mut(ROWS_PER_TASK * len).enumerate().collect();
    let failed = threads::first_some(num_threads, tasks, |(task, out)| {
        let first = task * ROWS_PER_TASK;
        dispatch!(
            level,
            gather_rows(out, first, indices.cols(), &check_row, weights, bank),
            gather_rows_avx2(out, first, indices.cols(), &check_row, weights, bank),
            gather_rows_avx512(out, first, indices.cols(), &check_row, weights, bank)
        )
    })?;
    failed.map_or(Ok(out), Err)
}

/// One task's rows (`first..`) of [`low_rank_from_logits`]; returns the first row holding a NaN.
#[inline(always)]
fn select_gather_rows<T: Element, B: Element>(
    out: &mut [f32],
    first: usize,
    logits: MatRef<'_, T>,
    bank: MatRef<'_, B>,
    k: usize,
    scan: impl Scan,
) -> Option<usize> {
    let mut sel = Selector::new(k);
    let mut w = vec![0.0_f32; k];
    let mut buf = vec![0.0_f32; CHUNK];
    for (r, out_row) in out.chunks_mut(bank.cols()).enumerate() {
        let row = first + r;
        let next = logits.row((row + 2).min(logits.rows() - 1));
        if sel.select(logits.row(row), next, scan).is_err() {
            return Some(row);
        }
        sel.softmax_into(&mut w);
        gather_row(out_row, &w, sel.indices(), bank, &mut buf);
    }
    None
}

level_wrappers! {
    /// [`select_gather_rows`] with the level's [`Scan`], prefetching the row after next if
    /// `PREFETCH`.
    fn select_gather_rows_avx2, select_gather_rows_avx512 [T: Element, B: Element, const PREFETCH: bool] (
        out: &mut [f32],
        first: usize,
        logits: MatRef<'_, T>,
        bank: MatRef<'_, B>,
        k: usize,
    ) -> Option<usize> {
        avx2: select_gather_rows(out, first, logits, bank, k, avx2_scan::<PREFETCH>()),
        avx512: select_gather_rows(out, first, logits, bank, k, avx512_scan::<PREFETCH>()),
    }
}

/// Fused top-`k` + softmax + gather: `(rows, L)` from `logits (rows, num_vectors)` and
/// `bank (num_vectors, L)`. A NaN logit is an error naming the first such row.
pub fn low_rank_from_logits<T: Element, B: Element>(
    logits: MatRef<'_, T>,
    bank: MatRef<'_, B>,
    k: usize,
    num_threads: usize,
) -> Result<Vec<f32>, KernelError> {
    low_rank_from_logits_at(Level::detected(), None, logits, bank, k, num_threads)
}

/// [`low_rank_from_logits`] at `level`, with the top-k prefetch variant `prefetch` (None: the
/// process's).
pub(crate) fn low_rank_from_logits_at<T: Element, B: Element>(
    level: Level,
    prefetch: Option<Prefetch>,
    logits: MatRef<'_, T>,
    bank: MatRef<'_, B>,
    k: usize,
    num_threads: usize,
) -> Result<Vec<f32>, KernelError> {
    if logits.cols() != bank.rows() {
        return Err(KernelError::Shape {
            arg: "logits",
            shape: logits.shape(),
            other: "bank",
            dim: Dim::Rows,
            expected: bank.rows(),
        });
    }
    topk::check_k(k, logits.cols())?;
    let rows = logits.rows();
    let len = bank.cols();
    if len == 0 {
        // Nothing to gather, but the logits are still validated.
        topk::topk_softmax_at(level, prefetch, logits, k, num_threads)?;
        return Ok(Vec::new());
    }
    let mut out = vec![0.0_f32; rows * len];
    let tasks = out.chunks_mut(ROWS_PER_TASK * len).enumerate().collect();
    let bytes = rows * logits.cols() * std::mem::size_of::<T>();
    let measurable = level != Level::Portable;
    let failed = run_tasks(
        num_threads,
        tasks,
        bytes,
        measurable,
        prefetch,
        |(task, out), pf| {
            let first = task * ROWS_PER_TASK;
            dispatch_prefetch!(
                level,
                pf,
                select_gather_rows(out, first, logits, bank, k, portable_scan()),
                |PF| select_gather_rows_avx2::<T, B, PF>(out, first, logits, bank, k),
                select_gather_rows_avx512::<T, B, PF>(out, first, logits, bank, k)
            )
        },
    )?;
    match failed {
        Some(row) => Err(KernelError::Nan { arg: "logits", row }),
        None => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::uniform;
    use crate::topk::tests::reference as topk_reference;
    use half::{bf16, f16};
    use proptest::prelude::*;

    fn bits(r: &Result<Vec<f32>, KernelError>) -> Result<Vec<u32>, KernelError> {
        r.clone().map(|v| v.iter().map(|x| x.to_bits()).collect())
    }

    /// Shadows the public function: runs every available SIMD level, with and without the
    /// top-k prefetch, and checks they agree.
    fn low_rank_from_logits<T: Element, B: Element>(
        logits: MatRef<'_, T>,
        bank: MatRef<'_, B>,
        k: usize,
        threads: usize,
    ) -> Result<Vec<f32>, KernelError> {
        let mut all = Level::available().into_iter().flat_map(|level| {
            [Prefetch::Off, Prefetch::On]
                .map(|pf| low_rank_from_logits_at(level, Some(pf), logits, bank, k, threads))
        });
        let first = all.next().unwrap();
        all.for_each(|other| assert_eq!(bits(&other), bits(&first)));
        first
    }

    /// Shadows the public function: runs every available SIMD level and checks they agree.
    fn low_rank_from_topk<B: Element>(
        indices: MatRef<'_, i64>,
        weights: MatRef<'_, f32>,
        bank: MatRef<'_, B>,
        threads: usize,
    ) -> Result<Vec<f32>, KernelError> {
        let mut all = Level::available()
            .into_iter()
            .map(|level| low_rank_from_topk_at(level, indices, weights, bank, threads));
        let first = all.next().unwrap();
        all.for_each(|other| assert_eq!(bits(&other), bits(&first)));
        first
    }

    fn reference<B: Element>(idx: &[i64], w: &[f32], k: usize, bank: &[B], len: usize) -> Vec<f32> {
        let rows = idx.len().checked_div(k).unwrap_or(0);
        let mut out = vec![0.0_f32; rows * len];
        for i in 0..rows {
            for c in 0..len {
                let mut acc = 0.0_f32;
                for j in 0..k {
                    let v = idx[i * k + j] as usize;
                    acc += w[i * k + j] * bank[v * len + c].to_f32();
                }
                out[i * len + c] = acc;
            }
        }
        out
    }

    fn check_fused<B: Element>(
        rows: usize,
        nv: usize,
        len: usize,
        k: usize,
        threads: usize,
        seed: u64,
    ) {
        let logits = uniform(seed, rows * nv, 1.0);
        let bank: Vec<B> = uniform(seed + 1, nv * len, 1.0)
            .into_iter()
            .map(B::from_f32)
            .collect();
        let (idx, w) = topk_reference(&logits, nv, k).unwrap();
        let want = reference(&idx, &w, k, &bank, len);
        let l = MatRef::new("logits", &logits, rows, nv).unwrap();
        let b = MatRef::new("bank", &bank, nv, len).unwrap();
        let got = low_rank_from_logits(l, b, k, threads).unwrap();
        assert_eq!(got, want, "fused rows={rows} nv={nv} len={len} k={k}");
        let i = MatRef::new("indices", &idx, rows, k).unwrap();
        let wm = MatRef::new("weights", &w, rows, k).unwrap();
        let got = low_rank_from_topk(i, wm, b, threads).unwrap();
        assert_eq!(got, want, "from topk rows={rows} nv={nv} len={len} k={k}");
    }

    #[test]
    fn matches_reference_for_all_bank_types() {
        for (rows, nv, len, k) in [
            (1, 1, 1, 1),
            (130, 256, 256, 2),
            (67, 33, 300, 33),
            (5, 9, 513, 9),
        ] {
            for threads in [1, 2] {
                check_fused::<f32>(rows, nv, len, k, threads, 1);
                check_fused::<f16>(rows, nv, len, k, threads, 2);
                check_fused::<bf16>(rows, nv, len, k, threads, 3);
            }
        }
    }

    #[test]
    fn bad_index_names_first_row() {
        let bank = uniform(0, 256 * 4, 1.0);
        let b = MatRef::new("bank", &bank, 256, 4).unwrap();
        let mut idx = vec![0_i64; 200 * 2];
        idx[3 * 2 + 1] = 300;
        idx[150 * 2] = -1;
        let w = vec![0.5_f32; 400];
        let i = MatRef::new("indices", &idx, 200, 2).unwrap();
        let wm = MatRef::new("weights", &w, 200, 2).unwrap();
        for threads in [1, 2] {
            let err = low_rank_from_topk(i, wm, b, threads).unwrap_err();
            assert_eq!(err.to_string(), "indices row 3 holds 300, outside [0, 256)");
        }
        idx[3 * 2 + 1] = 0;
        let i = MatRef::new("indices", &idx, 200, 2).unwrap();
        let err = low_rank_from_topk(i, wm, b, 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "indices row 150 holds -1, outside [0, 256)"
        );
        let empty = MatRef::<f32>::new("bank", &[], 256, 0).unwrap();
        assert_eq!(
            low_rank_from_topk(i, wm, empty, 1).unwrap_err().to_string(),
            err.to_string()
        );
    }

    #[test]
    fn shape_errors() {
        let bank = uniform(0, 10 * 4, 1.0);
        let b = MatRef::new("bank", &bank, 10, 4).unwrap();
        let logits = uniform(1, 3 * 11, 1.0);
        let l = MatRef::new("logits", &logits, 3, 11).unwrap();
        assert_eq!(
            low_rank_from_logits(l, b, 2, 1).unwrap_err().to_string(),
            "logits has shape (3, 11) but bank has 10 rows"
        );
        let l = MatRef::new("logits", &logits[..30], 3, 10).unwrap();
        assert_eq!(
            low_rank_from_logits(l, b, 11, 1).unwrap_err(),
            KernelError::TopK { k: 11, n: 10 }
        );
        let idx = vec![0_i64; 6];
        let w = vec![0.0_f32; 6];
        let i = MatRef::new("indices", &idx, 3, 2).unwrap();
        let wm = MatRef::new("weights", &w, 2, 3).unwrap();
        assert_eq!(
            low_rank_from_topk(i, wm, b, 1).unwrap_err().to_string(),
            "weights has shape (2, 3) but indices has 3 rows"
        );
        let wm = MatRef::new("weights", &w, 3, 2).unwrap();
        assert_eq!(low_rank_from_topk(i, wm, b, 1).unwrap(), vec![0.0; 12]);
    }

    #[test]
    fn nan_logits_and_empty_shapes() {
        let bank = uniform(0, 300 * 4, 1.0);
        let mut logits = uniform(1, 100 * 300, 1.0);
        logits[70 * 300 + 299] = f32::NAN;
        let l = MatRef::new("logits", &logits, 100, 300).unwrap();
        let b = MatRef::new("bank", &bank, 300, 4).unwrap();
        assert_eq!(
            low_rank_from_logits(l, b, 2, 2).unwrap_err().to_string(),
            "logits row 70 contains NaN"
        );
        let empty = MatRef::<f32>::new("bank", &[], 300, 0).unwrap();
        assert_eq!(
            low_rank_from_logits(l, empty, 2, 2)
                .unwrap_err()
                .to_string(),
            "logits row 70 contains NaN"
        );
        let no_rows = MatRef::<f32>::new("logits", &[], 0, 300).unwrap();
        assert!(low_rank_from_logits(no_rows, b, 2, 2).unwrap().is_empty());
        // k = 0 from precomputed top-k: an empty sum is zero.
        let i = MatRef::<i64>::new("indices", &[], 3, 0).unwrap();
        let w = MatRef::<f32>::new("weights", &[], 3, 0).unwrap();
        assert_eq!(low_rank_from_topk(i, w, b, 1).unwrap(), vec![0.0; 12]);
    }

    proptest! {
        #[test]
        fn fused_matches_reference(
            rows in 0usize..140,
            nv in 1usize..300,
            len in 1usize..600,
            kfrac in 0.0f64..1.0,
            seed in any::<u64>(),
            threads in 1usize..4,
        ) {
            let k = (1 + (kfrac * nv.min(40) as f64) as usize).min(nv);
            let logits = uniform(seed, rows * nv, 1.0);
            let bank = uniform(seed ^ 7, nv * len, 1.0);
            let (idx, w) = topk_reference(&logits, nv, k).unwrap();
            let want = reference(&idx, &w, k, &bank, len);
            let l = MatRef::new("logits", &logits, rows, nv).unwrap();
            let b = MatRef::new("bank", &bank, nv, len).unwrap();
            prop_assert_eq!(low_rank_from_logits(l, b, k, threads).unwrap(), want.clone());
            let i = MatRef::new("indices", &idx, rows, k).unwrap();
            let wm = MatRef::new("weights", &w, rows, k).unwrap();
            prop_assert_eq!(low_rank_from_topk(i, wm, b, threads).unwrap(), want);
        }
    }
}
