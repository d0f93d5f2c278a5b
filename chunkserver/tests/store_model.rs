//! The extent store against an in-memory model: random writes, trims, zeroes,
//! reads and flushes (many in flight at once), clean restarts, restarts that
//! must verify every block (no clean marker), and damage done to the files on
//! disk between runs.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use cairn_chunkserver::store::{
    ExtentKey, IoBuf, IoMode, Store, StoreError, StoreOptions, WriteData,
};
use proptest::prelude::*;

const EXTENT_BYTES: u32 = 64 << 10;
const SECTOR: u32 = 512;
const SECTORS: u32 = EXTENT_BYTES / SECTOR;

#[derive(Debug, Clone)]
enum Step {
    Write {
        ext: u8,
        sector: u32,
        sectors: u32,
        seed: u8,
        fua: bool,
    },
    Zero {
        ext: u8,
        sector: u32,
        sectors: u32,
        punch: bool,
    },
    Read {
        ext: u8,
        sector: u32,
        sectors: u32,
    },
    Flush,
}

#[derive(Debug, Clone)]
enum Batch {
    /// Up to 8 steps submitted together; the store applies them in order.
    Concurrent(Vec<Step>),
    CleanRestart,
    /// Reopen without the clean marker: every block is settled on first use.
    UncleanRestart,
}

fn range() -> impl Strategy<Value = (u32, u32)> {
    prop_oneof![
        // anywhere, any size
        (0..SECTORS).prop_flat_map(|s| (Just(s), 1..=(SECTORS - s).min(40))),
        // whole blocks
        (0..SECTORS / 8).prop_flat_map(|b| (
            Just(b * 8),
            (1..=(SECTORS / 8 - b).min(4)).prop_map(|n| n * 8)
        )),
        // the whole extent
        Just((0, SECTORS)),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let ext = 0u8..3;
    prop_oneof![
        5 => (ext.clone(), range(), any::<u8>(), prop::bool::weighted(0.2))
            .prop_map(|(ext, (sector, sectors), seed, fua)| Step::Write { ext, sector, sectors, seed, fua }),
        2 => (ext.clone(), range(), any::<bool>())
            .prop_map(|(ext, (sector, sectors), punch)| Step::Zero { ext, sector, sectors, punch }),
        4 => (ext, range()).prop_map(|(ext, (sector, sectors))| Step::Read { ext, sector, sectors }),
        1 => Just(Step::Flush),
    ]
}

fn batch() -> impl Strategy<Value = Batch> {
    prop_oneof![
        12 => prop::collection::vec(step(), 1..8).prop_map(Batch::Concurrent),
        1 => Just(Batch::CleanRestart),
        1 => Just(Batch::UncleanRestart),
    ]
}

fn key(ext: u8) -> ExtentKey {
    ExtentKey {
        volume_id: 7,
        extent_index: ext as u64,
        epoch: 1,
    }
}

fn pattern(seed: u8, sector: u32, sectors: u32) -> Vec<u8> {
    (0..sectors * SECTOR)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i / 7) as u8) ^ (sector as u8))
        .collect()
}

fn options() -> StoreOptions {
    // A tiny cache so eviction and table reloads happen constantly.
    StoreOptions {
        io_mode: IoMode::Direct,
        ring_entries: 64,
        open_extents_max: 2,
        // Two engines, so requests are routed and flushes, listings and
        // the clean marker are combined across engines.
        engines: 2,
        inline: false,
    }
}

/// The three shapes a write's data reaches the store in, picked by `seed`:
/// an owned aligned buffer; shared bytes over an aligned buffer (as the RPC
/// server passes them on), which go to the kernel without a copy; and shared
/// bytes starting off alignment, which the store must copy first.
fn write_data(seed: u8, bytes: &[u8]) -> WriteData {
    match seed % 3 {
        0 => WriteData::Owned(IoBuf::copy_from(bytes)),
        1 => WriteData::Shared(Bytes::from_owner(IoBuf::copy_from(bytes))),
        _ => {
            let mut shifted = vec![0xee; bytes.len() + 1];
            shifted[1..].copy_from_slice(bytes);
            WriteData::Shared(Bytes::from_owner(IoBuf::copy_from(&shifted)).slice(1..))
        }
    }
}

