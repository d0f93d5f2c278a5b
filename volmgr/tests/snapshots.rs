//! Snapshots, rollback, clones and dead epochs in the replicated state
//! machine: what each command records, what it refuses (and that a refusal
//! changes nothing), exactly-once retries, and snapshots of the state from
//! before epochs were counted.

use std::collections::BTreeSet;

use cairn_proto::map::{SnapshotInfo, SnapshotRef, VolumeInfo};
use cairn_proto::volmgr::DataEpochs;
use cairn_volmgr::state::*;
use prost::Message as _;

const MIB: u32 = 1 << 20;
const GIB: u64 = 1 << 30;
const T0: u64 = 1_700_000_000_000;

fn prop(command: Command) -> Proposal {
    Proposal {
        client_id: 0,
        client_seq: 0,
        proposed_unix_ms: T0,
        command: Some(command),
    }
}

fn ok(s: &mut State, command: Command) -> Response {
    let r = s.apply(&prop(command));
    assert!(r.is_ok(), "refused: {}", r.message);
    r
}

/// Applies `command`, expects a refusal with `code` naming every one of
/// `words`, and checks the state did not change by a byte.
fn refused(s: &mut State, command: Command, code: ErrorCode, words: &[&str]) {
    let before = s.snapshot();
    let r = s.apply(&prop(command));
    assert_eq!(r.code(), code, "{}", r.message);
    for w in words {
        assert!(r.message.contains(w), "message {:?} lacks {w:?}", r.message);
    }
    assert_eq!(s.snapshot(), before, "changed by a refusal: {}", r.message);
}

fn create(name: &str, size_bytes: u64, from_counter: bool) -> Command {
    Command::CreateVolume(CreateVolume {
        name: name.into(),
        size_bytes,
        extent_size_bytes: 4 * MIB,
        replicas: 2,
        min_replicas: 1,
        epoch_from_counter: from_counter,
    })
}

fn key(name: &str) -> Option<VolumeKey> {
    Some(VolumeKey::name(name))
}

fn snap(volume: &str, name: &str) -> Command {
    Command::CreateSnapshot(CreateSnapshot {
        volume: key(volume),
        name: name.into(),
    })
}

fn delete_snap(volume: &str, name: &str) -> Command {
    Command::DeleteSnapshot(DeleteSnapshot {
        volume: key(volume),
        name: name.into(),
    })
}

fn rollback(volume: &str, to: &str, keep_as: &str) -> Command {
    Command::RollbackVolume(RollbackVolume {
        volume: key(volume),
        snapshot: to.into(),
        keep_as: keep_as.into(),
    })
}

fn clone_of(volume: &str, snapshot: &str, name: &str) -> Command {
    Command::CloneVolume(CloneVolume {
        volume: key(volume),
        snapshot: snapshot.into(),
        name: name.into(),
    })
}

fn delete(name: &str) -> Command {
    Command::DeleteVolume(DeleteVolume { volume: key(name) })
}

fn collected(data_id: u64, epochs: &[u64]) -> Command {
    Command::EpochsCollected(EpochsCollected {
        data_id,
        epochs: epochs.to_vec(),
    })
}

fn vol(s: &State, name: &str) -> VolumeInfo {
    s.volume_by_name(name).cloned().expect(name)
}

/// Two chunk servers on two hosts and volume "pacs" (id 1, 1 GiB).
fn cluster() -> State {
    let mut s = State::new();
    ok(
        &mut s,
        Command::SetGroupCount(SetGroupCount { group_count: 16 }),
    );
    for id in 1..=2u64 {
        ok(
            &mut s,
            Command::RegisterNode(RegisterNode {
                node_id: id,
                addr: format!("127.0.0.{id}:7000"),
                host: format!("h{id}"),
                rack: String::new(),
                room: String::new(),
                weight: 1,
                capacity_bytes: 100 * GIB,
            }),
        );
    }
    ok(&mut s, create("pacs", GIB, true));
    s
}

