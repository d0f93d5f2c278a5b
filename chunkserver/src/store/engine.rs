//! One store engine: a thread that owns its share of the store's state and
//! one io_uring. A store runs one engine per CPU (see `mod.rs`); each extent
//! belongs to exactly one of them.
//!
//! `run` is `loop { take commands; advance ready ops; submit and wait; apply
//! completions; maintain invariants }`. Nothing is shared with other threads
//! but the command channel, so block locks, slot tables and the flush state
//! need no mutex (the crucible lesson in STYLE.md).
//!
//! Data reads and writes, FUA checksum-slot writes, hole punching and fsyncs
//! go through the ring, submitted in batches: every [`SUBMIT_BATCH`] SQEs a
//! turn queues, and what is left at its end. File creation and deletion (open,
//! ftruncate, fallocate of the slot table, mmap, unlink, mkdir) are
//! synchronous metadata calls made once per extent, not per I/O.
//!
//! A write stores its checksum slots before its data is submitted: into the
//! extent's mapped slot table (the page cache, where a write(2) would put
//! them), or, for FUA, as the first SQE of a linked chain with RWF_DSYNC. The
//! slot written is the one *not* describing the block's durable content, so
//! a crash between the two leaves old data that still matches its slot. A
//! write that fails marks its blocks for settling (see `slots::fail_write`):
//! the slot on disk may then describe data that never landed, exactly as
//! after a crash, and the block is verified against all its slots before reuse.
//!
//! Per extent, ops take block-range locks in arrival order (FIFO among
//! overlapping ops), so a read never sees a half-applied write and a
//! read-modify-write of a sector never races a neighbour's.
//!
//! Versions beneath (snapshots): a read, or a write covering part of a block
//! its version does not hold, carries the chain of older epochs the caller
//! passed. Blocks its own version does not hold (known from the slot table,
//! or found when a block settles as not held) are looked for in the older
//! versions one at a time (`Walk`), newest first: each is opened and loaded
//! like any extent, a shared lock is taken on the needed block range, the
//! blocks it may hold are read into a staging buffer and verified against
//! *its* slots, the ones it holds are copied in, and the lock is released.
//! The op keeps its own version's locks throughout, so a fill from beneath
//! and the write it feeds are one step for every other writer of the block.
//! Locks are always taken from a newer version to an older one along the
//! snapshot tree, so waits cannot form a cycle. An op whose chain is empty
//! never builds a `Walk`: the single-version path is unchanged.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use io_uring::{opcode, squeue, types, IoUring};
use memmap2::{MmapMut, MmapOptions};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::{debug, error, info, warn};

use super::layout::{self, Header, BLOCK_BYTES, HEADER_BYTES};
use super::recovery::{self, IndexEntry};
use super::slots::{SlotTable, Verified, ENTRY_BYTES};
use super::Below;
use super::*;

/// Commands taken from the channel per loop turn, so completions are never
/// starved by a flood of new work.
const COMMANDS_PER_TURN_MAX: usize = 512;
/// LRU entries examined per eviction attempt; bounds the cost of a turn when
/// most open extents are pinned by I/O.
const EVICTION_SCAN_MAX: usize = 64;
/// SQEs queued in a turn that are submitted at once, before the turn ends.
/// Submitting everything at the end of a turn kept 4 KiB I/O waiting while
/// the rest of the turn's ops were prepared: `cairn bench store`, in
/// process, gave 0.62-0.70 of fio's IOPS for random writes and 0.66-0.74 for
/// reads that way, against 0.78-0.80 and 0.82-0.83 with batches of 8, and
/// 0.71-0.72 and 0.81-0.82 with one enter per op (2026-12-06, this VM).
const SUBMIT_BATCH: usize = 8;
/// Completions an inline engine handles in its first pass after it slept,
/// before it yields: the tasks they answer (on the same thread) then send
/// their next requests, and the next turn submits them while the rest of
/// the completions wait in the queue for the pass after.
///
/// Why: a disk that answers a whole queue at once (this VM's virtio disk
/// interrupts once per pass over its queue: all 32 of a QD32 load) sat idle
/// until every completion was handled, every caller had run and a first
/// batch was prepared. A block trace showed 65 µs from the last completion
/// to the next issue, against 12 µs for fio, which resubmits after each
/// completion, and the store read at 0.77-0.80 of fio's IOPS.
///
/// Only the pass after a sleep is cut short. Cutting every pass short, or
/// submitting each SQE at once while few are in flight, helped in process
/// as much but cost the chunk server a third of its 4 KiB write IOPS over
/// RPC (CPU per request 13 → 17-23 µs), where it is busy, not waiting: it
/// answered in smaller batches with more system calls. A/B, `cairn bench
/// store --quick --rounds 3`, 2026-12-06: in process, 4 KiB reads 0.93 and
/// 0.87 against 0.77-0.81 without; over RPC, 4 KiB writes 0.49 and 0.46
/// against 0.47-0.50, CPU per request unchanged. Full runs: ARCHITECTURE.md.
const WAKE_REAP_MAX: usize = 4;
/// Ring slots kept free for one op's longest chain (head, middle, tail, slots).
const CHAIN_SQES_MAX: usize = 4;
const EVENTFD_TOKEN: u64 = u64::MAX;
const BLOCK: u64 = BLOCK_BYTES as u64;

pub(crate) struct Shared {
    tx: mpsc::Sender<Command>,
    wake: Wake,
    /// The engine is (about to be) asleep and needs a kick through `wake`.
    sleeping: AtomicBool,
    closed: AtomicBool,
}

/// An io_uring's fd, borrowed for polling: the ring owns and closes it.
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// How a command wakes a sleeping engine.
enum Wake {
    /// An engine thread sleeps in `io_uring_enter`, with a read of this
    /// eventfd in its ring; a write completes the read and so the wait.
    EventFd(OwnedFd),
    /// An engine task ([`StoreOptions::inline`]) sleeps awaiting this or its
    /// ring's completions. Waking a task on the sender's own thread is a
    /// queue push, not a system call.
    Notify(tokio::sync::Notify),
}

/// What runs an engine: a thread of its own, or a task of the tokio runtime
/// that opened the store ([`StoreOptions::inline`]).
pub(crate) enum Runner {
    Thread(JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
}

impl Shared {
    pub(crate) fn send(&self, cmd: Command) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::ShuttingDown);
        }
        self.tx.send(cmd).map_err(|_| StoreError::ShuttingDown)?;
        if self.sleeping.swap(false, Ordering::SeqCst) {
            match &self.wake {
                Wake::EventFd(eventfd) => {
                    let one: u64 = 1;
                    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
                    let n =
                        unsafe { libc::write(eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
                    if n != 8 {
                        // The counter can only fail to take a write if it is
                        // saturated: the engine has wake-ups pending anyway.
                        debug!("eventfd write returned {n}");
                    }
                }
                Wake::Notify(notify) => notify.notify_one(),
            }
        }
        Ok(())
    }
}

/// Opens the store under `root` before its engines start: takes the clean
/// marker, scans the extent files (marking which extents' slots can be
/// trusted) and checks that O_DIRECT works there.
pub(crate) fn open_index(root: &Path, io_mode: IoMode) -> Result<BTreeMap<ExtentKey, IndexEntry>> {
    fs::create_dir_all(root)
        .map_err(|e| StoreError::io(format!("creating {}", root.display()), e))?;
    let marker = recovery::take_clean_marker(root)?;
    let mut index = recovery::scan(root)?;
    match &marker {
        Some(untrusted) => {
            for key in untrusted {
                if let Some(e) = index.get_mut(key) {
                    e.trusted = false;
                }
            }
        }
        None if !index.is_empty() => {
            warn!(
                extents = index.len(),
                "store was not shut down cleanly: each extent's blocks are verified against both checksum slots on first use"
            );
            for e in index.values_mut() {
                e.trusted = false;
            }
        }
        None => {}
    }
    if io_mode == IoMode::Direct {
        probe_direct_io(root)?;
    }
    info!(root = %root.display(), extents = index.len(), clean = marker.is_some(), "extent store opened");
    Ok(index)
}

/// Where the engines meet when the store stops: the last one to finish
/// writes the clean marker, listing every engine's untrusted extents, and
/// only if all of them stopped cleanly.
pub(crate) struct CleanStop {
    root: PathBuf,
    state: std::sync::Mutex<CleanStopState>,
}

struct CleanStopState {
    running: usize,
    all_clean: bool,
    untrusted: Vec<ExtentKey>,
}

impl CleanStop {
    pub(crate) fn new(root: &Path, engines: usize) -> Arc<Self> {
        Arc::new(Self {
            root: root.to_path_buf(),
            state: std::sync::Mutex::new(CleanStopState {
                running: engines,
                all_clean: true,
                untrusted: Vec::new(),
            }),
        })
    }

    /// One engine stopped; `untrusted` is None if it failed. An engine thread
    /// that dies never calls this, so no marker is written then either.
    fn engine_stopped(&self, untrusted: Option<Vec<ExtentKey>>) -> Result<()> {
        let mut s = self.state.lock().expect("clean-stop lock");
        s.running -= 1;
        match untrusted {
            Some(u) => s.untrusted.extend(u),
            None => s.all_clean = false,
        }
        if s.running > 0 || !s.all_clean {
            return Ok(());
        }
        let mut untrusted = std::mem::take(&mut s.untrusted);
        untrusted.sort_unstable();
        recovery::write_clean_marker(&self.root, &untrusted)
    }
}

/// Starts engine number `engine` over its share of the index.
pub(crate) fn start(
    root: &Path,
    options: StoreOptions,
    engine: usize,
    index: BTreeMap<ExtentKey, IndexEntry>,
    clean_stop: Arc<CleanStop>,
) -> Result<(Arc<Shared>, Runner)> {
    if options.inline {
        return start_inline(root, options, index, clean_stop);
    }
    // Only the engine thread submits (single issuer), so completion work can
    // wait until it asks for events (defer taskrun) instead of interrupting
    // it: fewer wake-ups and batched completions. The ring is created
    // disabled and enabled by the engine thread, which then owns it. Kernels
    // before 6.1 lack these flags and get a plain ring.
    let ring = new_ring(
        IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_r_disabled(),
        options.ring_entries,
    )?;
    // SAFETY: eventfd returns a new fd or -1; checked below before wrapping.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(StoreError::io(
            "creating the engine's eventfd",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: efd is a freshly created, valid fd that nothing else owns.
    let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
    let name = format!("cairn-store-{engine}");
    let (shared, engine) = Engine::new(
        root,
        options,
        ring,
        Wake::EventFd(eventfd),
        index,
        clean_stop,
    );
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || engine.run())
        .map_err(|e| StoreError::io("starting the store engine thread", e))?;
    Ok((shared, Runner::Thread(thread)))
}

/// A ring of `entries` (at least 8) with the builder's flags, or a plain one
/// if the kernel refuses them.
fn new_ring(builder: &io_uring::Builder, entries: u32) -> Result<IoUring> {
    let n = entries.max(8);
    builder
        .build(n)
        .or_else(|_| IoUring::new(n))
        .map_err(|e| StoreError::io(format!("creating an io_uring of {entries} entries"), e))
}

/// Starts an engine as a task of the current tokio runtime. Its ring has
/// none of the single-issuer flags: a task of a multi-thread runtime may
/// move between threads. (On a current-thread runtime it never does, and
/// then a request, its disk I/O and its reply all stay on one thread.)
fn start_inline(
    root: &Path,
    options: StoreOptions,
    index: BTreeMap<ExtentKey, IndexEntry>,
    clean_stop: Arc<CleanStop>,
) -> Result<(Arc<Shared>, Runner)> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
        StoreError::InvalidArgument(
            "a store with inline engines must be opened inside a tokio runtime".into(),
        )
    })?;
    // Cooperative task running: a completion does not interrupt the thread
    // with an IPI to post its CQE; the kernel posts it at the thread's next
    // system call, and the task-run flag tells the engine, which then enters
    // the ring once (`post_completions`) before it looks for completions or
    // sleeps; a thread asleep in epoll is still woken. Kernels before 5.19
    // get a plain ring.
    let ring = new_ring(
        IoUring::builder().setup_coop_taskrun().setup_taskrun_flag(),
        options.ring_entries,
    )?;
    let (shared, engine) = Engine::new(
        root,
        options,
        ring,
        Wake::Notify(tokio::sync::Notify::new()),
        index,
        clean_stop,
    );
    Ok((shared, Runner::Task(runtime.spawn(engine.run_inline()))))
}

