//! iSCSI listeners and connections: accept, log in under a deadline, open
//! the target's LUNs, run the full feature phase. Session reinstatement
//! (RFC 7143 6.3.5): a new login from the same initiator port to the same
//! target ends the old session first, as an initiator that lost its
//! connection expects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

use super::login::{login, LoginError};
use super::scsi::Lun;
use super::session::{self, Counters, End, Luns};
use super::text::SessionType;
use super::Portal;
use crate::backend::{Backend, Catalog};
use crate::server::stopped;

/// How connections are served.
#[derive(Debug, Clone, Copy)]
pub struct IscsiOptions {
    pub connections_max: usize,
    pub login_timeout: Duration,
}

/// Connection counters.
#[derive(Default)]
pub struct IscsiStats {
    pub active: AtomicUsize,
    pub accepted: AtomicU64,
}

type Unit<C> = Lun<<C as Catalog>::Export, <C as Catalog>::Reservations>;
/// Open exports by name, with their logical units.
type Units<C> = HashMap<String, (Weak<<C as Catalog>::Export>, Weak<Unit<C>>)>;
/// Live sessions by (initiator, ISID, target): their connection id, stop
/// signal, and a flag that turns true once they have ended.
type Sessions =
    HashMap<(String, [u8; 6], String), (u64, watch::Sender<bool>, watch::Receiver<bool>)>;

/// What every connection of the process shares.
struct Shared<C: Catalog> {
    portal: Arc<Portal<C>>,
    /// One logical unit per open export, shared by every session that
    /// uses it (reservations and COMPARE AND WRITE act across sessions).
    units: Mutex<Units<C>>,
    /// Live sessions by (initiator, ISID, target), for reinstatement.
    sessions: Mutex<Sessions>,
    next_tsih: AtomicU16,
    opts: IscsiOptions,
}

