//! Why a command was refused, and why a snapshot was.

use super::command::ErrorCode;

/// Why a command was refused. Applying a refused command changes nothing.
/// Every message names the volume, node or client it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The log entry does not decode as a [`super::Proposal`].
    #[error("malformed log entry: {reason}")]
    Malformed {
        /// The decoder's complaint.
        reason: String,
    },
    /// The entry carries no command, or one this build does not know.
    #[error(
        "the proposal carries no command this build knows (is every volume manager \
         member running the same version?)"
    )]
    NoCommand,
    /// A retry older than the session's last applied request: its result is
    /// no longer recorded, and applying it now could apply it twice.
    #[error(
        "client {client_id:#x}: request {client_seq} is older than its last applied request \
         {last_seq}; its outcome is no longer known"
    )]
    StaleRequest {
        /// The session.
        client_id: u64,
        /// The request's sequence number.
        client_seq: u64,
        /// The session's last applied sequence number.
        last_seq: u64,
    },
    /// A volume name breaks the naming rules.
    #[error("invalid volume name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Which rule.
        reason: String,
    },
    /// A live volume already has the name.
    #[error("a volume named {name:?} already exists (id {id})")]
    DuplicateName {
        /// The name given.
        name: String,
        /// The existing volume's id.
        id: u64,
    },
    /// A size that is 0, not a multiple of 512, or too large.
    #[error("volume {name:?}: size {size_bytes} bytes is invalid: {reason}")]
    InvalidSize {
        /// The volume.
        name: String,
        /// The size given.
        size_bytes: u64,
        /// Which rule.
        reason: String,
    },
    /// An extent size outside the allowed powers of two.
    #[error(
        "volume {name:?}: extent size {extent_size_bytes} bytes is not a power of two \
         from {min} to {max} bytes (64 KiB to 8 MiB)"
    )]
    InvalidExtentSize {
        /// The volume.
        name: String,
        /// The extent size given.
        extent_size_bytes: u32,
        /// `EXTENT_SIZE_BYTES_MIN`.
        min: u32,
        /// `EXTENT_SIZE_BYTES_MAX`.
        max: u32,
    },
    /// A replica count of 0 or above the placement limit.
    #[error("volume {name:?}: {replicas} replicas is outside 1..={max}")]
    InvalidReplicas {
        /// The volume.
        name: String,
        /// The count given.
        replicas: u32,
        /// `REPLICAS_MAX`.
        max: u32,
    },
    /// `min_replicas` of 0 or above `replicas`.
    #[error(
        "volume {name:?}: min_replicas {min_replicas} must be from 1 to replicas ({replicas})"
    )]
    InvalidMinReplicas {
        /// The volume.
        name: String,
        /// The count given.
        min_replicas: u32,
        /// The volume's replica count.
        replicas: u32,
    },
    /// More replicas than hosts to put them on.
    #[error(
        "volume {name:?}: {replicas} replicas need {replicas} distinct hosts, but the map has \
         {hosts} (counting hosts with a chunk server that is in and has weight above 0); \
         register more chunk servers or ask for fewer replicas"
    )]
    NotEnoughFailureDomains {
        /// The volume.
        name: String,
        /// The count asked for.
        replicas: u32,
        /// Distinct (room, rack, host) among in nodes with weight above 0.
        hosts: u32,
    },
    /// Grow to a smaller size.
    #[error(
        "volume {name:?} (id {id}): cannot shrink from {size_bytes} to {requested_bytes} bytes; \
         volumes only grow"
    )]
    Shrink {
        /// The volume.
        name: String,
        /// Its id.
        id: u64,
        /// Its current size.
        size_bytes: u64,
        /// The size asked for.
        requested_bytes: u64,
    },
    /// No live volume matches the key.
    #[error("no volume {key}")]
    UnknownVolume {
        /// The key as given (see [`super::VolumeKey`]'s `Display`).
        key: String,
    },
    /// The catalogue holds `VOLUMES_MAX` volumes.
    #[error("cannot create volume {name:?}: the catalogue is full ({max} volumes)")]
    TooManyVolumes {
        /// The volume that was to be created.
        name: String,
        /// `VOLUMES_MAX`.
        max: usize,
    },
    /// A snapshot name breaks the naming rules (those of volume names).
    #[error("volume {volume:?}: invalid snapshot name {name:?}: {reason}")]
    InvalidSnapshotName {
        /// The volume.
        volume: String,
        /// The name given.
        name: String,
        /// Which rule.
        reason: String,
    },
    /// The volume has a snapshot with that name.
    #[error("volume {volume:?} already has a snapshot named {name:?} (snapshot id {id})")]
    DuplicateSnapshotName {
        /// The volume.
        volume: String,
        /// The name given.
        name: String,
        /// The existing snapshot's id.
        id: u64,
    },
    /// The volume has no snapshot with that name.
    #[error("volume {volume:?} has no snapshot named {name:?}")]
    UnknownSnapshot {
        /// The volume.
        volume: String,
        /// The name given.
        name: String,
    },
    /// The volume has `SNAPSHOTS_PER_VOLUME_MAX` snapshots.
    #[error(
        "volume {volume:?} has {max} snapshots, the most a volume may have; delete some first"
    )]
    TooManySnapshots {
        /// The volume.
        volume: String,
        /// `SNAPSHOTS_PER_VOLUME_MAX`.
        max: usize,
    },
    /// The volume's chain has `CHAIN_EPOCHS_MAX` frozen epochs.
    #[error(
        "volume {volume:?} has {max} frozen epochs beneath its head, the most a volume may have \
         (merging them is not supported yet; copying its data into a new volume starts a fresh \
         chain)"
    )]
    ChainTooLong {
        /// The volume.
        volume: String,
        /// `CHAIN_EPOCHS_MAX`.
        max: usize,
    },
    /// A fold of an epoch that is not (or no longer) hidden with exactly
    /// that one child.
    #[error(
        "epoch {epoch} of data id {data_id} cannot be folded into {child}: it is not a hidden \
         epoch with {child} directly above it in every chain (a view's top, gone, or read \
         through by another child)"
    )]
    EpochNotFoldable {
        /// The data id.
        data_id: u64,
        /// The epoch.
        epoch: u64,
        /// The child named.
        child: u64,
    },
    /// A persistent reservation state over
    /// `cairn_proto::volmgr::PR_STATE_BYTES_MAX`.
    #[error(
        "volume {volume:?}: a persistent reservation state of {bytes} bytes is over the limit \
         of {max} bytes"
    )]
    PrStateTooLarge {
        /// The volume.
        volume: String,
        /// The state's size.
        bytes: usize,
        /// `PR_STATE_BYTES_MAX`.
        max: usize,
    },
    /// A compare and set of a volume's persistent reservation state with a
    /// generation that is not the stored one: another front end changed it
    /// since the caller read it.
    #[error(
        "volume {volume:?}: persistent reservation generation mismatch: expected generation \
         {expected}, but the stored generation is {current} (another front end changed the \
         state; read it again and retry)"
    )]
    PrGenerationMismatch {
        /// The volume.
        volume: String,
        /// The generation the request expected.
        expected: u64,
        /// The stored generation.
        current: u64,
    },
    /// The persistent reservation states of all volumes together would
    /// exceed `PR_STATES_BYTES_MAX` (they are part of every raft snapshot).
    #[error(
        "volume {volume:?}: cannot store a persistent reservation state of {bytes} bytes: the \
         states of all volumes together would exceed {max} bytes"
    )]
    PrStatesFull {
        /// The volume.
        volume: String,
        /// The state's size.
        bytes: usize,
        /// `PR_STATES_BYTES_MAX`.
        max: usize,
    },
    /// A collected epoch that a volume or snapshot still references.
    #[error(
        "epoch {epoch} of data id {data_id} cannot be collected: {by} still references it \
         (only dead epochs may be collected)"
    )]
    EpochReferenced {
        /// The data id.
        data_id: u64,
        /// The epoch.
        epoch: u64,
        /// Who references it, in words.
        by: String,
    },
    /// No node with this id is in the map.
    #[error("no chunk server with node id {node_id} in the map")]
    UnknownNode {
        /// The id given.
        node_id: u64,
    },
    /// A registration with a bad id, address or label.
    #[error("chunk server {node_id}: {reason}")]
    InvalidNode {
        /// The id given.
        node_id: u64,
        /// What is wrong.
        reason: String,
    },
    /// A registration for a known id from another address: two servers
    /// claiming one id (a copied data directory, a typo in a config) must
    /// not take each other's place in the map.
    #[error(
        "chunk server {node_id} is registered at {registered}; a registration from {offered} is \
         refused (two servers with one node id?). If the server really moved, mark the old \
         entry out, remove it, and register again"
    )]
    NodeAddrMismatch {
        /// The id given.
        node_id: u64,
        /// The address in the map.
        registered: String,
        /// The address of this registration.
        offered: String,
    },
    /// The map holds `NODES_MAX` nodes.
    #[error("cannot register chunk server {node_id}: the map is full ({max} chunk servers)")]
    TooManyNodes {
        /// The id given.
        node_id: u64,
        /// `NODES_MAX`.
        max: usize,
    },
    /// Removing a node that is still in or up.
    #[error(
        "chunk server {node_id} cannot be removed while it is {state}: mark it out, let its \
         groups re-replicate, stop it, then remove it"
    )]
    NodeInUse {
        /// The node.
        node_id: u64,
        /// "in", "up" or "in and up".
        state: String,
    },
    /// Removing a node that is still in a group's acting set: it is down, so
    /// it is that group's last acting replica, the only one known to hold
    /// every acknowledged write.
    #[error(
        "chunk server {node_id} cannot be removed: it is the last acting replica of group \
         {index}x{replicas} ({groups} group(s) in all) and may hold the only copy of their \
         acknowledged writes; start it again so those groups can be copied elsewhere"
    )]
    NodeActing {
        /// The node.
        node_id: u64,
        /// The first such group's replica count.
        replicas: u32,
        /// The first such group's index.
        index: u32,
        /// How many groups it is acting in.
        groups: usize,
    },
    /// An admin's out (or weight 0) that would leave fewer hosts than some
    /// group has replicas: no placement could be built for those groups.
    #[error(
        "cannot take chunk server(s) {nodes:?} out of placement: {replicas}-replica groups need \
         {replicas} distinct hosts, and {hosts} would be left (counting hosts with a chunk server \
         that is in and has weight above 0); add a chunk server on another host first"
    )]
    TooFewHostsLeft {
        /// The nodes asked for.
        nodes: Vec<u64>,
        /// The largest replica count of any group.
        replicas: u32,
        /// Hosts that would be left.
        hosts: u32,
    },
    /// A claim the map does not grant (see `cairn_group::authority::claim`).
    #[error(
        "claim by primary {primary} of chunk server {node} into group {index}x{replicas} \
         refused: {reason}"
    )]
    ClaimRefused {
        /// The claiming primary.
        primary: u64,
        /// The group's replica count.
        replicas: u32,
        /// The group's index.
        index: u32,
        /// The node claimed.
        node: u64,
        /// Why, in words (from `cairn_group::authority::ClaimRefused`).
        reason: String,
    },
    /// A volume created before the pool's group count is set.
    #[error(
        "cannot create volume {name:?} yet: the pool's group count is not set (the volume \
         manager leader sets it as it starts); retry"
    )]
    GroupCountUnset {
        /// The volume.
        name: String,
    },
    /// Placement could not place a replica count's groups (it cannot
    /// happen after the checks before it; kept so apply stays total).
    #[error("cannot place the groups of {replicas}-replica volumes: {reason}")]
    Placement {
        /// The replica count.
        replicas: u32,
        /// Placement's complaint.
        reason: String,
    },
    /// A Mark* command with an empty id list.
    #[error("no node ids given")]
    NoNodes,
    /// A group count that placement cannot use.
    #[error("group count {group_count} is not a power of two from 1 to {max}")]
    InvalidGroupCount {
        /// The count given.
        group_count: u32,
        /// `cairn_placement::MAX_TABLE_GROUPS`.
        max: u32,
    },
    /// Changing a group count already set.
    #[error(
        "the group count is already {current} and cannot change to {requested} (that would \
         move every extent)"
    )]
    GroupCountFixed {
        /// The count in the map.
        current: u32,
        /// The count asked for.
        requested: u32,
    },
    /// A counter (map epoch, catalogue version, volume id, epoch, snapshot
    /// id) is at `u64::MAX`.
    #[error("the {counter} cannot advance past {value}")]
    Exhausted {
        /// Which counter.
        counter: &'static str,
        /// Its value.
        value: u64,
    },
}

