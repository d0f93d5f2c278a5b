//! SCSI commands on a logical unit (SBC-3 block commands, SPC-4 primary
//! commands), with no iSCSI in it: the session hands over a CDB and the
//! Data-Out it gathered ([`Request`]) and gets back status, sense and
//! Data-In ([`Reply`]). No input can make it panic: every length and
//! field is checked (the fuzzer drives [`Lun::execute`] with random CDBs).
//!
//! - [`sense`]: sense keys and codes, fixed-format sense data;
//! - `cdb`: field readers, the supported commands and their usage masks;
//! - `info`: INQUIRY and VPD pages, MODE SENSE/SELECT, READ CAPACITY,
//!   REPORT LUNS, REPORT SUPPORTED OPERATION CODES;
//! - `block`: reads, writes, verify, WRITE SAME, UNMAP, COMPARE AND
//!   WRITE, ORWRITE, GET LBA STATUS;
//! - `sanitize`: SANITIZE, run in the background, and the state of the
//!   medium it leaves (in progress, failed);
//! - `copy`: EXTENDED COPY (LID1) within the logical unit and RECEIVE
//!   COPY RESULTS;
//! - [`pr`]: persistent reservations as a pure state machine with a
//!   storage seam ([`pr::PrStore`]).
//!
//! Here: the logical unit, unit attentions, SPC-2 RESERVE/RELEASE and the
//! reservation conflict checks every command passes.

mod block;
pub(crate) use block::first_difference;
mod cdb;
mod copy;
mod info;
pub mod pr;
mod sanitize;
pub mod sense;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use md5::{Digest, Md5};

use crate::backend::Backend;
use cdb::Cdb;
use pr::{Access, MemPrStore, PrError, PrState, PrStore};
pub use sense::Sense;

/// Status codes (SAM-5 table 33).
pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;
pub const CONDITION_MET: u8 = 0x04;
pub const BUSY: u8 = 0x08;
pub const RESERVATION_CONFLICT: u8 = 0x18;
pub const TASK_SET_FULL: u8 = 0x28;

/// Logical block size: the volume addresses 512-byte sectors.
pub const BLOCK: u64 = 512;
/// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT: 4 KiB physical blocks, the
/// store's allocation unit (smaller writes are read-modify-write).
pub const LBPPBE: u8 = 3;
/// MAXIMUM TRANSFER LENGTH in blocks: 32 MiB, the session's write limit.
pub const MAX_TRANSFER_BLOCKS: u64 = 65536;
/// Largest single backend call (its lengths are u32 bytes).
const CHUNK: u64 = 32 << 20;

const VENDOR: &[u8; 8] = b"CAIRN   ";
const PRODUCT: &[u8; 16] = b"Cairn volume    ";

/// Who is asking: the I_T nexus. `initiator` is the iSCSI initiator port
/// name ("iqn.xxx,i,0x<ISID as 12 hex digits>"), `target_port` the
/// target port name ("iqn.target,t,0x0001"), `relative_port` its
/// relative target port identifier (1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    pub initiator: String,
    pub target_port: String,
    pub relative_port: u16,
}

/// One SCSI command as the session layer hands it over.
pub struct Request<'a> {
    /// The CDB: 16 bytes from the BHS (zero padded), longer with an
    /// extended CDB AHS. Shorter slices are failed, not read past.
    pub cdb: &'a [u8],
    /// Every byte of Data-Out the initiator sent (immediate, unsolicited
    /// and solicited), at most `expected_len`.
    pub data_out: Bytes,
    /// The iSCSI Expected Data Transfer Length.
    pub expected_len: u32,
    /// The R bit.
    pub read: bool,
    /// The W bit.
    pub write: bool,
    pub nexus: &'a Nexus,
}

/// What a command returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// GOOD, CHECK CONDITION, CONDITION MET, BUSY, RESERVATION CONFLICT
    /// or TASK SET FULL.
    pub status: u8,
    /// Fixed-format sense data (70h, 18 bytes), with CHECK CONDITION.
    pub sense: Option<Vec<u8>>,
    /// The Data-In: already cut to the CDB's allocation length, not to
    /// the Expected Data Transfer Length (the session does that and
    /// computes the residual from the difference).
    pub data_in: Bytes,
    /// Bytes of Data-Out the CDB calls for (0 if none): the session
    /// computes the write residual from it against the expected length.
    pub data_out_wanted: u32,
}

impl Reply {
    /// GOOD, no data.
    pub fn good() -> Reply {
        Reply::data(Vec::new())
    }

    /// GOOD with Data-In.
    pub fn data(data: impl Into<Bytes>) -> Reply {
        Reply {
            status: GOOD,
            sense: None,
            data_in: data.into(),
            data_out_wanted: 0,
        }
    }

