//! The replicated state machine through its public API: bad input changes
//! nothing and says what was wrong, retries apply once, snapshots round-trip
//! and refuse corruption, and random command sequences keep the invariants.

use cairn_proto::map::ClusterMap;
use cairn_volmgr::node::Machine;
use cairn_volmgr::state::*;
use prost::Message as _;

const MIB: u32 = 1 << 20;
const GIB: u64 = 1 << 30;

fn prop(command: Command) -> Proposal {
    Proposal {
        client_id: 0,
        client_seq: 0,
        proposed_unix_ms: 1_700_000_000_000,
        command: Some(command),
    }
}

fn register(id: u64, host: &str, rack: &str) -> Command {
    Command::RegisterNode(RegisterNode {
        node_id: id,
        addr: format!("127.0.0.{id}:7000"),
        host: host.into(),
        rack: rack.into(),
        room: "room-a".into(),
        weight: 1,
        capacity_bytes: 100 * GIB,
    })
}

fn create(name: &str, size_bytes: u64, extent_size_bytes: u32, replicas: u32, min: u32) -> Command {
    Command::CreateVolume(CreateVolume {
        name: name.into(),
        size_bytes,
        extent_size_bytes,
        replicas,
        min_replicas: min,
        epoch_from_counter: true,
    })
}

fn grow(key: VolumeKey, size_bytes: u64) -> Command {
    Command::GrowVolume(GrowVolume {
        volume: Some(key),
        size_bytes,
    })
}

fn delete(key: VolumeKey) -> Command {
    Command::DeleteVolume(DeleteVolume { volume: Some(key) })
}

fn ids(node_ids: &[u64]) -> NodeIds {
    NodeIds {
        node_ids: node_ids.to_vec(),
        seen_epoch: 0,
    }
}

fn ok(state: &mut State, command: Command) -> Response {
    let r = state.apply(&prop(command));
    assert!(r.is_ok(), "refused: {}", r.message);
    r
}

/// A cluster of three chunk servers on three hosts (two racks) and one
/// 10 GiB volume "vol-a" (id 1).
fn cluster() -> State {
    let mut s = State::new();
    ok(
        &mut s,
        Command::SetGroupCount(SetGroupCount { group_count: 256 }),
    );
    ok(&mut s, register(1, "h1", "r1"));
    ok(&mut s, register(2, "h2", "r1"));
    ok(&mut s, register(3, "h3", "r2"));
    ok(&mut s, create("vol-a", 10 * GIB, 4 * MIB, 3, 2));
    s
}

/// Applies `command`, checks it is refused with `code` and a message holding
/// every one of `words`, and that the state did not change by a single byte.
fn refused(state: &mut State, command: Command, code: ErrorCode, words: &[&str]) -> StateError {
    let before = state.snapshot();
    let err = state.clone().try_apply(&prop(command.clone())).unwrap_err();
    let r = state.apply(&prop(command));
    assert_eq!(r.code(), code, "{}", r.message);
    assert_eq!(err.code(), code);
    assert_eq!(r.message, err.to_string());
    for w in words {
        assert!(r.message.contains(w), "message {:?} lacks {w:?}", r.message);
    }
    assert_eq!(state.snapshot(), before, "state changed by: {}", r.message);
    assert_eq!(r.map_epoch, state.map_epoch());
    assert_eq!(r.catalogue_version, state.catalogue_version());
    err
}

// ---- bad input ----

#[test]
fn duplicate_name_is_refused() {
    let mut s = cluster();
    let e = refused(
        &mut s,
        create("vol-a", GIB, 4 * MIB, 3, 2),
        ErrorCode::AlreadyExists,
        &["\"vol-a\"", "already exists", "id 1"],
    );
    assert!(matches!(e, StateError::DuplicateName { id: 1, .. }));
}

#[test]
fn bad_sizes_are_refused() {
    let mut s = cluster();
    for (size, words) in [
        (0, &["\"v\"", "size 0", "at least one 512-byte sector"][..]),
        (1000, &["size 1000", "multiple of 512", "512 and 1024"]),
        (GIB + 1, &["not a multiple of 512"]),
        (u64::MAX, &["not a multiple of 512"]),
        (u64::MAX - 511, &["above the limit"]),
        (VOLUME_SIZE_BYTES_MAX + 512, &["above the limit", "1 PiB"]),
    ] {
        refused(
            &mut s,
            create("v", size, 4 * MIB, 3, 2),
            ErrorCode::InvalidArgument,
            words,
        );
    }
    // Not a multiple of the extent size is fine: whole sectors are enough.
    let r = ok(&mut s, create("odd", 4 * MIB as u64 + 512, 4 * MIB, 3, 2));
    assert_eq!(r.volume.unwrap().size_bytes, 4 * MIB as u64 + 512);
}

