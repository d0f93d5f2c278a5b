//! Choosing one group's replicas: the tier rule over rendezvous scores.
//!
//! The definition ([`select_full`]): repeatedly take, among the pool's nodes
//! not yet chosen, the one in the lowest tier (see [`Topology::tier`]); within
//! a tier the lowest score `draw(group, node) / effective_weight(node)`; on an
//! exact tie the lower node id.
//!
//! [`Shortlist`] gives the same answer faster. The balancing recomputes every
//! group's replicas several times with slightly different effective weights;
//! scanning every node each time would cost `groups x nodes` draws per round.
//! Instead each group keeps its few best nodes by unadjusted score, and a
//! choice made from that list is used only when it is provably the one the
//! full scan would make; otherwise that group is scanned in full.

use std::cmp::Ordering;

use crate::hash::{draw_in, draw_lower_bound, ln, unit_in, GroupKey};
use crate::topology::{Pool, Topology};

/// Relative margin when proving that no node outside a shortlist can beat
/// the best inside it: scores are recomputed with different roundings
/// (`d / (w * a)` against `(d / w) / a_max`), which can differ by a few units
/// in the last place. Near-ties inside the margin fall back to a full scan.
const BOUND_MARGIN: f64 = 1e-9;

/// The reference selection: scans every node of the pool. `eff` is each
/// node's effective weight (weight times the balancing adjustment). Appends
/// the chosen node indices, best first, to `out` (which must be empty).
pub(crate) fn select_full(
    topo: &Topology,
    pool: &Pool,
    group: u32,
    eff: &[f64],
    count: usize,
    out: &mut Vec<usize>,
) {
    debug_assert!(out.is_empty());
    let key = GroupKey::new(group);
    let scores: Vec<f64> = (0..topo.len())
        .map(|n| {
            if pool.member[n] {
                draw_in(key, topo.ids[n]) / eff[n]
            } else {
                f64::INFINITY
            }
        })
        .collect();
    while out.len() < count {
        let Some(tier) = pool.best_tier(topo, out) else {
            break;
        };
        let mut best: Option<(f64, usize)> = None;
        for (n, &score) in scores.iter().enumerate() {
            if !pool.member[n] || out.contains(&n) || topo.tier(n, out) != tier {
                continue;
            }
            // Node indices follow id order, so (score, index) orders ties by id.
            if best.is_none_or(|b| (score, n) < b) {
                best = Some((score, n));
            }
        }
        let (_, n) = best.expect("best_tier promised a node in this tier");
        out.push(n);
    }
}

/// A shortlist candidate, ordered by (score, node index).
#[derive(Debug, Clone, Copy)]
struct Entry {
    score: f64,
    node: u32,
    draw: f64,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(self.node.cmp(&other.node))
    }
}

/// Each group's best nodes by unadjusted score (`draw / weight`), with a
/// bound below which no other node's unadjusted score lies. Which nodes make
/// the list affects only speed: answers are proven against the bound.
pub(crate) struct Shortlist {
    len: usize,
    nodes: Vec<u32>,
    draws: Vec<f64>,
    /// Per group: a lower bound on the unadjusted score of every node not on
    /// the list, namely the list's worst score (infinite when the list holds
    /// every node).
    outside: Vec<f64>,
}

impl Shortlist {
    /// Shortlist length for `count` replicas: long enough that the tier rule
    /// rarely needs a node from further down.
    pub fn len_for(count: usize, nodes: usize) -> usize {
        (4 * count).max(8).min(nodes)
    }

    /// Hashes every (group, node) pair once: `groups x nodes` hashes, the
    /// dominant cost of building a table. The logarithm is skipped for a node
    /// whose cheap lower bound ([`draw_lower_bound`]) already rules it out of
    /// the list, which is most of them when there are many nodes.
    pub fn build(topo: &Topology, groups: u32, len: usize) -> Self {
        let n = topo.len();
        let len = len.min(n);
        let mut nodes = Vec::with_capacity(groups as usize * len);
        let mut draws = Vec::with_capacity(groups as usize * len);
        let mut outside = Vec::with_capacity(groups as usize);
        // Kept sorted, best first; a few dozen entries at most.
        let mut list: Vec<Entry> = Vec::with_capacity(len + 1);
        for g in 0..groups {
            list.clear();
            let key = GroupKey::new(g);
            for i in 0..n {
                let u = unit_in(key, topo.ids[i]);
                let weight = topo.weights[i];
                if list.len() == len && draw_lower_bound(u) / weight >= list[len - 1].score {
                    continue;
                }
                let d = -ln(u);
                let entry = Entry {
                    score: d / weight,
                    node: i as u32,
                    draw: d,
                };
                if list.len() == len {
                    if entry >= list[len - 1] {
                        continue;
                    }
                    list.pop();
                }
                let at = list.partition_point(|e| *e < entry);
                list.insert(at, entry);
            }
            // Every node not kept was turned away or evicted by a list whose
            // worst entry only ever improved, so it scores at least as badly
            // as the final worst entry.
            outside.push(if len < n {
                list[len - 1].score
            } else {
                f64::INFINITY
            });
            nodes.extend(list.iter().map(|e| e.node));
            draws.extend(list.iter().map(|e| e.draw));
        }
        Shortlist {
            len,
            nodes,
            draws,
            outside,
        }
    }

