//! `cairn volume`: create and list volumes at the volume manager. (Issue 7
//! brings the rest: info, resize, delete, and finding the cluster without
//! flags.)

use clap::{Args, Subcommand};
use serde_json::json;

use cairn_volmgr::client::VolmgrClient;

use crate::output::bytes_human;

#[derive(Args)]
pub struct ClusterArgs {
    /// Volume manager members, ADDR,ADDR,...
    #[arg(long, value_name = "ADDRS", env = "CAIRN_VOLMGR")]
    volmgr: String,
    /// The cluster's id.
    #[arg(long, value_name = "ID", env = "CAIRN_CLUSTER_ID")]
    cluster_id: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Create a thin volume (it takes no space until written).
    #[command(
        after_help = "Example:\n  cairn volume create pacs-db --size 100G --replicas 3 \\\n      --volmgr 127.0.0.2:7400 --cluster-id pacs-1"
    )]
    Create {
        /// The volume's name (also its NBD export name).
        name: String,
        /// Size, with a unit: 512M, 10G, 2T (binary units).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Copies of every block.
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        /// Writes wait (then fail) while fewer replicas than this act [default: replicas - 1, at least 1].
        #[arg(long)]
        min_replicas: Option<u32>,
        /// Extent size, a power of two from 64K to 8M.
        #[arg(long, default_value = "4M", value_parser = parse_size)]
        extent_size: u64,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// List volumes.
    List {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

/// `10G` -> 10 GiB. Units K, M, G, T, P (binary); a bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        Some('P') => (&t[..t.len() - 1], 50),
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 512M, 10G, 2T)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

pub fn run(cmd: VolumeCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cmd {
            VolumeCommand::Create {
                name,
                size,
                replicas,
                min_replicas,
                extent_size,
                cluster,
            } => {
                let client = VolmgrClient::new(split(&cluster.volmgr), cluster.cluster_id);
                let min = min_replicas.unwrap_or(replicas.saturating_sub(1).max(1));
                let extent = u32::try_from(extent_size)
                    .map_err(|_| anyhow::anyhow!("extent size {extent_size} is too large"))?;
                let v = client
                    .create_volume(&name, size, extent, replicas, min)
                    .await
                    .map_err(|e| anyhow::anyhow!("creating volume {name:?}: {e}"))?;
                if cluster.json {
                    println!("{}", volume_json(&v));
                } else {
                    println!(
                        "created volume {} ({}, {} replicas, min {}), id {:#x}",
                        v.name,
                        bytes_human(v.size_bytes),
                        v.replicas,
                        v.min_replicas,
                        v.id
                    );
                }
            }
            VolumeCommand::List { cluster } => {
                let client = VolmgrClient::new(split(&cluster.volmgr), cluster.cluster_id);
                let vols = client
                    .list_volumes()
                    .await
                    .map_err(|e| anyhow::anyhow!("listing volumes: {e}"))?;
                if cluster.json {
                    let v: Vec<_> = vols.iter().map(volume_json).collect();
                    println!("{}", serde_json::Value::Array(v));
                } else {
                    println!(
                        "{:<24} {:>10} {:>8} {:>5} {:>8}",
                        "NAME", "SIZE", "REPLICAS", "MIN", "EXTENT"
                    );
                    for v in &vols {
                        println!(
                            "{:<24} {:>10} {:>8} {:>5} {:>8}",
                            v.name,
                            bytes_human(v.size_bytes),
                            v.replicas,
                            v.min_replicas,
                            bytes_human(v.extent_size_bytes as u64)
                        );
                    }
                }
            }
        }
        Ok(())
    })
}

fn split(addrs: &str) -> Vec<String> {
    addrs
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn volume_json(v: &cairn_proto::map::VolumeInfo) -> serde_json::Value {
    json!({
        "name": v.name,
        "id": v.id,
        "size_bytes": v.size_bytes,
        "replicas": v.replicas,
        "min_replicas": v.min_replicas,
        "extent_size_bytes": v.extent_size_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("99999999P").is_err());
    }
}
