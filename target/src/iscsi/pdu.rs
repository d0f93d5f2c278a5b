//! iSCSI PDUs (RFC 7143 section 11): the 48-byte basic header segment, the
//! optional additional header segments, the data segment padded to four
//! bytes, and the CRC32C header and data digests. Bytes only, no sockets:
//! [`read_pdu`] and [`encode`] are what the connection uses, and what the
//! fuzzer drives.

use bytes::{Bytes, BytesMut};
use cairn_proto::frame_io::Outbox;
use tokio::io::{AsyncRead, AsyncReadExt};

pub const BHS_LEN: usize = 48;

// Initiator opcodes (byte 0, low six bits).
pub const OP_NOP_OUT: u8 = 0x00;
pub const OP_SCSI_CMD: u8 = 0x01;
pub const OP_TASK_MGMT_REQ: u8 = 0x02;
pub const OP_LOGIN_REQ: u8 = 0x03;
pub const OP_TEXT_REQ: u8 = 0x04;
pub const OP_DATA_OUT: u8 = 0x05;
pub const OP_LOGOUT_REQ: u8 = 0x06;
pub const OP_SNACK: u8 = 0x10;

// Target opcodes.
pub const OP_NOP_IN: u8 = 0x20;
pub const OP_SCSI_RESP: u8 = 0x21;
pub const OP_TASK_MGMT_RESP: u8 = 0x22;
pub const OP_LOGIN_RESP: u8 = 0x23;
pub const OP_TEXT_RESP: u8 = 0x24;
pub const OP_DATA_IN: u8 = 0x25;
pub const OP_LOGOUT_RESP: u8 = 0x26;
pub const OP_R2T: u8 = 0x31;
pub const OP_ASYNC: u8 = 0x32;
pub const OP_REJECT: u8 = 0x3f;

/// Byte 0: the immediate-delivery bit of initiator PDUs.
pub const IMMEDIATE: u8 = 0x40;
/// Byte 1: the final bit (F) of most PDUs, the transit bit (T) of logins.
pub const FINAL: u8 = 0x80;
/// Byte 1 of a Text or Login PDU: continue (C).
pub const CONTINUE: u8 = 0x40;

/// The "no tag" value of task tags and target transfer tags.
pub const NO_TAG: u32 = 0xffff_ffff;

// Reject reasons (section 11.17.1).
pub const REJECT_DIGEST: u8 = 0x02;
pub const REJECT_SNACK: u8 = 0x03;
pub const REJECT_PROTOCOL: u8 = 0x04;
pub const REJECT_NOT_SUPPORTED: u8 = 0x05;
pub const REJECT_IMMEDIATE: u8 = 0x06;
pub const REJECT_TASK_IN_PROGRESS: u8 = 0x07;
pub const REJECT_INVALID_DATA_ACK: u8 = 0x08;
pub const REJECT_INVALID_FIELD: u8 = 0x09;
pub const REJECT_WAITING_FOR_LOGOUT: u8 = 0x0b;

/// Largest data segment this target ever accepts in one PDU, whatever was
/// negotiated; the 24-bit field allows 16 MiB.
pub const DATA_SEGMENT_MAX: u32 = 16 << 20;

/// One PDU. `bhs` is the 48-byte header; `ahs` the additional header
/// segments (rare: extended CDBs); `data` the data segment without padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Bytes,
    pub data: Bytes,
}

