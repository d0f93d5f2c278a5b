//! Configuration of `cairn-chunkserver`: an optional TOML file (`--config`)
//! and command-line flags. A flag given on the command line overrides the same
//! setting in the file; a setting in neither takes its default. The file's
//! keys are the flags' names with `_` for `-` (`--ring-entries` is
//! `ring_entries`), except `--config` and `--init`, which exist only as flags.
//!
//! Unknown keys are an error (a misspelt key silently ignored is a setting
//! silently not applied), and every error names the flag, the key and, for a
//! file, the file and line.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Parser, ValueEnum};
use serde::Deserialize;
use thiserror::Error;

use crate::rpc::ServerConfig;
use crate::store::{IoMode, StoreOptions, ENGINES_MAX};

/// Default listen address. Port 7410 is Cairn's chunk RPC port; the loopback
/// address keeps a server started without configuration from being reachable
/// from other machines. Production configs set `listen` explicitly.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7410";
pub const RING_ENTRIES_DEFAULT: u32 = 1024;
/// Below this the engine cannot keep a few chained operations in flight.
pub const RING_ENTRIES_MIN: u32 = 16;
/// The kernel's limit on an io_uring's submission queue (IORING_MAX_ENTRIES).
pub const RING_ENTRIES_MAX: u32 = 32768;
pub const OPEN_EXTENTS_MAX_DEFAULT: usize = 1024;
/// Per connection.
pub const REQUESTS_IN_FLIGHT_MAX_DEFAULT: usize = 256;
pub const CONNECTIONS_MAX_DEFAULT: usize = 1024;
/// The data directory's file system must have this much free space at start.
/// An absolute amount rather than a percentage, so small test file systems
/// and large disks behave alike; configurable for both.
pub const FREE_BYTES_MIN_DEFAULT: u64 = 16 << 20;
pub const LOG_LEVEL_DEFAULT: &str = "info";
/// Longest cluster id; it is written into every data directory's identity.
pub const CLUSTER_ID_BYTES_MAX: usize = 128;

/// How log lines are written to stderr (shared by the daemons).
pub use cairn_daemon::LogFormat;

/// `--io-mode` values; the store's [`IoMode`] has no clap derive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IoModeFlag {
    Direct,
    Buffered,
}

impl From<IoModeFlag> for IoMode {
    fn from(flag: IoModeFlag) -> Self {
        match flag {
            IoModeFlag::Direct => IoMode::Direct,
            IoModeFlag::Buffered => IoMode::Buffered,
        }
    }
}

/// How the chunk server uses threads (`--threads`, TOML `threads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Threads {
    /// One current-thread runtime; the store's engine is one of its tasks.
    #[default]
    Single,
    /// A multi-thread runtime and engine threads of their own.
    Multi,
}

impl Threads {
    /// The flag's value, as `--threads` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Threads::Single => "single",
            Threads::Multi => "multi",
        }
    }
}

/// Command-line flags. Every setting is optional here so that the file can
/// supply it; defaults are applied after merging, in [`Config::resolve`].
/// The defaults named in the help are checked against the constants by a test.
#[derive(Debug, Default, Parser)]
#[command(
    name = "cairn-chunkserver",
    version,
    about = "Cairn chunk server: stores checksummed volume extents on local disk and serves them over the chunk RPC.",
    after_help = "Every setting except --config and --init can also be set in the config file, under the flag's name with '_' for '-' (--ring-entries is ring_entries). A flag overrides the file.\n\nExit status: 0 after a clean stop (SIGTERM or SIGINT), 2 for a configuration or data directory error, 1 for a failure while running."
)]
pub struct Flags {
    /// Read settings from this TOML file; flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Data directory of this node (holds identity.toml, LOCK and extents/); required.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Address and port to serve the chunk RPC on [default: 127.0.0.1:7410].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,

    /// Cluster this node belongs to, checked against the data directory's identity; required.
    #[arg(long, value_name = "ID")]
    pub cluster_id: Option<String>,

    /// Node id of this server in the cluster, checked against the data directory's identity; required.
    #[arg(long, value_name = "N")]
    pub node_id: Option<u64>,

    /// Format the data directory as this cluster's node if it is empty (a no-op if it already is that node).
    #[arg(long)]
    pub init: bool,

