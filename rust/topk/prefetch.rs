//! Whether the top-k scan's first pass prefetches the row after next: measured once per process.
//!
//! A `prefetcht0` per 64 bytes of the row after next, inside the first pass, made the selection
//! ~25% slower on AMD Zen 4 (its hardware prefetcher keeps up alone) and clearly faster on an
//! Intel Xeon (Sapphire Rapids), where the scan without it ran at 1.4-1.6x `logits.sum()`
//! (`docs/kernels.md`). Neither choice is right on both, and a vendor table would guess for the
//! next CPU, so the first call large enough to stream from beyond L2 times both variants on its
//! own first row blocks (alternating, on the calling thread: their results are the call's
//! results, the bits being the same either way) and keeps the faster for the process. Until then
//! the scan does not prefetch. `VBLORA_RS_TOPK_PREFETCH=on|off` (read once) fixes the variant;
//! `auto`, unset or anything else measures.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::error::KernelError;
use crate::threads;

/// A variant of the first pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prefetch {
    Off,
    On,
}

/// Logit bytes from which a call is measured: well past any L2, so that its rows stream from
/// L3 or memory as in the calls whose speed matters (39,040 x 2,048 f32 is 320 MB).
pub(crate) const MEASURE_BYTES: usize = 32 << 20;

/// Tasks (of `ROWS_PER_TASK` rows) timed per variant.
const TRIALS: usize = 6;

/// The variant measured in this process: 0 until measured, then 1 + `Prefetch as u8`.
static MEASURED: AtomicU8 = AtomicU8::new(0);

fn encode(p: Prefetch) -> u8 {
    match p {
        Prefetch::Off => 1,
        Prefetch::On => 2,
    }
}

fn decode(v: u8) -> Option<Prefetch> {
    match v {
        1 => Some(Prefetch::Off),
        2 => Some(Prefetch::On),
        _ => None,
    }
}

/// The variant `VBLORA_RS_TOPK_PREFETCH` fixes, if any.
fn forced() -> Option<Prefetch> {
    static FORCED: OnceLock<Option<Prefetch>> = OnceLock::new();
    *FORCED.get_or_init(
        || match std::env::var("VBLORA_RS_TOPK_PREFETCH").as_deref() {
            Ok("on") => Some(Prefetch::On),
            Ok("off") => Some(Prefetch::Off),
            _ => None,
        },
    )
}

/// The variant calls use now, if decided (by the environment or by a measurement).
pub(crate) fn chosen() -> Option<Prefetch> {
    forced().or_else(|| decode(MEASURED.load(Ordering::Relaxed)))
}

/// `(variant, how)`: `"on"`, `"off"` or `"undecided"` (no large call yet: not prefetching), and
/// `"VBLORA_RS_TOPK_PREFETCH"`, `"measured"` or `"auto"`.
pub fn topk_prefetch() -> (&'static str, &'static str) {
    let name = |p| match p {
        Prefetch::Off => "off",
        Prefetch::On => "on",
    };
    match (forced(), decode(MEASURED.load(Ordering::Relaxed))) {
        (Some(p), _) => (name(p), "VBLORA_RS_TOPK_PREFETCH"),
        (None, Some(p)) => (name(p), "measured"),
        (None, None) => ("undecided", "auto"),
    }
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

/// Runs `tasks` as [`threads::first_some`] does, each as `f(task, variant)`: the variant `fixed`
/// (tests), else the process's. If that is undecided, `measurable` (a level with a prefetching
/// scan), `bytes` at least [`MEASURE_BYTES`] and there are enough tasks, the first `2 * TRIALS`
/// tasks run here one by one, the variants in the order off, on, on, off, ... (so a drift in
/// speed along the call favours neither), and the variant with the lower median time is kept
/// for the process (the first measurement stands if two calls race). A NaN row among them ends
/// the call there, undecided.
pub(crate) fn run_tasks<T, R, F>(
    num_threads: usize,
    mut tasks: Vec<T>,
    bytes: usize,
    measurable: bool,
    fixed: Option<Prefetch>,
    f: F,
) -> Result<Option<R>, KernelError>
where
    T: Send,
    R: Send,
    F: Fn(T, Prefetch) -> Option<R> + Sync,
{
    let decided = fixed.or_else(chosen);
    let variant = match decided {
        Some(p) => p,
        None if measurable && bytes >= MEASURE_BYTES && tasks.len() >= 4 * TRIALS => {
            let rest = tasks.split_off(2 * TRIALS);
            let (mut off, mut on) = (Vec::new(), Vec::new());
            for (i, task) in tasks.into_iter().enumerate() {
                let p = if matches!(i % 4, 0 | 3) {
                    Prefetch::Off
                } else {
                    Prefetch::On
                };
                let start = Instant::now();
                let failed = f(task, p);
                let took = start.elapsed();
                if failed.is_some() {
                    return Ok(failed);
                }
                match p {
                    Prefetch::Off => off.push(took),
                    Prefetch::On => on.push(took),
                }
            }
            let faster = if median(on) < median(off) {
                Prefetch::On
            } else {
                Prefetch::Off
            };
            let _ =
                MEASURED.compare_exchange(0, encode(faster), Ordering::Relaxed, Ordering::Relaxed);
            tasks = rest;
            chosen().unwrap_or(faster)
        }
        None => Prefetch::Off,
    };
    threads::first_some(num_threads, tasks, |t| f(t, variant))
}
