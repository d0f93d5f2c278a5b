//! Raft messages between volume manager members, over TCP with Cairn's frame
//! format.
//!
//! One link task per peer holds a bounded queue and one connection, opened
//! on demand and reopened after a failure. A message is one frame: header
//! [`PeerFrame`] (cluster id and sender, checked by the receiver), data the
//! raft message in raft-rs's own protobuf encoding. Raft tolerates loss, so a
//! full queue or a broken connection drops messages and reports the peer
//! unreachable to the node loop, which makes raft probe it gently instead of
//! streaming appends into the void.
//!
//! The receiving member never writes on a link's connection, so anything
//! readable there means the peer closed it (it restarted). The link checks
//! before each write and reconnects, rather than lose the message to the
//! peer's reset.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc;
use std::time::Duration;

use cairn_proto::frame_io::write_frame;
use prost::Message as _;
use raft::prelude::Message;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::node::{Input, Machine, Transport};

/// Messages queued per peer before new ones are dropped.
pub const PEER_QUEUE_MAX: usize = 4096;
/// How long a connection attempt to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between connection attempts to a peer that is down.
pub const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// The frame header of a raft message between members.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct PeerFrame {
    /// Always [`PEER_FRAME_MAGIC`]: tells a raft frame from an API request
    /// arriving on the same port.
    #[prost(fixed64, tag = "1")]
    pub magic: u64,
    #[prost(string, tag = "2")]
    pub cluster_id: String,
    #[prost(uint64, tag = "3")]
    pub from: u64,
    /// The address the sender advertises: how a member that joined empty
    /// (and so knows no addresses yet) can answer the leader.
    #[prost(string, tag = "4")]
    pub from_addr: String,
}

/// `PeerFrame.magic`: "CRNRAFT1" little-endian.
pub const PEER_FRAME_MAGIC: u64 = u64::from_le_bytes(*b"CRNRAFT1");

/// Raft transport over TCP; see the module docs.
pub struct TcpTransport<M: Machine> {
    me: u64,
    my_addr: String,
    cluster_id: String,
    runtime: tokio::runtime::Handle,
    node: mpsc::Sender<Input<M>>,
    links: HashMap<u64, Link>,
}

struct Link {
    addr: String,
    tx: tokio::sync::mpsc::Sender<Message>,
}

impl<M: Machine> TcpTransport<M> {
    /// `node` is the loop's own input channel (for unreachable reports);
    /// link tasks run on `runtime`.
    pub fn new(
        me: u64,
        my_addr: String,
        cluster_id: String,
        runtime: tokio::runtime::Handle,
        node: mpsc::Sender<Input<M>>,
    ) -> Self {
        Self {
            me,
            my_addr,
            cluster_id,
            runtime,
            node,
            links: HashMap::new(),
        }
    }
}

impl<M: Machine> Transport for TcpTransport<M> {
    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            let delivered = match self.links.get(&to) {
                Some(link) => link.tx.try_send(m).is_ok(),
                None => false,
            };
            if !delivered {
                let _ = self.node.send(Input::Unreachable(to));
            }
        }
    }

    fn set_members(&mut self, members: &BTreeMap<u64, String>) {
        self.links
            .retain(|id, link| members.get(id).is_some_and(|a| *a == link.addr));
        for (&id, addr) in members {
            if id == self.me || self.links.contains_key(&id) {
                continue;
            }
            let (tx, rx) = tokio::sync::mpsc::channel(PEER_QUEUE_MAX);
            self.runtime.spawn(run_link(
                (self.me, self.my_addr.clone()),
                id,
                addr.clone(),
                self.cluster_id.clone(),
                rx,
                self.node.clone(),
            ));
            self.links.insert(
                id,
                Link {
                    addr: addr.clone(),
                    tx,
                },
            );
        }
    }
}

/// Sends queued messages to one peer until the transport drops the link.
async fn run_link<M: Machine>(
    (me, my_addr): (u64, String),
    peer: u64,
    addr: String,
    cluster_id: String,
    mut rx: tokio::sync::mpsc::Receiver<Message>,
    node: mpsc::Sender<Input<M>>,
) {
    let header = PeerFrame {
        magic: PEER_FRAME_MAGIC,
        cluster_id,
        from: me,
        from_addr: my_addr,
    }
    .encode_to_vec();
    let mut conn: Option<BufWriter<TcpStream>> = None;
    let mut warned = false;
    while let Some(first) = rx.recv().await {
        if let Some(why) = conn.as_ref().and_then(|w| closed_by_peer(w.get_ref())) {
            // The peer restarted (or crashed) since the last message. A
            // write would still succeed into the kernel's buffer and the
            // message would be lost to the peer's reset, and so would the
            // next, which only reports the error: after a member restarted,
            // the first votes the others sent it vanished that way, each
            // costing an election timeout. So reconnect before writing.
            debug!(peer, %addr, "raft connection closed by the peer ({why}); reconnecting");
            conn = None;
        }
        if conn.is_none() {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    if warned {
                        info!(peer, %addr, "raft peer reachable again");
                    }
                    warned = false;
                    conn = Some(BufWriter::new(s));
                }
                Ok(Err(e)) => {
                    unreachable_for_now(&node, peer, &addr, &e.to_string(), &mut warned);
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
                Err(_) => {
                    unreachable_for_now(&node, peer, &addr, "connect timed out", &mut warned);
                    continue;
                }
            }
        }
        let w = conn.as_mut().expect("connected above");
        let mut result = write_message(w, &header, &first).await;
        // Whatever else is queued goes out in the same flush.
        while result.is_ok() {
            match rx.try_recv() {
                Ok(m) => result = write_message(w, &header, &m).await,
                Err(_) => break,
            }
        }
        if result.is_ok() {
            result = w.flush().await;
        }
        if let Err(e) = result {
            debug!(peer, %addr, "raft connection lost: {e}");
            conn = None;
            let _ = node.send(Input::Unreachable(peer));
        }
    }
}

