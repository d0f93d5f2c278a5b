//! The chunk RPC against a real `cairn-chunkserver` process on loopback:
//! data round trips, pipelining, flush, trim, write-zeroes, listing and
//! stats, several clients, and a clean stop on SIGTERM.
//!
//! Bad input is in `rpc_bad_input.rs`.

use std::collections::{BTreeSet, HashMap};

use cairn_chunkserver::rpc::{ChunkClient, ChunkError};
use cairn_proto::chunk::{ChunkRequest, ExtentKey, Op, Status};
use cairn_tests::raw::{request_frame, RawConnection};
use cairn_tests::{ChunkServerOptions, ChunkServerProcess};
use tokio::task::JoinSet;

/// The default volume extent size.
const EXTENT_BYTES: u32 = 4 << 20;

fn start() -> ChunkServerProcess {
    ChunkServerProcess::start(ChunkServerOptions::default()).expect("start cairn-chunkserver")
}

async fn connect(server: &ChunkServerProcess) -> ChunkClient {
    ChunkClient::connect(server.addr())
        .await
        .expect("connect to the chunk server")
}

fn key(volume_id: u64, extent_index: u64) -> ExtentKey {
    ExtentKey {
        volume_id,
        extent_index,
        epoch: 1,
    }
}

/// Bytes that differ with `seed` and along their length, so data landing in
/// the wrong place or answering the wrong request shows.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Reads a whole extent in 1 MiB pieces.
async fn read_extent(client: &ChunkClient, key: ExtentKey) -> Vec<u8> {
    let piece_bytes = 1u32 << 20;
    let mut out = Vec::with_capacity(EXTENT_BYTES as usize);
    for offset in (0..EXTENT_BYTES).step_by(piece_bytes as usize) {
        let piece = client
            .read(key, EXTENT_BYTES, u64::from(offset), piece_bytes)
            .await
            .expect("read piece");
        out.extend_from_slice(&piece);
    }
    out
}

/// Index of the first differing byte, for readable failures on megabytes.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

#[tokio::test]
async fn writes_read_back_at_aligned_offsets_and_sizes() {
    let server = start();
    let client = connect(&server).await;
    let k = key(0x1, 0);
    // Sector-aligned but not block-aligned cases cross 4 KiB block edges,
    // which the store must read-modify-write; some overlap earlier writes.
    let cases: [(u64, usize); 10] = [
        (0, 512),
        (512, 512),
        (4096, 4096),
        (3 * 4096 + 512, 4096 + 1024),
        (65536 - 512, 1024),
        (100 * 512, 7 * 512),
        (1 << 20, 1 << 20),
        ((1 << 20) + 4096, 512),
        (u64::from(EXTENT_BYTES) - 512, 512),
        (u64::from(EXTENT_BYTES) - (64 << 10) - 512, 64 << 10),
    ];
    let mut model = vec![0u8; EXTENT_BYTES as usize];
    for (seed, &(offset, len)) in cases.iter().enumerate() {
        let data = pattern(seed as u64, len);
        client
            .write(k, EXTENT_BYTES, offset, data.clone(), false)
            .await
            .expect("write");
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
        let back = client
            .read(k, EXTENT_BYTES, offset, len as u32)
            .await
            .expect("read");
        assert!(
            back[..] == data[..],
            "read right after writing {len} bytes at {offset} differs"
        );
    }
    let whole = read_extent(&client, k).await;
    assert_eq!(
        first_difference(&whole, &model),
        None,
        "extent differs from the model of its writes"
    );
    // Never-written extents read as zeros.
    let empty = client
        .read(key(0x1, 1), EXTENT_BYTES, 4096, 8192)
        .await
        .expect("read unwritten");
    assert!(empty.iter().all(|&b| b == 0));
}

#[tokio::test]
async fn pipelined_requests_are_all_answered_with_their_own_data() {
    let server = start();
    let client = connect(&server).await;
    // 64 writes of different sizes at once on one connection, then 64 reads.
    let size_of = |i: u64| 512 * (1 + (i * 37) % 128) as usize;
    let offset_of = |i: u64| i * (64 << 10);
    let mut writes = JoinSet::new();
    for i in 0..64u64 {
        let client = client.clone();
        writes.spawn(async move {
            client
                .write(
                    key(0x2, i % 3),
                    EXTENT_BYTES,
                    offset_of(i),
                    pattern(i, size_of(i)),
                    i % 5 == 0,
                )
                .await
        });
    }
    while let Some(done) = writes.join_next().await {
        done.expect("write task").expect("pipelined write");
    }
    let mut reads = JoinSet::new();
    for i in 0..64u64 {
        let client = client.clone();
        reads.spawn(async move {
            (
                i,
                client
                    .read(
                        key(0x2, i % 3),
                        EXTENT_BYTES,
                        offset_of(i),
                        size_of(i) as u32,
                    )
                    .await,
            )
        });
    }
    let mut answered = BTreeSet::new();
    while let Some(done) = reads.join_next().await {
        let (i, data) = done.expect("read task");
        let data = data.expect("pipelined read");
        assert!(
            data[..] == pattern(i, size_of(i))[..],
            "read {i} got data that is not its own"
        );
        answered.insert(i);
    }
    assert_eq!(answered.len(), 64);
}

