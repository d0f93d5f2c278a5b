//! The load generator: `iodepth` tasks, each with one request in flight,
//! driving a [`Subject`] (the store in process, or a chunk server over RPC)
//! with a fio-like pattern until a deadline or the end of the working set.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use cairn_chunkserver::store::{ExtentKey, IoBuf, Store, WriteData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::runtime::Handle;
use tokio::task::JoinSet;

use super::chunkserver::RpcPool;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    RandWrite,
    RandRead,
    SeqWrite,
    SeqRead,
}

impl Pattern {
    pub fn is_write(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::SeqWrite)
    }
}

/// What one subject did in one phase.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Throughput {
    pub ops: u64,
    pub bytes: u64,
    pub elapsed_s: f64,
    pub iops: f64,
    pub bytes_per_s: f64,
    /// CPU time (user + system) the subject spent per request, where the
    /// benchmark measures it (see [`Throughput::with_cpu_s`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_op: Option<f64>,
}

impl Throughput {
    fn new(ops: u64, bytes: u64, elapsed: Duration) -> Self {
        // A phase always runs for milliseconds at least; the floor only keeps
        // a degenerate run from dividing by zero.
        let elapsed_s = elapsed.as_secs_f64().max(1e-9);
        Throughput {
            ops,
            bytes,
            elapsed_s,
            iops: ops as f64 / elapsed_s,
            bytes_per_s: bytes as f64 / elapsed_s,
            cpu_us_per_op: None,
        }
    }

    /// Records that the subject spent `cpu_s` seconds of CPU on these
    /// requests (None: not measured).
    pub fn with_cpu_s(mut self, cpu_s: Option<f64>) -> Self {
        self.cpu_us_per_op = cpu_s.map(|s| s.max(0.0) * 1e6 / self.ops.max(1) as f64);
        self
    }
}

/// Where one request goes and how long it is.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    pub key: ExtentKey,
    pub extent_bytes: u32,
    /// Byte offset inside the extent.
    pub offset: u64,
    pub len: u32,
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes at {} offset {}",
            self.len, self.key, self.offset
        )
    }
}

/// What the load is applied to, and the runtime its requests run on.
pub struct Subject {
    target: Target,
    runtime: Handle,
}

/// An enum rather than a trait object so the spawned tasks' futures stay
/// `Send` without boxing every request.
enum Target {
    InProcess(Store),
    Rpc(RpcPool),
}

impl Subject {
    pub fn in_process(store: Store, runtime: Handle) -> Self {
        Subject {
            target: Target::InProcess(store),
            runtime,
        }
    }

    pub fn rpc(pool: RpcPool, runtime: Handle) -> Self {
        Subject {
            target: Target::Rpc(pool),
            runtime,
        }
    }

    /// Writes `data` (one random-filled aligned buffer per worker, written
    /// again and again as fio reuses its buffers, so the benchmark's own
    /// client-side cost stays out of the numbers on a shared CPU). In process
    /// it reaches the store as shared bytes, written without a copy as a
    /// replicated write's are; over RPC the client sends it as it is.
    async fn write(&self, task: usize, r: Range, data: &Bytes) -> anyhow::Result<()> {
        match &self.target {
            Target::InProcess(store) => Ok(store
                .write(
                    r.key,
                    r.extent_bytes,
                    r.offset,
                    WriteData::Shared(data.clone()),
                    false,
                )
                .await?),
            Target::Rpc(pool) => pool.write(task, r, data.clone()).await,
        }
    }

    /// Returns the number of bytes read.
    async fn read(&self, task: usize, r: Range) -> anyhow::Result<usize> {
        match &self.target {
            Target::InProcess(store) => Ok(store
                .read(r.key, r.extent_bytes, r.offset, r.len)
                .await?
                .len()),
            Target::Rpc(pool) => pool.read(task, r).await,
        }
    }

    pub async fn flush(&self) -> anyhow::Result<()> {
        match &self.target {
            Target::InProcess(store) => Ok(store.flush().await?),
            Target::Rpc(pool) => pool.flush().await,
        }
    }
}

