//! Messages of the group protocol: volume client to primary, primary to
//! replicas. The daemons carry them over the chunk server RPC; the simulator
//! over its fake network, which may drop, delay, duplicate and reorder any of
//! them. Every handler therefore tolerates duplicates and stale copies.

use bytes::Bytes;

use crate::map::{Epoch, ExtentId, GroupKey, NodeId, Seq};

/// A volume client's id, unique per client process.
pub type ClientId = u64;

/// What a write does to its range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    /// Store `data` at `offset`.
    Data {
        /// Byte offset in the extent.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// Zero `len` bytes at `offset` (trim and write-zeroes).
    Zero {
        /// Byte offset in the extent.
        offset: u64,
        /// Bytes to zero.
        len: u64,
    },
    /// Copy-up of whole 4 KiB blocks: each the version does not hold is
    /// filled from the versions beneath it and stored, so that an older
    /// version can go (`Store::materialize_at`). No read of the version
    /// changes. Logged and forwarded like any write, so a replica that
    /// missed it gets the range pushed.
    Materialize {
        /// Byte offset in the extent (a multiple of 4096).
        offset: u64,
        /// Bytes (a multiple of 4096).
        len: u64,
    },
}

/// Copy-ups are of whole blocks of this many bytes.
pub const MATERIALIZE_ALIGN: u64 = 4096;

impl WriteOp {
    /// The byte range written.
    pub fn range(&self) -> (u64, u64) {
        match self {
            WriteOp::Data { offset, data } => (*offset, offset + data.len() as u64),
            WriteOp::Zero { offset, len } | WriteOp::Materialize { offset, len } => {
                (*offset, offset + len)
            }
        }
    }
}

/// A push names at most this many ranges; more become the whole extent.
pub const PART_RANGES_MAX: usize = 256;

/// Which part of an extent a push (or a log entry) concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// All of it.
    Whole,
    /// These byte ranges `[start, end)`: sorted, disjoint, not touching.
    Ranges(Vec<(u64, u64)>),
}

impl Part {
    /// The part `[start, end)`.
    pub fn range(start: u64, end: u64) -> Part {
        Part::from_ranges(vec![(start, end)])
    }

    /// Both parts together.
    pub fn union(&self, other: &Part) -> Part {
        match (self, other) {
            (Part::Ranges(a), Part::Ranges(b)) => {
                Part::from_ranges(a.iter().chain(b.iter()).copied().collect())
            }
            _ => Part::Whole,
        }
    }

    /// Normalises arbitrary ranges: sorted, merged where they overlap or
    /// touch; too many become [`Part::Whole`]. Empty ranges are dropped.
    pub fn from_ranges(mut v: Vec<(u64, u64)>) -> Part {
        v.retain(|r| r.1 > r.0);
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        if out.len() > PART_RANGES_MAX {
            return Part::Whole;
        }
        Part::Ranges(out)
    }

    /// Bytes the ranges cover (`None` for the whole extent).
    pub fn bytes(&self) -> Option<u64> {
        match self {
            Part::Whole => None,
            Part::Ranges(v) => Some(v.iter().map(|(s, e)| e - s).sum()),
        }
    }

    /// Checks ranges received from elsewhere: normalised, non-empty, inside
    /// an extent of `extent_bytes`, multiples of `align`.
    pub fn validate(&self, extent_bytes: u64, align: u64) -> Result<(), String> {
        let Part::Ranges(v) = self else {
            return Ok(());
        };
        if v.is_empty() || v.len() > PART_RANGES_MAX {
            return Err(format!(
                "{} ranges (1 to {PART_RANGES_MAX} allowed)",
                v.len()
            ));
        }
        let mut prev_end = None;
        for &(s, e) in v {
            if !s.is_multiple_of(align) || !e.is_multiple_of(align) || e <= s || e > extent_bytes {
                return Err(format!(
                    "range [{s}, {e}) is not {align}-byte aligned inside the {extent_bytes}-byte extent"
                ));
            }
            if prev_end.is_some_and(|p| s <= p) {
                return Err(format!(
                    "range [{s}, {e}) is out of order or touches the one before"
                ));
            }
            prev_end = Some(e);
        }
        Ok(())
    }
}

