//! The bench's load generator: a small asynchronous iSCSI initiator (RFC
//! 7143), one TCP connection per job, that keeps a fixed number of READ(16)
//! or WRITE(16) commands in flight and times each one.
//!
//! Why it exists: Debian's fio has no libiscsi engine, and libiscsi's
//! `iscsi-perf` only reads, so neither can drive the 4 KiB and 1 MiB
//! read and write phases. Going through the kernel's initiator
//! (open-iscsi and a /dev/sdX) would measure the block layer too, need
//! kernel modules, and touch the host's configuration. This initiator is
//! the same code for tgt and for Cairn, so the comparison is fair.
//!
//! What it does: login straight to the operational stage (no
//! authentication), no digests, ErrorRecoveryLevel 0, one connection per
//! session. Writes carry immediate data and unsolicited Data-Out up to
//! FirstBurstLength when the target agreed (ImmediateData=Yes,
//! InitialR2T=No), then answer each R2T with Data-Out PDUs no longer than
//! the target's MaxRecvDataSegmentLength. Reads collect Data-In until the
//! status. CmdSN stays within the target's window (MaxCmdSN). Any status
//! but GOOD, a reject, or a protocol surprise stops the job with an error.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use cairn_target::iscsi::pdu::{
    encode, read_pdu, Digests, Pdu, FINAL, IMMEDIATE, NO_TAG, OP_ASYNC, OP_DATA_IN, OP_DATA_OUT,
    OP_LOGIN_REQ, OP_LOGIN_RESP, OP_LOGOUT_REQ, OP_LOGOUT_RESP, OP_NOP_IN, OP_NOP_OUT, OP_R2T,
    OP_REJECT, OP_SCSI_CMD, OP_SCSI_RESP,
};
use cairn_target::iscsi::text;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::mpsc;

/// How long any single answer may take before the job is declared stuck.
const ANSWER_MAX: Duration = Duration::from_secs(60);
/// The initiator's name in every login.
pub const INITIATOR_NAME: &str = "iqn.2026-12.io.cairn.bench:initiator";
/// Response byte of a SCSI Response: command completed at target.
const STATUS_GOOD: u8 = 0;
/// S bit of a Data-In PDU: status in this PDU.
const DATA_IN_STATUS: u8 = 0x01;
/// Byte 1 of a SCSI Command: read (R) and write (W) bits, task attribute
/// SIMPLE.
const CMD_READ: u8 = 0x40;
const CMD_WRITE: u8 = 0x20;
const ATTR_SIMPLE: u8 = 0x01;

/// The operational keys this initiator offers; [`Offer::default`] is what
/// the bench uses.
#[derive(Debug, Clone)]
pub struct Offer {
    pub max_recv_data_segment: u32,
    pub first_burst: u32,
    pub max_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
}

impl Default for Offer {
    fn default() -> Self {
        Offer {
            max_recv_data_segment: 262_144,
            first_burst: 262_144,
            max_burst: 1_048_576,
            immediate_data: true,
            initial_r2t: false,
        }
    }
}

/// What the login settled (the target's answers, or RFC 7143's defaults
/// for keys it did not answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Largest data segment this side may send: the target's declared
    /// MaxRecvDataSegmentLength (8192 if it declared none).
    pub send_data_max: u32,
    pub first_burst: u32,
    pub max_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
}

/// One job's shape.
#[derive(Debug, Clone)]
pub struct Job {
    pub write: bool,
    pub random: bool,
    pub block_bytes: u32,
    pub queue_depth: u32,
    /// Time based; None: one pass over `region_bytes` (sequential only).
    pub duration: Option<Duration>,
    /// Offsets are drawn (or walked) in `[0, region_bytes)`.
    pub region_bytes: u64,
    /// Reads: every block read must equal this (after a sequential pass
    /// that wrote it everywhere). Tests only.
    pub verify: Option<Bytes>,
    pub seed: u64,
}

/// What a job measured.
#[derive(Debug, Clone, Default)]
pub struct JobStats {
    pub ios: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Completion latency of every command, in nanoseconds, sorted.
    pub latencies_ns: Vec<u64>,
}

