//! Volume manager API messages.
//!
//! One request frame carries a [`VolmgrRequest`] header (no data); one reply
//! frame a [`VolmgrResponse`]. Replies carry the request's id and may arrive
//! out of order (a long poll for a newer map answers when the map moves).
//! A member that is not the leader answers `NotLeader` with the leader's
//! address; clients retry there. Requests that change state carry a
//! `(client_id, client_seq)` pair: the state machine applies each pair once,
//! so a retry after a lost reply or a leader change never applies twice.
//! Tags never change: these messages are a wire format between versions.

use crate::map::{ClusterMap, SnapshotInfo, VolumeInfo};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
#[repr(i32)]
pub enum VolmgrOp {
    Unspecified = 0,
    /// A chunk server announces itself (id, address, failure domains, size).
    RegisterNode = 1,
    /// A chunk server is alive; carries its usage. Not replicated.
    Heartbeat = 2,
    /// The cluster map; with `wait_newer_than` it waits for a newer epoch.
    GetMap = 3,
    CreateVolume = 4,
    ListVolumes = 5,
    GetVolume = 6,
    GrowVolume = 7,
    DeleteVolume = 8,
    /// Health in one answer: members, leader, nodes up/down/in/out, capacity.
    ClusterStatus = 9,
    /// Adds a volume manager member (`member_id`, `member_addr`).
    AddMember = 10,
    RemoveMember = 11,
    /// A front end (NBD/iSCSI target `node_id`) exports `volume_name`;
    /// repeated at the heartbeat interval while it does (a lease). Not
    /// replicated: the leader holds the leases.
    RegisterExport = 12,
    /// The front end stopped exporting `volume_name`.
    UnregisterExport = 13,
    /// A group's primary claims that `claim_node` is up to date and may join
    /// the group's acting set (see `cairn_group::authority::claim`). Granted
    /// (a new map epoch) or refused with `FailedPrecondition` and the reason;
    /// an already-granted claim answers Ok.
    ClaimReplica = 14,
    /// Takes snapshot `snapshot_name` of `volume_name` (see
    /// `VolumeInfo::chain`): the current head epoch is frozen as the
    /// snapshot and a new head epoch opens. Answers the snapshot, the
    /// volume after, and `pause_ms`. A change (`client_id`, `client_seq`).
    ///
    /// # Crash consistency while the volume is exported
    ///
    /// With no front end holding an export lease on the volume the leader
    /// proposes the change at once (`pause_ms` 0). Otherwise the snapshot
    /// must not cut a write in half, nor catch a later write without an
    /// earlier one it depended on, so the front ends pause first. Everything
    /// here lives in the leader's memory (not in raft), like the leases:
    ///
    /// 1. The leader registers a *pending snapshot* on the volume: a random
    ///    nonzero id P and the set of lease holders at that moment (front
    ///    ends that take a lease while it waits join the set). At most one
    ///    per volume; a second `CreateSnapshot` meanwhile is answered `Busy`
    ///    (clients retry). It wakes every `ExportWatch` on the volume, which
    ///    answer `pending_snapshot` P.
    /// 2. Each front end, on seeing P: stops starting writes, waits for the
    ///    writes in flight to be acknowledged (reads may go on), and sends
    ///    `SnapshotPaused { volume_name, node_id, pending_snapshot: P }`.
    ///    Then it long-polls `ExportWatch` with `pending_snapshot` P until
    ///    the answer shows another pending value (0: none).
    /// 3. Once every holder in the set paused, the leader proposes the
    ///    change through raft (no more holders join from then on); when it is
    ///    applied (the record's head epoch moved), it clears the pending
    ///    snapshot, which wakes the watchers, and answers Ok with the
    ///    snapshot and `pause_ms`, how long the pending snapshot lasted
    ///    (rounded up, so never 0).
    /// 4. The front end, seeing the pending snapshot gone, reads the record
    ///    again (`GetVolume`, a linearizable read) and resumes writing at
    ///    its `head_epoch`. It must not write at the old head epoch again:
    ///    that epoch now belongs to the snapshot.
    /// 5. If not every holder paused within `pause_timeout_ms` (0: 5 s,
    ///    at most 30 s), the leader clears the pending snapshot (waking the
    ///    watchers: front ends resume at the unchanged head) and answers
    ///    `FailedPrecondition` naming the front ends that did not pause;
    ///    nothing was taken. A failure of the proposal (the leader lost
    ///    its leadership, say) likewise clears it and answers the failure.
    ///
    /// A front end starts writes only while its export lease holds (2.5
    /// renewal periods from the last renewal it sent; the leader counts 3
    /// from receipt, and a new leader waits 3 from its election): so a
    /// leader that does not know a front end, and goes ahead without its
    /// pause, never freezes a head that front end still writes at. The
    /// front end takes up such a snapshot on its next renewal, as after a
    /// pause.
    ///
    /// A request the state machine would refuse (a taken or bad name, an
    /// unknown volume) is refused before anyone pauses. A request retried
    /// after its change was applied answers the recorded result without
    /// pausing anyone. A leader elected less than a lease period ago does
    /// not know every lease yet and answers `Retry`.
    CreateSnapshot = 15,
    /// Deletes snapshot `snapshot_name` of `volume_name` (the record; its
    /// epochs stay as long as a volume's chain or another snapshot uses
    /// them, e.g. a clone of it). A change.
    DeleteSnapshot = 16,
    /// Rolls `volume_name` back to snapshot `snapshot_name`: first the
    /// current head is kept as a snapshot of its own (named `keep_as`, or
    /// `before-rollback-<snapshot>-<n>`), exactly as `CreateSnapshot` would
    /// take it, so a rollback can be undone; then the volume gets a new head
    /// epoch over the snapshot's epochs and the snapshot's size. Refused
    /// (`FailedPrecondition`) while a front end exports the volume, unless
    /// `force`; then the front ends pause as for `CreateSnapshot` (the kept
    /// head is crash-consistent), and afterwards they see a head epoch they
    /// did not expect, which tells them the volume's content changed under
    /// their clients. Answers the volume after and, in `snapshot`, the kept
    /// one. A change.
    RollbackVolume = 17,
    /// Creates volume `new_volume_name` from snapshot `snapshot_name` of
    /// `volume_name`: same extent size and replicas, the snapshot's size,
    /// the source's data id, a new head epoch over the snapshot's epochs,
    /// `parent` naming the snapshot. Constant time. Answers the new volume
    /// and, in `snapshot`, the source snapshot. A change.
    CloneVolume = 18,
    /// For the garbage collector: per data id (`data_id`, 0 for all), the
    /// epochs once given out that no live volume's head or chain and no
    /// snapshot references any more, in `dead_epochs`. Their extent
    /// versions may be deleted from the chunk servers; an epoch once dead
    /// is never referenced again. A read.
    DeadEpochs = 19,
    /// The collector deleted every extent version of `epochs` under
    /// `data_id`: the volume manager forgets them. Epochs it does not know
    /// (already forgotten) are skipped; a still referenced epoch is refused
    /// (`FailedPrecondition`) and nothing is forgotten. A change.
    EpochsCollected = 20,
    /// A front end's long poll on the volume it exports (`volume_name`,
    /// `node_id` the front end): renews its export lease (also while it
    /// waits), and answers the volume record and `pending_snapshot` (0:
    /// none) as soon as the pending snapshot differs from
    /// `pending_snapshot`, or none is pending and the record's head epoch
    /// differs from `known_head_epoch`, or the volume's `pr_generation` is
    /// newer than `known_pr_generation` (when set), or `wait_ms` (at most
    /// 30 s) passed.
    /// (While the snapshot the front end names is still pending, a new head
    /// is that snapshot's own change, and the answer waits for the pending
    /// snapshot to end, which follows at once.) The record is read after
    /// the pending snapshot: an answer without one shows the head to write
    /// at. See `CreateSnapshot` for the protocol. Every answer also carries
    /// the volume's `pr_generation` (see `PrSet`): a front end seeing it
    /// differ from the one it holds reloads the state (`PrGet`). Leader only
    /// (`NotLeader`).
    ExportWatch = 21,
    /// Front end `node_id` paused its writes to `volume_name` for pending
    /// snapshot `pending_snapshot` (see `CreateSnapshot`). Refused with
    /// `FailedPrecondition` if that snapshot is no longer pending (it timed
    /// out or finished): the front end resumes. Leader only.
    SnapshotPaused = 22,
    /// For chunk servers: the frozen epochs beneath `epoch` of `data_id`,
    /// newest first, in `chain` (what a read of a version at `epoch` falls
    /// through to). Once the epoch exists they only ever lose folded
    /// epochs (`FoldEpoch`), whose blocks were copied up into the epoch
    /// above first; a kept answer therefore stays right (a folded epoch's
    /// versions hold nothing a read through them needs, and once collected
    /// they read through), so it may be kept. `NotFound` if no live volume or snapshot of that data
    /// id contains the epoch (its volume or snapshot was deleted). A read.
    EpochChain = 23,
    /// For the chunk servers' collector: per data id (`data_id`, 0 for
    /// all), the *hidden* epochs (in a live chain, but no view's top: a
    /// deleted snapshot something still reads through) that have exactly
    /// one epoch directly above them in every chain containing them, in
    /// `foldable`. Copying up the blocks such an epoch holds into its child
    /// and then folding it (`FoldEpoch`) frees what the child overwrote.
    /// A read.
    Foldable = 24,
    /// Folds hidden epoch `epoch` of `data_id` into `fold_child`: drops it
    /// from every chain, so it becomes dead and its versions are collected.
    /// The caller has copied up every block it holds into the child
    /// (`WriteOp::Materialize`) and flushed. Refused (`FailedPrecondition`)
    /// unless the epoch is still foldable into that child. A change.
    FoldEpoch = 25,
    /// The SCSI persistent reservation (PR) state of `volume_name`: what
    /// the iSCSI front ends keep here so that registrations and the
    /// reservation survive their restarts and are shared by every front end
    /// exporting the volume (SPC-4). The bytes are the front end's own
    /// encoding; the volume manager only stores them, with a generation.
    /// Answers `pr_generation` and `pr_state` (0 and empty while none was
    /// ever stored). `NotFound` for an unknown volume. A read.
    PrGet = 26,
    /// Compare and set of the PR state of `volume_name`: stores `pr_state`
    /// (at most [`PR_STATE_BYTES_MAX`], else `InvalidArgument`) only if the
    /// stored generation is `pr_expect_generation` (0: none stored yet); the
    /// generation becomes one more, answered in `pr_generation`. Otherwise
    /// refused with `FailedPrecondition` and `pr_generation_mismatch`,
    /// `pr_generation` being the stored generation: read the state again
    /// (`PrGet`), redo the change on it, and set again. The state is kept
    /// across snapshots, rollbacks and grows of the volume, dropped with the
    /// volume (a volume created again under its name starts at 0); a clone
    /// starts without (it is a new logical unit). Neither a map nor a
    /// catalogue change: chunk servers never see it. Front ends notice
    /// another's change by the generation their `ExportWatch` answers.
    /// A change.
    PrSet = 27,
    /// An admin takes chunk servers `node_ids` out of placement (draining
    /// them): every group they hold gets a new placement without them, its
    /// primary copies the data to the new members and claims them, and
    /// once a group's placement is whole in its acting set the drained
    /// node leaves it (`cairn_group::authority::claim`). Nodes already out
    /// are left as they are. Refused (`FailedPrecondition`) when the hosts
    /// left could not hold every group's replicas. A change.
    NodesOut = 28,
    /// An admin puts chunk servers `node_ids` back into placement: groups
    /// move some replicas back to them. A change.
    NodesIn = 29,
    /// An admin sets chunk server `node_id`'s placement `weight` (0 holds
    /// nothing, like out; refused as for `NodesOut` when that leaves too few
    /// hosts). Answers the map epoch. A change.
    SetNodeWeight = 30,
    /// An admin drops chunk server `node_id` from the map for good: only
    /// when it is out, down, and in no group's acting set. Answers the map
    /// epoch. A change.
    RemoveNode = 31,
}

