//! Finding the cluster: the `cairn.toml` file and the order `cairn` looks
//! for it.
//!
//! The file (written by `cairn up` into its data folder, or by hand):
//!
//! ```toml
//! # Written by `cairn up`; read by `cairn` commands run in this folder.
//! cluster_id = "local-3f9a"           # required
//! volmgr = ["127.0.0.1:7400"]         # required, volume manager members
//! targets = ["nbd://127.0.0.1:10809"] # optional: NBD base URIs of the targets
//! ```
//!
//! Unknown keys are an error naming the file and the key. Commands look, in
//! this order: `--volmgr ADDRS` (or `$CAIRN_VOLMGR`, with `--cluster-id` or
//! `$CAIRN_CLUSTER_ID`); the file named by `--config` or `$CAIRN_CONFIG`;
//! `./cairn-data/cairn.toml` in the current folder; `/etc/cairn/cairn.toml`.
//! A `--cluster-id` given together with a file overrides the file's. Every
//! problem here is a configuration error (exit status 2).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde::{Deserialize, Serialize};

use cairn_volmgr::client::VolmgrClient;

use crate::exit;

/// The folder `cairn up` keeps its state in, relative to where it runs.
pub const DEFAULT_DATA_DIR: &str = "cairn-data";
/// The config file's name inside the data folder (and in /etc/cairn).
pub const FILE_NAME: &str = "cairn.toml";
/// The system-wide config, tried last.
pub const SYSTEM_CONFIG: &str = "/etc/cairn/cairn.toml";
/// How long one CLI request may take, retries across leaders included.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

const HEADER: &str = "# Written by `cairn up`; read by `cairn` commands run in this folder.";

/// What a `cairn.toml` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The cluster's id; the volume manager refuses requests for another.
    pub cluster_id: String,
    /// Volume manager members, `host:port` each.
    pub volmgr: Vec<String>,
    /// NBD base URIs of the cluster's targets (`nbd://host:port`); a
    /// volume's export is `<base>/<volume>`. Optional.
    #[serde(default)]
    pub targets: Vec<String>,
}

impl ClusterConfig {
    /// Reads and checks the config at `path`. Errors name the file.
    pub fn load(path: &Path) -> anyhow::Result<ClusterConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| exit::usage(format!("config {}: {e}", path.display())))?;
        Self::parse(&text)
            .map_err(|problem| exit::usage(format!("config {}: {problem}", path.display())))
    }

    /// Parses and checks a config's text; the error says what is wrong
    /// (line and key).
    pub fn parse(text: &str) -> Result<ClusterConfig, String> {
        let config: ClusterConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| {
                text.as_bytes()[..span.start.min(text.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1
            });
            let message = e.message().trim_end().to_string();
            match line {
                Some(line) => format!("line {line}: {message}"),
                None => message,
            }
        })?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if self.cluster_id.trim().is_empty() {
            return Err("`cluster_id` is empty".into());
        }
        if self.volmgr.is_empty() {
            return Err("`volmgr` lists no volume manager member".into());
        }
        if self.volmgr.iter().any(|a| a.trim().is_empty()) {
            return Err("`volmgr` has an empty address".into());
        }
        if self.targets.iter().any(|t| t.trim().is_empty()) {
            return Err("`targets` has an empty URI".into());
        }
        Ok(())
    }

    /// The file's text: the header comment, then the keys.
    pub fn render(&self) -> String {
        let strings = |v: &[String]| {
            toml::Value::Array(v.iter().cloned().map(toml::Value::String).collect()).to_string()
        };
        format!(
            "{HEADER}\ncluster_id = {}\nvolmgr = {}\ntargets = {}\n",
            toml::Value::String(self.cluster_id.clone()),
            strings(&self.volmgr),
            strings(&self.targets),
        )
    }

    /// Writes the config to `path` (through a temporary file and a rename,
    /// so a reader never sees half a file).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        self.check().map_err(|problem| {
            anyhow::anyhow!("not writing config {}: {problem}", path.display())
        })?;
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, self.render())
            .with_context(|| format!("writing config {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    }

    /// `<base>/<volume>` for every target base URI.
    pub fn export_uris(&self, volume: &str) -> Vec<String> {
        self.targets
            .iter()
            .map(|base| format!("{}/{volume}", base.trim_end_matches('/')))
            .collect()
    }
}

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `--volmgr` / `$CAIRN_VOLMGR`.
    Flags,
    /// A config file.
    File(PathBuf),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flags => f.write_str("--volmgr"),
            Source::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Found {
    pub config: ClusterConfig,
    pub source: Source,
}

/// Everything discovery looks at, passed in so tests need not change the
/// process's environment or folder.
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'a> {
    /// `--volmgr` / `$CAIRN_VOLMGR`: members, comma-separated.
    pub volmgr: Option<&'a str>,
    /// `--cluster-id` / `$CAIRN_CLUSTER_ID`.
    pub cluster_id: Option<&'a str>,
    /// `--config` / `$CAIRN_CONFIG`.
    pub config: Option<&'a Path>,
    /// The current folder (`./cairn-data/cairn.toml` is looked for in it).
    pub cwd: &'a Path,
    /// The system config, normally [`SYSTEM_CONFIG`].
    pub system: &'a Path,
}

