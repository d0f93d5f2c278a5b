//! `cairn node`: the chunk servers in the cluster map (`list`), and what an
//! admin changes about them: `drain` (take out of placement and watch the
//! data move off), `in` (back into placement), `weight`, and `remove` (drop
//! a drained, stopped one from the map for good).

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::json;

use cairn_proto::groupmap::group_map;
use cairn_proto::map::{ClusterMap, NodeInfo};
use cairn_volmgr::client::VolmgrClient;

use crate::config::{block_on, ClusterArgs};
use crate::output::bytes_human;
use crate::table::{ago, now_unix_ms, percent, Align, Table};

/// How often `drain` prints progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

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
    /// Take chunk servers out of placement and wait until no group needs them.
    #[command(after_help = "Examples:\n  \
        cairn node drain 4\n  \
        cairn node drain 4 5 --no-wait\n  \
        cairn node drain 4 --json\n\n\
        Every group with a replica on the nodes gets a new placement without them; \
        its primary copies the data to the new members, claims them, and the drained \
        nodes then leave the group. Reads and writes go on throughout, and every write \
        still reaches every replica, the drained ones included, until they leave. The \
        command waits until the nodes are in no group (progress on stderr every 2 s), \
        or returns at once with --no-wait; stopping it does not stop the drain. Then stop \
        the chunk server and `cairn node remove` it. A node that is down and the last \
        replica of a group cannot be drained until it is back. Refused when the hosts \
        left could not hold every group's replicas. Undo with `cairn node in`.\n\n\
        The drained node keeps its extent files (nothing is deleted there); wipe its \
        data directory after `remove`, or before putting the disk back in with a new \
        node id.")]
    Drain {
        /// Node ids.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<u64>,
        /// Return once the nodes are out, without waiting for the data to move.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (exit 1); 0 waits as long as it takes.
        #[arg(long, default_value_t = 0, value_name = "SECONDS")]
        timeout_s: u64,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Put drained chunk servers back into placement (data moves back to them).
    #[command(after_help = "Example:\n  cairn node in 4")]
    In {
        /// Node ids.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<u64>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Set a chunk server's placement weight (its share of data; 0 holds nothing).
    #[command(after_help = "Example:\n  cairn node weight 4 200\n\n\
        Groups move to match the new shares at once, as for a drain.")]
    Weight {
        /// Node id.
        id: u64,
        /// The new weight (a chunk server registers with its configured weight
        /// the first time; this changes it from then on).
        weight: u32,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Drop a drained, stopped chunk server from the map for good.
    #[command(after_help = "Example:\n  cairn node remove 4\n\n\
        Only a node that is out (drained), down (stopped) and in no group's acting set \
        can be removed. A chunk server that registers with the id later is a new node.")]
    Remove {
        /// Node id.
        id: u64,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

pub fn run(cmd: NodeCommand) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::List { cluster } => {
            let (client, _) = cluster.connect()?;
            let map = block_on(read_map(&client, 0, Duration::ZERO))?;
            if cluster.json {
                let nodes: Vec<_> = map.nodes.iter().map(node_json).collect();
                println!("{}", serde_json::Value::Array(nodes));
            } else {
                print!("{}", nodes_table(&map.nodes, now_unix_ms()).render());
            }
        }
        NodeCommand::Drain {
            ids,
            no_wait,
            timeout_s,
            cluster,
        } => {
            let (client, _) = cluster.connect()?;
            block_on(drain(&client, &ids, no_wait, timeout_s, cluster.json))?;
        }
        NodeCommand::In { ids, cluster } => {
            let (client, _) = cluster.connect()?;
            let epoch = block_on(async {
                client
                    .nodes_in(&ids)
                    .await
                    .with_context(|| format!("putting chunk server(s) {ids:?} back in"))
            })?;
            if cluster.json {
                println!("{}", json!({"nodes": ids, "in": true, "map_epoch": epoch}));
            } else {
                println!("chunk server(s) {ids:?} in placement (map epoch {epoch}); groups move data back to them");
            }
        }
        NodeCommand::Weight {
            id,
            weight,
            cluster,
        } => {
            let (client, _) = cluster.connect()?;
            let epoch = block_on(async {
                client
                    .set_node_weight(id, weight)
                    .await
                    .with_context(|| format!("setting chunk server {id}'s weight"))
            })?;
            if cluster.json {
                println!(
                    "{}",
                    json!({"node": id, "weight": weight, "map_epoch": epoch})
                );
            } else {
                println!("chunk server {id}: weight {weight} (map epoch {epoch})");
            }
        }
        NodeCommand::Remove { id, cluster } => {
            let (client, _) = cluster.connect()?;
            let epoch = block_on(async {
                client
                    .remove_node(id)
                    .await
                    .with_context(|| format!("removing chunk server {id}"))
            })?;
            if cluster.json {
                println!(
                    "{}",
                    json!({"node": id, "removed": true, "map_epoch": epoch})
                );
            } else {
                println!("chunk server {id} removed from the map (map epoch {epoch})");
            }
        }
    }
    Ok(())
}

/// The cluster map, once newer than `newer_than` or after `wait`.
async fn read_map(
    client: &VolmgrClient,
    newer_than: u64,
    wait: Duration,
) -> anyhow::Result<ClusterMap> {
    client
        .get_map(newer_than, wait)
        .await
        .context("reading the cluster map")
}

/// Where a drain stands in one map: groups that still list a drained node
/// in their acting set, and groups whose acting set lacks a member of their
/// placement (data on its way, whatever the cause).
#[derive(Debug, Default, PartialEq, Eq)]
struct DrainState {
    holding: usize,
    moving: usize,
    /// Groups that hold a drained node which is down and their last
    /// replica: they wait for it to come back.
    stuck: usize,
}

fn drain_state(map: &ClusterMap, ids: &[u64]) -> DrainState {
    let view = group_map(map);
    let mut st = DrainState::default();
    for g in view.groups.values() {
        if g.acting.iter().any(|n| ids.contains(n)) {
            st.holding += 1;
            if g.acting.len() == 1 && view.up_since(g.acting[0]).is_none() {
                st.stuck += 1;
            }
        }
        if g.placement.iter().any(|n| !g.acting.contains(n)) {
            st.moving += 1;
        }
    }
    st
}

/// One line about a drain: a progress line or the result.
struct DrainReport<'a> {
    ids: &'a [u64],
    /// Groups that held the nodes when the drain began.
    total: usize,
    now: &'a DrainState,
    /// The map epoch that took the nodes out.
    out_epoch: u64,
    elapsed: Duration,
}

impl DrainReport<'_> {
    /// No group holds the nodes any more.
    fn done(&self) -> bool {
        self.now.holding == 0
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "nodes": self.ids,
            "done": self.done(),
            "out_epoch": self.out_epoch,
            "groups_total": self.total,
            "groups_left": self.now.holding,
            "groups_moving": self.now.moving,
            "groups_waiting_for_down_node": self.now.stuck,
            "elapsed_s": (self.elapsed.as_secs_f64() * 10.0).round() / 10.0,
        })
    }

    fn text(&self) -> String {
        let stuck = if self.now.stuck > 0 {
            format!(
                ", {} waiting for a down node that holds their only copy",
                self.now.stuck
            )
        } else {
            String::new()
        };
        let head = if self.done() {
            "drained: no group holds"
        } else {
            "draining"
        };
        format!(
            "{head} chunk server(s) {:?}: {} of {} group(s) left ({} moving{stuck}), {:.0} s",
            self.ids,
            self.now.holding,
            self.total,
            self.now.moving,
            self.elapsed.as_secs_f64()
        )
    }

    /// The result, on stdout.
    fn print(&self, json: bool) {
        if json {
            println!("{}", self.json());
        } else {
            println!("{}", self.text());
        }
    }

    /// A progress line, on stderr.
    fn progress(&self, json: bool) {
        let line = if json {
            json!({ "progress": self.json() }).to_string()
        } else {
            self.text()
        };
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}

