//! Listeners and connections: accept on TCP and unix sockets, run the
//! handshake under a deadline, then the transmission phase; on shutdown stop
//! accepting, let every connection answer what it has in flight, and return.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::nbd::handshake::{negotiate, Outcome};
use crate::nbd::transmit::{serve, Counters, End, Limits};
use crate::nbd::{Backend, Catalog};

/// Read buffer per connection (the write side has its own, in transmit).
const READ_BUFFER_BYTES: usize = 64 << 10;

/// How connections are served.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    pub connections_max: usize,
    pub limits: Limits,
    pub handshake_timeout: Duration,
}

/// The listeners one process serves.
pub struct Listeners {
    pub tcp: Vec<TcpListener>,
    /// The socket and its path (removed when serving ends).
    pub unix: Option<(UnixListener, PathBuf)>,
}

/// Connection counters shared by every listener.
#[derive(Default)]
pub struct Stats {
    pub active: AtomicUsize,
    pub accepted: AtomicU64,
}

/// Serves until `shutdown` turns true, then waits for open connections to
/// finish their requests in flight.
pub async fn run<C: Catalog + Clone>(
    catalog: C,
    listeners: Listeners,
    opts: ServeOptions,
    shutdown: watch::Receiver<bool>,
    stats: Arc<Stats>,
) {
    let mut conns = JoinSet::new();
    let mut accept = JoinSet::new();
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel::<Accepted>(64);
    let unix_path = listeners.unix.as_ref().map(|(_, p)| p.clone());
    let all = listeners
        .tcp
        .into_iter()
        .map(Listener::Tcp)
        .chain(listeners.unix.map(|(l, p)| Listener::Unix(l, p)));
    for l in all {
        let tx = conn_tx.clone();
        let mut stop = shutdown.clone();
        accept.spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped(&mut stop) => return,
                    r = l.accept() => match r {
                        Ok(a) => {
                            if tx.send(a).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!("accepting an NBD connection on {}: {e}", l.name());
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        });
    }
    drop(conn_tx);

    let mut stop = shutdown.clone();
    loop {
        let a = tokio::select! {
            _ = stopped(&mut stop) => break,
            a = conn_rx.recv() => match a { Some(a) => a, None => break },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let id = stats.accepted.fetch_add(1, Ordering::Relaxed) + 1;
        if stats.active.load(Ordering::Relaxed) >= opts.connections_max {
            warn!(
                peer = %a.peer,
                "refusing NBD connection {id}: {} connections open (connections_max)",
                opts.connections_max
            );
            continue;
        }
        stats.active.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("nbd", conn = id, peer = %a.peer);
        let catalog = catalog.clone();
        let shutdown = shutdown.clone();
        let stats = stats.clone();
        conns.spawn(
            async move {
                connection(catalog, a, opts, shutdown).await;
                stats.active.fetch_sub(1, Ordering::Relaxed);
            }
            .instrument(span),
        );
    }
    accept.shutdown().await;
    if !conns.is_empty() {
        info!(
            "stopping: waiting for {} NBD connection(s) to finish their requests",
            conns.len()
        );
    }
    while conns.join_next().await.is_some() {}
    if let Some(p) = unix_path {
        let _ = std::fs::remove_file(p);
    }
}

/// Resolves once `rx` says stop (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                let (r, w) = s.into_split();
                Ok(Accepted {
                    peer: peer.to_string(),
                    r: Box::new(r),
                    w: Box::new(w),
                })
            }
            Listener::Unix(l, path) => {
                let (s, _) = l.accept().await?;
                let (r, w) = s.into_split();
                Ok(Accepted {
                    peer: format!("unix:{}", path.display()),
                    r: Box::new(r),
                    w: Box::new(w),
                })
            }
        }
    }

    fn name(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
            Listener::Unix(_, p) => p.display().to_string(),
        }
    }
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

struct Accepted {
    peer: String,
    r: BoxRead,
    w: BoxWrite,
}

async fn connection<C: Catalog>(
    catalog: C,
    a: Accepted,
    opts: ServeOptions,
    shutdown: watch::Receiver<bool>,
) {
    debug!("connected");
    let mut io = tokio::io::join(a.r, a.w);
    let negotiated =
        match tokio::time::timeout(opts.handshake_timeout, negotiate(&mut io, &catalog)).await {
            Err(_) => {
                info!(
                    "closing: the handshake did not finish within {:?}",
                    opts.handshake_timeout
                );
                return;
            }
            Ok(Err(e)) => {
                info!("closing: {e}");
                return;
            }
            Ok(Ok(Outcome::Ended)) => {
                debug!("client ended the handshake");
                return;
            }
            Ok(Ok(Outcome::Go(n))) => n,
        };
    let export = negotiated.export.info().name.clone();
    info!(
        export = %export,
        structured = negotiated.structured,
        allocation = negotiated.allocation,
        "transmission started"
    );
    let (r, w) = io.into_inner();
    let counters = Arc::new(Counters::default());
    // Buffered: a pipelining client's headers arrive many to a segment.
    let r = tokio::io::BufReader::with_capacity(READ_BUFFER_BYTES, r);
    let end = serve(r, w, negotiated, opts.limits, shutdown, counters.clone()).await;
    let c = &counters;
    let line = format!(
        "connection closed ({}): {} requests, {} MiB read, {} MiB written, {} errors",
        match end {
            End::Disconnect => "client disconnected",
            End::Closed => "client closed the connection",
            End::Shutdown => "server stopping",
            End::Dropped => "dropped",
        },
        c.requests.load(Ordering::Relaxed),
        c.bytes_read.load(Ordering::Relaxed) >> 20,
        c.bytes_written.load(Ordering::Relaxed) >> 20,
        c.errors.load(Ordering::Relaxed),
    );
    info!(export = %export, "{line}");
}
