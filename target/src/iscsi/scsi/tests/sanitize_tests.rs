//! SANITIZE: the service actions, their parameter checks, the state while
//! one runs (NOT READY with progress) and after one failed.

use super::*;

fn sanitize(sa: u8, flags: u8, len: u16) -> Vec<u8> {
    let mut c = vec![0x48, sa | flags, 0, 0, 0, 0, 0];
    c.extend_from_slice(&len.to_be_bytes());
    c.push(0);
    c
}

fn overwrite_list(count: u8, pattern: &[u8]) -> Vec<u8> {
    let mut p = vec![count, 0];
    p.extend_from_slice(&(pattern.len() as u16).to_be_bytes());
    p.extend_from_slice(pattern);
    p
}

const NOT_READY: (u8, u8, u8) = (sense::KEY_NOT_READY, 0x04, 0x1b);

#[tokio::test]
async fn erase_deallocates_and_overwrite_writes_the_pattern_everywhere() {
    let (_e, l) = unit(80 * MIB); // more than one backend call
    let n = nexus("a");
    let last = (80 * MIB / 512 - 8) as u32;
    for sa in [0x02, 0x03] {
        good(&run(&l, &n, &rw10(0x2a, 0, 8, 0), &[b'a'; 4096]).await);
        good(&run(&l, &n, &rw16(0x8a, last as u64, 8, 0), &[b'a'; 4096]).await);
        good(&run(&l, &n, &sanitize(sa, 0, 0), &[]).await);
        for lba in [0, last] {
            let r = run(&l, &n, &rw10(0x28, lba, 8, 0), &[]).await;
            assert_eq!(&r.data_in[..], &[0; 4096][..]);
        }
        // Every block is deallocated: one descriptor covers the volume.
        let mut gls = vec![0x9e, 0x12];
        gls.extend_from_slice(&0u64.to_be_bytes());
        gls.extend_from_slice(&256u32.to_be_bytes());
        gls.extend_from_slice(&[0, 0]);
        let d = run(&l, &n, &gls, &[]).await.data_in;
        assert_eq!(u32::from_be_bytes(d[0..4].try_into().unwrap()), 20);
        assert_eq!(u32::from_be_bytes(d[16..20].try_into().unwrap()), 80 * 2048);
        assert_eq!(d[20], 1);
    }
    // OVERWRITE: a 3-byte pattern repeated within every block; with
    // INVERT and an even count the last pass writes its inverse.
    let list = overwrite_list(1, &[1, 2, 3]);
    good(&run(&l, &n, &sanitize(0x01, 0, list.len() as u16), &list).await);
    let want: Vec<u8> = [1u8, 2, 3].iter().cycle().take(512).copied().collect();
    for lba in [0, last + 7] {
        let r = run(&l, &n, &rw10(0x28, lba, 1, 0), &[]).await;
        assert_eq!(&r.data_in[..], &want[..]);
    }
    let list = overwrite_list(0x80 | 2, &[0x0f; 4]);
    good(&run(&l, &n, &sanitize(0x01, 0, list.len() as u16), &list).await);
    let r = run(&l, &n, &rw10(0x28, 1000, 1, 0), &[]).await;
    assert_eq!(&r.data_in[..], &[0xf0; 512][..]);
}

