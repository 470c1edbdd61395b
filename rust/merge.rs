//! Rank-R update of a weight in place, `weight[i, j] = from_f32(to_f32(weight[i, j]) + delta)`,
//! and the bare product `out[i, j] = delta` ([`low_rank_product`]), where
//! `delta = sum_{r in 0..R} u[i, r] * v[r, j]` is accumulated in `f32` from `0.0` in order `r`.
//!
//! `delta` is finished before it meets the weight, as in torch's `W.float() + B @ A`, so the one
//! rounding into `f16`/`bf16` sees the whole `f32` sum. How each step of the sum rounds depends
//! on the SIMD level (module `simd`):
//!
//! * AVX2+FMA and AVX-512: `delta = fma(u[i, r], v[r, j], delta)`, one rounding per step. That is exactly
//!   what torch's `u @ v` (MKL sgemm) computes on this machine: 100% of the bits of `B @ A`
//!   agree for R = 4 at 4096x11008, and so do the merged float32 weights of PEFT's
//!   `W + B @ A` (measured with a float64 emulation of the FMA chain; a plain mul + add chain
//!   agreed on 62% of the deltas and 98% of the merged weights).
//! * portable (SSE2 / NEON build, or `VBLORA_RS_SIMD=portable`): `delta + u * v`, two roundings,
//!   never `mul_add` (without the `fma` target feature that is a libm call). Results may then
//!   differ from torch's in the last bit.
//!
//! Either way the order is the same for every element, whatever the tiling, so
//! `weight + low_rank_product(u, v)` rounded equals `rank_update`'s result on the same level.
//!
//! Layout: each rayon task owns whole rows (a multiple of the micro-tile height `MR`). Within a
//! task the columns go in blocks whose slice of `v` fits in L2 (`V_BLOCK_BYTES`); within a block,
//! `MR` rows at a time, `NR` columns at a time, register tiles of `MR x NR` accumulate over all
//! `R` (the broadcast `u` values are packed per panel, each `v` row slice is loaded once per tile
//! and used `MR` times), then each finished tile row is added into the weight (or copied into the
//! fresh output); `f16` weights and the portable build gather a `CHUNK` of `delta` per row first.
//! The weight is read and written exactly once; the output of `low_rank_product` is only written.

use crate::element::{Element, CHUNK};
use crate::error::{Dim, KernelError};
use crate::matrix::{MatMut, MatRef};
use crate::simd::{dispatch, level_wrappers, madd, Level};
use crate::threads;

/// Weight elements handed to one rayon task (whole rows, rounded up to a multiple of `MR`).
const ELEMENTS_PER_TASK: usize = 1 << 16;

/// Bytes of `v` (R rows) that one column block spans, so that it stays in L2 while the rows of
/// a task stream past it.
const V_BLOCK_BYTES: usize = 128 << 10;

/// Micro-tile heights and widths. Portable (SSE2: 16 xmm registers): 4 x 8 is 8 accumulators.
/// AVX2 (16 ymm): 6 x 16 is 12 accumulators, 2 `v` loads and 6 broadcasts per 12 FMAs, the
/// shape of BLIS's Haswell sgemm kernel. AVX-512 (32 zmm): 8 x 16, one zmm per tile row, 8
/// accumulators. Measured on Zen 4, one thread, minimum of many runs: R = 64 at 256x4096
/// 2.0 ms (6 x 16: 3.7 ms, AVX2 2.8 ms); R = 4 at 512x4096 within 10% of 6 x 16. Wider tiles
/// (6 x 32, 4 x 32) left LLVM with the accumulators in memory (160 us instead of 21 us for
/// 64x2048), and 12 x 16 or 4 x 16 turned the bf16 weight's conversions into scalar code.
const MR_PORTABLE: usize = 4;
const NR_PORTABLE: usize = 8;
#[cfg(target_arch = "x86_64")]
const MR_AVX2: usize = 6;
#[cfg(target_arch = "x86_64")]
const NR_AVX2: usize = 16;
#[cfg(target_arch = "x86_64")]
const MR_AVX512: usize = 8;
#[cfg(target_arch = "x86_64")]
const NR_AVX512: usize = 16;

fn mr(level: Level) -> usize {
    match level {
        Level::Portable => MR_PORTABLE,
        #[cfg(target_arch = "x86_64")]
        Level::Avx2Fma(_) => MR_AVX2,
        #[cfg(target_arch = "x86_64")]
        Level::Avx512(_) => MR_AVX512,
    }
}

