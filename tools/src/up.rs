//! `cairn up`: a whole Cairn cluster on this machine, for trying it out and
//! for tests. One volume manager member, three chunk servers (three failure
//! domains on 127.0.0.2-4) and the NBD target run as real child processes
//! of the same binaries systemd runs, with their data and logs under one
//! folder (default `./cairn-data`).
//!
//! `cairn up` supervises them the way systemd would: each child gets its own
//! `NOTIFY_SOCKET`, is ready when it sends `READY=1`, and pings `WATCHDOG=1`;
//! one that exits or stops pinging is reported and restarted (with backoff).
//! One that exits with status 2 (a configuration or data-directory error) is
//! not restarted: a restart cannot fix it. Ctrl-C (or SIGTERM) stops the
//! target first, then the chunk servers, then the volume manager, each with
//! SIGTERM so in-flight I/O finishes. Running `cairn up` again on the same
//! folder finds everything as it was left.
//!
//! Layout of the folder:
//! ```text
//! cairn-data/
//!   up.toml      settings fixed when the cluster was created (cluster id, addresses)
//!   cairn.toml   where the `cairn` CLI finds this cluster (see config.rs)
//!   up.lock      held while `cairn up` runs (one `cairn up` per folder)
//!   volmgr/      the volume manager member's raft log
//!   chunk1..3/   the chunk servers' data directories
//!   logs/        one log file per process, appended to (moved to .1 past 64 MiB)
//!   run/         the notify sockets
//!   nbd.sock     the target's unix socket
//! ```

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::UnixDatagram;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use cairn_volmgr::client::VolmgrClient;

use crate::config::ClusterConfig;
use crate::output::bytes_human;
use crate::volume::parse_size;

/// Chunk servers `cairn up` runs: node i listens on 127.0.0.(i+1), host
/// `node<i>`, so the three are three failure domains.
const CHUNK_SERVERS: u8 = 3;
/// How long a child may take from start to `READY=1`.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// The watchdog interval given to children (`WATCHDOG_USEC`); they ping at
/// half of it. A child silent for this long is killed and restarted.
const WATCHDOG: Duration = Duration::from_secs(20);
/// How long each child gets to stop after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// First restart delay; doubles for a child that keeps dying young.
const RESTART_DELAY_MIN: Duration = Duration::from_secs(1);
const RESTART_DELAY_MAX: Duration = Duration::from_secs(30);
/// A child that ran this long before dying restarts after the minimum delay.
const RAN_LONG_ENOUGH: Duration = Duration::from_secs(60);
/// Log lines shown when a child fails.
const LOG_TAIL_LINES: usize = 15;

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    cairn up                          # data under ./cairn-data, NBD on 127.0.0.1:10809\n  \
    cairn up --data /srv/cairn --nbd 127.0.0.1:10810\n\n\
    Then, in another terminal:\n  \
    nbdinfo nbd://127.0.0.1:10809/default\n  \
    cairn cluster status\n\n\
    Exit status: 0 after Ctrl-C stopped everything cleanly; 1 if the cluster could not be \
    started (the message says which process and shows its log); 2 for bad arguments, a \
    folder that cannot be written, too little disk or an address in use.")]
pub struct UpArgs {
    /// Folder holding every process's data and logs (created if missing).
    #[arg(long, default_value = "cairn-data", value_name = "DIR")]
    data: PathBuf,
    /// Address the NBD target listens on.
    #[arg(long, default_value = "127.0.0.1:10809", value_name = "ADDR:PORT")]
    nbd: SocketAddr,
    /// Address the iSCSI target listens on [default: 127.0.0.1:3260, or the
    /// next free port up to 3269].
    #[arg(long, value_name = "ADDR:PORT")]
    iscsi: Option<SocketAddr>,
    /// Address of the volume manager. Fixed when the cluster is created:
    /// later runs use the one recorded in DIR/up.toml.
    #[arg(long, value_name = "ADDR:PORT")]
    volmgr_listen: Option<SocketAddr>,
    /// Port of the chunk servers on 127.0.0.2-4. Fixed when the cluster is
    /// created, like --volmgr-listen.
    #[arg(long, value_name = "PORT")]
    chunk_port: Option<u16>,
    /// Name of the volume created when the cluster has none (also the NBD
    /// default export).
    #[arg(long, default_value = "default", value_name = "NAME")]
    volume: String,
    /// Size of that volume (thin: it takes no space until written).
    #[arg(long, default_value = "10G", value_parser = parse_size, value_name = "SIZE")]
    volume_size: u64,
    /// Refuse to start with less free space than this in DIR.
    #[arg(long, default_value = "1G", value_parser = parse_size, value_name = "SIZE")]
    min_free: u64,
    /// Print events as JSON lines instead of text.
    #[arg(long)]
    json: bool,
}

