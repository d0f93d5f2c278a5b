//! [`Volume`]: reading and writing one volume. A call's byte range is split
//! into pieces (one extent and at most one frame each), the pieces run
//! concurrently, each to its group's primary (see [`Cluster::run`] for
//! routing and retries), and a read is put back together in order.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cairn_group::msg::{ClientOp, WriteOp};
use cairn_group::{ExtentId, GroupKey};
use cairn_proto::frame::FRAME_DATA_BYTES_MAX;
use cairn_proto::map::VolumeInfo;
use futures::stream::{self, StreamExt, TryStreamExt};

use crate::cluster::Cluster;
use crate::error::ClientError;
use crate::split::{check_range, split, Piece};

/// Pieces of one call in flight at once (a 1 TiB trim is 262,144 extents).
const PIECES_IN_FLIGHT: usize = 64;

/// An open volume. Clones share it (and its record of unflushed groups).
#[derive(Clone)]
pub struct Volume {
    inner: Arc<Inner>,
}

struct Inner {
    cluster: Arc<Cluster>,
    info: VolumeInfo,
    /// The epoch writes go to: `info.head_epoch` until a snapshot moves it
    /// (see [`Volume::switch_head`]).
    head: AtomicU64,
    /// The size in bytes: `info.size_bytes` until the volume grows under an
    /// open handle (see [`Volume::grow`]).
    size: AtomicU64,
    /// The frozen epochs beneath `head`, newest first (`info.chain` until
    /// a snapshot); what block status looks at.
    chain: Mutex<Vec<u64>>,
    dirty: Mutex<Dirty>,
    /// See [`Volume::flush_stores_on_next_flush`].
    flush_stores: AtomicBool,
}

/// Groups that acknowledged non-FUA writes since their last flush. Each
/// entry carries the generation of its latest write, so a flush clears only
/// what it covered: a write that completes while the flush runs stays dirty.
#[derive(Default)]
struct Dirty {
    generation: u64,
    groups: HashMap<GroupKey, u64>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("info", &self.inner.info)
            .finish_non_exhaustive()
    }
}

/// Checks a catalogue record is one this client can serve.
fn check_info(info: &VolumeInfo) -> Result<(), String> {
    let e = info.extent_size_bytes;
    if !e.is_power_of_two() || !((64 << 10)..=(64 << 20)).contains(&e) {
        return Err(format!(
            "extent size {e} is not a power of two from 64 KiB to 64 MiB"
        ));
    }
    if info.replicas == 0 {
        return Err("replica count is 0".into());
    }
    if !info.size_bytes.is_multiple_of(512) {
        return Err(format!("size {} is not whole sectors", info.size_bytes));
    }
    Ok(())
}

impl Volume {
    pub(crate) fn new(cluster: Arc<Cluster>, info: VolumeInfo) -> Result<Volume, ClientError> {
        check_info(&info).map_err(|reason| ClientError::InvalidArgument {
            volume: info.name.clone(),
            offset: 0,
            len: info.size_bytes,
            reason: format!("unusable volume record: {reason}"),
        })?;
        Ok(Volume {
            inner: Arc::new(Inner {
                cluster,
                head: AtomicU64::new(info.head_epoch),
                size: AtomicU64::new(info.size_bytes),
                chain: Mutex::new(info.chain.clone()),
                info,
                dirty: Mutex::new(Dirty::default()),
                flush_stores: AtomicBool::new(false),
            }),
        })
    }

    /// The catalogue record as of opening: size, extent size, replicas.
    /// Its `head_epoch` and `chain` may be out of date: see
    /// [`head_epoch`](Self::head_epoch) and [`view`](Self::view).
    pub fn info(&self) -> &VolumeInfo {
        &self.inner.info
    }

    /// The epoch writes go to now.
    pub fn head_epoch(&self) -> u64 {
        self.inner.head.load(Ordering::SeqCst)
    }

    /// Every epoch this volume reads: the head, then the frozen epochs
    /// beneath it, newest first.
    pub fn view(&self) -> Vec<u64> {
        let chain = self.inner.chain.lock().unwrap_or_else(|p| p.into_inner());
        std::iter::once(self.head_epoch())
            .chain(chain.iter().copied())
            .collect()
    }

