//! `cairn-target` as a real process in front of a [`ReplicatedCluster`], and
//! helpers to run the third-party NBD clients (nbdinfo, qemu-io, qemu-img,
//! nbdcopy, fio, nbdfuse) against it.

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cluster::ReplicatedCluster;
use crate::{
    bin_path, free_loopback_addr, log_tail, read_log, temp_dir, terminate, wait_until_listening,
    READY_TIMEOUT,
};

/// The address targets listen on (a host of its own beside the chunk
/// servers on .2-.4).
pub const TARGET_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);

pub struct TargetProcess {
    child: Option<Child>,
    addr: SocketAddr,
    unix: PathBuf,
    args: Vec<String>,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TargetProcess {
    /// Starts a target for `cluster` (TCP on 127.0.0.10, plus a unix
    /// socket) and waits until it has reached the cluster. `extra` goes on
    /// its command line.
    pub fn start(cluster: &ReplicatedCluster, extra: &[&str]) -> anyhow::Result<TargetProcess> {
        let dir = temp_dir("cairn-target-")?;
        let unix = dir.path().join("nbd.sock");
        let mut args: Vec<String> = vec![
            "--volmgr".into(),
            cluster.volmgr.addrs().join(","),
            "--cluster-id".into(),
            cluster.volmgr.cluster_id.clone(),
            "--unix".into(),
            unix.display().to_string(),
            // Quick retries: failover tests run with short detector timings.
            "--io-timeout-ms".into(),
            "60000".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut t = TargetProcess {
            child: None,
            addr: free_loopback_addr(TARGET_IP)?,
            unix,
            args,
            log_path: dir.path().join("target.log"),
            _dir: dir,
        };
        t.launch()?;
        Ok(t)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let bin = bin_path("cairn-target")?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("opening the target's log")?;
        let before = read_log(&self.log_path).len();
        let mut child = Command::new(&bin)
            .args(&self.args)
            .arg("--listen")
            .arg(self.addr.to_string())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        wait_until_listening(&mut child, self.addr)
            .with_context(|| format!("target log:\n{}", log_tail(&self.log_path)))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while !read_log(&self.log_path)[before..].contains("connected to cluster") {
            if let Some(s) = child.try_wait()? {
                bail!(
                    "target exited with {s} before reaching the cluster:\n{}",
                    log_tail(&self.log_path)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "target did not reach the cluster within {READY_TIMEOUT:?}:\n{}",
                    log_tail(&self.log_path)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn unix_socket(&self) -> &Path {
        &self.unix
    }

    /// `nbd://127.0.0.10:PORT/EXPORT`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    /// `nbd+unix:///EXPORT?socket=PATH`.
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.unix.display())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, reaped.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let Some(mut c) = self.child.take() else {
            bail!("target is not running");
        };
        c.kill().context("killing the target")?;
        c.wait().context("reaping the target")?;
        Ok(())
    }

    /// Starts it again on the same address (clients reconnect there).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("target is still running");
        }
        self.launch()
    }

    /// SIGTERM; its exit status.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(c) = self.child.take() else {
            bail!("target is not running");
        };
        terminate(c, "cairn-target", &self.log_path)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }
}

impl Drop for TargetProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- cairn-target log (tail) ---\n{}\n--- end of log ---",
                log_tail(&self.log_path)
            );
        }
    }
}

/// Runs a third-party tool to completion; fails with its output unless it
/// exits 0. A tool missing from PATH fails the test with the package to
/// install (the README's test set-up installs them all).
pub fn run_tool(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = tool(program, args)?;
    if !out.status.success() {
        bail!(
            "{program} {} exited with {}\nstdout:\n{}\nstderr:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Runs a third-party tool and returns its output whatever its status.
pub fn tool(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "running {program} (install it: apt-get install {})",
                package_of(program)
            )
        })
}

/// The Debian package that provides a client tool.
pub fn package_of(program: &str) -> &'static str {
    match program {
        "nbdinfo" | "nbdcopy" | "nbdfuse" => "libnbd-bin",
        "qemu-io" | "qemu-img" | "qemu-nbd" => "qemu-utils",
        "fio" => "fio",
        "nbdkit" => "nbdkit",
        _ => "(see the README)",
    }
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A hand-driven NBD client over a plain TCP socket, for sending what real
/// clients never would and reading the exact replies.
pub struct RawNbd {
    pub s: std::net::TcpStream,
}

