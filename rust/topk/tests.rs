//! Every path of the selection against a reference (the `stl` port on the whole row), at every
//! SIMD level, ties as torch orders them, NaN rows, several matrices, half precision; proptests.

use super::prefetch;
use super::scan::FAST_CHUNK;
use super::stl::{self, uses_partial_sort, Elem};
use super::*;
use crate::test_rng::uniform;
use half::{bf16, f16};
use proptest::prelude::*;

/// Reference: torch's algorithm on the whole queue, with no skipping (`stl` on every pair),
/// then the softmax of the kept logits.
pub(crate) fn reference(logits: &[f32], n: usize, k: usize) -> Result<(Vec<i64>, Vec<f32>), usize> {
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
        let mut w = vec![0.0_f32; k];
        super::softmax::softmax_into(kept.iter().map(|&(x, _)| x), &mut w);
        indices.extend(kept.iter().map(|&(_, i)| i as i64));
        weights.extend(w);
    }
    Ok((indices, weights))
}

/// `topk_softmax` at every available SIMD level, prefetching and not; they must all agree.
pub(crate) fn topk_all_levels<T: Element>(
    logits: MatRef<'_, T>,
    k: usize,
    threads: usize,
) -> Result<(Vec<i64>, Vec<f32>), KernelError> {
    let mut results = Level::available().into_iter().flat_map(|level| {
        [Prefetch::Off, Prefetch::On].map(|pf| topk_softmax_at(level, Some(pf), logits, k, threads))
    });
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
    let got = topk_all_levels(MatRef::new("logits", logits, rows, n).unwrap(), k, threads).unwrap();
    let want = reference(logits, n, k).unwrap();
    assert_eq!(got.0, want.0, "indices, n={n} k={k}");
    let same = got
        .1
        .iter()
        .zip(&want.1)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "weights {:?} != {:?}", got.1, want.1);
}

#[test]
fn k1_k2_and_k_equal_n() {
    for &n in &[1, 7, 8, 255, 256, 257, 1000] {
        let x = uniform(n as u64, 5 * n, 4.0);
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
    let x = uniform(9, 130 * n, 4.0);
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
        let mut x = uniform(n as u64, rows * n, 4.0);
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
                479, 2359, 1029, 1629, 484, 2354, 2349, 2289, 1634, 1024, 2344, 494, 2339, 1639,
                499, 2334, 1019, 2329, 574,
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
    let mut x = uniform(3, 300 * 64, 4.0);
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
        .map(|(i, &(r, n))| uniform(i as u64 + 11, r * n, 4.0))
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
    let (i, w) = topk_all_levels(MatRef::<f32>::new("logits", &[], 0, 4).unwrap(), 2, 1).unwrap();
    assert!(i.is_empty() && w.is_empty());
}

#[test]
fn half_precision_logits() {
    let x = uniform(5, 40 * 333, 4.0);
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
        let mut x = uniform(seed, rows * n, 4.0);
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
        let mut x = uniform(seed, rows * n, 4.0);
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

#[test]
fn the_first_large_call_measures_both_variants_and_keeps_one() {
    // The only test that lets a call measure (the others fix the variant or are small).
    let forced = matches!(
        std::env::var("VBLORA_RS_TOPK_PREFETCH").as_deref(),
        Ok("on" | "off")
    );
    let seen = std::sync::Mutex::new(Vec::new());
    let tasks: Vec<usize> = (0..100).collect();
    let failed = run_tasks(2, tasks, prefetch::MEASURE_BYTES, true, None, |t, pf| {
        seen.lock().unwrap().push((t, pf));
        None::<()>
    })
    .unwrap();
    assert!(failed.is_none());
    let mut seen = seen.into_inner().unwrap();
    seen.sort_by_key(|s| s.0);
    let order: Vec<usize> = seen.iter().map(|s| s.0).collect();
    assert_eq!(order, (0..100).collect::<Vec<_>>(), "every task once");
    let decided = prefetch::chosen().expect("decided after a large call");
    if !forced {
        // The first tasks ran both variants, half each; the rest the one kept.
        let on = seen[..12].iter().filter(|s| s.1 == Prefetch::On).count();
        assert_eq!(on, 6);
        assert!(seen[12..].iter().all(|s| s.1 == decided));
    }
    // Later calls, large or small, keep it.
    for bytes in [0, prefetch::MEASURE_BYTES] {
        let tasks: Vec<usize> = (0..30).collect();
        let got = run_tasks(1, tasks, bytes, true, None, |_, pf| Some(pf)).unwrap();
        assert_eq!(got, Some(decided));
    }
}