async fn run_step(store: &Store, step: Step) -> Result<Option<IoBuf>, StoreError> {
    match step {
        Step::Write {
            ext,
            sector,
            sectors,
            seed,
            fua,
        } => {
            let data = write_data(seed, &pattern(seed, sector, sectors));
            store
                .write(key(ext), EXTENT_BYTES, (sector * SECTOR) as u64, data, fua)
                .await
                .map(|_| None)
        }
        Step::Zero {
            ext,
            sector,
            sectors,
            punch,
        } => store
            .write_zeroes(
                key(ext),
                EXTENT_BYTES,
                (sector * SECTOR) as u64,
                sectors * SECTOR,
                false,
                punch,
            )
            .await
            .map(|_| None),
        Step::Read {
            ext,
            sector,
            sectors,
        } => store
            .read(
                key(ext),
                EXTENT_BYTES,
                (sector * SECTOR) as u64,
                sectors * SECTOR,
            )
            .await
            .map(Some),
        Step::Flush => store.flush().await.map(|_| None),
    }
}

fn apply_model(model: &mut HashMap<u8, Vec<u8>>, step: &Step) -> Option<Vec<u8>> {
    match *step {
        Step::Write {
            ext,
            sector,
            sectors,
            seed,
            ..
        } => {
            let m = model
                .entry(ext)
                .or_insert_with(|| vec![0; EXTENT_BYTES as usize]);
            let s = (sector * SECTOR) as usize;
            m[s..s + (sectors * SECTOR) as usize].copy_from_slice(&pattern(seed, sector, sectors));
            None
        }
        Step::Zero {
            ext,
            sector,
            sectors,
            ..
        } => {
            if let Some(m) = model.get_mut(&ext) {
                let s = (sector * SECTOR) as usize;
                m[s..s + (sectors * SECTOR) as usize].fill(0);
            }
            None
        }
        Step::Read {
            ext,
            sector,
            sectors,
        } => {
            let s = (sector * SECTOR) as usize;
            let n = (sectors * SECTOR) as usize;
            Some(model.get(&ext).map_or(vec![0; n], |m| m[s..s + n].to_vec()))
        }
        Step::Flush => None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(batches in prop::collection::vec(batch(), 1..40)) {
        check_model(batches, options())?;
    }

    /// The same with the engines as tasks of the test's current-thread
    /// runtime (`StoreOptions::inline`, the chunk server's `--threads single`).
    #[test]
    fn inline_store_matches_model(batches in prop::collection::vec(batch(), 1..40)) {
        check_model(batches, StoreOptions { inline: true, ..options() })?;
    }
}

fn check_model(batches: Vec<Batch>, options: StoreOptions) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().join("extents");
    let rt = runtime();
    rt.block_on(async {
        let mut store = Store::open(&root, options.clone()).unwrap();
        let mut model: HashMap<u8, Vec<u8>> = HashMap::new();
        for b in batches {
            match b {
                Batch::Concurrent(steps) => {
                    let expected: Vec<_> =
                        steps.iter().map(|s| apply_model(&mut model, s)).collect();
                    let results = futures::future::join_all(
                        steps.iter().cloned().map(|s| run_step(&store, s)),
                    )
                    .await;
                    for ((step, want), got) in steps.iter().zip(expected).zip(results) {
                        let got = got.unwrap_or_else(|e| panic!("{step:?} failed: {e}"));
                        if let Some(want) = want {
                            let got = got.expect("read returns data");
                            let first = got.iter().zip(&want).position(|(a, b)| a != b);
                            prop_assert!(
                                first.is_none(),
                                "{:?} returned wrong data from byte {:?}",
                                step,
                                first
                            );
                        }
                    }
                }
                Batch::CleanRestart | Batch::UncleanRestart => {
                    store.shutdown().await.unwrap();
                    if matches!(b, Batch::UncleanRestart) {
                        std::fs::remove_file(root.join(".clean")).unwrap();
                    }
                    store = Store::open(&root, options.clone()).unwrap();
                }
            }
        }
        // Everything, once more, after a final restart without the marker.
        store.shutdown().await.unwrap();
        std::fs::remove_file(root.join(".clean")).unwrap();
        let store = Store::open(&root, options.clone()).unwrap();
        for ext in 0..3u8 {
            let got = store
                .read(key(ext), EXTENT_BYTES, 0, EXTENT_BYTES)
                .await
                .unwrap();
            let want = model
                .get(&ext)
                .cloned()
                .unwrap_or_else(|| vec![0; EXTENT_BYTES as usize]);
            prop_assert!(got[..] == want[..], "extent {} differs after restart", ext);
        }
        store.shutdown().await.unwrap();
        Ok(())
    })
}

