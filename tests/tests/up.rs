//! `cairn up` as a user runs it: a real `cairn` process starting the real
//! daemons, driven with nbdinfo and qemu-io. Each test gives its `cairn up`
//! free addresses, so tests run beside each other.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cairn_tests::mount::Mount;
use cairn_tests::target::{run_tool, stdout, tool};
use cairn_tests::up::{child_with_arg, children_of, free_up_args, nbd_addr, UpProcess};
use cairn_tests::{bin_path, temp_dir};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const START: Duration = Duration::from_secs(120);
const STOP: Duration = Duration::from_secs(90);

fn args_ref(a: &[String]) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

fn qemu_io(uri: &str, cmd: &str) -> anyhow::Result<String> {
    let out = run_tool("qemu-io", &["-f", "raw", "-c", cmd, uri])?;
    let text = stdout(&out);
    anyhow::ensure!(
        !text.contains("Pattern verification failed"),
        "qemu-io {cmd} on {uri}: {text}"
    );
    Ok(text)
}

/// `cairn ARGS` run in `cwd`, as a user in the `cairn up` folder would.
fn cairn(cwd: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin_path("cairn").unwrap())
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("running cairn")
}

/// Reads a `--json` event line's "process" field.
fn is_event(line: &str, event: &str, process: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(line)
        .is_ok_and(|v| v["event"] == event && (process.is_empty() || v["process"] == process))
}

/// Waits until `cairn up --json` has printed `event` for `process` (any
/// process if empty) after the first `skip` lines.
fn wait_event_after(
    up: &mut UpProcess,
    skip: usize,
    event: &str,
    process: &str,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    let mut seen = skip;
    loop {
        if up.output[seen.min(up.output.len())..]
            .iter()
            .any(|l| is_event(l, event, process))
        {
            return;
        }
        seen = up.output.len();
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {event} event for {process:?}; output:\n{}",
            up.output.join("\n")
        );
        up.next_line(left);
    }
}

fn wait_event(up: &mut UpProcess, event: &str, process: &str, timeout: Duration) {
    wait_event_after(up, 0, event, process, timeout)
}

