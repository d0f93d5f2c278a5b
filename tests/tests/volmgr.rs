//! The volume manager as processes: three `cairn-volmgr` members on
//! 127.0.0.2-4, driven through the client library the CLI uses.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cairn_proto::volmgr::VolmgrStatus;
use cairn_tests::volmgr::VolmgrCluster;
use cairn_volmgr::client::VolmgrClient;

const GIB: u64 = 1 << 30;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Registers chunk servers 1, 2 and 3, each on its own host.
async fn register_nodes(client: &VolmgrClient) {
    for i in 1..=3u64 {
        client
            .register_node(
                i,
                &format!("127.0.0.{}:7410", i + 1),
                &format!("h{i}"),
                "",
                "",
                1,
                100 * GIB,
            )
            .await
            .expect("registering a chunk server");
    }
}

/// Sends heartbeats for `nodes` (used bytes: id GiB) until aborted. Its own
/// client: calls on one client share one connection, and a long poll would
/// hold the heartbeats up.
fn heartbeat(cluster: &VolmgrCluster, nodes: &'static [u64]) -> tokio::task::JoinHandle<()> {
    let client = cluster.client();
    tokio::spawn(async move {
        loop {
            for &i in nodes {
                let _ = client.heartbeat(i, i * GIB).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// Three chunk servers on three hosts, kept heartbeating, so 3-replica
/// volumes have their failure domains.
async fn register_three_nodes(cluster: &VolmgrCluster) -> tokio::task::JoinHandle<()> {
    register_nodes(&cluster.client()).await;
    heartbeat(cluster, &[1, 2, 3])
}

/// kill -9 of the leader in the middle of a stream of creations: a new
/// leader serves within 3 s, every creation the client saw acknowledged is
/// there, none is applied twice (a retried create answers with its first
/// result, never "already exists"), and a full restart keeps it all.
#[test]
fn leader_killed_during_creations_then_full_restart_loses_nothing() {
    let mut cluster = VolmgrCluster::start(3, &[]).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let heartbeats = register_three_nodes(&cluster).await;
        let client = cluster.client();
        let mut ids = BTreeSet::new();
        let mut killed_at = None;
        let mut first_after_kill = None;
        for i in 0..120u32 {
            if i == 40 {
                let leader = cluster.leader().await.unwrap();
                cluster.members.get_mut(&leader).unwrap().kill().unwrap();
                killed_at = Some((Instant::now(), leader));
            }
            let name = format!("vol-{i:04}");
            let v = client
                .create_volume(&name, GIB, 0, 3, 2)
                .await
                .unwrap_or_else(|e| panic!("creating {name}: {e}"));
            assert_eq!(v.name, name);
            assert!(ids.insert(v.id), "volume id {} given twice", v.id);
            if let (Some((at, _)), None) = (killed_at, first_after_kill) {
                first_after_kill = Some(at.elapsed());
            }
        }
        let failover = first_after_kill.unwrap();
        println!("first creation acknowledged {failover:?} after the leader was killed");
        assert!(
            failover < Duration::from_secs(3),
            "failover took {failover:?}"
        );

        let listed = client.list_volumes().await.unwrap();
        let names: Vec<String> = listed.iter().map(|v| v.name.clone()).collect();
        let want: Vec<String> = (0..120).map(|i| format!("vol-{i:04}")).collect();
        assert_eq!(names, want);
        assert_eq!(listed.iter().map(|v| v.id).collect::<BTreeSet<_>>(), ids);

        // The killed member comes back and catches up; then all three stop
        // and start again: everything is still there.
        let (_, killed) = killed_at.unwrap();
        cluster.members.get_mut(&killed).unwrap().restart().unwrap();
        heartbeats.abort();
        tokio::time::sleep(Duration::from_millis(500)).await;
        for m in cluster.members.values_mut() {
            let status = m.stop().unwrap();
            assert!(status.success(), "member {} exited with {status}", m.id);
        }
        for m in cluster.members.values_mut() {
            m.restart().unwrap();
        }
        let client = cluster.client();
        let again = client.list_volumes().await.unwrap();
        assert_eq!(again, listed, "state changed across a full restart");
    });
}

/// 1000 volumes created and listed, in name order.
#[test]
fn a_thousand_volumes_are_created_and_listed() {
    let cluster = VolmgrCluster::start(3, &[]).unwrap();
    runtime().block_on(async {
        let _hb = register_three_nodes(&cluster).await;
        let client = cluster.client();
        let t0 = Instant::now();
        for i in 0..1000u32 {
            client
                .create_volume(&format!("pacs-{i:04}"), 10 * GIB, 0, 3, 2)
                .await
                .unwrap();
        }
        println!("1000 creations in {:?}", t0.elapsed());
        let listed = client.list_volumes().await.unwrap();
        assert_eq!(listed.len(), 1000);
        assert!(listed.windows(2).all(|w| w[0].name < w[1].name));
        assert_eq!(listed[999].name, "pacs-0999");
    });
}

/// Bad requests: a clear refusal each, and the catalogue unchanged.
#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let cluster = VolmgrCluster::start(3, &[]).unwrap();
    runtime().block_on(async {
        let _hb = register_three_nodes(&cluster).await;
        let client: VolmgrClient = cluster.client();
        client.create_volume("db", 10 * GIB, 0, 3, 2).await.unwrap();
        let before = client.list_volumes().await.unwrap();
        type Case<'a> = (&'a str, u64, u32, u32, u32, VolmgrStatus);
        let cases: &[Case] = &[
            ("db", GIB, 0, 3, 2, VolmgrStatus::AlreadyExists),
            ("zero", 0, 0, 3, 2, VolmgrStatus::InvalidArgument),
            ("odd", GIB + 100, 0, 3, 2, VolmgrStatus::InvalidArgument),
            ("ext", GIB, 3 << 20, 3, 2, VolmgrStatus::InvalidArgument),
            ("noreplica", GIB, 0, 0, 0, VolmgrStatus::InvalidArgument),
            ("min", GIB, 0, 2, 3, VolmgrStatus::InvalidArgument),
            ("many", GIB, 0, 4, 2, VolmgrStatus::FailedPrecondition),
            ("", GIB, 0, 3, 2, VolmgrStatus::InvalidArgument),
            ("-dash", GIB, 0, 3, 2, VolmgrStatus::InvalidArgument),
            ("sp ace", GIB, 0, 3, 2, VolmgrStatus::InvalidArgument),
        ];
        for &(name, size, extent, replicas, min, want) in cases {
            let err = client
                .create_volume(name, size, extent, replicas, min)
                .await
                .expect_err(name);
            assert_eq!(err.status(), Some(want), "{name:?}: {err}");
            assert!(!err.to_string().is_empty());
        }
        let err = client.grow_volume("db", GIB).await.unwrap_err();
        assert_eq!(
            err.status(),
            Some(VolmgrStatus::FailedPrecondition),
            "shrink: {err}"
        );
        let err = client.get_volume("nope").await.unwrap_err();
        assert_eq!(err.status(), Some(VolmgrStatus::NotFound), "{err}");
        let err = client.delete_volume("nope", false).await.unwrap_err();
        assert_eq!(err.status(), Some(VolmgrStatus::NotFound), "{err}");
        assert_eq!(client.list_volumes().await.unwrap(), before);
        // Growing works, and shows.
        let v = client.grow_volume("db", 20 * GIB).await.unwrap();
        assert_eq!(v.size_bytes, 20 * GIB);
    });
}

/// Members change at run time: a fourth joins empty and is added, the first
/// is removed, and a cluster of {2, 3, 4} that has lost member 2 still serves
/// everything: the newcomer holds the whole state.
#[test]
fn members_are_added_and_removed_at_run_time() {
    let mut cluster = VolmgrCluster::start(3, &[]).unwrap();
    runtime().block_on(async {
        let _hb = register_three_nodes(&cluster).await;
        let client = cluster.client();
        for i in 0..5 {
            client
                .create_volume(&format!("before-{i}"), GIB, 0, 3, 2)
                .await
                .unwrap();
        }
        let addr = cluster.start_joining(4).unwrap();
        client.add_member(4, &addr.to_string()).await.unwrap();
        client.remove_member(1).await.unwrap();
        let status = client.cluster_status().await.unwrap();
        let ids: Vec<u64> = status.members.iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![2, 3, 4]);
        cluster.members.get_mut(&1).unwrap().stop().unwrap();
        cluster.members.get_mut(&2).unwrap().kill().unwrap();
        // Only 3 and 4 are left: a majority of {2, 3, 4} only if 4 caught up.
        let client = VolmgrClient::new(
            vec![cluster.members[&3].addr.to_string(), addr.to_string()],
            cluster.cluster_id.clone(),
        );
        client.create_volume("after", GIB, 0, 3, 2).await.unwrap();
        let names: Vec<String> = client
            .list_volumes()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(
            names,
            ["after", "before-0", "before-1", "before-2", "before-3", "before-4"]
        );
    });
}

