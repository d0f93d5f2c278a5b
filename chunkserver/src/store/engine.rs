//! PLACEHOLDER engine (in memory) so the rest of the crate builds while the
//! io_uring engine is written. Replaced before anything lands.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;

use super::*;

pub(crate) struct Shared {
    tx: Mutex<Option<mpsc::Sender<Command>>>,
}

impl Shared {
    pub(crate) fn send(&self, cmd: Command) -> Result<()> {
        let guard = self.tx.lock().expect("tx");
        match guard.as_ref() {
            Some(tx) => tx.send(cmd).map_err(|_| StoreError::ShuttingDown),
            None => Err(StoreError::ShuttingDown),
        }
    }
}

pub(crate) fn start(_root: &Path, _options: StoreOptions) -> Result<(Arc<Shared>, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<Command>();
    let thread = std::thread::spawn(move || {
        let mut map: BTreeMap<ExtentKey, (u32, Vec<u8>)> = BTreeMap::new();
        while let Ok(cmd) = rx.recv() {
            match cmd {
                Command::Read { key, offset, len, reply, .. } => {
                    let mut b = IoBuf::zeroed(len as usize);
                    if let Some((_, v)) = map.get(&key) {
                        b.copy_from_slice(&v[offset as usize..offset as usize + len as usize]);
                    }
                    let _ = reply.send(Ok(b));
                }
                Command::Write { key, extent_bytes, offset, data, reply, .. } => {
                    let e = map.entry(key).or_insert_with(|| (extent_bytes, vec![0; extent_bytes as usize]));
                    e.1[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                    let _ = reply.send(Ok(()));
                }
                Command::Zero { key, offset, len, reply, .. } => {
                    if let Some((_, v)) = map.get_mut(&key) {
                        v[offset as usize..(offset + len as u64) as usize].fill(0);
                    }
                    let _ = reply.send(Ok(()));
                }
                Command::Flush { reply } => {
                    let _ = reply.send(Ok(()));
                }
                Command::List { volume, after, limit, reply } => {
                    let mut page = ExtentPage::default();
                    for (k, (eb, _)) in map.iter() {
                        if volume.is_some_and(|v| v != k.volume_id) || after.is_some_and(|a| *k <= a) {
                            continue;
                        }
                        if page.extents.len() == limit {
                            page.more = true;
                            break;
                        }
                        page.extents.push(ExtentStat { key: *k, extent_bytes: *eb, allocated_bytes: *eb as u64 });
                    }
                    let _ = reply.send(page);
                }
                Command::Stat { key, reply } => {
                    let _ = reply.send(map.get(&key).map(|(eb, _)| ExtentStat {
                        key,
                        extent_bytes: *eb,
                        allocated_bytes: *eb as u64,
                    }));
                }
                Command::Usage { reply } => {
                    let _ = reply.send(StoreUsage {
                        extents: map.len() as u64,
                        allocated_bytes: map.values().map(|(eb, _)| *eb as u64).sum(),
                    });
                }
                Command::Shutdown { reply } => {
                    let _ = reply.send(Ok(()));
                    break;
                }
            }
        }
    });
    Ok((Arc::new(Shared { tx: Mutex::new(Some(tx)) }), thread))
}