impl Pdu {
    /// A header with `opcode` and everything else zero.
    pub fn new(opcode: u8) -> Pdu {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode;
        Pdu {
            bhs,
            ahs: Bytes::new(),
            data: Bytes::new(),
        }
    }

    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    pub fn immediate(&self) -> bool {
        self.bhs[0] & IMMEDIATE != 0
    }
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }
    pub fn final_bit(&self) -> bool {
        self.bhs[1] & FINAL != 0
    }
    pub fn u8(&self, at: usize) -> u8 {
        self.bhs[at]
    }
    pub fn u16(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.bhs[at], self.bhs[at + 1]])
    }
    pub fn u32(&self, at: usize) -> u32 {
        u32::from_be_bytes([
            self.bhs[at],
            self.bhs[at + 1],
            self.bhs[at + 2],
            self.bhs[at + 3],
        ])
    }
    pub fn u64(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bhs[at..at + 8]);
        u64::from_be_bytes(b)
    }
    pub fn set_u8(&mut self, at: usize, v: u8) -> &mut Self {
        self.bhs[at] = v;
        self
    }
    pub fn set_u16(&mut self, at: usize, v: u16) -> &mut Self {
        self.bhs[at..at + 2].copy_from_slice(&v.to_be_bytes());
        self
    }
    pub fn set_u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.bhs[at..at + 4].copy_from_slice(&v.to_be_bytes());
        self
    }
    pub fn set_u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.bhs[at..at + 8].copy_from_slice(&v.to_be_bytes());
        self
    }

    /// Initiator task tag (bytes 16..20 of every PDU that has one).
    pub fn itt(&self) -> u32 {
        self.u32(16)
    }
    /// The LUN field (bytes 8..16), SAM-5 encoded.
    pub fn lun_field(&self) -> u64 {
        self.u64(8)
    }
    /// CmdSN of initiator commands (bytes 24..28).
    pub fn cmd_sn(&self) -> u32 {
        self.u32(24)
    }
    /// ExpStatSN of initiator PDUs (bytes 28..32).
    pub fn exp_stat_sn(&self) -> u32 {
        self.u32(28)
    }
    /// The data segment length the header declares.
    pub fn declared_data_len(&self) -> u32 {
        u32::from_be_bytes([0, self.bhs[5], self.bhs[6], self.bhs[7]])
    }
}

/// Why a PDU could not be read. Every variant but `Io` is the peer's fault.
#[derive(Debug, thiserror::Error)]
pub enum PduError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("data segment of {len} bytes is over the negotiated limit of {max}")]
    TooLong { len: u32, max: u32 },
    #[error("header digest mismatch (got {got:#010x}, computed {want:#010x})")]
    HeaderDigest {
        got: u32,
        want: u32,
        bhs: Box<[u8; BHS_LEN]>,
    },
    #[error("data digest mismatch (got {got:#010x}, computed {want:#010x})")]
    DataDigest { got: u32, want: u32, pdu: Box<Pdu> },
}

/// The digests in force on a connection (negotiated at login).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// CRC32C (Castagnoli) over `parts`, as iSCSI's digests use it (section
/// 13.1). The value goes on the wire least significant byte first: RFC
/// 7143's examples (appendix B.4) are checked in the tests below.
pub fn crc32c(parts: &[&[u8]]) -> u32 {
    let mut c = 0u32;
    for p in parts {
        c = crc32c::crc32c_append(c, p);
    }
    c
}

/// A digest as it goes on the wire (the byte order [`get_digest`] reads).
fn digest_bytes(crc: u32) -> [u8; 4] {
    crc.to_le_bytes()
}

fn get_digest(b: [u8; 4]) -> u32 {
    u32::from_le_bytes(b)
}

fn padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Reads one PDU. `max_data` is the MaxRecvDataSegmentLength this side
/// declared: a longer data segment is refused before it is read, so a
/// peer cannot make the target buffer more than it offered.
pub async fn read_pdu<R: AsyncRead + Unpin>(
    r: &mut R,
    digests: Digests,
    max_data: u32,
) -> Result<Pdu, PduError> {
    let mut bhs = [0u8; BHS_LEN];
    r.read_exact(&mut bhs).await?;
    let total = wire_len(&bhs, digests, max_data)?;
    // The data segment is read into spare capacity, not zeroed first.
    let mut buf = BytesMut::with_capacity(total);
    buf.extend_from_slice(&bhs);
    cairn_proto::frame_io::read_to_len(r, &mut buf, total).await?;
    match decode(buf.freeze(), digests)? {
        Some((pdu, _)) => Ok(pdu),
        None => Err(PduError::Io(std::io::ErrorKind::UnexpectedEof.into())),
    }
}