/// An error `cairn up` reports with exit status 2: the user's set-up, not a
/// failure of Cairn (a folder it cannot write, an address in use ...).
fn setup_error(msg: impl Into<String>) -> anyhow::Error {
    crate::exit::usage(msg)
}

/// DIR/up.toml: what must not change between runs, because the processes
/// recorded it (the raft membership holds the volume manager's address, the
/// map holds the chunk servers').
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct UpState {
    cluster_id: String,
    volmgr_listen: SocketAddr,
    chunk_port: u16,
}

const DEFAULT_VOLMGR_LISTEN: &str = "127.0.0.1:7400";
const DEFAULT_CHUNK_PORT: u16 = 7410;

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Children are spawned from this (the main) thread: their parent-death
    // signal fires when this thread ends, which is when `cairn up` ends.
    rt.block_on(up(args))
}

/// What one child process is.
struct Spec {
    /// Short name: volmgr, chunk1..3, target.
    name: String,
    binary: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    /// The address that answers once it serves (for messages).
    addr: String,
}

/// One supervised child.
struct Supervised {
    spec: Spec,
    pid: Option<u32>,
    started: Instant,
    ready: bool,
    last_ping: Instant,
    restart_at: Option<Instant>,
    restart_delay: Duration,
    /// Restarts so far (reported by `--json`).
    restarts: u32,
}

enum Event {
    Notify { child: usize, msg: String },
    Exited { child: usize, status: ExitStatus },
    Stop(&'static str),
}

/// Prints a line to stdout. A supervisor must not die because its
/// terminal or pipe went away, so a failed write is ignored.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}

struct Out {
    json: bool,
}

impl Out {
    fn event(&self, kind: &str, text: &str, fields: serde_json::Value) {
        if self.json {
            let mut v = json!({ "event": kind, "message": text });
            if let (Some(o), serde_json::Value::Object(f)) = (v.as_object_mut(), fields) {
                o.extend(f);
            }
            say(&v.to_string());
        } else {
            say(&format!("cairn up: {text}"));
        }
    }
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let out = Out { json: args.json };
    let data = prepare_folder(&args.data, args.min_free)?;
    let _lock = lock_folder(&data)?;
    let state = load_or_create_state(&data, &args)?;
    let iscsi = iscsi_address(args.iscsi)?;
    check_addresses(&state, args.nbd)?;
    let binaries = Binaries::find()?;

    let volmgr_addr = state.volmgr_listen.to_string();
    let unix_socket = short_path(&data.join("nbd.sock"));
    let specs = child_specs(&data, &state, &args, &binaries, &unix_socket, iscsi);
    ClusterConfig {
        cluster_id: state.cluster_id.clone(),
        volmgr: vec![volmgr_addr.clone()],
        targets: vec![format!("nbd://{}", args.nbd)],
    }
    .write(&data.join(crate::config::FILE_NAME))?;

