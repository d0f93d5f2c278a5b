//! `cairn volume`: create, list, inspect, grow and delete volumes at the
//! volume manager, roll them back to a snapshot and clone them from one
//! (snapshots themselves are `cairn snapshot`, `snapshot.rs`). The cluster
//! is found as `config.rs` describes.

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::json;

use cairn_proto::map::VolumeInfo;
use cairn_proto::volmgr::VolmgrStatus;
use cairn_volmgr::client::VolmgrClient;

use crate::config::{block_on, ClusterArgs};
use crate::exit;
use crate::output::bytes_human;
use crate::snapshot::{pause_human, snapshot_json};
use crate::table::{ago, now_unix_ms, utc, Align, Table};

const SIZE_HELP: &str = "Size with a binary unit: K, M, G, T, P (KiB, MiB, ...; 10G, 10GiB and 10GB are all 10 GiB), or bytes";

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Create a thin volume (it takes no space until written).
    #[command(after_help = "Examples:\n  \
        cairn volume create pacs-db --size 100G\n  \
        cairn volume create scratch --size 512M --replicas 2 --min-replicas 1\n  \
        cairn volume create pacs-db --size 2T --volmgr 10.0.0.1:7400,10.0.0.2:7400 --cluster-id pacs-1\n\n\
        Sizes use binary units: 1G is 1024^3 bytes.")]
    Create {
        /// The volume's name (also its NBD export name): letters, digits, `.`, `_`, `-`.
        name: String,
        #[arg(long, value_parser = parse_size, help = SIZE_HELP)]
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
    /// List volumes, with the targets exporting each.
    #[command(after_help = "Examples:\n  cairn volume list\n  cairn volume list --json")]
    List {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Show everything about one volume (exit status 3 if there is none).
    #[command(
        after_help = "Examples:\n  cairn volume info pacs-db\n  cairn volume info pacs-db --json"
    )]
    Info {
        name: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Grow a volume to a new size (volumes never shrink).
    #[command(
        after_help = "Examples:\n  cairn volume resize pacs-db --size 200G\n\n\
        The new size must be at least the current one: shrinking is refused \
        (exit status 2), the same size changes nothing. Clients see the new size \
        when they reconnect."
    )]
    Resize {
        name: String,
        #[arg(long, value_parser = parse_size, help = SIZE_HELP)]
        size: u64,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Delete a volume and all its data (needs --yes).
    #[command(after_help = "Examples:\n  cairn volume delete scratch --yes\n  \
        cairn volume delete scratch --yes --force\n\n\
        Without --yes nothing is deleted (exit status 2): deleting destroys the data, \
        so it must never be a typo away. While a target exports the volume, the \
        volume manager refuses; --force deletes it anyway.")]
    Delete {
        name: String,
        /// Really delete: the data is gone afterwards.
        #[arg(long)]
        yes: bool,
        /// Delete even while a target exports the volume.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Roll a volume back to one of its snapshots (what it holds now is kept as a snapshot).
    #[command(after_help = "Examples:\n  \
        cairn volume rollback pacs-db before-upgrade\n  \
        cairn volume rollback pacs-db before-upgrade --keep-as broken-upgrade\n  \
        cairn volume rollback pacs-db before-upgrade --force\n\n\
        The volume's current content is first kept as a snapshot of its own (named \
        --keep-as, or before-rollback-<SNAPSHOT>-<n>), so a rollback can always be undone \
        by rolling back to that one. The volume takes the snapshot's size. While a target \
        exports the volume the rollback is refused (its clients would see their disk \
        change under them); with --force the targets pause their writes, the rollback \
        happens, and they disconnect their clients.")]
    Rollback {
        /// The volume.
        volume: String,
        /// The snapshot to roll back to.
        snapshot: String,
        /// Roll back even while a target exports the volume (its clients are disconnected).
        #[arg(long)]
        force: bool,
        /// Name for the snapshot the current content is kept as [default: before-rollback-<SNAPSHOT>-<n>].
        #[arg(long, value_name = "NAME")]
        keep_as: Option<String>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Create a new volume from a snapshot of another (constant time; shares unchanged data).
    #[command(after_help = "Examples:\n  \
        cairn volume clone pacs-db@nightly pacs-db-test\n  \
        cairn volume clone pacs-db@nightly pacs-db-test --json\n\n\
        The clone has the snapshot's size and the source's extent size and replicas, \
        and is exported under its own name like any volume. It starts with the \
        snapshot's data, stored once for both: only blocks written to either afterwards \
        take new space. The snapshot, and even the source volume, may be deleted while \
        clones of it exist.")]
    Clone {
        /// The source, as VOLUME@SNAPSHOT.
        #[arg(value_name = "VOLUME@SNAPSHOT", value_parser = parse_at)]
        source: (String, String),
        /// The new volume's name.
        name: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Read every copy of every written block, compare them and replace bad copies.
    #[command(after_help = "Examples:\n  \
        cairn volume scrub pacs-db\n  \
        cairn volume scrub pacs-db --snapshots --rate 50M\n  \
        cairn volume scrub pacs-db --json\n  \
        cairn volume scrub --all --snapshots --state /var/lib/cairn-scrub/state.json\n\n\
        Bit rot on cold data is found only when the data is read; a scrub reads it all \
        before a failure needs it. For each written range the group's primary reads its \
        copy (repairing it from a replica if it does not read), every in-sync replica reads \
        its own and answers a CRC32, and a copy that does not read or differs gets the \
        primary's copy pushed over it. Writes to a range wait while it is compared (at most \
        1 MiB at a time). Progress goes to stderr every 2 s (JSON lines with --json); the \
        report, to stdout, lists every copy replaced. Exit status 1 if some range could not \
        be scrubbed (no good copy could be read, or its group stayed unavailable): the \
        report names them. With --state FILE a pass that stops halfway (a reboot during a \
        scrub that takes days) goes on where it stopped when run again; the report then \
        covers what this run read. Run it from a timer (systemd/cairn-scrub.timer) to \
        check every block regularly.")]
    Scrub {
        /// The volume.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Scrub every volume, one after another.
        #[arg(long)]
        all: bool,
        /// Also scrub every frozen epoch's view: each snapshot's, and those of deleted snapshots still read through (blocks shared with the volume are read again).
        #[arg(long)]
        snapshots: bool,
        /// Pace: at most this much of each copy per second, with a binary unit (0: no limit).
        #[arg(long, default_value = "100M", value_parser = parse_size)]
        rate: u64,
        /// Keep where the pass stands in FILE: a run stopped halfway goes on from there next time (the file is removed when a pass completes).
        #[arg(long, value_name = "FILE")]
        state: Option<std::path::PathBuf>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

/// `pacs-db@nightly` -> (`pacs-db`, `nightly`).
fn parse_at(s: &str) -> Result<(String, String), String> {
    match s.split_once('@') {
        Some((v, snap)) if !v.is_empty() && !snap.is_empty() && !snap.contains('@') => {
            Ok((v.to_string(), snap.to_string()))
        }
        _ => Err(format!(
            "`{s}` is not VOLUME@SNAPSHOT (e.g. pacs-db@nightly)"
        )),
    }
}

/// `10G` -> 10 GiB. Units K, M, G, T, P, binary, optionally followed by
/// `iB` or `B` (`10GiB`, `10GB`); a bare number (or `512B`) is bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}` is not a size (examples: 512M, 10G, 2TiB; binary units)");
    let upper = s.trim().to_ascii_uppercase();
    let (body, needs_unit) = match upper.strip_suffix("IB") {
        Some(b) => (b, true),
        None => (upper.strip_suffix('B').unwrap_or(&upper), false),
    };
    let (num, shift) = match body.chars().last() {
        Some('K') => (&body[..body.len() - 1], 10),
        Some('M') => (&body[..body.len() - 1], 20),
        Some('G') => (&body[..body.len() - 1], 30),
        Some('T') => (&body[..body.len() - 1], 40),
        Some('P') => (&body[..body.len() - 1], 50),
        _ if needs_unit => return Err(bad()),
        _ => (body, 0),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

pub fn run(cmd: VolumeCommand) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Scrub {
            name,
            all: _,
            snapshots,
            rate,
            state,
            cluster,
        } => crate::scrub::run(crate::scrub::ScrubArgs {
            name,
            snapshots,
            rate,
            state,
            cluster,
        })?,
        VolumeCommand::Create {
            name,
            size,
            replicas,
            min_replicas,
            extent_size,
            cluster,
        } => {
            let (client, _) = cluster.connect()?;
            let min = min_replicas.unwrap_or(replicas.saturating_sub(1).max(1));
            let extent = u32::try_from(extent_size)
                .map_err(|_| exit::usage(format!("extent size {extent_size} is too large")))?;
            let v = block_on(async {
                client
                    .create_volume(&name, size, extent, replicas, min)
                    .await
                    .with_context(|| format!("creating volume {name:?}"))
            })?;
            if cluster.json {
                println!("{}", volume_json(&v, None));
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
            let (client, _) = cluster.connect()?;
            let vols = block_on(list_with_exports(&client))?;
            if cluster.json {
                let v: Vec<_> = vols.iter().map(|(v, e)| volume_json(v, Some(e))).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                let mut t = Table::new(&[
                    ("NAME", Align::Left),
                    ("ID", Align::Right),
                    ("SIZE", Align::Right),
                    ("REPLICAS", Align::Right),
                    ("MIN", Align::Right),
                    ("EXTENT", Align::Right),
                    ("EXPORTED BY", Align::Left),
                ]);
                for (v, exports) in &vols {
                    t.row(vec![
                        v.name.clone(),
                        format!("{:#x}", v.id),
                        bytes_human(v.size_bytes),
                        v.replicas.to_string(),
                        v.min_replicas.to_string(),
                        bytes_human(u64::from(v.extent_size_bytes)),
                        targets_human(exports),
                    ]);
                }
                t.print()?;
            }
        }
        VolumeCommand::Info { name, cluster } => {
            let (client, found) = cluster.connect()?;
            let (v, exports, parent, space) = block_on(async {
                let v = get_volume(&client, &name).await?;
                let exports = client
                    .volume_exports(&name)
                    .await
                    .with_context(|| format!("exports of volume {name:?}"))?;
                let parent = match v.parent {
                    Some(p) => Some(parent_names(&client, p).await?),
                    None => None,
                };
                let space = volume_space(&client, &found.config, &v).await;
                Ok((v, exports, parent, space))
            })?;
            if cluster.json {
                let mut j = volume_json(&v, Some(&exports));
                if let Some((volume, snapshot)) = &parent {
                    j["parent"]["volume_name"] = json!(volume);
                    j["parent"]["snapshot_name"] = json!(snapshot);
                }
                j["space"] = match &space {
                    Ok(sp) => json!({
                        "allocated_bytes": sp.allocated_bytes,
                        "snapshot_only_bytes": sp
                            .snapshot_only_bytes
                            .iter()
                            .map(|(n, b)| json!({"name": n, "bytes": b}))
                            .collect::<Vec<_>>(),
                    }),
                    Err(e) => json!({ "error": e }),
                };
                println!("{j}");
            } else {
                print!(
                    "{}",
                    info_human(&v, &exports, parent.as_ref(), now_unix_ms())
                );
                print!("{}", space_human(&v, &space));
            }
        }
        VolumeCommand::Resize {
            name,
            size,
            cluster,
        } => {
            let (client, _) = cluster.connect()?;
            let (before, after) = block_on(async {
                let before = get_volume(&client, &name).await?;
                if size < before.size_bytes {
                    return Err(exit::usage(format!(
                        "volume {name:?} is {} ({} bytes); shrinking it to {} ({size} bytes) is not supported: volumes only grow",
                        bytes_human(before.size_bytes),
                        before.size_bytes,
                        bytes_human(size),
                    )));
                }
                if size == before.size_bytes {
                    return Ok((before.clone(), before));
                }
                let after = client
                    .grow_volume(&name, size)
                    .await
                    .with_context(|| format!("growing volume {name:?} to {}", bytes_human(size)))?;
                Ok((before, after))
            })?;
            if cluster.json {
                let mut j = volume_json(&after, None);
                j["previous_size_bytes"] = json!(before.size_bytes);
                println!("{j}");
            } else if before.size_bytes == after.size_bytes {
                println!(
                    "volume {name} is already {}; nothing changed",
                    bytes_human(after.size_bytes)
                );
            } else {
                println!(
                    "volume {name} grown from {} to {}",
                    bytes_human(before.size_bytes),
                    bytes_human(after.size_bytes)
                );
            }
        }
        VolumeCommand::Delete {
            name,
            yes,
            force,
            cluster,
        } => {
            if !yes {
                return Err(exit::usage(format!(
                    "not deleting volume {name:?}: deleting destroys its data; \
                     run `cairn volume delete {name} --yes` if you mean it"
                )));
            }
            let (client, _) = cluster.connect()?;
            block_on(async {
                client
                    .delete_volume(&name, force)
                    .await
                    .with_context(|| format!("deleting volume {name:?}"))
            })?;
            if cluster.json {
                println!("{}", json!({ "deleted": name, "forced": force }));
            } else {
                println!("deleted volume {name}");
            }
        }
        VolumeCommand::Rollback {
            volume,
            snapshot,
            force,
            keep_as,
            cluster,
        } => {
            let (client, _) = cluster.connect()?;
            let r = block_on(async {
                client
                    .rollback_volume(&volume, &snapshot, keep_as.as_deref().unwrap_or(""), force)
                    .await
                    .with_context(|| {
                        format!("rolling volume {volume:?} back to snapshot {snapshot:?}")
                    })
            })?;
            if cluster.json {
                println!(
                    "{}",
                    json!({
                        "volume": volume_json(&r.volume, None),
                        "rolled_back_to": snapshot,
                        "kept_as": snapshot_json(&r.snapshot),
                        "pause_ms": r.pause_ms,
                    })
                );
            } else {
                println!(
                    "rolled volume {volume} back to snapshot {snapshot} ({}); its previous \
                     content is kept as snapshot {} (undo: cairn volume rollback {volume} {}); {}",
                    bytes_human(r.volume.size_bytes),
                    r.snapshot.name,
                    r.snapshot.name,
                    pause_human(r.pause_ms)
                );
            }
        }
        VolumeCommand::Clone {
            source: (volume, snapshot),
            name,
            cluster,
        } => {
            let (client, _) = cluster.connect()?;
            let r = block_on(async {
                client
                    .clone_volume(&volume, &snapshot, &name)
                    .await
                    .with_context(|| format!("cloning {volume}@{snapshot} as volume {name:?}"))
            })?;
            if cluster.json {
                println!("{}", volume_json(&r.volume, None));
            } else {
                println!(
                    "created volume {} ({}, {} replicas, min {}), id {:#x}, as a clone of {volume}@{snapshot}",
                    r.volume.name,
                    bytes_human(r.volume.size_bytes),
                    r.volume.replicas,
                    r.volume.min_replicas,
                    r.volume.id
                );
            }
        }
    }
    Ok(())
}

/// A clone's parent by name: (volume, snapshot), each `None` once deleted.
type ParentNames = (Option<String>, Option<String>);

/// The names behind a clone's parent reference (the volume may have been
/// deleted, or only the snapshot).
async fn parent_names(
    client: &VolmgrClient,
    parent: cairn_proto::map::SnapshotRef,
) -> anyhow::Result<ParentNames> {
    let volumes = client.list_volumes().await.context("listing volumes")?;
    let Some(v) = volumes.iter().find(|v| v.id == parent.volume_id) else {
        return Ok((None, None));
    };
    let snapshot = v
        .snapshots
        .iter()
        .find(|s| s.id == parent.snapshot_id)
        .map(|s| s.name.clone());
    Ok((Some(v.name.clone()), snapshot))
}

/// The volume `name`; not found (exit status 3) if there is none.
pub async fn get_volume(client: &VolmgrClient, name: &str) -> anyhow::Result<VolumeInfo> {
    let v = client
        .get_volume(name)
        .await
        .with_context(|| format!("volume {name:?}"))?;
    if v.name != name {
        // An answer without the volume: treat it as absent.
        return Err(exit::not_found(format!("no volume named {name:?}")));
    }
    Ok(v)
}

/// Every volume with the ids of the targets exporting it now.
pub async fn list_with_exports(
    client: &VolmgrClient,
) -> anyhow::Result<Vec<(VolumeInfo, Vec<u64>)>> {
    let vols = client.list_volumes().await.context("listing volumes")?;
    let mut out = Vec::with_capacity(vols.len());
    for v in vols {
        let exports = match client.volume_exports(&v.name).await {
            Ok(e) => e,
            // Deleted between the list and now: leave it out.
            Err(e) if e.status() == Some(VolmgrStatus::NotFound) => continue,
            Err(e) => return Err(e).with_context(|| format!("exports of volume {:?}", v.name)),
        };
        out.push((v, exports));
    }
    Ok(out)
}

/// `7, 9` or `-`.
pub fn targets_human(ids: &[u64]) -> String {
    if ids.is_empty() {
        "-".into()
    } else {
        ids.iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// At most this many chain epochs are shown by `volume info` (all in JSON).
const CHAIN_SHOWN_MAX: usize = 8;

fn info_human(
    v: &VolumeInfo,
    exports: &[u64],
    parent_names: Option<&ParentNames>,
    now_ms: u64,
) -> String {
    let extents = if v.extent_size_bytes == 0 {
        0
    } else {
        v.size_bytes.div_ceil(u64::from(v.extent_size_bytes))
    };
    let parent = match (&v.parent, parent_names) {
        (None, _) => "- (not a clone)".into(),
        (Some(p), Some((Some(volume), Some(snapshot)))) => format!(
            "snapshot {snapshot} (id {}) of volume {volume} ({:#x})",
            p.snapshot_id, p.volume_id
        ),
        (Some(p), Some((Some(volume), None))) => format!(
            "deleted snapshot {} of volume {volume} ({:#x})",
            p.snapshot_id, p.volume_id
        ),
        (Some(p), Some((None, _))) => format!(
            "snapshot {} of deleted volume {:#x}",
            p.snapshot_id, p.volume_id
        ),
        (Some(p), None) => format!("snapshot {} of volume {:#x}", p.snapshot_id, p.volume_id),
    };
    let data = v.data_volume_id();
    let data_id = if data == v.id {
        format!("{data:#x} (its own)")
    } else {
        format!("{data:#x} (its source's: reads fall through to its snapshots' data)")
    };
    let chain = if v.chain.is_empty() {
        "- (nothing frozen beneath the head)".to_string()
    } else {
        let shown: Vec<String> = v
            .chain
            .iter()
            .take(CHAIN_SHOWN_MAX)
            .map(u64::to_string)
            .collect();
        let more = if v.chain.len() > CHAIN_SHOWN_MAX {
            ", ..."
        } else {
            ""
        };
        format!(
            "{}{more} ({} frozen epoch(s) beneath the head, newest first)",
            shown.join(", "),
            v.chain.len()
        )
    };
    let exported = if exports.is_empty() {
        "not exported".to_string()
    } else {
        format!("target(s) {}", targets_human(exports))
    };
    let mut out = String::new();
    for (k, val) in [
        ("name", v.name.clone()),
        ("id", format!("{:#x} ({})", v.id, v.id)),
        (
            "size",
            format!("{} ({} bytes)", bytes_human(v.size_bytes), v.size_bytes),
        ),
        (
            "extent size",
            format!(
                "{} ({extents} extents)",
                bytes_human(u64::from(v.extent_size_bytes))
            ),
        ),
        ("replicas", v.replicas.to_string()),
        (
            "min replicas",
            format!("{} (writes wait while fewer act)", v.min_replicas),
        ),
        (
            "created",
            format!(
                "{} ({} ago)",
                utc(v.created_unix_ms),
                ago(v.created_unix_ms, now_ms)
            ),
        ),
        ("data id", data_id),
        ("head epoch", v.head_epoch.to_string()),
        ("chain", chain),
        ("parent", parent),
        ("snapshots", v.snapshots.len().to_string()),
        ("exported by", exported),
    ] {
        out.push_str(&format!("{k:<13} {val}\n"));
    }
    for s in &v.snapshots {
        out.push_str(&format!(
            "  snapshot {} {:?}, epoch {}, {}, created {}\n",
            s.id,
            s.name,
            s.epoch,
            bytes_human(s.size_bytes),
            utc(s.created_unix_ms)
        ));
    }
    out
}

/// What the volume's blocks take on the chunk servers (per replica), asked
/// of one acting replica per group; an error (say, a chunk server down) is
/// shown instead of failing the whole `volume info`.
async fn volume_space(
    client: &VolmgrClient,
    config: &crate::config::ClusterConfig,
    v: &VolumeInfo,
) -> Result<cairn_client::Space, String> {
    let family: Vec<VolumeInfo> = client
        .list_volumes()
        .await
        .map_err(|e| format!("listing volumes: {e}"))?
        .into_iter()
        .filter(|o| o.data_volume_id() == v.data_volume_id())
        .collect();
    let cluster = cairn_client::Cluster::connect(cairn_client::ClientConfig::new(
        config.volmgr.clone(),
        config.cluster_id.clone(),
    ))
    .await
    .map_err(|e| format!("connecting to the chunk servers: {e}"))?;
    cairn_client::space(&cluster, v, &family)
        .await
        .map_err(|e| e.to_string())
}

/// The space lines of `volume info`.
fn space_human(v: &VolumeInfo, space: &Result<cairn_client::Space, String>) -> String {
    let sp = match space {
        Ok(sp) => sp,
        Err(e) => return format!("{:<13} unknown: {e}\n", "allocated"),
    };
    let mut out = format!(
        "{:<13} {} of {} (blocks written at some epoch the volume reads; per replica)\n",
        "allocated",
        bytes_human(sp.allocated_bytes),
        bytes_human(v.size_bytes)
    );
    for (name, bytes) in &sp.snapshot_only_bytes {
        out.push_str(&format!(
            "  snapshot {name:?} alone holds {} (overwritten since; no other view reads it)\n",
            bytes_human(*bytes)
        ));
    }
    out
}

/// A volume as JSON: every field of `VolumeInfo`, plus `exported_by` (ids
/// of the targets exporting it) when known.
pub fn volume_json(v: &VolumeInfo, exports: Option<&[u64]>) -> serde_json::Value {
    let mut j = json!({
        "name": v.name,
        "id": v.id,
        "size_bytes": v.size_bytes,
        "extent_size_bytes": v.extent_size_bytes,
        "replicas": v.replicas,
        "min_replicas": v.min_replicas,
        "created_unix_ms": v.created_unix_ms,
        "head_epoch": v.head_epoch,
        "data_id": v.data_volume_id(),
        "chain": v.chain,
        "last_snapshot_id": v.last_snapshot_id,
        "parent": v.parent.map(|p| json!({"volume_id": p.volume_id, "snapshot_id": p.snapshot_id})),
        "snapshots": v.snapshots.iter().map(snapshot_json).collect::<Vec<_>>(),
    });
    if let Some(e) = exports {
        j["exported_by"] = json!(e);
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10GB"), Ok(10 << 30));
        assert_eq!(parse_size("4kib"), Ok(4 << 10));
        assert_eq!(parse_size(" 2T "), Ok(2 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512B"), Ok(512));
        for bad in [
            "",
            "ten",
            "G",
            "GiB",
            "10iB",
            "10X",
            "-1G",
            "1.5G",
            "+5",
            "10 G",
            "99999999P",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert!(parse_size("1.5G").unwrap_err().contains("binary units"));
    }

    #[test]
    fn info_shows_every_field() {
        let v = VolumeInfo {
            id: 0x2a,
            name: "pacs-db".into(),
            size_bytes: 10 << 30,
            extent_size_bytes: 4 << 20,
            replicas: 3,
            min_replicas: 2,
            created_unix_ms: 1_796_492_412_000,
            head_epoch: 1,
            ..Default::default()
        };
        let text = info_human(&v, &[7, 9], None, 1_796_492_412_000 + 65_000);
        for want in [
            "pacs-db",
            "0x2a (42)",
            "10.0 GiB (10737418240 bytes)",
            "4.0 MiB (2560 extents)",
            "2026-12-05 17:40:12 UTC (1m05s ago)",
            "target(s) 7, 9",
            "0x2a (its own)",
            "nothing frozen",
            "not a clone",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        let j = volume_json(&v, Some(&[7]));
        assert_eq!(j["exported_by"], json!([7]));
        assert_eq!(j["size_bytes"], json!(10u64 << 30));
        assert_eq!(j["parent"], serde_json::Value::Null);
        assert_eq!(j["data_id"], json!(0x2a));
        assert_eq!(j["chain"], json!([]));
        assert!(info_human(&v, &[], None, 0).contains("not exported"));
    }

    #[test]
    fn info_shows_clones_chains_and_snapshots() {
        let v = VolumeInfo {
            id: 5,
            name: "copy".into(),
            size_bytes: 1 << 30,
            extent_size_bytes: 4 << 20,
            head_epoch: 40,
            data_id: 1,
            chain: (20..31).rev().collect(),
            parent: Some(cairn_proto::map::SnapshotRef {
                volume_id: 1,
                snapshot_id: 2,
            }),
            snapshots: vec![cairn_proto::map::SnapshotInfo {
                id: 1,
                name: "s".into(),
                epoch: 30,
                size_bytes: 1 << 30,
                ..Default::default()
            }],
            last_snapshot_id: 1,
            ..Default::default()
        };
        let names = (Some("pacs".to_string()), Some("gold".to_string()));
        let text = info_human(&v, &[], Some(&names), 0);
        for want in [
            "0x1 (its source's",
            "30, 29, 28, 27, 26, 25, 24, 23, ... (11 frozen epoch(s)",
            "snapshot gold (id 2) of volume pacs (0x1)",
            "snapshot 1 \"s\", epoch 30, 1.0 GiB",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        let gone = (None, None);
        assert!(info_human(&v, &[], Some(&gone), 0).contains("snapshot 2 of deleted volume 0x1"));
        let j = volume_json(&v, None);
        assert_eq!(j["data_id"], json!(1));
        assert_eq!(j["chain"][0], json!(30));
        assert_eq!(j["parent"]["snapshot_id"], json!(2));
        assert_eq!(j["snapshots"][0]["size_bytes"], json!(1u64 << 30));
    }

    #[test]
    fn clone_sources_parse() {
        assert_eq!(
            parse_at("pacs-db@nightly"),
            Ok(("pacs-db".to_string(), "nightly".to_string()))
        );
        for bad in ["pacs-db", "@x", "x@", "a@b@c", ""] {
            assert!(parse_at(bad).is_err(), "{bad:?}");
        }
        assert!(parse_at("x").unwrap_err().contains("VOLUME@SNAPSHOT"));
    }
}
