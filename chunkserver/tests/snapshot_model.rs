//! Snapshots end to end below the network: the volume manager's real state
//! machine decides heads, chains and dead epochs; a real store holds the
//! data, read through each view's chain as the chunk servers do; random
//! writes, zeroings, snapshots, snapshot deletions, rollbacks, clones,
//! volume deletions, folds of hidden epochs (copy-up, then `FoldEpoch`) and
//! garbage collection passes run against a model where
//! every volume and snapshot is a plain byte array. Every view must read
//! exactly its model after every step, and garbage collection must never
//! delete a version a live view reads (every view is read after it).

use std::collections::BTreeMap;

use cairn_chunkserver::store::{ExtentKey, IoBuf, Store, StoreOptions};
use cairn_proto::map::VolumeInfo;
use cairn_volmgr::state::*;
use proptest::prelude::*;

const EXTENT: u32 = 64 << 10;
const EXTENTS: u64 = 3;
const SIZE: u64 = EXTENT as u64 * EXTENTS;
const VOLUMES_MAX: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    Write {
        vol: usize,
        at: u64,
        len: u64,
        byte: u8,
    },
    Zero {
        vol: usize,
        at: u64,
        len: u64,
    },
    Snapshot {
        vol: usize,
    },
    DeleteSnapshot {
        vol: usize,
        snap: usize,
    },
    Rollback {
        vol: usize,
        snap: usize,
    },
    Clone {
        vol: usize,
        snap: usize,
    },
    DeleteVolume {
        vol: usize,
    },
    /// Folds the first foldable hidden epoch as the chunk servers' driver
    /// does: copies up what each of its versions holds into its child,
    /// then `FoldEpoch`.
    Fold,
    Collect,
    Reopen,
}

/// 512-byte aligned ranges, mostly small, some crossing extents.
fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        3 => (0..SIZE / 512, 1u64..16).prop_map(|(s, n)| (s * 512, n * 512)),
        1 => (0..SIZE / 4096, 1u64..40).prop_map(|(s, n)| (s * 4096, n * 4096)),
    ]
    .prop_map(|(at, len)| (at, len.min(SIZE - at)))
}

fn op() -> impl Strategy<Value = Op> {
    let v = 0..VOLUMES_MAX;
    prop_oneof![
        8 => (v.clone(), range(), any::<u8>()).prop_map(|(vol, (at, len), byte)| Op::Write { vol, at, len, byte }),
        2 => (v.clone(), range()).prop_map(|(vol, (at, len))| Op::Zero { vol, at, len }),
        3 => v.clone().prop_map(|vol| Op::Snapshot { vol }),
        1 => (v.clone(), 0..4usize).prop_map(|(vol, snap)| Op::DeleteSnapshot { vol, snap }),
        1 => (v.clone(), 0..4usize).prop_map(|(vol, snap)| Op::Rollback { vol, snap }),
        1 => (v.clone(), 0..4usize).prop_map(|(vol, snap)| Op::Clone { vol, snap }),
        1 => v.prop_map(|vol| Op::DeleteVolume { vol }),
        1 => Just(Op::Collect),
        2 => Just(Op::Fold),
        1 => Just(Op::Reopen),
    ]
}

struct World {
    state: State,
    seq: u64,
    store: Store,
    root: std::path::PathBuf,
    /// Model: volume name → bytes; (volume name, snapshot name) → bytes.
    volumes: BTreeMap<String, Vec<u8>>,
    snapshots: BTreeMap<(String, String), Vec<u8>>,
    next_name: u64,
}

fn options() -> StoreOptions {
    StoreOptions {
        engines: 2,
        ..StoreOptions::default()
    }
}

impl World {
    fn apply(&mut self, command: Command) -> Response {
        self.seq += 1;
        self.state.apply(&Proposal {
            client_id: 7,
            client_seq: self.seq,
            proposed_unix_ms: 1_000 + self.seq,
            command: Some(command),
        })
    }

    fn info(&self, name: &str) -> VolumeInfo {
        self.state.volume_by_name(name).expect("volume").clone()
    }

    fn name_at(&self, i: usize) -> Option<String> {
        let names: Vec<&String> = self.volumes.keys().collect();
        (!names.is_empty()).then(|| names[i % names.len()].clone())
    }

