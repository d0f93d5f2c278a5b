//! The NBD wire format (doc/proto.md of NetworkBlockDevice/nbd): constants,
//! and parsers and encoders that do no I/O, so that the fuzzers and the unit
//! tests reach every decision about bytes without a socket.
//!
//! Only the fixed newstyle handshake is spoken (no oldstyle), with simple and
//! structured replies; extended headers are refused as unsupported.

use bytes::{BufMut, Bytes, BytesMut};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands and their flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// Errors.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// base:allocation flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context served.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// Its id in replies (any value; fixed so replies are easy to read).
pub const META_BASE_ALLOCATION_ID: u32 = 1;

/// The longest string the protocol allows (names, queries, messages).
pub const STRING_BYTES_MAX: usize = 4096;
/// Bytes of an option request header after IHAVEOPT: option and length.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Bytes of a request header.
pub const REQUEST_BYTES: usize = 28;

/// A request header, as received; nothing checked but the magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Why a request header was refused outright (the connection closes: after
/// bad magic nothing that follows can be framed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x} (expected {REQUEST_MAGIC:#010x})")]
pub struct BadMagic(pub u32);

/// Decodes a 28-byte request header.
pub fn parse_request(b: &[u8; REQUEST_BYTES]) -> Result<Request, BadMagic> {
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
    if magic != REQUEST_MAGIC {
        return Err(BadMagic(magic));
    }
    Ok(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().expect("2 bytes")),
        kind: u16::from_be_bytes(b[6..8].try_into().expect("2 bytes")),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
        len: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
    })
}

/// Encodes a request header (tests and fuzz seeds).
pub fn encode_request(r: &Request) -> [u8; REQUEST_BYTES] {
    let mut b = [0u8; REQUEST_BYTES];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.kind.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

/// The command's name, for log lines.
pub fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown command",
    }
}

/// The option's name, for log lines.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        _ => "unknown option",
    }
}

/// Why an option's data was refused (answered with `NBD_REP_ERR_INVALID` or
/// `NBD_REP_ERR_TOO_BIG`; the handshake goes on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooBig(String),
}

impl OptionError {
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionError::Invalid(_) => REP_ERR_INVALID,
            OptionError::TooBig(_) => REP_ERR_TOO_BIG,
        }
    }
}

/// A cursor over option data that refuses to read past its end.
struct Cursor<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], OptionError> {
        if self.b.len() < n {
            return Err(OptionError::Invalid(format!(
                "{}: {field} needs {n} bytes, {} left in the option data",
                self.what,
                self.b.len()
            )));
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }

    fn u16(&mut self, field: &str) -> Result<u16, OptionError> {
        Ok(u16::from_be_bytes(
            self.take(2, field)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self, field: &str) -> Result<u32, OptionError> {
        Ok(u32::from_be_bytes(
            self.take(4, field)?.try_into().expect("4 bytes"),
        ))
    }

    /// A string with a 32-bit length in front.
    fn string(&mut self, field: &str) -> Result<String, OptionError> {
        let len = self.u32(field)? as usize;
        if len > STRING_BYTES_MAX {
            return Err(OptionError::TooBig(format!(
                "{}: {field} of {len} bytes is longer than {STRING_BYTES_MAX}",
                self.what
            )));
        }
        let raw = self.take(len, field)?;
        utf8(raw, self.what, field)
    }

    fn rest_string(&mut self, field: &str) -> Result<String, OptionError> {
        let raw = std::mem::take(&mut self.b);
        if raw.len() > STRING_BYTES_MAX {
            return Err(OptionError::TooBig(format!(
                "{}: {field} of {} bytes is longer than {STRING_BYTES_MAX}",
                self.what,
                raw.len()
            )));
        }
        utf8(raw, self.what, field)
    }

    fn end(&self) -> Result<(), OptionError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(OptionError::Invalid(format!(
                "{}: {} bytes after the last field",
                self.what,
                self.b.len()
            )))
        }
    }
}

fn utf8(raw: &[u8], what: &str, field: &str) -> Result<String, OptionError> {
    String::from_utf8(raw.to_vec())
        .map_err(|_| OptionError::Invalid(format!("{what}: {field} is not UTF-8")))
}

