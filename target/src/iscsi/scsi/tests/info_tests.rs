//! What a logical unit says about itself: INQUIRY and VPD pages, READ
//! CAPACITY, MODE SENSE/SELECT, REPORT SUPPORTED OPERATION CODES, REPORT
//! LUNS, and the Data-Out each CDB calls for.

use md5::{Digest, Md5};

use super::*;

#[tokio::test]
async fn inquiry_standard_and_vpd_pages() {
    let (e, l) = unit(64 * MIB);
    let n = nexus("a");
    let r = run(&l, &n, &[0x12, 0, 0, 0, 255, 0], &[]).await;
    good(&r);
    let d = &r.data_in;
    assert_eq!(d.len(), 96);
    assert_eq!(&d[..8], &[0x00, 0x00, 0x06, 0x12, 91, 0x18, 0x00, 0x02]);
    assert_eq!(&d[8..32], b"CAIRN   Cairn volume    ");
    assert_eq!(&d[32..36], b"0.1 ");
    assert_eq!(
        &d[58..66],
        &[0x00, 0xa0, 0x09, 0x60, 0x04, 0x60, 0x04, 0xc0]
    );
    // The allocation length cuts the data.
    assert_eq!(
        run(&l, &n, &[0x12, 0, 0, 0, 36, 0], &[])
            .await
            .data_in
            .len(),
        36
    );
    // A page code without EVPD, and unknown pages, are refused.
    let r = run(&l, &n, &[0x12, 0, 0x80, 0, 255, 0], &[]).await;
    assert_eq!(sense_of(&r), (ILLEGAL, 0x24, 0));
    let r = run(&l, &n, &[0x12, 1, 0x99, 0, 255, 0], &[]).await;
    assert_eq!(sense_of(&r), (ILLEGAL, 0x24, 0));

    let pages = run(&l, &n, &[0x12, 1, 0x00, 0, 255, 0], &[]).await;
    assert_eq!(
        &pages.data_in[..],
        &[0, 0, 0, 6, 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]
    );
    for &p in &pages.data_in[4..] {
        let r = run(&l, &n, &[0x12, 1, p, 0, 255, 0], &[]).await;
        good(&r);
        assert_eq!(r.data_in[1], p);
        assert_eq!(
            u16::from_be_bytes([r.data_in[2], r.data_in[3]]) as usize + 4,
            r.data_in.len()
        );
    }
    let h = Md5::digest(e.info().uid.as_bytes());
    let serial = run(&l, &n, &[0x12, 1, 0x80, 0, 255, 0], &[]).await;
    assert_eq!(&serial.data_in[4..], hex::encode(h).as_bytes());
    let ids = run(&l, &n, &[0x12, 1, 0x83, 0, 255, 0], &[]).await;
    let d = &ids.data_in;
    assert_eq!(&d[4..8], &[0x01, 0x03, 0x00, 0x08]);
    assert_eq!(d[8], 0x30 | (h[0] & 0x0f));
    assert_eq!(&d[9..16], &h[1..8]);
    assert_eq!(&d[16..20], &[0x02, 0x01, 0x00, 40]);
    assert_eq!(&d[20..28], b"CAIRN   ");
    // Another logical unit of the same export has the same identifiers.
    let again = Lun::new(e.clone(), 3);
    assert_eq!(
        run(&again, &n, &[0x12, 1, 0x83, 0, 255, 0], &[])
            .await
            .data_in,
        ids.data_in
    );

    let bl = run(&l, &n, &[0x12, 1, 0xb0, 0, 255, 0], &[]).await.data_in;
    assert_eq!(bl.len(), 64);
    assert_eq!(bl[5], 255);
    assert_eq!(&bl[6..8], &[0, 8]);
    assert_eq!(&bl[8..12], &65536u32.to_be_bytes());
    assert_eq!(&bl[20..24], &(1u32 << 20).to_be_bytes());
    assert_eq!(&bl[24..28], &256u32.to_be_bytes());
    assert_eq!(&bl[28..32], &8u32.to_be_bytes());
    assert_eq!(&bl[36..44], &(1u64 << 20).to_be_bytes());
    let lbp = run(&l, &n, &[0x12, 1, 0xb2, 0, 255, 0], &[]).await.data_in;
    assert_eq!(&lbp[..], &[0, 0xb2, 0, 4, 0, 0xe4, 0x02, 0]);
    let bdc = run(&l, &n, &[0x12, 1, 0xb1, 0, 255, 0], &[]).await.data_in;
    assert_eq!(&bdc[4..6], &[0, 1]);
}

