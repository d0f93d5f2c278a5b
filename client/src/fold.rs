//! Folding a hidden epoch: a deleted snapshot whose epoch views still read
//! through, and that has one epoch directly above it in every chain
//! (`VolmgrOp::Foldable`). Every block its versions hold is copied up into
//! that child (`Volume::materialize`, a replicated write, so replicas that
//! were away get it pushed at rejoin), the copies are flushed, and the
//! volume manager drops the epoch from every chain (`FoldEpoch`). It is
//! then dead, and each chunk server's collector deletes its versions: what
//! the child had overwritten is freed, and chains get shorter.
//!
//! The copy-up changes no view's bytes and commutes with writes to the
//! child, so a fold runs while the volume is exported; running it twice,
//! or after the epoch stopped being foldable, copies harmlessly and is then
//! refused by the volume manager.
//!
//! **Only while every replica takes the copy-up itself.** A copy-up, unlike
//! a write, depends on what the replica holds beneath the child: each
//! replica fills the blocks its child version lacks from its own versions
//! beneath, through the chain it asks the volume manager for. A replica
//! outside the acting set (rejoining, or down and back) may apply a
//! forwarded copy-up late, after `FoldEpoch` took the folded epoch out of
//! the chain: it then fills those blocks with zeros, held, which hide the
//! data for good once the folded versions are collected, and spread as a
//! primary's pushes. A chaos soak found exactly that (2026-12-07: two of
//! three replicas of a snapshot's block held zeros). So a fold starts only
//! when every group that holds the data id's extents has all its replicas
//! acting, and drops the epoch only if no such group changed its acting
//! set (its interval) before the copies were flushed: every replica then
//! acknowledged every copy-up with the folded epoch still beneath. Else it
//! waits for a later pass.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cairn_proto::volmgr::Foldable;
use cairn_volmgr::client::VolmgrClient;
use tracing::debug;

use crate::cluster::Cluster;
use crate::diff::held_versions;
use crate::error::ClientError;

const BLOCK: u64 = 4096;

/// What one fold did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Folded {
    pub fold: Foldable,
    /// Versions at the folded epoch that held blocks.
    pub versions: u64,
    /// Bytes copied up (block runs the folded versions held).
    pub copied_bytes: u64,
}

/// The runs of set bits in a held-block bitmap (bit `i % 64` of word
/// `i / 64` for block `i`) among the first `blocks`: `(first block, count)`.
pub fn held_runs(bitmap: &[u64], blocks: u64) -> Vec<(u64, u64)> {
    let on = |b: u64| {
        bitmap
            .get(b as usize / 64)
            .is_some_and(|w| w >> (b % 64) & 1 == 1)
    };
    let mut runs = Vec::new();
    let mut b = 0;
    while b < blocks {
        if !on(b) {
            b += 1;
            continue;
        }
        let start = b;
        while b < blocks && on(b) {
            b += 1;
        }
        runs.push((start, b - start));
    }
    runs
}

/// The interval of every group that holds one of the first `extents`
/// extents of `data_id` (at `replicas` replicas), or why folding must wait:
/// one of them is missing replicas from its acting set.
async fn settled_groups(
    volmgr: &VolmgrClient,
    data_id: u64,
    replicas: u32,
    extents: u64,
    what: &str,
) -> Result<Result<BTreeMap<u32, u64>, String>, ClientError> {
    let map = volmgr
        .get_map(0, std::time::Duration::ZERO)
        .await
        .map_err(|e| ClientError::Unavailable(format!("{what}: reading the cluster map: {e}")))?;
    let mut indexes = BTreeSet::new();
    for index in 0..extents {
        let g = cairn_placement::group_of(data_id, index, map.group_count)
            .map_err(|e| ClientError::Unavailable(format!("{what}: {e}")))?;
        indexes.insert(g);
    }
    let mut out = BTreeMap::new();
    for g in indexes {
        let Some(r) = map
            .groups
            .iter()
            .find(|r| r.replicas == replicas && r.index == g)
        else {
            return Ok(Err(format!("group {g}x{replicas} is not in the map")));
        };
        if r.degraded() {
            return Ok(Err(format!(
                "group {g}x{replicas} has {} of its {replicas} replicas acting",
                r.acting.len()
            )));
        }
        out.insert(g, r.interval);
    }
    Ok(Ok(out))
}

/// Folds `f` (from `VolmgrClient::foldable`). `Ok(None)`: not now, because
/// a group of the data id is not whole or changed meanwhile (see the module
/// docs); a later call retries.
pub async fn fold(
    cluster: &Arc<Cluster>,
    volmgr: &VolmgrClient,
    f: Foldable,
) -> Result<Option<Folded>, ClientError> {
    let what = format!(
        "folding epoch {} of data id {} into {}",
        f.epoch, f.data_id, f.child
    );
    let volumes = volmgr
        .list_volumes()
        .await
        .map_err(|e| ClientError::Unavailable(format!("{what}: listing volumes: {e}")))?;
    let of_data: Vec<_> = volumes
        .iter()
        .filter(|v| v.data_volume_id() == f.data_id)
        .collect();
    let Some(base) = of_data.first() else {
        return Err(ClientError::Unavailable(format!(
            "{what}: no live volume has this data id any more"
        )));
    };
    // Whole blocks: a copy-up takes 4 KiB blocks, and a size that is not
    // one's multiple still has its last block in the extent.
    let size = of_data
        .iter()
        .map(|v| v.size_bytes)
        .max()
        .unwrap_or(0)
        .next_multiple_of(BLOCK);
    let below = volmgr
        .epoch_chain(f.data_id, f.child)
        .await
        .map_err(|e| ClientError::Unavailable(format!("{what}: the chain beneath: {e}")))?;
    // The child as a view (it may be a head, a snapshot or hidden itself).
    let view = cairn_proto::map::VolumeInfo {
        name: format!("{}#{}", base.name, f.child),
        head_epoch: f.child,
        chain: below,
        size_bytes: size,
        snapshots: Vec::new(),
        ..(*base).clone()
    };
    let eb = view.extent_size_bytes as u64;
    let (data_id, replicas, extents) = (f.data_id, view.replicas, size.div_ceil(eb));
    let before = match settled_groups(volmgr, data_id, replicas, extents, &what).await? {
        Ok(g) => g,
        Err(why) => {
            debug!("{what} waits: {why}");
            return Ok(None);
        }
    };
    let held = held_versions(cluster, &view, |e| e == f.epoch, size).await?;
    let vol = cluster.volume(view)?;
    let mut done = Folded {
        fold: f,
        versions: 0,
        copied_bytes: 0,
    };
    for ((index, _), bitmap) in held {
        let mut any = false;
        for (start, count) in held_runs(&bitmap, eb / BLOCK) {
            let (at, len) = (index * eb + start * BLOCK, count * BLOCK);
            if at >= size {
                break;
            }
            let len = len.min(size - at);
            vol.materialize(at, len).await?;
            done.copied_bytes += len;
            any = true;
        }
        done.versions += u64::from(any);
    }
    vol.flush().await?;
    match settled_groups(volmgr, data_id, replicas, extents, &what).await? {
        Ok(after) if after == before => {}
        Ok(_) => {
            debug!("{what} waits: a group's acting set changed during the copy-up");
            return Ok(None);
        }
        Err(why) => {
            debug!("{what} waits: {why}");
            return Ok(None);
        }
    }
    volmgr
        .fold_epoch(f.data_id, f.epoch, f.child)
        .await
        .map_err(|e| ClientError::Unavailable(format!("{what}: {e}")))?;
    Ok(Some(done))
}
