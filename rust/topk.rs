//! Per-row top-k selection and softmax of the kept logits.
//!
//! Indices are exactly those of `torch.topk(x, k, dim=-1, largest=True, sorted=True)` on CPU,
//! ties included. torch (`topk_impl_loop`) fills a queue of `(value as f32, column)` pairs and,
//! with `comp(a, b) = a.value > b.value`, runs libstdc++'s `std::partial_sort(q, q + k, end)`
//! when `k * 64 <= n`, else `std::nth_element(q, q + k - 1, end)` then
//! `std::sort(q, q + k - 1)`, and returns `q[..k]`. Which of several equal logits wins, and in
//! what order, is whatever those algorithms happen to do, so `stl` ports them step for step.
//!
//! The softmax is torch's formula, `m = max kept`, `e_j = exp(x_j - m)`, `w_j = e_j / sum(e)`, so
//! a row whose kept logits are all `-inf` gives NaN weights, as torch does. A NaN logit is an
//! error naming its row.
//!
//! The `partial_sort` path (the common one: `num_vectors` in the hundreds or thousands, `k = 2`)
//! is a heap select: a `k`-element heap whose top is the smallest kept value, and an element
//! changes it only if it is strictly greater than that top, so elements not above the top are
//! skipped exactly and the result is the same as the full `partial_sort`.
//! The `nth_element` path (`k * 64 > n`, short rows) fills the whole queue and runs the port.
//!
//! Before the heap select, `Selector::distinct_top` tries a faster route that is exact for
//! rows whose top `k` values are distinct and not shared by any other element (then every
//! correct top-k agrees, so torch's tie order is moot): lane maxima give a threshold, the few
//! elements above it are sorted. Any tie falls back to the heap select above. The heap
//! select itself compares 16 elements at a time against the heap top and visits only the set
//! bits of the mask (so the "chunk / block" skip of earlier versions is now per element).
//!
//! Speed (issue 14: top-K + softmax of 39,040x2,048 float32 logits, `k = 2`, against
//! `logits.sum()` over the same 320 MB). Measured on a shared 2-core AMD EPYC (Zen 4, AVX-512
//! level), so only ratios taken in one process with the two timed in turn mean anything; one
//! thread was also timed by thread CPU time, which the other tenants' load does not enter.
//! * Kept: no software prefetch. A `prefetcht0` per 64 bytes of the row after next made the
//!   selection 1.64x a plain row-max pass against 1.24x without it (one thread, CPU time); the
//!   first pass alone streams at 1.02x row-max without it and 1.18x with it. Prefetching only
//!   the start of the next row (4 to 128 lines, T0 or T1, 1 to 4 rows ahead) was 1.17-1.64x:
//!   never better than none. The hardware prefetcher keeps up with the first pass on its own.
//! * Kept: the second pass (`candidates`) and the sort of the candidates without
//!   data-dependent branches where it can (bit sets, then only the set bits; selects): their
//!   branches mispredicted on random logits, and each mispredict also stopped the next row's
//!   loads. 1.24-1.27x row-max before, 1.16-1.21x after (one thread, CPU time).
//! * Dropped: a 512-bit first pass (one 16-lane maximum per 256 elements, NaN into a mask):
//!   1.08x row-max against 1.02x for the 256-bit one; Zen 4 splits 512-bit operations in two.
//!   Dropping the NaN check from the first pass would gain about 1%.
//! * Not the way: one pass keeping the running top `k` with a compare against the current
//!   `k`-th per 16 elements is what `heap_select` does; on the same data (rows of 2,047, where
//!   the fast path does not apply) it was 1.43-1.52x row-max against 1.14-1.34x for the fast
//!   path: each compare waits on the current threshold, which keeps changing early in the row.
//! * Through Python (`ops.topk_softmax`, torch's 2 OpenMP threads, medians of rounds that time
//!   it and `logits.sum()` in turn): the selection alone went from 1.00-1.43x `logits.sum()` to
//!   0.90-1.07x (load average 1.2-3.6); the whole call, in runs no other tenant disturbed (load
//!   1.2-1.5), from 1.09-1.30x to 1.08-1.14x; on one thread timed by thread CPU time (load
//!   1.7-1.8), from 1.25-1.27x to 1.085-1.09x (the selection from 1.13-1.16x to 0.96x). The rest
//!   of the call is torch's softmax of the kept `(39,040, 2)` logits, which `ops.topk_softmax`
//!   runs for bit parity with PEFT: ~1.0 ms on 2 threads, ~2.0 ms on one (~50 ns a row, its
//!   per-row overhead), 0.08-0.15x `logits.sum()`. That share, not the selection, keeps the call
//!   near 1.1x; under load it grows (its 2-thread team waits for a descheduled thread).

use crate::element::{Element, CHUNK};
use crate::error::KernelError;
use crate::matrix::MatRef;
use crate::simd::{dispatch, Level};
use crate::threads;

/// Rows handed to one rayon task.
pub(crate) const ROWS_PER_TASK: usize = 64;

/// Whether any element is NaN, over `LANES` independent lanes (`x != x`, OR-ed lane-wise and
/// reduced once) so the loop stays in vector registers.
#[inline(always)]
fn any_nan<const LANES: usize>(xs: &[f32]) -> bool {
    let mut nan = [false; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        let c: &[f32; LANES] = c.try_into().unwrap();
        for l in 0..LANES {
            nan[l] |= c[l].is_nan();
        }
    }
    chunks.remainder().iter().any(|x| x.is_nan()) || nan.iter().any(|&b| b)
}

/// Elements compared against the heap top at a time (see `Selector::heap_select`).
pub(crate) const LANES: usize = 16;

