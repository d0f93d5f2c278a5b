//! Crashes of a store writing into a new version over older ones. The
//! store runs in a child process (this test binary again, in `child`),
//! which is killed with SIGKILL; the parent then opens the store without the
//! clean marker, so every block is settled, and checks that blocks whose
//! first writes in the new version were lost fall through to the older
//! versions: never zeros, never a checksum error.
//!
//! - `kill_9_while_writing_new_versions`: random moments, many writers
//!   whose sector ranges share blocks (read-modify-writes through the chain),
//!   FUA writes and flushes, and copy-ups (`materialize_at`) beside them;
//!   one new version per round over all earlier ones.
//!   Rounds: `CAIRN_COW_CRASH_ROUNDS` (default 8); `CAIRN_COW_CRASH_SEED`
//!   replays the timing.
//! - `power_loss_of_first_writes_falls_through`: after a kill, the disk is
//!   made to look like a power loss lost or tore the unflushed data of the
//!   new version's blocks (their slot entries landed): those blocks fall
//!   through; a torn overwrite of a block flushed before is an error.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cairn_chunkserver::store::layout;
use cairn_chunkserver::store::{ExtentKey, IoBuf, IoMode, Store, StoreError, StoreOptions};
use rand::{Rng, SeedableRng};

const EB: u32 = 64 << 10;
const SECTOR: u64 = 512;
const BLOCK: usize = 4096;
const VOLUME: u64 = 0xc0;
const EXTENTS: u64 = 2;
const WRITERS_PER_EXTENT: u64 = 4;
/// Writer ranges start and end inside blocks.
const SECTORS_PER_WRITER: u64 = 13;
const CHILD_ENV: &str = "CAIRN_COW_CHILD";

fn key(ext: u64, epoch: u64) -> ExtentKey {
    ExtentKey {
        volume_id: VOLUME,
        extent_index: ext,
        epoch,
    }
}

fn options() -> StoreOptions {
    StoreOptions {
        io_mode: IoMode::Direct,
        ring_entries: 256,
        open_extents_max: 64,
        engines: 2,
        inline: false,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Sector `s` of an extent as written by write `id`: never all zeros.
fn sector_bytes(id: u64, s: u64) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    b[..8].copy_from_slice(&id.to_le_bytes());
    b[8..16].copy_from_slice(&s.to_le_bytes());
    let fill = (id.wrapping_mul(0x9e37_79b9) ^ s) as u8 | 1;
    b[16..].fill(fill);
    b
}

/// Which write a sector came from; None for anything else (zeros, garbage).
fn sector_id(bytes: &[u8], s: u64) -> Option<u64> {
    let id = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    (bytes == sector_bytes(id, s)).then_some(id)
}

fn stamped(id: u64, first: u64, n: u64) -> Vec<u8> {
    (first..first + n)
        .flat_map(|s| sector_bytes(id, s))
        .collect()
}

/// The chain beneath epoch `e` (epochs are 1, 2, 3, ...).
fn chain(e: u64) -> Vec<u64> {
    (1..e).rev().collect()
}

/// Writer `w`'s first sector within its extent.
fn writer_base(w: u64) -> u64 {
    3 + (w % WRITERS_PER_EXTENT) * SECTORS_PER_WRITER
}

fn write_id(round: u64, w: u64, n: u64) -> u64 {
    ((round + 2) << 40) | (w << 32) | n
}

/// The child: runs only when the parent starts this binary with `CHILD_ENV`.
#[test]
fn child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    // End the line libtest started ("test child ... "): one message a line.
    say("");
    let mut parts = spec.splitn(3, ':');
    let mode = parts.next().unwrap().to_string();
    let arg = parts.next().unwrap().parse::<u64>().unwrap();
    let root = PathBuf::from(parts.next().unwrap());
    runtime().block_on(async move {
        let store = Store::open(&root, options()).unwrap();
        match mode.as_str() {
            "random" => child_random(store, arg).await,
            "forged" => child_forged(store).await,
            m => panic!("unknown child mode {m}"),
        }
    });
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// Writers rewrite their whole range again and again in the new version
/// `round + 2`, acknowledging each write on stdout; a flusher flushes.
async fn child_random(store: Store, round: u64) {
    let epoch = round + 2;
    let below = chain(epoch);
    for w in 0..EXTENTS * WRITERS_PER_EXTENT {
        let store = store.clone();
        let below = below.clone();
        tokio::spawn(async move {
            let ext = w / WRITERS_PER_EXTENT;
            let base = writer_base(w);
            for n in 1.. {
                let data =
                    IoBuf::copy_from(&stamped(write_id(round, w, n), base, SECTORS_PER_WRITER));
                store
                    .write_at(key(ext, epoch), &below, EB, base * SECTOR, data, n % 5 == 0)
                    .await
                    .unwrap();
                say(&format!("ack {w} {n}"));
            }
        });
    }
    // Copy-ups beside the writers: they change no sector's content, so the
    // same checks hold after the kill, with or without them.
    {
        let store = store.clone();
        let below = below.clone();
        tokio::spawn(async move {
            let blocks = EB / BLOCK as u32;
            for n in 0u64.. {
                let first = (n * 7 % blocks as u64) as u32;
                let count = (blocks - first).min(1 + (n % 5) as u32);
                store
                    .materialize_at(
                        key(n % EXTENTS, epoch),
                        &below,
                        EB,
                        first as u64 * BLOCK as u64,
                        count * BLOCK as u32,
                    )
                    .await
                    .unwrap();
            }
        });
    }
    say("ready");
    loop {
        tokio::time::sleep(Duration::from_millis(3)).await;
        store.flush().await.unwrap();
    }
}

fn spawn_child(spec: &str) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

/// Reads the child's lines until `ready`.
fn wait_ready(out: &mut BufReader<std::process::ChildStdout>) {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child exited early");
        if line.trim() == "ready" {
            return;
        }
    }
}

