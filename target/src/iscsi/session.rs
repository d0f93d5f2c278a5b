//! The full feature phase of one connection (RFC 7143 sections 3-4 and
//! 11): SCSI commands in CmdSN order, their data (immediate, unsolicited
//! and solicited with R2T), Data-In and SCSI Responses with residuals,
//! NOP keepalive, Text (SendTargets), task management, logout.
//!
//! Three parts run at once: the read loop (this task) parses PDUs and
//! routes them; one task per SCSI command gathers its data, executes it on
//! its LUN and queues its answer; the writer task puts answers on the wire
//! in queue order and stamps StatSN, ExpCmdSN and MaxCmdSN as it sends, so
//! the numbers always rise in the order the initiator reads them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cairn_proto::frame_io::Outbox;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use super::login::Established;
use super::pdu::*;
use super::scsi::{self, Lun, Nexus, Reply};
use super::text::{self, Params, SessionType};
use super::Portal;
use crate::backend::Catalog;

/// Commands one session may have outstanding (the CmdSN window).
pub const QUEUE_DEPTH: u32 = 128;
/// The largest Expected Data Transfer Length taken for a write.
pub const WRITE_MAX: u32 = 32 << 20;
/// Idle time after which the target pings the initiator (NOP-In), and
/// how long it then waits for any PDU before it drops the connection.
pub const NOP_INTERVAL: Duration = Duration::from_secs(10);
pub const NOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Logout,
    Closed,
    Shutdown,
    /// Dropped for a protocol error or an unanswered ping (logged).
    Dropped(String),
}

/// Counters for the closing log line.
#[derive(Default)]
pub struct Counters {
    pub commands: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
}

/// The logical units of a session: LUN number to unit.
pub type Luns<C> = Vec<(
    u64,
    Arc<Lun<<C as Catalog>::Export, <C as Catalog>::Reservations>>,
)>;

/// What a PDU queued for the writer needs stamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stat {
    /// ExpCmdSN and MaxCmdSN only (Data-In without status).
    None,
    /// Also the current StatSN, not advancing it (R2T, unsolicited NOP-In).
    Current,
    /// A status: takes the next StatSN.
    Advance,
}

struct Out {
    pdu: Pdu,
    stat: Stat,
    /// Buffer room a read's data holds until it is on the wire.
    _room: Option<OwnedSemaphorePermit>,
}

/// Command numbering shared by the read loop and the writer.
struct Numbers {
    exp_cmd_sn: AtomicU32,
    /// Commands received and not yet answered.
    outstanding: AtomicU32,
}

impl Numbers {
    /// MaxCmdSN: the window reopens as commands are answered, so the
    /// initiator never has more than QUEUE_DEPTH outstanding; it never
    /// shrinks, as answers only lower `outstanding`.
    fn max_cmd_sn(&self) -> u32 {
        let exp = self.exp_cmd_sn.load(Ordering::Acquire);
        let out = self.outstanding.load(Ordering::Acquire).min(QUEUE_DEPTH);
        exp.wrapping_add(QUEUE_DEPTH - out).wrapping_sub(1)
    }
}

/// Per-command bookkeeping shared with task management.
struct Task {
    lun: u64,
    cmd_sn: u32,
    /// Data-Out PDUs for this command go here.
    data: Option<mpsc::UnboundedSender<Pdu>>,
    /// Still waiting for Data-Out.
    gathering: AtomicBool,
    aborted: AtomicBool,
    done: AtomicBool,
    finished: Notify,
}

struct Shared<C: Catalog> {
    params: Params,
    luns: Luns<C>,
    nexus: Nexus,
    out: mpsc::UnboundedSender<Out>,
    numbers: Numbers,
    tasks: Mutex<HashMap<u32, Arc<Task>>>,
    next_ttt: AtomicU32,
    /// Set by TARGET COLD RESET: the connection closes once its response
    /// is out.
    closing: Notify,
    /// Payload bytes a connection holds at once (write data gathered, read
    /// data not yet sent): a client that stops reading stalls only itself.
    buffers: Arc<Semaphore>,
    counters: Arc<Counters>,
}

impl<C: Catalog> Shared<C> {
    fn send(&self, pdu: Pdu, stat: Stat) {
        let _ = self.out.send(Out {
            pdu,
            stat,
            _room: None,
        });
    }

    fn send_holding(&self, pdu: Pdu, stat: Stat, room: Option<OwnedSemaphorePermit>) {
        let _ = self.out.send(Out {
            pdu,
            stat,
            _room: room,
        });
    }

    fn lun(&self, field: u64) -> Option<&Arc<Lun<C::Export, C::Reservations>>> {
        let n = decode_lun(field)?;
        self.luns.iter().find(|(l, _)| *l == n).map(|(_, u)| u)
    }

    fn lun_numbers(&self) -> Vec<u64> {
        self.luns.iter().map(|(n, _)| *n).collect()
    }
}

/// Decodes a SAM LUN field (peripheral or flat addressing, the two that
/// initiators use for LUNs below 16384).
pub fn decode_lun(field: u64) -> Option<u64> {
    let b = field.to_be_bytes();
    if b[2..].iter().any(|x| *x != 0) {
        return None;
    }
    match b[0] >> 6 {
        0 if b[0] == 0 => Some(b[1] as u64),
        1 => Some((((b[0] & 0x3f) as u64) << 8) | b[1] as u64),
        _ => None,
    }
}

