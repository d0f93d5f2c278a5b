//! Registration with the volume manager: announce this chunk server (id,
//! address, failure domains, capacity) until the leader accepts it, then
//! heartbeat at the interval the leader asks for, carrying used bytes.
//!
//! The volume manager's failure detector marks a server down when its
//! heartbeats stop, so this task must keep running whatever happens to
//! the volume manager: every error is logged (once per kind of trouble,
//! not once per second) and retried.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_volmgr::client::VolmgrClient;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::replica::Replication;
use crate::store::Store;

/// Pause between registration attempts while the volume manager is away.
const REGISTER_RETRY: Duration = Duration::from_secs(1);
/// Used when the leader does not say (older volume manager).
const HEARTBEAT_DEFAULT: Duration = Duration::from_secs(1);
/// Heartbeat calls give up quickly: a late heartbeat is no heartbeat.
const HEARTBEAT_DEADLINE: Duration = Duration::from_secs(2);

pub struct Registration {
    pub volmgr: Vec<String>,
    pub cluster_id: String,
    pub node_id: u64,
    pub advertise: String,
    pub host: String,
    pub rack: String,
    pub room: String,
    pub weight: u32,
    pub data_dir: PathBuf,
}

/// Registers, then heartbeats until `stop` turns true. With `replication`,
/// heartbeat replies renew its read lease, and once registered it starts
/// following the map from the registration's epoch.
pub async fn run(
    reg: Registration,
    store: Store,
    replication: Option<Replication>,
    mut stop: watch::Receiver<bool>,
) {
    let client = Arc::new(
        VolmgrClient::new(reg.volmgr.clone(), reg.cluster_id.clone())
            .with_deadline(HEARTBEAT_DEADLINE * 5),
    );
    let beats = VolmgrClient::new(reg.volmgr.clone(), reg.cluster_id.clone())
        .with_deadline(HEARTBEAT_DEADLINE);
    let mut interval = HEARTBEAT_DEFAULT;
    let mut complained = false;
    // Register until accepted.
    loop {
        let sent = Instant::now();
        match client
            .register_node(
                reg.node_id,
                &reg.advertise,
                &reg.host,
                &reg.rack,
                &reg.room,
                reg.weight,
                capacity_bytes(&reg.data_dir),
            )
            .await
        {
            Ok(resp) => {
                if resp.heartbeat_interval_ms > 0 {
                    interval = Duration::from_millis(resp.heartbeat_interval_ms as u64);
                }
                info!(
                    node = reg.node_id,
                    advertise = %reg.advertise,
                    heartbeat_ms = interval.as_millis() as u64,
                    epoch = resp.map_epoch,
                    "registered with the volume manager"
                );
                if let Some(r) = &replication {
                    r.lease(sent, resp.lease_ms as u64, resp.map_epoch).await;
                    tokio::spawn(
                        r.clone()
                            .watch_map(client.clone(), resp.map_epoch, stop.clone()),
                    );
                }
                break;
            }
            Err(e) => {
                if !complained {
                    warn!(
                        node = reg.node_id,
                        "cannot register with the volume manager yet: {e}; retrying"
                    );
                    complained = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(REGISTER_RETRY) => {}
            _ = stop.changed() => return,
        }
    }
    // Heartbeat until stopped. A server the admin removed from the map
    // is not registered again behind the admin's back: its heartbeats
    // are ignored until it is registered deliberately (a restart).
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        let used = named_if_stuck(reg.node_id, "the store's usage", store.usage())
            .await
            .map(|u| u.allocated_bytes)
            .unwrap_or(0);
        let sent = Instant::now();
        match beats.heartbeat_lease(reg.node_id, used).await {
            Ok(reply) => {
                if let Some(r) = &replication {
                    let renew = r.lease(sent, reply.lease_ms as u64, reply.map_epoch);
                    named_if_stuck(reg.node_id, "the replication driver's input", renew).await;
                }
                if failing {
                    info!(
                        node = reg.node_id,
                        "heartbeats reach the volume manager again"
                    );
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    warn!(node = reg.node_id, "heartbeat failed: {e}; retrying");
                }
                failing = true;
            }
        }
    }
}

/// How long a heartbeat may wait on this process's own parts before it
/// says which one holds it.
const STUCK_AFTER: Duration = Duration::from_secs(5);

/// Awaits `fut`, with a warning naming `what` if it takes longer than
/// [`STUCK_AFTER`]. Heartbeats still wait for it: a server whose store or
/// replication driver is stuck should be marked down, not look alive. A
/// soak once saw a restarted server's heartbeats stop without any error
/// logged; this says where they stopped.
async fn named_if_stuck<T>(node: u64, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    let mut fut = std::pin::pin!(fut);
    match tokio::time::timeout(STUCK_AFTER, &mut fut).await {
        Ok(v) => v,
        Err(_) => {
            warn!(
                node,
                "heartbeats have waited {STUCK_AFTER:?} for {what}; it is stuck"
            );
            let v = fut.await;
            info!(node, "{what} answered again; heartbeats go on");
            v
        }
    }
}

/// The data directory file system's size, as registered.
fn capacity_bytes(dir: &std::path::Path) -> u64 {
    match nix::sys::statvfs::statvfs(dir) {
        // The statvfs field types are u64 on 64-bit Linux but narrower elsewhere.
        #[allow(clippy::useless_conversion)]
        Ok(fs) => u64::from(fs.blocks()).saturating_mul(u64::from(fs.fragment_size())),
        Err(_) => 0,
    }
}
