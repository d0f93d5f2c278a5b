//! `cairn bench iscsi`: the iSCSI front end of `cairn-target` against tgt
//! (Linux SCSI target framework, user space `tgtd`), in one run (issue 9's
//! acceptance benchmark).
//!
//! Three subjects, one after the other within each phase, so a noisy
//! machine hurts all three alike:
//!
//! - **(a) tgt** (the reference): Debian's `tgtd` started by the bench in
//!   the foreground (`tgtd -f -C N --iscsi portal=127.0.0.20:PORT`, its own
//!   control port N and portal, so it never meets a system tgtd), target
//!   `iqn.2026-12.bench:tgt`, LUN 1 (LUN 0 is tgt's controller) backed by
//!   a file of `--size-mib` in the run's folder with tgt's default backing
//!   store (`rdwr`: pread/pwrite through the page cache) and its default
//!   session parameters. It needs root; it is killed at the end.
//! - **(b) Cairn, 1 replica** and **(c) Cairn, 3 replicas**: the cluster of
//!   `cairn bench nbd` (one `cairn-volmgr`, three `cairn-chunkserver`s with
//!   data in the same folder, O_DIRECT) and one `cairn-target` on
//!   127.0.0.10 with `--iscsi-listen`, volumes `r1` and `r3` (min 2) as
//!   targets `iqn.2026-12.io.cairn:r1` and `:r3`, LUN 0.
//!
//! The load comes from the bench's own initiator ([`initiator`]; fio in
//! Debian has no libiscsi engine and libiscsi's `iscsi-perf` only reads):
//! one job, one TCP connection and session per run, READ(16)/WRITE(16),
//! no digests, offering MaxRecvDataSegmentLength=262144, ImmediateData=Yes,
//! InitialR2T=No, FirstBurstLength=262144, MaxBurstLength=1048576 (each
//! target may lower them; tgt does, to its defaults). First each subject
//! is written once end to end (1 MiB, QD8: `prefill`), so reads read data,
//! not holes. Then, for `--seconds` each:
//!
//! | phase        | block | QD | goal for (b) |
//! |--------------|-------|----|--------------|
//! | randread 4k  | 4 KiB |  1 | >= 1.0x (a)  |
//! | randread 4k  | 4 KiB | 32 | >= 1.0x (a)  |
//! | randwrite 4k | 4 KiB |  1 | >= 1.0x (a)  |
//! | randwrite 4k | 4 KiB | 32 | >= 1.0x (a)  |
//! | read 1m      | 1 MiB |  8 | >= 1.0x (a)  |
//! | write 1m     | 1 MiB |  8 | >= 1.0x (a)  |
//!
//! Random offsets are uniform with repeats; writes are never FUA nor
//! followed by SYNCHRONIZE CACHE while timed. tgt writes through the page
//! cache, so after each of its runs that wrote its file is fsynced outside
//! the timed run (the time is shown), as `cairn bench nbd` does for
//! nbdkit. Reported per run: IOPS, MiB/s, p99 and mean command latency
//! (from sending the command to its status), the machine's CPU busy share
//! and the CPU of the serving processes (tgtd; cairn-target + chunk
//! servers). Ratios are (b)/(a) and (c)/(a) in IOPS. Goals are printed
//! with PASS or BELOW, never asserted.

mod initiator;

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use super::chunkserver::free_loopback_addr;
use super::cpu::{cpu_jiffies, cpu_of, proc_cpu_s};
use super::disk::fs_info;
use super::nbd::{pid_of, print_rows, Row, RunResult};
use super::replication::{progress, secs, verdict, Bench, Daemon, CLUSTER_ID};
use crate::output::bytes_human;
use initiator::{Job, JobStats, Offer, Session};

const TARGET_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);
const TGT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 20);
const TGT_IQN: &str = "iqn.2026-12.bench:tgt";
const TGT_LUN: u16 = 1;
const R1: &str = "r1";
const R3: &str = "r3";
/// Queue depth of the 1 MiB sequential phases and of the prefill (as
/// `cairn bench nbd`).
const SEQ_QD: u32 = 8;
const GOAL: f64 = 1.0;
const MIB: f64 = (1u64 << 20) as f64;