    let (tx, mut rx) = mpsc::unbounded_channel();
    // SIGHUP too: a closed terminal or ssh session stops the cluster in
    // order rather than killing `cairn up` outright.
    for (kind, name) in [
        (SignalKind::interrupt(), "SIGINT"),
        (SignalKind::terminate(), "SIGTERM"),
        (SignalKind::hangup(), "SIGHUP"),
    ] {
        let mut s = signal(kind).context("installing a signal handler")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if tx.send(Event::Stop(name)).is_err() {
                    break;
                }
            }
        });
    }

    let run_dir = data.join("run");
    fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let mut children = Vec::new();
    for (i, spec) in specs.into_iter().enumerate() {
        let sock_path = short_path(&run_dir.join(format!("{}.notify", spec.name)));
        let _ = fs::remove_file(&sock_path);
        let sock = UnixDatagram::bind(&sock_path)
            .with_context(|| format!("binding the notify socket {}", sock_path.display()))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf).await {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if tx.send(Event::Notify { child: i, msg }).is_err() {
                    break;
                }
            }
        });
        children.push(Supervised {
            spec,
            pid: None,
            started: Instant::now(),
            ready: false,
            last_ping: Instant::now(),
            restart_at: None,
            restart_delay: RESTART_DELAY_MIN,
            restarts: 0,
        });
    }
    let mut sup = Supervisor {
        children,
        tx,
        run_dir,
        out,
    };

    out_starting(&sup.out, &data, &state);
    // Start in dependency order, each group ready before the next: the
    // volume manager, then the chunk servers, then the target.
    let groups: [&[usize]; 3] = [&[0], &[1, 2, 3], &[4]];
    for group in groups {
        for &i in group {
            sup.spawn(i)?;
        }
        match sup.wait_ready(group, &mut rx).await {
            Ok(true) => {}
            Ok(false) => return sup.stop_cleanly(&mut rx).await,
            Err(e) => {
                sup.stop_all(&mut rx).await;
                return Err(e);
            }
        }
    }
    let client = VolmgrClient::new(vec![volmgr_addr.clone()], state.cluster_id.clone())
        .with_deadline(Duration::from_secs(30));
    let setup = async {
        wait_nodes_up(&client).await?;
        ensure_volume(&client, &args).await
    };
    tokio::pin!(setup);
    let setup = loop {
        tokio::select! {
            r = &mut setup => break r,
            e = rx.recv() => match e {
                Some(Event::Notify { child, msg }) => sup.on_notify(child, &msg),
                Some(Event::Stop(_)) => return sup.stop_cleanly(&mut rx).await,
                Some(Event::Exited { child, status }) => break Err(sup.died_early(child, status)),
                None => break Err(anyhow!("event channel closed")),
            }
        }
    };
    match setup {
        Ok(Some(v)) => sup.out.event(
            "volume",
            &format!(
                "created volume {} ({}, 3 replicas, thin)",
                v.name,
                bytes_human(v.size_bytes)
            ),
            json!({ "volume": v.name, "size_bytes": v.size_bytes }),
        ),
        Ok(None) => {}
        Err(e) => {
            sup.stop_all(&mut rx).await;
            return Err(e);
        }
    }
    print_ready(&sup.out, &data, &args, &unix_socket, iscsi);

    sup.supervise(&mut rx).await;
    sup.stop_cleanly(&mut rx).await
}

struct Supervisor {
    children: Vec<Supervised>,
    tx: mpsc::UnboundedSender<Event>,
    run_dir: PathBuf,
    out: Out,
}

