//! The login phase (RFC 7143 sections 6 and 11.12-11.13): the security
//! stage (AuthMethod, CHAP one-way and mutual), the operational stage
//! (parameters, [`super::text`]), then the full feature phase. Runs over
//! any byte stream; the caller bounds it with a deadline.
//!
//! A refusal is a Login Response with a status class (initiator error 2,
//! target error 3) followed by closing the connection, as the RFC asks.

use base64::Engine;
use bytes::{Bytes, BytesMut};
use md5::{Digest, Md5};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::pdu::{self, Digests, Pdu, PduError, CONTINUE, FINAL, OP_LOGIN_REQ, OP_LOGIN_RESP};
use super::text::{self, Params, SessionType, RECV_DATA_MAX, TEXT_MAX};
use super::{Auth, Portal, TargetDef};
use crate::backend::Catalog;

const STAGE_SECURITY: u8 = 0;
const STAGE_OPERATIONAL: u8 = 1;
const STAGE_FULL_FEATURE: u8 = 3;

// Login status (section 11.13.5): class << 8 | detail.
pub const STATUS_AUTH_FAILED: u16 = 0x0201;
pub const STATUS_FORBIDDEN: u16 = 0x0202;
pub const STATUS_NOT_FOUND: u16 = 0x0203;
pub const STATUS_MISSING_PARAMETER: u16 = 0x0207;
pub const STATUS_INITIATOR_ERROR: u16 = 0x0200;
pub const STATUS_UNSUPPORTED_VERSION: u16 = 0x0205;
pub const STATUS_NO_SESSION: u16 = 0x020a;
pub const STATUS_INVALID_REQUEST: u16 = 0x020b;
pub const STATUS_TARGET_ERROR: u16 = 0x0300;

/// Data segments during login are at most this long (the RFC's default
/// MaxRecvDataSegmentLength, in force until the login ends).
const LOGIN_DATA_MAX: u32 = 8192;

/// A session that finished its login.
#[derive(Debug, Clone)]
pub struct Established {
    pub params: Params,
    pub session_type: SessionType,
    pub initiator: String,
    pub isid: [u8; 6],
    pub tsih: u16,
    /// The target logged in to (None for discovery).
    pub target: Option<TargetDef>,
    /// The CmdSN the first command will carry.
    pub exp_cmd_sn: u32,
    /// The StatSN of the next status sent.
    pub stat_sn: u32,
}

impl Established {
    /// The initiator port name (SAM): the I_T nexus's initiator half.
    pub fn initiator_port(&self) -> String {
        format!("{},i,0x{}", self.initiator, hex::encode(self.isid))
    }
}

/// Why a login did not reach the full feature phase.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{0}")]
    Pdu(#[from] PduError),
    /// Refused with a Login Response status (already sent).
    #[error("login refused ({status:#06x}): {why}")]
    Refused { status: u16, why: String },
    #[error("protocol error during login: {0}")]
    Protocol(String),
}

#[derive(Debug, PartialEq, Eq)]
enum AuthState {
    /// Nothing negotiated yet.
    Start,
    /// No authentication (allowed for this target).
    Open,
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    ChapAlgorithm,
    /// Challenge sent.
    ChapResponse { id: u8, challenge: [u8; 16] },
    /// Authenticated.
    Done,
}

struct Login<'a, C: Catalog> {
    portal: &'a Portal<C>,
    params: Params,
    session_type: Option<SessionType>,
    initiator: Option<String>,
    target: Option<TargetDef>,
    auth: AuthState,
    isid: [u8; 6],
    itt: u32,
    cmd_sn: u32,
    stat_sn: u32,
    /// The first response of the operational stage declares the target's
    /// own values; it happens once.
    declared: bool,
    sent_tpgt: bool,
}

