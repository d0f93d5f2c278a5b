//! SCSI persistent reservation state per volume (`PrGet`, `PrSet`): in the
//! state machine (compare and set on the generation, refusals that change
//! nothing, outside the map and the catalogue, through snapshots of the
//! state, kept by snapshots, rollbacks and grows of the volume, dropped with
//! it, not inherited by clones, the command through its proto encoding),
//! and through real `cairn-volmgr` processes (the client's API and its
//! distinguishable mismatch, the export watch's generation, restarts, raft
//! log compaction and a snapshot installed on a member that joined).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use cairn_proto::volmgr::{VolmgrStatus, PR_STATE_BYTES_MAX};
use cairn_volmgr::client::{ClientError, VolmgrClient};
use cairn_volmgr::state::*;
use prost::Message as _;

const GIB: u64 = 1 << 30;
const MIB: u32 = 1 << 20;

// ---- the state machine ----

fn prop(command: Command) -> Proposal {
    Proposal {
        client_id: 0,
        client_seq: 0,
        proposed_unix_ms: 1_700_000_000_000,
        command: Some(command),
    }
}

fn ok(s: &mut State, command: Command) -> Response {
    let r = s.apply(&prop(command));
    assert!(r.is_ok(), "refused: {}", r.message);
    r
}

/// Applies `command`, expects a refusal with `code` naming every one of
/// `words`, checks the state did not change by a byte, and answers the
/// response.
fn refused(s: &mut State, command: Command, code: ErrorCode, words: &[&str]) -> Response {
    let before = s.snapshot();
    let r = s.apply(&prop(command));
    assert_eq!(r.code(), code, "{}", r.message);
    for w in words {
        assert!(r.message.contains(w), "message {:?} lacks {w:?}", r.message);
    }
    assert_eq!(s.snapshot(), before, "changed by a refusal: {}", r.message);
    r
}

fn key(name: &str) -> Option<VolumeKey> {
    Some(VolumeKey::name(name))
}

fn pr_set(volume: &str, expect_generation: u64, state: &[u8]) -> Command {
    Command::PrSet(PrSet {
        volume: key(volume),
        expect_generation,
        state: state.to_vec(),
    })
}

fn create(name: &str) -> Command {
    Command::CreateVolume(CreateVolume {
        name: name.into(),
        size_bytes: GIB,
        extent_size_bytes: 4 * MIB,
        replicas: 2,
        min_replicas: 1,
        epoch_from_counter: true,
    })
}

fn snap(volume: &str, name: &str) -> Command {
    Command::CreateSnapshot(CreateSnapshot {
        volume: key(volume),
        name: name.into(),
    })
}

fn id_of(s: &State, name: &str) -> u64 {
    s.volume_by_name(name).expect(name).id
}

/// Two chunk servers on two hosts and volume "pacs".
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
    ok(&mut s, create("pacs"));
    s
}

/// Set by compare and set: each set makes the next generation; a stale
/// generation, an oversized state and an unknown volume are refused and
/// change nothing; the mismatch says so in the response (with the stored
/// generation) and names the volume and both generations; neither the map
/// epoch nor the catalogue version moves.
#[test]
fn pr_state_is_compare_and_set_on_its_generation() {
    let mut s = cluster();
    let id = id_of(&s, "pacs");
    assert_eq!(s.pr_state(id), (0, &[][..]));
    let (epoch, version) = (s.map_epoch(), s.catalogue_version());

    let r = ok(&mut s, pr_set("pacs", 0, b"one"));
    assert_eq!((r.pr_generation, r.pr_generation_mismatch), (1, false));
    assert_eq!(s.pr_state(id), (1, &b"one"[..]));
    let r = ok(&mut s, pr_set("pacs", 1, b"two"));
    assert_eq!(r.pr_generation, 2);
    assert_eq!((s.map_epoch(), s.catalogue_version()), (epoch, version));
    assert_eq!((r.map_epoch, r.catalogue_version), (epoch, version));

    // Stale: another front end set generation 2 since this one read 1.
    let r = refused(
        &mut s,
        pr_set("pacs", 1, b"late"),
        ErrorCode::FailedPrecondition,
        &[
            "\"pacs\"",
            "expected generation 1",
            "stored generation is 2",
        ],
    );
    assert_eq!((r.pr_generation, r.pr_generation_mismatch), (2, true));
    refused(
        &mut s,
        pr_set("pacs", 7, b"ahead"),
        ErrorCode::FailedPrecondition,
        &["expected generation 7", "stored generation is 2"],
    );
    let err = s
        .clone()
        .try_apply(&prop(pr_set("pacs", 0, b"")))
        .unwrap_err();
    assert_eq!(
        err,
        StateError::PrGenerationMismatch {
            volume: "pacs".into(),
            expected: 0,
            current: 2
        }
    );

    // Too large: refused whatever the generation; the limit itself is fine.
    let big = vec![7u8; PR_STATE_BYTES_MAX + 1];
    let r = refused(
        &mut s,
        pr_set("pacs", 2, &big),
        ErrorCode::InvalidArgument,
        &["\"pacs\"", "65537 bytes", "65536"],
    );
    assert!(!r.pr_generation_mismatch);
    let r = ok(&mut s, pr_set("pacs", 2, &big[1..]));
    assert_eq!(r.pr_generation, 3);
    assert_eq!(s.pr_state(id).1.len(), PR_STATE_BYTES_MAX);
    // An empty state is a state: the generation still counts.
    assert_eq!(ok(&mut s, pr_set("pacs", 3, b"")).pr_generation, 4);
    assert_eq!(s.pr_state(id), (4, &[][..]));

    refused(
        &mut s,
        pr_set("nope", 0, b"x"),
        ErrorCode::NotFound,
        &["nope"],
    );
    assert_eq!(s.pr_entries().count(), 1);
}

