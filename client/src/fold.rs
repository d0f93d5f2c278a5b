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

use std::sync::Arc;

use cairn_proto::volmgr::Foldable;
use cairn_volmgr::client::VolmgrClient;

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

/// Folds `f` (from `VolmgrClient::foldable`).
pub async fn fold(
    cluster: &Arc<Cluster>,
    volmgr: &VolmgrClient,
    f: Foldable,
) -> Result<Folded, ClientError> {
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
    volmgr
        .fold_epoch(f.data_id, f.epoch, f.child)
        .await
        .map_err(|e| ClientError::Unavailable(format!("{what}: {e}")))?;
    Ok(done)
}
