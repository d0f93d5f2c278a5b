//! Exit statuses of `cairn`, and how an error picks one.
//!
//! | status | meaning |
//! | --- | --- |
//! | 0 | success (also `cluster status` on a degraded cluster: it reports) |
//! | 1 | failure: the cluster is unreachable, the server refused or failed |
//! | 2 | bad arguments or configuration (clap's usage errors are 2 as well) |
//! | 3 | not found: no such volume, snapshot or chunk server |
//!
//! The top-level `--help` (main.rs) repeats this table.
//!
//! With `--json` anywhere on the command line, an error is also printed on
//! stdout as one JSON object, `{"error": {"kind", "exit_code", "message"}}`
//! ([`json`]; `kind` is "failure", "usage" or "not_found"), so a script
//! reading stdout always gets JSON; the human line still goes to stderr.
//!
//! Commands return `anyhow::Error`s; [`code_for`] looks through the error's
//! chain for a [`Usage`] or [`NotFound`] marker, or a volume manager refusal
//! whose status says which case it is. Anything else is a failure (1).

use std::fmt;

use cairn_proto::volmgr::VolmgrStatus;
use cairn_volmgr::client::ClientError;

/// The cluster is unreachable, or the server refused or failed.
pub const FAILURE: u8 = 1;
/// Bad arguments or configuration.
pub const USAGE: u8 = 2;
/// The named volume does not exist.
pub const NOT_FOUND: u8 = 3;

/// Bad arguments or configuration: exit status 2.
#[derive(Debug)]
pub struct Usage(pub String);

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Something named does not exist: exit status 3.
#[derive(Debug)]
pub struct NotFound(pub String);

impl fmt::Display for NotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotFound {}

/// An error for exit status 2.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(msg.into()))
}

/// An error for exit status 3.
pub fn not_found(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(NotFound(msg.into()))
}

/// The word for an exit status in the JSON form of an error.
pub fn kind(code: u8) -> &'static str {
    match code {
        USAGE => "usage",
        NOT_FOUND => "not_found",
        _ => "failure",
    }
}

/// The JSON form of an error that exits with `code`.
pub fn json(code: u8, message: &str) -> serde_json::Value {
    serde_json::json!({
        "error": {
            "kind": kind(code),
            "exit_code": code,
            "message": message,
        }
    })
}

/// The exit status for `e`.
pub fn code_for(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.is::<Usage>() {
            return USAGE;
        }
        if cause.is::<NotFound>() {
            return NOT_FOUND;
        }
        if let Some(client) = cause.downcast_ref::<ClientError>() {
            return match client.status() {
                Some(VolmgrStatus::NotFound) => NOT_FOUND,
                Some(VolmgrStatus::InvalidArgument) => USAGE,
                _ => FAILURE,
            };
        }
    }
    FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    fn refused(status: VolmgrStatus) -> anyhow::Error {
        let r: Result<(), ClientError> = Err(ClientError::Refused {
            status,
            message: "no".into(),
        });
        r.context("volume \"x\"").unwrap_err()
    }

    #[test]
    fn codes_survive_context() {
        assert_eq!(code_for(&anyhow::anyhow!("boom")), FAILURE);
        assert_eq!(code_for(&usage("bad").context("outer")), USAGE);
        assert_eq!(code_for(&not_found("gone").context("outer")), NOT_FOUND);
        assert_eq!(code_for(&refused(VolmgrStatus::NotFound)), NOT_FOUND);
        assert_eq!(code_for(&refused(VolmgrStatus::InvalidArgument)), USAGE);
        assert_eq!(code_for(&refused(VolmgrStatus::AlreadyExists)), FAILURE);
        assert_eq!(
            code_for(&refused(VolmgrStatus::FailedPrecondition)),
            FAILURE
        );
        let unavailable: Result<(), ClientError> = Err(ClientError::Unavailable {
            waited: std::time::Duration::from_secs(1),
            members: "a".into(),
            last: "refused".into(),
        });
        assert_eq!(code_for(&unavailable.context("x").unwrap_err()), FAILURE);
    }
}
