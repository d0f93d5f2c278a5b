//! Shared harness for the NBD fuzz targets: one tokio runtime per process,
//! the in-memory exports, a writer that keeps what the server sends, and
//! two oracles that check the server's output against the protocol
//! (doc/proto.md of NetworkBlockDevice/nbd) for whatever the client sent.
//!
//! The oracles only assert what the protocol (or the export's own limits)
//! requires, so every panic they raise is a server bug, not a harness quirk.
//! Each assertion message starts with "oracle:" to tell them from panics in
//! the server itself.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use cairn_target::nbd::handshake::{negotiate, HandshakeError, Negotiated, Outcome};
use cairn_target::nbd::memory::{MemCatalog, MemExport};
use cairn_target::nbd::transmit::{serve, Counters, End, Limits};
use cairn_target::nbd::wire::*;
use cairn_target::nbd::{Backend, ExportInfo, PAYLOAD_MAX};
use tokio::io::AsyncWrite;
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// Size of the read-write export ("vol", the default export).
pub const VOL_BYTES: u64 = 1 << 20;
/// Size of the read-only export ("ro").
pub const RO_BYTES: u64 = 64 << 10;

/// Small limits so that the semaphores and the back pressure are exercised.
pub const LIMITS: Limits = Limits {
    requests_max: 8,
    buffer_bytes: PAYLOAD_MAX,
};

/// The runtime every iteration runs on: one thread, like the harness.
pub fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// A fresh catalog for each iteration (no state leaks between inputs, so
/// every crash replays from its input alone).
pub fn catalog() -> MemCatalog {
    MemCatalog {
        exports: vec![
            MemExport::new("vol", VOL_BYTES, false),
            MemExport::new("ro", RO_BYTES, true),
        ],
    }
}

/// A writer that keeps everything written to it (the server's replies).
#[derive(Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl Capture {
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl AsyncWrite for Capture {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.0.lock().unwrap().extend_from_slice(b);
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Runs the transmission phase on `input` and checks every reply.
pub async fn transmit(input: &[u8], negotiated: Negotiated<MemExport>) {
    let structured = negotiated.structured;
    let allocation = negotiated.allocation;
    let info = negotiated.export.info().clone();
    let out = Capture::default();
    // The sender must outlive serve: `server::stopped` also returns when
    // the sender is dropped, and serve would end at once as a shutdown.
    let (_stop, stop_rx) = watch::channel(false);
    let end = serve(
        input,
        out.clone(),
        negotiated,
        LIMITS,
        stop_rx,
        Arc::new(Counters::default()),
    )
    .await;
    check_transmission(input, &out.take(), end, structured, allocation, &info);
}

/// A whole session: the handshake from the client's first byte, then (on
/// GO or EXPORT_NAME) transmission on the bytes after the handshake.
pub fn session(input: &[u8]) {
    runtime().block_on(async {
        let cat = catalog();
        let mut io = tokio::io::join(input, Vec::<u8>::new());
        let result = negotiate(&mut io, &cat).await;
        let (rest, out) = io.into_inner();
        let consumed = &input[..input.len() - rest.len()];
        check_handshake(consumed, &out, &result, &cat);
        if let Ok(Outcome::Go(n)) = result {
            transmit(rest, n).await;
        }
    })
}

// ---------------------------------------------------------------------------
// Byte cursor

struct Cur<'a> {
    b: &'a [u8],
}

impl<'a> Cur<'a> {
    fn left(&self) -> usize {
        self.b.len()
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes(b.try_into().unwrap()))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_be_bytes(b.try_into().unwrap()))
    }
}

fn need<T>(v: Option<T>, what: &str) -> T {
    v.unwrap_or_else(|| panic!("oracle: server output ends inside {what}"))
}

// ---------------------------------------------------------------------------
// Handshake oracle

fn outcome_name(r: &Result<Outcome<MemExport>, HandshakeError>) -> String {
    match r {
        Ok(Outcome::Go(n)) => format!("Go({:?})", n.export.info().name),
        Ok(Outcome::Ended) => "Ended".into(),
        Err(e) => format!("Err({e})"),
    }
}

fn is_protocol_err(r: &Result<Outcome<MemExport>, HandshakeError>) -> bool {
    matches!(r, Err(HandshakeError::Protocol(_)))
}

