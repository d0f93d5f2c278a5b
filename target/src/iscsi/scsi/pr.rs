//! Persistent reservations (SPC-4 5.12, 6.15, 6.16) as a plain state
//! machine: [`PrState::out`] takes an I_T nexus and a PERSISTENT RESERVE
//! OUT and returns the next state (or why not), with the unit attentions
//! it raises; [`PrState::allows`] is the conflict table every command
//! passes. The state is a prost message with a generation, so a later step
//! can keep it in the volume manager, shared by every target exporting the
//! volume and surviving restarts, behind [`PrStore`].

use std::future::Future;
use std::sync::Mutex;

use prost::Message;

use super::sense::{self, Sense};
use super::Nexus;

/// Reservation types (SPC-4 table 175).
pub const WRITE_EXCLUSIVE: u8 = 1;
pub const EXCLUSIVE_ACCESS: u8 = 3;
pub const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
pub const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 6;
pub const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 7;
pub const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 8;

/// PERSISTENT RESERVE OUT service actions.
pub const REGISTER: u8 = 0;
pub const RESERVE: u8 = 1;
pub const RELEASE: u8 = 2;
pub const CLEAR: u8 = 3;
pub const PREEMPT: u8 = 4;
pub const PREEMPT_AND_ABORT: u8 = 5;
pub const REGISTER_AND_IGNORE_EXISTING_KEY: u8 = 6;

/// The basic PERSISTENT RESERVE OUT parameter list is 24 bytes.
pub const PARAMETER_LIST_LEN: usize = 24;

/// Registrations kept at most (more get INSUFFICIENT REGISTRATION
/// RESOURCES): bounds the state an initiator can make the target store.
pub const MAX_REGISTRATIONS: usize = 128;

/// The persistent reservation state of one logical unit.
#[derive(Clone, PartialEq, Message)]
pub struct PrState {
    /// PRgeneration (SPC-4 6.15.2): counts REGISTER, CLEAR and PREEMPT.
    #[prost(uint32, tag = "1")]
    pub generation: u32,
    /// Counts every change (RESERVE and RELEASE too): what a shared store
    /// compares before replacing the state.
    #[prost(uint64, tag = "2")]
    pub version: u64,
    #[prost(message, repeated, tag = "3")]
    pub registrations: Vec<Registration>,
    #[prost(message, optional, tag = "4")]
    pub reservation: Option<Reservation>,
    /// Activate persist through power loss, as the last REGISTER set it.
    #[prost(bool, tag = "5")]
    pub aptpl: bool,
    /// The `version` the last PREEMPT AND ABORT made (0: none yet). The
    /// target that runs one aborts the preempted nexuses' tasks itself;
    /// every other target exporting the volume does so when it loads a
    /// state with a newer `abort_version` than it handled, before it tells
    /// the volume manager it holds the state (so before the PREEMPT AND
    /// ABORT completes).
    #[prost(uint64, tag = "6")]
    pub abort_version: u64,
    /// The I_T nexuses that PREEMPT AND ABORT preempted (an empty target
    /// port: through every port).
    #[prost(message, repeated, tag = "7")]
    pub aborted: Vec<NexusName>,
    /// The nexus that ran it: its own tasks are left alone.
    #[prost(message, optional, tag = "8")]
    pub abort_issuer: Option<NexusName>,
}

/// An I_T nexus by name, the initiator in lower case.
#[derive(Clone, PartialEq, Message)]
pub struct NexusName {
    #[prost(string, tag = "1")]
    pub initiator: String,
    #[prost(string, tag = "2")]
    pub target_port: String,
}

/// One registered I_T nexus (or, with `all_target_ports`, the initiator
/// port through every target port).
#[derive(Clone, PartialEq, Message)]
pub struct Registration {
    #[prost(string, tag = "1")]
    pub initiator: String,
    #[prost(string, tag = "2")]
    pub target_port: String,
    #[prost(bool, tag = "3")]
    pub all_target_ports: bool,
    #[prost(uint64, tag = "4")]
    pub key: u64,
    #[prost(uint32, tag = "5")]
    pub relative_port: u32,
}

/// The persistent reservation: its type and the I_T nexus that holds it
/// (every registrant holds the all-registrants types).
#[derive(Clone, PartialEq, Message)]
pub struct Reservation {
    #[prost(uint32, tag = "1")]
    pub kind: u32,
    #[prost(string, tag = "2")]
    pub holder_initiator: String,
    #[prost(string, tag = "3")]
    pub holder_target_port: String,
}