#[tokio::test]
async fn the_server_echoes_request_ids_of_pipelined_frames() {
    let server = start();
    let client = connect(&server).await;
    for i in 0..16u64 {
        client
            .write(key(0x3, 0), EXTENT_BYTES, i * 4096, pattern(i, 4096), false)
            .await
            .expect("write");
    }
    // 64 requests in one burst on a raw socket, with ids chosen here: every
    // id comes back once, each read reply carrying its own offset's data.
    let mut raw = RawConnection::connect(server.addr())
        .await
        .expect("raw connect");
    let mut burst = Vec::new();
    let mut expected = HashMap::new();
    for n in 0..64u64 {
        let request_id = 1000 + n * 7;
        let block = n % 16;
        let request = ChunkRequest {
            request_id,
            op: Op::Read as i32,
            extent: Some(key(0x3, 0)),
            extent_bytes: EXTENT_BYTES,
            offset_bytes: block * 4096,
            length_bytes: 4096,
            ..Default::default()
        };
        burst.extend_from_slice(&request_frame(&request, &[]));
        expected.insert(request_id, pattern(block, 4096));
    }
    raw.send(&burst).await.expect("send burst");
    for _ in 0..64 {
        let (response, data) = raw.read_reply().await.expect("reply");
        assert_eq!(response.status, Status::Ok as i32, "{}", response.message);
        let want = expected
            .remove(&response.request_id)
            .unwrap_or_else(|| panic!("unexpected id {}", response.request_id));
        assert!(
            data == want,
            "reply {} carries another request's data",
            response.request_id
        );
    }
    assert!(expected.is_empty());
}

#[tokio::test]
async fn flush_and_fua_writes_succeed_and_read_back() {
    let server = start();
    let client = connect(&server).await;
    let k = key(0x4, 0);
    client
        .write(k, EXTENT_BYTES, 0, pattern(1, 8192), true)
        .await
        .expect("fua write");
    client
        .write(k, EXTENT_BYTES, 8192, pattern(2, 8192), false)
        .await
        .expect("write");
    client.flush().await.expect("flush");
    client.flush().await.expect("flush with nothing dirty");
    let back = client.read(k, EXTENT_BYTES, 0, 16384).await.expect("read");
    assert!(back[..8192] == pattern(1, 8192)[..] && back[8192..] == pattern(2, 8192)[..]);
}

#[tokio::test]
async fn trimmed_ranges_read_as_zeros_and_the_rest_is_kept() {
    let server = start();
    let client = connect(&server).await;
    let k = key(0x5, 0);
    let data = pattern(5, 64 << 10);
    client
        .write(k, EXTENT_BYTES, 0, data.clone(), false)
        .await
        .expect("write");
    // One whole-block range and one sector range inside a block.
    client
        .trim(k, EXTENT_BYTES, 4096, 8192)
        .await
        .expect("trim blocks");
    client
        .trim(k, EXTENT_BYTES, 20 * 1024 + 512, 1024)
        .await
        .expect("trim sectors");
    let mut want = data;
    want[4096..4096 + 8192].fill(0);
    want[20 * 1024 + 512..20 * 1024 + 1536].fill(0);
    let back = client
        .read(k, EXTENT_BYTES, 0, 64 << 10)
        .await
        .expect("read");
    assert_eq!(first_difference(&back, &want), None);
}