/// `NBD_OPT_EXPORT_NAME`'s data: the whole of it is the name.
pub fn parse_export_name(data: &[u8]) -> Result<String, OptionError> {
    Cursor {
        b: data,
        what: "EXPORT_NAME",
    }
    .rest_string("export name")
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

pub fn parse_info(data: &[u8]) -> Result<InfoRequest, OptionError> {
    let mut c = Cursor {
        b: data,
        what: "INFO/GO",
    };
    let name = c.string("export name")?;
    let n = c.u16("information request count")?;
    let mut requests = Vec::with_capacity(n as usize);
    for _ in 0..n {
        requests.push(c.u16("information request")?);
    }
    c.end()?;
    Ok(InfoRequest { name, requests })
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// Most queries one meta context option may carry.
pub const META_QUERIES_MAX: u32 = 128;

pub fn parse_meta(data: &[u8]) -> Result<MetaRequest, OptionError> {
    let mut c = Cursor {
        b: data,
        what: "META_CONTEXT",
    };
    let export = c.string("export name")?;
    let n = c.u32("query count")?;
    if n > META_QUERIES_MAX {
        return Err(OptionError::TooBig(format!(
            "META_CONTEXT: {n} queries, at most {META_QUERIES_MAX} are taken"
        )));
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        queries.push(c.string("query")?);
    }
    c.end()?;
    Ok(MetaRequest { export, queries })
}

/// The contexts a query selects (`set`) or lists (`!set`): `base:allocation`
/// for itself, and for the `base:` wildcard when listing. Queries of other
/// namespaces are ignored, as the protocol requires.
pub fn meta_matches(query: &str, set: bool) -> bool {
    query == META_BASE_ALLOCATION || (!set && query == "base:")
}

/// One option reply: magic, option, type, length, data.
pub fn option_reply(opt: u32, reply_type: u32, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(20 + data.len());
    b.put_u64(OPT_REPLY_MAGIC);
    b.put_u32(opt);
    b.put_u32(reply_type);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    b.freeze()
}

/// An error reply with a message for the human (truncated to the protocol's
/// string limit).
pub fn option_error(opt: u32, reply_type: u32, message: &str) -> Bytes {
    option_reply(opt, reply_type, truncate(message).as_bytes())
}

/// `NBD_REP_SERVER`: a name and a description.
pub fn rep_server(name: &str, description: &str) -> Bytes {
    let mut d = BytesMut::new();
    d.put_u32(name.len() as u32);
    d.put_slice(name.as_bytes());
    d.put_slice(truncate(description).as_bytes());
    option_reply(OPT_LIST, REP_SERVER, &d)
}

pub fn info_export(opt: u32, size: u64, flags: u16) -> Bytes {
    let mut d = BytesMut::with_capacity(12);
    d.put_u16(INFO_EXPORT);
    d.put_u64(size);
    d.put_u16(flags);
    option_reply(opt, REP_INFO, &d)
}

pub fn info_block_size(opt: u32, min: u32, preferred: u32, max: u32) -> Bytes {
    let mut d = BytesMut::with_capacity(14);
    d.put_u16(INFO_BLOCK_SIZE);
    d.put_u32(min);
    d.put_u32(preferred);
    d.put_u32(max);
    option_reply(opt, REP_INFO, &d)
}

pub fn info_string(opt: u32, kind: u16, s: &str) -> Bytes {
    let mut d = BytesMut::new();
    d.put_u16(kind);
    d.put_slice(truncate(s).as_bytes());
    option_reply(opt, REP_INFO, &d)
}

pub fn rep_meta_context(opt: u32, id: u32, name: &str) -> Bytes {
    let mut d = BytesMut::new();
    d.put_u32(id);
    d.put_slice(name.as_bytes());
    option_reply(opt, REP_META_CONTEXT, &d)
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zeros unless the
/// client asked for none.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Bytes {
    let mut b = BytesMut::with_capacity(134);
    b.put_u64(size);
    b.put_u16(flags);
    if !no_zeroes {
        b.put_bytes(0, 124);
    }
    b.freeze()
}

/// A simple reply header (the data of a successful read follows it).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header for `payload_len` bytes of payload.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, payload_len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&payload_len.to_be_bytes());
    b
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a message.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Bytes {
    let m = truncate(message).as_bytes();
    let mut b = BytesMut::with_capacity(26 + m.len());
    b.put_slice(&chunk_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + m.len() as u32,
    ));
    b.put_u32(error);
    b.put_u16(m.len() as u16);
    b.put_slice(m);
    b.freeze()
}

/// A final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one context.
pub fn block_status_chunk(cookie: u64, context: u32, descriptors: &[(u32, u32)]) -> Bytes {
    let len = 4 + 8 * descriptors.len();
    let mut b = BytesMut::with_capacity(20 + len);
    b.put_slice(&chunk_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        len as u32,
    ));
    b.put_u32(context);
    for &(length, flags) in descriptors {
        b.put_u32(length);
        b.put_u32(flags);
    }
    b.freeze()
}

