//! The placement table: every group's replica set for one cluster map, and
//! the balancing that computes it.

use crate::select::{select_full, Shortlist};
use crate::topology::{Pool, Topology};
use crate::{group_of_unchecked, validate_group_count, Candidate, PlacementError, Separation};

/// Largest group count [`PlacementTable::build`] accepts (2^20): a table
/// holds `group_count x replicas` node ids, and larger pools are not planned.
pub const MAX_TABLE_GROUPS: u32 = 1 << 20;

/// Largest replica count per group.
pub const MAX_REPLICAS: usize = 16;

/// The balancing stops once every node's load is within this fraction of its
/// target (or within [`BALANCE_MIN_SLACK`] replicas, whichever is wider).
/// Part of the placement definition: changing it moves data.
pub const BALANCE_TOLERANCE: f64 = 0.05;

/// Smallest band, in replicas, the balancing accepts around a target: with
/// only a handful of replicas per node, 5% is less than one replica.
pub const BALANCE_MIN_SLACK: f64 = 1.0;

/// Upper bound on balancing rounds (each recomputes every group).
pub const BALANCE_MAX_ROUNDS: u32 = 64;

/// Adjustments stay within `[1/ADJUST_LIMIT, ADJUST_LIMIT]` of a node's
/// weight, so balancing corrects chance and the multi-pick bias, never the
/// operator's weights.
const ADJUST_LIMIT: f64 = 4.0;

/// Every group's ordered replica set for one cluster map: build once per map
/// epoch, then [`lookup`](Self::lookup) per I/O (an index into a flat array).
///
/// Building is a pure function of `(candidates, group_count, count)` and
/// costs `group_count x weighted nodes` hashes and logarithms, plus a few
/// cheap balancing rounds; see the crate documentation for measured times.
#[derive(Debug, Clone)]
pub struct PlacementTable {
    group_count: u32,
    requested: usize,
    stride: usize,
    replicas: Vec<u64>,
    separation: Vec<Separation>,
    report: BalanceReport,
}

/// How the balancing went, and each node's load: for monitoring, and for
/// `cairn placement check`.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceReport {
    /// Whether balancing was applied (false only for
    /// [`PlacementTable::build_unbalanced`]).
    pub balanced: bool,
    /// Selection rounds run (1 when the plain rendezvous result was already
    /// within tolerance).
    pub rounds: u32,
    /// Whether every node ended within tolerance of its target (always true
    /// when `balanced` is false, since nothing was attempted).
    pub converged: bool,
    /// Group selections the shortlist could not prove and scanned in full.
    pub full_scans: u64,
    /// Every candidate with a weight above zero, by id.
    pub nodes: Vec<NodeLoad>,
}

/// One node's share of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeLoad {
    /// Node id.
    pub id: u64,
    /// The operator's weight.
    pub weight: u32,
    /// Whether the node may hold replicas (`in` the cluster).
    pub eligible: bool,
    /// Replica slots the balancing aimed at: the node's weight share of
    /// `group_count x replicas`, capped where the failure-domain rule cannot
    /// give it more. Computed with ineligible (`out`) nodes included, see the
    /// crate documentation.
    pub target: f64,
    /// Replica slots it holds.
    pub replicas: u64,
    /// Groups it is the preferred primary of (first in the replica set).
    pub primaries: u64,
    /// The balancing's multiplier on its weight (1.0 if untouched).
    pub adjustment: f64,
}

/// What changes between two tables of the same pool (see
/// [`PlacementTable::movement_to`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Movement {
    /// Replica slots that need a copy: in the new set of a group but not in
    /// its old one.
    pub slots_moved: u64,
    /// Slots whose node left the group's set because that node is absent
    /// from, or ineligible in, the new table: data that has to move whatever
    /// the placement function.
    pub slots_from_gone_nodes: u64,
    /// Groups whose replica set (as a set) changed.
    pub groups_changed: u64,
    /// Groups whose preferred primary changed.
    pub primaries_changed: u64,
}

impl PlacementTable {
    /// Computes the placement of `group_count` groups, `count` replicas each,
    /// over `candidates` (any order; see the crate documentation for the
    /// algorithm).
    ///
    /// Nodes with weight 0 take nothing. Ineligible nodes take nothing but
    /// keep their influence on the balancing, so that marking one node out
    /// moves only that node's replicas. With fewer eligible nodes than
    /// `count`, every group gets all of them (so fewer than `count`
    /// replicas; none with no eligible node); [`replica_count`] says how
    /// many.
    ///
    /// Errors: `group_count` not a power of two or above
    /// [`MAX_TABLE_GROUPS`], `count` outside `1..=MAX_REPLICAS`, or a node id
    /// listed twice.
    ///
    /// [`replica_count`]: Self::replica_count
    pub fn build(
        candidates: &[Candidate],
        group_count: u32,
        count: usize,
    ) -> Result<Self, PlacementError> {
        Self::build_inner(candidates, group_count, count, true)
    }