#[tokio::test]
async fn write_zeroes_with_and_without_hole_reads_as_zeros() {
    let server = start();
    let client = connect(&server).await;
    let k = key(0x6, 0);
    let data = pattern(6, 128 << 10);
    client
        .write(k, EXTENT_BYTES, 0, data.clone(), false)
        .await
        .expect("write");
    client
        .write_zeroes(k, EXTENT_BYTES, 0, 16 << 10, false, false)
        .await
        .expect("zeroes, punching");
    client
        .write_zeroes(k, EXTENT_BYTES, 64 << 10, 16 << 10, true, true)
        .await
        .expect("zeroes, no hole, fua");
    client
        .write_zeroes(k, EXTENT_BYTES, (100 << 10) + 512, 512, false, true)
        .await
        .expect("zeroes, one sector");
    let mut want = data;
    want[..16 << 10].fill(0);
    want[64 << 10..80 << 10].fill(0);
    want[(100 << 10) + 512..(100 << 10) + 1024].fill(0);
    let back = client
        .read(k, EXTENT_BYTES, 0, 128 << 10)
        .await
        .expect("read");
    assert_eq!(first_difference(&back, &want), None);
}

#[tokio::test]
async fn extent_list_pages_in_key_order_and_stat_finds_each() {
    let server = start();
    let client = connect(&server).await;
    let mut in_volume_a = Vec::new();
    for i in 0..13u64 {
        // Out of key order on purpose, and two epochs of one index.
        let k = ExtentKey {
            volume_id: 0xa,
            extent_index: (i * 5) % 13,
            epoch: 1 + i / 12,
        };
        client
            .write(k, EXTENT_BYTES, 0, pattern(i, 4096), false)
            .await
            .expect("write");
        in_volume_a.push(k);
    }
    for i in 0..3u64 {
        client
            .write(key(0xb, i), EXTENT_BYTES, 0, pattern(100 + i, 4096), false)
            .await
            .expect("write");
    }
    let sort_key = |k: &ExtentKey| (k.volume_id, k.extent_index, k.epoch);
    in_volume_a.sort_by_key(sort_key);

    let mut listed = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = client
            .extent_list(Some(0xa), after, 4)
            .await
            .expect("list page");
        pages += 1;
        assert!(
            page.extents.len() <= 4,
            "page of {} over the limit of 4",
            page.extents.len()
        );
        for info in &page.extents {
            assert_eq!(info.extent_bytes, EXTENT_BYTES);
            listed.push(info.key.expect("listed entry has a key"));
        }
        if !page.more {
            break;
        }
        assert_eq!(page.extents.len(), 4, "only the last page may be short");
        after = listed.last().copied();
        assert!(pages < 10, "listing does not end");
    }
    assert_eq!(pages, 4, "13 entries in pages of 4");
    assert_eq!(
        listed, in_volume_a,
        "volume listing in key order, each once"
    );

    let all = client
        .extent_list(None, None, 0)
        .await
        .expect("list everything");
    assert_eq!(all.extents.len(), 16);
    assert!(!all.more);
    let past_end = client
        .extent_list(None, Some(key(0xb, 2)), 10)
        .await
        .expect("list past the end");
    assert!(past_end.extents.is_empty() && !past_end.more);

    for k in in_volume_a.iter().take(3) {
        let info = client.extent_stat(*k).await.expect("stat");
        assert_eq!(info.key, Some(*k));
        assert_eq!(info.extent_bytes, EXTENT_BYTES);
        assert!(
            info.allocated_bytes > 0,
            "a written extent has space allocated"
        );
    }
    let absent = client
        .extent_stat(key(0xa, 999))
        .await
        .expect_err("absent extent");
    assert_eq!(absent.status(), Some(Status::NotFound), "{absent}");
}

