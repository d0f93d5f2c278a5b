//! `cairn`: the Cairn admin CLI.
//!
//! Subcommands live one module each: [`chunk`] talks to a single chunk server,
//! [`bench`] measures the store against fio. `up`, `volume` and `snapshot`
//! come later as further modules beside these.

mod bench;
mod chunk;
mod output;
mod placement;
#[cfg(test)]
mod test_server;
mod volume;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "Cairn admin CLI: inspect chunk servers, run benchmarks",
    long_about = "Cairn admin CLI.\n\n\
        Every command prints a human-readable table, or JSON with --json. Errors go to \
        stderr and exit with status 1 (2 for bad command-line arguments)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect one chunk server directly over the chunk RPC.
    #[command(subcommand)]
    Chunk(chunk::ChunkCommand),
    /// Measure Cairn against a reference (fio).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Check where data would be placed: balance, movement, failure domains.
    #[command(subcommand)]
    Placement(placement::PlacementCommand),
    /// Create and list volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Chunk(cmd) => chunk::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Placement(cmd) => placement::run(cmd),
        Command::Volume(cmd) => volume::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `cairn chunk ls | head` closes our stdout early: that is the reader's
        // choice, not an error worth a message.
        Err(e) if output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
