//! [`Cluster`]: what all volumes of a process share: the client id and
//! request ids, the cached cluster map (kept fresh by a background long
//! poll), the connection pool; and the loop that takes one request to its
//! group's primary and retries it until it is done.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cairn_group::msg::{ClientOp, ClientRequest, WriteOp};
use cairn_group::{GroupKey, GroupMap, NodeId};
use cairn_proto::chunk::{ChunkRequest, ChunkResponse, Op, Status};
use cairn_proto::group::{decode_refusal, encode_request};
use cairn_proto::groupmap::group_map;
use cairn_proto::map::{ClusterMap, VolumeInfo};
use cairn_volmgr::client::VolmgrClient;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::chunk::ChunkError;
use crate::error::ClientError;
use crate::ids::{IdGuard, Ids};
use crate::pool::Pool;
use crate::retry::{on_refusal, on_status, Action, Backoff, IO_RETRIES};
use crate::volume::Volume;

/// How long one map long poll waits at the volume manager.
const MAP_LONG_POLL: Duration = Duration::from_secs(10);
/// Pause after the volume manager failed to answer a map poll.
const MAP_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// How the volume client reaches the cluster and how patient it is.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Volume manager addresses (any member; redirects are followed).
    pub volmgr: Vec<String>,
    /// The cluster id the volume manager checks.
    pub cluster_id: String,
    /// How long one operation may keep retrying (no primary, degraded
    /// group, node unreachable) before it fails.
    pub io_timeout: Duration,
    /// One attempt at one chunk server (connect and reply); then the client
    /// looks for a newer map and retries.
    pub attempt_timeout: Duration,
    /// Connections per chunk server.
    pub conns_per_node: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            volmgr: Vec::new(),
            cluster_id: String::new(),
            io_timeout: Duration::from_secs(120),
            attempt_timeout: Duration::from_secs(5),
            conns_per_node: 2,
        }
    }
}

impl ClientConfig {
    /// The defaults, with the volume manager's members and the cluster id.
    pub fn new(volmgr: Vec<String>, cluster_id: impl Into<String>) -> Self {
        ClientConfig {
            volmgr,
            cluster_id: cluster_id.into(),
            ..Default::default()
        }
    }
}

/// One map epoch, with the group view built once.
pub(crate) struct MapSnap {
    pub(crate) map: ClusterMap,
    pub(crate) groups: GroupMap,
}

impl MapSnap {
    fn new(map: ClusterMap) -> MapSnap {
        MapSnap {
            groups: group_map(&map),
            map,
        }
    }

    fn epoch(&self) -> u64 {
        self.map.epoch
    }
}

type MapCell = watch::Sender<Arc<MapSnap>>;

/// Swaps `map` in if it is newer than the cached one; closes connections to
/// nodes that left the map.
fn install(cell: &MapCell, pool: &Pool, map: ClusterMap) -> bool {
    let epoch = map.epoch;
    if epoch <= cell.borrow().epoch() {
        return false;
    }
    let snap = Arc::new(MapSnap::new(map));
    let installed = cell.send_if_modified(|cur| {
        if snap.epoch() > cur.epoch() {
            *cur = snap.clone();
            true
        } else {
            false
        }
    });
    if installed {
        debug!(epoch, "volume client installed a new cluster map");
        pool.retain(|addr| snap.map.nodes.iter().any(|n| n.addr == addr));
    }
    installed
}

/// The connection to a cluster, shared by every volume of a process.
pub struct Cluster {
    cfg: ClientConfig,
    client_id: u64,
    pub(crate) ids: Arc<Ids>,
    map: Arc<MapCell>,
    /// Wakes the map watcher when it is pausing after an error.
    refresh: Arc<Notify>,
    /// For volumes and direct map fetches (the watcher has its own client:
    /// a long poll holds its connection).
    volmgr: Option<VolmgrClient>,
    /// One direct map fetch at a time.
    fetching: tokio::sync::Mutex<()>,
    pub(crate) pool: Arc<Pool>,
    /// The last primary seen per group, to warn once per failover.
    primaries: Mutex<HashMap<GroupKey, Option<NodeId>>>,
    watcher: Option<JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(w) = &self.watcher {
            w.abort();
        }
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("client_id", &self.client_id)
            .field("map_epoch", &self.map_epoch())
            .field("volmgr", &self.cfg.volmgr)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Fetches the cluster map from the volume manager and starts a
    /// background task that keeps it current (it stops when the Cluster is
    /// dropped). Needs a tokio runtime.
    pub async fn connect(cfg: ClientConfig) -> Result<Arc<Cluster>, ClientError> {
        if cfg.volmgr.is_empty() {
            return Err(ClientError::Unavailable(
                "no volume manager address configured".into(),
            ));
        }
        let members = cfg.volmgr.join(", ");
        let volmgr = VolmgrClient::new(cfg.volmgr.clone(), cfg.cluster_id.clone());
        let map =
            volmgr
                .get_map(0, Duration::ZERO)
                .await
                .map_err(|source| ClientError::Volmgr {
                    context: format!("fetching the cluster map from {members}"),
                    source,
                })?;
        let watch_client = VolmgrClient::new(cfg.volmgr.clone(), cfg.cluster_id.clone());
        let mut cluster = Cluster::build(cfg, map, Some(volmgr));
        cluster.watcher = Some(tokio::spawn(watch_map(
            watch_client,
            cluster.map.clone(),
            cluster.pool.clone(),
            cluster.refresh.clone(),
        )));
        info!(
            client_id = cluster.client_id,
            epoch = cluster.map_epoch(),
            "volume client connected to cluster"
        );
        Ok(Arc::new(cluster))
    }

