//! The README's quick start, run as written, so the README cannot rot.
//!
//! README.md marks three shell blocks with `<!-- quickstart: start -->`,
//! `<!-- quickstart: use -->` and `<!-- quickstart: again -->`. This test
//! reads them from the README itself and runs them in a fresh folder:
//! `cairn up` (the start block), every line of the use block while it runs,
//! Ctrl-C, `cairn up` again, every line of the again block. Two liberties,
//! both forced: the test suite has already built the binaries, so the start
//! block's leading `cargo build --release && ` is checked but not run; and
//! `./build/release/` is replaced by the folder holding the binaries this
//! test run built (a debug build under `cargo nextest`).
//!
//! It uses the README's fixed addresses (NBD on 127.0.0.1:10809, the volume
//! manager on 127.0.0.1:7400, chunk servers on 127.0.0.2-4:7410): nothing
//! else in the suite uses them, but a `cairn up` of your own would.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cairn_tests::up::UpProcess;
use cairn_tests::{bin_dir, temp_dir};

const BUILD: &str = "cargo build --release && ";
const BIN: &str = "./build/release/";

/// The shell block after `<!-- quickstart: NAME -->`, one command per line.
fn block(readme: &str, name: &str) -> Vec<String> {
    let marker = format!("<!-- quickstart: {name} -->");
    let at = readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README.md has no {marker}"));
    let rest = &readme[at + marker.len()..];
    let open = rest
        .find("```sh\n")
        .unwrap_or_else(|| panic!("no ```sh block after {marker}"));
    let body = &rest[open + 6..];
    let close = body.find("```").expect("an unclosed block");
    body[..close]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

fn localise(line: &str) -> String {
    let bins = format!("{}/", bin_dir().unwrap().display());
    line.replace(BIN, &bins)
}

fn run_line(cwd: &Path, line: &str) {
    let line = localise(line);
    eprintln!("$ {line}");
    let o = Command::new("sh")
        .arg("-c")
        .arg(&line)
        .current_dir(cwd)
        .output()
        .expect("running sh");
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("{out}{err}");
    assert!(
        o.status.success(),
        "README quick-start line `{line}` failed with {}:\n{out}\n{err}",
        o.status
    );
    // qemu-io reports a failed pattern check on stdout.
    assert!(
        !out.contains("Pattern verification failed"),
        "`{line}`: {out}"
    );
}

#[test]
fn readme_quick_start_works_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("reading README.md");
    let start = block(&readme, "start");
    let uses = block(&readme, "use");
    let again = block(&readme, "again");
    assert_eq!(start.len(), 1, "the start block is one command: {start:?}");
    let up_line = start[0]
        .strip_prefix(BUILD)
        .unwrap_or_else(|| panic!("the start block should be `{BUILD}{BIN}cairn up`: {start:?}"));
    let mut words = up_line.split_whitespace();
    let program = words.next().unwrap();
    assert_eq!(program, format!("{BIN}cairn"), "{up_line}");
    let args: Vec<&str> = words.collect();
    assert_eq!(args.first(), Some(&"up"), "{up_line}");
    assert!(!uses.is_empty() && !again.is_empty());
    // The use block writes and reads back; the again block reads after the
    // restart. (If someone drops the read, the test should say so.)
    assert!(uses.iter().any(|l| l.contains("write")), "{uses:?}");
    assert!(again.iter().any(|l| l.contains("read -P")), "{again:?}");

    let dir = temp_dir("cairn-quickstart-").unwrap();
    let cwd = dir.path();
    let program = bin_dir().unwrap().join("cairn");
    let start_up = || {
        let mut up = UpProcess::start_program(&program, cwd, &[], &args).unwrap();
        up.wait_for("cairn up: ready", Duration::from_secs(120))
            .unwrap();
        up
    };

    let mut up = start_up();
    for line in &uses {
        run_line(cwd, line);
    }
    let status = up.interrupt(Duration::from_secs(90)).unwrap();
    assert!(status.success(), "Ctrl-C: cairn up exited with {status}");
    assert!(cwd.join("cairn-data").is_dir(), "data under ./cairn-data");

    let mut up = start_up();
    for line in &again {
        run_line(cwd, line);
    }
    let status = up.interrupt(Duration::from_secs(90)).unwrap();
    assert!(status.success(), "Ctrl-C: cairn up exited with {status}");
}
