//! `cairn bench store`: the extent store against fio on the same file system.
//!
//! Subjects: fio (the reference), the store opened in this process, and the
//! store behind a real `cairn-chunkserver` child driven over the chunk RPC.
//! Each phase runs on every subject back to back (fio, in-process, rpc) before
//! the next phase starts, so machine noise lands on all of them alike; with
//! several rounds, a ratio is the median of the rounds' (see `phase`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cairn_chunkserver::store::{Store, StoreOptions};
use tokio::runtime::Handle;

use super::chunkserver::{self, ChunkServer, RpcPool, RssMax, RssSampler};
use super::cpu;
use super::disk;
use super::fio::Fio;
use super::load::{self, Job, LoadRuntime, Offsets, Pattern, Subject, Throughput};
use super::report::{self, MemoryReport, Metric, PhaseReport, Report};

mod config;

use cairn_chunkserver::config::Threads;
use config::{Config, IoModeArg};
pub use config::{StoreBenchArgs, LONG_ABOUT};

/// The in-process subject's load runtime, and the name its threads get
/// from [`LoadRuntime::start`].
const INPROC_LOAD_NAME: &str = "inproc";
const INPROC_LOAD_THREAD: &str = "load-inproc";
/// The store's engine threads (`--threads multi`) are named cairn-store-N.
const STORE_ENGINE_THREAD: &str = "cairn-store";
/// Volume of the performance phases' working set.
const PERF_VOLUME_ID: u64 = 1;
/// Volume of the memory phase's extents, kept apart from the working set.
const MEMORY_VOLUME_ID: u64 = 2;
const SMALL_BLOCK_BYTES: u32 = 4096;
pub(super) const LARGE_BLOCK_BYTES: u32 = 1 << 20;
const GOAL_RATIO_SMALL: f64 = 0.8;
const GOAL_RATIO_LARGE: f64 = 0.9;
const GOAL_RSS_BYTES: u64 = 128 << 20;
pub(super) const GOAL_EXTENTS: u64 = 100_000;
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
    if config.rpc() {
        chunkserver::check_bin(&config.chunkserver_bin)?;
    }
    let fio_version = if config.fio {
        Some(Fio::probe(&args.fio_bin)?)
    } else {
        None
    };
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let file_system = disk::fs_info(&args.dir)?;
    disk::check_space(&args.dir, &file_system, config.space_needed_bytes())?;
    let mut notes = Vec::new();
    if file_system.fs_type == "tmpfs" {
        notes.push(format!(
            "{} is on tmpfs: no disk is measured; pass --dir on a disk",
            args.dir.display()
        ));
    }
    if config.io_mode == IoModeArg::Buffered && config.fio {
        notes.push(
            "--io-mode buffered: the stores go through the page cache, fio does not; \
             ratios above 1 measure the cache, not the store"
                .to_string(),
        );
    }
    for note in &notes {
        eprintln!("warning: {note}");
    }
    let run_dir = RunDir::create(&args.dir, args.keep)?;
    let fio = config.fio.then(|| {
        Arc::new(Fio::new(
            args.fio_bin.clone(),
            run_dir.path.join("fio.ref"),
            config.size_mib,
        ))
    });

    // The main runtime only sequences phases and samples memory; each
    // subject's requests run on a runtime of its own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let inprocess_runtime = config
        .inprocess()
        .then(|| LoadRuntime::start(INPROC_LOAD_NAME, config.inprocess_threads as usize))
        .transpose()?;
    let rpc_runtime = config
        .rpc()
        .then(|| LoadRuntime::start("rpc", config.rpc_threads as usize))
        .transpose()?;
    let bench = Bench::new(&config, &run_dir.path, fio);
    let (layout, phases, memory) = runtime.block_on(bench.run(
        inprocess_runtime.as_ref().map(LoadRuntime::handle),
        rpc_runtime.as_ref().map(LoadRuntime::handle),
    ))?;

    let report = Report {
        config: config.clone(),
        run_dir: run_dir.path.display().to_string(),
        file_system,
        fio_version,
        layout,
        phases,
        memory,
        notes,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report).context("writing the JSON report")?;
        writeln!(out)?;
    } else {
        report::print_table(&mut out, &report, &config.title())?;
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

/// The first sequential pass; informative, so no goal.
const LAYOUT: PhaseSpec = PhaseSpec {
    name: "layout 1m",
    pattern: Pattern::SeqWrite,
    block_bytes: LARGE_BLOCK_BYTES,
    metric: Metric::BytesPerS,
    goal_ratio: 0.0,
};

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

/// Which store subject a result belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreSubject {
    InProcess,
    Rpc,
}

