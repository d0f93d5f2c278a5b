//! What raft replicates ([`Proposal`], [`Command`]) and what applying it
//! answers ([`Response`]).
//!
//! These are raft log entries and so an on-disk format: field tags never
//! change and are never reused. A new command takes a new tag in
//! [`Command`]; members that do not know it answer [`ErrorCode::Malformed`]
//! while members that do would apply it, so **every member must run a build
//! that knows a command before any client proposes it** (upgrade all members,
//! then use the new command).

use cairn_proto::map::{NodeInfo, SnapshotInfo, VolumeInfo};

/// One raft log entry: a command and who asked for it.
///
/// `proposed_unix_ms` is the proposer's wall clock when it proposed. Apply
/// never reads a clock: every time it records (creation, deletion, state
/// changes) is this value, so every replica computes the same state.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct Proposal {
    /// The client session; 0 means "no deduplication" (for commands that are
    /// idempotent anyway, such as the failure detector's). Clients pick a
    /// random id per session.
    #[prost(uint64, tag = "1")]
    pub client_id: u64,
    /// Increases with every new request of the session; a retry repeats it.
    #[prost(uint64, tag = "2")]
    pub client_seq: u64,
    /// The proposer's wall clock, ms since the Unix epoch.
    #[prost(uint64, tag = "3")]
    pub proposed_unix_ms: u64,
    /// What to do; `None` when the entry was made by a build with a command
    /// this build does not know.
    #[prost(
        oneof = "Command",
        tags = "10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30"
    )]
    pub command: Option<Command>,
}

/// A change to the replicated state. Tags 31 and up are free (a new one
/// goes into [`Proposal::command`]'s tag list too, or it never decodes).
#[derive(Clone, PartialEq, ::prost::Oneof)]
pub enum Command {
    /// Sets the pool's group count; only once (at bootstrap). Map change.
    #[prost(message, tag = "10")]
    SetGroupCount(SetGroupCount),
    /// Adds a chunk server (up and in), or registers a new incarnation of a
    /// known one (its process started again). Always a map change.
    #[prost(message, tag = "11")]
    RegisterNode(RegisterNode),
    /// Refreshes usage figures. Never a map change (see [`NodeStats`]).
    #[prost(message, tag = "12")]
    NodeStats(NodeStats),
    /// Marks nodes down (the failure detector); they leave every acting set
    /// where they are not the last replica. Map change.
    #[prost(message, tag = "13")]
    MarkDown(NodeIds),
    /// Marks nodes up (the failure detector) as a new incarnation; they
    /// rejoin acting sets only through claims. Map change.
    #[prost(message, tag = "14")]
    MarkUp(NodeIds),
    /// Marks nodes out (the detector after `out_after`, or an admin draining
    /// them). Map change.
    #[prost(message, tag = "15")]
    MarkOut(NodeIds),
    /// Marks nodes in (an admin). Map change.
    #[prost(message, tag = "16")]
    MarkIn(NodeIds),
    /// Changes a node's placement weight (an admin). Map change.
    #[prost(message, tag = "17")]
    SetWeight(SetWeight),
    /// Drops a node that is out and down, and in no acting set, from the
    /// map. Map change.
    #[prost(message, tag = "18")]
    RemoveNode(RemoveNode),
    /// Catalogue change; also a map change when it is the first volume with
    /// its replica count (the count's groups are added to the map).
    #[prost(message, tag = "19")]
    CreateVolume(CreateVolume),
    /// Catalogue change.
    #[prost(message, tag = "20")]
    GrowVolume(GrowVolume),
    /// Catalogue change.
    #[prost(message, tag = "21")]
    DeleteVolume(DeleteVolume),
    /// A group's primary claims an up-to-date replica into the group's
    /// acting set (compare and set, see [`ClaimReplica`]). Map change when
    /// granted.
    #[prost(message, tag = "22")]
    ClaimReplica(ClaimReplica),
    /// Freezes a volume's head epoch as a snapshot and opens a new head
    /// epoch. Catalogue change.
    #[prost(message, tag = "23")]
    CreateSnapshot(CreateSnapshot),
    /// Drops a snapshot's record. Catalogue change.
    #[prost(message, tag = "24")]
    DeleteSnapshot(DeleteSnapshot),
    /// Keeps the head as a snapshot, then points the volume at another
    /// snapshot. Catalogue change.
    #[prost(message, tag = "25")]
    RollbackVolume(RollbackVolume),
    /// A new volume over a snapshot's epochs. Catalogue change.
    #[prost(message, tag = "26")]
    CloneVolume(CloneVolume),
    /// Forgets dead epochs the garbage collector deleted. Neither a map nor
    /// a catalogue change.
    #[prost(message, tag = "27")]
    EpochsCollected(EpochsCollected),
    /// Drops hidden epoch `epoch` of `data_id` from every chain once its
    /// blocks were copied up into `child`, the one epoch directly above it
    /// in every chain containing it (`State::foldable`); it is then dead.
    /// Refused (`EpochNotFoldable`) unless still so, so a stale request
    /// changes nothing. Catalogue change.
    #[prost(message, tag = "28")]
    FoldEpoch(cairn_proto::volmgr::Foldable),
    /// Stores a volume's SCSI persistent reservation state, compare and set
    /// on its generation (see [`PrSet`]). Neither a map nor a catalogue
    /// change.
    #[prost(message, tag = "29")]
    PrSet(PrSet),
    /// Sets the acting set of every group whose whole placement acts, but
    /// whose acting set differs from it, to its placement
    /// (`cairn_group::authority::settle_at`): after a placement change
    /// nothing may be left to claim there, and no claim would retire the
    /// members outside the placement (a drained node) or give the
    /// placement's first node the lead. Proposed by the leader when it sees
    /// such groups; applied to whatever groups are so when it applies (none:
    /// no change). Map change when any is.
    #[prost(message, tag = "30")]
    SettlePlacement(SettlePlacement),
}