impl Engine {
    fn new(
        root: &Path,
        options: StoreOptions,
        ring: IoUring,
        wake: Wake,
        index: BTreeMap<ExtentKey, IndexEntry>,
        clean_stop: Arc<CleanStop>,
    ) -> (Arc<Shared>, Engine) {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            tx,
            wake,
            sleeping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let allocated_total = index.values().map(|e| e.allocated_bytes).sum();
        let engine = Engine {
            clean_stop,
            root: root.to_path_buf(),
            options,
            ring,
            rx,
            shared: shared.clone(),
            eventfd_buf: Box::new(0),
            eventfd_armed: false,
            index,
            allocated_total,
            open: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            ops: Vec::new(),
            free_ops: Vec::new(),
            live_ops: 0,
            ready: BTreeSet::new(),
            next_seq: 0,
            dirty: BTreeSet::new(),
            dirs_dirty: BTreeSet::new(),
            flushes: VecDeque::new(),
            auto_flush_running: false,
            sqes_in_flight: 0,
            zero_crc: crc32fast::hash(&[0u8; BLOCK_BYTES as usize]),
            failed: None,
            shutdown: None,
            final_flush_started: false,
            cqes: Vec::new(),
        };
        (shared, engine)
    }
}

/// Fails early, with advice, where O_DIRECT is not supported (tmpfs, some FUSE).
fn probe_direct_io(root: &Path) -> Result<()> {
    let path = root.join(".direct-probe");
    let r = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path);
    let _ = fs::remove_file(&path);
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            Err(StoreError::InvalidArgument(format!(
                "the file system of {} does not support O_DIRECT; set io_mode = \"buffered\"",
                root.display()
            )))
        }
        Err(e) => Err(StoreError::io(
            format!("probing O_DIRECT in {}", root.display()),
            e,
        )),
    }
}

struct OpenExtent {
    path: PathBuf,
    extent_bytes: u32,
    data_fd: OwnedFd,
    meta_fd: OwnedFd,
    /// The on-disk slot table, mapped shared: a write's slots are stored here
    /// before its data write is submitted (see `submit_write`).
    slot_map: MmapMut,
    /// None while the slot table is being read.
    table: Option<SlotTable>,
    load_waiters: Vec<usize>,
    /// Ops holding block-range locks: (op, first block, end block, exclusive).
    active: Vec<(usize, u32, u32, bool)>,
    /// Ops waiting for locks, in arrival order.
    waiters: VecDeque<usize>,
    /// A write completed (or failed) since the last flush capture, so the file
    /// needs an fsync and its table may hold Written blocks for a flush to promote.
    needs_fsync: bool,
    /// Flushes in progress that fsync this file.
    flushing: u32,
    /// Header and directory entries are durable (false until the first flush).
    synced: bool,
    lru_tick: u64,
}

impl OpenExtent {
    /// Where block `b`'s data starts in the file.
    fn block_offset(&self, b: u32) -> u64 {
        layout::data_offset(self.extent_bytes) + b as u64 * BLOCK
    }

    fn pinned(&self) -> bool {
        self.table.is_none()
            || !self.active.is_empty()
            || !self.waiters.is_empty()
            || !self.load_waiters.is_empty()
            || self.flushing > 0
            || self.needs_fsync
    }
}

enum Payload {
    /// Read by the kernel straight from its buffer when that is aligned for
    /// O_DIRECT and covers whole blocks; otherwise merged into `merge`.
    Data(WriteData),
    Zero {
        punch: bool,
    },
    /// `delete_version`: remove the version's file (a whole-extent op).
    Delete,
    /// `materialize_at`: blocks the version does not hold are filled from the
    /// chain and stored; the blocks it holds are read and written back as
    /// they are (every block of the span is one the write keeps).
    Materialize,
}

enum Phase {
    /// Find or create the extent and its slot table.
    Resolve,
    /// Data (and for writes, blocks to merge or settle) being read.
    Reading,
    /// A write's reads are done and verified; its chain waits for ring room.
    ReadyToWrite,
    /// Data and slots being written.
    Writing,
    /// Walking the chain beneath the version (see `Walk`): finding, opening,
    /// loading or locking the next older version.
    Below,
    /// A read of an older version's blocks is in flight.
    BelowRead,
}

/// A read (or a write's fill of partial blocks) going through the older
/// versions beneath its own, one at a time, newest first. The op keeps its
/// own version's block locks throughout and takes a shared lock on each
/// older version only while it reads that version's blocks.
struct Walk {
    /// Next entry of the op's `below` to consult.
    level: usize,
    /// Blocks (of the op's span, ascending) no version consulted so far holds.
    need: Vec<u32>,
    /// The older version this op waits for or holds a shared lock on, and
    /// the block range locked (first needed block to last).
    lock: Option<(ExtentKey, u32, u32)>,
    /// First block and buffer of the older version's blocks being read.
    stage: Option<(u32, IoBuf)>,
    /// The op holds block locks on its own version (false: not stored).
    top_locked: bool,
}

struct ReadOp {
    key: ExtentKey,
    below: Below,
    extent_bytes: u32,
    offset: u64,
    len: u32,
    buf: Option<IoBuf>,
    walk: Option<Box<Walk>>,
    reply: oneshot::Sender<Result<IoBuf>>,
}

/// `held_blocks`: settles the blocks not yet verified, then reports.
struct HeldOp {
    key: ExtentKey,
    extent_bytes: u32,
    /// First block and buffer of the unsettled blocks being read.
    buf: Option<(u32, IoBuf)>,
    reply: oneshot::Sender<Result<Option<Vec<u64>>>>,
}

struct WriteOp {
    key: ExtentKey,
    below: Below,
    walk: Option<Box<Walk>>,
    extent_bytes: u32,
    offset: u64,
    len: u32,
    payload: Payload,
    fua: bool,
    /// Holds merged whole blocks when the write is not block-aligned, or the
    /// blocks read to settle them.
    merge: Option<IoBuf>,
    old_slots: Vec<super::slots::Slots>,
    slot_buf: Vec<u8>,
    /// The slots go through the ring as the chain's first SQE (FUA writes);
    /// otherwise they were stored into the mapped table before submission.
    slot_sqe: bool,
    /// FUA could not be done with RWF_DSYNC (new file, hole punch): flush after.
    flush_after: bool,
    reply: oneshot::Sender<Result<()>>,
}

struct FlushOp {
    /// (extent, blocks whose pending slot this flush promotes, extent was unsynced)
    captured: Vec<(ExtentKey, Vec<u32>)>,
    dir_fds: Vec<OwnedFd>,
    replies: Vec<oneshot::Sender<Result<()>>>,
    internal: bool,
    done: bool,
    result: Result<()>,
}

struct LoadOp {
    key: ExtentKey,
    buf: IoBuf,
}

enum OpKind {
    Read(ReadOp),
    Write(WriteOp),
    Held(HeldOp),
    Flush(FlushOp),
    Load(LoadOp),
}

struct Op {
    kind: OpKind,
    phase: Phase,
    outstanding: u32,
    /// Expected result length per SQE part (0: only check for an error).
    expect: [u32; CHAIN_SQES_MAX],
    /// First error: (errno, part). ECANCELED from a broken link is replaced
    /// by the error that broke it.
    error: Option<(i32, u8)>,
    /// Unique per op: a `ready` entry whose slot was reused is recognised as stale.
    seq: u64,
    /// Already queued in `ready` (an op is queued at most once, so wake-ups
    /// can never reorder ops).
    in_ready: bool,
}

impl Op {
    fn new(kind: OpKind) -> Self {
        Op {
            kind,
            phase: Phase::Resolve,
            outstanding: 0,
            expect: [0; CHAIN_SQES_MAX],
            error: None,
            seq: 0,
            in_ready: false,
        }
    }
    fn block_range(&self) -> Option<(ExtentKey, u32, u32, bool)> {
        if matches!(self.phase, Phase::Below | Phase::BelowRead) {
            // Queued on (or holding) an older version's lock.
            return self
                .walk()
                .and_then(|w| w.lock)
                .map(|(k, a0, a1)| (k, a0, a1, false));
        }
        match &self.kind {
            OpKind::Read(r) => Some((
                r.key,
                blocks_of(r.offset, r.len).0,
                blocks_of(r.offset, r.len).1,
                false,
            )),
            OpKind::Write(w) => {
                let (b0, b1) = blocks_of(w.offset, w.len);
                Some((w.key, b0, b1, true))
            }
            OpKind::Held(h) => Some((h.key, 0, layout::blocks_per_extent(h.extent_bytes), false)),
            _ => None,
        }
    }

    fn walk(&self) -> Option<&Walk> {
        match &self.kind {
            OpKind::Read(r) => r.walk.as_deref(),
            OpKind::Write(w) => w.walk.as_deref(),
            _ => None,
        }
    }
}

fn blocks_of(offset: u64, len: u32) -> (u32, u32) {
    (
        (offset / BLOCK) as u32,
        (offset + len as u64).div_ceil(BLOCK) as u32,
    )
}

fn errno_text(errno: i32) -> String {
    io::Error::from_raw_os_error(errno).to_string()
}

struct Engine {
    clean_stop: Arc<CleanStop>,
    root: PathBuf,
    options: StoreOptions,
    ring: IoUring,
    rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    eventfd_buf: Box<u64>,
    eventfd_armed: bool,
    index: BTreeMap<ExtentKey, IndexEntry>,
    allocated_total: u64,
    open: HashMap<ExtentKey, OpenExtent>,
    lru: BTreeMap<u64, ExtentKey>,
    tick: u64,
    ops: Vec<Option<Op>>,
    free_ops: Vec<usize>,
    live_ops: usize,
    /// Ops to advance (new, unblocked, or waiting for ring space), oldest
    /// first by arrival `seq`: an op woken late (say, by the load of its slot
    /// table) still goes before every op that arrived after it, which with the
    /// FIFO block locks keeps overlapping I/O in arrival order.
    ready: BTreeSet<(u64, usize)>,
    next_seq: u64,
    /// Extents with unflushed writes.
    dirty: BTreeSet<ExtentKey>,
    /// Directories whose entries changed since the last flush.
    dirs_dirty: BTreeSet<PathBuf>,
    /// Flushes in progress, oldest first; each replies only after all older ones.
    flushes: VecDeque<usize>,
    auto_flush_running: bool,
    sqes_in_flight: usize,
    zero_crc: u32,
    /// Set when an fsync failed: the kernel may have dropped dirty pages, so no
    /// later write can be promised durable (the "fsyncgate" lesson).
    failed: Option<String>,
    shutdown: Option<oneshot::Sender<Result<()>>>,
    final_flush_started: bool,
    cqes: Vec<(u64, i32)>,
}

impl Engine {
    fn run(mut self) {
        if self.ring.params().is_setup_single_issuer() {
            if let Err(e) = self.ring.submitter().register_enable_rings() {
                return self.stop_on("enabling the io_uring", e);
            }
        }
        loop {
            if self.turn() {
                return;
            }
            if let Err(e) = self.submit_and_wait() {
                return self.stop_on("io_uring wait", e);
            }
            self.reap(usize::MAX);
        }
    }

    /// The engine as a task ([`StoreOptions::inline`]): the same turns as
    /// [`run`](Self::run), but it never blocks in the kernel. It submits,
    /// and when nothing is left to do it awaits its ring's completions (the
    /// ring's fd polls readable when a completion is queued) or a command.
    /// While busy it yields after every turn, so the tasks that feed it
    /// (connections on the same thread) run and their requests join the
    /// next turn's submission.
    async fn run_inline(mut self) {
        let ring_fd = RingFd(self.ring.as_raw_fd());
        // SAFETY: the ring owns this fd and keeps it open until the engine
        // is dropped; `ring_fd` is a local of this function and `self` its
        // parameter, so the registration is dropped first.
        let ring_fd = match unsafe { AsyncFd::register_with_interest(ring_fd, Interest::READABLE) }
        {
            Ok(fd) => fd,
            Err(e) => return self.stop_on("registering the io_uring for polling", e),
        };
        let shared = self.shared.clone();
        let Wake::Notify(notify) = &shared.wake else {
            unreachable!("inline engines are woken by Notify");
        };
        loop {
            if self.turn() {
                return;
            }
            // After a sleep, only the first few completions: see WAKE_REAP_MAX.
            let mut reap_max = usize::MAX;
            if let Err(e) = self.submit_pending() {
                return self.stop_on("io_uring submit", e);
            }
            if let Err(e) = self.post_completions() {
                return self.stop_on("io_uring enter", e);
            }
            if !self.ring.completion().is_empty() || self.ready_can_advance() {
                tokio::task::yield_now().await;
            } else if !self.command_before_sleep() {
                tokio::select! {
                    ready = ring_fd.readable() => match ready {
                        // Readiness is an edge: forget it only once the
                        // queue it announced is drained.
                        Ok(mut guard) => {
                            if self.ring.completion().is_empty() {
                                guard.clear_ready();
                            }
                        }
                        Err(e) => return self.stop_on("polling the io_uring", e),
                    },
                    () = notify.notified() => {}
                }
                self.shared.sleeping.store(false, Ordering::SeqCst);
                reap_max = WAKE_REAP_MAX;
            }
            self.reap(reap_max);
        }
    }

    /// With cooperative task running, completions the kernel has not yet
    /// posted to the queue wait for this thread's next system call; enter
    /// the ring once (without waiting) when the kernel flags such work.
    fn post_completions(&mut self) -> io::Result<()> {
        if self.ring.submission().taskrun() {
            self.enter(0)
        } else {
            Ok(())
        }
    }