impl Supervisor {
    async fn stop_cleanly(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Event>,
    ) -> anyhow::Result<()> {
        self.stop_all(rx).await;
        self.out.event(
            "stopped",
            "stopped cleanly; run `cairn up` again to carry on",
            json!({}),
        );
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let c = &mut self.children[i];
        rotate_log(&c.spec.log);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&c.spec.log)
            .with_context(|| format!("opening {}", c.spec.log.display()))?;
        let log2 = log.try_clone().context("duplicating a log file handle")?;
        let notify = short_path(&self.run_dir.join(format!("{}.notify", c.spec.name)));
        let mut cmd = std::process::Command::new(&c.spec.binary);
        cmd.args(&c.spec.args)
            .env("NOTIFY_SOCKET", &notify)
            .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
            .env_remove("WATCHDOG_PID")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log2))
            .stderr(Stdio::from(log))
            // Its own process group: Ctrl-C in the terminal reaches only
            // `cairn up`, which then stops the children in order.
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only
        // makes one async-signal-safe system call (prctl), allocating nothing.
        unsafe {
            cmd.pre_exec(|| {
                // If `cairn up` dies (even by SIGKILL), its children stop
                // cleanly instead of running on unsupervised.
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
        let mut child = tokio::process::Command::from(cmd)
            .spawn()
            .with_context(|| format!("starting {}", c.spec.binary.display()))?;
        c.pid = child.id();
        c.started = Instant::now();
        c.last_ping = Instant::now();
        c.ready = false;
        c.restart_at = None;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                let _ = tx.send(Event::Exited { child: i, status });
            }
        });
        Ok(())
    }

    /// Waits until every child in `group` has sent READY=1; false if a
    /// signal asked to stop first.
    async fn wait_ready(
        &mut self,
        group: &[usize],
        rx: &mut mpsc::UnboundedReceiver<Event>,
    ) -> anyhow::Result<bool> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        while group.iter().any(|&i| !self.children[i].ready) {
            let e = tokio::select! {
                e = rx.recv() => e,
                _ = tokio::time::sleep_until(deadline) => {
                    let late: Vec<_> = group.iter().filter(|&&i| !self.children[i].ready)
                        .map(|&i| self.children[i].spec.name.clone()).collect();
                    let first = group.iter().find(|&&i| !self.children[i].ready).copied().unwrap_or(0);
                    bail!("{} not ready within {READY_TIMEOUT:?}; the log of {} ends with:\n{}",
                        late.join(", "), self.children[first].spec.name,
                        log_tail(&self.children[first].spec.log));
                }
            };
            match e {
                Some(Event::Notify { child, msg }) => self.on_notify(child, &msg),
                Some(Event::Exited { child, status }) => {
                    self.children[child].pid = None;
                    return Err(self.died_early(child, status));
                }
                Some(Event::Stop(s)) => {
                    self.out.event(
                        "stopping",
                        &format!("{s} during start-up: stopping"),
                        json!({}),
                    );
                    return Ok(false);
                }
                None => bail!("event channel closed"),
            }
        }
        Ok(true)
    }

    fn died_early(&mut self, i: usize, status: ExitStatus) -> anyhow::Error {
        let c = &mut self.children[i];
        c.pid = None;
        let msg = format!(
            "{} exited while starting ({}); its log ({}) ends with:\n{}",
            c.spec.name,
            describe(status),
            c.spec.log.display(),
            log_tail(&c.spec.log)
        );
        if status.code() == Some(2) {
            setup_error(msg)
        } else {
            anyhow!(msg)
        }
    }

    fn on_notify(&mut self, i: usize, msg: &str) {
        let c = &mut self.children[i];
        for line in msg.lines() {
            match line {
                "READY=1" => {
                    c.ready = true;
                    c.last_ping = Instant::now();
                    if c.restarts > 0 {
                        let text = format!("{} is serving again on {}", c.spec.name, c.spec.addr);
                        self.out
                            .event("ready", &text, json!({ "process": c.spec.name }));
                    }
                }
                "WATCHDOG=1" => c.last_ping = Instant::now(),
                _ => {}
            }
        }
    }

    /// Runs until Ctrl-C / SIGTERM: restarts children that die or hang.
    async fn supervise(&mut self, rx: &mut mpsc::UnboundedReceiver<Event>) {
        loop {
            let next_restart = self.children.iter().filter_map(|c| c.restart_at).min();
            // Watchdog checks happen once a second only while some child is
            // up (always): cheap, and the idle goal is about the cluster.
            let wake = next_restart
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + WATCHDOG / 4);
            let e = tokio::select! {
                e = rx.recv() => e,
                _ = tokio::time::sleep_until(wake) => {
                    self.tick();
                    continue;
                }
            };
            match e {
                Some(Event::Notify { child, msg }) => self.on_notify(child, &msg),
                Some(Event::Exited { child, status }) => self.on_exit(child, status),
                Some(Event::Stop(s)) => {
                    self.out.event(
                        "stopping",
                        &format!("{s}: stopping"),
                        json!({ "signal": s }),
                    );
                    return;
                }
                None => return,
            }
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        for i in 0..self.children.len() {
            let c = &mut self.children[i];
            if c.restart_at.is_some_and(|t| t <= now) {
                c.restarts += 1;
                let name = c.spec.name.clone();
                if let Err(e) = self.spawn(i) {
                    let c = &mut self.children[i];
                    c.restart_at = Some(now + c.restart_delay);
                    self.out.event(
                        "error",
                        &format!("restarting {name} failed: {e:#}"),
                        json!({ "process": name }),
                    );
                }
                continue;
            }
            // Silent too long: after READY, no ping for WATCHDOG; before it
            // (a restart still starting), not ready within READY_TIMEOUT.
            let hung = c.pid.is_some()
                && if c.ready {
                    now.duration_since(c.last_ping) > WATCHDOG
                } else {
                    c.restarts > 0 && now.duration_since(c.started) > READY_TIMEOUT
                };
            if hung {
                let text = format!(
                    "{} (pid {}) is not responding (no watchdog ping or READY in time): killing it",
                    c.spec.name,
                    c.pid.unwrap_or(0)
                );
                self.out
                    .event("hung", &text, json!({ "process": c.spec.name }));
                c.last_ping = now;
                signal_child(c, Signal::SIGKILL);
            }
        }
    }

    fn on_exit(&mut self, i: usize, status: ExitStatus) {
        let c = &mut self.children[i];
        c.pid = None;
        c.ready = false;
        let ran = c.started.elapsed();
        if status.code() == Some(2) {
            let text = format!(
                "{} exited with status 2 (a configuration or data error that a restart \
                 cannot fix); not restarting it. Its log ({}) ends with:\n{}",
                c.spec.name,
                c.spec.log.display(),
                log_tail(&c.spec.log)
            );
            self.out.event(
                "failed",
                &text,
                json!({ "process": c.spec.name, "code": 2 }),
            );
            return;
        }
        if ran >= RAN_LONG_ENOUGH {
            c.restart_delay = RESTART_DELAY_MIN;
        }
        let delay = c.restart_delay;
        c.restart_delay = (c.restart_delay * 2).min(RESTART_DELAY_MAX);
        c.restart_at = Some(Instant::now() + delay);
        let text = format!(
            "{} (on {}) exited after {} ({}); restarting in {}s. Log: {}",
            c.spec.name,
            c.spec.addr,
            human_duration(ran),
            describe(status),
            delay.as_secs(),
            c.spec.log.display()
        );
        self.out.event(
            "exited",
            &text,
            json!({ "process": c.spec.name, "status": describe(status), "restart_in_s": delay.as_secs() }),
        );
    }

    /// Stops the target, then the chunk servers, then the volume manager.
    async fn stop_all(&mut self, rx: &mut mpsc::UnboundedReceiver<Event>) {
        for group in [&[4usize][..], &[1, 2, 3], &[0]] {
            for &i in group {
                let c = &mut self.children[i];
                c.restart_at = None;
                signal_child(c, Signal::SIGTERM);
            }
            let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
            while group.iter().any(|&i| self.children[i].pid.is_some()) {
                let e = tokio::select! {
                    e = rx.recv() => e,
                    _ = tokio::time::sleep_until(deadline) => {
                        for &i in group {
                            let c = &mut self.children[i];
                            if c.pid.is_some() {
                                self.out.event("killed",
                                    &format!("{} did not stop within {STOP_TIMEOUT:?}: killing it", c.spec.name),
                                    json!({ "process": c.spec.name }));
                                signal_child(c, Signal::SIGKILL);
                            }
                        }
                        // The kill is certain; wait for the exit events.
                        rx.recv().await
                    }
                };
                match e {
                    Some(Event::Exited { child, status }) => {
                        let c = &mut self.children[child];
                        c.pid = None;
                        if !status.success() {
                            let text = format!("{} stopped with {}", c.spec.name, describe(status));
                            self.out
                                .event("exited", &text, json!({ "process": c.spec.name }));
                        }
                    }
                    Some(Event::Stop(_)) => {
                        // A second Ctrl-C: no more waiting.
                        for c in &mut self.children {
                            signal_child(c, Signal::SIGKILL);
                        }
                    }
                    Some(Event::Notify { .. }) => {}
                    None => return,
                }
            }
        }
    }
}

