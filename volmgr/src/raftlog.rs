//! The volume manager's durable raft log: raft-rs's [`Storage`] on local disk,
//! checksummed and crash-safe.
//!
//! [`RaftLog`] holds the entries after the last snapshot, the hard state
//! (term, vote, commit), the conf state (voters) and the snapshot itself, in
//! the directory given to [`RaftLog::open`] (the daemon passes
//! `<data_dir>/raft`; the daemon locks its data directory, so this module
//! takes no lock of its own).
//!
//! # Ordering contract for the node loop
//!
//! Per raft-rs `Ready`, in this order:
//! 1. messages that need no persistence (`ready.messages()`) may go out first;
//! 2. a snapshot from the leader: [`RaftLog::apply_snapshot`] (durable when it
//!    returns);
//! 3. new entries: [`RaftLog::append`]; the hard state: [`RaftLog::set_hard_state`];
//! 4. [`RaftLog::sync`] (fdatasync) **before** sending
//!    `ready.persisted_messages()` (votes, append responses): a vote or an
//!    acknowledgement sent before its record is on disk can be forgotten by a
//!    crash, and raft's safety is gone. `append` and the setters only write
//!    into the page cache; nothing they write is durable until `sync` returns;
//! 5. after `advance`, the light ready's commit index via `set_hard_state` (made
//!    durable by the next `sync`; a lost commit index is only learnt again);
//! 6. [`RaftLog::set_conf_state`] when a conf change is applied (durable at the
//!    next `sync`, `compact` or `apply_snapshot`);
//! 7. every few thousand applied entries, [`RaftLog::compact`] with the state
//!    machine's snapshot at the applied index (durable when it returns).
//!
//! Any write that fails (I/O error, fsync error) poisons the log: every later
//! write is refused with [`RaftLogError::Poisoned`], because after a failed
//! fsync the kernel may have dropped dirty pages (PostgreSQL's "fsyncgate").
//! The member must stop; reopening recovers what is on disk.
//!
//! # Files
//!
//! ```text
//! log-<generation:020>.wal    the log: a header, a checkpoint record, then records in write order
//! snap-<index:020>.snap       the snapshot named by the current log's checkpoint (at most one)
//! *.tmp                       a file being written; deleted at open
//! ```
//!
//! Only the log file with the highest generation counts. Compaction and
//! installing a snapshot **rewrite** the log: a new generation starts with a
//! checkpoint (the snapshot's metadata, the hard state, the conf state) and
//! copies the entries after the snapshot (few: compaction runs at the applied
//! index), is fsynced, renamed into place, the directory fsynced, and only then
//! are the old log and snapshot deleted. So disk use is one snapshot plus the
//! entries and state records written since the last compaction. A log that
//! grows past [`LOG_REWRITE_BYTES_MIN`] and twice its live entries (overwritten
//! suffixes, many hard-state records) is rewritten the same way by `sync`.
//!
//! # Format, version 1 ([`FORMAT_VERSION`]); integers little-endian
//!
//! Log file header, 32 bytes:
//! ```text
//!  0  8  magic "CAIRNRLG"
//!  8  4  format version
//! 12  4  zero
//! 16  8  generation (matches the file name)
//! 24  4  crc32 of bytes 0..24
//! 28  4  zero
//! ```
//! Record, a 24-byte header and a payload:
//! ```text
//!  0  4  magic 0x4752_4e43 ("CNRG")
//!  4  4  crc32 of bytes 8..24+len (the rest of the header and the payload)
//!  8  4  payload length, at most RECORD_PAYLOAD_BYTES_MAX
//! 12  1  kind: 1 checkpoint, 2 entry, 3 hard state, 4 conf state
//! 13  3  zero
//! 16  8  durable_before: every byte of the file before this offset had been
//!        fsynced before this record was written
//! 24     payload: entry, hard state, conf state: the eraftpb protobuf message;
//!        checkpoint: durable_len u64 (the file's length when it was renamed
//!        into place), then u32 length + SnapshotMetadata, u32 length +
//!        HardState, u32 length + ConfState (protobuf each)
//! ```
//! The state is the replay of the records in order: the checkpoint sets
//! snapshot metadata, hard state and conf state, with no entries; an entry at
//! index `i` drops every entry at `i` and above, then is appended (raft's
//! conflicting-suffix truncation costs no rewrite); a hard or conf state record
//! replaces the previous one.
//!
//! Snapshot file:
//! ```text
//!  0  8  magic "CAIRNSNP"
//!  8  4  format version
//! 12  4  crc32 of bytes 16..end
//! 16  4  metadata length M
//! 20  4  zero
//! 24  M  SnapshotMetadata (protobuf), index matching the file name
//! 24+M   the state machine's snapshot bytes
//! ```
//!
//! # Crashes (kill -9, power loss), point by point
//!
//! - **During `append`/setters, before `sync` returns**: the file ends in a
//!   torn record, or (power loss) any subset of the unsynced pages reached the
//!   disk. Open reads records until the first that fails its checks. If nothing
//!   valid follows it, it is a torn tail: truncated, with a warning. If a valid
//!   record follows that was written *after a sync that covered the bad one*
//!   (its `durable_before` is beyond the bad offset), the bad record had been
//!   durable: that is damage, and open fails naming the file and offset. A
//!   valid record of the same unsynced batch after a bad one is a power loss
//!   that kept pages out of order: the batch is truncated from the bad record
//!   (none of it was acknowledged). Damage inside the part of a log file that
//!   was synced before its rename (`durable_len`) is always an error.
//! - **After truncating a torn tail** the file is fsynced before anything new
//!   is written, so stale bytes can never reappear behind new records. Open
//!   also fsyncs whatever it read (a killed process leaves unsynced pages in
//!   the page cache), so `durable_before` of new records is true.
//! - **During a rewrite** (compact, apply_snapshot): the new snapshot and log
//!   are `*.tmp` until complete and fsynced; open deletes them. After the new
//!   snapshot's rename but before the new log's, the old log still names the
//!   old snapshot: open keeps that one and deletes the unnamed newer one. After
//!   the new log's rename (and the directory fsync), it names the new snapshot;
//!   open deletes older generations and snapshots left behind.
//! - **Missing or damaged files** are errors, never an empty log: a member that
//!   forgot its vote could vote twice in one term. Snapshot files without a log,
//!   a bad header, a snapshot that fails its checksum: all refuse to open with
//!   the path. The fix for a damaged member is to remove it from the cluster,
//!   wipe its raft directory and add it back; it catches up from the others.
//! - **The limit**: damage inside the *last* synced batch, with nothing written
//!   after it, looks exactly like a torn write and is truncated with a
//!   warning; no format can tell the two apart without a second write and
//!   fsync per `sync`. Entries lost that way come back from the leader; a vote
//!   lost that way could, in theory, let this member vote twice in one term.
//!   The window is the time until the next write, and needs at-rest damage
//!   the disk's own ECC missed.
//!
//! The code that writes and replays files, and decides torn versus damaged, is
//! in `raftlog/format.rs`.
//!
//! # Memory
//!
//! Per live entry (after the snapshot) 24 bytes of index (term, file offset,
//! size); entry data is read back from the file (page cache) and re-verified on
//! every read. The node loop compacts every few thousand entries, which bounds
//! both the index and the file.

mod format;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use tracing::{debug, error, info, warn};

use format::{
    encode, io_err, parse_record, push_record, read_snapshot_file, replay, snap_path, sync_dir,
    write_log_file, write_snapshot_file, EntryLoc, Listing, KIND_CONF_STATE, KIND_ENTRY,
    KIND_HARD_STATE, RECORD_HEADER_BYTES,
};

/// The on-disk format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest record payload (one encoded entry); raft's messages are 1 MiB.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 16 << 20;
/// Largest snapshot (metadata and data) written or read.
pub const SNAPSHOT_BYTES_MAX: u64 = 1 << 30;
/// `sync` rewrites a log file larger than this and twice its live entries.
pub const LOG_REWRITE_BYTES_MIN: u64 = 16 << 20;
/// Largest raft index or log generation accepted, so that index arithmetic
/// can never overflow, whatever a file or a leader says.
pub const INDEX_MAX: u64 = u64::MAX / 4;

