//! A seeded simulator for the replication group protocol (`cairn-group`).
//!
//! One schedule runs 3-5 chunk-server cores, a volume client and a volume
//! manager (the pure [`cairn_group::authority`] functions, with a failure
//! detector and leases) over a fake network that drops, delays, duplicates
//! and reorders messages, and fake disks that complete operations in any
//! order and tear the writes in flight when a node crashes. Nodes crash and
//! restart, freeze (as under SIGSTOP) and resume, lose their link to the
//! volume manager (so it marks them down while they still run), and the map
//! moves on at any point. With `rot`, blocks on one node's disk go bad (as
//! bit rot: every read of them fails until they are written again), so the
//! primary's read repair runs under the same faults; while a node holds a
//! bad block the others are spared crashes, freezes and cuts, so a good copy
//! always stays acting (the protocol cannot repair from nothing); with
//! moves, blocks go bad only while every node is alive, as any of them may
//! join the group and take over from the good copies.
//!
//! With `moves`, the volume manager also marks nodes out (as an admin
//! draining them) and in again now and then, at any point: while they are
//! down, frozen, cut off or primaries. As in the real volume manager, that
//! changes only placement (recomputed by `cairn_placement` with the out
//! nodes ineligible), never acting sets: the groups' primaries bring the
//! new placement members up to date and claim them, and the claims retire
//! the members outside the placement once it is whole; where nothing is left
//! to claim, the volume manager's leader settles the group
//! (`SettlePlacement`, see `SimConfig::settle_placement`). Out nodes
//! may stay out after healing; their leftover copies are never compared.
//!
//! After the faults stop, the schedule heals (every node back, every group's
//! acting set whole again, every client request answered) and is checked:
//!
//! - every acknowledged write reads back (and every read during the run
//!   returned what the last acknowledged write, or one in flight, left);
//! - every replica of every group holds the same bytes;
//! - at most one node acknowledged writes for a group in one interval;
//! - with `moves`, a node that is out acts in no group (its leftover copies
//!   are stale and not compared).
//!
//! Everything is a function of the seed: a failing seed replays exactly
//! (`cargo run -p cairn-sim --release -- --seed N --verbose`).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use bytes::Bytes;
use cairn_group::authority::{self, Claim};
use cairn_group::msg::{
    ClientOp, ClientReply, ClientRequest, Part, Peer, Refusal, ScrubFound, WriteOp,
};
use cairn_group::node::{
    Bug, Config, DiskDone, DiskReq, Durable, JournalRecord, Node, Output, Trace, RECENT_MAX,
};
use cairn_group::{Epoch, ExtentId, GroupKey, GroupMap, GroupView, NodeId, NodeView};
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The shape of one schedule.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Chunk servers (3-5).
    pub nodes: u64,
    /// Replicas per group.
    pub replicas: u32,
    /// Placement groups.
    pub groups: u32,
    /// Extents in the one volume.
    pub extents: u64,
    /// Bytes per extent.
    pub extent_bytes: u64,
    /// Bytes per block (the write granularity).
    pub block: u64,
    /// Bytes per checksummed block (the store's 4 KiB): two write blocks,
    /// so a write may cover part of one, which cannot merge into it once
    /// it went bad.
    pub csum_block: u64,
    /// Milliseconds of faults before healing.
    pub fault_ms: u64,
    /// Milliseconds allowed to heal.
    pub heal_ms: u64,
    /// Client requests in flight at most.
    pub queue_depth: usize,
    /// The volume's min_replicas.
    pub min_replicas: u32,
    /// A deliberately broken protocol variant.
    pub bug: Option<Bug>,
    /// Changes each replica remembers by range per group (small values make
    /// peering fall back to whole extents).
    pub recent_max: usize,
    /// Blocks go bad on one node's disk now and then (see the crate docs).
    pub rot: bool,
    /// The client scrubs now and then (some of its reads become scrubs),
    /// bad blocks go to any acting member instead of only the primary, and
    /// after healing a scrub of every extent must leave no bad block on an
    /// acting member.
    pub scrub: bool,
    /// Placement moves: now and then, during the faults, the volume manager
    /// marks a node out or an out node in again (never more than `nodes -
    /// replicas` out), which recomputes every group's placement; the data
    /// moves to it through the protocol. Only with `nodes > replicas`.
    pub moves: bool,
    /// With `moves`: when the faults stop, every out node is marked in
    /// again (else out nodes stay out, and healing must move every group
    /// off them).
    pub moves_in_at_heal: bool,
    /// The volume manager settles placements as the real leader does
    /// (`Command::SettlePlacement` in `cairn-volmgr`): at its next tick
    /// after a move left a group with every placement member acting, but
    /// other members too or another order, it sets that group's acting set
    /// to its placement in a new epoch (`authority::settle_at`). No claim
    /// is left to make there, so without it such a group never sheds its
    /// old members (a drained node) nor heals (seed 32 with this off). On
    /// in `for_seed`.
    pub settle_placement: bool,
    /// Print every event.
    pub verbose: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 4,
            replicas: 3,
            groups: 4,
            extents: 12,
            extent_bytes: 64,
            block: 8,
            csum_block: 16,
            fault_ms: 3000,
            heal_ms: 60_000,
            queue_depth: 4,
            min_replicas: 1,
            bug: None,
            recent_max: RECENT_MAX,
            rot: false,
            scrub: false,
            moves: false,
            moves_in_at_heal: false,
            settle_placement: true,
            verbose: false,
        }
    }
}

impl SimConfig {
    /// The configuration seed `seed` runs with: node count, replicas and
    /// queue depth vary with the seed.
    pub fn for_seed(seed: u64, bug: Option<Bug>) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_c0f1_6a11_0000);
        let nodes = rng.gen_range(3..=5);
        let replicas = if rng.gen_bool(0.75) { 3 } else { 2 };
        let cfg = SimConfig {
            nodes,
            replicas,
            groups: [2, 4, 8][rng.gen_range(0..3)],
            queue_depth: rng.gen_range(1..=6),
            min_replicas: rng.gen_range(1..=replicas),
            recent_max: [1, 3, 8, RECENT_MAX][rng.gen_range(0..4)],
            // Drawn last, so the draws before it, and every schedule
            // without rot, are what they were before rot existed.
            rot: rng.gen_bool(0.5),
            // Drawn after rot for the same reason: a schedule without
            // scrubs is what it was before scrubs existed.
            scrub: rng.gen_bool(0.5),
            bug,
            ..SimConfig::default()
        };
        // Drawn after scrub for the same reason: a schedule without moves
        // is what it was before moves existed. Two thirds of the seeds that
        // have somewhere to move to (half of all seeds).
        let moves = rng.gen_bool(2.0 / 3.0) && cfg.nodes > u64::from(cfg.replicas);
        let moves_in_at_heal = rng.gen_bool(0.5);
        SimConfig {
            moves,
            moves_in_at_heal: moves && moves_in_at_heal,
            ..cfg
        }
    }
}

/// What one schedule did.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Writes acknowledged to the client.
    pub acked_writes: u64,
    /// Reads checked.
    pub reads: u64,
    /// Node crashes.
    pub crashes: u64,
    /// Node freezes.
    pub freezes: u64,
    /// Map epochs published.
    pub epochs: u64,
    /// Messages dropped / duplicated.
    pub dropped: u64,
    /// Messages duplicated.
    pub duplicated: u64,
    /// Requests the client gave up on.
    pub abandoned: u64,
    /// Simulated milliseconds until healed.
    pub healed_at_ms: u64,
    /// Compare-and-writes that wrote, and that found other bytes.
    pub caw_written: u64,
    /// See `caw_written`.
    pub caw_miscompared: u64,
    /// Pushes a replica started to apply: of whole extents, and of ranges.
    pub whole_pushes: u64,
    /// See `whole_pushes`.
    pub range_pushes: u64,
    /// Blocks that went bad, read repairs that ended well, and replicas
    /// mended after they could not apply a write.
    pub rotted: u64,
    /// See `rotted`.
    pub repaired: u64,
    /// See `rotted`.
    pub mended: u64,
    /// Scrubs answered; copies they found bad (a read error) or different
    /// and had pushed over; primaries' copies they had repaired.
    pub scrubs: u64,
    /// See `scrubs`.
    pub scrub_pushed: u64,
    /// See `scrubs`.
    pub scrub_repaired_here: u64,
    /// Nodes marked out and in (`SimConfig::moves`).
    pub outs: u64,
    /// See `outs`.
    pub ins: u64,
    /// Claims granted of nodes a move placed in a group, and replicas those
    /// claims retired (dropped from an acting set as outside the placement).
    pub move_claims: u64,
    /// See `move_claims`.
    pub retired: u64,
    /// Groups whose acting set the volume manager settled to their
    /// placement (`SimConfig::settle_placement`).
    pub settled: u64,
}