impl StateError {
    /// The error's class, for clients that act on it.
    pub fn code(&self) -> ErrorCode {
        use StateError::*;
        match self {
            Malformed { .. } | NoCommand => ErrorCode::Malformed,
            StaleRequest { .. } => ErrorCode::StaleRequest,
            InvalidName { .. }
            | InvalidSize { .. }
            | InvalidExtentSize { .. }
            | InvalidReplicas { .. }
            | InvalidMinReplicas { .. }
            | InvalidNode { .. }
            | InvalidSnapshotName { .. }
            | PrStateTooLarge { .. }
            | NoNodes
            | InvalidGroupCount { .. } => ErrorCode::InvalidArgument,
            DuplicateName { .. } | DuplicateSnapshotName { .. } => ErrorCode::AlreadyExists,
            UnknownVolume { .. } | UnknownNode { .. } | UnknownSnapshot { .. } => {
                ErrorCode::NotFound
            }
            NotEnoughFailureDomains { .. }
            | Shrink { .. }
            | EpochReferenced { .. }
            | EpochNotFoldable { .. }
            | PrGenerationMismatch { .. }
            | NodeInUse { .. }
            | NodeActing { .. }
            | TooFewHostsLeft { .. }
            | ClaimRefused { .. }
            | Placement { .. }
            | NodeAddrMismatch { .. }
            | GroupCountFixed { .. } => ErrorCode::FailedPrecondition,
            GroupCountUnset { .. } => ErrorCode::Unavailable,
            TooManyVolumes { .. }
            | TooManyNodes { .. }
            | TooManySnapshots { .. }
            | ChainTooLong { .. }
            | PrStatesFull { .. }
            | Exhausted { .. } => ErrorCode::LimitReached,
        }
    }
}

