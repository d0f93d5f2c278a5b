//! Reading and writing frames on a byte stream, shared by every server and
//! client (chunk server RPC, volume manager API and raft transport).
//!
//! Only the prefix and the header pass through here; data bytes are read by
//! the caller straight into the buffer that will own them (on the chunk
//! server, an aligned buffer the store hands to the kernel without a copy),
//! and leave through an [`Outbox`], which hands them to the kernel by
//! reference.

use std::io::{self, IoSlice};

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{FrameError, FramePrefix, FRAME_HEADER_BYTES_MAX, FRAME_PREFIX_BYTES};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Read buffer of the chunk RPC's readers. Small frames (a 4 KiB write with
/// its prefix and header) then cost one `read(2)` instead of three; payloads
/// larger than this bypass the buffer and go straight to their destination
/// (tokio's `BufReader` skips its buffer when it is empty and the transfer is
/// at least its size). Writers queue in an [`Outbox`] instead.
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
    reader
        .read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|e| part_error(part, e))
}

/// As [`read_part`], `len` bytes into a new buffer that is not zeroed first
/// (see [`read_to_len`]).
pub async fn read_part_bytes<R: AsyncRead + Unpin>(
    reader: &mut R,
    len: usize,
    part: &'static str,
) -> Result<Bytes, ReadFrameError> {
    let mut buf = BytesMut::new();
    read_to_len(reader, &mut buf, len)
        .await
        .map_err(|e| part_error(part, e))?;
    Ok(buf.freeze())
}

fn part_error(part: &'static str, e: io::Error) -> ReadFrameError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ReadFrameError::Truncated { part }
    } else {
        ReadFrameError::Io { part, source: e }
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

/// The prefix of a frame with `header` and `data_len` data bytes.
fn frame_prefix(header: &[u8], data_len: usize) -> [u8; FRAME_PREFIX_BYTES] {
    // Callers encode headers from messages they built; an empty or oversized
    // header would be a bug here, and the peer would drop the connection.
    assert!(
        !header.is_empty() && header.len() <= FRAME_HEADER_BYTES_MAX as usize,
        "header of {} bytes",
        header.len()
    );
    let data_bytes = u32::try_from(data_len).expect("frame data length checked by caller");
    FramePrefix {
        header_bytes: header.len() as u32,
        data_bytes,
    }
    .encode()
}

/// Writes one whole frame. The caller flushes (so that replies queued
/// together leave in one segment).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    header: &[u8],
    data: &[u8],
) -> io::Result<()> {
    writer.write_all(&frame_prefix(header, data.len())).await?;
    writer.write_all(header).await?;
    if !data.is_empty() {
        writer.write_all(data).await?;
    }
    Ok(())
}

/// Data of at least this many bytes is written from its own buffer
/// (`writev`); shorter data is copied in with the headers around it. For
/// 4 KiB replies the copy costs next to nothing (the kernel copies the
/// bytes either way; A/B runs of 4 KiB reads showed no gain from passing
/// them by reference), while at 1 MiB the copy was 12% of the iSCSI
/// writer's CPU.
pub const OUTBOX_COPY_MAX: usize = 16 << 10;

/// Writers send what they have queued once it reaches this many bytes,
/// without waiting for the queue to run dry ([`Outbox::is_full`]).
const OUTBOX_BATCH_BYTES: usize = 64 << 10;

/// I/O vector entries per `writev`; Linux takes up to 1024.
const OUTBOX_IOV: usize = 64;

