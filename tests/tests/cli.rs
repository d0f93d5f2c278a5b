//! The `cairn` admin CLI as an operator runs it: the real binary as a child
//! process against a real cluster (a volume manager and three chunk servers
//! on 127.0.0.2-4), checked through its human output, its `--json` output
//! and its exit statuses, and cross-checked with the volume manager client.

use std::path::Path;
use std::time::{Duration, Instant};

use cairn_proto::volmgr::VolmgrStatus;
use cairn_tests::cli::{assert_code, cairn_in, json, stderr, stdout, text, Cli};
use cairn_tests::cluster::ReplicatedCluster;
use cairn_tests::target::{RawNbd, TargetProcess};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn cli(cluster: &ReplicatedCluster) -> Cli {
    Cli::new(&cluster.volmgr.addrs(), &cluster.volmgr.cluster_id)
}

/// Writes a `cairn.toml` for `cluster` at `path` (folders created).
fn write_config(path: &Path, cluster_id: &str, volmgr: &[String], targets: &[String]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let list = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    std::fs::write(
        path,
        format!(
            "# test\ncluster_id = {cluster_id:?}\nvolmgr = [{}]\ntargets = [{}]\n",
            list(volmgr),
            list(targets)
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_are_created_listed_grown_and_deleted() {
    let cluster = ReplicatedCluster::start(3).await.expect("cluster");
    let cli = cli(&cluster);
    let client = cluster.client();

    // create: human and JSON.
    let o = cli.run(&[
        "volume",
        "create",
        "pacs-db",
        "--size",
        "64M",
        "--extent-size",
        "1M",
    ]);
    assert_code(&o, 0);
    assert!(
        stdout(&o).contains("created volume pacs-db (64.0 MiB, 3 replicas, min 2)"),
        "{}",
        text(&o)
    );
    let j = cli.json(&[
        "volume",
        "create",
        "scratch",
        "--size",
        "1GiB",
        "--replicas",
        "2",
    ]);
    assert_eq!(j["name"], "scratch");
    assert_eq!(j["size_bytes"], 1u64 << 30);
    assert_eq!(j["replicas"], 2);
    assert_eq!(j["min_replicas"], 1);
    assert_eq!(j["extent_size_bytes"], 4 * MIB);

    // list.
    let j = cli.json(&["volume", "list"]);
    let names: Vec<&str> = j
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pacs-db", "scratch"], "{j:#}");
    assert_eq!(j[0]["size_bytes"], 64 * MIB);
    assert_eq!(j[0]["exported_by"], serde_json::json!([]));
    let o = cli.run(&["volume", "list"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("EXPORTED BY"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("pacs-db") && lines[1].contains("64.0 MiB"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("scratch") && lines[2].contains("1.0 GiB"),
        "{out}"
    );

    // info.
    let j = cli.json(&["volume", "info", "pacs-db"]);
    let want = client.get_volume("pacs-db").await.unwrap();
    assert_eq!(j["id"], want.id);
    assert_eq!(j["extent_size_bytes"], MIB);
    assert_eq!(j["replicas"], 3);
    assert_eq!(j["min_replicas"], 2);
    assert_eq!(j["created_unix_ms"], want.created_unix_ms);
    assert_eq!(j["head_epoch"], 1);
    assert_eq!(j["parent"], Value::Null);
    assert_eq!(j["snapshots"], serde_json::json!([]));
    assert_eq!(j["exported_by"], serde_json::json!([]));
    let o = cli.run(&["volume", "info", "pacs-db"]);
    assert_code(&o, 0);
    for want in [
        "64.0 MiB (67108864 bytes)",
        "1.0 MiB (64 extents)",
        "not exported",
    ] {
        assert!(stdout(&o).contains(want), "{want}: {}", text(&o));
    }

    // resize: grow, same size, shrink.
    let o = cli.run(&["volume", "resize", "pacs-db", "--size", "128M"]);
    assert_code(&o, 0);
    assert!(
        stdout(&o).contains("from 64.0 MiB to 128.0 MiB"),
        "{}",
        text(&o)
    );
    assert_eq!(
        client.get_volume("pacs-db").await.unwrap().size_bytes,
        128 * MIB
    );
    let o = cli.run(&["volume", "resize", "pacs-db", "--size", "128MiB"]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("already 128.0 MiB"), "{}", text(&o));
    let o = cli.run(&["volume", "resize", "pacs-db", "--size", "32M"]);
    assert_code(&o, 2);
    assert!(
        stderr(&o).contains("shrinking") && stderr(&o).contains("not supported"),
        "{}",
        text(&o)
    );
    assert_eq!(
        client.get_volume("pacs-db").await.unwrap().size_bytes,
        128 * MIB
    );
    let j = cli.json(&["volume", "resize", "pacs-db", "--size", "256M"]);
    assert_eq!(j["size_bytes"], 256 * MIB);
    assert_eq!(j["previous_size_bytes"], 128 * MIB);

    // Not found is 3, bad sizes 2.
    for args in [
        &["volume", "info", "nosuch"][..],
        &["volume", "resize", "nosuch", "--size", "1G"][..],
        &["volume", "delete", "nosuch", "--yes"][..],
    ] {
        let o = cli.run(args);
        assert_code(&o, 3);
        assert!(stderr(&o).contains("nosuch"), "{}", text(&o));
    }
    let o = cli.run(&["volume", "create", "bad", "--size", "10X"]);
    assert_code(&o, 2);
    assert!(stderr(&o).contains("10X"), "{}", text(&o));
    // With --json the error is JSON on stdout as well, same exit status:
    // refused by the cluster, by our own checks, and by the parser.
    for (args, code, kind, word) in [
        (
            &["volume", "info", "nosuch", "--json"][..],
            3,
            "not_found",
            "nosuch",
        ),
        (
            &["volume", "delete", "scratch", "--json"][..],
            2,
            "usage",
            "--yes",
        ),
        (
            &["volume", "create", "bad", "--size", "10X", "--json"][..],
            2,
            "usage",
            "10X",
        ),
        (
            &["volume", "frobnicate", "--json"][..],
            2,
            "usage",
            "frobnicate",
        ),
    ] {
        let o = cli.run(args);
        assert_code(&o, code);
        let j: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: error not JSON ({e}): {}", text(&o)));
        assert_eq!(j["error"]["kind"], kind, "{args:?}: {j}");
        assert_eq!(j["error"]["exit_code"], code, "{args:?}: {j}");
        let message = j["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(word), "{args:?}: {j}");
        assert!(
            stderr(&o).contains(word),
            "{args:?}: the human line too: {}",
            text(&o)
        );
    }
    let o = cli.run(&["volume", "create", "bad", "--size", "1.5G"]);
    assert_code(&o, 2);

    // delete: refused without --yes, then done.
    let o = cli.run(&["volume", "delete", "scratch"]);
    assert_code(&o, 2);
    assert!(stderr(&o).contains("--yes"), "{}", text(&o));
    client
        .get_volume("scratch")
        .await
        .expect("scratch still there");
    let o = cli.run(&["volume", "delete", "scratch", "--yes"]);
    assert_code(&o, 0);
    let gone = client.get_volume("scratch").await.unwrap_err();
    assert_eq!(gone.status(), Some(VolmgrStatus::NotFound), "{gone}");
    let j = cli.json(&["volume", "list"]);
    assert_eq!(j.as_array().unwrap().len(), 1, "{j:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_is_found_through_config_files() {
    let cluster = ReplicatedCluster::start(3).await.expect("cluster");
    let id = cluster.volmgr.cluster_id.clone();
    let addrs = cluster.volmgr.addrs();
    cluster
        .client()
        .create_volume("found", 8 * MIB, MIB as u32, 3, 2)
        .await
        .unwrap();
    let names = |j: &Value| -> Vec<String> {
        j.as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    };

    // $CAIRN_CONFIG.
    let dir = tempfile::tempdir().unwrap();
    let named = dir.path().join("elsewhere/my.toml");
    write_config(&named, &id, &addrs, &[]);
    let empty = tempfile::tempdir().unwrap();
    let o = cairn_in(
        empty.path(),
        &["volume", "list", "--json"],
        &[("CAIRN_CONFIG", named.to_str().unwrap())],
    );
    assert_eq!(names(&json(&o)), ["found"]);

    // ./cairn-data/cairn.toml in the current folder, no flags at all.
    let folder = tempfile::tempdir().unwrap();
    let local = folder.path().join("cairn-data/cairn.toml");
    write_config(&local, &id, &addrs, &[]);
    let o = cairn_in(folder.path(), &["volume", "info", "found", "--json"], &[]);
    assert_eq!(json(&o)["size_bytes"], 8 * MIB);
    let o = cairn_in(folder.path(), &["cluster", "status"], &[]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("cairn-data/cairn.toml"), "{}", text(&o));

    // --cluster-id overrides the file's (here a wrong one in the file).
    write_config(&local, "not-this-cluster", &addrs, &[]);
    let o = cairn_in(
        folder.path(),
        &["volume", "list", "--json", "--cluster-id", &id],
        &[],
    );
    assert_eq!(names(&json(&o)), ["found"]);
    // Without the override the volume manager refuses the wrong id: a
    // configuration error.
    let o = cairn_in(folder.path(), &["volume", "list"], &[]);
    assert_code(&o, 2);
    assert!(stderr(&o).contains("not-this-cluster"), "{}", text(&o));

    // --volmgr beats a broken local file; without --cluster-id it is refused.
    std::fs::write(
        &local,
        "cluster_id = \"x\"\nvolmgr = [\"a:1\"]\nvolmgrs = 3\n",
    )
    .unwrap();
    let o = cairn_in(
        folder.path(),
        &[
            "volume",
            "list",
            "--json",
            "--volmgr",
            &addrs.join(","),
            "--cluster-id",
            &id,
        ],
        &[],
    );
    assert_eq!(names(&json(&o)), ["found"]);
    let o = cairn_in(
        folder.path(),
        &["volume", "list", "--volmgr", &addrs.join(",")],
        &[],
    );
    assert_code(&o, 2);
    assert!(stderr(&o).contains("--cluster-id"), "{}", text(&o));
    // $CAIRN_VOLMGR and $CAIRN_CLUSTER_ID stand in for the flags.
    let o = cairn_in(
        empty.path(),
        &["volume", "list", "--json"],
        &[
            ("CAIRN_VOLMGR", &addrs.join(",")),
            ("CAIRN_CLUSTER_ID", &id),
        ],
    );
    assert_eq!(names(&json(&o)), ["found"]);

    // The broken file: exit 2, naming the file and the key.
    let o = cairn_in(folder.path(), &["volume", "list"], &[]);
    assert_code(&o, 2);
    assert!(
        stderr(&o).contains(&local.display().to_string()) && stderr(&o).contains("volmgrs"),
        "{}",
        text(&o)
    );

    // $CAIRN_CONFIG naming a missing file: exit 2, naming it.
    let missing = dir.path().join("missing.toml");
    let o = cairn_in(
        empty.path(),
        &["node", "list"],
        &[("CAIRN_CONFIG", missing.to_str().unwrap())],
    );
    assert_code(&o, 2);
    assert!(stderr(&o).contains("missing.toml"), "{}", text(&o));

    // Nothing anywhere: exit 2 and the places tried.
    if !Path::new("/etc/cairn/cairn.toml").exists() {
        let o = cairn_in(empty.path(), &["cluster", "status"], &[]);
        assert_code(&o, 2);
        for want in [
            "--volmgr",
            "CAIRN_CONFIG",
            "cairn-data/cairn.toml",
            "/etc/cairn/cairn.toml",
        ] {
            assert!(stderr(&o).contains(want), "{want}: {}", text(&o));
        }
    }

    // An unreachable cluster: exit 1.
    let o = cairn_in(
        empty.path(),
        &[
            "volume",
            "list",
            "--volmgr",
            "127.0.0.1:1",
            "--cluster-id",
            &id,
        ],
        &[],
    );
    assert_code(&o, 1);
}

/// Polls `cairn cluster status --json` until `ok`.
fn wait_status(cli: &Cli, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let j = cli.json(&["cluster", "status"]);
        if ok(&j) {
            return j;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what}: last status {j:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_node_list_report_a_down_node() {
    let mut cluster = ReplicatedCluster::start(3).await.expect("cluster");
    cluster
        .client()
        .create_volume("vol", 16 * MIB, MIB as u32, 3, 2)
        .await
        .unwrap();
    let cli = cli(&cluster);

    let j = wait_status(&cli, "healthy", |j| j["health"] == "HEALTHY");
    assert_eq!(j["nodes"]["up"], 3, "{j:#}");
    assert_eq!(j["nodes"]["down"], 0, "{j:#}");
    assert_eq!(j["groups_degraded"], 0, "{j:#}");
    assert_eq!(j["volumes"], 1, "{j:#}");
    assert_eq!(j["members"].as_array().unwrap().len(), 1, "{j:#}");
    assert_eq!(
        j["leader"]["addr"],
        cluster.volmgr.addrs()[0].as_str(),
        "{j:#}"
    );
    assert!(j["capacity_bytes"].as_u64().unwrap() > 0, "{j:#}");
    assert_eq!(j["nodes_down_or_out"], serde_json::json!([]));

    let j = cli.json(&["node", "list"]);
    let nodes = j.as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{j:#}");
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n["id"], i as u64 + 1, "{j:#}");
        assert_eq!(n["addr"], cluster.servers[i].addr().to_string(), "{j:#}");
        assert_eq!(n["host"], format!("h{}", i + 1), "{j:#}");
        assert_eq!(n["up"], true, "{j:#}");
        assert_eq!(n["in"], true, "{j:#}");
        assert!(n["capacity_bytes"].as_u64().unwrap() > 0, "{j:#}");
    }
    let o = cli.run(&["node", "list"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(out.lines().all(|l| !l.contains("down")), "{out}");

    let o = cli.run(&["cluster", "status"]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("HEALTHY"), "{}", text(&o));

    // Node 3 goes away: reported down, the cluster DEGRADED, still exit 0.
    let down_addr = cluster.servers[2].addr().to_string();
    cluster.servers[2].stop().expect("stop node 3");
    let j = wait_status(&cli, "node 3 down", |j| j["nodes"]["down"] == 1);
    assert_eq!(j["health"], "DEGRADED", "{j:#}");
    assert_eq!(j["nodes"]["up"], 2, "{j:#}");
    let problems = j["nodes_down_or_out"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{j:#}");
    assert_eq!(problems[0]["id"], 3, "{j:#}");
    assert_eq!(problems[0]["addr"], down_addr.as_str(), "{j:#}");
    assert!(problems[0]["since_unix_ms"].as_u64().unwrap() > 0, "{j:#}");
    assert!(
        j["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains("node 3")),
        "{j:#}"
    );

    let o = cli.run(&["cluster", "status"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("DEGRADED"), "{out}");
    assert!(out.contains("Nodes down or out"), "{out}");
    assert!(
        out.contains(&down_addr) && out.contains("down, in"),
        "{out}"
    );

    let j = cli.json(&["node", "list"]);
    let states: Vec<(u64, bool)> = j
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_u64().unwrap(), n["up"].as_bool().unwrap()))
        .collect();
    assert_eq!(states, [(1, true), (2, true), (3, false)], "{j:#}");
    let o = cli.run(&["node", "list"]);
    let out = stdout(&o);
    let row3 = out
        .lines()
        .find(|l| l.contains(&down_addr))
        .expect("row of node 3");
    assert!(row3.contains("down"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn export_list_shows_open_exports_and_delete_respects_them() {
    let cluster = ReplicatedCluster::start(3).await.expect("cluster");
    let client = cluster.client();
    client
        .create_volume("img", 16 * MIB, MIB as u32, 3, 2)
        .await
        .unwrap();
    client
        .create_volume("idle", 16 * MIB, MIB as u32, 3, 2)
        .await
        .unwrap();
    let target = TargetProcess::start(&cluster, &[]).expect("target");
    let folder = tempfile::tempdir().unwrap();
    let base = format!("nbd://{}", target.addr());
    write_config(
        &folder.path().join("cairn-data/cairn.toml"),
        &cluster.volmgr.cluster_id,
        &cluster.volmgr.addrs(),
        std::slice::from_ref(&base),
    );
    let run = |args: &[&str]| cairn_in(folder.path(), args, &[]);

    let j = json(&run(&["export", "list", "--json"]));
    assert_eq!(j, serde_json::json!([]), "nothing open yet");

    // An NBD client opens `img`: the target takes an export lease.
    let mut nbd = RawNbd::connect(target.addr()).expect("nbd connect");
    let (size, _) = nbd.go("img", false).expect("open img");
    assert_eq!(size, 16 * MIB);
    let t0 = Instant::now();
    let j = loop {
        let j = json(&run(&["export", "list", "--json"]));
        if !j.as_array().unwrap().is_empty() {
            break j;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "export never listed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(j.as_array().unwrap().len(), 1, "{j:#}");
    assert_eq!(j[0]["volume"], "img", "{j:#}");
    assert_eq!(j[0]["exported_by"], serde_json::json!([1]), "{j:#}");
    assert_eq!(
        j[0]["uris"],
        serde_json::json!([format!("{base}/img")]),
        "{j:#}"
    );
    let o = run(&["export", "list"]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains(&format!("{base}/img")), "{}", text(&o));
    let j = json(&run(&["volume", "info", "img", "--json"]));
    assert_eq!(j["exported_by"], serde_json::json!([1]), "{j:#}");
    let o = run(&["volume", "list"]);
    let out = stdout(&o);
    let row = out.lines().find(|l| l.starts_with("img")).expect("img row");
    assert!(row.trim_end().ends_with('1'), "{out}");

    // Deleting an exported volume: refused with the server's reason, unless --force.
    let o = run(&["volume", "delete", "img", "--yes"]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("exported"), "{}", text(&o));
    client.get_volume("img").await.expect("img still there");
    let o = run(&["volume", "delete", "img", "--yes", "--force"]);
    assert_code(&o, 0);
    let gone = client.get_volume("img").await.unwrap_err();
    assert_eq!(gone.status(), Some(VolmgrStatus::NotFound), "{gone}");
    drop(nbd);
    drop(target);
}

/// `cairn volmgr members / add-member / remove-member` change the raft group
/// of real `cairn-volmgr` processes: a third member started with `--join`
/// is added, then the leader is removed, and the survivors serve.
#[test]
fn volume_manager_members_are_listed_added_and_removed() {
    let mut vm = cairn_tests::volmgr::VolmgrCluster::start(2, &[]).unwrap();
    let tmp = cairn_tests::temp_dir("cairn-cli-volmgr-").unwrap();
    let flags = |addrs: &[String], id: &str| -> Vec<String> {
        vec![
            "--volmgr".into(),
            addrs.join(","),
            "--cluster-id".into(),
            id.into(),
            "--json".into(),
        ]
    };
    let run = |args: &[&str], extra: &[String]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(extra.iter().map(String::as_str));
        cairn_in(tmp.path(), &all, &[])
    };
    let ids = |v: &Value| -> Vec<u64> {
        let mut ids: Vec<u64> = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_u64().unwrap())
            .collect();
        ids.sort();
        ids
    };
    let cluster_id = vm.cluster_id.clone();
    let f = flags(&vm.addrs(), &cluster_id);
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let o = run(&["volmgr", "members"], &f);
        if o.status.success() || Instant::now() > deadline {
            break json(&o);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(ids(&listed), [1, 2]);
    assert_eq!(
        listed["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["leader"] == true)
            .count(),
        1
    );

    // A bad address is refused before anything changes.
    let o = run(&["volmgr", "add-member", "3", "nowhere"], &f);
    assert_code(&o, 2);

    let addr = vm.start_joining(3).unwrap().to_string();
    let added = json(&run(&["volmgr", "add-member", "3", &addr], &f));
    assert_eq!(ids(&added), [1, 2, 3]);

    // Remove the leader: it hands leadership to another member first, so the
    // group never sits leaderless waiting out an election, and the new
    // leader makes the change.
    let leader = added["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["leader"] == true)
        .and_then(|m| m["id"].as_u64())
        .expect("a leader is listed");
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|&i| i != leader).collect();
    let removed = json(&run(&["volmgr", "remove-member", &leader.to_string()], &f));
    assert_eq!(ids(&removed), survivors);
    let old = vm.members.get_mut(&leader).unwrap();
    let log = old.log();
    assert!(log.contains("handing leadership over first"), "{log}");
    assert!(
        !log.contains("no longer leading"),
        "the removal was applied while member {leader} still led:\n{log}"
    );
    // The removed member keeps running until it is stopped, and must not
    // trip over the group's traffic meanwhile: raft-rs keeps a leader that
    // removed itself leading, and its next append response panicked it.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(old.is_running(), "member {leader} exited:\n{}", old.log());
    assert!(!old.log().contains("panicked"), "{}", old.log());
    old.stop().unwrap();

    // The survivors are the group now: asked through them alone, they
    // answer (a leader of the two exists) and list exactly them.
    let addrs: Vec<String> = survivors
        .iter()
        .map(|i| vm.members[i].addr.to_string())
        .collect();
    let f = flags(&addrs, &cluster_id);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = run(&["volmgr", "members"], &f);
        if o.status.success() {
            assert_eq!(ids(&json(&o)), survivors);
            break;
        }
        assert!(Instant::now() < deadline, "{}", text(&o));
        std::thread::sleep(Duration::from_millis(200));
    }
}
