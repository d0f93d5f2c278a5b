//! Exports backed by the cluster: one [`Export`] per volume name, shared by
//! every connection that opened it (so a FLUSH on one connection covers the
//! writes of all, which is what `NBD_FLAG_CAN_MULTI_CONN` promises), and an
//! export lease at the volume manager while any connection has it open (the
//! lease is what refuses `volume delete` of a volume in use).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_client::{ClientError, Cluster, Volume};
use cairn_proto::map::{SnapshotInfo, VolumeInfo};
use cairn_proto::volmgr::VolmgrStatus;
use cairn_volmgr::client::VolmgrClient;
use futures::stream::{self, StreamExt, TryStreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::backend::ReservationsHook;
use crate::iscsi::scsi::pr::{MemPrStore, PrState, PrStore, SaveError};
use crate::nbd::wire::{EINVAL, EIO, STATE_HOLE, STATE_ZERO};
use crate::nbd::{Backend, Catalog, ExportInfo, Extents, IoError};

/// Renewal period used until the volume manager has said its own.
const LEASE_RENEW_DEFAULT: Duration = Duration::from_secs(1);

/// How long a logical unit's command waits for a lapsed export lease to
/// come back before it is refused (a new export takes its lease within a
/// round trip of opening).
const LEASE_GRACE: Duration = Duration::from_secs(1);

/// Milliseconds on this process's monotonic clock, for export lease ends.
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// How long an export lease counts here, from when the request that
/// renewed it was sent. The volume manager counts three renewal periods
/// from when it received it (its `lease_ms`) before it stops waiting for
/// this front end to report a reservation change; half a period less leaves
/// room for the two clocks' drift.
fn lease_validity_ms(every: Duration) -> u64 {
    (every * 5 / 2).as_millis() as u64
}
/// Explicit zeros written per request for WRITE_ZEROES with NO_HOLE.
const ZERO_CHUNK: usize = 1 << 20;
static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// What the registry needs to know about this front end.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// This target's id in export leases (several targets may export one
    /// volume; each needs its own id).
    pub target_id: u64,
    /// Every export refuses writes.
    pub read_only: bool,
    /// The volume served under the empty name, if any.
    pub default_export: Option<String>,
    /// The cluster's id, part of every export's [`ExportInfo::uid`].
    pub cluster_id: String,
    /// The volume manager's members (each export's watch connects its own
    /// client).
    pub volmgr: Vec<String>,
}

/// The exports of one target process.
pub struct Registry {
    cluster: Arc<Cluster>,
    /// Short requests: catalogue lookups, persistent reservations, lease
    /// releases. An export's long polls use a client of their own
    /// ([`watch_export`]): a client answers one request at a time, and a
    /// lookup must not wait behind a poll.
    volmgr: Arc<VolmgrClient>,
    cfg: RegistryConfig,
    live: Mutex<HashMap<String, Weak<Export>>>,
    /// This process, to the volume manager: random, never 0. A later
    /// process with the same `target_id` (a restart, or a second target
    /// configured with this one's id by mistake) supersedes it there.
    instance: u64,
}

impl Registry {
    pub fn new(cluster: Arc<Cluster>, volmgr: VolmgrClient, cfg: RegistryConfig) -> Arc<Registry> {
        let instance = rand::random::<u64>().max(1);
        Arc::new(Registry {
            cluster,
            volmgr: Arc::new(volmgr.with_front_end_instance(instance)),
            cfg,
            live: Mutex::new(HashMap::new()),
            instance,
        })
    }

