//! The group-related API through a real `cairn-volmgr` process (one member
//! on loopback): heartbeats and registrations grant read leases with the
//! map epoch, claims round-trip (granted, repeated, refused), and the
//! cluster status counts degraded groups.

mod common;
use common::Member;

use std::time::{Duration, Instant};

use cairn_proto::map::GroupRecord;
use cairn_proto::volmgr::VolmgrStatus;
use cairn_volmgr::client::VolmgrClient;

const CLUSTER: &str = "api-test";
const DOWN_AFTER_MS: u32 = 10_000;

fn start() -> Member {
    common::start(
        CLUSTER,
        &[
            "--heartbeat-interval-ms",
            "1000",
            "--down-after-ms",
            &DOWN_AFTER_MS.to_string(),
        ],
    )
}

fn group(groups: &[GroupRecord], replicas: u32, index: u32) -> GroupRecord {
    groups
        .iter()
        .find(|g| (g.replicas, g.index) == (replicas, index))
        .cloned()
        .unwrap()
}

#[test]
fn leases_and_claims_through_the_api() {
    let member = start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = VolmgrClient::new(vec![member.addr.clone()], CLUSTER)
            .with_deadline(Duration::from_secs(20));
        for id in 1..=3u64 {
            let r = client
                .register_node(
                    id,
                    &format!("127.0.0.{id}:7000"),
                    &format!("h{id}"),
                    "",
                    "",
                    1,
                    1 << 40,
                )
                .await
                .unwrap();
            assert_eq!(r.lease_ms, DOWN_AFTER_MS / 2, "registration grants a lease");
            assert!(r.map_epoch > 0);
        }
        let beat = client.heartbeat_lease(1, 0).await.unwrap();
        assert_eq!(beat.lease_ms, DOWN_AFTER_MS / 2);
        assert_eq!(beat.interval_ms, 1000);
        let map = client.get_map(0, Duration::ZERO).await.unwrap();
        assert_eq!(beat.map_epoch, map.epoch, "the leader's current epoch");
        assert!(map.nodes.iter().all(|n| n.up_since > 0));
        // An unknown node gets no lease.
        assert_eq!(client.heartbeat_lease(77, 0).await.unwrap().lease_ms, 0);

        // The first 3-replica volume brings its groups (the client retries
        // while the leader has not set the group count yet).
        client.create_volume("v", 1 << 30, 0, 3, 2).await.unwrap();
        let map = client.get_map(0, Duration::ZERO).await.unwrap();
        assert_eq!(map.groups.len(), 16);
        assert!(map.groups.iter().all(|g| g.acting.len() == 3));
        assert_eq!(client.cluster_status().await.unwrap().groups_degraded, 0);

        // Node 2 restarts: it leaves every acting set.
        let r = client
            .register_node(2, "127.0.0.2:7000", "h2", "", "", 1, 1 << 40)
            .await
            .unwrap();
        let map = client.get_map(0, Duration::ZERO).await.unwrap();
        assert_eq!(r.map_epoch, map.epoch);
        let up_since = map.node(2).unwrap().up_since;
        assert_eq!(up_since, map.epoch);
        assert!(map.groups.iter().all(|g| !g.acting.contains(&2)));
        assert_eq!(client.cluster_status().await.unwrap().groups_degraded, 16);

        // Group 0's primary claims it back: granted at a new epoch.
        let g = group(&map.groups, 3, 0);
        let epoch = client
            .claim_replica(g.acting[0], 3, 0, g.interval, 2, up_since)
            .await
            .unwrap();
        assert_eq!(epoch, map.epoch + 1);
        let map = client.get_map(0, Duration::ZERO).await.unwrap();
        let now = group(&map.groups, 3, 0);
        assert!(now.acting.contains(&2));
        assert_eq!(now.interval, epoch);
        assert_eq!(client.cluster_status().await.unwrap().groups_degraded, 15);
        // The same claim again (its reply lost, say): Ok, nothing changes.
        let again = client
            .claim_replica(g.acting[0], 3, 0, g.interval, 2, up_since)
            .await
            .unwrap();
        assert_eq!(again, epoch);
        // A stale claim is refused as a failed precondition, with the reason.
        let g1 = group(&map.groups, 3, 1);
        let err = client
            .claim_replica(g1.acting[0], 3, 1, g1.interval - 1, 2, up_since)
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(VolmgrStatus::FailedPrecondition));
        assert!(err.to_string().contains("group 1x3"), "{err}");
        assert!(err.to_string().contains("interval"), "{err}");
        // The heartbeat reply carries the newest epoch.
        let started = Instant::now();
        let beat = client.heartbeat_lease(2, 0).await.unwrap();
        assert_eq!(beat.map_epoch, epoch);
        assert!(started.elapsed() < Duration::from_secs(5));
    });
}
