//! Streaming merge of one safetensors file: the same tensors in the same order under the same
//! names and `__metadata__`, written front to back into a new file, where each tensor named in
//! `updates` gets `W += u @ v` ([`crate::merge::rank_update`]: float32 accumulation, one rounding)
//! and, given `out_dtype`, every float tensor is converted first (as loading with
//! `torch_dtype=...` and then merging does).
//!
//! Memory stays at a couple of chunk buffers whatever the model size. Why it is shaped this way:
//!
//! * The source is read with `read` into one reused buffer, never mapped: mapped file pages
//!   count in the process's RSS, so mapping a 2 GB shard shows as 2 GB resident.
//! * A tensor to update (or convert) goes through in chunks of whole rows (`u`'s matching rows
//!   with all of `v`), so even a 500 MB embedding needs only `chunk_bytes` of buffer.
//! * Runs of tensors that stay as they are go from file to file with `std::io::copy`, which on
//!   Linux is `copy_file_range`: one in-kernel copy between page caches, no user-space buffer.
//!   With no dtype change the output header is the input's, byte for byte, so the layout is
//!   identical and a run is one contiguous range.
//! * All output goes through a writer thread (`sink`), so that the next chunk is read and
//!   updated while the previous one is copied into the page cache.
//! * Progress is reported (and cancellation honoured) after every chunk or copy piece.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};

use super::convert::convert;
use super::error::StreamError;
use super::header::{float_size, read_header_from, Header};
use super::sink::{Job, Sink, Source, COPY_PIECE};
use crate::element::Element;
use crate::matrix::{MatMut, MatRef};

/// Rows of an updated tensor processed at a time, in bytes: about what stays in this CPU's L2
/// (512 KiB per core) and L3 slice while a chunk is read, updated and written. Writing 4 MiB
/// chunks into the page cache cost 2-3.5 s of system time for the 2 GB TinyLlama-shaped model
/// against ~1-1.4 s with 1 MiB or 256 KiB ones (`dd` from `/dev/zero` shows the same cliff
/// between 1M and 4M blocks); per-chunk costs (three system calls, one hand-over to the thread
/// pool) stay near 2,000 x ~30 us.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// `W += u @ v` for one tensor `W (rows, cols)`: `u (rows, R)`, `v (R, cols)`, float32.
#[derive(Debug, Clone, Copy)]
pub struct Update<'a> {
    pub u: MatRef<'a, f32>,
    pub v: MatRef<'a, f32>,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Convert every float tensor (`F64`, `F32`, `F16`, `BF16`) to this (`F32`, `F16` or `BF16`).
    pub out_dtype: Option<Dtype>,
    /// Threads for the rank updates (0: all cores).
    pub num_threads: usize,
    pub chunk_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            out_dtype: None,
            num_threads: 0,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
        }
    }
}

/// Called with the bytes of source data processed since the previous call; an error stops the
/// merge (and is returned by it).
pub type Progress<'p> = dyn FnMut(u64) -> Result<(), StreamError> + 'p;

/// What happens to one tensor.
struct Step<'a, 'u> {
    name: &'a str,
    info: &'a TensorInfo,
    out_dtype: Dtype,
    update: Option<&'a Update<'u>>,
}

impl Step<'_, '_> {
    fn copies(&self) -> bool {
        self.update.is_none() && self.out_dtype == self.info.dtype
    }
}