/// Whether the peer has closed the connection: it never sends on it, so
/// anything readable (end of stream, a reset, or stray bytes) means the
/// connection is finished.
fn closed_by_peer(s: &TcpStream) -> Option<String> {
    let mut byte = [0u8; 1];
    match s.try_read(&mut byte) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Ok(0) => Some("end of stream".into()),
        Ok(_) => Some("unexpected bytes from the receiving side".into()),
        Err(e) => Some(e.to_string()),
    }
}

fn unreachable_for_now<M: Machine>(
    node: &mpsc::Sender<Input<M>>,
    peer: u64,
    addr: &str,
    why: &str,
    warned: &mut bool,
) {
    if !*warned {
        warn!(peer, addr, "raft peer unreachable: {why}");
        *warned = true;
    }
    let _ = node.send(Input::Unreachable(peer));
}

async fn write_message(
    w: &mut BufWriter<TcpStream>,
    header: &[u8],
    m: &Message,
) -> std::io::Result<()> {
    let data = protobuf::Message::write_to_bytes(m)
        .map_err(|e| std::io::Error::other(format!("encoding a raft message: {e}")))?;
    write_frame(w, header, &data).await
}

#[cfg(test)]
mod tests {
    //! The link to a member that restarts: real loopback sockets, the peer
    //! played by a bare listener that reads frames.

    use std::collections::BTreeMap;

    use cairn_proto::frame::FRAME_DATA_BYTES_MAX;
    use cairn_proto::frame_io::{read_header, read_part, read_prefix};
    use tokio::net::{TcpListener, TcpSocket};

    use super::*;
    use crate::testing::ListMachine;

    fn listen(addr: std::net::SocketAddr) -> TcpListener {
        let s = TcpSocket::new_v4().unwrap();
        s.set_reuseaddr(true).unwrap();
        s.bind(addr).unwrap();
        s.listen(8).unwrap()
    }

    /// The term of the next raft message on `s`.
    async fn next_term(s: &mut TcpStream) -> u64 {
        let prefix = read_prefix(s, FRAME_DATA_BYTES_MAX).await.unwrap();
        let header = read_header(s, &prefix).await.unwrap();
        assert_eq!(PeerFrame::decode(&header[..]).unwrap().from, 1);
        let mut data = vec![0u8; prefix.data_bytes as usize];
        read_part(s, &mut data, "frame data").await.unwrap();
        let m: Message = protobuf::Message::parse_from_bytes(&data).unwrap();
        m.term
    }

    fn message(term: u64) -> Message {
        Message {
            to: 2,
            term,
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_message_after_a_peer_restarts_reaches_it() {
        let first = listen("127.0.0.1:0".parse().unwrap());
        let addr = first.local_addr().unwrap();
        let (node_tx, node_rx) = mpsc::channel::<Input<ListMachine>>();
        let mut t = TcpTransport::new(
            1,
            "127.0.0.1:1".into(),
            "c1".into(),
            tokio::runtime::Handle::current(),
            node_tx,
        );
        t.set_members(&BTreeMap::from([
            (1, "127.0.0.1:1".to_string()),
            (2, addr.to_string()),
        ]));
        t.send(vec![message(1)]);
        let (mut s, _) = first.accept().await.unwrap();
        assert_eq!(next_term(&mut s).await, 1);

        // The peer process dies (its sockets close) and a new one listens
        // at the same address.
        drop(s);
        drop(first);
        let second = listen(addr);
        // Let the peer's close reach the link's socket, as it has long
        // before the next message in a real restart.
        tokio::time::sleep(Duration::from_millis(50)).await;
        t.send(vec![message(2)]);
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(5), second.accept())
            .await
            .expect("the link reconnects for the message after the restart")
            .unwrap();
        let term = tokio::time::timeout(Duration::from_secs(5), next_term(&mut s))
            .await
            .expect("the message after the restart arrives");
        assert_eq!(term, 2, "the first message after the restart is delivered");
        assert!(
            node_rx
                .try_iter()
                .all(|i| !matches!(i, Input::Unreachable(_))),
            "a peer that restarted is not reported unreachable"
        );
    }
}
