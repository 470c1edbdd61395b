//! What a packed adapter unpacks to, and what it lists, without building anything per tensor.
//!
//! * [`peft_checkpoint`]: PEFT's top-K checkpoint (`adapter_model.safetensors` of a
//!   `save_only_topk_weights` adapter) serialised straight from a decoded [`Packed`]: each module's
//!   four tensors are byte slices of two buffers (indices in the recorded PEFT dtype, weights as
//!   stored), so the cost is linear in the file, with nothing per tensor beyond its header entry.
//!   A checkpoint whose header would pass the 100 MB every safetensors reader accepts is refused
//!   before anything is written (a packed file listing ~250k modules or more).
//! * [`module_table`]: the modules table of a packed file from its header alone, checked as the
//!   decoder checks it, for callers that must compare it with a model before decoding the data.

use std::borrow::Cow;
use std::collections::HashMap;

use safetensors::{Dtype, SafeTensorError, SafeTensors, View};

use super::error::PackedError;
use super::format::Packed;
use super::header::{self as h, Module};

/// Lengths of the endings of a module's four keys (`.vblora_logits_A_topk_indices`, ...).
const DERIVED_SUFFIX_LENGTHS: [u64; 4] = [29, 29, 29, 29];

/// PEFT's key of the bank in a checkpoint.
pub const BANK_KEY: &str = "base_model.vblora_vector_bank";

/// The longest header safetensors readers accept (the crate's `MAX_HEADER_SIZE`).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor of the checkpoint: a slice of a buffer that outlives the serialisation.
struct Slice<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: &'a [u8],
}

impl View for &Slice<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Little-endian bytes of every index in PEFT's dtype `name`. The decoder has checked that every
/// index is below `num_vectors` and that the dtype holds `num_vectors - 1`; a value that still does
/// not fit is an error, never a wrapped index.
fn index_bytes(indices: &[i64], name: &str) -> Result<(Dtype, Vec<u8>), PackedError> {
    fn convert<T: TryFrom<i64>, const N: usize>(
        indices: &[i64],
        to_le: impl Fn(T) -> [u8; N],
    ) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(indices.len() * N);
        for &i in indices {
            out.extend_from_slice(&to_le(T::try_from(i).ok()?));
        }
        Some(out)
    }
    let converted = match name {
        "uint8" => convert::<u8, 1>(indices, u8::to_le_bytes).map(|b| (Dtype::U8, b)),
        "int16" => convert::<i16, 2>(indices, i16::to_le_bytes).map(|b| (Dtype::I16, b)),
        "int32" => convert::<i32, 4>(indices, i32::to_le_bytes).map(|b| (Dtype::I32, b)),
        "int64" => convert::<i64, 8>(indices, i64::to_le_bytes).map(|b| (Dtype::I64, b)),
        other => {
            return Err(PackedError::metadata(
                h::INDICES_DTYPE,
                format!("is {other:?}, not a PEFT index dtype"),
            ))
        }
    };
    converted.ok_or_else(|| {
        PackedError::metadata(
            h::INDICES_DTYPE,
            format!("is {name}, too narrow for an index"),
        )
    })
}

/// `&bytes[start * width .. end * width]`, or an error (the decoder's sizes make this unreachable).
fn rows(bytes: &[u8], start: usize, end: usize, width: usize) -> Result<&[u8], PackedError> {
    let range = start.checked_mul(width).zip(end.checked_mul(width));
    range
        .and_then(|(a, b)| bytes.get(a..b))
        .ok_or_else(|| PackedError::Serialize("sub-vector range outside the decoded data".into()))
}

