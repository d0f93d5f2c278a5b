//! The volume manager's TCP listener: API requests from clients and chunk
//! servers, and raft messages from other members, on one port.
//!
//! A frame whose header decodes as a [`PeerFrame`] with the right magic is a
//! raft message (one-way, no reply) and goes to the node loop once its
//! cluster id is checked; any other frame is an API request, handed to the
//! [`Handler`] on its own task, so requests on one connection are answered
//! out of order as they finish (a long poll does not hold up the rest). Bad
//! frames close the connection with one log line; other connections never
//! notice.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use cairn_proto::frame_io::{read_header, read_part, read_prefix, write_frame, ReadFrameError};
use prost::Message as _;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::node::{Input, Machine};
use crate::transport::{PeerFrame, PEER_FRAME_MAGIC};

/// Raft snapshots travel as one message; the catalogue of a large cluster
/// can exceed the chunk servers' 8 MiB frame limit.
pub const FRAME_DATA_BYTES_MAX: u32 = 256 << 20;
/// API requests one connection may have in progress (long polls included).
pub const REQUESTS_PER_CONNECTION_MAX: usize = 64;
pub const CONNECTIONS_MAX: usize = 4096;

/// Answers one API request: `(header, data)` in, `(header, data)` out.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        header: Vec<u8>,
        data: Vec<u8>,
        peer: SocketAddr,
    ) -> impl std::future::Future<Output = (Vec<u8>, Vec<u8>)> + Send;
}

/// Serves `listener` until `stop` turns true.
pub async fn serve<M: Machine, H: Handler>(
    listener: TcpListener,
    cluster_id: String,
    node: mpsc::Sender<Input<M>>,
    handler: Arc<H>,
    mut stop: watch::Receiver<bool>,
) {
    let connections = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("accepting a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        if connections.load(Ordering::SeqCst) >= CONNECTIONS_MAX {
            warn!(%peer, "refusing a connection: {CONNECTIONS_MAX} already open");
            continue;
        }
        let _ = stream.set_nodelay(true);
        connections.fetch_add(1, Ordering::SeqCst);
        let (cluster_id, node, handler, connections, stop) = (
            cluster_id.clone(),
            node.clone(),
            handler.clone(),
            connections.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = connection(stream, peer, cluster_id, node, handler, stop).await {
                info!(%peer, "closing connection: {e}");
            }
            connections.fetch_sub(1, Ordering::SeqCst);
        });
    }
    debug!("listener stopped");
}

async fn connection<M: Machine, H: Handler>(
    stream: TcpStream,
    peer: SocketAddr,
    cluster_id: String,
    node: mpsc::Sender<Input<M>>,
    handler: Arc<H>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let (r, w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let (reply_tx, mut reply_rx) =
        tokio::sync::mpsc::channel::<(Vec<u8>, Vec<u8>)>(REQUESTS_PER_CONNECTION_MAX);
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::new(w);
        while let Some((h, d)) = reply_rx.recv().await {
            write_frame(&mut w, &h, &d).await?;
            while let Ok((h, d)) = reply_rx.try_recv() {
                write_frame(&mut w, &h, &d).await?;
            }
            w.flush().await?;
        }
        Ok::<(), std::io::Error>(())
    });
    let in_progress = Arc::new(tokio::sync::Semaphore::new(REQUESTS_PER_CONNECTION_MAX));
    let mut peer_seen = false;
    let result = loop {
        let prefix = tokio::select! {
            p = read_prefix(&mut reader, FRAME_DATA_BYTES_MAX) => p,
            _ = stop.changed() => break Ok(()),
        };
        let prefix = match prefix {
            Ok(p) => p,
            Err(ReadFrameError::Closed) => break Ok(()),
            Err(e) => break Err(e.to_string()),
        };
        let header = match read_header(&mut reader, &prefix).await {
            Ok(h) => h,
            Err(e) => break Err(e.to_string()),
        };
        let mut data = vec![0u8; prefix.data_bytes as usize];
        if let Err(e) = read_part(&mut reader, &mut data, "frame data").await {
            break Err(e.to_string());
        }
        if let Ok(pf) = PeerFrame::decode(&header[..]) {
            if pf.magic == PEER_FRAME_MAGIC {
                if pf.cluster_id != cluster_id {
                    break Err(format!(
                        "raft message from member {} of cluster {:?}, this is {cluster_id:?}",
                        pf.from, pf.cluster_id
                    ));
                }
                if !peer_seen && !pf.from_addr.is_empty() {
                    peer_seen = true;
                    let _ = node.send(Input::PeerSeen {
                        id: pf.from,
                        addr: pf.from_addr.clone(),
                    });
                }
                match protobuf::Message::parse_from_bytes(&data) {
                    Ok(m) => {
                        if node.send(Input::Raft(Box::new(m))).is_err() {
                            break Ok(()); // the node loop has stopped
                        }
                    }
                    Err(e) => {
                        break Err(format!(
                            "undecodable raft message from member {}: {e}",
                            pf.from
                        ))
                    }
                }
                continue;
            }
        }
        let permit = match in_progress.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => break Ok(()),
        };
        let (handler, reply_tx) = (handler.clone(), reply_tx.clone());
        tokio::spawn(async move {
            let reply = handler.handle(header, data, peer).await;
            let _ = reply_tx.send(reply).await;
            drop(permit);
        });
    };
    drop(reply_tx);
    // Replies already computed still go out before the socket closes.
    match writer.await {
        Ok(Err(e)) if result.is_ok() => Err(format!("writing replies: {e}")),
        _ => result,
    }
}