    /// Names of the exports open now (for logs and tests).
    pub fn open_exports(&self) -> Vec<String> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = live
            .iter()
            .filter(|(_, w)| w.strong_count() > 0)
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    fn resolve<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        if name.is_empty() {
            self.cfg.default_export.as_deref()
        } else {
            Some(name)
        }
    }

    fn live_export(&self, name: &str) -> Option<Arc<Export>> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.get(name).and_then(Weak::upgrade)
    }

    /// The catalogue record of `name`, None if there is no such volume.
    /// `VOL@SNAP` names snapshot SNAP of volume VOL: the record returned is
    /// the snapshot's view (its epoch as head, its chain, its size), and
    /// `true` says it is a snapshot.
    async fn volume_info(&self, name: &str) -> Result<Option<(VolumeInfo, bool)>, String> {
        let (volume, snapshot) = match name.split_once('@') {
            Some((v, s)) => (v, Some(s)),
            None => (name, None),
        };
        let v = match self.volmgr.get_volume(volume).await {
            Ok(v) => v,
            Err(e) if e.status() == Some(VolmgrStatus::NotFound) => return Ok(None),
            Err(e) => {
                return Err(format!(
                    "looking up volume {volume:?} at the volume manager: {e}"
                ))
            }
        };
        let Some(snapshot) = snapshot else {
            return Ok(Some((v, false)));
        };
        Ok(v.snapshots
            .iter()
            .find(|s| s.name == snapshot)
            .map(|s| (snapshot_view(&v, s), true)))
    }

    fn export_info(&self, v: &VolumeInfo, snapshot: bool) -> ExportInfo {
        let read_only = self.cfg.read_only || snapshot;
        ExportInfo {
            name: v.name.clone(),
            description: format!(
                "Cairn {}, {} replica{}, {} extents{}",
                if snapshot { "snapshot" } else { "volume" },
                v.replicas,
                if v.replicas == 1 { "" } else { "s" },
                if v.extent_size_bytes >= 1 << 20 {
                    format!("{} MiB", v.extent_size_bytes >> 20)
                } else {
                    format!("{} KiB", v.extent_size_bytes >> 10)
                },
                if read_only { ", read-only" } else { "" }
            ),
            size: v.size_bytes,
            read_only,
            uid: if snapshot {
                format!(
                    "{}/vol-{}@epoch-{}",
                    self.cfg.cluster_id, v.id, v.head_epoch
                )
            } else {
                format!("{}/vol-{}", self.cfg.cluster_id, v.id)
            },
        }
    }
}

/// A snapshot as a volume record of its own: named `VOL@SNAP`, reading its
/// epoch and the chain beneath it, with the size the volume had.
fn snapshot_view(v: &VolumeInfo, s: &SnapshotInfo) -> VolumeInfo {
    v.frozen_view(
        format!("{}@{}", v.name, s.name),
        s.epoch,
        s.chain.clone(),
        s.size_bytes,
    )
}

impl Catalog for Arc<Registry> {
    type Export = Export;
    type Reservations = Reservations;

    fn watch_reservations(&self, export: &Arc<Export>, hook: Weak<dyn ReservationsHook>) {
        let mut hooks = export.pr_hooks.lock().unwrap_or_else(|p| p.into_inner());
        hooks.retain(|h| h.strong_count() > 0);
        hooks.push(hook);
    }

    fn reservations(&self, name: &str, export: &Arc<Export>) -> Reservations {
        if export.snapshot {
            // A snapshot view is a logical unit of its own, read-only and
            // without a record to keep reservations in.
            return Reservations::Memory(MemPrStore::default());
        }
        Reservations::Volume {
            volmgr: self.volmgr.clone(),
            volume: name.to_string(),
            front_end: self.cfg.target_id,
            latest: export.pr_generation.clone(),
            lease_until: export.lease_until.clone(),
        }
    }

    async fn lookup(&self, name: &str) -> Result<Option<ExportInfo>, String> {
        let Some(name) = self.resolve(name) else {
            return Ok(None);
        };
        match self.volume_info(name).await {
            Ok(v) => Ok(v.map(|(v, snapshot)| self.export_info(&v, snapshot))),
            // The volume manager is unreachable, but the export is open here.
            Err(e) => match self.live_export(name) {
                Some(x) => Ok(Some(x.info.clone())),
                None => Err(e),
            },
        }
    }

