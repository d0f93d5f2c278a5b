//! cairn-target with real NBD clients against a real cluster: a volume
//! manager, three chunk servers (127.0.0.2-4) and the target (127.0.0.10),
//! all as processes, driven by nbdinfo, qemu-io, qemu-img, nbdcopy, fio and
//! nbdfuse.

use std::time::Duration;

use cairn_tests::cluster::ReplicatedCluster;
use cairn_tests::nbdfuse::FuseDisk;
use cairn_tests::target::{run_tool, stdout, tool, RawNbd, TargetProcess};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A cluster with a 3-replica volume `name` of `size` bytes (1 MiB extents,
/// so tests cross extent boundaries often) and a target in front of it.
async fn setup(name: &str, size: u64, target_args: &[&str]) -> (ReplicatedCluster, TargetProcess) {
    let cluster = ReplicatedCluster::start(3).await.expect("cluster");
    cluster
        .client()
        .create_volume(name, size, MIB as u32, 3, 2)
        .await
        .expect("create volume");
    let target = TargetProcess::start(&cluster, target_args).expect("target");
    (cluster, target)
}

/// The JSON document in a tool's stdout (fio prints lines before it).
fn json(out: &std::process::Output) -> Value {
    let text = stdout(out);
    let start = text.find(['{', '[']).unwrap_or(0);
    serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn nbdinfo_lists_exports_with_flags_block_sizes_and_allocation() {
    let (cluster, target) = setup("vol", 64 * MIB, &[]).await;
    cluster
        .client()
        .create_volume("other", 8 * MIB, MIB as u32, 1, 1)
        .await
        .unwrap();

    let list = json(&run_tool("nbdinfo", &["--list", "--json", &target.uri("")]).unwrap());
    let exports = list["exports"].as_array().expect("exports array");
    let names: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["other", "vol"], "{list:#}");
    let vol = &exports[1];
    assert_eq!(vol["export-size"], 64 * MIB, "{vol:#}");
    assert_eq!(vol["block_size_minimum"], 512);
    assert_eq!(vol["block_size_preferred"], 4096);
    assert_eq!(vol["block_size_maximum"], 32 * MIB);
    for (flag, want) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_multi_conn", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_fast_zero", true),
        ("can_df", true),
        ("can_cache", false),
        ("is_rotational", false),
    ] {
        assert_eq!(vol[flag], want, "{flag} in {vol:#}");
    }
    let contexts: Vec<&str> = vol["contexts"]
        .as_array()
        .expect("contexts")
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(contexts.contains(&"base:allocation"), "{vol:#}");
    assert!(
        vol["description"].as_str().unwrap().contains("3 replicas"),
        "{vol:#}"
    );

    // One export by name, over the unix socket too.
    let one = json(&run_tool("nbdinfo", &["--json", &target.unix_uri("other")]).unwrap());
    assert_eq!(one["exports"][0]["export-size"], 8 * MIB, "{one:#}");

    // An unknown name is refused (NBD_REP_ERR_UNKNOWN, which libnbd shows
    // as ENOENT), and the target goes on.
    let bad = tool("nbdinfo", &[&target.uri("nope")]).unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("No such file") && err.contains("nope"),
        "{err}"
    );
    run_tool("nbdinfo", &[&target.uri("vol")]).unwrap();
}

