//! Start-up and shutdown of a real `cairn-chunkserver` process: every way a
//! data directory or configuration can be wrong ends in exit status 2 and a
//! message naming the problem, and leaves the data directory exactly as it
//! was; a good start stops cleanly on SIGTERM or SIGINT.
//!
//! The read-only and full-disk cases mount file systems (tmpfs, a bind mount,
//! a loop-mounted ext4 image), which needs root. A failed mount fails the
//! test: a storage daemon's disk-full handling must not go untested quietly.
//!
//! The helpers live here rather than in `cairn_tests` because these tests
//! need what the shared helpers deliberately hide: failed starts, their exit
//! status and stderr, and servers on data directories the test prepared.

use std::fs;
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cairn_tests::mount::Mount;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Longest wait for a server to start serving or to exit.
const WAIT_MAX: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Exit status for a configuration or data directory error.
const EXIT_CONFIG: i32 = 2;
const EXIT_RUNTIME: i32 = 1;
/// The line main.rs logs once the server is ready, before the address.
const SERVING_MARK: &str = " serving on ";
/// main.rs's last line on a clean stop (the store logs "store stopped cleanly"
/// too, so the target is part of the match).
const STOPPED_MARK: &str = "cairn_chunkserver: stopped cleanly";

fn bin() -> PathBuf {
    cairn_tests::bin_path("cairn-chunkserver").expect("locating cairn-chunkserver")
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    cairn_tests::temp_dir(prefix).expect("creating a temporary folder")
}

/// The settings of one node; builds its command lines.
#[derive(Debug, Clone)]
struct Node {
    data_dir: PathBuf,
    cluster_id: String,
    node_id: u64,
}

impl Node {
    fn new(data_dir: &Path, cluster_id: &str, node_id: u64) -> Node {
        Node {
            data_dir: data_dir.to_path_buf(),
            cluster_id: cluster_id.to_string(),
            node_id,
        }
    }

    /// Required settings, an ephemeral port (the server logs the real one)
    /// and buffered I/O, since tmpfs may not take O_DIRECT.
    fn args(&self) -> Vec<String> {
        vec![
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--cluster-id".into(),
            self.cluster_id.clone(),
            "--node-id".into(),
            self.node_id.to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--io-mode".into(),
            "buffered".into(),
        ]
    }

    fn with(&self, extra: &[&str]) -> Vec<String> {
        let mut args = self.args();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Formats the data directory the way an operator does: start with
    /// --init, wait until it serves, stop it.
    fn init(&self) {
        let mut server = Server::start(&self.with(&["--init"]));
        let status = server.signal_and_wait(Signal::SIGTERM);
        assert_eq!(
            status.code(),
            Some(0),
            "init run failed:\n{}",
            server.stderr()
        );
        assert!(self.data_dir.join("identity.toml").is_file());
    }

    fn identity_path(&self) -> PathBuf {
        self.data_dir.join("identity.toml")
    }

    fn identity_bytes(&self) -> Vec<u8> {
        fs::read(self.identity_path()).expect("reading identity.toml")
    }
}

/// A started `cairn-chunkserver`, killed on drop. Its stderr goes to a file.
struct Server {
    child: Option<Child>,
    stderr_path: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Server {
    fn spawn(args: &[String]) -> Server {
        let log_dir = temp_dir("cairn-startup-log-");
        let stderr_path = log_dir.path().join("stderr");
        let stderr = fs::File::create(&stderr_path).expect("creating the stderr file");
        let child = Command::new(bin())
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("starting cairn-chunkserver");
        Server {
            child: Some(child),
            stderr_path,
            _log_dir: log_dir,
        }
    }

    /// Starts a server and waits until it logs its address and accepts on it.
    fn start(args: &[String]) -> Server {
        let mut server = Server::spawn(args);
        let addr = server.wait_serving();
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("server says it serves on {addr} but connect fails: {e}"));
        server
    }

    fn stderr(&self) -> String {
        fs::read(&self.stderr_path)
            .map(|raw| String::from_utf8_lossy(&raw).into_owned())
            .unwrap_or_default()
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("server process")
    }