/// See [`Command::PrSet`]: if the volume's persistent reservation
/// generation is `expect_generation` (0 while none was stored), its state
/// becomes `state` and its generation one more. Refused
/// (`PrGenerationMismatch`) otherwise, and (`PrStateTooLarge`) above
/// `cairn_proto::volmgr::PR_STATE_BYTES_MAX` bytes; either changes nothing.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct PrSet {
    /// Which volume.
    #[prost(message, optional, tag = "1")]
    pub volume: Option<VolumeKey>,
    /// The generation the front end read.
    #[prost(uint64, tag = "2")]
    pub expect_generation: u64,
    /// The new state: the front end's own encoding, opaque here.
    #[prost(bytes = "vec", tag = "3")]
    pub state: Vec<u8>,
}

/// See [`Command::SetGroupCount`].
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct SetGroupCount {
    /// A power of two up to `cairn_placement::MAX_TABLE_GROUPS`.
    #[prost(uint32, tag = "1")]
    pub group_count: u32,
}

/// See [`Command::RegisterNode`].
///
/// A chunk server registers at every process start, so re-registering a
/// known node (from its registered address) is a new *incarnation*
/// (`cairn_group::authority::register`): the node leaves every acting set
/// where other replicas remain (what it held only in memory is gone), where
/// it is the last replica its group gets a new interval, and it is up from
/// the new epoch (`NodeInfo::up_since`). That is always a map change, even
/// when nothing else changed. Its labels and capacity are updated; its
/// weight and in/out are left alone: weight belongs to the admin after the
/// first registration ([`SetWeight`]), in/out to the detector and the
/// admin, so a restarting server does not undo a drain. A registration of
/// a known id from another address is refused (`NodeAddrMismatch`).
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct RegisterNode {
    /// Never 0.
    #[prost(uint64, tag = "1")]
    pub node_id: u64,
    /// `host:port` of its RPC listener.
    #[prost(string, tag = "2")]
    pub addr: String,
    /// Required; see `NodeInfo::host`.
    #[prost(string, tag = "3")]
    pub host: String,
    /// May be empty.
    #[prost(string, tag = "4")]
    pub rack: String,
    /// May be empty.
    #[prost(string, tag = "5")]
    pub room: String,
    /// Placement weight at first registration; ignored afterwards.
    #[prost(uint32, tag = "6")]
    pub weight: u32,
    /// Usable bytes of its data directory.
    #[prost(uint64, tag = "7")]
    pub capacity_bytes: u64,
}

/// See [`Command::NodeStats`].
///
/// Heartbeats do **not** go through raft: a cluster of 100 servers
/// heartbeating every second would add 100 log entries a second for no
/// change. They go to the leader's failure detector, in memory; only the
/// state changes it decides on (down, up, out) are proposed. Usage figures
/// from heartbeats reach the replicated map through this command, which the
/// leader proposes for all nodes at once and seldom (when a figure moved
/// noticeably). They are informational, so it does not make a new epoch.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct NodeStats {
    /// Figures for any number of nodes; entries for nodes no longer in the
    /// map are skipped (the node was removed since its heartbeat).
    #[prost(message, repeated, tag = "1")]
    pub nodes: Vec<NodeUsage>,
}

