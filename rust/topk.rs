//! Per-row top-k selection and softmax of the kept logits.
//!
//! Indices come largest first; equal logits keep the lower index first. The softmax is torch's
//! formula, `m = max kept`, `e_j = exp(x_j - m)`, `w_j = e_j / sum(e)`, so a row whose kept logits
//! are all `-inf` gives NaN weights, as torch does. A NaN logit is an error naming its row.
//!
//! Small `k` (the VB-LoRA default is 2) streams each row once in chunks: a lane-wise max over the
//! chunk (vectorised, and it also detects NaN) decides whether the chunk can beat the current k-th
//! best at all; only chunks that can are walked element by element into a tiny sorted buffer. For
//! random logits nearly every chunk after the first is skipped, so the scan runs at memory speed.
//! Large `k` would make that buffer quadratic, so it sorts the row instead.

use rayon::prelude::*;

use crate::element::{Element, CHUNK};
use crate::error::KernelError;
use crate::matrix::MatRef;
use crate::threads;

/// Up to this `k` the streaming buffer is used; above it the row is partially sorted.
const STREAM_MAX_K: usize = 32;

/// Elements per second-level block of a chunk (see `Selector::stream`).
const BLOCK: usize = 32;

/// Rows handed to one rayon task.
pub(crate) const ROWS_PER_TASK: usize = 64;

/// Lane-wise max (NaN ignored) and whether any element is NaN, over eight independent lanes so
/// the compiler keeps the loop in vector registers. NaN is exactly "magnitude bits above those of
/// infinity", found branch-free as the sign of `INF_BITS - magnitude` OR-ed over the chunk:
/// `f32::is_nan` per lane, or an integer max, compiled to partly scalar code on SSE2.
#[inline]
fn max_and_nan(xs: &[f32]) -> (f32, bool) {
    const LANES: usize = 8;
    const MAGNITUDE: u32 = 0x7FFF_FFFF;
    const INF_BITS: u32 = 0x7F80_0000;
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut nan = [0_u32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            max[l] = if c[l] > max[l] { c[l] } else { max[l] };
            nan[l] |= INF_BITS.wrapping_sub(c[l].to_bits() & MAGNITUDE);
        }
    }
    for &x in chunks.remainder() {
        max[0] = if x > max[0] { x } else { max[0] };
        nan[0] |= INF_BITS.wrapping_sub(x.to_bits() & MAGNITUDE);
    }
    let m = max
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    let nan = nan.iter().fold(0, |a, &b| a | b);
    (m, nan >> 31 != 0)
}

/// The best `k <= STREAM_MAX_K` values seen so far, largest first, with their column indices, in
/// fixed arrays: inserting shifts a few registers' worth instead of calling `memmove`.
struct Kept {
    k: usize,
    len: usize,
    vals: [f32; STREAM_MAX_K],
    idx: [usize; STREAM_MAX_K],
}

impl Kept {
    /// Whether a value `x` would enter the kept set (always, while it holds fewer than `k`).
    #[inline(always)]
    fn admits(&self, x: f32) -> bool {
        self.len < self.k || x > self.vals[self.k - 1]
    }

    /// Offers every element of `xs` (column `start + j`) in order.
    #[inline]
    fn offer(&mut self, xs: &[f32], start: usize) {
        for (j, &x) in xs.iter().enumerate() {
            if !self.admits(x) {
                continue;
            }
            // When full, the old k-th value is overwritten. Strict `<` keeps an equal logit seen
            // earlier (the lower index) ahead of `x`.
            self.len = (self.len + 1).min(self.k);
            let mut p = self.len - 1;
            while p > 0 && self.vals[p - 1] < x {
                self.vals[p] = self.vals[p - 1];
                self.idx[p] = self.idx[p - 1];
                p -= 1;
            }
            self.vals[p] = x;
            self.idx[p] = start + j;
        }
    }
}

/// Reusable per-task state: selects the top `k` of one row at a time.
pub(crate) struct Selector {
    k: usize,
    /// Result for the last row: kept logits, largest first, and their column indices.
    vals: Vec<f32>,
    idx: Vec<usize>,
    /// Sort path only: every `(logit, column)` of the row.
    pairs: Vec<(f32, usize)>,
    buf: Vec<f32>,
}

