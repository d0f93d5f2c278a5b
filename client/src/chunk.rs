//! A pipelined chunk RPC client.
//!
//! One TCP connection carries up to [`CLIENT_REQUESTS_IN_FLIGHT_MAX`] requests
//! at once. Each call takes a slot, registers a oneshot under a fresh request
//! id, and hands its frame to a writer task; a reader task routes every reply
//! to its call by id, so replies may come back in any order. When the
//! connection dies, every pending and later call fails with
//! [`ChunkError::Disconnected`]; nothing waits forever.
//!
//! Calls are cancel-safe: a dropped call's reply is read and discarded when it
//! arrives, and only then is its slot freed.

use std::collections::HashMap;
use std::fmt::Display;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use cairn_proto::chunk::{
    ChunkRequest, ChunkResponse, ExtentInfo, ExtentKey, NodeStat, Op, Status,
};
use cairn_proto::frame::{FRAME_DATA_BYTES_MAX, FRAME_HEADER_BYTES_MAX};
use prost::Message;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::debug;

use cairn_proto::frame_io::{
    read_header, read_part_bytes, read_prefix, Outbox, ReadFrameError, SOCKET_BUFFER_BYTES,
};

/// Requests one client connection has on the wire at once; more calls wait.
/// Matches the server's default per-connection limit, so a single client
/// can keep a server connection fully busy without being throttled by TCP.
pub const CLIENT_REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// Longest wait for the TCP handshake in [`ChunkClient::connect`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChunkError {
    /// The server answered with an error status.
    #[error("chunk server {peer} answered {status:?}: {message}")]
    Status {
        peer: SocketAddr,
        status: Status,
        message: String,
    },
    /// The connection is gone; the request may or may not have been applied.
    #[error("connection to chunk server {peer} lost: {reason}")]
    Disconnected { peer: SocketAddr, reason: String },
    /// The server's reply makes no sense (a bug on one side).
    #[error("chunk server {peer} sent a bad reply: {reason}")]
    Protocol { peer: SocketAddr, reason: String },
    /// The request was refused before sending, since the server would have
    /// closed the connection (and failed every other call) over it.
    #[error("request to chunk server {peer} not sent: {reason}")]
    InvalidRequest { peer: SocketAddr, reason: String },
}

