//! Configuration of `cairn-volmgr`: an optional TOML file (`--config`) and
//! command-line flags; a flag overrides the same key in the file (the key is
//! the flag's name with `_` for `-`). Unknown keys are an error.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cairn_daemon::LogFormat;
use clap::Parser;
use serde::Deserialize;

/// Default API and raft port on loopback; production configs set `listen`.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7400";
pub const GROUP_COUNT_DEFAULT: u32 = 1024;
pub const HEARTBEAT_INTERVAL_MS_DEFAULT: u64 = 1000;
pub const DOWN_AFTER_MS_DEFAULT: u64 = 4000;
pub const OUT_AFTER_S_DEFAULT: u64 = 600;
pub const CLUSTER_ID_BYTES_MAX: usize = 128;

#[derive(Parser, Debug, Default)]
#[command(
    name = "cairn-volmgr",
    version,
    about = "Cairn volume manager: one member of the raft group holding the cluster map and the volume catalogue",
    after_help = "A new cluster: start every initial member with the same --initial-members list (each \
with its own --member-id); they bootstrap from it when their data directory is empty. A member added \
later starts with --join and is added from the leader (`cairn volmgr add-member`). Restarting a member \
needs neither: its data directory holds its state.\n\nExample, three members on one machine:\n  \
cairn-volmgr --data-dir /var/lib/cairn/vm1 --cluster-id prod --member-id 1 --listen 127.0.0.2:7400 \
--initial-members 1=127.0.0.2:7400,2=127.0.0.3:7400,3=127.0.0.4:7400\n\nExit status: 0 after a clean \
stop (SIGTERM or SIGINT), 2 for a configuration or data directory error, 1 for a failure while running."
)]
pub struct Flags {
    /// TOML file with any of the settings below (flags override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory holding this member's identity and raft log.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// This member's id in the raft group (1 or more, unique in the cluster).
    #[arg(long, value_name = "N")]
    pub member_id: Option<u64>,
    /// The cluster's name; members and chunk servers of another cluster are refused.
    #[arg(long, value_name = "ID")]
    pub cluster_id: Option<String>,
    /// Address for the API and for raft traffic from other members [default: 127.0.0.1:7400].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Address other members and clients use to reach this one [default: --listen].
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<SocketAddr>,
    /// The first members, as ID=ADDR,ID=ADDR,...: used only to create a new cluster.
    #[arg(long, value_name = "LIST")]
    pub initial_members: Option<String>,
    /// Start with an empty log and wait to be added to an existing cluster.
    #[arg(long)]
    pub join: bool,
    /// Redundancy groups of the pool (a power of two), fixed when the cluster is created [default: 1024].
    #[arg(long, value_name = "N")]
    pub group_count: Option<u32>,
    /// How often chunk servers are asked to heartbeat, in milliseconds [default: 1000].
    #[arg(long, value_name = "MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// A chunk server silent this long is marked down, in milliseconds [default: 4000].
    #[arg(long, value_name = "MS")]
    pub down_after_ms: Option<u64>,
    /// A chunk server down this long is marked out, in seconds [default: 600].
    #[arg(long, value_name = "S")]
    pub out_after_s: Option<u64>,
    /// Log filter, as RUST_LOG [default: info].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log line format on stderr: text (with timestamps) or journal (without, for systemd) [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    data_dir: Option<PathBuf>,
    member_id: Option<u64>,
    cluster_id: Option<String>,
    listen: Option<SocketAddr>,
    advertise: Option<SocketAddr>,
    initial_members: Option<String>,
    join: Option<bool>,
    group_count: Option<u32>,
    heartbeat_interval_ms: Option<u64>,
    down_after_ms: Option<u64>,
    out_after_s: Option<u64>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub member_id: u64,
    pub cluster_id: String,
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    /// Empty unless given.
    pub initial_members: BTreeMap<u64, String>,
    pub join: bool,
    pub group_count: u32,
    pub heartbeat_interval: Duration,
    pub down_after: Duration,
    pub out_after: Duration,
    pub log_level: String,
    pub log_format: LogFormat,
}

