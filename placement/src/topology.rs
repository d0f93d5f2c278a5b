//! Nodes indexed by failure domain, the tier rule, and the loads the balancing
//! aims at.

use std::collections::BTreeMap;

use crate::Candidate;

/// The nodes placement works with (weight above zero, sorted by id), with
/// their failure domains turned into small integers.
///
/// Domains nest: a rack is the pair (room, rack) and a host the triple (room,
/// rack, host), so `rack-1` in two rooms is two racks. Indices are assigned in
/// sorted order of those keys, which makes them independent of the order the
/// candidates came in.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    pub ids: Vec<u64>,
    pub weights: Vec<f64>,
    pub eligible: Vec<bool>,
    pub room: Vec<u32>,
    pub rack: Vec<u32>,
    pub host: Vec<u32>,
    pub rooms: usize,
    pub racks: usize,
    pub hosts: usize,
    /// Room of each rack, rack of each host.
    pub rack_room: Vec<u32>,
    pub host_rack: Vec<u32>,
}

impl Topology {
    /// `nodes` must already be sorted by id, without duplicates, all with a
    /// weight above zero.
    pub fn new(nodes: &[&Candidate]) -> Self {
        debug_assert!(nodes.windows(2).all(|w| w[0].id < w[1].id));
        debug_assert!(nodes.iter().all(|c| c.weight > 0));
        fn index<K: Ord + Clone>(keys: impl Iterator<Item = K>) -> BTreeMap<K, u32> {
            let mut map: BTreeMap<K, u32> = keys.map(|k| (k, 0)).collect();
            for (i, v) in map.values_mut().enumerate() {
                *v = i as u32;
            }
            map
        }
        let rooms = index(nodes.iter().map(|c| c.room.as_str()));
        let racks = index(nodes.iter().map(|c| (c.room.as_str(), c.rack.as_str())));
        let hosts = index(
            nodes
                .iter()
                .map(|c| (c.room.as_str(), c.rack.as_str(), c.host.as_str())),
        );
        let mut rack_room = vec![0; racks.len()];
        for (&(room, _), &i) in &racks {
            rack_room[i as usize] = rooms[room];
        }
        let mut host_rack = vec![0; hosts.len()];
        for (&(room, rack, _), &i) in &hosts {
            host_rack[i as usize] = racks[&(room, rack)];
        }
        Topology {
            ids: nodes.iter().map(|c| c.id).collect(),
            weights: nodes.iter().map(|c| f64::from(c.weight)).collect(),
            eligible: nodes.iter().map(|c| c.eligible).collect(),
            room: nodes.iter().map(|c| rooms[c.room.as_str()]).collect(),
            rack: nodes
                .iter()
                .map(|c| racks[&(c.room.as_str(), c.rack.as_str())])
                .collect(),
            host: nodes
                .iter()
                .map(|c| hosts[&(c.room.as_str(), c.rack.as_str(), c.host.as_str())])
                .collect(),
            rooms: rooms.len(),
            racks: racks.len(),
            hosts: hosts.len(),
            rack_room,
            host_rack,
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// How close node `n` is to the nodes already chosen, as the tier rule
    /// ranks it: 0 shares no room with any of them, 1 shares a room but no
    /// rack, 2 a rack but no host, 3 a host. Lower tiers are taken first.
    pub fn tier(&self, n: usize, chosen: &[usize]) -> u8 {
        let mut tier = 0;
        for &c in chosen {
            let t = if self.host[c] == self.host[n] {
                3
            } else if self.rack[c] == self.rack[n] {
                2
            } else if self.room[c] == self.room[n] {
                1
            } else {
                0
            };
            tier = tier.max(t);
        }
        tier
    }
}

/// The nodes one selection may choose from (all weighted nodes while
/// balancing, only eligible ones for the final table), counted per domain so
/// that the best tier still available is known without looking at every node.
#[derive(Debug, Clone)]
pub(crate) struct Pool {
    pub member: Vec<bool>,
    pub size: usize,
    /// Rooms with a member.
    rooms: usize,
    /// Per room, racks with a member; per rack, hosts with a member; per
    /// host, members.
    racks_in_room: Vec<u32>,
    hosts_in_rack: Vec<u32>,
    nodes_in_host: Vec<u32>,
}

impl Pool {
    pub fn new(topo: &Topology, member: Vec<bool>) -> Self {
        let mut nodes_in_host = vec![0u32; topo.hosts];
        for n in 0..topo.len() {
            if member[n] {
                nodes_in_host[topo.host[n] as usize] += 1;
            }
        }
        let mut hosts_in_rack = vec![0u32; topo.racks];
        for (h, &count) in nodes_in_host.iter().enumerate() {
            if count > 0 {
                hosts_in_rack[topo.host_rack[h] as usize] += 1;
            }
        }
        let mut racks_in_room = vec![0u32; topo.rooms];
        for (r, &count) in hosts_in_rack.iter().enumerate() {
            if count > 0 {
                racks_in_room[topo.rack_room[r] as usize] += 1;
            }
        }
        Pool {
            size: member.iter().filter(|&&m| m).count(),
            member,
            rooms: racks_in_room.iter().filter(|&&c| c > 0).count(),
            racks_in_room,
            hosts_in_rack,
            nodes_in_host,
        }
    }

    /// The lowest tier any member not yet chosen is in, relative to `chosen`
    /// (all members); `None` once every member is chosen.
    pub fn best_tier(&self, topo: &Topology, chosen: &[usize]) -> Option<u8> {
        if chosen.len() >= self.size {
            return None;
        }
        // `chosen` holds a few nodes: quadratic scans, no allocation.
        let first_of = |key: &dyn Fn(usize) -> u32, i: usize| {
            chosen[..i].iter().all(|&c| key(c) != key(chosen[i]))
        };
        let room = |c: usize| topo.room[c];
        let rack = |c: usize| topo.rack[c];
        let host = |c: usize| topo.host[c];
        let rooms_used = (0..chosen.len()).filter(|&i| first_of(&room, i)).count();
        if rooms_used < self.rooms {
            return Some(0);
        }
        // Some used room with a rack not used yet?
        let racks_used_in = |r: u32| {
            (0..chosen.len())
                .filter(|&i| room(chosen[i]) == r && first_of(&rack, i))
                .count()
        };
        if (0..chosen.len()).any(|i| {
            let r = room(chosen[i]);
            first_of(&room, i) && racks_used_in(r) < self.racks_in_room[r as usize] as usize
        }) {
            return Some(1);
        }
        // Some used rack with a host not used yet?
        let hosts_used_in = |k: u32| {
            (0..chosen.len())
                .filter(|&i| rack(chosen[i]) == k && first_of(&host, i))
                .count()
        };
        if (0..chosen.len()).any(|i| {
            let k = rack(chosen[i]);
            first_of(&rack, i) && hosts_used_in(k) < self.hosts_in_rack[k as usize] as usize
        }) {
            return Some(2);
        }
        // Every member is in a used host now, and one is not chosen.
        debug_assert!(chosen.iter().any(|&c| {
            let used = chosen.iter().filter(|&&o| host(o) == host(c)).count();
            used < self.nodes_in_host[host(c) as usize] as usize
        }));
        Some(3)
    }

    /// The load each member should carry: `slots` replica slots in total,
    /// handed down the domain tree (rooms, racks, hosts, nodes) in proportion
    /// to weight, except that no domain is given more than the tier rule lets
    /// it hold.
    ///
    /// The tier rule bounds how many of one group's `count` replicas a domain
    /// can receive. A node takes at most one. If a parent domain takes at most
    /// `c` replicas of a group and has `s` child domains, each child takes at
    /// most `max(1, c - s + 1)` (and no more than it has nodes): a child gets a
    /// second replica of a group only once no sibling is left without one.
    /// Over `groups` groups a domain therefore holds at most `groups` times
    /// its bound; a weight share above that (one room with most of the
    /// weight, say) is capped and the rest shared among its siblings by
    /// weight ("water-filling"). Without this the balancing would chase loads
    /// the tier rule makes impossible.
    pub fn targets(&self, topo: &Topology, groups: u32, count: usize) -> Vec<f64> {
        let g = f64::from(groups);
        let members: Vec<usize> = (0..topo.len()).filter(|&n| self.member[n]).collect();
        let mut target = vec![0.0; topo.len()];
        // Top level: the whole pool is one parent holding `count` per group.
        spread(
            topo,
            &members,
            0,
            count.min(self.size) as f64 * g,
            count.min(self.size),
            g,
            &mut target,
        );
        target
    }
}

/// Distributes `load` over the children (at `level`: 0 rooms, 1 racks, 2
/// hosts, 3 nodes) of the domain holding `nodes`, whose per-group bound is
/// `cap`, and recurses.
fn spread(
    topo: &Topology,
    nodes: &[usize],
    level: u8,
    load: f64,
    cap: usize,
    groups: f64,
    target: &mut [f64],
) {
    if level == 3 {
        // Children are the nodes themselves, one replica per group at most.
        let caps: Vec<f64> = nodes.iter().map(|_| groups).collect();
        let weights: Vec<f64> = nodes.iter().map(|&n| topo.weights[n]).collect();
        for (&n, share) in nodes.iter().zip(water_fill(load, &weights, &caps)) {
            target[n] = share;
        }
        return;
    }
    let key = |n: usize| -> u32 {
        match level {
            0 => topo.room[n],
            1 => topo.rack[n],
            _ => topo.host[n],
        }
    };
    let mut children: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for &n in nodes {
        children.entry(key(n)).or_default().push(n);
    }
    let siblings = children.len();
    let caps: Vec<usize> = children
        .values()
        .map(|members| (cap + 1).saturating_sub(siblings).max(1).min(members.len()))
        .collect();
    let cap_slots: Vec<f64> = caps.iter().map(|&c| c as f64 * groups).collect();
    let weights: Vec<f64> = children
        .values()
        .map(|m| m.iter().map(|&n| topo.weights[n]).sum())
        .collect();
    let shares = water_fill(load, &weights, &cap_slots);
    for ((members, share), child_cap) in children.values().zip(shares).zip(caps) {
        spread(topo, members, level + 1, share, child_cap, groups, target);
    }
}

/// Shares `total` in proportion to `weights`, no share above its `cap`; what
/// a capped share cannot take goes to the others, again by weight. If the
/// caps add up to less than `total`, every share is at its cap.
pub(crate) fn water_fill(total: f64, weights: &[f64], caps: &[f64]) -> Vec<f64> {
    let mut share = vec![0.0; weights.len()];
    let mut fixed = vec![false; weights.len()];
    loop {
        let free_weight: f64 = (0..weights.len())
            .filter(|&i| !fixed[i])
            .map(|i| weights[i])
            .sum();
        let fixed_load: f64 = (0..weights.len())
            .filter(|&i| fixed[i])
            .map(|i| share[i])
            .sum();
        let rest = (total - fixed_load).max(0.0);
        if free_weight <= 0.0 {
            return share;
        }
        let mut capped_any = false;
        for i in 0..weights.len() {
            if !fixed[i] && rest * weights[i] / free_weight > caps[i] {
                share[i] = caps[i];
                fixed[i] = true;
                capped_any = true;
            }
        }
        if !capped_any {
            for i in 0..weights.len() {
                if !fixed[i] {
                    share[i] = rest * weights[i] / free_weight;
                }
            }
            return share;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, weight: u32, room: &str, rack: &str, host: &str) -> Candidate {
        Candidate {
            id,
            weight,
            room: room.into(),
            rack: rack.into(),
            host: host.into(),
            eligible: true,
        }
    }

    #[test]
    fn water_fill_caps_and_redistributes() {
        assert_eq!(water_fill(12.0, &[1.0, 1.0, 1.0], &[10.0; 3]), vec![4.0; 3]);
        assert_eq!(
            water_fill(12.0, &[4.0, 1.0, 1.0], &[5.0, 10.0, 10.0]),
            vec![5.0, 3.5, 3.5]
        );
        assert_eq!(water_fill(12.0, &[1.0, 1.0], &[2.0, 3.0]), vec![2.0, 3.0]);
    }

    #[test]
    fn targets_respect_the_tier_rule() {
        // Three rooms, the first with five equal nodes, the others four: with
        // three replicas every room holds exactly one replica of each group,
        // so the five share one room's worth.
        let mut nodes = Vec::new();
        let mut id = 1;
        for (room, n) in [("a", 5), ("b", 4), ("c", 4)] {
            for h in 0..n {
                nodes.push(node(id, 1, room, "r", &format!("{room}{h}")));
                id += 1;
            }
        }
        let refs: Vec<&Candidate> = nodes.iter().collect();
        let topo = Topology::new(&refs);
        let pool = Pool::new(&topo, vec![true; topo.len()]);
        let t = pool.targets(&topo, 1000, 3);
        for n in 0..5 {
            assert!((t[n] - 200.0).abs() < 1e-9, "{t:?}");
        }
        for n in 5..13 {
            assert!((t[n] - 250.0).abs() < 1e-9, "{t:?}");
        }
    }

    #[test]
    fn best_tier_counts_domains() {
        let nodes = [
            node(1, 1, "a", "r1", "h1"),
            node(2, 1, "a", "r1", "h1"),
            node(3, 1, "a", "r1", "h2"),
            node(4, 1, "a", "r2", "h3"),
            node(5, 1, "b", "r1", "h4"),
        ];
        let refs: Vec<&Candidate> = nodes.iter().collect();
        let topo = Topology::new(&refs);
        let pool = Pool::new(&topo, vec![true; 5]);
        assert_eq!(pool.best_tier(&topo, &[]), Some(0));
        assert_eq!(pool.best_tier(&topo, &[0]), Some(0));
        assert_eq!(pool.best_tier(&topo, &[0, 4]), Some(1));
        assert_eq!(pool.best_tier(&topo, &[0, 4, 3]), Some(2));
        assert_eq!(pool.best_tier(&topo, &[0, 4, 3, 2]), Some(3));
        assert_eq!(pool.best_tier(&topo, &[0, 4, 3, 2, 1]), None);
        // The same against a brute-force minimum over unchosen members.
        let chosen = [0usize, 4];
        let brute = (0..5)
            .filter(|n| !chosen.contains(n))
            .map(|n| topo.tier(n, &chosen))
            .min();
        assert_eq!(brute, Some(1));
        // Room b emptied of members: room a is then the only room.
        let pool = Pool::new(&topo, vec![true, true, true, true, false]);
        assert_eq!(pool.best_tier(&topo, &[0]), Some(1));
    }
}
