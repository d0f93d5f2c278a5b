//! In-process tests of the server's limits and shutdown and of the client's
//! reply routing, where a fake peer or a tiny limit makes the case certain.
//! Whole-protocol behaviour against the real binary is in `tests/tests/rpc*.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use cairn_proto::chunk::{ChunkRequest, ChunkResponse, ExtentKey, Op, Status};
use cairn_proto::frame::{FramePrefix, FRAME_DATA_BYTES_MAX, FRAME_PREFIX_BYTES};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::*;
use crate::store::{Store, StoreOptions};

const EXTENT_BYTES: u32 = 1 << 20;
/// Bound on every wait in these tests, so a hang fails instead of stalling.
const WAIT: Duration = Duration::from_secs(20);

struct TestServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    served: JoinHandle<anyhow::Result<()>>,
    store: Store,
    _dir: tempfile::TempDir,
}

impl TestServer {
    async fn start(config: ServerConfig) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            Store::open(&dir.path().join("extents"), StoreOptions::default()).expect("open store");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, shutdown) = watch::channel(false);
        let config = ServerConfig {
            data_dir: dir.path().to_path_buf(),
            ..config
        };
        let served = tokio::spawn(serve(listener, store.clone(), config, None, shutdown));
        TestServer {
            addr,
            stop,
            served,
            store,
            _dir: dir,
        }
    }

    async fn shutdown(self) {
        self.stop.send(true).expect("server still listening");
        tokio::time::timeout(WAIT, self.served)
            .await
            .expect("serve returns after shutdown")
            .expect("serve task")
            .expect("serve result");
        self.store.shutdown().await.expect("store shutdown");
    }
}

fn key(extent_index: u64) -> ExtentKey {
    ExtentKey {
        volume_id: 9,
        extent_index,
        epoch: 1,
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_beyond_the_in_flight_limit_is_backpressure_not_failure() {
    // Two slots per connection and 64 concurrent calls: the server must stop
    // reading and resume, never drop or mix up a request.
    let server = TestServer::start(ServerConfig {
        requests_in_flight_max: 2,
        ..Default::default()
    })
    .await;
    let client = ChunkClient::connect(server.addr).await.expect("connect");
    let writes = (0..64u64).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .write(
                    key(i % 4),
                    EXTENT_BYTES,
                    (i / 4) * 8192,
                    pattern(i, 8192),
                    false,
                )
                .await
        })
    });
    for w in writes.collect::<Vec<_>>() {
        w.await.expect("task").expect("write");
    }
    let reads = (0..64u64).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            (
                i,
                client
                    .read(key(i % 4), EXTENT_BYTES, (i / 4) * 8192, 8192)
                    .await,
            )
        })
    });
    for r in reads.collect::<Vec<_>>() {
        let (i, data) = r.await.expect("task");
        assert_eq!(
            data.expect("read"),
            pattern(i, 8192),
            "request {i} got another request's data"
        );
    }
    drop(client);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_beyond_the_byte_budget_wait_instead_of_failing() {
    // Ten 8 MiB writes, then ten 8 MiB reads, at once on one connection:
    // 80 MiB each way against a 64 MiB budget.
    let server = TestServer::start(ServerConfig::default()).await;
    let client = ChunkClient::connect(server.addr).await.expect("connect");
    const PIECE_BYTES: u32 = FRAME_DATA_BYTES_MAX;
    let big_extent_bytes = 64 << 20;
    let place = |i: u64| (key(100 + i % 2), (i / 2) * u64::from(PIECE_BYTES));
    let piece = |i: u64| Bytes::from(pattern(i, 4096).repeat(PIECE_BYTES as usize / 4096));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10u64 {
        let client = client.clone();
        tasks.spawn(async move {
            let (k, offset) = place(i);
            client
                .write(k, big_extent_bytes, offset, piece(i), false)
                .await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("write task").expect("large write");
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10u64 {
        let client = client.clone();
        tasks.spawn(async move {
            let (k, offset) = place(i);
            (
                i,
                client.read(k, big_extent_bytes, offset, PIECE_BYTES).await,
            )
        });
    }
    while let Some(done) = tasks.join_next().await {
        let (i, data) = done.expect("read task");
        assert!(
            data.expect("large read") == piece(i),
            "large read {i} differs"
        );
    }
    drop(client);
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_answers_what_was_read_and_stops_accepting() {
    let server = TestServer::start(ServerConfig::default()).await;
    let client = ChunkClient::connect(server.addr).await.expect("connect");
    client
        .write(key(0), EXTENT_BYTES, 0, pattern(1, 4096), true)
        .await
        .expect("write before shutdown");
    let in_flight: Vec<_> = (0..32u64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .write(key(1), EXTENT_BYTES, i * 4096, pattern(i, 4096), false)
                    .await
            })
        })
        .collect();
    let addr = server.addr;
    server.shutdown().await;
    // Every call ends: answered, or failed because the connection closed.
    for call in in_flight {
        match tokio::time::timeout(WAIT, call)
            .await
            .expect("no call hangs")
            .expect("task")
        {
            Ok(()) | Err(ChunkError::Disconnected { .. }) => {}
            Err(e) => panic!("unexpected error during shutdown: {e}"),
        }
    }
    let after = client.flush().await;
    assert!(
        matches!(after, Err(ChunkError::Disconnected { .. })),
        "call after shutdown: {after:?}"
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener closed after shutdown"
    );
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_and_the_rest_served() {
    let server = TestServer::start(ServerConfig {
        connections_max: 1,
        ..Default::default()
    })
    .await;
    let first = ChunkClient::connect(server.addr)
        .await
        .expect("connect first");
    first.flush().await.expect("first client served");

    let mut second = TcpStream::connect(server.addr)
        .await
        .expect("the extra connection is accepted");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, second.read(&mut buf))
        .await
        .expect("extra connection closed");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "extra connection got data: {n:?}"
    );
    first.flush().await.expect("first client still served");

    // The slot comes back once the first client goes away.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let client = ChunkClient::connect(server.addr)
            .await
            .expect("connect again");
        match client.node_stat().await {
            Ok(node) => {
                assert_eq!(node.extents, 0);
                break;
            }
            Err(ChunkError::Disconnected { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("connection slot never freed: {e}"),
        }
    }
    server.shutdown().await;
}

/// Reads one request frame the way a server would.
async fn read_request(stream: &mut TcpStream) -> (ChunkRequest, Vec<u8>) {
    let mut raw = [0u8; FRAME_PREFIX_BYTES];
    stream.read_exact(&mut raw).await.expect("request prefix");
    let prefix = FramePrefix::decode(&raw, FRAME_DATA_BYTES_MAX).expect("valid prefix");
    let mut header = vec![0u8; prefix.header_bytes as usize];
    stream
        .read_exact(&mut header)
        .await
        .expect("request header");
    let mut data = vec![0u8; prefix.data_bytes as usize];
    stream.read_exact(&mut data).await.expect("request data");
    (
        ChunkRequest::decode(header.as_slice()).expect("request decodes"),
        data,
    )
}

async fn write_reply(stream: &mut TcpStream, response: &ChunkResponse, data: &[u8]) {
    let header = response.encode_to_vec();
    let prefix = FramePrefix {
        header_bytes: header.len() as u32,
        data_bytes: data.len() as u32,
    };
    stream
        .write_all(&prefix.encode())
        .await
        .expect("reply prefix");
    stream.write_all(&header).await.expect("reply header");
    stream.write_all(data).await.expect("reply data");
}

#[tokio::test]
async fn client_routes_out_of_order_replies_by_request_id() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // A fake server that answers three reads in reverse order, each with
    // data naming the offset it was asked for.
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let mut requests = Vec::new();
        for _ in 0..3 {
            requests.push(read_request(&mut stream).await.0);
        }
        let ids: Vec<u64> = requests.iter().map(|r| r.request_id).collect();
        for request in requests.iter().rev() {
            let response = ChunkResponse {
                request_id: request.request_id,
                status: Status::Ok as i32,
                ..Default::default()
            };
            let data = vec![(request.offset_bytes / 512) as u8; request.length_bytes as usize];
            write_reply(&mut stream, &response, &data).await;
        }
        ids
    });
    let client = ChunkClient::connect(addr).await.expect("connect");
    let (a, b, c) = tokio::join!(
        client.read(key(0), EXTENT_BYTES, 512, 512),
        client.read(key(0), EXTENT_BYTES, 1024, 1024),
        client.read(key(0), EXTENT_BYTES, 1536, 512),
    );
    assert_eq!(a.expect("a"), vec![1u8; 512]);
    assert_eq!(b.expect("b"), vec![2u8; 1024]);
    assert_eq!(c.expect("c"), vec![3u8; 512]);
    let mut ids = fake.await.expect("fake server");
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "request ids are distinct");
    assert!(!ids.contains(&0), "request id 0 is reserved");
}