#[test]
fn new_volumes_get_epochs_from_the_counter_and_old_entries_epoch_1() {
    let mut s = cluster();
    let a = vol(&s, "pacs");
    assert_eq!((a.id, a.data_id, a.data_volume_id()), (1, 1, 1));
    assert_eq!((a.head_epoch, s.next_epoch()), (1, 2));
    let b = ok(&mut s, create("b", GIB, true)).volume.unwrap();
    assert_eq!(b.head_epoch, 2, "no two volumes share an epoch");
    // A log entry written before epochs were counted replays as it was.
    let c = ok(&mut s, create("c", GIB, false)).volume.unwrap();
    assert_eq!((c.head_epoch, s.next_epoch()), (1, 3));
    let given: Vec<(u64, Vec<u64>)> = s
        .epochs()
        .map(|(d, e)| (d, e.iter().copied().collect()))
        .collect();
    assert_eq!(given, [(1, vec![1]), (2, vec![2]), (3, vec![1])]);
    assert!(s.dead_epochs(None).is_empty());
}

#[test]
fn a_snapshot_freezes_the_head_and_opens_a_new_one() {
    let mut s = cluster();
    let (map_epoch, version) = (s.map_epoch(), s.catalogue_version());
    let r = s.apply(&Proposal {
        proposed_unix_ms: T0 + 5,
        ..prop(snap("pacs", "nightly"))
    });
    assert!(r.is_ok(), "{}", r.message);
    let s1 = r.snapshot.clone().unwrap();
    assert_eq!(
        s1,
        SnapshotInfo {
            id: 1,
            name: "nightly".into(),
            epoch: 1,
            created_unix_ms: T0 + 5,
            chain: vec![],
            size_bytes: GIB,
        }
    );
    let v = r.volume.unwrap();
    assert_eq!((v.head_epoch, v.chain.clone()), (2, vec![1]));
    assert_eq!(v.snapshots, vec![s1.clone()]);
    assert_eq!(v.last_snapshot_id, 1);
    assert_eq!(vol(&s, "pacs"), v);
    assert_eq!(s.map_epoch(), map_epoch, "not a map change");
    assert_eq!(s.catalogue_version(), version + 1);

    // Grow, snapshot again: the chain grows newest first.
    ok(
        &mut s,
        Command::GrowVolume(GrowVolume {
            volume: key("pacs"),
            size_bytes: 2 * GIB,
        }),
    );
    let s2 = ok(&mut s, snap("pacs", "weekly")).snapshot.unwrap();
    assert_eq!(
        (s2.id, s2.epoch, s2.chain.clone(), s2.size_bytes),
        (2, 2, vec![1], 2 * GIB)
    );
    let v = vol(&s, "pacs");
    assert_eq!((v.head_epoch, v.chain.clone()), (3, vec![2, 1]));
    assert_eq!(s.chain_beneath(1, 3), Some(vec![2, 1]));
    assert_eq!(s.chain_beneath(1, 2), Some(vec![1]));
    assert_eq!(s.chain_beneath(1, 1), Some(vec![]));
    assert_eq!(s.chain_beneath(1, 4), None);
    assert_eq!(s.chain_beneath(2, 3), None);

    // Ids are never reused, also after a delete.
    let gone = ok(&mut s, delete_snap("pacs", "weekly")).snapshot.unwrap();
    assert_eq!(gone.id, 2);
    let s3 = ok(&mut s, snap("pacs", "weekly")).snapshot.unwrap();
    assert_eq!(s3.id, 3, "snapshot ids are not given again");
    // The deleted snapshot's epoch stays in the chain: still read through.
    let v = vol(&s, "pacs");
    assert_eq!((v.head_epoch, v.chain.clone()), (4, vec![3, 2, 1]));
    assert!(s.dead_epochs(None).is_empty());
    assert_eq!(State::restore(&s.snapshot()).unwrap(), s);
}