    /// A Cluster on a map given by the caller, without a volume manager:
    /// for tests and tools. The map changes only through
    /// [`set_map`](Self::set_map); volumes are opened with
    /// [`volume`](Self::volume).
    pub fn with_static_map(cfg: ClientConfig, map: ClusterMap) -> Arc<Cluster> {
        Arc::new(Cluster::build(cfg, map, None))
    }

    fn build(cfg: ClientConfig, map: ClusterMap, volmgr: Option<VolmgrClient>) -> Cluster {
        let client_id = loop {
            let id: u64 = rand::random();
            if id != 0 {
                break id;
            }
        };
        let (tx, _) = watch::channel(Arc::new(MapSnap::new(map)));
        Cluster {
            pool: Arc::new(Pool::new(cfg.conns_per_node, cfg.attempt_timeout)),
            cfg,
            client_id,
            ids: Arc::new(Ids::default()),
            map: Arc::new(tx),
            refresh: Arc::new(Notify::new()),
            volmgr,
            fetching: tokio::sync::Mutex::new(()),
            primaries: Mutex::new(HashMap::new()),
            watcher: None,
        }
    }

    /// Looks the volume up at the volume manager and opens it.
    pub async fn open_volume(self: &Arc<Self>, name: &str) -> Result<Volume, ClientError> {
        let Some(volmgr) = &self.volmgr else {
            return Err(ClientError::Unavailable(format!(
                "cannot look up volume {name}: this client has no volume manager \
                 (use Cluster::volume with a VolumeInfo)"
            )));
        };
        let info = volmgr
            .get_volume(name)
            .await
            .map_err(|source| ClientError::Volmgr {
                context: format!("looking up volume {name}"),
                source,
            })?;
        self.volume(info)
    }

    /// Opens a volume from its catalogue record.
    pub fn volume(self: &Arc<Self>, info: VolumeInfo) -> Result<Volume, ClientError> {
        Volume::new(self.clone(), info)
    }

    /// The cached map's epoch.
    pub fn map_epoch(&self) -> u64 {
        self.map.borrow().epoch()
    }

    /// The cached cluster map.
    pub fn cluster_map(&self) -> ClusterMap {
        self.map.borrow().map.clone()
    }

    /// Installs `map` if it is newer than the cached one (tools and tests;
    /// a connected Cluster's watcher does this itself). Returns whether it
    /// was installed.
    pub fn set_map(&self, map: ClusterMap) -> bool {
        install(&self.map, &self.pool, map)
    }

    /// This process's client id, random per Cluster.
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// The smallest request id in flight (or the next one).
    pub fn oldest_outstanding(&self) -> u64 {
        self.ids.oldest_outstanding()
    }

    pub(crate) fn snapshot(&self) -> Arc<MapSnap> {
        self.map.borrow().clone()
    }

    /// Waits until the cached map's epoch is at least `want`, at most
    /// `limit`. With `fetch`, also asks the volume manager directly (the map
    /// is known to exist). Returns whether the epoch was reached.
    async fn wait_for_epoch(&self, want: u64, limit: Duration, fetch: bool) -> bool {
        if self.map_epoch() >= want {
            return true;
        }
        let deadline = Instant::now() + limit;
        self.refresh.notify_one();
        if fetch {
            if let (Some(volmgr), Ok(_one)) = (&self.volmgr, self.fetching.try_lock()) {
                if self.map_epoch() < want {
                    match tokio::time::timeout_at(deadline, volmgr.get_map(0, Duration::ZERO)).await
                    {
                        Ok(Ok(map)) => {
                            install(&self.map, &self.pool, map);
                        }
                        Ok(Err(e)) => debug!("direct map fetch failed: {e}"),
                        Err(_) => debug!("direct map fetch timed out"),
                    }
                }
            }
        }
        let mut rx = self.map.subscribe();
        let reached = matches!(
            tokio::time::timeout_at(deadline, rx.wait_for(|s| s.epoch() >= want)).await,
            Ok(Ok(_))
        );
        reached
    }

