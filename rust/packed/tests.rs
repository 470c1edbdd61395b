//! Round trips, every rejection path of `decode`, and proptests: encode -> decode is the identity,
//! and mutated files never make `decode` panic.

use std::borrow::Cow;
use std::collections::BTreeMap;

use half::{bf16, f16};
use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;

/// Deterministic xorshift, so that failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1_u64 << 24) as f32
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    F32,
    F16,
    BF16,
}

fn floats(kind: Kind, values: Vec<f32>) -> FloatData<'static> {
    match kind {
        Kind::F32 => FloatData::F32(Cow::Owned(values)),
        Kind::F16 => FloatData::F16(Cow::Owned(values.into_iter().map(f16::from_f32).collect())),
        Kind::BF16 => FloatData::BF16(Cow::Owned(values.into_iter().map(bf16::from_f32).collect())),
    }
}

fn module(path: &str, r: usize, in_sub: usize, out_sub: usize) -> Module {
    Module {
        path: path.into(),
        r,
        in_sub,
        out_sub,
    }
}

/// A valid packed adapter with random contents.
#[allow(clippy::too_many_arguments)]
fn sample(
    num_vectors: usize,
    vector_length: usize,
    topk: usize,
    modules: Vec<Module>,
    weights_kind: Kind,
    bank_kind: Kind,
    extras: usize,
    seed: u64,
) -> Packed<'static> {
    let mut rng = Rng(seed | 1);
    let s: usize = modules.iter().map(|m| m.sub_vectors().unwrap()).sum();
    // Distinct indices in every row, as PEFT's topk gives them.
    let mut indices = Vec::with_capacity(s * topk);
    for _ in 0..s {
        let row_start = indices.len();
        while indices.len() < row_start + topk {
            let v = rng.below(num_vectors as u64) as i64;
            if !indices[row_start..].contains(&v) {
                indices.push(v);
            }
        }
    }
    let mut weights = Vec::with_capacity(s * (topk - 1));
    for _ in 0..s {
        let raw: Vec<f32> = (0..topk).map(|_| rng.unit() + 1e-3).collect();
        let total: f32 = raw.iter().sum();
        // 0.99: room for the rounding of f16/bf16, so that every row stays a valid softmax prefix.
        weights.extend(raw[..topk - 1].iter().map(|w| 0.99 * w / total));
    }
    let bank = (0..num_vectors * vector_length)
        .map(|_| rng.unit() - 0.5)
        .collect();
    let dtypes = [Dtype::F32, Dtype::I64, Dtype::BF16, Dtype::U8, Dtype::BOOL];
    let extras = (0..extras)
        .map(|i| {
            let dtype = dtypes[i % dtypes.len()];
            let shape = vec![1 + rng.below(3) as usize, rng.below(4) as usize];
            let len = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            let data = (0..len).map(|_| (rng.next() % 2) as u8).collect();
            Extra {
                name: format!("base_model.model.extra{i}.weight"),
                dtype,
                shape,
                data: Cow::Owned(data),
            }
        })
        .collect();
    let metadata = BTreeMap::from([
        (
            "indices_dtype".to_owned(),
            if num_vectors <= 256 { "uint8" } else { "int16" }.to_owned(),
        ),
        ("key_prefix".to_owned(), "base_model.model.".to_owned()),
        ("config".to_owned(), r#"{"peft_type":"VBLORA"}"#.to_owned()),
    ]);
    Packed {
        metadata,
        modules,
        num_vectors,
        vector_length,
        topk,
        indices: Cow::Owned(indices),
        weights: floats(weights_kind, weights),
        bank: floats(bank_kind, bank),
        extras,
    }
}

fn small() -> Packed<'static> {
    let modules = vec![module("layers.0.q", 2, 3, 4), module("layers.0.v", 1, 2, 2)];
    sample(30, 8, 2, modules, Kind::F32, Kind::F32, 2, 7)
}

/// `decode(encode(p))` gives back `p` plus the fields the encoder computes.
fn assert_round_trip(p: &Packed<'_>) {
    let bytes = encode(p).unwrap();
    let back = decode(&bytes).unwrap();
    for (k, v) in &p.metadata {
        assert_eq!(back.metadata.get(k), Some(v), "metadata {k}");
    }
    assert_eq!(back.metadata["vblora_packed"], "1");
    assert_eq!(back.metadata["index_bits"], p.index_bits().to_string());
    let mut expected = Packed {
        metadata: back.metadata.clone(),
        ..p.clone()
    };
    expected.extras.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(back, expected);
}

