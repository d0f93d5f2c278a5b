//! `cairn-target`: exports every volume of a Cairn cluster over NBD, under
//! its name. Binds its listeners, connects to the cluster (retrying while the
//! volume manager is away), serves until SIGTERM or SIGINT, then stops
//! accepting, lets every connection answer what it has in flight, and exits
//! 0.
//!
//! Exit status: 0 after a clean stop; 2 for a configuration error (including
//! a listen address in use); 1 for a failure while running.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use cairn_client::{ClientConfig, Cluster};
use cairn_daemon::{notify, Fatal};
use cairn_target::config::Config;
use cairn_target::exports::{Registry, RegistryConfig};
use cairn_target::iscsi::{self, serve::IscsiOptions, serve::IscsiStats, Portal};
use cairn_target::server::{self, Listeners, ServeOptions, Stats};
use cairn_volmgr::client::VolmgrClient;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{info, warn};

/// Pause between attempts to reach the volume manager at start.
const CONNECT_RETRY: Duration = Duration::from_secs(1);

fn config_error(message: impl Into<String>) -> Fatal {
    Fatal::config(message)
}

fn runtime_error(message: impl Into<String>) -> Fatal {
    Fatal::runtime(message)
}

fn main() -> ExitCode {
    cairn_daemon::exit("cairn-target", run())
}

fn run() -> Result<(), Fatal> {
    let config = Config::from_args().map_err(|e| config_error(e.to_string()))?;
    cairn_daemon::init_tracing(&config.log_level, config.log_format)?;
    keep_payload_buffers();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.worker_threads {
        builder.worker_threads(n);
    }
    let runtime = builder
        .thread_name("cairn-target")
        .enable_all()
        .build()
        .map_err(|e| runtime_error(format!("cannot start the tokio runtime: {e}")))?;
    let result = runtime.block_on(serve(config));
    runtime.shutdown_timeout(Duration::from_secs(5));
    if result.is_ok() {
        info!("stopped cleanly");
    }
    result
}

/// Largest allocation glibc serves from its heaps rather than by mmap: the
/// most it accepts on 64-bit, the NBD and iSCSI payload limit.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of a heap kept for reuse instead of being given
/// back to the kernel: room for every payload of a busy connection or two.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 32 << 20;

/// Keeps glibc's allocator from giving payload buffers back to the kernel
/// after every request. By default it adapts: a freed 1 MiB write buffer
/// raises the mmap threshold, but the heap of the worker thread that freed
/// it is then trimmed above 2 MiB, so the next buffer is fresh pages again.
/// At 1 MiB NBD writes a quarter of the target's CPU went to page faults,
/// zeroing pages and unmapping them. Fixed thresholds turn that off; RSS
/// stays within what the busiest moment needed (bounded by the in-flight
/// payload limits) plus `TRIM_THRESHOLD` per heap.
fn keep_payload_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (param, value, name) in [
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD, "M_MMAP_THRESHOLD"),
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD, "M_TRIM_THRESHOLD"),
    ] {
        // SAFETY: mallopt only sets a tuning parameter of the allocator and
        // takes no pointers; it runs before the runtime starts its threads.
        if unsafe { libc::mallopt(param, value) } != 1 {
            warn!("glibc refused {name} = {value}; payload buffers may be given back and faulted in per request");
        }
    }
}

