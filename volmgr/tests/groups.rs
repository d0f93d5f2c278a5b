//! The groups' acting sets in the replicated state: records appear with the
//! first volume of a replica count, down/up/register follow
//! `cairn_group::authority` (several nodes in one epoch), claims are compare
//! and set, a node that is acting cannot be removed, and snapshots keep it
//! all.

use cairn_placement::PlacementTable;
use cairn_proto::groupmap::candidates;
use cairn_proto::map::{ClusterMap, GroupRecord};
use cairn_volmgr::state::*;

const GIB: u64 = 1 << 30;
const GROUPS: u32 = 16;

fn prop(command: Command) -> Proposal {
    Proposal {
        client_id: 0,
        client_seq: 0,
        proposed_unix_ms: 1_700_000_000_000,
        command: Some(command),
    }
}

fn ok(state: &mut State, command: Command) -> Response {
    let r = state.apply(&prop(command));
    assert!(r.is_ok(), "refused: {}", r.message);
    r
}

/// Applies `command`, checks it is refused with `code` and a message with
/// every one of `words`, and that the state did not change.
fn refused(state: &mut State, command: Command, code: ErrorCode, words: &[&str]) -> String {
    let before = state.snapshot();
    let r = state.apply(&prop(command));
    assert_eq!(r.code(), code, "{}", r.message);
    for w in words {
        assert!(r.message.contains(w), "message {:?} lacks {w:?}", r.message);
    }
    assert_eq!(state.snapshot(), before, "state changed by: {}", r.message);
    r.message
}

fn register(id: u64) -> Command {
    Command::RegisterNode(RegisterNode {
        node_id: id,
        addr: format!("127.0.0.{id}:7000"),
        host: format!("h{id}"),
        rack: String::new(),
        room: String::new(),
        weight: 1,
        capacity_bytes: 100 * GIB,
    })
}

fn create(name: &str, replicas: u32) -> Command {
    Command::CreateVolume(CreateVolume {
        name: name.into(),
        size_bytes: GIB,
        extent_size_bytes: 4 << 20,
        replicas,
        min_replicas: 1,
        epoch_from_counter: true,
    })
}

fn mark_down(ids: &[u64]) -> Command {
    Command::MarkDown(NodeIds {
        node_ids: ids.to_vec(),
        seen_epoch: 0,
    })
}

fn mark_up(ids: &[u64]) -> Command {
    Command::MarkUp(NodeIds {
        node_ids: ids.to_vec(),
        seen_epoch: 0,
    })
}

/// `nodes` chunk servers on as many hosts, `GROUPS` groups, no volume.
fn nodes(nodes: u64) -> State {
    let mut s = State::new();
    ok(
        &mut s,
        Command::SetGroupCount(SetGroupCount {
            group_count: GROUPS,
        }),
    );
    for id in 1..=nodes {
        ok(&mut s, register(id));
    }
    s
}

fn placement(map: &ClusterMap, replicas: u32) -> PlacementTable {
    PlacementTable::build(&candidates(map), map.group_count, replicas as usize).unwrap()
}

fn records(s: &State, replicas: u32) -> Vec<GroupRecord> {
    s.map()
        .groups
        .iter()
        .filter(|g| g.replicas == replicas)
        .cloned()
        .collect()
}

fn record(s: &State, replicas: u32, index: u32) -> GroupRecord {
    s.map()
        .groups
        .iter()
        .find(|g| (g.replicas, g.index) == (replicas, index))
        .cloned()
        .unwrap()
}

