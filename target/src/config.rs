//! Configuration of `cairn-target`: an optional TOML file (`--config`) and
//! command-line flags; a flag overrides the same key in the file (the key is
//! the flag's name with `_` for `-`). Unknown keys are an error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

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
    log_level: Option<String>,
    log_format: Option<LogFormat>,
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
    pub log_level: String,
    pub log_format: LogFormat,
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
            log_level: flags
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            log_format: flags.log_format.or(file.log_format).unwrap_or_default(),
        })
    }
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
        assert_eq!(keys, keys_from_flags(&Flags::command(), &["config"]));
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
}
