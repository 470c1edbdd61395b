//! Tests of `writer::merge_file` on files built in memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use proptest::prelude::*;
use safetensors::tensor::Dtype;

use super::header::read_header;
use super::header::tests::{build, tmp_dir, write_tmp};
use super::test_data::{le_bytes, rand_f32};
use super::writer::{merge_file, Options, Update};
use super::StreamError;
use crate::element::Element;
use crate::matrix::{MatMut, MatRef};

fn run(
    src: &Path,
    dst: &Path,
    updates: &HashMap<String, Update<'_>>,
    opts: &Options,
) -> Result<u64, StreamError> {
    let mut total = 0;
    merge_file(src, dst, updates, opts, &mut |n| {
        total += n;
        Ok(())
    })?;
    Ok(total)
}

fn tensor_bytes(path: &Path, name: &str) -> Vec<u8> {
    let h = read_header(path).unwrap();
    let (s, e) = h.info(name).unwrap().data_offsets;
    let all = std::fs::read(path).unwrap();
    let start = h.data_start() as usize;
    all[start + s..start + e].to_vec()
}

/// `w + u @ v` rounded as `rank_update` rounds, over the whole matrix at once.
fn reference<W: Element>(w: &[W], u: MatRef<'_, f32>, v: MatRef<'_, f32>) -> Vec<W> {
    let mut w = w.to_vec();
    let (m, n) = (u.rows(), v.cols());
    crate::merge::rank_update(MatMut::new("w", &mut w, m, n).unwrap(), u, v, 1).unwrap();
    w
}

