//! The transmission phase: read request headers, check them, run each
//! request as its own task against the [`Backend`], and send replies as they
//! complete (out of order) through one writer task.
//!
//! Memory per connection is bounded by two semaphores: request slots and
//! payload bytes (a write's data from when it is read until it is applied; a
//! read's data until its reply is written). A client that stops reading
//! replies fills the socket, then the reply channel; its requests then hold
//! their permits, and the reader stops taking new requests. Nothing grows
//! without limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use cairn_proto::frame_io::Outbox;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn, Instrument};

use super::handshake::Negotiated;
use super::wire::*;
use super::{Backend, IoError, BLOCK_MIN, PAYLOAD_MAX};

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests in flight at once.
    pub requests_max: usize,
    /// Payload bytes held at once (at least [`PAYLOAD_MAX`], so that one
    /// largest request always fits).
    pub buffer_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            requests_max: 128,
            buffer_bytes: 2 * PAYLOAD_MAX,
        }
    }
}

/// Longest descriptor in a block status reply: the largest multiple of 512
/// a 32-bit length holds.
const DESCRIPTOR_MAX: u64 = 0xffff_fe00;

/// How the transmission phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// NBD_CMD_DISC.
    Disconnect,
    /// The client closed the connection between requests.
    Closed,
    /// The server is stopping.
    Shutdown,
    /// The connection was dropped: bad magic, a client gone mid-request, a
    /// failed write (logged where it happened).
    Dropped,
}

/// Counters for the closing log line and the tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
}

/// One reply, ready to write: header (and chunk fields), then data.
struct Out {
    head: Bytes,
    data: Option<Bytes>,
    _permit: Option<Permit>,
}

struct Permit {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

struct Conn<B> {
    export: Arc<B>,
    /// The size negotiated: requests beyond it are refused.
    size: u64,
    structured: bool,
    allocation: bool,
    counters: Arc<Counters>,
}

/// Serves requests until the client disconnects, the connection breaks or
/// `shutdown` turns true; waits for every request in flight to be answered.
pub async fn serve<R, W, B>(
    mut reader: R,
    writer: W,
    negotiated: Negotiated<B>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
    counters: Arc<Counters>,
) -> End
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let conn = Arc::new(Conn {
        export: negotiated.export,
        size: negotiated.size,
        structured: negotiated.structured,
        allocation: negotiated.allocation,
        counters,
    });
    let slots = Arc::new(Semaphore::new(limits.requests_max.max(1)));
    let bytes = Arc::new(Semaphore::new(limits.buffer_bytes.max(PAYLOAD_MAX) as usize));
    let (tx, rx) = mpsc::channel::<Out>(limits.requests_max.max(1));
    let writer_dead = Arc::new(Notify::new());
    let writer_task = tokio::spawn(
        write_replies(
            writer,
            rx,
            slots.clone(),
            limits.requests_max.max(1),
            writer_dead.clone(),
        )
        .in_current_span(),
    );

    // Made once and watched across requests: made anew for every request,
    // these waits registered and dropped a waiter (under a mutex) each time.
    let revoked = conn.export.revoked();
    let ended = async {
        tokio::select! {
            biased;
            _ = crate::server::stopped(&mut shutdown) => End::Shutdown,
            _ = writer_dead.notified() => End::Dropped,
            _ = revoked => {
                info!("export revoked (its volume changed under it); closing the connection");
                End::Dropped
            }
        }
    };
    tokio::pin!(ended);
    let end = loop {
        let mut header = [0u8; REQUEST_BYTES];
        let got = tokio::select! {
            biased;
            end = &mut ended => break end,
            got = read_header(&mut reader, &mut header) => got,
        };
        match got {
            Ok(true) => {}
            Ok(false) => break End::Closed,
            Err(e) => {
                info!("client vanished in a request header: {e}");
                break End::Dropped;
            }
        }
        let req = match parse_request(&header) {
            Ok(r) => r,
            Err(e) => {
                info!("closing the connection: {e}");
                break End::Dropped;
            }
        };
        conn.counters.requests.fetch_add(1, Ordering::Relaxed);
        if req.kind == CMD_DISC {
            debug!("client sent DISC");
            break End::Disconnect;
        }
        // The payload of a write must be consumed whatever the verdict, or
        // the next header would be read from inside it.
        let refusal = conn.check(&req);
        if req.kind == CMD_WRITE {
            if let Err((errno, why)) = refusal {
                if let Err(e) = skip(&mut reader, req.len as u64).await {
                    info!("client vanished inside a refused WRITE's payload: {e}");
                    break End::Dropped;
                }
                conn.refuse(&tx, &req, errno, &why).await;
                continue;
            }
            let permit = acquire(&slots, &bytes, req.len).await;
            let mut data = BytesMut::with_capacity(req.len as usize);
            if let Err(e) =
                cairn_proto::frame_io::read_to_len(&mut reader, &mut data, req.len as usize).await
            {
                info!(
                    "client vanished inside a WRITE's payload (offset {}, length {}): {e}",
                    req.offset, req.len
                );
                break End::Dropped;
            }
            conn.spawn(req, Some(data.freeze()), permit, tx.clone());
            continue;
        }
        if let Err((errno, why)) = refusal {
            conn.refuse(&tx, &req, errno, &why).await;
            continue;
        }
        let held = if req.kind == CMD_READ { req.len } else { 0 };
        let permit = acquire(&slots, &bytes, held).await;
        conn.spawn(req, None, permit, tx.clone());
    };
    // Every request task holds a sender: the writer ends once all of them
    // have answered.
    drop(tx);
    let _ = writer_task.await;
    end
}