fn kill(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Reads a version through its chain, one block at a time.
async fn read_blocks(store: &Store, k: ExtentKey, below: &[u64]) -> Vec<Result<IoBuf, StoreError>> {
    let mut out = Vec::new();
    for b in 0..(EB as usize / BLOCK) {
        out.push(
            store
                .read_at(k, below, EB, (b * BLOCK) as u64, BLOCK as u32)
                .await,
        );
    }
    out
}

#[test]
fn kill_9_while_writing_new_versions() {
    let rounds: u64 = std::env::var("CAIRN_COW_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("CAIRN_COW_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("CAIRN_COW_CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().join("extents");
    let rt = runtime();
    // Epoch 1: every sector written and flushed (id 1).
    rt.block_on(async {
        let store = Store::open(&root, options()).unwrap();
        for ext in 0..EXTENTS {
            let data = IoBuf::copy_from(&stamped(1, 0, EB as u64 / SECTOR));
            store
                .write_at(key(ext, 1), &[], EB, 0, data, false)
                .await
                .unwrap();
        }
        store.shutdown().await.unwrap();
    });
    // What each sector read as after the previous round, through the chain.
    let mut prev: HashMap<(u64, u64), u64> = HashMap::new();
    for ext in 0..EXTENTS {
        for s in 0..EB as u64 / SECTOR {
            prev.insert((ext, s), 1);
        }
    }
    for round in 0..rounds {
        let epoch = round + 2;
        let (child, mut out) = spawn_child(&format!("random:{round}:{}", root.display()));
        wait_ready(&mut out);
        // Some kills land while first writes into the new version are in flight.
        let ms = if rng.gen_bool(0.3) {
            rng.gen_range(0..2)
        } else {
            rng.gen_range(2..60)
        };
        std::thread::sleep(Duration::from_millis(ms));
        kill(child);
        let mut acked: HashMap<u64, u64> = HashMap::new();
        for line in out.lines() {
            let line = line.unwrap();
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() == 3 && f[0] == "ack" {
                let (w, n): (u64, u64) = (f[1].parse().unwrap(), f[2].parse().unwrap());
                let e = acked.entry(w).or_default();
                *e = (*e).max(n);
            }
        }
        println!(
            "round {round}: {} writes acknowledged before the kill",
            acked.values().sum::<u64>()
        );
        let _ = std::fs::remove_file(root.join(".clean"));
        rt.block_on(async {
            let store = Store::open(&root, options()).unwrap();
            let below = chain(epoch);
            for ext in 0..EXTENTS {
                let blocks = read_blocks(&store, key(ext, epoch), &below).await;
                let held = store.held_blocks(key(ext, epoch)).await.unwrap();
                let older = read_blocks(&store, key(ext, below[0]), &below[1..]).await;
                for (b, got) in blocks.into_iter().enumerate() {
                    let got = got.unwrap_or_else(|e| {
                        panic!("round {round} (seed {seed}) {}: block {b}: {e}", key(ext, epoch))
                    });
                    let is_held = held.as_ref().is_some_and(|h| h[b / 64] >> (b % 64) & 1 == 1);
                    if !is_held {
                        let older = older[b].as_ref().unwrap();
                        assert!(
                            got[..] == older[..],
                            "round {round} (seed {seed}): block {b} not held but reads other than beneath"
                        );
                    }
                    for i in 0..BLOCK as u64 / SECTOR {
                        let s = b as u64 * (BLOCK as u64 / SECTOR) + i;
                        let bytes = &got[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize];
                        let id = sector_id(bytes, s).unwrap_or_else(|| {
                            panic!("round {round} (seed {seed}) extent {ext} sector {s}: not written by anyone (zeros or garbage)")
                        });
                        let w = (0..WRITERS_PER_EXTENT)
                            .map(|i| ext * WRITERS_PER_EXTENT + i)
                            .find(|&w| (writer_base(w)..writer_base(w) + SECTORS_PER_WRITER).contains(&s));
                        let allowed: Vec<u64> = match w {
                            None => vec![prev[&(ext, s)]],
                            Some(w) => match acked.get(&w) {
                                Some(&a) => vec![write_id(round, w, a), write_id(round, w, a + 1)],
                                None => vec![prev[&(ext, s)], write_id(round, w, 1)],
                            },
                        };
                        assert!(
                            allowed.contains(&id),
                            "round {round} (seed {seed}) extent {ext} sector {s}: write {id:#x}, allowed {allowed:x?}"
                        );
                        prev.insert((ext, s), id);
                    }
                }
            }
            store.shutdown().await.unwrap();
        });
    }
}

/// Block layout of the forged case (all in extent 0): epoch 1 holds blocks
/// 0..8, flushed. Epoch 2 (over 1): block 2 written and flushed, then
/// overwritten (unflushed); block 3 written with FUA; then unflushed: block
/// 0 whole, block 1 one sector (filled from epoch 1), block 4 zeroed.
async fn child_forged(store: Store) {
    let old = IoBuf::copy_from(&stamped(1, 0, 8 * 8));
    store
        .write_at(key(0, 1), &[], EB, 0, old, false)
        .await
        .unwrap();
    store.flush().await.unwrap();
    let w = |id: u64, first_sector: u64, n: u64| IoBuf::copy_from(&stamped(id, first_sector, n));
    let v2 = key(0, 2);
    store
        .write_at(v2, &[1], EB, 2 * 4096, w(20, 16, 8), false)
        .await
        .unwrap();
    store
        .write_at(v2, &[1], EB, 3 * 4096, w(30, 24, 8), true)
        .await
        .unwrap();
    store.flush().await.unwrap();
    store
        .write_at(v2, &[1], EB, 0, w(10, 0, 8), false)
        .await
        .unwrap();
    store
        .write_at(v2, &[1], EB, 11 * SECTOR, w(11, 11, 1), false)
        .await
        .unwrap();
    store
        .write_at(v2, &[1], EB, 2 * 4096, w(21, 16, 8), false)
        .await
        .unwrap();
    store
        .write_zeroes_at(v2, &[1], EB, 4 * 4096, 4096, false, true)
        .await
        .unwrap();
    say("ready");
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What the forged case does to the disk after the kill.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Loss {
    /// Nothing: kill -9 only.
    None,
    /// The unflushed data never reached the disk (the slot entries did).
    Lost,
    /// The unflushed data reached the disk in part.
    Torn,
}

fn data_at(root: &Path, k: ExtentKey) -> (std::fs::File, u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.join(layout::relative_path(&k)))
        .unwrap();
    (f, layout::data_offset(EB))
}

#[test]
fn power_loss_of_first_writes_falls_through() {
    for loss in [Loss::None, Loss::Lost, Loss::Torn] {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let root = dir.path().join("extents");
        let (child, mut out) = spawn_child(&format!("forged:0:{}", root.display()));
        wait_ready(&mut out);
        kill(child);
        let (f, data) = data_at(&root, key(0, 2));
        let block = |b: u64| data + b * 4096;
        match loss {
            Loss::None => {}
            Loss::Lost => {
                // Blocks 0 and 1 were holes before their first write; block
                // 2 held its flushed content (write 20).
                f.write_all_at(&[0; 2 * BLOCK], block(0)).unwrap();
                f.write_all_at(&stamped(20, 16, 8), block(2)).unwrap();
            }
            Loss::Torn => {
                f.write_all_at(&[0; BLOCK / 2], block(0) + BLOCK as u64 / 2)
                    .unwrap();
                f.write_all_at(&[0; BLOCK / 2], block(1)).unwrap();
                f.write_all_at(&stamped(20, 16, 4), block(2)).unwrap();
            }
        }
        f.sync_all().unwrap();
        drop(f);
        let _ = std::fs::remove_file(root.join(".clean"));
        runtime().block_on(async {
            let store = Store::open(&root, options()).unwrap();
            let v2 = key(0, 2);
            let held = store.held_blocks(v2).await.unwrap().unwrap()[0];
            let blocks = read_blocks(&store, v2, &[1]).await;
            let ids = |b: usize| -> Vec<u64> {
                let buf = blocks[b]
                    .as_ref()
                    .unwrap_or_else(|e| panic!("{loss:?}: block {b}: {e}"));
                (0..8u64)
                    .map(|i| {
                        let s = b as u64 * 8 + i;
                        sector_id(&buf[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize], s)
                            .unwrap_or(0)
                    })
                    .collect()
            };
            let old = vec![1u64; 8];
            let mut b1_written = old.clone();
            b1_written[3] = 11;
            match loss {
                Loss::None => {
                    assert_eq!(ids(0), vec![10; 8]);
                    assert_eq!(ids(1), b1_written);
                    assert_eq!(ids(2), vec![21; 8]);
                    assert_eq!(held, 0b11111, "{held:#b}");
                }
                Loss::Lost | Loss::Torn => {
                    // Never durable in epoch 2: epoch 1's data shows through.
                    assert_eq!(ids(0), old, "{loss:?}: block 0");
                    assert_eq!(ids(1), old, "{loss:?}: block 1");
                    if loss == Loss::Lost {
                        assert_eq!(ids(2), vec![20; 8]);
                    } else {
                        // Flushed, then torn by an unflushed overwrite: an error.
                        let e = blocks[2].as_ref().unwrap_err();
                        assert!(
                            matches!(e, StoreError::Checksum { block_index: 2, .. }),
                            "{e}"
                        );
                    }
                    assert_eq!(held, 0b11100, "{loss:?}: {held:#b}");
                }
            }
            assert_eq!(ids(3), vec![30; 8], "FUA write");
            assert!(
                blocks[4].as_ref().unwrap().iter().all(|&x| x == 0),
                "zeroed"
            );
            assert_eq!(ids(5), old, "never written in epoch 2");
            // A block that fell through is filled from beneath again.
            store
                .write_at(
                    v2,
                    &[1],
                    EB,
                    SECTOR,
                    IoBuf::copy_from(&stamped(12, 1, 1)),
                    false,
                )
                .await
                .unwrap();
            let buf = store.read_at(v2, &[1], EB, 0, 4096).await.unwrap();
            let got: Vec<u64> = (0..8u64)
                .map(|s| {
                    sector_id(&buf[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize], s)
                        .unwrap_or(0)
                })
                .collect();
            let mut want = if loss == Loss::None {
                vec![10; 8]
            } else {
                old.clone()
            };
            want[1] = 12;
            assert_eq!(got, want, "{loss:?}");
            store.shutdown().await.unwrap();
        });
    }
}
