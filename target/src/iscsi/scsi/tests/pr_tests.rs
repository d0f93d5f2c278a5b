//! Persistent reservations through `Lun::execute`, with two nexuses.

use super::*;

async fn prout<S: PrStore>(
    l: &Lun<MemExport, S>,
    n: &Nexus,
    sa: u8,
    kind: u8,
    key: u64,
    sa_key: u64,
) -> Reply {
    let mut p = [0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    run(l, n, &[0x5f, sa, kind, 0, 0, 0, 0, 0, 24, 0], &p).await
}

async fn prin(l: &Lun<MemExport>, n: &Nexus, sa: u8, alloc: u16) -> Reply {
    let a = alloc.to_be_bytes();
    run(l, n, &[0x5e, sa, 0, 0, 0, 0, 0, a[0], a[1], 0], &[]).await
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

async fn keys(l: &Lun<MemExport>, n: &Nexus) -> (u32, Vec<u64>) {
    let r = prin(l, n, 0, 4096).await;
    good(&r);
    assert!(r.data_in.len() >= 8, "{r:?}");
    let d = &r.data_in;
    let keys = (0..u32_at(d, 4) as usize / 8)
        .map(|i| u64_at(d, 8 + 8 * i))
        .collect();
    (u32_at(d, 0), keys)
}

async fn can_read(l: &Lun<MemExport>, n: &Nexus) -> bool {
    match run(l, n, &rw10(0x28, 1, 1, 0), &[]).await.status {
        GOOD => true,
        RESERVATION_CONFLICT => false,
        s => panic!("status {s:#x}"),
    }
}

async fn can_write(l: &Lun<MemExport>, n: &Nexus) -> bool {
    match run(l, n, &rw10(0x2a, 1, 1, 0), &[5; 512]).await.status {
        GOOD => true,
        RESERVATION_CONFLICT => false,
        s => panic!("status {s:#x}"),
    }
}

#[tokio::test]
async fn register_reregister_and_unregister() {
    let (_e, l) = unit(MIB);
    let a = nexus("a");
    good(&prout(&l, &a, pr::REGISTER_AND_IGNORE_EXISTING_KEY, 0, 0, 0xabc).await);
    assert_eq!(keys(&l, &a).await, (1, vec![0xabc]));
    // Registered: REGISTER must give the current key.
    assert_eq!(
        prout(&l, &a, pr::REGISTER, 0, 0, 0xabd).await.status,
        RESERVATION_CONFLICT
    );
    good(&prout(&l, &a, pr::REGISTER, 0, 0xabc, 0xdef).await);
    assert_eq!(keys(&l, &a).await, (2, vec![0xdef]));
    good(&prout(&l, &a, pr::REGISTER, 0, 0xdef, 0).await);
    assert_eq!(keys(&l, &a).await, (3, vec![]));
    // Unregistered with a key: conflict; with key 0 and SARK 0: no-op.
    assert_eq!(
        prout(&l, &a, pr::REGISTER, 0, 5, 6).await.status,
        RESERVATION_CONFLICT
    );
    good(&prout(&l, &a, pr::REGISTER, 0, 0, 0).await);
    assert_eq!(keys(&l, &a).await.0, 3);
    // RESERVE without registering.
    assert_eq!(
        prout(&l, &a, pr::RESERVE, 1, 0, 0).await.status,
        RESERVATION_CONFLICT
    );
    // Parameter list length other than 24; SPEC_I_PT; unknown actions.
    let r = run(&l, &a, &[0x5f, 0, 0, 0, 0, 0, 0, 0, 20, 0], &[0; 20]).await;
    assert_eq!(sense_of(&r), (ILLEGAL, 0x1a, 0));
    let mut p = [0u8; 24];
    p[15] = 1;
    p[20] = 0x08;
    let r = run(&l, &a, &[0x5f, 0, 0, 0, 0, 0, 0, 0, 24, 0], &p).await;
    assert_eq!(sense_of(&r), (ILLEGAL, 0x26, 0));
    assert_eq!(
        sense_of(&prout(&l, &a, 7, 0, 0, 1).await),
        (ILLEGAL, 0x24, 0)
    );
    for sa in 4..0x20 {
        assert_eq!(sense_of(&prin(&l, &a, sa, 100).await), (ILLEGAL, 0x24, 0));
    }
}

#[tokio::test]
async fn each_reservation_type_grants_the_access_spc4_lists() {
    // (type, registered reads, registered writes, others read, others write)
    let table = [
        (pr::EXCLUSIVE_ACCESS, false, false, false, false),
        (pr::WRITE_EXCLUSIVE, true, false, true, false),
        (
            pr::EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
            true,
            true,
            false,
            false,
        ),
        (
            pr::WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
            true,
            true,
            true,
            false,
        ),
        (
            pr::EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
            true,
            true,
            false,
            false,
        ),
        (pr::WRITE_EXCLUSIVE_ALL_REGISTRANTS, true, true, true, false),
    ];
    for (kind, rr, rw, ur, uw) in table {
        let (_e, l) = unit(MIB);
        let (a, b) = (nexus("a"), nexus("b"));
        good(&prout(&l, &a, pr::REGISTER, 0, 0, 1).await);
        good(&prout(&l, &b, pr::REGISTER, 0, 0, 2).await);
        good(&prout(&l, &a, pr::RESERVE, kind, 1, 0).await);
        // Reserving again with the same type is fine, another is not.
        good(&prout(&l, &a, pr::RESERVE, kind, 1, 0).await);
        let other = if kind == 1 { 3 } else { 1 };
        assert_eq!(
            prout(&l, &a, pr::RESERVE, other, 1, 0).await.status,
            RESERVATION_CONFLICT
        );
        let rr_ = prin(&l, &b, 1, 100).await.data_in;
        assert_eq!(u32_at(&rr_, 4), 16);
        let all = kind >= 7;
        assert_eq!(u64_at(&rr_, 8), if all { 0 } else { 1 });
        assert_eq!(rr_[21], kind);
        assert!(can_read(&l, &a).await && can_write(&l, &a).await);
        assert_eq!(
            (can_read(&l, &b).await, can_write(&l, &b).await),
            (rr, rw),
            "type {kind}"
        );
        good(&prout(&l, &b, pr::REGISTER, 0, 2, 0).await);
        assert_eq!(
            (can_read(&l, &b).await, can_write(&l, &b).await),
            (ur, uw),
            "type {kind}"
        );
        // Always allowed: INQUIRY, TEST UNIT READY, READ CAPACITY, PR IN.
        good(&run(&l, &b, &[0x12, 0, 0, 0, 36, 0], &[]).await);
        good(&run(&l, &b, &[0; 6], &[]).await);
        good(&run(&l, &b, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await);
        // RESERVE (6) conflicts with a persistent reservation.
        let r6 = run(&l, &b, &[0x16, 0, 0, 0, 0, 0], &[]).await;
        assert_eq!(r6.status, RESERVATION_CONFLICT);
        // RELEASE with the wrong type; then the right one.
        let r = prout(&l, &a, pr::RELEASE, other, 1, 0).await;
        assert_eq!(sense_of(&r), (ILLEGAL, 0x26, 0x04));
        good(&prout(&l, &a, pr::RELEASE, kind, 1, 0).await);
        assert_eq!(u32_at(&prin(&l, &a, 1, 100).await.data_in, 4), 0);
        assert!(can_write(&l, &b).await);
    }
}

#[tokio::test]
async fn the_holder_unregistering_releases_all_but_all_registrants_types() {
    for kind in [1u8, 3, 5, 6, 7, 8] {
        let (_e, l) = unit(MIB);
        let (a, b) = (nexus("a"), nexus("b"));
        good(&prout(&l, &a, pr::REGISTER, 0, 0, 1).await);
        good(&prout(&l, &b, pr::REGISTER, 0, 0, 2).await);
        good(&prout(&l, &a, pr::RESERVE, kind, 1, 0).await);
        good(&prout(&l, &a, pr::REGISTER, 0, 1, 0).await);
        let reserved = u32_at(&prin(&l, &a, 1, 100).await.data_in, 4) != 0;
        assert_eq!(reserved, kind >= 7, "type {kind}");
        // Registrants only: the others learn the reservation went.
        let ua = run(&l, &b, &[0; 6], &[]).await;
        if kind == 5 || kind == 6 {
            assert_eq!(sense_of(&ua), (sense::KEY_UNIT_ATTENTION, 0x2a, 0x04));
        } else {
            good(&ua);
        }
        if kind >= 7 {
            good(&prout(&l, &b, pr::RELEASE, kind, 2, 0).await);
        }
        good(&prout(&l, &b, pr::REGISTER, 0, 2, 0).await);
        assert_eq!(keys(&l, &a).await.1, Vec::<u64>::new());
    }
}

#[tokio::test]
async fn preempt_and_clear() {
    let (_e, l) = unit(MIB);
    let (a, b) = (nexus("a"), nexus("b"));
    good(&prout(&l, &a, pr::REGISTER, 0, 0, 0x1a).await);
    good(&prout(&l, &b, pr::REGISTER, 0, 0, 0x2b).await);
    let (generation, _) = keys(&l, &a).await;
    // No reservation: PREEMPT removes the other registration.
    good(&prout(&l, &b, pr::PREEMPT, pr::EXCLUSIVE_ACCESS, 0x2b, 0x1a).await);
    assert_eq!(keys(&l, &b).await, (generation + 1, vec![0x2b]));
    let ua = run(&l, &a, &[0; 6], &[]).await;
    assert_eq!(sense_of(&ua), (sense::KEY_UNIT_ATTENTION, 0x2a, 0x05));
    good(&run(&l, &a, &[0; 6], &[]).await);
    good(&run(&l, &b, &[0; 6], &[]).await);
    // A key nobody has: conflict; key 0 without a reservation: invalid.
    assert_eq!(
        prout(&l, &b, pr::PREEMPT, 3, 0x2b, 0x99).await.status,
        RESERVATION_CONFLICT
    );
    assert_eq!(
        sense_of(&prout(&l, &b, pr::PREEMPT, 3, 0x2b, 0).await),
        (ILLEGAL, 0x26, 0)
    );
    // Preempting the holder takes its reservation, with the new type.
    good(&prout(&l, &a, pr::REGISTER, 0, 0, 0x1a).await);
    good(&prout(&l, &a, pr::RESERVE, pr::EXCLUSIVE_ACCESS, 0x1a, 0).await);
    assert!(!can_read(&l, &b).await);
    good(
        &prout(
            &l,
            &b,
            pr::PREEMPT_AND_ABORT,
            pr::WRITE_EXCLUSIVE,
            0x2b,
            0x1a,
        )
        .await,
    );
    let rr = prin(&l, &b, 1, 100).await.data_in;
    assert_eq!((u64_at(&rr, 8), rr[21]), (0x2b, pr::WRITE_EXCLUSIVE));
    assert_eq!(sense_of(&run(&l, &a, &[0; 6], &[]).await).2, 0x05);
    assert!(can_read(&l, &a).await && !can_write(&l, &a).await);
    assert!(can_write(&l, &b).await);
    // CLEAR: everything goes, the others are told.
    good(&prout(&l, &a, pr::REGISTER, 0, 0, 0x1a).await);
    let (generation, _) = keys(&l, &a).await;
    good(&prout(&l, &b, pr::CLEAR, 0, 0x2b, 0).await);
    assert_eq!(keys(&l, &b).await, (generation + 1, vec![]));
    assert_eq!(
        sense_of(&run(&l, &a, &[0; 6], &[]).await),
        (sense::KEY_UNIT_ATTENTION, 0x2a, 0x03)
    );
    assert!(can_write(&l, &a).await);
}

#[tokio::test]
async fn persistent_reserve_in_reports() {
    let (_e, l) = unit(MIB);
    let (a, b) = (nexus("a"), nexus("b"));
    good(&prout(&l, &a, pr::REGISTER, 0, 0, 0x77).await);
    good(&prout(&l, &b, pr::REGISTER, 0, 0, 0x88).await);
    good(&prout(&l, &a, pr::RESERVE, pr::WRITE_EXCLUSIVE, 0x77, 0).await);
    // READ KEYS cut to 8 bytes keeps the full ADDITIONAL LENGTH.
    let short = prin(&l, &a, 0, 8).await.data_in;
    assert_eq!(&short[..], &[0, 0, 0, 2, 0, 0, 0, 16]);
    let caps = prin(&l, &a, 2, 100).await.data_in;
    assert_eq!(&caps[..], &[0, 8, 0x15, 0x90, 0xea, 0x01, 0, 0]);
    let full = prin(&l, &a, 3, 4096).await.data_in;
    assert_eq!(u32_at(&full, 0), 2);
    let body = u32_at(&full, 4) as usize;
    assert_eq!(full.len(), 8 + body);
    let first = &full[8..];
    assert_eq!(u64_at(first, 0), 0x77);
    assert_eq!((first[12], first[13]), (0x01, pr::WRITE_EXCLUSIVE));
    assert_eq!(&first[18..20], &[0, 1]);
    let tid_len = u32_at(first, 20) as usize;
    let tid = &first[24..24 + tid_len];
    assert_eq!(tid[0], 0x45);
    assert_eq!(tid_len % 4, 0);
    assert!(tid[4..].starts_with(a.initiator.as_bytes()));
    let second = &full[8 + 24 + tid_len..];
    assert_eq!((u64_at(second, 0), second[12]), (0x88, 0));
}

#[tokio::test]
async fn state_is_saved_and_loaded_through_the_store() {
    let e = MemExport::new("vol", MIB, false);
    let store = pr::MemPrStore::default();
    let mut seeded = PrState::default();
    seeded.registrations.push(pr::Registration {
        initiator: nexus("a").initiator,
        target_port: nexus("a").target_port,
        all_target_ports: false,
        key: 0x42,
        relative_port: 1,
    });
    seeded.generation = 9;
    store.save(&seeded).await.unwrap();
    let l = Lun::with_store(e, 0, store);
    let r = prin_any(&l, &nexus("b")).await;
    assert_eq!(
        &r[..16],
        &[0, 0, 0, 9, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0x42]
    );
}

async fn prin_any<S: PrStore>(l: &Lun<MemExport, S>, n: &Nexus) -> Vec<u8> {
    let c = [0x5e, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
    l.execute(Request {
        cdb: &c,
        data_out: Bytes::new(),
        expected_len: 256,
        read: true,
        write: false,
        nexus: n,
    })
    .await
    .data_in
    .to_vec()
}

/// A session's task set that records the aborts it is asked for.
#[derive(Default)]
struct Recorder(Mutex<Vec<u64>>);

impl TaskSet for Recorder {
    fn abort_lun_tasks(&self, lun: u64) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.0.lock().unwrap().push(lun);
        Box::pin(async {})
    }
}

#[tokio::test]
async fn preempt_and_abort_aborts_the_preempted_nexus_tasks_only() {
    let (_e, l) = unit(MIB);
    let (a, b, c) = (nexus("a"), nexus("b"), nexus("c"));
    let sets: Vec<Arc<Recorder>> = (0..3).map(|_| Arc::new(Recorder::default())).collect();
    for (n, set, lun) in [(&a, &sets[0], 0), (&b, &sets[1], 4), (&c, &sets[2], 0)] {
        let weak = Arc::downgrade(set);
        l.attach(n, lun, weak as Weak<dyn TaskSet>);
    }
    good(&prout(&l, &a, pr::REGISTER, 0, 0, 0xa).await);
    good(&prout(&l, &b, pr::REGISTER, 0, 0, 0xb).await);
    good(&prout(&l, &c, pr::REGISTER, 0, 0, 0xc).await);
    good(&prout(&l, &b, pr::RESERVE, pr::WRITE_EXCLUSIVE, 0xb, 0).await);
    // A plain PREEMPT aborts nothing.
    good(&prout(&l, &a, pr::PREEMPT, pr::WRITE_EXCLUSIVE, 0xa, 0xc).await);
    assert!(sets.iter().all(|s| s.0.lock().unwrap().is_empty()));
    // PREEMPT AND ABORT of b's key: b's tasks, at b's number for the unit.
    good(&prout(&l, &a, pr::PREEMPT_AND_ABORT, pr::WRITE_EXCLUSIVE, 0xa, 0xb).await);
    assert_eq!(*sets[1].0.lock().unwrap(), vec![4]);
    assert!(sets[0].0.lock().unwrap().is_empty());
    assert!(sets[2].0.lock().unwrap().is_empty());
    // A detached session is not reached; LOGICAL UNIT RESET's reach
    // is every other nexus.
    let weak: Weak<dyn TaskSet> = Arc::downgrade(&sets[1]) as Weak<dyn TaskSet>;
    l.detach(&weak);
    l.abort_other_nexuses(&a).await;
    assert_eq!(*sets[1].0.lock().unwrap(), vec![4]);
    assert_eq!(*sets[2].0.lock().unwrap(), vec![0]);
    assert!(sets[0].0.lock().unwrap().is_empty());
}

/// A shared store whose contact this test cuts and restores.
#[derive(Default)]
struct Cut {
    inner: pr::MemPrStore,
    lapsed: AtomicBool,
}

impl PrStore for Cut {
    async fn load(&self) -> Result<Option<PrState>, String> {
        self.inner.load().await
    }
    async fn save(&self, state: &PrState) -> Result<(), pr::SaveError> {
        self.inner.save(state).await
    }
    async fn lapsed(&self) -> bool {
        self.lapsed.load(Ordering::SeqCst)
    }
}

/// Cut off from the shared store (its export lease lapsed), a unit whose
/// reservations were ever used refuses what they govern, reads and writes
/// and PR commands, with TARGET PORT IN UNAVAILABLE STATE (so multipath
/// tries another target), and serves again once contact is back; commands
/// no reservation governs keep working. A unit whose reservations were
/// never used keeps serving.
#[tokio::test]
async fn a_unit_cut_off_from_its_reservations_refuses_what_they_govern() {
    let unavailable = (sense::KEY_NOT_READY, 0x04, 0x0c);
    let (n, m) = (nexus("a"), nexus("b"));
    let never_used = Lun::with_store(MemExport::new("vol", MIB, false), 0, Cut::default());
    never_used.store.lapsed.store(true, Ordering::SeqCst);
    good(&run(&never_used, &n, &rw10(0x2a, 1, 1, 0), &[5; 512]).await);

    let l = Lun::with_store(MemExport::new("vol", MIB, false), 0, Cut::default());
    good(&prout(&l, &n, 0, 0, 0, 0xabc).await); // REGISTER
    good(&run(&l, &m, &rw10(0x2a, 1, 1, 0), &[5; 512]).await);

    l.store.lapsed.store(true, Ordering::SeqCst);
    for (who, cdb, data) in [
        (&m, rw10(0x2a, 1, 1, 0), vec![5; 512]),
        (&n, rw10(0x28, 1, 1, 0), vec![]),
        (&n, vec![0x5e, 0, 0, 0, 0, 0, 0, 1, 0, 0], vec![]),
    ] {
        assert_eq!(sense_of(&run(&l, who, &cdb, &data).await), unavailable);
    }
    good(&run(&l, &m, &[0; 6], &[]).await); // TEST UNIT READY
    good(&run(&l, &m, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await); // READ CAPACITY

    l.store.lapsed.store(false, Ordering::SeqCst);
    good(&run(&l, &m, &rw10(0x2a, 1, 1, 0), &[5; 512]).await);
}

/// A store shared by several units, as the volume manager is by several
/// targets: it refuses a change made on a stale state and tells a unit
/// when its state is stale.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Option<PrState>>>);

impl PrStore for Shared {
    async fn load(&self) -> Result<Option<PrState>, String> {
        Ok(self.0.lock().unwrap().clone())
    }
    async fn save(&self, state: &PrState) -> Result<(), pr::SaveError> {
        let mut saved = self.0.lock().unwrap();
        if state.version != saved.as_ref().map_or(0, |s| s.version) + 1 {
            return Err(pr::SaveError::Stale);
        }
        *saved = Some(state.clone());
        Ok(())
    }
    fn stale(&self, version: u64) -> bool {
        self.0
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|s| s.version > version)
    }
}

/// PREEMPT AND ABORT through one target reaches the preempted nexuses'
/// tasks on another: that target's unit aborts them when it refreshes its
/// reservations (which its export does before reporting the new state to
/// the volume manager, which answers the PREEMPT AND ABORT only then).
/// Once, only for the preempted nexus, never for the issuer or for a plain
/// PREEMPT, and not by a unit that first sees the state afterwards.
#[tokio::test]
async fn preempt_and_abort_reaches_the_preempted_nexus_tasks_on_other_units() {
    let store = Shared::default();
    let e = MemExport::new("vol", MIB, false);
    let one = Lun::with_store(e.clone(), 0, store.clone());
    let two = Lun::with_store(e.clone(), 0, store.clone());
    let (a, b, c) = (nexus("a"), nexus("b"), nexus("c"));
    let sets: Vec<Arc<Recorder>> = (0..4).map(|_| Arc::new(Recorder::default())).collect();
    let weak = |i: usize| Arc::downgrade(&sets[i]) as Weak<dyn TaskSet>;
    one.attach(&a, 0, weak(0));
    two.attach(&a, 5, weak(3)); // the issuer reaches the other target too
    two.attach(&b, 3, weak(1));
    two.attach(&c, 0, weak(2));
    let aborts = || -> Vec<Vec<u64>> { sets.iter().map(|s| s.0.lock().unwrap().clone()).collect() };
    let none: Vec<Vec<u64>> = vec![vec![]; 4];

    good(&prout(&one, &a, pr::REGISTER, 0, 0, 0xa).await);
    good(&prout(&two, &b, pr::REGISTER, 0, 0, 0xb).await);
    good(&prout(&two, &c, pr::REGISTER, 0, 0, 0xc).await);
    good(&prout(&two, &b, pr::RESERVE, pr::WRITE_EXCLUSIVE, 0xb, 0).await);
    two.refresh_reservations().await;
    // A plain PREEMPT aborts nothing anywhere.
    good(&prout(&one, &a, pr::PREEMPT, pr::WRITE_EXCLUSIVE, 0xa, 0xc).await);
    two.refresh_reservations().await;
    assert_eq!(aborts(), none);

    good(
        &prout(
            &one,
            &a,
            pr::PREEMPT_AND_ABORT,
            pr::WRITE_EXCLUSIVE,
            0xa,
            0xb,
        )
        .await,
    );
    assert_eq!(aborts(), none, "unit two has not refreshed yet");
    two.refresh_reservations().await;
    assert_eq!(aborts(), vec![vec![], vec![3], vec![], vec![]]);
    two.refresh_reservations().await;
    one.refresh_reservations().await;
    assert_eq!(aborts(), vec![vec![], vec![3], vec![], vec![]], "once");

    // A unit that first sees the state now has nothing to repeat.
    let three = Lun::with_store(e, 0, store.clone());
    let late = Arc::new(Recorder::default());
    three.attach(&b, 1, Arc::downgrade(&late) as Weak<dyn TaskSet>);
    three.refresh_reservations().await;
    assert!(late.0.lock().unwrap().is_empty());
    // The preempted nexus is no longer registered: RESERVATION CONFLICT
    // for its writes everywhere.
    let r = run(&two, &b, &rw10(0x2a, 1, 1, 0), &[5; 512]).await;
    assert_eq!(r.status, 0x18, "RESERVATION CONFLICT");
}