/// The header JSON and the data of a file.
fn split(file: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&file[8..8 + n]).unwrap(),
        file[8 + n..].to_vec(),
    )
}

fn join(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut text = serde_json::to_string(header).unwrap().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(data);
    out
}

fn edit_header(file: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let (mut header, data) = split(file);
    edit(&mut header);
    join(&header, &data)
}

fn set_meta(file: &[u8], field: &str, value: &str) -> Vec<u8> {
    edit_header(file, |h| h["__metadata__"][field] = json!(value))
}

fn decode_err(file: &[u8]) -> String {
    decode(file).unwrap_err().to_string()
}

/// Replaces the bytes of tensor `name` (same length).
fn with_tensor_bytes(file: &[u8], name: &str, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let (header, mut data) = split(file);
    let offsets = &header[name]["data_offsets"];
    let (s, e) = (
        offsets[0].as_u64().unwrap() as usize,
        offsets[1].as_u64().unwrap() as usize,
    );
    edit(&mut data[s..e]);
    join(&header, &data)
}

#[test]
fn round_trip_every_dtype_and_k() {
    let modules = || vec![module("a", 2, 3, 1), module("b.c", 1, 1, 5)];
    for (k, w, b) in [
        (1, Kind::F32, Kind::F32),
        (2, Kind::F16, Kind::BF16),
        (3, Kind::BF16, Kind::F16),
        (30, Kind::F32, Kind::BF16),
    ] {
        assert_round_trip(&sample(30, 4, k, modules(), w, b, 3, k as u64));
    }
    // One vector: every index is 0, one bit each.
    assert_round_trip(&sample(1, 3, 1, modules(), Kind::F32, Kind::F32, 0, 1));
}

#[test]
fn layout_is_the_documented_one() {
    let p = small();
    let bytes = encode(&p).unwrap();
    let (header, data) = split(&bytes);
    let meta = &header["__metadata__"];
    assert_eq!(meta["format"], "pt");
    assert_eq!(
        meta["modules"],
        r#"[["layers.0.q",2,3,4],["layers.0.v",1,2,2]]"#
    );
    assert_eq!(meta["num_vectors"], "30");
    assert_eq!(meta["index_bits"], "5");
    let s = 2 * 7 + 4;
    assert_eq!(
        header["topk_indices"]["shape"],
        json!([(s * 2 * 5 + 7) / 8])
    );
    assert_eq!(header["topk_weights"]["shape"], json!([s, 1]));
    assert_eq!(header["vector_bank"]["shape"], json!([30, 8]));
    // The packed stream is the documented bit layout of the indices.
    let o = &header["topk_indices"]["data_offsets"];
    let stream = &data[o[0].as_u64().unwrap() as usize..o[1].as_u64().unwrap() as usize];
    for (j, &v) in p.indices.iter().enumerate() {
        let got = (0..5).fold(0, |acc, t| {
            let bit = j * 5 + t;
            acc | ((i64::from(stream[bit / 8]) >> (bit % 8)) & 1) << t
        });
        assert_eq!(got, v, "index {j}");
    }
}

#[test]
fn encode_to_file_writes_the_same_bytes_atomically() {
    let dir = std::env::temp_dir().join(format!("vblora_packed_test_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("adapter_packed.safetensors");
    let p = small();
    let size = encode_to_file(&p, &path).unwrap();
    assert_eq!(size, std::fs::metadata(&path).unwrap().len());
    assert_eq!(
        decode_file(&path).unwrap(),
        decode(&encode(&p).unwrap()).unwrap()
    );
    // A refused encode leaves the old file and no temporary file behind.
    let mut bad = p.clone();
    bad.indices.to_mut()[0] = 30;
    assert!(encode_to_file(&bad, &path).is_err());
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("adapter_packed.safetensors")]
    );
    std::fs::remove_dir_all(&dir).unwrap();
    // I/O failures keep the OS error and name the file (the binding raises them as OSError).
    let err = decode_file(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "reading {}: {}",
            path.display(),
            std::io::Error::from_raw_os_error(2)
        )
    );
    let PackedError::Io {
        path: at, source, ..
    } = err
    else {
        panic!("not an I/O error: {err}")
    };
    assert_eq!(
        (at, source.kind()),
        (path.clone(), std::io::ErrorKind::NotFound)
    );
    let err = encode_to_file(&p, &path).unwrap_err();
    assert!(
        matches!(&err, PackedError::Io { path: at, source, .. } if *at == path && source.kind() == std::io::ErrorKind::NotFound),
        "{err}"
    );
}