#[test]
fn bad_snapshot_requests_are_refused_and_change_nothing() {
    let mut s = cluster();
    ok(&mut s, snap("pacs", "nightly"));
    refused(
        &mut s,
        snap("pacs", "nightly"),
        ErrorCode::AlreadyExists,
        &["pacs", "nightly", "snapshot id 1"],
    );
    for bad in ["", "-x", ".x", "a b", "a/b"] {
        refused(
            &mut s,
            snap("pacs", bad),
            ErrorCode::InvalidArgument,
            &["pacs", "invalid snapshot name"],
        );
    }
    refused(
        &mut s,
        snap("nosuch", "x"),
        ErrorCode::NotFound,
        &["no volume", "nosuch"],
    );
    refused(
        &mut s,
        delete_snap("pacs", "monthly"),
        ErrorCode::NotFound,
        &["pacs", "no snapshot named", "monthly"],
    );
    refused(
        &mut s,
        rollback("pacs", "monthly", ""),
        ErrorCode::NotFound,
        &["pacs", "monthly"],
    );
    refused(
        &mut s,
        rollback("pacs", "nightly", "nightly"),
        ErrorCode::AlreadyExists,
        &["pacs", "nightly"],
    );
    refused(
        &mut s,
        rollback("pacs", "nightly", "bad name"),
        ErrorCode::InvalidArgument,
        &["pacs", "bad name"],
    );
    refused(
        &mut s,
        clone_of("pacs", "monthly", "copy"),
        ErrorCode::NotFound,
        &["pacs", "monthly"],
    );
    refused(
        &mut s,
        clone_of("pacs", "nightly", "pacs"),
        ErrorCode::AlreadyExists,
        &["pacs"],
    );
    refused(
        &mut s,
        clone_of("pacs", "nightly", "-copy"),
        ErrorCode::InvalidArgument,
        &["-copy"],
    );
    refused(
        &mut s,
        clone_of("nosuch", "nightly", "copy"),
        ErrorCode::NotFound,
        &["nosuch"],
    );
    // The API's dry runs agree.
    assert!(s
        .check_create_snapshot(&CreateSnapshot {
            volume: key("pacs"),
            name: "nightly".into()
        })
        .is_err());
    assert!(s
        .check_create_snapshot(&CreateSnapshot {
            volume: key("pacs"),
            name: "other".into()
        })
        .is_ok());
    assert!(s
        .check_rollback(&RollbackVolume {
            volume: key("pacs"),
            snapshot: "nightly".into(),
            keep_as: String::new(),
        })
        .is_ok());
}

#[test]
fn snapshots_per_volume_are_limited() {
    let mut s = cluster();
    for i in 0..SNAPSHOTS_PER_VOLUME_MAX {
        ok(&mut s, snap("pacs", &format!("s{i}")));
    }
    refused(
        &mut s,
        snap("pacs", "one-more"),
        ErrorCode::LimitReached,
        &["pacs", &SNAPSHOTS_PER_VOLUME_MAX.to_string()],
    );
    // A rollback keeps the head as a snapshot too: refused as well.
    refused(
        &mut s,
        rollback("pacs", "s0", ""),
        ErrorCode::LimitReached,
        &["pacs"],
    );
    ok(&mut s, delete_snap("pacs", "s0"));
    ok(&mut s, snap("pacs", "one-more"));
    assert_eq!(State::restore(&s.snapshot()).unwrap(), s);
}

#[test]
fn chains_are_limited() {
    let mut s = cluster();
    for _ in 0..CHAIN_EPOCHS_MAX {
        ok(&mut s, snap("pacs", "s"));
        ok(&mut s, delete_snap("pacs", "s"));
    }
    assert_eq!(vol(&s, "pacs").chain.len(), CHAIN_EPOCHS_MAX);
    refused(
        &mut s,
        snap("pacs", "s"),
        ErrorCode::LimitReached,
        &["pacs", "frozen epochs", &CHAIN_EPOCHS_MAX.to_string()],
    );
    assert_eq!(State::restore(&s.snapshot()).unwrap(), s);
}

