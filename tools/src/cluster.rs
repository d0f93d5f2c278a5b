//! `cairn cluster status`: the cluster's health on one screen.
//!
//! The health word:
//!
//! - `HEALTHY`: every chunk server up and in, every group acting with all
//!   its replicas.
//! - `DEGRADED`: a chunk server is down or out, or a group acts with fewer
//!   replicas than it should; every volume still reads and writes.
//! - `UNAVAILABLE`: some volume's writes wait: a group its replica count
//!   uses acts with fewer replicas than the volume's `min_replicas`, or no
//!   chunk server is up at all.
//!
//! The command exits 0 whatever the health (it reports; scripts read
//! `health` from `--json`), and 1 only when the cluster cannot be asked.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::json;

use cairn_proto::map::{ClusterMap, NodeInfo, VolumeInfo};
use cairn_proto::volmgr::ClusterStatus;

use crate::config::{block_on, ClusterArgs};
use crate::node::node_json;
use crate::output::bytes_human;
use crate::table::{ago, now_unix_ms, percent, utc, Align, Table};

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Health in one screen: leader, nodes down or out, degraded groups, capacity.
    #[command(after_help = "Examples:\n  \
        cairn cluster status\n  \
        cairn cluster status --json | jq -r .health\n\n\
        Health: HEALTHY (all nodes up and in, no degraded group), DEGRADED (a node \
        down or out, or groups short of replicas; all volumes still work), \
        UNAVAILABLE (some volume's writes wait: a group has fewer replicas than \
        the volume's --min-replicas, or no chunk server is up).\n\
        Exit status is 0 whatever the health: the command reports. It is 1 only if \
        the cluster cannot be reached.")]
    Status {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

/// The health word and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub word: &'static str,
    pub reasons: Vec<String>,
}

/// Judges health from the map and the catalogue.
pub fn health(map: &ClusterMap, volumes: &[VolumeInfo]) -> Health {
    let mut reasons = Vec::new();
    let mut unavailable = false;
    if map.nodes.is_empty() {
        unavailable = true;
        reasons.push("no chunk server has registered".to_string());
    } else if !map.nodes.iter().any(|n| n.up) {
        unavailable = true;
        reasons.push("no chunk server is up".to_string());
    }
    for n in &map.nodes {
        match (n.up, n.in_) {
            (true, true) => {}
            (false, true) => reasons.push(format!("node {} ({}) is down", n.id, n.addr)),
            (true, false) => reasons.push(format!("node {} ({}) is out", n.id, n.addr)),
            (false, false) => reasons.push(format!("node {} ({}) is down and out", n.id, n.addr)),
        }
    }
    // Smallest acting set per replica count.
    let mut smallest: BTreeMap<u32, usize> = BTreeMap::new();
    let mut degraded = 0usize;
    for g in &map.groups {
        if g.degraded() {
            degraded += 1;
        }
        let s = smallest.entry(g.replicas).or_insert(usize::MAX);
        *s = (*s).min(g.acting.len());
    }
    if degraded > 0 {
        reasons.push(format!(
            "{degraded} of {} groups act with fewer replicas than they should",
            map.groups.len()
        ));
    }
    for v in volumes {
        if let Some(&acting) = smallest.get(&v.replicas) {
            if acting < v.min_replicas as usize {
                unavailable = true;
                reasons.push(format!(
                    "volume {}: writes wait: a group acts with {acting} replica(s), fewer than its min_replicas {}",
                    v.name, v.min_replicas
                ));
            }
        }
    }
    let word = if unavailable {
        "UNAVAILABLE"
    } else if reasons.is_empty() {
        "HEALTHY"
    } else {
        "DEGRADED"
    };
    Health { word, reasons }
}