/// qemu-io writes patterns at offsets that are unaligned (qemu does the
/// read-modify-write to 512-byte sectors, as the advertised minimum block
/// size asks) and that straddle 1 MiB extent boundaries, then reads them
/// back through a fresh connection.
#[tokio::test(flavor = "multi_thread")]
async fn qemu_io_patterns_at_unaligned_and_extent_crossing_offsets() {
    let (_cluster, target) = setup("vol", 16 * MIB, &[]).await;
    let uri = target.uri("vol");
    // (offset, length, pattern)
    let writes: &[(u64, u64, u8)] = &[
        (0, 4096, 0x11),
        (MIB - 512, 1024, 0x22),          // across extents 0|1
        (2 * MIB - 1000, 3000, 0x33),     // unaligned, across 1|2
        (3 * MIB + 7, 5, 0x44),           // tiny, unaligned
        (4 * MIB - 65536, 3 * MIB, 0x55), // three extents
        (16 * MIB - 4096, 4096, 0x66),    // the last block
    ];
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for (o, l, p) in writes {
        args.push("-c".into());
        args.push(format!("write -P {p} {o} {l}"));
    }
    args.push(uri.clone());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_tool("qemu-io", &a).unwrap();
    assert!(
        !stdout(&out).contains("error"),
        "qemu-io write: {}",
        stdout(&out)
    );

    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for (o, l, p) in writes {
        args.push("-c".into());
        args.push(format!("read -P {p} {o} {l}"));
    }
    // Bytes no write touched read as zeros.
    args.push("-c".into());
    args.push(format!("read -P 0 {} {}", 8 * MIB, 4 * MIB));
    args.push("-c".into());
    args.push(format!("read -P 0 {} {}", 3 * MIB + 12, 100));
    args.push(uri);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_tool("qemu-io", &a).unwrap();
    let text = stdout(&out);
    assert!(
        !text.contains("Pattern verification failed") && !text.contains("error"),
        "qemu-io read: {text}"
    );
    assert_eq!(text.matches("read ").count(), writes.len() + 2, "{text}");
}

/// Writes a 256 MiB image of data runs and holes to `path`, deterministic.
fn write_image(path: &std::path::Path, size: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut at = 0;
    while at < size {
        // A run of 4 KiB to 2 MiB of data, then a hole of up to 3 MiB.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let run = ((x % 512) + 1) * 4096;
        let run = run.min(size - at);
        let data: Vec<u8> = (0..run)
            .map(|i| ((i.wrapping_mul(31) ^ x ^ (at >> 12)) & 0xff) as u8)
            .collect();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&data).unwrap();
        at += run + (x >> 20) % (3 * MIB) / 4096 * 4096;
    }
    f.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_img_convert_and_compare_a_256_mib_image() {
    let size = 256 * MIB;
    let (_cluster, target) = setup("vol", size, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    write_image(&src, size);
    let uri = target.uri("vol");
    let src_s = src.to_str().unwrap();
    run_tool(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri],
    )
    .unwrap();
    let cmp = run_tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    )
    .unwrap();
    assert!(
        stdout(&cmp).contains("Images are identical"),
        "{}",
        stdout(&cmp)
    );

    // A changed byte is seen (the comparison is real).
    run_tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 1048576 512", &uri],
    )
    .unwrap();
    let diff = tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    )
    .unwrap();
    assert_eq!(diff.status.code(), Some(1), "{}", stdout(&diff));
}

#[tokio::test(flavor = "multi_thread")]
async fn nbdcopy_with_multi_conn_copies_in_and_out() {
    let size = 64 * MIB;
    let (_cluster, target) = setup("vol", size, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    write_image(&src, size);
    let uri = target.uri("vol");
    run_tool(
        "nbdcopy",
        &[
            "--connections=4",
            "--threads=4",
            "--flush",
            src.to_str().unwrap(),
            &uri,
        ],
    )
    .unwrap();
    run_tool(
        "nbdcopy",
        &[
            "--connections=4",
            "--threads=4",
            &uri,
            back.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(),
        "copied out differs from what was copied in"
    );
    // nbdcopy opened several connections because the target advertised
    // multi-conn.
    let log = target.log();
    assert!(
        log.matches("transmission started").count() >= 8,
        "expected 4 connections per copy:\n{log}"
    );
}

/// Also the test of `--worker-threads`: this target serves the four jobs
/// on one runtime thread (every other test uses one per CPU).
#[tokio::test(flavor = "multi_thread")]
async fn fio_nbd_engine_verifies_crc32c_from_several_jobs() {
    let (_cluster, target) = setup("vol", 64 * MIB, &["--worker-threads", "1"]).await;
    let uri = target.uri("vol");
    let out = run_tool(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k,64k",
            "--bsrange=4k-64k",
            "--iodepth=16",
            "--numjobs=4",
            "--size=16M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            // No verify state files in the working directory.
            "--verify_state_save=0",
            "--group_reporting",
            "--output-format=json",
        ],
    )
    .unwrap();
    let j = json(&out);
    let job = &j["jobs"][0];
    assert_eq!(job["error"], 0, "{job:#}");
    // Every byte of each job's 16 MiB region was written, then read back and
    // verified.
    assert!(
        job["write"]["io_bytes"].as_u64().unwrap() >= 64 * MIB,
        "{job:#}"
    );
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= 64 * MIB,
        "{job:#}"
    );
    // The main thread (in block_on, awaiting the spawned servers) and one worker;
    // tokio's blocking pool, which the target does not use, would add more.
    let pid = target.pid().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let threads: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("a Threads line");
    assert_eq!(
        threads, 2,
        "--worker-threads 1: {threads} threads\n{status}"
    );
}

