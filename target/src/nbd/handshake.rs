//! The fixed newstyle handshake: greeting, client flags, then options until
//! `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME` picks an export (or the client
//! aborts). Every malformed option gets an error reply and the haggling goes
//! on; only what cannot be framed (bad magic, an option too long to skip, an
//! unknown client flag, EXPORT_NAME of an unknown export) closes the
//! connection.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::wire::*;
use super::{Backend, Catalog, ExportInfo, BLOCK_MIN, BLOCK_PREFERRED, PAYLOAD_MAX};

/// Option data kept in memory, at most; longer options are skipped unread
/// and refused with `NBD_REP_ERR_TOO_BIG`. The largest legal GO carries a
/// 4 KiB name and a few info requests; 128 meta queries fit too.
pub const OPTION_DATA_MAX: u32 = 1 << 20;
/// Options one connection may send before it is closed (a client looping
/// on options holds a connection slot forever otherwise).
pub const OPTIONS_MAX: u32 = 4096;

/// What the handshake ends with.
pub enum Outcome<E> {
    /// Transmission starts on `export`.
    Go(Negotiated<E>),
    /// The client sent `NBD_OPT_ABORT` (answered) or closed cleanly between
    /// options.
    Ended,
}

/// The state transmission needs.
pub struct Negotiated<E> {
    pub export: Arc<E>,
    /// The size the client was told; the connection's bound, even if the
    /// volume grows while it is open (NBD cannot tell it).
    pub size: u64,
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub allocation: bool,
}

/// Why the connection was closed during the handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connection failed during the handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("client broke the handshake: {0}")]
    Protocol(String),
}

fn protocol(msg: impl Into<String>) -> HandshakeError {
    HandshakeError::Protocol(msg.into())
}

/// Runs the handshake on `io`.
pub async fn negotiate<S, C>(io: &mut S, catalog: &C) -> Result<Outcome<C::Export>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: Catalog,
{
    let mut greeting = [0u8; 18];
    greeting[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    io.write_all(&greeting).await?;
    io.flush().await?;

    let client_flags = match io.read_u32().await {
        Ok(f) => f,
        // A port probe (a health check, a test waiting for the listener).
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Outcome::Ended),
        Err(e) => return Err(e.into()),
    };
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(protocol(format!(
            "unknown client flags {client_flags:#x} (known: {known:#x})"
        )));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    let mut h = Haggle {
        catalog,
        structured: false,
        meta_export: None,
    };
    for _ in 0..OPTIONS_MAX {
        let mut header = [0u8; OPTION_HEADER_BYTES];
        match io.read_exact(&mut header).await {
            Ok(_) => {}
            // A client that hangs up between options (nbdinfo after LIST
            // without ABORT, a port probe) ends the session; not an error.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Outcome::Ended),
            Err(e) => return Err(e.into()),
        }
        let magic = u64::from_be_bytes(header[0..8].try_into().expect("8 bytes"));
        let opt = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
        if magic != IHAVEOPT {
            return Err(protocol(format!(
                "bad option magic {magic:#018x} (expected IHAVEOPT)"
            )));
        }
        if len > OPTION_DATA_MAX {
            if opt == OPT_EXPORT_NAME {
                return Err(protocol(format!(
                    "EXPORT_NAME with {len} bytes of data (at most {OPTION_DATA_MAX})"
                )));
            }
            skip(io, len as u64).await?;
            reply(
                io,
                option_error(
                    opt,
                    REP_ERR_TOO_BIG,
                    &format!(
                        "{} option with {len} bytes of data; at most {OPTION_DATA_MAX} are read",
                        option_name(opt)
                    ),
                ),
            )
            .await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        io.read_exact(&mut data).await?;
        match h.option(io, opt, &data, no_zeroes).await? {
            Step::Continue => {}
            Step::Done(outcome) => return Ok(outcome),
        }
    }
    Err(protocol(format!(
        "more than {OPTIONS_MAX} options without choosing an export"
    )))
}

/// Reads and drops `n` bytes.
async fn skip<S: AsyncRead + Unpin>(io: &mut S, n: u64) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut (&mut *io).take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

async fn reply<S: AsyncWrite + Unpin>(io: &mut S, b: bytes::Bytes) -> std::io::Result<()> {
    io.write_all(&b).await?;
    io.flush().await
}

enum Step<E> {
    Continue,
    Done(Outcome<E>),
}

struct Haggle<'a, C> {
    catalog: &'a C,
    structured: bool,
    /// The export whose `base:allocation` context was selected by the last
    /// SET_META_CONTEXT (canonical name).
    meta_export: Option<String>,
}

