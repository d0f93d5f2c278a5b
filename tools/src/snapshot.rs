//! `cairn snapshot`: take, list and delete snapshots of a volume at the
//! volume manager. Rolling a volume back to a snapshot and cloning one are
//! `cairn volume rollback` and `cairn volume clone` (`volume.rs`); the
//! snapshot JSON and human lines they share live here.

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::json;

use cairn_proto::map::SnapshotInfo;

use crate::config::{block_on, ClusterArgs};
use crate::exit;
use crate::output::bytes_human;
use crate::table::{ago, now_unix_ms, utc, Align, Table};
use crate::volume::get_volume;

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a volume: its content now, frozen (constant time, whatever its size).
    #[command(after_help = "Examples:\n  \
        cairn snapshot create pacs-db nightly-2026-12-05\n  \
        cairn snapshot create pacs-db before-upgrade --json\n\n\
        Snapshot names follow the rules of volume names (letters, digits, `.`, `_`, `-`, \
        not starting with `-` or `.`) and are unique within the volume. While a target \
        exports the volume, its writes pause until the snapshot is taken, so the snapshot \
        holds every write acknowledged before it and none after (crash-consistent); the \
        pause is printed. A target that does not pause within 5 s makes the command fail \
        (exit status 1) and nothing is taken. Later writes to the volume copy only the \
        blocks they change.")]
    Create {
        /// The volume.
        volume: String,
        /// The new snapshot's name.
        name: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// List a volume's snapshots, oldest first (exit status 3 if there is no such volume).
    #[command(after_help = "Examples:\n  cairn snapshot list pacs-db\n  \
        cairn snapshot list pacs-db --json")]
    List {
        /// The volume.
        volume: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Delete a snapshot (needs --yes).
    #[command(
        after_help = "Examples:\n  cairn snapshot delete pacs-db nightly-2026-12-05 --yes\n\n\
        Without --yes nothing is deleted (exit status 2). Clones made from the snapshot \
        keep working: the data they read stays until nothing uses it. A snapshot that no \
        volume reads through any more (one a rollback kept, say) has its space freed by \
        the chunk servers' garbage collection; one the volume still reads through keeps \
        its blocks until merging lands (see `cairn volume info` for what each holds)."
    )]
    Delete {
        /// The volume.
        volume: String,
        /// The snapshot's name.
        name: String,
        /// Really delete: the volume can no longer be rolled back to it.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// The byte ranges that changed between two snapshots of a volume, or between a snapshot and the volume now: what an incremental backup copies.
    #[command(
        after_help = "Examples:\n  cairn snapshot diff pacs-db nightly-2026-12-04 nightly-2026-12-05\n  \
        cairn snapshot diff pacs-db nightly-2026-12-05            # against the volume now\n  \
        cairn snapshot diff pacs-db nightly-2026-12-04 nightly-2026-12-05 --json\n\n\
        Ranges are 4 KiB-aligned and merged where adjacent; a block rewritten with the same \
        bytes counts as changed. Read them from the newer side (export VOL@SNAP, or the \
        volume) to bring a copy of the older one up to date. The chunk servers are asked, \
        one replica per group; none may be down."
    )]
    Diff {
        /// The volume.
        volume: String,
        /// The older snapshot.
        from: String,
        /// The newer snapshot [default: the volume as it is now].
        to: Option<String>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

pub fn run(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create {
            volume,
            name,
            cluster,
        } => {
            let (client, _) = cluster.connect()?;
            let r = block_on(async {
                client
                    .create_snapshot(&volume, &name, std::time::Duration::ZERO)
                    .await
                    .with_context(|| format!("taking snapshot {name:?} of volume {volume:?}"))
            })?;
            if cluster.json {
                println!(
                    "{}",
                    json!({
                        "volume": r.volume.name,
                        "volume_id": r.volume.id,
                        "snapshot": snapshot_json(&r.snapshot),
                        "head_epoch": r.volume.head_epoch,
                        "pause_ms": r.pause_ms,
                    })
                );
            } else {
                println!(
                    "created snapshot {} of volume {} (id {}, epoch {}, {}); {}",
                    r.snapshot.name,
                    r.volume.name,
                    r.snapshot.id,
                    r.snapshot.epoch,
                    bytes_human(r.snapshot.size_bytes),
                    pause_human(r.pause_ms)
                );
            }
        }
        SnapshotCommand::List { volume, cluster } => {
            let (client, _) = cluster.connect()?;
            let v = block_on(get_volume(&client, &volume))?;
            if cluster.json {
                let rows: Vec<_> = v.snapshots.iter().map(snapshot_json).collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                print!("{}", list_human(&v.snapshots, now_unix_ms()));
            }
        }
        SnapshotCommand::Delete {
            volume,
            name,
            yes,
            cluster,
        } => {
            if !yes {
                return Err(exit::usage(format!(
                    "not deleting snapshot {name:?} of volume {volume:?}: the volume could no \
                     longer be rolled back to it; run `cairn snapshot delete {volume} {name} \
                     --yes` if you mean it"
                )));
            }
            let (client, _) = cluster.connect()?;
            let gone = block_on(async {
                client
                    .delete_snapshot(&volume, &name)
                    .await
                    .with_context(|| format!("deleting snapshot {name:?} of volume {volume:?}"))
            })?;
            if cluster.json {
                println!(
                    "{}",
                    json!({ "volume": volume, "deleted": snapshot_json(&gone) })
                );
            } else {
                println!("deleted snapshot {} of volume {volume}", gone.name);
            }
        }
        SnapshotCommand::Diff {
            volume,
            from,
            to,
            cluster,
        } => diff(&volume, &from, to.as_deref(), &cluster)?,
    }
    Ok(())
}

