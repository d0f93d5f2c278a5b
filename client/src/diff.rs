//! What changed between two views of one volume (two snapshots, or a
//! snapshot and the head): the ranges an incremental backup must copy.
//!
//! A view is a chain of epochs, newest first. A block reads the same in both
//! views unless some version on one chain and not on the other holds it
//! (written or zeroed in that version); the versions both chains share hold
//! the same blocks for both. So the changed blocks are the union of what the
//! versions at the chains' differing epochs hold. That is a superset (a
//! block rewritten with the same bytes counts as changed), never a subset.
//! Every acknowledged write is on every acting replica of its group, so one
//! acting replica per group is asked.

use std::collections::{BTreeMap, BTreeSet};

use cairn_group::GroupKey;
use cairn_proto::chunk::{ExtentKey, EXTENT_LIST_PAGE_MAX};
use cairn_proto::groupmap::group_record;
use cairn_proto::map::VolumeInfo;

use crate::cluster::Cluster;
use crate::error::ClientError;

const BLOCK: u64 = 4096;

/// One changed byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    pub offset: u64,
    pub len: u64,
}

/// Which blocks each stored version of `info`'s data holds, from the first
/// acting replica of each extent's group: `(extent index, epoch)` → bitmap
/// (bit `i` of word `i / 64` for block `i`), for the versions whose epoch
/// `wanted` accepts and whose extent starts below `size`.
pub(crate) async fn held_versions(
    cluster: &Cluster,
    info: &VolumeInfo,
    wanted: impl Fn(u64) -> bool,
    size: u64,
) -> Result<BTreeMap<(u64, u64), Vec<u64>>, ClientError> {
    let data_id = info.data_volume_id();
    let eb = info.extent_size_bytes as u64;
    let snap = cluster.snapshot();
    let map = &snap.map;
    let unavailable =
        |why: String| ClientError::Unavailable(format!("volume {}: {why}", info.name));
    // The node asked for each group: its first acting replica.
    let asked = |index: u64| -> Result<u64, ClientError> {
        let g = cairn_placement::group_of(data_id, index, map.group_count)
            .map_err(|e| unavailable(format!("map epoch {}: {e}", map.epoch)))?;
        let key = GroupKey {
            replicas: info.replicas,
            index: g,
        };
        group_record(map, key)
            .and_then(|r| r.acting.first().copied())
            .ok_or_else(|| {
                unavailable(format!(
                    "{key} has no acting replica in map epoch {}",
                    map.epoch
                ))
            })
    };
    let nodes: BTreeSet<u64> = map
        .groups
        .iter()
        .filter(|g| g.replicas == info.replicas)
        .filter_map(|g| g.acting.first().copied())
        .collect();
    let attempt = cluster.config().attempt_timeout;
    let mut out: BTreeMap<(u64, u64), Vec<u64>> = BTreeMap::new();
    for node in nodes {
        let addr = map
            .node(node)
            .map(|n| n.addr.clone())
            .ok_or_else(|| unavailable(format!("node {node} is not in map epoch {}", map.epoch)))?;
        let conn = cluster
            .pool
            .get(&addr)
            .await
            .map_err(|e| unavailable(format!("node {node} at {addr}: {e}")))?;
        let mut after: Option<ExtentKey> = None;
        loop {
            let page = tokio::time::timeout(
                attempt,
                conn.extent_list(Some(data_id), after, EXTENT_LIST_PAGE_MAX),
            )
            .await
            .map_err(|_| unavailable(format!("node {node}: no extent list within {attempt:?}")))?
            .map_err(|e| unavailable(format!("listing extents at node {node}: {e}")))?;
            for e in &page.extents {
                let Some(key) = e.key else { continue };
                after = Some(key);
                if !wanted(key.epoch)
                    || key.extent_index * eb >= size
                    || asked(key.extent_index)? != node
                {
                    continue;
                }
                let what = format!(
                    "node {node}: which blocks extent {} epoch {} holds",
                    key.extent_index, key.epoch
                );
                let held = tokio::time::timeout(attempt, conn.extent_held(key))
                    .await
                    .map_err(|_| unavailable(format!("{what}: no answer within {attempt:?}")))?
                    .map_err(|e| unavailable(format!("{what}: {e}")))?;
                out.insert((key.extent_index, key.epoch), held);
            }
            if !page.more {
                break;
            }
        }
    }
    Ok(out)
}

/// The ranges that may differ between the view `from` and the view `to`
/// (each: an epoch, then the epochs beneath it, newest first) of volume
/// `info`, clipped to `size`, in offset order, adjacent ranges merged.
pub async fn changed_ranges(
    cluster: &Cluster,
    info: &VolumeInfo,
    from: &[u64],
    to: &[u64],
    size: u64,
) -> Result<Vec<Changed>, ClientError> {
    let a: BTreeSet<u64> = from.iter().copied().collect();
    let b: BTreeSet<u64> = to.iter().copied().collect();
    let differing: BTreeSet<u64> = a.symmetric_difference(&b).copied().collect();
    if differing.is_empty() {
        return Ok(Vec::new());
    }
    let eb = info.extent_size_bytes as u64;
    let held = held_versions(cluster, info, |e| differing.contains(&e), size).await?;
    // Extent index → bitmap of changed blocks.
    let mut changed: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for ((index, _), words) in held {
        let slot = changed.entry(index).or_default();
        if slot.len() < words.len() {
            slot.resize(words.len(), 0);
        }
        for (w, h) in slot.iter_mut().zip(words) {
            *w |= h;
        }
    }
    let mut out: Vec<Changed> = Vec::new();
    for (index, words) in changed {
        for (wi, word) in words.iter().enumerate() {
            let mut w = *word;
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                let start = index * eb + (wi as u64 * 64 + bit) * BLOCK;
                if start >= size {
                    continue;
                }
                let end = (start + BLOCK).min(size).min((index + 1) * eb);
                match out.last_mut() {
                    Some(last) if last.offset + last.len == start => last.len += end - start,
                    _ => out.push(Changed {
                        offset: start,
                        len: end - start,
                    }),
                }
            }
        }
    }
    Ok(out)
}