async fn serve(config: Config) -> Result<(), Fatal> {
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| runtime_error(format!("cannot install the SIGTERM handler: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| runtime_error(format!("cannot install the SIGINT handler: {e}")))?;
    let (stop_tx, stop_rx) = watch::channel(false);

    let listeners = bind(&config).await?;
    for l in &listeners.tcp {
        if let Ok(a) = l.local_addr() {
            info!("serving NBD on {a} (nbd://{a}/VOLUME)");
        }
    }
    if let Some((_, p)) = &listeners.unix {
        info!("serving NBD on unix socket {}", p.display());
    }
    let iscsi_listeners = bind_iscsi(&config).await?;
    for l in &iscsi_listeners {
        if let Ok(a) = l.local_addr() {
            info!("serving iSCSI on {a} (iscsi://{a}/TARGET-IQN/LUN)");
        }
    }

    let client_cfg = ClientConfig {
        io_timeout: config.io_timeout,
        ..ClientConfig::new(config.volmgr.clone(), config.cluster_id.clone())
    };
    notify::status(&format!(
        "waiting for the cluster {} at {}",
        config.cluster_id,
        config.volmgr.join(",")
    ));
    let cluster = {
        let mut warned = false;
        loop {
            let connect = Cluster::connect(client_cfg.clone());
            let r = tokio::select! {
                r = connect => r,
                s = next_signal(&mut term, &mut int) => {
                    info!("{s} before the cluster was reached: stopping");
                    notify::stopping();
                    return Ok(());
                }
            };
            match r {
                Ok(c) => break c,
                Err(e) => {
                    if !warned {
                        warn!(
                            "cannot reach the cluster yet, retrying every {CONNECT_RETRY:?}: {e}"
                        );
                        warned = true;
                    }
                    tokio::time::sleep(CONNECT_RETRY).await;
                }
            }
        }
    };
    info!(
        epoch = cluster.map_epoch(),
        "connected to cluster {}", config.cluster_id
    );
    let registry = Registry::new(
        cluster,
        VolmgrClient::new(config.volmgr.clone(), config.cluster_id.clone()),
        RegistryConfig {
            target_id: config.target_id,
            read_only: config.read_only,
            default_export: config.default_export.clone(),
            cluster_id: config.cluster_id.clone(),
            volmgr: config.volmgr.clone(),
        },
    );
    let stats = Arc::new(Stats::default());
    let opts = ServeOptions {
        connections_max: config.connections_max,
        limits: config.limits,
        handshake_timeout: config.handshake_timeout,
    };
    let iscsi = if iscsi_listeners.is_empty() {
        None
    } else {
        let portal = Portal::new(registry.clone(), config.iscsi.clone());
        Some(tokio::spawn(iscsi::serve::run(
            portal,
            iscsi_listeners,
            IscsiOptions {
                connections_max: config.connections_max,
                login_timeout: config.handshake_timeout,
            },
            stop_rx.clone(),
            Arc::new(IscsiStats::default()),
        )))
    };
    let mut serving = tokio::spawn(server::run(registry, listeners, opts, stop_rx, stats));
    // Serving: the listeners are bound, the cluster is reached and the NBD
    // server runs. Not before the cluster is reached: until then a client's
    // handshake would wait, and units ordered after this one (a VM) would
    // start against a target that cannot serve.
    notify::ready(&format!(
        "serving NBD for cluster {} on {}",
        config.cluster_id,
        describe_listeners(&config)
    ));
    // Liveness: the runtime schedules tasks (the check is a task on it).
    // The cluster is not part of it: a target cut off from the volume
    // manager or the chunk servers is alive, and restarting it would not
    // help; its clients see I/O errors after --io-timeout-ms instead.
    notify::spawn_watchdog(|| std::future::ready(Ok(())));
    tokio::select! {
        s = next_signal(&mut term, &mut int) => {
            info!("{s}: stopping; connections finish their requests in flight");
            notify::stopping();
            let _ = stop_tx.send(true);
        }
        r = &mut serving => {
            return Err(runtime_error(format!("the NBD server stopped unexpectedly: {r:?}")));
        }
    }
    tokio::select! {
        _ = async {
            let _ = (&mut serving).await;
            if let Some(i) = iscsi {
                let _ = i.await;
            }
        } => Ok(()),
        s = next_signal(&mut term, &mut int) => {
            Err(runtime_error(format!("{s} again: stopping without waiting for requests in flight")))
        }
    }
}

async fn next_signal(
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> &'static str {
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

async fn bind(config: &Config) -> Result<Listeners, Fatal> {
    let mut tcp = Vec::new();
    for a in &config.listen {
        let l = TcpListener::bind(a).await.map_err(|e| {
            config_error(format!(
                "cannot listen on {a} (--listen): {e}{}",
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    "; another process (another cairn-target?) is using it"
                } else {
                    ""
                }
            ))
        })?;
        tcp.push(l);
    }
    let unix = match &config.unix {
        None => None,
        Some(p) => {
            if p.exists() {
                // A socket left by a process that died can be replaced; one
                // that answers belongs to a live server.
                if std::os::unix::net::UnixStream::connect(p).is_ok() {
                    return Err(config_error(format!(
                        "unix socket {} (--unix) is in use by another process",
                        p.display()
                    )));
                }
                std::fs::remove_file(p).map_err(|e| {
                    config_error(format!(
                        "cannot remove the stale unix socket {} (--unix): {e}",
                        p.display()
                    ))
                })?;
            }
            let l = UnixListener::bind(p).map_err(|e| {
                config_error(format!(
                    "cannot listen on unix socket {} (--unix): {e}",
                    p.display()
                ))
            })?;
            Some((l, p.clone()))
        }
    };
    Ok(Listeners { tcp, unix })
}

async fn bind_iscsi(config: &Config) -> Result<Vec<TcpListener>, Fatal> {
    let mut all = Vec::new();
    for a in &config.iscsi_listen {
        let l = TcpListener::bind(a).await.map_err(|e| {
            config_error(format!(
                "cannot listen on {a} (--iscsi-listen): {e}{}",
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    "; another iSCSI target (tgtd, LIO, another cairn-target?) is using it"
                } else {
                    ""
                }
            ))
        })?;
        all.push(l);
    }
    Ok(all)
}

fn describe_listeners(config: &Config) -> String {
    let mut all: Vec<String> = config.listen.iter().map(|a| a.to_string()).collect();
    all.extend(config.iscsi_listen.iter().map(|a| format!("iscsi {a}")));
    if let Some(p) = &config.unix {
        all.push(p.display().to_string());
    }
    all.join(", ")
}
