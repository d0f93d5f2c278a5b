//! `cairn-volmgr`: one member of the volume manager's raft group.
//!
//! Checks and locks its data directory, opens the raft log (bootstrapping a
//! new cluster from `--initial-members` when the directory is empty), starts
//! the raft node loop, the listener (API and raft traffic on one port) and,
//! while this member leads, the failure detector. SIGTERM or SIGINT stops it.
//!
//! Exit status: 0 after a clean stop; 2 when the configuration or the data
//! directory is wrong (restarting will not help); 1 for a failure while
//! running.

use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_daemon::{notify, Fatal};
use cairn_volmgr::api::{Api, SharedDetector, SharedUsage};
use cairn_volmgr::config::Config;
use cairn_volmgr::detector::{DetectorConfig, FailureDetector};
use cairn_volmgr::node::{self, NodeHandle};
use cairn_volmgr::raftlog::RaftLog;
use cairn_volmgr::state::{
    Command, NodeStats, NodeUsage, Proposal, SetGroupCount, SettlePlacement, State,
};
use cairn_volmgr::transport::TcpTransport;
use prost::Message as _;
use raft::prelude::Snapshot;
use raft::Storage;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{info, warn};

/// How often the leader's failure detector looks at the map.
const DETECTOR_PERIOD: Duration = Duration::from_millis(250);
/// Detector periods between usage updates proposed into the map.
const USAGE_EVERY: u32 = 20;
/// A node's used bytes are proposed when they moved by more than this.
const USAGE_CHANGE_MIN: u64 = 64 << 20;

/// The watchdog fails when the raft loop has not ticked for this long (it
/// ticks every 100 ms), or for half the watchdog interval if that is longer.
const RAFT_STALL_MAX: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    cairn_daemon::exit("cairn-volmgr", run())
}

fn config_error(message: impl Into<String>) -> Fatal {
    Fatal::config(message)
}

fn run() -> Result<(), Fatal> {
    let config = Config::from_args().map_err(config_error)?;
    cairn_daemon::init_tracing(&config.log_level, config.log_format)?;
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        config_error(format!(
            "creating the data directory {}: {e}",
            config.data_dir.display()
        ))
    })?;
    let _lock = lock_data_dir(&config.data_dir)?;
    let mut log = RaftLog::open(&config.data_dir.join("raft")).map_err(|e| {
        config_error(format!(
            "opening the raft log in {}: {e}",
            config.data_dir.display()
        ))
    })?;
    let fresh = log.last_index().unwrap_or(0) == 0 && log.snapshot_metadata().index == 0;
    check_identity(&config, fresh)?;
    if fresh {
        if !config.initial_members.is_empty() {
            bootstrap(&mut log, &config)?;
        } else if !config.join {
            return Err(config_error(format!(
                "{} holds no cluster state: give --initial-members to create a cluster, or --join to be added to one",
                config.data_dir.display()
            )));
        } else {
            info!("empty member: waiting to be added to the cluster by its leader");
        }
    } else if !config.initial_members.is_empty() {
        info!("the data directory already holds cluster state; --initial-members is ignored");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Fatal::runtime(format!("starting the runtime: {e}")))?;
    runtime.block_on(serve(config, log))
}