#[test]
fn bad_extent_sizes_are_refused() {
    let mut s = cluster();
    for extent in [
        0,
        3 * MIB,
        3 * 64 * 1024,
        32 * 1024,
        128 * MIB,
        16 * MIB,
        1 << 30,
        MIB + 1,
    ] {
        let e = refused(
            &mut s,
            create("v", GIB, extent, 3, 2),
            ErrorCode::InvalidArgument,
            &[
                "\"v\"",
                &format!("extent size {extent} bytes"),
                "power of two",
            ],
        );
        assert!(matches!(e, StateError::InvalidExtentSize { .. }));
    }
    for extent in [64 * 1024, MIB, 4 * MIB, 8 * MIB] {
        ok(&mut s, create(&format!("e{extent}"), GIB, extent, 1, 1));
    }
}

#[test]
fn bad_replica_counts_are_refused() {
    let mut s = cluster();
    refused(
        &mut s,
        create("v", GIB, 4 * MIB, 0, 0),
        ErrorCode::InvalidArgument,
        &["\"v\"", "0 replicas", "outside 1..=16"],
    );
    refused(
        &mut s,
        create("v", GIB, 4 * MIB, 17, 1),
        ErrorCode::InvalidArgument,
        &["17 replicas"],
    );
    refused(
        &mut s,
        create("v", GIB, 4 * MIB, 2, 3),
        ErrorCode::InvalidArgument,
        &["\"v\"", "min_replicas 3", "replicas (2)"],
    );
    refused(
        &mut s,
        create("v", GIB, 4 * MIB, 2, 0),
        ErrorCode::InvalidArgument,
        &["min_replicas 0"],
    );
    let e = refused(
        &mut s,
        create("v", GIB, 4 * MIB, 4, 2),
        ErrorCode::FailedPrecondition,
        &["\"v\"", "4 replicas", "has 3", "distinct hosts"],
    );
    assert_eq!(
        e,
        StateError::NotEnoughFailureDomains {
            name: "v".into(),
            replicas: 4,
            hosts: 3
        }
    );
    // A second server on host h1 adds no failure domain.
    ok(&mut s, register(4, "h1", "r1"));
    refused(
        &mut s,
        create("v", GIB, 4 * MIB, 4, 2),
        ErrorCode::FailedPrecondition,
        &["has 3"],
    );
    // An admin cannot take a host out that vol-a's 3-replica groups need:
    // no placement could be built without it.
    let weight_0 = |node_id| Command::SetWeight(SetWeight { node_id, weight: 0 });
    for take in [Command::MarkOut(ids(&[3])), weight_0(2)] {
        refused(
            &mut s,
            take,
            ErrorCode::FailedPrecondition,
            &["3-replica groups need 3 distinct hosts", "2 would be left"],
        );
    }
    // With a fourth host, out nodes and weight-0 nodes hold nothing, so
    // they do not count.
    ok(&mut s, register(5, "h4", "r2"));
    ok(&mut s, Command::MarkOut(ids(&[3])));
    refused(
        &mut s,
        create("v", GIB, 4 * MIB, 4, 2),
        ErrorCode::FailedPrecondition,
        &["has 3"],
    );
    refused(
        &mut s,
        Command::MarkOut(ids(&[5])),
        ErrorCode::FailedPrecondition,
        &["[5]", "2 would be left"],
    );
    ok(&mut s, Command::MarkIn(ids(&[3])));
    ok(&mut s, weight_0(2));
    refused(
        &mut s,
        create("v", GIB, 4 * MIB, 4, 2),
        ErrorCode::FailedPrecondition,
        &["has 3"],
    );
    // The failure detector's out (it names the map it judged) is applied
    // as it always was: it checks before it proposes.
    let seen_epoch = s.map_epoch();
    ok(
        &mut s,
        Command::MarkOut(NodeIds {
            node_ids: vec![5],
            seen_epoch,
        }),
    );
    refused(
        &mut s,
        create("v", GIB, 4 * MIB, 3, 2),
        ErrorCode::FailedPrecondition,
        &["has 2"],
    );
    // Down but in: still a place for replicas.
    ok(&mut s, Command::MarkDown(ids(&[1, 3])));
    ok(&mut s, create("v", GIB, 4 * MIB, 2, 2));
    // An empty cluster takes no volume at all.
    let mut empty = State::new();
    refused(
        &mut empty,
        create("v", GIB, 4 * MIB, 1, 1),
        ErrorCode::FailedPrecondition,
        &["has 0"],
    );
}

