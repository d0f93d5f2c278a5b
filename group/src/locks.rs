//! Per-extent range locks in arrival order.
//!
//! Every disk operation of a group on an extent takes a lock on its byte
//! range first (a push or a full-extent read takes the whole extent). An
//! operation is granted when no earlier one, granted or waiting, overlaps it,
//! so overlapping operations run in arrival order and never concurrently.
//! That is what keeps replicas equal: the primary orders overlapping writes,
//! and a replica applies them in the order the primary released them.

use std::collections::BTreeMap;

use crate::map::ExtentId;

#[derive(Debug)]
struct Entry {
    id: u64,
    start: u64,
    end: u64,
    granted: bool,
}

/// The lock table of one group on one node.
#[derive(Debug, Default)]
pub struct Locks {
    by_ext: BTreeMap<ExtentId, Vec<Entry>>,
}

/// The whole extent, for pushes and full reads.
pub const WHOLE: (u64, u64) = (0, u64::MAX);

impl Locks {
    /// Queues lock `id` on `[start, end)` of `ext`; true if granted at once.
    pub fn acquire(&mut self, ext: ExtentId, (start, end): (u64, u64), id: u64) -> bool {
        let q = self.by_ext.entry(ext).or_default();
        let granted = !q.iter().any(|e| e.start < end && start < e.end);
        q.push(Entry {
            id,
            start,
            end,
            granted,
        });
        granted
    }

    /// Releases lock `id` on `ext`; returns the locks granted by it, in
    /// arrival order.
    pub fn release(&mut self, ext: ExtentId, id: u64) -> Vec<u64> {
        let Some(q) = self.by_ext.get_mut(&ext) else {
            return Vec::new();
        };
        q.retain(|e| e.id != id);
        let mut granted = Vec::new();
        for i in 0..q.len() {
            if q[i].granted {
                continue;
            }
            let (s, e) = (q[i].start, q[i].end);
            if !q[..i].iter().any(|x| x.start < e && s < x.end) {
                q[i].granted = true;
                granted.push(q[i].id);
            }
        }
        if q.is_empty() {
            self.by_ext.remove(&ext);
        }
        granted
    }

    /// Locks held or waited for.
    pub fn len(&self) -> usize {
        self.by_ext.values().map(Vec::len).sum()
    }

    /// No lock held or waited for.
    pub fn is_empty(&self) -> bool {
        self.by_ext.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: ExtentId = ExtentId {
        volume: 1,
        index: 0,
        epoch: 1,
    };

    #[test]
    fn overlapping_locks_run_in_arrival_order() {
        let mut l = Locks::default();
        assert!(l.acquire(X, (0, 8), 1));
        assert!(l.acquire(X, (8, 16), 2), "disjoint ranges run together");
        assert!(!l.acquire(X, WHOLE, 3));
        assert!(
            !l.acquire(X, (16, 24), 4),
            "waits behind the earlier whole lock"
        );
        assert_eq!(l.release(X, 1), Vec::<u64>::new());
        assert_eq!(l.release(X, 2), vec![3]);
        assert_eq!(l.release(X, 3), vec![4]);
        assert_eq!(l.release(X, 4), Vec::<u64>::new());
        assert!(l.is_empty());
    }
}
