//! The raft log's files: record framing and checksums, the log and snapshot
//! headers, writing a log generation or a snapshot durably, and replaying a
//! log file after a crash (torn tail or damage). The format and the crash
//! argument are documented on the parent module, [`super`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, SnapshotMetadata};
use tracing::warn;

use super::{
    RaftLogError, Result, FORMAT_VERSION, INDEX_MAX, RECORD_PAYLOAD_BYTES_MAX, SNAPSHOT_BYTES_MAX,
};

const LOG_MAGIC: [u8; 8] = *b"CAIRNRLG";
const SNAP_MAGIC: [u8; 8] = *b"CAIRNSNP";
const RECORD_MAGIC: u32 = 0x4752_4e43;
pub(super) const LOG_HEADER_BYTES: usize = 32;
pub(super) const RECORD_HEADER_BYTES: usize = 24;
const SNAP_HEADER_BYTES: usize = 24;

const KIND_CHECKPOINT: u8 = 1;
pub(super) const KIND_ENTRY: u8 = 2;
pub(super) const KIND_HARD_STATE: u8 = 3;
pub(super) const KIND_CONF_STATE: u8 = 4;

pub(super) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> RaftLogError + 'a {
    move |source| RaftLogError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Where one live entry's record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct EntryLoc {
    pub(super) term: u64,
    pub(super) offset: u64,
    /// The encoded entry's size: its `compute_size()`, which raft's
    /// `max_size` limits count.
    pub(super) payload_bytes: u32,
}

impl EntryLoc {
    pub(super) fn record_bytes(&self) -> u64 {
        RECORD_HEADER_BYTES as u64 + u64::from(self.payload_bytes)
    }
}

fn log_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("log-{generation:020}.wal"))
}

pub(super) fn snap_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("snap-{index:020}.snap"))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// The files of a raft directory, sorted by generation and index.
pub(super) struct Listing {
    pub(super) logs: Vec<(u64, PathBuf)>,
    pub(super) snaps: Vec<(u64, PathBuf)>,
    pub(super) tmps: Vec<PathBuf>,
}

impl Listing {
    pub(super) fn read(dir: &Path) -> Result<Listing> {
        let mut listing = Listing {
            logs: Vec::new(),
            snaps: Vec::new(),
            tmps: Vec::new(),
        };
        for item in fs::read_dir(dir).map_err(io_err("listing", dir))? {
            let path = item.map_err(io_err("listing", dir))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                warn!(file = %path.display(), "ignoring an unexpected file in the raft directory");
                continue;
            };
            let number = |prefix: &str, suffix: &str| {
                name.strip_prefix(prefix)
                    .and_then(|n| n.strip_suffix(suffix))
                    .filter(|n| n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|n| n.parse::<u64>().ok())
            };
            if name.ends_with(".tmp") {
                listing.tmps.push(path);
            } else if let Some(generation) = number("log-", ".wal") {
                listing.logs.push((generation, path));
            } else if let Some(index) = number("snap-", ".snap") {
                listing.snaps.push((index, path));
            } else {
                warn!(file = %path.display(), "ignoring an unexpected file in the raft directory");
            }
        }
        listing.logs.sort();
        listing.snaps.sort();
        Ok(listing)
    }
}

pub(super) fn encode(message: &impl protobuf::Message, what: &'static str) -> Result<Vec<u8>> {
    message.write_to_bytes().map_err(|e| RaftLogError::Encode {
        what,
        reason: e.to_string(),
    })
}

pub(super) fn push_record(buf: &mut Vec<u8>, kind: u8, durable_before: u64, payload: &[u8]) {
    assert!(payload.len() <= RECORD_PAYLOAD_BYTES_MAX);
    let start = buf.len();
    buf.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    buf.extend_from_slice(&[0; 4]); // the CRC, below
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&[kind, 0, 0, 0]);
    buf.extend_from_slice(&durable_before.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

pub(super) struct RecordView<'a> {
    pub(super) kind: u8,
    pub(super) durable_before: u64,
    pub(super) payload: &'a [u8],
    /// Header and payload.
    pub(super) bytes: usize,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks the framing and checksum of the record at the start of `buf`.
pub(super) fn parse_record(buf: &[u8]) -> Result<RecordView<'_>, String> {
    if buf.len() < RECORD_HEADER_BYTES {
        return Err(format!(
            "a record header needs {RECORD_HEADER_BYTES} bytes, {} remain",
            buf.len()
        ));
    }
    let magic = le_u32(buf, 0);
    if magic != RECORD_MAGIC {
        return Err(format!("bad record magic {magic:#010x}"));
    }
    let payload_bytes = le_u32(buf, 8) as usize;
    if payload_bytes > RECORD_PAYLOAD_BYTES_MAX {
        return Err(format!("record length {payload_bytes} is beyond the limit"));
    }
    let bytes = RECORD_HEADER_BYTES + payload_bytes;
    if buf.len() < bytes {
        return Err(format!(
            "a record of {bytes} bytes, {} remain in the file",
            buf.len()
        ));
    }
    let crc = crc32fast::hash(&buf[8..bytes]);
    if crc != le_u32(buf, 4) {
        return Err(format!(
            "record checksum mismatch (stored {:#010x}, computed {crc:#010x})",
            le_u32(buf, 4)
        ));
    }
    Ok(RecordView {
        kind: buf[12],
        durable_before: le_u64(buf, 16),
        payload: &buf[RECORD_HEADER_BYTES..bytes],
        bytes,
    })
}

