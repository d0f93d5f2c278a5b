//! `cairn-target`: exports every volume of a Cairn cluster over NBD, under
//! its name. Binds its listeners, connects to the cluster (retrying while the
//! volume manager is away), serves until SIGTERM or SIGINT, then stops
//! accepting, lets every connection answer what it has in flight, and exits
//! 0.
//!
//! Exit status: 0 after a clean stop; 2 for a configuration error (including
//! a listen address in use); 1 for a failure while running.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use cairn_client::{ClientConfig, Cluster};
use cairn_target::config::{Config, LogFormat};
use cairn_target::exports::{Registry, RegistryConfig};
use cairn_target::server::{self, Listeners, ServeOptions, Stats};
use cairn_volmgr::client::VolmgrClient;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

const EXIT_CONFIG: u8 = 2;
const EXIT_RUNTIME: u8 = 1;
/// Pause between attempts to reach the volume manager at start.
const CONNECT_RETRY: Duration = Duration::from_secs(1);

struct Fatal {
    code: u8,
    message: String,
}

fn config_error(message: impl Into<String>) -> Fatal {
    Fatal {
        code: EXIT_CONFIG,
        message: message.into(),
    }
}

fn runtime_error(message: impl Into<String>) -> Fatal {
    Fatal {
        code: EXIT_RUNTIME,
        message: message.into(),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("cairn-target: error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn run() -> Result<(), Fatal> {
    let config = Config::from_args().map_err(|e| config_error(e.to_string()))?;
    init_tracing(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
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

    let client_cfg = ClientConfig {
        io_timeout: config.io_timeout,
        ..ClientConfig::new(config.volmgr.clone(), config.cluster_id.clone())
    };
    let cluster = {
        let mut warned = false;
        loop {
            let connect = Cluster::connect(client_cfg.clone());
            let r = tokio::select! {
                r = connect => r,
                s = next_signal(&mut term, &mut int) => {
                    info!("{s} before the cluster was reached: stopping");
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
        },
    );
    let stats = Arc::new(Stats::default());
    let opts = ServeOptions {
        connections_max: config.connections_max,
        limits: config.limits,
        handshake_timeout: config.handshake_timeout,
    };
    let mut serving = tokio::spawn(server::run(registry, listeners, opts, stop_rx, stats));
    tokio::select! {
        s = next_signal(&mut term, &mut int) => {
            info!("{s}: stopping; connections finish their requests in flight");
            let _ = stop_tx.send(true);
        }
        r = &mut serving => {
            return Err(runtime_error(format!("the NBD server stopped unexpectedly: {r:?}")));
        }
    }
    tokio::select! {
        _ = &mut serving => Ok(()),
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

fn init_tracing(config: &Config) -> Result<(), Fatal> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v)
            .map_err(|e| config_error(format!("invalid RUST_LOG={v:?}: {e}")))?,
        _ => EnvFilter::try_new(&config.log_level).map_err(|e| {
            config_error(format!(
                "invalid log_level {:?} (--log-level / log_level): {e}",
                config.log_level
            ))
        })?,
    };
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let installed = match config.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Journal => builder.without_time().try_init(),
    };
    installed.map_err(|e| runtime_error(format!("cannot install the logger: {e}")))
}
