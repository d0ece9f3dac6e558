//! At most one policy call per CPU at a time.
//!
//! A call's deadline is wall-clock time (an epoch ticker), so a call that waits for a CPU
//! while others run is charged for the wait. With a hundred deliveries deciding at once on two
//! cores, a Python decision that needs 1 ms of CPU can take well over its 10 ms deadline and
//! fail closed, though nothing is wrong with it (measured: 10 of 108 conformance scenarios did,
//! without this gate). Callers therefore queue here *before* their store is created and their
//! deadline starts; once admitted, a call has a CPU to itself, and its deadline measures its
//! own work. Calls are short (microseconds to about a millisecond), so the queue is too.

use std::sync::{Condvar, Mutex};

/// A counting semaphore for policy calls.
#[derive(Debug)]
pub(super) struct Gate {
    free: Mutex<usize>,
    released: Condvar,
}

/// An admitted call; dropping it lets the next one in.
pub(super) struct Permit<'a> {
    gate: &'a Gate,
}

impl Gate {
    /// A gate admitting `permits` calls at once (at least one).
    pub(super) fn new(permits: usize) -> Self {
        Gate { free: Mutex::new(permits.max(1)), released: Condvar::new() }
    }

    /// A gate admitting one call per CPU the process may use.
    pub(super) fn per_cpu() -> Self {
        Self::new(std::thread::available_parallelism().map_or(1, usize::from))
    }

    /// Waits until a call may run.
    pub(super) fn enter(&self) -> Permit<'_> {
        // A poisoned lock only means a holder panicked; the count itself is still right,
        // because it is changed only by whole statements below.
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.released.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        Permit { gate: self }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut free = self.gate.free.lock().unwrap_or_else(|e| e.into_inner());
        *free += 1;
        self.gate.released.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn never_admits_more_than_its_permits() {
        let gate = Arc::new(Gate::new(2));
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (gate, inside, most) = (gate.clone(), inside.clone(), most.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _permit = gate.enter();
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("worker");
        }
        assert!(most.load(Ordering::SeqCst) <= 2, "{most:?} calls inside at once");
        // Every permit came back, and both can be held at once.
        let (_a, _b) = (gate.enter(), gate.enter());
        assert_eq!(*gate.free.lock().expect("lock"), 0);
    }
}
