//! The replication group protocol on the chunk RPC: client requests to a
//! group's primary ([`GroupRequest`], op `Group`) and messages between a
//! group's members ([`PeerHeader`], op `Peer`), and their conversions to and
//! from the core's types in `cairn_group::msg`.
//!
//! As everywhere on this RPC, block data never passes through a protobuf
//! field: a write's bytes, a forwarded write's bytes and a pushed extent
//! travel as the frame's data, beside the header.
//!
//! The core's extent ids carry no extent size, but the store needs one to
//! create an extent file. A client request carries its volume's extent size
//! (`extent_bytes`); a primary repeats it in every forward and push, so a
//! replica learns it from the message that creates the extent.

use bytes::Bytes;
use cairn_group::msg::{
    ClientOp, ClientRequest, Part, Peer, PeerMsg, PeerRefusal, Refusal, SyncState, WriteOp,
    PART_RANGES_MAX,
};
use cairn_group::{ExtentId, GroupKey, Seq};

use crate::chunk::ExtentKey;

/// What a [`GroupRequest`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
#[repr(i32)]
pub enum GroupOp {
    Unspecified = 0,
    /// Write the frame's data at `offset_bytes`.
    Write = 1,
    /// Zero `length_bytes` at `offset_bytes` (write-zeroes and trim).
    Zero = 2,
    /// Read `length_bytes` at `offset_bytes`.
    Read = 3,
    /// Make every write the group acknowledged durable on every replica.
    Flush = 4,
    /// Copy-up of `length_bytes` at `offset_bytes` (whole 4 KiB blocks):
    /// `WriteOp::Materialize`.
    Materialize = 5,
    /// Compare-and-write of `length_bytes` at `offset_bytes`: the frame's
    /// data is the bytes to compare followed by the bytes to write, each
    /// `length_bytes` long. The reply carries no data when it wrote, the
    /// bytes found when they differ.
    CompareAndWrite = 6,
    /// Scrub `length_bytes` at `offset_bytes` (whole 4 KiB blocks, at most
    /// [`SCRUB_BYTES_MAX`]): `ClientOp::Scrub`. The reply's data is a
    /// `ScrubFound`.
    Scrub = 7,
}

/// A scrub request covers at most this many bytes: each copy holds them in
/// memory while it is read and digested.
pub const SCRUB_BYTES_MAX: u64 = 4 << 20;

/// A volume client's request to a group's primary (chunk op `Group`).
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct GroupRequest {
    /// The client process; random per process.
    #[prost(uint64, tag = "1")]
    pub client: u64,
    /// Increasing per client; a retry reuses it.
    #[prost(uint64, tag = "2")]
    pub id: u64,
    /// Every request of this client below it is finished.
    #[prost(uint64, tag = "3")]
    pub oldest_outstanding: u64,
    /// Requests above `oldest_outstanding` the client gave up on.
    #[prost(uint64, repeated, tag = "4")]
    pub abandoned: Vec<u64>,
    /// The client's map epoch.
    #[prost(uint64, tag = "5")]
    pub epoch: u64,
    /// The group's replica count.
    #[prost(uint32, tag = "6")]
    pub replicas: u32,
    /// The group's placement group index.
    #[prost(uint32, tag = "7")]
    pub group_index: u32,
    /// The volume's `min_replicas`.
    #[prost(uint32, tag = "8")]
    pub min_replicas: u32,
    #[prost(enumeration = "GroupOp", tag = "9")]
    pub op: i32,
    /// The extent (Write, Zero, Read).
    #[prost(message, optional, tag = "10")]
    pub extent: Option<ExtentKey>,
    /// The volume's extent size (Write, Zero, Read).
    #[prost(uint32, tag = "11")]
    pub extent_bytes: u32,
    #[prost(uint64, tag = "12")]
    pub offset_bytes: u64,
    /// Zero, Read: bytes; Write: must equal the data length.
    #[prost(uint64, tag = "13")]
    pub length_bytes: u64,
    /// Write, Zero: durable on every replica before the reply.
    #[prost(bool, tag = "14")]
    pub fua: bool,
}

/// Why a group request was not done (reply status `Refused`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
#[repr(i32)]
pub enum RefusalKind {
    Unspecified = 0,
    StaleEpoch = 1,
    NotPrimary = 2,
    NodeBehind = 3,
    Busy = 4,
    Degraded = 5,
    Io = 6,
}

/// See [`cairn_group::msg::Refusal`].
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct GroupRefusal {
    #[prost(enumeration = "RefusalKind", tag = "1")]
    pub kind: i32,
    /// StaleEpoch, NotPrimary: the newest map epoch the node knows.
    #[prost(uint64, tag = "2")]
    pub current_epoch: u64,
    /// Degraded: replicas acting.
    #[prost(uint32, tag = "3")]
    pub acting: u32,
    /// Degraded: replicas required.
    #[prost(uint32, tag = "4")]
    pub min_replicas: u32,
    /// Io: what failed where.
    #[prost(string, tag = "5")]
    pub message: String,
}

/// Which [`PeerMsg`] a [`PeerHeader`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
#[repr(i32)]
pub enum PeerKind {
    Unspecified = 0,
    SyncRequest = 1,
    SyncQuery = 2,
    SyncReport = 3,
    Forward = 4,
    ForwardAck = 5,
    Push = 6,
    PushAck = 7,
    SyncDone = 8,
    Flush = 9,
    FlushAck = 10,
    Refused = 11,
    Fetch = 12,
    FetchReply = 13,
    ForwardFailed = 14,
    Verify = 15,
    VerifyReply = 16,
}