#[tokio::test]
async fn pending_calls_fail_when_the_connection_dies() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let _ = read_request(&mut stream).await;
        // Close without answering.
    });
    let client = ChunkClient::connect(addr).await.expect("connect");
    let pending = tokio::time::timeout(WAIT, client.flush())
        .await
        .expect("pending call ends");
    assert!(
        matches!(pending, Err(ChunkError::Disconnected { .. })),
        "{pending:?}"
    );
    fake.await.expect("fake server");
    let later = tokio::time::timeout(WAIT, client.flush())
        .await
        .expect("later call ends");
    assert!(
        matches!(later, Err(ChunkError::Disconnected { .. })),
        "{later:?}"
    );
    assert!(client.closed_reason().is_some());
}

#[tokio::test]
async fn client_reports_status_errors_and_refuses_oversized_data() {
    let server = TestServer::start(ServerConfig::default()).await;
    let client = ChunkClient::connect(server.addr).await.expect("connect");
    let absent = client
        .extent_stat(key(77))
        .await
        .expect_err("absent extent");
    assert_eq!(absent.status(), Some(Status::NotFound), "{absent}");
    assert!(
        absent.to_string().contains("extent 77"),
        "message names the extent: {absent}"
    );

    let huge = Bytes::from(vec![0u8; FRAME_DATA_BYTES_MAX as usize + 512]);
    let refused = client
        .write(key(0), 64 << 20, 0, huge, false)
        .await
        .expect_err("over the frame limit");
    assert!(
        matches!(refused, ChunkError::InvalidRequest { .. }),
        "{refused}"
    );
    // Refused locally: the connection is still good.
    client.flush().await.expect("flush after a refused call");

    let (response, _) = client
        .call(
            ChunkRequest {
                op: Op::ExtentList as i32,
                list_limit: 1,
                ..Default::default()
            },
            Bytes::new(),
        )
        .await
        .expect("raw call");
    assert_eq!(response.status, Status::Ok as i32);
    assert!(response.extents.is_empty() && !response.list_more);
    drop(client);
    server.shutdown().await;
}