/// One reply: simple (`kind` None) or one structured chunk.
#[derive(Debug)]
pub struct RawReply {
    pub cookie: u64,
    pub error: u32,
    pub kind: Option<u16>,
    pub flags: u16,
    pub data: Vec<u8>,
}

impl RawNbd {
    /// Connects and reads the greeting; sends client flags (fixed newstyle,
    /// no zeroes).
    pub fn connect(addr: SocketAddr) -> anyhow::Result<RawNbd> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g)?;
        if &g[0..8] != b"NBDMAGIC" || &g[8..16] != b"IHAVEOPT" {
            bail!("bad greeting {g:?}");
        }
        s.write_all(&3u32.to_be_bytes())?;
        Ok(RawNbd { s })
    }

    pub fn send_option(&mut self, opt: u32, data: &[u8]) -> anyhow::Result<()> {
        use std::io::Write;
        let mut b = Vec::new();
        b.extend_from_slice(b"IHAVEOPT");
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b)?;
        Ok(())
    }

    /// Reads option replies until the final one (ACK or an error):
    /// `(reply type, data)` each.
    pub fn option_replies(&mut self) -> anyhow::Result<Vec<(u32, Vec<u8>)>> {
        use std::io::Read;
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h)?;
            if u64::from_be_bytes(h[0..8].try_into()?) != 0x0003_e889_0455_65a9 {
                bail!("bad option reply magic");
            }
            let kind = u32::from_be_bytes(h[12..16].try_into()?);
            let len = u32::from_be_bytes(h[16..20].try_into()?);
            let mut d = vec![0u8; len as usize];
            self.s.read_exact(&mut d)?;
            out.push((kind, d));
            if kind == 1 || kind & (1 << 31) != 0 {
                return Ok(out);
            }
        }
    }

    /// STRUCTURED_REPLY (if asked) and GO to `name`; the export's size and
    /// transmission flags.
    pub fn go(&mut self, name: &str, structured: bool) -> anyhow::Result<(u64, u16)> {
        if structured {
            self.send_option(8, &[])?;
            let r = self.option_replies()?;
            if r.last().map(|x| x.0) != Some(1) {
                bail!("STRUCTURED_REPLY refused: {r:?}");
            }
        }
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        self.send_option(7, &d)?;
        let replies = self.option_replies()?;
        let Some((1, _)) = replies.last() else {
            bail!("GO {name} refused: {replies:?}");
        };
        for (kind, d) in &replies {
            if *kind == 3 && d.len() == 12 && d[0..2] == [0, 0] {
                return Ok((
                    u64::from_be_bytes(d[2..10].try_into()?),
                    u16::from_be_bytes(d[10..12].try_into()?),
                ));
            }
        }
        bail!("GO {name}: no NBD_INFO_EXPORT in {replies:?}")
    }

    pub fn request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        use std::io::Write;
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b)?;
        Ok(())
    }

    /// Reads one reply; a simple reply to a read carries `read_len` bytes
    /// when it succeeds.
    pub fn reply(&mut self, read_len: usize) -> anyhow::Result<RawReply> {
        use std::io::Read;
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m)?;
        match u32::from_be_bytes(m) {
            0x6744_6698 => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h)?;
                let error = u32::from_be_bytes(h[0..4].try_into()?);
                let cookie = u64::from_be_bytes(h[4..12].try_into()?);
                let mut data = vec![0u8; if error == 0 { read_len } else { 0 }];
                self.s.read_exact(&mut data)?;
                Ok(RawReply {
                    cookie,
                    error,
                    kind: None,
                    flags: 0,
                    data,
                })
            }
            0x668e_33ef => {
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h)?;
                let flags = u16::from_be_bytes(h[0..2].try_into()?);
                let kind = u16::from_be_bytes(h[2..4].try_into()?);
                let cookie = u64::from_be_bytes(h[4..12].try_into()?);
                let len = u32::from_be_bytes(h[12..16].try_into()?);
                let mut data = vec![0u8; len as usize];
                self.s.read_exact(&mut data)?;
                let error = if kind & (1 << 15) != 0 {
                    u32::from_be_bytes(data[0..4].try_into()?)
                } else {
                    0
                };
                Ok(RawReply {
                    cookie,
                    error,
                    kind: Some(kind),
                    flags,
                    data,
                })
            }
            other => bail!("bad reply magic {other:#x}"),
        }
    }
}

impl crate::Freeze for TargetProcess {
    fn running_pid(&self) -> Option<u32> {
        self.pid()
    }
    fn what(&self) -> String {
        format!("cairn-target {}", self.addr)
    }
}