/// Why the raft log could not be opened, read or written. Every variant names
/// the file, offset or index concerned.
#[derive(Debug, thiserror::Error)]
pub enum RaftLogError {
    /// A system call failed.
    #[error("raft log: {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A log file holds damaged or inconsistent data that is not a torn tail.
    #[error(
        "raft log file {} is damaged at byte offset {offset}: {reason}; this member's log cannot \
         be trusted: remove the member from the cluster, wipe its raft directory and add it back \
         (it catches up from the others)",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// The snapshot file named by the log is damaged.
    #[error(
        "raft snapshot {} is damaged: {reason}; remove the member from the cluster, wipe its raft \
         directory and add it back",
        path.display()
    )]
    SnapshotCorrupt { path: PathBuf, reason: String },
    /// A file the log needs is missing.
    #[error("raft directory {}: {what}", dir.display())]
    Missing { dir: PathBuf, what: String },
    /// A file of another format version.
    #[error(
        "{}: raft log format version {found}, this build reads version {FORMAT_VERSION}",
        path.display()
    )]
    Version { path: PathBuf, found: u32 },
    /// An earlier write failed; the log refuses writes until reopened.
    #[error(
        "an earlier write to the raft log {} failed; no more writes until the member restarts",
        path.display()
    )]
    Poisoned { path: PathBuf },
    /// `append` got entries that do not follow each other.
    #[error("append: entry {index} follows entry {previous}: entries must be consecutive")]
    NotConsecutive { index: u64, previous: u64 },
    /// `append` would leave a hole after the last entry.
    #[error("append: entry {index} would leave a gap after the last index {last_index}")]
    Gap { index: u64, last_index: u64 },
    /// `append` would overwrite entries covered by the snapshot.
    #[error("append: entry {index} is covered by the snapshot at index {snapshot_index}")]
    BeforeSnapshot { index: u64, snapshot_index: u64 },
    /// An entry is larger than [`RECORD_PAYLOAD_BYTES_MAX`].
    #[error("append: entry {index} is {bytes} bytes encoded, at most {RECORD_PAYLOAD_BYTES_MAX}")]
    EntryTooLarge { index: u64, bytes: usize },
    /// A snapshot is larger than [`SNAPSHOT_BYTES_MAX`].
    #[error("snapshot at index {index} is {bytes} bytes, at most {SNAPSHOT_BYTES_MAX}")]
    SnapshotTooLarge { index: u64, bytes: u64 },
    /// `compact` beyond the entries held.
    #[error("compact to index {index}: the log ends at index {last_index}")]
    CompactBeyondLast { index: u64, last_index: u64 },
    /// An index or generation beyond [`INDEX_MAX`].
    #[error("index {index} is beyond the limit {INDEX_MAX}")]
    IndexTooLarge { index: u64 },
    /// `apply_snapshot` with a snapshot no newer than the log's.
    #[error("snapshot at index {index} is out of date: the log starts at index {first_index}")]
    SnapshotOutOfDate { index: u64, first_index: u64 },
    /// A protobuf message could not be encoded.
    #[error("encoding {what}: {reason}")]
    Encode { what: &'static str, reason: String },
}

impl RaftLogError {
    /// Whether the log's files may now differ from its memory, so that no
    /// further write may be trusted. Refused requests change nothing.
    fn poisons(&self) -> bool {
        matches!(
            self,
            RaftLogError::Io { .. }
                | RaftLogError::Corrupt { .. }
                | RaftLogError::SnapshotCorrupt { .. }
                | RaftLogError::Missing { .. }
                | RaftLogError::Encode { .. }
        )
    }
}

impl From<RaftLogError> for raft::Error {
    fn from(e: RaftLogError) -> Self {
        raft::Error::Store(StorageError::Other(Box::new(e)))
    }
}

type Result<T, E = RaftLogError> = std::result::Result<T, E>;

/// The durable raft log; see the module documentation for the format, the
/// crash argument and the order the node loop must follow.
#[derive(Debug)]
pub struct RaftLog {
    dir: PathBuf,
    log_path: PathBuf,
    file: File,
    generation: u64,
    /// Bytes of the log file, all of them valid records.
    file_len: u64,
    /// Bytes of the log file known to be on disk (synced).
    durable_len: u64,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: SnapshotMetadata,
    /// `locs[i]` is entry `snapshot.index + 1 + i`.
    locs: Vec<EntryLoc>,
    /// Sum of the live entries' record sizes.
    entry_record_bytes: u64,
    poisoned: bool,
    rewrite_bytes_min: u64,
}

impl RaftLog {
    /// Opens the log in `dir`, creating the directory and an empty log if
    /// there is none, and recovers after a crash: a torn tail is truncated (a
    /// warning is logged); damage anywhere else is an error naming the file
    /// and offset.
    pub fn open(dir: &Path) -> Result<RaftLog> {
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        let listing = Listing::read(dir)?;
        for tmp in &listing.tmps {
            info!(file = %tmp.display(), "removing an unfinished file left by a crash");
            fs::remove_file(tmp).map_err(io_err("removing", tmp))?;
        }
        let Some(&(generation, ref log_path)) = listing.logs.last() else {
            if let Some((_, snap)) = listing.snaps.first() {
                return Err(RaftLogError::Missing {
                    dir: dir.to_path_buf(),
                    what: format!(
                        "snapshot {} but no log file: the log was lost, and with it this \
                         member's vote; wipe the directory and add the member back",
                        snap.display()
                    ),
                });
            }
            return Self::create(dir);
        };
        let log = Self::recover(dir, generation, log_path)?;
        // Now that the current generation is known good, remove what a crash
        // during a rewrite left behind.
        let mut removed = false;
        for (gen, path) in &listing.logs {
            if *gen != generation {
                info!(file = %path.display(), "removing a log generation replaced before a crash");
                fs::remove_file(path).map_err(io_err("removing", path))?;
                removed = true;
            }
        }
        for (index, path) in &listing.snaps {
            if *index != log.snapshot.index {
                info!(file = %path.display(), "removing a snapshot the log does not name");
                fs::remove_file(path).map_err(io_err("removing", path))?;
                removed = true;
            }
        }
        if removed {
            sync_dir(dir)?;
        }
        info!(
            dir = %dir.display(),
            generation,
            snapshot_index = log.snapshot.index,
            first_index = log.first(),
            last_index = log.last(),
            term = log.hard_state.term,
            commit = log.hard_state.commit,
            "raft log opened"
        );
        Ok(log)
    }

    fn create(dir: &Path) -> Result<RaftLog> {
        let new = write_log_file(
            dir,
            1,
            &SnapshotMetadata::default(),
            &HardState::default(),
            &ConfState::default(),
            &[],
        )?;
        info!(dir = %dir.display(), "created an empty raft log");
        Ok(RaftLog {
            dir: dir.to_path_buf(),
            log_path: new.path,
            file: new.file,
            generation: 1,
            file_len: new.len,
            durable_len: new.len,
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            snapshot: SnapshotMetadata::default(),
            locs: new.locs,
            entry_record_bytes: new.entry_record_bytes,
            poisoned: false,
            rewrite_bytes_min: LOG_REWRITE_BYTES_MIN,
        })
    }

