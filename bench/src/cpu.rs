//! CPU time of processes and of their threads, read from /proc (Linux only).

use std::collections::BTreeMap;

use anyhow::Context;

/// Reads utime+stime (clock ticks), RSS (bytes) and thread count of a process from /proc.
pub fn proc_sample(pid: u32) -> anyhow::Result<(u64, u64, u64)> {
    let (ticks, fields) = stat_ticks(&format!("/proc/{pid}/stat"))?;
    let threads: u64 = fields.get(17).context("threads")?.parse()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    Ok((ticks, rss_kib * 1024, threads))
}

/// utime+stime of a /proc `stat` file, and its fields after the command name (which may hold
/// spaces; the first field after it is the state).
fn stat_ticks(path: &str) -> anyhow::Result<(u64, Vec<String>)> {
    let stat = std::fs::read_to_string(path)?;
    let rest = stat.rsplit_once(')').context("unexpected /proc stat")?.1;
    let fields: Vec<String> = rest.split_whitespace().map(str::to_string).collect();
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok((utime + stime, fields))
}

pub fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime+stime of the processes, summed (clock ticks).
pub fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| proc_sample(*p).ok()).map(|s| s.0).sum()
}

/// Clock ticks per thread kind of one process: threads are grouped by their name without its
/// trailing digits (`wal-lane-0` and `wal-lane-1` are `wal-lane-`; tokio's workers and
/// blocking threads are all `tokio-runtime-w`, the kernel's 15-byte cut of their name).
pub fn thread_ticks(pid: u32) -> BTreeMap<String, u64> {
    let mut kinds = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return kinds;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let Ok((ticks, _)) = stat_ticks(&dir.join("stat").to_string_lossy()) else {
            continue;
        };
        let kind = name
            .trim_end()
            .trim_end_matches(|c: char| c.is_ascii_digit())
            .to_string();
        *kinds.entry(kind).or_default() += ticks;
    }
    kinds
}

/// What each thread kind spent between two `thread_ticks` samples, in µs per `per` units of
/// work (threads that ended in between are missing; those started count from zero).
pub fn per_unit_by_kind(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    per: f64,
) -> BTreeMap<String, f64> {
    let ticks = clock_ticks_per_second();
    after
        .iter()
        .map(|(kind, ticks_after)| {
            let spent = ticks_after.saturating_sub(before.get(kind).copied().unwrap_or(0));
            (kind.clone(), spent as f64 / ticks * 1e6 / per.max(1.0))
        })
        .filter(|(_, micros)| *micros > 0.0)
        .collect()
}