#[test]
fn rollback_keeps_the_head_and_points_at_the_snapshot() {
    let mut s = cluster();
    ok(&mut s, snap("pacs", "before-upgrade")); // epoch 1; head 2
    ok(
        &mut s,
        Command::GrowVolume(GrowVolume {
            volume: key("pacs"),
            size_bytes: 3 * GIB,
        }),
    );
    ok(&mut s, snap("pacs", "after-upgrade")); // epoch 2; head 3
    let version = s.catalogue_version();

    let r = ok(&mut s, rollback("pacs", "before-upgrade", ""));
    let kept = r.snapshot.unwrap();
    assert_eq!(
        (
            kept.id,
            kept.name.as_str(),
            kept.epoch,
            kept.chain.clone(),
            kept.size_bytes
        ),
        (
            3,
            "before-rollback-before-upgrade-1",
            3,
            vec![2, 1],
            3 * GIB
        )
    );
    let v = r.volume.unwrap();
    assert_eq!((v.head_epoch, v.chain.clone()), (4, vec![1]));
    assert_eq!(v.size_bytes, GIB, "the snapshot's size");
    assert_eq!(s.catalogue_version(), version + 1);

    // Undo: roll back to the kept head.
    let r = ok(
        &mut s,
        rollback("pacs", "before-rollback-before-upgrade-1", ""),
    );
    assert_eq!(
        r.snapshot.unwrap().name,
        "before-rollback-before-rollback-before-upgrade-1-1"
    );
    let v = r.volume.unwrap();
    assert_eq!((v.head_epoch, v.chain.clone()), (5, vec![3, 2, 1]));
    assert_eq!(v.size_bytes, 3 * GIB);

    // Again to the same snapshot: the next free number; or a given name.
    let r = ok(&mut s, rollback("pacs", "before-upgrade", ""));
    assert_eq!(r.snapshot.unwrap().name, "before-rollback-before-upgrade-2");
    let r = ok(&mut s, rollback("pacs", "before-upgrade", "mine"));
    assert_eq!(r.snapshot.unwrap().name, "mine");

    // The auto name fits a long snapshot name into the name limit.
    let long = "x".repeat(VOLUME_NAME_BYTES_MAX);
    ok(&mut s, snap("pacs", &long));
    let kept = ok(&mut s, rollback("pacs", &long, "")).snapshot.unwrap();
    assert_eq!(kept.name.len(), VOLUME_NAME_BYTES_MAX);
    assert!(kept.name.starts_with("before-rollback-xxx") && kept.name.ends_with("x-1"));
    let kept = ok(&mut s, rollback("pacs", &long, "")).snapshot.unwrap();
    assert!(kept.name.ends_with("x-2"), "{}", kept.name);

    // Nothing referenced died: every head was kept as a snapshot.
    assert!(s.dead_epochs(None).is_empty());
    assert_eq!(State::restore(&s.snapshot()).unwrap(), s);
}

