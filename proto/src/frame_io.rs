//! Reading and writing frames on a byte stream, shared by every server and
//! client (chunk server RPC, volume manager API and raft transport).
//!
//! Only the prefix and the header pass through here; data bytes are read by
//! the caller straight into the buffer that will own them (on the chunk
//! server, an aligned buffer the store hands to the kernel without a copy).

use std::io;

use bytes::{BufMut, BytesMut};

use crate::frame::{FrameError, FramePrefix, FRAME_HEADER_BYTES_MAX, FRAME_PREFIX_BYTES};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Socket buffer on each side of a connection. Small frames (a 4 KiB write
/// with its prefix and header) then cost one `read(2)` instead of three;
/// payloads larger than this bypass the buffer and go straight to their
/// destination (tokio's `BufReader`/`BufWriter` skip their buffer when it is
/// empty and the transfer is at least its size).
pub const SOCKET_BUFFER_BYTES: usize = 16 << 10;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    /// The peer closed the connection between frames: a normal end.
    #[error("connection closed by peer")]
    Closed,
    /// The peer closed the connection inside a frame.
    #[error("connection closed by peer in the middle of a frame ({part})")]
    Truncated { part: &'static str },
    /// The prefix breaks the protocol; the stream cannot be resynchronised.
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("socket error while reading {part}: {source}")]
    Io {
        part: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Reads exactly `buf.len()` bytes; an EOF is `Truncated`, not an I/O error,
/// because a peer going away mid-frame is ordinary on a network.
pub async fn read_part<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
    part: &'static str,
) -> Result<(), ReadFrameError> {
    match reader.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err(ReadFrameError::Truncated { part })
        }
        Err(e) => Err(ReadFrameError::Io { part, source: e }),
    }
}

/// Reads until `buf` holds `len` bytes, into its spare capacity: unlike
/// `read_exact` into a `vec![0; len]`, the bytes are not zeroed first (that
/// zeroing showed in profiles of 1 MiB transfers). An EOF before then is
/// `UnexpectedEof`. Shared by the chunk RPC client and the NBD and iSCSI
/// readers of `cairn-target`.
pub async fn read_to_len<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    len: usize,
) -> io::Result<()> {
    buf.reserve(len.saturating_sub(buf.len()));
    while buf.len() < len {
        let room = len - buf.len();
        if reader.read_buf(&mut (&mut *buf).limit(room)).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// Reads and checks a frame prefix. An EOF before its first byte is `Closed`.
pub async fn read_prefix<R: AsyncRead + Unpin>(
    reader: &mut R,
    data_bytes_max: u32,
) -> Result<FramePrefix, ReadFrameError> {
    let mut raw = [0u8; FRAME_PREFIX_BYTES];
    let first = reader
        .read(&mut raw)
        .await
        .map_err(|e| ReadFrameError::Io {
            part: "frame prefix",
            source: e,
        })?;
    if first == 0 {
        return Err(ReadFrameError::Closed);
    }
    read_part(reader, &mut raw[first..], "frame prefix").await?;
    Ok(FramePrefix::decode(&raw, data_bytes_max)?)
}

/// Reads the header bytes announced by `prefix` (at most
/// [`FRAME_HEADER_BYTES_MAX`], checked by [`FramePrefix::decode`]).
pub async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut R,
    prefix: &FramePrefix,
) -> Result<Vec<u8>, ReadFrameError> {
    assert!(
        prefix.header_bytes <= FRAME_HEADER_BYTES_MAX,
        "prefix was checked by decode"
    );
    let mut header = vec![0u8; prefix.header_bytes as usize];
    read_part(reader, &mut header, "frame header").await?;
    Ok(header)
}

/// Writes one whole frame. The caller flushes (so that replies queued
/// together leave in one segment).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    header: &[u8],
    data: &[u8],
) -> io::Result<()> {
    // Callers encode headers from messages they built; an empty or oversized
    // header would be a bug here, and the peer would drop the connection.
    assert!(
        !header.is_empty() && header.len() <= FRAME_HEADER_BYTES_MAX as usize,
        "header of {} bytes",
        header.len()
    );
    let data_bytes = u32::try_from(data.len()).expect("frame data length checked by caller");
    let prefix = FramePrefix {
        header_bytes: header.len() as u32,
        data_bytes,
    };
    writer.write_all(&prefix.encode()).await?;
    writer.write_all(header).await?;
    if !data.is_empty() {
        writer.write_all(data).await?;
    }
    Ok(())
}
