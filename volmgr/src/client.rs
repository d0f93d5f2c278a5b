//! A client of the volume manager, for the CLI, chunk servers, the volume
//! client and tests.
//!
//! It knows the members' addresses, talks to the leader, follows `NotLeader`
//! redirects, and retries across leader changes and lost connections until a
//! deadline. Every change it sends carries this client's id and a sequence
//! number that a retry repeats, so the state machine applies it exactly once
//! (a create retried after the leader died answers with the original
//! result, never "already exists").
//!
//! Calls on one client take turns on one connection; a long poll
//! ([`VolmgrClient::get_map`] with a wait) holds it for the wait, so give
//! periodic work such as heartbeats a client of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_proto::frame_io::{read_header, read_prefix, write_frame};
use cairn_proto::map::{ClusterMap, SnapshotInfo, VolumeInfo};
use cairn_proto::volmgr::{
    ClusterStatus, DataEpochs, Foldable, GroupClaim, VolmgrOp, VolmgrRequest, VolmgrResponse,
    VolmgrStatus,
};
use prost::Message as _;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::server::FRAME_DATA_BYTES_MAX;

/// Default time a request may take, retries included.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(15);
/// Pause before retrying when no leader is known.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one member may take to answer, beyond the time the request
/// itself asks the leader to wait ([`leader_wait`]), before the client
/// gives up on it and asks the next. A leader answers in milliseconds (a
/// raft commit and its fsync); one that says nothing for this long is
/// frozen or cut off, and the other members elect a new one in about as
/// long. Without it, a stalled leader held every call for the whole
/// deadline: a front end's export lease lapsed and its writes waited 16 s.
/// Giving up is safe: changes carry this client's id and sequence, so one
/// the old leader did apply is not applied twice.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// What went wrong, with the member's message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The request was refused: `status` and the server's explanation.
    #[error("{message} ({status:?})")]
    Refused {
        status: VolmgrStatus,
        message: String,
    },
    /// No member answered usefully before the deadline.
    #[error("no volume manager leader answered within {waited:?} (tried {members}); last problem: {last}")]
    Unavailable {
        waited: Duration,
        members: String,
        last: String,
    },
    /// [`VolmgrClient::pr_set`] refused (`FailedPrecondition`): the
    /// volume's persistent reservation generation is `current`, not
    /// `expected`; another front end changed the state since it was read.
    /// Read it again ([`VolmgrClient::pr_get`]), redo the change on it, set
    /// again. `message` is the server's, naming the volume and both.
    #[error("{message} (FailedPrecondition)")]
    PrGenerationMismatch {
        volume: String,
        expected: u64,
        current: u64,
        message: String,
    },
}

impl ClientError {
    pub fn status(&self) -> Option<VolmgrStatus> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            ClientError::PrGenerationMismatch { .. } => Some(VolmgrStatus::FailedPrecondition),
            ClientError::Unavailable { .. } => None,
        }
    }

    /// For a [`pr_set`](VolmgrClient::pr_set) refused because the stored
    /// generation is not the expected one: the stored generation. `None`
    /// for every other error.
    pub fn pr_generation_mismatch(&self) -> Option<u64> {
        match self {
            ClientError::PrGenerationMismatch { current, .. } => Some(*current),
            _ => None,
        }
    }
}

/// What a heartbeat answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// The read lease granted, in ms from when the heartbeat was sent; 0:
    /// none.
    pub lease_ms: u32,
    /// The leader's map epoch when it granted the lease.
    pub map_epoch: u64,
    /// How often the leader wants heartbeats, ms.
    pub interval_ms: u32,
}

/// What a snapshot, rollback or clone answers.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotReply {
    /// The volume after the change; for a clone, the new volume.
    pub volume: VolumeInfo,
    /// The snapshot taken; for a rollback the one the previous head was
    /// kept as; for a clone the source snapshot.
    pub snapshot: SnapshotInfo,
    /// How long the front ends exporting the volume had their writes
    /// paused, ms; 0 when none exported it (or for a clone).
    pub pause_ms: u64,
}

