//! The raft node loop: one thread that owns the raft-rs `RawNode`, the
//! durable log and the replicated state machine, and runs raft-rs's
//! Ready/advance cycle.
//!
//! Everything reaches the loop as an [`Input`] over one channel (peer
//! messages, proposals, linearizable reads, membership changes, status
//! requests), and it ticks raft every [`TICK`]. Like the chunk server's store
//! engine, nothing is shared: the loop applies committed entries to the
//! machine, and reads run *on* the loop, after raft's read index says the
//! machine is current. Other threads see only what the loop publishes
//! ([`NodeStatus`] through a `watch`).
//!
//! The log and the machine are traits ([`LogStore`], [`Machine`]) so the same
//! loop runs over the disk log in the daemon and over memory in tests.
//!
//! Ordering per Ready (raft-rs's contract): messages that need no persistence
//! go out first; then a received snapshot is installed, committed entries are
//! applied, new entries and the hard state are written and **synced**; only
//! then are the persisted messages (votes, append responses) sent.
//!
//! Membership: the voters are raft's conf state; each member's address rides
//! in its conf change's `context` and is kept in the replicated [`Members`]
//! table (part of every snapshot), so a member that joins later, or restarts,
//! learns every address from the log.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use prost::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message, Snapshot,
};
use raft::{RawNode, StateRole, Storage};
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

/// How often raft's logical clock ticks.
pub const TICK: Duration = Duration::from_millis(100);
/// Ticks without a leader's heartbeat before a follower campaigns (randomised
/// up to twice this by raft): 0.8-1.6 s.
pub const ELECTION_TICKS: usize = 8;
/// Ticks between a leader's heartbeats.
pub const HEARTBEAT_TICKS: usize = 2;
/// Applied entries between log compactions (a machine snapshot each).
pub const COMPACT_EVERY: u64 = 1000;
/// Proposals and reads a node holds waiting for raft at once; more are refused.
pub const PENDING_MAX: usize = 10_000;

/// The durable side of raft: raft-rs's `Storage` plus the writes the loop makes.
pub trait LogStore: Storage + Send + 'static {
    fn append(&mut self, entries: &[Entry]) -> Result<(), String>;
    fn set_hard_state(&mut self, hs: HardState) -> Result<(), String>;
    fn set_conf_state(&mut self, cs: ConfState) -> Result<(), String>;
    /// Makes everything written so far durable.
    fn sync(&mut self) -> Result<(), String>;
    /// Replaces log and state with a snapshot received from the leader.
    fn apply_snapshot(&mut self, snap: Snapshot) -> Result<(), String>;
    /// Stores `data` as the snapshot at `index` and drops the log up to it.
    fn compact(&mut self, index: u64, data: Vec<u8>, cs: ConfState) -> Result<(), String>;
}

/// The replicated state machine. `apply` must be deterministic and total.
pub trait Machine: Send + 'static {
    /// Applies one committed command and returns its encoded result.
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8>;
    fn snapshot(&self) -> Vec<u8>;
    fn restore(&mut self, data: &[u8]) -> Result<(), String>;
}

/// Raft members and their addresses, replicated with the machine.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct Members {
    #[prost(btree_map = "uint64, string", tag = "1")]
    pub addrs: BTreeMap<u64, String>,
}

/// What a snapshot holds: the members and the machine's own bytes.
#[derive(Clone, PartialEq, ::prost::Message)]
struct SnapshotData {
    #[prost(message, optional, tag = "1")]
    members: Option<Members>,
    #[prost(bytes = "vec", tag = "2")]
    machine: Vec<u8>,
}

/// Encodes the data of the bootstrap snapshot that every initial member
/// starts from: the initial members, and the machine's empty state.
pub fn bootstrap_snapshot(members: &BTreeMap<u64, String>, machine: &impl Machine) -> Vec<u8> {
    SnapshotData {
        members: Some(Members {
            addrs: members.clone(),
        }),
        machine: machine.snapshot(),
    }
    .encode_to_vec()
}