/// A client request's operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOp {
    /// Write (or zero) part of one extent.
    Write {
        /// The extent.
        ext: ExtentId,
        /// What to write.
        op: WriteOp,
        /// Durable on every replica before the reply.
        fua: bool,
    },
    /// Read part of one extent.
    Read {
        /// The extent.
        ext: ExtentId,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Make every write this group acknowledged before durable on every
    /// replica.
    Flush,
    /// SCSI COMPARE AND WRITE (VMware's ATS locking): if the range holds
    /// `compare`, write `data` there (a write like any other); if not,
    /// write nothing and answer the bytes found. The primary reads and
    /// compares under the range lock the write then keeps, so no other
    /// write to the range, from any client, lands in between.
    CompareAndWrite {
        /// The extent.
        ext: ExtentId,
        /// Byte offset in the extent.
        offset: u64,
        /// What the range must hold.
        compare: Bytes,
        /// What it then holds (as long as `compare`).
        data: Bytes,
        /// Durable on every replica before the reply.
        fua: bool,
    },
    /// Scrub part of one extent: the primary reads its copy (repairing it
    /// from a replica if it does not read), every synced replica reads
    /// its own and answers a digest, all under the primary's range lock,
    /// so every copy must hold the same bytes. A copy that does not read
    /// or differs gets the primary's pushed over it. The reply's data is a
    /// [`ScrubFound`].
    Scrub {
        /// The extent.
        ext: ExtentId,
        /// Byte offset (a multiple of 4096).
        offset: u64,
        /// Bytes (a multiple of 4096).
        len: u64,
    },
}

impl ClientOp {
    /// The extent a request concerns (none for a flush).
    pub fn extent(&self) -> Option<ExtentId> {
        match self {
            ClientOp::Write { ext, .. }
            | ClientOp::Read { ext, .. }
            | ClientOp::CompareAndWrite { ext, .. }
            | ClientOp::Scrub { ext, .. } => Some(*ext),
            ClientOp::Flush => None,
        }
    }
}

/// A request from a volume client to a group's primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRequest {
    /// The client.
    pub client: ClientId,
    /// Chosen by the client, increasing; a retry reuses it.
    pub id: u64,
    /// Every request of this client with a smaller id is finished from the
    /// client's point of view; a copy of one that arrives late is dropped.
    pub oldest_outstanding: u64,
    /// Requests above `oldest_outstanding` the client gave up on: a copy
    /// that arrives later is dropped, so that it can never land after a
    /// newer write to the same blocks.
    pub abandoned: Vec<u64>,
    /// The client's map epoch.
    pub epoch: Epoch,
    /// The group.
    pub key: GroupKey,
    /// The volume's `min_replicas`: writes wait while fewer replicas act.
    pub min_replicas: u32,
    /// What to do.
    pub op: ClientOp,
}

/// What the scrub of one range found: the data of its reply, encoded with
/// prost (`ScrubFound::encode_to_vec`).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ScrubFound {
    /// Copies compared, the primary's included.
    #[prost(uint32, tag = "1")]
    pub copies: u32,
    /// The primary could not read its own copy and repaired it from a
    /// replica (read repair) before comparing.
    #[prost(bool, tag = "2")]
    pub repaired_here: bool,
    /// Replicas whose copy did not read or differed: each gets the
    /// primary's copy of the range pushed over it.
    #[prost(message, repeated, tag = "3")]
    pub pushed: Vec<ScrubCopy>,
    /// Synced replicas that did not answer in time (frozen, cut off, or
    /// too old to know scrubs): their copies were not compared.
    #[prost(uint64, repeated, tag = "4")]
    pub silent: Vec<u64>,
}