/// Writes `dst` (which must not exist) as `src` with `updates` merged in; see the module doc.
/// Everything is checked before `dst` is created; on any error `dst` is removed.
pub fn merge_file(
    src: &Path,
    dst: &Path,
    updates: &HashMap<String, Update<'_>>,
    opts: &Options,
    progress: &mut Progress<'_>,
) -> Result<(), StreamError> {
    if !cfg!(target_endian = "little") {
        return Err(StreamError::invalid(
            src,
            "streaming merge needs a little-endian machine",
        ));
    }
    let mut src_file = File::open(src).map_err(|e| StreamError::io(src, "opening", e))?;
    let header = read_header_from(&mut src_file, src)?;
    let steps = plan(src, &header, updates, opts.out_dtype)?;
    let out_header = output_header(src, &header, &steps)?;
    let dst_file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| StreamError::io(dst, "creating", e))?;
    let result = File::open(src)
        .map_err(|e| StreamError::io(src, "opening", e))
        .and_then(|copy_from| {
            let source = Source {
                path: src,
                file: copy_from,
                data_start: header.data_start(),
            };
            std::thread::scope(|scope| {
                let mut streamer = Streamer {
                    src: (src, &src_file, header.data_start()),
                    sink: Sink::start(scope, dst, dst_file, source)?,
                    opts,
                    progress,
                    input: Vec::new(),
                };
                let expected = streamer.run(out_header, &steps);
                let written = streamer.sink.finish();
                // The writer's own error explains a failed send better than the reader's.
                let (expected, written) = (expected?, written?);
                if written == expected {
                    Ok(())
                } else {
                    Err(StreamError::invalid(
                        dst,
                        format!("wrote {written} bytes, expected {expected}"),
                    ))
                }
            })
        });
    if result.is_err() {
        // Best effort: the caller's temporary folder goes away as well.
        let _ = std::fs::remove_file(dst);
    }
    result
}

/// Checks `updates` and `out_dtype` against the header and decides each tensor's fate.
fn plan<'a, 'u>(
    src: &Path,
    header: &'a Header,
    updates: &'a HashMap<String, Update<'u>>,
    out_dtype: Option<Dtype>,
) -> Result<Vec<Step<'a, 'u>>, StreamError> {
    if let Some(d) = out_dtype {
        if !matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(StreamError::invalid(
                src,
                format!("output dtype {d} is not F32, F16 or BF16"),
            ));
        }
    }
    let mut missing: Vec<&str> = updates
        .keys()
        .filter(|name| header.info(name).is_none())
        .map(String::as_str)
        .collect();
    missing.sort_unstable();
    if let Some(name) = missing.first() {
        return Err(StreamError::invalid(
            src,
            format!("no tensor {name} to merge into"),
        ));
    }
    header
        .tensors()
        .map(|(name, info)| {
            let out_dtype = match (out_dtype, float_size(info.dtype)) {
                (Some(d), Some(_)) => d,
                _ => info.dtype,
            };
            let update = updates.get(name);
            if let Some(up) = update {
                check_update(src, name, info, out_dtype, up)?;
            }
            Ok(Step {
                name,
                info,
                out_dtype,
                update,
            })
        })
        .collect()
}

fn check_update(
    src: &Path,
    name: &str,
    info: &TensorInfo,
    dtype: Dtype,
    up: &Update<'_>,
) -> Result<(), StreamError> {
    let bad = |what: String| Err(StreamError::invalid(src, format!("tensor {name}: {what}")));
    if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return bad(format!(
            "dtype {dtype} cannot take a merge (F32, F16 or BF16 needed)"
        ));
    }
    let want = [up.u.rows(), up.v.cols()];
    if info.shape != want {
        return bad(format!(
            "shape {:?} does not match the update's ({}, {})",
            info.shape, want[0], want[1]
        ));
    }
    if up.u.cols() != up.v.rows() {
        return bad(format!(
            "update factors u {:?} and v {:?} do not chain",
            up.u.shape(),
            up.v.shape()
        ));
    }
    Ok(())
}

