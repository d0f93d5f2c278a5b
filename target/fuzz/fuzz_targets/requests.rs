//! The transmission phase alone. Byte 0 picks the negotiated state:
//! bit 0 structured replies, bit 1 base:allocation (only with bit 0),
//! bit 2 read-only export, bit 3 export size not a multiple of 512,
//! bits 4-7 an injected EIO (n: at offset n * 64 KiB - 512). The rest is the
//! request stream (headers and WRITE payloads). Every reply is checked
//! against the protocol (see common/mod.rs).
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::requests(data));
