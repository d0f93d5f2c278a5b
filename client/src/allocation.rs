//! Which extents of a volume hold data: the answer behind NBD's
//! `base:allocation` and `qemu-img map`. An extent version exists on a chunk
//! server once something was written to it, so an extent that no acting
//! replica of its group lists was never written (or was written only by a
//! write that was not acknowledged) and reads as zeros. Every acknowledged
//! write is on every acting replica (Write-All), so one acting replica's
//! "absent" is enough; an extent whose acting replicas could not be asked is
//! reported as unknown, which callers must treat as data.

use std::collections::{BTreeMap, BTreeSet};

use cairn_group::GroupKey;
use cairn_proto::chunk::ExtentKey;
use cairn_proto::groupmap::group_record;
use futures::future::join_all;
use tracing::debug;

use crate::error::ClientError;
use crate::volume::Volume;

/// Extents one allocation query looks at, at most (bounds the listing each
/// chunk server sends back).
pub const ALLOCATION_EXTENTS_MAX: u64 = 4096;

/// The allocation of a run of extents, from `first` on. `state[i]` is extent
/// `first + i`: `Some(true)` stored (holds data), `Some(false)` stored by no
/// acting replica (reads as zeros), `None` unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub first: u64,
    pub state: Vec<Option<bool>>,
    /// No acting replica of any group stores an extent of this volume past
    /// the last one in `state`: the rest of the volume is unwritten too.
    pub empty_beyond: bool,
}

/// What one chunk server listed: extent indexes in the range, and how far its
/// listing reaches (exclusive; `u64::MAX` when it listed everything).
struct Listing {
    stored: BTreeSet<u64>,
    reach: u64,
}

impl Volume {
    /// Allocation of up to `count` extents (at most [`ALLOCATION_EXTENTS_MAX`],
    /// and not past the volume's end) starting at extent `first`.
    pub async fn allocation(&self, first: u64, count: u64) -> Result<Allocation, ClientError> {
        let info = self.info();
        let extent_bytes = info.extent_size_bytes as u64;
        let extents = info.size_bytes.div_ceil(extent_bytes);
        if first >= extents {
            return Err(ClientError::InvalidArgument {
                volume: info.name.clone(),
                offset: first.saturating_mul(extent_bytes),
                len: 0,
                reason: format!("extent {first} is past the volume's last extent"),
            });
        }
        let count = count.clamp(1, ALLOCATION_EXTENTS_MAX).min(extents - first);
        let end = first + count;
        let snap = self.cluster().snapshot();
        let map = &snap.map;
        let data_id = info.data_volume_id();
        // Versions at other epochs (another clone's, a snapshot's newer
        // than this volume's view) say nothing about this volume.
        let view: BTreeSet<u64> = self.view().into_iter().collect();
        let view = &view;

        // The acting replicas of every group the range touches.
        let mut group_of: Vec<u32> = Vec::with_capacity(count as usize);
        let mut by_group: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for index in first..end {
            let g = cairn_placement::group_of(data_id, index, map.group_count).map_err(|e| {
                ClientError::Unavailable(format!(
                    "volume {}: cluster map epoch {} has an unusable group count: {e}",
                    info.name, map.epoch
                ))
            })?;
            by_group.entry(g).or_insert_with(|| {
                group_record(
                    map,
                    GroupKey {
                        replicas: info.replicas,
                        index: g,
                    },
                )
                .map(|r| r.acting.clone())
                .unwrap_or_default()
            });
            group_of.push(g);
        }
        let nodes: BTreeSet<u64> = by_group.values().flatten().copied().collect();

        let after = first.checked_sub(1).map(|prev| ExtentKey {
            volume_id: data_id,
            extent_index: prev,
            epoch: u64::MAX,
        });
        let listings = join_all(nodes.iter().map(|&node| async move {
            let addr = map.node(node).map(|n| n.addr.clone());
            let result = match addr {
                None => Err(format!("node {node} is not in map epoch {}", map.epoch)),
                Some(addr) => self.list_at(&addr, after, end, view).await,
            };
            if let Err(e) = &result {
                debug!(volume = %info.name, node, "allocation query: {e}");
            }
            (node, result.ok())
        }))
        .await;
        let listings: BTreeMap<u64, Listing> = listings
            .into_iter()
            .filter_map(|(n, l)| l.map(|l| (n, l)))
            .collect();

        let mut state = Vec::with_capacity(count as usize);
        for (i, g) in group_of.iter().enumerate() {
            let acting = &by_group[g];
            let index = first + i as u64;
            let mut answered = false;
            let mut stored = false;
            for node in acting {
                if let Some(l) = listings.get(node) {
                    if l.reach > index {
                        answered = true;
                        stored |= l.stored.contains(&index);
                    }
                }
            }
            state.push(answered.then_some(stored));
        }
        // Every node that acts for any group of this volume's replica count
        // answered with a listing that reached the volume's end and named
        // nothing past `end`.
        let all_acting: BTreeSet<u64> = map
            .groups
            .iter()
            .filter(|g| g.replicas == info.replicas)
            .flat_map(|g| g.acting.iter().copied())
            .collect();
        let empty_beyond = !all_acting.is_empty()
            && all_acting.iter().all(|n| {
                listings
                    .get(n)
                    .is_some_and(|l| l.reach == u64::MAX && l.stored.range(end..).next().is_none())
            })
            && all_acting.is_subset(&nodes);
        Ok(Allocation {
            first,
            state,
            empty_beyond,
        })
    }

    /// Lists this volume's extents stored at `addr` after `after`, up to
    /// extent `end` (exclusive) or one page.
    async fn list_at(
        &self,
        addr: &str,
        after: Option<ExtentKey>,
        end: u64,
        view: &BTreeSet<u64>,
    ) -> Result<Listing, String> {
        let conn = self.cluster().pool.get(addr).await?;
        // Each extent may have a version per epoch of the view (and of
        // other clones of the same data); a short page only shortens
        // `reach`.
        let extents = end - after.map_or(0, |a| a.extent_index + 1);
        let limit = (extents.saturating_mul(view.len() as u64) + 1).min(u32::MAX as u64 / 2) as u32;
        let attempt = self.cluster().config().attempt_timeout;
        let page = tokio::time::timeout(
            attempt,
            conn.extent_list(Some(self.info().data_volume_id()), after, limit),
        )
        .await
        .map_err(|_| format!("listing extents at {addr} timed out after {attempt:?}"))?
        .map_err(|e| format!("listing extents at {addr}: {e}"))?;
        let mut stored = BTreeSet::new();
        let mut last = None;
        for e in &page.extents {
            let Some(key) = e.key else { continue };
            if view.contains(&key.epoch) {
                stored.insert(key.extent_index);
            }
            last = Some(key.extent_index);
        }
        let reach = match (page.more, last) {
            (false, _) => u64::MAX,
            // Versions of `last` at later epochs may not be listed yet.
            (true, Some(last)) => last,
            (true, None) => 0,
        };
        Ok(Listing { stored, reach })
    }
}