/// A failed check, with everything needed to replay it.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// What went wrong.
    pub what: String,
    /// Simulated time of the failure.
    pub at_ms: u64,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} failed at {} ms: {} (replay: cargo run -p cairn-sim --release -- --seed {} --verbose)",
            self.seed, self.at_ms, self.what, self.seed
        )
    }
}

const VOLUME: u64 = 1;
const CLIENT: u64 = 1;
const TICK_MS: u64 = 20;
const HEARTBEAT_MS: u64 = 100;
const DOWN_AFTER_MS: u64 = 1000;
const LEASE_MS: u64 = 600;
const CLIENT_TIMEOUT_MS: u64 = 400;

#[derive(Clone, Debug)]
enum Msg {
    Peer(Peer),
    Request(ClientRequest),
    Reply(ClientReply),
    Map(GroupMap),
    Heartbeat {
        node: NodeId,
        process: u64,
        sent_at: u64,
    },
    Lease {
        until: u64,
        epoch: Epoch,
    },
    Claim(Claim),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum At {
    Node(NodeId),
    Client,
    Volmgr,
}

#[derive(Debug)]
enum Event {
    Deliver { to: At, from: At, msg: Msg },
    Disk { node: NodeId, process: u64, op: u64 },
    Tick { node: NodeId, process: u64 },
    Heartbeat { node: NodeId, process: u64 },
    Restart { node: NodeId },
    Fault,
    Move,
    ClientStep,
    VolmgrTick,
}

struct Queued(u64, u64, Event);
impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(o.0, o.1))
    }
}

/// A fake disk: extents as byte vectors, operations applied when they
/// complete, in flight ones torn block by block at a crash.
#[derive(Default)]
struct Disk {
    extents: BTreeMap<ExtentId, Vec<u8>>,
    inflight: BTreeMap<u64, DiskReq>,
    /// Bad checksummed blocks (extent, `csum_block` index): reads of them
    /// fail, and so do writes that cover part of one; writing one whole
    /// makes it good again. Their bytes are kept, unread.
    rot: BTreeSet<(ExtentId, u64)>,
}

struct SimNode {
    core: Option<Node>,
    process: u64,
    journal: Vec<JournalRecord>,
    disk: Disk,
    frozen_until: u64,
    /// Heartbeats to the volume manager are lost until then.
    cut_until: u64,
}

struct PendingOp {
    id: u64,
    key: GroupKey,
    op: ClientOp,
    sent_at: u64,
    next_try: u64,
    /// For reads: every value each block may show. For compare-and-writes:
    /// every value each block may hold when it is sent.
    allowed: Vec<BTreeSet<Vec<u8>>>,
    /// Times sent.
    sent: u32,
}

struct Client {
    map: GroupMap,
    next_id: u64,
    pending: BTreeMap<u64, PendingOp>,
    /// Requests given up on, above the oldest pending one.
    abandoned: BTreeSet<u64>,
    /// Per (extent, block): every value the block may hold.
    model: BTreeMap<(u64, u64), Vec<Vec<u8>>>,
}

struct Volmgr {
    map: GroupMap,
    last_heard: BTreeMap<NodeId, u64>,
    process: BTreeMap<NodeId, u64>,
    /// Nodes marked out (`SimConfig::moves`).
    out: BTreeSet<NodeId>,
    /// (group, node) pairs a move put in the group's placement, not yet
    /// claimed (for `Stats::move_claims`).
    placed_by_move: BTreeSet<(GroupKey, NodeId)>,
}

struct World {
    cfg: SimConfig,
    rng: ChaCha8Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    nodes: BTreeMap<NodeId, SimNode>,
    client: Client,
    volmgr: Volmgr,
    faults: bool,
    stats: Stats,
    acked_in: BTreeMap<(GroupKey, Epoch), NodeId>,
    failure: Option<String>,
    core_cfg: Config,
    /// The scrub of every extent after healing was sent (`SimConfig::scrub`).
    scrubbed_all: bool,
    /// Draws for placement moves, apart from `rng` so that a schedule with
    /// moves runs as the one without until its first move.
    move_rng: ChaCha8Rng,
}

/// Runs schedule `seed` with configuration `cfg`.
pub fn run(seed: u64, cfg: &SimConfig) -> Result<Stats, Failure> {
    let mut w = World::new(seed, cfg.clone());
    w.run().map_err(|what| Failure {
        seed,
        what,
        at_ms: w.now,
    })?;
    Ok(w.stats)
}

