//! `cairn chunk`: inspect one chunk server over the chunk RPC.

use std::io::Write;

use anyhow::{bail, Context};
use cairn_chunkserver::rpc::ChunkClient;
use cairn_proto::chunk::{ExtentInfo, ExtentKey, NodeStat, EXTENT_LIST_PAGE_MAX};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::output::{bytes_human, count_human, parse_u64_dec_or_hex};

#[derive(Subcommand)]
pub enum ChunkCommand {
    /// The node's identity, space and extent count.
    Stat(StatArgs),
    /// Every stored extent version, in key order (all pages).
    Ls(LsArgs),
}

#[derive(Args)]
pub struct StatArgs {
    /// The chunk server's RPC address, HOST:PORT.
    #[arg(long)]
    addr: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct LsArgs {
    /// The chunk server's RPC address, HOST:PORT.
    #[arg(long)]
    addr: String,
    /// Only extents of this volume (decimal, or hex with 0x).
    #[arg(long, value_parser = parse_u64_dec_or_hex)]
    volume: Option<u64>,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: ChunkCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let mut out = std::io::stdout().lock();
    match cmd {
        ChunkCommand::Stat(args) => runtime.block_on(stat(&args.addr, args.json, &mut out)),
        ChunkCommand::Ls(args) => runtime.block_on(ls(
            &args.addr,
            args.volume,
            args.json,
            LS_PAGE_EXTENTS,
            &mut out,
        )),
    }
}

/// Extents asked for per listing request: as many as the server sends.
const LS_PAGE_EXTENTS: u32 = EXTENT_LIST_PAGE_MAX;

async fn connect(addr: &str) -> anyhow::Result<ChunkClient> {
    // connect() names the address in its own error.
    ChunkClient::connect(addr).await
}

#[derive(Serialize)]
struct NodeStatJson<'a> {
    addr: &'a str,
    cluster_id: &'a str,
    node_id: u64,
    capacity_bytes: u64,
    free_bytes: u64,
    used_bytes: u64,
    extents: u64,
}

async fn stat(addr: &str, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let client = connect(addr).await?;
    let node: NodeStat = client
        .node_stat()
        .await
        .with_context(|| format!("asking {addr} for its node stat"))?;
    if json {
        let json = NodeStatJson {
            addr,
            cluster_id: &node.cluster_id,
            node_id: node.node_id,
            capacity_bytes: node.capacity_bytes,
            free_bytes: node.free_bytes,
            used_bytes: node.used_bytes,
            extents: node.extents,
        };
        serde_json::to_writer_pretty(&mut *out, &json)?;
        writeln!(out)?;
    } else {
        let rows = [
            ("address", addr.to_string()),
            ("cluster", node.cluster_id.clone()),
            ("node id", node.node_id.to_string()),
            ("capacity", bytes_human(node.capacity_bytes)),
            ("free", bytes_human(node.free_bytes)),
            ("used by extents", bytes_human(node.used_bytes)),
            ("extents", count_human(node.extents)),
        ];
        for (name, value) in rows {
            writeln!(out, "{name:<16} {value}")?;
        }
    }
    out.flush()?;
    Ok(())
}

#[derive(Serialize)]
struct ExtentJson {
    volume_id: u64,
    extent_index: u64,
    epoch: u64,
    extent_bytes: u32,
    allocated_bytes: u64,
}

/// Pages through the listing and prints each page as it arrives, so memory
/// stays at one page however many extents the node holds. JSON output is one
/// array, written incrementally for the same reason.
async fn ls(
    addr: &str,
    volume: Option<u64>,
    json: bool,
    page_extents: u32,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let client = connect(addr).await?;
    let mut after: Option<ExtentKey> = None;
    let mut listed: u64 = 0;
    if json {
        write!(out, "[")?;
    } else {
        writeln!(
            out,
            "{:>18} {:>12} {:>8} {:>10} {:>12}",
            "VOLUME", "EXTENT", "EPOCH", "SIZE", "ALLOCATED"
        )?;
    }
    loop {
        let page = client
            .extent_list(volume, after, page_extents)
            .await
            .with_context(|| {
                format!(
                    "listing extents on {} after {}",
                    addr,
                    describe(after.as_ref())
                )
            })?;
        for info in &page.extents {
            let key = checked_key(info, after.as_ref())
                .with_context(|| format!("listing extents on {}", addr))?;
            if json {
                let sep = if listed == 0 { "" } else { "," };
                let entry = ExtentJson {
                    volume_id: key.volume_id,
                    extent_index: key.extent_index,
                    epoch: key.epoch,
                    extent_bytes: info.extent_bytes,
                    allocated_bytes: info.allocated_bytes,
                };
                write!(out, "{sep}\n  {}", serde_json::to_string(&entry)?)?;
            } else {
                writeln!(
                    out,
                    "{:>#18x} {:>12} {:>8} {:>10} {:>12}",
                    key.volume_id,
                    key.extent_index,
                    key.epoch,
                    bytes_human(info.extent_bytes as u64),
                    bytes_human(info.allocated_bytes),
                )?;
            }
            after = Some(key);
            listed += 1;
        }
        if !page.more {
            break;
        }
        if page.extents.is_empty() {
            bail!(
                "{} said more extents follow but sent an empty page; stopping rather than looping",
                addr
            );
        }
    }
    if json {
        writeln!(out, "{}]", if listed == 0 { "" } else { "\n" })?;
    } else {
        writeln!(out, "{} extent(s)", count_human(listed))?;
    }
    out.flush()?;
    Ok(())
}

