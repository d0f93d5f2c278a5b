//! cairn-chunkserver: stores volume extents on local disk through io_uring,
//! checks a CRC32 on every 4 KiB block, and serves them over the chunk RPC.
//!
//! - [`store`]: the extent store (layout, block checksum slots, io_uring engine).
//! - [`rpc`]: the TCP server and a client for the chunk RPC.
//! - [`datadir`]: the data directory's identity (cluster id, node id) and lock.
//! - [`config`]: TOML file and command-line flags.

pub mod collector;
pub mod config;
pub mod datadir;
pub mod registration;
pub mod replica;
pub mod rpc;
pub mod store;