    fn snapshot_at(&self, vol: &str, i: usize) -> Option<String> {
        let snaps = &self.info(vol).snapshots;
        (!snaps.is_empty()).then(|| snaps[i % snaps.len()].name.clone())
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.next_name += 1;
        format!("{prefix}{}", self.next_name)
    }

    /// Writes (or zeroes) through the volume's head as a chunk server does.
    async fn write(&mut self, name: &str, at: u64, len: u64, byte: Option<u8>) {
        let v = self.info(name);
        let mut pos = at;
        while pos < at + len {
            let index = pos / EXTENT as u64;
            let off = pos % EXTENT as u64;
            let n = (EXTENT as u64 - off).min(at + len - pos);
            let key = ExtentKey {
                volume_id: v.data_volume_id(),
                extent_index: index,
                epoch: v.head_epoch,
            };
            match byte {
                Some(b) => self
                    .store
                    .write_at(
                        key,
                        &v.chain,
                        EXTENT,
                        off,
                        IoBuf::copy_from(&vec![b; n as usize]),
                        false,
                    )
                    .await
                    .unwrap(),
                None => self
                    .store
                    .write_zeroes_at(key, &v.chain, EXTENT, off, n as u32, false, true)
                    .await
                    .unwrap(),
            }
            pos += n;
        }
        let model = self.volumes.get_mut(name).unwrap();
        model[at as usize..(at + len) as usize].fill(byte.unwrap_or(0));
    }

    async fn read_view(&self, data_id: u64, epoch: u64, chain: &[u64]) -> Vec<u8> {
        let mut out = Vec::new();
        for index in 0..EXTENTS {
            let key = ExtentKey {
                volume_id: data_id,
                extent_index: index,
                epoch,
            };
            let buf = self
                .store
                .read_at(key, chain, EXTENT, 0, EXTENT)
                .await
                .unwrap();
            out.extend_from_slice(&buf);
        }
        out
    }

    async fn check(&self, step: usize) {
        for (name, model) in &self.volumes {
            let v = self.info(name);
            let got = self
                .read_view(v.data_volume_id(), v.head_epoch, &v.chain)
                .await;
            assert!(
                &got == model,
                "step {step}: volume {name} differs from its model"
            );
            for s in &v.snapshots {
                let got = self.read_view(v.data_volume_id(), s.epoch, &s.chain).await;
                let model = &self.snapshots[&(name.clone(), s.name.clone())];
                assert!(
                    &got == model,
                    "step {step}: snapshot {name}@{} differs",
                    s.name
                );
            }
        }
    }

    async fn collect(&mut self) {
        for d in self.state.dead_epochs(None) {
            let page = self
                .store
                .list(Some(d.data_id), None, 100_000)
                .await
                .unwrap();
            for e in page.extents {
                if d.epochs.contains(&e.key.epoch) {
                    self.store.delete_version(e.key).await.unwrap();
                }
            }
        }
    }

    async fn fold(&mut self) {
        let Some(f) = self.state.foldable(None).first().copied() else {
            return;
        };
        let below = self
            .state
            .chain_beneath(f.data_id, f.child)
            .expect("the child is live");
        for index in 0..EXTENTS {
            let key = |epoch| ExtentKey {
                volume_id: f.data_id,
                extent_index: index,
                epoch,
            };
            let Some(held) = self.store.held_blocks(key(f.epoch)).await.unwrap() else {
                continue;
            };
            for (start, count) in cairn_client::held_runs(&held, EXTENT as u64 / 4096) {
                self.store
                    .materialize_at(
                        key(f.child),
                        &below,
                        EXTENT,
                        start * 4096,
                        count as u32 * 4096,
                    )
                    .await
                    .unwrap();
            }
        }
        let r = self.apply(Command::FoldEpoch(f));
        assert!(r.is_ok(), "{}", r.message);
        assert!(
            self.state.chain_beneath(f.data_id, f.child).unwrap().len() < below.len(),
            "folded out of the child's chain"
        );
    }

