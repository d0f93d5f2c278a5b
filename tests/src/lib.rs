//! Helpers shared by the process-level tests: start real Cairn daemons on
//! loopback, wait until they listen, stop them with SIGTERM, and kill them on
//! drop so a failing test leaves no process behind.
//!
//! Binaries are looked up next to the test executable (cargo puts tests in
//! `build/<profile>/deps/` and binaries in `build/<profile>/`), or in
//! `CAIRN_BIN_DIR` if set. Cargo builds a package's binaries only for that
//! package's own tests, so build them first: `cargo build --workspace --bins`
//! before `cargo nextest run -p cairn-tests` (a plain `cargo nextest run
//! --workspace` builds them too). A stale binary tests old code.
//!
//! Daemon output (stdout and stderr) goes to a log file in the test's
//! temporary directory; it is printed when a test panics with the daemon
//! still owned, and [`ChunkServerProcess::log`] returns it for assertions.
//!
//! - [`ChunkServerProcess`]: one `cairn-chunkserver`.
//! - [`volmgr::VolmgrCluster`]: 1, 3 or 5 `cairn-volmgr` members.
//! - [`cluster::ReplicatedCluster`]: a volume manager and chunk servers on
//!   127.0.0.2, .3, .4 ..., replicating.
//! - [`raw`]: frame-level access to a socket, for tests that send what a
//!   well-behaved client never would.

pub mod cli;
pub mod cluster;
pub mod mount;
pub mod nbdfuse;
pub mod raw;
pub mod target;
pub mod up;
pub mod volmgr;

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Longest wait for a started daemon to accept connections.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a daemon to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Starts tried before giving up; a retry covers the port picked for a
/// daemon being taken by someone else before the daemon binds it.
const START_ATTEMPTS_MAX: usize = 3;
/// Poll period while waiting for a daemon to listen or exit.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Bytes of a daemon's log shown in error messages and on panic.
const LOG_TAIL_BYTES: usize = 8 << 10;

/// The folder holding the workspace's binaries.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CAIRN_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    // build/<profile>/deps/<test>-<hash>: binaries are in build/<profile>/.
    let deps = exe
        .parent()
        .context("test executable has no parent folder")?;
    let profile_dir = if deps.ends_with("deps") {
        deps.parent().context("deps folder has no parent")?
    } else {
        deps
    };
    Ok(profile_dir.to_path_buf())
}

/// The path of workspace binary `name`, checked to exist.
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{} not found; build it with `cargo build -p {name}` or point CAIRN_BIN_DIR at its folder",
            path.display()
        );
    }
    Ok(path)
}

/// A fresh temporary folder under /tmp, removed when dropped, unless
/// `CAIRN_TEST_KEEP` is set: then it stays, with its daemons' whole logs,
/// and its path is printed, for a failure whose log tails are not enough.
pub fn temp_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let keep = std::env::var_os("CAIRN_TEST_KEEP").is_some();
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .disable_cleanup(keep)
        .tempdir_in("/tmp")
        .context("creating a temporary folder under /tmp")?;
    if keep {
        eprintln!("CAIRN_TEST_KEEP: keeping {}", dir.path().display());
    }
    Ok(dir)
}

