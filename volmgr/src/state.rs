//! The replicated state machine: the cluster map and the volume catalogue.
//!
//! [`State`] is what every volume manager member holds. raft's apply loop
//! calls [`State::apply`] with each committed [`Proposal`] in log order, and
//! [`State::snapshot`] / [`State::restore`] when it compacts or installs a
//! snapshot (the [`Machine`] impl does exactly that over bytes). There is no
//! I/O, no clock and no randomness in here:
//!
//! - **Deterministic.** Every member applies the same entries to the same
//!   state and gets the same bytes (`snapshot()` is compared in tests). Time
//!   comes from the proposal ([`Proposal::proposed_unix_ms`]), decided once by
//!   the proposer. Maps are ordered (`BTreeMap`), never hashed.
//! - **Total and atomic.** Any proposal, however malformed, gives a
//!   [`Response`]; a refused one changes nothing at all. Each handler checks
//!   everything first and then mutates, with nothing fallible after the first
//!   write.
//!
//! # Versions
//!
//! The map and the catalogue change at very different rates and are watched
//! by different readers, so they have separate counters:
//!
//! - **Map epoch** ([`ClusterMap::epoch`]): every command that changes the
//!   map's placement-relevant content (nodes, addresses, labels, weights,
//!   up/in, incarnations, group count) or a group's acting set raises it by
//!   exactly one, however many nodes and groups it touches. A command that
//!   changes nothing (marking a down node down) leaves it. Usage figures
//!   ([`Command::NodeStats`]) are not covered. Chunk servers and targets
//!   fence I/O by it, so it moves only for them.
//! - **Catalogue version**: every create, grow and delete raises it by one,
//!   and so does every snapshot create and delete, rollback and clone.
//!   It does not touch the map epoch, with one exception: the first volume
//!   with a replica count adds that count's group records to the map (see
//!   below), so that create is also a map change. Later creates, grows and
//!   deletes leave the epoch alone: they must not make every chunk server
//!   reject in-flight writes tagged with the previous epoch.
//!
//! # Epochs, snapshots and clones
//!
//! A volume's extent versions are stored as `(data id, index, epoch)`
//! ([`VolumeInfo::data_volume_id`]). Writes go to the volume's
//! `head_epoch`; a read of a block the head does not hold falls through
//! the volume's `chain`, the frozen epochs beneath the head, newest first.
//! Epochs are unique cluster-wide: a counter (`next_epoch`, in the state
//! and its snapshots) gives each new head its epoch, so volumes that share
//! a data id (a clone and its source) never write the same version. The
//! first volumes of an old cluster all have head epoch 1 (each under its
//! own data id, so they do not collide).
//!
//! - **Snapshot** S of V ([`Command::CreateSnapshot`]): S freezes V's head
//!   epoch and chain and records V's size; V's chain becomes the old head
//!   over the old chain, and V gets a new head epoch. Constant time.
//! - **Rollback** of V to S ([`Command::RollbackVolume`]): V's head is kept
//!   as a snapshot first (so every rollback can be undone), then V gets a
//!   new head epoch over S's epoch and chain, and S's size.
//! - **Clone** of V at S ([`Command::CloneVolume`]): a new volume with V's
//!   data id, a new head epoch over S's epoch and chain, parent (V, S).
//! - **Deletes** of snapshots and volumes are allowed while clones use
//!   their epochs: a clone's chain keeps referencing them.
//! - **Garbage**: the state keeps, per data id, every epoch given out and
//!   not yet reported collected. Those no live volume's head or chain and
//!   no snapshot references are dead ([`State::dead_epochs`]): their
//!   versions may be deleted, and nothing ever references them again
//!   (references only spread from existing ones; new heads are new
//!   epochs). [`Command::EpochsCollected`] forgets them once deleted.
//!
//! # Groups and acting sets
//!
//! The map holds every redundancy group in use ([`ClusterMap::groups`]):
//! its acting set and interval, changed only as `cairn_group::authority`
//! allows (the `groups` module applies it):
//!
//! - [`Command::CreateVolume`] of the first volume with `r` replicas adds a
//!   record for each of the `group_count` groups of `r`: it acts on its
//!   placement's up nodes (all of its placement if none is up: it holds no
//!   data yet), interval the new epoch. Records stay when the volumes are
//!   deleted (a few KiB; the next volume with `r` replicas finds them).
//!   Volumes cannot be created before the group count is set.
//! - [`Command::MarkDown`] takes the nodes out of every acting set where
//!   another replica remains, all at one epoch (the last replica stays: the
//!   group waits for it). [`Command::MarkUp`] and [`Command::RegisterNode`]
//!   of a known node make a new incarnation ([`NodeInfo::up_since`]);
//!   registration also leaves acting sets (a restarted process may have
//!   lost writes it held in memory).
//! - [`Command::ClaimReplica`] adds a node that its group's primary brought
//!   up to date, compare-and-set on the interval and the incarnation.
//! - [`Command::RemoveNode`] is refused while the node is acting anywhere.
//!
//! Placement changes ([`Command::MarkOut`], [`Command::MarkIn`],
//! [`Command::SetWeight`], a new node, new labels) change placement, not
//! acting sets. Moving a group's data to a new placement is later work:
//! the new placement members are to catch up and be claimed by the
//! primary; old members outside the placement stay acting (listed last)
//! and are not yet retired.
//!
//! # Retried requests
//!
//! A client that loses its leader does not know whether its proposal was
//! committed, and retries it with the same `(client_id, client_seq)`. The
//! state keeps, per client, the last applied sequence number and its
//! successful [`Response`]; a proposal with that number returns the
//! recorded response without applying again, an older one is refused
//! ([`StateError::StaleRequest`]), a newer one is applied. Refusals are not
//! recorded: a refused command changed nothing, so evaluating its retry
//! again cannot apply anything twice (and the state stays byte-identical
//! after bad input). Sequence numbers may skip; they only have to grow.
//!
//! The table keeps the [`CLIENTS_MAX`] (10,000) most recently used sessions,
//! by a deterministic use counter. A session evicted between a request and
//! its retry would have the retry applied again, so clients use a fresh
//! random `client_id` per process and retry within seconds, while 10,000
//! other sessions cannot realistically come and go. `client_id` 0 opts out
//! (the failure detector's commands are idempotent).
//!
//! # Deleted volumes
//!
//! Volume ids are never reused, so any stored extent whose data id is below
//! the next volume id and is no live volume's data id (clones keep their
//! source's data id alive after it is deleted) is garbage: that is the
//! future collector's ground truth, together with the dead epochs. The
//! state also keeps the last [`DELETED_MAX`] deletions (id, name, time,
//! size) so the collector can start with them and `cairn` can show them;
//! older records are dropped (oldest first), which loses only the
//! convenience, never the garbage.
//!
//! # Persistent reservations
//!
//! The iSCSI front ends keep each volume's SCSI persistent reservation state
//! here ([`Command::PrSet`], `VolmgrOp::PrGet`): opaque bytes (their own
//! encoding, at most `cairn_proto::volmgr::PR_STATE_BYTES_MAX`) and a
//! generation, set by compare and set on the generation. The table is keyed
//! by volume id, outside the map and the catalogue (neither the map epoch
//! nor the catalogue version moves, and `VolumeInfo` does not grow: it goes
//! to every chunk server). It is in every snapshot, goes with its volume's
//! deletion (a volume created again under the name starts at generation 0),
//! stays through snapshots, rollbacks and grows, and is not inherited by
//! clones (each is a logical unit of its own).

