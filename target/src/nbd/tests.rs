//! The protocol over an in-memory pipe against [`MemCatalog`]: whole
//! sessions, replies out of order, and the handshake's corners.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{watch, Notify};

use super::handshake::{negotiate, Outcome};
use super::memory::{MemCatalog, MemExport};
use super::transmit::{serve, Counters, End, Limits};
use super::wire::*;
use super::{Backend, Catalog, ExportInfo, Extents, IoError};

/// Runs a whole server session (handshake, then transmission) on one end of
/// a pipe; answers how transmission ended (None: no transmission).
fn spawn_server<C: Catalog + Clone>(
    catalog: C,
) -> (DuplexStream, tokio::task::JoinHandle<Option<End>>) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let task = tokio::spawn(async move {
        let mut io = server;
        match negotiate(&mut io, &catalog).await {
            Ok(Outcome::Go(n)) => {
                let (r, w) = tokio::io::split(io);
                let (_tx, rx) = watch::channel(false);
                Some(
                    serve(
                        r,
                        w,
                        n,
                        Limits::default(),
                        rx,
                        Arc::new(Counters::default()),
                    )
                    .await,
                )
            }
            _ => None,
        }
    });
    (client, task)
}

async fn greet(c: &mut DuplexStream, flags: u32) {
    let mut g = [0u8; 18];
    c.read_exact(&mut g).await.unwrap();
    assert_eq!(&g[0..8], &NBDMAGIC.to_be_bytes());
    assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
    assert_eq!(
        u16::from_be_bytes([g[16], g[17]]),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
    c.write_all(&flags.to_be_bytes()).await.unwrap();
}

async fn option(c: &mut DuplexStream, opt: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    c.write_all(&b).await.unwrap();
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).await.unwrap();
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), opt);
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        c.read_exact(&mut d).await.unwrap();
        out.push((kind, d));
        if kind == REP_ACK || kind & (1 << 31) != 0 {
            return out;
        }
    }
}

