//! cairn-target with real NBD clients against a real cluster: a volume
//! manager, three chunk servers (127.0.0.2-4) and the target (127.0.0.10),
//! all as processes, driven by nbdinfo, qemu-io, qemu-img, nbdcopy, fio and
//! nbdfuse.

use std::time::Duration;

use cairn_tests::cluster::ReplicatedCluster;
use cairn_tests::target::{run_tool, stdout, tool, TargetProcess};
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

fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", stdout(out)))
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
