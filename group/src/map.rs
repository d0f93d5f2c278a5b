//! The part of the cluster map the group protocol reads: which nodes are up
//! (and since when), and for every redundancy group its placement, its
//! acting set and the epoch its acting set last changed (its *interval*).
//!
//! The volume manager owns the map and changes it only through the
//! functions in [`crate::authority`]; chunk servers, volume clients and the
//! simulator only read it.

use std::collections::BTreeMap;

/// A chunk server's node id; never 0.
pub type NodeId = u64;
/// A map epoch.
pub type Epoch = u64;
/// A write's sequence number: the interval its primary served in, then a
/// counter from 1 within it. Ordered by interval first, so every write of a
/// later interval follows every write of an earlier one, whatever happened
/// to the writes that were in flight when the interval changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Seq {
    /// The interval.
    pub interval: Epoch,
    /// The counter within it; 0 stands for "before the interval's first
    /// write".
    pub n: u64,
}

impl std::fmt::Display for Seq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.interval, self.n)
    }
}

/// A redundancy group: a placement group index together with the replica
/// count of the volumes it serves. Volumes with 1, 2 or 3 replicas whose
/// extents hash to the same placement group use the first 1, 2 or 3 nodes of
/// its replica list, and are replicated as separate groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    /// Replicas of the volumes in this group.
    pub replicas: u32,
    /// Placement group index, `0..group_count`.
    pub index: u32,
}

impl std::fmt::Display for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "group {}x{}", self.index, self.replicas)
    }
}

/// One stored extent version: `(volume, extent index, epoch)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtentId {
    /// Volume id.
    pub volume: u64,
    /// Extent index within the volume.
    pub index: u64,
    /// Volume head epoch the version belongs to.
    pub epoch: u64,
}

impl std::fmt::Display for ExtentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "volume {} extent {} epoch {}",
            self.volume, self.index, self.epoch
        )
    }
}

/// A node as the group protocol sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Heartbeating and allowed to serve.
    pub up: bool,
    /// The epoch at which the node's current up period began (its
    /// registration or its return after being down). It names the node's
    /// incarnation: a message addressed to an older one is refused.
    pub up_since: Epoch,
}

/// A redundancy group in one map epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupView {
    /// The epoch at which `acting` last changed. Writes and peering are
    /// tagged with it; a chunk server refuses any tag older than the newest
    /// it has seen for the group.
    pub interval: Epoch,
    /// Where the group belongs, preferred primary first (from placement).
    pub placement: Vec<NodeId>,
    /// The replicas that hold every acknowledged write, in placement order.
    /// The first is the primary when it is up. A subset of `placement`
    /// except while data moves to a new placement.
    pub acting: Vec<NodeId>,
}

/// The group protocol's view of one map epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupMap {
    /// The map epoch.
    pub epoch: Epoch,
    /// Every registered node.
    pub nodes: BTreeMap<NodeId, NodeView>,
    /// Every group in use.
    pub groups: BTreeMap<GroupKey, GroupView>,
}

impl GroupMap {
    /// `Some(up_since)` if `node` is up.
    pub fn up_since(&self, node: NodeId) -> Option<Epoch> {
        self.nodes.get(&node).filter(|n| n.up).map(|n| n.up_since)
    }

    /// The group's primary: its first acting replica, if that one is up.
    pub fn primary(&self, key: GroupKey) -> Option<NodeId> {
        let g = self.groups.get(&key)?;
        let first = *g.acting.first()?;
        self.up_since(first).map(|_| first)
    }

    /// The group's interval, if the group is in the map.
    pub fn interval(&self, key: GroupKey) -> Option<Epoch> {
        self.groups.get(&key).map(|g| g.interval)
    }
}