/// Largest SCSI persistent reservation state one volume may store (see
/// `VolmgrOp::PrSet`): 64 KiB.
pub const PR_STATE_BYTES_MAX: usize = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
#[repr(i32)]
pub enum VolmgrStatus {
    Ok = 0,
    /// The request is wrong; `message` says which field and why.
    InvalidArgument = 1,
    /// The named volume (or snapshot, or node) does not exist.
    NotFound = 2,
    /// A volume (or a snapshot of the volume) with that name exists.
    AlreadyExists = 3,
    /// Ask `leader_addr` (empty while no leader is known: retry shortly).
    NotLeader = 4,
    /// The outcome is unknown (leadership changed): retry with the same ids.
    Retry = 5,
    UnknownOp = 6,
    /// Too many requests waiting for raft; retry later.
    Busy = 7,
    /// Anything else; `message` says what.
    Internal = 8,
    /// The cluster cannot satisfy the request now (e.g. not enough failure
    /// domains for the replicas asked for).
    FailedPrecondition = 9,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct VolmgrRequest {
    /// Chosen by the client, echoed in the reply; never 0.
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(enumeration = "VolmgrOp", tag = "2")]
    pub op: i32,
    /// Identifies the client for exactly-once application of changes.
    #[prost(uint64, tag = "3")]
    pub client_id: u64,
    /// Increases by one per change a client makes; retries reuse it.
    #[prost(uint64, tag = "4")]
    pub client_seq: u64,
    /// The cluster the client believes it talks to; a mismatch is refused.
    #[prost(string, tag = "5")]
    pub cluster_id: String,

