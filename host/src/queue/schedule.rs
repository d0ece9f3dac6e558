//! The scheduler's in-memory index: which queued message is due when.
//!
//! Why an index rather than scanning the spool: the scheduler used to list (read and parse)
//! every envelope on each wake-up, and it wakes on every accepted message and every finished
//! delivery, so a backlog of `n` messages cost O(n²) file reads. Like Postfix's active queue,
//! the spool stays the truth (read in full at start and once a minute, which also picks up
//! `postwarden queue retry` run against the spool by another process) and this index says what
//! to try next. An entry is a hint: the delivery task re-reads the stored envelope before it
//! acts on it.

use std::collections::{BTreeSet, HashMap};

/// Queue ids by the time (seconds since the epoch) of their next attempt.
#[derive(Debug, Default)]
pub struct Schedule {
    by_time: BTreeSet<(u64, String)>,
    at: HashMap<String, u64>,
}

impl Schedule {
    /// Sets (or moves) `id`'s next attempt to `when`.
    pub fn set(&mut self, id: &str, when: u64) {
        if let Some(old) = self.at.insert(id.to_owned(), when) {
            self.by_time.remove(&(old, id.to_owned()));
        }
        self.by_time.insert((when, id.to_owned()));
    }

    /// Forgets `id`.
    pub fn remove(&mut self, id: &str) {
        if let Some(old) = self.at.remove(id) {
            self.by_time.remove(&(old, id.to_owned()));
        }
    }

    /// Removes and returns the earliest id due at `now`.
    pub fn pop_due(&mut self, now: u64) -> Option<String> {
        let first = self.by_time.first()?;
        if first.0 > now {
            return None;
        }
        let (_, id) = self.by_time.pop_first()?;
        self.at.remove(&id);
        Some(id)
    }

    /// When the earliest entry is due.
    pub fn next(&self) -> Option<u64> {
        self.by_time.first().map(|(t, _)| *t)
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_entries_come_out_in_time_order_and_moves_replace() {
        let mut s = Schedule::default();
        s.set("b", 20);
        s.set("a", 10);
        s.set("c", 30);
        s.set("c", 5);
        assert_eq!(s.len(), 3);
        assert_eq!(s.next(), Some(5));
        assert_eq!(s.pop_due(15).as_deref(), Some("c"));
        assert_eq!(s.pop_due(15).as_deref(), Some("a"));
        assert_eq!(s.pop_due(15), None);
        s.remove("b");
        assert!(s.is_empty());
        assert_eq!(s.next(), None);
    }
}