/// Why a PERSISTENT RESERVE OUT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrError {
    /// RESERVATION CONFLICT status.
    Conflict,
    /// CHECK CONDITION with this sense.
    Check(Sense),
}

/// A unit attention to establish for an initiator port: through one
/// target port, or every one (`target_port` None).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attention {
    pub initiator: String,
    pub target_port: Option<String>,
    pub sense: Sense,
}

/// How a command fares under a persistent reservation (SPC-4 table 66,
/// SBC-3 table 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Allowed whatever the reservation (INQUIRY, REPORT LUNS, TEST UNIT
    /// READY, READ CAPACITY, PERSISTENT RESERVE IN/OUT...).
    Always,
    /// Reads the medium or its settings: conflicts under the exclusive
    /// access types only.
    Read,
    /// Changes the medium or its settings.
    Write,
}

fn valid_type(t: u8) -> bool {
    matches!(t, 1 | 3 | 5..=8)
}

fn all_registrants(t: u32) -> bool {
    t == WRITE_EXCLUSIVE_ALL_REGISTRANTS as u32 || t == EXCLUSIVE_ACCESS_ALL_REGISTRANTS as u32
}

fn registrants_only_or_all(t: u32) -> bool {
    (WRITE_EXCLUSIVE_REGISTRANTS_ONLY as u32..=EXCLUSIVE_ACCESS_ALL_REGISTRANTS as u32).contains(&t)
}

impl Registration {
    fn matches(&self, n: &Nexus) -> bool {
        self.initiator.eq_ignore_ascii_case(&n.initiator)
            && (self.all_target_ports || self.target_port == n.target_port)
    }

    fn attention(&self, sense: Sense) -> Attention {
        Attention {
            initiator: self.initiator.clone(),
            target_port: (!self.all_target_ports).then(|| self.target_port.clone()),
            sense,
        }
    }
}

fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