/// Why a proposal or read did not happen here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// This member is not the leader; `leader` is the one it knows of (0: none yet).
    #[error("not the leader (leader is member {leader}, at {addr:?})")]
    NotLeader { leader: u64, addr: Option<String> },
    /// Leadership changed before the outcome was known: the command may or
    /// may not be applied; retrying with the same request id is safe.
    #[error("leadership changed before the outcome was known; retry")]
    Unknown,
    #[error("too many requests waiting for raft ({PENDING_MAX})")]
    Busy,
    /// The leader was asked to remove itself: it hands leadership to member
    /// `to` first (so the group never waits an election out); retry, and the
    /// new leader makes the change.
    #[error("handing leadership to member {to} before removing this member; retry")]
    HandingOver { to: u64 },
    #[error("raft refused: {0}")]
    Raft(String),
    #[error("the node is stopping")]
    Stopped,
}

pub type ReadFn<M> = Box<dyn FnOnce(Result<&M, NodeError>) + Send>;

/// Everything the loop takes.
pub enum Input<M: Machine> {
    /// A message from another member.
    Raft(Box<Message>),
    /// A sent message could not be delivered to this member.
    Unreachable(u64),
    /// Member `id` sent raft traffic from `addr`: used to reach members
    /// this one has no address for yet (it joined empty).
    PeerSeen {
        id: u64,
        addr: String,
    },
    /// Replicates `command`; the reply carries the machine's result.
    Propose {
        command: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, NodeError>>,
    },
    /// Runs `read` on the machine once it holds every write committed before
    /// this request (raft read index), or with the error.
    Read(ReadFn<M>),
    /// Adds `id` at `addr` as a voter (or removes it with `addr` None).
    ChangeMember {
        id: u64,
        addr: Option<String>,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    Stop,
}

/// Sends raft messages to other members. Must not block: queue, drop when
/// full (raft retransmits), and report failures as [`Input::Unreachable`].
pub trait Transport: Send + 'static {
    fn send(&mut self, msgs: Vec<Message>);
    /// The member table changed.
    fn set_members(&mut self, members: &BTreeMap<u64, String>);
}

/// What other threads may see of the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: u64,
    pub leader: u64,
    pub term: u64,
    pub is_leader: bool,
    pub applied: u64,
    pub members: BTreeMap<u64, String>,
}

impl NodeStatus {
    pub fn leader_addr(&self) -> Option<String> {
        self.members.get(&self.leader).cloned()
    }
}

/// Handle to a running node loop.
pub struct NodeHandle<M: Machine> {
    tx: mpsc::Sender<Input<M>>,
    status: watch::Receiver<NodeStatus>,
    ticks: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<M: Machine> Clone for NodeHandle<M> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            status: self.status.clone(),
            ticks: self.ticks.clone(),
            thread: None,
        }
    }
}

impl<M: Machine> NodeHandle<M> {
    pub fn sender(&self) -> mpsc::Sender<Input<M>> {
        self.tx.clone()
    }

    pub fn status(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    /// Raft ticks the loop has taken (one per 100 ms while it runs): a
    /// liveness signal for the daemon's watchdog. It stops moving when the
    /// loop thread is wedged (e.g. in a log write that never returns) or gone.
    pub fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }

    pub async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Propose { command, reply })
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Runs `f` on the machine after a linearizable read barrier.
    pub async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&M) -> R + Send + 'static,
    ) -> Result<R, NodeError> {
        let (tx, rx) = oneshot::channel();
        let read: ReadFn<M> = Box::new(move |m| {
            let _ = tx.send(m.map(f));
        });
        self.tx
            .send(Input::Read(read))
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    pub async fn change_member(&self, id: u64, addr: Option<String>) -> Result<(), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::ChangeMember { id, addr, reply })
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Stops the loop and waits for its thread.
    pub fn stop(mut self) {
        let _ = self.tx.send(Input::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the loop for member `id` over `log` (opened, possibly holding a
/// bootstrap snapshot) and `machine` (empty: it is restored from the log's
/// snapshot and the entries after it are re-applied).
/// `transport` is built from the loop's own input channel (where it reports
/// unreachable peers).
pub fn start<L: LogStore, M: Machine, T: Transport>(
    id: u64,
    log: L,
    machine: M,
    transport: impl FnOnce(mpsc::Sender<Input<M>>) -> T,
) -> Result<NodeHandle<M>, String> {
    let (tx, rx) = mpsc::channel();
    let transport = transport(tx.clone());
    let (status_tx, status) = watch::channel(NodeStatus {
        id,
        ..NodeStatus::default()
    });
    let mut node = Node::new(id, log, machine, transport, rx, status_tx)?;
    let ticks = node.ticks.clone();
    let thread = std::thread::Builder::new()
        .name(format!("raft-{id}"))
        .spawn(move || node.run())
        .map_err(|e| format!("starting the raft thread: {e}"))?;
    Ok(NodeHandle {
        tx,
        status,
        ticks,
        thread: Some(thread),
    })
}

struct Node<L: LogStore, M: Machine, T: Transport> {
    id: u64,
    raw: RawNode<L>,
    machine: M,
    members: BTreeMap<u64, String>,
    /// Addresses learnt from peers' frames for members not (yet) in the
    /// replicated table.
    hints: BTreeMap<u64, String>,
    transport: T,
    rx: mpsc::Receiver<Input<M>>,
    status: watch::Sender<NodeStatus>,
    /// Counts raft ticks; see [`NodeHandle::ticks`].
    ticks: Arc<AtomicU64>,
    applied: u64,
    compacted: u64,
    /// A membership change was applied: the next compaction cannot wait,
    /// because a member added empty can only start from a snapshot that
    /// lists it as a voter (raft-rs ignores one that does not).
    compact_now: bool,
    conf_state: ConfState,
    next_tag: u64,
    proposals: HashMap<u64, oneshot::Sender<Result<Vec<u8>, NodeError>>>,
    member_changes: HashMap<u64, oneshot::Sender<Result<(), NodeError>>>,
    /// Reads waiting for raft's read index, by tag.
    reads: HashMap<u64, ReadFn<M>>,
    /// Reads whose index is known, waiting for the machine to reach it.
    ready_reads: Vec<(u64, ReadFn<M>)>,
    was_leader: bool,
    /// This member applied its own removal: it takes no further part in
    /// raft (no messages stepped, no ticks) and waits to be stopped.
    removed: bool,
}

impl<L: LogStore, M: Machine, T: Transport> Node<L, M, T> {
    fn new(
        id: u64,
        log: L,
        mut machine: M,
        mut transport: T,
        rx: mpsc::Receiver<Input<M>>,
        status: watch::Sender<NodeStatus>,
    ) -> Result<Self, String> {
        let state = log
            .initial_state()
            .map_err(|e| format!("reading the raft log: {e}"))?;
        let snap = match log.snapshot(0, id) {
            Ok(s) => s,
            Err(raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable)) => {
                Snapshot::default()
            }
            Err(e) => return Err(format!("reading the raft snapshot: {e}")),
        };
        let mut members = BTreeMap::new();
        let snap_index = snap.get_metadata().index;
        if !snap.data.is_empty() {
            let data = SnapshotData::decode(&snap.data[..])
                .map_err(|e| format!("decoding the raft snapshot at index {snap_index}: {e}"))?;
            members = data.members.unwrap_or_default().addrs;
            machine
                .restore(&data.machine)
                .map_err(|e| format!("restoring the snapshot at index {snap_index}: {e}"))?;
        }
        transport.set_members(&members);
        let cfg = raft::Config {
            id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            // Entries after the snapshot are applied again from the log: the
            // machine was restored from the snapshot only.
            applied: snap_index,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        };
        cfg.validate().map_err(|e| format!("raft config: {e}"))?;
        let logger = slog::Logger::root(crate::slog_tracing::TracingDrain, slog::o!());
        let raw = RawNode::new(&cfg, log, &logger).map_err(|e| format!("starting raft: {e}"))?;
        info!(
            member = id,
            snapshot_index = snap_index,
            commit = state.hard_state.commit,
            term = state.hard_state.term,
            voters = ?state.conf_state.voters,
            "raft member starting"
        );
        Ok(Self {
            id,
            raw,
            machine,
            members,
            hints: BTreeMap::new(),
            transport,
            rx,
            status,
            ticks: Arc::default(),
            applied: snap_index,
            compacted: snap_index,
            compact_now: false,
            conf_state: state.conf_state,
            next_tag: 1,
            proposals: HashMap::new(),
            member_changes: HashMap::new(),
            reads: HashMap::new(),
            ready_reads: Vec::new(),
            was_leader: false,
            removed: false,
        })
    }

    fn run(&mut self) {
        let mut next_tick = Instant::now() + TICK;
        loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(timeout) {
                Ok(Input::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Ok(input) => {
                    self.take(input);
                    // Take whatever else is queued before doing one Ready.
                    while let Ok(input) = self.rx.try_recv() {
                        if matches!(input, Input::Stop) {
                            return self.stop();
                        }
                        self.take(input);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() >= next_tick {
                if !self.removed {
                    self.raw.tick();
                }
                self.ticks.fetch_add(1, Ordering::Relaxed);
                next_tick += TICK;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + TICK;
                }
            }
            if let Err(e) = self.on_ready() {
                // The log could not be written: this member must not go on
                // voting or acknowledging. Stop; the process exits.
                error!(
                    member = self.id,
                    "raft log write failed: {e}; stopping this member"
                );
                break;
            }
        }
        self.stop();
    }

    fn stop(&mut self) {
        for (_, r) in self.proposals.drain() {
            let _ = r.send(Err(NodeError::Stopped));
        }
        for (_, r) in self.member_changes.drain() {
            let _ = r.send(Err(NodeError::Stopped));
        }
        for (_, f) in self.reads.drain() {
            f(Err(NodeError::Stopped));
        }
        for (_, f) in self.ready_reads.drain(..) {
            f(Err(NodeError::Stopped));
        }
        info!(member = self.id, "raft member stopped");
    }

    fn not_leader(&self) -> NodeError {
        let leader = self.raw.raft.leader_id;
        NodeError::NotLeader {
            leader,
            addr: self.members.get(&leader).cloned(),
        }
    }

    /// The voter to hand leadership to: of the others recently heard from,
    /// the one whose log matches this leader's furthest (raft-rs sends it
    /// what it lacks, then tells it to campaign).
    fn transferee(&self) -> Option<u64> {
        let prs = self.raw.raft.prs();
        self.conf_state
            .voters
            .iter()
            .filter(|&&v| v != self.id)
            .filter_map(|&v| prs.get(v).map(|p| (v, p)))
            .filter(|(_, p)| p.recent_active)
            .max_by_key(|(v, p)| (p.matched, std::cmp::Reverse(*v)))
            .map(|(v, _)| v)
    }

    fn pending(&self) -> usize {
        self.proposals.len() + self.reads.len() + self.ready_reads.len()
    }

    fn tag(&mut self) -> (u64, Vec<u8>) {
        let tag = self.next_tag;
        self.next_tag += 1;
        let mut ctx = Vec::with_capacity(16);
        ctx.extend_from_slice(&self.id.to_le_bytes());
        ctx.extend_from_slice(&tag.to_le_bytes());
        (tag, ctx)
    }

    /// The tag of an entry or read this member proposed, if it is one.
    fn own_tag(&self, ctx: &[u8]) -> Option<u64> {
        if ctx.len() < 16 || ctx[..8] != self.id.to_le_bytes() {
            return None;
        }
        Some(u64::from_le_bytes(ctx[8..16].try_into().expect("8 bytes")))
    }

    fn take(&mut self, input: Input<M>) {
        match input {
            Input::Raft(m) => {
                if self.removed {
                    // raft-rs keeps a removed leader leading, and its next
                    // append response would find no progress of its own
                    // (a panic in `maybe_commit`).
                    debug!(
                        member = self.id,
                        from = m.from,
                        "removed member: raft message dropped"
                    );
                    return;
                }
                if let Err(e) = self.raw.step(*m) {
                    debug!(member = self.id, "raft step: {e}");
                }
            }
            Input::Unreachable(peer) => self.raw.report_unreachable(peer),
            Input::PeerSeen { id, addr } => {
                if id != self.id
                    && !self.members.contains_key(&id)
                    && self.hints.get(&id) != Some(&addr)
                {
                    info!(member = self.id, peer = id, %addr, "learnt a member's address from its traffic");
                    self.hints.insert(id, addr);
                    self.update_transport();
                }
            }
            Input::Propose { command, reply } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(self.not_leader()));
                } else if self.pending() >= PENDING_MAX {
                    let _ = reply.send(Err(NodeError::Busy));
                } else {
                    let (tag, ctx) = self.tag();
                    match self.raw.propose(ctx, command) {
                        Ok(()) => {
                            self.proposals.insert(tag, reply);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(NodeError::Raft(e.to_string())));
                        }
                    }
                }
            }
            Input::Read(f) => {
                if self.raw.raft.state != StateRole::Leader {
                    f(Err(self.not_leader()));
                } else if self.pending() >= PENDING_MAX {
                    f(Err(NodeError::Busy));
                } else {
                    let (tag, ctx) = self.tag();
                    self.raw.read_index(ctx);
                    self.reads.insert(tag, f);
                }
            }
            Input::ChangeMember { id, addr, reply } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                if addr.is_none() && id == self.id {
                    // A leader that applies its own removal stops leading
                    // (see `removed`), and the others wait out an election
                    // timeout before one of them leads. Hand over first;
                    // with no other voter in touch, remove as before.
                    if let Some(to) = self.transferee() {
                        info!(
                            to,
                            "asked to remove this member, the leader: handing leadership over first"
                        );
                        self.raw.transfer_leader(to);
                        let _ = reply.send(Err(NodeError::HandingOver { to }));
                        return;
                    }
                }
                let mut cc = ConfChange {
                    node_id: id,
                    ..Default::default()
                };
                match addr {
                    Some(a) => {
                        cc.set_change_type(ConfChangeType::AddNode);
                        cc.context = a.into_bytes().into();
                    }
                    None => cc.set_change_type(ConfChangeType::RemoveNode),
                }
                let (tag, ctx) = self.tag();
                match self.raw.propose_conf_change(ctx, cc) {
                    Ok(()) => {
                        self.member_changes.insert(tag, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NodeError::Raft(e.to_string())));
                    }
                }
            }
            Input::Stop => unreachable!("handled by run"),
        }
    }

    /// The transport's address book: the replicated members, plus hints for
    /// members the table does not hold yet.
    fn update_transport(&mut self) {
        let mut book = self.members.clone();
        for (id, addr) in &self.hints {
            book.entry(*id).or_insert_with(|| addr.clone());
        }
        self.transport.set_members(&book);
    }

    fn send(&mut self, msgs: Vec<Message>) {
        if !msgs.is_empty() {
            self.transport.send(msgs);
        }
    }

    fn on_ready(&mut self) -> Result<(), String> {
        if self.raw.has_ready() {
            let mut ready = self.raw.ready();
            self.send(ready.take_messages());
            if !ready.snapshot().is_empty() {
                self.install_snapshot(ready.snapshot().clone())?;
            }
            self.apply(ready.take_committed_entries());
            let entries = ready.take_entries();
            if !entries.is_empty() {
                self.raw.mut_store().append(&entries)?;
            }
            if let Some(hs) = ready.hs() {
                self.raw.mut_store().set_hard_state(hs.clone())?;
            }
            let read_states = ready.take_read_states();
            if ready.must_sync() || !entries.is_empty() {
                self.raw.mut_store().sync()?;
            }
            self.send(ready.take_persisted_messages());
            let mut light = self.raw.advance(ready);
            if let Some(commit) = light.commit_index() {
                let mut hs = self.raw.raft.hard_state();
                hs.commit = commit;
                self.raw.mut_store().set_hard_state(hs)?;
            }
            self.send(light.take_messages());
            self.apply(light.take_committed_entries());
            self.raw.advance_apply();
            for rs in read_states {
                if let Some(tag) = self.own_tag(&rs.request_ctx) {
                    if let Some(f) = self.reads.remove(&tag) {
                        self.ready_reads.push((rs.index, f));
                    }
                }
            }
        }
        self.after_role_change();
        self.maybe_compact()?;
        // Publish before serving reads, so a reader that looks at the status
        // after its read sees at least what the read saw.
        self.publish();
        self.serve_reads();
        Ok(())
    }

    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), String> {
        let index = snap.get_metadata().index;
        let data = SnapshotData::decode(&snap.data[..])
            .map_err(|e| format!("decoding the snapshot at index {index} from the leader: {e}"))?;
        self.machine.restore(&data.machine)?;
        self.members = data.members.unwrap_or_default().addrs;
        self.update_transport();
        self.conf_state = snap.get_metadata().get_conf_state().clone();
        self.raw.mut_store().apply_snapshot(snap)?;
        self.applied = index;
        self.compacted = index;
        info!(
            member = self.id,
            index, "installed a snapshot from the leader"
        );
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            self.applied = entry.index;
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    if entry.data.is_empty() {
                        continue; // a new leader's empty entry
                    }
                    let result = self.machine.apply(entry.index, &entry.data);
                    if let Some(tag) = self.own_tag(&entry.context) {
                        if let Some(reply) = self.proposals.remove(&tag) {
                            let _ = reply.send(Ok(result));
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    if let Err(e) = protobuf::Message::merge_from_bytes(&mut cc, &entry.data) {
                        error!(index = entry.index, "undecodable membership change: {e}");
                        continue;
                    }
                    let result = match self.raw.apply_conf_change(&cc) {
                        Ok(cs) => {
                            match cc.get_change_type() {
                                ConfChangeType::RemoveNode => {
                                    self.members.remove(&cc.node_id);
                                    if cc.node_id == self.id {
                                        self.removed = true;
                                    }
                                }
                                _ => {
                                    let addr = String::from_utf8_lossy(&cc.context).into_owned();
                                    self.members.insert(cc.node_id, addr);
                                }
                            }
                            info!(member = self.id, changed = cc.node_id, voters = ?cs.voters, "membership changed");
                            self.conf_state = cs.clone();
                            self.compact_now = true;
                            self.update_transport();
                            self.raw
                                .mut_store()
                                .set_conf_state(cs)
                                .map_err(NodeError::Raft)
                        }
                        Err(e) => Err(NodeError::Raft(e.to_string())),
                    };
                    if let Some(tag) = self.own_tag(&entry.context) {
                        if let Some(reply) = self.member_changes.remove(&tag) {
                            let _ = reply.send(result);
                        }
                    }
                    if self.removed && self.raw.raft.state != StateRole::Follower {
                        // A removed leader stops leading at once: what it
                        // still has pending is answered `Unknown` (callers
                        // retry at the new leader) and new requests are
                        // refused as not-leader.
                        warn!(
                            member = self.id,
                            "removed from the group; no longer leading"
                        );
                        let term = self.raw.raft.term;
                        self.raw.raft.become_follower(term, raft::INVALID_ID);
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    warn!(
                        index = entry.index,
                        "ignoring a joint-consensus change: not used by Cairn"
                    );
                }
            }
        }
    }

    fn serve_reads(&mut self) {
        if self.ready_reads.is_empty() {
            return;
        }
        let applied = self.applied;
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.ready_reads)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.ready_reads = later;
        for (_, f) in now {
            f(Ok(&self.machine));
        }
    }

    /// A member that stops leading cannot know whether its pending proposals
    /// will commit: their callers get `Unknown` and retry (requests carry ids,
    /// so a retry never applies twice).
    fn after_role_change(&mut self) {
        let leader = self.raw.raft.state == StateRole::Leader;
        if self.was_leader && !leader {
            warn!(
                member = self.id,
                term = self.raw.raft.term,
                "lost leadership"
            );
            for (_, r) in self.proposals.drain() {
                let _ = r.send(Err(NodeError::Unknown));
            }
            for (_, r) in self.member_changes.drain() {
                let _ = r.send(Err(NodeError::Unknown));
            }
            let err = self.not_leader();
            for (_, f) in self.reads.drain() {
                f(Err(err.clone()));
            }
            for (_, f) in self.ready_reads.drain(..) {
                f(Err(err.clone()));
            }
        }
        if !self.was_leader && leader {
            info!(member = self.id, term = self.raw.raft.term, "leading");
        }
        self.was_leader = leader;
    }

    fn maybe_compact(&mut self) -> Result<(), String> {
        if self.applied <= self.compacted
            || (self.applied < self.compacted + COMPACT_EVERY && !self.compact_now)
        {
            return Ok(());
        }
        self.compact_now = false;
        let data = SnapshotData {
            members: Some(Members {
                addrs: self.members.clone(),
            }),
            machine: self.machine.snapshot(),
        }
        .encode_to_vec();
        let index = self.applied;
        self.raw
            .mut_store()
            .compact(index, data, self.conf_state.clone())?;
        self.compacted = index;
        debug!(member = self.id, index, "raft log compacted");
        Ok(())
    }

    fn publish(&mut self) {
        let status = NodeStatus {
            id: self.id,
            leader: self.raw.raft.leader_id,
            term: self.raw.raft.term,
            is_leader: self.raw.raft.state == StateRole::Leader,
            applied: self.applied,
            members: self.members.clone(),
        };
        self.status.send_if_modified(|s| {
            if *s == status {
                false
            } else {
                *s = status;
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    //! Three loops over memory logs and a channel network: election, proposals
    //! applied everywhere, linearizable reads, failover when the leader stops.

    use super::*;
    use crate::testing::{ListMachine, MemLog};
    use std::sync::{Arc, Mutex};

    type Net = Arc<Mutex<HashMap<u64, mpsc::Sender<Input<ListMachine>>>>>;

    struct ChanTransport {
        me: u64,
        net: Net,
    }

    impl Transport for ChanTransport {
        fn send(&mut self, msgs: Vec<Message>) {
            let net = self.net.lock().unwrap();
            for m in msgs {
                match net.get(&m.to) {
                    Some(tx) => {
                        let _ = tx.send(Input::Raft(Box::new(m)));
                    }
                    None => {
                        if let Some(me) = net.get(&self.me) {
                            let _ = me.send(Input::Unreachable(m.to));
                        }
                    }
                }
            }
        }
        fn set_members(&mut self, _: &BTreeMap<u64, String>) {}
    }

    fn cluster(n: u64) -> (Net, BTreeMap<u64, NodeHandle<ListMachine>>) {
        let net: Net = Arc::default();
        let members: BTreeMap<u64, String> = (1..=n).map(|i| (i, format!("m{i}"))).collect();
        let mut handles = BTreeMap::new();
        for id in 1..=n {
            let log = MemLog::bootstrapped(&members);
            let net2 = net.clone();
            let h = start(id, log, ListMachine::default(), move |_| ChanTransport {
                me: id,
                net: net2,
            })
            .unwrap();
            net.lock().unwrap().insert(id, h.sender());
            handles.insert(id, h);
        }
        (net, handles)
    }

    async fn leader(handles: &BTreeMap<u64, NodeHandle<ListMachine>>) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for (id, h) in handles {
                if h.status().borrow().is_leader {
                    return *id;
                }
            }
            assert!(Instant::now() < deadline, "no leader elected in 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_members_elect_replicate_read_and_fail_over() {
        let (net, mut handles) = cluster(3);
        let first = leader(&handles).await;
        for i in 0..50u32 {
            let r = handles[&first]
                .propose(i.to_le_bytes().to_vec())
                .await
                .unwrap();
            assert_eq!(r, (i as u64 + 1).to_le_bytes().to_vec());
        }
        // A follower refuses and names the leader.
        let follower = *handles.keys().find(|&&id| id != first).unwrap();
        match handles[&follower].propose(vec![9]).await {
            Err(NodeError::NotLeader { leader, addr }) => {
                assert_eq!(leader, first);
                assert_eq!(addr, Some(format!("m{first}")));
            }
            other => panic!("follower accepted a proposal: {other:?}"),
        }
        let len = handles[&first].read(|m| m.0.len()).await.unwrap();
        assert_eq!(len, 50);

        // Stop the leader: the others elect a new one, which has every
        // acknowledged command and takes more.
        net.lock().unwrap().remove(&first);
        handles.remove(&first).unwrap().stop();
        let t0 = Instant::now();
        let second = leader(&handles).await;
        assert_ne!(second, first);
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "election took {:?}",
            t0.elapsed()
        );
        let len = handles[&second].read(|m| m.0.len()).await.unwrap();
        assert_eq!(len, 50, "the new leader lost acknowledged commands");
        let r = handles[&second].propose(vec![1, 2, 3]).await.unwrap();
        assert_eq!(r, 51u64.to_le_bytes().to_vec());
        // Both survivors applied the same list.
        let other = *handles.keys().find(|&&id| id != second).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if handles[&other].status().borrow().applied
                >= handles[&second].status().borrow().applied
            {
                break;
            }
            assert!(Instant::now() < deadline, "follower did not catch up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (_, h) in handles {
            h.stop();
        }
    }
}