#[derive(Args)]
pub struct IscsiBenchArgs {
    /// Seconds per run [default: 10; 3 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: Option<u64>,
    /// Size of tgt's file and of each volume, in MiB [default: 1024; 256 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(16..=1 << 20))]
    pub size_mib: Option<u64>,
    /// Smoke run: 3 s runs on 256 MiB.
    #[arg(long)]
    pub quick: bool,
    #[command(flatten)]
    pub run_dir: super::RunDirArgs,
    /// tgt's daemon (Debian package tgt).
    #[arg(long, default_value = "/usr/sbin/tgtd")]
    pub tgtd_bin: PathBuf,
    /// tgt's admin tool.
    #[arg(long, default_value = "/usr/sbin/tgtadm")]
    pub tgtadm_bin: PathBuf,
    /// Extra flag for Cairn's chunk servers, e.g.
    /// --chunkserver-arg=--io-mode=buffered; repeat for several.
    #[arg(long, value_name = "FLAG", allow_hyphen_values = true)]
    pub chunkserver_arg: Vec<String>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

struct Phase {
    name: &'static str,
    write: bool,
    random: bool,
    block_bytes: u32,
    iodepth: u32,
}

const PHASES: [Phase; 6] = [
    Phase {
        name: "randread 4k",
        write: false,
        random: true,
        block_bytes: 4096,
        iodepth: 1,
    },
    Phase {
        name: "randread 4k",
        write: false,
        random: true,
        block_bytes: 4096,
        iodepth: 32,
    },
    Phase {
        name: "randwrite 4k",
        write: true,
        random: true,
        block_bytes: 4096,
        iodepth: 1,
    },
    Phase {
        name: "randwrite 4k",
        write: true,
        random: true,
        block_bytes: 4096,
        iodepth: 32,
    },
    Phase {
        name: "read 1m",
        write: false,
        random: false,
        block_bytes: 1 << 20,
        iodepth: SEQ_QD,
    },
    Phase {
        name: "write 1m",
        write: true,
        random: false,
        block_bytes: 1 << 20,
        iodepth: SEQ_QD,
    },
];

const PREFILL: Phase = Phase {
    name: "prefill",
    write: true,
    random: false,
    block_bytes: 1 << 20,
    iodepth: SEQ_QD,
};

/// One iSCSI target under test.
struct Subject {
    label: &'static str,
    addr: SocketAddr,
    iqn: String,
    lun: u16,
    front_pid: u32,
    back_pids: Vec<u32>,
    /// tgt's file, fsynced after its runs that wrote (untimed).
    sync_file: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct PhaseResult {
    name: &'static str,
    write: bool,
    block_bytes: u32,
    iodepth: u32,
    tgt: RunResult,
    r1: RunResult,
    r3: RunResult,
    ratio_r1: f64,
    ratio_r3: f64,
    goal_ratio_r1: Option<f64>,
    verdict_r1: Option<&'static str>,
}

/// What each target settled at login (the initiator's view).
#[derive(Debug, Serialize)]
struct SessionParams {
    subject: &'static str,
    max_recv_data_segment: u32,
    first_burst: u32,
    max_burst: u32,
    immediate_data: bool,
    initial_r2t: bool,
}

#[derive(Debug, Serialize)]
struct Setup {
    seconds: u64,
    size_bytes: u64,
    seq_iodepth: u32,
    tgt_version: String,
    chunkserver_args: Vec<String>,
    run_dir: String,
    fs_type: String,
    cpus: usize,
    sessions: Vec<SessionParams>,
}

#[derive(Debug, Serialize)]
struct IscsiReport {
    setup: Setup,
    prefill: PhaseResult,
    phases: Vec<PhaseResult>,
}

/// tgtd, started by the bench: its control port and process.
struct Tgt {
    daemon: Daemon,
    control_port: u16,
    tgtadm: PathBuf,
}

impl Tgt {
    fn start(args: &IscsiBenchArgs, dir: &Path, image: &Path) -> anyhow::Result<Tgt> {
        if !is_root() {
            bail!(
                "tgtd (the reference) needs root: run `cairn bench iscsi` as root (or with sudo)"
            );
        }
        for bin in [&args.tgtd_bin, &args.tgtadm_bin] {
            if !bin.is_file() {
                bail!(
                    "{} not found: install Debian's tgt package (apt-get install tgt) or pass \
                     --tgtd-bin/--tgtadm-bin",
                    bin.display()
                );
            }
        }
        // A control port whose socket no tgtd holds (the system's uses 0).
        // tgtd takes small numbers only (34307 is "out of range"; 4711 works).
        let base = 1000 + (std::process::id() % 8000) as u16;
        let control_port = (base..base + 1000)
            .find(|p| {
                !Path::new(&format!("/var/run/tgtd/socket.{p}")).exists()
                    && !Path::new(&format!("/var/run/tgtd/socket.{p}.lock")).exists()
            })
            .context("no free tgtd control port")?;
        let addr = free_loopback_addr(TGT_IP)?;
        let mut daemon = Daemon {
            what: "tgtd".into(),
            bin: args.tgtd_bin.clone(),
            args: vec![
                "-f".into(),
                "-C".into(),
                control_port.to_string(),
                "--iscsi".into(),
                format!("portal={addr}"),
            ],
            first_args: Vec::new(),
            addr,
            log: dir.join("tgtd.log"),
            started: false,
            child: None,
        };
        daemon.start()?;
        let tgt = Tgt {
            daemon,
            control_port,
            tgtadm: args.tgtadm_bin.clone(),
        };
        let image = image.display().to_string();
        let tid = ["--tid", "1"];
        tgt.admin(&[
            &["--op", "new", "--mode", "target"],
            &tid[..],
            &["-T", TGT_IQN],
        ])?;
        tgt.admin(&[
            &["--op", "new", "--mode", "logicalunit"],
            &tid[..],
            &["--lun", "1", "-b", &image],
        ])?;
        tgt.admin(&[
            &["--op", "bind", "--mode", "target"],
            &tid[..],
            &["-I", "ALL"],
        ])?;
        Ok(tgt)
    }

