//! Encoding and decoding a whole packed adapter (see `docs/packed-format.md`).
//!
//! The file is written by the `safetensors` crate (which writes a sibling temporary file and
//! renames it, so a failed write never leaves a half-written file behind) and read whole into
//! memory: it is small (a few MB at the Llama-2-7B shape), and a plain read needs no `unsafe`
//! (`memmap2` would, and the crate denies it) and cannot fault if the file changes under us.
//! `decode` trusts nothing: every number in the header is checked with checked arithmetic and
//! compared with the tensor sizes the safetensors layer has already matched to the file size, so
//! every allocation is bounded by the input.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors, View};

use super::bits::{self, BitsError};
use super::error::PackedError;
use super::header::{self as h, Module};
use super::values::FloatData;

/// A packed adapter in memory: what `encode` writes and `decode` returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed<'a> {
    /// `__metadata__`. For `encode`: at least `indices_dtype`, `key_prefix` and `config`; the
    /// fields the encoder computes (format, version, dims, `index_bits`, `modules`) may be present
    /// only with the value it computes.
    /// From `decode`: every entry of the file.
    pub metadata: BTreeMap<String, String>,
    pub modules: Vec<Module>,
    pub num_vectors: usize,
    pub vector_length: usize,
    pub topk: usize,
    /// `S * topk` indices, sub-vector-major.
    pub indices: Cow<'a, [i64]>,
    /// `S * (topk - 1)` weights.
    pub weights: FloatData<'a>,
    /// `num_vectors * vector_length` values.
    pub bank: FloatData<'a>,
    /// Other checkpoint tensors, stored unchanged (`decode` lists them by name).
    pub extras: Vec<Extra<'a>>,
}

/// A tensor of the checkpoint outside the VB-LoRA parts (modules_to_save weights, biases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extra<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl Packed<'_> {
    /// Bits per stored index.
    pub fn index_bits(&self) -> u32 {
        bits::index_bits(self.num_vectors as u64)
    }
}

/// A safetensors dtype from its name in headers ("F32", "BF16", "I64", ...).
pub fn parse_dtype(name: &str) -> Result<Dtype, PackedError> {
    serde_json::from_value(serde_json::Value::String(name.to_owned()))
        .map_err(|_| PackedError::argument("dtype", format!("{name:?} is not a safetensors dtype")))
}

/// The PEFT checkpoint keys a module's data becomes (extras must not reuse them), recognised by
/// taking a key apart instead of listing them: a file naming 300k modules would otherwise build
/// 1.2M strings to compare a handful of extras with.
struct DerivedKeys<'m> {
    prefix: &'m str,
    paths: HashSet<&'m str>,
}

/// The endings of a module's four keys.
const DERIVED_SUFFIXES: [&str; 4] = [
    ".vblora_logits_A_topk_indices",
    ".vblora_logits_A_topk_weights",
    ".vblora_logits_B_topk_indices",
    ".vblora_logits_B_topk_weights",
];

impl<'m> DerivedKeys<'m> {
    fn new(prefix: &'m str, modules: &'m [Module]) -> Self {
        let paths = modules.iter().map(|m| m.path.as_str()).collect();
        Self { prefix, paths }
    }

    /// Whether `name` is `{prefix}{path}{suffix}` for a module `path` and one of the four suffixes.
    fn contains(&self, name: &str) -> bool {
        name.strip_prefix(self.prefix).is_some_and(|rest| {
            DERIVED_SUFFIXES
                .iter()
                .filter_map(|suffix| rest.strip_suffix(suffix))
                .any(|path| self.paths.contains(path))
        })
    }
}

/// Bytes of a tensor of `dtype` and `shape`, or `None` on overflow or a partial byte.
fn byte_len(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    let bits = shape
        .iter()
        .try_fold(dtype.bitsize(), |acc, &d| acc.checked_mul(d))?;
    (bits % 8 == 0).then_some(bits / 8)
}

/// An index error, with the module, grid cell and slot of a bad index.
fn index_message(e: &BitsError, topk: usize, modules: &[Module]) -> String {
    match *e {
        BitsError::OutOfRange {
            position,
            value,
            bound,
        } => {
            let sub = position / topk;
            format!(
                "index {position} (sub-vector {sub}, {}, slot {}) is {value}, outside [0, {bound})",
                h::locate(modules, sub),
                position % topk
            )
        }
        ref other => other.to_string(),
    }
}

