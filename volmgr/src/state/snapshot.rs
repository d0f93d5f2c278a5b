//! The state's snapshot format, and restoring from it.
//!
//! ```text
//! SnapshotEnvelope { magic, format_version, crc32 (of payload), payload: StateSnapshot }
//! ```
//!
//! The envelope is checked before the payload is decoded: the magic says the
//! bytes are a volume manager snapshot at all, the version says this build
//! can read them, the CRC32 (crc32fast, IEEE) that they are what was
//! written. Then the payload is decoded and every invariant the state relies
//! on is checked (sorted unique node ids, unique names, ids below the next
//! id, bounded tables), so a snapshot that would make `apply` misbehave is
//! refused at the door with the reason. The cluster map, group records and
//! incarnations included, is stored as its own prost message
//! ([`ClusterMap`]), so new map fields ride along without a format change;
//! a snapshot from before group records restores with none (records appear
//! with the next volume of each replica count). A snapshot from before
//! epochs were counted (no `next_epoch`) restores with every epoch its
//! volumes reference as given out, and the next epoch above them all. A
//! snapshot from before persistent reservations restores with none (no
//! volume had any: `PrSet` needs every member to know it). Field tags
//! never change (on-disk format); a change to the meaning of the payload
//! takes a new version.
//!
//! Encoding is canonical: the same state always gives the same bytes
//! (ordered maps, fields in tag order), so members' snapshots can be
//! compared byte for byte.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use cairn_proto::map::{ClusterMap, VolumeInfo};
use cairn_proto::volmgr::DataEpochs;
use prost::Message as _;

use super::reservations::{restore_pr, PrEntry};
use super::volume_snapshots::restore_epochs;

use super::{
    validate, Response, RestoreError, State, CLIENTS_MAX, DELETED_MAX, NODES_MAX, REPLICAS_MAX,
    VOLUMES_MAX,
};

/// First field of every snapshot: "CVMS" read as a little-endian u32.
pub const SNAPSHOT_MAGIC: u32 = u32::from_le_bytes(*b"CVMS");
/// The payload format this build writes and reads.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;

#[derive(Clone, PartialEq, ::prost::Message)]
struct SnapshotEnvelope {
    #[prost(fixed32, tag = "1")]
    magic: u32,
    #[prost(uint32, tag = "2")]
    format_version: u32,
    #[prost(fixed32, tag = "3")]
    crc32: u32,
    #[prost(bytes = "vec", tag = "4")]
    payload: Vec<u8>,
}

#[derive(Clone, PartialEq, ::prost::Message)]
struct StateSnapshot {
    #[prost(message, optional, tag = "1")]
    map: Option<ClusterMap>,
    #[prost(uint64, tag = "2")]
    catalogue_version: u64,
    /// In id order.
    #[prost(message, repeated, tag = "3")]
    volumes: Vec<VolumeInfo>,
    #[prost(uint64, tag = "4")]
    next_volume_id: u64,
    /// Oldest first.
    #[prost(message, repeated, tag = "5")]
    deleted: Vec<DeletedVolume>,
    /// In client id order.
    #[prost(message, repeated, tag = "6")]
    clients: Vec<ClientRecord>,
    #[prost(uint64, tag = "7")]
    client_uses: u64,
    /// The epoch the next head gets; 0 in snapshots from before epochs
    /// were counted (issue 8), which restore as described in
    /// `volume_snapshots::restore_epochs`.
    #[prost(uint64, tag = "8")]
    next_epoch: u64,
    /// Epochs given out and not yet collected, by data id ascending, each
    /// list ascending.
    #[prost(message, repeated, tag = "9")]
    epochs: Vec<DataEpochs>,
    /// Persistent reservation states, by volume id ascending.
    #[prost(message, repeated, tag = "10")]
    pr: Vec<PrEntry>,
}

/// A deleted volume, kept for the garbage collector (see the module docs of
/// [`super`]).
#[derive(Clone, PartialEq, Eq, ::prost::Message)]
pub struct DeletedVolume {
    /// The deleted volume's id; never given to another volume.
    #[prost(uint64, tag = "1")]
    pub volume_id: u64,
    /// Its name (free for a new volume from the deletion on).
    #[prost(string, tag = "2")]
    pub name: String,
    /// Its size when deleted.
    #[prost(uint64, tag = "3")]
    pub size_bytes: u64,
    /// When it was deleted (proposer's clock, ms since the Unix epoch).
    #[prost(uint64, tag = "4")]
    pub deleted_unix_ms: u64,
}

