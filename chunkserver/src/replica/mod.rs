//! The chunk server's side of replication: drives the group protocol core
//! (`cairn_group::node::Node`, which holds every rule) with real inputs and
//! carries out what it asks.
//!
//! ```text
//!  RPC server ──Op::Group──► ┐                      ┌─► peers.rs: one TCP link per peer (Op::Peer frames)
//!  RPC server ──Op::Peer───► │                      ├─► store (one tokio task per disk operation)
//!  map watcher (volmgr) ───► ├─► driver task: Node ─┼─► journal.rs (appended before the disk op starts)
//!  heartbeats (leases) ────► │    one owner,        ├─► volume manager: claims
//!  disk completions ───────► ┘    one thread        └─► replies to waiting RPC requests
//! ```
//!
//! One task owns the core, so the core needs no locks (crucible's habit:
//! one owner, select then apply). It takes every input that is ready, then
//! carries out the core's outputs in order: journal records are written
//! (page cache) before any disk operation, message or reply that follows
//! them.
//!
//! Maps reach the core only once this process has registered (a new
//! incarnation) and only from the registration's epoch on: an older map
//! would show this node's previous incarnation, whose in-memory state died
//! with the old process.

pub mod chains;
pub mod journal;
mod peers;

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cairn_group::msg::{ClientRequest, Part, Peer, PeerMsg, Refusal};
use cairn_group::node::{Config as CoreConfig, DiskDone, DiskReq, Node, OpId, Output, Trace};
use cairn_group::{ExtentId, GroupMap, NodeId};
use cairn_proto::map::ClusterMap;
use cairn_proto::volmgr::GroupClaim;
use cairn_volmgr::client::VolmgrClient;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::{debug, info, warn};

use crate::store::{ExtentKey, IoBuf, Store};
use chains::Chains;
use journal::Journal;
use peers::Peers;

/// What a client request comes back with: data for a read, nothing for a
/// write or flush, or the protocol's refusal.
pub type ClientResult = Result<Option<Bytes>, Refusal>;

/// Inputs queued for the driver before senders wait (client requests) or
/// drop (peer messages, which the protocol resends).
const INPUT_QUEUE: usize = 16_384;
/// The core's timers run at this resolution.
const TICK: Duration = Duration::from_millis(50);
/// The tick while the core is settled (no timer can fire until an input
/// arrives, which brings the fast tick back): an idle server wakes once a
/// second instead of twenty times.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// Largest single store read when copying a whole extent for a push.
const EXTENT_READ_PIECE: u32 = 4 << 20;
/// The map watcher's long poll; well inside the volume manager client's
/// deadline (10 s, `registration.rs`), so a quiet map is not an error.
const MAP_POLL_WAIT: Duration = Duration::from_secs(5);
/// Pause after a failed map fetch.
const MAP_RETRY: Duration = Duration::from_millis(500);

enum Input {
    Client {
        req: ClientRequest,
        extent_bytes: u32,
        reply: oneshot::Sender<ClientResult>,
    },
    Peer {
        msg: Peer,
        extent_bytes: u32,
    },
    Map(Box<(Arc<ClusterMap>, GroupMap)>),
    Lease {
        until: u64,
        map_epoch: u64,
    },
    Disk {
        id: OpId,
        done: DiskDone,
        /// The extent size of a volume, learned from the store (pushes of
        /// ranges name it; a new primary may not have seen the volume yet).
        size: Option<(u64, u32)>,
    },
}

/// A handle to the driver; cheap to clone.
#[derive(Clone)]
pub struct Replication {
    tx: mpsc::Sender<Input>,
    start: Instant,
    /// Peer messages dropped because the driver's queue was full.
    dropped: Arc<AtomicU64>,
    /// Wakes the map watcher early (the core saw a newer epoch named).
    need_map: Arc<Notify>,
}

