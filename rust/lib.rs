//! Rust kernels for VB-LoRA (vector-bank LoRA), with an optional Python binding.
//!
//! Layout: every kernel module is plain Rust with no pyo3 (`cargo test`, `cargo clippy` and
//! `cargo bench` need no libpython); `py/` is the one binding layer, compiled only with the
//! `python` feature, and does nothing but borrow numpy arrays, validate them, release the GIL
//! and map [`KernelError`] to `VBLoRAError`.
//!
//! Why the kernels look the way they do (measured on a 2-core AMD EPYC VM with AVX2, no AVX-512,
//! unless said otherwise; baseline x86_64 build with run-time AVX2+FMA / AVX-512 dispatch;
//! criterion `benches/kernels.rs`):
//!
//! * top-k (`topk`): indices must be `torch.topk`'s exactly, ties included (a different tie
//!   picks a different bank vector), so `topk` ports the libstdc++ `partial_sort` /
//!   `nth_element` + `sort` that torch's CPU kernel runs. For `k * 64 <= n` (the common case)
//!   that is a heap select. History, 39,040 x 2,048 f32, k = 2, one thread: 69 ms with
//!   `Vec::insert` -> 56 ms with a chunk/block max prefilter (SSE2) -> 52 ms exact heap select.
//!   With AVX2 the same generic prefilter at 16 lanes got *slower* (74 ms: LLVM's SLP turned the
//!   lane arrays into shuffles), and a vector compare + movemask per 16 elements, built from a
//!   generic loop, was no better (LLVM builds the mask bit by bit). Now: (1) a fast path that
//!   needs no tie order at all: if the row's top k values are distinct and no other element
//!   equals the k-th, every correct top-k is the same; pass 1 keeps one 8-lane maximum per
//!   128-chunk (branch-free; NaN by one unordered compare per *two* vectors, true if either
//!   is NaN), the k-th largest lane max is a threshold `t <= v_k` (branch-free for k = 1, 2),
//!   pass 2 collects the elements `>= t` of only the chunks that can hold one (bit sets of the
//!   qualifying chunks and elements by straight-line compares, then only the set bits), and
//!   sorts them; any tie (or `t = -inf`,
//!   or > 64 candidates, or k > 8, or rows not a multiple of 8) falls back to the exact
//!   streamed heap select, mask-based. (2) AVX2 intrinsics for the vector steps (safe inside
//!   the `target_feature` functions; loads via `bytemuck::cast`), passed down as closures made
//!   in the AVX2 wrapper. (3) No software prefetch: a `prefetcht0` of the row two ahead, one
//!   line per 16 elements inside pass 1, once measured 1.70x of `logits.sum()` against 2.07x
//!   without (an earlier pass 2), but with the branch-light pass 2 of issue 14 it cost ~30%
//!   (1.64x of a bare row-max pass against 1.24x, one thread, CPU time). Pass 1 alone streams
//!   at the speed of a bare max (1.02x, Rust probe); the whole top-k is ~1.15-1.2x of it on one
//!   thread, the rest being pass 2 and the per-row bookkeeping, which memory stalls do not
//!   hide. From Python, the selection is ~0.9-1.07x of `logits.sum()` and the whole
//!   `ops.topk_softmax` ~1.08-1.14x on a quiet machine, torch's softmax of the kept logits being
//!   most of the rest (the measurements and what was tried are at the top of `topk.rs`).
//! * gather (`lowrank`): the fused kernel selects and gathers row by row, so the
//!   `rows x num_vectors` softmax and the `(rows, k, L)` gather PEFT builds never exist. The
//!   output is written, never read before written: accumulating into the fresh zeroed `Vec`
//!   faulted every page twice and sent TLB-shootdown IPIs between the threads, which made two
//!   threads slower than one (164 ms vs 127 ms); with a stack accumulator two threads win.
//!   The gather stays plain mul + add (PEFT's `(w * bank[idx]).sum(-2)` is not fused).
//! * merge (`merge`): one pass over the weight; rows split across threads in tasks of ~64 Ki
//!   elements rounded to the tile height; columns in blocks whose slice of `v` fits L2; register
//!   tiles (6 x 16 with AVX2, 8 x 16 with AVX-512, 4 x 8 portable) accumulate over all R, so the
//!   same code serves R = 4 (memory-bound: the weight read and written once) and R = 64
//!   (compute-bound: 16 adapters, 26 ms for 4096x4096 in criterion, ~23 ms from Python). With
//!   AVX2+FMA and AVX-512 each step is `fma(u, v, delta)`: exactly torch's `u @ v` on MKL here
//!   (100% of bits at 4096x11008, R = 4, and of PEFT's merged float32 weights; a mul + add chain
//!   matched 62% / 98%). The portable path multiplies then adds (last-bit differences from
//!   torch are possible).
//!   `low_rank_product` writes `u @ v` once into a buffer nobody reads first; from Python that
//!   buffer is `numpy.zeros`, because numpy madvises large arrays to transparent huge pages
//!   (THP is `madvise` here): the same kernel into a Rust `vec!` (calloc, 4 KiB faults) took
//!   ~100 ms, into numpy's ~25-35 ms; torch's `B @ A` pays the 4 KiB faults (~90-100 ms).
//! * SIMD (`simd`): run-time dispatch, cached in a `OnceLock`; the only `unsafe` is the call of
//!   a `target_feature` function (AVX2, AVX-512) at the dispatch sites. Tests run every kernel at
//!   every available level; `VBLORA_RS_SIMD=portable|avx2|avx512` caps the level. AVX-512
//!   (measured on a 2-core AMD EPYC Zen 4 VM, one thread, minimum of many runs) is the same
//!   generic code with 8x16 merge tiles and mask-register compares in the top-k scan: f32 merge
//!   R = 4 within 10% of AVX2 (Zen 4 splits 512-bit ops in two), bf16 weights 31 -> 22 us at
//!   64x2048 and 500 -> 365 us at 512x4096, R = 64 2.8 -> 2.0 ms at 256x4096, top-k of
//!   4096x2048 1.49-1.65 ms against 1.68-1.90 ms (the same in L2). Tried and dropped: a 16-lane first top-k pass (no faster: it is memory-bound), wider
//!   merge tiles (LLVM kept the accumulators in memory). AVX512-BF16 is not used (see `simd`).
//!   Register tiles go straight into f32/bf16 weights (no staging chunk): bf16 38 -> 32 us with
//!   AVX2 at 64x2048.
//! * threads (`threads`): every kernel runs in its own rayon pool of the requested size, cached
//!   by size and rebuilt after `fork`; rayon's global pool is never used. Handing a call to the
//!   pool costs ~20-40 us on this VM, visible on tiny calls (64-row low-rank factors).
//!   torch's OpenMP workers (GNU libgomp) spin for a while after every parallel torch op; on 2
//!   cores they took a core from a pool of our own: `rank_update_` at 4096x4096 f32 right after
//!   a parallel `copy_` took 7-9 ms against 4.4 ms back to back. Hence `threads`: when torch's
//!   backend is OpenMP the kernels run on torch's own team (`GOMP_parallel` of the runtime torch
//!   loaded), where the spinning workers take the work: 4.2-5.0 ms after the same copy, below
//!   torch's `addmm_` (5.3-5.7 ms). Tried: one row at a time for small R instead of 6-row tiles
//!   (fewer prefetch streams): no better, dropped.
//! * softmax: Rust's `expf` differs from torch's vectorised `exp` in the last bit on ~22% of
//!   rows, so the Python layer takes the top-K *indices* from here and lets torch compute the
//!   softmax of the k kept logits (a `(rows, k)` op); with that, merged weights equal PEFT's bit
//!   for bit. `low_rank_from_logits` keeps its own softmax (within 2 ulp) for callers who do
//!   not need bit parity.
//!
//! From Python, `benches/bench_vs_peft.py` (same run, interleaved rounds, 2 threads, torch 2.15
//! MKL, noisy 2-core VM): top-k+softmax 16.1 ms vs torch.topk+softmax 71 ms (4.4x) and 1.41x of
//! `logits.sum()` (1.34-1.44 over four runs); `merge()` f32 0.77-0.88x of `W.addmm_(B, A)`, bf16
//! 17-23x PEFT; 16 adapters into 4096x4096 f32 28 ms vs 16 PEFT merges 583 ms (20.8x);
//! TinyLlama-shaped bf16 `merge_and_unload` 0.35 s vs 6.3 s (17.7x). Table: docs/bench_vs_peft.md.

pub mod element;
pub mod error;
pub mod lowrank;
pub mod matrix;
pub mod merge;
pub mod packed;
mod simd;
pub mod stored_topk;
pub mod stream;
pub mod threads;
pub mod topk;

#[cfg(feature = "python")]
mod py;

pub use element::Element;
pub use error::{Dim, KernelError};
pub use lowrank::{low_rank_from_logits, low_rank_from_topk};
pub use matrix::{MatMut, MatRef};
pub use merge::{low_rank_product, low_rank_product_into, rank_update};
pub use simd::{simd_level, simd_levels};
pub use topk::{topk_kept_many, topk_softmax, topk_softmax_many};
