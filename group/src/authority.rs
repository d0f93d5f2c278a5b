//! How the map's acting sets may change: pure functions the volume manager
//! applies (through raft) and the simulator applies directly.
//!
//! The rules that make Write-All-Read-One safe:
//!
//! - **A node leaves acting sets only when it is marked down or registers
//!   anew** (a restarted process has lost what it held in memory and may have
//!   lost unflushed writes). It is never removed from a group where it is the
//!   last acting replica: that group then waits for it, because nobody else
//!   is known to hold every acknowledged write.
//! - **A node joins an acting set only by a claim** made by the group's
//!   primary after it brought the node up to date, and only if nothing
//!   changed in between: the group's interval is the one the claim was made
//!   in, and the node is still up in the same incarnation.
//! - Every change of a group's acting set gives it a new interval (the new
//!   map epoch), which fences writes of the old one.

use crate::map::{Epoch, GroupKey, GroupMap, NodeId, NodeView};

/// Why a claim was refused; the claimant starts over from the current map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimRefused {
    /// The group is not in the map.
    UnknownGroup,
    /// The group's acting set changed since the claim was made.
    IntervalMoved {
        /// The group's current interval.
        current: Epoch,
    },
    /// The node is down, or came back as another incarnation.
    NodeChanged,
    /// The node is not in the group's placement.
    NotPlaced,
    /// The node is already acting (an earlier copy of the claim was applied).
    AlreadyActing,
    /// The claimant is not the group's primary (it was marked down).
    NotPrimary,
}

/// A primary's claim that `node` holds every write of `key` as of `interval`
/// and may join its acting set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The group.
    pub key: GroupKey,
    /// The primary making the claim.
    pub primary: NodeId,
    /// The interval the primary brought the node up to date in.
    pub interval: Epoch,
    /// The node brought up to date.
    pub node: NodeId,
    /// Its incarnation at that time.
    pub up_since: Epoch,
}

/// `node` stopped heartbeating: it is down, and leaves every acting set in
/// which it is not the last replica. Returns the next map; `None` if the node
/// is unknown or already down.
pub fn mark_down(map: &GroupMap, node: NodeId) -> Option<GroupMap> {
    map.nodes.get(&node).filter(|n| n.up)?;
    let (mut next, epoch) = next_epoch(map);
    mark_down_at(&mut next, node, epoch).then_some(next)
}

/// A down node heartbeats again, as the same incarnation: it is up, and
/// joins acting sets again only through claims.
pub fn mark_up(map: &GroupMap, node: NodeId) -> Option<GroupMap> {
    map.nodes.get(&node).filter(|n| !n.up)?;
    let (mut next, epoch) = next_epoch(map);
    mark_up_at(&mut next, node, epoch).then_some(next)
}

/// A node process (re)starts and registers: a new incarnation. It leaves
/// every acting set where others remain (what it held only in memory is
/// gone) and is up from the new epoch. Unknown nodes are added (their
/// groups' placement is the caller's concern).
pub fn register(map: &GroupMap, node: NodeId) -> GroupMap {
    let (mut next, epoch) = next_epoch(map);
    register_at(&mut next, node, epoch);
    next
}

/// Applies a primary's claim, or says why not.
pub fn claim(map: &GroupMap, c: &Claim) -> Result<GroupMap, ClaimRefused> {
    check_claim(map, c)?;
    let (mut next, epoch) = next_epoch(map);
    claim_at(&mut next, c, epoch)?;
    Ok(next)
}

// ---- In place, at a given epoch ----
//
// The functions above make one map epoch per transition. The volume manager
// applies several transitions in one epoch (a rack that loses power is one
// `MarkDown` of all its nodes), so these apply a transition to `map` in
// place with `epoch` as the new interval and incarnation, and leave
// `map.epoch` alone: the caller sets it to `epoch` once, after the last
// transition. `epoch` must be above every interval and incarnation in the
// map (normally `map.epoch + 1`).

