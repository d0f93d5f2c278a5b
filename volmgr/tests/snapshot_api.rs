//! Snapshots, rollback and clones through a real `cairn-volmgr` process
//! (one member on loopback), with the test playing the front ends: a
//! snapshot of an exported volume waits until every lease holder paused
//! (`export_watch` shows the pending snapshot, `snapshot_paused` answers
//! it, `export_watch` then shows the new head), a holder that never pauses
//! makes it fail naming that holder, a rollback is refused while exported
//! unless forced, and the garbage queries see what deletes left.

mod common;
use common::Member;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_proto::volmgr::{DataEpochs, VolmgrStatus};
use cairn_volmgr::client::VolmgrClient;

const CLUSTER: &str = "snapshot-api-test";
/// Leases last three of these.
const HEARTBEAT_MS: u64 = 400;
const WAIT: Duration = Duration::from_secs(5);

fn start() -> Member {
    common::start(
        CLUSTER,
        &[
            "--heartbeat-interval-ms",
            &HEARTBEAT_MS.to_string(),
            "--down-after-ms",
            "10000",
        ],
    )
}

fn client(member: &Member) -> Arc<VolmgrClient> {
    Arc::new(
        VolmgrClient::new(vec![member.addr.clone()], CLUSTER)
            .with_deadline(Duration::from_secs(20)),
    )
}