/// Runs the full feature phase until logout, close, shutdown or a protocol
/// error.
#[allow(clippy::too_many_arguments)]
pub async fn run<R, W, C>(
    mut r: R,
    w: W,
    est: Established,
    portal: Arc<Portal<C>>,
    luns: Luns<C>,
    target_port: String,
    address: String,
    mut shutdown: watch::Receiver<bool>,
    counters: Arc<Counters>,
) -> End
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    C: Catalog,
{
    let digests = Digests {
        header: est.params.header_digest,
        data: est.params.data_digest,
    };
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        params: est.params.clone(),
        luns,
        nexus: Nexus {
            initiator: est.initiator_port(),
            target_port,
            relative_port: 1,
        },
        out: out_tx,
        numbers: Numbers {
            exp_cmd_sn: AtomicU32::new(est.exp_cmd_sn),
            outstanding: AtomicU32::new(0),
        },
        tasks: Mutex::new(HashMap::new()),
        next_ttt: AtomicU32::new(1),
        closing: Notify::new(),
        buffers: Arc::new(Semaphore::new((2 * WRITE_MAX) as usize)),
        counters,
    });
    let task_set: Weak<dyn scsi::TaskSet> = Arc::downgrade(&shared) as Weak<dyn scsi::TaskSet>;
    for (n, lun) in &shared.luns {
        lun.attach(&shared.nexus, *n, task_set.clone());
    }
    let writer = tokio::spawn(writer(w, out_rx, digests, est.stat_sn, shared.clone()));
    let mut text_pending: Option<TextReply> = None;
    let mut last_heard = tokio::time::Instant::now();
    let mut pinged = false;
    // Made once and polled across PDUs: made anew for every PDU, these waits
    // registered and dropped a waiter (under a mutex) each time, and the
    // keepalive timer was inserted into and taken out of the timer wheel.
    // The timer now stays armed and is moved on only when it fires early.
    // It owns a handle on the session, so it is dropped before the writer
    // is awaited (which ends once the last handle is gone).
    let watched = shared.clone();
    let mut ended = Box::pin(async move {
        tokio::select! {
            _ = crate::server::stopped(&mut shutdown) => End::Shutdown,
            _ = watched.closing.notified() => End::Dropped("TARGET COLD RESET".into()),
        }
    });
    let keepalive = tokio::time::sleep_until(last_heard + NOP_INTERVAL);
    tokio::pin!(keepalive);
    let end = 'session: loop {
        // The read is not cancel-safe (it may have taken part of a PDU), so
        // it lives until it completes: the keepalive wakes beside it.
        let read = read_pdu(&mut r, digests, est.params.recv_data_max);
        tokio::pin!(read);
        let pdu = loop {
            tokio::select! {
                p = &mut read => break p,
                end = &mut ended => break 'session end,
                _ = &mut keepalive => {
                    let idle = if pinged { NOP_TIMEOUT } else { NOP_INTERVAL };
                    let due = last_heard + idle;
                    if tokio::time::Instant::now() < due {
                        // Heard from the initiator since the timer was set.
                        keepalive.as_mut().reset(due);
                        continue;
                    }
                    if pinged {
                        break 'session End::Dropped(format!("no answer to a NOP-In ping within {NOP_TIMEOUT:?}"));
                    }
                    pinged = true;
                    let mut p = Pdu::new(OP_NOP_IN);
                    p.bhs[1] = FINAL;
                    p.set_u32(16, NO_TAG).set_u32(20, 1);
                    shared.send(p, Stat::Current);
                    last_heard = tokio::time::Instant::now();
                    keepalive.as_mut().reset(last_heard + NOP_TIMEOUT);
                }
            }
        };
        let pdu = match pdu {
            Ok(p) => p,
            Err(PduError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break End::Closed
            }
            Err(PduError::Io(e)) => break End::Dropped(format!("reading: {e}")),
            Err(PduError::DataDigest { pdu, .. }) if pdu.opcode() == OP_SCSI_CMD => {
                // The header is sound: reject the PDU (section 7.8) and
                // carry on; the command is not executed.
                shared.counters.errors.fetch_add(1, Ordering::Relaxed);
                warn!("data digest error on a SCSI command: rejected");
                reject(&shared, &pdu.bhs, REJECT_DIGEST);
                continue;
            }
            Err(e) => break End::Dropped(e.to_string()),
        };
        last_heard = tokio::time::Instant::now();
        if pinged {
            // The timer waits for the ping's timeout; the next ping is
            // due an interval from now, sooner.
            keepalive.as_mut().reset(last_heard + NOP_INTERVAL);
            pinged = false;
        }
        match pdu.opcode() {
            OP_SCSI_CMD => {
                if let Err(why) = command(&shared, pdu) {
                    break End::Dropped(why);
                }
            }
            OP_DATA_OUT => {
                let itt = pdu.itt();
                let tx = lock(&shared.tasks).get(&itt).and_then(|t| t.data.clone());
                match tx {
                    Some(tx) => {
                        let _ = tx.send(pdu);
                    }
                    None => {
                        // Data for a task that is gone (aborted): ignored,
                        // as section 11.7.4 allows for aborted tasks.
                        debug!(itt, "Data-Out for no waiting task: dropped");
                    }
                }
            }
            OP_NOP_OUT => {
                if !pdu.immediate() && !check_cmd_sn(&shared, pdu.cmd_sn()) {
                    continue;
                }
                if pdu.itt() != NO_TAG {
                    let mut p = Pdu::new(OP_NOP_IN);
                    p.bhs[1] = FINAL;
                    p.set_u64(8, pdu.lun_field())
                        .set_u32(16, pdu.itt())
                        .set_u32(20, NO_TAG);
                    p.data = pdu.data.clone();
                    shared.send(p, Stat::Advance);
                }
                // Else it answers our ping: hearing it was the point.
            }
            OP_TEXT_REQ => {
                if !pdu.immediate() && !check_cmd_sn(&shared, pdu.cmd_sn()) {
                    continue;
                }
                match text_request(&shared, &portal, &est, &address, pdu, &mut text_pending).await {
                    Ok(()) => {}
                    Err(why) => break End::Dropped(why),
                }
            }
            OP_TASK_MGMT_REQ => {
                if !pdu.immediate() && !check_cmd_sn(&shared, pdu.cmd_sn()) {
                    continue;
                }
                task_management(&shared, pdu);
            }
            OP_LOGOUT_REQ => {
                if !pdu.immediate() && !check_cmd_sn(&shared, pdu.cmd_sn()) {
                    continue;
                }
                // Answer once every command in flight has answered; one
                // still waiting for data cannot get it now (this loop reads
                // it) and ends unanswered.
                abort_tasks(&shared, |t| t.gathering.load(Ordering::Acquire));
                wait_all(&shared).await;
                let mut p = Pdu::new(OP_LOGOUT_RESP);
                p.bhs[1] = FINAL;
                let reason = pdu.flags() & 0x7f;
                // 0 close session, 1 close connection: both end this
                // connection (one per session). 2 (recovery) needs ERL 2.
                p.bhs[2] = if reason <= 1 { 0 } else { 2 };
                p.set_u32(16, pdu.itt());
                shared.send(p, Stat::Advance);
                if reason <= 1 {
                    break End::Logout;
                }
            }
            OP_SNACK => reject(&shared, &pdu.bhs, REJECT_PROTOCOL),
            OP_LOGIN_REQ => {
                reject(&shared, &pdu.bhs, REJECT_PROTOCOL);
                break End::Dropped("a Login Request in the full feature phase".into());
            }
            op => {
                warn!(opcode = op, "unknown opcode: rejected");
                reject(&shared, &pdu.bhs, REJECT_NOT_SUPPORTED);
            }
        }
    };
    // Commands in flight finish and their answers go out, unless the
    // connection itself is broken; commands still waiting for data can no
    // longer get it and end unanswered.
    let broken = matches!(end, End::Dropped(_) | End::Closed);
    abort_tasks(&shared, |t| broken || t.gathering.load(Ordering::Acquire));
    wait_all(&shared).await;
    // The I_T nexus ends with the session: its RESERVE(6) reservation and
    // unit attentions go (persistent reservations stay).
    for (_, lun) in &shared.luns {
        lun.detach(&task_set);
        lun.nexus_lost(&shared.nexus);
    }
    drop(ended);
    drop(shared);
    let _ = writer.await;
    end
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks the tasks `which` picks aborted and wakes those waiting for data
/// (they end unanswered); executing ones finish and stay unanswered.
fn abort_tasks<C: Catalog>(shared: &Shared<C>, which: impl Fn(&Task) -> bool) {
    let tasks: Vec<Arc<Task>> = lock(&shared.tasks).values().cloned().collect();
    for t in tasks.iter().filter(|t| which(t)) {
        mark_aborted(t);
    }
}

