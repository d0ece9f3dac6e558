//! The active queue: due deliveries waiting for a slot, one FIFO per destination domain, served
//! round-robin, each destination under a concurrency window that follows its health.
//!
//! Why: serving due messages first-in first-out, with a global slot taken *before* waiting for
//! the destination's own limit, let one destination that takes the data and never answers the
//! final dot hold every slot for a whole `final_dot` timeout per wave, and every other domain
//! waited (issue 10: 19 s for one healthy message behind 40 to such a tarpit). As in Postfix's
//! queue manager:
//! - a delivery waits in its destination's queue holding nothing; it gets a global slot only when
//!   its destination may start one more delivery;
//! - destinations take turns (round-robin), so a destination with a thousand messages queued
//!   delays one with ten by at most one delivery per turn;
//! - each destination starts with [`INITIAL_WINDOW`] concurrent deliveries; a delivery that got
//!   through widens its window by one (up to the configured `per_destination`), one that failed
//!   at the connection level (no answer, bad connection: RFC 3463 X.4.1, X.4.2) narrows it by one
//!   (down to one). A destination that only times out never grows past its initial window, and
//!   shrinks to one connection once its connections fail (Postfix's concurrency feedback,
//!   `initial_destination_concurrency = 5`).
//!
//! This module is plain data (no I/O, no clock): the scheduler loop in [`super::Queue::run`]
//! owns one and calls it.

use std::collections::{HashMap, VecDeque};

/// Concurrent deliveries a destination starts with (Postfix's `initial_destination_concurrency`).
pub const INITIAL_WINDOW: usize = 5;

/// What one finished delivery says about its destination's health.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Feedback {
    /// The destination took mail: it may get one more concurrent delivery.
    Widen,
    /// The connection failed or timed out: one fewer.
    Narrow,
    /// Says nothing about the destination (a policy deferred, DNS failed, a reply refused).
    Keep,
}

/// Per-destination FIFOs served round-robin under per-destination windows.
#[derive(Debug)]
pub struct Dispatch<T> {
    destinations: HashMap<String, Destination<T>>,
    /// Destinations that have work queued and room in their window, in turn order. Each appears
    /// at most once (`Destination::ready`).
    ready: VecDeque<String>,
    max_window: usize,
}

#[derive(Debug)]
struct Destination<T> {
    queue: VecDeque<T>,
    in_flight: usize,
    window: usize,
    ready: bool,
}

impl<T> Dispatch<T> {
    /// An empty active queue; no destination's window grows beyond `max_window`.
    pub fn new(max_window: usize) -> Self {
        Dispatch {
            destinations: HashMap::new(),
            ready: VecDeque::new(),
            max_window: max_window.max(1),
        }
    }

    /// Queues `item` for `destination`, behind what that destination already has.
    pub fn push(&mut self, destination: &str, item: T) {
        let initial = INITIAL_WINDOW.min(self.max_window);
        let d = self.destinations.entry(destination.to_owned()).or_insert_with(|| Destination {
            queue: VecDeque::new(),
            in_flight: 0,
            window: initial,
            ready: false,
        });
        d.queue.push_back(item);
        if !d.ready && d.in_flight < d.window {
            d.ready = true;
            self.ready.push_back(destination.to_owned());
        }
    }

    /// The next delivery to start: the oldest item of the destination whose turn it is. The
    /// caller must report its end with [`Dispatch::done`].
    pub fn start(&mut self) -> Option<(String, T)> {
        let name = self.ready.pop_front()?;
        // Invariant: a name in `ready` has its entry, a non-empty queue and room in its window.
        let d = self.destinations.get_mut(&name)?;
        let item = d.queue.pop_front()?;
        d.in_flight += 1;
        if !d.queue.is_empty() && d.in_flight < d.window {
            self.ready.push_back(name.clone());
        } else {
            d.ready = false;
        }
        Some((name, item))
    }

