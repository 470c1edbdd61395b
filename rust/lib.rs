//! Rust kernels for VB-LoRA (vector-bank LoRA), with an optional Python binding.
//!
//! Layout: every kernel module is plain Rust with no pyo3 (`cargo test`, `cargo clippy` and
//! `cargo bench` need no libpython); `py/` is the one binding layer, compiled only with the
//! `python` feature, and does nothing but borrow numpy arrays, validate them, release the GIL
//! and map the crate's errors to Python's (`py/error.rs`).
//!
//! Why the kernels look the way they do, in short (the reasons and the measurements behind each
//! are in `docs/kernels.md`):
//!
//! * top-k (`topk`): torch's indices exactly, ties included, so `topk::stl` ports the libstdc++
//!   selection torch runs; a branch-light two-pass fast path (lane maxima, then the few elements
//!   above the threshold) covers rows with distinct top values, the exact heap select the rest.
//! * gather (`lowrank`): select and gather row by row, so the `rows x num_vectors` softmax and
//!   the `(rows, k, L)` gather PEFT builds never exist; a stack accumulator, never the output.
//! * merge (`merge`): one pass over the weight in register tiles accumulating over all R, each
//!   step `fma(u, v, delta)` on AVX2/AVX-512 (torch's `u @ v` on MKL, bit for bit).
//! * SIMD (`simd`): one generic body per kernel, compiled again inside `#[target_feature]`
//!   wrappers and dispatched once per process; `VBLORA_RS_SIMD` caps the level.
//! * threads (`threads`): a rayon pool per size, or torch's own OpenMP team when torch uses one
//!   (its spinning workers would otherwise take a core from ours).
//! * softmax (`topk::softmax`): the selection weighs the kept logits by the steps of torch's CPU
//!   kernel, so the weights are PEFT's bits; the Python layer checks that once per process
//!   against `torch.softmax` and otherwise lets torch weigh the kept logits itself.

pub mod element;
pub mod error;
pub mod lowrank;
pub mod matrix;
pub mod merge;
pub mod packed;
mod simd;
pub mod stored_topk;
pub mod stream;
#[cfg(test)]
mod test_rng;
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