pub fn run(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Status { cluster } => {
            let (client, found) = cluster.connect()?;
            let (status, map, volumes) = block_on(async {
                let status = client
                    .cluster_status()
                    .await
                    .context("asking the volume manager for the cluster status")?;
                let map = client
                    .get_map(0, Duration::ZERO)
                    .await
                    .context("reading the cluster map")?;
                let volumes = client.list_volumes().await.context("listing volumes")?;
                Ok((status, map, volumes))
            })?;
            let h = health(&map, &volumes);
            let problems: Vec<&NodeInfo> = map.nodes.iter().filter(|n| !(n.up && n.in_)).collect();
            if cluster.json {
                println!(
                    "{}",
                    status_json(&found.config.cluster_id, &status, &map, &h, &problems)
                );
            } else {
                print!(
                    "{}",
                    status_human(
                        &found.config.cluster_id,
                        &found.source.to_string(),
                        &status,
                        &map,
                        &h,
                        &problems,
                        now_unix_ms()
                    )
                );
            }
        }
    }
    Ok(())
}

fn leader_addr(status: &ClusterStatus) -> Option<&str> {
    status
        .members
        .iter()
        .find(|m| m.id == status.leader_id)
        .map(|m| m.addr.as_str())
}

fn status_json(
    cluster_id: &str,
    status: &ClusterStatus,
    map: &ClusterMap,
    h: &Health,
    problems: &[&NodeInfo],
) -> serde_json::Value {
    json!({
        "cluster_id": cluster_id,
        "health": h.word,
        "reasons": h.reasons,
        "leader": if status.leader_id == 0 { serde_json::Value::Null } else {
            json!({ "id": status.leader_id, "addr": leader_addr(status) })
        },
        "term": status.term,
        "members": status.members.iter().map(|m| json!({
            "id": m.id, "addr": m.addr, "leader": m.id == status.leader_id,
        })).collect::<Vec<_>>(),
        "map_epoch": status.map_epoch,
        "nodes": {
            "total": map.nodes.len(),
            "up": status.nodes_up,
            "down": status.nodes_down,
            "out": status.nodes_out,
        },
        "nodes_down_or_out": problems.iter().map(|n| node_json(n)).collect::<Vec<_>>(),
        "groups": map.groups.len(),
        "groups_degraded": status.groups_degraded,
        "capacity_bytes": status.capacity_bytes,
        "used_bytes": status.used_bytes,
        "used_percent": percent(status.used_bytes, status.capacity_bytes),
        "volumes": status.volumes,
    })
}

