//! The iSCSI target (RFC 7143), beside NBD in `cairn-target` and over the
//! same [`crate::backend`] exports.
//!
//! - [`pdu`]: PDU bytes and digests (no I/O but a reader);
//! - [`text`]: `key=value` text and operational parameter negotiation;
//! - [`login`]: the login phase (security with CHAP, operational);
//! - [`session`]: the full feature phase of one connection: command
//!   numbering, immediate and solicited data (R2T), Data-In, task
//!   management, NOP, logout;
//! - [`scsi`]: SCSI commands on a LUN (SBC-3, SPC-4), with no iSCSI in it;
//! - [`serve`]: listeners, login deadline, LUNs shared across sessions,
//!   session reinstatement;
//! - here: which targets exist ([`Portal`]), who may log in to them.
//!
//! One connection per session (MaxConnections=1, no MC/S: Linux's and
//! VMware's initiators use one connection per session and multipath across
//! sessions) and ErrorRecoveryLevel 0: a connection failure ends its
//! session, and the initiator logs in again, as after a target restart.

pub mod login;
pub mod pdu;
pub mod scsi;
pub mod serve;
pub mod session;
pub mod text;

use std::fmt;
use std::sync::Arc;

use crate::backend::Catalog;

/// A CHAP secret: never printed, not even by `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// RFC 7143 section 12.1.3 asks for at least 96 bits of secret.
    pub const MIN_LEN: usize = 12;

    pub fn new(s: impl Into<String>) -> Result<Secret, String> {
        let s = s.into();
        if s.len() < Self::MIN_LEN || s.len() > 255 {
            return Err(format!(
                "a CHAP secret must be {} to 255 bytes long (it is {})",
                Self::MIN_LEN,
                s.len()
            ));
        }
        Ok(Secret(s))
    }

    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<hidden>)")
    }
}

/// One side's CHAP name and secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chap {
    pub user: String,
    pub secret: Secret,
}

/// How initiators must authenticate: CHAP, and with `mutual` the target
/// proves itself to an initiator that asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub chap: Chap,
    pub mutual: Option<Chap>,
}

/// One iSCSI target: an IQN, its LUNs (export names; LUN n is `luns[n]`),
/// which initiators may log in (empty: any) and how they authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetDef {
    pub iqn: String,
    pub luns: Vec<String>,
    pub initiators: Vec<String>,
    pub auth: Option<Auth>,
}

impl TargetDef {
    /// Whether `initiator` may log in (IQNs compare case-insensitively,
    /// RFC 3722).
    pub fn allows(&self, initiator: &str) -> bool {
        self.initiators.is_empty()
            || self
                .initiators
                .iter()
                .any(|i| i.eq_ignore_ascii_case(initiator))
    }
}

/// The iSCSI settings of one `cairn-target`.
#[derive(Debug, Clone, Default)]
pub struct IscsiConfig {
    /// Every volume is also its own target `<prefix>:<volume>`, LUN 0
    /// (when its name is valid in an IQN). None: only `targets`.
    pub auto_prefix: Option<String>,
    /// Auth for the automatic targets.
    pub auto_auth: Option<Auth>,
    /// Initiators allowed on the automatic targets (empty: any).
    pub auto_initiators: Vec<String>,
    /// Targets the admin defined.
    pub targets: Vec<TargetDef>,
    /// Auth for discovery sessions (None: open).
    pub discovery_auth: Option<Auth>,
}

/// The default prefix of the automatic targets' IQNs.
pub const AUTO_PREFIX_DEFAULT: &str = "iqn.2026-12.io.cairn";

/// Whether `s` is a valid iSCSI name in the iqn. form (RFC 3720 3.2.6.3.1,
/// after stringprep: lower case letters, digits, '-', '.', ':').
pub fn valid_iqn(s: &str) -> bool {
    s.len() <= 223
        && s.starts_with("iqn.")
        && s.len() > 4
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b))
}

/// Which targets this process serves, over a [`Catalog`] of exports.
pub struct Portal<C: Catalog> {
    pub catalog: C,
    pub config: IscsiConfig,
}

impl<C: Catalog> Portal<C> {
    pub fn new(catalog: C, config: IscsiConfig) -> Arc<Self> {
        Arc::new(Portal { catalog, config })
    }

