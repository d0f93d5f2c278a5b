//! `cairn bench store`: the extent store against fio on the same file system.
//!
//! Subjects: fio (the reference), the store opened in this process, and the
//! store behind a real `cairn-chunkserver` child driven over the chunk RPC.
//! Each phase runs on every subject back to back (fio, in-process, rpc) before
//! the next phase starts, so machine noise lands on all of them alike.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use cairn_chunkserver::store::layout::{data_offset, extent_bytes_valid, BLOCK_BYTES};
use cairn_chunkserver::store::{Store, StoreOptions};
use clap::ValueEnum;
use serde::Serialize;

use super::chunkserver::{self, ChunkServer, RpcPool, RssMax, RssSampler};
use super::disk;
use super::fio::Fio;
use super::load::{self, Job, Offsets, Pattern, Subject, Throughput};
use super::report::{self, MemoryReport, Metric, PhaseReport, Report};

pub const LONG_ABOUT: &str = "\
Benchmarks the extent store against fio on the same file system (issue 3).

Runs four phases, each for --runtime-s seconds, on every subject in turn:
  randwrite 4k  4 KiB random overwrites    goal: store >= 0.8 x fio IOPS
  randread  4k  4 KiB random reads         goal: store >= 0.8 x fio IOPS
  write     1m  1 MiB sequential writes    goal: store >= 0.9 x fio bandwidth
  read      1m  1 MiB sequential reads     goal: store >= 0.9 x fio bandwidth
all at the same queue depth (--iodepth, 32). Subjects, interleaved per phase:
  fio         fio --ioengine=io_uring --direct=1 on DIR/.../fio.ref
  in-proc     the store opened in this process (Store::open, default options)
  rpc         a cairn-chunkserver child on 127.0.0.1, over --connections connections
The working set (--size-mib) is first written once sequentially on every
subject, so reads hit written blocks and writes are overwrites.

It also prints the chunk server's resident memory (VmRSS) at start, after
allocating --extents-for-memory extents (one 4 KiB block each, in their own
volume), and under the 4k load. Goal: under 128 MiB with 100,000 extents.

Ratios are printed, never asserted: the exit status says only whether the
benchmark ran. Data goes to a fresh directory inside --dir, removed at the end
unless --keep.

Build both binaries first (the chunk server is found next to cairn):
  cargo build --release -p cairn-tools -p cairn-chunkserver

Examples (from the repository root):
  ./build/release/cairn bench store --quick    smoke test (256 MiB, 3 s, 10,000 extents)
  ./build/release/cairn bench store            full run (2 GiB, 10 s per phase, 100,000 extents)
  ./build/release/cairn bench store --mode inprocess --skip-fio --json";

/// Volume of the performance phases' working set.
const PERF_VOLUME_ID: u64 = 1;
/// Volume of the memory phase's extents, kept apart from the working set.
const MEMORY_VOLUME_ID: u64 = 2;
const SMALL_BLOCK_BYTES: u32 = 4096;
const LARGE_BLOCK_BYTES: u32 = 1 << 20;
const GOAL_RATIO_SMALL: f64 = 0.8;
const GOAL_RATIO_LARGE: f64 = 0.9;
const GOAL_RSS_BYTES: u64 = 128 << 20;
const GOAL_EXTENTS: u64 = 100_000;
/// Slack on top of the estimated disk use: file-system metadata, journal.
const SPACE_MARGIN_BYTES: u64 = 512 << 20;
/// Per-extent file-system cost beyond the header, slot table and one block
/// (inode, directory entry, extent tree), estimated high.
const EXTENT_FS_OVERHEAD_BYTES: u64 = 8192;

const DEFAULT_SIZE_MIB: u64 = 2048;
const DEFAULT_RUNTIME_S: u64 = 10;
const DEFAULT_EXTENTS_FOR_MEMORY: u64 = GOAL_EXTENTS;
const QUICK_SIZE_MIB: u64 = 256;
const QUICK_RUNTIME_S: u64 = 3;
const QUICK_EXTENTS_FOR_MEMORY: u64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Only the store opened in this process.
    Inprocess,
    /// Only the store behind a cairn-chunkserver child process.
    Rpc,
    /// Both.
    Both,
}