fn is_eof_err(r: &Result<Outcome<MemExport>, HandshakeError>) -> bool {
    matches!(r, Err(HandshakeError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof)
}

/// One option reply as sent.
struct OptReply<'a> {
    kind: u32,
    data: &'a [u8],
}

/// Reads option replies to `opt` up to and including the final one (ACK or
/// an error), checking each one's framing and contents.
fn option_replies<'a>(o: &mut Cur<'a>, opt: u32, names: &[&str]) -> Vec<OptReply<'a>> {
    let mut replies = Vec::new();
    loop {
        let magic = need(o.u64(), "an option reply header");
        assert_eq!(magic, OPT_REPLY_MAGIC, "oracle: option reply magic");
        let ropt = need(o.u32(), "an option reply header");
        assert_eq!(ropt, opt, "oracle: option reply for option {ropt}, {opt} was asked");
        let kind = need(o.u32(), "an option reply header");
        let len = need(o.u32(), "an option reply header") as usize;
        let data = need(o.take(len), "an option reply's data");
        let last = kind == REP_ACK || kind & (1 << 31) != 0;
        match kind {
            REP_ACK => assert!(data.is_empty(), "oracle: ACK with {len} bytes of data"),
            REP_SERVER => {
                assert_eq!(opt, OPT_LIST, "oracle: REP_SERVER to option {opt}");
                assert!(len >= 4, "oracle: REP_SERVER of {len} bytes");
                let n = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                assert!(n <= len - 4, "oracle: REP_SERVER name length {n} past its data");
                let name = std::str::from_utf8(&data[4..4 + n]).expect("oracle: name not UTF-8");
                assert!(names.contains(&name), "oracle: LIST named unknown export {name:?}");
            }
            REP_INFO => {
                assert!(
                    opt == OPT_INFO || opt == OPT_GO,
                    "oracle: REP_INFO to option {opt}"
                );
                assert!(len >= 2, "oracle: REP_INFO of {len} bytes");
                let t = u16::from_be_bytes([data[0], data[1]]);
                match t {
                    INFO_EXPORT => assert_eq!(len, 12, "oracle: INFO_EXPORT length"),
                    INFO_BLOCK_SIZE => {
                        assert_eq!(len, 14, "oracle: INFO_BLOCK_SIZE length");
                        let v = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap());
                        let (min, pref, max) = (v(2), v(6), v(10));
                        assert!(
                            min.is_power_of_two() && min <= 64 << 10,
                            "oracle: minimum block size {min}"
                        );
                        assert!(
                            pref.is_power_of_two() && pref >= min.max(512),
                            "oracle: preferred block size {pref}"
                        );
                        assert!(
                            max >= min && max % min == 0,
                            "oracle: maximum payload {max} (minimum {min})"
                        );
                    }
                    INFO_NAME | INFO_DESCRIPTION => {
                        assert!(len - 2 <= STRING_BYTES_MAX, "oracle: info string of {len}");
                        std::str::from_utf8(&data[2..]).expect("oracle: info string not UTF-8");
                    }
                    other => panic!("oracle: unknown info type {other}"),
                }
            }
            REP_META_CONTEXT => {
                assert!(
                    opt == OPT_LIST_META_CONTEXT || opt == OPT_SET_META_CONTEXT,
                    "oracle: REP_META_CONTEXT to option {opt}"
                );
                assert!(len >= 4, "oracle: REP_META_CONTEXT of {len} bytes");
                assert_eq!(
                    &data[4..],
                    META_BASE_ALLOCATION.as_bytes(),
                    "oracle: unknown meta context"
                );
            }
            k if k & (1 << 31) != 0 => {
                assert!(
                    [
                        REP_ERR_UNSUP,
                        REP_ERR_POLICY,
                        REP_ERR_INVALID,
                        REP_ERR_UNKNOWN,
                        REP_ERR_SHUTDOWN,
                        REP_ERR_TOO_BIG
                    ]
                    .contains(&k),
                    "oracle: unexpected error reply {k:#x}"
                );
                assert!(len <= STRING_BYTES_MAX, "oracle: error message of {len} bytes");
                std::str::from_utf8(data).expect("oracle: error message not UTF-8");
            }
            other => panic!("oracle: unknown option reply type {other:#x}"),
        }
        replies.push(OptReply { kind, data });
        if last {
            return replies;
        }
    }
}