    /// Records the end of a delivery started by [`Dispatch::start`] and adjusts the window.
    pub fn done(&mut self, destination: &str, feedback: Feedback) {
        let Some(d) = self.destinations.get_mut(destination) else { return };
        d.in_flight = d.in_flight.saturating_sub(1);
        d.window = match feedback {
            Feedback::Widen => (d.window + 1).min(self.max_window),
            Feedback::Narrow => d.window.saturating_sub(1).max(1),
            Feedback::Keep => d.window,
        };
        if !d.ready && !d.queue.is_empty() && d.in_flight < d.window {
            d.ready = true;
            self.ready.push_back(destination.to_owned());
        }
        // An idle destination in good health is forgotten; one that was narrowed is remembered,
        // so that its next messages do not start at the initial window again.
        if d.queue.is_empty() && d.in_flight == 0 && d.window >= INITIAL_WINDOW.min(self.max_window)
        {
            self.destinations.remove(destination);
        }
    }

    /// Takes every queued (not started) item out, for shutdown.
    pub fn drain(&mut self) -> Vec<T> {
        self.ready.clear();
        let mut items = Vec::new();
        for d in self.destinations.values_mut() {
            items.extend(d.queue.drain(..));
            d.ready = false;
        }
        items
    }

    /// The current window of `destination`, if it is known.
    pub fn window(&self, destination: &str) -> Option<usize> {
        self.destinations.get(destination).map(|d| d.window)
    }

    /// Deliveries started and not yet done, for `destination`.
    pub fn in_flight(&self, destination: &str) -> usize {
        self.destinations.get(destination).map_or(0, |d| d.in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_take_turns_and_a_full_window_holds_nothing() {
        let mut d = Dispatch::new(20);
        for i in 0..100 {
            d.push("tarpit.example", i);
        }
        d.push("a.example", 1000);
        d.push("b.example", 2000);
        let started: Vec<_> = std::iter::from_fn(|| d.start()).collect();
        // The tarpit gets its initial window, the others are served in between, and once the
        // tarpit's window is full it is skipped without blocking anyone.
        let tarpit = started.iter().filter(|(n, _)| n == "tarpit.example").count();
        assert_eq!(tarpit, INITIAL_WINDOW);
        assert_eq!(started.len(), INITIAL_WINDOW + 2);
        assert!(started[..3].iter().any(|(n, _)| n == "a.example"), "{started:?}");
        assert!(started[..3].iter().any(|(n, _)| n == "b.example"), "{started:?}");
        d.push("c.example", 3000);
        assert_eq!(d.start(), Some(("c.example".to_owned(), 3000)));
        assert_eq!(d.start(), None);
    }

    #[test]
    fn failures_narrow_the_window_to_one_and_successes_widen_it() {
        let mut d = Dispatch::new(8);
        for i in 0..100 {
            d.push("slow.example", i);
        }
        for _ in 0..INITIAL_WINDOW {
            d.start().unwrap();
        }
        assert!(d.start().is_none());
        for _ in 0..INITIAL_WINDOW {
            d.done("slow.example", Feedback::Narrow);
        }
        assert_eq!(d.window("slow.example"), Some(1));
        // One connection at a time now.
        assert!(d.start().is_some());
        assert!(d.start().is_none());
        d.done("slow.example", Feedback::Narrow);
        assert_eq!(d.window("slow.example"), Some(1));
        // It recovers one step per success, up to the maximum.
        for _ in 0..20 {
            d.start().unwrap();
            d.done("slow.example", Feedback::Widen);
        }
        assert_eq!(d.window("slow.example"), Some(8));
        let started = std::iter::from_fn(|| d.start()).count();
        assert_eq!(started, 8);
        assert_eq!(d.in_flight("slow.example"), 8);
    }

    #[test]
    fn neutral_outcomes_keep_the_window_and_drain_empties() {
        let mut d = Dispatch::new(20);
        d.push("x.example", 1);
        d.push("x.example", 2);
        let (name, _) = d.start().unwrap();
        d.done(&name, Feedback::Keep);
        assert_eq!(d.window("x.example"), Some(INITIAL_WINDOW));
        assert_eq!(d.drain(), [2]);
        assert_eq!(d.start(), None);
    }
}
