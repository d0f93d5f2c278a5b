//! The acceptance measurements for placement: uniformity, weighted shares,
//! movement when a node is added or removed, and failure-domain separation.
//! Shared by this crate's tests and `cairn placement check`, so that both
//! judge the same numbers against the same goals.
//!
//! Clusters are synthetic: node ids `1..=nodes`, each node on its own host,
//! unless a layout says otherwise.

use std::collections::HashMap;

use crate::{Candidate, PlacementError, PlacementTable, Separation};

/// Goal: the fullest node holds at most this times the mean (equal weights).
pub const UNIFORMITY_GOAL: f64 = 1.10;
/// Goal: every node's replica count is within this fraction of its weight
/// share.
pub const WEIGHT_GOAL: f64 = 0.10;
/// Goal: adding a node moves at most this times the optimal number of slots
/// (the new node's fair share).
pub const ADD_GOAL: f64 = 1.20;
/// New node ids tried when measuring an addition (`nodes + 1 ..`): the result
/// depends on the id through the hash, so one id proves little.
pub const ADD_TRIALS: u64 = 8;
/// Nodes marked out, one at a time, when measuring removal.
pub const REMOVE_TRIALS: usize = 12;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckParams {
    /// Group count (a power of two).
    pub groups: u32,
    /// Nodes in the base cluster (at least 4 for the weighted case).
    pub nodes: usize,
    /// Replicas per group.
    pub replicas: usize,
}

impl Default for CheckParams {
    /// The case: 1024 groups, 12 nodes, 3 replicas.
    fn default() -> Self {
        CheckParams {
            groups: 1024,
            nodes: 12,
            replicas: 3,
        }
    }
}

/// A node on its own host, in rack `rack` of room `room`.
pub fn node(id: u64, weight: u32, room: &str, rack: &str) -> Candidate {
    Candidate {
        id,
        weight,
        host: format!("host-{id}"),
        rack: rack.to_string(),
        room: room.to_string(),
        eligible: true,
    }
}

/// `ids`, weight 1 each, every node its own host in one rack and room.
pub fn flat_cluster(ids: impl IntoIterator<Item = u64>) -> Vec<Candidate> {
    ids.into_iter()
        .map(|id| node(id, 1, "room-1", "rack-1"))
        .collect()
}

/// The weights of the weighted case: 1 for all but the last three nodes,
/// which get 2, 2 and 3 (for 12 nodes: nine 1s, 2, 2, 3).
pub fn weights(nodes: usize) -> Vec<u32> {
    (0..nodes)
        .map(|i| match nodes - i {
            3 => 2,
            2 => 2,
            1 => 3,
            _ => 1,
        })
        .collect()
}

/// Node `i` (id `i + 1`) in room `i % rooms`, rack `(i / rooms) % racks` of
/// that room, on its own host.
pub fn rooms_cluster(nodes: usize, rooms: usize, racks: usize) -> Vec<Candidate> {
    (0..nodes)
        .map(|i| {
            node(
                i as u64 + 1,
                1,
                &format!("room-{}", i % rooms + 1),
                &format!("rack-{}", (i / rooms) % racks + 1),
            )
        })
        .collect()
}

/// `nodes` nodes spread over `hosts` hosts in one rack.
pub fn hosts_cluster(nodes: usize, hosts: usize) -> Vec<Candidate> {
    (0..nodes)
        .map(|i| Candidate {
            host: format!("host-{}", i % hosts + 1),
            ..node(i as u64 + 1, 1, "room-1", "rack-1")
        })
        .collect()
}

/// Replicas per eligible node relative to the mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// Mean replica slots per eligible node.
    pub mean: f64,
    /// Fullest node's slots over the mean.
    pub max_over_mean: f64,
    /// Emptiest node's slots over the mean.
    pub min_over_mean: f64,
    /// Fullest node.
    pub max_node: u64,
    /// Emptiest node.
    pub min_node: u64,
    /// Primaries of the node with most of them, over the mean per node.
    pub primaries_max_over_mean: f64,
}

