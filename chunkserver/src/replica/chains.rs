//! Which older epochs an extent version reads through to.
//!
//! A snapshot freezes a volume's head epoch and opens a new one; a block
//! the new version does not hold is read from the frozen versions beneath
//! it (the store's `read_at`/`write_at` take that chain). The chain beneath
//! an epoch only ever loses *folded* epochs (a deleted snapshot's, once its
//! blocks were copied up into the epoch above it; see `VolmgrOp::FoldEpoch`),
//! and a chain that still lists one reads the same, so a chunk server asks
//! the volume manager once per epoch and keeps the answer. Requests
//! and the group protocol therefore carry only `(volume, index, epoch)`,
//! as before snapshots existed; replicas and pushes resolve the chain the
//! same way.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_group::ExtentId;
use cairn_proto::volmgr::VolmgrStatus;
use cairn_volmgr::client::VolmgrClient;
use tokio::sync::OnceCell;
use tracing::warn;

/// How long a disk operation waits for the volume manager to name a new
/// epoch's chain before it fails (the group core then treats it as a disk
/// error of this node).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(60);

/// `(data id, epoch)` → the epochs beneath it, once known. One cell per
/// epoch, so the first disk operation at a new epoch asks the volume
/// manager and every other one arriving meanwhile waits for that answer (a
/// snapshot of a busy volume would otherwise send one request per write in
/// flight, and the volume manager's client serves them one at a time).
type Known = HashMap<(u64, u64), Arc<OnceCell<Arc<[u64]>>>>;

/// Why a lookup found no chain to keep.
enum Unknown {
    /// No live volume or snapshot contains the epoch.
    NotFound,
    Failed(String),
}

/// Where chains come from: the volume manager (tests of the cache give a
/// function instead).
type Source = Arc<dyn Fn(ExtentId) -> Answer + Send + Sync>;
type Answer = Pin<Box<dyn Future<Output = Result<Arc<[u64]>, Unknown>> + Send>>;

/// The chain cache of one chunk server.
pub struct Chains {
    source: Option<Source>,
    known: Mutex<Known>,
}

impl Chains {
    /// Without a volume manager (tests that feed maps themselves) every
    /// chain is empty: no snapshots.
    pub fn new(volmgr: Option<Arc<VolmgrClient>>) -> Chains {
        Chains {
            source: volmgr.map(|v| -> Source {
                Arc::new(move |ext| {
                    let v = v.clone();
                    Box::pin(async move { ask(&v, ext).await })
                })
            }),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The epochs beneath `ext`'s, newest first.
    pub async fn below(&self, ext: ExtentId) -> Result<Arc<[u64]>, String> {
        let Some(source) = &self.source else {
            return Ok(Arc::from(Vec::new()));
        };
        let cell = {
            let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            let cell = known.entry((ext.volume, ext.epoch)).or_default();
            // Every operation but the first few at an epoch: answered here.
            if let Some(chain) = cell.get() {
                return Ok(chain.clone());
            }
            cell.clone()
        };
        match cell.get_or_try_init(|| source(ext)).await {
            Ok(chain) => Ok(chain.clone()),
            // An epoch the catalogue no longer knows belongs to a deleted
            // volume or snapshot: nothing reads it any more (a push may
            // still move it), so it reads alone. Not kept: cheap to ask.
            Err(Unknown::NotFound) => {
                let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
                if known
                    .get(&(ext.volume, ext.epoch))
                    .is_some_and(|c| !c.initialized())
                {
                    known.remove(&(ext.volume, ext.epoch));
                }
                Ok(Arc::from(Vec::new()))
            }
            Err(Unknown::Failed(e)) => Err(e),
        }
    }
}

/// Asks the volume manager for the epochs beneath `ext`'s, retrying for up
/// to [`LOOKUP_TIMEOUT`] while it is away.
async fn ask(volmgr: &VolmgrClient, ext: ExtentId) -> Result<Arc<[u64]>, Unknown> {
    let t0 = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(20);
    let mut warned = false;
    loop {
        match volmgr.epoch_chain(ext.volume, ext.epoch).await {
            Ok(c) => return Ok(Arc::from(c)),
            Err(e) if e.status() == Some(VolmgrStatus::NotFound) => return Err(Unknown::NotFound),
            Err(e) => {
                if t0.elapsed() >= LOOKUP_TIMEOUT {
                    return Err(Unknown::Failed(format!(
                        "{ext}: the volume manager did not name the epochs beneath it within {LOOKUP_TIMEOUT:?}: {e}"
                    )));
                }
                if !warned {
                    warn!(%ext, "waiting for the volume manager to name the epochs beneath this version: {e}");
                    warned = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn ext(volume: u64, epoch: u64) -> ExtentId {
        ExtentId {
            volume,
            index: 0,
            epoch,
        }
    }

    /// A source that answers after a little while, counting the questions:
    /// epoch 9 is unknown, epoch 7 fails once, others lie on [epoch - 1].
    fn counting(asked: Arc<AtomicUsize>, failures: Arc<AtomicUsize>) -> Chains {
        Chains {
            source: Some(Arc::new(move |e: ExtentId| {
                let (asked, failures) = (asked.clone(), failures.clone());
                Box::pin(async move {
                    asked.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    match e.epoch {
                        9 => Err(Unknown::NotFound),
                        7 if failures.fetch_add(1, Ordering::SeqCst) == 0 => {
                            Err(Unknown::Failed("volume manager away".into()))
                        }
                        n => Ok(Arc::from(vec![n - 1])),
                    }
                }) as Answer
            })),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// Many disk operations at a new epoch at once (the writes in flight
    /// right after a snapshot) ask once; the answer is kept; an unknown
    /// epoch reads alone and is asked again; a failure is not kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_question_per_epoch() {
        let asked = Arc::new(AtomicUsize::new(0));
        let chains = Arc::new(counting(asked.clone(), Arc::new(AtomicUsize::new(0))));
        let mut set = tokio::task::JoinSet::new();
        for i in 0..32u64 {
            let chains = chains.clone();
            set.spawn(async move {
                let mut e = ext(4, 5);
                e.index = i;
                chains.below(e).await
            });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(&*r.unwrap().unwrap(), &[4]);
        }
        assert_eq!(
            asked.load(Ordering::SeqCst),
            1,
            "32 operations at one new epoch"
        );
        assert_eq!(&*chains.below(ext(4, 5)).await.unwrap(), &[4]);
        assert_eq!(asked.load(Ordering::SeqCst), 1, "kept");
        // Another volume's epoch is another question.
        assert_eq!(&*chains.below(ext(5, 5)).await.unwrap(), &[4]);
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        // Unknown: empty, not kept.
        assert!(chains.below(ext(4, 9)).await.unwrap().is_empty());
        assert!(chains.below(ext(4, 9)).await.unwrap().is_empty());
        assert_eq!(asked.load(Ordering::SeqCst), 4);
        assert!(chains.known.lock().unwrap().get(&(4, 9)).is_none());
        // A failure is not kept: the next operation asks again.
        assert!(chains.below(ext(4, 7)).await.is_err());
        assert_eq!(&*chains.below(ext(4, 7)).await.unwrap(), &[6]);
        assert_eq!(asked.load(Ordering::SeqCst), 6);
    }
}
