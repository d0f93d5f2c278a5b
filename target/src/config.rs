//! Configuration of `cairn-target`: an optional TOML file (`--config`) and
//! command-line flags; a flag overrides the same key in the file (the key is
//! the flag's name with `_` for `-`). Unknown keys are an error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::iscsi::{valid_iqn, Auth, Chap, IscsiConfig, Secret, TargetDef, AUTO_PREFIX_DEFAULT};
use crate::nbd::transmit::Limits;
use crate::nbd::PAYLOAD_MAX;

/// NBD's IANA port on loopback: a target started without configuration is
/// not reachable from other machines.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:10809";
pub const CONNECTIONS_MAX_DEFAULT: usize = 1024;
pub const REQUESTS_IN_FLIGHT_MAX_DEFAULT: usize = 128;
/// Two largest payloads.
pub const CONNECTION_BUFFER_BYTES_DEFAULT: u32 = 2 * PAYLOAD_MAX;
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 30_000;
pub const IO_TIMEOUT_MS_DEFAULT: u64 = 120_000;
/// The most `worker_threads` accepts (tokio's blocking pool aside).
pub const WORKER_THREADS_MAX: usize = 1024;

/// How log lines are written to stderr (shared by the daemons).
pub use cairn_daemon::LogFormat;

#[derive(Debug, Default, Parser)]
#[command(
    name = "cairn-target",
    version,
    about = "Cairn front end: exports every volume of a Cairn cluster over NBD, under its name.",
    after_help = "Every setting except --config can also be set in the config file, under the flag's name with '_' for '-' (--target-id is target_id). A flag overrides the file.\n\nExample:\n  cairn-target --volmgr 127.0.0.1:7400 --cluster-id prod --listen 0.0.0.0:10809\n  nbdinfo --list nbd://127.0.0.1\n\nExit status: 0 after a clean stop (SIGTERM or SIGINT), 2 for a configuration error, 1 for a failure while running."
)]
pub struct Flags {
    /// Read settings from this TOML file; flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Volume manager members as ADDR,ADDR,...; required.
    #[arg(long, value_name = "ADDRS")]
    pub volmgr: Option<String>,

    /// The cluster's id, checked by the volume manager; required.
    #[arg(long, value_name = "ID")]
    pub cluster_id: Option<String>,

    /// TCP address to serve NBD on; repeat for several [default: 127.0.0.1:10809].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,

    /// Also serve NBD on this unix socket (created at start, removed at a clean stop).
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,

    /// This target's id in the volume manager's export leases; give each target of a cluster its own [default: 1].
    #[arg(long, value_name = "N")]
    pub target_id: Option<u64>,

    /// Export every volume read-only (writes, trims and zeroing fail with EPERM).
    #[arg(long)]
    pub read_only: bool,

    /// The volume served to clients that ask for the default (empty) export name [default: none].
    #[arg(long, value_name = "NAME")]
    pub default_export: Option<String>,

    /// Client connections served at once; further connections are closed [default: 1024].
    #[arg(long, value_name = "N")]
    pub connections_max: Option<usize>,

    /// Requests one connection may have in flight before the target stops reading it [default: 128].
    #[arg(long, value_name = "N")]
    pub requests_in_flight_max: Option<usize>,

    /// Payload bytes one connection may hold at once, at least 33554432 (one largest request) [default: 67108864].
    #[arg(long, value_name = "BYTES")]
    pub connection_buffer_bytes: Option<u32>,

    /// A client must finish the NBD handshake within this many milliseconds [default: 30000].
    #[arg(long, value_name = "MS")]
    pub handshake_timeout_ms: Option<u64>,

    /// How long one I/O may keep retrying inside the cluster (failover, degraded groups) before the client gets EIO [default: 120000].
    #[arg(long, value_name = "MS")]
    pub io_timeout_ms: Option<u64>,

    /// TCP address to serve iSCSI on (3260 is iSCSI's port); repeat for several [default: none, no iSCSI].
    #[arg(long, value_name = "ADDR:PORT")]
    pub iscsi_listen: Vec<SocketAddr>,

