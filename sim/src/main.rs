//! `cairn-sim`: runs simulator schedules.
//!
//! ```text
//! cairn-sim [--seeds N] [--from S] [--seed S] [--bug ack-before-replicas|no-fence|no-peering-push|primary-ranges-only|write-on-miscompare] [--each] [--no-settle] [--verbose]
//! ```
//! `--each` prints every schedule's stats on one line;
//! `--no-settle` runs moves without the volume manager settling groups
//! (see `SimConfig::settle_placement`).
//! Exits 1 and prints the seed if a schedule fails.

use std::time::Instant;

use cairn_group::node::Bug;
use cairn_sim::{run, SimConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut from, mut count, mut bug, mut verbose) = (0u64, 1000u64, None, false);
    let (mut each, mut settle_placement) = (false, true);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--seeds" => count = val().parse().unwrap_or_else(|_| usage("--seeds N")),
            "--from" => from = val().parse().unwrap_or_else(|_| usage("--from S")),
            "--seed" => {
                from = val().parse().unwrap_or_else(|_| usage("--seed S"));
                count = 1;
            }
            "--bug" => {
                bug = Some(match val().as_str() {
                    "ack-before-replicas" => Bug::AckBeforeReplicas,
                    "no-fence" => Bug::NoFence,
                    "no-peering-push" => Bug::NoPeeringPush,
                    "primary-ranges-only" => Bug::PrimaryRangesOnly,
                    "write-on-miscompare" => Bug::WriteOnMiscompare,
                    other => usage(&format!("unknown bug {other}")),
                })
            }
            "--verbose" => verbose = true,
            "--each" => each = true,
            "--no-settle" => settle_placement = false,
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let t = Instant::now();
    let (mut acked, mut rotted, mut repaired, mut mended) = (0, 0, 0, 0);
    let (mut scrubs, mut scrub_pushed, mut scrub_repaired) = (0, 0, 0);
    let (mut outs, mut ins, mut move_claims, mut retired, mut settled) = (0, 0, 0, 0, 0);
    for seed in from..from + count {
        let mut cfg = SimConfig::for_seed(seed, bug);
        cfg.verbose = verbose;
        cfg.settle_placement = settle_placement;
        match run(seed, &cfg) {
            Ok(s) => {
                acked += s.acked_writes;
                rotted += s.rotted;
                repaired += s.repaired;
                mended += s.mended;
                scrubs += s.scrubs;
                scrub_pushed += s.scrub_pushed;
                scrub_repaired += s.scrub_repaired_here;
                outs += s.outs;
                ins += s.ins;
                move_claims += s.move_claims;
                retired += s.retired;
                settled += s.settled;
                if each {
                    println!("seed {seed}: {s:?}");
                } else if verbose || count == 1 {
                    println!("seed {seed}: ok {s:?} {cfg:?}");
                }
            }
            Err(f) => {
                println!("{f}");
                println!("config: {cfg:?}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "{count} schedules passed ({acked} acknowledged writes checked; {rotted} blocks went bad, {repaired} read repairs, {mended} replicas mended; {scrubs} scrubs pushed over {scrub_pushed} replica copies and repaired {scrub_repaired} primary copies; {outs} nodes marked out, {ins} in, {move_claims} claims of moved replicas, {retired} replicas retired by claims, {settled} groups settled by the volume manager) in {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("cairn-sim: {msg}");
    }
    eprintln!("usage: cairn-sim [--seeds N] [--from S] [--seed S] [--bug ack-before-replicas|no-fence|no-peering-push|primary-ranges-only|write-on-miscompare] [--each] [--no-settle] [--verbose]");
    std::process::exit(2);
}