struct Checkpoint {
    durable_len: u64,
    snapshot: SnapshotMetadata,
    hard_state: HardState,
    conf_state: ConfState,
}

fn encode_checkpoint(
    durable_len: u64,
    snapshot: &SnapshotMetadata,
    hard_state: &HardState,
    conf_state: &ConfState,
) -> Result<Vec<u8>> {
    let mut payload = durable_len.to_le_bytes().to_vec();
    for part in [
        encode(snapshot, "the snapshot metadata")?,
        encode(hard_state, "the hard state")?,
        encode(conf_state, "the conf state")?,
    ] {
        payload.extend_from_slice(&(part.len() as u32).to_le_bytes());
        payload.extend_from_slice(&part);
    }
    Ok(payload)
}

fn decode_checkpoint(payload: &[u8]) -> Result<Checkpoint, String> {
    fn part<'a>(rest: &mut &'a [u8], what: &str) -> Result<&'a [u8], String> {
        if rest.len() < 4 {
            return Err(format!("checkpoint ends before the {what}"));
        }
        let len = le_u32(rest, 0) as usize;
        if rest.len() - 4 < len {
            return Err(format!("checkpoint ends inside the {what}"));
        }
        let bytes = &rest[4..4 + len];
        *rest = &rest[4 + len..];
        Ok(bytes)
    }
    if payload.len() < 8 {
        return Err("checkpoint shorter than 8 bytes".into());
    }
    let mut rest = &payload[8..];
    let snapshot = SnapshotMetadata::parse_from_bytes(part(&mut rest, "snapshot metadata")?)
        .map_err(|e| format!("checkpoint snapshot metadata: {e}"))?;
    let hard_state = HardState::parse_from_bytes(part(&mut rest, "hard state")?)
        .map_err(|e| format!("checkpoint hard state: {e}"))?;
    let conf_state = ConfState::parse_from_bytes(part(&mut rest, "conf state")?)
        .map_err(|e| format!("checkpoint conf state: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the checkpoint", rest.len()));
    }
    if snapshot.index > INDEX_MAX {
        return Err(format!(
            "snapshot index {} beyond the limit",
            snapshot.index
        ));
    }
    Ok(Checkpoint {
        durable_len: le_u64(payload, 0),
        snapshot,
        hard_state,
        conf_state,
    })
}