    /// Every volume is also the iSCSI target PREFIX:VOLUME (lower case) with the volume as LUN 0 [default: iqn.2026-12.io.cairn].
    #[arg(long, value_name = "PREFIX")]
    pub iscsi_iqn_prefix: Option<String>,

    /// Serve those automatic per-volume targets; false leaves only the [[iscsi_target]] tables of the config file [default: true].
    #[arg(long, value_name = "BOOL")]
    pub iscsi_auto_targets: Option<bool>,

    /// Initiator IQNs allowed to log in to the automatic targets, as IQN,IQN,... [default: any].
    #[arg(long, value_name = "IQNS")]
    pub iscsi_initiators: Option<String>,

    /// CHAP user initiators must log in to the automatic targets as (with --iscsi-chap-secret-file) [default: no CHAP].
    #[arg(long, value_name = "NAME")]
    pub iscsi_chap_user: Option<String>,

    /// File holding that CHAP secret (its first line, 12 to 255 bytes; the file must not be readable by others).
    #[arg(long, value_name = "FILE")]
    pub iscsi_chap_secret_file: Option<PathBuf>,

    /// Mutual CHAP: the name the automatic targets answer an initiator's challenge as [default: none].
    #[arg(long, value_name = "NAME")]
    pub iscsi_mutual_chap_user: Option<String>,

    /// File holding the mutual CHAP secret (as --iscsi-chap-secret-file).
    #[arg(long, value_name = "FILE")]
    pub iscsi_mutual_chap_secret_file: Option<PathBuf>,

    /// CHAP user for discovery sessions (SendTargets) [default: discovery is open].
    #[arg(long, value_name = "NAME")]
    pub iscsi_discovery_chap_user: Option<String>,

    /// File holding the discovery CHAP secret.
    #[arg(long, value_name = "FILE")]
    pub iscsi_discovery_chap_secret_file: Option<PathBuf>,

    /// Threads that serve connections, 1 to 1024, or 0 for one per CPU. Fewer threads wake each other less: on a 2-CPU host one thread took a sixth (busy) to a third (queue depth 1) less CPU per request (ARCHITECTURE.md, "Worker threads"); give a target that shares its host with VMs or chunk servers a few [default: 0].
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,

    /// Log filter (tracing EnvFilter syntax); RUST_LOG, if set, takes precedence [default: info].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Log line format on stderr: text or journal [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    volmgr: Option<String>,
    cluster_id: Option<String>,
    listen: Option<Vec<SocketAddr>>,
    unix: Option<PathBuf>,
    target_id: Option<u64>,
    read_only: Option<bool>,
    default_export: Option<String>,
    connections_max: Option<usize>,
    requests_in_flight_max: Option<usize>,
    connection_buffer_bytes: Option<u32>,
    handshake_timeout_ms: Option<u64>,
    io_timeout_ms: Option<u64>,
    worker_threads: Option<usize>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    iscsi_listen: Option<Vec<SocketAddr>>,
    iscsi_iqn_prefix: Option<String>,
    iscsi_auto_targets: Option<bool>,
    iscsi_initiators: Option<String>,
    iscsi_chap_user: Option<String>,
    iscsi_chap_secret_file: Option<PathBuf>,
    iscsi_mutual_chap_user: Option<String>,
    iscsi_mutual_chap_secret_file: Option<PathBuf>,
    iscsi_discovery_chap_user: Option<String>,
    iscsi_discovery_chap_secret_file: Option<PathBuf>,
    /// Targets the admin defines (file only: `[[iscsi_target]]` tables).
    iscsi_target: Option<Vec<TargetSettings>>,
}

/// One `[[iscsi_target]]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSettings {
    iqn: String,
    luns: Vec<String>,
    #[serde(default)]
    initiators: Vec<String>,
    chap_user: Option<String>,
    chap_secret_file: Option<PathBuf>,
    mutual_chap_user: Option<String>,
    mutual_chap_secret_file: Option<PathBuf>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub volmgr: Vec<String>,
    pub cluster_id: String,
    pub listen: Vec<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub target_id: u64,
    pub read_only: bool,
    pub default_export: Option<String>,
    pub connections_max: usize,
    pub limits: Limits,
    pub handshake_timeout: Duration,
    pub io_timeout: Duration,
    /// Runtime worker threads; `None` is one per CPU.
    pub worker_threads: Option<usize>,
    pub log_level: String,
    pub log_format: LogFormat,
    /// Where to serve iSCSI (empty: not at all).
    pub iscsi_listen: Vec<SocketAddr>,
    pub iscsi: IscsiConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {}: {message}", .path.display())]
    File { path: PathBuf, message: String },
    #[error(
        "missing required setting: pass {flag} or set {key} in the config file (--config FILE)"
    )]
    Missing {
        flag: &'static str,
        key: &'static str,
    },
    #[error("invalid {key} = {value}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
}

fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl Config {
    pub fn from_args() -> Result<Config, ConfigError> {
        Config::resolve(Flags::parse())
    }

    pub fn resolve(flags: Flags) -> Result<Config, ConfigError> {
        let file = match &flags.config {
            Some(p) => read_file(p)?,
            None => FileSettings::default(),
        };
        let iscsi = iscsi_config(&flags_iscsi(&flags), &file)?;
        let iscsi_listen = if flags.iscsi_listen.is_empty() {
            file.iscsi_listen.clone().unwrap_or_default()
        } else {
            flags.iscsi_listen.clone()
        };
        let volmgr = flags.volmgr.or(file.volmgr).ok_or(ConfigError::Missing {
            flag: "--volmgr ADDRS",
            key: "volmgr",
        })?;
        let volmgr: Vec<String> = volmgr
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if volmgr.is_empty() {
            return Err(ConfigError::Invalid {
                key: "volmgr",
                value: "\"\"".into(),
                reason: "name at least one volume manager member".into(),
            });
        }
        let cluster_id = flags
            .cluster_id
            .or(file.cluster_id)
            .ok_or(ConfigError::Missing {
                flag: "--cluster-id ID",
                key: "cluster_id",
            })?;
        let mut listen = flags.listen;
        if listen.is_empty() {
            listen = file.listen.unwrap_or_default();
        }
        let unix = flags.unix.or(file.unix);
        if listen.is_empty() && unix.is_none() {
            listen.push(LISTEN_DEFAULT.parse().expect("default listen address"));
        }
        let target_id = flags.target_id.or(file.target_id).unwrap_or(1);
        if target_id == 0 {
            return Err(ConfigError::Invalid {
                key: "target_id",
                value: "0".into(),
                reason: "target ids start at 1".into(),
            });
        }
        let requests_max = flags
            .requests_in_flight_max
            .or(file.requests_in_flight_max)
            .unwrap_or(REQUESTS_IN_FLIGHT_MAX_DEFAULT);
        if !(1..=65536).contains(&requests_max) {
            return Err(ConfigError::Invalid {
                key: "requests_in_flight_max",
                value: requests_max.to_string(),
                reason: "must be from 1 to 65536".into(),
            });
        }
        let buffer_bytes = flags
            .connection_buffer_bytes
            .or(file.connection_buffer_bytes)
            .unwrap_or(CONNECTION_BUFFER_BYTES_DEFAULT);
        if buffer_bytes < PAYLOAD_MAX {
            return Err(ConfigError::Invalid {
                key: "connection_buffer_bytes",
                value: buffer_bytes.to_string(),
                reason: format!("must hold one largest request, {PAYLOAD_MAX} bytes"),
            });
        }
        let connections_max = flags
            .connections_max
            .or(file.connections_max)
            .unwrap_or(CONNECTIONS_MAX_DEFAULT);
        if connections_max == 0 {
            return Err(ConfigError::Invalid {
                key: "connections_max",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        let worker_threads = match flags.worker_threads.or(file.worker_threads) {
            None | Some(0) => None,
            Some(n) if n <= WORKER_THREADS_MAX => Some(n),
            Some(n) => {
                return Err(ConfigError::Invalid {
                    key: "worker_threads",
                    value: n.to_string(),
                    reason: format!("must be from 0 (one per CPU) to {WORKER_THREADS_MAX}"),
                })
            }
        };
        let ms = |v: Option<u64>, key: &'static str, default: u64| {
            let v = v.unwrap_or(default);
            if v == 0 {
                Err(ConfigError::Invalid {
                    key,
                    value: "0".into(),
                    reason: "must be above 0".into(),
                })
            } else {
                Ok(Duration::from_millis(v))
            }
        };
        Ok(Config {
            volmgr,
            cluster_id,
            listen,
            unix,
            target_id,
            read_only: flags.read_only || file.read_only.unwrap_or(false),
            default_export: flags.default_export.or(file.default_export),
            connections_max,
            limits: Limits {
                requests_max,
                buffer_bytes,
            },
            handshake_timeout: ms(
                flags.handshake_timeout_ms.or(file.handshake_timeout_ms),
                "handshake_timeout_ms",
                HANDSHAKE_TIMEOUT_MS_DEFAULT,
            )?,
            io_timeout: ms(
                flags.io_timeout_ms.or(file.io_timeout_ms),
                "io_timeout_ms",
                IO_TIMEOUT_MS_DEFAULT,
            )?,
            worker_threads,
            log_level: flags
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            log_format: flags.log_format.or(file.log_format).unwrap_or_default(),
            iscsi_listen,
            iscsi,
        })
    }
}

/// The iSCSI flags, cloned out of `Flags` before its other fields move.
struct IscsiFlags {
    prefix: Option<String>,
    auto: Option<bool>,
    initiators: Option<String>,
    chap: (Option<String>, Option<PathBuf>),
    mutual: (Option<String>, Option<PathBuf>),
    discovery: (Option<String>, Option<PathBuf>),
}

fn flags_iscsi(f: &Flags) -> IscsiFlags {
    IscsiFlags {
        prefix: f.iscsi_iqn_prefix.clone(),
        auto: f.iscsi_auto_targets,
        initiators: f.iscsi_initiators.clone(),
        chap: (f.iscsi_chap_user.clone(), f.iscsi_chap_secret_file.clone()),
        mutual: (
            f.iscsi_mutual_chap_user.clone(),
            f.iscsi_mutual_chap_secret_file.clone(),
        ),
        discovery: (
            f.iscsi_discovery_chap_user.clone(),
            f.iscsi_discovery_chap_secret_file.clone(),
        ),
    }
}

/// Reads a CHAP secret from its file: the first line, which must be 12 to
/// 255 bytes; the file must not be readable by everyone. The secret itself
/// never appears in an error.
fn read_secret(key: &'static str, path: &Path) -> Result<Secret, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let invalid = |reason: String| ConfigError::Invalid {
        key,
        value: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| invalid(format!("cannot read it: {e}")))?;
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(invalid(
            "the secret file is readable by every user; chmod o-r it".into(),
        ));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| invalid(format!("cannot read it: {e}")))?;
    Secret::new(text.lines().next().unwrap_or("").to_string()).map_err(invalid)
}