    /// How extent data is written: direct (O_DIRECT) or buffered (through the page cache, for file systems without O_DIRECT) [default: direct].
    #[arg(long, value_name = "MODE")]
    io_mode: Option<IoModeFlag>,

    /// Submission queue entries of the store's io_uring, a power of two from 16 to 32768 [default: 1024].
    #[arg(long, value_name = "N")]
    pub ring_entries: Option<u32>,

    /// Extents the store keeps open at once, each holding two file descriptors and its checksum slots (about 28 KiB for a 4 MiB extent) [default: 1024].
    #[arg(long, value_name = "N")]
    pub open_extents_max: Option<usize>,

    /// Store engines, each with its own io_uring and its share of the extents; 0 means one per CPU, at most 8, with --threads multi (threads of their own), and 1 with --threads single (tasks of the one thread) [default: 0].
    #[arg(long, value_name = "N")]
    pub store_engines: Option<usize>,

    /// single: one thread runs the RPC connections, replication and the store's io_uring (its engine a task beside them), so a request is read, stored and answered without waking another thread; one chunk server per disk, as Vitastor runs one OSD thread per disk. multi: two runtime workers plus --store-engines engine threads, for one chunk server driving several fast disks. See ARCHITECTURE.md, "Thread per core" [default: single].
    #[arg(long, value_name = "MODE")]
    threads: Option<Threads>,

    /// Requests one connection may have in flight before the server stops reading it [default: 256].
    #[arg(long, value_name = "N")]
    pub requests_in_flight_max: Option<usize>,

    /// Client connections served at once; further connections are closed [default: 1024].
    #[arg(long, value_name = "N")]
    pub connections_max: Option<usize>,

    /// Refuse to start if the data directory's file system has fewer free bytes than this [default: 16777216].
    #[arg(long, value_name = "BYTES")]
    pub free_bytes_min: Option<u64>,

    /// Log filter (tracing EnvFilter syntax, e.g. "info" or "info,cairn_chunkserver=debug"); RUST_LOG, if set, takes precedence [default: info].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Log line format on stderr: text (with timestamps) or journal (without, for systemd) [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Volume manager members to register with and heartbeat, as ADDR,ADDR,...; without it the server runs on its own (tests, benchmarks).
    #[arg(long, value_name = "ADDRS")]
    pub volmgr: Option<String>,

    /// The address clients and other chunk servers use to reach this one, registered with the volume manager [default: --listen].
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<SocketAddr>,

    /// Failure domain: this server's host name [default: the system's host name].
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,

    /// Failure domain: the rack this server is in [default: none].
    #[arg(long, value_name = "NAME")]
    pub rack: Option<String>,

    /// Failure domain: the room (or site) this server is in [default: none].
    #[arg(long, value_name = "NAME")]
    pub room: Option<String>,

    /// Placement weight at first registration, usually its capacity in TiB; later changes are the admin's [default: 1].
    #[arg(long, value_name = "N")]
    pub weight: Option<u32>,

    /// Milliseconds between garbage collection passes, which delete the extent versions of deleted volumes and snapshots (with --volmgr only) [default: 60000].
    #[arg(long, value_name = "MS")]
    pub gc_interval_ms: Option<u64>,
}

/// The config file's contents. Same names as [`Flags`]; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    cluster_id: Option<String>,
    node_id: Option<u64>,
    io_mode: Option<IoMode>,
    ring_entries: Option<u32>,
    open_extents_max: Option<usize>,
    store_engines: Option<usize>,
    threads: Option<Threads>,
    requests_in_flight_max: Option<usize>,
    connections_max: Option<usize>,
    free_bytes_min: Option<u64>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    volmgr: Option<String>,
    advertise: Option<SocketAddr>,
    host: Option<String>,
    rack: Option<String>,
    room: Option<String>,
    weight: Option<u32>,
    gc_interval_ms: Option<u64>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub cluster_id: String,
    pub node_id: u64,
    pub init: bool,
    pub store: StoreOptions,
    /// How the process uses threads; `Single` makes the store's engines
    /// tasks of its one runtime thread ([`StoreOptions::inline`]).
    pub threads: Threads,
    pub requests_in_flight_max: usize,
    pub connections_max: usize,
    pub free_bytes_min: u64,
    pub log_level: String,
    pub log_format: LogFormat,
    /// Volume manager members; empty: do not register.
    pub volmgr: Vec<String>,
    pub advertise: SocketAddr,
    pub host: String,
    pub rack: String,
    pub room: String,
    pub weight: u32,
    /// Between garbage collection passes (see `collector.rs`).
    pub gc_interval: std::time::Duration,
    /// The file the settings were read from, if any (for messages).
    pub config_file: Option<PathBuf>,
}

