//! `cairn up` as a real process: started in a folder, its output read line
//! by line (text, or JSON events with `--json`), stopped with SIGINT as
//! Ctrl-C would, or killed.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::bin_path;

/// A running `cairn up`, killed (SIGKILL) when dropped; its children stop
/// by their parent-death signal.
pub struct UpProcess {
    child: Option<Child>,
    lines: Receiver<String>,
    /// Every line printed so far (stdout and stderr).
    pub output: Vec<String>,
}

impl UpProcess {
    /// Starts `cairn up ARGS` with `cwd` as its current directory.
    pub fn start(cwd: &Path, args: &[&str]) -> anyhow::Result<UpProcess> {
        Self::start_program(&bin_path("cairn")?, cwd, &["up"], args)
    }

    /// Starts `program FIRST.. ARGS..` (a `cairn up` command line as some
    /// document writes it) in `cwd`.
    pub fn start_program(
        program: &Path,
        cwd: &Path,
        first: &[&str],
        args: &[&str],
    ) -> anyhow::Result<UpProcess> {
        let mut child = Command::new(program)
            .args(first)
            .args(args)
            .current_dir(cwd)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().context("no stdout")?;
        let err = child.stderr.take().context("no stderr")?;
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx2.send(format!("stderr: {l}")).is_err() {
                    break;
                }
            }
        });
        Ok(UpProcess {
            child: Some(child),
            lines: rx,
            output: Vec::new(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The next line printed, if one comes within `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        let l = self.lines.recv_timeout(timeout).ok()?;
        eprintln!("[cairn up] {l}");
        self.output.push(l.clone());
        Some(l)
    }

    /// Waits for a printed line containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        if let Some(l) = self.output.iter().find(|l| l.contains(needle)) {
            return Ok(l.clone());
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    eprintln!("[cairn up] {l}");
                    self.output.push(l.clone());
                    if l.contains(needle) {
                        return Ok(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "`cairn up` printed no line with {needle:?} within {timeout:?}; it printed:\n{}",
                        self.output.join("\n")
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!(
                        "`cairn up` ended without printing {needle:?}; it printed:\n{}",
                        self.output.join("\n")
                    )
                }
            }
        }
    }

    /// Sends SIGINT (Ctrl-C) and waits for the exit.
    pub fn interrupt(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGINT).context("sending SIGINT")?;
        self.wait(timeout)
    }

    /// Waits for the exit, collecting output.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("already waited for")?;
        loop {
            while let Ok(l) = self.lines.try_recv() {
                eprintln!("[cairn up] {l}");
                self.output.push(l);
            }
            if let Some(s) = child.try_wait()? {
                // The reader threads end with the pipes; collect the rest.
                while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    eprintln!("[cairn up] {l}");
                    self.output.push(l);
                }
                self.child = None;
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "`cairn up` did not exit within {timeout:?}; it printed:\n{}",
                    self.output.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            c.kill()?;
            c.wait()?;
        }
        self.child = None;
        Ok(())
    }
}

impl Drop for UpProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// The running processes whose parent is `parent`, as (pid, command name).
pub fn children_of(parent: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((ppid, comm, state)) = proc_stat(pid) {
            if ppid == parent && state != 'Z' {
                out.push((pid, comm));
            }
        }
    }
    out.sort();
    out
}

/// (parent pid, command name, state) from /proc/PID/stat.
pub fn proc_stat(pid: u32) -> Option<(u32, String, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let mut rest = stat[close + 2..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((ppid, comm, state))
}

/// The pid of the `cairn up` child whose command line contains `needle`
/// (e.g. `--node-id 2` is matched as "chunk2" by its data directory).
pub fn child_with_arg(parent: u32, needle: &str) -> Option<u32> {
    children_of(parent).into_iter().map(|(p, _)| p).find(|p| {
        std::fs::read(format!("/proc/{p}/cmdline"))
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(needle)
            })
            .unwrap_or(false)
    })
}

/// A port free on all of 127.0.0.2-4 a moment ago (for `--chunk-port`).
pub fn free_chunk_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let first = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), 0))?;
        let port = first.local_addr()?.port();
        let others =
            (3..=4).all(|h| TcpListener::bind((Ipv4Addr::new(127, 0, 0, h), port)).is_ok());
        if others {
            return Ok(port);
        }
    }
    bail!("no port free on all of 127.0.0.2-4")
}

/// Arguments giving a `cairn up` its own free addresses, so tests run
/// beside each other and beside a developer's own `cairn up`.
pub fn free_up_args() -> anyhow::Result<Vec<String>> {
    let vm = crate::free_loopback_addr(Ipv4Addr::LOCALHOST)?;
    let nbd = crate::free_loopback_addr(Ipv4Addr::LOCALHOST)?;
    let iscsi = crate::free_loopback_addr(Ipv4Addr::LOCALHOST)?;
    Ok(vec![
        "--iscsi".into(),
        iscsi.to_string(),
        "--volmgr-listen".into(),
        vm.to_string(),
        "--chunk-port".into(),
        free_chunk_port()?.to_string(),
        "--nbd".into(),
        nbd.to_string(),
    ])
}

/// The NBD address in a `--nbd ADDR` argument list.
pub fn nbd_addr(args: &[String]) -> Option<SocketAddr> {
    args.windows(2)
        .find(|w| w[0] == "--nbd")
        .and_then(|w| w[1].parse().ok())
}

/// The data folder `cairn up` uses in `cwd` by default.
pub fn default_data(cwd: &Path) -> PathBuf {
    cwd.join("cairn-data")
}