/// Marks `t` aborted; one waiting for data is woken to see it.
fn mark_aborted(t: &Task) {
    t.aborted.store(true, Ordering::Release);
    if let Some(tx) = &t.data {
        let _ = tx.send(Pdu::new(OP_DATA_OUT));
    }
}

async fn wait_all<C: Catalog>(shared: &Shared<C>) {
    loop {
        let pending: Vec<Arc<Task>> = lock(&shared.tasks).values().cloned().collect();
        let Some(t) = pending
            .into_iter()
            .find(|t| !t.done.load(Ordering::Acquire))
        else {
            return;
        };
        let n = t.finished.notified();
        if t.done.load(Ordering::Acquire) {
            continue;
        }
        n.await;
    }
}

/// In-window check for a non-immediate command (section 4.2.2.1): the
/// expected one advances the window; anything else is silently ignored.
fn check_cmd_sn<C: Catalog>(shared: &Shared<C>, cmd_sn: u32) -> bool {
    let exp = shared.numbers.exp_cmd_sn.load(Ordering::Acquire);
    if cmd_sn != exp {
        debug!(cmd_sn, exp, "CmdSN outside the window: ignored");
        return false;
    }
    shared
        .numbers
        .exp_cmd_sn
        .store(exp.wrapping_add(1), Ordering::Release);
    true
}

fn reject<C: Catalog>(shared: &Shared<C>, bhs: &[u8; BHS_LEN], reason: u8) {
    let mut p = Pdu::new(OP_REJECT);
    p.bhs[1] = FINAL;
    p.bhs[2] = reason;
    p.set_u32(16, NO_TAG);
    p.data = Bytes::copy_from_slice(bhs);
    shared.send(p, Stat::Advance);
}