async fn serve(config: Config, log: RaftLog) -> Result<(), Fatal> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| config_error(format!("listening on {}: {e}", config.listen)))?;
    let rt = tokio::runtime::Handle::current();
    let (id, cluster_id) = (config.member_id, config.cluster_id.clone());
    let node = node::start(id, log, State::new(), {
        let cluster_id = cluster_id.clone();
        let advertise = config.advertise.to_string();
        move |tx| TcpTransport::new(id, advertise, cluster_id, rt, tx)
    })
    .map_err(Fatal::runtime)?;
    let detector: SharedDetector = Arc::new(Mutex::new(None));
    let usage: SharedUsage = Arc::default();
    let led_since = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let api = Arc::new(Api {
        node: node.clone(),
        cluster_id: cluster_id.clone(),
        detector: detector.clone(),
        usage: usage.clone(),
        exports: Default::default(),
        pauses: Default::default(),
        led_since_ms: led_since.clone(),
        heartbeat_interval: config.heartbeat_interval,
        down_after: config.down_after,
        started,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    info!(member = id, listen = %config.listen, advertise = %config.advertise, "volume manager member serving");
    let server = tokio::spawn(cairn_volmgr::server::serve(
        listener,
        cluster_id,
        node.sender(),
        api,
        stop_rx.clone(),
    ));
    let leader_duties = tokio::spawn(lead(
        node.clone(),
        (detector, usage, led_since),
        DetectorConfig::new(
            config.heartbeat_interval.as_millis() as u64,
            config.down_after.as_millis() as u64,
            config.out_after.as_millis() as u64,
        ),
        config.group_count,
        started,
        stop_rx,
    ));

    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Fatal::runtime(format!("installing SIGTERM handler: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Fatal::runtime(format!("installing SIGINT handler: {e}")))?;
    // Serving: the listener is bound and its task runs, the raft loop runs.
    notify::ready(&format!("member {id} serving on {}", config.listen));
    notify::spawn_watchdog(raft_liveness(node.clone()));
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
    notify::stopping();
    let _ = stop_tx.send(true);
    let _ = server.await;
    let _ = leader_duties.await;
    tokio::task::spawn_blocking(move || node.stop())
        .await
        .map_err(|e| Fatal::runtime(format!("stopping the raft loop: {e}")))?;
    info!("stopped");
    Ok(())
}

/// The watchdog's liveness check: the raft loop thread is alive and ticking.
/// It ticks every 100 ms whether or not there is a leader or a quorum, so a
/// member cut off from its peers stays healthy (restarting it would not
/// help); one stuck (a raft log write or fsync that never returns) or gone
/// is not. The listener and the API run on the tokio runtime, which runs
/// this check: a wedged runtime sends no pings either.
fn raft_liveness(
    node: NodeHandle<State>,
) -> impl FnMut() -> std::future::Ready<Result<(), String>> + Send + 'static {
    let stall_max = notify::watchdog_interval()
        .map(|i| (i / 2).max(RAFT_STALL_MAX))
        .unwrap_or(RAFT_STALL_MAX);
    let mut last = (node.ticks(), Instant::now());
    move || {
        let ticks = node.ticks();
        if ticks != last.0 {
            last = (ticks, Instant::now());
        }
        let stalled = last.1.elapsed();
        std::future::ready(if stalled > stall_max {
            Err(format!("the raft loop has not ticked for {stalled:?}"))
        } else {
            Ok(())
        })
    }
}

/// While this member leads: set the pool's group count once, and run the
/// failure detector (a new one per term of leadership, see `detector`).
async fn lead(
    node: NodeHandle<State>,
    (detector, usage, led_since): (
        SharedDetector,
        SharedUsage,
        Arc<std::sync::atomic::AtomicU64>,
    ),
    config: DetectorConfig,
    group_count: u32,
    started: Instant,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(DETECTOR_PERIOD);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u32 = 0;
    let mut settled_at_epoch = 0;
    loop {
        ticks = ticks.wrapping_add(1);
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let status = node.status().borrow().clone();
        if !status.is_leader {
            detector.lock().expect("detector lock").take();
            continue;
        }
        let now = started.elapsed().as_millis() as u64;
        detector
            .lock()
            .expect("detector lock")
            .get_or_insert_with(|| {
                // A new term of leadership: export leases start from nothing.
                led_since.store(now, std::sync::atomic::Ordering::SeqCst);
                FailureDetector::new(config, now)
            });
        let map = match node.read(|s| s.map().clone()).await {
            Ok(m) => m,
            Err(_) => continue, // leadership moved; the next tick sees it
        };
        let mut commands = Vec::new();
        if map.group_count == 0 {
            commands.push(Command::SetGroupCount(SetGroupCount { group_count }));
        }
        // Groups a placement change left with nothing to claim. The check
        // builds the placement tables: once per map epoch, unless some were
        // found (then again each tick until the proposal has applied).
        if map.epoch != settled_at_epoch {
            let view = cairn_proto::groupmap::group_map(&map);
            if cairn_group::authority::unsettled(&view).is_empty() {
                settled_at_epoch = map.epoch;
            } else {
                commands.push(Command::SettlePlacement(SettlePlacement {}));
            }
        }
        if let Some(d) = detector.lock().expect("detector lock").as_mut() {
            let was_isolated = d.suspects_isolation();
            commands.extend(d.tick(now, &map));
            if d.suspects_isolation() && !was_isolated {
                warn!("no chunk server has heartbeaten to this leader lately: marking none down; check this member's network");
            }
        }
        if ticks.is_multiple_of(USAGE_EVERY) {
            // Usage is informational: batched, and only figures that moved.
            let seen = std::mem::take(&mut *usage.lock().expect("usage lock"));
            let nodes: Vec<NodeUsage> = map
                .nodes
                .iter()
                .filter_map(|n| {
                    let used = *seen.get(&n.id)?;
                    (used.abs_diff(n.used_bytes) > USAGE_CHANGE_MIN).then_some(NodeUsage {
                        node_id: n.id,
                        capacity_bytes: n.capacity_bytes,
                        used_bytes: used,
                    })
                })
                .collect();
            if !nodes.is_empty() {
                commands.push(Command::NodeStats(NodeStats { nodes }));
            }
        }
        for command in commands {
            let p = Proposal {
                client_id: 0,
                client_seq: 0,
                proposed_unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                command: Some(command),
            };
            if let Err(e) = node.propose(p.encode_to_vec()).await {
                warn!("leader duty not proposed: {e}");
            }
        }
    }
}

/// Writes the snapshot every initial member starts from: index 1, term 1,
/// the initial members as voters, and an empty state.
fn bootstrap(log: &mut RaftLog, config: &Config) -> Result<(), Fatal> {
    let mut snap = Snapshot::default();
    snap.mut_metadata().index = 1;
    snap.mut_metadata().term = 1;
    snap.mut_metadata().mut_conf_state().voters = config.initial_members.keys().copied().collect();
    snap.data = node::bootstrap_snapshot(&config.initial_members, &State::new()).into();
    log.apply_snapshot(snap)
        .and_then(|()| log.sync())
        .map_err(|e| Fatal::runtime(format!("writing the bootstrap snapshot: {e}")))?;
    info!(members = ?config.initial_members, "new cluster bootstrapped");
    Ok(())
}

/// `member.toml` records which cluster and member a data directory belongs
/// to; starting it as another is refused, never silently adopted.
fn check_identity(config: &Config, fresh: bool) -> Result<(), Fatal> {
    let path = config.data_dir.join("member.toml");
    let want = format!(
        "cluster_id = {:?}\nmember_id = {}\n",
        config.cluster_id, config.member_id
    );
    match std::fs::read_to_string(&path) {
        Ok(have) if have == want => Ok(()),
        Ok(have) => Err(config_error(format!(
            "{} belongs to another member or cluster:\n{have}this process is member {} of cluster {:?}",
            path.display(),
            config.member_id,
            config.cluster_id
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && fresh => {
            let tmp = config.data_dir.join("member.toml.tmp");
            std::fs::write(&tmp, &want)
                .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| config_error(format!("writing {}: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(config_error(format!(
            "{} is missing but the raft log is not empty: this is not a data directory cairn-volmgr made",
            path.display()
        ))),
        Err(e) => Err(config_error(format!("reading {}: {e}", path.display()))),
    }
}

fn lock_data_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, Fatal> {
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| config_error(format!("opening {}: {e}", path.display())))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        config_error(format!(
            "{} is locked: another cairn-volmgr uses this data directory ({e})",
            dir.display()
        ))
    })
}