    /// Submits what the turn queued, without waiting for anything.
    fn submit_pending(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        self.enter(0)
    }

    /// One turn's work before submitting: take commands, advance ready ops,
    /// keep the invariants. True once the engine has stopped for good.
    fn turn(&mut self) -> bool {
        self.take_commands();
        while let Some((seq, idx)) = self.ready.pop_first() {
            match self.ops[idx].as_mut() {
                Some(op) if op.seq == seq => op.in_ready = false,
                _ => continue, // finished since it was queued
            }
            if !self.advance(idx) {
                // Out of ring space: retry after completions free some.
                self.op_mut(idx).in_ready = true;
                self.ready.insert((seq, idx));
                break;
            }
            // Batches of SUBMIT_BATCH SQEs go to the kernel as they fill, not
            // all at the end of the turn: the first ops of a long turn would
            // otherwise wait for the last ones to be prepared.
            if self.ring.submission().len() >= SUBMIT_BATCH && self.submit_pending().is_err() {
                break; // the end of the turn submits again and reports it
            }
        }
        self.maintain();
        if self.shutdown.is_some() && self.live_ops == 0 && self.final_flush_started {
            self.finish_shutdown();
            return true;
        }
        false
    }

    // ----- commands -----

    fn take_commands(&mut self) {
        for _ in 0..COMMANDS_PER_TURN_MAX {
            match self.rx.try_recv() {
                Ok(cmd) => self.apply_command(cmd),
                Err(_) => break,
            }
        }
    }