async fn drain(
    client: &VolmgrClient,
    ids: &[u64],
    no_wait: bool,
    timeout_s: u64,
    json: bool,
) -> anyhow::Result<()> {
    let out_epoch = client
        .nodes_out(ids)
        .await
        .with_context(|| format!("taking chunk server(s) {ids:?} out of placement"))?;
    let started = Instant::now();
    let mut map = read_map(client, out_epoch.saturating_sub(1), PROGRESS_EVERY).await?;
    let total = drain_state(&map, ids).holding;
    let deadline = (timeout_s > 0).then(|| started + Duration::from_secs(timeout_s));
    let mut last_shown = Instant::now();
    loop {
        let now = drain_state(&map, ids);
        let report = DrainReport {
            ids,
            total,
            now: &now,
            out_epoch,
            elapsed: started.elapsed(),
        };
        if report.done() || no_wait {
            report.print(json);
            return Ok(());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            report.print(json);
            anyhow::bail!(
                "chunk server(s) {ids:?} are out of placement, but {} group(s) still hold them \
                 after {timeout_s} s; the drain goes on (run `cairn node drain` again to watch)",
                now.holding
            );
        }
        if last_shown.elapsed() >= PROGRESS_EVERY {
            last_shown = Instant::now();
            report.progress(json);
        }
        // Wake on the next map, or in time for the next progress line.
        map = read_map(client, map.epoch, PROGRESS_EVERY).await?;
    }
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