    // RegisterNode / Heartbeat
    #[prost(uint64, tag = "10")]
    pub node_id: u64,
    #[prost(string, tag = "11")]
    pub node_addr: String,
    #[prost(string, tag = "12")]
    pub host: String,
    #[prost(string, tag = "13")]
    pub rack: String,
    #[prost(string, tag = "14")]
    pub room: String,
    #[prost(uint32, tag = "15")]
    pub weight: u32,
    #[prost(uint64, tag = "16")]
    pub capacity_bytes: u64,
    #[prost(uint64, tag = "17")]
    pub used_bytes: u64,

    // GetMap
    /// Wait until the map's epoch is above this (0: answer at once).
    #[prost(uint64, tag = "20")]
    pub wait_newer_than: u64,
    /// Longest wait, milliseconds (capped by the server).
    #[prost(uint32, tag = "21")]
    pub wait_ms: u32,

    // Volumes
    #[prost(string, tag = "30")]
    pub volume_name: String,
    #[prost(uint64, tag = "31")]
    pub size_bytes: u64,
    #[prost(uint32, tag = "32")]
    pub extent_size: u32,
    #[prost(uint32, tag = "33")]
    pub replicas: u32,
    #[prost(uint32, tag = "34")]
    pub min_replicas: u32,
    /// ListVolumes: names after this one, `limit` at most.
    #[prost(string, tag = "35")]
    pub after_name: String,
    #[prost(uint32, tag = "36")]
    pub limit: u32,

