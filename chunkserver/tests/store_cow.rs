//! Copy-on-write extent versions against an in-memory model: a small volume
//! (three 64 KiB extents) whose heads are written, zeroed and trimmed while
//! snapshots freeze them, clones and rollbacks open new heads over frozen
//! epochs, epochs no chain needs any more are deleted, and the store is
//! reopened (cleanly, and without the clean marker so every block is
//! settled again). Every read of a head or frozen epoch, and every
//! `held_blocks`, is checked against the model.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use cairn_chunkserver::store::{ExtentKey, IoBuf, IoMode, Store, StoreError, StoreOptions};
use proptest::prelude::*;

const EXTENT_BYTES: u32 = 64 << 10;
const SECTOR: u32 = 512;
const SECTORS: u32 = EXTENT_BYTES / SECTOR;
const BLOCK: usize = 4096;
const BLOCKS: u32 = EXTENT_BYTES / BLOCK as u32;
const EXTENTS: u8 = 3;
const VOLUME: u64 = 9;
const HEADS_MAX: usize = 3;

#[derive(Debug, Clone)]
enum Io {
    Write {
        head: u8,
        ext: u8,
        sector: u32,
        sectors: u32,
        seed: u8,
        fua: bool,
    },
    Zero {
        head: u8,
        ext: u8,
        sector: u32,
        sectors: u32,
        punch: bool,
    },
    /// A read of any live epoch (heads, then snapshots, then the rest).
    Read {
        epoch: u8,
        ext: u8,
        sector: u32,
        sectors: u32,
    },
    Held {
        epoch: u8,
        ext: u8,
    },
    /// Copy-up of whole blocks into any live epoch's version.
    Materialize {
        epoch: u8,
        ext: u8,
        block: u32,
        blocks: u32,
    },
    Flush,
}

#[derive(Debug, Clone)]
enum Step {
    /// Up to 6 I/Os submitted together; the store applies them in order.
    Concurrent(Vec<Io>),
    /// Freeze a head's epoch as a snapshot; the head continues in a new epoch.
    Snapshot {
        head: u8,
    },
    /// A new head over a snapshot.
    Clone {
        snap: u8,
    },
    /// A head starts again from a snapshot, in a new epoch.
    Rollback {
        head: u8,
        snap: u8,
    },
    /// Drop a head (a deleted volume or clone).
    DropHead {
        head: u8,
    },
    /// Forget a snapshot's name (its epoch stays while a chain needs it).
    DeleteSnapshot {
        snap: u8,
    },
    /// `delete_version` of every epoch nothing needs any more.
    Collect,
    /// Every extent of every live epoch read whole and its held blocks compared.
    CheckAll,
    CleanRestart,
    UncleanRestart,
}

fn range() -> impl Strategy<Value = (u32, u32)> {
    prop_oneof![
        // anywhere, any size (sub-block and block-crossing)
        3 => (0..SECTORS).prop_flat_map(|s| (Just(s), 1..=(SECTORS - s).min(24))),
        // whole blocks
        2 => (0..SECTORS / 8).prop_flat_map(|b| (
            Just(b * 8),
            (1..=(SECTORS / 8 - b).min(4)).prop_map(|n| n * 8)
        )),
        // the whole extent
        1 => Just((0, SECTORS)),
    ]
}

fn io() -> impl Strategy<Value = Io> {
    let ext = 0..EXTENTS;
    prop_oneof![
        6 => (any::<u8>(), ext.clone(), range(), any::<u8>(), prop::bool::weighted(0.15))
            .prop_map(|(head, ext, (sector, sectors), seed, fua)| Io::Write { head, ext, sector, sectors, seed, fua }),
        3 => (any::<u8>(), ext.clone(), range(), any::<bool>())
            .prop_map(|(head, ext, (sector, sectors), punch)| Io::Zero { head, ext, sector, sectors, punch }),
        5 => (any::<u8>(), ext.clone(), range())
            .prop_map(|(epoch, ext, (sector, sectors))| Io::Read { epoch, ext, sector, sectors }),
        1 => (any::<u8>(), ext.clone()).prop_map(|(epoch, ext)| Io::Held { epoch, ext }),
        2 => (any::<u8>(), ext, prop_oneof![
                3 => (0..BLOCKS).prop_flat_map(|b| (Just(b), 1..=(BLOCKS - b).min(5))),
                1 => Just((0, BLOCKS)),
            ])
            .prop_map(|(epoch, ext, (block, blocks))| Io::Materialize { epoch, ext, block, blocks }),
        1 => Just(Io::Flush),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        14 => prop::collection::vec(io(), 1..6).prop_map(Step::Concurrent),
        3 => any::<u8>().prop_map(|head| Step::Snapshot { head }),
        1 => any::<u8>().prop_map(|snap| Step::Clone { snap }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(head, snap)| Step::Rollback { head, snap }),
        1 => any::<u8>().prop_map(|head| Step::DropHead { head }),
        1 => any::<u8>().prop_map(|snap| Step::DeleteSnapshot { snap }),
        1 => Just(Step::Collect),
        1 => Just(Step::CheckAll),
        1 => Just(Step::CleanRestart),
        1 => Just(Step::UncleanRestart),
    ]
}