/// A user and a secret file make a [`Chap`]; one without the other is an
/// error naming both keys.
fn chap(
    user: Option<String>,
    file: Option<PathBuf>,
    user_key: &'static str,
    file_key: &'static str,
) -> Result<Option<Chap>, ConfigError> {
    match (user, file) {
        (None, None) => Ok(None),
        (Some(user), Some(file)) => Ok(Some(Chap {
            user,
            secret: read_secret(file_key, &file)?,
        })),
        (Some(_), None) => Err(ConfigError::Invalid {
            key: user_key,
            value: "set".into(),
            reason: format!("needs {file_key} too"),
        }),
        (None, Some(_)) => Err(ConfigError::Invalid {
            key: file_key,
            value: "set".into(),
            reason: format!("needs {user_key} too"),
        }),
    }
}

fn auth(
    one_way: Option<Chap>,
    mutual: Option<Chap>,
    key: &'static str,
) -> Result<Option<Auth>, ConfigError> {
    match (one_way, mutual) {
        (None, None) => Ok(None),
        (Some(chap), mutual) => Ok(Some(Auth { chap, mutual })),
        (None, Some(_)) => Err(ConfigError::Invalid {
            key,
            value: "set".into(),
            reason: "mutual CHAP needs one-way CHAP as well".into(),
        }),
    }
}

fn iqn_list(key: &'static str, v: &str) -> Result<Vec<String>, ConfigError> {
    v.split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s.starts_with("iqn.") || s.starts_with("eui.") || s.starts_with("naa.") {
                Ok(s)
            } else {
                Err(ConfigError::Invalid {
                    key,
                    value: s.clone(),
                    reason: "an initiator name starts with iqn., eui. or naa.".into(),
                })
            }
        })
        .collect()
}