/// The length and seed of a randomized soak test: `{prefix}_ROUNDS` (else
/// `default_rounds`) and `{prefix}_SEED` (else a fresh random seed). Prints
/// both, with how to replay the seed, so a failure in CI can be run again.
pub fn soak_settings(prefix: &str, default_rounds: u32) -> (u32, u64) {
    use rand::Rng;
    let rounds = std::env::var(format!("{prefix}_ROUNDS"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_rounds);
    let seed = std::env::var(format!("{prefix}_SEED"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("{rounds} rounds, seed {seed} ({prefix}_SEED={seed} to replay)");
    (rounds, seed)
}

/// A loopback address with a port that was free a moment ago (the kernel
/// picked it). Someone else may take it before it is used; callers retry.
pub fn free_loopback_addr(ip: Ipv4Addr) -> anyhow::Result<SocketAddr> {
    assert!(
        ip.is_loopback(),
        "tests use loopback addresses only, not {ip}"
    );
    let listener = TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
    listener.local_addr().context("reading a bound address")
}

/// How to start a chunk server.
#[derive(Debug, Clone)]
pub struct ChunkServerOptions {
    pub cluster_id: String,
    pub node_id: u64,
    /// Loopback address to listen on; the port is picked per start.
    pub listen_ip: Ipv4Addr,
    /// Data directory to use (created if missing; empty for the first
    /// start, which passes `--init`). By default a fresh one in the test's
    /// temporary folder. Pass it here, not in `extra_args`: the harness
    /// always gives `--data-dir`, and the daemon refuses it twice.
    pub data_dir: Option<PathBuf>,
    /// More command-line arguments (not `--data-dir`, `--listen`,
    /// `--cluster-id`, `--node-id` or `--init`, which the harness gives).
    pub extra_args: Vec<String>,
    /// `RUST_LOG` for the daemon; by default the test's own, else debug for
    /// Cairn crates, so a failing test's log says what happened.
    pub rust_log: Option<String>,
}

impl Default for ChunkServerOptions {
    fn default() -> Self {
        Self {
            cluster_id: "test-cluster".to_string(),
            node_id: 1,
            listen_ip: Ipv4Addr::LOCALHOST,
            data_dir: None,
            extra_args: Vec::new(),
            rust_log: None,
        }
    }
}

/// A running `cairn-chunkserver`, killed (SIGKILL) when dropped.
pub struct ChunkServerProcess {
    options: ChunkServerOptions,
    child: Option<Child>,
    addr: SocketAddr,
    data_dir: PathBuf,
    log_path: PathBuf,
    // Last, so the folder goes after the child is reaped.
    _dir: tempfile::TempDir,
}

impl ChunkServerProcess {
    /// Formats a new data directory (`--init`) and starts a server on it.
    pub fn start(options: ChunkServerOptions) -> anyhow::Result<Self> {
        let dir = temp_dir("cairn-chunkserver-")?;
        let data_dir = options
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let log_path = dir.path().join("chunkserver.log");
        let mut server = ChunkServerProcess {
            options,
            child: None,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            data_dir,
            log_path,
            _dir: dir,
        };
        server.launch(true)?;
        Ok(server)
    }

    /// Starts the server again on the same data directory (without
    /// `--init`), after [`stop`](Self::stop) or [`kill`](Self::kill). It
    /// tries its previous address first (the volume manager refuses a node
    /// that registers from a new one); only if that is taken may the port
    /// change: read [`addr`](Self::addr) again.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("chunk server {} is still running", self.addr);
        }
        self.launch(false)
    }

    fn launch(&mut self, init: bool) -> anyhow::Result<()> {
        let bin = bin_path("cairn-chunkserver")?;
        let mut last_error = None;
        for attempt in 1..=START_ATTEMPTS_MAX {
            let addr = if attempt == 1 && self.addr.port() != 0 {
                self.addr
            } else {
                free_loopback_addr(self.options.listen_ip)?
            };
            let mut child = self
                .command(&bin, addr, init)?
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            match wait_until_listening(&mut child, addr) {
                Ok(()) => {
                    self.child = Some(child);
                    self.addr = addr;
                    return Ok(());
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error =
                        Some(e.context(format!("start attempt {attempt} of {START_ATTEMPTS_MAX}")));
                }
            }
        }
        let error = last_error.unwrap_or_else(|| anyhow::anyhow!("no start attempted"));
        Err(error.context(format!(
            "chunk server did not start; its log ends with:\n{}",
            self.log_tail()
        )))
    }

    fn command(&self, bin: &Path, addr: SocketAddr, init: bool) -> anyhow::Result<Command> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        let log_clone = log.try_clone().context("duplicating the log file handle")?;
        let mut cmd = Command::new(bin);
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--cluster-id")
            .arg(&self.options.cluster_id)
            .arg("--node-id")
            .arg(self.options.node_id.to_string());
        if init {
            cmd.arg("--init");
        }
        cmd.args(&self.options.extra_args);
        let rust_log = self
            .options
            .rust_log
            .clone()
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info,cairn_chunkserver=debug".to_string());
        // Plain text, so tests can search the log.
        cmd.env("RUST_LOG", rust_log).env("NO_COLOR", "1");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log_clone))
            .stderr(Stdio::from(log));
        Ok(cmd)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process is alive (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) | Some(Err(_)) | None => false,
        }
    }

    /// Sends SIGTERM and waits (at most [`STOP_TIMEOUT`]) for the exit status.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(child) = self.child.take() else {
            bail!("chunk server {} is not running", self.addr);
        };
        terminate(
            child,
            &format!("chunk server {}", self.addr),
            &self.log_path,
        )
    }

    /// Kills the process with SIGKILL (a crash, for recovery tests).
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing the chunk server")?;
            child.wait().context("reaping the chunk server")?;
        }
        Ok(())
    }

    /// A disk replaced: kills the process, empties its data directory and
    /// starts it again with `--init` under the same node id and address,
    /// as an admin would after swapping a failed disk.
    pub fn replace_disk(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        std::fs::remove_dir_all(&self.data_dir)
            .with_context(|| format!("removing {}", self.data_dir.display()))?;
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating {}", self.data_dir.display()))?;
        self.launch(true)
    }

    /// The daemon's whole log so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Waits (at most `timeout`) until some log line satisfies `matches`;
    /// returns the lines that do.
    pub fn wait_for_log_lines(
        &self,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<String> = self
                .log()
                .lines()
                .filter(|l| matches(l))
                .map(str::to_string)
                .collect();
            if !found.is_empty() || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log_path)
    }
}