/// Why [`super::State::restore`] refused a snapshot. The volume manager must
/// not start from a snapshot it cannot trust: it stops with this message, and
/// the member is rebuilt from the others (raft sends it a fresh snapshot).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The bytes are not a snapshot envelope at all.
    #[error("not a volume manager snapshot ({reason})")]
    NotASnapshot {
        /// The decoder's complaint, or the magic found.
        reason: String,
    },
    /// Written by a build with another format.
    #[error(
        "snapshot format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        /// The version in the snapshot.
        found: u32,
        /// `SNAPSHOT_FORMAT_VERSION`.
        supported: u32,
    },
    /// The payload does not match its CRC32: corrupt.
    #[error(
        "snapshot is corrupt: CRC32 of its {payload_bytes}-byte payload is {computed:#010x}, \
         stored {stored:#010x}"
    )]
    ChecksumMismatch {
        /// The CRC32 in the envelope.
        stored: u32,
        /// The CRC32 of the payload.
        computed: u32,
        /// Payload length.
        payload_bytes: usize,
    },
    /// The payload passed its CRC but does not decode.
    #[error("snapshot payload does not decode: {reason}")]
    Payload {
        /// The decoder's complaint.
        reason: String,
    },
    /// The payload decodes but breaks an invariant of the state.
    #[error("snapshot breaks an invariant: {reason}")]
    Invariant {
        /// Which invariant, with the ids concerned.
        reason: String,
    },
}