    fn apply_command(&mut self, cmd: Command) {
        if self.shutdown.is_some() {
            reject_shutting_down(cmd);
            return;
        }
        match cmd {
            Command::Read {
                key,
                below,
                extent_bytes,
                offset,
                len,
                reply,
            } => {
                let idx = self.new_op(OpKind::Read(ReadOp {
                    key,
                    below,
                    extent_bytes,
                    offset,
                    len,
                    buf: None,
                    walk: None,
                    reply,
                }));
                self.make_ready(idx);
            }
            Command::Write {
                key,
                below,
                extent_bytes,
                offset,
                data,
                fua,
                reply,
            } => {
                let len = data.len() as u32;
                self.new_write(
                    key,
                    below,
                    extent_bytes,
                    offset,
                    len,
                    Payload::Data(data),
                    fua,
                    reply,
                );
            }
            Command::Zero {
                key,
                below,
                extent_bytes,
                offset,
                len,
                fua,
                punch,
                reply,
            } => {
                self.new_write(
                    key,
                    below,
                    extent_bytes,
                    offset,
                    len,
                    Payload::Zero { punch },
                    fua,
                    reply,
                );
            }
            Command::Materialize {
                key,
                below,
                extent_bytes,
                offset,
                len,
                reply,
            } => {
                self.new_write(
                    key,
                    below,
                    extent_bytes,
                    offset,
                    len,
                    Payload::Materialize,
                    false,
                    reply,
                );
            }
            // Both go through the ready queue like reads and writes, so they
            // see every op that arrived before them (a write arriving first
            // creates the version only when it is advanced). The extent size
            // is the stored one, taken when the op is advanced.
            Command::Held { key, reply } => {
                let idx = self.new_op(OpKind::Held(HeldOp {
                    key,
                    extent_bytes: 0,
                    buf: None,
                    reply,
                }));
                self.make_ready(idx);
            }
            Command::Delete { key, reply } => {
                self.new_write(
                    key,
                    Below::default(),
                    0,
                    0,
                    0,
                    Payload::Delete,
                    false,
                    reply,
                );
            }
            Command::Flush { reply } => self.start_flush(Some(reply), false),
            Command::List {
                volume,
                after,
                limit,
                reply,
            } => {
                let _ = reply.send(self.list(volume, after, limit));
            }
            Command::Stat { key, reply } => {
                let _ = reply.send(self.index.get(&key).map(|e| ExtentStat {
                    key,
                    extent_bytes: e.extent_bytes,
                    allocated_bytes: e.allocated_bytes,
                }));
            }
            Command::Usage { reply } => {
                let _ = reply.send(StoreUsage {
                    extents: self.index.len() as u64,
                    allocated_bytes: self.allocated_total,
                });
            }
            Command::Shutdown { reply } => {
                self.shared.closed.store(true, Ordering::SeqCst);
                self.shutdown = Some(reply);
                info!(
                    ops_in_flight = self.live_ops,
                    "store stopping: finishing in-flight I/O"
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn new_write(
        &mut self,
        key: ExtentKey,
        below: Below,
        extent_bytes: u32,
        offset: u64,
        len: u32,
        payload: Payload,
        fua: bool,
        reply: oneshot::Sender<Result<()>>,
    ) {
        if let Some(why) = &self.failed {
            let _ = reply.send(Err(StoreError::Failed(why.clone())));
            return;
        }
        let op = WriteOp {
            key,
            below,
            walk: None,
            extent_bytes,
            offset,
            len,
            payload,
            fua,
            merge: None,
            old_slots: Vec::new(),
            slot_buf: Vec::new(),
            slot_sqe: false,
            flush_after: false,
            reply,
        };
        let idx = self.new_op(OpKind::Write(op));
        self.make_ready(idx);
    }

    fn list(&self, volume: Option<u64>, after: Option<ExtentKey>, limit: usize) -> ExtentPage {
        use std::ops::Bound;
        let lower = match (after, volume) {
            (Some(a), _) => Bound::Excluded(a),
            (None, Some(v)) => Bound::Included(ExtentKey {
                volume_id: v,
                extent_index: 0,
                epoch: 0,
            }),
            (None, None) => Bound::Unbounded,
        };
        let mut page = ExtentPage::default();
        for (k, e) in self.index.range((lower, Bound::Unbounded)) {
            if volume.is_some_and(|v| k.volume_id != v) {
                break;
            }
            if page.extents.len() >= limit {
                page.more = true;
                break;
            }
            page.extents.push(ExtentStat {
                key: *k,
                extent_bytes: e.extent_bytes,
                allocated_bytes: e.allocated_bytes,
            });
        }
        page
    }

    // ----- op slab -----

    fn new_op(&mut self, kind: OpKind) -> usize {
        self.live_ops += 1;
        self.next_seq += 1;
        let mut op = Op::new(kind);
        op.seq = self.next_seq;
        let op = Some(op);
        match self.free_ops.pop() {
            Some(i) => {
                self.ops[i] = op;
                i
            }
            None => {
                self.ops.push(op);
                self.ops.len() - 1
            }
        }
    }

    fn take_op(&mut self, idx: usize) -> Op {
        let op = self.ops[idx].take().expect("live op");
        self.free_ops.push(idx);
        self.live_ops -= 1;
        op
    }

    fn make_ready(&mut self, idx: usize) {
        if let Some(op) = self.ops[idx].as_mut() {
            if !op.in_ready {
                op.in_ready = true;
                self.ready.insert((op.seq, idx));
            }
        }
    }

    fn make_all_ready(&mut self, ops: impl IntoIterator<Item = usize>) {
        for idx in ops {
            self.make_ready(idx);
        }
    }

    fn op_mut(&mut self, idx: usize) -> &mut Op {
        self.ops[idx].as_mut().expect("live op")
    }

    // ----- advancing read and write ops -----

    /// Moves an op forward as far as it can go now. Returns false only if the
    /// ring has no room for its I/O (the op stays ready).
    fn advance(&mut self, idx: usize) -> bool {
        let Some(op) = self.ops[idx].as_ref() else {
            return true;
        };
        match op.phase {
            Phase::Resolve => {}
            Phase::ReadyToWrite => return self.submit_write(idx),
            Phase::Below => return self.advance_walk(idx),
            _ => return true,
        }
        let (key, _, _, _) = op.block_range().expect("read, write or held op");
        let (extent_bytes, is_write) = match &op.kind {
            OpKind::Read(r) => (r.extent_bytes, false),
            OpKind::Write(w) => (w.extent_bytes, true),
            OpKind::Held(h) => (h.extent_bytes, false),
            _ => unreachable!(),
        };
        // 1. The extent.
        let entry = match self.index.get(&key) {
            Some(e) => *e,
            None => {
                match &mut self.op_mut(idx).kind {
                    OpKind::Read(r) if !r.below.is_empty() => {
                        // Not stored: every block comes from beneath.
                        let (b0, b1) = blocks_of(r.offset, r.len);
                        r.buf = Some(IoBuf::for_overwrite(((b1 - b0) as u64 * BLOCK) as usize));
                        return self.start_walk(idx, (b0..b1).collect(), false);
                    }
                    OpKind::Read(_) => {
                        let OpKind::Read(r) = self.take_op(idx).kind else {
                            unreachable!()
                        };
                        let _ = r.reply.send(Ok(IoBuf::zeroed(r.len as usize)));
                        return true;
                    }
                    OpKind::Held(_) => {
                        let OpKind::Held(h) = self.take_op(idx).kind else {
                            unreachable!()
                        };
                        let _ = h.reply.send(Ok(None));
                        return true;
                    }
                    OpKind::Write(w)
                        if matches!(w.payload, Payload::Delete)
                            || (matches!(
                                w.payload,
                                Payload::Zero { .. } | Payload::Materialize
                            ) && w.below.is_empty()) =>
                    {
                        // Never written (or already gone): it reads as zeros
                        // already. With a chain beneath, zeroing must hide it.
                        let OpKind::Write(w) = self.take_op(idx).kind else {
                            unreachable!()
                        };
                        let _ = w.reply.send(Ok(()));
                        return true;
                    }
                    _ => {}
                }
                if let Err(e) = self.create_extent(key, extent_bytes) {
                    self.finish_with_error(idx, e);
                    return true;
                }
                self.index[&key]
            }
        };
        if entry.extent_bytes != extent_bytes {
            // Whole-version ops take the size the version is stored with.
            match &mut self.op_mut(idx).kind {
                OpKind::Held(h) => h.extent_bytes = entry.extent_bytes,
                OpKind::Write(w) if matches!(w.payload, Payload::Delete) => {
                    w.extent_bytes = entry.extent_bytes;
                    w.len = entry.extent_bytes;
                }
                _ => {
                    let e = StoreError::ExtentSizeMismatch {
                        key,
                        stored_bytes: entry.extent_bytes,
                        requested_bytes: extent_bytes,
                    };
                    self.finish_with_error(idx, e);
                    return true;
                }
            }
        }
        let (_, b0, b1, exclusive) = self.ops[idx]
            .as_ref()
            .and_then(|op| op.block_range())
            .expect("read, write or held op");
        if !self.open.contains_key(&key) {
            if let Err(e) = self.open_extent(key, entry) {
                self.finish_with_error(idx, e);
                return true;
            }
        }
        self.touch(key);
        let ext = self.open.get_mut(&key).expect("opened above");
        if ext.table.is_none() {
            if !ext.load_waiters.contains(&idx) {
                ext.load_waiters.push(idx);
            }
            return true;
        }
        // 2. Block locks, FIFO among overlapping ops.
        let whole_delete = self.is_whole_delete(idx);
        let ext = self.open.get_mut(&key).expect("open");
        let queued_pos = ext.waiters.iter().position(|&w| w == idx);
        if lock_conflict(
            ext,
            &self.ops,
            idx,
            b0,
            b1,
            exclusive,
            whole_delete,
            queued_pos,
        ) {
            if queued_pos.is_none() {
                ext.waiters.push_back(idx);
            }
            return true;
        }
        if let Some(p) = queued_pos {
            ext.waiters.remove(p);
        }
        ext.active.push((idx, b0, b1, exclusive));
        if whole_delete {
            self.delete_extent(idx, key);
            return true;
        }
        // 3. I/O.
        let submitted = if is_write {
            self.start_write_reads(idx)
        } else if matches!(self.op_mut(idx).kind, OpKind::Held(_)) {
            self.start_held(idx)
        } else {
            self.start_read(idx)
        };
        if !submitted {
            // No ring room. An op that got no further gives its locks back
            // and retries from the start; one walking the chain or waiting
            // to write keeps them and resumes where it is.
            if matches!(self.op_mut(idx).phase, Phase::Resolve) {
                let ext = self.open.get_mut(&key).expect("open");
                ext.active.retain(|a| a.0 != idx);
            }
            return false;
        }
        true
    }

    fn is_whole_delete(&self, idx: usize) -> bool {
        match &self.ops[idx].as_ref().expect("live").kind {
            OpKind::Write(w) => match w.payload {
                Payload::Delete => true,
                // With a chain beneath, a zeroed extent must keep hiding it.
                Payload::Zero { punch: true } => {
                    w.offset == 0 && w.len == w.extent_bytes && w.below.is_empty()
                }
                _ => false,
            },
            _ => false,
        }
    }

    fn start_read(&mut self, idx: usize) -> bool {
        let OpKind::Read(r) = &self.ops[idx].as_ref().expect("live").kind else {
            unreachable!()
        };
        let (key, offset, len) = (r.key, r.offset, r.len);
        let chained = !r.below.is_empty();
        let (b0, b1) = blocks_of(offset, len);
        let ext = &self.open[&key];
        let table = ext.table.as_ref().expect("loaded");
        if !(b0..b1).any(|b| table.needs_read(b)) {
            if chained {
                // Holds none of them: every block comes from beneath.
                let span = ((b1 - b0) as u64 * BLOCK) as usize;
                let OpKind::Read(r) = &mut self.op_mut(idx).kind else {
                    unreachable!()
                };
                r.buf = Some(IoBuf::for_overwrite(span));
                return self.start_walk(idx, (b0..b1).collect(), true);
            }
            let op = self.take_op(idx);
            self.release(idx, key);
            let OpKind::Read(r) = op.kind else {
                unreachable!()
            };
            let _ = r.reply.send(Ok(IoBuf::zeroed(r.len as usize)));
            return true;
        }
        if !self.ring_room(1) {
            return false;
        }
        let span = ((b1 - b0) as u64 * BLOCK) as usize;
        let mut buf = IoBuf::for_overwrite(span);
        let fd = ext.data_fd.as_raw_fd();
        let file_off = ext.block_offset(b0);
        let ptr = buf.as_mut_ptr();
        let OpKind::Read(r) = &mut self.op_mut(idx).kind else {
            unreachable!()
        };
        // The buffer's heap address does not move when the IoBuf is stored.
        r.buf = Some(buf);
        self.submit_data_read(idx, fd, ptr, span as u32, file_off);
        true
    }

    /// Submits one read of extent data for an op that owns the target buffer.
    fn submit_data_read(&mut self, idx: usize, fd: RawFd, ptr: *mut u8, len: u32, file_off: u64) {
        let sqe = opcode::Read::new(types::Fd(fd), ptr, len)
            .offset(file_off)
            .build();
        let op = self.op_mut(idx);
        op.phase = Phase::Reading;
        op.expect[0] = len;
        self.push_chain(idx, &[sqe]);
    }

    /// A write first reads the blocks it must merge (partial head or tail) or
    /// settle (state unknown after a crash), if any.
    fn start_write_reads(&mut self, idx: usize) -> bool {
        let OpKind::Write(w) = &self.ops[idx].as_ref().expect("live").kind else {
            unreachable!()
        };
        let (key, offset, len) = (w.key, w.offset, w.len);
        let (b0, b1) = blocks_of(offset, len);
        let ext = &self.open[&key];
        let table = ext.table.as_ref().expect("loaded");
        let (head_partial, tail_partial) = partial_ends(offset, len);
        let mut need: Vec<u32> = Vec::new();
        if head_partial && table.needs_read(b0) {
            need.push(b0);
        }
        if tail_partial && table.needs_read(b1 - 1) {
            need.push(b1 - 1);
        }
        need.extend((b0..b1).filter(|&b| table.needs_settle(b)));
        if matches!(w.payload, Payload::Materialize) {
            // Every held block is kept as it is: read it to write it back.
            need.extend((b0..b1).filter(|&b| table.needs_read(b)));
        }
        if need.is_empty() {
            return self.after_write_reads(idx);
        }
        if !self.ring_room(1) {
            return false;
        }
        let r0 = *need.iter().min().expect("non-empty");
        let r1 = *need.iter().max().expect("non-empty") + 1;
        let mut merge = IoBuf::zeroed(((b1 - b0) as u64 * BLOCK) as usize);
        let span = (r1 - r0) as u64 * BLOCK;
        let file_off = ext.block_offset(r0);
        // SAFETY: r0 >= b0 and the span ends at r1 <= b1, inside `merge`.
        let ptr = unsafe { merge.as_mut_ptr().add(((r0 - b0) as u64 * BLOCK) as usize) };
        let fd = ext.data_fd.as_raw_fd();
        let OpKind::Write(w) = &mut self.op_mut(idx).kind else {
            unreachable!()
        };
        w.merge = Some(merge);
        self.submit_data_read(idx, fd, ptr, span as u32, file_off);
        true
    }

    /// Builds the final blocks, fills checksum slots and submits the chain
    /// slots -> data. Returns false if the ring has no room.
    fn submit_write(&mut self, idx: usize) -> bool {
        if !self.ring_room(CHAIN_SQES_MAX) {
            return false;
        }
        // A flush that started while this write was reading blocks to merge
        // may have captured some of them: their pending slots are being made
        // durable and must not be overwritten until it completes, which
        // re-readies this op (it waits holding its locks).
        {
            let OpKind::Write(w) = &self.ops[idx].as_ref().expect("live").kind else {
                unreachable!()
            };
            let (key, (b0, b1)) = (w.key, blocks_of(w.offset, w.len));
            let ext = self.open.get_mut(&key).expect("open while locked");
            let table = ext.table.as_ref().expect("loaded");
            let queued = ext.waiters.iter().position(|&x| x == idx);
            if (b0..b1).any(|b| !table.writable(b)) {
                if queued.is_none() {
                    ext.waiters.push_back(idx);
                }
                self.op_mut(idx).phase = Phase::ReadyToWrite;
                return true;
            }
            if let Some(p) = queued {
                ext.waiters.remove(p);
            }
        }
        let zero_crc = self.zero_crc;
        let direct = self.options.io_mode == IoMode::Direct;
        let mut op = self.ops[idx].take().expect("live");
        let OpKind::Write(w) = &mut op.kind else {
            unreachable!()
        };
        let key = w.key;
        let (b0, b1) = blocks_of(w.offset, w.len);
        let (head_partial, tail_partial) = partial_ends(w.offset, w.len);
        let ext = self.open.get_mut(&key).expect("open");
        let table = ext.table.as_mut().expect("loaded");
        let rel = (w.offset - b0 as u64 * BLOCK) as usize;
        let span = ((b1 - b0) as u64 * BLOCK) as usize;
        // Blocks being merged whose old content is nothing read as zeros.
        // (With a chain beneath, the walk filled them: see `after_write_reads`.)
        if let (Some(m), true) = (w.merge.as_mut(), w.below.is_empty()) {
            for b in [b0, b1 - 1] {
                if !table.needs_read(b) {
                    let s = ((b - b0) as u64 * BLOCK) as usize;
                    m[s..s + BLOCK as usize].fill(0);
                }
            }
        }
        let mut crcs: Vec<u32> = Vec::with_capacity((b1 - b0) as usize);
        let mut punch_range: Option<(u32, u32, bool)> = None;
        match &mut w.payload {
            Payload::Data(data) => {
                let aligned =
                    !direct || (data.as_ptr() as usize).is_multiple_of(buf::IO_ALIGN_BYTES);
                if head_partial || tail_partial || !aligned {
                    let m = w.merge.get_or_insert_with(|| IoBuf::zeroed(span));
                    m[rel..rel + data.len()].copy_from_slice(data);
                    crcs.extend(m.chunks(BLOCK as usize).map(crc32fast::hash));
                } else {
                    w.merge = None;
                    crcs.extend(data.chunks(BLOCK as usize).map(crc32fast::hash));
                }
            }
            Payload::Zero { punch } => {
                if head_partial || tail_partial {
                    let m = w.merge.get_or_insert_with(|| IoBuf::zeroed(span));
                    m[rel..rel + w.len as usize].fill(0);
                }
                let fb0 = if head_partial { b0 + 1 } else { b0 };
                let fb1 = if tail_partial { b1 - 1 } else { b1 };
                if fb0 < fb1 {
                    punch_range = Some((fb0, fb1, *punch));
                }
                for b in b0..b1 {
                    let partial = (b == b0 && head_partial) || (b == b1 - 1 && tail_partial);
                    crcs.push(if partial {
                        let m = w.merge.as_ref().expect("merge for partial blocks");
                        let s = ((b - b0) as u64 * BLOCK) as usize;
                        crc32fast::hash(&m[s..s + BLOCK as usize])
                    } else {
                        zero_crc
                    });
                }
            }
            Payload::Materialize => {
                let m = w
                    .merge
                    .as_ref()
                    .expect("materialize fills its merge buffer");
                crcs.extend(m.chunks(BLOCK as usize).map(crc32fast::hash));
            }
            Payload::Delete => unreachable!("deletes never write"),
        }
        // FUA by RWF_DSYNC needs the file's own metadata durable already, and
        // fallocate has no DSYNC flag; a fresh block may only lose its fresh
        // mark through a flush (slots.rs): otherwise FUA becomes write + flush.
        w.flush_after = w.fua
            && (!ext.synced || punch_range.is_some() || (b0..b1).any(|b| table.fua_needs_flush(b)));
        w.old_slots = (b0..b1)
            .zip(&crcs)
            .map(|(b, &crc)| table.begin_write(b, crc))
            .collect();
        let dsync = if w.fua && !w.flush_after {
            libc::RWF_DSYNC
        } else {
            0
        };
        // Slots before data. Without DSYNC the slots are stored into the
        // mapped table: that is the page cache, where a write(2) would have put
        // them, before the data is even submitted. A buffered write through
        // the ring cannot be issued without blocking on ext4, so io_uring
        // would hand it (and the data write linked behind it) to a worker
        // thread: that cost half the 4 KiB write rate. A DSYNC write still goes
        // through the ring, linked before its data, so both are durable when
        // it completes.
        let slot_range = b0 as usize * ENTRY_BYTES..b1 as usize * ENTRY_BYTES;
        w.slot_sqe = dsync != 0;
        if w.slot_sqe {
            w.slot_buf.clear();
            table.encode_range(b0, b1, &mut w.slot_buf);
        } else {
            table.encode_range_into(b0, b1, &mut ext.slot_map[slot_range]);
        }
        let data_fd = types::Fd(ext.data_fd.as_raw_fd());
        let meta_fd = types::Fd(ext.meta_fd.as_raw_fd());
        let data_off = layout::data_offset(ext.extent_bytes);
        let mut sqes: Vec<squeue::Entry> = Vec::with_capacity(CHAIN_SQES_MAX);
        let mut expect: Vec<u32> = Vec::new();
        let block_write = |buf: &[u8], first: u32, count: u32| {
            let s = ((first - b0) as u64 * BLOCK) as usize;
            let n = (count as u64 * BLOCK) as u32;
            // The kernel reads [s, s + n) of `buf`, which spans blocks b0..b1
            // and lives in the op (its payload or merge buffer) until the
            // write completes.
            let ptr = buf[s..s + n as usize].as_ptr();
            opcode::Write::new(data_fd, ptr, n)
                .offset(data_off + first as u64 * BLOCK)
                .rw_flags(dsync)
                .build()
        };
        // Slots first, data after, linked: the slot written is never the one
        // describing durable content, so if the process dies between the two
        // the block still reads its old data; and a slot write that fails
        // cancels the data write.
        if w.slot_sqe {
            sqes.push(
                opcode::Write::new(meta_fd, w.slot_buf.as_ptr(), w.slot_buf.len() as u32)
                    .offset(HEADER_BYTES + b0 as u64 * ENTRY_BYTES as u64)
                    .rw_flags(dsync)
                    .build(),
            );
            expect.push(w.slot_buf.len() as u32);
        }
        match (&mut w.payload, punch_range) {
            (Payload::Data(data), _) => {
                let buf: &[u8] = match &w.merge {
                    Some(merge) => merge,
                    None => data,
                };
                sqes.push(block_write(buf, b0, b1 - b0));
                expect.push(span as u32);
            }
            (Payload::Zero { .. }, range) => {
                if head_partial {
                    sqes.push(block_write(w.merge.as_mut().expect("merge"), b0, 1));
                    expect.push(BLOCK_BYTES);
                }
                if let Some((fb0, fb1, punch)) = range {
                    let mode = if punch {
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                    } else {
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                    };
                    sqes.push(
                        opcode::Fallocate::new(data_fd, (fb1 - fb0) as u64 * BLOCK)
                            .offset(data_off + fb0 as u64 * BLOCK)
                            .mode(mode)
                            .build(),
                    );
                    expect.push(0);
                }
                if tail_partial && (b1 - 1 != b0 || !head_partial) {
                    sqes.push(block_write(w.merge.as_mut().expect("merge"), b1 - 1, 1));
                    expect.push(BLOCK_BYTES);
                }
            }
            (Payload::Materialize, _) => {
                sqes.push(block_write(
                    w.merge
                        .as_mut()
                        .expect("materialize fills its merge buffer"),
                    b0,
                    b1 - b0,
                ));
                expect.push(span as u32);
            }
            (Payload::Delete, _) => unreachable!("deletes never write"),
        }
        let n = sqes.len();
        for (i, s) in sqes.iter_mut().enumerate() {
            if i + 1 < n {
                *s = s.clone().flags(squeue::Flags::IO_LINK);
            }
        }
        op.phase = Phase::Writing;
        op.expect[..expect.len()].copy_from_slice(&expect);
        self.ops[idx] = Some(op);
        self.push_chain(idx, &sqes);
        true
    }

    // ----- completions -----

    /// Handles up to `max` queued completions.
    fn reap(&mut self, max: usize) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(
            self.ring
                .completion()
                .take(max)
                .map(|c| (c.user_data(), c.result())),
        );
        for &(ud, res) in &cqes {
            if ud == EVENTFD_TOKEN {
                self.eventfd_armed = false;
                continue;
            }
            self.sqes_in_flight -= 1;
            let idx = (ud >> 8) as usize;
            let part = (ud & 0xff) as u8;
            let op = self.ops[idx].as_mut().expect("completion for a live op");
            let expect = op.expect[part as usize];
            let err = if res < 0 {
                Some(-res)
            } else if expect != 0 && (res as u32) < expect {
                Some(libc::EIO) // short transfer
            } else {
                None
            };
            if let Some(errno) = err {
                let replace = match op.error {
                    None => true,
                    Some((e, _)) => e == libc::ECANCELED && errno != libc::ECANCELED,
                };
                if replace {
                    op.error = Some((errno, part));
                }
            }
            op.outstanding -= 1;
            if op.outstanding == 0 {
                self.complete(idx);
            }
        }
        self.cqes = cqes;
    }

    fn complete(&mut self, idx: usize) {
        let op = self.ops[idx].as_ref().expect("live");
        if matches!(op.phase, Phase::BelowRead) {
            return self.complete_walk_read(idx);
        }
        match &op.kind {
            OpKind::Read(r) if !r.below.is_empty() => self.complete_chained_read(idx),
            OpKind::Read(_) => self.complete_read(idx),
            OpKind::Held(_) => self.complete_held(idx),
            OpKind::Write(_) => match self.ops[idx].as_ref().expect("live").phase {
                Phase::Reading => self.complete_write_reads(idx),
                _ => self.complete_write(idx),
            },
            OpKind::Flush(_) => self.complete_flush(idx),
            OpKind::Load(_) => self.complete_load(idx),
        }
    }

    fn complete_read(&mut self, idx: usize) {
        let op = self.take_op(idx);
        let OpKind::Read(mut r) = op.kind else {
            unreachable!()
        };
        let key = r.key;
        let result = self.finish_read(&mut r, op.error);
        self.release(idx, key);
        let _ = r.reply.send(result);
    }

    fn finish_read(&mut self, r: &mut ReadOp, error: Option<(i32, u8)>) -> Result<IoBuf> {
        let ext = self.open.get_mut(&r.key).expect("open while locked");
        if let Some((errno, _)) = error {
            return Err(StoreError::from_errno(
                format!(
                    "reading {} at offset {} ({})",
                    r.key,
                    r.offset,
                    ext.path.display()
                ),
                errno,
            ));
        }
        let (b0, b1) = blocks_of(r.offset, r.len);
        let table = ext.table.as_mut().expect("loaded");
        let mut buf = r.buf.take().expect("read buffer");
        for b in b0..b1 {
            let s = ((b - b0) as u64 * BLOCK) as usize;
            let block = &mut buf[s..s + BLOCK as usize];
            if !table.needs_read(b) {
                block.fill(0);
                continue;
            }
            match table.verify(b, block) {
                Verified::Data => {}
                Verified::Unheld => block.fill(0),
                Verified::Mismatch(detail) => {
                    error!(key = %r.key, block = b, path = %ext.path.display(), "checksum mismatch: {detail}");
                    note_settled(ext, &mut self.dirty, r.key);
                    return Err(StoreError::Checksum {
                        key: r.key,
                        block_index: b,
                        path: ext.path.clone(),
                        detail,
                    });
                }
            }
        }
        note_settled(ext, &mut self.dirty, r.key);
        buf.set_view((r.offset - b0 as u64 * BLOCK) as usize, r.len as usize);
        Ok(buf)
    }

    /// A read through a chain finished reading its own version: the blocks
    /// it holds are verified in place, the others are looked for beneath.
    fn complete_chained_read(&mut self, idx: usize) {
        let error = self.op_mut(idx).error.take();
        let OpKind::Read(r) = &mut self.ops[idx].as_mut().expect("live").kind else {
            unreachable!()
        };
        let key = r.key;
        let ext = self.open.get_mut(&key).expect("open while locked");
        if let Some((errno, _)) = error {
            let e = StoreError::from_errno(
                format!(
                    "reading {key} at offset {} ({})",
                    r.offset,
                    ext.path.display()
                ),
                errno,
            );
            self.finish_locked_with_error(idx, key, e);
            return;
        }
        let (b0, b1) = blocks_of(r.offset, r.len);
        let table = ext.table.as_mut().expect("loaded");
        let buf = r.buf.as_mut().expect("read buffer");
        let mut need = Vec::new();
        let mut failed = None;
        for b in b0..b1 {
            if !table.needs_read(b) {
                need.push(b);
                continue;
            }
            let s = ((b - b0) as u64 * BLOCK) as usize;
            match table.verify(b, &buf[s..s + BLOCK as usize]) {
                Verified::Data => {}
                Verified::Unheld => need.push(b),
                Verified::Mismatch(detail) => {
                    error!(%key, block = b, path = %ext.path.display(), "checksum mismatch: {detail}");
                    failed = Some(StoreError::Checksum {
                        key,
                        block_index: b,
                        path: ext.path.clone(),
                        detail,
                    });
                    break;
                }
            }
        }
        note_settled(ext, &mut self.dirty, key);
        if let Some(e) = failed {
            self.finish_locked_with_error(idx, key, e);
            return;
        }
        if !self.start_walk(idx, need, true) {
            self.make_ready(idx);
        }
    }

    fn complete_write_reads(&mut self, idx: usize) {
        let error = self.op_mut(idx).error.take();
        let OpKind::Write(w) = &mut self.ops[idx].as_mut().expect("live").kind else {
            unreachable!()
        };
        let (key, offset, len) = (w.key, w.offset, w.len);
        let ext = self.open.get_mut(&key).expect("open while locked");
        if let Some((errno, _)) = error {
            let e = StoreError::from_errno(
                format!(
                    "reading {} around offset {offset} to merge a write ({})",
                    key,
                    ext.path.display()
                ),
                errno,
            );
            self.finish_locked_with_error(idx, key, e);
            return;
        }
        let (b0, b1) = blocks_of(offset, len);
        let (head_partial, tail_partial) = partial_ends(offset, len);
        let keep_all = matches!(w.payload, Payload::Materialize);
        let table = ext.table.as_mut().expect("loaded");
        let merge = w.merge.as_mut().expect("merge buffer");
        for b in b0..b1 {
            // A block whose content the write keeps (in part, or, for a
            // materialize, whole) must verify; one it replaces whole need not.
            let partial = keep_all || (b == b0 && head_partial) || (b == b1 - 1 && tail_partial);
            if !(table.needs_settle(b) || (partial && table.needs_read(b))) {
                continue;
            }
            let s = ((b - b0) as u64 * BLOCK) as usize;
            let block = &mut merge[s..s + BLOCK as usize];
            match table.verify(b, block) {
                Verified::Data => {}
                Verified::Unheld => block.fill(0),
                // A block the write replaces whole may be torn: it is settled
                // as torn and overwritten. One it merges into must be sound.
                Verified::Mismatch(detail) if partial => {
                    error!(%key, block = b, path = %ext.path.display(), "checksum mismatch before a partial write: {detail}");
                    note_settled(ext, &mut self.dirty, key);
                    let e = StoreError::Checksum {
                        key,
                        block_index: b,
                        path: ext.path.clone(),
                        detail,
                    };
                    self.finish_locked_with_error(idx, key, e);
                    return;
                }
                Verified::Mismatch(detail) => {
                    warn!(%key, block = b, "overwriting a block that failed its checksum: {detail}");
                }
            }
        }
        note_settled(ext, &mut self.dirty, key);
        self.op_mut(idx).phase = Phase::ReadyToWrite;
        if !self.after_write_reads(idx) {
            // Keep the locks; submit when the ring has room.
            self.make_ready(idx);
        }
    }

    fn complete_write(&mut self, idx: usize) {
        let op = self.take_op(idx);
        let OpKind::Write(w) = op.kind else {
            unreachable!()
        };
        let key = w.key;
        let (b0, b1) = blocks_of(w.offset, w.len);
        let ext = self.open.get_mut(&key).expect("open while locked");
        let table = ext.table.as_mut().expect("loaded");
        ext.needs_fsync = true;
        self.dirty.insert(key);
        if let Some((errno, part)) = op.error {
            for (b, old) in (b0..b1).zip(&w.old_slots) {
                table.fail_write(b, *old);
            }
            let what = if part == 0 && w.slot_sqe {
                "checksum slots"
            } else {
                "data"
            };
            let e = StoreError::from_errno(
                format!(
                    "writing {what} of {key} at offset {} length {} ({})",
                    w.offset,
                    w.len,
                    ext.path.display()
                ),
                errno,
            );
            error!("{e}");
            self.release(idx, key);
            let _ = w.reply.send(Err(e));
            return;
        }
        let durable_now = w.fua && !w.flush_after;
        for b in b0..b1 {
            table.complete_write(b, durable_now);
        }
        self.release(idx, key);
        if w.flush_after {
            self.start_flush(Some(w.reply), true);
        } else {
            let _ = w.reply.send(Ok(()));
        }
    }

    // ----- the chain beneath a version -----

    /// A write's reads (if any) are done: with a chain beneath, the partial
    /// blocks its own version does not hold are filled from the chain first
    /// (under the write's block locks). Then the write is submitted. Returns
    /// false if the ring has no room.
    fn after_write_reads(&mut self, idx: usize) -> bool {
        let OpKind::Write(w) = &mut self.ops[idx].as_mut().expect("live").kind else {
            unreachable!()
        };
        if w.below.is_empty() {
            return self.submit_write(idx);
        }
        let (b0, b1) = blocks_of(w.offset, w.len);
        let (head_partial, tail_partial) = partial_ends(w.offset, w.len);
        let table = self.open[&w.key].table.as_ref().expect("loaded");
        if matches!(w.payload, Payload::Materialize) {
            let need: Vec<u32> = (b0..b1).filter(|&b| !table.needs_read(b)).collect();
            if need.is_empty() {
                // Holds every block already: nothing to copy up.
                let key = w.key;
                let OpKind::Write(w) = self.take_op(idx).kind else {
                    unreachable!()
                };
                self.release(idx, key);
                let _ = w.reply.send(Ok(()));
                return true;
            }
            let span = ((b1 - b0) as u64 * BLOCK) as usize;
            let merge = w.merge.get_or_insert_with(|| IoBuf::zeroed(span));
            for &b in &need {
                // The span read to keep held blocks may cover these too.
                let s = ((b - b0) as u64 * BLOCK) as usize;
                merge[s..s + BLOCK as usize].fill(0);
            }
            return self.start_walk(idx, need, true);
        }
        let mut need = Vec::new();
        if head_partial && !table.needs_read(b0) {
            need.push(b0);
        }
        if tail_partial && b1 - 1 != b0 && !table.needs_read(b1 - 1) {
            need.push(b1 - 1);
        } else if tail_partial && b1 - 1 == b0 && !head_partial && !table.needs_read(b0) {
            need.push(b0);
        }
        if need.is_empty() {
            return self.submit_write(idx);
        }
        let span = ((b1 - b0) as u64 * BLOCK) as usize;
        w.merge.get_or_insert_with(|| IoBuf::zeroed(span));
        self.start_walk(idx, need, true)
    }

    /// Starts looking for blocks `need` in the versions beneath the op's own.
    /// The op's buffer (a read's `buf`, a write's `merge`) spans its blocks.
    /// Returns false if the ring has no room (the op resumes where it is).
    fn start_walk(&mut self, idx: usize, need: Vec<u32>, top_locked: bool) -> bool {
        let op = self.op_mut(idx);
        op.phase = Phase::Below;
        let walk = Some(Box::new(Walk {
            level: 0,
            need,
            lock: None,
            stage: None,
            top_locked,
        }));
        match &mut op.kind {
            OpKind::Read(r) => r.walk = walk,
            OpKind::Write(w) => w.walk = walk,
            _ => unreachable!("only reads and writes walk"),
        }
        self.advance_walk(idx)
    }

    /// Consults the next older version that may hold a needed block: finds
    /// it, opens and loads it, takes a shared lock on the needed range and
    /// reads the blocks it may hold. Versions not stored, or holding none of
    /// the blocks, are passed over without I/O. Returns false if the ring has
    /// no room.
    fn advance_walk(&mut self, idx: usize) -> bool {
        loop {
            let op = self.ops[idx].as_mut().expect("live");
            let (key, extent_bytes, below, walk) = match &mut op.kind {
                OpKind::Read(r) => (r.key, r.extent_bytes, &r.below, r.walk.as_mut()),
                OpKind::Write(w) => (w.key, w.extent_bytes, &w.below, w.walk.as_mut()),
                _ => unreachable!("only reads and writes walk"),
            };
            let walk = walk.expect("walking");
            if walk.need.is_empty() || walk.level >= below.len() {
                return self.finish_walk(idx);
            }
            let lkey = ExtentKey {
                epoch: below[walk.level],
                ..key
            };
            let (w0, w1) = (walk.need[0], walk.need[walk.need.len() - 1] + 1);
            let Some(entry) = self.index.get(&lkey).copied() else {
                walk.level += 1;
                walk.lock = None;
                continue;
            };
            walk.lock = Some((lkey, w0, w1));
            if entry.extent_bytes != extent_bytes {
                let e = StoreError::ExtentSizeMismatch {
                    key: lkey,
                    stored_bytes: entry.extent_bytes,
                    requested_bytes: extent_bytes,
                };
                self.finish_with_error(idx, e);
                return true;
            }
            if !self.open.contains_key(&lkey) {
                if let Err(e) = self.open_extent(lkey, entry) {
                    self.finish_with_error(idx, e);
                    return true;
                }
            }
            self.touch(lkey);
            let room = self.ring_room(1);
            let ext = self.open.get_mut(&lkey).expect("opened above");
            if ext.table.is_none() {
                if !ext.load_waiters.contains(&idx) {
                    ext.load_waiters.push(idx);
                }
                return true;
            }
            let queued_pos = ext.waiters.iter().position(|&w| w == idx);
            if lock_conflict(ext, &self.ops, idx, w0, w1, false, false, queued_pos) {
                if queued_pos.is_none() {
                    ext.waiters.push_back(idx);
                }
                return true;
            }
            let table = ext.table.as_ref().expect("loaded");
            let walk = self.ops[idx]
                .as_mut()
                .and_then(|op| match &mut op.kind {
                    OpKind::Read(r) => r.walk.as_deref_mut(),
                    OpKind::Write(w) => w.walk.as_deref_mut(),
                    _ => None,
                })
                .expect("walking");
            let mut held = walk.need.iter().copied().filter(|&b| table.needs_read(b));
            let Some(s0) = held.next() else {
                // This version holds none of them: on to the next, without
                // its lock. Ops queued behind this one may go now.
                walk.level += 1;
                walk.lock = None;
                if let Some(p) = queued_pos {
                    ext.waiters.remove(p);
                    let behind: Vec<usize> = ext.waiters.iter().copied().collect();
                    self.make_all_ready(behind);
                }
                continue;
            };
            let s1 = held.next_back().unwrap_or(s0) + 1;
            if !room {
                return false;
            }
            if let Some(p) = queued_pos {
                ext.waiters.remove(p);
            }
            ext.active.push((idx, w0, w1, false));
            let span = (s1 - s0) as u64 * BLOCK;
            let mut stage = IoBuf::for_overwrite(span as usize);
            let sqe = opcode::Read::new(
                types::Fd(ext.data_fd.as_raw_fd()),
                stage.as_mut_ptr(),
                span as u32,
            )
            .offset(ext.block_offset(s0))
            .build();
            // The buffer's heap address does not move when the IoBuf is stored.
            walk.stage = Some((s0, stage));
            let op = self.op_mut(idx);
            op.phase = Phase::BelowRead;
            op.expect[0] = span as u32;
            self.push_chain(idx, &[sqe]);
            return true;
        }
    }

    /// An older version's blocks were read: the ones it holds are verified
    /// and copied into the op's buffer; the rest are looked for further down.
    fn complete_walk_read(&mut self, idx: usize) {
        let error = self.op_mut(idx).error.take();
        let mut op = self.ops[idx].take().expect("live");
        let (b0, dest, walk) = match &mut op.kind {
            OpKind::Read(r) => (
                blocks_of(r.offset, r.len).0,
                r.buf.as_mut().expect("read buffer"),
                r.walk.as_mut().expect("walking"),
            ),
            OpKind::Write(w) => (
                blocks_of(w.offset, w.len).0,
                w.merge.as_mut().expect("merge buffer"),
                w.walk.as_mut().expect("walking"),
            ),
            _ => unreachable!("only reads and writes walk"),
        };
        let (lkey, _, _) = walk.lock.expect("locked while reading");
        let (s0, stage) = walk.stage.take().expect("stage while reading");
        let s1 = s0 + (stage.len() as u64 / BLOCK) as u32;
        let ext = self.open.get_mut(&lkey).expect("open while locked");
        let mut failed = None;
        if let Some((errno, _)) = error {
            failed = Some(StoreError::from_errno(
                format!(
                    "reading {lkey} (beneath a newer version) at block {s0} ({})",
                    ext.path.display()
                ),
                errno,
            ));
        } else {
            let table = ext.table.as_mut().expect("loaded");
            let mut still = Vec::with_capacity(walk.need.len());
            for &b in &walk.need {
                if b < s0 || b >= s1 || !table.needs_read(b) {
                    still.push(b);
                    continue;
                }
                let s = ((b - s0) as u64 * BLOCK) as usize;
                let block = &stage[s..s + BLOCK as usize];
                match table.verify(b, block) {
                    Verified::Data => {
                        let d = ((b - b0) as u64 * BLOCK) as usize;
                        dest[d..d + BLOCK as usize].copy_from_slice(block);
                    }
                    Verified::Unheld => still.push(b),
                    Verified::Mismatch(detail) => {
                        error!(key = %lkey, block = b, path = %ext.path.display(), "checksum mismatch: {detail}");
                        failed = Some(StoreError::Checksum {
                            key: lkey,
                            block_index: b,
                            path: ext.path.clone(),
                            detail,
                        });
                        break;
                    }
                }
            }
            walk.need = still;
            walk.level += 1;
        }
        note_settled(ext, &mut self.dirty, lkey);
        walk.lock = None;
        op.phase = Phase::Below;
        self.ops[idx] = Some(op);
        self.release(idx, lkey);
        if let Some(e) = failed {
            self.finish_with_error(idx, e);
            return;
        }
        if !self.advance_walk(idx) {
            self.make_ready(idx);
        }
    }

    /// The walk is over: blocks no version holds read as zeros. A read
    /// replies; a write goes on to submit. Returns false if the ring has no
    /// room for the write.
    fn finish_walk(&mut self, idx: usize) -> bool {
        let op = self.ops[idx].as_mut().expect("live");
        match &mut op.kind {
            OpKind::Read(r) => {
                let walk = r.walk.take().expect("walking");
                let (b0, _) = blocks_of(r.offset, r.len);
                let buf = r.buf.as_mut().expect("read buffer");
                for &b in &walk.need {
                    let s = ((b - b0) as u64 * BLOCK) as usize;
                    buf[s..s + BLOCK as usize].fill(0);
                }
                let OpKind::Read(mut r) = self.take_op(idx).kind else {
                    unreachable!()
                };
                if walk.top_locked {
                    self.release(idx, r.key);
                }
                let mut buf = r.buf.take().expect("read buffer");
                buf.set_view((r.offset - b0 as u64 * BLOCK) as usize, r.len as usize);
                let _ = r.reply.send(Ok(buf));
                true
            }
            OpKind::Write(w) => {
                let walk = w.walk.take().expect("walking");
                let (b0, _) = blocks_of(w.offset, w.len);
                let merge = w.merge.as_mut().expect("merge buffer");
                for &b in &walk.need {
                    let s = ((b - b0) as u64 * BLOCK) as usize;
                    merge[s..s + BLOCK as usize].fill(0);
                }
                op.phase = Phase::ReadyToWrite;
                self.submit_write(idx)
            }
            _ => unreachable!("only reads and writes walk"),
        }
    }

    // ----- held blocks -----

    /// `held_blocks`: reads the blocks not yet settled (after a crash), if any.
    fn start_held(&mut self, idx: usize) -> bool {
        let OpKind::Held(h) = &self.ops[idx].as_ref().expect("live").kind else {
            unreachable!()
        };
        let key = h.key;
        let ext = &self.open[&key];
        let table = ext.table.as_ref().expect("loaded");
        let mut unsettled = (0..table.blocks()).filter(|&b| table.needs_settle(b));
        let Some(u0) = unsettled.next() else {
            self.finish_held(idx);
            return true;
        };
        let u1 = unsettled.next_back().unwrap_or(u0) + 1;
        if !self.ring_room(1) {
            return false;
        }
        let span = ((u1 - u0) as u64 * BLOCK) as usize;
        let mut buf = IoBuf::for_overwrite(span);
        let fd = ext.data_fd.as_raw_fd();
        let file_off = ext.block_offset(u0);
        let ptr = buf.as_mut_ptr();
        let OpKind::Held(h) = &mut self.op_mut(idx).kind else {
            unreachable!()
        };
        // The buffer's heap address does not move when the IoBuf is stored.
        h.buf = Some((u0, buf));
        self.submit_data_read(idx, fd, ptr, span as u32, file_off);
        true
    }

    fn complete_held(&mut self, idx: usize) {
        let error = self.op_mut(idx).error.take();
        let OpKind::Held(h) = &mut self.ops[idx].as_mut().expect("live").kind else {
            unreachable!()
        };
        let key = h.key;
        let (u0, buf) = h.buf.take().expect("held buffer");
        let ext = self.open.get_mut(&key).expect("open while locked");
        if let Some((errno, _)) = error {
            let e = StoreError::from_errno(
                format!(
                    "reading {key} to settle its blocks ({})",
                    ext.path.display()
                ),
                errno,
            );
            self.finish_locked_with_error(idx, key, e);
            return;
        }
        let table = ext.table.as_mut().expect("loaded");
        let u1 = u0 + (buf.len() as u64 / BLOCK) as u32;
        for b in u0..u1 {
            if !table.needs_settle(b) {
                continue;
            }
            let s = ((b - u0) as u64 * BLOCK) as usize;
            if let Verified::Mismatch(detail) = table.verify(b, &buf[s..s + BLOCK as usize]) {
                // Held (reads of it fail rather than fall through).
                warn!(%key, block = b, path = %ext.path.display(), "checksum mismatch: {detail}");
            }
        }
        note_settled(ext, &mut self.dirty, key);
        self.finish_held(idx);
    }

    /// Replies with the held-block bitmap; every block is settled.
    fn finish_held(&mut self, idx: usize) {
        let OpKind::Held(h) = self.take_op(idx).kind else {
            unreachable!()
        };
        let table = self.open[&h.key].table.as_ref().expect("loaded");
        let mut words = vec![0u64; table.blocks().div_ceil(64) as usize];
        for b in 0..table.blocks() {
            if table.held(b) {
                words[b as usize / 64] |= 1 << (b % 64);
            }
        }
        self.release(idx, h.key);
        let _ = h.reply.send(Ok(Some(words)));
    }

    // ----- extents: create, open, load, delete, evict -----

    fn create_extent(&mut self, key: ExtentKey, extent_bytes: u32) -> Result<()> {
        let path = layout::path_for(&self.root, &key);
        let parent = path
            .parent()
            .expect("extent path has a parent")
            .to_path_buf();
        self.make_dirs(&parent)?;
        let ctx = |what: &str| format!("{what} extent file {} for {key}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| StoreError::io(ctx("creating"), e))?;
        let result = (|| {
            file.set_len(layout::file_bytes(extent_bytes))
                .map_err(|e| StoreError::io(ctx("sizing"), e))?;
            // Reserve the header and slot table so a checksum-slot store can
            // never hit ENOSPC (a SIGBUS through the mapping) after its data
            // was written.
            // SAFETY: plain syscall on a valid fd; arguments are in range.
            let rc = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    0,
                    0,
                    layout::data_offset(extent_bytes) as i64,
                )
            };
            if rc != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(StoreError::io(ctx("reserving the slot table of"), e));
                }
                // No fallocate here: allocate the table by writing its zeros.
                let zeros = vec![0u8; layout::table_bytes(extent_bytes) as usize];
                file.write_all_at(&zeros, HEADER_BYTES)
                    .map_err(|e| StoreError::io(ctx("reserving the slot table of"), e))?;
            }
            let created_unix_s = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let header = Header {
                key,
                extent_bytes,
                created_unix_s,
            }
            .encode();
            file.write_all_at(&header, 0)
                .map_err(|e| StoreError::io(ctx("writing the header of"), e))?;
            let slot_map = map_slot_table(&file, extent_bytes, &path)?;
            Ok((self.open_data_fd(&path)?, slot_map))
        })();
        let (data_fd, slot_map) = match result {
            Ok(fds) => fds,
            Err(e) => {
                let _ = fs::remove_file(&path);
                return Err(e);
            }
        };
        self.dirs_dirty.insert(parent);
        let allocated = layout::data_offset(extent_bytes);
        self.allocated_total += allocated;
        self.index.insert(
            key,
            IndexEntry {
                extent_bytes,
                allocated_bytes: allocated,
                trusted: true,
            },
        );
        let blocks = layout::blocks_per_extent(extent_bytes);
        self.insert_open(
            key,
            OpenExtent {
                path,
                extent_bytes,
                data_fd,
                meta_fd: file.into(),
                slot_map,
                table: Some(SlotTable::new_empty(blocks)),
                load_waiters: Vec::new(),
                active: Vec::new(),
                waiters: VecDeque::new(),
                needs_fsync: true,
                flushing: 0,
                synced: false,
                lru_tick: 0,
            },
        );
        self.dirty.insert(key);
        debug!(%key, "extent created");
        Ok(())
    }

