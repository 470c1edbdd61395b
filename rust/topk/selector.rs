//! [`Selector`]: the top `k` of one row at a time, with reusable buffers: the distinct-values
//! fast path, the streamed heap select (`partial_sort`) and the `nth_element` path.

use super::scan::{any_nan, Scan, FAST_CHUNK, FAST_LANES, LANES};
use super::stl::{self, uses_partial_sort, Elem};
use crate::element::{Element, CHUNK};

/// Reusable per-task state: selects the top `k` of one row at a time.
pub(crate) struct Selector {
    k: usize,
    /// Heap path: the `k`-element heap. Queue path: the whole row. Either way its first `k`
    /// elements are the result of the last selected row, in torch's order.
    queue: Vec<Elem>,
    /// Column indices of the result, largest logit first.
    idx: Vec<usize>,
    buf: Vec<f32>,
    /// A whole row widened to `f32` (half-precision logits only).
    row_buf: Vec<f32>,
    /// Fast path: the row's elements at or above the threshold.
    cand: Vec<Elem>,
    /// Fast path: the lane maxima of each `FAST_CHUNK` of the row.
    chunk_max: Vec<[f32; FAST_LANES]>,
}

/// The row held a NaN.
pub(crate) struct HasNan;

impl Selector {
    /// `k` must be in `1..=n` for the rows it will see (checked by the callers).
    pub(crate) fn new(k: usize) -> Self {
        Self {
            k,
            queue: Vec::with_capacity(k),
            idx: Vec::with_capacity(k),
            buf: vec![0.0; CHUNK],
            row_buf: Vec::new(),
            cand: Vec::new(),
            chunk_max: Vec::new(),
        }
    }

    /// Column indices of the last selected row, largest logit first.
    pub(crate) fn indices(&self) -> &[usize] {
        &self.idx
    }

    /// Selects the top `k` of `row` (which has at least `k` elements) with the vector
    /// building blocks `scan`; `next` is a row that will be selected soon (a prefetching
    /// `scan` hints it).
    #[inline(always)]
    pub(crate) fn select<T: Element>(
        &mut self,
        row: &[T],
        next: &[T],
        scan: impl Scan,
    ) -> Result<(), HasNan> {
        self.queue.clear();
        self.idx.clear();
        if uses_partial_sort(self.k, row.len()) {
            if !self.distinct_top(row, next, scan)? {
                self.queue.clear();
                self.heap_select(row, scan)?;
            }
        } else {
            self.nth_element(row)?;
        }
        self.idx.extend(self.queue[..self.k].iter().map(|e| e.1));
        Ok(())
    }

    /// The fast path of `partial_sort`: when the row's `k` largest values are distinct and no
    /// other element equals the `k`-th, every correct top-`k` (torch's included) is the same,
    /// those `k` columns by decreasing value, so ties are the only reason to run torch's exact
    /// algorithm. Two passes: the 8-lane maxima of each `FAST_CHUNK` of the row (a branch-free
    /// vector loop at memory speed, which also finds NaN) give a threshold `t`, the `k`-th
    /// largest lane maximum of the row, with `t <=` the `k`-th largest value; then only the
    /// chunks (now in L1) with a maximum `>= t` are compared against `t`, and the few elements
    /// `>= t` are collected and sorted. Returns `false` (the caller runs `heap_select`) on a tie
    /// among them, when `t` is `-inf`, when too many qualify, or when the row does not split
    /// into 8-lane vectors or `k > 8`.
    #[inline(always)]
    fn distinct_top<T: Element>(
        &mut self,
        row: &[T],
        next: &[T],
        scan: impl Scan,
    ) -> Result<bool, HasNan> {
        let k = self.k;
        if k > FAST_LANES || !row.len().is_multiple_of(FAST_LANES) {
            return Ok(false);
        }
        if self.row_buf.len() < row.len() {
            // Only written by `widen` for half-precision rows; `f32` rows are used in place.
            self.row_buf.resize(row.len(), 0.0);
        }
        let xs = T::widen(row, &mut self.row_buf);
        let chunks = xs.len().div_ceil(FAST_CHUNK);
        if self.chunk_max.len() < chunks {
            self.chunk_max.resize(chunks, [0.0; FAST_LANES]);
        }
        let chunk_max = &mut self.chunk_max[..chunks];
        let next = bytemuck::cast_slice::<T, u8>(next);
        let (lanes, nan) = scan.chunk_maxima(xs, next, chunk_max);
        if nan {
            return Err(HasNan);
        }
        let t = kth_largest(lanes, k);
        if t == f32::NEG_INFINITY {
            return Ok(false);
        }
        // `x > t.next_down()` is `x >= t`: no float lies between.
        let below = t.next_down();
        let cand = &mut self.cand;
        cand.clear();
        if !scan.candidates(xs, chunk_max, below, cand) {
            return Ok(false);
        }
        // Insertion sort, largest first. Usually a handful of candidates: then each new one is
        // compared with every one before it and exchanged by selects, not branches (on random
        // logits their order is a coin toss). That is the insertion sort's order: the element
        // stops at the first pair that is not `<`, and the sorted pairs below exchange nothing.
        if cand.len() <= FAST_LANES {
            for i in 1..cand.len() {
                for j in (1..=i).rev() {
                    let (a, b) = (cand[j - 1], cand[j]);
                    let swap = a.0 < b.0;
                    cand[j - 1] = if swap { b } else { a };
                    cand[j] = if swap { a } else { b };
                }
            }
        } else {
            for i in 1..cand.len() {
                let mut j = i;
                while j > 0 && cand[j - 1].0 < cand[j].0 {
                    cand.swap(j - 1, j);
                    j -= 1;
                }
            }
        }
        // `+0.0 == -0.0`: a tie for torch's `>`, so that falls back too.
        let tie = cand.windows(2).take(k).any(|w| w[0].0 == w[1].0);
        if tie || cand.len() < k {
            return Ok(false);
        }
        self.queue.extend_from_slice(&cand[..k]);
        Ok(true)
    }

