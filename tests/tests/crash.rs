//! kill -9 a real `cairn-chunkserver` at random moments while many writers,
//! FUA writes and flushes are in flight; restart it and check every sector.
//!
//! Each sector a write touches is stamped with the write's id, so a read tells
//! exactly which write a sector came from. After each crash, every sector must
//! hold the last write that was durable (acknowledged before a completed
//! flush was sent, or acknowledged with FUA) or a write issued after it —
//! never an older one, never garbage, and never a checksum error: a killed
//! process cannot tear a 4 KiB block (its page cache and submitted writes
//! survive), and each block keeps the checksums of its durable content, of
//! its last completed write and of the write in flight (store/slots.rs).
//! Torn blocks belong to power loss, which the store's model tests cover.
//! Writers own disjoint sector
//! ranges that share 4 KiB blocks with their neighbours, so concurrent
//! read-modify-writes of one block are part of the test.
//!
//! Rounds: `CAIRN_CRASH_ROUNDS` (default 50). The seed is printed; set
//! `CAIRN_CRASH_SEED` to replay a run's timing choices.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cairn_chunkserver::rpc::client::ChunkClient;
use cairn_proto::chunk::{ExtentKey, Status};
use cairn_tests::{ChunkServerOptions, ChunkServerProcess};
use rand::{Rng, SeedableRng};

const EXTENT_BYTES: u32 = 64 << 10;
const SECTOR: u64 = 512;
const SECTORS_PER_EXTENT: u64 = EXTENT_BYTES as u64 / SECTOR;
const EXTENTS: u64 = 3;
const WRITERS_PER_EXTENT: u64 = 7;
/// 17 sectors: writer ranges start and end inside 4 KiB blocks.
const SECTORS_PER_WRITER: u64 = 17;
const VOLUME: u64 = 0xc4a5;

fn key(extent: u64) -> ExtentKey {
    ExtentKey {
        volume_id: VOLUME,
        extent_index: extent,
        epoch: 1,
    }
}

/// First absolute sector of writer `w`.
fn writer_base(w: u64) -> u64 {
    let (extent, i) = (w / WRITERS_PER_EXTENT, w % WRITERS_PER_EXTENT);
    extent * SECTORS_PER_EXTENT + 2 + i * SECTORS_PER_WRITER
}

/// The content of absolute sector `s` as written by write `id` (0: zeros).
fn sector_bytes(id: u64, s: u64) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    if id != 0 {
        b[..8].copy_from_slice(&id.to_le_bytes());
        b[8..16].copy_from_slice(&s.to_le_bytes());
        let fill = (id.wrapping_mul(0x9e37_79b9) ^ s) as u8 | 1;
        b[16..].fill(fill);
    }
    b
}

fn decode_sector(raw: &[u8], s: u64) -> Option<u64> {
    let id = u64::from_le_bytes(raw[..8].try_into().unwrap());
    (raw == sector_bytes(id, s)).then_some(id)
}

#[derive(Debug, Clone)]
struct WriteRecord {
    id: u64,
    first_sector: u64,
    sectors: u64,
    fua: bool,
    /// Clock value when acknowledged.
    acked_at: Option<u64>,
}

/// What one round did, in the order each writer did it.
#[derive(Default)]
struct Journal {
    writes_by_writer: HashMap<u64, Vec<WriteRecord>>,
    /// Clock value at which the newest completed flush was sent.
    flushed_before: u64,
}

#[test]
fn kill_9_during_writes_and_flushes_loses_nothing_flushed() {
    crash_rounds(&[]);
}

/// The same with `--threads multi`: engine threads of their own beside a
/// multi-thread runtime (the default, `single`, runs the store's engine as a
/// task of the one thread).
#[test]
fn kill_9_multi_thread_chunk_server_loses_nothing_flushed() {
    crash_rounds(&["--threads", "multi"]);
}

fn crash_rounds(extra_args: &[&str]) {
    eprint!("crash test {extra_args:?}: ");
    let (rounds, seed) = cairn_tests::soak_settings("CAIRN_CRASH", 50);
    let rounds = rounds as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let mut server = ChunkServerProcess::start(ChunkServerOptions {
        extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        ..ChunkServerOptions::default()
    })
    .expect("start chunk server");
    // Durable content of every sector (write id, 0 = never written).
    let total_sectors = EXTENTS * SECTORS_PER_EXTENT;
    let mut durable: Vec<u64> = vec![0; total_sectors as usize];
    let next_id = Arc::new(AtomicU64::new(1));
    let mut stats = (0usize, 0usize, 0usize); // (writes acked, flushes completed, torn blocks seen)

    for round in 0..rounds {
        let run_ms = rng.gen_range(20..300);
        let round_seed: u64 = rng.gen();
        let journal = rt.block_on(run_workload(
            server.addr(),
            run_ms,
            round_seed,
            next_id.clone(),
            &mut server,
        ));
        let (w, f) = (
            journal
                .writes_by_writer
                .values()
                .flatten()
                .filter(|w| w.acked_at.is_some())
                .count(),
            journal.flushed_before,
        );
        stats.0 += w;
        stats.1 += usize::from(f > 0);

        server.restart().unwrap_or_else(|e| {
            panic!("round {round} (seed {seed}): restart after kill -9 failed: {e:#}")
        });
        let torn = rt.block_on(verify(server.addr(), &journal, &mut durable, round, seed));
        stats.2 += torn;
    }
    server.stop().expect("clean stop at the end");
    eprintln!(
        "crash test: {rounds} rounds, {} writes acknowledged, {} rounds with a completed flush, {} torn blocks detected",
        stats.0, stats.1, stats.2
    );
    assert!(
        stats.0 > rounds * 10,
        "the workload barely ran: {} writes in {rounds} rounds",
        stats.0
    );
    assert_eq!(
        stats.2, 0,
        "kill -9 must leave every block readable as its old or new content (seed {seed})"
    );
}

