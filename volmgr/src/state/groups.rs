//! The redundancy groups' acting sets: how the state applies the group
//! protocol's map transitions (`cairn_group::authority`) to its
//! [`ClusterMap`].
//!
//! Every transition goes the same way: the map is converted to the
//! protocol's view ([`GroupMap`], with `cairn_proto::groupmap`, as every
//! other process converts it), the authority function is applied to that
//! copy at the command's new epoch, and the acting sets, intervals and
//! incarnations are written back. All checks happen on the copy, so a
//! refusal leaves the state untouched.
//!
//! Placement is needed only to grant claims (a node must be in the group's
//! placement) and to create a replica count's records. Down, up and register
//! do not look at it, so their view is built without placement tables, and
//! the tables that are built are kept in a [`PlacementCache`] until the
//! placement-relevant content of the map changes: a claim storm after a
//! restart (one claim per group and replica) must not build a table per
//! claim (0.14 s each at 1024 groups over 1000 nodes).

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_group::authority::{self, Claim, ClaimRefused};
use cairn_group::{GroupKey, GroupMap};
use cairn_placement::{Candidate, PlacementTable};
use cairn_proto::groupmap::{candidates, group_map_with, group_record};
use cairn_proto::map::{ClusterMap, GroupRecord, NodeInfo};

use super::{ClaimReplica, Outcome, State, StateError};
use cairn_proto::volmgr::GroupClaim;

/// Placement tables of the current map, by replica count. Derived data, not
/// state: it is neither compared nor snapshotted, and a table is rebuilt
/// whenever the nodes' placement-relevant fields or the group count differ
/// from those it was built from, so whether a table comes from here or is
/// built afresh never changes a result.
#[derive(Clone, Default)]
pub(super) struct PlacementCache {
    /// The group count and candidates the tables were built from.
    key: Option<Arc<(u32, Vec<Candidate>)>>,
    tables: BTreeMap<u32, Arc<PlacementTable>>,
}

