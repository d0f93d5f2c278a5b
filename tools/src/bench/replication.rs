//! `cairn bench replication`: what replication costs and how long a failure
//! hurts (issue 5, point 8), measured in one run against references taken
//! in the same run.
//!
//! Starts one `cairn-volmgr` member (on 127.0.0.1) and three
//! `cairn-chunkserver`s on 127.0.0.2, .3 and .4 (hosts h1-h3), all found
//! next to this `cairn` binary, with fresh data in a temporary folder under
//! `--dir`. The volume manager runs with its *default* timings (heartbeat
//! every 1 s, down after 4 s) and the volume client with its defaults
//! (attempt timeout 5 s): the pause is what a user gets. Two volumes of
//! 1 GiB with 4 MiB extents: `r3` (3 replicas, min 2) and `r1` (1 replica).
//! Writes are 4 KiB of data at random 4 KiB-aligned offsets, not FUA, never
//! flushed while timed.
//!
//! 1. **IOPS, 3 replicas against 1.** 32 tasks each with one write in flight
//!    (QD32) for `--seconds`; runs in the order r1, r3, r3, r1 (so neither
//!    gains from going first or last, and both allocate their extents in
//!    their first run) and keeps the better run of each. Reported: writes
//!    acknowledged per second, mean and p99 latency, and r3/r1 (goal >= 0.5:
//!    three copies may cost at most half the write rate). Also the share of
//!    the machine's CPU busy during each run (from /proc/stat): here every
//!    replica runs on the same cores, so at 100% busy r3/r1 is the ratio of
//!    work per write (three disk writes and the messages between replicas
//!    against one disk write), not what replicas on their own hosts would
//!    see. Then one QD1 run of each, where the CPU is not saturated: r3/r1
//!    there is what replication adds to a write's latency.
//! 2. **Failover pause.** 8 writers on r3; after 3 s, kill -9 the chunk
//!    server that is primary (first acting replica) of the most 3-replica
//!    groups. Every group has a replica there (3 replicas on 3 servers), so
//!    every write waits until the volume manager marks it down and the acting
//!    sets shrink. *Longest pause*: the longest gap between two consecutive
//!    acknowledgements (over all writers) that ends after the kill and
//!    starts before 30 s after it (10 s with `--quick`), and where it lies
//!    relative to the kill. *Longest in-flight write*: the longest latency
//!    of a write sent before the kill and acknowledged after it (writes that
//!    had already reached every replica finish at once, so this can be
//!    small). Goal for both: <= 5 s (Ceph's default heartbeat grace alone
//!    is 20 s). Also shown: the longest latency of any write acknowledged
//!    after the kill, and when the map first showed the server down. Then
//!    the server is started again (same address) and the bench waits until
//!    the cluster is healthy (that time is shown too).
//! 3. **Rejoin after an outage under load.** 8 writers on r3; kill -9
//!    another server, keep writing for `--outage-seconds`, start it again,
//!    and time from the start until healthy: the map shows it up as a new
//!    incarnation (`up_since` above the one before the kill) and every group
//!    acts with all its replicas. Rejoin copies only the extents written
//!    during the outage, whole (4 MiB each); the number touched is shown.
//!
//! "Healthy" throughout: every node up and every group's acting set full.
//! Progress goes to stderr as it happens; the summary table (or, with
//! `--json`, one JSON object) to stdout at the end. Goals are printed, never
//! asserted.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use cairn_client::{ClientConfig, Cluster, Volume};
use cairn_proto::map::ClusterMap;
use cairn_volmgr::client::VolmgrClient;
use cairn_volmgr::config::{DOWN_AFTER_MS_DEFAULT, HEARTBEAT_INTERVAL_MS_DEFAULT};
use clap::Args;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;

use super::chunkserver::free_loopback_addr;
use super::cpu::cpu_jiffies;

pub(super) const CLUSTER_ID: &str = "bench";
const BLOCK: u64 = 4096;
const VOLUME_BYTES: u64 = 1 << 30;
const EXTENT_BYTES: u64 = 4 << 20;
const QD: usize = 32;
const WRITERS: usize = 8;
const NODES: u64 = 3;
/// Steady writing before a kill.
const STEADY: Duration = Duration::from_secs(3);
const GOAL_RATIO: f64 = 0.5;
const GOAL_PAUSE_S: f64 = 5.0;
/// Limit for anything waited on (start-up, healthy again).
pub(super) const WAIT_MAX: Duration = Duration::from_secs(600);
const LOG_TAIL_BYTES: u64 = 4096;