/// Bytes queued for a socket, written in as few `writev` calls as the
/// socket takes. Prefixes, headers and short data are copied together into
/// one buffer; longer data is kept by reference (`Bytes`), so a large read's
/// data is not copied in user space on its way out. (The iSCSI writer
/// copied every Data-In segment into its buffer; `BufWriter` skipped the
/// copy for large data but then sent the header before it in a send of its
/// own.) Used by the chunk RPC's two writers and by `cairn-target`'s NBD and
/// iSCSI writers.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Pieces in order, each sealed.
    sealed: Vec<Bytes>,
    /// Short pieces after the last sealed one, copied together.
    open: BytesMut,
    /// Bytes queued in all.
    len: usize,
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox::default()
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Enough is queued to send without waiting for more.
    pub fn is_full(&self) -> bool {
        self.len >= OUTBOX_BATCH_BYTES
    }

    /// Queues a copy of `b`.
    pub fn put_slice(&mut self, b: &[u8]) {
        self.open.extend_from_slice(b);
        self.len += b.len();
    }

    /// Queues `data`: by reference if it is long, else as a copy.
    pub fn put_data(&mut self, data: Bytes) {
        if data.len() < OUTBOX_COPY_MAX {
            self.put_slice(&data);
            return;
        }
        self.seal();
        self.len += data.len();
        self.sealed.push(data);
    }

    /// Queues one whole frame: prefix, header, data.
    pub fn put_frame(&mut self, header: &[u8], data: Bytes) {
        self.put_slice(&frame_prefix(header, data.len()));
        self.put_slice(header);
        self.put_data(data);
    }

    fn seal(&mut self) {
        if !self.open.is_empty() {
            self.sealed.push(self.open.split().freeze());
        }
    }

    /// After queuing: when `idle` says nothing more is waiting, lets the
    /// tasks about to queue more run once (one send for several frames
    /// costs the kernel far less than one send each), then writes what is
    /// queued if still idle, or if the outbox is full.
    pub async fn send_when_idle<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        idle: impl Fn() -> bool,
    ) -> io::Result<()> {
        if idle() {
            tokio::task::yield_now().await;
        }
        if idle() || self.is_full() {
            self.write_to(w).await?;
        }
        Ok(())
    }

    /// Writes everything queued, then flushes `w`; the outbox is empty
    /// afterwards. Not cancel-safe: dropped midway, what was written is
    /// forgotten.
    pub async fn write_to<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> io::Result<()> {
        self.seal();
        // The first piece not wholly written, and how much of it was.
        let (mut first, mut done) = (0usize, 0usize);
        while first < self.sealed.len() {
            let mut iov = [IoSlice::new(&[]); OUTBOX_IOV];
            let pieces = self.sealed[first..].iter().take(OUTBOX_IOV);
            let mut n_iov = 0;
            for (slot, piece) in iov.iter_mut().zip(pieces) {
                let from = if n_iov == 0 { done } else { 0 };
                *slot = IoSlice::new(&piece[from..]);
                n_iov += 1;
            }
            let mut written = w.write_vectored(&iov[..n_iov]).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            while written > 0 {
                let rest = self.sealed[first].len() - done;
                if written >= rest {
                    written -= rest;
                    first += 1;
                    done = 0;
                } else {
                    done += written;
                    written = 0;
                }
            }
        }
        self.sealed.clear();
        self.len = 0;
        w.flush().await
    }
}

#[cfg(test)]
mod outbox_tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// Takes at most `step` bytes a call; vectored or not.
    struct Trickle {
        got: Vec<u8>,
        step: usize,
        vectored: bool,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.got.extend_from_slice(&buf[..n]);
            self.calls += 1;
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            if !self.vectored {
                let first = bufs
                    .iter()
                    .find(|b| !b.is_empty())
                    .map_or(&[][..], |b| &b[..]);
                let n = first.len().min(self.step);
                self.got.extend_from_slice(&first[..n]);
                self.calls += 1;
                return Poll::Ready(Ok(n));
            }
            let mut left = self.step;
            for b in bufs {
                let n = b.len().min(left);
                self.got.extend_from_slice(&b[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            self.calls += 1;
            Poll::Ready(Ok(self.step - left))
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn every_byte_leaves_in_order_whatever_the_socket_takes() {
        // Frames with no data, short data (copied) and long data (by
        // reference), more pieces than one writev takes.
        let mut want = Vec::new();
        let mut out = Outbox::new();
        for i in 0..100usize {
            let header = vec![i as u8; 1 + i % 9];
            let n = if i % 2 == 0 {
                OUTBOX_COPY_MAX + i
            } else {
                (i * 97) % 5000
            };
            let data: Vec<u8> = (0..n).map(|b| (b + i) as u8).collect();
            let mut frame = Vec::new();
            write_frame(&mut frame, &header, &data).await.unwrap();
            want.extend_from_slice(&frame);
            out.put_frame(&header, Bytes::from(data));
        }
        assert_eq!(out.len(), want.len());
        for (step, vectored) in [
            (1, true),
            (7, true),
            (4096, true),
            (1 << 20, true),
            (1000, false),
        ] {
            let mut copy = Outbox::new();
            copy.put_slice(&want[..10]);
            copy.put_data(Bytes::copy_from_slice(&want[10..4000]));
            copy.put_data(Bytes::copy_from_slice(&want[4000..]));
            let mut w = Trickle {
                got: Vec::new(),
                step,
                vectored,
                calls: 0,
            };
            copy.write_to(&mut w).await.unwrap();
            assert!(w.got == want[..], "step {step}, vectored {vectored}");
            assert!(copy.is_empty());
        }
        let mut w = Trickle {
            got: Vec::new(),
            step: 1 << 20,
            vectored: true,
            calls: 0,
        };
        out.write_to(&mut w).await.unwrap();
        assert!(w.got == want, "frames");
        // The 50 long data went by reference, each a piece of its own after
        // a piece of copied bytes, plus the copied tail: 101 pieces, two
        // writev calls of at most 64.
        assert_eq!(w.calls, 2);
        // Reused after writing.
        out.put_slice(b"again");
        let mut w = Trickle {
            got: Vec::new(),
            step: 2,
            vectored: true,
            calls: 0,
        };
        out.write_to(&mut w).await.unwrap();
        assert_eq!(w.got, b"again");
    }
}