    // Members
    #[prost(uint64, tag = "40")]
    pub member_id: u64,
    #[prost(string, tag = "41")]
    pub member_addr: String,

    /// DeleteVolume: delete even while exported; RollbackVolume: roll back
    /// even while exported (the front ends pause as for a snapshot).
    #[prost(bool, tag = "50")]
    pub force: bool,

    // ClaimReplica (the group; the claiming primary is `node_id`)
    #[prost(uint32, tag = "60")]
    pub group_replicas: u32,
    #[prost(uint32, tag = "61")]
    pub group_index: u32,
    /// The interval the primary brought the node up to date in.
    #[prost(uint64, tag = "62")]
    pub group_interval: u64,
    /// The node brought up to date.
    #[prost(uint64, tag = "63")]
    pub claim_node: u64,
    /// Its incarnation (`NodeInfo::up_since`) at that time.
    #[prost(uint64, tag = "64")]
    pub claim_up_since: u64,
    /// Further claims of the same primary, granted at the same epoch (see
    /// `ClaimReplica`).
    #[prost(message, repeated, tag = "65")]
    pub more_claims: Vec<GroupClaim>,

    // Snapshots and clones (`volume_name` is the volume concerned)
    /// CreateSnapshot, DeleteSnapshot, RollbackVolume, CloneVolume: the
    /// snapshot, by name.
    #[prost(string, tag = "70")]
    pub snapshot_name: String,
    /// CloneVolume: the new volume's name.
    #[prost(string, tag = "71")]
    pub new_volume_name: String,
    /// RollbackVolume: the name to keep the current head under; empty:
    /// `before-rollback-<snapshot>-<n>`.
    #[prost(string, tag = "72")]
    pub keep_as: String,
    /// CreateSnapshot, RollbackVolume: longest wait for the front ends to
    /// pause, ms; 0: 5 s. At most 30 s.
    #[prost(uint32, tag = "73")]
    pub pause_timeout_ms: u32,
    /// DeadEpochs (0: every data id), EpochsCollected, EpochChain: the
    /// data id.
    #[prost(uint64, tag = "74")]
    pub data_id: u64,
    /// EpochsCollected: the epochs deleted.
    #[prost(uint64, repeated, tag = "75")]
    pub epochs: Vec<u64>,
    /// ExportWatch: the head epoch the front end writes at.
    #[prost(uint64, tag = "76")]
    pub known_head_epoch: u64,
    /// ExportWatch: the pending snapshot the front end knows of (0: none);
    /// SnapshotPaused: the one it paused for.
    #[prost(uint64, tag = "77")]
    pub pending_snapshot: u64,
    /// EpochChain, FoldEpoch: the epoch (with `data_id`).
    #[prost(uint64, tag = "78")]
    pub epoch: u64,
    /// FoldEpoch: the epoch directly above `epoch` in every chain.
    #[prost(uint64, tag = "79")]
    pub fold_child: u64,
    /// PrSet: the PR generation the front end read (0: none stored yet).
    #[prost(uint64, tag = "80")]
    pub pr_expect_generation: u64,
    /// PrSet: the new PR state, opaque, at most [`PR_STATE_BYTES_MAX`].
    #[prost(bytes = "vec", tag = "81")]
    pub pr_state: Vec<u8>,
    /// ExportWatch: the PR generation the front end holds; when set, the
    /// watch also answers as soon as the volume's is newer.
    #[prost(uint64, optional, tag = "82")]
    pub known_pr_generation: Option<u64>,
    /// A front end's process, chosen at random when it starts (0: a front
    /// end older than this field). The leader refuses lease requests from
    /// an instance that another with the same `node_id` has superseded, so
    /// two front ends configured with one id cannot share its leases.
    #[prost(uint64, tag = "83")]
    pub front_end_instance: u64,
    /// NodesOut, NodesIn: the chunk servers, at least one.
    #[prost(uint64, repeated, tag = "84")]
    pub node_ids: Vec<u64>,
}