fn name_and_queries(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

async fn request(
    c: &mut DuplexStream,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) {
    let h = encode_request(&Request {
        flags,
        kind,
        cookie,
        offset,
        len,
    });
    c.write_all(&h).await.unwrap();
    c.write_all(payload).await.unwrap();
}

/// One structured chunk: (flags, type, cookie, payload).
async fn chunk(c: &mut DuplexStream) -> (u16, u16, u64, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(h[0..4].try_into().unwrap()),
        STRUCTURED_REPLY_MAGIC
    );
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    c.read_exact(&mut d).await.unwrap();
    (
        u16::from_be_bytes(h[4..6].try_into().unwrap()),
        u16::from_be_bytes(h[6..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
        d,
    )
}

async fn simple(c: &mut DuplexStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    c.read_exact(&mut h).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(h[0..4].try_into().unwrap()),
        SIMPLE_REPLY_MAGIC
    );
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

fn catalog() -> MemCatalog {
    MemCatalog {
        exports: vec![
            MemExport::new("vol", 1 << 20, false),
            MemExport::new("ro", 1 << 16, true),
        ],
    }
}

#[tokio::test]
async fn a_whole_session_with_structured_replies_and_block_status() {
    let (mut c, server) = spawn_server(catalog());
    greet(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let list = option(&mut c, OPT_LIST, &[]).await;
    assert_eq!(list.len(), 3);
    assert_eq!(list[0].0, REP_SERVER);
    assert_eq!(
        option(&mut c, OPT_STRUCTURED_REPLY, &[]).await,
        vec![(REP_ACK, vec![])]
    );
    let listed = option(&mut c, OPT_LIST_META_CONTEXT, &name_and_queries("vol", &[])).await;
    assert_eq!(listed[0].0, REP_META_CONTEXT);
    assert_eq!(&listed[0].1[4..], META_BASE_ALLOCATION.as_bytes());
    let set = option(
        &mut c,
        OPT_SET_META_CONTEXT,
        &name_and_queries("vol", &["base:allocation", "x-other:thing"]),
    )
    .await;
    assert_eq!(set.len(), 2, "{set:?}");
    assert_eq!(&set[0].1[0..4], &META_BASE_ALLOCATION_ID.to_be_bytes());
    let info = option(
        &mut c,
        OPT_GO,
        &go_data("vol", &[INFO_BLOCK_SIZE, INFO_NAME]),
    )
    .await;
    let export = info
        .iter()
        .find(|(k, d)| *k == REP_INFO && d[0..2] == [0, 0])
        .unwrap();
    let flags = u16::from_be_bytes(export.1[10..12].try_into().unwrap());
    assert_ne!(flags & FLAG_SEND_DF, 0);
    assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
    let bs = info
        .iter()
        .find(|(k, d)| *k == REP_INFO && d[0..2] == [0, 3])
        .unwrap();
    assert_eq!(&bs.1[2..], &[0, 0, 2, 0, 0, 0, 16, 0, 2, 0, 0, 0]);

    request(&mut c, CMD_FLAG_FUA, CMD_WRITE, 1, 8192, 4096, &[7u8; 4096]).await;
    assert_eq!(simple(&mut c).await, (0, 1));
    request(&mut c, 0, CMD_READ, 2, 8192, 8192, &[]).await;
    let (f, t, cookie, d) = chunk(&mut c).await;
    assert_eq!((f, t, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 2));
    assert_eq!(&d[0..8], &8192u64.to_be_bytes());
    assert_eq!(&d[8..8 + 4096], &[7u8; 4096][..]);
    assert_eq!(&d[8 + 4096..], &[0u8; 4096][..]);
    request(&mut c, 0, CMD_BLOCK_STATUS, 3, 0, 1 << 20, &[]).await;
    let (_, t, _, d) = chunk(&mut c).await;
    assert_eq!(t, REPLY_TYPE_BLOCK_STATUS);
    let descs: Vec<(u32, u32)> = d[4..]
        .chunks(8)
        .map(|x| {
            (
                u32::from_be_bytes(x[0..4].try_into().unwrap()),
                u32::from_be_bytes(x[4..8].try_into().unwrap()),
            )
        })
        .collect();
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(descs, vec![(8192, hz), (4096, 0), ((1 << 20) - 12288, hz)]);
    request(
        &mut c,
        CMD_FLAG_REQ_ONE,
        CMD_BLOCK_STATUS,
        4,
        8192,
        100,
        &[],
    )
    .await;
    let (_, _, _, d) = chunk(&mut c).await;
    assert_eq!(&d[4..], &[0, 0, 0, 100, 0, 0, 0, 0]);
    request(&mut c, 0, CMD_FLUSH, 5, 0, 0, &[]).await;
    assert_eq!(simple(&mut c).await, (0, 5));
    request(&mut c, 0, CMD_DISC, 6, 0, 0, &[]).await;
    assert_eq!(server.await.unwrap(), Some(End::Disconnect));
}

#[tokio::test]
async fn export_name_ends_the_handshake_with_or_without_zeroes() {
    for (flags, reply_len) in [
        (FLAG_C_FIXED_NEWSTYLE, 134),
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 10),
    ] {
        let (mut c, server) = spawn_server(catalog());
        greet(&mut c, flags).await;
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        b.extend_from_slice(&2u32.to_be_bytes());
        b.extend_from_slice(b"ro");
        c.write_all(&b).await.unwrap();
        let mut r = vec![0u8; reply_len];
        c.read_exact(&mut r).await.unwrap();
        assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), 1 << 16);
        let tflags = u16::from_be_bytes(r[8..10].try_into().unwrap());
        assert_ne!(tflags & FLAG_READ_ONLY, 0);
        assert_eq!(tflags & (FLAG_SEND_TRIM | FLAG_SEND_DF), 0);
        // Simple replies: a write to the read-only export is EPERM.
        request(&mut c, 0, CMD_WRITE, 9, 0, 512, &[1; 512]).await;
        assert_eq!(simple(&mut c).await, (EPERM, 9));
        drop(c);
        assert_eq!(server.await.unwrap(), Some(End::Closed));
    }
}