#[test]
fn records_come_with_the_first_volume_of_a_replica_count() {
    let mut s = nodes(4);
    ok(&mut s, mark_down(&[4]));
    assert!(s.map().groups.is_empty());
    let epoch = s.map_epoch();
    let r = ok(&mut s, create("a", 3));
    assert_eq!(r.map_epoch, epoch + 1, "the groups are a map change");
    assert_eq!(s.map_epoch(), epoch + 1);
    let table = placement(s.map(), 3);
    let recs = records(&s, 3);
    assert_eq!(recs.len(), GROUPS as usize);
    for (i, g) in recs.iter().enumerate() {
        assert_eq!(g.index, i as u32);
        assert_eq!(g.interval, epoch + 1);
        // The placement's up nodes, in placement order.
        let up: Vec<u64> = table
            .lookup(g.index)
            .unwrap()
            .iter()
            .copied()
            .filter(|&n| n != 4)
            .collect();
        assert_eq!(g.acting, up, "group {i}");
    }
    // More volumes with 3 replicas: no new records, no epoch.
    ok(&mut s, create("b", 3));
    assert_eq!(s.map_epoch(), epoch + 1);
    // Another count: its records go before (sorted by replicas, index).
    ok(&mut s, create("c", 1));
    assert_eq!(s.map_epoch(), epoch + 2);
    let keys: Vec<(u32, u32)> = s
        .map()
        .groups
        .iter()
        .map(|g| (g.replicas, g.index))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    assert_eq!(keys.len(), 2 * GROUPS as usize);
    assert_eq!(keys[0], (1, 0));
    // Deleting every volume keeps the records.
    for name in ["a", "b", "c"] {
        ok(
            &mut s,
            Command::DeleteVolume(DeleteVolume {
                volume: Some(VolumeKey::name(name)),
            }),
        );
    }
    assert_eq!(s.map().groups.len(), 2 * GROUPS as usize);
    assert_eq!(s.map_epoch(), epoch + 2);
}

#[test]
fn a_group_on_down_nodes_only_starts_on_its_whole_placement() {
    let mut s = nodes(3);
    ok(&mut s, mark_down(&[1, 2, 3]));
    ok(&mut s, create("a", 2));
    let table = placement(s.map(), 2);
    for g in records(&s, 2) {
        assert_eq!(g.acting, table.lookup(g.index).unwrap());
    }
}

#[test]
fn volumes_wait_for_the_group_count() {
    let mut s = State::new();
    ok(&mut s, register(1));
    refused(
        &mut s,
        create("a", 1),
        ErrorCode::Unavailable,
        &["\"a\"", "group count is not set", "retry"],
    );
}

#[test]
fn a_restarted_node_leaves_acting_sets_except_where_last() {
    let mut s = nodes(4);
    ok(&mut s, create("a", 2));
    ok(&mut s, mark_down(&[2]));
    let before = s.clone();
    let epoch = s.map_epoch();
    ok(&mut s, register(1));
    assert_eq!(s.map_epoch(), epoch + 1);
    let n = s.map().node(1).unwrap();
    assert_eq!(
        (n.up, n.up_since, n.since_epoch),
        (true, epoch + 1, epoch + 1)
    );
    let mut last = 0;
    for (old, new) in records(&before, 2).iter().zip(records(&s, 2)) {
        if old.acting == vec![1] {
            // Its partner (2) is down: 1 is the last, and stays, but at a
            // new interval (its old incarnation is fenced).
            assert_eq!(new.acting, vec![1]);
            assert_eq!(new.interval, epoch + 1);
            last += 1;
        } else if old.acting.contains(&1) {
            let rest: Vec<u64> = old.acting.iter().copied().filter(|&n| n != 1).collect();
            assert_eq!(new.acting, rest);
            assert_eq!(new.interval, epoch + 1);
        } else {
            assert_eq!(&new, old, "groups without node 1 do not move");
        }
    }
    assert!(last > 0, "some group had 1 and 2 (the test needs one)");
}

#[test]
fn marking_two_nodes_down_is_one_epoch_and_keeps_last_replicas() {
    let mut s = nodes(3);
    ok(&mut s, create("a", 2));
    let before = s.clone();
    let epoch = s.map_epoch();
    ok(&mut s, mark_down(&[2, 1]));
    assert_eq!(s.map_epoch(), epoch + 1);
    for id in [1, 2] {
        let n = s.map().node(id).unwrap();
        assert_eq!((n.up, n.since_epoch), (false, epoch + 1));
        assert_eq!(n.up_since, before.map().node(id).unwrap().up_since);
    }
    for (old, new) in records(&before, 2).iter().zip(records(&s, 2)) {
        let mut placed = old.acting.clone();
        placed.sort();
        let want = match placed[..] {
            // In id order: 1 leaves first, then 2 is the last and stays.
            [1, 2] => vec![2],
            _ => vec![3],
        };
        assert_eq!(new.acting, want, "group {}", new.index);
        assert_eq!(new.interval, epoch + 1);
    }
    // Again: nothing changes.
    ok(&mut s, mark_down(&[1, 2]));
    assert_eq!(s.map_epoch(), epoch + 1);
}