/// Checks the server's handshake output (`out`) and outcome against the
/// client bytes the server consumed.
pub fn check_handshake(
    consumed: &[u8],
    out: &[u8],
    result: &Result<Outcome<MemExport>, HandshakeError>,
    cat: &MemCatalog,
) {
    let names: Vec<&str> = cat.exports.iter().map(|e| e.info().name.as_str()).collect();
    let what = outcome_name(result);
    let mut o = Cur { b: out };
    let g = need(o.take(18), "the greeting");
    assert_eq!(&g[0..8], &NBDMAGIC.to_be_bytes(), "oracle: greeting");
    assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes(), "oracle: greeting");
    let server_flags = u16::from_be_bytes([g[16], g[17]]);
    assert!(server_flags & FLAG_FIXED_NEWSTYLE != 0, "oracle: not fixed newstyle");

    let mut c = Cur { b: consumed };
    let Some(flags) = c.u32() else {
        assert!(matches!(result, Ok(Outcome::Ended)), "oracle: {what} on a short greeting");
        assert_eq!(o.left(), 0, "oracle: replies to no option");
        return;
    };
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        assert!(is_protocol_err(result), "oracle: {what} with client flags {flags:#x}");
        assert_eq!(c.left(), 0, "oracle: read on after bad client flags");
        assert_eq!(o.left(), 0, "oracle: replies after bad client flags");
        return;
    }
    let no_zeroes = flags & FLAG_C_NO_ZEROES != 0 && server_flags & FLAG_NO_ZEROES != 0;

    let mut structured = false;
    // Whether the last SET_META_CONTEXT selected a context.
    let mut meta_selected = false;
    // How the option loop ended, from the client's bytes.
    let mut chose: Option<u32> = None;
    let mut options = 0u32;
    loop {
        if c.left() == 0 {
            // Clean end between options, or the server stopped reading
            // after the option that ended the handshake.
            if chose.is_none() && options < cairn_target::nbd::handshake::OPTIONS_MAX {
                assert!(
                    matches!(result, Ok(Outcome::Ended)),
                    "oracle: {what} at the end of input between options"
                );
            }
            break;
        }
        assert!(chose.is_none(), "oracle: server read past the option that ended the handshake");
        if options == cairn_target::nbd::handshake::OPTIONS_MAX {
            panic!("oracle: server read more than OPTIONS_MAX options");
        }
        if c.left() < 16 {
            c.take(c.left());
            assert!(
                matches!(result, Ok(Outcome::Ended)),
                "oracle: {what} in a truncated option header"
            );
            break;
        }
        options += 1;
        let magic = c.u64().unwrap();
        let opt = c.u32().unwrap();
        let len = c.u32().unwrap();
        if magic != IHAVEOPT {
            assert!(is_protocol_err(result), "oracle: {what} after bad option magic");
            assert_eq!(c.left(), 0, "oracle: read on after bad option magic");
            break;
        }
        if len > cairn_target::nbd::handshake::OPTION_DATA_MAX {
            if opt == OPT_EXPORT_NAME {
                assert!(is_protocol_err(result), "oracle: {what} on a huge EXPORT_NAME");
                assert_eq!(c.left(), 0, "oracle: read on after a huge EXPORT_NAME");
                break;
            }
            if c.left() < len as usize {
                assert!(is_eof_err(result), "oracle: {what} inside a skipped option");
                break;
            }
            c.take(len as usize);
            let r = option_replies(&mut o, opt, &names);
            assert!(
                r.len() == 1 && r[0].kind == REP_ERR_TOO_BIG,
                "oracle: an option of {len} bytes was not refused as too big"
            );
            continue;
        }
        let Some(data) = c.take(len as usize) else {
            assert!(is_eof_err(result), "oracle: {what} inside an option's data");
            c.take(c.left());
            break;
        };
        if opt == OPT_EXPORT_NAME {
            match result {
                Ok(Outcome::Go(n)) => {
                    let info = n.export.info();
                    let name = std::str::from_utf8(data).expect("oracle: EXPORT_NAME not UTF-8");
                    assert!(
                        name == info.name || (name.is_empty() && info.name == names[0]),
                        "oracle: EXPORT_NAME {name:?} opened {:?}",
                        info.name
                    );
                    let size = need(o.u64(), "the EXPORT_NAME reply");
                    let tflags = need(o.u16(), "the EXPORT_NAME reply");
                    assert_eq!(size, info.size, "oracle: EXPORT_NAME size");
                    check_transmission_flags(tflags, info, structured);
                    if !no_zeroes {
                        let z = need(o.take(124), "the EXPORT_NAME reply's zeroes");
                        assert!(z.iter().all(|&b| b == 0), "oracle: EXPORT_NAME padding");
                    }
                }
                Err(HandshakeError::Protocol(_)) => {
                    let name = std::str::from_utf8(data).unwrap_or("\u{0}");
                    assert!(
                        !(name.is_empty() || names.contains(&name)),
                        "oracle: EXPORT_NAME of an existing export failed"
                    );
                }
                _ => panic!("oracle: {what} after EXPORT_NAME"),
            }
            chose = Some(opt);
            continue;
        }
        let replies = option_replies(&mut o, opt, &names);
        let fin = replies.last().unwrap().kind;
        match opt {
            OPT_ABORT => {
                assert_eq!(fin, REP_ACK, "oracle: ABORT not acknowledged");
                assert!(matches!(result, Ok(Outcome::Ended)), "oracle: {what} after ABORT");
                chose = Some(opt);
            }
            OPT_STRUCTURED_REPLY => {
                if fin == REP_ACK {
                    assert!(!structured, "oracle: STRUCTURED_REPLY acknowledged twice");
                    assert!(data.is_empty(), "oracle: STRUCTURED_REPLY with data acknowledged");
                    structured = true;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if fin == REP_ACK {
                    assert!(structured, "oracle: META_CONTEXT acknowledged before structured");
                }
                if opt == OPT_SET_META_CONTEXT {
                    meta_selected = fin == REP_ACK && replies.iter().any(|r| r.kind == REP_META_CONTEXT);
                    if meta_selected {
                        let m = replies.iter().find(|r| r.kind == REP_META_CONTEXT).unwrap();
                        let id = u32::from_be_bytes(m.data[0..4].try_into().unwrap());
                        assert_ne!(id, 0, "oracle: SET_META_CONTEXT gave id 0");
                    }
                }
            }
            OPT_INFO | OPT_GO => {
                if fin == REP_ACK {
                    let exp = replies
                        .iter()
                        .find(|r| r.kind == REP_INFO && r.data[0..2] == INFO_EXPORT.to_be_bytes())
                        .expect("oracle: INFO/GO acknowledged without INFO_EXPORT");
                    assert!(
                        replies.iter().any(|r| r.kind == REP_INFO
                            && r.data[0..2] == INFO_BLOCK_SIZE.to_be_bytes()),
                        "oracle: no INFO_BLOCK_SIZE although the server enforces constraints"
                    );
                    let size = u64::from_be_bytes(exp.data[2..10].try_into().unwrap());
                    let tflags = u16::from_be_bytes(exp.data[10..12].try_into().unwrap());
                    let e = cat
                        .exports
                        .iter()
                        .find(|e| e.info().size == size)
                        .expect("oracle: INFO_EXPORT of an unknown size");
                    check_transmission_flags(tflags, e.info(), structured);
                    if opt == OPT_GO {
                        match result {
                            Ok(Outcome::Go(n)) => {
                                assert_eq!(n.export.info().size, size, "oracle: GO opened another export")
                            }
                            _ => panic!("oracle: {what} after a GO acknowledged"),
                        }
                        chose = Some(opt);
                    }
                }
            }
            _ => {}
        }
    }
    assert_eq!(o.left(), 0, "oracle: {} bytes of output answer no option", o.left());
    if trace() {
        eprintln!("handshake: {options} options, {what}, structured {structured}");
    }
    match result {
        Ok(Outcome::Go(n)) => {
            assert!(
                matches!(chose, Some(OPT_GO) | Some(OPT_EXPORT_NAME)),
                "oracle: Go without GO or EXPORT_NAME"
            );
            assert_eq!(n.structured, structured, "oracle: structured replies disagree");
            if n.allocation {
                assert!(meta_selected && structured, "oracle: allocation without a context");
            }
        }
        Ok(Outcome::Ended) => {}
        Err(_) => assert!(
            chose.is_none() || chose == Some(OPT_EXPORT_NAME),
            "oracle: {what} after a successful option"
        ),
    }
}

