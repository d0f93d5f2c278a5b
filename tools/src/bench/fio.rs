//! The reference: fio with io_uring and O_DIRECT on a file beside the store.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use super::load::{Pattern, Throughput};

pub struct Fio {
    bin: PathBuf,
    file: PathBuf,
    size_mib: u64,
}

/// Keeps error messages short when fio prints pages of diagnostics.
const STDERR_TAIL_BYTES: usize = 2000;

impl Fio {
    /// Checks that `bin` runs and is a fio with JSON output; returns its version.
    pub fn probe(bin: &Path) -> anyhow::Result<String> {
        let out = Command::new(bin)
            .arg("--version")
            .output()
            .with_context(|| {
                format!(
                    "running `{} --version` (install fio, pass --fio-bin, or pass --skip-fio)",
                    bin.display()
                )
            })?;
        if !out.status.success() {
            bail!("`{} --version` failed with {}", bin.display(), out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn new(bin: PathBuf, file: PathBuf, size_mib: u64) -> Self {
        Self {
            bin,
            file,
            size_mib,
        }
    }

    /// Writes the whole file once, sequentially, so that reads hit written
    /// blocks and writes are overwrites, as for the store.
    pub fn lay_out(&self, iodepth: u32) -> anyhow::Result<Throughput> {
        self.run(Pattern::SeqWrite, 1 << 20, iodepth, None)
    }

    /// One phase: `runtime_s` of `pattern` (time-based), or one pass over the
    /// file when `runtime_s` is None.
    pub fn run(
        &self,
        pattern: Pattern,
        block_bytes: u32,
        iodepth: u32,
        runtime_s: Option<u64>,
    ) -> anyhow::Result<Throughput> {
        let rw = match pattern {
            Pattern::RandWrite => "randwrite",
            Pattern::RandRead => "randread",
            Pattern::SeqWrite => "write",
            Pattern::SeqRead => "read",
        };
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--name=ref")
            .arg(format!("--filename={}", self.file.display()))
            .arg(format!("--size={}M", self.size_mib))
            .arg("--ioengine=io_uring")
            .arg("--direct=1")
            .arg(format!("--rw={rw}"))
            .arg(format!("--bs={block_bytes}"))
            .arg(format!("--iodepth={iodepth}"))
            .arg("--output-format=json");
        if matches!(pattern, Pattern::RandWrite | Pattern::RandRead) {
            // The store side draws offsets uniformly with replacement; without
            // this fio would visit each block once per pass instead.
            cmd.arg("--norandommap");
        }
        if let Some(runtime_s) = runtime_s {
            cmd.arg(format!("--runtime={runtime_s}"))
                .arg("--time_based");
        }
        let shown = format!("{cmd:?}");
        let out = cmd.output().with_context(|| format!("running {shown}"))?;
        if !out.status.success() {
            bail!(
                "{shown} failed with {}: {}",
                out.status,
                stderr_tail(&out.stderr)
            );
        }
        let direction = if pattern.is_write() { "write" } else { "read" };
        parse_json(&String::from_utf8_lossy(&out.stdout), direction).with_context(|| {
            format!(
                "reading the JSON output of {shown} (stderr: {})",
                stderr_tail(&out.stderr)
            )
        })
    }
}

fn stderr_tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    let cut = text.len().saturating_sub(STDERR_TAIL_BYTES);
    let cut = (cut..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[cut..].to_string()
}

/// `jobs[0].<direction>` of fio's JSON report, after checking the job
/// reported no error. fio may print lines (warnings, "connected to NBD
/// server") before the JSON document, so parsing starts at the first `{`.
pub(super) fn job_stats(stdout: &str, direction: &str) -> anyhow::Result<serde_json::Value> {
    let start = stdout.find('{').context("no JSON object in fio's output")?;
    let mut doc: serde_json::Value =
        serde_json::from_str(&stdout[start..]).context("fio's output is not valid JSON")?;
    let job = doc
        .pointer_mut("/jobs/0")
        .context("fio's JSON has no jobs[0]")?;
    let error = job.get("error").and_then(|e| e.as_i64()).unwrap_or(0);
    if error != 0 {
        bail!(
            "fio reports error {error} ({})",
            std::io::Error::from_raw_os_error(error as i32)
        );
    }
    job.get_mut(direction)
        .map(serde_json::Value::take)
        .with_context(|| format!("fio's JSON has no jobs[0].{direction}"))
}

/// Reads `jobs[0].<direction>` of fio's JSON report.
fn parse_json(stdout: &str, direction: &str) -> anyhow::Result<Throughput> {
    let t = throughput(&job_stats(stdout, direction)?, direction)?;
    let cpu_s = job_cpu_percent(stdout).map(|pct| pct / 100.0 * t.elapsed_s);
    Ok(t.with_cpu_s(cpu_s))
}

/// fio's `usr_cpu + sys_cpu` of jobs[0]: the job thread's CPU time in
/// percent of its run time.
fn job_cpu_percent(stdout: &str) -> Option<f64> {
    let doc: serde_json::Value = serde_json::from_str(&stdout[stdout.find('{')?..]).ok()?;
    let job = doc.pointer("/jobs/0")?;
    Some(job.get("usr_cpu")?.as_f64()? + job.get("sys_cpu")?.as_f64()?)
}

/// The throughput in one direction's statistics (from [`job_stats`]); an
/// error if fio did no I/O that way.
pub(super) fn throughput(stats: &serde_json::Value, direction: &str) -> anyhow::Result<Throughput> {
    let number = |field: &str| {
        stats
            .get(field)
            .and_then(|v| v.as_f64())
            .with_context(|| format!("fio's JSON has no numeric jobs[0].{direction}.{field}"))
    };
    let ops = number("total_ios")? as u64;
    let bytes = number("io_bytes")? as u64;
    let runtime_ms = number("runtime")?;
    if ops == 0 || runtime_ms <= 0.0 {
        bail!("fio did no {direction} I/O ({ops} I/Os in {runtime_ms} ms)");
    }
    Ok(Throughput {
        ops,
        bytes,
        elapsed_s: runtime_ms / 1000.0,
        iops: number("iops")?,
        bytes_per_s: number("bw_bytes")?,
        cpu_us_per_op: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"fio: some warning before the document
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "ref",
      "error" : 0,
      "usr_cpu" : 10.0,
      "sys_cpu" : 30.0,
      "read" : { "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.0, "runtime" : 0, "total_ios" : 0 },
      "write" : { "io_bytes" : 409600, "bw_bytes" : 204800, "iops" : 50.5, "runtime" : 2000, "total_ios" : 100 }
    }
  ]
}"#;

    #[test]
    fn parses_write_side() {
        let t = parse_json(SAMPLE, "write").unwrap();
        assert_eq!((t.ops, t.bytes), (100, 409600));
        assert_eq!(t.elapsed_s, 2.0);
        assert_eq!(t.iops, 50.5);
        assert_eq!(t.bytes_per_s, 204800.0);
        // 40% of 2 s over 100 requests.
        let cpu = t.cpu_us_per_op.unwrap();
        assert!((cpu - 8000.0).abs() < 1e-6, "{cpu}");
        let no_cpu = SAMPLE.replace("\"usr_cpu\"", "\"other\"");
        assert_eq!(parse_json(&no_cpu, "write").unwrap().cpu_us_per_op, None);
    }

    #[test]
    fn rejects_empty_and_broken_output() {
        assert!(parse_json(SAMPLE, "read")
            .unwrap_err()
            .to_string()
            .contains("did no read"));
        assert!(parse_json("", "read").is_err());
        assert!(parse_json("{ not json", "read").is_err());
        assert!(parse_json(r#"{"jobs": []}"#, "read").is_err());
        let failed = r#"{"jobs": [{"error": 5, "read": {}}]}"#;
        assert!(parse_json(failed, "read")
            .unwrap_err()
            .to_string()
            .contains("error 5"));
    }
}
