//! Snapshots, rollback, clones and the epochs behind them: see the state's
//! module docs, "Epochs, snapshots and clones". Like the rest of the state,
//! each handler checks everything (a plan) and only then mutates, with
//! nothing fallible after the first write.

use std::collections::{BTreeMap, BTreeSet};

use cairn_proto::map::{SnapshotInfo, SnapshotRef, VolumeInfo};
use cairn_proto::volmgr::{DataEpochs, Foldable};

use super::{
    validate, CloneVolume, CreateSnapshot, DeleteSnapshot, EpochsCollected, Outcome, RestoreError,
    RollbackVolume, State, StateError, CHAIN_EPOCHS_MAX, SNAPSHOTS_PER_VOLUME_MAX,
    VOLUME_NAME_BYTES_MAX,
};

/// Every epoch `v` references: its head, its chain, and each snapshot's
/// epoch and chain (with repeats).
pub fn referenced(v: &VolumeInfo) -> impl Iterator<Item = u64> + '_ {
    std::iter::once(v.head_epoch)
        .chain(v.chain.iter().copied())
        .chain(
            v.snapshots
                .iter()
                .flat_map(|s| std::iter::once(s.epoch).chain(s.chain.iter().copied())),
        )
}

/// A checked snapshot of one volume, ready to record.
struct SnapshotPlan {
    volume_id: u64,
    snapshot: SnapshotInfo,
    /// The volume's next head epoch.
    epoch: u64,
    catalogue_version: u64,
}

/// A checked rollback: `kept` is the head as a snapshot, `to` the target.
struct RollbackPlan {
    kept: SnapshotPlan,
    to: SnapshotInfo,
}

impl State {
    /// The epoch the next head gets (above every epoch given out).
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// Per data id, every epoch given out and not yet reported collected,
    /// ascending.
    pub fn epochs(&self) -> impl Iterator<Item = (u64, &BTreeSet<u64>)> {
        self.epochs.iter().map(|(&d, e)| (d, e))
    }

    /// For the garbage collector: per data id (only `data_id` if given),
    /// the epochs given out that no live volume's head or chain and no
    /// snapshot references any more, ascending. Data ids without dead
    /// epochs are left out. An epoch once dead stays dead: references only
    /// spread from existing ones, and new heads are new epochs.
    pub fn dead_epochs(&self, data_id: Option<u64>) -> Vec<DataEpochs> {
        let wanted = |d: u64| data_id.is_none_or(|w| w == d);
        let mut live: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        for v in self.volumes.values() {
            let d = v.data_volume_id();
            if wanted(d) {
                live.entry(d).or_default().extend(referenced(v));
            }
        }
        self.epochs
            .iter()
            .filter(|(&d, _)| wanted(d))
            .filter_map(|(&d, given)| {
                let refs = live.get(&d);
                let dead: Vec<u64> = given
                    .iter()
                    .copied()
                    .filter(|e| !refs.is_some_and(|r| r.contains(e)))
                    .collect();
                (!dead.is_empty()).then_some(DataEpochs {
                    data_id: d,
                    epochs: dead,
                })
            })
            .collect()
    }

    /// Hidden epochs (in a live chain, no view's top) of `data_id` (`None`:
    /// of every data id) with exactly one epoch directly above them in
    /// every chain that contains them: by data id, then epoch.
    pub fn foldable(&self, data_id: Option<u64>) -> Vec<Foldable> {
        // data id -> hidden epoch -> the epochs directly above it.
        let mut above: BTreeMap<u64, BTreeMap<u64, BTreeSet<u64>>> = BTreeMap::new();
        let mut tops: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        for v in self.volumes.values() {
            let d = v.data_volume_id();
            if data_id.is_some_and(|w| w != d) {
                continue;
            }
            let views = std::iter::once((v.head_epoch, &v.chain))
                .chain(v.snapshots.iter().map(|s| (s.epoch, &s.chain)));
            for (top, chain) in views {
                tops.entry(d).or_default().insert(top);
                let mut child = top;
                for &e in chain.iter() {
                    above
                        .entry(d)
                        .or_default()
                        .entry(e)
                        .or_default()
                        .insert(child);
                    child = e;
                }
            }
        }
        let mut out = Vec::new();
        for (d, epochs) in above {
            for (e, children) in epochs {
                if tops[&d].contains(&e) || children.len() != 1 {
                    continue;
                }
                let child = *children.first().expect("one");
                out.push(Foldable {
                    data_id: d,
                    epoch: e,
                    child,
                });
            }
        }
        out
    }

