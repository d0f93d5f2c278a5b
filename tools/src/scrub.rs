//! `cairn volume scrub`: reads every copy of every written block of a
//! volume (and, with `--snapshots`, of each snapshot), compares the copies
//! and replaces the bad ones, paced, with progress on stderr. Each range is
//! done by its group's primary (`ClientOp::Scrub`, see "Scrub" in
//! ARCHITECTURE.md); this walks the volume's written extents and sums up.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;

use cairn_client::{ClientConfig, Cluster, ScrubPiece, Volume};
use cairn_proto::map::VolumeInfo;

use crate::config::{block_on, ClusterArgs};
use crate::exit;
use crate::output::bytes_human;
use crate::volume::get_volume;

/// Progress lines at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// What to scrub and how fast.
pub struct ScrubArgs {
    /// One volume, or (`None`) every volume.
    pub name: Option<String>,
    pub snapshots: bool,
    /// Bytes per second (of each copy), 0 for no limit.
    pub rate: u64,
    /// Where the pass stands, kept across runs (see [`ScrubState`]).
    pub state: Option<PathBuf>,
    pub cluster: ClusterArgs,
}

/// Where a pass stands with `--state FILE`: the views finished and the next
/// extent of the one under way, saved as the scrub goes (at most once a
/// second, and at the end of each view), so that a pass stopped halfway (a
/// reboot during a scrub of a large cluster that takes days) goes on where
/// it stopped. The file is removed once a pass is complete.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct ScrubState {
    /// Views finished in this pass, as `VOLUME_ID@EPOCH` (a snapshot moves
    /// the head to a new epoch, whose view is then scrubbed again).
    done: BTreeSet<String>,
    /// The view under way, and its next extent.
    current: Option<(String, u64)>,
}

/// A [`ScrubState`] and its file.
struct StateFile {
    path: PathBuf,
    state: ScrubState,
    saved: Option<Instant>,
}

impl StateFile {
    /// The pass recorded in `path`, or a new one.
    fn open(path: PathBuf) -> anyhow::Result<StateFile> {
        let state = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                exit::usage(format!(
                    "scrub state {} is not one (remove it to start a new pass): {e}",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ScrubState::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(StateFile {
            path,
            state,
            saved: None,
        })
    }

    /// Writes the state (a new file renamed over the old one), if `force`
    /// or a second has passed since the last time.
    fn save(&mut self, force: bool) -> anyhow::Result<()> {
        if !force
            && self
                .saved
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return Ok(());
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&self.state)?)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .with_context(|| format!("saving the scrub state to {}", self.path.display()))?;
        self.saved = Some(Instant::now());
        Ok(())
    }
}

/// One view's findings: the head, or a snapshot.
#[derive(Default)]
struct ViewReport {
    view: String,
    /// Finished by an earlier run of this pass (`--state`): not read now.
    done_before: bool,
    /// This run went on from this extent of the view (`--state`).
    resumed_from: Option<u64>,
    extents: u64,
    written_extents: u64,
    bytes: u64,
    copies_max: u32,
    pushed: Vec<serde_json::Value>,
    repaired_here: Vec<serde_json::Value>,
    silent: Vec<serde_json::Value>,
    failed: Vec<serde_json::Value>,
}

impl ViewReport {
    fn json(&self) -> serde_json::Value {
        json!({
            "view": self.view,
            "done_in_an_earlier_run": self.done_before,
            "resumed_from_extent": self.resumed_from,
            "extents": self.extents,
            "written_extents": self.written_extents,
            "bytes_per_copy": self.bytes,
            "copies": self.copies_max,
            "replica_copies_replaced": self.pushed,
            "primary_copies_repaired": self.repaired_here,
            "copies_not_compared": self.silent,
            "not_scrubbed": self.failed,
        })
    }

    fn note(&mut self, p: ScrubPiece, extent_bytes: u64) {
        let at = json!({
            "extent": p.index,
            "offset": p.index * extent_bytes + p.offset,
            "length": p.len,
        });
        match p.found {
            Ok(found) => {
                self.bytes += p.len;
                self.copies_max = self.copies_max.max(found.copies);
                if found.repaired_here {
                    self.repaired_here.push(at.clone());
                }
                for c in found.pushed {
                    let mut j = at.clone();
                    j["node"] = json!(c.node);
                    j["why"] = json!(c.why);
                    self.pushed.push(j);
                }
                for node in found.silent {
                    let mut j = at.clone();
                    j["node"] = json!(node);
                    self.silent.push(j);
                }
            }
            Err(e) => {
                let mut j = at;
                j["error"] = json!(e.to_string());
                self.failed.push(j);
            }
        }
    }