fn key(ext: u8, epoch: u64) -> ExtentKey {
    ExtentKey {
        volume_id: VOLUME,
        extent_index: ext as u64,
        epoch,
    }
}

fn pattern(seed: u8, sector: u32, sectors: u32) -> Vec<u8> {
    (0..sectors * SECTOR)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i / 7) as u8) ^ (sector as u8) | 1)
        .collect()
}

/// One stored version of one extent: the blocks it holds.
type Version = BTreeMap<u32, Vec<u8>>;

/// The volume as the store should see it.
#[derive(Debug, Default)]
struct Model {
    /// The chain beneath every epoch ever made (never changes).
    chains: BTreeMap<u64, Vec<u64>>,
    /// Writable heads: (epoch).
    heads: Vec<u64>,
    /// Named snapshots: frozen epochs.
    snaps: Vec<u64>,
    /// Stored versions, by (epoch, extent).
    stored: HashMap<(u64, u8), Version>,
    next_epoch: u64,
}

impl Model {
    fn new() -> Self {
        let mut m = Model {
            next_epoch: 2,
            ..Model::default()
        };
        m.chains.insert(1, Vec::new());
        m.heads.push(1);
        m
    }

    fn new_epoch(&mut self, chain: Vec<u64>) -> u64 {
        let e = self.next_epoch;
        self.next_epoch += 1;
        self.chains.insert(e, chain);
        e
    }

    /// Epochs something still reads: heads, snapshots and their chains.
    fn live(&self) -> BTreeSet<u64> {
        let mut live = BTreeSet::new();
        for &e in self.heads.iter().chain(&self.snaps) {
            live.insert(e);
            live.extend(self.chains[&e].iter().copied());
        }
        live
    }

    /// Readable epochs in a stable order: heads, snapshots, then the others
    /// still referenced.
    fn readable(&self) -> Vec<u64> {
        let mut out: Vec<u64> = self.heads.clone();
        for e in self.snaps.iter().copied().chain(self.live()) {
            if !out.contains(&e) {
                out.push(e);
            }
        }
        out
    }

    fn head(&self, h: u8) -> u64 {
        self.heads[h as usize % self.heads.len()]
    }

    /// The block as `epoch` reads it through its chain.
    fn read_block(&self, epoch: u64, ext: u8, b: u32) -> Vec<u8> {
        std::iter::once(epoch)
            .chain(self.chains[&epoch].iter().copied())
            .find_map(|e| self.stored.get(&(e, ext)).and_then(|v| v.get(&b)).cloned())
            .unwrap_or_else(|| vec![0; BLOCK])
    }

    fn read(&self, epoch: u64, ext: u8, offset: usize, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let (b0, b1) = (offset / BLOCK, (offset + len).div_ceil(BLOCK));
        for b in b0..b1 {
            out.extend(self.read_block(epoch, ext, b as u32));
        }
        let s = offset - b0 * BLOCK;
        out[s..s + len].to_vec()
    }

