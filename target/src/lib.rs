//! cairn-target: the front end that exports Cairn volumes to hypervisors and
//! tools. NBD now (issue 6); iSCSI joins it (issue 9) over the same
//! [`exports`].
//!
//! - [`nbd`]: the protocol, over any byte stream, reaching volumes through
//!   the `Catalog` and `Backend` traits ([`nbd::wire`] is the byte format,
//!   [`nbd::handshake`] the option haggling, [`nbd::transmit`] the request
//!   loop).
//! - [`exports`]: those traits backed by the volume client library: one
//!   shared `Volume` per export, export leases at the volume manager, block
//!   status from the chunk servers' extent lists.
//! - [`server`]: TCP and unix listeners, connection limits, shutdown.
//! - [`config`]: flags and the TOML file.

pub mod backend;
pub mod config;
pub mod exports;
pub mod iscsi;
pub mod nbd;
pub mod server;