/// A message between members of a group (chunk op `Peer`; one way, never
/// answered on the RPC: the protocol's own acks are messages too).
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct PeerHeader {
    /// Sender node id.
    #[prost(uint64, tag = "1")]
    pub from: u64,
    #[prost(uint32, tag = "2")]
    pub replicas: u32,
    #[prost(uint32, tag = "3")]
    pub group_index: u32,
    /// The interval the sender acts in.
    #[prost(uint64, tag = "4")]
    pub interval: u64,
    #[prost(enumeration = "PeerKind", tag = "5")]
    pub kind: i32,
    /// SyncRequest: the sender's incarnation; messages from the primary: the
    /// recipient's.
    #[prost(uint64, tag = "6")]
    pub up_since: u64,
    /// Forward, ForwardAck, Push (if `has_seq`): a sequence number.
    #[prost(message, optional, tag = "7")]
    pub seq: Option<WireSeq>,
    /// Forward, SyncDone, SyncReport: a committed watermark.
    #[prost(message, optional, tag = "8")]
    pub committed: Option<WireSeq>,
    /// Forward, Push: the extent.
    #[prost(message, optional, tag = "9")]
    pub extent: Option<ExtentKey>,
    /// Forward, Push: the volume's extent size.
    #[prost(uint32, tag = "10")]
    pub extent_bytes: u32,
    /// Forward: the write zeroes instead of carrying data.
    #[prost(bool, tag = "11")]
    pub zero: bool,
    /// Forward: byte offset.
    #[prost(uint64, tag = "12")]
    pub offset_bytes: u64,
    /// Forward of a zero: bytes.
    #[prost(uint64, tag = "13")]
    pub length_bytes: u64,
    #[prost(bool, tag = "14")]
    pub fua: bool,
    /// Push, PushAck: push id; Flush, FlushAck: flush id.
    #[prost(uint64, tag = "15")]
    pub op_id: u64,
    /// Push: the frame's data is the extent (otherwise: delete it).
    #[prost(bool, tag = "16")]
    pub has_data: bool,
    /// SyncReport: uncertain extents.
    #[prost(message, repeated, tag = "17")]
    pub uncertain: Vec<ExtentKey>,
    /// Refused: the replica knows a newer interval (`current_interval`);
    /// otherwise the message was for another incarnation.
    #[prost(bool, tag = "18")]
    pub stale_interval: bool,
    #[prost(uint64, tag = "19")]
    pub current_interval: u64,
    /// Push: the ranges it replaces, as start, end pairs (none: the whole
    /// extent; the frame's data is their bytes one after another).
    /// SyncReport: the ranges of every uncertain extent, one after another,
    /// `uncertain_ranges` pairs each.
    #[prost(uint64, repeated, tag = "20")]
    pub ranges: Vec<u64>,
    /// SyncReport: per uncertain extent, how many pairs of `ranges` are its
    /// (0: the whole extent; the list empty: every one whole).
    #[prost(uint32, repeated, tag = "21")]
    pub uncertain_ranges: Vec<u32>,
    /// Forward: the write is a copy-up (`WriteOp::Materialize`) of
    /// `length_bytes` at `offset_bytes`, carrying no data.
    #[prost(bool, tag = "22")]
    pub materialize: bool,
    /// FetchReply: the replica could not read the part either; `error`
    /// says why (and the frame carries no data). ForwardFailed: `error`
    /// is why the write failed.
    #[prost(bool, tag = "23")]
    pub failed: bool,
    #[prost(string, tag = "24")]
    pub error: String,
    /// VerifyReply (unless `failed`): the CRC32 of the range.
    #[prost(uint32, tag = "25")]
    pub digest: u32,
}

/// Appends a part's ranges as start, end pairs; answers how many pairs (0
/// for the whole extent).
fn put_part(part: &Part, out: &mut Vec<u64>) -> u32 {
    match part {
        Part::Whole => 0,
        Part::Ranges(v) => {
            for &(s, e) in v {
                out.extend([s, e]);
            }
            v.len() as u32
        }
    }
}

/// Reads `pairs` start, end pairs of `flat` from `at` (0 pairs: the whole
/// extent) and checks them: sorted, apart, sector-aligned, inside the
/// largest extent.
fn take_part(flat: &[u64], at: &mut usize, pairs: u32, ext: ExtentId) -> Result<Part, String> {
    if pairs == 0 {
        return Ok(Part::Whole);
    }
    let n = pairs as usize;
    if n > PART_RANGES_MAX {
        return Err(format!("{ext}: {n} ranges, more than {PART_RANGES_MAX}"));
    }
    let Some(slice) = flat.get(*at..*at + 2 * n) else {
        return Err(format!("{ext}: {n} ranges named but fewer given"));
    };
    *at += 2 * n;
    let part = Part::Ranges(slice.chunks_exact(2).map(|c| (c[0], c[1])).collect());
    part.validate(64 << 20, 512)
        .map_err(|e| format!("{ext}: {e}"))?;
    Ok(part)
}

/// A [`Seq`] on the wire.
#[derive(Clone, Copy, PartialEq, Eq, ::prost::Message)]
pub struct WireSeq {
    #[prost(uint64, tag = "1")]
    pub interval: u64,
    #[prost(uint64, tag = "2")]
    pub n: u64,
}

impl From<Seq> for WireSeq {
    fn from(s: Seq) -> Self {
        WireSeq {
            interval: s.interval,
            n: s.n,
        }
    }
}

impl From<WireSeq> for Seq {
    fn from(s: WireSeq) -> Self {
        Seq {
            interval: s.interval,
            n: s.n,
        }
    }
}

impl From<ExtentId> for ExtentKey {
    fn from(e: ExtentId) -> Self {
        ExtentKey {
            volume_id: e.volume,
            extent_index: e.index,
            epoch: e.epoch,
        }
    }
}

impl From<ExtentKey> for ExtentId {
    fn from(k: ExtentKey) -> Self {
        ExtentId {
            volume: k.volume_id,
            index: k.extent_index,
            epoch: k.epoch,
        }
    }
}