    /// mkdir -p that records every directory whose entries changed.
    fn make_dirs(&mut self, dir: &Path) -> Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        let parent = dir.parent().expect("below the store root");
        self.make_dirs(parent)?;
        match fs::create_dir(dir) {
            Ok(()) => {
                self.dirs_dirty.insert(parent.to_path_buf());
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(StoreError::io(
                format!("creating directory {}", dir.display()),
                e,
            )),
        }
    }

    fn open_data_fd(&self, path: &Path) -> Result<OwnedFd> {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        let flags = if self.options.io_mode == IoMode::Direct {
            libc::O_DIRECT
        } else {
            0
        };
        o.custom_flags(libc::O_CLOEXEC | flags);
        o.open(path)
            .map(Into::into)
            .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))
    }

    fn open_extent(&mut self, key: ExtentKey, entry: IndexEntry) -> Result<()> {
        let path = layout::path_for(&self.root, &key);
        let meta = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| StoreError::io(format!("opening {} for {key}", path.display()), e))?;
        let data_fd = self.open_data_fd(&path)?;
        let slot_map = map_slot_table(&meta, entry.extent_bytes, &path)?;
        let load_bytes = layout::data_offset(entry.extent_bytes) as usize;
        let mut buf = IoBuf::for_overwrite(load_bytes);
        let sqe = opcode::Read::new(
            types::Fd(meta.as_raw_fd()),
            buf.as_mut_ptr(),
            load_bytes as u32,
        )
        .offset(0)
        .build();
        self.insert_open(
            key,
            OpenExtent {
                path,
                extent_bytes: entry.extent_bytes,
                data_fd,
                meta_fd: meta.into(),
                slot_map,
                table: None,
                load_waiters: Vec::new(),
                active: Vec::new(),
                waiters: VecDeque::new(),
                needs_fsync: false,
                flushing: 0,
                synced: true,
                lru_tick: 0,
            },
        );
        let idx = self.new_op(OpKind::Load(LoadOp { key, buf }));
        let op = self.op_mut(idx);
        op.phase = Phase::Reading;
        op.expect[0] = load_bytes as u32;
        // A load is one SQE; the ring always keeps room for it (see ring_room).
        self.push_chain(idx, &[sqe]);
        Ok(())
    }

    fn complete_load(&mut self, idx: usize) {
        let op = self.take_op(idx);
        let OpKind::Load(l) = op.kind else {
            unreachable!()
        };
        let key = l.key;
        let entry = self.index[&key];
        let ext = self.open.get_mut(&key).expect("open while loading");
        let result = match op.error {
            Some((errno, _)) => Err(StoreError::from_errno(format!("reading the slot table of {}", ext.path.display()), errno)),
            None => match Header::decode(&l.buf[..HEADER_BYTES as usize]) {
                Ok(Some(h)) if h.key == key && h.extent_bytes == entry.extent_bytes => Ok(()),
                Ok(Some(h)) => Err(StoreError::CorruptExtent {
                    path: ext.path.clone(),
                    reason: format!(
                        "header names {} with extent size {}, the file name and size say {key} with {}",
                        h.key, h.extent_bytes, entry.extent_bytes
                    ),
                }),
                Ok(None) => {
                    // Created but never flushed before a crash: rewrite the header.
                    warn!(path = %ext.path.display(), "extent header was never written; rewriting it");
                    let h = Header { key, extent_bytes: entry.extent_bytes, created_unix_s: 0 }.encode();
                    // SAFETY: meta_fd is a valid fd owned by `ext`; `h` outlives the call.
                    let n = unsafe { libc::pwrite(ext.meta_fd.as_raw_fd(), h.as_ptr().cast(), h.len(), 0) };
                    if n as usize == h.len() {
                        ext.needs_fsync = true;
                        ext.synced = false;
                        self.dirty.insert(key);
                        Ok(())
                    } else {
                        Err(StoreError::io(format!("rewriting the header of {}", ext.path.display()), io::Error::last_os_error()))
                    }
                }
                Err(reason) => Err(StoreError::CorruptExtent { path: ext.path.clone(), reason }),
            },
        };
        let ext = self.open.get_mut(&key).expect("open while loading");
        let waiters = std::mem::take(&mut ext.load_waiters);
        match result {
            Ok(()) => {
                let blocks = layout::blocks_per_extent(entry.extent_bytes);
                ext.table = Some(SlotTable::decode(
                    &l.buf[HEADER_BYTES as usize..],
                    blocks,
                    entry.trusted,
                ));
                self.make_all_ready(waiters);
            }
            Err(e) => {
                error!("{e}");
                // Forget the open state so a later request tries again.
                self.remove_open(key);
                for w in waiters {
                    self.finish_with_error(w, e.clone());
                }
            }
        }
    }

    /// Zeroing a whole extent with punch deletes its file: the space goes back
    /// and the extent reads as never written. Runs holding every block lock.
    fn delete_extent(&mut self, idx: usize, key: ExtentKey) {
        let ext = self.remove_open(key).expect("open while locked");
        let result = fs::remove_file(&ext.path)
            .map_err(|e| StoreError::io(format!("deleting {} for {key}", ext.path.display()), e));
        let op = self.take_op(idx);
        let OpKind::Write(w) = op.kind else {
            unreachable!()
        };
        if let Err(e) = result {
            // The file is still there: reopen on next use.
            let _ = w.reply.send(Err(e));
            self.make_all_ready(ext.waiters);
            return;
        }
        if let Some(e) = self.index.remove(&key) {
            self.allocated_total -= e.allocated_bytes.min(self.allocated_total);
        }
        self.dirty.remove(&key);
        self.dirs_dirty
            .insert(ext.path.parent().expect("parent").to_path_buf());
        drop(ext.data_fd);
        drop(ext.meta_fd);
        // Ops queued behind the delete start over and find no extent.
        self.make_all_ready(ext.waiters);
        debug!(%key, "extent deleted");
        if w.fua {
            self.start_flush(Some(w.reply), true);
        } else {
            let _ = w.reply.send(Ok(()));
        }
    }

    fn insert_open(&mut self, key: ExtentKey, ext: OpenExtent) {
        self.open.insert(key, ext);
        self.touch(key);
    }

    fn remove_open(&mut self, key: ExtentKey) -> Option<OpenExtent> {
        let ext = self.open.remove(&key)?;
        self.lru.remove(&ext.lru_tick);
        Some(ext)
    }

    fn touch(&mut self, key: ExtentKey) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(ext) = self.open.get_mut(&key) {
            self.lru.remove(&ext.lru_tick);
            ext.lru_tick = tick;
            self.lru.insert(tick, key);
        }
    }

    fn evict(&mut self) {
        let over = self
            .open
            .len()
            .saturating_sub(self.options.open_extents_max);
        if over == 0 {
            return;
        }
        let victims: Vec<ExtentKey> = self
            .lru
            .values()
            .take(EVICTION_SCAN_MAX)
            .filter(|k| !self.open[*k].pinned() && !self.dirty.contains(*k))
            .take(over)
            .copied()
            .collect();
        for key in victims {
            let ext = self.remove_open(key).expect("listed in lru");
            if let (Some(entry), Some(table)) = (self.index.get_mut(&key), ext.table.as_ref()) {
                entry.trusted = table.trustworthy();
            }
        }
    }

    // ----- locks -----

    fn release(&mut self, idx: usize, key: ExtentKey) {
        if let Some(ext) = self.open.get_mut(&key) {
            ext.active.retain(|a| a.0 != idx);
            // Waiters retry in order; FIFO among overlapping ops is kept by
            // lock_conflict looking at the ops queued ahead.
            let waiters: Vec<usize> = ext.waiters.iter().copied().collect();
            self.make_all_ready(waiters);
        }
    }

    // ----- flush -----

    /// Starts a flush covering every write completed so far. `reply` gets the
    /// result once this flush and every older one have finished.
    fn start_flush(&mut self, reply: Option<oneshot::Sender<Result<()>>>, internal: bool) {
        if let Some(why) = &self.failed {
            if let Some(r) = reply {
                let _ = r.send(Err(StoreError::Failed(why.clone())));
            }
            return;
        }
        let mut captured = Vec::new();
        for key in std::mem::take(&mut self.dirty) {
            let ext = self.open.get_mut(&key).expect("dirty extents stay open");
            let table = ext.table.as_mut().expect("dirty extents are loaded");
            let blocks = table.capture_written_for_flush();
            // Fresh blocks lost their fresh mark in the capture: store their
            // entries again now, so the fsync makes that durable with the data.
            for &b in &blocks {
                if table.fresh_cleared(b) {
                    let at = b as usize * ENTRY_BYTES;
                    table.encode_range_into(b, b + 1, &mut ext.slot_map[at..at + ENTRY_BYTES]);
                }
            }
            ext.needs_fsync = false;
            ext.flushing += 1;
            captured.push((key, blocks));
        }
        let mut dir_fds = Vec::new();
        for dir in std::mem::take(&mut self.dirs_dirty) {
            match open_dir(&dir) {
                Ok(fd) => dir_fds.push(fd),
                // A directory that vanished has no entries left to persist.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.dirs_dirty.insert(dir.clone());
                    warn!(dir = %dir.display(), "cannot open directory to sync it: {e}");
                }
            }
        }
        let fds: Vec<RawFd> = captured
            .iter()
            .map(|(k, _)| self.open[k].data_fd.as_raw_fd())
            .chain(dir_fds.iter().map(|f| f.as_raw_fd()))
            .collect();
        let flush = FlushOp {
            captured,
            dir_fds,
            replies: reply.into_iter().collect(),
            internal,
            done: false,
            result: Ok(()),
        };
        let idx = self.new_op(OpKind::Flush(flush));
        self.flushes.push_back(idx);
        if fds.is_empty() {
            // Nothing new to sync; still answers only after older flushes.
            self.op_mut(idx).phase = Phase::Writing;
            self.finish_flushes_in_order(Some(idx));
            return;
        }
        // Fsyncs are not linked; ring space is made by submitting in pieces.
        self.op_mut(idx).phase = Phase::Writing;
        for (i, fd) in fds.iter().enumerate() {
            let sqe = opcode::Fsync::new(types::Fd(*fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            let _ = i;
            self.push_chain(idx, &[sqe]);
        }
    }

    fn complete_flush(&mut self, idx: usize) {
        let error = self.op_mut(idx).error;
        let OpKind::Flush(f) = &mut self.ops[idx].as_mut().expect("live").kind else {
            unreachable!()
        };
        let captured = std::mem::take(&mut f.captured);
        f.dir_fds.clear();
        if let Some((errno, _)) = error {
            let why = format!(
                "fsync failed: {}; writes since the previous flush may be lost",
                errno_text(errno)
            );
            error!("{why}; the store now refuses writes");
            f.result = Err(StoreError::Failed(why.clone()));
            self.failed = Some(why);
        }
        let ok = error.is_none();
        for (key, blocks) in captured {
            let Some(ext) = self.open.get_mut(&key) else {
                continue;
            };
            let table = ext.table.as_mut().expect("loaded");
            for b in blocks {
                if ok {
                    table.complete_flush(b);
                } else {
                    table.fail_flush(b);
                }
            }
            ext.flushing -= 1;
            if ok {
                ext.synced = true;
                // SAFETY: fstat on a valid fd into a zeroed stat struct.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: as above; `st` is a valid out-pointer.
                if unsafe { libc::fstat(ext.data_fd.as_raw_fd(), &mut st) } == 0 {
                    if let Some(e) = self.index.get_mut(&key) {
                        let now = st.st_blocks as u64 * 512;
                        self.allocated_total = self.allocated_total
                            - e.allocated_bytes.min(self.allocated_total)
                            + now;
                        e.allocated_bytes = now;
                    }
                }
            } else {
                ext.needs_fsync = true;
                self.dirty.insert(key);
            }
            let waiters: Vec<usize> = ext.waiters.iter().copied().collect();
            self.make_all_ready(waiters);
        }
        self.finish_flushes_in_order(Some(idx));
    }

    fn finish_flushes_in_order(&mut self, just_done: Option<usize>) {
        if let Some(idx) = just_done {
            let OpKind::Flush(f) = &mut self.op_mut(idx).kind else {
                unreachable!()
            };
            f.done = true;
        }
        while let Some(&front) = self.flushes.front() {
            let OpKind::Flush(f) = &self.ops[front].as_ref().expect("live").kind else {
                unreachable!()
            };
            if !f.done {
                break;
            }
            self.flushes.pop_front();
            let OpKind::Flush(f) = self.take_op(front).kind else {
                unreachable!()
            };
            if f.internal && f.replies.is_empty() {
                self.auto_flush_running = false;
            }
            // An older flush's failure fails every flush queued behind it.
            let result = match (&f.result, &self.failed) {
                (Ok(()), Some(why)) => Err(StoreError::Failed(why.clone())),
                (r, _) => r.clone(),
            };
            for r in f.replies {
                let _ = r.send(result.clone());
            }
        }
    }

    // ----- the ring -----

    /// Whether `n` more SQEs fit under the in-flight bound (one slot is kept
    /// for the eventfd, `CHAIN_SQES_MAX` for table loads and flushes).
    fn ring_room(&self, n: usize) -> bool {
        self.sqes_in_flight + n + 1 + CHAIN_SQES_MAX <= self.options.ring_entries as usize
    }

    /// Queues one op's SQEs (a linked chain stays in one submission).
    fn push_chain(&mut self, idx: usize, sqes: &[squeue::Entry]) {
        let n = sqes.len();
        let free = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if free < n {
            if let Err(e) = self.ring.submit() {
                warn!("io_uring submit failed: {e}");
            }
        }
        let base = self.op_mut(idx).outstanding as u64;
        for (i, sqe) in sqes.iter().enumerate() {
            let part = base + i as u64;
            let part = if part < CHAIN_SQES_MAX as u64 {
                part
            } else {
                0
            };
            let sqe = sqe.clone().user_data(((idx as u64) << 8) | part);
            // SAFETY: every buffer an SQE points at is owned by the op (or its
            // open extent, which stays pinned while the op holds a lock) and
            // lives until the completion for this user_data is reaped.
            while unsafe { self.ring.submission().push(&sqe) }.is_err() {
                if let Err(e) = self.ring.submit() {
                    warn!("io_uring submit failed: {e}");
                }
            }
        }
        self.op_mut(idx).outstanding += n as u32;
        self.sqes_in_flight += n;
    }

    fn arm_eventfd(&mut self) {
        if self.eventfd_armed {
            return;
        }
        let Wake::EventFd(eventfd) = &self.shared.wake else {
            return;
        };
        let ptr = (&mut *self.eventfd_buf as *mut u64).cast::<u8>();
        let sqe = opcode::Read::new(types::Fd(eventfd.as_raw_fd()), ptr, 8)
            .build()
            .user_data(EVENTFD_TOKEN);
        // SAFETY: eventfd_buf is boxed, owned by the engine and outlives the ring.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            let _ = self.ring.submit();
        }
        self.eventfd_armed = true;
    }

    fn submit_and_wait(&mut self) -> io::Result<()> {
        self.arm_eventfd();
        if self.ready_can_advance() {
            return self.enter(0);
        }
        // Do not sleep on a command that arrived before `sleeping` was set.
        let wait = if self.command_before_sleep() { 0 } else { 1 };
        let result = self.enter(wait);
        self.shared.sleeping.store(false, Ordering::SeqCst);
        result
    }

    /// Submits what is queued and waits for `wait` completions. EBUSY (the
    /// completion queue is full) is not an error: the caller reaps next.
    fn enter(&mut self, wait: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(wait) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Ops are waiting to advance and the ring has room for them.
    fn ready_can_advance(&self) -> bool {
        !self.ready.is_empty() && self.ring_room(CHAIN_SQES_MAX)
    }

    /// Marks the engine as going to sleep, then takes one command that may
    /// have arrived before the mark: true if it did (and is awake again).
    fn command_before_sleep(&mut self) -> bool {
        self.shared.sleeping.store(true, Ordering::SeqCst);
        match self.rx.try_recv() {
            Ok(cmd) => {
                self.shared.sleeping.store(false, Ordering::SeqCst);
                self.apply_command(cmd);
                true
            }
            Err(_) => false,
        }
    }

    // ----- invariants after every turn -----

    fn maintain(&mut self) {
        // Bound unflushed state: open extents with unflushed writes cannot be
        // evicted, so once the cache is three quarters full, flush before
        // they crowd it out. (Not earlier: every flush is a disk cache flush,
        // and a working set that fits the cache needs none.)
        let max = self.options.open_extents_max;
        if !self.auto_flush_running
            && self.open.len() * 4 >= max * 3
            && self.dirty.len() * 2 > max
            && self.failed.is_none()
        {
            self.auto_flush_running = true;
            self.start_flush(None, true);
        }
        self.evict();
        if self.shutdown.is_some() && !self.final_flush_started && self.live_ops == 0 {
            self.final_flush_started = true;
            self.start_flush(None, true);
        }
    }

    fn finish_shutdown(&mut self) {
        let reply = self.shutdown.take().expect("shutdown requested");
        let result = match &self.failed {
            Some(why) => {
                let _ = self.clean_stop.engine_stopped(None);
                Err(StoreError::Failed(why.clone()))
            }
            None => {
                let mut untrusted: Vec<ExtentKey> = Vec::new();
                for (key, entry) in self.index.iter_mut() {
                    if let Some(t) = self.open.get(key).and_then(|e| e.table.as_ref()) {
                        entry.trusted = t.trustworthy();
                    }
                    if !entry.trusted {
                        untrusted.push(*key);
                    }
                }
                self.clean_stop.engine_stopped(Some(untrusted))
            }
        };
        match &result {
            Ok(()) => info!("store engine stopped cleanly"),
            Err(e) => error!("store engine stopped without a clean marker: {e}"),
        }
        // Drain commands that raced the shutdown.
        while let Ok(cmd) = self.rx.try_recv() {
            reject_shutting_down(cmd);
        }
        let _ = reply.send(result);
    }

    /// The ring failed at `what`: one log line, then every op and later
    /// command fails and the engine stops.
    fn stop_on(&mut self, what: &str, e: impl std::fmt::Display) {
        error!("{what} failed: {e}; stopping the store engine");
        self.fail_everything(&format!("{what} failed: {e}"));
    }

    fn fail_everything(&mut self, why: &str) {
        self.failed = Some(why.to_string());
        self.shared.closed.store(true, Ordering::SeqCst);
        if let Some(r) = self.shutdown.take() {
            let _ = r.send(Err(StoreError::Failed(why.to_string())));
        }
    }

    // ----- finishing ops with errors -----

    /// For ops that hold no lock on their own version's blocks, or hold
    /// them while walking the chain beneath it (released here).
    fn finish_with_error(&mut self, idx: usize, e: StoreError) {
        let op = self.take_op(idx);
        let top = op.walk().filter(|w| w.top_locked).is_some();
        match op.kind {
            OpKind::Read(r) => {
                if top {
                    self.release(idx, r.key);
                }
                let _ = r.reply.send(Err(e));
            }
            OpKind::Write(w) => {
                if top {
                    self.release(idx, w.key);
                }
                let _ = w.reply.send(Err(e));
            }
            OpKind::Held(h) => {
                let _ = h.reply.send(Err(e));
            }
            _ => unreachable!("only reads, writes and held ops fail this way"),
        }
    }

    fn finish_locked_with_error(&mut self, idx: usize, key: ExtentKey, e: StoreError) {
        self.release(idx, key);
        self.finish_with_error(idx, e);
    }
}