    async fn step(&mut self, op: Op) {
        match op {
            Op::Write { vol, at, len, byte } => {
                if let Some(name) = self.name_at(vol) {
                    self.write(&name, at, len, Some(byte)).await;
                }
            }
            Op::Zero { vol, at, len } => {
                if let Some(name) = self.name_at(vol) {
                    self.write(&name, at, len, None).await;
                }
            }
            Op::Snapshot { vol } => {
                let Some(name) = self.name_at(vol) else {
                    return;
                };
                let snap = self.fresh("s");
                let r = self.apply(Command::CreateSnapshot(CreateSnapshot {
                    volume: Some(VolumeKey::name(&name)),
                    name: snap.clone(),
                }));
                assert!(r.is_ok(), "{}", r.message);
                let content = self.volumes[&name].clone();
                self.snapshots.insert((name, snap), content);
            }
            Op::DeleteSnapshot { vol, snap } => {
                let Some(name) = self.name_at(vol) else {
                    return;
                };
                let Some(snap) = self.snapshot_at(&name, snap) else {
                    return;
                };
                let r = self.apply(Command::DeleteSnapshot(DeleteSnapshot {
                    volume: Some(VolumeKey::name(&name)),
                    name: snap.clone(),
                }));
                assert!(r.is_ok(), "{}", r.message);
                self.snapshots.remove(&(name, snap));
            }
            Op::Rollback { vol, snap } => {
                let Some(name) = self.name_at(vol) else {
                    return;
                };
                let Some(snap) = self.snapshot_at(&name, snap) else {
                    return;
                };
                let keep = self.fresh("k");
                let r = self.apply(Command::RollbackVolume(RollbackVolume {
                    volume: Some(VolumeKey::name(&name)),
                    snapshot: snap.clone(),
                    keep_as: keep.clone(),
                }));
                assert!(r.is_ok(), "{}", r.message);
                let head = self.volumes[&name].clone();
                self.snapshots.insert((name.clone(), keep), head);
                let back = self.snapshots[&(name.clone(), snap)].clone();
                self.volumes.insert(name, back);
            }
            Op::Clone { vol, snap } => {
                if self.volumes.len() >= VOLUMES_MAX {
                    return;
                }
                let Some(name) = self.name_at(vol) else {
                    return;
                };
                let Some(snap) = self.snapshot_at(&name, snap) else {
                    return;
                };
                let new = self.fresh("c");
                let r = self.apply(Command::CloneVolume(CloneVolume {
                    volume: Some(VolumeKey::name(&name)),
                    snapshot: snap.clone(),
                    name: new.clone(),
                }));
                assert!(r.is_ok(), "{}", r.message);
                let content = self.snapshots[&(name, snap)].clone();
                self.volumes.insert(new, content);
            }
            Op::DeleteVolume { vol } => {
                if self.volumes.len() <= 1 {
                    return;
                }
                let Some(name) = self.name_at(vol) else {
                    return;
                };
                let r = self.apply(Command::DeleteVolume(DeleteVolume {
                    volume: Some(VolumeKey::name(&name)),
                }));
                assert!(r.is_ok(), "{}", r.message);
                self.volumes.remove(&name);
                self.snapshots.retain(|(v, _), _| *v != name);
            }
            Op::Collect => self.collect().await,
            Op::Fold => self.fold().await,
            Op::Reopen => {
                self.store.shutdown().await.unwrap();
                self.store = Store::open(&self.root, options()).unwrap();
            }
        }
    }
}

fn run(ops: Vec<Op>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let mut w = World {
            state: State::new(),
            seq: 0,
            store: Store::open(&root, options()).unwrap(),
            root,
            volumes: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            next_name: 0,
        };
        let r = w.apply(Command::SetGroupCount(SetGroupCount { group_count: 4 }));
        assert!(r.is_ok(), "{}", r.message);
        let r = w.apply(Command::RegisterNode(RegisterNode {
            node_id: 1,
            addr: "127.0.0.2:7410".into(),
            host: "h1".into(),
            rack: String::new(),
            room: String::new(),
            weight: 1,
            capacity_bytes: 1 << 40,
        }));
        assert!(r.is_ok(), "{}", r.message);
        let r = w.apply(Command::CreateVolume(CreateVolume {
            name: "v".into(),
            size_bytes: SIZE,
            extent_size_bytes: EXTENT,
            replicas: 1,
            min_replicas: 1,
            epoch_from_counter: true,
        }));
        assert!(r.is_ok(), "{}", r.message);
        w.volumes.insert("v".into(), vec![0; SIZE as usize]);
        for (i, op) in ops.into_iter().enumerate() {
            w.step(op).await;
            w.check(i).await;
        }
        w.collect().await;
        w.check(usize::MAX).await;
        w.store.shutdown().await.unwrap();
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn views_read_their_models_through_snapshots_rollbacks_clones_and_collection(
        ops in proptest::collection::vec(op(), 1..60)
    ) {
        run(ops);
    }
}