/// A chunk server that stops heartbeating is marked down in a new map
/// epoch, which a long poll for a newer map sees; the others stay up.
#[test]
fn a_silent_chunk_server_is_marked_down_in_a_new_epoch() {
    let cluster = VolmgrCluster::start(
        3,
        &["--heartbeat-interval-ms", "200", "--down-after-ms", "1000"],
    )
    .unwrap();
    runtime().block_on(async {
        let client = cluster.client();
        register_nodes(&client).await;
        let _beats = heartbeat(&cluster, &[1, 2]);
        let t0 = Instant::now();
        let mut map = client.get_map(0, Duration::ZERO).await.unwrap();
        while map.nodes.iter().find(|n| n.id == 3).unwrap().up {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "node 3 never marked down"
            );
            let epoch = map.epoch;
            map = client.get_map(epoch, Duration::from_secs(5)).await.unwrap();
            assert!(map.epoch >= epoch);
        }
        println!(
            "silent node marked down after {:?} (epoch {})",
            t0.elapsed(),
            map.epoch
        );
        assert!(
            map.nodes.iter().filter(|n| n.id != 3).all(|n| n.up),
            "{:?}",
            map.nodes
        );
        // Used bytes from heartbeats reach the map (batched, no new epoch).
        let epoch = map.epoch;
        let t0 = Instant::now();
        while map.nodes.iter().take(2).any(|n| n.used_bytes != n.id * GIB) {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "usage never reached the map: {:?}",
                map.nodes
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
            map = client.get_map(0, Duration::ZERO).await.unwrap();
        }
        assert_eq!(map.epoch, epoch, "usage made a new map epoch");
    });
}

