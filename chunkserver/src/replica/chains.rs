//! Which older epochs an extent version reads through to.
//!
//! A snapshot freezes a volume's head epoch and opens a new one; a block
//! the new version does not hold is read from the frozen versions beneath
//! it (the store's `read_at`/`write_at` take that chain). The chain beneath
//! an epoch never changes once the epoch exists (a snapshot's ancestors are
//! fixed; deleting a snapshot only removes its name), so a chunk server
//! asks the volume manager once per epoch and keeps the answer. Requests
//! and the group protocol therefore carry only `(volume, index, epoch)`,
//! as before snapshots existed; replicas and pushes resolve the chain the
//! same way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_group::ExtentId;
use cairn_proto::volmgr::VolmgrStatus;
use cairn_volmgr::client::VolmgrClient;
use tracing::warn;

/// How long a disk operation waits for the volume manager to name a new
/// epoch's chain before it fails (the group core then treats it as a disk
/// error of this node).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(60);

/// `(data id, epoch)` → the epochs beneath it.
type Known = HashMap<(u64, u64), Arc<[u64]>>;

/// The chain cache of one chunk server.
pub struct Chains {
    volmgr: Option<Arc<VolmgrClient>>,
    known: Mutex<Known>,
}

impl Chains {
    /// Without a volume manager (tests that feed maps themselves) every
    /// chain is empty: no snapshots.
    pub fn new(volmgr: Option<Arc<VolmgrClient>>) -> Chains {
        Chains {
            volmgr,
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The epochs beneath `ext`'s, newest first.
    pub async fn below(&self, ext: ExtentId) -> Result<Arc<[u64]>, String> {
        let key = (ext.volume, ext.epoch);
        if let Some(c) = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(c.clone());
        }
        let Some(volmgr) = &self.volmgr else {
            return Ok(Arc::from(Vec::new()));
        };
        let t0 = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(20);
        let mut warned = false;
        let chain: Arc<[u64]> = loop {
            match volmgr.epoch_chain(ext.volume, ext.epoch).await {
                Ok(c) => break Arc::from(c),
                // An epoch the catalogue no longer knows belongs to a deleted
                // volume or snapshot: nothing reads it any more (a push may
                // still move it), so it reads alone. Not kept: cheap to ask.
                Err(e) if e.status() == Some(VolmgrStatus::NotFound) => {
                    return Ok(Arc::from(Vec::new()))
                }
                Err(e) => {
                    if t0.elapsed() >= LOOKUP_TIMEOUT {
                        return Err(format!(
                            "{ext}: the volume manager did not name the epochs beneath it within {LOOKUP_TIMEOUT:?}: {e}"
                        ));
                    }
                    if !warned {
                        warn!(%ext, "waiting for the volume manager to name the epochs beneath this version: {e}");
                        warned = true;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        };
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, chain.clone());
        Ok(chain)
    }
}
