//! Random command sequences against two states, one of them snapshotted and
//! restored midway: they must end identical, and every step must keep the
//! invariants (unique names, ids never reused, one epoch per map change, one
//! catalogue version per catalogue change, refusals change nothing, retries
//! return the recorded result; group records sorted, complete per replica
//! count in use, acting sets non-empty and of nodes in the map, nodes that
//! go down or restart stay acting only where they are the last replica,
//! granted claims add the node at a new interval; chains descend beneath
//! their heads, heads are unique per data id, everything referenced is
//! recorded as given out and never dead, and dead epochs stay dead;
//! persistent reservation states belong to live volumes only).

use std::collections::{BTreeMap, BTreeSet};

use cairn_proto::map::{ClusterMap, VolumeInfo};
use cairn_volmgr::state::*;
use proptest::prelude::*;

const NAMES: [&str; 5] = ["a", "b", "vol-c", "-bad", ""];

fn node_id() -> impl Strategy<Value = u64> {
    1u64..=6
}

/// Mostly valid names, from a small set so that they collide.
fn name() -> impl Strategy<Value = &'static str> {
    prop_oneof![8 => 0..3usize, 1 => 3..NAMES.len()].prop_map(|i| NAMES[i])
}

fn key() -> impl Strategy<Value = VolumeKey> {
    prop_oneof![
        (0u64..8).prop_map(VolumeKey::id),
        name().prop_map(VolumeKey::name),
        ((1u64..8), name()).prop_map(|(id, name)| VolumeKey {
            id,
            name: name.into()
        }),
    ]
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        1 => Just(0u64),
        1 => Just(1000),
        1 => prop_oneof![Just(u64::MAX), Just(u64::MAX - 511), Just(VOLUME_SIZE_BYTES_MAX)],
        4 => (1u64..64).prop_map(|n| n << 30),
        4 => (1u64..1 << 20).prop_map(|n| n * 512),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    let ids = proptest::collection::vec(node_id(), 0..4);
    // Registrations and volume commands are the most frequent.
    prop_oneof![
        1 => prop_oneof![Just(0u32), Just(3), Just(64), Just(128)]
            .prop_map(|group_count| Command::SetGroupCount(SetGroupCount { group_count })),
        3 => (node_id(), 0u8..4, 0u8..2, 1u16..3, prop_oneof![3 => Just(1u32), 1 => Just(0), 1 => Just(2)], proptest::bool::weighted(0.1)).prop_map(
            |(id, host, rack, port, weight, bad)| {
                Command::RegisterNode(RegisterNode {
                    node_id: if bad { 0 } else { id },
                    addr: format!("10.0.0.{id}:{port}"),
                    host: format!("h{host}"),
                    rack: format!("r{rack}"),
                    room: String::new(),
                    weight,
                    capacity_bytes: 1 << 40,
                })
            }
        ),
        1 => (node_id(), 0u64..1000).prop_map(|(node_id, used_bytes)| {
            Command::NodeStats(NodeStats {
                nodes: vec![NodeUsage {
                    node_id,
                    capacity_bytes: 1 << 40,
                    used_bytes,
                }],
            })
        }),
        2 => (0u8..4, ids, prop_oneof![Just(0u64), 1u64..40]).prop_map(|(kind, node_ids, seen_epoch)| {
            let ids = NodeIds { node_ids, seen_epoch };
            match kind {
                0 => Command::MarkDown(ids),
                1 => Command::MarkUp(ids),
                2 => Command::MarkOut(ids),
                _ => Command::MarkIn(ids),
            }
        }),
        1 => (node_id(), 0u32..3)
            .prop_map(|(node_id, weight)| Command::SetWeight(SetWeight { node_id, weight })),
        1 => node_id().prop_map(|node_id| Command::RemoveNode(RemoveNode { node_id })),
        4 => (
            name(),
            size(),
            prop_oneof![
                4 => Just(1u32 << 20),
                4 => Just(4 << 20),
                1 => Just(3 << 20),
                1 => Just(128 << 20)
            ],
            prop_oneof![1 => Just(0u32), 8 => 1u32..4, 1 => 4u32..6],
            prop_oneof![1 => Just(0u32), 8 => 1u32..3, 1 => 3u32..6],
            proptest::bool::weighted(0.9),
        )
            .prop_map(|(name, size_bytes, extent_size_bytes, replicas, min_replicas, epoch_from_counter)| {
                Command::CreateVolume(CreateVolume {
                    name: name.into(),
                    size_bytes,
                    extent_size_bytes,
                    replicas,
                    min_replicas,
                    epoch_from_counter,
                })
            }),
        2 => (key(), size()).prop_map(|(key, size_bytes)| Command::GrowVolume(GrowVolume {
            volume: Some(key),
            size_bytes
        })),
        2 => key().prop_map(|key| Command::DeleteVolume(DeleteVolume { volume: Some(key) })),
        // Snapshots, rollbacks, clones, collection.
        8 => (key(), snap_name()).prop_map(|(key, name)| Command::CreateSnapshot(CreateSnapshot {
            volume: Some(key),
            name: name.into(),
        })),
        1 => (key(), snap_name()).prop_map(|(key, name)| Command::DeleteSnapshot(DeleteSnapshot {
            volume: Some(key),
            name: name.into(),
        })),
        4 => (key(), snap_name(), prop_oneof![2 => Just(""), 1 => snap_name()]).prop_map(
            |(key, snapshot, keep_as)| Command::RollbackVolume(RollbackVolume {
                volume: Some(key),
                snapshot: snapshot.into(),
                keep_as: keep_as.into(),
            })
        ),
        4 => (key(), snap_name(), name()).prop_map(|(key, snapshot, name)| {
            Command::CloneVolume(CloneVolume {
                volume: Some(key),
                snapshot: snapshot.into(),
                name: name.into(),
            })
        }),
        // data id 0 is filled with dead epochs from the state ([`fill_collect`]).
        2 => (prop_oneof![3 => Just(0u64), 1 => 1u64..8], proptest::collection::vec(1u64..30, 0..3))
            .prop_map(|(data_id, epochs)| Command::EpochsCollected(EpochsCollected { data_id, epochs })),
        // Persistent reservation sets: an expected generation of 1000 is
        // filled from the state ([`fill_pr`]), so that most apply.
        3 => (key(), prop_oneof![3 => Just(1000u64), 1 => 0u64..3], proptest::collection::vec(any::<u8>(), 0..4))
            .prop_map(|(key, expect_generation, state)| Command::PrSet(PrSet {
                volume: Some(key),
                expect_generation,
                state,
            })),
        // Claims: 0 in `primary`, `interval` or `up_since` is filled from the
        // state when applied ([`fill_claim`]), so that many are granted.
        4 => (
            1u32..4,
            prop_oneof![8 => 0u32..4, 1 => Just(1000)],
            node_id(),
            prop_oneof![4 => Just(0u64), 1 => 1u64..8],
            prop_oneof![6 => Just(0u64), 1 => 1u64..40],
            prop_oneof![6 => Just(0u64), 1 => 1u64..40],
        )
            .prop_map(|(replicas, index, node, primary, interval, up_since)| {
                Command::ClaimReplica(ClaimReplica {
                    primary,
                    replicas,
                    index,
                    interval,
                    node,
                    up_since,
                    more: vec![],
                })
            }),
    ]
}

