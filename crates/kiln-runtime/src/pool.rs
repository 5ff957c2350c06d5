//! A small persistent thread pool for data-parallel kernels.
//!
//! A decoded token of a small model costs a few milliseconds spread over hundreds of kernel
//! calls, so spawning threads (or even waking them through a mutex) per call would show in the
//! profile. Workers stay alive, spin briefly on a shared counter when a job is likely to follow,
//! and park on a condition variable only when idle for longer.
//!
//! Items are claimed one at a time from a single atomic word holding the job's generation and
//! the next item index, and a job is complete when all its items are *done*, not when every
//! worker has checked in: a worker that is descheduled (the machine is busy) never holds up a
//! job it has not started; the caller simply runs the remaining items itself.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Iterations an idle worker spins before it parks.
const SPIN_ITERATIONS: u32 = 50_000;
/// Index value that marks a generation as closed: no item can be claimed any more.
const CLOSED: u64 = u32::MAX as u64;

/// The published job: a borrowed closure, lifetime erased (see `for_each` for why it is sound).
struct Job {
    f: *const (dyn Fn(usize) + Sync),
}

struct Shared {
    /// `generation << 32 | next_item`. Claiming an item is a compare-and-swap on this word, so
    /// a claim succeeds only while its generation is the current one and still open.
    counter: AtomicU64,
    /// Items in the current job.
    n_items: AtomicUsize,
    /// Items of the current job that have finished.
    done: AtomicUsize,
    /// The current job; valid while its generation is open.
    job: AtomicPtr<Job>,
    /// Workers parked on `wake`.
    sleepers: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
}

/// A fixed set of worker threads that run `for_each` jobs together with the calling thread.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    submit: Mutex<u32>,
}

impl ThreadPool {
    /// Creates a pool that runs jobs on `n_threads` threads in total (the caller counts as one).
    pub fn new(n_threads: usize) -> ThreadPool {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            counter: AtomicU64::new(CLOSED),
            n_items: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            sleepers: AtomicUsize::new(0),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        let workers = (1..n_threads)
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("kiln-worker-{i}"))
                    .spawn(move || worker_loop(&shared))
                    .expect("failed to spawn a kiln worker thread")
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            submit: Mutex::new(0),
        }
    }

    /// Total threads that execute a job, the caller included.
    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Calls `f(i)` for every `i` in `0..n_items`, spread over the pool's threads; returns when
    /// all calls have finished. Items are handed out one at a time, so callers choose the item
    /// granularity (a few items per thread balances load well).
    pub fn for_each<F: Fn(usize) + Sync>(&self, n_items: usize, f: F) {
        if n_items == 0 {
            return;
        }
        if self.workers.is_empty() || n_items == 1 {
            (0..n_items).for_each(f);
            return;
        }
        assert!((n_items as u64) < CLOSED, "too many items for one job");
        // One job at a time; the guard also holds the generation number.
        let mut generation = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        *generation = generation.wrapping_add(1);
        let shared = &*self.shared;
        let dyn_f: &(dyn Fn(usize) + Sync) = &f;
        // SAFETY: only the lifetime is erased. Workers call through this pointer only after
        // claiming an item of this generation, and this function does not return before every
        // item is done and the generation is closed, so `f` outlives every call.
        let job = Job {
            f: unsafe {
                std::mem::transmute::<&(dyn Fn(usize) + Sync), *const (dyn Fn(usize) + Sync)>(dyn_f)
            },
        };
        shared.done.store(0, Ordering::Relaxed);
        shared.n_items.store(n_items, Ordering::Relaxed);
        shared
            .job
            .store(&job as *const Job as *mut Job, Ordering::Relaxed);
        // Opening the generation publishes the stores above (Release).
        shared
            .counter
            .store(u64::from(*generation) << 32, Ordering::Release);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _lock = shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        while let Some(i) = claim(shared, *generation) {
            f(i);
            shared.done.fetch_add(1, Ordering::Release);
        }
        let mut spins = 0u32;
        while shared.done.load(Ordering::Acquire) != n_items {
            spins += 1;
            if spins < SPIN_ITERATIONS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // Close the generation: a worker holding a stale view can no longer claim anything.
        shared
            .counter
            .store(u64::from(*generation) << 32 | CLOSED, Ordering::Release);
        shared.job.store(std::ptr::null_mut(), Ordering::Relaxed);
    }
}