fn check_transmission_flags(f: u16, info: &ExportInfo, structured: bool) {
    assert!(f & FLAG_HAS_FLAGS != 0, "oracle: transmission flags without HAS_FLAGS");
    assert_eq!(f & FLAG_READ_ONLY != 0, info.read_only, "oracle: READ_ONLY flag");
    if f & FLAG_SEND_DF != 0 {
        assert!(structured, "oracle: DF advertised without structured replies");
    }
}

// ---------------------------------------------------------------------------
// Transmission oracle

/// The requests the server will read from `input`, the payloads of its
/// complete WRITEs (offset, data), and how the loop ends.
pub fn frame_requests(input: &[u8]) -> (Vec<Request>, Vec<(u64, &[u8])>, End) {
    let mut c = Cur { b: input };
    let mut reqs = Vec::new();
    let mut writes = Vec::new();
    let end = loop {
        if c.left() == 0 {
            break End::Closed;
        }
        let Some(h) = c.take(REQUEST_BYTES) else {
            break End::Dropped;
        };
        let Ok(r) = parse_request(h.try_into().unwrap()) else {
            break End::Dropped;
        };
        if r.kind == CMD_DISC {
            break End::Disconnect;
        }
        if r.kind == CMD_WRITE {
            let Some(payload) = c.take(r.len as usize) else {
                break End::Dropped;
            };
            writes.push((r.offset, payload));
        }
        reqs.push(r);
    };
    (reqs, writes, end)
}