    async fn list(&self) -> Result<Vec<ExportInfo>, String> {
        let volumes = self
            .volmgr
            .list_volumes()
            .await
            .map_err(|e| format!("listing volumes at the volume manager: {e}"))?;
        let mut out = Vec::new();
        for v in &volumes {
            out.push(self.export_info(v, false));
            for s in &v.snapshots {
                out.push(self.export_info(&snapshot_view(v, s), true));
            }
        }
        Ok(out)
    }

    async fn open(&self, name: &str) -> Result<Option<Arc<Export>>, String> {
        let Some(name) = self.resolve(name) else {
            return Ok(None);
        };
        let (info, snapshot) = match self.volume_info(name).await {
            Ok(Some(v)) => v,
            Ok(None) => return Ok(None),
            Err(e) => {
                // Clients reconnecting while the volume manager is away keep
                // working on an export this process has open.
                return match self.live_export(name) {
                    Some(x) => Ok(Some(x)),
                    None => Err(e),
                };
            }
        };
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(x) = live.get(name).and_then(Weak::upgrade) {
            let v = x.volume.info();
            if v.id == info.id && x.volume.head_epoch() == info.head_epoch && !*x.revoked.borrow() {
                // The same volume. If it grew and the lease watch has not
                // heard yet, the export grows now (as the watch would): every
                // connection to a volume shares one export, so a FLUSH on any
                // of them covers writes acknowledged on all (multi-conn).
                if x.volume.grow(info.size_bytes) {
                    info!(volume = name, size = info.size_bytes, "volume grew");
                }
                return Ok(Some(x));
            }
            // Deleted and re-created, or rolled back: connections opened from
            // now on use the new record; open ones keep theirs until the
            // lease watch revokes them.
            info!(
                volume = name,
                "volume record changed; new connections use the new one"
            );
        }
        let volume = self
            .cluster
            .volume(info.clone())
            .map_err(|e| format!("opening volume {name:?}: {e}"))?;
        // Writes acknowledged by an earlier process (a target restarted under
        // its clients) may be unflushed; the first FLUSH must reach them.
        volume.flush_stores_on_next_flush();
        let export = Arc::new_cyclic(|me: &Weak<Export>| Export {
            info: self.export_info(&info, snapshot),
            volume,
            // A snapshot never changes and takes no writes: no lease, no
            // watch. (Deleting a snapshot while it is exported is allowed.)
            lease: (!snapshot)
                .then(|| tokio::spawn(watch_export(self.clone(), name.to_string(), me.clone()))),
            registry: Arc::downgrade(self),
            gate: tokio::sync::RwLock::new(()),
            revoked: watch::channel(false).0,
            snapshot,
            pr_generation: Arc::new(AtomicU64::new(0)),
            lease_until: Arc::new(AtomicU64::new(0)),
            lease_renewed: tokio::sync::Notify::new(),
            lease_stalled: std::sync::atomic::AtomicBool::new(false),
            pr_hooks: Mutex::new(Vec::new()),
        });
        live.retain(|_, w| w.strong_count() > 0);
        live.insert(name.to_string(), Arc::downgrade(&export));
        info!(volume = name, size = info.size_bytes, "export opened");
        Ok(Some(export))
    }
}

/// How long a front end stays paused for a snapshot before it re-reads the
/// volume record on its own (the volume manager's leader may have gone).
const PAUSE_RECHECK: Duration = Duration::from_secs(10);

/// While the export is open: keeps its lease at the volume manager (each
/// long poll renews it) and follows its record. A snapshot of the volume
/// pauses writes here (see [`Export::pause_for_snapshot`]); any other change
/// of the head epoch (a forced rollback) revokes the export, which
/// disconnects its clients: they reconnect to the new head.
/// Whether volume record `v` still holds every write an export made at
/// head epoch `head`: its head reads through `head` (one snapshot or more
/// were taken since). A rollback to an older snapshot or a re-creation
/// leaves `head` out of the chain. Only valid while no write starts at
/// `head` (a pause, or a lapsed lease).
fn holds_writes_at(v: &VolumeInfo, head: u64) -> bool {
    v.chain.contains(&head)
}

