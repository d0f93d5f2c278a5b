//! Turning a decoded [`ChunkRequest`] header into a checked, typed [`Request`].
//!
//! Everything the network sends is checked here, before any buffer is
//! allocated for a reply or any command reaches the store, so a bad request
//! costs one small reply and nothing else. The store checks ranges again on
//! its side; the two checks are meant to agree.

use cairn_proto::chunk::{ChunkRequest, Op, Status, EXTENT_LIST_PAGE_MAX};
use cairn_proto::group::{GroupOp, GroupRequest, PeerHeader};

use crate::store::layout::{extent_bytes_valid, SECTOR_BYTES};
use crate::store::ExtentKey;

/// Most epochs a direct read may read through (the volume manager allows
/// chains of 4096).
const BELOW_MAX: usize = 4096;

/// A request that passed every check that does not need the store.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Request {
    Read {
        key: ExtentKey,
        /// The epochs beneath `key`'s to read through (usually none).
        below: Vec<u64>,
        extent_bytes: u32,
        offset: u64,
        len: u32,
    },
    /// The data is the frame's data bytes, `len` of them.
    Write {
        key: ExtentKey,
        extent_bytes: u32,
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        key: ExtentKey,
        extent_bytes: u32,
        offset: u64,
        len: u32,
        fua: bool,
        punch: bool,
    },
    Trim {
        key: ExtentKey,
        extent_bytes: u32,
        offset: u64,
        len: u32,
    },
    Flush,
    ExtentList {
        volume: Option<u64>,
        after: Option<ExtentKey>,
        limit: usize,
    },
    ExtentHeld {
        key: ExtentKey,
    },
    ExtentStat {
        key: ExtentKey,
    },
    NodeStat,
    /// A volume client's request to a group's primary; decoded fully (with
    /// its data) by `cairn_proto::group::decode_request`.
    Group {
        header: Box<GroupRequest>,
        /// Data bytes held in flight: a write's data or a read's reply.
        buffer_bytes: u32,
    },
    /// A message from a group member; never answered.
    Peer {
        header: Box<PeerHeader>,
    },
}

impl Request {
    /// Data bytes the request holds while in flight: its write data or its
    /// read reply. Bounded by the frame data limit given to [`parse`].
    pub(crate) fn buffer_bytes(&self) -> u32 {
        match self {
            Request::Read { len, .. } | Request::Write { len, .. } => *len,
            Request::Group { buffer_bytes, .. } => *buffer_bytes,
            _ => 0,
        }
    }
}

/// Why a request is answered without running it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub status: Status,
    pub message: String,
}

impl Rejection {
    fn invalid(message: String) -> Self {
        Self {
            status: Status::InvalidArgument,
            message,
        }
    }
}

