//! Per-volume SCSI persistent reservation state (see the state's module
//! docs, "Persistent reservations"): opaque bytes and a generation, set by
//! compare and set on the generation, kept in snapshots, dropped with the
//! volume.

use std::collections::BTreeMap;

use cairn_proto::map::VolumeInfo;
use cairn_proto::volmgr::PR_STATE_BYTES_MAX;

use super::{Outcome, PrSet, RestoreError, State, StateError};

/// The persistent reservation states of all volumes together, at most:
/// 256 MiB, a quarter of the largest raft snapshot the log stores
/// (`raftlog::SNAPSHOT_BYTES_MAX`), since every snapshot holds them all.
/// (A front end's state is a few hundred bytes: registrations and one
/// reservation.)
pub const PR_STATES_BYTES_MAX: usize = 256 << 20;

/// One volume's persistent reservation state, as held and as snapshotted.
#[derive(Clone, PartialEq, Eq, ::prost::Message)]
pub struct PrEntry {
    /// The live volume it belongs to.
    #[prost(uint64, tag = "1")]
    pub volume_id: u64,
    /// 1 or more: how many sets were applied since the volume was created.
    #[prost(uint64, tag = "2")]
    pub generation: u64,
    /// The front end's own encoding, at most `PR_STATE_BYTES_MAX` bytes.
    #[prost(bytes = "vec", tag = "3")]
    pub state: Vec<u8>,
}

impl State {
    /// Volume `volume_id`'s persistent reservation generation and state;
    /// `(0, [])` while none was ever set (or no such volume).
    pub fn pr_state(&self, volume_id: u64) -> (u64, &[u8]) {
        self.pr
            .get(&volume_id)
            .map_or((0, &[][..]), |e| (e.generation, &e.state[..]))
    }

    /// Volume `volume_id`'s persistent reservation generation; 0 while none
    /// was ever set (or no such volume).
    pub fn pr_generation(&self, volume_id: u64) -> u64 {
        self.pr_state(volume_id).0
    }

    /// Every stored persistent reservation state, by volume id.
    pub fn pr_entries(&self) -> impl Iterator<Item = &PrEntry> {
        self.pr.values()
    }

    /// See [`PrSet`]: checks the volume, the size, the generation, then
    /// stores. Neither the map epoch nor the catalogue version moves.
    pub(super) fn pr_set(&mut self, c: &PrSet) -> Result<Outcome, StateError> {
        let id = self.resolve(c.volume.as_ref())?;
        let volume = || self.volumes[&id].name.clone();
        if c.state.len() > PR_STATE_BYTES_MAX {
            return Err(StateError::PrStateTooLarge {
                volume: volume(),
                bytes: c.state.len(),
                max: PR_STATE_BYTES_MAX,
            });
        }
        let (current, old) = self.pr_state(id);
        if c.expect_generation != current {
            return Err(StateError::PrGenerationMismatch {
                volume: volume(),
                expected: c.expect_generation,
                current,
            });
        }
        let generation = current.checked_add(1).ok_or(StateError::Exhausted {
            counter: "persistent reservation generation",
            value: current,
        })?;
        let total = self.pr_bytes - old.len() + c.state.len();
        if total > PR_STATES_BYTES_MAX {
            return Err(StateError::PrStatesFull {
                volume: volume(),
                bytes: c.state.len(),
                max: PR_STATES_BYTES_MAX,
            });
        }
        self.pr.insert(
            id,
            PrEntry {
                volume_id: id,
                generation,
                state: c.state.clone(),
            },
        );
        self.pr_bytes = total;
        Ok(Outcome {
            pr_generation: generation,
            ..Outcome::default()
        })
    }

    /// Volume `volume_id` is gone: so is its state.
    pub(super) fn pr_forget(&mut self, volume_id: u64) {
        if let Some(e) = self.pr.remove(&volume_id) {
            self.pr_bytes -= e.state.len();
        }
    }
}

type PrTable = (BTreeMap<u64, PrEntry>, usize);

/// The table of a snapshot, checked: volume ids ascending and live,
/// generations above 0, states and their total within the limits.
pub(super) fn restore_pr(
    entries: Vec<PrEntry>,
    volumes: &BTreeMap<u64, VolumeInfo>,
) -> Result<PrTable, RestoreError> {
    let invariant = |reason: String| RestoreError::Invariant { reason };
    let mut table = BTreeMap::new();
    let mut total = 0usize;
    let mut previous = 0;
    for e in entries {
        let id = e.volume_id;
        if id <= previous || !volumes.contains_key(&id) {
            return Err(invariant(format!(
                "persistent reservation state of volume {id}: not a live volume, or volume ids \
                 not ascending (after {previous})"
            )));
        }
        previous = id;
        if e.generation == 0 || e.state.len() > PR_STATE_BYTES_MAX {
            return Err(invariant(format!(
                "persistent reservation state of volume {id}: generation 0, or {} bytes (at most \
                 {PR_STATE_BYTES_MAX})",
                e.state.len()
            )));
        }
        total += e.state.len();
        if total > PR_STATES_BYTES_MAX {
            return Err(invariant(format!(
                "persistent reservation states over {PR_STATES_BYTES_MAX} bytes together"
            )));
        }
        table.insert(id, e);
    }
    Ok((table, total))
}
