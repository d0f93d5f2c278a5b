//! The chunk RPC server.
//!
//! Per connection there is one reader and one writer, joined in one task:
//!
//! - the reader takes an in-flight slot, reads one request frame, checks it,
//!   and spawns a task that runs it against the store. With every slot taken
//!   it stops reading the socket, which is the backpressure: TCP then slows
//!   the client down, and nothing on the server grows.
//! - each request task sends its reply, holding its slot, to the writer
//!   through a channel with room for every slot, so the send never waits.
//! - the writer writes replies in the order they complete and frees their
//!   slots once written, so queued replies count as in flight too.
//!
//! Besides the count, a connection's requests share a budget of data bytes
//! ([`REQUEST_BYTES_IN_FLIGHT_MAX`]), taken before a write's data is read or a
//! read is started and given back once the reply is written.
//!
//! Bad input is answered where it is found (see `Reader::handle_frame`) and never
//! reaches the store; only a stream that cannot be resynchronised (bad magic,
//! a frame over a limit, an undecodable header) closes the connection.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use cairn_group::msg::Refusal;
use cairn_proto::chunk::{ChunkRequest, ChunkResponse, ExtentInfo, NodeStat, Status};
use cairn_proto::frame::FRAME_DATA_BYTES_MAX;
use cairn_proto::group::{decode_peer, decode_request, encode_refusal, GroupRefusal, GroupRequest};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn, Instrument};

use super::frame_io::{
    read_header, read_part, read_prefix, Outbox, ReadFrameError, SOCKET_BUFFER_BYTES,
};
use super::request::{parse, Rejection, Request};
use crate::replica::Replication;
use crate::store::{IoBuf, Store, StoreError};

pub const REQUESTS_IN_FLIGHT_MAX_DEFAULT: usize = 256;
pub const CONNECTIONS_MAX_DEFAULT: usize = 1024;
/// Data bytes (write payloads and read replies) one connection may hold at
/// once. The request count alone would let a connection pin 256 x 8 MiB;
/// this keeps it to eight of the largest requests, plenty to fill a link.
pub const REQUEST_BYTES_IN_FLIGHT_MAX: u32 = 64 << 20;
// Any single request must fit the budget, or it would wait forever.
const _: () = assert!(FRAME_DATA_BYTES_MAX <= REQUEST_BYTES_IN_FLIGHT_MAX);
/// After shutdown, how long [`serve`] waits for replies to reach clients
/// before dropping the connections of clients that stopped reading. The
/// store operations themselves are always waited for.
pub const SHUTDOWN_REPLY_DRAIN_MAX: Duration = Duration::from_secs(30);
/// Pause after a failed `accept` (out of file descriptors, usually), so the
/// loop does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Longest error message sent in a reply. Store messages are far shorter; the
/// cap keeps every reply header provably under the frame header limit.
const REPLY_MESSAGE_BYTES_MAX: usize = 4096;
/// Longest a group request waits for the protocol's answer before it is
/// answered `Busy` (the client retries with the same id). Writes to a group
/// below `min_replicas` are refused `Degraded` at once, so only a stuck
/// replica or a lost reply makes a request wait this long.
const GROUP_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub cluster_id: String,
    pub node_id: u64,
    /// The data directory; its file system's size and free space go in NodeStat.
    pub data_dir: PathBuf,
    /// Requests read but not yet answered, per connection. When reached the
    /// server stops reading that socket until replies drain.
    pub requests_in_flight_max: usize,
    /// Open connections; one more is accepted, logged and closed.
    pub connections_max: usize,
    /// Largest data payload in a request frame, and so the largest read.
    pub frame_data_bytes_max: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            cluster_id: String::new(),
            node_id: 0,
            data_dir: PathBuf::from("."),
            requests_in_flight_max: REQUESTS_IN_FLIGHT_MAX_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            frame_data_bytes_max: FRAME_DATA_BYTES_MAX,
        }
    }
}

/// What every connection and request task shares.
struct Context {
    store: Store,
    config: ServerConfig,
    /// The group protocol driver; `None` when the server runs without a
    /// volume manager (then `Group` requests are refused).
    replication: Option<Replication>,
}