impl SnapshotReply {
    fn from(resp: VolmgrResponse) -> Self {
        Self {
            volume: resp.volume.unwrap_or_default(),
            snapshot: resp.snapshot.unwrap_or_default(),
            pause_ms: resp.pause_ms,
        }
    }
}

/// What an export watch answers (see `VolmgrOp::ExportWatch`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExportWatchReply {
    /// The volume's record as the leader has it now.
    pub volume: Option<VolumeInfo>,
    /// The volume's pending snapshot; 0: none.
    pub pending: u64,
    /// The volume's persistent reservation generation (see
    /// [`VolmgrClient::pr_set`]); one other than the front end holds means
    /// another front end changed the state: reload it
    /// ([`VolmgrClient::pr_get`]).
    pub pr_generation: u64,
}

pub struct VolmgrClient {
    members: Vec<String>,
    cluster_id: String,
    client_id: u64,
    next_seq: AtomicU64,
    next_request: AtomicU64,
    deadline: Duration,
    /// Sent with every request (see `VolmgrRequest::front_end_instance`).
    front_end_instance: u64,
    conn: Mutex<Conn>,
}

/// Which member is believed to lead, and a connection to it.
struct Conn {
    /// The members given, plus leaders learnt from redirects.
    members: Vec<String>,
    idx: usize,
    stream: Option<BufReader<TcpStream>>,
}

impl VolmgrClient {
    /// `members`: every member's address (any order); `cluster_id` is checked
    /// by the server. The client id is random per client.
    pub fn new(members: Vec<String>, cluster_id: impl Into<String>) -> Self {
        let client_id = loop {
            let id: u64 = rand::random();
            if id != 0 {
                break id;
            }
        };
        Self {
            members: members.clone(),
            cluster_id: cluster_id.into(),
            client_id,
            next_seq: AtomicU64::new(1),
            next_request: AtomicU64::new(1),
            deadline: REQUEST_DEADLINE,
            front_end_instance: 0,
            conn: Mutex::new(Conn {
                members,
                idx: 0,
                stream: None,
            }),
        }
    }

    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Marks this client's requests as made by front end process
    /// `instance` (random per process, the same on all its clients): the
    /// leader then refuses the export leases of a process another with the
    /// same front end id has superseded.
    pub fn with_front_end_instance(mut self, instance: u64) -> Self {
        self.front_end_instance = instance;
        self
    }

    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    fn request(&self, op: VolmgrOp) -> VolmgrRequest {
        VolmgrRequest {
            op: op as i32,
            cluster_id: self.cluster_id.clone(),
            client_id: self.client_id,
            front_end_instance: self.front_end_instance,
            ..Default::default()
        }
    }

    fn change(&self, op: VolmgrOp) -> VolmgrRequest {
        VolmgrRequest {
            client_seq: self.next_seq.fetch_add(1, Ordering::SeqCst),
            ..self.request(op)
        }
    }

    /// Sends `req` to the leader, retrying until it answers or the deadline.
    /// Any status but `Ok` is an error.
    pub async fn call(&self, req: VolmgrRequest) -> Result<VolmgrResponse, ClientError> {
        let resp = self.send(req).await?;
        match VolmgrStatus::try_from(resp.status).unwrap_or(VolmgrStatus::Internal) {
            VolmgrStatus::Ok => Ok(resp),
            status => Err(ClientError::Refused {
                status,
                message: resp.message,
            }),
        }
    }