async fn run_workload(
    addr: std::net::SocketAddr,
    run_ms: u64,
    seed: u64,
    next_id: Arc<AtomicU64>,
    server: &mut ChunkServerProcess,
) -> Journal {
    let clock = Arc::new(AtomicU64::new(1));
    let journal = Arc::new(Mutex::new(Journal::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..EXTENTS * WRITERS_PER_EXTENT {
        // One connection per few writers: many requests in flight per connection.
        let client = ChunkClient::connect(addr).await.expect("connect");
        let (clock, journal, stop, next_id) = (
            clock.clone(),
            journal.clone(),
            stop.clone(),
            next_id.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng =
                rand::rngs::StdRng::seed_from_u64(seed ^ w.wrapping_mul(0x1234_5678_9abc));
            let base = writer_base(w);
            let extent = base / SECTORS_PER_EXTENT;
            while !stop.load(Ordering::SeqCst) {
                if rng.gen_ratio(1, 12) {
                    let sent_at = clock.fetch_add(1, Ordering::SeqCst);
                    if client.flush().await.is_err() {
                        return;
                    }
                    let mut j = journal.lock().unwrap();
                    j.flushed_before = j.flushed_before.max(sent_at);
                    continue;
                }
                let first = rng.gen_range(0..SECTORS_PER_WRITER);
                let sectors = rng.gen_range(1..=SECTORS_PER_WRITER - first);
                let fua = rng.gen_ratio(1, 8);
                let id = next_id.fetch_add(1, Ordering::SeqCst);
                let abs = base + first;
                let mut data = Vec::with_capacity((sectors * SECTOR) as usize);
                for s in abs..abs + sectors {
                    data.extend_from_slice(&sector_bytes(id, s));
                }
                let index = {
                    let mut j = journal.lock().unwrap();
                    let list = j.writes_by_writer.entry(w).or_default();
                    list.push(WriteRecord {
                        id,
                        first_sector: abs,
                        sectors,
                        fua,
                        acked_at: None,
                    });
                    list.len() - 1
                };
                let offset = (abs - extent * SECTORS_PER_EXTENT) * SECTOR;
                match client
                    .write(key(extent), EXTENT_BYTES, offset, Bytes::from(data), fua)
                    .await
                {
                    Ok(()) => {
                        let at = clock.fetch_add(1, Ordering::SeqCst);
                        journal
                            .lock()
                            .unwrap()
                            .writes_by_writer
                            .get_mut(&w)
                            .unwrap()[index]
                            .acked_at = Some(at);
                    }
                    Err(e) if e.status().is_none() => return, // the server died
                    Err(e) => panic!("write {id} failed: {e}"),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(run_ms)).await;
    server.kill().expect("kill -9");
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.expect("writer task");
    }
    Arc::try_unwrap(journal)
        .ok()
        .expect("tasks done")
        .into_inner()
        .unwrap()
}

/// Reads every block; returns how many were detected as torn.
async fn verify(
    addr: std::net::SocketAddr,
    j: &Journal,
    durable: &mut [u64],
    round: usize,
    seed: u64,
) -> usize {
    // Per sector: the durable write and every write that came after it.
    let mut allowed: Vec<Vec<u64>> = durable.iter().map(|&d| vec![d]).collect();
    for writes in j.writes_by_writer.values() {
        for w in writes {
            let is_durable = w.acked_at.is_some_and(|a| w.fua || a < j.flushed_before);
            for s in w.first_sector..w.first_sector + w.sectors {
                let a = &mut allowed[s as usize];
                if is_durable {
                    a.clear();
                }
                a.push(w.id);
            }
        }
    }
    let client = ChunkClient::connect(addr)
        .await
        .expect("connect after restart");
    let mut torn = 0;
    for extent in 0..EXTENTS {
        for block in 0..SECTORS_PER_EXTENT / 8 {
            let first = extent * SECTORS_PER_EXTENT + block * 8;
            match client
                .read(key(extent), EXTENT_BYTES, block * 4096, 4096)
                .await
            {
                Ok(data) => {
                    for i in 0..8u64 {
                        let s = first + i;
                        let raw = &data[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize];
                        let Some(id) = decode_sector(raw, s) else {
                            panic!("round {round} (seed {seed}): sector {s} holds bytes no write wrote");
                        };
                        assert!(
                            allowed[s as usize].contains(&id),
                            "round {round} (seed {seed}): sector {s} holds write {id}; allowed {:?} (first is the durable one)",
                            allowed[s as usize]
                        );
                        durable[s as usize] = id;
                    }
                }
                Err(e) if e.status() == Some(Status::ChecksumMismatch) => {
                    let unflushed = (first..first + 8).any(|s| allowed[s as usize].len() > 1);
                    eprintln!(
                        "round {round} (seed {seed}): block {block} of extent {extent} reads as torn \
                         after kill -9 (unflushed writes in it: {unflushed}): {e}"
                    );
                    torn += 1;
                }
                Err(e) => panic!(
                    "round {round} (seed {seed}): reading block {block} of extent {extent}: {e}"
                ),
            }
        }
    }
    // What was read becomes durable before the next round crashes the server.
    client.flush().await.expect("flush after verifying");
    torn
}