/// Runs the login on `io`, whose first PDU has not been read yet. `tsih`
/// is the session handle to give a new session; `address` the portal
/// address, for SendTargets in discovery.
pub async fn login<S, C>(
    io: &mut S,
    portal: &Portal<C>,
    tsih: u16,
) -> Result<Established, LoginError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: Catalog,
{
    let mut l = Login {
        portal,
        params: Params {
            recv_data_max: RECV_DATA_MAX,
            ..Params::default()
        },
        session_type: None,
        initiator: None,
        target: None,
        auth: AuthState::Start,
        isid: [0; 6],
        itt: 0,
        cmd_sn: 0,
        stat_sn: 0,
        declared: false,
        sent_tpgt: false,
    };
    let mut first = true;
    loop {
        // One request, possibly split over several PDUs (C bit).
        let mut req = pdu::read_pdu(io, Digests::default(), LOGIN_DATA_MAX).await?;
        if req.opcode() != OP_LOGIN_REQ {
            return Err(LoginError::Protocol(format!(
                "opcode {:#04x} before the login finished",
                req.opcode()
            )));
        }
        if first {
            first = false;
            l.isid.copy_from_slice(&req.bhs[8..14]);
            l.stat_sn = req.exp_stat_sn();
            if req.u8(3) > 0 {
                // Version-min above what we speak (0).
                return l
                    .refuse(io, &req, STATUS_UNSUPPORTED_VERSION, "iSCSI version")
                    .await;
            }
            if req.u16(14) != 0 {
                return l
                    .refuse(
                        io,
                        &req,
                        STATUS_NO_SESSION,
                        "adding a connection to a session (MaxConnections is 1)",
                    )
                    .await;
            }
        }
        l.itt = req.itt();
        l.cmd_sn = req.cmd_sn();
        let mut text = req.data.to_vec();
        while req.flags() & CONTINUE != 0 {
            // An empty response asks for the next part (section 6.2).
            let mut ack = l.response(&req, 0);
            ack.bhs[1] = req.flags() & 0x0f;
            l.send(io, ack).await?;
            req = pdu::read_pdu(io, Digests::default(), LOGIN_DATA_MAX).await?;
            if req.opcode() != OP_LOGIN_REQ {
                return Err(LoginError::Protocol(
                    "a login continuation is not a login".into(),
                ));
            }
            text.extend_from_slice(&req.data);
            if text.len() > TEXT_MAX {
                return l
                    .refuse(io, &req, STATUS_INITIATOR_ERROR, "login text over 64 KiB")
                    .await;
            }
        }
        let keys = match text::parse(&text) {
            Ok(k) => k,
            Err(e) => return l.refuse(io, &req, STATUS_INITIATOR_ERROR, &e).await,
        };
        if let Some(done) = l.step(io, &req, keys, tsih).await? {
            return Ok(done);
        }
    }
}