#[test]
fn shrinking_is_refused_and_growing_works() {
    let mut s = cluster();
    let e = refused(
        &mut s,
        grow(VolumeKey::name("vol-a"), GIB),
        ErrorCode::FailedPrecondition,
        &[
            "\"vol-a\"",
            "id 1",
            "cannot shrink",
            "10737418240",
            "1073741824",
        ],
    );
    assert!(matches!(e, StateError::Shrink { id: 1, .. }));
    refused(
        &mut s,
        grow(VolumeKey::id(1), 20 * GIB + 7),
        ErrorCode::InvalidArgument,
        &["\"vol-a\"", "multiple of 512"],
    );
    refused(
        &mut s,
        grow(VolumeKey::id(1), 0),
        ErrorCode::InvalidArgument,
        &["\"vol-a\"", "size 0"],
    );
    // Same size: accepted, nothing changes.
    let before = s.snapshot();
    let r = ok(&mut s, grow(VolumeKey::id(1), 10 * GIB));
    assert_eq!(r.volume.unwrap().size_bytes, 10 * GIB);
    assert_eq!(s.snapshot(), before);
    let version = s.catalogue_version();
    let epoch = s.map_epoch();
    let r = ok(&mut s, grow(VolumeKey::name("vol-a"), 20 * GIB));
    assert_eq!(r.volume.unwrap().size_bytes, 20 * GIB);
    assert_eq!(s.volume(1).unwrap().size_bytes, 20 * GIB);
    assert_eq!(s.catalogue_version(), version + 1);
    assert_eq!(s.map_epoch(), epoch, "the catalogue does not move the map");
}

#[test]
fn unknown_volumes_are_refused() {
    let mut s = cluster();
    for (key, words) in [
        (VolumeKey::name("nope"), &["no volume named \"nope\""][..]),
        (VolumeKey::id(9), &["no volume with id 9"]),
        (
            VolumeKey {
                id: 1,
                name: "vol-b".into(),
            },
            &["with id 1 named \"vol-b\""],
        ),
        (VolumeKey::default(), &["no id or name"]),
    ] {
        refused(
            &mut s,
            grow(key.clone(), 20 * GIB),
            ErrorCode::NotFound,
            words,
        );
        refused(&mut s, delete(key), ErrorCode::NotFound, words);
    }
    refused(
        &mut s,
        Command::DeleteVolume(DeleteVolume { volume: None }),
        ErrorCode::NotFound,
        &["no volume"],
    );
}

#[test]
fn invalid_names_are_refused() {
    let mut s = cluster();
    let long = "a".repeat(VOLUME_NAME_BYTES_MAX + 1);
    for (name, word) in [
        ("", "required"),
        (long.as_str(), "129 bytes long"),
        ("a b", "' '"),
        ("a/b", "'/'"),
        ("vol\u{e9}", "'\u{e9}'"),
        ("-v", "start with '-' or '.'"),
        (".v", "start with '-' or '.'"),
        ("..", "start with"),
    ] {
        let e = refused(
            &mut s,
            create(name, GIB, 4 * MIB, 3, 2),
            ErrorCode::InvalidArgument,
            &["invalid volume name", word],
        );
        assert!(matches!(e, StateError::InvalidName { .. }));
    }
    let e = refused(
        &mut s,
        create(&"x".repeat(1 << 20), GIB, 4 * MIB, 3, 2),
        ErrorCode::InvalidArgument,
        &["1048576 bytes long"],
    );
    assert!(e.to_string().len() < 400, "a huge name is not echoed whole");
    ok(
        &mut s,
        create(&"a".repeat(VOLUME_NAME_BYTES_MAX), GIB, 4 * MIB, 3, 2),
    );
    ok(&mut s, create("Db_01.data-x", GIB, 4 * MIB, 3, 2));
}