/// Encodes a client request; `extent_bytes` is its volume's extent size.
/// Returns the header and the frame data.
pub fn encode_request(req: &ClientRequest, extent_bytes: u32) -> (GroupRequest, Bytes) {
    let mut h = GroupRequest {
        client: req.client,
        id: req.id,
        oldest_outstanding: req.oldest_outstanding,
        abandoned: req.abandoned.clone(),
        epoch: req.epoch,
        replicas: req.key.replicas,
        group_index: req.key.index,
        min_replicas: req.min_replicas,
        extent_bytes,
        ..Default::default()
    };
    let mut data = Bytes::new();
    match &req.op {
        ClientOp::Write { ext, op, fua } => {
            h.extent = Some((*ext).into());
            h.fua = *fua;
            match op {
                WriteOp::Data { offset, data: d } => {
                    h.op = GroupOp::Write as i32;
                    h.offset_bytes = *offset;
                    h.length_bytes = d.len() as u64;
                    data = d.clone();
                }
                WriteOp::Zero { offset, len } => {
                    h.op = GroupOp::Zero as i32;
                    h.offset_bytes = *offset;
                    h.length_bytes = *len;
                }
                WriteOp::Materialize { offset, len } => {
                    h.op = GroupOp::Materialize as i32;
                    h.offset_bytes = *offset;
                    h.length_bytes = *len;
                }
            }
        }
        ClientOp::Read { ext, offset, len } => {
            h.op = GroupOp::Read as i32;
            h.extent = Some((*ext).into());
            h.offset_bytes = *offset;
            h.length_bytes = *len;
        }
        ClientOp::CompareAndWrite {
            ext,
            offset,
            compare,
            data: d,
            fua,
        } => {
            h.op = GroupOp::CompareAndWrite as i32;
            h.extent = Some((*ext).into());
            h.offset_bytes = *offset;
            h.length_bytes = d.len() as u64;
            h.fua = *fua;
            // Small (a SCSI compare-and-write is at most 255 blocks, ATS
            // one): one copy to lay both halves out as one frame.
            let mut both = bytes::BytesMut::with_capacity(compare.len() + d.len());
            both.extend_from_slice(compare);
            both.extend_from_slice(d);
            data = both.freeze();
        }
        ClientOp::Scrub { ext, offset, len } => {
            h.op = GroupOp::Scrub as i32;
            h.extent = Some((*ext).into());
            h.offset_bytes = *offset;
            h.length_bytes = *len;
        }
        ClientOp::Flush => h.op = GroupOp::Flush as i32,
    }
    (h, data)
}

/// Decodes and checks a client request: the op is known, ranges lie inside
/// the extent and are whole 512-byte sectors, a write's length matches its
/// data. Returns the request and its volume's extent size (0 for Flush).
pub fn decode_request(h: &GroupRequest, data: Bytes) -> Result<(ClientRequest, u32), String> {
    let key = GroupKey {
        replicas: h.replicas,
        index: h.group_index,
    };
    if h.replicas == 0 {
        return Err("group request without a replica count".into());
    }
    let is_write = h.op == GroupOp::Write as i32 || h.op == GroupOp::CompareAndWrite as i32;
    if !is_write && !data.is_empty() {
        return Err(format!("{key}: {} data bytes on a non-write", data.len()));
    }
    let op = match GroupOp::try_from(h.op) {
        Ok(GroupOp::Flush) => ClientOp::Flush,
        Ok(
            kind @ (GroupOp::Write
            | GroupOp::Zero
            | GroupOp::Read
            | GroupOp::Materialize
            | GroupOp::CompareAndWrite
            | GroupOp::Scrub),
        ) => {
            let ext: ExtentId = h
                .extent
                .ok_or_else(|| format!("{key}: {kind:?} without an extent"))?
                .into();
            check_range(ext, h.extent_bytes, h.offset_bytes, h.length_bytes)?;
            if kind == GroupOp::Materialize || kind == GroupOp::Scrub {
                check_blocks(ext, h.offset_bytes, h.length_bytes)?;
            }
            if kind == GroupOp::Scrub && h.length_bytes > SCRUB_BYTES_MAX {
                return Err(format!(
                    "{ext}: scrub of {} bytes (at most {SCRUB_BYTES_MAX} per request)",
                    h.length_bytes
                ));
            }
            match kind {
                GroupOp::Write => {
                    if data.len() as u64 != h.length_bytes {
                        return Err(format!(
                            "{ext}: write of {} bytes carries {} bytes of data",
                            h.length_bytes,
                            data.len()
                        ));
                    }
                    ClientOp::Write {
                        ext,
                        op: WriteOp::Data {
                            offset: h.offset_bytes,
                            data,
                        },
                        fua: h.fua,
                    }
                }
                GroupOp::CompareAndWrite => {
                    if data.len() as u64 != 2 * h.length_bytes {
                        return Err(format!(
                            "{ext}: compare-and-write of {} bytes carries {} bytes of data, not twice that",
                            h.length_bytes,
                            data.len()
                        ));
                    }
                    let half = h.length_bytes as usize;
                    ClientOp::CompareAndWrite {
                        ext,
                        offset: h.offset_bytes,
                        compare: data.slice(..half),
                        data: data.slice(half..),
                        fua: h.fua,
                    }
                }
                GroupOp::Zero => ClientOp::Write {
                    ext,
                    op: WriteOp::Zero {
                        offset: h.offset_bytes,
                        len: h.length_bytes,
                    },
                    fua: h.fua,
                },
                GroupOp::Materialize => ClientOp::Write {
                    ext,
                    op: WriteOp::Materialize {
                        offset: h.offset_bytes,
                        len: h.length_bytes,
                    },
                    fua: h.fua,
                },
                GroupOp::Scrub => ClientOp::Scrub {
                    ext,
                    offset: h.offset_bytes,
                    len: h.length_bytes,
                },
                _ => ClientOp::Read {
                    ext,
                    offset: h.offset_bytes,
                    len: h.length_bytes,
                },
            }
        }
        _ => return Err(format!("{key}: unknown group op {}", h.op)),
    };
    Ok((
        ClientRequest {
            client: h.client,
            id: h.id,
            oldest_outstanding: h.oldest_outstanding,
            abandoned: h.abandoned.clone(),
            epoch: h.epoch,
            key,
            min_replicas: h.min_replicas,
            op,
        },
        h.extent_bytes,
    ))
}

