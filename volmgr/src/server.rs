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