/// Serves the chunk RPC on `listener` until `shutdown` becomes true (or its
/// sender is dropped). Then it stops accepting and reading, lets every request
/// already read finish and its reply be written, and returns. The caller shuts
/// the store down afterwards.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    config: ServerConfig,
    replication: Option<Replication>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.requests_in_flight_max > 0,
        "requests_in_flight_max must be at least 1"
    );
    anyhow::ensure!(
        config.connections_max > 0,
        "connections_max must be at least 1"
    );
    anyhow::ensure!(
        config.frame_data_bytes_max > 0 && config.frame_data_bytes_max <= FRAME_DATA_BYTES_MAX,
        "frame_data_bytes_max {} must be from 1 to {FRAME_DATA_BYTES_MAX} bytes (clients accept no larger frames)",
        config.frame_data_bytes_max
    );
    let local_addr = listener
        .local_addr()
        .context("reading the chunk RPC listener's address")?;
    info!(%local_addr, node_id = config.node_id, "chunk RPC listening");

    let connections_max = config.connections_max;
    let context = Arc::new(Context {
        store,
        config,
        replication,
    });
    let connection_slots = Arc::new(Semaphore::new(connections_max));
    // Every connection and request task holds a clone of `tasks_alive`; recv
    // on `tasks_done` returns None once all are gone.
    let (tasks_alive, mut tasks_done) = mpsc::channel::<()>(1);
    let mut connections = JoinSet::new();
    // `shutdown` itself is borrowed by the wait below; connections get clones of this.
    let connection_shutdown = shutdown.clone();

    loop {
        tokio::select! {
            requested = shutdown_requested(&mut shutdown) => {
                if !requested {
                    info!("chunk RPC shutdown sender dropped; stopping");
                }
                break;
            }
            Some(ended) = connections.join_next() => log_task_end(ended),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = connection_slots.clone().try_acquire_owned() else {
                        warn!(
                            %peer,
                            connections_max,
                            "refusing chunk RPC connection: at the connection limit"
                        );
                        continue;
                    };
                    let connection = Connection {
                        context: context.clone(),
                        shutdown: connection_shutdown.clone(),
                        tasks_alive: tasks_alive.clone(),
                        _slot: slot,
                    };
                    let span = tracing::info_span!("chunk_conn", %peer);
                    connections.spawn(connection.run(stream).instrument(span));
                }
                Err(e) => {
                    warn!(error = %e, "accepting a chunk RPC connection failed; retrying");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }

    drop(listener);
    drop(tasks_alive);
    info!(
        connections = connections.len(),
        "chunk RPC stopping: draining in-flight requests"
    );
    let drained = tokio::time::timeout(SHUTDOWN_REPLY_DRAIN_MAX, async {
        while let Some(ended) = connections.join_next().await {
            log_task_end(ended);
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = connections.len(),
            "chunk RPC clients not reading their replies after {SHUTDOWN_REPLY_DRAIN_MAX:?}; dropping them"
        );
        connections.shutdown().await;
    }
    // Request tasks outlive a dropped connection: wait until their store
    // commands are done, so the caller's `store.shutdown()` follows them all.
    let _ = tasks_done.recv().await;
    info!("chunk RPC stopped");
    Ok(())
}

/// Resolves once shutdown is requested: true if by the sender, false if the
/// sender was dropped (which can no longer request it, so it counts too).
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) -> bool {
    // The guard `wait_for` returns is not Send; drop it here, not in a select.
    shutdown.wait_for(|stop| *stop).await.is_ok()
}

fn log_task_end(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended {
        if e.is_panic() {
            error!(error = %e, "chunk RPC connection task panicked");
        }
    }
}

/// One reply on its way to the writer, holding what its request took.
struct Reply {
    header: ChunkResponse,
    data: Option<Bytes>,
    _in_flight: InFlight,
}

/// A request's share of its connection's limits, given back on drop (after
/// its reply is written, or when the connection goes).
struct InFlight {
    _request: OwnedSemaphorePermit,
    _data_bytes: Option<OwnedSemaphorePermit>,
}