/// One client session's last applied request, for deduplication.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct ClientRecord {
    /// The session.
    #[prost(uint64, tag = "1")]
    pub client_id: u64,
    /// Its last applied sequence number.
    #[prost(uint64, tag = "2")]
    pub last_seq: u64,
    /// Use counter stamp of that request; the lowest is evicted first.
    #[prost(uint64, tag = "3")]
    pub last_used: u64,
    /// What that request answered; a retry gets it again.
    #[prost(message, optional, tag = "4")]
    pub response: Option<Response>,
}

impl State {
    /// The whole state as bytes, in the format [`State::restore`] reads.
    pub fn snapshot(&self) -> Vec<u8> {
        let payload = StateSnapshot {
            map: Some(self.map.clone()),
            catalogue_version: self.catalogue_version,
            volumes: self.volumes.values().cloned().collect(),
            next_volume_id: self.next_volume_id,
            deleted: self.deleted.iter().cloned().collect(),
            clients: self.clients.values().cloned().collect(),
            client_uses: self.client_uses,
            next_epoch: self.next_epoch,
            epochs: self
                .epochs
                .iter()
                .map(|(&data_id, e)| DataEpochs {
                    data_id,
                    epochs: e.iter().copied().collect(),
                })
                .collect(),
            pr: self.pr.values().cloned().collect(),
        }
        .encode_to_vec();
        SnapshotEnvelope {
            magic: SNAPSHOT_MAGIC,
            format_version: SNAPSHOT_FORMAT_VERSION,
            crc32: crc32fast::hash(&payload),
            payload,
        }
        .encode_to_vec()
    }

    /// Rebuilds a state from [`State::snapshot`]'s bytes, refusing anything
    /// corrupt, from another format version, or breaking an invariant.
    pub fn restore(bytes: &[u8]) -> Result<State, RestoreError> {
        let envelope = SnapshotEnvelope::decode(bytes).map_err(|e| RestoreError::NotASnapshot {
            reason: e.to_string(),
        })?;
        if envelope.magic != SNAPSHOT_MAGIC {
            return Err(RestoreError::NotASnapshot {
                reason: format!(
                    "magic is {:#010x}, expected {SNAPSHOT_MAGIC:#010x}",
                    envelope.magic
                ),
            });
        }
        if envelope.format_version != SNAPSHOT_FORMAT_VERSION {
            return Err(RestoreError::UnsupportedVersion {
                found: envelope.format_version,
                supported: SNAPSHOT_FORMAT_VERSION,
            });
        }
        let computed = crc32fast::hash(&envelope.payload);
        if computed != envelope.crc32 {
            return Err(RestoreError::ChecksumMismatch {
                stored: envelope.crc32,
                computed,
                payload_bytes: envelope.payload.len(),
            });
        }
        let snap =
            StateSnapshot::decode(&envelope.payload[..]).map_err(|e| RestoreError::Payload {
                reason: e.to_string(),
            })?;
        from_snapshot(snap)
    }
}

fn invariant(reason: String) -> RestoreError {
    RestoreError::Invariant { reason }
}

fn from_snapshot(snap: StateSnapshot) -> Result<State, RestoreError> {
    let map = snap.map.unwrap_or_default();
    check_map(&map)?;
    let (volumes, names) = check_volumes(snap.volumes, snap.next_volume_id)?;
    let (next_epoch, epochs) =
        restore_epochs(&volumes, snap.next_volume_id, snap.next_epoch, snap.epochs)?;

    if snap.deleted.len() > DELETED_MAX {
        return Err(invariant(format!(
            "{} deletion records, at most {DELETED_MAX} kept",
            snap.deleted.len()
        )));
    }
    for d in &snap.deleted {
        if d.volume_id == 0
            || d.volume_id >= snap.next_volume_id
            || volumes.contains_key(&d.volume_id)
        {
            return Err(invariant(format!(
                "deleted volume {} is live, 0, or not below the next volume id {}",
                d.volume_id, snap.next_volume_id
            )));
        }
    }

    let (pr, pr_bytes) = restore_pr(snap.pr, &volumes)?;
    let (clients, clients_by_use) = check_clients(snap.clients, snap.client_uses)?;
    Ok(State {
        map,
        catalogue_version: snap.catalogue_version,
        volumes,
        names,
        next_volume_id: snap.next_volume_id,
        deleted: VecDeque::from(snap.deleted),
        next_epoch,
        epochs,
        clients,
        clients_by_use,
        client_uses: snap.client_uses,
        pr,
        pr_bytes,
        placement: Default::default(),
    })
}