#[test]
fn marking_up_is_a_new_incarnation_without_joining() {
    let mut s = nodes(3);
    ok(&mut s, create("a", 1));
    ok(&mut s, create("b", 3));
    ok(&mut s, mark_down(&[1]));
    let before = s.clone();
    let epoch = s.map_epoch();
    ok(&mut s, mark_up(&[1]));
    let n = s.map().node(1).unwrap();
    assert_eq!(
        (n.up, n.up_since, n.since_epoch),
        (true, epoch + 1, epoch + 1)
    );
    for (old, new) in before.map().groups.iter().zip(&s.map().groups) {
        assert_eq!(old.acting, new.acting, "nobody joins without a claim");
        if old.acting.contains(&1) {
            assert_eq!(old.acting, vec![1], "1 stayed only where last");
            assert_eq!(new.interval, epoch + 1);
        } else {
            assert_eq!(new.interval, old.interval);
        }
    }
}

fn claim(primary: u64, g: &GroupRecord, interval: u64, node: u64, up_since: u64) -> Command {
    Command::ClaimReplica(ClaimReplica {
        primary,
        replicas: g.replicas,
        index: g.index,
        interval,
        node,
        up_since,
        more: vec![],
    })
}

#[test]
fn claims_are_compare_and_set() {
    let mut s = nodes(3);
    ok(&mut s, create("a", 3));
    ok(&mut s, mark_down(&[2]));
    ok(&mut s, mark_up(&[2]));
    let up_since = s.map().node(2).unwrap().up_since;
    let g = record(&s, 3, 0);
    let primary = g.acting[0];
    assert!(!g.acting.contains(&2));

    // Granted once: the node joins in placement order at a new interval.
    let epoch = s.map_epoch();
    let good = || claim(primary, &g, g.interval, 2, up_since);
    let first = s.apply(&Proposal {
        client_id: 9,
        client_seq: 1,
        ..prop(good())
    });
    assert!(first.is_ok(), "{}", first.message);
    assert_eq!(first.map_epoch, epoch + 1);
    let now = record(&s, 3, 0);
    assert_eq!(now.acting, placement(s.map(), 3).lookup(0).unwrap());
    assert_eq!(now.interval, epoch + 1);
    // Its retry answers the recorded response; another copy finds the node
    // acting: Ok, nothing changes.
    let after = s.snapshot();
    let retry = s.apply(&Proposal {
        client_id: 9,
        client_seq: 1,
        ..prop(good())
    });
    assert_eq!(retry, first);
    let copy = ok(&mut s, good());
    assert_eq!(copy.map_epoch, epoch + 1);
    assert_eq!(s.snapshot(), after);

    // Another group: a stale interval is refused.
    let g1 = record(&s, 3, 1);
    let p1 = g1.acting[0];
    let msg = refused(
        &mut s,
        claim(p1, &g1, g1.interval - 1, 2, up_since),
        ErrorCode::FailedPrecondition,
        &["group 1x3", "chunk server 2", "interval", "changed"],
    );
    assert!(msg.contains(&format!("primary {p1}")), "{msg}");
    // A claimant that is not the primary is refused.
    let other = g1.acting[1];
    refused(
        &mut s,
        claim(other, &g1, g1.interval, 2, up_since),
        ErrorCode::FailedPrecondition,
        &["group 1x3", "not the group's primary"],
    );
    // A group that does not exist.
    let mut no_group = g1.clone();
    no_group.replicas = 2;
    refused(
        &mut s,
        claim(p1, &no_group, g1.interval, 2, up_since),
        ErrorCode::FailedPrecondition,
        &["group 1x2", "no such group"],
    );
    // The node restarted since: another incarnation, refused. (Its restart
    // gives every group it acts in a new interval; group 1 it was not in.)
    ok(&mut s, register(2));
    let g1 = record(&s, 3, 1);
    refused(
        &mut s,
        claim(g1.acting[0], &g1, g1.interval, 2, up_since),
        ErrorCode::FailedPrecondition,
        &["group 1x3", "not up as incarnation", "up as incarnation"],
    );
    // The current incarnation is granted.
    let now_since = s.map().node(2).unwrap().up_since;
    ok(&mut s, claim(g1.acting[0], &g1, g1.interval, 2, now_since));
    assert!(record(&s, 3, 1).acting.contains(&2));
}