fn signal_child(c: &Supervised, sig: Signal) {
    // The pid is cleared when the exit event is handled; between the child's
    // reaping and that, the pid could in theory be reused, but that needs
    // the system to cycle through every pid within microseconds.
    if let Some(pid) = c.pid {
        let _ = kill(Pid::from_raw(pid as i32), sig);
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => match Signal::try_from(s) {
            Ok(sig) => format!("killed by {sig}"),
            Err(_) => format!("killed by signal {s}"),
        },
        _ => status.to_string(),
    }
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{}.{}s", s, d.subsec_millis() / 100)
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// Creates the folder, checks it can be written and has room; returns its
/// absolute path.
fn prepare_folder(dir: &Path, min_free: u64) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir)
        .map_err(|e| setup_error(format!("cannot create the folder {}: {e}", dir.display())))?;
    let dir = fs::canonicalize(dir)
        .map_err(|e| setup_error(format!("cannot resolve {}: {e}", dir.display())))?;
    let probe = dir.join(".write-probe");
    let written =
        File::create(&probe).and_then(|mut f| f.write_all(b"cairn").and_then(|_| f.sync_all()));
    let _ = fs::remove_file(&probe);
    if let Err(e) = written {
        return Err(setup_error(format!(
            "cannot write to {}: {e}. Give `cairn up` a folder it can write (--data DIR)",
            dir.display()
        )));
    }
    let st = nix::sys::statvfs::statvfs(&dir)
        .map_err(|e| setup_error(format!("cannot read free space of {}: {e}", dir.display())))?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    if free < min_free {
        return Err(setup_error(format!(
            "{} has {} free; cairn up needs at least {} (--min-free). Free some space or use \
             another folder (--data DIR)",
            dir.display(),
            bytes_human(free),
            bytes_human(min_free)
        )));
    }
    for sub in ["logs", "run"] {
        fs::create_dir_all(dir.join(sub))
            .map_err(|e| setup_error(format!("cannot create {}/{sub}: {e}", dir.display())))?;
    }
    Ok(dir)
}

