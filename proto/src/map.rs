//! The cluster map and volume catalogue records, as every process sees them.
//!
//! The volume manager replicates these through raft, stores them in its
//! snapshots and serves them to chunk servers, targets and `cairn`. They are
//! therefore both a wire format and an on-disk format:
//!
//! - **Field tags never change and are never reused.** A field that is no
//!   longer needed is left in place (or its tag reserved in a comment); a new
//!   field takes a new tag. Old readers skip tags they do not know, so adding
//!   fields is the only compatible change.
//! - Every field's zero value (0, false, empty) is what an old writer that did
//!   not know the field means, so choose new fields' meanings accordingly.
//!
//! # Epochs
//!
//! [`ClusterMap::epoch`] names one version of the map's placement-relevant
//! content: the node set, each node's address, failure-domain labels and
//! weight, its up/down and in/out state, and the group count. Two maps with
//! the same epoch agree on all of these. The usage figures
//! ([`NodeInfo::capacity_bytes`], [`NodeInfo::used_bytes`]) are informational
//! and are refreshed without a new epoch, so that disk usage never churns
//! placement or fences I/O.

/// Which nodes hold which groups, and in what state: one map epoch.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct ClusterMap {
    /// The map epoch; 0 means no map has been made yet. Every change to the
    /// placement-relevant content (see the module docs) makes a new epoch,
    /// exactly one higher.
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
    /// Redundancy groups in the pool, a power of two; fixed once set (at
    /// bootstrap), because changing it would move every extent. 0 until set.
    #[prost(uint32, tag = "2")]
    pub group_count: u32,
    /// Every registered chunk server, sorted by `id`, each id once.
    #[prost(message, repeated, tag = "3")]
    pub nodes: ::prost::alloc::vec::Vec<NodeInfo>,
    /// Every redundancy group in use, sorted by `(replicas, index)`: its
    /// acting set and interval (see `cairn_group::map::GroupView`). A
    /// replica count's groups appear when the first volume with that count
    /// is created. Changes to them are map changes (a new epoch).
    #[prost(message, repeated, tag = "4")]
    pub groups: ::prost::alloc::vec::Vec<GroupRecord>,
}

/// One redundancy group's replication state.
#[derive(Clone, PartialEq, Eq, ::prost::Message)]
pub struct GroupRecord {
    /// Replicas of the volumes in the group.
    #[prost(uint32, tag = "1")]
    pub replicas: u32,
    /// Placement group index, `0..group_count`.
    #[prost(uint32, tag = "2")]
    pub index: u32,
    /// The epoch at which `acting` last changed.
    #[prost(uint64, tag = "3")]
    pub interval: u64,
    /// The replicas that hold every acknowledged write, primary first.
    #[prost(uint64, repeated, tag = "4")]
    pub acting: ::prost::alloc::vec::Vec<u64>,
}

impl ClusterMap {
    /// The node with `id`, if it is registered. `nodes` is sorted by id.
    pub fn node(&self, id: u64) -> Option<&NodeInfo> {
        self.nodes
            .binary_search_by_key(&id, |n| n.id)
            .ok()
            .map(|i| &self.nodes[i])
    }

    /// Groups acting with fewer replicas than their volumes ask for.
    pub fn degraded_groups(&self) -> usize {
        self.groups.iter().filter(|g| g.degraded()).count()
    }

    /// Distinct hosts, as placement counts them ((room, rack, host)), among
    /// the nodes that can take replicas (in, with weight above 0; down nodes
    /// count: they keep their place while in), leaving out `taken`.
    pub fn failure_domains_without(&self, taken: &[u64]) -> u32 {
        let hosts: std::collections::BTreeSet<(&str, &str, &str)> = self
            .nodes
            .iter()
            .filter(|n| n.in_ && n.weight > 0 && !taken.contains(&n.id))
            .map(|n| (n.room.as_str(), n.rack.as_str(), n.host.as_str()))
            .collect();
        u32::try_from(hosts.len()).unwrap_or(u32::MAX)
    }

