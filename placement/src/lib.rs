//! Cairn placement: where every extent's replicas live, computed from the
//! cluster map alone.
//!
//! A pure, deterministic library shared by every process (volume client,
//! volume manager, chunk servers, `cairn`): no I/O, no clock, no randomness
//! but one fixed hash. Two processes holding the same map always compute the
//! same locations, on any platform and with any later build; that is what
//! lets the data path run without a metadata server (BRIEF.md, "Placement").
//!
//! # Two steps
//!
//! 1. **Extent to group**, [`group_of`]: `(volume_id, extent_index)` hashes to
//!    one of `group_count` redundancy groups (a power of two, fixed per pool).
//!    The group is the top `log2(group_count)` bits of the hash, so doubling
//!    the group count splits group `g` into `2g` and `2g + 1`.
//! 2. **Group to replica set**, [`PlacementTable`]: every group gets an
//!    ordered list of `count` node ids; the first is the preferred primary.
//!    The table is built once per map epoch and looked up per I/O.
//!
//! # Choosing a group's replicas
//!
//! **Weighted rendezvous hashing.** For each (group, node) pair the stable
//! hash gives `u` uniform in (0, 1); the node's score for the group is
//! `-ln(u) / weight`. `-ln(u)` is a standard exponential variate, so the score
//! is an exponential "arrival time" with rate `weight`, and in such a race the
//! first arrival is node `i` with probability exactly `w_i / sum(w)`
//! (Schindelhauer and Schomaker, "Weighted distributed hash tables", SPAA
//! 2005; the same construction as Ceph's straw2). Lowest score wins. A node's
//! score for a group does not depend on any other node, which is what makes
//! rendezvous hashing move little data: a new node only takes the groups it
//! wins, and a node leaving only releases its own.
//!
//! **Failure domains.** Each node has a host, a rack and a room (nested: a
//! rack is identified by (room, rack), a host by (room, rack, host)). Replicas
//! are picked one at a time; each pick takes, among nodes not yet chosen,
//! first those sharing no room with the chosen ones, failing that those
//! sharing a room but no rack, then a rack but no host, and only then a host;
//! within that tier the lowest score, then the lowest id. So replicas are
//! separated at the highest level the cluster allows, and two share a domain
//! only when there are not enough domains: with three rooms, three replicas
//! never share one; with two hosts, the third replica shares a host, and
//! [`PlacementTable::separation`] says so ([`Separation::SharedHost`]).
//!
//! # Balancing
//!
//! Rendezvous hashing alone gets loads right only on average. With 1024
//! groups x 3 replicas on 12 equal nodes a node's load is binomial (mean 256,
//! standard deviation about 14), and the fullest of 12 lands above 1.10 x mean
//! for about a third of possible node-id sets. Weights are further off:
//! choosing 3 distinct nodes from a weighted race under-serves heavy nodes (a
//! weight-3 node among 1,1,...,2,2,3 gets 0.885 of its share; Ceph calls this
//! the multi-pick anomaly). So the table is balanced:
//!
//! 1. Each node's **target** is its weight share of `group_count x count`
//!    slots, capped where the failure-domain rule cannot give it more (see
//!    the `topology` module: three rooms and three replicas means each room
//!    holds exactly one replica of every group, whatever its weight).
//! 2. All groups are placed with effective weights `weight x adjustment`
//!    (adjustments start at 1). Every node whose load is more than
//!    [`BALANCE_TOLERANCE`] (5%) from its target (or 1 replica, whichever is
//!    more) has its adjustment multiplied by `sqrt(goal / load)`, where the
//!    goal is halfway between target and band edge; repeat until every node
//!    is within the band, at most [`BALANCE_MAX_ROUNDS`] rounds.
//!
//! The adjustments are the dual prices of a balanced assignment: the result
//! is still rendezvous hashing, with weights nudged just enough to cancel
//! chance. Everything is a pure function of `(candidates, group_count,
//! count)`: float arithmetic here uses only IEEE-754 basic operations and
//! square roots, which are correctly rounded and so give identical bits on
//! every 64-bit platform (the logarithm is computed by hand for that reason,
//! see `hash.rs`). Adjustments stay within 1/4..4 of the operator's weight.
//! Ineligible (out) nodes take part in the balancing as if they were in; see
//! below for why.
//!
//! # Movement, and the trade-off balancing makes
//!
//! Plain rendezvous moves the minimum: adding a node moves exactly the slots
//! it wins, removing one moves exactly its own. Balancing gives a little of
//! that up, because the adjustments are recomputed from scratch for the new
//! map and some groups near a decision boundary change sides:
//!
//! * **Adding a node** moves its fair share (`groups x count / nodes`) plus
//!   those few. At 1024 groups x 12 nodes: 1.00-1.14 x the share over 40
//!   node-id sets, mean 1.05 (`cairn placement check` tries 8 new ids).
//! * **Marking a node out** (`eligible = false`) moves only that node's
//!   replicas, exactly. Out nodes keep their place in the balancing (targets
//!   and adjustments are computed as if they were in) and are only skipped
//!   when replicas are picked; a group without the node keeps every replica,
//!   because taking away a node that was not picked cannot change any pick.
//!   This is how a failed or drained node should leave.
//! * **Dropping a node from the map** (after it is out and its data
//!   re-replicated) recomputes the balance: at 1024 x 12, 6% of the dropped
//!   node's share moves between the remaining nodes on average (20% at
//!   worst over 160 trials), in exchange for loads that are balanced again.
//!   "Only its replicas move" and a 1.10 bound on loads cannot both hold
//!   for a pure function when the node set shrinks, so Cairn separates the
//!   two events.
//!
//! The extra movement grows with the number of nodes and shrinks with the
//! replicas each node holds (`L = groups x count / nodes`): the new node
//! steals groups at random, each existing node's load shifts by about
//! `sqrt(L / nodes)`, and re-balancing that across all nodes costs roughly
//! `sqrt(nodes / L)` times a constant below 1 in extra movement. Measured
//! (adding one node, mean / worst ratio to the optimal share; 3 replicas):
//!
//! | groups | nodes | L | add | drop an out node (share of its slots) |
//! | --- | --- | --- | --- | --- |
//! | 1024 | 12 | 256 | 1.05 / 1.14 | 6% |
//! | 4096 | 12 | 1024 | 1.005 / 1.05 | 1% |
//! | 1024 | 30 | 102 | 1.22 / 1.33 | 25% |
//! | 16384 | 100 | 492 | 1.16 / 1.20 | 14% |
//! | 4096 | 100 | 123 | 1.53 / 1.64 | 53% |
//! | 65536 | 100 | 1966 | 1.03 | 1% |
//! | 65536 | 1000 | 197 | 2.59 | - |
//!
//! So choose `group_count` for at least about 500 replicas per node and,
//! better, as many per node as there are nodes; with 1000+ replicas per node
//! rendezvous alone is nearly within the band and balancing barely changes
//! anything. Where that is too many groups (1000-node pools), the way out
//! that keeps placement a pure function of the map is to carry the
//! adjustments in the map: the volume manager would warm-start the balancing
//! from the previous epoch's adjustments instead of from 1.0, so that a new
//! node only shifts what it must. Not built yet.
//!
//! # Eligibility and weight
//!
//! The caller converts the cluster map into [`Candidate`]s. `eligible` means
//! *in* the cluster: a node that is down but in stays eligible and keeps its
//! place, so a short outage moves no data; the replication layer picks the
//! acting set among the replicas that are up. Weight 0 means the node takes
//! nothing (and plays no part in the balancing); changing a weight rebalances.
//!
//! # Cost
//!
//! Building a table hashes every (group, node) pair with a weight above zero
//! (one `mix64`), takes a logarithm only for pairs that can still make the
//! group's shortlist of best nodes (`4 x count`), and runs the balancing
//! rounds over the shortlists, scanning a group in full only when its
//! shortlist cannot prove the answer. Measured single-threaded on the 2-core
//! development VM, release build, 3 replicas, equal weights:
//!
//! | groups | nodes | build | balancing rounds |
//! | --- | --- | --- | --- |
//! | 1024 | 12 | 1.1 ms | 3 |
//! | 4096 | 100 | 14 ms | 6 |
//! | 65536 | 12 | 52 ms | 1 |
//! | 65536 | 1000 | 0.46 s | 7 |
//! | 1024 | 1000 | 0.14 s | 64, not converged: 3 replicas per node |
//!
//! A lookup is an index into a flat array. Memory: 8 bytes per replica slot
//! plus one byte per group (65536 x 3: 1.6 MiB); the build also holds 12
//! bytes per shortlist entry (65536 x 12: 9 MiB) until it returns.
//!
//! # Using it
//!
//! ```
//! use cairn_placement::{group_of, Candidate, PlacementTable};
//!
//! let nodes: Vec<Candidate> = (1..=6)
//!     .map(|id| Candidate {
//!         id,
//!         weight: 1,
//!         host: format!("host-{id}"),
//!         rack: format!("rack-{}", id % 2),
//!         room: format!("room-{}", id % 3),
//!         eligible: true,
//!     })
//!     .collect();
//! // Once per map epoch:
//! let table = PlacementTable::build(&nodes, 1024, 3)?;
//! // Per I/O:
//! let replicas: &[u64] = table.locate(7, 42);
//! assert_eq!(replicas.len(), 3);
//! assert_eq!(Some(replicas), table.lookup(group_of(7, 42, 1024)?));
//! # Ok::<(), cairn_placement::PlacementError>(())
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod check;
mod hash;
mod select;
mod table;
mod topology;