/// What the driver needs besides the store.
pub struct ReplicaConfig {
    pub node_id: NodeId,
    pub core: CoreConfig,
    /// The volume manager, for claims and maps; `None` in tests that feed
    /// maps themselves.
    pub volmgr: Option<Arc<VolmgrClient>>,
}

impl Replication {
    /// Starts the driver with the journal's replayed state. It runs until
    /// `stop` turns true.
    pub fn start(
        cfg: ReplicaConfig,
        store: Store,
        opened: journal::Opened,
        stop: watch::Receiver<bool>,
    ) -> (Replication, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        let start = Instant::now();
        let handle = Replication {
            tx: tx.clone(),
            start,
            dropped: Arc::new(AtomicU64::new(0)),
            need_map: Arc::new(Notify::new()),
        };
        let node = Node::new(cfg.node_id, cfg.core, opened.durable, 0);
        let driver = Driver {
            me: cfg.node_id,
            node,
            store,
            journal: opened.journal,
            rx,
            tx,
            start,
            cluster: Arc::new(ClusterMap::default()),
            extent_sizes: HashMap::new(),
            pending: HashMap::new(),
            peers: Peers::new(cfg.node_id),
            chains: Arc::new(Chains::new(cfg.volmgr.clone())),
            volmgr: cfg.volmgr,
            need_map: handle.need_map.clone(),
            journal_failed: None,
            claims: Vec::new(),
            claiming: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let task = tokio::spawn(driver.run(stop));
        (handle, task)
    }

    fn now_at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.start).as_millis() as u64
    }

    /// Runs a client request through the group protocol. `None` if the
    /// driver stopped.
    pub async fn request(
        &self,
        req: ClientRequest,
        extent_bytes: u32,
    ) -> Option<oneshot::Receiver<ClientResult>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Client {
                req,
                extent_bytes,
                reply,
            })
            .await
            .ok()?;
        Some(rx)
    }

    /// Hands over a message from a peer; dropped if the driver is swamped
    /// (the sender resends).
    pub fn peer(&self, msg: Peer, extent_bytes: u32) {
        if self.tx.try_send(Input::Peer { msg, extent_bytes }).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The volume manager answered a heartbeat sent at `sent`, granting a
    /// read lease of `lease_ms` from then.
    pub async fn lease(&self, sent: Instant, lease_ms: u64, map_epoch: u64) {
        if lease_ms == 0 {
            return;
        }
        let until = self.now_at(sent) + lease_ms;
        let _ = self.tx.send(Input::Lease { until, map_epoch }).await;
    }

    /// A new map for the core.
    pub async fn map(&self, map: ClusterMap) {
        let groups = cairn_proto::groupmap::group_map(&map);
        let _ = self
            .tx
            .send(Input::Map(Box::new((Arc::new(map), groups))))
            .await;
    }

    /// Follows the volume manager's map from `from_epoch` (this process's
    /// registration) on, until `stop`.
    pub async fn watch_map(
        self,
        volmgr: Arc<VolmgrClient>,
        from_epoch: u64,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut have = from_epoch.saturating_sub(1);
        let mut failing = false;
        loop {
            let fetched = tokio::select! {
                r = volmgr.get_map(have, MAP_POLL_WAIT) => r,
                _ = self.need_map.notified() => continue,
                _ = stop.changed() => return,
            };
            match fetched {
                Ok(map) => {
                    if failing {
                        info!("map updates from the volume manager resumed");
                        failing = false;
                    }
                    if map.epoch > have {
                        have = map.epoch;
                        self.map(map).await;
                    }
                }
                Err(e) => {
                    if !failing {
                        warn!("cannot fetch the cluster map: {e}; retrying");
                        failing = true;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(MAP_RETRY) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
        }
    }

    /// Peer messages dropped so far because the driver was swamped.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

struct Driver {
    me: NodeId,
    node: Node,
    store: Store,
    journal: Journal,
    rx: mpsc::Receiver<Input>,
    tx: mpsc::Sender<Input>,
    start: Instant,
    cluster: Arc<ClusterMap>,
    /// Volume id → extent size, learned from requests and peer messages
    /// (fixed at volume creation; ids are never reused).
    extent_sizes: HashMap<u64, u32>,
    /// Client requests waiting for the core's reply.
    pending: HashMap<(u64, u64), oneshot::Sender<ClientResult>>,
    peers: Peers,
    volmgr: Option<Arc<VolmgrClient>>,
    /// The epochs beneath each extent version (for snapshots).
    chains: Arc<Chains>,
    need_map: Arc<Notify>,
    /// Set once a journal append failed: no disk operation may start after
    /// that (it would not be covered by its record).
    journal_failed: Option<String>,
    /// Claims waiting to go to the volume manager, sent as one batch (one
    /// map epoch for all the groups a rejoined node joins).
    claims: Vec<cairn_group::authority::Claim>,
    /// A claim batch is on its way.
    claiming: Arc<std::sync::atomic::AtomicBool>,
}

impl Driver {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let every = |period: Duration| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        };
        let mut tick = every(TICK);
        let mut idle = false;
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                input = self.rx.recv() => {
                    let Some(input) = input else { break };
                    self.input(input);
                    // Take whatever else is ready, so outputs batch.
                    for _ in 0..256 {
                        match self.rx.try_recv() {
                            Ok(input) => self.input(input),
                            Err(_) => break,
                        }
                    }
                    if idle {
                        idle = false;
                        tick = every(TICK);
                    }
                }
                _ = tick.tick() => {
                    let now = self.now();
                    self.node.on_tick(now);
                    ticks += 1;
                    if idle || ticks.is_multiple_of(20) {
                        self.housekeeping();
                    }
                    if !idle && self.node.is_settled() {
                        idle = true;
                        tick = every(IDLE_TICK);
                    }
                }
            }
            self.outputs();
        }
        if let Err(e) = self.journal.write_pending() {
            warn!(node = self.me, "{e}");
        }
        debug!(node = self.me, "replication driver stopped");
    }

    fn input(&mut self, input: Input) {
        let now = self.now();
        self.node.set_clock(now);
        match input {
            Input::Client {
                req,
                extent_bytes,
                reply,
            } => {
                if let Some(ext) = req.op.extent() {
                    self.learn_size(ext.volume, extent_bytes);
                }
                // A retry of a request still pending replaces the earlier
                // waiter (whose connection the client has given up on).
                self.pending.insert((req.client, req.id), reply);
                self.node.on_client(req);
            }
            Input::Peer { msg, extent_bytes } => {
                if let PeerMsg::Forward { ext, .. }
                | PeerMsg::Push { ext, .. }
                | PeerMsg::Fetch { ext, .. }
                | PeerMsg::Verify { ext, .. } = &msg.msg
                {
                    self.learn_size(ext.volume, extent_bytes);
                }
                self.node.on_peer(msg);
            }
            Input::Map(m) => {
                let (cluster, groups) = *m;
                if groups.epoch > self.node.map().epoch || self.node.map().epoch == 0 {
                    debug!(node = self.me, epoch = groups.epoch, "new cluster map");
                    self.cluster = cluster;
                    let cluster = self.cluster.clone();
                    self.peers.retain(|id| cluster.node(id).is_some());
                    self.node.on_map(groups);
                }
            }
            Input::Lease { until, map_epoch } => self.node.on_lease(until, map_epoch),
            Input::Disk { id, done, size } => {
                if let Some((volume, eb)) = size {
                    self.learn_size(volume, eb);
                }
                self.node.on_disk(id, done)
            }
        }
    }

    fn learn_size(&mut self, volume: u64, extent_bytes: u32) {
        if extent_bytes != 0 {
            self.extent_sizes.insert(volume, extent_bytes);
        }
    }

    /// Once a second: forget waiters whose connection went away, compact
    /// the journal when it has grown.
    fn housekeeping(&mut self) {
        self.pending.retain(|_, tx| !tx.is_closed());
        if self.journal.file_bytes() > journal::COMPACT_MIN_BYTES {
            let entries: u64 = self
                .node
                .durables()
                .map(|(_, g)| g.log.len() as u64 + 1)
                .sum();
            if self.journal.wants_compaction(entries) {
                let before = self.journal.file_bytes();
                match self.journal.compact(self.node.durables()) {
                    Ok(()) => info!(
                        node = self.me,
                        before,
                        after = self.journal.file_bytes(),
                        "group journal rewritten"
                    ),
                    Err(e) => warn!(node = self.me, "{e}"),
                }
            }
        }
    }

    /// Writes queued journal records; on failure, remembers it.
    fn flush_journal(&mut self) {
        if self.journal_failed.is_none() && self.journal.has_pending() {
            if let Err(e) = self.journal.write_pending() {
                warn!(
                    node = self.me,
                    "{e}; disk operations of replicated writes now fail"
                );
                self.journal_failed = Some(e);
            }
        }
    }

    fn outputs(&mut self) {
        let (mut activated, mut activated_pushed) = (0usize, 0usize);
        loop {
            let outs = self.node.drain();
            if outs.is_empty() {
                break;
            }
            // Every record of the batch goes to the file in one write(2)
            // before any of its disk operations starts. A record reaching
            // the file before operations that came ahead of it only makes
            // the journal more cautious (an extent uncertain a moment
            // early), never less.
            for out in &outs {
                if let Output::Journal(r) = out {
                    self.journal.append(r);
                }
            }
            self.flush_journal();
            for out in outs {
                match out {
                    Output::Journal(_) => {}
                    Output::Disk { id, req } => {
                        if let Some(e) = &self.journal_failed {
                            let done = DiskDone::Failed(format!("node {}: {e}", self.me));
                            // Report through the queue: the core is not
                            // re-entered while its outputs are carried out.
                            let tx = self.tx.clone();
                            tokio::spawn(async move {
                                let _ = tx
                                    .send(Input::Disk {
                                        id,
                                        done,
                                        size: None,
                                    })
                                    .await;
                            });
                            continue;
                        }
                        self.start_disk(id, req);
                    }
                    Output::Peer { to, msg } => self.send_peer(to, msg),
                    Output::Reply(r) => {
                        if let Some(tx) = self.pending.remove(&(r.client, r.id)) {
                            let _ = tx.send(r.result);
                        }
                    }
                    Output::Claim(c) => {
                        if !self
                            .claims
                            .iter()
                            .any(|q| q.key == c.key && q.node == c.node)
                        {
                            self.claims.push(c);
                        }
                    }
                    Output::NeedMap(epoch) => {
                        debug!(node = self.me, epoch, "a newer map is named; fetching");
                        self.need_map.notify_one();
                    }
                    Output::Trace(t) => {
                        if let Trace::Activated { pushed, .. } = t {
                            activated += 1;
                            activated_pushed += pushed;
                        }
                        trace(self.me, t);
                    }
                }
            }
        }
        self.flush_journal();
        self.send_claims();
        if activated > 0 {
            info!(
                node = self.me,
                groups = activated,
                pushed = activated_pushed,
                "serving as primary of more groups"
            );
        }
    }

    fn send_peer(&mut self, to: NodeId, msg: Peer) {
        let Some(node) = self.cluster.node(to) else {
            debug!(
                node = self.me,
                peer = to,
                "no address for peer; message dropped"
            );
            return;
        };
        let extent_bytes = match &msg.msg {
            PeerMsg::Forward { ext, .. } => self.extent_sizes.get(&ext.volume).copied(),
            PeerMsg::Push {
                part: Part::Whole,
                data: Some(d),
                ..
            } => Some(d.len() as u32),
            PeerMsg::Push { ext, .. }
            | PeerMsg::Fetch { ext, .. }
            | PeerMsg::Verify { ext, .. } => self.extent_sizes.get(&ext.volume).copied(),
            _ => None,
        }
        .unwrap_or(0);
        let (header, data) = cairn_proto::group::encode_peer(&msg, extent_bytes);
        let addr = node.addr.clone();
        self.peers.send(to, &addr, header, data);
    }

    /// Sends the queued claims as one request, unless one is on its way
    /// (then they go with the next). The core claims again on its own timer
    /// whatever the outcome, until the map shows the replica acting.
    fn send_claims(&mut self) {
        if self.claims.is_empty() || self.claiming.load(Ordering::Relaxed) {
            return;
        }
        let Some(volmgr) = self.volmgr.clone() else {
            self.claims.clear();
            return;
        };
        let claims = std::mem::take(&mut self.claims);
        let batch: Vec<GroupClaim> = claims
            .iter()
            .map(|c| GroupClaim {
                replicas: c.key.replicas,
                index: c.key.index,
                interval: c.interval,
                node: c.node,
                up_since: c.up_since,
            })
            .collect();
        self.claiming.store(true, Ordering::Relaxed);
        let claiming = self.claiming.clone();
        let need_map = self.need_map.clone();
        let me = self.me;
        tokio::spawn(async move {
            match volmgr.claim_replicas(me, &batch).await {
                Ok(epoch) => {
                    info!(
                        node = me,
                        claims = batch.len(),
                        epoch,
                        "caught-up replicas claimed into their groups' acting sets"
                    );
                    need_map.notify_one();
                }
                Err(e) => debug!(node = me, claims = batch.len(), "claims not granted: {e}"),
            }
            claiming.store(false, Ordering::Relaxed);
        });
    }

    fn start_disk(&mut self, id: OpId, req: DiskReq) {
        let size = disk_extent(&req).and_then(|e| self.extent_sizes.get(&e.volume).copied());
        let store = self.store.clone();
        let chains = self.chains.clone();
        let tx = self.tx.clone();
        let me = self.me;
        let journal = match req {
            DiskReq::Flush => Some(self.journal.sync_handle()),
            _ => None,
        };
        tokio::spawn(async move {
            let volume = disk_extent(&req).map(|e| e.volume);
            let mut learned = None;
            let done = match run_disk(&store, &chains, req, size, journal, &mut learned).await {
                Ok(done) => done,
                Err(e) => DiskDone::Failed(format!("node {me}: {e}")),
            };
            let size = volume.zip(learned);
            let _ = tx.send(Input::Disk { id, done, size }).await;
        });
    }
}