/// A 1 TiB volume takes no space until written, and its allocation map is
/// one hole.
#[tokio::test(flavor = "multi_thread")]
async fn a_thin_terabyte_volume_uses_no_space_and_maps_as_one_hole() {
    let cluster = ReplicatedCluster::start(3).await.expect("cluster");
    let used = |c: &ReplicatedCluster| {
        let addrs: Vec<_> = c.servers.iter().map(|s| s.addr()).collect();
        async move {
            let mut total = 0;
            for a in addrs {
                let c = cairn_chunkserver::rpc::ChunkClient::connect(a)
                    .await
                    .unwrap();
                total += c.node_stat().await.unwrap().used_bytes;
            }
            total
        }
    };
    let before = used(&cluster).await;
    cluster
        .client()
        .create_volume("big", 1 << 40, 4 * MIB as u32, 3, 2)
        .await
        .unwrap();
    let target = TargetProcess::start(&cluster, &[]).expect("target");
    let uri = target.uri("big");
    let map = json(&run_tool("qemu-img", &["map", "--output=json", "-f", "raw", &uri]).unwrap());
    let entries = map.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{map:#}");
    assert_eq!(entries[0]["length"], 1u64 << 40, "{map:#}");
    assert_eq!(entries[0]["data"], false, "{map:#}");
    assert_eq!(entries[0]["zero"], true, "{map:#}");
    let totals = stdout(&run_tool("nbdinfo", &["--map", "--totals", &uri]).unwrap());
    assert!(
        totals.contains("100.0%") && totals.contains("hole,zero"),
        "{totals}"
    );

    // Written extents show as data, the rest stays a hole.
    run_tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 8G 4k", "-c", "flush", &uri],
    )
    .unwrap();
    let map = json(&run_tool("qemu-img", &["map", "--output=json", "-f", "raw", &uri]).unwrap());
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    // At extent granularity: the 4 MiB extent holding 8 GiB.
    assert_eq!(data, vec![(8 << 30, 4 * MIB)], "{map:#}");
    let after = used(&cluster).await;
    // Three replicas of one 4 MiB extent file (thin: one 4 KiB block of data
    // plus its checksum slots), far below a MiB each.
    assert!(
        after - before < 3 * MIB,
        "used bytes grew by {} for a 1 TiB volume with one block written",
        after - before
    );
}