    /// GOOD with Data-In cut to the allocation length `alloc`.
    fn allocated(mut data: Vec<u8>, alloc: usize) -> Reply {
        data.truncate(alloc);
        Reply::data(data)
    }

    /// CHECK CONDITION with `sense`.
    pub fn check_condition(sense: Sense) -> Reply {
        Reply::check_with_info(sense, None)
    }

    /// CHECK CONDITION with `sense` and its INFORMATION field.
    pub fn check_with_info(sense: Sense, information: Option<u64>) -> Reply {
        Reply {
            status: CHECK_CONDITION,
            sense: Some(sense.fixed(information)),
            data_in: Bytes::new(),
            data_out_wanted: 0,
        }
    }

    /// RESERVATION CONFLICT (no sense data).
    pub fn reservation_conflict() -> Reply {
        Reply {
            status: RESERVATION_CONFLICT,
            sense: None,
            data_in: Bytes::new(),
            data_out_wanted: 0,
        }
    }
}

/// Why a command failed, inside this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fail {
    Check(Sense, Option<u64>),
    /// CHECK CONDITION with a SENSE KEY SPECIFIC field.
    Sks(Sense, [u8; 3]),
    Conflict,
}

impl Fail {
    /// INVALID FIELD IN CDB pointing at `byte` (and `bit`) of the CDB.
    fn cdb_field(byte: u16, bit: Option<u8>) -> Fail {
        Fail::Sks(
            sense::INVALID_FIELD_IN_CDB,
            sense::field_pointer(true, byte, bit),
        )
    }

    /// INVALID FIELD IN PARAMETER LIST pointing at `byte` of the list.
    fn list_field(byte: usize) -> Fail {
        let byte = u16::try_from(byte).unwrap_or(u16::MAX);
        Fail::Sks(
            sense::INVALID_FIELD_IN_PARAMETER_LIST,
            sense::field_pointer(false, byte, None),
        )
    }
}

impl From<Sense> for Fail {
    fn from(s: Sense) -> Fail {
        Fail::Check(s, None)
    }
}

impl From<PrError> for Fail {
    fn from(e: PrError) -> Fail {
        match e {
            PrError::Conflict => Fail::Conflict,
            PrError::Check(s) => Fail::Check(s, None),
        }
    }
}

impl From<Fail> for Reply {
    fn from(f: Fail) -> Reply {
        match f {
            Fail::Check(s, info) => Reply::check_with_info(s, info),
            Fail::Sks(s, sks) => Reply {
                status: CHECK_CONDITION,
                sense: Some(s.fixed_sks(None, Some(sks))),
                data_in: Bytes::new(),
                data_out_wanted: 0,
            },
            Fail::Conflict => Reply::reservation_conflict(),
        }
    }
}

type Res<T = Reply> = Result<T, Fail>;

/// The identifiers an initiator keys multipath on, derived from the
/// export's uid (stable, unique across clusters).
struct Ids {
    /// VPD 80h: 32 hex digits of MD5(uid).
    serial: String,
    /// NAA 3 (locally assigned): 60 bits of MD5(uid).
    naa: [u8; 8],
}

impl Ids {
    fn of(uid: &str) -> Ids {
        let h = Md5::digest(uid.as_bytes());
        let mut naa = [0u8; 8];
        naa.copy_from_slice(&h[..8]);
        naa[0] = 0x30 | (naa[0] & 0x0f);
        Ids {
            serial: hex::encode(h),
            naa,
        }
    }
}

/// Per-nexus state that is not persistent: SPC-2 reservations and pending
/// unit attentions.
#[derive(Default)]
struct Local {
    /// The I_T nexus holding a RESERVE(6) reservation.
    reserved_by: Option<(String, String)>,
    /// Unit attentions per (initiator port, target port), oldest first.
    /// Every nexus that sent a command has an entry, so a reset reaches it.
    attentions: HashMap<(String, String), VecDeque<Sense>>,
    /// Software write protect (the Control mode page's SWP bit), set and
    /// cleared with MODE SELECT; not saved (SPC-4 allows current values
    /// only), so it ends with this process.
    swp: bool,
    /// The capacity last seen, bytes: when the volume grows, every nexus
    /// gets CAPACITY DATA HAS CHANGED (SBC-3 4.6).
    capacity: Option<u64>,
}

/// Nexuses remembered for unit attentions at most (a reset reaches the
/// ones seen; beyond this, those with nothing pending are forgotten).
const MAX_NEXUSES: usize = 1024;
/// Unit attentions queued per nexus at most (the oldest are dropped).
const MAX_ATTENTIONS: usize = 8;

fn key_of(n: &Nexus) -> (String, String) {
    (n.initiator.to_ascii_lowercase(), n.target_port.clone())
}