/// Holds DIR/up.lock for as long as the returned lock lives.
fn lock_folder(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<File>> {
    let path = dir.join("up.lock");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| setup_error(format!("cannot open {}: {e}", path.display())))?;
    let mut holder = String::new();
    let _ = f.read_to_string(&mut holder);
    let mut lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| {
            setup_error(format!(
                "another `cairn up` is running on {} (pid {}): {e}",
                dir.display(),
                holder.trim()
            ))
        })?;
    lock.set_len(0)?;
    lock.seek(SeekFrom::Start(0))?;
    writeln!(lock, "{}", std::process::id())?;
    Ok(lock)
}

fn load_or_create_state(dir: &Path, args: &UpArgs) -> anyhow::Result<UpState> {
    let path = dir.join("up.toml");
    match fs::read_to_string(&path) {
        Ok(text) => {
            let state: UpState = toml::from_str(&text)
                .map_err(|e| setup_error(format!("{} is damaged: {e}", path.display())))?;
            if let Some(v) = args.volmgr_listen.filter(|v| *v != state.volmgr_listen) {
                return Err(setup_error(format!(
                    "this cluster's volume manager was created on {} (see {}); it cannot move \
                     to --volmgr-listen {v}",
                    state.volmgr_listen,
                    path.display()
                )));
            }
            if let Some(p) = args.chunk_port.filter(|p| *p != state.chunk_port) {
                return Err(setup_error(format!(
                    "this cluster's chunk servers were created on port {} (see {}); they cannot \
                     move to --chunk-port {p}",
                    state.chunk_port,
                    path.display()
                )));
            }
            Ok(state)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.join("volmgr").exists() {
                return Err(setup_error(format!(
                    "{} holds a cluster's data but not its up.toml; restore that file rather \
                     than start a new cluster over old data",
                    dir.display()
                )));
            }
            let state = UpState {
                cluster_id: format!("local-{:08x}", rand::random::<u32>()),
                volmgr_listen: args
                    .volmgr_listen
                    .unwrap_or_else(|| DEFAULT_VOLMGR_LISTEN.parse().expect("a valid address")),
                chunk_port: args.chunk_port.unwrap_or(DEFAULT_CHUNK_PORT),
            };
            let text = format!(
                "# Written by `cairn up` when it created this cluster. The processes recorded \
                 these\n# addresses, so they cannot change.\n{}",
                toml::to_string(&state)?
            );
            let tmp = dir.join("up.toml.tmp");
            fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
            fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
            Ok(state)
        }
        Err(e) => Err(setup_error(format!("cannot read {}: {e}", path.display()))),
    }
}

fn chunk_addr(state: &UpState, node: u8) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(127, 0, 0, 1 + node),
        state.chunk_port,
    ))
}

/// The iSCSI portal: the one asked for, which must be free, or iSCSI's port
/// 3260 on loopback, or the next free port after it (another iSCSI target,
/// such as tgtd or LIO, often holds 3260).
fn iscsi_address(asked: Option<SocketAddr>) -> anyhow::Result<SocketAddr> {
    if let Some(a) = asked {
        return match TcpListener::bind(a) {
            Ok(_) => Ok(a),
            Err(e) => Err(setup_error(format!(
                "cannot listen on {a} for the iSCSI target (--iscsi): {e}"
            ))),
        };
    }
    for port in ISCSI_PORTS {
        let a = SocketAddr::from(([127, 0, 0, 1], port));
        if TcpListener::bind(a).is_ok() {
            return Ok(a);
        }
    }
    Err(setup_error(format!(
        "ports {}-{} on 127.0.0.1 are all in use; pass --iscsi ADDR:PORT",
        ISCSI_PORTS.start(),
        ISCSI_PORTS.end()
    )))
}

