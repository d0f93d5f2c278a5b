//! `cairn bench`: measurements against a reference.
//!
//! - [`store`]: the extent store, in process and behind a real chunk server,
//!   against fio on the same file system (issue 3's acceptance benchmark).
//! - [`election`]: how long the volume manager serves nothing after its
//!   leader dies (issue 4).

mod chunkserver;
mod disk;
mod election;
mod fio;
mod load;
mod report;
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
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Store(args) => store::run(args),
        BenchCommand::Election(args) => election::run(args),
    }
}