/// READ data must be what some WRITE put there, or zeros: each byte read
/// is 0 or, where exactly one WRITE of the session covers it, that WRITE's
/// byte (where several do, any byte goes: requests in flight run in no
/// order the protocol fixes). Catches data written to or read from the
/// wrong place, or a payload mixed up with another request's.
fn check_contents(size: u64, writes: &[(u64, &[u8])], reads: &[(u64, &[u8])]) {
    if reads.iter().all(|r| r.1.is_empty()) {
        return;
    }
    let size = size as usize;
    let mut byte = vec![0u8; size];
    // Writers per byte, saturating at 2 ("several").
    let mut writers = vec![0u8; size];
    for &(off, data) in writes {
        let off = off as usize;
        if off.checked_add(data.len()).is_none_or(|e| e > size) {
            continue; // refused
        }
        byte[off..off + data.len()].copy_from_slice(data);
        for w in &mut writers[off..off + data.len()] {
            *w = (*w + 1).min(2);
        }
    }
    for &(off, data) in reads {
        let off = off as usize;
        for (i, &b) in data.iter().enumerate() {
            let p = off + i;
            let ok = b == 0 || writers[p] == 2 || (writers[p] == 1 && byte[p] == b);
            assert!(
                ok,
                "oracle: READ at {off} returned {b:#04x} at offset {p}, where {}",
                match writers[p] {
                    0 => "nothing was written".to_string(),
                    _ => format!("the one WRITE put {:#04x}", byte[p]),
                }
            );
        }
    }
}

const ERRNOS: [u32; 8] = [EPERM, EIO, 12, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN];