/// Reads one request header; Ok(false) on a clean end of stream before it.
async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    header: &mut [u8; REQUEST_BYTES],
) -> std::io::Result<bool> {
    let n = r.read(&mut header[..]).await?;
    if n == 0 {
        return Ok(false);
    }
    r.read_exact(&mut header[n..]).await?;
    Ok(true)
}

async fn skip<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

async fn acquire(slots: &Arc<Semaphore>, bytes: &Arc<Semaphore>, len: u32) -> Permit {
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .expect("the slot semaphore is never closed");
    let bytes = if len > 0 {
        Some(
            bytes
                .clone()
                .acquire_many_owned(len)
                .await
                .expect("the byte semaphore is never closed"),
        )
    } else {
        None
    };
    Permit {
        _slot: slot,
        _bytes: bytes,
    }
}

/// Writes replies as they come; `slots` (of `slots_max`) are the
/// connection's request slots, to tell whether other requests are running.
/// A large read's data goes to the kernel by reference (`Outbox`), not
/// copied into a write buffer.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Out>,
    slots: Arc<Semaphore>,
    slots_max: usize,
    dead: Arc<Notify>,
) {
    let mut outbox = Outbox::new();
    let result: std::io::Result<()> = async {
        while let Some(out) = rx.recv().await {
            put(&mut outbox, out);
            // Batch whatever else is ready into the same send.
            put_ready(&mut outbox, &mut rx);
            // While other requests run, let the tasks about to queue their
            // replies run once first: replies that complete together then
            // leave in one send. Without it, most 4 KiB read replies went
            // out one per send (14k of 22k a second at QD32) and the target
            // spent 41% of its CPU in send. With nothing else in flight (a
            // permit is given back once its reply is put) there is nothing
            // to wait for, and a yield would only delay a QD1 reply.
            if !outbox.is_full() && slots.available_permits() < slots_max {
                tokio::task::yield_now().await;
                put_ready(&mut outbox, &mut rx);
            }
            outbox.write_to(&mut w).await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        info!("cannot send replies, closing the connection: {e}");
        dead.notify_one();
    }
}

/// Queues the replies that are ready, up to a batch.
fn put_ready(outbox: &mut Outbox, rx: &mut mpsc::Receiver<Out>) {
    while !outbox.is_full() {
        let Ok(out) = rx.try_recv() else { break };
        put(outbox, out);
    }
}

/// Queues a reply. Its permit is given back here; its data stays
/// referenced until written, at most a batch beyond what the permits count.
fn put(outbox: &mut Outbox, out: Out) {
    outbox.put_slice(&out.head);
    if let Some(d) = out.data {
        outbox.put_data(d);
    }
}

impl<B: Backend> Conn<B> {
    /// The error a request gets before it runs, if any.
    fn check(&self, req: &Request) -> Result<(), (u32, String)> {
        let info = self.export.info();
        let name = command_name(req.kind);
        let mut allowed = CMD_FLAG_FUA;
        match req.kind {
            CMD_READ => {
                if self.structured {
                    allowed |= CMD_FLAG_DF;
                }
            }
            CMD_WRITE_ZEROES => allowed |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => allowed |= CMD_FLAG_REQ_ONE,
            CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => {}
            other => return Err((EINVAL, format!("unknown command {other}"))),
        }
        if info.read_only {
            allowed &= !CMD_FLAG_FUA;
        }
        if req.flags & !allowed != 0 {
            return Err((
                EINVAL,
                format!(
                    "{name}: flags {:#x} not valid for this command here",
                    req.flags & !allowed
                ),
            ));
        }
        let writes = matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
        if writes && info.read_only {
            return Err((EPERM, format!("{name}: the export is read-only")));
        }
        if req.kind == CMD_FLUSH {
            if req.offset != 0 || req.len != 0 {
                return Err((EINVAL, "FLUSH: offset and length must be 0".into()));
            }
            return Ok(());
        }
        if req.kind == CMD_BLOCK_STATUS && !self.allocation {
            return Err((
                EINVAL,
                "BLOCK_STATUS: no metadata context was selected for this export".into(),
            ));
        }
        if matches!(req.kind, CMD_READ | CMD_WRITE) && req.len > PAYLOAD_MAX {
            let errno = if req.kind == CMD_READ && self.structured {
                EOVERFLOW
            } else {
                EINVAL
            };
            return Err((
                errno,
                format!(
                    "{name}: length {} is over the {PAYLOAD_MAX}-byte maximum payload",
                    req.len
                ),
            ));
        }
        let end = req.offset.checked_add(req.len as u64);
        if end.is_none_or(|e| e > self.size) {
            // WRITE and WRITE_ZEROES past the end: ENOSPC, as the protocol asks.
            let errno = if matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
                ENOSPC
            } else {
                EINVAL
            };
            return Err((
                errno,
                format!(
                    "{name}: offset {} length {} is beyond the export's end ({} bytes)",
                    req.offset, req.len, self.size
                ),
            ));
        }
        let block = BLOCK_MIN as u64;
        if req.kind != CMD_BLOCK_STATUS
            && (!req.offset.is_multiple_of(block) || !(req.len as u64).is_multiple_of(block))
        {
            return Err((
                EINVAL,
                format!(
                    "{name}: offset {} length {} is not aligned to {BLOCK_MIN} bytes",
                    req.offset, req.len
                ),
            ));
        }
        if req.kind == CMD_BLOCK_STATUS && req.len == 0 {
            return Err((EINVAL, "BLOCK_STATUS: length 0".into()));
        }
        if req.kind == CMD_WRITE_ZEROES
            && req.flags & CMD_FLAG_FAST_ZERO != 0
            && req.flags & CMD_FLAG_NO_HOLE != 0
        {
            // A zeroing that must allocate writes real zeros: no faster than
            // a write, so the client asked to be told at once.
            return Err((
                ENOTSUP,
                "WRITE_ZEROES: with NO_HOLE it is no faster than a write".into(),
            ));
        }
        Ok(())
    }

    async fn refuse(&self, tx: &mpsc::Sender<Out>, req: &Request, errno: u32, why: &str) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        // ENOTSUP for a fast zero is the protocol working, not a bad client.
        if errno == ENOTSUP {
            debug!(cookie = req.cookie, "refused: {why}");
        } else {
            info!(cookie = req.cookie, errno, "refused: {why}");
        }
        let _ = tx
            .send(Out {
                head: self.error_reply(req, errno, why),
                data: None,
                _permit: None,
            })
            .await;
    }

    fn error_reply(&self, req: &Request, errno: u32, why: &str) -> Bytes {
        if self.structured {
            error_chunk(req.cookie, errno, why)
        } else {
            Bytes::copy_from_slice(&simple_reply(req.cookie, errno))
        }
    }

    fn spawn(
        self: &Arc<Self>,
        req: Request,
        data: Option<Bytes>,
        permit: Permit,
        tx: mpsc::Sender<Out>,
    ) {
        let conn = self.clone();
        tokio::spawn(
            async move {
                let (head, data) = conn.run(&req, data).await;
                let _ = tx
                    .send(Out {
                        head,
                        data,
                        _permit: Some(permit),
                    })
                    .await;
            }
            .in_current_span(),
        );
    }

    /// Runs one checked request; answers the reply's header and data.
    async fn run(&self, req: &Request, data: Option<Bytes>) -> (Bytes, Option<Bytes>) {
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let e = &self.export;
        let result: Result<Reply, IoError> = match req.kind {
            CMD_READ if req.len == 0 => Ok(Reply::Read(Bytes::new())),
            CMD_READ => e.read(req.offset, req.len).await.map(Reply::Read),
            CMD_WRITE if req.len == 0 => Ok(Reply::Done),
            CMD_WRITE => {
                let data = data.unwrap_or_default();
                let n = data.len() as u64;
                e.write(req.offset, data, fua).await.map(|()| {
                    self.counters.bytes_written.fetch_add(n, Ordering::Relaxed);
                    Reply::Done
                })
            }
            CMD_FLUSH => e.flush().await.map(|()| Reply::Done),
            CMD_TRIM if req.len == 0 => Ok(Reply::Done),
            CMD_TRIM => e.trim(req.offset, req.len, fua).await.map(|()| Reply::Done),
            CMD_WRITE_ZEROES if req.len == 0 => Ok(Reply::Done),
            CMD_WRITE_ZEROES => e
                .write_zeroes(req.offset, req.len, fua, req.flags & CMD_FLAG_NO_HOLE != 0)
                .await
                .map(|()| Reply::Done),
            // Not advertised; some clients send it anyway. Nothing to warm.
            CMD_CACHE => Ok(Reply::Done),
            CMD_BLOCK_STATUS => e.block_status(req.offset, req.len).await.map(Reply::Status),
            _ => Err(IoError {
                errno: EINVAL,
                message: format!("unknown command {}", req.kind),
            }),
        };
        match result {
            Ok(Reply::Done) => (Bytes::copy_from_slice(&simple_reply(req.cookie, 0)), None),
            Ok(Reply::Read(data)) => {
                self.counters
                    .bytes_read
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if data.len() != req.len as usize {
                    // A backend bug; never send a reply of the wrong length.
                    let why = format!(
                        "READ: backend returned {} bytes for {} requested",
                        data.len(),
                        req.len
                    );
                    warn!("{why}");
                    return (self.error_reply(req, EIO, &why), None);
                }
                if self.structured {
                    if data.is_empty() {
                        let h = chunk_header(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
                        return (Bytes::copy_from_slice(&h), None);
                    }
                    let mut head = BytesMut::with_capacity(28);
                    head.put_slice(&chunk_header(
                        req.cookie,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        8 + data.len() as u32,
                    ));
                    head.put_u64(req.offset);
                    (head.freeze(), Some(data))
                } else {
                    (
                        Bytes::copy_from_slice(&simple_reply(req.cookie, 0)),
                        Some(data),
                    )
                }
            }
            Ok(Reply::Status(extents)) => {
                let d = descriptors(&extents, req.len, req.flags & CMD_FLAG_REQ_ONE != 0);
                if d.is_empty() {
                    let why = "BLOCK_STATUS: backend returned no extent";
                    warn!("{why}");
                    return (self.error_reply(req, EIO, why), None);
                }
                (
                    block_status_chunk(req.cookie, META_BASE_ALLOCATION_ID, &d),
                    None,
                )
            }
            Err(err) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                warn!(
                    cookie = req.cookie,
                    errno = err.errno,
                    "{} at offset {} length {} failed: {}",
                    command_name(req.kind),
                    req.offset,
                    req.len,
                    err.message
                );
                (self.error_reply(req, err.errno, &err.message), None)
            }
        }
    }
}