#[derive(clap::Args, Debug)]
pub struct StoreBenchArgs {
    /// Where to put the data: a fresh sub-directory is made inside it. Store
    /// and fio files share it, so they share a file system. The default is on
    /// disk on common distributions, unlike /tmp, which is often tmpfs.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Working set per subject, MiB [default: 2048; 256 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=(1 << 20)))]
    size_mib: Option<u64>,
    /// Seconds per phase and subject [default: 10; 3 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    runtime_s: Option<u64>,
    /// Extent size of the benchmark volume, MiB: a power of two, 1 to 64.
    #[arg(long, default_value_t = 4)]
    extent_mib: u32,
    /// Requests in flight, for every phase and subject.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    iodepth: u32,
    /// Extents to allocate on the chunk server before reading its memory
    /// [default: 100000; 10000 with --quick]. 0 skips the memory phase.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    extents_for_memory: Option<u64>,
    /// Smoke test: 256 MiB, 3 s per phase, 10,000 extents (explicit flags win).
    #[arg(long)]
    quick: bool,
    /// Which store subjects to run.
    #[arg(long, value_enum, default_value = "both")]
    mode: Mode,
    /// Do not run fio (no ratios then).
    #[arg(long)]
    skip_fio: bool,
    /// Print the report as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Keep the data directory (and the chunk server's log) at the end.
    #[arg(long)]
    keep: bool,
    /// The cairn-chunkserver binary [default: next to this cairn binary].
    #[arg(long)]
    chunkserver_bin: Option<PathBuf>,
    /// The fio binary.
    #[arg(long, default_value = "fio")]
    fio_bin: PathBuf,
    /// TCP connections to the chunk server; the queue depth is spread over them.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    connections: u32,
    /// Tokio worker threads driving the load (1: current-thread runtime).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: u32,
}

/// The run's settings after defaults and --quick are applied.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    size_mib: u64,
    runtime_s: u64,
    extent_mib: u32,
    iodepth: u32,
    extents_for_memory: u64,
    mode: Mode,
    fio: bool,
    connections: u32,
    threads: u32,
    #[serde(skip)]
    chunkserver_bin: PathBuf,
}

impl Config {
    fn resolve(args: &StoreBenchArgs) -> anyhow::Result<Config> {
        let pick = |explicit: Option<u64>, quick: u64, default: u64| {
            explicit.unwrap_or(if args.quick { quick } else { default })
        };
        let extent_bytes = args.extent_mib.checked_mul(1 << 20).unwrap_or(0);
        if !extent_bytes_valid(extent_bytes) || extent_bytes < LARGE_BLOCK_BYTES {
            bail!(
                "--extent-mib {} must be a power of two from 1 to 64",
                args.extent_mib
            );
        }
        let chunkserver_bin = match &args.chunkserver_bin {
            Some(bin) => bin.clone(),
            None => chunkserver::default_bin()?,
        };
        Ok(Config {
            size_mib: pick(args.size_mib, QUICK_SIZE_MIB, DEFAULT_SIZE_MIB),
            runtime_s: pick(args.runtime_s, QUICK_RUNTIME_S, DEFAULT_RUNTIME_S),
            extent_mib: args.extent_mib,
            iodepth: args.iodepth,
            extents_for_memory: pick(
                args.extents_for_memory,
                QUICK_EXTENTS_FOR_MEMORY,
                DEFAULT_EXTENTS_FOR_MEMORY,
            ),
            mode: args.mode,
            fio: !args.skip_fio,
            connections: args.connections.min(args.iodepth),
            threads: args.threads,
            chunkserver_bin,
        })
    }

    fn extent_bytes(&self) -> u32 {
        self.extent_mib << 20
    }

    fn size_bytes(&self) -> u64 {
        self.size_mib << 20
    }

    fn inprocess(&self) -> bool {
        matches!(self.mode, Mode::Inprocess | Mode::Both)
    }

    fn rpc(&self) -> bool {
        matches!(self.mode, Mode::Rpc | Mode::Both)
    }

