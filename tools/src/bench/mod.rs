//! `cairn bench`: measurements against a reference.
//!
//! - [`store`]: the extent store, in process and behind a real chunk server,
//!   against fio on the same file system (issue 3's acceptance benchmark).

mod chunkserver;
mod disk;
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
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Store(args) => store::run(args),
    }
}
