//! The volume manager's API: [`VolmgrRequest`] in, [`VolmgrResponse`] out.
//!
//! Changes become [`Proposal`]s through raft (exactly once per client id and
//! sequence, see `state`); reads run on the node loop after raft's read index,
//! so they are current; both need the leader, and a follower answers
//! `NotLeader` with the leader's address. Heartbeats go to the leader's
//! failure detector, in memory, and are answered with a read lease and the
//! map epoch it holds for (see `Api::heartbeat`). Claims (`ClaimReplica`) are
//! changes like any other: the state machine grants or refuses them. A long
//! poll for a newer map waits on the node's applied index and answers when
//! the epoch moves or the wait ends.
//!
//! Snapshots of exported volumes are crash-consistent: the leader has the
//! front ends holding export leases pause their writes before it proposes
//! the snapshot ([`Pauses`]; the protocol is written out on
//! `VolmgrOp::CreateSnapshot`). Front ends learn of a pending snapshot, and
//! of the new head epoch after it, through `ExportWatch`, a long poll that
//! also renews their lease. Its answers carry the volume's SCSI persistent
//! reservation generation, which `PrSet` (a change, compare and set) moves
//! and `PrGet` (a read) answers with the state itself.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_proto::map::ClusterMap;
use cairn_proto::volmgr::{
    ClusterStatus, MemberInfo, VolmgrOp, VolmgrRequest, VolmgrResponse, VolmgrStatus,
    PR_STATE_BYTES_MAX,
};
use prost::Message as _;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::detector::FailureDetector;
use crate::node::{NodeError, NodeHandle};
use crate::server::Handler;
use crate::state::{
    ClaimReplica, CloneVolume, Command, CreateSnapshot, CreateVolume, DeleteSnapshot, DeleteVolume,
    EpochsCollected, ErrorCode, GrowVolume, NodeIds, PrSet, Proposal, RegisterNode, RemoveNode,
    Response, RollbackVolume, SetWeight, State, StateError, VolumeKey, EXTENT_SIZE_BYTES_DEFAULT,
};

/// Longest a `GetMap` long poll waits.
pub const MAP_WAIT_MAX: Duration = Duration::from_secs(30);
/// Most volumes one `ListVolumes` answer holds.
pub const LIST_LIMIT_MAX: u32 = 1000;
/// Longest an `ExportWatch` long poll waits.
pub const WATCH_WAIT_MAX: Duration = Duration::from_secs(30);
/// How long front ends get to pause for a snapshot when the request does
/// not say (`pause_timeout_ms` 0).
pub const PAUSE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// The longest pause a request may ask for.
pub const PAUSE_TIMEOUT_MAX: Duration = Duration::from_secs(30);

/// The leader's failure detector, replaced at every election (see `detector`).
pub type SharedDetector = Arc<Mutex<Option<FailureDetector>>>;
/// Used bytes per chunk server, from heartbeats, until the leader proposes
/// them into the map (`NodeStats`, in batches).
pub type SharedUsage = Arc<Mutex<std::collections::BTreeMap<u64, u64>>>;

/// Export leases: which front ends export which volume, last renewed when
/// (the leader's clock, ms). Held by the leader only, like heartbeats: a
/// front end that dies simply stops renewing.
#[derive(Default)]
pub struct Exports {
    leases: std::collections::BTreeMap<String, std::collections::BTreeMap<u64, u64>>,
    /// The newest persistent reservation generation each front end's watch
    /// said it holds, per volume.
    pr_held: std::collections::BTreeMap<String, std::collections::BTreeMap<u64, u64>>,
    /// Woken whenever a front end reports a generation.
    pr_reported: Arc<tokio::sync::Notify>,
    /// Per front end id: the process (instance) that now speaks for it,
    /// and those it superseded.
    instances: std::collections::BTreeMap<u64, FrontEndInstances>,
}

/// The processes that have used one front end id, as this leader saw them.
#[derive(Default)]
struct FrontEndInstances {
    current: u64,
    /// Newest last, at most `SUPERSEDED_MAX`.
    superseded: std::collections::VecDeque<u64>,
}

/// Superseded instances remembered per front end id: one per restart, so a
/// few cover any process still running by mistake.
const SUPERSEDED_MAX: usize = 16;

impl Exports {
    /// Lets process `instance` speak for front end `target`. A new instance
    /// supersedes the current one (a restarted front end must take over its
    /// leases at once, not after they lapse); a superseded one is refused
    /// from then on, so two processes given the same id do not take turns:
    /// the older loses its leases and says why in its log. 0 (a front end
    /// older than instances) is always let through.
    fn claim_instance(&mut self, target: u64, instance: u64) -> Result<(), String> {
        if instance == 0 {
            return Ok(());
        }
        let e = self.instances.entry(target).or_default();
        if e.current == instance {
            return Ok(());
        }
        if e.superseded.contains(&instance) {
            return Err(format!(
                "front end id {target} is now used by another process (a cairn-target \
                 started later with the same target_id); this one no longer holds export \
                 leases: give every cairn-target its own target_id"
            ));
        }
        if e.current != 0 {
            warn!(
                front_end = target,
                "a new process speaks for front end {target}; the previous one is refused \
                 from now on (a restart, or two cairn-targets sharing one target_id)"
            );
            e.superseded.push_back(e.current);
            if e.superseded.len() > SUPERSEDED_MAX {
                e.superseded.pop_front();
            }
        }
        e.current = instance;
        Ok(())
    }

    fn renew(&mut self, volume: &str, target: u64, now_ms: u64) {
        self.leases
            .entry(volume.to_string())
            .or_default()
            .insert(target, now_ms);
    }

    /// Renews a lease only if `target` still holds it: a long poll that
    /// outlived its front end's interest (the export closed and dropped its
    /// lease while the poll waited) must not take the lease again.
    fn refresh(&mut self, volume: &str, target: u64, now_ms: u64) -> bool {
        match self.leases.get_mut(volume).and_then(|t| t.get_mut(&target)) {
            Some(at) => {
                *at = now_ms;
                true
            }
            None => false,
        }
    }