/// Finds the cluster configuration in the documented order.
pub fn discover(l: &Lookup) -> anyhow::Result<Found> {
    let cluster_id = nonempty(l.cluster_id);
    if let Some(addrs) = nonempty(l.volmgr) {
        let volmgr = split_addrs(addrs);
        if volmgr.is_empty() {
            return Err(exit::usage(format!("--volmgr {addrs:?} names no address")));
        }
        let Some(cluster_id) = cluster_id else {
            return Err(exit::usage(
                "--volmgr needs --cluster-id (or $CAIRN_CLUSTER_ID) as well",
            ));
        };
        return Ok(Found {
            config: ClusterConfig {
                cluster_id: cluster_id.to_string(),
                volmgr,
                targets: Vec::new(),
            },
            source: Source::Flags,
        });
    }
    let local = l.cwd.join(DEFAULT_DATA_DIR).join(FILE_NAME);
    let path = match l.config.filter(|p| !p.as_os_str().is_empty()) {
        // Named explicitly: it must exist.
        Some(p) => p.to_path_buf(),
        None if local.exists() => local,
        None if l.system.exists() => l.system.to_path_buf(),
        None => {
            return Err(exit::usage(format!(
                "no cluster configuration found; tried, in order:\n  \
                 1. --volmgr ADDRS with --cluster-id ID (or $CAIRN_VOLMGR, $CAIRN_CLUSTER_ID): not given\n  \
                 2. --config FILE or $CAIRN_CONFIG: not set\n  \
                 3. {}: no such file (`cairn up` writes it there)\n  \
                 4. {}: no such file",
                local.display(),
                l.system.display()
            )))
        }
    };
    let mut config = ClusterConfig::load(&path)?;
    if let Some(id) = cluster_id {
        config.cluster_id = id.to_string();
    }
    Ok(Found {
        config,
        source: Source::File(path),
    })
}

/// `s` trimmed, unless that leaves nothing (an exported but empty variable).
fn nonempty(s: Option<&str>) -> Option<&str> {
    s.map(str::trim).filter(|s| !s.is_empty())
}

/// `a,b, c` -> `["a", "b", "c"]`.
pub fn split_addrs(addrs: &str) -> Vec<String> {
    addrs
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The flags every cluster command takes.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Volume manager members, ADDR,ADDR,... (with --cluster-id); overrides any config file.
    #[arg(long, value_name = "ADDRS", env = "CAIRN_VOLMGR")]
    pub volmgr: Option<String>,
    /// The cluster's id; with a config file, overrides the file's.
    #[arg(long, value_name = "ID", env = "CAIRN_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Cluster config file [default: ./cairn-data/cairn.toml, else /etc/cairn/cairn.toml].
    #[arg(long, value_name = "FILE", env = "CAIRN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ClusterArgs {
    /// The configuration these flags, the environment and the current folder
    /// lead to.
    pub fn discover(&self) -> anyhow::Result<Found> {
        let cwd = std::env::current_dir()
            .map_err(|e| exit::usage(format!("cannot read the current folder: {e}")))?;
        discover(&Lookup {
            volmgr: self.volmgr.as_deref(),
            cluster_id: self.cluster_id.as_deref(),
            config: self.config.as_deref(),
            cwd: &cwd,
            system: Path::new(SYSTEM_CONFIG),
        })
    }

    /// A volume manager client for the discovered cluster, and the config.
    pub fn connect(&self) -> anyhow::Result<(VolmgrClient, Found)> {
        let found = self.discover()?;
        let client =
            VolmgrClient::new(found.config.volmgr.clone(), found.config.cluster_id.clone())
                .with_deadline(REQUEST_DEADLINE);
        Ok((client, found))
    }
}