/// Checks `header` (whose frame carried `data_bytes` of data) and types it.
/// `read_bytes_max` bounds a read, whose reply must fit in one frame.
pub(crate) fn parse(
    header: &ChunkRequest,
    data_bytes: u32,
    read_bytes_max: u32,
) -> Result<Request, Rejection> {
    // Id 0 is what a reply carries when the server could not decode the
    // request's header at all; a request using it could not be told apart
    // (and an all-default reply would encode to an empty, illegal header).
    if header.request_id == 0 {
        return Err(Rejection::invalid(
            "request id 0 is reserved; ids start at 1".to_string(),
        ));
    }
    let op = match Op::try_from(header.op) {
        Ok(Op::Unspecified) | Err(_) => {
            return Err(Rejection {
                status: Status::UnknownOp,
                message: format!("unknown op {}", header.op),
            })
        }
        Ok(op) => op,
    };
    if !matches!(op, Op::Write | Op::Group | Op::Peer) && data_bytes != 0 {
        return Err(Rejection::invalid(format!(
            "{op:?} request carries {data_bytes} data bytes; only Write, Group and Peer may"
        )));
    }
    match op {
        Op::Unspecified => unreachable!("rejected above"),
        Op::Group => {
            let header = header.group.clone().ok_or_else(|| {
                Rejection::invalid("Group request without its group header".into())
            })?;
            let buffer_bytes = if header.op == GroupOp::Read as i32 {
                if header.length_bytes > read_bytes_max as u64 {
                    return Err(Rejection::invalid(format!(
                        "group read of {} bytes is over the {read_bytes_max}-byte frame limit; split it",
                        header.length_bytes
                    )));
                }
                header.length_bytes as u32
            } else {
                data_bytes
            };
            Ok(Request::Group {
                header: Box::new(header),
                buffer_bytes,
            })
        }
        Op::Peer => {
            let header = header
                .peer
                .clone()
                .ok_or_else(|| Rejection::invalid("Peer message without its peer header".into()))?;
            Ok(Request::Peer {
                header: Box::new(header),
            })
        }
        Op::Read => {
            let (key, extent_bytes, offset, len) = extent_range(header, op)?;
            if len > read_bytes_max {
                return Err(Rejection::invalid(format!(
                    "{key}: read of {len} bytes is over the {read_bytes_max}-byte frame limit; split it"
                )));
            }
            if header.below.len() > BELOW_MAX {
                return Err(Rejection::invalid(format!(
                    "{key}: a chain of {} epochs is over the {BELOW_MAX} allowed",
                    header.below.len()
                )));
            }
            Ok(Request::Read {
                key,
                below: header.below.clone(),
                extent_bytes,
                offset,
                len,
            })
        }
        Op::Write => {
            let (key, extent_bytes, offset, len) = extent_range(header, op)?;
            if len != data_bytes {
                return Err(Rejection::invalid(format!(
                    "{key}: write says length {len} bytes but its frame carries {data_bytes} data bytes"
                )));
            }
            Ok(Request::Write {
                key,
                extent_bytes,
                offset,
                len,
                fua: header.fua,
            })
        }
        Op::WriteZeroes => {
            let (key, extent_bytes, offset, len) = extent_range(header, op)?;
            Ok(Request::WriteZeroes {
                key,
                extent_bytes,
                offset,
                len,
                fua: header.fua,
                punch: !header.no_hole,
            })
        }
        Op::Trim => {
            let (key, extent_bytes, offset, len) = extent_range(header, op)?;
            Ok(Request::Trim {
                key,
                extent_bytes,
                offset,
                len,
            })
        }
        Op::Flush => Ok(Request::Flush),
        Op::ExtentList => {
            // 0 is the protobuf default, i.e. "not set": a full page.
            let limit = match header.list_limit {
                0 => EXTENT_LIST_PAGE_MAX,
                n => n.min(EXTENT_LIST_PAGE_MAX),
            };
            Ok(Request::ExtentList {
                volume: header.volume_filter,
                after: header.list_after.map(ExtentKey::from),
                limit: limit as usize,
            })
        }
        Op::ExtentStat => Ok(Request::ExtentStat {
            key: extent_key(header, op)?,
        }),
        Op::ExtentHeld => Ok(Request::ExtentHeld {
            key: extent_key(header, op)?,
        }),
        Op::NodeStat => Ok(Request::NodeStat),
    }
}

fn extent_key(header: &ChunkRequest, op: Op) -> Result<ExtentKey, Rejection> {
    header
        .extent
        .map(ExtentKey::from)
        .ok_or_else(|| Rejection::invalid(format!("{op:?} request names no extent")))
}