/// Snapshot names, from a small set so that they collide.
fn snap_name() -> impl Strategy<Value = &'static str> {
    prop_oneof![8 => Just("s1"), 4 => Just("s2"), 1 => Just("-bad")]
}

/// Fills a collection with data id 0 from `s`: the first data id with dead
/// epochs and all of them (plus, if the proposal listed any, its own, which
/// are mostly referenced or unknown).
fn fill_collect(p: &Proposal, s: &State) -> Proposal {
    let mut p = p.clone();
    if let Some(Command::EpochsCollected(c)) = &mut p.command {
        if c.data_id == 0 {
            if let Some(d) = s.dead_epochs(None).first() {
                c.data_id = d.data_id;
                c.epochs.extend(&d.epochs);
            }
        }
    }
    p
}

/// Fills a persistent reservation set's expected generation 1000 with the
/// volume's stored generation (0 for an unknown volume).
fn fill_pr(p: &Proposal, s: &State) -> Proposal {
    let mut p = p.clone();
    if let Some(Command::PrSet(c)) = &mut p.command {
        if c.expect_generation == 1000 {
            let key = c.volume.clone().unwrap_or_default();
            let id = match key.id {
                0 => s.volume_by_name(&key.name).map_or(0, |v| v.id),
                id => id,
            };
            c.expect_generation = s.pr_generation(id);
        }
    }
    p
}