impl ChunkError {
    /// The server's status, if the server answered.
    pub fn status(&self) -> Option<Status> {
        match self {
            ChunkError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One page of [`ChunkClient::extent_list`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExtentListPage {
    pub extents: Vec<ExtentInfo>,
    /// More entries follow the last one; ask again with it as `after`.
    pub more: bool,
}

type CallResult = Result<(ChunkResponse, Bytes), ChunkError>;

/// A handle to one connection. Clones share it; the connection closes when
/// the last clone is dropped.
#[derive(Clone)]
pub struct ChunkClient {
    inner: Arc<Inner>,
}

struct Inner {
    peer: SocketAddr,
    next_request_id: AtomicU64,
    calls: Arc<Calls>,
    frames_tx: mpsc::Sender<OutFrame>,
    reader_task: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // No call can be pending (each holds a clone); the writer ends on its
        // own once `frames_tx` is gone, closing the socket's write side.
        self.reader_task.abort();
    }
}

/// A request frame on its way to the writer task.
struct OutFrame {
    header: Vec<u8>,
    data: Bytes,
}

/// Calls waiting for replies, shared by callers and the reader and writer tasks.
struct Calls {
    peer: SocketAddr,
    state: Mutex<CallsState>,
    /// One permit per request on the wire, held until its reply arrives.
    slots: Arc<Semaphore>,
}

struct CallsState {
    pending: HashMap<u64, PendingCall>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

struct PendingCall {
    reply: oneshot::Sender<CallResult>,
    _slot: OwnedSemaphorePermit,
}

impl Calls {
    fn lock(&self) -> MutexGuard<'_, CallsState> {
        // The lock is never held across a panic point that leaves the map
        // inconsistent, so a poisoned lock's contents are still good.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn disconnected(&self, reason: String) -> ChunkError {
        ChunkError::Disconnected {
            peer: self.peer,
            reason,
        }
    }

    fn closed_error(&self) -> ChunkError {
        let reason = self.lock().closed.clone();
        self.disconnected(reason.unwrap_or_else(|| "connection closed".to_string()))
    }

    fn register(&self, request_id: u64, call: PendingCall) -> Result<(), ChunkError> {
        let mut state = self.lock();
        if let Some(reason) = &state.closed {
            return Err(self.disconnected(reason.clone()));
        }
        let previous = state.pending.insert(request_id, call);
        assert!(
            previous.is_none(),
            "request id {request_id} allocated twice"
        );
        Ok(())
    }

    fn forget(&self, request_id: u64) {
        self.lock().pending.remove(&request_id);
    }

    /// Routes a reply to its call; an unknown id is a protocol error.
    fn complete(&self, response: ChunkResponse, data: Bytes) -> Result<(), String> {
        let request_id = response.request_id;
        let call = self.lock().pending.remove(&request_id);
        match call {
            // The caller may have given up (cancelled); the reply still frees the slot.
            Some(call) => {
                let _ = call.reply.send(Ok((response, data)));
                Ok(())
            }
            None => Err(format!("reply for unknown request id {request_id}")),
        }
    }

    /// Ends the connection for every caller, pending and future.
    fn fail_all(&self, reason: String) {
        let (pending, reason) = {
            let mut state = self.lock();
            // The first reason is the real one; later ones are consequences.
            let reason = state.closed.get_or_insert(reason).clone();
            (std::mem::take(&mut state.pending), reason)
        };
        debug!(peer = %self.peer, pending = pending.len(), "chunk RPC client connection ended: {reason}");
        for (_, call) in pending {
            let _ = call.reply.send(Err(self.disconnected(reason.clone())));
        }
        // Wakes callers waiting for a slot; they then see `closed`.
        self.slots.close();
    }
}

impl ChunkClient {
    /// Connects to a chunk server.
    pub async fn connect<A: ToSocketAddrs + Display>(addr: A) -> anyhow::Result<ChunkClient> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
            .await
            .map_err(|_| anyhow::anyhow!("timed out after {CONNECT_TIMEOUT:?}"))
            .and_then(|connected| connected.map_err(anyhow::Error::from))
            .with_context(|| format!("connecting to chunk server {addr}"))?;
        // Requests are small and latency at queue depth 1 matters.
        stream
            .set_nodelay(true)
            .with_context(|| format!("setting TCP_NODELAY towards chunk server {addr}"))?;
        let peer = stream
            .peer_addr()
            .with_context(|| format!("reading the address of chunk server {addr}"))?;
        let (read_half, write_half) = stream.into_split();
        let calls = Arc::new(Calls {
            peer,
            state: Mutex::new(CallsState {
                pending: HashMap::new(),
                closed: None,
            }),
            slots: Arc::new(Semaphore::new(CLIENT_REQUESTS_IN_FLIGHT_MAX)),
        });
        // Every queued frame holds a slot, so this channel never fills.
        let (frames_tx, frames_rx) = mpsc::channel(CLIENT_REQUESTS_IN_FLIGHT_MAX);
        tokio::spawn(write_frames(write_half, frames_rx, calls.clone()));
        let reader_task = tokio::spawn(read_replies(read_half, calls.clone()));
        Ok(ChunkClient {
            inner: Arc::new(Inner {
                peer,
                next_request_id: AtomicU64::new(1),
                calls,
                frames_tx,
                reader_task,
            }),
        })
    }

    pub fn peer(&self) -> SocketAddr {
        self.inner.peer
    }

    /// Why the connection ended, if it has.
    pub fn closed_reason(&self) -> Option<String> {
        self.inner.calls.lock().closed.clone()
    }

    /// Sends any request with `data` and returns the server's reply whatever
    /// its status; only transport failures are errors. The request id is
    /// replaced by a fresh one.
    pub async fn call(&self, mut request: ChunkRequest, data: Bytes) -> CallResult {
        let peer = self.inner.peer;
        let invalid = |reason: String| ChunkError::InvalidRequest { peer, reason };
        if data.len() > FRAME_DATA_BYTES_MAX as usize {
            return Err(invalid(format!(
                "{} data bytes are over the {FRAME_DATA_BYTES_MAX}-byte frame limit; split the I/O",
                data.len()
            )));
        }
        let calls = &self.inner.calls;
        let slot = match calls.slots.clone().acquire_owned().await {
            Ok(slot) => slot,
            Err(_) => return Err(calls.closed_error()),
        };
        // Ids start at 1: a reply with id 0 means "your header was undecodable".
        let request_id = self.inner.next_request_id.fetch_add(1, Ordering::Relaxed);
        request.request_id = request_id;
        let header = request.encode_to_vec();
        if header.len() > FRAME_HEADER_BYTES_MAX as usize {
            return Err(invalid(format!(
                "request header of {} bytes is over the frame limit",
                header.len()
            )));
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        calls.register(
            request_id,
            PendingCall {
                reply: reply_tx,
                _slot: slot,
            },
        )?;
        // No await between registering and queueing, so a cancelled call never
        // leaves a registration without a request on the wire. The channel
        // has room for every slot, so `Full` cannot happen.
        if self
            .inner
            .frames_tx
            .try_send(OutFrame { header, data })
            .is_err()
        {
            calls.forget(request_id);
            return Err(calls.closed_error());
        }
        match reply_rx.await {
            Ok(result) => result,
            Err(_) => Err(calls.closed_error()),
        }
    }

    /// [`call`](Self::call), with a non-Ok status turned into [`ChunkError::Status`].
    async fn call_ok(&self, request: ChunkRequest, data: Bytes) -> CallResult {
        let (response, data) = self.call(request, data).await?;
        match Status::try_from(response.status) {
            Ok(Status::Ok) => Ok((response, data)),
            Ok(status) => Err(ChunkError::Status {
                peer: self.inner.peer,
                status,
                message: response.message,
            }),
            Err(_) => Err(self.protocol(format!(
                "unknown status {} (message: {})",
                response.status, response.message
            ))),
        }
    }

    fn protocol(&self, reason: String) -> ChunkError {
        ChunkError::Protocol {
            peer: self.inner.peer,
            reason,
        }
    }

    /// Reads `len` bytes at `offset` of an extent version.
    pub async fn read(
        &self,
        key: impl Into<ExtentKey>,
        extent_bytes: u32,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, ChunkError> {
        self.read_through(key, &[], extent_bytes, offset, len).await
    }

    /// Reads like [`read`](Self::read), through the versions at the epochs
    /// `below` the key's (newest first) for blocks the version does not hold.
    pub async fn read_through(
        &self,
        key: impl Into<ExtentKey>,
        below: &[u64],
        extent_bytes: u32,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, ChunkError> {
        let mut request = range_request(Op::Read, key.into(), extent_bytes, offset, len);
        request.below = below.to_vec();
        let (_, data) = self.call_ok(request, Bytes::new()).await?;
        if data.len() != len as usize {
            return Err(self.protocol(format!(
                "read of {len} bytes answered with {} bytes",
                data.len()
            )));
        }
        Ok(data)
    }

    /// Writes `data` at `offset`; with `fua` it is durable when this returns.
    pub async fn write(
        &self,
        key: impl Into<ExtentKey>,
        extent_bytes: u32,
        offset: u64,
        data: impl Into<Bytes>,
        fua: bool,
    ) -> Result<(), ChunkError> {
        let data = data.into();
        // Over u32 is over the frame limit too, which `call` reports.
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let mut request = range_request(Op::Write, key.into(), extent_bytes, offset, len);
        request.fua = fua;
        self.call_ok(request, data).await?;
        Ok(())
    }

    /// Makes the range read as zeros; `no_hole` keeps its blocks allocated.
    pub async fn write_zeroes(
        &self,
        key: impl Into<ExtentKey>,
        extent_bytes: u32,
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), ChunkError> {
        let mut request = range_request(Op::WriteZeroes, key.into(), extent_bytes, offset, len);
        request.fua = fua;
        request.no_hole = no_hole;
        self.call_ok(request, Bytes::new()).await?;
        Ok(())
    }

    /// Discards the range: it reads as zeros and its space is given back.
    pub async fn trim(
        &self,
        key: impl Into<ExtentKey>,
        extent_bytes: u32,
        offset: u64,
        len: u32,
    ) -> Result<(), ChunkError> {
        let request = range_request(Op::Trim, key.into(), extent_bytes, offset, len);
        self.call_ok(request, Bytes::new()).await?;
        Ok(())
    }

    /// Makes every write acknowledged before this call durable.
    pub async fn flush(&self) -> Result<(), ChunkError> {
        self.call_ok(op_request(Op::Flush), Bytes::new()).await?;
        Ok(())
    }

    /// One page of stored extent versions in key order, after `after`
    /// (exclusive). The server caps `limit` at its page size; 0 asks for a
    /// full page.
    pub async fn extent_list(
        &self,
        volume_filter: Option<u64>,
        after: Option<ExtentKey>,
        limit: u32,
    ) -> Result<ExtentListPage, ChunkError> {
        let request = ChunkRequest {
            volume_filter,
            list_after: after,
            list_limit: limit,
            ..op_request(Op::ExtentList)
        };
        let (response, _) = self.call_ok(request, Bytes::new()).await?;
        Ok(ExtentListPage {
            extents: response.extents,
            more: response.list_more,
        })
    }

    /// One extent version's size and allocation; `Status::NotFound` if absent.
    pub async fn extent_stat(&self, key: impl Into<ExtentKey>) -> Result<ExtentInfo, ChunkError> {
        let request = ChunkRequest {
            extent: Some(key.into()),
            ..op_request(Op::ExtentStat)
        };
        let (response, _) = self.call_ok(request, Bytes::new()).await?;
        match <[ExtentInfo; 1]>::try_from(response.extents) {
            Ok([info]) => Ok(info),
            Err(extents) => Err(self.protocol(format!(
                "extent stat answered with {} entries instead of 1",
                extents.len()
            ))),
        }
    }

    /// Which 4 KiB blocks one extent version holds itself (not read
    /// through to older epochs), one bit per block; `Status::NotFound` if
    /// the version is not stored.
    pub async fn extent_held(&self, key: impl Into<ExtentKey>) -> Result<Vec<u64>, ChunkError> {
        let request = ChunkRequest {
            extent: Some(key.into()),
            ..op_request(Op::ExtentHeld)
        };
        let (_, data) = self.call_ok(request, Bytes::new()).await?;
        if data.len() % 8 != 0 {
            return Err(self.protocol(format!(
                "extent held bitmap of {} bytes is not whole 64-bit words",
                data.len()
            )));
        }
        Ok(data
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .collect())
    }

    /// The node's identity, space and extent count.
    pub async fn node_stat(&self) -> Result<NodeStat, ChunkError> {
        let (response, _) = self.call_ok(op_request(Op::NodeStat), Bytes::new()).await?;
        response
            .node
            .ok_or_else(|| self.protocol("node stat reply carries no node".to_string()))
    }
}

fn op_request(op: Op) -> ChunkRequest {
    ChunkRequest {
        op: op as i32,
        ..Default::default()
    }
}

fn range_request(op: Op, key: ExtentKey, extent_bytes: u32, offset: u64, len: u32) -> ChunkRequest {
    ChunkRequest {
        extent: Some(key),
        extent_bytes,
        offset_bytes: offset,
        length_bytes: len,
        ..op_request(op)
    }
}

/// Writes queued request frames until the client is dropped.
async fn write_frames(
    write_half: OwnedWriteHalf,
    mut frames: mpsc::Receiver<OutFrame>,
    calls: Arc<Calls>,
) {
    let mut writer = write_half;
    // A large write's data goes to the kernel from the caller's buffer, by
    // reference (`Outbox`), not copied into a write buffer.
    let mut out = Outbox::new();
    let written: io::Result<()> = async {
        while let Some(frame) = frames.recv().await {
            out.put_frame(&frame.header, frame.data);
            // Requests queued together leave together.
            out.send_when_idle(&mut writer, || frames.is_empty())
                .await?;
        }
        out.write_to(&mut writer).await?;
        writer.shutdown().await
    }
    .await;
    if let Err(e) = written {
        calls.fail_all(format!("writing a request failed: {e}"));
    }
}

/// Routes replies to their calls until the connection ends, then fails
/// whatever is still pending.
async fn read_replies(read_half: OwnedReadHalf, calls: Arc<Calls>) {
    let mut reader = BufReader::with_capacity(SOCKET_BUFFER_BYTES, read_half);
    let reason = loop {
        let (response, data) = match read_reply(&mut reader).await {
            Ok(reply) => reply,
            Err(ReadFrameError::Closed) => break "server closed the connection".to_string(),
            Err(e) => break e.to_string(),
        };
        if response.request_id == 0 {
            break format!(
                "server could not decode a request header and closed the connection: {}",
                response.message
            );
        }
        if let Err(reason) = calls.complete(response, data) {
            break format!("protocol error: {reason}");
        }
    };
    calls.fail_all(reason);
}

async fn read_reply(
    reader: &mut BufReader<OwnedReadHalf>,
) -> Result<(ChunkResponse, Bytes), ReadFrameError> {
    let prefix = read_prefix(reader, FRAME_DATA_BYTES_MAX).await?;
    let header = read_header(reader, &prefix).await?;
    let data = read_part_bytes(reader, prefix.data_bytes as usize, "frame data").await?;
    let response = ChunkResponse::decode(header.as_slice()).map_err(|e| ReadFrameError::Io {
        part: "reply header",
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })?;
    Ok((response, data))
}
