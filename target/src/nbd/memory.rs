//! An in-memory [`Catalog`] and [`Backend`], for the protocol's unit tests
//! and the fuzzers: the NBD code paths with no cluster behind them. Blocks
//! never written read as zeros and are reported as holes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::wire::{EIO, STATE_HOLE, STATE_ZERO};
use super::{Backend, Catalog, ExportInfo, Extents, IoError};

/// Allocation granularity of the memory backend.
const BLOCK: u64 = 4096;

/// One export held in memory.
pub struct MemExport {
    info: ExportInfo,
    blocks: Mutex<BTreeMap<u64, Box<[u8]>>>,
    /// Offsets at which every operation fails with EIO (fault injection).
    pub fail_at: Mutex<Option<u64>>,
}

impl MemExport {
    pub fn new(name: &str, size: u64, read_only: bool) -> Arc<MemExport> {
        Arc::new(MemExport {
            info: ExportInfo {
                name: name.into(),
                description: format!("memory export of {size} bytes"),
                size,
                read_only,
                uid: format!("memory/{name}"),
            },
            blocks: Mutex::new(BTreeMap::new()),
            fail_at: Mutex::new(None),
        })
    }

    fn check_fault(&self, offset: u64, len: u64) -> Result<(), IoError> {
        match *self.fail_at.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(at) if at >= offset && at < offset + len.max(1) => Err(IoError {
                errno: EIO,
                message: format!("injected fault at {at}"),
            }),
            _ => Ok(()),
        }
    }

    fn put(&self, offset: u64, data: Option<&[u8]>, len: u64) {
        let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        let mut at = offset;
        while at < offset + len {
            let b = at / BLOCK;
            let within = (at % BLOCK) as usize;
            let n = ((BLOCK - at % BLOCK).min(offset + len - at)) as usize;
            let block = blocks
                .entry(b)
                .or_insert_with(|| vec![0u8; BLOCK as usize].into_boxed_slice());
            match data {
                Some(d) => {
                    let from = (at - offset) as usize;
                    block[within..within + n].copy_from_slice(&d[from..from + n]);
                }
                None => block[within..within + n].fill(0),
            }
            at += n as u64;
        }
        // Whole zero blocks become holes again (thin, like the store).
        let first = offset / BLOCK;
        let last = (offset + len).div_ceil(BLOCK);
        for b in first..last {
            if blocks.get(&b).is_some_and(|x| x.iter().all(|&v| v == 0)) {
                blocks.remove(&b);
            }
        }
    }
}

impl Backend for MemExport {
    fn info(&self) -> &ExportInfo {
        &self.info
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.check_fault(offset, len as u64)?;
        let blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = vec![0u8; len as usize];
        let mut at = offset;
        let end = offset + len as u64;
        while at < end {
            let b = at / BLOCK;
            let within = (at % BLOCK) as usize;
            let n = ((BLOCK - at % BLOCK).min(end - at)) as usize;
            if let Some(block) = blocks.get(&b) {
                let to = (at - offset) as usize;
                out[to..to + n].copy_from_slice(&block[within..within + n]);
            }
            at += n as u64;
        }
        Ok(out.into())
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), IoError> {
        self.check_fault(offset, data.len() as u64)?;
        self.put(offset, Some(&data), data.len() as u64);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _fua: bool,
        _no_hole: bool,
    ) -> Result<(), IoError> {
        self.check_fault(offset, len as u64)?;
        self.put(offset, None, len as u64);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.write_zeroes(offset, len, fua, false).await
    }

    async fn flush(&self) -> Result<(), IoError> {
        self.check_fault(0, 1)
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Extents, IoError> {
        self.check_fault(offset, len as u64)?;
        let blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        let end = (offset + len as u64).min(self.info.size);
        let mut runs: Extents = Vec::new();
        let mut at = offset;
        while at < end {
            let b = at / BLOCK;
            let n = (BLOCK - at % BLOCK).min(end - at);
            let flags = if blocks.contains_key(&b) {
                0
            } else {
                STATE_HOLE | STATE_ZERO
            };
            runs.push((n, flags));
            at += n;
        }
        Ok(runs)
    }
}

/// A fixed set of memory exports; the first is the default export.
#[derive(Clone)]
pub struct MemCatalog {
    pub exports: Vec<Arc<MemExport>>,
}

impl MemCatalog {
    fn find(&self, name: &str) -> Option<&Arc<MemExport>> {
        if name.is_empty() {
            return self.exports.first();
        }
        self.exports.iter().find(|e| e.info.name == name)
    }
}

impl Catalog for MemCatalog {
    type Export = MemExport;
    type Reservations = crate::iscsi::scsi::pr::MemPrStore;

    fn reservations(&self, _name: &str, _export: &Arc<MemExport>) -> Self::Reservations {
        Default::default()
    }

    async fn lookup(&self, name: &str) -> Result<Option<ExportInfo>, String> {
        Ok(self.find(name).map(|e| e.info.clone()))
    }

    async fn list(&self) -> Result<Vec<ExportInfo>, String> {
        Ok(self.exports.iter().map(|e| e.info.clone()).collect())
    }

    async fn open(&self, name: &str) -> Result<Option<Arc<MemExport>>, String> {
        Ok(self.find(name).cloned())
    }
}
