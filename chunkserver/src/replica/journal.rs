//! The group journal: the recent-write log and committed watermarks of every
//! group this chunk server belongs to (`cairn_group::node::JournalRecord`),
//! appended before the disk operations they describe, replayed at start.
//!
//! # Format
//!
//! `<data_dir>/groups.journal`: an 8-byte magic, then records of
//! `[payload length u32 LE][CRC32 of payload u32 LE][payload: JournalEntry]`.
//! Replay stops at the first record that is short or fails its CRC (a torn
//! tail after a crash) and truncates the file there.
//!
//! # Durability
//!
//! The group core emits a record before the disk operation it covers; the
//! driver appends it with write(2) before it starts that operation, so after
//! kill -9 the page cache holds every record whose operation could have
//! reached the disk. [`Journal::sync`] (fdatasync) runs with every store
//! flush, so a flushed write's record survives a power loss too. Between
//! flushes a power loss can keep a data write whose record is lost; the
//! replica then does not know that extent is uncertain (written in ARCHITECTURE.md
//! as a known gap).
//!
//! Appends are small buffered writes to the page cache, not io_uring
//! operations: they cost about a microsecond each and batch per driver turn.
//!
//! # Size
//!
//! The log holds one entry per extent, so the state is bounded, but the file
//! grows with every write. When it passes [`COMPACT_MIN_BYTES`] and four
//! times the state's size, [`Journal::compact`] rewrites it from the state
//! (a new file, fsynced and renamed over the old one).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use cairn_group::msg::Part;
use cairn_group::node::{Durable, GroupDurable, JournalRecord};
use cairn_group::{ExtentId, GroupKey, Seq};
use cairn_proto::chunk::ExtentKey;
use cairn_proto::group::WireSeq;
use prost::Message;

const MAGIC: &[u8; 8] = b"CRNJRNL1";
/// Largest record payload accepted at replay; most are under 100 bytes, a
/// push of the most ranges (`PART_RANGES_MAX`) about 2 KiB.
const RECORD_BYTES_MAX: u32 = 16 << 10;
/// The journal is not compacted below this size.
pub const COMPACT_MIN_BYTES: u64 = 64 << 20;
/// File name inside the data directory.
pub const FILE_NAME: &str = "groups.journal";

/// One journal record on disk.
#[derive(Clone, PartialEq, ::prost::Message)]
struct JournalEntry {
    /// 1: log entry, 2: committed watermark, 3: recent floor.
    #[prost(uint32, tag = "1")]
    kind: u32,
    #[prost(uint32, tag = "2")]
    replicas: u32,
    #[prost(uint32, tag = "3")]
    index: u32,
    #[prost(message, optional, tag = "4")]
    extent: Option<ExtentKey>,
    #[prost(message, optional, tag = "5")]
    seq: Option<WireSeq>,
    #[prost(bool, tag = "6")]
    write: bool,
    /// Log: `ranges` names the part changed (false, as in records written
    /// before ranges were journaled: the whole extent).
    #[prost(bool, tag = "7")]
    ranges_known: bool,
    /// Log: start, end pairs.
    #[prost(uint64, repeated, tag = "8")]
    ranges: Vec<u64>,
}

const KIND_LOG: u32 = 1;
const KIND_COMMITTED: u32 = 2;
const KIND_FLOOR: u32 = 3;

fn encode(r: &JournalRecord, out: &mut Vec<u8>) {
    let e = match r {
        JournalRecord::Log {
            key,
            ext,
            seq,
            write,
            part,
        } => JournalEntry {
            kind: KIND_LOG,
            replicas: key.replicas,
            index: key.index,
            extent: Some((*ext).into()),
            seq: seq.map(Into::into),
            write: *write,
            ranges_known: matches!(part, Part::Ranges(_)),
            ranges: match part {
                Part::Whole => Vec::new(),
                Part::Ranges(v) => v.iter().flat_map(|&(s, e)| [s, e]).collect(),
            },
        },
        JournalRecord::Committed { key, seq } => JournalEntry {
            kind: KIND_COMMITTED,
            replicas: key.replicas,
            index: key.index,
            seq: Some((*seq).into()),
            ..Default::default()
        },
        JournalRecord::RecentFloor { key, seq } => JournalEntry {
            kind: KIND_FLOOR,
            replicas: key.replicas,
            index: key.index,
            seq: Some((*seq).into()),
            ..Default::default()
        },
    };
    let payload = e.encode_to_vec();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

fn decode(payload: &[u8]) -> Option<JournalRecord> {
    let e = JournalEntry::decode(payload).ok()?;
    let key = GroupKey {
        replicas: e.replicas,
        index: e.index,
    };
    match e.kind {
        KIND_LOG => Some(JournalRecord::Log {
            key,
            ext: ExtentId::from(e.extent?),
            seq: e.seq.map(Seq::from),
            write: e.write,
            part: if e.ranges_known {
                if !e.ranges.len().is_multiple_of(2) {
                    return None;
                }
                Part::Ranges(e.ranges.chunks_exact(2).map(|c| (c[0], c[1])).collect())
            } else {
                Part::Whole
            },
        }),
        KIND_COMMITTED => Some(JournalRecord::Committed {
            key,
            seq: Seq::from(e.seq?),
        }),
        KIND_FLOOR => Some(JournalRecord::RecentFloor {
            key,
            seq: Seq::from(e.seq?),
        }),
        _ => None,
    }
}

/// An open journal.
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Records encoded but not yet written.
    pending: Vec<u8>,
    /// Bytes in the file.
    len: u64,
    /// Records replayed or written since the last rewrite; the state's size
    /// is estimated from the number of log entries instead.
    pub records_since_compaction: u64,
}

