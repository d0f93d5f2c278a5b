//! Test doubles for the raft pieces: a memory log and a trivial machine.

use std::collections::BTreeMap;

use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::Storage;

use crate::node::{bootstrap_snapshot, LogStore, Machine};

/// MemStorage keeps a snapshot's metadata but not its data; this keeps both.
pub struct MemLog {
    mem: MemStorage,
    snap_data: Vec<u8>,
}

impl Storage for MemLog {
    fn initial_state(&self) -> raft::Result<raft::RaftState> {
        self.mem.initial_state()
    }
    fn entries(
        &self,
        low: u64,
        high: u64,
        max: impl Into<Option<u64>>,
        ctx: raft::GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max, ctx)
    }
    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }
    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }
    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let mut s = self.mem.snapshot(request_index, to)?;
        s.data = self.snap_data.clone().into();
        Ok(s)
    }
}

impl LogStore for MemLog {
    fn append(&mut self, entries: &[Entry]) -> Result<(), String> {
        self.mem.wl().append(entries).map_err(|e| e.to_string())
    }
    fn set_hard_state(&mut self, hs: HardState) -> Result<(), String> {
        self.mem.wl().set_hardstate(hs);
        Ok(())
    }
    fn set_conf_state(&mut self, cs: ConfState) -> Result<(), String> {
        self.mem.wl().set_conf_state(cs);
        Ok(())
    }
    fn sync(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn apply_snapshot(&mut self, snap: Snapshot) -> Result<(), String> {
        self.snap_data = snap.data.to_vec();
        self.mem
            .wl()
            .apply_snapshot(snap)
            .map_err(|e| e.to_string())
    }
    fn compact(&mut self, _: u64, _: Vec<u8>, _: ConfState) -> Result<(), String> {
        Ok(()) // memory logs keep everything
    }
}

/// Appends every command; the result is the list's length.
#[derive(Default)]
pub struct ListMachine(pub Vec<Vec<u8>>);

impl Machine for ListMachine {
    fn apply(&mut self, _: u64, command: &[u8]) -> Vec<u8> {
        self.0.push(command.to_vec());
        (self.0.len() as u64).to_le_bytes().to_vec()
    }
    fn snapshot(&self) -> Vec<u8> {
        self.0.concat()
    }
    fn restore(&mut self, _: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

impl MemLog {
    /// A log holding the bootstrap snapshot of a new cluster of `members`.
    pub fn bootstrapped(members: &BTreeMap<u64, String>) -> Self {
        let mut log = MemLog {
            mem: MemStorage::new(),
            snap_data: Vec::new(),
        };
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 1;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().mut_conf_state().voters = members.keys().copied().collect();
        snap.data = bootstrap_snapshot(members, &ListMachine::default()).into();
        log.apply_snapshot(snap).expect("bootstrap snapshot");
        log
    }
}