/// One session's tasks, as a logical unit reaches them: LOGICAL UNIT RESET
/// and PREEMPT AND ABORT from one I_T nexus abort the tasks of others
/// (SAM-5 5.6, SPC-4 5.12.11.2.5).
pub trait TaskSet: Send + Sync {
    /// Aborts every task of this session on its logical unit `lun` (the
    /// session's number for it) and returns once they have all stopped:
    /// nothing they would have written lands afterwards. They end without
    /// status (TAS 0); the nexus has a unit attention for it.
    fn abort_lun_tasks(&self, lun: u64) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// A session attached to a logical unit.
struct Attached {
    nexus: (String, String),
    lun: u64,
    set: Weak<dyn TaskSet>,
}

/// A logical unit: one export, 512-byte logical blocks, thin provisioned.
/// Shared by every session that reaches the export (reservations and unit
/// attentions are per logical unit).
pub struct Lun<B: Backend, S: PrStore = MemPrStore> {
    backend: Arc<B>,
    lun_id: u64,
    ids: Ids,
    /// Persistent reservations, loaded from `store` on first use (None
    /// until then). Held across a PR OUT's save so state and store agree.
    pr: tokio::sync::Mutex<Option<PrState>>,
    store: S,
    local: Mutex<Local>,
    /// ORWRITE, and COMPARE AND WRITE where the backend is not atomic by
    /// itself, hold it exclusively, every other write shared: the read and
    /// the write are atomic against writes through this logical unit (a
    /// Cairn volume's COMPARE AND WRITE inside one extent is atomic against
    /// every target, at the chunk server, and holds it shared). A SANITIZE
    /// holds it exclusively while it runs.
    io: Arc<tokio::sync::RwLock<()>>,
    /// What a SANITIZE did to the medium: shared by every logical unit
    /// over the same export object, so it outlives sessions.
    medium: Arc<sanitize::Medium>,
    /// EXTENDED COPY results held for RECEIVE COPY RESULTS.
    copies: Mutex<copy::Held>,
    /// The sessions using this unit, for aborts across nexuses.
    attached: Mutex<Vec<Attached>>,
    /// Refusing reservation-governed commands (the store lapsed): logs
    /// the change once, not per command.
    fenced: std::sync::atomic::AtomicBool,
    /// The newest PREEMPT AND ABORT (`PrState::abort_version`) whose
    /// aborts this unit has made, or that predates its first load of the
    /// state (`u64::MAX` until then: it had no tasks before).
    abort_handled: std::sync::atomic::AtomicU64,
}

impl<B: Backend> Lun<B> {
    /// The logical unit `lun_id` over `backend`, persistent reservations
    /// kept in memory.
    pub fn new(backend: Arc<B>, lun_id: u64) -> Self {
        Lun::with_store(backend, lun_id, MemPrStore::default())
    }
}

impl<B: Backend, S: PrStore> Lun<B, S> {
    /// The logical unit `lun_id` over `backend`, persistent reservations
    /// in `store`.
    pub fn with_store(backend: Arc<B>, lun_id: u64, store: S) -> Self {
        let ids = Ids::of(&backend.info().uid);
        Lun {
            lun_id,
            ids,
            pr: tokio::sync::Mutex::new(None),
            store,
            local: Mutex::new(Local::default()),
            io: Arc::new(tokio::sync::RwLock::new(())),
            medium: sanitize::Medium::of(&backend),
            copies: Mutex::new(copy::Held::default()),
            attached: Mutex::new(Vec::new()),
            fenced: std::sync::atomic::AtomicBool::new(false),
            abort_handled: std::sync::atomic::AtomicU64::new(u64::MAX),
            backend,
        }
    }

    /// Attaches a session's tasks (as its logical unit `lun`) so that other
    /// nexuses' resets and PREEMPT AND ABORT reach them.
    pub fn attach(&self, n: &Nexus, lun: u64, set: Weak<dyn TaskSet>) {
        let mut a = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        a.retain(|x| x.set.strong_count() > 0);
        a.push(Attached {
            nexus: key_of(n),
            lun,
            set,
        });
    }

    /// Detaches a session that ends.
    pub fn detach(&self, set: &Weak<dyn TaskSet>) {
        let mut a = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        a.retain(|x| x.set.strong_count() > 0 && !Weak::ptr_eq(&x.set, set));
    }

    /// Aborts the tasks of every attached nexus `pick` chooses and waits
    /// for them to stop.
    async fn abort_nexuses(&self, pick: impl Fn(&(String, String)) -> bool) {
        let sets: Vec<(Arc<dyn TaskSet>, u64)> = {
            let a = self.attached.lock().unwrap_or_else(|p| p.into_inner());
            a.iter()
                .filter(|x| pick(&x.nexus))
                .filter_map(|x| Some((x.set.upgrade()?, x.lun)))
                .collect()
        };
        for (set, lun) in sets {
            set.abort_lun_tasks(lun).await;
        }
    }