impl PartialEq for PlacementCache {
    /// Always equal: the cache is not part of the state.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for PlacementCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlacementCache")
            .field("tables", &self.tables.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PlacementCache {
    /// The placement table of `replicas`-replica groups in `map`.
    fn table(
        &mut self,
        map: &ClusterMap,
        replicas: u32,
    ) -> Result<Arc<PlacementTable>, StateError> {
        let current = self
            .key
            .as_ref()
            .is_some_and(|k| k.0 == map.group_count && same_candidates(&k.1, &map.nodes));
        if !current {
            self.key = Some(Arc::new((map.group_count, candidates(map))));
            self.tables.clear();
        }
        if let Some(t) = self.tables.get(&replicas) {
            return Ok(t.clone());
        }
        let (group_count, nodes) = &**self.key.as_ref().expect("set above");
        let table = PlacementTable::build(nodes, *group_count, replicas as usize).map_err(|e| {
            StateError::Placement {
                replicas,
                reason: e.to_string(),
            }
        })?;
        let table = Arc::new(table);
        self.tables.insert(replicas, table.clone());
        Ok(table)
    }
}

/// Whether `nodes` convert to exactly `cached` (as
/// `cairn_proto::groupmap::candidates` converts them), without allocating.
fn same_candidates(cached: &[Candidate], nodes: &[NodeInfo]) -> bool {
    cached.len() == nodes.len()
        && cached.iter().zip(nodes).all(|(c, n)| {
            c.id == n.id
                && c.weight == n.weight
                && c.eligible == n.in_
                && c.host == n.host
                && c.rack == n.rack
                && c.room == n.room
        })
}

impl State {
    /// The group protocol's view of the map, without placement (enough for
    /// everything but claims).
    pub(super) fn group_view(&self) -> GroupMap {
        group_map_with(&self.map, &BTreeMap::new())
    }

    /// [`State::group_view`] with every group's placement, from the cached
    /// tables claims use; groups of a replica count the map cannot place
    /// get none (as `cairn_proto::groupmap::group_map` gives them).
    pub(super) fn placed_view(&mut self) -> GroupMap {
        let mut view = self.group_view();
        for (key, g) in view.groups.iter_mut() {
            if let Ok(table) = self.placement.table(&self.map, key.replicas) {
                g.placement = table.lookup(key.index).unwrap_or_default().to_vec();
            }
        }
        view
    }

    /// Writes `view`'s acting sets, intervals and node states (made from
    /// this map by [`State::group_view`] and changed at `epoch`) back into
    /// the map, and makes `epoch` the map's. Nodes whose up state or
    /// incarnation changed get `since_epoch` and `since_unix_ms`.
    pub(super) fn write_back(&mut self, view: &GroupMap, epoch: u64, now_unix_ms: u64) {
        debug_assert_eq!(self.map.nodes.len(), view.nodes.len());
        debug_assert_eq!(self.map.groups.len(), view.groups.len());
        for (node, (&id, v)) in self.map.nodes.iter_mut().zip(&view.nodes) {
            debug_assert_eq!(node.id, id);
            if node.up != v.up || node.up_since != v.up_since {
                node.up = v.up;
                node.up_since = v.up_since;
                node.since_epoch = epoch;
                node.since_unix_ms = now_unix_ms;
            }
        }
        for (record, (key, g)) in self.map.groups.iter_mut().zip(&view.groups) {
            debug_assert_eq!((record.replicas, record.index), (key.replicas, key.index));
            if record.interval != g.interval || record.acting != g.acting {
                record.interval = g.interval;
                record.acting.clone_from(&g.acting);
            }
        }
        self.map.epoch = epoch;
    }

    /// Whether the map holds the groups of `replicas`-replica volumes.
    pub(super) fn has_groups(&self, replicas: u32) -> bool {
        let at = self.map.groups.partition_point(|g| g.replicas < replicas);
        self.map
            .groups
            .get(at)
            .is_some_and(|g| g.replicas == replicas)
    }

    /// The records of every `replicas`-replica group, created at `epoch`:
    /// each group acts on the nodes of its placement that are up (in
    /// placement order), or on its whole placement if none is up (the group
    /// holds no data yet, so any of them may start it).
    pub(super) fn new_records(
        &mut self,
        replicas: u32,
        epoch: u64,
    ) -> Result<Vec<GroupRecord>, StateError> {
        let table = self.placement.table(&self.map, replicas)?;
        let mut records = Vec::with_capacity(self.map.group_count as usize);
        for index in 0..self.map.group_count {
            let placement = table.lookup(index).unwrap_or_default();
            let mut acting: Vec<u64> = placement
                .iter()
                .copied()
                .filter(|&id| self.map.node(id).is_some_and(|n| n.up))
                .collect();
            if acting.is_empty() {
                acting = placement.to_vec();
            }
            if acting.is_empty() {
                return Err(StateError::Placement {
                    replicas,
                    reason: format!("group {index} has no node to place it on"),
                });
            }
            records.push(GroupRecord {
                replicas,
                index,
                interval: epoch,
                acting,
            });
        }
        Ok(records)
    }

    /// Adds `records` (all of one replica count the map does not hold yet),
    /// keeping the records sorted by (replicas, index).
    pub(super) fn insert_records(&mut self, records: Vec<GroupRecord>) {
        let Some(first) = records.first() else {
            return;
        };
        let at = self
            .map
            .groups
            .partition_point(|g| g.replicas < first.replicas);
        self.map.groups.splice(at..at, records);
    }

    /// The first group (in key order) whose acting set holds `node_id`, and
    /// how many do.
    pub(super) fn acting_in(&self, node_id: u64) -> Option<(GroupKey, usize)> {
        let mut acting = self
            .map
            .groups
            .iter()
            .filter(|g| g.acting.contains(&node_id));
        let first = acting.next()?;
        Some((
            GroupKey {
                replicas: first.replicas,
                index: first.index,
            },
            1 + acting.count(),
        ))
    }

    /// Applies a batch of claims as compare and set, at one epoch (see
    /// [`ClaimReplica`]).
    pub(super) fn claim_replica(
        &mut self,
        c: &ClaimReplica,
        now_unix_ms: u64,
    ) -> Result<Outcome, StateError> {
        let first = GroupClaim {
            replicas: c.replicas,
            index: c.index,
            interval: c.interval,
            node: c.node,
            up_since: c.up_since,
        };
        let mut view = self.group_view();
        let epoch = self.next_map_epoch()?;
        let mut granted = 0usize;
        let mut already = 0usize;
        let mut refused: Option<StateError> = None;
        for g in std::iter::once(&first).chain(&c.more) {
            let key = GroupKey {
                replicas: g.replicas,
                index: g.index,
            };
            let claim = Claim {
                key,
                primary: c.primary,
                interval: g.interval,
                node: g.node,
                up_since: g.up_since,
            };
            // Everything but the placement first: a stale claim costs no table.
            match authority::check_claim(&view, &claim) {
                Err(ClaimRefused::NotPlaced) => {}
                Err(ClaimRefused::AlreadyActing) => {
                    already += 1;
                    continue;
                }
                Err(why) => {
                    refused.get_or_insert_with(|| self.claim_refused(c.primary, g, &view, why));
                    continue;
                }
                Ok(()) => {}
            }
            if view
                .groups
                .get(&key)
                .is_some_and(|v| v.placement.is_empty())
            {
                let table = self.placement.table(&self.map, g.replicas)?;
                if let Some(v) = view.groups.get_mut(&key) {
                    v.placement = table.lookup(g.index).unwrap_or_default().to_vec();
                }
            }
            match authority::claim_at(&mut view, &claim, epoch) {
                Ok(()) => granted += 1,
                Err(ClaimRefused::AlreadyActing) => already += 1,
                Err(why) => {
                    refused.get_or_insert_with(|| self.claim_refused(c.primary, g, &view, why));
                }
            }
        }
        if granted > 0 {
            self.write_back(&view, epoch, now_unix_ms);
            return Ok(Outcome::default());
        }
        match refused {
            Some(e) if already == 0 => Err(e),
            _ => Ok(Outcome::default()),
        }
    }

    fn claim_refused(
        &self,
        primary: u64,
        c: &GroupClaim,
        view: &GroupMap,
        why: ClaimRefused,
    ) -> StateError {
        let key = GroupKey {
            replicas: c.replicas,
            index: c.index,
        };
        let group = view.groups.get(&key);
        let reason = match why {
            ClaimRefused::UnknownGroup => format!(
                "the map has no such group (no volume with {} replicas yet, or index {} is not \
                 below the group count {})",
                c.replicas, c.index, self.map.group_count
            ),
            ClaimRefused::IntervalMoved { current } => format!(
                "the claim was made in interval {}, but the group's acting set changed since \
                 (interval {current} now); start over from the current map",
                c.interval
            ),
            ClaimRefused::NotPrimary => format!(
                "chunk server {} is not the group's primary (its first acting replica, if up); \
                 acting set {:?}",
                primary,
                group.map(|g| &g.acting[..]).unwrap_or_default()
            ),
            ClaimRefused::NodeChanged => {
                let now = match self.map.node(c.node) {
                    None => "not in the map".to_string(),
                    Some(n) if !n.up => "down".to_string(),
                    Some(n) => format!("up as incarnation {}", n.up_since),
                };
                format!(
                    "chunk server {} is not up as incarnation {} any more: it is {now}",
                    c.node, c.up_since
                )
            }
            ClaimRefused::NotPlaced => format!(
                "chunk server {} is not in the group's placement {:?}",
                c.node,
                group.map(|g| &g.placement[..]).unwrap_or_default()
            ),
            ClaimRefused::AlreadyActing => "it is already acting".to_string(),
        };
        StateError::ClaimRefused {
            primary,
            replicas: c.replicas,
            index: c.index,
            node: c.node,
            reason,
        }
    }

    /// The group record of `key`, if the map holds it.
    pub fn group(&self, key: GroupKey) -> Option<&GroupRecord> {
        group_record(&self.map, key)
    }
}
