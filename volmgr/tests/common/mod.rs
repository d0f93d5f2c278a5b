//! One real `cairn-volmgr` member on loopback for the API tests, killed when
//! dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

/// One member, killed when dropped.
pub struct Member {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts member 1 of a new cluster `cluster` with 16 groups and `args`
/// (timings) on a free loopback port.
pub fn start(cluster: &str, args: &[&str]) -> Member {
    let dir = tempfile::tempdir().unwrap();
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let child = Command::new(env!("CARGO_BIN_EXE_cairn-volmgr"))
        .args(["--data-dir", &dir.path().join("m1").display().to_string()])
        .args(["--cluster-id", cluster, "--member-id", "1"])
        .args(["--listen", &addr, "--initial-members", &format!("1={addr}")])
        .args(["--group-count", "16"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Member {
        child,
        addr,
        _dir: dir,
    }
}