#[test]
fn snapshots_of_exported_volumes_wait_for_the_front_ends() {
    let member = start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let admin = client(&member);
        // The front ends' own clients: a long poll holds its client.
        let fe = client(&member);
        admin
            .register_node(1, "127.0.0.2:7000", "h1", "", "", 1, 1 << 40)
            .await
            .unwrap();
        let v = admin.create_volume("v", 1 << 30, 0, 1, 1).await.unwrap();
        assert_eq!((v.data_volume_id(), v.chain.len()), (v.id, 0));

        // Not exported: taken at once.
        let r = admin
            .create_snapshot("v", "s0", Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(r.pause_ms, 0);
        assert_eq!(
            (r.snapshot.name.as_str(), r.snapshot.epoch),
            ("s0", v.head_epoch)
        );
        assert_eq!(r.volume.chain, vec![v.head_epoch]);
        let s0 = r.snapshot;
        let head = r.volume.head_epoch;
        assert_eq!(admin.list_snapshots("v").await.unwrap(), vec![s0.clone()]);

        // Front end 7 exports it: the watch takes the lease and, with
        // nothing to report, answers after its wait.
        let t0 = Instant::now();
        let w = fe
            .export_watch(7, "v", head, 0, Duration::from_millis(300))
            .await
            .unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!((w.pending, w.volume.unwrap().head_epoch), (0, head));
        assert_eq!(admin.volume_exports("v").await.unwrap(), vec![7]);

        // A snapshot request registers a pending snapshot and waits.
        let a = admin.clone();
        let taking =
            tokio::spawn(async move { a.create_snapshot("v", "s1", Duration::ZERO).await });
        let w = fe.export_watch(7, "v", head, 0, WAIT).await.unwrap();
        let pending = w.pending;
        assert_ne!(pending, 0, "the watch shows the pending snapshot");
        assert_eq!(w.volume.unwrap().head_epoch, head, "not taken yet");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !taking.is_finished(),
            "the snapshot waits for the front end"
        );
        // The front end drained its writes: it says so, then waits.
        fe.snapshot_paused(7, "v", pending).await.unwrap();
        let w = fe.export_watch(7, "v", head, pending, WAIT).await.unwrap();
        assert_eq!(w.pending, 0, "the pending snapshot ended");
        let after = w.volume.unwrap();
        assert_ne!(after.head_epoch, head, "and the watch sees the new head");
        assert_eq!(after.chain.first(), Some(&head));
        let r = taking.await.unwrap().unwrap();
        assert_eq!((r.snapshot.name.as_str(), r.snapshot.epoch), ("s1", head));
        assert!(r.pause_ms > 100, "paused for {} ms", r.pause_ms);
        assert_eq!(r.volume.head_epoch, after.head_epoch);
        let head = after.head_epoch;
        // A pause for a snapshot no longer pending is refused.
        let e = fe.snapshot_paused(7, "v", pending).await.unwrap_err();
        assert_eq!(e.status(), Some(VolmgrStatus::FailedPrecondition), "{e}");

        // A request the state would refuse anyway pauses no one.
        let t0 = Instant::now();
        let e = admin
            .create_snapshot("v", "s0", Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(VolmgrStatus::AlreadyExists), "{e}");
        assert!(
            e.to_string().contains("\"v\"") && e.to_string().contains("s0"),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(1));
        let e = admin
            .create_snapshot("v", "bad name", Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(VolmgrStatus::InvalidArgument), "{e}");
        let e = admin
            .create_snapshot("nosuch", "s", Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(VolmgrStatus::NotFound), "{e}");

        // Front end 8 also exports it and never pauses: after the timeout
        // the request fails naming it, and nothing was taken.
        admin.register_export(8, "v").await.unwrap();
        fe.export_watch(7, "v", head, 0, Duration::ZERO)
            .await
            .unwrap();
        let a = admin.clone();
        let taking = tokio::spawn(async move {
            a.create_snapshot("v", "s2", Duration::from_millis(700))
                .await
        });
        let w = fe.export_watch(7, "v", head, 0, WAIT).await.unwrap();
        assert_ne!(w.pending, 0);
        fe.snapshot_paused(7, "v", w.pending).await.unwrap();
        let e = taking.await.unwrap().unwrap_err();
        assert_eq!(e.status(), Some(VolmgrStatus::FailedPrecondition), "{e}");
        let text = e.to_string();
        assert!(text.contains("[8]") && text.contains("700 ms"), "{text}");
        let w = fe
            .export_watch(7, "v", head, w.pending, WAIT)
            .await
            .unwrap();
        assert_eq!(
            (w.pending, w.volume.unwrap().head_epoch),
            (0, head),
            "given up"
        );
        assert!(admin
            .get_volume("v")
            .await
            .unwrap()
            .snapshot("s2")
            .is_none());

        // Front end 8 gives up its lease (its last client left) while a
        // snapshot waits for it: the snapshot stops waiting for it.
        admin.register_export(8, "v").await.unwrap();
        let a = admin.clone();
        let taking =
            tokio::spawn(
                async move { a.create_snapshot("v", "s3", Duration::from_secs(10)).await },
            );
        let w = fe.export_watch(7, "v", head, 0, WAIT).await.unwrap();
        assert_ne!(w.pending, 0);
        fe.snapshot_paused(7, "v", w.pending).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!taking.is_finished(), "still waits for front end 8");
        let t0 = Instant::now();
        // Through front end 8's own client (the admin's is busy waiting).
        client(&member).unregister_export(8, "v").await.unwrap();
        let r = taking.await.unwrap().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!(r.snapshot.name, "s3");
        let head = r.volume.head_epoch;
        fe.export_watch(7, "v", head, 0, Duration::ZERO)
            .await
            .unwrap();

        // Rollback: refused while exported, unless forced; forced, the
        // front ends pause (the kept head is crash-consistent).
        admin.register_export(8, "v").await.unwrap();
        let e = admin
            .rollback_volume("v", "s0", "", false)
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(VolmgrStatus::FailedPrecondition), "{e}");
        assert!(e.to_string().contains("roll back with --force"), "{e}");
        let a = admin.clone();
        let rolling = tokio::spawn(async move { a.rollback_volume("v", "s0", "", true).await });
        let (w7, w8) = tokio::join!(
            fe.export_watch(7, "v", head, 0, WAIT),
            // Front end 8 answers this time, through its own client.
            async {
                let fe8 = client(&member);
                let w = fe8.export_watch(8, "v", head, 0, WAIT).await.unwrap();
                fe8.snapshot_paused(8, "v", w.pending).await.unwrap();
                w
            }
        );
        let w7 = w7.unwrap();
        assert!(w7.pending != 0 && w7.pending == w8.pending);
        fe.snapshot_paused(7, "v", w7.pending).await.unwrap();
        let r = rolling.await.unwrap().unwrap();
        assert_eq!(r.snapshot.name, "before-rollback-s0-1");
        assert_eq!(r.snapshot.epoch, head, "the head before, kept");
        assert_eq!(r.volume.chain, vec![s0.epoch], "the volume reads s0 now");
        let w = fe.export_watch(7, "v", head, 0, WAIT).await.unwrap();
        assert_eq!(w.volume.unwrap().head_epoch, r.volume.head_epoch);

        // Clone, and what deletes leave for the collector.
        let c = admin.clone_volume("v", "s1", "c").await.unwrap();
        assert_eq!(c.snapshot.name, "s1");
        let c = c.volume;
        assert_eq!(
            (c.data_id, c.chain.clone()),
            (v.id, vec![s0.epoch + 1, s0.epoch])
        );
        assert_eq!(
            c.parent.map(|p| (p.volume_id, p.snapshot_id)),
            Some((v.id, 2))
        );
        assert_eq!(
            admin.epoch_chain(v.id, c.head_epoch).await.unwrap(),
            c.chain
        );
        let e = admin.epoch_chain(v.id, 9999).await.unwrap_err();
        assert_eq!(e.status(), Some(VolmgrStatus::NotFound), "{e}");
        assert_eq!(admin.dead_epochs(None).await.unwrap(), vec![]);
        let gone = admin.delete_snapshot("v", "s1").await.unwrap();
        assert_eq!(gone.name, "s1");
        let e = admin.delete_snapshot("v", "s1").await.unwrap_err();
        assert_eq!(e.status(), Some(VolmgrStatus::NotFound), "{e}");
        admin.delete_volume("v", true).await.unwrap();
        let dead = admin.dead_epochs(None).await.unwrap();
        let live: Vec<u64> = std::iter::once(c.head_epoch)
            .chain(c.chain.clone())
            .collect();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].data_id, v.id);
        assert!(!dead[0].epochs.is_empty());
        assert!(dead[0].epochs.iter().all(|e| !live.contains(e)), "{dead:?}");
        assert_eq!(admin.dead_epochs(Some(v.id)).await.unwrap(), dead);
        let e = admin.epochs_collected(v.id, &live).await.unwrap_err();
        assert_eq!(e.status(), Some(VolmgrStatus::FailedPrecondition), "{e}");
        admin.epochs_collected(v.id, &dead[0].epochs).await.unwrap();
        assert_eq!(
            admin.dead_epochs(None).await.unwrap(),
            Vec::<DataEpochs>::new()
        );
        // The clone still reads through its chain.
        assert_eq!(
            admin.epoch_chain(v.id, c.head_epoch).await.unwrap(),
            c.chain
        );
    });
}