/// SIGTERM to `child`, then its exit status (at most [`STOP_TIMEOUT`]);
/// `what` names it in errors, whose text ends with its log's tail.
pub(crate) fn terminate(
    mut child: Child,
    what: &str,
    log_path: &Path,
) -> anyhow::Result<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        bail!("{what} had already exited with {status} before SIGTERM");
    }
    let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
    kill(pid, Signal::SIGTERM).with_context(|| format!("sending SIGTERM to {what} (pid {pid})"))?;
    match wait_with_deadline(&mut child, STOP_TIMEOUT)? {
        Some(status) => Ok(status),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{what} did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed it. Log ends with:\n{}",
                log_tail(log_path)
            )
        }
    }
}

/// A daemon's whole log so far (empty if there is none yet).
pub(crate) fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|raw| String::from_utf8_lossy(&raw).into_owned())
        .unwrap_or_default()
}

/// The last [`LOG_TAIL_BYTES`] of a daemon's log, cut at a character boundary.
pub(crate) fn log_tail(path: &Path) -> String {
    let log = read_log(path);
    let mut start = log.len().saturating_sub(LOG_TAIL_BYTES);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    log[start..].to_string()
}

impl Drop for ChunkServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- chunk server {} log (tail) ---\n{}\n--- end of log ---",
                self.addr,
                self.log_tail()
            );
        }
    }
}

/// Polls until `addr` accepts a TCP connection; fails early if `child` exits.
pub(crate) fn wait_until_listening(child: &mut Child, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().context("checking the daemon process")? {
            bail!("daemon exited with {status} before listening on {addr}");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("daemon did not listen on {addr} within {READY_TIMEOUT:?}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Waits for `child` to exit; `None` if it is still running at the deadline.
pub(crate) fn wait_with_deadline(
    child: &mut Child,
    timeout: Duration,
) -> anyhow::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for the daemon to exit")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// SIGSTOP and SIGCONT for a daemon a test started: a long stall or a
/// partition (its sockets stay open and say nothing), after which it wakes
/// with its old state.
pub trait Freeze {
    /// The process id while it runs.
    fn running_pid(&self) -> Option<u32>;
    /// What it is, for error messages.
    fn what(&self) -> String;

    /// Freezes the process (SIGSTOP).
    fn pause(&self) -> anyhow::Result<()> {
        send_signal(self, Signal::SIGSTOP)
    }

    /// Lets a paused process go on (SIGCONT).
    fn resume(&self) -> anyhow::Result<()> {
        send_signal(self, Signal::SIGCONT)
    }
}

fn send_signal<P: Freeze + ?Sized>(p: &P, signal: Signal) -> anyhow::Result<()> {
    let pid = p
        .running_pid()
        .with_context(|| format!("{} is not running", p.what()))?;
    kill(Pid::from_raw(pid as i32), signal)
        .with_context(|| format!("sending {signal} to {}", p.what()))
}

impl Freeze for ChunkServerProcess {
    fn running_pid(&self) -> Option<u32> {
        self.pid()
    }
    fn what(&self) -> String {
        format!("chunk server {}", self.addr)
    }
}