impl World {
    fn new(seed: u64, cfg: SimConfig) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(seed);
        let mut map = GroupMap {
            epoch: 1,
            ..Default::default()
        };
        let table = placement_table(&cfg, &BTreeSet::new());
        for id in 1..=cfg.nodes {
            map.nodes.insert(
                id,
                NodeView {
                    up: true,
                    up_since: 1,
                },
            );
        }
        for index in 0..cfg.groups {
            let placement = table.lookup(index).expect("in range").to_vec();
            map.groups.insert(
                GroupKey {
                    replicas: cfg.replicas,
                    index,
                },
                GroupView {
                    interval: 1,
                    acting: placement.clone(),
                    placement,
                },
            );
        }
        let core_cfg = Config {
            retry_ms: 100,
            sync_timeout_ms: 1500,
            sync_request_ms: 200,
            claim_retry_ms: 400,
            recent_max: cfg.recent_max,
            block_bytes: cfg.csum_block,
            // Small, so that syncs queue for their turn in most schedules.
            pushes_max: 2,
            bug: cfg.bug,
        };
        let mut nodes = BTreeMap::new();
        for id in 1..=cfg.nodes {
            let mut core = Node::new(id, core_cfg.clone(), Durable::default(), 0);
            core.on_map(map.clone());
            nodes.insert(
                id,
                SimNode {
                    core: Some(core),
                    process: 1,
                    journal: Vec::new(),
                    disk: Disk::default(),
                    frozen_until: 0,
                    cut_until: 0,
                },
            );
        }
        let mut model = BTreeMap::new();
        let blocks = cfg.extent_bytes / cfg.block;
        for e in 0..cfg.extents {
            for b in 0..blocks {
                model.insert((e, b), vec![vec![0u8; cfg.block as usize]]);
            }
        }
        World {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            volmgr: Volmgr {
                map: map.clone(),
                last_heard: (1..=cfg.nodes).map(|n| (n, 0)).collect(),
                process: (1..=cfg.nodes).map(|n| (n, 1)).collect(),
                out: BTreeSet::new(),
                placed_by_move: BTreeSet::new(),
            },
            client: Client {
                map,
                next_id: 1,
                pending: BTreeMap::new(),
                abandoned: BTreeSet::new(),
                model,
            },
            nodes,
            faults: true,
            stats: Stats::default(),
            acked_in: BTreeMap::new(),
            failure: None,
            core_cfg,
            scrubbed_all: false,
            move_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x6d0f_e5a1_1c0d_e000),
            cfg,
        }
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.cfg.verbose {
            eprintln!("{:>6} {}", self.now, what());
        }
    }

    fn at(&mut self, t: u64, e: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Queued(t, self.seq, e)));
    }

    fn run(&mut self) -> Result<(), String> {
        for id in 1..=self.cfg.nodes {
            let j = self.rng.gen_range(0..TICK_MS);
            self.at(
                j,
                Event::Tick {
                    node: id,
                    process: 1,
                },
            );
            self.at(
                j,
                Event::Heartbeat {
                    node: id,
                    process: 1,
                },
            );
        }
        self.at(1, Event::ClientStep);
        self.at(50, Event::Fault);
        self.at(10, Event::VolmgrTick);
        if self.cfg.moves {
            let t = self.move_rng.gen_range(100..1000);
            self.at(t, Event::Move);
        }
        let deadline = self.cfg.fault_ms + self.cfg.heal_ms;
        while let Some(Reverse(Queued(t, _, e))) = self.queue.pop() {
            self.now = t;
            if self.faults && t >= self.cfg.fault_ms {
                self.heal();
            }
            self.handle(e);
            if let Some(f) = self.failure.take() {
                return Err(f);
            }
            if !self.faults && self.healed() {
                if self.cfg.scrub && !self.scrubbed_all {
                    self.scrubbed_all = true;
                    self.scrub_all();
                    continue;
                }
                self.stats.healed_at_ms = self.now;
                return self.check_final();
            }
            if t > deadline {
                return Err(format!(
                    "did not heal within {} ms: {}",
                    self.cfg.heal_ms,
                    self.unhealed()
                ));
            }
        }
        Err("event queue ran dry".into())
    }

    fn heal(&mut self) {
        self.faults = false;
        self.log(|| "--- faults stop; healing".into());
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let n = self.nodes.get_mut(&id).expect("node");
            n.frozen_until = n.frozen_until.min(self.now);
            n.cut_until = 0;
            if n.core.is_none() {
                self.restart(id);
            }
        }
        if self.cfg.moves_in_at_heal {
            let out: Vec<NodeId> = self.volmgr.out.iter().copied().collect();
            for id in out {
                self.mark_in_or_out(id, true);
            }
        }
    }

    fn healed(&self) -> bool {
        let map = &self.volmgr.map;
        if !self.client.pending.is_empty() {
            return false;
        }
        if map.nodes.values().any(|n| !n.up) {
            return false;
        }
        for (key, g) in &map.groups {
            if g.acting != g.placement {
                return false;
            }
            let Some(p) = map.primary(*key) else {
                return false;
            };
            let core = self.nodes[&p].core.as_ref();
            if !core.is_some_and(|c| c.map().epoch == map.epoch && c.is_active_primary(*key)) {
                return false;
            }
        }
        self.nodes
            .values()
            .all(|n| n.disk.inflight.is_empty() && !n.core.as_ref().is_some_and(Node::busy))
    }

    fn unhealed(&self) -> String {
        let map = &self.volmgr.map;
        let mut s = format!(
            "epoch {}; pending client ops {}",
            map.epoch,
            self.client.pending.len()
        );
        for (id, n) in &map.nodes {
            if !n.up {
                s += &format!("; node {id} down");
            }
        }
        if !self.volmgr.out.is_empty() {
            s += &format!("; out {:?}", self.volmgr.out);
        }
        for (key, g) in &map.groups {
            if g.acting != g.placement {
                s += &format!("; {key} acting {:?} placement {:?}", g.acting, g.placement);
            }
        }
        s
    }

    // ------------------------------------------------------------ events

    fn handle(&mut self, e: Event) {
        match e {
            Event::Deliver { to, from, msg } => self.deliver(to, from, msg),
            Event::Disk { node, process, op } => {
                let n = self.nodes.get_mut(&node).expect("node");
                if n.process != process || n.core.is_none() {
                    return;
                }
                if n.frozen_until > self.now {
                    let t = n.frozen_until;
                    self.at(t, Event::Disk { node, process, op });
                    return;
                }
                let Some(req) = n.disk.inflight.remove(&op) else {
                    return;
                };
                let done = apply(
                    &mut n.disk,
                    &req,
                    self.cfg.extent_bytes,
                    self.cfg.csum_block,
                );
                let core = n.core.as_mut().expect("running");
                core.set_clock(self.now);
                core.on_disk(op, done);
                self.outputs(node);
            }
            Event::Tick { node, process } => {
                let now = self.now;
                let n = self.nodes.get_mut(&node).expect("node");
                if n.process != process || n.core.is_none() {
                    return;
                }
                if n.frozen_until <= now {
                    n.core.as_mut().expect("running").on_tick(now);
                    self.outputs(node);
                }
                self.at(now + TICK_MS, Event::Tick { node, process });
            }
            Event::Heartbeat { node, process } => {
                let now = self.now;
                let n = self.nodes.get_mut(&node).expect("node");
                if n.process != process || n.core.is_none() {
                    return;
                }
                if n.frozen_until <= now && n.cut_until <= now {
                    self.send(
                        At::Node(node),
                        At::Volmgr,
                        Msg::Heartbeat {
                            node,
                            process,
                            sent_at: now,
                        },
                    );
                }
                self.at(now + HEARTBEAT_MS, Event::Heartbeat { node, process });
            }
            Event::Restart { node } => {
                if self.nodes[&node].core.is_none() {
                    self.restart(node);
                }
            }
            Event::Fault => {
                if self.faults {
                    self.fault();
                    let dt = self.rng.gen_range(30..300);
                    self.at(self.now + dt, Event::Fault);
                }
            }
            Event::Move => {
                if self.faults {
                    self.placement_move();
                    let dt = self.move_rng.gen_range(200..1000);
                    self.at(self.now + dt, Event::Move);
                }
            }
            Event::ClientStep => {
                self.client_step();
                self.at(self.now + 5, Event::ClientStep);
            }
            Event::VolmgrTick => {
                self.detector();
                self.at(self.now + 50, Event::VolmgrTick);
            }
        }
    }

    fn send(&mut self, from: At, to: At, msg: Msg) {
        let mut copies = 1;
        let mut delay = self.rng.gen_range(0..=4);
        if self.faults {
            let r: f64 = self.rng.gen();
            if r < 0.02 {
                self.stats.dropped += 1;
                self.log(|| format!("drop {from:?}->{to:?} {}", brief(&msg)));
                return;
            }
            if r < 0.04 {
                copies = 2;
                self.stats.duplicated += 1;
            }
            if self.rng.gen_bool(0.02) {
                delay += self.rng.gen_range(50..800);
            }
        }
        for _ in 0..copies {
            let d = delay + self.rng.gen_range(0..=2);
            self.at(
                self.now + d,
                Event::Deliver {
                    to,
                    from,
                    msg: msg.clone(),
                },
            );
        }
    }

    fn deliver(&mut self, to: At, from: At, msg: Msg) {
        match to {
            At::Node(id) => {
                let now = self.now;
                let n = self.nodes.get_mut(&id).expect("node");
                if n.frozen_until > now {
                    let t = n.frozen_until;
                    self.at(t, Event::Deliver { to, from, msg });
                    return;
                }
                let Some(core) = n.core.as_mut() else {
                    return;
                };
                core.set_clock(now);
                match msg {
                    Msg::Peer(p) => core.on_peer(p),
                    Msg::Request(r) => core.on_client(r),
                    Msg::Map(m) => core.on_map(m),
                    Msg::Lease { until, epoch } => core.on_lease(until, epoch),
                    _ => unreachable!("not for nodes"),
                }
                self.outputs(id);
            }
            At::Client => match msg {
                Msg::Reply(r) => self.client_reply(r),
                Msg::Map(m) => {
                    if m.epoch > self.client.map.epoch {
                        self.client.map = m;
                    }
                }
                _ => unreachable!("not for the client"),
            },
            At::Volmgr => match msg {
                Msg::Heartbeat {
                    node,
                    process,
                    sent_at,
                } => {
                    if self.volmgr.process.get(&node) != Some(&process) {
                        return;
                    }
                    self.volmgr.last_heard.insert(node, self.now);
                    if !self.volmgr.map.nodes[&node].up {
                        if let Some(m) = authority::mark_up(&self.volmgr.map, node) {
                            self.log(|| format!("volmgr: node {node} up again"));
                            self.publish(m);
                        }
                    }
                    if self.volmgr.map.nodes[&node].up {
                        self.send(
                            At::Volmgr,
                            from,
                            Msg::Lease {
                                until: sent_at + LEASE_MS,
                                epoch: self.volmgr.map.epoch,
                            },
                        );
                    }
                }
                Msg::Claim(c) => match authority::claim(&self.volmgr.map, &c) {
                    Ok(m) => {
                        self.log(|| format!("volmgr: claim {c:?} granted"));
                        if self.volmgr.placed_by_move.remove(&(c.key, c.node)) {
                            self.stats.move_claims += 1;
                        }
                        let before = &self.volmgr.map.groups[&c.key].acting;
                        let after = &m.groups[&c.key].acting;
                        let retired: Vec<NodeId> = before
                            .iter()
                            .copied()
                            .filter(|n| !after.contains(n))
                            .collect();
                        if !retired.is_empty() {
                            self.stats.retired += retired.len() as u64;
                            self.log(|| format!("volmgr: {} retires {retired:?}", c.key));
                        }
                        self.publish(m);
                    }
                    Err(e) => self.log(|| format!("volmgr: claim {c:?} refused: {e:?}")),
                },
                _ => unreachable!("not for the volume manager"),
            },
        }
    }

    fn outputs(&mut self, id: NodeId) {
        let outs = match self.nodes.get_mut(&id).and_then(|n| n.core.as_mut()) {
            Some(c) => c.drain(),
            None => return,
        };
        for o in outs {
            match o {
                Output::Peer { to, msg } => {
                    self.log(|| {
                        format!(
                            "{id}->{to} {:?} i{} {}",
                            msg.key,
                            msg.interval,
                            brief_peer(&msg)
                        )
                    });
                    self.send(At::Node(id), At::Node(to), Msg::Peer(msg));
                }
                Output::Reply(r) => self.send(At::Node(id), At::Client, Msg::Reply(r)),
                Output::Disk { id: op, req } => {
                    self.log(|| format!("{id}: disk {op} {}", brief_disk(&req)));
                    match &req {
                        DiskReq::PutExtent {
                            part: Part::Whole, ..
                        } => self.stats.whole_pushes += 1,
                        DiskReq::PutExtent { .. } => self.stats.range_pushes += 1,
                        _ => {}
                    }
                    let n = self.nodes.get_mut(&id).expect("node");
                    let process = n.process;
                    n.disk.inflight.insert(op, req);
                    let d = self.rng.gen_range(0..=3);
                    self.at(
                        self.now + d,
                        Event::Disk {
                            node: id,
                            process,
                            op,
                        },
                    );
                }
                Output::Journal(r) => self.nodes.get_mut(&id).expect("node").journal.push(r),
                Output::Claim(c) => self.send(At::Node(id), At::Volmgr, Msg::Claim(c)),
                Output::NeedMap(_) => {
                    // A fetch from the volume manager that retries until it
                    // succeeds: the current map, a little later.
                    let m = self.volmgr.map.clone();
                    let d = self.rng.gen_range(1..20);
                    self.at(
                        self.now + d,
                        Event::Deliver {
                            to: At::Node(id),
                            from: At::Volmgr,
                            msg: Msg::Map(m),
                        },
                    );
                }
                Output::Trace(t) => {
                    self.log(|| format!("{id}: {t:?}"));
                    match t {
                        Trace::Repaired { .. } => self.stats.repaired += 1,
                        Trace::Mending { .. } => self.stats.mended += 1,
                        _ => {}
                    }
                    if let Trace::AckedWrite { key, interval } = t {
                        let prev = *self.acked_in.entry((key, interval)).or_insert(id);
                        if prev != id {
                            self.failure = Some(format!(
                                "two primaries acknowledged writes for {key} in interval {interval}: nodes {prev} and {id}"
                            ));
                        }
                    }
                }
            }
        }
    }

    // ----------------------------------------------------- volume manager

    fn publish(&mut self, m: GroupMap) {
        self.stats.epochs += 1;
        self.log(|| {
            format!(
                "volmgr: epoch {} {:?}",
                m.epoch,
                m.groups
                    .values()
                    .map(|g| (g.interval, g.acting.clone()))
                    .collect::<Vec<_>>()
            )
        });
        self.volmgr.map = m.clone();
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.send(At::Volmgr, At::Node(id), Msg::Map(m.clone()));
        }
        self.send(At::Volmgr, At::Client, Msg::Map(m));
    }

    fn detector(&mut self) {
        let now = self.now;
        let late: Vec<NodeId> = self
            .volmgr
            .map
            .nodes
            .iter()
            .filter(|(id, n)| n.up && now > self.volmgr.last_heard[id] + DOWN_AFTER_MS)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(m) = authority::mark_down(&self.volmgr.map, id) {
                self.log(|| format!("volmgr: node {id} down"));
                self.publish(m);
            }
        }
        // The leader's `SettlePlacement` (see `settle_placement`): groups whose
        // whole placement acts, but whose acting set differs from it, get
        // their placement as acting set in a new epoch.
        if self.cfg.settle_placement && !authority::unsettled(&self.volmgr.map).is_empty() {
            let mut m = self.volmgr.map.clone();
            m.epoch += 1;
            let epoch = m.epoch;
            let settled = authority::settle_at(&mut m, epoch);
            self.stats.settled += settled.len() as u64;
            self.log(|| format!("volmgr: placement settled for {settled:?}"));
            self.publish(m);
        }
    }

    /// A placement move (`SimConfig::moves`): a node marked out, or an out
    /// node marked in again, whatever state it is in. At most `nodes -
    /// replicas` nodes are out, so every group finds a placement.
    fn placement_move(&mut self) {
        let max_out = (self.cfg.nodes - u64::from(self.cfg.replicas)) as usize;
        let out = self.volmgr.out.len();
        let mark_out = out == 0 || (out < max_out && self.move_rng.gen_bool(0.6));
        // An out node with bad blocks comes in only while no other node
        // holds any: one node with bad blocks at a time.
        let rotten = self.rotten_node();
        let pick: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(id, n)| {
                self.volmgr.out.contains(id) != mark_out
                    && (mark_out || n.disk.rot.is_empty() || rotten.is_none_or(|r| r == **id))
            })
            .map(|(id, _)| *id)
            .collect();
        if pick.is_empty() {
            return;
        }
        let id = pick[self.move_rng.gen_range(0..pick.len())];
        self.mark_in_or_out(id, !mark_out);
    }

    /// Marks `id` in or out: a new map epoch in which every group's
    /// placement is recomputed and nothing else changes (as `Mark::In` and
    /// `Mark::Out` in the real volume manager).
    fn mark_in_or_out(&mut self, id: NodeId, mark_in: bool) {
        let changed = if mark_in {
            self.volmgr.out.remove(&id)
        } else {
            self.volmgr.out.insert(id)
        };
        if !changed {
            return;
        }
        if mark_in {
            self.stats.ins += 1;
        } else {
            self.stats.outs += 1;
        }
        let table = placement_table(&self.cfg, &self.volmgr.out);
        let mut m = self.volmgr.map.clone();
        m.epoch += 1;
        let mut moved = Vec::new();
        for (key, g) in m.groups.iter_mut() {
            let placement = table.lookup(key.index).expect("in range").to_vec();
            for n in &placement {
                if !g.placement.contains(n) {
                    self.volmgr.placed_by_move.insert((*key, *n));
                }
            }
            for n in &g.placement {
                if !placement.contains(n) {
                    self.volmgr.placed_by_move.remove(&(*key, *n));
                }
            }
            if placement != g.placement {
                moved.push(format!(
                    "{key} {:?} -> {placement:?} (acting {:?})",
                    g.placement, g.acting
                ));
                g.placement = placement;
            }
        }
        self.log(|| {
            let n = &self.nodes[&id];
            format!(
                "volmgr: node {id} marked {} (epoch {}; {}{}{}{}); out now {:?}; placement: {}",
                if mark_in { "in" } else { "out" },
                m.epoch,
                if self.volmgr.map.nodes[&id].up {
                    "up"
                } else {
                    "down"
                },
                if n.core.is_none() { ", crashed" } else { "" },
                if n.frozen_until > self.now {
                    ", frozen"
                } else {
                    ""
                },
                if n.cut_until > self.now { ", cut" } else { "" },
                self.volmgr.out,
                if moved.is_empty() {
                    "unchanged".into()
                } else {
                    moved.join("; ")
                }
            )
        });
        self.publish(m);
    }

    // ------------------------------------------------------------- faults

    fn fault(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let id = ids[self.rng.gen_range(0..ids.len())];
        let now = self.now;
        let kind = self.rng.gen_range(0..10);
        // While a node holds bad blocks, the others stay up and acting (see
        // the crate docs).
        if (0..=5).contains(&kind) && self.rotten_node().is_some_and(|r| r != id) {
            return;
        }
        match kind {
            0..=2 if self.nodes[&id].core.is_some() => {
                self.crash(id);
                let back = now + self.rng.gen_range(20..1500);
                self.at(back, Event::Restart { node: id });
            }
            3..=4 => {
                // SIGSTOP for a while, then SIGCONT.
                let until = now + self.rng.gen_range(100..2000);
                self.stats.freezes += 1;
                self.log(|| format!("node {id} frozen until {until}"));
                self.nodes.get_mut(&id).expect("node").frozen_until = until;
            }
            5 => {
                let until = now + self.rng.gen_range(500..2500);
                self.log(|| format!("node {id} cut from the volume manager until {until}"));
                self.nodes.get_mut(&id).expect("node").cut_until = until;
            }
            6 => {
                // A map epoch that changes nothing.
                let mut m = self.volmgr.map.clone();
                m.epoch += 1;
                self.publish(m);
            }
            7..=9 if self.cfg.rot => self.rot(),
            _ => {}
        }
    }

    /// The node holding bad blocks, if any (only one at a time). Bad blocks
    /// an out node keeps of groups it no longer acts in do not count: no
    /// copy of those groups depends on them (and nothing writes them until
    /// the node is in again, see `placement_move`).
    fn rotten_node(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .find(|(id, n)| {
                n.disk.rot.iter().any(|(ext, _)| {
                    !self.volmgr.out.contains(id)
                        || self.volmgr.map.groups[&self.key_of(ext.index)]
                            .acting
                            .contains(id)
                })
            })
            .map(|(id, _)| *id)
    }

    /// A block of an extent on one node's disk goes bad: on the node that
    /// already holds bad blocks, or else on the extent's primary (whose
    /// reads and pushes need repair), and only where the extent's group
    /// acts whole (every other member up), so a good copy stays acting.
    fn rot(&mut self) {
        let index = self.rng.gen_range(0..self.cfg.extents);
        let key = self.key_of(index);
        let map = &self.volmgr.map;
        // With scrubs, any acting member (scrubs find bad replicas, which
        // reads never do); drawn only then, so other schedules stay as
        // they were.
        let member = if self.cfg.scrub {
            let acting = &map.groups[&key].acting;
            (!acting.is_empty()).then(|| acting[self.rng.gen_range(0..acting.len())])
        } else {
            map.primary(key)
        };
        let Some(id) = self.rotten_node().or(member) else {
            return;
        };
        let ext = ExtentId {
            volume: VOLUME,
            index,
            epoch: 1,
        };
        if !self.nodes[&id].disk.extents.contains_key(&ext) {
            return;
        }
        let g = &map.groups[&key];
        let now = self.now;
        // Up, running, and heard from lately: a node just back from a freeze
        // or a cut may still be marked down for the silence before.
        let alive = |n: &NodeId| {
            let sn = &self.nodes[n];
            map.nodes[n].up
                && sn.core.is_some()
                && sn.frozen_until <= now
                && sn.cut_until <= now
                && self.volmgr.last_heard[n] + 3 * HEARTBEAT_MS >= now
        };
        // With moves, any node may become a member (and the members it
        // replaces retire), so every node must be alive: from then on the
        // others are spared faults, and whoever joins stays acting.
        let whole = g.acting == g.placement
            && g.acting.len() > 1
            && g.acting.contains(&id)
            && g.acting.iter().all(alive)
            && (!self.cfg.moves || self.nodes.keys().all(alive));
        if !whole {
            return;
        }
        let block = self
            .rng
            .gen_range(0..self.cfg.extent_bytes / self.cfg.csum_block);
        self.stats.rotted += 1;
        self.log(|| format!("node {id}: extent {} block {block} goes bad", ext.index));
        self.nodes
            .get_mut(&id)
            .expect("node")
            .disk
            .rot
            .insert((ext, block));
    }

    fn crash(&mut self, id: NodeId) {
        self.stats.crashes += 1;
        let block = self.cfg.block as usize;
        let csum = self.cfg.csum_block;
        let eb = self.cfg.extent_bytes;
        let n = self.nodes.get_mut(&id).expect("node");
        n.core = None;
        let inflight = std::mem::take(&mut n.disk.inflight);
        let mut torn = 0;
        for (_, req) in inflight {
            match self.rng.gen_range(0..3) {
                0 => {}
                1 => {
                    apply(&mut n.disk, &req, eb, csum);
                }
                _ => {
                    // Torn: some blocks land, others keep the old bytes
                    // (and stay bad if they were).
                    let before = n.disk.extents.clone();
                    let rot_before = n.disk.rot.clone();
                    apply(&mut n.disk, &req, eb, csum);
                    if let Some(ext) = req_ext(&req) {
                        let old = before.get(&ext).cloned();
                        if let Some(new) = n.disk.extents.get_mut(&ext) {
                            for (i, chunk) in new.chunks_mut(block).enumerate() {
                                if self.rng.gen_bool(0.5) {
                                    match &old {
                                        Some(o) => {
                                            chunk.copy_from_slice(&o[i * block..(i + 1) * block])
                                        }
                                        None => chunk.fill(0),
                                    }
                                    let unit = (i * block) as u64 / csum;
                                    if rot_before.contains(&(ext, unit)) {
                                        n.disk.rot.insert((ext, unit));
                                    }
                                    torn += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
        self.log(|| format!("node {id} crashed ({torn} blocks torn)"));
    }

    fn restart(&mut self, id: NodeId) {
        let now = self.now;
        let n = self.nodes.get_mut(&id).expect("node");
        n.process += 1;
        n.frozen_until = 0;
        let process = n.process;
        let mut durable = Durable {
            recent_max: self.core_cfg.recent_max,
            ..Durable::default()
        };
        for r in &n.journal {
            durable.apply(r);
        }
        let core = Node::new(id, self.core_cfg.clone(), durable, now);
        n.core = Some(core);
        // Registration (retried until the volume manager answers).
        self.volmgr.process.insert(id, process);
        self.volmgr.last_heard.insert(id, now);
        let m = authority::register(&self.volmgr.map, id);
        self.log(|| format!("node {id} restarted as process {process}"));
        self.publish(m.clone());
        let core = self
            .nodes
            .get_mut(&id)
            .expect("node")
            .core
            .as_mut()
            .expect("just set");
        core.on_map(m);
        self.outputs(id);
        self.at(now + 1, Event::Tick { node: id, process });
        self.at(now + 1, Event::Heartbeat { node: id, process });
    }

    // ------------------------------------------------------------- client

    fn key_of(&self, ext: u64) -> GroupKey {
        GroupKey {
            replicas: self.cfg.replicas,
            index: cairn_placement::group_of(VOLUME, ext, self.cfg.groups).expect("power of two"),
        }
    }

    fn client_step(&mut self) {
        let now = self.now;
        // Retries.
        let due: Vec<u64> = self
            .client
            .pending
            .values()
            .filter(|p| p.next_try <= now)
            .map(|p| p.id)
            .collect();
        // Now and then the client gives up on a request that timed out (as
        // an NBD client whose connection broke does); a write it gave up on
        // may or may not have landed, and the replicas must still agree.
        let due: Vec<u64> = due
            .into_iter()
            .filter(|id| {
                let p = &self.client.pending[id];
                let retry = p.sent_at + CLIENT_TIMEOUT_MS <= now && p.sent_at < p.next_try;
                if self.faults && retry && self.rng.gen_bool(0.1) {
                    self.log(|| format!("client: gives up on {id}"));
                    self.client.pending.remove(id);
                    self.client.abandoned.insert(*id);
                    self.stats.abandoned += 1;
                    false
                } else {
                    true
                }
            })
            .collect();
        if !due.is_empty() {
            // Requests are (re)sent: the client's map poll (a long poll in
            // the real client) has brought the current map by then.
            self.client.map = self.volmgr.map.clone();
        }
        for id in due {
            self.client_send(id);
        }
        if !self.faults && self.now > self.cfg.fault_ms + 200 {
            return; // healing: finish what is pending, start nothing new
        }
        if self.client.pending.len() >= self.cfg.queue_depth || !self.rng.gen_bool(0.5) {
            return;
        }
        let blocks = self.cfg.extent_bytes / self.cfg.block;
        let ext = self.rng.gen_range(0..self.cfg.extents);
        let first = self.rng.gen_range(0..blocks);
        let count = self.rng.gen_range(1..=(blocks - first).min(3));
        let id = self.client.next_id;
        self.client.next_id += 1;
        let extent = ExtentId {
            volume: VOLUME,
            index: ext,
            epoch: 1,
        };
        let key = self.key_of(ext);
        let r: u32 = self.rng.gen_range(0..100);
        let mut caw_allowed = Vec::new();
        let op = if !(65..97).contains(&r) {
            // A write, unless it would overlap one in flight.
            let busy = self.client.pending.values().any(|p| {
                let (e, (s, t)) = match &p.op {
                    ClientOp::Write { ext: e, op, .. } => (e, op.range()),
                    ClientOp::CompareAndWrite {
                        ext: e,
                        offset,
                        data,
                        ..
                    } => (e, (*offset, offset + data.len() as u64)),
                    _ => return false,
                };
                e.index == ext && s < (first + count) * self.cfg.block && first * self.cfg.block < t
            });
            if busy {
                return;
            }
            let offset = first * self.cfg.block;
            let len = count * self.cfg.block;
            // A compare-and-write: of what the blocks hold now (most of the
            // time) or of a value no block ever holds.
            let caw = (2..12).contains(&r);
            if caw {
                caw_allowed = (first..first + count)
                    .map(|b| self.client.model[&(ext, b)].iter().cloned().collect())
                    .collect();
            }
            let compare: Vec<u8> = if !caw {
                Vec::new()
            } else if self.rng.gen_bool(0.8) {
                (first..first + count)
                    .flat_map(|b| {
                        self.client.model[&(ext, b)]
                            .last()
                            .expect("a value")
                            .clone()
                    })
                    .collect()
            } else {
                let mut v = id.to_le_bytes().to_vec();
                v[7] = 0xff;
                v.truncate(self.cfg.block as usize);
                v.repeat(count as usize)
            };
            let op = if r >= 97 {
                WriteOp::Zero { offset, len }
            } else if r < 2 {
                // A copy-up: through the protocol like any write, and no
                // block changes (the simulated disk has nothing beneath).
                WriteOp::Materialize { offset, len }
            } else {
                let mut data = Vec::with_capacity(len as usize);
                for b in 0..count {
                    let mut v = id.to_le_bytes().to_vec();
                    v[7] = b as u8 + 1;
                    data.extend_from_slice(&v[..self.cfg.block as usize]);
                }
                WriteOp::Data {
                    offset,
                    data: Bytes::from(data),
                }
            };
            // Every value the write may leave becomes possible at once.
            let changes = !matches!(op, WriteOp::Materialize { .. });
            for b in (0..count).filter(|_| changes) {
                let v = block_value(&op, first + b, self.cfg.block);
                self.client
                    .model
                    .get_mut(&(ext, first + b))
                    .expect("block")
                    .push(v.clone());
                for p in self.client.pending.values_mut() {
                    if let ClientOp::Read { ext: e, offset, .. } = &p.op {
                        let rb = offset / self.cfg.block;
                        if e.index == ext
                            && first + b >= rb
                            && first + b < rb + p.allowed.len() as u64
                        {
                            p.allowed[(first + b - rb) as usize].insert(v.clone());
                        }
                    }
                }
            }
            let fua = self.rng.gen_bool(0.1);
            match op {
                WriteOp::Data { offset, data } if caw => ClientOp::CompareAndWrite {
                    ext: extent,
                    offset,
                    compare: Bytes::from(compare),
                    data,
                    fua,
                },
                op => ClientOp::Write {
                    ext: extent,
                    op,
                    fua,
                },
            }
        } else if r < 95 {
            if self.cfg.scrub && self.rng.gen_bool(0.2) {
                // A scrub of the blocks, or of the whole extent.
                let (offset, len) = if self.rng.gen_bool(0.5) {
                    (first * self.cfg.block, count * self.cfg.block)
                } else {
                    (0, self.cfg.extent_bytes)
                };
                ClientOp::Scrub {
                    ext: extent,
                    offset,
                    len,
                }
            } else {
                ClientOp::Read {
                    ext: extent,
                    offset: first * self.cfg.block,
                    len: count * self.cfg.block,
                }
            }
        } else {
            ClientOp::Flush
        };
        let allowed = match &op {
            ClientOp::Read { .. } => (first..first + count)
                .map(|b| self.client.model[&(ext, b)].iter().cloned().collect())
                .collect(),
            ClientOp::CompareAndWrite { .. } => caw_allowed,
            _ => Vec::new(),
        };
        self.client.pending.insert(
            id,
            PendingOp {
                id,
                key,
                op,
                sent_at: now,
                next_try: now,
                allowed,
                sent: 0,
            },
        );
        self.client_send(id);
    }

    fn client_send(&mut self, id: u64) {
        self.log(|| {
            let p = &self.client.pending[&id];
            format!(
                "client: send {id} {:?} {}",
                p.key,
                match &p.op {
                    ClientOp::Write { ext, op, .. } =>
                        format!("write ext {} {:?}", ext.index, op.range()),
                    ClientOp::Read { ext, offset, len } =>
                        format!("read ext {} {offset}+{len}", ext.index),
                    ClientOp::CompareAndWrite {
                        ext, offset, data, ..
                    } => format!(
                        "compare-and-write ext {} {offset}+{}",
                        ext.index,
                        data.len()
                    ),
                    ClientOp::Scrub { ext, offset, len } =>
                        format!("scrub ext {} {offset}+{len}", ext.index),
                    ClientOp::Flush => "flush".into(),
                }
            )
        });
        let now = self.now;
        let oldest = *self.client.pending.keys().next().expect("pending");
        self.client.abandoned = self.client.abandoned.split_off(&oldest);
        let abandoned: Vec<u64> = self.client.abandoned.iter().copied().collect();
        let map = &self.client.map;
        let p = self.client.pending.get_mut(&id).expect("pending");
        p.next_try = now + CLIENT_TIMEOUT_MS;
        p.sent_at = now;
        p.sent += 1;
        let Some(primary) = map.primary(p.key) else {
            p.next_try = now + 50;
            return;
        };
        let req = ClientRequest {
            client: CLIENT,
            id,
            oldest_outstanding: oldest,
            abandoned,
            epoch: map.epoch,
            key: p.key,
            min_replicas: self.cfg.min_replicas,
            op: p.op.clone(),
        };
        self.send(At::Client, At::Node(primary), Msg::Request(req));
    }

    fn client_reply(&mut self, r: ClientReply) {
        let now = self.now;
        self.log(|| {
            format!(
                "client: reply {} {:?}",
                r.id,
                r.result.as_ref().map(|d| d.as_ref().map(|b| b.len()))
            )
        });
        let Some(p) = self.client.pending.get_mut(&r.id) else {
            return; // a duplicate
        };
        match r.result {
            Err(refusal) => {
                // Refresh the map (a fetch that retries) and try again soon.
                if matches!(
                    refusal,
                    Refusal::StaleEpoch { .. } | Refusal::NotPrimary { .. }
                ) {
                    self.client.map = self.volmgr.map.clone();
                }
                p.next_try = now + 20;
            }
            Ok(data) => {
                let p = self.client.pending.remove(&r.id).expect("pending");
                // Sent more than once: another copy may still be on its way
                // to a node that did not run this one, and must not run
                // after the writes the client makes next (seed 238008). It
                // is named, as one given up on is, until below the oldest.
                if p.sent > 1 {
                    self.client.abandoned.insert(r.id);
                }
                match p.op {
                    // A copy-up changes no block: the model stays.
                    ClientOp::Write {
                        op: WriteOp::Materialize { .. },
                        ..
                    } => self.stats.acked_writes += 1,
                    ClientOp::Write { ext, op, .. } => {
                        self.stats.acked_writes += 1;
                        let (s, t) = op.range();
                        for b in s / self.cfg.block..t / self.cfg.block {
                            let v = block_value(&op, b, self.cfg.block);
                            self.client.model.insert((ext.index, b), vec![v]);
                        }
                    }
                    ClientOp::Read { ext, offset, len } => {
                        self.stats.reads += 1;
                        let data = data.unwrap_or_default();
                        if data.len() as u64 != len {
                            self.failure =
                                Some(format!("read of {len} bytes returned {}", data.len()));
                            return;
                        }
                        for (i, chunk) in data.chunks(self.cfg.block as usize).enumerate() {
                            let b = offset / self.cfg.block + i as u64;
                            if !p.allowed[i].contains(chunk) {
                                self.failure = Some(format!(
                                    "read of extent {} block {b} returned {chunk:?}, which no acknowledged or in-flight write left there (allowed {:?})",
                                    ext.index, p.allowed[i]
                                ));
                                return;
                            }
                        }
                    }
                    ClientOp::CompareAndWrite {
                        ext,
                        offset,
                        compare,
                        data: new,
                        ..
                    } => {
                        let block = self.cfg.block as usize;
                        let first = offset / self.cfg.block;
                        let found = data.unwrap_or_default();
                        // As the real client: after a retry, finding its
                        // own bytes means an earlier attempt wrote.
                        let wrote = found.is_empty() || (p.sent > 1 && found == new);
                        if wrote {
                            // It wrote: the range held `compare`.
                            for (i, c) in compare.chunks(block).enumerate() {
                                if !p.allowed[i].contains(c) {
                                    self.failure = Some(format!(
                                        "compare-and-write of extent {} block {} wrote though the block held none of {:?}, not {c:?}",
                                        ext.index, first + i as u64, p.allowed[i]
                                    ));
                                    return;
                                }
                            }
                            self.stats.acked_writes += 1;
                            self.stats.caw_written += 1;
                            for (i, v) in new.chunks(block).enumerate() {
                                self.client
                                    .model
                                    .insert((ext.index, first + i as u64), vec![v.to_vec()]);
                            }
                        } else {
                            self.stats.caw_miscompared += 1;
                            if found.len() != new.len() || found == compare {
                                self.failure = Some(format!(
                                    "compare-and-write of extent {} at {offset} answered a miscompare with {found:?} (compared {compare:?})",
                                    ext.index
                                ));
                                return;
                            }
                            for (i, f) in found.chunks(block).enumerate() {
                                // What it found, or its own write (a torn
                                // earlier attempt, pushed by a new primary).
                                if !p.allowed[i].contains(f)
                                    && f != &new[i * block..(i + 1) * block]
                                {
                                    self.failure = Some(format!(
                                        "compare-and-write of extent {} block {} found {f:?}, which no write left there (allowed {:?})",
                                        ext.index, first + i as u64, p.allowed[i]
                                    ));
                                    return;
                                }
                            }
                        }
                    }
                    ClientOp::Scrub { ext, .. } => {
                        let found = match ScrubFound::decode(&data.unwrap_or_default()[..]) {
                            Ok(f) => f,
                            Err(e) => {
                                self.failure = Some(format!(
                                    "scrub of extent {} answered an undecodable report: {e}",
                                    ext.index
                                ));
                                return;
                            }
                        };
                        // While data moves, a group acts on more nodes than
                        // its placement holds.
                        let replicas = if self.cfg.moves {
                            self.cfg.nodes as u32
                        } else {
                            self.volmgr.map.groups[&p.key].placement.len() as u32
                        };
                        if found.copies == 0 || found.copies > replicas {
                            self.failure = Some(format!(
                                "scrub of extent {} compared {} copies in a group of {replicas}",
                                ext.index, found.copies
                            ));
                            return;
                        }
                        self.stats.scrubs += 1;
                        self.stats.scrub_pushed += found.pushed.len() as u64;
                        self.stats.scrub_repaired_here += u64::from(found.repaired_here);
                    }
                    ClientOp::Flush => {}
                }
            }
        }
    }

    /// After healing: a scrub of every extent, whole. `check_final` then
    /// finds no bad block on an acting member.
    fn scrub_all(&mut self) {
        self.log(|| "--- healed; scrubbing every extent".into());
        self.client.map = self.volmgr.map.clone();
        for index in 0..self.cfg.extents {
            let id = self.client.next_id;
            self.client.next_id += 1;
            let now = self.now;
            self.client.pending.insert(
                id,
                PendingOp {
                    id,
                    key: self.key_of(index),
                    op: ClientOp::Scrub {
                        ext: ExtentId {
                            volume: VOLUME,
                            index,
                            epoch: 1,
                        },
                        offset: 0,
                        len: self.cfg.extent_bytes,
                    },
                    sent_at: now,
                    next_try: now,
                    allowed: Vec::new(),
                    sent: 0,
                },
            );
            self.client_send(id);
        }
    }

    // ------------------------------------------------------------- checks

    fn check_final(&mut self) -> Result<(), String> {
        let map = self.volmgr.map.clone();
        // Out nodes' leftover copies are stale: only acting members count,
        // and an out node is none.
        for id in &self.volmgr.out {
            for (key, g) in &map.groups {
                if g.acting.contains(id) || g.placement.contains(id) {
                    return Err(format!(
                        "node {id} is out but still in {key}: acting {:?}, placement {:?}",
                        g.acting, g.placement
                    ));
                }
            }
        }
        if self.scrubbed_all {
            for (id, n) in &self.nodes {
                for (ext, block) in &n.disk.rot {
                    if map.groups[&self.key_of(ext.index)].acting.contains(id) {
                        return Err(format!(
                            "node {id}: block {block} of extent {} is still bad after a scrub of every extent",
                            ext.index
                        ));
                    }
                }
            }
        }
        let blocks = self.cfg.extent_bytes / self.cfg.block;
        for e in 0..self.cfg.extents {
            let key = self.key_of(e);
            let ext = ExtentId {
                volume: VOLUME,
                index: e,
                epoch: 1,
            };
            let g = &map.groups[&key];
            let zeros = vec![0u8; self.cfg.extent_bytes as usize];
            let copies: Vec<(NodeId, Vec<u8>)> = g
                .acting
                .iter()
                .map(|n| {
                    (
                        *n,
                        self.nodes[n]
                            .disk
                            .extents
                            .get(&ext)
                            .cloned()
                            .unwrap_or_else(|| zeros.clone()),
                    )
                })
                .collect();
            let (first, data) = &copies[0];
            for (n, other) in &copies[1..] {
                if other != data {
                    return Err(format!(
                        "replicas differ after healing: extent {e} ({key}) on node {first} is {data:?}, on node {n} {other:?}"
                    ));
                }
            }
            for b in 0..blocks {
                let got = &data[(b * self.cfg.block) as usize..((b + 1) * self.cfg.block) as usize];
                let want = &self.client.model[&(e, b)];
                if want.len() == 1 && want[0] != got {
                    return Err(format!(
                        "acknowledged write lost: extent {e} block {b} holds {got:?}, the last acknowledged write left {:?}",
                        want[0]
                    ));
                }
                if !want.iter().any(|w| w == got) {
                    return Err(format!("extent {e} block {b} holds {got:?}, never written"));
                }
            }
        }
        Ok(())
    }
}

/// The placement of every group with the nodes in `out` ineligible (each
/// node is its own host), as the volume manager computes it.
fn placement_table(cfg: &SimConfig, out: &BTreeSet<NodeId>) -> cairn_placement::PlacementTable {
    let candidates: Vec<cairn_placement::Candidate> = (1..=cfg.nodes)
        .map(|id| cairn_placement::Candidate {
            id,
            weight: 1,
            host: format!("h{id}"),
            rack: String::new(),
            room: String::new(),
            eligible: !out.contains(&id),
        })
        .collect();
    cairn_placement::PlacementTable::build(&candidates, cfg.groups, cfg.replicas as usize)
        .expect("valid placement")
}

fn block_value(op: &WriteOp, b: u64, block: u64) -> Vec<u8> {
    match op {
        WriteOp::Data { offset, data } => {
            let at = (b * block - offset) as usize;
            data[at..at + block as usize].to_vec()
        }
        WriteOp::Zero { .. } => vec![0; block as usize],
        WriteOp::Materialize { .. } => unreachable!("a copy-up leaves every block as it was"),
    }
}

fn req_ext(r: &DiskReq) -> Option<ExtentId> {
    match r {
        DiskReq::Write { ext, .. } | DiskReq::PutExtent { ext, .. } => Some(*ext),
        _ => None,
    }
}

/// Applies a disk operation to the fake disk.
fn apply(d: &mut Disk, r: &DiskReq, extent_bytes: u64, block: u64) -> DiskDone {
    // Reads of bad blocks fail (as a checksum mismatch); whole-block
    // writes make them good again.
    let blocks = |s: u64, e: u64| s / block..e.div_ceil(block);
    let read_ranges: Option<(ExtentId, Vec<(u64, u64)>)> = match r {
        DiskReq::Read { ext, offset, len } => Some((*ext, vec![(*offset, offset + len)])),
        DiskReq::ReadRanges { ext, ranges } => Some((*ext, ranges.clone())),
        DiskReq::ReadExtent { ext, part } if d.extents.contains_key(ext) => Some((
            *ext,
            match part {
                Part::Whole => vec![(0, extent_bytes)],
                Part::Ranges(v) => v.clone(),
            },
        )),
        _ => None,
    };
    if let Some((ext, ranges)) = read_ranges {
        for (s, e) in ranges {
            if let Some(b) = blocks(s, e).find(|b| d.rot.contains(&(ext, *b))) {
                return DiskDone::Failed(format!(
                    "checksum mismatch in extent {} block {b}",
                    ext.index
                ));
            }
        }
    }
    let written: Option<(ExtentId, Vec<(u64, u64)>)> = match r {
        DiskReq::Write {
            ext,
            op: op @ (WriteOp::Data { .. } | WriteOp::Zero { .. }),
            ..
        } => Some((*ext, vec![op.range()])),
        DiskReq::PutExtent {
            ext,
            part: Part::Ranges(v),
            ..
        } => Some((*ext, v.clone())),
        DiskReq::PutExtent { ext, .. } => Some((*ext, vec![(0, extent_bytes)])),
        _ => None,
    };
    if let Some((ext, ranges)) = written {
        // Part of a bad block cannot merge into it (the real store reads
        // the block to merge, and its checksum fails): nothing is written.
        for &(s, e) in &ranges {
            let partial = [s / block, (e - 1) / block]
                .into_iter()
                .find(|b| d.rot.contains(&(ext, *b)) && (b * block < s || (b + 1) * block > e));
            if let Some(b) = partial {
                return DiskDone::Failed(format!(
                    "block {b} of extent {} went bad; a write of part of it cannot merge",
                    ext.index
                ));
            }
        }
        for (s, e) in ranges {
            for b in s.div_ceil(block)..e / block {
                d.rot.remove(&(ext, b));
            }
        }
    }
    match r {
        DiskReq::Write { ext, op, .. } => {
            let e = d
                .extents
                .entry(*ext)
                .or_insert_with(|| vec![0; extent_bytes as usize]);
            match op {
                WriteOp::Data { offset, data } => {
                    e[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
                }
                WriteOp::Zero { offset, len } => {
                    e[*offset as usize..(*offset + *len) as usize].fill(0)
                }
                // The simulated disk has no versions beneath: nothing to copy.
                WriteOp::Materialize { .. } => {}
            }
            DiskDone::Ok
        }
        DiskReq::Read { ext, offset, len } => {
            let data = match d.extents.get(ext) {
                Some(e) => e[*offset as usize..(*offset + *len) as usize].to_vec(),
                None => vec![0; *len as usize],
            };
            DiskDone::Data(Bytes::from(data))
        }
        DiskReq::ReadRanges { ext, ranges } => {
            let mut out = Vec::new();
            for &(s, e) in ranges {
                match d.extents.get(ext) {
                    Some(x) => out.extend_from_slice(&x[s as usize..e as usize]),
                    None => out.resize(out.len() + (e - s) as usize, 0),
                }
            }
            DiskDone::Data(Bytes::from(out))
        }
        DiskReq::ReadExtent {
            ext,
            part: Part::Whole,
        } => DiskDone::Extent(d.extents.get(ext).map(|e| Bytes::from(e.clone()))),
        DiskReq::ReadExtent {
            ext,
            part: Part::Ranges(ranges),
        } => DiskDone::Extent(d.extents.get(ext).map(|x| {
            let mut out = Vec::new();
            for &(s, e) in ranges {
                out.extend_from_slice(&x[s as usize..e as usize]);
            }
            Bytes::from(out)
        })),
        DiskReq::PutExtent {
            ext,
            part: Part::Whole,
            data,
        } => {
            match data {
                Some(b) => {
                    d.extents.insert(*ext, b.to_vec());
                }
                None => {
                    d.extents.remove(ext);
                }
            }
            DiskDone::Ok
        }
        DiskReq::PutExtent {
            ext,
            part: Part::Ranges(ranges),
            data,
        } => {
            let data = data.as_ref().expect("a ranges push carries data");
            let e = d
                .extents
                .entry(*ext)
                .or_insert_with(|| vec![0; extent_bytes as usize]);
            let mut at = 0usize;
            for &(s, end) in ranges {
                let n = (end - s) as usize;
                e[s as usize..end as usize].copy_from_slice(&data[at..at + n]);
                at += n;
            }
            DiskDone::Ok
        }
        DiskReq::Flush => DiskDone::Ok,
    }
}

fn brief(m: &Msg) -> String {
    match m {
        Msg::Peer(p) => brief_peer(p),
        Msg::Request(r) => format!("request {} {:?}", r.id, r.key),
        Msg::Reply(r) => format!("reply {} {:?}", r.id, r.result.as_ref().err()),
        Msg::Map(m) => format!("map {}", m.epoch),
        Msg::Heartbeat { node, .. } => format!("heartbeat {node}"),
        Msg::Lease { until, .. } => format!("lease {until}"),
        Msg::Claim(c) => format!("claim {c:?}"),
    }
}

fn brief_peer(p: &Peer) -> String {
    use cairn_group::msg::PeerMsg::*;
    match &p.msg {
        Forward { seq, ext, .. } => format!("forward seq {seq} ext {}", ext.index),
        Push {
            ext,
            push_id,
            part,
            data,
            ..
        } => {
            format!(
                "push {push_id} ext {} {part:?} {}",
                ext.index,
                if data.is_some() { "data" } else { "delete" }
            )
        }
        SyncReport(r) => format!("report {r:?}"),
        other => format!("{other:?}"),
    }
}

fn brief_disk(r: &DiskReq) -> String {
    match r {
        DiskReq::Write { ext, op, .. } => format!("write ext {} {:?}", ext.index, op.range()),
        DiskReq::Read { ext, offset, len } => format!("read ext {} {offset}+{len}", ext.index),
        DiskReq::ReadExtent { ext, part } => format!("read extent {} {part:?}", ext.index),
        DiskReq::ReadRanges { ext, ranges } => format!("read ranges {} {ranges:?}", ext.index),
        DiskReq::PutExtent { ext, part, data } => format!(
            "put extent {} {part:?} {}",
            ext.index,
            if data.is_some() { "data" } else { "delete" }
        ),
        DiskReq::Flush => "flush".into(),
    }
}