/// The output header: the input's bytes when no tensor changes dtype; else the same names,
/// order and `__metadata__` with new dtypes and offsets, padded with spaces to a multiple of 8.
fn output_header(
    src: &Path,
    header: &Header,
    steps: &[Step<'_, '_>],
) -> Result<Vec<u8>, StreamError> {
    if steps.iter().all(|s| s.out_dtype == s.info.dtype) {
        return Ok(header.raw.clone());
    }
    let mut offset = 0;
    let tensors = steps
        .iter()
        .map(|s| {
            let (start, end) = s.info.data_offsets;
            let len = match (float_size(s.info.dtype), float_size(s.out_dtype)) {
                (Some(a), Some(b)) => (end - start) / a * b,
                _ => end - start,
            };
            let info = TensorInfo {
                dtype: s.out_dtype,
                shape: s.info.shape.clone(),
                data_offsets: (offset, offset + len),
            };
            offset += len;
            (s.name.to_owned(), info)
        })
        .collect();
    let bad = |e: String| StreamError::invalid(src, format!("cannot build the output header: {e}"));
    let meta = Metadata::new(header.metadata.metadata().clone(), tensors)
        .map_err(|e| bad(e.to_string()))?;
    let mut json = serde_json::to_vec(&meta).map_err(|e| bad(e.to_string()))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    Ok(out)
}

struct Streamer<'s, 'p, 'q> {
    /// Path, file and start of the data section.
    src: (&'s Path, &'s File, u64),
    sink: Sink<'s>,
    opts: &'s Options,
    progress: &'p mut Progress<'q>,
    /// Source chunk buffer when converting (`u64`-backed, so it can be viewed as any float type).
    input: Vec<u64>,
}

impl Streamer<'_, '_, '_> {
    /// Sends everything to the writer; returns the bytes it should write.
    fn run(&mut self, out_header: Vec<u8>, steps: &[Step<'_, '_>]) -> Result<u64, StreamError> {
        let mut expected = out_header.len() as u64;
        self.sink.send(Job::Raw(out_header))?;
        // Pending run of unchanged tensors: source byte range (relative to the data start).
        let mut run: Option<(u64, u64, &str)> = None;
        for step in steps {
            let (start, end) = step.info.data_offsets;
            let (start, end) = (start as u64, end as u64);
            if step.copies() {
                run = Some(match run {
                    Some((s, _, first)) => (s, end, first),
                    None => (start, end, step.name),
                });
                expected += end - start;
                continue;
            }
            if let Some((s, e, first)) = run.take() {
                self.copy(s, e, first)?;
            }
            expected += self.transform(step)?;
        }
        if let Some((s, e, first)) = run {
            self.copy(s, e, first)?;
        }
        Ok(expected)
    }

    /// Has source data `start..end` copied as it is, in pieces; `first` names the run.
    fn copy(&mut self, start: u64, end: u64, first: &str) -> Result<(), StreamError> {
        for piece in (start..end).step_by(COPY_PIECE as usize) {
            let len = COPY_PIECE.min(end - piece);
            self.sink.send(Job::Copy {
                start: piece,
                len,
                first: first.to_owned(),
            })?;
            (self.progress)(len)?;
        }
        Ok(())
    }

    /// Streams one tensor through conversion and/or update; returns the bytes it becomes.
    fn transform(&mut self, step: &Step<'_, '_>) -> Result<u64, StreamError> {
        let (src, src_file, data_start) = self.src;
        let in_size = float_size(step.info.dtype).expect("only float tensors are transformed");
        let out_size = float_size(step.out_dtype).expect("only float tensors are transformed");
        let numel: usize = step.info.shape.iter().product();
        let (rows, cols) = match step.update {
            Some(up) => (up.u.rows(), up.v.cols()),
            None => (numel, 1),
        };
        if rows * cols == 0 {
            return Ok(0);
        }
        let row_bytes = cols * in_size.max(out_size);
        let chunk_rows = (self.opts.chunk_bytes / row_bytes).clamp(1, rows);
        let converting = step.out_dtype != step.info.dtype;
        if converting {
            grow(&mut self.input, chunk_rows * cols * in_size);
        }
        let mut written = 0;
        let mut reader = src_file;
        reader
            .seek(SeekFrom::Start(
                data_start + step.info.data_offsets.0 as u64,
            ))
            .map_err(|e| StreamError::io(src, format!("seeking to tensor {}", step.name), e))?;
        for r0 in (0..rows).step_by(chunk_rows) {
            let r1 = (r0 + chunk_rows).min(rows);
            let n = (r1 - r0) * cols;
            let mut buf = self.sink.buffer(chunk_rows * cols * out_size)?;
            let out = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut buf)[..n * out_size];
            let read_into = if converting {
                &mut bytemuck::cast_slice_mut::<u64, u8>(&mut self.input)[..n * in_size]
            } else {
                &mut *out
            };
            reader
                .read_exact(read_into)
                .map_err(|e| StreamError::io(src, format!("reading tensor {}", step.name), e))?;
            if converting {
                let input = &bytemuck::cast_slice::<u64, u8>(&self.input)[..n * in_size];
                convert(step.info.dtype, input, step.out_dtype, out);
            }
            if let Some(up) = step.update {
                apply(step, up, out, r0, r1, self.opts.num_threads)
                    .map_err(|e| StreamError::invalid(src, format!("tensor {}: {e}", step.name)))?;
            }
            self.sink.send(Job::Chunk {
                buf,
                len: n * out_size,
                tensor: step.name.to_owned(),
            })?;
            written += (n * out_size) as u64;
            (self.progress)((n * in_size) as u64)?;
        }
        Ok(written)
    }
}