/// Why a connection's reader stopped.
enum ReaderEnd {
    /// Clean close between frames, or shutdown: nothing to report.
    Quiet(&'static str),
    /// The peer went away abruptly (mid-frame, reset): one info line.
    PeerGone(String),
    /// The peer broke the protocol: one warn line.
    Protocol(String),
}

/// One accepted connection; runs inside a span naming its peer.
struct Connection {
    context: Arc<Context>,
    shutdown: watch::Receiver<bool>,
    tasks_alive: mpsc::Sender<()>,
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    async fn run(self, stream: TcpStream) {
        // The span around this task names the peer on every line.
        debug!("chunk RPC connection accepted");
        let Connection {
            context,
            mut shutdown,
            tasks_alive,
            _slot,
        } = self;
        // Small replies must not wait for Nagle's algorithm.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "setting TCP_NODELAY failed");
        }
        let (read_half, write_half) = stream.into_split();
        let slots_max = context.config.requests_in_flight_max;
        // Room for a reply from every slot: a request task never waits to send.
        let (reply_tx, reply_rx) = mpsc::channel::<Reply>(slots_max);
        let reader = Reader {
            context,
            slots: Arc::new(Semaphore::new(slots_max)),
            data_bytes: Arc::new(Semaphore::new(REQUEST_BYTES_IN_FLIGHT_MAX as usize)),
            reply_tx,
            tasks_alive,
        };
        let (end, written) = tokio::join!(
            reader.run(read_half, &mut shutdown),
            write_replies(write_half, reply_rx)
        );
        match end {
            ReaderEnd::Quiet(why) => debug!("chunk RPC connection ending: {why}"),
            ReaderEnd::PeerGone(why) => info!("chunk RPC connection ending: {why}"),
            ReaderEnd::Protocol(why) => warn!("closing chunk RPC connection: {why}"),
        }
        if let Err(e) = written {
            debug!(error = %e, "writing replies stopped");
        }
    }
}

/// A connection's request reader. Dropping it (when it returns) drops its
/// reply sender, so the writer ends once the last request task has replied.
struct Reader {
    context: Arc<Context>,
    slots: Arc<Semaphore>,
    /// Permits are bytes; see [`REQUEST_BYTES_IN_FLIGHT_MAX`].
    data_bytes: Arc<Semaphore>,
    reply_tx: mpsc::Sender<Reply>,
    tasks_alive: mpsc::Sender<()>,
}