/// Where a setting's value came from, so an error can say what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Flag(&'static str),
    File(PathBuf),
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => write!(f, "from {flag}"),
            Origin::File(path) => write!(f, "from config file {}", path.display()),
            Origin::Default => write!(f, "the default"),
        }
    }
}

/// A setting that has neither a flag nor a key in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingSetting {
    pub flag: &'static str,
    pub value_name: &'static str,
    pub key: &'static str,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", .path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file is not valid TOML, has an unknown key, or a value of the wrong
    /// type. `key` is the key on the offending line when there is one.
    #[error("config file {}{}: {message}", .path.display(), location(.key, .line))]
    File {
        path: PathBuf,
        key: Option<String>,
        line: Option<usize>,
        message: String,
    },

    #[error("missing required {}: {}", if .0.len() == 1 { "setting" } else { "settings" }, missing_list(.0))]
    Missing(Vec<MissingSetting>),

    #[error("invalid {key} = {value} ({origin}): {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        origin: Origin,
        reason: String,
    },

    #[error("current directory unavailable while resolving {}: {source}", .path.display())]
    CurrentDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn location(key: &Option<String>, line: &Option<usize>) -> String {
    match (key, line) {
        (Some(key), Some(line)) => format!(", key `{key}` (line {line})"),
        (Some(key), None) => format!(", key `{key}`"),
        (None, Some(line)) => format!(", line {line}"),
        (None, None) => String::new(),
    }
}

fn missing_list(missing: &[MissingSetting]) -> String {
    let items: Vec<String> = missing
        .iter()
        .map(|m| {
            format!(
                "pass {} {} or set {} in the config file (--config FILE)",
                m.flag, m.value_name, m.key
            )
        })
        .collect();
    items.join("; ")
}

impl Config {
    /// Parses the process's command line (exiting on `--help`, `--version`
    /// and malformed flags, as clap does) and reads the config file it names.
    pub fn from_args() -> Result<Config, ConfigError> {
        Config::resolve(Flags::parse())
    }

    /// Merges `flags` over the file they name, applies defaults and checks
    /// every value.
    pub fn resolve(flags: Flags) -> Result<Config, ConfigError> {
        let (file, file_path) = match &flags.config {
            Some(path) => (read_file(path)?, Some(path.clone())),
            None => (FileSettings::default(), None),
        };
        merge(flags, file, file_path)
    }

    /// The options handed to [`Store::open`](crate::store::Store::open).
    pub fn store_options(&self) -> StoreOptions {
        self.store.clone()
    }

    /// The options handed to [`serve`](crate::rpc::serve).
    pub fn server_config(&self) -> ServerConfig {
        ServerConfig {
            cluster_id: self.cluster_id.clone(),
            node_id: self.node_id,
            data_dir: self.data_dir.clone(),
            requests_in_flight_max: self.requests_in_flight_max,
            connections_max: self.connections_max,
            ..ServerConfig::default()
        }
    }
}

fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file(path, &text)
}

fn parse_file(path: &Path, text: &str) -> Result<FileSettings, ConfigError> {
    let mut settings: FileSettings =
        toml::from_str(text).map_err(|e| file_error(path, text, &e))?;
    // A relative data_dir in a file means relative to that file, so the same
    // file works whatever the daemon's working directory (/ under systemd).
    if let Some(dir) = &settings.data_dir {
        if dir.is_relative() {
            let base = path.parent().unwrap_or(Path::new("."));
            settings.data_dir = Some(base.join(dir));
        }
    }
    Ok(settings)
}