impl<C: Catalog> Login<'_, C> {
    /// A login response to `req` with `status`, StatSN filled.
    fn response(&mut self, req: &Pdu, status: u16) -> Pdu {
        let mut r = Pdu::new(OP_LOGIN_RESP);
        r.bhs[8..14].copy_from_slice(&self.isid);
        r.set_u32(16, req.itt())
            .set_u32(24, self.stat_sn)
            .set_u32(28, self.cmd_sn)
            .set_u32(32, self.cmd_sn)
            .set_u16(36, status);
        self.stat_sn = self.stat_sn.wrapping_add(1);
        r
    }

    async fn send<S: AsyncWrite + Unpin>(&self, io: &mut S, r: Pdu) -> Result<(), LoginError> {
        let mut out = BytesMut::new();
        pdu::encode(&r, Digests::default(), &mut out);
        io.write_all(&out).await.map_err(PduError::Io)?;
        io.flush().await.map_err(PduError::Io)?;
        Ok(())
    }

    async fn refuse<S: AsyncWrite + Unpin, T>(
        &mut self,
        io: &mut S,
        req: &Pdu,
        status: u16,
        why: &str,
    ) -> Result<T, LoginError> {
        let mut r = self.response(req, status);
        r.bhs[1] = req.flags() & 0x0c; // CSG kept, T and NSG clear
                                       // A failed login gets no StatSN advance worth keeping; the
                                       // connection closes after it.
        let _ = self.send(io, r).await;
        Err(LoginError::Refused {
            status,
            why: why.to_string(),
        })
    }

    /// Handles one whole login request; Some when the session is up.
    async fn step<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        req: &Pdu,
        keys: Vec<(String, String)>,
        tsih: u16,
    ) -> Result<Option<Established>, LoginError> {
        let transit = req.flags() & FINAL != 0;
        let csg = (req.flags() >> 2) & 3;
        let nsg = req.flags() & 3;
        if csg == 2 || csg == STAGE_FULL_FEATURE || (transit && (nsg == 2 || nsg <= csg)) {
            return self
                .refuse(
                    io,
                    req,
                    STATUS_INVALID_REQUEST,
                    "bad login stage transition",
                )
                .await;
        }
        let mut answers: Vec<(String, String)> = Vec::new();
        for (k, v) in &keys {
            match k.as_str() {
                "InitiatorName" => self.initiator = Some(v.clone()),
                "SessionType" => {
                    self.session_type = Some(match v.as_str() {
                        "Discovery" => SessionType::Discovery,
                        "Normal" => SessionType::Normal,
                        _ => {
                            return self
                                .refuse(io, req, STATUS_INITIATOR_ERROR, "unknown SessionType")
                                .await
                        }
                    })
                }
                "TargetName" => {
                    let t = match self.portal.target(v).await {
                        Ok(t) => t,
                        Err(e) => {
                            return self
                                .refuse(io, req, STATUS_TARGET_ERROR, &format!("catalog: {e}"))
                                .await
                        }
                    };
                    match t {
                        Some(t) => self.target = Some(t),
                        None => {
                            return self
                                .refuse(io, req, STATUS_NOT_FOUND, &format!("no target {v}"))
                                .await
                        }
                    }
                }
                _ => {}
            }
        }
        let Some(initiator) = self.initiator.clone() else {
            return self
                .refuse(io, req, STATUS_MISSING_PARAMETER, "no InitiatorName")
                .await;
        };
        let session_type = *self.session_type.get_or_insert(SessionType::Normal);
        if session_type == SessionType::Normal {
            match &self.target {
                None => {
                    return self
                        .refuse(io, req, STATUS_MISSING_PARAMETER, "no TargetName")
                        .await
                }
                Some(t) if !t.allows(&initiator) => {
                    let why = format!("{initiator} is not in the ACL of {}", t.iqn);
                    return self.refuse(io, req, STATUS_FORBIDDEN, &why).await;
                }
                Some(_) => {}
            }
        }
        let auth: Option<Auth> = match session_type {
            SessionType::Discovery => self.portal.config.discovery_auth.clone(),
            SessionType::Normal => self.target.as_ref().and_then(|t| t.auth.clone()),
        };

        // Security stage keys.
        if csg == STAGE_SECURITY {
            if let Err(why) = self.security(&keys, auth.as_ref(), &mut answers) {
                return self.refuse(io, req, STATUS_AUTH_FAILED, &why).await;
            }
        } else if self.auth != AuthState::Done && self.auth != AuthState::Open {
            // Skipping the security stage is only for targets without auth.
            if auth.is_some() || self.auth != AuthState::Start {
                return self
                    .refuse(io, req, STATUS_AUTH_FAILED, "authentication is required")
                    .await;
            }
            self.auth = AuthState::Open;
        }

        // Operational keys, in whichever stage they come.
        for (k, v) in &keys {
            if text::is_login_key(k) {
                continue;
            }
            if let Some(a) = text::negotiate(k, v, &mut self.params, session_type) {
                answers.push(a);
            }
        }
        if session_type == SessionType::Normal && !self.sent_tpgt {
            answers.push(("TargetPortalGroupTag".into(), "1".into()));
            self.sent_tpgt = true;
        }
        if csg == STAGE_OPERATIONAL && !self.declared {
            self.declared = true;
            answers.push((
                "MaxRecvDataSegmentLength".into(),
                self.params.recv_data_max.to_string(),
            ));
        }

        // May the stage change?
        let stage_done = match csg {
            STAGE_SECURITY => matches!(self.auth, AuthState::Done | AuthState::Open),
            _ => true,
        };
        let go = transit && stage_done;
        let mut r = self.response(req, 0);
        r.bhs[1] = (csg << 2) | if go { FINAL | nsg } else { 0 };
        let done = go && nsg == STAGE_FULL_FEATURE;
        if done {
            r.set_u16(14, tsih);
        }
        r.data = Bytes::from(text::encode(&answers));
        if r.data.len() > LOGIN_DATA_MAX as usize {
            return self
                .refuse(io, req, STATUS_TARGET_ERROR, "login answer too long")
                .await;
        }
        debug!(
            stage = csg,
            transit = go,
            "login response: {} keys",
            answers.len()
        );
        self.send(io, r).await?;
        if !done {
            return Ok(None);
        }
        Ok(Some(Established {
            params: self.params.clone(),
            session_type,
            initiator,
            isid: self.isid,
            tsih,
            target: self.target.clone(),
            exp_cmd_sn: self.cmd_sn,
            stat_sn: self.stat_sn,
        }))
    }

    /// The security stage's keys: AuthMethod, then CHAP (RFC 1994 as RFC
    /// 7143 section 12.1.3 uses it). Errors are authentication failures.
    fn security(
        &mut self,
        keys: &[(String, String)],
        auth: Option<&Auth>,
        answers: &mut Vec<(String, String)>,
    ) -> Result<(), String> {
        let get = |k: &str| keys.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
        if let Some(methods) = get("AuthMethod") {
            let offered: Vec<&str> = methods.split(',').collect();
            let pick = match auth {
                Some(_) if offered.contains(&"CHAP") => "CHAP",
                Some(_) => {
                    answers.push(("AuthMethod".into(), "Reject".into()));
                    return Err(format!("CHAP is required; the initiator offered {methods}"));
                }
                None if offered.contains(&"None") => "None",
                None => {
                    return Err(format!(
                        "no authentication is configured; the initiator offered only {methods}"
                    ))
                }
            };
            answers.push(("AuthMethod".into(), pick.into()));
            self.auth = if pick == "CHAP" {
                AuthState::ChapAlgorithm
            } else {
                AuthState::Open
            };
            return Ok(());
        }
        match (&self.auth, auth) {
            (AuthState::Start, None) => {
                self.auth = AuthState::Open;
                Ok(())
            }
            (AuthState::Start, Some(_)) => Err("no AuthMethod offered; CHAP is required".into()),
            (AuthState::ChapAlgorithm, Some(_)) => {
                let algs = get("CHAP_A").ok_or("CHAP_A missing")?;
                if !algs.split(',').any(|a| a == "5") {
                    answers.push(("CHAP_A".into(), "Reject".into()));
                    return Err(format!("CHAP_A={algs}: only MD5 (5) is supported"));
                }
                let id: u8 = rand::random();
                let challenge: [u8; 16] = rand::random();
                answers.push(("CHAP_A".into(), "5".into()));
                answers.push(("CHAP_I".into(), id.to_string()));
                answers.push(("CHAP_C".into(), format!("0x{}", hex::encode(challenge))));
                self.auth = AuthState::ChapResponse { id, challenge };
                Ok(())
            }
            (AuthState::ChapResponse { id, challenge }, Some(auth)) => {
                let (id, challenge) = (*id, *challenge);
                let name = get("CHAP_N").ok_or("CHAP_N missing")?;
                let resp = decode_binary(get("CHAP_R").ok_or("CHAP_R missing")?)?;
                // Both the name and the response must match; the response
                // is compared in constant time.
                let want = chap_response(id, auth.chap.secret.expose(), &challenge);
                let ok_resp: bool = resp.as_slice().ct_eq(&want[..]).into();
                if name != auth.chap.user || !ok_resp {
                    return Err(format!("CHAP response for user {name:?} is wrong"));
                }
                // Mutual: the initiator challenges the target.
                match (get("CHAP_I"), get("CHAP_C")) {
                    (Some(i), Some(c)) => {
                        let Some(mutual) = &auth.mutual else {
                            return Err("the initiator asks for mutual CHAP, which this target has no secret for".into());
                        };
                        let i: u8 = i.parse().map_err(|_| format!("bad CHAP_I {i:?}"))?;
                        let c = decode_binary(c)?;
                        if c.len() < 8 || c == challenge {
                            // A reflected challenge would make the target
                            // answer its own question (RFC 7143 12.1.3).
                            return Err(
                                "the initiator's CHAP challenge is too short or ours".into()
                            );
                        }
                        let r = chap_response(i, mutual.secret.expose(), &c);
                        answers.push(("CHAP_N".into(), mutual.user.clone()));
                        answers.push(("CHAP_R".into(), format!("0x{}", hex::encode(r))));
                    }
                    (None, None) => {}
                    _ => return Err("CHAP_I and CHAP_C must come together".into()),
                }
                self.auth = AuthState::Done;
                Ok(())
            }
            (AuthState::Open | AuthState::Done, _) => Ok(()),
            _ => Err("unexpected security keys".into()),
        }
    }
}

/// CHAP's response: MD5(id || secret || challenge) (RFC 1994).
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Decodes a binary text value: `0x` hex or `0b` base64 (RFC 7143 6.1).
pub fn decode_binary(v: &str) -> Result<Vec<u8>, String> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        hex::decode(h).map_err(|e| format!("bad hex value: {e}"))
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|e| format!("bad base64 value: {e}"))
    } else {
        Err(format!(
            "binary value {v:?} is neither 0x hex nor 0b base64"
        ))
    }
}
