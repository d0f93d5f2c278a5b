//! One chunk server's side of every group it belongs to: primary, replica or
//! rejoining replica. See the crate documentation for the protocol.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use bytes::Bytes;
use prost::Message;

use crate::authority::Claim;
use crate::locks::{Locks, WHOLE};
use crate::map::{Epoch, ExtentId, GroupKey, GroupMap, NodeId, Seq};
use crate::msg::{
    ClientId, ClientOp, ClientReply, ClientRequest, Part, Peer, PeerMsg, PeerRefusal, Refusal,
    ScrubCopy, ScrubFound, SyncState, WriteOp,
};

/// Identifies a disk operation between [`Output::Disk`] and
/// [`Node::on_disk`].
pub type OpId = u64;

/// Timing. All times are milliseconds of the driver's clock.
#[derive(Clone, Debug)]
pub struct Config {
    /// Resend unanswered forwards, pushes, queries and flushes this often.
    pub retry_ms: u64,
    /// Drop a rejoining replica that has not answered for this long.
    pub sync_timeout_ms: u64,
    /// A replica outside the acting set asks to rejoin this often.
    pub sync_request_ms: u64,
    /// Resend an unanswered claim this often.
    pub claim_retry_ms: u64,
    /// Changes remembered by range per group ([`RECENT_MAX`]; the
    /// simulator uses small values to exercise forgetting).
    pub recent_max: usize,
    /// The store's checksummed block: a read repair fetches and stores
    /// whole blocks around the range that could not be read.
    pub block_bytes: u64,
    /// Pushes that bring members up to date (peering, rejoin, a new
    /// placement member), in flight at once on this node across all its
    /// groups; the rest wait their turn, oldest first, without holding
    /// their extent's lock. Each reads a whole extent into memory, so this
    /// bounds a node's memory and its peer links' queues while it copies a
    /// node's worth of data (a drained or new node), and keeps answers to
    /// the pushes in flight within the resend and silence timers (before
    /// it, every extent of every group was read and sent at once, and the
    /// pushes were sent again every `retry_ms` while the queue drained:
    /// draining a node holding 1.5 GiB stalled for 44 s). At least 1.
    /// Pushes to acting members (the peering that holds a group's
    /// activation: recent changes only), pushes that settle a failed write
    /// and pushes that replace a copy a scrub found bad do not wait.
    pub pushes_max: usize,
    /// A deliberately broken variant, to show the simulator catches it.
    pub bug: Option<Bug>,
}

/// [`Config::pushes_max`] by default: 8 extents (32 MiB of 4 MiB extents).
pub const PUSHES_MAX: usize = 8;

impl Default for Config {
    fn default() -> Self {
        Config {
            retry_ms: 200,
            sync_timeout_ms: 3000,
            sync_request_ms: 500,
            claim_retry_ms: 1000,
            recent_max: RECENT_MAX,
            block_bytes: 4096,
            pushes_max: PUSHES_MAX,
            bug: None,
        }
    }
}

/// Deliberate protocol bugs. Never set outside the simulator's own tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// Acknowledge a write once the primary wrote it, before the replicas.
    AckBeforeReplicas,
    /// Replicas accept messages of intervals older than the newest they saw.
    NoFence,
    /// Peering marks replicas up to date without pushing anything.
    NoPeeringPush,
    /// Where primary and replica both changed an extent, push only the
    /// ranges the primary changed, not the replica's too.
    PrimaryRangesOnly,
    /// A compare-and-write writes even where the range holds other bytes.
    WriteOnMiscompare,
}

/// A disk operation for the driver to run on the node's store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskReq {
    /// Write or zero a range.
    Write {
        /// The extent.
        ext: ExtentId,
        /// What.
        op: WriteOp,
        /// Durable before completion.
        fua: bool,
    },
    /// Read a range.
    Read {
        /// The extent.
        ext: ExtentId,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Read the whole extent, or some ranges of it (their bytes one after
    /// another); `None` if the extent is not stored (all zeros: the push
    /// then deletes the whole extent, which leaves the same bytes).
    ReadExtent {
        /// The extent.
        ext: ExtentId,
        /// Which part.
        part: Part,
    },
    /// Read ranges through the version's chain, their bytes one after
    /// another: zeros (or the versions beneath) where this version holds
    /// nothing, stored or not. Answers [`DiskDone::Data`]. For read repair.
    ReadRanges {
        /// The extent.
        ext: ExtentId,
        /// Sorted, apart, whole blocks.
        ranges: Vec<(u64, u64)>,
    },
    /// Replace the whole extent (or delete it), or some ranges of it.
    PutExtent {
        /// The extent.
        ext: ExtentId,
        /// Which part.
        part: Part,
        /// New content, as [`DiskReq::ReadExtent`] answers it; `None`
        /// deletes the whole extent.
        data: Option<Bytes>,
    },
    /// Make every completed write durable.
    Flush,
}

/// A disk operation's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskDone {
    /// Write, put or flush done.
    Ok,
    /// Read done.
    Data(Bytes),
    /// ReadExtent done.
    Extent(Option<Bytes>),
    /// Failed; the message names the extent and the error.
    Failed(String),
}

/// A durable record: the driver appends it to the node's journal before it
/// starts any disk operation output after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JournalRecord {
    /// The last write applied to `ext` has sequence number `seq` (or, with
    /// `None`, the extent was replaced by a copy the primary had no entry
    /// for: forget it).
    Log {
        /// The group.
        key: GroupKey,
        /// The extent.
        ext: ExtentId,
        /// The sequence number.
        seq: Option<Seq>,
        /// A write (the entry only moves up) rather than a replacement.
        write: bool,
        /// What changed: the write's range, or what the replacement
        /// replaced. `Part::Ranges(vec![])` changes no content (a
        /// compacted journal restating an entry).
        part: Part,
    },
    /// Changes at or below `seq` are no longer remembered by range (a
    /// compacted journal restating [`GroupDurable::recent_floor`]).
    RecentFloor {
        /// The group.
        key: GroupKey,
        /// The floor.
        seq: Seq,
    },
    /// The committed watermark moved up.
    Committed {
        /// The group.
        key: GroupKey,
        /// The new watermark.
        seq: Seq,
    },
}

/// Changes remembered by range per group (see [`GroupDurable::recent`]).
pub const RECENT_MAX: usize = 128;

/// One remembered change: a write, or a replacement by a push.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recent {
    /// Its sequence number (for a push, the primary's entry for the extent).
    pub seq: Seq,
    /// The extent.
    pub ext: ExtentId,
    /// The bytes changed, `None` for the whole extent.
    pub range: Option<(u64, u64)>,
}

/// What the journal holds for one group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupDurable {
    /// Last applied write per extent.
    pub log: BTreeMap<ExtentId, Seq>,
    /// The committed watermark.
    pub committed: Seq,
    /// The latest changes (at most [`RECENT_MAX`]) with the ranges they
    /// touched, so that peering pushes only the ranges that may differ
    /// rather than whole extents. Complete above `recent_floor`: every
    /// change with a greater sequence number is here.
    pub recent: VecDeque<Recent>,
    /// The greatest sequence number of a change forgotten from `recent`.
    pub recent_floor: Seq,
}

impl GroupDurable {
    /// The extents written after `committed`, each with the part that may
    /// differ from the other replicas.
    fn uncertain(&self) -> Vec<(ExtentId, Part)> {
        self.log
            .iter()
            .filter(|(_, &s)| s > self.committed)
            .map(|(&e, _)| (e, self.changed_since(e, self.committed)))
            .collect()
    }

    /// The part of `ext` changed by changes after `since`: the union of
    /// their ranges when `recent` reaches back that far, else the whole
    /// extent.
    pub fn changed_since(&self, ext: ExtentId, since: Seq) -> Part {
        if self.recent_floor > since {
            return Part::Whole;
        }
        let mut ranges = Vec::new();
        for r in self.recent.iter().filter(|r| r.ext == ext && r.seq > since) {
            match r.range {
                Some(range) => ranges.push(range),
                None => return Part::Whole,
            }
        }
        if ranges.is_empty() {
            // The log names a change this list does not: be safe.
            return Part::Whole;
        }
        Part::from_ranges(ranges)
    }

    /// Remembers a change, forgetting the oldest beyond `cap`.
    fn remember(&mut self, seq: Seq, ext: ExtentId, part: &Part, cap: usize) {
        match part {
            Part::Whole => self.recent.push_back(Recent {
                seq,
                ext,
                range: None,
            }),
            Part::Ranges(v) => self.recent.extend(v.iter().map(|&r| Recent {
                seq,
                ext,
                range: Some(r),
            })),
        }
        while self.recent.len() > cap {
            let old = self.recent.pop_front().expect("longer than the cap");
            self.recent_floor = self.recent_floor.max(old.seq);
        }
    }

    /// A write with `seq` was applied to `part` of `ext` (writes to one
    /// extent may complete out of sequence order when their ranges do not
    /// overlap).
    fn note_write(&mut self, ext: ExtentId, seq: Seq, part: &Part, cap: usize) {
        let e = self.log.entry(ext).or_insert(seq);
        *e = (*e).max(seq);
        self.remember(seq, ext, part, cap);
    }

    /// `part` of the extent was replaced by a copy whose last write is
    /// `seq`.
    fn set_log(&mut self, ext: ExtentId, seq: Option<Seq>, part: &Part, cap: usize) {
        match seq {
            Some(s) => {
                self.log.insert(ext, s);
                self.remember(s, ext, part, cap);
            }
            None => {
                self.log.remove(&ext);
            }
        }
    }
}

/// A node's journal, replayed: what survives a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Durable {
    /// Per group.
    pub groups: BTreeMap<GroupKey, GroupDurable>,
    /// Changes remembered by range per group while replaying (any value is
    /// safe: `recent` is complete above its floor whatever the cap).
    pub recent_max: usize,
}

impl Default for Durable {
    fn default() -> Self {
        Durable {
            groups: BTreeMap::new(),
            recent_max: RECENT_MAX,
        }
    }
}

impl Durable {
    /// Applies one journal record (replay).
    pub fn apply(&mut self, r: &JournalRecord) {
        match r {
            JournalRecord::Log {
                key,
                ext,
                seq,
                write,
                part,
            } => {
                let cap = self.recent_max;
                let g = self.groups.entry(*key).or_default();
                match (write, seq) {
                    (true, Some(s)) => g.note_write(*ext, *s, part, cap),
                    _ => g.set_log(*ext, *seq, part, cap),
                }
            }
            JournalRecord::RecentFloor { key, seq } => {
                let g = self.groups.entry(*key).or_default();
                g.recent_floor = g.recent_floor.max(*seq);
            }
            JournalRecord::Committed { key, seq } => {
                let g = self.groups.entry(*key).or_default();
                g.committed = g.committed.max(*seq);
            }
        }
    }
}

/// Something observable for tests and logs; daemons may ignore it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trace {
    /// This node acknowledged a client write as primary of `key` in
    /// `interval`.
    AckedWrite {
        /// The group.
        key: GroupKey,
        /// The interval.
        interval: Epoch,
    },
    /// This node became the active primary of `key` in `interval`.
    Activated {
        /// The group.
        key: GroupKey,
        /// The interval.
        interval: Epoch,
        /// Extents pushed during peering.
        pushed: usize,
    },
    /// A rejoining replica was brought up to date and claimed.
    Claimed {
        /// The group.
        key: GroupKey,
        /// The replica.
        node: NodeId,
        /// Extents pushed to it.
        pushed: usize,
    },
    /// As primary, this node could not read its own copy of `part` of
    /// `ext` (`error`), and fetches the part from replica `from`.
    Repairing {
        /// The group.
        key: GroupKey,
        /// The extent.
        ext: ExtentId,
        /// The part.
        part: Part,
        /// The replica asked.
        from: NodeId,
        /// Why the local read failed.
        error: String,
    },
    /// Replica `node` could not apply a write to `ext` (`error`): this
    /// node, as primary, sends it the write again as its own whole blocks
    /// around it.
    Mending {
        /// The group.
        key: GroupKey,
        /// The extent.
        ext: ExtentId,
        /// The replica.
        node: NodeId,
        /// The replica's error.
        error: String,
    },
    /// The part fetched from `from` was stored and reads back: repaired.
    Repaired {
        /// The group.
        key: GroupKey,
        /// The extent.
        ext: ExtentId,
        /// The part.
        part: Part,
        /// The replica whose copy was stored.
        from: NodeId,
    },
    /// A scrub found that replica `node`'s copy of `[offset, offset +
    /// len)` of `ext` does not read or differs from this node's (`why`):
    /// this node, as primary, pushes its copy over it.
    ScrubPushing {
        /// The group.
        key: GroupKey,
        /// The extent.
        ext: ExtentId,
        /// The replica.
        node: NodeId,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// The replica's error, or that the digests differ.
        why: String,
    },
    /// No acting replica could supply a good copy, or the repaired copy
    /// still does not read: the operation fails as it would have.
    RepairFailed {
        /// The group.
        key: GroupKey,
        /// The extent.
        ext: ExtentId,
        /// What went wrong, every replica asked included.
        error: String,
    },
}

/// What the node asks its driver to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send to another node.
    Peer {
        /// Recipient.
        to: NodeId,
        /// Message.
        msg: Peer,
    },
    /// Answer a client.
    Reply(ClientReply),
    /// Start a disk operation; report its end with [`Node::on_disk`].
    Disk {
        /// Its id.
        id: OpId,
        /// What.
        req: DiskReq,
    },
    /// Append to the journal before starting any later disk operation.
    Journal(JournalRecord),
    /// Propose to the volume manager.
    Claim(Claim),
    /// The node saw a reference to a map epoch it does not have.
    NeedMap(Epoch),
    /// For tests and logs.
    Trace(Trace),
}

/// What a disk operation was for.
#[derive(Debug)]
enum DiskCtx {
    /// A primary task's local operation, under lock `lock`.
    Task { key: GroupKey, gen: u64, task: u64 },
    /// A replica applying a forwarded write or a push.
    Replica {
        key: GroupKey,
        from: Origin,
        applied: Applied,
        lock: u64,
    },
    /// A replica reading a part the primary fetches (read repair) or
    /// verifies (scrub: `verify`, answered with a digest), under lock
    /// `lock`.
    ReplicaFetch {
        key: GroupKey,
        from: Origin,
        fetch_id: u64,
        verify: bool,
        lock: u64,
    },
    /// A primary reading its whole blocks around write task `task` to
    /// mend members that could not apply it. Only a read: an aborted
    /// session needs nothing from it.
    MendRead { key: GroupKey, gen: u64, task: u64 },
    /// A replica flushing.
    ReplicaFlush {
        key: GroupKey,
        interval: Epoch,
        primary: NodeId,
        flush_id: u64,
    },
    /// An aborted task's operation, still holding its lock.
    Orphan {
        key: GroupKey,
        ext: ExtentId,
        lock: u64,
    },
}

