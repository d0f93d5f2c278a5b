//! The daemons speak systemd's notification protocol (`Type=notify`): each
//! real daemon is started with NOTIFY_SOCKET pointing at a datagram socket
//! this test reads, standing in for systemd, and WATCHDOG_USEC=400000.
//!
//! For each: READY=1 arrives, and only once its port accepts connections
//! (connected to right after READY, with no retry); no WATCHDOG=1 before
//! READY; WATCHDOG=1 arrives repeatedly after it; SIGTERM brings STOPPING=1
//! and then exit status 0.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_tests::{bin_path, free_loopback_addr, temp_dir, READY_TIMEOUT, STOP_TIMEOUT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const WATCHDOG_USEC: &str = "400000";
const CLUSTER: &str = "sd-test";

/// The stand-in for systemd's notification socket. A thread reads every
/// datagram as it comes (as systemd does: a sender blocks once the socket's
/// queue is full) and hands it over with its arrival time.
struct NotifySocket {
    path: PathBuf,
    rx: mpsc::Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> anyhow::Result<NotifySocket> {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).context("binding the notify socket")?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                match socket.recv(&mut buf) {
                    Ok(n) => {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        if tx.send((Instant::now(), text)).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // Ends once the test dropped the receiver.
                        if tx.send((Instant::now(), String::new())).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(NotifySocket {
            path,
            rx,
            seen: Vec::new(),
        })
    }

    /// Waits for a datagram holding the line `line`; returns when it came.
    fn wait_for(&mut self, line: &str, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok((at, text)) = self.rx.recv_timeout(Duration::from_millis(100)) {
                if text.is_empty() {
                    continue;
                }
                self.seen.push((at, text.clone()));
                if text.lines().any(|l| l == line) {
                    return Ok(at);
                }
            }
        }
        bail!(
            "no {line} within {timeout:?}; received: {:?}",
            self.messages()
        )
    }

    /// Datagrams received during the next `span`.
    fn collect(&mut self, span: Duration) -> Vec<String> {
        let deadline = Instant::now() + span;
        let mut out = Vec::new();
        while Instant::now() < deadline {
            if let Ok((at, text)) = self.rx.recv_timeout(Duration::from_millis(20)) {
                if !text.is_empty() {
                    self.seen.push((at, text.clone()));
                    out.push(text);
                }
            }
        }
        out
    }

    fn messages(&self) -> Vec<&str> {
        self.seen.iter().map(|(_, m)| m.as_str()).collect()
    }
}

/// A daemon started by this test, killed if still running when dropped.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(
        name: &'static str,
        args: &[String],
        dir: &Path,
        notify: Option<&Path>,
    ) -> anyhow::Result<Daemon> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let mut command = Command::new(bin_path(name)?);
        command
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if let Some(path) = notify {
            command
                .env("NOTIFY_SOCKET", path)
                .env("WATCHDOG_USEC", WATCHDOG_USEC);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Daemon { name, child, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn sigterm(&self) -> anyhow::Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM)?;
        Ok(())
    }

    fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} still running {timeout:?} after SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log());
        }
    }
}

/// The whole protocol for one daemon, started with `notify` as its socket
/// and serving on `addr`.
fn check_protocol(
    daemon: &mut Daemon,
    notify: &mut NotifySocket,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    let name = daemon.name;
    notify
        .wait_for("READY=1", READY_TIMEOUT)
        .with_context(|| format!("{name}: log:\n{}", daemon.log()))?;
    // Right after READY, without retrying: the port must already accept.
    TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("{name} sent READY=1 but {addr} does not accept connections"))?;
    let ready = notify
        .seen
        .iter()
        .position(|(_, m)| m.lines().any(|l| l == "READY=1"))
        .expect("READY seen");
    assert!(
        !notify.seen[..ready]
            .iter()
            .any(|(_, m)| m.contains("WATCHDOG=1")),
        "{name}: a watchdog ping before READY: {:?}",
        notify.messages()
    );
    assert!(
        notify.seen[ready].1.contains("STATUS="),
        "{name}: READY carries a status line: {:?}",
        notify.seen[ready].1
    );

    // WATCHDOG_USEC 400 ms: a ping every 200 ms, so 2 s hold about 10.
    let pings = notify
        .collect(Duration::from_secs(2))
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count();
    assert!(
        pings >= 5,
        "{name}: {pings} watchdog pings in 2 s, expected about 10: {:?}",
        notify.messages()
    );

    daemon.sigterm()?;
    notify
        .wait_for("STOPPING=1", STOP_TIMEOUT)
        .with_context(|| format!("{name} after SIGTERM; log:\n{}", daemon.log()))?;
    let status = daemon.wait_exit(STOP_TIMEOUT)?;
    assert!(
        status.success(),
        "{name} exited with {status} after SIGTERM; log:\n{}",
        daemon.log()
    );
    Ok(())
}