    /// Loads the reservation state if another front end changed it, and if
    /// a PREEMPT AND ABORT run elsewhere is newer than any this unit
    /// handled, aborts the preempted nexuses' tasks here and returns once
    /// they have stopped. The export runs it before it reports holding the
    /// new state, and the volume manager answers the PREEMPT AND ABORT
    /// only after that report (or the lease's end): so no write of a
    /// preempted nexus lands through this target after it completes.
    pub async fn refresh_reservations(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let (aborted, issuer) = {
            let g = match self.pr_state().await {
                Ok(g) => g,
                // Lapsed or unreadable: its commands are refused meanwhile.
                Err(_) => return,
            };
            let Some(s) = g.as_ref() else { return };
            let handled = self.abort_handled.load(Relaxed);
            if handled == u64::MAX || s.abort_version <= handled {
                return;
            }
            self.abort_handled.store(s.abort_version, Relaxed);
            let issuer = s
                .abort_issuer
                .as_ref()
                .map(|n| (n.initiator.clone(), n.target_port.clone()));
            (s.aborted.clone(), issuer)
        };
        tracing::info!(
            lun = self.lun_id,
            nexuses = aborted.len(),
            "PREEMPT AND ABORT through another target: aborting the preempted nexuses' tasks"
        );
        self.abort_preempted(&aborted, issuer.as_ref()).await;
    }

    /// PREEMPT AND ABORT's reach on this unit: the tasks of the `preempted`
    /// nexuses (an empty target port: through every port), not the
    /// issuer's.
    async fn abort_preempted(
        &self,
        preempted: &[pr::NexusName],
        issuer: Option<&(String, String)>,
    ) {
        self.abort_nexuses(|k| {
            Some(k) != issuer
                && preempted.iter().any(|p| {
                    p.initiator == k.0 && (p.target_port.is_empty() || p.target_port == k.1)
                })
        })
        .await;
    }

    /// LOGICAL UNIT RESET's reach beyond the issuing nexus (whose own tasks
    /// its session aborts): every other nexus's tasks on this unit.
    pub async fn abort_other_nexuses(&self, by: &Nexus) {
        let me = key_of(by);
        self.abort_nexuses(|k| *k != me).await;
    }

    /// The bytes of Data-Out `cdb` calls for, so the session knows what to
    /// solicit before calling [`Lun::execute`]; None if it is not a CDB
    /// this logical unit understands (execute then fails it).
    pub fn data_out_len(cdb: &[u8]) -> Option<u32> {
        cdb::data_out_len(cdb)
    }

    /// Capacity in logical blocks.
    fn blocks(&self) -> u64 {
        self.backend.size() / BLOCK
    }

    /// Writes are refused: a read-only export, or SWP set.
    fn read_only(&self) -> bool {
        self.backend.info().read_only || self.local().swp
    }

    /// Establishes `sense` for every nexus the unit knows but `by`.
    fn raise_others(&self, by: &Nexus, s: Sense) {
        let mut l = self.local();
        let k = key_of(by);
        for (n, q) in l.attentions.iter_mut() {
            if *n != k {
                push_attention(q, s);
            }
        }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one command.
    pub async fn execute(&self, req: Request<'_>) -> Reply {
        let wanted = Self::data_out_len(req.cdb).unwrap_or(0);
        let mut reply = self.run(&req).await.unwrap_or_else(Reply::from);
        reply.data_out_wanted = wanted;
        reply
    }

    /// Logical unit reset (LOGICAL UNIT RESET, TARGET WARM RESET) from
    /// `_by`: the RESERVE(6) reservation goes, and every nexus gets a
    /// POWER ON, RESET OR BUS DEVICE RESET OCCURRED unit attention (the
    /// issuer too, SAM-5 6.3.3). Persistent reservations stay.
    pub fn reset(&self, _by: &Nexus) {
        let mut l = self.local();
        l.reserved_by = None;
        for q in l.attentions.values_mut() {
            push_attention(q, sense::POWER_ON_RESET);
        }
    }

    /// The I_T nexus is gone (logout, connection lost, session
    /// reinstated): its RESERVE(6) reservation is released and its unit
    /// attentions forgotten. Persistent reservations stay.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        let mut l = self.local();
        let k = key_of(nexus);
        if l.reserved_by.as_ref() == Some(&k) {
            l.reserved_by = None;
        }
        l.attentions.remove(&k);
    }

    /// Establishes `sense` for the nexuses matching `initiator` (through
    /// `target_port`, or all target ports).
    fn raise(&self, initiator: &str, target_port: Option<&str>, s: Sense) {
        let mut l = self.local();
        let initiator = initiator.to_ascii_lowercase();
        if let Some(port) = target_port {
            let q = l
                .attentions
                .entry((initiator, port.to_string()))
                .or_default();
            push_attention(q, s);
        } else {
            for ((i, _), q) in l.attentions.iter_mut() {
                if *i == initiator {
                    push_attention(q, s);
                }
            }
        }
    }

