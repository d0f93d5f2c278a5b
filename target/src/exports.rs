//! Exports backed by the cluster: one [`Export`] per volume name, shared by
//! every connection that opened it (so a FLUSH on one connection covers the
//! writes of all, which is what `NBD_FLAG_CAN_MULTI_CONN` promises), and an
//! export lease at the volume manager while any connection has it open (the
//! lease is what refuses `volume delete` of a volume in use).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use cairn_client::{ClientError, Cluster, Volume};
use cairn_proto::map::VolumeInfo;
use cairn_proto::volmgr::VolmgrStatus;
use cairn_volmgr::client::VolmgrClient;
use futures::stream::{self, StreamExt, TryStreamExt};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::nbd::wire::{EINVAL, EIO, STATE_HOLE, STATE_ZERO};
use crate::nbd::{Backend, Catalog, ExportInfo, Extents, IoError};

/// Renewal period used until the volume manager has said its own.
const LEASE_RENEW_DEFAULT: Duration = Duration::from_secs(1);
/// Explicit zeros written per request for WRITE_ZEROES with NO_HOLE.
const ZERO_CHUNK: usize = 1 << 20;
static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// What the registry needs to know about this front end.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// This target's id in export leases (several targets may export one
    /// volume; each needs its own id).
    pub target_id: u64,
    /// Every export refuses writes.
    pub read_only: bool,
    /// The volume served under the empty name, if any.
    pub default_export: Option<String>,
}

/// The exports of one target process.
pub struct Registry {
    cluster: Arc<Cluster>,
    volmgr: VolmgrClient,
    cfg: RegistryConfig,
    live: Mutex<HashMap<String, Weak<Export>>>,
}

impl Registry {
    pub fn new(cluster: Arc<Cluster>, volmgr: VolmgrClient, cfg: RegistryConfig) -> Arc<Registry> {
        Arc::new(Registry {
            cluster,
            volmgr,
            cfg,
            live: Mutex::new(HashMap::new()),
        })
    }

    /// Names of the exports open now (for logs and tests).
    pub fn open_exports(&self) -> Vec<String> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = live
            .iter()
            .filter(|(_, w)| w.strong_count() > 0)
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    fn resolve<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        if name.is_empty() {
            self.cfg.default_export.as_deref()
        } else {
            Some(name)
        }
    }

    fn live_export(&self, name: &str) -> Option<Arc<Export>> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.get(name).and_then(Weak::upgrade)
    }

    /// The catalogue record of `name`, None if there is no such volume.
    async fn volume_info(&self, name: &str) -> Result<Option<VolumeInfo>, String> {
        match self.volmgr.get_volume(name).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.status() == Some(VolmgrStatus::NotFound) => Ok(None),
            Err(e) => Err(format!(
                "looking up volume {name:?} at the volume manager: {e}"
            )),
        }
    }

    fn export_info(&self, v: &VolumeInfo) -> ExportInfo {
        ExportInfo {
            name: v.name.clone(),
            description: format!(
                "Cairn volume, {} replica{}, {} extents{}",
                v.replicas,
                if v.replicas == 1 { "" } else { "s" },
                if v.extent_size_bytes >= 1 << 20 {
                    format!("{} MiB", v.extent_size_bytes >> 20)
                } else {
                    format!("{} KiB", v.extent_size_bytes >> 10)
                },
                if self.cfg.read_only {
                    ", read-only"
                } else {
                    ""
                }
            ),
            size: v.size_bytes,
            read_only: self.cfg.read_only,
        }
    }
}

impl Catalog for Arc<Registry> {
    type Export = Export;

    async fn lookup(&self, name: &str) -> Result<Option<ExportInfo>, String> {
        let Some(name) = self.resolve(name) else {
            return Ok(None);
        };
        match self.volume_info(name).await {
            Ok(v) => Ok(v.map(|v| self.export_info(&v))),
            // The volume manager is unreachable, but the export is open here.
            Err(e) => match self.live_export(name) {
                Some(x) => Ok(Some(x.info.clone())),
                None => Err(e),
            },
        }
    }

    async fn list(&self) -> Result<Vec<ExportInfo>, String> {
        let volumes = self
            .volmgr
            .list_volumes()
            .await
            .map_err(|e| format!("listing volumes at the volume manager: {e}"))?;
        Ok(volumes.iter().map(|v| self.export_info(v)).collect())
    }