#[tokio::test]
async fn sanitize_checks_its_cdb_and_parameter_list() {
    let (_e, l) = unit(MIB);
    let n = nexus("a");
    let field = (ILLEGAL, 0x24, 0);
    let list_field = (ILLEGAL, 0x26, 0);
    // Unknown service actions, reserved bits and bytes.
    for sa in [0x00, 0x04, 0x1e] {
        assert_eq!(
            sense_of(&run(&l, &n, &sanitize(sa, 0, 0), &[]).await),
            field
        );
    }
    let mut c = sanitize(0x02, 0x40, 0);
    assert_eq!(sense_of(&run(&l, &n, &c, &[]).await), field);
    c = sanitize(0x02, 0, 0);
    c[4] = 1;
    let r = run(&l, &n, &c, &[]).await;
    assert_eq!(sense_of(&r), field);
    // The field pointer names byte 4 of the CDB.
    assert_eq!(&r.sense.as_ref().unwrap()[15..18], &[0xc0, 0, 4]);
    // Erases and EXIT FAILURE MODE take no parameter list.
    for sa in [0x02, 0x03, 0x1f] {
        let r = run(&l, &n, &sanitize(sa, 0, 8), &[0; 8]).await;
        assert_eq!(sense_of(&r), field);
    }
    // OVERWRITE: 5 to 516 bytes, a count, a pattern of 1 to 512 bytes
    // that the list holds exactly, TEST zero.
    for len in [0u16, 4, 517] {
        let r = run(&l, &n, &sanitize(0x01, 0, len), &[0; 600][..len as usize]).await;
        assert_eq!(sense_of(&r), field, "{len}");
    }
    let bad = [
        overwrite_list(0, &[1; 4]),
        overwrite_list(0x20 | 1, &[1; 4]),
        {
            let mut p = overwrite_list(1, &[1; 4]);
            p[3] = 0;
            p
        },
        {
            let mut p = overwrite_list(1, &[1; 4]);
            p[3] = 5;
            p
        },
    ];
    for p in bad {
        let r = run(&l, &n, &sanitize(0x01, 0, p.len() as u16), &p).await;
        assert_eq!(sense_of(&r), list_field, "{p:?}");
    }
    // EXIT FAILURE MODE with nothing failed: GOOD.
    good(&run(&l, &n, &sanitize(0x1f, 0, 0), &[]).await);
    // Read-only exports: WRITE PROTECTED.
    let ro = Lun::new(MemExport::new("ro", MIB, true), 0);
    let r = run(&ro, &n, &sanitize(0x02, 0, 0), &[]).await;
    assert_eq!(sense_of(&r), (sense::KEY_DATA_PROTECT, 0x27, 0));
}

#[tokio::test]
async fn sanitize_conflicts_with_reservations() {
    let (_e, l) = unit(MIB);
    let (a, b) = (nexus("a"), nexus("b"));
    good(&run(&l, &a, &[0x16, 0, 0, 0, 0, 0], &[]).await);
    let list = overwrite_list(1, &[0xaa; 512]);
    for (sa, p) in [(0x01, &list[..]), (0x02, &[][..]), (0x03, &[][..])] {
        let r = run(&l, &b, &sanitize(sa, 0, p.len() as u16), p).await;
        assert_eq!(r.status, RESERVATION_CONFLICT);
    }
    good(&run(&l, &a, &sanitize(0x02, 0, 0), &[]).await);
}

/// A backend whose writes and zeroing wait for permits while armed.
struct Slow {
    inner: Arc<MemExport>,
    armed: AtomicBool,
    gate: tokio::sync::Semaphore,
}

impl Slow {
    async fn pass(&self) {
        if self.armed.load(Ordering::SeqCst) {
            self.gate.acquire().await.expect("open").forget();
        }
    }
}