#[test]
fn encode_refuses_bad_input() {
    let check = |edit: &dyn Fn(&mut Packed<'static>), want: &str| {
        let mut p = small();
        edit(&mut p);
        let msg = encode(&p).unwrap_err().to_string();
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
    };
    check(&|p| p.indices.to_mut()[5] = 30, "argument `indices` row 2 (layers.0.q.vblora_logits_A[0, 2]) holds index 30, outside [0, 30)");
    check(
        &|p| p.indices.to_mut()[0] = -1,
        "holds index -1, outside [0, 30)",
    );
    check(
        &|p| p.indices.to_mut().push(0),
        "argument `indices` holds 37 values, expected 18 x 2",
    );
    check(
        &|p| {
            p.metadata.remove("config");
        },
        "lacks the `config` entry",
    );
    check(
        &|p| {
            p.metadata.insert("indices_dtype".into(), "float".into());
        },
        "metadata[indices_dtype]",
    );
    check(
        &|p| {
            p.metadata.insert("topk".into(), "3".into());
        },
        "argument `metadata[topk]` is \"3\" but the data gives \"2\"",
    );
    check(&|p| p.topk = 31, "argument `topk` is 31");
    check(
        &|p| p.modules[1].path = "layers.0.q".into(),
        "lists module \"layers.0.q\" twice",
    );
    check(
        &|p| p.weights = floats(Kind::F32, vec![1.5; 18]),
        "argument `weights` row 0 (layers.0.q.vblora_logits_A[0, 0]) has weights summing to 1.5",
    );
    check(
        &|p| p.weights = floats(Kind::F32, vec![f32::NAN; 18]),
        "must be finite",
    );
    check(
        &|p| p.bank = floats(Kind::F16, vec![f32::INFINITY; 240]),
        "argument `bank` row 0 holds inf",
    );
    check(
        &|p| p.extras[0].name = "topk_indices".into(),
        "reuse the tensor name \"topk_indices\"",
    );
    check(
        &|p| p.extras[0].name = "base_model.model.layers.0.v.vblora_logits_B_topk_weights".into(),
        "reuse the tensor name",
    );
    check(
        &|p| p.extras[1].name = p.extras[0].name.clone(),
        "reuse the tensor name",
    );
    check(&|p| p.extras[0].data.to_mut().push(0), "do not fit");
    assert!(parse_dtype("F8_E4M3").is_ok());
    assert!(parse_dtype("f32").is_err());
}

#[test]
fn metadata_problems_name_the_field() {
    let file = encode(&small()).unwrap();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (set_meta(&file, "vblora_packed", "2"), "metadata field `vblora_packed` is \"2\"; this version of vblora_rs reads format version \"1\" only"),
        (edit_header(&file, |h| { h["__metadata__"].as_object_mut().unwrap().remove("vblora_packed"); }), "`vblora_packed` is missing"),
        (edit_header(&file, |h| { h.as_object_mut().unwrap().remove("__metadata__"); }), "no __metadata__"),
        (edit_header(&file, |h| { h["__metadata__"].as_object_mut().unwrap().remove("topk"); }), "`topk` is missing"),
        (set_meta(&file, "num_vectors", "thirty"), "`num_vectors` is \"thirty\", not a decimal integer"),
        (set_meta(&file, "num_vectors", "0"), "`num_vectors` is 0, must be >= 1"),
        (set_meta(&file, "num_vectors", "4294967297"), "`num_vectors` is 4294967297, must be in 1..=4294967296"),
        (set_meta(&file, "vector_length", "0"), "`vector_length` is 0"),
        (set_meta(&file, "topk", "31"), "`topk` is 31, must be in 1..=30"),
        (set_meta(&file, "index_bits", "6"), "`index_bits` is 6, but num_vectors 30 needs 5"),
        (set_meta(&file, "indices_dtype", "int8"), "`indices_dtype` is \"int8\""),
        (set_meta(&file, "modules", "[[\"a\",1,2]]"), "`modules` is not a JSON array"),
        (set_meta(&file, "modules", "[[\"a\",0,2,3]]"), "all must be >= 1"),
        (edit_header(&file, |h| { h["__metadata__"].as_object_mut().unwrap().remove("config"); }), "`config` is missing"),
        (edit_header(&file, |h| { h["__metadata__"].as_object_mut().unwrap().remove("key_prefix"); }), "`key_prefix` is missing"),
    ];
    for (bytes, want) in cases {
        let msg = decode_err(&bytes);
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
    }
    // A different num_vectors changes index_bits too: the bank shape is then what disagrees.
    let msg = decode_err(&set_meta(
        &set_meta(&file, "num_vectors", "31"),
        "index_bits",
        "5",
    ));
    assert!(
        msg.contains("tensor `vector_bank` has shape [30, 8], expected [31, 8]"),
        "{msg}"
    );
}