    /// `std::partial_sort(q, q + k, q + n)`, streamed: `heap_select` pops the heap for element
    /// `x` only if `x > top`, so the row goes `LANES` elements at a time through one vector
    /// compare against the top, and only the set bits of the mask (in column order, each
    /// checked again against the then-current top) reach the heap. An element left out was not
    /// above the top when compared, and the top never decreases, so the result is exactly the
    /// full `partial_sort`'s. NaN compares unordered, so it sets its bit too and is found there.
    #[inline(always)]
    fn heap_select<T: Element>(&mut self, row: &[T], scan: impl Scan) -> Result<(), HasNan> {
        let k = self.k;
        let heap = &mut self.queue;
        // One element, in column order: NaN is an error, else the exact heap step.
        let visit = |heap: &mut Vec<Elem>, x: f32, col: usize| {
            if x.is_nan() {
                return Err(HasNan);
            }
            if x > heap[0].0 {
                // `pop_heap(q, q + k, q + i)`: the old top goes to column i's slot, which is
                // never read again.
                stl::adjust_heap(heap, 0, k, (x, col));
            }
            Ok(())
        };
        for (c, src) in row.chunks(CHUNK).enumerate() {
            let xs = T::widen(src, &mut self.buf);
            let mut start = c * CHUNK;
            let mut rest = xs;
            if heap.len() < k {
                // The first `k` columns seed the heap.
                let take = (k - heap.len()).min(xs.len());
                if xs[..take].iter().any(|x| x.is_nan()) {
                    return Err(HasNan);
                }
                heap.extend(xs[..take].iter().enumerate().map(|(j, &x)| (x, start + j)));
                if heap.len() < k {
                    continue;
                }
                stl::make_heap(heap, k);
                start += take;
                rest = &xs[take..];
            }
            let mut groups = rest.chunks_exact(LANES);
            for (g, group) in (&mut groups).enumerate() {
                let group: &[f32; LANES] = group.try_into().unwrap();
                let mut mask = scan.may_enter(group, heap[0].0);
                while mask != 0 {
                    let l = mask.trailing_zeros() as usize;
                    mask &= mask - 1;
                    visit(heap, group[l], start + g * LANES + l)?;
                }
            }
            let tail = start + rest.len() - groups.remainder().len();
            for (j, &x) in groups.remainder().iter().enumerate() {
                visit(heap, x, tail + j)?;
            }
        }
        stl::sort_heap(heap, k);
        Ok(())
    }

    /// `std::nth_element(q, q + k - 1, q + n)` then `std::sort(q, q + k - 1)` on the whole row.
    #[inline(always)]
    fn nth_element<T: Element>(&mut self, row: &[T]) -> Result<(), HasNan> {
        for (c, src) in row.chunks(CHUNK).enumerate() {
            let xs = T::widen(src, &mut self.buf);
            if any_nan::<8>(xs) {
                return Err(HasNan);
            }
            self.queue
                .extend(xs.iter().enumerate().map(|(j, &x)| (x, c * CHUNK + j)));
        }
        let k = self.k;
        stl::nth_element(&mut self.queue, k - 1);
        stl::sort(&mut self.queue[..k - 1]);
        Ok(())
    }

    /// Softmax of the kept logits of the last selected row into `out` (length `k`).
    #[inline(always)]
    pub(crate) fn softmax_into(&self, out: &mut [f32]) {
        super::softmax::softmax_into(self.queue[..self.k].iter().map(|&(x, _)| x), out);
    }

    /// The kept logits of the last selected row (widened to `f32`, exact), largest first.
    pub(crate) fn values_into(&self, out: &mut [f32]) {
        for (o, &(x, _)) in out.iter_mut().zip(&self.queue[..self.k]) {
            *o = x;
        }
    }
}

/// A threshold `t <=` the `k`-th largest of 8 values (`1 <= k <= 8`, no NaN), equal to it for
/// `k <= 2` and for `k > 2` by `k` steps of a selection sort. For `k = 2` the second largest
/// is the largest `min(v[i], v[j])` over pairs `i != j`; the pairs `(i, i + d mod 8)` for
/// `d = 1..=4` are all of them, so four rotations, mins and maxes find it without branches.
#[inline(always)]
fn kth_largest(v: [f32; FAST_LANES], k: usize) -> f32 {
    let rot = |d: usize| std::array::from_fn::<f32, FAST_LANES, _>(|i| v[(i + d) % FAST_LANES]);
    let max8 = |a: [f32; FAST_LANES]| {
        a.iter()
            .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
    };
    match k {
        1 => max8(v),
        2 => {
            let mut best = [f32::NEG_INFINITY; FAST_LANES];
            for d in 1..=4 {
                let r = rot(d);
                for i in 0..FAST_LANES {
                    let pair_min = if r[i] < v[i] { r[i] } else { v[i] };
                    best[i] = if pair_min > best[i] {
                        pair_min
                    } else {
                        best[i]
                    };
                }
            }
            max8(best)
        }
        _ => {
            let mut v = v;
            for i in 0..k {
                let mut at = i;
                for j in i + 1..FAST_LANES {
                    if v[j] > v[at] {
                        at = j;
                    }
                }
                v.swap(i, at);
            }
            v[k - 1]
        }
    }
}