/// Fills a claim's zero fields from `s`: the group's primary and interval,
/// the node's incarnation, as a primary that just brought it up to date
/// would claim. Group keys below 1000 are mapped onto groups in the map.
fn fill_claim(p: &Proposal, s: &State) -> Proposal {
    let mut p = p.clone();
    if let Some(Command::ClaimReplica(c)) = &mut p.command {
        let counts: Vec<u32> = s
            .map()
            .groups
            .iter()
            .map(|g| g.replicas)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if c.index < 1000 && !counts.is_empty() {
            c.replicas = counts[c.replicas as usize % counts.len()];
            c.index %= s.map().group_count;
        }
        let group = s
            .map()
            .groups
            .iter()
            .find(|g| (g.replicas, g.index) == (c.replicas, c.index));
        if c.primary == 0 {
            c.primary = group.and_then(|g| g.acting.first().copied()).unwrap_or(0);
        }
        if c.interval == 0 {
            c.interval = group.map(|g| g.interval).unwrap_or(0);
        }
        if c.up_since == 0 {
            c.up_since = s.map().node(c.node).map(|n| n.up_since).unwrap_or(0);
        }
    }
    p
}

/// Client 0 opts out of deduplication. For clients 1 and 2 `client_seq` is
/// a mode that [`sequence`] turns into a number: mostly the next one (with
/// gaps), sometimes a retry of the last, sometimes an older one.
fn proposal() -> impl Strategy<Value = Proposal> {
    (
        prop_oneof![2 => Just(0u64), 1 => Just(1), 1 => Just(2)],
        0u64..10,
        0u64..1000,
        proptest::option::weighted(0.97, command()),
    )
        .prop_map(|(client_id, client_seq, t, command)| Proposal {
            client_id,
            client_seq,
            proposed_unix_ms: 1_700_000_000_000 + t,
            command,
        })
}

/// Replaces the mode in `p.client_seq` by a sequence number for its client.
fn sequence(p: &Proposal, last: &mut BTreeMap<u64, u64>) -> Proposal {
    let mut p = p.clone();
    if p.client_id == 0 {
        return p;
    }
    let seq = last.entry(p.client_id).or_insert(0);
    p.client_seq = match p.client_seq {
        0 | 1 => *seq,              // a retry
        2 => seq.saturating_sub(1), // an old request, delayed
        mode => {
            *seq += mode / 4 + 1; // new: the next, or a few on
            *seq
        }
    };
    p
}

/// The map without its usage figures: what the epoch covers.
fn placement_view(map: &ClusterMap) -> ClusterMap {
    let mut m = map.clone();
    for n in &mut m.nodes {
        n.capacity_bytes = 0;
        n.used_bytes = 0;
    }
    m
}

fn volumes(s: &State) -> Vec<VolumeInfo> {
    s.volumes().cloned().collect()
}

/// What the test expects of deduplication: each client's last applied
/// sequence number and response.
type Recorded = BTreeMap<u64, (u64, Response)>;

