//! `cairn snapshot` and `cairn volume rollback/clone` as an operator runs
//! them: the real binary against a real volume manager, through human
//! output, `--json` and exit statuses (3 for an unknown volume or snapshot,
//! 2 for bad names, 1 for refusals). The test plays a target exporting a
//! volume through the volume manager client (an export lease and the
//! pause protocol of `VolmgrOp::CreateSnapshot`), so a rollback is refused
//! while the volume is exported, and a forced rollback or a snapshot waits
//! for the target's pause.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cairn_tests::cli::{assert_code, stderr, stdout, text, Cli};
use cairn_tests::volmgr::VolmgrCluster;
use cairn_volmgr::client::VolmgrClient;

const MIB: u64 = 1 << 20;
/// Export leases last three of these.
const HEARTBEAT_MS: u64 = 200;
/// The id the test's stand-in target exports under.
const TARGET: u64 = 9;

/// A stand-in target exporting `volume` until dropped: it renews its lease
/// through the export watch and pauses for every pending snapshot, as
/// `VolmgrOp::CreateSnapshot` describes. Counts the pauses.
struct FakeTarget {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u32>,
}

impl FakeTarget {
    /// Takes the export lease (as a real target does first), so the volume
    /// counts as exported once this returns, then watches in a task.
    async fn start(client: VolmgrClient, volume: &'static str) -> FakeTarget {
        client
            .register_export(TARGET, volume)
            .await
            .expect("register export");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut pauses = 0;
            let wait = Duration::from_millis(HEARTBEAT_MS);
            let mut head = 0;
            while !flag.load(Ordering::SeqCst) {
                let w = client
                    .export_watch(TARGET, volume, head, 0, wait)
                    .await
                    .expect("export watch");
                head = w.volume.expect("the volume").head_epoch;
                if w.pending == 0 {
                    continue;
                }
                // Writes would drain here.
                client
                    .snapshot_paused(TARGET, volume, w.pending)
                    .await
                    .expect("snapshot paused");
                pauses += 1;
                // Until that snapshot is no longer pending; then writes
                // would resume at the head the answer shows.
                let paused_for = w.pending;
                loop {
                    let w = client
                        .export_watch(TARGET, volume, head, paused_for, wait)
                        .await
                        .expect("export watch while paused");
                    if w.pending != paused_for {
                        head = w.volume.expect("the volume").head_epoch;
                        break;
                    }
                }
            }
            client
                .unregister_export(TARGET, volume)
                .await
                .expect("unregister");
            pauses
        });
        FakeTarget { stop, task }
    }

    /// Stops exporting; answers how often it paused.
    async fn stop(self) -> u32 {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("fake target")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_rollbacks_and_clones_from_the_cli() {
    let volmgr = VolmgrCluster::start(
        1,
        &[
            "--heartbeat-interval-ms",
            &HEARTBEAT_MS.to_string(),
            "--down-after-ms",
            "60000",
        ],
    )
    .expect("volume manager");
    let client = volmgr.client();
    // A chunk server's registration is all volumes need (none serves I/O
    // in this test).
    client
        .register_node(1, "127.0.0.2:7000", "h1", "", "", 1, 1 << 40)
        .await
        .unwrap();
    let cli = Cli::new(&volmgr.addrs(), &volmgr.cluster_id);
    let pacs = cli.json(&[
        "volume",
        "create",
        "pacs",
        "--size",
        "64M",
        "--replicas",
        "1",
    ]);
    let pacs_id = pacs["id"].as_u64().unwrap();

    // create: human and JSON.
    cli.ok(
        &["snapshot", "create", "pacs", "nightly"],
        &[
            "created snapshot nightly of volume pacs (id 1, epoch",
            "64.0 MiB",
            "no writes were paused",
        ],
    );
    let j = cli.json(&["snapshot", "create", "pacs", "weekly"]);
    assert_eq!(j["volume"], "pacs");
    assert_eq!(j["snapshot"]["name"], "weekly");
    assert_eq!(j["snapshot"]["id"], 2);
    assert_eq!(j["snapshot"]["size_bytes"], 64 * MIB);
    assert_eq!(j["pause_ms"], 0);
    let weekly_epoch = j["snapshot"]["epoch"].as_u64().unwrap();
    assert_eq!(j["head_epoch"].as_u64().unwrap(), weekly_epoch + 1);

    // list.
    let out = cli.ok(
        &["snapshot", "list", "pacs"],
        &["ID", "NAME", "EPOCH", "CREATED"],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[1].contains("nightly") && lines[1].contains("64.0 MiB"),
        "{out}"
    );
    assert!(lines[2].contains("weekly"), "{out}");
    let j = cli.json(&["snapshot", "list", "pacs"]);
    let names: Vec<&str> = j
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["nightly", "weekly"]);
    assert_eq!(j[1]["chain"], serde_json::json!([j[0]["epoch"]]));

    // info shows the data id, the chain and the snapshots.
    let j = cli.json(&["volume", "info", "pacs"]);
    assert_eq!(j["data_id"], pacs_id);
    assert_eq!(
        j["chain"],
        serde_json::json!([weekly_epoch, weekly_epoch - 1])
    );
    assert_eq!(j["snapshots"].as_array().unwrap().len(), 2);
    cli.ok(
        &["volume", "info", "pacs"],
        &[
            "(its own)",
            "2 frozen epoch(s)",
            "snapshot 2 \"weekly\"",
            "not a clone",
        ],
    );

    // Unknown volumes and snapshots: 3; bad names: 2; a taken name: 1.
    for args in [
        &["snapshot", "create", "nosuch", "x"][..],
        &["snapshot", "list", "nosuch"][..],
        &["snapshot", "delete", "pacs", "nosuch", "--yes"][..],
        &["snapshot", "delete", "nosuch", "nightly", "--yes"][..],
        &["volume", "rollback", "pacs", "nosuch"][..],
        &["volume", "rollback", "nosuch", "nightly"][..],
        &["volume", "clone", "pacs@nosuch", "copy"][..],
        &["volume", "clone", "nosuch@nightly", "copy"][..],
    ] {
        let o = cli.run(args);
        assert_code(&o, 3);
        assert!(stderr(&o).contains("nosuch"), "{}", text(&o));
    }
    for args in [
        &["snapshot", "create", "pacs", "bad name"][..],
        &["snapshot", "create", "pacs", "a/b"][..],
        &["volume", "clone", "pacs@nightly", "bad/name"][..],
        &["volume", "clone", "pacs-nightly", "copy"][..],
        &["volume", "rollback", "pacs", "nightly", "--keep-as", "a b"][..],
        &["snapshot", "delete", "pacs", "nightly"][..],
    ] {
        let o = cli.run(args);
        assert_code(&o, 2);
    }
    let o = cli.run(&["snapshot", "create", "pacs", "nightly"]);
    assert_code(&o, 1);
    assert!(
        stderr(&o).contains("already has a snapshot named \"nightly\""),
        "{}",
        text(&o)
    );

    // clone: human and JSON.
    cli.ok(
        &["volume", "clone", "pacs@nightly", "pacs-test"],
        &[
            "created volume pacs-test (64.0 MiB, 1 replicas",
            "as a clone of pacs@nightly",
        ],
    );
    let j = cli.json(&["volume", "clone", "pacs@weekly", "pacs-test2"]);
    assert_eq!(j["name"], "pacs-test2");
    assert_eq!(j["data_id"], pacs_id);
    assert_eq!(j["parent"]["volume_id"], pacs_id);
    assert_eq!(j["parent"]["snapshot_id"], 2);
    assert_eq!(j["chain"][0], weekly_epoch);
    let j = cli.json(&["volume", "info", "pacs-test"]);
    assert_eq!(j["parent"]["volume_name"], "pacs");
    assert_eq!(j["parent"]["snapshot_name"], "nightly");
    cli.ok(
        &["volume", "info", "pacs-test"],
        &["its source's", "snapshot nightly (id 1) of volume pacs"],
    );

    // While a target exports the volume a rollback is refused...
    let target = FakeTarget::start(volmgr.client(), "pacs").await;
    let o = cli
        .run_async(&["volume", "rollback", "pacs", "nightly"])
        .await;
    assert_code(&o, 1);
    assert!(
        stderr(&o).contains(&format!("exported by front end(s) [{TARGET}]"))
            && stderr(&o).contains("--force"),
        "{}",
        text(&o)
    );
    // ... and a snapshot waits for the target's pause.
    let o = cli
        .run_async(&["snapshot", "create", "pacs", "exported"])
        .await;
    assert_code(&o, 0);
    assert!(
        stdout(&o).contains("the exporting targets paused writes for"),
        "{}",
        text(&o)
    );
    // A forced rollback pauses the target too, and keeps the head.
    let o = cli
        .run_async(&["volume", "rollback", "pacs", "nightly", "--force"])
        .await;
    assert_code(&o, 0);
    for want in [
        "rolled volume pacs back to snapshot nightly (64.0 MiB)",
        "kept as snapshot before-rollback-nightly-1",
        "undo: cairn volume rollback pacs before-rollback-nightly-1",
        "paused writes for",
    ] {
        assert!(stdout(&o).contains(want), "{want}: {}", text(&o));
    }
    assert_eq!(target.stop().await, 2, "the target paused twice");

    // Not exported any more: JSON, a given name for the kept head.
    let j = cli.json(&["volume", "rollback", "pacs", "weekly", "--keep-as", "mine"]);
    assert_eq!(j["rolled_back_to"], "weekly");
    assert_eq!(j["kept_as"]["name"], "mine");
    assert_eq!(j["pause_ms"], 0);
    assert_eq!(j["volume"]["chain"][0], weekly_epoch);
    let o = cli.run(&["volume", "rollback", "pacs", "weekly", "--keep-as", "mine"]);
    assert_code(&o, 1);

    // delete: snapshots (clones keep working), then the source volume.
    cli.ok(
        &["snapshot", "delete", "pacs", "nightly", "--yes"],
        &["deleted snapshot nightly of volume pacs"],
    );
    let j = cli.json(&["snapshot", "delete", "pacs", "weekly", "--yes"]);
    assert_eq!(j["deleted"]["name"], "weekly");
    assert_eq!(j["deleted"]["id"], 2);
    let names: Vec<String> = cli
        .json(&["snapshot", "list", "pacs"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["exported", "before-rollback-nightly-1", "mine"]);
    cli.ok(
        &["volume", "info", "pacs-test"],
        &[&format!("deleted snapshot 1 of volume pacs ({pacs_id:#x})")],
    );
    cli.ok(
        &["volume", "delete", "pacs", "--yes"],
        &["deleted volume pacs"],
    );
    cli.ok(
        &["volume", "info", "pacs-test2"],
        &[&format!("snapshot 2 of deleted volume {pacs_id:#x}")],
    );
    let o = cli.run(&["snapshot", "list", "pacs"]);
    assert_code(&o, 3);
    let o = cli.run(&["snapshot", "list", "pacs-test"]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "no snapshots\n");
}