impl Config {
    pub fn from_args() -> Result<Config, String> {
        Self::from_flags(Flags::parse())
    }

    pub fn from_flags(flags: Flags) -> Result<Config, String> {
        let file = match &flags.config {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        let data_dir = flags
            .data_dir
            .or(file.data_dir)
            .ok_or("--data-dir (data_dir) is required")?;
        let member_id = flags
            .member_id
            .or(file.member_id)
            .ok_or("--member-id (member_id) is required")?;
        if member_id == 0 || i64::try_from(member_id).is_err() {
            return Err(format!(
                "--member-id {member_id}: must be from 1 to {}",
                i64::MAX
            ));
        }
        let cluster_id = flags
            .cluster_id
            .or(file.cluster_id)
            .ok_or("--cluster-id (cluster_id) is required")?;
        check_cluster_id(&cluster_id)?;
        let listen = match flags.listen.or(file.listen) {
            Some(a) => a,
            None => LISTEN_DEFAULT.parse().expect("valid default"),
        };
        let advertise = flags.advertise.or(file.advertise).unwrap_or(listen);
        if advertise.ip().is_unspecified() {
            return Err(format!(
                "--advertise {advertise}: other members cannot connect to an unspecified address; \
                 give the address they should use"
            ));
        }
        let initial_members = match flags.initial_members.or(file.initial_members) {
            Some(list) => parse_members(&list)?,
            None => BTreeMap::new(),
        };
        if let Some(addr) = initial_members.get(&member_id) {
            if *addr != advertise.to_string() {
                return Err(format!(
                    "--initial-members gives member {member_id} the address {addr}, but it advertises {advertise}"
                ));
            }
        } else if !initial_members.is_empty() {
            return Err(format!(
                "--initial-members does not include this member ({member_id}); a member added later starts with --join"
            ));
        }
        let join = flags.join || file.join.unwrap_or(false);
        if join && !initial_members.is_empty() {
            return Err("--join and --initial-members exclude each other".into());
        }
        let group_count = flags
            .group_count
            .or(file.group_count)
            .unwrap_or(GROUP_COUNT_DEFAULT);
        if !group_count.is_power_of_two() || !(1..=1 << 20).contains(&group_count) {
            return Err(format!(
                "--group-count {group_count}: must be a power of two from 1 to 1048576"
            ));
        }
        let heartbeat_ms = flags
            .heartbeat_interval_ms
            .or(file.heartbeat_interval_ms)
            .unwrap_or(HEARTBEAT_INTERVAL_MS_DEFAULT);
        let down_ms = flags
            .down_after_ms
            .or(file.down_after_ms)
            .unwrap_or(DOWN_AFTER_MS_DEFAULT);
        let out_s = flags
            .out_after_s
            .or(file.out_after_s)
            .unwrap_or(OUT_AFTER_S_DEFAULT);
        if heartbeat_ms == 0 || down_ms < 2 * heartbeat_ms {
            return Err(format!(
                "--down-after-ms {down_ms} must be at least twice --heartbeat-interval-ms {heartbeat_ms} (and that above 0): \
                 otherwise one late heartbeat marks a server down"
            ));
        }
        if out_s * 1000 < down_ms {
            return Err(format!(
                "--out-after-s {out_s} must not be shorter than --down-after-ms {down_ms}"
            ));
        }
        Ok(Config {
            data_dir,
            member_id,
            cluster_id,
            listen,
            advertise,
            initial_members,
            join,
            group_count,
            heartbeat_interval: Duration::from_millis(heartbeat_ms),
            down_after: Duration::from_millis(down_ms),
            out_after: Duration::from_secs(out_s),
            log_level: flags
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            log_format: flags.log_format.or(file.log_format).unwrap_or_default(),
        })
    }
}

fn read_file(path: &Path) -> Result<FileSettings, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

pub fn check_cluster_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > CLUSTER_ID_BYTES_MAX
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(format!(
            "cluster id {id:?}: must be 1 to {CLUSTER_ID_BYTES_MAX} characters of A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_members(list: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut out = BTreeMap::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, addr) = item
            .split_once('=')
            .ok_or_else(|| format!("member {item:?}: expected ID=ADDR"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("member {item:?}: {id:?} is not a member id"))?;
        if id == 0 {
            return Err(format!("member {item:?}: ids start at 1"));
        }
        let addr: SocketAddr = addr
            .trim()
            .parse()
            .map_err(|e| format!("member {item:?}: {addr:?} is not an address: {e}"))?;
        if out.insert(id, addr.to_string()).is_some() {
            return Err(format!("member {id} is listed twice"));
        }
    }
    if out.is_empty() {
        return Err("--initial-members is empty".into());
    }
    let mut addrs: Vec<&String> = out.values().collect();
    addrs.sort();
    addrs.dedup();
    if addrs.len() != out.len() {
        return Err("two members share an address".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        let mut v = vec!["cairn-volmgr"];
        v.extend_from_slice(args);
        Flags::parse_from(v)
    }

    #[test]
    fn bootstrap_flags_resolve() {
        let c = Config::from_flags(flags(&[
            "--data-dir",
            "/d",
            "--member-id",
            "2",
            "--cluster-id",
            "c1",
            "--listen",
            "127.0.0.3:7400",
            "--initial-members",
            "1=127.0.0.2:7400,2=127.0.0.3:7400,3=127.0.0.4:7400",
        ]))
        .unwrap();
        assert_eq!(c.initial_members.len(), 3);
        assert_eq!(c.advertise.to_string(), "127.0.0.3:7400");
        assert_eq!(c.down_after, Duration::from_secs(4));
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
        let text = include_str!("../../systemd/volmgr.toml.example");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volmgr.toml");
        std::fs::write(&path, text).unwrap();
        let c = Config::from_flags(Flags {
            config: Some(path),
            ..Flags::default()
        })
        .expect("the example resolves");
        assert_eq!(c.member_id, 1);
        assert_eq!(c.initial_members.len(), 3);
        assert_eq!(c.group_count, GROUP_COUNT_DEFAULT);
        assert_eq!(c.down_after, Duration::from_millis(DOWN_AFTER_MS_DEFAULT));
        assert_eq!(c.log_format, LogFormat::Journal);

        let keys = accepted_keys::<FileSettings>();
        assert!(
            keys.contains("data_dir") && keys.contains("log_format"),
            "{keys:?}"
        );
        assert_eq!(keys, keys_from_flags(&Flags::command(), &["config"]));
        assert_example_documents("systemd/volmgr.toml.example", text, &keys);
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let base = ["--data-dir", "/d", "--cluster-id", "c1"];
        let cases: &[(&[&str], &str)] = &[
            (&["--member-id", "0"], "must be from 1"),
            (
                &["--member-id", "1", "--initial-members", "2=127.0.0.1:1"],
                "does not include this member",
            ),
            (
                &["--member-id", "1", "--initial-members", "1=127.0.0.2:7400"],
                "advertises",
            ),
            (
                &["--member-id", "1", "--initial-members", "1=x"],
                "not an address",
            ),
            (
                &["--member-id", "1", "--group-count", "1000"],
                "power of two",
            ),
            (&["--member-id", "1", "--down-after-ms", "1500"], "twice"),
            (
                &["--member-id", "1", "--listen", "0.0.0.0:7400"],
                "unspecified",
            ),
        ];
        for (args, want) in cases {
            let mut all: Vec<&str> = base.to_vec();
            all.extend_from_slice(args);
            let err = Config::from_flags(flags(&all)).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
        let err =
            Config::from_flags(flags(&["--member-id", "1", "--cluster-id", "bad id"])).unwrap_err();
        assert!(err.contains("--data-dir"), "{err}");
    }
}