    fn auto_target(&self, prefix: &str, volume: &str) -> Option<TargetDef> {
        // IQNs are lower case; volume names may not be.
        let iqn = format!("{prefix}:{}", volume.to_ascii_lowercase());
        valid_iqn(&iqn).then(|| TargetDef {
            iqn,
            luns: vec![volume.to_string()],
            initiators: self.config.auto_initiators.clone(),
            auth: self.config.auto_auth.clone(),
        })
    }

    /// The target called `iqn`, if it exists now (names compare
    /// case-insensitively).
    pub async fn target(&self, iqn: &str) -> Result<Option<TargetDef>, String> {
        let iqn = iqn.to_ascii_lowercase();
        if let Some(t) = self.config.targets.iter().find(|t| t.iqn == iqn) {
            return Ok(Some(t.clone()));
        }
        let Some(prefix) = &self.config.auto_prefix else {
            return Ok(None);
        };
        let Some(volume) = iqn
            .strip_prefix(prefix.as_str())
            .and_then(|r| r.strip_prefix(':'))
        else {
            return Ok(None);
        };
        let found = self.catalog.list().await?;
        Ok(found
            .iter()
            .find(|e| e.name.eq_ignore_ascii_case(volume) && !e.name.contains('@'))
            .and_then(|e| self.auto_target(prefix, &e.name))
            .filter(|t| t.iqn == iqn))
    }

    /// Every target, for SendTargets.
    pub async fn targets(&self) -> Result<Vec<TargetDef>, String> {
        let mut all = self.config.targets.clone();
        if let Some(prefix) = &self.config.auto_prefix {
            for e in self.catalog.list().await? {
                if e.name.contains('@') {
                    continue;
                }
                if let Some(t) = self.auto_target(prefix, &e.name) {
                    if !all.iter().any(|x| x.iqn == t.iqn) {
                        all.push(t);
                    }
                }
            }
        }
        Ok(all)
    }
}

/// The `SendTargets` answer (RFC 7143 appendix C): `which` is `All`, a
/// target name, or empty (the session's own target). Only targets
/// `initiator` may log in to are listed. A bad value gets `Reject`.
pub async fn send_targets<C: Catalog>(
    portal: &Portal<C>,
    which: &str,
    session_target: Option<&str>,
    initiator: &str,
    address: &str,
) -> Result<Vec<(String, String)>, String> {
    let all = portal.targets().await?;
    let want: Box<dyn Fn(&TargetDef) -> bool> = match which {
        "All" => Box::new(|_| true),
        "" => match session_target {
            Some(s) => {
                let s = s.to_ascii_lowercase();
                Box::new(move |t| t.iqn == s)
            }
            None => return Ok(vec![("SendTargets".into(), "Reject".into())]),
        },
        name if name.starts_with("iqn.")
            || name.starts_with("eui.")
            || name.starts_with("naa.") =>
        {
            let n = name.to_ascii_lowercase();
            Box::new(move |t| t.iqn == n)
        }
        _ => return Ok(vec![("SendTargets".into(), "Reject".into())]),
    };
    let mut out = Vec::new();
    for t in all.iter().filter(|t| want(t) && t.allows(initiator)) {
        out.push(("TargetName".to_string(), t.iqn.clone()));
        out.push(("TargetAddress".to_string(), format!("{address},1")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print_and_must_be_long_enough() {
        let s = Secret::new("0123456789ab").unwrap();
        assert_eq!(format!("{s:?}"), "Secret(<hidden>)");
        let a = Auth {
            chap: Chap {
                user: "u".into(),
                secret: s,
            },
            mutual: None,
        };
        assert!(!format!("{a:?}").contains("0123456789ab"));
        assert!(Secret::new("short").is_err());
    }

    #[test]
    fn iqns_are_checked() {
        assert!(valid_iqn("iqn.2026-12.io.cairn:pacs-db"));
        assert!(!valid_iqn("iqn.2026-12.io.cairn:Pacs"));
        assert!(!valid_iqn("iqn.2026-12.io.cairn:a_b"));
        assert!(!valid_iqn("eui.02004567A425678D"));
    }
}

#[cfg(test)]
mod protocol_tests;
