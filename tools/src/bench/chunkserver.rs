//! A real `cairn-chunkserver` child process for the RPC subject: starting it,
//! reading its resident memory, stopping it, and a pool of clients to drive it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use cairn_chunkserver::config::Threads;
use cairn_chunkserver::rpc::ChunkClient;
use cairn_chunkserver::store::IoMode;

use super::load::Range;

/// How long a fresh chunk server may take to answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a chunk server may take to exit after SIGTERM (it flushes and
/// marks its store clean) before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How often VmRSS is read while load runs.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);
/// How much of the chunk server's log an error message quotes.
const LOG_TAIL_BYTES: u64 = 2000;

/// The binary next to the running `cairn`, where Cargo puts both.
pub fn default_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the path of the running cairn binary")?;
    let dir = exe
        .parent()
        .context("the running cairn binary has no parent directory")?;
    Ok(dir.join("cairn-chunkserver"))
}

/// Fails early, with what to do, if there is no chunk server binary at `bin`.
pub fn check_bin(bin: &Path) -> anyhow::Result<()> {
    if !bin.is_file() {
        bail!(
            "chunk server binary {} not found; build it with `cargo build --release -p cairn-chunkserver` \
             or pass --chunkserver-bin",
            bin.display()
        );
    }
    Ok(())
}

/// A running chunk server. Dropping it kills the process, so a benchmark that
/// fails half-way leaves nothing running.
pub struct ChunkServer {
    /// None once stopped. In a mutex so that `&self` callers (the phases)
    /// can ask whether it is still running.
    child: Mutex<Option<Child>>,
    pub addr: SocketAddr,
    log_path: PathBuf,
}

impl ChunkServer {
    /// Starts `bin` on a free loopback port with a new data directory
    /// `data_dir` (`--init`), logging to `log_path`, and waits until it answers
    /// a node stat. `store_engines` 0 is the chunk server's default;
    /// `threads` is its `--threads`.
    pub async fn start(
        bin: &Path,
        data_dir: &Path,
        io_mode: IoMode,
        store_engines: u32,
        threads: Threads,
        log_path: &Path,
    ) -> anyhow::Result<ChunkServer> {
        check_bin(bin)?;
        let addr = free_loopback_port()?;
        let log =
            File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .with_context(|| format!("duplicating {}", log_path.display()))?;
        let child = Command::new(bin)
            .args(["--threads", threads.name()])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(addr.to_string())
            .args(["--cluster-id", "cairn-bench", "--node-id", "1", "--init"])
            .args(["--io-mode", io_mode_flag(io_mode)])
            .args(["--store-engines", &store_engines.to_string()])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let server = ChunkServer {
            child: Mutex::new(Some(child)),
            addr,
            log_path: log_path.to_path_buf(),
        };
        server.wait_ready().await?;
        Ok(server)
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        // A panic elsewhere while holding the lock leaves the Child intact.
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn pid(&self) -> u32 {
        self.child().as_ref().map_or(0, |c| c.id())
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait()? {
                bail!(
                    "chunk server exited during start-up with {status}; its log ends:\n{}",
                    self.log_tail()
                );
            }
            let last_error = match ChunkClient::connect(self.addr).await {
                Ok(client) => match client.node_stat().await {
                    Ok(_) => return Ok(()),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "chunk server at {} did not answer within {START_TIMEOUT:?} (last error: {last_error}); \
                     its log ends:\n{}",
                    self.addr,
                    self.log_tail()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn try_wait(&self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child().as_mut() {
            Some(child) => child
                .try_wait()
                .context("checking on the chunk server process"),
            None => bail!("chunk server already stopped"),
        }
    }

    /// Adds to `error` that the chunk server has died, with its log, if it
    /// has: a failed request or /proc read is then explained by that.
    pub fn explain(&self, error: anyhow::Error) -> anyhow::Error {
        match self.try_wait() {
            Ok(Some(status)) => error.context(format!(
                "the chunk server exited unexpectedly with {status}; its log ends:\n{}",
                self.log_tail()
            )),
            _ => error,
        }
    }

    /// Resident memory now and its peak so far, from /proc.
    pub fn memory(&self) -> anyhow::Result<ProcMemory> {
        proc_memory(self.pid())
    }

    /// Sends SIGTERM and waits for a clean exit (killing it after
    /// [`STOP_TIMEOUT`]). An exit other than 0 is an error: the daemon
    /// promises exit 0 on SIGTERM.
    pub async fn stop(self) -> anyhow::Result<()> {
        if let Some(status) = self.try_wait()? {
            bail!(
                "chunk server had already exited with {status}; its log ends:\n{}",
                self.log_tail()
            );
        }
        // Our own child, not yet reaped (we hold its Child), so the pid
        // cannot belong to another process.
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .context("sending SIGTERM to the chunk server")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                bail!("chunk server did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed it");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        *self.child() = None;
        if !status.success() {
            bail!(
                "chunk server exited with {status} after SIGTERM; its log ends:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let read = || -> std::io::Result<String> {
            let mut f = File::open(&self.log_path)?;
            let len = f.metadata()?.len();
            f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
            let mut raw = Vec::new();
            f.read_to_end(&mut raw)?;
            Ok(String::from_utf8_lossy(&raw).into_owned())
        };
        read().unwrap_or_else(|e| format!("(could not read {}: {e})", self.log_path.display()))
    }
}

impl Drop for ChunkServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The daemon's `--io-mode` value for `mode`.
fn io_mode_flag(mode: IoMode) -> &'static str {
    match mode {
        IoMode::Direct => "direct",
        IoMode::Buffered => "buffered",
    }
}

/// Asks the kernel for a free port. Another process could take it before the
/// chunk server binds it; the start-up check then fails with the server's log.
fn free_loopback_port() -> anyhow::Result<SocketAddr> {
    free_loopback_addr(std::net::Ipv4Addr::LOCALHOST)
}

/// A port on loopback address `ip` that was free a moment ago.
pub fn free_loopback_addr(ip: std::net::Ipv4Addr) -> anyhow::Result<SocketAddr> {
    let listener =
        TcpListener::bind((ip, 0)).with_context(|| format!("finding a free port on {ip}"))?;
    listener
        .local_addr()
        .context("reading the address of a fresh listener")
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ProcMemory {
    /// VmRSS: resident now.
    pub rss_bytes: u64,
    /// VmHWM: the peak resident size since the process started.
    pub hwm_bytes: u64,
}

pub fn proc_memory(pid: u32) -> anyhow::Result<ProcMemory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status(&status).with_context(|| format!("reading VmRSS and VmHWM from {path}"))
}

fn parse_status(status: &str) -> anyhow::Result<ProcMemory> {
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} line"))?;
        let mut words = line[name.len()..].split_whitespace();
        let kib: u64 = words
            .next()
            .context("no value")?
            .parse()
            .with_context(|| format!("bad {line:?}"))?;
        if words.next() != Some("kB") {
            bail!("unexpected unit in {line:?}");
        }
        Ok(kib * 1024)
    };
    Ok(ProcMemory {
        rss_bytes: field("VmRSS:")?,
        hwm_bytes: field("VmHWM:")?,
    })
}

/// The largest VmRSS seen by one or more samplers.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct RssMax {
    pub max_bytes: Option<u64>,
    pub samples: u32,
}

impl RssMax {
    pub fn merge(&mut self, other: RssMax) {
        self.max_bytes = self.max_bytes.max(other.max_bytes);
        self.samples += other.samples;
    }
}

/// Reads a process's VmRSS every [`RSS_SAMPLE_INTERVAL`] until stopped.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<anyhow::Result<RssMax>>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut max = RssMax::default();
            while !flag.load(Ordering::Relaxed) {
                tokio::time::sleep(RSS_SAMPLE_INTERVAL).await;
                let rss = proc_memory(pid)?.rss_bytes;
                max.max_bytes = max.max_bytes.max(Some(rss));
                max.samples += 1;
            }
            Ok(max)
        });
        RssSampler { stop, task }
    }

    pub async fn stop(self) -> anyhow::Result<RssMax> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.context("the memory sampler panicked")?
    }
}