fn describe(key: Option<&ExtentKey>) -> String {
    match key {
        Some(k) => format!(
            "volume {:#x} extent {} epoch {}",
            k.volume_id, k.extent_index, k.epoch
        ),
        None => "the start".to_string(),
    }
}

/// Every entry must carry a key and come strictly after the previous one; a
/// server breaking that would make paging repeat or loop forever.
fn checked_key(info: &ExtentInfo, after: Option<&ExtentKey>) -> anyhow::Result<ExtentKey> {
    let key = info
        .key
        .context("the server sent an extent entry without a key")?;
    let order = |k: &ExtentKey| (k.volume_id, k.extent_index, k.epoch);
    if after.is_some_and(|a| order(&key) <= order(a)) {
        bail!(
            "the server sent {} out of order (after {})",
            describe(Some(&key)),
            describe(after)
        );
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(volume_id: u64, extent_index: u64) -> ExtentInfo {
        ExtentInfo {
            key: Some(ExtentKey {
                volume_id,
                extent_index,
                epoch: 1,
            }),
            extent_bytes: 4 << 20,
            allocated_bytes: 0,
        }
    }

    #[test]
    fn keys_must_increase() {
        let first = checked_key(&info(1, 5), None).unwrap();
        assert!(checked_key(&info(1, 6), Some(&first)).is_ok());
        assert!(checked_key(&info(2, 0), Some(&first)).is_ok());
        assert!(checked_key(&info(1, 5), Some(&first)).is_err());
        assert!(checked_key(&info(0, 9), Some(&first)).is_err());
        assert!(checked_key(&ExtentInfo::default(), None).is_err());
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn stat_and_ls_page_through_a_server() {
        runtime().block_on(async {
            let server = crate::test_server::TestServer::start().await;
            let addr = server.addr.to_string();
            let client = ChunkClient::connect(server.addr).await.unwrap();
            for (volume_id, extent_index) in [(1, 0), (1, 1), (1, 2), (2, 0), (2, 5)] {
                let key = ExtentKey {
                    volume_id,
                    extent_index,
                    epoch: 1,
                };
                client
                    .write(key, 1 << 20, 0, vec![7u8; 4096], false)
                    .await
                    .unwrap();
            }

            let mut out = Vec::new();
            stat(&addr, true, &mut out).await.unwrap();
            let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(json["cluster_id"], "test-cluster");
            assert_eq!(json["node_id"], 7);
            assert_eq!(json["extents"], 5);

            // A page size of 2 forces three pages for five extents.
            let mut out = Vec::new();
            ls(&addr, None, true, 2, &mut out).await.unwrap();
            let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let keys: Vec<(u64, u64)> = json
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["volume_id"].as_u64().unwrap(),
                        e["extent_index"].as_u64().unwrap(),
                    )
                })
                .collect();
            assert_eq!(keys, [(1, 0), (1, 1), (1, 2), (2, 0), (2, 5)]);

            let mut out = Vec::new();
            ls(&addr, Some(2), false, 2, &mut out).await.unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(text.ends_with("2 extent(s)\n"), "{text}");

            let mut out = Vec::new();
            ls(&addr, Some(9), true, 2, &mut out).await.unwrap();
            assert_eq!(
                serde_json::from_slice::<serde_json::Value>(&out).unwrap(),
                serde_json::json!([])
            );
            drop(client);
            server.stop().await;
        });
    }

    #[test]
    fn unreachable_server_names_the_address() {
        runtime().block_on(async {
            // Port 1 on loopback: nothing listens there.
            let err = stat("127.0.0.1:1", false, &mut Vec::new())
                .await
                .unwrap_err();
            assert!(format!("{err:#}").contains("127.0.0.1:1"), "{err:#}");
            // No port: refused before any name lookup, so no DNS in tests.
            let err = ls("not-an-address", None, false, 2, &mut Vec::new())
                .await
                .unwrap_err();
            assert!(format!("{err:#}").contains("not-an-address"), "{err:#}");
        });
    }
}