/// A SCSI Command PDU: numbered, then handed to its own task.
fn command<C: Catalog>(shared: &Arc<Shared<C>>, pdu: Pdu) -> Result<(), String> {
    let itt = pdu.itt();
    let cmd_sn = pdu.cmd_sn();
    if !pdu.immediate() && !check_cmd_sn(shared, cmd_sn) {
        return Ok(());
    }
    if lock(&shared.tasks).contains_key(&itt) {
        reject(shared, &pdu.bhs, REJECT_TASK_IN_PROGRESS);
        return Ok(());
    }
    let flags = pdu.flags();
    let write = flags & 0x20 != 0;
    let edtl = pdu.u32(20);
    if pdu.data.len() as u32 > edtl || (!write && !pdu.data.is_empty()) {
        return Err(format!(
            "command {itt:#x} carries {} bytes of immediate data for {edtl} expected",
            pdu.data.len()
        ));
    }
    if !pdu.data.is_empty() && !shared.params.immediate_data {
        return Err("immediate data sent though ImmediateData=No".into());
    }
    if pdu.data.len() as u32 > shared.params.first_burst {
        return Err("immediate data over FirstBurstLength".into());
    }
    // Data-Out may follow: open its channel before anything can arrive.
    let wants_data = write && edtl > pdu.data.len() as u32;
    let (tx, rx) = if wants_data {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let task = Arc::new(Task {
        lun: decode_lun(pdu.lun_field()).unwrap_or(u64::MAX),
        cmd_sn,
        gathering: AtomicBool::new(wants_data),
        data: tx,
        aborted: AtomicBool::new(false),
        done: AtomicBool::new(false),
        finished: Notify::new(),
    });
    lock(&shared.tasks).insert(itt, task.clone());
    shared.numbers.outstanding.fetch_add(1, Ordering::AcqRel);
    shared.counters.commands.fetch_add(1, Ordering::Relaxed);
    let shared = shared.clone();
    tokio::spawn(async move {
        run_command(&shared, &task, pdu, rx).await;
        lock(&shared.tasks).remove(&itt);
        task.done.store(true, Ordering::Release);
        task.finished.notify_waiters();
    });
    Ok(())
}

/// The R2T bookkeeping of one solicited burst.
struct Burst {
    ttt: u32,
    offset: u32,
    len: u32,
    got: u32,
    data_sn: u32,
}

/// A Data-Out that broke the rules of its command's data: the PDU is
/// rejected and the command aborted with `sense`; the connection goes on
/// (dropping it would make the initiator reconnect and retry for nothing).
struct DataError {
    why: String,
    sense: scsi::sense::Sense,
    bhs: Box<[u8; BHS_LEN]>,
}

/// Gathers a write's data (section 4.3.4 and 11.7): immediate data, then
/// unsolicited Data-Out up to FirstBurstLength (InitialR2T=No), then R2T
/// bursts of at most MaxBurstLength, MaxOutstandingR2T at a time. DataSN
/// and offsets must follow each other.
async fn gather<C: Catalog>(
    shared: &Shared<C>,
    task: &Task,
    cmd: &Pdu,
    rx: &mut mpsc::UnboundedReceiver<Pdu>,
) -> Result<Option<Bytes>, DataError> {
    use scsi::sense::{DATA_PHASE_ERROR, NOT_ENOUGH_UNSOLICITED_DATA, UNEXPECTED_UNSOLICITED_DATA};
    let edtl = cmd.u32(20);
    let p = &shared.params;
    let immediate = cmd.data.len() as u32;
    let unsolicited_end = if p.initial_r2t {
        immediate
    } else {
        edtl.min(p.first_burst).max(immediate)
    };
    if immediate == edtl {
        // All of it came with the command: no copy.
        return Ok(Some(cmd.data.clone()));
    }
    let mut buf = Assembly::new(edtl as usize, &cmd.data);
    let mut got = immediate;
    let mut unsol_next = immediate;
    let mut unsol_sn = 0u32;
    let mut unsol_open = unsolicited_end > immediate;
    let mut next_solicit = unsolicited_end;
    let mut r2t_sn = 0u32;
    let mut bursts: VecDeque<Burst> = VecDeque::new();
    while got < edtl {
        while (bursts.len() as u32) < p.max_outstanding_r2t && next_solicit < edtl {
            let len = (edtl - next_solicit).min(p.max_burst);
            let ttt = shared.next_ttt.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
            let mut r = Pdu::new(OP_R2T);
            r.bhs[1] = FINAL;
            r.set_u64(8, cmd.lun_field())
                .set_u32(16, cmd.itt())
                .set_u32(20, ttt)
                .set_u32(36, r2t_sn)
                .set_u32(40, next_solicit)
                .set_u32(44, len);
            shared.send(r, Stat::Current);
            bursts.push_back(Burst {
                ttt,
                offset: next_solicit,
                len,
                got: 0,
                data_sn: 0,
            });
            r2t_sn += 1;
            next_solicit += len;
        }
        let Some(d) = rx.recv().await else {
            return Ok(None); // the connection is closing
        };
        if task.aborted.load(Ordering::Acquire) {
            return Ok(None);
        }
        let offset = d.u32(40);
        let len = d.data.len() as u32;
        let data_sn = d.u32(36);
        let ttt = d.u32(20);
        let last = d.final_bit();
        let fail = |why: String, sense| DataError {
            why,
            sense,
            bhs: Box::new(d.bhs),
        };
        let (expect_offset, expect_sn, room) = if ttt == NO_TAG {
            if !unsol_open {
                return Err(fail(
                    format!(
                        "unsolicited Data-Out for task {:#x} after its first burst",
                        cmd.itt()
                    ),
                    UNEXPECTED_UNSOLICITED_DATA,
                ));
            }
            (unsol_next, unsol_sn, unsolicited_end - unsol_next)
        } else {
            let Some(b) = bursts.iter().find(|b| b.ttt == ttt) else {
                return Err(fail(
                    format!("Data-Out with unknown target transfer tag {ttt:#x}"),
                    DATA_PHASE_ERROR,
                ));
            };
            (b.offset + b.got, b.data_sn, b.len - b.got)
        };
        if data_sn != expect_sn {
            return Err(fail(
                format!(
                    "Data-Out DataSN {data_sn}, expected {expect_sn} (task {:#x})",
                    cmd.itt()
                ),
                DATA_PHASE_ERROR,
            ));
        }
        if offset != expect_offset || len > room {
            return Err(fail(
                format!(
                    "Data-Out at offset {offset} length {len}, expected offset {expect_offset} \
                     with {room} bytes left in the burst (task {:#x})",
                    cmd.itt()
                ),
                DATA_PHASE_ERROR,
            ));
        }
        buf.put(offset as usize, &d.data);
        got += len;
        if ttt == NO_TAG {
            unsol_next += len;
            unsol_sn += 1;
            if last {
                if unsol_next != unsolicited_end {
                    return Err(DataError {
                        why: "the unsolicited burst ended short of FirstBurstLength".into(),
                        sense: NOT_ENOUGH_UNSOLICITED_DATA,
                        bhs: Box::new(d.bhs),
                    });
                }
                unsol_open = false;
            }
        } else {
            let i = bursts.iter().position(|b| b.ttt == ttt).unwrap_or(0);
            let b = &mut bursts[i];
            b.got += len;
            b.data_sn += 1;
            if last {
                if b.got != b.len {
                    return Err(DataError {
                        why: "a solicited burst ended before its R2T's length".into(),
                        sense: DATA_PHASE_ERROR,
                        bhs: Box::new(d.bhs),
                    });
                }
                bursts.remove(i);
            }
        }
    }
    Ok(Some(buf.finish()))
}

/// A write's data as its segments arrive. They normally come in offset
/// order and are appended, so the buffer is never zeroed first (zeroing
/// and copying were a quarter of the target's CPU at 1 MiB iSCSI writes).
/// A segment out of order (several R2Ts outstanding) turns it into a
/// zero-filled buffer of the whole length, written in place from then on.
/// [`gather`] checks that segments neither overlap nor leave gaps.
struct Assembly {
    buf: BytesMut,
    len: usize,
}

impl Assembly {
    fn new(len: usize, first: &[u8]) -> Assembly {
        let mut buf = BytesMut::with_capacity(len);
        buf.extend_from_slice(first);
        Assembly { buf, len }
    }

    fn put(&mut self, offset: usize, data: &[u8]) {
        if offset == self.buf.len() {
            self.buf.extend_from_slice(data);
        } else {
            self.buf.resize(self.len, 0);
            self.buf[offset..offset + data.len()].copy_from_slice(data);
        }
    }

    /// The data; whole once every byte has arrived.
    fn finish(mut self) -> Bytes {
        self.buf.resize(self.len, 0);
        self.buf.freeze()
    }
}

async fn run_command<C: Catalog>(
    shared: &Shared<C>,
    task: &Task,
    cmd: Pdu,
    rx: Option<mpsc::UnboundedReceiver<Pdu>>,
) {
    let edtl = cmd.u32(20);
    let read = cmd.flags() & 0x40 != 0;
    let write = cmd.flags() & 0x20 != 0;
    // Extended CDBs (AHS type 1) are not taken: every command Cairn
    // serves fits in 16 bytes.
    let mut cdb = [0u8; 16];
    cdb.copy_from_slice(&cmd.bhs[32..48]);

    // A read's data counts against the connection's buffer room until it is
    // on the wire (its permit rides with the last PDU to the writer).
    let room = if read && edtl > 0 {
        Some(
            shared
                .buffers
                .clone()
                .acquire_many_owned(edtl.min(WRITE_MAX))
                .await
                .expect("the buffer semaphore is never closed"),
        )
    } else {
        None
    };
    let reply = if write && edtl > WRITE_MAX {
        // Refused before any data is solicited; unsolicited data that
        // still arrives finds no channel and is dropped.
        Reply::check_condition(scsi::sense::INVALID_FIELD_IN_CDB)
    } else {
        let data_out = match rx {
            Some(mut rx) => {
                let permit = shared
                    .buffers
                    .acquire_many(edtl)
                    .await
                    .expect("the buffer semaphore is never closed");
                let r = gather(shared, task, &cmd, &mut rx).await;
                task.gathering.store(false, Ordering::Release);
                drop(permit);
                match r {
                    Ok(Some(d)) => d,
                    Ok(None) => {
                        finish(shared);
                        return;
                    }
                    Err(e) => {
                        warn!("{}: command aborted", e.why);
                        reject(shared, &e.bhs, REJECT_PROTOCOL);
                        let reply = Reply::check_condition(e.sense);
                        if !task.aborted.load(Ordering::Acquire) {
                            respond(shared, &cmd, reply, read, write, room);
                        } else {
                            finish(shared);
                        }
                        return;
                    }
                }
            }
            None => cmd.data.clone(),
        };
        let request = |data_out| scsi::Request {
            cdb: &cdb,
            data_out,
            expected_len: edtl,
            read,
            write,
            nexus: &shared.nexus,
        };
        match shared.lun(cmd.lun_field()) {
            // REPORT LUNS answers for the whole target, from any LUN.
            Some(_) if cdb[0] == 0xa0 => scsi::report_luns(&cdb, &shared.lun_numbers()),
            Some(lun) => {
                // An initiator that sends more than the CDB writes has the
                // excess ignored (overflow residual); one that sends less
                // has the blocks it sent written (SAM-5 5.4.3, libiscsi's
                // residual tests), the LUN deciding what a short transfer
                // means for its command.
                let wanted = Lun::<C::Export, C::Reservations>::data_out_len(&cdb).unwrap_or(0);
                let data_out = if write && (data_out.len() as u32) > wanted {
                    data_out.slice(..wanted as usize)
                } else {
                    data_out
                };
                lun.execute(request(data_out)).await
            }
            _ => {
                if cdb[0] == 0xa0 {
                    scsi::report_luns(&cdb, &shared.lun_numbers())
                } else {
                    scsi::no_such_lun(request(data_out), &shared.lun_numbers())
                }
            }
        }
    };
    if task.aborted.load(Ordering::Acquire) {
        // An aborted task gets no response (section 11.5.1).
        finish(shared);
        return;
    }
    respond(shared, &cmd, reply, read, write, room);
}

/// One command answered: the window reopens by one.
fn finish<C: Catalog>(shared: &Shared<C>) {
    shared.numbers.outstanding.fetch_sub(1, Ordering::AcqRel);
}

/// Sends a command's Data-In and status with residuals (section 11.4.5).
fn respond<C: Catalog>(
    shared: &Shared<C>,
    cmd: &Pdu,
    reply: Reply,
    read: bool,
    write: bool,
    mut room: Option<OwnedSemaphorePermit>,
) {
    let edtl = cmd.u32(20);
    let produced = reply.data_in.len() as u32;
    // Residual: for reads what the command produced against what the
    // initiator expected; for writes what the CDB wanted.
    let (flag, residual) = {
        let actual = if read {
            produced
        } else if write {
            reply.data_out_wanted
        } else {
            produced.max(reply.data_out_wanted)
        };
        let expected = if read || write { edtl } else { 0 };
        if actual > expected {
            (0x04u8, actual - expected) // overflow
        } else if actual < expected {
            (0x02u8, expected - actual) // underflow
        } else {
            (0, 0)
        }
    };
    let data = if read {
        reply.data_in.slice(..(produced.min(edtl) as usize))
    } else {
        Bytes::new()
    };
    if read {
        shared
            .counters
            .bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
    } else if write && reply.status == 0 {
        shared
            .counters
            .bytes_written
            .fetch_add(edtl as u64, Ordering::Relaxed);
    }
    if reply.status != 0 {
        shared.counters.errors.fetch_add(1, Ordering::Relaxed);
    }
    let collapse = reply.status == 0 && reply.sense.is_none() && !data.is_empty();
    let seg = shared.params.send_data_max.max(512) as usize;
    let burst = shared.params.max_burst.max(512) as usize;
    let mut data_sn = 0u32;
    let mut at = 0usize;
    while at < data.len() {
        let n = seg.min(data.len() - at).min(burst - at % burst);
        let last = at + n == data.len();
        let mut p = Pdu::new(OP_DATA_IN);
        let mut f = 0u8;
        if last || (at + n).is_multiple_of(burst) {
            f |= FINAL;
        }
        if last && collapse {
            f |= 0x01 | flag;
            p.bhs[3] = reply.status;
            p.set_u32(44, residual);
        }
        p.bhs[1] = f;
        p.set_u64(8, cmd.lun_field())
            .set_u32(16, cmd.itt())
            .set_u32(20, NO_TAG)
            .set_u32(36, data_sn)
            .set_u32(40, at as u32);
        p.data = data.slice(at..at + n);
        // Counting the answer before it is queued keeps MaxCmdSN true.
        if last && collapse {
            finish(shared);
        }
        let stat = if last && collapse {
            Stat::Advance
        } else {
            Stat::None
        };
        shared.send_holding(p, stat, if last { room.take() } else { None });
        data_sn += 1;
        at += n;
    }
    if collapse {
        return;
    }
    let mut p = Pdu::new(OP_SCSI_RESP);
    p.bhs[1] = FINAL | flag;
    p.bhs[2] = 0; // command completed at target
    p.bhs[3] = reply.status;
    p.set_u32(16, cmd.itt())
        .set_u32(36, data_sn)
        .set_u32(44, residual);
    if let Some(sense) = &reply.sense {
        let mut d = Vec::with_capacity(2 + sense.len());
        d.extend_from_slice(&(sense.len() as u16).to_be_bytes());
        d.extend_from_slice(sense);
        p.data = Bytes::from(d);
    }
    finish(shared);
    shared.send_holding(p, Stat::Advance, room);
}

/// Task management (section 11.5). Functions answered once the tasks
/// they abort have stopped, so nothing they would have written lands
/// after the response.
fn task_management<C: Catalog>(shared: &Arc<Shared<C>>, pdu: Pdu) {
    let function = pdu.flags() & 0x7f;
    let shared = shared.clone();
    tokio::spawn(async move {
        // 0 function complete, 1 task does not exist, 2 LUN does not
        // exist, 5 function not supported.
        let response: u8 = match function {
            // ABORT TASK
            1 => {
                let referenced = pdu.u32(20);
                let t = lock(&shared.tasks).get(&referenced).cloned();
                match t {
                    Some(t) => {
                        abort(&t).await;
                        0
                    }
                    // Already answered: it does not exist (RFC 7143
                    // 11.6.1). One not received yet, inside the window,
                    // is considered received and aborted (11.5.1).
                    None => {
                        let ref_cmd_sn = pdu.u32(32);
                        let exp = shared.numbers.exp_cmd_sn.load(Ordering::Acquire);
                        let ahead = ref_cmd_sn.wrapping_sub(exp);
                        if ahead < QUEUE_DEPTH && ref_cmd_sn != pdu.cmd_sn() {
                            0
                        } else {
                            1
                        }
                    }
                }
            }
            // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET
            2 | 3 | 5 => match decode_lun(pdu.lun_field()) {
                Some(n) if shared.luns.iter().any(|(l, _)| *l == n) => {
                    let tasks: Vec<Arc<Task>> = lock(&shared.tasks)
                        .values()
                        .filter(|t| t.lun == n && t.cmd_sn != pdu.cmd_sn())
                        .cloned()
                        .collect();
                    for t in &tasks {
                        abort(t).await;
                    }
                    if function == 5 {
                        if let Some(lun) = shared.lun(pdu.lun_field()) {
                            // A reset reaches every nexus's tasks (SAM-5
                            // 6.3.3), other sessions' included.
                            lun.abort_other_nexuses(&shared.nexus).await;
                            lun.reset(&shared.nexus);
                        }
                    }
                    0
                }
                _ => 2,
            },
            // TARGET WARM RESET: every task on every LUN of the target,
            // other sessions' too; TARGET COLD RESET also ends the
            // connection (section 11.5.1; the initiator logs in again).
            6 | 7 => {
                let tasks: Vec<Arc<Task>> = lock(&shared.tasks)
                    .values()
                    .filter(|t| t.cmd_sn != pdu.cmd_sn())
                    .cloned()
                    .collect();
                for t in &tasks {
                    abort(t).await;
                }
                for (_, lun) in &shared.luns {
                    lun.abort_other_nexuses(&shared.nexus).await;
                    lun.reset(&shared.nexus);
                }
                0
            }
            _ => 5,
        };
        info!(function, response, "task management");
        let mut p = Pdu::new(OP_TASK_MGMT_RESP);
        p.bhs[1] = FINAL;
        p.bhs[2] = response;
        p.set_u32(16, pdu.itt());
        shared.send(p, Stat::Advance);
        if function == 7 {
            shared.closing.notify_one();
        }
    });
}

impl<C: Catalog> scsi::TaskSet for Shared<C> {
    fn abort_lun_tasks(
        &self,
        lun: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let tasks: Vec<Arc<Task>> = lock(&self.tasks)
                .values()
                .filter(|t| t.lun == lun)
                .cloned()
                .collect();
            if !tasks.is_empty() {
                info!(lun, tasks = tasks.len(), "tasks aborted by another nexus");
            }
            for t in &tasks {
                abort(t).await;
            }
        })
    }
}