    /// Remembers `n` (so resets reach it) and takes its oldest pending unit
    /// attention when `consume`.
    fn attention(&self, n: &Nexus, consume: bool) -> Option<Sense> {
        let mut l = self.local();
        let k = key_of(n);
        if !l.attentions.contains_key(&k) && l.attentions.len() >= MAX_NEXUSES {
            l.attentions.retain(|_, q| !q.is_empty());
        }
        l.attentions.entry(k.clone()).or_default();
        let size = self.backend.size();
        if l.capacity.is_some_and(|seen| seen != size) {
            for q in l.attentions.values_mut() {
                push_attention(q, sense::CAPACITY_DATA_HAS_CHANGED);
            }
        }
        l.capacity = Some(size);
        let q = l.attentions.get_mut(&k).expect("inserted above");
        if consume {
            q.pop_front()
        } else {
            None
        }
    }

    /// The persistent reservation state, loaded from the store on first
    /// use and again whenever the store knows of a newer one.
    ///
    /// Cut off from a shared store (its export lease lapsed), this front
    /// end may have missed a PREEMPT made through another, which no longer
    /// waits for it: a unit whose reservations were ever used then serves
    /// nothing they govern until contact is back. (One never used keeps
    /// serving: a first REGISTER made elsewhere meanwhile is not seen here.)
    async fn pr_state(&self) -> Res<tokio::sync::MutexGuard<'_, Option<PrState>>> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut g = self.pr.lock().await;
        loop {
            if g.as_ref().is_some_and(|s| self.store.stale(s.version)) {
                *g = None;
            }
            if g.is_none() {
                let loaded = self.store.load().await.map_err(|e| {
                    tracing::warn!("persistent reservations: {e}");
                    Fail::from(sense::LOGICAL_UNIT_NOT_READY)
                })?;
                let loaded = loaded.unwrap_or_default();
                // Aborts made before this unit first saw the state are not
                // its to repeat.
                let _ = self.abort_handled.compare_exchange(
                    u64::MAX,
                    loaded.abort_version,
                    Relaxed,
                    Relaxed,
                );
                *g = Some(loaded);
            }
            let used = g
                .as_ref()
                .is_some_and(|s| s.version > 0 || !s.registrations.is_empty());
            if !used {
                break;
            }
            if self.store.lapsed().await {
                if !self.fenced.swap(true, Relaxed) {
                    tracing::warn!(
                        lun = self.lun_id,
                        "no contact with the volume manager: refusing commands governed by \
                         persistent reservations until it is back"
                    );
                }
                return Err(sense::TARGET_PORT_UNAVAILABLE.into());
            }
            // The lease may have come back while it waited, with news of a
            // newer state: load that one before deciding.
            if !g.as_ref().is_some_and(|s| self.store.stale(s.version)) {
                break;
            }
        }
        if self.fenced.load(Relaxed) && self.fenced.swap(false, Relaxed) {
            tracing::info!(lun = self.lun_id, "volume manager reachable again: serving");
        }
        Ok(g)
    }

