//! `cairn node list`: the chunk servers in the cluster map, with their
//! failure domains, state, weight and usage.

use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::json;

use cairn_proto::map::NodeInfo;

use crate::config::{block_on, ClusterArgs};
use crate::output::bytes_human;
use crate::table::{ago, now_unix_ms, percent, Align, Table};

#[derive(Subcommand)]
pub enum NodeCommand {
    /// List chunk servers: address, host/rack/room, up/down, in/out, weight, usage.
    #[command(after_help = "Examples:\n  \
        cairn node list\n  \
        cairn node list --json\n\n\
        STATE is up (heartbeating) or down (silent for longer than the volume \
        manager's down_after). PLACEMENT is in (holds its share of data, also while \
        down) or out (holds nothing; its data is re-replicated elsewhere). SINCE is \
        the time of the last change of either.")]
    List {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

pub fn run(cmd: NodeCommand) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::List { cluster } => {
            let (client, _) = cluster.connect()?;
            let map = block_on(async {
                client
                    .get_map(0, Duration::ZERO)
                    .await
                    .context("reading the cluster map")
            })?;
            if cluster.json {
                let nodes: Vec<_> = map.nodes.iter().map(node_json).collect();
                println!("{}", serde_json::Value::Array(nodes));
            } else {
                print!("{}", nodes_table(&map.nodes, now_unix_ms()).render());
            }
        }
    }
    Ok(())
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

fn nodes_table(nodes: &[NodeInfo], now_ms: u64) -> Table {
    let mut t = Table::new(&[
        ("ID", Align::Right),
        ("ADDRESS", Align::Left),
        ("HOST", Align::Left),
        ("RACK", Align::Left),
        ("ROOM", Align::Left),
        ("STATE", Align::Left),
        ("PLACEMENT", Align::Left),
        ("WEIGHT", Align::Right),
        ("CAPACITY", Align::Right),
        ("USED", Align::Right),
        ("USE%", Align::Right),
        ("SINCE", Align::Right),
    ]);
    for n in nodes {
        t.row(vec![
            n.id.to_string(),
            n.addr.clone(),
            dash(&n.host),
            dash(&n.rack),
            dash(&n.room),
            if n.up { "up" } else { "down" }.into(),
            if n.in_ { "in" } else { "out" }.into(),
            n.weight.to_string(),
            bytes_human(n.capacity_bytes),
            bytes_human(n.used_bytes),
            format!("{:.1}", percent(n.used_bytes, n.capacity_bytes)),
            format!("{} ago", ago(n.since_unix_ms, now_ms)),
        ]);
    }
    t
}

/// A node as JSON: every field of `NodeInfo` (`in_` as `in`), plus
/// `used_percent`.
pub fn node_json(n: &NodeInfo) -> serde_json::Value {
    json!({
        "id": n.id,
        "addr": n.addr,
        "host": n.host,
        "rack": n.rack,
        "room": n.room,
        "up": n.up,
        "in": n.in_,
        "weight": n.weight,
        "capacity_bytes": n.capacity_bytes,
        "used_bytes": n.used_bytes,
        "used_percent": percent(n.used_bytes, n.capacity_bytes),
        "since_epoch": n.since_epoch,
        "since_unix_ms": n.since_unix_ms,
        "up_since": n.up_since,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_json() {
        let n = NodeInfo {
            id: 3,
            addr: "10.0.0.3:7500".into(),
            host: "h3".into(),
            rack: "".into(),
            room: "r1".into(),
            weight: 100,
            capacity_bytes: 100 << 30,
            used_bytes: 25 << 30,
            up: false,
            in_: true,
            since_epoch: 4,
            since_unix_ms: 1_000,
            up_since: 2,
        };
        let text = nodes_table(std::slice::from_ref(&n), 31_000).render();
        let row = text.lines().nth(1).unwrap();
        for want in [
            "10.0.0.3:7500",
            "h3",
            " - ",
            "r1",
            "down",
            "in",
            "100.0 GiB",
            "25.0 GiB",
            "25.0",
            "30s ago",
        ] {
            assert!(row.contains(want), "{want}: {text}");
        }
        let j = node_json(&n);
        assert_eq!(j["in"], true);
        assert_eq!(j["up"], false);
        assert_eq!(j["used_percent"], 25.0);
    }
}