/// The command decodes from its raft log bytes (a oneof tag list that
/// forgot its tag would make every set "a command this build does not
/// know"), and a retried set answers its recorded generation instead of a
/// mismatch.
#[test]
fn pr_set_round_trips_through_its_encoding_and_applies_once() {
    let mut s = cluster();
    let p = Proposal {
        client_id: 9,
        client_seq: 1,
        ..prop(pr_set("pacs", 0, b"reg"))
    };
    let bytes = p.encode_to_vec();
    assert_eq!(Proposal::decode(&bytes[..]).unwrap(), p);
    let r = s.apply_bytes(&bytes);
    assert!(r.is_ok(), "{}", r.message);
    assert_eq!(r.pr_generation, 1);
    // The reply was lost; the client sends the same request again.
    let again = s.apply_bytes(&bytes);
    assert_eq!(again, r);
    assert_eq!(s.pr_state(id_of(&s, "pacs")), (1, &b"reg"[..]));
    // The response through its encoding too (it is the raft apply result).
    let mismatch = s.apply(&prop(pr_set("pacs", 0, b"x")));
    assert_eq!(
        Response::decode(&mismatch.encode_to_vec()[..]).unwrap(),
        mismatch
    );
    assert!(mismatch.pr_generation_mismatch);
}

/// The state is in the snapshot and restored from it; it stays through
/// snapshots, grows and rollbacks of the volume, a clone starts without,
/// and it goes with its volume: a volume created again under the name
/// starts at generation 0.
#[test]
fn pr_state_follows_its_volume_and_its_snapshots() {
    let mut s = cluster();
    let id = id_of(&s, "pacs");
    ok(&mut s, pr_set("pacs", 0, b"r1"));
    ok(&mut s, snap("pacs", "a"));
    ok(
        &mut s,
        Command::GrowVolume(GrowVolume {
            volume: key("pacs"),
            size_bytes: 2 * GIB,
        }),
    );
    ok(
        &mut s,
        Command::RollbackVolume(RollbackVolume {
            volume: key("pacs"),
            snapshot: "a".into(),
            keep_as: String::new(),
        }),
    );
    assert_eq!(s.pr_state(id), (1, &b"r1"[..]));
    ok(
        &mut s,
        Command::CloneVolume(CloneVolume {
            volume: key("pacs"),
            snapshot: "a".into(),
            name: "copy".into(),
        }),
    );
    let copy = id_of(&s, "copy");
    assert_eq!(s.pr_state(copy), (0, &[][..]));
    ok(&mut s, pr_set("copy", 0, b"c1"));
    ok(&mut s, pr_set("copy", 1, b"c2"));

    // Through the snapshot of the state, byte for byte.
    let bytes = s.snapshot();
    let back = State::restore(&bytes).unwrap();
    assert_eq!(back, s);
    assert_eq!(back.snapshot(), bytes);
    assert_eq!(back.pr_state(id), (1, &b"r1"[..]));
    assert_eq!(back.pr_state(copy), (2, &b"c2"[..]));

    // Deleted: gone; created again: generation 0, and 0 is what a set
    // expects.
    ok(
        &mut s,
        Command::DeleteVolume(DeleteVolume {
            volume: key("pacs"),
        }),
    );
    assert_eq!(s.pr_state(id), (0, &[][..]));
    assert_eq!(
        s.pr_entries().map(|e| e.volume_id).collect::<Vec<_>>(),
        [copy]
    );
    ok(&mut s, create("pacs"));
    let again = id_of(&s, "pacs");
    assert_ne!(again, id);
    assert_eq!(s.pr_state(again), (0, &[][..]));
    refused(
        &mut s,
        pr_set("pacs", 1, b"old"),
        ErrorCode::FailedPrecondition,
        &["stored generation is 0"],
    );
    assert_eq!(ok(&mut s, pr_set("pacs", 0, b"new")).pr_generation, 1);
    assert_eq!(State::restore(&s.snapshot()).unwrap(), s);
}

