//! An OpenMP runtime's thread team as the kernels' threads (why: see the parent module).
//!
//! [`use_openmp`] binds to a runtime that is already loaded in the process (`dlopen` with
//! `RTLD_NOLOAD` never loads a second copy, whose threads would be yet another team) and looks up
//! `GOMP_parallel`, the entry point GCC compiles `#pragma omp parallel` to, which LLVM's libomp
//! and Intel's libiomp5 export as well. A parallel region called from a given thread runs on the
//! team that runtime keeps for that thread: called from the Python thread that runs torch's ops,
//! it is torch's team.
//!
//! Fork: libgomp keeps its team's bookkeeping across `fork`, but the worker threads are not in
//! the child, so a parallel region there waits forever (torch's own ops hang the same way after
//! `fork`, measured). The runtime is therefore only used in the process that bound it; a forked
//! child falls back to rayon, whose pools handle `fork`.

use std::sync::OnceLock;

use crate::error::KernelError;

#[cfg(unix)]
use std::ffi::{c_uint, c_void, CString};

/// `void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags)`.
#[cfg(unix)]
type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

/// A bound runtime: its `GOMP_parallel` and the process that bound it.
pub(super) struct OpenMp {
    #[cfg(unix)]
    parallel: GompParallel,
    pid: u32,
}

static RUNTIME: OnceLock<OpenMp> = OnceLock::new();

/// Runs the kernels on the thread team of the OpenMP runtime at `path` (a shared library already
/// loaded in this process, e.g. torch's `libgomp.so.1`) from now on, in this process. Errors if
/// the library is not loaded or has no `GOMP_parallel`; the kernels then keep their rayon pools.
/// The first runtime bound stays for the life of the process.
pub fn use_openmp(path: &str) -> Result<(), KernelError> {
    let runtime = OpenMp::open(path, true)?;
    // Already bound: keep the first (the same library, in every caller this crate has).
    let _ = RUNTIME.set(runtime);
    Ok(())
}

/// The bound runtime, if any and if bound in this process (not inherited through `fork`).
pub(super) fn runtime() -> Option<&'static OpenMp> {
    RUNTIME.get().filter(|r| r.pid == std::process::id())
}

fn error(path: &str, why: &'static str) -> KernelError {
    KernelError::OpenMp {
        path: path.to_owned(),
        why,
    }
}