    /// Plain weighted rendezvous with the failure-domain rule and no
    /// balancing: what the table would be if chance alone decided loads.
    /// For diagnostics and comparison only; data is placed by
    /// [`build`](Self::build), and the two differ.
    pub fn build_unbalanced(
        candidates: &[Candidate],
        group_count: u32,
        count: usize,
    ) -> Result<Self, PlacementError> {
        Self::build_inner(candidates, group_count, count, false)
    }

    fn build_inner(
        candidates: &[Candidate],
        group_count: u32,
        count: usize,
        balance: bool,
    ) -> Result<Self, PlacementError> {
        validate_group_count(group_count)?;
        if group_count > MAX_TABLE_GROUPS {
            return Err(PlacementError::TooManyGroups {
                group_count,
                max: MAX_TABLE_GROUPS,
            });
        }
        if !(1..=MAX_REPLICAS).contains(&count) {
            return Err(PlacementError::ReplicaCount {
                count,
                max: MAX_REPLICAS,
            });
        }
        let mut sorted: Vec<&Candidate> = candidates.iter().collect();
        sorted.sort_by_key(|c| c.id);
        if let Some(w) = sorted.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(PlacementError::DuplicateNode { id: w[0].id });
        }
        sorted.retain(|c| c.weight > 0);
        let topo = Topology::new(&sorted);
        let n = topo.len();
        let everyone = Pool::new(&topo, vec![true; n]);
        let eligible = Pool::new(&topo, topo.eligible.clone());
        let balance_count = count.min(everyone.size);
        let final_count = count.min(eligible.size);
        let groups = group_count as usize;

        let targets = everyone.targets(&topo, group_count, balance_count);
        let shortlist = Shortlist::build(&topo, group_count, Shortlist::len_for(count, n));
        let mut adj = vec![1.0; n];
        let mut rounds = 0;
        let mut converged = !balance;
        let mut full_scans = 0;
        let mut chosen: Vec<u32>;
        loop {
            rounds += 1;
            chosen = assign(
                &topo,
                &everyone,
                &shortlist,
                &adj,
                group_count,
                balance_count,
                &mut full_scans,
            );
            if !balance {
                break;
            }
            let loads = count_loads(&chosen, n, balance_count).0;
            let mut nudges = Vec::new();
            for i in 0..n {
                let load = loads[i] as f64;
                let band = (targets[i] * BALANCE_TOLERANCE).max(BALANCE_MIN_SLACK);
                if (load - targets[i]).abs() <= band {
                    continue;
                }
                // Aim halfway between target and band edge, damped (square
                // root): the smallest nudge that brings the node back, so
                // that few groups leave their plain rendezvous choice.
                let goal = if load > targets[i] {
                    targets[i] + band / 2.0
                } else {
                    targets[i] - band / 2.0
                };
                nudges.push((i, (goal.max(0.5) / load.max(0.5)).sqrt()));
            }
            if nudges.is_empty() {
                converged = true;
                break;
            }
            if rounds == BALANCE_MAX_ROUNDS {
                // Keep the last evaluated table, and the `adj` it used.
                break;
            }
            for (i, factor) in nudges {
                adj[i] = (adj[i] * factor).clamp(1.0 / ADJUST_LIMIT, ADJUST_LIMIT);
            }
        }
        if eligible.size < everyone.size {
            chosen = assign(
                &topo,
                &eligible,
                &shortlist,
                &adj,
                group_count,
                final_count,
                &mut full_scans,
            );
        }