    /// Moves writes to a new head epoch after a snapshot froze the old
    /// one. The caller (a front end) must have drained every write to the
    /// old head first and start none while this runs: a write that reached
    /// the old epoch after the snapshot was taken would change the
    /// snapshot.
    pub fn switch_head(&self, head_epoch: u64, chain: Vec<u64>) {
        let mut c = self.inner.chain.lock().unwrap_or_else(|p| p.into_inner());
        *c = chain;
        self.inner.head.store(head_epoch, Ordering::SeqCst);
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.inner.info.name
    }

    /// The volume's size in bytes, as of the last [`grow`](Self::grow)
    /// (`info().size_bytes` is the size it was opened with).
    pub fn size(&self) -> u64 {
        self.inner.size.load(Ordering::SeqCst)
    }

    /// Takes a larger size the volume manager recorded (volumes only grow),
    /// so requests up to it are accepted. Returns whether the size changed;
    /// a smaller or unaligned size changes nothing.
    pub fn grow(&self, size_bytes: u64) -> bool {
        if !size_bytes.is_multiple_of(512) {
            return false;
        }
        self.inner.size.fetch_max(size_bytes, Ordering::SeqCst) < size_bytes
    }

    /// The Cluster the volume was opened on.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.inner.cluster
    }

    fn extent_bytes(&self) -> u64 {
        self.inner.info.extent_size_bytes as u64
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        check_range(self.size(), offset, len).map_err(|reason| ClientError::InvalidArgument {
            volume: self.inner.info.name.clone(),
            offset,
            len,
            reason,
        })
    }

    fn ext(&self, p: &Piece) -> ExtentId {
        self.extent_id(p.index)
    }

    /// Extent `index` of the version this handle reads and writes.
    pub(crate) fn extent_id(&self, index: u64) -> ExtentId {
        ExtentId {
            volume: self.inner.info.data_volume_id(),
            index,
            epoch: self.head_epoch(),
        }
    }

    /// Reads `len` bytes at `offset` (both multiples of 512).
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, ClientError> {
        self.check(offset, len)?;
        let mut pieces = split(
            offset,
            len,
            self.extent_bytes(),
            FRAME_DATA_BYTES_MAX as u64,
        )
        .peekable();
        let Some(first) = pieces.next() else {
            return Ok(Bytes::new());
        };
        if pieces.peek().is_none() {
            return self.read_piece(first).await;
        }
        let mut out = BytesMut::with_capacity(len as usize);
        let mut parts = stream::iter(std::iter::once(first).chain(pieces))
            .map(|p| self.read_piece(p))
            .buffered(PIECES_IN_FLIGHT);
        while let Some(part) = parts.try_next().await? {
            out.extend_from_slice(&part);
        }
        Ok(out.freeze())
    }

    async fn read_piece(&self, p: Piece) -> Result<Bytes, ClientError> {
        let op = ClientOp::Read {
            ext: self.ext(&p),
            offset: p.offset,
            len: p.len,
        };
        let (_, data) = self.inner.cluster.run(&self.inner.info, op, None).await?;
        Ok(data)
    }

    /// Writes `data` at `offset` (both multiples of 512). With `fua` it is
    /// durable on every replica when this returns; otherwise after the next
    /// [`flush`](Self::flush).
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        let len = data.len() as u64;
        self.check(offset, len)?;
        let pieces = split(
            offset,
            len,
            self.extent_bytes(),
            FRAME_DATA_BYTES_MAX as u64,
        );
        self.write_pieces(pieces, fua, |p| WriteOp::Data {
            offset: p.offset,
            data: data.slice(p.pos as usize..(p.pos + p.len) as usize),
        })
        .await
    }

    /// COMPARE AND WRITE (SCSI; VMware's ATS locks): if the bytes at
    /// `offset` equal `compare`, writes `data` (as long) there and returns
    /// `None`; otherwise writes nothing and returns the position of the
    /// first byte that differs, counted from `offset`.
    ///
    /// Inside one extent the group's primary reads, compares and writes
    /// under one range lock, so no other write to the range, from this
    /// client or any other, lands in between. A range that crosses an
    /// extent boundary has two primaries: it is read, compared and written
    /// by this client, atomic only against writers that serialize with the
    /// caller (ARCHITECTURE.md, "COMPARE AND WRITE").
    pub async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        fua: bool,
    ) -> Result<Option<u64>, ClientError> {
        let len = data.len() as u64;
        self.check(offset, len)?;
        if compare.len() != data.len() {
            return Err(ClientError::InvalidArgument {
                volume: self.inner.info.name.clone(),
                offset,
                len,
                reason: format!("compares {} bytes but writes {}", compare.len(), data.len()),
            });
        }
        // Half a frame: the request carries both halves.
        let mut pieces = split(
            offset,
            len,
            self.extent_bytes(),
            FRAME_DATA_BYTES_MAX as u64 / 2,
        );
        let (Some(p), None) = (pieces.next(), pieces.next()) else {
            let found = self.read(offset, len).await?;
            if let Some(at) = first_difference(&found, &compare) {
                return Ok(Some(at));
            }
            self.write(offset, data, fua).await?;
            return Ok(None);
        };
        let op = ClientOp::CompareAndWrite {
            ext: self.ext(&p),
            offset: p.offset,
            compare: compare.clone(),
            data,
            fua,
        };
        let (key, found) = self.inner.cluster.run(&self.inner.info, op, None).await?;
        if found.is_empty() {
            if !fua {
                self.mark_dirty(key);
            }
            return Ok(None);
        }
        // The primary answers the bytes it found only when they differ.
        Ok(Some(first_difference(&found, &compare).unwrap_or(0)))
    }

    /// Makes `len` bytes at `offset` read as zeros.
    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), ClientError> {
        self.check(offset, len)?;
        // No data travels, so a piece may be a whole extent.
        let pieces = split(offset, len, self.extent_bytes(), self.extent_bytes());
        self.write_pieces(pieces, fua, |p| WriteOp::Zero {
            offset: p.offset,
            len: p.len,
        })
        .await
    }

    /// Copies up into this volume's head version (or the snapshot it views)
    /// every 4 KiB block of the range that version does not hold, from the
    /// versions beneath it, on every replica (`WriteOp::Materialize`).
    /// Nothing this view reads changes; afterwards an older version beneath
    /// it is no longer read through for those blocks. Durable after the
    /// next [`flush`](Self::flush).
    pub async fn materialize(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.check(offset, len)?;
        let align = cairn_group::msg::MATERIALIZE_ALIGN;
        if !offset.is_multiple_of(align) || !len.is_multiple_of(align) {
            return Err(ClientError::InvalidArgument {
                volume: self.inner.info.name.clone(),
                offset,
                len,
                reason: format!("a copy-up takes whole {align}-byte blocks"),
            });
        }
        let pieces = split(offset, len, self.extent_bytes(), self.extent_bytes());
        self.write_pieces(pieces, false, |p| WriteOp::Materialize {
            offset: p.offset,
            len: p.len,
        })
        .await
    }

    /// Discards `len` bytes at `offset`: they read as zeros afterwards (on
    /// the wire a zeroing; the store punches whole blocks).
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.write_zeroes(offset, len, false).await
    }

    async fn write_pieces(
        &self,
        pieces: impl Iterator<Item = Piece>,
        fua: bool,
        make: impl Fn(&Piece) -> WriteOp,
    ) -> Result<(), ClientError> {
        stream::iter(pieces)
            .map(|p| {
                let op = ClientOp::Write {
                    ext: self.ext(&p),
                    op: make(&p),
                    fua,
                };
                async move {
                    let (key, _) = self.inner.cluster.run(&self.inner.info, op, None).await?;
                    if !fua {
                        self.mark_dirty(key);
                    }
                    Ok::<(), ClientError>(())
                }
            })
            .buffer_unordered(PIECES_IN_FLIGHT)
            .try_collect()
            .await
    }

    fn mark_dirty(&self, key: GroupKey) {
        let mut d = self.inner.dirty.lock().unwrap_or_else(|p| p.into_inner());
        d.generation += 1;
        let g = d.generation;
        d.groups.insert(key, g);
    }

    /// Makes the next successful [`flush`](Self::flush) also flush the
    /// whole store of every chunk server that is up, once. For a front end
    /// taking over from a process that may have acknowledged writes and
    /// never flushed them (a restarted target whose clients reconnect and
    /// then flush): this Volume does not know which groups those writes
    /// went to, but every one of them is on every acting replica's store.
    pub fn flush_stores_on_next_flush(&self) {
        self.inner.flush_stores.store(true, Ordering::SeqCst);
    }

    /// Flushes the store of every chunk server that is up in the map,
    /// retrying (with a fresh map) until the I/O timeout: a server marked
    /// down in the meantime is no longer needed, its groups' other replicas
    /// hold what it held.
    async fn flush_stores(&self) -> Result<(), ClientError> {
        let cluster = &self.inner.cluster;
        let t0 = tokio::time::Instant::now();
        let timeout = cluster.config().io_timeout;
        let mut done: HashSet<(u64, String)> = HashSet::new();
        loop {
            let snap = cluster.snapshot();
            let todo: Vec<(u64, String)> = snap
                .map
                .nodes
                .iter()
                .filter(|n| n.up)
                .map(|n| (n.id, n.addr.clone()))
                .filter(|k| !done.contains(k))
                .collect();
            if todo.is_empty() {
                return Ok(());
            }
            let attempt = cluster.config().attempt_timeout;
            let results =
                futures::future::join_all(todo.into_iter().map(|(id, addr)| async move {
                    let r = async {
                        let conn = cluster.pool.get(&addr).await?;
                        tokio::time::timeout(attempt, conn.flush())
                            .await
                            .map_err(|_| format!("no answer within {attempt:?}"))?
                            .map_err(|e| e.to_string())
                    }
                    .await;
                    ((id, addr), r)
                }))
                .await;
            let mut last = String::new();
            for (k, r) in results {
                match r {
                    Ok(()) => {
                        done.insert(k);
                    }
                    Err(e) => last = format!("chunk server {} ({}): {e}", k.0, k.1),
                }
            }
            if !last.is_empty() {
                if t0.elapsed() >= timeout {
                    return Err(ClientError::TimedOut {
                        volume: self.inner.info.name.clone(),
                        op: "flush of every chunk server's store".into(),
                        group: None,
                        waited: t0.elapsed(),
                        last,
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Groups with writes not yet flushed (for tools and tests).
    pub fn unflushed_groups(&self) -> Vec<GroupKey> {
        let d = self.inner.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<GroupKey> = d.groups.keys().copied().collect();
        v.sort();
        v
    }

    /// Makes every write acknowledged before this call durable on every
    /// replica: sends a group flush to the current primary of every group
    /// that took non-FUA writes since its last successful flush.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let stores = self.inner.flush_stores.load(Ordering::SeqCst);
        let todo: Vec<(GroupKey, u64)> = {
            let d = self.inner.dirty.lock().unwrap_or_else(|p| p.into_inner());
            d.groups.iter().map(|(k, g)| (*k, *g)).collect()
        };
        let results =
            futures::future::join_all(todo.into_iter().map(|(key, generation)| async move {
                self.inner
                    .cluster
                    .run(&self.inner.info, ClientOp::Flush, Some(key))
                    .await?;
                let mut d = self.inner.dirty.lock().unwrap_or_else(|p| p.into_inner());
                if d.groups.get(&key) == Some(&generation) {
                    d.groups.remove(&key);
                }
                Ok::<(), ClientError>(())
            }))
            .await;
        results.into_iter().collect::<Result<(), ClientError>>()?;
        if stores {
            self.flush_stores().await?;
            self.inner.flush_stores.store(false, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// The position of the first byte where `a` and `b` differ, if any.
fn first_difference(a: &[u8], b: &[u8]) -> Option<u64> {
    a.iter().zip(b).position(|(x, y)| x != y).map(|i| i as u64)
}