// --- encoding ---------------------------------------------------------------------------------

struct Raw<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

impl View for &Raw<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The `__metadata__` entries and the named tensors of a file about to be written.
type Prepared<'p> = (HashMap<String, String>, Vec<(String, Raw<'p>)>);

/// The header entries and tensors of `p`, after checking everything `decode` would check: the
/// dims, then the metadata ([`metadata_entries`]), the values ([`check_values`]), and the tensors
/// with the extras ([`tensor_list`]).
fn prepare<'p>(p: &'p Packed<'_>) -> Result<Prepared<'p>, PackedError> {
    let (nv, len, k) = (p.num_vectors as u64, p.vector_length as u64, p.topk as u64);
    h::check_dims(nv, len, k).map_err(|(field, reason)| PackedError::argument(field, reason))?;
    let s = h::sub_vector_count(&p.modules)
        .map_err(|reason| PackedError::argument("modules", reason))?;
    let metadata = metadata_entries(p)?;
    check_values(p, s)?;
    let tensors = tensor_list(p, s, &metadata[h::KEY_PREFIX])?;
    Ok((metadata, tensors))
}

/// The caller's metadata with the computed entries added: the supplied ones must be present,
/// and a computed one the caller gave must agree with the data.
fn metadata_entries(p: &Packed<'_>) -> Result<HashMap<String, String>, PackedError> {
    let (nv, len, k) = (p.num_vectors as u64, p.vector_length as u64, p.topk as u64);
    let mut metadata: HashMap<String, String> = p.metadata.clone().into_iter().collect();
    for field in h::SUPPLIED {
        if !metadata.contains_key(field) {
            return Err(PackedError::argument(
                "metadata",
                format!("lacks the `{field}` entry"),
            ));
        }
    }
    h::check_indices_dtype(&metadata[h::INDICES_DTYPE], nv).map_err(|reason| {
        PackedError::argument(format!("metadata[{}]", h::INDICES_DTYPE), reason)
    })?;
    let bits = p.index_bits();
    let computed = [
        (h::FORMAT, "pt".to_owned()),
        (h::VERSION, h::VERSION_1.to_owned()),
        (h::NUM_VECTORS, nv.to_string()),
        (h::VECTOR_LENGTH, len.to_string()),
        (h::TOPK, k.to_string()),
        (h::INDEX_BITS, bits.to_string()),
        (h::MODULES, h::modules_json(&p.modules)),
    ];
    for (field, value) in computed {
        if let Some(given) = metadata.insert(field.to_owned(), value.clone()) {
            if given != value {
                return Err(PackedError::argument(
                    format!("metadata[{field}]"),
                    format!("is {given:?} but the data gives {value:?}"),
                ));
            }
        }
    }
    Ok(metadata)
}

/// The array lengths against the dims, every index and weight row, and a finite bank.
fn check_values(p: &Packed<'_>, s: usize) -> Result<(), PackedError> {
    let expect_len = |name: &str, got: usize, rows: usize, cols: usize| {
        let want = rows.checked_mul(cols);
        if want == Some(got) {
            Ok(())
        } else {
            Err(PackedError::argument(
                name,
                format!("holds {got} values, expected {rows} x {cols}"),
            ))
        }
    };
    expect_len("indices", p.indices.len(), s, p.topk)?;
    expect_len("weights", p.weights.len(), s, p.topk - 1)?;
    expect_len("bank", p.bank.len(), p.num_vectors, p.vector_length)?;
    p.weights
        .check_rows(&p.indices, p.topk, p.num_vectors)
        .map_err(|(row, e)| {
            let at = h::locate(&p.modules, row);
            let arg = if e.in_indices() { "indices" } else { "weights" };
            PackedError::argument(arg, format!("row {row} ({at}) {}", e.reason()))
        })?;
    if let Some((i, v)) = p.bank.first_non_finite() {
        return Err(PackedError::argument(
            "bank",
            format!(
                "row {} holds {v}; the bank must be finite",
                i / p.vector_length
            ),
        ));
    }
    Ok(())
}

