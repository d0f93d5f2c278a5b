//! `cairn volmgr`: the volume manager's raft membership. `members` lists
//! the members and the leader; `add-member` adds one (a new member started
//! empty with `cairn-volmgr --join` first); `remove-member` takes one out
//! (stop its process afterwards). Changes go through the leader and raft, one
//! at a time.

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;

use crate::config::{block_on, ClusterArgs};
use crate::table::{Align, Table};

#[derive(Subcommand)]
pub enum VolmgrCommand {
    /// List the volume manager members and which one leads.
    #[command(after_help = "Example:\n  cairn volmgr members --json")]
    Members {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Add a member: start it first, empty, with `cairn-volmgr --join`.
    #[command(after_help = "Example, a fourth member on host D:\n  \
        (on D)  cairn-volmgr --data-dir /var/lib/cairn/volmgr --cluster-id pacs-prod \\\n  \
                    --member-id 4 --listen 10.0.0.14:7400 --join\n  \
        cairn volmgr add-member 4 10.0.0.14:7400\n\n\
        Keep 3 or 5 members: an even count tolerates no more failures than one less.")]
    AddMember {
        /// The new member's id (unique, never reused).
        id: u64,
        /// Its address, as it listens (ADDR:PORT).
        addr: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Remove a member from the raft group; stop its process afterwards.
    #[command(after_help = "Example:\n  cairn volmgr remove-member 1")]
    RemoveMember {
        /// The member's id.
        id: u64,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

pub fn run(cmd: VolmgrCommand) -> anyhow::Result<()> {
    match cmd {
        VolmgrCommand::Members { cluster } => members(&cluster),
        VolmgrCommand::AddMember { id, addr, cluster } => {
            if !addr.contains(':') {
                return Err(crate::exit::usage(format!(
                    "`{addr}` is not an address (ADDR:PORT, e.g. 10.0.0.14:7400)"
                )));
            }
            let (client, _) = cluster.connect()?;
            block_on(async {
                client
                    .add_member(id, &addr)
                    .await
                    .with_context(|| format!("adding volume manager member {id} at {addr}"))
            })?;
            if !cluster.json {
                println!("added member {id} ({addr})");
            }
            members(&cluster)
        }
        VolmgrCommand::RemoveMember { id, cluster } => {
            let (client, _) = cluster.connect()?;
            block_on(async {
                client
                    .remove_member(id)
                    .await
                    .with_context(|| format!("removing volume manager member {id}"))
            })?;
            if !cluster.json {
                println!("removed member {id}; stop its process now");
            }
            members(&cluster)
        }
    }
}

fn members(cluster: &ClusterArgs) -> anyhow::Result<()> {
    let (client, _) = cluster.connect()?;
    let status = block_on(async {
        client
            .cluster_status()
            .await
            .context("asking the volume manager for its members")
    })?;
    if cluster.json {
        let rows: Vec<_> = status
            .members
            .iter()
            .map(|m| json!({ "id": m.id, "addr": m.addr, "leader": m.id == status.leader_id }))
            .collect();
        println!(
            "{}",
            json!({ "leader_id": status.leader_id, "term": status.term, "members": rows })
        );
    } else {
        let mut t = Table::new(&[
            ("ID", Align::Right),
            ("ADDRESS", Align::Left),
            ("ROLE", Align::Left),
        ]);
        for m in &status.members {
            t.row(vec![
                m.id.to_string(),
                m.addr.clone(),
                if m.id == status.leader_id {
                    format!("leader (term {})", status.term)
                } else {
                    "follower".into()
                },
            ]);
        }
        print!("{}", t.render());
    }
    Ok(())
}