/// Candidates above which the fast path gives up (many equal or clustered values).
const MAX_CANDIDATES: usize = 64;

/// Bit `l` set where `!(xs[l] <= top)`: the elements that may enter the heap (`xs[l] > top`)
/// and any NaN. Portable: LLVM vectorises the "any" test into compares and one reduction but
/// builds the bit mask element by element, so that is done only when some bit is set (rare
/// after the first chunk). [`may_enter_avx2`] computes the same with two compares and two
/// movemasks.
#[inline(always)]
pub(crate) fn may_enter(xs: &[f32; LANES], top: f32) -> u64 {
    #[allow(clippy::neg_cmp_op_on_partial_ord)] // true for NaN is the point
    let hit = |x: f32| !(x <= top);
    if !xs.iter().fold(false, |any, &x| any | hit(x)) {
        return 0;
    }
    let mut mask = 0_u64;
    for (l, &x) in xs.iter().enumerate() {
        mask |= u64::from(hit(x)) << l;
    }
    mask
}

/// [`may_enter`] with AVX: two compares and two movemasks. Only called from code compiled with
/// the `avx2` target feature (the closures of `topk_rows_avx2` and its callers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn may_enter_avx2(xs: &[f32; LANES], top: f32) -> u64 {
    use std::arch::x86_64::{
        __m256, _mm256_cmp_ps, _mm256_movemask_ps, _mm256_set1_ps, _CMP_NLE_UQ,
    };
    let t = _mm256_set1_ps(top);
    let mut mask = 0_u64;
    for (h, half) in xs.chunks_exact(8).enumerate() {
        let v: __m256 = bytemuck::cast::<[f32; 8], __m256>(half.try_into().unwrap());
        // Not-less-or-equal, unordered: true for NaN. 8 mask bits, so the cast is exact.
        mask |= u64::from(_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NLE_UQ>(v, t)) as u32) << (8 * h);
    }
    mask
}

/// Elements per chunk of the fast path's first pass: the pass keeps one 8-lane maximum per chunk,
/// and the second pass only scans the chunks whose maximum reaches the threshold.
pub(crate) const FAST_CHUNK: usize = 128;

/// Lanes of the fast path's maxima (one AVX register of `f32`).
pub(crate) const FAST_LANES: usize = 8;

// `candidates` keeps one bit per element of a chunk in whole `u64` words.
const _: () = assert!(FAST_CHUNK.is_multiple_of(64) && 64 % FAST_LANES == 0);

/// The fast path's first pass over a row: `out[c]` gets the lane-wise maxima of chunk `c` of
/// `xs` (`FAST_CHUNK` elements; element `j` of a chunk goes to lane `j % 8`, NaN ignored), and
/// the result is the lane-wise maxima of the whole row and whether any element is NaN. Lanes
/// hold disjoint elements, so the `k`-th largest lane maximum is at most the row's `k`-th
/// largest value. `xs.len()` must be a multiple of `FAST_LANES` and `out` hold one entry per
/// chunk.
#[inline(always)]
pub(crate) fn chunk_maxima(xs: &[f32], out: &mut [[f32; FAST_LANES]]) -> ([f32; FAST_LANES], bool) {
    let mut lanes = [f32::NEG_INFINITY; FAST_LANES];
    let mut nan = [false; FAST_LANES];
    for (chunk, max_out) in xs.chunks(FAST_CHUNK).zip(out) {
        let mut max = [f32::NEG_INFINITY; FAST_LANES];
        for v in chunk.chunks_exact(FAST_LANES) {
            for l in 0..FAST_LANES {
                max[l] = if v[l] > max[l] { v[l] } else { max[l] };
                nan[l] |= v[l].is_nan();
            }
        }
        for l in 0..FAST_LANES {
            lanes[l] = if max[l] > lanes[l] { max[l] } else { lanes[l] };
        }
        *max_out = max;
    }
    (lanes, nan.iter().any(|&b| b))
}

/// [`chunk_maxima`] with AVX: per 16 elements two loads, two `vmaxps`, one unordered compare of
/// the pair (true if either is NaN) and an OR. No software prefetch: the hardware prefetcher
/// keeps up with this loop on its own, and a `prefetcht0` per 64 bytes of the row after next
/// (kept here until issue 14's measurements) made the whole selection ~25% slower on one thread
/// (see the measurements at the top of this file). Only called from code compiled with the
/// `avx2` target feature.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn chunk_maxima_avx2(
    xs: &[f32],
    out: &mut [[f32; FAST_LANES]],
) -> ([f32; FAST_LANES], bool) {
    use std::arch::x86_64::{
        __m256, _mm256_cmp_ps, _mm256_max_ps, _mm256_movemask_ps, _mm256_or_ps, _mm256_set1_ps,
        _mm256_setzero_ps, _CMP_UNORD_Q,
    };
    let load = |v: &[f32]| bytemuck::cast::<[f32; 8], __m256>(v.try_into().unwrap());
    let neg = _mm256_set1_ps(f32::NEG_INFINITY);
    let (mut lanes, mut nan) = (neg, _mm256_setzero_ps());
    for (chunk, max_out) in xs.chunks(FAST_CHUNK).zip(out) {
        let (mut m0, mut m1) = (neg, neg);
        let mut pairs = chunk.chunks_exact(16);
        for p in &mut pairs {
            let (a, b) = (load(&p[..8]), load(&p[8..]));
            // `max_ps(x, m)` returns `m` when `x` is NaN: NaN is ignored, as in `chunk_maxima`.
            m0 = _mm256_max_ps(a, m0);
            m1 = _mm256_max_ps(b, m1);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(a, b));
        }
        for v in pairs.remainder().chunks_exact(8) {
            let a = load(v);
            m0 = _mm256_max_ps(a, m0);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(a, a));
        }
        let max = _mm256_max_ps(m0, m1);
        *max_out = bytemuck::cast::<__m256, [f32; 8]>(max);
        lanes = _mm256_max_ps(max, lanes);
    }
    (
        bytemuck::cast::<__m256, [f32; 8]>(lanes),
        _mm256_movemask_ps(nan) != 0,
    )
}