async fn watch_export(registry: Arc<Registry>, name: String, export: Weak<Export>) {
    let mut every = LEASE_RENEW_DEFAULT;
    let mut failing = false;
    // Its own client: its long polls must not hold up other exports' polls
    // (leases would lapse) nor lookups.
    let watcher = VolmgrClient::new(registry.cfg.volmgr.clone(), registry.cfg.cluster_id.clone())
        .with_front_end_instance(registry.instance);
    // Learn the renewal period (and take the lease) first.
    let sent = clock_ms();
    match watcher.register_export(registry.cfg.target_id, &name).await {
        Ok(d) => {
            if !d.is_zero() {
                every = d;
            }
            if let Some(x) = export.upgrade() {
                x.renewed(sent, every, 0);
            }
        }
        Err(e) => {
            warn!(volume = %name, "cannot take the export lease: {e}");
            failing = true;
        }
    }
    // The pending snapshot this front end last paused for: the watch does
    // not wake for it again while the leader finishes it.
    let mut handled = 0u64;
    loop {
        let Some(x) = export.upgrade() else { return };
        let known_head = x.volume.head_epoch();
        // Answered at once when a reservation changes through another
        // front end: the persistent reservations reload before the next
        // command, so a PREEMPT fences here within a round trip.
        let known_pr = x.pr_generation.load(Ordering::Acquire);
        drop(x);
        let sent = clock_ms();
        let got = watcher
            .export_watch_pr(
                registry.cfg.target_id,
                &name,
                known_head,
                known_pr,
                handled,
                every,
            )
            .await;
        let Some(x) = export.upgrade() else { return };
        match got {
            Ok(w) => {
                // A head that moved without this front end's pause is dealt
                // with before the lease is renewed: no write may start at
                // the old head, which now belongs to another view.
                let unpaused = w.pending == 0 || w.pending == handled;
                if let Some(v) = w.volume.as_ref().filter(|_| unpaused) {
                    let head = x.volume.head_epoch();
                    let same = v.id == x.volume.info().id;
                    if same && v.head_epoch == head {
                        // Unchanged.
                    } else if same && holds_writes_at(v, head) && !x.lease_held() {
                        // One or more snapshots taken since this head, by a
                        // leader that did not know this front end (a new
                        // one, say). They could only go ahead after this
                        // front end's lease had lapsed, and no renewal came
                        // since, so no write started after them
                        // (`open_for_writes`): as after a pause, writes go
                        // on at the new head.
                        x.volume.switch_head(v.head_epoch, v.chain.clone());
                        info!(
                            volume = %name,
                            head_epoch = v.head_epoch,
                            "a snapshot was taken while the export lease had lapsed; \
                             writes go to the new head"
                        );
                    } else {
                        x.revoke(&format!(
                            "volume {name:?} changed under the export without a pause \
                             (head epoch {head} -> {}: a rollback or a re-creation)",
                            v.head_epoch
                        ));
                        return;
                    }
                }
                if failing {
                    info!(volume = %name, "export lease renewed again");
                }
                failing = false;
                x.renewed(sent, every, w.pr_generation);
                if w.pr_generation > known_pr {
                    // Changed through another front end: the logical units
                    // load it and make a PREEMPT AND ABORT's aborts before
                    // the next watch reports holding it.
                    x.refresh_reservations().await;
                }
                if w.pending != 0 && w.pending != handled {
                    handled = w.pending;
                    x.pause_for_snapshot(&registry, &watcher, w.pending, every)
                        .await;
                    if *x.revoked.borrow() {
                        return;
                    }
                } else {
                    handled = w.pending;
                    if let Some(v) = w.volume {
                        // (A changed identity or head revoked it above.)
                        if x.volume.grow(v.size_bytes) {
                            // Open connections keep working; iSCSI initiators
                            // hear CAPACITY DATA HAS CHANGED, NBD clients see
                            // the new size when they reconnect.
                            info!(volume = %name, size = v.size_bytes, "volume grew");
                        }
                    }
                }
            }
            Err(e) => {
                if !failing {
                    warn!(volume = %name, "cannot renew the export lease: {e}");
                }
                failing = true;
                drop(x);
                tokio::time::sleep(every).await;
            }
        }
    }
}