    /// Whether every group could still be placed if the nodes `taken` were
    /// out (or weighted 0) too: placement puts no two replicas of a group on
    /// one host, so the hosts left must number at least the largest replica
    /// count any group has. Otherwise `Err((replicas, hosts))`: that count
    /// and the hosts that would be left. A map that fails this builds no
    /// placement for those groups: nothing could move to a new placement,
    /// and a node that comes back could never be claimed again.
    pub fn placeable_without(&self, taken: &[u64]) -> Result<(), (u32, u32)> {
        let replicas = self.groups.iter().map(|g| g.replicas).max().unwrap_or(0);
        let hosts = self.failure_domains_without(taken);
        if hosts < replicas {
            Err((replicas, hosts))
        } else {
            Ok(())
        }
    }
}

impl GroupRecord {
    /// Fewer acting replicas than the group's replica count.
    pub fn degraded(&self) -> bool {
        (self.acting.len() as u64) < u64::from(self.replicas)
    }
}

/// One chunk server in the map.
#[derive(Clone, PartialEq, Eq, ::prost::Message)]
pub struct NodeInfo {
    /// The chunk server's node id (from its data directory); never 0.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Where its RPC listens: `host:port` (`[v6addr]:port` for IPv6).
    #[prost(string, tag = "2")]
    pub addr: ::prost::alloc::string::String,
    /// Failure domains, nested: a host is identified by (room, rack, host),
    /// a rack by (room, rack). No two replicas of a group share a host.
    #[prost(string, tag = "3")]
    pub host: ::prost::alloc::string::String,
    /// Rack label; may be empty (one unnamed rack).
    #[prost(string, tag = "4")]
    pub rack: ::prost::alloc::string::String,
    /// Room (or site) label; may be empty (one unnamed room).
    #[prost(string, tag = "5")]
    pub room: ::prost::alloc::string::String,
    /// Relative capacity for placement; 0 takes no replicas.
    #[prost(uint32, tag = "6")]
    pub weight: u32,
    /// Usable bytes of its data directory. Informational: not covered by the
    /// map epoch.
    #[prost(uint64, tag = "7")]
    pub capacity_bytes: u64,
    /// Bytes in use. Informational: not covered by the map epoch.
    #[prost(uint64, tag = "8")]
    pub used_bytes: u64,
    /// Up: heartbeating, may serve I/O. Down: silent for longer than
    /// `down_after`; its groups continue on their other replicas.
    #[prost(bool, tag = "9")]
    pub up: bool,
    /// In: holds its share of placement (also while down, so a short outage
    /// moves no data). Out: holds nothing; its groups are re-replicated.
    #[prost(bool, tag = "10")]
    pub in_: bool,
    /// The map epoch at which the node was registered or its up/in state
    /// last changed.
    #[prost(uint64, tag = "11")]
    pub since_epoch: u64,
    /// Wall-clock time of that change (ms since the Unix epoch), as the
    /// proposing volume manager saw it; for status displays only.
    #[prost(uint64, tag = "12")]
    pub since_unix_ms: u64,
    /// The epoch at which the node's current up period began: its last
    /// registration (a process start) or its return after being down. It
    /// names the node's incarnation for the group protocol.
    #[prost(uint64, tag = "13")]
    pub up_since: u64,
}