    fn recover(dir: &Path, generation: u64, log_path: &Path) -> Result<RaftLog> {
        let bytes = fs::read(log_path).map_err(io_err("reading", log_path))?;
        let state = replay(log_path, generation, &bytes)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(log_path)
            .map_err(io_err("opening", log_path))?;
        if state.valid_len < bytes.len() as u64 {
            warn!(
                file = %log_path.display(),
                offset = state.valid_len,
                bytes_dropped = bytes.len() as u64 - state.valid_len,
                "raft log ends in a torn write (a crash before its sync); truncating it there"
            );
            file.set_len(state.valid_len)
                .map_err(io_err("truncating", log_path))?;
        }
        // What a killed process left in the page cache is not yet on disk:
        // make it so before new records claim it is (`durable_before`).
        file.sync_all().map_err(io_err("fsync", log_path))?;
        if state.snapshot.index > 0 {
            let path = snap_path(dir, state.snapshot.index);
            if !path.exists() {
                return Err(RaftLogError::Missing {
                    dir: dir.to_path_buf(),
                    what: format!(
                        "the log {} names snapshot {}, which is missing",
                        log_path.display(),
                        path.display()
                    ),
                });
            }
            let (meta, _) = read_snapshot_file(&path, state.snapshot.index)?;
            if meta != state.snapshot {
                return Err(RaftLogError::SnapshotCorrupt {
                    path,
                    reason: format!(
                        "its metadata {meta:?} differs from the log's checkpoint {:?}",
                        state.snapshot
                    ),
                });
            }
        }
        Ok(RaftLog {
            dir: dir.to_path_buf(),
            log_path: log_path.to_path_buf(),
            file,
            generation,
            file_len: state.valid_len,
            durable_len: state.valid_len,
            hard_state: state.hard_state,
            conf_state: state.conf_state,
            snapshot: state.snapshot,
            locs: state.locs,
            entry_record_bytes: state.entry_record_bytes,
            poisoned: false,
            rewrite_bytes_min: LOG_REWRITE_BYTES_MIN,
        })
    }

    /// The directory holding the log's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last hard state set (durable once `sync` returns).
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The last conf state set.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// The metadata of the snapshot the log starts after (index 0: none).
    pub fn snapshot_metadata(&self) -> &SnapshotMetadata {
        &self.snapshot
    }

    fn first(&self) -> u64 {
        self.snapshot.index + 1
    }

    fn last(&self) -> u64 {
        self.snapshot.index + self.locs.len() as u64
    }

    /// Runs a write; if it fails in a way that may leave the files unlike
    /// memory, refuses every later write.
    fn guard<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.poisoned {
            return Err(RaftLogError::Poisoned {
                path: self.log_path.clone(),
            });
        }
        let result = op(self);
        if let Err(e) = &result {
            if e.poisons() {
                error!(file = %self.log_path.display(), "raft log write failed: {e}; refusing further writes");
                self.poisoned = true;
            }
        }
        result
    }

    /// Appends entries, first dropping every entry at or after the first
    /// one's index (raft's conflicting-suffix truncation). Not durable until
    /// [`RaftLog::sync`].
    pub fn append(&mut self, entries: &[Entry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        self.guard(|log| log.append_unguarded(entries))
    }

    fn append_unguarded(&mut self, entries: &[Entry]) -> Result<()> {
        let first_index = entries[0].index;
        if first_index <= self.snapshot.index {
            return Err(RaftLogError::BeforeSnapshot {
                index: first_index,
                snapshot_index: self.snapshot.index,
            });
        }
        if first_index > self.last() + 1 {
            return Err(RaftLogError::Gap {
                index: first_index,
                last_index: self.last(),
            });
        }
        let mut buf = Vec::new();
        let mut new_locs = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            if i > 0 && entry.index != entries[i - 1].index + 1 {
                return Err(RaftLogError::NotConsecutive {
                    index: entry.index,
                    previous: entries[i - 1].index,
                });
            }
            let payload = encode(entry, "a raft entry")?;
            if payload.len() > RECORD_PAYLOAD_BYTES_MAX {
                return Err(RaftLogError::EntryTooLarge {
                    index: entry.index,
                    bytes: payload.len(),
                });
            }
            new_locs.push(EntryLoc {
                term: entry.term,
                offset: self.file_len + buf.len() as u64,
                payload_bytes: payload.len() as u32,
            });
            push_record(&mut buf, KIND_ENTRY, self.durable_len, &payload);
        }
        self.write_tail(&buf)?;
        let keep = (first_index - self.first()) as usize;
        let dropped: u64 = self.locs[keep..].iter().map(EntryLoc::record_bytes).sum();
        self.locs.truncate(keep);
        self.entry_record_bytes -= dropped;
        self.entry_record_bytes += new_locs.iter().map(EntryLoc::record_bytes).sum::<u64>();
        self.locs.extend(new_locs);
        assert_eq!(self.last(), entries[entries.len() - 1].index);
        Ok(())
    }

    /// Records the hard state (term, vote, commit). Not durable until
    /// [`RaftLog::sync`]. Writes nothing if it is unchanged.
    pub fn set_hard_state(&mut self, hard_state: HardState) -> Result<()> {
        if hard_state == self.hard_state {
            return Ok(());
        }
        self.guard(|log| {
            let payload = encode(&hard_state, "the hard state")?;
            let mut buf = Vec::with_capacity(RECORD_HEADER_BYTES + payload.len());
            push_record(&mut buf, KIND_HARD_STATE, log.durable_len, &payload);
            log.write_tail(&buf)?;
            log.hard_state = hard_state;
            Ok(())
        })
    }

    /// Records the conf state (voters, learners). Not durable until
    /// [`RaftLog::sync`]. Writes nothing if it is unchanged.
    pub fn set_conf_state(&mut self, conf_state: ConfState) -> Result<()> {
        if conf_state == self.conf_state {
            return Ok(());
        }
        self.guard(|log| {
            let payload = encode(&conf_state, "the conf state")?;
            let mut buf = Vec::with_capacity(RECORD_HEADER_BYTES + payload.len());
            push_record(&mut buf, KIND_CONF_STATE, log.durable_len, &payload);
            log.write_tail(&buf)?;
            log.conf_state = conf_state;
            Ok(())
        })
    }

    fn write_tail(&mut self, buf: &[u8]) -> Result<()> {
        self.file
            .write_all_at(buf, self.file_len)
            .map_err(io_err("writing", &self.log_path))?;
        self.file_len += buf.len() as u64;
        Ok(())
    }

    /// Makes everything written so far durable (fdatasync). Must return before
    /// the Ready's persisted messages are sent.
    pub fn sync(&mut self) -> Result<()> {
        self.guard(|log| {
            if log.durable_len < log.file_len {
                log.file
                    .sync_data()
                    .map_err(io_err("fdatasync", &log.log_path))?;
                log.durable_len = log.file_len;
            }
            // Overwritten suffixes and state records are garbage once replaced.
            let live_bytes = 4096 + log.entry_record_bytes;
            if log.file_len >= log.rewrite_bytes_min && log.file_len >= 2 * live_bytes {
                let (snapshot, hs, cs) = (
                    log.snapshot.clone(),
                    log.hard_state.clone(),
                    log.conf_state.clone(),
                );
                let from = log.first();
                debug!(file = %log.log_path.display(), bytes = log.file_len, live_bytes, "rewriting the raft log");
                log.rewrite(snapshot, hs, cs, from)?;
            }
            Ok(())
        })
    }

    /// Replaces the log and state with a snapshot received from the leader:
    /// every entry is dropped, the commit index becomes the snapshot's index,
    /// the term the higher of the two, the conf state the snapshot's. Durable
    /// when it returns.
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) -> Result<()> {
        self.guard(|log| {
            let meta = snapshot.get_metadata().clone();
            if meta.index > INDEX_MAX {
                return Err(RaftLogError::IndexTooLarge { index: meta.index });
            }
            if meta.index < log.first() {
                return Err(RaftLogError::SnapshotOutOfDate {
                    index: meta.index,
                    first_index: log.first(),
                });
            }
            let old_snapshot = log.snapshot.index;
            write_snapshot_file(&log.dir, &meta, &snapshot.data)?;
            let mut hs = log.hard_state.clone();
            hs.term = hs.term.max(meta.term);
            hs.commit = meta.index;
            let cs = meta.get_conf_state().clone();
            let from = log.last().max(meta.index) + 1;
            let index = meta.index;
            log.rewrite(meta, hs, cs, from)?;
            log.remove_snapshot(old_snapshot);
            info!(dir = %log.dir.display(), index, "raft log replaced by a snapshot");
            Ok(())
        })
    }

    /// Stores `snapshot_data` (the state machine at `applied_index`) as the
    /// snapshot and drops the entries up to it. `conf_state` is the conf state
    /// at `applied_index`. A no-op if the log's snapshot is already at or past
    /// `applied_index`. Durable when it returns.
    pub fn compact(
        &mut self,
        applied_index: u64,
        snapshot_data: Vec<u8>,
        conf_state: ConfState,
    ) -> Result<()> {
        self.guard(|log| {
            if applied_index <= log.snapshot.index {
                return Ok(());
            }
            if applied_index > log.last() {
                return Err(RaftLogError::CompactBeyondLast {
                    index: applied_index,
                    last_index: log.last(),
                });
            }
            let meta = SnapshotMetadata {
                index: applied_index,
                term: log.locs[(applied_index - log.first()) as usize].term,
                conf_state: Some(conf_state).into(),
                ..SnapshotMetadata::default()
            };
            let old_snapshot = log.snapshot.index;
            write_snapshot_file(&log.dir, &meta, &snapshot_data)?;
            let (hs, cs) = (log.hard_state.clone(), log.conf_state.clone());
            log.rewrite(meta, hs, cs, applied_index + 1)?;
            log.remove_snapshot(old_snapshot);
            debug!(dir = %log.dir.display(), index = applied_index, "raft log compacted");
            Ok(())
        })
    }

    /// Writes the next generation of the log: a checkpoint, then the entries
    /// from `keep_from` on, fsynced and renamed into place; then switches to it.
    fn rewrite(
        &mut self,
        snapshot: SnapshotMetadata,
        hard_state: HardState,
        conf_state: ConfState,
        keep_from: u64,
    ) -> Result<()> {
        let skip = keep_from
            .saturating_sub(self.first())
            .min(self.locs.len() as u64) as usize;
        assert!(
            skip == self.locs.len() || keep_from == snapshot.index + 1,
            "entries kept by a rewrite must follow its snapshot"
        );
        let mut kept = Vec::with_capacity(self.locs.len() - skip);
        for (i, loc) in self.locs.iter().enumerate().skip(skip) {
            let index = self.first() + i as u64;
            kept.push((loc.term, self.read_payload(index, loc)?));
        }
        if self.generation >= INDEX_MAX {
            return Err(RaftLogError::IndexTooLarge {
                index: self.generation,
            });
        }
        let generation = self.generation + 1;
        let new = write_log_file(
            &self.dir,
            generation,
            &snapshot,
            &hard_state,
            &conf_state,
            &kept,
        )?;
        let old_path = std::mem::replace(&mut self.log_path, new.path);
        self.file = new.file;
        self.generation = generation;
        self.file_len = new.len;
        self.durable_len = new.len;
        self.snapshot = snapshot;
        self.hard_state = hard_state;
        self.conf_state = conf_state;
        self.locs = new.locs;
        self.entry_record_bytes = new.entry_record_bytes;
        // Open ignores and removes older generations, so a failure here only
        // leaves garbage for the next open.
        if let Err(e) = fs::remove_file(&old_path) {
            warn!(file = %old_path.display(), "removing a replaced raft log: {e}");
        }
        Ok(())
    }

    fn remove_snapshot(&self, index: u64) {
        if index == 0 || index == self.snapshot.index {
            return;
        }
        let path = snap_path(&self.dir, index);
        if let Err(e) = fs::remove_file(&path) {
            warn!(file = %path.display(), "removing a replaced raft snapshot: {e}");
        }
    }

    /// Reads and verifies one entry's record; returns the encoded entry.
    fn read_payload(&self, index: u64, loc: &EntryLoc) -> Result<Vec<u8>> {
        let mut buf = vec![0; loc.record_bytes() as usize];
        self.file
            .read_exact_at(&mut buf, loc.offset)
            .map_err(io_err("reading", &self.log_path))?;
        let corrupt = |reason: String| RaftLogError::Corrupt {
            path: self.log_path.clone(),
            offset: loc.offset,
            reason: format!("entry {index}: {reason}"),
        };
        let record = parse_record(&buf).map_err(corrupt)?;
        if record.kind != KIND_ENTRY || record.payload.len() != loc.payload_bytes as usize {
            return Err(corrupt(format!(
                "the record there is of kind {} with {} bytes, not the entry indexed at open",
                record.kind,
                record.payload.len()
            )));
        }
        buf.drain(..RECORD_HEADER_BYTES);
        Ok(buf)
    }

    fn read_entry(&self, index: u64, loc: &EntryLoc) -> Result<Entry> {
        let payload = self.read_payload(index, loc)?;
        let entry = Entry::parse_from_bytes(&payload).map_err(|e| RaftLogError::Corrupt {
            path: self.log_path.clone(),
            offset: loc.offset,
            reason: format!("entry {index} does not decode: {e}"),
        })?;
        if entry.index != index || entry.term != loc.term {
            return Err(RaftLogError::Corrupt {
                path: self.log_path.clone(),
                offset: loc.offset,
                reason: format!(
                    "expected entry {index} of term {}, found entry {} of term {}",
                    loc.term, entry.index, entry.term
                ),
            });
        }
        Ok(entry)
    }

    /// For tests: rewrite as soon as the file reaches `bytes`.
    #[cfg(test)]
    fn set_rewrite_bytes_min(&mut self, bytes: u64) {
        self.rewrite_bytes_min = bytes;
    }
}