impl JobStats {
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn bytes_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// The `q` quantile (0..=1) of the latencies, in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies_ns.is_empty() {
            return f64::NAN;
        }
        let n = self.latencies_ns.len();
        let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
        self.latencies_ns[i] as f64 / 1e6
    }
    pub fn mean_ms(&self) -> f64 {
        if self.latencies_ns.is_empty() {
            return f64::NAN;
        }
        self.latencies_ns.iter().sum::<u64>() as f64 / self.latencies_ns.len() as f64 / 1e6
    }
}

/// One command in flight.
struct Task {
    started: Instant,
    offset: u64,
    len: u32,
    write: bool,
    /// Data-In bytes received so far.
    received: u32,
}

/// A logged-in session on one connection, LUN chosen.
pub struct Session<R> {
    r: BufReader<R>,
    /// Encoded PDUs to the writer task (which owns the socket's write half
    /// so a blocked send never stops this side reading).
    tx: mpsc::UnboundedSender<Bytes>,
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
    pub negotiated: Negotiated,
    offer: Offer,
    cmd_sn: u32,
    exp_stat_sn: u32,
    max_cmd_sn: u32,
    next_itt: u32,
    lun_field: u64,
    pub block_size: u32,
    pub blocks: u64,
    what: String,
}

/// `a <= b` in serial number arithmetic (RFC 1982, 32 bits).
fn sn_le(a: u32, b: u32) -> bool {
    b.wrapping_sub(a) < 1 << 31
}

/// The LUN field for LUN `lun` (SAM peripheral or flat addressing).
fn lun_field(lun: u16) -> u64 {
    if lun < 256 {
        (lun as u64) << 48
    } else {
        (0x4000 | (lun as u64 & 0x3fff)) << 48
    }
}

fn encode_pdu(p: &Pdu) -> Bytes {
    let mut out = BytesMut::with_capacity(48 + p.data.len() + 4);
    encode(p, Digests::default(), &mut out);
    out.freeze()
}