impl PrState {
    /// The state's wire form (prost), what a [`PrStore`] keeps.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    pub fn from_bytes(b: &[u8]) -> Result<PrState, String> {
        PrState::decode(b).map_err(|e| format!("persistent reservation state: {e}"))
    }

    fn registration(&self, n: &Nexus) -> Option<usize> {
        self.registrations.iter().position(|r| r.matches(n))
    }

    /// The registration key of `n`, if registered.
    pub fn key_of(&self, n: &Nexus) -> Option<u64> {
        self.registration(n).map(|i| self.registrations[i].key)
    }

    /// Whether `n` holds the persistent reservation.
    pub fn is_holder(&self, n: &Nexus) -> bool {
        let Some(r) = &self.reservation else {
            return false;
        };
        let Some(mine) = self.registration(n) else {
            return false;
        };
        if all_registrants(r.kind) {
            return true;
        }
        let holder = Nexus {
            initiator: r.holder_initiator.clone(),
            target_port: r.holder_target_port.clone(),
            relative_port: 0,
        };
        self.registration(&holder) == Some(mine)
    }

    /// Whether `n` may run a command of class `access` now.
    pub fn allows(&self, n: &Nexus, access: Access) -> bool {
        let Some(r) = &self.reservation else {
            return true;
        };
        if access == Access::Always || self.is_holder(n) {
            return true;
        }
        let registered = self.registration(n).is_some();
        let exclusive_access = matches!(
            r.kind as u8,
            EXCLUSIVE_ACCESS | EXCLUSIVE_ACCESS_REGISTRANTS_ONLY | EXCLUSIVE_ACCESS_ALL_REGISTRANTS
        );
        if registrants_only_or_all(r.kind) && registered {
            return true;
        }
        access == Access::Read && !exclusive_access
    }

    /// Runs PERSISTENT RESERVE OUT `service_action` with `scope_type`
    /// (CDB byte 2) and the 24-byte parameter list from nexus `n`.
    pub fn out(
        &self,
        n: &Nexus,
        service_action: u8,
        scope_type: u8,
        params: &[u8],
    ) -> Result<(PrState, Vec<Attention>), PrError> {
        if params.len() != PARAMETER_LIST_LEN {
            return Err(PrError::Check(sense::PARAMETER_LIST_LENGTH_ERROR));
        }
        let key = be64(params, 0);
        let sa_key = be64(params, 8);
        let flags = params[20];
        // SPEC_I_PT: registering other I_T nexuses is not supported.
        if flags & 0x08 != 0 {
            return Err(PrError::Check(sense::INVALID_FIELD_IN_PARAMETER_LIST));
        }
        let kind = scope_type & 0x0f;
        let scoped = matches!(
            service_action,
            RESERVE | RELEASE | PREEMPT | PREEMPT_AND_ABORT
        );
        if scoped && (scope_type >> 4 != 0 || !valid_type(kind)) {
            return Err(PrError::Check(sense::INVALID_FIELD_IN_CDB));
        }
        let mut next = self.clone();
        let mut ua = Vec::new();
        let mine = self.registration(n);
        match service_action {
            REGISTER | REGISTER_AND_IGNORE_EXISTING_KEY => {
                let ignore = service_action == REGISTER_AND_IGNORE_EXISTING_KEY;
                match mine {
                    None => {
                        if !ignore && key != 0 {
                            return Err(PrError::Conflict);
                        }
                        if sa_key == 0 {
                            return Ok((next, ua));
                        }
                        if next.registrations.len() >= MAX_REGISTRATIONS {
                            return Err(PrError::Check(sense::INSUFFICIENT_REGISTRATION_RESOURCES));
                        }
                        next.registrations.push(Registration {
                            initiator: n.initiator.clone(),
                            target_port: n.target_port.clone(),
                            all_target_ports: flags & 0x04 != 0,
                            key: sa_key,
                            relative_port: n.relative_port as u32,
                        });
                    }
                    Some(i) => {
                        if !ignore && key != self.registrations[i].key {
                            return Err(PrError::Conflict);
                        }
                        if sa_key == 0 {
                            next.unregister(i, n, &mut ua);
                        } else {
                            next.registrations[i].key = sa_key;
                        }
                    }
                }
                next.aptpl = flags & 0x01 != 0;
                next.generation = next.generation.wrapping_add(1);
            }
            RESERVE | RELEASE | CLEAR | PREEMPT | PREEMPT_AND_ABORT => {
                let Some(i) = mine else {
                    return Err(PrError::Conflict);
                };
                if key != self.registrations[i].key {
                    return Err(PrError::Conflict);
                }
                match service_action {
                    RESERVE => match &self.reservation {
                        None => {
                            next.reservation = Some(Reservation {
                                kind: kind as u32,
                                holder_initiator: n.initiator.clone(),
                                holder_target_port: n.target_port.clone(),
                            });
                        }
                        Some(r) if self.is_holder(n) && r.kind == kind as u32 => {
                            return Ok((next, ua));
                        }
                        Some(_) => return Err(PrError::Conflict),
                    },
                    RELEASE => {
                        let Some(r) = &self.reservation else {
                            return Ok((next, ua));
                        };
                        if !self.is_holder(n) {
                            return Ok((next, ua));
                        }
                        if r.kind != kind as u32 {
                            return Err(PrError::Check(
                                sense::INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
                            ));
                        }
                        next.reservation = None;
                        if r.kind != WRITE_EXCLUSIVE as u32 && r.kind != EXCLUSIVE_ACCESS as u32 {
                            ua.extend(self.others(n, sense::RESERVATIONS_RELEASED));
                        }
                    }
                    CLEAR => {
                        ua.extend(self.others(n, sense::RESERVATIONS_PREEMPTED));
                        next.registrations.clear();
                        next.reservation = None;
                        next.generation = next.generation.wrapping_add(1);
                    }
                    _ => {
                        next.preempt(n, i, sa_key, kind, &mut ua)?;
                        next.generation = next.generation.wrapping_add(1);
                    }
                }
            }
            _ => return Err(PrError::Check(sense::INVALID_FIELD_IN_CDB)),
        }
        next.version = next.version.wrapping_add(1);
        Ok((next, ua))
    }

    /// Attentions for every registrant but `n`.
    fn others(&self, n: &Nexus, s: Sense) -> Vec<Attention> {
        self.registrations
            .iter()
            .filter(|r| !r.matches(n))
            .map(|r| r.attention(s))
            .collect()
    }

    /// Removes registration `i` (of `n`), releasing what it held.
    fn unregister(&mut self, i: usize, n: &Nexus, ua: &mut Vec<Attention>) {
        let holder = self.is_holder(n);
        self.registrations.remove(i);
        let Some(r) = self.reservation.clone() else {
            return;
        };
        if all_registrants(r.kind) {
            if self.registrations.is_empty() {
                self.reservation = None;
            }
        } else if holder {
            self.reservation = None;
            if r.kind == WRITE_EXCLUSIVE_REGISTRANTS_ONLY as u32
                || r.kind == EXCLUSIVE_ACCESS_REGISTRANTS_ONLY as u32
            {
                ua.extend(self.others(n, sense::RESERVATIONS_RELEASED));
            }
        }
    }

    /// PREEMPT from registration `me` (of `n`) of the registrations keyed
    /// `sa_key` (SPC-4 5.12.11.2.4).
    fn preempt(
        &mut self,
        n: &Nexus,
        me: usize,
        sa_key: u64,
        kind: u8,
        ua: &mut Vec<Attention>,
    ) -> Result<(), PrError> {
        let reservation = self.reservation.clone();
        let holder_key = reservation.as_ref().and_then(|r| {
            if all_registrants(r.kind) {
                return None;
            }
            let h = Nexus {
                initiator: r.holder_initiator.clone(),
                target_port: r.holder_target_port.clone(),
                relative_port: 0,
            };
            self.key_of(&h)
        });
        let takes_reservation = match &reservation {
            Some(r) if all_registrants(r.kind) => sa_key == 0,
            Some(_) => holder_key == Some(sa_key),
            None => false,
        };
        if sa_key == 0 && !takes_reservation {
            return Err(PrError::Check(sense::INVALID_FIELD_IN_PARAMETER_LIST));
        }
        // Removed: every other registration with the key (all of them for
        // an all-registrants reservation preempted with key 0).
        let mine = self.registrations[me].clone();
        let mut removed = Vec::new();
        self.registrations.retain(|r| {
            let goes = !r.matches(n) && (r.key == sa_key || (takes_reservation && sa_key == 0));
            if goes {
                removed.push(r.clone());
            }
            !goes
        });
        if removed.is_empty() && !takes_reservation {
            return Err(PrError::Conflict);
        }
        ua.extend(
            removed
                .iter()
                .map(|r| r.attention(sense::REGISTRATIONS_PREEMPTED)),
        );
        if takes_reservation {
            let old = reservation.map(|r| r.kind);
            self.reservation = Some(Reservation {
                kind: kind as u32,
                holder_initiator: mine.initiator.clone(),
                holder_target_port: n.target_port.clone(),
            });
            if old != Some(kind as u32) {
                ua.extend(self.others(n, sense::RESERVATIONS_RELEASED));
            }
        }
        Ok(())
    }

    /// PERSISTENT RESERVE IN, READ KEYS (before allocation length).
    pub fn read_keys(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(8 + 8 * self.registrations.len());
        d.extend_from_slice(&self.generation.to_be_bytes());
        d.extend_from_slice(&((8 * self.registrations.len()) as u32).to_be_bytes());
        for r in &self.registrations {
            d.extend_from_slice(&r.key.to_be_bytes());
        }
        d
    }

    /// The key READ RESERVATION reports: the holder's, 0 for the
    /// all-registrants types.
    fn reservation_key(&self, r: &Reservation) -> u64 {
        if all_registrants(r.kind) {
            return 0;
        }
        let h = Nexus {
            initiator: r.holder_initiator.clone(),
            target_port: r.holder_target_port.clone(),
            relative_port: 0,
        };
        self.key_of(&h).unwrap_or(0)
    }

    /// PERSISTENT RESERVE IN, READ RESERVATION.
    pub fn read_reservation(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(24);
        d.extend_from_slice(&self.generation.to_be_bytes());
        match &self.reservation {
            None => d.extend_from_slice(&0u32.to_be_bytes()),
            Some(r) => {
                d.extend_from_slice(&16u32.to_be_bytes());
                d.extend_from_slice(&self.reservation_key(r).to_be_bytes());
                d.extend_from_slice(&[0; 4]);
                d.push(0);
                d.push((r.kind & 0x0f) as u8);
                d.extend_from_slice(&[0; 2]);
            }
        }
        d
    }

    /// PERSISTENT RESERVE IN, REPORT CAPABILITIES: compatible reservation
    /// handling, ALL_TG_PT and APTPL capable, every type but none of
    /// SPEC_I_PT or REGISTER AND MOVE.
    pub fn report_capabilities(&self) -> Vec<u8> {
        // CRH, ATP_C, PTPL_C.
        let caps = 0x10 | 0x04 | 0x01;
        // TMV, ALLOW COMMANDS 001b (TEST UNIT READY through WE and EA).
        let mut b3 = 0x80 | 0x10;
        if self.aptpl {
            b3 |= 0x01;
        }
        vec![0, 8, caps, b3, 0xea, 0x01, 0, 0]
    }

    /// PERSISTENT RESERVE IN, READ FULL STATUS, with iSCSI TransportIDs
    /// (format 01b: the initiator port name with its ISID).
    pub fn read_full_status(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for r in &self.registrations {
            let holder = self.reservation.as_ref().filter(|res| {
                all_registrants(res.kind)
                    || (res.holder_initiator.eq_ignore_ascii_case(&r.initiator)
                        && (r.all_target_ports || res.holder_target_port == r.target_port))
            });
            let mut tid = vec![0x45, 0, 0, 0];
            tid.extend_from_slice(r.initiator.as_bytes());
            tid.push(0);
            while !tid.len().is_multiple_of(4) || tid.len() < 24 {
                tid.push(0);
            }
            let tid_len = ((tid.len() - 4) as u16).to_be_bytes();
            tid[2..4].copy_from_slice(&tid_len);
            body.extend_from_slice(&r.key.to_be_bytes());
            body.extend_from_slice(&[0; 4]);
            body.push(if r.all_target_ports { 0x02 } else { 0 } | u8::from(holder.is_some()));
            body.push(holder.map_or(0, |h| (h.kind & 0x0f) as u8));
            body.extend_from_slice(&[0; 4]);
            body.extend_from_slice(&(r.relative_port as u16).to_be_bytes());
            body.extend_from_slice(&(tid.len() as u32).to_be_bytes());
            body.extend_from_slice(&tid);
        }
        let mut d = Vec::with_capacity(8 + body.len());
        d.extend_from_slice(&self.generation.to_be_bytes());
        d.extend_from_slice(&(body.len() as u32).to_be_bytes());
        d.extend_from_slice(&body);
        d
    }
}