    /// The frozen epochs beneath `epoch` of `data_id`, newest first, from
    /// any live view that contains it (a volume's head and chain, a
    /// snapshot's epoch and chain; they all agree, since the chain beneath
    /// an epoch is fixed when the epoch is made). `None` if none does.
    pub fn chain_beneath(&self, data_id: u64, epoch: u64) -> Option<Vec<u64>> {
        self.volumes
            .values()
            .filter(|v| v.data_volume_id() == data_id)
            .find_map(|v| {
                let views = std::iter::once((v.head_epoch, &v.chain))
                    .chain(v.snapshots.iter().map(|s| (s.epoch, &s.chain)));
                for (top, chain) in views {
                    if top == epoch {
                        return Some(chain.clone());
                    }
                    if let Some(at) = chain.iter().position(|&e| e == epoch) {
                        return Some(chain[at + 1..].to_vec());
                    }
                }
                None
            })
    }

    /// Whether [`Command::CreateSnapshot`](super::Command::CreateSnapshot)
    /// would be applied now, without applying it: the API asks before it
    /// pauses front ends for a snapshot that would be refused anyway.
    pub fn check_create_snapshot(&self, c: &CreateSnapshot) -> Result<(), StateError> {
        self.plan_create_snapshot(c, 0).map(|_| ())
    }

    /// Whether [`Command::RollbackVolume`](super::Command::RollbackVolume)
    /// would be applied now, without applying it (see
    /// [`State::check_create_snapshot`]).
    pub fn check_rollback(&self, c: &RollbackVolume) -> Result<(), StateError> {
        self.plan_rollback(c, 0).map(|_| ())
    }

    /// The epoch a new head gets now (not yet taken: see
    /// [`State::take_epoch`]).
    pub(super) fn new_epoch(&self) -> Result<u64, StateError> {
        if self.next_epoch == u64::MAX {
            return Err(StateError::Exhausted {
                counter: "epoch",
                value: self.next_epoch,
            });
        }
        Ok(self.next_epoch)
    }

    /// Records `epoch` as given out under `data_id`.
    pub(super) fn take_epoch(&mut self, data_id: u64, epoch: u64) {
        self.epochs.entry(data_id).or_default().insert(epoch);
        self.next_epoch = self.next_epoch.max(epoch.saturating_add(1));
    }

    /// The head of `v` as a new snapshot named `name`, checked.
    fn plan_snapshot_of(
        &self,
        v: &VolumeInfo,
        name: &str,
        now_unix_ms: u64,
    ) -> Result<SnapshotPlan, StateError> {
        validate::volume_name(name).map_err(|reason| StateError::InvalidSnapshotName {
            volume: v.name.clone(),
            name: validate::shown(name),
            reason,
        })?;
        if let Some(s) = v.snapshot(name) {
            return Err(StateError::DuplicateSnapshotName {
                volume: v.name.clone(),
                name: name.to_string(),
                id: s.id,
            });
        }
        if v.snapshots.len() >= SNAPSHOTS_PER_VOLUME_MAX {
            return Err(StateError::TooManySnapshots {
                volume: v.name.clone(),
                max: SNAPSHOTS_PER_VOLUME_MAX,
            });
        }
        let id = v
            .last_snapshot_id
            .checked_add(1)
            .ok_or(StateError::Exhausted {
                counter: "snapshot id",
                value: v.last_snapshot_id,
            })?;
        Ok(SnapshotPlan {
            volume_id: v.id,
            snapshot: SnapshotInfo {
                id,
                name: name.to_string(),
                epoch: v.head_epoch,
                created_unix_ms: now_unix_ms,
                chain: v.chain.clone(),
                size_bytes: v.size_bytes,
            },
            epoch: self.new_epoch()?,
            catalogue_version: self.next_catalogue_version()?,
        })
    }

