//! `cairn placement`: the placement library measured against its goals.

use std::io::Write;

use anyhow::{bail, Context};
use cairn_placement::check::{
    self, AddResult, CheckParams, CheckReport, DomainResult, RemoveResult, ShareError, Spread,
};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::output::count_human;

#[derive(Subcommand)]
pub enum PlacementCommand {
    /// Measure placement on synthetic clusters: uniformity, weighted shares,
    /// data movement when a node is added or removed, and failure-domain
    /// separation, each against its goal. Exits 1 if any goal fails.
    Check(CheckArgs),
}

#[derive(Args)]
pub struct CheckArgs {
    /// Redundancy groups (a power of two).
    #[arg(long, default_value_t = 1024)]
    groups: u32,
    /// Nodes in the base cluster, equal weights, each its own host.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u16).range(4..=2000))]
    nodes: u16,
    /// Replicas per group.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=16))]
    replicas: u8,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: PlacementCommand) -> anyhow::Result<()> {
    match cmd {
        PlacementCommand::Check(args) => check_cmd(&args, &mut std::io::stdout().lock()),
    }
}

fn check_cmd(args: &CheckArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let params = CheckParams {
        groups: args.groups,
        nodes: usize::from(args.nodes),
        replicas: usize::from(args.replicas),
    };
    let report = check::run(params).with_context(|| {
        format!(
            "measuring placement of {} groups x {} replicas over {} nodes",
            params.groups, params.replicas, params.nodes
        )
    })?;
    let goals = goals(&report);
    if args.json {
        // As an io::Error, so that a closed pipe (`| head`) stays quiet.
        serde_json::to_writer_pretty(&mut *out, &Json::new(&report, &goals))
            .map_err(std::io::Error::from)?;
        writeln!(out)?;
    } else {
        print_report(out, &report, &goals)?;
    }
    out.flush()?;
    let failed = goals.iter().filter(|g| !g.pass).count();
    if failed > 0 {
        bail!("{failed} of {} placement goals failed", goals.len());
    }
    Ok(())
}

/// One line of the verdict.
#[derive(Debug, Clone, Serialize)]
struct Goal {
    name: &'static str,
    measured: String,
    limit: String,
    pass: bool,
}

fn goals(r: &CheckReport) -> Vec<Goal> {
    let worst_add = r.add.iter().max_by(|a, b| a.ratio.total_cmp(&b.ratio));
    let others: u64 = r.remove.iter().map(|x| x.others_moved_out).sum();
    let domain_failures = r.domains.iter().filter(|d| !d.pass()).count();
    vec![
        Goal {
            name: "uniformity",
            measured: format!("max/mean {:.3}", r.uniformity.max_over_mean),
            limit: format!("<= {:.2}", check::UNIFORMITY_GOAL),
            pass: r.uniformity_pass(),
        },
        Goal {
            name: "weighted shares",
            measured: format!("worst {}", percent(r.weighted.error)),
            limit: format!("within {:.0}%", check::WEIGHT_GOAL * 100.0),
            pass: r.weighted_pass(),
        },
        Goal {
            name: "movement: add a node",
            measured: worst_add.map_or("-".into(), |a| {
                format!("worst {:.3} x optimal (node {})", a.ratio, a.node)
            }),
            limit: format!("<= {:.1} x", check::ADD_GOAL),
            pass: r.add_pass(),
        },
        Goal {
            name: "movement: remove a node",
            measured: format!(
                "{} other slot(s) moved over {} removals",
                others,
                r.remove.len()
            ),
            limit: "only its replicas".into(),
            pass: r.remove_pass(),
        },
        Goal {
            name: "domain separation",
            measured: format!(
                "{} of {} layouts as separated as possible",
                r.domains.len() - domain_failures,
                r.domains.len()
            ),
            limit: "every group".into(),
            pass: r.domains_pass(),
        },
    ]
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "FAIL"
    }
}

/// `0.047` -> `"+4.7%"`.
fn percent(x: f64) -> String {
    format!("{:+.1}%", x * 100.0)
}