fn trace(me: NodeId, t: Trace) {
    match t {
        Trace::AckedWrite { .. } => {}
        Trace::Activated {
            key,
            interval,
            pushed,
        } => debug!(
            node = me,
            group = %key,
            interval,
            pushed,
            "serving as primary"
        ),
        Trace::Claimed { key, node, pushed } => debug!(
            node = me,
            group = %key,
            replica = node,
            pushed,
            "replica brought up to date; claiming it into the acting set"
        ),
        Trace::Repairing {
            key,
            ext,
            part,
            from,
            error,
        } => warn!(
            node = me,
            group = %key,
            extent = %ext,
            part = ?part,
            replica = from,
            "cannot read this node's copy ({error}); fetching the replica's to repair it"
        ),
        Trace::Repaired {
            key,
            ext,
            part,
            from,
        } => warn!(
            node = me,
            group = %key,
            extent = %ext,
            part = ?part,
            replica = from,
            "repaired this node's copy from the replica's; it reads back"
        ),
        Trace::Mending {
            key,
            ext,
            node,
            error,
        } => warn!(
            node = me,
            group = %key,
            extent = %ext,
            replica = node,
            "the replica could not apply a write ({error}); sending it this node's whole blocks around the write instead"
        ),
        Trace::ScrubPushing {
            key,
            ext,
            node,
            offset,
            len,
            why,
        } => warn!(
            node = me,
            group = %key,
            extent = %ext,
            replica = node,
            offset,
            len,
            "scrub: the replica's copy of the range is bad ({why}); pushing this node's over it"
        ),
        Trace::RepairFailed { key, ext, error } => warn!(
            node = me,
            group = %key,
            extent = %ext,
            "cannot repair this node's copy: {error}"
        ),
    }
}