#[test]
fn a_node_outside_the_placement_is_not_claimed() {
    let mut s = nodes(4);
    ok(&mut s, create("a", 2));
    let table = placement(s.map(), 2);
    let g = records(&s, 2)
        .into_iter()
        .find(|g| !table.lookup(g.index).unwrap().contains(&4))
        .unwrap();
    let up_since = s.map().node(4).unwrap().up_since;
    refused(
        &mut s,
        claim(g.acting[0], &g, g.interval, 4, up_since),
        ErrorCode::FailedPrecondition,
        &[
            &format!("group {}x2", g.index),
            "chunk server 4",
            "not in the group's placement",
        ],
    );
    // Nor a node marked out (it leaves the placement).
    let p = table.lookup(g.index).unwrap().to_vec();
    ok(&mut s, mark_down(&[p[1]]));
    ok(&mut s, mark_up(&[p[1]]));
    ok(
        &mut s,
        Command::MarkOut(NodeIds {
            node_ids: vec![p[1]],
            seen_epoch: 0,
        }),
    );
    let g = record(&s, 2, g.index);
    let up_since = s.map().node(p[1]).unwrap().up_since;
    refused(
        &mut s,
        claim(g.acting[0], &g, g.interval, p[1], up_since),
        ErrorCode::FailedPrecondition,
        &["not in the group's placement"],
    );
}

#[test]
fn an_acting_node_cannot_be_removed() {
    let mut s = nodes(3);
    ok(&mut s, create("a", 1));
    ok(
        &mut s,
        Command::MarkOut(NodeIds {
            node_ids: vec![2],
            seen_epoch: 0,
        }),
    );
    ok(&mut s, mark_down(&[2]));
    let g = records(&s, 1)
        .into_iter()
        .find(|g| g.acting == vec![2])
        .expect("node 2 holds some 1-replica group");
    let count = records(&s, 1)
        .iter()
        .filter(|g| g.acting.contains(&2))
        .count();
    refused(
        &mut s,
        Command::RemoveNode(RemoveNode { node_id: 2 }),
        ErrorCode::FailedPrecondition,
        &[
            "chunk server 2",
            &format!("group {}x1", g.index),
            &format!("{count} group(s)"),
            "last acting replica",
        ],
    );
    // Where others remain, a down node has left: with 2 replicas it goes.
    let mut s = nodes(3);
    ok(&mut s, create("a", 2));
    ok(
        &mut s,
        Command::MarkOut(NodeIds {
            node_ids: vec![2],
            seen_epoch: 0,
        }),
    );
    ok(&mut s, mark_down(&[2]));
    ok(&mut s, Command::RemoveNode(RemoveNode { node_id: 2 }));
    assert!(s.map().groups.iter().all(|g| !g.acting.contains(&2)));
}

#[test]
fn snapshots_keep_groups_and_incarnations() {
    let mut s = nodes(4);
    ok(&mut s, create("a", 3));
    ok(&mut s, create("b", 2));
    ok(&mut s, mark_down(&[1, 3]));
    ok(&mut s, mark_up(&[3]));
    ok(&mut s, register(4));
    let bytes = s.snapshot();
    let back = State::restore(&bytes).unwrap();
    assert_eq!(back.map(), s.map());
    assert_eq!(back, s);
    assert_eq!(back.snapshot(), bytes);
    assert!(back.map().nodes.iter().all(|n| n.up_since > 0));
    // The restored state applies the same way (its placement tables are
    // rebuilt on demand).
    let (mut a, mut b) = (s, back);
    let g = record(&a, 3, 0);
    let c = claim(
        g.acting[0],
        &g,
        g.interval,
        3,
        a.map().node(3).unwrap().up_since,
    );
    assert_eq!(a.apply(&prop(c.clone())), b.apply(&prop(c)));
    assert_eq!(a.snapshot(), b.snapshot());
}