    fn admin(&self, parts: &[&[&str]]) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.tgtadm);
        cmd.arg("-C")
            .arg(self.control_port.to_string())
            .args(["--lld", "iscsi"]);
        for p in parts {
            cmd.args(*p);
        }
        let shown = format!("{cmd:?}");
        let out = cmd.output().with_context(|| format!("running {shown}"))?;
        if !out.status.success() {
            bail!(
                "{shown} failed with {}: {}{}; tgtd's log ends:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim(),
                self.daemon.log_tail()
            );
        }
        Ok(())
    }

    /// tgtd ignores SIGTERM: kill the process the bench started, then
    /// remove its control socket.
    fn stop(mut self) {
        if let Some(mut c) = self.daemon.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for suffix in ["", ".lock"] {
            let _ = std::fs::remove_file(format!(
                "/var/run/tgtd/socket.{}{suffix}",
                self.control_port
            ));
        }
    }
}

/// Whether this process runs as root (effective uid 0, from
/// /proc/self/status).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn tgt_version(tgtd: &Path) -> String {
    // tgtd has no --version; Debian's package version tells.
    Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "tgt"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| format!("tgt {}", String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_else(|| format!("tgt ({})", tgtd.display()))
}

/// One connection, login, the job, logout.
async fn job_on(
    s: &Subject,
    job: &Job,
    seed: u16,
) -> anyhow::Result<(JobStats, Session<tokio::net::tcp::OwnedReadHalf>)> {
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(s.addr),
    )
    .await
    .with_context(|| format!("connecting to {} timed out", s.addr))?
    .with_context(|| format!("connecting to {}", s.addr))?;
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    let mut session = Session::login(r, w, &s.iqn, s.lun, seed, Offer::default()).await?;
    if session.size_bytes() < job.region_bytes {
        bail!(
            "{} LUN {} holds {} bytes, less than the {} the bench uses",
            s.iqn,
            s.lun,
            session.size_bytes(),
            job.region_bytes
        );
    }
    let stats = session.run(job).await?;
    Ok((stats, session))
}