/// One reply as received.
enum Reply<'a> {
    /// A simple reply; `data` only for a successful READ.
    Simple { error: u32, data: Option<&'a [u8]> },
    /// One structured chunk (the server sends one chunk per reply).
    Chunk { kind: u16, payload: &'a [u8] },
}

/// Whether `reply` is a valid answer to `req`; Err says why not.
fn verdict(
    req: &Request,
    reply: &Reply,
    structured: bool,
    allocation: bool,
    info: &ExportInfo,
) -> Result<(), String> {
    let name = command_name(req.kind);
    let in_bounds = req.offset.checked_add(req.len as u64).is_some_and(|e| e <= info.size);
    let error = match reply {
        Reply::Simple { error, .. } => *error,
        Reply::Chunk { kind, payload } if *kind & (1 << 15) != 0 => {
            if *kind != REPLY_TYPE_ERROR {
                return Err(format!("unknown error chunk type {kind:#x}"));
            }
            if payload.len() < 6 {
                return Err(format!("error chunk of {} bytes", payload.len()));
            }
            let e = u32::from_be_bytes(payload[0..4].try_into().unwrap());
            let m = u16::from_be_bytes(payload[4..6].try_into().unwrap()) as usize;
            if m != payload.len() - 6 {
                return Err(format!("error message length {m} in a chunk of {}", payload.len()));
            }
            if e == 0 {
                return Err("error chunk with error 0".into());
            }
            e
        }
        Reply::Chunk { .. } => 0,
    };
    if error != 0 {
        if !ERRNOS.contains(&error) {
            return Err(format!("{name}: error {error} is not an NBD error"));
        }
        if structured && req.kind == CMD_READ && matches!(reply, Reply::Simple { .. }) {
            return Err("READ answered with a simple reply after structured replies".into());
        }
        return Ok(());
    }
    // Success: it must be a success the request could have.
    let known = matches!(
        req.kind,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS
    );
    if !known {
        return Err(format!("unknown command {} succeeded", req.kind));
    }
    if req.kind == CMD_FLUSH {
        if req.offset != 0 || req.len != 0 {
            return Err("FLUSH with an offset or length succeeded".into());
        }
    } else if !in_bounds {
        return Err(format!(
            "{name} at {} length {} beyond the export's {} bytes succeeded",
            req.offset, req.len, info.size
        ));
    }
    if info.read_only && matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
        return Err(format!("{name} succeeded on a read-only export"));
    }
    if req.kind == CMD_READ && req.len > PAYLOAD_MAX {
        return Err(format!("READ of {} bytes succeeded", req.len));
    }
    match (req.kind, reply) {
        (CMD_READ, Reply::Simple { data, .. }) => {
            if structured {
                return Err("READ answered with a simple reply after structured replies".into());
            }
            match data {
                Some(d) if d.len() == req.len as usize => Ok(()),
                _ => Err("READ reply without its data".into()),
            }
        }
        (CMD_BLOCK_STATUS, Reply::Simple { .. }) => {
            Err("BLOCK_STATUS succeeded with a simple reply".into())
        }
        (_, Reply::Simple { .. }) => Ok(()),
        (CMD_READ, Reply::Chunk { kind: REPLY_TYPE_OFFSET_DATA, payload }) => {
            if payload.len() < 9 {
                return Err(format!("OFFSET_DATA chunk of {} bytes", payload.len()));
            }
            let off = u64::from_be_bytes(payload[0..8].try_into().unwrap());
            if off != req.offset || payload.len() - 8 != req.len as usize {
                return Err(format!(
                    "OFFSET_DATA at {off} with {} bytes for a READ at {} of {}",
                    payload.len() - 8,
                    req.offset,
                    req.len
                ));
            }
            Ok(())
        }
        (CMD_READ, Reply::Chunk { kind: REPLY_TYPE_NONE, payload }) => {
            if !payload.is_empty() {
                return Err("NONE chunk with a payload".into());
            }
            if req.len != 0 {
                return Err(format!("READ of {} bytes answered with no data", req.len));
            }
            Ok(())
        }
        (_, Reply::Chunk { kind: REPLY_TYPE_NONE, payload }) if req.kind != CMD_BLOCK_STATUS => {
            if payload.is_empty() {
                Ok(())
            } else {
                Err("NONE chunk with a payload".into())
            }
        }
        (CMD_BLOCK_STATUS, Reply::Chunk { kind: REPLY_TYPE_BLOCK_STATUS, payload }) => {
            if !allocation {
                return Err("BLOCK_STATUS succeeded with no context selected".into());
            }
            if payload.len() < 12 || (payload.len() - 4) % 8 != 0 {
                return Err(format!("BLOCK_STATUS chunk of {} bytes", payload.len()));
            }
            let id = u32::from_be_bytes(payload[0..4].try_into().unwrap());
            if id != META_BASE_ALLOCATION_ID {
                return Err(format!("BLOCK_STATUS for context {id}"));
            }
            let d: Vec<(u64, u32)> = payload[4..]
                .chunks(8)
                .map(|c| {
                    (
                        u32::from_be_bytes(c[0..4].try_into().unwrap()) as u64,
                        u32::from_be_bytes(c[4..8].try_into().unwrap()),
                    )
                })
                .collect();
            if d.iter().any(|&(l, _)| l == 0) {
                return Err("BLOCK_STATUS descriptor of length 0".into());
            }
            if req.flags & CMD_FLAG_REQ_ONE != 0 && (d.len() != 1 || d[0].0 > req.len as u64) {
                return Err(format!("REQ_ONE answered with {d:?} for length {}", req.len));
            }
            let head: u64 = d[..d.len() - 1].iter().map(|x| x.0).sum();
            if head >= req.len as u64 {
                return Err(format!("descriptors {d:?} go on past length {}", req.len));
            }
            let all: u64 = d.iter().map(|x| x.0).sum();
            if req.offset + all > info.size {
                return Err(format!("descriptors {d:?} from {} pass the export's end", req.offset));
            }
            if d.iter().any(|&(_, f)| f & !(STATE_HOLE | STATE_ZERO) != 0) {
                return Err(format!("unknown base:allocation flags in {d:?}"));
            }
            Ok(())
        }
        (_, Reply::Chunk { kind, .. }) => Err(format!("{name} answered with a chunk of type {kind}")),
    }
}