    fn plan_create_snapshot(
        &self,
        c: &CreateSnapshot,
        now_unix_ms: u64,
    ) -> Result<SnapshotPlan, StateError> {
        let id = self.resolve(c.volume.as_ref())?;
        let v = &self.volumes[&id];
        let plan = self.plan_snapshot_of(v, &c.name, now_unix_ms)?;
        if v.chain.len() >= CHAIN_EPOCHS_MAX {
            return Err(StateError::ChainTooLong {
                volume: v.name.clone(),
                max: CHAIN_EPOCHS_MAX,
            });
        }
        Ok(plan)
    }

    /// Records `plan.snapshot` in its volume (nothing fallible).
    fn record_snapshot(&mut self, plan: &SnapshotPlan) -> &mut VolumeInfo {
        self.catalogue_version = plan.catalogue_version;
        let v = self
            .volumes
            .get_mut(&plan.volume_id)
            .expect("the plan resolved the volume");
        v.last_snapshot_id = plan.snapshot.id;
        v.snapshots.push(plan.snapshot.clone());
        v
    }

    pub(super) fn create_snapshot(
        &mut self,
        c: &CreateSnapshot,
        now_unix_ms: u64,
    ) -> Result<Outcome, StateError> {
        let plan = self.plan_create_snapshot(c, now_unix_ms)?;
        let v = self.record_snapshot(&plan);
        let frozen = std::mem::replace(&mut v.head_epoch, plan.epoch);
        v.chain.insert(0, frozen);
        let (data_id, volume) = (v.data_volume_id(), v.clone());
        self.take_epoch(data_id, plan.epoch);
        Ok(Outcome {
            volume: Some(volume),
            snapshot: Some(plan.snapshot),
            ..Outcome::default()
        })
    }

    pub(super) fn delete_snapshot(&mut self, c: &DeleteSnapshot) -> Result<Outcome, StateError> {
        let id = self.resolve(c.volume.as_ref())?;
        let v = &self.volumes[&id];
        let at = v
            .snapshots
            .iter()
            .position(|s| s.name == c.name)
            .ok_or_else(|| StateError::UnknownSnapshot {
                volume: v.name.clone(),
                name: validate::shown(&c.name),
            })?;
        let version = self.next_catalogue_version()?;
        self.catalogue_version = version;
        let v = self.volumes.get_mut(&id).expect("resolved above");
        let gone = v.snapshots.remove(at);
        Ok(Outcome {
            volume: Some(v.clone()),
            snapshot: Some(gone),
            ..Outcome::default()
        })
    }

    /// `before-rollback-<to>-<n>`, the lowest `n` from 1 whose name `v`
    /// does not have; `<to>` is shortened to keep the name within
    /// [`VOLUME_NAME_BYTES_MAX`].
    fn keep_name(v: &VolumeInfo, to: &str) -> String {
        let base = format!("before-rollback-{to}");
        (1..)
            .map(|n| {
                let suffix = format!("-{n}");
                // Snapshot names are ASCII: any byte is a char boundary.
                let room = VOLUME_NAME_BYTES_MAX - suffix.len();
                format!("{}{suffix}", &base[..base.len().min(room)])
            })
            .find(|name| v.snapshot(name).is_none())
            .expect("one of snapshots + 1 names is free")
    }

    fn plan_rollback(
        &self,
        c: &RollbackVolume,
        now_unix_ms: u64,
    ) -> Result<RollbackPlan, StateError> {
        let id = self.resolve(c.volume.as_ref())?;
        let v = &self.volumes[&id];
        let to = v
            .snapshot(&c.snapshot)
            .cloned()
            .ok_or_else(|| StateError::UnknownSnapshot {
                volume: v.name.clone(),
                name: validate::shown(&c.snapshot),
            })?;
        let keep_as = if c.keep_as.is_empty() {
            Self::keep_name(v, &to.name)
        } else {
            c.keep_as.clone()
        };
        let kept = self.plan_snapshot_of(v, &keep_as, now_unix_ms)?;
        Ok(RollbackPlan { kept, to })
    }

    pub(super) fn rollback_volume(
        &mut self,
        c: &RollbackVolume,
        now_unix_ms: u64,
    ) -> Result<Outcome, StateError> {
        let RollbackPlan { kept, to } = self.plan_rollback(c, now_unix_ms)?;
        let v = self.record_snapshot(&kept);
        v.head_epoch = kept.epoch;
        v.chain = std::iter::once(to.epoch).chain(to.chain).collect();
        v.size_bytes = to.size_bytes;
        let (data_id, volume) = (v.data_volume_id(), v.clone());
        self.take_epoch(data_id, kept.epoch);
        Ok(Outcome {
            volume: Some(volume),
            snapshot: Some(kept.snapshot),
            ..Outcome::default()
        })
    }