mod command;
mod error;
mod groups;
mod reservations;
mod snapshot;
pub mod validate;
mod volume_snapshots;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use cairn_group::authority;
use cairn_proto::map::{ClusterMap, NodeInfo, SnapshotInfo, VolumeInfo};
use prost::Message as _;

pub use command::*;
pub use error::{RestoreError, StateError};
pub use reservations::{PrEntry, PR_STATES_BYTES_MAX};
pub use snapshot::{ClientRecord, DeletedVolume, SNAPSHOT_FORMAT_VERSION, SNAPSHOT_MAGIC};

use crate::node::Machine;

/// Volume sizes are whole sectors.
pub const SECTOR_BYTES: u64 = 512;
/// Largest volume: 1 PiB.
pub const VOLUME_SIZE_BYTES_MAX: u64 = 1 << 50;
/// Smallest extent size: 64 KiB, the chunk server store's own minimum.
pub const EXTENT_SIZE_BYTES_MIN: u32 = 64 << 10;
/// Largest extent size: 8 MiB. The store takes up to 64 MiB, but a rejoining
/// replica is sent whole extents in one chunk RPC frame, whose data is at
/// most `cairn_proto::frame::FRAME_DATA_BYTES_MAX` (8 MiB).
pub const EXTENT_SIZE_BYTES_MAX: u32 = cairn_proto::frame::FRAME_DATA_BYTES_MAX;
/// The extent size the API uses when none is given: 4 MiB.
pub const EXTENT_SIZE_BYTES_DEFAULT: u32 = 4 << 20;
/// Most replicas a volume may have: what placement can place.
pub const REPLICAS_MAX: u32 = cairn_placement::MAX_REPLICAS as u32;
/// Longest volume name.
pub const VOLUME_NAME_BYTES_MAX: usize = 128;
/// Longest host, rack or room label.
pub const LABEL_BYTES_MAX: usize = 64;
/// Longest chunk server address.
pub const ADDR_BYTES_MAX: usize = 256;
/// Live volumes in the catalogue (about 150 bytes each in a snapshot).
pub const VOLUMES_MAX: usize = 100_000;
/// Chunk servers in the map.
pub const NODES_MAX: usize = 4096;
/// Client sessions remembered for deduplication, most recently used first.
pub const CLIENTS_MAX: usize = 10_000;
/// Deletion records kept for the garbage collector, newest first.
pub const DELETED_MAX: usize = 10_000;
/// Snapshots one volume may have at a time.
pub const SNAPSHOTS_PER_VOLUME_MAX: usize = 256;
/// Frozen epochs beneath a volume's head (its chain). Every snapshot adds
/// one, also after the snapshot is deleted: merging frozen epochs is later
/// work. At one snapshot a day this lasts eleven years.
pub const CHAIN_EPOCHS_MAX: usize = 4096;

