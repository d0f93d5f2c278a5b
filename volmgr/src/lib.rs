//! cairn-volmgr: the raft-replicated cluster map and volume catalogue.
//!
//! Pure cores (no I/O, no clock, no threads), driven by the node loop and,
//! later, the simulator:
//!
//! - [`state`]: the replicated state machine: cluster map (chunk servers,
//!   failure domains, up/down, in/out, incarnations, the groups' acting
//!   sets, map epoch) and volume catalogue (snapshots, rollback, clones
//!   and the epochs behind them);
//!   `apply` for raft's apply loop, snapshots, request deduplication.
//! - [`detector`]: the failure detector the leader runs over chunk server
//!   heartbeats; it proposes down, up and out.
//!
//! Around them:
//!
//! - [`node`]: the raft node loop (raft-rs `RawNode`, Ready/advance), generic
//!   over the durable log and the state machine.
//! - [`slog_tracing`]: raft-rs's slog records into `tracing`.

pub mod api;
pub mod client;
pub mod config;
pub mod detector;
pub mod node;
pub mod raftlog;
pub mod server;
pub mod slog_tracing;
pub mod state;
pub mod transport;

#[cfg(test)]
pub(crate) mod testing;