    /// Disk the run will use at most: the fio file, one working set per store
    /// subject with its extents' headers and slot tables, and the memory
    /// phase's sparse extents.
    fn space_needed_bytes(&self) -> u64 {
        let extent_meta_bytes = data_offset(self.extent_bytes());
        let store_bytes = self.size_bytes()
            + self.size_bytes().div_ceil(self.extent_bytes() as u64) * extent_meta_bytes;
        let stores = self.inprocess() as u64 + self.rpc() as u64;
        let fio_bytes = if self.fio { self.size_bytes() } else { 0 };
        let memory_bytes = if self.rpc() {
            self.extents_for_memory
                * (extent_meta_bytes + BLOCK_BYTES as u64 + EXTENT_FS_OVERHEAD_BYTES)
        } else {
            0
        };
        fio_bytes + stores * store_bytes + memory_bytes + SPACE_MARGIN_BYTES
    }
}

/// The run's data directory; removed on drop unless kept. Declared before
/// the chunk server so that the server is gone before its files are.
struct RunDir {
    path: PathBuf,
    keep: bool,
}

impl RunDir {
    fn create(parent: &Path, keep: bool) -> anyhow::Result<RunDir> {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let path = parent.join(format!("cairn-bench-{unix_s}-{}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(RunDir { path, keep })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.keep {
            progress(&format!("kept {}", self.path.display()));
        } else if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: could not remove {}: {e}", self.path.display());
        }
    }
}

fn progress(message: &str) {
    eprintln!("[bench] {message}");
}

pub fn run(args: StoreBenchArgs) -> anyhow::Result<()> {
    let config = Config::resolve(&args)?;
    let fio_version = if config.fio {
        Some(Fio::probe(&args.fio_bin)?)
    } else {
        None
    };
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let file_system = disk::fs_info(&args.dir)?;
    disk::check_space(&args.dir, &file_system, config.space_needed_bytes())?;
    if file_system.fs_type == "tmpfs" {
        eprintln!(
            "warning: {} is on tmpfs: no disk is measured; pass --dir on a disk",
            args.dir.display()
        );
    }
    let run_dir = RunDir::create(&args.dir, args.keep)?;
    let fio = config.fio.then(|| {
        Arc::new(Fio::new(
            args.fio_bin.clone(),
            run_dir.path.join("fio.ref"),
            config.size_mib,
        ))
    });

    let runtime = if config.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads as usize)
            .enable_all()
            .build()
    }
    .context("starting the tokio runtime")?;
    let (layout, phases, memory) =
        runtime.block_on(Bench::new(&config, &run_dir.path, fio).run())?;

    let report = Report {
        config: config.clone(),
        run_dir: run_dir.path.display().to_string(),
        file_system,
        fio_version,
        layout,
        phases,
        memory,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report).context("writing the JSON report")?;
        writeln!(out)?;
    } else {
        let mut title = format!(
            "cairn bench store: {} MiB working set, {} s per phase, {} MiB extents, queue depth {}, \
             {} load thread(s)",
            config.size_mib, config.runtime_s, config.extent_mib, config.iodepth, config.threads
        );
        if config.rpc() {
            title += &format!(", rpc over {} connection(s)", config.connections);
        }
        report::print_table(&mut out, &report, &title)?;
    }
    out.flush()?;
    Ok(())
}

/// One phase as the table shows it.
struct PhaseSpec {
    name: &'static str,
    pattern: Pattern,
    block_bytes: u32,
    metric: Metric,
    goal_ratio: f64,
}

const PHASES: [PhaseSpec; 4] = [
    PhaseSpec {
        name: "randwrite 4k",
        pattern: Pattern::RandWrite,
        block_bytes: SMALL_BLOCK_BYTES,
        metric: Metric::Iops,
        goal_ratio: GOAL_RATIO_SMALL,
    },
    PhaseSpec {
        name: "randread 4k",
        pattern: Pattern::RandRead,
        block_bytes: SMALL_BLOCK_BYTES,
        metric: Metric::Iops,
        goal_ratio: GOAL_RATIO_SMALL,
    },
    PhaseSpec {
        name: "write 1m",
        pattern: Pattern::SeqWrite,
        block_bytes: LARGE_BLOCK_BYTES,
        metric: Metric::BytesPerS,
        goal_ratio: GOAL_RATIO_LARGE,
    },
    PhaseSpec {
        name: "read 1m",
        pattern: Pattern::SeqRead,
        block_bytes: LARGE_BLOCK_BYTES,
        metric: Metric::BytesPerS,
        goal_ratio: GOAL_RATIO_LARGE,
    },
];