fn check_step(
    before: &State,
    after: &State,
    p: &Proposal,
    r: &Response,
    recorded: &mut Recorded,
    ever: &mut BTreeSet<u64>,
) {
    let unchanged = before.snapshot() == after.snapshot();
    match recorded.get(&p.client_id) {
        Some((seq, old)) if p.client_id != 0 && p.client_seq == *seq => {
            assert_eq!(r, old, "a retry returns the recorded response");
            assert!(unchanged, "a retry applies nothing");
            return;
        }
        Some((seq, _)) if p.client_id != 0 && p.client_seq < *seq => {
            assert_eq!(r.code(), ErrorCode::StaleRequest);
        }
        _ => {}
    }
    if !r.is_ok() {
        assert!(unchanged, "refused ({}) but changed", r.message);
        assert!(!r.message.is_empty());
        return;
    }
    if p.client_id != 0 {
        recorded.insert(p.client_id, (p.client_seq, r.clone()));
    }

    // One epoch per change of what placement sees, none otherwise.
    let view_changed = placement_view(before.map()) != placement_view(after.map());
    let expected_epoch = before.map_epoch() + u64::from(view_changed);
    assert_eq!(after.map_epoch(), expected_epoch, "{:?}", p.command);
    assert_eq!(r.map_epoch, after.map_epoch());
    // Likewise for the catalogue.
    let catalogue_changed = volumes(before) != volumes(after);
    let expected_version = before.catalogue_version() + u64::from(catalogue_changed);
    assert_eq!(
        after.catalogue_version(),
        expected_version,
        "{:?}",
        p.command
    );
    assert_eq!(r.catalogue_version, after.catalogue_version());
    // A volume command never touches the map, a map command never the
    // catalogue; except that the first volume of a replica count adds that
    // count's group records, and nothing else, to the map.
    if view_changed && catalogue_changed {
        let Some(Command::CreateVolume(c)) = &p.command else {
            panic!("{:?} changed map and catalogue", p.command);
        };
        let r = c.replicas;
        assert!(!before.map().groups.iter().any(|g| g.replicas == r));
        let mut rest = after.map().clone();
        rest.groups.retain(|g| g.replicas != r);
        rest.epoch = before.map_epoch();
        assert_eq!(placement_view(&rest), placement_view(before.map()));
        let added = after.map().groups.iter().filter(|g| g.replicas == r);
        assert!(added.clone().all(|g| g.interval == after.map_epoch()));
        assert_eq!(added.count(), after.map().group_count as usize);
    }
    check_groups_step(before, after, p);
    // Dead epochs stay dead (or are forgotten, once collected).
    let dead_after: BTreeSet<(u64, u64)> = dead(after);
    let given_after: BTreeSet<(u64, u64)> = after
        .epochs()
        .flat_map(|(d, e)| e.iter().map(move |&e| (d, e)))
        .collect();
    for x in dead(before) {
        assert!(
            dead_after.contains(&x) || !given_after.contains(&x),
            "dead epoch {x:?} came back by {:?}",
            p.command
        );
    }

    // Ids: new ones were never seen before, and stay below the next id.
    let live_before: BTreeSet<u64> = before.volumes().map(|v| v.id).collect();
    for v in after.volumes() {
        if !live_before.contains(&v.id) {
            assert!(ever.insert(v.id), "volume id {} given twice", v.id);
        }
        assert!(v.id < after.next_volume_id());
    }
}

