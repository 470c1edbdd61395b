//! The `__metadata__` of a packed file: field names, the modules table, and the checks of the
//! numbers in it (all arithmetic checked, so a header claiming 2^40 sub-vectors fails here or at
//! the tensor-size comparison, before anything of that size is allocated).

use super::bits::{index_bits, MAX_BITS};
use super::error::PackedError;

pub const FORMAT: &str = "format";
pub const VERSION: &str = "vblora_packed";
pub const NUM_VECTORS: &str = "num_vectors";
pub const VECTOR_LENGTH: &str = "vector_length";
pub const TOPK: &str = "topk";
pub const INDEX_BITS: &str = "index_bits";
pub const INDICES_DTYPE: &str = "indices_dtype";
pub const KEY_PREFIX: &str = "key_prefix";
pub const MODULES: &str = "modules";
pub const CONFIG: &str = "config";

/// The one format version this code reads and writes.
pub const VERSION_1: &str = "1";

/// Tensor names of the format.
pub const VECTOR_BANK: &str = "vector_bank";
pub const TOPK_INDICES: &str = "topk_indices";
pub const TOPK_WEIGHTS: &str = "topk_weights";

/// Fields the caller must supply: they describe the PEFT checkpoint the data came from.
pub const SUPPLIED: [&str; 3] = [INDICES_DTYPE, KEY_PREFIX, CONFIG];

/// The PEFT index dtypes and the largest `num_vectors` each can index.
const INDICES_DTYPES: [(&str, u64); 4] = [
    ("uint8", 1 << 8),
    ("int16", 1 << 15),
    ("int32", 1 << 31),
    ("int64", u64::MAX),
];

/// Banks larger than this would need indices wider than `bits::MAX_BITS`.
pub const MAX_NUM_VECTORS: u64 = 1 << MAX_BITS;

/// One adapted layer: PEFT's `vblora_logits_A` grid is `[r, in_sub]`, `vblora_logits_B` is
/// `[out_sub, r]`, one sub-vector per grid cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub path: String,
    pub r: usize,
    pub in_sub: usize,
    pub out_sub: usize,
}

impl Module {
    /// `r * in_sub` (sub-vectors of A), or `None` on overflow.
    pub fn a_len(&self) -> Option<usize> {
        self.r.checked_mul(self.in_sub)
    }

    /// `r * (in_sub + out_sub)`, or `None` on overflow.
    pub fn sub_vectors(&self) -> Option<usize> {
        self.r.checked_mul(self.in_sub.checked_add(self.out_sub)?)
    }
}

/// A plain decimal `>= min` (no sign, no leading zeros, no spaces), as the encoder writes it.
pub fn parse_count(field: &str, text: &str, min: u64) -> Result<u64, PackedError> {
    let value: u64 = text
        .parse()
        .ok()
        .filter(|v: &u64| v.to_string() == text)
        .ok_or_else(|| {
            PackedError::metadata(field, format!("is {text:?}, not a decimal integer"))
        })?;
    if value < min {
        return Err(PackedError::metadata(
            field,
            format!("is {value}, must be >= {min}"),
        ));
    }
    Ok(value)
}

/// Checks `num_vectors`, `vector_length` and `topk` against each other; errors name the field.
pub fn check_dims(num_vectors: u64, vector_length: u64, topk: u64) -> Result<(), (String, String)> {
    if num_vectors == 0 || num_vectors > MAX_NUM_VECTORS {
        return Err((
            NUM_VECTORS.into(),
            format!("is {num_vectors}, must be in 1..={MAX_NUM_VECTORS}"),
        ));
    }
    if vector_length == 0 {
        return Err((VECTOR_LENGTH.into(), "is 0, must be >= 1".into()));
    }
    if topk == 0 || topk > num_vectors {
        return Err((
            TOPK.into(),
            format!("is {topk}, must be in 1..={num_vectors} (num_vectors)"),
        ));
    }
    Ok(())
}