#[test]
fn huge_claims_fail_before_allocating() {
    let file = encode(&small()).unwrap();
    // 2^40 sub-vectors: the packed index tensor would need ~2.75 TB.
    let msg = decode_err(&set_meta(&file, "modules", "[[\"a\",1099511627776,1,0]]"));
    assert!(msg.contains("all must be >= 1"), "{msg}");
    let msg = decode_err(&set_meta(&file, "modules", "[[\"a\",1048576,1048575,1]]"));
    assert!(
        msg.contains("tensor `topk_indices` is U8 [23], expected U8 ["),
        "{msg}"
    );
    let msg = decode_err(&set_meta(
        &file,
        "modules",
        "[[\"a\",18446744073709551615,2,2]]",
    ));
    assert!(msg.contains("overflows"), "{msg}");
    let msg = decode_err(&edit_header(&file, |h| {
        h["topk_weights"]["shape"] = json!([1_u64 << 62, 1]);
    }));
    assert!(msg.starts_with("not a readable safetensors file"), "{msg}");
}

#[test]
fn tensor_problems_name_the_tensor() {
    let file = encode(&small()).unwrap();
    let retype = |name: &'static str, dtype: &'static str| {
        edit_header(&file, move |h| h[name]["dtype"] = json!(dtype))
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (retype("vector_bank", "I32"), "tensor `vector_bank` has dtype I32, expected F32, F16 or BF16"),
        (retype("topk_weights", "U32"), "tensor `topk_weights` has dtype U32"),
        (retype("topk_indices", "I8"), "tensor `topk_indices` is I8 [23], expected U8 [23] (18 sub-vectors x topk 2 x 5 bits)"),
        (edit_header(&file, |h| h["topk_weights"]["shape"] = json!([9, 2])), "tensor `topk_weights` has shape [9, 2], expected [18, 1]"),
        (edit_header(&file, |h| h["vector_bank"]["shape"] = json!([8, 30])), "tensor `vector_bank` has shape [8, 30]"),
        (with_tensor_bytes(&file, "topk_weights", |d| d[4..8].copy_from_slice(&f32::NAN.to_le_bytes())), "tensor `topk_weights` row 1 (layers.0.q.vblora_logits_A[0, 1]) holds weight NaN"),
        (with_tensor_bytes(&file, "topk_weights", |d| d[..4].copy_from_slice(&(-0.25_f32).to_le_bytes())), "row 0 (layers.0.q.vblora_logits_A[0, 0]) holds weight -0.25, weights must be >= 0"),
        (with_tensor_bytes(&file, "topk_weights", |d| d[68..72].copy_from_slice(&1.5_f32.to_le_bytes())), "row 17 (layers.0.v.vblora_logits_B[1, 0]) has weights summing to 1.5"),
        (with_tensor_bytes(&file, "vector_bank", |d| d[40..44].copy_from_slice(&f32::INFINITY.to_le_bytes())), "tensor `vector_bank` row 1 holds inf"),
        // index 1 (bits 5..10) becomes 31 >= 30
        (with_tensor_bytes(&file, "topk_indices", |d| { d[0] |= 0b1110_0000; d[1] |= 0b11; }), "tensor `topk_indices` index 1 (sub-vector 0, layers.0.q.vblora_logits_A[0, 0], slot 1) is 31, outside [0, 30)"),
        (with_tensor_bytes(&file, "topk_indices", |d| *d.last_mut().unwrap() |= 0x80), "tensor `topk_indices` has non-zero pad bits"),
    ];
    for (bytes, want) in cases {
        let msg = decode_err(&bytes);
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
    }
    // A missing tensor leaves the data uncovered (safetensors says so) or is named.
    let (mut header, data) = split(&file);
    let o = header["vector_bank"]["data_offsets"].clone();
    header.as_object_mut().unwrap().remove("vector_bank");
    let (s, e) = (
        o[0].as_u64().unwrap() as usize,
        o[1].as_u64().unwrap() as usize,
    );
    let mut rest = data[..s].to_vec();
    rest.extend_from_slice(&data[e..]);
    for (_, info) in header
        .as_object_mut()
        .unwrap()
        .iter_mut()
        .filter(|(k, _)| *k != "__metadata__")
    {
        for i in 0..2 {
            let v = info["data_offsets"][i].as_u64().unwrap() as usize;
            if v >= e {
                info["data_offsets"][i] = json!(v - (e - s));
            }
        }
    }
    assert_eq!(
        decode_err(&join(&header, &rest)),
        "tensor `vector_bank` is missing"
    );
}