#[test]
fn bad_node_commands_are_refused() {
    let mut s = cluster();
    let mut bad = |command, code, words: &[&str]| {
        refused(&mut s, command, code, words);
    };
    let mut r = RegisterNode {
        node_id: 0,
        addr: "h:1".into(),
        host: "h".into(),
        ..Default::default()
    };
    bad(
        Command::RegisterNode(r.clone()),
        ErrorCode::InvalidArgument,
        &["node id 0"],
    );
    r.node_id = 9;
    r.addr = "nohost".into();
    bad(
        Command::RegisterNode(r.clone()),
        ErrorCode::InvalidArgument,
        &["chunk server 9", "\"nohost\"", "host:port"],
    );
    r.addr = "h:99999".into();
    bad(
        Command::RegisterNode(r.clone()),
        ErrorCode::InvalidArgument,
        &["port \"99999\""],
    );
    r.addr = "h:1".into();
    r.host = String::new();
    bad(
        Command::RegisterNode(r.clone()),
        ErrorCode::InvalidArgument,
        &["chunk server 9", "host label is required"],
    );
    r.host = "h".into();
    r.rack = "rack 1".into();
    bad(
        Command::RegisterNode(r),
        ErrorCode::InvalidArgument,
        &["rack label \"rack 1\""],
    );
    bad(
        Command::MarkDown(ids(&[1, 9])),
        ErrorCode::NotFound,
        &["node id 9"],
    );
    bad(
        Command::MarkOut(ids(&[])),
        ErrorCode::InvalidArgument,
        &["no node ids"],
    );
    bad(
        Command::SetWeight(SetWeight {
            node_id: 9,
            weight: 1,
        }),
        ErrorCode::NotFound,
        &["node id 9"],
    );
    bad(
        Command::RemoveNode(RemoveNode { node_id: 1 }),
        ErrorCode::FailedPrecondition,
        &["chunk server 1", "in and up", "mark it out"],
    );
    bad(
        Command::SetGroupCount(SetGroupCount { group_count: 512 }),
        ErrorCode::FailedPrecondition,
        &["already 256", "512"],
    );
    bad(
        Command::SetGroupCount(SetGroupCount { group_count: 300 }),
        ErrorCode::InvalidArgument,
        &["300", "power of two"],
    );
}

#[test]
fn malformed_entries_are_refused() {
    let mut s = cluster();
    let before = s.snapshot();
    let r = s.apply(&Proposal {
        command: None,
        ..prop(Command::MarkIn(ids(&[1])))
    });
    assert_eq!(r.code(), ErrorCode::Malformed);
    assert!(r.message.contains("same version"), "{}", r.message);
    let r = s.apply_bytes(&[0xff, 0xff, 0xff]);
    assert_eq!(r.code(), ErrorCode::Malformed);
    assert!(
        r.message.starts_with("malformed log entry"),
        "{}",
        r.message
    );
    // Through the raft machine interface, as the node loop calls it.
    let r = Response::decode(&Machine::apply(&mut s, 7, &[0x0a])[..]).unwrap();
    assert_eq!(r.code(), ErrorCode::Malformed);
    assert_eq!(s.snapshot(), before);
}

// ---- what succeeds, and what it moves ----

#[test]
fn volume_ids_are_never_reused() {
    let mut s = cluster();
    let r = ok(&mut s, create("vol-b", GIB, 4 * MIB, 2, 1));
    let b = r.volume.unwrap();
    assert_eq!(
        (b.id, b.head_epoch, b.created_unix_ms),
        (2, 2, 1_700_000_000_000)
    );
    let r = ok(&mut s, delete(VolumeKey::name("vol-a")));
    assert_eq!(r.volume.unwrap().id, 1);
    assert!(s.volume_by_name("vol-a").is_none());
    let r = ok(&mut s, create("vol-a", GIB, 4 * MIB, 2, 1));
    assert_eq!(r.volume.unwrap().id, 3, "a deleted id is not given again");
    let deleted: Vec<_> = s.deleted().collect();
    assert_eq!(deleted.len(), 1);
    assert_eq!(
        (deleted[0].volume_id, deleted[0].name.as_str()),
        (1, "vol-a")
    );
    assert_eq!(s.next_volume_id(), 4);
    let names: Vec<_> = s.volumes().map(|v| (v.id, v.name.as_str())).collect();
    assert_eq!(names, [(2, "vol-b"), (3, "vol-a")]);
}