/// An inline store's runtime dropped with writes in flight and no shutdown
/// (a panic unwinding past it, say): dropping the engine task waits until
/// the kernel is done with the writes' buffers, and the store opens again,
/// uncleanly, with the flushed data intact and every 4 KiB write either
/// wholly there or wholly absent.
#[test]
fn inline_store_dropped_with_its_runtime_mid_write_opens_again() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().join("extents");
    let opts = StoreOptions {
        inline: true,
        ..options()
    };
    let blocks = EXTENT_BYTES / 4096;
    let rt = runtime();
    rt.block_on(async {
        let store = Store::open(&root, opts.clone()).unwrap();
        for ext in 0..2u8 {
            let base = IoBuf::copy_from(&vec![0x11; EXTENT_BYTES as usize]);
            store
                .write(key(ext), EXTENT_BYTES, 0, base, false)
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        for ext in 0..2u8 {
            for b in 0..blocks {
                let store = store.clone();
                tokio::spawn(async move {
                    let data = IoBuf::copy_from(&[0x22; 4096]);
                    let _ = store
                        .write(key(ext), EXTENT_BYTES, b as u64 * 4096, data, false)
                        .await;
                });
            }
        }
        // The writers send their commands and the engine submits them.
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
    });
    drop(rt);
    assert!(
        !root.join(".clean").exists(),
        "a store dropped mid-write must not be marked clean"
    );
    runtime().block_on(async {
        let store = Store::open(&root, opts).unwrap();
        for ext in 0..2u8 {
            let got = store
                .read(key(ext), EXTENT_BYTES, 0, EXTENT_BYTES)
                .await
                .unwrap();
            for (b, block) in got.chunks(4096).enumerate() {
                assert!(
                    block.iter().all(|&x| x == 0x11) || block.iter().all(|&x| x == 0x22),
                    "extent {ext} block {b} is neither its flushed nor its new content"
                );
            }
        }
        store.shutdown().await.unwrap();
    });
}

fn extent_file(root: &Path, k: ExtentKey) -> std::path::PathBuf {
    root.join(cairn_chunkserver::store::layout::relative_path(&k))
}

/// Bit rot in a block's data is an error naming volume, extent and block,
/// never data; the other blocks still read.
#[test]
fn corrupt_block_is_an_error_that_names_it() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().join("extents");
    let k = ExtentKey {
        volume_id: 0xabc,
        extent_index: 5,
        epoch: 2,
    };
    runtime().block_on(async {
        let store = Store::open(&root, StoreOptions::default()).unwrap();
        store
            .write(
                k,
                4 << 20,
                0,
                IoBuf::copy_from(&vec![0x5a; 64 << 10]),
                false,
            )
            .await
            .unwrap();
        store.flush().await.unwrap();
        store.shutdown().await.unwrap();
        let path = extent_file(&root, k);
        let data_off = cairn_chunkserver::store::layout::data_offset(4 << 20);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xff; 100], data_off + 3 * 4096 + 700)
            .unwrap();
        f.sync_all().unwrap();
        let store = Store::open(&root, StoreOptions::default()).unwrap();
        let err = store.read(k, 4 << 20, 3 * 4096, 4096).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, StoreError::Checksum { block_index: 3, .. }),
            "{msg}"
        );
        assert!(
            msg.contains("volume 0xabc") && msg.contains("extent 5") && msg.contains("block 3"),
            "{msg}"
        );
        // A read spanning the bad block fails; its neighbours are fine.
        assert!(store.read(k, 4 << 20, 0, 16 << 10).await.is_err());
        assert_eq!(
            &store.read(k, 4 << 20, 2 * 4096, 4096).await.unwrap()[..],
            &[0x5a; 4096][..]
        );
        assert_eq!(
            &store.read(k, 4 << 20, 4 * 4096, 4096).await.unwrap()[..],
            &[0x5a; 4096][..]
        );
        // A partial write cannot merge into a bad block; a whole-block write replaces it.
        assert!(store
            .write(
                k,
                4 << 20,
                3 * 4096 + 512,
                IoBuf::copy_from(&[1; 512]),
                false
            )
            .await
            .is_err());
        store
            .write(k, 4 << 20, 3 * 4096, IoBuf::copy_from(&[2; 4096]), false)
            .await
            .unwrap();
        assert_eq!(
            &store.read(k, 4 << 20, 3 * 4096, 4096).await.unwrap()[..],
            &[2; 4096][..]
        );
        store.shutdown().await.unwrap();
    });
}

