//! Unit tests: every command family against a memory export, the sense
//! for bad input, random CDBs, COMPARE AND WRITE atomicity, reservations
//! (persistent and SPC-2) with two nexuses.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::pr::{PrState, PrStore};
use super::*;
use crate::backend::{ExportInfo, Extents, IoError};
use crate::nbd::memory::MemExport;

mod copy_tests;
mod info_tests;
mod pr_tests;
mod sanitize_tests;

pub(super) const MIB: u64 = 1 << 20;

pub(super) fn nexus(name: &str) -> Nexus {
    Nexus {
        initiator: format!("iqn.2026-01.test:{name},i,0x23d000000001"),
        target_port: "iqn.2026-12.io.cairn:vol,t,0x0001".into(),
        relative_port: 1,
    }
}

pub(super) fn unit(size: u64) -> (Arc<MemExport>, Lun<MemExport>) {
    let e = MemExport::new("vol", size, false);
    let l = Lun::new(e.clone(), 0);
    (e, l)
}

/// Runs `cdb` (zero padded to 16 bytes) with `data` as Data-Out.
pub(super) async fn run<B: Backend, S: PrStore>(
    l: &Lun<B, S>,
    n: &Nexus,
    cdb: &[u8],
    data: &[u8],
) -> Reply {
    let mut c = cdb.to_vec();
    c.resize(c.len().max(16), 0);
    let wanted = Lun::<B, S>::data_out_len(&c).unwrap_or(0);
    l.execute(Request {
        cdb: &c,
        data_out: Bytes::copy_from_slice(data),
        expected_len: if data.is_empty() {
            wanted
        } else {
            data.len() as u32
        },
        read: true,
        write: !data.is_empty(),
        nexus: n,
    })
    .await
}

/// (sense key, ASC, ASCQ) of a CHECK CONDITION.
pub(super) fn sense_of(r: &Reply) -> (u8, u8, u8) {
    assert_eq!(r.status, CHECK_CONDITION, "{r:?}");
    let s = r.sense.as_ref().expect("sense data");
    assert_eq!(s.len(), 18);
    assert_eq!(s[0] & 0x7f, 0x70);
    (s[2] & 0x0f, s[12], s[13])
}

pub(super) fn good(r: &Reply) {
    assert_eq!(r.status, GOOD, "{r:?}");
    assert!(r.sense.is_none());
}

pub(super) fn rw10(op: u8, lba: u32, n: u16, flags: u8) -> Vec<u8> {
    let mut c = vec![op, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&n.to_be_bytes());
    c.push(0);
    c
}