/// The row held a NaN.
pub(crate) struct HasNan;

impl Selector {
    /// `k` must be in `1..=n` for the rows it will see (checked by the callers).
    pub(crate) fn new(k: usize) -> Self {
        Self {
            k,
            vals: Vec::with_capacity(k),
            idx: Vec::with_capacity(k),
            pairs: Vec::new(),
            buf: vec![0.0; CHUNK],
        }
    }

    /// Column indices of the last selected row, largest logit first.
    pub(crate) fn indices(&self) -> &[usize] {
        &self.idx
    }

    /// Selects the top `k` of `row` (which has at least `k` elements).
    pub(crate) fn select<T: Element>(&mut self, row: &[T]) -> Result<(), HasNan> {
        self.vals.clear();
        self.idx.clear();
        if self.k <= STREAM_MAX_K {
            self.stream(row)
        } else {
            self.sort(row)
        }
    }

    fn stream<T: Element>(&mut self, row: &[T]) -> Result<(), HasNan> {
        let mut kept = Kept {
            k: self.k,
            len: 0,
            vals: [0.0; STREAM_MAX_K],
            idx: [0; STREAM_MAX_K],
        };
        for (c, src) in row.chunks(CHUNK).enumerate() {
            let xs = T::widen(src, &mut self.buf);
            let (max, nan) = max_and_nan(xs);
            if nan {
                return Err(HasNan);
            }
            if kept.admits(max) {
                // Second level: most blocks of a chunk that holds a new top element cannot.
                for (b, block) in xs.chunks(BLOCK).enumerate() {
                    if kept.admits(max_and_nan(block).0) {
                        kept.offer(block, c * CHUNK + b * BLOCK);
                    }
                }
            }
        }
        self.vals.extend_from_slice(&kept.vals[..kept.len]);
        self.idx.extend_from_slice(&kept.idx[..kept.len]);
        Ok(())
    }

    fn sort<T: Element>(&mut self, row: &[T]) -> Result<(), HasNan> {
        self.pairs.clear();
        for (c, src) in row.chunks(CHUNK).enumerate() {
            let xs = T::widen(src, &mut self.buf);
            if max_and_nan(xs).1 {
                return Err(HasNan);
            }
            self.pairs
                .extend(xs.iter().enumerate().map(|(j, &x)| (x, c * CHUNK + j)));
        }
        // No NaN remains, so this is a strict total order: larger logit, then lower index.
        let order = |a: &(f32, usize), b: &(f32, usize)| {
            b.0.partial_cmp(&a.0)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.1.cmp(&b.1))
        };
        let k = self.k;
        if k < self.pairs.len() {
            self.pairs.select_nth_unstable_by(k - 1, order);
        }
        let top = &mut self.pairs[..k];
        top.sort_unstable_by(order);
        self.vals.extend(top.iter().map(|p| p.0));
        self.idx.extend(top.iter().map(|p| p.1));
        Ok(())
    }

    /// Softmax of the kept logits of the last selected row into `out` (length `k`).
    pub(crate) fn softmax_into(&self, out: &mut [f32]) {
        let vals = &self.vals;
        let max = vals[0];
        let mut sum = 0.0_f32;
        for (o, &x) in out.iter_mut().zip(vals) {
            *o = (x - max).exp();
            sum += *o;
        }
        for o in out.iter_mut() {
            *o /= sum;
        }
    }
}

/// Checks `1 <= k <= n`.
pub(crate) fn check_k(k: usize, n: usize) -> Result<(), KernelError> {
    if (1..=n).contains(&k) {
        Ok(())
    } else {
        Err(KernelError::TopK { k, n })
    }
}

