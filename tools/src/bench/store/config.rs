//! `cairn bench store`'s flags, and the settings they resolve to.

use std::path::PathBuf;

use anyhow::bail;
use cairn_chunkserver::config::Threads;
use cairn_chunkserver::store::layout::{data_offset, extent_bytes_valid, BLOCK_BYTES};
use cairn_chunkserver::store::IoMode;
use clap::ValueEnum;
use serde::Serialize;

use super::{GOAL_EXTENTS, LARGE_BLOCK_BYTES};
use crate::bench::chunkserver;

pub const LONG_ABOUT: &str = "\
Benchmarks the extent store against fio on the same file system (issue 3).

Runs four phases, each for --runtime-s seconds, on every subject in turn:
  randwrite 4k  4 KiB random overwrites    goal: store >= 0.8 x fio IOPS
  randread  4k  4 KiB random reads         goal: store >= 0.8 x fio IOPS
  write     1m  1 MiB sequential writes    goal: store >= 0.9 x fio bandwidth
  read      1m  1 MiB sequential reads     goal: store >= 0.9 x fio bandwidth
all at the same queue depth (--iodepth, 32). Subjects, interleaved per phase,
in --rounds rounds (3; 1 with --quick) that take turns at which goes first:
  fio         fio --ioengine=io_uring --direct=1 on DIR/.../fio.ref
  in-proc     the store opened in this process (Store::open, default options
              but --io-mode)
  rpc         a cairn-chunkserver child on 127.0.0.1, over --connections connections
The working set (--size-mib) is first written once sequentially on every
subject, so reads hit written blocks and writes are overwrites.

It also prints the chunk server's resident memory (VmRSS) at start, after
allocating --extents-for-memory extents (one 4 KiB block each, in their own
volume), and under the 4k load. Goal: under 128 MiB with 100,000 extents.

A ratio is the median of the rounds' ratios, each against fio's run of the
same round: this machine's disk speed drifts by a quarter within minutes, and
pairing runs by round cancels most of it. Ratios are printed, never asserted: the exit status says only whether the
benchmark ran. Data goes to a fresh directory inside --dir, removed at the end
unless --keep.

Build both binaries first (the chunk server is found next to cairn):
  cargo build --release -p cairn-tools -p cairn-chunkserver

Examples (from the repository root):
  ./build/release/cairn bench store --quick    smoke test (256 MiB, 3 s, 1 round, 10,000 extents)
  ./build/release/cairn bench store            full run (2 GiB, 10 s, 3 rounds, 100,000 extents)
  ./build/release/cairn bench store --mode inprocess --skip-fio --json";

/// Slack on top of the estimated disk use: file-system metadata, journal.
const SPACE_MARGIN_BYTES: u64 = 512 << 20;
/// Per-extent file-system cost beyond the header, slot table and one block
/// (inode, directory entry, extent tree), estimated high.
const EXTENT_FS_OVERHEAD_BYTES: u64 = 8192;

const DEFAULT_SIZE_MIB: u64 = 2048;
const DEFAULT_RUNTIME_S: u64 = 10;
const DEFAULT_ROUNDS: u64 = 3;
const DEFAULT_EXTENTS_FOR_MEMORY: u64 = GOAL_EXTENTS;
const QUICK_SIZE_MIB: u64 = 256;
const QUICK_RUNTIME_S: u64 = 3;
const QUICK_ROUNDS: u64 = 1;
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

/// How the stores write extent data (fio always uses O_DIRECT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoModeArg {
    /// O_DIRECT for block data, as deployed.
    Direct,
    /// Through the page cache (for file systems without O_DIRECT).
    Buffered,
}