use thiserror::Error;

pub use table::{
    BalanceReport, Movement, NodeLoad, PlacementTable, BALANCE_MAX_ROUNDS, BALANCE_MIN_SLACK,
    BALANCE_TOLERANCE, MAX_REPLICAS, MAX_TABLE_GROUPS,
};

/// One node as placement sees it, converted from the cluster map by the
/// caller. Field order and names carry no meaning to the algorithm beyond
/// what is documented here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// The node id (the chunk server's node id); unique within a pool.
    pub id: u64,
    /// Relative capacity; replica shares are proportional to it. 0 takes
    /// nothing.
    pub weight: u32,
    /// Host name. A host is identified by (room, rack, host).
    pub host: String,
    /// Rack name. A rack is identified by (room, rack).
    pub rack: String,
    /// Room (or site) name.
    pub room: String,
    /// `in` the cluster. Pass `true` for nodes that are in but down: they keep
    /// their place so a short outage moves nothing. An ineligible node holds
    /// no replicas but still counts in the balancing (see the crate docs).
    pub eligible: bool,
}

/// How far apart a group's replicas are: the most they share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Separation {
    /// Two replicas are on the same host (possible only when the cluster has
    /// fewer hosts than replicas).
    SharedHost,
    /// Two replicas share a rack, none a host.
    Host,
    /// Two replicas share a room, none a rack.
    Rack,
    /// No two replicas share a room (also the value for a single replica).
    Room,
}