/// What acting sets may do in one successful step.
fn check_groups_step(before: &State, after: &State, p: &Proposal) {
    let (b, a) = (before.map(), after.map());
    // Nodes that went down or restarted act only where they are the last.
    for n in &a.nodes {
        let Some(old) = b.node(n.id) else { continue };
        let fell = old.up && !n.up;
        let restarted = matches!(&p.command, Some(Command::RegisterNode(r)) if r.node_id == n.id);
        if fell || restarted {
            for g in a.groups.iter().filter(|g| g.acting.contains(&n.id)) {
                assert_eq!(
                    g.acting,
                    vec![n.id],
                    "node {} still acting with others",
                    n.id
                );
            }
        }
        if restarted || (!old.up && n.up) {
            assert_eq!(n.up_since, a.epoch, "a new incarnation");
        }
        // The detector's marks leave alone an incarnation newer than the
        // map it judged.
        if let Some(Command::MarkDown(c) | Command::MarkOut(c)) = &p.command {
            if c.seen_epoch != 0 && old.up_since > c.seen_epoch {
                assert_eq!(
                    (n.up, n.in_),
                    (old.up, old.in_),
                    "node {} judged by an older map",
                    n.id
                );
            }
        }
    }
    // Acting sets grow only by a granted claim, by its node, at a new
    // interval; every acting set that changed has the new epoch as interval.
    for g in &a.groups {
        let Some(old) = b
            .groups
            .iter()
            .find(|o| (o.replicas, o.index) == (g.replicas, g.index))
        else {
            continue;
        };
        if old.acting != g.acting {
            assert_eq!(g.interval, a.epoch);
        }
        let joined: Vec<u64> = g
            .acting
            .iter()
            .copied()
            .filter(|id| !old.acting.contains(id))
            .collect();
        if !joined.is_empty() {
            let Some(Command::ClaimReplica(c)) = &p.command else {
                panic!(
                    "{joined:?} joined group {}x{} by {:?}",
                    g.index, g.replicas, p.command
                );
            };
            assert_eq!((c.replicas, c.index), (g.replicas, g.index));
            assert_eq!(joined, vec![c.node]);
            assert_eq!(c.interval, old.interval, "compare and set");
            assert_eq!(
                b.node(c.node).map(|n| (n.up, n.up_since)),
                Some((true, c.up_since))
            );
            assert_eq!(old.acting.first(), Some(&c.primary));
        }
    }
}

fn dead(s: &State) -> BTreeSet<(u64, u64)> {
    s.dead_epochs(None)
        .into_iter()
        .flat_map(|d| d.epochs.into_iter().map(move |e| (d.data_id, e)))
        .collect()
}

fn descending_below(top: u64, chain: &[u64]) -> bool {
    std::iter::once(&top)
        .chain(chain)
        .collect::<Vec<_>>()
        .windows(2)
        .all(|w| w[0] > w[1])
}

/// Snapshots and epochs: chains descend below their heads, heads are
/// unique per data id, everything referenced is recorded as given out and
/// below the next epoch, nothing referenced is dead.
fn check_epochs(s: &State) {
    let given: BTreeMap<u64, BTreeSet<u64>> = s.epochs().map(|(d, e)| (d, e.clone())).collect();
    let mut heads: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for v in s.volumes() {
        let d = v.data_volume_id();
        assert!(v.head_epoch >= 1 && v.head_epoch < s.next_epoch());
        assert!(descending_below(v.head_epoch, &v.chain), "{v:?}");
        assert!(
            heads.entry(d).or_default().insert(v.head_epoch),
            "head epoch {} twice in data id {d}",
            v.head_epoch
        );
        let mut names = BTreeSet::new();
        for snap in &v.snapshots {
            assert!(names.insert(&snap.name), "snapshot name twice: {v:?}");
            assert!(snap.id >= 1 && snap.id <= v.last_snapshot_id);
            assert!(descending_below(snap.epoch, &snap.chain), "{v:?}");
        }
        let refs = std::iter::once(v.head_epoch)
            .chain(v.chain.iter().copied())
            .chain(
                v.snapshots
                    .iter()
                    .flat_map(|x| std::iter::once(x.epoch).chain(x.chain.iter().copied())),
            );
        for e in refs {
            assert!(
                given.get(&d).is_some_and(|g| g.contains(&e)),
                "epoch {e} of data id {d} referenced but not given out"
            );
            assert!(
                !dead(s).contains(&(d, e)),
                "epoch {e} of {d} referenced but dead"
            );
        }
    }
    // A head is no other view's epoch.
    for v in s.volumes() {
        let d = v.data_volume_id();
        for w in s.volumes().filter(|w| w.data_volume_id() == d) {
            if w.id != v.id {
                assert!(!w.chain.contains(&v.head_epoch));
                assert!(w.snapshots.iter().all(|x| x.epoch != v.head_epoch));
            }
        }
        assert!(v.snapshots.iter().all(|x| x.epoch != v.head_epoch));
    }
    assert!(given.values().flatten().all(|&e| e < s.next_epoch()));
}

