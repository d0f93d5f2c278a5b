//! The cluster map as the group protocol sees it ([`cairn_group::GroupMap`]):
//! nodes up or down with their incarnation, and every group's placement,
//! acting set and interval. Chunk servers, volume clients and the volume
//! manager all derive it from a [`ClusterMap`] the same way, here.

use std::collections::BTreeMap;

use cairn_group::{GroupKey, GroupMap, GroupView, NodeView};
use cairn_placement::{Candidate, PlacementTable};

use crate::map::{ClusterMap, GroupRecord};

/// The placement candidates of a map: every node, eligible while in (a
/// node that is down but in keeps its place).
pub fn candidates(map: &ClusterMap) -> Vec<Candidate> {
    map.nodes
        .iter()
        .map(|n| Candidate {
            id: n.id,
            weight: n.weight,
            host: n.host.clone(),
            rack: n.rack.clone(),
            room: n.room.clone(),
            eligible: n.in_,
        })
        .collect()
}

/// One placement table per replica count the map's groups use, built once.
pub fn placement_tables(map: &ClusterMap) -> BTreeMap<u32, PlacementTable> {
    let mut tables = BTreeMap::new();
    if map.group_count == 0 {
        return tables;
    }
    let candidates = candidates(map);
    for g in &map.groups {
        if g.replicas == 0 || tables.contains_key(&g.replicas) {
            continue;
        }
        // A map this process could not place is one it cannot serve; its
        // groups then get an empty placement (nobody asks to rejoin).
        if let Ok(t) = PlacementTable::build(&candidates, map.group_count, g.replicas as usize) {
            tables.insert(g.replicas, t);
        }
    }
    tables
}

/// The group protocol's view of `map`.
pub fn group_map(map: &ClusterMap) -> GroupMap {
    let tables = placement_tables(map);
    group_map_with(map, &tables)
}

/// [`group_map`] with tables the caller already built.
pub fn group_map_with(map: &ClusterMap, tables: &BTreeMap<u32, PlacementTable>) -> GroupMap {
    let nodes = map
        .nodes
        .iter()
        .map(|n| {
            (
                n.id,
                NodeView {
                    up: n.up,
                    up_since: n.up_since,
                },
            )
        })
        .collect();
    let groups = map
        .groups
        .iter()
        .map(|g| {
            let placement = tables
                .get(&g.replicas)
                .and_then(|t| t.lookup(g.index))
                .map(|p| p.to_vec())
                .unwrap_or_default();
            (
                key_of(g),
                GroupView {
                    interval: g.interval,
                    placement,
                    acting: g.acting.clone(),
                },
            )
        })
        .collect();
    GroupMap {
        epoch: map.epoch,
        nodes,
        groups,
    }
}

/// A record's group key.
pub fn key_of(g: &GroupRecord) -> GroupKey {
    GroupKey {
        replicas: g.replicas,
        index: g.index,
    }
}

/// The record of `key` in `map` (records are sorted by key).
pub fn group_record(map: &ClusterMap, key: GroupKey) -> Option<&GroupRecord> {
    map.groups
        .binary_search_by_key(&(key.replicas, key.index), |g| (g.replicas, g.index))
        .ok()
        .map(|i| &map.groups[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::NodeInfo;

    #[test]
    fn group_map_carries_acting_sets_and_placement() {
        let map = ClusterMap {
            epoch: 5,
            group_count: 4,
            nodes: (1..=3)
                .map(|id| NodeInfo {
                    id,
                    host: format!("h{id}"),
                    weight: 1,
                    up: id != 2,
                    in_: true,
                    up_since: id,
                    ..Default::default()
                })
                .collect(),
            groups: (0..4)
                .map(|index| GroupRecord {
                    replicas: 3,
                    index,
                    interval: 4,
                    acting: vec![1, 3],
                })
                .collect(),
        };
        let gm = group_map(&map);
        assert_eq!(gm.epoch, 5);
        assert!(!gm.nodes[&2].up);
        assert_eq!(gm.nodes[&3].up_since, 3);
        let key = GroupKey {
            replicas: 3,
            index: 2,
        };
        let g = &gm.groups[&key];
        assert_eq!(g.acting, vec![1, 3]);
        assert_eq!(g.interval, 4);
        let mut placed = g.placement.clone();
        placed.sort();
        assert_eq!(placed, vec![1, 2, 3]);
        assert_eq!(gm.primary(key), Some(1));
        assert_eq!(group_record(&map, key).map(|g| g.index), Some(2));
    }
}