/// The bits per index implied by `num_vectors`, compared with the recorded `index_bits`.
pub fn check_index_bits(num_vectors: u64, text: &str) -> Result<u32, PackedError> {
    let expected = index_bits(num_vectors);
    let got = parse_count(INDEX_BITS, text, 1)?;
    if got != u64::from(expected) {
        return Err(PackedError::metadata(
            INDEX_BITS,
            format!("is {got}, but num_vectors {num_vectors} needs {expected}"),
        ));
    }
    Ok(expected)
}

/// `dtype` must be a PEFT index dtype able to hold every index below `num_vectors`.
pub fn check_indices_dtype(dtype: &str, num_vectors: u64) -> Result<(), String> {
    match INDICES_DTYPES.iter().find(|(name, _)| *name == dtype) {
        None => Err(format!(
            "is {dtype:?}, expected one of \"uint8\", \"int16\", \"int32\", \"int64\""
        )),
        Some((_, limit)) if num_vectors > *limit => Err(format!(
            "is {dtype}, which cannot hold indices up to {} (num_vectors {num_vectors})",
            num_vectors - 1
        )),
        Some(_) => Ok(()),
    }
}

/// Checks the modules (at least one; dims >= 1; non-empty, unique paths) and returns `S`, the total number of
/// sub-vectors, without overflow.
pub fn sub_vector_count(modules: &[Module]) -> Result<usize, String> {
    if modules.is_empty() {
        return Err("lists no modules".into());
    }
    let mut seen = std::collections::HashSet::with_capacity(modules.len());
    let mut total = 0_usize;
    for (i, m) in modules.iter().enumerate() {
        if m.path.is_empty() {
            return Err(format!("entry {i} has an empty module path"));
        }
        if !seen.insert(m.path.as_str()) {
            return Err(format!("lists module {:?} twice", m.path));
        }
        if m.r == 0 || m.in_sub == 0 || m.out_sub == 0 {
            return Err(format!(
                "module {:?} has r={}, in_sub={}, out_sub={}; all must be >= 1",
                m.path, m.r, m.in_sub, m.out_sub
            ));
        }
        total = m
            .sub_vectors()
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| format!("module {:?}: the sub-vector count overflows", m.path))?;
    }
    Ok(total)
}

/// The modules table as compact JSON: `[["path",r,in_sub,out_sub],...]`.
pub fn modules_json(modules: &[Module]) -> String {
    let rows: Vec<(&str, usize, usize, usize)> = modules
        .iter()
        .map(|m| (m.path.as_str(), m.r, m.in_sub, m.out_sub))
        .collect();
    // Serialising strings and integers cannot fail.
    serde_json::to_string(&rows).unwrap_or_default()
}

/// Parses the modules table (its size is bounded by the header, hence by the file).
pub fn parse_modules(text: &str) -> Result<Vec<Module>, PackedError> {
    let rows: Vec<(String, u64, u64, u64)> = serde_json::from_str(text).map_err(|e| {
        PackedError::metadata(
            MODULES,
            format!("is not a JSON array of [path, r, in_sub, out_sub]: {e}"),
        )
    })?;
    rows.into_iter()
        .map(|(path, r, in_sub, out_sub)| {
            let dim = |v: u64| {
                usize::try_from(v).map_err(|_| {
                    PackedError::metadata(MODULES, format!("module {path:?}: {v} is too large"))
                })
            };
            Ok(Module {
                r: dim(r)?,
                in_sub: dim(in_sub)?,
                out_sub: dim(out_sub)?,
                path,
            })
        })
        .collect()
}

