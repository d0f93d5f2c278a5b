//! `cairn bench idle`: how quiet an idle `cairn up` cluster is (issue 7,
//! point 5). It starts `cairn up` (this binary) in a temporary folder with
//! free addresses, waits until it is ready and has settled, then measures
//! for a window (default 60 s) with no I/O:
//! - CPU time of `cairn up` and each of its five children, from
//!   /proc/PID/stat, as a share of one core; goal: under 1% in total;
//! - lines the daemons logged at the default level (their log files in
//!   DIR/logs grow); goal: none.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;

use super::cpu::proc_cpu_s;

const GOAL_CPU_PERCENT: f64 = 1.0;
const READY_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Args)]
pub struct IdleBenchArgs {
    /// Seconds to measure.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Seconds to wait after `cairn up` is ready before measuring (elections,
    /// registrations and the first export lease settle).
    #[arg(long, default_value_t = 20)]
    settle: u64,
    /// Folder to make the temporary data folder in.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

struct Proc {
    name: String,
    pid: u32,
    cpu0: f64,
}

pub fn run(args: IdleBenchArgs) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("cairn-bench-idle-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a folder in {}", args.dir.display()))?;
    let data = tmp.path().join("cairn-data");
    let me = std::env::current_exe().context("locating this cairn binary")?;
    let chunk_port = free_chunk_port()?;
    let mut up = Command::new(&me)
        .arg("up")
        .arg("--json")
        .arg("--data")
        .arg(&data)
        .arg("--volmgr-listen")
        .arg(free_addr()?.to_string())
        .arg("--chunk-port")
        .arg(chunk_port.to_string())
        .arg("--nbd")
        .arg(free_addr()?.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting cairn up")?;
    let result = measure(&args, &mut up, &data);
    let _ = kill(Pid::from_raw(up.id() as i32), Signal::SIGINT);
    let _ = up.wait();
    result
}

fn measure(args: &IdleBenchArgs, up: &mut Child, data: &Path) -> anyhow::Result<()> {
    let out = up.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Read to the end even after the bench stops listening, so `cairn
        // up` can print its last lines.
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .context("cairn up did not get ready (its output ended or timed out)")?;
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["event"] == "ready" {
            break;
        }
    }
    if !args.json {
        eprintln!(
            "cairn up is ready; settling {} s, then measuring {} s with no I/O",
            args.settle, args.seconds
        );
    }
    std::thread::sleep(Duration::from_secs(args.settle));

    let mut procs = vec![Proc {
        name: "cairn up".into(),
        pid: up.id(),
        cpu0: 0.0,
    }];
    for pid in children_of(up.id()) {
        let name = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| label(&String::from_utf8_lossy(&c)))
            .unwrap_or_else(|_| pid.to_string());
        procs.push(Proc {
            name,
            pid,
            cpu0: 0.0,
        });
    }
    if procs.len() != 6 {
        bail!("expected cairn up and 5 children, found {}", procs.len());
    }
    let logs = data.join("logs");
    let lines0 = log_lines(&logs)?;
    let t0 = Instant::now();
    for p in &mut procs {
        p.cpu0 = proc_cpu_s(p.pid).with_context(|| format!("reading /proc/{}/stat", p.pid))?;
    }
    std::thread::sleep(Duration::from_secs(args.seconds));
    let secs = t0.elapsed().as_secs_f64();
    let lines1 = log_lines(&logs)?;
    let mut rows = Vec::new();
    let mut total = 0.0;
    for p in &procs {
        let cpu1 = proc_cpu_s(p.pid)
            .with_context(|| format!("{} (pid {}) exited while idle", p.name, p.pid))?;
        let pct = (cpu1 - p.cpu0) / secs * 100.0;
        total += pct;
        rows.push((p.name.clone(), cpu1 - p.cpu0, pct));
    }
    let logged: Vec<(String, usize)> = lines1
        .iter()
        .map(|(f, n)| {
            let before = lines0.iter().find(|(g, _)| g == f).map_or(0, |x| x.1);
            (f.clone(), n.saturating_sub(before))
        })
        .collect();
    let logged_total: usize = logged.iter().map(|x| x.1).sum();
    let cpu_pass = total < GOAL_CPU_PERCENT;
    let log_pass = logged_total == 0;
    if args.json {
        let v = json!({
            "seconds": secs,
            "processes": rows.iter().map(|(n, s, p)| json!({"name": n, "cpu_s": s, "cpu_percent": p})).collect::<Vec<_>>(),
            "cpu_percent_total": total,
            "goal_cpu_percent": GOAL_CPU_PERCENT,
            "log_lines": logged.iter().map(|(f, n)| json!({"file": f, "lines": n})).collect::<Vec<_>>(),
            "cpu_pass": cpu_pass,
            "log_pass": log_pass,
        });
        println!("{v:#}");
    } else {
        println!("Idle cairn up cluster, {secs:.0} s without I/O:");
        println!("{:<12} {:>10} {:>12}", "PROCESS", "CPU s", "% OF A CORE");
        for (n, s, p) in &rows {
            println!("{n:<12} {s:>10.2} {p:>11.3}%");
        }
        println!("{:<12} {:>10} {total:>11.3}%", "total", "");
        println!(
            "CPU: {total:.3}% of one core (goal < {GOAL_CPU_PERCENT}%): {}",
            if cpu_pass { "PASS" } else { "FAIL" }
        );
        println!(
            "Log lines at the default level while idle: {logged_total} (goal 0): {}",
            if log_pass { "PASS" } else { "FAIL" }
        );
        for (f, n) in logged.iter().filter(|x| x.1 > 0) {
            println!("  {f}: {n} lines");
        }
    }
    Ok(())
}

/// "chunk2" for a chunk server's command line, else the binary's name.
fn label(cmdline: &str) -> String {
    let words: Vec<&str> = cmdline.split('\0').collect();
    let bin = words
        .first()
        .and_then(|b| Path::new(b).file_name())
        .map(|b| b.to_string_lossy().into_owned())
        .unwrap_or_default();
    match words.iter().position(|w| *w == "--node-id") {
        Some(i) if bin == "cairn-chunkserver" => {
            format!("chunk{}", words.get(i + 1).unwrap_or(&"?"))
        }
        _ => bin.trim_start_matches("cairn-").to_string(),
    }
}

fn log_lines(dir: &Path) -> anyhow::Result<Vec<(String, usize)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let text = std::fs::read(e.path())?;
        let n = text.iter().filter(|b| **b == b'\n').count();
        out.push((e.file_name().to_string_lossy().into_owned(), n));
    }
    out.sort();
    Ok(out)
}

fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            out.push(pid);
        }
    }
    out.sort();
    out
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    super::chunkserver::free_loopback_addr(Ipv4Addr::LOCALHOST)
}

/// A port free on each of 127.0.0.2-4.
fn free_chunk_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let first = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), 0))?;
        let port = first.local_addr()?.port();
        if (3..=4).all(|h| TcpListener::bind((Ipv4Addr::new(127, 0, 0, h), port)).is_ok()) {
            return Ok(port);
        }
    }
    bail!("no port free on all of 127.0.0.2-4")
}
