//! The failure detector: which chunk servers are down, back up, or gone for
//! good, decided from heartbeats.
//!
//! Pure: the leader's loop feeds it heartbeats ([`FailureDetector::heartbeat`])
//! and the current map on a timer ([`FailureDetector::tick`]), with a
//! monotonic `now_ms` it reads itself; `tick` answers the [`Command`]s to
//! propose (`MarkDown`, `MarkOut`, `MarkUp`), each naming every node it
//! concerns, so one tick makes at most three map epochs however many nodes
//! changed. Heartbeats never go through raft (see [`crate::state::NodeStats`]).
//!
//! Only the leader runs a detector, and a new leader starts a new one at its
//! election ([`FailureDetector::new`]); followers drop theirs.
//!
//! # Rules (defaults in brackets)
//!
//! - **Down**: an up node silent for `down_after_ms` [4 s] is marked down.
//!   Silence counts from its last heartbeat to *this* detector, or from when
//!   this detector first saw it in the map (or first saw its current
//!   incarnation, `up_since`), whichever is later: a process that has just
//!   registered is not judged by its predecessor's silence. The proposal
//!   names the map epoch it judged (`NodeIds::seen_epoch`), and applying it
//!   leaves out a node that registered again since.
//!   When one node is due, every other up node silent for at least
//!   `down_after_ms` minus one heartbeat interval goes down with it:
//!   heartbeats are spread over the interval, so servers that died together
//!   (a rack losing power) would otherwise cross the line on different ticks
//!   and make one epoch each.
//! - **Grace after election**: a new detector marks nothing down for
//!   `leader_grace_ms` [8 s]. Chunk servers were heartbeating to the old
//!   leader and need time to find this one; without the grace a leader change
//!   would mark the whole cluster down at once.
//! - **Out**: a node down (in the map) for `out_after_ms` [10 min] is marked
//!   out, so its groups are re-replicated elsewhere. The clock starts when
//!   this detector proposed it down, or first saw it down (nodes already
//!   down at election, or marked down by an admin). A leader change
//!   therefore delays out by up to `out_after_ms`, never hastens it: marking
//!   out moves data, so late is the safe side. Not when the nodes left in
//!   would be fewer hosts than some group has replicas (three chunk servers
//!   on three hosts with 3-replica volumes, say): no placement could be
//!   built then, so nothing would be re-replicated and the node, once back,
//!   could never rejoin its groups; it stays down and in, its groups wait
//!   for it degraded (`ClusterMap::placeable_without`). Heartbeats do not stop the
//!   out clock; only being marked up does. Nodes out stay out until an admin
//!   marks them in (bringing one back moves data again, and should be a
//!   decision).
//! - **Up**: a down node is marked up (not registered again) after it has
//!   heartbeat steadily, every gap at most two heartbeat intervals, for the
//!   required time: `up_after_ms` [3 s] after its first fall, doubled for
//!   every further fall within `flap_window_ms` [30 min], capped at
//!   `up_after_max_ms` [5 min]. That is the anti-flap rule: a server that
//!   keeps falling over must stay up for longer and longer before it is let
//!   back, so it cannot churn the map. Measured in the tests over 10
//!   minutes: 2 s on / 5 s off makes 1 epoch (it never stays up for 3 s);
//!   5 s on / 5 s off makes 3 (119 without the doubling); 20 s on / 5 s off
//!   makes 7 (47 without).
//!
//! A proposal the detector made is not repeated while the map does not yet
//! show it, for `repropose_after_ms` [= down_after_ms]; after that it is made
//! again (raft may have dropped it). Repeats are harmless: marking a down
//! node down changes nothing.
//!
//! - **Isolation**: if every up server (two or more) is silent at once, the
//!   leader is more likely cut off than they all dead, and nothing is marked
//!   down ([`FailureDetector::suspects_isolation`]).
//! - **Leases**: the API grants a heartbeating node a read lease of
//!   `down_after_ms / 2` (see `api.rs`), except while a proposal of this
//!   detector to mark it down is in flight ([`FailureDetector::may_lease`]).
//!
//! # Bounds
//!
//! One entry per node in the map, plus heartbeats from ids the map does not
//! (yet) hold, at most [`TRACKED_MAX`] in all (more are ignored until a tick
//! drops the unknown ones); each entry remembers at most [`FALLS_REMEMBERED_MAX`]
//! falls.

use std::collections::{BTreeMap, VecDeque};

use cairn_proto::map::{ClusterMap, NodeInfo};

use crate::state::{Command, NodeIds, NODES_MAX};

