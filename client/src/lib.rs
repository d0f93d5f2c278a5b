//! cairn-client: how every Cairn process that is not a chunk server reaches
//! the data.
//!
//! - [`chunk`]: a pipelined client for one chunk server's RPC.
//! - `volume` (issue 5): the volume client library, which splits byte ranges
//!   into extents, routes each piece to its group's primary, and retries
//!   across map changes and failover.

pub mod chunk;