/// One front end id, two processes: the later one supersedes the earlier
/// (a restarted target takes its leases over at once), and the earlier is
/// refused from then on, naming the mistake, so two targets configured with
/// one `target_id` cannot share its leases (a snapshot would wait for only
/// one of them). Requests without an instance (older targets) pass.
#[test]
fn a_front_end_id_belongs_to_its_newest_process() {
    let member = start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let admin = client(&member);
        admin
            .register_node(1, "127.0.0.2:7000", "h1", "", "", 1, 1 << 40)
            .await
            .unwrap();
        let v = admin.create_volume("v", 1 << 30, 0, 1, 1).await.unwrap();
        let process = |instance: u64| {
            VolmgrClient::new(vec![member.addr.clone()], CLUSTER)
                .with_deadline(Duration::from_secs(20))
                .with_front_end_instance(instance)
        };
        let (first, second) = (process(11), process(22));

        first.register_export(5, "v").await.unwrap();
        first
            .export_watch(5, "v", v.head_epoch, 0, Duration::ZERO)
            .await
            .unwrap();
        second.register_export(5, "v").await.unwrap();
        assert_eq!(admin.volume_exports("v").await.unwrap(), vec![5]);

        // The first process is refused, whatever it asks, with the reason.
        let err = first
            .export_watch(5, "v", v.head_epoch, 0, Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(VolmgrStatus::FailedPrecondition));
        assert!(err.to_string().contains("target_id"), "{err}");
        let err = first.register_export(5, "v").await.unwrap_err();
        assert_eq!(err.status(), Some(VolmgrStatus::FailedPrecondition));
        // Closing its export must not drop the lease the second holds.
        let err = first.unregister_export(5, "v").await.unwrap_err();
        assert_eq!(err.status(), Some(VolmgrStatus::FailedPrecondition));
        assert_eq!(admin.volume_exports("v").await.unwrap(), vec![5]);
        // Nor may it change the reservations the id's new process serves.
        let err = first.pr_set_as(5, "v", 0, vec![8, 1]).await.unwrap_err();
        assert_eq!(err.status(), Some(VolmgrStatus::FailedPrecondition));
        assert_eq!(admin.pr_get("v").await.unwrap().0, 0, "nothing stored");
        second
            .export_watch(5, "v", v.head_epoch, 0, Duration::ZERO)
            .await
            .unwrap();

        // The ids are apart: the first process may speak for another one,
        // and a request without an instance always passes.
        first.register_export(6, "v").await.unwrap();
        admin.register_export(5, "v").await.unwrap();
        second.unregister_export(5, "v").await.unwrap();
        assert_eq!(admin.volume_exports("v").await.unwrap(), vec![6]);
    });
}