/// The replicated state of the volume manager. See the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// Nodes sorted by id.
    map: ClusterMap,
    catalogue_version: u64,
    volumes: BTreeMap<u64, VolumeInfo>,
    /// Live volumes by name; always the inverse of `volumes`.
    names: BTreeMap<String, u64>,
    /// The id the next volume gets; above every id ever given.
    next_volume_id: u64,
    /// Oldest first, at most [`DELETED_MAX`].
    deleted: VecDeque<DeletedVolume>,
    /// The epoch the next head gets; above every epoch given out.
    next_epoch: u64,
    /// Per data id, the epochs given out and not yet reported collected
    /// (no empty sets). Every epoch a volume or snapshot references is in
    /// its data id's set.
    epochs: BTreeMap<u64, BTreeSet<u64>>,
    clients: BTreeMap<u64, ClientRecord>,
    /// `ClientRecord::last_used` -> client id; the first entry is evicted.
    clients_by_use: BTreeMap<u64, u64>,
    /// Counts recorded responses; stamps `last_used`.
    client_uses: u64,
    /// Persistent reservation states by live volume id (see the module
    /// docs); only volumes whose state was ever set.
    pr: BTreeMap<u64, PrEntry>,
    /// Bytes of all `pr` states together (derived, at most
    /// [`PR_STATES_BYTES_MAX`]).
    pr_bytes: usize,
    /// Placement tables of the current map (derived, not state).
    placement: groups::PlacementCache,
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

/// What a successful command returns besides the counters.
#[derive(Default)]
struct Outcome {
    volume: Option<VolumeInfo>,
    node: Option<NodeInfo>,
    snapshot: Option<SnapshotInfo>,
    /// PrSet: the new generation.
    pr_generation: u64,
}

impl State {
    /// The empty state every member starts from: map epoch 0, no group
    /// count, no nodes, no volumes.
    pub fn new() -> Self {
        Self {
            map: ClusterMap::default(),
            catalogue_version: 0,
            volumes: BTreeMap::new(),
            names: BTreeMap::new(),
            next_volume_id: 1,
            deleted: VecDeque::new(),
            next_epoch: 1,
            epochs: BTreeMap::new(),
            clients: BTreeMap::new(),
            clients_by_use: BTreeMap::new(),
            client_uses: 0,
            pr: BTreeMap::new(),
            pr_bytes: 0,
            placement: Default::default(),
        }
    }

    /// The cluster map (nodes sorted by id).
    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    /// The map epoch; 0 before the first map change.
    pub fn map_epoch(&self) -> u64 {
        self.map.epoch
    }

    /// The catalogue version; 0 before the first volume change.
    pub fn catalogue_version(&self) -> u64 {
        self.catalogue_version
    }

    /// Live volumes in id order.
    pub fn volumes(&self) -> impl Iterator<Item = &VolumeInfo> {
        self.volumes.values()
    }

    /// Live volumes in name order, starting after `after` (exclusive; "" for
    /// the first), from the name index: a page costs its own length.
    pub fn volumes_after(&self, after: &str) -> impl Iterator<Item = &VolumeInfo> {
        use std::ops::Bound;
        self.names
            .range::<str, _>((Bound::Excluded(after), Bound::Unbounded))
            .filter_map(|(_, id)| self.volumes.get(id))
    }

    /// The live volume with `id`.
    pub fn volume(&self, id: u64) -> Option<&VolumeInfo> {
        self.volumes.get(&id)
    }

