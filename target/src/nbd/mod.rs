//! The NBD server: [`wire`] (bytes, no I/O), [`handshake`] (fixed newstyle
//! option haggling) and [`transmit`] (the request loop). Both protocol halves
//! run over any byte stream and reach volumes only through the
//! [`crate::backend`] traits, so the fuzzers and unit tests drive them in
//! memory ([`memory`]) while `cairn-target` plugs in the cluster
//! ([`crate::exports`]).

pub mod handshake;
pub mod memory;
pub mod transmit;
pub mod wire;

/// Size constraints every export advertises (`NBD_INFO_BLOCK_SIZE`). The
/// volume client addresses 512-byte sectors; 4 KiB is the store's checksum
/// block, below which a write costs a read-modify-write.
pub const BLOCK_MIN: u32 = 512;
pub const BLOCK_PREFERRED: u32 = 4096;
/// The largest READ or WRITE payload taken (2^25, the size every client
/// must be able to use).
pub const PAYLOAD_MAX: u32 = 32 << 20;

pub use crate::backend::{Backend, Catalog, ExportInfo, Extents, IoError};

/// The transmission flags: exactly the features `info` serves.
/// `structured`: structured replies were negotiated (needed for DF).
pub fn transmission_flags(info: &ExportInfo, structured: bool) -> u16 {
    use wire::*;
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;
    if info.read_only {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    f
}

#[cfg(test)]
mod tests;