/// A byte range must be non-empty, sector-aligned and inside an extent of a
/// valid size (a power of two, 64 KiB to 64 MiB).
/// A copy-up's range is whole 4 KiB blocks.
fn check_blocks(ext: ExtentId, offset: u64, len: u64) -> Result<(), String> {
    let align = cairn_group::msg::MATERIALIZE_ALIGN;
    if !offset.is_multiple_of(align) || !len.is_multiple_of(align) {
        return Err(format!(
            "{ext}: range {offset}+{len} is not whole {align}-byte blocks"
        ));
    }
    Ok(())
}

fn check_range(ext: ExtentId, extent_bytes: u32, offset: u64, len: u64) -> Result<(), String> {
    if !extent_bytes.is_power_of_two() || !((64 << 10)..=(64 << 20)).contains(&extent_bytes) {
        return Err(format!(
            "{ext}: extent size {extent_bytes} is not a power of two from 64 KiB to 64 MiB"
        ));
    }
    if len == 0 || !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
        return Err(format!(
            "{ext}: range {offset}+{len} is empty or not whole 512-byte sectors"
        ));
    }
    if offset
        .checked_add(len)
        .is_none_or(|end| end > extent_bytes as u64)
    {
        return Err(format!(
            "{ext}: range {offset}+{len} ends beyond the extent size {extent_bytes}"
        ));
    }
    Ok(())
}

/// Encodes a refusal.
pub fn encode_refusal(r: &Refusal) -> GroupRefusal {
    let mut w = GroupRefusal::default();
    match r {
        Refusal::StaleEpoch { current } => {
            w.kind = RefusalKind::StaleEpoch as i32;
            w.current_epoch = *current;
        }
        Refusal::NotPrimary { current } => {
            w.kind = RefusalKind::NotPrimary as i32;
            w.current_epoch = *current;
        }
        Refusal::NodeBehind => w.kind = RefusalKind::NodeBehind as i32,
        Refusal::Busy => w.kind = RefusalKind::Busy as i32,
        Refusal::Degraded { acting, min } => {
            w.kind = RefusalKind::Degraded as i32;
            w.acting = *acting;
            w.min_replicas = *min;
        }
        Refusal::Io(m) => {
            w.kind = RefusalKind::Io as i32;
            w.message = m.clone();
        }
    }
    w
}

/// Decodes a refusal; an unknown kind (a newer server) reads as `Busy`,
/// which a client retries.
pub fn decode_refusal(w: &GroupRefusal) -> Refusal {
    match RefusalKind::try_from(w.kind) {
        Ok(RefusalKind::StaleEpoch) => Refusal::StaleEpoch {
            current: w.current_epoch,
        },
        Ok(RefusalKind::NotPrimary) => Refusal::NotPrimary {
            current: w.current_epoch,
        },
        Ok(RefusalKind::NodeBehind) => Refusal::NodeBehind,
        Ok(RefusalKind::Degraded) => Refusal::Degraded {
            acting: w.acting,
            min: w.min_replicas,
        },
        Ok(RefusalKind::Io) => Refusal::Io(w.message.clone()),
        _ => Refusal::Busy,
    }
}

/// Encodes a peer message. `extent_bytes` is the extent size of the volume
/// a Forward or Push concerns (ignored for the others). Returns the header
/// and the frame data.
pub fn encode_peer(p: &Peer, extent_bytes: u32) -> (PeerHeader, Bytes) {
    let mut h = PeerHeader {
        from: p.from,
        replicas: p.key.replicas,
        group_index: p.key.index,
        interval: p.interval,
        ..Default::default()
    };
    let mut data = Bytes::new();
    let kind = match &p.msg {
        PeerMsg::SyncRequest { up_since } => {
            h.up_since = *up_since;
            PeerKind::SyncRequest
        }
        PeerMsg::SyncQuery { to_up_since } => {
            h.up_since = *to_up_since;
            PeerKind::SyncQuery
        }
        PeerMsg::SyncReport(s) => {
            h.committed = Some(s.committed.into());
            h.uncertain = s.uncertain.iter().map(|(e, _)| (*e).into()).collect();
            h.uncertain_ranges = s
                .uncertain
                .iter()
                .map(|(_, part)| put_part(part, &mut h.ranges))
                .collect();
            PeerKind::SyncReport
        }
        PeerMsg::Forward {
            to_up_since,
            seq,
            committed,
            ext,
            op,
            fua,
        } => {
            h.up_since = *to_up_since;
            h.seq = Some((*seq).into());
            h.committed = Some((*committed).into());
            h.extent = Some((*ext).into());
            h.extent_bytes = extent_bytes;
            h.fua = *fua;
            match op {
                WriteOp::Data { offset, data: d } => {
                    h.offset_bytes = *offset;
                    h.length_bytes = d.len() as u64;
                    data = d.clone();
                }
                WriteOp::Zero { offset, len } => {
                    h.zero = true;
                    h.offset_bytes = *offset;
                    h.length_bytes = *len;
                }
                WriteOp::Materialize { offset, len } => {
                    h.materialize = true;
                    h.offset_bytes = *offset;
                    h.length_bytes = *len;
                }
            }
            PeerKind::Forward
        }
        PeerMsg::ForwardAck { seq } => {
            h.seq = Some((*seq).into());
            PeerKind::ForwardAck
        }
        PeerMsg::ForwardFailed { seq, error } => {
            h.seq = Some((*seq).into());
            h.error = error.clone();
            PeerKind::ForwardFailed
        }
        PeerMsg::Push {
            to_up_since,
            push_id,
            ext,
            seq,
            part,
            data: d,
        } => {
            h.up_since = *to_up_since;
            h.op_id = *push_id;
            h.extent = Some((*ext).into());
            h.extent_bytes = extent_bytes;
            h.seq = seq.map(Into::into);
            put_part(part, &mut h.ranges);
            if let Some(d) = d {
                h.has_data = true;
                data = d.clone();
            }
            PeerKind::Push
        }
        PeerMsg::PushAck { push_id } => {
            h.op_id = *push_id;
            PeerKind::PushAck
        }
        PeerMsg::SyncDone {
            to_up_since,
            committed,
        } => {
            h.up_since = *to_up_since;
            h.committed = Some((*committed).into());
            PeerKind::SyncDone
        }
        PeerMsg::Flush {
            to_up_since,
            flush_id,
        } => {
            h.up_since = *to_up_since;
            h.op_id = *flush_id;
            PeerKind::Flush
        }
        PeerMsg::FlushAck { flush_id } => {
            h.op_id = *flush_id;
            PeerKind::FlushAck
        }
        PeerMsg::Fetch {
            to_up_since,
            fetch_id,
            ext,
            part,
        } => {
            h.up_since = *to_up_since;
            h.op_id = *fetch_id;
            h.extent = Some((*ext).into());
            h.extent_bytes = extent_bytes;
            put_part(part, &mut h.ranges);
            PeerKind::Fetch
        }
        PeerMsg::Verify {
            to_up_since,
            verify_id,
            ext,
            offset,
            len,
        } => {
            h.up_since = *to_up_since;
            h.op_id = *verify_id;
            h.extent = Some((*ext).into());
            h.extent_bytes = extent_bytes;
            h.offset_bytes = *offset;
            h.length_bytes = *len;
            PeerKind::Verify
        }
        PeerMsg::VerifyReply { verify_id, digest } => {
            h.op_id = *verify_id;
            match digest {
                Ok(d) => h.digest = *d,
                Err(e) => {
                    h.failed = true;
                    h.error = e.clone();
                }
            }
            PeerKind::VerifyReply
        }
        PeerMsg::FetchReply { fetch_id, data: d } => {
            h.op_id = *fetch_id;
            match d {
                Ok(Some(d)) => {
                    h.has_data = true;
                    data = d.clone();
                }
                Ok(None) => {}
                Err(e) => {
                    h.failed = true;
                    h.error = e.clone();
                }
            }
            PeerKind::FetchReply
        }
        PeerMsg::Refused(r) => {
            match r {
                PeerRefusal::StaleInterval { current } => {
                    h.stale_interval = true;
                    h.current_interval = *current;
                }
                PeerRefusal::WrongIncarnation => {}
            }
            PeerKind::Refused
        }
    };
    h.kind = kind as i32;
    (h, data)
}