/// Bit `l` set where `!(xs[l] <= t)` (`xs[l] > t`, or NaN), over 8 elements.
#[inline(always)]
pub(crate) fn above8(xs: &[f32; FAST_LANES], t: f32) -> u32 {
    #[allow(clippy::neg_cmp_op_on_partial_ord)] // true for NaN is the point
    xs.iter()
        .enumerate()
        .fold(0, |mask, (l, &x)| mask | (u32::from(!(x <= t)) << l))
}

/// [`above8`] with AVX: one compare and one movemask. Only called from code compiled with the
/// `avx2` target feature.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn above8_avx2(xs: &[f32; FAST_LANES], t: f32) -> u32 {
    use std::arch::x86_64::{
        __m256, _mm256_cmp_ps, _mm256_movemask_ps, _mm256_set1_ps, _CMP_NLE_UQ,
    };
    let v = bytemuck::cast::<[f32; 8], __m256>(*xs);
    // 8 mask bits: the cast is exact.
    _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NLE_UQ>(v, _mm256_set1_ps(t))) as u32
}

/// [`above8`] with AVX-512VL: one compare straight into a mask register. Only called from code
/// compiled with the `avx512f,avx512vl` target features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
#[inline]
pub(crate) fn above8_avx512(xs: &[f32; FAST_LANES], t: f32) -> u32 {
    use std::arch::x86_64::{__m256, _mm256_cmp_ps_mask, _mm256_set1_ps, _CMP_NLE_UQ};
    let v = bytemuck::cast::<[f32; 8], __m256>(*xs);
    u32::from(_mm256_cmp_ps_mask::<_CMP_NLE_UQ>(v, _mm256_set1_ps(t)))
}

/// The fast path's second pass: pushes `(x, column)` for every element `x > below` of the
/// chunks of `xs` whose maximum in `chunk_max` is `> below`, in column order, with `above`
/// ([`above8`] or its AVX2 / AVX-512 version) comparing 8 elements at a time. Returns `false`
/// (stopping early) once more than `MAX_CANDIDATES` were found.
///
/// Which chunks qualify, and which elements of a qualifying chunk, are first gathered into bit
/// sets by straight-line compares, then only the set bits are visited: the data decide the trip
/// counts of two short loops instead of a branch per chunk and per 16 elements, which on random
/// logits mispredicted about half the time and cost more than the compares.
#[inline(always)]
pub(crate) fn candidates(
    xs: &[f32],
    chunk_max: &[[f32; FAST_LANES]],
    below: f32,
    cand: &mut Vec<Elem>,
    above: impl Fn(&[f32; FAST_LANES], f32) -> u32,
) -> bool {
    for (g, group) in chunk_max.chunks(64).enumerate() {
        let mut chunks = group.iter().enumerate().fold(0_u64, |bits, (i, max)| {
            bits | (u64::from(above(max, below) != 0) << i)
        });
        while chunks != 0 {
            let start = (g * 64 + chunks.trailing_zeros() as usize) * FAST_CHUNK;
            chunks &= chunks - 1;
            let chunk = &xs[start..xs.len().min(start + FAST_CHUNK)];
            // Bit `j % 64` of `hits[j / 64]` for element `j` of the chunk. A whole chunk has a
            // fixed length, so the 16 compares unroll with constant shifts; only a row's last
            // chunk can be shorter.
            let mut hits = [0_u64; FAST_CHUNK / 64];
            match <&[f32; FAST_CHUNK]>::try_from(chunk) {
                Ok(full) => {
                    for (j, v) in full.chunks_exact(FAST_LANES).enumerate() {
                        let bits = u64::from(above(v.try_into().unwrap(), below));
                        hits[j * FAST_LANES / 64] |= bits << (j * FAST_LANES % 64);
                    }
                }
                Err(_) => {
                    for (j, v) in chunk.chunks_exact(FAST_LANES).enumerate() {
                        let bits = u64::from(above(v.try_into().unwrap(), below));
                        hits[j * FAST_LANES / 64] |= bits << (j * FAST_LANES % 64);
                    }
                }
            }
            for (h, mut bits) in hits.into_iter().enumerate() {
                while bits != 0 {
                    let j = 64 * h + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    cand.push((chunk[j], start + j));
                }
            }
            if cand.len() > MAX_CANDIDATES {
                return false;
            }
        }
    }
    true
}

/// The vector building blocks of the selection: [`may_enter`], [`chunk_maxima`] and
/// [`candidates`], or their AVX2 / AVX-512 versions. They travel as closures because closures
/// made inside a `#[target_feature]` function keep its features (and may call the versions
/// that need them), while the generic code that calls them is shared by every level.
pub(crate) trait Scan: Copy {
    fn may_enter(&self, xs: &[f32; LANES], top: f32) -> u64;
    fn chunk_maxima(&self, xs: &[f32], out: &mut [[f32; FAST_LANES]]) -> ([f32; FAST_LANES], bool);
    fn candidates(
        &self,
        xs: &[f32],
        chunk_max: &[[f32; FAST_LANES]],
        below: f32,
        cand: &mut Vec<Elem>,
    ) -> bool;
}

/// A [`Scan`] from three closures.
#[derive(Clone, Copy)]
pub(crate) struct ScanWith<M, C, A>(pub(crate) M, pub(crate) C, pub(crate) A);