    /// Applies `bytes` (None: zeros) at `offset` of `epoch`'s version.
    fn write(&mut self, epoch: u64, ext: u8, offset: usize, len: usize, bytes: Option<&[u8]>) {
        let (b0, b1) = (offset / BLOCK, (offset + len).div_ceil(BLOCK));
        let mut blocks = Vec::new();
        for b in b0..b1 {
            // A partial block not held yet is filled through the chain.
            blocks.push(
                self.stored
                    .get(&(epoch, ext))
                    .and_then(|v| v.get(&(b as u32)).cloned())
                    .unwrap_or_else(|| self.read_block(epoch, ext, b as u32)),
            );
        }
        let mut span: Vec<u8> = blocks.concat();
        let s = offset - b0 * BLOCK;
        match bytes {
            Some(d) => span[s..s + len].copy_from_slice(d),
            None => span[s..s + len].fill(0),
        }
        let v = self.stored.entry((epoch, ext)).or_default();
        for (i, b) in (b0..b1).enumerate() {
            v.insert(b as u32, span[i * BLOCK..(i + 1) * BLOCK].to_vec());
        }
    }

    fn zero(&mut self, epoch: u64, ext: u8, offset: usize, len: usize, punch: bool) {
        let alone = self.chains[&epoch].is_empty();
        if alone && !self.stored.contains_key(&(epoch, ext)) {
            return; // reads as zeros already
        }
        if alone && punch && offset == 0 && len == EXTENT_BYTES as usize {
            self.stored.remove(&(epoch, ext)); // the file is deleted
            return;
        }
        self.write(epoch, ext, offset, len, None);
    }

    /// Blocks of the range `epoch`'s version does not hold are stored with
    /// what it reads now; nothing changes without a chain.
    fn materialize(&mut self, epoch: u64, ext: u8, block: u32, blocks: u32) {
        if self.chains[&epoch].is_empty() {
            return;
        }
        let filled: Vec<(u32, Vec<u8>)> = (block..block + blocks)
            .map(|b| (b, self.read_block(epoch, ext, b)))
            .collect();
        let v = self.stored.entry((epoch, ext)).or_default();
        for (b, data) in filled {
            v.entry(b).or_insert(data);
        }
    }

    fn held(&self, epoch: u64, ext: u8) -> Option<Vec<u64>> {
        let v = self.stored.get(&(epoch, ext))?;
        let mut words = vec![0u64; (BLOCKS as usize).div_ceil(64)];
        for &b in v.keys() {
            words[b as usize / 64] |= 1 << (b % 64);
        }
        Some(words)
    }
}

