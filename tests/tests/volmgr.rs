//! The volume manager as processes: three `cairn-volmgr` members on
//! 127.0.0.2-4, driven through the client library the CLI uses.

use std::collections::BTreeSet;
use std::sync::Arc;
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

/// Registers three chunk servers on three hosts and keeps them heartbeating,
/// so 3-replica volumes have their failure domains.
async fn register_three_nodes(cluster: &VolmgrCluster) -> tokio::task::JoinHandle<()> {
    let client = Arc::new(cluster.client());
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
    tokio::spawn(async move {
        loop {
            for i in 1..=3u64 {
                let _ = client.heartbeat(i, 0).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
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
        let err = client.delete_volume("nope").await.unwrap_err();
        assert_eq!(err.status(), Some(VolmgrStatus::NotFound), "{err}");
        assert_eq!(client.list_volumes().await.unwrap(), before);
        // Growing works, and shows.
        let v = client.grow_volume("db", 20 * GIB).await.unwrap();
        assert_eq!(v.size_bytes, 20 * GIB);
    });
}