#[tokio::test]
async fn read_capacity_reports_a_thin_512e_volume() {
    let (_e, l) = unit(64 * MIB);
    let n = nexus("a");
    let r = run(&l, &n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(&r.data_in[..], &[0, 1, 0xff, 0xff, 0, 0, 2, 0]);
    let r = run(
        &l,
        &n,
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        &[],
    )
    .await;
    assert_eq!(
        &r.data_in[..16],
        &[0, 0, 0, 0, 0, 1, 0xff, 0xff, 0, 0, 2, 0, 0, 3, 0xc0, 0]
    );
    let r = run(
        &l,
        &n,
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0],
        &[],
    )
    .await;
    assert_eq!(r.data_in.len(), 12);
    // Over 2 TiB, READ CAPACITY (10) says "use the 16 byte one".
    let big = Lun::new(MemExport::new("big", 4 << 40, false), 0);
    let r = run(&big, &n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(&r.data_in[..4], &[0xff; 4]);
}

#[tokio::test]
async fn mode_sense_and_select() {
    let (_e, l) = unit(MIB);
    let n = nexus("a");
    let r = run(&l, &n, &[0x1a, 0, 0x3f, 0, 255, 0], &[]).await;
    let d = &r.data_in;
    assert_eq!(d.len(), 4 + 8 + 20 + 12 + 12);
    assert_eq!(&d[..4], &[d.len() as u8 - 1, 0, 0x10, 8]);
    assert_eq!(&d[4..12], &[0, 0, 0x08, 0, 0, 0, 2, 0]);
    assert_eq!(&d[12..15], &[0x08, 0x12, 0x04]);
    assert_eq!(&d[32..36], &[0x0a, 0x0a, 0x02, 0x10]);
    assert_eq!(&d[44..47], &[0x1c, 0x0a, 0x08]);
    // DBD, one page, alloc length cut.
    let ctl = run(&l, &n, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[])
        .await
        .data_in;
    assert_eq!(
        &ctl[..],
        &[15, 0, 0x10, 0, 0x0a, 0x0a, 0x02, 0x10, 0, 0, 0, 0, 0xff, 0xff, 0, 0]
    );
    assert_eq!(
        run(&l, &n, &[0x1a, 0, 0x3f, 0, 4, 0], &[])
            .await
            .data_in
            .len(),
        4
    );
    // Changeable values: only the Control page's SWP bit.
    let ch = run(&l, &n, &[0x1a, 0x08, 0x4a, 0, 255, 0], &[])
        .await
        .data_in;
    assert_eq!(ch[8], 0x08);
    assert!(ch[6..8].iter().chain(&ch[9..]).all(|&b| b == 0));
    // MODE SENSE (10) with a long LBA descriptor.
    let m10 = run(&l, &n, &[0x5a, 0x10, 0x08, 0, 0, 0, 0, 0, 255, 0], &[])
        .await
        .data_in;
    assert_eq!(&m10[..8], &[0, 6 + 16 + 20, 0, 0x10, 1, 0, 0, 16]);
    assert_eq!(
        &m10[8..24],
        &[0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 2, 0]
    );
    assert_eq!(
        sense_of(&run(&l, &n, &[0x1a, 0, 0x19, 0, 255, 0], &[]).await),
        (ILLEGAL, 0x24, 0)
    );
    // MODE SELECT: the same values are accepted, others refused.
    let mut sel = vec![0, 0, 0, 0];
    sel.extend_from_slice(&ctl[4..]);
    good(&run(&l, &n, &[0x15, 0x10, 0, 0, sel.len() as u8, 0], &sel).await);
    sel[6] |= 0x08; // SWP
    let r = run(&l, &n, &[0x15, 0x10, 0, 0, sel.len() as u8, 0], &sel).await;
    assert_eq!(sense_of(&r), (ILLEGAL, 0x26, 0));
    let r = run(&l, &n, &[0x15, 0x10, 0, 0, 3, 0], &sel[..3]).await;
    assert_eq!(sense_of(&r), (ILLEGAL, 0x1a, 0));
}

#[tokio::test]
async fn report_supported_operation_codes() {
    let (_e, l) = unit(MIB);
    let n = nexus("a");
    let all = run(
        &l,
        &n,
        &[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0],
        &[],
    )
    .await
    .data_in;
    let len = u32::from_be_bytes(all[..4].try_into().unwrap()) as usize;
    assert_eq!(len, 8 * cdb::COMMANDS.len());
    assert_eq!(all.len(), 4 + len);
    for d in all[4..].chunks(8) {
        let (op, sa) = (d[0], u16::from_be_bytes([d[2], d[3]]));
        if d[5] & 1 == 0 {
            assert_eq!(sa, 0);
        }
        // Each listed command is reported as supported on its own.
        let opt = if d[5] & 1 != 0 { 2 } else { 1 };
        let one = run(
            &l,
            &n,
            &[
                0xa3,
                0x0c,
                opt,
                op,
                (sa >> 8) as u8,
                sa as u8,
                0,
                0,
                1,
                0,
                0,
                0,
            ],
            &[],
        )
        .await;
        good(&one);
        assert_eq!(one.data_in[1], 0x03);
        assert_eq!(one.data_in[4], op);
        assert_eq!(
            u16::from_be_bytes([d[6], d[7]]),
            u16::from_be_bytes([one.data_in[2], one.data_in[3]])
        );
        // The other reporting option is refused.
        let bad = run(
            &l,
            &n,
            &[0xa3, 0x0c, 3 - opt, op, 0, 0, 0, 0, 1, 0, 0, 0],
            &[],
        )
        .await;
        assert_eq!(sense_of(&bad), (ILLEGAL, 0x24, 0));
    }
    let rd = run(
        &l,
        &n,
        &[0xa3, 0x0c, 0x81, 0x28, 0, 0, 0, 0, 1, 0, 0, 0],
        &[],
    )
    .await
    .data_in;
    assert_eq!(&rd[..6], &[0, 0x83, 0, 10, 0x28, 0x18]);
    assert_eq!(&rd[14..16], &[0, 0x0a]);
    let rctd = run(
        &l,
        &n,
        &[0xa3, 0x0c, 0x80, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0],
        &[],
    )
    .await
    .data_in;
    assert_eq!(rctd.len(), 4 + 20 * cdb::COMMANDS.len());
    let none = run(&l, &n, &[0xa3, 0x0c, 1, 0xc1, 0, 0, 0, 0, 1, 0, 0, 0], &[])
        .await
        .data_in;
    assert_eq!(&none[..], &[0, 1, 0, 0]);
}

#[tokio::test]
async fn report_luns_and_absent_luns() {
    let n = nexus("a");
    let r = report_luns(
        &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        &[0, 1, 300],
    );
    assert_eq!(&r.data_in[..8], &[0, 0, 0, 24, 0, 0, 0, 0]);
    assert_eq!(&r.data_in[8..16], &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&r.data_in[16..18], &[0, 1]);
    assert_eq!(&r.data_in[24..26], &[0x41, 0x2c]);
    let r = report_luns(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0], &[0]);
    assert_eq!(sense_of(&r), (ILLEGAL, 0x24, 0));
    let req = |cdb: &'static [u8]| Request {
        cdb,
        data_out: Bytes::new(),
        expected_len: 255,
        read: true,
        write: false,
        nexus: &n,
    };
    let inq = no_such_lun(
        req(&[0x12, 0, 0, 0, 96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        &[0],
    );
    assert_eq!(inq.data_in[0], 0x7f);
    let rs = no_such_lun(
        req(&[0x03, 0, 0, 0, 18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        &[0],
    );
    good(&rs);
    assert_eq!((rs.data_in[2], rs.data_in[12]), (ILLEGAL, 0x25));
    let tur = no_such_lun(req(&[0; 16]), &[0]);
    assert_eq!(sense_of(&tur), (ILLEGAL, 0x25, 0));
}

#[tokio::test]
async fn data_out_lengths() {
    let f = Lun::<MemExport>::data_out_len;
    assert_eq!(f(&rw10(0x2a, 0, 3, 0)), Some(1536));
    assert_eq!(f(&rw10(0x28, 0, 3, 0)), Some(0));
    assert_eq!(f(&rw10(0x2f, 0, 3, 0)), Some(0));
    assert_eq!(f(&rw10(0x2f, 0, 3, 2)), Some(1536));
    assert_eq!(f(&rw10(0x2f, 0, 3, 6)), Some(512));
    assert_eq!(f(&rw10(0x41, 0, 3, 0)), Some(512));
    assert_eq!(f(&rw16(0x8a, 0, u32::MAX, 0)), Some(u32::MAX));
    assert_eq!(f(&[0x5f, 0, 0, 0, 0, 0, 0, 0, 24, 0]), Some(24));
    assert_eq!(f(&[0x15, 0, 0, 0, 20, 0]), Some(20));
    assert_eq!(f(&[0xc5; 16]), None);
    assert_eq!(f(&[]), None);
}

#[tokio::test]
async fn software_write_protect_is_set_and_cleared_with_mode_select() {
    let (_e, l) = unit(MIB);
    let (a, b) = (nexus("a"), nexus("b"));
    // Both nexuses known, unit attentions cleared.
    for n in [&a, &b] {
        run(&l, n, &[0; 6], &[]).await;
        run(&l, n, &[0; 6], &[]).await;
    }
    // SWP is the one changeable bit of the Control page.
    let ch = run(&l, &a, &[0x1a, 0x08, 0x4a, 0, 255, 0], &[])
        .await
        .data_in;
    assert_eq!(ch[4 + 4], 0x08, "{ch:02x?}");
    let ctl = run(&l, &a, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[])
        .await
        .data_in;
    let mut sel = vec![0, 0, 0, 0];
    sel.extend_from_slice(&ctl[4..]);
    sel[4 + 4] |= 0x08;
    good(&run(&l, &a, &[0x15, 0x10, 0, 0, sel.len() as u8, 0], &sel).await);
    // Writes refused with LOGICAL UNIT SOFTWARE WRITE PROTECTED; reads work;
    // MODE SENSE shows WP and SWP.
    let w = run(&l, &a, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[7u8; 512]).await;
    assert_eq!(sense_of(&w), (0x07, 0x27, 0x02));
    good(&run(&l, &a, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[]).await);
    let ms = run(&l, &a, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[])
        .await
        .data_in;
    assert_eq!((ms[2] & 0x80, ms[4 + 4] & 0x08), (0x80, 0x08));
    // The other nexus hears MODE PARAMETERS CHANGED once.
    assert_eq!(
        sense_of(&run(&l, &b, &[0; 6], &[]).await),
        (0x06, 0x2a, 0x01)
    );
    good(&run(&l, &b, &[0; 6], &[]).await);
    // Cleared: writes work again.
    sel[4 + 4] &= !0x08;
    good(&run(&l, &b, &[0x15, 0x10, 0, 0, sel.len() as u8, 0], &sel).await);
    assert_eq!(
        sense_of(&run(&l, &a, &[0; 6], &[]).await),
        (0x06, 0x2a, 0x01)
    );
    good(&run(&l, &a, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[7u8; 512]).await);
}