    /// The address from the "serving on" line.
    fn wait_serving(&mut self) -> SocketAddr {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            let stderr = self.stderr();
            if let Some(addr) = stderr.lines().find_map(serving_addr) {
                return addr;
            }
            if let Some(status) = self.child().try_wait().expect("polling the server") {
                panic!("server exited with {status} before serving:\n{stderr}");
            }
            assert!(
                Instant::now() < deadline,
                "server did not serve within {WAIT_MAX:?}:\n{stderr}"
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            if let Some(status) = self.child().try_wait().expect("polling the server") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit within {WAIT_MAX:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn pid(&mut self) -> u32 {
        self.child().id()
    }

    fn signal_and_wait(&mut self, signal: Signal) -> ExitStatus {
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pid fits i32"));
        kill(pid, signal).expect("signalling the server");
        self.wait_exit()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- server stderr ---\n{}\n--- end ---", self.stderr());
        }
    }
}

fn serving_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once(SERVING_MARK)?;
    rest.split(',').next()?.trim().parse().ok()
}

/// How a run that was expected to fail ended.
struct Failure {
    status: ExitStatus,
    stderr: String,
}

/// Runs the server expecting it to exit on its own; returns status and stderr.
fn run_to_exit(args: &[String]) -> Failure {
    let mut server = Server::spawn(args);
    let status = server.wait_exit();
    Failure {
        status,
        stderr: server.stderr(),
    }
}

/// Runs the server and checks it refused to start with a configuration or
/// data directory error whose message holds every one of `words`, in one
/// "error:" paragraph, without a panic.
fn expect_refusal(args: &[String], words: &[&str]) -> String {
    let failure = run_to_exit(args);
    let stderr = failure.stderr;
    assert_eq!(
        failure.status.code(),
        Some(EXIT_CONFIG),
        "expected exit status {EXIT_CONFIG}, got {}; stderr:\n{stderr}",
        failure.status
    );
    let message = stderr
        .lines()
        .find(|l| l.starts_with("cairn-chunkserver: error: "))
        .unwrap_or_else(|| panic!("no error line in stderr:\n{stderr}"));
    for word in words {
        assert!(
            message.contains(word),
            "error message lacks {word:?}:\n{message}"
        );
    }
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "a refusal must not panic:\n{stderr}"
    );
    assert!(
        !stderr.contains(SERVING_MARK),
        "refused but served first:\n{stderr}"
    );
    message.to_string()
}

/// Names in a folder, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("listing a folder")
        .map(|e| {
            e.expect("folder entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn help_exits_zero_and_explains_every_flag() {
    let output = Command::new(bin())
        .arg("--help")
        .output()
        .expect("running --help");
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--config",
        "--data-dir",
        "--listen",
        "--cluster-id",
        "--node-id",
        "--init",
        "--io-mode",
        "--ring-entries",
        "--open-extents-max",
        "--requests-in-flight-max",
        "--connections-max",
        "--free-bytes-min",
        "--log-level",
        "--log-format",
        "--help",
        "--version",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
    assert!(
        help.contains("7410"),
        "--help names the default port:\n{help}"
    );
}

#[test]
fn missing_required_settings_name_flag_and_key() {
    expect_refusal(
        &["--node-id".to_string(), "1".to_string()],
        &["--data-dir", "data_dir", "--cluster-id", "cluster_id"],
    );
}

#[test]
fn wrong_cluster_id_is_refused_and_nothing_is_rewritten() {
    let tmp = temp_dir("cairn-startup-");
    let node = Node::new(tmp.path(), "cluster-a", 3);
    node.init();
    let before = node.identity_bytes();
    let other = Node::new(tmp.path(), "cluster-b", 3);
    for extra in [&[][..], &["--init"][..]] {
        expect_refusal(
            &other.with(extra),
            &[
                &tmp.path().display().to_string(),
                "belongs to cluster cluster-a node 3",
                "configured for cluster cluster-b node 3",
                "--data-dir",
            ],
        );
        assert_eq!(node.identity_bytes(), before, "identity rewritten");
    }
}

#[test]
fn wrong_node_id_is_refused_and_nothing_is_rewritten() {
    let tmp = temp_dir("cairn-startup-");
    let node = Node::new(tmp.path(), "cluster-a", 3);
    node.init();
    let before = node.identity_bytes();
    let other = Node::new(tmp.path(), "cluster-a", 4);
    for extra in [&[][..], &["--init"][..]] {
        expect_refusal(
            &other.with(extra),
            &[
                "belongs to cluster cluster-a node 3",
                "configured for cluster cluster-a node 4",
            ],
        );
        assert_eq!(node.identity_bytes(), before, "identity rewritten");
    }
}

#[test]
fn empty_directory_without_init_is_refused_and_left_empty() {
    let tmp = temp_dir("cairn-startup-");
    let node = Node::new(tmp.path(), "c1", 1);
    expect_refusal(
        &node.args(),
        &[&tmp.path().display().to_string(), "not formatted", "--init"],
    );
    assert!(entries(tmp.path()).is_empty(), "{:?}", entries(tmp.path()));
}

#[test]
fn missing_directory_without_init_is_refused_and_not_created() {
    let tmp = temp_dir("cairn-startup-");
    let dir = tmp.path().join("not-there");
    expect_refusal(
        &Node::new(&dir, "c1", 1).args(),
        &["does not exist", "--init"],
    );
    assert!(!dir.exists());
}

#[test]
fn init_over_a_foreign_directory_is_refused_and_nothing_is_touched() {
    let tmp = temp_dir("cairn-startup-");
    fs::write(tmp.path().join("study-0001.dcm"), b"someone's data").expect("writing");
    fs::create_dir(tmp.path().join("extents")).expect("mkdir");
    fs::write(tmp.path().join("extents").join("x"), b"not ours").expect("writing");
    let node = Node::new(tmp.path(), "c1", 1);
    expect_refusal(
        &node.with(&["--init"]),
        &[
            "refusing to --init",
            "not empty",
            "study-0001.dcm",
            "extents",
        ],
    );
    assert_eq!(entries(tmp.path()), vec!["extents", "study-0001.dcm"]);
    assert_eq!(
        fs::read(tmp.path().join("study-0001.dcm")).expect("reading"),
        b"someone's data"
    );
}

#[test]
fn init_twice_with_the_same_identity_is_a_no_op() {
    let tmp = temp_dir("cairn-startup-");
    let node = Node::new(tmp.path(), "c1", 7);
    node.init();
    let before = node.identity_bytes();
    node.init();
    assert_eq!(
        node.identity_bytes(),
        before,
        "second --init rewrote the identity"
    );
    // And a plain start works too.
    let mut server = Server::start(&node.args());
    assert_eq!(server.signal_and_wait(Signal::SIGTERM).code(), Some(0));
}

/// Writes `bytes` as the identity, checks the server refuses it as corrupt
/// with `reason` in the message, and that the file is unchanged.
fn expect_corrupt(node: &Node, bytes: &[u8], reason: &str) {
    fs::write(node.identity_path(), bytes).expect("writing identity");
    let path = node.identity_path().display().to_string();
    for extra in [&[][..], &["--init"][..]] {
        expect_refusal(
            &node.with(extra),
            &["identity file", &path, "is corrupt", reason],
        );
        assert_eq!(
            fs::read(node.identity_path()).expect("reading identity"),
            bytes,
            "corrupt identity was rewritten"
        );
    }
}

#[test]
fn corrupt_identity_is_refused_and_never_rewritten() {
    let tmp = temp_dir("cairn-startup-");
    let node = Node::new(tmp.path(), "c1", 5);
    node.init();
    let good = node.identity_bytes();
    let text = String::from_utf8(good.clone()).expect("identity is text");

    expect_corrupt(&node, b"\x00\x17\xffgarbage = = [", "not UTF-8");
    expect_corrupt(&node, b"garbage = = [", "not valid TOML");
    expect_corrupt(&node, &good[..good.len() / 2], "");
    expect_corrupt(&node, b"", "empty");

    // Bit rot in the checksum itself, and in a value.
    let crc_line = text
        .lines()
        .find(|l| l.starts_with("crc32 = "))
        .expect("identity has a crc32 line");
    let crc: u32 = crc_line["crc32 = ".len()..]
        .parse()
        .expect("crc is a number");
    let flipped = text.replace(crc_line, &format!("crc32 = {}", crc ^ 0x0400));
    expect_corrupt(&node, flipped.as_bytes(), "crc32 mismatch");
    let rotted = text.replace("node_id = 5", "node_id = 1");
    assert_ne!(rotted, text);
    expect_corrupt(&node, rotted.as_bytes(), "crc32 mismatch");

    let without_node: String = text
        .lines()
        .filter(|l| !l.starts_with("node_id"))
        .map(|l| format!("{l}\n"))
        .collect();
    expect_corrupt(&node, without_node.as_bytes(), "node_id");
    let newer = text.replace("format_version = 1", "format_version = 9");
    expect_corrupt(&node, newer.as_bytes(), "format_version 9");

    // Restoring the good bytes makes the node start again.
    fs::write(node.identity_path(), &good).expect("restoring identity");
    let mut server = Server::start(&node.args());
    assert_eq!(server.signal_and_wait(Signal::SIGTERM).code(), Some(0));
}

#[test]
fn read_only_tmpfs_is_refused_as_not_writable() {
    let tmp = temp_dir("cairn-startup-");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).expect("mkdir");
    let mount = Mount::new(&["-t", "tmpfs", "-o", "size=64m", "tmpfs"], &mnt);
    let node = Node::new(&mnt.join("data"), "c1", 2);
    node.init();
    let before = node.identity_bytes();
    mount.remount("remount,ro");
    expect_refusal(&node.args(), &["not writable", "read-only"]);
    expect_refusal(&node.with(&["--init"]), &["not writable"]);
    assert_eq!(node.identity_bytes(), before);
}

#[test]
fn read_only_bind_mount_is_refused_as_not_writable() {
    let tmp = temp_dir("cairn-startup-");
    let data = tmp.path().join("data");
    let node = Node::new(&data, "c1", 2);
    node.init();
    let before = node.identity_bytes();
    // Bind the data directory over itself, then make that view read-only.
    let mount = Mount::new(&["--bind", &data.display().to_string()], &data);
    mount.remount("remount,bind,ro");
    expect_refusal(&node.args(), &[&data.display().to_string(), "not writable"]);
    assert_eq!(node.identity_bytes(), before);
}

/// Appends to `path` until the file system says ENOSPC, in shrinking pieces
/// so that it ends up truly full.
fn fill_file_system(path: &Path) {
    let mut file = fs::File::create(path).expect("creating the filler");
    for piece_bytes in [1 << 20, 64 << 10, 4 << 10, 1 << 10, 1] {
        let piece = vec![0xa5u8; piece_bytes];
        loop {
            match file.write_all(&piece).and_then(|()| file.sync_data()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) if e.kind() == ErrorKind::StorageFull => break,
                Err(e) => panic!("filling the file system: {e}"),
            }
        }
    }
}

#[test]
fn full_disk_is_refused_with_free_bytes() {
    let tmp = temp_dir("cairn-startup-");
    let mount = Mount::loop_ext4(tmp.path(), 32);
    let mnt = mount.target().to_path_buf();

    // The mount point itself, lost+found and all, is the data directory.
    let node = Node::new(&mnt, "c1", 9);
    node.init();
    let before = node.identity_bytes();
    fill_file_system(&mnt.join("filler"));

    let dir = mnt.display().to_string();
    let message = expect_refusal(
        &node.args(),
        &[
            &format!("file system of {dir} is full"),
            "bytes free",
            "--free-bytes-min",
        ],
    );
    let free_bytes: u64 = message
        .split_once(" is full (")
        .and_then(|(_, rest)| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no free byte count in: {message}"));
    assert!(free_bytes < 16 << 20, "{message}");
    // Below any minimum: the write probe itself hits ENOSPC.
    expect_refusal(
        &node.with(&["--free-bytes-min", "0"]),
        &[
            &format!("file system of {dir} is full"),
            "bytes free",
            "no space left",
        ],
    );
    assert_eq!(node.identity_bytes(), before);
    assert!(
        !entries(&mnt)
            .iter()
            .any(|e| e.starts_with(".cairn-write-probe")),
        "probe file left behind: {:?}",
        entries(&mnt)
    );

    // Freeing space brings the node back.
    fs::remove_file(mnt.join("filler")).expect("removing the filler");
    let mut server = Server::start(&node.args());
    assert_eq!(server.signal_and_wait(Signal::SIGTERM).code(), Some(0));
}

#[test]
fn second_server_on_the_same_data_directory_is_refused() {
    let tmp = temp_dir("cairn-startup-");
    let node = Node::new(tmp.path(), "c1", 1);
    let mut first = Server::start(&node.with(&["--init"]));
    let pid = first.pid();
    expect_refusal(
        &node.args(),
        &[
            &tmp.path().display().to_string(),
            "in use by another cairn-chunkserver",
            &format!("pid {pid}"),
        ],
    );
    assert!(
        first.child().try_wait().expect("polling").is_none(),
        "the first server died"
    );
    assert_eq!(first.signal_and_wait(Signal::SIGTERM).code(), Some(0));
    // The lock dies with its holder.
    let mut again = Server::start(&node.args());
    assert_eq!(again.signal_and_wait(Signal::SIGTERM).code(), Some(0));
}

#[test]
fn config_file_unknown_key_and_bad_value_are_named() {
    let tmp = temp_dir("cairn-startup-");
    let data = tmp.path().join("data");
    let config = tmp.path().join("chunkserver.toml");
    let base = format!(
        "data_dir = \"{}\"\ncluster_id = \"c1\"\nlisten = \"127.0.0.1:0\"\n",
        data.display()
    );
    let config_arg = config.display().to_string();
    let args = vec!["--config".to_string(), config_arg.clone(), "--init".into()];

    fs::write(&config, format!("{base}node_id = 1\nring_entrys = 64\n")).expect("writing");
    expect_refusal(
        &args,
        &[&config_arg, "ring_entrys", "unknown field", "line 5"],
    );

    fs::write(&config, format!("{base}node_id = \"one\"\n")).expect("writing");
    expect_refusal(&args, &[&config_arg, "node_id", "line 4"]);

    fs::write(&config, format!("{base}node_id = 1\nring_entries = 1000\n")).expect("writing");
    expect_refusal(&args, &[&config_arg, "ring_entries", "power of two"]);
    assert!(
        !data.exists(),
        "a refused config must not create the data dir"
    );

    // A flag overrides the file, and a good file starts the server.
    let mut server =
        Server::start(&[args.clone(), vec!["--ring-entries".into(), "64".into()]].concat());
    assert_eq!(server.signal_and_wait(Signal::SIGTERM).code(), Some(0));
}

#[test]
fn port_in_use_is_a_clear_runtime_error() {
    let tmp = temp_dir("cairn-startup-");
    let taken = TcpListener::bind("127.0.0.1:0").expect("binding");
    let addr = taken.local_addr().expect("address");
    let node = Node::new(tmp.path(), "c1", 1);
    let mut args = node.with(&["--init"]);
    // A second --listen would be a usage error, so replace the first one.
    let at = args
        .iter()
        .position(|a| a == "127.0.0.1:0")
        .expect("listen arg");
    args[at] = addr.to_string();
    let failure = run_to_exit(&args);
    assert_eq!(
        failure.status.code(),
        Some(EXIT_RUNTIME),
        "{}",
        failure.stderr
    );
    assert!(
        failure.stderr.contains(&format!("cannot listen on {addr}")),
        "{}",
        failure.stderr
    );
    drop(taken);
}

#[test]
fn sigterm_stops_cleanly_within_bounded_time() {
    let tmp = temp_dir("cairn-startup-");
    let node = Node::new(tmp.path(), "c1", 1);
    let mut server = Server::start(&node.with(&["--init"]));
    let started = Instant::now();
    let status = server.signal_and_wait(Signal::SIGTERM);
    assert_eq!(status.code(), Some(0), "{}", server.stderr());
    assert!(started.elapsed() < WAIT_MAX);
    let stderr = server.stderr();
    assert!(stderr.contains("received SIGTERM"), "{stderr}");
    assert!(stderr.contains(STOPPED_MARK), "{stderr}");
}

#[test]
fn sigint_stops_cleanly() {
    let tmp = temp_dir("cairn-startup-");
    let node = Node::new(tmp.path(), "c1", 1);
    let mut server = Server::start(&node.with(&["--init"]));
    let status = server.signal_and_wait(Signal::SIGINT);
    assert_eq!(status.code(), Some(0), "{}", server.stderr());
    assert!(
        server.stderr().contains(STOPPED_MARK),
        "{}",
        server.stderr()
    );
}

#[test]
fn identity_without_extents_is_refused_as_missing_data() {
    let tmp = temp_dir("cairn-startup-");
    let node = Node::new(tmp.path(), "c1", 1);
    node.init();
    let before = node.identity_bytes();
    fs::remove_dir_all(tmp.path().join("extents")).expect("removing extents/");
    for extra in [&[][..], &["--init"][..]] {
        expect_refusal(&node.with(extra), &["no extents/ folder", "missing"]);
    }
    assert!(!tmp.path().join("extents").exists(), "extents/ recreated");
    assert_eq!(node.identity_bytes(), before);
}

#[test]
fn corrupt_extent_file_is_a_configuration_error_and_left_in_place() {
    use cairn_chunkserver::store::{layout, ExtentKey};

    let tmp = temp_dir("cairn-startup-");
    let node = Node::new(tmp.path(), "c1", 1);
    node.init();
    let key = ExtentKey {
        volume_id: 1,
        extent_index: 0,
        epoch: 0,
    };
    let path = tmp.path().join("extents").join(layout::relative_path(&key));
    fs::create_dir_all(path.parent().expect("extent folder")).expect("mkdir");
    // A length no extent size has: not a file the store wrote.
    let junk = vec![0x5au8; 5000];
    fs::write(&path, &junk).expect("writing junk");
    expect_refusal(
        &node.args(),
        &["corrupt extent file", &path.display().to_string()],
    );
    assert_eq!(
        fs::read(&path).expect("reading junk"),
        junk,
        "junk rewritten"
    );
}
