//! The vector building blocks of the selection, one version per SIMD level: the NaN check,
//! the heap select's "may enter" mask, the fast path's first pass (`chunk_maxima`) and second
//! pass (`candidates`), bundled as a [`Scan`] per level.

use super::stl::Elem;

/// Whether any element is NaN, over `LANES` independent lanes (`x != x`, OR-ed lane-wise and
/// reduced once) so the loop stays in vector registers.
#[inline(always)]
pub(super) fn any_nan<const LANES: usize>(xs: &[f32]) -> bool {
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
/// the pair (true if either is NaN) and an OR. With `PREFETCH`, also a `prefetcht0` of the next
/// 64 bytes of `next` (the row after next) per 16 elements, so that row streams in while this
/// one is scanned: faster on an Intel Xeon, slower on AMD Zen 4, so `prefetch` measures which
/// (`docs/kernels.md`). A hint only: the bits are the same either way. Only called from code
/// compiled with the `avx2` target feature.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn chunk_maxima_avx2<const PREFETCH: bool>(
    xs: &[f32],
    next: &[u8],
    out: &mut [[f32; FAST_LANES]],
) -> ([f32; FAST_LANES], bool) {
    use std::arch::x86_64::{
        __m256, _mm256_cmp_ps, _mm256_max_ps, _mm256_movemask_ps, _mm256_or_ps, _mm256_set1_ps,
        _mm256_setzero_ps, _mm_prefetch, _CMP_UNORD_Q, _MM_HINT_T0,
    };
    let load = |v: &[f32]| bytemuck::cast::<[f32; 8], __m256>(v.try_into().unwrap());
    let neg = _mm256_set1_ps(f32::NEG_INFINITY);
    let (mut lanes, mut nan) = (neg, _mm256_setzero_ps());
    // Raw addresses for the hint, clamped into `next`: a prefetch never faults, and the clamp
    // keeps the loop free of branches.
    let (pf, pf_last) = (next.as_ptr(), next.len().saturating_sub(1));
    let mut line = 0_usize;
    for (chunk, max_out) in xs.chunks(FAST_CHUNK).zip(out) {
        let (mut m0, mut m1) = (neg, neg);
        let mut pairs = chunk.chunks_exact(16);
        for p in &mut pairs {
            if PREFETCH {
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(line.min(pf_last)).cast());
                line += 64;
            }
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
    /// `next` is a row that will be scanned soon: the prefetching versions hint it.
    fn chunk_maxima(
        &self,
        xs: &[f32],
        next: &[u8],
        out: &mut [[f32; FAST_LANES]],
    ) -> ([f32; FAST_LANES], bool);
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
    C: Fn(&[f32], &[u8], &mut [[f32; FAST_LANES]]) -> ([f32; FAST_LANES], bool) + Copy,
    A: Fn(&[f32], &[[f32; FAST_LANES]], f32, &mut Vec<Elem>) -> bool + Copy,
{
    #[inline(always)]
    fn may_enter(&self, xs: &[f32; LANES], top: f32) -> u64 {
        (self.0)(xs, top)
    }

    #[inline(always)]
    fn chunk_maxima(
        &self,
        xs: &[f32],
        next: &[u8],
        out: &mut [[f32; FAST_LANES]],
    ) -> ([f32; FAST_LANES], bool) {
        (self.1)(xs, next, out)
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

/// The portable [`Scan`] (it never prefetches).
#[inline(always)]
pub(crate) fn portable_scan() -> impl Scan {
    ScanWith(
        may_enter,
        |xs: &[f32], _next: &[u8], out: &mut [[f32; FAST_LANES]]| chunk_maxima(xs, out),
        |xs: &[f32], chunk_max: &[[f32; FAST_LANES]], below: f32, cand: &mut Vec<Elem>| {
            candidates(xs, chunk_max, below, cand, above8)
        },
    )
}

/// The AVX2 [`Scan`], prefetching the row after next if `PREFETCH`. Its closures are made here,
/// so they carry the `avx2` feature.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) fn avx2_scan<const PREFETCH: bool>() -> impl Scan {
    ScanWith(
        |xs: &[f32; LANES], top: f32| may_enter_avx2(xs, top),
        |xs: &[f32], next: &[u8], out: &mut [[f32; FAST_LANES]]| {
            chunk_maxima_avx2::<PREFETCH>(xs, next, out)
        },
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
/// speed already (prefetching the row after next if `PREFETCH`). Its closures are made here, so
/// they carry the AVX-512 features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(crate) fn avx512_scan<const PREFETCH: bool>() -> impl Scan {
    ScanWith(
        |xs: &[f32; LANES], top: f32| may_enter_avx512(xs, top),
        |xs: &[f32], next: &[u8], out: &mut [[f32; FAST_LANES]]| {
            chunk_maxima_avx2::<PREFETCH>(xs, next, out)
        },
        |xs: &[f32], chunk_max: &[[f32; FAST_LANES]], below: f32, cand: &mut Vec<Elem>| {
            candidates(xs, chunk_max, below, cand, |v, t| above8_avx512(v, t))
        },
    )
}