/// Where sub-vector `sub` lives, for messages: `"path.vblora_logits_A[i, j]"`.
pub fn locate(modules: &[Module], mut sub: usize) -> String {
    for m in modules {
        let (Some(a), Some(n)) = (m.a_len(), m.sub_vectors()) else {
            break;
        };
        if sub < a {
            return format!(
                "{}.vblora_logits_A[{}, {}]",
                m.path,
                sub / m.in_sub,
                sub % m.in_sub
            );
        }
        if sub < n {
            let b = sub - a;
            return format!("{}.vblora_logits_B[{}, {}]", m.path, b / m.r, b % m.r);
        }
        sub -= n;
    }
    "an unknown module".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(path: &str, r: usize, in_sub: usize, out_sub: usize) -> Module {
        Module {
            path: path.into(),
            r,
            in_sub,
            out_sub,
        }
    }

    #[test]
    fn counts_are_strict_decimals() {
        assert_eq!(parse_count("topk", "12", 1).ok(), Some(12));
        for bad in [
            "",
            "012",
            "+1",
            " 1",
            "1.0",
            "-1",
            "0x10",
            "99999999999999999999999",
        ] {
            assert!(parse_count("topk", bad, 0).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_count("topk", "0", 1).unwrap_err().to_string(),
            "metadata field `topk` is 0, must be >= 1"
        );
    }

    #[test]
    fn modules_round_trip_compactly() {
        let modules = vec![module("a.q", 4, 16, 16), module("b\"x", 1, 2, 3)];
        let text = modules_json(&modules);
        assert_eq!(text, r#"[["a.q",4,16,16],["b\"x",1,2,3]]"#);
        assert_eq!(parse_modules(&text).unwrap(), modules);
        assert_eq!(sub_vector_count(&modules), Ok(4 * 32 + 5));
    }

    #[test]
    fn bad_modules_are_rejected() {
        for bad in [
            "",
            "{}",
            "[[\"a\",1,2]]",
            "[[\"a\",-1,2,3]]",
            "[[\"a\",1.5,2,3]]",
            "[[1,1,2,3]]",
        ] {
            assert!(parse_modules(bad).is_err(), "{bad}");
        }
        assert!(sub_vector_count(&[module("a", 0, 1, 1)]).is_err());
        assert_eq!(sub_vector_count(&[]), Err("lists no modules".into()));
        assert!(sub_vector_count(&[module("", 1, 1, 1)]).is_err());
        assert!(sub_vector_count(&[module("a", 1, 1, 1), module("a", 1, 1, 1)]).is_err());
        let huge = module("a", 1 << 40, 1 << 40, 1);
        assert!(sub_vector_count(&[huge]).unwrap_err().contains("overflows"));
    }

    #[test]
    fn dims_and_dtypes() {
        assert!(check_dims(2048, 256, 2).is_ok());
        assert_eq!(check_dims(0, 1, 1).unwrap_err().0, NUM_VECTORS);
        assert_eq!(
            check_dims(MAX_NUM_VECTORS + 1, 1, 1).unwrap_err().0,
            NUM_VECTORS
        );
        assert_eq!(check_dims(4, 0, 1).unwrap_err().0, VECTOR_LENGTH);
        assert_eq!(check_dims(4, 1, 5).unwrap_err().0, TOPK);
        assert!(check_indices_dtype("uint8", 256).is_ok());
        assert!(check_indices_dtype("uint8", 257).is_err());
        assert!(check_indices_dtype("int16", 2048).is_ok());
        assert!(check_indices_dtype("float32", 2).is_err());
        assert_eq!(check_index_bits(2048, "11").ok(), Some(11));
        assert!(check_index_bits(2048, "12").is_err());
    }

    #[test]
    fn locate_names_module_grid_and_cell() {
        let modules = vec![module("l0", 2, 3, 4), module("l1", 1, 1, 1)];
        assert_eq!(locate(&modules, 0), "l0.vblora_logits_A[0, 0]");
        assert_eq!(locate(&modules, 5), "l0.vblora_logits_A[1, 2]");
        assert_eq!(locate(&modules, 6), "l0.vblora_logits_B[0, 0]");
        assert_eq!(locate(&modules, 13), "l0.vblora_logits_B[3, 1]");
        assert_eq!(locate(&modules, 15), "l1.vblora_logits_B[0, 0]");
        assert_eq!(locate(&modules, 16), "an unknown module");
    }
}
