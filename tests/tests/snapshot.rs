//! Snapshots, rollback and clones with real clients against a real cluster
//! (a volume manager, three chunk servers on 127.0.0.2-4, the target), all
//! as processes: ext4 through nbdfuse and a loop device, fio's verify with
//! snapshots taken under load, `VOL@SNAP` exported read-only.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cairn_tests::cli::{assert_code, Cli};
use cairn_tests::cluster::ReplicatedCluster;
use cairn_tests::nbdfuse::FuseDisk;
use cairn_tests::target::{stdout, TargetProcess};
use cairn_tests::Freeze;
use serde_json::Value;

const MIB: u64 = 1 << 20;

async fn setup(name: &str, size: u64) -> (ReplicatedCluster, TargetProcess) {
    let cluster = ReplicatedCluster::start(3).await.expect("cluster");
    cluster
        .client()
        .create_volume(name, size, MIB as u32, 3, 2)
        .await
        .expect("create volume");
    let target = TargetProcess::start(&cluster, &[]).expect("target");
    (cluster, target)
}

fn cli(cluster: &ReplicatedCluster) -> Cli {
    Cli::new(&cluster.volmgr.addrs(), &cluster.volmgr.cluster_id)
}

fn cairn_output(cluster: &ReplicatedCluster, args: &[&str]) -> std::process::Output {
    cli(cluster).run(args)
}

/// `cairn ARGS`, which must succeed.
fn cairn(cluster: &ReplicatedCluster, args: &[&str]) -> std::process::Output {
    let out = cairn_output(cluster, args);
    assert_code(&out, 0);
    out
}