/// One node's usage, see [`NodeStats`].
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct NodeUsage {
    /// The node.
    #[prost(uint64, tag = "1")]
    pub node_id: u64,
    /// Usable bytes of its data directory.
    #[prost(uint64, tag = "2")]
    pub capacity_bytes: u64,
    /// Bytes in use.
    #[prost(uint64, tag = "3")]
    pub used_bytes: u64,
}

/// The nodes a MarkDown/Up/Out/In applies to: all of them in one epoch, so a
/// rack that loses power makes one new map, not one per server. Every id
/// must be in the map; nodes already in the target state are left as they
/// are, and if that is all of them nothing changes.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct NodeIds {
    /// At least one.
    #[prost(uint64, repeated, tag = "1")]
    pub node_ids: Vec<u64>,
    /// The map epoch the proposer judged the nodes by (the failure
    /// detector's); 0 for an admin's unconditional command. MarkDown and
    /// MarkOut leave out a node whose current up period began after it
    /// (`NodeInfo::up_since` greater): that is a new incarnation, registered
    /// while the proposal was on its way, and the silence the detector
    /// measured was its predecessor's. Without this a server restarted just
    /// as its old process was found silent was marked down at once, and
    /// then had to heartbeat through the anti-flap wait (up to 5 minutes)
    /// before it was let back.
    ///
    /// Added after the first release of this format: entries without it
    /// decode as 0 and apply as before. Like a new command, it needs every
    /// member to run a build that knows it before a leader proposes it
    /// (an older member would apply the command unconditionally).
    #[prost(uint64, tag = "2")]
    pub seen_epoch: u64,
}

/// See [`Command::SetWeight`].
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct SetWeight {
    /// The node.
    #[prost(uint64, tag = "1")]
    pub node_id: u64,
    /// New weight; 0 drains the node like marking it out, but keeps it in
    /// the balancing.
    #[prost(uint32, tag = "2")]
    pub weight: u32,
}

/// See [`Command::RemoveNode`].
///
/// Only a node that is out and down, and in no group's acting set, can be
/// removed (a down node stays acting only where it is the last replica: it
/// then holds the only copy of the group's acknowledged writes). The volume manager does
/// not (yet) know whether re-replication of its groups has finished; the
/// admin tool checks that before removing. Requiring down as well means the
/// server has been stopped: a running one would register again at once.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct RemoveNode {
    /// The node.
    #[prost(uint64, tag = "1")]
    pub node_id: u64,
}

/// See [`Command::SettlePlacement`]; no fields: it settles what needs it
/// when it applies.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct SettlePlacement {}

/// See [`Command::CreateVolume`]. Every field is explicit; defaults (such as
/// `EXTENT_SIZE_BYTES_DEFAULT`) are the API's business.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct CreateVolume {
    /// Unique; see `validate::volume_name`.
    #[prost(string, tag = "1")]
    pub name: String,
    /// A multiple of 512, above 0, at most `VOLUME_SIZE_BYTES_MAX`.
    #[prost(uint64, tag = "2")]
    pub size_bytes: u64,
    /// A power of two in `EXTENT_SIZE_BYTES_MIN..=EXTENT_SIZE_BYTES_MAX`.
    #[prost(uint32, tag = "3")]
    pub extent_size_bytes: u32,
    /// 1 up to the distinct hosts among in nodes of weight above 0.
    #[prost(uint32, tag = "4")]
    pub replicas: u32,
    /// 1 up to `replicas`.
    #[prost(uint32, tag = "5")]
    pub min_replicas: u32,
    /// True in every entry this build proposes: the volume's head epoch is
    /// the next cluster-wide epoch (see the state's docs, "Epochs"). False
    /// in entries written before snapshots existed (issue 8), whose volumes
    /// got head epoch 1: a newer build replaying such a log must rebuild
    /// the catalogue those builds had (their data is stored at epoch 1).
    #[prost(bool, tag = "6")]
    pub epoch_from_counter: bool,
}

/// See [`Command::CreateSnapshot`]. Snapshot `S` of volume `V`:
/// `S = { id: V.last_snapshot_id + 1, name, epoch: V.head_epoch, chain:
/// V.chain, size_bytes: V.size_bytes }`; then `V.chain = [V.head_epoch] +
/// V.chain` and `V.head_epoch` = the next cluster-wide epoch.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct CreateSnapshot {
    /// Which volume.
    #[prost(message, optional, tag = "1")]
    pub volume: Option<VolumeKey>,
    /// Unique within the volume; the rules of volume names.
    #[prost(string, tag = "2")]
    pub name: String,
}

