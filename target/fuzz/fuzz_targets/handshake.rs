//! A whole NBD session from the client's first byte: client flags, options
//! (the handshake against two memory exports), then, once GO or EXPORT_NAME
//! picks an export, the request stream. Every server reply is checked
//! against the protocol (see common/mod.rs).
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::session(data));