/// `s`, cut to the protocol's string limit at a character boundary.
pub fn truncate(s: &str) -> &str {
    if s.len() <= STRING_BYTES_MAX {
        return s;
    }
    let mut end = STRING_BYTES_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn requests_round_trip_and_bad_magic_is_refused() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0xdead_beef_0102_0304,
            offset: 1 << 40,
            len: 4096,
        };
        let b = encode_request(&r);
        assert_eq!(parse_request(&b), Ok(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(
            parse_request(&bad),
            Err(BadMagic(REQUEST_MAGIC ^ (1 << 24)))
        );
    }

    #[test]
    fn info_requests_parse_and_short_or_long_data_is_invalid() {
        let d = info_data("vol", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            parse_info(&d),
            Ok(InfoRequest {
                name: "vol".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
        assert!(matches!(
            parse_info(&d[..d.len() - 1]),
            Err(OptionError::Invalid(_))
        ));
        let mut long = d.clone();
        long.push(0);
        assert!(matches!(parse_info(&long), Err(OptionError::Invalid(_))));
        // A name length past the data.
        let mut lying = d;
        lying[3] = 200;
        assert!(matches!(parse_info(&lying), Err(OptionError::Invalid(_))));
        // A name longer than the protocol's limit.
        let mut huge = Vec::new();
        huge.extend_from_slice(&(5000u32).to_be_bytes());
        huge.extend_from_slice(&[b'a'; 5000]);
        huge.extend_from_slice(&[0, 0]);
        assert!(matches!(parse_info(&huge), Err(OptionError::TooBig(_))));
        assert!(matches!(
            parse_info(&info_data("\u{0}\u{ff}", &[])).map(|r| r.name.len()),
            Ok(3)
        ));
        let mut not_utf8 = info_data("ab", &[]);
        not_utf8[4] = 0xff;
        assert!(matches!(
            parse_info(&not_utf8),
            Err(OptionError::Invalid(_))
        ));
    }

    #[test]
    fn meta_queries_parse_and_match() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let m = parse_meta(&d).unwrap();
        assert_eq!(m.export, "vol");
        assert_eq!(m.queries.len(), 2);
        assert!(meta_matches(&m.queries[0], true));
        assert!(!meta_matches(&m.queries[1], true));
        assert!(meta_matches("base:", false));
        assert!(!meta_matches("base:", true));
        let mut many = Vec::new();
        many.extend_from_slice(&0u32.to_be_bytes());
        many.extend_from_slice(&(META_QUERIES_MAX + 1).to_be_bytes());
        assert!(matches!(parse_meta(&many), Err(OptionError::TooBig(_))));
    }

    #[test]
    fn replies_have_the_documented_layout() {
        let r = info_export(OPT_GO, 1 << 30, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH);
        assert_eq!(r.len(), 20 + 12);
        assert_eq!(&r[0..8], &OPT_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[16..20], &12u32.to_be_bytes());
        let b = info_block_size(OPT_GO, 512, 4096, 32 << 20);
        assert_eq!(b.len(), 20 + 14);
        assert_eq!(export_name_reply(7, 1, false).len(), 134);
        assert_eq!(export_name_reply(7, 1, true).len(), 10);
        let e = error_chunk(9, EINVAL, &"x".repeat(10_000));
        assert_eq!(e.len(), 20 + 6 + STRING_BYTES_MAX);
        let s = block_status_chunk(9, 1, &[(4096, STATE_HOLE), (512, 0)]);
        assert_eq!(s.len(), 20 + 4 + 16);
        assert_eq!(truncate(&"é".repeat(3000)).len(), 4096);
    }
}