    /// Remembers the group's primary; warns when it moved (once per move,
    /// not per request).
    fn note_primary(&self, key: GroupKey, primary: Option<NodeId>, epoch: u64) {
        let mut seen = self.primaries.lock().unwrap_or_else(|p| p.into_inner());
        let before = seen.insert(key, primary);
        match (before, primary) {
            (Some(Some(old)), Some(new)) if old != new => {
                warn!("{key}: primary moved from node {old} to node {new} at map epoch {epoch}")
            }
            (Some(Some(old)), None) => warn!(
                "{key}: no primary at map epoch {epoch} (node {old} down); waiting for a newer map"
            ),
            (Some(None), Some(new)) => {
                warn!("{key}: node {new} is primary at map epoch {epoch}")
            }
            (None, None) => warn!(
                "{key}: no primary at map epoch {epoch} (first acting replica down); \
                 waiting for a newer map"
            ),
            _ => {}
        }
    }

    /// One attempt at one chunk server.
    async fn attempt(
        &self,
        addr: &str,
        req: ChunkRequest,
        data: Bytes,
        limit: Duration,
    ) -> Result<(ChunkResponse, Bytes), AttemptError> {
        let call = async {
            let conn = self.pool.get(addr).await.map_err(AttemptError::Transport)?;
            conn.call(req, data).await.map_err(|e| match e {
                ChunkError::InvalidRequest { reason, .. } => AttemptError::Invalid(reason),
                ChunkError::Protocol { reason, .. } => {
                    AttemptError::Transport(format!("bad reply: {reason}"))
                }
                e => AttemptError::Transport(e.to_string()),
            })
        };
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r,
            Err(_) => Err(AttemptError::Transport(format!(
                "no reply within {limit:?}"
            ))),
        }
    }

    /// Takes one request to its group's primary and retries it (with the
    /// same id) until it is done, refused for good, or `io_timeout` passes.
    /// `key` is given for a flush; otherwise it is the extent's group.
    /// Returns the group and a read's data.
    pub(crate) async fn run(
        &self,
        vol: &VolumeInfo,
        op: ClientOp,
        key: Option<GroupKey>,
    ) -> Result<(GroupKey, Bytes), ClientError> {
        let start = Instant::now();
        let deadline = start + self.cfg.io_timeout;
        let is_write = matches!(
            op,
            ClientOp::Write { .. } | ClientOp::CompareAndWrite { .. }
        );
        let id = IdGuard::begin(&self.ids, is_write);
        let extent = op.extent().map(|e| e.index);
        // An attempt went out before: a compare-and-write retried after it
        // may find its own write (see below).
        let mut sent_before = false;
        let mut refusal_backoff = Backoff::refusals();
        let mut unreachable_backoff = Backoff::unreachable();
        let mut io_refusals = 0u32;
        let mut degraded: Option<(u32, u32)> = None;
        let mut last_key = key;
        let mut last = String::from("not tried");
        loop {
            let now = Instant::now();
            if now >= deadline {
                let op = describe(vol, &op);
                return Err(match (degraded, last_key) {
                    (Some((acting, min)), Some(group)) => ClientError::Degraded {
                        volume: vol.name.clone(),
                        op,
                        group,
                        acting,
                        min,
                        waited: now - start,
                    },
                    _ => ClientError::TimedOut {
                        volume: vol.name.clone(),
                        op,
                        group: last_key,
                        waited: now - start,
                        last,
                    },
                });
            }
            let remaining = deadline - now;
            let snap = self.snapshot();
            let epoch = snap.epoch();
            let key = match key.or_else(|| {
                let index = extent?;
                let g =
                    cairn_placement::group_of(vol.data_volume_id(), index, snap.map.group_count)
                        .ok()?;
                Some(GroupKey {
                    replicas: vol.replicas,
                    index: g,
                })
            }) {
                Some(k) => k,
                None => {
                    last = format!(
                        "map epoch {epoch} has no valid group count ({})",
                        snap.map.group_count
                    );
                    debug!(volume = %vol.name, id = id.id(), "retrying: {last}");
                    self.wait_for_epoch(epoch + 1, remaining.min(self.cfg.attempt_timeout), false)
                        .await;
                    continue;
                }
            };
            last_key = Some(key);
            let primary = snap.groups.primary(key);
            self.note_primary(key, primary, epoch);
            let Some((node, addr)) =
                primary.and_then(|n| snap.map.node(n).map(|info| (n, info.addr.clone())))
            else {
                last = format!("{key} has no primary at map epoch {epoch}");
                debug!(volume = %vol.name, id = id.id(), "retrying: {last}");
                self.wait_for_epoch(epoch + 1, remaining.min(self.cfg.attempt_timeout), false)
                    .await;
                continue;
            };
            let (oldest_outstanding, abandoned) = self.ids.header();
            let req = ClientRequest {
                client: self.client_id,
                id: id.id(),
                oldest_outstanding,
                abandoned,
                epoch,
                key,
                min_replicas: vol.min_replicas,
                op: op.clone(),
            };
            let (header, data) = encode_request(&req, vol.extent_size_bytes);
            let chunk_req = ChunkRequest {
                op: Op::Group as i32,
                group: Some(header),
                ..Default::default()
            };
            let limit = remaining.min(self.cfg.attempt_timeout);
            let action = match self.attempt(&addr, chunk_req, data, limit).await {
                Err(AttemptError::Invalid(reason)) => {
                    return Err(ClientError::Protocol {
                        volume: vol.name.clone(),
                        op: describe(vol, &op),
                        group: key,
                        node: addr,
                        reason,
                    })
                }
                Err(AttemptError::Transport(reason)) => Action::Transport(reason),
                Ok((resp, data)) => match Status::try_from(resp.status) {
                    Ok(Status::Ok) => {
                        // A read answers its length; a compare-and-write
                        // nothing, or the bytes it found.
                        let want = match &op {
                            ClientOp::Read { len, .. } => Some(*len),
                            ClientOp::CompareAndWrite { data: new, .. } if !data.is_empty() => {
                                Some(new.len() as u64)
                            }
                            _ => None,
                        };
                        if let Some(want) = want.filter(|w| *w != data.len() as u64) {
                            return Err(ClientError::Protocol {
                                volume: vol.name.clone(),
                                op: describe(vol, &op),
                                group: key,
                                node: addr,
                                reason: format!(
                                    "{want} bytes expected, answered with {}",
                                    data.len()
                                ),
                            });
                        }
                        if let ClientOp::CompareAndWrite { data: new, .. } = &op {
                            // An earlier attempt wrote, but its answer was
                            // lost and the retry reached a primary that had
                            // not seen it (a failover): the range then holds
                            // exactly our bytes. Its compare succeeded.
                            if sent_before && data == *new {
                                id.finish(sent_before);
                                return Ok((key, Bytes::new()));
                            }
                        }
                        id.finish(sent_before);
                        return Ok((key, data));
                    }
                    Ok(Status::Refused) => {
                        on_refusal(decode_refusal(&resp.refusal.unwrap_or_default()))
                    }
                    Ok(status) => match on_status(status, &resp.message) {
                        Action::Fail => {
                            return Err(ClientError::Server {
                                volume: vol.name.clone(),
                                op: describe(vol, &op),
                                group: key,
                                node: addr,
                                status,
                                message: resp.message,
                            })
                        }
                        a => a,
                    },
                    Err(_) => {
                        return Err(ClientError::Protocol {
                            volume: vol.name.clone(),
                            op: describe(vol, &op),
                            group: key,
                            node: addr,
                            reason: format!("unknown status {} ({})", resp.status, resp.message),
                        })
                    }
                },
            };
            sent_before = true;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if !matches!(action, Action::Degraded { .. }) {
                degraded = None;
            }
            match action {
                Action::WaitForEpoch(current) => {
                    last =
                        format!("node {node} ({addr}) knows map epoch {current}, ours is {epoch}");
                    debug!(volume = %vol.name, id = id.id(), %key, "retrying: {last}");
                    if self.map_epoch() >= current {
                        // The node is no newer than us; it will catch up.
                        tokio::time::sleep(refusal_backoff.next_delay().min(remaining)).await;
                    } else if !self
                        .wait_for_epoch(current, remaining.min(self.cfg.attempt_timeout), true)
                        .await
                    {
                        debug!(volume = %vol.name, id = id.id(), %key,
                            "map epoch {current} did not arrive; retrying anyway");
                    }
                }
                Action::Backoff => {
                    last = format!("node {node} ({addr}) is busy");
                    debug!(volume = %vol.name, id = id.id(), %key, "retrying: {last}");
                    tokio::time::sleep(refusal_backoff.next_delay().min(remaining)).await;
                }
                Action::Degraded { acting, min } => {
                    degraded = Some((acting, min));
                    last = format!("{acting} replica(s) acting, {min} required");
                    debug!(volume = %vol.name, id = id.id(), %key, "retrying: {last}");
                    tokio::time::sleep(refusal_backoff.next_delay().min(remaining)).await;
                }
                Action::Io(message) => {
                    io_refusals += 1;
                    if io_refusals > IO_RETRIES {
                        return Err(ClientError::Io {
                            volume: vol.name.clone(),
                            op: describe(vol, &op),
                            group: key,
                            node: addr,
                            message,
                        });
                    }
                    last = format!("disk error at node {node} ({addr}): {message}");
                    debug!(volume = %vol.name, id = id.id(), %key, "retrying: {last}");
                    tokio::time::sleep(refusal_backoff.next_delay().min(remaining)).await;
                }
                Action::Transport(reason) => {
                    last = format!("chunk server {addr} (node {node}): {reason}");
                    debug!(volume = %vol.name, id = id.id(), %key, "retrying: {last}");
                    self.wait_for_epoch(
                        epoch + 1,
                        unreachable_backoff.next_delay().min(remaining),
                        false,
                    )
                    .await;
                    continue;
                }
                Action::Fail => unreachable!("handled above"),
            }
            unreachable_backoff.reset();
        }
    }
}

