//! A small persistent thread pool for data-parallel kernels.
//!
//! A decoded token of a small model costs a few milliseconds spread over hundreds of kernel
//! calls, so spawning threads (or even waking them through a mutex every time) per call would
//! show up in the profile. Workers stay alive, spin briefly on a generation counter when a job
//! is likely to follow, and park on a condition variable only when idle for longer.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Iterations a worker spins on the generation counter before it parks.
const SPIN_ITERATIONS: u32 = 20_000;

/// The job currently published to the workers: a borrowed closure with its lifetime erased.
type JobRef = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per job; workers compare it with the last generation they ran.
    generation: AtomicUsize,
    /// Next item index to hand out.
    next: AtomicUsize,
    /// Number of items in the current job.
    n_items: AtomicUsize,
    /// Workers that have not yet finished the current job.
    pending: AtomicUsize,
    /// The current job. Written only by the submitting thread while no worker reads it.
    job: UnsafeCell<Option<JobRef>>,
    sleep_lock: Mutex<bool>,
    wake: Condvar,
    /// Set when the pool is dropped.
    shutdown: std::sync::atomic::AtomicBool,
}

// SAFETY: `job` is only written by the thread that owns the pool, inside `for_each`, at points
// where every worker has finished the previous job (pending == 0) and before the generation
// bump that lets workers read it (Release/Acquire on `generation`). Workers only read it after
// observing the new generation. The closure behind the pointer is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: see above; the raw pointer is only dereferenced under the same protocol.
unsafe impl Send for Shared {}

/// A fixed set of worker threads that run `for_each` jobs together with the calling thread.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    submit: Mutex<()>,
}

impl ThreadPool {
    /// Creates a pool that runs jobs on `n_threads` threads in total (the caller counts as one).
    pub fn new(n_threads: usize) -> ThreadPool {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            n_items: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            sleep_lock: Mutex::new(false),
            wake: Condvar::new(),
            shutdown: std::sync::atomic::AtomicBool::new(false),
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
            submit: Mutex::new(()),
        }
    }

    /// Total threads that execute a job, the caller included.
    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Calls `f(i)` for every `i` in `0..n_items`, spread over the pool's threads; returns when
    /// all calls have finished. Items are handed out one at a time from a shared counter, so
    /// callers choose the item granularity (a few items per thread balances load well).
    pub fn for_each<F: Fn(usize) + Sync>(&self, n_items: usize, f: F) {
        if n_items == 0 {
            return;
        }
        if self.workers.is_empty() || n_items == 1 {
            for i in 0..n_items {
                f(i);
            }
            return;
        }
        // One job at a time; a second caller waits (the pool is usually owned by one session).
        let _guard = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let shared = &*self.shared;
        let job: &(dyn Fn(usize) + Sync) = &f;
        // SAFETY: the pointer's lifetime is erased, but it is only dereferenced by workers
        // between the generation bump below and their decrement of `pending`, and this function
        // does not return before `pending` is back to zero, so `f` outlives every use.
        let job: JobRef = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), JobRef>(job) };
        // SAFETY: no worker reads `job` now: the previous job ended with pending == 0 and the
        // generation has not moved since.
        unsafe { *shared.job.get() = Some(job) };
        shared.next.store(0, Ordering::Relaxed);
        shared.n_items.store(n_items, Ordering::Relaxed);
        shared.pending.store(self.workers.len(), Ordering::Relaxed);
        shared.generation.fetch_add(1, Ordering::Release);
        {
            // Wake parked workers; spinning ones see the generation change by themselves.
            let _lock = shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        run_items(shared, &f);
        let mut spins = 0u32;
        while shared.pending.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < SPIN_ITERATIONS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: every worker has finished with the job (pending == 0).
        unsafe { *shared.job.get() = None };
    }
}

fn run_items(shared: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let n = shared.n_items.load(Ordering::Relaxed);
    loop {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        f(i);
    }
}

fn worker_loop(shared: &Shared) {
    let mut seen = 0usize;
    loop {
        // Wait for a new generation: spin first, then park.
        let mut spins = 0u32;
        loop {
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            let g = shared.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            spins += 1;
            if spins < SPIN_ITERATIONS {
                std::hint::spin_loop();
            } else {
                let guard = shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
                if shared.generation.load(Ordering::Acquire) == seen
                    && !shared.shutdown.load(Ordering::Acquire)
                {
                    let _unused = shared
                        .wake
                        .wait_timeout(guard, std::time::Duration::from_millis(50))
                        .unwrap_or_else(|e| e.into_inner());
                }
                spins = 0;
            }
        }
        // SAFETY: the generation we observed (Acquire) was published after `job` was set, and
        // the submitter keeps the closure alive until `pending` reaches zero.
        let job = unsafe { *shared.job.get() };
        if let Some(job) = job {
            // SAFETY: as above, the pointee is alive for the duration of this job.
            let f: &(dyn Fn(usize) + Sync) = unsafe { &*job };
            run_items(shared, f);
        }
        shared.pending.fetch_sub(1, Ordering::Release);
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

/// Splits `0..n` into `parts` contiguous ranges of nearly equal length.
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
        for job in 0..2000u64 {
            pool.for_each(5, |i| {
                total.fetch_add(job * 10 + i as u64, Ordering::Relaxed);
            });
        }
        let expected: u64 = (0..2000u64).map(|j| 5 * j * 10 + 10).sum();
        assert_eq!(total.load(Ordering::Relaxed), expected);
    }

    #[test]
    fn jobs_after_idle_period_still_run() {
        let pool = ThreadPool::new(2);
        let count = AtomicU64::new(0);
        pool.for_each(4, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(std::time::Duration::from_millis(120));
        pool.for_each(4, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 8);
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
