//! A whole replicated cluster as real processes: one volume manager member
//! and chunk servers on 127.0.0.2, .3, .4 ... (one host each), with a fast
//! failure detector so failover tests take seconds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_chunkserver::rpc::ChunkClient;
use cairn_proto::map::ClusterMap;
use cairn_proto::volmgr::VolmgrStatus;
use cairn_volmgr::client::VolmgrClient;

use crate::volmgr::VolmgrCluster;
use crate::{ChunkServerOptions, ChunkServerProcess};

/// Heartbeat period the test clusters use.
pub const HEARTBEAT_MS: u64 = 200;
/// Silence after which a chunk server is marked down.
pub const DOWN_AFTER_MS: u64 = 1000;
/// The chunk servers' garbage collection period in these tests.
pub const GC_INTERVAL_MS: u64 = 1000;

pub struct ReplicatedCluster {
    pub volmgr: VolmgrCluster,
    /// Index i holds node id i + 1.
    pub servers: Vec<ChunkServerProcess>,
}

impl ReplicatedCluster {
    /// Starts a volume manager and `nodes` chunk servers and waits until all
    /// are registered and up.
    pub async fn start(nodes: u64) -> anyhow::Result<Self> {
        Self::start_with(nodes, 1).await
    }

    /// As [`Self::start`], with a volume manager of `members` raft members.
    pub async fn start_with(nodes: u64, members: u64) -> anyhow::Result<Self> {
        let volmgr = VolmgrCluster::start(
            members,
            &[
                "--heartbeat-interval-ms",
                &HEARTBEAT_MS.to_string(),
                "--down-after-ms",
                &DOWN_AFTER_MS.to_string(),
            ],
        )?;
        let addrs = volmgr.addrs().join(",");
        let mut servers = Vec::new();
        for id in 1..=nodes {
            servers.push(ChunkServerProcess::start(ChunkServerOptions {
                cluster_id: volmgr.cluster_id.clone(),
                node_id: id,
                listen_ip: Ipv4Addr::new(127, 0, 0, 1 + id as u8),
                extra_args: vec![
                    "--volmgr".into(),
                    addrs.clone(),
                    "--host".into(),
                    format!("h{id}"),
                    // Garbage collection every second: every process test
                    // runs with it, so a collector that deleted data anyone
                    // reads would fail them.
                    "--gc-interval-ms".into(),
                    GC_INTERVAL_MS.to_string(),
                ],
                ..ChunkServerOptions::default()
            })?);
        }
        let c = ReplicatedCluster { volmgr, servers };
        c.wait_map(
            "every chunk server registered and up",
            Duration::from_secs(30),
            |m| m.nodes.len() == nodes as usize && m.nodes.iter().all(|n| n.up),
        )
        .await?;
        Ok(c)
    }

    pub fn client(&self) -> VolmgrClient {
        self.volmgr.client()
    }

    pub async fn map(&self) -> anyhow::Result<ClusterMap> {
        Ok(self.client().get_map(0, Duration::ZERO).await?)
    }