#[tokio::test]
async fn unknown_client_flags_and_unknown_exports() {
    let (mut c, server) = spawn_server(catalog());
    greet(&mut c, 1 << 5).await;
    assert_eq!(server.await.unwrap(), None);
    let _ = c.read_u8().await.expect_err("closed");

    let (mut c, server) = spawn_server(catalog());
    greet(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
    let r = option(&mut c, OPT_GO, &go_data("nope", &[])).await;
    assert_eq!(
        r,
        vec![(REP_ERR_UNKNOWN, b"no volume called \"nope\"".to_vec())]
    );
    let r = option(&mut c, OPT_INFO, &go_data("", &[])).await;
    assert!(
        r.iter().any(|(k, _)| *k == REP_ACK),
        "the default export is the first"
    );
    assert_eq!(
        option(&mut c, OPT_ABORT, &[]).await,
        vec![(REP_ACK, vec![])]
    );
    assert_eq!(server.await.unwrap(), None);
}

/// A backend whose reads at offset 0 wait for a signal: the reply to a later
/// read overtakes it.
struct Gated {
    inner: Arc<MemExport>,
    gate: Arc<Notify>,
}

impl Backend for Gated {
    fn info(&self) -> &ExportInfo {
        self.inner.info()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        if offset == 0 {
            self.gate.notified().await;
        }
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.inner.write(offset, data, fua).await
    }
    async fn write_zeroes(&self, o: u64, l: u32, fua: bool, nh: bool) -> Result<(), IoError> {
        self.inner.write_zeroes(o, l, fua, nh).await
    }
    async fn trim(&self, o: u64, l: u32, fua: bool) -> Result<(), IoError> {
        self.inner.trim(o, l, fua).await
    }
    async fn flush(&self) -> Result<(), IoError> {
        self.inner.flush().await
    }
    async fn block_status(&self, o: u64, l: u32) -> Result<Extents, IoError> {
        self.inner.block_status(o, l).await
    }
}

#[derive(Clone)]
struct GatedCatalog(Arc<Gated>);

impl Catalog for GatedCatalog {
    type Export = Gated;
    type Reservations = crate::iscsi::scsi::pr::MemPrStore;
    fn reservations(&self, _: &str, _: &Arc<Gated>) -> Self::Reservations {
        Default::default()
    }
    async fn lookup(&self, _: &str) -> Result<Option<ExportInfo>, String> {
        Ok(Some(self.0.info().clone()))
    }
    async fn list(&self) -> Result<Vec<ExportInfo>, String> {
        Ok(vec![self.0.info().clone()])
    }
    async fn open(&self, _: &str) -> Result<Option<Arc<Gated>>, String> {
        Ok(Some(self.0.clone()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_come_out_of_order_and_errors_stay_per_request() {
    let gate = Arc::new(Notify::new());
    let inner = MemExport::new("vol", 1 << 20, false);
    let (mut c, server) = spawn_server(GatedCatalog(Arc::new(Gated {
        inner: inner.clone(),
        gate: gate.clone(),
    })));
    greet(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    option(&mut c, OPT_GO, &go_data("vol", &[])).await;
    request(&mut c, 0, CMD_READ, 1, 0, 512, &[]).await;
    request(&mut c, 0, CMD_READ, 2, 4096, 512, &[]).await;
    let (err, cookie) = simple(&mut c).await;
    assert_eq!((err, cookie), (0, 2), "the second read answers first");
    let mut d = [0u8; 512];
    c.read_exact(&mut d).await.unwrap();
    gate.notify_one();
    assert_eq!(simple(&mut c).await, (0, 1));
    c.read_exact(&mut d).await.unwrap();

    // A backend failure is that request's EIO, and the connection goes on.
    *inner.fail_at.lock().unwrap() = Some(8192);
    request(&mut c, 0, CMD_WRITE, 3, 8192, 512, &[1; 512]).await;
    assert_eq!(simple(&mut c).await, (EIO, 3));
    request(&mut c, 0, CMD_WRITE, 4, 0, 512, &[1; 512]).await;
    assert_eq!(simple(&mut c).await, (0, 4));
    drop(c);
    assert_eq!(server.await.unwrap(), Some(End::Closed));
}