    /// The live volume named `name`.
    pub fn volume_by_name(&self, name: &str) -> Option<&VolumeInfo> {
        self.names.get(name).and_then(|id| self.volumes.get(id))
    }

    /// The id the next created volume will get.
    pub fn next_volume_id(&self) -> u64 {
        self.next_volume_id
    }

    /// The most recent deletions, oldest first (at most [`DELETED_MAX`]).
    pub fn deleted(&self) -> impl Iterator<Item = &DeletedVolume> {
        self.deleted.iter()
    }

    /// Sessions currently remembered for deduplication.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// True if `(client_id, client_seq)` is the session's last applied
    /// request: proposing it again answers the recorded response and
    /// changes nothing.
    pub fn is_recorded(&self, client_id: u64, client_seq: u64) -> bool {
        client_id != 0
            && self
                .clients
                .get(&client_id)
                .is_some_and(|r| r.last_seq == client_seq)
    }

    /// Applies one committed proposal. Never fails: a refusal is a
    /// [`Response`] with an error code, and leaves the state unchanged.
    pub fn apply(&mut self, proposal: &Proposal) -> Response {
        match self.try_apply(proposal) {
            Ok(response) => response,
            Err(e) => self.error_response(&e),
        }
    }

    /// [`State::apply`] with the refusal as a typed error.
    pub fn try_apply(&mut self, proposal: &Proposal) -> Result<Response, StateError> {
        let client_id = proposal.client_id;
        if client_id != 0 {
            if let Some(record) = self.clients.get(&client_id) {
                if proposal.client_seq == record.last_seq {
                    return Ok(record.response.clone().unwrap_or_default());
                }
                if proposal.client_seq < record.last_seq {
                    return Err(StateError::StaleRequest {
                        client_id,
                        client_seq: proposal.client_seq,
                        last_seq: record.last_seq,
                    });
                }
            }
        }
        let command = proposal.command.as_ref().ok_or(StateError::NoCommand)?;
        let outcome = self.execute(command, proposal.proposed_unix_ms)?;
        let response = Response {
            code: ErrorCode::Ok as i32,
            message: String::new(),
            map_epoch: self.map.epoch,
            catalogue_version: self.catalogue_version,
            volume: outcome.volume,
            node: outcome.node,
            snapshot: outcome.snapshot,
            pr_generation: outcome.pr_generation,
            pr_generation_mismatch: false,
        };
        if client_id != 0 {
            self.record(client_id, proposal.client_seq, &response);
        }
        Ok(response)
    }

    /// Applies a raw log entry: decodes it first, refusing what does not
    /// decode.
    pub fn apply_bytes(&mut self, entry: &[u8]) -> Response {
        match Proposal::decode(entry) {
            Ok(p) => self.apply(&p),
            Err(e) => self.error_response(&StateError::Malformed {
                reason: e.to_string(),
            }),
        }
    }

    fn error_response(&self, e: &StateError) -> Response {
        Response {
            code: e.code() as i32,
            message: e.to_string(),
            map_epoch: self.map.epoch,
            catalogue_version: self.catalogue_version,
            volume: None,
            node: None,
            snapshot: None,
            pr_generation: match e {
                StateError::PrGenerationMismatch { current, .. } => *current,
                _ => 0,
            },
            pr_generation_mismatch: matches!(e, StateError::PrGenerationMismatch { .. }),
        }
    }

    /// Remembers a session's successful response, evicting the least
    /// recently used session when the table is full.
    fn record(&mut self, client_id: u64, client_seq: u64, response: &Response) {
        // Cannot realistically wrap (one increment per applied request); if it
        // ever did, stamps would repeat and eviction order would be off, but
        // every member would still compute the same thing.
        self.client_uses = self.client_uses.wrapping_add(1);
        let stamp = self.client_uses;
        if let Some(old) = self.clients.get(&client_id) {
            self.clients_by_use.remove(&old.last_used);
        } else if self.clients.len() >= CLIENTS_MAX {
            if let Some((_, evicted)) = self.clients_by_use.pop_first() {
                self.clients.remove(&evicted);
            }
        }
        self.clients.insert(
            client_id,
            ClientRecord {
                client_id,
                last_seq: client_seq,
                last_used: stamp,
                response: Some(response.clone()),
            },
        );
        self.clients_by_use.insert(stamp, client_id);
        debug_assert_eq!(self.clients.len(), self.clients_by_use.len());
        debug_assert!(self.clients.len() <= CLIENTS_MAX);
    }

