//! Streaming merge of VB-LoRA adapters into safetensors models, tensor by tensor, with memory
//! bounded by a few chunk buffers rather than the model size (pyo3-free; bound in `py/stream.rs`).
//!
//! * [`header`]: read and validate a safetensors header without reading the data.
//! * [`adapter`]: a PEFT VB-LoRA adapter file to per-module float32 factors `A`, `B`.
//! * [`writer`]: one safetensors file to a new one, with `W += u @ v` applied to chosen tensors
//!   and optionally every float tensor converted; `sink` is its writer thread.
//! * [`convert`]: float dtype conversion of raw tensor bytes, rounding as torch does.
//!
//! Measured with `benches/bench_cli_merge.py` (2-core VM shared with other jobs, TinyLlama-1.1B
//! shape in bf16, 2.05 GiB, top-K adapter on all 7 projections; medians of 3 fresh processes):
//! `vblora merge` 2.15 s and 63 MiB peak RSS, against 52 s and 3.1 GiB for PEFT's
//! load/merge_and_unload/save_pretrained and 1.33 s for `cp` of the safetensors file. The merge
//! is bound by filling the page cache (see `sink`), like `cp`; the rank updates take ~0.6 s of
//! one core. Results: 99.99995% of the weights bit-identical to PEFT's, all but 27 (values
//! within 6e-11 of 0) within 1 ulp.

pub mod adapter;
pub mod convert;
pub mod error;
pub mod header;
mod sink;
pub mod writer;

pub use adapter::{
    adapter_factors, adapter_modules, packed_factors, packed_modules, AdapterConfig, Factors,
    Module, Shape, Want, BANK_KEY,
};
pub use error::StreamError;
pub use header::{read_header, Header};
pub use writer::{merge_file, Options, Progress, Update, DEFAULT_CHUNK_BYTES};

#[cfg(test)]
mod adapter_tests;
#[cfg(test)]
mod test_data;
#[cfg(test)]
mod writer_tests;