fn check_map(map: &ClusterMap) -> Result<(), RestoreError> {
    let gc = map.group_count;
    if gc != 0 && (!gc.is_power_of_two() || gc > cairn_placement::MAX_TABLE_GROUPS) {
        return Err(invariant(format!(
            "group count {gc} is not a power of two within the placement limit"
        )));
    }
    if map.nodes.len() > NODES_MAX {
        return Err(invariant(format!(
            "{} nodes in the map, at most {NODES_MAX} allowed",
            map.nodes.len()
        )));
    }
    let mut previous = 0;
    for node in &map.nodes {
        if node.id <= previous {
            return Err(invariant(format!(
                "node ids not ascending and above 0: {} after {previous}",
                node.id
            )));
        }
        previous = node.id;
        if node.since_epoch > map.epoch || node.up_since > map.epoch {
            return Err(invariant(format!(
                "node {} changed at epoch {} (incarnation {}), after the map's epoch {}",
                node.id, node.since_epoch, node.up_since, map.epoch
            )));
        }
    }
    check_groups(map)
}

/// Group records: sorted by (replicas, index), each key once, within the
/// group count and replica limit; acting sets non-empty, without repeats,
/// of nodes in the map; intervals not after the map's epoch.
fn check_groups(map: &ClusterMap) -> Result<(), RestoreError> {
    let mut previous: Option<(u32, u32)> = None;
    for g in &map.groups {
        let key = (g.replicas, g.index);
        let name = format!("group {}x{}", g.index, g.replicas);
        if previous.is_some_and(|p| p >= key) {
            return Err(invariant(format!(
                "group records not sorted by (replicas, index): {name} after group {}x{}",
                previous.unwrap_or_default().1,
                previous.unwrap_or_default().0
            )));
        }
        previous = Some(key);
        if g.replicas == 0 || g.replicas > REPLICAS_MAX || g.index >= map.group_count {
            return Err(invariant(format!(
                "{name}: replicas outside 1..={REPLICAS_MAX} or index not below the group count {}",
                map.group_count
            )));
        }
        if g.interval > map.epoch {
            return Err(invariant(format!(
                "{name}: interval {} after the map's epoch {}",
                g.interval, map.epoch
            )));
        }
        if g.acting.is_empty() {
            return Err(invariant(format!("{name}: empty acting set")));
        }
        for (i, id) in g.acting.iter().enumerate() {
            if map.node(*id).is_none() || g.acting[..i].contains(id) {
                return Err(invariant(format!(
                    "{name}: acting set {:?} names node {id} twice or not in the map",
                    g.acting
                )));
            }
        }
    }
    Ok(())
}

type Catalogue = (BTreeMap<u64, VolumeInfo>, BTreeMap<String, u64>);

fn check_volumes(list: Vec<VolumeInfo>, next_volume_id: u64) -> Result<Catalogue, RestoreError> {
    if list.len() > VOLUMES_MAX {
        return Err(invariant(format!(
            "{} volumes, at most {VOLUMES_MAX} allowed",
            list.len()
        )));
    }
    if next_volume_id == 0 {
        return Err(invariant("next volume id is 0".into()));
    }
    let mut volumes = BTreeMap::new();
    let mut names = BTreeMap::new();
    for v in list {
        if v.id == 0 || v.id >= next_volume_id {
            return Err(invariant(format!(
                "volume {} {:?}: id is 0 or not below the next volume id {next_volume_id}",
                v.id, v.name
            )));
        }
        validate::volume_name(&v.name)
            .map_err(|e| invariant(format!("volume {}: name {:?}: {e}", v.id, v.name)))?;
        if let Some(other) = names.insert(v.name.clone(), v.id) {
            return Err(invariant(format!(
                "volumes {other} and {} are both named {:?}",
                v.id, v.name
            )));
        }
        let id = v.id;
        if volumes.insert(id, v).is_some() {
            return Err(invariant(format!("volume id {id} appears twice")));
        }
    }
    Ok((volumes, names))
}

type Clients = (BTreeMap<u64, ClientRecord>, BTreeMap<u64, u64>);

fn check_clients(list: Vec<ClientRecord>, client_uses: u64) -> Result<Clients, RestoreError> {
    if list.len() > CLIENTS_MAX {
        return Err(invariant(format!(
            "{} client sessions, at most {CLIENTS_MAX} kept",
            list.len()
        )));
    }
    let mut clients = BTreeMap::new();
    let mut by_use = BTreeMap::new();
    let mut stamps = BTreeSet::new();
    for c in list {
        if c.client_id == 0 || c.last_used == 0 || c.last_used > client_uses {
            return Err(invariant(format!(
                "client session {:#x}: id 0, or use stamp {} outside 1..={client_uses}",
                c.client_id, c.last_used
            )));
        }
        if !stamps.insert(c.last_used) {
            return Err(invariant(format!(
                "client session {:#x}: use stamp {} shared with another session",
                c.client_id, c.last_used
            )));
        }
        by_use.insert(c.last_used, c.client_id);
        let id = c.client_id;
        if clients.insert(id, c).is_some() {
            return Err(invariant(format!("client session {id:#x} appears twice")));
        }
    }
    Ok((clients, by_use))
}