    async fn run(&self, req: &Request<'_>) -> Res {
        let op = req.cdb.first().copied().unwrap_or(0xff);
        // Unit attentions come first (SAM-5 5.14), except for the three
        // commands that must work through them.
        let exempt = matches!(op, cdb::INQUIRY | cdb::REPORT_LUNS | cdb::REQUEST_SENSE);
        if let Some(ua) = self.attention(req.nexus, !exempt) {
            return Err(ua.into());
        }
        let c = Cdb::parse(req.cdb)?;
        // While a SANITIZE runs, only what describes the logical unit
        // works (SBC-4 4.11.2); after one failed, the medium is refused.
        if let Some(fail) = self.medium.refuses(op, c.service_action()) {
            if op == cdb::REQUEST_SENSE {
                if let Fail::Sks(s, sks) = fail {
                    let d = s.fixed_sks(None, Some(sks));
                    return Ok(Reply::allocated(d, c.u8(4) as usize));
                }
            }
            return Err(fail);
        }
        let sa = c.service_action();
        if cdb::lookup(op, sa).is_none() {
            return Err(if cdb::has_service_actions(op) {
                sense::INVALID_FIELD_IN_CDB
            } else {
                sense::INVALID_COMMAND_OPERATION_CODE
            }
            .into());
        }
        self.check_reservations(&c, req.nexus).await?;
        match op {
            cdb::TEST_UNIT_READY | cdb::START_STOP_UNIT | cdb::PREVENT_ALLOW => Ok(Reply::good()),
            cdb::REQUEST_SENSE => self.request_sense(&c, req.nexus),
            cdb::INQUIRY => self.inquiry(&c, req.nexus),
            cdb::MODE_SENSE_6 | cdb::MODE_SENSE_10 => self.mode_sense(&c),
            cdb::MODE_SELECT_6 | cdb::MODE_SELECT_10 => {
                self.mode_select(&c, &req.data_out, req.nexus)
            }
            cdb::RESERVE_6 => self.reserve6(req.nexus).await,
            cdb::RELEASE_6 => self.release6(req.nexus).await,
            cdb::READ_CAPACITY_10 => Ok(self.read_capacity_10()),
            cdb::SERVICE_ACTION_IN_16 if sa == cdb::SA_READ_CAPACITY_16 => {
                Ok(self.read_capacity_16(&c))
            }
            cdb::SERVICE_ACTION_IN_16 => self.get_lba_status(&c).await,
            // The session answers REPORT LUNS for the whole target; this
            // is what one logical unit alone knows.
            cdb::REPORT_LUNS => Ok(report_luns(req.cdb, &[self.lun_id])),
            cdb::MAINTENANCE_IN if sa == cdb::SA_REPORT_SUPPORTED_OPCODES => {
                info::report_supported_opcodes(&c)
            }
            cdb::MAINTENANCE_IN => info::report_target_port_groups(&c, req.nexus),
            cdb::READ_DEFECT_DATA_10 | cdb::READ_DEFECT_DATA_12 => Ok(info::read_defect_data(&c)),
            cdb::PERSISTENT_RESERVE_IN => self.pr_in(&c).await,
            cdb::PERSISTENT_RESERVE_OUT => self.pr_out(&c, req).await,
            cdb::READ_6 | cdb::READ_10 | cdb::READ_12 | cdb::READ_16 => self.read(&c).await,
            cdb::WRITE_6
            | cdb::WRITE_10
            | cdb::WRITE_12
            | cdb::WRITE_16
            | cdb::WRITE_AND_VERIFY_10
            | cdb::WRITE_AND_VERIFY_12
            | cdb::WRITE_AND_VERIFY_16 => self.write(&c, req).await,
            cdb::VERIFY_10 | cdb::VERIFY_12 | cdb::VERIFY_16 => {
                self.verify(&c, &req.data_out).await
            }
            cdb::PRE_FETCH_10 | cdb::PRE_FETCH_16 => self.prefetch(&c),
            cdb::SYNCHRONIZE_CACHE_10 | cdb::SYNCHRONIZE_CACHE_16 => self.sync_cache(&c).await,
            cdb::WRITE_SAME_10 | cdb::WRITE_SAME_16 => self.write_same(&c, req).await,
            cdb::UNMAP => self.unmap(&c, &req.data_out).await,
            cdb::COMPARE_AND_WRITE => self.compare_and_write(&c, req).await,
            cdb::ORWRITE_16 => self.orwrite(&c, req).await,
            cdb::SANITIZE => self.sanitize(&c, req).await,
            cdb::EXTENDED_COPY => self.extended_copy(&c, req).await,
            cdb::RECEIVE_COPY_RESULTS => self.receive_copy_results(&c, req.nexus),
            _ => Err(sense::INVALID_COMMAND_OPERATION_CODE.into()),
        }
    }

    /// RESERVATION CONFLICT per SPC-2 reservations (everything but a few
    /// commands from other nexuses) and the persistent reservation table.
    async fn check_reservations(&self, c: &Cdb<'_>, n: &Nexus) -> Res<()> {
        let op = c.opcode();
        let spc2_other = {
            let l = self.local();
            l.reserved_by.as_ref().is_some_and(|h| *h != key_of(n))
        };
        if spc2_other
            && !matches!(
                op,
                cdb::INQUIRY | cdb::REPORT_LUNS | cdb::REQUEST_SENSE | cdb::RELEASE_6
            )
        {
            return Err(Fail::Conflict);
        }
        let access = match op {
            cdb::READ_6
            | cdb::READ_10
            | cdb::READ_12
            | cdb::READ_16
            | cdb::VERIFY_10
            | cdb::VERIFY_12
            | cdb::VERIFY_16
            | cdb::PRE_FETCH_10
            | cdb::PRE_FETCH_16
            | cdb::MODE_SENSE_6
            | cdb::MODE_SENSE_10
            | cdb::READ_DEFECT_DATA_10
            | cdb::READ_DEFECT_DATA_12 => Access::Read,
            cdb::SERVICE_ACTION_IN_16 if c.service_action() == cdb::SA_GET_LBA_STATUS => {
                Access::Read
            }
            cdb::PREVENT_ALLOW if c.u8(4) & 0x03 != 0 => Access::Write,
            cdb::WRITE_6
            | cdb::WRITE_10
            | cdb::WRITE_12
            | cdb::WRITE_16
            | cdb::WRITE_AND_VERIFY_10
            | cdb::WRITE_AND_VERIFY_12
            | cdb::WRITE_AND_VERIFY_16
            | cdb::WRITE_SAME_10
            | cdb::WRITE_SAME_16
            | cdb::UNMAP
            | cdb::COMPARE_AND_WRITE
            | cdb::ORWRITE_16
            | cdb::SANITIZE
            | cdb::EXTENDED_COPY
            | cdb::SYNCHRONIZE_CACHE_10
            | cdb::SYNCHRONIZE_CACHE_16
            | cdb::MODE_SELECT_6
            | cdb::MODE_SELECT_10
            | cdb::START_STOP_UNIT => Access::Write,
            _ => Access::Always,
        };
        if access == Access::Always {
            return Ok(());
        }
        let g = self.pr_state().await?;
        match g.as_ref() {
            Some(s) if !s.allows(n, access) => Err(Fail::Conflict),
            _ => Ok(()),
        }
    }

