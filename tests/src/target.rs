//! `cairn-target` as a real process in front of a [`ReplicatedCluster`], and
//! helpers to run the third-party NBD clients (nbdinfo, qemu-io, qemu-img,
//! nbdcopy, fio, nbdfuse) against it.

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cluster::ReplicatedCluster;
use crate::{
    bin_path, free_loopback_addr, log_tail, read_log, temp_dir, terminate, wait_until_listening,
    READY_TIMEOUT,
};

/// The address targets listen on (a host of its own beside the chunk
/// servers on .2-.4).
pub const TARGET_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);

pub struct TargetProcess {
    child: Option<Child>,
    addr: SocketAddr,
    unix: PathBuf,
    args: Vec<String>,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TargetProcess {
    /// Starts a target for `cluster` (TCP on 127.0.0.10, plus a unix
    /// socket) and waits until it has reached the cluster. `extra` goes on
    /// its command line.
    pub fn start(cluster: &ReplicatedCluster, extra: &[&str]) -> anyhow::Result<TargetProcess> {
        let dir = temp_dir("cairn-target-")?;
        let unix = dir.path().join("nbd.sock");
        let mut args: Vec<String> = vec![
            "--volmgr".into(),
            cluster.volmgr.addrs().join(","),
            "--cluster-id".into(),
            cluster.volmgr.cluster_id.clone(),
            "--unix".into(),
            unix.display().to_string(),
            // Quick retries: failover tests run with short detector timings.
            "--io-timeout-ms".into(),
            "60000".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut t = TargetProcess {
            child: None,
            addr: free_loopback_addr(TARGET_IP)?,
            unix,
            args,
            log_path: dir.path().join("target.log"),
            _dir: dir,
        };
        t.launch()?;
        Ok(t)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let bin = bin_path("cairn-target")?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("opening the target's log")?;
        let before = read_log(&self.log_path).len();
        let mut child = Command::new(&bin)
            .args(&self.args)
            .arg("--listen")
            .arg(self.addr.to_string())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        wait_until_listening(&mut child, self.addr)
            .with_context(|| format!("target log:\n{}", log_tail(&self.log_path)))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while !read_log(&self.log_path)[before..].contains("connected to cluster") {
            if let Some(s) = child.try_wait()? {
                bail!(
                    "target exited with {s} before reaching the cluster:\n{}",
                    log_tail(&self.log_path)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "target did not reach the cluster within {READY_TIMEOUT:?}:\n{}",
                    log_tail(&self.log_path)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn unix_socket(&self) -> &Path {
        &self.unix
    }

    /// `nbd://127.0.0.10:PORT/EXPORT`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    /// `nbd+unix:///EXPORT?socket=PATH`.
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.unix.display())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, reaped.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let Some(mut c) = self.child.take() else {
            bail!("target is not running");
        };
        c.kill().context("killing the target")?;
        c.wait().context("reaping the target")?;
        Ok(())
    }

    /// Starts it again on the same address (clients reconnect there).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("target is still running");
        }
        self.launch()
    }

    /// SIGTERM; its exit status.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(c) = self.child.take() else {
            bail!("target is not running");
        };
        terminate(c, "cairn-target", &self.log_path)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }
}

impl Drop for TargetProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- cairn-target log (tail) ---\n{}\n--- end of log ---",
                log_tail(&self.log_path)
            );
        }
    }
}

/// Runs a third-party tool to completion; fails with its output unless it
/// exits 0. A tool missing from PATH fails the test with the package to
/// install (the README's test set-up installs them all).
pub fn run_tool(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = tool(program, args)?;
    if !out.status.success() {
        bail!(
            "{program} {} exited with {}\nstdout:\n{}\nstderr:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Runs a third-party tool and returns its output whatever its status.
pub fn tool(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "running {program} (install it: apt-get install {})",
                package_of(program)
            )
        })
}

/// The Debian package that provides a client tool.
pub fn package_of(program: &str) -> &'static str {
    match program {
        "nbdinfo" | "nbdcopy" | "nbdsh" => "libnbd-bin",
        "nbdfuse" => "nbdfuse",
        "qemu-io" | "qemu-img" | "qemu-nbd" => "qemu-utils",
        "fio" => "fio",
        "nbdkit" => "nbdkit",
        _ => "(see the README)",
    }
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