/// Ports `cairn up` tries for iSCSI, 3260 (iSCSI's own) first.
const ISCSI_PORTS: std::ops::RangeInclusive<u16> = 3260..=3269;

/// The iSCSI URL of LUN 0 of `volume`'s automatic target.
fn iscsi_url(portal: SocketAddr, volume: &str) -> String {
    format!(
        "iscsi://{portal}/iqn.2026-12.io.cairn:{}/0",
        volume.to_ascii_lowercase()
    )
}

/// Every address must be free before anything starts: a clear message beats
/// a child failing to bind.
fn check_addresses(state: &UpState, nbd: SocketAddr) -> anyhow::Result<()> {
    let mut wanted = vec![
        (state.volmgr_listen, "the volume manager", "--volmgr-listen"),
        (nbd, "the NBD target", "--nbd"),
    ];
    for n in 1..=CHUNK_SERVERS {
        wanted.push((chunk_addr(state, n), "a chunk server", "--chunk-port"));
    }
    for (addr, what, flag) in wanted {
        if let Err(e) = TcpListener::bind(addr) {
            let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                format!(
                    "another program (another `cairn up`, an NBD server?) uses it; stop it, or \
                     start a new cluster with another {flag}"
                )
            } else {
                e.to_string()
            };
            return Err(setup_error(format!(
                "cannot listen on {addr} for {what}: {hint}"
            )));
        }
    }
    Ok(())
}

struct Binaries {
    volmgr: PathBuf,
    chunkserver: PathBuf,
    target: PathBuf,
}

impl Binaries {
    /// The daemons next to this `cairn` binary (a build directory or
    /// /usr/bin), else on PATH.
    fn find() -> anyhow::Result<Binaries> {
        let here = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        let find = |name: &str| -> anyhow::Result<PathBuf> {
            if let Some(p) = here.as_ref().map(|d| d.join(name)).filter(|p| p.is_file()) {
                return Ok(p);
            }
            std::env::var_os("PATH")
                .into_iter()
                .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .map(|d| d.join(name))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    setup_error(format!(
                        "cannot find {name} next to this cairn binary or on PATH; build every \
                         binary with `cargo build --release` (it puts them in build/release/)"
                    ))
                })
        };
        Ok(Binaries {
            volmgr: find("cairn-volmgr")?,
            chunkserver: find("cairn-chunkserver")?,
            target: find("cairn-target")?,
        })
    }
}

/// Unix socket paths are limited to 107 bytes: a long absolute path is
/// given relative to the current directory if that is shorter.
fn short_path(p: &Path) -> PathBuf {
    if p.as_os_str().len() < 100 {
        return p.to_path_buf();
    }
    std::env::current_dir()
        .ok()
        .and_then(|cwd| p.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| p.to_path_buf())
}

fn child_specs(
    data: &Path,
    state: &UpState,
    args: &UpArgs,
    bins: &Binaries,
    unix_socket: &Path,
    iscsi: SocketAddr,
) -> Vec<Spec> {
    let s = |p: &Path| p.display().to_string();
    let vm = state.volmgr_listen.to_string();
    let mut specs = vec![Spec {
        name: "volmgr".into(),
        binary: bins.volmgr.clone(),
        args: vec![
            "--data-dir".into(),
            s(&data.join("volmgr")),
            "--member-id".into(),
            "1".into(),
            "--cluster-id".into(),
            state.cluster_id.clone(),
            "--listen".into(),
            vm.clone(),
            "--initial-members".into(),
            format!("1={vm}"),
        ],
        log: data.join("logs/volmgr.log"),
        addr: vm.clone(),
    }];
    for n in 1..=CHUNK_SERVERS {
        let addr = chunk_addr(state, n).to_string();
        specs.push(Spec {
            name: format!("chunk{n}"),
            binary: bins.chunkserver.clone(),
            args: vec![
                "--data-dir".into(),
                s(&data.join(format!("chunk{n}"))),
                "--listen".into(),
                addr.clone(),
                "--cluster-id".into(),
                state.cluster_id.clone(),
                "--node-id".into(),
                n.to_string(),
                // Formats the directory the first time; a no-op afterwards.
                "--init".into(),
                "--volmgr".into(),
                vm.clone(),
                "--host".into(),
                format!("node{n}"),
            ],
            log: data.join(format!("logs/chunk{n}.log")),
            addr,
        });
    }
    specs.push(Spec {
        name: "target".into(),
        binary: bins.target.clone(),
        args: vec![
            "--volmgr".into(),
            vm,
            "--cluster-id".into(),
            state.cluster_id.clone(),
            "--listen".into(),
            args.nbd.to_string(),
            "--unix".into(),
            s(unix_socket),
            "--default-export".into(),
            args.volume.clone(),
            "--iscsi-listen".into(),
            iscsi.to_string(),
        ],
        log: data.join("logs/target.log"),
        addr: args.nbd.to_string(),
    });
    specs
}

