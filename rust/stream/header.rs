//! Safetensors headers, read without touching the data: the 8-byte little-endian length, the JSON,
//! validated by the `safetensors` crate's own `Metadata` (offsets contiguous from 0 in file order,
//! no gap or overlap, byte sizes that match dtype and shape), plus a check that the data section
//! ends exactly at the end of the file. Only `8 + n` bytes are read, never mapped: a header check
//! over a 100 GB model costs a few kilobytes of memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use safetensors::tensor::{Dtype, Metadata, TensorInfo};

use super::error::StreamError;

/// The safetensors format's own cap on the header (`safetensors::tensor::MAX_HEADER_SIZE`).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A validated header.
#[derive(Debug, Clone)]
pub struct Header {
    /// The first `8 + n` bytes of the file, verbatim (copied as they are when nothing changes).
    pub raw: Vec<u8>,
    pub metadata: Metadata,
    /// Tensor names in data order (increasing offsets).
    pub names: Vec<String>,
}

impl Header {
    /// Where the data section starts in the file.
    pub fn data_start(&self) -> u64 {
        self.raw.len() as u64
    }

    /// Bytes in the data section.
    pub fn data_len(&self) -> u64 {
        self.metadata.data_len() as u64
    }

    /// `(name, info)` in data order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorInfo)> {
        self.names.iter().map(|n| {
            let info = self.metadata.info(n).expect("names come from the metadata");
            (n.as_str(), info)
        })
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.metadata.info(name)
    }
}

/// Reads and validates the header of the safetensors file at `path`.
pub fn read_header(path: &Path) -> Result<Header, StreamError> {
    let mut file = File::open(path).map_err(|e| StreamError::io(path, "opening", e))?;
    read_header_from(&mut file, path)
}

/// [`read_header`] on an open file (read from offset 0); `path` names it in errors.
pub fn read_header_from(file: &mut File, path: &Path) -> Result<Header, StreamError> {
    let bad = |what: String| StreamError::invalid(path, format!("not a safetensors file: {what}"));
    let file_len = file
        .metadata()
        .map_err(|e| StreamError::io(path, "reading the file size", e))?
        .len();
    if file_len < 8 {
        return Err(bad(format!(
            "{file_len} bytes, shorter than the 8-byte header length"
        )));
    }
    file.seek(SeekFrom::Start(0))
        .and_then(|_| {
            let mut len = [0_u8; 8];
            file.read_exact(&mut len).map(|()| len)
        })
        .map_err(|e| StreamError::io(path, "reading the header", e))
        .and_then(|len| {
            let n = u64::from_le_bytes(len);
            if n > MAX_HEADER_BYTES || n > file_len - 8 {
                return Err(bad(format!(
                    "header length {n} exceeds the file ({file_len} bytes) or the format's limit"
                )));
            }
            // n <= MAX_HEADER_BYTES, so this fits usize on every supported target.
            let mut raw = vec![0_u8; 8 + n as usize];
            raw[..8].copy_from_slice(&len);
            file.read_exact(&mut raw[8..])
                .map_err(|e| StreamError::io(path, "reading the header", e))?;
            Ok(raw)
        })
        .and_then(|raw| parse(raw, file_len, path))
}

fn parse(raw: Vec<u8>, file_len: u64, path: &Path) -> Result<Header, StreamError> {
    let bad = |what: String| StreamError::invalid(path, format!("not a safetensors file: {what}"));
    let json = std::str::from_utf8(&raw[8..])
        .map_err(|e| bad(format!("the header is not UTF-8 ({e})")))?;
    let metadata: Metadata =
        serde_json::from_str(json).map_err(|e| bad(format!("bad header ({e})")))?;
    let end = raw.len() as u64 + metadata.data_len() as u64;
    if end != file_len {
        return Err(bad(format!(
            "the header describes {end} bytes but the file holds {file_len}"
        )));
    }
    let names = metadata.offset_keys();
    Ok(Header {
        raw,
        metadata,
        names,
    })
}

