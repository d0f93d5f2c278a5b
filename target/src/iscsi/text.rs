//! Text keys (RFC 7143 sections 6 and 13): `key=value` pairs, each ended by
//! a NUL, in Login and Text PDUs, and the negotiation of the operational
//! keys this target understands.

/// Largest text (all PDUs of one request together) taken from a peer.
pub const TEXT_MAX: usize = 64 << 10;

/// Splits a data segment into `(key, value)` pairs. A pair without `=` or
/// with bytes that are not UTF-8 is an error (a protocol error at login).
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in data.split(|b| *b == 0) {
        if item.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(item).map_err(|_| "a text key is not UTF-8".to_string())?;
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("text item {s:?} has no '='"))?;
        if k.is_empty() || k.len() > 63 {
            return Err(format!("text key {k:?} is empty or longer than 63 bytes"));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encodes pairs as a data segment.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Session and connection parameters as negotiated (section 13), with the
/// defaults the RFC gives where a key was never sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest data segment this target may send (the initiator declared it).
    pub send_data_max: u32,
    /// Largest data segment this target accepts (it declared it).
    pub recv_data_max: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub error_recovery_level: u32,
    pub max_connections: u32,
}

/// What this target offers, the upper bounds of every numeric key.
pub const RECV_DATA_MAX: u32 = 256 << 10;
pub const MAX_BURST: u32 = 1 << 20;
pub const FIRST_BURST: u32 = 256 << 10;
pub const MAX_OUTSTANDING_R2T: u32 = 16;

impl Default for Params {
    fn default() -> Self {
        Params {
            header_digest: false,
            data_digest: false,
            send_data_max: 8192,
            recv_data_max: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
            default_time2wait: 2,
            default_time2retain: 20,
            error_recovery_level: 0,
            max_connections: 1,
        }
    }
}

/// Which kind of session the login is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

fn number(v: &str, lo: u32, hi: u32) -> Option<u32> {
    let n: u64 = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else {
        v.parse().ok()?
    };
    (n >= lo as u64 && n <= hi as u64).then_some(n as u32)
}