/// A replica's copy a scrub replaced, and why.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ScrubCopy {
    /// The replica.
    #[prost(uint64, tag = "1")]
    pub node: u64,
    /// Its read error, or that its digest differed.
    #[prost(string, tag = "2")]
    pub why: String,
}

/// Why a request was not done; every one of them is worth a retry, after a
/// newer map for the first three.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The request's epoch is older than the group's interval here.
    StaleEpoch {
        /// The newest map epoch this node knows.
        current: Epoch,
    },
    /// This node is not the group's primary in the newest map it knows.
    NotPrimary {
        /// The newest map epoch this node knows.
        current: Epoch,
    },
    /// The request names a newer map than this node has; it is fetching it.
    NodeBehind,
    /// The group is peering or its acting set changed under the request.
    Busy,
    /// Fewer replicas act than the volume's `min_replicas`.
    Degraded {
        /// Acting replicas.
        acting: u32,
        /// Required.
        min: u32,
    },
    /// A disk error at the primary; the message says where.
    Io(String),
}

/// The reply to a [`ClientRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientReply {
    /// The client.
    pub client: ClientId,
    /// The request.
    pub id: u64,
    /// Data for reads, nothing for writes and flushes, or why not. A
    /// compare-and-write answers nothing when it wrote, and the bytes it
    /// found when they differ from its `compare`.
    pub result: Result<Option<Bytes>, Refusal>,
}

/// What a replica reports about one group when the primary asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncState {
    /// Every write of the group with a sequence number up to this one that
    /// was acknowledged anywhere is applied here (and every extent it does
    /// not list in `uncertain` equals the acting replicas' copy as of then).
    pub committed: Seq,
    /// Extents it wrote after `committed`, and which parts of them: maybe
    /// different from the others.
    pub uncertain: Vec<(ExtentId, Part)>,
}

/// Why a replica refused a primary's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerRefusal {
    /// The replica knows a newer interval for the group.
    StaleInterval {
        /// The replica's interval.
        current: Epoch,
    },
    /// The message was addressed to another incarnation of the replica.
    WrongIncarnation,
}