    /// [`select_full`]'s answer from the shortlist, or `false` (with `out`
    /// cleared) if the shortlist cannot prove it; `adj_max` is the largest
    /// balancing adjustment of any node.
    #[allow(clippy::too_many_arguments)]
    pub fn select(
        &self,
        topo: &Topology,
        pool: &Pool,
        group: u32,
        eff: &[f64],
        adj_max: f64,
        count: usize,
        out: &mut Vec<usize>,
    ) -> bool {
        debug_assert!(out.is_empty());
        let at = group as usize * self.len;
        let nodes = &self.nodes[at..at + self.len];
        let draws = &self.draws[at..at + self.len];
        // Any node off the list scores d / (w a) >= (d / w) / adj_max.
        let bound = self.outside[group as usize] / adj_max * (1.0 - BOUND_MARGIN);
        while out.len() < count {
            let Some(tier) = pool.best_tier(topo, out) else {
                break;
            };
            let mut best: Option<(f64, usize)> = None;
            for (&n, &d) in nodes.iter().zip(draws) {
                let n = n as usize;
                if !pool.member[n] || out.contains(&n) || topo.tier(n, out) != tier {
                    continue;
                }
                let score = d / eff[n];
                if best.is_none_or(|b| (score, n) < b) {
                    best = Some((score, n));
                }
            }
            match best {
                Some((score, n)) if score < bound => out.push(n),
                _ => {
                    out.clear();
                    return false;
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::Candidate;

    fn topology(spec: &[(u8, u8, u8, u32, bool)]) -> (Vec<Candidate>, Topology) {
        let mut cands: Vec<Candidate> = spec
            .iter()
            .enumerate()
            .map(|(i, &(room, rack, host, weight, eligible))| Candidate {
                id: 1000 + 7 * i as u64,
                weight: weight.max(1),
                room: format!("room{room}"),
                rack: format!("rack{rack}"),
                host: format!("host{host}"),
                eligible,
            })
            .collect();
        cands.sort_by_key(|c| c.id);
        let refs: Vec<&Candidate> = cands.iter().collect();
        let topo = Topology::new(&refs);
        (cands, topo)
    }

    proptest! {
        /// The shortlist never changes an answer: whenever it answers, it
        /// answers what the full scan does, across topologies, weights,
        /// adjustments and pools.
        #[test]
        fn shortlist_agrees_with_full_scan(
            spec in prop::collection::vec((0u8..3, 0u8..2, 0u8..4, 1u32..5, prop::bool::weighted(0.8)), 1..40),
            adj_seed in any::<u64>(),
            count in 1usize..6,
            len in 1usize..20,
        ) {
            let (_cands, topo) = topology(&spec);
            let adj: Vec<f64> = (0..topo.len())
                .map(|i| 0.5 + (crate::hash::mix64(adj_seed ^ i as u64) % 1000) as f64 / 1000.0)
                .collect();
            let adj_max = adj.iter().cloned().fold(0.0, f64::max);
            let eff: Vec<f64> = (0..topo.len()).map(|i| topo.weights[i] * adj[i]).collect();
            let list = Shortlist::build(&topo, 64, len);
            for member in [vec![true; topo.len()], topo.eligible.clone()] {
                let pool = Pool::new(&topo, member);
                for g in 0..64 {
                    let mut full = Vec::new();
                    select_full(&topo, &pool, g, &eff, count, &mut full);
                    let mut fast = Vec::new();
                    if list.select(&topo, &pool, g, &eff, adj_max, count, &mut fast) {
                        prop_assert_eq!(&fast, &full);
                    }
                    prop_assert_eq!(full.len(), count.min(pool.size));
                }
            }
        }
    }
}