/// Decodes and checks a peer message. Returns it and, for Forward, Push and
/// Fetch, the volume's extent size (0 otherwise).
pub fn decode_peer(h: &PeerHeader, data: Bytes) -> Result<(Peer, u32), String> {
    let key = GroupKey {
        replicas: h.replicas,
        index: h.group_index,
    };
    let kind = PeerKind::try_from(h.kind)
        .ok()
        .filter(|k| *k != PeerKind::Unspecified)
        .ok_or_else(|| format!("{key}: unknown peer message kind {}", h.kind))?;
    let need_seq = || {
        h.seq
            .map(Seq::from)
            .ok_or_else(|| format!("{key}: {kind:?} without a sequence number"))
    };
    let need_committed = || {
        h.committed
            .map(Seq::from)
            .ok_or_else(|| format!("{key}: {kind:?} without a committed watermark"))
    };
    let need_ext = || {
        h.extent
            .map(ExtentId::from)
            .ok_or_else(|| format!("{key}: {kind:?} without an extent"))
    };
    let carries_data = matches!(
        kind,
        PeerKind::Forward | PeerKind::Push | PeerKind::FetchReply
    );
    if !carries_data && !data.is_empty() {
        return Err(format!("{key}: {} data bytes on a {kind:?}", data.len()));
    }
    let mut extent_bytes = 0;
    let msg = match kind {
        PeerKind::Unspecified => unreachable!("filtered above"),
        PeerKind::SyncRequest => PeerMsg::SyncRequest {
            up_since: h.up_since,
        },
        PeerKind::SyncQuery => PeerMsg::SyncQuery {
            to_up_since: h.up_since,
        },
        PeerKind::SyncReport => {
            if !h.uncertain_ranges.is_empty() && h.uncertain_ranges.len() != h.uncertain.len() {
                return Err(format!(
                    "{key}: report of {} uncertain extents with {} range counts",
                    h.uncertain.len(),
                    h.uncertain_ranges.len()
                ));
            }
            let mut at = 0;
            let mut uncertain = Vec::with_capacity(h.uncertain.len());
            for (i, &k) in h.uncertain.iter().enumerate() {
                let ext = ExtentId::from(k);
                let pairs = h.uncertain_ranges.get(i).copied().unwrap_or(0);
                uncertain.push((ext, take_part(&h.ranges, &mut at, pairs, ext)?));
            }
            if at != h.ranges.len() {
                return Err(format!("{key}: report carries ranges no extent claims"));
            }
            PeerMsg::SyncReport(SyncState {
                committed: need_committed()?,
                uncertain,
            })
        }
        PeerKind::Forward => {
            let ext = need_ext()?;
            check_range(ext, h.extent_bytes, h.offset_bytes, h.length_bytes)?;
            extent_bytes = h.extent_bytes;
            if (h.zero || h.materialize) && !data.is_empty() {
                return Err(format!("{ext}: a forwarded zero or copy-up carries data"));
            }
            let op = if h.zero && h.materialize {
                return Err(format!("{ext}: a forward is a zero or a copy-up, not both"));
            } else if h.zero {
                WriteOp::Zero {
                    offset: h.offset_bytes,
                    len: h.length_bytes,
                }
            } else if h.materialize {
                check_blocks(ext, h.offset_bytes, h.length_bytes)?;
                WriteOp::Materialize {
                    offset: h.offset_bytes,
                    len: h.length_bytes,
                }
            } else {
                if data.len() as u64 != h.length_bytes {
                    return Err(format!(
                        "{ext}: forwarded write of {} bytes carries {}",
                        h.length_bytes,
                        data.len()
                    ));
                }
                WriteOp::Data {
                    offset: h.offset_bytes,
                    data,
                }
            };
            PeerMsg::Forward {
                to_up_since: h.up_since,
                seq: need_seq()?,
                committed: need_committed()?,
                ext,
                op,
                fua: h.fua,
            }
        }
        PeerKind::ForwardAck => PeerMsg::ForwardAck { seq: need_seq()? },
        PeerKind::ForwardFailed => PeerMsg::ForwardFailed {
            seq: need_seq()?,
            error: h.error.clone(),
        },
        PeerKind::Push => {
            let ext = need_ext()?;
            if !h.ranges.len().is_multiple_of(2) {
                return Err(format!("{ext}: push with an odd count of range bounds"));
            }
            let mut at = 0;
            let part = take_part(&h.ranges, &mut at, (h.ranges.len() / 2) as u32, ext)?;
            let data = if let Some(want) = part.bytes() {
                check_range(ext, h.extent_bytes, 0, h.extent_bytes as u64)?;
                part.validate(h.extent_bytes as u64, 512)
                    .map_err(|e| format!("{ext}: {e}"))?;
                if !h.has_data || data.len() as u64 != want {
                    return Err(format!(
                        "{ext}: push of {want} bytes in ranges carries {}",
                        data.len()
                    ));
                }
                extent_bytes = h.extent_bytes;
                Some(data)
            } else if h.has_data {
                if data.len() as u64 != h.extent_bytes as u64 {
                    return Err(format!(
                        "{ext}: pushed copy of {} bytes for an extent of {}",
                        data.len(),
                        h.extent_bytes
                    ));
                }
                check_range(ext, h.extent_bytes, 0, h.extent_bytes as u64)?;
                extent_bytes = h.extent_bytes;
                Some(data)
            } else {
                if !data.is_empty() {
                    return Err(format!("{ext}: a push that deletes carries data"));
                }
                None
            };
            PeerMsg::Push {
                to_up_since: h.up_since,
                push_id: h.op_id,
                ext,
                seq: h.seq.map(Seq::from),
                part,
                data,
            }
        }
        PeerKind::PushAck => PeerMsg::PushAck { push_id: h.op_id },
        PeerKind::SyncDone => PeerMsg::SyncDone {
            to_up_since: h.up_since,
            committed: need_committed()?,
        },
        PeerKind::Flush => PeerMsg::Flush {
            to_up_since: h.up_since,
            flush_id: h.op_id,
        },
        PeerKind::FlushAck => PeerMsg::FlushAck { flush_id: h.op_id },
        PeerKind::Fetch => {
            let ext = need_ext()?;
            if !h.ranges.len().is_multiple_of(2) {
                return Err(format!("{ext}: fetch with an odd count of range bounds"));
            }
            let mut at = 0;
            let part = take_part(&h.ranges, &mut at, (h.ranges.len() / 2) as u32, ext)?;
            if h.extent_bytes != 0 {
                check_range(ext, h.extent_bytes, 0, h.extent_bytes as u64)?;
                part.validate(h.extent_bytes as u64, 512)
                    .map_err(|e| format!("{ext}: {e}"))?;
                extent_bytes = h.extent_bytes;
            }
            PeerMsg::Fetch {
                to_up_since: h.up_since,
                fetch_id: h.op_id,
                ext,
                part,
            }
        }
        PeerKind::Verify => {
            let ext = need_ext()?;
            check_range(ext, h.extent_bytes, h.offset_bytes, h.length_bytes)?;
            if h.length_bytes > SCRUB_BYTES_MAX {
                return Err(format!(
                    "{ext}: verify of {} bytes (at most {SCRUB_BYTES_MAX})",
                    h.length_bytes
                ));
            }
            extent_bytes = h.extent_bytes;
            PeerMsg::Verify {
                to_up_since: h.up_since,
                verify_id: h.op_id,
                ext,
                offset: h.offset_bytes,
                len: h.length_bytes,
            }
        }
        PeerKind::VerifyReply => PeerMsg::VerifyReply {
            verify_id: h.op_id,
            digest: if h.failed {
                Err(h.error.clone())
            } else {
                Ok(h.digest)
            },
        },
        PeerKind::FetchReply => {
            let reply = if h.failed {
                if !data.is_empty() || h.has_data {
                    return Err(format!("{key}: a failed fetch reply carries data"));
                }
                Err(h.error.clone())
            } else if h.has_data {
                Ok(Some(data))
            } else {
                if !data.is_empty() {
                    return Err(format!("{key}: a fetch reply without a copy carries data"));
                }
                Ok(None)
            };
            PeerMsg::FetchReply {
                fetch_id: h.op_id,
                data: reply,
            }
        }
        PeerKind::Refused => PeerMsg::Refused(if h.stale_interval {
            PeerRefusal::StaleInterval {
                current: h.current_interval,
            }
        } else {
            PeerRefusal::WrongIncarnation
        }),
    };
    Ok((
        Peer {
            from: h.from,
            key,
            interval: h.interval,
            msg,
        },
        extent_bytes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    const EXT: ExtentId = ExtentId {
        volume: 3,
        index: 9,
        epoch: 1,
    };
    const KEY: GroupKey = GroupKey {
        replicas: 3,
        index: 17,
    };

    fn round_trip_peer(msg: PeerMsg) {
        let p = Peer {
            from: 4,
            key: KEY,
            interval: 12,
            msg,
        };
        let (h, data) = encode_peer(&p, 1 << 20);
        let h = PeerHeader::decode(&h.encode_to_vec()[..]).unwrap();
        let (back, _) = decode_peer(&h, data).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn every_peer_message_round_trips() {
        let seq = Seq { interval: 12, n: 5 };
        for msg in [
            PeerMsg::SyncRequest { up_since: 7 },
            PeerMsg::SyncQuery { to_up_since: 7 },
            PeerMsg::SyncReport(SyncState {
                committed: seq,
                uncertain: vec![(EXT, Part::Whole)],
            }),
            PeerMsg::SyncReport(SyncState {
                committed: seq,
                uncertain: vec![
                    (EXT, Part::Ranges(vec![(0, 4096), (8192, 9216)])),
                    (ExtentId { index: 9, ..EXT }, Part::Whole),
                    (
                        ExtentId { index: 10, ..EXT },
                        Part::Ranges(vec![(512, 1024)]),
                    ),
                ],
            }),
            PeerMsg::Forward {
                to_up_since: 7,
                seq,
                committed: Seq { interval: 12, n: 4 },
                ext: EXT,
                op: WriteOp::Data {
                    offset: 512,
                    data: Bytes::from(vec![7; 1024]),
                },
                fua: true,
            },
            PeerMsg::Forward {
                to_up_since: 7,
                seq,
                committed: Seq::default(),
                ext: EXT,
                op: WriteOp::Zero {
                    offset: 4096,
                    len: 8192,
                },
                fua: false,
            },
            PeerMsg::Forward {
                to_up_since: 7,
                seq,
                committed: Seq::default(),
                ext: EXT,
                op: WriteOp::Materialize {
                    offset: 4096,
                    len: 65536,
                },
                fua: false,
            },
            PeerMsg::ForwardAck { seq },
            PeerMsg::Push {
                to_up_since: 7,
                push_id: 2,
                ext: EXT,
                seq: Some(seq),
                part: Part::Whole,
                data: Some(Bytes::from(vec![1; 1 << 20])),
            },
            PeerMsg::Push {
                to_up_since: 7,
                push_id: 4,
                ext: EXT,
                seq: Some(seq),
                part: Part::Ranges(vec![(4096, 8192), (65536, 66048)]),
                data: Some(Bytes::from(vec![1; 4096 + 512])),
            },
            PeerMsg::Push {
                to_up_since: 7,
                push_id: 3,
                ext: EXT,
                seq: None,
                part: Part::Whole,
                data: None,
            },
            PeerMsg::PushAck { push_id: 3 },
            PeerMsg::SyncDone {
                to_up_since: 7,
                committed: seq,
            },
            PeerMsg::Flush {
                to_up_since: 7,
                flush_id: 8,
            },
            PeerMsg::FlushAck { flush_id: 8 },
            PeerMsg::Refused(PeerRefusal::StaleInterval { current: 13 }),
            PeerMsg::Refused(PeerRefusal::WrongIncarnation),
            PeerMsg::Fetch {
                to_up_since: 7,
                fetch_id: 9,
                ext: EXT,
                part: Part::Ranges(vec![(4096, 12288)]),
            },
            PeerMsg::Fetch {
                to_up_since: 7,
                fetch_id: 10,
                ext: EXT,
                part: Part::Whole,
            },
            PeerMsg::FetchReply {
                fetch_id: 9,
                data: Ok(Some(Bytes::from(vec![3; 8192]))),
            },
            PeerMsg::FetchReply {
                fetch_id: 10,
                data: Ok(None),
            },
            PeerMsg::FetchReply {
                fetch_id: 11,
                data: Err("node 2: checksum mismatch".into()),
            },
            PeerMsg::ForwardFailed {
                seq,
                error: "node 3: block 5 of extent 9 cannot merge a partial write".into(),
            },
            PeerMsg::Verify {
                to_up_since: 7,
                verify_id: 12,
                ext: EXT,
                offset: 65536,
                len: 65536,
            },
            PeerMsg::VerifyReply {
                verify_id: 12,
                digest: Ok(0xdead_beef),
            },
            PeerMsg::VerifyReply {
                verify_id: 13,
                digest: Err("node 2: checksum mismatch".into()),
            },
        ] {
            round_trip_peer(msg);
        }
    }

    #[test]
    fn every_client_request_and_refusal_round_trips() {
        for op in [
            ClientOp::Write {
                ext: EXT,
                op: WriteOp::Data {
                    offset: 0,
                    data: Bytes::from(vec![5; 4096]),
                },
                fua: true,
            },
            ClientOp::Write {
                ext: EXT,
                op: WriteOp::Zero {
                    offset: 512,
                    len: 512,
                },
                fua: false,
            },
            ClientOp::Write {
                ext: EXT,
                op: WriteOp::Materialize {
                    offset: 8192,
                    len: 4096,
                },
                fua: false,
            },
            ClientOp::Read {
                ext: EXT,
                offset: 4096,
                len: 4096,
            },
            ClientOp::CompareAndWrite {
                ext: EXT,
                offset: 1024,
                compare: Bytes::from(vec![1; 512]),
                data: Bytes::from(vec![2; 512]),
                fua: true,
            },
            ClientOp::Scrub {
                ext: EXT,
                offset: 4096,
                len: (1 << 20) - 4096,
            },
            ClientOp::Flush,
        ] {
            let req = ClientRequest {
                client: 11,
                id: 40,
                oldest_outstanding: 38,
                abandoned: vec![39],
                epoch: 12,
                key: KEY,
                min_replicas: 2,
                op,
            };
            let (h, data) = encode_request(&req, 1 << 20);
            let h = GroupRequest::decode(&h.encode_to_vec()[..]).unwrap();
            let (back, _) = decode_request(&h, data).unwrap();
            assert_eq!(back, req);
        }
        for r in [
            Refusal::StaleEpoch { current: 4 },
            Refusal::NotPrimary { current: 5 },
            Refusal::NodeBehind,
            Refusal::Busy,
            Refusal::Degraded { acting: 1, min: 2 },
            Refusal::Io("volume 1 extent 2: EIO".into()),
        ] {
            assert_eq!(decode_refusal(&encode_refusal(&r)), r);
        }
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let good = GroupRequest {
            client: 1,
            id: 1,
            replicas: 3,
            op: GroupOp::Read as i32,
            extent: Some(EXT.into()),
            extent_bytes: 1 << 20,
            offset_bytes: 0,
            length_bytes: 4096,
            ..Default::default()
        };
        assert!(decode_request(&good, Bytes::new()).is_ok());
        let cases = [
            GroupRequest {
                op: 99,
                ..good.clone()
            },
            GroupRequest {
                extent: None,
                ..good.clone()
            },
            GroupRequest {
                offset_bytes: 100,
                ..good.clone()
            },
            GroupRequest {
                length_bytes: 0,
                ..good.clone()
            },
            GroupRequest {
                offset_bytes: (1 << 20) - 512,
                length_bytes: 1024,
                ..good.clone()
            },
            GroupRequest {
                extent_bytes: 3000,
                ..good.clone()
            },
            GroupRequest {
                replicas: 0,
                ..good.clone()
            },
            GroupRequest {
                op: GroupOp::Write as i32,
                ..good.clone()
            },
            // A copy-up of part of a block.
            GroupRequest {
                op: GroupOp::Materialize as i32,
                offset_bytes: 512,
                ..good.clone()
            },
            // A scrub of part of a block, and one too long.
            GroupRequest {
                op: GroupOp::Scrub as i32,
                length_bytes: 512,
                ..good.clone()
            },
            GroupRequest {
                op: GroupOp::Scrub as i32,
                extent_bytes: 64 << 20,
                length_bytes: SCRUB_BYTES_MAX + 4096,
                ..good.clone()
            },
        ];
        for bad in cases {
            let e = decode_request(&bad, Bytes::new()).unwrap_err();
            assert!(!e.is_empty());
        }
        assert!(decode_request(&good, Bytes::from_static(b"x")).is_err());
        // A compare-and-write carries both halves, each the range's length.
        let caw = GroupRequest {
            op: GroupOp::CompareAndWrite as i32,
            length_bytes: 512,
            ..good.clone()
        };
        assert!(decode_request(&caw, Bytes::from(vec![0; 1024])).is_ok());
        for len in [0, 512, 1536] {
            let e = decode_request(&caw, Bytes::from(vec![0; len])).unwrap_err();
            assert!(e.contains("not twice"), "{len}: {e}");
        }
        let peer = PeerHeader {
            kind: 42,
            ..Default::default()
        };
        assert!(decode_peer(&peer, Bytes::new()).is_err());
        let forward_without_seq = PeerHeader {
            kind: PeerKind::Forward as i32,
            replicas: 3,
            extent: Some(EXT.into()),
            extent_bytes: 1 << 20,
            length_bytes: 512,
            zero: true,
            committed: Some(WireSeq::default()),
            ..Default::default()
        };
        assert!(decode_peer(&forward_without_seq, Bytes::new()).is_err());
        let forward = PeerHeader {
            seq: Some(WireSeq::default()),
            zero: false,
            ..forward_without_seq
        };
        assert!(decode_peer(&forward, Bytes::from(vec![0; 512])).is_ok());
        // Zero and copy-up at once; a copy-up with data; of part of a block.
        for (bad, data) in [
            (
                PeerHeader {
                    zero: true,
                    materialize: true,
                    ..forward.clone()
                },
                Bytes::new(),
            ),
            (
                PeerHeader {
                    materialize: true,
                    length_bytes: 4096,
                    ..forward.clone()
                },
                Bytes::from(vec![0; 4096]),
            ),
            (
                PeerHeader {
                    materialize: true,
                    ..forward.clone()
                },
                Bytes::new(),
            ),
        ] {
            let e = decode_peer(&bad, data).unwrap_err();
            assert!(!e.is_empty(), "{bad:?}");
        }
        let copy_up = PeerHeader {
            materialize: true,
            length_bytes: 4096,
            ..forward
        };
        assert!(decode_peer(&copy_up, Bytes::new()).is_ok());
    }

    #[test]
    fn bad_ranges_in_pushes_and_reports_are_refused() {
        let push = PeerHeader {
            kind: PeerKind::Push as i32,
            replicas: 3,
            extent: Some(EXT.into()),
            extent_bytes: 1 << 20,
            has_data: true,
            ranges: vec![4096, 8192],
            ..Default::default()
        };
        assert!(decode_peer(&push, Bytes::from(vec![0; 4096])).is_ok());
        let data_cases = [
            // Odd count of bounds; out of order; overlapping; empty; not
            // sector-aligned; beyond the extent.
            (vec![4096, 8192, 9000], 4096),
            (vec![8192, 12288, 0, 4096], 8192),
            (vec![0, 8192, 4096, 12288], 16384),
            (vec![4096, 4096], 0),
            (vec![100, 4196], 4096),
            (vec![(1 << 20) - 4096, (1 << 20) + 4096], 8192),
        ];
        for (ranges, len) in data_cases {
            let h = PeerHeader {
                ranges: ranges.clone(),
                ..push.clone()
            };
            assert!(
                decode_peer(&h, Bytes::from(vec![0; len])).is_err(),
                "{ranges:?} accepted"
            );
        }
        // The data must be exactly the ranges' bytes.
        assert!(decode_peer(&push, Bytes::from(vec![0; 4095])).is_err());
        assert!(decode_peer(&push, Bytes::from(vec![0; 1 << 20])).is_err());
        let report = PeerHeader {
            kind: PeerKind::SyncReport as i32,
            replicas: 3,
            committed: Some(WireSeq::default()),
            uncertain: vec![EXT.into(), EXT.into()],
            uncertain_ranges: vec![1, 0],
            ranges: vec![0, 4096],
            ..Default::default()
        };
        assert!(decode_peer(&report, Bytes::new()).is_ok());
        for (counts, ranges) in [
            (vec![1], vec![0, 4096]),
            (vec![2, 0], vec![0, 4096]),
            (vec![1, 0], vec![0, 4096, 8192, 12288]),
            (vec![1, 0], vec![4096, 0]),
        ] {
            let h = PeerHeader {
                uncertain_ranges: counts.clone(),
                ranges: ranges.clone(),
                ..report.clone()
            };
            assert!(
                decode_peer(&h, Bytes::new()).is_err(),
                "{counts:?} {ranges:?} accepted"
            );
        }
    }
}
