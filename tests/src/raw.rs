//! Frame-level access to a chunk server socket, for tests that send what a
//! well-behaved client never would (bad magic, oversized frames, garbage
//! headers, half frames).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use cairn_proto::chunk::{ChunkRequest, ChunkResponse};
use cairn_proto::frame::{FramePrefix, FRAME_DATA_BYTES_MAX, FRAME_PREFIX_BYTES};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest wait for a reply frame, or for the server to close the socket.
/// Generous: these waits are for liveness, not for speed.
pub const RAW_WAIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Bytes read while waiting for a close before concluding the server is
/// sending something else.
const CLOSE_READ_BYTES_MAX: usize = 1 << 20;

/// A frame prefix with any values (not checked against limits).
pub fn prefix(header_bytes: u32, data_bytes: u32) -> [u8; FRAME_PREFIX_BYTES] {
    FramePrefix {
        header_bytes,
        data_bytes,
    }
    .encode()
}

/// A whole frame: prefix, `header` as given, `data`.
pub fn frame(header: &[u8], data: &[u8]) -> Vec<u8> {
    let header_bytes = u32::try_from(header.len()).expect("test header fits u32");
    let data_bytes = u32::try_from(data.len()).expect("test data fits u32");
    let mut out = prefix(header_bytes, data_bytes).to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

/// A request frame carrying `data`, whatever the request says its length is.
pub fn request_frame(request: &ChunkRequest, data: &[u8]) -> Vec<u8> {
    frame(&request.encode_to_vec(), data)
}

/// How a connection ended while [`RawConnection::expect_closed`] waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Orderly close (FIN).
    Eof,
    /// Reset (RST): the server closed with our unread bytes in its buffer.
    Reset,
}

/// A plain TCP connection speaking frames by hand.
pub struct RawConnection {
    stream: TcpStream,
}

impl RawConnection {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        Ok(Self { stream })
    }

    /// This side's address: what the server logs as the peer.
    pub fn local_addr(&self) -> SocketAddr {
        self.stream
            .local_addr()
            .expect("connected socket has a local address")
    }

    pub async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream
            .write_all(bytes)
            .await
            .context("sending raw bytes")?;
        self.stream.flush().await.context("flushing raw bytes")
    }

    /// Reads one reply frame (at most [`RAW_WAIT_TIMEOUT`]).
    pub async fn read_reply(&mut self) -> anyhow::Result<(ChunkResponse, Vec<u8>)> {
        tokio::time::timeout(RAW_WAIT_TIMEOUT, self.read_reply_inner())
            .await
            .with_context(|| format!("no reply within {RAW_WAIT_TIMEOUT:?}"))?
    }

    async fn read_reply_inner(&mut self) -> anyhow::Result<(ChunkResponse, Vec<u8>)> {
        let mut raw = [0u8; FRAME_PREFIX_BYTES];
        self.stream
            .read_exact(&mut raw)
            .await
            .context("reading a reply prefix")?;
        let prefix =
            FramePrefix::decode(&raw, FRAME_DATA_BYTES_MAX).context("decoding a reply prefix")?;
        let mut header = vec![0u8; prefix.header_bytes as usize];
        self.stream
            .read_exact(&mut header)
            .await
            .context("reading a reply header")?;
        let mut data = vec![0u8; prefix.data_bytes as usize];
        self.stream
            .read_exact(&mut data)
            .await
            .context("reading reply data")?;
        let response =
            ChunkResponse::decode(header.as_slice()).context("decoding a reply header")?;
        Ok((response, data))
    }

    /// Waits (at most [`RAW_WAIT_TIMEOUT`]) for the server to close the
    /// connection, failing if it sends any bytes first.
    pub async fn expect_closed(&mut self) -> anyhow::Result<Closed> {
        let mut received = Vec::new();
        let closed = tokio::time::timeout(RAW_WAIT_TIMEOUT, async {
            let mut buf = [0u8; 4096];
            loop {
                match self.stream.read(&mut buf).await {
                    Ok(0) => return Ok(Closed::Eof),
                    Ok(n) => {
                        received.extend_from_slice(&buf[..n]);
                        if received.len() > CLOSE_READ_BYTES_MAX {
                            bail!("server keeps sending instead of closing");
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                        return Ok(Closed::Reset)
                    }
                    Err(e) => return Err(e).context("reading while waiting for the close"),
                }
            }
        })
        .await
        .with_context(|| format!("connection still open after {RAW_WAIT_TIMEOUT:?}"))??;
        if !received.is_empty() {
            bail!(
                "server sent {} bytes before closing: {:?}",
                received.len(),
                &received[..received.len().min(64)]
            );
        }
        Ok(closed)
    }

    /// Closes abruptly, possibly in the middle of a frame.
    pub fn disconnect(self) {
        drop(self.stream);
    }
}