enum AttemptError {
    /// Disconnected, unreachable, timed out: retry elsewhere or later.
    Transport(String),
    /// The request cannot be sent at all.
    Invalid(String),
}

/// "write of 4096 bytes at offset 8192 (extent 0 offset 8192)", for errors.
pub(crate) fn describe(vol: &VolumeInfo, op: &ClientOp) -> String {
    let at = |index: u64, offset: u64| {
        format!(
            "at offset {} (extent {index} offset {offset})",
            index * vol.extent_size_bytes as u64 + offset
        )
    };
    match op {
        ClientOp::Write { ext, op, fua } => {
            let fua = if *fua { " (FUA)" } else { "" };
            match op {
                WriteOp::Data { offset, data } => {
                    format!(
                        "write of {} bytes {}{fua}",
                        data.len(),
                        at(ext.index, *offset)
                    )
                }
                WriteOp::Zero { offset, len } => {
                    format!("zeroing of {len} bytes {}{fua}", at(ext.index, *offset))
                }
                WriteOp::Materialize { offset, len } => {
                    format!(
                        "copy-up of {len} bytes {} into epoch {}",
                        at(ext.index, *offset),
                        ext.epoch
                    )
                }
            }
        }
        ClientOp::Read { ext, offset, len } => {
            format!("read of {len} bytes {}", at(ext.index, *offset))
        }
        ClientOp::CompareAndWrite {
            ext,
            offset,
            data,
            fua,
            ..
        } => {
            let fua = if *fua { " (FUA)" } else { "" };
            format!(
                "compare-and-write of {} bytes {}{fua}",
                data.len(),
                at(ext.index, *offset)
            )
        }
        ClientOp::Scrub { ext, offset, len } => {
            format!("scrub of {len} bytes {}", at(ext.index, *offset))
        }
        ClientOp::Flush => "flush".to_string(),
    }
}

/// Keeps the cached map current: long polls for a newer epoch, installs it.
async fn watch_map(
    volmgr: VolmgrClient,
    cell: Arc<MapCell>,
    pool: Arc<Pool>,
    refresh: Arc<Notify>,
) {
    let mut failing = false;
    loop {
        let epoch = cell.borrow().epoch();
        match volmgr.get_map(epoch, MAP_LONG_POLL).await {
            Ok(map) => {
                if failing {
                    info!("volume manager answers map polls again");
                    failing = false;
                }
                let newer = map.epoch;
                if install(&cell, &pool, map) {
                    debug!(from = epoch, to = newer, "cluster map changed");
                } else if epoch == 0 {
                    // No map yet: the poll does not wait for one.
                    tokio::select! {
                        _ = tokio::time::sleep(MAP_RETRY_PAUSE) => {}
                        _ = refresh.notified() => {}
                    }
                }
            }
            Err(e) => {
                if failing {
                    debug!("cluster map poll failed again: {e}");
                } else {
                    warn!("cluster map poll failed (keeping map epoch {epoch}): {e}");
                    failing = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(MAP_RETRY_PAUSE) => {}
                    _ = refresh.notified() => {}
                }
            }
        }
    }
}
