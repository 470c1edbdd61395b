//! Rayon pools sized per call, cached by thread count, and never reused across `fork`.
//!
//! The kernels never touch rayon's global pool: a pool created before `fork` (a DataLoader worker,
//! multiprocessing) has no threads in the child, so work sent to it would wait forever. Each
//! cached pool remembers the process id that built it; when that differs from ours the stale pools
//! are leaked with `mem::forget`, since dropping them would try to signal threads that do not exist
//! in this process, and fresh ones are built.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::KernelError;

struct Pools {
    pid: u32,
    by_threads: HashMap<usize, Arc<ThreadPool>>,
}

static POOLS: Mutex<Option<Pools>> = Mutex::new(None);

/// The thread count `num_threads` asks for: itself, or every core when 0.
pub fn resolve(num_threads: usize) -> usize {
    if num_threads == 0 {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        num_threads
    }
}

/// The cached pool of `num_threads` threads (0: all cores) of this process, built on first use.
pub(super) fn pool(num_threads: usize) -> Result<Arc<ThreadPool>, KernelError> {
    let threads = resolve(num_threads);
    let pid = std::process::id();
    // A panic while holding the lock cannot leave the map half-updated, so poison is harmless.
    let mut guard = POOLS.lock().unwrap_or_else(PoisonError::into_inner);
    if guard.as_ref().is_some_and(|pools| pools.pid != pid) {
        std::mem::forget(guard.take());
    }
    let pools = guard.get_or_insert_with(|| Pools {
        pid,
        by_threads: HashMap::new(),
    });
    if let Some(pool) = pools.by_threads.get(&threads) {
        return Ok(Arc::clone(pool));
    }
    let pool = ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("vblora-rs-{i}"))
        .build()
        .map_err(|e| KernelError::ThreadPool(e.to_string()))?;
    let pool = Arc::new(pool);
    pools.by_threads.insert(threads, Arc::clone(&pool));
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_the_requested_number_of_threads() {
        assert_eq!(pool(1).unwrap().install(rayon::current_num_threads), 1);
        assert_eq!(pool(3).unwrap().install(rayon::current_num_threads), 3);
        assert_eq!(
            pool(0).unwrap().install(rayon::current_num_threads),
            resolve(0)
        );
        assert!(Arc::ptr_eq(&pool(3).unwrap(), &pool(3).unwrap()));
    }

    #[test]
    fn stale_pools_from_another_process_are_replaced() {
        let before = pool(2).unwrap();
        {
            let mut guard = POOLS.lock().unwrap();
            // Pretend the cache was built by a parent process before fork.
            guard.as_mut().unwrap().pid = std::process::id().wrapping_add(1);
        }
        let after = pool(2).unwrap();
        assert!(!Arc::ptr_eq(&before, &after));
        assert_eq!(after.install(rayon::current_num_threads), 2);
    }
}