/// The RPC subject: the child process and the clients driving it.
struct RpcSubject {
    server: ChunkServer,
    subject: Arc<Subject>,
}

struct Bench<'a> {
    config: &'a Config,
    run_dir: &'a Path,
    fio: Option<Arc<Fio>>,
    inprocess: Option<(Store, Arc<Subject>)>,
    rpc: Option<RpcSubject>,
}

type Results = (PhaseReport, Vec<PhaseReport>, Option<MemoryReport>);

impl<'a> Bench<'a> {
    fn new(config: &'a Config, run_dir: &'a Path, fio: Option<Arc<Fio>>) -> Self {
        Bench {
            config,
            run_dir,
            fio,
            inprocess: None,
            rpc: None,
        }
    }

    /// Runs everything, then stops both stores whether or not it went well:
    /// an in-process store is shut down cleanly, a chunk server gets SIGTERM
    /// (and is killed on drop if that fails).
    async fn run(mut self) -> anyhow::Result<Results> {
        let result = self.run_phases().await;
        let mut stop_error = None;
        if let Some((store, _)) = self.inprocess.take() {
            if let Err(e) = store.shutdown().await {
                stop_error.get_or_insert(
                    anyhow::Error::new(e).context("shutting down the in-process store"),
                );
            }
        }
        if let Some(rpc) = self.rpc.take() {
            drop(rpc.subject);
            if let Err(e) = rpc.server.stop().await {
                stop_error.get_or_insert(e.context("stopping the chunk server"));
            }
        }
        let results = result?;
        match stop_error {
            Some(e) => Err(e),
            None => Ok(results),
        }
    }

    async fn run_phases(&mut self) -> anyhow::Result<Results> {
        let mut memory = None;
        if self.config.rpc() {
            memory = Some(self.start_rpc().await?);
        }
        if self.config.inprocess() {
            let root = self.run_dir.join("store-inproc");
            let store = Store::open(&root, StoreOptions::default())
                .with_context(|| format!("opening the in-process store in {}", root.display()))?;
            self.inprocess = Some((store.clone(), Arc::new(Subject::InProcess(store))));
        }

        let layout = self.lay_out().await?;
        let mut phases = Vec::with_capacity(PHASES.len());
        let mut load_rss = RssMax::default();
        for spec in &PHASES {
            phases.push(self.phase(spec, &mut load_rss).await?);
        }
        if let (Some(m), Some(rpc)) = (memory.as_mut(), self.rpc.as_ref()) {
            let MemoryReport {
                rss_under_load_max_bytes,
                load_samples,
                rss_peak_bytes,
                ..
            } = m;
            *rss_under_load_max_bytes = load_rss.max_bytes;
            *load_samples = load_rss.samples;
            *rss_peak_bytes = rpc.server.memory()?.hwm_bytes;
            m.judge();
        }
        Ok((layout, phases, memory))
    }