/// A crash after an unflushed write's checksum slot reached the disk but its
/// data did not: the block still reads its flushed data, and the next write
/// keeps that data's checksum until it is flushed itself.
#[test]
fn slot_without_data_reads_old_data_after_a_crash() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().join("extents");
    let k = ExtentKey {
        volume_id: 1,
        extent_index: 0,
        epoch: 1,
    };
    let eb = 64 << 10;
    runtime().block_on(async {
        let store = Store::open(&root, StoreOptions::default()).unwrap();
        store
            .write(k, eb, 0, IoBuf::copy_from(&[7; 8192]), false)
            .await
            .unwrap();
        store.flush().await.unwrap();
        store.shutdown().await.unwrap();
        // Forge what a crash mid-write leaves: block 1's slot B holds the CRC
        // of data that never landed, with a newer generation (entries are
        // three slots of 8 bytes; the block's first write went to slot A).
        let path = extent_file(&root, k);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut entry = [0u8; 24];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut entry, 4096 + 24).unwrap();
        let gen = u32::from_le_bytes(entry[4..8].try_into().unwrap());
        assert_eq!(gen, 1, "first write goes to slot A");
        entry[8..12].copy_from_slice(&crc32fast::hash(&[9u8; 4096]).to_le_bytes());
        entry[12..16].copy_from_slice(&(gen + 1).to_le_bytes());
        std::os::unix::fs::FileExt::write_all_at(&f, &entry, 4096 + 24).unwrap();
        std::fs::remove_file(root.join(".clean")).unwrap();

        let store = Store::open(&root, StoreOptions::default()).unwrap();
        assert_eq!(
            &store.read(k, eb, 4096, 4096).await.unwrap()[..],
            &[7; 4096][..]
        );
        store
            .write(k, eb, 4096, IoBuf::copy_from(&[8; 4096]), false)
            .await
            .unwrap();
        store.shutdown().await.unwrap();
        std::fs::remove_file(root.join(".clean")).unwrap();
        let store = Store::open(&root, StoreOptions::default()).unwrap();
        assert_eq!(
            &store.read(k, eb, 4096, 4096).await.unwrap()[..],
            &[8; 4096][..]
        );
        assert_eq!(
            &store.read(k, eb, 0, 4096).await.unwrap()[..],
            &[7; 4096][..]
        );
        store.shutdown().await.unwrap();
    });
}

/// Thin: nothing written takes no extent file; trimming a whole extent
/// deletes its file; trimming blocks punches holes.
#[test]
fn thin_and_trim_give_space_back() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().join("extents");
    let k = ExtentKey {
        volume_id: 2,
        extent_index: 9,
        epoch: 1,
    };
    let eb = 4 << 20;
    runtime().block_on(async {
        let store = Store::open(&root, StoreOptions::default()).unwrap();
        assert_eq!(
            &store.read(k, eb, 0, 8192).await.unwrap()[..],
            &[0; 8192][..]
        );
        store.trim(k, eb, 0, 8192).await.unwrap();
        assert!(
            store.stat(k).await.unwrap().is_none(),
            "reads and trims allocate nothing"
        );
        store
            .write(k, eb, 0, IoBuf::copy_from(&vec![1; 2 << 20]), false)
            .await
            .unwrap();
        store.flush().await.unwrap();
        let full = store.stat(k).await.unwrap().unwrap().allocated_bytes;
        assert!(full >= 2 << 20, "allocated {full}");
        store.trim(k, eb, 0, 1 << 20).await.unwrap();
        store.flush().await.unwrap();
        let after = store.stat(k).await.unwrap().unwrap().allocated_bytes;
        assert!(
            after <= full - (1 << 20),
            "punching 1 MiB left {after} of {full}"
        );
        assert_eq!(
            &store.read(k, eb, 0, 4096).await.unwrap()[..],
            &[0; 4096][..]
        );
        assert_eq!(
            &store.read(k, eb, 1 << 20, 4096).await.unwrap()[..],
            &[1; 4096][..]
        );
        store.trim(k, eb, 0, eb).await.unwrap();
        store.flush().await.unwrap();
        assert!(store.stat(k).await.unwrap().is_none());
        assert!(
            !extent_file(&root, k).exists(),
            "whole-extent trim deletes the file"
        );
        assert_eq!(store.usage().await.unwrap().extents, 0);
        store.shutdown().await.unwrap();
    });
}