    /// Waits until the map satisfies `ok`; returns that map.
    pub async fn wait_map(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&ClusterMap) -> bool,
    ) -> anyhow::Result<ClusterMap> {
        let client = self.client();
        let t0 = Instant::now();
        // A volume manager without a leader for longer than one request's
        // deadline (members killed in turn) is waited out too, within
        // `timeout`, and said so.
        let get = |known: u64, wait: Duration| {
            let client = &client;
            async move {
                loop {
                    match client.get_map(known, wait).await {
                        Ok(m) => return Ok(m),
                        Err(e) if t0.elapsed() < timeout => {
                            eprintln!(
                                "{what}: no map from the volume manager after {:?}: {e}",
                                t0.elapsed()
                            );
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(anyhow::Error::from(e)),
                    }
                }
            }
        };
        let mut map = get(0, Duration::ZERO).await?;
        while !ok(&map) {
            if t0.elapsed() > timeout {
                bail!("{what}: not reached within {timeout:?}; map epoch {}: nodes {:?}, degraded groups {}", map.epoch,
                    map.nodes.iter().map(|n| (n.id, n.up)).collect::<Vec<_>>(),
                    map.degraded_groups());
            }
            map = get(map.epoch, Duration::from_millis(500)).await?;
        }
        Ok(map)
    }

    /// Waits until every node is up and every group acts with all its
    /// replicas (everything rejoined; the test clusters have at least as
    /// many nodes as replicas).
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<ClusterMap> {
        self.wait_map("cluster healthy", timeout, |m| {
            m.nodes.iter().all(|n| n.up) && !m.groups.is_empty() && m.degraded_groups() == 0
        })
        .await
    }

    /// The node serving as primary of the group holding `extent` of
    /// `volume` (the first acting replica).
    pub fn primary_of(map: &ClusterMap, replicas: u32, volume: u64, extent: u64) -> Option<u64> {
        let index = cairn_placement::group_of(volume, extent, map.group_count).ok()?;
        let g =
            cairn_proto::groupmap::group_record(map, cairn_group::GroupKey { replicas, index })?;
        g.acting.first().copied()
    }

    /// Reads every stored extent of `volume` on every chunk server and
    /// checks that all replicas of each extent hold the same bytes (an
    /// extent a replica does not store counts as zeros, which is what it
    /// reads as). Each version is read through the epochs beneath it (as
    /// the volume manager names them), so versions compare as what a view
    /// reads: a rejoin's push writes a version's blocks as held where the
    /// primary reads some of them through. Versions at dead epochs (deleted
    /// snapshots no view reads through any more, folded ones) are skipped:
    /// each node's collector deletes them in its own time. Returns the
    /// number of extent versions compared.
    pub async fn compare_replicas(&self, volume: u64, vol_replicas: u32) -> anyhow::Result<usize> {
        let map = self.map().await?;
        let volmgr = self.client();
        let mut clients: BTreeMap<u64, ChunkClient> = BTreeMap::new();
        // Every version any node stores: (index, epoch) -> extent bytes.
        let mut versions: BTreeMap<(u64, u64), u32> = BTreeMap::new();
        for (i, s) in self.servers.iter().enumerate() {
            let node = i as u64 + 1;
            let c = ChunkClient::connect(s.addr())
                .await
                .with_context(|| format!("connecting to node {node}"))?;
            let mut after = None;
            loop {
                let page = c.extent_list(Some(volume), after, 0).await?;
                for e in &page.extents {
                    let key = e.key.context("listed extent without key")?;
                    versions.insert((key.extent_index, key.epoch), e.extent_bytes);
                    after = Some(key);
                }
                if !page.more {
                    break;
                }
            }
            clients.insert(node, c);
        }
        let dead_before = dead_epochs(&volmgr, volume).await?;
        let mut compared = 0;
        for (&(index, epoch), &extent_bytes) in &versions {
            if dead_before.contains(&epoch) {
                continue;
            }
            let below = match volmgr.epoch_chain(volume, epoch).await {
                Ok(c) => c,
                Err(e) if e.status() == Some(VolmgrStatus::NotFound) => Vec::new(),
                Err(e) => bail!("the chain beneath epoch {epoch}: {e}"),
            };
            let group = cairn_placement::group_of(volume, index, map.group_count)?;
            let holders: BTreeSet<u64> = cairn_proto::groupmap::group_record(
                &map,
                cairn_group::GroupKey {
                    replicas: vol_replicas,
                    index: group,
                },
            )
            .map(|g| g.acting.iter().copied().collect())
            .unwrap_or_default();
            let key = cairn_proto::chunk::ExtentKey {
                volume_id: volume,
                extent_index: index,
                epoch,
            };
            let mut crcs: BTreeMap<u64, u32> = BTreeMap::new();
            for node in &holders {
                let c = clients
                    .get(node)
                    .with_context(|| format!("node {node} acts but is not among the servers"))?;
                let mut crc = crc32fast::Hasher::new();
                let mut at = 0u64;
                while at < extent_bytes as u64 {
                    let len = (extent_bytes as u64 - at).min(4 << 20) as u32;
                    let data = c
                        .read_through(key, &below, extent_bytes, at, len)
                        .await
                        .with_context(|| {
                            format!("reading extent {index} epoch {epoch} on node {node}")
                        })?;
                    crc.update(&data);
                    at += len as u64;
                }
                crcs.insert(*node, crc.finalize());
            }
            let distinct: BTreeSet<u32> = crcs.values().copied().collect();
            if distinct.len() > 1 {
                // A fold may have finished since the listing.
                if dead_epochs(&volmgr, volume).await?.contains(&epoch) {
                    continue;
                }
                bail!("volume {volume} extent {index} epoch {epoch}: replicas differ: {crcs:?} (holders {holders:?})");
            }
            compared += 1;
        }
        Ok(compared)
    }
}

/// The dead epochs of data id `volume`.
async fn dead_epochs(volmgr: &VolmgrClient, volume: u64) -> anyhow::Result<BTreeSet<u64>> {
    let lists = volmgr
        .dead_epochs(Some(volume))
        .await
        .context("asking for the dead epochs")?;
    Ok(lists.into_iter().flat_map(|d| d.epochs).collect())
}