/// The bank, the bit-packed indices, the weights and the extras (whose names must not clash
/// with those or with the keys the modules unpack to, and whose bytes must fit their shape).
fn tensor_list<'p>(
    p: &'p Packed<'_>,
    s: usize,
    key_prefix: &str,
) -> Result<Vec<(String, Raw<'p>)>, PackedError> {
    let (nv, bits) = (p.num_vectors as u64, p.index_bits());
    let packed = bits::pack(&p.indices, bits, nv)
        .map_err(|e| PackedError::argument("indices", index_message(&e, p.topk, &p.modules)))?;

    let mut tensors = vec![
        (
            h::VECTOR_BANK.to_owned(),
            Raw {
                dtype: p.bank.dtype(),
                shape: vec![p.num_vectors, p.vector_length],
                data: p.bank.le_bytes(),
            },
        ),
        (
            h::TOPK_INDICES.to_owned(),
            Raw {
                dtype: Dtype::U8,
                shape: vec![packed.len()],
                data: Cow::Owned(packed),
            },
        ),
        (
            h::TOPK_WEIGHTS.to_owned(),
            Raw {
                dtype: p.weights.dtype(),
                shape: vec![s, p.topk - 1],
                data: p.weights.le_bytes(),
            },
        ),
    ];
    let derived = DerivedKeys::new(key_prefix, &p.modules);
    let mut names: HashSet<&str> = [h::VECTOR_BANK, h::TOPK_INDICES, h::TOPK_WEIGHTS].into();
    for e in &p.extras {
        if !names.insert(&e.name) || derived.contains(&e.name) {
            return Err(PackedError::argument(
                "extras",
                format!("reuse the tensor name {:?}", e.name),
            ));
        }
        if byte_len(e.dtype, &e.shape) != Some(e.data.len()) {
            return Err(PackedError::argument(
                "extras",
                format!(
                    "tensor {:?} has {} bytes, which do not fit {} {:?}",
                    e.name,
                    e.data.len(),
                    e.dtype,
                    e.shape
                ),
            ));
        }
        tensors.push((
            e.name.clone(),
            Raw {
                dtype: e.dtype,
                shape: e.shape.clone(),
                data: Cow::Borrowed(&e.data),
            },
        ));
    }
    Ok(tensors)
}

/// The packed file's bytes: the same input gives the same bytes.
pub fn encode(p: &Packed<'_>) -> Result<Vec<u8>, PackedError> {
    let (metadata, tensors) = prepare(p)?;
    let mut bytes = safetensors::serialize(tensors.iter().map(|(n, r)| (n, r)), Some(metadata))
        .map_err(|e| PackedError::Serialize(e.to_string()))?;
    canonical_header(&mut bytes)?;
    Ok(bytes)
}

/// Rewrites the JSON header with its keys sorted, in place. The crate writes `__metadata__` from a
/// `HashMap`, whose order changes from run to run; the same keys and values sorted take exactly
/// as many bytes, so the header's length, padding and the data offsets stay as they are.
fn canonical_header(bytes: &mut [u8]) -> Result<(), PackedError> {
    let bad = |what: &str| PackedError::Serialize(format!("the encoder wrote {what}"));
    let size: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("no header"))?;
    let n = usize::try_from(u64::from_le_bytes(size)).map_err(|_| bad("a huge header"))?;
    let header = bytes
        .get_mut(8..8 + n)
        .ok_or_else(|| bad("a short header"))?;
    // serde_json's `Value` keeps object keys in a BTreeMap (no `preserve_order` feature): sorted.
    let value: serde_json::Value = serde_json::from_slice(header)
        .map_err(|e| bad(&format!("a header that is not JSON: {e}")))?;
    let text = serde_json::to_vec(&value).map_err(|e| bad(&e.to_string()))?;
    if text.len() > n {
        return Err(bad("a header that grew when sorted"));
    }
    header[..text.len()].copy_from_slice(&text);
    header[text.len()..].fill(b' ');
    Ok(())
}

/// Writes the packed file atomically (a sibling temporary file renamed over `path`); returns its
/// size in bytes.
pub fn encode_to_file(p: &Packed<'_>, path: &Path) -> Result<u64, PackedError> {
    let bytes = encode(p)?;
    let path = std::path::absolute(path).map_err(|e| PackedError::io(path, "resolving", e))?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    // a short name of its own: the target's name may already be as long as the filesystem allows
    let tmp = parent.join(format!(".vblora-packed.tmp-{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut file, &bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(PackedError::io(&path, "writing", e));
    }
    Ok(bytes.len() as u64)
}

// --- decoding ---------------------------------------------------------------------------------

/// The tensors of a file: info from the validated header, data sliced from the buffer.
struct Tensors<'a> {
    header: Metadata,
    data: &'a [u8],
}