fn boolean(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

/// Keys that belong to the login and security stages and are answered
/// elsewhere ([`super::login`]), not here.
pub fn is_login_key(k: &str) -> bool {
    matches!(
        k,
        "InitiatorName" | "TargetName" | "SessionType" | "InitiatorAlias" | "AuthMethod"
    ) || k.starts_with("CHAP_")
}

/// Negotiates one operational key the initiator offered, updating
/// `params`, and returns the answer to send (None for declarative keys
/// that need none). Unknown keys are answered NotUnderstood, keys that do
/// not apply to a discovery session Irrelevant, and bad values Reject.
pub fn negotiate(
    key: &str,
    value: &str,
    params: &mut Params,
    session: SessionType,
) -> Option<(String, String)> {
    let normal_only = matches!(
        key,
        "MaxBurstLength"
            | "FirstBurstLength"
            | "ImmediateData"
            | "InitialR2T"
            | "MaxOutstandingR2T"
            | "DataPDUInOrder"
            | "DataSequenceInOrder"
            | "MaxConnections"
    );
    let answer = |v: String| Some((key.to_string(), v));
    if normal_only && session == SessionType::Discovery {
        return answer("Irrelevant".into());
    }
    match key {
        "HeaderDigest" | "DataDigest" => {
            // A list in the initiator's order of preference; take the
            // first we support.
            let pick = value.split(',').find(|c| *c == "CRC32C" || *c == "None");
            let Some(pick) = pick else {
                return answer("Reject".into());
            };
            let on = pick == "CRC32C";
            if key == "HeaderDigest" {
                params.header_digest = on;
            } else {
                params.data_digest = on;
            }
            answer(pick.into())
        }
        "MaxRecvDataSegmentLength" => match number(value, 512, (1 << 24) - 1) {
            // Declarative: the initiator says what it accepts.
            Some(n) => {
                params.send_data_max = n;
                None
            }
            None => answer("Reject".into()),
        },
        "MaxBurstLength" => match number(value, 512, (1 << 24) - 1) {
            Some(n) => {
                params.max_burst = n.min(MAX_BURST);
                answer(params.max_burst.to_string())
            }
            None => answer("Reject".into()),
        },
        "FirstBurstLength" => match number(value, 512, (1 << 24) - 1) {
            Some(n) => {
                params.first_burst = n.min(FIRST_BURST);
                answer(params.first_burst.to_string())
            }
            None => answer("Reject".into()),
        },
        "MaxConnections" => match number(value, 1, 65535) {
            // One connection per session: no MC/S (see the module notes).
            Some(_) => {
                params.max_connections = 1;
                answer("1".into())
            }
            None => answer("Reject".into()),
        },
        "MaxOutstandingR2T" => match number(value, 1, 65535) {
            Some(n) => {
                params.max_outstanding_r2t = n.min(MAX_OUTSTANDING_R2T);
                answer(params.max_outstanding_r2t.to_string())
            }
            None => answer("Reject".into()),
        },
        "DefaultTime2Wait" => match number(value, 0, 3600) {
            Some(n) => {
                params.default_time2wait = n.max(2);
                answer(params.default_time2wait.to_string())
            }
            None => answer("Reject".into()),
        },
        "DefaultTime2Retain" => match number(value, 0, 3600) {
            // Without error recovery there is nothing to retain.
            Some(_) => {
                params.default_time2retain = 0;
                answer("0".into())
            }
            None => answer("Reject".into()),
        },
        "ErrorRecoveryLevel" => match number(value, 0, 2) {
            Some(_) => {
                params.error_recovery_level = 0;
                answer("0".into())
            }
            None => answer("Reject".into()),
        },
        // Boolean AND: immediate data only if both want it.
        "ImmediateData" => match boolean(value) {
            Some(b) => {
                params.immediate_data = b;
                answer(yes_no(b))
            }
            None => answer("Reject".into()),
        },
        // Boolean OR, and this target wants Yes: data arrives in order
        // (offsets are still checked).
        "DataPDUInOrder" | "DataSequenceInOrder" => match boolean(value) {
            Some(_) => answer("Yes".into()),
            None => answer("Reject".into()),
        },
        // Boolean OR.
        "InitialR2T" => match boolean(value) {
            Some(b) => {
                params.initial_r2t = b;
                answer(yes_no(b))
            }
            None => answer("Reject".into()),
        },
        "IFMarker" | "OFMarker" => answer("No".into()),
        "OFMarkInt" | "IFMarkInt" => answer("Reject".into()),
        // Declarative extension keys some initiators send.
        "X-com.sun.iscsi.tcp.nodelay" => None,
        _ if key.starts_with("X-") || key.starts_with("X#") => answer("NotUnderstood".into()),
        _ => answer("NotUnderstood".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_parse_and_encode() {
        let p = parse(b"A=1\0B=x=y\0\0").unwrap();
        assert_eq!(
            p,
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(encode(&p), b"A=1\0B=x=y\0");
        assert!(parse(b"novalue\0").is_err());
        assert!(parse(b"=1\0").is_err());
        assert!(parse(&[0xff, b'=', b'1', 0]).is_err());
    }

    #[test]
    fn numeric_keys_take_the_minimum_and_booleans_combine() {
        let mut p = Params::default();
        let n = |k: &str, v: &str, p: &mut Params| negotiate(k, v, p, SessionType::Normal);
        assert_eq!(
            n("MaxBurstLength", "16776192", &mut p),
            Some(("MaxBurstLength".into(), MAX_BURST.to_string()))
        );
        assert_eq!(p.max_burst, MAX_BURST);
        assert_eq!(
            n("FirstBurstLength", "4096", &mut p).unwrap().1,
            "4096".to_string()
        );
        assert_eq!(p.first_burst, 4096);
        assert_eq!(n("MaxRecvDataSegmentLength", "4096", &mut p), None);
        assert_eq!(p.send_data_max, 4096);
        assert_eq!(n("ImmediateData", "No", &mut p).unwrap().1, "No");
        assert!(!p.immediate_data);
        assert_eq!(n("InitialR2T", "No", &mut p).unwrap().1, "No");
        assert!(!p.initial_r2t);
        assert_eq!(
            n("HeaderDigest", "CRC32C,None", &mut p).unwrap().1,
            "CRC32C"
        );
        assert!(p.header_digest);
        assert_eq!(n("DataDigest", "None", &mut p).unwrap().1, "None");
        assert_eq!(n("DataDigest", "MD5", &mut p).unwrap().1, "Reject");
        assert_eq!(n("MaxBurstLength", "0", &mut p).unwrap().1, "Reject");
        assert_eq!(n("MaxBurstLength", "abc", &mut p).unwrap().1, "Reject");
        assert_eq!(n("Frobnicate", "1", &mut p).unwrap().1, "NotUnderstood");
        assert_eq!(
            negotiate("MaxBurstLength", "4096", &mut p, SessionType::Discovery)
                .unwrap()
                .1,
            "Irrelevant"
        );
    }
}