/// Parses one PDU from the front of `buf` (for the fuzzer and tests):
/// `Ok(None)` when more bytes are needed. Same checks as [`read_pdu`].
pub fn parse(
    buf: &[u8],
    digests: Digests,
    max_data: u32,
) -> Result<Option<(Pdu, usize)>, PduError> {
    if buf.len() < BHS_LEN {
        return Ok(None);
    }
    let total = wire_len(buf, digests, max_data)?;
    if buf.len() < total {
        return Ok(None);
    }
    decode(Bytes::copy_from_slice(&buf[..total]), digests)
}

/// The whole PDU's length on the wire from its header (`bhs` holds at
/// least the 48 bytes); refuses a data segment over `max_data`.
fn wire_len(bhs: &[u8], digests: Digests, max_data: u32) -> Result<usize, PduError> {
    let ahs = bhs[4] as usize * 4;
    let len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]);
    let max = max_data.min(DATA_SEGMENT_MAX);
    if len > max {
        return Err(PduError::TooLong { len, max });
    }
    let header_digest = if digests.header { 4 } else { 0 };
    let data_digest = if digests.data && len > 0 { 4 } else { 0 };
    let len = len as usize;
    Ok(BHS_LEN + ahs + header_digest + len + padding(len) + data_digest)
}