impl Drop for Engine {
    /// The kernel may still be reading from or writing into buffers the ops
    /// own. An engine dropped with SQEs in flight (its ring failed, or an
    /// inline engine's task was dropped with its runtime before the store
    /// shut down) waits for their completions before the ops and their
    /// buffers are freed; the fields drop after this.
    fn drop(&mut self) {
        while self.sqes_in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    // The kernel may still use the buffers after the ring is
                    // closed: leak them (and the eventfd read's) rather than
                    // free memory it could write into.
                    error!(
                        in_flight = self.sqes_in_flight,
                        "io_uring wait failed while stopping: {e}; leaking the I/O buffers"
                    );
                    std::mem::forget(std::mem::take(&mut self.ops));
                    std::mem::forget(std::mem::replace(&mut self.eventfd_buf, Box::new(0)));
                    return;
                }
            }
            let done = self
                .ring
                .completion()
                .filter(|c| c.user_data() != EVENTFD_TOKEN)
                .count();
            self.sqes_in_flight = self.sqes_in_flight.saturating_sub(done);
        }
    }
}

/// After verifying blocks of `ext` (version `key`): a settle that left a
/// pending write (slots.rs, rule 4) makes the extent need a flush.
fn note_settled(ext: &mut OpenExtent, dirty: &mut BTreeSet<ExtentKey>, key: ExtentKey) {
    if ext
        .table
        .as_mut()
        .is_some_and(|t| t.take_settled_unflushed())
    {
        ext.needs_fsync = true;
        dirty.insert(key);
    }
}

