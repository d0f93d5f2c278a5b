//! Bad input to a real `cairn-chunkserver`: each case gets its answer (a
//! status, or a closed connection when the stream cannot be resynchronised),
//! and a well-behaved client connected throughout is still served afterwards.

use std::net::SocketAddr;
use std::time::Duration;

use cairn_chunkserver::rpc::ChunkClient;
use cairn_proto::chunk::{ChunkRequest, ChunkResponse, ExtentKey, Op, Status};
use cairn_proto::frame::{FRAME_DATA_BYTES_MAX, FRAME_HEADER_BYTES_MAX};
use cairn_tests::raw::{frame, prefix, request_frame, RawConnection};
use cairn_tests::{ChunkServerOptions, ChunkServerProcess};
use prost::Message;

const EXTENT_BYTES: u32 = 4 << 20;
/// How long to wait for the server to log a connection's end.
const LOG_WAIT: Duration = Duration::from_secs(10);

fn start() -> ChunkServerProcess {
    ChunkServerProcess::start(ChunkServerOptions::default()).expect("start cairn-chunkserver")
}

fn key(volume_id: u64, extent_index: u64) -> ExtentKey {
    ExtentKey {
        volume_id,
        extent_index,
        epoch: 1,
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

/// A client that behaves, connected before the bad input and checked after.
struct Bystander {
    client: ChunkClient,
}

impl Bystander {
    const KEY: ExtentKey = ExtentKey {
        volume_id: 0xb1,
        extent_index: 0,
        epoch: 1,
    };

    async fn connect(addr: SocketAddr) -> Bystander {
        let client = ChunkClient::connect(addr)
            .await
            .expect("bystander connects");
        client
            .write(Self::KEY, EXTENT_BYTES, 0, pattern(1, 8192), false)
            .await
            .expect("bystander writes");
        Bystander { client }
    }

    /// Its earlier data is intact and it can still write and read.
    async fn assert_still_served(&self) {
        let before = self
            .client
            .read(Self::KEY, EXTENT_BYTES, 0, 8192)
            .await
            .expect("bystander reads");
        assert!(
            before[..] == pattern(1, 8192)[..],
            "bystander's data changed"
        );
        self.client
            .write(Self::KEY, EXTENT_BYTES, 8192, pattern(2, 4096), true)
            .await
            .expect("bystander writes again");
        let after = self
            .client
            .read(Self::KEY, EXTENT_BYTES, 8192, 4096)
            .await
            .expect("bystander reads again");
        assert!(after[..] == pattern(2, 4096)[..]);
    }
}

fn request(op: Op, offset_bytes: u64, length_bytes: u32) -> ChunkRequest {
    ChunkRequest {
        op: op as i32,
        extent: Some(key(0xba, 0)),
        extent_bytes: EXTENT_BYTES,
        offset_bytes,
        length_bytes,
        ..Default::default()
    }
}

/// Sends a request through the normal client and returns the reply's status.
async fn status_of(client: &ChunkClient, request: ChunkRequest, data: Vec<u8>) -> (Status, String) {
    let (response, reply_data) = client
        .call(request, data.into())
        .await
        .expect("the server answers");
    assert!(
        reply_data.is_empty() || response.status == Status::Ok as i32,
        "error replies carry no data"
    );
    (
        Status::try_from(response.status).expect("known status"),
        response.message,
    )
}

/// The log lines about one peer, once the server has logged the end of its
/// connection (or after [`LOG_WAIT`]).
fn log_lines_about(server: &ChunkServerProcess, peer: SocketAddr) -> Vec<String> {
    let peer = peer.to_string();
    let about_peer = |line: &str| line.contains(&peer);
    server.wait_for_log_lines(LOG_WAIT, |line| {
        about_peer(line)
            && (line.contains("connection ending") || line.contains("closing chunk RPC connection"))
    });
    server
        .log()
        .lines()
        .filter(|line| about_peer(line))
        .map(str::to_string)
        .collect()
}

fn is_warning(line: &str) -> bool {
    line.contains("WARN") || line.contains("ERROR")
}

#[tokio::test]
async fn unknown_op_is_answered_and_the_connection_stays_usable() {
    let server = start();
    let bystander = Bystander::connect(server.addr()).await;
    let client = ChunkClient::connect(server.addr()).await.expect("connect");
    for op in [42, 0, -1, i32::MAX] {
        let (status, message) = status_of(
            &client,
            ChunkRequest {
                op,
                ..request(Op::Read, 0, 512)
            },
            vec![],
        )
        .await;
        assert_eq!(status, Status::UnknownOp, "op {op}: {message}");
    }
    // Unknown op with data: the data is skipped, the stream stays in sync.
    let (status, _) = status_of(
        &client,
        ChunkRequest {
            op: 99,
            ..request(Op::Write, 0, 4096)
        },
        pattern(3, 4096),
    )
    .await;
    assert_eq!(status, Status::UnknownOp);
    client
        .write(key(0xba, 0), EXTENT_BYTES, 0, pattern(4, 512), false)
        .await
        .expect("same connection still works");
    bystander.assert_still_served().await;
}

#[tokio::test]
async fn write_length_not_matching_its_data_is_rejected_and_the_stream_stays_in_sync() {
    let server = start();
    let bystander = Bystander::connect(server.addr()).await;
    let client = ChunkClient::connect(server.addr()).await.expect("connect");
    let cases = [
        (
            "length over the data",
            request(Op::Write, 0, 4096),
            pattern(5, 512),
        ),
        (
            "length under the data",
            request(Op::Write, 0, 512),
            pattern(5, 4096),
        ),
        (
            "data on a read",
            request(Op::Read, 0, 4096),
            pattern(5, 4096),
        ),
        (
            "data on a flush",
            ChunkRequest {
                op: Op::Flush as i32,
                ..Default::default()
            },
            pattern(5, 1024),
        ),
        ("no data on a write", request(Op::Write, 0, 4096), vec![]),
    ];
    for (what, req, data) in cases {
        let (status, message) = status_of(&client, req, data).await;
        assert_eq!(status, Status::InvalidArgument, "{what}: {message}");
    }
    // Nothing was written by the rejected requests.
    let back = client
        .read(key(0xba, 0), EXTENT_BYTES, 0, 4096)
        .await
        .expect("read");
    assert!(
        back.iter().all(|&b| b == 0),
        "a rejected write changed data"
    );
    client
        .write(key(0xba, 0), EXTENT_BYTES, 0, pattern(6, 4096), false)
        .await
        .expect("good write after bad ones");
    assert!(
        client
            .read(key(0xba, 0), EXTENT_BYTES, 0, 4096)
            .await
            .expect("read")[..]
            == pattern(6, 4096)[..]
    );
    bystander.assert_still_served().await;
}

#[tokio::test]
async fn unaligned_out_of_range_and_malformed_requests_are_rejected() {
    let server = start();
    let bystander = Bystander::connect(server.addr()).await;
    let client = ChunkClient::connect(server.addr()).await.expect("connect");
    let end = u64::from(EXTENT_BYTES);
    let cases = [
        (
            "unaligned offset",
            request(Op::Write, 100, 512),
            pattern(7, 512),
        ),
        (
            "unaligned length",
            request(Op::Write, 0, 100),
            pattern(7, 100),
        ),
        ("unaligned read", request(Op::Read, 512, 1000), vec![]),
        ("unaligned trim", request(Op::Trim, 4095, 512), vec![]),
        ("zero-length read", request(Op::Read, 0, 0), vec![]),
        (
            "read past the extent end",
            request(Op::Read, end - 512, 1024),
            vec![],
        ),
        (
            "read starting at the extent end",
            request(Op::Read, end, 512),
            vec![],
        ),
        (
            "offset overflowing u64",
            request(Op::Read, u64::MAX - 511, 512),
            vec![],
        ),
        (
            "write past the extent end",
            request(Op::Write, end - 512, 1024),
            pattern(7, 1024),
        ),
        (
            "zeroes past the extent end",
            request(Op::WriteZeroes, end, 4096),
            vec![],
        ),
        (
            "extent size not a power of two",
            ChunkRequest {
                extent_bytes: 3 << 20,
                ..request(Op::Read, 0, 512)
            },
            vec![],
        ),
        (
            "extent size zero",
            ChunkRequest {
                extent_bytes: 0,
                ..request(Op::Read, 0, 512)
            },
            vec![],
        ),
        (
            "extent size under 64 KiB",
            ChunkRequest {
                extent_bytes: 4096,
                ..request(Op::Read, 0, 512)
            },
            vec![],
        ),
        (
            "extent size over 64 MiB",
            ChunkRequest {
                extent_bytes: 128 << 20,
                ..request(Op::Read, 0, 512)
            },
            vec![],
        ),
        (
            "no extent key",
            ChunkRequest {
                extent: None,
                ..request(Op::Read, 0, 512)
            },
            vec![],
        ),
        (
            "stat without extent key",
            ChunkRequest {
                op: Op::ExtentStat as i32,
                ..Default::default()
            },
            vec![],
        ),
        (
            "read over the frame limit",
            ChunkRequest {
                extent_bytes: 64 << 20,
                ..request(Op::Read, 0, FRAME_DATA_BYTES_MAX + 512)
            },
            vec![],
        ),
    ];
    for (what, req, data) in cases {
        let (status, message) = status_of(&client, req, data).await;
        assert_eq!(status, Status::InvalidArgument, "{what}: {message}");
        assert!(
            message.contains("0xba") || what.contains("no extent") || what.contains("without"),
            "{what}: message names the volume: {message}"
        );
    }
    let stat = client
        .extent_stat(key(0xba, 0))
        .await
        .expect_err("nothing was written");
    assert_eq!(stat.status(), Some(Status::NotFound));
    client.flush().await.expect("same connection still works");
    bystander.assert_still_served().await;
}

#[tokio::test]
async fn another_extent_size_than_stored_is_a_mismatch() {
    let server = start();
    let client = ChunkClient::connect(server.addr()).await.expect("connect");
    client
        .write(key(0xbb, 0), EXTENT_BYTES, 0, pattern(8, 4096), false)
        .await
        .expect("write");
    let err = client
        .read(key(0xbb, 0), 1 << 20, 0, 4096)
        .await
        .expect_err("read with another extent size");
    assert_eq!(err.status(), Some(Status::ExtentSizeMismatch), "{err}");
}

#[tokio::test]
async fn request_id_zero_is_rejected_without_closing() {
    let server = start();
    let mut raw = RawConnection::connect(server.addr())
        .await
        .expect("raw connect");
    let flush = |request_id| ChunkRequest {
        request_id,
        op: Op::Flush as i32,
        ..Default::default()
    };
    raw.send(&request_frame(&flush(0), &[]))
        .await
        .expect("send");
    let (response, _) = raw.read_reply().await.expect("reply to id 0");
    assert_eq!(
        (response.request_id, response.status),
        (0, Status::InvalidArgument as i32),
        "{}",
        response.message
    );
    raw.send(&request_frame(&flush(5), &[]))
        .await
        .expect("send");
    let (response, _) = raw.read_reply().await.expect("reply to id 5");
    assert_eq!(
        (response.request_id, response.status),
        (5, Status::Ok as i32),
        "{}",
        response.message
    );
}

#[tokio::test]
async fn garbage_closes_the_connection_with_one_warning() {
    let server = start();
    let bystander = Bystander::connect(server.addr()).await;
    let mut raw = RawConnection::connect(server.addr())
        .await
        .expect("raw connect");
    let peer = raw.local_addr();
    raw.send(b"GET / HTTP/1.1\r\nHost: chunkserver\r\n\r\n")
        .await
        .expect("send garbage");
    raw.expect_closed()
        .await
        .expect("server closes a connection with bad magic");
    bystander.assert_still_served().await;

    let lines = log_lines_about(&server, peer);
    let warnings: Vec<_> = lines.iter().filter(|l| is_warning(l)).collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning for the bad peer, got: {lines:#?}"
    );
    assert!(
        warnings[0].contains("magic"),
        "the warning says why: {}",
        warnings[0]
    );
}

#[tokio::test]
async fn oversized_frames_close_the_connection_without_waiting_for_the_data() {
    let server = start();
    let bystander = Bystander::connect(server.addr()).await;
    let header = request(Op::Write, 0, 4096).encode_to_vec();
    let header_bytes = header.len() as u32;
    let cases = [
        ("4 GiB of data", prefix(header_bytes, u32::MAX), "data"),
        (
            "data one byte over the limit",
            prefix(header_bytes, FRAME_DATA_BYTES_MAX + 1),
            "data",
        ),
        (
            "header one byte over the limit",
            prefix(FRAME_HEADER_BYTES_MAX + 1, 0),
            "header",
        ),
        ("4 GiB header", prefix(u32::MAX, 0), "header"),
        ("empty header", prefix(0, 0), "header"),
    ];
    for (what, frame_prefix, reason) in cases {
        let mut raw = RawConnection::connect(server.addr())
            .await
            .expect("raw connect");
        let peer = raw.local_addr();
        // Only the prefix and the header: a server waiting for the
        // announced data would keep the connection open and fail the test.
        let mut bytes = frame_prefix.to_vec();
        bytes.extend_from_slice(&header);
        raw.send(&bytes).await.expect("send prefix");
        raw.expect_closed()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        let lines = log_lines_about(&server, peer);
        let warnings: Vec<_> = lines.iter().filter(|l| is_warning(l)).collect();
        assert_eq!(warnings.len(), 1, "{what}: one warning, got: {lines:#?}");
        assert!(
            warnings[0].contains(reason),
            "{what}: the warning says why: {}",
            warnings[0]
        );
    }
    bystander.assert_still_served().await;
}

#[tokio::test]
async fn undecodable_header_is_answered_with_id_zero_then_closed() {
    let server = start();
    let bystander = Bystander::connect(server.addr()).await;
    let headers: [(&str, Vec<u8>); 3] = [
        ("runaway varint", vec![0xff; 12]),
        ("wrong wire type for request_id", vec![0x0a, 0x01, 0x00]),
        ("truncated length-delimited field", vec![0x1a, 0x40, 0x08]),
    ];
    for (what, header) in headers {
        let mut raw = RawConnection::connect(server.addr())
            .await
            .expect("raw connect");
        raw.send(&frame(&header, &[])).await.expect("send");
        let (response, data): (ChunkResponse, Vec<u8>) = raw
            .read_reply()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_eq!(response.request_id, 0, "{what}");
        assert_eq!(
            response.status,
            Status::InvalidArgument as i32,
            "{what}: {}",
            response.message
        );
        assert!(
            response.message.contains("header"),
            "{what}: {}",
            response.message
        );
        assert!(data.is_empty());
        raw.expect_closed()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    }
    bystander.assert_still_served().await;
}

#[tokio::test]
async fn clients_vanishing_mid_frame_are_no_error() {
    let mut server = start();
    let bystander = Bystander::connect(server.addr()).await;
    let write = request_frame(
        &ChunkRequest {
            request_id: 1,
            ..request(Op::Write, 0, 65536)
        },
        &pattern(9, 65536),
    );
    let header_bytes = u32::from_le_bytes(write[4..8].try_into().expect("4 bytes"));
    let header_end = 12 + header_bytes as usize;
    let cuts = [
        ("mid-prefix", 6),
        ("mid-header", header_end - 2),
        ("mid-data", header_end + 10_000),
    ];
    let mut peers = Vec::new();
    for (what, cut) in cuts {
        let mut raw = RawConnection::connect(server.addr())
            .await
            .expect("raw connect");
        peers.push((what, raw.local_addr()));
        raw.send(&write[..cut]).await.expect("send part of a frame");
        raw.disconnect();
    }
    bystander.assert_still_served().await;
    assert!(
        server.is_running(),
        "the server survives clients vanishing mid-frame"
    );
    for (what, peer) in peers {
        let lines = log_lines_about(&server, peer);
        let warnings: Vec<_> = lines.iter().filter(|l| is_warning(l)).collect();
        assert!(
            warnings.is_empty(),
            "{what}: a vanishing client is not a warning: {warnings:#?}"
        );
    }
    // The cut-off write was never applied.
    let back = bystander
        .client
        .read(key(0xba, 0), EXTENT_BYTES, 0, 65536)
        .await
        .expect("read");
    assert!(back.iter().all(|&b| b == 0), "a partial frame was applied");
}
