//! Outgoing group messages: one link per peer chunk server, a task that owns
//! a TCP connection and writes `Op::Peer` frames from a bounded queue.
//!
//! The group protocol tolerates lost messages (every message is resent until
//! acknowledged), so a link never blocks the driver: when its queue is full
//! or its peer unreachable, messages are dropped and counted, and the
//! protocol's retries carry on once the peer is back. Peer frames get no
//! reply; the reading half is drained only to notice the peer closing.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use cairn_group::NodeId;
use cairn_proto::chunk::{ChunkRequest, Op};
use cairn_proto::frame_io::Outbox;
use cairn_proto::group::PeerHeader;
use prost::Message;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info};

/// Messages queued per peer before new ones are dropped.
const LINK_QUEUE: usize = 4096;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed connection before the next attempt; messages that
/// arrive meanwhile are dropped.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

struct Link {
    addr: String,
    tx: mpsc::Sender<(PeerHeader, Bytes)>,
}

/// Every link of this node.
pub struct Peers {
    me: NodeId,
    links: HashMap<NodeId, Link>,
    /// Messages dropped because a queue was full.
    pub dropped: u64,
}

impl Peers {
    pub fn new(me: NodeId) -> Self {
        Peers {
            me,
            links: HashMap::new(),
            dropped: 0,
        }
    }

    /// Queues a message for `to` at `addr` (a changed address replaces the
    /// link).
    pub fn send(&mut self, to: NodeId, addr: &str, header: PeerHeader, data: Bytes) {
        let stale = self
            .links
            .get(&to)
            .is_none_or(|l| l.addr != addr || l.tx.is_closed());
        if stale {
            let (tx, rx) = mpsc::channel(LINK_QUEUE);
            tokio::spawn(run_link(self.me, to, addr.to_string(), rx));
            self.links.insert(
                to,
                Link {
                    addr: addr.to_string(),
                    tx,
                },
            );
        }
        let link = self.links.get(&to).expect("inserted above");
        if link.tx.try_send((header, data)).is_err() {
            self.dropped += 1;
        }
    }

    /// Drops links to nodes no longer in the map.
    pub fn retain(&mut self, keep: impl Fn(NodeId) -> bool) {
        self.links.retain(|id, _| keep(*id));
    }
}

async fn run_link(
    me: NodeId,
    to: NodeId,
    addr: String,
    mut rx: mpsc::Receiver<(PeerHeader, Bytes)>,
) {
    let mut request_id = 0u64;
    let mut complained = false;
    loop {
        // Wait for something to send before connecting.
        let Some(first) = rx.recv().await else {
            return;
        };
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                if !complained {
                    info!(node = me, peer = to, %addr, "cannot reach peer chunk server: {e}; group messages to it are dropped until it answers");
                    complained = true;
                }
                drop_for(&mut rx, RECONNECT_PAUSE).await;
                continue;
            }
            Err(_) => {
                if !complained {
                    info!(node = me, peer = to, %addr, "connecting to peer chunk server timed out; group messages to it are dropped until it answers");
                    complained = true;
                }
                drop_for(&mut rx, RECONNECT_PAUSE).await;
                continue;
            }
        };
        if complained {
            info!(node = me, peer = to, %addr, "peer chunk server reachable again");
            complained = false;
        }
        let _ = stream.set_nodelay(true);
        let (mut read_half, write_half) = stream.into_split();
        let mut writer = write_half;
        // A large forwarded write's data goes out by reference (`Outbox`).
        let mut out = Outbox::new();
        let mut next = Some(first);
        let mut sink = [0u8; 4096];
        let ended: Result<(), String> = async {
            loop {
                let (header, data) = match next.take() {
                    Some(m) => m,
                    None => tokio::select! {
                        m = rx.recv() => match m {
                            Some(m) => m,
                            None => return Ok(()),
                        },
                        // The peer never answers Peer frames; anything read
                        // is discarded, and end of stream means it closed.
                        n = read_half.read(&mut sink) => match n {
                            Ok(0) => return Err("peer closed the connection".into()),
                            Ok(_) => continue,
                            Err(e) => return Err(e.to_string()),
                        },
                    },
                };
                request_id += 1;
                let frame = ChunkRequest {
                    request_id,
                    op: Op::Peer as i32,
                    peer: Some(header),
                    ..Default::default()
                };
                out.put_frame(&frame.encode_to_vec(), data);
                if rx.is_empty() || out.is_full() {
                    out.write_to(&mut writer).await.map_err(|e| e.to_string())?;
                }
            }
        }
        .await;
        match ended {
            Ok(()) => return,
            Err(e) => debug!(node = me, peer = to, %addr, "peer link lost: {e}; reconnecting"),
        }
    }
}

/// Discards queued messages for `pause`.
async fn drop_for(rx: &mut mpsc::Receiver<(PeerHeader, Bytes)>, pause: Duration) {
    let deadline = tokio::time::Instant::now() + pause;
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, rx.recv()).await {}
}