/// Why a [`PrStore`] did not save.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaveError {
    /// Another front end changed the state since it was loaded: load it
    /// again and redo the change on it.
    Stale,
    /// The store cannot be reached or refused (the message says why).
    Failed(String),
}

/// Where a logical unit's persistent reservation state lives: in memory
/// ([`MemPrStore`]) or, for volumes, in the volume manager, so the state
/// survives a target restart and every target of a volume shares it
/// (`crate::exports`).
pub trait PrStore: Send + Sync + 'static {
    /// The last state saved, None if there is none. Its `version` is the
    /// store's own count of changes.
    fn load(&self) -> impl Future<Output = Result<Option<PrState>, String>> + Send;
    /// Replaces the state with `state`, whose `version` is one more than
    /// the one it was derived from; a shared store refuses a stale one.
    fn save(&self, state: &PrState) -> impl Future<Output = Result<(), SaveError>> + Send;
    /// Whether the store knows of a newer state than `version` (changed by
    /// another front end): the LUN loads it again before using it.
    fn stale(&self, _version: u64) -> bool {
        false
    }
    /// Whether this front end may have missed a change: a shared store's
    /// front end that lost contact with it (its export lease lapsed) may
    /// not know of a PREEMPT made through another, which the volume
    /// manager stopped waiting for once the lease lapsed. May wait a
    /// moment for the contact to come back.
    fn lapsed(&self) -> impl Future<Output = bool> + Send {
        async { false }
    }
}

/// Keeps the state (in its wire form) in memory.
#[derive(Default)]
pub struct MemPrStore {
    saved: Mutex<Option<Vec<u8>>>,
}

impl PrStore for MemPrStore {
    async fn load(&self) -> Result<Option<PrState>, String> {
        let saved = self.saved.lock().unwrap_or_else(|p| p.into_inner()).clone();
        saved.map(|b| PrState::from_bytes(&b)).transpose()
    }

    async fn save(&self, state: &PrState) -> Result<(), SaveError> {
        *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = Some(state.to_bytes());
        Ok(())
    }
}