/// Writes of 512-byte sectors into the same 4 KiB blocks, all in flight at
/// once, each land (read-modify-write never loses a neighbour's sector).
#[test]
fn concurrent_sector_writes_to_one_block() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().join("extents");
    let k = ExtentKey {
        volume_id: 3,
        extent_index: 0,
        epoch: 1,
    };
    let eb = 64 << 10;
    runtime().block_on(async {
        let store = Store::open(&root, StoreOptions::default()).unwrap();
        let writes = (0..32u32).map(|s| {
            let store = store.clone();
            async move {
                store
                    .write(
                        k,
                        eb,
                        (s * 512) as u64,
                        IoBuf::copy_from(&[s as u8 + 1; 512]),
                        false,
                    )
                    .await
            }
        });
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
        let got = store.read(k, eb, 0, 32 * 512).await.unwrap();
        for s in 0..32usize {
            assert!(
                got[s * 512..(s + 1) * 512]
                    .iter()
                    .all(|&b| b == s as u8 + 1),
                "sector {s}"
            );
        }
        store.shutdown().await.unwrap();
    });
}

/// A request with another extent size than the stored extent is refused.
#[test]
fn extent_size_mismatch_and_bad_ranges() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().join("extents");
    let k = ExtentKey {
        volume_id: 4,
        extent_index: 0,
        epoch: 1,
    };
    runtime().block_on(async {
        let store = Store::open(&root, StoreOptions::default()).unwrap();
        store
            .write(k, 64 << 10, 0, IoBuf::copy_from(&[1; 512]), false)
            .await
            .unwrap();
        let e = store.read(k, 128 << 10, 0, 512).await.unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::ExtentSizeMismatch {
                    stored_bytes: 65536,
                    ..
                }
            ),
            "{e}"
        );
        for (off, len, eb) in [
            (1u64, 512u32, 64u32 << 10),
            (0, 100, 64 << 10),
            (0, 0, 64 << 10),
            (65024, 1024, 64 << 10),
            (0, 512, 3 << 20),
        ] {
            let e = store.read(k, eb, off, len).await.unwrap_err();
            assert!(
                matches!(e, StoreError::InvalidArgument(_)),
                "{off} {len} {eb}: {e}"
            );
        }
        store.shutdown().await.unwrap();
    });
}

/// Regression: after an unclean reopen, two overlapping writes submitted back
/// to back both wait for the extent's slot table to load; the younger one
/// must not overtake the older when the load completes. (Found by
/// `store_matches_model`; ordering of the engine's ready queue.)
#[test]
fn overlapping_writes_keep_order_across_a_table_load() {
    for round in 0..60 {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let root = dir.path().join("extents");
        runtime().block_on(async {
            let store = Store::open(&root, options()).unwrap();
            let mut model: HashMap<u8, Vec<u8>> = HashMap::new();
            let before = [
                Step::Write {
                    ext: 1,
                    sector: 24,
                    sectors: 16,
                    seed: 0,
                    fua: false,
                },
                Step::Write {
                    ext: 1,
                    sector: 88,
                    sectors: 30,
                    seed: 5,
                    fua: false,
                },
            ];
            for s in before {
                apply_model(&mut model, &s);
                run_step(&store, s).await.unwrap();
            }
            store.shutdown().await.unwrap();
            std::fs::remove_file(root.join(".clean")).unwrap();
            let store = Store::open(&root, options()).unwrap();
            let steps = [
                Step::Write {
                    ext: 1,
                    sector: 0,
                    sectors: 128,
                    seed: 202,
                    fua: false,
                },
                Step::Write {
                    ext: 1,
                    sector: 93,
                    sectors: 28,
                    seed: 230,
                    fua: false,
                },
            ];
            for s in &steps {
                apply_model(&mut model, s);
            }
            for r in
                futures::future::join_all(steps.iter().cloned().map(|s| run_step(&store, s))).await
            {
                r.unwrap();
            }
            let got = store
                .read(key(1), EXTENT_BYTES, 0, EXTENT_BYTES)
                .await
                .unwrap();
            let first = got.iter().zip(&model[&1]).position(|(a, b)| a != b);
            assert!(
                first.is_none(),
                "round {round}: first difference at byte {first:?}"
            );
            store.shutdown().await.unwrap();
        });
    }
}

