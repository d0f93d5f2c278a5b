//! `cairn bench`: measurements against a reference.
//!
//! - [`store`]: the extent store, in process and behind a real chunk server,
//!   against fio on the same file system (issue 3's acceptance benchmark).
//! - [`election`]: how long the volume manager serves nothing after its
//!   leader dies (issue 4).
//! - [`replication`]: 3 replicas against 1 (write IOPS), the I/O pause when a
//!   chunk server dies, and rejoin after an outage (issue 5).
//! - [`nbd`]: the NBD front end `cairn-target` (1 and 3 replicas) against
//!   nbdkit's file plugin, through fio's nbd engine, and its resident memory
//!   per idle connection (issue 6).
//! - [`iscsi`]: the iSCSI front end `cairn-target` (1 and 3 replicas)
//!   against tgt's `tgtd`, through the bench's own initiator (issue 9).
//! - [`idle`]: CPU and log lines of an idle `cairn up` cluster (issue 7).
//! - [`snapshot`]: snapshot creation time by volume size, writes right after
//!   a snapshot, rollback time (issue 8).

mod chunkserver;
mod cpu;
mod disk;
mod election;
mod fio;
mod idle;
mod iscsi;
mod load;
mod nbd;
mod replication;
mod report;
mod snapshot;
mod store;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use replication::progress;

/// Where a benchmark that starts Cairn's daemons finds them and keeps its
/// data (`replication`, `nbd`, `snapshot`).
#[derive(Args)]
pub struct RunDirArgs {
    /// Folder to make the temporary data folder in (use a real disk, not tmpfs).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Keep the temporary folder (data and daemon logs) afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Folder holding the Cairn daemons (cairn-volmgr, cairn-chunkserver,
    /// cairn-target) [default: this cairn binary's].
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

impl RunDirArgs {
    /// `--bin-dir`, or the folder of the running cairn binary.
    pub fn bin_dir(&self) -> anyhow::Result<PathBuf> {
        match &self.bin_dir {
            Some(d) => Ok(d.clone()),
            None => Ok(std::env::current_exe()?
                .parent()
                .context("the running cairn binary has no folder")?
                .to_path_buf()),
        }
    }

    /// A fresh `cairn-bench-<what>-...` folder inside `--dir`.
    pub fn tempdir(&self, what: &str) -> anyhow::Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix(&format!("cairn-bench-{what}-"))
            .tempdir_in(&self.dir)
            .with_context(|| format!("creating a temporary folder in {}", self.dir.display()))
    }

    /// Removes the folder, or with `--keep` keeps it and says where.
    pub fn finish(&self, dir: tempfile::TempDir) {
        if self.keep {
            let kept = dir.keep();
            progress(format!("kept {}", kept.display()));
        }
    }
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The extent store against fio: 4 KiB random and 1 MiB sequential I/O, and
    /// the chunk server's resident memory with many extents.
    #[command(long_about = store::LONG_ABOUT)]
    Store(store::StoreBenchArgs),
    /// Volume manager failover: kill -9 the leader of three members and time
    /// until a new one acknowledges a write.
    Election(election::ElectionBenchArgs),
    /// Replication: 4 KiB write IOPS with 3 replicas against 1, the I/O pause
    /// when a primary chunk server is killed, and rejoin after an outage.
    Replication(replication::ReplicationBenchArgs),
    /// The NBD front end against nbdkit: fio's nbd engine, 4 KiB random and
    /// 1 MiB sequential I/O with 1 and 3 replicas, and cairn-target's resident
    /// memory with 1 and 64 idle connections.
    Nbd(nbd::NbdBenchArgs),
    /// The iSCSI front end against tgt (tgtd, needs root): the bench's own
    /// initiator, 4 KiB random and 1 MiB sequential I/O with 1 and 3 replicas.
    Iscsi(iscsi::IscsiBenchArgs),
    /// An idle `cairn up` cluster: CPU share of one core and log lines over 60 s
    /// with no I/O (goal: under 1%, none).
    Idle(idle::IdleBenchArgs),
    /// Snapshots: creation time of thin volumes of 1 GiB, 100 GiB and 10 TiB
    /// (also exported under fio's writes), 4 KiB random writes right after a
    /// snapshot against without, and rollback time by data written.
    Snapshot(snapshot::SnapshotBenchArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Store(args) => store::run(args),
        BenchCommand::Election(args) => election::run(args),
        BenchCommand::Replication(args) => replication::run(args),
        BenchCommand::Nbd(args) => nbd::run(args),
        BenchCommand::Iscsi(args) => iscsi::run(args),
        BenchCommand::Idle(args) => idle::run(args),
        BenchCommand::Snapshot(args) => snapshot::run(args),
    }
}