/// nbdfuse turns the export into a file, losetup into a block device; ext4
/// on it is made, filled, unmounted and checked clean.
#[tokio::test(flavor = "multi_thread")]
async fn ext4_through_nbdfuse_and_a_loop_device_checks_clean() {
    let (_cluster, target) = setup("vol", 256 * MIB, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let fs_mount = dir.path().join("fs");
    let mut disk = FuseDisk::attach(dir.path(), &target.uri("vol"), false);
    assert_eq!(disk.size(), 256 * MIB);
    disk.mkfs_ext4();
    disk.mount(&fs_mount, None);

    // Files of assorted sizes, in a tree.
    let mut expected = Vec::new();
    for i in 0..24u64 {
        let sub = fs_mount.join(format!("d{}", i % 4));
        std::fs::create_dir_all(&sub).unwrap();
        let path = sub.join(format!("f{i}"));
        let len = (i * 7919 * 37) % (3 * MIB) + 1;
        let data: Vec<u8> = (0..len)
            .map(|b| (b as u8) ^ (i as u8).wrapping_mul(29))
            .collect();
        std::fs::write(&path, &data).unwrap();
        expected.push((path, data));
    }
    disk.umount();
    if let Err(out) = disk.fsck() {
        panic!("fsck found problems:\n{out}");
    }

    disk.mount(&fs_mount, Some("ro"));
    for (path, data) in &expected {
        assert!(
            &std::fs::read(path).unwrap() == data,
            "{} differs after remount",
            path.display()
        );
    }
    disk.detach();
}

/// Two targets started with the same `--target-id` (a copied config): the
/// later one takes the id's export leases, and the earlier one is refused
/// from its next renewal, saying why in its log, rather than both renewing
/// one lease (a snapshot or a PREEMPT would then wait for only one of them).
#[tokio::test(flavor = "multi_thread")]
async fn a_second_target_with_the_same_id_supersedes_the_first_loudly() {
    let (cluster, first) = setup("vol", 16 * MIB, &["--target-id", "4"]).await;
    // An open connection keeps the export, and its lease, open.
    let mut a = RawNbd::connect(first.addr()).unwrap();
    a.go("vol", false).unwrap();
    let second = TargetProcess::start(&cluster, &["--target-id", "4"]).unwrap();
    let mut b = RawNbd::connect(second.addr()).unwrap();
    b.go("vol", false).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !first
        .log()
        .contains("give every cairn-target its own target_id")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the first target never heard it was superseded:\n{}",
            first.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !second.log().contains("export lease"),
        "the second target keeps its lease:\n{}",
        second.log()
    );
    drop((a, b));
}

/// `--read-only`: the flag is advertised, and writes, trims and zeroing fail
/// with EPERM while reads work.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_target_refuses_writes_with_eperm() {
    let (cluster, rw) = setup("vol", 16 * MIB, &[]).await;
    run_tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 7 0 64k", &rw.uri("vol")],
    )
    .unwrap();
    let ro = TargetProcess::start(&cluster, &["--read-only", "--target-id", "2"]).unwrap();
    let uri = ro.uri("vol");
    let info = json(&run_tool("nbdinfo", &["--json", &uri]).unwrap());
    assert_eq!(info["exports"][0]["is_read_only"], true, "{info:#}");
    assert_eq!(info["exports"][0]["can_trim"], false, "{info:#}");
    run_tool(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 7 0 64k", &uri],
    )
    .unwrap();
    // Sent by hand: qemu would refuse to write to a read-only export
    // before sending anything.
    let mut raw = RawNbd::connect(ro.addr()).unwrap();
    let (_, flags) = raw.go("vol", false).unwrap();
    assert_ne!(flags & 2, 0, "NBD_FLAG_READ_ONLY");
    raw.request(0, 1, 1, 0, 512, &[0x78; 512]).unwrap(); // WRITE
    raw.request(0, 4, 2, 0, 512, &[]).unwrap(); // TRIM
    raw.request(0, 6, 3, 0, 512, &[]).unwrap(); // WRITE_ZEROES
    let mut errors: Vec<(u64, u32)> = (0..3)
        .map(|_| {
            let r = raw.reply(0).unwrap();
            (r.cookie, r.error)
        })
        .collect();
    errors.sort();
    assert_eq!(errors, vec![(1, 1), (2, 1), (3, 1)], "EPERM for each");
    // The data is untouched.
    run_tool(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 7 0 64k", &uri],
    )
    .unwrap();
}