impl<M, C, A> Scan for ScanWith<M, C, A>
where
    M: Fn(&[f32; LANES], f32) -> u64 + Copy,
    C: Fn(&[f32], &mut [[f32; FAST_LANES]]) -> ([f32; FAST_LANES], bool) + Copy,
    A: Fn(&[f32], &[[f32; FAST_LANES]], f32, &mut Vec<Elem>) -> bool + Copy,
{
    #[inline(always)]
    fn may_enter(&self, xs: &[f32; LANES], top: f32) -> u64 {
        (self.0)(xs, top)
    }

    #[inline(always)]
    fn chunk_maxima(&self, xs: &[f32], out: &mut [[f32; FAST_LANES]]) -> ([f32; FAST_LANES], bool) {
        (self.1)(xs, out)
    }

    #[inline(always)]
    fn candidates(
        &self,
        xs: &[f32],
        chunk_max: &[[f32; FAST_LANES]],
        below: f32,
        cand: &mut Vec<Elem>,
    ) -> bool {
        (self.2)(xs, chunk_max, below, cand)
    }
}

/// The portable [`Scan`].
#[inline(always)]
pub(crate) fn portable_scan() -> impl Scan {
    ScanWith(
        may_enter,
        chunk_maxima,
        |xs: &[f32], chunk_max: &[[f32; FAST_LANES]], below: f32, cand: &mut Vec<Elem>| {
            candidates(xs, chunk_max, below, cand, above8)
        },
    )
}

/// The AVX2 [`Scan`]. Its closures are made here, so they carry the `avx2` feature.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) fn avx2_scan() -> impl Scan {
    ScanWith(
        |xs: &[f32; LANES], top: f32| may_enter_avx2(xs, top),
        |xs: &[f32], out: &mut [[f32; FAST_LANES]]| chunk_maxima_avx2(xs, out),
        |xs: &[f32], chunk_max: &[[f32; FAST_LANES]], below: f32, cand: &mut Vec<Elem>| {
            candidates(xs, chunk_max, below, cand, |v, t| above8_avx2(v, t))
        },
    )
}

/// [`may_enter`] with AVX-512VL: two compares straight into mask registers, no movemask. Only
/// called from code compiled with the `avx512f,avx512vl` target features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
#[inline]
pub(crate) fn may_enter_avx512(xs: &[f32; LANES], top: f32) -> u64 {
    use std::arch::x86_64::{__m256, _mm256_cmp_ps_mask, _mm256_set1_ps, _CMP_NLE_UQ};
    let t = _mm256_set1_ps(top);
    let load = |v: &[f32]| bytemuck::cast::<[f32; 8], __m256>(v.try_into().unwrap());
    let lo = _mm256_cmp_ps_mask::<_CMP_NLE_UQ>(load(&xs[..8]), t);
    let hi = _mm256_cmp_ps_mask::<_CMP_NLE_UQ>(load(&xs[8..]), t);
    u64::from(lo) | (u64::from(hi) << 8)
}

/// The AVX-512 [`Scan`]: compares into mask registers ([`may_enter_avx512`],
/// [`above8_avx512`]); the first pass is [`chunk_maxima_avx2`], which streams at memory
/// speed already. Its closures are made here, so they carry the AVX-512 features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(crate) fn avx512_scan() -> impl Scan {
    ScanWith(
        |xs: &[f32; LANES], top: f32| may_enter_avx512(xs, top),
        |xs: &[f32], out: &mut [[f32; FAST_LANES]]| chunk_maxima_avx2(xs, out),
        |xs: &[f32], chunk_max: &[[f32; FAST_LANES]], below: f32, cand: &mut Vec<Elem>| {
            candidates(xs, chunk_max, below, cand, |v, t| above8_avx512(v, t))
        },
    )
}

/// Whether torch's CPU top-k takes the `partial_sort` path for this `k` and row length.
#[inline]
pub(crate) fn uses_partial_sort(k: usize, n: usize) -> bool {
    k.saturating_mul(64) <= n
}

/// Ports of the libstdc++ (GCC 13) algorithms torch's CPU top-k calls, on `(value, column)`
/// pairs with `comp(a, b) = a.value > b.value` (no NaN reaches them). Positions are indices
/// into the slice; where C++ holds a value aside and moves a "hole", so do these.
pub(crate) mod stl {
    /// A queue element: the logit widened to `f32`, and its column.
    pub(crate) type Elem = (f32, usize);

    #[inline(always)]
    fn comp(a: &Elem, b: &Elem) -> bool {
        a.0 > b.0
    }

    /// `std::__lg`: floor(log2(n)) for `n > 0`.
    fn lg(n: usize) -> usize {
        (usize::BITS - 1 - n.leading_zeros()) as usize
    }

    /// `std::__push_heap(first, hole, top, value)`.
    #[inline]
    fn push_heap(q: &mut [Elem], mut hole: usize, top: usize, value: Elem) {
        while hole > top {
            let parent = (hole - 1) / 2;
            if !comp(&q[parent], &value) {
                break;
            }
            q[hole] = q[parent];
            hole = parent;
        }
        q[hole] = value;
    }

    /// `std::__adjust_heap(first, hole, len, value)`.
    #[inline]
    pub(crate) fn adjust_heap(q: &mut [Elem], mut hole: usize, len: usize, value: Elem) {
        let top = hole;
        let mut second = hole;
        while second < len.saturating_sub(1) / 2 {
            second = 2 * (second + 1);
            if comp(&q[second], &q[second - 1]) {
                second -= 1;
            }
            q[hole] = q[second];
            hole = second;
        }
        if len & 1 == 0 && len >= 2 && second == (len - 2) / 2 {
            second = 2 * (second + 1);
            q[hole] = q[second - 1];
            hole = second - 1;
        }
        push_heap(q, hole, top, value);
    }