/// A hidden epoch and the one epoch directly above it in every chain that
/// contains it (see `VolmgrOp::Foldable`).
#[derive(Clone, Copy, PartialEq, Eq, ::prost::Message)]
pub struct Foldable {
    #[prost(uint64, tag = "1")]
    pub data_id: u64,
    /// The hidden epoch.
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
    /// The epoch directly above it.
    #[prost(uint64, tag = "3")]
    pub child: u64,
}

/// Epochs of one data id (see `VolmgrOp::DeadEpochs`).
#[derive(Clone, PartialEq, Eq, ::prost::Message)]
pub struct DataEpochs {
    /// The data id (`VolumeInfo::data_volume_id`).
    #[prost(uint64, tag = "1")]
    pub data_id: u64,
    /// Ascending.
    #[prost(uint64, repeated, tag = "2")]
    pub epochs: Vec<u64>,
}

/// One claim of a batch: the primary brought `node` (incarnation
/// `up_since`) up to date in group `index`x`replicas` during `interval`.
#[derive(Clone, PartialEq, Eq, ::prost::Message)]
pub struct GroupClaim {
    #[prost(uint32, tag = "1")]
    pub replicas: u32,
    #[prost(uint32, tag = "2")]
    pub index: u32,
    #[prost(uint64, tag = "3")]
    pub interval: u64,
    #[prost(uint64, tag = "4")]
    pub node: u64,
    #[prost(uint64, tag = "5")]
    pub up_since: u64,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct VolmgrResponse {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(enumeration = "VolmgrStatus", tag = "2")]
    pub status: i32,
    #[prost(string, tag = "3")]
    pub message: String,
    /// With NotLeader (and always, when known): who leads.
    #[prost(uint64, tag = "4")]
    pub leader_id: u64,
    #[prost(string, tag = "5")]
    pub leader_addr: String,