#[test]
fn up_serves_restarts_what_dies_and_carries_on_after_a_restart() {
    let dir = temp_dir("cairn-up-").unwrap();
    let cwd = dir.path();
    let addrs = free_up_args().unwrap();
    let nbd = nbd_addr(&addrs).unwrap();
    let uri = format!("nbd://{nbd}/default");
    let mut args = args_ref(&addrs);
    args.push("--json");

    let mut up = UpProcess::start(cwd, &args).unwrap();
    wait_event(&mut up, "ready", "", START);
    assert!(
        up.output.iter().any(|l| is_event(l, "volume", "")),
        "the first start creates the default volume"
    );
    let children = children_of(up.pid());
    assert_eq!(
        children.len(),
        5,
        "volmgr, 3 chunk servers, target: {children:?}"
    );

    // The default volume is there, 3 replicas, over NBD.
    let info = run_tool("nbdinfo", &["--json", &uri]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&stdout(&info)).unwrap();
    assert_eq!(v["exports"][0]["export-size"], 10u64 << 30);
    qemu_io(&uri, "write -P 0xa5 1M 3M").unwrap();
    // And over iSCSI, at the URL the ready event gives.
    let ready = up
        .output
        .iter()
        .find(|l| is_event(l, "ready", ""))
        .cloned()
        .unwrap();
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let iscsi = ready["iscsi"]
        .as_str()
        .expect("an iscsi URL in the ready event");
    assert!(
        iscsi.ends_with("/iqn.2026-12.io.cairn:default/0"),
        "{ready}"
    );
    let cap = stdout(&run_tool("iscsi-readcapacity16", &[iscsi]).unwrap());
    assert!(
        cap.contains(&format!("Total size:{}", 10u64 << 30)),
        "{cap}"
    );

    // The CLI finds the cluster from ./cairn-data/cairn.toml, and a new
    // volume is exported at once under its name.
    let o = cairn(cwd, &["volume", "create", "scratch", "--size", "1G"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let scratch = format!("nbd://{nbd}/scratch");
    qemu_io(&scratch, "write -P 0x3c 0 64k").unwrap();

    // kill -9 a chunk server: reported, restarted, serving again; no data lost.
    let chunk2 = child_with_arg(up.pid(), "--node-id 2").expect("chunk2 running");
    let before = up.output.len();
    kill(Pid::from_raw(chunk2 as i32), Signal::SIGKILL).unwrap();
    wait_event_after(&mut up, before, "exited", "chunk2", Duration::from_secs(30));
    wait_event_after(&mut up, before, "ready", "chunk2", START);
    let again = child_with_arg(up.pid(), "--node-id 2").expect("chunk2 restarted");
    assert_ne!(again, chunk2);
    qemu_io(&uri, "read -P 0xa5 1M 3M").unwrap();

    // kill -9 the target: restarted, and the data reads back through it.
    let target = child_with_arg(up.pid(), "--default-export").expect("target running");
    let before = up.output.len();
    kill(Pid::from_raw(target as i32), Signal::SIGKILL).unwrap();
    wait_event_after(&mut up, before, "exited", "target", Duration::from_secs(30));
    wait_event_after(&mut up, before, "ready", "target", START);
    qemu_io(&uri, "read -P 0xa5 1M 3M").unwrap();

    // Ctrl-C stops everything cleanly.
    let pids: Vec<u32> = children_of(up.pid()).into_iter().map(|c| c.0).collect();
    let status = up.interrupt(STOP).unwrap();
    assert!(status.success(), "cairn up exited with {status}");
    assert!(up.output.iter().any(|l| is_event(l, "stopped", "")));
    for p in pids {
        assert!(
            !Path::new(&format!("/proc/{p}")).exists()
                || cairn_tests::up::proc_stat(p).is_some_and(|s| s.2 == 'Z'),
            "child {p} still runs after cairn up stopped"
        );
    }

    // Again: everything as it was left, no second default volume.
    let mut up = UpProcess::start(cwd, &args).unwrap();
    wait_event(&mut up, "ready", "", START);
    assert!(
        !up.output.iter().any(|l| is_event(l, "volume", "")),
        "a second start must not create a volume"
    );
    qemu_io(&uri, "read -P 0xa5 1M 3M").unwrap();
    qemu_io(&scratch, "read -P 0x3c 0 64k").unwrap();
    let o = cairn(cwd, &["volume", "list", "--json"]);
    assert!(o.status.success());
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["default", "scratch"]);
    assert!(up.interrupt(STOP).unwrap().success());
}

#[test]
fn killing_up_stops_its_children() {
    let dir = temp_dir("cairn-up-").unwrap();
    let addrs = free_up_args().unwrap();
    let mut up = UpProcess::start(dir.path(), &args_ref(&addrs)).unwrap();
    up.wait_for("cairn up: ready", START).unwrap();
    let pids: Vec<u32> = children_of(up.pid()).into_iter().map(|c| c.0).collect();
    assert_eq!(pids.len(), 5);
    up.kill().unwrap();
    // Their parent-death signal is SIGTERM: they stop cleanly on their own.
    let deadline = Instant::now() + STOP;
    for p in pids {
        while Path::new(&format!("/proc/{p}")).exists()
            && cairn_tests::up::proc_stat(p).is_some_and(|s| s.2 != 'Z')
        {
            assert!(Instant::now() < deadline, "child {p} outlived cairn up");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs `cairn up ARGS` expecting a refusal: exit status 2 and every
/// needle in what it printed.
fn expect_refusal(cwd: &Path, args: &[&str], needles: &[&str]) {
    let o = Command::new(bin_path("cairn").unwrap())
        .arg("up")
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(2), "cairn up {args:?}:\n{text}");
    for n in needles {
        assert!(text.contains(n), "expected {n:?} in:\n{text}");
    }
}

#[test]
fn up_refuses_a_bad_setup_with_a_clear_message() {
    let dir = temp_dir("cairn-up-").unwrap();
    let cwd = dir.path();
    let addrs = free_up_args().unwrap();
    let args = args_ref(&addrs);

    // The NBD address is taken.
    let nbd = nbd_addr(&addrs).unwrap();
    let holder = TcpListener::bind(nbd).unwrap();
    expect_refusal(cwd, &args, &["cannot listen on", &nbd.to_string(), "NBD"]);
    drop(holder);

    // Too little disk.
    expect_refusal(
        cwd,
        &[&args[..], &["--min-free", "100P"]].concat(),
        &["cairn-data", "free", "--min-free"],
    );

    // A folder that cannot be written (a read-only tmpfs; root ignores
    // file modes).
    let ro = cwd.join("ro");
    std::fs::create_dir(&ro).unwrap();
    let _mount = Mount::new(&["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"], &ro);
    expect_refusal(
        cwd,
        &[
            &args[..],
            &["--data", &ro.join("data").display().to_string()],
        ]
        .concat(),
        &["cannot create the folder", "ro/data"],
    );
    expect_refusal(
        cwd,
        &[&args[..], &["--data", &ro.display().to_string()]].concat(),
        &["cannot write to", "--data"],
    );

    // A second `cairn up` on a folder in use.
    let mut up = UpProcess::start(cwd, &args).unwrap();
    up.wait_for("cairn up: ready", START).unwrap();
    let other = free_up_args().unwrap();
    expect_refusal(cwd, &args_ref(&other), &["another `cairn up` is running"]);
    // The first one is unharmed.
    let o = tool("nbdinfo", &[&format!("nbd://{nbd}/default")]).unwrap();
    assert!(o.status.success());
    assert!(up.interrupt(STOP).unwrap().success());

    // The cluster's addresses are fixed once created.
    let mut moved = addrs.clone();
    let i = moved.iter().position(|a| a == "--chunk-port").unwrap();
    moved[i + 1] = "1".into();
    expect_refusal(cwd, &args_ref(&moved), &["cannot move to --chunk-port 1"]);
}