fn run_one(
    rt: &tokio::runtime::Runtime,
    s: &Subject,
    p: &Phase,
    size_bytes: u64,
    seconds: Option<u64>,
    seed: u16,
) -> anyhow::Result<(RunResult, initiator::Negotiated)> {
    let job = Job {
        write: p.write,
        random: p.random,
        block_bytes: p.block_bytes,
        queue_depth: p.iodepth,
        duration: seconds.map(Duration::from_secs),
        region_bytes: size_bytes,
        verify: None,
        seed: seed as u64,
    };
    let (cpu0, front0, back0) = (cpu_jiffies(), proc_cpu_s(s.front_pid), cpu_of(&s.back_pids));
    let t0 = Instant::now();
    let (stats, session) = rt.block_on(job_on(s, &job, seed))?;
    let wall = secs(t0.elapsed());
    let (cpu1, front1, back1) = (cpu_jiffies(), proc_cpu_s(s.front_pid), cpu_of(&s.back_pids));
    let negotiated = session.negotiated.clone();
    if let Err(e) = rt.block_on(session.logout()) {
        progress(format!("{}: logout: {e:#}", s.label));
    }
    let writeback_s = match &s.sync_file {
        Some(path) if p.write => {
            let t = Instant::now();
            File::open(path)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("fsync of {}", path.display()))?;
            Some(secs(t.elapsed()))
        }
        _ => None,
    };
    let machine_busy = match (cpu0, cpu1) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) as f64 / (t1 - t0) as f64,
        _ => f64::NAN,
    };
    let cores = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => (b - a) / wall,
        _ => f64::NAN,
    };
    Ok((
        RunResult {
            ios: stats.ios,
            bytes: stats.bytes,
            runtime_s: secs(stats.elapsed),
            iops: stats.iops(),
            mib_per_s: stats.bytes_per_s() / MIB,
            p99_ms: stats.quantile_ms(0.99),
            mean_ms: stats.mean_ms(),
            machine_busy,
            front_cores: cores(front0, front1),
            chunkserver_cores: (!s.back_pids.is_empty()).then(|| cores(back0, back1)),
            writeback_s,
        },
        negotiated,
    ))
}

fn phase(
    rt: &tokio::runtime::Runtime,
    subjects: &[Subject; 3],
    p: &Phase,
    size_bytes: u64,
    seconds: Option<u64>,
    seed: &mut u16,
    sessions: &mut Vec<SessionParams>,
) -> anyhow::Result<PhaseResult> {
    let mut runs = Vec::new();
    for s in subjects {
        *seed = seed.wrapping_add(1).max(1);
        let (r, n) = run_one(rt, s, p, size_bytes, seconds, *seed)
            .with_context(|| format!("{} QD{} on {}", p.name, p.iodepth, s.label))?;
        if sessions.len() < subjects.len() {
            sessions.push(SessionParams {
                subject: s.label,
                max_recv_data_segment: n.send_data_max,
                first_burst: n.first_burst,
                max_burst: n.max_burst,
                immediate_data: n.immediate_data,
                initial_r2t: n.initial_r2t,
            });
        }
        progress(r.progress_line(p.name, p.iodepth, s.label));
        runs.push(r);
    }
    let (tgt, r1, r3, ratio_r1, ratio_r3) = RunResult::against_reference(runs);
    let goal = (p.name != PREFILL.name).then_some(GOAL);
    Ok(PhaseResult {
        name: p.name,
        write: p.write,
        block_bytes: p.block_bytes,
        iodepth: p.iodepth,
        ratio_r1,
        ratio_r3,
        goal_ratio_r1: goal,
        verdict_r1: goal.map(|g| verdict(ratio_r1 >= g)),
        tgt,
        r1,
        r3,
    })
}

