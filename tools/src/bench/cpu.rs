//! CPU time (user + system) of processes, of this process's threads and of
//! the whole machine, read from /proc: what a benchmark subject spent per
//! request, beside how many requests it served, and how busy the machine was.

/// Clock ticks per second in /proc/PID/stat (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// User + system time in a `stat` file of proc(5), in seconds.
fn stat_cpu_s(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name may hold spaces; the fields after it do not.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); `rest` starts at field 3.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// Total CPU time of a process so far, in seconds.
pub(super) fn proc_cpu_s(pid: u32) -> Option<f64> {
    stat_cpu_s(&format!("/proc/{pid}/stat"))
}

/// Total CPU time of several processes; None if any cannot be read.
pub(super) fn cpu_of(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|p| proc_cpu_s(*p)).sum()
}

/// CPU time so far of this process's threads whose name starts with one of
/// `prefixes` (thread names are cut to 15 bytes by the kernel). None if the
/// task list cannot be read or no thread matches.
pub(super) fn own_threads_cpu_s(prefixes: &[&str]) -> Option<f64> {
    let mut total = None;
    for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = entry.path();
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if !prefixes.iter().any(|p| name.trim_end().starts_with(p)) {
            continue;
        }
        if let Some(s) = stat_cpu_s(&dir.join("stat").to_string_lossy()) {
            *total.get_or_insert(0.0) += s;
        }
    }
    total
}

/// (busy, total) jiffies of all CPUs so far, from /proc/stat.
pub(super) fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait.
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_and_named_threads_are_readable() {
        let pid = std::process::id();
        assert!(proc_cpu_s(pid).is_some_and(|s| s >= 0.0));
        assert_eq!(cpu_of(&[]), Some(0.0));
        let spin = std::thread::Builder::new()
            .name("cpu-test-spin".into())
            .spawn(|| {
                // Burn enough CPU for the kernel to count a few ticks.
                let start = std::time::Instant::now();
                let mut x = 0u64;
                while start.elapsed() < std::time::Duration::from_millis(100) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                let used = own_threads_cpu_s(&["cpu-test-spin"]);
                (x, used)
            })
            .unwrap();
        let (_, used) = spin.join().unwrap();
        assert!(used.is_some_and(|s| s > 0.0), "{used:?}");
        assert_eq!(own_threads_cpu_s(&["no-such-thread-name"]), None);
    }
}