impl From<IoModeArg> for IoMode {
    fn from(mode: IoModeArg) -> Self {
        match mode {
            IoModeArg::Direct => IoMode::Direct,
            IoModeArg::Buffered => IoMode::Buffered,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct StoreBenchArgs {
    /// Where to put the data: a fresh sub-directory is made inside it. Store
    /// and fio files share it, so they share a file system. The default is on
    /// disk on common distributions, unlike /tmp, which is often tmpfs.
    #[arg(long, default_value = "/var/tmp")]
    pub(super) dir: PathBuf,
    /// Working set per subject, MiB [default: 2048; 256 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=(1 << 20)))]
    pub(super) size_mib: Option<u64>,
    /// Seconds per phase and subject [default: 10; 3 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(super) runtime_s: Option<u64>,
    /// Extent size of the benchmark volume, MiB: a power of two, 1 to 64.
    #[arg(long, default_value_t = 4)]
    pub(super) extent_mib: u32,
    /// Rounds per phase: every subject runs the phase once per round, taking
    /// turns at going first; the table gives the median of the rounds'
    /// ratios [default: 3; 1 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub(super) rounds: Option<u64>,
    /// Requests in flight, for every phase and subject.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(super) iodepth: u32,
    /// Extents to allocate on the chunk server before reading its memory
    /// [default: 100000; 10000 with --quick]. 0 skips the memory phase.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub(super) extents_for_memory: Option<u64>,
    /// Smoke test: 256 MiB, 3 s per phase, 1 round, 10,000 extents (explicit
    /// flags win).
    #[arg(long)]
    pub(super) quick: bool,
    /// Which store subjects to run.
    #[arg(long, value_enum, default_value = "both")]
    pub(super) mode: Mode,
    /// How both stores write extent data.
    #[arg(long, value_enum, default_value = "direct")]
    pub(super) io_mode: IoModeArg,
    /// Do not run fio (no ratios then).
    #[arg(long)]
    pub(super) skip_fio: bool,
    /// Print the report as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    pub(super) json: bool,
    /// Keep the data directory (and the chunk server's log) at the end.
    #[arg(long)]
    pub(super) keep: bool,
    /// The cairn-chunkserver binary [default: next to this cairn binary].
    #[arg(long)]
    pub(super) chunkserver_bin: Option<PathBuf>,
    /// The fio binary.
    #[arg(long, default_value = "fio")]
    pub(super) fio_bin: PathBuf,
    /// TCP connections to the chunk server; the queue depth is spread over them.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(super) connections: u32,
    /// Threads driving the in-process store's load with --threads multi (1:
    /// a current-thread runtime); with --threads single the load and the
    /// engine share one.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(super) inprocess_threads: u32,
    /// Threads driving the RPC clients (1: a current-thread runtime). One
    /// measured faster for 4 KiB requests: it leaves the chunk server the
    /// other core and avoids cross-thread wake-ups.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(super) rpc_threads: u32,
    /// Engine threads of both stores (the chunk server's `store_engines`);
    /// 0 is the store's default, one per CPU.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub(super) store_engines: u32,
    /// The chunk server's --threads, and the in-process store's match:
    /// single runs its engine as a task of the load's runtime, on one thread
    /// with the load (--inprocess-threads is then 1); multi gives it engine
    /// threads of their own.
    #[arg(long, value_enum, default_value_t = Threads::Single)]
    pub(super) threads: Threads,
}

/// The run's settings after defaults and --quick are applied.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub(super) size_mib: u64,
    pub(super) runtime_s: u64,
    pub(super) rounds: u64,
    pub(super) extent_mib: u32,
    pub(super) iodepth: u32,
    pub(super) extents_for_memory: u64,
    pub(super) mode: Mode,
    pub(super) io_mode: IoModeArg,
    pub(super) fio: bool,
    pub(super) connections: u32,
    pub(super) inprocess_threads: u32,
    pub(super) rpc_threads: u32,
    pub(super) store_engines: u32,
    pub(super) threads: Threads,
    #[serde(skip)]
    pub(super) chunkserver_bin: PathBuf,
}

impl Config {
    pub(super) fn resolve(args: &StoreBenchArgs) -> anyhow::Result<Config> {
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
            rounds: pick(args.rounds, QUICK_ROUNDS, DEFAULT_ROUNDS),
            extent_mib: args.extent_mib,
            iodepth: args.iodepth,
            extents_for_memory: pick(
                args.extents_for_memory,
                QUICK_EXTENTS_FOR_MEMORY,
                DEFAULT_EXTENTS_FOR_MEMORY,
            ),
            mode: args.mode,
            io_mode: args.io_mode,
            fio: !args.skip_fio,
            connections: args.connections.min(args.iodepth),
            inprocess_threads: if args.threads == Threads::Single {
                1
            } else {
                args.inprocess_threads
            },
            rpc_threads: args.rpc_threads,
            store_engines: args.store_engines,
            threads: args.threads,
            chunkserver_bin,
        })
    }

