//! cairn-volmgr: the raft-replicated cluster map and volume catalogue.
//!
//! - [`node`]: the raft node loop (raft-rs `RawNode`, Ready/advance), generic
//!   over the durable log and the state machine.
//! - [`slog_tracing`]: raft-rs's slog records into `tracing`.

pub mod config;
pub mod node;
pub mod server;
pub mod slog_tracing;
pub mod transport;

#[cfg(test)]
pub(crate) mod testing;