/// Serves iSCSI on `listeners` until `shutdown` turns true, then lets every
/// connection answer what it has in flight.
pub async fn run<C: Catalog>(
    portal: Arc<Portal<C>>,
    listeners: Vec<TcpListener>,
    opts: IscsiOptions,
    shutdown: watch::Receiver<bool>,
    stats: Arc<IscsiStats>,
) {
    let shared = Shared::new(portal, opts);
    let mut conns = JoinSet::new();
    let mut accept = JoinSet::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(TcpStream, String)>(64);
    for l in listeners {
        let tx = tx.clone();
        let mut stop = shutdown.clone();
        accept.spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped(&mut stop) => return,
                    r = l.accept() => match r {
                        Ok((s, peer)) => {
                            let _ = s.set_nodelay(true);
                            if tx.send((s, peer.to_string())).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!("accepting an iSCSI connection: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        });
    }
    drop(tx);
    let mut stop = shutdown.clone();
    loop {
        let (s, peer) = tokio::select! {
            _ = stopped(&mut stop) => break,
            a = rx.recv() => match a { Some(a) => a, None => break },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let id = stats.accepted.fetch_add(1, Ordering::Relaxed) + 1;
        if stats.active.load(Ordering::Relaxed) >= opts.connections_max {
            warn!(%peer, "refusing iSCSI connection {id}: {} connections open (connections_max)", opts.connections_max);
            continue;
        }
        stats.active.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("iscsi", conn = id, %peer);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let stats = stats.clone();
        conns.spawn(
            async move {
                connection(&shared, s, id, shutdown).await;
                stats.active.fetch_sub(1, Ordering::Relaxed);
            }
            .instrument(span),
        );
    }
    accept.shutdown().await;
    while conns.join_next().await.is_some() {}
}

/// Serves one connection over an in-memory stream, as a process of its
/// own would: for the fuzzer and the protocol tests.
pub async fn serve_stream<C, R, W>(
    portal: Arc<Portal<C>>,
    r: R,
    w: W,
    opts: IscsiOptions,
    shutdown: watch::Receiver<bool>,
) where
    C: Catalog,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let shared = Shared::new(portal, opts);
    serve_connection(&shared, r, w, "127.0.0.1:3260".into(), 1, shutdown).await;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<C: Catalog> Shared<C> {
    fn new(portal: Arc<Portal<C>>, opts: IscsiOptions) -> Arc<Self> {
        Arc::new(Shared {
            portal,
            units: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            next_tsih: AtomicU16::new(1),
            opts,
        })
    }

    /// The logical unit of `export`, shared while any session holds it.
    fn unit(&self, name: &str, export: Arc<C::Export>, lun: u64) -> Arc<Unit<C>> {
        let mut units = lock(&self.units);
        units.retain(|_, (e, u)| e.strong_count() > 0 && u.strong_count() > 0);
        if let Some((e, u)) = units.get(name) {
            if let (Some(e), Some(u)) = (e.upgrade(), u.upgrade()) {
                // The same export object (not one reopened after a
                // rollback) keeps its unit.
                if Arc::ptr_eq(&e, &export) {
                    return u;
                }
            }
        }
        let store = self.portal.catalog.reservations(name, &export);
        let u = Arc::new(Lun::with_store(export.clone(), lun, store));
        let hook: Weak<dyn crate::backend::ReservationsHook> = Arc::downgrade(&u) as _;
        self.portal.catalog.watch_reservations(&export, hook);
        units.insert(
            name.to_string(),
            (Arc::downgrade(&export), Arc::downgrade(&u)),
        );
        u
    }
}

async fn connection<C: Catalog>(
    shared: &Arc<Shared<C>>,
    s: TcpStream,
    id: u64,
    shutdown: watch::Receiver<bool>,
) {
    let address = match s.local_addr() {
        Ok(a) => a.to_string(),
        Err(e) => {
            warn!("closing: no local address: {e}");
            return;
        }
    };
    let (r, w) = s.into_split();
    serve_connection(shared, r, w, address, id, shutdown).await;
}

/// One connection over any byte stream (the fuzzer and the tests use
/// in-memory pipes). `address` is this end's `HOST:PORT`, for SendTargets.
async fn serve_connection<C, R, W>(
    shared: &Arc<Shared<C>>,
    r: R,
    w: W,
    address: String,
    id: u64,
    shutdown: watch::Receiver<bool>,
) where
    C: Catalog,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let r = tokio::io::BufReader::with_capacity(64 << 10, r);
    let mut io = tokio::io::join(r, w);
    let tsih = loop {
        let t = shared.next_tsih.fetch_add(1, Ordering::Relaxed);
        if t != 0 {
            break t;
        }
    };
    let est = match tokio::time::timeout(
        shared.opts.login_timeout,
        login(&mut io, &shared.portal, tsih),
    )
    .await
    {
        Err(_) => {
            info!(
                "closing: the login did not finish within {:?}",
                shared.opts.login_timeout
            );
            return;
        }
        Ok(Err(LoginError::Refused { status, why })) => {
            info!("login refused ({status:#06x}): {why}");
            return;
        }
        Ok(Err(e)) => {
            info!("closing: {e}");
            return;
        }
        Ok(Ok(e)) => e,
    };
    let (target, luns, exports) = match (&est.session_type, &est.target) {
        (SessionType::Normal, Some(t)) => {
            let mut luns: Luns<C> = Vec::new();
            let mut exports = Vec::new();
            for (n, name) in t.luns.iter().enumerate() {
                match shared.portal.catalog.open(name).await {
                    Ok(Some(e)) => {
                        luns.push((n as u64, shared.unit(name, e.clone(), n as u64)));
                        exports.push(e);
                    }
                    Ok(None) => warn!(target = %t.iqn, "LUN {n}: no volume {name}; left out"),
                    Err(e) => warn!(target = %t.iqn, "LUN {n}: cannot open {name}: {e}; left out"),
                }
            }
            (t.iqn.clone(), luns, exports)
        }
        _ => (String::new(), Vec::new(), Vec::new()),
    };
    info!(
        initiator = %est.initiator,
        target = %target,
        luns = luns.len(),
        header_digest = est.params.header_digest,
        data_digest = est.params.data_digest,
        "session {tsih} logged in{}",
        if est.session_type == SessionType::Discovery { " (discovery)" } else { "" }
    );
    // This session's stop: the process stopping, a newer login of the
    // same initiator port (reinstatement), or a LUN's volume rolled back
    // under it (the initiator logs in again and sees what it is now).
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ended_tx, ended_rx) = watch::channel(false);
    let key = (est.initiator.to_ascii_lowercase(), est.isid, target.clone());
    if est.session_type == SessionType::Normal {
        let old = lock(&shared.sessions).insert(key.clone(), (id, stop_tx.clone(), ended_rx));
        if let Some((old, tx, mut ended)) = old {
            // The old session ends (its nexus is lost, releasing what it
            // held) before this one runs a command on the same nexus.
            info!("reinstating: ending the initiator's previous session (connection {old})");
            let _ = tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(30), ended.wait_for(|e| *e)).await;
        }
    }
    let watcher = {
        let stop_tx = stop_tx.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            type Revoked<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;
            let mut all: Vec<Revoked<'_>> = exports
                .iter()
                .map(|e| Box::pin(e.revoked()) as Revoked<'_>)
                .collect();
            all.push(Box::pin(std::future::pending()));
            let revoked = futures::future::select_all(all);
            tokio::select! {
                _ = stopped(&mut shutdown) => {}
                _ = revoked => info!("a LUN's volume was rolled back: ending the session"),
            }
            let _ = stop_tx.send(true);
        })
    };
    let counters = Arc::new(Counters::default());
    let (r, w) = io.into_inner();
    let end = session::run(
        r,
        w,
        est,
        shared.portal.clone(),
        luns,
        format!("{target},t,0x0001"),
        address,
        stop_rx,
        counters.clone(),
    )
    .await;
    watcher.abort();
    let _ = ended_tx.send(true);
    {
        let mut sessions = lock(&shared.sessions);
        if sessions.get(&key).map(|(c, _, _)| *c) == Some(id) {
            sessions.remove(&key);
        }
    }
    let c = &counters;
    let how = match &end {
        End::Logout => "logged out".to_string(),
        End::Closed => "initiator closed the connection".to_string(),
        End::Shutdown => "stopped".to_string(),
        End::Dropped(why) => format!("dropped: {why}"),
    };
    let line = format!(
        "connection closed ({how}): {} commands, {} MiB read, {} MiB written, {} errors",
        c.commands.load(Ordering::Relaxed),
        c.bytes_read.load(Ordering::Relaxed) >> 20,
        c.bytes_written.load(Ordering::Relaxed) >> 20,
        c.errors.load(Ordering::Relaxed),
    );
    if matches!(end, End::Dropped(_)) {
        warn!("{line}");
    } else {
        info!("{line}");
    }
    debug!("session {tsih} ended");
}
