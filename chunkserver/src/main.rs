//! `cairn-chunkserver`: one per node (or per disk). Checks and locks the data
//! directory, opens the extent store, serves the chunk RPC, and on SIGTERM or
//! SIGINT stops taking requests, lets the ones in flight finish, shuts the
//! store down cleanly and exits 0.
//!
//! Exit status: 0 after a clean stop; 2 when the configuration or the data
//! directory is wrong (restarting will not help, and the systemd unit does
//! not); 1 for a failure while running; 128 + the signal's number when a
//! second signal cut the shutdown short.

use std::process::ExitCode;
use std::time::Duration;

use cairn_chunkserver::config::{Config, Threads};
use cairn_chunkserver::datadir::{DataDir, DataDirOptions};
use cairn_chunkserver::store::Store;
use cairn_chunkserver::{collector, registration, replica, rpc};
use cairn_daemon::{notify, Fatal};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

/// The RPC tasks do little but wait on sockets and the store's engine thread.
const WORKER_THREADS: usize = 2;
/// After the store has shut down, how long dropping the runtime may wait for
/// stray blocking tasks before the process exits anyway.
const RUNTIME_SHUTDOWN_MAX: Duration = Duration::from_secs(5);
/// File descriptors beyond the store's and the connections' (logs, the ring,
/// the listener, LOCK, directory handles).
const FDS_SPARE: u64 = 64;

fn main() -> ExitCode {
    cairn_daemon::exit("cairn-chunkserver", run())
}

fn run() -> Result<(), Fatal> {
    let config = Config::from_args().map_err(|e| Fatal::config(e.to_string()))?;
    cairn_daemon::init_tracing(&config.log_level, config.log_format)?;
    raise_open_files_limit(&config);

    let data_dir = DataDir::open(&DataDirOptions {
        dir: config.data_dir.clone(),
        cluster_id: config.cluster_id.clone(),
        node_id: config.node_id,
        init: config.init,
        free_bytes_min: config.free_bytes_min,
    })
    .map_err(|e| Fatal::config(e.to_string()))?;
    if data_dir.formatted() {
        info!(
            "formatted data dir {} as node {} of cluster {}",
            data_dir.path().display(),
            config.node_id,
            config.cluster_id
        );
    }

    // --threads single: one thread runs the connections, the replication
    // driver and the store's engine (an inline task); blocking calls still
    // go to tokio's blocking pool.
    let mut builder = if config.threads == Threads::Single {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(WORKER_THREADS);
        b
    };
    let runtime = builder
        .thread_name("cairn-chunkserver")
        .enable_all()
        .build()
        .map_err(|e| Fatal::runtime(format!("cannot start the tokio runtime: {e}")))?;
    let result = runtime.block_on(serve_until_signal(&config, &data_dir));
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_MAX);
    // The lock is released only now, after the store has shut down.
    drop(data_dir);
    if result.is_ok() {
        info!("stopped cleanly");
    }
    result
}

/// Opens the store, serves until SIGTERM or SIGINT, then stops in order:
/// no new requests, in-flight ones finish, the store flushes and is marked
/// clean.
async fn serve_until_signal(config: &Config, data_dir: &DataDir) -> Result<(), Fatal> {
    // Before anything can be served, so that from the moment the port accepts
    // a signal means a clean stop rather than the default instant death.
    let mut signals = Signals::new()?;

    let extents_dir = data_dir.extents_dir();
    let options = config.store_options();
    let open_dir = extents_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&open_dir, options))
        .await
        .map_err(|e| Fatal::runtime(format!("opening the extent store panicked: {e}")))?
        .map_err(|e| {
            Fatal::config(format!(
                "cannot open the extent store in {}: {e}",
                extents_dir.display()
            ))
        })?;

    let listener = match TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            shutdown_store(&store, &mut signals).await?;
            return Err(Fatal::runtime(format!(
                "cannot listen on {}: {e} (check --listen / listen, and that no other server uses the port)",
                config.listen
            )));
        }
    };
    let local_addr = listener
        .local_addr()
        .map_err(|e| Fatal::runtime(format!("reading the listening address: {e}")))?;
    info!(
        "cairn-chunkserver node {} of cluster {} serving on {}, data dir {}",
        config.node_id,
        config.cluster_id,
        local_addr,
        data_dir.path().display()
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    // Replication runs when there is a volume manager to take maps from.
    let replication = if config.volmgr.is_empty() {
        None
    } else {
        let opened = match replica::journal::Journal::open(data_dir.path()) {
            Ok(opened) => opened,
            Err(e) => {
                shutdown_store(&store, &mut signals).await?;
                return Err(Fatal::config(e));
            }
        };
        if opened.truncated_bytes > 0 {
            warn!(
                "group journal: cut a torn tail of {} bytes after {} records",
                opened.truncated_bytes, opened.records
            );
        }
        info!(
            records = opened.records,
            groups = opened.durable.groups.len(),
            "group journal replayed"
        );
        let volmgr = std::sync::Arc::new(cairn_volmgr::client::VolmgrClient::new(
            config.volmgr.clone(),
            config.cluster_id.clone(),
        ));
        tokio::spawn(collector::run(
            store.clone(),
            volmgr.clone(),
            config.gc_interval,
            stop_rx.clone(),
            collector::Folding {
                node_id: config.node_id,
                client: cairn_client::ClientConfig {
                    volmgr: config.volmgr.clone(),
                    cluster_id: config.cluster_id.clone(),
                    ..cairn_client::ClientConfig::default()
                },
            },
        ));
        let (replication, _driver) = replica::Replication::start(
            replica::ReplicaConfig {
                node_id: config.node_id,
                core: cairn_group::node::Config::default(),
                volmgr: Some(volmgr),
            },
            store.clone(),
            opened,
            stop_rx.clone(),
        );
        Some(replication)
    };
    if !config.volmgr.is_empty() {
        tokio::spawn(registration::run(
            registration::Registration {
                volmgr: config.volmgr.clone(),
                cluster_id: config.cluster_id.clone(),
                node_id: config.node_id,
                advertise: config.advertise.to_string(),
                host: config.host.clone(),
                rack: config.rack.clone(),
                room: config.room.clone(),
                weight: config.weight,
                data_dir: data_dir.path().to_path_buf(),
            },
            store.clone(),
            replication.clone(),
            stop_rx.clone(),
        ));
    }
    let mut serving = tokio::spawn(rpc::serve(
        listener,
        store.clone(),
        config.server_config(),
        replication,
        stop_rx,
    ));
    // Serving: the store is open, the listener bound and its task running,
    // registration (if any) started.
    notify::ready(&format!(
        "node {} serving on {local_addr}{}",
        config.node_id,
        if config.volmgr.is_empty() {
            ", not registered (no volmgr)"
        } else {
            ""
        }
    ));
    notify::spawn_watchdog(store_liveness(store.clone()));
    let ended_first = tokio::select! {
        joined = &mut serving => Some(serve_outcome(joined, false)),
        name = signals.next() => {
            info!("received {name}: stopping; requests in flight finish first");
            notify::stopping();
            None
        }
    };
    let served = match ended_first {
        Some(outcome) => outcome,
        None => {
            // An error means serve() has already returned; the join below
            // reports how.
            let _ = stop_tx.send(true);
            tokio::select! {
                joined = &mut serving => serve_outcome(joined, true),
                name = signals.next() => exit_now(name),
            }
        }
    };
    if let Err(failure) = &served {
        error!("{}", failure.message);
    }
    // Shut the store down cleanly whatever happened to the server: it flushes
    // what was acknowledged and marks the store clean for the next start.
    shutdown_store(&store, &mut signals).await?;
    served
}