impl<'a> Tensors<'a> {
    fn get(&self, name: &str) -> Result<(&TensorInfo, &'a [u8]), PackedError> {
        let info = self
            .header
            .info(name)
            .ok_or_else(|| PackedError::tensor(name, "is missing"))?;
        // `read_metadata` has checked that the offsets tile the data exactly.
        let (start, end) = info.data_offsets;
        let bytes = self
            .data
            .get(start..end)
            .ok_or_else(|| PackedError::tensor(name, "has offsets outside the file"))?;
        Ok((info, bytes))
    }

    fn float(&self, name: &str, shape: &[usize]) -> Result<FloatData<'static>, PackedError> {
        let (info, bytes) = self.get(name)?;
        if info.shape != shape {
            return Err(PackedError::tensor(
                name,
                format!("has shape {:?}, expected {shape:?}", info.shape),
            ));
        }
        FloatData::from_le_bytes(info.dtype, bytes).ok_or_else(|| {
            PackedError::tensor(
                name,
                format!("has dtype {}, expected F32, F16 or BF16", info.dtype),
            )
        })
    }
}

fn field<'m>(metadata: &'m BTreeMap<String, String>, name: &str) -> Result<&'m str, PackedError> {
    metadata
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| PackedError::metadata(name, "is missing"))
}

/// Decodes and validates a packed file.
pub fn decode(bytes: &[u8]) -> Result<Packed<'static>, PackedError> {
    let (n, header, metadata) = read_metadata(bytes)?;
    let layout = check_metadata(&metadata)?;
    let tensors = Tensors {
        header,
        data: bytes.get(8 + n..).unwrap_or_default(),
    };
    let (indices, weights, bank) = decode_arrays(&tensors, &layout)?;
    let extras = read_extras(&tensors, &layout)?;
    let Layout {
        modules,
        num_vectors,
        vector_length,
        topk,
        ..
    } = layout;
    Ok(Packed {
        metadata,
        modules,
        num_vectors,
        vector_length,
        topk,
        indices: Cow::Owned(indices),
        weights,
        bank,
        extras,
    })
}

/// What the checked metadata says about the tensors.
struct Layout<'m> {
    nv: u64,
    bits: u32,
    prefix: &'m str,
    modules: Vec<Module>,
    /// Sub-vectors (rows of indices and weights).
    s: usize,
    /// Indices in all: `s * topk`.
    count: usize,
    num_vectors: usize,
    vector_length: usize,
    topk: usize,
}

/// The header length, the safetensors header and its `__metadata__` (which a packed file has).
fn read_metadata(bytes: &[u8]) -> Result<(usize, Metadata, BTreeMap<String, String>), PackedError> {
    let (n, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| PackedError::Safetensors(e.to_string()))?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .ok_or_else(|| {
            PackedError::metadata(
                h::VERSION,
                "is missing: the file has no __metadata__, so it is not a packed adapter",
            )
        })?
        .into_iter()
        .collect();
    Ok((n, header, metadata))
}

/// Every metadata field checked (version, format, dims, index bits and dtype, key prefix, config,
/// modules table), in that order.
fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<Layout<'_>, PackedError> {
    let version = metadata.get(h::VERSION).ok_or_else(|| {
        PackedError::metadata(h::VERSION, "is missing: not a packed VB-LoRA adapter")
    })?;
    if version != h::VERSION_1 {
        return Err(PackedError::metadata(
            h::VERSION,
            format!(
                "is {version:?}; this version of vblora_rs reads format version {:?} only",
                h::VERSION_1
            ),
        ));
    }
    let format = field(metadata, h::FORMAT)?;
    if format != "pt" {
        return Err(PackedError::metadata(
            h::FORMAT,
            format!("is {format:?}, expected \"pt\""),
        ));
    }
    let nv = h::parse_count(h::NUM_VECTORS, field(metadata, h::NUM_VECTORS)?, 1)?;
    let len = h::parse_count(h::VECTOR_LENGTH, field(metadata, h::VECTOR_LENGTH)?, 1)?;
    let k = h::parse_count(h::TOPK, field(metadata, h::TOPK)?, 1)?;
    h::check_dims(nv, len, k).map_err(|(f, reason)| PackedError::metadata(f, reason))?;
    let bits = h::check_index_bits(nv, field(metadata, h::INDEX_BITS)?)?;
    h::check_indices_dtype(field(metadata, h::INDICES_DTYPE)?, nv)
        .map_err(|reason| PackedError::metadata(h::INDICES_DTYPE, reason))?;
    let prefix = field(metadata, h::KEY_PREFIX)?;
    field(metadata, h::CONFIG)?;
    let modules = h::parse_modules(field(metadata, h::MODULES)?)?;
    let s = h::sub_vector_count(&modules)
        .map_err(|reason| PackedError::metadata(h::MODULES, reason))?;
    let too_big =
        |what: &str| PackedError::metadata(h::MODULES, format!("gives a {what} that overflows"));
    let (num_vectors, vector_length, topk) = (
        usize::try_from(nv).map_err(|_| too_big("bank"))?,
        usize::try_from(len).map_err(|_| too_big("bank"))?,
        usize::try_from(k).map_err(|_| too_big("top-K"))?,
    );
    let count = s.checked_mul(topk).ok_or_else(|| too_big("index count"))?;
    Ok(Layout {
        nv,
        bits,
        prefix,
        modules,
        s,
        count,
        num_vectors,
        vector_length,
        topk,
    })
}