    fn drop_lease(&mut self, volume: &str, target: u64) {
        for map in [&mut self.leases, &mut self.pr_held] {
            if let Some(t) = map.get_mut(volume) {
                t.remove(&target);
                if t.is_empty() {
                    map.remove(volume);
                }
            }
        }
    }

    /// Front end `target` holds generation `generation` of `volume`'s
    /// persistent reservations (its LUs reload it before their next
    /// command).
    fn pr_report(&mut self, volume: &str, target: u64, generation: u64) {
        let held = self
            .pr_held
            .entry(volume.to_string())
            .or_default()
            .entry(target)
            .or_default();
        *held = (*held).max(generation);
        self.pr_reported.notify_waiters();
    }

    /// Front ends other than `except` with a lease on `volume` younger than
    /// `valid_ms` that have not reported `generation` yet: those that
    /// report generations, and those that never reported one (front ends
    /// older than the report).
    fn pr_behind(
        &self,
        volume: &str,
        except: u64,
        generation: u64,
        now_ms: u64,
        valid_ms: u64,
    ) -> (Vec<u64>, Vec<u64>) {
        let held = self.pr_held.get(volume);
        self.holders(volume, now_ms, valid_ms)
            .into_iter()
            .filter(|t| *t != except)
            .filter(|t| held.and_then(|h| h.get(t)).is_none_or(|g| *g < generation))
            .partition(|t| held.is_some_and(|h| h.contains_key(t)))
    }