/// A write and read-back over a fresh connection: the target still serves.
fn bystander_round_trip(target: &TargetProcess, offset: u64, byte: u8) {
    let mut c = RawNbd::connect(target.addr()).unwrap();
    c.go("vol", true).unwrap();
    c.request(0, 1, 1, offset, 4096, &[byte; 4096]).unwrap();
    let r = c.reply(0).unwrap();
    assert_eq!((r.cookie, r.error), (1, 0));
    c.request(0, 0, 2, offset, 4096, &[]).unwrap();
    let r = c.reply(4096).unwrap();
    assert_eq!(r.kind, Some(1), "OFFSET_DATA");
    assert_eq!(&r.data[8..], &[byte; 4096][..]);
    c.request(0, 2, 3, 0, 0, &[]).unwrap(); // DISC
}

/// Multi-conn: what one connection wrote (acknowledged, not flushed) the
/// next reads, and a FLUSH on a third connection succeeds for it.
#[tokio::test(flavor = "multi_thread")]
async fn connections_to_one_export_see_each_others_writes() {
    let (_cluster, target) = setup("vol", 16 * MIB, &[]).await;
    let mut a = RawNbd::connect(target.addr()).unwrap();
    let mut b = RawNbd::connect(target.addr()).unwrap();
    let mut f = RawNbd::connect(target.addr()).unwrap();
    a.go("vol", false).unwrap();
    b.go("vol", false).unwrap();
    f.go("vol", false).unwrap();
    for i in 0..32u64 {
        let byte = i as u8 + 1;
        a.request(0, 1, i, i * 300 * 1024, 8192, &[byte; 8192])
            .unwrap();
        assert_eq!(a.reply(0).unwrap().error, 0);
        b.request(0, 0, i, i * 300 * 1024, 8192, &[]).unwrap();
        let r = b.reply(8192).unwrap();
        assert_eq!(r.error, 0);
        assert!(
            r.data.iter().all(|&x| x == byte),
            "write {i} not visible on b"
        );
    }
    f.request(0, 3, 99, 0, 0, &[]).unwrap();
    assert_eq!(f.reply(0).unwrap().error, 0);
}

/// A volume grown while a connection is open: a connection opened right
/// after, before the export's lease watch has heard of the growth, gets the
/// new size from the same export (one record of unflushed writes, so a FLUSH
/// on any connection covers writes acknowledged on all) and writes past the
/// old end.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_opened_right_after_a_growth_shares_the_export() {
    let (cluster, target) = setup("vol", 16 * MIB, &[]).await;
    let mut a = RawNbd::connect(target.addr()).unwrap();
    assert_eq!(a.go("vol", false).unwrap().0, 16 * MIB);
    cluster
        .client()
        .grow_volume("vol", 32 * MIB)
        .await
        .expect("grow");
    let mut b = RawNbd::connect(target.addr()).unwrap();
    assert_eq!(b.go("vol", false).unwrap().0, 32 * MIB, "the grown size");
    b.request(0, 1, 1, 20 * MIB, 4096, &[9; 4096]).unwrap();
    assert_eq!(b.reply(0).unwrap().error, 0, "a write past the old end");
    a.request(0, 3, 2, 0, 0, &[]).unwrap(); // FLUSH on the first connection
    assert_eq!(a.reply(0).unwrap().error, 0);
    let log = target.log();
    assert_eq!(
        log.matches("export opened").count(),
        1,
        "one export for the volume:\n{log}"
    );
    assert!(log.contains("volume grew"), "{log}");
}