/// Turns a TOML error into one paragraph naming the file, line and key.
/// toml's own Display draws a multi-line excerpt, which reads badly in a
/// journal; the key comes from the offending line, since the type errors
/// (`invalid type: string "x", expected u64`) do not name it.
fn file_error(path: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    let (line, key) = match error.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line_number = text[..start].matches('\n').count() + 1;
            let line_text = text.lines().nth(line_number - 1).unwrap_or("");
            (Some(line_number), key_on_line(line_text))
        }
        None => (None, None),
    };
    ConfigError::File {
        path: path.to_path_buf(),
        key,
        line,
        message: error.message().trim().replace('\n', " "),
    }
}

/// The key of a `key = value` line, if the line is one.
fn key_on_line(line: &str) -> Option<String> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    bare.then(|| key.to_string())
}

/// Picks the flag's value if given, else the file's, else none, and records
/// where it came from.
fn pick<T>(
    flag: Option<T>,
    flag_name: &'static str,
    file: Option<T>,
    file_path: &Option<PathBuf>,
) -> Option<(T, Origin)> {
    match (flag, file, file_path) {
        (Some(v), _, _) => Some((v, Origin::Flag(flag_name))),
        (None, Some(v), Some(path)) => Some((v, Origin::File(path.clone()))),
        // A file value without a file path cannot happen; treat it as a default.
        (None, Some(v), None) => Some((v, Origin::Default)),
        (None, None, _) => None,
    }
}