/// Extents are spread over several engines; a listing pages through all of
/// them in key order, with and without a volume filter, and usage and the
/// clean marker cover every engine. The extents come back, in order, after a
/// restart with another engine count.
#[test]
fn listing_and_usage_span_every_engine() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().join("extents");
    let with_engines = |engines| StoreOptions {
        io_mode: IoMode::Direct,
        engines,
        ..StoreOptions::default()
    };
    let mut keys: Vec<ExtentKey> = (0..40u64)
        .map(|i| ExtentKey {
            volume_id: 1 + i % 2,
            extent_index: i / 2,
            epoch: 1,
        })
        .collect();
    keys.sort();
    runtime().block_on(async {
        let store = Store::open(&root, with_engines(3)).unwrap();
        assert_eq!(store.engines(), 3);
        for &k in &keys {
            store
                .write(k, EXTENT_BYTES, 0, IoBuf::copy_from(&[7u8; 4096]), false)
                .await
                .unwrap();
        }
        let usage = store.usage().await.unwrap();
        assert_eq!(usage.extents, keys.len() as u64);
        store.shutdown().await.unwrap();
        assert!(root.join(".clean").exists(), "every engine stopped cleanly");

        for engines in [1, 3, 5] {
            let store = Store::open(&root, with_engines(engines)).unwrap();
            for volume in [None, Some(2)] {
                let want: Vec<ExtentKey> = keys
                    .iter()
                    .copied()
                    .filter(|k| volume.is_none_or(|v| k.volume_id == v))
                    .collect();
                let mut got = Vec::new();
                let mut after = None;
                loop {
                    let page = store.list(volume, after, 7).await.unwrap();
                    assert!(page.extents.len() <= 7);
                    got.extend(page.extents.iter().map(|e| e.key));
                    after = got.last().copied();
                    if !page.more {
                        break;
                    }
                }
                assert_eq!(got, want, "{engines} engines, volume {volume:?}");
            }
            // Clean restarts keep every extent trusted: data reads back.
            for &k in &keys {
                let buf = store.read(k, EXTENT_BYTES, 0, 4096).await.unwrap();
                assert!(buf.iter().all(|&b| b == 7), "{k}");
            }
            store.shutdown().await.unwrap();
        }
    });
}

/// Pages of `path` from `from` to the end that are in the page cache.
fn cached_pages(path: &Path, from: u64) -> usize {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: a read-only shared mapping of a file this test opened; only
    // its residency is asked (mincore), nothing is read through it, and it
    // is unmapped before the file closes.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(at, libc::MAP_FAILED, "mapping {}", path.display());
        let mut resident = vec![0u8; len.div_ceil(4096)];
        let rc = libc::mincore(at, len, resident.as_mut_ptr());
        libc::munmap(at, len);
        assert_eq!(rc, 0, "mincore of {}", path.display());
        resident[(from / 4096) as usize..]
            .iter()
            .filter(|r| **r & 1 != 0)
            .count()
    }
}

/// The first write to a new extent stores its checksum slot through the
/// mapped slot table; that fault must not read the file around it into the
/// page cache. Without the no-readahead advice a device's read_ahead_kb
/// (8 MiB on this machine's disk) zero-filled the whole sparse data region
/// of every new extent: 85% of a chunk server's CPU right after a snapshot,
/// when every write makes a new version.
#[test]
fn a_new_extent_does_not_fill_the_page_cache_with_its_holes() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().join("extents");
    let eb: u32 = 4 << 20;
    runtime().block_on(async {
        let store = Store::open(&root, StoreOptions::default()).unwrap();
        for (i, at) in [0u64, 2 << 20, (4 << 20) - 4096].into_iter().enumerate() {
            let k = ExtentKey {
                volume_id: 3,
                extent_index: i as u64,
                epoch: 1,
            };
            store
                .write(k, eb, at, IoBuf::copy_from(&[7; 4096]), false)
                .await
                .unwrap();
            let path = extent_file(&root, k);
            let data_at = cairn_chunkserver::store::layout::data_offset(eb);
            assert_eq!(
                cached_pages(&path, data_at),
                0,
                "data pages of {} in the page cache after one direct write at {at}",
                path.display()
            );
            assert_eq!(
                &store.read(k, eb, at, 4096).await.unwrap()[..],
                &[7; 4096][..]
            );
        }
        store.shutdown().await.unwrap();
    });
}