/// A snapshot whose table names a volume that is not live, or holds a
/// generation 0, is refused.
#[test]
fn snapshots_with_bad_pr_states_are_refused() {
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
    let good = Envelope::decode(&cluster().snapshot()[..]).unwrap();
    let with = |entry: PrEntry| {
        let mut payload = good.payload.clone();
        // Field 10 of the payload: the table (a repeated field appends).
        prost::encoding::message::encode(10, &entry, &mut payload);
        Envelope {
            crc32: crc32fast::hash(&payload),
            payload,
            ..good.clone()
        }
        .encode_to_vec()
    };
    let entry = |volume_id, generation| PrEntry {
        volume_id,
        generation,
        state: b"s".to_vec(),
    };
    let restored = State::restore(&with(entry(1, 3))).unwrap();
    assert_eq!(restored.pr_state(1), (3, &b"s"[..]));
    let e = State::restore(&with(entry(9, 1))).unwrap_err();
    assert!(e.to_string().contains("not a live volume"), "{e}");
    let e = State::restore(&with(entry(1, 0))).unwrap_err();
    assert!(e.to_string().contains("generation 0"), "{e}");
}

// ---- through the API of real processes ----

const CLUSTER: &str = "reservations-test";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn client(addrs: &[&str]) -> VolmgrClient {
    VolmgrClient::new(addrs.iter().map(|a| a.to_string()).collect(), CLUSTER)
        .with_deadline(Duration::from_secs(30))
}