/// Top-`k` indices (largest first, ties to the lower index) and their softmax weights for each
/// row of `logits`, on `num_threads` threads (0: all cores). Returns `(indices, weights)`, each
/// `(rows, k)` row-major.
pub fn topk_softmax<T: Element>(
    logits: MatRef<'_, T>,
    k: usize,
    num_threads: usize,
) -> Result<(Vec<i64>, Vec<f32>), KernelError> {
    check_k(k, logits.cols())?;
    let rows = logits.rows();
    let mut indices = vec![0_i64; rows * k];
    let mut weights = vec![0.0_f32; rows * k];
    let failed = threads::run(num_threads, || {
        indices
            .par_chunks_mut(ROWS_PER_TASK * k)
            .zip(weights.par_chunks_mut(ROWS_PER_TASK * k))
            .enumerate()
            .find_map_first(|(task, (idx_out, w_out))| {
                let mut sel = Selector::new(k);
                for (r, (idx_row, w_row)) in
                    idx_out.chunks_mut(k).zip(w_out.chunks_mut(k)).enumerate()
                {
                    let row = task * ROWS_PER_TASK + r;
                    if sel.select(logits.row(row)).is_err() {
                        return Some(row);
                    }
                    for (o, &i) in idx_row.iter_mut().zip(sel.indices()) {
                        // A column index is below the row length, itself a slice length, so it fits.
                        *o = i as i64;
                    }
                    sel.softmax_into(w_row);
                }
                None
            })
    })?;
    match failed {
        Some(row) => Err(KernelError::Nan { arg: "logits", row }),
        None => Ok((indices, weights)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use half::{bf16, f16};
    use proptest::prelude::*;

    /// Obviously-correct reference: stable sort of all columns by descending logit.
    pub(crate) fn reference(
        logits: &[f32],
        n: usize,
        k: usize,
    ) -> Result<(Vec<i64>, Vec<f32>), usize> {
        let mut indices = Vec::new();
        let mut weights = Vec::new();
        for (r, row) in logits.chunks(n).enumerate() {
            if row.iter().any(|x| x.is_nan()) {
                return Err(r);
            }
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap());
            let kept: Vec<f32> = order[..k].iter().map(|&i| row[i]).collect();
            let m = kept[0];
            let e: Vec<f32> = kept.iter().map(|&x| (x - m).exp()).collect();
            let mut s = 0.0_f32;
            for &x in &e {
                s += x;
            }
            indices.extend(order[..k].iter().map(|&i| i as i64));
            weights.extend(e.iter().map(|&x| x / s));
        }
        Ok((indices, weights))
    }

    fn assert_matches(logits: &[f32], n: usize, k: usize, threads: usize) {
        let rows = logits.len() / n;
        let got =
            topk_softmax(MatRef::new("logits", logits, rows, n).unwrap(), k, threads).unwrap();
        let want = reference(logits, n, k).unwrap();
        assert_eq!(got.0, want.0, "indices, n={n} k={k}");
        let same = got
            .1
            .iter()
            .zip(&want.1)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "weights {:?} != {:?}", got.1, want.1);
    }

    fn lcg(seed: u64, len: usize) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
            })
            .collect()
    }

    #[test]
    fn k1_k2_and_k_equal_n() {
        for &n in &[1, 7, 8, 255, 256, 257, 1000] {
            let x = lcg(n as u64, 5 * n);
            for &k in &[1, 2, 3, n] {
                if k <= n {
                    assert_matches(&x, n, k, 1);
                    assert_matches(&x, n, k, 2);
                }
            }
        }
    }

    #[test]
    fn large_k_uses_sort_path() {
        let n = 300;
        let x = lcg(9, 130 * n);
        for k in [33, 100, 299, 300] {
            assert_matches(&x, n, k, 2);
        }
    }

    #[test]
    fn ties_keep_lower_index_first() {
        let mut x = vec![0.0_f32; 600];
        x[10] = 5.0;
        x[500] = 5.0;
        x[300] = 5.0;
        x[3] = -0.0;
        let (idx, _) = topk_softmax(MatRef::new("logits", &x, 1, 600).unwrap(), 4, 1).unwrap();
        assert_eq!(idx, vec![10, 300, 500, 0]);
        let (idx, _) = topk_softmax(MatRef::new("logits", &x, 1, 600).unwrap(), 40, 1).unwrap();
        assert_eq!(&idx[..6], &[10, 300, 500, 0, 1, 2]);
        // Ascending rows insert every element; both paths must still be exact.
        let asc: Vec<f32> = (0..1000).map(|i| (i / 3) as f32).collect();
        assert_matches(&asc, 1000, 5, 1);
        assert_matches(&asc, 1000, 50, 1);
    }

    #[test]
    fn neg_inf_logits() {
        let ni = f32::NEG_INFINITY;
        let x = vec![ni, 1.0, ni, ni, 2.0, ni];
        let (idx, w) = topk_softmax(MatRef::new("logits", &x, 1, 6).unwrap(), 3, 1).unwrap();
        assert_eq!(idx, vec![4, 1, 0]);
        assert_eq!(w[2], 0.0);
        assert_matches(&x, 6, 3, 1);
        // All -inf: indices still defined (lowest first), weights NaN as in torch.
        let x = vec![ni; 2 * 300];
        let (idx, w) = topk_softmax(MatRef::new("logits", &x, 2, 300).unwrap(), 2, 2).unwrap();
        assert_eq!(idx, vec![0, 1, 0, 1]);
        assert!(w.iter().all(|w| w.is_nan()));
        let (idx, w) = topk_softmax(MatRef::new("logits", &x, 2, 300).unwrap(), 40, 2).unwrap();
        assert_eq!(&idx[..3], &[0, 1, 2]);
        assert!(w.iter().all(|w| w.is_nan()));
    }

    #[test]
    fn nan_is_an_error_naming_the_first_bad_row() {
        let mut x = lcg(3, 300 * 64);
        x[17 * 64 + 40] = f32::NAN;
        x[250 * 64 + 2] = f32::NAN;
        for k in [2, 40] {
            for threads in [1, 2] {
                let err = topk_softmax(MatRef::new("logits", &x, 300, 64).unwrap(), k, threads)
                    .unwrap_err();
                assert_eq!(err.to_string(), "logits row 17 contains NaN");
            }
        }
    }

    #[test]
    fn bad_k_and_empty_rows() {
        let x = [1.0_f32; 8];
        let m = MatRef::new("logits", &x[..], 2, 4).unwrap();
        assert_eq!(
            topk_softmax(m, 0, 1).unwrap_err(),
            KernelError::TopK { k: 0, n: 4 }
        );
        assert_eq!(
            topk_softmax(m, 5, 1).unwrap_err(),
            KernelError::TopK { k: 5, n: 4 }
        );
        let (i, w) = topk_softmax(MatRef::<f32>::new("logits", &[], 0, 4).unwrap(), 2, 1).unwrap();
        assert!(i.is_empty() && w.is_empty());
    }

    #[test]
    fn half_precision_logits() {
        let x = lcg(5, 40 * 333);
        let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let wide_h: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
        let wide_b: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        let got = topk_softmax(MatRef::new("logits", &xh, 40, 333).unwrap(), 2, 2).unwrap();
        assert_eq!(got, reference(&wide_h, 333, 2).unwrap());
        let got = topk_softmax(MatRef::new("logits", &xb, 40, 333).unwrap(), 3, 2).unwrap();
        assert_eq!(got, reference(&wide_b, 333, 3).unwrap());
    }

    proptest! {
        #[test]
        fn matches_reference(
            rows in 0usize..150,
            n in 1usize..600,
            kfrac in 0.0f64..1.0,
            small in any::<bool>(),
            coarse in any::<bool>(),
            seed in any::<u64>(),
            threads in 1usize..4,
        ) {
            // Coarse values make many ties; `small` favours the streaming path.
            let k = if small { 1 + (kfrac * n.min(STREAM_MAX_K) as f64) as usize } else { 1 + (kfrac * n as f64) as usize };
            let k = k.min(n);
            let mut x = lcg(seed, rows * n);
            if coarse {
                x.iter_mut().for_each(|v| *v = v.round());
            }
            let got = topk_softmax(MatRef::new("logits", &x, rows, n).unwrap(), k, threads).unwrap();
            prop_assert_eq!(got, reference(&x, n, k).unwrap());
        }
    }
}