/// Splits a whole PDU (exactly [`wire_len`] bytes) into its parts without
/// copying, checking the digests.
fn decode(buf: Bytes, digests: Digests) -> Result<Option<(Pdu, usize)>, PduError> {
    let mut bhs = [0u8; BHS_LEN];
    bhs.copy_from_slice(&buf[..BHS_LEN]);
    let ahs_end = BHS_LEN + bhs[4] as usize * 4;
    let ahs = buf.slice(BHS_LEN..ahs_end);
    let digest_at = |at: usize| get_digest([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    let mut at = ahs_end;
    if digests.header {
        let got = digest_at(at);
        let want = crc32c(&[&bhs, &ahs]);
        if got != want {
            return Err(PduError::HeaderDigest {
                got,
                want,
                bhs: Box::new(bhs),
            });
        }
        at += 4;
    }
    let len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
    let padded = buf.slice(at..at + len + padding(len));
    at += padded.len();
    let pdu = Pdu {
        bhs,
        ahs,
        data: padded.slice(..len),
    };
    if digests.data && len > 0 {
        let got = digest_at(at);
        at += 4;
        let want = crc32c(&[&padded]);
        if got != want {
            return Err(PduError::DataDigest {
                got,
                want,
                pdu: Box::new(pdu),
            });
        }
    }
    Ok(Some((pdu, at)))
}

/// Where an encoded PDU goes: one contiguous buffer, or an [`Outbox`] that
/// keeps a long data segment by reference.
trait Sink {
    fn put(&mut self, b: &[u8]);
    fn put_data(&mut self, data: &Bytes);
}

impl Sink for BytesMut {
    fn put(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
    fn put_data(&mut self, data: &Bytes) {
        self.extend_from_slice(data);
    }
}

impl Sink for Outbox {
    fn put(&mut self, b: &[u8]) {
        self.put_slice(b);
    }
    fn put_data(&mut self, data: &Bytes) {
        Outbox::put_data(self, data.clone());
    }
}

/// Appends `pdu` to `out` as it goes on the wire: the header with its data
/// segment length filled in, digests where negotiated, padding.
pub fn encode(pdu: &Pdu, digests: Digests, out: &mut BytesMut) {
    out.reserve(BHS_LEN + pdu.ahs.len() + 8 + pdu.data.len() + 4);
    encode_to(pdu, digests, out);
}

/// As [`encode`], into an [`Outbox`]: a long data segment (a read's data)
/// is queued by reference, not copied.
pub fn encode_out(pdu: &Pdu, digests: Digests, out: &mut Outbox) {
    encode_to(pdu, digests, out);
}

fn encode_to<S: Sink>(pdu: &Pdu, digests: Digests, out: &mut S) {
    let mut bhs = pdu.bhs;
    debug_assert!(pdu.ahs.len().is_multiple_of(4) && pdu.ahs.len() / 4 <= 255);
    bhs[4] = (pdu.ahs.len() / 4) as u8;
    let len = pdu.data.len() as u32;
    bhs[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    out.put(&bhs);
    out.put(&pdu.ahs);
    if digests.header {
        out.put(&digest_bytes(crc32c(&[&bhs, &pdu.ahs])));
    }
    if !pdu.data.is_empty() {
        let pad = padding(pdu.data.len());
        out.put_data(&pdu.data);
        out.put(&[0u8; 3][..pad]);
        if digests.data {
            out.put(&digest_bytes(crc32c(&[&pdu.data, &[0u8; 3][..pad]])));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(d: Digests, data_len: usize) {
        let mut p = Pdu::new(OP_SCSI_CMD);
        p.set_u32(16, 0x1234_5678).set_u64(8, 1 << 48);
        p.data = Bytes::from((0..data_len).map(|i| i as u8).collect::<Vec<_>>());
        let mut out = BytesMut::new();
        encode(&p, d, &mut out);
        assert_eq!(out.len() % 4, 0);
        let (q, used) = parse(&out, d, 1 << 20).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(q.itt(), 0x1234_5678);
        assert_eq!(q.lun_field(), 1 << 48);
        assert_eq!(q.data, p.data);
        assert_eq!(q.declared_data_len() as usize, data_len);
        // Every proper prefix asks for more.
        for cut in [0, 1, 47, out.len() - 1] {
            assert!(parse(&out[..cut], d, 1 << 20).unwrap().is_none());
        }
    }

    #[test]
    fn pdus_roundtrip_with_and_without_digests_and_padding() {
        for d in [
            Digests::default(),
            Digests {
                header: true,
                data: true,
            },
        ] {
            for len in [0, 1, 3, 4, 5, 8192] {
                roundtrip(d, len);
            }
        }
    }

    #[test]
    fn crc32c_matches_rfc_examples() {
        // RFC 7143 B.4: 32 bytes of zeros give aa 36 91 8a on the wire.
        let mut out = BytesMut::new();
        out.extend_from_slice(&digest_bytes(crc32c(&[&[0u8; 32]])));
        assert_eq!(&out[..], &[0xaa, 0x36, 0x91, 0x8a]);
        // 32 bytes of 0xff give 43 ab a8 62.
        let mut out = BytesMut::new();
        out.extend_from_slice(&digest_bytes(crc32c(&[&[0xffu8; 32]])));
        assert_eq!(&out[..], &[0x43, 0xab, 0xa8, 0x62]);
    }

    #[test]
    fn digest_mismatches_and_long_segments_are_refused() {
        let d = Digests {
            header: true,
            data: true,
        };
        let mut p = Pdu::new(OP_NOP_OUT);
        p.data = Bytes::from_static(b"hello");
        let mut out = BytesMut::new();
        encode(&p, d, &mut out);
        let mut bad = out.clone();
        bad[3] ^= 1;
        assert!(matches!(
            parse(&bad, d, 1 << 20),
            Err(PduError::HeaderDigest { .. })
        ));
        let mut bad = out.clone();
        bad[BHS_LEN + 4] ^= 1;
        assert!(matches!(
            parse(&bad, d, 1 << 20),
            Err(PduError::DataDigest { .. })
        ));
        assert!(matches!(
            parse(&out, d, 4),
            Err(PduError::TooLong { len: 5, max: 4 })
        ));
    }
}