/// Waits until the volume manager counts a front end's export lease on
/// `volume` (taken just after the export opens; under load that can lag
/// the client's GO).
async fn wait_exported(cluster: &ReplicatedCluster, volume: &str) {
    let t0 = Instant::now();
    while cluster
        .client()
        .volume_exports(volume)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the export lease on {volume} was never taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `volume`'s chain is empty: its hidden epoch was folded.
async fn wait_folded(cluster: &ReplicatedCluster, volume: &str) {
    let t0 = Instant::now();
    loop {
        let v = cluster.client().get_volume(volume).await.unwrap();
        if v.chain.is_empty() {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the hidden epoch of {volume} was not folded: chain {:?}",
            v.chain
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until no front end holds an export lease on `volume` (a closed
/// export drops its lease as it closes).
async fn wait_unexported(cluster: &ReplicatedCluster, volume: &str) {
    let t0 = Instant::now();
    loop {
        let holders = cluster.client().volume_exports(volume).await.unwrap();
        if holders.is_empty() {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "volume {volume} still exported by {holders:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn write_files(root: &Path, tag: &str, count: u64) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for i in 0..count {
        let sub = root.join(format!("{tag}{}", i % 3));
        std::fs::create_dir_all(&sub).unwrap();
        let path = sub.join(format!("{tag}-file{i}"));
        let len = (i * 7919 * 37) % (2 * MIB) + 1;
        let data: Vec<u8> = (0..len)
            .map(|b| (b as u8) ^ (i as u8).wrapping_mul(29) ^ tag.as_bytes()[0])
            .collect();
        std::fs::write(&path, &data).unwrap();
        out.push((path, data));
    }
    out
}

/// Every file is there with its bytes, under `mounted` instead of `was`.
fn check_files(files: &[(std::path::PathBuf, Vec<u8>)], was: &Path, mounted: &Path) {
    for (path, data) in files {
        let here = mounted.join(path.strip_prefix(was).unwrap());
        let got = std::fs::read(&here).unwrap_or_else(|e| panic!("{}: {e}", here.display()));
        assert!(&got == data, "{} differs", here.display());
    }
}

/// An admin's snapshot before an upgrade: ext4 with files, snapshot, the
/// files deleted and others written, rollback: fsck clean and the files
/// back; the rollback kept the head it replaced as a snapshot; a clone of the
/// snapshot mounts with the same files and takes writes of its own; the
/// snapshot itself is exported read-only as `VOL@SNAP`.
#[tokio::test(flavor = "multi_thread")]
async fn ext4_snapshot_rollback_and_clone() {
    let (cluster, target) = setup("pacs", 256 * MIB).await;
    let dir = tempfile::tempdir().unwrap();
    let fs = dir.path().join("fs");

    let mut disk = FuseDisk::attach(&dir.path().join("a"), &target.uri("pacs"), false);
    disk.mkfs_ext4();
    disk.mount(&fs, None);
    let before = write_files(&fs, "a", 12);
    disk.umount();
    disk.detach();
    wait_unexported(&cluster, "pacs").await;

    cairn(&cluster, &["snapshot", "create", "pacs", "before-upgrade"]);

    // The upgrade goes wrong: files deleted, others written.
    let mut disk = FuseDisk::attach(&dir.path().join("b"), &target.uri("pacs"), false);
    disk.mount(&fs, None);
    std::fs::remove_dir_all(fs.join("a0")).unwrap();
    std::fs::remove_dir_all(fs.join("a1")).unwrap();
    let after = write_files(&fs, "b", 6);
    disk.umount();

    // Refused while exported (nbdfuse still has it open).
    let refused = cairn_output(&cluster, &["volume", "rollback", "pacs", "before-upgrade"]);
    assert!(
        !refused.status.success(),
        "rollback of an exported volume without --force succeeded"
    );
    disk.detach();
    wait_unexported(&cluster, "pacs").await;
    cairn(&cluster, &["volume", "rollback", "pacs", "before-upgrade"]);

    let mut disk = FuseDisk::attach(&dir.path().join("c"), &target.uri("pacs"), false);
    if let Err(out) = disk.fsck() {
        panic!("fsck after rollback:\n{out}");
    }
    disk.mount(&fs, Some("ro"));
    check_files(&before, &fs, &fs);
    assert!(
        !fs.join("b0").exists(),
        "files written after the snapshot survived the rollback"
    );
    disk.umount();
    disk.detach();
    wait_unexported(&cluster, "pacs").await;

    // The rollback kept the head it replaced: undoing it brings the
    // upgrade's files back.
    let list: Value =
        serde_json::from_slice(&cairn(&cluster, &["snapshot", "list", "pacs", "--json"]).stdout)
            .unwrap();
    let names: Vec<String> = list
        .as_array()
        .or_else(|| list["snapshots"].as_array())
        .expect("snapshot list JSON")
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"before-upgrade".to_string()), "{names:?}");
    let kept = names
        .iter()
        .find(|n| n.as_str() != "before-upgrade")
        .expect("the head replaced by the rollback kept as a snapshot")
        .clone();
    let mut disk = FuseDisk::attach(
        &dir.path().join("d"),
        &target.uri(&format!("pacs@{kept}")),
        true,
    );
    disk.mount(&fs, Some("ro,noload"));
    check_files(&after, &fs, &fs);
    disk.umount();
    disk.detach();

    // A clone of the snapshot: same files, its own writes.
    cairn(
        &cluster,
        &["volume", "clone", "pacs@before-upgrade", "pacs-test"],
    );
    let mut disk = FuseDisk::attach(&dir.path().join("e"), &target.uri("pacs-test"), false);
    if let Err(out) = disk.fsck() {
        panic!("fsck of the clone:\n{out}");
    }
    disk.mount(&fs, None);
    check_files(&before, &fs, &fs);
    std::fs::remove_dir_all(fs.join("a2")).unwrap();
    let clone_only = write_files(&fs, "c", 4);
    disk.umount();
    disk.detach();

    // The clone's writes reached neither the volume nor the snapshot.
    for uri in [target.uri("pacs"), target.uri("pacs@before-upgrade")] {
        let sub = dir.path().join(format!("f{}", uri.len()));
        let mut disk = FuseDisk::attach(&sub, &uri, true);
        disk.mount(&fs, Some("ro,noload"));
        check_files(&before, &fs, &fs);
        assert!(!fs.join(clone_only[0].0.strip_prefix(&fs).unwrap()).exists());
        disk.umount();
        disk.detach();
    }
}

/// fio's arguments for one verify job on `uri`.
fn fio_job(uri: &str, offset: u64, size: u64, seed: u64) -> Vec<String> {
    vec![
        "--name=snap".into(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=8".into(),
        format!("--offset={offset}"),
        format!("--size={size}"),
        format!("--randseed={seed}"),
        "--verify=crc32c".into(),
        "--verify_fatal=1".into(),
        "--output-format=json".into(),
    ]
}

fn fio_ok(out: &std::process::Output, what: &str) {
    let text = stdout(out);
    let start = text.find('{').unwrap_or(0);
    let j: Value = serde_json::from_str(&text[start..]).unwrap_or_else(|e| {
        panic!(
            "{what}: fio printed no JSON ({e}):\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let job = &j["jobs"][0];
    assert_eq!(job["error"], 0, "{what}: {job:#}");
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Snapshots taken every second under fio's writes: each is crash
/// consistent. fio's trigger takes the snapshot (`cairn snapshot create`)
/// one second into a run and saves which writes had completed; that run's
/// verify, against the snapshot exported read-only, must find every one of
/// them, however many later writes and snapshots followed. Meanwhile a
/// second fio keeps writing to the other half of the volume, so every
/// snapshot pauses writes in flight; its own verify checks the head.
#[tokio::test(flavor = "multi_thread")]
async fn fio_verify_holds_for_snapshots_taken_every_second_under_load() {
    const HALF: u64 = 32 * MIB;
    const ROUNDS: u64 = 5;
    let (cluster, target) = setup("db", 2 * HALF).await;
    let uri = target.uri("db");
    let dir = tempfile::tempdir().unwrap();

    let background = Command::new("fio")
        .args(fio_job(&uri, HALF, HALF, 99))
        .args([
            "--time_based",
            &format!("--runtime={}", ROUNDS * 3 + 5),
            "--do_verify=1",
            "--verify_state_save=0",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting fio");

    for round in 0..ROUNDS {
        let round_dir = dir.path().join(format!("round{round}"));
        std::fs::create_dir(&round_dir).unwrap();
        let out = Command::new("fio")
            .args(fio_job(&uri, 0, HALF, round + 1))
            .args([
                "--time_based",
                "--runtime=30",
                "--do_verify=0",
                "--verify_state_save=1",
                "--trigger-timeout=1",
                &format!(
                    "--trigger={}",
                    cli(&cluster).command_line(&["snapshot", "create", "db", &format!("s{round}")])
                ),
            ])
            .current_dir(&round_dir)
            .output()
            .unwrap();
        fio_ok(&out, &format!("round {round}'s writes"));
        let info = cluster.client().get_volume("db").await.unwrap();
        assert!(
            info.snapshots.iter().any(|s| s.name == format!("s{round}")),
            "fio's trigger did not take snapshot s{round}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bg = background.wait_with_output().unwrap();
    fio_ok(&bg, "the background writer's verify of the head");

    for round in 0..ROUNDS {
        let out = Command::new("fio")
            .args(fio_job(
                &target.uri(&format!("db@s{round}")),
                0,
                HALF,
                round + 1,
            ))
            .args(["--verify_only", "--verify_state_load=1"])
            .current_dir(dir.path().join(format!("round{round}")))
            .output()
            .unwrap();
        fio_ok(&out, &format!("verify of snapshot s{round}"));
    }
    // The control: round 0's verify against the head, which later rounds
    // wrote over, must fail, or the verifies above prove nothing.
    let control = Command::new("fio")
        .args(fio_job(&uri, 0, HALF, 1))
        .args(["--verify_only", "--verify_state_load=1"])
        .current_dir(dir.path().join("round0"))
        .output()
        .unwrap();
    assert!(
        !control.status.success(),
        "round 0's verify passed against the head too:\n{}",
        stdout(&control)
    );
    // The snapshots' pauses were reported by the target.
    let log = target.log();
    assert!(
        log.matches("snapshot taken; writes go to the new head")
            .count()
            >= ROUNDS as usize,
        "{log}"
    );
}

/// Bytes used on all chunk servers together.
async fn used_bytes(cluster: &ReplicatedCluster) -> u64 {
    let mut total = 0;
    for s in &cluster.servers {
        let c = cairn_chunkserver::rpc::ChunkClient::connect(s.addr())
            .await
            .unwrap();
        total += c.node_stat().await.unwrap().used_bytes;
    }
    total
}

/// Waits until the chunk servers use at most `bytes` (their garbage
/// collection runs every second here).
async fn wait_used_at_most(cluster: &ReplicatedCluster, bytes: u64, what: &str) -> u64 {
    let t0 = Instant::now();
    loop {
        let used = used_bytes(cluster).await;
        if used <= bytes {
            return used;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what}: the chunk servers still use {used} bytes, expected at most {bytes}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// kill -9 of chunk server 3, and the map marking it down.
async fn kill_node_3(cluster: &mut ReplicatedCluster) {
    cluster.servers[2].kill().unwrap();
    cluster
        .wait_map("node 3 marked down", Duration::from_secs(30), |m| {
            m.nodes.iter().any(|n| n.id == 3 && !n.up)
        })
        .await
        .unwrap();
}

fn qemu_io(uri: &str, cmd: &str) {
    let mut args = vec!["-f", "raw", "-c", cmd, uri];
    // Snapshots are exported read-only; qemu opens them only read-only.
    if uri.contains('@') {
        args.insert(0, "-r");
    }
    let out = Command::new("qemu-io")
        .args(&args)
        .output()
        .expect("running qemu-io (apt-get install qemu-utils)");
    assert!(
        out.status.success() && !stdout(&out).contains("error"),
        "qemu-io {cmd}: {}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(out)))
}

/// What an incremental backup and an admin watching space need: `snapshot
/// diff` names exactly the ranges written between two snapshots (and since
/// the last one); `volume info` counts what the volume holds and what each
/// snapshot alone holds; deleting a snapshot no view reads through, and
/// then the volume, gives the space back on the chunk servers.
#[tokio::test(flavor = "multi_thread")]
async fn diff_space_and_garbage_collection() {
    let (cluster, target) = setup("img", 64 * MIB).await;
    let uri = target.uri("img");
    let empty = used_bytes(&cluster).await;
    qemu_io(&uri, "write -P 1 0 8M");
    cairn(&cluster, &["snapshot", "create", "img", "s1"]);
    qemu_io(&uri, "write -P 2 1M 2M");
    qemu_io(&uri, "write -P 3 20M 4k");
    cairn(&cluster, &["snapshot", "create", "img", "s2"]);

    let diff = json_of(&cairn(
        &cluster,
        &["snapshot", "diff", "img", "s1", "s2", "--json"],
    ));
    let ranges: Vec<(u64, u64)> = diff["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(ranges, vec![(MIB, 2 * MIB), (20 * MIB, 4096)], "{diff:#}");
    let since = json_of(&cairn(
        &cluster,
        &["snapshot", "diff", "img", "s2", "--json"],
    ));
    assert_eq!(since["changed_bytes"], 0, "{since:#}");
    let human = stdout(&cairn(&cluster, &["snapshot", "diff", "img", "s1", "s2"]));
    assert!(
        human.contains("2097152") && human.contains("20971520"),
        "{human}"
    );

    let info = json_of(&cairn(&cluster, &["volume", "info", "img", "--json"]));
    assert_eq!(info["space"]["allocated_bytes"], 8 * MIB + 4096, "{info:#}");
    let only: Vec<(String, u64)> = info["space"]["snapshot_only_bytes"]
        .as_array()
        .unwrap_or_else(|| panic!("{info:#}"))
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().into(),
                s["bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        only,
        vec![("s1".to_string(), 2 * MIB), ("s2".to_string(), 0)],
        "s1 alone holds the 2 MiB s2 overwrote"
    );

    // Roll back to s1, then delete s2 and the kept head: nothing reads
    // their epochs any more, and the collector frees their blocks (the
    // 2 MiB and the 4 KiB, on three replicas).
    let with_all = used_bytes(&cluster).await;
    cairn(
        &cluster,
        &[
            "volume",
            "rollback",
            "img",
            "s1",
            "--keep-as",
            "k",
            "--force",
        ],
    );
    cairn(&cluster, &["snapshot", "delete", "img", "s2", "--yes"]);
    cairn(&cluster, &["snapshot", "delete", "img", "k", "--yes"]);
    let freed = wait_used_at_most(&cluster, with_all - 3 * 2 * MIB, "after deleting s2").await;
    let read = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 1 0 8M", &uri])
        .output()
        .unwrap();
    assert!(
        !stdout(&read).contains("Pattern verification failed"),
        "s1's data after the collection: {}",
        stdout(&read)
    );
    assert!(read.status.success());

    // Deleting the volume gives everything back.
    cairn(&cluster, &["volume", "delete", "img", "--yes", "--force"]);
    let after =
        wait_used_at_most(&cluster, empty + 3 * 64 * 1024, "after deleting the volume").await;
    assert!(after < freed);
}

/// `rollback --force` of an exported volume: the target pauses its writes
/// (the replaced head is kept crash-consistent), then drops its clients'
/// connections; a client that connects again reads the rolled-back disk.
#[tokio::test(flavor = "multi_thread")]
async fn forced_rollback_disconnects_clients_and_they_reconnect_to_the_snapshot() {
    let (cluster, target) = setup("vm", 16 * MIB).await;
    let uri = target.uri("vm");
    qemu_io(&uri, "write -P 1 0 1M");
    cairn(&cluster, &["snapshot", "create", "vm", "good"]);
    qemu_io(&uri, "write -P 2 0 1M");

    let mut client = cairn_tests::target::RawNbd::connect(target.addr()).unwrap();
    client.go("vm", false).unwrap();
    wait_exported(&cluster, "vm").await;
    let refused = cairn_output(&cluster, &["volume", "rollback", "vm", "good"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stdout(&refused));
    cairn(&cluster, &["volume", "rollback", "vm", "good", "--force"]);

    // The connection is closed by the target (a read of the socket sees
    // its end within the timeout).
    client
        .s
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 64];
    let got = std::io::Read::read(&mut client.s, &mut b);
    assert!(
        matches!(got, Ok(0))
            || got.is_err()
                && !matches!(
                    got.as_ref().map_err(|e| e.kind()),
                    Err(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
                ),
        "the target kept the connection to the rolled-back export open: {got:?}"
    );
    assert!(
        target.log().contains("rolled back under the export"),
        "{}",
        target.log()
    );
    qemu_io(&uri, "read -P 1 0 1M");
    // The kept head still has the writes made after the snapshot.
    let info = cluster.client().get_volume("vm").await.unwrap();
    let kept = info
        .snapshots
        .iter()
        .find(|s| s.name != "good")
        .expect("the replaced head kept");
    qemu_io(&target.uri(&format!("vm@{}", kept.name)), "read -P 2 0 1M");
}

/// Snapshots a new volume manager leader takes while the target's export
/// lease has lapsed (the target stalled, the leader restarted and so does
/// not know the export) do not cost the target's clients their disk: no
/// write started after the lease lapsed, so the target goes on at the new
/// head, however many snapshots were taken meanwhile. Its earlier writes
/// are in both snapshots; its later writes in neither.
#[tokio::test(flavor = "multi_thread")]
async fn snapshots_taken_while_the_export_lease_had_lapsed_keep_the_clients_connected() {
    let (mut cluster, target) = setup("vm", 16 * MIB).await;
    let uri = target.uri("vm");
    // This connection keeps the export open throughout.
    let mut held = cairn_tests::target::RawNbd::connect(target.addr()).unwrap();
    held.go("vm", false).unwrap();
    qemu_io(&uri, "write -P 1 0 1M");
    wait_exported(&cluster, "vm").await;

    // The target stalls; the volume manager restarts and forgets the
    // export (leases live in the leader's memory) and, once it has waited
    // for front ends to renew, snapshots the volume twice without pausing
    // anyone.
    target.pause().unwrap();
    let member = cluster.volmgr.members.get_mut(&1).unwrap();
    member.kill().unwrap();
    member.restart().unwrap();
    cairn(&cluster, &["snapshot", "create", "vm", "first"]);
    cairn(&cluster, &["snapshot", "create", "vm", "second"]);
    target.resume().unwrap();

    // Writes go on at the new head, through the connection that stayed.
    qemu_io(&uri, "write -P 2 0 1M");
    let read = |held: &mut cairn_tests::target::RawNbd, cookie: u64| {
        held.request(0, 0, cookie, 0, 4096, &[]).unwrap(); // NBD_CMD_READ
        let r = held.reply(4096).expect("the held connection stays open");
        assert_eq!((r.cookie, r.error), (cookie, 0));
        r.data
    };
    assert_eq!(read(&mut held, 1), vec![2u8; 4096]);
    held.request(0, 1, 2, 4096, 4096, &[3u8; 4096]).unwrap(); // NBD_CMD_WRITE
    let r = held.reply(0).unwrap();
    assert_eq!(
        (r.cookie, r.error),
        (2, 0),
        "a write on the held connection"
    );
    assert_eq!(read(&mut held, 3), vec![2u8; 4096]);
    qemu_io(&uri, "read -P 3 4096 4096");
    assert!(
        target
            .log()
            .contains("a snapshot was taken while the export lease had lapsed"),
        "{}",
        target.log()
    );
    for snap in ["first", "second"] {
        qemu_io(&target.uri(&format!("vm@{snap}")), "read -P 1 0 1M");
    }
}

/// A replica down while a volume is snapshotted and written catches up
/// with every version: after it rejoins, every version reads the same on
/// every replica (through the epochs beneath it), and the head and both
/// snapshots read what was written.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_rejoining_after_snapshots_holds_every_version() {
    let (mut cluster, target) = setup("r", 16 * MIB).await;
    let uri = target.uri("r");
    qemu_io(&uri, "write -P 1 0 4M");
    cairn(&cluster, &["snapshot", "create", "r", "s1"]);
    kill_node_3(&mut cluster).await;
    qemu_io(&uri, "write -P 2 1M 1M");
    qemu_io(&uri, "write -P 3 3M 4k");
    cairn(&cluster, &["snapshot", "create", "r", "s2"]);
    // A partial block: filled from the chain beneath the new head.
    qemu_io(&uri, "write -P 4 0 512");
    cluster.servers[2].restart().unwrap();
    cluster.wait_healthy(Duration::from_secs(60)).await.unwrap();
    let id = cluster.client().get_volume("r").await.unwrap().id;
    let compared = cluster.compare_replicas(id, 3).await.unwrap();
    assert!(compared >= 4, "{compared} versions compared");

    qemu_io(&target.uri("r@s1"), "read -P 1 0 4M");
    qemu_io(&target.uri("r@s2"), "read -P 1 0 1M");
    qemu_io(&target.uri("r@s2"), "read -P 2 1M 1M");
    qemu_io(&target.uri("r@s2"), "read -P 3 3M 4k");
    qemu_io(&uri, "read -P 4 0 512");
    qemu_io(&uri, "read -P 1 512 1047552");
    qemu_io(&uri, "read -P 2 1M 1M");
}

/// A copy-up (`Volume::materialize`, the group's `WriteOp::Materialize`)
/// runs on every acting replica, and one that was down during it gets the
/// copied blocks pushed when it rejoins (the copy-up is in the group log):
/// afterwards the head version holds, on all three replicas, every block
/// the snapshot beneath it held, and nothing reads differently. This is
/// what lets a hidden epoch be deleted after its blocks are copied up.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_up_reaches_every_replica_and_a_rejoining_one() {
    use cairn_chunkserver::rpc::ChunkClient;
    use cairn_client::{ClientConfig, Cluster};

    let mut cluster = ReplicatedCluster::start(3).await.expect("cluster");
    let volmgr = cluster.client();
    volmgr
        .create_volume("m", 8 * MIB, MIB as u32, 3, 2)
        .await
        .unwrap();
    let data = Cluster::connect(ClientConfig {
        volmgr: cluster.volmgr.addrs(),
        cluster_id: cluster.volmgr.cluster_id.clone(),
        ..ClientConfig::default()
    })
    .await
    .unwrap();
    let vol = data.open_volume("m").await.unwrap();
    vol.write(0, bytes::Bytes::from(vec![1u8; 4 << 20]), false)
        .await
        .unwrap();
    vol.flush().await.unwrap();
    volmgr
        .create_snapshot("m", "s", Duration::ZERO)
        .await
        .unwrap();
    let info = volmgr.get_volume("m").await.unwrap();
    let head = data.volume(info.clone()).unwrap();
    // The head holds one block of its own before node 3 goes.
    head.write(MIB, bytes::Bytes::from(vec![2u8; 4096]), false)
        .await
        .unwrap();
    head.flush().await.unwrap();
    kill_node_3(&mut cluster).await;
    head.materialize(0, 4 << 20).await.unwrap();
    head.flush().await.unwrap();
    let err = head.materialize(512, 4096).await.unwrap_err();
    assert!(err.to_string().contains("whole 4096-byte blocks"), "{err}");
    cluster.servers[2].restart().unwrap();
    cluster.wait_healthy(Duration::from_secs(60)).await.unwrap();

    let full = vec![u64::MAX; (MIB / 4096 / 64) as usize];
    for (i, s) in cluster.servers.iter().enumerate() {
        let c = ChunkClient::connect(s.addr()).await.unwrap();
        for index in 0..4u64 {
            let key = cairn_proto::chunk::ExtentKey {
                volume_id: info.data_volume_id(),
                extent_index: index,
                epoch: info.head_epoch,
            };
            let held = c.extent_held(key).await.unwrap_or_else(|e| {
                panic!("node {}: extent {index} at the head epoch: {e}", i + 1)
            });
            assert_eq!(
                held,
                full,
                "node {}: extent {index} at the head epoch holds every block",
                i + 1
            );
        }
    }
    let compared = cluster.compare_replicas(info.id, 3).await.unwrap();
    assert!(compared >= 8, "{compared} versions compared");
    let got = head.read(0, 4 << 20).await.unwrap();
    for (at, b) in got.iter().enumerate() {
        let want = if (MIB as usize..MIB as usize + 4096).contains(&at) {
            2
        } else {
            1
        };
        assert_eq!(*b, want, "byte {at} of the head");
    }
    let s = info.snapshot("s").unwrap();
    let snap = data
        .volume(info.frozen_view(info.name.clone(), s.epoch, s.chain.clone(), info.size_bytes))
        .unwrap();
    assert!(snap.read(0, 4 << 20).await.unwrap().iter().all(|&b| b == 1));
}

/// A fold waits while a replica is away: a copy-up depends on what each
/// replica holds beneath the child, so one that rejoins later could apply a
/// forwarded copy-up after the folded epoch left the chain, and hold zeros
/// where the data was (`client/src/fold.rs`). With node 3 down the hidden
/// epoch stays; once node 3 is back and every group whole it is folded, and
/// every replica holds the same bytes.
#[tokio::test(flavor = "multi_thread")]
async fn a_hidden_epoch_is_folded_only_once_every_replica_is_back() {
    let (mut cluster, target) = setup("w", 16 * MIB).await;
    let uri = target.uri("w");
    qemu_io(&uri, "write -P 1 0 4M");
    cairn(&cluster, &["snapshot", "create", "w", "s"]);
    qemu_io(&uri, "write -P 2 0 2M");
    kill_node_3(&mut cluster).await;
    cairn(&cluster, &["snapshot", "delete", "w", "s", "--yes"]);
    let volmgr = cluster.client();
    let t0 = Instant::now();
    while !cluster.servers[0]
        .log()
        .contains("folding waits until every replica acts")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no fold was tried: {}",
            cluster.servers[0].log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Two more collector passes (one a second) leave it waiting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = volmgr.get_volume("w").await.unwrap();
    assert_eq!(v.chain.len(), 1, "folded with node 3 away: {v:?}");

    cluster.servers[2].restart().unwrap();
    cluster.wait_healthy(Duration::from_secs(60)).await.unwrap();
    wait_folded(&cluster, "w").await;
    qemu_io(&uri, "read -P 2 0 2M");
    qemu_io(&uri, "read -P 1 2M 2M");
    let compared = cluster.compare_replicas(v.id, 3).await.unwrap();
    assert!(compared >= 4, "{compared} versions compared");
}

/// The usual life of a snapshot: taken before an upgrade, the volume is
/// written, the snapshot is deleted. Its epoch is still read through by the
/// head (hidden), so it is folded (the blocks it holds copied up into the
/// head through the group protocol, then dropped from the chain) while the
/// volume stays exported, and collected: the chunk servers' used bytes
/// fall by what the head had overwritten, on every replica, the chain is
/// empty again, and the volume reads the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_snapshot_under_the_head_is_folded_and_its_overwritten_blocks_freed() {
    let (cluster, target) = setup("f", 16 * MIB).await;
    let uri = target.uri("f");
    qemu_io(&uri, "write -P 1 0 4M");
    cairn(&cluster, &["snapshot", "create", "f", "before-upgrade"]);
    qemu_io(&uri, "write -P 2 0 2M");
    let volmgr = cluster.client();
    let v = volmgr.get_volume("f").await.unwrap();
    assert_eq!(v.chain.len(), 1, "{v:?}");
    // Nothing is dead yet: what the chunk servers use now is the baseline.
    let before = used_bytes(&cluster).await;
    cairn(
        &cluster,
        &["snapshot", "delete", "f", "before-upgrade", "--yes"],
    );
    wait_folded(&cluster, "f").await;
    // 4 MiB held beneath, 2 MiB of it overwritten: 2 MiB copied up and 4
    // MiB deleted, on three replicas.
    let after = wait_used_at_most(&cluster, before - 3 * 2 * MIB, "after the fold").await;
    assert!(after + 3 * 2 * MIB <= before, "{before} -> {after}");
    qemu_io(&uri, "read -P 2 0 2M");
    qemu_io(&uri, "read -P 1 2M 2M");
    qemu_io(&uri, "read -P 0 4M 12M");
    let compared = cluster.compare_replicas(v.id, 3).await.unwrap();
    assert!(compared >= 4, "{compared} versions compared");
}