/// One volume in the catalogue.
#[derive(Clone, PartialEq, Eq, ::prost::Message)]
pub struct VolumeInfo {
    /// Assigned by the volume manager from 1 upwards; never reused, also not
    /// after the volume is deleted.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Unique among live volumes; `[A-Za-z0-9._-]`, not starting with `-`
    /// or `.`.
    #[prost(string, tag = "2")]
    pub name: ::prost::alloc::string::String,
    /// Size in bytes; a multiple of 512. Only grows.
    #[prost(uint64, tag = "3")]
    pub size_bytes: u64,
    /// Extent size in bytes; a power of two. Fixed at creation.
    #[prost(uint32, tag = "4")]
    pub extent_size_bytes: u32,
    /// Copies of every block.
    #[prost(uint32, tag = "5")]
    pub replicas: u32,
    /// Writes wait (never fail, never complete under-replicated) while
    /// fewer replicas than this are in a group's acting set.
    #[prost(uint32, tag = "6")]
    pub min_replicas: u32,
    /// Creation time (ms since the Unix epoch), as the proposer saw it.
    #[prost(uint64, tag = "7")]
    pub created_unix_ms: u64,
    /// The epoch new extent versions are written at; taking a snapshot
    /// freezes it and opens the next. Starts at 1.
    #[prost(uint64, tag = "8")]
    pub head_epoch: u64,
    /// For a clone: the snapshot its chain starts at (issue 8).
    #[prost(message, optional, tag = "9")]
    pub parent: ::core::option::Option<SnapshotRef>,
    /// Snapshots, oldest first (issue 8; empty until then).
    #[prost(message, repeated, tag = "10")]
    pub snapshots: ::prost::alloc::vec::Vec<SnapshotInfo>,
    /// The volume id its extents are stored and placed under: chunk servers
    /// key extent versions `(data_id, index, epoch)` and placement hashes
    /// `(data_id, index)`. A volume's own id, except for a clone, which
    /// shares its source's data id so that its reads fall through to the
    /// source's frozen epochs on the same chunk servers. 0 in records from
    /// before clones: read it through [`VolumeInfo::data_volume_id`].
    #[prost(uint64, tag = "11")]
    pub data_id: u64,
    /// The frozen epochs beneath `head_epoch`, newest first: a read of a
    /// block not written at the head falls through to these in order (and
    /// reads zeros past the last). Epochs are unique cluster-wide, so no
    /// two volumes sharing a data id confuse their versions. Empty for a
    /// volume never snapshotted.
    #[prost(uint64, repeated, tag = "12")]
    pub chain: ::prost::alloc::vec::Vec<u64>,
    /// The highest snapshot id this volume has given out (0: none); the
    /// next snapshot gets the one above, also after snapshots are deleted,
    /// so a clone's [`SnapshotRef`] never comes to name another snapshot.
    #[prost(uint64, tag = "13")]
    pub last_snapshot_id: u64,
}

impl VolumeInfo {
    /// The volume id its extents live under: [`VolumeInfo::data_id`], or
    /// the volume's own id in records from before clones (`data_id` 0).
    pub fn data_volume_id(&self) -> u64 {
        if self.data_id == 0 {
            self.id
        } else {
            self.data_id
        }
    }

    /// What the volume reads now: its head epoch, then the frozen epochs
    /// beneath it, newest first.
    pub fn view(&self) -> Vec<u64> {
        std::iter::once(self.head_epoch)
            .chain(self.chain.iter().copied())
            .collect()
    }

    /// The volume as it reads at frozen epoch `epoch` (a snapshot's, or a
    /// deleted one's still read through) over `chain`, the epochs beneath
    /// it, as a record of its own named `name`, `size_bytes` long.
    pub fn frozen_view(
        &self,
        name: String,
        epoch: u64,
        chain: Vec<u64>,
        size_bytes: u64,
    ) -> VolumeInfo {
        VolumeInfo {
            name,
            size_bytes,
            head_epoch: epoch,
            chain,
            snapshots: Vec::new(),
            ..self.clone()
        }
    }

    /// The snapshot named `name`, if the volume has one.
    pub fn snapshot(&self, name: &str) -> Option<&SnapshotInfo> {
        self.snapshots.iter().find(|s| s.name == name)
    }
}

/// A snapshot of a volume: a clone's parent.
#[derive(Clone, Copy, PartialEq, Eq, ::prost::Message)]
pub struct SnapshotRef {
    /// The volume the snapshot belongs to.
    #[prost(uint64, tag = "1")]
    pub volume_id: u64,
    /// The snapshot's id within that volume.
    #[prost(uint64, tag = "2")]
    pub snapshot_id: u64,
}

/// One snapshot of a volume: a frozen head epoch.
#[derive(Clone, PartialEq, Eq, ::prost::Message)]
pub struct SnapshotInfo {
    /// Unique within the volume, never reused.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Unique within the volume; same rules as volume names.
    #[prost(string, tag = "2")]
    pub name: ::prost::alloc::string::String,
    /// The head epoch the snapshot froze.
    #[prost(uint64, tag = "3")]
    pub epoch: u64,
    /// Creation time (ms since the Unix epoch), as the proposer saw it.
    #[prost(uint64, tag = "4")]
    pub created_unix_ms: u64,
    /// The frozen epochs beneath `epoch`, newest first: the volume's chain
    /// when the snapshot was taken. The snapshot's content is `epoch` over
    /// these, as a read of the volume then saw it.
    #[prost(uint64, repeated, tag = "5")]
    pub chain: ::prost::alloc::vec::Vec<u64>,
    /// The volume's size when the snapshot was taken (a rollback to it or
    /// a clone of it gets this size).
    #[prost(uint64, tag = "6")]
    pub size_bytes: u64,
}