fn merge(
    flags: Flags,
    file: FileSettings,
    file_path: Option<PathBuf>,
) -> Result<Config, ConfigError> {
    let fp = &file_path;
    let data_dir = pick(flags.data_dir, "--data-dir", file.data_dir, fp);
    let cluster_id = pick(flags.cluster_id, "--cluster-id", file.cluster_id, fp);
    let node_id = pick(flags.node_id, "--node-id", file.node_id, fp);

    let mut missing = Vec::new();
    if data_dir.is_none() {
        missing.push(MissingSetting {
            flag: "--data-dir",
            value_name: "DIR",
            key: "data_dir",
        });
    }
    if cluster_id.is_none() {
        missing.push(MissingSetting {
            flag: "--cluster-id",
            value_name: "ID",
            key: "cluster_id",
        });
    }
    if node_id.is_none() {
        missing.push(MissingSetting {
            flag: "--node-id",
            value_name: "N",
            key: "node_id",
        });
    }
    let (Some((data_dir, _)), Some((cluster_id, cluster_origin)), Some(node_id)) =
        (data_dir, cluster_id, node_id)
    else {
        return Err(ConfigError::Missing(missing));
    };
    check_cluster_id(&cluster_id, cluster_origin)?;
    let node_id = check_node_id(node_id)?;
    // Absolute, so every message and the LOCK pid note name a full path.
    let data_dir = std::path::absolute(&data_dir).map_err(|source| ConfigError::CurrentDir {
        path: data_dir.clone(),
        source,
    })?;

    let listen = match flags.listen.or(file.listen) {
        Some(addr) => addr,
        None => LISTEN_DEFAULT
            .parse()
            .expect("LISTEN_DEFAULT is a valid socket address"),
    };
    let io_mode = flags
        .io_mode
        .map(IoMode::from)
        .or(file.io_mode)
        .unwrap_or_default();

    let (ring_entries, origin) = pick(flags.ring_entries, "--ring-entries", file.ring_entries, fp)
        .unwrap_or((RING_ENTRIES_DEFAULT, Origin::Default));
    if !ring_entries.is_power_of_two()
        || !(RING_ENTRIES_MIN..=RING_ENTRIES_MAX).contains(&ring_entries)
    {
        return Err(ConfigError::Invalid {
            key: "ring_entries",
            value: ring_entries.to_string(),
            origin,
            reason: format!("must be a power of two from {RING_ENTRIES_MIN} to {RING_ENTRIES_MAX}"),
        });
    }
    let open_extents_max = at_least_one(
        "open_extents_max",
        pick(
            flags.open_extents_max,
            "--open-extents-max",
            file.open_extents_max,
            fp,
        ),
        OPEN_EXTENTS_MAX_DEFAULT,
    )?;
    let (store_engines, origin) = pick(
        flags.store_engines,
        "--store-engines",
        file.store_engines,
        fp,
    )
    .unwrap_or((0, Origin::Default));
    if store_engines > ENGINES_MAX {
        return Err(ConfigError::Invalid {
            key: "store_engines",
            value: store_engines.to_string(),
            origin,
            reason: format!("must be from 0 (one per CPU) to {ENGINES_MAX}"),
        });
    }
    let threads = flags.threads.or(file.threads).unwrap_or_default();
    let requests_in_flight_max = at_least_one(
        "requests_in_flight_max",
        pick(
            flags.requests_in_flight_max,
            "--requests-in-flight-max",
            file.requests_in_flight_max,
            fp,
        ),
        REQUESTS_IN_FLIGHT_MAX_DEFAULT,
    )?;
    let connections_max = at_least_one(
        "connections_max",
        pick(
            flags.connections_max,
            "--connections-max",
            file.connections_max,
            fp,
        ),
        CONNECTIONS_MAX_DEFAULT,
    )?;
    let free_bytes_min = flags
        .free_bytes_min
        .or(file.free_bytes_min)
        .unwrap_or(FREE_BYTES_MIN_DEFAULT);
    let log_level = flags
        .log_level
        .or(file.log_level)
        .unwrap_or_else(|| LOG_LEVEL_DEFAULT.to_string());
    let log_format = flags.log_format.or(file.log_format).unwrap_or_default();
    let (volmgr, volmgr_origin) = match pick(flags.volmgr, "--volmgr", file.volmgr, fp) {
        Some((list, origin)) => (
            list.split(',')
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect::<Vec<_>>(),
            origin,
        ),
        None => (Vec::new(), Origin::Default),
    };
    for addr in &volmgr {
        if addr.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::Invalid {
                key: "volmgr",
                value: addr.clone(),
                origin: volmgr_origin.clone(),
                reason: "each volume manager member is an IP:PORT address".into(),
            });
        }
    }
    let (advertise, advertise_origin) = pick(flags.advertise, "--advertise", file.advertise, fp)
        .unwrap_or((listen, Origin::Default));
    if !volmgr.is_empty() && (advertise.ip().is_unspecified() || advertise.port() == 0) {
        return Err(ConfigError::Invalid {
            key: "advertise",
            value: advertise.to_string(),
            origin: advertise_origin,
            reason: "registering with a volume manager needs the address others reach this server at: give --advertise".into(),
        });
    }
    let host = match flags.host.or(file.host) {
        Some(h) => h,
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into()),
    };
    let rack = flags.rack.or(file.rack).unwrap_or_default();
    let room = flags.room.or(file.room).unwrap_or_default();
    let weight = flags.weight.or(file.weight).unwrap_or(1);
    let gc_interval_ms = flags
        .gc_interval_ms
        .or(file.gc_interval_ms)
        .unwrap_or(60_000);
    if gc_interval_ms == 0 {
        return Err(ConfigError::Invalid {
            key: "gc_interval_ms",
            value: "0".into(),
            origin: if flags.gc_interval_ms.is_some() {
                Origin::Flag("--gc-interval-ms")
            } else {
                Origin::File(file_path.clone().unwrap_or_default())
            },
            reason: "must be at least 1".into(),
        });
    }

    Ok(Config {
        data_dir,
        listen,
        cluster_id,
        node_id,
        init: flags.init,
        store: StoreOptions {
            io_mode,
            ring_entries,
            open_extents_max,
            engines: store_engines,
            inline: threads == Threads::Single,
        },
        threads,
        requests_in_flight_max,
        connections_max,
        free_bytes_min,
        log_level,
        log_format,
        volmgr,
        advertise,
        host,
        rack,
        room,
        weight,
        gc_interval: std::time::Duration::from_millis(gc_interval_ms),
        config_file: file_path,
    })
}

fn at_least_one(
    key: &'static str,
    picked: Option<(usize, Origin)>,
    default: usize,
) -> Result<usize, ConfigError> {
    let (value, origin) = picked.unwrap_or((default, Origin::Default));
    if value == 0 {
        return Err(ConfigError::Invalid {
            key,
            value: value.to_string(),
            origin,
            reason: "must be at least 1".to_string(),
        });
    }
    Ok(value)
}

/// Node ids are stored as TOML integers (identity.toml), which are i64.
fn check_node_id((node_id, origin): (u64, Origin)) -> Result<u64, ConfigError> {
    if i64::try_from(node_id).is_err() {
        return Err(ConfigError::Invalid {
            key: "node_id",
            value: node_id.to_string(),
            origin,
            reason: format!("must be at most {} (the largest TOML integer)", i64::MAX),
        });
    }
    Ok(node_id)
}