/// One exported volume.
pub struct Export {
    info: ExportInfo,
    volume: Volume,
    lease: Option<JoinHandle<()>>,
    registry: Weak<Registry>,
    /// Writes (and zeroings, trims) hold it shared; a snapshot takes it
    /// exclusively, which waits for the writes in flight and holds back new
    /// ones (tokio's lock is fair: once the snapshot waits, new writes
    /// queue behind it).
    gate: tokio::sync::RwLock<()>,
    /// Turns true when the export's clients must go (a forced rollback).
    revoked: watch::Sender<bool>,
    /// A snapshot of a volume, exported read-only: no lease, no watch.
    snapshot: bool,
    /// The newest persistent reservation generation the volume manager
    /// reported (every lease renewal carries it).
    pr_generation: Arc<AtomicU64>,
    /// When the export lease ends ([`clock_ms`]) unless renewed: 0 until
    /// it is first taken. Writes start only while it is held
    /// ([`Export::open_for_writes`]).
    lease_until: Arc<AtomicU64>,
    /// Woken at every renewal: writes waiting for the lease go on.
    lease_renewed: tokio::sync::Notify,
    /// Writes are waiting for a lapsed lease (logged once per lapse).
    lease_stalled: std::sync::atomic::AtomicBool,
    /// The logical units over this export, run when a newer reservation
    /// state is reported, before this target reports holding it.
    pr_hooks: Mutex<Vec<Weak<dyn ReservationsHook>>>,
}

impl Export {
    /// A renewal sent at `sent` ([`clock_ms`]) was answered with PR
    /// generation `pr_generation`. Generation first: a command that sees
    /// the lease held also sees every reservation change answered with it.
    fn renewed(&self, sent: u64, every: Duration, pr_generation: u64) {
        self.pr_generation
            .fetch_max(pr_generation, Ordering::AcqRel);
        self.lease_until
            .fetch_max(sent + lease_validity_ms(every), Ordering::AcqRel);
        if self.lease_held() && self.lease_stalled.swap(false, Ordering::AcqRel) {
            info!(volume = %self.info.name, "export lease renewed: writes go on");
        }
        self.lease_renewed.notify_waiters();
    }

    /// Whether the export lease is held now.
    fn lease_held(&self) -> bool {
        clock_ms() < self.lease_until.load(Ordering::Acquire)
    }