/// The spread of `table`'s loads over its eligible nodes.
pub fn spread(table: &PlacementTable) -> Spread {
    let nodes: Vec<_> = table.report().nodes.iter().filter(|n| n.eligible).collect();
    if nodes.is_empty() {
        return Spread {
            mean: 0.0,
            max_over_mean: 0.0,
            min_over_mean: 0.0,
            max_node: 0,
            min_node: 0,
            primaries_max_over_mean: 0.0,
        };
    }
    let total: u64 = nodes.iter().map(|n| n.replicas).sum();
    let mean = total as f64 / nodes.len() as f64;
    let max = nodes
        .iter()
        .max_by_key(|n| (n.replicas, n.id))
        .expect("nodes");
    let min = nodes
        .iter()
        .min_by_key(|n| (n.replicas, n.id))
        .expect("nodes");
    let primaries_max = nodes.iter().map(|n| n.primaries).max().unwrap_or(0);
    let primaries_mean = f64::from(table.group_count()) / nodes.len() as f64;
    Spread {
        mean,
        max_over_mean: max.replicas as f64 / mean,
        min_over_mean: min.replicas as f64 / mean,
        max_node: max.id,
        min_node: min.id,
        primaries_max_over_mean: primaries_max as f64 / primaries_mean,
    }
}

/// The node furthest from its weight share.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShareError {
    /// `replicas / share - 1` of the worst node (negative: under its share).
    pub error: f64,
    /// That node.
    pub node: u64,
    /// Its weight.
    pub weight: u32,
    /// Its replica slots.
    pub replicas: u64,
    /// Its weight share of all slots (see [`share_error`]).
    pub share: f64,
}

/// The worst relative deviation from weight shares among eligible nodes.
///
/// A node's share is its weight share of all slots, capped where it cannot
/// hold more (one replica per group per node, and the failure-domain limits):
/// the table's target for it, computed with every node in. For the issue's
/// case (weights 1 x9, 2, 2, 3 on 12 hosts, 3 replicas) no cap applies and
/// the share is exactly `weight / total weight x slots`.
pub fn share_error(table: &PlacementTable) -> ShareError {
    let mut worst = ShareError {
        error: 0.0,
        node: 0,
        weight: 0,
        replicas: 0,
        share: 0.0,
    };
    for n in table.report().nodes.iter().filter(|n| n.eligible) {
        let error = n.replicas as f64 / n.target - 1.0;
        if error.abs() > worst.error.abs() {
            worst = ShareError {
                error,
                node: n.id,
                weight: n.weight,
                replicas: n.replicas,
                share: n.target,
            };
        }
    }
    worst
}

/// Adding one node to the flat cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AddResult {
    /// The new node's id.
    pub node: u64,
    /// Slots that need a copy.
    pub moved: u64,
    /// The new node's fair share: `groups x replicas / (nodes + 1)`, the
    /// least any placement that ends balanced must move.
    pub optimal: f64,
    /// `moved / optimal`.
    pub ratio: f64,
    /// Slots the new node ended up with.
    pub new_node_replicas: u64,
}

/// Removing one node from the flat cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RemoveResult {
    /// The node removed.
    pub node: u64,
    /// Slots it held: what has to move.
    pub node_replicas: u64,
    /// Slots that moved when it was marked out.
    pub moved_out: u64,
    /// Of those, slots on other nodes (zero is the goal).
    pub others_moved_out: u64,
    /// Fullest remaining node over the mean, with the node out.
    pub max_over_mean_out: f64,
    /// Further slots that moved when the out node was then dropped from the
    /// map and the balance recomputed.
    pub moved_on_drop: u64,
    /// Fullest node over the mean after the drop.
    pub max_over_mean_dropped: f64,
}

/// One failure-domain layout and how its groups came out.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainResult {
    /// What the layout is.
    pub layout: String,
    /// Rooms, racks and hosts in it.
    pub rooms: usize,
    /// Racks (as (room, rack) pairs).
    pub racks: usize,
    /// Hosts.
    pub hosts: usize,
    /// The best separation the layout allows: the highest level with at
    /// least as many domains as replicas.
    pub expected: Separation,
    /// Groups per separation, indexed as `Separation as usize`
    /// (shared-host, host, rack, room).
    pub groups_by_separation: [u64; 4],
    /// Groups whose replicas span fewer rooms, racks or hosts than the layout
    /// allows (`min(replicas, domains)` at every level). Zero is the goal.
    pub groups_under_spread: u64,
    /// Fullest node over the mean.
    pub max_over_mean: f64,
}

