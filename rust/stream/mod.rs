//! Streaming merge of VB-LoRA adapters into safetensors models, tensor by tensor, with memory
//! bounded by a few chunk buffers rather than the model size (pyo3-free; bound in `py/stream.rs`).
//!
//! * [`header`]: read and validate a safetensors header without reading the data.
//! * [`adapter`]: a PEFT VB-LoRA adapter file to per-module float32 factors `A`, `B`.
//! * [`writer`]: one safetensors file to a new one, with `W += u @ v` applied to chosen tensors
//!   and optionally every float tensor converted; `sink` is its writer thread.
//! * [`convert`]: float dtype conversion of raw tensor bytes, rounding as torch does.

pub mod adapter;
pub mod convert;
pub mod error;
pub mod header;
mod sink;
pub mod writer;

pub use adapter::{adapter_factors, AdapterConfig, Factors, BANK_KEY};
pub use error::StreamError;
pub use header::{read_header, Header};
pub use writer::{merge_file, Options, Progress, Update, DEFAULT_CHUNK_BYTES};

#[cfg(test)]
mod adapter_tests;
#[cfg(test)]
mod writer_tests;