/// [`mark_down`] in place at `epoch`. Returns false (and changes nothing) if
/// the node is unknown or already down.
pub fn mark_down_at(map: &mut GroupMap, node: NodeId, epoch: Epoch) -> bool {
    let Some(n) = map.nodes.get_mut(&node).filter(|n| n.up) else {
        return false;
    };
    n.up = false;
    leave_acting_sets(map, node, epoch);
    true
}

/// [`mark_up`] in place at `epoch`. Returns false (and changes nothing) if
/// the node is unknown or already up.
pub fn mark_up_at(map: &mut GroupMap, node: NodeId, epoch: Epoch) -> bool {
    if map.nodes.get(&node).is_none_or(|n| n.up) {
        return false;
    }
    new_incarnation(map, node, epoch);
    true
}

/// [`register`] in place at `epoch`; always a change.
pub fn register_at(map: &mut GroupMap, node: NodeId, epoch: Epoch) {
    leave_acting_sets(map, node, epoch);
    new_incarnation(map, node, epoch);
}

/// [`claim`] in place at `epoch`; a refused claim changes nothing.
pub fn claim_at(map: &mut GroupMap, c: &Claim, epoch: Epoch) -> Result<(), ClaimRefused> {
    check_claim(map, c)?;
    let g = map.groups.get_mut(&c.key).expect("checked above");
    let mut members: Vec<NodeId> = g.acting.clone();
    members.push(c.node);
    // Placement order first; replicas outside the placement (data still
    // moving away from them) last, and dropped once the placement is whole.
    let mut acting: Vec<NodeId> = g
        .placement
        .iter()
        .copied()
        .filter(|n| members.contains(n))
        .collect();
    if acting.len() < g.placement.len() {
        acting.extend(members.iter().filter(|n| !g.placement.contains(n)));
    }
    g.acting = acting;
    g.interval = epoch;
    Ok(())
}

/// Groups whose whole placement already acts, but whose acting set differs
/// from it (members outside it, or another order): a placement change (a
/// node out or in, a weight) can leave a group so, with nothing left to
/// claim, so no claim ([`claim_at`]) would ever retire the others or make
/// the placement's first node primary. (A drained node stayed acting for
/// good: simulator seed 32 with placement moves.)
pub fn unsettled(map: &GroupMap) -> Vec<GroupKey> {
    map.groups
        .iter()
        .filter(|(_, g)| {
            !g.placement.is_empty()
                && g.placement.iter().all(|n| g.acting.contains(n))
                && g.acting != g.placement
        })
        .map(|(k, _)| *k)
        .collect()
}

/// Sets the acting set of every [`unsettled`] group to its placement, in
/// place at `epoch` (a new interval: the old primary is fenced). Safe for
/// the reason a claim is: every member kept holds every acknowledged write,
/// being acting. Returns the groups changed.
pub fn settle_at(map: &mut GroupMap, epoch: Epoch) -> Vec<GroupKey> {
    let keys = unsettled(map);
    for key in &keys {
        let g = map.groups.get_mut(key).expect("listed");
        g.acting = g.placement.clone();
        g.interval = epoch;
    }
    keys
}

/// Whether `map` grants the claim `c`, and if not, why.
pub fn check_claim(map: &GroupMap, c: &Claim) -> Result<(), ClaimRefused> {
    let g = map.groups.get(&c.key).ok_or(ClaimRefused::UnknownGroup)?;
    if g.acting.contains(&c.node) {
        return Err(ClaimRefused::AlreadyActing);
    }
    if g.interval != c.interval {
        return Err(ClaimRefused::IntervalMoved {
            current: g.interval,
        });
    }
    if map.primary(c.key) != Some(c.primary) {
        return Err(ClaimRefused::NotPrimary);
    }
    if map.up_since(c.node) != Some(c.up_since) {
        return Err(ClaimRefused::NodeChanged);
    }
    if !g.placement.contains(&c.node) {
        return Err(ClaimRefused::NotPlaced);
    }
    Ok(())
}