impl DomainResult {
    /// Every group separated as well as the layout allows.
    pub fn pass(&self) -> bool {
        self.groups_under_spread == 0
            && self.groups_by_separation[self.expected as usize]
                == self.groups_by_separation.iter().sum::<u64>()
    }
}

/// Everything `cairn placement check` prints.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckReport {
    /// What was measured.
    pub params: CheckParams,
    /// Equal weights, balanced table.
    pub uniformity: Spread,
    /// Equal weights, plain rendezvous (for comparison).
    pub uniformity_unbalanced: Spread,
    /// Balancing rounds for the equal-weight table.
    pub balance_rounds: u32,
    /// The weights of the weighted case, by node id `1..`.
    pub weights: Vec<u32>,
    /// Weighted case, balanced.
    pub weighted: ShareError,
    /// Weighted case, plain rendezvous.
    pub weighted_unbalanced: ShareError,
    /// One entry per new node id tried.
    pub add: Vec<AddResult>,
    /// One entry per node removed.
    pub remove: Vec<RemoveResult>,
    /// Separation per layout.
    pub domains: Vec<DomainResult>,
}

impl CheckReport {
    /// Max/mean within [`UNIFORMITY_GOAL`].
    pub fn uniformity_pass(&self) -> bool {
        self.uniformity.max_over_mean <= UNIFORMITY_GOAL
    }

    /// Every node within [`WEIGHT_GOAL`] of its weight share.
    pub fn weighted_pass(&self) -> bool {
        self.weighted.error.abs() <= WEIGHT_GOAL
    }

    /// The worst addition's ratio.
    pub fn add_worst(&self) -> f64 {
        self.add.iter().map(|a| a.ratio).fold(0.0, f64::max)
    }

    /// Every addition within [`ADD_GOAL`].
    pub fn add_pass(&self) -> bool {
        self.add_worst() <= ADD_GOAL
    }

    /// Marking any node out moved only that node's replicas.
    pub fn remove_pass(&self) -> bool {
        self.remove
            .iter()
            .all(|r| r.others_moved_out == 0 && r.moved_out == r.node_replicas)
    }

    /// Every layout separated as well as it allows.
    pub fn domains_pass(&self) -> bool {
        self.domains.iter().all(DomainResult::pass)
    }

    /// All goals met.
    pub fn pass(&self) -> bool {
        self.uniformity_pass()
            && self.weighted_pass()
            && self.add_pass()
            && self.remove_pass()
            && self.domains_pass()
    }
}