enum Reply {
    Done,
    Read(Bytes),
    Status(super::Extents),
}

/// Block status descriptors from the backend's runs: merged where flags
/// repeat, each at most [`DESCRIPTOR_MAX`], stopping once the request is
/// covered (only the last may reach past it); with `req_one`, one descriptor
/// no longer than the request.
pub fn descriptors(extents: &[(u64, u32)], len: u32, req_one: bool) -> Vec<(u32, u32)> {
    let mut merged: Vec<(u64, u32)> = Vec::new();
    for &(l, f) in extents.iter().filter(|(l, _)| *l > 0) {
        match merged.last_mut() {
            Some((ml, mf)) if *mf == f => *ml += l,
            _ => merged.push((l, f)),
        }
    }
    let mut out = Vec::new();
    let mut covered = 0u64;
    for (l, f) in merged {
        if covered >= len as u64 {
            break;
        }
        let mut l = l.min(DESCRIPTOR_MAX);
        if req_one {
            l = l.min(len as u64);
        }
        out.push((l as u32, f));
        covered += l;
        if req_one || l == DESCRIPTOR_MAX {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_merge_cap_and_honour_req_one() {
        let runs = [(4096, 0), (4096, 0), (1 << 20, 3), (0, 0), (512, 0)];
        assert_eq!(
            descriptors(&runs, 1 << 30, false),
            vec![(8192, 0), (1 << 20, 3), (512, 0)]
        );
        // Stops once covered; the last may reach past the request.
        assert_eq!(descriptors(&runs, 4096, false), vec![(8192, 0)]);
        assert_eq!(descriptors(&runs, 4096, true), vec![(4096, 0)]);
        // A 1 TiB hole: one descriptor of the largest aligned length.
        assert_eq!(
            descriptors(&[(1 << 40, 3)], u32::MAX, false),
            vec![(DESCRIPTOR_MAX as u32, 3)]
        );
        assert!(descriptors(&[], 512, false).is_empty());
    }
}