type LivenessCheck =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// The watchdog's liveness check: every store engine thread answers a usage
/// query (a round trip through each engine's command queue and loop), which
/// also shows the tokio runtime running the check schedules tasks. An engine
/// stuck in its ring or a lock, or a runtime wedged, stops the pings. It
/// does not look at the volume manager or the peers: a server cut off from
/// them is alive, and restarting it would not help.
fn store_liveness(store: Store) -> impl FnMut() -> LivenessCheck + Send + 'static {
    move || {
        let store = store.clone();
        Box::pin(async move {
            store
                .usage()
                .await
                .map(|_| ())
                .map_err(|e| format!("the store does not answer: {e}"))
        })
    }
}

/// What serve()'s end means: returning after a stop request is the only
/// good outcome.
fn serve_outcome(
    joined: Result<anyhow::Result<()>, tokio::task::JoinError>,
    stop_requested: bool,
) -> Result<(), Fatal> {
    match joined {
        Ok(Ok(())) if stop_requested => Ok(()),
        Ok(Ok(())) => Err(Fatal::runtime(
            "the chunk RPC server stopped without being asked to",
        )),
        Ok(Err(e)) => Err(Fatal::runtime(format!(
            "the chunk RPC server failed: {e:#}"
        ))),
        Err(e) => Err(Fatal::runtime(format!(
            "the chunk RPC server task failed: {e}"
        ))),
    }
}

async fn shutdown_store(store: &Store, signals: &mut Signals) -> Result<(), Fatal> {
    debug!("shutting the store down");
    tokio::select! {
        result = store.shutdown() => result.map_err(|e| {
            Fatal::runtime(format!(
                "store shutdown failed: {e}; the next start will recover the store"
            ))
        }),
        name = signals.next() => exit_now(name),
    }
}

/// A second signal during shutdown: the operator wants the process gone now.
/// What was acknowledged is durable or recoverable; the store recovers on the
/// next start as after a crash.
fn exit_now(name: &'static str) -> ! {
    warn!("received {name} again during shutdown: exiting now, without a clean store shutdown");
    let signo = if name == "SIGINT" {
        libc::SIGINT
    } else {
        libc::SIGTERM
    };
    std::process::exit(128 + signo)
}

/// SIGTERM (systemd, `cairn up`, kill) and SIGINT (Ctrl-C).
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn new() -> Result<Signals, Fatal> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind)
                .map_err(|e| Fatal::runtime(format!("cannot install the {name} handler: {e}")))
        };
        Ok(Signals {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    /// The name of the next signal received.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: the store keeps two file
/// descriptors per open extent, and the default soft limit (often 1024) is
/// far below `open_extents_max`. Warns, rather than fails, when even the hard
/// limit is short: the store closes idle extents when it runs out.
fn raise_open_files_limit(config: &Config) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(
            "cannot read RLIMIT_NOFILE: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            debug!(
                "raised the open files limit from {} to {}",
                limit.rlim_cur, limit.rlim_max
            );
            limit = raised;
        } else {
            warn!(
                "cannot raise RLIMIT_NOFILE from {} to {}: {}",
                limit.rlim_cur,
                limit.rlim_max,
                std::io::Error::last_os_error()
            );
        }
    }
    let needed =
        2 * config.store.open_extents_max as u64 + config.connections_max as u64 + FDS_SPARE;
    if limit.rlim_cur < needed {
        warn!(
            "open files limit is {} but open_extents_max {} and connections_max {} need about {needed}; raise LimitNOFILE (systemd) or ulimit -n",
            limit.rlim_cur, config.store.open_extents_max, config.connections_max
        );
    }
}
