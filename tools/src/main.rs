//! `cairn`: the Cairn admin CLI.
//!
//! Subcommands live one module each: [`cluster`], [`node`], [`volume`],
//! [`snapshot`] and [`export`] ask the volume manager (found as [`config`] describes), [`chunk`]
//! talks to a single chunk server, [`bench`] measures the store against fio,
//! [`placement`] checks placement. [`exit`] defines the exit statuses.

mod bench;
mod chunk;
mod cluster;
mod config;
mod exit;
mod export;
mod node;
mod output;
mod placement;
mod scrub;
mod snapshot;
mod table;
#[cfg(test)]
mod test_server;
mod up;
mod volmgr;
mod volume;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "Cairn admin CLI: cluster health, nodes, volumes, snapshots, exports, benchmarks",
    long_about = "Cairn admin CLI: look after a Cairn cluster (health, chunk servers, \
        volumes, snapshots and clones, exports), inspect single chunk servers, run \
        benchmarks.\n\n\
        Every command prints a human-readable table, or JSON with --json (errors \
        too: {\"error\": {\"kind\", \"exit_code\", \"message\"}} on stdout). Sizes take \
        binary units: 512M, 10G (= 10GiB = 10GB = 10 x 1024^3 bytes), 2T.\n\n\
        Finding the cluster, first match wins: --volmgr ADDRS with --cluster-id ID \
        (or $CAIRN_VOLMGR and $CAIRN_CLUSTER_ID); the file given by --config or \
        $CAIRN_CONFIG; ./cairn-data/cairn.toml (written by `cairn up`, so commands \
        run in the folder where `cairn up` runs need no flags); /etc/cairn/cairn.toml.",
    after_long_help = concat!(
        "Examples:\n  \
        cairn cluster status\n  \
        cairn node list\n  \
        cairn node drain 4\n  \
        cairn volume create pacs-db --size 100G\n  \
        cairn volume list --json\n  \
        cairn volume resize pacs-db --size 200G\n  \
        cairn snapshot create pacs-db nightly\n  \
        cairn volume rollback pacs-db nightly\n  \
        cairn volume clone pacs-db@nightly pacs-db-test\n  \
        cairn export list\n\n",
        "Exit status:\n  \
        0  success (`cluster status` also exits 0 on a degraded cluster: it reports)\n  \
        1  failure: cluster unreachable, or the server refused or failed\n  \
        2  bad arguments or configuration (no config found, broken config, bad size)\n  \
        3  not found: no such volume, snapshot or chunk server"
    )
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a whole cluster on this machine (volume manager, three chunk servers, NBD
    /// target) under one folder, supervised; Ctrl-C stops it.
    Up(up::UpArgs),
    /// Cluster health in one screen.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// List the chunk servers; drain, weigh, put back and remove them.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Create, list, inspect, grow, delete, roll back, clone and scrub volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Take, list and delete snapshots of a volume.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// List the volumes targets export now.
    #[command(subcommand)]
    Export(export::ExportCommand),
    /// The volume manager's members: list, add, remove.
    #[command(subcommand)]
    Volmgr(volmgr::VolmgrCommand),
    /// Inspect one chunk server directly over the chunk RPC.
    #[command(subcommand)]
    Chunk(chunk::ChunkCommand),
    /// Measure Cairn against a reference (fio, nbdkit) or a goal.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Check where data would be placed: balance, movement, failure domains.
    #[command(subcommand)]
    Placement(placement::PlacementCommand),
}

fn main() -> ExitCode {
    // Every command takes --json; asked anywhere (before a `--`), errors
    // are JSON on stdout too (exit.rs).
    let json = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if json && e.use_stderr() {
                let message = e.kind().to_string();
                let detail = e.render().to_string();
                let first = detail
                    .lines()
                    .next()
                    .unwrap_or(&message)
                    .trim_start_matches("error: ");
                println!("{}", exit::json(exit::USAGE, first));
            }
            e.exit();
        }
    };
    let result = match cli.command {
        Command::Chunk(cmd) => chunk::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Placement(cmd) => placement::run(cmd),
        Command::Cluster(cmd) => cluster::run(cmd),
        Command::Node(cmd) => node::run(cmd),
        Command::Volume(cmd) => volume::run(cmd),
        Command::Snapshot(cmd) => snapshot::run(cmd),
        Command::Export(cmd) => export::run(cmd),
        Command::Volmgr(cmd) => volmgr::run(cmd),
        Command::Up(args) => up::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `cairn chunk ls | head` closes our stdout early: that is the reader's
        // choice, not an error worth a message.
        Err(e) if output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // (`cairn up` reports set-up problems as `exit::usage` errors.)
            let code = exit::code_for(&e);
            if json {
                println!("{}", exit::json(code, &format!("{e:#}")));
            }
            ExitCode::from(code)
        }
    }
}