#[test]
fn clones_share_the_data_id_and_outlive_their_source() {
    let mut s = cluster();
    ok(&mut s, snap("pacs", "gold")); // epoch 1; head 2
    let r = ok(&mut s, clone_of("pacs", "gold", "test-copy"));
    let c = r.volume.unwrap();
    assert_eq!(r.snapshot.unwrap().name, "gold");
    let source = vol(&s, "pacs");
    assert_eq!(
        c,
        VolumeInfo {
            id: 2,
            name: "test-copy".into(),
            size_bytes: GIB,
            extent_size_bytes: source.extent_size_bytes,
            replicas: source.replicas,
            min_replicas: source.min_replicas,
            created_unix_ms: T0,
            head_epoch: 3,
            parent: Some(SnapshotRef {
                volume_id: 1,
                snapshot_id: 1
            }),
            snapshots: vec![],
            data_id: 1,
            chain: vec![1],
            last_snapshot_id: 0,
        }
    );
    assert_eq!(s.chain_beneath(1, 3), Some(vec![1]));
    // A clone of the clone keeps the first data id.
    ok(&mut s, snap("test-copy", "t1")); // epoch 3; head 4
    let cc = ok(&mut s, clone_of("test-copy", "t1", "copy-of-copy"))
        .volume
        .unwrap();
    assert_eq!((cc.data_id, cc.head_epoch, cc.chain), (1, 5, vec![3, 1]));

    // The snapshot a clone started from can be deleted, and the source
    // volume too: the clones' chains keep the epochs they read.
    ok(&mut s, delete_snap("pacs", "gold"));
    assert!(s.dead_epochs(None).is_empty());
    ok(&mut s, delete("pacs"));
    assert_eq!(
        s.dead_epochs(None),
        vec![DataEpochs {
            data_id: 1,
            epochs: vec![2], // pacs's head
        }]
    );
    assert_eq!(s.dead_epochs(Some(1)).len(), 1);
    assert!(s.dead_epochs(Some(2)).is_empty());
    assert_eq!(vol(&s, "test-copy").chain, vec![3, 1]);

    // Collection: referenced epochs are refused, unknown ones skipped.
    refused(
        &mut s,
        collected(1, &[2, 1]),
        ErrorCode::FailedPrecondition,
        &["epoch 1", "data id 1", "test-copy"],
    );
    let version = s.catalogue_version();
    ok(&mut s, collected(1, &[2, 99]));
    assert!(s.dead_epochs(None).is_empty());
    assert_eq!(s.catalogue_version(), version, "not a catalogue change");
    ok(&mut s, collected(1, &[2]));
    ok(&mut s, collected(77, &[1]));

    // Everything of data id 1 goes once its last volume does.
    ok(&mut s, delete("test-copy"));
    ok(&mut s, delete("copy-of-copy"));
    let dead = s.dead_epochs(None);
    assert_eq!(
        dead,
        vec![DataEpochs {
            data_id: 1,
            epochs: vec![1, 3, 4, 5]
        }]
    );
    assert_eq!(State::restore(&s.snapshot()).unwrap(), s);
    ok(&mut s, collected(1, &dead[0].epochs));
    assert_eq!(s.epochs().count(), 0);
    assert_eq!(State::restore(&s.snapshot()).unwrap(), s);
}

#[test]
fn snapshot_commands_are_applied_once() {
    let mut s = cluster();
    let from = |seq, command| Proposal {
        client_id: 9,
        client_seq: seq,
        ..prop(command)
    };
    let first = s.apply(&from(1, snap("pacs", "nightly")));
    assert!(first.is_ok());
    assert!(s.is_recorded(9, 1) && !s.is_recorded(9, 2) && !s.is_recorded(0, 0));
    let after = s.snapshot();
    let retry = s.apply(&from(1, snap("pacs", "nightly")));
    assert_eq!(retry, first, "the recorded result, not AlreadyExists");
    assert_eq!(s.snapshot(), after);
    let r = s.apply(&from(2, rollback("pacs", "nightly", "")));
    assert!(r.is_ok());
    let mut s = State::restore(&s.snapshot()).unwrap();
    assert_eq!(s.apply(&from(2, rollback("pacs", "nightly", ""))), r);
    let v = vol(&s, "pacs");
    assert_eq!(v.snapshots.len(), 2, "the rollback kept the head once");
    let c = s.apply(&from(3, clone_of("pacs", "nightly", "copy")));
    assert!(c.is_ok());
    assert_eq!(s.apply(&from(3, clone_of("pacs", "nightly", "copy"))), c);
    assert_eq!(s.volumes().count(), 2);
}

// ---- the state's own snapshots ----

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

fn wrap(payload: Vec<u8>) -> Vec<u8> {
    Envelope {
        magic: SNAPSHOT_MAGIC,
        format_version: SNAPSHOT_FORMAT_VERSION,
        crc32: crc32fast::hash(&payload),
        payload,
    }
    .encode_to_vec()
}

