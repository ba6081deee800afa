//! What `/proc` says about a process: resident memory and CPU time.
//!
//! CPU is read two ways. `utime + stime` from `/proc/<pid>/stat` is the
//! usual measure, but it counts in clock ticks (10 ms), too coarse for the
//! 0.1 %-of-a-core target over a 10 s window (that is exactly one tick), so
//! the on-CPU nanoseconds of every thread from `/proc/<pid>/task/*/schedstat`
//! are reported next to it.

use std::path::Path;
use std::time::{Duration, Instant};

/// Resident set size in MiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmRSS:")
}

/// Peak resident set size in MiB (`VmHWM`).
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmHWM:")
}

/// A `kB` field of `/proc/<pid>/status`, in MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `utime + stime` of a process, in seconds (children excluded).
pub fn cpu_ticks_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; fields
    // are counted after its closing parenthesis.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5) are the 12th and 13th after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks_per_second())
}

/// Nanoseconds on CPU, summed over the process's live threads.
pub fn cpu_schedstat_secs(pid: u32) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total_ns = 0u64;
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        {
            total_ns += ns;
        }
    }
    Some(total_ns as f64 / 1e9)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it returns -1 on error.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// A CPU reading of a set of processes at one instant.
#[derive(Debug, Clone)]
pub struct CpuMark {
    at: Instant,
    /// (pid, utime + stime, schedstat run time), in seconds, for each
    /// process that could be read.
    each: Vec<(u32, f64, f64)>,
}

impl CpuMark {
    pub fn take(pids: &[u32]) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            each: pids
                .iter()
                .filter_map(|&p| Some((p, cpu_ticks_secs(p)?, cpu_schedstat_secs(p)?)))
                .collect(),
        }
    }

    /// Percent of one core used since `earlier`: (ticks, schedstat). Only
    /// processes read both times count: a PostgreSQL backend that exits in
    /// between would otherwise subtract its whole lifetime's CPU.
    pub fn percent_since(&self, earlier: &CpuMark) -> (f64, f64) {
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        if wall <= 0.0 {
            return (0.0, 0.0);
        }
        let (mut ticks, mut schedstat) = (0.0, 0.0);
        for &(pid, t, s) in &self.each {
            if let Some(&(_, t0, s0)) = earlier.each.iter().find(|e| e.0 == pid) {
                ticks += t - t0;
                schedstat += s - s0;
            }
        }
        (100.0 * ticks / wall, 100.0 * schedstat / wall)
    }
}

/// Idle CPU of `pids` over `window`, as percent of one core: (ticks, schedstat).
pub async fn idle_cpu(pids: &[u32], window: Duration) -> (f64, f64) {
    let start = CpuMark::take(pids);
    tokio::time::sleep(window).await;
    CpuMark::take(pids).percent_since(&start)
}

/// The PostgreSQL server's processes: the postmaster (first line of
/// `postmaster.pid`) and its children, so the database work a daemon causes
/// while "idle" (polls, lease renewals) can be reported too.
pub fn postgres_pids(data_dir: &Path) -> Vec<u32> {
    let Some(postmaster) = std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
    else {
        return Vec::new();
    };
    let mut pids = vec![postmaster];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(postmaster) {
            pids.push(pid);
        }
    }
    pids
}

/// The machine, for the report: cores, CPU model, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{cores} cores, {model}, {mem_gib:.1} GiB RAM, Linux {}, load average {}",
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}