fn start_volmgr(dir: &Path, notify: Option<&Path>) -> anyhow::Result<(Daemon, SocketAddr)> {
    let addr = free_loopback_addr(Ipv4Addr::LOCALHOST)?;
    let data = dir.join("volmgr");
    let args: Vec<String> = [
        "--data-dir",
        data.to_str().context("path")?,
        "--member-id",
        "1",
        "--cluster-id",
        CLUSTER,
        "--listen",
        &addr.to_string(),
        "--initial-members",
        &format!("1={addr}"),
        "--log-format",
        "journal",
    ]
    .map(String::from)
    .to_vec();
    let daemon = Daemon::start("cairn-volmgr", &args, dir, notify)?;
    Ok((daemon, addr))
}

/// Waits until a daemon started without a notify socket accepts.
fn wait_listening(daemon: &Daemon, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("{} not listening on {addr}:\n{}", daemon.name, daemon.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[test]
fn volmgr_notifies_ready_watchdog_and_stopping() -> anyhow::Result<()> {
    let dir = temp_dir("cairn-systemd-")?;
    let mut notify = NotifySocket::bind(dir.path())?;
    let (mut volmgr, addr) = start_volmgr(dir.path(), Some(&notify.path))?;
    check_protocol(&mut volmgr, &mut notify, addr)
}

#[test]
fn chunkserver_notifies_ready_watchdog_and_stopping() -> anyhow::Result<()> {
    let dir = temp_dir("cairn-systemd-")?;
    let (volmgr, volmgr_addr) = start_volmgr(dir.path(), None)?;
    wait_listening(&volmgr, volmgr_addr)?;
    let mut notify = NotifySocket::bind(dir.path())?;
    let addr = free_loopback_addr(Ipv4Addr::LOCALHOST)?;
    let data = dir.path().join("disk1");
    std::fs::create_dir_all(&data)?;
    let args: Vec<String> = [
        "--data-dir",
        data.to_str().context("path")?,
        "--init",
        "--cluster-id",
        CLUSTER,
        "--node-id",
        "1",
        "--listen",
        &addr.to_string(),
        "--volmgr",
        &volmgr_addr.to_string(),
        "--log-format",
        "journal",
    ]
    .map(String::from)
    .to_vec();
    let mut server = Daemon::start("cairn-chunkserver", &args, dir.path(), Some(&notify.path))?;
    check_protocol(&mut server, &mut notify, addr)
}

#[test]
fn target_notifies_ready_watchdog_and_stopping() -> anyhow::Result<()> {
    let dir = temp_dir("cairn-systemd-")?;
    let (volmgr, volmgr_addr) = start_volmgr(dir.path(), None)?;
    wait_listening(&volmgr, volmgr_addr)?;
    let mut notify = NotifySocket::bind(dir.path())?;
    let addr = free_loopback_addr(Ipv4Addr::LOCALHOST)?;
    let unix = dir.path().join("nbd.sock");
    let args: Vec<String> = [
        "--volmgr",
        &volmgr_addr.to_string(),
        "--cluster-id",
        CLUSTER,
        "--listen",
        &addr.to_string(),
        "--unix",
        unix.to_str().context("path")?,
        "--log-format",
        "journal",
    ]
    .map(String::from)
    .to_vec();
    let mut target = Daemon::start("cairn-target", &args, dir.path(), Some(&notify.path))?;
    check_protocol(&mut target, &mut notify, addr)?;
    assert!(
        !unix.exists(),
        "a clean stop removes the unix socket {}",
        unix.display()
    );
    Ok(())
}

/// `systemd/cairn.toml.example`, the CLI's /etc/cairn/cairn.toml: exactly
/// the keys the CLI reads (cluster_id and volmgr required, targets
/// optional), with values of the right types.
#[test]
fn the_cli_example_has_exactly_the_cli_keys() {
    let text = include_str!("../../systemd/cairn.toml.example");
    let table: toml::Table = toml::from_str(text).expect("the example parses");
    let keys: Vec<&str> = table.keys().map(String::as_str).collect();
    assert_eq!(keys, ["cluster_id", "targets", "volmgr"]);
    assert!(table["cluster_id"].is_str());
    for key in ["volmgr", "targets"] {
        let list = table[key].as_array().expect("a list");
        assert!(!list.is_empty() && list.iter().all(|v| v.is_str()), "{key}");
    }
    for t in table["targets"].as_array().unwrap() {
        assert!(t.as_str().unwrap().starts_with("nbd://"), "{t}");
    }
}