    fn execute(&mut self, command: &Command, now_unix_ms: u64) -> Result<Outcome, StateError> {
        match command {
            Command::SetGroupCount(c) => self.set_group_count(c.group_count),
            Command::RegisterNode(c) => self.register_node(c, now_unix_ms),
            Command::NodeStats(c) => Ok(self.node_stats(c)),
            Command::MarkDown(c) => self.mark(c, Mark::Down, now_unix_ms),
            Command::MarkUp(c) => self.mark(c, Mark::Up, now_unix_ms),
            Command::MarkOut(c) => self.mark(c, Mark::Out, now_unix_ms),
            Command::MarkIn(c) => self.mark(c, Mark::In, now_unix_ms),
            Command::SetWeight(c) => self.set_weight(c, now_unix_ms),
            Command::RemoveNode(c) => self.remove_node(c.node_id),
            Command::CreateVolume(c) => self.create_volume(c, now_unix_ms),
            Command::GrowVolume(c) => self.grow_volume(c),
            Command::DeleteVolume(c) => self.delete_volume(c, now_unix_ms),
            Command::ClaimReplica(c) => self.claim_replica(c, now_unix_ms),
            Command::CreateSnapshot(c) => self.create_snapshot(c, now_unix_ms),
            Command::DeleteSnapshot(c) => self.delete_snapshot(c),
            Command::RollbackVolume(c) => self.rollback_volume(c, now_unix_ms),
            Command::CloneVolume(c) => self.clone_volume(c, now_unix_ms),
            Command::EpochsCollected(c) => self.epochs_collected(c),
            Command::FoldEpoch(c) => self.fold_epoch(c),
            Command::PrSet(c) => self.pr_set(c),
            Command::SettlePlacement(_) => self.settle_placement(now_unix_ms),
        }
    }

    /// Groups whose whole placement acts but whose acting set differs from
    /// it (see [`Command::SettlePlacement`]).
    pub fn unsettled_groups(&mut self) -> usize {
        authority::unsettled(&self.placed_view()).len()
    }

    fn settle_placement(&mut self, now_unix_ms: u64) -> Result<Outcome, StateError> {
        let mut view = self.placed_view();
        let epoch = self.next_map_epoch()?;
        if !authority::settle_at(&mut view, epoch).is_empty() {
            self.write_back(&view, epoch, now_unix_ms);
        }
        Ok(Outcome::default())
    }

    // ---- the cluster map ----

    fn next_map_epoch(&self) -> Result<u64, StateError> {
        self.map.epoch.checked_add(1).ok_or(StateError::Exhausted {
            counter: "map epoch",
            value: self.map.epoch,
        })
    }

    fn node_index(&self, node_id: u64) -> Result<usize, StateError> {
        self.map
            .nodes
            .binary_search_by_key(&node_id, |n| n.id)
            .map_err(|_| StateError::UnknownNode { node_id })
    }

    fn set_group_count(&mut self, group_count: u32) -> Result<Outcome, StateError> {
        let max = cairn_placement::MAX_TABLE_GROUPS;
        if !group_count.is_power_of_two() || group_count > max {
            return Err(StateError::InvalidGroupCount { group_count, max });
        }
        match self.map.group_count {
            current if current == group_count => return Ok(Outcome::default()),
            0 => {}
            current => {
                return Err(StateError::GroupCountFixed {
                    current,
                    requested: group_count,
                })
            }
        }
        self.map.epoch = self.next_map_epoch()?;
        self.map.group_count = group_count;
        Ok(Outcome::default())
    }

    fn register_node(&mut self, c: &RegisterNode, now_unix_ms: u64) -> Result<Outcome, StateError> {
        let node_id = c.node_id;
        let invalid = |reason: String| StateError::InvalidNode { node_id, reason };
        if node_id == 0 {
            return Err(invalid("node id 0 is reserved".into()));
        }
        validate::addr(&c.addr).map_err(invalid)?;
        validate::label("host", &c.host, false).map_err(invalid)?;
        validate::label("rack", &c.rack, true).map_err(invalid)?;
        validate::label("room", &c.room, true).map_err(invalid)?;
        let epoch = self.next_map_epoch()?;
        match self.map.nodes.binary_search_by_key(&node_id, |n| n.id) {
            Ok(i) => {
                let node = &mut self.map.nodes[i];
                if node.addr != c.addr {
                    return Err(StateError::NodeAddrMismatch {
                        node_id,
                        registered: node.addr.clone(),
                        offered: c.addr.clone(),
                    });
                }
                // A new incarnation (see `RegisterNode`): always a new epoch.
                node.capacity_bytes = c.capacity_bytes;
                node.host.clone_from(&c.host);
                node.rack.clone_from(&c.rack);
                node.room.clone_from(&c.room);
                let mut view = self.group_view();
                authority::register_at(&mut view, node_id, epoch);
                self.write_back(&view, epoch, now_unix_ms);
                Ok(Outcome {
                    node: Some(self.map.nodes[i].clone()),
                    ..Outcome::default()
                })
            }
            Err(i) => {
                if self.map.nodes.len() >= NODES_MAX {
                    return Err(StateError::TooManyNodes {
                        node_id,
                        max: NODES_MAX,
                    });
                }
                let node = NodeInfo {
                    id: node_id,
                    addr: c.addr.clone(),
                    host: c.host.clone(),
                    rack: c.rack.clone(),
                    room: c.room.clone(),
                    weight: c.weight,
                    capacity_bytes: c.capacity_bytes,
                    used_bytes: 0,
                    up: true,
                    in_: true,
                    since_epoch: epoch,
                    since_unix_ms: now_unix_ms,
                    up_since: epoch,
                };
                // A new node is in no acting set: registering it is only
                // its first incarnation (what `authority::register` does).
                self.map.nodes.insert(i, node.clone());
                self.map.epoch = epoch;
                Ok(Outcome {
                    node: Some(node),
                    ..Outcome::default()
                })
            }
        }
    }