    /// `std::__make_heap(q, q + len)`.
    pub(crate) fn make_heap(q: &mut [Elem], len: usize) {
        if len < 2 {
            return;
        }
        let mut parent = (len - 2) / 2;
        loop {
            let v = q[parent];
            adjust_heap(q, parent, len, v);
            if parent == 0 {
                return;
            }
            parent -= 1;
        }
    }

    /// `std::__pop_heap(q, q + last, q + result)`.
    #[inline]
    fn pop_heap(q: &mut [Elem], last: usize, result: usize) {
        let v = q[result];
        q[result] = q[0];
        adjust_heap(q, 0, last, v);
    }

    /// `std::__heap_select(q, q + middle, q + q.len())`.
    fn heap_select(q: &mut [Elem], middle: usize) {
        make_heap(q, middle);
        for i in middle..q.len() {
            if comp(&q[i], &q[0]) {
                pop_heap(q, middle, i);
            }
        }
    }

    /// `std::__sort_heap(q, q + len)`.
    pub(crate) fn sort_heap(q: &mut [Elem], len: usize) {
        let mut last = len;
        while last > 1 {
            last -= 1;
            pop_heap(q, last, last);
        }
    }

    /// `std::partial_sort(q, q + middle, q + q.len())`.
    pub(crate) fn partial_sort(q: &mut [Elem], middle: usize) {
        heap_select(q, middle);
        sort_heap(q, middle);
    }

    /// `std::__move_median_to_first(result, a, b, c)`.
    fn move_median_to_first(q: &mut [Elem], result: usize, a: usize, b: usize, c: usize) {
        let m = if comp(&q[a], &q[b]) {
            if comp(&q[b], &q[c]) {
                b
            } else if comp(&q[a], &q[c]) {
                c
            } else {
                a
            }
        } else if comp(&q[a], &q[c]) {
            a
        } else if comp(&q[b], &q[c]) {
            c
        } else {
            b
        };
        q.swap(result, m);
    }

    /// `std::__unguarded_partition(first, last, pivot)`.
    fn unguarded_partition(
        q: &mut [Elem],
        mut first: usize,
        mut last: usize,
        pivot: usize,
    ) -> usize {
        loop {
            while comp(&q[first], &q[pivot]) {
                first += 1;
            }
            last -= 1;
            while comp(&q[pivot], &q[last]) {
                last -= 1;
            }
            if first >= last {
                return first;
            }
            q.swap(first, last);
            first += 1;
        }
    }

    /// `std::__unguarded_partition_pivot(first, last)`.
    fn unguarded_partition_pivot(q: &mut [Elem], first: usize, last: usize) -> usize {
        let mid = first + (last - first) / 2;
        move_median_to_first(q, first, first + 1, mid, last - 1);
        unguarded_partition(q, first + 1, last, first)
    }

    /// `std::__unguarded_linear_insert(last)`.
    fn unguarded_linear_insert(q: &mut [Elem], mut last: usize) {
        let v = q[last];
        let mut next = last - 1;
        while comp(&v, &q[next]) {
            q[last] = q[next];
            last = next;
            next -= 1;
        }
        q[last] = v;
    }

    /// `std::__insertion_sort(first, last)`.
    fn insertion_sort(q: &mut [Elem], first: usize, last: usize) {
        if first == last {
            return;
        }
        for i in first + 1..last {
            if comp(&q[i], &q[first]) {
                let v = q[i];
                q.copy_within(first..i, first + 1);
                q[first] = v;
            } else {
                unguarded_linear_insert(q, i);
            }
        }
    }

    /// `std::__introselect(first, nth, last, depth)`.
    fn introselect(
        q: &mut [Elem],
        mut first: usize,
        nth: usize,
        mut last: usize,
        mut depth: usize,
    ) {
        while last - first > 3 {
            if depth == 0 {
                heap_select(&mut q[first..last], nth + 1 - first);
                q.swap(first, nth);
                return;
            }
            depth -= 1;
            let cut = unguarded_partition_pivot(q, first, last);
            if cut <= nth {
                first = cut;
            } else {
                last = cut;
            }
        }
        insertion_sort(q, first, last);
    }

    /// `std::nth_element(q, q + nth, q + q.len())`.
    pub(crate) fn nth_element(q: &mut [Elem], nth: usize) {
        let len = q.len();
        if len == 0 || nth == len {
            return;
        }
        introselect(q, 0, nth, len, 2 * lg(len));
    }

    /// `std::__introsort_loop(first, last, depth)`.
    fn introsort_loop(q: &mut [Elem], first: usize, mut last: usize, mut depth: usize) {
        while last - first > 16 {
            if depth == 0 {
                partial_sort(&mut q[first..last], last - first);
                return;
            }
            depth -= 1;
            let cut = unguarded_partition_pivot(q, first, last);
            introsort_loop(q, cut, last, depth);
            last = cut;
        }
    }

    /// `std::__final_insertion_sort(first, last)`.
    fn final_insertion_sort(q: &mut [Elem], first: usize, last: usize) {
        if last - first > 16 {
            insertion_sort(q, first, first + 16);
            for i in first + 16..last {
                unguarded_linear_insert(q, i);
            }
        } else {
            insertion_sort(q, first, last);
        }
    }

    /// `std::sort(q.begin(), q.end())`.
    pub(crate) fn sort(q: &mut [Elem]) {
        let len = q.len();
        if len != 0 {
            introsort_loop(q, 0, len, 2 * lg(len));
            final_insertion_sort(q, 0, len);
        }
    }
}