    fn human(&self) -> String {
        if self.done_before {
            return format!("{}: scrubbed by an earlier run of this pass\n", self.view);
        }
        let resumed = match self.resumed_from {
            Some(i) => format!(" (this run went on from extent {i})"),
            None => String::new(),
        };
        let mut out = format!(
            "{}: {} of {} extents written, {} per copy checked, up to {} copies compared{resumed}\n",
            self.view,
            self.written_extents,
            self.extents,
            bytes_human(self.bytes),
            self.copies_max
        );
        let line = |j: &serde_json::Value| {
            format!(
                "extent {} (volume offset {}, {} bytes)",
                j["extent"], j["offset"], j["length"]
            )
        };
        out.push_str(&format!(
            "  replica copies replaced: {}\n",
            self.pushed.len()
        ));
        for j in &self.pushed {
            out.push_str(&format!(
                "    {}: node {}: {}\n",
                line(j),
                j["node"],
                j["why"].as_str().unwrap_or_default()
            ));
        }
        out.push_str(&format!(
            "  primary copies repaired from a replica: {}\n",
            self.repaired_here.len()
        ));
        for j in &self.repaired_here {
            out.push_str(&format!("    {}\n", line(j)));
        }
        out.push_str(&format!(
            "  replica copies not compared (no answer in time): {}\n",
            self.silent.len()
        ));
        for j in &self.silent {
            out.push_str(&format!("    {}: node {}\n", line(j), j["node"]));
        }
        out.push_str(&format!("  ranges not scrubbed: {}\n", self.failed.len()));
        for j in &self.failed {
            out.push_str(&format!(
                "    {}: {}\n",
                line(j),
                j["error"].as_str().unwrap_or_default()
            ));
        }
        out
    }
}

/// Progress across every view.
struct Progress {
    json: bool,
    started: Instant,
    last: Instant,
    total: u64,
    done: u64,
    fixed: u64,
}