/// Nodes tracked at once, the map's and unknown heartbeaters together.
pub const TRACKED_MAX: usize = 2 * NODES_MAX;
/// Falls remembered per node for the anti-flap rule; more than enough to
/// reach the cap from 3 s (7 doublings).
pub const FALLS_REMEMBERED_MAX: usize = 16;

/// Timing of the failure detector; see the module docs for each rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetectorConfig {
    /// How often chunk servers heartbeat.
    pub heartbeat_interval_ms: u64,
    /// Silence after which an up node is marked down.
    pub down_after_ms: u64,
    /// Time down after which a node is marked out.
    pub out_after_ms: u64,
    /// Steady heartbeats needed before a node that fell once is marked up.
    pub up_after_ms: u64,
    /// The most steady time ever required before marking up.
    pub up_after_max_ms: u64,
    /// Falls further back than this no longer lengthen the wait.
    pub flap_window_ms: u64,
    /// A new detector marks nothing down before this has passed.
    pub leader_grace_ms: u64,
    /// A proposal not yet visible in the map is repeated after this.
    pub repropose_after_ms: u64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self::new(1000, 4000, 600_000)
    }
}

impl DetectorConfig {
    /// The configured intervals (the daemon's `heartbeat_interval`,
    /// `down_after`, `out_after`), the rest derived: up after 3 heartbeat
    /// intervals, at most 5 minutes (or `out_after_ms`, if shorter); flap
    /// window 30 minutes; leader grace and repeat after 2 x and 1 x
    /// `down_after_ms`.
    pub fn new(heartbeat_interval_ms: u64, down_after_ms: u64, out_after_ms: u64) -> Self {
        let up_after_ms = 3 * heartbeat_interval_ms;
        Self {
            heartbeat_interval_ms,
            down_after_ms,
            out_after_ms,
            up_after_ms,
            up_after_max_ms: (300_000u64).min(out_after_ms).max(up_after_ms),
            flap_window_ms: 1_800_000,
            leader_grace_ms: 2 * down_after_ms,
            repropose_after_ms: down_after_ms,
        }
    }

    /// Longest gap between heartbeats that still counts as steady.
    fn steady_gap_ms(&self) -> u64 {
        2 * self.heartbeat_interval_ms
    }
}

/// What the detector knows of one node.
#[derive(Debug, Clone)]
struct Tracked {
    /// When this detector started watching it (first heartbeat or tick).
    watched_since_ms: u64,
    last_heartbeat_ms: Option<u64>,
    /// Start of the current steady run of heartbeats.
    run_start_ms: u64,
    /// The map's `up`, `in_` and `up_since` (the incarnation) at the last
    /// tick; `None` before the first.
    seen_up: Option<bool>,
    seen_in: Option<bool>,
    seen_up_since: Option<u64>,
    /// When this detector first saw it down in the map.
    down_since_ms: Option<u64>,
    /// When it fell (up to down in the map), oldest first.
    falls_ms: VecDeque<u64>,
    down_proposed_ms: Option<u64>,
    up_proposed_ms: Option<u64>,
    out_proposed_ms: Option<u64>,
}

impl Tracked {
    fn new(now_ms: u64) -> Self {
        Self {
            watched_since_ms: now_ms,
            last_heartbeat_ms: None,
            run_start_ms: now_ms,
            seen_up: None,
            seen_in: None,
            seen_up_since: None,
            down_since_ms: None,
            falls_ms: VecDeque::new(),
            down_proposed_ms: None,
            up_proposed_ms: None,
            out_proposed_ms: None,
        }
    }

    /// Notes what the map says now, and what changed since the last tick.
    fn observe(&mut self, node: &NodeInfo, now_ms: u64, config: &DetectorConfig) {
        let (up, in_) = (node.up, node.in_);
        if up && self.seen_up_since.is_some_and(|s| s != node.up_since) {
            // A new incarnation (the process registered again, or came back
            // up): its silence counts from now, not from its predecessor's
            // last heartbeat. A proposal to mark the predecessor down that
            // is still on its way cannot touch it (it names an older
            // `seen_epoch`), so leases need not wait for it.
            self.watched_since_ms = now_ms;
            self.down_proposed_ms = None;
        }
        self.seen_up_since = Some(node.up_since);
        match (self.seen_up, up) {
            (None, false) => self.down_since_ms = Some(now_ms),
            (Some(true), false) => {
                // It fell when this detector proposed it, if it did (and not
                // in some earlier, lost proposal), else when the map said so.
                let fell_ms = self
                    .down_proposed_ms
                    .take()
                    .filter(|&at| !proposal_due(Some(at), now_ms, config))
                    .unwrap_or(now_ms);
                self.down_since_ms = Some(fell_ms);
                if self.falls_ms.len() >= FALLS_REMEMBERED_MAX {
                    self.falls_ms.pop_front();
                }
                self.falls_ms.push_back(fell_ms);
            }
            (Some(false), true) => {
                self.down_since_ms = None;
                self.up_proposed_ms = None;
            }
            _ => {}
        }
        if self.seen_in == Some(true) && !in_ {
            self.out_proposed_ms = None;
        }
        self.seen_up = Some(up);
        self.seen_in = Some(in_);
    }
}