/// A known node id from another address, a request for another cluster, and
/// a corrupt raft log on start: each refused with a clear error.
#[test]
fn bad_registrations_other_clusters_and_a_corrupt_log_are_refused() {
    let mut cluster = VolmgrCluster::start(3, &[]).unwrap();
    runtime().block_on(async {
        let client = cluster.client();
        client
            .register_node(7, "127.0.0.2:7410", "h1", "", "", 1, GIB)
            .await
            .unwrap();
        let err = client
            .register_node(7, "127.0.0.3:7410", "h1", "", "", 1, GIB)
            .await
            .unwrap_err();
        assert_eq!(
            err.status(),
            Some(VolmgrStatus::FailedPrecondition),
            "{err}"
        );
        assert!(err.to_string().contains("127.0.0.2:7410"), "{err}");
        let map = client.get_map(0, Duration::ZERO).await.unwrap();
        assert_eq!(map.nodes[0].addr, "127.0.0.2:7410");

        let other = VolmgrClient::new(cluster.addrs(), "another-cluster");
        let err = other.cluster_status().await.unwrap_err();
        assert_eq!(err.status(), Some(VolmgrStatus::InvalidArgument), "{err}");
        assert!(err.to_string().contains("test-cluster"), "{err}");
    });
    // Damage the checkpoint record of member 3's log (the first record,
    // synced before the file was renamed into place, so damage there is
    // always refused; damage in the middle of the file could fall in the
    // last synced batch, which is indistinguishable from a torn write and
    // truncated, see raftlog.rs).
    let m = cluster.members.get_mut(&3).unwrap();
    m.stop().unwrap();
    let raft = m.data_dir.join("raft");
    // Only the newest generation counts.
    let wal = std::fs::read_dir(&raft)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .max()
        .expect("a log file");
    let mut bytes = std::fs::read(&wal).unwrap();
    // The file header is 32 bytes, a record header 24; the checkpoint's
    // payload starts with its durable length. (How many entries follow it
    // depends on how far this follower had got: a majority commits
    // without it.)
    let checkpoint_payload = 32 + 24;
    assert!(
        bytes.len() >= checkpoint_payload + 8,
        "log of {} bytes",
        bytes.len()
    );
    for b in &mut bytes[checkpoint_payload..checkpoint_payload + 8] {
        *b ^= 0xff;
    }
    std::fs::write(&wal, &bytes).unwrap();
    let err = m.restart().unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("exit status: 2"), "{text}");
    assert!(text.contains("raft log"), "{text}");
}