impl Progress {
    fn show(&mut self, name: &str, force: bool) {
        if !force && self.last.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64();
        let pct = if self.total == 0 {
            100.0
        } else {
            self.done as f64 * 100.0 / self.total as f64
        };
        let line = if self.json {
            json!({"progress": {
                "volume": name,
                "bytes_done": self.done,
                "bytes_total": self.total,
                "copies_fixed": self.fixed,
                "elapsed_s": (secs * 10.0).round() / 10.0,
            }})
            .to_string()
        } else {
            format!(
                "scrub {name}: {} of {} ({pct:.0}%), {} copies fixed, {:.0} s",
                bytes_human(self.done),
                bytes_human(self.total),
                self.fixed,
                secs
            )
        };
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}

pub fn run(args: ScrubArgs) -> anyhow::Result<()> {
    let (client, found) = args.cluster.connect()?;
    let json_out = args.cluster.json;
    let results = block_on(async {
        let volumes = match &args.name {
            Some(name) => vec![get_volume(&client, name).await?],
            None => client.list_volumes().await.context("listing volumes")?,
        };
        let cluster = Cluster::connect(ClientConfig::new(
            found.config.volmgr.clone(),
            found.config.cluster_id.clone(),
        ))
        .await
        .context("connecting to the chunk servers")?;
        let mut state = args.state.clone().map(StateFile::open).transpose()?;
        let mut results = Vec::new();
        for info in volumes {
            let reports = scrub_volume(&cluster, &info, &args, &mut state).await?;
            results.push((info.name, reports));
        }
        // The pass is complete: the next run starts a new one.
        if let Some(s) = &state {
            match std::fs::remove_file(&s.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", s.path.display())),
            }
        }
        Ok(results)
    })?;
    let failed: usize = results
        .iter()
        .flat_map(|(_, reports)| reports)
        .map(|r| r.failed.len())
        .sum();
    let one_json = |name: &str, reports: &[ViewReport]| {
        json!({
            "volume": name,
            "clean": reports.iter().all(|r| r.failed.is_empty()),
            "views": reports.iter().map(ViewReport::json).collect::<Vec<_>>(),
        })
    };
    if json_out {
        let doc = match (&args.name, results.as_slice()) {
            (Some(_), [(name, reports)]) => one_json(name, reports),
            _ => json!({
                "clean": failed == 0,
                "volumes": results.iter().map(|(n, r)| one_json(n, r)).collect::<Vec<_>>(),
            }),
        };
        println!("{doc}");
    } else {
        for (name, reports) in &results {
            println!("scrubbed volume {name}");
            for r in reports {
                print!("{}", r.human());
            }
        }
    }
    if failed > 0 {
        let _ = std::io::stdout().flush();
        // The report says which ranges; an error line would only repeat it.
        std::process::exit(i32::from(exit::FAILURE));
    }
    Ok(())
}

/// Scrubs one volume's head (and snapshots, if asked), paced, with
/// progress on stderr.
async fn scrub_volume(
    cluster: &std::sync::Arc<Cluster>,
    info: &VolumeInfo,
    args: &ScrubArgs,
    state: &mut Option<StateFile>,
) -> anyhow::Result<Vec<ViewReport>> {
    let mut views = vec![("head".to_string(), info.clone())];
    if args.snapshots {
        views.extend(frozen_views(info));
    }
    // Which extents hold data, per view, first: the total for progress.
    // With a state, views finished earlier in the pass are left out, and
    // the one under way goes on from its next extent.
    let extent_bytes = u64::from(info.extent_size_bytes);
    let mut plans = Vec::new();
    for (view, vi) in views {
        let key = format!("{:#x}@{}", vi.id, vi.head_epoch);
        let vol = cluster
            .volume(vi)
            .with_context(|| format!("opening {view} of volume {:?}", info.name))?;
        let (done_before, from) = match state.as_ref().map(|s| &s.state) {
            Some(s) if s.done.contains(&key) => (true, None),
            Some(ScrubState {
                current: Some((k, next)),
                ..
            }) if *k == key => (false, Some(*next)),
            _ => (false, None),
        };
        let mut written = if done_before {
            Vec::new()
        } else {
            written_extents(&vol).await?
        };
        let r = ViewReport {
            view,
            done_before,
            resumed_from: from,
            extents: vol.size().div_ceil(extent_bytes),
            written_extents: written.len() as u64,
            ..Default::default()
        };
        if let Some(next) = from {
            written.retain(|i| *i >= next);
        }
        plans.push((r, key, vol, written));
    }
    let now = Instant::now();
    let mut progress = Progress {
        json: args.cluster.json,
        started: now,
        last: now,
        total: plans
            .iter()
            .map(|(_, _, _, w)| w.len() as u64 * extent_bytes)
            .sum(),
        done: 0,
        fixed: 0,
    };
    let mut reports = Vec::new();
    for (mut r, key, vol, written) in plans {
        if r.done_before {
            reports.push(r);
            continue;
        }
        for index in written {
            let fixed_before = r.pushed.len() + r.repaired_here.len();
            for p in vol.scrub_extent(index).await? {
                r.note(p, extent_bytes);
            }
            if let Some(s) = state.as_mut() {
                s.state.current = Some((key.clone(), index + 1));
                s.save(false)?;
            }
            progress.done += extent_bytes;
            progress.fixed += (r.pushed.len() + r.repaired_here.len() - fixed_before) as u64;
            progress.show(&info.name, false);
            // Pace: never ahead of `rate` bytes a second.
            if args.rate > 0 {
                let due = Duration::from_secs_f64(progress.done as f64 / args.rate as f64);
                let spent = progress.started.elapsed();
                if due > spent {
                    tokio::time::sleep(due - spent).await;
                }
            }
        }
        if let Some(s) = state.as_mut() {
            s.state.done.insert(key);
            s.state.current = None;
            s.save(true)?;
        }
        reports.push(r);
    }
    progress.show(&info.name, true);
    Ok(reports)
}

/// Every frozen epoch the volume's views read, as a view of its own, newest
/// first: each snapshot's, and the hidden epochs of deleted snapshots that
/// the head or a snapshot still reads through (a clone's chain holds its
/// source's). A scrub reads through the chain and repairs into the version
/// it reads, so a bad block in a version beneath is replaced in that
/// version only by a scrub of its own view: hence every epoch, not only
/// the snapshots'.
fn frozen_views(info: &VolumeInfo) -> Vec<(String, VolumeInfo)> {
    use std::collections::BTreeMap;
    // epoch -> (view, record name, size, the chain beneath it)
    let mut epochs: BTreeMap<u64, (String, String, u64, Vec<u64>)> = BTreeMap::new();
    let mut add_chain = |chain: &[u64], size: u64| {
        for (i, e) in chain.iter().enumerate() {
            epochs.entry(*e).or_insert_with(|| {
                (
                    format!("hidden epoch {e}"),
                    format!("{}@epoch-{e}", info.name),
                    size,
                    chain[i + 1..].to_vec(),
                )
            });
        }
    };
    add_chain(&info.chain, info.size_bytes);
    for s in &info.snapshots {
        add_chain(&s.chain, s.size_bytes);
    }
    for s in &info.snapshots {
        epochs.insert(
            s.epoch,
            (
                format!("snapshot {}", s.name),
                format!("{}@{}", info.name, s.name),
                s.size_bytes,
                s.chain.clone(),
            ),
        );
    }
    epochs
        .into_iter()
        .rev()
        .map(|(epoch, (view, name, size, chain))| {
            (view, info.frozen_view(name, epoch, chain, size))
        })
        .collect()
}

/// The extents of the view that some acting replica stores (or whose state
/// is unknown: those are scrubbed too), in order.
async fn written_extents(vol: &Volume) -> anyhow::Result<Vec<u64>> {
    let extent_bytes = u64::from(vol.info().extent_size_bytes);
    let extents = vol.size().div_ceil(extent_bytes);
    let mut out = Vec::new();
    let mut first = 0;
    while first < extents {
        let a = vol
            .allocation(first, cairn_client::ALLOCATION_EXTENTS_MAX)
            .await
            .with_context(|| format!("listing the written extents of {}", vol.name()))?;
        for (i, s) in a.state.iter().enumerate() {
            if *s != Some(false) {
                out.push(a.first + i as u64);
            }
        }
        if a.empty_beyond {
            break;
        }
        first = a.first + a.state.len() as u64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_proto::map::SnapshotInfo;

    /// Snapshots, the hidden epochs of deleted ones beneath the head, and
    /// those beneath a snapshot off the head's chain (kept by a rollback):
    /// every one a view, newest first, each over the chain beneath it.
    #[test]
    fn every_frozen_epoch_is_a_view_of_its_own() {
        let snap = |name: &str, epoch, chain: Vec<u64>| SnapshotInfo {
            name: name.into(),
            epoch,
            chain,
            size_bytes: 1 << 30,
            ..Default::default()
        };
        let info = VolumeInfo {
            name: "pacs".into(),
            size_bytes: 2 << 30,
            head_epoch: 9,
            chain: vec![5, 3, 1],
            snapshots: vec![snap("nightly", 3, vec![1]), snap("kept", 7, vec![6, 3, 1])],
            ..Default::default()
        };
        let views: Vec<(String, String, u64, Vec<u64>, u64)> = frozen_views(&info)
            .into_iter()
            .map(|(v, i)| (v, i.name, i.head_epoch, i.chain, i.size_bytes))
            .collect();
        let g = 1 << 30;
        assert_eq!(
            views,
            vec![
                (
                    "snapshot kept".into(),
                    "pacs@kept".into(),
                    7,
                    vec![6, 3, 1],
                    g
                ),
                (
                    "hidden epoch 6".into(),
                    "pacs@epoch-6".into(),
                    6,
                    vec![3, 1],
                    g
                ),
                (
                    "hidden epoch 5".into(),
                    "pacs@epoch-5".into(),
                    5,
                    vec![3, 1],
                    2 * g
                ),
                (
                    "snapshot nightly".into(),
                    "pacs@nightly".into(),
                    3,
                    vec![1],
                    g
                ),
                (
                    "hidden epoch 1".into(),
                    "pacs@epoch-1".into(),
                    1,
                    vec![],
                    2 * g
                ),
            ]
        );
    }
}