fn disk_extent(req: &DiskReq) -> Option<ExtentId> {
    match req {
        DiskReq::Write { ext, .. }
        | DiskReq::Read { ext, .. }
        | DiskReq::ReadRanges { ext, .. }
        | DiskReq::ReadExtent { ext, .. }
        | DiskReq::PutExtent { ext, .. } => Some(*ext),
        DiskReq::Flush => None,
    }
}

fn key_of(e: ExtentId) -> ExtentKey {
    ExtentKey {
        volume_id: e.volume,
        extent_index: e.index,
        epoch: e.epoch,
    }
}

/// Runs one disk operation of the core against the store.
async fn run_disk(
    store: &Store,
    chains: &Chains,
    req: DiskReq,
    size: Option<u32>,
    journal: Option<Result<File, String>>,
    learned: &mut Option<u32>,
) -> Result<DiskDone, String> {
    let need_size = |ext: ExtentId| {
        size.ok_or_else(|| format!("{ext}: extent size unknown (no request named it)"))
    };
    match req {
        DiskReq::Write { ext, op, fua } => {
            let eb = need_size(ext)?;
            let below = chains.below(ext).await?;
            match op {
                cairn_group::msg::WriteOp::Data { offset, data } => store
                    .write_at(
                        key_of(ext),
                        &below,
                        eb,
                        offset,
                        // No copy: the RPC server read the data into an
                        // aligned buffer, which the kernel reads from.
                        data,
                        fua,
                    )
                    .await
                    .map_err(|e| e.to_string())?,
                cairn_group::msg::WriteOp::Zero { offset, len } => store
                    .write_zeroes_at(key_of(ext), &below, eb, offset, len as u32, fua, true)
                    .await
                    .map_err(|e| e.to_string())?,
                cairn_group::msg::WriteOp::Materialize { offset, len } => store
                    .materialize_at(key_of(ext), &below, eb, offset, len as u32)
                    .await
                    .map_err(|e| e.to_string())?,
            }
            Ok(DiskDone::Ok)
        }
        DiskReq::Read { ext, offset, len } => {
            let eb = need_size(ext)?;
            let below = chains.below(ext).await?;
            let buf = store
                .read_at(key_of(ext), &below, eb, offset, len as u32)
                .await
                .map_err(|e| e.to_string())?;
            Ok(DiskDone::Data(Bytes::from_owner(buf)))
        }
        DiskReq::ReadRanges { ext, ranges } => {
            let eb = need_size(ext)?;
            let below = chains.below(ext).await?;
            let out = read_ranges(store, ext, &below, eb, &ranges).await?;
            Ok(DiskDone::Data(out))
        }
        DiskReq::ReadExtent { ext, part } => {
            let Some(stat) = store.stat(key_of(ext)).await.map_err(|e| e.to_string())? else {
                return Ok(DiskDone::Extent(None));
            };
            let eb = stat.extent_bytes;
            *learned = Some(eb);
            let below = chains.below(ext).await?;
            let ranges = match part {
                Part::Whole => vec![(0, eb as u64)],
                Part::Ranges(v) => v,
            };
            let out = read_ranges(store, ext, &below, eb, &ranges).await?;
            Ok(DiskDone::Extent(Some(out)))
        }
        DiskReq::PutExtent {
            ext,
            part: Part::Whole,
            data: Some(data),
        } => {
            let eb = u32::try_from(data.len())
                .map_err(|_| format!("{ext}: pushed copy of {} bytes", data.len()))?;
            let below = chains.below(ext).await?;
            put_at(store, key_of(ext), &below, eb, 0, &data).await?;
            Ok(DiskDone::Ok)
        }
        DiskReq::PutExtent {
            ext,
            part: Part::Ranges(ranges),
            data,
        } => {
            let eb = need_size(ext)?;
            let data = data.ok_or_else(|| format!("{ext}: a push of ranges without data"))?;
            let below = chains.below(ext).await?;
            let mut at = 0usize;
            for (start, end) in ranges {
                let n = (end - start) as usize;
                let piece = data
                    .get(at..at + n)
                    .ok_or_else(|| format!("{ext}: pushed ranges longer than their data"))?;
                put_at(store, key_of(ext), &below, eb, start, piece).await?;
                at += n;
            }
            Ok(DiskDone::Ok)
        }
        DiskReq::PutExtent {
            ext,
            part: Part::Whole,
            data: None,
        } => {
            // The primary stores no such version: neither may we (reads of
            // it then fall through, on both, to the same older versions).
            store
                .delete_version(key_of(ext))
                .await
                .map_err(|e| e.to_string())?;
            Ok(DiskDone::Ok)
        }
        DiskReq::Flush => {
            let sync = async {
                let handle = journal.unwrap_or_else(|| Err("no journal handle".into()))?;
                tokio::task::spawn_blocking(move || Journal::sync(&handle))
                    .await
                    .map_err(|e| format!("journal sync task: {e}"))?
            };
            let (synced, flushed) = tokio::join!(sync, store.flush());
            synced?;
            flushed.map_err(|e| e.to_string())?;
            Ok(DiskDone::Ok)
        }
    }
}