    async fn open(&self, name: &str) -> Result<Option<Arc<Export>>, String> {
        let Some(name) = self.resolve(name) else {
            return Ok(None);
        };
        let info = match self.volume_info(name).await {
            Ok(Some(v)) => v,
            Ok(None) => return Ok(None),
            Err(e) => {
                // Clients reconnecting while the volume manager is away keep
                // working on an export this process has open.
                return match self.live_export(name) {
                    Some(x) => Ok(Some(x)),
                    None => Err(e),
                };
            }
        };
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(x) = live.get(name).and_then(Weak::upgrade) {
            let v = x.volume.info();
            if v.id == info.id && v.size_bytes == info.size_bytes && v.head_epoch == info.head_epoch
            {
                return Ok(Some(x));
            }
            // Deleted and re-created, or resized: connections opened from now
            // on use the new record; open ones keep theirs.
            info!(
                volume = name,
                "volume record changed; new connections use the new one"
            );
        }
        let volume = self
            .cluster
            .volume(info.clone())
            .map_err(|e| format!("opening volume {name:?}: {e}"))?;
        // Writes acknowledged by an earlier process (a target restarted under
        // its clients) may be unflushed; the first FLUSH must reach them.
        volume.flush_stores_on_next_flush();
        let export = Arc::new_cyclic(|me: &Weak<Export>| Export {
            info: self.export_info(&info),
            volume,
            lease: Some(tokio::spawn(renew_lease(
                self.clone(),
                name.to_string(),
                me.clone(),
            ))),
            registry: Arc::downgrade(self),
        });
        live.retain(|_, w| w.strong_count() > 0);
        live.insert(name.to_string(), Arc::downgrade(&export));
        info!(volume = name, size = info.size_bytes, "export opened");
        Ok(Some(export))
    }
}

/// Renews the export lease while the export is open.
async fn renew_lease(registry: Arc<Registry>, name: String, export: Weak<Export>) {
    let mut every = LEASE_RENEW_DEFAULT;
    let mut failing = false;
    loop {
        if export.strong_count() == 0 {
            return;
        }
        match registry
            .volmgr
            .register_export(registry.cfg.target_id, &name)
            .await
        {
            Ok(d) => {
                if failing {
                    info!(volume = %name, "export lease renewed again");
                }
                failing = false;
                if !d.is_zero() {
                    every = d;
                }
            }
            Err(e) => {
                if !failing {
                    warn!(volume = %name, "cannot renew the export lease: {e}");
                }
                failing = true;
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// One exported volume.
pub struct Export {
    info: ExportInfo,
    volume: Volume,
    lease: Option<JoinHandle<()>>,
    registry: Weak<Registry>,
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(l) = self.lease.take() {
            l.abort();
        }
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        let name = self.info.name.clone();
        info!(volume = %name, "export closed (no connection left)");
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = registry
                    .volmgr
                    .unregister_export(registry.cfg.target_id, &name)
                    .await
                {
                    debug!(volume = %name, "dropping the export lease: {e} (it lapses by itself)");
                }
            });
        }
    }
}

fn io_error(e: ClientError) -> IoError {
    IoError {
        errno: if e.is_invalid_argument() { EINVAL } else { EIO },
        message: e.to_string(),
    }
}

impl Backend for Export {
    fn info(&self) -> &ExportInfo {
        &self.info
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.volume.read(offset, len as u64).await.map_err(io_error)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.volume.write(offset, data, fua).await.map_err(io_error)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), IoError> {
        if !no_hole {
            return self
                .volume
                .write_zeroes(offset, len as u64, fua)
                .await
                .map_err(io_error);
        }
        // Allocated zeros: written as data, from one static buffer.
        let chunks = (0..len as u64).step_by(ZERO_CHUNK).map(|at| {
            let n = (len as u64 - at).min(ZERO_CHUNK as u64) as usize;
            (offset + at, Bytes::from_static(&ZEROS[..n]))
        });
        stream::iter(chunks)
            .map(|(at, zeros)| self.volume.write(at, zeros, fua))
            .buffer_unordered(8)
            .try_collect::<()>()
            .await
            .map_err(io_error)
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        // The store punches whole blocks and zeroes the rest: a trimmed range
        // reads as zeros, which the protocol allows (it promises nothing).
        self.volume
            .write_zeroes(offset, len as u64, fua)
            .await
            .map_err(io_error)
    }

    async fn flush(&self) -> Result<(), IoError> {
        self.volume.flush().await.map_err(io_error)
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Extents, IoError> {
        let size = self.info.size;
        let eb = self.volume.info().extent_size_bytes as u64;
        let end = (offset + len as u64).min(size);
        let first = offset / eb;
        let count = (end - 1) / eb - first + 1;
        let a = match self.volume.allocation(first, count).await {
            Ok(a) => a,
            Err(e) => {
                // Status 0 ("data, contents unknown") is always true.
                debug!(volume = %self.info.name, "allocation unknown at offset {offset}: {e}");
                return Ok(vec![(len as u64, 0)]);
            }
        };
        let mut runs: Extents = Vec::with_capacity(a.state.len() + 1);
        for (i, state) in a.state.iter().enumerate() {
            let index = a.first + i as u64;
            let start = (index * eb).max(offset);
            let stop = ((index + 1) * eb).min(size);
            let flags = match state {
                Some(false) => STATE_HOLE | STATE_ZERO,
                _ => 0,
            };
            runs.push((stop - start, flags));
        }
        let covered = (a.first + a.state.len() as u64) * eb;
        if a.empty_beyond && a.state.last() == Some(&Some(false)) && covered < size {
            runs.push((size - covered, STATE_HOLE | STATE_ZERO));
        }
        Ok(runs)
    }
}
