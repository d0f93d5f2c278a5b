//! The `cairn` binary's own surface: help lists every command and the exit
//! statuses, and argument errors exit 2 before touching any cluster. (Being
//! an integration test of this package, it also makes `cargo test` and
//! `cargo nextest` build the `cairn` binary the process tests in tests/
//! start.)

use std::process::Command;

fn cairn(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .env_remove("CAIRN_VOLMGR")
        .env_remove("CAIRN_CLUSTER_ID")
        .env_remove("CAIRN_CONFIG")
        .output()
        .expect("running cairn")
}

#[test]
fn help_lists_the_commands_and_exit_statuses() {
    let o = cairn(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for word in [
        "up",
        "cluster",
        "node",
        "volume",
        "snapshot",
        "export",
        "chunk",
        "bench",
        "placement",
        "Exit status",
        "cairn-data/cairn.toml",
    ] {
        assert!(text.contains(word), "--help lacks {word:?}:\n{text}");
    }
    let o = cairn(&["up", "--help"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("--min-free"));
    // Snapshots: their own command, rollback and clone under `volume`.
    let o = cairn(&["snapshot", "--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for word in ["create", "list", "delete"] {
        assert!(
            text.contains(word),
            "snapshot --help lacks {word:?}:\n{text}"
        );
    }
    let o = cairn(&["volume", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for word in ["rollback", "clone"] {
        assert!(text.contains(word), "volume --help lacks {word:?}:\n{text}");
    }
    let o = cairn(&["volume", "rollback", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for word in ["--force", "--keep-as", "before-rollback-", "Examples"] {
        assert!(
            text.contains(word),
            "volume rollback --help lacks {word:?}:\n{text}"
        );
    }
    let o = cairn(&["volume", "clone", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("VOLUME@SNAPSHOT"), "{text}");
    let o = cairn(&["snapshot", "create", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("crash-consistent") && text.contains("Examples"),
        "{text}"
    );
}

#[test]
fn argument_errors_exit_2() {
    let o = cairn(&[
        "volume",
        "create",
        "x",
        "--size",
        "ten",
        "--volmgr",
        "127.0.0.1:1",
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("ten"));
    let o = cairn(&["no-such-command"]);
    assert_eq!(o.status.code(), Some(2));
    let o = cairn(&["up", "--min-free", "lots"]);
    assert_eq!(o.status.code(), Some(2));
    // Snapshot commands refuse before reaching for a cluster.
    let o = cairn(&[
        "volume",
        "clone",
        "pacs-db",
        "copy",
        "--volmgr",
        "127.0.0.1:1",
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("VOLUME@SNAPSHOT"));
    let o = cairn(&[
        "snapshot",
        "delete",
        "pacs-db",
        "nightly",
        "--volmgr",
        "127.0.0.1:1",
        "--cluster-id",
        "c",
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--yes"));
    let o = cairn(&["snapshot", "create", "pacs-db"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}
