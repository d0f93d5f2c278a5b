//! The extent store: thin, checksummed extent versions on local disk, all data
//! I/O through one io_uring.
//!
//! [`Store`] is a cheap handle; one engine thread ([`engine`]) owns every piece
//! of state (index, open extents, block slots, the ring) and applies commands
//! in the order they arrive. Handles send commands over a channel and await a
//! oneshot reply, so callers can be tokio tasks or plain threads.
//!
//! How a block stays verifiable through crashes is explained in [`slots`].

pub mod buf;
mod engine;
pub mod error;
pub mod layout;
mod recovery;
pub mod slots;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

pub use buf::IoBuf;
pub use error::StoreError;
use layout::{extent_bytes_valid, SECTOR_BYTES};

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which stored version of which extent: `(volume, extent index, epoch)`.
/// Snapshots (a later issue) add versions with higher epochs; the store keeps
/// each as its own file from the start, so they need no format change.
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
    /// Submission queue entries of the io_uring.
    pub ring_entries: u32,
    /// Extents kept open (two file descriptors and the slot table each).
    /// Bounds the engine's memory: about 28 KiB per open 4 MiB extent.
    pub open_extents_max: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            io_mode: IoMode::Direct,
            ring_entries: 1024,
            open_extents_max: 1024,
        }
    }
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

pub(crate) enum Command {
    Read {
        key: ExtentKey,
        extent_bytes: u32,
        offset: u64,
        len: u32,
        reply: oneshot::Sender<Result<IoBuf>>,
    },
    Write {
        key: ExtentKey,
        extent_bytes: u32,
        offset: u64,
        data: IoBuf,
        fua: bool,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Trim and write-zeroes: the range reads as zeros afterwards; `punch`
    /// gives whole blocks back to the file system.
    Zero {
        key: ExtentKey,
        extent_bytes: u32,
        offset: u64,
        len: u32,
        fua: bool,
        punch: bool,
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
    Usage {
        reply: oneshot::Sender<StoreUsage>,
    },
    Shutdown {
        reply: oneshot::Sender<Result<()>>,
    },
}

/// Handle to a running store. Clones share one engine.
#[derive(Clone)]
pub struct Store {
    shared: Arc<engine::Shared>,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
    root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store under `root` (the data directory's
    /// `extents/` folder) and starts its engine thread. Fails, never reformats,
    /// if an extent file is not one Cairn wrote.
    pub fn open(root: &Path, options: StoreOptions) -> Result<Store> {
        let (shared, thread) = engine::start(root, options)?;
        Ok(Store {
            shared,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.shared.send(make(tx))?;
        rx.await.map_err(|_| StoreError::ShuttingDown)
    }

    /// Reads `len` bytes at `offset` of an extent version. Never-written ranges
    /// read as zeros. A block failing its checksum is an error, never data.
    pub async fn read(
        &self,
        key: ExtentKey,
        extent_bytes: u32,
        offset: u64,
        len: u32,
    ) -> Result<IoBuf> {
        check_range(&key, extent_bytes, offset, len as u64)?;
        self.call(|reply| Command::Read {
            key,
            extent_bytes,
            offset,
            len,
            reply,
        })
        .await?
    }

    /// Writes `data` at `offset`. With `fua` the data is durable when this returns.
    pub async fn write(
        &self,
        key: ExtentKey,
        extent_bytes: u32,
        offset: u64,
        data: IoBuf,
        fua: bool,
    ) -> Result<()> {
        check_range(&key, extent_bytes, offset, data.len() as u64)?;
        self.call(|reply| Command::Write {
            key,
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
    /// stay allocated.
    pub async fn write_zeroes(
        &self,
        key: ExtentKey,
        extent_bytes: u32,
        offset: u64,
        len: u32,
        fua: bool,
        punch: bool,
    ) -> Result<()> {
        check_range(&key, extent_bytes, offset, len as u64)?;
        self.call(|reply| Command::Zero {
            key,
            extent_bytes,
            offset,
            len,
            fua,
            punch,
            reply,
        })
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

    /// Makes every write acknowledged before this call durable.
    pub async fn flush(&self) -> Result<()> {
        self.call(|reply| Command::Flush { reply }).await?
    }

    /// Lists stored extent versions in key order, `limit` at most, after `after`.
    pub async fn list(
        &self,
        volume: Option<u64>,
        after: Option<ExtentKey>,
        limit: usize,
    ) -> Result<ExtentPage> {
        self.call(|reply| Command::List {
            volume,
            after,
            limit,
            reply,
        })
        .await
    }

    pub async fn stat(&self, key: ExtentKey) -> Result<Option<ExtentStat>> {
        self.call(|reply| Command::Stat { key, reply }).await
    }

    pub async fn usage(&self) -> Result<StoreUsage> {
        self.call(|reply| Command::Usage { reply }).await
    }

    /// Stops taking new commands, waits for in-flight I/O, flushes, marks the
    /// store clean and joins the engine thread. Later calls get `ShuttingDown`.
    pub async fn shutdown(&self) -> Result<()> {
        let result = self.call(|reply| Command::Shutdown { reply }).await;
        let handle = self.thread.lock().expect("store thread lock").take();
        if let Some(handle) = handle {
            // The engine has replied; it exits right after.
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        match result {
            Ok(r) => r,
            Err(StoreError::ShuttingDown) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Blocking shutdown for callers outside an async runtime.
    pub fn shutdown_blocking(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let result = match self.shared.send(Command::Shutdown { reply: tx }) {
            Ok(()) => rx.blocking_recv().unwrap_or(Ok(())),
            Err(StoreError::ShuttingDown) => Ok(()),
            Err(e) => Err(e),
        };
        if let Some(handle) = self.thread.lock().expect("store thread lock").take() {
            let _ = handle.join();
        }
        result
    }
}

impl Drop for Store {
    /// Dropping the last handle stops the engine the way `shutdown` does
    /// (flush, clean marker), without waiting for it. Handles dropped at the
    /// same instant on several threads may each see another alive; callers
    /// that need the clean stop to have happened call `shutdown`.
    fn drop(&mut self) {
        // One reference is the engine's own.
        if Arc::strong_count(&self.shared) == 2 {
            let (reply, _) = oneshot::channel();
            let _ = self.shared.send(Command::Shutdown { reply });
        }
    }
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