    pub(super) fn title(&self) -> String {
        let mut parts = vec![
            format!("{} MiB working set", self.size_mib),
            format!(
                "{} s per phase and subject, {} round(s)",
                self.runtime_s, self.rounds
            ),
            format!("{} MiB extents", self.extent_mib),
            format!("queue depth {}", self.iodepth),
            format!("{:?} I/O", self.io_mode).to_lowercase(),
        ];
        if self.store_engines != 0 {
            parts.push(format!("{} store engine(s)", self.store_engines));
        }
        parts.push(format!("threads {}", self.threads.name()));
        if self.inprocess() {
            parts.push(format!(
                "in-process load on {} thread(s)",
                self.inprocess_threads
            ));
        }
        if self.rpc() {
            parts.push(format!(
                "rpc over {} connection(s) from {} thread(s)",
                self.connections, self.rpc_threads
            ));
        }
        format!("cairn bench store: {}", parts.join(", "))
    }

    pub(super) fn extent_bytes(&self) -> u32 {
        self.extent_mib << 20
    }

    pub(super) fn size_bytes(&self) -> u64 {
        self.size_mib << 20
    }

    pub(super) fn inprocess(&self) -> bool {
        matches!(self.mode, Mode::Inprocess | Mode::Both)
    }

    pub(super) fn rpc(&self) -> bool {
        matches!(self.mode, Mode::Rpc | Mode::Both)
    }

    /// Disk the run will use at most: the fio file, one working set per store
    /// subject with its extents' headers and slot tables, and the memory
    /// phase's sparse extents.
    pub(super) fn space_needed_bytes(&self) -> u64 {
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
            (c.size_mib, c.runtime_s, c.rounds, c.extents_for_memory),
            (2048, 10, 3, 100_000)
        );
        let c = config(&["--quick"]).unwrap();
        assert_eq!(
            (c.size_mib, c.runtime_s, c.rounds, c.extents_for_memory),
            (256, 3, 1, 10_000)
        );
        let c = config(&["--quick", "--runtime-s", "5", "--rounds", "3"]).unwrap();
        assert_eq!((c.runtime_s, c.rounds), (5, 3));
        assert!(config(&["--rounds", "0"]).is_err());
        assert_eq!(c.io_mode, IoModeArg::Direct);
        let c = config(&["--io-mode", "buffered", "--inprocess-threads", "1"]).unwrap();
        assert_eq!(
            (c.io_mode, c.inprocess_threads, c.rpc_threads),
            (IoModeArg::Buffered, 1, 1)
        );
        assert_eq!(c.store_engines, 0);
        assert_eq!(config(&["--store-engines", "1"]).unwrap().store_engines, 1);
        // One thread for load and engine unless the engines have threads.
        let c = config(&[]).unwrap();
        assert_eq!((c.threads, c.inprocess_threads), (Threads::Single, 1));
        let c = config(&["--threads", "multi"]).unwrap();
        assert_eq!((c.threads, c.inprocess_threads), (Threads::Multi, 2));
    }

    #[test]
    fn rejects_bad_flags() {
        assert!(config(&["--extent-mib", "3"]).is_err());
        assert!(config(&["--extent-mib", "128"]).is_err());
        assert!(config(&["--extent-mib", "4294967295"]).is_err());
        assert!(config(&["--iodepth", "0"]).is_err());
        assert!(config(&["--size-mib", "0"]).is_err());
        assert!(config(&["--mode", "sideways"]).is_err());
        assert!(config(&["--io-mode", "mmap"]).is_err());
        assert!(config(&["--rpc-threads", "0"]).is_err());
        assert!(config(&["--store-engines", "65"]).is_err());
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