/// What opening found.
pub struct Opened {
    pub journal: Journal,
    pub durable: Durable,
    pub records: u64,
    /// Bytes cut off a torn tail.
    pub truncated_bytes: u64,
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and replays it.
    pub fn open(dir: &Path) -> Result<Opened, String> {
        let path = dir.join(FILE_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("opening the group journal {}: {e}", path.display()))?;
        let mut raw = Vec::new();
        file.read_to_end(&mut raw)
            .map_err(|e| format!("reading the group journal {}: {e}", path.display()))?;
        let mut durable = Durable::default();
        let mut records = 0;
        let good_end;
        if raw.is_empty() {
            file.write_all(MAGIC)
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("creating the group journal {}: {e}", path.display()))?;
            good_end = MAGIC.len() as u64;
            sync_dir(dir)?;
        } else {
            if raw.len() < MAGIC.len() || &raw[..MAGIC.len()] != MAGIC {
                return Err(format!(
                    "{} is not a Cairn group journal (bad magic); refusing to overwrite it",
                    path.display()
                ));
            }
            let mut at = MAGIC.len();
            while let Some(head) = raw.get(at..at + 8) {
                let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
                let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
                if len > RECORD_BYTES_MAX {
                    break;
                }
                let Some(payload) = raw.get(at + 8..at + 8 + len as usize) else {
                    break;
                };
                if crc32fast::hash(payload) != crc {
                    break;
                }
                let Some(r) = decode(payload) else {
                    break;
                };
                durable.apply(&r);
                records += 1;
                at += 8 + len as usize;
            }
            good_end = at as u64;
        }
        let truncated_bytes = (raw.len() as u64).saturating_sub(good_end);
        if truncated_bytes > 0 {
            file.set_len(good_end)
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("truncating the group journal's torn tail: {e}"))?;
        }
        file.seek(SeekFrom::Start(good_end))
            .map_err(|e| format!("seeking in the group journal: {e}"))?;
        Ok(Opened {
            journal: Journal {
                path,
                file,
                pending: Vec::new(),
                len: good_end,
                records_since_compaction: records,
            },
            durable,
            records,
            truncated_bytes,
        })
    }

    /// Queues a record; [`write_pending`](Self::write_pending) writes it.
    pub fn append(&mut self, r: &JournalRecord) {
        encode(r, &mut self.pending);
        self.records_since_compaction += 1;
    }

    /// Whether records are queued.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Writes queued records to the file (the page cache).
    pub fn write_pending(&mut self) -> Result<(), String> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.pending).map_err(|e| {
            format!(
                "appending to the group journal {}: {e}",
                self.path.display()
            )
        })?;
        self.len += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// A handle for [`sync`](Self::sync) off the driver's thread.
    pub fn sync_handle(&self) -> Result<File, String> {
        self.file
            .try_clone()
            .map_err(|e| format!("cloning the group journal's handle: {e}"))
    }

    /// fdatasync through a handle from [`sync_handle`](Self::sync_handle).
    pub fn sync(handle: &File) -> Result<(), String> {
        handle
            .sync_data()
            .map_err(|e| format!("syncing the group journal: {e}"))
    }

    /// Whether the file is large enough to rewrite, given `entries` log
    /// entries and watermarks in the state.
    pub fn wants_compaction(&self, entries: u64) -> bool {
        self.len > COMPACT_MIN_BYTES && self.len > entries.saturating_mul(60).saturating_mul(4)
    }

    /// Rewrites the journal from `groups` (the core's state): a new file,
    /// fsynced, renamed over the old one, directory fsynced.
    pub fn compact<'a>(
        &mut self,
        groups: impl Iterator<Item = (GroupKey, &'a GroupDurable)>,
    ) -> Result<(), String> {
        self.write_pending()?;
        let tmp = self.path.with_extension("journal.new");
        let mut buf = MAGIC.to_vec();
        let mut records = 0;
        for (key, g) in groups {
            // The recent changes first, as replacements, so that replaying
            // them cannot raise a log entry; then every entry they touch
            // and every other one restated exactly, changing nothing more.
            if g.recent_floor > Seq::default() {
                let r = JournalRecord::RecentFloor {
                    key,
                    seq: g.recent_floor,
                };
                encode(&r, &mut buf);
                records += 1;
            }
            for r in &g.recent {
                let part = match r.range {
                    Some(range) => Part::Ranges(vec![range]),
                    None => Part::Whole,
                };
                let record = JournalRecord::Log {
                    key,
                    ext: r.ext,
                    seq: Some(r.seq),
                    write: false,
                    part,
                };
                encode(&record, &mut buf);
                records += 1;
            }
            let exts: std::collections::BTreeSet<ExtentId> = g
                .log
                .keys()
                .copied()
                .chain(g.recent.iter().map(|r| r.ext))
                .collect();
            for ext in exts {
                encode(
                    &JournalRecord::Log {
                        key,
                        ext,
                        seq: g.log.get(&ext).copied(),
                        write: false,
                        part: Part::Ranges(Vec::new()),
                    },
                    &mut buf,
                );
                records += 1;
            }
            encode(
                &JournalRecord::Committed {
                    key,
                    seq: g.committed,
                },
                &mut buf,
            );
            records += 1;
        }
        let write = || -> std::io::Result<File> {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            Ok(f)
        };
        let mut file = write().map_err(|e| {
            format!(
                "rewriting the group journal {} (through {}): {e}",
                self.path.display(),
                tmp.display()
            )
        })?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir)?;
        }
        file.seek(SeekFrom::End(0))
            .map_err(|e| format!("seeking in the rewritten group journal: {e}"))?;
        self.file = file;
        self.len = buf.len() as u64;
        self.records_since_compaction = records;
        Ok(())
    }

    /// Bytes in the file.
    pub fn file_bytes(&self) -> u64 {
        self.len
    }
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("syncing directory {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: GroupKey = GroupKey {
        replicas: 3,
        index: 5,
    };

    fn ext(i: u64) -> ExtentId {
        ExtentId {
            volume: 1,
            index: i,
            epoch: 1,
        }
    }

    fn log(i: u64, n: u64) -> JournalRecord {
        JournalRecord::Log {
            key: KEY,
            ext: ext(i),
            seq: Some(Seq { interval: 2, n }),
            write: true,
            part: Part::range(n * 512, n * 512 + 4096),
        }
    }

    #[test]
    fn replays_what_was_written_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut expected = Durable::default();
        {
            let mut j = Journal::open(dir.path()).unwrap().journal;
            for r in [
                log(1, 1),
                log(2, 2),
                log(1, 3),
                JournalRecord::Committed {
                    key: KEY,
                    seq: Seq { interval: 2, n: 2 },
                },
            ] {
                j.append(&r);
                expected.apply(&r);
            }
            j.write_pending().unwrap();
        }
        // A torn record at the end.
        let path = dir.path().join(FILE_NAME);
        let mut raw = std::fs::read(&path).unwrap();
        let good = raw.len();
        raw.extend_from_slice(&[20, 0, 0, 0, 1, 2, 3, 4, 9, 9]);
        std::fs::write(&path, &raw).unwrap();

        let opened = Journal::open(dir.path()).unwrap();
        assert_eq!(opened.durable, expected);
        assert_eq!(opened.records, 4);
        assert_eq!(opened.truncated_bytes, 10);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good as u64);
        let g = &opened.durable.groups[&KEY];
        assert_eq!(g.log[&ext(1)], Seq { interval: 2, n: 3 });
    }

    #[test]
    fn compaction_keeps_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap().journal;
        let mut state = Durable::default();
        let mut records: Vec<JournalRecord> = (1..400).map(|n| log(n % 7, n)).collect();
        // A push that lowers an entry, and one that deletes an extent the
        // recent list still names: replay must not bring either back up.
        records.push(JournalRecord::Log {
            key: KEY,
            ext: ext(1),
            seq: Some(Seq { interval: 2, n: 3 }),
            write: false,
            part: Part::Ranges(vec![(0, 8192)]),
        });
        records.push(JournalRecord::Log {
            key: KEY,
            ext: ext(2),
            seq: None,
            write: false,
            part: Part::Whole,
        });
        for r in &records {
            j.append(r);
            state.apply(r);
        }
        let g = &state.groups[&KEY];
        assert!(g.recent_floor > Seq::default(), "the test must forget some");
        assert!(!g.log.contains_key(&ext(2)));
        j.write_pending().unwrap();
        let before = j.file_bytes();
        j.compact(state.groups.iter().map(|(k, g)| (*k, g)))
            .unwrap();
        assert!(j.file_bytes() < before);
        j.append(&log(9, 500));
        state.apply(&log(9, 500));
        j.write_pending().unwrap();
        drop(j);
        assert_eq!(Journal::open(dir.path()).unwrap().durable, state);
    }

    #[test]
    fn refuses_a_foreign_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"not a journal at all").unwrap();
        let e = Journal::open(dir.path()).err().unwrap();
        assert!(e.contains("bad magic"), "{e}");
    }
}