    pub(super) fn clone_volume(
        &mut self,
        c: &CloneVolume,
        now_unix_ms: u64,
    ) -> Result<Outcome, StateError> {
        let source_id = self.resolve(c.volume.as_ref())?;
        let source = &self.volumes[&source_id];
        let snapshot =
            source
                .snapshot(&c.snapshot)
                .cloned()
                .ok_or_else(|| StateError::UnknownSnapshot {
                    volume: source.name.clone(),
                    name: validate::shown(&c.snapshot),
                })?;
        let name = &c.name;
        self.check_new_name(name)?;
        let (id, next_volume_id) = self.new_volume_id(name)?;
        let version = self.next_catalogue_version()?;
        let epoch = self.new_epoch()?;
        let volume = VolumeInfo {
            id,
            name: name.clone(),
            size_bytes: snapshot.size_bytes,
            extent_size_bytes: source.extent_size_bytes,
            replicas: source.replicas,
            min_replicas: source.min_replicas,
            created_unix_ms: now_unix_ms,
            head_epoch: epoch,
            parent: Some(SnapshotRef {
                volume_id: source_id,
                snapshot_id: snapshot.id,
            }),
            snapshots: Vec::new(),
            data_id: source.data_volume_id(),
            chain: std::iter::once(snapshot.epoch)
                .chain(snapshot.chain.iter().copied())
                .collect(),
            last_snapshot_id: 0,
        };
        self.volumes.insert(id, volume.clone());
        self.names.insert(name.clone(), id);
        self.next_volume_id = next_volume_id;
        self.catalogue_version = version;
        self.take_epoch(volume.data_id, epoch);
        Ok(Outcome {
            volume: Some(volume),
            snapshot: Some(snapshot),
            ..Outcome::default()
        })
    }

    /// See [`Command::FoldEpoch`]: drops a hidden epoch with one child from
    /// every chain (volume heads' and snapshots'); it is then dead.
    pub(super) fn fold_epoch(&mut self, c: &Foldable) -> Result<Outcome, StateError> {
        if !self.foldable(Some(c.data_id)).contains(c) {
            return Err(StateError::EpochNotFoldable {
                data_id: c.data_id,
                epoch: c.epoch,
                child: c.child,
            });
        }
        let version = self.next_catalogue_version()?;
        self.catalogue_version = version;
        for v in self
            .volumes
            .values_mut()
            .filter(|v| v.data_volume_id() == c.data_id)
        {
            v.chain.retain(|&e| e != c.epoch);
            for s in &mut v.snapshots {
                s.chain.retain(|&e| e != c.epoch);
            }
        }
        Ok(Outcome::default())
    }

    pub(super) fn epochs_collected(&mut self, c: &EpochsCollected) -> Result<Outcome, StateError> {
        let Some(given) = self.epochs.get(&c.data_id) else {
            return Ok(Outcome::default()); // all forgotten already
        };
        for v in self
            .volumes
            .values()
            .filter(|v| v.data_volume_id() == c.data_id)
        {
            let refs: BTreeSet<u64> = referenced(v).collect();
            if let Some(&epoch) = c
                .epochs
                .iter()
                .find(|e| given.contains(e) && refs.contains(e))
            {
                return Err(StateError::EpochReferenced {
                    data_id: c.data_id,
                    epoch,
                    by: format!("volume {:?} (id {})", v.name, v.id),
                });
            }
        }
        let given = self.epochs.get_mut(&c.data_id).expect("looked up above");
        for e in &c.epochs {
            given.remove(e);
        }
        if given.is_empty() {
            self.epochs.remove(&c.data_id);
        }
        Ok(Outcome::default())
    }
}

fn invariant(reason: String) -> RestoreError {
    RestoreError::Invariant { reason }
}

/// Strictly descending and below `top`.
fn descends_below(top: u64, chain: &[u64]) -> bool {
    let mut previous = top;
    chain.iter().all(|&e| {
        let ok = e < previous;
        previous = e;
        ok
    })
}