fn old_volume(id: u64, name: &str) -> VolumeInfo {
    VolumeInfo {
        id,
        name: name.into(),
        size_bytes: GIB,
        extent_size_bytes: 4 * MIB,
        replicas: 1,
        min_replicas: 1,
        head_epoch: 1,
        ..Default::default()
    }
}

#[test]
fn a_snapshot_from_before_epochs_were_counted_restores() {
    // Payload fields 3 (volumes) and 4 (next volume id) only, as written
    // before snapshots existed: every volume at epoch 1, no data ids.
    let mut payload = Vec::new();
    prost::encoding::message::encode(3, &old_volume(1, "a"), &mut payload);
    prost::encoding::message::encode(3, &old_volume(2, "b"), &mut payload);
    prost::encoding::uint64::encode(4, &3, &mut payload);
    let mut s = State::restore(&wrap(payload)).expect("an old snapshot loads");
    assert_eq!(s.next_epoch(), 2, "one above every epoch in use");
    let given: Vec<(u64, BTreeSet<u64>)> = s.epochs().map(|(d, e)| (d, e.clone())).collect();
    assert_eq!(given, [(1, BTreeSet::from([1])), (2, BTreeSet::from([1]))]);
    assert_eq!(vol(&s, "a").data_volume_id(), 1);
    // Snapshots of old volumes work; their data stays under their id.
    let v = ok(&mut s, snap("a", "s")).volume.unwrap();
    assert_eq!((v.head_epoch, v.chain), (2, vec![1]));
    let c = ok(&mut s, clone_of("a", "s", "c")).volume.unwrap();
    assert_eq!((c.data_volume_id(), c.head_epoch, c.chain), (1, 3, vec![1]));
    assert_eq!(State::restore(&s.snapshot()).unwrap(), s);
}

