//! EXTENDED COPY, RECEIVE COPY RESULTS and ORWRITE.

use super::*;

/// This logical unit's NAA designator, from VPD 83h.
async fn naa(l: &Lun<MemExport>, n: &Nexus) -> Vec<u8> {
    let d = run(l, n, &[0x12, 1, 0x83, 0, 255, 0], &[]).await.data_in;
    assert_eq!(&d[4..8], &[0x01, 0x03, 0, 8]);
    d[8..16].to_vec()
}

fn target(naa: &[u8]) -> Vec<u8> {
    let mut t = vec![0xe4, 0, 0, 0, 0x01, 0x03, 0, naa.len() as u8];
    t.extend_from_slice(naa);
    t.resize(28, 0);
    t.extend_from_slice(&[0, 0, 0x02, 0x00]);
    t
}

fn segment(src: u16, dst: u16, blocks: u16, from: u64, to: u64) -> Vec<u8> {
    let mut s = vec![0x02, 0, 0, 0x18];
    s.extend_from_slice(&src.to_be_bytes());
    s.extend_from_slice(&dst.to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(&blocks.to_be_bytes());
    s.extend_from_slice(&from.to_be_bytes());
    s.extend_from_slice(&to.to_be_bytes());
    s
}

fn list(id: u8, usage: u8, targets: &[&[u8]], segments: &[&[u8]]) -> Vec<u8> {
    let t = targets.concat();
    let s = segments.concat();
    let mut p = vec![id, usage << 3];
    p.extend_from_slice(&(t.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&(s.len() as u32).to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&t);
    p.extend_from_slice(&s);
    p
}

fn xcopy(len: usize) -> Vec<u8> {
    let mut c = vec![0x83, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c.extend_from_slice(&(len as u32).to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

fn rcr(sa: u8, id: u8) -> Vec<u8> {
    let mut c = vec![0x84, sa, id, 0, 0, 0, 0, 0, 0, 0];
    c.extend_from_slice(&1024u32.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

#[tokio::test]
async fn extended_copy_copies_within_the_unit_and_holds_its_status() {
    let (_e, l) = unit(64 * MIB);
    let n = nexus("a");
    let id = naa(&l, &n).await;
    let data = pattern(2048 * 512, 5);
    good(&run(&l, &n, &rw16(0x8a, 0, 2048, 0), &data).await);
    // Two segments, the second overlapping its own destination.
    let p = list(
        7,
        0,
        &[&target(&id), &target(&id)],
        &[
            &segment(0, 1, 2048, 0, 100_000),
            &segment(1, 1, 100, 100_000, 100_050),
        ],
    );
    let r = run(&l, &n, &xcopy(p.len()), &p).await;
    good(&r);
    assert_eq!(r.data_out_wanted as usize, p.len());
    let back = run(&l, &n, &rw16(0x88, 100_000, 50, 0), &[]).await.data_in;
    assert_eq!(&back[..], &data[..50 * 512]);
    let back = run(&l, &n, &rw16(0x88, 100_050, 1998, 0), &[])
        .await
        .data_in;
    assert_eq!(&back[..100 * 512], &data[..100 * 512]);
    assert_eq!(&back[100 * 512..], &data[150 * 512..]);
    // The held status, once; another nexus has none.
    let r = run(&l, &nexus("b"), &rcr(0, 7), &[]).await;
    assert_eq!(sense_of(&r), (ILLEGAL, 0x24, 0));
    let d = run(&l, &n, &rcr(0, 7), &[]).await.data_in;
    assert_eq!(&d[..], &[0, 0, 0, 8, 0x01, 0, 2, 0, 0, 0x10, 0xc8, 0x00]);
    assert_eq!(sense_of(&run(&l, &n, &rcr(0, 7), &[]).await).1, 0x24);
    // Discarded (10b) and no list identifier (11b): nothing held.
    for (id, usage) in [(8, 2), (0, 3)] {
        let p = list(
            id,
            usage,
            &[&target(&id_of(&l, &n).await)],
            &[&segment(0, 0, 1, 0, 1)],
        );
        good(&run(&l, &n, &xcopy(p.len()), &p).await);
        assert_eq!(sense_of(&run(&l, &n, &rcr(0, id), &[]).await).1, 0x24);
    }
    // An empty parameter list does nothing.
    good(&run(&l, &n, &xcopy(0), &[]).await);
}

async fn id_of(l: &Lun<MemExport>, n: &Nexus) -> Vec<u8> {
    naa(l, n).await
}

#[tokio::test]
async fn extended_copy_refuses_bad_lists_before_copying() {
    let (_e, l) = unit(MIB); // 2048 blocks
    let n = nexus("a");
    let id = naa(&l, &n).await;
    let here = target(&id);
    let one = segment(0, 0, 8, 0, 100);
    let check = |p: Vec<u8>, want: (u8, u8, u8)| {
        let l = &l;
        let n = &n;
        async move {
            let r = run(l, n, &xcopy(p.len()), &p).await;
            assert_eq!(sense_of(&r), want, "{p:02x?}");
        }
    };
    let len_err = (ILLEGAL, 0x1a, 0);
    // Lists shorter than their header says, or than a header.
    let p = list(1, 0, &[&here[..]], &[&one[..]]);
    check(p[..p.len() - 1].to_vec(), len_err).await;
    check(p[..10].to_vec(), len_err).await;
    // Too many descriptors, or too long a list.
    check(
        list(1, 0, &[&here[..]; 5], &[&one[..]]),
        (ILLEGAL, 0x26, 0x06),
    )
    .await;
    check(
        list(1, 0, &[&here[..]], &[&one[..]; 17]),
        (ILLEGAL, 0x26, 0x08),
    )
    .await;
    check(list(1, 0, &[&here[..]; 5], &[&one[..]; 34]), len_err).await;
    // Unsupported descriptor types.
    let mut e0 = here.clone();
    e0[0] = 0xe0;
    check(list(1, 0, &[&e0], &[&one[..]]), (ILLEGAL, 0x26, 0x07)).await;
    let stream = vec![
        0x03, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    check(list(1, 0, &[&here[..]], &[&stream]), (ILLEGAL, 0x26, 0x09)).await;
    // Inline data, a reserved LIST ID USAGE.
    let mut p = list(1, 0, &[&here[..]], &[&one[..]]);
    p[15] = 4;
    p.extend_from_slice(&[0; 4]);
    check(p, (ILLEGAL, 0x26, 0x0b)).await;
    check(list(1, 1, &[&here[..]], &[&one[..]]), (ILLEGAL, 0x26, 0)).await;
    // A missing target, another logical unit, blocks past the end.
    check(
        list(1, 0, &[&here[..]], &[&segment(0, 1, 8, 0, 100)]),
        (0x0a, 0x08, 0x04),
    )
    .await;
    let mut other = id.clone();
    other[7] ^= 1;
    let p = list(
        1,
        0,
        &[&here[..], &target(&other)],
        &[&segment(0, 1, 8, 0, 100)],
    );
    check(p, (0x0a, 0x0d, 0x02)).await;
    check(
        list(1, 0, &[&here[..]], &[&segment(0, 0, 8, 0, 2041)]),
        (0x0a, 0, 0),
    )
    .await;
    // A copy within a read-only export.
    let ro = Lun::new(MemExport::new("ro", MIB, true), 0);
    let p = list(1, 0, &[&here[..]], &[&one[..]]);
    let r = run(&ro, &n, &xcopy(p.len()), &p).await;
    assert_eq!(sense_of(&r), (sense::KEY_DATA_PROTECT, 0x27, 0));
    // Reservations: another nexus holding RESERVE(6).
    good(&run(&l, &nexus("b"), &[0x16, 0, 0, 0, 0, 0], &[]).await);
    let p = list(1, 0, &[&here[..]], &[&one[..]]);
    assert_eq!(
        run(&l, &n, &xcopy(p.len()), &p).await.status,
        RESERVATION_CONFLICT
    );
}

#[tokio::test]
async fn receive_copy_results_reports_operating_parameters() {
    let (_e, l) = unit(MIB);
    let n = nexus("a");
    let r = run(&l, &n, &rcr(3, 0), &[]).await;
    good(&r);
    let d = &r.data_in;
    assert_eq!(d.len(), 46);
    assert_eq!(u32::from_be_bytes(d[0..4].try_into().unwrap()), 42);
    assert_eq!(&d[8..12], &[0, 4, 0, 16]);
    assert_eq!(u32::from_be_bytes(d[12..16].try_into().unwrap()), 1024);
    assert_eq!(&d[43..46], &[2, 0x02, 0xe4]);
    // Unsupported service actions.
    assert_eq!(
        sense_of(&run(&l, &n, &rcr(1, 0), &[]).await),
        (ILLEGAL, 0x24, 0)
    );
    // 3PC in the standard INQUIRY data.
    let inq = run(&l, &n, &[0x12, 0, 0, 0, 36, 0], &[]).await.data_in;
    assert_eq!(inq[5] & 0x08, 0x08);
}

fn orwrite(lba: u64, n: u32, flags: u8) -> Vec<u8> {
    rw16(0x8b, lba, n, flags)
}

#[tokio::test]
async fn orwrite_ors_into_the_blocks() {
    let (_e, l) = unit(MIB);
    let n = nexus("a");
    good(&run(&l, &n, &rw10(0x2a, 10, 4, 0), &[0x0f; 2048]).await);
    let r = run(&l, &n, &orwrite(10, 4, 0x08), &[0xa0; 2048]).await;
    good(&r);
    assert_eq!(r.data_out_wanted, 2048);
    let back = run(&l, &n, &rw10(0x28, 10, 4, 0), &[]).await.data_in;
    assert_eq!(&back[..], &[0xaf; 2048][..]);
    // Zero blocks, range checks, ORPROTECT, read-only.
    good(&run(&l, &n, &orwrite(0, 0, 0), &[]).await);
    let oob = (ILLEGAL, 0x21, 0);
    assert_eq!(sense_of(&run(&l, &n, &orwrite(2049, 0, 0), &[]).await), oob);
    assert_eq!(
        sense_of(&run(&l, &n, &orwrite(2047, 2, 0), &[0; 1024]).await),
        oob
    );
    assert_eq!(
        sense_of(&run(&l, &n, &orwrite(u64::MAX, 1, 0), &[0; 512]).await),
        oob
    );
    for p in 1..8u8 {
        let r = run(&l, &n, &orwrite(0, 1, p << 5), &[0; 512]).await;
        assert_eq!(sense_of(&r), (ILLEGAL, 0x24, 0));
    }
    let ro = Lun::new(MemExport::new("ro", MIB, true), 0);
    let r = run(&ro, &n, &orwrite(0, 1, 0), &[0; 512]).await;
    assert_eq!(sense_of(&r), (sense::KEY_DATA_PROTECT, 0x27, 0));
    good(&run(&l, &nexus("b"), &[0x16, 0, 0, 0, 0, 0], &[]).await);
    let r = run(&l, &n, &orwrite(0, 1, 0), &[0; 512]).await;
    assert_eq!(r.status, RESERVATION_CONFLICT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orwrites_lose_no_bits() {
    let (_e, l) = unit(MIB);
    let l = Arc::new(l);
    let mut tasks = Vec::new();
    for bit in 0..8u8 {
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            let n = nexus(&format!("t{bit}"));
            run(&l, &n, &orwrite(0, 1, 0), &[1 << bit; 512]).await
        }));
    }
    for t in tasks {
        good(&t.await.unwrap());
    }
    let back = run(&l, &nexus("a"), &rw10(0x28, 0, 1, 0), &[])
        .await
        .data_in;
    assert_eq!(&back[..], &[0xff; 512][..]);
}

#[tokio::test]
async fn report_supported_opcodes_one_command_points_at_the_options() {
    let (_e, l) = unit(MIB);
    let n = nexus("a");
    // SANITIZE has service actions: option 1 is refused with a field
    // pointer to byte 2 (not "not implemented"), option 2 describes it.
    let r = run(
        &l,
        &n,
        &[0xa3, 0x0c, 0x01, 0x48, 0, 0, 0, 0, 1, 0, 0, 0],
        &[],
    )
    .await;
    assert_eq!(sense_of(&r), (ILLEGAL, 0x24, 0));
    assert_eq!(&r.sense.as_ref().unwrap()[15..18], &[0xca, 0, 2]);
    let r = run(
        &l,
        &n,
        &[0xa3, 0x0c, 0x02, 0x48, 0, 0x02, 0, 0, 1, 0, 0, 0],
        &[],
    )
    .await;
    good(&r);
    assert_eq!(&r.data_in[..6], &[0, 0x03, 0, 10, 0x48, 0xbf]);
    let r = run(
        &l,
        &n,
        &[0xa3, 0x0c, 0x01, 0x8b, 0, 0, 0, 0, 1, 0, 0, 0],
        &[],
    )
    .await;
    assert_eq!(&r.data_in[..6], &[0, 0x03, 0, 16, 0x8b, 0x18]);
}