/// The bytes of PEFT's top-K checkpoint of `p` (metadata `{"format": "pt"}`, as PEFT writes it);
/// a header longer than `max_header` bytes ([`MAX_HEADER_BYTES`] for files others will read) is an
/// error naming the modules table.
pub fn peft_checkpoint(p: &Packed<'_>, max_header: u64) -> Result<Vec<u8>, PackedError> {
    let field = |name: &str| {
        p.metadata
            .get(name)
            .ok_or_else(|| PackedError::metadata(name, "is missing"))
    };
    let prefix = field(h::KEY_PREFIX)?;
    let (index_dtype, indices) = index_bytes(&p.indices, field(h::INDICES_DTYPE)?)?;
    let weights = p.weights.le_bytes();
    let k = p.topk;
    let index_width = k * index_dtype.bitsize() / 8;
    let weight_width = (k - 1) * p.weights.dtype().bitsize() / 8;

    let tensor_count = 4 * p.modules.len() + 1 + p.extras.len();
    // `size`: what is known of the header's length ("of 123 bytes", "of at least 123 bytes", ...)
    let too_large = |size: String, limit: u64| {
        PackedError::metadata(
            h::MODULES,
            format!(
                "lists {} modules: PEFT's checkpoint of them ({tensor_count} tensors) needs a header {size}, \
                 and safetensors readers accept at most {limit}; keep the adapter packed",
                p.modules.len()
            ),
        )
    };
    // Refuse before building anything per tensor when even the shortest entries cannot fit: every entry is
    // its key plus at least ENTRY_MIN bytes (`"":{"dtype":"U8","shape":[1,1,1],"data_offsets":[0,0]},`).
    const ENTRY_MIN: u64 = 55;
    let grid_keys: u64 = DERIVED_SUFFIX_LENGTHS.iter().sum();
    let lower = p.modules.iter().fold(0_u64, |total, m| {
        let own = 4 * (prefix.len() + m.path.len()) as u64 + grid_keys + 4 * ENTRY_MIN;
        total.saturating_add(own)
    });
    if lower > max_header {
        return Err(too_large(format!("of at least {lower} bytes"), max_header));
    }

    let mut tensors: Vec<(String, Slice<'_>)> = Vec::with_capacity(tensor_count);
    let mut at = 0_usize;
    for m in &p.modules {
        for (grid, lead) in [("A", [m.r, m.in_sub]), ("B", [m.out_sub, m.r])] {
            let n = lead[0] * lead[1]; // no overflow: the decoder summed these with checked arithmetic
            let key = format!("{prefix}{}.vblora_logits_{grid}", m.path);
            tensors.push((
                format!("{key}_topk_indices"),
                Slice {
                    dtype: index_dtype,
                    shape: vec![lead[0], lead[1], k],
                    data: rows(&indices, at, at + n, index_width)?,
                },
            ));
            tensors.push((
                format!("{key}_topk_weights"),
                Slice {
                    dtype: p.weights.dtype(),
                    shape: vec![lead[0], lead[1], k - 1],
                    data: rows(&weights, at, at + n, weight_width)?,
                },
            ));
            at += n;
        }
    }
    let bank = p.bank.le_bytes();
    tensors.push((
        BANK_KEY.to_owned(),
        Slice {
            dtype: p.bank.dtype(),
            shape: vec![p.num_vectors, p.vector_length],
            data: &bank,
        },
    ));
    for e in &p.extras {
        if e.name == BANK_KEY {
            return Err(PackedError::tensor(
                &e.name,
                "clashes with PEFT's key of the vector bank",
            ));
        }
        tensors.push((
            e.name.clone(),
            Slice {
                dtype: e.dtype,
                shape: e.shape.clone(),
                data: &e.data,
            },
        ));
    }
    let metadata = HashMap::from([(h::FORMAT.to_owned(), "pt".to_owned())]);
    let bytes = match safetensors::serialize(tensors.iter().map(|(n, s)| (n, s)), Some(metadata)) {
        Err(SafeTensorError::HeaderTooLarge) => {
            return Err(too_large(
                format!("of more than {MAX_HEADER_BYTES} bytes"),
                MAX_HEADER_BYTES,
            ))
        }
        other => other.map_err(|e| PackedError::Serialize(e.to_string()))?,
    };
    let header = bytes
        .first_chunk::<8>()
        .map_or(0, |b| u64::from_le_bytes(*b));
    if header > max_header {
        return Err(too_large(format!("of {header} bytes"), max_header));
    }
    Ok(bytes)
}

/// The checked modules table of a packed file, from its header (the data is not decoded).
pub fn module_table(bytes: &[u8]) -> Result<Vec<Module>, PackedError> {
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| PackedError::Safetensors(e.to_string()))?;
    let text = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(h::VERSION).map(|_| m.get(h::MODULES)))
        .ok_or_else(|| {
            PackedError::metadata(h::VERSION, "is missing: not a packed VB-LoRA adapter")
        })?
        .ok_or_else(|| PackedError::metadata(h::MODULES, "is missing"))?;
    let modules = h::parse_modules(text)?;
    h::sub_vector_count(&modules).map_err(|reason| PackedError::metadata(h::MODULES, reason))?;
    Ok(modules)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::packed::{decode, encode, Extra, FloatData};

    fn packed(modules: Vec<Module>, topk: usize, extra: Option<&str>) -> Packed<'static> {
        let s: usize = modules.iter().map(|m| m.sub_vectors().unwrap()).sum();
        // distinct indices in every row (topk <= 7)
        let indices: Vec<i64> = (0..s)
            .flat_map(|row| (0..topk).map(move |j| ((row + j) % 7) as i64))
            .collect();
        let weights = vec![0.5_f32 / topk as f32; s * (topk - 1)];
        let metadata = BTreeMap::from([
            ("indices_dtype".to_owned(), "int16".to_owned()),
            ("key_prefix".to_owned(), "base_model.model.".to_owned()),
            ("config".to_owned(), "{}".to_owned()),
        ]);
        let extras = extra
            .map(|name| Extra {
                name: name.to_owned(),
                dtype: Dtype::F32,
                shape: vec![1],
                data: Cow::Owned(vec![0; 4]),
            })
            .into_iter()
            .collect();
        Packed {
            metadata,
            modules,
            num_vectors: 7,
            vector_length: 2,
            topk,
            indices: Cow::Owned(indices),
            weights: FloatData::F32(Cow::Owned(weights)),
            bank: FloatData::F32(Cow::Owned(vec![0.25; 14])),
            extras,
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

    #[test]
    fn checkpoint_tensors_are_the_modules_slices() {
        let p = packed(
            vec![module("a", 2, 3, 1), module("b.c", 2, 1, 2)],
            3,
            Some("x.bias"),
        );
        let p = decode(&encode(&p).unwrap()).unwrap();
        let bytes = peft_checkpoint(&p, MAX_HEADER_BYTES).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(file.len(), 4 * 2 + 2);
        let mut at = 0;
        for m in &p.modules {
            for (grid, lead) in [("A", [m.r, m.in_sub]), ("B", [m.out_sub, m.r])] {
                let n = lead[0] * lead[1];
                let key = format!("base_model.model.{}.vblora_logits_{grid}", m.path);
                let idx = file.tensor(&format!("{key}_topk_indices")).unwrap();
                assert_eq!(
                    (idx.dtype(), idx.shape()),
                    (Dtype::I16, &[lead[0], lead[1], 3][..])
                );
                let want: Vec<u8> = p.indices[at * 3..(at + n) * 3]
                    .iter()
                    .flat_map(|&i| (i as i16).to_le_bytes())
                    .collect();
                assert_eq!(idx.data(), &want[..]);
                let w = file.tensor(&format!("{key}_topk_weights")).unwrap();
                assert_eq!(
                    (w.dtype(), w.shape()),
                    (Dtype::F32, &[lead[0], lead[1], 2][..])
                );
                assert_eq!(w.data().len(), n * 2 * 4);
                at += n;
            }
        }
        assert_eq!(file.tensor(BANK_KEY).unwrap().shape(), &[7, 2]);
        assert_eq!(file.tensor("x.bias").unwrap().data(), &[0; 4]);
    }

    #[test]
    fn a_header_over_the_limit_is_refused() {
        let modules: Vec<Module> = (0..50).map(|i| module(&format!("m{i}"), 1, 1, 1)).collect();
        let p = packed(modules, 2, None);
        let full = peft_checkpoint(&p, MAX_HEADER_BYTES).unwrap();
        let header = u64::from_le_bytes(*full.first_chunk::<8>().unwrap());
        assert!(peft_checkpoint(&p, header).is_ok());
        // just over: the exact length, measured on the serialised header
        let err = peft_checkpoint(&p, header - 1).unwrap_err().to_string();
        assert!(
            err.contains("lists 50 modules") && err.contains("201 tensors"),
            "{err}"
        );
        assert!(
            err.contains(&format!("a header of {header} bytes")),
            "{err}"
        );
        // far over: refused from the lower bound, before any tensor entry is built
        let err = peft_checkpoint(&p, 100).unwrap_err().to_string();
        assert!(err.contains("a header of at least"), "{err}");
    }

    #[test]
    fn an_extra_named_like_the_bank_is_refused() {
        let p = packed(vec![module("a", 1, 1, 1)], 2, Some(BANK_KEY));
        let err = peft_checkpoint(&p, MAX_HEADER_BYTES)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("clashes with PEFT's key of the vector bank"),
            "{err}"
        );
    }

    #[test]
    fn module_table_reads_the_header_only() {
        let p = packed(vec![module("a", 1, 2, 1), module("b", 1, 1, 1)], 2, None);
        let bytes = encode(&p).unwrap();
        let table = module_table(&bytes).unwrap();
        assert_eq!(table, p.modules);
        let plain = safetensors::serialize(
            [(
                "t",
                safetensors::tensor::TensorView::new(Dtype::U8, vec![1], &[0]).unwrap(),
            )],
            None,
        )
        .unwrap();
        assert!(module_table(&plain)
            .unwrap_err()
            .to_string()
            .contains("vblora_packed"));
    }
}