impl SnapshotInfo {
    /// What the snapshot reads: its epoch, then the epochs beneath it,
    /// newest first.
    pub fn view(&self) -> Vec<u64> {
        std::iter::once(self.epoch)
            .chain(self.chain.iter().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    /// Pins the encoding: if this fails, a tag or type changed, which breaks
    /// every stored snapshot and every process of another version.
    #[test]
    fn encoding_is_pinned() {
        let map = ClusterMap {
            epoch: 7,
            group_count: 1024,
            nodes: vec![NodeInfo {
                id: 3,
                addr: "a:1".into(),
                host: "h".into(),
                rack: "r".into(),
                room: "m".into(),
                weight: 2,
                capacity_bytes: 5,
                used_bytes: 4,
                up: true,
                in_: true,
                since_epoch: 6,
                since_unix_ms: 9,
                up_since: 0,
            }],
            groups: vec![],
        };
        let bytes = map.encode_to_vec();
        assert_eq!(
            bytes,
            [
                0x08, 7, 0x10, 0x80, 0x08, 0x1a, 30, 0x08, 3, 0x12, 3, b'a', b':', b'1', 0x1a, 1,
                b'h', 0x22, 1, b'r', 0x2a, 1, b'm', 0x30, 2, 0x38, 5, 0x40, 4, 0x48, 1, 0x50, 1,
                0x58, 6, 0x60, 9,
            ]
        );
        assert_eq!(ClusterMap::decode(&bytes[..]).unwrap(), map);

        let vol = VolumeInfo {
            id: 1,
            name: "v".into(),
            size_bytes: 512,
            extent_size_bytes: 1 << 20,
            replicas: 3,
            min_replicas: 2,
            created_unix_ms: 8,
            head_epoch: 1,
            parent: Some(SnapshotRef {
                volume_id: 4,
                snapshot_id: 5,
            }),
            snapshots: vec![SnapshotInfo {
                id: 1,
                name: "s".into(),
                epoch: 3,
                created_unix_ms: 2,
                chain: vec![2, 1],
                size_bytes: 512,
            }],
            data_id: 4,
            chain: vec![3, 2],
            last_snapshot_id: 6,
        };
        let bytes = vol.encode_to_vec();
        assert_eq!(
            bytes,
            [
                0x08, 1, 0x12, 1, b'v', 0x18, 0x80, 0x04, 0x20, 0x80, 0x80, 0x40, 0x28, 3, 0x30, 2,
                0x38, 8, 0x40, 1, 0x4a, 4, 0x08, 4, 0x10, 5, 0x52, 16, 0x08, 1, 0x12, 1, b's',
                0x18, 3, 0x20, 2, 0x2a, 2, 2, 1, 0x30, 0x80, 0x04, 0x58, 4, 0x62, 2, 3, 2, 0x68, 6,
            ]
        );
        assert_eq!(VolumeInfo::decode(&bytes[..]).unwrap(), vol);
        assert_eq!(vol.data_volume_id(), 4);
        assert_eq!(vol.snapshot("s").map(|s| s.id), Some(1));
        assert!(vol.snapshot("t").is_none());

        // A record from before clones (no data id) is stored under its own id.
        let old = VolumeInfo::decode(&[0x08, 9, 0x40, 1][..]).unwrap();
        assert_eq!((old.data_id, old.data_volume_id()), (0, 9));
        assert!(old.chain.is_empty() && old.last_snapshot_id == 0);
    }

    #[test]
    fn node_lookup_by_id() {
        let map = ClusterMap {
            epoch: 1,
            group_count: 1,
            nodes: [2, 5, 9]
                .into_iter()
                .map(|id| NodeInfo {
                    id,
                    ..Default::default()
                })
                .collect(),
            groups: vec![],
        };
        assert_eq!(map.node(5).map(|n| n.id), Some(5));
        assert!(map.node(4).is_none());
    }
}