/// Whether the first and last blocks of a range are only partly covered.
fn partial_ends(offset: u64, len: u32) -> (bool, bool) {
    let end = offset + len as u64;
    (
        !offset.is_multiple_of(BLOCK) || end < (offset / BLOCK + 1) * BLOCK,
        !end.is_multiple_of(BLOCK),
    )
}

/// An op conflicts with an active op on overlapping blocks unless both read;
/// with an op queued ahead of it likewise (FIFO); a write also waits while a
/// block's pending slot is being flushed, and a delete waits for every flush.
#[allow(clippy::too_many_arguments)]
fn lock_conflict(
    ext: &OpenExtent,
    ops: &[Option<Op>],
    idx: usize,
    b0: u32,
    b1: u32,
    exclusive: bool,
    whole_delete: bool,
    queued_pos: Option<usize>,
) -> bool {
    let overlaps = |a0: u32, a1: u32, ax: bool| a0 < b1 && b0 < a1 && (ax || exclusive);
    if ext
        .active
        .iter()
        .any(|&(i, a0, a1, ax)| i != idx && overlaps(a0, a1, ax))
    {
        return true;
    }
    let ahead = queued_pos.unwrap_or(ext.waiters.len());
    for &w in ext.waiters.iter().take(ahead) {
        if let Some((_, a0, a1, ax)) = ops[w].as_ref().and_then(|o| o.block_range()) {
            if overlaps(a0, a1, ax) {
                return true;
            }
        }
    }
    if exclusive {
        let table = ext.table.as_ref().expect("loaded");
        if (b0..b1).any(|b| !table.writable(b)) {
            return true;
        }
        if whole_delete && ext.flushing > 0 {
            return true;
        }
    }
    false
}