/// Whether a proposal made at `proposed_ms` (if any) may be made again:
/// none was made, or it is older than `repropose_after_ms`.
fn proposal_due(proposed_ms: Option<u64>, now_ms: u64, config: &DetectorConfig) -> bool {
    proposed_ms.is_none_or(|at| now_ms.saturating_sub(at) >= config.repropose_after_ms)
}

/// Steady heartbeats required before marking up a node that fell `falls`
/// times within the flap window: `up_after_ms` doubled per fall after the
/// first, capped.
fn required_up_ms(config: &DetectorConfig, falls: usize) -> u64 {
    let doublings = falls.saturating_sub(1).min(63) as u32;
    config
        .up_after_ms
        .saturating_mul(1u64 << doublings)
        .min(config.up_after_max_ms)
}

/// The leader's failure detector. See the module docs.
#[derive(Debug, Clone)]
pub struct FailureDetector {
    config: DetectorConfig,
    started_ms: u64,
    nodes: BTreeMap<u64, Tracked>,
    /// The last tick found every up server silent (see `tick`).
    isolated: bool,
}

impl FailureDetector {
    /// A detector for a leader elected at `now_ms`: every timer starts now.
    pub fn new(config: DetectorConfig, now_ms: u64) -> Self {
        Self {
            config,
            started_ms: now_ms,
            nodes: BTreeMap::new(),
            isolated: false,
        }
    }

    /// True when the last tick found every up chunk server silent at once
    /// and therefore proposed none of them down: this leader is probably
    /// cut off from them.
    pub fn suspects_isolation(&self) -> bool {
        self.isolated
    }

    /// The configuration in use.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// A heartbeat from `node_id` arrived at `now_ms`. Returns false when it
    /// was ignored because [`TRACKED_MAX`] nodes are tracked already (the
    /// API answers unknown nodes before calling this, so that means a flood).
    pub fn heartbeat(&mut self, node_id: u64, now_ms: u64) -> bool {
        if !self.nodes.contains_key(&node_id) && self.nodes.len() >= TRACKED_MAX {
            return false;
        }
        let steady_gap_ms = self.config.steady_gap_ms();
        let t = self
            .nodes
            .entry(node_id)
            .or_insert_with(|| Tracked::new(now_ms));
        let steady = t
            .last_heartbeat_ms
            .is_some_and(|last| now_ms.saturating_sub(last) <= steady_gap_ms);
        if !steady {
            t.run_start_ms = now_ms;
        }
        t.last_heartbeat_ms = Some(t.last_heartbeat_ms.map_or(now_ms, |l| l.max(now_ms)));
        true
    }

    /// Whether the API may grant `node_id` a read lease now: not while a
    /// proposal of this detector to mark it down may still be applied (the
    /// lease could then outlive the node's place in the acting sets of the
    /// map it was granted with). A proposal is settled when the map shows
    /// the node down, or, while it stays up and heartbeating, when the
    /// proposal is due for repeating (the leader's loop awaits its
    /// proposals before the next tick, so by then it was applied or lost).
    pub fn may_lease(&self, node_id: u64) -> bool {
        self.nodes
            .get(&node_id)
            .is_none_or(|t| t.down_proposed_ms.is_none())
    }

    /// The last heartbeat this detector received from `node_id`.
    pub fn last_heartbeat_ms(&self, node_id: u64) -> Option<u64> {
        self.nodes.get(&node_id).and_then(|t| t.last_heartbeat_ms)
    }

    /// How long `node_id` must now heartbeat steadily before it is marked up
    /// (grows with its recent falls).
    pub fn required_up_ms(&self, node_id: u64) -> u64 {
        self.nodes
            .get(&node_id)
            .map_or(self.config.up_after_ms, |t| {
                required_up_ms(&self.config, t.falls_ms.len())
            })
    }