fn check_state(s: &State) {
    for e in s.pr_entries() {
        assert!(s.volume(e.volume_id).is_some(), "state of a gone volume");
        assert!(e.generation > 0);
        assert_eq!(s.pr_state(e.volume_id), (e.generation, &e.state[..]));
    }
    let mut names = BTreeSet::new();
    for v in s.volumes() {
        assert!(names.insert(v.name.clone()), "name {:?} twice", v.name);
        assert_eq!(s.volume_by_name(&v.name).map(|x| x.id), Some(v.id));
        assert!(v.min_replicas >= 1 && v.min_replicas <= v.replicas);
        assert!(v.size_bytes > 0 && v.size_bytes % 512 == 0);
    }
    let ids: Vec<u64> = s.map().nodes.iter().map(|n| n.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "nodes sorted: {ids:?}");
    assert!(s.map().nodes.iter().all(|n| n.since_epoch <= s.map_epoch()));
    assert!(s.map().nodes.iter().all(|n| n.up_since <= s.map_epoch()));

    let map = s.map();
    let keys: Vec<(u32, u32)> = map.groups.iter().map(|g| (g.replicas, g.index)).collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "records sorted: {keys:?}"
    );
    for g in &map.groups {
        assert!(
            !g.acting.is_empty(),
            "group {}x{} has no acting replica",
            g.index,
            g.replicas
        );
        for (i, id) in g.acting.iter().enumerate() {
            assert!(map.node(*id).is_some(), "acting node {id} not in the map");
            assert!(!g.acting[..i].contains(id), "acting node {id} twice");
        }
        assert!(g.interval <= map.epoch && g.index < map.group_count);
    }
    // Every replica count in use has all its groups.
    let counts: BTreeSet<u32> = s.volumes().map(|v| v.replicas).collect();
    for r in counts {
        let n = map.groups.iter().filter(|g| g.replicas == r).count();
        assert_eq!(n, map.group_count as usize, "groups of {r} replicas");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn replicas_agree_across_snapshot_and_keep_invariants(
        proposals in proptest::collection::vec(proposal(), 1..200),
        cut in any::<prop::sample::Index>(),
    ) {
        let cut = cut.index(proposals.len());
        let mut a = State::new();
        let mut b = State::new();
        let mut recorded = Recorded::new();
        let mut ever = BTreeSet::new();
        let mut last_seq = BTreeMap::new();
        for (i, p) in proposals.iter().enumerate() {
            let p = &fill_pr(&fill_collect(&fill_claim(&sequence(p, &mut last_seq), &a), &a), &a);
            if i == cut {
                b = State::restore(&b.snapshot()).expect("own snapshot restores");
                prop_assert_eq!(&a, &b);
            }
            let before = a.clone();
            let ra = a.apply(p);
            let rb = b.apply(p);
            prop_assert_eq!(&ra, &rb);
            check_step(&before, &a, p, &ra, &mut recorded, &mut ever);
            check_state(&a);
            check_epochs(&a);
            prop_assert!(a.map_epoch() >= before.map_epoch());
        }
        prop_assert_eq!(a.snapshot(), b.snapshot());
        prop_assert_eq!(a, b);
    }
}
