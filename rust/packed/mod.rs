//! The packed single-file adapter format (see `docs/packed-format.md`): encoder and decoder.
//!
//! A packed file is a valid safetensors file holding the bank (`vector_bank`), every top-K index
//! of every sub-vector bit-packed at `ceil(log2(num_vectors))` bits (`topk_indices`), the first
//! k-1 softmax weights (`topk_weights`), the checkpoint's other tensors unchanged, and a small
//! `__metadata__` (modules table, dims, the adapter config) from which the PEFT top-K checkpoint
//! is rebuilt exactly. Split: `bits` (index packing), `header` (metadata fields and their checks),
//! `values` (float tensors and their checks), `format` (encode/decode), `peft` (the PEFT
//! checkpoint a file unpacks to, and its modules table alone), `error`.

mod bits;
mod error;
mod format;
mod header;
mod peft;
mod values;

#[cfg(test)]
mod tests;

pub use bits::{index_bits, pack, packed_len, unpack, BitsError, MAX_BITS};
pub use error::PackedError;
pub use format::{decode, decode_file, encode, encode_to_file, parse_dtype, Extra, Packed};
pub use header::{Module, MAX_NUM_VECTORS};
pub use peft::{module_table, peft_checkpoint, BANK_KEY, MAX_HEADER_BYTES};
pub use safetensors::Dtype;
pub use values::FloatData;
