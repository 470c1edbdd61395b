//! The output side of the streaming merge: one thread that writes chunks and copies unchanged byte
//! ranges into the destination, strictly in the order they are sent, so that reading and updating
//! the next chunk overlaps with the kernel's copy of the previous one into the page cache.
//!
//! Measured on the 2-core VM (TinyLlama-shaped bf16, 2.05 GB): writing into the page cache costs
//! about as much as everything else together (0.5-2 s against ~0.6 s for all rank updates and
//! 0.25 s of reads), so it gets its own thread. Chunk buffers circulate between the two threads, at most
//! [`POOL`] of them, which bounds memory and the lag of the writer behind the reader.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::thread::{Scope, ScopedJoinHandle};

use super::error::StreamError;

/// Chunk buffers in circulation.
const POOL: usize = 3;

/// Bytes per `write` call. On this VM (Linux 6.18, ext4) the size of each `write` decides the cost
/// of filling the page cache: 1.9 GB in 1 MiB writes took 1.0-2.9 s of system time, in 64-256 KiB
/// writes 0.5-0.8 s, in 16 KiB writes ~1 s (more calls), alternating runs of one process; larger
/// writes get larger page-cache folios, which cost more to allocate here.
const WRITE_PIECE: usize = 128 << 10;

/// Largest unchanged range copied as one job (so progress and Ctrl-C stay responsive).
pub(super) const COPY_PIECE: u64 = 64 << 20;

pub(super) enum Job {
    /// Raw bytes (the header).
    Raw(Vec<u8>),
    /// The first `len` bytes of a pool buffer, part of `tensor`.
    Chunk {
        buf: Vec<u64>,
        len: usize,
        tensor: String,
    },
    /// `len` bytes of the source's data section from `start`, as they are; `first` names the run.
    Copy { start: u64, len: u64, first: String },
}

/// Where the writer copies unchanged ranges from.
pub(super) struct Source<'a> {
    pub path: &'a Path,
    /// A handle of its own: the reader's handle moves its file offset independently.
    pub file: File,
    pub data_start: u64,
}

pub(super) struct Sink<'scope> {
    jobs: Option<SyncSender<Job>>,
    free: Receiver<Vec<u64>>,
    handle: Option<ScopedJoinHandle<'scope, Result<u64, StreamError>>>,
    made: usize,
    dst: &'scope Path,
}

impl<'scope> Sink<'scope> {
    /// Starts the writer thread on `dst` (positioned at 0).
    pub fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        dst: &'scope Path,
        dst_file: File,
        source: Source<'scope>,
    ) -> Result<Self, StreamError> {
        let (jobs, inbox) = sync_channel::<Job>(POOL);
        let (back, free) = channel::<Vec<u64>>();
        let handle = std::thread::Builder::new()
            .name("vblora-writer".into())
            .spawn_scoped(scope, move || {
                write_all(dst, dst_file, source, &inbox, &back)
            })
            .map_err(|e| StreamError::io(dst, "starting the writer thread", e))?;
        Ok(Sink {
            jobs: Some(jobs),
            free,
            handle: Some(handle),
            made: 0,
            dst,
        })
    }

    /// A buffer of at least `bytes` bytes: a new one while fewer than `POOL` exist, else the next
    /// one the writer is done with.
    pub fn buffer(&mut self, bytes: usize) -> Result<Vec<u64>, StreamError> {
        let mut buf = if self.made < POOL {
            self.made += 1;
            Vec::new()
        } else {
            match self.free.recv() {
                Ok(buf) => buf,
                Err(_) => return Err(self.writer_error()),
            }
        };
        let words = bytes.div_ceil(8);
        if buf.len() < words {
            buf.resize(words, 0);
        }
        Ok(buf)
    }

    pub fn send(&mut self, job: Job) -> Result<(), StreamError> {
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(self.writer_error()),
        }
    }

    /// Waits for the writer to finish what was sent; returns the bytes written.
    pub fn finish(mut self) -> Result<u64, StreamError> {
        self.jobs = None;
        self.join()
    }

    /// The writer stopped early: its error.
    fn writer_error(&mut self) -> StreamError {
        self.jobs = None;
        match self.join() {
            Err(e) => e,
            Ok(_) => StreamError::invalid(self.dst, "the writer thread stopped"),
        }
    }

    fn join(&mut self) -> Result<u64, StreamError> {
        match self.handle.take().map(ScopedJoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(StreamError::invalid(self.dst, "the writer thread panicked")),
            None => Err(StreamError::invalid(self.dst, "the writer thread stopped")),
        }
    }
}

fn write_all(
    dst: &Path,
    mut file: File,
    mut source: Source<'_>,
    jobs: &Receiver<Job>,
    back: &Sender<Vec<u64>>,
) -> Result<u64, StreamError> {
    let mut written = 0;
    for job in jobs {
        match job {
            Job::Raw(bytes) => {
                file.write_all(&bytes)
                    .map_err(|e| StreamError::io(dst, "writing the header", e))?;
                written += bytes.len() as u64;
            }
            Job::Chunk { buf, len, tensor } => {
                let bytes = &bytemuck::cast_slice::<u64, u8>(&buf)[..len];
                for piece in bytes.chunks(WRITE_PIECE) {
                    file.write_all(piece)
                        .map_err(|e| StreamError::io(dst, format!("writing tensor {tensor}"), e))?;
                }
                written += len as u64;
                // The reader may have finished; then the buffer is simply dropped.
                let _ = back.send(buf);
            }
            Job::Copy { start, len, first } => {
                copy(&mut source, &mut file, dst, start, len, &first)?;
                written += len;
            }
        }
    }
    Ok(written)
}

/// `std::io::copy` between two files is `copy_file_range` on Linux: no user-space buffer.
fn copy(
    source: &mut Source<'_>,
    file: &mut File,
    dst: &Path,
    start: u64,
    len: u64,
    first: &str,
) -> Result<(), StreamError> {
    let src = source.path;
    source
        .file
        .seek(SeekFrom::Start(source.data_start + start))
        .map_err(|e| StreamError::io(src, format!("seeking to tensor {first}"), e))?;
    let copied = io::copy(&mut (&source.file).take(len), file)
        .map_err(|e| StreamError::io(dst, format!("copying tensors from {first} on"), e))?;
    if copied != len {
        return Err(StreamError::invalid(
            src,
            format!("file ended while copying tensors from {first} on (was it changed?)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk (`/dev/full` answers every write with ENOSPC) surfaces as the writer's error,
    /// from `send`, `buffer` or `finish`, whichever the reader calls next.
    #[cfg(target_os = "linux")]
    #[test]
    fn writer_errors_reach_the_reader() {
        let full = Path::new("/dev/full");
        let open = || File::options().write(true).open(full).unwrap();
        let source = Source {
            path: full,
            file: File::open("/dev/zero").unwrap(),
            data_start: 0,
        };
        let err = std::thread::scope(|scope| {
            let mut sink = Sink::start(scope, full, open(), source).unwrap();
            let mut first = None;
            for _ in 0..10 {
                let step = sink.buffer(64).and_then(|buf| {
                    sink.send(Job::Chunk {
                        buf,
                        len: 64,
                        tensor: "w".into(),
                    })
                });
                if let Err(e) = step {
                    first = Some(e);
                    break;
                }
            }
            first.unwrap_or_else(|| sink.finish().unwrap_err())
        });
        let msg = err.to_string();
        assert!(msg.starts_with("/dev/full: writing tensor w:"), "{msg}");
        assert!(
            matches!(err, StreamError::Io { ref source, .. } if source.raw_os_error() == Some(28))
        );
    }
}
