//! SANITIZE (SBC-4 5.30): OVERWRITE, BLOCK ERASE, CRYPTOGRAPHIC ERASE and
//! EXIT FAILURE MODE over a thin volume.
//!
//! BLOCK ERASE and CRYPTOGRAPHIC ERASE deallocate every block (LBPRZ: they
//! then read as zeros); OVERWRITE writes the initialization pattern over
//! every block (an all-zero pattern deallocates, which reads the same).
//! The volume is replicated and copy-on-write underneath: passes after
//! the first would write the same logical blocks again without reaching
//! anything the first did not, so an OVERWRITE COUNT of n writes the
//! pattern the last pass would leave (inverted when INVERT asks for it).
//!
//! The operation runs in its own task, whatever the IMMED bit: a command
//! without IMMED waits for it, and neither an aborted command, a reset
//! nor a lost session stops it (SBC-4 4.11.2). While it runs, every
//! command but INQUIRY, REPORT LUNS, REQUEST SENSE and MAINTENANCE IN is
//! refused with NOT READY, SANITIZE IN PROGRESS and a progress indication.
//! One that fails leaves the medium refusing access with SANITIZE COMMAND
//! FAILED until a SANITIZE completes, or EXIT FAILURE MODE (if the failed
//! one allowed it with AUSE).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use bytes::{Bytes, BytesMut};

use super::cdb::{self, Cdb};
use super::pr::PrStore;
use super::sense::{self, Sense};
use super::{Fail, Lun, Reply, Request, Res, BLOCK, CHUNK};
use crate::backend::Backend;

/// What a SANITIZE left on the medium.
#[derive(Default)]
enum State {
    #[default]
    Idle,
    Running(Arc<Run>),
    /// It failed; `ause`: EXIT FAILURE MODE may end this.
    Failed {
        ause: bool,
    },
}

/// A running SANITIZE.
struct Run {
    total: u64,
    done: AtomicU64,
    /// None until it ends, then whether it succeeded.
    end: tokio::sync::watch::Sender<Option<Result<(), Sense>>>,
}

impl Run {
    /// Progress in 65536ths.
    fn progress(&self) -> u16 {
        let done = self.done.load(Ordering::Relaxed).min(self.total);
        let p = (done as u128 * 65536) / (self.total.max(1) as u128);
        p.min(65535) as u16
    }
}

/// The sanitize state of one export object, shared by every logical
/// unit over it (a session that logs out and in again finds it).
#[derive(Default)]
pub struct Medium {
    state: Mutex<State>,
}

/// Media by the address of their export object. An entry lives while
/// a logical unit or a running SANITIZE holds its medium, and both hold
/// the export, so the address is not reused meanwhile.
static MEDIA: LazyLock<Mutex<HashMap<usize, Weak<Medium>>>> = LazyLock::new(Default::default);