fn spread_cells(s: &Spread) -> String {
    format!(
        "max/mean {:.3} (node {}), min/mean {:.3} (node {})",
        s.max_over_mean, s.max_node, s.min_over_mean, s.min_node
    )
}

fn share_cells(e: &ShareError) -> String {
    format!(
        "worst {} (node {}, weight {}: {} slots, share {:.1})",
        percent(e.error),
        e.node,
        e.weight,
        e.replicas,
        e.share
    )
}

/// `[1, 1, 1, 2, 2, 3]` -> `"1 x3, 2 x2, 3"`.
fn weights_human(weights: &[u32]) -> String {
    let mut runs: Vec<(u32, usize)> = Vec::new();
    for &w in weights {
        match runs.last_mut() {
            Some((last, n)) if *last == w => *n += 1,
            _ => runs.push((w, 1)),
        }
    }
    runs.iter()
        .map(|&(w, n)| {
            if n == 1 {
                w.to_string()
            } else {
                format!("{w} x{n}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_report(out: &mut impl Write, r: &CheckReport, goals: &[Goal]) -> std::io::Result<()> {
    let p = r.params;
    let slots = u64::from(p.groups) * p.replicas as u64;
    writeln!(
        out,
        "cairn placement check: {} groups x {} replicas = {} slots over {} nodes \
         (flat: each node its own host)",
        count_human(u64::from(p.groups)),
        p.replicas,
        count_human(slots),
        p.nodes
    )?;

    writeln!(
        out,
        "\nUniformity, equal weights (mean {:.1} slots per node)",
        r.uniformity.mean
    )?;
    writeln!(out, "  balanced          {}", spread_cells(&r.uniformity))?;
    writeln!(
        out,
        "  plain rendezvous  {}",
        spread_cells(&r.uniformity_unbalanced)
    )?;
    writeln!(
        out,
        "  balancing rounds  {}; primaries max/mean {:.3}",
        r.balance_rounds, r.uniformity.primaries_max_over_mean
    )?;

    writeln!(
        out,
        "\nWeighted shares (weights {})",
        weights_human(&r.weights)
    )?;
    writeln!(out, "  balanced          {}", share_cells(&r.weighted))?;
    writeln!(
        out,
        "  plain rendezvous  {}",
        share_cells(&r.weighted_unbalanced)
    )?;

    let optimal = r.add.first().map_or(0.0, |a| a.optimal);
    writeln!(
        out,
        "\nAdding node {} (and, one at a time, other ids): optimal = {} / {} = {:.1} slots",
        p.nodes + 1,
        slots,
        p.nodes + 1,
        optimal
    )?;
    writeln!(
        out,
        "  {:>6} {:>8} {:>10} {:>7}",
        "NODE", "MOVED", "NEW HOLDS", "RATIO"
    )?;
    for a in &r.add {
        print_add(out, a)?;
    }
    let mean_ratio = r.add.iter().map(|a| a.ratio).sum::<f64>() / r.add.len().max(1) as f64;
    writeln!(
        out,
        "  worst {:.3}, mean {:.3}",
        r.add.iter().map(|a| a.ratio).fold(0.0, f64::max),
        mean_ratio
    )?;

    writeln!(
        out,
        "\nRemoving a node: marked out (eligible = false), then dropped from the map"
    )?;
    writeln!(
        out,
        "  {:>6} {:>6} {:>10} {:>7} {:>9} {:>11} {:>9}",
        "NODE", "HELD", "OUT MOVED", "OTHERS", "MAX/MEAN", "DROP MOVED", "MAX/MEAN"
    )?;
    for x in &r.remove {
        print_remove(out, x)?;
    }
    let held: u64 = r.remove.iter().map(|x| x.node_replicas).sum();
    let dropped: u64 = r.remove.iter().map(|x| x.moved_on_drop).sum();
    let drop_max = r
        .remove
        .iter()
        .map(|x| x.moved_on_drop as f64 / x.node_replicas.max(1) as f64)
        .fold(0.0, f64::max);
    writeln!(
        out,
        "  dropping an out node rebalances: {:.1}% of its share moves on average, {:.1}% at most",
        100.0 * dropped as f64 / held.max(1) as f64,
        100.0 * drop_max
    )?;

    writeln!(
        out,
        "\nFailure domains ({} replicas; node i in room i % rooms, its own host unless \
         the layout says otherwise)",
        p.replicas
    )?;
    writeln!(
        out,
        "  {:<20} {:>5} {:>5} {:>5} {:>11} {:>14} {:>6} {:>9}",
        "LAYOUT", "ROOMS", "RACKS", "HOSTS", "EXPECTED", "GROUPS AT IT", "UNDER", "MAX/MEAN"
    )?;
    for d in &r.domains {
        print_domain(out, d)?;
    }

    writeln!(
        out,
        "\n  {:<24} {:<48} {:<18} RESULT",
        "GOAL", "MEASURED", "LIMIT"
    )?;
    for g in goals {
        writeln!(
            out,
            "  {:<24} {:<48} {:<18} {}",
            g.name,
            g.measured,
            g.limit,
            verdict(g.pass)
        )?;
    }
    Ok(())
}

fn print_add(out: &mut impl Write, a: &AddResult) -> std::io::Result<()> {
    writeln!(
        out,
        "  {:>6} {:>8} {:>10} {:>7.3}",
        a.node, a.moved, a.new_node_replicas, a.ratio
    )
}

fn print_remove(out: &mut impl Write, x: &RemoveResult) -> std::io::Result<()> {
    writeln!(
        out,
        "  {:>6} {:>6} {:>10} {:>7} {:>9.3} {:>11} {:>9.3}",
        x.node,
        x.node_replicas,
        x.moved_out,
        x.others_moved_out,
        x.max_over_mean_out,
        x.moved_on_drop,
        x.max_over_mean_dropped
    )
}

fn print_domain(out: &mut impl Write, d: &DomainResult) -> std::io::Result<()> {
    let total: u64 = d.groups_by_separation.iter().sum();
    writeln!(
        out,
        "  {:<20} {:>5} {:>5} {:>5} {:>11} {:>14} {:>6} {:>9.3}",
        d.layout,
        d.rooms,
        d.racks,
        d.hosts,
        d.expected.as_str(),
        format!("{}/{}", d.groups_by_separation[d.expected as usize], total),
        d.groups_under_spread,
        d.max_over_mean
    )
}

#[derive(Serialize)]
struct Json<'a> {
    groups: u32,
    nodes: usize,
    replicas: usize,
    pass: bool,
    goals: &'a [Goal],
    uniformity: SpreadJson,
    uniformity_unbalanced: SpreadJson,
    balance_rounds: u32,
    weights: &'a [u32],
    weighted: ShareJson,
    weighted_unbalanced: ShareJson,
    add: Vec<AddJson>,
    remove: Vec<RemoveJson>,
    domains: Vec<DomainJson<'a>>,
}

#[derive(Serialize)]
struct SpreadJson {
    mean: f64,
    max_over_mean: f64,
    max_node: u64,
    min_over_mean: f64,
    min_node: u64,
    primaries_max_over_mean: f64,
}

#[derive(Serialize)]
struct ShareJson {
    error: f64,
    node: u64,
    weight: u32,
    replicas: u64,
    share: f64,
}

#[derive(Serialize)]
struct AddJson {
    node: u64,
    moved: u64,
    optimal: f64,
    ratio: f64,
    new_node_replicas: u64,
}

#[derive(Serialize)]
struct RemoveJson {
    node: u64,
    node_replicas: u64,
    moved_out: u64,
    others_moved_out: u64,
    max_over_mean_out: f64,
    moved_on_drop: u64,
    max_over_mean_dropped: f64,
}

#[derive(Serialize)]
struct DomainJson<'a> {
    layout: &'a str,
    rooms: usize,
    racks: usize,
    hosts: usize,
    expected: &'static str,
    groups_room: u64,
    groups_rack: u64,
    groups_host: u64,
    groups_shared_host: u64,
    groups_under_spread: u64,
    max_over_mean: f64,
    pass: bool,
}

impl<'a> Json<'a> {
    fn new(r: &'a CheckReport, goals: &'a [Goal]) -> Self {
        let spread = |s: &Spread| SpreadJson {
            mean: s.mean,
            max_over_mean: s.max_over_mean,
            max_node: s.max_node,
            min_over_mean: s.min_over_mean,
            min_node: s.min_node,
            primaries_max_over_mean: s.primaries_max_over_mean,
        };
        let share = |e: &ShareError| ShareJson {
            error: e.error,
            node: e.node,
            weight: e.weight,
            replicas: e.replicas,
            share: e.share,
        };
        Json {
            groups: r.params.groups,
            nodes: r.params.nodes,
            replicas: r.params.replicas,
            pass: goals.iter().all(|g| g.pass),
            goals,
            uniformity: spread(&r.uniformity),
            uniformity_unbalanced: spread(&r.uniformity_unbalanced),
            balance_rounds: r.balance_rounds,
            weights: &r.weights,
            weighted: share(&r.weighted),
            weighted_unbalanced: share(&r.weighted_unbalanced),
            add: r
                .add
                .iter()
                .map(|a| AddJson {
                    node: a.node,
                    moved: a.moved,
                    optimal: a.optimal,
                    ratio: a.ratio,
                    new_node_replicas: a.new_node_replicas,
                })
                .collect(),
            remove: r
                .remove
                .iter()
                .map(|x| RemoveJson {
                    node: x.node,
                    node_replicas: x.node_replicas,
                    moved_out: x.moved_out,
                    others_moved_out: x.others_moved_out,
                    max_over_mean_out: x.max_over_mean_out,
                    moved_on_drop: x.moved_on_drop,
                    max_over_mean_dropped: x.max_over_mean_dropped,
                })
                .collect(),
            domains: r
                .domains
                .iter()
                .map(|d| DomainJson {
                    layout: &d.layout,
                    rooms: d.rooms,
                    racks: d.racks,
                    hosts: d.hosts,
                    expected: d.expected.as_str(),
                    groups_room: d.groups_by_separation[3],
                    groups_rack: d.groups_by_separation[2],
                    groups_host: d.groups_by_separation[1],
                    groups_shared_host: d.groups_by_separation[0],
                    groups_under_spread: d.groups_under_spread,
                    max_over_mean: d.max_over_mean,
                    pass: d.pass(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(json: bool) -> CheckArgs {
        CheckArgs {
            groups: 1024,
            nodes: 12,
            replicas: 3,
            json,
        }
    }

    #[test]
    fn default_check_passes_and_prints_every_section() {
        let mut out = Vec::new();
        check_cmd(&args(false), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for needle in [
            "Uniformity",
            "Weighted shares (weights 1 x9, 2 x2, 3)",
            "Adding node 13",
            "Removing a node",
            "Failure domains",
            "3 rooms x 2 racks",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        assert_eq!(text.matches("PASS").count(), 5, "{text}");
        assert!(!text.contains("FAIL"), "{text}");
    }

    #[test]
    fn json_has_the_goals() {
        let mut out = Vec::new();
        check_cmd(&args(true), &mut out).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(doc["pass"], true);
        assert_eq!(doc["goals"].as_array().unwrap().len(), 5);
        assert_eq!(doc["add"].as_array().unwrap().len(), 8);
        assert_eq!(doc["domains"][0]["groups_room"], 1024);
    }

    #[test]
    fn failing_goals_exit_with_an_error() {
        // 64 groups over 40 nodes: under 5 replicas per node, too few for
        // adding a node to move anything near its share alone.
        let mut out = Vec::new();
        let err = check_cmd(
            &CheckArgs {
                groups: 64,
                nodes: 40,
                replicas: 3,
                json: false,
            },
            &mut out,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("placement goals failed"),
            "{err:#}"
        );
        assert!(String::from_utf8(out).unwrap().contains("FAIL"));
    }

    #[test]
    fn bad_group_count_is_an_error_naming_it() {
        let err = check_cmd(
            &CheckArgs {
                groups: 1000,
                ..args(false)
            },
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("1000"), "{err:#}");
    }

    #[test]
    fn weights_print_as_runs() {
        assert_eq!(weights_human(&[1, 1, 1, 2, 2, 3]), "1 x3, 2 x2, 3");
        assert_eq!(weights_human(&[]), "");
    }
}