fn iscsi_config(f: &IscsiFlags, file: &FileSettings) -> Result<IscsiConfig, ConfigError> {
    let prefix = f
        .prefix
        .clone()
        .or(file.iscsi_iqn_prefix.clone())
        .unwrap_or_else(|| AUTO_PREFIX_DEFAULT.to_string());
    if !valid_iqn(&prefix) {
        return Err(ConfigError::Invalid {
            key: "iscsi_iqn_prefix",
            value: prefix,
            reason: "an IQN is iqn.YYYY-MM.reversed.domain, in lower case letters, digits, '-', '.' and ':'".into(),
        });
    }
    let auto = f.auto.or(file.iscsi_auto_targets).unwrap_or(true);
    let initiators = match f.initiators.clone().or(file.iscsi_initiators.clone()) {
        Some(v) => iqn_list("iscsi_initiators", &v)?,
        None => Vec::new(),
    };
    let pick =
        |flag: &(Option<String>, Option<PathBuf>), u: &Option<String>, p: &Option<PathBuf>| {
            (flag.0.clone().or(u.clone()), flag.1.clone().or(p.clone()))
        };
    let (u, p) = pick(&f.chap, &file.iscsi_chap_user, &file.iscsi_chap_secret_file);
    let one_way = chap(u, p, "iscsi_chap_user", "iscsi_chap_secret_file")?;
    let (u, p) = pick(
        &f.mutual,
        &file.iscsi_mutual_chap_user,
        &file.iscsi_mutual_chap_secret_file,
    );
    let mutual = chap(
        u,
        p,
        "iscsi_mutual_chap_user",
        "iscsi_mutual_chap_secret_file",
    )?;
    let auto_auth = auth(one_way, mutual, "iscsi_mutual_chap_user")?;
    let (u, p) = pick(
        &f.discovery,
        &file.iscsi_discovery_chap_user,
        &file.iscsi_discovery_chap_secret_file,
    );
    let discovery_auth = auth(
        chap(
            u,
            p,
            "iscsi_discovery_chap_user",
            "iscsi_discovery_chap_secret_file",
        )?,
        None,
        "iscsi_discovery_chap_user",
    )?;
    let mut targets: Vec<TargetDef> = Vec::new();
    for t in file.iscsi_target.iter().flatten() {
        let iqn = t.iqn.to_ascii_lowercase();
        if !valid_iqn(&iqn) {
            return Err(ConfigError::Invalid {
                key: "iscsi_target.iqn",
                value: t.iqn.clone(),
                reason: "an IQN is iqn.YYYY-MM.reversed.domain[:name], in letters, digits, '-', '.' and ':'".into(),
            });
        }
        if t.luns.is_empty() || t.luns.len() > 256 {
            return Err(ConfigError::Invalid {
                key: "iscsi_target.luns",
                value: format!("{} LUNs for {iqn}", t.luns.len()),
                reason: "a target has 1 to 256 LUNs (volume names, LUN 0 first)".into(),
            });
        }
        if targets.iter().any(|x| x.iqn == iqn) {
            return Err(ConfigError::Invalid {
                key: "iscsi_target.iqn",
                value: iqn,
                reason: "defined twice".into(),
            });
        }
        let one_way = chap(
            t.chap_user.clone(),
            t.chap_secret_file.clone(),
            "iscsi_target.chap_user",
            "iscsi_target.chap_secret_file",
        )?;
        let mutual = chap(
            t.mutual_chap_user.clone(),
            t.mutual_chap_secret_file.clone(),
            "iscsi_target.mutual_chap_user",
            "iscsi_target.mutual_chap_secret_file",
        )?;
        targets.push(TargetDef {
            iqn,
            luns: t.luns.clone(),
            initiators: iqn_list("iscsi_target.initiators", &t.initiators.join(","))?,
            auth: auth(one_way, mutual, "iscsi_target.mutual_chap_user")?,
        });
    }
    Ok(IscsiConfig {
        auto_prefix: auto.then_some(prefix),
        auto_auth,
        auto_initiators: initiators,
        targets,
        discovery_auth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        Flags::parse_from(std::iter::once("cairn-target").chain(args.iter().copied()))
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(
            &path,
            "volmgr = \"127.0.0.1:1,127.0.0.1:2\"\ncluster_id = \"c\"\ntarget_id = 7\nlisten = [\"127.0.0.1:5000\"]\n",
        )
        .unwrap();
        let c = Config::resolve(flags(&[
            "--config",
            path.to_str().unwrap(),
            "--target-id",
            "9",
        ]))
        .unwrap();
        assert_eq!(c.volmgr, vec!["127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!(c.target_id, 9);
        assert_eq!(c.listen, vec!["127.0.0.1:5000".parse().unwrap()]);
        assert_eq!(c.limits.buffer_bytes, CONNECTION_BUFFER_BYTES_DEFAULT);
        assert_eq!(
            c.handshake_timeout,
            Duration::from_millis(HANDSHAKE_TIMEOUT_MS_DEFAULT)
        );
    }

    /// The annotated example loads with the real loader, documents every key
    /// FileSettings accepts (serde's own list), and every flag but --config
    /// is a key: adding a setting without its paragraph in the example fails.
    #[test]
    fn the_example_is_valid_and_documents_every_key() {
        use cairn_daemon::config_check::{
            accepted_keys, assert_example_documents, keys_from_flags,
        };
        use clap::CommandFactory;
        let text = include_str!("../../systemd/target.toml.example");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("target.toml");
        std::fs::write(&path, text).unwrap();
        let c = Config::resolve(Flags {
            config: Some(path),
            ..Flags::default()
        })
        .expect("the example resolves");
        assert_eq!(c.volmgr.len(), 3);
        assert_eq!(c.limits.buffer_bytes, CONNECTION_BUFFER_BYTES_DEFAULT);
        assert_eq!(c.limits.requests_max, REQUESTS_IN_FLIGHT_MAX_DEFAULT);
        assert_eq!(c.connections_max, CONNECTIONS_MAX_DEFAULT);
        assert_eq!(c.io_timeout, Duration::from_millis(IO_TIMEOUT_MS_DEFAULT));
        assert_eq!(c.log_format, LogFormat::Journal);

        let keys = accepted_keys::<FileSettings>();
        assert!(
            keys.contains("volmgr") && keys.contains("log_format"),
            "{keys:?}"
        );
        let mut from_flags = keys_from_flags(&Flags::command(), &["config"]);
        // The one file-only key: tables have no flag.
        from_flags.insert("iscsi_target".to_string());
        assert_eq!(keys, from_flags);
        assert_example_documents("systemd/target.toml.example", text, &keys);
    }

    #[test]
    fn bad_settings_are_named() {
        let e = Config::resolve(flags(&["--cluster-id", "c"])).unwrap_err();
        assert!(e.to_string().contains("--volmgr"), "{e}");
        let e = Config::resolve(flags(&[
            "--volmgr",
            "a:1",
            "--cluster-id",
            "c",
            "--connection-buffer-bytes",
            "4096",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("connection_buffer_bytes"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "volmgrr = \"x\"\n").unwrap();
        let e = Config::resolve(flags(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(e.to_string().contains("volmgrr"), "{e}");
    }

    #[test]
    fn worker_threads_from_flag_or_file_zero_means_one_per_cpu() {
        let base = ["--volmgr", "a:1", "--cluster-id", "c"];
        let with = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            Config::resolve(flags(&args))
        };
        assert_eq!(with(&[]).unwrap().worker_threads, None);
        assert_eq!(
            with(&["--worker-threads", "0"]).unwrap().worker_threads,
            None
        );
        assert_eq!(
            with(&["--worker-threads", "3"]).unwrap().worker_threads,
            Some(3)
        );
        let e = with(&["--worker-threads", "5000"]).unwrap_err();
        assert!(e.to_string().contains("worker_threads"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "worker_threads = 2\n").unwrap();
        let c = with(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.worker_threads, Some(2));
        let c = with(&["--config", path.to_str().unwrap(), "--worker-threads", "1"]).unwrap();
        assert_eq!(c.worker_threads, Some(1));
    }
}