pub fn run(args: IscsiBenchArgs) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(if args.quick { 3 } else { 10 });
    let size_bytes = args.size_mib.unwrap_or(if args.quick { 256 } else { 1024 }) << 20;
    let bin_dir = args.run_dir.bin_dir()?;
    let target_bin = bin_dir.join("cairn-target");
    if !target_bin.is_file() {
        bail!(
            "{} not found; build it with `cargo build --release -p cairn-tools -p cairn-target \
             -p cairn-chunkserver -p cairn-volmgr` (or pass --bin-dir)",
            target_bin.display()
        );
    }
    if !is_root() {
        bail!("tgtd (the reference) needs root: run `cairn bench iscsi` as root (or with sudo)");
    }
    let dir = args.run_dir.tempdir("iscsi")?;
    let fs = fs_info(dir.path())?;
    let needed = 5 * size_bytes + (256 << 20);
    if fs.available_bytes < needed {
        bail!(
            "the benchmark needs about {} free in {} but only {} is available; pass a smaller \
             --size-mib or another --dir",
            bytes_human(needed),
            args.run_dir.dir.display(),
            bytes_human(fs.available_bytes)
        );
    }
    let mut setup = Setup {
        seconds,
        size_bytes,
        seq_iodepth: SEQ_QD,
        tgt_version: tgt_version(&args.tgtd_bin),
        chunkserver_args: args.chunkserver_arg.clone(),
        run_dir: dir.path().display().to_string(),
        fs_type: fs.fs_type.clone(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        sessions: Vec::new(),
    };
    progress(format!(
        "data and logs in {} ({}); {}; {} per subject, {seconds} s per run",
        setup.run_dir,
        setup.fs_type,
        setup.tgt_version,
        bytes_human(size_bytes)
    ));

    // (a) tgtd on a file of the same size.
    let image = dir.path().join("tgt.img");
    File::create(&image)
        .and_then(|f| f.set_len(size_bytes))
        .with_context(|| format!("creating {}", image.display()))?;
    let tgt = Tgt::start(&args, dir.path(), &image)?;

    // (b) and (c): a cluster and cairn-target with iSCSI.
    let bench = Bench::start(&bin_dir, dir.path(), &args.chunkserver_arg);
    let mut bench = match bench {
        Ok(b) => b,
        Err(e) => {
            tgt.stop();
            return Err(e);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let created = rt.block_on(async {
        bench
            .wait_map("every chunk server registered and up", |m| {
                m.nodes.len() == bench.servers.len() && m.nodes.iter().all(|n| n.up)
            })
            .await?;
        bench
            .client
            .create_volume(R1, size_bytes, 0, 1, 1)
            .await
            .context("creating volume r1")?;
        bench
            .client
            .create_volume(R3, size_bytes, 0, 3, 2)
            .await
            .context("creating volume r3")?;
        bench.wait_healthy(None).await.map(|_| ())
    });
    let nbd_addr = free_loopback_addr(TARGET_IP)?;
    let iscsi_addr = free_loopback_addr(TARGET_IP)?;
    let mut target = Daemon {
        what: "cairn-target".into(),
        bin: target_bin,
        args: vec![
            "--volmgr".into(),
            bench.volmgr.addr.to_string(),
            "--cluster-id".into(),
            CLUSTER_ID.into(),
            "--listen".into(),
            nbd_addr.to_string(),
            "--iscsi-listen".into(),
            iscsi_addr.to_string(),
        ],
        first_args: Vec::new(),
        addr: iscsi_addr,
        log: dir.path().join("cairn-target.log"),
        started: false,
        child: None,
    };
    let result = created
        .and_then(|()| target.start())
        .and_then(|()| super::nbd::wait_target_connected(&mut target))
        .and_then(|()| {
            measure(
                &rt,
                &tgt,
                &image,
                &target,
                &bench,
                size_bytes,
                seconds,
                &mut setup.sessions,
            )
        });
    drop(rt);
    target.stop();
    bench.stop();
    tgt.stop();
    args.run_dir.finish(dir);
    let (prefill, phases) = result?;
    let report = IscsiReport {
        setup,
        prefill,
        phases,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn measure(
    rt: &tokio::runtime::Runtime,
    tgt: &Tgt,
    image: &Path,
    target: &Daemon,
    bench: &Bench,
    size_bytes: u64,
    seconds: u64,
    sessions: &mut Vec<SessionParams>,
) -> anyhow::Result<(PhaseResult, Vec<PhaseResult>)> {
    let target_pid = pid_of(target)?;
    let back_pids = bench
        .servers
        .iter()
        .map(pid_of)
        .collect::<anyhow::Result<Vec<u32>>>()?;
    progress(format!(
        "cairn-target at iscsi://{}/iqn.2026-12.io.cairn:{{{R1},{R3}}}/0 connected to the \
         cluster; tgtd at iscsi://{}/{TGT_IQN}/{TGT_LUN}",
        target.addr, tgt.daemon.addr
    ));
    let subjects = [
        Subject {
            label: "(a) tgt",
            addr: tgt.daemon.addr,
            iqn: TGT_IQN.into(),
            lun: TGT_LUN,
            front_pid: pid_of(&tgt.daemon)?,
            back_pids: Vec::new(),
            sync_file: Some(image.to_path_buf()),
        },
        Subject {
            label: "(b) 1 replica",
            addr: target.addr,
            iqn: format!("{}:{R1}", cairn_target::iscsi::AUTO_PREFIX_DEFAULT),
            lun: 0,
            front_pid: target_pid,
            back_pids: back_pids.clone(),
            sync_file: None,
        },
        Subject {
            label: "(c) 3 replicas",
            addr: target.addr,
            iqn: format!("{}:{R3}", cairn_target::iscsi::AUTO_PREFIX_DEFAULT),
            lun: 0,
            front_pid: target_pid,
            back_pids,
            sync_file: None,
        },
    ];
    let mut seed = 0u16;
    progress("prefill: writing every subject once, end to end (1 MiB, QD8)");
    let prefill = phase(
        rt, &subjects, &PREFILL, size_bytes, None, &mut seed, sessions,
    )?;
    let mut phases = Vec::new();
    for p in &PHASES {
        phases.push(phase(
            rt,
            &subjects,
            p,
            size_bytes,
            Some(seconds),
            &mut seed,
            sessions,
        )?);
    }
    Ok((prefill, phases))
}

fn print_table(r: &IscsiReport) {
    let s = &r.setup;
    println!(
        "iscsi: the bench's initiator (1 job, 1 connection, READ(16)/WRITE(16), no digests) over \
         the whole LUN of {}, {} s per run; {} ({}, {} CPUs)",
        bytes_human(s.size_bytes),
        s.seconds,
        s.run_dir,
        s.fs_type,
        s.cpus
    );
    println!(
        "  (a) {} tgtd, file LUN (rdwr backing store, page cache) ({TGT_IP})",
        s.tgt_version
    );
    println!(
        "  (b) cairn-target ({TARGET_IP}), volume of 1 replica{}",
        if s.chunkserver_args.is_empty() {
            String::new()
        } else {
            format!("; chunk servers with {}", s.chunkserver_args.join(" "))
        }
    );
    println!("  (c) cairn-target, volume of 3 replicas (min 2); 3 chunk servers on this machine");
    for p in &s.sessions {
        println!(
            "  {:<15} negotiated: MaxRecvDataSegmentLength {}, FirstBurstLength {}, \
             MaxBurstLength {}, ImmediateData {}, InitialR2T {}",
            p.subject,
            p.max_recv_data_segment,
            p.first_burst,
            p.max_burst,
            if p.immediate_data { "Yes" } else { "No" },
            if p.initial_r2t { "Yes" } else { "No" }
        );
    }
    println!();
    print_rows(
        "(a) tgt",
        std::iter::once(&r.prefill).chain(&r.phases).map(|p| Row {
            name: p.name,
            iodepth: p.iodepth,
            runs: [&p.tgt, &p.r1, &p.r3],
            ratio_r1: p.ratio_r1,
            ratio_r3: p.ratio_r3,
            goal_ratio_r1: p.goal_ratio_r1,
            verdict_r1: p.verdict_r1,
        }),
    );
    println!();
    println!(
        "vs (a) = IOPS / tgt's IOPS (the MiB/s ratio too); p99 and mean: command latency, from \
         sending it to its status; prefill: one pass, 1 MiB writes, QD{SEQ_QD}"
    );
    println!(
        "busy: the machine's CPU not idle during the run; cores: CPU used by tgtd, or by \
         cairn-target + the three chunk servers"
    );
    let writeback: Vec<String> = std::iter::once(&r.prefill)
        .chain(&r.phases)
        .filter_map(|p| {
            p.tgt
                .writeback_s
                .map(|w| format!("{} QD{} {w:.2} s", p.name, p.iodepth))
        })
        .collect();
    if !writeback.is_empty() {
        println!(
            "tgt's file is fsynced after each of its runs that wrote, untimed (its deferred \
             writeback): {}",
            writeback.join(", ")
        );
    }
    println!("goals are for (b) and printed, never asserted; (c) is reported");
}