/// Runs a cluster command's future on a single-threaded runtime.
pub fn block_on<T>(fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(fut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClusterConfig {
        ClusterConfig {
            cluster_id: "local-3f9a".into(),
            volmgr: vec!["127.0.0.1:7400".into(), "127.0.0.2:7400".into()],
            targets: vec!["nbd://127.0.0.1:10809".into()],
        }
    }

    fn write_local(cwd: &Path, cfg: &ClusterConfig) -> PathBuf {
        let dir = cwd.join(DEFAULT_DATA_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE_NAME);
        cfg.write(&path).unwrap();
        path
    }

    fn lookup<'a>(cwd: &'a Path, system: &'a Path) -> Lookup<'a> {
        Lookup {
            volmgr: None,
            cluster_id: None,
            config: None,
            cwd,
            system,
        }
    }

    #[test]
    fn write_then_load_round_trips_with_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let cfg = sample();
        cfg.write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# Written by `cairn up`"), "{text}");
        assert!(text.contains("cluster_id = \"local-3f9a\"\n"), "{text}");
        assert_eq!(ClusterConfig::load(&path).unwrap(), cfg);
        assert!(!dir.path().join("cairn.toml.tmp").exists());
    }

    #[test]
    fn targets_are_optional_and_quotes_escape() {
        let cfg = ClusterConfig::parse("cluster_id = \"c\"\nvolmgr = [\"a:1\"]\n").unwrap();
        assert!(cfg.targets.is_empty());
        let odd = ClusterConfig {
            cluster_id: "we\"ird\\id".into(),
            volmgr: vec!["a:1".into()],
            targets: vec![],
        };
        assert_eq!(ClusterConfig::parse(&odd.render()).unwrap(), odd);
    }

    #[test]
    fn broken_files_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        for (text, wants) in [
            (
                "cluster_id = \"c\"\nvolmgr = [\"a:1\"]\nvolmgrs = [\"b:1\"]\n",
                &["line 3", "unknown field `volmgrs`"][..],
            ),
            ("volmgr = [\"a:1\"]\n", &["missing field `cluster_id`"][..]),
            ("cluster_id = \"c\"\n", &["missing field `volmgr`"][..]),
            (
                "cluster_id = \"c\"\nvolmgr = []\n",
                &["no volume manager"][..],
            ),
            (
                "cluster_id = \"\"\nvolmgr = [\"a:1\"]\n",
                &["`cluster_id` is empty"][..],
            ),
            ("cluster_id = 7\nvolmgr = [\"a:1\"]\n", &["line 1"][..]),
            ("cluster_id = \"c\nvolmgr", &["line 1"][..]),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = ClusterConfig::load(&path).unwrap_err();
            let msg = format!("{e:#}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            for want in wants {
                assert!(msg.contains(want), "{text:?}: {msg}");
            }
            assert_eq!(exit::code_for(&e), exit::USAGE, "{msg}");
        }
        let e = ClusterConfig::load(&dir.path().join("absent.toml")).unwrap_err();
        assert!(format!("{e}").contains("absent.toml"), "{e}");
        assert_eq!(exit::code_for(&e), exit::USAGE);
    }

    #[test]
    fn flags_win_and_need_a_cluster_id() {
        let cwd = tempfile::tempdir().unwrap();
        write_local(cwd.path(), &sample());
        let system = cwd.path().join("etc.toml");
        let mut l = lookup(cwd.path(), &system);
        l.volmgr = Some("10.0.0.1:7400, 10.0.0.2:7400");
        let e = discover(&l).unwrap_err();
        assert!(format!("{e}").contains("--cluster-id"), "{e}");
        assert_eq!(exit::code_for(&e), exit::USAGE);
        l.cluster_id = Some("prod");
        let found = discover(&l).unwrap();
        assert_eq!(found.source, Source::Flags);
        assert_eq!(found.config.volmgr, ["10.0.0.1:7400", "10.0.0.2:7400"]);
        assert_eq!(found.config.cluster_id, "prod");
        // An empty value (an exported but empty variable) counts as unset.
        l.volmgr = Some("");
        assert!(matches!(discover(&l).unwrap().source, Source::File(_)));
    }

    #[test]
    fn order_is_env_then_local_then_system() {
        let cwd = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let system = other.path().join("system.toml");
        let named = other.path().join("named.toml");
        let cfg = |id: &str| ClusterConfig {
            cluster_id: id.into(),
            ..sample()
        };
        cfg("system").write(&system).unwrap();
        cfg("named").write(&named).unwrap();

        let mut l = lookup(cwd.path(), &system);
        let found = discover(&l).unwrap();
        assert_eq!(found.config.cluster_id, "system");
        assert_eq!(found.source, Source::File(system.clone()));

        let local = write_local(cwd.path(), &cfg("local"));
        let found = discover(&l).unwrap();
        assert_eq!(found.config.cluster_id, "local");
        assert_eq!(found.source, Source::File(local));

        l.config = Some(&named);
        let found = discover(&l).unwrap();
        assert_eq!(found.config.cluster_id, "named");
        assert_eq!(found.config.targets, sample().targets);

        // --cluster-id overrides the file's.
        l.cluster_id = Some("override");
        let found = discover(&l).unwrap();
        assert_eq!(found.config.cluster_id, "override");
        assert_eq!(found.config.volmgr, sample().volmgr);
    }

    #[test]
    fn a_named_file_must_exist_and_a_broken_local_file_is_not_skipped() {
        let cwd = tempfile::tempdir().unwrap();
        let system = cwd.path().join("system.toml");
        sample().write(&system).unwrap();
        let missing = cwd.path().join("missing.toml");
        let mut l = lookup(cwd.path(), &system);
        l.config = Some(&missing);
        let e = discover(&l).unwrap_err();
        assert!(format!("{e}").contains("missing.toml"), "{e}");

        l.config = None;
        let local_dir = cwd.path().join(DEFAULT_DATA_DIR);
        std::fs::create_dir_all(&local_dir).unwrap();
        std::fs::write(local_dir.join(FILE_NAME), "cluster_id = \"x\"\nbogus = 1\n").unwrap();
        let e = discover(&l).unwrap_err();
        let msg = format!("{e}");
        assert!(
            msg.contains("cairn-data/cairn.toml") && msg.contains("bogus"),
            "{msg}"
        );
    }

    #[test]
    fn nothing_found_lists_all_four_places() {
        let cwd = tempfile::tempdir().unwrap();
        let system = cwd.path().join("nowhere/cairn.toml");
        let e = discover(&lookup(cwd.path(), &system)).unwrap_err();
        let msg = format!("{e}");
        for want in [
            "--volmgr",
            "$CAIRN_CONFIG",
            &cwd.path()
                .join("cairn-data/cairn.toml")
                .display()
                .to_string(),
            &system.display().to_string(),
        ] {
            assert!(msg.contains(want), "{want}: {msg}");
        }
        assert_eq!(exit::code_for(&e), exit::USAGE);
    }

    #[test]
    fn export_uris_join_base_and_volume() {
        let mut cfg = sample();
        cfg.targets.push("nbd://10.0.0.9:10809/".into());
        assert_eq!(
            cfg.export_uris("pacs-db"),
            [
                "nbd://127.0.0.1:10809/pacs-db",
                "nbd://10.0.0.9:10809/pacs-db"
            ]
        );
    }
}