impl Reader {
    async fn run(
        self,
        read_half: OwnedReadHalf,
        shutdown: &mut watch::Receiver<bool>,
    ) -> ReaderEnd {
        let mut reader = BufReader::with_capacity(SOCKET_BUFFER_BYTES, read_half);
        // Made once and polled across requests: made anew for every request,
        // these waits registered and dropped two waiters (each under a
        // mutex) twice a request, 3% of a busy chunk server's CPU.
        let ended = async {
            tokio::select! {
                biased;
                _ = shutdown_requested(shutdown) => ReaderEnd::Quiet("server shutting down"),
                _ = self.reply_tx.closed() => ReaderEnd::PeerGone("reply writer stopped".into()),
            }
        };
        tokio::pin!(ended);
        loop {
            // Cancelling either wait below mid-frame is fine: the connection
            // is closing either way.
            let slot = tokio::select! {
                biased;
                end = &mut ended => return end,
                slot = self.slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return ReaderEnd::Quiet("in-flight slots closed"),
                },
            };
            let outcome = tokio::select! {
                biased;
                end = &mut ended => return end,
                outcome = self.handle_frame(&mut reader, slot) => outcome,
            };
            match outcome {
                Ok(()) => {}
                Err(FrameEnd::Read(ReadFrameError::Closed)) => {
                    return ReaderEnd::Quiet("peer closed the connection")
                }
                Err(FrameEnd::Read(
                    e @ (ReadFrameError::Truncated { .. } | ReadFrameError::Io { .. }),
                )) => return ReaderEnd::PeerGone(e.to_string()),
                Err(FrameEnd::Read(ReadFrameError::Frame(e))) => {
                    return ReaderEnd::Protocol(e.to_string())
                }
                Err(FrameEnd::UndecodableHeader(why)) => return ReaderEnd::Protocol(why),
            }
        }
    }

    /// Reads one request frame and either answers it at once (bad input) or
    /// spawns its execution. `slot` travels with the reply.
    ///
    /// Waiting for data bytes happens after the header and before the data
    /// is read, so a connection at its budget leaves the data in the socket.
    async fn handle_frame(
        &self,
        reader: &mut BufReader<OwnedReadHalf>,
        slot: OwnedSemaphorePermit,
    ) -> Result<(), FrameEnd> {
        let (context, reply_tx) = (&self.context, &self.reply_tx);
        let data_bytes_max = context.config.frame_data_bytes_max;
        // The prefix is checked against both limits before anything is allocated.
        let prefix = read_prefix(reader, data_bytes_max).await?;
        let header_raw = read_header(reader, &prefix).await?;
        let header = match ChunkRequest::decode(header_raw.as_slice()) {
            Ok(header) => header,
            Err(e) => {
                let why = format!(
                    "undecodable request header of {} bytes: {e}",
                    prefix.header_bytes
                );
                let in_flight = InFlight {
                    _request: slot,
                    _data_bytes: None,
                };
                let header = failure_header(0, Status::InvalidArgument, &why);
                send_reply(reply_tx, header, None, in_flight).await;
                return Err(FrameEnd::UndecodableHeader(why));
            }
        };
        let request_id = header.request_id;
        let request = match parse(&header, prefix.data_bytes, data_bytes_max) {
            Ok(request) => request,
            Err(Rejection { status, message }) => {
                debug!(request_id, ?status, "rejecting request: {message}");
                // Consume the data so the next frame starts where the client thinks.
                let mut data = reader.take(u64::from(prefix.data_bytes));
                let skipped = tokio::io::copy(&mut data, &mut tokio::io::sink())
                    .await
                    .map_err(|e| ReadFrameError::Io {
                        part: "frame data",
                        source: e,
                    })?;
                if skipped != u64::from(prefix.data_bytes) {
                    return Err(ReadFrameError::Truncated { part: "frame data" }.into());
                }
                let in_flight = InFlight {
                    _request: slot,
                    _data_bytes: None,
                };
                let header = failure_header(request_id, status, &message);
                send_reply(reply_tx, header, None, in_flight).await;
                return Ok(());
            }
        };
        let buffer_bytes = request.buffer_bytes();
        let data_bytes = match buffer_bytes {
            0 => None,
            // Never closed; the error arm only keeps this free of unwrap.
            n => match self.data_bytes.clone().acquire_many_owned(n).await {
                Ok(permit) => Some(permit),
                Err(_) => return Err(ReadFrameError::Closed.into()),
            },
        };
        let in_flight = InFlight {
            _request: slot,
            _data_bytes: data_bytes,
        };
        let data = if prefix.data_bytes > 0 {
            // Straight from the socket into the buffer the store hands the kernel.
            let mut data = IoBuf::for_overwrite(prefix.data_bytes as usize);
            read_part(reader, &mut data, "frame data").await?;
            Some(data)
        } else {
            None
        };
        if let Request::Peer { header } = request {
            // One way: hand it over and free the slot; no reply.
            drop(in_flight);
            let data = data.map(Bytes::from_owner).unwrap_or_default();
            match (&context.replication, decode_peer(&header, data)) {
                (Some(r), Ok((msg, extent_bytes))) => r.peer(msg, extent_bytes),
                (None, _) => debug!("peer message while replication is off; dropped"),
                (_, Err(e)) => warn!(request_id, "dropping a bad peer message: {e}"),
            }
            return Ok(());
        }
        let (context, reply_tx, tasks_alive) =
            (context.clone(), reply_tx.clone(), self.tasks_alive.clone());
        tokio::spawn(
            async move {
                let _alive = tasks_alive;
                let (header, data) = match execute(&context, request, data).await {
                    Ok(answer) => answer.into_reply(request_id),
                    Err(failure) => {
                        failure.log(request_id);
                        (
                            failure_header(request_id, failure.status, &failure.message),
                            None,
                        )
                    }
                };
                send_reply(&reply_tx, header, data, in_flight).await;
            }
            .in_current_span(),
        );
        Ok(())
    }
}

/// Why [`Reader::handle_frame`] could not go on with the stream.
enum FrameEnd {
    Read(ReadFrameError),
    /// Answered with request id 0, then the connection closes: a peer that
    /// sends undecodable headers is broken, and its next frame is unlikely
    /// to be better.
    UndecodableHeader(String),
}

impl From<ReadFrameError> for FrameEnd {
    fn from(e: ReadFrameError) -> Self {
        FrameEnd::Read(e)
    }
}

async fn send_reply(
    reply_tx: &mpsc::Sender<Reply>,
    header: ChunkResponse,
    data: Option<Bytes>,
    in_flight: InFlight,
) {
    // Fails only when the writer stopped (peer gone); the reply has nowhere to go.
    let _ = reply_tx
        .send(Reply {
            header,
            data,
            _in_flight: in_flight,
        })
        .await;
}