/// Reads `ranges` of `ext` through the versions `below` it, their bytes one
/// after another, in pieces of at most [`EXTENT_READ_PIECE`].
async fn read_ranges(
    store: &Store,
    ext: ExtentId,
    below: &[u64],
    eb: u32,
    ranges: &[(u64, u64)],
) -> Result<Bytes, String> {
    let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    let mut out = BytesMut::with_capacity(total as usize);
    for &(start, end) in ranges {
        let mut at = start;
        while at < end {
            let len = (EXTENT_READ_PIECE as u64).min(end - at) as u32;
            let buf = store
                .read_at(key_of(ext), below, eb, at, len)
                .await
                .map_err(|e| e.to_string())?;
            out.extend_from_slice(&buf);
            at += len as u64;
        }
    }
    Ok(out.freeze())
}

/// Replaces `data.len()` bytes of an extent of `eb` bytes at `offset` (a
/// whole extent, or a pushed range), keeping it thin: runs of all-zero
/// 4 KiB pieces are zeroed with holes punched, the rest written. The data
/// was read through the primary's chain, so it is written as held by this
/// version (zeros as held zeros when there is a chain beneath it).
async fn put_at(
    store: &Store,
    key: ExtentKey,
    below: &[u64],
    eb: u32,
    offset: u64,
    data: &[u8],
) -> Result<(), String> {
    const BLOCK: usize = 4096;
    let zero: Vec<bool> = data
        .chunks(BLOCK)
        .map(|b| b.iter().all(|&x| x == 0))
        .collect();
    let pieces = zero.len();
    let mut i = 0;
    while i < pieces {
        let mut j = i + 1;
        while j < pieces && zero[j] == zero[i] {
            j += 1;
        }
        let bytes = &data[i * BLOCK..(j * BLOCK).min(data.len())];
        let at = offset + (i * BLOCK) as u64;
        if zero[i] {
            store
                .write_zeroes_at(key, below, eb, at, bytes.len() as u32, false, true)
                .await
                .map_err(|e| e.to_string())?;
        } else {
            store
                .write_at(key, below, eb, at, IoBuf::copy_from(bytes), false)
                .await
                .map_err(|e| e.to_string())?;
        }
        i = j;
    }
    Ok(())
}
