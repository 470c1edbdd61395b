//! Rank-R update of a weight in place: `weight[i, j] = from_f32(to_f32(weight[i, j]) + delta)`
//! with `delta = sum_{r in 0..R} u[i, r] * v[r, j]` accumulated in `f32` from `0.0` in order `r`.
//!
//! `delta` is finished before it meets the weight, as in torch's `W.float() + B @ A`, so the one
//! rounding into `f16`/`bf16` sees the whole `f32` sum. The accumulation is a plain `acc + u * v`,
//! never `mul_add`: without a target-cpu flag `mul_add` is a libm call, and fusing would make the
//! bits depend on the build. Each task owns whole rows; within a row the columns go in
//! `CHUNK`-wide pieces (delta in a stack buffer, each `v` row streamed contiguously) so the loops
//! vectorise and the weight is read and written exactly once.

use rayon::prelude::*;

use crate::element::{Element, CHUNK};
use crate::error::{Dim, KernelError};
use crate::matrix::{MatMut, MatRef};
use crate::threads;

/// Weight elements handed to one rayon task (whole rows, at least one).
const ELEMENTS_PER_TASK: usize = 1 << 16;

/// Adds `u (m, R) @ v (R, n)` into `weight (m, n)` on `num_threads` threads (0: all cores).
/// `R = 0` leaves the weight untouched.
pub fn rank_update<W: Element>(
    mut weight: MatMut<'_, W>,
    u: MatRef<'_, f32>,
    v: MatRef<'_, f32>,
    num_threads: usize,
) -> Result<(), KernelError> {
    let (m, n) = weight.shape();
    let checks = [
        ("u", u.shape(), "weight", Dim::Rows, m, u.rows()),
        ("v", v.shape(), "weight", Dim::Columns, n, v.cols()),
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
    let rank = u.cols();
    if rank == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    let rows_per_task = (ELEMENTS_PER_TASK / n).max(1);
    threads::run(num_threads, || {
        weight
            .data_mut()
            .par_chunks_mut(rows_per_task * n)
            .enumerate()
            .for_each(|(task, rows)| {
                let mut delta = [0.0_f32; CHUNK];
                for (r, w_row) in rows.chunks_mut(n).enumerate() {
                    let u_row = u.row(task * rows_per_task + r);
                    for (c, w) in w_row.chunks_mut(CHUNK).enumerate() {
                        let start = c * CHUNK;
                        let delta = &mut delta[..w.len()];
                        delta.fill(0.0);
                        for (p, &ur) in u_row.iter().enumerate() {
                            let vr = &v.row(p)[start..start + w.len()];
                            for (d, &x) in delta.iter_mut().zip(vr) {
                                *d += ur * x;
                            }
                        }
                        W::add_f32(w, delta);
                    }
                }
            });
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use proptest::prelude::*;

    /// Reference: the f32 delta of each element, then one rounding of weight + delta.
    fn reference<W: Element>(
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
                    delta += u[i * rank + r] * v[r * n + j];
                }
                out[i * n + j] = W::from_f32(weight[i * n + j].to_f32() + delta);
            }
        }
        out
    }

    fn values(seed: u64, len: usize) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn check<W: Element + PartialEq + std::fmt::Debug>(
        m: usize,
        rank: usize,
        n: usize,
        threads: usize,
        seed: u64,
    ) {
        let weight: Vec<W> = values(seed, m * n).into_iter().map(W::from_f32).collect();
        let u = values(seed + 1, m * rank);
        let v: Vec<f32> = values(seed + 2, rank * n)
            .iter()
            .map(|x| x * 1e-2)
            .collect();
        let want = reference(&weight, &u, &v, m, rank, n);
        let mut got = weight.clone();
        rank_update(
            MatMut::new("weight", &mut got, m, n).unwrap(),
            MatRef::new("u", &u, m, rank).unwrap(),
            MatRef::new("v", &v, rank, n).unwrap(),
            threads,
        )
        .unwrap();
        assert_eq!(got, want, "{} m={m} R={rank} n={n}", W::NAME);
    }

    #[test]
    fn all_dtypes_odd_shapes_and_threads() {
        for (m, rank, n) in [
            (1, 1, 1),
            (37, 4, 300),
            (5, 3, 70_000),
            (300, 8, 257),
            (64, 1, 256),
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