/// Runs every measurement for `params`.
pub fn run(params: CheckParams) -> Result<CheckReport, PlacementError> {
    let CheckParams {
        groups,
        nodes,
        replicas,
    } = params;
    let n = nodes as u64;
    let base = flat_cluster(1..=n);
    let table = PlacementTable::build(&base, groups, replicas)?;
    let unbalanced = PlacementTable::build_unbalanced(&base, groups, replicas)?;

    let weights = weights(nodes);
    let weighted_cluster: Vec<Candidate> = base
        .iter()
        .zip(&weights)
        .map(|(c, &weight)| Candidate {
            weight,
            ..c.clone()
        })
        .collect();
    let weighted = PlacementTable::build(&weighted_cluster, groups, replicas)?;
    let weighted_unbalanced =
        PlacementTable::build_unbalanced(&weighted_cluster, groups, replicas)?;

    let mut add = Vec::new();
    for new_id in n + 1..=n + ADD_TRIALS {
        let mut grown = base.clone();
        grown.extend(flat_cluster([new_id]));
        let after = PlacementTable::build(&grown, groups, replicas)?;
        let moved = table.movement_to(&after)?.slots_moved;
        let optimal = f64::from(groups) * replicas.min(nodes + 1) as f64 / (n + 1) as f64;
        let new_node_replicas = after
            .report()
            .nodes
            .iter()
            .find(|x| x.id == new_id)
            .map_or(0, |x| x.replicas);
        add.push(AddResult {
            node: new_id,
            moved,
            optimal,
            ratio: moved as f64 / optimal,
            new_node_replicas,
        });
    }

    let mut remove = Vec::new();
    let holding: HashMap<u64, u64> = table
        .report()
        .nodes
        .iter()
        .map(|x| (x.id, x.replicas))
        .collect();
    for id in (1..=n).take(REMOVE_TRIALS) {
        let out: Vec<Candidate> = base
            .iter()
            .map(|c| Candidate {
                eligible: c.id != id,
                ..c.clone()
            })
            .collect();
        let out_table = PlacementTable::build(&out, groups, replicas)?;
        let moved = table.movement_to(&out_table)?;
        let dropped: Vec<Candidate> = base.iter().filter(|c| c.id != id).cloned().collect();
        let dropped_table = PlacementTable::build(&dropped, groups, replicas)?;
        remove.push(RemoveResult {
            node: id,
            node_replicas: holding[&id],
            moved_out: moved.slots_moved,
            others_moved_out: moved.slots_moved
                - moved.slots_from_gone_nodes.min(moved.slots_moved),
            max_over_mean_out: spread(&out_table).max_over_mean,
            moved_on_drop: out_table.movement_to(&dropped_table)?.slots_moved,
            max_over_mean_dropped: spread(&dropped_table).max_over_mean,
        });
    }

    let mut domains = Vec::new();
    let rooms_layout = |rooms: usize| {
        let plural = if rooms == 1 { "" } else { "s" };
        (
            format!("{rooms} room{plural} x 2 racks"),
            rooms_cluster(nodes, rooms, 2),
        )
    };
    // As many rooms as replicas; one room fewer; and too few hosts.
    let mut layouts = vec![rooms_layout(replicas)];
    if replicas >= 2 {
        layouts.push(rooms_layout(replicas - 1));
    }
    layouts.push(("2 hosts, 1 rack".to_string(), hosts_cluster(nodes, 2)));
    for (layout, cluster) in layouts {
        domains.push(domain_result(layout, &cluster, groups, replicas)?);
    }

    Ok(CheckReport {
        params,
        uniformity: spread(&table),
        uniformity_unbalanced: spread(&unbalanced),
        balance_rounds: table.report().rounds,
        weights,
        weighted: share_error(&weighted),
        weighted_unbalanced: share_error(&weighted_unbalanced),
        add,
        remove,
        domains,
    })
}

/// Builds the table for one layout and judges each group's separation.
pub fn domain_result(
    layout: String,
    cluster: &[Candidate],
    groups: u32,
    replicas: usize,
) -> Result<DomainResult, PlacementError> {
    let table = PlacementTable::build(cluster, groups, replicas)?;
    // Each node's (room, rack, host) as small integers; racks and hosts are
    // nested in their room and rack, as placement sees them.
    let mut rooms: HashMap<&str, usize> = HashMap::new();
    let mut racks: HashMap<(&str, &str), usize> = HashMap::new();
    let mut hosts: HashMap<(&str, &str, &str), usize> = HashMap::new();
    let mut domains_of: HashMap<u64, [usize; 3]> = HashMap::new();
    for c in cluster {
        let next = rooms.len();
        let room = *rooms.entry(c.room.as_str()).or_insert(next);
        let next = racks.len();
        let rack = *racks
            .entry((c.room.as_str(), c.rack.as_str()))
            .or_insert(next);
        let next = hosts.len();
        let host = *hosts
            .entry((c.room.as_str(), c.rack.as_str(), c.host.as_str()))
            .or_insert(next);
        domains_of.insert(c.id, [room, rack, host]);
    }
    let totals = [rooms.len(), racks.len(), hosts.len()];
    let k = table.replica_count();
    let expected = if totals[0] >= k {
        Separation::Room
    } else if totals[1] >= k {
        Separation::Rack
    } else if totals[2] >= k {
        Separation::Host
    } else {
        Separation::SharedHost
    };
    let mut groups_by_separation = [0u64; 4];
    let mut groups_under_spread = 0;
    for g in 0..groups {
        let sep = table.separation(g).expect("group in range");
        groups_by_separation[sep as usize] += 1;
        let set = table.lookup(g).expect("group in range");
        let under = (0..3).any(|level| {
            let mut spanned: Vec<usize> = set.iter().map(|id| domains_of[id][level]).collect();
            spanned.sort_unstable();
            spanned.dedup();
            spanned.len() < k.min(totals[level])
        });
        groups_under_spread += u64::from(under);
    }
    Ok(DomainResult {
        layout,
        rooms: totals[0],
        racks: totals[1],
        hosts: totals[2],
        expected,
        groups_by_separation,
        groups_under_spread,
        max_over_mean: spread(&table).max_over_mean,
    })
}