#[test]
fn snapshots_with_broken_epochs_are_refused() {
    let restore = |volumes: &[VolumeInfo], next_epoch: u64, epochs: &[DataEpochs]| {
        let mut payload = Vec::new();
        for v in volumes {
            prost::encoding::message::encode(3, v, &mut payload);
        }
        prost::encoding::uint64::encode(4, &10, &mut payload);
        if next_epoch > 0 {
            prost::encoding::uint64::encode(8, &next_epoch, &mut payload);
        }
        for d in epochs {
            prost::encoding::message::encode(9, d, &mut payload);
        }
        State::restore(&wrap(payload))
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let given = |d, e: &[u64]| DataEpochs {
        data_id: d,
        epochs: e.to_vec(),
    };
    let good = VolumeInfo {
        head_epoch: 3,
        chain: vec![2, 1],
        data_id: 1,
        ..old_volume(1, "a")
    };
    assert_eq!(
        restore(std::slice::from_ref(&good), 4, &[given(1, &[1, 2, 3])]),
        Ok(())
    );
    let cases: Vec<(VolumeInfo, u64, Vec<DataEpochs>, &str)> = vec![
        (
            VolumeInfo {
                chain: vec![1, 2],
                ..good.clone()
            },
            4,
            vec![given(1, &[1, 2, 3])],
            "not strictly descending",
        ),
        (
            VolumeInfo {
                head_epoch: 0,
                chain: vec![],
                ..good.clone()
            },
            4,
            vec![given(1, &[1, 2, 3])],
            "not strictly descending from above 0",
        ),
        (
            good.clone(),
            4,
            vec![given(1, &[1, 3])],
            "epoch 2 of data id 1",
        ),
        (good.clone(), 3, vec![given(1, &[1, 2, 3])], "next epoch 3"),
        (
            VolumeInfo {
                data_id: 12,
                ..good.clone()
            },
            4,
            vec![],
            "data id 12",
        ),
        (
            VolumeInfo {
                snapshots: vec![SnapshotInfo {
                    id: 1,
                    name: "s".into(),
                    epoch: 2,
                    chain: vec![1],
                    ..Default::default()
                }],
                ..good.clone()
            },
            4,
            vec![given(1, &[1, 2, 3])],
            "above the last given 0",
        ),
        (
            VolumeInfo {
                last_snapshot_id: 2,
                snapshots: vec![
                    SnapshotInfo {
                        id: 1,
                        name: "s".into(),
                        epoch: 2,
                        chain: vec![1],
                        ..Default::default()
                    },
                    SnapshotInfo {
                        id: 2,
                        name: "s".into(),
                        epoch: 1,
                        ..Default::default()
                    },
                ],
                ..good.clone()
            },
            4,
            vec![given(1, &[1, 2, 3])],
            "two snapshots named",
        ),
    ];
    for (v, next, epochs, want) in cases {
        let e = restore(&[v], next, &epochs).unwrap_err();
        assert!(e.contains(want), "{want}: {e}");
    }
}

fn fold(data_id: u64, epoch: u64, child: u64) -> Command {
    Command::FoldEpoch(cairn_proto::volmgr::Foldable {
        data_id,
        epoch,
        child,
    })
}

/// A deleted snapshot that views still read through is *hidden*; with one
/// epoch directly above it in every chain it is foldable, and folding it
/// drops it from every chain, after which it is dead. Two children, a
/// view's top, a wrong child or a second fold are refused and change
/// nothing.
#[test]
fn hidden_epochs_with_one_child_fold_out_of_every_chain() {
    let mut s = cluster();
    let d = vol(&s, "pacs").data_volume_id();
    ok(&mut s, snap("pacs", "a"));
    ok(&mut s, snap("pacs", "b"));
    let v = vol(&s, "pacs");
    let (ea, eb) = (
        v.snapshot("a").unwrap().epoch,
        v.snapshot("b").unwrap().epoch,
    );
    assert_eq!(v.chain, vec![eb, ea]);
    assert!(s.foldable(None).is_empty(), "every epoch is a view's top");
    refused(
        &mut s,
        fold(d, ea, eb),
        ErrorCode::FailedPrecondition,
        &["cannot be folded"],
    );

    ok(&mut s, clone_of("pacs", "b", "test"));
    ok(&mut s, delete_snap("pacs", "a"));
    let one = |epoch, child| cairn_proto::volmgr::Foldable {
        data_id: d,
        epoch,
        child,
    };
    assert_eq!(s.foldable(None), vec![one(ea, eb)]);
    assert_eq!(s.foldable(Some(d)), vec![one(ea, eb)]);
    assert!(s.foldable(Some(d + 100)).is_empty());

    // b deleted too: read through by the head of pacs and by the clone,
    // each with its own epoch above it, so only a folds.
    ok(&mut s, delete_snap("pacs", "b"));
    assert_eq!(s.foldable(None), vec![one(ea, eb)]);
    let head = vol(&s, "pacs").head_epoch;
    refused(
        &mut s,
        fold(d, eb, head),
        ErrorCode::FailedPrecondition,
        &["cannot be folded"],
    );
    refused(
        &mut s,
        fold(d, ea, head),
        ErrorCode::FailedPrecondition,
        &[&ea.to_string()],
    );

    // Through raft as bytes: the command decodes (a oneof tag list that
    // forgot it made every fold "a command this build does not know").
    let p = prop(fold(d, ea, eb));
    assert_eq!(Proposal::decode(&p.encode_to_vec()[..]).unwrap(), p);
    ok(&mut s, fold(d, ea, eb));
    assert_eq!(vol(&s, "pacs").chain, vec![eb]);
    assert_eq!(vol(&s, "test").chain, vec![eb]);
    assert_eq!(s.chain_beneath(d, eb), Some(vec![]));
    assert!(s.chain_beneath(d, ea).is_none());
    let dead = s.dead_epochs(Some(d));
    assert!(dead.iter().any(|x| x.epochs.contains(&ea)), "{dead:?}");
    assert!(s.foldable(None).is_empty());
    refused(
        &mut s,
        fold(d, ea, eb),
        ErrorCode::FailedPrecondition,
        &["cannot be folded"],
    );
}
