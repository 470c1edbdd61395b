//! Tests of `adapter::adapter_factors` on adapter files built in memory.

use std::path::Path;

use half::bf16;
use safetensors::tensor::Dtype;

use super::adapter::{
    adapter_factors, adapter_modules, AdapterConfig, Factors, Shape, Want, BANK_KEY,
};
use super::header::tests::{build, tmp_dir, write_tmp};
use super::test_data::{le_bytes, rand_f32};

const CFG: AdapterConfig = AdapterConfig {
    topk: 3,
    num_vectors: 20,
    vector_length: 4,
};
/// (name, dtype, shape, bytes) of each tensor of a file.
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

const M: &str = "base_model.model.layer.q";

/// Top-k (largest first) of one logits row and the softmax of those logits.
fn top(row: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    let max = row[idx[0]];
    let e: Vec<f32> = idx[..k].iter().map(|&i| (row[i] - max).exp()).collect();
    let s: f32 = e.iter().sum();
    idx[..k].iter().zip(e).map(|(&i, x)| (i, x / s)).collect()
}

/// Gathered `(rows, L)` from logits `(rows, nv)`.
fn gather(logits: &[f32], bank: &[f32]) -> Vec<f32> {
    let l = CFG.vector_length;
    logits
        .chunks(CFG.num_vectors)
        .flat_map(|row| {
            let mut out = vec![0.0_f32; l];
            for (i, w) in top(row, CFG.topk) {
                for (o, b) in out.iter_mut().zip(&bank[i * l..(i + 1) * l]) {
                    *o += w * b;
                }
            }
            out
        })
        .collect()
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-6, "{x} vs {y}");
    }
}

struct Case {
    r: usize,
    in_t: usize,
    out_t: usize,
    bank: Vec<f32>,
    la: Vec<f32>,
    lb: Vec<f32>,
}

impl Case {
    fn new() -> Self {
        let (r, in_t, out_t) = (2, 3, 5);
        let nv = CFG.num_vectors;
        Case {
            r,
            in_t,
            out_t,
            bank: rand_f32(nv * CFG.vector_length, 1, 2.0),
            la: rand_f32(r * in_t * nv, 2, 2.0),
            lb: rand_f32(out_t * r * nv, 3, 2.0),
        }
    }

    fn full(&self) -> Tensors {
        let nv = CFG.num_vectors;
        vec![
            (
                BANK_KEY.into(),
                Dtype::F32,
                vec![nv, CFG.vector_length],
                le_bytes(&self.bank),
            ),
            (
                format!("{M}.vblora_logits_A"),
                Dtype::F32,
                vec![self.r, self.in_t, nv],
                le_bytes(&self.la),
            ),
            (
                format!("{M}.vblora_logits_B"),
                Dtype::F32,
                vec![self.out_t, self.r, nv],
                le_bytes(&self.lb),
            ),
        ]
    }

    /// Top-K tensors of one logits array `(d0, d1, nv)`, as PEFT saves them.
    fn topk(logits: &[f32]) -> (Vec<i16>, Vec<f32>) {
        let (mut idx, mut w) = (vec![], vec![]);
        for row in logits.chunks(CFG.num_vectors) {
            let t = top(row, CFG.topk);
            idx.extend(t.iter().map(|(i, _)| *i as i16));
            w.extend(t[..CFG.topk - 1].iter().map(|(_, x)| *x));
        }
        (idx, w)
    }

    fn topk_tensors(&self) -> Tensors {
        let (k, nv) = (CFG.topk, CFG.num_vectors);
        let (ia, wa) = Self::topk(&self.la);
        let (ib, wb) = Self::topk(&self.lb);
        vec![
            (
                BANK_KEY.into(),
                Dtype::F32,
                vec![nv, CFG.vector_length],
                le_bytes(&self.bank),
            ),
            (
                format!("{M}.vblora_logits_A_topk_indices"),
                Dtype::I16,
                vec![self.r, self.in_t, k],
                le_bytes(&ia),
            ),
            (
                format!("{M}.vblora_logits_A_topk_weights"),
                Dtype::F32,
                vec![self.r, self.in_t, k - 1],
                le_bytes(&wa),
            ),
            (
                format!("{M}.vblora_logits_B_topk_indices"),
                Dtype::I16,
                vec![self.out_t, self.r, k],
                le_bytes(&ib),
            ),
            (
                format!("{M}.vblora_logits_B_topk_weights"),
                Dtype::F32,
                vec![self.out_t, self.r, k - 1],
                le_bytes(&wb),
            ),
        ]
    }