impl<C: Catalog> Haggle<'_, C> {
    async fn option<S>(
        &mut self,
        io: &mut S,
        opt: u32,
        data: &[u8],
        no_zeroes: bool,
    ) -> Result<Step<C::Export>, HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let fail = |reply_type: u32, msg: &str| option_error(opt, reply_type, msg);
        match opt {
            OPT_EXPORT_NAME => {
                let name = parse_export_name(data).map_err(|e| protocol(e.to_string()))?;
                let export = match self.catalog.open(&name).await {
                    Ok(Some(e)) => e,
                    Ok(None) => {
                        return Err(protocol(format!(
                            "EXPORT_NAME {name:?}: no such export (the protocol leaves no way \
                             to say so but closing)"
                        )))
                    }
                    Err(e) => return Err(protocol(format!("EXPORT_NAME {name:?}: {e}"))),
                };
                let info = export.info();
                let size = export.size();
                let allocation = self.meta_export.as_deref() == Some(info.name.as_str());
                reply(
                    io,
                    export_name_reply(
                        size,
                        super::transmission_flags(info, self.structured),
                        no_zeroes,
                    ),
                )
                .await?;
                Ok(Step::Done(Outcome::Go(Negotiated {
                    export,
                    size,
                    structured: self.structured,
                    allocation,
                })))
            }
            OPT_ABORT => {
                // The client may already have closed; the reply is a courtesy.
                let _ = reply(io, option_reply(opt, REP_ACK, &[])).await;
                Ok(Step::Done(Outcome::Ended))
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(io, fail(REP_ERR_INVALID, "LIST takes no data")).await?;
                    return Ok(Step::Continue);
                }
                match self.catalog.list().await {
                    Ok(exports) => {
                        for e in exports {
                            io.write_all(&rep_server(&e.name, &e.description)).await?;
                        }
                        reply(io, option_reply(opt, REP_ACK, &[])).await?;
                    }
                    Err(e) => {
                        reply(
                            io,
                            fail(REP_ERR_POLICY, &format!("cannot list exports: {e}")),
                        )
                        .await?
                    }
                }
                Ok(Step::Continue)
            }
            OPT_STARTTLS => {
                let r = if data.is_empty() {
                    fail(
                        REP_ERR_POLICY,
                        "TLS is not available on this server (cairn-target serves NBD without TLS)",
                    )
                } else {
                    fail(REP_ERR_INVALID, "STARTTLS takes no data")
                };
                reply(io, r).await?;
                Ok(Step::Continue)
            }
            OPT_INFO | OPT_GO => {
                let req = match parse_info(data) {
                    Ok(r) => r,
                    Err(e) => {
                        reply(io, fail(e.reply_type(), &e.to_string())).await?;
                        return Ok(Step::Continue);
                    }
                };
                let found = if opt == OPT_GO {
                    self.catalog.open(&req.name).await.map(|o| {
                        o.map(|e| {
                            // The size now: an open export may have grown.
                            let info = ExportInfo {
                                size: e.size(),
                                ..e.info().clone()
                            };
                            (info, Some(e))
                        })
                    })
                } else {
                    self.catalog
                        .lookup(&req.name)
                        .await
                        .map(|o| o.map(|i| (i, None)))
                };
                let Some((info, export)) = found_or_reply(io, opt, &req.name, found).await? else {
                    return Ok(Step::Continue);
                };
                self.send_info(io, opt, &info, &req.requests).await?;
                let Some(export) = export else {
                    return Ok(Step::Continue);
                };
                let allocation = self.meta_export.as_deref() == Some(info.name.as_str());
                Ok(Step::Done(Outcome::Go(Negotiated {
                    export,
                    size: info.size,
                    structured: self.structured,
                    allocation,
                })))
            }
            OPT_STRUCTURED_REPLY => {
                let r = if !data.is_empty() {
                    fail(REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
                } else if self.structured {
                    fail(REP_ERR_INVALID, "structured replies are already negotiated")
                } else {
                    self.structured = true;
                    option_reply(opt, REP_ACK, &[])
                };
                reply(io, r).await?;
                Ok(Step::Continue)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    // Replaced even when this option fails.
                    self.meta_export = None;
                }
                if !self.structured {
                    reply(
                        io,
                        fail(
                            REP_ERR_INVALID,
                            "negotiate structured replies (NBD_OPT_STRUCTURED_REPLY) first",
                        ),
                    )
                    .await?;
                    return Ok(Step::Continue);
                }
                let req = match parse_meta(data) {
                    Ok(r) => r,
                    Err(e) => {
                        reply(io, fail(e.reply_type(), &e.to_string())).await?;
                        return Ok(Step::Continue);
                    }
                };
                let found = self.catalog.lookup(&req.export).await;
                let Some(info) = found_or_reply(io, opt, &req.export, found).await? else {
                    return Ok(Step::Continue);
                };
                let selected = if set {
                    req.queries.iter().any(|q| meta_matches(q, true))
                } else {
                    req.queries.is_empty() || req.queries.iter().any(|q| meta_matches(q, false))
                };
                if selected {
                    let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
                    io.write_all(&rep_meta_context(opt, id, META_BASE_ALLOCATION))
                        .await?;
                    if set {
                        self.meta_export = Some(info.name);
                    }
                }
                reply(io, option_reply(opt, REP_ACK, &[])).await?;
                Ok(Step::Continue)
            }
            _ => {
                reply(
                    io,
                    fail(
                        REP_ERR_UNSUP,
                        &format!("option {opt} ({}) is not supported", option_name(opt)),
                    ),
                )
                .await?;
                Ok(Step::Continue)
            }
        }
    }

    async fn send_info<S: AsyncWrite + Unpin>(
        &self,
        io: &mut S,
        opt: u32,
        info: &ExportInfo,
        requests: &[u16],
    ) -> std::io::Result<()> {
        io.write_all(&info_export(
            opt,
            info.size,
            super::transmission_flags(info, self.structured),
        ))
        .await?;
        // Sent whether asked or not: the constraints are not the defaults.
        io.write_all(&info_block_size(
            opt,
            BLOCK_MIN,
            BLOCK_PREFERRED,
            PAYLOAD_MAX,
        ))
        .await?;
        if requests.contains(&INFO_NAME) {
            io.write_all(&info_string(opt, INFO_NAME, &info.name))
                .await?;
        }
        if requests.contains(&INFO_DESCRIPTION) {
            io.write_all(&info_string(opt, INFO_DESCRIPTION, &info.description))
                .await?;
        }
        reply(io, option_reply(opt, REP_ACK, &[])).await
    }
}

/// What a catalogue lookup found; when it found nothing (or failed), the
/// option's error reply is sent and None answered.
async fn found_or_reply<S: AsyncWrite + Unpin, T>(
    io: &mut S,
    opt: u32,
    name: &str,
    found: Result<Option<T>, String>,
) -> std::io::Result<Option<T>> {
    match found {
        Ok(Some(t)) => Ok(Some(t)),
        Ok(None) => {
            reply(io, unknown(opt, name)).await?;
            Ok(None)
        }
        Err(e) => {
            reply(
                io,
                option_error(opt, REP_ERR_POLICY, &format!("export {name:?}: {e}")),
            )
            .await?;
            Ok(None)
        }
    }
}

fn unknown(opt: u32, name: &str) -> bytes::Bytes {
    let what = if name.is_empty() {
        "there is no default export; name a volume (nbdinfo --list shows them)".to_string()
    } else {
        format!("no volume called {name:?}")
    };
    option_error(opt, REP_ERR_UNKNOWN, &what)
}
