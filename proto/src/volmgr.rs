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

use crate::map::{ClusterMap, VolumeInfo};

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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
#[repr(i32)]
pub enum VolmgrStatus {
    Ok = 0,
    /// The request is wrong; `message` says which field and why.
    InvalidArgument = 1,
    /// The named volume (or node) does not exist.
    NotFound = 2,
    /// A volume with that name exists.
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

    /// DeleteVolume: delete even while exported.
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
