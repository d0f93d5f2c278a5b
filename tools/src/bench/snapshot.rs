//! `cairn bench snapshot`: what snapshots cost (issue 8, point 5), measured
//! in one run against references taken in the same run.
//!
//! Starts one `cairn-volmgr` and three `cairn-chunkserver`s on loopback
//! (as `cairn bench replication` does), with fresh data under `--dir`.
//!
//! 1. **Snapshot creation time** of thin 3-replica volumes of 1 GiB, 100 GiB
//!    and 10 TiB: `--count` snapshots of each, timed from the request to the
//!    answer (a raft commit; nothing is copied). p50, p99 and max per size;
//!    goal: flat across sizes and p99 under 50 ms. (One untimed snapshot
//!    first: a newly elected leader answers `Retry` for one lease period,
//!    3 s, until it has seen every export lease.) Then 20 snapshots, one a
//!    second, of the 1 GiB volume while `cairn-target` exports it and fio
//!    writes 4 KiB blocks through NBD at QD32: each snapshot then pauses the
//!    front end, which first waits for the writes it has in flight; the
//!    volume manager reports how long the pause lasted (one snapshot a
//!    second keeps every write a first write to a new extent version).
//! 2. **Writes right after a snapshot.** A 1 GiB 3-replica volume is written
//!    whole, then 4 KiB random writes at QD32 run for `--seconds`: once
//!    with no snapshot since the last run, once right after a snapshot (so
//!    the first write to every extent creates its new version), twice each
//!    alternating; the better run of each counts. Goal: after / before >=
//!    0.7.
//! 3. **Rollback time** after 0, 64 MiB and 512 MiB written since the
//!    snapshot rolled back to: goal, independent of what was written.
//!
//! Progress goes to stderr; the table (or one JSON object with `--json`) to
//! stdout. Goals are printed, never asserted.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use cairn_client::{ClientConfig, Cluster, Volume};
use cairn_volmgr::client::VolmgrClient;
use clap::Args;

use super::chunkserver::free_loopback_addr;
use super::replication::{iops_run, ms, progress, verdict, Bench, Daemon, IopsRun, CLUSTER_ID};

const GIB: u64 = 1 << 30;
const SIZES: [(&str, u64); 3] = [("1 GiB", GIB), ("100 GiB", 100 * GIB), ("10 TiB", 10 << 40)];
const GOAL_P99_MS: f64 = 50.0;
const GOAL_AFTER_RATIO: f64 = 0.7;
const QD: usize = 32;