fn out_starting(out: &Out, data: &Path, state: &UpState) {
    out.event(
        "starting",
        &format!(
            "starting cluster {} in {} (logs in {}/logs)",
            state.cluster_id,
            data.display(),
            data.display()
        ),
        json!({ "cluster_id": state.cluster_id, "data": data }),
    );
}

/// Waits until all three chunk servers are registered and up.
async fn wait_nodes_up(client: &VolmgrClient) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut map = client
        .get_map(0, Duration::ZERO)
        .await
        .context("asking the volume manager for the cluster map")?;
    loop {
        let up = map.nodes.iter().filter(|n| n.up).count();
        if up >= CHUNK_SERVERS as usize {
            return Ok(());
        }
        if t0.elapsed() > READY_TIMEOUT {
            bail!(
                "only {up} of {CHUNK_SERVERS} chunk servers are up after {READY_TIMEOUT:?}; see \
                 the logs"
            );
        }
        map = client
            .get_map(map.epoch, Duration::from_secs(1))
            .await
            .context("asking the volume manager for the cluster map")?;
    }
}

/// Creates the default volume if the cluster has none; returns it if made.
async fn ensure_volume(
    client: &VolmgrClient,
    args: &UpArgs,
) -> anyhow::Result<Option<cairn_proto::map::VolumeInfo>> {
    let vols = client.list_volumes().await.context("listing volumes")?;
    if !vols.is_empty() {
        return Ok(None);
    }
    let v = client
        .create_volume(&args.volume, args.volume_size, 4 << 20, 3, 2)
        .await
        .with_context(|| format!("creating the volume {:?}", args.volume))?;
    Ok(Some(v))
}

fn print_ready(out: &Out, data: &Path, args: &UpArgs, unix_socket: &Path, iscsi: SocketAddr) {
    let uri = format!("nbd://{}/{}", args.nbd, args.volume);
    let iscsi_uri = iscsi_url(iscsi, &args.volume);
    let unix_uri = format!(
        "nbd+unix:///{}?socket={}",
        args.volume,
        unix_socket.display()
    );
    if out.json {
        out.event(
            "ready",
            "cluster ready",
            json!({ "nbd": uri, "nbd_unix": unix_uri, "iscsi": iscsi_uri, "data": data }),
        );
        return;
    }
    say(&format!(
        "cairn up: ready. 1 volume manager, 3 chunk servers (127.0.0.2-4), NBD and iSCSI target.\n\
         \n  NBD:   {uri}\n         {unix_uri}\n  iSCSI: {iscsi_uri}\n  Data:  {}\n\nTry, in another terminal:\n  \
         nbdinfo {uri}\n  \
         iscsi-inq {iscsi_uri}\n  \
         qemu-io -f raw -c 'write -P 0xab 0 1M' {uri}\n  \
         cairn cluster status\n  \
         cairn volume create scratch --size 20G    # exported at once as nbd://{}/scratch\n\n\
         Ctrl-C stops everything; `cairn up` again carries on where it stopped.",
        data.display(),
        args.nbd
    ));
}

/// A child's log past this size is moved to `NAME.log.1` (replacing the
/// one before) when the child (re)starts, so a long-running `cairn up`
/// keeps at most about twice this per process.
const LOG_ROTATE_BYTES: u64 = 64 << 20;

fn rotate_log(path: &Path) {
    if fs::metadata(path).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        let _ = fs::rename(path, old);
    }
}

/// The last lines of a log file.
fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 << 10)));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        text = String::from_utf8_lossy(&buf).into_owned();
    }
    let mut lines: VecDeque<&str> = VecDeque::new();
    for l in text.lines() {
        lines.push_back(l);
        if lines.len() > LOG_TAIL_LINES {
            lines.pop_front();
        }
    }
    if lines.is_empty() {
        return "  (empty)".into();
    }
    lines
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