fn options() -> StoreOptions {
    StoreOptions {
        io_mode: IoMode::Direct,
        ring_entries: 64,
        // A tiny cache: versions beneath are evicted and reloaded constantly.
        open_extents_max: 2,
        engines: 2,
        // The engines as tasks of the test's current-thread runtime, as the
        // chunk server runs them by default (the model tests cover both).
        inline: true,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// What one I/O returned.
enum Got {
    None,
    Data(IoBuf),
    Held(Option<Vec<u64>>),
}

/// Resolves an I/O against the model (applying writes), giving the call to
/// make and the expected answer.
struct Planned {
    key: ExtentKey,
    below: Vec<u64>,
    io: Io,
    want: Option<Vec<u8>>,
    want_held: Option<Option<Vec<u64>>>,
}

fn plan(model: &mut Model, io: &Io) -> Planned {
    let readable = model.readable();
    let p = |model: &Model, epoch: u64, ext: u8| Planned {
        key: key(ext, epoch),
        below: model.chains[&epoch].clone(),
        io: io.clone(),
        want: None,
        want_held: None,
    };
    match *io {
        Io::Write {
            head,
            ext,
            sector,
            sectors,
            seed,
            ..
        } => {
            let e = model.head(head);
            let planned = p(model, e, ext);
            let data = pattern(seed, sector, sectors);
            model.write(e, ext, (sector * SECTOR) as usize, data.len(), Some(&data));
            planned
        }
        Io::Zero {
            head,
            ext,
            sector,
            sectors,
            punch,
        } => {
            let e = model.head(head);
            let planned = p(model, e, ext);
            model.zero(
                e,
                ext,
                (sector * SECTOR) as usize,
                (sectors * SECTOR) as usize,
                punch,
            );
            planned
        }
        Io::Read {
            epoch,
            ext,
            sector,
            sectors,
        } => {
            let e = readable[epoch as usize % readable.len()];
            let mut planned = p(model, e, ext);
            planned.want = Some(model.read(
                e,
                ext,
                (sector * SECTOR) as usize,
                (sectors * SECTOR) as usize,
            ));
            planned
        }
        Io::Held { epoch, ext } => {
            let e = readable[epoch as usize % readable.len()];
            let mut planned = p(model, e, ext);
            planned.want_held = Some(model.held(e, ext));
            planned
        }
        Io::Materialize {
            epoch,
            ext,
            block,
            blocks,
        } => {
            let e = readable[epoch as usize % readable.len()];
            let planned = p(model, e, ext);
            model.materialize(e, ext, block, blocks);
            planned
        }
        Io::Flush => p(model, model.heads[0], 0),
    }
}

async fn run(store: &Store, p: &Planned) -> Result<Got, StoreError> {
    let (k, below) = (p.key, &p.below[..]);
    match p.io {
        Io::Write {
            sector,
            sectors,
            seed,
            fua,
            ..
        } => {
            let data = IoBuf::copy_from(&pattern(seed, sector, sectors));
            store
                .write_at(k, below, EXTENT_BYTES, (sector * SECTOR) as u64, data, fua)
                .await
                .map(|_| Got::None)
        }
        Io::Zero {
            sector,
            sectors,
            punch,
            ..
        } => {
            let (offset, len) = ((sector * SECTOR) as u64, sectors * SECTOR);
            if punch && below.is_empty() && sector % 3 == 0 {
                // `trim` is write-zeroes with punch; use it for some.
                return store
                    .trim(k, EXTENT_BYTES, offset, len)
                    .await
                    .map(|_| Got::None);
            }
            store
                .write_zeroes_at(k, below, EXTENT_BYTES, offset, len, false, punch)
                .await
                .map(|_| Got::None)
        }
        Io::Read {
            sector, sectors, ..
        } => store
            .read_at(
                k,
                below,
                EXTENT_BYTES,
                (sector * SECTOR) as u64,
                sectors * SECTOR,
            )
            .await
            .map(Got::Data),
        Io::Held { .. } => store.held_blocks(k).await.map(Got::Held),
        Io::Materialize { block, blocks, .. } => store
            .materialize_at(
                k,
                below,
                EXTENT_BYTES,
                block as u64 * BLOCK as u64,
                blocks * BLOCK as u32,
            )
            .await
            .map(|_| Got::None),
        Io::Flush => store.flush().await.map(|_| Got::None),
    }
}

fn check(p: &Planned, got: Got) -> Result<(), TestCaseError> {
    match (got, &p.want, &p.want_held) {
        (Got::Data(buf), Some(want), _) => {
            let first = buf.iter().zip(want).position(|(a, b)| a != b);
            prop_assert!(
                first.is_none() && buf.len() == want.len(),
                "{:?} on {} below {:?}: wrong data from byte {:?} (got {:#x}, want {:#x})",
                p.io,
                p.key,
                p.below,
                first,
                first.map_or(0, |i| buf[i]),
                first.map_or(0, |i| want[i])
            );
        }
        (Got::Held(h), _, Some(want)) => {
            prop_assert_eq!(&h, want, "held blocks of {} (below {:?})", p.key, p.below);
        }
        (Got::None, None, None) => {}
        _ => prop_assert!(false, "unexpected answer to {:?}", p.io),
    }
    Ok(())
}

async fn check_all(store: &Store, model: &Model) -> Result<(), TestCaseError> {
    for e in model.readable() {
        for ext in 0..EXTENTS {
            let p = Planned {
                key: key(ext, e),
                below: model.chains[&e].clone(),
                io: Io::Read {
                    epoch: 0,
                    ext,
                    sector: 0,
                    sectors: SECTORS,
                },
                want: Some(model.read(e, ext, 0, EXTENT_BYTES as usize)),
                want_held: None,
            };
            let got = run(store, &p)
                .await
                .map_err(|err| TestCaseError::fail(format!("reading {}: {err}", p.key)))?;
            check(&p, got)?;
            let held = store
                .held_blocks(key(ext, e))
                .await
                .map_err(|err| TestCaseError::fail(format!("held blocks of {}: {err}", p.key)))?;
            prop_assert_eq!(held, model.held(e, ext), "held blocks of {}", p.key);
        }
    }
    Ok(())
}

async fn restart(store: Store, root: &Path, unclean: bool) -> Store {
    store.shutdown().await.unwrap();
    if unclean {
        std::fs::remove_file(root.join(".clean")).unwrap();
    }
    Store::open(root, options()).unwrap()
}

async fn run_steps(root: &Path, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let mut store = Store::open(root, options()).unwrap();
    let mut model = Model::new();
    for s in steps {
        match s {
            Step::Concurrent(ios) => {
                let planned: Vec<Planned> = ios.iter().map(|io| plan(&mut model, io)).collect();
                let results =
                    futures::future::join_all(planned.iter().map(|p| run(&store, p))).await;
                for (p, got) in planned.iter().zip(results) {
                    let got = got.map_err(|e| {
                        TestCaseError::fail(format!("{:?} on {} failed: {e}", p.io, p.key))
                    })?;
                    check(p, got)?;
                }
            }
            Step::Snapshot { head } => {
                let h = head as usize % model.heads.len();
                let frozen = model.heads[h];
                let mut chain = vec![frozen];
                chain.extend(model.chains[&frozen].iter().copied());
                model.heads[h] = model.new_epoch(chain);
                model.snaps.push(frozen);
            }
            Step::Clone { snap } => {
                if model.snaps.is_empty() || model.heads.len() >= HEADS_MAX {
                    continue;
                }
                let s = model.snaps[snap as usize % model.snaps.len()];
                let mut chain = vec![s];
                chain.extend(model.chains[&s].iter().copied());
                let e = model.new_epoch(chain);
                model.heads.push(e);
            }
            Step::Rollback { head, snap } => {
                if model.snaps.is_empty() {
                    continue;
                }
                let h = head as usize % model.heads.len();
                let s = model.snaps[snap as usize % model.snaps.len()];
                let mut chain = vec![s];
                chain.extend(model.chains[&s].iter().copied());
                model.heads[h] = model.new_epoch(chain);
            }
            Step::DropHead { head } => {
                if model.heads.len() > 1 {
                    model.heads.remove(head as usize % model.heads.len());
                }
            }
            Step::DeleteSnapshot { snap } => {
                if !model.snaps.is_empty() {
                    model.snaps.remove(snap as usize % model.snaps.len());
                }
            }
            Step::Collect => {
                let live = model.live();
                let dead: Vec<(u64, u8)> = model
                    .stored
                    .keys()
                    .copied()
                    .filter(|(e, _)| !live.contains(e))
                    .collect();
                // Also epochs that never stored anything: a no-op.
                let idle: Vec<u64> = model
                    .chains
                    .keys()
                    .copied()
                    .filter(|e| !live.contains(e))
                    .collect();
                let mut calls = Vec::new();
                for &(e, ext) in &dead {
                    calls.push(key(ext, e));
                }
                for &e in &idle {
                    calls.push(key(0, e));
                }
                let results =
                    futures::future::join_all(calls.iter().map(|&k| store.delete_version(k))).await;
                for (k, r) in calls.iter().zip(results) {
                    r.map_err(|e| TestCaseError::fail(format!("deleting {k}: {e}")))?;
                }
                for (e, ext) in dead {
                    model.stored.remove(&(e, ext));
                    prop_assert_eq!(
                        store.held_blocks(key(ext, e)).await.unwrap(),
                        None,
                        "deleted"
                    );
                    prop_assert!(store.stat(key(ext, e)).await.unwrap().is_none());
                }
                check_all(&store, &model).await?;
            }
            Step::CheckAll => check_all(&store, &model).await?,
            Step::CleanRestart | Step::UncleanRestart => {
                store = restart(store, root, matches!(s, Step::UncleanRestart)).await;
            }
        }
    }
    // Everything, once more, after a restart that settles every block.
    store = restart(store, root, true).await;
    check_all(&store, &model).await?;
    // The listing holds exactly the stored versions.
    let page = store.list(Some(VOLUME), None, 10_000).await.unwrap();
    let listed: BTreeSet<(u64, u64)> = page
        .extents
        .iter()
        .map(|s| (s.key.epoch, s.key.extent_index))
        .collect();
    let want: BTreeSet<(u64, u64)> = model
        .stored
        .keys()
        .map(|&(e, ext)| (e, ext as u64))
        .collect();
    prop_assert_eq!(listed, want, "stored versions");
    store.shutdown().await.unwrap();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn cow_versions_match_model(steps in prop::collection::vec(step(), 1..40)) {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let root = dir.path().join("extents");
        runtime().block_on(run_steps(&root, steps))?;
    }
}

/// Several 512-byte writes at once into blocks a new version does not hold
/// yet: each fills its block from the version beneath under the block lock,
/// so all of them land and the sectors none of them wrote keep the old data.
#[test]
fn concurrent_sector_writes_into_blocks_not_held_yet() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().join("extents");
    runtime().block_on(async {
        let store = Store::open(&root, options()).unwrap();
        let old: Vec<u8> = (0..EXTENT_BYTES).map(|i| (i / 512) as u8 | 0x80).collect();
        store
            .write_at(
                key(0, 1),
                &[],
                EXTENT_BYTES,
                0,
                IoBuf::copy_from(&old),
                false,
            )
            .await
            .unwrap();
        let mut want = old.clone();
        let mut chain = vec![1u64];
        for epoch in 2..8u64 {
            let prev = want.clone();
            // Sectors of blocks 1..4, some in each, one crossing two blocks.
            let mut writes: Vec<(u32, u32)> = vec![(9, 1), (11, 1), (14, 1), (15, 2), (20, 1)];
            writes.extend((0..7).map(|i| (24 + i * 2 + (epoch as u32 % 2), 1)));
            let below = chain.clone();
            let calls = writes.iter().map(|&(sector, n)| {
                let store = store.clone();
                let below = below.clone();
                let data = vec![(sector as u8) ^ (epoch as u8 * 17); (n * SECTOR) as usize];
                async move {
                    store
                        .write_at(
                            key(0, epoch),
                            &below,
                            EXTENT_BYTES,
                            (sector * SECTOR) as u64,
                            IoBuf::copy_from(&data),
                            false,
                        )
                        .await
                }
            });
            for r in futures::future::join_all(calls).await {
                r.unwrap();
            }
            for &(sector, n) in &writes {
                let s = (sector * SECTOR) as usize;
                want[s..s + (n * SECTOR) as usize].fill((sector as u8) ^ (epoch as u8 * 17));
            }
            let got = store
                .read_at(key(0, epoch), &below, EXTENT_BYTES, 0, EXTENT_BYTES)
                .await
                .unwrap();
            assert!(got[..] != prev[..], "epoch {epoch} wrote something");
            let first = got.iter().zip(&want).position(|(a, b)| a != b);
            assert!(
                first.is_none(),
                "epoch {epoch}: first difference at {first:?}"
            );
            // The version holds exactly the blocks written into.
            let held = store.held_blocks(key(0, epoch)).await.unwrap().unwrap();
            assert_eq!(held, vec![0b11110], "epoch {epoch}");
            // The older versions are untouched.
            let older = store
                .read_at(key(0, chain[0]), &chain[1..], EXTENT_BYTES, 0, EXTENT_BYTES)
                .await
                .unwrap();
            assert!(older[..] == prev[..], "epoch {} changed", chain[0]);
            chain.insert(0, epoch);
        }
        store.shutdown().await.unwrap();
    });
}

/// Whole-block writes never read the chain; trimming a whole extent with a
/// chain beneath keeps the file with every block held as zeros; zeroing a
/// version not stored yet creates it; without a chain trim still deletes.
#[test]
fn trims_and_zeroes_hide_older_versions() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().join("extents");
    runtime().block_on(async {
        let store = Store::open(&root, options()).unwrap();
        let old = vec![0x5au8; EXTENT_BYTES as usize];
        store
            .write_at(
                key(1, 1),
                &[],
                EXTENT_BYTES,
                0,
                IoBuf::copy_from(&old),
                true,
            )
            .await
            .unwrap();
        // A version not stored yet, zeroed in part.
        store
            .write_zeroes_at(key(1, 2), &[1], EXTENT_BYTES, 4096 + 512, 1024, false, true)
            .await
            .unwrap();
        let got = store
            .read_at(key(1, 2), &[1], EXTENT_BYTES, 4096, 4096)
            .await
            .unwrap();
        assert!(got[..512].iter().all(|&b| b == 0x5a), "filled from beneath");
        assert!(got[512..1536].iter().all(|&b| b == 0));
        assert!(got[1536..].iter().all(|&b| b == 0x5a));
        assert_eq!(
            store.held_blocks(key(1, 2)).await.unwrap(),
            Some(vec![0b10])
        );
        // The whole extent trimmed over a chain: the file stays, all zeros.
        store
            .trim(key(1, 3), EXTENT_BYTES, 0, EXTENT_BYTES)
            .await
            .unwrap();
        assert!(
            store.stat(key(1, 3)).await.unwrap().is_none(),
            "without a chain, nothing to hide"
        );
        store
            .write_zeroes_at(
                key(1, 3),
                &[2, 1],
                EXTENT_BYTES,
                0,
                EXTENT_BYTES,
                true,
                true,
            )
            .await
            .unwrap();
        assert!(store.stat(key(1, 3)).await.unwrap().is_some());
        let got = store
            .read_at(key(1, 3), &[2, 1], EXTENT_BYTES, 0, EXTENT_BYTES)
            .await
            .unwrap();
        assert!(got.iter().all(|&b| b == 0));
        assert_eq!(
            store.held_blocks(key(1, 3)).await.unwrap(),
            Some(vec![(1 << BLOCKS) - 1])
        );
        // A whole-block write into a new version: held, no fill needed.
        store
            .write_at(
                key(1, 4),
                &[3, 2, 1],
                EXTENT_BYTES,
                8192,
                IoBuf::copy_from(&[7; 4096]),
                false,
            )
            .await
            .unwrap();
        assert_eq!(
            store.held_blocks(key(1, 4)).await.unwrap(),
            Some(vec![0b100])
        );
        // Deleting the version in the middle: the chain skips it.
        store.delete_version(key(1, 3)).await.unwrap();
        store.delete_version(key(1, 3)).await.unwrap();
        let got = store
            .read_at(key(1, 4), &[3, 2, 1], EXTENT_BYTES, 0, 3 * 4096)
            .await
            .unwrap();
        assert!(got[..4096].iter().all(|&b| b == 0x5a));
        assert!(got[4096..4096 + 512].iter().all(|&b| b == 0x5a));
        assert!(got[4096 + 512..4096 + 1536].iter().all(|&b| b == 0));
        assert!(got[8192..].iter().all(|&b| b == 7));
        // A chain naming the version itself is refused.
        let e = store
            .read_at(key(1, 4), &[4], EXTENT_BYTES, 0, 512)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::InvalidArgument(_)), "{e}");
        // A version beneath with another extent size is an error.
        store
            .write_at(
                key(2, 1),
                &[],
                128 << 10,
                0,
                IoBuf::copy_from(&[1; 512]),
                false,
            )
            .await
            .unwrap();
        let e = store
            .read_at(key(2, 2), &[1], EXTENT_BYTES, 0, 512)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::ExtentSizeMismatch { .. }), "{e}");
        store.shutdown().await.unwrap();
    });
}

