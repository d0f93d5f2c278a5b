//! The volume client's errors. Every one names the volume and, where known,
//! the operation (offset, extent), the group and the chunk server.

use std::time::Duration;

use cairn_group::GroupKey;
use cairn_proto::chunk::Status;

/// Why a volume operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The caller's request is wrong (unaligned, outside the volume, bad
    /// volume record); retrying cannot help.
    #[error("volume {volume}: invalid request at offset {offset}, length {len}: {reason}")]
    InvalidArgument {
        volume: String,
        offset: u64,
        len: u64,
        reason: String,
    },
    /// Writes kept being refused because fewer replicas act in the group than
    /// the volume's `min_replicas`, until the I/O timeout.
    #[error(
        "volume {volume}: {op} in {group}: only {acting} replica(s) acting, {min} required; \
         gave up after {waited:?}"
    )]
    Degraded {
        volume: String,
        op: String,
        group: GroupKey,
        acting: u32,
        min: u32,
        waited: Duration,
    },
    /// The primary reported a disk error, several times in a row.
    #[error("volume {volume}: {op} in {group} failed at chunk server {node}: {message}")]
    Io {
        volume: String,
        op: String,
        group: GroupKey,
        node: String,
        message: String,
    },
    /// The operation could not be done before the I/O timeout (no primary,
    /// node unreachable, refusals); `last` is the last obstacle.
    #[error("volume {volume}: {op}{} gave up after {waited:?}: {last}", in_group(.group))]
    TimedOut {
        volume: String,
        op: String,
        group: Option<GroupKey>,
        waited: Duration,
        last: String,
    },
    /// The chunk server answered with a status that no retry can change (for
    /// example `UnknownOp` from a server that does not serve groups).
    #[error(
        "volume {volume}: {op} in {group}: chunk server {node} answered {status:?}: {message}"
    )]
    Server {
        volume: String,
        op: String,
        group: GroupKey,
        node: String,
        status: Status,
        message: String,
    },
    /// The chunk server's reply makes no sense (a bug on one side).
    #[error("volume {volume}: {op} in {group}: chunk server {node} sent a bad reply: {reason}")]
    Protocol {
        volume: String,
        op: String,
        group: GroupKey,
        node: String,
        reason: String,
    },
    /// The volume manager refused or could not be reached.
    #[error("volume manager: {context}: {source}")]
    Volmgr {
        context: String,
        #[source]
        source: cairn_volmgr::client::ClientError,
    },
    /// The cluster has no usable map, or the client was built without a
    /// volume manager and asked for something only it knows.
    #[error("{0}")]
    Unavailable(String),
}

fn in_group(group: &Option<GroupKey>) -> String {
    group.map(|g| format!(" in {g}")).unwrap_or_default()
}

impl ClientError {
    /// The caller's fault (EINVAL for a block device front end) rather than
    /// the cluster's (EIO).
    pub fn is_invalid_argument(&self) -> bool {
        matches!(self, ClientError::InvalidArgument { .. })
    }
}