/// Checks `u (m, R)` and `v (R, n)` against the output's `(m, n)`.
fn check_shapes(
    out: &'static str,
    (m, n): (usize, usize),
    u: MatRef<'_, f32>,
    v: MatRef<'_, f32>,
) -> Result<(), KernelError> {
    let checks = [
        ("u", u.shape(), out, Dim::Rows, m, u.rows()),
        ("v", v.shape(), out, Dim::Columns, n, v.cols()),
        ("v", v.shape(), "u", Dim::Columns, u.cols(), v.rows()),
    ];
    for (arg, shape, other, dim, expected, got) in checks {
        if got != expected {
            return Err(KernelError::Shape {
                arg,
                shape,
                other,
                dim,
                expected,
            });
        }
    }
    Ok(())
}

/// The `delta` of the `MR` rows whose `u` values are packed in `pack` (`pack[r][i]`), for
/// columns `col..col + len` of `v` (data `v`, rows of `n`), handed to `sink(i, c, piece)` as it
/// is finished: row `i` of the panel, columns `c..c + piece.len()`, one register tile row
/// (`NR` columns) at a time, then the last `len % NR` columns together.
#[inline(always)]
fn delta_tiles<const MR: usize, const NR: usize, const FMA: bool>(
    pack: &[[f32; MR]],
    v: &[f32],
    n: usize,
    (col, len): (usize, usize),
    sink: &mut impl FnMut(usize, usize, &[f32]),
) {
    let mut j = 0;
    while j + NR <= len {
        let mut acc = [[0.0_f32; NR]; MR];
        for (ur, vr) in pack.iter().zip(v.chunks_exact(n)) {
            let vr: &[f32; NR] = vr[col + j..col + j + NR].try_into().unwrap();
            for i in 0..MR {
                for l in 0..NR {
                    acc[i][l] = madd::<FMA>(acc[i][l], ur[i], vr[l]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            sink(i, col + j, a);
        }
        j += NR;
    }
    if j == len {
        return;
    }
    // The last `len % NR` columns, one at a time, in the same order over `r`.
    let mut rest = [[0.0_f32; NR]; MR];
    for (l, j) in (j..len).enumerate() {
        for (ur, vr) in pack.iter().zip(v.chunks_exact(n)) {
            let x = vr[col + j];
            for i in 0..MR {
                rest[i][l] = madd::<FMA>(rest[i][l], ur[i], x);
            }
        }
    }
    for (i, r) in rest.iter().enumerate() {
        sink(i, col + j, &r[..len - j]);
    }
}

/// Rows `row..row + MR` over the columns `b0..b1`: packs their `u` values, computes `delta` and
/// hands it to `sink(row_in_panel, col, piece)`: tile row by tile row, or with `STAGED` (for
/// weights converted a chunk at a time, see [`Element::CHUNKED`]) gathered into `CHUNK`-long
/// row pieces first.
#[inline(always)]
fn panel<const MR: usize, const NR: usize, const FMA: bool, const STAGED: bool>(
    u: MatRef<'_, f32>,
    v: MatRef<'_, f32>,
    row: usize,
    (b0, b1): (usize, usize),
    pack: &mut Vec<[f32; MR]>,
    sink: &mut impl FnMut(usize, usize, &[f32]),
) {
    pack.clear();
    pack.extend((0..u.cols()).map(|r| std::array::from_fn(|i| u.row(row + i)[r])));
    if !STAGED {
        delta_tiles::<MR, NR, FMA>(pack, v.data(), v.cols(), (b0, b1 - b0), sink);
        return;
    }
    let mut delta = [[0.0_f32; CHUNK]; MR];
    for c in (b0..b1).step_by(CHUNK) {
        let len = CHUNK.min(b1 - c);
        let mut stage = |i: usize, col: usize, d: &[f32]| {
            delta[i][col - c..col - c + d.len()].copy_from_slice(d);
        };
        delta_tiles::<MR, NR, FMA>(pack, v.data(), v.cols(), (c, len), &mut stage);
        for (i, d) in delta.iter().enumerate() {
            sink(i, c, &d[..len]);
        }
    }
}

/// The `delta` of `rows` rows starting at global row `row0`, handed to
/// `sink(row_in_task, col, piece)` piece by piece (see [`panel`]), each element once.
#[inline(always)]
fn for_each_delta<const MR: usize, const NR: usize, const FMA: bool, const STAGED: bool>(
    u: MatRef<'_, f32>,
    v: MatRef<'_, f32>,
    row0: usize,
    rows: usize,
    mut sink: impl FnMut(usize, usize, &[f32]),
) {
    let (rank, n) = v.shape();
    let block = (V_BLOCK_BYTES / (4 * rank)).max(CHUNK) / CHUNK * CHUNK;
    let mut pack = Vec::with_capacity(rank);
    let mut pack1 = Vec::with_capacity(rank);
    for b0 in (0..n).step_by(block) {
        let cols = (b0, (b0 + block).min(n));
        let mut i = 0;
        while i + MR <= rows {
            let mut sink = |r: usize, c: usize, d: &[f32]| sink(i + r, c, d);
            panel::<MR, NR, FMA, STAGED>(u, v, row0 + i, cols, &mut pack, &mut sink);
            i += MR;
        }
        for i in i..rows {
            let mut sink = |_: usize, c: usize, d: &[f32]| sink(i, c, d);
            panel::<1, NR, FMA, STAGED>(u, v, row0 + i, cols, &mut pack1, &mut sink);
        }
    }
}

/// `weight_rows += delta` for the task's rows (global rows from `row0`). Unless `staged` or the
/// weight converts in chunks (`f16`), each register tile row goes straight into the weight, with
/// no staging buffer in between: one write and one read less per element (64x2048 in L2, one
/// thread: bf16 38 -> 32 us with AVX2, 26 -> 23 us with AVX-512). The portable build stages:
/// SSE2 has no 32-to-16-bit pack, so bf16 tiles narrowed lane by lane (75 -> 201 us).
#[inline(always)]
fn update_rows<W: Element, const MR: usize, const NR: usize, const FMA: bool>(
    w: &mut [W],
    u: MatRef<'_, f32>,
    v: MatRef<'_, f32>,
    row0: usize,
    staged: bool,
) {
    let n = v.cols();
    let rows = w.len() / n;
    let add = |i: usize, c: usize, d: &[f32]| {
        W::add_f32(&mut w[i * n + c..i * n + c + d.len()], d);
    };
    if staged || W::CHUNKED {
        for_each_delta::<MR, NR, FMA, true>(u, v, row0, rows, add);
    } else {
        for_each_delta::<MR, NR, FMA, false>(u, v, row0, rows, add);
    }
}

/// `out_rows = delta` for the task's rows (global rows from `row0`), tile by tile.
#[inline(always)]
fn product_rows<const MR: usize, const NR: usize, const FMA: bool>(
    out: &mut [f32],
    u: MatRef<'_, f32>,
    v: MatRef<'_, f32>,
    row0: usize,
) {
    let n = v.cols();
    for_each_delta::<MR, NR, FMA, false>(u, v, row0, out.len() / n, |i, c, d| {
        out[i * n + c..i * n + c + d.len()].copy_from_slice(d);
    });
}

level_wrappers! {
    /// [`update_rows`] with the level's register tile.
    fn update_rows_avx2, update_rows_avx512 [W: Element] (
        w: &mut [W],
        u: MatRef<'_, f32>,
        v: MatRef<'_, f32>,
        row0: usize,
    ) {
        avx2: update_rows::<W, MR_AVX2, NR_AVX2, true>(w, u, v, row0, false),
        avx512: update_rows::<W, MR_AVX512, NR_AVX512, true>(w, u, v, row0, false),
    }
}

level_wrappers! {
    /// [`product_rows`] with the level's register tile.
    fn product_rows_avx2, product_rows_avx512 [] (
        out: &mut [f32],
        u: MatRef<'_, f32>,
        v: MatRef<'_, f32>,
        row0: usize,
    ) {
        avx2: product_rows::<MR_AVX2, NR_AVX2, true>(out, u, v, row0),
        avx512: product_rows::<MR_AVX512, NR_AVX512, true>(out, u, v, row0),
    }
}

/// Rows per rayon task: about `ELEMENTS_PER_TASK` elements, a multiple of the tile height.
fn rows_per_task(level: Level, n: usize) -> usize {
    let mr = mr(level);
    (ELEMENTS_PER_TASK / n).max(1).div_ceil(mr) * mr
}

/// Adds `u (m, R) @ v (R, n)` into `weight (m, n)` on `num_threads` threads (0: all cores).
/// `R = 0` leaves the weight untouched.
pub fn rank_update<W: Element>(
    weight: MatMut<'_, W>,
    u: MatRef<'_, f32>,
    v: MatRef<'_, f32>,
    num_threads: usize,
) -> Result<(), KernelError> {
    rank_update_at(Level::detected(), weight, u, v, num_threads)
}

pub(crate) fn rank_update_at<W: Element>(
    level: Level,
    mut weight: MatMut<'_, W>,
    u: MatRef<'_, f32>,
    v: MatRef<'_, f32>,
    num_threads: usize,
) -> Result<(), KernelError> {
    let (m, n) = weight.shape();
    check_shapes("weight", (m, n), u, v)?;
    if u.cols() == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    let rows = rows_per_task(level, n);
    let tasks = weight.data_mut().chunks_mut(rows * n).enumerate().collect();
    threads::map_tasks(num_threads, tasks, |(task, w)| {
        let row0 = task * rows;
        dispatch!(
            level,
            update_rows::<W, MR_PORTABLE, NR_PORTABLE, false>(w, u, v, row0, true),
            update_rows_avx2::<W>(w, u, v, row0),
            update_rows_avx512::<W>(w, u, v, row0)
        );
    })?;
    Ok(())
}

/// `u (m, R) @ v (R, n)` as a fresh `(m, n)` row-major `f32` matrix on `num_threads` threads
/// (0: all cores): the `delta` of [`rank_update`], bit for bit. See [`low_rank_product_into`].
pub fn low_rank_product(
    u: MatRef<'_, f32>,
    v: MatRef<'_, f32>,
    num_threads: usize,
) -> Result<Vec<f32>, KernelError> {
    let mut out = vec![0.0_f32; u.rows() * v.cols()];
    low_rank_product_into(
        MatMut::new("out", &mut out, u.rows(), v.cols())?,
        u,
        v,
        num_threads,
    )?;
    Ok(out)
}

/// Writes `u (m, R) @ v (R, n)` into `out (m, n)`, every element exactly once and none read:
/// on a fresh zeroed allocation the pages are first touched by these writes. (From Python the
/// buffer is a `numpy.zeros` array: numpy asks the kernel for transparent huge pages on large
/// arrays, which makes first touch about 4x cheaper here than on a plain `calloc`.)
/// `R = 0` writes zeros.
pub fn low_rank_product_into(
    out: MatMut<'_, f32>,
    u: MatRef<'_, f32>,
    v: MatRef<'_, f32>,
    num_threads: usize,
) -> Result<(), KernelError> {
    low_rank_product_at(Level::detected(), out, u, v, num_threads)
}

pub(crate) fn low_rank_product_at(
    level: Level,
    mut out: MatMut<'_, f32>,
    u: MatRef<'_, f32>,
    v: MatRef<'_, f32>,
    num_threads: usize,
) -> Result<(), KernelError> {
    let (m, n) = out.shape();
    check_shapes("out", (m, n), u, v)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if u.cols() == 0 {
        out.data_mut().fill(0.0);
        return Ok(());
    }
    let rows = rows_per_task(level, n);
    let tasks = out.data_mut().chunks_mut(rows * n).enumerate().collect();
    threads::map_tasks(num_threads, tasks, |(task, o)| {
        let row0 = task * rows;
        dispatch!(
            level,
            product_rows::<MR_PORTABLE, NR_PORTABLE, false>(o, u, v, row0),
            product_rows_avx2(o, u, v, row0),
            product_rows_avx512(o, u, v, row0)
        );
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::uniform;
    use half::{bf16, f16};
    use proptest::prelude::*;

    /// Reference: the f32 delta of each element (fused steps when `fma`), then one rounding of
    /// weight + delta.
    fn reference<W: Element>(
        fma: bool,
        weight: &[W],
        u: &[f32],
        v: &[f32],
        m: usize,
        rank: usize,
        n: usize,
    ) -> Vec<W> {
        let mut out = weight.to_vec();
        if rank == 0 {
            return out;
        }
        for i in 0..m {
            for j in 0..n {
                let mut delta = 0.0_f32;
                for r in 0..rank {
                    let (a, b) = (u[i * rank + r], v[r * n + j]);
                    delta = if fma {
                        a.mul_add(b, delta)
                    } else {
                        delta + a * b
                    };
                }
                out[i * n + j] = W::from_f32(weight[i * n + j].to_f32() + delta);
            }
        }
        out
    }

    fn check<W: Element + PartialEq + std::fmt::Debug>(
        m: usize,
        rank: usize,
        n: usize,
        threads: usize,
        seed: u64,
    ) {
        let weight: Vec<W> = uniform(seed, m * n, 1.0)
            .into_iter()
            .map(W::from_f32)
            .collect();
        let u = uniform(seed + 1, m * rank, 1.0);
        let v: Vec<f32> = uniform(seed + 2, rank * n, 1.0)
            .iter()
            .map(|x| x * 1e-2)
            .collect();
        for level in Level::available() {
            let want = reference(level.fma(), &weight, &u, &v, m, rank, n);
            let mut got = weight.clone();
            let um = MatRef::new("u", &u, m, rank).unwrap();
            let vm = MatRef::new("v", &v, rank, n).unwrap();
            rank_update_at(
                level,
                MatMut::new("weight", &mut got, m, n).unwrap(),
                um,
                vm,
                threads,
            )
            .unwrap();
            assert_eq!(got, want, "{} m={m} R={rank} n={n} {level:?}", W::NAME);
            // The bare product is the same delta: added to zeros it is the f32 reference.
            let zeros = vec![0.0_f32; m * n];
            let want = reference(level.fma(), &zeros, &u, &v, m, rank, n);
            let mut got = vec![f32::NAN; m * n];
            low_rank_product_at(
                level,
                MatMut::new("out", &mut got, m, n).unwrap(),
                um,
                vm,
                threads,
            )
            .unwrap();
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| (x + 0.0).to_bits()).collect::<Vec<_>>(),
                "product m={m} R={rank} n={n} {level:?}"
            );
            // `weight + product`, rounded once, is what `rank_update_at` wrote.
            let sum: Vec<W> = weight
                .iter()
                .zip(&got)
                .map(|(w, d)| W::from_f32(w.to_f32() + d))
                .collect();
            let mut merged = weight.clone();
            rank_update_at(
                level,
                MatMut::new("weight", &mut merged, m, n).unwrap(),
                um,
                vm,
                threads,
            )
            .unwrap();
            assert_eq!(sum, merged);
        }
    }

    #[test]
    fn all_dtypes_odd_shapes_and_threads() {
        for (m, rank, n) in [
            (1, 1, 1),
            (37, 4, 300),
            (5, 3, 70_000),
            (300, 8, 257),
            (64, 1, 256),
            (20, 64, 1300),
            (13, 130, 700),
            (7, 17, 16),
        ] {
            for threads in [1, 2] {
                check::<f32>(m, rank, n, threads, 1);
                check::<f16>(m, rank, n, threads, 2);
                check::<bf16>(m, rank, n, threads, 3);
            }
        }
    }

    #[test]
    fn rank_zero_is_a_no_op() {
        let mut w = vec![-0.0_f32, f32::NAN, 1.0];
        rank_update(
            MatMut::new("weight", &mut w, 1, 3).unwrap(),
            MatRef::new("u", &[], 1, 0).unwrap(),
            MatRef::new("v", &[], 0, 3).unwrap(),
            1,
        )
        .unwrap();
        assert_eq!(w[0].to_bits(), (-0.0_f32).to_bits());
        assert!(w[1].is_nan());
    }

    #[test]
    fn shape_errors_name_both_arguments() {
        let mut w = vec![0.0_f32; 10 * 7];
        let u = [0.0_f32; 8 * 4];
        let v = [0.0_f32; 4 * 7];
        let msg = |u_rows, u_cols, v_rows, v_cols, w: &mut [f32]| {
            rank_update(
                MatMut::new("weight", w, 10, 7).unwrap(),
                MatRef::new("u", &u[..u_rows * u_cols], u_rows, u_cols).unwrap(),
                MatRef::new("v", &v[..v_rows * v_cols], v_rows, v_cols).unwrap(),
                1,
            )
            .unwrap_err()
            .to_string()
        };
        assert_eq!(
            msg(8, 4, 4, 7, &mut w),
            "u has shape (8, 4) but weight has 10 rows"
        );
        let u = vec![0.0_f32; 10 * 4];
        let msg2 = |v_rows, v_cols, w: &mut [f32]| {
            rank_update(
                MatMut::new("weight", w, 10, 7).unwrap(),
                MatRef::new("u", &u, 10, 4).unwrap(),
                MatRef::new("v", &v[..v_rows * v_cols], v_rows, v_cols).unwrap(),
                1,
            )
            .unwrap_err()
            .to_string()
        };
        assert_eq!(
            msg2(4, 6, &mut w),
            "v has shape (4, 6) but weight has 7 columns"
        );
        assert_eq!(msg2(3, 7, &mut w), "v has shape (3, 7) but u has 4 columns");
    }

    proptest! {
        #[test]
        fn matches_reference(
            m in 0usize..80,
            rank in 0usize..9,
            n in 0usize..700,
            seed in any::<u64>(),
            threads in 1usize..4,
            dtype in 0u8..3,
        ) {
            match dtype {
                0 => check::<f32>(m, rank, n, threads, seed),
                1 => check::<f16>(m, rank, n, threads, seed),
                _ => check::<bf16>(m, rank, n, threads, seed),
            }
        }
    }
}