    fn node_stats(&mut self, c: &NodeStats) -> Outcome {
        for usage in &c.nodes {
            if let Ok(i) = self.node_index(usage.node_id) {
                let node = &mut self.map.nodes[i];
                node.capacity_bytes = usage.capacity_bytes;
                node.used_bytes = usage.used_bytes;
            }
        }
        Outcome::default()
    }

    fn mark(&mut self, c: &NodeIds, mark: Mark, now_unix_ms: u64) -> Result<Outcome, StateError> {
        if c.node_ids.is_empty() {
            return Err(StateError::NoNodes);
        }
        let mut changing = BTreeSet::new();
        for &node_id in &c.node_ids {
            let i = self.node_index(node_id)?;
            let node = &self.map.nodes[i];
            let current = match mark {
                Mark::Down | Mark::Up => node.up,
                Mark::Out | Mark::In => node.in_,
            };
            // A new incarnation since the proposer looked (see
            // `NodeIds::seen_epoch`): the judgement was about another process.
            let judged_another = matches!(mark, Mark::Down | Mark::Out)
                && c.seen_epoch != 0
                && node.up_since > c.seen_epoch;
            if current != mark.value() && !judged_another {
                changing.insert(i);
            }
        }
        if changing.is_empty() {
            return Ok(Outcome::default());
        }
        // An admin's out (`seen_epoch` 0) that would leave some group no
        // placement is refused. The failure detector checks the same before
        // it proposes (`FailureDetector::tick`); its entries apply as they
        // always did, so a log replayed by this build computes what older
        // builds computed.
        if matches!(mark, Mark::Out) && c.seen_epoch == 0 {
            let ids: Vec<u64> = changing.iter().map(|&i| self.map.nodes[i].id).collect();
            if let Err((replicas, hosts)) = self.map.placeable_without(&ids) {
                return Err(StateError::TooFewHostsLeft {
                    nodes: ids,
                    replicas,
                    hosts,
                });
            }
        }
        let epoch = self.next_map_epoch()?;
        match mark {
            // Acting sets change with up/down: through the authority, every
            // node at the same epoch, in id order.
            Mark::Down | Mark::Up => {
                let mut view = self.group_view();
                for i in changing {
                    let id = self.map.nodes[i].id;
                    let changed = match mark {
                        Mark::Down => authority::mark_down_at(&mut view, id, epoch),
                        _ => authority::mark_up_at(&mut view, id, epoch),
                    };
                    debug_assert!(changed, "node {id} was selected as changing");
                }
                self.write_back(&view, epoch, now_unix_ms);
            }
            // In/out changes placement only.
            Mark::Out | Mark::In => {
                for i in changing {
                    let node = &mut self.map.nodes[i];
                    node.in_ = mark.value();
                    node.since_epoch = epoch;
                    node.since_unix_ms = now_unix_ms;
                }
                self.map.epoch = epoch;
            }
        }
        Ok(Outcome::default())
    }

    fn set_weight(&mut self, c: &SetWeight, now_unix_ms: u64) -> Result<Outcome, StateError> {
        let i = self.node_index(c.node_id)?;
        if c.weight == 0 && self.map.nodes[i].weight != 0 && self.map.nodes[i].in_ {
            if let Err((replicas, hosts)) = self.map.placeable_without(&[c.node_id]) {
                return Err(StateError::TooFewHostsLeft {
                    nodes: vec![c.node_id],
                    replicas,
                    hosts,
                });
            }
        }
        if self.map.nodes[i].weight != c.weight {
            let epoch = self.next_map_epoch()?;
            let node = &mut self.map.nodes[i];
            node.weight = c.weight;
            node.since_epoch = epoch;
            node.since_unix_ms = now_unix_ms;
            self.map.epoch = epoch;
        }
        Ok(Outcome {
            node: Some(self.map.nodes[i].clone()),
            ..Outcome::default()
        })
    }