/// Reads until the server closes the connection (EOF or reset).
fn closed_by_server(c: &mut RawNbd) -> bool {
    use std::io::Read;
    let mut b = [0u8; 4096];
    loop {
        match c.s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_the_proper_error_and_everyone_else_is_served() {
    let (_cluster, target) = setup("vol", 16 * MIB, &[]).await;
    bystander_round_trip(&target, 0, 1);

    // Handshake: an unknown option, STARTTLS and an oversized option are
    // answered and the haggling goes on; bad option magic closes.
    let mut c = RawNbd::connect(target.addr()).unwrap();
    c.send_option(99, b"whatever").unwrap();
    assert_eq!(c.option_replies().unwrap()[0].0, (1 << 31) + 1, "ERR_UNSUP");
    c.send_option(5, &[]).unwrap();
    assert_eq!(
        c.option_replies().unwrap()[0].0,
        (1 << 31) + 2,
        "ERR_POLICY"
    );
    c.send_option(6, &vec![0u8; 2 << 20]).unwrap();
    assert_eq!(
        c.option_replies().unwrap()[0].0,
        (1 << 31) + 9,
        "ERR_TOO_BIG"
    );
    c.send_option(6, &[0, 0, 0, 200, b'v']).unwrap(); // name length past the data
    assert_eq!(
        c.option_replies().unwrap()[0].0,
        (1 << 31) + 3,
        "ERR_INVALID"
    );
    c.send_option(10, &[]).unwrap(); // SET_META before STRUCTURED_REPLY
    assert_eq!(
        c.option_replies().unwrap()[0].0,
        (1 << 31) + 3,
        "ERR_INVALID"
    );
    let (size, _) = c.go("vol", false).unwrap();
    assert_eq!(size, 16 * MIB);
    drop(c);
    let mut c = RawNbd::connect(target.addr()).unwrap();
    {
        use std::io::Write;
        c.s.write_all(b"IHAVEOPX\0\0\0\x07\0\0\0\0").unwrap();
    }
    assert!(closed_by_server(&mut c), "bad option magic must close");

    // Transmission, simple replies: each bad request gets its error and the
    // connection goes on.
    let mut c = RawNbd::connect(target.addr()).unwrap();
    c.go("vol", false).unwrap();
    let cases: &[(u16, u16, u64, u32, usize, u32)] = &[
        // (flags, command, offset, length, payload bytes, errno)
        (0, 42, 0, 0, 0, EINVAL),                   // unknown command
        (0, 0, 16 * MIB, 4096, 0, EINVAL),          // READ past the end
        (0, 1, 16 * MIB - 512, 1024, 1024, ENOSPC), // WRITE past the end
        (0, 0, 100, 512, 0, EINVAL),                // unaligned READ
        (0, 1, 0, 1000, 1000, EINVAL),              // unaligned WRITE
        (0, 0, 0, (32 << 20) + 512, 0, EINVAL),     // READ over the payload limit
        (0, 1, 0, (32 << 20) + 512, (32 << 20) + 512, EINVAL), // WRITE over it
        (0x80, 0, 0, 512, 0, EINVAL),               // unknown flag
        (0, 7, 0, 512, 0, EINVAL),                  // BLOCK_STATUS, no context
        (0, 3, 512, 0, 0, EINVAL),                  // FLUSH with an offset
    ];
    for (i, &(flags, cmd, offset, len, payload, errno)) in cases.iter().enumerate() {
        c.request(
            flags,
            cmd,
            100 + i as u64,
            offset,
            len,
            &vec![0xee; payload],
        )
        .unwrap();
        let r = c.reply(0).unwrap();
        assert_eq!(
            (r.cookie, r.error),
            (100 + i as u64, errno),
            "case {i}: flags {flags:#x} command {cmd} offset {offset} length {len}"
        );
    }
    // After all that, the same connection still works, and nothing was written.
    c.request(0, 0, 7, 0, 4096, &[]).unwrap();
    let r = c.reply(4096).unwrap();
    assert_eq!((r.cookie, r.error), (7, 0));
    assert_eq!(r.data, vec![1u8; 4096], "the refused writes changed data");
    // Bad request magic closes the connection.
    {
        use std::io::Write;
        c.s.write_all(&[0u8; 28]).unwrap();
    }
    assert!(closed_by_server(&mut c), "bad request magic must close");

    // Structured replies carry errors as error chunks with a message.
    let mut c = RawNbd::connect(target.addr()).unwrap();
    c.go("vol", true).unwrap();
    c.request(0, 0, 9, 16 * MIB, 512, &[]).unwrap();
    let r = c.reply(0).unwrap();
    assert_eq!((r.cookie, r.error, r.kind), (9, EINVAL, Some(32769)));
    assert!(
        String::from_utf8_lossy(&r.data[6..]).contains("beyond the export's end"),
        "{r:?}"
    );
    drop(c);

    // A client that vanishes inside a write's payload.
    let mut c = RawNbd::connect(target.addr()).unwrap();
    c.go("vol", false).unwrap();
    c.request(0, 1, 1, 0, 1 << 20, &[0x55; 100 << 10]).unwrap();
    drop(c);

    // A client that stops reading its replies: 200 reads of 32 MiB asked,
    // none read. The target holds at most its per-connection budget.
    let mut hog = RawNbd::connect(target.addr()).unwrap();
    hog.go("vol", false).unwrap();
    for i in 0..200u64 {
        hog.request(0, 0, i, 0, 16 << 20, &[]).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = rss_kib(target.pid().unwrap());
    assert!(
        rss < 256 << 10,
        "target resident memory {rss} KiB with a client not reading 3.2 GiB of replies"
    );

    bystander_round_trip(&target, 8 * MIB, 2);
    drop(hog);
    bystander_round_trip(&target, 8 * MIB, 3);

    // One log line per refusal, naming what was wrong.
    let log = target.log();
    for needle in [
        "unknown command 42",
        "bad request magic",
        "bad option magic",
        "client vanished inside a WRITE's payload",
        "is not aligned to 512 bytes",
    ] {
        assert!(log.contains(needle), "no log line with {needle:?}:\n{log}");
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// kill -9 of cairn-target while QEMU's NBD driver (here in qemu-io, with
/// reconnect-delay) writes: the driver reconnects to the restarted target and
/// goes on, no write fails, and every write acknowledged before each kill
/// reads back.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_the_target_under_qemu_loses_nothing_and_clients_reconnect() {
    let (_cluster, mut target) = setup("vol", 64 * MIB, &[]).await;
    let opts = format!(
        "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host={},\
         file.server.port={},file.export=vol,file.reconnect-delay=60",
        target.addr().ip(),
        target.addr().port()
    );
    // 600 writes of 64 KiB, a distinct pattern each, 5 ms apart, with a
    // flush every 50: about 3-4 s of writing, through two kills.
    const WRITES: u64 = 600;
    let pattern = |i: u64| (i % 251 + 1) as u8;
    let mut args: Vec<String> = vec!["--image-opts".into()];
    for i in 0..WRITES {
        args.push("-c".into());
        args.push(format!(
            "write -P {} {} 64k",
            pattern(i),
            (i % 1000) * 65536
        ));
        args.push("-c".into());
        args.push("sleep 5".into());
        if i % 50 == 49 {
            args.push("-c".into());
            args.push("flush".into());
        }
    }
    args.push(opts.clone());
    let qemu = std::process::Command::new("qemu-io")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting qemu-io");
    for round in 0..2 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        target.kill().unwrap();
        tokio::time::sleep(Duration::from_millis(500 + 300 * round)).await;
        target.restart().unwrap();
    }
    let out = tokio::task::spawn_blocking(move || qemu.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "qemu-io failed: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.matches("wrote 65536/65536 bytes").count(),
        WRITES as usize,
        "every write must complete:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = target.log();
    assert!(
        log.matches("serving NBD on 127.0.0.10").count() == 3,
        "the target must have been killed twice and restarted:\n{log}"
    );
    assert!(
        log.matches("transmission started").count() >= 3,
        "qemu must have reconnected after each kill:\n{log}"
    );

    // Every write reads back (the last one at each offset; all offsets are
    // distinct here).
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in 0..WRITES {
        args.push("-c".into());
        args.push(format!("read -P {} {} 64k", pattern(i), (i % 1000) * 65536));
    }
    args.push(target.uri("vol"));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_tool("qemu-io", &a).unwrap();
    let text = stdout(&out);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert_eq!(
        text.matches("read 65536/65536 bytes").count(),
        WRITES as usize
    );
}