/// Set and get through the client: the round trip, a stale generation
/// refused as the distinguishable `PrGenerationMismatch`, an oversized
/// state and unknown volumes refused, the export watch answering the
/// generation after another client's set, and a volume deleted and created
/// again starting at generation 0.
#[test]
fn pr_state_through_the_api() {
    let member = common::start(
        CLUSTER,
        &["--heartbeat-interval-ms", "400", "--down-after-ms", "10000"],
    );
    runtime().block_on(async {
        let admin = client(&[&member.addr]);
        let fe = client(&[&member.addr]);
        admin
            .register_node(1, "127.0.0.2:7000", "h1", "", "", 1, 1 << 40)
            .await
            .unwrap();
        let v = admin.create_volume("v", GIB, 0, 1, 1).await.unwrap();

        assert_eq!(fe.pr_get("v").await.unwrap(), (0, vec![]));
        assert_eq!(fe.pr_set("v", 0, b"key-a".to_vec()).await.unwrap(), 1);
        assert_eq!(fe.pr_get("v").await.unwrap(), (1, b"key-a".to_vec()));

        // A second front end read generation 0 before the first set.
        let err = admin.pr_set("v", 0, b"key-b".to_vec()).await.unwrap_err();
        assert_eq!(err.pr_generation_mismatch(), Some(1), "{err}");
        assert_eq!(err.status(), Some(VolmgrStatus::FailedPrecondition));
        match &err {
            ClientError::PrGenerationMismatch {
                volume,
                expected,
                current,
                message,
            } => {
                assert_eq!((volume.as_str(), *expected, *current), ("v", 0, 1));
                for w in ["\"v\"", "expected generation 0", "stored generation is 1"] {
                    assert!(message.contains(w), "{message:?} lacks {w:?}");
                }
            }
            other => panic!("not a generation mismatch: {other:?}"),
        }
        assert_eq!(fe.pr_get("v").await.unwrap(), (1, b"key-a".to_vec()));

        // Too large, refused before raft; unknown volumes.
        let err = fe
            .pr_set("v", 1, vec![0; PR_STATE_BYTES_MAX + 1])
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(VolmgrStatus::InvalidArgument), "{err}");
        assert!(err.to_string().contains("65537 bytes"), "{err}");
        assert_eq!(err.pr_generation_mismatch(), None);
        let err = fe.pr_get("nope").await.unwrap_err();
        assert_eq!(err.status(), Some(VolmgrStatus::NotFound), "{err}");
        let err = fe.pr_set("nope", 0, vec![1]).await.unwrap_err();
        assert_eq!(err.status(), Some(VolmgrStatus::NotFound), "{err}");
        assert_eq!(err.pr_generation_mismatch(), None);

        // The renewal (the export watch) carries the generation: front end
        // 7 sees front end 8's set at its next renewal.
        let w = fe
            .export_watch(7, "v", v.head_epoch, 0, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(w.pr_generation, 1);
        assert_eq!(admin.pr_set("v", 1, b"key-b".to_vec()).await.unwrap(), 2);
        let w = fe
            .export_watch(7, "v", v.head_epoch, 0, Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(w.pr_generation, 2);

        // Told the generation it holds, the watch answers as soon as another
        // front end moves it, long before its wait ends (so a PREEMPT fences
        // on every front end within a round trip); until then it waits.
        let head = v.head_epoch;
        let watcher = client(&[&member.addr]);
        let watch = tokio::spawn(async move {
            let t0 = std::time::Instant::now();
            let w = watcher
                .export_watch_pr(7, "v", head, 2, 0, Duration::from_secs(20))
                .await
                .unwrap();
            (w.pr_generation, t0.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!watch.is_finished(), "answered while nothing changed");
        assert_eq!(admin.pr_set("v", 2, b"key-c".to_vec()).await.unwrap(), 3);
        let (generation, took) = watch.await.unwrap();
        assert_eq!(generation, 3);
        assert!(
            took < Duration::from_secs(10),
            "the watch answered the new generation only after {took:?}"
        );

        // Snapshots and clones: the volume keeps its state, the clone
        // starts without.
        fe.unregister_export(7, "v").await.unwrap();
        admin
            .create_snapshot("v", "s", Duration::ZERO)
            .await
            .unwrap();
        admin.clone_volume("v", "s", "w").await.unwrap();
        assert_eq!(fe.pr_get("v").await.unwrap(), (3, b"key-c".to_vec()));
        assert_eq!(fe.pr_get("w").await.unwrap(), (0, vec![]));

        // Deleted and created again: a new logical unit, generation 0.
        admin.delete_volume("v", true).await.unwrap();
        admin.create_volume("v", GIB, 0, 1, 1).await.unwrap();
        assert_eq!(fe.pr_get("v").await.unwrap(), (0, vec![]));
        let err = fe.pr_set("v", 2, b"old".to_vec()).await.unwrap_err();
        assert_eq!(err.pr_generation_mismatch(), Some(0), "{err}");
        assert_eq!(fe.pr_set("v", 0, b"new".to_vec()).await.unwrap(), 1);
    });
}

/// A change is answered only once every other front end exporting the
/// volume holds it (its export watch reported the generation) or has lost
/// its lease: a PREEMPT through one target fences the preempted initiators
/// on all of them before it completes. The front end that made the change
/// is not waited for.
#[test]
fn a_change_waits_for_other_front_ends_to_hold_it_or_lose_their_lease() {
    let member = common::start(
        CLUSTER,
        // Leases of three seconds: the checks below have room on a busy machine.
        &[
            "--heartbeat-interval-ms",
            "1000",
            "--down-after-ms",
            "10000",
        ],
    );
    runtime().block_on(async {
        let admin = client(&[&member.addr]);
        admin
            .register_node(1, "127.0.0.2:7000", "h1", "", "", 1, 1 << 40)
            .await
            .unwrap();
        let v = admin.create_volume("v", GIB, 0, 1, 1).await.unwrap();
        let head = v.head_epoch;
        assert_eq!(admin.pr_set("v", 0, b"one".to_vec()).await.unwrap(), 1);

        // Front ends 7 and 8 export the volume and hold generation 1.
        let (a, b) = (client(&[&member.addr]), client(&[&member.addr]));
        for (fe, c) in [(7, &a), (8, &b)] {
            let w = c
                .export_watch_pr(fe, "v", head, 1, 0, Duration::ZERO)
                .await
                .unwrap();
            assert_eq!(w.pr_generation, 1);
        }
        // Front end 7 changes it: not answered while 8 has not reported.
        let set = tokio::spawn(async move { a.pr_set_as(7, "v", 1, b"two".to_vec()).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !set.is_finished(),
            "answered before front end 8 held the change"
        );
        // 8's watch hears of it at once and its next one reports it.
        let w = b
            .export_watch_pr(8, "v", head, 1, 0, Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(w.pr_generation, 2);
        let report = b
            .export_watch_pr(8, "v", head, 2, 0, Duration::from_millis(100))
            .await
            .unwrap();
        assert_eq!(report.pr_generation, 2);
        assert_eq!(set.await.unwrap().unwrap(), 2);

        // A front end that stops renewing (cut off, or gone) is waited for
        // until its lease lapses, then no longer.
        let c = client(&[&member.addr]);
        let t0 = std::time::Instant::now();
        assert_eq!(c.pr_set_as(7, "v", 2, b"three".to_vec()).await.unwrap(), 3);
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(300),
            "answered after {took:?}, before front end 8's lease lapsed or it reported"
        );
    });
}

/// A member whose data directory outlives its process, so it can be killed
/// and started again; its log goes to a file.
struct Proc {
    id: u64,
    addr: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Member `id` in `dir`: the first of a new cluster, or (`join`) an
    /// empty one waiting to be added.
    fn start(dir: &Path, id: u64, join: bool) -> Proc {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let data = dir.join(format!("m{id}"));
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            data.display().to_string(),
            "--cluster-id".into(),
            CLUSTER.into(),
            "--member-id".into(),
            id.to_string(),
            "--listen".into(),
            addr.clone(),
            "--group-count".into(),
            "16".into(),
            "--heartbeat-interval-ms".into(),
            "400".into(),
            "--down-after-ms".into(),
            "10000".into(),
        ];
        if join {
            args.push("--join".into());
        } else {
            args.extend(["--initial-members".into(), format!("{id}={addr}")]);
        }
        let mut p = Proc {
            id,
            addr,
            args,
            log: dir.join(format!("m{id}.log")),
            child: None,
        };
        p.launch();
        p
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_cairn-volmgr"))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL: a crash.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The state lives in the replicated state machine's snapshots: member 1
/// stores it, compacts its log as members 2 and 3 are added (every
/// membership change compacts), and those two start from the snapshot it
/// sends them. With member 1 gone for good they serve it; both crash and
/// start again from their own compacted logs, and still do, and compare and
/// set goes on from the generation they hold.
#[test]
fn pr_state_survives_restarts_compaction_and_snapshot_installs() {
    let dir = tempfile::tempdir().unwrap();
    let mut m1 = Proc::start(dir.path(), 1, false);
    runtime().block_on(async {
        let c1 = client(&[&m1.addr]);
        c1.register_node(1, "127.0.0.2:7000", "h1", "", "", 1, 1 << 40)
            .await
            .unwrap();
        c1.create_volume("v", GIB, 0, 1, 1).await.unwrap();
        assert_eq!(c1.pr_set("v", 0, b"gen-1".to_vec()).await.unwrap(), 1);
        assert_eq!(c1.pr_set("v", 1, b"gen-2".to_vec()).await.unwrap(), 2);

        // A restart of the only member: its log and snapshot.
        m1.restart();
        assert_eq!(c1.pr_get("v").await.unwrap(), (2, b"gen-2".to_vec()));

        let mut m2 = Proc::start(dir.path(), 2, true);
        c1.add_member(m2.id, &m2.addr).await.unwrap();
        let mut m3 = Proc::start(dir.path(), 3, true);
        c1.add_member(m3.id, &m3.addr).await.unwrap();
        // Committed by a majority of {1, 2, 3}.
        assert_eq!(c1.pr_set("v", 2, b"gen-3".to_vec()).await.unwrap(), 3);

        // Member 1 is gone for good: 2 and 3 hold everything it had.
        m1.kill();
        let c23 = client(&[&m2.addr, &m3.addr]);
        assert_eq!(c23.pr_get("v").await.unwrap(), (3, b"gen-3".to_vec()));
        let err = c23.pr_set("v", 2, b"stale".to_vec()).await.unwrap_err();
        assert_eq!(err.pr_generation_mismatch(), Some(3), "{err}");
        // Committed by both (a majority of {1, 2, 3} without 1).
        assert_eq!(c23.pr_set("v", 3, b"gen-4".to_vec()).await.unwrap(), 4);
        for m in [&m2, &m3] {
            let log = m.log();
            assert!(
                log.contains("installed a snapshot from the leader"),
                "member {} did not start from a snapshot:\n{log}",
                m.id
            );
        }

        // Both crash and start again.
        m2.kill();
        m3.kill();
        m2.launch();
        m3.launch();
        assert_eq!(c23.pr_get("v").await.unwrap(), (4, b"gen-4".to_vec()));
        let err = c23.pr_set("v", 3, b"stale".to_vec()).await.unwrap_err();
        assert_eq!(err.pr_generation_mismatch(), Some(4), "{err}");
        assert_eq!(c23.pr_set("v", 4, b"gen-5".to_vec()).await.unwrap(), 5);
        let w = c23
            .export_watch(9, "v", 0, 0, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(w.pr_generation, 5);
    });
}