fn log_header(generation: u64) -> [u8; LOG_HEADER_BYTES] {
    let mut h = [0u8; LOG_HEADER_BYTES];
    h[0..8].copy_from_slice(&LOG_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32fast::hash(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A log file just written and renamed into place.
pub(super) struct NewLog {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) len: u64,
    pub(super) locs: Vec<EntryLoc>,
    pub(super) entry_record_bytes: u64,
}

/// Writes log generation `generation` holding a checkpoint and `entries`
/// (term, encoded entry; following the snapshot), durably: tmp, fsync, rename,
/// fsync the directory.
pub(super) fn write_log_file(
    dir: &Path,
    generation: u64,
    snapshot: &SnapshotMetadata,
    hard_state: &HardState,
    conf_state: &ConfState,
    entries: &[(u64, Vec<u8>)],
) -> Result<NewLog> {
    // Records in a file synced before its rename claim nothing
    // (`durable_before` 0): the checkpoint's `durable_len` covers them.
    let mut body = Vec::new();
    let mut rel = Vec::with_capacity(entries.len());
    for (term, payload) in entries {
        rel.push((*term, body.len() as u64, payload.len() as u32));
        push_record(&mut body, KIND_ENTRY, 0, payload);
    }
    let checkpoint_bytes =
        RECORD_HEADER_BYTES + encode_checkpoint(0, snapshot, hard_state, conf_state)?.len();
    let base = (LOG_HEADER_BYTES + checkpoint_bytes) as u64;
    let len = base + body.len() as u64;
    let mut buf = Vec::with_capacity(len as usize);
    buf.extend_from_slice(&log_header(generation));
    let checkpoint = encode_checkpoint(len, snapshot, hard_state, conf_state)?;
    push_record(&mut buf, KIND_CHECKPOINT, 0, &checkpoint);
    assert_eq!(buf.len() as u64, base);
    buf.extend_from_slice(&body);

    let path = log_path(dir, generation);
    let tmp = tmp_path(&path);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    file.write_all(&buf).map_err(io_err("writing", &tmp))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_err("renaming into place", &tmp))?;
    sync_dir(dir)?;
    let locs: Vec<EntryLoc> = rel
        .into_iter()
        .map(|(term, offset, payload_bytes)| EntryLoc {
            term,
            offset: base + offset,
            payload_bytes,
        })
        .collect();
    Ok(NewLog {
        file,
        path,
        len,
        entry_record_bytes: locs.iter().map(EntryLoc::record_bytes).sum(),
        locs,
    })
}

/// The state a log file holds, and how much of it is valid.
pub(super) struct Replayed {
    pub(super) valid_len: u64,
    pub(super) snapshot: SnapshotMetadata,
    pub(super) hard_state: HardState,
    pub(super) conf_state: ConfState,
    pub(super) locs: Vec<EntryLoc>,
    pub(super) entry_record_bytes: u64,
}

/// Replays a log file's records; stops at a torn tail, fails on damage.
pub(super) fn replay(path: &Path, generation: u64, bytes: &[u8]) -> Result<Replayed> {
    let corrupt = |offset: usize, reason: String| RaftLogError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    // The header and checkpoint were fsynced before the file got its name:
    // damage there is never a torn write.
    if bytes.len() < LOG_HEADER_BYTES {
        return Err(corrupt(
            0,
            format!("{} bytes, shorter than a header", bytes.len()),
        ));
    }
    if bytes[0..8] != LOG_MAGIC {
        return Err(corrupt(0, "not a Cairn raft log (bad magic)".into()));
    }
    if crc32fast::hash(&bytes[0..24]) != le_u32(bytes, 24) {
        return Err(corrupt(0, "header checksum mismatch".into()));
    }
    let version = le_u32(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(RaftLogError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    if le_u64(bytes, 16) != generation {
        return Err(corrupt(
            16,
            format!(
                "the header says generation {}, the file name {generation}",
                le_u64(bytes, 16)
            ),
        ));
    }
    let mut pos = LOG_HEADER_BYTES;
    let record = parse_record(&bytes[pos..])
        .map_err(|reason| corrupt(pos, format!("the checkpoint record: {reason}")))?;
    if record.kind != KIND_CHECKPOINT {
        return Err(corrupt(
            pos,
            format!(
                "the first record is of kind {}, not a checkpoint",
                record.kind
            ),
        ));
    }
    let checkpoint = decode_checkpoint(record.payload).map_err(|r| corrupt(pos, r))?;
    pos += record.bytes;
    let mut state = Replayed {
        valid_len: 0,
        snapshot: checkpoint.snapshot,
        hard_state: checkpoint.hard_state,
        conf_state: checkpoint.conf_state,
        locs: Vec::new(),
        entry_record_bytes: 0,
    };
    while pos < bytes.len() {
        let record = match parse_record(&bytes[pos..]) {
            Ok(record) => record,
            Err(reason) => {
                check_torn(bytes, pos, checkpoint.durable_len)
                    .map_err(|r| corrupt(pos, format!("{reason}; {r}")))?;
                break;
            }
        };
        apply_record(&mut state, &record, pos as u64).map_err(|r| corrupt(pos, r))?;
        pos += record.bytes;
    }
    state.valid_len = pos as u64;
    Ok(state)
}

/// Decides whether the bad record at `pos` can be a torn write; `Err` says
/// why it cannot.
fn check_torn(bytes: &[u8], pos: usize, durable_len: u64) -> Result<(), String> {
    if (pos as u64) < durable_len {
        return Err(format!(
            "the file's first {durable_len} bytes were synced when it was created"
        ));
    }
    for later in pos + 1..bytes.len().saturating_sub(RECORD_HEADER_BYTES - 1) {
        if le_u32(bytes, later) != RECORD_MAGIC {
            continue;
        }
        if let Ok(record) = parse_record(&bytes[later..]) {
            if record.durable_before > pos as u64 {
                return Err(format!(
                    "the intact record at offset {later} was written after a sync that \
                     covered this one, so this is damage, not a torn write"
                ));
            }
        }
    }
    Ok(())
}

fn apply_record(state: &mut Replayed, record: &RecordView<'_>, offset: u64) -> Result<(), String> {
    match record.kind {
        KIND_ENTRY => {
            let entry =
                Entry::parse_from_bytes(record.payload).map_err(|e| format!("entry: {e}"))?;
            let first = state.snapshot.index + 1;
            let last = state.snapshot.index + state.locs.len() as u64;
            if entry.index < first || entry.index > last + 1 {
                return Err(format!(
                    "entry {} outside the log's range {first}..={}",
                    entry.index,
                    last + 1
                ));
            }
            let keep = (entry.index - first) as usize;
            let dropped: u64 = state.locs[keep..].iter().map(EntryLoc::record_bytes).sum();
            state.locs.truncate(keep);
            let loc = EntryLoc {
                term: entry.term,
                offset,
                payload_bytes: record.payload.len() as u32,
            };
            state.entry_record_bytes = state.entry_record_bytes - dropped + loc.record_bytes();
            state.locs.push(loc);
        }
        KIND_HARD_STATE => {
            state.hard_state = HardState::parse_from_bytes(record.payload)
                .map_err(|e| format!("hard state: {e}"))?;
        }
        KIND_CONF_STATE => {
            state.conf_state = ConfState::parse_from_bytes(record.payload)
                .map_err(|e| format!("conf state: {e}"))?;
        }
        KIND_CHECKPOINT => return Err("a second checkpoint record".into()),
        kind => return Err(format!("unknown record kind {kind}")),
    }
    Ok(())
}

/// Writes the snapshot file for `meta.index` durably: tmp, fsync, rename,
/// fsync the directory.
pub(super) fn write_snapshot_file(dir: &Path, meta: &SnapshotMetadata, data: &[u8]) -> Result<()> {
    let meta_bytes = encode(meta, "the snapshot metadata")?;
    let total = (SNAP_HEADER_BYTES + meta_bytes.len() + data.len()) as u64;
    if total > SNAPSHOT_BYTES_MAX {
        return Err(RaftLogError::SnapshotTooLarge {
            index: meta.index,
            bytes: total,
        });
    }
    let mut header = [0u8; SNAP_HEADER_BYTES];
    header[0..8].copy_from_slice(&SNAP_MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[16..20].copy_from_slice(&(meta_bytes.len() as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[16..]);
    crc.update(&meta_bytes);
    crc.update(data);
    header[12..16].copy_from_slice(&crc.finalize().to_le_bytes());

    let path = snap_path(dir, meta.index);
    let tmp = tmp_path(&path);
    let mut file = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    file.write_all(&header)
        .and_then(|()| file.write_all(&meta_bytes))
        .and_then(|()| file.write_all(data))
        .map_err(io_err("writing", &tmp))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_err("renaming into place", &tmp))?;
    sync_dir(dir)
}

/// Reads and verifies a snapshot file; returns its metadata and data.
pub(super) fn read_snapshot_file(path: &Path, index: u64) -> Result<(SnapshotMetadata, Vec<u8>)> {
    let bad = |reason: String| RaftLogError::SnapshotCorrupt {
        path: path.to_path_buf(),
        reason,
    };
    let file_bytes = fs::metadata(path).map_err(io_err("reading", path))?.len();
    if file_bytes > SNAPSHOT_BYTES_MAX {
        return Err(bad(format!(
            "{file_bytes} bytes, more than the limit {SNAPSHOT_BYTES_MAX}"
        )));
    }
    let mut bytes = fs::read(path).map_err(io_err("reading", path))?;
    if bytes.len() < SNAP_HEADER_BYTES || bytes[0..8] != SNAP_MAGIC {
        return Err(bad(
            "not a Cairn raft snapshot (bad magic or too short)".into()
        ));
    }
    let version = le_u32(&bytes, 8);
    if version != FORMAT_VERSION {
        return Err(RaftLogError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let crc = crc32fast::hash(&bytes[16..]);
    if crc != le_u32(&bytes, 12) {
        return Err(bad(format!(
            "checksum mismatch (stored {:#010x}, computed {crc:#010x})",
            le_u32(&bytes, 12)
        )));
    }
    let meta_bytes = le_u32(&bytes, 16) as usize;
    if bytes.len() - SNAP_HEADER_BYTES < meta_bytes {
        return Err(bad(format!("metadata length {meta_bytes} beyond the file")));
    }
    let meta_end = SNAP_HEADER_BYTES + meta_bytes;
    let meta = SnapshotMetadata::parse_from_bytes(&bytes[SNAP_HEADER_BYTES..meta_end])
        .map_err(|e| bad(format!("metadata: {e}")))?;
    if meta.index != index {
        return Err(bad(format!(
            "holds the snapshot at index {}, its name says {index}",
            meta.index
        )));
    }
    bytes.drain(..meta_end);
    Ok((meta, bytes))
}