/// Claims the next item of generation `generation`, if that generation is open and has items
/// left.
fn claim(shared: &Shared, generation: u32) -> Option<usize> {
    let mut current = shared.counter.load(Ordering::Acquire);
    loop {
        if (current >> 32) as u32 != generation {
            return None;
        }
        let index = current & CLOSED;
        // n_items may already belong to a later job, but then this generation is closed and
        // the compare-and-swap below fails.
        if index >= shared.n_items.load(Ordering::Acquire) as u64 {
            return None;
        }
        match shared.counter.compare_exchange_weak(
            current,
            current + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return Some(index as usize),
            Err(actual) => current = actual,
        }
    }
}

fn worker_loop(shared: &Shared) {
    let mut seen = (shared.counter.load(Ordering::Acquire) >> 32) as u32;
    loop {
        // Wait for a new generation: spin first, then park.
        let mut spins = 0u32;
        let generation = loop {
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            let g = (shared.counter.load(Ordering::Acquire) >> 32) as u32;
            if g != seen {
                break g;
            }
            spins += 1;
            if spins < SPIN_ITERATIONS {
                std::hint::spin_loop();
                continue;
            }
            let guard = shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.sleepers.fetch_add(1, Ordering::SeqCst);
            let still_idle = (shared.counter.load(Ordering::SeqCst) >> 32) as u32 == seen;
            if still_idle && !shared.shutdown.load(Ordering::Acquire) {
                let _unused = shared
                    .wake
                    .wait_timeout(guard, std::time::Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner());
            }
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        };
        seen = generation;
        while let Some(i) = claim(shared, generation) {
            // SAFETY: holding an unfinished item of an open generation means the submitter is
            // still inside `for_each` for this job, so the job and its closure are alive; the
            // successful claim (Acquire) synchronises with the store that published them.
            let job = unsafe { &*shared.job.load(Ordering::Acquire) };
            // SAFETY: as above; the closure is `Sync`.
            let f = unsafe { &*job.f };
            f(i);
            shared.done.fetch_add(1, Ordering::Release);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _lock = self
                .shared
                .sleep_lock
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Splits `0..n` into `parts` contiguous ranges of nearly equal length; returns range `index`.
pub fn split_range(n: usize, parts: usize, index: usize) -> std::ops::Range<usize> {
    let parts = parts.max(1);
    let base = n / parts;
    let extra = n % parts;
    let start = index * base + index.min(extra);
    let len = base + usize::from(index < extra);
    start..(start + len).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_item_runs_exactly_once() {
        for threads in [1, 2, 3, 4] {
            let pool = ThreadPool::new(threads);
            for n in [0usize, 1, 2, 7, 64, 1000] {
                let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
                pool.for_each(n, |i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn many_consecutive_jobs_see_their_own_closure() {
        let pool = ThreadPool::new(3);
        let total = AtomicU64::new(0);
        for job in 0..20_000u64 {
            pool.for_each(5, |i| {
                total.fetch_add(job * 10 + i as u64, Ordering::Relaxed);
            });
        }
        let expected: u64 = (0..20_000u64).map(|j| 5 * j * 10 + 10).sum();
        assert_eq!(total.load(Ordering::Relaxed), expected);
    }

    #[test]
    fn jobs_after_idle_period_still_run() {
        let pool = ThreadPool::new(2);
        let count = AtomicU64::new(0);
        pool.for_each(4, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(std::time::Duration::from_millis(250));
        pool.for_each(4, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn a_slow_item_on_a_worker_is_waited_for() {
        let pool = ThreadPool::new(2);
        let done = AtomicU64::new(0);
        pool.for_each(2, |i| {
            if i == 0 {
                std::thread::sleep(std::time::Duration::from_millis(30));
            }
            done.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(done.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn split_range_covers_everything_once() {
        for n in 0..50 {
            for parts in 1..9 {
                let mut covered = vec![0; n];
                for p in 0..parts {
                    for i in split_range(n, parts, p) {
                        covered[i] += 1;
                    }
                }
                assert!(covered.iter().all(|&c| c == 1), "n={n} parts={parts}");
            }
        }
    }
}
