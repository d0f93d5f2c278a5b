//! The chunk RPC over TCP: [`serve`] answers [`ChunkRequest`]s from a
//! [`Store`](crate::store::Store); [`ChunkClient`] sends them.
//!
//! Wire format: frames of a 12-byte prefix, a prost header and raw data bytes
//! (see `cairn_proto`). Both sides pipeline: a connection carries many
//! requests at once and replies come back in completion order, matched by
//! request id. Request ids start at 1; a reply with id 0 means the server could
//! not decode a request header and is about to close the connection.
//!
//! - [`server`]: accept loop, one reader and one writer per connection, one
//!   task per request.
//! - [`client`]: a pipelined client with a reader task routing replies.
//! - `request`: checks a decoded header and turns it into a typed request.
//! - `frame_io` (from cairn-proto): reading and writing frames on a stream.
//!
//! [`ChunkRequest`]: cairn_proto::chunk::ChunkRequest

/// The client moved to `cairn-client`; re-exported for the chunk server's
/// own tests and tools.
pub use cairn_client::chunk as client;
use cairn_proto::frame_io;
mod request;
pub mod server;

pub use client::{ChunkClient, ChunkError, ExtentListPage, CLIENT_REQUESTS_IN_FLIGHT_MAX};
pub use server::{serve, ServerConfig};

use cairn_proto::chunk::ExtentKey as WireExtentKey;

use crate::store::ExtentKey;

impl From<WireExtentKey> for ExtentKey {
    fn from(k: WireExtentKey) -> Self {
        ExtentKey {
            volume_id: k.volume_id,
            extent_index: k.extent_index,
            epoch: k.epoch,
        }
    }
}

impl From<ExtentKey> for WireExtentKey {
    fn from(k: ExtentKey) -> Self {
        WireExtentKey {
            volume_id: k.volume_id,
            extent_index: k.extent_index,
            epoch: k.epoch,
        }
    }
}

#[cfg(test)]
mod tests;