#[test]
fn safetensors_level_damage_is_reported() {
    let file = encode(&small()).unwrap();
    let mut lying = file.clone();
    lying[..8].copy_from_slice(&(1_u64 << 40).to_le_bytes());
    let short = &file[..file.len() - 3];
    let offsets = edit_header(&file, |h| {
        h["topk_weights"]["data_offsets"][1] = json!(1 << 20);
    });
    for bytes in [
        &lying[..],
        short,
        &offsets,
        &file[..4],
        b"not a file at all",
    ] {
        let msg = decode_err(bytes);
        assert!(
            msg.starts_with("not a readable safetensors file: "),
            "{msg}"
        );
    }
}

#[test]
fn extras_clashing_with_module_keys_are_rejected() {
    let file = encode(&small()).unwrap();
    let renamed = edit_header(&file, |h| {
        let obj = h.as_object_mut().unwrap();
        let info = obj.remove("base_model.model.extra0.weight").unwrap();
        obj.insert(
            "base_model.model.layers.0.q.vblora_logits_A_topk_indices".into(),
            info,
        );
    });
    assert!(decode_err(&renamed).contains("clashes with a key the modules table produces"));
}

// --- proptests --------------------------------------------------------------------------------

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::F32), Just(Kind::F16), Just(Kind::BF16)]
}

fn modules(max: usize) -> impl Strategy<Value = Vec<Module>> {
    prop::collection::vec((1..4_usize, 1..5_usize, 1..5_usize), 1..max).prop_map(|dims| {
        dims.into_iter()
            .enumerate()
            .map(|(i, (r, a, b))| module(&format!("model.layers.{i}.proj"), r, a, b))
            .collect()
    })
}

fn packed(max_vectors: usize) -> impl Strategy<Value = Packed<'static>> {
    (
        1..max_vectors,
        1..6_usize,
        modules(5),
        kind(),
        kind(),
        0..3_usize,
        any::<u64>(),
    )
        .prop_flat_map(|(nv, len, mods, w, b, extras, seed)| {
            (1..=nv.min(6)).prop_map(move |k| sample(nv, len, k, mods.clone(), w, b, extras, seed))
        })
}

/// One way of damaging a file.
#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        xor: u8,
    },
    /// A flip inside the tensor data, past the header (most flips of a small file hit the header).
    FlipData {
        at: usize,
        xor: u8,
    },
    Truncate {
        keep: usize,
    },
    Metadata {
        field: usize,
        value: String,
    },
    TensorInfo {
        tensor: usize,
        key: usize,
        value: Value,
    },
    Random(Vec<u8>),
}

