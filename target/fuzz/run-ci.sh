#!/usr/bin/env bash
# CI smoke fuzzing of the NBD server (cairn-target): builds every fuzz target,
# replays the whole committed corpus of each, then fuzzes `handshake` and
# `requests` for FUZZ_SECONDS each (default 30) and `iscsi` for twice that, so
# about two minutes of fuzzing after the build. Exits non-zero on any crash, oracle failure, timeout or
# out-of-memory; the failing input is left in target/fuzz/artifacts/<target>/.
#
# Runs cargo +nightly (CAIRN_FUZZ_TOOLCHAIN to pick another; see below for
# a machine without nightly) and cargo-fuzz (installed from crates.io when
# missing). Builds into $CARGO_TARGET_DIR, by default
# build/fuzz at the repository root (ignored by git with the rest of build/).
# New inputs found here go to a temporary directory: the committed corpus is
# only read.
#
#   bash target/fuzz/run-ci.sh                      # from the repository root
#   FUZZ_SECONDS=600 bash target/fuzz/run-ci.sh     # longer
set -euo pipefail

fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"   # <repo>/target/fuzz
crate_dir="$(dirname "$fuzz_dir")"                          # <repo>/target (the crate)
repo_dir="$(dirname "$crate_dir")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo_dir/build/fuzz}"
seconds="${FUZZ_SECONDS:-30}"
read -r -a fuzzed <<<"${FUZZ_TARGETS:-handshake requests iscsi}"

# cargo fuzz needs a nightly compiler. On a machine whose one toolchain is
# stable and where none can be downloaded, the stable compiler is told to
# act as nightly instead (RUSTC_BOOTSTRAP=1: same flags, same sanitizer).
toolchain="${CAIRN_FUZZ_TOOLCHAIN:-nightly}"
if ! cargo "+$toolchain" --version >/dev/null 2>&1; then
    echo "run-ci.sh: no $toolchain toolchain; trying rustup toolchain install $toolchain" >&2
    if ! rustup toolchain install "$toolchain" --profile minimal; then
        toolchain="$(rustup show active-toolchain | cut -d' ' -f1)"
        echo "run-ci.sh: WARNING: cannot install it; using $toolchain with RUSTC_BOOTSTRAP=1" >&2
        export RUSTC_BOOTSTRAP=1
    fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
cargo() { command cargo "+$toolchain" "$@"; }
cargo --version
cargo fuzz --version

cd "$crate_dir"
echo "== build (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo fuzz build

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=()
flags=(-timeout=10 -rss_limit_mb=2048 -print_final_stats=1)

for t in $(cargo fuzz list); do
    echo "== $t: replay corpus/$t"
    if ! cargo fuzz run "$t" "$fuzz_dir/corpus/$t" -- -runs=0 "${flags[@]}"; then
        failed+=("$t (corpus replay)")
    fi
done

for t in "${fuzzed[@]}"; do
    # iSCSI (login and full feature phase in one target) gets a minute.
    secs="$seconds"
    if [ "$t" = iscsi ]; then secs=$((seconds * 2)); fi
    echo "== $t: fuzz for ${secs}s"
    mkdir -p "$scratch/$t"
    # New inputs go to the first directory; the committed corpus is read only.
    if ! cargo fuzz run "$t" "$scratch/$t" "$fuzz_dir/corpus/$t" -- \
        -max_total_time="$secs" "${flags[@]}"; then
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "run-ci.sh: FAILED: ${failed[*]}; inputs in $fuzz_dir/artifacts/" >&2
    echo "replay one with: (cd target && cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>)" >&2
    exit 1
fi
echo "run-ci.sh: no crash, timeout or out-of-memory in: $(cargo fuzz list | tr '\n' ' ')"