/// Bytes per element of the dtypes a tensor can be processed in (not just copied), else `None`.
pub fn float_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F64 => Some(8),
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Write;

    /// A safetensors file of `tensors` (name, dtype, shape, bytes) in that data order, with
    /// `metadata`; the header is padded with spaces to a multiple of 8, as the reference writer does.
    pub(crate) fn build(
        tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
        metadata: Option<HashMap<String, String>>,
    ) -> Vec<u8> {
        let mut offset = 0;
        let infos = tensors
            .iter()
            .map(|(name, dtype, shape, data)| {
                let info = TensorInfo {
                    dtype: *dtype,
                    shape: shape.clone(),
                    data_offsets: (offset, offset + data.len()),
                };
                offset += data.len();
                ((*name).to_owned(), info)
            })
            .collect();
        let meta = Metadata::new(metadata, infos).unwrap();
        let mut json = serde_json::to_vec(&meta).unwrap();
        while !(json.len() + 8).is_multiple_of(8) {
            json.push(b' ');
        }
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&json);
        for (_, _, _, data) in tensors {
            out.extend_from_slice(data);
        }
        out
    }

    pub(crate) fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.join(name);
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    pub(crate) fn tmp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "vblora-stream-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_names_in_data_order_and_metadata() {
        let dir = tmp_dir("hdr");
        let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        let bytes = build(
            &[
                ("z", Dtype::F32, vec![2], vec![0; 8]),
                ("a", Dtype::BF16, vec![3, 1], vec![1; 6]),
                ("m", Dtype::I64, vec![], vec![2; 8]),
            ],
            Some(meta),
        );
        let path = write_tmp(&dir, "ok.safetensors", &bytes);
        let h = read_header(&path).unwrap();
        assert_eq!(h.names, ["z", "a", "m"]);
        assert_eq!(h.data_len(), 22);
        assert_eq!(h.data_start() + h.data_len(), bytes.len() as u64);
        assert_eq!(h.info("a").unwrap().shape, [3, 1]);
        assert_eq!(h.metadata.metadata().as_ref().unwrap()["format"], "pt");
        assert_eq!(&h.raw[..], &bytes[..h.raw.len()]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rejects_damaged_files_naming_them() {
        let dir = tmp_dir("bad");
        let good = build(&[("w", Dtype::F32, vec![2, 2], vec![0; 16])], None);
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("short", vec![1, 2, 3], "shorter than"),
            ("trunc", good[..good.len() - 1].to_vec(), "describes"),
            ("longer", [&good[..], &[0]].concat(), "describes"),
            (
                "hugelen",
                [&u64::MAX.to_le_bytes()[..], &good[8..]].concat(),
                "header length",
            ),
            (
                "json",
                {
                    let mut b = good.clone();
                    b[8] = b'[';
                    b
                },
                "bad header",
            ),
            (
                "utf8",
                {
                    let mut b = good.clone();
                    b[10] = 0xFF;
                    b
                },
                "not UTF-8",
            ),
        ];
        for (name, bytes, msg) in cases {
            let path = write_tmp(&dir, name, &bytes);
            let err = read_header(&path).unwrap_err().to_string();
            assert!(err.starts_with(&path.display().to_string()), "{err}");
            assert!(err.contains(msg), "{name}: {err}");
        }
        // A size that does not match dtype x shape, and overlapping offsets.
        let json = br#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        let bytes = [&(json.len() as u64).to_le_bytes()[..], json, &[0; 8]].concat();
        let path = write_tmp(&dir, "size", &bytes);
        assert!(read_header(&path).is_err());
        let json = br#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
        let bytes = [&(json.len() as u64).to_le_bytes()[..], json, &[0; 6]].concat();
        let path = write_tmp(&dir, "overlap", &bytes);
        assert!(read_header(&path).is_err());
        let missing = dir.join("missing");
        let err = read_header(&missing).unwrap_err().to_string();
        assert!(err.contains("opening"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