    /// Front ends whose lease on `volume` is younger than `valid_ms`.
    pub fn holders(&self, volume: &str, now_ms: u64, valid_ms: u64) -> Vec<u64> {
        self.leases
            .get(volume)
            .map(|t| {
                t.iter()
                    .filter(|(_, &seen)| now_ms.saturating_sub(seen) <= valid_ms)
                    .map(|(&id, _)| id)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Pending crash-consistent snapshots, at most one per volume (by name),
/// in the leader's memory like the export leases: see the protocol on
/// `VolmgrOp::CreateSnapshot`. Every change bumps a counter that
/// `ExportWatch` long polls and waiting snapshot requests wait on.
pub struct Pauses {
    pending: Mutex<BTreeMap<String, Pending>>,
    changed: watch::Sender<u64>,
}

/// One pending snapshot: its id, the lease holders it waits for, and
/// those that paused. Front ends that take a lease while it waits are
/// waited for too; once `closed` (every holder paused, the change is being
/// proposed) no more are added.
struct Pending {
    id: u64,
    holders: BTreeSet<u64>,
    paused: BTreeSet<u64>,
    closed: bool,
}

impl Default for Pauses {
    fn default() -> Self {
        Self {
            pending: Mutex::new(BTreeMap::new()),
            changed: watch::channel(0).0,
        }
    }
}

impl Pauses {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Pending>> {
        self.pending.lock().expect("pauses lock")
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes on every change after this call.
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The pending snapshot on `volume`; 0: none.
    pub fn current(&self, volume: &str) -> u64 {
        self.lock().get(volume).map_or(0, |p| p.id)
    }

    /// Registers a pending snapshot on `volume` waiting for `holders`, and
    /// answers its id; `None` if one is pending already.
    fn begin(&self, volume: &str, holders: &[u64]) -> Option<u64> {
        let id = {
            let mut pending = self.lock();
            if pending.contains_key(volume) {
                return None;
            }
            let id = loop {
                let id: u64 = rand::random();
                if id != 0 {
                    break id;
                }
            };
            pending.insert(
                volume.to_string(),
                Pending {
                    id,
                    holders: holders.iter().copied().collect(),
                    paused: BTreeSet::new(),
                    closed: false,
                },
            );
            id
        };
        self.bump();
        Some(id)
    }

    /// Front end `node` holds a lease on `volume`: a pending snapshot that
    /// still waits for front ends waits for it too.
    fn join(&self, volume: &str, node: u64) {
        if let Some(p) = self.lock().get_mut(volume) {
            if !p.closed {
                p.holders.insert(node);
            }
        }
    }

    /// Front end `node` gave up its lease on `volume` (its last client
    /// left): a pending snapshot no longer waits for it, since it has no
    /// writes to pause. (Were it to export the volume again, its new lease
    /// joins the pending snapshot while that still waits.)
    fn leave(&self, volume: &str, node: u64) {
        let left = match self.lock().get_mut(volume) {
            Some(p) if !p.closed && !p.paused.contains(&node) => p.holders.remove(&node),
            _ => false,
        };
        if left {
            self.bump();
        }
    }

    /// Every holder of snapshot `id` of `volume` paused: the change is
    /// proposed now, and no more holders are added.
    fn close(&self, volume: &str, id: u64) {
        if let Some(p) = self.lock().get_mut(volume).filter(|p| p.id == id) {
            p.closed = true;
        }
    }

    /// Front end `node` paused for snapshot `id` of `volume`; false if that
    /// snapshot is not pending (any more).
    fn paused(&self, volume: &str, node: u64, id: u64) -> bool {
        let known = match self.lock().get_mut(volume) {
            Some(p) if p.id == id => {
                p.paused.insert(node);
                true
            }
            _ => false,
        };
        if known {
            self.bump();
        }
        known
    }

    /// The holders snapshot `id` of `volume` still waits for.
    fn outstanding(&self, volume: &str, id: u64) -> Vec<u64> {
        match self.lock().get(volume) {
            Some(p) if p.id == id => p.holders.difference(&p.paused).copied().collect(),
            _ => Vec::new(),
        }
    }

    /// Ends snapshot `id` of `volume` (if it is still the pending one).
    fn end(&self, volume: &str, id: u64) {
        let mut pending = self.lock();
        if pending.get(volume).is_some_and(|p| p.id == id) {
            pending.remove(volume);
            drop(pending);
            self.bump();
        }
    }
}

/// Ends a pending snapshot when dropped, whatever way its request ends.
struct PendingGuard<'a> {
    pauses: &'a Pauses,
    volume: &'a str,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pauses.end(self.volume, self.id);
    }
}

pub struct Api {
    pub node: NodeHandle<State>,
    pub cluster_id: String,
    pub detector: SharedDetector,
    pub usage: SharedUsage,
    pub exports: Mutex<Exports>,
    /// Pending crash-consistent snapshots (leader only).
    pub pauses: Pauses,
    /// When this member last became leader (its clock, ms); export leases
    /// from before are unknown to it.
    pub led_since_ms: Arc<std::sync::atomic::AtomicU64>,
    pub heartbeat_interval: Duration,
    /// The failure detector's `down_after`: read leases are half of it.
    pub down_after: Duration,
    /// Monotonic clock origin for the detector's `now_ms`.
    pub started: std::time::Instant,
}

/// The read lease a heartbeat grants: half of the detector's `down_after`.
pub fn lease_ms(down_after: Duration) -> u32 {
    (down_after.as_millis() / 2).min(u32::MAX as u128) as u32
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn reply(status: VolmgrStatus, message: impl Into<String>) -> VolmgrResponse {
    VolmgrResponse {
        status: status as i32,
        message: message.into(),
        ..Default::default()
    }
}

fn from_node_error(e: NodeError) -> VolmgrResponse {
    match e {
        NodeError::NotLeader { leader, addr } => VolmgrResponse {
            status: VolmgrStatus::NotLeader as i32,
            message: if leader == 0 {
                "no leader is known yet; retry shortly".into()
            } else {
                format!("not the leader; member {leader} leads")
            },
            leader_id: leader,
            leader_addr: addr.unwrap_or_default(),
            ..Default::default()
        },
        NodeError::Unknown | NodeError::HandingOver { .. } => {
            reply(VolmgrStatus::Retry, e.to_string())
        }
        NodeError::Busy => reply(VolmgrStatus::Busy, e.to_string()),
        NodeError::Raft(_) | NodeError::Stopped => reply(VolmgrStatus::Internal, e.to_string()),
    }
}

fn from_state_error(e: &StateError) -> VolmgrResponse {
    from_state_response(Response {
        code: e.code() as i32,
        message: e.to_string(),
        ..Default::default()
    })
}

fn from_state_response(r: Response) -> VolmgrResponse {
    let status = match ErrorCode::try_from(r.code).unwrap_or(ErrorCode::Malformed) {
        ErrorCode::Ok => VolmgrStatus::Ok,
        ErrorCode::InvalidArgument | ErrorCode::Malformed | ErrorCode::StaleRequest => {
            VolmgrStatus::InvalidArgument
        }
        ErrorCode::AlreadyExists => VolmgrStatus::AlreadyExists,
        ErrorCode::NotFound => VolmgrStatus::NotFound,
        ErrorCode::FailedPrecondition | ErrorCode::LimitReached => VolmgrStatus::FailedPrecondition,
        ErrorCode::Unavailable => VolmgrStatus::Retry,
    };
    VolmgrResponse {
        status: status as i32,
        message: r.message,
        volume: r.volume,
        snapshot: r.snapshot,
        map_epoch: r.map_epoch,
        pr_generation: r.pr_generation,
        pr_generation_mismatch: r.pr_generation_mismatch,
        ..Default::default()
    }
}

impl Api {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn propose(&self, req: &VolmgrRequest, command: Command) -> VolmgrResponse {
        let proposal = Proposal {
            client_id: req.client_id,
            client_seq: req.client_seq,
            proposed_unix_ms: unix_ms(),
            command: Some(command),
        };
        match self.node.propose(proposal.encode_to_vec()).await {
            Ok(bytes) => match Response::decode(&bytes[..]) {
                Ok(r) => from_state_response(r),
                Err(e) => reply(
                    VolmgrStatus::Internal,
                    format!("undecodable apply result: {e}"),
                ),
            },
            Err(e) => from_node_error(e),
        }
    }

    /// [`Api::propose`], then `applied(map_epoch)` if the change was
    /// applied (for its log line).
    async fn propose_logged(
        &self,
        req: &VolmgrRequest,
        command: Command,
        applied: impl FnOnce(u64),
    ) -> VolmgrResponse {
        let r = self.propose(req, command).await;
        if r.status == VolmgrStatus::Ok as i32 {
            applied(r.map_epoch);
        }
        r
    }

    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&State) -> R + Send + 'static,
    ) -> Result<R, VolmgrResponse> {
        self.node.read(f).await.map_err(from_node_error)
    }

    async fn get_map(&self, req: &VolmgrRequest) -> VolmgrResponse {
        let wait = Duration::from_millis(req.wait_ms as u64).min(MAP_WAIT_MAX);
        let deadline = tokio::time::Instant::now() + wait;
        let mut status = self.node.status();
        loop {
            let map: ClusterMap = match self.read(|s| s.map().clone()).await {
                Ok(m) => m,
                Err(r) => return r,
            };
            if map.epoch > req.wait_newer_than || tokio::time::Instant::now() >= deadline {
                return VolmgrResponse {
                    map: Some(map),
                    ..Default::default()
                };
            }
            // Something was applied (or the leader changed): look again.
            if tokio::time::timeout_at(deadline, status.changed())
                .await
                .is_err()
            {
                continue; // deadline: answer with the current map
            }
        }
    }

    async fn cluster_status(&self) -> VolmgrResponse {
        let summary = self
            .read(|s| {
                let map = s.map();
                let up = map.nodes.iter().filter(|n| n.up).count() as u32;
                ClusterStatus {
                    map_epoch: map.epoch,
                    nodes_up: up,
                    nodes_down: map.nodes.len() as u32 - up,
                    nodes_out: map.nodes.iter().filter(|n| !n.in_).count() as u32,
                    capacity_bytes: map.nodes.iter().map(|n| n.capacity_bytes).sum(),
                    used_bytes: map.nodes.iter().map(|n| n.used_bytes).sum(),
                    volumes: s.volumes().count() as u64,
                    groups_degraded: map.degraded_groups() as u32,
                    ..Default::default()
                }
            })
            .await;
        let summary = match summary {
            Ok(x) => x,
            Err(r) => return r,
        };
        // After the read: at least as new as the state it read.
        let node = self.node.status().borrow().clone();
        VolmgrResponse {
            status_info: Some(ClusterStatus {
                leader_id: node.leader,
                term: node.term,
                members: node
                    .members
                    .iter()
                    .map(|(&id, addr)| MemberInfo {
                        id,
                        addr: addr.clone(),
                    })
                    .collect(),
                ..summary
            }),
            ..Default::default()
        }
    }

    async fn dispatch(&self, req: &VolmgrRequest, peer: SocketAddr) -> VolmgrResponse {
        let Ok(op) = VolmgrOp::try_from(req.op) else {
            return reply(
                VolmgrStatus::UnknownOp,
                format!("unknown operation {}", req.op),
            );
        };
        let changes = matches!(
            op,
            VolmgrOp::RegisterNode
                | VolmgrOp::CreateVolume
                | VolmgrOp::GrowVolume
                | VolmgrOp::DeleteVolume
                | VolmgrOp::ClaimReplica
                | VolmgrOp::CreateSnapshot
                | VolmgrOp::DeleteSnapshot
                | VolmgrOp::RollbackVolume
                | VolmgrOp::CloneVolume
                | VolmgrOp::EpochsCollected
                | VolmgrOp::FoldEpoch
                | VolmgrOp::PrSet
                | VolmgrOp::NodesOut
                | VolmgrOp::NodesIn
                | VolmgrOp::SetNodeWeight
                | VolmgrOp::RemoveNode
        );
        if changes && (req.client_id == 0 || req.client_seq == 0) {
            return reply(
                VolmgrStatus::InvalidArgument,
                "a change needs client_id and client_seq (both above 0) so a retry is applied once",
            );
        }
        let volume_key = || Some(VolumeKey::name(req.volume_name.clone()));
        match op {
            VolmgrOp::Unspecified => reply(VolmgrStatus::UnknownOp, "operation not set"),
            VolmgrOp::ClaimReplica => {
                let command = Command::ClaimReplica(ClaimReplica {
                    primary: req.node_id,
                    replicas: req.group_replicas,
                    index: req.group_index,
                    interval: req.group_interval,
                    node: req.claim_node,
                    up_since: req.claim_up_since,
                    more: req.more_claims.clone(),
                });
                self.propose_logged(req, command, |epoch| {
                    debug!(
                        primary = req.node_id,
                        group = format_args!("{}x{}", req.group_index, req.group_replicas),
                        node = req.claim_node,
                        more = req.more_claims.len(),
                        epoch,
                        "claim granted"
                    )
                })
                .await
            }
            VolmgrOp::RegisterNode => {
                let r = self
                    .propose(
                        req,
                        Command::RegisterNode(RegisterNode {
                            node_id: req.node_id,
                            addr: req.node_addr.clone(),
                            host: req.host.clone(),
                            rack: req.rack.clone(),
                            room: req.room.clone(),
                            weight: req.weight,
                            capacity_bytes: req.capacity_bytes,
                        }),
                    )
                    .await;
                let mut lease_ms = 0;
                if r.status == VolmgrStatus::Ok as i32 {
                    info!(node = req.node_id, addr = %req.node_addr, %peer, epoch = r.map_epoch, "chunk server registered");
                    // `map_epoch` is the epoch the registration made: the
                    // new incarnation is in it.
                    lease_ms = self.heartbeat(req.node_id);
                }
                VolmgrResponse {
                    heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u32,
                    lease_ms,
                    ..r
                }
            }
            VolmgrOp::Heartbeat => {
                if let Some(redirect) = self.unless_leader() {
                    return redirect;
                }
                let lease_ms = self.heartbeat(req.node_id);
                self.usage
                    .lock()
                    .expect("usage lock")
                    .insert(req.node_id, req.used_bytes);
                // After a read index: this member still leads (a deposed
                // leader grants nothing), and the epoch includes every
                // committed change, down marks of earlier terms too.
                let node_id = req.node_id;
                let (map_epoch, known) = match self
                    .read(move |s| (s.map_epoch(), s.map().node(node_id).is_some()))
                    .await
                {
                    Ok(x) => x,
                    Err(r) => return r,
                };
                VolmgrResponse {
                    heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u32,
                    lease_ms: if known { lease_ms } else { 0 },
                    map_epoch,
                    ..Default::default()
                }
            }
            VolmgrOp::GetMap => self.get_map(req).await,
            VolmgrOp::CreateVolume => {
                let extent = if req.extent_size == 0 {
                    EXTENT_SIZE_BYTES_DEFAULT
                } else {
                    req.extent_size
                };
                self.propose(
                    req,
                    Command::CreateVolume(CreateVolume {
                        name: req.volume_name.clone(),
                        size_bytes: req.size_bytes,
                        extent_size_bytes: extent,
                        replicas: req.replicas,
                        min_replicas: req.min_replicas,
                        epoch_from_counter: true,
                    }),
                )
                .await
            }
            VolmgrOp::GrowVolume => {
                self.propose(
                    req,
                    Command::GrowVolume(GrowVolume {
                        volume: volume_key(),
                        size_bytes: req.size_bytes,
                    }),
                )
                .await
            }
            VolmgrOp::DeleteVolume => {
                if !req.force {
                    if let Some(refusal) = self.exported(&req.volume_name, "delete") {
                        return refusal;
                    }
                }
                self.propose(
                    req,
                    Command::DeleteVolume(DeleteVolume {
                        volume: volume_key(),
                    }),
                )
                .await
            }
            VolmgrOp::GetVolume => {
                let name = req.volume_name.clone();
                match self.read(move |s| s.volume_by_name(&name).cloned()).await {
                    Ok(Some(v)) => VolmgrResponse {
                        exported_by: self.exports.lock().expect("exports lock").holders(
                            &v.name,
                            self.now_ms(),
                            self.lease_ms(),
                        ),
                        volume: Some(v),
                        ..Default::default()
                    },
                    Ok(None) => reply(
                        VolmgrStatus::NotFound,
                        format!("no volume named {:?}", req.volume_name),
                    ),
                    Err(r) => r,
                }
            }
            VolmgrOp::ListVolumes => {
                let limit = match req.limit {
                    0 => LIST_LIMIT_MAX,
                    n => n.min(LIST_LIMIT_MAX),
                } as usize;
                let after = req.after_name.clone();
                let page = self
                    .read(move |s| {
                        let mut page: Vec<_> =
                            s.volumes_after(&after).take(limit + 1).cloned().collect();
                        let more = page.len() > limit;
                        page.truncate(limit);
                        (page, more)
                    })
                    .await;
                match page {
                    Ok((volumes, more)) => VolmgrResponse {
                        volumes,
                        more,
                        ..Default::default()
                    },
                    Err(r) => r,
                }
            }
            VolmgrOp::ClusterStatus => self.cluster_status().await,
            VolmgrOp::RegisterExport | VolmgrOp::UnregisterExport => {
                if let Some(redirect) = self.unless_leader() {
                    return redirect;
                }
                if req.node_id == 0 || req.volume_name.is_empty() {
                    return reply(
                        VolmgrStatus::InvalidArgument,
                        "an export names its front end (node_id above 0) and its volume",
                    );
                }
                if let Some(refusal) = self.superseded(req) {
                    return refusal;
                }
                if op == VolmgrOp::RegisterExport {
                    self.renew_lease(&req.volume_name, req.node_id);
                } else {
                    self.exports
                        .lock()
                        .expect("exports lock")
                        .drop_lease(&req.volume_name, req.node_id);
                    self.pauses.leave(&req.volume_name, req.node_id);
                }
                VolmgrResponse {
                    heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u32,
                    ..Default::default()
                }
            }
            VolmgrOp::CreateSnapshot => {
                let c = CreateSnapshot {
                    volume: volume_key(),
                    name: req.snapshot_name.clone(),
                };
                let check = c.clone();
                self.paused_change(req, Command::CreateSnapshot(c), move |s| {
                    s.check_create_snapshot(&check)
                })
                .await
            }
            VolmgrOp::RollbackVolume => {
                if !req.force {
                    if let Some(refusal) = self.exported(&req.volume_name, "roll back") {
                        return refusal;
                    }
                }
                let c = RollbackVolume {
                    volume: volume_key(),
                    snapshot: req.snapshot_name.clone(),
                    keep_as: req.keep_as.clone(),
                };
                let check = c.clone();
                self.paused_change(req, Command::RollbackVolume(c), move |s| {
                    s.check_rollback(&check)
                })
                .await
            }
            VolmgrOp::DeleteSnapshot => {
                self.propose(
                    req,
                    Command::DeleteSnapshot(DeleteSnapshot {
                        volume: volume_key(),
                        name: req.snapshot_name.clone(),
                    }),
                )
                .await
            }
            VolmgrOp::CloneVolume => {
                self.propose(
                    req,
                    Command::CloneVolume(CloneVolume {
                        volume: volume_key(),
                        snapshot: req.snapshot_name.clone(),
                        name: req.new_volume_name.clone(),
                    }),
                )
                .await
            }
            VolmgrOp::EpochsCollected => {
                self.propose(
                    req,
                    Command::EpochsCollected(EpochsCollected {
                        data_id: req.data_id,
                        epochs: req.epochs.clone(),
                    }),
                )
                .await
            }
            VolmgrOp::FoldEpoch => {
                self.propose(
                    req,
                    Command::FoldEpoch(cairn_proto::volmgr::Foldable {
                        data_id: req.data_id,
                        epoch: req.epoch,
                        child: req.fold_child,
                    }),
                )
                .await
            }
            VolmgrOp::Foldable => {
                let data_id = (req.data_id != 0).then_some(req.data_id);
                match self.read(move |s| s.foldable(data_id)).await {
                    Ok(foldable) => VolmgrResponse {
                        foldable,
                        ..Default::default()
                    },
                    Err(r) => r,
                }
            }
            VolmgrOp::DeadEpochs => {
                let data_id = (req.data_id != 0).then_some(req.data_id);
                match self.read(move |s| s.dead_epochs(data_id)).await {
                    Ok(dead_epochs) => VolmgrResponse {
                        dead_epochs,
                        ..Default::default()
                    },
                    Err(r) => r,
                }
            }
            VolmgrOp::EpochChain => {
                let (data_id, epoch) = (req.data_id, req.epoch);
                match self.read(move |s| s.chain_beneath(data_id, epoch)).await {
                    Ok(Some(chain)) => VolmgrResponse {
                        chain,
                        ..Default::default()
                    },
                    Ok(None) => reply(
                        VolmgrStatus::NotFound,
                        format!(
                            "no live volume or snapshot of data id {data_id} contains epoch {epoch}"
                        ),
                    ),
                    Err(r) => r,
                }
            }
            VolmgrOp::PrGet => {
                let name = req.volume_name.clone();
                let got = self
                    .read(move |s| {
                        let v = s.volume_by_name(&name)?;
                        let (generation, state) = s.pr_state(v.id);
                        Some((generation, state.to_vec()))
                    })
                    .await;
                match got {
                    Ok(Some((pr_generation, pr_state))) => VolmgrResponse {
                        pr_generation,
                        pr_state,
                        ..Default::default()
                    },
                    Ok(None) => reply(
                        VolmgrStatus::NotFound,
                        format!("no volume named {:?}", req.volume_name),
                    ),
                    Err(r) => r,
                }
            }
            VolmgrOp::PrSet => {
                // The state refuses it too; refused here it never reaches
                // the raft log.
                if req.pr_state.len() > PR_STATE_BYTES_MAX {
                    return from_state_error(&StateError::PrStateTooLarge {
                        volume: crate::state::validate::shown(&req.volume_name),
                        bytes: req.pr_state.len(),
                        max: PR_STATE_BYTES_MAX,
                    });
                }
                // A superseded target must not change the reservations the
                // id's current process serves (nor be left out of the wait
                // for reports under that id).
                if req.node_id != 0 && self.node.status().borrow().is_leader {
                    if let Some(refusal) = self.superseded(req) {
                        return refusal;
                    }
                }
                let resp = self
                    .propose(
                        req,
                        Command::PrSet(PrSet {
                            volume: volume_key(),
                            expect_generation: req.pr_expect_generation,
                            state: req.pr_state.clone(),
                        }),
                    )
                    .await;
                if resp.status == VolmgrStatus::Ok as i32 {
                    self.await_pr_reports(&req.volume_name, req.node_id, resp.pr_generation)
                        .await;
                }
                resp
            }
            VolmgrOp::NodesOut | VolmgrOp::NodesIn => {
                let ids = NodeIds {
                    node_ids: req.node_ids.clone(),
                    // An admin's judgement: unconditional (see `NodeIds`).
                    seen_epoch: 0,
                };
                let (command, mark) = if op == VolmgrOp::NodesOut {
                    (Command::MarkOut(ids), "out")
                } else {
                    (Command::MarkIn(ids), "in")
                };
                self.propose_logged(req, command, |epoch| {
                    info!(nodes = ?req.node_ids, epoch, "chunk server(s) marked {mark} by an admin")
                })
                .await
            }
            VolmgrOp::SetNodeWeight => {
                let command = Command::SetWeight(SetWeight {
                    node_id: req.node_id,
                    weight: req.weight,
                });
                self.propose_logged(req, command, |epoch| {
                    info!(
                        node = req.node_id,
                        weight = req.weight,
                        epoch,
                        "chunk server weight set by an admin"
                    )
                })
                .await
            }
            VolmgrOp::RemoveNode => {
                let command = Command::RemoveNode(RemoveNode {
                    node_id: req.node_id,
                });
                self.propose_logged(req, command, |epoch| {
                    info!(
                        node = req.node_id,
                        epoch, "chunk server removed from the map by an admin"
                    )
                })
                .await
            }
            VolmgrOp::ExportWatch => self.export_watch(req).await,
            VolmgrOp::SnapshotPaused => {
                if let Some(redirect) = self.unless_leader() {
                    return redirect;
                }
                if req.node_id == 0 || req.volume_name.is_empty() || req.pending_snapshot == 0 {
                    return reply(
                        VolmgrStatus::InvalidArgument,
                        "SnapshotPaused names its front end (node_id above 0), the volume and \
                         the pending snapshot (above 0)",
                    );
                }
                if let Some(refusal) = self.superseded(req) {
                    return refusal;
                }
                if !self
                    .pauses
                    .paused(&req.volume_name, req.node_id, req.pending_snapshot)
                {
                    return reply(
                        VolmgrStatus::FailedPrecondition,
                        format!(
                            "volume {:?}: snapshot {:#x} is not pending (it was taken or timed \
                             out); resume writing at the volume's head epoch",
                            req.volume_name, req.pending_snapshot
                        ),
                    );
                }
                self.renew_lease(&req.volume_name, req.node_id);
                debug!(volume = %req.volume_name, front_end = req.node_id, pending = format_args!("{:#x}", req.pending_snapshot), "front end paused for a snapshot");
                VolmgrResponse {
                    pending_snapshot: req.pending_snapshot,
                    ..Default::default()
                }
            }
            VolmgrOp::AddMember | VolmgrOp::RemoveMember => {
                if req.member_id == 0 {
                    return reply(VolmgrStatus::InvalidArgument, "member_id must be above 0");
                }
                let addr = if op == VolmgrOp::AddMember {
                    match req.member_addr.parse::<SocketAddr>() {
                        Ok(a) => Some(a.to_string()),
                        Err(e) => {
                            return reply(
                                VolmgrStatus::InvalidArgument,
                                format!("member_addr {:?}: {e}", req.member_addr),
                            )
                        }
                    }
                } else {
                    None
                };
                match self.node.change_member(req.member_id, addr).await {
                    Ok(()) => VolmgrResponse::default(),
                    Err(e) => from_node_error(e),
                }
            }
        }
    }

    /// For requests only the leader's memory can answer (heartbeats, export
    /// leases): the redirect, unless this member leads.
    fn unless_leader(&self) -> Option<VolmgrResponse> {
        let status = self.node.status().borrow().clone();
        (!status.is_leader).then(|| {
            from_node_error(NodeError::NotLeader {
                leader: status.leader,
                addr: status.leader_addr(),
            })
        })
    }

    /// A lease lasts three renewal intervals.
    fn lease_ms(&self) -> u64 {
        3 * self.heartbeat_interval.as_millis() as u64
    }

    /// A change that must be crash-consistent for the volume's front ends
    /// (a snapshot, a forced rollback): proposed at once when no front end
    /// holds a lease on the volume, otherwise after every holder paused its
    /// writes (the protocol on `VolmgrOp::CreateSnapshot`). `check` says,
    /// without applying it, whether the state would refuse the change: no
    /// one is paused for a change that would be refused.
    async fn paused_change(
        &self,
        req: &VolmgrRequest,
        command: Command,
        check: impl FnOnce(&State) -> Result<(), StateError> + Send + 'static,
    ) -> VolmgrResponse {
        if let Some(redirect) = self.unless_leader() {
            return redirect;
        }
        let volume = req.volume_name.as_str();
        let holders = self.exports.lock().expect("exports lock").holders(
            volume,
            self.now_ms(),
            self.lease_ms(),
        );
        if holders.is_empty() {
            if let Some(retry) = self.leases_unknown() {
                return retry;
            }
            return self.propose(req, command).await;
        }
        let (client_id, client_seq) = (req.client_id, req.client_seq);
        let checked = self
            .read(move |s| {
                if s.is_recorded(client_id, client_seq) {
                    return Ok(true);
                }
                check(s).map(|()| false)
            })
            .await;
        match checked {
            // A retry of a change already applied: its recorded answer.
            Ok(Ok(true)) => return self.propose(req, command).await,
            Ok(Ok(false)) => {}
            Ok(Err(e)) => return from_state_error(&e),
            Err(r) => return r,
        }
        let Some(id) = self.pauses.begin(volume, &holders) else {
            return reply(
                VolmgrStatus::Busy,
                format!("a snapshot of volume {volume:?} is being taken; retry"),
            );
        };
        let mut changed = self.pauses.subscribe();
        let guard = PendingGuard {
            pauses: &self.pauses,
            volume,
            id,
        };
        let started = tokio::time::Instant::now();
        let timeout = match req.pause_timeout_ms {
            0 => PAUSE_TIMEOUT_DEFAULT,
            ms => Duration::from_millis(u64::from(ms)).min(PAUSE_TIMEOUT_MAX),
        };
        debug!(
            volume,
            pending = format_args!("{id:#x}"),
            ?holders,
            "asking front ends to pause"
        );
        loop {
            let waiting = self.pauses.outstanding(volume, id);
            if waiting.is_empty() {
                break;
            }
            if started.elapsed() >= timeout {
                info!(
                    volume,
                    ?waiting,
                    "front ends did not pause for a snapshot in time"
                );
                return reply(
                    VolmgrStatus::FailedPrecondition,
                    format!(
                        "volume {volume:?}: front end(s) {waiting:?} did not pause their writes \
                         within {} ms, so no crash-consistent snapshot could be taken and \
                         nothing changed; retry, or check those targets",
                        timeout.as_millis()
                    ),
                );
            }
            let _ = tokio::time::timeout_at(started + timeout, changed.changed()).await;
        }
        self.pauses.close(volume, id);
        let mut r = self.propose(req, command).await;
        // Applied (or failed): the watchers may go on, and see the new head.
        drop(guard);
        // Rounded up: 0 means nobody paused.
        r.pause_ms = (started.elapsed().as_micros() as u64).div_ceil(1000).max(1);
        info!(
            volume,
            pause_ms = r.pause_ms,
            status = r.status,
            "front ends paused for a snapshot"
        );
        r
    }

    /// `ExportWatch`: see `VolmgrOp::ExportWatch`.
    async fn export_watch(&self, req: &VolmgrRequest) -> VolmgrResponse {
        if let Some(redirect) = self.unless_leader() {
            return redirect;
        }
        if req.node_id == 0 || req.volume_name.is_empty() {
            return reply(
                VolmgrStatus::InvalidArgument,
                "an export watch names its front end (node_id above 0) and its volume",
            );
        }
        if let Some(refusal) = self.superseded(req) {
            return refusal;
        }
        let wait = Duration::from_millis(u64::from(req.wait_ms)).min(WATCH_WAIT_MAX);
        let deadline = tokio::time::Instant::now() + wait;
        let mut applied = self.node.status();
        let mut pauses = self.pauses.subscribe();
        let mut first = true;
        loop {
            // The pending snapshot first, then the record: a snapshot ends
            // only after its change is applied, so a record read after
            // seeing none pending shows the head the front end may write.
            let pending = self.pauses.current(&req.volume_name);
            let name = req.volume_name.clone();
            let read = self.read(move |s| {
                let v = s.volume_by_name(&name)?;
                Some((v.clone(), s.pr_generation(v.id)))
            });
            let (volume, pr_generation) = match read.await {
                Ok(Some(x)) => x,
                Ok(None) => {
                    return reply(
                        VolmgrStatus::NotFound,
                        format!("no volume named {:?}", req.volume_name),
                    )
                }
                Err(r) => return r,
            };
            if first {
                self.renew_lease(&req.volume_name, req.node_id);
                if let Some(g) = req.known_pr_generation {
                    self.exports.lock().expect("exports lock").pr_report(
                        &req.volume_name,
                        req.node_id,
                        g,
                    );
                }
                first = false;
            } else {
                let held = self.exports.lock().expect("exports lock").refresh(
                    &req.volume_name,
                    req.node_id,
                    self.now_ms(),
                );
                if held {
                    self.pauses.join(&req.volume_name, req.node_id);
                }
            }
            if self.pauses.current(&req.volume_name) != pending {
                continue; // moved while reading: look again
            }
            let now = tokio::time::Instant::now();
            // While the snapshot the front end waits out is still pending,
            // a new head is that snapshot's own change: the pending ends
            // right after it, and is what the front end waits for.
            let head_moved = volume.head_epoch != req.known_head_epoch && pending == 0;
            // A reservation changed through another front end (a PREEMPT):
            // answer at once rather than at the next renewal, so every front
            // end fences the preempted initiators within a round trip.
            let pr_moved = req.known_pr_generation.is_some_and(|g| pr_generation > g);
            if head_moved || pr_moved || pending != req.pending_snapshot || now >= deadline {
                return VolmgrResponse {
                    volume: Some(volume),
                    pending_snapshot: pending,
                    heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u32,
                    pr_generation,
                    ..Default::default()
                };
            }
            // Wake for a change, and at least once per heartbeat interval
            // to renew the lease.
            let wake = deadline.min(now + self.heartbeat_interval);
            tokio::select! {
                r = applied.changed() => {
                    if r.is_err() {
                        tokio::time::sleep_until(wake).await;
                    }
                }
                _ = pauses.changed() => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// For a front end's lease requests, after the leader check: the
    /// refusal if another process has taken over its id.
    fn superseded(&self, req: &VolmgrRequest) -> Option<VolmgrResponse> {
        let claimed = self
            .exports
            .lock()
            .expect("exports lock")
            .claim_instance(req.node_id, req.front_end_instance);
        claimed
            .err()
            .map(|why| reply(VolmgrStatus::FailedPrecondition, why))
    }

    /// Renews front end `node`'s export lease on `volume`; a snapshot of
    /// the volume still waiting for its front ends waits for this one too.
    fn renew_lease(&self, volume: &str, node: u64) {
        self.exports
            .lock()
            .expect("exports lock")
            .renew(volume, node, self.now_ms());
        self.pauses.join(volume, node);
    }

    /// Returns once every front end exporting `volume`, other than `from`
    /// (the one that made the change), holds PR generation `generation`
    /// (its export watch said so) or has lost its lease (a front end whose
    /// lease lapsed stops serving reserved volumes: `target/src/exports.rs`).
    /// So a PREEMPT fences the preempted initiators on every front end
    /// before it completes. A leader elected less than a lease period ago
    /// waits that out first: it does not know every lease yet. A front end
    /// that renews without ever reporting (one older than the report) is
    /// waited for one lease period; one that reports, while it renews, up
    /// to `PAUSE_TIMEOUT_MAX` (it reports with its next renewal, so only a
    /// stuck one takes that long), and is then named in a warning.
    async fn await_pr_reports(&self, volume: &str, from: u64, generation: u64) {
        let lease = self.lease_ms();
        let led_since = self.led_since_ms.load(std::sync::atomic::Ordering::SeqCst);
        let start = self.now_ms();
        let silent_until =
            (start + lease + self.heartbeat_interval.as_millis() as u64).max(led_since + lease);
        let until = silent_until.max(start + PAUSE_TIMEOUT_MAX.as_millis() as u64);
        loop {
            let now = self.now_ms();
            let ((mut behind, silent), reported) = {
                let e = self.exports.lock().expect("exports lock");
                (
                    e.pr_behind(volume, from, generation, now, lease),
                    e.pr_reported.clone(),
                )
            };
            if now < silent_until {
                behind.extend(silent);
            }
            if behind.is_empty() && now >= led_since + lease {
                return;
            }
            if now >= until {
                warn!(
                    volume,
                    generation,
                    front_ends = ?behind,
                    "persistent reservation change answered before these front ends reported holding it"
                );
                return;
            }
            let notified = reported.notified();
            let nap = Duration::from_millis((until - now).min(50));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// A leader elected less than a lease period ago has not seen every
    /// export lease yet: `Retry` then.
    fn leases_unknown(&self) -> Option<VolmgrResponse> {
        let led_since = self.led_since_ms.load(std::sync::atomic::Ordering::SeqCst);
        (self.now_ms() < led_since + self.lease_ms()).then(|| {
            reply(
                VolmgrStatus::Retry,
                "the volume manager leader just changed and does not know every export yet; retry",
            )
        })
    }

    /// Why `volume` may not be changed by `action` ("delete", "roll
    /// back") now, if it may not: a front end exports it.
    fn exported(&self, volume: &str, action: &str) -> Option<VolmgrResponse> {
        let now = self.now_ms();
        let holders =
            self.exports
                .lock()
                .expect("exports lock")
                .holders(volume, now, self.lease_ms());
        if !holders.is_empty() {
            return Some(reply(
                VolmgrStatus::FailedPrecondition,
                format!(
                    "volume {volume:?} is exported by front end(s) {holders:?}: disconnect its clients first, \
                     or {action} with --force"
                ),
            ));
        }
        // A new leader has not seen every lease yet: wait one lease period.
        self.leases_unknown()
    }

    /// Tells the detector `node_id` is alive, and answers the read lease to
    /// grant it in milliseconds (0: none).
    ///
    /// The lease is half of `down_after`. The chunk server counts it from
    /// when it *sent* the request, the detector counts silence from when it
    /// *received* the last one, so the lease ends at least `down_after / 2`
    /// before the node can be proposed down. Nodes taken down along with
    /// another after only `down_after` minus one heartbeat interval of
    /// silence are still past their lease: the configuration requires the
    /// interval to be at most `down_after / 2`. No lease while this
    /// detector's proposal to mark the node down is in flight: that change
    /// could apply after the epoch the reply carries. (Proposals of earlier
    /// terms are covered by the heartbeat's read index, see `dispatch`.)
    fn heartbeat(&self, node_id: u64) -> u32 {
        let now = self.now_ms();
        let mut detector = self.detector.lock().expect("detector lock");
        if let Some(d) = detector.as_mut() {
            d.heartbeat(node_id, now);
            if !d.may_lease(node_id) {
                return 0;
            }
        }
        lease_ms(self.down_after)
    }
}

impl Handler for Api {
    async fn handle(
        self: Arc<Self>,
        header: Vec<u8>,
        _data: Vec<u8>,
        peer: SocketAddr,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut resp = match VolmgrRequest::decode(&header[..]) {
            Err(e) => reply(
                VolmgrStatus::InvalidArgument,
                format!("undecodable request header: {e}"),
            ),
            Ok(req) if !req.cluster_id.is_empty() && req.cluster_id != self.cluster_id => {
                VolmgrResponse {
                    request_id: req.request_id,
                    ..reply(
                        VolmgrStatus::InvalidArgument,
                        format!(
                            "this is cluster {:?}, not {:?}",
                            self.cluster_id, req.cluster_id
                        ),
                    )
                }
            }
            Ok(req) => {
                let mut r = self.dispatch(&req, peer).await;
                r.request_id = req.request_id;
                if r.status != VolmgrStatus::Ok as i32 {
                    debug!(%peer, op = req.op, status = r.status, "{}", r.message);
                }
                r
            }
        };
        if resp.leader_id == 0 {
            let s = self.node.status().borrow().clone();
            resp.leader_id = s.leader;
            resp.leader_addr = s.leader_addr().unwrap_or_default();
        }
        (resp.encode_to_vec(), Vec::new())
    }
}
