//! Cairn's wire format, shared by every process.
//!
//! A frame is a fixed 12-byte prefix, a prost-encoded header and raw data bytes:
//!
//! ```text
//! | magic u32 LE | header_bytes u32 LE | data_bytes u32 LE | header (prost) | data (raw) |
//! ```
//!
//! Block data never passes through a protobuf field: the reader reads it straight
//! from the socket into the buffer the store will hand to the kernel (see
//! [`frame`]). Every length is checked against a named limit before anything is
//! allocated.

pub mod chunk;
pub mod frame;
pub mod frame_io;
pub mod group;
pub mod groupmap;
pub mod map;
pub mod volmgr;

pub use frame::{FrameError, FramePrefix};