/// Checks the volumes' snapshots and epochs against `next_epoch` and the
/// given-out epochs of a snapshot, and answers the state's `next_epoch`
/// and `epochs`. A snapshot from before epochs were counted has
/// `next_epoch` 0: then every referenced epoch counts as given out, and the
/// next epoch is one above the highest.
pub(super) fn restore_epochs(
    volumes: &BTreeMap<u64, VolumeInfo>,
    next_volume_id: u64,
    next_epoch: u64,
    given: Vec<DataEpochs>,
) -> Result<(u64, BTreeMap<u64, BTreeSet<u64>>), RestoreError> {
    let mut refs: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for v in volumes.values() {
        let what = format!("volume {} {:?}", v.id, v.name);
        if v.head_epoch == 0 || !descends_below(v.head_epoch, &v.chain) {
            return Err(invariant(format!(
                "{what}: head epoch {} over chain {:?} is not strictly descending from above 0",
                v.head_epoch, v.chain
            )));
        }
        if v.chain.len() > CHAIN_EPOCHS_MAX || v.snapshots.len() > SNAPSHOTS_PER_VOLUME_MAX {
            return Err(invariant(format!(
                "{what}: {} chain epochs and {} snapshots, at most {CHAIN_EPOCHS_MAX} and \
                 {SNAPSHOTS_PER_VOLUME_MAX} allowed",
                v.chain.len(),
                v.snapshots.len()
            )));
        }
        if v.data_id >= next_volume_id {
            return Err(invariant(format!(
                "{what}: data id {} not below the next volume id {next_volume_id}",
                v.data_id
            )));
        }
        let mut names = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for s in &v.snapshots {
            validate::volume_name(&s.name).map_err(|e| {
                invariant(format!("{what}: snapshot {} name {:?}: {e}", s.id, s.name))
            })?;
            if !names.insert(s.name.as_str()) {
                return Err(invariant(format!(
                    "{what}: two snapshots named {:?}",
                    s.name
                )));
            }
            if s.id == 0 || s.id > v.last_snapshot_id || !ids.insert(s.id) {
                return Err(invariant(format!(
                    "{what}: snapshot id {} is 0, repeated, or above the last given {}",
                    s.id, v.last_snapshot_id
                )));
            }
            if s.epoch == 0 || !descends_below(s.epoch, &s.chain) {
                return Err(invariant(format!(
                    "{what}: snapshot {:?}: epoch {} over chain {:?} is not strictly descending \
                     from above 0",
                    s.name, s.epoch, s.chain
                )));
            }
        }
        refs.entry(v.data_volume_id())
            .or_default()
            .extend(referenced(v));
    }
    if next_epoch == 0 {
        if !given.is_empty() {
            return Err(invariant(
                "epochs given out are recorded without a next epoch".into(),
            ));
        }
        let highest = refs.values().flatten().copied().max().unwrap_or(0);
        let next = highest
            .checked_add(1)
            .ok_or_else(|| invariant("an epoch is at u64::MAX".into()))?;
        return Ok((next, refs));
    }
    let mut epochs = BTreeMap::new();
    for d in given {
        if d.data_id == 0 || d.data_id >= next_volume_id || d.epochs.is_empty() {
            return Err(invariant(format!(
                "epochs of data id {}: the id is 0 or not below the next volume id \
                 {next_volume_id}, or none are listed",
                d.data_id
            )));
        }
        let set: BTreeSet<u64> = d.epochs.iter().copied().collect();
        if set.len() != d.epochs.len() || set.last().is_some_and(|&e| e >= next_epoch) {
            return Err(invariant(format!(
                "epochs of data id {}: repeated, or not below the next epoch {next_epoch}",
                d.data_id
            )));
        }
        if epochs.insert(d.data_id, set).is_some() {
            return Err(invariant(format!(
                "epochs of data id {} listed twice",
                d.data_id
            )));
        }
    }
    for (d, used) in &refs {
        let given = epochs.get(d);
        if let Some(e) = used.iter().find(|e| !given.is_some_and(|g| g.contains(e))) {
            return Err(invariant(format!(
                "epoch {e} of data id {d} is referenced but not recorded as given out"
            )));
        }
    }
    Ok((next_epoch, epochs))
}