/// Marks `t` aborted and waits until it has stopped.
async fn abort(t: &Task) {
    mark_aborted(t);
    loop {
        let n = t.finished.notified();
        if t.done.load(Ordering::Acquire) {
            return;
        }
        n.await;
    }
}

/// A Text response too long for one PDU, sent in parts (section 11.10).
struct TextReply {
    ttt: u32,
    rest: Bytes,
}

async fn text_request<C: Catalog>(
    shared: &Shared<C>,
    portal: &Portal<C>,
    est: &Established,
    address: &str,
    pdu: Pdu,
    pending: &mut Option<TextReply>,
) -> Result<(), String> {
    let ttt = pdu.u32(20);
    let body = if ttt != NO_TAG {
        match pending.take() {
            Some(p) if p.ttt == ttt => p.rest,
            _ => {
                reject(shared, &pdu.bhs, REJECT_INVALID_FIELD);
                return Ok(());
            }
        }
    } else {
        if pdu.flags() & CONTINUE != 0 {
            // Multi-PDU text requests are not needed for the keys this
            // target answers in the full feature phase.
            reject(shared, &pdu.bhs, REJECT_NOT_SUPPORTED);
            return Ok(());
        }
        let keys = text::parse(&pdu.data).map_err(|e| format!("Text request: {e}"))?;
        let mut answers = Vec::new();
        for (k, v) in keys {
            if k == "SendTargets" {
                let target = est.target.as_ref().map(|t| t.iqn.as_str());
                match super::send_targets(portal, &v, target, &est.initiator, address).await {
                    Ok(a) => answers.extend(a),
                    Err(e) => {
                        warn!("SendTargets: {e}");
                        answers.push(("SendTargets".into(), "Reject".into()));
                    }
                }
            } else if text::is_login_key(&k) {
                answers.push((k, "Reject".into()));
            } else {
                let mut params = shared.params.clone();
                let session = if est.session_type == SessionType::Discovery {
                    SessionType::Discovery
                } else {
                    SessionType::Normal
                };
                // Renegotiation in the full feature phase is not
                // supported: the answer says so without changing anything.
                match text::negotiate(&k, &v, &mut params, session) {
                    Some((k, v)) if v == "NotUnderstood" || v == "Irrelevant" => {
                        answers.push((k, v))
                    }
                    Some((k, _)) => answers.push((k, "Reject".into())),
                    None => {}
                }
            }
        }
        Bytes::from(text::encode(&answers))
    };
    let max = shared.params.send_data_max as usize;
    let mut p = Pdu::new(OP_TEXT_RESP);
    p.set_u32(16, pdu.itt());
    if body.len() > max {
        let next = shared.next_ttt.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
        p.bhs[1] = CONTINUE;
        p.set_u32(20, next);
        p.data = body.slice(..max);
        *pending = Some(TextReply {
            ttt: next,
            rest: body.slice(max..),
        });
    } else {
        p.bhs[1] = FINAL;
        p.set_u32(20, NO_TAG);
        p.data = body;
    }
    shared.send(p, Stat::Advance);
    Ok(())
}