fn failure_header(request_id: u64, status: Status, message: &str) -> ChunkResponse {
    let mut message = message.to_string();
    if message.len() > REPLY_MESSAGE_BYTES_MAX {
        let mut end = REPLY_MESSAGE_BYTES_MAX;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    ChunkResponse {
        request_id,
        status: status as i32,
        message,
        ..Default::default()
    }
}

/// Writes replies until every sender is gone, then closes the write side.
async fn write_replies(
    mut write_half: OwnedWriteHalf,
    mut replies: mpsc::Receiver<Reply>,
) -> io::Result<()> {
    // A large read's data goes to the kernel from the buffer the store read
    // it into, by reference (`Outbox`), not copied into a write buffer.
    let mut out = Outbox::new();
    while let Some(reply) = replies.recv().await {
        let header = reply.header.encode_to_vec();
        // The request's slot is given back now; its data stays referenced
        // until written, at most a batch more than the slots account for.
        out.put_frame(&header, reply.data.unwrap_or_default());
        // Replies that completed together leave together.
        out.send_when_idle(&mut write_half, || replies.is_empty())
            .await?;
    }
    out.write_to(&mut write_half).await?;
    write_half.shutdown().await
}

/// A successful request's reply content.
#[derive(Default)]
struct Answer {
    data: Option<Bytes>,
    extents: Vec<ExtentInfo>,
    list_more: bool,
    node: Option<NodeStat>,
    refusal: Option<GroupRefusal>,
}

impl Answer {
    fn into_reply(self, request_id: u64) -> (ChunkResponse, Option<Bytes>) {
        let status = if self.refusal.is_some() {
            Status::Refused
        } else {
            Status::Ok
        };
        let header = ChunkResponse {
            request_id,
            status: status as i32,
            refusal: self.refusal,
            extents: self.extents,
            list_more: self.list_more,
            node: self.node,
            ..Default::default()
        };
        (header, self.data)
    }
}

/// A failed request's status and message.
struct Failure {
    status: Status,
    message: String,
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::InvalidArgument(_) => Status::InvalidArgument,
            StoreError::Checksum { .. } => Status::ChecksumMismatch,
            StoreError::NoSpace { .. } => Status::NoSpace,
            StoreError::ExtentSizeMismatch { .. } => Status::ExtentSizeMismatch,
            StoreError::NotFound(_) => Status::NotFound,
            StoreError::ShuttingDown => Status::ShuttingDown,
            StoreError::CorruptExtent { .. } | StoreError::Io { .. } | StoreError::Failed(_) => {
                Status::IoError
            }
        };
        Failure {
            status,
            message: e.to_string(),
        }
    }
}

impl Failure {
    fn log(&self, request_id: u64) {
        let status = self.status;
        match status {
            // The client's mistake or an ordinary answer: no alarm.
            Status::InvalidArgument
            | Status::NotFound
            | Status::ShuttingDown
            | Status::ExtentSizeMismatch => {
                debug!(request_id, ?status, "request failed: {}", self.message)
            }
            _ => warn!(request_id, ?status, "request failed: {}", self.message),
        }
    }
}

/// Runs one checked request against the store.
async fn execute(
    context: &Context,
    request: Request,
    data: Option<IoBuf>,
) -> Result<Answer, Failure> {
    let store = &context.store;
    match request {
        Request::Read {
            key,
            below,
            extent_bytes,
            offset,
            len,
        } => {
            let data = store
                .read_at(key, &below, extent_bytes, offset, len)
                .await?;
            if data.len() != len as usize {
                return Err(Failure {
                    status: Status::IoError,
                    message: format!(
                        "{key}: store returned {} bytes for a read of {len}",
                        data.len()
                    ),
                });
            }
            Ok(Answer {
                data: Some(Bytes::from_owner(data)),
                ..Default::default()
            })
        }
        Request::Write {
            key,
            extent_bytes,
            offset,
            len,
            fua,
        } => {
            let data = data.filter(|d| d.len() == len as usize).ok_or_else(|| Failure {
                status: Status::IoError,
                message: format!("{key}: internal error: write of {len} bytes reached the store without its data"),
            })?;
            store.write(key, extent_bytes, offset, data, fua).await?;
            Ok(Answer::default())
        }
        Request::WriteZeroes {
            key,
            extent_bytes,
            offset,
            len,
            fua,
            punch,
        } => {
            store
                .write_zeroes(key, extent_bytes, offset, len, fua, punch)
                .await?;
            Ok(Answer::default())
        }
        Request::Trim {
            key,
            extent_bytes,
            offset,
            len,
        } => {
            store.trim(key, extent_bytes, offset, len).await?;
            Ok(Answer::default())
        }
        Request::Flush => {
            store.flush().await?;
            Ok(Answer::default())
        }
        Request::ExtentList {
            volume,
            after,
            limit,
        } => {
            let page = store.list(volume, after, limit).await?;
            let extents = page
                .extents
                .iter()
                .map(|s| ExtentInfo {
                    key: Some(s.key.into()),
                    extent_bytes: s.extent_bytes,
                    allocated_bytes: s.allocated_bytes,
                })
                .collect();
            Ok(Answer {
                extents,
                list_more: page.more,
                ..Default::default()
            })
        }
        Request::ExtentStat { key } => {
            let stat = store.stat(key).await?.ok_or(StoreError::NotFound(key))?;
            let info = ExtentInfo {
                key: Some(stat.key.into()),
                extent_bytes: stat.extent_bytes,
                allocated_bytes: stat.allocated_bytes,
            };
            Ok(Answer {
                extents: vec![info],
                ..Default::default()
            })
        }
        Request::ExtentHeld { key } => {
            let words = store
                .held_blocks(key)
                .await?
                .ok_or(StoreError::NotFound(key))?;
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            Ok(Answer {
                data: Some(Bytes::from(bytes)),
                ..Default::default()
            })
        }
        Request::NodeStat => Ok(Answer {
            node: Some(node_stat(context).await?),
            ..Default::default()
        }),
        Request::Group { header, .. } => group_request(context, &header, data).await,
        Request::Peer { .. } => unreachable!("peer messages are handed over by the reader"),
    }
}

