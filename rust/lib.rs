//! Rust kernels for VB-LoRA (vector-bank LoRA), with an optional Python binding.
//!
//! Layout: every kernel module is plain Rust with no pyo3 (`cargo test`, `cargo clippy` and
//! `cargo bench` need no libpython); `py/` is the one binding layer, compiled only with the
//! `python` feature, and does nothing but borrow numpy arrays, validate them, release the GIL
//! and map [`KernelError`] to `VBLoRAError`.
//!
//! Why the kernels look the way they do (measured on a 2-core AMD EPYC VM, SSE2 baseline build,
//! criterion `benches/kernels.rs`; numpy's `max` reads the same 320 MB of logits in 16 ms):
//!
//! * top-k (`topk`): indices must be `torch.topk`'s exactly, ties included (a different tie
//!   picks a different bank vector), so `topk` ports the libstdc++ `partial_sort` /
//!   `nth_element` + `sort` that torch's CPU kernel runs. For `k * 64 <= n` (the common case)
//!   that is a heap select, streamed: an element moves the k-heap only if it beats the heap top
//!   strictly, so any 256-wide chunk, then 32-wide block, whose max cannot is skipped exactly.
//!   39,040 x 2,048 f32, k = 2: 69 ms on one thread with `Vec::insert` and `f32::is_nan` lanes
//!   -> 60 ms with fixed arrays and the two-level skip -> 56 ms once the NaN check became integer
//!   arithmetic on the bits (`is_nan` and an integer `max` both compiled to scalar code on SSE2).
//!   Blocks of 16 or 8 were slower than 32: more horizontal reductions for fewer elements
//!   walked. The exact heap select kept the speed: 52 ms on one thread, 27 ms on two (median of
//!   15, same as the lower-index-first kernel it replaced); from Python, median of 7 on two
//!   threads, 27-40 ms against 76-100 ms for torch.topk + softmax (noisy VM).
//! * gather (`lowrank`): the fused kernel selects and gathers row by row, so the
//!   `rows x num_vectors` softmax and the `(rows, k, L)` gather PEFT builds never exist. The
//!   output is written, never read before written: accumulating into the fresh zeroed `Vec`
//!   faulted every page twice and sent TLB-shootdown IPIs between the threads, which made two
//!   threads slower than one (164 ms vs 127 ms); with a stack accumulator two threads win.
//! * merge (`merge`): one pass over the weight, rows split across threads, columns in chunks so
//!   delta (`acc + u * v`, no FMA: `mul_add` is a libm call without a target-cpu flag) stays in
//!   L1 and is added only when complete, matching torch's `W.float() + B @ A` up to how torch's
//!   matmul itself rounds (see `merge`). bf16 rounding is torch's branch-free formula so the loop
//!   vectorises; f16 goes through half's F16C slice conversions.
//! * threads (`threads`): every kernel runs in its own rayon pool of the requested size, cached
//!   by size and rebuilt after `fork`; rayon's global pool is never used.
//!
//! Not done: explicit SIMD or `target_feature` multiversioning (AVX2 would roughly halve the
//! top-k compute, but needs `unsafe` at the call; the crate forbids `unsafe_code`).

pub mod element;
pub mod error;
pub mod lowrank;
pub mod matrix;
pub mod merge;
pub mod threads;
pub mod topk;

#[cfg(feature = "python")]
mod py;

pub use element::Element;
pub use error::{Dim, KernelError};
pub use lowrank::{low_rank_from_logits, low_rank_from_topk};
pub use matrix::{MatMut, MatRef};
pub use merge::rank_update;
pub use topk::topk_softmax;