impl Separation {
    /// Lower-case name: `room`, `rack`, `host`, `shared-host`.
    pub fn as_str(self) -> &'static str {
        match self {
            Separation::SharedHost => "shared-host",
            Separation::Host => "host",
            Separation::Rack => "rack",
            Separation::Room => "room",
        }
    }
}

/// Why a placement request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlacementError {
    /// Group counts are powers of two so that a pool can later split groups.
    #[error("group count {group_count} is not a power of two (1, 2, 4, ..., 2^31)")]
    GroupCountNotPowerOfTwo {
        /// The count given.
        group_count: u32,
    },
    /// Tables are bounded in memory.
    #[error("group count {group_count} is above the table limit of {max}")]
    TooManyGroups {
        /// The count given.
        group_count: u32,
        /// [`MAX_TABLE_GROUPS`].
        max: u32,
    },
    /// Replica counts run from 1 to [`MAX_REPLICAS`].
    #[error("replica count {count} is outside 1..={max}")]
    ReplicaCount {
        /// The count given.
        count: usize,
        /// [`MAX_REPLICAS`].
        max: usize,
    },
    /// Each node may appear once.
    #[error("node {id} is listed more than once among the placement candidates")]
    DuplicateNode {
        /// The repeated node id.
        id: u64,
    },
    /// Movement is only defined between tables of one pool.
    #[error("cannot compare placement tables with {old} and {new} groups")]
    GroupCountMismatch {
        /// Group count of the old table.
        old: u32,
        /// Group count of the new table.
        new: u32,
    },
}