/// The sense key and ASC/ASCQ of a SCSI Response's sense data.
fn sense_text(data: &[u8]) -> String {
    // Data segment: 2-byte SenseLength, then fixed or descriptor sense.
    let sense = data.get(2..).unwrap_or(&[]);
    match sense.first().map(|b| b & 0x7f) {
        Some(0x70) | Some(0x71) if sense.len() >= 14 => format!(
            "sense key {:#x}, ASC/ASCQ {:#04x}/{:#04x}",
            sense[2] & 0x0f,
            sense[12],
            sense[13]
        ),
        Some(0x72) | Some(0x73) if sense.len() >= 4 => format!(
            "sense key {:#x}, ASC/ASCQ {:#04x}/{:#04x}",
            sense[1] & 0x0f,
            sense[2],
            sense[3]
        ),
        _ => format!("sense {sense:02x?}"),
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(64 << 10, w);
    while let Some(first) = rx.recv().await {
        w.write_all(&first).await?;
        while let Ok(more) = rx.try_recv() {
            w.write_all(&more).await?;
        }
        w.flush().await?;
    }
    w.shutdown().await
}

impl<R: AsyncRead + Unpin + Send + 'static> Session<R> {
    /// Logs in to `target`, then finds `lun`'s block size and size (TEST
    /// UNIT READY until no unit attention, READ CAPACITY(16)).
    pub async fn login<W: AsyncWrite + Unpin + Send + 'static>(
        r: R,
        w: W,
        target: &str,
        lun: u16,
        isid_qualifier: u16,
        offer: Offer,
    ) -> anyhow::Result<Session<R>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(w, rx));
        let mut s = Session {
            r: BufReader::with_capacity(256 << 10, r),
            tx,
            writer,
            negotiated: Negotiated {
                send_data_max: 8192,
                first_burst: 65_536,
                max_burst: 262_144,
                immediate_data: true,
                initial_r2t: true,
            },
            offer,
            cmd_sn: 1,
            exp_stat_sn: 0,
            max_cmd_sn: 1,
            next_itt: 1,
            lun_field: lun_field(lun),
            block_size: 0,
            blocks: 0,
            what: format!("{target} LUN {lun}"),
        };
        s.login_phase(target, isid_qualifier)
            .await
            .with_context(|| format!("logging in to {target}"))?;
        s.probe()
            .await
            .with_context(|| format!("reading the capacity of {}", s.what))?;
        Ok(s)
    }

    fn send(&self, p: &Pdu) -> anyhow::Result<()> {
        self.tx
            .send(encode_pdu(p))
            .map_err(|_| anyhow::anyhow!("the connection's writer stopped"))
    }

    async fn recv(&mut self) -> anyhow::Result<Pdu> {
        let max = self.offer.max_recv_data_segment.max(8192);
        let p = tokio::time::timeout(ANSWER_MAX, read_pdu(&mut self.r, Digests::default(), max))
            .await
            .with_context(|| format!("no answer from {} within {ANSWER_MAX:?}", self.what))?
            .with_context(|| format!("reading a PDU from {}", self.what))?;
        Ok(p)
    }

    /// Takes ExpCmdSN/MaxCmdSN (and StatSN when the PDU carries status)
    /// from a target PDU.
    fn note_sns(&mut self, p: &Pdu) {
        let op = p.opcode();
        let carries_window = matches!(
            op,
            OP_SCSI_RESP | OP_DATA_IN | OP_R2T | OP_NOP_IN | OP_ASYNC | OP_REJECT | OP_LOGOUT_RESP
        );
        if carries_window {
            let max = p.u32(32);
            let exp = p.u32(28);
            // MaxCmdSN < ExpCmdSN - 1 means "ignore" (section 4.2.2.1).
            if sn_le(exp.wrapping_sub(1), max) && sn_le(self.max_cmd_sn, max) {
                self.max_cmd_sn = max;
            }
        }
        let has_status = match op {
            OP_DATA_IN => p.flags() & DATA_IN_STATUS != 0,
            OP_R2T => false,
            _ => carries_window,
        };
        if has_status {
            self.exp_stat_sn = p.u32(24).wrapping_add(1);
        }
    }

    async fn login_phase(&mut self, target: &str, isid_qualifier: u16) -> anyhow::Result<()> {
        let o = &self.offer;
        let keys: Vec<(String, String)> = [
            ("InitiatorName", INITIATOR_NAME.to_string()),
            ("TargetName", target.to_string()),
            ("SessionType", "Normal".into()),
            ("HeaderDigest", "None".into()),
            ("DataDigest", "None".into()),
            (
                "MaxRecvDataSegmentLength",
                o.max_recv_data_segment.to_string(),
            ),
            ("ImmediateData", yes_no(o.immediate_data)),
            ("InitialR2T", yes_no(o.initial_r2t)),
            ("FirstBurstLength", o.first_burst.to_string()),
            ("MaxBurstLength", o.max_burst.to_string()),
            ("MaxOutstandingR2T", "1".into()),
            ("MaxConnections", "1".into()),
            ("ErrorRecoveryLevel", "0".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut answers: Vec<(String, String)> = Vec::new();
        let mut pending_text = Vec::new();
        let mut data = text::encode(&keys);
        let itt = 0;
        let mut tsih = 0u16;
        for _round in 0..16 {
            let mut p = Pdu::new(OP_LOGIN_REQ | IMMEDIATE);
            // T, CSG=1 (operational), NSG=3 (full feature).
            p.bhs[1] = FINAL | (1 << 2) | 3;
            p.bhs[8..14].copy_from_slice(&[
                0x80,
                0,
                0,
                0,
                (isid_qualifier >> 8) as u8,
                isid_qualifier as u8,
            ]);
            p.set_u16(14, tsih)
                .set_u32(16, itt)
                .set_u32(24, self.cmd_sn)
                .set_u32(28, self.exp_stat_sn);
            p.data = Bytes::from(std::mem::take(&mut data));
            self.send(&p)?;
            let r = self.recv().await?;
            if r.opcode() != OP_LOGIN_RESP {
                bail!("expected a login response, got opcode {:#04x}", r.opcode());
            }
            let status = r.u16(36);
            if status != 0 {
                bail!(
                    "the target refused the login: status class {:#04x} detail {:#04x}{}",
                    status >> 8,
                    status & 0xff,
                    match status {
                        0x0203 => " (target not found)",
                        0x0201 => " (authentication failed)",
                        0x0202 => " (initiator not allowed)",
                        _ => "",
                    }
                );
            }
            self.exp_stat_sn = r.u32(24).wrapping_add(1);
            self.max_cmd_sn = r.u32(32);
            self.cmd_sn = r.u32(28);
            tsih = r.u16(14);
            pending_text.extend_from_slice(&r.data);
            if r.flags() & 0x40 != 0 {
                // C: more text follows; ask for it with an empty request.
                continue;
            }
            answers.extend(
                text::parse(&pending_text)
                    .map_err(|e| anyhow::anyhow!("bad login text from the target: {e}"))?,
            );
            pending_text.clear();
            if r.flags() & FINAL != 0 && r.flags() & 0x03 == 3 {
                self.negotiated = negotiated(&answers);
                return Ok(());
            }
        }
        bail!("the target did not move to full feature phase within 16 login rounds")
    }

    /// A single command outside the timed loop; returns its status, its
    /// data, and its sense (as text) when the status is not GOOD.
    async fn command(
        &mut self,
        cdb: &[u8],
        read_len: u32,
    ) -> anyhow::Result<(u8, Vec<u8>, String)> {
        let itt = self.take_itt();
        let mut p = Pdu::new(OP_SCSI_CMD);
        p.bhs[1] = FINAL | ATTR_SIMPLE | if read_len > 0 { CMD_READ } else { 0 };
        p.set_u64(8, self.lun_field)
            .set_u32(16, itt)
            .set_u32(20, read_len)
            .set_u32(24, self.cmd_sn)
            .set_u32(28, self.exp_stat_sn);
        p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(&p)?;
        let mut data = Vec::new();
        loop {
            let r = self.recv().await?;
            self.note_sns(&r);
            match r.opcode() {
                OP_DATA_IN if r.itt() == itt => {
                    data.extend_from_slice(&r.data);
                    if r.flags() & DATA_IN_STATUS != 0 {
                        return Ok((r.u8(3), data, String::new()));
                    }
                }
                OP_SCSI_RESP if r.itt() == itt => {
                    if r.u8(2) != 0 {
                        bail!("iSCSI response {:#04x} (not completed)", r.u8(2));
                    }
                    let sense = if r.u8(3) == STATUS_GOOD {
                        String::new()
                    } else {
                        sense_text(&r.data)
                    };
                    return Ok((r.u8(3), data, sense));
                }
                OP_NOP_IN => self.answer_nop(&r)?,
                OP_ASYNC => {}
                op => bail!("unexpected opcode {op:#04x} (ITT {:#x})", r.itt()),
            }
        }
    }

    async fn probe(&mut self) -> anyhow::Result<()> {
        // A new I_T nexus may first see a unit attention (power on, reset,
        // capacity changed): TEST UNIT READY clears it.
        let mut last = String::new();
        for _ in 0..5 {
            let (status, _, sense) = self.command(&[0u8; 6], 0).await?;
            if status == STATUS_GOOD {
                last.clear();
                break;
            }
            last = format!("status {status:#04x}, {sense}");
        }
        if !last.is_empty() {
            bail!("TEST UNIT READY did not succeed in 5 tries; the last: {last}");
        }
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e;
        cdb[1] = 0x10;
        cdb[10..14].copy_from_slice(&32u32.to_be_bytes());
        let (status, data, sense) = self.command(&cdb, 32).await?;
        if status != STATUS_GOOD || data.len() < 12 {
            bail!(
                "READ CAPACITY(16) failed: status {status:#04x} {sense}, {} bytes",
                data.len()
            );
        }
        let last = u64::from_be_bytes(data[0..8].try_into().expect("8 bytes"));
        self.block_size = u32::from_be_bytes(data[8..12].try_into().expect("4 bytes"));
        self.blocks = last + 1;
        if self.block_size == 0 || !self.block_size.is_power_of_two() {
            bail!("odd block size {}", self.block_size);
        }
        Ok(())
    }

    fn take_itt(&mut self) -> u32 {
        let itt = self.next_itt;
        self.next_itt = self.next_itt.wrapping_add(1);
        if self.next_itt == NO_TAG {
            self.next_itt = 1;
        }
        itt
    }

    /// The size of the LUN in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.blocks * self.block_size as u64
    }

    fn answer_nop(&mut self, r: &Pdu) -> anyhow::Result<()> {
        let ttt = r.u32(20);
        if ttt == NO_TAG {
            return Ok(());
        }
        let mut p = Pdu::new(OP_NOP_OUT | IMMEDIATE);
        p.bhs[1] = FINAL;
        p.set_u64(8, r.lun_field())
            .set_u32(16, NO_TAG)
            .set_u32(20, ttt)
            .set_u32(24, self.cmd_sn)
            .set_u32(28, self.exp_stat_sn);
        self.send(&p)
    }

    /// Sends READ(16) or WRITE(16) with its immediate and unsolicited data.
    fn issue(
        &mut self,
        itt: u32,
        offset: u64,
        len: u32,
        write: Option<&Bytes>,
    ) -> anyhow::Result<()> {
        let bs = self.block_size as u64;
        let mut cdb = [0u8; 16];
        cdb[0] = if write.is_some() { 0x8a } else { 0x88 };
        cdb[2..10].copy_from_slice(&(offset / bs).to_be_bytes());
        cdb[10..14].copy_from_slice(&((len as u64 / bs) as u32).to_be_bytes());
        let mut p = Pdu::new(OP_SCSI_CMD);
        p.set_u64(8, self.lun_field)
            .set_u32(16, itt)
            .set_u32(20, len)
            .set_u32(24, self.cmd_sn)
            .set_u32(28, self.exp_stat_sn);
        p.bhs[32..48].copy_from_slice(&cdb);
        let n = &self.negotiated;
        let mut unsolicited = None;
        match write {
            None => p.bhs[1] = FINAL | CMD_READ | ATTR_SIMPLE,
            Some(data) => {
                let immediate = if n.immediate_data {
                    len.min(n.first_burst).min(n.send_data_max)
                } else {
                    0
                };
                p.data = data.slice(..immediate as usize);
                let end = if n.initial_r2t {
                    immediate
                } else {
                    len.min(n.first_burst).max(immediate)
                };
                p.bhs[1] = CMD_WRITE | ATTR_SIMPLE | if end > immediate { 0 } else { FINAL };
                if end > immediate {
                    unsolicited = Some((immediate, end));
                }
            }
        }
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(&p)?;
        if let (Some((from, to)), Some(data)) = (unsolicited, write) {
            self.data_out(itt, NO_TAG, data, from, to)?;
        }
        Ok(())
    }

    /// Data-Out PDUs for `data[from..to]`, DataSN from 0, F on the last.
    fn data_out(&self, itt: u32, ttt: u32, data: &Bytes, from: u32, to: u32) -> anyhow::Result<()> {
        let step = self.negotiated.send_data_max.max(512);
        let mut at = from;
        let mut sn = 0u32;
        while at < to {
            let n = (to - at).min(step);
            let mut o = Pdu::new(OP_DATA_OUT);
            o.bhs[1] = if at + n == to { FINAL } else { 0 };
            o.set_u64(8, self.lun_field)
                .set_u32(16, itt)
                .set_u32(20, ttt)
                .set_u32(28, self.exp_stat_sn)
                .set_u32(36, sn)
                .set_u32(40, at);
            o.data = data.slice(at as usize..(at + n) as usize);
            self.send(&o)?;
            at += n;
            sn += 1;
        }
        Ok(())
    }

    /// Runs `job`: keeps `queue_depth` commands in flight until its time
    /// is up (or its one pass is done) and every command has completed.
    pub async fn run(&mut self, job: &Job) -> anyhow::Result<JobStats> {
        let bs = job.block_bytes as u64;
        if bs == 0 || !bs.is_multiple_of(self.block_size as u64) {
            bail!(
                "block size {bs} is not a multiple of the LUN's {}",
                self.block_size
            );
        }
        let region = job.region_bytes.min(self.size_bytes()) / bs * bs;
        if region == 0 {
            bail!(
                "the LUN ({} bytes) is smaller than one block",
                self.size_bytes()
            );
        }
        let slots = region / bs;
        let mut rng = rand::rngs::StdRng::seed_from_u64(job.seed);
        let payload: Bytes = if job.write {
            match &job.verify {
                Some(v) => v.clone(),
                None => {
                    let mut b = vec![0u8; bs as usize];
                    rng.fill(&mut b[..]);
                    Bytes::from(b)
                }
            }
        } else {
            Bytes::new()
        };
        if payload.len() as u64 != bs && job.write {
            bail!("the write payload is not one block");
        }
        let mut stats = JobStats::default();
        let mut inflight: HashMap<u32, Task> = HashMap::with_capacity(job.queue_depth as usize * 2);
        let mut next_seq = 0u64;
        let start = Instant::now();
        let deadline = job.duration.map(|d| start + d);
        let more = |rng: &mut rand::rngs::StdRng, next_seq: &mut u64| -> Option<u64> {
            if let Some(d) = deadline {
                if Instant::now() >= d {
                    return None;
                }
            }
            if job.random {
                Some(rng.gen_range(0..slots) * bs)
            } else {
                if *next_seq >= slots {
                    // One pass ends here; a time-based job wraps around.
                    deadline?;
                    *next_seq = 0;
                }
                let o = *next_seq * bs;
                *next_seq += 1;
                Some(o)
            }
        };
        let mut wanted = job.queue_depth as usize;
        let mut exhausted = false;
        loop {
            // Top up, within the target's CmdSN window.
            while !exhausted && wanted > 0 && sn_le(self.cmd_sn, self.max_cmd_sn) {
                match more(&mut rng, &mut next_seq) {
                    Some(offset) => {
                        let itt = self.take_itt();
                        inflight.insert(
                            itt,
                            Task {
                                started: Instant::now(),
                                offset,
                                len: bs as u32,
                                write: job.write,
                                received: 0,
                            },
                        );
                        self.issue(itt, offset, bs as u32, job.write.then_some(&payload))?;
                        wanted -= 1;
                    }
                    None => exhausted = true,
                }
            }
            if inflight.is_empty() {
                break;
            }
            let r = self.recv().await?;
            self.note_sns(&r);
            let itt = r.itt();
            let done = match r.opcode() {
                OP_DATA_IN => {
                    let t = inflight
                        .get_mut(&itt)
                        .with_context(|| format!("Data-In for unknown task {itt:#x}"))?;
                    if t.write {
                        bail!("Data-In for write task {itt:#x}");
                    }
                    let off = r.u32(40);
                    if off != t.received || off as u64 + r.data.len() as u64 > t.len as u64 {
                        bail!(
                            "Data-In for task {itt:#x} at buffer offset {off} with {} bytes; \
                             expected offset {} of {}",
                            r.data.len(),
                            t.received,
                            t.len
                        );
                    }
                    if let Some(v) = &job.verify {
                        let want = &v[off as usize..off as usize + r.data.len()];
                        if r.data[..] != want[..] {
                            bail!(
                                "read at byte {} of the LUN returned other data than written",
                                t.offset + off as u64
                            );
                        }
                    }
                    t.received += r.data.len() as u32;
                    if r.flags() & DATA_IN_STATUS != 0 {
                        if r.u8(3) != STATUS_GOOD {
                            bail!(
                                "READ at byte {} ended with status {:#04x}",
                                t.offset,
                                r.u8(3)
                            );
                        }
                        true
                    } else {
                        false
                    }
                }
                OP_SCSI_RESP => {
                    let t = inflight
                        .get(&itt)
                        .with_context(|| format!("SCSI Response for unknown task {itt:#x}"))?;
                    let op = if t.write { "WRITE(16)" } else { "READ(16)" };
                    if r.u8(2) != 0 {
                        bail!("{op} at byte {}: iSCSI response {:#04x}", t.offset, r.u8(2));
                    }
                    if r.u8(3) != STATUS_GOOD {
                        bail!(
                            "{op} of {} bytes at byte {} of {}: SCSI status {:#04x}, {}",
                            t.len,
                            t.offset,
                            self.what,
                            r.u8(3),
                            sense_text(&r.data)
                        );
                    }
                    // Residual overflow/underflow (bits 1-2 of byte 1).
                    if r.flags() & 0x06 != 0 {
                        bail!(
                            "{op} at byte {}: residual count {} (flags {:#04x})",
                            t.offset,
                            r.u32(44),
                            r.flags()
                        );
                    }
                    if !t.write && t.received != t.len {
                        bail!(
                            "READ(16) at byte {} completed with {} of {} bytes",
                            t.offset,
                            t.received,
                            t.len
                        );
                    }
                    true
                }
                OP_R2T => {
                    let t = inflight
                        .get(&itt)
                        .with_context(|| format!("R2T for unknown task {itt:#x}"))?;
                    let (ttt, off, len) = (r.u32(20), r.u32(40), r.u32(44));
                    if !t.write || off as u64 + len as u64 > t.len as u64 || len == 0 {
                        bail!(
                            "R2T for task {itt:#x} asks for {len} bytes at {off} of a {} of {}",
                            if t.write { "write" } else { "read" },
                            t.len
                        );
                    }
                    self.data_out(itt, ttt, &payload, off, off + len)?;
                    false
                }
                OP_NOP_IN => {
                    self.answer_nop(&r)?;
                    false
                }
                OP_ASYNC => bail!(
                    "asynchronous message from {}: event {:#04x}",
                    self.what,
                    r.u8(36)
                ),
                OP_REJECT => bail!(
                    "{} rejected a PDU: reason {:#04x}, header {:02x?}",
                    self.what,
                    r.u8(2),
                    &r.data[..r.data.len().min(48)]
                ),
                op => bail!("unexpected opcode {op:#04x} from {}", self.what),
            };
            if done {
                let t = inflight.remove(&itt).expect("present");
                stats
                    .latencies_ns
                    .push(t.started.elapsed().as_nanos() as u64);
                stats.ios += 1;
                stats.bytes += t.len as u64;
                wanted += 1;
            }
        }
        stats.elapsed = start.elapsed();
        stats.latencies_ns.sort_unstable();
        Ok(stats)
    }

    /// Logout (best effort, bounded) and closes the connection.
    pub async fn logout(mut self) -> anyhow::Result<()> {
        let itt = self.take_itt();
        let mut p = Pdu::new(OP_LOGOUT_REQ | IMMEDIATE);
        p.bhs[1] = FINAL; // reason 0: close the session
        p.set_u32(16, itt)
            .set_u32(24, self.cmd_sn)
            .set_u32(28, self.exp_stat_sn);
        self.send(&p)?;
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let r = self.recv().await?;
                if r.opcode() == OP_LOGOUT_RESP {
                    return Ok::<u8, anyhow::Error>(r.u8(2));
                }
            }
        })
        .await;
        let Session { tx, writer, .. } = self;
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
        match answer {
            Ok(Ok(0)) => Ok(()),
            Ok(Ok(code)) => bail!("logout answered with response {code:#04x}"),
            Ok(Err(e)) => Err(e),
            Err(_) => bail!("no logout response within 5 s"),
        }
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