/// Messages between a group's primary and its replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMsg {
    /// Replica → primary: bring me up to date (I am in the placement but not
    /// acting).
    SyncRequest {
        /// Sender's incarnation.
        up_since: Epoch,
    },
    /// Primary → replica: report your state; from now on refuse older
    /// intervals.
    SyncQuery {
        /// Recipient's incarnation.
        to_up_since: Epoch,
    },
    /// Replica → primary.
    SyncReport(SyncState),
    /// Primary → replica: apply a write.
    Forward {
        /// Recipient's incarnation.
        to_up_since: Epoch,
        /// Its sequence number.
        seq: Seq,
        /// The primary's committed watermark (see [`SyncState::committed`]).
        committed: Seq,
        /// The extent.
        ext: ExtentId,
        /// The write.
        op: WriteOp,
        /// Durable before the ack.
        fua: bool,
    },
    /// Replica → primary.
    ForwardAck {
        /// The write.
        seq: Seq,
    },
    /// Replica → primary: applying the write failed here (a write of part
    /// of a block whose checksum no longer matches cannot merge into it,
    /// or the disk failed). The primary mends this replica's copy: it
    /// forwards the write again, same sequence number, as its own whole
    /// blocks around it.
    ForwardFailed {
        /// The write.
        seq: Seq,
        /// The replica's error.
        error: String,
    },
    /// Primary → replica: replace your copy of an extent (or of some ranges
    /// of it) with this one.
    Push {
        /// Recipient's incarnation.
        to_up_since: Epoch,
        /// Matches the ack.
        push_id: u64,
        /// The extent.
        ext: ExtentId,
        /// The primary's last write sequence number for it, if it has one.
        seq: Option<Seq>,
        /// Which part: the whole extent, or the ranges that may differ.
        part: Part,
        /// The whole extent, or `None` if it does not exist (delete it);
        /// for ranges, their bytes one after another (always present).
        data: Option<Bytes>,
    },
    /// Replica → primary.
    PushAck {
        /// The push.
        push_id: u64,
    },
    /// Primary → replica: you hold every write up to `committed`.
    SyncDone {
        /// Recipient's incarnation.
        to_up_since: Epoch,
        /// The committed watermark to adopt.
        committed: Seq,
    },
    /// Primary → replica: make every write you acknowledged durable.
    Flush {
        /// Recipient's incarnation.
        to_up_since: Epoch,
        /// Matches the ack.
        flush_id: u64,
    },
    /// Replica → primary.
    FlushAck {
        /// The flush.
        flush_id: u64,
    },
    /// Primary → acting replica: the primary cannot read its own copy of
    /// this part of an extent (a checksum mismatch or a disk error); send
    /// yours. Read repair: the primary stores what comes back and reads
    /// again. Sent under the primary's range lock, so no write to the part
    /// is in flight and every acting replica holds the same bytes there.
    Fetch {
        /// Recipient's incarnation.
        to_up_since: Epoch,
        /// Matches the reply.
        fetch_id: u64,
        /// The extent.
        ext: ExtentId,
        /// Which part: whole 4 KiB blocks, or the whole extent.
        part: Part,
    },
    /// Replica → primary: the part asked for (ranges: their bytes one after
    /// another, read through the chain whether or not the version is
    /// stored; the whole extent: `None` if this replica stores no such
    /// version), or why it could not read it either.
    FetchReply {
        /// The fetch.
        fetch_id: u64,
        /// The bytes, or the replica's own error.
        data: Result<Option<Bytes>, String>,
    },
    /// Primary → synced replica: read this range of your copy and answer
    /// its digest (scrub). Sent under the primary's range lock, like a
    /// fetch, so every synced replica must answer the primary's digest.
    Verify {
        /// Recipient's incarnation.
        to_up_since: Epoch,
        /// Matches the reply.
        verify_id: u64,
        /// The extent.
        ext: ExtentId,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Replica → primary: the CRC32 of the range's bytes, or why it could
    /// not read them.
    VerifyReply {
        /// The verify.
        verify_id: u64,
        /// The digest, or the replica's error.
        digest: Result<u32, String>,
    },
    /// Replica → primary: refused.
    Refused(PeerRefusal),
}

/// A [`PeerMsg`] with its group and interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Sender.
    pub from: NodeId,
    /// The group.
    pub key: GroupKey,
    /// The interval the sender acts in.
    pub interval: Epoch,
    /// The message.
    pub msg: PeerMsg,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_merge_sort_and_give_up_past_the_cap() {
        assert_eq!(
            Part::from_ranges(vec![(8192, 12288), (0, 4096), (4096, 5120), (100, 100)]),
            Part::Ranges(vec![(0, 5120), (8192, 12288)])
        );
        assert_eq!(
            Part::range(0, 4096).union(&Part::range(2048, 8192)),
            Part::Ranges(vec![(0, 8192)])
        );
        assert_eq!(Part::range(0, 512).union(&Part::Whole), Part::Whole);
        assert_eq!(
            Part::Ranges(vec![(0, 512), (1024, 2048)]).bytes(),
            Some(1536)
        );
        let many: Vec<(u64, u64)> = (0..=PART_RANGES_MAX as u64)
            .map(|i| (i * 1024, i * 1024 + 512))
            .collect();
        assert_eq!(Part::from_ranges(many), Part::Whole);
        assert!(Part::Ranges(vec![(0, 512)]).validate(4096, 512).is_ok());
        assert!(Part::Ranges(vec![(0, 512), (512, 1024)])
            .validate(4096, 512)
            .is_err());
        assert!(Part::Ranges(vec![(0, 8192)]).validate(4096, 512).is_err());
        assert!(Part::Ranges(vec![]).validate(4096, 512).is_err());
    }
}