#[tokio::test]
async fn node_stat_reports_identity_space_and_usage() {
    let options = ChunkServerOptions {
        cluster_id: "rpc-test-cluster".into(),
        node_id: 7,
        ..Default::default()
    };
    let server = ChunkServerProcess::start(options).expect("start cairn-chunkserver");
    let client = connect(&server).await;
    let empty = client.node_stat().await.expect("node stat");
    assert_eq!(empty.cluster_id, "rpc-test-cluster");
    assert_eq!(empty.node_id, 7);
    assert_eq!(empty.extents, 0);
    let fs = nix::sys::statvfs::statvfs(server.data_dir()).expect("statvfs of the data dir");
    let fs_capacity_bytes = fs.blocks() * fs.fragment_size();
    assert_eq!(
        empty.capacity_bytes, fs_capacity_bytes,
        "capacity is the data directory's file system size"
    );
    assert!(
        empty.free_bytes > 0 && empty.free_bytes <= empty.capacity_bytes,
        "free {} of {}",
        empty.free_bytes,
        empty.capacity_bytes
    );

    for i in 0..3 {
        client
            .write(key(0xc, i), EXTENT_BYTES, 0, pattern(i, 64 << 10), false)
            .await
            .expect("write");
    }
    // The store refreshes an extent's allocation when it syncs it.
    client.flush().await.expect("flush");
    let used = client.node_stat().await.expect("node stat after writes");
    assert_eq!(used.extents, 3);
    assert!(
        used.used_bytes >= 3 * (64 << 10),
        "used {} bytes for 3 x 64 KiB written",
        used.used_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_work_concurrently_and_see_each_others_writes() {
    let server = start();
    let (a, b) = (connect(&server).await, connect(&server).await);
    let write_all = |client: ChunkClient, volume_id: u64| async move {
        for i in 0..32u64 {
            client
                .write(
                    key(volume_id, i % 2),
                    EXTENT_BYTES,
                    i * 8192,
                    pattern(volume_id * 100 + i, 8192),
                    false,
                )
                .await?;
        }
        Ok::<_, ChunkError>(())
    };
    let (wa, wb) = tokio::join!(
        tokio::spawn(write_all(a.clone(), 0xd)),
        tokio::spawn(write_all(b.clone(), 0xe))
    );
    wa.expect("task a").expect("client a writes");
    wb.expect("task b").expect("client b writes");
    for i in 0..32u64 {
        let from_b = a
            .read(key(0xe, i % 2), EXTENT_BYTES, i * 8192, 8192)
            .await
            .expect("a reads b's write");
        assert!(
            from_b[..] == pattern(0xe * 100 + i, 8192)[..],
            "a sees b's write {i}"
        );
        let from_a = b
            .read(key(0xd, i % 2), EXTENT_BYTES, i * 8192, 8192)
            .await
            .expect("b reads a's write");
        assert!(
            from_a[..] == pattern(0xd * 100 + i, 8192)[..],
            "b sees a's write {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_server_cleanly_with_requests_in_flight() {
    let mut server = start();
    let client = connect(&server).await;
    client
        .write(key(0xf, 0), EXTENT_BYTES, 0, pattern(1, 4096), true)
        .await
        .expect("write before stop");
    let mut in_flight = JoinSet::new();
    for i in 0..64u64 {
        let client = client.clone();
        in_flight.spawn(async move {
            client
                .write(
                    key(0xf, 1),
                    EXTENT_BYTES,
                    i * 65536,
                    pattern(i, 65536),
                    false,
                )
                .await
        });
    }
    let status = tokio::task::spawn_blocking(move || {
        let status = server.stop();
        (server, status)
    })
    .await
    .expect("stop task");
    let (_server, status) = status;
    let status = status.expect("server stops on SIGTERM");
    assert!(
        status.success(),
        "chunk server exited with {status} on SIGTERM"
    );
    // Each call either completed or saw the connection close; none hangs.
    while let Some(done) = in_flight.join_next().await {
        match done.expect("write task") {
            Ok(()) | Err(ChunkError::Disconnected { .. }) => {}
            Err(ChunkError::Status {
                status: Status::ShuttingDown,
                ..
            }) => {}
            Err(e) => panic!("write during shutdown failed unexpectedly: {e}"),
        }
    }
}

#[tokio::test]
async fn acknowledged_writes_survive_sigterm_and_sigkill() {
    let mut server = start();
    let client = connect(&server).await;
    client
        .write(key(0x10, 0), EXTENT_BYTES, 0, pattern(1, 8192), true)
        .await
        .expect("fua write");
    client
        .write(key(0x10, 0), EXTENT_BYTES, 8192, pattern(2, 8192), false)
        .await
        .expect("write");
    client.flush().await.expect("flush");
    drop(client);
    let status = server.stop().expect("stop");
    assert!(status.success(), "exit status {status}");
    server.restart().expect("restart after SIGTERM");
    let client = connect(&server).await;
    let back = client
        .read(key(0x10, 0), EXTENT_BYTES, 0, 16384)
        .await
        .expect("read after restart");
    assert!(back[..8192] == pattern(1, 8192)[..] && back[8192..] == pattern(2, 8192)[..]);

    client
        .write(key(0x10, 1), EXTENT_BYTES, 4096, pattern(3, 4096), true)
        .await
        .expect("fua write");
    drop(client);
    server.kill().expect("SIGKILL");
    server.restart().expect("restart after SIGKILL");
    let client = connect(&server).await;
    let back = client
        .read(key(0x10, 1), EXTENT_BYTES, 4096, 4096)
        .await
        .expect("read after crash");
    assert!(
        back[..] == pattern(3, 4096)[..],
        "a FUA write survives a crash"
    );
}
