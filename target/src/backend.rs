//! What the front ends (NBD, iSCSI) serve: exports reached only through the
//! [`Catalog`] and [`Backend`] traits, so the protocols' unit tests and
//! fuzzers drive them in memory (`nbd::memory`) while `cairn-target` plugs in
//! the cluster ([`crate::exports`]).

use std::future::Future;
use std::sync::{Arc, Weak};

use bytes::Bytes;

/// What a client learns about an export before using it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The canonical name (the default export's real name).
    pub name: String,
    /// One line for humans (`nbdinfo --list`).
    pub description: String,
    pub size: u64,
    pub read_only: bool,
    /// What is exported, unique among every cluster and stable for its
    /// life (cluster id, volume id, snapshot epoch): the source of the
    /// identifiers an initiator keys multipath on (SCSI serial, NAA id).
    pub uid: String,
}

/// An I/O failure, as the client will see it: an NBD error number and a
/// message for the log and for structured error chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoError {
    pub errno: u32,
    pub message: String,
}

/// `(length, base:allocation flags)` runs starting at the queried offset.
pub type Extents = Vec<(u64, u32)>;

/// One export's data, shared by every connection to it.
pub trait Backend: Send + Sync + 'static {
    fn info(&self) -> &ExportInfo;
    /// The size now: `info().size` (what NBD clients were told) until the
    /// volume grows while open. iSCSI reports growth to its initiators.
    fn size(&self) -> u64 {
        self.info().size
    }
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes, IoError>> + Send;
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), IoError>> + Send;
    /// COMPARE AND WRITE: if the range at `offset` holds `compare`, writes
    /// `data` (as long) there and answers `None`; otherwise writes nothing
    /// and answers where the first difference is, from `offset`. This
    /// default reads, compares and writes: atomic only against writers that
    /// serialize with the caller (the iSCSI layer holds its logical unit's
    /// lock). A Cairn export compares at the extent's primary instead,
    /// atomic against every writer of the volume.
    fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<Option<u64>, IoError>> + Send {
        async move {
            let found = self.read(offset, compare.len() as u32).await?;
            if let Some(at) = crate::iscsi::scsi::first_difference(&found, &compare) {
                return Ok(Some(at as u64));
            }
            self.write(offset, data, fua).await?;
            Ok(None)
        }
    }
    /// Whether [`compare_and_write`](Self::compare_and_write) of `len`
    /// bytes at `offset` is atomic against every writer by itself, so the
    /// caller need not hold writes back around it.
    fn compare_and_write_is_atomic(&self, _offset: u64, _len: u64) -> bool {
        false
    }
    /// Makes the range read as zeros; with `no_hole` it stays allocated.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    ) -> impl Future<Output = Result<(), IoError>> + Send;
    fn trim(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), IoError>> + Send;
    /// Makes every write completed before the call durable.
    fn flush(&self) -> impl Future<Output = Result<(), IoError>> + Send;
    /// Allocation of the range from `offset` on: at least one run; runs may
    /// stop short of `len`, and the last may reach past it.
    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Extents, IoError>> + Send;
    /// Completes when the export's clients must be disconnected (its volume
    /// was rolled back under it): they reconnect to what it is now.
    fn revoked(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

/// Where exports come from.
pub trait Catalog: Send + Sync + 'static {
    type Export: Backend;
    /// Where an export's SCSI persistent reservations live (iSCSI).
    type Reservations: crate::iscsi::scsi::pr::PrStore;
    /// The export called `name` ("" is the default export), or None.
    fn lookup(&self, name: &str)
        -> impl Future<Output = Result<Option<ExportInfo>, String>> + Send;
    /// Every export, for `NBD_OPT_LIST`.
    fn list(&self) -> impl Future<Output = Result<Vec<ExportInfo>, String>> + Send;
    /// Opens `name` for a connection entering transmission.
    fn open(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Arc<Self::Export>>, String>> + Send;
    /// The persistent reservation store of `export` (opened as `name`).
    fn reservations(&self, name: &str, export: &Arc<Self::Export>) -> Self::Reservations;
    /// Asks to have `hook` run whenever the export learns of a newer
    /// reservation state (changed through another front end), before it
    /// tells the volume manager it holds it. Nothing by default: a store
    /// no one else changes never needs it.
    fn watch_reservations(&self, _export: &Arc<Self::Export>, _hook: Weak<dyn ReservationsHook>) {}
}

/// What a logical unit does when its export learns of a newer reservation
/// state: load it, and abort what a PREEMPT AND ABORT made elsewhere
/// preempted here (`Lun::refresh_reservations`).
pub trait ReservationsHook: Send + Sync {
    fn refresh(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}