impl Medium {
    /// The medium of `backend`'s export object.
    pub fn of<B>(backend: &Arc<B>) -> Arc<Medium> {
        let key = Arc::as_ptr(backend) as *const () as usize;
        let mut media = MEDIA.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = media.get(&key).and_then(Weak::upgrade) {
            return m;
        }
        media.retain(|_, m| m.strong_count() > 0);
        let m = Arc::new(Medium::default());
        media.insert(key, Arc::downgrade(&m));
        m
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why command `op` (service action `sa`) cannot run now, if so.
    pub(super) fn refuses(&self, op: u8, sa: u16) -> Option<Fail> {
        match &*self.state() {
            State::Idle => None,
            State::Running(run) => {
                let allowed = matches!(op, cdb::INQUIRY | cdb::REPORT_LUNS | cdb::MAINTENANCE_IN);
                (!allowed).then(|| {
                    Fail::Sks(sense::SANITIZE_IN_PROGRESS, sense::progress(run.progress()))
                })
            }
            State::Failed { .. } => {
                let media = is_media_access(op, sa);
                media.then_some(Fail::Check(sense::SANITIZE_COMMAND_FAILED, None))
            }
        }
    }
}

/// The commands that read or write the medium.
fn is_media_access(op: u8, sa: u16) -> bool {
    matches!(
        op,
        cdb::READ_6
            | cdb::READ_10
            | cdb::READ_12
            | cdb::READ_16
            | cdb::WRITE_6
            | cdb::WRITE_10
            | cdb::WRITE_12
            | cdb::WRITE_16
            | cdb::WRITE_AND_VERIFY_10
            | cdb::WRITE_AND_VERIFY_12
            | cdb::WRITE_AND_VERIFY_16
            | cdb::VERIFY_10
            | cdb::VERIFY_12
            | cdb::VERIFY_16
            | cdb::WRITE_SAME_10
            | cdb::WRITE_SAME_16
            | cdb::UNMAP
            | cdb::COMPARE_AND_WRITE
            | cdb::ORWRITE_16
            | cdb::EXTENDED_COPY
            | cdb::PRE_FETCH_10
            | cdb::PRE_FETCH_16
    ) || (op == cdb::SERVICE_ACTION_IN_16 && sa == cdb::SA_GET_LBA_STATUS)
}

/// What a SANITIZE writes.
#[derive(Clone)]
enum Job {
    /// Deallocate every block (they read zeros).
    Erase,
    /// Write this block over every block.
    Overwrite(Bytes),
}

/// The pattern buffer OVERWRITE writes from: one backend call's worth.
const PATTERN_BYTES: u64 = CHUNK;

/// The OVERWRITE parameter list (SBC-4 5.30.2.2): the block its last pass
/// writes.
fn overwrite_block(list: &[u8]) -> Res<Bytes> {
    let (head, pattern) = list.split_at(4.min(list.len()));
    let [b0, _, l0, l1] = head else {
        return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
    };
    let invert = b0 & 0x80 != 0;
    let test = (b0 >> 5) & 0x03;
    let count = b0 & 0x1f;
    if test != 0 {
        return Err(Fail::list_field(0));
    }
    if count == 0 {
        return Err(Fail::list_field(0));
    }
    let len = u16::from_be_bytes([*l0, *l1]) as usize;
    if len == 0 || len > BLOCK as usize || len != pattern.len() {
        return Err(Fail::list_field(2));
    }
    // Passes alternate pattern and inverse: the last is inverted when
    // their number is even.
    let flip = invert && count % 2 == 0;
    let block: Vec<u8> = pattern
        .iter()
        .cycle()
        .take(BLOCK as usize)
        .map(|&b| if flip { !b } else { b })
        .collect();
    Ok(Bytes::from(block))
}

impl<B: Backend, S: PrStore> Lun<B, S> {
    pub(super) async fn sanitize(&self, c: &Cdb<'_>, req: &Request<'_>) -> Res {
        let flags = c.u8(1);
        let immed = flags & 0x80 != 0;
        let ause = flags & 0x20 != 0;
        if flags & 0x40 != 0 {
            return Err(Fail::cdb_field(1, Some(6)));
        }
        if let Some(i) = (2..7).find(|&i| c.u8(i) != 0) {
            return Err(Fail::cdb_field(i as u16, None));
        }
        let len = c.u16(7) as usize;
        let job = match c.service_action() {
            cdb::SA_EXIT_FAILURE_MODE => {
                if len != 0 {
                    return Err(Fail::cdb_field(7, None));
                }
                let mut state = self.medium.state();
                return match *state {
                    State::Failed { ause: false } => Err(Fail::cdb_field(1, Some(4))),
                    State::Failed { ause: true } => {
                        *state = State::Idle;
                        Ok(Reply::good())
                    }
                    _ => Ok(Reply::good()),
                };
            }
            cdb::SA_BLOCK_ERASE | cdb::SA_CRYPTOGRAPHIC_ERASE => {
                if len != 0 {
                    return Err(Fail::cdb_field(7, None));
                }
                Job::Erase
            }
            _ => {
                if len < 5 || len > BLOCK as usize + 4 {
                    return Err(Fail::cdb_field(7, None));
                }
                let list = req
                    .data_out
                    .get(..len)
                    .ok_or(sense::PARAMETER_LIST_LENGTH_ERROR)?;
                let block = overwrite_block(list)?;
                if block.iter().all(|&b| b == 0) {
                    Job::Erase
                } else {
                    Job::Overwrite(block)
                }
            }
        };
        self.check_writable()?;
        // Writes in flight finish first; later ones are refused (or, past
        // the check already, wait for the end).
        let io = self.io.clone().write_owned().await;
        let (run, mut end) = {
            let mut state = self.medium.state();
            if let State::Running(run) = &*state {
                return Err(Fail::Sks(
                    sense::SANITIZE_IN_PROGRESS,
                    sense::progress(run.progress()),
                ));
            }
            let (tx, rx) = tokio::sync::watch::channel(None);
            let run = Arc::new(Run {
                total: self.blocks() * BLOCK,
                done: AtomicU64::new(0),
                end: tx,
            });
            *state = State::Running(run.clone());
            (run, rx)
        };
        tracing::info!(
            lun = self.lun_id,
            export = %self.backend.info().name,
            service_action = c.service_action(),
            immed,
            "sanitize started"
        );
        let backend = self.backend.clone();
        let medium = self.medium.clone();
        tokio::spawn(async move {
            let result = overwrite_all(&*backend, &run, job).await;
            if let Err(e) = &result {
                tracing::warn!(export = %backend.info().name, "sanitize failed: {e:?}");
            } else {
                tracing::info!(export = %backend.info().name, "sanitize complete");
            }
            *medium.state() = match result {
                Ok(()) => State::Idle,
                Err(_) => State::Failed { ause },
            };
            drop(io);
            run.end.send_replace(Some(result));
        });
        if immed {
            return Ok(Reply::good());
        }
        let result = match end.wait_for(Option::is_some).await {
            Ok(r) => (*r).unwrap_or(Err(sense::INTERNAL_TARGET_FAILURE)),
            Err(_) => Err(sense::INTERNAL_TARGET_FAILURE),
        };
        result.map(|()| Reply::good()).map_err(Fail::from)
    }
}

/// Does `job` over the whole export, counting progress in `run`.
async fn overwrite_all<B: Backend>(backend: &B, run: &Run, job: Job) -> Result<(), Sense> {
    let pattern = match &job {
        Job::Erase => Bytes::new(),
        Job::Overwrite(block) => {
            let n = run.total.min(PATTERN_BYTES) as usize;
            let mut p = BytesMut::with_capacity(n);
            while p.len() < n {
                p.extend_from_slice(block);
            }
            p.freeze()
        }
    };
    let mut at = 0u64;
    while at < run.total {
        let n = (run.total - at).min(CHUNK);
        let r = match job {
            Job::Erase => backend.write_zeroes(at, n as u32, false, false).await,
            Job::Overwrite(_) => backend.write(at, pattern.slice(..n as usize), false).await,
        };
        r.map_err(|e| Sense::for_write(&e))?;
        at += n;
        run.done.store(at, Ordering::Relaxed);
    }
    backend.flush().await.map_err(|e| Sense::for_write(&e))
}