/// Cluster ids are written into identity files, logs and map entries; a
/// restricted alphabet keeps them unambiguous in all of those.
fn check_cluster_id(id: &str, origin: Origin) -> Result<(), ConfigError> {
    let reason = if id.is_empty() {
        Some("must not be empty".to_string())
    } else if id.len() > CLUSTER_ID_BYTES_MAX {
        Some(format!("must be at most {CLUSTER_ID_BYTES_MAX} bytes"))
    } else if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        Some("may hold only ASCII letters, digits and - _ . :".to_string())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ConfigError::Invalid {
            key: "cluster_id",
            value: format!("{id:?}"),
            origin,
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn flags(args: &[&str]) -> Flags {
        let mut all = vec!["cairn-chunkserver"];
        all.extend_from_slice(args);
        Flags::try_parse_from(all).expect("flags parse")
    }

    fn required() -> Flags {
        flags(&["--data-dir", "/d", "--cluster-id", "c1", "--node-id", "3"])
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let config = Config::resolve(required()).expect("resolves");
        assert_eq!(config.listen, LISTEN_DEFAULT.parse::<SocketAddr>().unwrap());
        assert_eq!(config.store.io_mode, IoMode::Direct);
        assert_eq!(config.store.ring_entries, RING_ENTRIES_DEFAULT);
        assert_eq!(config.store.open_extents_max, OPEN_EXTENTS_MAX_DEFAULT);
        assert_eq!(
            config.requests_in_flight_max,
            REQUESTS_IN_FLIGHT_MAX_DEFAULT
        );
        assert_eq!(config.connections_max, CONNECTIONS_MAX_DEFAULT);
        assert_eq!(config.free_bytes_min, FREE_BYTES_MIN_DEFAULT);
        assert_eq!(config.log_level, LOG_LEVEL_DEFAULT);
        assert_eq!(config.log_format, LogFormat::Text);
        assert!(!config.init);
        assert_eq!(config.threads, Threads::Single);
        assert!(config.store.inline);
    }

    #[test]
    fn threads_multi_from_flag_or_file() {
        let config = Config::resolve(flags(&[
            "--data-dir",
            "/d",
            "--cluster-id",
            "c1",
            "--node-id",
            "3",
            "--threads",
            "multi",
        ]))
        .expect("resolves");
        assert_eq!(config.threads, Threads::Multi);
        assert!(!config.store.inline);
        let file = parse_file(Path::new("/x/cs.toml"), "threads = \"multi\"\n").expect("parses");
        let merged = merge(required(), file, None).expect("merges");
        assert_eq!(merged.threads, Threads::Multi);
        parse_file(Path::new("/x/cs.toml"), "threads = \"many\"\n").expect_err("bad variant");
    }

    #[test]
    fn help_names_the_defaults_of_the_constants() {
        let help = Flags::command().render_help().to_string();
        for default in [
            format!("[default: {LISTEN_DEFAULT}]"),
            format!("[default: {RING_ENTRIES_DEFAULT}]"),
            format!("from {RING_ENTRIES_MIN} to {RING_ENTRIES_MAX}"),
            format!("[default: {OPEN_EXTENTS_MAX_DEFAULT}]"),
            format!("[default: {REQUESTS_IN_FLIGHT_MAX_DEFAULT}]"),
            format!("[default: {CONNECTIONS_MAX_DEFAULT}]"),
            format!("[default: {FREE_BYTES_MIN_DEFAULT}]"),
            format!("[default: {LOG_LEVEL_DEFAULT}]"),
        ] {
            assert!(help.contains(&default), "help lacks {default}:\n{help}");
        }
    }

    #[test]
    fn flag_overrides_file() {
        let file = parse_file(
            Path::new("/etc/cairn/cs.toml"),
            "data_dir = \"/from-file\"\ncluster_id = \"filecluster\"\nnode_id = 9\nring_entries = 64\nio_mode = \"buffered\"\n",
        )
        .expect("parses");
        let merged = merge(
            flags(&["--node-id", "4", "--ring-entries", "256"]),
            file,
            Some(PathBuf::from("/etc/cairn/cs.toml")),
        )
        .expect("merges");
        assert_eq!(merged.node_id, 4);
        assert_eq!(merged.store.ring_entries, 256);
        assert_eq!(merged.cluster_id, "filecluster");
        assert_eq!(merged.data_dir, PathBuf::from("/from-file"));
        assert_eq!(merged.store.io_mode, IoMode::Buffered);
    }

    #[test]
    fn the_annotated_example_file_is_valid() {
        let path = Path::new("/etc/cairn/chunkserver.toml");
        let text = include_str!("../../systemd/chunkserver.toml.example");
        let file = parse_file(path, text).expect("the example parses");
        let config = merge(Flags::default(), file, Some(path.to_path_buf())).expect("resolves");
        assert_eq!(config.store.ring_entries, RING_ENTRIES_DEFAULT);
        assert_eq!(config.free_bytes_min, FREE_BYTES_MIN_DEFAULT);
    }

    /// Every key FileSettings accepts (serde's own list) is a flag and is
    /// documented in the example, and every flag but --config and --init is
    /// a key: adding a setting without its paragraph in the example fails.
    #[test]
    fn the_example_documents_every_key() {
        use cairn_daemon::config_check::{
            accepted_keys, assert_example_documents, keys_from_flags,
        };
        let keys = accepted_keys::<FileSettings>();
        assert!(
            keys.contains("data_dir") && keys.contains("weight"),
            "{keys:?}"
        );
        assert_eq!(
            keys,
            keys_from_flags(&Flags::command(), &["config", "init"])
        );
        assert_example_documents(
            "systemd/chunkserver.toml.example",
            include_str!("../../systemd/chunkserver.toml.example"),
            &keys,
        );
    }

    #[test]
    fn relative_data_dir_in_a_file_is_relative_to_the_file() {
        let file =
            parse_file(Path::new("/etc/cairn/cs.toml"), "data_dir = \"data\"\n").expect("parses");
        assert_eq!(file.data_dir, Some(PathBuf::from("/etc/cairn/data")));
    }

    #[test]
    fn unknown_key_is_named_with_file_and_line() {
        let error = parse_file(Path::new("/x/cs.toml"), "node_id = 1\nring_entrys = 64\n")
            .expect_err("unknown key");
        let text = error.to_string();
        assert!(text.contains("/x/cs.toml"), "{text}");
        assert!(text.contains("ring_entrys"), "{text}");
        assert!(text.contains("line 2"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
    }

    #[test]
    fn bad_value_names_key_and_file() {
        let error =
            parse_file(Path::new("/x/cs.toml"), "node_id = \"three\"\n").expect_err("bad type");
        let text = error.to_string();
        assert!(text.contains("/x/cs.toml"), "{text}");
        assert!(text.contains("`node_id`"), "{text}");
        let error =
            parse_file(Path::new("/x/cs.toml"), "io_mode = \"fast\"\n").expect_err("bad variant");
        assert!(error.to_string().contains("`io_mode`"), "{error}");
        let error =
            parse_file(Path::new("/x/cs.toml"), "listen = \"nowhere\"\n").expect_err("bad address");
        assert!(error.to_string().contains("`listen`"), "{error}");
    }

    #[test]
    fn missing_settings_name_flag_and_key() {
        let error = Config::resolve(flags(&["--node-id", "1"])).expect_err("missing");
        let text = error.to_string();
        for word in ["--data-dir", "data_dir", "--cluster-id", "cluster_id"] {
            assert!(text.contains(word), "{word} not in {text}");
        }
        assert!(!text.contains("--node-id"), "{text}");
    }

    #[test]
    fn invalid_values_are_refused_with_their_origin() {
        let mut f = required();
        f.ring_entries = Some(1000);
        let text = Config::resolve(f)
            .expect_err("not a power of two")
            .to_string();
        assert!(
            text.contains("ring_entries") && text.contains("--ring-entries"),
            "{text}"
        );
        let mut f = required();
        f.connections_max = Some(0);
        assert!(Config::resolve(f).is_err());
        let mut f = required();
        f.cluster_id = Some("a b".to_string());
        assert!(Config::resolve(f).is_err());
        let mut f = required();
        f.cluster_id = Some(String::new());
        assert!(Config::resolve(f).is_err());
        let mut f = required();
        f.node_id = Some(u64::MAX);
        assert!(Config::resolve(f).is_err());
    }
}