fn status_human(
    cluster_id: &str,
    source: &str,
    status: &ClusterStatus,
    map: &ClusterMap,
    h: &Health,
    problems: &[&NodeInfo],
    now_ms: u64,
) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<10}{v}\n"));
    line("cluster", format!("{cluster_id} (from {source})"));
    line("health", h.word.to_string());
    for r in &h.reasons {
        line("", format!("- {r}"));
    }
    line(
        "leader",
        match leader_addr(status) {
            Some(addr) => format!("member {} ({addr}), term {}", status.leader_id, status.term),
            None => format!("none known (term {})", status.term),
        },
    );
    line(
        "members",
        status
            .members
            .iter()
            .map(|m| format!("{} {}", m.id, m.addr))
            .collect::<Vec<_>>()
            .join(", "),
    );
    line("map", format!("epoch {}", status.map_epoch));
    line(
        "nodes",
        format!(
            "{} total: {} up, {} down, {} out",
            map.nodes.len(),
            status.nodes_up,
            status.nodes_down,
            status.nodes_out
        ),
    );
    line(
        "groups",
        format!(
            "{} total, {} degraded",
            map.groups.len(),
            status.groups_degraded
        ),
    );
    line(
        "capacity",
        format!(
            "{} used of {} ({:.1}%)",
            bytes_human(status.used_bytes),
            bytes_human(status.capacity_bytes),
            percent(status.used_bytes, status.capacity_bytes)
        ),
    );
    line("volumes", status.volumes.to_string());
    if !problems.is_empty() {
        out.push_str("\nNodes down or out:\n");
        let mut t = Table::new(&[
            ("ID", Align::Right),
            ("ADDRESS", Align::Left),
            ("HOST", Align::Left),
            ("STATE", Align::Left),
            ("SINCE", Align::Left),
        ]);
        for n in problems {
            t.row(vec![
                n.id.to_string(),
                n.addr.clone(),
                n.host.clone(),
                format!(
                    "{}, {}",
                    if n.up { "up" } else { "down" },
                    if n.in_ { "in" } else { "out" }
                ),
                format!(
                    "{} ({} ago)",
                    utc(n.since_unix_ms),
                    ago(n.since_unix_ms, now_ms)
                ),
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_proto::map::GroupRecord;

    fn node(id: u64, up: bool, in_: bool) -> NodeInfo {
        NodeInfo {
            id,
            addr: format!("10.0.0.{id}:7500"),
            host: format!("h{id}"),
            up,
            in_,
            weight: 1,
            ..Default::default()
        }
    }

    fn group(acting: &[u64]) -> GroupRecord {
        GroupRecord {
            replicas: 3,
            index: 0,
            interval: 1,
            acting: acting.to_vec(),
        }
    }

    fn volume(min: u32) -> VolumeInfo {
        VolumeInfo {
            name: "v".into(),
            replicas: 3,
            min_replicas: min,
            ..Default::default()
        }
    }

    #[test]
    fn health_words() {
        let mut map = ClusterMap {
            nodes: vec![
                node(1, true, true),
                node(2, true, true),
                node(3, true, true),
            ],
            groups: vec![group(&[1, 2, 3])],
            ..Default::default()
        };
        assert_eq!(health(&map, &[volume(2)]).word, "HEALTHY");

        map.nodes[2].up = false;
        map.groups[0].acting = vec![1, 2];
        let h = health(&map, &[volume(2)]);
        assert_eq!(h.word, "DEGRADED");
        assert!(h.reasons.iter().any(|r| r.contains("node 3")), "{h:?}");
        assert!(
            h.reasons.iter().any(|r| r.contains("1 of 1 groups")),
            "{h:?}"
        );

        map.groups[0].acting = vec![1];
        let h = health(&map, &[volume(2)]);
        assert_eq!(h.word, "UNAVAILABLE");
        assert!(h.reasons.iter().any(|r| r.contains("volume v")), "{h:?}");
        // A volume that accepts one replica still writes.
        assert_eq!(health(&map, &[volume(1)]).word, "DEGRADED");

        map.nodes.iter_mut().for_each(|n| n.up = false);
        assert_eq!(health(&map, &[]).word, "UNAVAILABLE");
        assert_eq!(health(&ClusterMap::default(), &[]).word, "UNAVAILABLE");

        let out = ClusterMap {
            nodes: vec![node(1, true, true), node(2, true, false)],
            ..Default::default()
        };
        let h = health(&out, &[]);
        assert_eq!(h.word, "DEGRADED");
        assert!(h.reasons[0].contains("node 2") && h.reasons[0].contains("out"));
    }

    #[test]
    fn human_status_names_down_nodes() {
        let map = ClusterMap {
            epoch: 9,
            nodes: vec![node(1, true, true), node(2, false, true)],
            groups: vec![],
            ..Default::default()
        };
        let status = ClusterStatus {
            leader_id: 1,
            term: 4,
            members: vec![cairn_proto::volmgr::MemberInfo {
                id: 1,
                addr: "10.0.0.1:7400".into(),
            }],
            map_epoch: 9,
            nodes_up: 1,
            nodes_down: 1,
            nodes_out: 0,
            capacity_bytes: 4 << 30,
            used_bytes: 1 << 30,
            volumes: 2,
            groups_degraded: 0,
        };
        let h = health(&map, &[]);
        let problems: Vec<&NodeInfo> = map.nodes.iter().filter(|n| !n.up).collect();
        let text = status_human("c1", "flags", &status, &map, &h, &problems, 0);
        for want in [
            "health    DEGRADED",
            "member 1 (10.0.0.1:7400), term 4",
            "1.0 GiB used of 4.0 GiB (25.0%)",
            "10.0.0.2:7500",
            "down, in",
        ] {
            assert!(text.contains(want), "{want}:\n{text}");
        }
        let j = status_json("c1", &status, &map, &h, &problems);
        assert_eq!(j["health"], "DEGRADED");
        assert_eq!(j["nodes"]["down"], 1);
        assert_eq!(j["nodes_down_or_out"][0]["id"], 2);
        assert_eq!(j["leader"]["addr"], "10.0.0.1:7400");
        assert_eq!(j["used_percent"], 25.0);
    }
}