fn next_epoch(map: &GroupMap) -> (GroupMap, Epoch) {
    let mut next = map.clone();
    next.epoch += 1;
    let epoch = next.epoch;
    (next, epoch)
}

/// `node` is up as a new incarnation from `epoch`. Where it is (still) the
/// last acting replica, its groups get a new interval, so that the primary
/// addresses the new incarnation and requests sent to the old one are
/// refused.
fn new_incarnation(map: &mut GroupMap, node: NodeId, epoch: Epoch) {
    map.nodes.insert(
        node,
        NodeView {
            up: true,
            up_since: epoch,
        },
    );
    for g in map.groups.values_mut() {
        if g.acting.contains(&node) {
            g.interval = epoch;
        }
    }
}

fn leave_acting_sets(map: &mut GroupMap, node: NodeId, epoch: Epoch) {
    for g in map.groups.values_mut() {
        if g.acting.len() > 1 && g.acting.contains(&node) {
            g.acting.retain(|&n| n != node);
            g.interval = epoch;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::GroupView;

    fn map3() -> GroupMap {
        let mut m = GroupMap {
            epoch: 5,
            ..Default::default()
        };
        for n in 1..=3 {
            m.nodes.insert(
                n,
                NodeView {
                    up: true,
                    up_since: 1,
                },
            );
        }
        m.groups.insert(
            GroupKey {
                replicas: 3,
                index: 0,
            },
            GroupView {
                interval: 2,
                placement: vec![2, 1, 3],
                acting: vec![2, 1, 3],
            },
        );
        m
    }

    const KEY: GroupKey = GroupKey {
        replicas: 3,
        index: 0,
    };

    #[test]
    fn down_leaves_acting_but_never_empties_it() {
        let m = mark_down(&map3(), 2).unwrap();
        assert_eq!(m.epoch, 6);
        assert_eq!(m.groups[&KEY].acting, vec![1, 3]);
        assert_eq!(m.groups[&KEY].interval, 6);
        assert_eq!(m.primary(KEY), Some(1));
        let m = mark_down(&m, 1).unwrap();
        let m = mark_down(&m, 3).unwrap();
        assert_eq!(m.groups[&KEY].acting, vec![3], "the last replica stays");
        assert_eq!(m.primary(KEY), None, "and the group waits for it");
        assert!(mark_down(&m, 3).is_none());
    }

    #[test]
    fn claims_are_compare_and_set() {
        let m = mark_down(&map3(), 2).unwrap();
        let m = mark_up(&m, 2).unwrap();
        let up_since = m.nodes[&2].up_since;
        let good = Claim {
            key: KEY,
            primary: 1,
            interval: 6,
            node: 2,
            up_since,
        };
        let stale = Claim {
            interval: 2,
            ..good.clone()
        };
        assert_eq!(
            claim(&m, &stale),
            Err(ClaimRefused::IntervalMoved { current: 6 })
        );
        let restarted = register(&m, 2);
        assert_eq!(claim(&restarted, &good), Err(ClaimRefused::NodeChanged));
        let next = claim(&m, &good).unwrap();
        assert_eq!(next.groups[&KEY].acting, vec![2, 1, 3]);
        assert_eq!(next.groups[&KEY].interval, next.epoch);
        assert_eq!(claim(&next, &good), Err(ClaimRefused::AlreadyActing));
    }

    #[test]
    fn a_placement_acting_whole_settles_to_it() {
        let mut m = map3();
        m.nodes.insert(
            4,
            NodeView {
                up: true,
                up_since: 1,
            },
        );
        // Node 4 acting too, node 3 drained: nothing is left to claim.
        let g = m.groups.get_mut(&KEY).unwrap();
        g.acting = vec![2, 1, 3, 4];
        g.placement = vec![4, 2, 1];
        assert_eq!(unsettled(&m), vec![KEY]);
        assert_eq!(settle_at(&mut m, 6), vec![KEY]);
        assert_eq!(m.groups[&KEY].acting, vec![4, 2, 1]);
        assert_eq!(m.groups[&KEY].interval, 6);
        assert_eq!(m.primary(KEY), Some(4), "the placement's first leads");
        assert!(unsettled(&m).is_empty());
        // A placement member missing: its claim settles the group later.
        let g = m.groups.get_mut(&KEY).unwrap();
        g.acting = vec![2, 1, 3];
        assert!(settle_at(&mut m, 7).is_empty());
        assert_eq!(m.groups[&KEY].interval, 6);
        // No placement (the map could not place): left alone.
        m.groups.get_mut(&KEY).unwrap().placement.clear();
        assert!(unsettled(&m).is_empty());
    }

    #[test]
    fn registering_again_is_a_new_incarnation() {
        let m = register(&map3(), 3);
        assert_eq!(m.nodes[&3].up_since, 6);
        assert_eq!(m.groups[&KEY].acting, vec![2, 1]);
    }

    #[test]
    fn several_transitions_in_one_epoch() {
        let mut m = map3();
        assert!(mark_down_at(&mut m, 1, 6));
        assert!(mark_down_at(&mut m, 2, 6));
        assert!(!mark_down_at(&mut m, 2, 6), "already down");
        assert!(!mark_down_at(&mut m, 9, 6), "unknown");
        assert_eq!(m.epoch, 5, "the caller sets the epoch");
        assert_eq!(m.groups[&KEY].acting, vec![3]);
        assert_eq!(m.groups[&KEY].interval, 6);
        // The same as one transition after the other, but one epoch.
        let stepwise = mark_down(&mark_down(&map3(), 1).unwrap(), 2).unwrap();
        assert_eq!(stepwise.groups[&KEY].acting, vec![3]);
        assert_eq!(stepwise.epoch, 7);

        m.epoch = 6;
        assert!(mark_up_at(&mut m, 2, 7));
        assert!(!mark_up_at(&mut m, 2, 7), "already up");
        assert_eq!(m.nodes[&2].up_since, 7);
        register_at(&mut m, 3, 7);
        assert_eq!(m.nodes[&3].up_since, 7);
        assert_eq!(m.groups[&KEY].acting, vec![3], "the last replica stays");
        assert_eq!(m.groups[&KEY].interval, 7, "but its interval moves");
        m.epoch = 7;

        let c = Claim {
            key: KEY,
            primary: 3,
            interval: 7,
            node: 2,
            up_since: 7,
        };
        let before = m.clone();
        let stale = Claim {
            interval: 6,
            ..c.clone()
        };
        assert_eq!(
            claim_at(&mut m, &stale, 8),
            Err(ClaimRefused::IntervalMoved { current: 7 })
        );
        assert_eq!(m, before, "a refused claim changes nothing");
        assert_eq!(claim_at(&mut m, &c, 8), Ok(()));
        assert_eq!(m.groups[&KEY].acting, vec![2, 3], "placement order");
        assert_eq!(m.groups[&KEY].interval, 8);
        assert_eq!(claim(&before, &c).unwrap().groups, m.groups);
        let not_placed = Claim {
            node: 1,
            interval: 8,
            primary: 2,
            ..c.clone()
        };
        m.nodes.get_mut(&1).unwrap().up = true;
        m.groups.get_mut(&KEY).unwrap().placement = vec![2, 3];
        assert_eq!(check_claim(&m, &not_placed), Err(ClaimRefused::NodeChanged));
        m.nodes.get_mut(&1).unwrap().up_since = 7;
        assert_eq!(check_claim(&m, &not_placed), Err(ClaimRefused::NotPlaced));
    }
}