/// One member and five members work the same way as three.
#[test]
fn one_and_five_member_clusters_serve() {
    for n in [1u64, 5] {
        let cluster = VolmgrCluster::start(n, &[]).unwrap();
        runtime().block_on(async {
            let client = cluster.client();
            client
                .register_node(1, "127.0.0.2:7410", "h1", "", "", 1, GIB)
                .await
                .unwrap();
            for i in 0..10 {
                client
                    .create_volume(&format!("v{i}"), GIB, 0, 1, 1)
                    .await
                    .unwrap();
            }
            assert_eq!(
                client.list_volumes().await.unwrap().len(),
                10,
                "{n} members"
            );
            let status = client.cluster_status().await.unwrap();
            assert_eq!(status.members.len() as u64, n);
        });
    }
}

/// Real chunk servers started with `--volmgr` register (address, host,
/// capacity) and heartbeat; one killed with SIGKILL is marked down, the
/// others stay up.
#[test]
fn chunk_servers_register_heartbeat_and_are_marked_down_when_killed() {
    use cairn_tests::{ChunkServerOptions, ChunkServerProcess};
    let cluster = VolmgrCluster::start(
        3,
        &["--heartbeat-interval-ms", "200", "--down-after-ms", "1000"],
    )
    .unwrap();
    let volmgr = cluster.addrs().join(",");
    let mut servers: Vec<ChunkServerProcess> = (1..=3u64)
        .map(|i| {
            ChunkServerProcess::start(ChunkServerOptions {
                cluster_id: cluster.cluster_id.clone(),
                node_id: i,
                extra_args: vec![
                    "--volmgr".into(),
                    volmgr.clone(),
                    "--host".into(),
                    format!("h{i}"),
                ],
                ..ChunkServerOptions::default()
            })
            .unwrap()
        })
        .collect();
    runtime().block_on(async {
        let client = cluster.client();
        let t0 = Instant::now();
        let mut map = client.get_map(0, Duration::ZERO).await.unwrap();
        while map.nodes.len() < 3 || !map.nodes.iter().all(|n| n.up) {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "servers did not register: {map:?}"
            );
            map = client
                .get_map(map.epoch, Duration::from_secs(2))
                .await
                .unwrap();
        }
        for (n, s) in map.nodes.iter().zip(&servers) {
            assert_eq!(n.addr, s.addr().to_string());
            assert!(n.capacity_bytes > 0);
        }
        client.create_volume("db", GIB, 0, 3, 2).await.unwrap();

        servers[2].kill().unwrap();
        let t0 = Instant::now();
        while map.nodes.iter().find(|n| n.id == 3).unwrap().up {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "killed server never marked down"
            );
            map = client
                .get_map(map.epoch, Duration::from_secs(2))
                .await
                .unwrap();
        }
        println!("killed chunk server marked down after {:?}", t0.elapsed());
        assert!(
            map.nodes.iter().filter(|n| n.id != 3).all(|n| n.up),
            "{:?}",
            map.nodes
        );
    });
}

/// A volume a front end exports is not deleted unless forced; the export
/// is a lease, so a front end that dies stops holding it.
#[test]
fn deleting_an_exported_volume_needs_force() {
    let cluster = VolmgrCluster::start(
        3,
        &["--heartbeat-interval-ms", "200", "--down-after-ms", "1000"],
    )
    .unwrap();
    runtime().block_on(async {
        let _hb = register_three_nodes(&cluster).await;
        let client = cluster.client();
        for name in ["a", "b", "c"] {
            client.create_volume(name, GIB, 0, 3, 2).await.unwrap();
        }
        client.register_export(100, "a").await.unwrap();
        client.register_export(100, "b").await.unwrap();
        assert_eq!(client.volume_exports("a").await.unwrap(), vec![100]);
        let err = client.delete_volume("a", false).await.unwrap_err();
        assert_eq!(
            err.status(),
            Some(VolmgrStatus::FailedPrecondition),
            "{err}"
        );
        assert!(
            err.to_string().contains("exported") && err.to_string().contains("--force"),
            "{err}"
        );
        client.get_volume("a").await.expect("still there");
        // Forced: gone.
        client.delete_volume("a", true).await.unwrap();
        assert_eq!(
            client.get_volume("a").await.unwrap_err().status(),
            Some(VolmgrStatus::NotFound)
        );
        // Unexported: deletable.
        client.unregister_export(100, "b").await.unwrap();
        client.delete_volume("b", false).await.unwrap();
        // A lease that is not renewed runs out (3 intervals of 200 ms).
        client.register_export(101, "c").await.unwrap();
        assert!(client.delete_volume("c", false).await.is_err());
        tokio::time::sleep(Duration::from_millis(800)).await;
        client.delete_volume("c", false).await.unwrap();
    });
}