impl Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if low >= high {
            return Ok(Vec::new());
        }
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let locs = &self.locs[(low - self.first()) as usize..(high - self.first()) as usize];
        // raft-rs's `limit_size`: the first entry always, then more while the
        // total stays within `max_size`.
        let mut total_bytes = 0u64;
        let count = locs
            .iter()
            .take_while(|loc| {
                let first = total_bytes == 0;
                total_bytes = total_bytes.saturating_add(u64::from(loc.payload_bytes));
                first || total_bytes <= max_size
            })
            .count();
        let mut entries = Vec::with_capacity(count);
        for (i, loc) in locs[..count].iter().enumerate() {
            entries.push(self.read_entry(low + i as u64, loc)?);
        }
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        if index < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.locs[(index - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // A snapshot is made only by `compact` (or received); raft asks again.
        if self.snapshot.index == 0 || self.snapshot.index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let path = snap_path(&self.dir, self.snapshot.index);
        let (metadata, data) = read_snapshot_file(&path, self.snapshot.index)?;
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(metadata);
        snapshot.data = data.into();
        Ok(snapshot)
    }
}

impl crate::node::LogStore for RaftLog {
    fn append(&mut self, entries: &[Entry]) -> Result<(), String> {
        RaftLog::append(self, entries).map_err(|e| e.to_string())
    }
    fn set_hard_state(&mut self, hs: HardState) -> Result<(), String> {
        RaftLog::set_hard_state(self, hs).map_err(|e| e.to_string())
    }
    fn set_conf_state(&mut self, cs: ConfState) -> Result<(), String> {
        RaftLog::set_conf_state(self, cs).map_err(|e| e.to_string())
    }
    fn sync(&mut self) -> Result<(), String> {
        RaftLog::sync(self).map_err(|e| e.to_string())
    }
    fn apply_snapshot(&mut self, snap: Snapshot) -> Result<(), String> {
        RaftLog::apply_snapshot(self, snap).map_err(|e| e.to_string())
    }
    fn compact(&mut self, index: u64, data: Vec<u8>, cs: ConfState) -> Result<(), String> {
        RaftLog::compact(self, index, data, cs).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    //! Round trips, reopen, compaction, received snapshots, torn tails at
    //! every byte, damage in the middle, leftovers of a crashed rewrite, a
    //! property test against raft-rs's `MemStorage`, a kill -9 test, and the
    //! node loop over the disk log.

    use super::format::LOG_HEADER_BYTES;
    use super::*;
    use proptest::prelude::*;
    use raft::storage::MemStorage;
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("command {index} of term {term}")
                .into_bytes()
                .into(),
            ..Entry::default()
        }
    }

    fn ents(indexes: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        indexes.map(|i| ent(i, term)).collect()
    }

    fn ctx() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    fn hard(term: u64, vote: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote,
            commit,
            ..HardState::default()
        }
    }

    fn voters(v: &[u64]) -> ConfState {
        ConfState {
            voters: v.to_vec(),
            ..ConfState::default()
        }
    }

    fn snapshot(index: u64, term: u64, cs: ConfState, data: &[u8]) -> Snapshot {
        let mut s = Snapshot::default();
        s.mut_metadata().index = index;
        s.mut_metadata().term = term;
        s.mut_metadata().set_conf_state(cs);
        s.data = data.to_vec().into();
        s
    }

    /// Everything `Storage` answers, for comparing a log before and after.
    #[derive(Debug, PartialEq)]
    struct Observed {
        hard_state: HardState,
        conf_state: ConfState,
        snapshot: Option<(SnapshotMetadata, Vec<u8>)>,
        first: u64,
        last: u64,
        terms: Vec<raft::Result<u64>>,
        entries: Vec<Entry>,
    }

    fn observe(log: &RaftLog) -> Observed {
        let state = log.initial_state().unwrap();
        let (first, last) = (log.first_index().unwrap(), log.last_index().unwrap());
        Observed {
            hard_state: state.hard_state,
            conf_state: state.conf_state,
            snapshot: match log.snapshot(0, 0) {
                Ok(s) => Some((s.get_metadata().clone(), s.data.to_vec())),
                Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)) => None,
                Err(e) => panic!("snapshot: {e}"),
            },
            first,
            last,
            terms: (first - 1..=last).map(|i| log.term(i)).collect(),
            entries: log.entries(first, last + 1, None, ctx()).unwrap(),
        }
    }

    fn reopen(log: RaftLog) -> RaftLog {
        let dir = log.dir().to_path_buf();
        drop(log);
        RaftLog::open(&dir).unwrap()
    }

    fn copy_dir(from: &Path, to: &Path) {
        for item in fs::read_dir(from).unwrap() {
            let item = item.unwrap();
            fs::copy(item.path(), to.join(item.file_name())).unwrap();
        }
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|i| i.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn flip_byte(path: &Path, offset: u64) {
        let mut bytes = fs::read(path).unwrap();
        bytes[offset as usize] ^= 0x5a;
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn raftlog_empty_log_answers_like_raft_expects() {
        let dir = tempfile::tempdir().unwrap();
        let log = RaftLog::open(&dir.path().join("raft")).unwrap();
        assert_eq!(log.first_index().unwrap(), 1);
        assert_eq!(log.last_index().unwrap(), 0);
        assert_eq!(log.term(0).unwrap(), 0);
        assert_eq!(
            log.term(1),
            Err(raft::Error::Store(StorageError::Unavailable))
        );
        assert!(log.entries(1, 1, None, ctx()).unwrap().is_empty());
        assert_eq!(
            log.snapshot(0, 2),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        );
        assert!(!log.initial_state().unwrap().initialized());
        assert_eq!(
            file_names(log.dir()),
            vec!["log-00000000000000000001.wal".to_string()]
        );
    }

    #[test]
    fn raftlog_append_term_entries_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        let model = MemStorage::new();
        let mut all = ents(1..=4, 1);
        all.extend(ents(5..=10, 2));
        log.append(&all[..4]).unwrap();
        log.append(&all[4..]).unwrap();
        model.wl().append(&all).unwrap();
        log.sync().unwrap();
        assert_eq!(log.first_index().unwrap(), 1);
        assert_eq!(log.last_index().unwrap(), 10);
        for i in 0..=11 {
            assert_eq!(log.term(i), model.term(i), "term({i})");
        }
        assert_eq!(log.entries(1, 11, None, ctx()).unwrap(), all);
        assert_eq!(log.entries(3, 7, None, ctx()).unwrap(), all[2..6].to_vec());
        // max_size: at least one entry, then as many as fit (raft-rs's limit_size).
        let one = u64::from(all[0].compute_size());
        for max in [0, one, 2 * one, 2 * one + 1, 3 * one, raft::NO_LIMIT] {
            assert_eq!(
                log.entries(1, 11, max, ctx()).unwrap(),
                model.entries(1, 11, max, ctx()).unwrap(),
                "max_size {max}"
            );
        }
        assert_eq!(
            log.entries(0, 5, None, ctx()),
            Err(raft::Error::Store(StorageError::Compacted))
        );
        assert_eq!(
            log.entries(5, 12, None, ctx()),
            Err(raft::Error::Store(StorageError::Unavailable))
        );
        assert!(log.entries(7, 7, None, ctx()).unwrap().is_empty());
    }

    #[test]
    fn raftlog_conflicting_suffix_is_truncated_and_bad_appends_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        log.append(&ents(1..=10, 1)).unwrap();
        log.append(&ents(6..=8, 2)).unwrap();
        assert_eq!(log.last_index().unwrap(), 8);
        assert_eq!(log.term(5).unwrap(), 1);
        assert_eq!(log.term(6).unwrap(), 2);
        assert_eq!(
            log.term(9),
            Err(raft::Error::Store(StorageError::Unavailable))
        );
        let mut expected = ents(1..=5, 1);
        expected.extend(ents(6..=8, 2));
        assert_eq!(log.entries(1, 9, None, ctx()).unwrap(), expected);
        // Refused requests change nothing and do not poison the log.
        assert!(matches!(
            log.append(&ents(10..=11, 2)),
            Err(RaftLogError::Gap {
                index: 10,
                last_index: 8
            })
        ));
        let mut holey = ents(9..=9, 2);
        holey.push(ent(11, 2));
        assert!(matches!(
            log.append(&holey),
            Err(RaftLogError::NotConsecutive {
                index: 11,
                previous: 9
            })
        ));
        assert!(matches!(
            log.append(&ents(0..=1, 2)),
            Err(RaftLogError::BeforeSnapshot { index: 0, .. })
        ));
        log.append(&ents(9..=9, 2)).unwrap();
        expected.push(ent(9, 2));
        log.sync().unwrap();
        let log = reopen(log);
        assert_eq!(log.entries(1, 10, None, ctx()).unwrap(), expected);
    }

    #[test]
    fn raftlog_reopen_gives_identical_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        log.apply_snapshot(snapshot(3, 1, voters(&[1, 2, 3]), b"bootstrap"))
            .unwrap();
        log.append(&ents(4..=20, 2)).unwrap();
        log.set_hard_state(hard(2, 1, 15)).unwrap();
        log.set_conf_state(voters(&[1, 2, 3, 4])).unwrap();
        log.append(&ents(18..=22, 3)).unwrap();
        log.set_hard_state(hard(3, 2, 19)).unwrap();
        log.sync().unwrap();
        let before = observe(&log);
        assert_eq!(before.snapshot.as_ref().unwrap().1, b"bootstrap");
        let log = reopen(log);
        assert_eq!(observe(&log), before);
        // And once more, after writing on the reopened log.
        let mut log = log;
        log.append(&ents(23..=23, 3)).unwrap();
        log.sync().unwrap();
        let before = observe(&log);
        assert_eq!(observe(&reopen(log)), before);
    }

    #[test]
    fn raftlog_compaction_then_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        log.append(&ents(1..=50, 1)).unwrap();
        log.append(&ents(51..=100, 2)).unwrap();
        log.set_hard_state(hard(2, 1, 95)).unwrap();
        log.set_conf_state(voters(&[1, 2, 3])).unwrap();
        log.compact(60, b"machine at 60".to_vec(), voters(&[1, 2]))
            .unwrap();
        assert_eq!(log.first_index().unwrap(), 61);
        assert_eq!(log.last_index().unwrap(), 100);
        assert_eq!(log.term(60).unwrap(), 2);
        assert_eq!(
            log.term(59),
            Err(raft::Error::Store(StorageError::Compacted))
        );
        assert_eq!(
            log.entries(60, 62, None, ctx()),
            Err(raft::Error::Store(StorageError::Compacted))
        );
        assert_eq!(
            log.entries(61, 101, None, ctx()).unwrap(),
            ents(61..=100, 2)
        );
        let snap = log.snapshot(0, 2).unwrap();
        assert_eq!(
            (snap.get_metadata().index, snap.get_metadata().term),
            (60, 2)
        );
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2]);
        assert_eq!(&snap.data[..], b"machine at 60");
        assert_eq!(
            log.snapshot(61, 2),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        );
        // The current conf state and hard state are untouched.
        assert_eq!(log.conf_state().voters, vec![1, 2, 3]);
        assert_eq!(log.hard_state(), &hard(2, 1, 95));
        let before = observe(&log);
        let mut log = reopen(log);
        assert_eq!(observe(&log), before);

        // Again: the old snapshot and log generation go away.
        log.compact(100, b"machine at 100".to_vec(), voters(&[1, 2, 3]))
            .unwrap();
        assert_eq!(
            file_names(dir.path()),
            vec![
                "log-00000000000000000003.wal".to_string(),
                "snap-00000000000000000100.snap".to_string()
            ]
        );
        assert_eq!(log.first_index().unwrap(), 101);
        assert_eq!(log.last_index().unwrap(), 100);
        // Older than the snapshot: nothing to do. Beyond the log: refused.
        log.compact(80, b"old".to_vec(), voters(&[1])).unwrap();
        assert!(matches!(
            log.compact(101, Vec::new(), voters(&[1])),
            Err(RaftLogError::CompactBeyondLast {
                index: 101,
                last_index: 100
            })
        ));
        log.append(&ents(101..=105, 3)).unwrap();
        log.sync().unwrap();
        let before = observe(&log);
        assert_eq!(observe(&reopen(log)), before);
    }

    #[test]
    fn raftlog_apply_snapshot_then_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        log.append(&ents(1..=10, 1)).unwrap();
        log.set_hard_state(hard(4, 2, 8)).unwrap();
        log.set_conf_state(voters(&[1, 2])).unwrap();
        log.apply_snapshot(snapshot(20, 3, voters(&[1, 2, 3]), b"from the leader"))
            .unwrap();
        assert_eq!(log.first_index().unwrap(), 21);
        assert_eq!(log.last_index().unwrap(), 20);
        assert_eq!(log.term(20).unwrap(), 3);
        // The vote stays; the term never goes back; commit is the snapshot's.
        assert_eq!(log.hard_state(), &hard(4, 2, 20));
        assert_eq!(log.conf_state().voters, vec![1, 2, 3]);
        assert!(matches!(
            log.apply_snapshot(snapshot(20, 3, voters(&[1]), b"")),
            Err(RaftLogError::SnapshotOutOfDate {
                index: 20,
                first_index: 21
            })
        ));
        let before = observe(&log);
        let mut log = reopen(log);
        assert_eq!(observe(&log), before);
        log.append(&ents(21..=25, 5)).unwrap();
        log.sync().unwrap();
        // A snapshot inside the log's range also replaces all of it.
        log.apply_snapshot(snapshot(23, 5, voters(&[1, 2, 3]), b"at 23"))
            .unwrap();
        assert_eq!(log.last_index().unwrap(), 23);
        let before = observe(&log);
        assert_eq!(observe(&reopen(log)), before);
        assert_eq!(
            file_names(dir.path()),
            vec![
                "log-00000000000000000003.wal".to_string(),
                "snap-00000000000000000023.snap".to_string()
            ]
        );
    }

    /// A log whose last record is `ent(last, 2)`, written as its own synced
    /// batch. Returns the state before that record and its byte range.
    fn log_with_last_record(dir: &Path, compact_first: bool) -> (Observed, u64, u64) {
        let mut log = RaftLog::open(dir).unwrap();
        for i in 1..=5 {
            log.append(&ents(i * 10 - 9..=i * 10, 1)).unwrap();
            log.set_hard_state(hard(1, 1, i * 10 - 5)).unwrap();
            log.sync().unwrap();
        }
        if compact_first {
            log.compact(45, b"machine".to_vec(), voters(&[1])).unwrap();
        }
        let before = observe(&log);
        let start = fs::metadata(log.log_path()).unwrap().len();
        log.append(&ents(51..=51, 2)).unwrap();
        log.sync().unwrap();
        let end = fs::metadata(log.log_path()).unwrap().len();
        (before, start, end)
    }

    #[test]
    fn raftlog_torn_tail_at_every_byte_is_truncated() {
        for compact_first in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (before, start, end) = log_with_last_record(dir.path(), compact_first);
            let log_file = file_names(dir.path())
                .into_iter()
                .find(|n| n.ends_with(".wal"))
                .unwrap();
            for cut in start..end {
                let copy = tempfile::tempdir().unwrap();
                copy_dir(dir.path(), copy.path());
                let path = copy.path().join(&log_file);
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_len(cut)
                    .unwrap();
                let mut log =
                    RaftLog::open(copy.path()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
                assert_eq!(observe(&log), before, "cut at {cut}");
                assert_eq!(fs::metadata(&path).unwrap().len(), start, "cut at {cut}");
                // The recovered log takes new records and keeps them.
                log.append(&ents(51..=51, 3)).unwrap();
                log.sync().unwrap();
                let log = reopen(log);
                assert_eq!(log.term(51).unwrap(), 3, "cut at {cut}");
            }
        }
    }

    #[test]
    fn raftlog_flipped_byte_in_last_record_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (before, start, end) = log_with_last_record(dir.path(), false);
        for offset in start..end {
            let copy = tempfile::tempdir().unwrap();
            copy_dir(dir.path(), copy.path());
            flip_byte(&copy.path().join("log-00000000000000000001.wal"), offset);
            let log =
                RaftLog::open(copy.path()).unwrap_or_else(|e| panic!("flip at {offset}: {e}"));
            assert_eq!(observe(&log), before, "flip at {offset}");
        }
    }

    #[test]
    fn raftlog_damage_in_the_middle_is_an_error_naming_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _, _) = log_with_last_record(dir.path(), false);
        // The second record (entry 1, after the checkpoint): synced long ago,
        // followed by many records written after later syncs.
        let path = dir.path().join("log-00000000000000000001.wal");
        let bytes = fs::read(&path).unwrap();
        let checkpoint = parse_record(&bytes[LOG_HEADER_BYTES..]).unwrap().bytes;
        let offset = (LOG_HEADER_BYTES + checkpoint) as u64;
        for damage in [offset + 30, offset + 2] {
            let copy = tempfile::tempdir().unwrap();
            copy_dir(dir.path(), copy.path());
            let copied = copy.path().join("log-00000000000000000001.wal");
            flip_byte(&copied, damage);
            let err = RaftLog::open(copy.path()).unwrap_err();
            match &err {
                RaftLogError::Corrupt {
                    path, offset: at, ..
                } => {
                    assert_eq!(path, &copied);
                    assert_eq!(*at, offset);
                }
                other => panic!("expected Corrupt, got {other:?}"),
            }
            let message = err.to_string();
            assert!(
                message.contains("log-00000000000000000001.wal"),
                "{message}"
            );
            assert!(message.contains(&format!("offset {offset}")), "{message}");
            // The file is left as it was for whoever investigates.
            assert_eq!(fs::read(&copied).unwrap().len(), bytes.len());
        }
    }

    #[test]
    fn raftlog_unsynced_batch_torn_out_of_order_is_truncated() {
        // Power loss may persist later pages of an unsynced write and not
        // earlier ones: a bad record followed by good ones of the same batch.
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        log.append(&ents(1..=5, 1)).unwrap();
        log.sync().unwrap();
        let before = observe(&log);
        let start = fs::metadata(log.log_path()).unwrap().len();
        log.append(&ents(6..=8, 1)).unwrap();
        log.set_hard_state(hard(1, 0, 7)).unwrap();
        let path = log.log_path().to_path_buf();
        drop(log); // no sync
        flip_byte(&path, start + 40);
        let log = RaftLog::open(dir.path()).unwrap();
        assert_eq!(observe(&log), before);
    }

    #[test]
    fn raftlog_damage_inside_a_rewritten_file_is_an_error() {
        // Entries copied by a compaction were synced before the file got its
        // name: damage to the last of them is not a torn tail.
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        log.append(&ents(1..=10, 1)).unwrap();
        log.compact(7, b"m".to_vec(), voters(&[1])).unwrap();
        let path = log.log_path().to_path_buf();
        let last = log.locs[2];
        drop(log);
        flip_byte(&path, last.offset + 30);
        match RaftLog::open(dir.path()) {
            Err(RaftLogError::Corrupt { offset, .. }) => assert_eq!(offset, last.offset),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn raftlog_bad_or_missing_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        log.append(&ents(1..=10, 1)).unwrap();
        log.compact(5, b"machine".to_vec(), voters(&[1])).unwrap();
        drop(log);
        let log_file = "log-00000000000000000002.wal";
        let snap_file = "snap-00000000000000000005.snap";
        let with = |damage: &dyn Fn(&Path)| {
            let copy = tempfile::tempdir().unwrap();
            copy_dir(dir.path(), copy.path());
            damage(copy.path());
            RaftLog::open(copy.path()).map(|_| ()).unwrap_err()
        };
        let err = with(&|d| flip_byte(&d.join(log_file), 3));
        assert!(
            matches!(err, RaftLogError::Corrupt { offset: 0, .. }),
            "{err}"
        );
        let err = with(&|d| {
            let mut b = fs::read(d.join(log_file)).unwrap();
            b.truncate(20);
            fs::write(d.join(log_file), b).unwrap();
        });
        assert!(
            matches!(err, RaftLogError::Corrupt { offset: 0, .. }),
            "{err}"
        );
        let err = with(&|d| flip_byte(&d.join(log_file), LOG_HEADER_BYTES as u64 + 30));
        assert!(
            matches!(err, RaftLogError::Corrupt { offset: 32, .. }),
            "{err}"
        );
        let err = with(&|d| {
            let mut b = fs::read(d.join(log_file)).unwrap();
            b[8..12].copy_from_slice(&2u32.to_le_bytes());
            let crc = crc32fast::hash(&b[0..24]);
            b[24..28].copy_from_slice(&crc.to_le_bytes());
            fs::write(d.join(log_file), b).unwrap();
        });
        assert!(
            matches!(err, RaftLogError::Version { found: 2, .. }),
            "{err}"
        );
        let err = with(&|d| flip_byte(&d.join(snap_file), 30));
        assert!(matches!(err, RaftLogError::SnapshotCorrupt { .. }), "{err}");
        assert!(err.to_string().contains(snap_file), "{err}");
        let err = with(&|d| fs::remove_file(d.join(snap_file)).unwrap());
        assert!(matches!(err, RaftLogError::Missing { .. }), "{err}");
        let err = with(&|d| fs::remove_file(d.join(log_file)).unwrap());
        assert!(matches!(err, RaftLogError::Missing { .. }), "{err}");
        // A log file renamed to another generation.
        let err = with(&|d| {
            fs::rename(d.join(log_file), d.join("log-00000000000000000009.wal")).unwrap()
        });
        assert!(
            matches!(err, RaftLogError::Corrupt { offset: 16, .. }),
            "{err}"
        );
    }

    #[test]
    fn raftlog_leftovers_of_a_crashed_rewrite_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        log.append(&ents(1..=30, 1)).unwrap();
        log.compact(10, b"at 10".to_vec(), voters(&[1])).unwrap();
        let saved = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), saved.path()); // generation 2, snapshot 10

        // A crash after the new snapshot was renamed into place, before the
        // new log was: the old log still names the old snapshot.
        log.compact(20, b"at 20".to_vec(), voters(&[1])).unwrap();
        let crashed = tempfile::tempdir().unwrap();
        copy_dir(saved.path(), crashed.path());
        fs::copy(
            dir.path().join("snap-00000000000000000020.snap"),
            crashed.path().join("snap-00000000000000000020.snap"),
        )
        .unwrap();
        fs::write(
            crashed.path().join("log-00000000000000000003.wal.tmp"),
            b"half",
        )
        .unwrap();
        let log2 = RaftLog::open(crashed.path()).unwrap();
        assert_eq!(log2.snapshot_metadata().index, 10);
        assert_eq!(log2.last_index().unwrap(), 30);
        assert_eq!(
            file_names(crashed.path()),
            vec![
                "log-00000000000000000002.wal".to_string(),
                "snap-00000000000000000010.snap".to_string()
            ]
        );

        // A crash after the new log's rename, before the old files were
        // removed.
        let before = observe(&log);
        drop(log);
        copy_dir(saved.path(), dir.path());
        fs::write(dir.path().join("snap-00000000000000000040.snap.tmp"), b"x").unwrap();
        let log = RaftLog::open(dir.path()).unwrap();
        assert_eq!(observe(&log), before);
        assert_eq!(
            file_names(dir.path()),
            vec![
                "log-00000000000000000003.wal".to_string(),
                "snap-00000000000000000020.snap".to_string()
            ]
        );
    }

    #[test]
    fn raftlog_bloated_log_is_rewritten_by_sync() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        log.set_rewrite_bytes_min(16 << 10);
        log.append(&ents(1..=20, 1)).unwrap();
        for commit in 1..=2000 {
            log.set_hard_state(hard(1, 1, commit % 20)).unwrap();
        }
        let bloated = fs::metadata(log.log_path()).unwrap().len();
        log.sync().unwrap();
        assert_eq!(log.generation, 2);
        let rewritten = fs::metadata(log.log_path()).unwrap().len();
        assert!(rewritten * 10 < bloated, "{rewritten} vs {bloated}");
        let before = observe(&log);
        assert_eq!(observe(&reopen(log)), before);
        assert_eq!(file_names(dir.path()).len(), 1);
    }

    // -----------------------------------------------------------------------
    // The property test: the disk log answers like raft-rs's MemStorage.

    #[derive(Debug, Clone)]
    enum Op {
        /// Append `count` entries of `term`, starting `back` entries before the end.
        Append {
            back: u64,
            count: u64,
            term: u64,
        },
        HardState {
            term: u64,
            vote: u64,
            commit_back: u64,
        },
        ConfState(Vec<u64>),
        /// Compact at `back` entries before the last.
        Compact {
            back: u64,
            data: Vec<u8>,
        },
        /// Install a snapshot `ahead` entries past the first index.
        ApplySnapshot {
            ahead: u64,
            term: u64,
            voters: Vec<u64>,
            data: Vec<u8>,
        },
        Sync,
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..5u64, 1..6u64, 1..6u64)
                .prop_map(|(back, count, term)| Op::Append { back, count, term }),
            2 => (1..6u64, 0..4u64, 0..8u64)
                .prop_map(|(term, vote, commit_back)| Op::HardState { term, vote, commit_back }),
            1 => prop::collection::vec(1..6u64, 0..4).prop_map(Op::ConfState),
            1 => (0..8u64, prop::collection::vec(any::<u8>(), 0..48))
                .prop_map(|(back, data)| Op::Compact { back, data }),
            1 => (
                0..16u64,
                1..8u64,
                prop::collection::vec(1..6u64, 1..4),
                prop::collection::vec(any::<u8>(), 0..48)
            )
                .prop_map(|(ahead, term, voters, data)| Op::ApplySnapshot { ahead, term, voters, data }),
            2 => Just(Op::Sync),
            2 => Just(Op::Reopen),
        ]
    }

    struct Model {
        mem: MemStorage,
        /// `MemStorage::snapshot` makes up a snapshot at the commit index; a
        /// real store returns the last one it stored.
        snapshot: Option<(SnapshotMetadata, Vec<u8>)>,
    }

    impl Model {
        fn bounds(&self) -> (u64, u64) {
            (
                self.mem.first_index().unwrap(),
                self.mem.last_index().unwrap(),
            )
        }
    }

    fn step(log: &mut RaftLog, model: &mut Model, op: &Op) {
        let (first, last) = model.bounds();
        match op {
            Op::Append { back, count, term } => {
                let start = last + 1 - (*back).min(last + 1 - first);
                let new = ents(start..=start + count - 1, *term);
                model.mem.wl().append(&new).unwrap();
                log.append(&new).unwrap();
            }
            Op::HardState {
                term,
                vote,
                commit_back,
            } => {
                let hs = hard(*term, *vote, last - (*commit_back).min(last));
                model.mem.wl().set_hardstate(hs.clone());
                log.set_hard_state(hs).unwrap();
            }
            Op::ConfState(v) => {
                model.mem.wl().set_conf_state(voters(v));
                log.set_conf_state(voters(v)).unwrap();
            }
            Op::Compact { back, data } => {
                let cs = model.mem.initial_state().unwrap().conf_state;
                if last < first {
                    // Nothing after the snapshot: a no-op.
                    log.compact(first - 1, data.clone(), cs).unwrap();
                    return;
                }
                let index = last - (*back).min(last - first);
                let term = model.mem.term(index).unwrap();
                let kept = model.mem.entries(index + 1, last + 1, None, ctx());
                let kept = kept.unwrap_or_default();
                let state = model.mem.initial_state().unwrap();
                let snap = snapshot(index, term, cs.clone(), data);
                let mut core = model.mem.wl();
                core.apply_snapshot(snap.clone()).unwrap();
                core.append(&kept).unwrap();
                core.set_hardstate(state.hard_state);
                core.set_conf_state(state.conf_state);
                drop(core);
                model.snapshot = Some((snap.get_metadata().clone(), data.clone()));
                log.compact(index, data.clone(), cs).unwrap();
            }
            Op::ApplySnapshot {
                ahead,
                term,
                voters: v,
                data,
            } => {
                let snap = snapshot(first + ahead, *term, voters(v), data);
                model.mem.wl().apply_snapshot(snap.clone()).unwrap();
                model.snapshot = Some((snap.get_metadata().clone(), data.clone()));
                log.apply_snapshot(snap).unwrap();
            }
            Op::Sync => log.sync().unwrap(),
            Op::Reopen => {
                // The old handle closes after the new open, as after a crash
                // nothing of it matters: every write already reached the file.
                let dir = log.dir().to_path_buf();
                *log = RaftLog::open(&dir).unwrap();
            }
        }
    }

    fn same_answers(log: &RaftLog, model: &Model) -> std::result::Result<(), TestCaseError> {
        let (mine, theirs) = (
            log.initial_state().unwrap(),
            model.mem.initial_state().unwrap(),
        );
        prop_assert_eq!(mine.hard_state, theirs.hard_state);
        prop_assert_eq!(mine.conf_state, theirs.conf_state);
        let (first, last) = model.bounds();
        prop_assert_eq!(log.first_index().unwrap(), first);
        prop_assert_eq!(log.last_index().unwrap(), last);
        for i in first.saturating_sub(2)..=last + 2 {
            prop_assert_eq!(log.term(i), model.mem.term(i), "term({})", i);
        }
        let sizes = [None, Some(0), Some(70), Some(150)];
        for low in first.saturating_sub(1).max(1)..=last {
            for high in [low + 1, (low + 3).min(last + 1), last + 1] {
                for max in sizes {
                    prop_assert_eq!(
                        log.entries(low, high, max, ctx()),
                        model.mem.entries(low, high, max, ctx()),
                        "entries({}, {}, {:?})",
                        low,
                        high,
                        max
                    );
                }
            }
        }
        let snap = match log.snapshot(0, 0) {
            Ok(s) => Some((s.get_metadata().clone(), s.data.to_vec())),
            Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)) => None,
            Err(e) => return Err(TestCaseError::fail(format!("snapshot: {e}"))),
        };
        prop_assert_eq!(&snap, &model.snapshot);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn raftlog_matches_mem_storage(ops in prop::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut log = RaftLog::open(dir.path()).unwrap();
            let mut model = Model { mem: MemStorage::new(), snapshot: None };
            for op in &ops {
                step(&mut log, &mut model, op);
                same_answers(&log, &model)?;
            }
            // Whatever happened, a final reopen changes nothing.
            step(&mut log, &mut model, &Op::Reopen);
            same_answers(&log, &model)?;
        }
    }

    // -----------------------------------------------------------------------
    // kill -9: a child appends and syncs in a loop and reports each synced
    // index; after SIGKILL every reported index must be there.

    const KILL9_DIR_ENV: &str = "CAIRN_RAFTLOG_KILL9_DIR";

    #[test]
    #[ignore = "the child process of raftlog_kill9_keeps_every_synced_entry"]
    fn raftlog_kill9_child() {
        let Some(dir) = std::env::var_os(KILL9_DIR_ENV) else {
            return;
        };
        let mut log = RaftLog::open(Path::new(&dir)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let next = log.last_index().unwrap() + 1;
            let last = next + 2;
            log.append(&ents(next..=last, 1)).unwrap();
            log.set_hard_state(hard(1, 1, last)).unwrap();
            log.sync().unwrap();
            println!("SYNCED {last}");
            if last % 60 < 3 {
                log.compact(last - 10, last.to_le_bytes().to_vec(), voters(&[1]))
                    .unwrap();
            }
        }
    }

    #[test]
    fn raftlog_kill9_keeps_every_synced_entry() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut synced_max = 0u64;
        for round in 0..6u64 {
            let mut child = Command::new(&exe)
                .args(["raftlog::tests::raftlog_kill9_child", "--exact"])
                .args(["--ignored", "--nocapture", "--test-threads=1"])
                .env(KILL9_DIR_ENV, dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // Read on a thread, so the child never blocks on a full pipe and
            // the kill lands wherever it happens to be: appending, syncing,
            // compacting.
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let reader = std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let line = line.unwrap();
                    if let Some(n) = line.strip_prefix("SYNCED ") {
                        let _ = tx.send(n.parse::<u64>().unwrap());
                    }
                }
            });
            for _ in 0..20 {
                let n = rx
                    .recv_timeout(Duration::from_secs(10))
                    .expect("the child reports");
                synced_max = synced_max.max(n);
            }
            std::thread::sleep(Duration::from_micros(500 + round * 1700));
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            reader.join().unwrap();
            // What it reported before dying counts too.
            synced_max = rx.try_iter().fold(synced_max, u64::max);

            let log = RaftLog::open(dir.path()).unwrap();
            let (first, last) = (log.first_index().unwrap(), log.last_index().unwrap());
            assert!(
                last >= synced_max,
                "round {round}: last {last} < synced {synced_max}"
            );
            assert!(log.hard_state().commit >= synced_max, "round {round}");
            assert!(
                first <= synced_max,
                "round {round}: compacted past what was synced"
            );
            assert_eq!(
                log.entries(first, last + 1, None, ctx()).unwrap(),
                ents(first..=last, 1),
                "round {round}"
            );
            if log.snapshot_metadata().index > 0 {
                let snap = log.snapshot(0, 0).unwrap();
                let index = snap.get_metadata().index;
                assert_eq!(&snap.data[..], &(index + 10).to_le_bytes()[..]);
            }
        }
    }

    // -----------------------------------------------------------------------
    // The node loop over the disk log: a one-member cluster takes commands,
    // restarts from its directory and still has them.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raftlog_under_the_node_loop_survives_restart() {
        use crate::node::{self, NodeHandle, Transport};
        use crate::testing::ListMachine;

        struct NoPeers;
        impl Transport for NoPeers {
            fn send(&mut self, _: Vec<raft::prelude::Message>) {}
            fn set_members(&mut self, _: &BTreeMap<u64, String>) {}
        }

        async fn leading(h: &NodeHandle<ListMachine>) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !h.status().borrow().is_leader {
                assert!(Instant::now() < deadline, "no leader in 10 s");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        let dir = tempfile::tempdir().unwrap();
        let members: BTreeMap<u64, String> = [(1, "m1".to_string())].into();
        let mut log = RaftLog::open(dir.path()).unwrap();
        let data = node::bootstrap_snapshot(&members, &ListMachine::default());
        log.apply_snapshot(snapshot(1, 1, voters(&[1]), &data))
            .unwrap();
        let h = node::start(1, log, ListMachine::default(), |_| NoPeers).unwrap();
        leading(&h).await;
        for i in 0..20u8 {
            h.propose(vec![i]).await.unwrap();
        }
        h.stop();

        let log = RaftLog::open(dir.path()).unwrap();
        assert!(log.last_index().unwrap() >= 21);
        let h = node::start(1, log, ListMachine::default(), |_| NoPeers).unwrap();
        leading(&h).await;
        let commands = h.read(|m| m.0.clone()).await.unwrap();
        assert_eq!(commands, (0..20u8).map(|i| vec![i]).collect::<Vec<_>>());
        h.stop();
    }
}