/// See [`Command::DeleteSnapshot`]. The record goes; epochs it shared with
/// the volume's chain, other snapshots or clones stay referenced by them
/// (a clone of the snapshot keeps working).
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct DeleteSnapshot {
    /// Which volume.
    #[prost(message, optional, tag = "1")]
    pub volume: Option<VolumeKey>,
    /// The snapshot's name.
    #[prost(string, tag = "2")]
    pub name: String,
}

/// See [`Command::RollbackVolume`]. First the head is kept as snapshot `K`
/// exactly as [`CreateSnapshot`] would take it (named `keep_as`, or
/// `before-rollback-<S>-<n>` with the lowest `n` from 1 that is free);
/// then `V.head_epoch` = the next epoch, `V.chain = [S.epoch] + S.chain`,
/// `V.size_bytes = S.size_bytes`. Whether a front end exports the volume
/// is the API's business (it is not replicated state).
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct RollbackVolume {
    /// Which volume.
    #[prost(message, optional, tag = "1")]
    pub volume: Option<VolumeKey>,
    /// The snapshot to roll back to, by name.
    #[prost(string, tag = "2")]
    pub snapshot: String,
    /// The name for the kept head; empty: chosen as above.
    #[prost(string, tag = "3")]
    pub keep_as: String,
}

/// See [`Command::CloneVolume`]. Clone `N` of snapshot `S` of `V`: a new
/// volume id, `name`, `V`'s extent size, replicas and min replicas,
/// `size_bytes = S.size_bytes`, `data_id = V.data_volume_id()`,
/// `head_epoch` = the next epoch, `chain = [S.epoch] + S.chain`,
/// `parent = (V.id, S.id)`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct CloneVolume {
    /// The source volume.
    #[prost(message, optional, tag = "1")]
    pub volume: Option<VolumeKey>,
    /// The source snapshot, by name.
    #[prost(string, tag = "2")]
    pub snapshot: String,
    /// The new volume's name; unique among volumes.
    #[prost(string, tag = "3")]
    pub name: String,
}

/// See [`Command::EpochsCollected`]: the collector deleted every extent
/// version of `epochs` under `data_id`. Each must be dead (see
/// `State::dead_epochs`); epochs not known (forgotten already) are skipped.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct EpochsCollected {
    /// The data id.
    #[prost(uint64, tag = "1")]
    pub data_id: u64,
    /// The epochs deleted.
    #[prost(uint64, repeated, tag = "2")]
    pub epochs: Vec<u64>,
}

/// See [`Command::ClaimReplica`]: the claim of
/// `cairn_group::authority::Claim`, applied with
/// `cairn_group::authority::claim`. Granted only if nothing changed since
/// the primary brought `node` up to date: the group's interval is still
/// `interval`, `primary` is still its primary, `node` is still up as the
/// incarnation `up_since`, and `node` is in the group's placement. A claim
/// already granted (an earlier copy was applied: `node` is acting) answers
/// Ok and changes nothing, so a retry after a lost reply is harmless.
///
/// `more` carries further claims of the same primary, applied in order at
/// the same epoch: a node rejoining after an outage is claimed into every
/// group it belongs to (a thousand, with the default group count), and one
/// epoch per group would make every chunk server and client fetch a
/// thousand maps. Claims of the batch that are refused are skipped (their
/// primary claims again from a newer map); the command is refused only if
/// none was granted or already acting.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct ClaimReplica {
    /// The claiming primary.
    #[prost(uint64, tag = "1")]
    pub primary: u64,
    /// The group's replica count.
    #[prost(uint32, tag = "2")]
    pub replicas: u32,
    /// The group's index, `0..group_count`.
    #[prost(uint32, tag = "3")]
    pub index: u32,
    /// The interval the primary brought the node up to date in.
    #[prost(uint64, tag = "4")]
    pub interval: u64,
    /// The node brought up to date.
    #[prost(uint64, tag = "5")]
    pub node: u64,
    /// Its incarnation (`NodeInfo::up_since`) at that time.
    #[prost(uint64, tag = "6")]
    pub up_since: u64,
    /// Further claims of the same primary.
    #[prost(message, repeated, tag = "7")]
    pub more: Vec<cairn_proto::volmgr::GroupClaim>,
}

