//! Random command sequences against two states, one of them snapshotted and
//! restored midway: they must end identical, and every step must keep the
//! invariants (unique names, ids never reused, one epoch per map change, one
//! catalogue version per catalogue change, refusals change nothing, retries
//! return the recorded result).

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
        2 => (0u8..4, ids).prop_map(|(kind, node_ids)| {
            let ids = NodeIds { node_ids };
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
        )
            .prop_map(|(name, size_bytes, extent_size_bytes, replicas, min_replicas)| {
                Command::CreateVolume(CreateVolume {
                    name: name.into(),
                    size_bytes,
                    extent_size_bytes,
                    replicas,
                    min_replicas,
                })
            }),
        2 => (key(), size()).prop_map(|(key, size_bytes)| Command::GrowVolume(GrowVolume {
            volume: Some(key),
            size_bytes
        })),
        2 => key().prop_map(|key| Command::DeleteVolume(DeleteVolume { volume: Some(key) })),
    ]
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
    // A volume command never touches the map, a map command never the catalogue.
    assert!(!(view_changed && catalogue_changed));

    // Ids: new ones were never seen before, and stay below the next id.
    let live_before: BTreeSet<u64> = before.volumes().map(|v| v.id).collect();
    for v in after.volumes() {
        if !live_before.contains(&v.id) {
            assert!(ever.insert(v.id), "volume id {} given twice", v.id);
        }
        assert!(v.id < after.next_volume_id());
    }
}

fn check_state(s: &State) {
    let mut names = BTreeSet::new();
    for v in s.volumes() {
        assert!(names.insert(v.name.clone()), "name {:?} twice", v.name);
        assert_eq!(s.volume_by_name(&v.name).map(|x| x.id), Some(v.id));
        assert!(v.min_replicas >= 1 && v.min_replicas <= v.replicas);
        assert!(v.size_bytes > 0 && v.size_bytes.is_multiple_of(512));
    }
    let ids: Vec<u64> = s.map().nodes.iter().map(|n| n.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "nodes sorted: {ids:?}");
    assert!(s.map().nodes.iter().all(|n| n.since_epoch <= s.map_epoch()));
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
            let p = &sequence(p, &mut last_seq);
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
            prop_assert!(a.map_epoch() >= before.map_epoch());
        }
        prop_assert_eq!(a.snapshot(), b.snapshot());
        prop_assert_eq!(a, b);
    }
}
