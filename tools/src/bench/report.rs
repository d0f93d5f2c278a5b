//! The benchmark's results, as JSON and as a table.

use std::io::{self, Write};

use serde::Serialize;

use super::chunkserver::RssMax;
use super::disk::FsInfo;
use super::load::Throughput;
use crate::output::{bytes_human, count_human};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Pass,
    Below,
}

impl Verdict {
    fn of(passed: bool) -> Self {
        if passed {
            Verdict::Pass
        } else {
            Verdict::Below
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Below => "BELOW",
        }
    }
}

/// Which number a phase's ratio compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Iops,
    BytesPerS,
}

impl Metric {
    fn of(self, t: &Throughput) -> f64 {
        match self {
            Metric::Iops => t.iops,
            Metric::BytesPerS => t.bytes_per_s,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SubjectResult {
    /// The run shown: with several rounds, the one of median throughput.
    #[serde(flatten)]
    pub throughput: Throughput,
    /// Store over fio by the phase's metric; absent without fio. With
    /// several rounds, the median of the rounds' ratios, each against fio's
    /// run of the same round.
    pub ratio: Option<f64>,
    pub verdict: Option<Verdict>,
    /// Each round's ratio, in round order (empty for a single run).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub round_ratios: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub name: &'static str,
    pub block_bytes: u32,
    pub iodepth: u32,
    pub metric: Metric,
    /// Store/fio ratio the issue asks for (a goal, never asserted).
    pub goal_ratio: f64,
    /// fio's run (with several rounds, the one of median throughput).
    pub fio: Option<Throughput>,
    pub inprocess: Option<SubjectResult>,
    pub rpc: Option<SubjectResult>,
}

impl PhaseReport {
    /// A subject measured once, against the phase's fio run.
    pub fn subject(&self, t: Throughput) -> SubjectResult {
        self.subject_rounds(vec![t], self.fio.as_slice())
    }

    /// A subject measured over several rounds, `runs[i]` beside fio's
    /// `fio_runs[i]` (empty without fio). Each round's ratio pairs runs made
    /// minutes apart at most, so a disk that is slower for a while slows
    /// both; the median of the rounds then ignores one odd round.
    pub fn subject_rounds(&self, runs: Vec<Throughput>, fio_runs: &[Throughput]) -> SubjectResult {
        let round_ratios: Vec<f64> = if fio_runs.len() == runs.len() {
            runs.iter()
                .zip(fio_runs)
                .map(|(t, f)| self.ratio(t, f))
                .collect()
        } else {
            Vec::new()
        };
        let ratio = median(&round_ratios);
        let throughput = self.median_run(runs).expect("at least one round");
        SubjectResult {
            throughput,
            ratio,
            verdict: ratio.map(|r| Verdict::of(r >= self.goal_ratio)),
            round_ratios: if fio_runs.len() > 1 {
                round_ratios
            } else {
                Vec::new()
            },
        }
    }

    /// The run of median throughput by this phase's metric (the lower of
    /// the middle two for an even count).
    pub fn median_run(&self, mut runs: Vec<Throughput>) -> Option<Throughput> {
        runs.sort_by(|a, b| self.metric.of(a).total_cmp(&self.metric.of(b)));
        let middle = runs.len().checked_sub(1)? / 2;
        Some(runs.swap_remove(middle))
    }

    fn ratio(&self, t: &Throughput, fio: &Throughput) -> f64 {
        self.metric.of(t) / self.metric.of(fio).max(f64::MIN_POSITIVE)
    }
}

/// The median (the mean of the middle two for an even count); None if empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The chunk server's resident memory (VmRSS) through the run.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub rss_start_bytes: u64,
    /// Extents allocated (one 4 KiB block each) before the next reading.
    pub extents: u64,
    pub rss_with_extents_bytes: u64,
    /// How fast the chunk server created them (pipelined 4 KiB writes).
    pub extents_per_s: f64,
    /// (with extents - start) / extents.
    pub rss_per_extent_bytes: f64,
    /// VmRSS sampled while the 4 KiB random phases ran.
    pub under_4k_load: RssMax,
    /// VmRSS sampled while the 1 MiB sequential phases ran, whose requests
    /// in flight hold data buffers (reported, not judged: not metadata).
    pub under_1m_load: RssMax,
    /// VmHWM at the end of the run: the true peak, between samples too.
    pub rss_peak_bytes: u64,
    pub goal_rss_bytes: u64,
    pub goal_extents: u64,
    /// Against the goal, only when at least `goal_extents` were allocated.
    pub verdict: Option<Verdict>,
}

impl MemoryReport {
    /// Judged on the readings with the extents allocated, idle and under 4k
    /// load: the goal bounds per-extent metadata. The 1 MiB phases' data
    /// buffers and the peak are printed beside it.
    pub fn judge(&mut self) {
        let worst = self
            .rss_with_extents_bytes
            .max(self.under_4k_load.max_bytes.unwrap_or(0));
        self.verdict =
            (self.extents >= self.goal_extents).then(|| Verdict::of(worst < self.goal_rss_bytes));
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report<C: Serialize> {
    pub config: C,
    pub run_dir: String,
    pub file_system: FsInfo,
    pub fio_version: Option<String>,
    /// The first sequential pass over the working set (informative).
    pub layout: PhaseReport,
    pub phases: Vec<PhaseReport>,
    pub memory: Option<MemoryReport>,
    /// Caveats that change how the numbers read (tmpfs, buffered I/O).
    pub notes: Vec<String>,
}

const MIB: f64 = (1u64 << 20) as f64;

fn throughput_cells(t: Option<&Throughput>) -> String {
    match t {
        Some(t) => format!(
            "{:>12} {:>9.1}",
            count_human(t.iops.round() as u64),
            t.bytes_per_s / MIB
        ),
        None => format!("{:>12} {:>9}", "-", "-"),
    }
}

fn subject_cells(s: Option<&SubjectResult>) -> String {
    let ratio = s
        .and_then(|s| s.ratio)
        .map_or("-".to_string(), |r| format!("{r:.3}"));
    let verdict = s.and_then(|s| s.verdict).map_or("-", Verdict::as_str);
    format!(
        "{} {ratio:>6} {verdict:>7}",
        throughput_cells(s.map(|s| &s.throughput))
    )
}

fn phase_row(out: &mut impl Write, p: &PhaseReport, goal: bool) -> io::Result<()> {
    let goal = if goal {
        format!("{:.2}", p.goal_ratio)
    } else {
        "-".to_string()
    };
    writeln!(
        out,
        "{:<14} {:>3} {:>5} | {} | {} | {}",
        p.name,
        p.iodepth,
        goal,
        throughput_cells(p.fio.as_ref()),
        subject_cells(p.inprocess.as_ref()),
        subject_cells(p.rpc.as_ref()),
    )
}

pub fn print_table<C: Serialize>(
    out: &mut impl Write,
    r: &Report<C>,
    title: &str,
) -> io::Result<()> {
    writeln!(out, "{title}")?;
    writeln!(
        out,
        "data in {} ({}, {} free before the run); fio: {}",
        r.run_dir,
        r.file_system.fs_type,
        bytes_human(r.file_system.available_bytes),
        r.fio_version.as_deref().unwrap_or("skipped"),
    )?;
    writeln!(out)?;
    let subject = |name: &str, ratio: bool| {
        if ratio {
            format!(
                "{:>12} {:>9} {:>6} {:>7}",
                format!("{name} IOPS"),
                "MiB/s",
                "ratio",
                "verdict"
            )
        } else {
            format!("{:>12} {:>9}", format!("{name} IOPS"), "MiB/s")
        }
    };
    writeln!(
        out,
        "{:<14} {:>3} {:>5} | {} | {} | {}",
        "phase",
        "qd",
        "goal",
        subject("fio", false),
        subject("in-proc", true),
        subject("rpc", true),
    )?;
    phase_row(out, &r.layout, false)?;
    for p in &r.phases {
        phase_row(out, p, true)?;
    }
    writeln!(out)?;
    writeln!(out, "ratio = store / fio (IOPS for 4k phases, bandwidth for 1m); goals are printed, never asserted")?;
    print_rounds(out, r)?;
    print_cpu(out, r)?;
    for note in &r.notes {
        writeln!(out, "note: {note}")?;
    }
    if let Some(m) = &r.memory {
        print_memory(out, m)?;
    }
    Ok(())
}

/// With several rounds: each round's ratios, whose median the table shows.
fn print_rounds<C: Serialize>(out: &mut impl Write, r: &Report<C>) -> io::Result<()> {
    let rounds = |s: Option<&SubjectResult>| {
        s.filter(|s| !s.round_ratios.is_empty()).map(|s| {
            s.round_ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
    };
    let rows: Vec<_> = r
        .phases
        .iter()
        .map(|p| (p.name, rounds(p.inprocess.as_ref()), rounds(p.rpc.as_ref())))
        .filter(|(_, a, b)| a.is_some() || b.is_some())
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "with several rounds, ratio = the median of the rounds' ratios (each store run against fio's run of the same round; subjects take turns going first); IOPS and MiB/s are each subject's median run"
    )?;
    for (name, inproc, rpc) in rows {
        writeln!(
            out,
            "  {name:<14} in-proc {}  |  rpc {}",
            inproc.as_deref().unwrap_or("-"),
            rpc.as_deref().unwrap_or("-")
        )?;
    }
    Ok(())
}

/// CPU per request beside the throughput: on a machine with few cores it
/// bounds IOPS, and unlike IOPS it hardly moves with the disk's mood.
fn print_cpu<C: Serialize>(out: &mut impl Write, r: &Report<C>) -> io::Result<()> {
    let cpu = |t: Option<&Throughput>| {
        t.and_then(|t| t.cpu_us_per_op)
            .map_or("-".to_string(), |us| format!("{us:.1}"))
    };
    let row = |out: &mut dyn Write, name: &str, fio: &str, inproc: &str, rpc: &str| {
        writeln!(out, "  {name:<14} {fio:>8} {inproc:>8} {rpc:>8}")
    };
    writeln!(out)?;
    writeln!(
        out,
        "CPU per request, µs (user + system): fio = its job thread; in-proc = the load and the store's engine, both; rpc = the chunk server process"
    )?;
    row(out, "phase", "fio", "in-proc", "rpc")?;
    for p in std::iter::once(&r.layout).chain(&r.phases) {
        row(
            out,
            p.name,
            &cpu(p.fio.as_ref()),
            &cpu(p.inprocess.as_ref().map(|s| &s.throughput)),
            &cpu(p.rpc.as_ref().map(|s| &s.throughput)),
        )?;
    }
    Ok(())
}

fn print_memory(out: &mut impl Write, m: &MemoryReport) -> io::Result<()> {
    writeln!(out)?;
    writeln!(out, "chunk server resident memory (VmRSS):")?;
    writeln!(
        out,
        "  {:<40} {:>10}",
        "at start",
        bytes_human(m.rss_start_bytes)
    )?;
    if m.extents == 0 {
        writeln!(out, "  {:<40} {:>10}", "with extents allocated", "skipped")?;
    } else {
        writeln!(
            out,
            "  {:<40} {:>10}  ({} per extent; {} extents/s created)",
            format!("with {} extents allocated", count_human(m.extents)),
            bytes_human(m.rss_with_extents_bytes),
            bytes_human(m.rss_per_extent_bytes.max(0.0).round() as u64),
            count_human(m.extents_per_s.round() as u64),
        )?;
    }
    for (what, rss) in [
        ("under 4k random load", &m.under_4k_load),
        ("under 1m sequential load", &m.under_1m_load),
    ] {
        writeln!(
            out,
            "  {:<40} {:>10}",
            format!("{what} (max of {})", rss.samples),
            rss.max_bytes.map_or("-".to_string(), bytes_human),
        )?;
    }
    writeln!(
        out,
        "  {:<40} {:>10}",
        "peak over the run (VmHWM)",
        bytes_human(m.rss_peak_bytes)
    )?;
    let verdict = match m.verdict {
        Some(v) => v.as_str().to_string(),
        None => format!(
            "n/a: run with --extents-for-memory {} to judge",
            m.goal_extents
        ),
    };
    writeln!(
        out,
        "  goal: under {} with {} extents (with extents, and under 4k load): {verdict}",
        bytes_human(m.goal_rss_bytes),
        count_human(m.goal_extents),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(iops: f64, bytes_per_s: f64) -> Throughput {
        Throughput {
            ops: 1,
            bytes: 1,
            elapsed_s: 1.0,
            iops,
            bytes_per_s,
            cpu_us_per_op: None,
        }
    }

    fn phase(fio: Option<Throughput>) -> PhaseReport {
        PhaseReport {
            name: "randread 4k",
            block_bytes: 4096,
            iodepth: 32,
            metric: Metric::Iops,
            goal_ratio: 0.8,
            fio,
            inprocess: None,
            rpc: None,
        }
    }

    #[test]
    fn ratio_and_verdict() {
        let p = phase(Some(t(1000.0, 1.0)));
        let s = p.subject(t(850.0, 1e9));
        assert_eq!(s.ratio, Some(0.85));
        assert_eq!(s.verdict, Some(Verdict::Pass));
        assert_eq!(p.subject(t(700.0, 1e9)).verdict, Some(Verdict::Below));
        let no_fio = phase(None).subject(t(1.0, 1.0));
        assert_eq!((no_fio.ratio, no_fio.verdict), (None, None));
    }

    #[test]
    fn rounds_take_the_median_of_paired_ratios() {
        let p = phase(Some(t(1000.0, 1.0)));
        let fio = [t(1000.0, 1.0), t(500.0, 1.0), t(1000.0, 1.0)];
        // Round 2's disk was slow for both: its ratio is still 0.8.
        let store = vec![t(790.0, 1.0), t(400.0, 1.0), t(900.0, 1.0)];
        let s = p.subject_rounds(store, &fio);
        assert_eq!(s.round_ratios, vec![0.79, 0.8, 0.9]);
        assert_eq!(s.ratio, Some(0.8));
        assert_eq!(s.verdict, Some(Verdict::Pass));
        assert_eq!(s.throughput.iops, 790.0, "the median run is shown");
        let even = p.subject_rounds(vec![t(700.0, 1.0), t(800.0, 1.0)], &fio[..2]);
        assert_eq!(even.ratio, Some((0.7 + 1.6) / 2.0));
        assert_eq!(even.throughput.iops, 700.0, "the lower middle");
        let one = p.subject_rounds(vec![t(850.0, 1.0)], &fio[..1]);
        assert_eq!((one.ratio, one.round_ratios.len()), (Some(0.85), 0));
        let no_fio = p.subject_rounds(vec![t(850.0, 1.0), t(1.0, 1.0)], &[]);
        assert_eq!((no_fio.ratio, no_fio.verdict), (None, None));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn memory_verdict_only_at_goal_scale() {
        let mut m = MemoryReport {
            rss_start_bytes: 10 << 20,
            extents: 10_000,
            rss_with_extents_bytes: 20 << 20,
            extents_per_s: 1000.0,
            rss_per_extent_bytes: 1048.0,
            under_4k_load: RssMax {
                max_bytes: Some(200 << 20),
                samples: 3,
            },
            under_1m_load: RssMax {
                max_bytes: Some(300 << 20),
                samples: 3,
            },
            rss_peak_bytes: 300 << 20,
            goal_rss_bytes: 128 << 20,
            goal_extents: 100_000,
            verdict: None,
        };
        m.judge();
        assert_eq!(m.verdict, None);
        m.extents = 100_000;
        m.judge();
        assert_eq!(m.verdict, Some(Verdict::Below), "4k load counts");
        m.under_4k_load.max_bytes = Some(30 << 20);
        m.judge();
        assert_eq!(
            m.verdict,
            Some(Verdict::Pass),
            "1m buffers and the peak do not"
        );
        m.rss_with_extents_bytes = 129 << 20;
        m.judge();
        assert_eq!(m.verdict, Some(Verdict::Below));
    }
}
