//! Garbage collection of extent versions nothing reads any more: the
//! versions of deleted volumes, of deleted snapshots that no other view
//! reads through, and of heads a rollback abandoned and no snapshot kept.
//!
//! Every pass lists the versions this node stores and asks the volume
//! manager for the dead epochs of every data id: epochs it once gave out
//! that no live volume's head or chain and no snapshot references any more.
//! A dead epoch never becomes live again (epochs enter views only when they
//! are created), so deleting its versions can never remove data a view
//! reads. Each node collects its own store; a node that was down catches up
//! on its next pass, and a version a late push brings back is deleted again
//! on the next pass. (So the collector never tells the volume manager to
//! forget an epoch: a node that is down now may still hold its versions.)
//!
//! A deleted snapshot whose epoch is still beneath a live view (hidden) is
//! not dead. When it has one epoch directly above it in every chain, one
//! node (the up chunk server with the lowest id) *folds* it on its passes:
//! copies up what it holds into that child through the group protocol and
//! has the volume manager drop it from every chain (`cairn_client::fold`).
//! It is then dead, and every collector deletes its versions: what the
//! child overwrote is freed. It folds only while every replica of the data
//! id's groups acts (see `cairn_client::fold`), so a degraded cluster keeps
//! hidden epochs until it is whole again. A hidden epoch with several children (read
//! through by a volume and a clone with their own epochs above it) stays.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_client::{ClientConfig, Cluster};
use cairn_volmgr::client::VolmgrClient;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::store::{ExtentKey, Store};

/// Versions listed per store call.
const LIST_PAGE: usize = 4096;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassStats {
    /// Versions stored here when the pass listed them.
    pub versions: u64,
    /// Versions deleted.
    pub deleted: u64,
    /// Their allocated bytes.
    pub freed_bytes: u64,
}

/// Hidden epochs folded per pass at most (each copies up what its versions
/// hold, so a pass stays bounded).
const FOLDS_PER_PASS: usize = 4;

/// Who this node is, and how to reach the volumes, for folding.
pub struct Folding {
    pub node_id: u64,
    pub client: ClientConfig,
}

/// Runs a pass every `interval` until `stop` turns true.
pub async fn run(
    store: Store,
    volmgr: Arc<VolmgrClient>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
    folding: Folding,
) {
    let mut cluster: Option<Arc<Cluster>> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let t0 = Instant::now();
        match pass(&store, &volmgr).await {
            Ok(s) if s.deleted > 0 => info!(
                deleted = s.deleted,
                freed_bytes = s.freed_bytes,
                of = s.versions,
                ms = t0.elapsed().as_millis() as u64,
                "garbage collection deleted extent versions no view reads"
            ),
            Ok(s) => debug!(
                versions = s.versions,
                "garbage collection: nothing to delete"
            ),
            Err(e) => warn!("garbage collection pass failed (the next one retries): {e}"),
        }
        if let Err(e) = fold_pass(&folding, &mut cluster, &volmgr).await {
            warn!("folding hidden epochs failed (the next pass retries): {e}");
        }
    }
}

/// On the up chunk server with the lowest id only: folds up to
/// [`FOLDS_PER_PASS`] foldable hidden epochs.
async fn fold_pass(
    folding: &Folding,
    cluster: &mut Option<Arc<Cluster>>,
    volmgr: &VolmgrClient,
) -> Result<(), String> {
    let map = volmgr
        .get_map(0, Duration::ZERO)
        .await
        .map_err(|e| format!("reading the cluster map: {e}"))?;
    let first = map.nodes.iter().filter(|n| n.up).map(|n| n.id).min();
    if first != Some(folding.node_id) {
        return Ok(());
    }
    let folds = volmgr
        .foldable(None)
        .await
        .map_err(|e| format!("asking for foldable epochs: {e}"))?;
    if folds.is_empty() {
        return Ok(());
    }
    let c = match cluster {
        Some(c) => c.clone(),
        None => {
            let c = Cluster::connect(folding.client.clone())
                .await
                .map_err(|e| format!("connecting the volume client: {e}"))?;
            *cluster = Some(c.clone());
            c
        }
    };
    for f in folds.into_iter().take(FOLDS_PER_PASS) {
        let t0 = Instant::now();
        let Some(done) = cairn_client::fold(&c, volmgr, f)
            .await
            .map_err(|e| e.to_string())?
        else {
            // A group is not whole, or changed during the copy-up: the
            // next pass tries again (cairn_client::fold says why).
            debug!(
                data_id = f.data_id,
                epoch = f.epoch,
                "folding waits until every replica acts"
            );
            return Ok(());
        };
        info!(
            data_id = f.data_id,
            epoch = f.epoch,
            child = f.child,
            versions = done.versions,
            copied_bytes = done.copied_bytes,
            ms = t0.elapsed().as_millis() as u64,
            "folded a hidden epoch into the one above it; its versions are collected next"
        );
    }
    Ok(())
}

/// One pass: lists the store, asks the volume manager, deletes the dead.
pub async fn pass(store: &Store, volmgr: &VolmgrClient) -> Result<PassStats, String> {
    let mut stats = PassStats::default();
    let mut stored: Vec<(ExtentKey, u64)> = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list(None, after, LIST_PAGE)
            .await
            .map_err(|e| format!("listing the store: {e}"))?;
        for e in &page.extents {
            stored.push((e.key, e.allocated_bytes));
            after = Some(e.key);
        }
        if !page.more {
            break;
        }
    }
    stats.versions = stored.len() as u64;
    if stored.is_empty() {
        return Ok(stats);
    }
    let dead: HashMap<u64, HashSet<u64>> = volmgr
        .dead_epochs(None)
        .await
        .map_err(|e| format!("asking the volume manager for dead epochs: {e}"))?
        .into_iter()
        .map(|d| (d.data_id, d.epochs.into_iter().collect()))
        .collect();
    for (key, allocated) in stored {
        if !dead
            .get(&key.volume_id)
            .is_some_and(|epochs| epochs.contains(&key.epoch))
        {
            continue;
        }
        store
            .delete_version(key)
            .await
            .map_err(|e| format!("deleting {key}: {e}"))?;
        stats.deleted += 1;
        stats.freed_bytes += allocated;
    }
    Ok(stats)
}