/// Deleting a version while reads fall through it: the reads already in
/// flight finish with its data, later ones skip it.
#[test]
fn delete_version_while_reads_fall_through_it() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().join("extents");
    runtime().block_on(async {
        let store = Store::open(&root, options()).unwrap();
        store
            .write_at(
                key(0, 1),
                &[],
                EXTENT_BYTES,
                0,
                IoBuf::copy_from(&vec![1; EXTENT_BYTES as usize]),
                false,
            )
            .await
            .unwrap();
        store
            .write_at(
                key(0, 2),
                &[1],
                EXTENT_BYTES,
                0,
                IoBuf::copy_from(&vec![2; EXTENT_BYTES as usize / 2]),
                false,
            )
            .await
            .unwrap();
        for round in 0..20 {
            let reads = (0..8).map(|i| {
                let store = store.clone();
                async move {
                    store
                        .read_at(key(0, 3), &[2, 1], EXTENT_BYTES, (i * 8192) as u64, 8192)
                        .await
                }
            });
            let delete = store.delete_version(key(0, 2));
            let (reads, deleted) =
                futures::future::join(futures::future::join_all(reads), delete).await;
            deleted.unwrap();
            for (i, r) in reads.into_iter().enumerate() {
                let buf = r.unwrap_or_else(|e| panic!("round {round} read {i}: {e}"));
                let v = buf[0];
                assert!(buf.iter().all(|&b| b == v), "round {round} read {i}: mixed");
                if i < 4 {
                    // Arrived before the delete: it waits for them.
                    assert_eq!(v, 2, "round {round} read {i}");
                } else {
                    assert_eq!(v, 1, "round {round} read {i}");
                }
            }
            store
                .write_at(
                    key(0, 2),
                    &[1],
                    EXTENT_BYTES,
                    0,
                    IoBuf::copy_from(&vec![2; EXTENT_BYTES as usize / 2]),
                    false,
                )
                .await
                .unwrap();
        }
        store.shutdown().await.unwrap();
    });
}