#[derive(Args)]
pub struct SnapshotBenchArgs {
    /// Snapshots taken per volume size [default: 50; 10 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..=10000))]
    pub count: Option<u64>,
    /// Seconds per IOPS run [default: 10; 3 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: Option<u64>,
    /// Smoke run: fewer snapshots, shorter runs, less data before rollbacks.
    #[arg(long)]
    pub quick: bool,
    #[command(flatten)]
    pub run_dir: super::RunDirArgs,
    /// fio, for writes through NBD while snapshots are taken.
    #[arg(long, default_value = "fio")]
    pub fio_bin: PathBuf,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Latencies of one series of snapshot creations.
#[derive(Clone, serde::Serialize)]
struct Series {
    what: String,
    count: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Front-end pauses the volume manager reported (exported volume only).
    pause_p50_ms: Option<f64>,
    pause_max_ms: Option<f64>,
}

fn percentile(sorted: &[f64], p: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn series(what: &str, mut lat: Vec<f64>, mut pauses: Vec<f64>) -> Series {
    lat.sort_by(f64::total_cmp);
    pauses.sort_by(f64::total_cmp);
    Series {
        what: what.into(),
        count: lat.len(),
        p50_ms: percentile(&lat, 50),
        p99_ms: percentile(&lat, 99),
        max_ms: lat.last().copied().unwrap_or(0.0),
        pause_p50_ms: (!pauses.is_empty()).then(|| percentile(&pauses, 50)),
        pause_max_ms: pauses.last().copied(),
    }
}

#[derive(Clone, serde::Serialize)]
struct Rollback {
    written_mib: u64,
    ms: f64,
}

#[derive(serde::Serialize)]
struct SnapshotReport {
    creation: Vec<Series>,
    before: IopsRun,
    after: IopsRun,
    after_ratio: f64,
    rollbacks: Vec<Rollback>,
}

/// Takes `count` snapshots of `volume`, timing each; returns the latencies
/// and the pauses the volume manager reported (ms).
async fn take(
    client: &VolmgrClient,
    volume: &str,
    prefix: &str,
    count: u64,
    every: Duration,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut lat, mut pauses) = (Vec::new(), Vec::new());
    for i in 0..count {
        if i > 0 {
            tokio::time::sleep(every).await;
        }
        let t0 = Instant::now();
        let taken = client
            .create_snapshot(volume, &format!("{prefix}{i}"), Duration::ZERO)
            .await
            .with_context(|| format!("snapshot {prefix}{i} of {volume}"))?;
        lat.push(ms(t0.elapsed()));
        pauses.push(taken.pause_ms as f64);
    }
    Ok((lat, pauses))
}

/// Writes `bytes` from offset 0 in 1 MiB pieces, 16 at a time.
async fn fill(vol: &Volume, bytes: u64, byte: u8) -> anyhow::Result<()> {
    let piece = Bytes::from(vec![byte; 1 << 20]);
    let mut set = tokio::task::JoinSet::new();
    for at in (0..bytes).step_by(1 << 20) {
        if set.len() >= 16 {
            set.join_next().await.expect("a write in flight")??;
        }
        let (vol, piece) = (vol.clone(), piece.clone());
        set.spawn(async move { vol.write(at, piece, false).await });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    vol.flush().await?;
    Ok(())
}

/// fio writing 4 KiB blocks at QD32 through NBD until killed.
fn fio_writer(fio: &PathBuf, uri: &str, size: u64, log: &std::path::Path) -> anyhow::Result<Child> {
    let log = std::fs::File::create(log)?;
    Command::new(fio)
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            &format!("--size={size}"),
            "--time_based",
            "--runtime=3600",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {} (install fio or pass --fio-bin)", fio.display()))
}

pub fn run(args: SnapshotBenchArgs) -> anyhow::Result<()> {
    let count = args.count.unwrap_or(if args.quick { 10 } else { 50 });
    let seconds = args.seconds.unwrap_or(if args.quick { 3 } else { 10 });
    let bin_dir = args.run_dir.bin_dir()?;
    let dir = args.run_dir.tempdir("snapshot")?;
    progress(format!("data and logs in {}", dir.path().display()));
    let mut bench = Bench::start(&bin_dir, dir.path(), &[])?;
    let target_addr = free_loopback_addr(std::net::Ipv4Addr::new(127, 0, 0, 10))?;
    let mut target = Daemon {
        what: "cairn-target".into(),
        bin: bin_dir.join("cairn-target"),
        args: vec![
            "--volmgr".into(),
            bench.volmgr.addr.to_string(),
            "--cluster-id".into(),
            CLUSTER_ID.into(),
            "--listen".into(),
            target_addr.to_string(),
        ],
        first_args: Vec::new(),
        addr: target_addr,
        log: dir.path().join("cairn-target.log"),
        started: false,
        child: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(phases(
        &mut bench,
        &mut target,
        &args.fio_bin,
        dir.path(),
        count,
        seconds,
        args.quick,
    ));
    drop(rt);
    target.stop();
    bench.stop();
    args.run_dir.finish(dir);
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_report(&report, seconds);
    Ok(())
}

fn print_report(r: &SnapshotReport, seconds: u64) {
    println!("snapshot creation (request to answer):");
    println!(
        "  {:<34} {:>6} {:>9} {:>9} {:>9} {:>12}",
        "volume", "count", "p50 ms", "p99 ms", "max ms", "pause max ms"
    );
    for s in &r.creation {
        println!(
            "  {:<34} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>12}",
            s.what,
            s.count,
            s.p50_ms,
            s.p99_ms,
            s.max_ms,
            s.pause_max_ms.map_or("-".into(), |p| format!("{p:.0}"))
        );
    }
    let worst = r.creation.iter().map(|s| s.p99_ms).fold(0.0f64, f64::max);
    println!(
        "  worst p99 {worst:.2} ms; goal < {GOAL_P99_MS} ms: {}",
        verdict(worst < GOAL_P99_MS)
    );
    println!("4 KiB random writes, QD{QD}, 3 replicas, {seconds} s per run, better of 2:");
    println!(
        "  no snapshot since the last run {:>9.0} IOPS   p99 {:>6.2} ms",
        r.before.iops, r.before.p99_ms
    );
    println!(
        "  right after a snapshot         {:>9.0} IOPS   p99 {:>6.2} ms",
        r.after.iops, r.after.p99_ms
    );
    println!(
        "  ratio {:.2}; goal >= {GOAL_AFTER_RATIO}: {}",
        r.after_ratio,
        verdict(r.after_ratio >= GOAL_AFTER_RATIO)
    );
    println!("rollback (request to answer), by data written since the snapshot:");
    for b in &r.rollbacks {
        println!("  {:>6} MiB written   {:>8.2} ms", b.written_mib, b.ms);
    }
}

async fn phases(
    b: &mut Bench,
    target: &mut Daemon,
    fio: &PathBuf,
    dir: &std::path::Path,
    count: u64,
    seconds: u64,
    quick: bool,
) -> anyhow::Result<SnapshotReport> {
    let exported_count = if quick { 5 } else { 20 };
    b.wait_map("every chunk server registered and up", |m| {
        m.nodes.len() == b.servers.len() && m.nodes.iter().all(|n| n.up)
    })
    .await?;
    for (i, (_, size)) in SIZES.iter().enumerate() {
        b.client
            .create_volume(&format!("thin{i}"), *size, 0, 3, 2)
            .await
            .with_context(|| format!("creating volume thin{i}"))?;
    }
    b.client.create_volume("w", GIB, 0, 3, 2).await?;
    b.client.create_volume("rb", GIB, 0, 3, 2).await?;
    b.wait_healthy(None).await?;
    let cluster = Cluster::connect(ClientConfig::new(
        vec![b.volmgr.addr.to_string()],
        CLUSTER_ID,
    ))
    .await
    .context("connecting the volume client")?;

    // A new leader answers snapshot requests `Retry` until it has seen
    // every export lease (one lease period, 3 s by default): not what is
    // measured here, so wait it out with one untimed snapshot.
    b.client
        .create_snapshot("rb", "warm-up", Duration::ZERO)
        .await
        .context("the untimed first snapshot")?;
    b.client.delete_snapshot("rb", "warm-up").await?;

    // 1. Creation time.
    let mut creation = Vec::new();
    for (i, (what, _)) in SIZES.iter().enumerate() {
        let name = format!("thin{i}");
        // A little data, so the snapshots are not of nothing.
        let vol = cluster.open_volume(&name).await?;
        fill(&vol, 16 << 20, 1).await?;
        let (lat, _) = take(&b.client, &name, "s", count, Duration::ZERO).await?;
        let s = series(&format!("{what}, not exported"), lat, Vec::new());
        progress(format!(
            "creation: {}: p50 {:.2} ms, p99 {:.2} ms",
            s.what, s.p50_ms, s.p99_ms
        ));
        creation.push(s);
    }
    target.start()?;
    let uri = format!("nbd://{}/thin0", target.addr);
    let mut writer = fio_writer(fio, &uri, GIB, &dir.join("fio-load.log"))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let exported = take(
        &b.client,
        "thin0",
        "x",
        exported_count,
        Duration::from_secs(1),
    )
    .await;
    let _ = writer.kill();
    let _ = writer.wait();
    let (lat, pauses) = exported?;
    let s = series("1 GiB, exported, fio QD32, one per second", lat, pauses);
    progress(format!(
        "creation: {}: p50 {:.2} ms, p99 {:.2} ms, pause max {:.0} ms",
        s.what,
        s.p50_ms,
        s.p99_ms,
        s.pause_max_ms.unwrap_or(0.0)
    ));
    creation.push(s);

    // 2. Writes right after a snapshot.
    let w = cluster.open_volume("w").await?;
    fill(&w, GIB, 2).await?;
    let (mut before, mut after): (Vec<IopsRun>, Vec<IopsRun>) = (Vec::new(), Vec::new());
    for round in 0..2u64 {
        // Opened afresh for every run: a Volume keeps the head epoch it was
        // opened at, and after a snapshot that epoch is the snapshot's.
        let w = cluster.open_volume("w").await?;
        let r = iops_run(&w, seconds, 20 + round, QD).await?;
        progress(format!(
            "writes: no snapshot since the last run: {:.0} IOPS",
            r.iops
        ));
        before.push(r);
        b.client
            .create_snapshot("w", &format!("w{round}"), Duration::ZERO)
            .await?;
        let w = cluster.open_volume("w").await?;
        let r = iops_run(&w, seconds, 30 + round, QD).await?;
        progress(format!(
            "writes: right after a snapshot: {:.0} IOPS",
            r.iops
        ));
        after.push(r);
    }
    let best = |runs: &[IopsRun]| {
        runs.iter()
            .max_by(|a, b| a.iops.total_cmp(&b.iops))
            .expect("two runs")
            .clone()
    };
    let (before, after) = (best(&before), best(&after));
    let after_ratio = after.iops / before.iops.max(f64::MIN_POSITIVE);

    // 3. Rollback time against data written since the snapshot.
    let mut rollbacks = Vec::new();
    let amounts: &[u64] = if quick { &[0, 16, 64] } else { &[0, 64, 512] };
    b.client
        .create_snapshot("rb", "base", Duration::ZERO)
        .await?;
    for &mib in amounts {
        let rb = cluster.open_volume("rb").await?;
        fill(&rb, mib << 20, 3).await?;
        let t0 = Instant::now();
        b.client
            .rollback_volume("rb", "base", "", false)
            .await
            .context("rolling back rb")?;
        let took = ms(t0.elapsed());
        progress(format!("rollback after {mib} MiB written: {took:.2} ms"));
        rollbacks.push(Rollback {
            written_mib: mib,
            ms: took,
        });
    }
    Ok(SnapshotReport {
        creation,
        before,
        after,
        after_ratio,
        rollbacks,
    })
}