use stl::Elem;

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
    /// building blocks `scan`.
    #[inline(always)]
    pub(crate) fn select<T: Element>(&mut self, row: &[T], scan: impl Scan) -> Result<(), HasNan> {
        self.queue.clear();
        self.idx.clear();
        if uses_partial_sort(self.k, row.len()) {
            if !self.distinct_top(row, scan)? {
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
    fn distinct_top<T: Element>(&mut self, row: &[T], scan: impl Scan) -> Result<bool, HasNan> {
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
        let (lanes, nan) = scan.chunk_maxima(xs, chunk_max);
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
    pub(crate) fn softmax_into(&self, out: &mut [f32]) {
        let vals = &self.queue[..self.k];
        let max = vals[0].0;
        let mut sum = 0.0_f32;
        for (o, &(x, _)) in out.iter_mut().zip(vals) {
            *o = (x - max).exp();
            sum += *o;
        }
        for o in out.iter_mut() {
            *o /= sum;
        }
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
        if sel.select(logits.row(row), scan).is_err() {
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn topk_rows_avx2<T: Element>(
    logits: MatRef<'_, T>,
    k: usize,
    first_row: usize,
    idx_out: &mut [i64],
    w_out: &mut [f32],
    kept_logits: bool,
) -> Option<usize> {
    topk_rows(
        logits,
        k,
        first_row,
        idx_out,
        w_out,
        kept_logits,
        avx2_scan(),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn topk_rows_avx512<T: Element>(
    logits: MatRef<'_, T>,
    k: usize,
    first_row: usize,
    idx_out: &mut [i64],
    w_out: &mut [f32],
    kept_logits: bool,
) -> Option<usize> {
    topk_rows(
        logits,
        k,
        first_row,
        idx_out,
        w_out,
        kept_logits,
        avx512_scan(),
    )
}

/// Top-`k` indices (largest first, in `torch.topk`'s CPU order, ties included) and their softmax
/// weights for each row of `logits`, on `num_threads` threads (0: all cores). Returns
/// `(indices, weights)`, each `(rows, k)` row-major.
pub fn topk_softmax<T: Element>(
    logits: MatRef<'_, T>,
    k: usize,
    num_threads: usize,
) -> Result<(Vec<i64>, Vec<f32>), KernelError> {
    topk_softmax_at(Level::detected(), logits, k, num_threads)
}

pub(crate) fn topk_softmax_at<T: Element>(
    level: Level,
    logits: MatRef<'_, T>,
    k: usize,
    num_threads: usize,
) -> Result<(Vec<i64>, Vec<f32>), KernelError> {
    topk_many_at(level, &[logits], k, false, num_threads)
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
    topk_many_at(Level::detected(), mats, k, false, num_threads)
}

/// Like [`topk_softmax_many`], but the second output holds the kept logits themselves (widened to
/// `f32`, exact) instead of their softmax: for callers that weigh them with another softmax
/// (torch's, for bit parity with PEFT).
pub fn topk_kept_many<T: Element>(
    mats: &[MatRef<'_, T>],
    k: usize,
    num_threads: usize,
) -> Result<(Vec<i64>, Vec<f32>), KernelError> {
    topk_many_at(Level::detected(), mats, k, true, num_threads)
}

fn topk_many_at<T: Element>(
    level: Level,
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
    let failed = threads::first_some(num_threads, tasks, |(logits, first, before, idx, w)| {
        let failed = dispatch!(
            level,
            topk_rows(logits, k, first, idx, w, kept_logits, portable_scan()),
            topk_rows_avx2::<T>(logits, k, first, idx, w, kept_logits),
            topk_rows_avx512::<T>(logits, k, first, idx, w, kept_logits)
        );
        failed.map(|row| before + row)
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

    /// Reference: torch's algorithm on the whole queue, with no skipping (`stl` on every pair),
    /// then the softmax of the kept logits.
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
            let mut q: Vec<Elem> = row.iter().copied().zip(0..).collect();
            if uses_partial_sort(k, n) {
                stl::partial_sort(&mut q, k);
            } else {
                stl::nth_element(&mut q, k - 1);
                stl::sort(&mut q[..k - 1]);
            }
            let kept = &q[..k];
            let m = kept[0].0;
            let e: Vec<f32> = kept.iter().map(|&(x, _)| (x - m).exp()).collect();
            let mut s = 0.0_f32;
            for &x in &e {
                s += x;
            }
            indices.extend(kept.iter().map(|&(_, i)| i as i64));
            weights.extend(e.iter().map(|&x| x / s));
        }
        Ok((indices, weights))
    }

    /// `topk_softmax` at every available SIMD level; they must all agree.
    pub(crate) fn topk_all_levels<T: Element>(
        logits: MatRef<'_, T>,
        k: usize,
        threads: usize,
    ) -> Result<(Vec<i64>, Vec<f32>), KernelError> {
        let mut results = Level::available()
            .into_iter()
            .map(|level| topk_softmax_at(level, logits, k, threads));
        let first = results.next().unwrap();
        let bits = |r: &Result<(Vec<i64>, Vec<f32>), KernelError>| {
            r.clone()
                .map(|(i, w)| (i, w.iter().map(|x| x.to_bits()).collect::<Vec<_>>()))
        };
        for other in results {
            assert_eq!(bits(&other), bits(&first));
        }
        first
    }

    fn assert_matches(logits: &[f32], n: usize, k: usize, threads: usize) {
        let rows = logits.len() / n;
        let got =
            topk_all_levels(MatRef::new("logits", logits, rows, n).unwrap(), k, threads).unwrap();
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
    fn large_k_uses_nth_element_path() {
        let n = 300;
        let x = lcg(9, 130 * n);
        for k in [5, 33, 100, 299, 300] {
            assert!(!uses_partial_sort(k, n));
            assert_matches(&x, n, k, 2);
        }
    }

    /// Rows of more than 64 fast-path chunks: `candidates` takes the chunk maxima 64 at a
    /// time, so the top values are planted in the later groups and in a short last chunk.
    #[test]
    fn fast_path_long_rows() {
        for n in [64 * FAST_CHUNK + 8, 20_000, 3 * 64 * FAST_CHUNK] {
            let rows = 4;
            let mut x = lcg(n as u64, rows * n);
            for (r, row) in x.chunks_mut(n).enumerate() {
                // Row 0 as drawn; row 1: the top two in the last (short) chunk; row 2: in the
                // second group of chunks, in one lane; row 3: 70 near-equal values at the top.
                match r {
                    1 => (row[n - 1], row[n - 8]) = (9.0, 8.5),
                    2 => {
                        let at = (64 * FAST_CHUNK + 3).min(n - 9);
                        (row[at], row[at + 8]) = (9.0, 8.5);
                    }
                    3 => (0..70).for_each(|i| row[(i * 293) % n] = 9.0 - i as f32 * 1e-3),
                    _ => {}
                }
            }
            for k in [1, 2, 5, 8] {
                assert_matches(&x, n, k, 2);
            }
        }
    }

    fn torch_indices(x: &[f32], k: usize) -> Vec<i64> {
        topk_all_levels(MatRef::new("logits", x, 1, x.len()).unwrap(), k, 1)
            .unwrap()
            .0
    }

    /// Expected indices printed by `torch.topk(torch.tensor(x), k).indices` (torch 2.15, CPU).
    #[test]
    fn ties_follow_torch() {
        let mut x = vec![0.0_f32; 600];
        x[10] = 5.0;
        x[500] = 5.0;
        x[300] = 5.0;
        x[3] = -0.0;
        assert_eq!(torch_indices(&x, 4), [500, 300, 10, 1]);
        assert_eq!(
            torch_indices(&x, 40)[..12],
            [300, 500, 10, 384, 449, 378, 379, 380, 395, 381, 382, 383]
        );
        assert_eq!(torch_indices(&[1.0, 3.0, 3.0, 0.0, 3.0], 2), [2, 4]);
        assert_eq!(
            torch_indices(&[1.0, 3.0, 3.0, 0.0, 3.0], 5),
            [2, 4, 1, 0, 3]
        );
        let asc: Vec<f32> = (0..1000).map(|i| (i / 3) as f32).collect();
        assert_eq!(torch_indices(&asc, 5), [999, 998, 996, 997, 995]);
        assert_eq!(
            torch_indices(&asc, 50)[..16],
            [999, 998, 997, 996, 995, 994, 993, 992, 991, 990, 988, 987, 989, 986, 985, 984]
        );
        // Five distinct values, many ties, both paths.
        let five =
            |n: usize| -> Vec<f32> { (0..n).map(|i| ((i * i * 31 + i * 7) % 5) as f32).collect() };
        let cases: [(usize, usize, &[i64]); 9] = [
            (17, 3, &[14, 4, 9]),
            (
                17,
                16,
                &[14, 4, 9, 1, 16, 12, 11, 6, 2, 7, 3, 0, 15, 10, 8, 13],
            ),
            (130, 2, &[9, 4]),
            (130, 3, &[99, 44, 104]),
            (
                130,
                16,
                &[
                    74, 109, 69, 19, 104, 44, 99, 24, 39, 84, 34, 79, 29, 94, 129, 89,
                ],
            ),
            (1000, 3, &[14, 9, 4]),
            (
                1000,
                16,
                &[
                    229, 674, 244, 679, 239, 684, 234, 689, 694, 219, 719, 714, 709, 224, 699, 669,
                ],
            ),
            (
                3000,
                16,
                &[19, 4, 24, 59, 39, 69, 9, 74, 44, 49, 64, 29, 79, 54, 34, 14],
            ),
            (
                3000,
                47,
                &[
                    1009, 1644, 2324, 509, 1014, 2319, 1649, 514, 2314, 1654, 2309, 519, 504, 2304,
                    524, 1659, 2299, 1004, 529, 2294, 1664, 2234, 1694, 489, 2369, 474, 1624, 2364,
                    479, 2359, 1029, 1629, 484, 2354, 2349, 2289, 1634, 1024, 2344, 494, 2339,
                    1639, 499, 2334, 1019, 2329, 574,
                ],
            ),
        ];
        for (n, k, want) in cases {
            assert_eq!(torch_indices(&five(n), k), want, "n={n} k={k}");
            assert_matches(&five(n), n, k, 1);
        }
    }

    #[test]
    fn neg_inf_logits() {
        let ni = f32::NEG_INFINITY;
        let x = vec![ni, 1.0, ni, ni, 2.0, ni];
        let (idx, w) = topk_all_levels(MatRef::new("logits", &x, 1, 6).unwrap(), 3, 1).unwrap();
        assert_eq!(idx, vec![4, 1, 0]);
        assert_eq!(w[2], 0.0);
        assert_matches(&x, 6, 3, 1);
        // All -inf: indices as torch's (torch.topk on 300 -inf), weights NaN as in torch.
        let x = vec![ni; 2 * 300];
        let (idx, w) = topk_all_levels(MatRef::new("logits", &x, 2, 300).unwrap(), 2, 2).unwrap();
        assert_eq!(idx, vec![0, 1, 0, 1]);
        assert!(w.iter().all(|w| w.is_nan()));
        let (idx, w) = topk_all_levels(MatRef::new("logits", &x, 2, 300).unwrap(), 40, 2).unwrap();
        assert_eq!(&idx[..8], &[196, 205, 204, 203, 202, 201, 200, 199]);
        assert_eq!(&idx[37..45], &[208, 207, 163, 196, 205, 204, 203, 202]);
        assert!(w.iter().all(|w| w.is_nan()));
    }

    #[test]
    fn nan_is_an_error_naming_the_first_bad_row() {
        let mut x = lcg(3, 300 * 64);
        x[17 * 64 + 40] = f32::NAN;
        x[250 * 64 + 2] = f32::NAN;
        for k in [2, 40] {
            for threads in [1, 2] {
                let err = topk_all_levels(MatRef::new("logits", &x, 300, 64).unwrap(), k, threads)
                    .unwrap_err();
                assert_eq!(err.to_string(), "logits row 17 contains NaN");
            }
        }
    }

    #[test]
    fn many_matrices_equal_one_call_each_and_count_nan_rows_across_them() {
        let sizes = [(64, 300), (1, 300), (0, 300), (172, 300), (7, 300)];
        let data: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &(r, n))| lcg(i as u64 + 11, r * n))
            .collect();
        let mats: Vec<MatRef<'_, f32>> = data
            .iter()
            .zip(sizes)
            .map(|(d, (r, n))| MatRef::new("logits", d, r, n).unwrap())
            .collect();
        for threads in [1, 2] {
            let (idx, w) = topk_softmax_many(&mats, 3, threads).unwrap();
            let (mut want_idx, mut want_w) = (Vec::new(), Vec::new());
            for m in &mats {
                let (i, ww) = topk_softmax(*m, 3, threads).unwrap();
                want_idx.extend(i);
                want_w.extend(ww);
            }
            assert_eq!(idx, want_idx);
            assert_eq!(w, want_w);
        }
        let mut bad = data.clone();
        bad[3][5 * 300 + 1] = f32::NAN;
        let mats: Vec<MatRef<'_, f32>> = bad
            .iter()
            .zip(sizes)
            .map(|(d, (r, n))| MatRef::new("logits", d, r, n).unwrap())
            .collect();
        let err = topk_softmax_many(&mats, 3, 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("logits row {} contains NaN", 64 + 1 + 5)
        );
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
        let (i, w) =
            topk_all_levels(MatRef::<f32>::new("logits", &[], 0, 4).unwrap(), 2, 1).unwrap();
        assert!(i.is_empty() && w.is_empty());
    }

    #[test]
    fn half_precision_logits() {
        let x = lcg(5, 40 * 333);
        let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let wide_h: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
        let wide_b: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        let got = topk_all_levels(MatRef::new("logits", &xh, 40, 333).unwrap(), 2, 2).unwrap();
        assert_eq!(got, reference(&wide_h, 333, 2).unwrap());
        let got = topk_all_levels(MatRef::new("logits", &xb, 40, 333).unwrap(), 3, 2).unwrap();
        assert_eq!(got, reference(&wide_b, 333, 3).unwrap());
    }

    proptest! {
        #[test]
        fn matches_reference(
            rows in 0usize..150,
            n in 1usize..3000,
            kfrac in 0.0f64..1.0,
            small in any::<bool>(),
            values in 0usize..4,
            seed in any::<u64>(),
            threads in 1usize..4,
        ) {
            // `small` favours the partial_sort path; coarse values make many ties.
            let kmax = if small { (n / 64).max(1) } else { n.min(70) };
            let k = (1 + (kfrac * kmax as f64) as usize).min(n);
            let rows = rows.min(40_000 / n + 1);
            let mut x = lcg(seed, rows * n);
            let tiny = [f32::NEG_INFINITY, -1.0, 0.0, 0.5, 2.0];
            match values {
                0 => {}
                1 => x.iter_mut().for_each(|v| *v = v.round()),
                2 => x.iter_mut().for_each(|v| *v = tiny[(v.to_bits() % 5) as usize]),
                _ => x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32()),
            }
            let got = topk_all_levels(MatRef::new("logits", &x, rows, n).unwrap(), k, threads).unwrap();
            let want = reference(&x, n, k).unwrap();
            prop_assert_eq!(got.0, want.0);
            // Bits: a row of all -inf has NaN weights, which `==` would call unequal.
            let bits = |w: &[f32]| w.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&got.1), bits(&want.1));
        }

        /// The fast path (`k <= 8`, rows split into 8-lane vectors, or not): exact on distinct
        /// values, near ties planted across chunk boundaries, and NaN anywhere.
        #[test]
        fn fast_path_matches_reference(
            k in 1usize..=8,
            n in 512usize..2600,
            seed in any::<u64>(),
            copies in 0usize..3,
            nan_at in proptest::option::of(any::<u64>()),
        ) {
            let rows = 9;
            let mut x = lcg(seed, rows * n);
            // Copy a row's j-th largest value (j = 1 or k, alternating by row) to other places
            // (0, 1 or 2 times): ties at the top or at the k-th place, often in another
            // FAST_CHUNK or lane than the original.
            for (r, row) in x.chunks_mut(n).enumerate() {
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                let at = order[if r % 2 == 0 { 0 } else { k - 1 }];
                for c in 0..copies {
                    row[(at + (c + 1) * 131 * (r + 1)) % n] = row[at];
                }
            }
            let got = topk_all_levels(MatRef::new("logits", &x, rows, n).unwrap(), k, 2).unwrap();
            let want = reference(&x, n, k).unwrap();
            prop_assert_eq!(got.0, want.0);
            if let Some(pos) = nan_at {
                let pos = usize::try_from(pos % (rows * n) as u64).unwrap();
                x[pos] = f32::NAN;
                let err = topk_all_levels(MatRef::new("logits", &x, rows, n).unwrap(), k, 2);
                prop_assert_eq!(err, Err(KernelError::Nan { arg: "logits", row: pos / n }));
            }
        }
    }
}
