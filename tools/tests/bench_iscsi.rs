//! `cairn bench iscsi`: its options, and (ignored by default: it needs root,
//! tgt's tgtd and the Cairn daemons next to the cairn binary, and takes
//! about a minute) a smoke run with the smallest settings that checks the
//! table shows the three subjects and their ratios.
//!
//! Run the smoke test with the release daemons, e.g.:
//!   cargo build --release -p cairn-tools -p cairn-target -p cairn-chunkserver -p cairn-volmgr
//!   CAIRN_BENCH_BIN_DIR=$CARGO_TARGET_DIR/release CAIRN_BENCH_DIR=/some/disk \
//!     cargo test -p cairn-tools --test bench_iscsi -- --ignored

use std::path::PathBuf;
use std::process::Command;

#[test]
fn bench_iscsi_help_lists_its_options() {
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["bench", "iscsi", "--help"])
        .output()
        .expect("running cairn");
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for word in [
        "--quick",
        "--seconds",
        "--size-mib",
        "--json",
        "--dir",
        "--keep",
        "--bin-dir",
        "--tgtd-bin",
    ] {
        assert!(
            text.contains(word),
            "bench iscsi --help lacks {word}:\n{text}"
        );
    }
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["bench", "--help"])
        .output()
        .expect("running cairn");
    assert!(String::from_utf8_lossy(&o.stdout).contains("iscsi"));
}

#[test]
#[ignore = "needs root, tgtd and the Cairn daemons; about a minute"]
fn bench_iscsi_smoke_run_prints_three_subjects_and_ratios() {
    let bin_dir = std::env::var_os("CAIRN_BENCH_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_BIN_EXE_cairn"))
                .parent()
                .expect("a folder")
                .to_path_buf()
        });
    let dir = std::env::var_os("CAIRN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["bench", "iscsi", "--seconds", "1", "--size-mib", "16"])
        .arg("--dir")
        .arg(&dir)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .output()
        .expect("running cairn");
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    for word in [
        "(a) tgt",
        "(b) 1 replica",
        "(c) 3 replicas",
        "randread 4k",
        "randwrite 4k",
        "read 1m",
        "write 1m",
        "prefill",
    ] {
        assert!(out.contains(word), "the table lacks {word:?}:\n{out}");
    }
    // A ratio to (a) on every (b) and (c) row: prefill and six phases.
    let ratios = out
        .lines()
        .filter(|l| l.contains("(b) 1 replica") || l.contains("(c) 3 replicas"))
        .filter(|l| {
            l.split_whitespace()
                .any(|w| w.ends_with('x') && w[..w.len() - 1].parse::<f64>().is_ok())
        })
        .count();
    assert_eq!(ratios, 14, "{out}");
}