#[test]
fn snapshots_with_broken_groups_are_refused() {
    use prost::Message as _;
    #[derive(Clone, PartialEq, ::prost::Message)]
    struct Envelope {
        #[prost(fixed32, tag = "1")]
        magic: u32,
        #[prost(uint32, tag = "2")]
        format_version: u32,
        #[prost(fixed32, tag = "3")]
        crc32: u32,
        #[prost(bytes = "vec", tag = "4")]
        payload: Vec<u8>,
    }
    let restore = |map: &ClusterMap| {
        let mut payload = Vec::new();
        prost::encoding::message::encode(1, map, &mut payload);
        prost::encoding::uint64::encode(4, &1, &mut payload);
        let bytes = Envelope {
            magic: SNAPSHOT_MAGIC,
            format_version: SNAPSHOT_FORMAT_VERSION,
            crc32: crc32fast::hash(&payload),
            payload,
        }
        .encode_to_vec();
        State::restore(&bytes)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let mut s = nodes(3);
    ok(&mut s, create("a", 2));
    let good = s.map().clone();
    assert_eq!(restore(&good), Ok(()));
    let broken = |f: &dyn Fn(&mut ClusterMap), words: &[&str]| {
        let mut m = good.clone();
        f(&mut m);
        let e = restore(&m).unwrap_err();
        for w in words {
            assert!(e.contains(w), "{e:?} lacks {w:?}");
        }
    };
    broken(
        &|m| m.groups.swap(0, 1),
        &["not sorted", "group 0x2 after group 1x2"],
    );
    broken(&|m| m.groups[1].index = 0, &["not sorted"]);
    broken(
        &|m| m.groups[3].acting.clear(),
        &["group 3x2", "empty acting set"],
    );
    broken(
        &|m| m.groups[3].acting = vec![1, 9],
        &["group 3x2", "node 9"],
    );
    broken(&|m| m.groups[3].acting = vec![1, 1], &["node 1 twice"]);
    broken(
        &|m| m.groups[2].interval = m.epoch + 1,
        &["group 2x2", "interval"],
    );
    broken(&|m| m.groups[15].index = GROUPS, &["group count"]);
    broken(&|m| m.nodes[0].up_since = m.epoch + 1, &["incarnation"]);
}

/// A rejoined node is claimed into all its groups in one command: one
/// epoch, however many groups; refused claims in the batch are skipped;
/// only a batch with nothing granted is refused.
#[test]
fn a_batch_of_claims_is_granted_at_one_epoch() {
    let mut s = nodes(3);
    ok(&mut s, create("a", 3));
    ok(&mut s, mark_down(&[2]));
    ok(&mut s, mark_up(&[2]));
    let up_since = s.map().node(2).unwrap().up_since;
    let all = records(&s, 3);
    // The claims node 1 may make: groups it leads.
    let led: Vec<&GroupRecord> = all.iter().filter(|g| g.acting[0] == 1).collect();
    assert!(led.len() > 3, "node 1 leads only {} groups", led.len());
    let entry = |g: &GroupRecord, interval: u64| cairn_proto::volmgr::GroupClaim {
        replicas: g.replicas,
        index: g.index,
        interval,
        node: 2,
        up_since,
    };
    let batch = |claims: Vec<cairn_proto::volmgr::GroupClaim>| {
        let (first, more) = claims.split_first().unwrap();
        Command::ClaimReplica(ClaimReplica {
            primary: 1,
            replicas: first.replicas,
            index: first.index,
            interval: first.interval,
            node: first.node,
            up_since: first.up_since,
            more: more.to_vec(),
        })
    };
    // All stale: refused, nothing changes.
    let before = s.snapshot();
    refused(
        &mut s,
        batch(led.iter().map(|g| entry(g, g.interval - 1)).collect()),
        ErrorCode::FailedPrecondition,
        &["chunk server 2", "interval"],
    );
    assert_eq!(s.snapshot(), before);
    // One stale among good ones: the good ones join, at one epoch.
    let epoch = s.map_epoch();
    let mut claims: Vec<_> = led.iter().map(|g| entry(g, g.interval)).collect();
    claims[0].interval -= 1;
    let r = ok(&mut s, batch(claims));
    assert_eq!(r.map_epoch, epoch + 1);
    for (i, g) in led.iter().enumerate() {
        let now = record(&s, 3, g.index);
        assert_eq!(now.acting.contains(&2), i != 0, "group {}", g.index);
        if i != 0 {
            assert_eq!(now.interval, epoch + 1);
        }
    }
    // Repeated: already acting everywhere but the stale one; Ok, no change.
    let after = s.snapshot();
    ok(
        &mut s,
        batch(led[1..].iter().map(|g| entry(g, g.interval)).collect()),
    );
    assert_eq!(s.snapshot(), after);
}