    fn remove_node(&mut self, node_id: u64) -> Result<Outcome, StateError> {
        let i = self.node_index(node_id)?;
        let node = &self.map.nodes[i];
        let state = match (node.in_, node.up) {
            (false, false) => None,
            (true, false) => Some("in"),
            (false, true) => Some("up"),
            (true, true) => Some("in and up"),
        };
        if let Some(state) = state {
            return Err(StateError::NodeInUse {
                node_id,
                state: state.into(),
            });
        }
        if let Some((key, groups)) = self.acting_in(node_id) {
            return Err(StateError::NodeActing {
                node_id,
                replicas: key.replicas,
                index: key.index,
                groups,
            });
        }
        let epoch = self.next_map_epoch()?;
        let node = self.map.nodes.remove(i);
        self.map.epoch = epoch;
        Ok(Outcome {
            node: Some(node),
            ..Outcome::default()
        })
    }

    /// A new volume's name is valid and not taken.
    pub(crate) fn check_new_name(&self, name: &str) -> Result<(), StateError> {
        validate::volume_name(name).map_err(|reason| StateError::InvalidName {
            name: validate::shown(name),
            reason,
        })?;
        if let Some(&id) = self.names.get(name) {
            return Err(StateError::DuplicateName {
                name: name.to_string(),
                id,
            });
        }
        Ok(())
    }

    /// The id a new volume `name` gets, and the counter after it; refused
    /// when the catalogue is full or the ids ran out. Nothing changes yet.
    pub(crate) fn new_volume_id(&self, name: &str) -> Result<(u64, u64), StateError> {
        if self.volumes.len() >= VOLUMES_MAX {
            return Err(StateError::TooManyVolumes {
                name: name.to_string(),
                max: VOLUMES_MAX,
            });
        }
        let id = self.next_volume_id;
        let next = id.checked_add(1).ok_or(StateError::Exhausted {
            counter: "volume id",
            value: id,
        })?;
        Ok((id, next))
    }

    /// Distinct hosts, as placement counts them ((room, rack, host)), among
    /// the nodes that can take replicas: in, with weight above 0. Down nodes
    /// count: they keep their place in placement while in.
    pub fn failure_domains(&self) -> u32 {
        self.map.failure_domains_without(&[])
    }

    // ---- the volume catalogue ----

    fn next_catalogue_version(&self) -> Result<u64, StateError> {
        self.catalogue_version
            .checked_add(1)
            .ok_or(StateError::Exhausted {
                counter: "catalogue version",
                value: self.catalogue_version,
            })
    }

    /// Checks in the order a user fixes them: the name, then the numbers,
    /// then what depends on the cluster.
    fn create_volume(&mut self, c: &CreateVolume, now_unix_ms: u64) -> Result<Outcome, StateError> {
        let name = &c.name;
        self.check_new_name(name)?;
        validate::volume_size(c.size_bytes).map_err(|reason| StateError::InvalidSize {
            name: name.clone(),
            size_bytes: c.size_bytes,
            reason,
        })?;
        if !validate::extent_size(c.extent_size_bytes) {
            return Err(StateError::InvalidExtentSize {
                name: name.clone(),
                extent_size_bytes: c.extent_size_bytes,
                min: EXTENT_SIZE_BYTES_MIN,
                max: EXTENT_SIZE_BYTES_MAX,
            });
        }
        if c.replicas == 0 || c.replicas > REPLICAS_MAX {
            return Err(StateError::InvalidReplicas {
                name: name.clone(),
                replicas: c.replicas,
                max: REPLICAS_MAX,
            });
        }
        if c.min_replicas == 0 || c.min_replicas > c.replicas {
            return Err(StateError::InvalidMinReplicas {
                name: name.clone(),
                min_replicas: c.min_replicas,
                replicas: c.replicas,
            });
        }
        let hosts = self.failure_domains();
        if c.replicas > hosts {
            return Err(StateError::NotEnoughFailureDomains {
                name: name.clone(),
                replicas: c.replicas,
                hosts,
            });
        }
        if self.map.group_count == 0 {
            return Err(StateError::GroupCountUnset { name: name.clone() });
        }
        let (id, next_volume_id) = self.new_volume_id(name)?;
        let version = self.next_catalogue_version()?;
        let head_epoch = if c.epoch_from_counter {
            self.new_epoch()?
        } else {
            1
        };
        // The first volume with this replica count brings its groups.
        let groups = if self.has_groups(c.replicas) {
            None
        } else {
            let epoch = self.next_map_epoch()?;
            Some((epoch, self.new_records(c.replicas, epoch)?))
        };

        let volume = VolumeInfo {
            id,
            name: name.clone(),
            size_bytes: c.size_bytes,
            extent_size_bytes: c.extent_size_bytes,
            replicas: c.replicas,
            min_replicas: c.min_replicas,
            created_unix_ms: now_unix_ms,
            head_epoch,
            parent: None,
            snapshots: Vec::new(),
            data_id: id,
            chain: Vec::new(),
            last_snapshot_id: 0,
        };
        self.volumes.insert(id, volume.clone());
        self.names.insert(name.clone(), id);
        self.next_volume_id = next_volume_id;
        self.take_epoch(id, head_epoch);
        self.catalogue_version = version;
        if let Some((epoch, records)) = groups {
            self.insert_records(records);
            self.map.epoch = epoch;
        }
        Ok(Outcome {
            volume: Some(volume),
            ..Outcome::default()
        })
    }

