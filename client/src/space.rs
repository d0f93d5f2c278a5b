//! Where a volume's space goes: what its head holds, and what each of its
//! snapshots alone holds (what deleting the snapshot would give back).
//!
//! A view (the head, a snapshot) reads each block from the newest epoch of
//! its chain that holds it. A snapshot at epoch E alone holds the blocks E
//! holds that no other view reads from E: every other view containing E has
//! an epoch above E that holds the block too (it was overwritten there). A
//! clone of the snapshot, or a head not yet written over, still reads them.

use std::collections::BTreeMap;

use cairn_proto::map::{SnapshotInfo, VolumeInfo};

use crate::cluster::Cluster;
use crate::diff::held_versions;
use crate::error::ClientError;

const BLOCK: u64 = 4096;

/// The space of one volume, in bytes of 4 KiB blocks (per replica).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Space {
    /// Blocks the head reads from some version (written or zeroed at some
    /// epoch of its chain): the volume's allocated bytes.
    pub allocated_bytes: u64,
    /// Per snapshot (by name, in the record's order): the bytes only it
    /// holds.
    pub snapshot_only_bytes: Vec<(String, u64)>,
}

/// Measures `info`'s space. `family` is every live volume stored under the
/// same data id (`info` included): their views may read its snapshots.
pub async fn space(
    cluster: &Cluster,
    info: &VolumeInfo,
    family: &[VolumeInfo],
) -> Result<Space, ClientError> {
    let mut views: Vec<Vec<u64>> = Vec::new();
    for v in family {
        views.push(v.view());
        views.extend(v.snapshots.iter().map(SnapshotInfo::view));
    }
    let size = family
        .iter()
        .map(|v| v.size_bytes)
        .max()
        .unwrap_or(0)
        .max(info.size_bytes);
    let held = held_versions(cluster, info, |_| true, size).await?;
    // Extent index → epoch → bitmap.
    let mut by_index: BTreeMap<u64, BTreeMap<u64, Vec<u64>>> = BTreeMap::new();
    for ((index, epoch), words) in held {
        by_index.entry(index).or_default().insert(epoch, words);
    }
    let or_of = |versions: &BTreeMap<u64, Vec<u64>>, epochs: &[u64]| -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for e in epochs {
            if let Some(w) = versions.get(e) {
                if out.len() < w.len() {
                    out.resize(w.len(), 0);
                }
                for (o, x) in out.iter_mut().zip(w) {
                    *o |= x;
                }
            }
        }
        out
    };
    let count = |words: &[u64]| words.iter().map(|w| w.count_ones() as u64).sum::<u64>() * BLOCK;
    let head = info.view();
    let mut allocated_bytes = 0;
    let mut only: Vec<u64> = vec![0; info.snapshots.len()];
    for versions in by_index.values() {
        allocated_bytes += count(&or_of(versions, &head));
        for (i, s) in info.snapshots.iter().enumerate() {
            let Some(mine) = versions.get(&s.epoch) else {
                continue;
            };
            let mut alone = mine.clone();
            let own = s.view();
            for v in views.iter().filter(|v| **v != own) {
                let Some(at) = v.iter().position(|&e| e == s.epoch) else {
                    continue;
                };
                let above = or_of(versions, &v[..at]);
                for (j, w) in alone.iter_mut().enumerate() {
                    *w &= above.get(j).copied().unwrap_or(0);
                }
            }
            only[i] += count(&alone);
        }
    }
    Ok(Space {
        allocated_bytes,
        snapshot_only_bytes: info
            .snapshots
            .iter()
            .map(|s| s.name.clone())
            .zip(only)
            .collect(),
    })
}
