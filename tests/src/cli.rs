//! The `cairn` binary run as an operator runs it, for the CLI process tests:
//! in a folder of its own (so no `./cairn-data/cairn.toml` is found by
//! accident), with none of the discovery variables set except those given,
//! and helpers to check its exit status, human and JSON output.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use serde_json::Value;

/// Runs `cairn args` in `cwd` with only the discovery variables in `env`.
pub fn cairn_in(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let bin = crate::bin_path("cairn").expect("cairn binary");
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("CAIRN_VOLMGR")
        .env_remove("CAIRN_CLUSTER_ID")
        .env_remove("CAIRN_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running cairn")
}

/// Status, stdout and stderr, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn assert_code(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "{}", text(o));
}

/// The JSON document of a successful run.
pub fn json(o: &Output) -> Value {
    assert_code(o, 0);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

/// The CLI pointed at one cluster with flags (after the subcommand, as an
/// operator types them).
#[derive(Clone)]
pub struct Cli {
    pub flags: Vec<String>,
    cwd: Arc<tempfile::TempDir>,
}

impl Cli {
    /// For the volume manager members `volmgr` of cluster `cluster_id`.
    pub fn new(volmgr: &[String], cluster_id: &str) -> Cli {
        Cli {
            flags: vec![
                "--volmgr".into(),
                volmgr.join(","),
                "--cluster-id".into(),
                cluster_id.into(),
            ],
            cwd: Arc::new(tempfile::tempdir().unwrap()),
        }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(self.flags.iter().map(String::as_str));
        cairn_in(self.cwd.path(), &all, &[])
    }

    /// Runs, expects success and an output containing every one of `words`.
    pub fn ok(&self, args: &[&str], words: &[&str]) -> String {
        let o = self.run(args);
        assert_code(&o, 0);
        let out = stdout(&o);
        for w in words {
            assert!(out.contains(w), "{args:?}: lacks {w:?}\n{}", text(&o));
        }
        out
    }

    /// Runs with `--json`, expects success, returns the document.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        json(&self.run(&all))
    }

    /// The whole command line (binary first), for tools that run it
    /// themselves (fio's trigger).
    pub fn command_line(&self, args: &[&str]) -> String {
        let bin = crate::bin_path("cairn").expect("cairn binary");
        std::iter::once(bin.display().to_string())
            .chain(args.iter().map(|s| s.to_string()))
            .chain(self.flags.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs in a blocking thread, so async work in the test goes on.
    pub async fn run_async(&self, args: &[&str]) -> Output {
        let (cli, args): (Cli, Vec<String>) =
            (self.clone(), args.iter().map(|s| s.to_string()).collect());
        tokio::task::spawn_blocking(move || {
            cli.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap()
    }
}