impl StoreSubject {
    fn name(self) -> &'static str {
        match self {
            StoreSubject::InProcess => "in-process",
            StoreSubject::Rpc => "rpc",
        }
    }
}

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
    async fn run(
        mut self,
        inprocess_runtime: Option<Handle>,
        rpc_runtime: Option<Handle>,
    ) -> anyhow::Result<Results> {
        let phases = self.run_phases(inprocess_runtime, rpc_runtime);
        let interrupted = async {
            if tokio::signal::ctrl_c().await.is_err() {
                // No SIGINT handler: never interrupted, rather than at once.
                std::future::pending::<()>().await;
            }
        };
        // On Ctrl-C too the stores are stopped and the data (gigabytes) removed.
        let outcome = tokio::select! {
            outcome = phases => Some(outcome),
            () = interrupted => None,
        };
        let result = match (outcome, &self.rpc) {
            (None, _) => Err(anyhow::anyhow!("interrupted")),
            // A dead chunk server shows up as lost connections or a missing
            // /proc entry; `explain` says what happened to it.
            (Some(Err(e)), Some(rpc)) => Err(rpc.server.explain(e)),
            (Some(outcome), _) => outcome,
        };
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

    async fn run_phases(
        &mut self,
        inprocess_runtime: Option<Handle>,
        rpc_runtime: Option<Handle>,
    ) -> anyhow::Result<Results> {
        let mut memory = None;
        if let Some(runtime) = rpc_runtime {
            memory = Some(self.start_rpc(runtime).await?);
        }
        if let Some(runtime) = inprocess_runtime {
            let root = self.run_dir.join("store-inproc");
            let options = StoreOptions {
                io_mode: self.config.io_mode.into(),
                engines: self.config.store_engines as usize,
                inline: self.config.threads == Threads::Single,
                ..StoreOptions::default()
            };
            // Inline engines become tasks of the runtime entered here: the
            // load's own (one thread with --threads single).
            let entered = runtime.enter();
            let store = Store::open(&root, options);
            drop(entered);
            let store = store
                .with_context(|| format!("opening the in-process store in {}", root.display()))?;
            let subject = Arc::new(Subject::in_process(store.clone(), runtime));
            self.inprocess = Some((store, subject));
        }

        let layout = self.lay_out().await?;
        let mut phases = Vec::with_capacity(PHASES.len());
        let (mut rss_4k, mut rss_1m) = (RssMax::default(), RssMax::default());
        for spec in &PHASES {
            let (report, rss) = self.phase(spec).await?;
            match spec.block_bytes {
                SMALL_BLOCK_BYTES => rss_4k.merge(rss),
                _ => rss_1m.merge(rss),
            }
            phases.push(report);
        }
        if let (Some(m), Some(rpc)) = (memory.as_mut(), self.rpc.as_ref()) {
            m.under_4k_load = rss_4k;
            m.under_1m_load = rss_1m;
            m.rss_peak_bytes = rpc.server.memory()?.hwm_bytes;
            m.judge();
        }
        Ok((layout, phases, memory))
    }

    /// Starts the chunk server, reads its memory fresh and again after the
    /// memory phase's extents are allocated.
    async fn start_rpc(&mut self, runtime: Handle) -> anyhow::Result<MemoryReport> {
        let bin = &self.config.chunkserver_bin;
        progress(&format!("starting {}", bin.display()));
        let server = ChunkServer::start(
            bin,
            &self.run_dir.join("store-rpc"),
            self.config.io_mode.into(),
            self.config.store_engines,
            self.config.threads,
            &self.run_dir.join("chunkserver.log"),
        )
        .await?;
        let pid = server.pid();
        let rss_start_bytes = chunkserver::proc_memory(pid)?.rss_bytes;
        // On the RPC runtime, where the connections' reader and writer tasks
        // then live.
        let connect = RpcPool::connect(server.addr, self.config.connections as usize);
        let pool = runtime
            .spawn(connect)
            .await
            .context("connecting to the chunk server panicked")??;
        let subject = Arc::new(Subject::rpc(pool, runtime));
        self.rpc = Some(RpcSubject {
            server,
            subject: subject.clone(),
        });

        let extents = self.config.extents_for_memory;
        let extents_per_s = self.allocate_extents(&subject, extents).await?;
        let rss_with_extents_bytes = chunkserver::proc_memory(pid)?.rss_bytes;
        Ok(MemoryReport {
            rss_start_bytes,
            extents,
            rss_with_extents_bytes,
            extents_per_s,
            rss_per_extent_bytes: (rss_with_extents_bytes as f64 - rss_start_bytes as f64)
                / extents.max(1) as f64,
            under_4k_load: RssMax::default(),
            under_1m_load: RssMax::default(),
            rss_peak_bytes: 0,
            goal_rss_bytes: GOAL_RSS_BYTES,
            goal_extents: GOAL_EXTENTS,
            verdict: None,
        })
    }

    /// Writes one 4 KiB block at the head of each of `extents` extents of
    /// their own volume, then flushes; returns extents created per second.
    async fn allocate_extents(&self, subject: &Arc<Subject>, extents: u64) -> anyhow::Result<f64> {
        if extents == 0 {
            return Ok(0.0);
        }
        progress(&format!(
            "allocating {extents} extents on the chunk server (volume {MEMORY_VOLUME_ID})"
        ));
        let extent_bytes = self.config.extent_bytes() as u64;
        let job = Job {
            write: true,
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
        let t = load::run(subject.clone(), job, 0xA110C)
            .await
            .context("allocating the memory phase's extents")?;
        subject
            .flush()
            .await
            .context("flushing the memory phase's extents")?;
        Ok(t.iops)
    }

    fn store_subjects(&self) -> Vec<(StoreSubject, Arc<Subject>)> {
        let mut subjects = Vec::new();
        if let Some((_, s)) = &self.inprocess {
            subjects.push((StoreSubject::InProcess, s.clone()));
        }
        if let Some(r) = &self.rpc {
            subjects.push((StoreSubject::Rpc, r.subject.clone()));
        }
        subjects
    }

    /// Writes the working set once on every subject, as fio does when it
    /// creates its file, then flushes the stores.
    async fn lay_out(&self) -> anyhow::Result<PhaseReport> {
        let mut report = self.report(&LAYOUT);
        if let Some(fio) = &self.fio {
            progress(&format!("fio: laying out {} MiB", self.config.size_mib));
            let (fio, iodepth) = (fio.clone(), self.config.iodepth);
            report.fio = Some(
                blocking(move || fio.lay_out(iodepth))
                    .await
                    .context("laying out fio's file")?,
            );
        }
        for (which, subject) in self.store_subjects() {
            let name = which.name();
            progress(&format!("{name}: laying out {} MiB", self.config.size_mib));
            let job = self.job(Pattern::SeqWrite, LARGE_BLOCK_BYTES, None);
            let t = load::run(subject.clone(), job, 1)
                .await
                .with_context(|| format!("{name}: laying out"))?;
            subject
                .flush()
                .await
                .with_context(|| format!("{name}: flushing after layout"))?;
            self.record(&mut report, which, t);
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

    /// CPU time so far of what serves a subject's requests. In process: the
    /// load runtime's threads and the store's engine threads (one thread
    /// with --threads single), as fio's figure counts its job, which both
    /// makes and serves requests. Over RPC: the chunk server process (the
    /// clients are left out).
    fn cpu_s(&self, which: StoreSubject) -> Option<f64> {
        match which {
            StoreSubject::InProcess => {
                cpu::own_threads_cpu_s(&[INPROC_LOAD_THREAD, STORE_ENGINE_THREAD])
            }
            StoreSubject::Rpc => cpu::proc_cpu_s(self.rpc.as_ref()?.server.pid()),
        }
    }

    fn report(&self, spec: &PhaseSpec) -> PhaseReport {
        PhaseReport {
            name: spec.name,
            block_bytes: spec.block_bytes,
            iodepth: self.config.iodepth,
            metric: spec.metric,
            goal_ratio: spec.goal_ratio,
            fio: None,
            inprocess: None,
            rpc: None,
        }
    }

    fn record(&self, report: &mut PhaseReport, which: StoreSubject, t: Throughput) {
        let result = Some(report.subject(t));
        match which {
            StoreSubject::InProcess => report.inprocess = result,
            StoreSubject::Rpc => report.rpc = result,
        }
    }

    /// Runs one phase on every subject, `--rounds` times, each round's order
    /// rotated by one so that every subject goes first as often as the
    /// others (the first run after a phase change meets the disk fresh);
    /// returns the results and the chunk server's memory while the RPC
    /// subject ran it.
    async fn phase(&self, spec: &PhaseSpec) -> anyhow::Result<(PhaseReport, RssMax)> {
        let rounds = self.config.rounds as usize;
        let mut rss = RssMax::default();
        // The subjects in their first round's order (None is fio), and
        // each one's runs.
        let mut runners: Vec<Option<(StoreSubject, Arc<Subject>)>> = Vec::new();
        if self.fio.is_some() {
            runners.push(None);
        }
        runners.extend(self.store_subjects().into_iter().map(Some));
        let mut runs: Vec<Vec<Throughput>> = vec![Vec::with_capacity(rounds); runners.len()];
        for round in 0..rounds {
            for i in 0..runners.len() {
                let at = (round + i) % runners.len();
                let t = match &runners[at] {
                    None => self.fio_run(spec, round).await?,
                    Some((which, subject)) => {
                        let (t, r) = self.store_run(spec, *which, subject, round).await?;
                        rss.merge(r);
                        t
                    }
                };
                runs[at].push(t);
            }
        }
        let mut report = self.report(spec);
        // fio's runs are the ones whose runner is None (wherever it stands).
        let fio_runs = runners
            .iter()
            .position(Option::is_none)
            .map(|at| std::mem::take(&mut runs[at]))
            .unwrap_or_default();
        report.fio = report.median_run(fio_runs.clone());
        for (runner, runs) in runners.into_iter().zip(runs) {
            let Some((which, _)) = runner else { continue };
            let result = Some(report.subject_rounds(runs, &fio_runs));
            match which {
                StoreSubject::InProcess => report.inprocess = result,
                StoreSubject::Rpc => report.rpc = result,
            }
        }
        Ok((report, rss))
    }

    fn round_label(&self, round: usize) -> String {
        match self.config.rounds {
            1 => String::new(),
            n => format!(" (round {} of {n})", round + 1),
        }
    }

    async fn fio_run(&self, spec: &PhaseSpec, round: usize) -> anyhow::Result<Throughput> {
        let fio = self.fio.clone().expect("fio runs only when configured");
        let runtime_s = self.config.runtime_s;
        progress(&format!(
            "fio: {} for {runtime_s} s{}",
            spec.name,
            self.round_label(round)
        ));
        let (iodepth, pattern, block) = (self.config.iodepth, spec.pattern, spec.block_bytes);
        blocking(move || fio.run(pattern, block, iodepth, Some(runtime_s)))
            .await
            .with_context(|| format!("fio: {}", spec.name))
    }

    /// One store subject's run of a phase, with its CPU time, and the chunk
    /// server's memory meanwhile if it is the RPC subject.
    async fn store_run(
        &self,
        spec: &PhaseSpec,
        which: StoreSubject,
        subject: &Arc<Subject>,
        round: usize,
    ) -> anyhow::Result<(Throughput, RssMax)> {
        let runtime_s = self.config.runtime_s;
        let name = which.name();
        progress(&format!(
            "{name}: {} for {runtime_s} s{}",
            spec.name,
            self.round_label(round)
        ));
        let job = self.job(
            spec.pattern,
            spec.block_bytes,
            Some(Duration::from_secs(runtime_s)),
        );
        let sampler = match (&self.rpc, which) {
            (Some(rpc), StoreSubject::Rpc) => Some(RssSampler::start(rpc.server.pid())),
            _ => None,
        };
        let cpu_before = self.cpu_s(which);
        let result = load::run(subject.clone(), job, 2 + round as u64)
            .await
            .with_context(|| format!("{name}: {}", spec.name));
        let cpu_s = cpu_before.zip(self.cpu_s(which)).map(|(a, b)| b - a);
        let rss = match sampler {
            Some(sampler) => sampler.stop().await?,
            None => RssMax::default(),
        };
        Ok((result?.with_cpu_s(cpu_s), rss))
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