/// The indices (unpacked), weights and bank, sizes checked against the file's tensors before any
/// decoding, then every index and weight row, and a finite bank.
fn decode_arrays(
    tensors: &Tensors<'_>,
    layout: &Layout<'_>,
) -> Result<(Vec<i64>, FloatData<'static>, FloatData<'static>), PackedError> {
    let Layout {
        nv,
        bits,
        ref modules,
        s,
        count,
        num_vectors,
        vector_length,
        topk,
        ..
    } = *layout;
    let too_big =
        |what: &str| PackedError::metadata(h::MODULES, format!("gives a {what} that overflows"));
    // Sizes first: each is compared with a tensor the file really holds before any decoding.
    let (info, packed) = tensors.get(h::TOPK_INDICES)?;
    let expected = bits::packed_len(count, bits).ok_or_else(|| too_big("packed index length"))?;
    if info.dtype != Dtype::U8 || info.shape != [expected] {
        return Err(PackedError::tensor(
            h::TOPK_INDICES,
            format!(
                "is {} {:?}, expected U8 [{expected}] ({s} sub-vectors x topk {topk} x {bits} bits)",
                info.dtype, info.shape
            ),
        ));
    }
    let weights = tensors.float(h::TOPK_WEIGHTS, &[s, topk - 1])?;
    let bank = tensors.float(h::VECTOR_BANK, &[num_vectors, vector_length])?;

    let indices = bits::unpack(packed, count, bits, nv)
        .map_err(|e| PackedError::tensor(h::TOPK_INDICES, index_message(&e, topk, modules)))?;
    weights
        .check_rows(&indices, topk, num_vectors)
        .map_err(|(row, e)| {
            let at = h::locate(modules, row);
            let name = if e.in_indices() {
                h::TOPK_INDICES
            } else {
                h::TOPK_WEIGHTS
            };
            PackedError::tensor(name, format!("row {row} ({at}) {}", e.reason()))
        })?;
    if let Some((i, v)) = bank.first_non_finite() {
        return Err(PackedError::tensor(
            h::VECTOR_BANK,
            format!(
                "row {} holds {v}; the bank must be finite",
                i / vector_length
            ),
        ));
    }
    Ok((indices, weights, bank))
}

/// The file's other tensors, by name, none of which may clash with a key the modules unpack to.
fn read_extras(
    tensors: &Tensors<'_>,
    layout: &Layout<'_>,
) -> Result<Vec<Extra<'static>>, PackedError> {
    let derived = DerivedKeys::new(layout.prefix, &layout.modules);
    let mut names = tensors.header.offset_keys();
    names.sort_unstable();
    let mut extras = Vec::new();
    for name in names {
        if [h::VECTOR_BANK, h::TOPK_INDICES, h::TOPK_WEIGHTS].contains(&name.as_str()) {
            continue;
        }
        if derived.contains(&name) {
            return Err(PackedError::tensor(
                &name,
                "clashes with a key the modules table produces",
            ));
        }
        let (info, data) = tensors.get(&name)?;
        extras.push(Extra {
            dtype: info.dtype,
            shape: info.shape.clone(),
            data: Cow::Owned(data.to_vec()),
            name,
        });
    }
    Ok(extras)
}

/// Reads and decodes the packed file at `path`.
pub fn decode_file(path: &Path) -> Result<Packed<'static>, PackedError> {
    let bytes = std::fs::read(path).map_err(|e| PackedError::io(path, "reading", e))?;
    decode(&bytes)
}