impl OpenMp {
    /// Looks up `GOMP_parallel` in the library at `path`: only if it is already loaded when
    /// `already_loaded`, else loading it if needed (tests, with the system's libgomp).
    #[cfg(unix)]
    #[allow(unsafe_code)]
    pub(super) fn open(path: &str, already_loaded: bool) -> Result<OpenMp, KernelError> {
        let c_path = CString::new(path).map_err(|_| error(path, "the path holds a NUL byte"))?;
        let noload = if already_loaded { libc::RTLD_NOLOAD } else { 0 };
        // SAFETY: `c_path` is a NUL-terminated string that outlives the call. With RTLD_NOLOAD
        // nothing is loaded and no initialiser runs: the call returns a handle to a library
        // already in the process, or null. Without it (tests only) the system's libgomp is
        // loaded, whose initialisers only read its environment variables. The handle is never
        // closed, so what `dlsym` returns from it stays valid for the life of the process.
        let handle =
            unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL | noload) };
        if handle.is_null() {
            return Err(error(path, "it is not loaded in this process"));
        }
        // SAFETY: `handle` is a live handle from `dlopen`, the name a NUL-terminated literal.
        let symbol = unsafe { libc::dlsym(handle, c"GOMP_parallel".as_ptr()) };
        if symbol.is_null() {
            return Err(error(path, "it has no GOMP_parallel"));
        }
        // SAFETY: `GOMP_parallel` has the C signature of `GompParallel` in libgomp, libomp and
        // libiomp5 alike; POSIX guarantees that a function address from `dlsym` survives the
        // conversion from `void *` to a function pointer.
        let parallel = unsafe { std::mem::transmute::<*mut c_void, GompParallel>(symbol) };
        Ok(OpenMp {
            parallel,
            pid: std::process::id(),
        })
    }

    #[cfg(not(unix))]
    pub(super) fn open(path: &str, _already_loaded: bool) -> Result<OpenMp, KernelError> {
        Err(error(
            path,
            "binding a loaded library is only implemented on unix",
        ))
    }

    /// Runs `body` on every thread of a team of `threads` (the caller included) and returns
    /// once all of them have returned. `body` must not panic (`map_tasks` catches every panic
    /// inside it): unwinding out of the `extern "C"` trampoline would abort the process.
    #[cfg(unix)]
    #[allow(unsafe_code)]
    pub(super) fn parallel(&self, threads: usize, body: &(dyn Fn() + Sync)) {
        extern "C" fn trampoline(data: *mut c_void) {
            // SAFETY: `data` is the address of `body` in `parallel` below, a reference that
            // lives until `GOMP_parallel` returns, which is after every thread of the team has
            // returned from this function; the referent is `Sync`, so sharing it is sound.
            let body = unsafe { &*data.cast_const().cast::<&(dyn Fn() + Sync)>() };
            body();
        }
        let data = std::ptr::from_ref(&body).cast_mut().cast::<c_void>();
        let threads = c_uint::try_from(threads).unwrap_or(c_uint::MAX);
        // SAFETY: `self.parallel` is `GOMP_parallel` (see `open`); the trampoline matches its
        // callback type and never unwinds; `data` is valid for the whole call (see trampoline).
        // Flags 0: no `proc_bind`, as a plain `#pragma omp parallel num_threads(n)`.
        unsafe { (self.parallel)(trampoline, data, threads, 0) };
    }

    #[cfg(not(unix))]
    pub(super) fn parallel(&self, _threads: usize, body: &(dyn Fn() + Sync)) {
        body();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The system's GNU OpenMP runtime, where this machine has one.
    fn system_libgomp() -> Option<&'static OpenMp> {
        let path = [
            "/usr/lib/x86_64-linux-gnu/libgomp.so.1",
            "/usr/lib/aarch64-linux-gnu/libgomp.so.1",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
        Some(Box::leak(Box::new(OpenMp::open(path, false).ok()?)))
    }

    #[test]
    fn team_of_a_real_runtime_runs_every_task() {
        let Some(runtime) = system_libgomp() else {
            eprintln!("no system libgomp: skipped");
            return;
        };
        let mut data = vec![0_u64; 10_000];
        let tasks: Vec<(usize, &mut [u64])> = data.chunks_mut(64).enumerate().collect();
        let threads_seen = std::sync::Mutex::new(std::collections::HashSet::new());
        let lens = super::super::on_team(
            tasks,
            &|(i, chunk): (usize, &mut [u64])| {
                threads_seen
                    .lock()
                    .unwrap()
                    .insert(std::thread::current().id());
                chunk.iter_mut().for_each(|x| *x = i as u64);
                chunk.len()
            },
            |body| runtime.parallel(2, body),
        );
        assert_eq!(lens.iter().sum::<usize>(), data.len());
        assert!(data.iter().enumerate().all(|(j, &x)| x == (j / 64) as u64));
        assert!(!threads_seen.lock().unwrap().is_empty());
    }

    #[test]
    fn libraries_not_loaded_or_without_openmp_are_refused() {
        let missing = OpenMp::open("/nonexistent/libgomp.so.1", true)
            .err()
            .unwrap();
        assert!(
            missing.to_string().contains("/nonexistent/libgomp.so.1"),
            "{missing}"
        );
        assert!(missing.to_string().contains("not loaded"), "{missing}");
        if cfg!(target_os = "linux") {
            // libc is loaded in every process and has no GOMP_parallel.
            let libc = OpenMp::open("libc.so.6", true).err().unwrap();
            assert!(libc.to_string().contains("no GOMP_parallel"), "{libc}");
        }
    }
}