    /// REQUEST SENSE: the pending unit attention (consumed), else NO SENSE.
    fn request_sense(&self, c: &Cdb<'_>, n: &Nexus) -> Res {
        // DESC: descriptor format sense data is not supported.
        if c.u8(1) & 0x01 != 0 {
            return Err(sense::INVALID_FIELD_IN_CDB.into());
        }
        let s = self.attention(n, true).unwrap_or(sense::NO_SENSE);
        Ok(Reply::allocated(s.fixed(None), c.u8(4) as usize))
    }

    /// RESERVE(6) (SPC-2): for this nexus unless another holds it; with a
    /// persistent reservation (CRH = 1, SPC-4 5.12.3) GOOD without effect
    /// for its holder, a conflict for everyone else.
    async fn reserve6(&self, n: &Nexus) -> Res {
        {
            let g = self.pr_state().await?;
            if let Some(s) = g.as_ref().filter(|s| s.reservation.is_some()) {
                return if s.is_holder(n) {
                    Ok(Reply::good())
                } else {
                    Err(Fail::Conflict)
                };
            }
        }
        let mut l = self.local();
        let k = key_of(n);
        match &l.reserved_by {
            Some(h) if *h != k => Err(Fail::Conflict),
            _ => {
                l.reserved_by = Some(k);
                Ok(Reply::good())
            }
        }
    }

    /// RELEASE(6): releases this nexus's reservation; from anyone else (or
    /// under a persistent reservation) GOOD without effect.
    async fn release6(&self, n: &Nexus) -> Res {
        let mut l = self.local();
        if l.reserved_by.as_ref() == Some(&key_of(n)) {
            l.reserved_by = None;
        }
        Ok(Reply::good())
    }

    async fn pr_in(&self, c: &Cdb<'_>) -> Res {
        let g = self.pr_state().await?;
        let s = g.clone().unwrap_or_default();
        let data = match c.service_action() {
            0 => s.read_keys(),
            1 => s.read_reservation(),
            2 => s.report_capabilities(),
            3 => s.read_full_status(),
            _ => return Err(sense::INVALID_FIELD_IN_CDB.into()),
        };
        Ok(Reply::allocated(data, c.u16(7) as usize))
    }

