//! The extent store: thin, checksummed extent versions on local disk, all data
//! I/O through io_uring.
//!
//! [`Store`] is a cheap handle over one or more engines ([`engine`]), one
//! thread and one io_uring each (by default one per CPU). Every extent
//! belongs to one engine, chosen by hashing `(volume, extent index)`, so all
//! versions of an extent live in the same engine; that engine owns every piece
//! of state about it (index entry, open files, block slots, locks) and applies
//! its commands in the order they arrive. Handles send commands over a
//! channel and await a oneshot reply, so callers can be tokio tasks or plain
//! threads. Flush, listing and usage go to every engine and are combined here.
//!
//! How a block stays verifiable through crashes is explained in [`slots`].

pub mod buf;
mod engine;
pub mod error;
pub mod layout;
mod recovery;
pub mod slots;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::oneshot;

pub use buf::{IoBuf, WriteData};
pub use error::StoreError;
use layout::{extent_bytes_valid, SECTOR_BYTES};

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which stored version of which extent: `(volume, extent index, epoch)`.
/// Snapshots add versions with higher epochs, each its own file; a version
/// is read through the older versions beneath it (its *chain*, which the
/// caller passes with each request: see [`Store::read_at`]).
///
/// ## Copy-on-write versions
///
/// A version *holds* a 4 KiB block once the block was written or zeroed in
/// it; other blocks come from the first version in the chain that holds
/// them, else read as zeros. Held, held as zeros and not held are told apart
/// by the block's checksum slots alone (see [`slots`]): no slots is not held;
/// a zeroed block keeps the CRC32 of a zero block over a punched hole. All
/// versions of an extent live in one engine, which reads older versions'
/// files directly, taking shared block locks on them in chain order (newest
/// first; chains follow the snapshot tree, so lock waits never form a cycle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtentKey {
    pub volume_id: u64,
    pub extent_index: u64,
    pub epoch: u64,
}

impl std::fmt::Display for ExtentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "volume {:#x} extent {} epoch {}",
            self.volume_id, self.extent_index, self.epoch
        )
    }
}

/// How the engine opens extent data. See ARCHITECTURE.md for the measurement
/// behind the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// O_DIRECT for block data; checksum slots stay buffered.
    #[default]
    Direct,
    /// Everything through the page cache (for file systems without O_DIRECT).
    Buffered,
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub io_mode: IoMode,
    /// Submission queue entries of each engine's io_uring.
    pub ring_entries: u32,
    /// Extents kept open, over all engines (two file descriptors and the slot
    /// table each). Bounds memory: about 28 KiB per open 4 MiB extent.
    pub open_extents_max: usize,
    /// Engine threads, each with its own io_uring; 0 means one per CPU, at
    /// most [`ENGINES_AUTO_MAX`] (one when `inline`). One thread cannot keep a fast disk busy:
    /// submitting a 4 KiB write costs the kernel about as much CPU time as the
    /// disk takes to do it.
    pub engines: usize,
    /// Run the engines as tasks of the tokio runtime that opens the store
    /// instead of threads of their own. On a current-thread runtime this is
    /// thread per core: the callers (RPC connections), the engine and its
    /// ring share one thread, so a request never waits for another thread
    /// to wake. [`Store::open`] must then be called inside that runtime.
    pub inline: bool,
}

/// The most engines `engines: 0` starts.
pub const ENGINES_AUTO_MAX: usize = 8;
/// The most engines a store accepts.
pub const ENGINES_MAX: usize = 64;

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            io_mode: IoMode::Direct,
            ring_entries: 1024,
            open_extents_max: 1024,
            engines: 0,
            inline: false,
        }
    }
}

impl StoreOptions {
    /// The number of engines these options start.
    pub fn engine_count(&self) -> usize {
        match self.engines {
            // Inline engines share their runtime's threads; with a current-
            // thread runtime a second one only splits the batches.
            0 if self.inline => 1,
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(ENGINES_AUTO_MAX),
            n => n.min(ENGINES_MAX),
        }
    }
}

/// The engine that owns every version of extent `(volume, index)`, of `n`.
/// Not persisted anywhere: a restart with another engine count is fine.
fn engine_of(key: &ExtentKey, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    // splitmix64's finaliser over both fields: consecutive extents of a
    // volume spread evenly, so a sequential stream uses every engine.
    let mut h = key.volume_id ^ key.extent_index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 31;
    (h % n as u64) as usize
}