/// `out (rows r0..r1 of W) += u[r0..r1] @ v` in `step.out_dtype`.
fn apply(
    step: &Step<'_, '_>,
    up: &Update<'_>,
    out: &mut [u8],
    r0: usize,
    r1: usize,
    threads: usize,
) -> Result<(), crate::KernelError> {
    fn go<W: Element>(
        out: &mut [u8],
        up: &Update<'_>,
        r0: usize,
        r1: usize,
        threads: usize,
    ) -> Result<(), crate::KernelError> {
        // A weight that was already infinite or NaN stays as the base has it; a finite one must stay
        // finite (a huge bank, or a weight near the dtype's maximum, would otherwise be written as inf).
        fn non_finite<W: Element>(w: &[W]) -> Vec<usize> {
            let mut at = Vec::new();
            for (i, x) in w.iter().enumerate() {
                if !x.to_f32().is_finite() {
                    at.push(i);
                }
            }
            at
        }
        let (r, cols) = (up.u.cols(), up.v.cols());
        let before = non_finite(bytemuck::cast_slice::<u8, W>(out));
        let w = MatMut::new(
            "weight",
            bytemuck::cast_slice_mut::<u8, W>(out),
            r1 - r0,
            cols,
        )?;
        let u = MatRef::new("u", &up.u.data()[r0 * r..r1 * r], r1 - r0, r)?;
        crate::merge::rank_update(w, u, up.v, threads)?;
        let after = non_finite(bytemuck::cast_slice::<u8, W>(out));
        if let Some(i) = after.into_iter().find(|i| before.binary_search(i).is_err()) {
            return Err(crate::KernelError::Overflow {
                arg: "weight",
                row: r0 + i / cols,
                col: i % cols,
                dtype: W::NAME,
            });
        }
        Ok(())
    }
    match step.out_dtype {
        Dtype::F32 => go::<f32>(out, up, r0, r1, threads),
        Dtype::F16 => go::<f16>(out, up, r0, r1, threads),
        Dtype::BF16 => go::<bf16>(out, up, r0, r1, threads),
        other => unreachable!("checked in plan: {other}"),
    }
}

/// Makes `buf` hold at least `bytes` bytes.
fn grow(buf: &mut Vec<u64>, bytes: usize) {
    let words = bytes.div_ceil(8);
    if buf.len() < words {
        buf.resize(words, 0);
    }
}