/// Maps the slot table of an extent file shared and writable.
///
/// Only the engine thread touches the mapping, and only to store entries it
/// also keeps decoded in memory; it never reads through it. The table's
/// blocks are allocated when the file is created, so a store cannot fail
/// for space. A store that faults in a page the disk cannot read kills the
/// process with SIGBUS, where a write(2) would have returned EIO: the disk
/// under this extent is failing, and the node is better down than serving.
fn map_slot_table(file: &fs::File, extent_bytes: u32, path: &Path) -> Result<MmapMut> {
    let len = layout::blocks_per_extent(extent_bytes) as usize * ENTRY_BYTES;
    let ctx = |what: &str| format!("{what} the slot table of {}", path.display());
    // No readahead on this file's page cache: a fault on the mapping (the
    // first slot stored in a new extent) would otherwise read around it by
    // the device's read_ahead_kb (8 MiB on common virtual disks), which for
    // a sparse extent file means zero-filling the whole data region into
    // the page cache: measured at 85% of the CPU of a chunk server creating
    // a few hundred extent versions a second after a snapshot. The data is
    // read with O_DIRECT, and those cached zeros would also have to be
    // invalidated by every direct write over them. Advisory: a kernel that
    // refuses it only costs speed.
    // SAFETY: plain syscall on a valid fd; offset 0, length 0 = whole file.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    if rc != 0 {
        debug!(path = %path.display(), "posix_fadvise(RANDOM) failed: {}", io::Error::from_raw_os_error(rc));
    }
    // SAFETY: the file is an extent file this engine owns (no other process
    // writes it, the data directory is locked); the mapping covers its slot
    // table, which the file's size (set at creation) always includes, and is
    // dropped with the open extent before the file is deleted.
    let map = unsafe {
        MmapOptions::new()
            .offset(HEADER_BYTES)
            .len(len)
            .map_mut(file)
    }
    .map_err(|e| StoreError::io(ctx("mapping"), e))?;
    if let Err(e) = map.advise(memmap2::Advice::Random) {
        debug!(path = %path.display(), "madvise(RANDOM) on the slot table failed: {e}");
    }
    Ok(map)
}

fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: c is a valid NUL-terminated path; the returned fd is checked.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly opened, valid fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn reject_shutting_down(cmd: Command) {
    match cmd {
        Command::Read { reply, .. } => drop(reply.send(Err(StoreError::ShuttingDown))),
        Command::Write { reply, .. }
        | Command::Zero { reply, .. }
        | Command::Materialize { reply, .. }
        | Command::Flush { reply } => drop(reply.send(Err(StoreError::ShuttingDown))),
        Command::Held { reply, .. } => drop(reply.send(Err(StoreError::ShuttingDown))),
        Command::Delete { reply, .. } => drop(reply.send(Err(StoreError::ShuttingDown))),
        Command::Shutdown { reply } => drop(reply.send(Ok(()))),
        // Reads of metadata can still be answered truthfully, but the engine
        // is going away: dropping the reply reports ShuttingDown.
        Command::List { .. } | Command::Stat { .. } | Command::Usage { .. } => {}
    }
}