    /// Admits a write (or zeroing, trim): waits while the export lease has
    /// lapsed, then holds the snapshot gate shared.
    ///
    /// Why: the volume manager takes a snapshot without pausing a front end
    /// it does not know exports the volume, and a newly elected leader
    /// learns of a front end only from its next renewal. A front end that
    /// went on writing meanwhile would write at the old head epoch after
    /// it became the snapshot's: the snapshot would take writes made after
    /// it. A front end's lease ends 2.5 renewal periods after it sent its
    /// last renewal ([`lease_validity_ms`]), before a new leader stops
    /// waiting for front ends it has not heard from (3 periods after its
    /// election, `leases_unknown` in `volmgr/src/api.rs`), so writes started
    /// only under the lease never reach an epoch frozen without this front
    /// end's pause. Found by the replication chaos test
    /// (`tests/tests/replication.rs`): a snapshot taken right after the
    /// leader was killed held writes issued after it was answered. While
    /// the lease is lapsed (as long as a leader change takes) writes wait,
    /// they do not fail; reads go on (the chunk servers' own leases from
    /// the volume manager govern those).
    async fn open_for_writes(&self) -> Result<tokio::sync::RwLockReadGuard<'_, ()>, IoError> {
        loop {
            if !self.snapshot && !self.lease_held() {
                self.await_lease().await?;
            }
            let open = self.gate.read().await;
            // It may have lapsed while a snapshot held the gate.
            if self.snapshot || self.lease_held() {
                return Ok(open);
            }
        }
    }

    async fn await_lease(&self) -> Result<(), IoError> {
        let mut revoked = self.revoked.subscribe();
        while !self.lease_held() {
            if *revoked.borrow_and_update() {
                return Err(IoError {
                    errno: EIO,
                    message: format!("export {:?} was revoked", self.info.name),
                });
            }
            if !self.lease_stalled.swap(true, Ordering::AcqRel) {
                warn!(
                    volume = %self.info.name,
                    "export lease lapsed (no answer from the volume manager's leader): \
                     writes wait until it is renewed"
                );
            }
            let renewed = self.lease_renewed.notified();
            tokio::select! {
                _ = renewed => {}
                _ = revoked.changed() => {}
                // A renewal may land between the check and the wait.
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        Ok(())
    }

    async fn refresh_reservations(&self) {
        let hooks: Vec<Arc<dyn ReservationsHook>> = self
            .pr_hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for hook in hooks {
            hook.refresh().await;
        }
    }

    /// A snapshot of the volume is being taken (`pending`): stops writes,
    /// waits for those in flight, tells the volume manager, and waits until
    /// the snapshot is committed or given up; then re-reads the record and
    /// resumes at its head epoch. Writes never fail meanwhile, they wait.
    async fn pause_for_snapshot(
        &self,
        registry: &Arc<Registry>,
        watcher: &VolmgrClient,
        pending: u64,
        every: Duration,
    ) {
        let name = &self.info.name;
        let t0 = std::time::Instant::now();
        let _closed = self.gate.write().await;
        let drained = t0.elapsed();
        let known_head = self.volume.head_epoch();
        if let Err(e) = watcher
            .snapshot_paused(registry.cfg.target_id, name, pending)
            .await
        {
            warn!(volume = %name, "could not report the pause for snapshot {pending}: {e}");
        }
        // Until the pending snapshot is gone (committed or given up).
        let deadline = tokio::time::Instant::now() + PAUSE_RECHECK;
        while tokio::time::Instant::now() < deadline {
            // These polls renew the lease and carry reservation changes as
            // the watch's own do (reads and PR commands go on meanwhile).
            let sent = clock_ms();
            let got = watcher
                .export_watch_pr(
                    registry.cfg.target_id,
                    name,
                    known_head,
                    self.pr_generation.load(Ordering::Acquire),
                    pending,
                    // At most a renewal period, so the lease stays held here.
                    (deadline - tokio::time::Instant::now()).min(every),
                )
                .await;
            if let Ok(w) = &got {
                self.renewed(sent, every, w.pr_generation);
            }
            match got {
                // Gone, or committed (the head moved; the leader clears the
                // pending snapshot right after).
                Ok(w)
                    if w.pending != pending
                        || w.volume
                            .as_ref()
                            .is_some_and(|v| v.head_epoch != known_head) =>
                {
                    break
                }
                Ok(_) => {}
                Err(e) => {
                    debug!(volume = %name, "waiting for snapshot {pending}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        // A linearizable read decides where writes go: resuming at the old
        // head after the snapshot committed would change the snapshot.
        let mut delay = Duration::from_millis(20);
        let v = loop {
            match registry.volmgr.get_volume(name).await {
                Ok(v) => break v,
                Err(e) => {
                    warn!(volume = %name, "writes wait: cannot read the volume record after snapshot {pending}: {e}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        };
        if v.id != self.volume.info().id {
            self.revoke(&format!("volume {name:?} was deleted and re-created"));
        } else if v.head_epoch != known_head {
            if holds_writes_at(&v, known_head) {
                self.volume.switch_head(v.head_epoch, v.chain.clone());
                info!(
                    volume = %name,
                    head_epoch = v.head_epoch,
                    drained_ms = drained.as_millis() as u64,
                    paused_ms = t0.elapsed().as_millis() as u64,
                    "snapshot taken; writes go to the new head"
                );
            } else {
                self.revoke(&format!(
                    "volume {name:?} was rolled back under the export (head epoch {known_head} -> {})",
                    v.head_epoch
                ));
            }
        } else {
            info!(volume = %name, "snapshot {pending} was given up; writes resume");
        }
    }

    fn revoke(&self, why: &str) {
        warn!(volume = %self.info.name, "{why}; disconnecting its clients");
        self.revoked.send_replace(true);
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(l) = self.lease.take() {
            l.abort();
        }
        if self.snapshot {
            return;
        }
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        let name = self.info.name.clone();
        info!(volume = %name, "export closed (no connection left)");
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = registry
                    .volmgr
                    .unregister_export(registry.cfg.target_id, &name)
                    .await
                {
                    debug!(volume = %name, "dropping the export lease: {e} (it lapses by itself)");
                }
            });
        }
    }
}

fn io_error(e: ClientError) -> IoError {
    IoError {
        errno: if e.is_invalid_argument() { EINVAL } else { EIO },
        message: e.to_string(),
    }
}

impl Backend for Export {
    fn info(&self) -> &ExportInfo {
        &self.info
    }

    fn size(&self) -> u64 {
        self.volume.size()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.volume.read(offset, len as u64).await.map_err(io_error)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let _open = self.open_for_writes().await?;
        self.volume.write(offset, data, fua).await.map_err(io_error)
    }

    async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        fua: bool,
    ) -> Result<Option<u64>, IoError> {
        let _open = self.open_for_writes().await?;
        self.volume
            .compare_and_write(offset, compare, data, fua)
            .await
            .map_err(io_error)
    }

    /// Inside one extent the primary compares and writes under its range
    /// lock (`Volume::compare_and_write`).
    fn compare_and_write_is_atomic(&self, offset: u64, len: u64) -> bool {
        let eb = self.volume.info().extent_size_bytes as u64;
        len > 0 && offset / eb == (offset + len - 1) / eb
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), IoError> {
        let _open = self.open_for_writes().await?;
        if !no_hole {
            return self
                .volume
                .write_zeroes(offset, len as u64, fua)
                .await
                .map_err(io_error);
        }
        // Allocated zeros: written as data, from one static buffer.
        let chunks = (0..len as u64).step_by(ZERO_CHUNK).map(|at| {
            let n = (len as u64 - at).min(ZERO_CHUNK as u64) as usize;
            (offset + at, Bytes::from_static(&ZEROS[..n]))
        });
        stream::iter(chunks)
            .map(|(at, zeros)| self.volume.write(at, zeros, fua))
            .buffer_unordered(8)
            .try_collect::<()>()
            .await
            .map_err(io_error)
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        // The store punches whole blocks and zeroes the rest: a trimmed range
        // reads as zeros, which the protocol allows (it promises nothing).
        let _open = self.open_for_writes().await?;
        self.volume
            .write_zeroes(offset, len as u64, fua)
            .await
            .map_err(io_error)
    }

    async fn flush(&self) -> Result<(), IoError> {
        self.volume.flush().await.map_err(io_error)
    }

    async fn revoked(&self) {
        let mut rx = self.revoked.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Extents, IoError> {
        let size = self.volume.size();
        let eb = self.volume.info().extent_size_bytes as u64;
        let end = (offset + len as u64).min(size);
        let first = offset / eb;
        let count = (end - 1) / eb - first + 1;
        let a = match self.volume.allocation(first, count).await {
            Ok(a) => a,
            Err(e) => {
                // Status 0 ("data, contents unknown") is always true.
                debug!(volume = %self.info.name, "allocation unknown at offset {offset}: {e}");
                return Ok(vec![(len as u64, 0)]);
            }
        };
        let mut runs: Extents = Vec::with_capacity(a.state.len() + 1);
        for (i, state) in a.state.iter().enumerate() {
            let index = a.first + i as u64;
            let start = (index * eb).max(offset);
            let stop = ((index + 1) * eb).min(size);
            let flags = match state {
                Some(false) => STATE_HOLE | STATE_ZERO,
                _ => 0,
            };
            runs.push((stop - start, flags));
        }
        let covered = (a.first + a.state.len() as u64) * eb;
        if a.empty_beyond && a.state.last() == Some(&Some(false)) && covered < size {
            runs.push((size - covered, STATE_HOLE | STATE_ZERO));
        }
        Ok(runs)
    }
}

/// Where an export's SCSI persistent reservations live: a volume's in the
/// volume manager (compare-and-set on a generation, so every target of the
/// volume shares them and they survive restarts); a snapshot view's in
/// memory.
pub enum Reservations {
    Volume {
        volmgr: Arc<VolmgrClient>,
        volume: String,
        /// This target's id in export leases: the volume manager does not
        /// wait for the front end that made a change to report it.
        front_end: u64,
        /// The newest generation the export's lease renewals reported: a
        /// state loaded at an older one is stale (another target changed
        /// it). A change through another target is answered only once this
        /// one reported holding it, or its lease lapsed.
        latest: Arc<AtomicU64>,
        /// The export lease's end (see [`Export`]).
        lease_until: Arc<AtomicU64>,
    },
    Memory(MemPrStore),
}

impl PrStore for Reservations {
    async fn load(&self) -> Result<Option<PrState>, String> {
        match self {
            Reservations::Memory(m) => m.load().await,
            Reservations::Volume {
                volmgr,
                volume,
                latest,
                ..
            } => {
                let (generation, bytes) = volmgr.pr_get(volume).await.map_err(|e| {
                    format!("reading the persistent reservations of volume {volume:?}: {e}")
                })?;
                latest.fetch_max(generation, Ordering::AcqRel);
                if generation == 0 {
                    return Ok(None);
                }
                let mut state = PrState::from_bytes(&bytes)
                    .map_err(|e| format!("persistent reservations of volume {volume:?}: {e}"))?;
                // The store's generation counts the changes.
                state.version = generation;
                Ok(Some(state))
            }
        }
    }

    async fn save(&self, state: &PrState) -> Result<(), SaveError> {
        match self {
            Reservations::Memory(m) => m.save(state).await,
            Reservations::Volume {
                volmgr,
                volume,
                front_end,
                latest,
                ..
            } => {
                let expect = state.version.wrapping_sub(1);
                match volmgr
                    .pr_set_as(*front_end, volume, expect, state.to_bytes())
                    .await
                {
                    Ok(generation) => {
                        latest.fetch_max(generation, Ordering::AcqRel);
                        Ok(())
                    }
                    Err(e) if e.pr_generation_mismatch().is_some() => Err(SaveError::Stale),
                    Err(e) => Err(SaveError::Failed(format!(
                        "saving the persistent reservations of volume {volume:?}: {e}"
                    ))),
                }
            }
        }
    }

    fn stale(&self, version: u64) -> bool {
        match self {
            Reservations::Memory(_) => false,
            Reservations::Volume { latest, .. } => latest.load(Ordering::Acquire) > version,
        }
    }

    async fn lapsed(&self) -> bool {
        let Reservations::Volume { lease_until, .. } = self else {
            return false;
        };
        let give_up = clock_ms() + LEASE_GRACE.as_millis() as u64;
        loop {
            let now = clock_ms();
            if now < lease_until.load(Ordering::Acquire) {
                return false;
            }
            if now >= give_up {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