/// The extent and byte range of a data request, checked against the extent.
fn extent_range(header: &ChunkRequest, op: Op) -> Result<(ExtentKey, u32, u64, u32), Rejection> {
    let key = extent_key(header, op)?;
    let (extent_bytes, offset, len) = (
        header.extent_bytes,
        header.offset_bytes,
        header.length_bytes,
    );
    if !extent_bytes_valid(extent_bytes) {
        return Err(Rejection::invalid(format!(
            "{key}: extent size {extent_bytes} bytes is not a power of two from 64 KiB to 64 MiB"
        )));
    }
    let sector = u64::from(SECTOR_BYTES);
    if offset % sector != 0 || u64::from(len) % sector != 0 {
        return Err(Rejection::invalid(format!(
            "{key}: {op:?} offset {offset} and length {len} must be multiples of {SECTOR_BYTES} bytes"
        )));
    }
    if len == 0 {
        return Err(Rejection::invalid(format!("{key}: {op:?} of zero bytes")));
    }
    if offset
        .checked_add(u64::from(len))
        .is_none_or(|end| end > u64::from(extent_bytes))
    {
        return Err(Rejection::invalid(format!(
            "{key}: {op:?} range {offset}+{len} runs past the end of the {extent_bytes}-byte extent"
        )));
    }
    Ok((key, extent_bytes, offset, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_proto::chunk::ExtentKey as WireKey;

    const EXTENT_BYTES: u32 = 4 << 20;

    fn request(op: Op, offset: u64, len: u32) -> ChunkRequest {
        ChunkRequest {
            request_id: 7,
            op: op as i32,
            extent: Some(WireKey {
                volume_id: 1,
                extent_index: 2,
                epoch: 3,
            }),
            extent_bytes: EXTENT_BYTES,
            offset_bytes: offset,
            length_bytes: len,
            ..Default::default()
        }
    }

    fn status_of(r: Result<Request, Rejection>) -> Status {
        r.expect_err("should be rejected").status
    }

    #[test]
    fn accepts_well_formed_requests() {
        let key = ExtentKey {
            volume_id: 1,
            extent_index: 2,
            epoch: 3,
        };
        assert_eq!(
            parse(&request(Op::Read, 512, 4096), 0, 1 << 20),
            Ok(Request::Read {
                key,
                below: Vec::new(),
                extent_bytes: EXTENT_BYTES,
                offset: 512,
                len: 4096
            })
        );
        assert_eq!(
            parse(
                &request(Op::Write, EXTENT_BYTES as u64 - 512, 512),
                512,
                1 << 20
            ),
            Ok(Request::Write {
                key,
                extent_bytes: EXTENT_BYTES,
                offset: EXTENT_BYTES as u64 - 512,
                len: 512,
                fua: false
            })
        );
        let mut zero = request(Op::WriteZeroes, 0, 8192);
        zero.no_hole = true;
        zero.fua = true;
        assert_eq!(
            parse(&zero, 0, 1 << 20),
            Ok(Request::WriteZeroes {
                key,
                extent_bytes: EXTENT_BYTES,
                offset: 0,
                len: 8192,
                fua: true,
                punch: false
            })
        );
        let flush = ChunkRequest {
            request_id: 1,
            op: Op::Flush as i32,
            ..Default::default()
        };
        assert_eq!(parse(&flush, 0, 1 << 20), Ok(Request::Flush));
    }

    #[test]
    fn list_limit_is_capped_and_defaults_to_a_full_page() {
        let mut list = ChunkRequest {
            request_id: 1,
            op: Op::ExtentList as i32,
            ..Default::default()
        };
        let limit_of = |r: &ChunkRequest| match parse(r, 0, 0) {
            Ok(Request::ExtentList { limit, .. }) => limit,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(limit_of(&list), EXTENT_LIST_PAGE_MAX as usize);
        list.list_limit = 3;
        assert_eq!(limit_of(&list), 3);
        list.list_limit = u32::MAX;
        assert_eq!(limit_of(&list), EXTENT_LIST_PAGE_MAX as usize);
    }

    #[test]
    fn rejects_bad_requests() {
        let mut r = request(Op::Read, 0, 4096);
        r.op = 99;
        assert_eq!(status_of(parse(&r, 0, 1 << 20)), Status::UnknownOp);
        r.op = 0;
        assert_eq!(status_of(parse(&r, 0, 1 << 20)), Status::UnknownOp);

        let mut r = request(Op::Read, 0, 4096);
        r.request_id = 0;
        assert_eq!(status_of(parse(&r, 0, 1 << 20)), Status::InvalidArgument);

        let cases = [
            ("unaligned offset", request(Op::Read, 100, 512), 0),
            ("unaligned length", request(Op::Trim, 0, 100), 0),
            ("zero length", request(Op::Read, 0, 0), 0),
            (
                "past the end",
                request(Op::Read, EXTENT_BYTES as u64, 512),
                0,
            ),
            ("offset overflow", request(Op::Read, u64::MAX - 511, 512), 0),
            ("over the read limit", request(Op::Read, 0, 2 << 20), 0),
            ("write length mismatch", request(Op::Write, 0, 4096), 512),
            ("data on a read", request(Op::Read, 0, 4096), 4096),
            (
                "no extent",
                ChunkRequest {
                    extent: None,
                    ..request(Op::ExtentStat, 0, 0)
                },
                0,
            ),
            (
                "bad extent size",
                ChunkRequest {
                    extent_bytes: 3 << 20,
                    ..request(Op::Read, 0, 512)
                },
                0,
            ),
            (
                "tiny extent size",
                ChunkRequest {
                    extent_bytes: 4096,
                    ..request(Op::Read, 0, 512)
                },
                0,
            ),
        ];
        for (what, r, data_bytes) in cases {
            let rejection = parse(&r, data_bytes, 1 << 20).expect_err(what);
            assert_eq!(
                rejection.status,
                Status::InvalidArgument,
                "{what}: {}",
                rejection.message
            );
        }
    }

    #[test]
    fn rejection_messages_name_the_extent() {
        let message = parse(&request(Op::Read, 100, 512), 0, 1 << 20)
            .expect_err("unaligned")
            .message;
        assert!(message.contains("volume 0x1 extent 2 epoch 3"), "{message}");
    }
}