/// `cairn snapshot diff`.
fn diff(volume: &str, from: &str, to: Option<&str>, cluster: &ClusterArgs) -> anyhow::Result<()> {
    let (client, found) = cluster.connect()?;
    let (ranges, size) = block_on(async {
        let v = get_volume(&client, volume).await?;
        let view_of = |name: &str| -> anyhow::Result<(Vec<u64>, u64)> {
            let s = v.snapshot(name).ok_or_else(|| {
                exit::not_found(format!("volume {volume:?} has no snapshot {name:?}"))
            })?;
            Ok((s.view(), s.size_bytes))
        };
        let (a, a_size) = view_of(from)?;
        let (b, b_size) = match to {
            Some(name) => view_of(name)?,
            None => (v.view(), v.size_bytes),
        };
        let size = a_size.max(b_size);
        let data = cairn_client::Cluster::connect(cairn_client::ClientConfig::new(
            found.config.volmgr.clone(),
            found.config.cluster_id.clone(),
        ))
        .await
        .context("connecting to the cluster's chunk servers")?;
        let ranges = cairn_client::changed_ranges(&data, &v, &a, &b, size)
            .await
            .with_context(|| format!("comparing snapshot {from:?} of volume {volume:?}"))?;
        Ok((ranges, size))
    })?;
    let to_name = to.unwrap_or("(now)");
    let changed: u64 = ranges.iter().map(|r| r.len).sum();
    if cluster.json {
        let rows: Vec<_> = ranges
            .iter()
            .map(|r| json!({ "offset": r.offset, "length": r.len }))
            .collect();
        println!(
            "{}",
            json!({
                "volume": volume,
                "from": from,
                "to": to,
                "size_bytes": size,
                "changed_bytes": changed,
                "ranges": rows,
            })
        );
        return Ok(());
    }
    if ranges.is_empty() {
        println!("nothing changed in volume {volume} from {from} to {to_name}");
        return Ok(());
    }
    let mut t = Table::new(&[("OFFSET", Align::Right), ("LENGTH", Align::Right)]);
    for r in &ranges {
        t.row(vec![r.offset.to_string(), r.len.to_string()]);
    }
    print!("{}", t.render());
    println!(
        "{} in {} range{} changed in volume {volume} from {from} to {to_name} (of {})",
        bytes_human(changed),
        ranges.len(),
        if ranges.len() == 1 { "" } else { "s" },
        bytes_human(size)
    );
    Ok(())
}

/// `writes were paused for 12 ms` or why there was no pause.
pub fn pause_human(pause_ms: u64) -> String {
    if pause_ms == 0 {
        "no target exported it, so no writes were paused".into()
    } else {
        format!("the exporting targets paused writes for {pause_ms} ms")
    }
}

/// A snapshot as JSON: every field of `SnapshotInfo`.
pub fn snapshot_json(s: &SnapshotInfo) -> serde_json::Value {
    json!({
        "id": s.id,
        "name": s.name,
        "epoch": s.epoch,
        "chain": s.chain,
        "size_bytes": s.size_bytes,
        "created_unix_ms": s.created_unix_ms,
    })
}

/// The snapshot table (a line saying there are none instead of an empty
/// table).
fn list_human(snapshots: &[SnapshotInfo], now_ms: u64) -> String {
    if snapshots.is_empty() {
        return "no snapshots\n".into();
    }
    let mut t = Table::new(&[
        ("ID", Align::Right),
        ("NAME", Align::Left),
        ("EPOCH", Align::Right),
        ("SIZE", Align::Right),
        ("CREATED", Align::Left),
    ]);
    for s in snapshots {
        t.row(vec![
            s.id.to_string(),
            s.name.clone(),
            s.epoch.to_string(),
            bytes_human(s.size_bytes),
            format!(
                "{} ({} ago)",
                utc(s.created_unix_ms),
                ago(s.created_unix_ms, now_ms)
            ),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_list_and_print() {
        let s = SnapshotInfo {
            id: 3,
            name: "nightly".into(),
            epoch: 17,
            created_unix_ms: 1_796_492_412_000,
            chain: vec![12, 1],
            size_bytes: 10 << 30,
        };
        let text = list_human(std::slice::from_ref(&s), 1_796_492_412_000 + 65_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains("ID") && lines[0].contains("CREATED"),
            "{text}"
        );
        for want in [
            "3",
            "nightly",
            "17",
            "10.0 GiB",
            "2026-12-05 17:40:12 UTC (1m05s ago)",
        ] {
            assert!(lines[1].contains(want), "{want}: {text}");
        }
        assert_eq!(list_human(&[], 0), "no snapshots\n");
        let j = snapshot_json(&s);
        assert_eq!(j["chain"], json!([12, 1]));
        assert_eq!(j["size_bytes"], json!(10u64 << 30));
        assert!(pause_human(0).contains("no writes were paused"));
        assert!(pause_human(12).contains("12 ms"));
    }
}