        let (loads, primaries) = count_loads(&chosen, n, final_count);
        let replicas: Vec<u64> = chosen.iter().map(|&i| topo.ids[i as usize]).collect();
        let separation = (0..groups)
            .map(|g| separation_of(&topo, &chosen[g * final_count..(g + 1) * final_count]))
            .collect();
        let nodes = (0..n)
            .map(|i| NodeLoad {
                id: topo.ids[i],
                weight: sorted[i].weight,
                eligible: topo.eligible[i],
                target: targets[i],
                replicas: loads[i],
                primaries: primaries[i],
                adjustment: adj[i],
            })
            .collect();
        Ok(PlacementTable {
            group_count,
            requested: count,
            stride: final_count,
            replicas,
            separation,
            report: BalanceReport {
                balanced: balance,
                rounds,
                converged,
                full_scans,
                nodes,
            },
        })
    }

    /// The replica set of `group`, preferred primary first; `None` if
    /// `group >= group_count`. Holds [`replica_count`](Self::replica_count)
    /// node ids.
    pub fn lookup(&self, group: u32) -> Option<&[u64]> {
        if group >= self.group_count {
            return None;
        }
        let at = group as usize * self.stride;
        Some(&self.replicas[at..at + self.stride])
    }

    /// The replica set of an extent: [`crate::group_of`] then
    /// [`lookup`](Self::lookup), for the I/O path.
    pub fn locate(&self, volume_id: u64, extent_index: u64) -> &[u64] {
        let group = group_of_unchecked(volume_id, extent_index, self.group_count);
        let at = group as usize * self.stride;
        &self.replicas[at..at + self.stride]
    }

    /// How well `group`'s replicas are separated; `None` if out of range.
    pub fn separation(&self, group: u32) -> Option<Separation> {
        self.separation.get(group as usize).copied()
    }

    /// Number of groups.
    pub fn group_count(&self) -> u32 {
        self.group_count
    }

    /// Replicas per group in this table: the count asked for, or fewer if
    /// fewer nodes are eligible.
    pub fn replica_count(&self) -> usize {
        self.stride
    }

    /// The replica count asked for.
    pub fn requested_replicas(&self) -> usize {
        self.requested
    }

    /// Loads and how the balancing went.
    pub fn report(&self) -> &BalanceReport {
        &self.report
    }

    /// What moving from `self` (the old table) to `new` costs. Both must
    /// have the same group count (groups are only comparable within a pool).
    pub fn movement_to(&self, new: &PlacementTable) -> Result<Movement, PlacementError> {
        if self.group_count != new.group_count {
            return Err(PlacementError::GroupCountMismatch {
                old: self.group_count,
                new: new.group_count,
            });
        }
        let still_in: std::collections::HashSet<u64> = new
            .report
            .nodes
            .iter()
            .filter(|n| n.eligible)
            .map(|n| n.id)
            .collect();
        let mut m = Movement::default();
        for g in 0..self.group_count {
            let old = self.lookup(g).unwrap_or(&[]);
            let cur = new.lookup(g).unwrap_or(&[]);
            let added = cur.iter().filter(|id| !old.contains(id)).count() as u64;
            m.slots_moved += added;
            m.slots_from_gone_nodes +=
                old.iter().filter(|id| !still_in.contains(id)).count() as u64;
            m.groups_changed += u64::from(added > 0 || old.len() != cur.len());
            m.primaries_changed += u64::from(old.first() != cur.first());
        }
        Ok(m)
    }
}

/// One selection round over every group, as node indices (`count` per group).
fn assign(
    topo: &Topology,
    pool: &Pool,
    shortlist: &Shortlist,
    adj: &[f64],
    groups: u32,
    count: usize,
    full_scans: &mut u64,
) -> Vec<u32> {
    let eff: Vec<f64> = (0..topo.len()).map(|i| topo.weights[i] * adj[i]).collect();
    let adj_max = adj.iter().copied().fold(f64::MIN_POSITIVE, f64::max);
    let mut chosen = Vec::with_capacity(groups as usize * count);
    let mut picks = Vec::with_capacity(count);
    for g in 0..groups {
        picks.clear();
        if !shortlist.select(topo, pool, g, &eff, adj_max, count, &mut picks) {
            *full_scans += 1;
            select_full(topo, pool, g, &eff, count, &mut picks);
        }
        debug_assert_eq!(picks.len(), count);
        chosen.extend(picks.iter().map(|&i| i as u32));
    }
    chosen
}

/// Replica slots and primaries per node index.
fn count_loads(chosen: &[u32], nodes: usize, count: usize) -> (Vec<u64>, Vec<u64>) {
    let mut loads = vec![0u64; nodes];
    let mut primaries = vec![0u64; nodes];
    if count == 0 {
        return (loads, primaries);
    }
    for set in chosen.chunks(count) {
        primaries[set[0] as usize] += 1;
        for &i in set {
            loads[i as usize] += 1;
        }
    }
    (loads, primaries)
}

fn separation_of(topo: &Topology, set: &[u32]) -> Separation {
    let distinct = |key: &dyn Fn(usize) -> u32| {
        let mut keys: Vec<u32> = set.iter().map(|&i| key(i as usize)).collect();
        keys.sort_unstable();
        keys.dedup();
        keys.len() == set.len()
    };
    if distinct(&|i| topo.room[i]) {
        Separation::Room
    } else if distinct(&|i| topo.rack[i]) {
        Separation::Rack
    } else if distinct(&|i| topo.host[i]) {
        Separation::Host
    } else {
        Separation::SharedHost
    }
}