    /// Starts the chunk server, reads its memory fresh and again after the
    /// memory phase's extents are allocated.
    async fn start_rpc(&mut self) -> anyhow::Result<MemoryReport> {
        let bin = &self.config.chunkserver_bin;
        progress(&format!("starting {}", bin.display()));
        let server = ChunkServer::start(
            bin,
            &self.run_dir.join("store-rpc"),
            &self.run_dir.join("chunkserver.log"),
        )
        .await?;
        let rss_start_bytes = server.memory()?.rss_bytes;
        let pool = RpcPool::connect(server.addr, self.config.connections as usize).await?;
        let subject = Arc::new(Subject::Rpc(pool));
        self.rpc = Some(RpcSubject {
            server,
            subject: subject.clone(),
        });

        let extents = self.config.extents_for_memory;
        if extents > 0 {
            progress(&format!(
                "allocating {extents} extents on the chunk server (volume {MEMORY_VOLUME_ID})"
            ));
            let extent_bytes = self.config.extent_bytes() as u64;
            let job = Job {
                write: true,
                // One 4 KiB block at the head of each extent.
                offsets: Offsets::Sequential {
                    span_bytes: extents * extent_bytes,
                    stride_bytes: extent_bytes,
                    wrap: false,
                },
                block_bytes: SMALL_BLOCK_BYTES,
                iodepth: self.config.iodepth,
                volume_id: MEMORY_VOLUME_ID,
                extent_bytes: self.config.extent_bytes(),
                runtime: None,
            };
            load::run(subject.clone(), job, 0xA110C)
                .await
                .context("allocating the memory phase's extents")?;
            subject
                .flush()
                .await
                .context("flushing the memory phase's extents")?;
        }
        let rss_with_extents_bytes = self
            .rpc
            .as_ref()
            .map_or(Ok(0), |r| r.server.memory().map(|m| m.rss_bytes))?;
        Ok(MemoryReport {
            rss_start_bytes,
            extents,
            rss_with_extents_bytes,
            rss_per_extent_bytes: (rss_with_extents_bytes as f64 - rss_start_bytes as f64)
                / extents.max(1) as f64,
            rss_under_load_max_bytes: None,
            load_samples: 0,
            rss_peak_bytes: 0,
            goal_rss_bytes: GOAL_RSS_BYTES,
            goal_extents: GOAL_EXTENTS,
            verdict: None,
        })
    }

    fn store_subjects(&self) -> Vec<(&'static str, Arc<Subject>)> {
        let mut subjects = Vec::new();
        if let Some((_, s)) = &self.inprocess {
            subjects.push(("in-process", s.clone()));
        }
        if let Some(r) = &self.rpc {
            subjects.push(("rpc", r.subject.clone()));
        }
        subjects
    }

    /// Writes the working set once on every subject, as fio does when it
    /// creates its file, then flushes the stores.
    async fn lay_out(&self) -> anyhow::Result<PhaseReport> {
        let mut report = PhaseReport {
            name: "layout 1m",
            block_bytes: LARGE_BLOCK_BYTES,
            iodepth: self.config.iodepth,
            metric: Metric::BytesPerS,
            goal_ratio: 0.0,
            fio: None,
            inprocess: None,
            rpc: None,
        };
        if let Some(fio) = &self.fio {
            progress(&format!("fio: laying out {} MiB", self.config.size_mib));
            let (fio, iodepth) = (fio.clone(), self.config.iodepth);
            report.fio = Some(
                blocking(move || fio.lay_out(iodepth))
                    .await
                    .context("laying out fio's file")?,
            );
        }
        for (name, subject) in self.store_subjects() {
            progress(&format!("{name}: laying out {} MiB", self.config.size_mib));
            let job = self.job(Pattern::SeqWrite, LARGE_BLOCK_BYTES, None);
            let t = load::run(subject.clone(), job, 1)
                .await
                .with_context(|| format!("{name}: laying out"))?;
            subject
                .flush()
                .await
                .with_context(|| format!("{name}: flushing after layout"))?;
            self.record(&mut report, name, t);
        }
        // Layout has no goal; its ratios are informative.
        for s in [&mut report.inprocess, &mut report.rpc]
            .into_iter()
            .flatten()
        {
            s.verdict = None;
        }
        Ok(report)
    }

    fn job(&self, pattern: Pattern, block_bytes: u32, runtime: Option<Duration>) -> Job {
        let span_bytes = self.config.size_bytes();
        let offsets = match pattern {
            Pattern::RandWrite | Pattern::RandRead => Offsets::Random { span_bytes },
            Pattern::SeqWrite | Pattern::SeqRead => Offsets::Sequential {
                span_bytes,
                stride_bytes: block_bytes as u64,
                wrap: runtime.is_some(),
            },
        };
        Job {
            write: pattern.is_write(),
            offsets,
            block_bytes,
            iodepth: self.config.iodepth,
            volume_id: PERF_VOLUME_ID,
            extent_bytes: self.config.extent_bytes(),
            runtime,
        }
    }