    async fn pr_out(&self, c: &Cdb<'_>, req: &Request<'_>) -> Res {
        let len = c.u32(5) as usize;
        if len != pr::PARAMETER_LIST_LEN {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        let params = req
            .data_out
            .get(..len)
            .ok_or(sense::PARAMETER_LIST_LENGTH_ERROR)?;
        // A shared store refuses a change made on a stale state (another
        // target changed it meanwhile): the change is redone on the new one.
        let mut tries = 0;
        let (g, attentions) = loop {
            let mut g = self.pr_state().await?;
            let current = g.clone().unwrap_or_default();
            let sa = c.service_action() as u8;
            let (mut next, attentions) = current.out(req.nexus, sa, c.u8(2), params)?;
            if next == current {
                break (g, attentions);
            }
            let preempted = preempted_of(&attentions);
            if sa == pr::PREEMPT_AND_ABORT && !preempted.is_empty() {
                // For the other targets (see `refresh_reservations`).
                next.abort_version = next.version;
                next.aborted = preempted;
                let (initiator, target_port) = key_of(req.nexus);
                next.abort_issuer = Some(pr::NexusName {
                    initiator,
                    target_port,
                });
            }
            match self.store.save(&next).await {
                Ok(()) => {
                    if next.abort_version == next.version {
                        // Aborted here below, not again by the refresh.
                        self.abort_handled
                            .store(next.abort_version, std::sync::atomic::Ordering::Relaxed);
                    }
                    *g = Some(next);
                    break (g, attentions);
                }
                Err(pr::SaveError::Stale) if tries < 8 => {
                    tries += 1;
                    *g = None;
                }
                Err(e) => {
                    tracing::warn!("persistent reservations not saved: {e:?}");
                    *g = None;
                    return Err(Fail::from(sense::INTERNAL_TARGET_FAILURE));
                }
            }
        };
        drop(g);
        // PREEMPT AND ABORT: the preempted nexuses' tasks are aborted before
        // the command completes, so none of their writes lands after it (a
        // fenced node's included). The issuer's own tasks are left alone.
        let preempted = preempted_of(&attentions);
        for a in attentions {
            self.raise(&a.initiator, a.target_port.as_deref(), a.sense);
        }
        if c.service_action() as u8 == pr::PREEMPT_AND_ABORT && !preempted.is_empty() {
            self.abort_preempted(&preempted, Some(&key_of(req.nexus)))
                .await;
        }
        Ok(Reply::good())
    }
}

/// The nexuses a PERSISTENT RESERVE OUT preempted (initiator in lower
/// case; an empty target port: through every port), from its attentions.
fn preempted_of(attentions: &[pr::Attention]) -> Vec<pr::NexusName> {
    attentions
        .iter()
        .filter(|a| a.sense == sense::REGISTRATIONS_PREEMPTED)
        .map(|a| pr::NexusName {
            initiator: a.initiator.to_ascii_lowercase(),
            target_port: a.target_port.clone().unwrap_or_default(),
        })
        .collect()
}

impl<B: Backend, S: PrStore> crate::backend::ReservationsHook for Lun<B, S> {
    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.refresh_reservations())
    }
}

fn push_attention(q: &mut VecDeque<Sense>, s: Sense) {
    if q.contains(&s) {
        return;
    }
    if q.len() >= MAX_ATTENTIONS {
        q.pop_front();
    }
    q.push_back(s);
}

/// A command for a LUN number with nothing behind it (SPC-4 4.6.4):
/// INQUIRY answers with peripheral qualifier 011b and device type 1Fh,
/// REQUEST SENSE with LOGICAL UNIT NOT SUPPORTED, REPORT LUNS lists
/// `luns`; anything else is CHECK CONDITION, ILLEGAL REQUEST, LOGICAL UNIT
/// NOT SUPPORTED.
pub fn no_such_lun(req: Request<'_>, luns: &[u64]) -> Reply {
    let Ok(c) = Cdb::parse(req.cdb) else {
        return Reply::check_condition(sense::LOGICAL_UNIT_NOT_SUPPORTED);
    };
    match c.opcode() {
        cdb::INQUIRY if c.u8(1) & 0x03 == 0 && c.u8(2) == 0 => {
            let mut d = info::standard_inquiry();
            d[0] = 0x7f;
            Reply::allocated(d, c.u16(3) as usize)
        }
        cdb::REQUEST_SENSE => Reply::allocated(
            sense::LOGICAL_UNIT_NOT_SUPPORTED.fixed(None),
            c.u8(4) as usize,
        ),
        cdb::REPORT_LUNS => report_luns(req.cdb, luns),
        _ => Reply::check_condition(sense::LOGICAL_UNIT_NOT_SUPPORTED),
    }
}

/// REPORT LUNS (SPC-4 6.33) for a target whose logical units are `luns`:
/// answered at the target level whatever LUN the command was sent to.
pub fn report_luns(cdb: &[u8], luns: &[u64]) -> Reply {
    let c = match Cdb::parse(cdb) {
        Ok(c) if c.opcode() == cdb::REPORT_LUNS => c,
        Ok(_) => return Reply::check_condition(sense::INVALID_COMMAND_OPERATION_CODE),
        Err(s) => return Reply::check_condition(s),
    };
    let alloc = c.u32(6) as usize;
    if alloc < 16 {
        return Reply::check_condition(sense::INVALID_FIELD_IN_CDB);
    }
    let listed: Vec<u64> = match c.u8(2) {
        // All logical units (0, 2); the well-known ones (1): none.
        0 | 2 => luns.iter().copied().filter(|&l| l < 16384).collect(),
        1 => Vec::new(),
        _ => return Reply::check_condition(sense::INVALID_FIELD_IN_CDB),
    };
    let mut d = Vec::with_capacity(8 + 8 * listed.len());
    d.extend_from_slice(&((8 * listed.len()) as u32).to_be_bytes());
    d.extend_from_slice(&[0; 4]);
    for l in listed {
        // Peripheral device addressing below 256, flat space above.
        let first = if l < 256 { 0 } else { 0x40 | (l >> 8) as u8 };
        d.extend_from_slice(&[first, l as u8, 0, 0, 0, 0, 0, 0]);
    }
    Reply::allocated(d, alloc)
}