fn validate_group_count(group_count: u32) -> Result<(), PlacementError> {
    if group_count.is_power_of_two() {
        Ok(())
    } else {
        Err(PlacementError::GroupCountNotPowerOfTwo { group_count })
    }
}

/// The redundancy group of extent `extent_index` of volume `volume_id`, in
/// `0..group_count`; `group_count` must be a power of two.
///
/// The group is the top `log2(group_count)` bits of a stable hash of the two
/// ids, so it never changes between builds or platforms, and doubling the
/// group count sends each extent of group `g` to `2g` or `2g + 1`.
pub fn group_of(
    volume_id: u64,
    extent_index: u64,
    group_count: u32,
) -> Result<u32, PlacementError> {
    validate_group_count(group_count)?;
    Ok(group_of_unchecked(volume_id, extent_index, group_count))
}

/// [`group_of`] for a group count already known to be a power of two.
fn group_of_unchecked(volume_id: u64, extent_index: u64, group_count: u32) -> u32 {
    let h = hash::stable_hash(hash::TAG_GROUP, &[volume_id, extent_index]);
    // (h * group_count) / 2^64: the top bits when group_count is 2^k.
    ((u128::from(h) * u128::from(group_count)) >> 64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_count_must_be_a_power_of_two() {
        for bad in [0, 3, 12, 1000, u32::MAX] {
            assert_eq!(
                group_of(1, 2, bad),
                Err(PlacementError::GroupCountNotPowerOfTwo { group_count: bad })
            );
        }
        assert_eq!(group_of(1, 2, 1), Ok(0));
        assert!(group_of(1, 2, 1 << 31).is_ok());
    }

    #[test]
    fn group_of_is_pinned() {
        assert_eq!(group_of(0, 0, 1024), Ok(PINNED_0_0));
        assert_eq!(group_of(1, 2, 1024), Ok(PINNED_1_2));
        assert_eq!(group_of(0xdead_beef, 123_456, 65536), Ok(PINNED_BEEF));
    }

    const PINNED_0_0: u32 = 422;
    const PINNED_1_2: u32 = 932;
    const PINNED_BEEF: u32 = 34952;

    #[test]
    fn doubling_the_group_count_splits_groups() {
        for v in 0..50u64 {
            for e in 0..50u64 {
                let g = group_of(v, e, 256).unwrap();
                let g2 = group_of(v, e, 512).unwrap();
                assert_eq!(g2 / 2, g);
            }
        }
    }

    #[test]
    fn extents_spread_evenly_over_groups() {
        let groups = 64u32;
        let mut hits = vec![0u32; groups as usize];
        for v in 0..16u64 {
            for e in 0..4096u64 {
                hits[group_of(v, e, groups).unwrap() as usize] += 1;
            }
        }
        // 1024 per group expected; binomial sd 32.
        let (min, max) = (hits.iter().min().unwrap(), hits.iter().max().unwrap());
        assert!(*min > 1024 - 160 && *max < 1024 + 160, "{min}..{max}");
    }
}