/// Work waiting for a lock.
#[derive(Debug)]
enum Waiting {
    Task { gen: u64, task: u64 },
    Replica { from: Origin, work: ReplicaWork },
}

/// Which primary, in which interval, asked a replica for work on which
/// extent.
#[derive(Debug, Clone, Copy)]
struct Origin {
    interval: Epoch,
    primary: NodeId,
    ext: ExtentId,
}

/// A replica's work on an extent.
#[derive(Debug)]
enum ReplicaWork {
    Write {
        seq: Seq,
        op: WriteOp,
        fua: bool,
    },
    Push {
        push_id: u64,
        seq: Option<Seq>,
        part: Part,
        data: Option<Bytes>,
    },
    /// Read repair: read this part for the primary. Scrub (`verify`):
    /// read it and answer its digest.
    Fetch {
        fetch_id: u64,
        part: Part,
        verify: bool,
    },
}

/// What a replica acknowledges once its disk operation is done.
#[derive(Debug, Clone)]
enum Applied {
    Write(Seq),
    /// A push: its id, the log entry it leaves once it is on disk, and the
    /// part it replaced.
    Push(u64, Option<Seq>, Part),
}

/// A replica's view of one interval of a group.
#[derive(Debug)]
struct Session {
    interval: Epoch,
    /// The incarnation of this node (its `up_since`) that the primary's
    /// SyncDone covered. Only then do forwards raise the committed
    /// watermark: a node that went down and came back in the same interval
    /// missed the writes of its absence, and must not call them committed
    /// before its new sync has pushed them.
    synced_as: Option<Epoch>,
    /// Forwarded writes seen, and whether they are applied.
    applied: BTreeMap<Seq, bool>,
    /// Every forwarded write at or below it is applied (or was never sent
    /// here, having been committed before this replica joined).
    floor: Seq,
    /// Pushes seen, and whether they are applied.
    pushes: BTreeMap<u64, bool>,
    /// Per extent, the highest `seq` of a push received: the primary read
    /// the pushed copy after every write up to it was done there, so a
    /// forward of one of them that arrives later (delayed in the network,
    /// sent before this replica was dropped and synced again) is already
    /// in it, and applying it would put older bytes over newer ones.
    pushed: BTreeMap<ExtentId, Seq>,
    /// Per extent, the highest `seq` of a forward received. A push with a
    /// lower `seq` was read before that write began (a push holds the
    /// whole extent until this replica acks it), so it is a late copy from
    /// an earlier sync and must not put its older bytes over the write.
    forwarded: BTreeMap<ExtentId, Seq>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum MemberState {
    /// Asked for its report.
    Querying,
    /// Receiving pushes; `pending` extents still to go.
    Syncing { pending: BTreeSet<ExtentId> },
    /// Up to date.
    Synced,
}

#[derive(Debug)]
struct Member {
    up_since: Epoch,
    state: MemberState,
    /// In the acting set: writes wait for it, whatever happens.
    acting: bool,
    /// Claimed into the acting set (last sent at); writes wait for it too.
    claimed_at: Option<u64>,
    last_heard: u64,
    sent_at: u64,
    pushed: usize,
}

impl Member {
    fn receives_writes(&self) -> bool {
        !matches!(self.state, MemberState::Querying)
    }
}

#[derive(Debug)]
enum Task {
    Write {
        client: Option<(ClientId, u64)>,
        seq: Seq,
        ext: ExtentId,
        op: WriteOp,
        fua: bool,
        lock: u64,
        started: bool,
        local_done: bool,
        failed: Option<String>,
        waiting: BTreeSet<NodeId>,
        sent_at: u64,
        replied: bool,
        /// A compare-and-write before its compare: the bytes the range
        /// must hold. Until then the task holds its lock but has not
        /// started (nothing journaled, nothing forwarded).
        compare: Option<Bytes>,
        /// Members that could not apply the write (`ForwardFailed`): each
        /// gets it again as the primary's whole blocks around it (a write
        /// of whole blocks replaces a bad block instead of merging into
        /// it), once the local write is done.
        mends: BTreeMap<NodeId, Mend>,
    },
    Read {
        client: (ClientId, u64),
        ext: ExtentId,
        offset: u64,
        len: u64,
        lock: u64,
    },
    Push {
        ext: ExtentId,
        part: Part,
        lock: u64,
        started: bool,
        data: Option<Option<Bytes>>,
        seq: Option<Seq>,
        /// member -> push id
        waiting: BTreeMap<NodeId, u64>,
        sent_at: u64,
        /// The failed write this push helps settle (`Primary::settling`).
        settles: Option<Seq>,
        /// The ranges as this node reads them through the chain, stored
        /// into the replica's version even where this node stores none at
        /// this epoch (a scrub's push: the bad block may be in a version
        /// beneath, which a push of this version alone would not replace).
        merged: bool,
        /// It waits its turn among [`Config::pushes_max`] (a push to a
        /// member joining the acting set).
        budgeted: bool,
        /// Its turn came (or it never waited): it has queued for its
        /// extent's lock. Until then it waits in [`Node::push_queue`].
        admitted: bool,
        /// Times sent again; each resend waits twice as long as the last
        /// (up to 8 `retry_ms`): a push unanswered because the link or the
        /// replica's disk is busy is not sent again every `retry_ms`.
        resends: u32,
    },
    Flush {
        client: (ClientId, u64),
        local_done: bool,
        /// member -> flush id
        waiting: BTreeMap<NodeId, u64>,
        sent_at: u64,
    },
    /// See [`ClientOp::Scrub`].
    Scrub {
        client: (ClientId, u64),
        ext: ExtentId,
        offset: u64,
        len: u64,
        lock: u64,
        /// The CRC32 of this node's copy of the range, once read.
        digest: Option<u32>,
        /// This node's copy was repaired from a replica before it read.
        repaired: bool,
        /// When the members were asked (a read again after a repair does
        /// not ask them again).
        asked_at: Option<u64>,
        /// Synced members asked for their digest: member -> verify id.
        waiting: BTreeMap<NodeId, u64>,
        /// Their answers.
        answers: BTreeMap<NodeId, Result<u32, String>>,
        /// Members that did not answer within `sync_timeout_ms` of being
        /// asked: not compared, and not pushed to (a frozen member must
        /// not hold the range's lock).
        silent: Vec<NodeId>,
        sent_at: u64,
    },
}

/// The primary's state for one interval of a group.
#[derive(Debug)]
struct Primary {
    gen: u64,
    interval: Epoch,
    active: bool,
    /// Every acting member reported and its pushes are under way.
    peered: bool,
    /// The counter of the next write's sequence number.
    next_n: u64,
    /// Reports received while peering.
    reports: BTreeMap<NodeId, SyncState>,
    committed: Seq,
    /// Counters of completed writes above `committed`.
    done_above: BTreeSet<u64>,
    members: BTreeMap<NodeId, Member>,
    tasks: BTreeMap<u64, Task>,
    by_seq: BTreeMap<Seq, u64>,
    by_push: BTreeMap<u64, (u64, NodeId)>,
    by_flush: BTreeMap<u64, (u64, NodeId)>,
    /// Writes that failed here, with the pushes of this node's copy still
    /// to finish before they count as done (`seq_done`).
    settling: BTreeMap<Seq, usize>,
    /// Read repairs, by task.
    repairs: BTreeMap<u64, Repair>,
    /// fetch id -> task
    by_fetch: BTreeMap<u64, u64>,
    /// verify id -> scrub task
    by_verify: BTreeMap<u64, u64>,
    pushed_at_peering: usize,
}

/// A primary task's read repair. Its local read (a client read, a
/// compare-and-write's compare, or a push's read of the copy to push)
/// failed: the store found a block whose checksum does not match, or the
/// disk failed the read. Every acting replica holds the same bytes for the
/// part (the task holds its range lock, so no write to it is in flight),
/// so one of them is asked for its copy, which is stored here; then the
/// task reads again. The task keeps its lock throughout.
#[derive(Debug)]
struct Repair {
    ext: ExtentId,
    /// Whole blocks around what the task reads, or the whole extent.
    part: Part,
    /// The local error that started it, and those of replicas asked since.
    error: String,
    /// The replica asked now, by which fetch.
    from: NodeId,
    fetch_id: u64,
    /// Replicas asked so far.
    tried: BTreeSet<NodeId>,
    /// When `from` was first asked, and last.
    asked_at: u64,
    sent_at: u64,
    /// The fetched copy is being stored here.
    putting: bool,
    /// It was stored: the task's read runs again, and if that fails too
    /// the failure is final.
    stored: bool,
}

/// A member that could not apply a write (see `Task::Write::mends`): it
/// gets the write again as this node's whole blocks around it, same
/// sequence number, once they are read here.
#[derive(Debug, Default)]
struct Mend {
    /// This node's whole blocks around the write, after the write.
    data: Option<Bytes>,
}

impl Primary {
    /// An acting replica not yet asked that may supply a copy, and its
    /// incarnation: up-to-date replicas first.
    fn repair_source(&self, tried: &BTreeSet<NodeId>) -> Option<(NodeId, Epoch)> {
        let mut candidates: Vec<(bool, NodeId, Epoch)> = self
            .members
            .iter()
            .filter(|(n, m)| m.acting && !tried.contains(n))
            .map(|(n, m)| (m.state != MemberState::Synced, *n, m.up_since))
            .collect();
        candidates.sort_unstable();
        candidates.first().map(|&(_, n, up)| (n, up))
    }
}

impl Primary {
    /// Write `seq` is finished (or, a compare-and-write that wrote nothing,
    /// never will be): the committed watermark moves past every finished
    /// one in a row. Returns the watermark.
    fn seq_done(&mut self, seq: Seq) -> Seq {
        self.by_seq.remove(&seq);
        self.done_above.insert(seq.n);
        while self.done_above.first() == Some(&(self.committed.n + 1)) {
            self.done_above.pop_first();
            self.committed.n += 1;
        }
        self.committed
    }
}

#[derive(Debug)]
struct Group {
    d: GroupDurable,
    known_interval: Epoch,
    session: Option<Session>,
    primary: Option<Primary>,
    locks: Locks,
    waiting: BTreeMap<u64, Waiting>,
    last_sync_request: Option<u64>,
}

#[derive(Debug, Default)]
struct ClientWindow {
    low: u64,
    done: BTreeSet<u64>,
    /// Compare-and-writes that found other bytes, with those bytes: a
    /// duplicate gets the same answer and never writes later.
    miscompared: BTreeMap<u64, Bytes>,
    abandoned: BTreeSet<u64>,
    inflight: BTreeSet<u64>,
}

/// One chunk server's group protocol state.
#[derive(Debug)]
pub struct Node {
    me: NodeId,
    cfg: Config,
    now: u64,
    map: GroupMap,
    up_since: Option<Epoch>,
    lease_until: u64,
    /// The last tick found no group with a timer that can fire, and no
    /// input has arrived since: the next tick has nothing to do either
    /// (what it acts on changes only through the `on_*` inputs). Keeps an
    /// idle node from scanning every group 20 times a second.
    settled: bool,
    groups: BTreeMap<GroupKey, Group>,
    next_id: u64,
    disk: HashMap<OpId, DiskCtx>,
    clients: HashMap<ClientId, ClientWindow>,
    out: Vec<Output>,
    /// Pushes waiting for their turn ([`Config::pushes_max`]), by task id
    /// (oldest first): the group and its primary session's generation. An
    /// entry whose session ended is skipped when its turn comes.
    push_queue: BTreeMap<u64, (GroupKey, u64)>,
}

impl Node {
    /// A node starting with what its journal holds. It serves nothing until
    /// a map shows it up ([`Node::on_map`]).
    pub fn new(me: NodeId, cfg: Config, durable: Durable, now: u64) -> Self {
        let groups = durable
            .groups
            .into_iter()
            .map(|(k, d)| (k, Group::new(d)))
            .collect();
        Node {
            me,
            cfg,
            now,
            map: GroupMap::default(),
            up_since: None,
            lease_until: 0,
            settled: false,
            groups,
            next_id: 1,
            disk: HashMap::new(),
            clients: HashMap::new(),
            out: Vec::new(),
            push_queue: BTreeMap::new(),
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.me
    }

    /// The newest map this node has.
    pub fn map(&self) -> &GroupMap {
        &self.map
    }

    /// Takes the outputs produced so far, in order.
    pub fn drain(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    /// The group's journal state as this node holds it (for checks).
    pub fn durable(&self, key: GroupKey) -> Option<&GroupDurable> {
        self.groups.get(&key).map(|g| &g.d)
    }

    /// Every group's journal state, for rewriting the journal compactly.
    pub fn durables(&self) -> impl Iterator<Item = (GroupKey, &GroupDurable)> {
        self.groups.iter().map(|(k, g)| (*k, &g.d))
    }

    /// Whether any request, push, forward or disk operation is still under
    /// way on this node.
    pub fn busy(&self) -> bool {
        !self.disk.is_empty()
            || self.groups.values().any(|g| {
                !g.locks.is_empty() || g.primary.as_ref().is_some_and(|p| !p.tasks.is_empty())
            })
    }

    /// Whether this node is the active primary of `key`.
    pub fn is_active_primary(&self, key: GroupKey) -> bool {
        self.groups
            .get(&key)
            .and_then(|g| g.primary.as_ref())
            .is_some_and(|p| p.active)
    }

    /// Moves the clock without doing periodic work (the driver calls it
    /// before every input, so that a node resumed after a pause sees the
    /// time that passed).
    pub fn set_clock(&mut self, now: u64) {
        self.now = self.now.max(now);
    }

    /// The volume manager confirmed this node's heartbeat: it may serve reads
    /// until `until`. `map_epoch` is the volume manager's current epoch; a
    /// node that has an older map asks for the newer one.
    pub fn on_lease(&mut self, until: u64, map_epoch: Epoch) {
        self.settled = false;
        self.lease_until = self.lease_until.max(until);
        if map_epoch > self.map.epoch {
            self.out.push(Output::NeedMap(map_epoch));
        }
    }

    fn id_next(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    // ----------------------------------------------------------------- map

    /// A newer map (older ones are ignored).
    pub fn on_map(&mut self, map: GroupMap) {
        self.settled = false;
        if map.epoch <= self.map.epoch && self.map.epoch != 0 {
            return;
        }
        self.map = map;
        self.up_since = self.map.up_since(self.me);
        let keys: Vec<GroupKey> = self
            .map
            .groups
            .iter()
            .filter(|(_, g)| g.placement.contains(&self.me) || g.acting.contains(&self.me))
            .map(|(k, _)| *k)
            .chain(self.groups.keys().copied())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for key in keys {
            self.refresh(key);
        }
    }

    /// Brings the roles of `key` in line with the map.
    fn refresh(&mut self, key: GroupKey) {
        let Some(gv) = self.map.groups.get(&key).cloned() else {
            return;
        };
        let me = self.me;
        let is_primary = self.up_since.is_some() && self.map.primary(key) == Some(me);
        let g = self
            .groups
            .entry(key)
            .or_insert_with(|| Group::new(GroupDurable::default()));
        if gv.interval > g.known_interval {
            g.known_interval = gv.interval;
        }
        if g.session
            .as_ref()
            .is_some_and(|s| s.interval < g.known_interval)
        {
            g.session = None;
            let known = g.known_interval;
            self.cancel_replica_waiting(key, known);
        }
        let g = self.groups.get_mut(&key).expect("exists");
        // A replica may already have told us of a newer interval than this
        // map has (a late map): never serve an interval older than that.
        let is_primary = is_primary && gv.interval >= g.known_interval;
        let keep = is_primary
            && g.primary
                .as_ref()
                .is_some_and(|p| p.interval == gv.interval);
        if !keep {
            self.abort_primary(key);
            if is_primary {
                self.start_primary(key);
            }
            return;
        }
        // Same interval: drop rejoining members the map no longer allows.
        // A member with a claim out stays while its incarnation does, placed
        // or not: the claim may still be granted (it was made in this
        // interval, and the member may be placed again by then: out, then
        // in), and it says the member holds every write of the interval, so
        // it must go on getting them. (Dropped here, it missed writes, and
        // a claim delivered after the placement came back made it acting
        // without them: simulator seeds 160660 and 376929, with placement
        // moves.)
        let map = &self.map;
        let g = self.groups.get_mut(&key).expect("exists");
        let p = g.primary.as_mut().expect("kept");
        let gone: Vec<NodeId> = p
            .members
            .iter()
            .filter(|(n, m)| {
                !m.acting
                    && (map.up_since(**n) != Some(m.up_since)
                        || (!gv.placement.contains(n) && m.claimed_at.is_none()))
            })
            .map(|(n, _)| *n)
            .collect();
        for n in gone {
            self.drop_member(key, n);
        }
    }

    // ------------------------------------------------------------ primary

    fn start_primary(&mut self, key: GroupKey) {
        let gen = self.id_next();
        let gv = self.map.groups[&key].clone();
        let now = self.now;
        let mut members = BTreeMap::new();
        for &n in gv.acting.iter().filter(|&&n| n != self.me) {
            // Acting members are up unless they are the last (and then we
            // would not be primary); an unknown node cannot answer anyway.
            let up_since = self.map.nodes.get(&n).map(|v| v.up_since).unwrap_or(0);
            members.insert(
                n,
                Member {
                    up_since,
                    state: MemberState::Querying,
                    acting: true,
                    claimed_at: None,
                    last_heard: now,
                    sent_at: now,
                    pushed: 0,
                },
            );
        }
        let g = self.groups.get_mut(&key).expect("refresh made it");
        g.primary = Some(Primary {
            gen,
            interval: gv.interval,
            active: false,
            peered: false,
            next_n: 1,
            reports: BTreeMap::new(),
            committed: Seq {
                interval: gv.interval,
                n: 0,
            },
            done_above: BTreeSet::new(),
            members,
            tasks: BTreeMap::new(),
            by_seq: BTreeMap::new(),
            by_push: BTreeMap::new(),
            by_flush: BTreeMap::new(),
            settling: BTreeMap::new(),
            repairs: BTreeMap::new(),
            by_fetch: BTreeMap::new(),
            by_verify: BTreeMap::new(),
            pushed_at_peering: 0,
        });
        let queries: Vec<(NodeId, Epoch)> = g
            .primary
            .as_ref()
            .expect("just set")
            .members
            .iter()
            .map(|(n, m)| (*n, m.up_since))
            .collect();
        for (n, up_since) in queries {
            self.send(
                n,
                key,
                gv.interval,
                PeerMsg::SyncQuery {
                    to_up_since: up_since,
                },
            );
        }
        self.maybe_finish_peering(key);
    }

    /// Ends the primary session of `key`: every client request in it is
    /// answered `Busy` (the client retries), locks are released, and disk
    /// operations still running keep their locks until they end.
    fn abort_primary(&mut self, key: GroupKey) {
        let Some(g) = self.groups.get_mut(&key) else {
            return;
        };
        let Some(p) = g.primary.take() else {
            return;
        };
        let gen = p.gen;
        // Disk operations of this session still in flight keep their locks.
        let mut running: BTreeMap<u64, OpId> = BTreeMap::new();
        for (op, ctx) in &self.disk {
            if let DiskCtx::Task {
                key: k,
                gen: g2,
                task,
            } = ctx
            {
                if *k == key && *g2 == gen {
                    running.insert(*task, *op);
                }
            }
        }
        let mut replies = Vec::new();
        let mut releases = Vec::new();
        for (tid, t) in p.tasks {
            let (ext, lock, client) = match t {
                Task::Write {
                    client,
                    ext,
                    lock,
                    replied,
                    ..
                } => (ext, lock, if replied { None } else { client }),
                Task::Read {
                    client, ext, lock, ..
                }
                | Task::Scrub {
                    client, ext, lock, ..
                } => (ext, lock, Some(client)),
                Task::Push { ext, lock, .. } => (ext, lock, None),
                Task::Flush { client, .. } => {
                    replies.push(client);
                    continue;
                }
            };
            if let Some(c) = client {
                replies.push(c);
            }
            g.waiting.remove(&lock);
            match running.get(&tid) {
                Some(op) => {
                    self.disk.insert(*op, DiskCtx::Orphan { key, ext, lock });
                }
                None => releases.push((ext, lock)),
            }
        }
        for (client, id) in replies {
            if let Some(w) = self.clients.get_mut(&client) {
                w.inflight.remove(&id);
            }
            self.out.push(Output::Reply(ClientReply {
                client,
                id,
                result: Err(Refusal::Busy),
            }));
        }
        for (ext, lock) in releases {
            self.release(key, ext, lock);
        }
    }

    fn maybe_finish_peering(&mut self, key: GroupKey) {
        let bug = self.cfg.bug;
        let g = self.groups.get_mut(&key).expect("exists");
        let p = g.primary.as_mut().expect("primary");
        if p.peered {
            return;
        }
        if p.members
            .iter()
            .any(|(n, m)| m.acting && !p.reports.contains_key(n))
        {
            return;
        }
        p.peered = true;
        let reports = std::mem::take(&mut p.reports);
        let mut sets = Vec::new();
        for (n, r) in reports {
            let set = if bug == Some(Bug::NoPeeringPush) {
                BTreeMap::new()
            } else {
                push_set(&g.d, &r, bug)
            };
            sets.push((n, set));
        }
        for (n, set) in sets {
            self.begin_sync(key, n, set);
        }
        self.maybe_activate(key);
    }

    /// Starts pushes of `set` to member `n` (now receiving writes).
    fn begin_sync(&mut self, key: GroupKey, n: NodeId, set: BTreeMap<ExtentId, Part>) {
        let g = self.groups.get_mut(&key).expect("exists");
        let p = g.primary.as_mut().expect("primary");
        let Some(m) = p.members.get_mut(&n) else {
            return;
        };
        m.pushed = set.len();
        m.state = MemberState::Syncing {
            pending: set.keys().copied().collect(),
        };
        // An acting member's sync holds the group's activation (no client
        // I/O until it is done), and covers only recent changes: its pushes
        // go at once. A member joining the acting set (rejoin, a new
        // placement) may need whole extents: its pushes wait their turn.
        let wait_turn = !m.acting;
        if !p.active {
            p.pushed_at_peering += set.len();
        }
        for (ext, want) in set {
            // Join an unstarted push of the same extent (pushing the union
            // of both parts), else start one.
            let g = self.groups.get_mut(&key).expect("exists");
            let p = g.primary.as_mut().expect("primary");
            let joined = p.tasks.values_mut().any(|t| match t {
                Task::Push {
                    ext: e,
                    started: false,
                    merged: false,
                    part,
                    waiting,
                    admitted,
                    ..
                } if *e == ext && (*admitted || wait_turn) => {
                    *part = part.union(&want);
                    waiting.insert(n, 0);
                    true
                }
                _ => false,
            });
            if joined {
                continue;
            }
            self.start_push_as(key, n, ext, want, None, false, wait_turn);
        }
        self.maybe_member_synced(key, n);
    }

    fn maybe_member_synced(&mut self, key: GroupKey, n: NodeId) {
        let interval;
        let committed;
        let up_since;
        let acting;
        {
            let g = self.groups.get_mut(&key).expect("exists");
            let p = g.primary.as_mut().expect("primary");
            interval = p.interval;
            committed = p.committed;
            let Some(m) = p.members.get_mut(&n) else {
                return;
            };
            match &m.state {
                MemberState::Syncing { pending } if pending.is_empty() => {}
                _ => return,
            }
            m.state = MemberState::Synced;
            up_since = m.up_since;
            acting = m.acting;
        }
        if acting {
            // Told at activation: until every acting member holds the
            // primary's copy, no watermark may call an extent certain.
            self.maybe_activate(key);
            return;
        }
        self.send(
            n,
            key,
            interval,
            PeerMsg::SyncDone {
                to_up_since: up_since,
                committed,
            },
        );
        self.claim(key, n);
    }

    fn claim(&mut self, key: GroupKey, n: NodeId) {
        let now = self.now;
        let g = self.groups.get_mut(&key).expect("exists");
        let p = g.primary.as_mut().expect("primary");
        let interval = p.interval;
        let Some(m) = p.members.get_mut(&n) else {
            return;
        };
        m.claimed_at = Some(now);
        let (up_since, pushed) = (m.up_since, m.pushed);
        self.out.push(Output::Claim(Claim {
            key,
            primary: self.me,
            interval,
            node: n,
            up_since,
        }));
        self.out.push(Output::Trace(Trace::Claimed {
            key,
            node: n,
            pushed,
        }));
    }

    fn maybe_activate(&mut self, key: GroupKey) {
        let g = self.groups.get_mut(&key).expect("exists");
        let Some(p) = g.primary.as_mut() else {
            return;
        };
        if p.active || !p.peered {
            return;
        }
        if p.members
            .values()
            .any(|m| m.acting && m.state != MemberState::Synced)
        {
            return;
        }
        p.active = true;
        let (interval, committed, pushed) = (p.interval, p.committed, p.pushed_at_peering);
        // `committed` is (interval, 0): every write of earlier intervals that
        // was acknowledged anywhere. Every acting member now holds the same
        // bytes as this primary, so the watermark holds for all of them.
        let done: Vec<(NodeId, Epoch)> = p
            .members
            .iter()
            .filter(|(_, m)| m.acting)
            .map(|(n, m)| (*n, m.up_since))
            .collect();
        self.raise_committed(key, committed);
        for (n, up_since) in done {
            self.send(
                n,
                key,
                interval,
                PeerMsg::SyncDone {
                    to_up_since: up_since,
                    committed,
                },
            );
        }
        self.out.push(Output::Trace(Trace::Activated {
            key,
            interval,
            pushed,
        }));
    }

    /// Removes a rejoining member: its pushes and acks are no longer awaited.
    fn drop_member(&mut self, key: GroupKey, n: NodeId) {
        let g = self.groups.get_mut(&key).expect("exists");
        let Some(p) = g.primary.as_mut() else {
            return;
        };
        if p.members.remove(&n).is_none() {
            return;
        }
        let mut touched = Vec::new();
        for (tid, t) in p.tasks.iter_mut() {
            let hit = match t {
                Task::Write { waiting, .. } => waiting.remove(&n),
                Task::Push { waiting, .. } => waiting.remove(&n).is_some(),
                Task::Flush { waiting, .. } => waiting.remove(&n).is_some(),
                Task::Scrub { waiting, .. } => match waiting.remove(&n) {
                    Some(vid) => {
                        p.by_verify.remove(&vid);
                        true
                    }
                    None => false,
                },
                Task::Read { .. } => false,
            };
            if hit {
                touched.push(*tid);
            }
        }
        for tid in touched {
            self.check_task(key, tid);
        }
    }

    // ------------------------------------------------------------ clients

    /// A client request (to this node as the group's primary).
    pub fn on_client(&mut self, req: ClientRequest) {
        self.settled = false;
        let key = req.key;
        let reply = |r: Refusal| {
            Output::Reply(ClientReply {
                client: req.client,
                id: req.id,
                result: Err(r),
            })
        };
        if req.epoch > self.map.epoch {
            self.out.push(Output::NeedMap(req.epoch));
            self.out.push(reply(Refusal::NodeBehind));
            return;
        }
        let current = self.map.epoch;
        if self.up_since.is_none() || self.map.primary(key) != Some(self.me) {
            self.out.push(reply(Refusal::NotPrimary { current }));
            return;
        }
        let gv = &self.map.groups[&key];
        if req.epoch < gv.interval {
            self.out.push(reply(Refusal::StaleEpoch { current }));
            return;
        }
        let acting = gv.acting.len() as u32;
        let active = self
            .groups
            .get(&key)
            .and_then(|g| g.primary.as_ref())
            .is_some_and(|p| p.active);
        if !active {
            self.out.push(reply(Refusal::Busy));
            return;
        }
        // Late copies and duplicates.
        let w = self.clients.entry(req.client).or_default();
        if req.id < w.low {
            return;
        }
        if req.oldest_outstanding > w.low {
            w.low = req.oldest_outstanding;
            let low = w.low;
            w.done = w.done.split_off(&low);
            w.miscompared = w.miscompared.split_off(&low);
            w.abandoned = w.abandoned.split_off(&low);
        }
        w.abandoned
            .extend(req.abandoned.iter().filter(|&&a| a >= w.low));
        if w.abandoned.contains(&req.id) {
            return;
        }
        match req.op {
            ClientOp::Write { ext, op, fua } => {
                if acting < req.min_replicas {
                    self.out.push(reply(Refusal::Degraded {
                        acting,
                        min: req.min_replicas,
                    }));
                    return;
                }
                if w.done.contains(&req.id) {
                    self.out.push(Output::Reply(ClientReply {
                        client: req.client,
                        id: req.id,
                        result: Ok(None),
                    }));
                    return;
                }
                if !w.inflight.insert(req.id) {
                    return;
                }
                self.new_write(key, Some((req.client, req.id)), ext, op, fua, None);
            }
            ClientOp::CompareAndWrite {
                ext,
                offset,
                compare,
                data,
                fua,
            } => {
                if acting < req.min_replicas {
                    self.out.push(reply(Refusal::Degraded {
                        acting,
                        min: req.min_replicas,
                    }));
                    return;
                }
                let answered = if w.done.contains(&req.id) {
                    Some(None)
                } else {
                    w.miscompared.get(&req.id).map(|f| Some(f.clone()))
                };
                if let Some(result) = answered {
                    self.out.push(Output::Reply(ClientReply {
                        client: req.client,
                        id: req.id,
                        result: Ok(result),
                    }));
                    return;
                }
                // The compare reads, so it needs the read lease as a read
                // does: a deposed primary would compare stale bytes (it
                // could not write, but could answer a false miscompare).
                if self.now >= self.lease_until {
                    self.out.push(reply(Refusal::Busy));
                    return;
                }
                if compare.len() != data.len() {
                    self.out.push(reply(Refusal::Io(format!(
                        "{ext}: compare-and-write compares {} bytes but writes {}",
                        compare.len(),
                        data.len()
                    ))));
                    return;
                }
                if !w.inflight.insert(req.id) {
                    return;
                }
                let op = WriteOp::Data { offset, data };
                self.new_write(key, Some((req.client, req.id)), ext, op, fua, Some(compare));
            }
            op @ (ClientOp::Read { .. } | ClientOp::Scrub { .. }) => {
                // Under the read lease: a deposed primary would read stale
                // bytes (a scrub would compare them; its pushes would be
                // refused, but its answer would be wrong).
                if self.now >= self.lease_until {
                    self.out.push(reply(Refusal::Busy));
                    return;
                }
                let tid = self.id_next();
                let lock = self.id_next();
                let client = (req.client, req.id);
                let (ext, range, task) = match op {
                    ClientOp::Read { ext, offset, len } => (
                        ext,
                        (offset, offset + len),
                        Task::Read {
                            client,
                            ext,
                            offset,
                            len,
                            lock,
                        },
                    ),
                    ClientOp::Scrub { ext, offset, len } => (
                        ext,
                        (offset, offset + len),
                        Task::Scrub {
                            client,
                            ext,
                            offset,
                            len,
                            lock,
                            digest: None,
                            repaired: false,
                            asked_at: None,
                            waiting: BTreeMap::new(),
                            answers: BTreeMap::new(),
                            silent: Vec::new(),
                            sent_at: 0,
                        },
                    ),
                    _ => unreachable!("matched above"),
                };
                let g = self.groups.get_mut(&key).expect("active");
                let p = g.primary.as_mut().expect("active");
                let gen = p.gen;
                p.tasks.insert(tid, task);
                self.queue(key, ext, range, lock, Waiting::Task { gen, task: tid });
            }
            ClientOp::Flush => {
                let tid = self.id_next();
                let op = self.id_next();
                let now = self.now;
                let g = self.groups.get_mut(&key).expect("active");
                let p = g.primary.as_mut().expect("active");
                let gen = p.gen;
                let interval = p.interval;
                let mut waiting = BTreeMap::new();
                let mut sends = Vec::new();
                for (n, m) in &p.members {
                    if m.receives_writes() {
                        let fid = self.next_id;
                        self.next_id += 1;
                        waiting.insert(*n, fid);
                        p.by_flush.insert(fid, (tid, *n));
                        sends.push((*n, m.up_since, fid));
                    }
                }
                p.tasks.insert(
                    tid,
                    Task::Flush {
                        client: (req.client, req.id),
                        local_done: false,
                        waiting,
                        sent_at: now,
                    },
                );
                self.disk.insert(
                    op,
                    DiskCtx::Task {
                        key,
                        gen,
                        task: tid,
                    },
                );
                self.out.push(Output::Disk {
                    id: op,
                    req: DiskReq::Flush,
                });
                for (n, up_since, flush_id) in sends {
                    self.send(
                        n,
                        key,
                        interval,
                        PeerMsg::Flush {
                            to_up_since: up_since,
                            flush_id,
                        },
                    );
                }
            }
        }
    }

    fn new_write(
        &mut self,
        key: GroupKey,
        client: Option<(ClientId, u64)>,
        ext: ExtentId,
        op: WriteOp,
        fua: bool,
        compare: Option<Bytes>,
    ) {
        let tid = self.id_next();
        let lock = self.id_next();
        let g = self.groups.get_mut(&key).expect("active");
        let p = g.primary.as_mut().expect("active");
        let seq = Seq {
            interval: p.interval,
            n: p.next_n,
        };
        p.next_n += 1;
        p.by_seq.insert(seq, tid);
        let gen = p.gen;
        let range = op.range();
        p.tasks.insert(
            tid,
            Task::Write {
                client,
                seq,
                ext,
                op,
                fua,
                lock,
                started: false,
                local_done: false,
                failed: None,
                waiting: BTreeSet::new(),
                sent_at: 0,
                replied: false,
                compare,
                mends: BTreeMap::new(),
            },
        );
        // Whole blocks: two writes to one block never run at once, so a
        // mend (which pushes whole blocks) never carries a neighbour's
        // bytes that are still on their way to the replica.
        let range = blocks_around(range, self.cfg.block_bytes);
        self.queue(key, ext, range, lock, Waiting::Task { gen, task: tid });
    }

    // ------------------------------------------------------------- locks

    /// Queues `w` under lock `lock` on `range` of `ext`; starts it at once
    /// if nothing earlier overlaps.
    fn queue(&mut self, key: GroupKey, ext: ExtentId, range: (u64, u64), lock: u64, w: Waiting) {
        let g = self.groups.get_mut(&key).expect("exists");
        g.waiting.insert(lock, w);
        if g.locks.acquire(ext, range, lock) {
            self.granted(key, lock);
        }
    }

    /// Raises the group's committed watermark to `seq` (journaled) if it is
    /// higher.
    fn raise_committed(&mut self, key: GroupKey, seq: Seq) {
        let g = self.groups.get_mut(&key).expect("exists");
        if seq > g.d.committed {
            g.d.committed = seq;
            self.out
                .push(Output::Journal(JournalRecord::Committed { key, seq }));
        }
    }

    fn release(&mut self, key: GroupKey, ext: ExtentId, lock: u64) {
        let Some(g) = self.groups.get_mut(&key) else {
            return;
        };
        for l in g.locks.release(ext, lock) {
            self.granted(key, l);
        }
    }

    /// Lock `lock` of `key` was granted: start its work.
    fn granted(&mut self, key: GroupKey, lock: u64) {
        let g = self.groups.get_mut(&key).expect("exists");
        let Some(w) = g.waiting.remove(&lock) else {
            return;
        };
        match w {
            Waiting::Task { gen, task } => self.start_task(key, gen, task),
            Waiting::Replica { from, work } => {
                let id = self.id_next();
                let ext = from.ext;
                if let ReplicaWork::Fetch {
                    fetch_id,
                    part,
                    verify,
                } = work
                {
                    // Read repair: nothing changes here, nothing is journaled.
                    // Ranges are read whether or not this version is stored
                    // (the primary's lock covers only them); the whole
                    // extent as a push reads it (the lock covers it all).
                    let req = match part {
                        Part::Ranges(ranges) => DiskReq::ReadRanges { ext, ranges },
                        Part::Whole => DiskReq::ReadExtent {
                            ext,
                            part: Part::Whole,
                        },
                    };
                    self.disk.insert(
                        id,
                        DiskCtx::ReplicaFetch {
                            key,
                            from,
                            fetch_id,
                            verify,
                            lock,
                        },
                    );
                    self.out.push(Output::Disk { id, req });
                    return;
                }
                let cap = self.cfg.recent_max;
                let g = self.groups.get_mut(&key).expect("exists");
                let (record, req, applied) = match work {
                    ReplicaWork::Write { seq, op, fua } => {
                        let (start, end) = op.range();
                        let part = Part::range(start, end);
                        g.d.note_write(ext, seq, &part, cap);
                        (
                            Some((seq, part)),
                            DiskReq::Write { ext, op, fua },
                            Applied::Write(seq),
                        )
                    }
                    ReplicaWork::Push {
                        push_id,
                        seq,
                        part,
                        data,
                    } => (
                        None,
                        DiskReq::PutExtent {
                            ext,
                            part: part.clone(),
                            data,
                        },
                        Applied::Push(push_id, seq, part),
                    ),
                    ReplicaWork::Fetch { .. } => unreachable!("started above"),
                };
                // A write is journaled before it starts: from then on the
                // extent counts as uncertain here. A push lowers the entry
                // (it may end the uncertainty), so it is journaled only once
                // it is on disk: a crash in between leaves the extent
                // uncertain and it is pushed again.
                if let Some((seq, part)) = record {
                    self.out.push(Output::Journal(JournalRecord::Log {
                        key,
                        ext,
                        seq: Some(seq),
                        write: true,
                        part,
                    }));
                }
                self.disk.insert(
                    id,
                    DiskCtx::Replica {
                        key,
                        from,
                        applied,
                        lock,
                    },
                );
                self.out.push(Output::Disk { id, req });
            }
        }
    }

    fn start_task(&mut self, key: GroupKey, gen: u64, tid: u64) {
        let now = self.now;
        let op_id = self.id_next();
        let g = self.groups.get_mut(&key).expect("exists");
        let Some(p) = g.primary.as_mut().filter(|p| p.gen == gen) else {
            return;
        };
        let interval = p.interval;
        let committed = p.committed;
        let targets: Vec<(NodeId, Epoch)> = p
            .members
            .iter()
            .filter(|(_, m)| m.receives_writes())
            .map(|(n, m)| (*n, m.up_since))
            .collect();
        let Some(t) = p.tasks.get_mut(&tid) else {
            return;
        };
        match t {
            Task::Write {
                ext,
                op,
                compare: Some(_),
                ..
            } => {
                // Read what is there first; the write starts once it
                // matches (task_disk_done), under the lock held now.
                let (offset, end) = op.range();
                let req = DiskReq::Read {
                    ext: *ext,
                    offset,
                    len: end - offset,
                };
                self.task_disk(op_id, key, gen, tid, req);
            }
            Task::Write {
                seq,
                ext,
                op,
                fua,
                started,
                waiting,
                sent_at,
                ..
            } => {
                *started = true;
                *sent_at = now;
                let (seq, ext, op, fua) = (*seq, *ext, op.clone(), *fua);
                waiting.extend(targets.iter().map(|(n, _)| *n));
                let (start, end) = op.range();
                let part = Part::range(start, end);
                g.d.note_write(ext, seq, &part, self.cfg.recent_max);
                self.out.push(Output::Journal(JournalRecord::Log {
                    key,
                    ext,
                    seq: Some(seq),
                    write: true,
                    part,
                }));
                let req = DiskReq::Write {
                    ext,
                    op: op.clone(),
                    fua,
                };
                self.task_disk(op_id, key, gen, tid, req);
                for (n, up_since) in targets {
                    self.send(
                        n,
                        key,
                        interval,
                        PeerMsg::Forward {
                            to_up_since: up_since,
                            seq,
                            committed,
                            ext,
                            op: op.clone(),
                            fua,
                        },
                    );
                }
            }
            Task::Read {
                ext, offset, len, ..
            } => {
                let req = DiskReq::Read {
                    ext: *ext,
                    offset: *offset,
                    len: *len,
                };
                self.task_disk(op_id, key, gen, tid, req);
            }
            Task::Push {
                ext,
                part,
                started,
                merged,
                ..
            } => {
                *started = true;
                let req = match (part.clone(), *merged) {
                    (Part::Ranges(ranges), true) => DiskReq::ReadRanges { ext: *ext, ranges },
                    (part, _) => DiskReq::ReadExtent { ext: *ext, part },
                };
                self.task_disk(op_id, key, gen, tid, req);
            }
            Task::Scrub {
                ext,
                offset,
                len,
                waiting,
                sent_at,
                asked_at,
                ..
            } => {
                let (ext, offset, len) = (*ext, *offset, *len);
                let req = DiskReq::Read { ext, offset, len };
                // Only the first start asks the members; a start after a
                // read repair only reads again.
                let mut sends = Vec::new();
                if asked_at.is_none() {
                    *asked_at = Some(now);
                    *sent_at = now;
                    // Synced members only: one still being synced may
                    // differ until its pushes land.
                    for (n, m) in &p.members {
                        if m.acting && m.state == MemberState::Synced {
                            let verify_id = self.next_id;
                            self.next_id += 1;
                            waiting.insert(*n, verify_id);
                            p.by_verify.insert(verify_id, tid);
                            sends.push((*n, m.up_since, verify_id));
                        }
                    }
                }
                self.task_disk(op_id, key, gen, tid, req);
                for (n, up_since, verify_id) in sends {
                    self.send(
                        n,
                        key,
                        interval,
                        PeerMsg::Verify {
                            to_up_since: up_since,
                            verify_id,
                            ext,
                            offset,
                            len,
                        },
                    );
                }
            }
            Task::Flush { .. } => {}
        }
    }

    /// Starts a primary task's local disk operation.
    fn task_disk(&mut self, op_id: OpId, key: GroupKey, gen: u64, tid: u64, req: DiskReq) {
        self.disk.insert(
            op_id,
            DiskCtx::Task {
                key,
                gen,
                task: tid,
            },
        );
        self.out.push(Output::Disk { id: op_id, req });
    }

    /// Finishes a task whose conditions are met.
    fn check_task(&mut self, key: GroupKey, tid: u64) {
        let bug = self.cfg.bug;
        let g = self.groups.get_mut(&key).expect("exists");
        let Some(p) = g.primary.as_mut() else {
            return;
        };
        let interval = p.interval;
        let Some(t) = p.tasks.get_mut(&tid) else {
            return;
        };
        match t {
            Task::Write {
                client,
                seq,
                local_done,
                waiting,
                replied,
                failed,
                ..
            } => {
                if bug == Some(Bug::AckBeforeReplicas) && *local_done && !*replied {
                    *replied = true;
                    if let Some((c, id)) = *client {
                        if failed.is_none() {
                            self.out
                                .push(Output::Trace(Trace::AckedWrite { key, interval }));
                        }
                        self.out.push(Output::Reply(ClientReply {
                            client: c,
                            id,
                            result: match failed {
                                None => Ok(None),
                                Some(e) => Err(Refusal::Io(e.clone())),
                            },
                        }));
                    }
                }
                if !*local_done || !waiting.is_empty() {
                    return;
                }
                let seq = *seq;
                let Some(Task::Write {
                    client,
                    ext,
                    lock,
                    failed,
                    replied,
                    ..
                }) = p.tasks.remove(&tid)
                else {
                    unreachable!()
                };
                // A write that failed here is settled only once this node's
                // copy (without it) is pushed over the members' (with it):
                // until then the committed watermark must not pass it, or
                // a crash in between would leave the replicas differing
                // with nothing uncertain to push.
                let members: Vec<NodeId> = p.members.keys().copied().collect();
                if failed.is_some() && !members.is_empty() {
                    p.by_seq.remove(&seq);
                    p.settling.insert(seq, members.len());
                } else {
                    let committed = p.seq_done(seq);
                    self.raise_committed(key, committed);
                }
                if let Some((c, id)) = client {
                    if let Some(w) = self.clients.get_mut(&c) {
                        w.inflight.remove(&id);
                        if failed.is_none() {
                            w.done.insert(id);
                        }
                    }
                    if !replied {
                        if failed.is_none() {
                            self.out
                                .push(Output::Trace(Trace::AckedWrite { key, interval }));
                        }
                        self.out.push(Output::Reply(ClientReply {
                            client: c,
                            id,
                            result: match &failed {
                                None => Ok(None),
                                Some(e) => Err(Refusal::Io(e.clone())),
                            },
                        }));
                    }
                }
                self.release(key, ext, lock);
                if failed.is_some() {
                    // Our copy is what counts: push it to every member so
                    // the replicas agree again.
                    for n in members {
                        self.start_push_as(key, n, ext, Part::Whole, Some(seq), false, false);
                    }
                }
            }
            Task::Read { .. } => {}
            Task::Push {
                data: Some(_),
                waiting,
                ..
            } if waiting.is_empty() => {
                let Some(Task::Push {
                    ext, lock, settles, ..
                }) = p.tasks.remove(&tid)
                else {
                    unreachable!()
                };
                if let Some(seq) = settles {
                    let left = p.settling.entry(seq).or_insert(1);
                    *left -= 1;
                    if *left == 0 {
                        p.settling.remove(&seq);
                        let committed = p.seq_done(seq);
                        self.raise_committed(key, committed);
                    }
                }
                self.release(key, ext, lock);
                self.admit_pushes();
            }
            Task::Push { .. } => {}
            Task::Scrub {
                ext,
                offset,
                len,
                digest: Some(mine),
                repaired,
                waiting,
                answers,
                silent,
                ..
            } if waiting.is_empty() => {
                let (ext, offset, len, mine) = (*ext, *offset, *len, *mine);
                let mut found = ScrubFound {
                    copies: 1,
                    repaired_here: *repaired,
                    pushed: Vec::new(),
                    silent: std::mem::take(silent),
                };
                for (n, answer) in std::mem::take(answers) {
                    if !p.members.contains_key(&n) {
                        continue; // dropped since: it will be synced again
                    }
                    found.copies += 1;
                    let why = match answer {
                        Ok(d) if d == mine => continue,
                        Ok(d) => {
                            format!("its copy's CRC32 is {d:#010x}, the primary's {mine:#010x}")
                        }
                        Err(e) => e,
                    };
                    found.pushed.push(ScrubCopy { node: n, why });
                }
                self.end_scrub(key, tid, Ok(Some(Bytes::from(found.encode_to_vec()))));
                for ScrubCopy { node, why } in found.pushed {
                    self.out.push(Output::Trace(Trace::ScrubPushing {
                        key,
                        ext,
                        node,
                        offset,
                        len,
                        why,
                    }));
                    let part = Part::range(offset, offset + len);
                    self.start_push_as(key, node, ext, part, None, true, false);
                }
            }
            Task::Scrub { .. } => {}
            Task::Flush {
                client,
                local_done,
                waiting,
                ..
            } => {
                if *local_done && waiting.is_empty() {
                    let (c, id) = *client;
                    p.tasks.remove(&tid);
                    self.out.push(Output::Reply(ClientReply {
                        client: c,
                        id,
                        result: Ok(None),
                    }));
                }
            }
        }
    }

    /// Ends a compare-and-write that did not write (it found other bytes,
    /// or could not read): nothing was journaled or forwarded, so its
    /// sequence number counts as done at once and the committed watermark
    /// moves past it.
    fn finish_unwritten(
        &mut self,
        key: GroupKey,
        tid: u64,
        result: Result<Option<Bytes>, Refusal>,
    ) {
        let g = self.groups.get_mut(&key).expect("exists");
        let Some(p) = g.primary.as_mut() else {
            return;
        };
        let Some(Task::Write {
            client,
            seq,
            ext,
            lock,
            ..
        }) = p.tasks.remove(&tid)
        else {
            return;
        };
        let committed = p.seq_done(seq);
        self.raise_committed(key, committed);
        if let Some((c, id)) = client {
            if let Some(w) = self.clients.get_mut(&c) {
                w.inflight.remove(&id);
                if let Ok(Some(found)) = &result {
                    w.miscompared.insert(id, found.clone());
                }
            }
            self.out.push(Output::Reply(ClientReply {
                client: c,
                id,
                result,
            }));
        }
        self.release(key, ext, lock);
    }

    /// Pushes `part` of `ext` to member `n`, behind every earlier operation
    /// on the extent. With `settles`, the push is one of those that settle
    /// a write that failed here (see `Primary::settling`); `merged` as in
    /// `Task::Push`. With `wait_turn` it first waits for its turn among
    /// [`Config::pushes_max`]; otherwise it queues for the lock at once.
    #[allow(clippy::too_many_arguments)]
    fn start_push_as(
        &mut self,
        key: GroupKey,
        n: NodeId,
        ext: ExtentId,
        part: Part,
        settles: Option<Seq>,
        merged: bool,
        wait_turn: bool,
    ) {
        // Whole blocks: a push of part of a block would have to merge into
        // the replica's block, which fails if that block went bad; outside
        // the changed ranges both copies hold the same bytes anyway.
        let part = match part {
            Part::Whole => Part::Whole,
            Part::Ranges(v) => Part::from_ranges(
                v.into_iter()
                    .map(|r| blocks_around(r, self.cfg.block_bytes))
                    .collect(),
            ),
        };
        let tid = self.id_next();
        let lock = self.id_next();
        let g = self.groups.get_mut(&key).expect("exists");
        let Some(p) = g.primary.as_mut() else {
            return;
        };
        let gen = p.gen;
        let admitted = !wait_turn;
        p.tasks.insert(
            tid,
            Task::Push {
                ext,
                part,
                lock,
                started: false,
                data: None,
                seq: None,
                waiting: BTreeMap::from([(n, 0)]),
                sent_at: 0,
                settles,
                merged,
                budgeted: wait_turn,
                admitted,
                resends: 0,
            },
        );
        if admitted {
            self.queue(key, ext, WHOLE, lock, Waiting::Task { gen, task: tid });
        } else {
            self.push_queue.insert(tid, (key, gen));
            self.admit_pushes();
        }
    }

    /// Sync pushes admitted and not yet done, on every group.
    fn pushes_admitted(&self) -> usize {
        self.groups
            .values()
            .filter_map(|g| g.primary.as_ref())
            .flat_map(|p| p.tasks.values())
            .filter(|t| {
                matches!(
                    t,
                    Task::Push {
                        admitted: true,
                        budgeted: true,
                        ..
                    }
                )
            })
            .count()
    }

    /// Lets waiting pushes queue for their extent's lock, oldest first,
    /// while fewer than [`Config::pushes_max`] are admitted. A member's
    /// silence is measured from its push's admission: until then it had
    /// nothing to answer.
    fn admit_pushes(&mut self) {
        if self.push_queue.is_empty() {
            return;
        }
        let mut busy = self.pushes_admitted();
        let now = self.now;
        while busy < self.cfg.pushes_max.max(1) {
            let Some((tid, (key, gen))) = self.push_queue.pop_first() else {
                return;
            };
            let Some(p) = self
                .groups
                .get_mut(&key)
                .and_then(|g| g.primary.as_mut())
                .filter(|p| p.gen == gen)
            else {
                continue;
            };
            let Some(Task::Push {
                ext,
                lock,
                admitted: admitted @ false,
                waiting,
                ..
            }) = p.tasks.get_mut(&tid)
            else {
                continue;
            };
            if waiting.is_empty() {
                // Every member it was for left: it never queued for the
                // lock, so it just goes.
                p.tasks.remove(&tid);
                continue;
            }
            *admitted = true;
            let (ext, lock) = (*ext, *lock);
            for n in waiting.keys() {
                if let Some(m) = p.members.get_mut(n) {
                    m.last_heard = m.last_heard.max(now);
                }
            }
            busy += 1;
            self.queue(key, ext, WHOLE, lock, Waiting::Task { gen, task: tid });
        }
    }

    // -------------------------------------------------------------- disk

    /// A disk operation ended.
    pub fn on_disk(&mut self, id: OpId, done: DiskDone) {
        self.settled = false;
        let Some(ctx) = self.disk.remove(&id) else {
            return;
        };
        match ctx {
            DiskCtx::Orphan { key, ext, lock } => self.release(key, ext, lock),
            DiskCtx::Replica {
                key,
                from,
                applied,
                lock,
            } => {
                let ok = !matches!(done, DiskDone::Failed(_));
                if let (Applied::Push(_, seq, part), true) = (&applied, ok) {
                    let g = self.groups.get_mut(&key).expect("exists");
                    g.d.set_log(from.ext, *seq, part, self.cfg.recent_max);
                    self.out.push(Output::Journal(JournalRecord::Log {
                        key,
                        ext: from.ext,
                        seq: *seq,
                        write: false,
                        part: part.clone(),
                    }));
                }
                self.release(key, from.ext, lock);
                let Some(sess) = self.session_mut(key, from.interval) else {
                    return;
                };
                // A failure is not acknowledged: the primary retries, and
                // the write cannot complete without this replica.
                let ack = match applied {
                    Applied::Write(seq) if ok => {
                        sess.applied.insert(seq, true);
                        PeerMsg::ForwardAck { seq }
                    }
                    Applied::Write(seq) => {
                        sess.applied.remove(&seq);
                        let error = match done {
                            DiskDone::Failed(e) => e,
                            _ => String::new(),
                        };
                        PeerMsg::ForwardFailed { seq, error }
                    }
                    Applied::Push(push_id, ..) if ok => {
                        sess.pushes.insert(push_id, true);
                        PeerMsg::PushAck { push_id }
                    }
                    Applied::Push(push_id, ..) => {
                        sess.pushes.remove(&push_id);
                        return;
                    }
                };
                self.send(from.primary, key, from.interval, ack);
            }
            DiskCtx::ReplicaFetch {
                key,
                from,
                fetch_id,
                verify: true,
                lock,
            } => {
                self.release(key, from.ext, lock);
                let digest = match done {
                    DiskDone::Data(bytes) => Ok(crc32fast::hash(&bytes)),
                    DiskDone::Failed(e) => Err(e),
                    other => Err(format!("unexpected read result {other:?}")),
                };
                self.send(
                    from.primary,
                    key,
                    from.interval,
                    PeerMsg::VerifyReply {
                        verify_id: fetch_id,
                        digest,
                    },
                );
            }
            DiskCtx::ReplicaFetch {
                key,
                from,
                fetch_id,
                lock,
                ..
            } => {
                self.release(key, from.ext, lock);
                let data = match done {
                    DiskDone::Extent(content) => Ok(content),
                    DiskDone::Data(bytes) => Ok(Some(bytes)),
                    DiskDone::Failed(e) => Err(e),
                    other => Err(format!("unexpected read result {other:?}")),
                };
                self.send(
                    from.primary,
                    key,
                    from.interval,
                    PeerMsg::FetchReply { fetch_id, data },
                );
            }
            DiskCtx::ReplicaFlush {
                key,
                interval,
                primary,
                flush_id,
            } => {
                if done == DiskDone::Ok && self.session_mut(key, interval).is_some() {
                    self.send(primary, key, interval, PeerMsg::FlushAck { flush_id });
                }
            }
            DiskCtx::Task { key, gen, task } => self.task_disk_done(key, gen, task, done),
            DiskCtx::MendRead { key, gen, task } => self.mend_read(key, gen, task, done),
        }
    }

    fn session_mut(&mut self, key: GroupKey, interval: Epoch) -> Option<&mut Session> {
        self.groups
            .get_mut(&key)?
            .session
            .as_mut()
            .filter(|s| s.interval == interval)
    }

    fn task_disk_done(&mut self, key: GroupKey, gen: u64, tid: u64, done: DiskDone) {
        let now = self.now;
        let align = self.cfg.block_bytes;
        let g = self.groups.get_mut(&key).expect("exists");
        let Some(p) = g.primary.as_mut().filter(|p| p.gen == gen) else {
            return;
        };
        // Read repair (see `Repair`): the fetched copy is stored ...
        if p.repairs.get(&tid).is_some_and(|r| r.putting) {
            self.repair_stored(key, gen, tid, done);
            return;
        }
        // ... a local read failed ...
        if let DiskDone::Failed(e) = &done {
            let target = match p.tasks.get(&tid) {
                Some(Task::Read {
                    ext, offset, len, ..
                })
                | Some(Task::Scrub {
                    ext, offset, len, ..
                }) => Some((*ext, block_part((*offset, offset + len), align))),
                // A compare's read, or the write itself: a write of part of
                // a block cannot merge into a block gone bad, so the block
                // is repaired and the write done again.
                Some(Task::Write { ext, op, .. }) => Some((*ext, block_part(op.range(), align))),
                Some(Task::Push { ext, part, .. }) => Some((*ext, part.clone())),
                _ => None,
            };
            if let Some((ext, part)) = target {
                if self.try_repair(key, tid, ext, part, e) {
                    return;
                }
            }
        } else if let Some(r) = p.repairs.remove(&tid) {
            // ... or read again after the repair: repaired.
            p.by_fetch.remove(&r.fetch_id);
            if let Some(Task::Scrub { repaired, .. }) = p.tasks.get_mut(&tid) {
                *repaired = true;
            }
            self.out.push(Output::Trace(Trace::Repaired {
                key,
                ext: r.ext,
                part: r.part,
                from: r.from,
            }));
        }
        let g = self.groups.get_mut(&key).expect("exists");
        let Some(p) = g.primary.as_mut().filter(|p| p.gen == gen) else {
            return;
        };
        let interval = p.interval;
        let Some(t) = p.tasks.get_mut(&tid) else {
            return;
        };
        match t {
            Task::Write {
                compare: compare @ Some(_),
                ..
            } => {
                let ignore = self.cfg.bug == Some(Bug::WriteOnMiscompare);
                match done {
                    DiskDone::Data(found) if ignore || Some(&found) == compare.as_ref() => {
                        // It matches: from here on an ordinary write.
                        *compare = None;
                        self.start_task(key, gen, tid);
                    }
                    DiskDone::Data(found) => self.finish_unwritten(key, tid, Ok(Some(found))),
                    DiskDone::Failed(e) => self.finish_unwritten(key, tid, Err(Refusal::Io(e))),
                    other => self.finish_unwritten(
                        key,
                        tid,
                        Err(Refusal::Io(format!("unexpected read result {other:?}"))),
                    ),
                }
            }
            Task::Write {
                local_done,
                failed,
                mends,
                waiting,
                ..
            } => {
                *local_done = true;
                if let DiskDone::Failed(e) = done {
                    *failed = Some(e);
                    // The push of this node's whole copy that follows a
                    // failed write mends those members too.
                    for n in std::mem::take(mends).into_keys() {
                        waiting.remove(&n);
                    }
                } else if !mends.is_empty() {
                    self.start_mend_read(key, gen, tid);
                }
                self.check_task(key, tid);
            }
            Task::Read { .. } => {
                let Some(Task::Read {
                    client, ext, lock, ..
                }) = p.tasks.remove(&tid)
                else {
                    unreachable!()
                };
                let result = match done {
                    DiskDone::Data(b) => Ok(Some(b)),
                    DiskDone::Failed(e) => Err(Refusal::Io(e)),
                    other => Err(Refusal::Io(format!("unexpected read result {other:?}"))),
                };
                self.out.push(Output::Reply(ClientReply {
                    client: client.0,
                    id: client.1,
                    result,
                }));
                self.release(key, ext, lock);
            }
            Task::Push {
                ext,
                part,
                data,
                seq,
                waiting,
                sent_at,
                ..
            } => {
                let content = match done {
                    DiskDone::Extent(c) => c,
                    // A merged read (always the ranges' bytes).
                    DiskDone::Data(b) => Some(b),
                    _ => {
                        // Cannot read our own copy: leave the lock held and
                        // retry on the next tick.
                        return;
                    }
                };
                if content.is_none() {
                    // Nothing stored here: deleting the replica's copy
                    // leaves the same bytes (zeros) as any ranges would.
                    *part = Part::Whole;
                }
                *data = Some(content.clone());
                *seq = g.d.log.get(ext).copied();
                *sent_at = now;
                let ext = *ext;
                let seq = *seq;
                let part = part.clone();
                let mut sends = Vec::new();
                for (n, pid) in waiting.iter_mut() {
                    let push_id = self.next_id;
                    self.next_id += 1;
                    *pid = push_id;
                    p.by_push.insert(push_id, (tid, *n));
                    let up = p.members.get(n).map(|m| m.up_since).unwrap_or(0);
                    sends.push((*n, up, push_id));
                }
                for (n, up_since, push_id) in sends {
                    self.send(
                        n,
                        key,
                        interval,
                        PeerMsg::Push {
                            to_up_since: up_since,
                            push_id,
                            ext,
                            seq,
                            part: part.clone(),
                            data: content.clone(),
                        },
                    );
                }
                self.check_task(key, tid);
            }
            Task::Flush { local_done, .. } => {
                *local_done = true;
                self.check_task(key, tid);
            }
            Task::Scrub { digest, .. } => match done {
                DiskDone::Data(b) => {
                    *digest = Some(crc32fast::hash(&b));
                    self.check_task(key, tid);
                }
                other => {
                    let e = match other {
                        DiskDone::Failed(e) => e,
                        other => format!("unexpected read result {other:?}"),
                    };
                    self.end_scrub(key, tid, Err(Refusal::Io(e)));
                }
            },
        }
    }

    /// Ends scrub task `tid`, answering `result`: what it found, or why it
    /// could not compare (this node's copy does not read, and no replica
    /// could repair it).
    fn end_scrub(&mut self, key: GroupKey, tid: u64, result: Result<Option<Bytes>, Refusal>) {
        let Some(p) = self.groups.get_mut(&key).and_then(|g| g.primary.as_mut()) else {
            return;
        };
        let Some(Task::Scrub {
            client,
            ext,
            lock,
            waiting,
            ..
        }) = p.tasks.remove(&tid)
        else {
            return;
        };
        for id in waiting.values() {
            p.by_verify.remove(id);
        }
        self.out.push(Output::Reply(ClientReply {
            client: client.0,
            id: client.1,
            result,
        }));
        self.release(key, ext, lock);
    }

    /// A replica answered a scrub's verify.
    fn on_verify_reply(
        &mut self,
        key: GroupKey,
        interval: Epoch,
        from: NodeId,
        verify_id: u64,
        digest: Result<u32, String>,
    ) {
        let Some(p) = self.primary_for(key, interval) else {
            return;
        };
        let Some(tid) = p.by_verify.remove(&verify_id) else {
            return; // a duplicate, or a scrub that ended
        };
        let Some(Task::Scrub {
            waiting, answers, ..
        }) = p.tasks.get_mut(&tid)
        else {
            return;
        };
        if waiting.get(&from) != Some(&verify_id) {
            return;
        }
        waiting.remove(&from);
        answers.insert(from, digest);
        self.check_task(key, tid);
    }

    // ------------------------------------------------------------ mends

    /// Member `from` could not apply write `seq` (see
    /// [`PeerMsg::ForwardFailed`]): it is mended by the write again as this
    /// node's whole blocks around it, once written here (see [`Mend`]).
    fn on_forward_failed(
        &mut self,
        key: GroupKey,
        interval: Epoch,
        from: NodeId,
        seq: Seq,
        error: String,
    ) {
        let Some(tid) = self.write_answered(key, interval, from, seq) else {
            return;
        };
        let Some(p) = self.primary_for(key, interval) else {
            return;
        };
        let gen = p.gen;
        let Some(Task::Write {
            ext,
            waiting,
            mends,
            local_done,
            failed,
            ..
        }) = p.tasks.get_mut(&tid)
        else {
            return;
        };
        if !waiting.contains(&from) || mends.contains_key(&from) {
            return;
        }
        let ext = *ext;
        if failed.is_some() {
            // It failed here too: the push of this node's whole copy that
            // follows mends every member.
            waiting.remove(&from);
            self.check_task(key, tid);
            return;
        }
        mends.insert(from, Mend::default());
        let data = mends.values().find_map(|m| m.data.clone());
        let written = *local_done;
        self.out.push(Output::Trace(Trace::Mending {
            key,
            ext,
            node: from,
            error,
        }));
        match data {
            Some(bytes) => self.forward_mends(key, gen, tid, bytes),
            None if written => self.start_mend_read(key, gen, tid),
            None => {} // read once written (`task_disk_done`)
        }
    }

    /// Reads this node's whole blocks around write task `tid`, for its
    /// mends; one read at a time.
    fn start_mend_read(&mut self, key: GroupKey, gen: u64, tid: u64) {
        let align = self.cfg.block_bytes;
        let Some(p) = self
            .groups
            .get(&key)
            .and_then(|g| g.primary.as_ref())
            .filter(|p| p.gen == gen)
        else {
            return;
        };
        let Some(Task::Write { ext, op, mends, .. }) = p.tasks.get(&tid) else {
            return;
        };
        if mends.values().all(|m| m.data.is_some()) {
            return;
        }
        let reading = self.disk.values().any(|c| {
            matches!(c, DiskCtx::MendRead { key: k, gen: g, task } if *k == key && *g == gen && *task == tid)
        });
        if reading {
            return;
        }
        let ranges = vec![blocks_around(op.range(), align)];
        let ext = *ext;
        let id = self.id_next();
        self.disk.insert(
            id,
            DiskCtx::MendRead {
                key,
                gen,
                task: tid,
            },
        );
        self.out.push(Output::Disk {
            id,
            req: DiskReq::ReadRanges { ext, ranges },
        });
    }

    /// The mend read of write task `tid` ended. A failure is retried on a
    /// later tick (`tick_primary`).
    fn mend_read(&mut self, key: GroupKey, gen: u64, tid: u64, done: DiskDone) {
        if let DiskDone::Data(bytes) = done {
            self.forward_mends(key, gen, tid, bytes);
        }
    }

    /// Sends write task `tid` again, as `bytes` (this node's whole blocks
    /// around it), to every member being mended that has not had it yet.
    /// The same sequence number: the member applies it as that write (its
    /// log only moves up) and acks it as that write. No other write to
    /// those blocks is in flight (writes lock whole blocks), so the bytes
    /// around the write are the member's own.
    fn forward_mends(&mut self, key: GroupKey, gen: u64, tid: u64, bytes: Bytes) {
        let now = self.now;
        let Some(p) = self
            .groups
            .get_mut(&key)
            .and_then(|g| g.primary.as_mut())
            .filter(|p| p.gen == gen)
        else {
            return;
        };
        let (interval, committed) = (p.interval, p.committed);
        let Some(Task::Write {
            seq,
            ext,
            op,
            fua,
            mends,
            sent_at,
            ..
        }) = p.tasks.get_mut(&tid)
        else {
            return;
        };
        *sent_at = now;
        let msg = mend_forward(
            *seq,
            committed,
            *ext,
            op,
            *fua,
            &bytes,
            self.cfg.block_bytes,
        );
        let mut sends = Vec::new();
        for (n, m) in mends.iter_mut().filter(|(_, m)| m.data.is_none()) {
            m.data = Some(bytes.clone());
            let up = p.members.get(n).map(|m| m.up_since).unwrap_or(0);
            sends.push((*n, up));
        }
        for (n, up_since) in sends {
            let mut msg = msg.clone();
            if let PeerMsg::Forward { to_up_since, .. } = &mut msg {
                *to_up_since = up_since;
            }
            self.send(n, key, interval, msg);
        }
    }

    // ------------------------------------------------------- read repair

    /// Starts a read repair (see [`Repair`]) for task `tid`, whose local
    /// read of `part` of `ext` failed with `error`. False when there is none
    /// to start: no other replica acts, or the read failed again after a
    /// repair stored a fetched copy (the failure then stands).
    fn try_repair(
        &mut self,
        key: GroupKey,
        tid: u64,
        ext: ExtentId,
        part: Part,
        error: &str,
    ) -> bool {
        let now = self.now;
        let Some(p) = self.groups.get_mut(&key).and_then(|g| g.primary.as_mut()) else {
            return false;
        };
        if let Some(r) = p.repairs.remove(&tid) {
            p.by_fetch.remove(&r.fetch_id);
            self.out.push(Output::Trace(Trace::RepairFailed {
                key,
                ext,
                error: format!("{error}, again after storing the copy of node {}", r.from),
            }));
            return false;
        }
        let Some((from, up_since)) = p.repair_source(&BTreeSet::new()) else {
            return false;
        };
        let fetch_id = self.next_id;
        self.next_id += 1;
        let interval = p.interval;
        p.by_fetch.insert(fetch_id, tid);
        p.repairs.insert(
            tid,
            Repair {
                ext,
                part: part.clone(),
                error: error.to_string(),
                from,
                fetch_id,
                tried: BTreeSet::from([from]),
                asked_at: now,
                sent_at: now,
                putting: false,
                stored: false,
            },
        );
        self.out.push(Output::Trace(Trace::Repairing {
            key,
            ext,
            part: part.clone(),
            from,
            error: error.to_string(),
        }));
        let msg = PeerMsg::Fetch {
            to_up_since: up_since,
            fetch_id,
            ext,
            part,
        };
        self.send(from, key, interval, msg);
        true
    }

    /// The replica asked for task `tid`'s repair could not help (`why`):
    /// asks the next one, or fails the repair.
    fn repair_ask_next(&mut self, key: GroupKey, tid: u64, why: String) {
        let now = self.now;
        let Some(p) = self.groups.get_mut(&key).and_then(|g| g.primary.as_mut()) else {
            return;
        };
        let interval = p.interval;
        let Some(r) = p.repairs.get_mut(&tid) else {
            return;
        };
        r.error = format!("{}; {why}", r.error);
        let tried = r.tried.clone();
        let old_fetch = r.fetch_id;
        p.by_fetch.remove(&old_fetch);
        let Some((from, up_since)) = p.repair_source(&tried) else {
            self.repair_fail(key, tid);
            return;
        };
        let fetch_id = self.next_id;
        self.next_id += 1;
        p.by_fetch.insert(fetch_id, tid);
        let r = p.repairs.get_mut(&tid).expect("just seen");
        r.from = from;
        r.fetch_id = fetch_id;
        r.tried.insert(from);
        r.asked_at = now;
        r.sent_at = now;
        let (ext, part) = (r.ext, r.part.clone());
        self.out.push(Output::Trace(Trace::Repairing {
            key,
            ext,
            part: part.clone(),
            from,
            error: why,
        }));
        let msg = PeerMsg::Fetch {
            to_up_since: up_since,
            fetch_id,
            ext,
            part,
        };
        self.send(from, key, interval, msg);
    }

    /// No replica could supply task `tid`'s part, or storing the copy
    /// failed: the task fails as its read did. A push keeps its lock and
    /// reads again on a later tick (which may repair again).
    fn repair_fail(&mut self, key: GroupKey, tid: u64) {
        let now = self.now;
        let Some(p) = self.groups.get_mut(&key).and_then(|g| g.primary.as_mut()) else {
            return;
        };
        let Some(r) = p.repairs.remove(&tid) else {
            return;
        };
        p.by_fetch.remove(&r.fetch_id);
        self.out.push(Output::Trace(Trace::RepairFailed {
            key,
            ext: r.ext,
            error: r.error.clone(),
        }));
        match p.tasks.get_mut(&tid) {
            Some(Task::Read { .. }) => {
                let Some(Task::Read {
                    client, ext, lock, ..
                }) = p.tasks.remove(&tid)
                else {
                    unreachable!()
                };
                self.out.push(Output::Reply(ClientReply {
                    client: client.0,
                    id: client.1,
                    result: Err(Refusal::Io(r.error)),
                }));
                self.release(key, ext, lock);
            }
            Some(Task::Scrub { .. }) => self.end_scrub(key, tid, Err(Refusal::Io(r.error))),
            // A compare's read: nothing was journaled or forwarded yet.
            Some(Task::Write {
                compare: Some(_), ..
            }) => self.finish_unwritten(key, tid, Err(Refusal::Io(r.error))),
            // The write itself, journaled and forwarded: it failed here as
            // a local write fails (the members may hold it; this node's
            // copy is pushed over theirs, and it settles after that).
            Some(Task::Write {
                local_done,
                failed,
                mends,
                waiting,
                ..
            }) => {
                *local_done = true;
                *failed = Some(r.error);
                for n in std::mem::take(mends).into_keys() {
                    waiting.remove(&n);
                }
                self.check_task(key, tid);
            }
            Some(Task::Push { sent_at, .. }) => *sent_at = now,
            _ => {}
        }
    }

    /// The store of task `tid`'s fetched copy ended: read again, or fail.
    fn repair_stored(&mut self, key: GroupKey, gen: u64, tid: u64, done: DiskDone) {
        let Some(p) = self.groups.get_mut(&key).and_then(|g| g.primary.as_mut()) else {
            return;
        };
        let Some(r) = p.repairs.get_mut(&tid) else {
            return;
        };
        r.putting = false;
        if let DiskDone::Failed(e) = done {
            r.error = format!("{}; storing the copy of node {}: {e}", r.error, r.from);
            self.repair_fail(key, tid);
            return;
        }
        r.stored = true;
        match p.tasks.get(&tid) {
            // A write already journaled and forwarded: only its local
            // write runs again.
            Some(Task::Write {
                compare: None,
                ext,
                op,
                fua,
                ..
            }) => {
                let req = DiskReq::Write {
                    ext: *ext,
                    op: op.clone(),
                    fua: *fua,
                };
                let id = self.id_next();
                self.task_disk(id, key, gen, tid, req);
            }
            _ => self.start_task(key, gen, tid),
        }
    }

    /// A replica answered a repair's fetch.
    fn on_fetch_reply(
        &mut self,
        key: GroupKey,
        interval: Epoch,
        from: NodeId,
        fetch_id: u64,
        data: Result<Option<Bytes>, String>,
    ) {
        let Some(p) = self.primary_for(key, interval) else {
            return;
        };
        let Some(&tid) = p.by_fetch.get(&fetch_id) else {
            return; // a duplicate, or a repair that moved on
        };
        let gen = p.gen;
        let Some(r) = p.repairs.get_mut(&tid) else {
            return;
        };
        if r.from != from || r.putting {
            return;
        }
        let asked = r.part.bytes();
        match data {
            Err(e) => {
                // (A chunk server's errors name their node already.)
                let why = if e.starts_with(&format!("node {from}:")) {
                    e
                } else {
                    format!("node {from}: {e}")
                };
                self.repair_ask_next(key, tid, why)
            }
            Ok(None) if asked.is_some() => {
                // Ranges always come with their bytes; only a whole extent
                // (under a push's lock on all of it) may be absent.
                let why = format!("node {from}: answered no copy of the ranges asked");
                self.repair_ask_next(key, tid, why);
            }
            Ok(Some(d)) if asked.is_some_and(|n| n != d.len() as u64) => {
                let why = format!(
                    "node {from}: answered {} bytes for {} asked",
                    d.len(),
                    asked.unwrap_or(0)
                );
                self.repair_ask_next(key, tid, why);
            }
            Ok(content) => {
                p.by_fetch.remove(&fetch_id);
                r.putting = true;
                // `None` (a whole extent): the replica stores no such
                // version, so neither may this node (reads then fall
                // through, on both, to the same versions beneath), as a
                // push that deletes.
                let part = if content.is_some() {
                    r.part.clone()
                } else {
                    Part::Whole
                };
                let req = DiskReq::PutExtent {
                    ext: r.ext,
                    part,
                    data: content,
                };
                let op = self.id_next();
                self.task_disk(op, key, gen, tid, req);
            }
        }
    }

    // -------------------------------------------------------------- peers

    fn send(&mut self, to: NodeId, key: GroupKey, interval: Epoch, msg: PeerMsg) {
        self.out.push(Output::Peer {
            to,
            msg: Peer {
                from: self.me,
                key,
                interval,
                msg,
            },
        });
    }

    /// A message from another node.
    pub fn on_peer(&mut self, m: Peer) {
        self.settled = false;
        let Some(my) = self.up_since else {
            return;
        };
        match m.msg {
            PeerMsg::SyncRequest { up_since } => self.on_sync_request(m.key, m.from, up_since),
            PeerMsg::SyncReport(r) => self.on_report(m.key, m.interval, m.from, r),
            PeerMsg::ForwardAck { seq } => self.on_forward_ack(m.key, m.interval, m.from, seq),
            PeerMsg::ForwardFailed { seq, error } => {
                self.on_forward_failed(m.key, m.interval, m.from, seq, error)
            }
            PeerMsg::PushAck { push_id } => self.on_push_ack(m.key, m.interval, m.from, push_id),
            PeerMsg::FlushAck { flush_id } => {
                self.on_flush_ack(m.key, m.interval, m.from, flush_id)
            }
            PeerMsg::Refused(r) => self.on_refused(m.key, m.interval, m.from, r),
            PeerMsg::FetchReply { fetch_id, data } => {
                self.on_fetch_reply(m.key, m.interval, m.from, fetch_id, data)
            }
            PeerMsg::VerifyReply { verify_id, digest } => {
                self.on_verify_reply(m.key, m.interval, m.from, verify_id, digest)
            }
            PeerMsg::SyncQuery { to_up_since }
            | PeerMsg::Fetch { to_up_since, .. }
            | PeerMsg::Verify { to_up_since, .. }
            | PeerMsg::Forward { to_up_since, .. }
            | PeerMsg::Push { to_up_since, .. }
            | PeerMsg::SyncDone { to_up_since, .. }
            | PeerMsg::Flush { to_up_since, .. } => {
                if to_up_since != my {
                    self.send(
                        m.from,
                        m.key,
                        m.interval,
                        PeerMsg::Refused(PeerRefusal::WrongIncarnation),
                    );
                    return;
                }
                self.on_from_primary(m);
            }
        }
    }

    /// Checks a primary's message against the newest interval seen and opens
    /// the replica session for it. False if refused.
    fn admit(&mut self, key: GroupKey, interval: Epoch, from: NodeId) -> bool {
        let bug = self.cfg.bug;
        let g = self
            .groups
            .entry(key)
            .or_insert_with(|| Group::new(GroupDurable::default()));
        if interval < g.known_interval && bug != Some(Bug::NoFence) {
            let current = g.known_interval;
            self.send(
                from,
                key,
                interval,
                PeerMsg::Refused(PeerRefusal::StaleInterval { current }),
            );
            return false;
        }
        if interval > g.known_interval {
            g.known_interval = interval;
            self.out.push(Output::NeedMap(interval));
            if g.primary.as_ref().is_some_and(|p| p.interval < interval) {
                self.abort_primary(key);
            }
        }
        let g = self.groups.get_mut(&key).expect("exists");
        if g.session.as_ref().map(|s| s.interval) != Some(interval) {
            if bug == Some(Bug::NoFence)
                && g.session.as_ref().is_some_and(|s| s.interval > interval)
            {
                // The broken variant serves the old interval in passing.
                return true;
            }
            self.cancel_replica_waiting(key, interval);
            let g = self.groups.get_mut(&key).expect("exists");
            g.session = Some(Session {
                interval,
                synced_as: None,
                applied: BTreeMap::new(),
                floor: Seq::default(),
                pushes: BTreeMap::new(),
                pushed: BTreeMap::new(),
                forwarded: BTreeMap::new(),
            });
        }
        true
    }

    /// Forgets replica work of intervals before `interval` that has not
    /// started: its primary can no longer complete it, and the new primary's
    /// peering must see every write this replica will ever apply.
    fn cancel_replica_waiting(&mut self, key: GroupKey, interval: Epoch) {
        let Some(g) = self.groups.get_mut(&key) else {
            return;
        };
        let stale: Vec<(u64, ExtentId)> = g
            .waiting
            .iter()
            .filter_map(|(lock, w)| match w {
                Waiting::Replica { from, .. } if from.interval < interval => {
                    Some((*lock, from.ext))
                }
                _ => None,
            })
            .collect();
        for (lock, ext) in stale {
            let g = self.groups.get_mut(&key).expect("exists");
            g.waiting.remove(&lock);
            self.release(key, ext, lock);
        }
    }

    fn on_from_primary(&mut self, m: Peer) {
        let (key, interval, from) = (m.key, m.interval, m.from);
        if !self.admit(key, interval, from) {
            return;
        }
        let bug_nofence = self.cfg.bug == Some(Bug::NoFence);
        match m.msg {
            PeerMsg::SyncQuery { .. } => {
                let g = &self.groups[&key];
                let r = SyncState {
                    committed: g.d.committed,
                    uncertain: g.d.uncertain(),
                };
                self.send(from, key, interval, PeerMsg::SyncReport(r));
            }
            PeerMsg::Forward {
                to_up_since,
                seq,
                committed,
                ext,
                op,
                fua,
            } => {
                let lock = self.id_next();
                let g = self.groups.get_mut(&key).expect("admitted");
                let Some(s) = g.session.as_mut() else {
                    return;
                };
                if s.interval != interval && !bug_nofence {
                    return;
                }
                if committed > s.floor {
                    s.floor = committed;
                    let floor = s.floor;
                    s.applied.retain(|k, _| *k > floor);
                }
                if s.synced_as == Some(to_up_since) {
                    self.raise_committed(key, committed);
                }
                let g = self.groups.get_mut(&key).expect("admitted");
                let s = g.session.as_mut().expect("checked");
                if seq <= s.floor || s.applied.get(&seq) == Some(&true) {
                    self.send(from, key, interval, PeerMsg::ForwardAck { seq });
                    return;
                }
                // Already here: at or below this replica's committed
                // watermark (every write up to it is applied here), or in a
                // push of the extent received since (see `Session::pushed`).
                // A late copy of such a write would put older bytes over
                // newer ones.
                if seq <= g.d.committed || s.pushed.get(&ext).is_some_and(|&p| seq <= p) {
                    s.applied.insert(seq, true);
                    self.send(from, key, interval, PeerMsg::ForwardAck { seq });
                    return;
                }
                let f = s.forwarded.entry(ext).or_insert(seq);
                *f = (*f).max(seq);
                if s.applied.contains_key(&seq) {
                    return; // being applied; acked when done
                }
                s.applied.insert(seq, false);
                let range = op.range();
                let origin = Origin {
                    interval,
                    primary: from,
                    ext,
                };
                let work = ReplicaWork::Write { seq, op, fua };
                self.queue(
                    key,
                    ext,
                    range,
                    lock,
                    Waiting::Replica { from: origin, work },
                );
            }
            PeerMsg::Push {
                push_id,
                ext,
                seq,
                part,
                data,
                ..
            } => {
                let lock = self.id_next();
                let g = self.groups.get_mut(&key).expect("admitted");
                let Some(s) = g.session.as_mut() else {
                    return;
                };
                match s.pushes.get(&push_id) {
                    Some(true) => {
                        self.send(from, key, interval, PeerMsg::PushAck { push_id });
                        return;
                    }
                    Some(false) => return,
                    None => {}
                }
                // A late copy from an earlier sync (see `Session::forwarded`):
                // acked, not applied. (`None` < any write: the primary had
                // written nothing to the extent when it read it.)
                let newest = s.forwarded.get(&ext).max(s.pushed.get(&ext)).copied();
                if newest.is_some_and(|n| seq < Some(n)) {
                    s.pushes.insert(push_id, true);
                    self.send(from, key, interval, PeerMsg::PushAck { push_id });
                    return;
                }
                s.pushes.insert(push_id, false);
                if let Some(seq) = seq {
                    let p = s.pushed.entry(ext).or_insert(seq);
                    *p = (*p).max(seq);
                }
                let origin = Origin {
                    interval,
                    primary: from,
                    ext,
                };
                let work = ReplicaWork::Push {
                    push_id,
                    seq,
                    part,
                    data,
                };
                self.queue(
                    key,
                    ext,
                    WHOLE,
                    lock,
                    Waiting::Replica { from: origin, work },
                );
            }
            PeerMsg::SyncDone {
                to_up_since,
                committed,
            } => {
                let g = self.groups.get_mut(&key).expect("admitted");
                let Some(s) = g.session.as_mut() else {
                    return;
                };
                s.synced_as = Some(to_up_since);
                self.raise_committed(key, committed);
            }
            PeerMsg::Flush { flush_id, .. } => {
                let id = self.id_next();
                self.disk.insert(
                    id,
                    DiskCtx::ReplicaFlush {
                        key,
                        interval,
                        primary: from,
                        flush_id,
                    },
                );
                self.out.push(Output::Disk {
                    id,
                    req: DiskReq::Flush,
                });
            }
            msg @ (PeerMsg::Fetch { .. } | PeerMsg::Verify { .. }) => {
                let (ext, work) = match msg {
                    PeerMsg::Fetch {
                        fetch_id,
                        ext,
                        part,
                        ..
                    } => (
                        ext,
                        ReplicaWork::Fetch {
                            fetch_id,
                            part,
                            verify: false,
                        },
                    ),
                    PeerMsg::Verify {
                        verify_id,
                        ext,
                        offset,
                        len,
                        ..
                    } => (
                        ext,
                        ReplicaWork::Fetch {
                            fetch_id: verify_id,
                            part: Part::range(offset, offset + len),
                            verify: true,
                        },
                    ),
                    _ => unreachable!("matched above"),
                };
                // Behind every write and push to the extent already queued
                // here, like a push.
                let lock = self.id_next();
                let origin = Origin {
                    interval,
                    primary: from,
                    ext,
                };
                self.queue(
                    key,
                    ext,
                    WHOLE,
                    lock,
                    Waiting::Replica { from: origin, work },
                );
            }
            _ => unreachable!("only primary messages get here"),
        }
    }

    fn primary_for(&mut self, key: GroupKey, interval: Epoch) -> Option<&mut Primary> {
        self.groups
            .get_mut(&key)?
            .primary
            .as_mut()
            .filter(|p| p.interval == interval)
    }

    fn on_sync_request(&mut self, key: GroupKey, from: NodeId, up_since: Epoch) {
        let now = self.now;
        let Some(gv) = self.map.groups.get(&key) else {
            return;
        };
        let interval = gv.interval;
        if !gv.placement.contains(&from)
            || gv.acting.contains(&from)
            || self.map.up_since(from) != Some(up_since)
        {
            return;
        }
        let Some(p) = self.primary_for(key, interval) else {
            return;
        };
        if !p.active {
            return;
        }
        match p.members.get_mut(&from) {
            Some(m) if m.up_since == up_since => {
                if m.state != MemberState::Querying {
                    return;
                }
                m.sent_at = now;
            }
            Some(_) => return,
            None => {
                p.members.insert(
                    from,
                    Member {
                        up_since,
                        state: MemberState::Querying,
                        acting: false,
                        claimed_at: None,
                        last_heard: now,
                        sent_at: now,
                        pushed: 0,
                    },
                );
            }
        }
        self.send(
            from,
            key,
            interval,
            PeerMsg::SyncQuery {
                to_up_since: up_since,
            },
        );
    }

    fn on_report(&mut self, key: GroupKey, interval: Epoch, from: NodeId, r: SyncState) {
        let now = self.now;
        let Some(p) = self.primary_for(key, interval) else {
            return;
        };
        let Some(m) = p.members.get_mut(&from) else {
            return;
        };
        m.last_heard = now;
        if m.state != MemberState::Querying {
            return;
        }
        if !p.active {
            p.reports.insert(from, r);
            self.maybe_finish_peering(key);
            return;
        }
        let set = push_set(&self.groups[&key].d, &r, self.cfg.bug);
        self.begin_sync(key, from, set);
    }

    /// The write task that member `from`'s answer about write `seq`
    /// concerns, if it still runs; notes that the member was heard from.
    fn write_answered(
        &mut self,
        key: GroupKey,
        interval: Epoch,
        from: NodeId,
        seq: Seq,
    ) -> Option<u64> {
        let now = self.now;
        let p = self.primary_for(key, interval)?;
        if let Some(m) = p.members.get_mut(&from) {
            m.last_heard = now;
        }
        p.by_seq.get(&seq).copied()
    }

    fn on_forward_ack(&mut self, key: GroupKey, interval: Epoch, from: NodeId, seq: Seq) {
        let Some(tid) = self.write_answered(key, interval, from, seq) else {
            return;
        };
        let Some(p) = self.primary_for(key, interval) else {
            return;
        };
        if let Some(Task::Write { waiting, .. }) = p.tasks.get_mut(&tid) {
            if waiting.remove(&from) {
                self.check_task(key, tid);
            }
        }
    }

    fn on_push_ack(&mut self, key: GroupKey, interval: Epoch, from: NodeId, push_id: u64) {
        let now = self.now;
        let Some(p) = self.primary_for(key, interval) else {
            return;
        };
        if let Some(m) = p.members.get_mut(&from) {
            m.last_heard = now;
        }
        let Some((tid, n)) = p.by_push.remove(&push_id) else {
            return;
        };
        if n != from {
            return;
        }
        let ext = match p.tasks.get_mut(&tid) {
            Some(Task::Push { waiting, ext, .. }) => {
                waiting.remove(&from);
                *ext
            }
            _ => return,
        };
        if let Some(m) = p.members.get_mut(&from) {
            if let MemberState::Syncing { pending } = &mut m.state {
                pending.remove(&ext);
            }
        }
        self.check_task(key, tid);
        self.maybe_member_synced(key, from);
    }

    fn on_flush_ack(&mut self, key: GroupKey, interval: Epoch, from: NodeId, flush_id: u64) {
        let Some(p) = self.primary_for(key, interval) else {
            return;
        };
        let Some((tid, n)) = p.by_flush.remove(&flush_id) else {
            return;
        };
        if n != from {
            return;
        }
        if let Some(Task::Flush { waiting, .. }) = p.tasks.get_mut(&tid) {
            waiting.remove(&from);
        }
        self.check_task(key, tid);
    }

    fn on_refused(&mut self, key: GroupKey, interval: Epoch, from: NodeId, r: PeerRefusal) {
        match r {
            PeerRefusal::StaleInterval { current } => {
                if current > self.map.epoch {
                    self.out.push(Output::NeedMap(current));
                }
            }
            PeerRefusal::WrongIncarnation => {
                let drop = self
                    .primary_for(key, interval)
                    .and_then(|p| p.members.get(&from))
                    .is_some_and(|m| !m.acting && m.claimed_at.is_none());
                if drop {
                    self.drop_member(key, from);
                }
            }
        }
    }

    // -------------------------------------------------------------- ticks

    /// True when the last tick found nothing that a later tick could act
    /// on and no input arrived since: until the next input, ticks are
    /// no-ops and the driver may tick slowly.
    pub fn is_settled(&self) -> bool {
        self.settled
    }

    /// The clock moved to `now`: retransmit, time out, ask to rejoin.
    pub fn on_tick(&mut self, now: u64) {
        self.now = now;
        if self.settled {
            return;
        }
        let Some(my) = self.up_since else {
            return;
        };
        // Pushes whose session ended freed their turns without a completion.
        self.admit_pushes();
        // Only groups with a timer that can fire: an idle node (every group
        // settled, nothing in flight) does no work per tick beyond this
        // scan, which allocates nothing.
        let keys: Vec<GroupKey> = self
            .groups
            .iter()
            .filter(|(key, g)| g.needs_tick(self.me, self.map.groups.get(key)))
            .map(|(key, _)| *key)
            .collect();
        self.settled = keys.is_empty();
        for key in keys {
            self.tick_primary(key);
            // Outside the acting set but placed here: ask to rejoin.
            let Some(gv) = self.map.groups.get(&key) else {
                continue;
            };
            if !gv.placement.contains(&self.me) || gv.acting.contains(&self.me) {
                continue;
            }
            let Some(primary) = self.map.primary(key) else {
                continue;
            };
            let interval = gv.interval;
            let g = self.groups.get_mut(&key).expect("exists");
            if g.last_sync_request
                .is_some_and(|t| now < t + self.cfg.sync_request_ms)
            {
                continue;
            }
            g.last_sync_request = Some(now);
            self.send(
                primary,
                key,
                interval,
                PeerMsg::SyncRequest { up_since: my },
            );
        }
    }

    fn tick_primary(&mut self, key: GroupKey) {
        let now = self.now;
        let cfg = self.cfg.clone();
        let g = self.groups.get_mut(&key).expect("exists");
        let Some(p) = g.primary.as_mut() else {
            return;
        };
        let interval = p.interval;
        let committed = p.committed;
        let mut sends: Vec<(NodeId, PeerMsg)> = Vec::new();
        let mut drops = Vec::new();
        let mut claims = Vec::new();
        let placement: &[NodeId] = self.map.groups.get(&key).map_or(&[], |gv| &gv.placement);
        // Members with a push still waiting for its turn wait on this node,
        // not the other way round: not silent.
        let queued: BTreeSet<NodeId> = p
            .tasks
            .values()
            .filter_map(|t| match t {
                Task::Push {
                    admitted: false,
                    waiting,
                    ..
                } => Some(waiting.keys().copied()),
                _ => None,
            })
            .flatten()
            .collect();
        for (n, m) in p.members.iter_mut() {
            if m.state == MemberState::Querying && now >= m.sent_at + cfg.retry_ms {
                m.sent_at = now;
                sends.push((
                    *n,
                    PeerMsg::SyncQuery {
                        to_up_since: m.up_since,
                    },
                ));
            }
            if !m.acting
                && m.claimed_at.is_none()
                && now >= m.last_heard + cfg.sync_timeout_ms
                && !queued.contains(n)
            {
                drops.push(*n);
            }
            // A claimed member outside the placement waits (the volume
            // manager would refuse it) until it is placed again or the
            // interval moves.
            if let Some(t) = m.claimed_at {
                if now >= t + cfg.claim_retry_ms && placement.contains(n) {
                    claims.push(*n);
                }
            }
        }
        let ups: BTreeMap<NodeId, Epoch> =
            p.members.iter().map(|(n, m)| (*n, m.up_since)).collect();
        // Read repairs: ask again, or after `sync_timeout_ms` of silence
        // the next replica (a frozen one must not hold the extent's lock).
        let mut unanswered = Vec::new();
        for (tid, r) in p.repairs.iter_mut().filter(|(_, r)| !r.putting) {
            if now >= r.asked_at + cfg.sync_timeout_ms {
                unanswered.push((*tid, r.from));
            } else if now >= r.sent_at + cfg.retry_ms {
                r.sent_at = now;
                sends.push((
                    r.from,
                    PeerMsg::Fetch {
                        to_up_since: ups.get(&r.from).copied().unwrap_or(0),
                        fetch_id: r.fetch_id,
                        ext: r.ext,
                        part: r.part.clone(),
                    },
                ));
            }
        }
        let repairing: BTreeSet<u64> = p.repairs.keys().copied().collect();
        let mut restart_reads = Vec::new();
        let mut silent_scrubs = Vec::new();
        let mut mend_reads = Vec::new();
        for (tid, t) in p.tasks.iter_mut() {
            match t {
                Task::Write {
                    started: true,
                    seq,
                    ext,
                    op,
                    fua,
                    waiting,
                    sent_at,
                    mends,
                    local_done,
                    ..
                } if now >= *sent_at + cfg.retry_ms => {
                    *sent_at = now;
                    // Members being mended get the write again as whole
                    // blocks (or, if this node's read for it failed, there
                    // is another read).
                    for (n, m) in mends.iter().filter(|(n, _)| waiting.contains(n)) {
                        match &m.data {
                            Some(data) => {
                                let mut msg = mend_forward(
                                    *seq,
                                    committed,
                                    *ext,
                                    op,
                                    *fua,
                                    data,
                                    cfg.block_bytes,
                                );
                                if let PeerMsg::Forward { to_up_since, .. } = &mut msg {
                                    *to_up_since = ups.get(n).copied().unwrap_or(0);
                                }
                                sends.push((*n, msg));
                            }
                            None if *local_done => mend_reads.push(*tid),
                            None => {}
                        }
                    }
                    for n in waiting.iter().filter(|n| !mends.contains_key(n)) {
                        sends.push((
                            *n,
                            PeerMsg::Forward {
                                to_up_since: ups.get(n).copied().unwrap_or(0),
                                seq: *seq,
                                committed,
                                ext: *ext,
                                op: op.clone(),
                                fua: *fua,
                            },
                        ));
                    }
                }
                Task::Push {
                    started: true,
                    data: Some(data),
                    ext,
                    part,
                    seq,
                    waiting,
                    sent_at,
                    resends,
                    ..
                } if now >= *sent_at + (cfg.retry_ms << (*resends).min(3)) => {
                    *sent_at = now;
                    *resends += 1;
                    for (n, pid) in waiting.iter() {
                        sends.push((
                            *n,
                            PeerMsg::Push {
                                to_up_since: ups.get(n).copied().unwrap_or(0),
                                push_id: *pid,
                                ext: *ext,
                                seq: *seq,
                                part: part.clone(),
                                data: data.clone(),
                            },
                        ));
                    }
                }
                Task::Push {
                    started: true,
                    data: None,
                    sent_at,
                    ..
                } if now >= *sent_at + cfg.retry_ms && !repairing.contains(tid) => {
                    // Reading our copy failed: try again.
                    *sent_at = now;
                    restart_reads.push(*tid);
                }
                Task::Scrub {
                    waiting,
                    silent,
                    asked_at,
                    ..
                } if !waiting.is_empty()
                    && asked_at.is_some_and(|t| now >= t + cfg.sync_timeout_ms) =>
                {
                    for (n, vid) in std::mem::take(waiting) {
                        silent.push(n);
                        p.by_verify.remove(&vid);
                    }
                    silent_scrubs.push(*tid);
                }
                Task::Scrub {
                    ext,
                    offset,
                    len,
                    waiting,
                    sent_at,
                    ..
                } if now >= *sent_at + cfg.retry_ms => {
                    *sent_at = now;
                    for (n, vid) in waiting.iter() {
                        sends.push((
                            *n,
                            PeerMsg::Verify {
                                to_up_since: ups.get(n).copied().unwrap_or(0),
                                verify_id: *vid,
                                ext: *ext,
                                offset: *offset,
                                len: *len,
                            },
                        ));
                    }
                }
                Task::Flush {
                    waiting, sent_at, ..
                } if now >= *sent_at + cfg.retry_ms => {
                    *sent_at = now;
                    for (n, fid) in waiting.iter() {
                        sends.push((
                            *n,
                            PeerMsg::Flush {
                                to_up_since: ups.get(n).copied().unwrap_or(0),
                                flush_id: *fid,
                            },
                        ));
                    }
                }
                _ => {}
            }
        }
        let gen = p.gen;
        for (n, msg) in sends {
            self.send(n, key, interval, msg);
        }
        for tid in mend_reads {
            self.start_mend_read(key, gen, tid);
        }
        for tid in silent_scrubs {
            self.check_task(key, tid);
        }
        for (tid, from) in unanswered {
            let why = format!("node {from}: no answer in {} ms", cfg.sync_timeout_ms);
            self.repair_ask_next(key, tid, why);
        }
        for tid in restart_reads {
            let in_flight = self
                .disk
                .values()
                .any(|c| matches!(c, DiskCtx::Task { key: k, gen: g2, task } if *k == key && *g2 == gen && *task == tid));
            if !in_flight {
                self.start_task(key, gen, tid);
            }
        }
        for n in drops {
            self.drop_member(key, n);
        }
        for n in claims {
            self.claim(key, n);
        }
    }
}

impl Group {
    /// Whether [`Node::on_tick`] may have anything to do for this group: a
    /// primary with tasks (resends) or with a member not simply synced and
    /// acting (queries, drops, claims), or a placed member outside the acting
    /// set (rejoin requests). A superset of what the tick acts on.
    fn needs_tick(&self, me: NodeId, view: Option<&crate::map::GroupView>) -> bool {
        if let Some(p) = &self.primary {
            if !p.tasks.is_empty()
                || p.members.values().any(|m| {
                    matches!(m.state, MemberState::Querying) || !m.acting || m.claimed_at.is_some()
                })
            {
                return true;
            }
        }
        view.is_some_and(|gv| gv.placement.contains(&me) && !gv.acting.contains(&me))
    }

    fn new(d: GroupDurable) -> Self {
        Group {
            d,
            known_interval: 0,
            session: None,
            primary: None,
            locks: Locks::default(),
            waiting: BTreeMap::new(),
            last_sync_request: None,
        }
    }
}

/// Write `seq` again as whole blocks: `blocks` (the primary's bytes for
/// the blocks of `align` bytes around `op`'s range, after `op`), for a
/// member being mended (see [`Mend`]); `to_up_since` is filled in by the
/// sender.
fn mend_forward(
    seq: Seq,
    committed: Seq,
    ext: ExtentId,
    op: &WriteOp,
    fua: bool,
    blocks: &Bytes,
    align: u64,
) -> PeerMsg {
    let (offset, _) = blocks_around(op.range(), align);
    PeerMsg::Forward {
        to_up_since: 0,
        seq,
        committed,
        ext,
        op: WriteOp::Data {
            offset,
            data: blocks.clone(),
        },
        fua,
    }
}

/// Whole blocks of `align` bytes around `range`.
fn blocks_around((start, end): (u64, u64), align: u64) -> (u64, u64) {
    (start / align * align, end.div_ceil(align) * align)
}

/// [`blocks_around`] as a part of an extent.
fn block_part(range: (u64, u64), align: u64) -> Part {
    let (start, end) = blocks_around(range, align);
    Part::range(start, end)
}

/// The extents to push to a replica with report `r`: every extent the
/// primary wrote after the replica's committed watermark, and every extent
/// the replica itself is unsure of; of each, the ranges changed since that
/// watermark on either side where both remember them, else all of it.
fn push_set(primary: &GroupDurable, r: &SyncState, bug: Option<Bug>) -> BTreeMap<ExtentId, Part> {
    let mut set: BTreeMap<ExtentId, Part> = primary
        .log
        .iter()
        .filter(|(_, &s)| s > r.committed)
        .map(|(&e, _)| (e, primary.changed_since(e, r.committed)))
        .collect();
    for (e, part) in &r.uncertain {
        let joined = match set.get(e) {
            Some(p) if bug == Some(Bug::PrimaryRangesOnly) => p.clone(),
            Some(p) => p.union(part),
            None => part.clone(),
        };
        set.insert(*e, joined);
    }
    set
}