/// Names a volume by id, by name, or by both (then they must agree, which
/// guards against a name deleted and created again since the caller looked).
#[derive(Clone, PartialEq, Eq, ::prost::Message)]
pub struct VolumeKey {
    /// 0: not given.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Empty: not given.
    #[prost(string, tag = "2")]
    pub name: String,
}

impl VolumeKey {
    /// A key by id.
    pub fn id(id: u64) -> Self {
        Self {
            id,
            name: String::new(),
        }
    }

    /// A key by name.
    pub fn name(name: impl Into<String>) -> Self {
        Self {
            id: 0,
            name: name.into(),
        }
    }
}

impl std::fmt::Display for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = super::validate::shown(&self.name);
        match (self.id, name.is_empty()) {
            (0, true) => write!(f, "(no id or name given)"),
            (0, false) => write!(f, "named {name:?}"),
            (id, true) => write!(f, "with id {id}"),
            (id, false) => write!(f, "with id {id} named {name:?}"),
        }
    }
}

/// See [`Command::GrowVolume`].
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct GrowVolume {
    /// Which volume.
    #[prost(message, optional, tag = "1")]
    pub volume: Option<VolumeKey>,
    /// The new size: a multiple of 512, not below the current size (equal is
    /// accepted and changes nothing), at most `VOLUME_SIZE_BYTES_MAX`.
    #[prost(uint64, tag = "2")]
    pub size_bytes: u64,
}

/// See [`Command::DeleteVolume`].
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct DeleteVolume {
    /// Which volume.
    #[prost(message, optional, tag = "1")]
    pub volume: Option<VolumeKey>,
}

/// Outcome class of a command; the message says which volume, node or field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
#[repr(i32)]
pub enum ErrorCode {
    /// Applied (or nothing needed changing).
    Ok = 0,
    /// A field is out of range or malformed: name, size, extent size,
    /// replicas, labels, address, group count.
    InvalidArgument = 1,
    /// A volume (or a snapshot of the volume) with that name exists.
    AlreadyExists = 2,
    /// No such volume, snapshot or node.
    NotFound = 3,
    /// Valid on its own but not in the current state: shrinking, more
    /// replicas than failure domains, removing a node still in, up or
    /// acting, changing the group count, a refused claim, collecting an
    /// epoch still referenced, a stale persistent reservation generation.
    FailedPrecondition = 4,
    /// A named limit (volumes, nodes, snapshots per volume, chain length)
    /// is reached.
    LimitReached = 5,
    /// A retry older than the session's last applied request.
    StaleRequest = 6,
    /// The entry does not decode, or carries no command this build knows.
    Malformed = 7,
    /// Not possible yet, but soon without anyone acting: the pool's group
    /// count is not set (the leader sets it as it starts). Retry.
    Unavailable = 8,
}

/// What applying a proposal answers. Encoded into the raft apply result and,
/// later, into API replies.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct Response {
    /// [`ErrorCode`]; `Ok` is 0.
    #[prost(enumeration = "ErrorCode", tag = "1")]
    pub code: i32,
    /// Empty on success; otherwise what was wrong and with what.
    #[prost(string, tag = "2")]
    pub message: String,
    /// The map epoch after applying.
    #[prost(uint64, tag = "3")]
    pub map_epoch: u64,
    /// The catalogue version after applying.
    #[prost(uint64, tag = "4")]
    pub catalogue_version: u64,
    /// Create, grow, snapshot create/delete, rollback, clone (the new
    /// volume): the volume as it is now; delete: as it was.
    #[prost(message, optional, tag = "5")]
    pub volume: Option<VolumeInfo>,
    /// Register, set weight: the node as it is now; remove: as it was.
    #[prost(message, optional, tag = "6")]
    pub node: Option<NodeInfo>,
    /// Create snapshot: the snapshot; delete snapshot: as it was; rollback:
    /// the snapshot the head was kept as; clone: the source snapshot.
    #[prost(message, optional, tag = "7")]
    pub snapshot: Option<SnapshotInfo>,
    /// PrSet: the volume's persistent reservation generation after
    /// applying; refused with `PrGenerationMismatch`: the stored one.
    #[prost(uint64, tag = "8")]
    pub pr_generation: u64,
    /// Refused with `PrGenerationMismatch` (whose code, FailedPrecondition,
    /// other refusals share).
    #[prost(bool, tag = "9")]
    pub pr_generation_mismatch: bool,
}

impl Response {
    /// True when the command was applied (or had nothing to change).
    pub fn is_ok(&self) -> bool {
        self.code == ErrorCode::Ok as i32
    }
}