const FIELDS: [&str; 10] = [
    "vblora_packed",
    "num_vectors",
    "vector_length",
    "topk",
    "index_bits",
    "indices_dtype",
    "key_prefix",
    "modules",
    "config",
    "format",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    let number = prop_oneof![
        Just(Value::from(0)),
        Just(Value::from(1)),
        Just(Value::from(u64::MAX)),
        Just(Value::from(1_u64 << 40)),
        (0..10_000_u64).prop_map(Value::from),
    ];
    let info = prop_oneof![
        number.clone(),
        prop::collection::vec(number.clone(), 0..3).prop_map(Value::from),
        prop_oneof![
            Just("F32"),
            Just("BF16"),
            Just("U8"),
            Just("I64"),
            Just("F4")
        ]
        .prop_map(Value::from),
    ];
    let text = prop_oneof![
        "[0-9]{0,12}",
        Just("-1".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("[[\"a\",1099511627776,1,1]]".to_owned()),
        Just("[[\"a\",1,1,1],[\"a\",1,1,1]]".to_owned()),
        ".{0,8}",
    ];
    prop_oneof![
        4 => (any::<prop::sample::Index>(), 1..=255_u8).prop_map(|(i, xor)| Mutation::Flip { at: i.index(usize::MAX), xor }),
        4 => (any::<prop::sample::Index>(), 1..=255_u8).prop_map(|(i, xor)| Mutation::FlipData { at: i.index(usize::MAX), xor }),
        2 => any::<prop::sample::Index>().prop_map(|i| Mutation::Truncate { keep: i.index(usize::MAX) }),
        3 => (0..FIELDS.len(), text).prop_map(|(field, value)| Mutation::Metadata { field, value }),
        3 => (0..8_usize, 0..3_usize, info).prop_map(|(tensor, key, value)| Mutation::TensorInfo { tensor, key, value }),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Mutation::Random),
    ]
}

/// Applies `m`; header edits leave a file whose header no longer parses as it is.
fn apply(file: &[u8], m: &Mutation) -> Vec<u8> {
    match m {
        Mutation::Flip { at, xor } => {
            let mut out = file.to_vec();
            let i = at % out.len();
            out[i] ^= xor;
            out
        }
        Mutation::FlipData { at, xor } => {
            let mut out = file.to_vec();
            let start = out
                .get(..8)
                .and_then(|b| usize::try_from(u64::from_le_bytes(b.try_into().ok()?)).ok())
                .and_then(|n| n.checked_add(8))
                .filter(|&s| s < out.len())
                .unwrap_or(0);
            let i = start + at % (out.len() - start);
            out[i] ^= xor;
            out
        }
        Mutation::Truncate { keep } => file[..keep % file.len()].to_vec(),
        Mutation::Metadata { field, value } => edit_object(file, |h| {
            let meta = h.get_mut("__metadata__")?.as_object_mut()?;
            meta.insert(FIELDS[*field].to_owned(), Value::from(value.as_str()));
            Some(())
        }),
        Mutation::TensorInfo { tensor, key, value } => edit_object(file, |h| {
            let names: Vec<String> = h.keys().filter(|k| *k != "__metadata__").cloned().collect();
            let name = names.get(tensor % names.len().max(1))?;
            let info = h.get_mut(name)?.as_object_mut()?;
            info.insert(
                ["dtype", "shape", "data_offsets"][*key].to_owned(),
                value.clone(),
            );
            Some(())
        }),
        Mutation::Random(bytes) => bytes.clone(),
    }
}

/// `edit` applied to the header object of `file`, or `file` unchanged where that is impossible.
fn edit_object(
    file: &[u8],
    edit: impl FnOnce(&mut serde_json::Map<String, Value>) -> Option<()>,
) -> Vec<u8> {
    let parsed = file
        .get(..8)
        .and_then(|b| usize::try_from(u64::from_le_bytes(b.try_into().ok()?)).ok())
        .and_then(|n| Some((n, file.get(8..8usize.checked_add(n)?)?)))
        .and_then(|(n, text)| Some((n, serde_json::from_slice::<Value>(text).ok()?)));
    let Some((n, mut header)) = parsed else {
        return file.to_vec();
    };
    match header.as_object_mut().map(edit) {
        Some(Some(())) => join(&header, &file[8 + n..]),
        _ => file.to_vec(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn encode_then_decode_is_the_identity(p in packed(5000)) {
        assert_round_trip(&p);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn mutated_files_never_panic(p in packed(40), mutations in prop::collection::vec(mutation(), 1..4)) {
        let mut file = encode(&p).unwrap();
        for m in &mutations {
            if file.is_empty() {
                break;
            }
            file = apply(&file, m);
        }
        // Either a clean error or a file that is valid through and through: re-encoding what
        // was decoded gives a file that decodes to the same thing.
        if let Ok(decoded) = decode(&file) {
            let again = encode(&decoded).expect("a decoded adapter re-encodes");
            prop_assert_eq!(decode(&again).unwrap(), decoded);
        }
    }
}
