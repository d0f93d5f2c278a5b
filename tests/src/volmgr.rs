//! A volume manager cluster of real `cairn-volmgr` processes on loopback:
//! member `i` listens on 127.0.0.(i+1) at a port picked once, so it keeps its
//! address across kills and restarts (raft knows members by address).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use cairn_volmgr::client::VolmgrClient;

use crate::{
    bin_path, free_loopback_addr, log_tail, read_log, temp_dir, terminate, wait_until_listening,
};

pub struct VolmgrMember {
    pub id: u64,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    log_path: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl VolmgrMember {
    fn launch(&mut self) -> anyhow::Result<()> {
        let bin = bin_path("cairn-volmgr")?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        let mut child = Command::new(&bin)
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,cairn_volmgr=debug".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        if let Err(e) = wait_until_listening(&mut child, self.addr) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.context(format!(
                "volmgr member {} did not start; log:\n{}",
                self.id,
                self.log()
            )));
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().context("killing a volmgr member")?;
            c.wait().context("reaping a volmgr member")?;
        }
        Ok(())
    }

    /// SIGTERM and wait for the exit status.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(child) = self.child.take() else {
            bail!("volmgr member {} is not running", self.id);
        };
        terminate(child, &format!("volmgr member {}", self.id), &self.log_path)
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("volmgr member {} is still running", self.id);
        }
        self.launch()
    }

    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }
}

impl Drop for VolmgrMember {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- volmgr member {} log (tail) ---\n{}\n---",
                self.id,
                log_tail(&self.log_path)
            );
        }
    }
}

pub struct VolmgrCluster {
    pub cluster_id: String,
    pub members: BTreeMap<u64, VolmgrMember>,
    extra: Vec<String>,
    _dir: tempfile::TempDir,
}

impl VolmgrCluster {
    /// Starts `n` members bootstrapping a new cluster; `extra` goes to each.
    pub fn start(n: u64, extra: &[&str]) -> anyhow::Result<Self> {
        let dir = temp_dir("cairn-volmgr-")?;
        let cluster_id = "test-cluster".to_string();
        let mut addrs = BTreeMap::new();
        for id in 1..=n {
            addrs.insert(
                id,
                free_loopback_addr(Ipv4Addr::new(127, 0, 0, 1 + id as u8))?,
            );
        }
        let initial: Vec<String> = addrs.iter().map(|(id, a)| format!("{id}={a}")).collect();
        let mut members = BTreeMap::new();
        for (&id, &addr) in &addrs {
            let data_dir = dir.path().join(format!("m{id}"));
            let mut args: Vec<String> = vec![
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--cluster-id".into(),
                cluster_id.clone(),
                "--member-id".into(),
                id.to_string(),
                "--listen".into(),
                addr.to_string(),
                "--initial-members".into(),
                initial.join(","),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            members.insert(
                id,
                VolmgrMember {
                    id,
                    addr,
                    data_dir,
                    log_path: dir.path().join(format!("m{id}.log")),
                    args,
                    child: None,
                },
            );
        }
        for m in members.values_mut() {
            m.launch()?;
        }
        Ok(Self {
            cluster_id,
            members,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            _dir: dir,
        })
    }

    /// Starts member `id` with an empty data directory and `--join`, on
    /// 127.0.0.(id+1); it serves once the leader adds it
    /// ([`VolmgrClient::add_member`]).
    pub fn start_joining(&mut self, id: u64) -> anyhow::Result<SocketAddr> {
        let addr = free_loopback_addr(Ipv4Addr::new(127, 0, 0, 1 + id as u8))?;
        let data_dir = self._dir.path().join(format!("m{id}"));
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--cluster-id".into(),
            self.cluster_id.clone(),
            "--member-id".into(),
            id.to_string(),
            "--listen".into(),
            addr.to_string(),
            "--join".into(),
        ];
        args.extend(self.extra.iter().cloned());
        let mut m = VolmgrMember {
            id,
            addr,
            data_dir,
            log_path: self._dir.path().join(format!("m{id}.log")),
            args,
            child: None,
        };
        m.launch()?;
        self.members.insert(id, m);
        Ok(addr)
    }

    pub fn addrs(&self) -> Vec<String> {
        self.members.values().map(|m| m.addr.to_string()).collect()
    }

    /// A client that knows every member.
    pub fn client(&self) -> VolmgrClient {
        VolmgrClient::new(self.addrs(), self.cluster_id.clone())
    }

    /// The member that leads now, asked of the cluster (waits up to 10 s).
    pub async fn leader(&self) -> anyhow::Result<u64> {
        let status = self
            .client()
            .with_deadline(Duration::from_secs(10))
            .cluster_status()
            .await
            .context("asking the cluster who leads")?;
        Ok(status.leader_id)
    }
}

impl crate::Freeze for VolmgrMember {
    fn running_pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
    fn what(&self) -> String {
        format!("volmgr member {}", self.id)
    }
}