    fn record(&self, report: &mut PhaseReport, subject: &str, t: Throughput) {
        let result = report.subject(t);
        if subject == "rpc" {
            report.rpc = Some(result);
        } else {
            report.inprocess = Some(result);
        }
    }

    async fn phase(&self, spec: &PhaseSpec, load_rss: &mut RssMax) -> anyhow::Result<PhaseReport> {
        let runtime_s = self.config.runtime_s;
        let mut report = PhaseReport {
            name: spec.name,
            block_bytes: spec.block_bytes,
            iodepth: self.config.iodepth,
            metric: spec.metric,
            goal_ratio: spec.goal_ratio,
            fio: None,
            inprocess: None,
            rpc: None,
        };
        if let Some(fio) = &self.fio {
            progress(&format!("fio: {} for {runtime_s} s", spec.name));
            let (fio, iodepth, pattern, block) = (
                fio.clone(),
                self.config.iodepth,
                spec.pattern,
                spec.block_bytes,
            );
            let t = blocking(move || fio.run(pattern, block, iodepth, Some(runtime_s)))
                .await
                .with_context(|| format!("fio: {}", spec.name))?;
            report.fio = Some(t);
        }
        for (name, subject) in self.store_subjects() {
            progress(&format!("{name}: {} for {runtime_s} s", spec.name));
            let job = self.job(
                spec.pattern,
                spec.block_bytes,
                Some(Duration::from_secs(runtime_s)),
            );
            let sample_rss = name == "rpc" && spec.block_bytes == SMALL_BLOCK_BYTES;
            let sampler = match (&self.rpc, sample_rss) {
                (Some(rpc), true) => Some(RssSampler::start(rpc.server.pid())),
                _ => None,
            };
            let result = load::run(subject, job, 2)
                .await
                .with_context(|| format!("{name}: {}", spec.name));
            if let Some(sampler) = sampler {
                load_rss.merge(sampler.stop().await?);
            }
            self.record(&mut report, name, result?);
        }
        Ok(report)
    }
}

/// Runs blocking work (fio) off the runtime's threads, so a current-thread
/// runtime keeps serving the chunk clients' connections meanwhile.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("a blocking task panicked")?
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: StoreBenchArgs,
    }

    fn config(args: &[&str]) -> anyhow::Result<Config> {
        let cli = Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))?;
        Config::resolve(&cli.args)
    }

    #[test]
    fn defaults_quick_and_explicit_flags() {
        let c = config(&[]).unwrap();
        assert_eq!(
            (c.size_mib, c.runtime_s, c.extents_for_memory),
            (2048, 10, 100_000)
        );
        let c = config(&["--quick"]).unwrap();
        assert_eq!(
            (c.size_mib, c.runtime_s, c.extents_for_memory),
            (256, 3, 10_000)
        );
        let c = config(&["--quick", "--runtime-s", "5"]).unwrap();
        assert_eq!(c.runtime_s, 5);
    }

    #[test]
    fn rejects_bad_flags() {
        assert!(config(&["--extent-mib", "3"]).is_err());
        assert!(config(&["--extent-mib", "128"]).is_err());
        assert!(config(&["--extent-mib", "4294967295"]).is_err());
        assert!(config(&["--iodepth", "0"]).is_err());
        assert!(config(&["--size-mib", "0"]).is_err());
        assert!(config(&["--mode", "sideways"]).is_err());
    }

    #[test]
    fn space_estimate_counts_every_subject() {
        let c = config(&["--size-mib", "1024", "--extents-for-memory", "1000"]).unwrap();
        let full = c.space_needed_bytes();
        // fio file + two stores + sparse extents + margin.
        assert!(full > 3 * (1024 << 20) + 1000 * 24 * 1024);
        let c = config(&["--size-mib", "1024", "--mode", "inprocess", "--skip-fio"]).unwrap();
        assert!(c.space_needed_bytes() < full / 2);
    }
}
