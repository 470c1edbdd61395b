//! Rust kernels for VB-LoRA (vector-bank LoRA), with an optional Python binding.
//!
//! Layout: every kernel module is plain Rust with no pyo3 (`cargo test`, `cargo clippy` and
//! `cargo bench` need no libpython); `py/` is the one binding layer, compiled only with the
//! `python` feature, and does nothing but borrow numpy arrays, validate them, release the GIL
//! and map [`KernelError`] to `VBLoRAError`.
//!
//! Why the kernels look the way they do (measured on a 2-core AMD EPYC VM with AVX2, no AVX-512;
//! baseline x86_64 build with run-time AVX2+FMA dispatch; criterion `benches/kernels.rs`):
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
//!   equals the k-th, every correct top-k is the same; pass 1 takes 16 lane maxima per
//!   256-chunk (branch-free, finds NaN), the k-th largest lane max is a threshold `t <= v_k`,
//!   pass 2 collects the elements `>= t` of only the chunks that can hold one, and sorts them;
//!   any tie (or `t = -inf`, or > 64 candidates) falls back to the exact streamed heap select,
//!   now also mask-based. (2) AVX2 intrinsics for the two vector steps (safe inside the
//!   `target_feature` functions; loads via `bytemuck::cast`), passed down as closures made in
//!   the AVX2 wrapper. (3) `prefetcht0` of the row two ahead, a chunk at a time: with pass 2 and
//!   the softmax between rows the hardware prefetcher stalls (single thread 32 -> 28 ms).
//!   One thread: 40 ms (mask only) -> 32 ms (fast path) -> 27.5 ms (prefetch; a branch-free
//!   selection of the threshold and a lean prefetch loop, ~10% of the in-cache profile).
//!   Two threads, Rust: 16-17 ms against 11.7 ms for a bare AVX2 max over the same bytes.
//! * gather (`lowrank`): the fused kernel selects and gathers row by row, so the
//!   `rows x num_vectors` softmax and the `(rows, k, L)` gather PEFT builds never exist. The
//!   output is written, never read before written: accumulating into the fresh zeroed `Vec`
//!   faulted every page twice and sent TLB-shootdown IPIs between the threads, which made two
//!   threads slower than one (164 ms vs 127 ms); with a stack accumulator two threads win.
//!   The gather stays plain mul + add (PEFT's `(w * bank[idx]).sum(-2)` is not fused).
//! * merge (`merge`): one pass over the weight; rows split across threads in tasks of ~64 Ki
//!   elements rounded to the tile height; columns in blocks whose slice of `v` fits L2; register
//!   tiles (6 x 16 with AVX2, 4 x 8 portable) accumulate over all R, so the same code serves
//!   R = 4 (memory-bound: the weight read and written once) and R = 64 (compute-bound: 16
//!   adapters, 26 ms for 4096x4096 in criterion, ~23 ms from Python). With AVX2+FMA each step
//!   is `fma(u, v, delta)`: exactly torch's `u @ v` on MKL here (100% of bits at 4096x11008,
//!   R = 4, and of PEFT's merged float32 weights; a mul + add chain matched 62% / 98%). The
//!   portable path multiplies then adds (last-bit differences from torch are possible).
//!   `low_rank_product` writes `u @ v` once into a buffer nobody reads first; from Python that
//!   buffer is `numpy.zeros`, because numpy madvises large arrays to transparent huge pages
//!   (THP is `madvise` here): the same kernel into a Rust `vec!` (calloc, 4 KiB faults) took
//!   ~100 ms, into numpy's ~25-35 ms; torch's `B @ A` pays the 4 KiB faults (~90-100 ms).
//! * SIMD (`simd`): run-time dispatch, cached in a `OnceLock`; the only `unsafe` is the call of
//!   an AVX2 `target_feature` function at the dispatch sites. No AVX-512 level: this CPU (AMD
//!   EPYC, Zen 3) has none. Tests run every kernel at every available level.
//! * threads (`threads`): every kernel runs in its own rayon pool of the requested size, cached
//!   by size and rebuilt after `fork`; rayon's global pool is never used. Handing a call to the
//!   pool costs ~20-40 us on this VM, visible on tiny calls (64-row low-rank factors).
//!   torch's OpenMP workers (GNU libgomp) spin for a while after every parallel torch op; on 2
//!   cores they take a core from our pool: `rank_update_` at 4096x4096 f32 right after a
//!   parallel `copy_` took ~9 ms against ~4.5 ms back to back, and 4.2 ms after the same copy
//!   with `OMP_WAIT_POLICY=PASSIVE` (torch's `addmm_` ~5.3 ms either way: it runs on those very
//!   threads). Tried: one row at a time for small R instead of 6-row tiles (fewer prefetch
//!   streams): no better, dropped. Documented in the README; not worked around here.
//! * softmax: Rust's `expf` differs from torch's vectorised `exp` in the last bit on ~22% of
//!   rows, so the Python layer takes the top-K *indices* from here and lets torch compute the
//!   softmax of the k kept logits (a `(rows, k)` op); with that, merged weights equal PEFT's bit
//!   for bit. `low_rank_from_logits` keeps its own softmax (within 2 ulp) for callers who do
//!   not need bit parity.
//!
//! From Python, same run, medians of 7, 2 threads (torch 2.15 MKL, noisy 2-core VM; ranges
//! over three runs): top-k+softmax 20-25 ms vs torch.topk+softmax 100-135 ms (5.2-6.1x) and
//! vs `logits.sum()` 11-15 ms (1.63-1.94x: the 1.5x target is not met); `rank_update_` R = 4 at
//! 4096x11008 f32 13.6-16.7 ms vs `W.addmm_(B, A)` 14.5-15.9 ms (0.94-1.05x), bf16 11-17 ms vs
//! 360-380 ms; 16 adapters into 4096x4096 f32 via `ops.merge_` incl. the 32 low-rank
//! computations 30-33 ms vs 16 PEFT-style merges 550-590 ms (16-20x); `low_rank_product`
//! 23-36 ms vs `B @ A` 87-103 ms at 4096x11008, bit-identical.

pub mod element;
pub mod error;
pub mod lowrank;
pub mod matrix;
pub mod merge;
pub mod packed;
mod simd;
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
pub use simd::simd_level;
pub use topk::{topk_kept_many, topk_softmax, topk_softmax_many};