/// A few connections to one chunk server; request tasks share them
/// round-robin, each connection carrying many requests at once.
pub struct RpcPool {
    clients: Vec<ChunkClient>,
}

impl RpcPool {
    pub async fn connect(addr: SocketAddr, connections: usize) -> anyhow::Result<RpcPool> {
        let mut clients = Vec::with_capacity(connections);
        for _ in 0..connections {
            clients.push(
                ChunkClient::connect(addr)
                    .await
                    .with_context(|| format!("connecting to {addr}"))?,
            );
        }
        Ok(RpcPool { clients })
    }

    fn client(&self, task: usize) -> &ChunkClient {
        &self.clients[task % self.clients.len()]
    }

    pub async fn write(&self, task: usize, r: Range, data: Bytes) -> anyhow::Result<()> {
        let client = self.client(task);
        Ok(client
            .write(r.key, r.extent_bytes, r.offset, data, false)
            .await?)
    }

    pub async fn read(&self, task: usize, r: Range) -> anyhow::Result<usize> {
        let client = self.client(task);
        Ok(client
            .read(r.key, r.extent_bytes, r.offset, r.len)
            .await?
            .len())
    }

    /// Flush is node-wide, so one connection's flush covers every write
    /// acknowledged on any of them.
    pub async fn flush(&self) -> anyhow::Result<()> {
        Ok(self.clients[0].flush().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status() {
        let status = "Name:\tcairn-chunkserver\nVmPeak:\t  100 kB\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\n";
        let m = parse_status(status).unwrap();
        assert_eq!((m.rss_bytes, m.hwm_bytes), (1 << 20, 2 << 20));
        assert!(parse_status("VmRSS:\t12 MB\nVmHWM:\t1 kB\n").is_err());
        assert!(parse_status("Name: x\n").is_err());
    }

    #[test]
    fn reads_own_memory() {
        let m = proc_memory(std::process::id()).unwrap();
        assert!(m.rss_bytes > 0 && m.hwm_bytes >= m.rss_bytes);
    }

    #[test]
    fn pool_drives_a_server() {
        use super::super::load::{self, Job, Offsets, Subject};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let server = crate::test_server::TestServer::start().await;
            let pool = RpcPool::connect(server.addr, 3).await.unwrap();
            let subject = Arc::new(Subject::rpc(pool, tokio::runtime::Handle::current()));
            let job = Job {
                write: true,
                offsets: Offsets::Sequential {
                    span_bytes: 8 << 20,
                    stride_bytes: 1 << 20,
                    wrap: false,
                },
                block_bytes: 4096,
                iodepth: 8,
                volume_id: 3,
                extent_bytes: 1 << 20,
                runtime: None,
            };
            let t = load::run(subject.clone(), job, 1).await.unwrap();
            assert_eq!(t.ops, 8, "one block in each of 8 extents");
            subject.flush().await.unwrap();
            let read = Job {
                write: false,
                offsets: Offsets::Random {
                    span_bytes: 8 << 20,
                },
                runtime: Some(Duration::from_millis(50)),
                ..job
            };
            assert!(load::run(subject.clone(), read, 2).await.unwrap().ops > 0);
            let node = ChunkClient::connect(server.addr)
                .await
                .unwrap()
                .node_stat()
                .await
                .unwrap();
            assert_eq!(node.extents, 8);
            drop(subject);
            server.stop().await;
        });
    }
}