#[cfg(test)]
mod tests {
    //! Three members over real loopback sockets: raft traffic through the
    //! listener and [`TcpTransport`], API frames answered beside it, and a
    //! member of another cluster refused.

    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::node::{self, NodeHandle};
    use crate::testing::{ListMachine, MemLog};
    use crate::transport::TcpTransport;

    struct Echo;

    impl Handler for Echo {
        async fn handle(
            self: Arc<Self>,
            header: Vec<u8>,
            data: Vec<u8>,
            _: SocketAddr,
        ) -> (Vec<u8>, Vec<u8>) {
            (header, data)
        }
    }

    struct Member {
        node: NodeHandle<ListMachine>,
        stop: watch::Sender<bool>,
    }

    async fn start_member(
        id: u64,
        cluster: &str,
        listener: TcpListener,
        members: &BTreeMap<u64, String>,
    ) -> Member {
        let rt = tokio::runtime::Handle::current();
        let cluster_id = cluster.to_string();
        let node = node::start(id, MemLog::bootstrapped(members), ListMachine::default(), {
            let cluster_id = cluster_id.clone();
            let my_addr = members[&id].clone();
            move |tx| TcpTransport::new(id, my_addr, cluster_id, rt, tx)
        })
        .unwrap();
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(serve(
            listener,
            cluster_id,
            node.sender(),
            Arc::new(Echo),
            stop_rx,
        ));
        Member { node, stop }
    }

    async fn leader_of(members: &BTreeMap<u64, Member>) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((id, _)) = members
                .iter()
                .find(|(_, m)| m.node.status().borrow().is_leader)
            {
                return *id;
            }
            assert!(Instant::now() < deadline, "no leader within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_replicate_over_tcp_and_survive_losing_the_leader() {
        let mut listeners = Vec::new();
        let mut addrs = BTreeMap::new();
        for id in 1..=3u64 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.insert(id, l.local_addr().unwrap().to_string());
            listeners.push((id, l));
        }
        let mut members = BTreeMap::new();
        for (id, l) in listeners {
            members.insert(id, start_member(id, "c1", l, &addrs).await);
        }
        let first = leader_of(&members).await;
        for i in 0..20u8 {
            members[&first].node.propose(vec![i]).await.unwrap();
        }

        // An API frame on the same port is answered by the handler.
        let mut s = TcpStream::connect(&addrs[&first]).await.unwrap();
        write_frame(&mut s, b"\x08\x07", b"data").await.unwrap();
        let prefix = read_prefix(&mut s, FRAME_DATA_BYTES_MAX).await.unwrap();
        assert_eq!(read_header(&mut s, &prefix).await.unwrap(), b"\x08\x07");

        // A raft frame from another cluster closes that connection only.
        let mut s = TcpStream::connect(&addrs[&first]).await.unwrap();
        let pf = PeerFrame {
            magic: PEER_FRAME_MAGIC,
            cluster_id: "other".into(),
            from: 9,
            from_addr: "127.0.0.9:1".into(),
        };
        write_frame(&mut s, &pf.encode_to_vec(), b"").await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf)
            .await
            .unwrap_or(0);
        assert_eq!(n, 0, "connection from another cluster stays open");

        // The leader goes away (listener and node): the others carry on.
        let gone = members.remove(&first).unwrap();
        let _ = gone.stop.send(true);
        gone.node.stop();
        let t0 = Instant::now();
        let second = leader_of(&members).await;
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "election took {:?}",
            t0.elapsed()
        );
        let len = members[&second].node.read(|m| m.0.len()).await.unwrap();
        assert_eq!(len, 20);
        members[&second].node.propose(vec![99]).await.unwrap();
        for (_, m) in members {
            let _ = m.stop.send(true);
            m.node.stop();
        }
    }
}