impl Backend for Slow {
    fn info(&self) -> &ExportInfo {
        self.inner.info()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.pass().await;
        self.inner.write(offset, data, fua).await
    }
    async fn write_zeroes(&self, o: u64, l: u32, f: bool, h: bool) -> Result<(), IoError> {
        self.pass().await;
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

fn slow(size: u64) -> Arc<Slow> {
    Arc::new(Slow {
        inner: MemExport::new("slow", size, false),
        armed: AtomicBool::new(true),
        gate: tokio::sync::Semaphore::new(0),
    })
}

/// The progress indication of a NOT READY, SANITIZE IN PROGRESS.
fn progress(r: &Reply) -> u16 {
    assert_eq!(sense_of(r), NOT_READY);
    let s = r.sense.as_ref().unwrap();
    assert_eq!(s[15], 0x80, "SKSV");
    u16::from_be_bytes([s[16], s[17]])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_get_not_ready_with_progress_while_sanitize_runs() {
    let s = slow(128 * MIB); // four 32 MiB calls
    let l = Arc::new(Lun::new(s.clone(), 0));
    let n = nexus("a");
    // IMMED: GOOD at once, the erase goes on in the background.
    good(&run(&l, &n, &sanitize(0x02, 0x80, 0), &[]).await);
    let r = run(&l, &n, &[0; 6], &[]).await;
    assert_eq!(progress(&r), 0);
    s.gate.add_permits(2);
    let mut p = 0;
    for _ in 0..100 {
        p = progress(&run(&l, &n, &rw10(0x28, 0, 1, 0), &[]).await);
        if p == 32768 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(p, 32768, "half done");
    // REQUEST SENSE returns the same as data; INQUIRY and REPORT LUNS
    // work; another SANITIZE does not.
    let rs = run(&l, &n, &[0x03, 0, 0, 0, 18, 0], &[]).await;
    good(&rs);
    assert_eq!(
        (rs.data_in[2], rs.data_in[12], rs.data_in[13]),
        (2, 0x04, 0x1b)
    );
    assert_eq!(&rs.data_in[15..18], &[0x80, 0x80, 0x00]);
    good(&run(&l, &n, &[0x12, 0, 0, 0, 36, 0], &[]).await);
    good(&run(&l, &n, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], &[]).await);
    progress(&run(&l, &n, &sanitize(0x03, 0, 0), &[]).await);
    // A logical unit made anew over the same export (a new session)
    // sees it too.
    let again = Lun::new(s.clone(), 0);
    progress(&run(&again, &nexus("b"), &[0; 6], &[]).await);
    // Without IMMED the command completes when the sanitize does.
    s.gate.add_permits(2);
    for _ in 0..200 {
        if run(&l, &n, &[0; 6], &[]).await.status == GOOD {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    good(&run(&l, &n, &[0; 6], &[]).await);
    let l2 = l.clone();
    let waiting =
        tokio::spawn(async move { run(&l2, &nexus("a"), &sanitize(0x02, 0, 0), &[]).await });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!waiting.is_finished());
    progress(&run(&l, &n, &[0; 6], &[]).await);
    s.gate.add_permits(4);
    good(&waiting.await.unwrap());
    good(&run(&l, &n, &[0; 6], &[]).await);
}

#[tokio::test]
async fn a_failed_sanitize_refuses_media_access_until_exit_failure_mode() {
    let (e, l) = unit(MIB);
    let n = nexus("a");
    *e.fail_at.lock().unwrap() = Some(4096);
    // Failed, AUSE = 0: EXIT FAILURE MODE is refused.
    let r = run(&l, &n, &sanitize(0x02, 0, 0), &[]).await;
    assert_eq!(sense_of(&r).0, sense::KEY_MEDIUM_ERROR);
    *e.fail_at.lock().unwrap() = None;
    let failed = (sense::KEY_MEDIUM_ERROR, 0x31, 0x03);
    assert_eq!(
        sense_of(&run(&l, &n, &rw10(0x28, 0, 1, 0), &[]).await),
        failed
    );
    good(&run(&l, &n, &[0; 6], &[]).await);
    let r = run(&l, &n, &sanitize(0x1f, 0, 0), &[]).await;
    assert_eq!(sense_of(&r), (ILLEGAL, 0x24, 0));
    // A SANITIZE that completes ends it.
    good(&run(&l, &n, &sanitize(0x02, 0, 0), &[]).await);
    good(&run(&l, &n, &rw10(0x28, 0, 1, 0), &[]).await);
    // Failed with AUSE = 1: EXIT FAILURE MODE ends it.
    *e.fail_at.lock().unwrap() = Some(4096);
    let r = run(&l, &n, &sanitize(0x03, 0x20, 0), &[]).await;
    assert_eq!(sense_of(&r).0, sense::KEY_MEDIUM_ERROR);
    *e.fail_at.lock().unwrap() = None;
    assert_eq!(
        sense_of(&run(&l, &n, &rw10(0x2a, 0, 1, 0), &[0; 512]).await),
        failed
    );
    good(&run(&l, &n, &sanitize(0x1f, 0x20, 0), &[]).await);
    good(&run(&l, &n, &rw10(0x28, 0, 1, 0), &[]).await);
}