/// Checks everything the server wrote in transmission against the requests
/// in `input`: each complete request answered exactly once, correctly
/// framed, with an answer the request allows; and the way the loop ended.
pub fn check_transmission(
    input: &[u8],
    out: &[u8],
    end: End,
    structured: bool,
    allocation: bool,
    info: &ExportInfo,
) {
    let (reqs, writes, expect_end) = frame_requests(input);
    assert_eq!(end, expect_end, "oracle: transmission ended as {end:?}, expected {expect_end:?}");
    let mut pending: HashMap<u64, Vec<Request>> = HashMap::new();
    for r in &reqs {
        pending.entry(r.cookie).or_default().push(*r);
    }
    if !structured
        && pending
            .values()
            .any(|v| v.len() > 1 && v.iter().any(|r| r.kind == CMD_READ))
    {
        // Simple replies to a READ carry data whose length only the cookie
        // tells: with a cookie reused by a READ the stream cannot be framed
        // (a client must not do this; the server owes it nothing).
        return;
    }
    let mut o = Cur { b: out };
    // Replies by cookie, in the order sent.
    let mut replies: HashMap<u64, Vec<Reply>> = HashMap::new();
    let mut answered = 0usize;
    while o.left() > 0 {
        let magic = need(o.u32(), "a reply's magic");
        let (cookie, reply) = match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = need(o.u32(), "a simple reply");
                let cookie = need(o.u64(), "a simple reply");
                let cands = pending
                    .get(&cookie)
                    .unwrap_or_else(|| panic!("oracle: reply to unknown cookie {cookie:#x}"));
                // Without structured replies a READ's cookie is never
                // shared (checked above), so the framing is known.
                let data = match cands.first() {
                    Some(r) if error == 0 && r.kind == CMD_READ && !structured => {
                        Some(need(o.take(r.len as usize), "a READ's data"))
                    }
                    _ => None,
                };
                (cookie, Reply::Simple { error, data })
            }
            STRUCTURED_REPLY_MAGIC => {
                assert!(structured, "oracle: structured reply without negotiation");
                let flags = need(o.u16(), "a chunk header");
                let kind = need(o.u16(), "a chunk header");
                let cookie = need(o.u64(), "a chunk header");
                let len = need(o.u32(), "a chunk header") as usize;
                let payload = need(o.take(len), "a chunk's payload");
                assert_eq!(
                    flags,
                    REPLY_FLAG_DONE,
                    "oracle: chunk flags {flags:#x} (the server sends one chunk per reply)"
                );
                (cookie, Reply::Chunk { kind, payload })
            }
            other => panic!("oracle: bad reply magic {other:#x}"),
        };
        let n = pending.get(&cookie).map_or(0, Vec::len);
        let got = replies.entry(cookie).or_default();
        assert!(
            got.len() < n,
            "oracle: {} replies to cookie {cookie:#x}, {n} requests carry it",
            got.len() + 1
        );
        got.push(reply);
        answered += 1;
    }
    for (cookie, reqs_c) in &pending {
        let got = replies.get(cookie).map_or(&[][..], Vec::as_slice);
        assert_eq!(
            got.len(),
            reqs_c.len(),
            "oracle: {} of {} requests with cookie {cookie:#x} answered, e.g. {:?}",
            got.len(),
            reqs_c.len(),
            reqs_c[0]
        );
        // A cookie may be reused (the client's mistake, but the server
        // must still answer each request once): the replies must match
        // the requests one to one, in some order (replies come out of
        // order, refusals before the answers of requests still running).
        let n = reqs_c.len();
        let fits: Vec<bool> = (0..n * n)
            .map(|i| verdict(&reqs_c[i / n], &got[i % n], structured, allocation, info).is_ok())
            .collect();
        if let Some(p) = unmatched(n, |r, p| fits[r * n + p]) {
            let why: Vec<String> = reqs_c
                .iter()
                .map(|r| {
                    let v = verdict(r, &got[p], structured, allocation, info);
                    format!("{r:?}: {}", v.err().unwrap_or_else(|| "ok".into()))
                })
                .collect();
            panic!("oracle: bad reply to cookie {cookie:#x}: {}", why.join("; "));
        }
    }
    assert_eq!(answered, reqs.len());
    // Data returned by successful READs, where it claims to come from.
    let mut reads: Vec<(u64, &[u8])> = Vec::new();
    for (cookie, got) in &replies {
        for r in got {
            match r {
                Reply::Chunk { kind: REPLY_TYPE_OFFSET_DATA, payload } => reads.push((
                    u64::from_be_bytes(payload[0..8].try_into().unwrap()),
                    &payload[8..],
                )),
                // Unique cookie (see above): the one READ's offset.
                Reply::Simple { data: Some(d), .. } => reads.push((pending[cookie][0].offset, d)),
                _ => {}
            }
        }
    }
    check_contents(info.size, &writes, &reads);
    if trace() {
        eprintln!(
            "transmission: {} requests answered, end {end:?}, structured {structured}, \
             allocation {allocation}, read-only {}, {} bytes out",
            answered,
            info.read_only,
            out.len()
        );
    }
}