/// One stored extent version, as listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentStat {
    pub key: ExtentKey,
    pub extent_bytes: u32,
    /// Bytes the file system allocated to the extent file (last known).
    pub allocated_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreUsage {
    pub extents: u64,
    pub allocated_bytes: u64,
}

/// A page of an extent listing.
#[derive(Debug, Clone, Default)]
pub struct ExtentPage {
    pub extents: Vec<ExtentStat>,
    /// More entries follow the last one.
    pub more: bool,
}

/// Epochs beneath a version, newest first. Empty (no allocation) for a
/// version read alone.
pub(crate) type Below = Box<[u64]>;

pub(crate) enum Command {
    Read {
        key: ExtentKey,
        below: Below,
        extent_bytes: u32,
        offset: u64,
        len: u32,
        reply: oneshot::Sender<Result<IoBuf>>,
    },
    Write {
        key: ExtentKey,
        below: Below,
        extent_bytes: u32,
        offset: u64,
        data: WriteData,
        fua: bool,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Trim and write-zeroes: the range reads as zeros afterwards; `punch`
    /// gives whole blocks back to the file system.
    Zero {
        key: ExtentKey,
        below: Below,
        extent_bytes: u32,
        offset: u64,
        len: u32,
        fua: bool,
        punch: bool,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Makes the version hold every block of the range with the content it
    /// reads now (see [`Store::materialize_at`]).
    Materialize {
        key: ExtentKey,
        below: Below,
        extent_bytes: u32,
        offset: u64,
        len: u32,
        reply: oneshot::Sender<Result<()>>,
    },
    Flush {
        reply: oneshot::Sender<Result<()>>,
    },
    List {
        volume: Option<u64>,
        after: Option<ExtentKey>,
        limit: usize,
        reply: oneshot::Sender<ExtentPage>,
    },
    Stat {
        key: ExtentKey,
        reply: oneshot::Sender<Option<ExtentStat>>,
    },
    /// The version's held-block bitmap (None if not stored).
    Held {
        key: ExtentKey,
        reply: oneshot::Sender<Result<Option<Vec<u64>>>>,
    },
    /// Removes one stored version.
    Delete {
        key: ExtentKey,
        reply: oneshot::Sender<Result<()>>,
    },
    Usage {
        reply: oneshot::Sender<StoreUsage>,
    },
    Shutdown {
        reply: oneshot::Sender<Result<()>>,
    },
}

/// Handle to a running store. Clones share its engines.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    engines: Vec<Arc<engine::Shared>>,
    runners: std::sync::Mutex<Vec<engine::Runner>>,
    root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store under `root` (the data directory's
    /// `extents/` folder) and starts its engine threads. Fails, never
    /// reformats, if an extent file is not one Cairn wrote.
    pub fn open(root: &Path, options: StoreOptions) -> Result<Store> {
        let n = options.engine_count();
        let index = engine::open_index(root, options.io_mode)?;
        let mut shares: Vec<BTreeMap<ExtentKey, recovery::IndexEntry>> =
            (0..n).map(|_| BTreeMap::new()).collect();
        for (key, entry) in index {
            shares[engine_of(&key, n)].insert(key, entry);
        }
        let per_engine = StoreOptions {
            open_extents_max: options.open_extents_max.div_ceil(n).max(1),
            ..options
        };
        let clean_stop = engine::CleanStop::new(root, n);
        let mut engines = Vec::with_capacity(n);
        let mut runners = Vec::with_capacity(n);
        for (i, share) in shares.into_iter().enumerate() {
            match engine::start(root, per_engine.clone(), i, share, clean_stop.clone()) {
                Ok((shared, runner)) => {
                    engines.push(shared);
                    runners.push(runner);
                }
                Err(e) => {
                    // Stop the engines already running; they took no commands.
                    for shared in &engines {
                        let (reply, _) = oneshot::channel();
                        let _ = shared.send(Command::Shutdown { reply });
                    }
                    for r in runners {
                        if let engine::Runner::Thread(t) = r {
                            let _ = t.join();
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(Store {
            inner: Arc::new(Inner {
                engines,
                runners: std::sync::Mutex::new(runners),
                root: root.to_path_buf(),
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Engine threads running this store.
    pub fn engines(&self) -> usize {
        self.inner.engines.len()
    }

    fn engine(&self, key: &ExtentKey) -> &engine::Shared {
        &self.inner.engines[engine_of(key, self.inner.engines.len())]
    }

    async fn call<T>(
        &self,
        key: &ExtentKey,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T> {
        call(self.engine(key), make).await
    }

    /// Sends one command to every engine and collects the replies in order.
    async fn call_all<T>(&self, make: impl Fn(oneshot::Sender<T>) -> Command) -> Result<Vec<T>> {
        let mut pending = Vec::with_capacity(self.inner.engines.len());
        for shared in &self.inner.engines {
            let (tx, rx) = oneshot::channel();
            shared.send(make(tx))?;
            pending.push(rx);
        }
        let mut out = Vec::with_capacity(pending.len());
        for rx in pending {
            out.push(rx.await.map_err(|_| StoreError::ShuttingDown)?);
        }
        Ok(out)
    }

    /// Reads `len` bytes at `offset` of an extent version. Never-written ranges
    /// read as zeros. A block failing its checksum is an error, never data.
    /// The version read alone: [`Store::read_at`] with an empty chain.
    pub async fn read(
        &self,
        key: ExtentKey,
        extent_bytes: u32,
        offset: u64,
        len: u32,
    ) -> Result<IoBuf> {
        self.read_at(key, &[], extent_bytes, offset, len).await
    }

    /// Reads through the chain: each 4 KiB block comes from `key`'s version
    /// if that version holds it, else from the first version in `below`
    /// (epochs of the same volume and index, newest first) that holds it,
    /// else zeros. A block failing its checksum in the version it comes from
    /// is an error, never data.
    pub async fn read_at(
        &self,
        key: ExtentKey,
        below: &[u64],
        extent_bytes: u32,
        offset: u64,
        len: u32,
    ) -> Result<IoBuf> {
        check_range(&key, extent_bytes, offset, len as u64)?;
        check_chain(&key, below)?;
        let below = Below::from(below);
        self.call(&key, |reply| Command::Read {
            key,
            below,
            extent_bytes,
            offset,
            len,
            reply,
        })
        .await?
    }

    /// Writes `data` at `offset`. With `fua` the data is durable when this returns.
    /// The version written alone: [`Store::write_at`] with an empty chain.
    pub async fn write(
        &self,
        key: ExtentKey,
        extent_bytes: u32,
        offset: u64,
        data: impl Into<WriteData>,
        fua: bool,
    ) -> Result<()> {
        self.write_at(key, &[], extent_bytes, offset, data, fua)
            .await
    }

    /// Writes into `key`'s version only. A write covering part of a 4 KiB
    /// block that the version does not hold yet first fills the rest of the
    /// block from the chain (read-modify-write through the chain), under the
    /// same block lock, so concurrent writers to neighbouring sectors stay
    /// correct. Whole-block writes never read the chain. With `fua` the data
    /// is durable when this returns.
    pub async fn write_at(
        &self,
        key: ExtentKey,
        below: &[u64],
        extent_bytes: u32,
        offset: u64,
        data: impl Into<WriteData>,
        fua: bool,
    ) -> Result<()> {
        let data = data.into();
        check_range(&key, extent_bytes, offset, data.len() as u64)?;
        check_chain(&key, below)?;
        let below = Below::from(below);
        self.call(&key, |reply| Command::Write {
            key,
            below,
            extent_bytes,
            offset,
            data,
            fua,
            reply,
        })
        .await?
    }

    /// Makes the range read as zeros. `punch` gives whole blocks back to the
    /// file system (a zeroed whole extent is deleted); without it the blocks
    /// stay allocated. The version alone: [`Store::write_zeroes_at`] with an
    /// empty chain.
    pub async fn write_zeroes(
        &self,
        key: ExtentKey,
        extent_bytes: u32,
        offset: u64,
        len: u32,
        fua: bool,
        punch: bool,
    ) -> Result<()> {
        self.write_zeroes_at(key, &[], extent_bytes, offset, len, fua, punch)
            .await
    }

    /// Zeroes the range in `key`'s version. With `below` empty, as
    /// [`Store::write_zeroes`]. With a chain, the zeroed blocks become *held
    /// as zeros* in this version (their data punched or zeroed, their slots
    /// the CRC32 of a zero block), so they hide the older versions; partial
    /// blocks are filled from the chain like [`Store::write_at`]'s. A
    /// whole-extent zeroing with a chain keeps the file (every block held as
    /// zeros), and zeroing a version not stored yet creates it.
    #[allow(clippy::too_many_arguments)]
    pub async fn write_zeroes_at(
        &self,
        key: ExtentKey,
        below: &[u64],
        extent_bytes: u32,
        offset: u64,
        len: u32,
        fua: bool,
        punch: bool,
    ) -> Result<()> {
        check_range(&key, extent_bytes, offset, len as u64)?;
        check_chain(&key, below)?;
        let below = Below::from(below);
        self.call(&key, |reply| Command::Zero {
            key,
            below,
            extent_bytes,
            offset,
            len,
            fua,
            punch,
            reply,
        })
        .await?
    }

    /// Copies up: every block of the range (4 KiB-aligned) that `key`'s
    /// version does not hold is filled from the chain `below`, as a read
    /// would return it, and stored in the version as held; blocks it holds
    /// are left as they are. What any read of the version returns does not
    /// change, so this commutes with writes to the version (each block is
    /// decided under the block locks, like a partial write's fill). It lets
    /// an older version beneath be deleted once every version that reads
    /// through it holds what it held. With an empty chain there is nothing
    /// to copy and nothing is done.
    pub async fn materialize_at(
        &self,
        key: ExtentKey,
        below: &[u64],
        extent_bytes: u32,
        offset: u64,
        len: u32,
    ) -> Result<()> {
        check_range(&key, extent_bytes, offset, len as u64)?;
        check_chain(&key, below)?;
        let block = layout::BLOCK_BYTES;
        if !offset.is_multiple_of(block as u64) || !len.is_multiple_of(block) {
            return Err(StoreError::InvalidArgument(format!(
                "{key}: materialize takes whole 4 KiB blocks (offset {offset}, length {len})"
            )));
        }
        if below.is_empty() {
            return Ok(());
        }
        let below = Below::from(below);
        self.call(&key, |reply| Command::Materialize {
            key,
            below,
            extent_bytes,
            offset,
            len,
            reply,
        })
        .await?
    }

    /// Which 4 KiB blocks this version holds (written or zeroed in it), one
    /// bit per block (bit `i % 64` of word `i / 64`), or None when the version
    /// is not stored. After a crash, blocks not yet verified are read and
    /// settled first, so the answer agrees with what reads return (a block
    /// whose checksum fails counts as held: reads of it fail, they do not
    /// fall through).
    pub async fn held_blocks(&self, key: ExtentKey) -> Result<Option<Vec<u64>>> {
        self.call(&key, |reply| Command::Held { key, reply })
            .await?
    }

    /// Removes one stored version (its file and index entry); a no-op if not
    /// stored. Waits for the ops in flight on it; ops that arrive after it
    /// find the version gone (reads through it fall through to the next
    /// version of their chain).
    pub async fn delete_version(&self, key: ExtentKey) -> Result<()> {
        self.call(&key, |reply| Command::Delete { key, reply })
            .await?
    }

    /// Discards the range: it reads as zeros and its space goes back to the
    /// file system. Trimming a whole extent deletes its file.
    pub async fn trim(
        &self,
        key: ExtentKey,
        extent_bytes: u32,
        offset: u64,
        len: u32,
    ) -> Result<()> {
        self.write_zeroes(key, extent_bytes, offset, len, false, true)
            .await
    }

    /// Makes every write acknowledged before this call durable (each engine
    /// flushes what it acknowledged; the first error is returned).
    pub async fn flush(&self) -> Result<()> {
        self.call_all(|reply| Command::Flush { reply })
            .await?
            .into_iter()
            .collect()
    }

    /// Lists stored extent versions in key order, `limit` at most, after `after`.
    pub async fn list(
        &self,
        volume: Option<u64>,
        after: Option<ExtentKey>,
        limit: usize,
    ) -> Result<ExtentPage> {
        let pages = self
            .call_all(|reply| Command::List {
                volume,
                after,
                limit,
                reply,
            })
            .await?;
        // Each engine gave its first `limit` keys after `after`: the first
        // `limit` of all of them are among those.
        let mut more = pages.iter().any(|p| p.more);
        let mut extents: Vec<ExtentStat> = pages.into_iter().flat_map(|p| p.extents).collect();
        extents.sort_unstable_by_key(|e| e.key);
        if extents.len() > limit {
            extents.truncate(limit);
            more = true;
        }
        Ok(ExtentPage { extents, more })
    }

    pub async fn stat(&self, key: ExtentKey) -> Result<Option<ExtentStat>> {
        self.call(&key, |reply| Command::Stat { key, reply }).await
    }

    pub async fn usage(&self) -> Result<StoreUsage> {
        let all = self.call_all(|reply| Command::Usage { reply }).await?;
        Ok(StoreUsage {
            extents: all.iter().map(|u| u.extents).sum(),
            allocated_bytes: all.iter().map(|u| u.allocated_bytes).sum(),
        })
    }

    /// Stops taking new commands, waits for in-flight I/O, flushes, marks the
    /// store clean and joins the engine threads. Later calls get `ShuttingDown`.
    pub async fn shutdown(&self) -> Result<()> {
        let mut result = Ok(());
        for rx in self.send_shutdown() {
            // A dropped reply means that engine had already stopped.
            keep_first_error(&mut result, rx.await);
        }
        // The engines have replied; they exit right after.
        let mut threads = Vec::new();
        for runner in self.take_runners() {
            match runner {
                engine::Runner::Thread(t) => threads.push(t),
                engine::Runner::Task(t) => {
                    let _ = t.await;
                }
            }
        }
        if !threads.is_empty() {
            let _ = tokio::task::spawn_blocking(move || {
                for t in threads {
                    let _ = t.join();
                }
            })
            .await;
        }
        result
    }

    /// Blocking shutdown for callers outside an async runtime. Inline
    /// engines need their runtime running on another thread meanwhile.
    pub fn shutdown_blocking(&self) -> Result<()> {
        let mut result = Ok(());
        for rx in self.send_shutdown() {
            keep_first_error(&mut result, rx.blocking_recv());
        }
        for runner in self.take_runners() {
            // A task's reply came at its end; only threads need joining.
            if let engine::Runner::Thread(t) = runner {
                let _ = t.join();
            }
        }
        result
    }

    /// Asks every engine still running to stop; their replies.
    fn send_shutdown(&self) -> Vec<oneshot::Receiver<Result<()>>> {
        let mut pending = Vec::with_capacity(self.inner.engines.len());
        for shared in &self.inner.engines {
            let (tx, rx) = oneshot::channel();
            if shared.send(Command::Shutdown { reply: tx }).is_ok() {
                pending.push(rx);
            }
        }
        pending
    }

    fn take_runners(&self) -> Vec<engine::Runner> {
        std::mem::take(&mut *self.inner.runners.lock().expect("store runners lock"))
    }
}

/// Folds one engine's shutdown reply into the store's result.
fn keep_first_error<E>(result: &mut Result<()>, reply: std::result::Result<Result<()>, E>) {
    if let Ok(Err(e)) = reply {
        if result.is_ok() {
            *result = Err(e);
        }
    }
}

async fn call<T>(
    shared: &engine::Shared,
    make: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Result<T> {
    let (tx, rx) = oneshot::channel();
    shared.send(make(tx))?;
    rx.await.map_err(|_| StoreError::ShuttingDown)
}

impl Drop for Inner {
    /// Dropping the last handle stops the engines the way `shutdown` does
    /// (flush, clean marker), without waiting for them.
    fn drop(&mut self) {
        for shared in &self.engines {
            let (reply, _) = oneshot::channel();
            let _ = shared.send(Command::Shutdown { reply });
        }
    }
}

/// Checks a request's chain: a version cannot lie beneath itself.
fn check_chain(key: &ExtentKey, below: &[u64]) -> Result<()> {
    if below.contains(&key.epoch) {
        return Err(StoreError::InvalidArgument(format!(
            "{key}: the chain beneath it names its own epoch"
        )));
    }
    Ok(())
}

/// Checks a request's range before it reaches the engine.
fn check_range(key: &ExtentKey, extent_bytes: u32, offset: u64, len: u64) -> Result<()> {
    if !extent_bytes_valid(extent_bytes) {
        return Err(StoreError::InvalidArgument(format!(
            "{key}: extent size {extent_bytes} is not a power of two from 64 KiB to 64 MiB"
        )));
    }
    if !offset.is_multiple_of(SECTOR_BYTES as u64) || !len.is_multiple_of(SECTOR_BYTES as u64) {
        return Err(StoreError::InvalidArgument(format!(
            "{key}: offset {offset} and length {len} must be multiples of {SECTOR_BYTES}"
        )));
    }
    if len == 0 {
        return Err(StoreError::InvalidArgument(format!(
            "{key}: zero-length request"
        )));
    }
    if offset
        .checked_add(len)
        .is_none_or(|end| end > extent_bytes as u64)
    {
        return Err(StoreError::InvalidArgument(format!(
            "{key}: range {offset}+{len} runs past the end of the {extent_bytes}-byte extent"
        )));
    }
    Ok(())
}
