//! cairn-client: how every Cairn process that is not a chunk server reaches
//! the data.
//!
//! - [`chunk`]: a pipelined client for one chunk server's RPC.
//! - [`Cluster`] and [`Volume`]: the volume client library. A [`Cluster`]
//!   (one per process) holds the client id, request ids, the cluster map
//!   (kept current by a long poll at the volume manager) and connections; a
//!   [`Volume`] splits byte ranges into extents, routes each piece to its
//!   group's primary, and retries across refusals, map changes and failover
//!   with the piece's request id, so the primary applies it once.

mod allocation;
pub mod chunk;
mod cluster;
mod diff;
mod error;
mod fold;
mod ids;
mod pool;
mod retry;
mod scrub;
mod space;
mod split;
mod volume;

pub use allocation::{Allocation, ALLOCATION_EXTENTS_MAX};
pub use cluster::{ClientConfig, Cluster};
pub use diff::{changed_ranges, Changed};
pub use error::ClientError;
pub use fold::{fold, held_runs, Folded};
pub use retry::IO_RETRIES;
pub use scrub::{ScrubPiece, SCRUB_PIECE_BYTES};
pub use space::{space, Space};
pub use split::SECTOR_BYTES;
pub use volume::Volume;
