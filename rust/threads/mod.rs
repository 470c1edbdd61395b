//! Where the kernels' parallel work runs: a list of independent tasks, mapped on `num_threads`
//! threads, results back in task order.
//!
//! Two backends. By default, rayon pools owned by this crate (`rayon_pools`). When the Python
//! layer finds torch's OpenMP runtime loaded in the process, it calls [`use_openmp`] and the
//! kernels run on *that* runtime's thread team (`openmp`): the same threads torch's own CPU
//! ops use. That matters on machines with few cores. After every parallel torch op, libgomp's
//! idle workers spin for a few milliseconds before they sleep (`OMP_WAIT_POLICY` unset); a
//! kernel on separate rayon threads right after a torch op shares the cores with those
//! spinners, and measured 30-70% slower on 2 cores (merge 4096x4096 f32: 4.4 ms back to back,
//! 7-9 ms right after a `copy_`). On the OpenMP team the spinning workers are the ones that
//! pick the work up.
//!
//! One thread runs the tasks inline on the caller, with no hand-off at all.

mod openmp;
mod rayon_pools;

use std::sync::{Mutex, PoisonError};

use rayon::prelude::*;

pub use openmp::use_openmp;
pub use rayon_pools::resolve;

use crate::error::KernelError;

/// The backend the kernels use in this process now: `"openmp"` (torch's runtime, see
/// [`use_openmp`]) or `"rayon"`.
pub fn backend_name() -> &'static str {
    if openmp::runtime().is_some() {
        "openmp"
    } else {
        "rayon"
    }
}

/// `f` of every task, on `num_threads` threads (0: all cores), results in task order. Tasks are
/// handed out one at a time as threads free up, so uneven tasks balance.
pub fn map_tasks<T, R, F>(num_threads: usize, tasks: Vec<T>, f: F) -> Result<Vec<R>, KernelError>
where
    T: Send,
    R: Send,
    F: Fn(T) -> R + Sync,
{
    let threads = resolve(num_threads).min(tasks.len());
    if threads <= 1 {
        return Ok(tasks.into_iter().map(f).collect());
    }
    match openmp::runtime() {
        Some(runtime) => Ok(on_team(tasks, &f, |body| runtime.parallel(threads, body))),
        None => Ok(rayon_pools::pool(threads)?.install(|| tasks.into_par_iter().map(&f).collect())),
    }
}

/// The first `Some` of [`map_tasks`]'s results in task order (e.g. the first row that failed),
/// as rayon's `find_map_first`; every task runs.
pub fn first_some<T, R, F>(
    num_threads: usize,
    tasks: Vec<T>,
    f: F,
) -> Result<Option<R>, KernelError>
where
    T: Send,
    R: Send,
    F: Fn(T) -> Option<R> + Sync,
{
    Ok(map_tasks(num_threads, tasks, f)?
        .into_iter()
        .flatten()
        .next())
}

/// Runs the tasks on a team of threads that each call the body `run_team` is given (OpenMP's
/// model): a shared counter hands out task numbers, so a thread takes the next task as soon as it
/// is free. A panic in a task stops the hand-out and is raised again on the caller once the team
/// is done; it never unwinds through the team's C frames.
fn on_team<T, R, F>(tasks: Vec<T>, f: &F, run_team: impl FnOnce(&(dyn Fn() + Sync))) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(T) -> R + Sync,
{
    use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let n = tasks.len();
    // One slot per task: each is locked once by the one thread that drew its number, so the
    // locks are never contended; they only make handing the items across threads safe Rust.
    let slots: Vec<Mutex<Option<T>>> = tasks.into_iter().map(|t| Mutex::new(Some(t))).collect();
    let results: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let panicked = Mutex::new(None);
    let body = || {
        let work = || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                return;
            }
            let Some(task) = lock(&slots[i]).take() else {
                continue;
            };
            let r = f(task);
            *lock(&results[i]) = Some(r);
        };
        if let Err(payload) = catch_unwind(AssertUnwindSafe(work)) {
            next.store(n, Ordering::Relaxed);
            lock(&panicked).get_or_insert(payload);
        }
    };
    run_team(&body);
    if let Some(payload) = panicked
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
    {
        resume_unwind(payload);
    }
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(PoisonError::into_inner)
                .expect("the team ran every task: none panicked and each number was drawn once")
        })
        .collect()
}

/// A lock's content; a poisoned lock is used as is (every critical section here is one move).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A team of `n` plain threads, each running the body: what an OpenMP runtime does.
    fn scoped_team(n: usize) -> impl FnOnce(&(dyn Fn() + Sync)) {
        move |body| {
            std::thread::scope(|s| {
                for _ in 0..n {
                    s.spawn(body);
                }
            });
        }
    }

    #[test]
    fn team_runs_every_task_once_in_order() {
        let tasks: Vec<usize> = (0..1000).collect();
        let out = on_team(tasks, &|t: usize| t * 2, scoped_team(3));
        assert_eq!(out, (0..1000).map(|t| t * 2).collect::<Vec<_>>());
    }

    #[test]
    fn team_hands_mutable_slices_across_threads() {
        let mut data = vec![0_u32; 100];
        let tasks: Vec<(usize, &mut [u32])> = data.chunks_mut(7).enumerate().collect();
        let sums = on_team(
            tasks,
            &|(i, c): (usize, &mut [u32])| {
                c.fill(i as u32);
                c.len()
            },
            scoped_team(4),
        );
        assert_eq!(sums.iter().sum::<usize>(), 100);
        assert!(data.iter().enumerate().all(|(j, &x)| x as usize == j / 7));
    }

    #[test]
    fn team_panic_reaches_the_caller() {
        let caught = std::panic::catch_unwind(|| {
            on_team(
                (0..50).collect::<Vec<u32>>(),
                &|t: u32| assert!(t != 17, "task 17"),
                scoped_team(2),
            )
        });
        let payload = caught.unwrap_err();
        let msg = payload
            .downcast_ref::<&str>()
            .map(ToString::to_string)
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(msg.contains("task 17"), "{msg}");
    }

    #[test]
    fn map_tasks_keeps_order_on_any_thread_count() {
        for threads in [1, 2, 5] {
            let out = map_tasks(threads, (0..300).collect(), |t: u64| t * t).unwrap();
            assert_eq!(out, (0..300).map(|t| t * t).collect::<Vec<_>>());
        }
        assert!(map_tasks(4, Vec::<u8>::new(), |t| t).unwrap().is_empty());
    }
}