    #[prost(message, optional, tag = "10")]
    pub map: Option<ClusterMap>,
    #[prost(message, optional, tag = "11")]
    pub volume: Option<VolumeInfo>,
    #[prost(message, repeated, tag = "12")]
    pub volumes: Vec<VolumeInfo>,
    /// ListVolumes: more names follow the last one.
    #[prost(bool, tag = "13")]
    pub more: bool,
    /// Heartbeat: how often the server wants them, milliseconds.
    #[prost(uint32, tag = "14")]
    pub heartbeat_interval_ms: u32,
    #[prost(message, optional, tag = "15")]
    pub status_info: Option<ClusterStatus>,
    /// GetVolume: the front ends exporting it now (by the leader's leases).
    #[prost(uint64, repeated, tag = "16")]
    pub exported_by: Vec<u64>,
    /// Heartbeat, RegisterNode: the read lease granted, in milliseconds from
    /// when the chunk server *sent* the request (it measures from there, so
    /// the lease ends before the leader could mark it down). 0: none.
    #[prost(uint32, tag = "17")]
    pub lease_ms: u32,
    /// Heartbeat, RegisterNode, ClaimReplica: the leader's map epoch now.
    #[prost(uint64, tag = "18")]
    pub map_epoch: u64,
    /// CreateSnapshot: the snapshot taken; RollbackVolume: the snapshot
    /// the previous head was kept as; CloneVolume: the source snapshot;
    /// DeleteSnapshot: the snapshot as it was.
    #[prost(message, optional, tag = "19")]
    pub snapshot: Option<SnapshotInfo>,
    /// ExportWatch, SnapshotPaused: the volume's pending snapshot (0: none).
    #[prost(uint64, tag = "20")]
    pub pending_snapshot: u64,
    /// CreateSnapshot, RollbackVolume: how long the front ends' writes were
    /// paused (the pending snapshot lasted), ms, rounded up; 0 when none
    /// exported it.
    #[prost(uint64, tag = "21")]
    pub pause_ms: u64,
    /// DeadEpochs: per data id, ascending; data ids without dead epochs
    /// are left out.
    #[prost(message, repeated, tag = "22")]
    pub dead_epochs: Vec<DataEpochs>,
    /// EpochChain: the epochs beneath the one asked about, newest first.
    #[prost(uint64, repeated, tag = "23")]
    pub chain: Vec<u64>,
    /// Foldable: by data id, then epoch.
    #[prost(message, repeated, tag = "24")]
    pub foldable: Vec<Foldable>,
    /// PrGet: the volume's PR generation (0: no state ever stored); PrSet:
    /// the new generation, or with `pr_generation_mismatch` the stored one;
    /// ExportWatch: the volume's generation when it answered, so a front
    /// end notices within one renewal that another changed the state.
    #[prost(uint64, tag = "25")]
    pub pr_generation: u64,
    /// PrGet: the stored PR state (empty: none).
    #[prost(bytes = "vec", tag = "26")]
    pub pr_state: Vec<u8>,
    /// PrSet: refused (`FailedPrecondition`) because the stored generation,
    /// in `pr_generation`, is not the expected one.
    #[prost(bool, tag = "27")]
    pub pr_generation_mismatch: bool,
}

/// Cluster health in one message.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct ClusterStatus {
    #[prost(uint64, tag = "1")]
    pub leader_id: u64,
    #[prost(uint64, tag = "2")]
    pub term: u64,
    #[prost(message, repeated, tag = "3")]
    pub members: Vec<MemberInfo>,
    #[prost(uint64, tag = "4")]
    pub map_epoch: u64,
    #[prost(uint32, tag = "5")]
    pub nodes_up: u32,
    #[prost(uint32, tag = "6")]
    pub nodes_down: u32,
    #[prost(uint32, tag = "7")]
    pub nodes_out: u32,
    #[prost(uint64, tag = "8")]
    pub capacity_bytes: u64,
    #[prost(uint64, tag = "9")]
    pub used_bytes: u64,
    #[prost(uint64, tag = "10")]
    pub volumes: u64,
    /// Groups whose acting set holds fewer replicas than their replica
    /// count (a replica is down, restarted, or not yet claimed back).
    #[prost(uint32, tag = "11")]
    pub groups_degraded: u32,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct MemberInfo {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(string, tag = "2")]
    pub addr: String,
}