    /// Compares what the detector knows with `map` at `now_ms` and returns
    /// the commands to propose: at most one `MarkDown`, one `MarkOut` and one
    /// `MarkUp`, in that order, each with node ids ascending. Call it about
    /// every heartbeat interval, with the newest applied map.
    pub fn tick(&mut self, now_ms: u64, map: &ClusterMap) -> Vec<Command> {
        self.nodes.retain(|id, _| map.node(*id).is_some());
        let config = self.config;
        let may_mark_down = now_ms >= self.started_ms.saturating_add(config.leader_grace_ms);
        let nearly_silent_ms = config
            .down_after_ms
            .saturating_sub(config.heartbeat_interval_ms);
        let (mut silent, mut out, mut up) = (Vec::new(), Vec::new(), Vec::new());
        for node in &map.nodes {
            let t = self
                .nodes
                .entry(node.id)
                .or_insert_with(|| Tracked::new(now_ms));
            t.observe(node, now_ms, &config);
            let window_start = now_ms.saturating_sub(config.flap_window_ms);
            while t.falls_ms.front().is_some_and(|&f| f < window_start) {
                t.falls_ms.pop_front();
            }
            if node.up {
                let heard_ms = t
                    .last_heartbeat_ms
                    .map_or(t.watched_since_ms, |h| h.max(t.watched_since_ms));
                let silent_ms = now_ms.saturating_sub(heard_ms);
                if silent_ms < nearly_silent_ms && proposal_due(t.down_proposed_ms, now_ms, &config)
                {
                    // Up and heard from: an old proposal to mark it down
                    // was lost (see `may_lease`).
                    t.down_proposed_ms = None;
                }
                if may_mark_down
                    && silent_ms >= nearly_silent_ms
                    && proposal_due(t.down_proposed_ms, now_ms, &config)
                {
                    silent.push((node.id, silent_ms));
                }
                continue;
            }
            let down_ms = now_ms.saturating_sub(t.down_since_ms.unwrap_or(now_ms));
            if node.in_
                && down_ms >= config.out_after_ms
                && proposal_due(t.out_proposed_ms, now_ms, &config)
            {
                // Not when the rest could not place every group: nothing
                // could be re-replicated then, and the node, once back,
                // could never be claimed into its groups again. It stays
                // in (down); its groups wait for it, degraded.
                let mut taken = out.clone();
                taken.push(node.id);
                if map.placeable_without(&taken).is_ok() {
                    t.out_proposed_ms = Some(now_ms);
                    out.push(node.id);
                }
            }
            let steady = t
                .last_heartbeat_ms
                .is_some_and(|h| now_ms.saturating_sub(h) <= config.steady_gap_ms());
            let run_ms = now_ms.saturating_sub(t.run_start_ms);
            if steady
                && run_ms >= required_up_ms(&config, t.falls_ms.len())
                && proposal_due(t.up_proposed_ms, now_ms, &config)
            {
                t.up_proposed_ms = Some(now_ms);
                up.push(node.id);
            }
        }
        // Heartbeats are spread over the interval, so servers that died
        // together cross `down_after` up to one interval apart. A node that
        // is due takes along those within one interval of it: one epoch for a
        // rack that lost power, not one per tick.
        let mut down = Vec::new();
        // Every up server silent at once (two or more of them) says more
        // about this leader than about them: it is cut off from the chunk
        // servers, and marking them all down would stop every volume for
        // nothing. It proposes nothing then (a real outage of every server
        // stops I/O anyway; the map changes nothing about it).
        let up_count = map.nodes.iter().filter(|n| n.up).count();
        self.isolated = up_count >= 2 && silent.len() == up_count;
        if self.isolated {
            silent.clear();
        }
        if silent.iter().any(|&(_, ms)| ms >= config.down_after_ms) {
            for (id, _) in silent {
                if let Some(t) = self.nodes.get_mut(&id) {
                    t.down_proposed_ms = Some(now_ms);
                }
                down.push(id);
            }
        }
        let mut commands = Vec::new();
        if !down.is_empty() {
            commands.push(Command::MarkDown(NodeIds {
                node_ids: down,
                seen_epoch: map.epoch,
            }));
        }
        if !out.is_empty() {
            commands.push(Command::MarkOut(NodeIds {
                node_ids: out,
                seen_epoch: map.epoch,
            }));
        }
        if !up.is_empty() {
            commands.push(Command::MarkUp(NodeIds {
                node_ids: up,
                seen_epoch: map.epoch,
            }));
        }
        commands
    }
}