/// Bytes of PDUs the writer gathers into one send at most.
const WRITE_BATCH_BYTES: usize = 256 << 10;

/// Puts queued PDUs on the wire, stamping the numbers at send time.
async fn writer<W: AsyncWrite + Unpin, C: Catalog>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
    digests: Digests,
    stat_sn: u32,
    shared: Arc<Shared<C>>,
) {
    // A large read's Data-In goes to the kernel by reference (`Outbox`), not
    // copied into a write buffer (the copy was 12% of the target's CPU at
    // 1 MiB reads).
    let mut buf = Outbox::new();
    let mut stamp = Stamp {
        stat_sn,
        digests,
        shared: Arc::downgrade(&shared),
    };
    drop(shared);
    while let Some(first) = rx.recv().await {
        stamp.encode(first, &mut buf);
        stamp.encode_queued(&mut rx, &mut buf);
        // While other commands run, let the tasks about to queue their
        // responses run once before sending: one send for several
        // responses costs the kernel far less than one send each (see
        // the NBD reply writer). With none outstanding (a command is
        // counted out before its response is queued) nothing would
        // join, and a yield would only delay a QD1 response.
        if buf.len() < WRITE_BATCH_BYTES && stamp.others_running() {
            tokio::task::yield_now().await;
            stamp.encode_queued(&mut rx, &mut buf);
        }
        if buf.write_to(&mut w).await.is_err() {
            return;
        }
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

/// The writer's numbering: the StatSN it hands out, and the session whose
/// command window every PDU carries (weak, so the writer never keeps it).
struct Stamp<C: Catalog> {
    stat_sn: u32,
    digests: Digests,
    shared: Weak<Shared<C>>,
}

impl<C: Catalog> Stamp<C> {
    /// Stamps `o`'s numbers and encodes it at the end of `buf`.
    fn encode(&mut self, mut o: Out, buf: &mut Outbox) {
        if o.stat != Stat::None {
            o.pdu.set_u32(24, self.stat_sn);
        }
        if o.stat == Stat::Advance {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        if let Some(s) = self.shared.upgrade() {
            o.pdu
                .set_u32(28, s.numbers.exp_cmd_sn.load(Ordering::Acquire))
                .set_u32(32, s.numbers.max_cmd_sn());
        }
        encode_out(&o.pdu, self.digests, buf);
    }

    /// Encodes what is queued, until `buf` holds [`WRITE_BATCH_BYTES`].
    fn encode_queued(&mut self, rx: &mut mpsc::UnboundedReceiver<Out>, buf: &mut Outbox) {
        while buf.len() < WRITE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(o) => self.encode(o, buf),
                Err(_) => break,
            }
        }
    }

    /// Commands of the session are still running.
    fn others_running(&self) -> bool {
        self.shared
            .upgrade()
            .is_some_and(|s| s.numbers.outstanding.load(Ordering::Acquire) > 0)
    }
}

#[cfg(test)]
mod assembly_tests {
    use super::Assembly;

    /// Segments of 1..=7 bytes covering `len` bytes, each byte its offset.
    fn segments(len: usize) -> Vec<(usize, Vec<u8>)> {
        let (mut out, mut at) = (Vec::new(), 0);
        while at < len {
            let n = (at % 7 + 1).min(len - at);
            out.push((at, (at..at + n).map(|b| b as u8).collect()));
            at += n;
        }
        out
    }

    #[test]
    fn segments_in_order_and_out_of_order_give_the_same_data() {
        let len = 200;
        let want: Vec<u8> = (0..len).map(|b| b as u8).collect();
        let segs = segments(len);
        // In order, the first segment as immediate data.
        let mut a = Assembly::new(len, &segs[0].1);
        for (offset, data) in &segs[1..] {
            a.put(*offset, data);
        }
        assert_eq!(&a.finish()[..], &want[..]);
        // Out of order: every rotation of the order after the first.
        for r in 1..segs.len() {
            let mut a = Assembly::new(len, &segs[0].1);
            let mut rest = segs[1..].to_vec();
            rest.rotate_left(r - 1);
            for (offset, data) in &rest {
                a.put(*offset, data);
            }
            assert_eq!(&a.finish()[..], &want[..], "rotation {r}");
        }
        // Nothing immediate, last segment first.
        let mut a = Assembly::new(len, &[]);
        for (offset, data) in segs.iter().rev() {
            a.put(*offset, data);
        }
        assert_eq!(&a.finish()[..], &want[..]);
    }
}