#[test]
fn deletion_records_are_bounded() {
    let mut s = cluster();
    for i in 0..DELETED_MAX + 5 {
        let name = format!("t{i}");
        ok(&mut s, create(&name, GIB, 4 * MIB, 1, 1));
        ok(&mut s, delete(VolumeKey::name(name)));
    }
    assert_eq!(s.deleted().count(), DELETED_MAX);
    // vol-a is id 1, t0 id 2, ...: the five oldest records are gone.
    assert_eq!(s.deleted().next().unwrap().volume_id, 7);
    let back = State::restore(&s.snapshot()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn map_changes_make_exactly_one_epoch_each() {
    let mut s = cluster();
    let e = s.map_epoch();
    assert_eq!(
        e, 5,
        "group count, three registrations, the first 3-replica volume's groups"
    );
    // Several nodes in one command: one epoch.
    ok(&mut s, Command::MarkDown(ids(&[1, 2, 3])));
    assert_eq!(s.map_epoch(), e + 1);
    assert!(s
        .map()
        .nodes
        .iter()
        .all(|n| !n.up && n.since_epoch == e + 1));
    // Nothing to change: no epoch.
    ok(&mut s, Command::MarkDown(ids(&[1, 2])));
    assert_eq!(s.map_epoch(), e + 1);
    // Partly already there: one epoch, only the changed node's since_epoch.
    ok(&mut s, Command::MarkUp(ids(&[1])));
    ok(&mut s, Command::MarkUp(ids(&[1, 2])));
    assert_eq!(s.map_epoch(), e + 3);
    assert_eq!(s.map().node(1).unwrap().since_epoch, e + 2);
    // Usage is informational: no epoch.
    let before = s.map().clone();
    ok(
        &mut s,
        Command::NodeStats(NodeStats {
            nodes: vec![
                NodeUsage {
                    node_id: 1,
                    capacity_bytes: 50 * GIB,
                    used_bytes: GIB,
                },
                NodeUsage {
                    node_id: 99,
                    capacity_bytes: 1,
                    used_bytes: 1,
                },
            ],
        }),
    );
    assert_eq!(s.map_epoch(), e + 3);
    assert_ne!(s.map(), &before);
    assert_eq!(s.map().node(1).unwrap().used_bytes, GIB);
    // Volumes: no epoch, except the first of a replica count (its groups).
    ok(&mut s, create("vol-b", GIB, 4 * MIB, 3, 1));
    assert_eq!(s.map_epoch(), e + 3);
    ok(&mut s, create("vol-c", GIB, 4 * MIB, 1, 1));
    assert_eq!(s.map_epoch(), e + 4);
    ok(&mut s, create("vol-d", GIB, 4 * MIB, 1, 1));
    ok(&mut s, delete(VolumeKey::name("vol-c")));
    assert_eq!(s.map_epoch(), e + 4);
    // Re-registering, even unchanged, is a new incarnation: one epoch.
    // From another address: refused, nothing changes (two servers claiming
    // one id must not swap places).
    ok(&mut s, register(1, "h1", "r1"));
    assert_eq!(s.map_epoch(), e + 5);
    assert_eq!(s.map().node(1).unwrap().up_since, e + 5);
    let addr = s.map().node(1).unwrap().addr.clone();
    let mut moved = register(1, "h1", "r1");
    if let Command::RegisterNode(r) = &mut moved {
        r.addr = "10.0.0.1:7000".into();
    }
    let err = refused(
        &mut s,
        moved,
        ErrorCode::FailedPrecondition,
        &["chunk server 1", &addr, "10.0.0.1:7000"],
    );
    assert!(matches!(err, StateError::NodeAddrMismatch { .. }));
    assert_eq!(s.map_epoch(), e + 5);
    assert_eq!(s.map().node(1).unwrap().addr, addr);
}

#[test]
fn re_registering_keeps_weight_and_states() {
    let mut s = cluster();
    // A fourth host, so that one may leave placement.
    ok(&mut s, register(4, "h4", "r2"));
    ok(
        &mut s,
        Command::SetWeight(SetWeight {
            node_id: 2,
            weight: 0,
        }),
    );
    ok(&mut s, Command::MarkOut(ids(&[2])));
    ok(&mut s, Command::MarkDown(ids(&[2])));
    let epoch = s.map_epoch();
    // The chunk server restarts and registers with its configured weight:
    // a new incarnation, up (the process just started), still out, weight
    // kept.
    ok(&mut s, register(2, "h2", "r1"));
    let n = s.map().node(2).unwrap();
    assert_eq!((n.weight, n.up, n.in_), (0, true, false));
    assert_eq!((n.up_since, n.since_epoch), (epoch + 1, epoch + 1));
    assert_eq!(s.map_epoch(), epoch + 1);
}

#[test]
fn nodes_are_removed_only_when_out_and_down() {
    let mut s = cluster();
    // A fourth host, so that one may leave placement.
    ok(&mut s, register(4, "h4", "r2"));
    ok(&mut s, Command::MarkOut(ids(&[3])));
    refused(
        &mut s,
        Command::RemoveNode(RemoveNode { node_id: 3 }),
        ErrorCode::FailedPrecondition,
        &["while it is up"],
    );
    ok(&mut s, Command::MarkDown(ids(&[3])));
    let epoch = s.map_epoch();
    let r = ok(&mut s, Command::RemoveNode(RemoveNode { node_id: 3 }));
    assert_eq!(r.node.unwrap().id, 3);
    assert_eq!(s.map_epoch(), epoch + 1);
    assert!(s.map().node(3).is_none());
    // Registering again later is a new node: up and in.
    ok(&mut s, register(3, "h3", "r2"));
    let n = s.map().node(3).unwrap();
    assert!(n.up && n.in_);
}

#[test]
fn group_count_is_set_once() {
    let mut s = State::new();
    assert_eq!(s.map().group_count, 0);
    ok(
        &mut s,
        Command::SetGroupCount(SetGroupCount { group_count: 1024 }),
    );
    assert_eq!((s.map().group_count, s.map_epoch()), (1024, 1));
    // Proposed again by the next leader with the same configuration: fine.
    ok(
        &mut s,
        Command::SetGroupCount(SetGroupCount { group_count: 1024 }),
    );
    assert_eq!(s.map_epoch(), 1);
}

// ---- retried requests ----

fn from(client_id: u64, client_seq: u64, command: Command) -> Proposal {
    Proposal {
        client_id,
        client_seq,
        ..prop(command)
    }
}

#[test]
fn a_retried_request_is_applied_once() {
    let mut s = cluster();
    let first = s.apply(&from(7, 1, create("vol-b", GIB, 4 * MIB, 3, 2)));
    assert!(first.is_ok());
    let after_first = s.snapshot();
    // The leader died before answering; the client retries elsewhere.
    let retry = s.apply(&from(7, 1, create("vol-b", GIB, 4 * MIB, 3, 2)));
    assert_eq!(retry, first, "the recorded result, not AlreadyExists");
    assert_eq!(s.snapshot(), after_first, "nothing applied again");
    assert_eq!(s.volumes().count(), 2);

    // Also after other clients' requests and a snapshot/restore (a new
    // leader restored from a snapshot).
    assert!(s
        .apply(&from(8, 1, delete(VolumeKey::name("vol-b"))))
        .is_ok());
    let mut s = State::restore(&s.snapshot()).unwrap();
    let again = s.apply(&from(7, 1, create("vol-b", GIB, 4 * MIB, 3, 2)));
    assert_eq!(again, first);
    assert!(s.volume_by_name("vol-b").is_none(), "not created again");

    // A retry of the delete does not fail with "no volume".
    let r = s.apply(&from(8, 1, delete(VolumeKey::name("vol-b"))));
    assert!(r.is_ok());

    // The next request of client 7 is applied; its older one is refused.
    let r = s.apply(&from(7, 5, create("vol-b", GIB, 4 * MIB, 3, 2)));
    assert!(r.is_ok());
    assert_eq!(r.volume.unwrap().id, 3);
    let r = s.apply(&from(7, 1, create("vol-b", GIB, 4 * MIB, 3, 2)));
    assert_eq!(r.code(), ErrorCode::StaleRequest);
}

#[test]
fn stale_and_refused_requests() {
    let mut s = cluster();
    assert!(s.apply(&from(7, 3, Command::MarkIn(ids(&[1])))).is_ok());
    let before = s.snapshot();
    let r = s.apply(&from(7, 2, Command::MarkIn(ids(&[1]))));
    assert_eq!(r.code(), ErrorCode::StaleRequest);
    assert!(r.message.contains("request 2") && r.message.contains("last applied request 3"));
    // A refused request is not recorded: nothing changes at all, and its
    // retry is evaluated again (it had no effect the first time).
    let bad = from(7, 4, create("vol-a", GIB, 4 * MIB, 3, 2));
    assert_eq!(s.apply(&bad).code(), ErrorCode::AlreadyExists);
    assert_eq!(s.snapshot(), before);
    assert!(s.apply(&from(0, 0, delete(VolumeKey::id(1)))).is_ok());
    assert!(s.apply(&bad).is_ok(), "retried after the name was freed");
}

#[test]
fn the_dedup_table_is_bounded_by_recency() {
    let mut s = cluster();
    let stats = || Command::NodeStats(NodeStats { nodes: vec![] });
    assert!(s.apply(&from(1, 1, stats())).is_ok());
    for client in 2..=CLIENTS_MAX as u64 {
        assert!(s.apply(&from(client, 1, stats())).is_ok());
    }
    assert_eq!(s.client_count(), CLIENTS_MAX);
    // Client 1 uses its session again: it becomes the most recent, so the
    // next new client evicts client 2 instead.
    assert!(s.apply(&from(1, 2, stats())).is_ok());
    assert!(s.apply(&from(u64::MAX, 1, stats())).is_ok());
    assert_eq!(s.client_count(), CLIENTS_MAX);
    let r = s.apply(&from(1, 1, stats()));
    assert_eq!(r.code(), ErrorCode::StaleRequest, "client 1 is remembered");
    let r = s.apply(&from(2, 0, stats()));
    assert!(r.is_ok(), "client 2 was forgotten: a new session");
    assert_eq!(State::restore(&s.snapshot()).unwrap(), s);
}

// ---- snapshots ----

#[test]
fn snapshots_round_trip() {
    let mut s = cluster();
    assert!(s
        .apply(&from(3, 1, create("vol-b", GIB, MIB, 1, 1)))
        .is_ok());
    ok(&mut s, delete(VolumeKey::name("vol-b")));
    ok(&mut s, Command::MarkDown(ids(&[2])));
    let bytes = s.snapshot();
    let back = State::restore(&bytes).unwrap();
    assert_eq!(back, s);
    assert_eq!(back.snapshot(), bytes);
    // Through the raft machine interface.
    let mut m = State::new();
    Machine::restore(&mut m, &Machine::snapshot(&s)).unwrap();
    assert_eq!(m, s);
    // The empty state too.
    assert_eq!(
        State::restore(&State::new().snapshot()).unwrap(),
        State::new()
    );
}

#[test]
fn corrupt_snapshots_are_refused() {
    let s = cluster();
    let good = s.snapshot();
    // Every single flipped byte is refused (or, in the envelope's framing,
    // at least never restores a different state).
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x40;
        match State::restore(&bad) {
            Err(_) => {}
            Ok(other) => panic!("byte {i} flipped restored a state: {other:?}"),
        }
    }
    // A flip in the payload is a checksum mismatch, said as such.
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let e = State::restore(&bad).unwrap_err();
    assert!(matches!(e, RestoreError::ChecksumMismatch { .. }), "{e}");
    assert!(e.to_string().contains("corrupt"), "{e}");
    // Truncated, empty, and foreign bytes.
    assert!(State::restore(&good[..good.len() - 3]).is_err());
    let e = State::restore(&[]).unwrap_err();
    assert!(
        e.to_string().contains("not a volume manager snapshot"),
        "{e}"
    );
    let e = State::restore(b"hello world").unwrap_err();
    assert!(matches!(e, RestoreError::NotASnapshot { .. }), "{e}");
    let e = Machine::restore(&mut State::new(), &bad).unwrap_err();
    assert!(e.contains("CRC32"), "{e}");
}

#[test]
fn snapshots_breaking_invariants_are_refused() {
    // Build envelopes by hand around payloads that pass the CRC but are wrong.
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
    let wrap = |payload: Vec<u8>, version| {
        Envelope {
            magic: SNAPSHOT_MAGIC,
            format_version: version,
            crc32: crc32fast::hash(&payload),
            payload,
        }
        .encode_to_vec()
    };
    let good = Envelope::decode(&cluster().snapshot()[..]).unwrap();
    assert_eq!(
        State::restore(&wrap(good.payload.clone(), 1)).unwrap(),
        cluster()
    );
    let e = State::restore(&wrap(good.payload.clone(), 2)).unwrap_err();
    assert_eq!(
        e,
        RestoreError::UnsupportedVersion {
            found: 2,
            supported: SNAPSHOT_FORMAT_VERSION
        }
    );
    // Field 1 of the payload is the map; nodes out of order.
    let map = ClusterMap {
        epoch: 3,
        group_count: 4,
        nodes: vec![
            cairn_proto::map::NodeInfo {
                id: 2,
                ..Default::default()
            },
            cairn_proto::map::NodeInfo {
                id: 1,
                ..Default::default()
            },
        ],
        groups: vec![],
    };
    let mut payload = Vec::new();
    prost::encoding::message::encode(1, &map, &mut payload);
    prost::encoding::uint64::encode(4, &1, &mut payload);
    let e = State::restore(&wrap(payload, 1)).unwrap_err();
    assert!(
        matches!(&e, RestoreError::Invariant { reason } if reason.contains("1 after 2")),
        "{e}"
    );
    // Two volumes with one name.
    let v = |id| cairn_proto::map::VolumeInfo {
        id,
        name: "same".into(),
        ..Default::default()
    };
    let mut payload = Vec::new();
    prost::encoding::message::encode(3, &v(1), &mut payload);
    prost::encoding::message::encode(3, &v(2), &mut payload);
    prost::encoding::uint64::encode(4, &3, &mut payload);
    let e = State::restore(&wrap(payload, 1)).unwrap_err();
    assert!(e.to_string().contains("both named \"same\""), "{e}");
    // A volume id not below the next id (it could be given again).
    let mut payload = Vec::new();
    prost::encoding::message::encode(3, &v(5), &mut payload);
    prost::encoding::uint64::encode(4, &5, &mut payload);
    let e = State::restore(&wrap(payload, 1)).unwrap_err();
    assert!(e.to_string().contains("next volume id 5"), "{e}");
}

/// A failure detector's MarkDown or MarkOut names the map it judged
/// (`seen_epoch`); a node registered again after that is a new incarnation
/// the judgement was not about, and stays as it is. The others named with
/// it still change, and an admin's command (no epoch) always applies.
#[test]
fn marks_judged_on_an_older_map_leave_a_new_incarnation_alone() {
    let mut s = cluster();
    let judged = s.map_epoch();
    ok(&mut s, register(2, "h2", "r1"));
    let incarnation = s.map().node(2).unwrap().up_since;
    assert!(incarnation > judged);
    let stale = |node_ids: &[u64]| NodeIds {
        node_ids: node_ids.to_vec(),
        seen_epoch: judged,
    };
    let before = s.map_epoch();
    ok(&mut s, Command::MarkDown(stale(&[2])));
    assert_eq!(s.map_epoch(), before, "nothing changed, no new epoch");
    ok(&mut s, Command::MarkDown(stale(&[2, 3])));
    let (n2, n3) = (s.map().node(2).unwrap(), s.map().node(3).unwrap());
    assert!(n2.up && n2.up_since == incarnation);
    assert!(!n3.up);
    // MarkOut of a node that came back after the judgement: left alone.
    ok(&mut s, Command::MarkOut(stale(&[2])));
    assert!(s.map().node(2).unwrap().in_);
    // Judged on a map that shows the new incarnation: applies.
    ok(
        &mut s,
        Command::MarkDown(NodeIds {
            node_ids: vec![2],
            seen_epoch: incarnation,
        }),
    );
    assert!(!s.map().node(2).unwrap().up);
    // An admin's marks are unconditional (given a host to place on).
    ok(&mut s, register(4, "h4", "r2"));
    ok(&mut s, register(1, "h1", "r1"));
    ok(&mut s, Command::MarkOut(ids(&[1])));
    assert!(!s.map().node(1).unwrap().in_);
}

/// A placement change can leave groups whose whole placement acts, but in
/// another order or beside a node it no longer holds: nothing is left to
/// claim there. `SettlePlacement` sets their acting sets to the placement
/// (a new interval each), and changes nothing when none is so.
#[test]
fn settle_placement_sets_acting_to_a_placement_that_acts_whole() {
    let mut s = cluster();
    ok(&mut s, register(4, "h4", "r2"));
    // Node 4 in no acting set yet; take it out again: placements move back,
    // and some groups' acting sets are their placement in another order.
    ok(&mut s, Command::MarkOut(ids(&[1])));
    let before = s.unsettled_groups();
    ok(&mut s, Command::MarkIn(ids(&[1])));
    ok(&mut s, Command::MarkOut(ids(&[4])));
    let unsettled = s.unsettled_groups();
    assert!(
        unsettled > 0,
        "a move left groups to settle ({before} before)"
    );
    let epoch = s.map_epoch();
    ok(&mut s, Command::SettlePlacement(SettlePlacement {}));
    assert_eq!(s.map_epoch(), epoch + 1);
    assert_eq!(s.unsettled_groups(), 0);
    let view = cairn_proto::groupmap::group_map(s.map());
    for (key, g) in &view.groups {
        if g.placement.iter().all(|n| g.acting.contains(n)) {
            assert_eq!(g.acting, g.placement, "{key}");
        }
    }
    // Nothing to settle: no change, no epoch.
    ok(&mut s, Command::SettlePlacement(SettlePlacement {}));
    assert_eq!(s.map_epoch(), epoch + 1);
}
