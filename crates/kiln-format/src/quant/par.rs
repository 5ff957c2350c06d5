//! Data parallelism over independent chunks with scoped threads.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// A piece of work not yet taken: its first index and its elements.
type Slot<'a, T> = Mutex<Option<(usize, &'a mut [T])>>;

/// Threads to use for `work` units of roughly equal cost: one per core, but none idle.
pub(crate) fn threads_for(work: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(work).max(1)
}

/// Calls `f(first_index, chunk)` on consecutive `chunk`-element pieces of `out`, on as many
/// threads as there are cores. Pieces are handed out dynamically, so uneven costs balance.
pub(crate) fn for_chunks<T: Send>(out: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    assert!(chunk > 0);
    let pieces: Vec<(usize, &mut [T])> = out
        .chunks_mut(chunk)
        .enumerate()
        .map(|(i, c)| (i * chunk, c))
        .collect();
    let threads = threads_for(pieces.len());
    if threads <= 1 {
        for (start, c) in pieces {
            f(start, c);
        }
        return;
    }
    let slots: Vec<Slot<T>> = pieces.into_iter().map(|p| Mutex::new(Some(p))).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(slot) = slots.get(i) else { break };
                let taken = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some((start, c)) = taken {
                    f(start, c);
                }
            });
        }
    });
}

/// `(0..n).map(f)` evaluated on as many threads as there are cores, results in order.
pub(crate) fn map_indices<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    for_chunks(&mut out, 1, |i, slot| slot[0] = Some(f(i)));
    out.into_iter()
        .map(|r| r.expect("every index is mapped"))
        .collect()
}