/// Runs a volume client's request through the group protocol.
async fn group_request(
    context: &Context,
    header: &GroupRequest,
    data: Option<IoBuf>,
) -> Result<Answer, Failure> {
    let invalid = |message: String| Failure {
        status: Status::InvalidArgument,
        message,
    };
    let Some(replication) = &context.replication else {
        return Err(invalid(format!(
            "node {}: replicated I/O needs a volume manager (--volmgr); this chunk server runs stand-alone",
            context.config.node_id
        )));
    };
    let data = data.map(Bytes::from_owner).unwrap_or_default();
    let (req, extent_bytes) = decode_request(header, data).map_err(invalid)?;
    // Named only if the reply times out: formatting it for every request
    // showed in profiles.
    let (key, id, client) = (req.key, req.id, req.client);
    let Some(rx) = replication.request(req, extent_bytes).await else {
        return Err(Failure {
            status: Status::ShuttingDown,
            message: format!("node {}: replication stopped", context.config.node_id),
        });
    };
    let refused = |r: Refusal| Answer {
        refusal: Some(encode_refusal(&r)),
        ..Default::default()
    };
    match tokio::time::timeout(GROUP_REPLY_TIMEOUT, rx).await {
        Ok(Ok(Ok(data))) => Ok(Answer {
            data,
            ..Default::default()
        }),
        Ok(Ok(Err(r))) => Ok(refused(r)),
        // Replaced by a retry of the same request, or dropped by the
        // protocol (a stale copy): the client has moved on; Busy is safe.
        Ok(Err(_)) => Ok(refused(Refusal::Busy)),
        Err(_) => {
            debug!(
                "{key} request {id} of client {client:#x}: no outcome within {GROUP_REPLY_TIMEOUT:?}; answering Busy"
            );
            Ok(refused(Refusal::Busy))
        }
    }
}

async fn node_stat(context: &Context) -> Result<NodeStat, Failure> {
    let usage = context.store.usage().await?;
    let data_dir = context.config.data_dir.clone();
    // statvfs can block for long on a sick file system; keep it off the runtime.
    let fs = tokio::task::spawn_blocking(move || {
        nix::sys::statvfs::statvfs(&data_dir)
            .map_err(|e| format!("statvfs of {}: {e}", data_dir.display()))
    })
    .await
    .unwrap_or_else(|e| Err(format!("statvfs task failed: {e}")))
    .map_err(|message| Failure {
        status: Status::IoError,
        message,
    })?;
    // The statvfs field types are u64 on 64-bit Linux but narrower elsewhere.
    #[allow(clippy::useless_conversion)]
    let (blocks, blocks_available, fragment_bytes) = (
        u64::from(fs.blocks()),
        u64::from(fs.blocks_available()),
        u64::from(fs.fragment_size()),
    );
    Ok(NodeStat {
        cluster_id: context.config.cluster_id.clone(),
        node_id: context.config.node_id,
        capacity_bytes: blocks.saturating_mul(fragment_bytes),
        free_bytes: blocks_available.saturating_mul(fragment_bytes),
        used_bytes: usage.allocated_bytes,
        extents: usage.extents,
    })
}