    /// [`call`](Self::call), answering a refusal (any status but the
    /// redirects and retries it follows) as the reply it was, for callers
    /// that read more of it than the status and message.
    async fn send(&self, mut req: VolmgrRequest) -> Result<VolmgrResponse, ClientError> {
        let start = Instant::now();
        let mut last = String::from("nothing tried");
        let mut conn = self.conn.lock().await;
        while start.elapsed() < self.deadline {
            let idx = conn.idx % conn.members.len().max(1);
            let addr = conn.members.get(idx).cloned().unwrap_or_default();
            if conn.stream.is_none() {
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        conn.stream = Some(BufReader::new(s));
                    }
                    Ok(Err(e)) => {
                        last = format!("{addr}: {e}");
                        conn.idx = idx + 1;
                        tokio::time::sleep(RETRY_PAUSE).await;
                        continue;
                    }
                    Err(_) => {
                        last = format!("{addr}: connect timed out");
                        conn.idx = idx + 1;
                        continue;
                    }
                }
            }
            req.request_id = self.next_request.fetch_add(1, Ordering::SeqCst);
            let stream = conn.stream.as_mut().expect("connected above");
            let remaining = self.deadline.saturating_sub(start.elapsed()) + Duration::from_secs(1);
            let attempt = (ATTEMPT_TIMEOUT + leader_wait(&req)).min(remaining);
            let resp = match tokio::time::timeout(attempt, exchange(stream, &req)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    last = format!("{addr}: {e}");
                    conn.stream = None;
                    conn.idx = idx + 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
                Err(_) => {
                    last = format!("{addr}: no answer within {attempt:?}");
                    conn.stream = None;
                    conn.idx = idx + 1;
                    continue;
                }
            };
            let status = VolmgrStatus::try_from(resp.status).unwrap_or(VolmgrStatus::Internal);
            match status {
                VolmgrStatus::NotLeader => {
                    last = format!("{addr}: {}", resp.message);
                    conn.stream = None;
                    if resp.leader_addr.is_empty() {
                        conn.idx = idx + 1;
                        tokio::time::sleep(RETRY_PAUSE).await;
                    } else {
                        // A leader this client was not told about (added
                        // since) is remembered like the others.
                        conn.idx = match conn.members.iter().position(|m| *m == resp.leader_addr) {
                            Some(i) => i,
                            None => {
                                conn.members.push(resp.leader_addr.clone());
                                conn.members.len() - 1
                            }
                        };
                    }
                }
                VolmgrStatus::Retry | VolmgrStatus::Busy => {
                    last = format!("{addr}: {}", resp.message);
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                _ => return Ok(resp),
            }
        }
        Err(ClientError::Unavailable {
            waited: start.elapsed(),
            members: self.members.join(", "),
            last,
        })
    }

    pub async fn create_volume(
        &self,
        name: &str,
        size_bytes: u64,
        extent_size: u32,
        replicas: u32,
        min_replicas: u32,
    ) -> Result<VolumeInfo, ClientError> {
        let req = VolmgrRequest {
            volume_name: name.into(),
            size_bytes,
            extent_size,
            replicas,
            min_replicas,
            ..self.change(VolmgrOp::CreateVolume)
        };
        Ok(self.call(req).await?.volume.unwrap_or_default())
    }

    pub async fn grow_volume(
        &self,
        name: &str,
        size_bytes: u64,
    ) -> Result<VolumeInfo, ClientError> {
        let req = VolmgrRequest {
            volume_name: name.into(),
            size_bytes,
            ..self.change(VolmgrOp::GrowVolume)
        };
        Ok(self.call(req).await?.volume.unwrap_or_default())
    }

    /// Deletes `name`; refused while a front end exports it unless `force`.
    pub async fn delete_volume(&self, name: &str, force: bool) -> Result<(), ClientError> {
        let req = VolmgrRequest {
            volume_name: name.into(),
            force,
            ..self.change(VolmgrOp::DeleteVolume)
        };
        self.call(req).await.map(|_| ())
    }

    /// Takes snapshot `name` of `volume`. While front ends export the
    /// volume they are asked to pause their writes first (see
    /// `VolmgrOp::CreateSnapshot`), for at most `pause_timeout`
    /// (`Duration::ZERO`: the server's 5 s); if one does not, the answer is
    /// `FailedPrecondition` naming it and nothing was taken.
    pub async fn create_snapshot(
        &self,
        volume: &str,
        name: &str,
        pause_timeout: Duration,
    ) -> Result<SnapshotReply, ClientError> {
        let req = VolmgrRequest {
            volume_name: volume.into(),
            snapshot_name: name.into(),
            pause_timeout_ms: pause_timeout.as_millis().min(u32::MAX as u128) as u32,
            ..self.change(VolmgrOp::CreateSnapshot)
        };
        Ok(SnapshotReply::from(self.call(req).await?))
    }

    /// The snapshots of `volume`, oldest first.
    pub async fn list_snapshots(&self, volume: &str) -> Result<Vec<SnapshotInfo>, ClientError> {
        Ok(self.get_volume(volume).await?.snapshots)
    }

    /// Deletes snapshot `name` of `volume`; answers it as it was. Clones of
    /// it keep working.
    pub async fn delete_snapshot(
        &self,
        volume: &str,
        name: &str,
    ) -> Result<SnapshotInfo, ClientError> {
        let req = VolmgrRequest {
            volume_name: volume.into(),
            snapshot_name: name.into(),
            ..self.change(VolmgrOp::DeleteSnapshot)
        };
        Ok(self.call(req).await?.snapshot.unwrap_or_default())
    }

    /// Rolls `volume` back to snapshot `snapshot`, keeping the current head
    /// as snapshot `keep_as` (empty: `before-rollback-<snapshot>-<n>`).
    /// Refused while a front end exports the volume unless `force` (then
    /// the front ends pause as for a snapshot, and drop their clients).
    /// The reply's `snapshot` is the kept head.
    pub async fn rollback_volume(
        &self,
        volume: &str,
        snapshot: &str,
        keep_as: &str,
        force: bool,
    ) -> Result<SnapshotReply, ClientError> {
        let req = VolmgrRequest {
            volume_name: volume.into(),
            snapshot_name: snapshot.into(),
            keep_as: keep_as.into(),
            force,
            ..self.change(VolmgrOp::RollbackVolume)
        };
        Ok(SnapshotReply::from(self.call(req).await?))
    }

    /// Creates volume `new_name` from snapshot `snapshot` of `volume`. The
    /// reply's `volume` is the clone, its `snapshot` the source snapshot.
    pub async fn clone_volume(
        &self,
        volume: &str,
        snapshot: &str,
        new_name: &str,
    ) -> Result<SnapshotReply, ClientError> {
        let req = VolmgrRequest {
            volume_name: volume.into(),
            snapshot_name: snapshot.into(),
            new_volume_name: new_name.into(),
            ..self.change(VolmgrOp::CloneVolume)
        };
        Ok(SnapshotReply::from(self.call(req).await?))
    }

    /// For the garbage collector: the dead epochs of `data_id` (`None`:
    /// of every data id), per data id, ascending.
    pub async fn dead_epochs(&self, data_id: Option<u64>) -> Result<Vec<DataEpochs>, ClientError> {
        let req = VolmgrRequest {
            data_id: data_id.unwrap_or(0),
            ..self.request(VolmgrOp::DeadEpochs)
        };
        Ok(self.call(req).await?.dead_epochs)
    }

    /// For the collector: hidden epochs with one child, which a copy-up and
    /// a [`fold_epoch`](Self::fold_epoch) free (`None`: of every data id).
    pub async fn foldable(&self, data_id: Option<u64>) -> Result<Vec<Foldable>, ClientError> {
        let req = VolmgrRequest {
            data_id: data_id.unwrap_or(0),
            ..self.request(VolmgrOp::Foldable)
        };
        Ok(self.call(req).await?.foldable)
    }

    /// Drops hidden epoch `epoch` of `data_id` from every chain, once every
    /// block it holds was copied up into `child` and flushed. Refused
    /// (`FailedPrecondition`) unless it is still foldable into `child`.
    pub async fn fold_epoch(
        &self,
        data_id: u64,
        epoch: u64,
        child: u64,
    ) -> Result<(), ClientError> {
        let req = VolmgrRequest {
            data_id,
            epoch,
            fold_child: child,
            ..self.change(VolmgrOp::FoldEpoch)
        };
        self.call(req).await.map(|_| ())
    }

    /// The collector deleted every version of `epochs` under `data_id`:
    /// the volume manager forgets them. Refused (`FailedPrecondition`) if
    /// one is still referenced.
    pub async fn epochs_collected(&self, data_id: u64, epochs: &[u64]) -> Result<(), ClientError> {
        let req = VolmgrRequest {
            data_id,
            epochs: epochs.to_vec(),
            ..self.change(VolmgrOp::EpochsCollected)
        };
        self.call(req).await.map(|_| ())
    }

    /// The frozen epochs beneath `epoch` of `data_id`, newest first;
    /// `NotFound` if no live volume or snapshot contains the epoch.
    pub async fn epoch_chain(&self, data_id: u64, epoch: u64) -> Result<Vec<u64>, ClientError> {
        let req = VolmgrRequest {
            data_id,
            epoch,
            ..self.request(VolmgrOp::EpochChain)
        };
        Ok(self.call(req).await?.chain)
    }

    /// A front end's long poll on `volume`, which it exports as
    /// `front_end`: renews the export lease, and answers as soon as the
    /// volume's pending snapshot is not `pending` (0: none), or none is
    /// pending and its head epoch is not `known_head_epoch`, or after
    /// `wait` (at most 30 s; keep it below this client's deadline). See
    /// `VolmgrOp::CreateSnapshot` for what to do with a pending snapshot.
    pub async fn export_watch(
        &self,
        front_end: u64,
        volume: &str,
        known_head_epoch: u64,
        pending: u64,
        wait: Duration,
    ) -> Result<ExportWatchReply, ClientError> {
        self.watch(front_end, volume, known_head_epoch, None, pending, wait)
            .await
    }

    /// [`export_watch`](Self::export_watch) that also answers as soon as
    /// the volume's PR generation is newer than `known_pr_generation`: how a
    /// front end hears of a reservation changed through another one (a
    /// PREEMPT fencing an initiator) within a round trip, not a renewal.
    pub async fn export_watch_pr(
        &self,
        front_end: u64,
        volume: &str,
        known_head_epoch: u64,
        known_pr_generation: u64,
        pending: u64,
        wait: Duration,
    ) -> Result<ExportWatchReply, ClientError> {
        let known_pr = Some(known_pr_generation);
        self.watch(front_end, volume, known_head_epoch, known_pr, pending, wait)
            .await
    }

    async fn watch(
        &self,
        front_end: u64,
        volume: &str,
        known_head_epoch: u64,
        known_pr_generation: Option<u64>,
        pending: u64,
        wait: Duration,
    ) -> Result<ExportWatchReply, ClientError> {
        let req = VolmgrRequest {
            node_id: front_end,
            volume_name: volume.into(),
            known_head_epoch,
            known_pr_generation,
            pending_snapshot: pending,
            wait_ms: wait.as_millis().min(u32::MAX as u128) as u32,
            ..self.request(VolmgrOp::ExportWatch)
        };
        let resp = self.call(req).await?;
        Ok(ExportWatchReply {
            volume: resp.volume,
            pending: resp.pending_snapshot,
            pr_generation: resp.pr_generation,
        })
    }

    /// The SCSI persistent reservation state the front ends keep for
    /// `volume` (see `VolmgrOp::PrGet`): its generation and its bytes,
    /// `(0, [])` while none was ever stored. A linearizable read. Refused
    /// (`NotFound`) for an unknown volume.
    pub async fn pr_get(&self, volume: &str) -> Result<(u64, Vec<u8>), ClientError> {
        let req = VolmgrRequest {
            volume_name: volume.into(),
            ..self.request(VolmgrOp::PrGet)
        };
        let resp = self.call(req).await?;
        Ok((resp.pr_generation, resp.pr_state))
    }

    /// Stores `state` as `volume`'s persistent reservation state if its
    /// generation is still `expect_generation` (what [`pr_get`](Self::pr_get)
    /// answered; 0 while none was stored), and answers the new generation,
    /// `expect_generation + 1`. Exactly once, like every change: a retry
    /// after a lost reply answers the same generation.
    ///
    /// Refused with [`ClientError::PrGenerationMismatch`] (status
    /// `FailedPrecondition`; [`ClientError::pr_generation_mismatch`] gives
    /// the stored generation) when another front end changed the state
    /// since: read it again and redo the change. `InvalidArgument` above
    /// `cairn_proto::volmgr::PR_STATE_BYTES_MAX` (64 KiB), `NotFound` for
    /// an unknown volume. Nothing changes when refused.
    ///
    /// Answered once every front end exporting the volume holds the new
    /// generation (or lost its export lease); see
    /// [`pr_set_as`](Self::pr_set_as) for a front end's own change.
    pub async fn pr_set(
        &self,
        volume: &str,
        expect_generation: u64,
        state: Vec<u8>,
    ) -> Result<u64, ClientError> {
        self.pr_set_as(0, volume, expect_generation, state).await
    }

    /// [`pr_set`](Self::pr_set) by front end `front_end` (its export lease
    /// id), which is not waited for: it holds the new state already.
    pub async fn pr_set_as(
        &self,
        front_end: u64,
        volume: &str,
        expect_generation: u64,
        state: Vec<u8>,
    ) -> Result<u64, ClientError> {
        let req = VolmgrRequest {
            node_id: front_end,
            volume_name: volume.into(),
            pr_expect_generation: expect_generation,
            pr_state: state,
            ..self.change(VolmgrOp::PrSet)
        };
        let resp = self.send(req).await?;
        match VolmgrStatus::try_from(resp.status).unwrap_or(VolmgrStatus::Internal) {
            VolmgrStatus::Ok => Ok(resp.pr_generation),
            VolmgrStatus::FailedPrecondition if resp.pr_generation_mismatch => {
                Err(ClientError::PrGenerationMismatch {
                    volume: volume.into(),
                    expected: expect_generation,
                    current: resp.pr_generation,
                    message: resp.message,
                })
            }
            status => Err(ClientError::Refused {
                status,
                message: resp.message,
            }),
        }
    }

    /// Front end `front_end` paused its writes to `volume` for pending
    /// snapshot `pending`. `FailedPrecondition` if that snapshot is no
    /// longer pending: resume.
    pub async fn snapshot_paused(
        &self,
        front_end: u64,
        volume: &str,
        pending: u64,
    ) -> Result<(), ClientError> {
        let req = VolmgrRequest {
            node_id: front_end,
            volume_name: volume.into(),
            pending_snapshot: pending,
            ..self.request(VolmgrOp::SnapshotPaused)
        };
        self.call(req).await.map(|_| ())
    }

    /// Renews front end `target`'s lease on exporting `volume`. Answers how
    /// often the leader wants it renewed (the lease lasts three of these).
    pub async fn register_export(
        &self,
        target: u64,
        volume: &str,
    ) -> Result<Duration, ClientError> {
        let req = VolmgrRequest {
            node_id: target,
            volume_name: volume.into(),
            ..self.request(VolmgrOp::RegisterExport)
        };
        let resp = self.call(req).await?;
        Ok(Duration::from_millis(resp.heartbeat_interval_ms as u64))
    }

    pub async fn unregister_export(&self, target: u64, volume: &str) -> Result<(), ClientError> {
        let req = VolmgrRequest {
            node_id: target,
            volume_name: volume.into(),
            ..self.request(VolmgrOp::UnregisterExport)
        };
        self.call(req).await.map(|_| ())
    }

    /// The front ends exporting `name` now.
    pub async fn volume_exports(&self, name: &str) -> Result<Vec<u64>, ClientError> {
        let req = VolmgrRequest {
            volume_name: name.into(),
            ..self.request(VolmgrOp::GetVolume)
        };
        Ok(self.call(req).await?.exported_by)
    }

    pub async fn get_volume(&self, name: &str) -> Result<VolumeInfo, ClientError> {
        let req = VolmgrRequest {
            volume_name: name.into(),
            ..self.request(VolmgrOp::GetVolume)
        };
        Ok(self.call(req).await?.volume.unwrap_or_default())
    }

    /// Every volume, in name order (pages through the list).
    pub async fn list_volumes(&self) -> Result<Vec<VolumeInfo>, ClientError> {
        let mut out: Vec<VolumeInfo> = Vec::new();
        loop {
            let req = VolmgrRequest {
                after_name: out.last().map(|v| v.name.clone()).unwrap_or_default(),
                ..self.request(VolmgrOp::ListVolumes)
            };
            let resp = self.call(req).await?;
            out.extend(resp.volumes);
            if !resp.more {
                return Ok(out);
            }
        }
    }

    /// The map; with `wait_newer_than` above 0, waits up to `wait` for an
    /// epoch above it.
    pub async fn get_map(
        &self,
        wait_newer_than: u64,
        wait: Duration,
    ) -> Result<ClusterMap, ClientError> {
        let req = VolmgrRequest {
            wait_newer_than,
            wait_ms: wait.as_millis().min(u32::MAX as u128) as u32,
            ..self.request(VolmgrOp::GetMap)
        };
        Ok(self.call(req).await?.map.unwrap_or_default())
    }

    /// Takes chunk servers out of placement (drains them; see
    /// `VolmgrOp::NodesOut`). Answers the map epoch of the change (the
    /// current one if every node was out already).
    pub async fn nodes_out(&self, node_ids: &[u64]) -> Result<u64, ClientError> {
        let req = VolmgrRequest {
            node_ids: node_ids.to_vec(),
            ..self.change(VolmgrOp::NodesOut)
        };
        Ok(self.call(req).await?.map_epoch)
    }

    /// Puts chunk servers back into placement (`VolmgrOp::NodesIn`).
    pub async fn nodes_in(&self, node_ids: &[u64]) -> Result<u64, ClientError> {
        let req = VolmgrRequest {
            node_ids: node_ids.to_vec(),
            ..self.change(VolmgrOp::NodesIn)
        };
        Ok(self.call(req).await?.map_epoch)
    }

    /// Sets a chunk server's placement weight (`VolmgrOp::SetNodeWeight`).
    pub async fn set_node_weight(&self, node_id: u64, weight: u32) -> Result<u64, ClientError> {
        let req = VolmgrRequest {
            node_id,
            weight,
            ..self.change(VolmgrOp::SetNodeWeight)
        };
        Ok(self.call(req).await?.map_epoch)
    }

    /// Drops a chunk server that is out, down and in no acting set from the
    /// map (`VolmgrOp::RemoveNode`).
    pub async fn remove_node(&self, node_id: u64) -> Result<u64, ClientError> {
        let req = VolmgrRequest {
            node_id,
            ..self.change(VolmgrOp::RemoveNode)
        };
        Ok(self.call(req).await?.map_epoch)
    }

    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        Ok(self
            .call(self.request(VolmgrOp::ClusterStatus))
            .await?
            .status_info
            .unwrap_or_default())
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn register_node(
        &self,
        node_id: u64,
        addr: &str,
        host: &str,
        rack: &str,
        room: &str,
        weight: u32,
        capacity_bytes: u64,
    ) -> Result<VolmgrResponse, ClientError> {
        let req = VolmgrRequest {
            node_id,
            node_addr: addr.into(),
            host: host.into(),
            rack: rack.into(),
            room: room.into(),
            weight,
            capacity_bytes,
            ..self.change(VolmgrOp::RegisterNode)
        };
        self.call(req).await
    }

    pub async fn heartbeat(&self, node_id: u64, used_bytes: u64) -> Result<(), ClientError> {
        self.heartbeat_lease(node_id, used_bytes).await.map(|_| ())
    }

    /// A heartbeat, answered with the read lease the leader grants. The
    /// lease runs from when the request was *sent*: take the time before
    /// calling. It is only good with a map at least as new as the reply's
    /// `map_epoch`.
    pub async fn heartbeat_lease(
        &self,
        node_id: u64,
        used_bytes: u64,
    ) -> Result<HeartbeatReply, ClientError> {
        let req = VolmgrRequest {
            node_id,
            used_bytes,
            ..self.request(VolmgrOp::Heartbeat)
        };
        let resp = self.call(req).await?;
        Ok(HeartbeatReply {
            lease_ms: resp.lease_ms,
            map_epoch: resp.map_epoch,
            interval_ms: resp.heartbeat_interval_ms,
        })
    }

    /// `primary` claims that `node` (as incarnation `up_since`) holds every
    /// write of group `index`x`replicas` as of `interval`, and may join its
    /// acting set. Returns the map epoch after the claim (the one that
    /// granted it, or a later one if an earlier copy was granted). A refusal
    /// (the map moved on: start over from the newest map) is
    /// `ClientError::Refused` with `VolmgrStatus::FailedPrecondition` and
    /// the reason.
    pub async fn claim_replica(
        &self,
        primary: u64,
        replicas: u32,
        index: u32,
        interval: u64,
        node: u64,
        up_since: u64,
    ) -> Result<u64, ClientError> {
        let claim = GroupClaim {
            replicas,
            index,
            interval,
            node,
            up_since,
        };
        self.claim_replicas(primary, &[claim]).await
    }

    /// Claims `claims` (at least one) for `primary` in one request, granted
    /// at one epoch. Ok if any was granted or already acting (the rest are
    /// skipped: claim them again from a newer map); refused, with the first
    /// reason, if none was.
    pub async fn claim_replicas(
        &self,
        primary: u64,
        claims: &[GroupClaim],
    ) -> Result<u64, ClientError> {
        let Some((first, more)) = claims.split_first() else {
            return Ok(0);
        };
        let req = VolmgrRequest {
            node_id: primary,
            group_replicas: first.replicas,
            group_index: first.index,
            group_interval: first.interval,
            claim_node: first.node,
            claim_up_since: first.up_since,
            more_claims: more.to_vec(),
            ..self.change(VolmgrOp::ClaimReplica)
        };
        Ok(self.call(req).await?.map_epoch)
    }

    pub async fn add_member(&self, id: u64, addr: &str) -> Result<(), ClientError> {
        let req = VolmgrRequest {
            member_id: id,
            member_addr: addr.into(),
            ..self.request(VolmgrOp::AddMember)
        };
        self.call(req).await.map(|_| ())
    }

    pub async fn remove_member(&self, id: u64) -> Result<(), ClientError> {
        let req = VolmgrRequest {
            member_id: id,
            ..self.request(VolmgrOp::RemoveMember)
        };
        self.call(req).await.map(|_| ())
    }
}