    fn check(&self, f: &Factors) {
        let l = CFG.vector_length;
        assert_eq!(
            (f.rank, f.fan_in, f.fan_out),
            (self.r, self.in_t * l, self.out_t * l)
        );
        close(&f.a, &gather(&self.la, &self.bank));
        let g = gather(&self.lb, &self.bank);
        let mut b = vec![0.0; g.len()];
        for o in 0..self.out_t {
            for j in 0..self.r {
                for x in 0..l {
                    b[(o * l + x) * self.r + j] = g[(o * self.r + j) * l + x];
                }
            }
        }
        close(&f.b, &b);
    }
}

fn write(dir: &Path, name: &str, tensors: &Tensors) -> std::path::PathBuf {
    let t: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
        .collect();
    write_tmp(dir, name, &build(&t, None))
}

#[test]
fn full_and_topk_files_give_the_same_factors() {
    let dir = tmp_dir("adapter");
    let case = Case::new();
    let full = adapter_factors(&write(&dir, "full", &case.full()), &CFG, 1).unwrap();
    assert_eq!(full.keys().collect::<Vec<_>>(), [M]);
    case.check(&full[M]);
    let topk = adapter_factors(&write(&dir, "topk", &case.topk_tensors()), &CFG, 2).unwrap();
    case.check(&topk[M]);
    // A bf16 bank and bf16 logits are widened exactly.
    let mut t = case.full();
    let to_bf16 = |xs: &[f32]| -> (Vec<f32>, Vec<u8>) {
        let b: Vec<bf16> = xs.iter().map(|&x| bf16::from_f32(x)).collect();
        (b.iter().map(|x| x.to_f32()).collect(), le_bytes(&b))
    };
    let (bank, bytes) = to_bf16(&case.bank);
    t[0] = (t[0].0.clone(), Dtype::BF16, t[0].2.clone(), bytes);
    let (la, bytes) = to_bf16(&case.la);
    t[1] = (t[1].0.clone(), Dtype::BF16, t[1].2.clone(), bytes);
    let got = adapter_factors(&write(&dir, "bf16", &t), &CFG, 1).unwrap();
    Case {
        bank,
        la,
        ..Case::new()
    }
    .check(&got[M]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn shapes_come_first_and_factors_only_for_the_modules_asked_for() {
    let dir = tmp_dir("shapes");
    let case = Case::new();
    let path = write(&dir, "topk", &case.topk_tensors());
    let shapes = adapter_modules(&path, &CFG, Want::Shapes, 1).unwrap();
    let want = Shape {
        rank: case.r,
        fan_in: case.in_t * CFG.vector_length,
        fan_out: case.out_t * CFG.vector_length,
    };
    assert_eq!(shapes[M].shape, want);
    assert!(shapes[M].factors.is_none());
    let none = adapter_modules(&path, &CFG, Want::Factors(&[]), 1).unwrap();
    assert!(none[M].factors.is_none());
    let built = adapter_modules(&path, &CFG, Want::Factors(&[M.to_owned()]), 1).unwrap();
    case.check(built[M].factors.as_ref().unwrap());
    // A shapes-only read still validates every row.
    let mut t = case.topk_tensors();
    t[1].3 = le_bytes(&vec![1_i16; case.r * case.in_t * CFG.topk]);
    let bad = write(&dir, "repeat", &t);
    let err = adapter_modules(&bad, &CFG, Want::Shapes, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("repeats index 1"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_infinite_logit_is_refused() {
    let dir = tmp_dir("inflogit");
    let case = Case::new();
    let mut t = case.full();
    let mut la = case.la.clone();
    la[CFG.num_vectors + 2] = f32::INFINITY;
    t[1].3 = le_bytes(&la);
    let path = write(&dir, "inf", &t);
    let err = adapter_modules(&path, &CFG, Want::Shapes, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 1 holds +inf logits"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_adapters_are_refused_naming_file_and_tensor() {
    let dir = tmp_dir("badadapter");
    let case = Case::new();
    let k = CFG.topk;
    let ia = format!("{M}.vblora_logits_A_topk_indices");
    let wa = format!("{M}.vblora_logits_A_topk_weights");
    let mut cases: Vec<(&str, Tensors, String)> = vec![];
    let mut t = case.topk_tensors();
    let mut idx = vec![0_i16; case.r * case.in_t * k];
    idx.iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = (i % 20) as i16);
    idx[4] = 20;
    t[1].3 = le_bytes(&idx);
    cases.push((
        "range",
        t,
        format!("tensor {ia} row 1 holds index 20, outside [0, 20)"),
    ));
    let mut t = case.topk_tensors();
    let mut w = vec![0.3_f32; case.r * case.in_t * (k - 1)];
    w[3] = -0.1;
    t[2].3 = le_bytes(&w);
    cases.push((
        "neg",
        t,
        format!("tensor {wa} row 1 holds weight -0.1, weights must be >= 0"),
    ));
    let mut t = case.topk_tensors();
    w[3] = 0.8;
    t[2].3 = le_bytes(&w);
    cases.push((
        "sum",
        t,
        format!("tensor {wa} row 1 has weights summing to 1.1"),
    ));
    let mut t = case.topk_tensors();
    t[1].3 = le_bytes(&vec![1_i16; case.r * case.in_t * k]);
    cases.push(("repeat", t, format!("tensor {ia} row 0 repeats index 1")));
    let mut t = case.topk_tensors();
    t[1].1 = Dtype::F16;
    cases.push((
        "intdtype",
        t,
        format!("tensor {ia} has dtype F16, expected an integer dtype"),
    ));
    let mut t = case.topk_tensors();
    t.remove(2);
    cases.push((
        "pair",
        t,
        format!("tensor {M}.vblora_logits_A_topk_indices has no"),
    ));
    let mut t = case.full();
    t.remove(0);
    cases.push(("nobank", t, format!("missing tensor {BANK_KEY}")));
    let mut t = case.full();
    t.remove(2);
    cases.push(("noB", t, format!("missing tensor {M}.vblora_logits_B")));
    let mut t = case.full();
    t[0].2 = vec![10, 8];
    cases.push((
        "bankshape",
        t,
        format!("tensor {BANK_KEY} has shape [10, 8]"),
    ));
    let mut t = case.full();
    t.push((
        "base_model.model.layer.q.bias".into(),
        Dtype::F32,
        vec![1],
        le_bytes(&[0.0_f32]),
    ));
    cases.push((
        "bias",
        t,
        "tensor base_model.model.layer.q.bias is neither".into(),
    ));
    let mut t = case.full();
    t[2].2 = vec![case.r, case.out_t, CFG.num_vectors];
    cases.push((
        "rank",
        t,
        format!("module {M}: vblora_logits_A has rank 2 but vblora_logits_B has rank 5"),
    ));
    let mut t = case.full();
    let mut la = case.la.clone();
    la[45] = f32::NAN;
    t[1].3 = le_bytes(&la);
    cases.push((
        "nan",
        t,
        format!("tensor {M}.vblora_logits_A: logits row 2 contains NaN"),
    ));
    for (name, tensors, msg) in cases {
        let path = write(&dir, name, &tensors);
        let err = adapter_factors(&path, &CFG, 1).unwrap_err().to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert!(err.contains(&msg), "{name}: {err}");
    }
    let err = adapter_factors(&dir.join("none"), &CFG, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("reading"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}
