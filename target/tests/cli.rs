//! The binary's command line: help, and configuration errors exit 2 with a
//! message naming the setting. (Also makes `cargo test --workspace` build
//! `cairn-target`, which the process tests in `tests/` start.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cairn-target");

#[test]
fn help_explains_the_flags() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--volmgr",
        "--cluster-id",
        "--listen",
        "--unix",
        "--read-only",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help:\n{text}");
    }
}

#[test]
fn configuration_errors_exit_2_and_name_the_setting() {
    let out = Command::new(BIN)
        .args(["--cluster-id", "c"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--volmgr"));
    let out = Command::new(BIN)
        .args([
            "--volmgr",
            "127.0.0.1:1",
            "--cluster-id",
            "c",
            "--listen",
            "256.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