/// The session parameters from the target's login answers.
fn negotiated(answers: &[(String, String)]) -> Negotiated {
    let get = |k: &str| {
        answers
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let num = |k: &str, default: u32| {
        get(k)
            .and_then(|v| match v.strip_prefix("0x") {
                Some(h) => u32::from_str_radix(h, 16).ok(),
                None => v.parse().ok(),
            })
            .unwrap_or(default)
    };
    let boolean = |k: &str, default: bool| match get(k) {
        Some("Yes") => true,
        Some("No") => false,
        _ => default,
    };
    Negotiated {
        send_data_max: num("MaxRecvDataSegmentLength", 8192),
        first_burst: num("FirstBurstLength", 65_536),
        max_burst: num("MaxBurstLength", 262_144),
        immediate_data: boolean("ImmediateData", true),
        initial_r2t: boolean("InitialR2T", true),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use cairn_target::iscsi::serve::{serve_stream, IscsiOptions};
    use cairn_target::iscsi::{IscsiConfig, Portal, AUTO_PREFIX_DEFAULT};
    use cairn_target::nbd::memory::{MemCatalog, MemExport};
    use tokio::io::{DuplexStream, ReadHalf};
    use tokio::sync::watch;

    use super::*;

    const SIZE: u64 = 8 << 20;

    fn portal() -> Arc<Portal<MemCatalog>> {
        Portal::new(
            MemCatalog {
                exports: vec![MemExport::new("vol", SIZE, false)],
            },
            IscsiConfig {
                auto_prefix: Some(AUTO_PREFIX_DEFAULT.into()),
                ..IscsiConfig::default()
            },
        )
    }

    async fn connect(
        portal: Arc<Portal<MemCatalog>>,
        offer: Offer,
    ) -> (Session<ReadHalf<DuplexStream>>, watch::Sender<bool>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (sr, sw) = tokio::io::split(b);
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(serve_stream(
            portal,
            sr,
            sw,
            IscsiOptions {
                connections_max: 8,
                login_timeout: Duration::from_secs(5),
            },
            stop_rx,
        ));
        let (r, w) = tokio::io::split(a);
        let s = Session::login(r, w, "iqn.2026-12.io.cairn:vol", 0, 1, offer)
            .await
            .unwrap();
        (s, stop)
    }

    fn pattern(len: usize, salt: u8) -> Bytes {
        Bytes::from(
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31) ^ salt ^ (i >> 9) as u8)
                .collect::<Vec<u8>>(),
        )
    }

    async fn round_trip(offer: Offer, salt: u8) {
        let (mut s, _stop) = connect(portal(), offer).await;
        assert_eq!((s.block_size, s.size_bytes()), (512, SIZE));
        for (bs, qd) in [(1u32 << 20, 4u32), (4096, 8)] {
            let data = pattern(bs as usize, salt ^ bs as u8);
            let pass = |write: bool| Job {
                write,
                random: false,
                block_bytes: bs,
                queue_depth: qd,
                duration: None,
                region_bytes: SIZE,
                verify: Some(data.clone()),
                seed: 7,
            };
            let w = s.run(&pass(true)).await.unwrap();
            assert_eq!(w.ios, SIZE / bs as u64);
            assert_eq!(w.bytes, SIZE);
            let r = s.run(&pass(false)).await.unwrap();
            assert_eq!((r.ios, r.bytes), (w.ios, SIZE), "one read pass, verified");
            assert_eq!(r.latencies_ns.len() as u64, r.ios);
        }
        // Time-based random phases.
        for write in [true, false] {
            let job = Job {
                write,
                random: true,
                block_bytes: 4096,
                queue_depth: 16,
                duration: Some(Duration::from_millis(200)),
                region_bytes: SIZE,
                verify: None,
                seed: 9,
            };
            let st = s.run(&job).await.unwrap();
            assert!(st.ios > 0 && st.latencies_ns.len() as u64 == st.ios);
            assert!(st.quantile_ms(0.99) >= st.quantile_ms(0.5));
            assert!(st.elapsed >= Duration::from_millis(200));
        }
        s.logout().await.unwrap();
    }

    #[tokio::test]
    async fn round_trips_with_the_bench_offer() {
        let (s, _stop) = connect(portal(), Offer::default()).await;
        // The in-memory Cairn target agrees to everything the bench offers.
        assert_eq!(
            s.negotiated,
            Negotiated {
                send_data_max: 262_144,
                first_burst: 262_144,
                max_burst: 1 << 20,
                immediate_data: true,
                initial_r2t: false,
            }
        );
        s.logout().await.unwrap();
        round_trip(Offer::default(), 1).await;
    }

    #[tokio::test]
    async fn round_trips_with_small_bursts_unsolicited_data_and_r2t() {
        // 1 MiB writes: 8 KiB immediate, unsolicited Data-Out to 64 KiB,
        // then R2Ts of 128 KiB answered in 8 KiB PDUs.
        let offer = Offer {
            max_recv_data_segment: 8192,
            first_burst: 65_536,
            max_burst: 131_072,
            immediate_data: true,
            initial_r2t: false,
        };
        round_trip(offer, 2).await;
        // No immediate data, every byte solicited.
        let offer = Offer {
            max_recv_data_segment: 16_384,
            first_burst: 65_536,
            max_burst: 262_144,
            immediate_data: false,
            initial_r2t: true,
        };
        round_trip(offer, 3).await;
    }

    #[tokio::test]
    async fn a_missing_target_is_a_clear_error() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (sr, sw) = tokio::io::split(b);
        let (_stop, stop_rx) = watch::channel(false);
        tokio::spawn(serve_stream(
            portal(),
            sr,
            sw,
            IscsiOptions {
                connections_max: 8,
                login_timeout: Duration::from_secs(5),
            },
            stop_rx,
        ));
        let (r, w) = tokio::io::split(a);
        let err = Session::login(r, w, "iqn.2026-12.io.cairn:nope", 0, 1, Offer::default())
            .await
            .err()
            .expect("refused");
        assert!(format!("{err:#}").contains("target not found"), "{err:#}");
    }

    #[test]
    fn quantiles_and_sense() {
        let s = JobStats {
            ios: 100,
            bytes: 0,
            elapsed: Duration::from_secs(1),
            latencies_ns: (1..=100).map(|i| i * 1_000_000).collect(),
        };
        assert_eq!(s.quantile_ms(0.99), 99.0);
        assert_eq!(s.quantile_ms(1.0), 100.0);
        assert_eq!(s.iops(), 100.0);
        let mut sense = vec![0u8, 18, 0x70, 0, 0x05];
        sense.extend([0u8; 9]);
        sense.extend([0x24, 0x00, 0, 0, 0, 0]);
        assert_eq!(sense_text(&sense), "sense key 0x5, ASC/ASCQ 0x24/0x00");
        assert!(sn_le(u32::MAX, 0) && !sn_le(1, 0));
    }
}