    fn resolve(&self, key: Option<&VolumeKey>) -> Result<u64, StateError> {
        let key = key.cloned().unwrap_or_default();
        let unknown = || StateError::UnknownVolume {
            key: key.to_string(),
        };
        let id = match (key.id, key.name.as_str()) {
            (0, "") => return Err(unknown()),
            (0, name) => *self.names.get(name).ok_or_else(unknown)?,
            (id, _) => id,
        };
        match self.volumes.get(&id) {
            Some(v) if key.name.is_empty() || v.name == key.name => Ok(id),
            _ => Err(unknown()),
        }
    }

    fn grow_volume(&mut self, c: &GrowVolume) -> Result<Outcome, StateError> {
        let id = self.resolve(c.volume.as_ref())?;
        let volume = &self.volumes[&id];
        validate::volume_size(c.size_bytes).map_err(|reason| StateError::InvalidSize {
            name: volume.name.clone(),
            size_bytes: c.size_bytes,
            reason,
        })?;
        if c.size_bytes < volume.size_bytes {
            return Err(StateError::Shrink {
                name: volume.name.clone(),
                id,
                size_bytes: volume.size_bytes,
                requested_bytes: c.size_bytes,
            });
        }
        if c.size_bytes > volume.size_bytes {
            let version = self.next_catalogue_version()?;
            self.catalogue_version = version;
            if let Some(v) = self.volumes.get_mut(&id) {
                v.size_bytes = c.size_bytes;
            }
        }
        Ok(Outcome {
            volume: self.volumes.get(&id).cloned(),
            ..Outcome::default()
        })
    }

    /// Clones of the volume keep working: their chains reference the
    /// epochs they need, which stay until no volume or snapshot does. Its
    /// persistent reservation state goes with it.
    fn delete_volume(&mut self, c: &DeleteVolume, now_unix_ms: u64) -> Result<Outcome, StateError> {
        let id = self.resolve(c.volume.as_ref())?;
        let version = self.next_catalogue_version()?;
        let Some(volume) = self.volumes.remove(&id) else {
            return Err(StateError::UnknownVolume {
                key: VolumeKey::id(id).to_string(),
            });
        };
        self.names.remove(&volume.name);
        self.pr_forget(id);
        if self.deleted.len() >= DELETED_MAX {
            self.deleted.pop_front();
        }
        self.deleted.push_back(DeletedVolume {
            volume_id: id,
            name: volume.name.clone(),
            size_bytes: volume.size_bytes,
            deleted_unix_ms: now_unix_ms,
        });
        self.catalogue_version = version;
        Ok(Outcome {
            volume: Some(volume),
            ..Outcome::default()
        })
    }
}

#[derive(Clone, Copy)]
enum Mark {
    Down,
    Up,
    Out,
    In,
}

impl Mark {
    /// The flag's value after marking (`up` or `in_`).
    fn value(self) -> bool {
        matches!(self, Mark::Up | Mark::In)
    }
}

/// raft's apply loop ([`crate::node`]) drives the state through this.
impl Machine for State {
    fn apply(&mut self, _index: u64, command: &[u8]) -> Vec<u8> {
        self.apply_bytes(command).encode_to_vec()
    }

    fn snapshot(&self) -> Vec<u8> {
        State::snapshot(self)
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        *self = State::restore(data).map_err(|e| e.to_string())?;
        Ok(())
    }
}