#[derive(Args)]
pub struct ReplicationBenchArgs {
    /// Seconds per IOPS run [default: 10; 3 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: Option<u64>,
    /// Seconds the chunk server stays down in the rejoin phase [default: 30; 5 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub outage_seconds: Option<u64>,
    /// Smoke run: 3 s IOPS runs, a 10 s pause window, a 5 s outage.
    #[arg(long)]
    pub quick: bool,
    #[command(flatten)]
    pub run_dir: super::RunDirArgs,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One daemon process we start, kill and start again at the same address.
pub(super) struct Daemon {
    pub(super) what: String,
    pub(super) bin: PathBuf,
    pub(super) args: Vec<String>,
    /// Given only at the first start (a chunk server's `--init`).
    pub(super) first_args: Vec<String>,
    pub(super) addr: SocketAddr,
    pub(super) log: PathBuf,
    pub(super) started: bool,
    pub(super) child: Option<Child>,
}

impl Daemon {
    /// Starts the process and waits until it accepts connections.
    pub(super) fn start(&mut self) -> anyhow::Result<()> {
        let mut last = None;
        // A restart must keep the address; if the port is briefly taken,
        // try again.
        for _ in 0..10 {
            match self.try_start() {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        Err(last.expect("at least one attempt"))
    }

    fn try_start(&mut self) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args);
        if !self.started {
            cmd.args(&self.first_args);
        }
        let mut child = cmd
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{} exited with {status} before listening on {}; its log ends:\n{}",
                    self.what,
                    self.addr,
                    self.log_tail()
                );
            }
            if std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not listen on {} within 30 s; its log ends:\n{}",
                    self.what,
                    self.addr,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.started = true;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: a crash.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub(super) fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        if let Ok(None) = c.try_wait() {
            // Our own unreaped child: the pid is still its.
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    pub(super) fn log_tail(&self) -> String {
        let read = || -> std::io::Result<String> {
            let mut f = std::fs::File::open(&self.log)?;
            let len = f.metadata()?.len();
            f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
            let mut raw = Vec::new();
            f.read_to_end(&mut raw)?;
            Ok(String::from_utf8_lossy(&raw).into_owned())
        };
        read().unwrap_or_else(|e| format!("(could not read {}: {e})", self.log.display()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(super) struct Bench {
    pub(super) volmgr: Daemon,
    /// Index i is node i + 1.
    pub(super) servers: Vec<Daemon>,
    pub(super) client: VolmgrClient,
}

impl Bench {
    /// `chunk_args` go on every chunk server's command line.
    pub(super) fn start(
        bin_dir: &Path,
        dir: &Path,
        chunk_args: &[String],
    ) -> anyhow::Result<Bench> {
        let find = |name: &str| -> anyhow::Result<PathBuf> {
            let bin = bin_dir.join(name);
            if !bin.is_file() {
                bail!(
                    "{} not found; build it with `cargo build --release -p cairn-tools \
                     -p cairn-chunkserver -p cairn-volmgr` (or pass --bin-dir)",
                    bin.display()
                );
            }
            Ok(bin)
        };
        let (vm_bin, cs_bin) = (find("cairn-volmgr")?, find("cairn-chunkserver")?);
        let vm_addr = free_loopback_addr(Ipv4Addr::LOCALHOST)?;
        let mut volmgr = Daemon {
            what: "the volume manager".into(),
            bin: vm_bin,
            args: vec![
                "--data-dir".into(),
                dir.join("volmgr").display().to_string(),
                "--cluster-id".into(),
                CLUSTER_ID.into(),
                "--member-id".into(),
                "1".into(),
                "--listen".into(),
                vm_addr.to_string(),
                "--initial-members".into(),
                format!("1={vm_addr}"),
            ],
            first_args: Vec::new(),
            addr: vm_addr,
            log: dir.join("volmgr.log"),
            started: false,
            child: None,
        };
        volmgr.start()?;
        let mut servers = Vec::new();
        for id in 1..=NODES {
            let addr = free_loopback_addr(Ipv4Addr::new(127, 0, 0, 1 + id as u8))?;
            let data = dir.join(format!("cs{id}"));
            std::fs::create_dir_all(&data)
                .with_context(|| format!("creating {}", data.display()))?;
            let mut s = Daemon {
                what: format!("chunk server {id}"),
                bin: cs_bin.clone(),
                args: vec![
                    "--data-dir".into(),
                    data.display().to_string(),
                    "--listen".into(),
                    addr.to_string(),
                    "--cluster-id".into(),
                    CLUSTER_ID.into(),
                    "--node-id".into(),
                    id.to_string(),
                    "--volmgr".into(),
                    vm_addr.to_string(),
                    "--host".into(),
                    format!("h{id}"),
                ]
                .into_iter()
                .chain(chunk_args.iter().cloned())
                .collect(),
                first_args: vec!["--init".into()],
                addr,
                log: dir.join(format!("cs{id}.log")),
                started: false,
                child: None,
            };
            s.start()?;
            servers.push(s);
        }
        Ok(Bench {
            volmgr,
            servers,
            client: VolmgrClient::new(vec![vm_addr.to_string()], CLUSTER_ID),
        })
    }

    /// Waits until the map satisfies `ok`; returns that map.
    pub(super) async fn wait_map(
        &self,
        what: &str,
        ok: impl Fn(&ClusterMap) -> bool,
    ) -> anyhow::Result<ClusterMap> {
        let t0 = Instant::now();
        let mut said = t0;
        let mut map = self.client.get_map(0, Duration::ZERO).await?;
        while !ok(&map) {
            if said.elapsed() >= Duration::from_secs(5) {
                said = Instant::now();
                progress(format!(
                    "  waiting {:.0} s for {what}: map epoch {}, nodes down {:?}, {} groups not full",
                    secs(t0.elapsed()),
                    map.epoch,
                    map.nodes.iter().filter(|n| !n.up).map(|n| n.id).collect::<Vec<_>>(),
                    map.degraded_groups()
                ));
            }
            if t0.elapsed() > WAIT_MAX {
                bail!(
                    "{what}: not reached within {WAIT_MAX:?}; map epoch {}: nodes (id, up) {:?}, \
                     {} groups not full; daemon logs are in the temporary folder (--keep keeps it)",
                    map.epoch,
                    map.nodes.iter().map(|n| (n.id, n.up)).collect::<Vec<_>>(),
                    map.degraded_groups()
                );
            }
            map = self
                .client
                .get_map(map.epoch, Duration::from_millis(500))
                .await?;
        }
        Ok(map)
    }

    /// Waits until every node is up, every group full, and `node` (if
    /// given) up as an incarnation newer than `before`.
    pub(super) async fn wait_healthy(
        &self,
        node: Option<(u64, u64)>,
    ) -> anyhow::Result<ClusterMap> {
        self.wait_map("cluster healthy", |m| {
            healthy(m)
                && node.is_none_or(|(id, before)| m.node(id).is_some_and(|n| n.up_since > before))
        })
        .await
    }

    async fn incarnation(&self, node: u64) -> anyhow::Result<u64> {
        let map = self.client.get_map(0, Duration::ZERO).await?;
        Ok(map
            .node(node)
            .with_context(|| format!("node {node} is not in the map"))?
            .up_since)
    }

    fn server(&mut self, node: u64) -> &mut Daemon {
        &mut self.servers[node as usize - 1]
    }

    pub(super) fn stop(&mut self) {
        for s in &mut self.servers {
            s.stop();
        }
        self.volmgr.stop();
    }
}

fn healthy(m: &ClusterMap) -> bool {
    m.nodes.len() as u64 == NODES
        && m.nodes.iter().all(|n| n.up)
        && !m.groups.is_empty()
        && m.degraded_groups() == 0
}

/// Primary (first acting replica) counts per node over `replicas`-groups,
/// most first.
fn primaries(m: &ClusterMap, replicas: u32) -> Vec<(u64, usize)> {
    let mut counts: Vec<(u64, usize)> = m
        .nodes
        .iter()
        .map(|n| {
            let c = m
                .groups
                .iter()
                .filter(|g| g.replicas == replicas && g.acting.first() == Some(&n.id))
                .count();
            (n.id, c)
        })
        .collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    counts
}

/// One acknowledged write.
#[derive(Clone, Copy)]
struct Op {
    start: Instant,
    end: Instant,
    offset: u64,
}

#[derive(Default)]
struct WriterLog {
    ops: Vec<Op>,
    errors: Vec<String>,
}

/// Writers running on a volume until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<WriterLog>>,
}

impl Load {
    fn start(vol: &Volume, writers: usize, seed: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let blocks = vol.size() / BLOCK;
        let tasks = (0..writers)
            .map(|w| {
                let (vol, stop) = (vol.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1000 + w as u64);
                    let mut data = vec![0u8; BLOCK as usize];
                    rng.fill(&mut data[..]);
                    let data = Bytes::from(data);
                    let mut log = WriterLog::default();
                    while !stop.load(Ordering::Relaxed) {
                        let offset = rng.gen_range(0..blocks) * BLOCK;
                        let start = Instant::now();
                        match vol.write(offset, data.clone(), false).await {
                            Ok(()) => log.ops.push(Op {
                                start,
                                end: Instant::now(),
                                offset,
                            }),
                            Err(e) => {
                                log.errors.push(format!("{e}"));
                                if log.errors.len() >= 10 {
                                    break;
                                }
                            }
                        }
                    }
                    log
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn finish(self) -> anyhow::Result<(Vec<Op>, Vec<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        let (mut ops, mut errors) = (Vec::new(), Vec::new());
        for t in self.tasks {
            let log = t.await.context("a writer task failed")?;
            ops.extend(log.ops);
            errors.extend(log.errors);
        }
        ops.sort_by_key(|o| o.end);
        Ok((ops, errors))
    }
}

pub(super) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(super) fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "BELOW"
    }
}

/// A progress line on stderr, with the seconds since the bench started.
pub(super) fn progress(line: impl AsRef<str>) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed();
    eprintln!("[bench {:>6.1} s] {}", t.as_secs_f64(), line.as_ref());
}

/// One IOPS run.
#[derive(Clone, serde::Serialize)]
pub(super) struct IopsRun {
    iodepth: usize,
    writes: u64,
    pub(super) iops: f64,
    mean_ms: f64,
    pub(super) p99_ms: f64,
    /// Share of the machine's CPU time not idle during the run (all
    /// processes: the client, the chunk servers, the kernel).
    cpu_busy: f64,
    errors: usize,
}

pub(super) async fn iops_run(
    vol: &Volume,
    seconds: u64,
    seed: u64,
    depth: usize,
) -> anyhow::Result<IopsRun> {
    let load = Load::start(vol, depth, seed);
    let t0 = Instant::now();
    let cpu0 = cpu_jiffies();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let t_end = Instant::now();
    let cpu_busy = match (cpu0, cpu_jiffies()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) as f64 / (t1 - t0) as f64,
        _ => f64::NAN,
    };
    let (ops, errors) = load.finish().await?;
    let mut lat: Vec<Duration> = ops
        .iter()
        .filter(|o| o.end <= t_end)
        .map(|o| o.end - o.start)
        .collect();
    lat.sort();
    let n = lat.len();
    let elapsed = secs(t_end - t0);
    let run = IopsRun {
        iodepth: depth,
        cpu_busy,
        writes: n as u64,
        iops: n as f64 / elapsed,
        mean_ms: if n == 0 {
            0.0
        } else {
            ms(lat.iter().sum::<Duration>()) / n as f64
        },
        p99_ms: lat
            .get((n * 99 / 100).min(n.saturating_sub(1)))
            .map_or(0.0, |d| ms(*d)),
        errors: errors.len(),
    };
    if let Some(e) = errors.first() {
        progress(format!("  {} write errors, the first: {e}", errors.len()));
    }
    vol.flush().await.context("flushing after an IOPS run")?;
    Ok(run)
}

/// The better run of each volume, and all runs.
struct IopsResult {
    r1: IopsRun,
    r3: IopsRun,
    runs_r1: Vec<IopsRun>,
    runs_r3: Vec<IopsRun>,
    /// One run of each at QD1.
    qd1_r1: IopsRun,
    qd1_r3: IopsRun,
}

#[derive(serde::Serialize)]
struct FailoverResult {
    node: u64,
    primary_of_groups: usize,
    /// Longest gap between consecutive acknowledgements starting in the window.
    max_pause_ms: f64,
    /// Where that gap lies, relative to the kill.
    pause_from_ms: f64,
    pause_to_ms: f64,
    /// Longest latency of a write in flight at the kill.
    max_inflight_write_ms: f64,
    writes_in_flight_at_kill: usize,
    /// Longest latency of any write acknowledged after the kill and sent
    /// before the window's end.
    max_write_ms: f64,
    /// From the kill until the map first showed the node down.
    marked_down_ms: Option<f64>,
    window_s: f64,
    /// From the restart until healthy again.
    restart_to_healthy_ms: f64,
    errors: usize,
}

#[derive(serde::Serialize)]
struct RejoinResult {
    node: u64,
    outage_s: f64,
    writes_before_kill_per_s: f64,
    writes_during_outage: usize,
    extents_written_during_outage: usize,
    /// From the restart until the map showed the new incarnation up.
    restart_to_registered_ms: f64,
    /// From the restart until healthy (every group full again).
    restart_to_healthy_ms: f64,
    writes_during_rejoin: usize,
    errors: usize,
}

/// Watches the map from `t_kill` on; returns when it first showed `node`
/// down, relative to `t_kill` (None if not within `limit`).
fn watch_down(
    client: VolmgrClient,
    node: u64,
    t_kill: Instant,
    limit: Duration,
) -> JoinHandle<Option<Duration>> {
    tokio::spawn(async move {
        let mut epoch = 0;
        while t_kill.elapsed() < limit {
            match client.get_map(epoch, Duration::from_millis(500)).await {
                Ok(m) => {
                    if m.node(node).is_some_and(|n| !n.up) {
                        return Some(t_kill.elapsed());
                    }
                    epoch = m.epoch;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        None
    })
}

async fn failover(b: &mut Bench, vol: &Volume, window: Duration) -> anyhow::Result<FailoverResult> {
    let map = b.wait_healthy(None).await?;
    let (node, primary_of_groups) = primaries(&map, 3)[0];
    let before = b.incarnation(node).await?;
    let load = Load::start(vol, WRITERS, 101);
    tokio::time::sleep(STEADY).await;
    progress(format!(
        "failover: kill -9 of chunk server {node} (primary of {primary_of_groups} of {} \
         3-replica groups) under {WRITERS} writers",
        map.groups.iter().filter(|g| g.replicas == 3).count()
    ));
    let t_kill = Instant::now();
    b.server(node).kill();
    let down = watch_down(
        VolmgrClient::new(vec![b.volmgr.addr.to_string()], CLUSTER_ID),
        node,
        t_kill,
        window,
    );
    tokio::time::sleep_until((t_kill + window).into()).await;
    let marked_down = down.await.context("the map watcher failed")?;
    let t_restart = Instant::now();
    b.server(node).start()?;
    b.wait_healthy(Some((node, before))).await?;
    let restart_to_healthy = t_restart.elapsed();
    let (ops, errors) = load.finish().await?;
    // Gaps between consecutive acknowledgements (ops are sorted by end)
    // that start in [last ack before the kill, kill + window].
    let t_window_end = t_kill + window;
    let (mut pause_from, mut pause_to) = (t_kill, t_kill);
    for w in ops.windows(2) {
        if w[1].end >= t_kill
            && w[0].end <= t_window_end
            && w[1].end - w[0].end > pause_to - pause_from
        {
            (pause_from, pause_to) = (w[0].end, w[1].end);
        }
    }
    let max_pause = pause_to - pause_from;
    // Relative to the kill; negative when the last acknowledgement before
    // the pause came before the kill.
    let rel = |t: Instant| {
        if t >= t_kill {
            ms(t - t_kill)
        } else {
            -ms(t_kill - t)
        }
    };
    if ops.last().is_none_or(|o| o.end < t_kill) {
        bail!("no write was acknowledged after the kill (errors: {errors:?})");
    }
    let inflight: Vec<Duration> = ops
        .iter()
        .filter(|o| o.start <= t_kill && o.end > t_kill)
        .map(|o| o.end - o.start)
        .collect();
    let r = FailoverResult {
        node,
        primary_of_groups,
        max_pause_ms: ms(max_pause),
        pause_from_ms: rel(pause_from),
        pause_to_ms: rel(pause_to),
        max_inflight_write_ms: inflight.iter().max().map_or(0.0, |d| ms(*d)),
        max_write_ms: ops
            .iter()
            .filter(|o| o.end >= t_kill && o.start <= t_window_end)
            .map(|o| ms(o.end - o.start))
            .fold(0.0, f64::max),
        writes_in_flight_at_kill: inflight.len(),
        marked_down_ms: marked_down.map(ms),
        window_s: secs(window),
        restart_to_healthy_ms: ms(restart_to_healthy),
        errors: errors.len(),
    };
    progress(format!(
        "failover: longest pause {:.2} s (kill {:+.2} s to {:+.2} s), longest in-flight write \
         {:.2} s ({} in flight), longest write after the kill {:.2} s, marked down after {}; \
         goal <= {GOAL_PAUSE_S} s: {}",
        r.max_pause_ms / 1000.0,
        r.pause_from_ms / 1000.0,
        r.pause_to_ms / 1000.0,
        r.max_inflight_write_ms / 1000.0,
        r.writes_in_flight_at_kill,
        r.max_write_ms / 1000.0,
        r.marked_down_ms
            .map_or("(not seen)".into(), |m| format!("{:.2} s", m / 1000.0)),
        verdict(r.max_pause_ms.max(r.max_inflight_write_ms) <= GOAL_PAUSE_S * 1000.0)
    ));
    progress(format!(
        "failover: chunk server {node} restarted, healthy after {:.2} s",
        secs(restart_to_healthy)
    ));
    if let Some(e) = errors.first() {
        progress(format!("  {} write errors, the first: {e}", errors.len()));
    }
    Ok(r)
}

async fn rejoin(
    b: &mut Bench,
    vol: &Volume,
    outage: Duration,
    not: u64,
) -> anyhow::Result<RejoinResult> {
    let map = b.wait_healthy(None).await?;
    let (node, _) = *primaries(&map, 3)
        .iter()
        .find(|(n, _)| *n != not)
        .context("no other chunk server to kill")?;
    let before = b.incarnation(node).await?;
    let load = Load::start(vol, WRITERS, 202);
    let t_load = Instant::now();
    tokio::time::sleep(STEADY).await;
    progress(format!(
        "rejoin: kill -9 of chunk server {node}, {} s outage under {WRITERS} writers",
        outage.as_secs()
    ));
    let t_kill = Instant::now();
    b.server(node).kill();
    tokio::time::sleep_until((t_kill + outage).into()).await;
    let t_restart = Instant::now();
    b.server(node).start()?;
    b.wait_map("restarted chunk server registered", |m| {
        m.node(node).is_some_and(|n| n.up && n.up_since > before)
    })
    .await?;
    let registered = t_restart.elapsed();
    b.wait_healthy(Some((node, before))).await?;
    let t_healthy = Instant::now();
    let (ops, errors) = load.finish().await?;
    let in_range = |o: &&Op, from: Instant, to: Instant| o.end >= from && o.end < to;
    let during: Vec<&Op> = ops
        .iter()
        .filter(|o| in_range(o, t_kill, t_restart))
        .collect();
    let extents: HashSet<u64> = during.iter().map(|o| o.offset / EXTENT_BYTES).collect();
    let r = RejoinResult {
        node,
        outage_s: secs(outage),
        writes_before_kill_per_s: ops.iter().filter(|o| in_range(o, t_load, t_kill)).count() as f64
            / secs(t_kill - t_load),
        writes_during_outage: during.len(),
        extents_written_during_outage: extents.len(),
        restart_to_registered_ms: ms(registered),
        restart_to_healthy_ms: ms(t_healthy - t_restart),
        writes_during_rejoin: ops
            .iter()
            .filter(|o| in_range(o, t_restart, t_healthy))
            .count(),
        errors: errors.len(),
    };
    progress(format!(
        "rejoin: restarted after {:.0} s; registered after {:.2} s, healthy after {:.2} s; \
         writes during the outage {} ({} of {} extents), during the rejoin {}",
        r.outage_s,
        r.restart_to_registered_ms / 1000.0,
        r.restart_to_healthy_ms / 1000.0,
        r.writes_during_outage,
        r.extents_written_during_outage,
        VOLUME_BYTES / EXTENT_BYTES,
        r.writes_during_rejoin
    ));
    if let Some(e) = errors.first() {
        progress(format!("  {} write errors, the first: {e}", errors.len()));
    }
    Ok(r)
}

pub fn run(args: ReplicationBenchArgs) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(if args.quick { 3 } else { 10 });
    let outage =
        Duration::from_secs(
            args.outage_seconds
                .unwrap_or(if args.quick { 5 } else { 30 }),
        );
    let window = Duration::from_secs(if args.quick { 10 } else { 30 });
    let bin_dir = args.run_dir.bin_dir()?;
    let dir = args.run_dir.tempdir("replication")?;
    progress(format!(
        "data and logs in {}; volume manager defaults: heartbeat {} ms, down after {} ms; \
         client attempt timeout {:?}",
        dir.path().display(),
        HEARTBEAT_INTERVAL_MS_DEFAULT,
        DOWN_AFTER_MS_DEFAULT,
        ClientConfig::default().attempt_timeout
    ));
    let mut bench = Bench::start(&bin_dir, dir.path(), &[])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(phases(&mut bench, seconds, window, outage));
    drop(rt);
    bench.stop();
    args.run_dir.finish(dir);
    let (iops, failover, rejoin) = result?;
    let (r1, r3) = (&iops.r1, &iops.r3);
    let ratio = r3.iops / r1.iops.max(f64::MIN_POSITIVE);
    let qd1_ratio = iops.qd1_r3.iops / iops.qd1_r1.iops.max(f64::MIN_POSITIVE);
    let pause_ok =
        failover.max_pause_ms.max(failover.max_inflight_write_ms) <= GOAL_PAUSE_S * 1000.0;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "iops": {
                    "seconds": seconds,
                    "block_bytes": BLOCK,
                    "iodepth": QD,
                    "r1": r1, "r3": r3,
                    "runs_r1": iops.runs_r1, "runs_r3": iops.runs_r3,
                    "ratio_r3_r1": ratio,
                    "goal_ratio": GOAL_RATIO,
                    "verdict": verdict(ratio >= GOAL_RATIO),
                    "qd1_r1": iops.qd1_r1, "qd1_r3": iops.qd1_r3,
                    "qd1_ratio_r3_r1": qd1_ratio,
                },
                "failover": failover,
                "failover_goal_ms": GOAL_PAUSE_S * 1000.0,
                "failover_verdict": verdict(pause_ok),
                "rejoin": rejoin,
                "volmgr_heartbeat_interval_ms": HEARTBEAT_INTERVAL_MS_DEFAULT,
                "volmgr_down_after_ms": DOWN_AFTER_MS_DEFAULT,
                "client_attempt_timeout_ms": ms(ClientConfig::default().attempt_timeout),
            })
        );
        return Ok(());
    }
    let row = |name: &str, r: &IopsRun| {
        println!(
            "  {name:<12} {:>9.0} IOPS   mean {:>6.2} ms   p99 {:>6.2} ms   CPU {:>3.0}% busy{}",
            r.iops,
            r.mean_ms,
            r.p99_ms,
            r.cpu_busy * 100.0,
            if r.errors > 0 {
                format!("   ({} errors)", r.errors)
            } else {
                String::new()
            }
        )
    };
    println!(
        "replication: 1 volume manager, 3 chunk servers on loopback, defaults (heartbeat {} ms, \
         down after {} ms, client attempt timeout {:?})",
        HEARTBEAT_INTERVAL_MS_DEFAULT,
        DOWN_AFTER_MS_DEFAULT,
        ClientConfig::default().attempt_timeout
    );
    println!("4 KiB random writes, QD{QD}, {seconds} s per run, better of 2 runs (r1 r3 r3 r1):");
    row("1 replica", r1);
    row("3 replicas", r3);
    println!(
        "  {:<12} {ratio:>9.2}        goal >= {GOAL_RATIO}: {}",
        "ratio 3/1",
        verdict(ratio >= GOAL_RATIO)
    );
    println!(
        "  (one machine: every replica's disk writes and messages share the same CPUs; at 100% \
         busy the ratio is the work ratio)"
    );
    println!("4 KiB random writes, QD1 (latency: what a replica adds when CPU is spare):");
    row("1 replica", &iops.qd1_r1);
    row("3 replicas", &iops.qd1_r3);
    println!("  {:<12} {qd1_ratio:>9.2}", "ratio 3/1");
    println!(
        "failover: kill -9 of chunk server {} (primary of {} groups), {WRITERS} writers:",
        failover.node, failover.primary_of_groups
    );
    println!(
        "  longest I/O pause        {:>7.2} s   goal <= {GOAL_PAUSE_S} s: {}   (kill {:+.2} s to {:+.2} s)",
        failover.max_pause_ms / 1000.0,
        verdict(failover.max_pause_ms <= GOAL_PAUSE_S * 1000.0),
        failover.pause_from_ms / 1000.0,
        failover.pause_to_ms / 1000.0,
    );
    println!(
        "  longest in-flight write  {:>7.2} s   goal <= {GOAL_PAUSE_S} s: {}   ({} in flight at the kill)",
        failover.max_inflight_write_ms / 1000.0,
        verdict(failover.max_inflight_write_ms <= GOAL_PAUSE_S * 1000.0),
        failover.writes_in_flight_at_kill
    );
    println!(
        "  longest write after kill {:>7.2} s",
        failover.max_write_ms / 1000.0
    );
    if let Some(m) = failover.marked_down_ms {
        println!("  map showed it down after {:>7.2} s", m / 1000.0);
    }
    println!(
        "  restart -> healthy       {:>7.2} s",
        failover.restart_to_healthy_ms / 1000.0
    );
    println!(
        "rejoin: chunk server {} down {:.0} s under {WRITERS} writers, then restarted:",
        rejoin.node, rejoin.outage_s
    );
    println!(
        "  restart -> healthy       {:>7.2} s   (registered after {:.2} s)",
        rejoin.restart_to_healthy_ms / 1000.0,
        rejoin.restart_to_registered_ms / 1000.0
    );
    println!(
        "  writes during outage     {:>7}     touching {} of {} extents (rejoin copies those, 4 MiB each)",
        rejoin.writes_during_outage,
        rejoin.extents_written_during_outage,
        VOLUME_BYTES / EXTENT_BYTES
    );
    println!(
        "  writes during rejoin     {:>7}",
        rejoin.writes_during_rejoin
    );
    let errors = iops
        .runs_r1
        .iter()
        .chain(&iops.runs_r3)
        .map(|r| r.errors)
        .sum::<usize>()
        + failover.errors
        + rejoin.errors;
    if errors > 0 {
        println!("write errors: {errors} (see the progress lines above)");
    }
    Ok(())
}

/// The three phases, in order.
async fn phases(
    b: &mut Bench,
    seconds: u64,
    window: Duration,
    outage: Duration,
) -> anyhow::Result<(IopsResult, FailoverResult, RejoinResult)> {
    b.wait_map("every chunk server registered and up", |m| {
        m.nodes.len() as u64 == NODES && m.nodes.iter().all(|n| n.up)
    })
    .await?;
    b.client
        .create_volume("r3", VOLUME_BYTES, 0, 3, 2)
        .await
        .context("creating volume r3")?;
    b.client
        .create_volume("r1", VOLUME_BYTES, 0, 1, 1)
        .await
        .context("creating volume r1")?;
    b.wait_healthy(None).await?;
    let cluster = Cluster::connect(ClientConfig::new(
        vec![b.volmgr.addr.to_string()],
        CLUSTER_ID,
    ))
    .await
    .context("connecting the volume client")?;
    let r3 = cluster.open_volume("r3").await?;
    let r1 = cluster.open_volume("r1").await?;
    progress("cluster up: volumes r1 (1 replica) and r3 (3 replicas, min 2), 1 GiB each");

    let (mut runs1, mut runs3) = (Vec::new(), Vec::new());
    for (i, (name, vol)) in [("r1", &r1), ("r3", &r3), ("r3", &r3), ("r1", &r1)]
        .into_iter()
        .enumerate()
    {
        let r = iops_run(vol, seconds, i as u64, QD).await?;
        progress(format!(
            "iops: {name} run {}: {:.0} IOPS, mean {:.2} ms, p99 {:.2} ms, CPU {:.0}% busy",
            i / 2 + 1,
            r.iops,
            r.mean_ms,
            r.p99_ms,
            r.cpu_busy * 100.0
        ));
        if name == "r1" {
            runs1.push(r);
        } else {
            runs3.push(r);
        }
    }
    let best = |runs: &[IopsRun]| {
        runs.iter()
            .max_by(|a, b| a.iops.total_cmp(&b.iops))
            .expect("two runs")
            .clone()
    };
    let (b1, b3) = (best(&runs1), best(&runs3));
    let ratio = b3.iops / b1.iops.max(f64::MIN_POSITIVE);
    progress(format!(
        "iops: 3 replicas / 1 replica = {:.0} / {:.0} = {ratio:.2}; goal >= {GOAL_RATIO}: {}",
        b3.iops,
        b1.iops,
        verdict(ratio >= GOAL_RATIO)
    ));
    let mut qd1 = Vec::new();
    for (i, (name, vol)) in [("r1", &r1), ("r3", &r3)].into_iter().enumerate() {
        let r = iops_run(vol, seconds, 10 + i as u64, 1).await?;
        progress(format!(
            "iops: {name} QD1: {:.0} IOPS, mean {:.3} ms, p99 {:.3} ms, CPU {:.0}% busy",
            r.iops,
            r.mean_ms,
            r.p99_ms,
            r.cpu_busy * 100.0
        ));
        qd1.push(r);
    }
    let qd1_r3 = qd1.pop().expect("two runs");
    let qd1_r1 = qd1.pop().expect("two runs");
    let f = failover(b, &r3, window).await?;
    let r = rejoin(b, &r3, outage, f.node).await?;
    Ok((
        IopsResult {
            r1: b1,
            r3: b3,
            runs_r1: runs1,
            runs_r3: runs3,
            qd1_r1,
            qd1_r3,
        },
        f,
        r,
    ))
}