/// A tokio runtime for one subject's load, driven by its own threads, so each
/// subject can run on the runtime that suits it (see `--inprocess-threads`).
pub struct LoadRuntime {
    handle: Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoadRuntime {
    /// `threads` 1 is a current-thread runtime (no cross-thread wake-ups),
    /// more a multi-thread runtime with that many workers.
    pub fn start(name: &str, threads: usize) -> anyhow::Result<LoadRuntime> {
        let mut builder = if threads == 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(threads);
            b
        };
        let runtime = builder
            .thread_name(format!("load-{name}"))
            .enable_all()
            .build()
            .with_context(|| format!("starting the {name} load runtime"))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // A current-thread runtime runs its tasks only inside block_on, so a
        // thread of its own sits there until the runtime is no longer needed.
        let thread = std::thread::Builder::new()
            .name(format!("load-{name}"))
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .with_context(|| format!("starting the {name} load thread"))?;
        Ok(LoadRuntime {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }
}

impl Drop for LoadRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where a job's requests go, as byte offsets into the volume.
#[derive(Debug, Clone, Copy)]
pub enum Offsets {
    /// Uniform over `[0, span_bytes)`, aligned to the block size.
    Random { span_bytes: u64 },
    /// `0, stride, 2*stride, ...` in issue order across all tasks, like one fio
    /// job with a deep queue. With `wrap` it starts over at the end of the
    /// span (time-based phases); without, the job ends there (layout).
    Sequential {
        span_bytes: u64,
        stride_bytes: u64,
        wrap: bool,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub write: bool,
    pub offsets: Offsets,
    pub block_bytes: u32,
    pub iodepth: u32,
    pub volume_id: u64,
    pub extent_bytes: u32,
    /// Time-based phases stop here; None runs until the offsets run out.
    pub runtime: Option<Duration>,
}

/// State shared by one job's tasks.
struct Shared {
    job: Job,
    /// Next sequential slot (in strides).
    cursor: AtomicU64,
    /// Set by a failing task so the others stop rather than run out the clock.
    stop: AtomicBool,
    deadline: Option<Instant>,
}

impl Shared {
    fn next_offset(&self, rng: &mut StdRng) -> Option<u64> {
        let block = self.job.block_bytes as u64;
        match self.job.offsets {
            Offsets::Random { span_bytes } => Some(rng.gen_range(0..span_bytes / block) * block),
            Offsets::Sequential {
                span_bytes,
                stride_bytes,
                wrap,
            } => {
                let slot = self.cursor.fetch_add(1, Ordering::Relaxed);
                let slots = span_bytes / stride_bytes;
                if wrap {
                    Some(slot % slots * stride_bytes)
                } else {
                    (slot < slots).then_some(slot * stride_bytes)
                }
            }
        }
    }

    fn keep_going(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && self.deadline.is_none_or(|d| Instant::now() < d)
    }
}

/// Checks a job before running it; the callers build jobs from user flags.
fn validate(job: &Job) -> anyhow::Result<()> {
    let block = job.block_bytes as u64;
    if job.iodepth == 0 || job.block_bytes == 0 || !job.block_bytes.is_multiple_of(4096) {
        bail!(
            "queue depth {} and block size {} must be positive, blocks 4 KiB multiples",
            job.iodepth,
            block
        );
    }
    if job.block_bytes > job.extent_bytes || !job.extent_bytes.is_multiple_of(job.block_bytes) {
        bail!(
            "block size {block} must divide the extent size {}",
            job.extent_bytes
        );
    }
    let (span, stride) = match job.offsets {
        Offsets::Random { span_bytes } => (span_bytes, block),
        Offsets::Sequential {
            span_bytes,
            stride_bytes,
            ..
        } => (span_bytes, stride_bytes),
    };
    if stride < block || stride % block != 0 || span < stride {
        bail!("span {span} and stride {stride} must hold at least one {block}-byte block");
    }
    Ok(())
}

/// Runs `job` against `subject` and returns what it achieved. The first
/// failing request stops the job and is returned with where it happened.
pub async fn run(subject: Arc<Subject>, job: Job, seed: u64) -> anyhow::Result<Throughput> {
    validate(&job)?;
    let start = Instant::now();
    let shared = Arc::new(Shared {
        job,
        cursor: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        deadline: job.runtime.map(|r| start + r),
    });
    let mut tasks = JoinSet::new();
    for task in 0..job.iodepth as usize {
        let (subject, shared) = (subject.clone(), shared.clone());
        let rng = StdRng::seed_from_u64(seed ^ (task as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let runtime = subject.runtime.clone();
        let work = async move {
            let result = worker(&subject, &shared, task, rng).await;
            if result.is_err() {
                shared.stop.store(true, Ordering::Relaxed);
            }
            result
        };
        tasks.spawn_on(work, &runtime);
    }
    let mut ops = 0;
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined.context("a load task panicked")? {
            Ok(task_ops) => ops += task_ops,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(Throughput::new(
        ops,
        ops * job.block_bytes as u64,
        start.elapsed(),
    ))
}

async fn worker(
    subject: &Subject,
    shared: &Shared,
    task: usize,
    mut rng: StdRng,
) -> anyhow::Result<u64> {
    let job = &shared.job;
    let payload = job.write.then(|| {
        let mut data = IoBuf::zeroed(job.block_bytes as usize);
        rng.fill(&mut data[..]);
        Bytes::from_owner(data)
    });
    let mut ops = 0u64;
    while shared.keep_going() {
        let Some(volume_offset) = shared.next_offset(&mut rng) else {
            break;
        };
        let extent_bytes = job.extent_bytes as u64;
        let r = Range {
            key: ExtentKey {
                volume_id: job.volume_id,
                extent_index: volume_offset / extent_bytes,
                epoch: 1,
            },
            extent_bytes: job.extent_bytes,
            offset: volume_offset % extent_bytes,
            len: job.block_bytes,
        };
        if let Some(payload) = &payload {
            subject
                .write(task, r, payload)
                .await
                .with_context(|| format!("write of {r}"))?;
        } else {
            let got = subject
                .read(task, r)
                .await
                .with_context(|| format!("read of {r}"))?;
            if got != r.len as usize {
                bail!("read of {r}: got {got} bytes back");
            }
        }
        ops += 1;
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_chunkserver::store::{IoMode, StoreOptions};

    fn job(offsets: Offsets) -> Job {
        Job {
            write: true,
            offsets,
            block_bytes: 4096,
            iodepth: 4,
            volume_id: 1,
            extent_bytes: 1 << 20,
            runtime: None,
        }
    }

    fn shared(job: Job) -> Shared {
        Shared {
            job,
            cursor: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            deadline: None,
        }
    }

    #[test]
    fn sequential_offsets_end_or_wrap() {
        let mut rng = StdRng::seed_from_u64(1);
        let once = shared(job(Offsets::Sequential {
            span_bytes: 3 * 8192,
            stride_bytes: 8192,
            wrap: false,
        }));
        let got: Vec<_> = std::iter::from_fn(|| once.next_offset(&mut rng)).collect();
        assert_eq!(got, [0, 8192, 16384]);
        let wrap = shared(job(Offsets::Sequential {
            span_bytes: 2 * 8192 + 100,
            stride_bytes: 8192,
            wrap: true,
        }));
        let got: Vec<_> = (0..5)
            .map(|_| wrap.next_offset(&mut rng).unwrap())
            .collect();
        assert_eq!(got, [0, 8192, 0, 8192, 0]);
    }

    #[test]
    fn random_offsets_aligned_and_in_span() {
        let mut rng = StdRng::seed_from_u64(2);
        let s = shared(job(Offsets::Random {
            span_bytes: 10 * 4096,
        }));
        for _ in 0..1000 {
            let o = s.next_offset(&mut rng).unwrap();
            assert_eq!(o % 4096, 0);
            assert!(o < 10 * 4096);
        }
    }

    #[test]
    fn rejects_bad_jobs() {
        let mut j = job(Offsets::Random {
            span_bytes: 1 << 20,
        });
        assert!(validate(&j).is_ok());
        j.block_bytes = 2 << 20;
        assert!(validate(&j).is_err(), "block larger than extent");
        j.block_bytes = 4096;
        j.iodepth = 0;
        assert!(validate(&j).is_err());
        j.iodepth = 1;
        j.offsets = Offsets::Random { span_bytes: 100 };
        assert!(validate(&j).is_err(), "span smaller than a block");
    }

    #[test]
    fn runs_against_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Buffered, so the test also runs where /tmp is tmpfs (no O_DIRECT).
        let options = StoreOptions {
            io_mode: IoMode::Buffered,
            ..Default::default()
        };
        let store = Store::open(dir.path(), options).unwrap();
        let subject = Arc::new(Subject::in_process(store.clone(), rt.handle().clone()));
        let layout = Job {
            block_bytes: 1 << 20,
            ..job(Offsets::Sequential {
                span_bytes: 4 << 20,
                stride_bytes: 1 << 20,
                wrap: false,
            })
        };
        let t = rt.block_on(run(subject.clone(), layout, 1)).unwrap();
        assert_eq!((t.ops, t.bytes), (4, 4 << 20));
        let read = Job {
            write: false,
            runtime: Some(Duration::from_millis(50)),
            ..job(Offsets::Random {
                span_bytes: 4 << 20,
            })
        };
        let t = rt.block_on(run(subject, read, 2)).unwrap();
        assert!(t.ops > 0);
        rt.block_on(store.shutdown()).unwrap();
    }
}
