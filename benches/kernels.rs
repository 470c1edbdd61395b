//! Criterion benches at the shapes that matter for a Llama-2-7B-sized adapter:
//! 39,040 logit rows over a 2,048-vector bank of length 256, and a 4096x11008 weight with R = 4.
//! Also 16 stacked adapters (R = 64) merged into a 4096x4096 weight, and the bare product.
//! Sample sizes are small so that `cargo bench` finishes in a few minutes. The SIMD level
//! (`VBLORA_RS_SIMD=portable|avx2|avx512` caps it, to time one level against another) is in
//! every benchmark name.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use std::hint::black_box;
use vblora_rs::{
    low_rank_from_logits, low_rank_product_into, rank_update, simd_level, topk_softmax, Element,
    MatMut, MatRef,
};

const ROWS: usize = 39_040;
const NUM_VECTORS: usize = 2_048;
const VECTOR_LENGTH: usize = 256;
const M: usize = 4_096;
const N: usize = 11_008;
const R: usize = 4;

fn values(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1_u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

fn topk(c: &mut Criterion) {
    let logits = values(1, ROWS * NUM_VECTORS, 0.02);
    let bank = values(2, NUM_VECTORS * VECTOR_LENGTH, 1.0);
    let mut g = c.benchmark_group("topk");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Bytes((logits.len() * 4) as u64));
    let l = MatRef::new("logits", &logits, ROWS, NUM_VECTORS).unwrap();
    let b = MatRef::new("bank", &bank, NUM_VECTORS, VECTOR_LENGTH).unwrap();
    for threads in [1, 0] {
        g.bench_function(
            format!(
                "topk_softmax 39040x2048 f32 k=2 threads={threads} {}",
                simd_level()
            ),
            |bench| bench.iter(|| topk_softmax(black_box(l), 2, threads).unwrap()),
        );
        g.bench_function(
            format!(
                "low_rank_from_logits 39040x2048 L=256 k=2 threads={threads} {}",
                simd_level()
            ),
            |bench| bench.iter(|| low_rank_from_logits(black_box(l), b, 2, threads).unwrap()),
        );
    }
    g.finish();
}

fn merge_one<W: Element>(c: &mut Criterion) {
    let mut weight: Vec<W> = values(3, M * N, 1.0).into_iter().map(W::from_f32).collect();
    let u = values(4, M * R, 1.0);
    let v = values(5, R * N, 1e-3);
    let mut g = c.benchmark_group("rank_update");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Bytes(
        (2 * M * N * std::mem::size_of::<W>()) as u64,
    ));
    for threads in [1, 0] {
        g.bench_function(
            format!(
                "{} 4096x11008 R=4 threads={threads} {}",
                W::NAME,
                simd_level()
            ),
            |bench| {
                bench.iter(|| {
                    let w = MatMut::new("weight", &mut weight, M, N).unwrap();
                    let u = MatRef::new("u", &u, M, R).unwrap();
                    let v = MatRef::new("v", &v, R, N).unwrap();
                    rank_update(w, u, v, threads).unwrap();
                });
            },
        );
    }
    g.finish();
}

/// 16 adapters of rank 4 in one pass (compute-bound), and `u @ v` into a fresh buffer.
fn merge_many_and_product(c: &mut Criterion) {
    const SQ: usize = 4_096;
    const R64: usize = 64;
    let mut weight = values(6, SQ * SQ, 1.0);
    let u = values(7, SQ * R64, 1.0);
    let v = values(8, R64 * SQ, 1e-3);
    let mut g = c.benchmark_group("rank_update_many");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    g.bench_function(
        format!("float32 4096x4096 R=64 threads=0 {}", simd_level()),
        |bench| {
            bench.iter(|| {
                let w = MatMut::new("weight", &mut weight, SQ, SQ).unwrap();
                let u = MatRef::new("u", &u, SQ, R64).unwrap();
                let v = MatRef::new("v", &v, R64, SQ).unwrap();
                rank_update(w, u, v, 0).unwrap();
            });
        },
    );
    g.finish();
    let u = values(9, M * R, 1.0);
    let v = values(10, R * N, 1.0);
    let mut out = vec![0.0_f32; M * N];
    let mut g = c.benchmark_group("low_rank_product");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Bytes((M * N * 4) as u64));
    // Into a reused buffer: the kernel alone, without first-touch page faults.
    g.bench_function(
        format!("4096x11008 R=4 threads=0 {}", simd_level()),
        |bench| {
            bench.iter(|| {
                let o = MatMut::new("out", &mut out, M, N).unwrap();
                let u = MatRef::new("u", &u, M, R).unwrap();
                let v = MatRef::new("v", &v, R, N).unwrap();
                low_rank_product_into(o, u, v, 0).unwrap();
            });
        },
    );
    g.finish();
}

fn merge(c: &mut Criterion) {
    merge_one::<f32>(c);
    merge_one::<bf16>(c);
    merge_many_and_product(c);
}

criterion_group!(benches, topk, merge);
criterion_main!(benches);