pub(super) fn rw16(op: u8, lba: u64, n: u32, flags: u8) -> Vec<u8> {
    let mut c = vec![op, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&n.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

pub(super) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub(super) const ILLEGAL: u8 = sense::KEY_ILLEGAL_REQUEST;

#[tokio::test]
async fn reads_and_writes_of_every_size_round_trip() {
    let (_e, l) = unit(64 * MIB);
    let n = nexus("a");
    let data = pattern(8 * 512, 7);
    for (op, flags) in [(0x2a, 0x00), (0x2a, 0x18), (0x2e, 0x02)] {
        let r = run(&l, &n, &rw10(op, 100, 8, flags), &data).await;
        good(&r);
        assert_eq!(r.data_out_wanted, 4096);
        assert_eq!(
            run(&l, &n, &rw10(0x28, 100, 8, 0x18), &[]).await.data_in,
            data
        );
    }
    let d16 = pattern(3 * 512, 9);
    good(&run(&l, &n, &rw16(0x8a, 131069, 3, 0x08), &d16).await);
    assert_eq!(
        run(&l, &n, &rw16(0x88, 131069, 3, 0), &[]).await.data_in,
        d16
    );
    let mut c12 = vec![0xaa, 0, 0, 0, 0, 9, 0, 0, 0, 1, 0, 0];
    good(&run(&l, &n, &c12, &d16[..512]).await);
    c12[0] = 0xa8;
    assert_eq!(run(&l, &n, &c12, &[]).await.data_in, &d16[..512]);
    // READ (6) / WRITE (6): a length of 0 means 256 blocks.
    let big = pattern(256 * 512, 3);
    let r = run(&l, &n, &[0x0a, 0, 0, 16, 0, 0], &big).await;
    good(&r);
    assert_eq!(r.data_out_wanted, 256 * 512);
    assert_eq!(run(&l, &n, &[0x08, 0, 0, 16, 0, 0], &[]).await.data_in, big);
    // Zero blocks: nothing, GOOD.
    good(&run(&l, &n, &rw10(0x2a, 0, 0, 0), &[]).await);
    assert!(run(&l, &n, &rw10(0x28, 0, 0, 0), &[])
        .await
        .data_in
        .is_empty());
}

#[tokio::test]
async fn bad_lbas_lengths_and_fields_get_the_right_sense() {
    let (_e, l) = unit(MIB); // 2048 blocks
    let n = nexus("a");
    let oob = (ILLEGAL, 0x21, 0);
    let field = (ILLEGAL, 0x24, 0);
    for op in [0x28u8, 0x2f, 0x34] {
        assert_eq!(
            sense_of(&run(&l, &n, &rw10(op, 2047, 2, 0), &[]).await),
            oob
        );
        assert_eq!(
            sense_of(&run(&l, &n, &rw10(op, 2049, 0, 0), &[]).await),
            oob
        );
        assert_eq!(
            sense_of(&run(&l, &n, &rw10(op, u32::MAX, 1, 0), &[]).await),
            oob
        );
        good(&run(&l, &n, &rw10(op, 2047, 1, 0), &[]).await);
    }
    assert_eq!(
        sense_of(&run(&l, &n, &rw16(0x88, u64::MAX, 1, 0), &[]).await),
        oob
    );
    assert_eq!(
        sense_of(&run(&l, &n, &rw16(0x8a, 2048, 1, 0), &[0; 512]).await),
        oob
    );
    assert_eq!(
        sense_of(&run(&l, &n, &[0x08, 0x1f, 0xff, 0xff, 1, 0], &[]).await),
        oob
    );
    // Protection fields, and transfers over MAXIMUM TRANSFER LENGTH.
    for p in 1..8u8 {
        assert_eq!(
            sense_of(&run(&l, &n, &rw10(0x28, 0, 1, p << 5), &[]).await),
            field
        );
        assert_eq!(
            sense_of(&run(&l, &n, &rw10(0x2a, 0, 1, p << 5), &[0; 512]).await),
            field
        );
        assert_eq!(
            sense_of(&run(&l, &n, &rw10(0x2f, 0, 1, p << 5 | 2), &[0; 512]).await),
            field
        );
        assert_eq!(
            sense_of(&run(&l, &n, &rw10(0x41, 0, 1, p << 5), &[0; 512]).await),
            field
        );
    }
    let (_e, huge) = unit(1 << 30);
    assert_eq!(
        sense_of(&run(&huge, &n, &rw16(0x88, 0, 65537, 0), &[]).await),
        field
    );
    // An Expected Data Transfer Length short of the CDB's: the whole
    // blocks that came are written (the session reports the overflow).
    good(&run(&l, &n, &rw10(0x2a, 0, 2, 0), &[0x11; 1024]).await);
    let r = run(&l, &n, &rw10(0x2a, 0, 2, 0), &[0x22; 512]).await;
    good(&r);
    assert_eq!(r.data_out_wanted, 1024);
    let back = run(&l, &n, &rw10(0x28, 0, 2, 0), &[]).await.data_in;
    assert_eq!((back[0], back[511], back[512]), (0x22, 0x22, 0x11));
    let r = run(&l, &n, &rw10(0x2a, 0, 2, 0), &[0x33; 200]).await;
    assert_eq!(sense_of(&r), (ILLEGAL, 0x0e, 0x03));
    // Data-Out short of what the initiator announced.
    let c = rw10(0x2a, 0, 2, 0);
    let r = l
        .execute(Request {
            cdb: &c,
            data_out: Bytes::from_static(&[0; 512]),
            expected_len: 1024,
            read: false,
            write: true,
            nexus: &n,
        })
        .await;
    assert_eq!(sense_of(&r), (ILLEGAL, 0x0e, 0x03));
    assert_eq!(
        run(&l, &n, &rw10(0x28, 0, 1, 0), &[]).await.data_in[0],
        0x22
    );
}

#[tokio::test]
async fn unknown_truncated_and_empty_cdbs_are_refused() {
    let (_e, l) = unit(MIB);
    let n = nexus("a");
    let opcode = (ILLEGAL, 0x20, 0);
    for op in [0x02u8, 0x04, 0x85, 0x86, 0x9c, 0xc0, 0xff, 0x7f, 0x8c, 0x9d] {
        assert_eq!(sense_of(&run(&l, &n, &[op], &[]).await), opcode, "{op:#x}");
    }
    // An unsupported service action of a supported opcode.
    let r = run(
        &l,
        &n,
        &[0x9e, 0x13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32],
        &[],
    )
    .await;
    assert_eq!(sense_of(&r), (ILLEGAL, 0x24, 0));
    let req = |cdb: &'static [u8]| Request {
        cdb,
        data_out: Bytes::new(),
        expected_len: 0,
        read: false,
        write: false,
        nexus: &n,
    };
    assert_eq!(sense_of(&l.execute(req(&[])).await), opcode);
    assert_eq!(
        sense_of(&l.execute(req(&[0x28, 0, 0, 0])).await),
        (ILLEGAL, 0x24, 0)
    );
    assert_eq!(
        sense_of(&l.execute(req(&[0x88; 15])).await),
        (ILLEGAL, 0x24, 0)
    );
    // NACA in the control byte.
    assert_eq!(
        sense_of(&l.execute(req(&[0, 0, 0, 0, 0, 4])).await),
        (ILLEGAL, 0x24, 0)
    );
    good(&l.execute(req(&[0, 0, 0, 0, 0, 0])).await);
}

#[tokio::test]
async fn read_only_exports_refuse_every_write() {
    let l = Lun::new(MemExport::new("ro", MIB, true), 0);
    let n = nexus("a");
    let wp = (sense::KEY_DATA_PROTECT, 0x27, 0);
    assert_eq!(
        sense_of(&run(&l, &n, &rw10(0x2a, 0, 1, 0), &[1; 512]).await),
        wp
    );
    assert_eq!(
        sense_of(&run(&l, &n, &rw16(0x8e, 0, 1, 2), &[1; 512]).await),
        wp
    );
    assert_eq!(
        sense_of(&run(&l, &n, &rw10(0x41, 0, 1, 8), &[0; 512]).await),
        wp
    );
    let mut caw = rw16(0x89, 0, 0, 0);
    caw[13] = 1;
    assert_eq!(sense_of(&run(&l, &n, &caw, &[0; 1024]).await), wp);
    let unmap = [
        0, 22, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0,
    ];
    assert_eq!(
        sense_of(&run(&l, &n, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &unmap).await),
        wp
    );
    good(&run(&l, &n, &rw10(0x28, 0, 1, 0), &[]).await);
    let ms = run(&l, &n, &[0x1a, 0, 0x3f, 0, 255, 0], &[]).await;
    assert_eq!(ms.data_in[2], 0x90); // WP, DPOFUA
}

#[tokio::test]
async fn backend_errors_map_to_medium_and_write_errors() {
    let (e, l) = unit(MIB);
    let n = nexus("a");
    *e.fail_at.lock().unwrap() = Some(4096);
    let r = run(&l, &n, &rw10(0x28, 8, 1, 0), &[]).await;
    assert_eq!(sense_of(&r), (sense::KEY_MEDIUM_ERROR, 0x11, 0));
    let r = run(&l, &n, &rw10(0x2a, 8, 1, 0), &[0; 512]).await;
    assert_eq!(sense_of(&r), (sense::KEY_MEDIUM_ERROR, 0x0c, 0));
    let r = run(&l, &n, &rw10(0x2f, 8, 1, 0), &[]).await;
    assert_eq!(sense_of(&r), (sense::KEY_MEDIUM_ERROR, 0x11, 0));
    *e.fail_at.lock().unwrap() = None;
    good(&run(&l, &n, &rw10(0x35, 0, 0, 0), &[]).await);
    good(&run(&l, &n, &rw16(0x91, 0, 0, 2), &[]).await);
}

#[tokio::test]
async fn verify_compares_and_reports_the_first_difference() {
    let (_e, l) = unit(MIB);
    let n = nexus("a");
    let data = pattern(4 * 512, 1);
    good(&run(&l, &n, &rw10(0x2a, 10, 4, 0), &data).await);
    good(&run(&l, &n, &rw10(0x2f, 10, 4, 0), &[]).await);
    good(&run(&l, &n, &rw10(0x2f, 10, 4, 0x02), &data).await);
    let mut bad = data.clone();
    bad[1234] ^= 0x58;
    let r = run(&l, &n, &rw10(0x2f, 10, 4, 0x02), &bad).await;
    assert_eq!(sense_of(&r), (sense::KEY_MISCOMPARE, 0x1d, 0));
    let s = r.sense.unwrap();
    assert_eq!(s[0], 0xf0);
    assert_eq!(&s[3..7], &1234u32.to_be_bytes());
    // BYTCHK 11b: one block against each.
    good(&run(&l, &n, &rw16(0x8a, 40, 3, 0), &[7; 1536]).await);
    good(&run(&l, &n, &rw16(0x8f, 40, 3, 0x06), &[7; 512]).await);
    let r = run(&l, &n, &rw16(0x8f, 40, 4, 0x06), &[7; 512]).await;
    assert_eq!(sense_of(&r), (sense::KEY_MISCOMPARE, 0x1d, 0));
    assert_eq!(&r.sense.unwrap()[3..7], &1536u32.to_be_bytes());
    assert_eq!(
        sense_of(&run(&l, &n, &rw10(0x2f, 0, 1, 0x04), &[]).await),
        (ILLEGAL, 0x24, 0)
    );
}

#[tokio::test]
async fn prefetch_is_good_within_the_volume() {
    let (_e, l) = unit(MIB);
    let n = nexus("a");
    good(&run(&l, &n, &rw10(0x34, 0, 0, 0), &[]).await);
    good(&run(&l, &n, &rw16(0x90, 2040, 8, 2), &[]).await);
    assert_eq!(
        sense_of(&run(&l, &n, &rw16(0x90, 2040, 9, 0), &[]).await),
        (ILLEGAL, 0x21, 0)
    );
}

#[tokio::test]
async fn write_same_writes_zeroes_unmaps_and_checks_its_fields() {
    let (e, l) = unit(MIB);
    let n = nexus("a");
    let mut block = pattern(512, 5);
    good(&run(&l, &n, &rw10(0x41, 16, 24, 0), &block).await);
    let back = run(&l, &n, &rw10(0x28, 16, 24, 0), &[]).await.data_in;
    assert!(back.chunks(512).all(|b| b == &block[..]));
    // Zeros with UNMAP: deallocated, reads zero.
    block.fill(0);
    good(&run(&l, &n, &rw16(0x93, 16, 24, 0x08), &block).await);
    assert!(run(&l, &n, &rw10(0x28, 16, 24, 0), &[])
        .await
        .data_in
        .iter()
        .all(|&b| b == 0));
    assert_eq!(e.block_status(8192, 4096).await.unwrap(), vec![(4096, 3)]);
    // UNMAP deallocates whatever the Data-Out block holds.
    good(&run(&l, &n, &rw10(0x2a, 16, 8, 0), &[0xff; 4096]).await);
    good(&run(&l, &n, &rw10(0x41, 16, 8, 0x08), &[0xff; 512]).await);
    assert_eq!(
        run(&l, &n, &rw10(0x28, 16, 8, 0), &[]).await.data_in,
        vec![0; 4096]
    );
    // NDOB: no Data-Out at all.
    good(&run(&l, &n, &rw10(0x2a, 0, 1, 0), &[9; 512]).await);
    let r = run(&l, &n, &rw16(0x93, 0, 1, 0x09), &[]).await;
    good(&r);
    assert_eq!(r.data_out_wanted, 0);
    assert_eq!(
        run(&l, &n, &rw10(0x28, 0, 1, 0), &[]).await.data_in,
        vec![0; 512]
    );
    // Length 0: to the end of the volume.
    good(&run(&l, &n, &rw10(0x41, 2040, 0, 0), &[3; 512]).await);
    assert_eq!(
        run(&l, &n, &rw10(0x28, 2047, 1, 0), &[]).await.data_in,
        vec![3; 512]
    );
    let field = (ILLEGAL, 0x24, 0);
    // ANCHOR (with or without UNMAP) is not supported.
    assert_eq!(
        sense_of(&run(&l, &n, &rw10(0x41, 0, 1, 0x10), &[0; 512]).await),
        field
    );
    assert_eq!(
        sense_of(&run(&l, &n, &rw10(0x41, 0, 1, 0x18), &[0; 512]).await),
        field
    );
    // More Data-Out than one block.
    assert_eq!(
        sense_of(&run(&l, &n, &rw10(0x41, 0, 1, 8), &[0; 1024]).await),
        field
    );
    assert_eq!(
        sense_of(&run(&l, &n, &rw10(0x41, 2048, 0, 0), &[0; 512]).await),
        (ILLEGAL, 0x21, 0)
    );
    let (_e, huge) = unit(1 << 30);
    assert_eq!(
        sense_of(&run(&huge, &n, &rw10(0x41, 0, 0, 0), &[0; 512]).await),
        field
    );
}

fn unmap_list(ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut d = vec![0u8; 8];
    d[0..2].copy_from_slice(&((6 + 16 * ranges.len()) as u16).to_be_bytes());
    d[2..4].copy_from_slice(&((16 * ranges.len()) as u16).to_be_bytes());
    for (lba, n) in ranges {
        d.extend_from_slice(&lba.to_be_bytes());
        d.extend_from_slice(&n.to_be_bytes());
        d.extend_from_slice(&[0; 4]);
    }
    d
}

fn unmap_cdb(len: usize) -> Vec<u8> {
    vec![0x42, 0, 0, 0, 0, 0, 0, (len >> 8) as u8, len as u8, 0]
}

#[tokio::test]
async fn unmap_validates_the_whole_list_then_deallocates() {
    let (e, l) = unit(MIB);
    let n = nexus("a");
    good(&run(&l, &n, &rw10(0x2a, 0, 64, 0), &[0xaa; 64 * 512]).await);
    let list = unmap_list(&[(0, 8), (16, 8), (2048, 0)]);
    good(&run(&l, &n, &unmap_cdb(list.len()), &list).await);
    let back = run(&l, &n, &rw10(0x28, 0, 24, 0), &[]).await.data_in;
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert!(back[4096..8192].iter().all(|&b| b == 0xaa));
    assert_eq!(e.block_status(0, 4096).await.unwrap(), vec![(4096, 3)]);
    good(&run(&l, &n, &unmap_cdb(0), &[]).await);
    good(&run(&l, &n, &unmap_cdb(8), &unmap_list(&[])).await);

    let plle = (ILLEGAL, 0x1a, 0);
    assert_eq!(sense_of(&run(&l, &n, &unmap_cdb(6), &[0; 6]).await), plle);
    let mut long = unmap_list(&[(0, 1)]);
    long[3] = 32; // descriptors past the parameter list
    assert_eq!(
        sense_of(&run(&l, &n, &unmap_cdb(long.len()), &long).await),
        plle
    );
    let list = unmap_list(&[(32, 8), (2047, 2)]);
    assert_eq!(
        sense_of(&run(&l, &n, &unmap_cdb(list.len()), &list).await),
        (ILLEGAL, 0x21, 0)
    );
    // Nothing of a refused list was unmapped.
    assert_eq!(
        run(&l, &n, &rw10(0x28, 32, 1, 0), &[]).await.data_in,
        vec![0xaa; 512]
    );
    let list = unmap_list(&vec![(0, 1); 257]);
    assert_eq!(
        sense_of(&run(&l, &n, &unmap_cdb(list.len()), &list).await),
        (ILLEGAL, 0x26, 0)
    );
    let list = unmap_list(&[(u64::MAX, 2)]);
    assert_eq!(
        sense_of(&run(&l, &n, &unmap_cdb(list.len()), &list).await),
        (ILLEGAL, 0x21, 0)
    );
    assert_eq!(
        sense_of(&run(&l, &n, &[0x42, 1, 0, 0, 0, 0, 0, 0, 8, 0], &[0; 8]).await),
        (ILLEGAL, 0x24, 0)
    );
}

#[tokio::test]
async fn get_lba_status_reports_mapped_and_deallocated_extents() {
    let (_e, l) = unit(MIB);
    let n = nexus("a");
    good(&run(&l, &n, &rw10(0x2a, 8, 16, 0), &[1; 16 * 512]).await);
    let cdb = |lba: u64, alloc: u32| {
        let mut c = vec![0x9e, 0x12];
        c.extend_from_slice(&lba.to_be_bytes());
        c.extend_from_slice(&alloc.to_be_bytes());
        c.extend_from_slice(&[0, 0]);
        c
    };
    let r = run(&l, &n, &cdb(0, 1024), &[]).await;
    good(&r);
    let d = &r.data_in;
    assert_eq!(&d[..4], &(4 + 3 * 16u32).to_be_bytes());
    let desc = |i: usize| {
        let b = &d[8 + 16 * i..24 + 16 * i];
        (
            u64::from_be_bytes(b[..8].try_into().unwrap()),
            u32::from_be_bytes(b[8..12].try_into().unwrap()),
            b[12],
        )
    };
    assert_eq!(desc(0), (0, 8, 1));
    assert_eq!(desc(1), (8, 16, 0));
    assert_eq!(desc(2), (24, 2048 - 24, 1));
    let r = run(&l, &n, &cdb(10, 24), &[]).await;
    assert_eq!(r.data_in.len(), 24);
    assert_eq!(&r.data_in[8..16], &10u64.to_be_bytes());
    assert_eq!(r.data_in[20], 0);
    for lba in [2048, u64::MAX] {
        assert_eq!(
            sense_of(&run(&l, &n, &cdb(lba, 24), &[]).await),
            (ILLEGAL, 0x21, 0)
        );
    }
}

#[tokio::test]
async fn compare_and_write_writes_on_match_only() {
    let (_e, l) = unit(MIB);
    let n = nexus("a");
    let old = pattern(2 * 512, 1);
    let new = pattern(2 * 512, 2);
    good(&run(&l, &n, &rw10(0x2a, 4, 2, 0), &old).await);
    let mut caw = rw16(0x89, 4, 0, 0x08);
    caw[13] = 2;
    assert_eq!(Lun::<MemExport>::data_out_len(&caw), Some(2048));
    good(&run(&l, &n, &caw, &[old.clone(), new.clone()].concat()).await);
    assert_eq!(run(&l, &n, &rw10(0x28, 4, 2, 0), &[]).await.data_in, new);
    let mut stale = old.clone();
    stale[700] = new[700];
    let r = run(&l, &n, &caw, &[stale, pattern(1024, 3)].concat()).await;
    assert_eq!(sense_of(&r), (sense::KEY_MISCOMPARE, 0x1d, 0));
    assert_eq!(&r.sense.unwrap()[3..7], &0u32.to_be_bytes());
    let mut near = new.clone();
    near[777] ^= 1;
    let r = run(&l, &n, &caw, &[near, pattern(1024, 3)].concat()).await;
    assert_eq!(&r.sense.unwrap()[3..7], &777u32.to_be_bytes());
    assert_eq!(run(&l, &n, &rw10(0x28, 4, 2, 0), &[]).await.data_in, new);
    // Data-Out for a different block count than the CDB's.
    let r = run(&l, &n, &caw, &[0u8; 4096]).await;
    assert_eq!(sense_of(&r).0, ILLEGAL);
    // 256 blocks wrap to 0 in the one-byte field: refused, not a no-op.
    caw[13] = 0;
    assert_eq!(
        sense_of(&run(&l, &n, &caw, &[0u8; 1024]).await),
        (ILLEGAL, 0x24, 0)
    );
    good(&run(&l, &n, &caw, &[]).await);
}

/// A backend whose reads wait at a gate while it is armed, and which
/// reports `size` as its size when that is not 0 (a volume grown while open).
struct Gated {
    inner: Arc<MemExport>,
    armed: AtomicBool,
    entered: tokio::sync::Notify,
    gate: tokio::sync::Semaphore,
    size: AtomicU64,
}

impl Gated {
    fn new(inner: Arc<MemExport>) -> Self {
        Gated {
            inner,
            armed: AtomicBool::new(false),
            entered: tokio::sync::Notify::new(),
            gate: tokio::sync::Semaphore::new(0),
            size: AtomicU64::new(0),
        }
    }
}

impl Backend for Gated {
    fn info(&self) -> &ExportInfo {
        self.inner.info()
    }
    fn size(&self) -> u64 {
        match self.size.load(Ordering::SeqCst) {
            0 => self.inner.info().size,
            n => n,
        }
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        if self.armed.load(Ordering::SeqCst) {
            self.entered.notify_one();
            self.gate.acquire().await.expect("open").forget();
        }
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.inner.write(offset, data, fua).await
    }
    async fn write_zeroes(&self, o: u64, l: u32, f: bool, h: bool) -> Result<(), IoError> {
        self.inner.write_zeroes(o, l, f, h).await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.inner.trim(offset, len, fua).await
    }
    async fn flush(&self) -> Result<(), IoError> {
        self.inner.flush().await
    }
    async fn block_status(&self, offset: u64, len: u32) -> Result<Extents, IoError> {
        self.inner.block_status(offset, len).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_write_is_atomic_against_concurrent_writes() {
    let g = Arc::new(Gated::new(MemExport::new("vol", MIB, false)));
    let l = Arc::new(Lun::new(g.clone(), 0));
    let n = nexus("a");
    good(&run(&l, &n, &rw10(0x2a, 0, 1, 0), &[b'A'; 512]).await);
    g.armed.store(true, Ordering::SeqCst);
    let mut caw = rw16(0x89, 0, 0, 0);
    caw[13] = 1;
    let (l1, n1) = (l.clone(), n.clone());
    let cmp =
        tokio::spawn(
            async move { run(&l1, &n1, &caw, &[[b'A'; 512], [b'B'; 512]].concat()).await },
        );
    // The COMPARE AND WRITE has read nothing yet: it waits at the gate.
    g.entered.notified().await;
    g.armed.store(false, Ordering::SeqCst);
    let (l2, n2) = (l.clone(), n.clone());
    let write =
        tokio::spawn(async move { run(&l2, &n2, &rw10(0x2a, 0, 1, 0), &[b'C'; 512]).await });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        !write.is_finished(),
        "a WRITE got in the middle of a COMPARE AND WRITE"
    );
    g.gate.add_permits(1);
    good(&cmp.await.unwrap());
    good(&write.await.unwrap());
    assert_eq!(
        run(&l, &n, &rw10(0x28, 0, 1, 0), &[]).await.data_in,
        vec![b'C'; 512]
    );

    // Concurrent increments by COMPARE AND WRITE lose none.
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (l, n) = (l.clone(), nexus(&format!("t{t}")));
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            while done < 25 {
                let cur = run(&l, &n, &rw10(0x28, 1, 1, 0), &[]).await.data_in;
                let v = u64::from_be_bytes(cur[..8].try_into().unwrap());
                let mut next = vec![0u8; 512];
                next[..8].copy_from_slice(&(v + 1).to_be_bytes());
                let mut caw = rw16(0x89, 1, 0, 0);
                caw[13] = 1;
                if run(&l, &n, &caw, &[cur.to_vec(), next].concat())
                    .await
                    .status
                    == GOOD
                {
                    done += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let end = run(&l, &n, &rw10(0x28, 1, 1, 0), &[]).await.data_in;
    assert_eq!(u64::from_be_bytes(end[..8].try_into().unwrap()), 100);
}

#[tokio::test]
async fn unit_attention_after_reset_and_request_sense() {
    let (_e, l) = unit(MIB);
    let (a, b) = (nexus("a"), nexus("b"));
    good(&run(&l, &a, &[0; 6], &[]).await);
    good(&run(&l, &b, &[0; 6], &[]).await);
    l.reset(&a);
    // INQUIRY does not report it; the next other command does, once.
    good(&run(&l, &a, &[0x12, 0, 0, 0, 36, 0], &[]).await);
    let r = run(&l, &a, &rw10(0x28, 0, 1, 0), &[]).await;
    assert_eq!(sense_of(&r), (sense::KEY_UNIT_ATTENTION, 0x29, 0));
    good(&run(&l, &a, &rw10(0x28, 0, 1, 0), &[]).await);
    // REQUEST SENSE returns it as data and clears it.
    let rs = run(&l, &b, &[0x03, 0, 0, 0, 252, 0], &[]).await;
    good(&rs);
    assert_eq!(&rs.data_in[..], &sense::POWER_ON_RESET.fixed(None)[..]);
    let rs = run(&l, &b, &[0x03, 0, 0, 0, 252, 0], &[]).await;
    assert_eq!(rs.data_in[2], 0);
    good(&run(&l, &b, &[0; 6], &[]).await);
}

#[tokio::test]
async fn growth_raises_capacity_data_has_changed_on_every_nexus() {
    let g = Arc::new(Gated::new(MemExport::new("vol", 2 * MIB, false)));
    g.size.store(MIB, Ordering::SeqCst);
    let l = Lun::new(g.clone(), 0);
    let (a, b) = (nexus("a"), nexus("b"));
    let capacity = |r: &Reply| u64::from_be_bytes(r.data_in[..8].try_into().unwrap()) + 1;
    let read_capacity16 = [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0];
    let r = run(&l, &a, &read_capacity16, &[]).await;
    good(&r);
    assert_eq!(capacity(&r), MIB / 512);
    good(&run(&l, &b, &[0; 6], &[]).await);
    let past_old_end = rw16(0x8a, MIB / 512, 1, 0);
    assert_eq!(
        sense_of(&run(&l, &a, &past_old_end, &[7; 512]).await),
        (ILLEGAL, 0x21, 0)
    );
    g.size.store(2 * MIB, Ordering::SeqCst);
    // Each nexus hears of it once, on its next command; then the new end holds.
    for n in [&a, &b] {
        let r = run(&l, n, &[0; 6], &[]).await;
        assert_eq!(sense_of(&r), (sense::KEY_UNIT_ATTENTION, 0x2a, 0x09));
        good(&run(&l, n, &[0; 6], &[]).await);
    }
    let r = run(&l, &b, &read_capacity16, &[]).await;
    assert_eq!(capacity(&r), 2 * MIB / 512);
    good(&run(&l, &a, &past_old_end, &[7; 512]).await);
    // A nexus seen only after the growth gets nothing to clear.
    good(&run(&l, &nexus("c"), &[0; 6], &[]).await);
}

#[tokio::test]
async fn reserve6_conflicts_until_released_reset_or_nexus_loss() {
    let (_e, l) = unit(MIB);
    let (a, b) = (nexus("a"), nexus("b"));
    let reserve = [0x16, 0, 0, 0, 0, 0];
    let release = [0x17, 0, 0, 0, 0, 0];
    good(&run(&l, &a, &reserve, &[]).await);
    good(&run(&l, &a, &reserve, &[]).await);
    assert_eq!(
        run(&l, &b, &reserve, &[]).await.status,
        RESERVATION_CONFLICT
    );
    assert_eq!(
        run(&l, &b, &[0x1a, 0, 0x3f, 0, 255, 0], &[]).await.status,
        RESERVATION_CONFLICT
    );
    good(&run(&l, &b, &[0x12, 0, 0, 0, 36, 0], &[]).await);
    good(&run(&l, &b, &release, &[]).await); // no effect
    good(&run(&l, &a, &rw10(0x2a, 0, 1, 0), &[1; 512]).await);
    good(&run(&l, &a, &release, &[]).await);
    good(&run(&l, &b, &reserve, &[]).await);
    // Losing the nexus releases its reservation.
    l.nexus_lost(&b);
    good(&run(&l, &a, &reserve, &[]).await);
    assert_eq!(
        run(&l, &b, &reserve, &[]).await.status,
        RESERVATION_CONFLICT
    );
    // So does a reset, which the nexuses seen since are told of.
    l.reset(&a);
    let r = run(&l, &b, &reserve, &[]).await;
    assert_eq!(sense_of(&r), (sense::KEY_UNIT_ATTENTION, 0x29, 0));
    good(&run(&l, &b, &reserve, &[]).await);
    assert_eq!(sense_of(&run(&l, &a, &[0; 6], &[]).await).1, 0x29);
    assert_eq!(run(&l, &a, &[0; 6], &[]).await.status, RESERVATION_CONFLICT);
}

/// Random CDBs and Data-Out never panic and always answer sensibly.
#[test]
fn random_cdbs_never_panic() {
    use proptest::prelude::*;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (_e, l) = unit(MIB);
    let (a, b) = (nexus("a"), nexus("b"));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 3000,
        ..ProptestConfig::default()
    });
    // Every supported opcode (SANITIZE, ORWRITE, EXTENDED COPY and
    // RECEIVE COPY RESULTS among them), then any byte.
    let supported: Vec<u8> = cdb::COMMANDS.iter().map(|c| c.opcode).collect();
    let strategy = (
        prop_oneof![prop::sample::select(supported), any::<u8>()],
        prop::collection::vec(any::<u8>(), 0..24),
        prop::collection::vec(any::<u8>(), 0..2048),
        any::<u32>(),
        any::<bool>(),
    );
    runner
        .run(&strategy, |(op, mut cdb, data, expected, other)| {
            cdb.insert(0, op);
            let r = rt.block_on(l.execute(Request {
                cdb: &cdb,
                data_out: Bytes::from(data),
                expected_len: expected % 4096,
                read: true,
                write: true,
                nexus: if other { &a } else { &b },
            }));
            prop_assert!(matches!(
                r.status,
                GOOD | CHECK_CONDITION | RESERVATION_CONFLICT
            ));
            prop_assert_eq!(r.status == CHECK_CONDITION, r.sense.is_some());
            if let Some(s) = &r.sense {
                prop_assert_eq!(s.len(), 18);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn pr_state_round_trips_through_its_encoding() {
    let (a, b) = (nexus("a"), nexus("b"));
    let reg = |k: u64| {
        let mut p = [0u8; 24];
        p[8..16].copy_from_slice(&k.to_be_bytes());
        p
    };
    let s = PrState::default();
    let (s, _) = s.out(&a, pr::REGISTER, 0, &reg(0x1111)).unwrap();
    let mut p = reg(0x2222);
    p[20] = 0x05; // ALL_TG_PT, APTPL
    let (s, _) = s
        .out(&b, pr::REGISTER_AND_IGNORE_EXISTING_KEY, 0, &p)
        .unwrap();
    let mut r = [0u8; 24];
    r[..8].copy_from_slice(&0x1111u64.to_be_bytes());
    let (s, _) = s
        .out(&a, pr::RESERVE, pr::WRITE_EXCLUSIVE_REGISTRANTS_ONLY, &r)
        .unwrap();
    let bytes = s.to_bytes();
    let back = PrState::from_bytes(&bytes).unwrap();
    assert_eq!(back, s);
    assert_eq!(back.generation, 2);
    assert_eq!(back.version, 3);
    assert!(back.aptpl);
    assert!(back.registrations[1].all_target_ports);
    assert_eq!(back.reservation.as_ref().unwrap().kind, 5);
    assert!(PrState::from_bytes(&[0xff, 0xff, 0xff]).is_err());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = pr::MemPrStore::default();
    assert_eq!(rt.block_on(store.load()).unwrap(), None);
    rt.block_on(store.save(&s)).unwrap();
    assert_eq!(rt.block_on(store.load()).unwrap(), Some(s));
}