/// How long the leader may rightly take over `req` on purpose: a long poll's
/// `wait_ms`, a snapshot's pause of the front ends, a reservation change's
/// wait for every front end to report it (`crate::api`).
fn leader_wait(req: &VolmgrRequest) -> Duration {
    use crate::api::{PAUSE_TIMEOUT_DEFAULT, PAUSE_TIMEOUT_MAX};
    let long_poll = Duration::from_millis(u64::from(req.wait_ms));
    let op = VolmgrOp::try_from(req.op).ok();
    let own = match op {
        Some(VolmgrOp::CreateSnapshot) => match req.pause_timeout_ms {
            0 => PAUSE_TIMEOUT_DEFAULT,
            ms => Duration::from_millis(u64::from(ms)).min(PAUSE_TIMEOUT_MAX),
        },
        Some(VolmgrOp::PrSet) => PAUSE_TIMEOUT_MAX,
        _ => Duration::ZERO,
    };
    long_poll.max(own)
}

async fn exchange(
    stream: &mut BufReader<TcpStream>,
    req: &VolmgrRequest,
) -> Result<VolmgrResponse, String> {
    write_frame(stream.get_mut(), &req.encode_to_vec(), &[])
        .await
        .map_err(|e| e.to_string())?;
    stream.get_mut().flush().await.map_err(|e| e.to_string())?;
    let prefix = read_prefix(stream, FRAME_DATA_BYTES_MAX)
        .await
        .map_err(|e| e.to_string())?;
    let header = read_header(stream, &prefix)
        .await
        .map_err(|e| e.to_string())?;
    if prefix.data_bytes > 0 {
        let mut skip = vec![0u8; prefix.data_bytes as usize];
        cairn_proto::frame_io::read_part(stream, &mut skip, "frame data")
            .await
            .map_err(|e| e.to_string())?;
    }
    let resp =
        VolmgrResponse::decode(&header[..]).map_err(|e| format!("undecodable reply: {e}"))?;
    if resp.request_id != req.request_id {
        return Err(format!(
            "reply to request {} while waiting for {}",
            resp.request_id, req.request_id
        ));
    }
    Ok(resp)
}