/// CAIRN_FUZZ_TRACE=1: one line per phase on stderr (to see what a replayed
/// input does; never set while fuzzing).
pub fn trace() -> bool {
    static T: OnceLock<bool> = OnceLock::new();
    *T.get_or_init(|| std::env::var_os("CAIRN_FUZZ_TRACE").is_some())
}

/// A perfect matching of n requests to n replies where `ok(request,
/// reply)`; None if there is one, else a reply left without a request
/// (Kuhn's augmenting paths; n is small).
fn unmatched(n: usize, ok: impl Fn(usize, usize) -> bool) -> Option<usize> {
    fn augment(
        p: usize,
        n: usize,
        ok: &dyn Fn(usize, usize) -> bool,
        seen: &mut [bool],
        owner: &mut [Option<usize>],
    ) -> bool {
        for r in 0..n {
            if ok(r, p) && !seen[r] {
                seen[r] = true;
                if owner[r].is_none_or(|q| augment(q, n, ok, seen, owner)) {
                    owner[r] = Some(p);
                    return true;
                }
            }
        }
        false
    }
    let mut owner = vec![None; n];
    (0..n).find(|&p| !augment(p, n, &ok, &mut vec![false; n], &mut owner))
}

/// The transmission target's session: a chosen export state, then requests.
pub fn requests(data: &[u8]) {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let structured = mode & 1 != 0;
    // Reachable only with structured replies (SET_META_CONTEXT needs them).
    let allocation = structured && mode & 2 != 0;
    let read_only = mode & 4 != 0;
    // An export size that is not a multiple of the block size.
    let size = if mode & 8 != 0 { VOL_BYTES - 300 } else { VOL_BYTES };
    let export = MemExport::new("vol", size, read_only);
    let fault = (mode >> 4) as u64;
    if fault != 0 {
        *export.fail_at.lock().unwrap() = Some(fault * 0x1_0000 - 0x200);
    }
    let n = Negotiated {
        export,
        size,
        structured,
        allocation,
    };
    runtime().block_on(transmit(stream, n));
}
