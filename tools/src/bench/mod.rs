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
//! - [`idle`]: CPU and log lines of an idle `cairn up` cluster (issue 7).
//! - [`snapshot`]: snapshot creation time by volume size, writes right after
//!   a snapshot, rollback time (issue 8).

mod chunkserver;
mod disk;
mod election;
mod fio;
mod idle;
mod load;
mod nbd;
mod replication;
mod report;
mod snapshot;
mod store;

use clap::Subcommand;

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
        BenchCommand::Idle(args) => idle::run(args),
        BenchCommand::Snapshot(args) => snapshot::run(args),
    }
}
