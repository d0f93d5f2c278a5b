//! The watchdog against a datagram socket standing in for systemd. In its
//! own test binary, because it sets NOTIFY_SOCKET and WATCHDOG_USEC, and
//! changing the environment while other tests' threads run is unsound.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::Arc;

use std::sync::atomic::Ordering;
use std::time::Duration;

use cairn_daemon::notify::{ready, spawn_watchdog, stopping, watchdog_interval};

/// Reads what arrives until `done`: systemd reads as messages come, and a
/// sender blocks once the socket's queue (max_dgram_qlen, 10 here) is full.
fn collect(socket: UnixDatagram, done: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<String>> {
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match socket.recv(&mut buf) {
                Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(_) if done.load(Ordering::SeqCst) => return out,
                Err(_) => {}
            }
        }
    })
}

#[test]
fn pings_only_while_the_check_passes_and_stops_when_stopping() {
    let dir = std::env::temp_dir().join(format!("cairn-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let reader = collect(socket, done.clone());
    std::env::set_var("NOTIFY_SOCKET", &path);
    std::env::set_var("WATCHDOG_USEC", "100000");
    std::env::remove_var("WATCHDOG_PID");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Healthy for the first 4 checks, failing for the next 4, then
    // healthy again.
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    runtime.block_on(async move {
        ready("serving");
        assert_eq!(watchdog_interval(), Some(Duration::from_millis(100)));
        let task = spawn_watchdog(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if (4..8).contains(&n) {
                    Err("wedged".to_string())
                } else {
                    Ok(())
                }
            }
        })
        .expect("watchdog enabled");
        while calls.load(Ordering::SeqCst) < 12 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stopping();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the watchdog task ends after STOPPING")
            .unwrap();
    });
    done.store(true, Ordering::SeqCst);
    let got = reader.join().unwrap();
    std::env::remove_var("NOTIFY_SOCKET");
    std::env::remove_var("WATCHDOG_USEC");
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(got[0], "READY=1\nSTATUS=serving\n", "{got:?}");
    let pings: Vec<usize> = got
        .iter()
        .enumerate()
        .filter(|(_, m)| *m == "WATCHDOG=1\n")
        .map(|(i, _)| i)
        .collect();
    assert!(pings.len() >= 8, "{got:?}");
    let unhealthy = got
        .iter()
        .position(|m| m == "STATUS=unhealthy: wedged\n")
        .expect("the failure is in the status line");
    let restored = got
        .iter()
        .position(|m| m == "STATUS=serving\n")
        .expect("the status line is restored");
    // Four pings, the unhealthy status, no ping until it is restored.
    assert_eq!(
        pings.iter().filter(|&&i| i < unhealthy).count(),
        4,
        "{got:?}"
    );
    assert!(
        !pings.iter().any(|&i| i > unhealthy && i < restored),
        "{got:?}"
    );
    assert_eq!(
        got.last().unwrap(),
        "STOPPING=1\nSTATUS=stopping\n",
        "{got:?}"
    );
}