fn out_path(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn updates_are_applied_in_chunks_and_the_rest_is_copied() {
    let dir = tmp_dir("upd");
    let (m, n, r) = (37, 24, 3);
    let w32 = rand_f32(m * n, 1, 1.0);
    let w16: Vec<f16> = w32.iter().map(|&x| f16::from_f32(x)).collect();
    let wb: Vec<bf16> = w32
        .iter()
        .map(|&x| <bf16 as Element>::from_f32(x))
        .collect();
    let u = rand_f32(m * r, 2, 1.0);
    let v = rand_f32(r * n, 3, 1.0);
    let ids: Vec<i64> = (0..10).collect();
    let src = write_tmp(
        &dir,
        "src.safetensors",
        &build(
            &[
                ("ids", Dtype::I64, vec![10], le_bytes(&ids)),
                ("a", Dtype::F32, vec![m, n], le_bytes(&w32)),
                ("norm", Dtype::F32, vec![n], le_bytes(&w32[..n])),
                ("b", Dtype::F16, vec![m, n], le_bytes(&w16)),
                ("c", Dtype::BF16, vec![m, n], le_bytes(&wb)),
            ],
            Some(HashMap::from([("format".into(), "pt".into())])),
        ),
    );
    let (um, vm) = (
        MatRef::new("u", &u, m, r).unwrap(),
        MatRef::new("v", &v, r, n).unwrap(),
    );
    let up = Update { u: um, v: vm };
    let updates: HashMap<String, Update<'_>> = ["a", "b", "c"]
        .iter()
        .map(|k| ((*k).to_owned(), up))
        .collect();
    // Chunks of 5 rows (and one of 2): boundaries inside every tensor.
    for chunk_bytes in [5 * n * 4, 1, 1 << 20] {
        let dst = out_path(&dir, "dst.safetensors");
        let opts = Options {
            chunk_bytes,
            ..Options::default()
        };
        let total = run(&src, &dst, &updates, &opts).unwrap();
        assert_eq!(total, read_header(&src).unwrap().data_len());
        assert_eq!(
            std::fs::read(&src).unwrap()[..read_header(&src).unwrap().raw.len()],
            read_header(&dst).unwrap().raw[..]
        );
        assert_eq!(tensor_bytes(&dst, "a"), le_bytes(&reference(&w32, um, vm)));
        assert_eq!(tensor_bytes(&dst, "b"), le_bytes(&reference(&w16, um, vm)));
        assert_eq!(tensor_bytes(&dst, "c"), le_bytes(&reference(&wb, um, vm)));
        assert_eq!(tensor_bytes(&dst, "ids"), tensor_bytes(&src, "ids"));
        assert_eq!(tensor_bytes(&dst, "norm"), tensor_bytes(&src, "norm"));
        assert_ne!(tensor_bytes(&dst, "a"), tensor_bytes(&src, "a"));
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn out_dtype_converts_floats_first_then_merges() {
    let dir = tmp_dir("dtype");
    let (m, n, r) = (9, 16, 2);
    let w32 = rand_f32(m * n, 5, 1.0);
    let w64: Vec<f64> = w32.iter().map(|&x| f64::from(x) * 1.000_000_1).collect();
    let u = rand_f32(m * r, 6, 1.0);
    let v = rand_f32(r * n, 7, 1.0);
    let flags = vec![1_u8, 0, 1];
    let src = write_tmp(
        &dir,
        "src.safetensors",
        &build(
            &[
                ("w", Dtype::F32, vec![m, n], le_bytes(&w32)),
                ("flags", Dtype::BOOL, vec![3], flags.clone()),
                ("d", Dtype::F64, vec![m, n], le_bytes(&w64)),
            ],
            Some(HashMap::from([("format".into(), "pt".into())])),
        ),
    );
    let (um, vm) = (
        MatRef::new("u", &u, m, r).unwrap(),
        MatRef::new("v", &v, r, n).unwrap(),
    );
    let updates = HashMap::from([("w".to_owned(), Update { u: um, v: vm })]);
    let dst = out_path(&dir, "dst.safetensors");
    let opts = Options {
        out_dtype: Some(Dtype::BF16),
        chunk_bytes: 3 * n * 4,
        ..Options::default()
    };
    run(&src, &dst, &updates, &opts).unwrap();
    let h = read_header(&dst).unwrap();
    assert_eq!(h.names, ["w", "flags", "d"]);
    assert_eq!(h.raw.len() % 8, 0);
    assert_eq!(h.metadata.metadata().as_ref().unwrap()["format"], "pt");
    assert_eq!(h.info("w").unwrap().dtype, Dtype::BF16);
    assert_eq!(h.info("flags").unwrap().dtype, Dtype::BOOL);
    assert_eq!(h.info("d").unwrap().dtype, Dtype::BF16);
    let wb: Vec<bf16> = w32
        .iter()
        .map(|&x| <bf16 as Element>::from_f32(x))
        .collect();
    assert_eq!(tensor_bytes(&dst, "w"), le_bytes(&reference(&wb, um, vm)));
    assert_eq!(tensor_bytes(&dst, "flags"), flags);
    let db: Vec<bf16> = w64
        .iter()
        .map(|&x| <bf16 as Element>::from_f32(x as f32))
        .collect();
    assert_eq!(tensor_bytes(&dst, "d"), le_bytes(&db));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_updates_are_refused_before_anything_is_written() {
    let dir = tmp_dir("err");
    let w = rand_f32(12, 1, 1.0);
    let ids = [0_i32; 12];
    let src = write_tmp(
        &dir,
        "src.safetensors",
        &build(
            &[
                ("w", Dtype::F32, vec![3, 4], le_bytes(&w)),
                ("i", Dtype::I32, vec![3, 4], le_bytes(&ids)),
                ("t", Dtype::F32, vec![3, 2, 2], le_bytes(&w)),
            ],
            None,
        ),
    );
    let u = rand_f32(3 * 2, 2, 1.0);
    let v = rand_f32(2 * 4, 3, 1.0);
    let v5 = rand_f32(2 * 5, 3, 1.0);
    let good = Update {
        u: MatRef::new("u", &u, 3, 2).unwrap(),
        v: MatRef::new("v", &v, 2, 4).unwrap(),
    };
    let wide = Update {
        u: good.u,
        v: MatRef::new("v", &v5, 2, 5).unwrap(),
    };
    let cases = [
        ("nope", good, "no tensor nope"),
        (
            "w",
            wide,
            "tensor w: shape [3, 4] does not match the update's (3, 5)",
        ),
        ("i", good, "tensor i: dtype I32 cannot take a merge"),
        ("t", good, "tensor t: shape [3, 2, 2]"),
    ];
    for (name, up, msg) in cases {
        let dst = out_path(&dir, "dst.safetensors");
        let updates = HashMap::from([(name.to_owned(), up)]);
        let err = run(&src, &dst, &updates, &Options::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(&src.display().to_string()), "{err}");
        assert!(err.contains(msg), "{err}");
        assert!(!dst.exists());
    }
    // An existing destination is never overwritten.
    let dst = write_tmp(&dir, "exists", b"keep");
    let err = run(&src, &dst, &HashMap::new(), &Options::default()).unwrap_err();
    assert!(err.to_string().contains("creating"), "{err}");
    assert_eq!(std::fs::read(&dst).unwrap(), b"keep");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_cancelled_merge_leaves_no_file() {
    let dir = tmp_dir("cancel");
    let w = rand_f32(64 * 8, 1, 1.0);
    let src = write_tmp(
        &dir,
        "src.safetensors",
        &build(&[("w", Dtype::F32, vec![64, 8], le_bytes(&w))], None),
    );
    let u = rand_f32(64, 2, 1.0);
    let v = rand_f32(8, 3, 1.0);
    let updates = HashMap::from([(
        "w".to_owned(),
        Update {
            u: MatRef::new("u", &u, 64, 1).unwrap(),
            v: MatRef::new("v", &v, 1, 8).unwrap(),
        },
    )]);
    let dst = out_path(&dir, "dst.safetensors");
    let opts = Options {
        chunk_bytes: 8 * 4 * 4,
        ..Options::default()
    };
    let mut calls = 0;
    let err = merge_file(&src, &dst, &updates, &opts, &mut |_| {
        calls += 1;
        if calls == 3 {
            Err(StreamError::Cancelled)
        } else {
            Ok(())
        }
    })
    .unwrap_err();
    assert!(matches!(err, StreamError::Cancelled));
    assert!(!dst.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_finite_weight_that_overflows_is_an_error_and_an_infinite_one_is_kept() {
    let dir = tmp_dir("overflow");
    let mut w = vec![1.0_f32; 4 * 2];
    w[0] = f32::INFINITY; // already infinite in the base: kept as it is
    let src = write_tmp(
        &dir,
        "src.safetensors",
        &build(&[("w", Dtype::F32, vec![4, 2], le_bytes(&w))], None),
    );
    let merge = |u: &[f32], name: &str| {
        let v = [4.0_f32, 4.0];
        let updates = HashMap::from([(
            "w".to_owned(),
            Update {
                u: MatRef::new("u", u, 4, 1).unwrap(),
                v: MatRef::new("v", &v, 1, 2).unwrap(),
            },
        )]);
        let dst = out_path(&dir, name);
        (run(&src, &dst, &updates, &Options::default()), dst)
    };
    let (ok, _) = merge(&[1.0, 1.0, 1.0, 1.0], "ok.safetensors");
    ok.unwrap();
    let (bad, dst) = merge(&[1.0, 1.0, f32::MAX, 1.0], "bad.safetensors");
    let err = bad.unwrap_err().to_string();
    assert!(
        err.contains("tensor w: weight at (2, 0) is finite but its merged value is not"),
        "{err}"
    );
    assert!(!dst.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

const DTYPES: [(Dtype, usize); 7] = [
    (Dtype::F32, 4),
    (Dtype::F16, 2),
    (Dtype::BF16, 2),
    (Dtype::I64, 8),
    (Dtype::U8, 1),
    (Dtype::BOOL, 1),
    (Dtype::F64, 8),
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// With nothing to merge and no dtype change the output is the input, byte for byte.
    #[test]
    fn round_trip_without_updates(
        specs in prop::collection::vec((0..DTYPES.len(), prop::collection::vec(0_usize..5, 0..3)), 0..6),
        seed in any::<u8>(),
        chunk_bytes in 1_usize..64,
    ) {
        let dir = tmp_dir(&format!("prop{seed}-{chunk_bytes}"));
        let names: Vec<String> = (0..specs.len()).map(|i| format!("t{i}")).collect();
        let tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = specs
            .iter()
            .zip(&names)
            .enumerate()
            .map(|(i, ((d, shape), name))| {
                let (dtype, size) = DTYPES[*d];
                let n: usize = shape.iter().product::<usize>() * size;
                let data = (0..n).map(|j| (j * 31 + i * 7 + usize::from(seed)) as u8).collect();
                (name.as_str(), dtype, shape.clone(), data)
            })
            .collect();
        let bytes = build(&tensors, Some(HashMap::from([("k".into(), "v".into())])));
        let src = write_tmp(&dir, "src", &bytes);
        let dst = out_path(&dir, "dst");
        let opts = Options { chunk_bytes, ..Options::default() };
        let total = run(&src, &dst, &HashMap::new(), &opts).unwrap();
        prop_assert_eq!(std::fs::read(&dst).unwrap(), bytes);
        prop_assert_eq!(total, read_header(&src).unwrap().data_len());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
