//! Request ids of one client process and the two facts every request tells
//! a primary about the others: `oldest_outstanding` (every smaller id is
//! finished) and `abandoned` (ids above it whose late copies must be
//! dropped: writes the client gave up on, and writes answered after earlier
//! attempts, whose copies may still reach a node that did not run them).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// The id bookkeeping (pure; [`Ids`] wraps it in a lock).
#[derive(Debug)]
pub(crate) struct IdState {
    next: u64,
    in_flight: BTreeSet<u64>,
    abandoned: BTreeSet<u64>,
}

impl Default for IdState {
    fn default() -> Self {
        IdState {
            next: 1,
            in_flight: BTreeSet::new(),
            abandoned: BTreeSet::new(),
        }
    }
}

impl IdState {
    /// A fresh id, now in flight.
    pub(crate) fn begin(&mut self) -> u64 {
        let id = self.next;
        self.next += 1;
        self.in_flight.insert(id);
        id
    }

    /// The smallest id in flight, or the next id if none is.
    pub(crate) fn oldest_outstanding(&self) -> u64 {
        self.in_flight.first().copied().unwrap_or(self.next)
    }

    /// `oldest_outstanding` and the abandoned ids above it, for a request.
    pub(crate) fn header(&self) -> (u64, Vec<u64>) {
        let oldest = self.oldest_outstanding();
        let abandoned = self.abandoned.range(oldest..).copied().collect();
        (oldest, abandoned)
    }

    /// The request got its answer (or failed without risk of landing late).
    pub(crate) fn finish(&mut self, id: u64) {
        self.in_flight.remove(&id);
        self.prune();
    }

    /// The client gave up on the request: a copy may still be on its way.
    pub(crate) fn abandon(&mut self, id: u64) {
        if self.in_flight.remove(&id) {
            self.abandoned.insert(id);
        }
        self.prune();
    }

    /// Ids below `oldest_outstanding` need no listing: the primary drops
    /// anything below it anyway.
    fn prune(&mut self) {
        let oldest = self.oldest_outstanding();
        if self.abandoned.first().is_some_and(|&a| a < oldest) {
            self.abandoned = self.abandoned.split_off(&oldest);
        }
    }

    #[cfg(test)]
    pub(crate) fn abandoned_len(&self) -> usize {
        self.abandoned.len()
    }
}

/// A Cluster's ids, shared by all its volumes.
#[derive(Debug, Default)]
pub(crate) struct Ids {
    state: Mutex<IdState>,
}

impl Ids {
    fn lock(&self) -> std::sync::MutexGuard<'_, IdState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn oldest_outstanding(&self) -> u64 {
        self.lock().oldest_outstanding()
    }

    pub(crate) fn header(&self) -> (u64, Vec<u64>) {
        self.lock().header()
    }
}

/// One request's id while it is in flight. Dropped without
/// [`finish`](IdGuard::finish) (an error, or the caller's future dropped),
/// a write's id is abandoned: it may still land, and must not after a newer
/// write. Other requests are simply finished.
pub(crate) struct IdGuard {
    ids: Arc<Ids>,
    id: u64,
    is_write: bool,
    done: bool,
}

impl IdGuard {
    pub(crate) fn begin(ids: &Arc<Ids>, is_write: bool) -> IdGuard {
        let id = ids.lock().begin();
        IdGuard {
            ids: ids.clone(),
            id,
            is_write,
            done: false,
        }
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The request is answered. `retried`: earlier attempts went out (to a
    /// node that timed out, or before a failover). A copy of one may still
    /// sit in a frozen node's socket and run there later, after writes this
    /// client makes next; a write's id is then listed as one given up on is,
    /// so that a late copy is dropped (simulator seed 238008).
    pub(crate) fn finish(mut self, retried: bool) {
        self.done = true;
        let mut s = self.ids.lock();
        if retried && self.is_write {
            s.abandon(self.id);
        } else {
            s.finish(self.id);
        }
    }
}

impl Drop for IdGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut s = self.ids.lock();
        if self.is_write {
            s.abandon(self.id);
        } else {
            s.finish(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_is_the_smallest_in_flight_or_the_next_id() {
        let mut s = IdState::default();
        assert_eq!(s.oldest_outstanding(), 1);
        let a = s.begin();
        let b = s.begin();
        let c = s.begin();
        assert_eq!((a, b, c), (1, 2, 3));
        assert_eq!(s.header(), (1, vec![]));
        s.finish(b);
        assert_eq!(s.oldest_outstanding(), 1);
        s.finish(a);
        assert_eq!(s.oldest_outstanding(), 3);
        s.finish(c);
        assert_eq!(s.oldest_outstanding(), 4);
        assert_eq!(s.begin(), 4);
    }

    #[test]
    fn abandoned_ids_are_listed_until_below_oldest() {
        let mut s = IdState::default();
        let slow = s.begin(); // 1, stays in flight
        let w1 = s.begin(); // 2
        let w2 = s.begin(); // 3
        let w3 = s.begin(); // 4
        s.abandon(w2);
        s.abandon(w1);
        assert_eq!(s.header(), (slow, vec![w1, w2]));
        // Finishing the slow one moves oldest to 4: 2 and 3 are below it and
        // are dropped from the list.
        s.finish(slow);
        assert_eq!(s.header(), (w3, vec![]));
        assert_eq!(s.abandoned_len(), 0);
        // Abandoning the oldest in flight leaves nothing to list either.
        s.abandon(w3);
        assert_eq!(s.header(), (5, vec![]));
        assert_eq!(s.abandoned_len(), 0);
    }

    #[test]
    fn abandon_and_finish_are_idempotent_for_unknown_ids() {
        let mut s = IdState::default();
        let a = s.begin();
        let b = s.begin();
        s.finish(a);
        s.abandon(a); // already finished: not listed
        assert_eq!(s.header(), (b, vec![]));
    }

    #[test]
    fn guard_abandons_writes_and_finishes_reads_on_drop() {
        let ids = Arc::new(Ids::default());
        let held = IdGuard::begin(&ids, false);
        let w = IdGuard::begin(&ids, true);
        let r = IdGuard::begin(&ids, false);
        let (wid, rid) = (w.id(), r.id());
        drop(w);
        drop(r);
        let (oldest, abandoned) = ids.header();
        assert_eq!(oldest, held.id());
        assert_eq!(abandoned, vec![wid]);
        assert!(!abandoned.contains(&rid));
        held.finish(false);
        assert_eq!(ids.header(), (rid + 1, vec![]));
    }

    /// A write answered after earlier attempts is listed until the oldest
    /// in flight passes it: a copy of an earlier attempt must not run
    /// later. Answered at once, or a read, it is simply finished.
    #[test]
    fn writes_answered_after_retries_are_listed() {
        let ids = Arc::new(Ids::default());
        let held = IdGuard::begin(&ids, false);
        let retried = IdGuard::begin(&ids, true);
        let first_try = IdGuard::begin(&ids, true);
        let read = IdGuard::begin(&ids, false);
        let rid = retried.id();
        retried.finish(true);
        first_try.finish(false);
        read.finish(true);
        assert_eq!(ids.header(), (held.id(), vec![rid]));
        held.finish(false);
        assert_eq!(ids.header(), (rid + 3, vec![]));
    }
}
