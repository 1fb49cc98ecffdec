//! CPU and memory accounting from `/proc`, so results read as work per
//! server CPU-second — the comparable figure when the load generator shares
//! the machine's cores with the server under test.

use std::collections::HashSet;
use std::time::Duration;

/// Clock ticks per second for `/proc/<pid>/stat` times (`getconf CLK_TCK`;
/// 100 on every mainstream Linux).
fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let after = s.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The root of the process tree named `name` (e.g. PostgreSQL's postmaster:
/// a `postgres` whose parent is not one), if one runs.
pub fn find_root_process(name: &str) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| comm(*p).as_deref() == Some(name))
        .find(|p| {
            let ppid = stat_fields(*p).and_then(|f| f.get(1)?.parse::<u32>().ok());
            ppid.and_then(comm).as_deref() != Some(name)
        })
}

/// `pid` and all its descendants.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
                // Fields after the command: state(0) ppid(1) ...
                if let Some(ppid) = stat_fields(p).and_then(|f| f.get(1)?.parse().ok()) {
                    parents.push((p, ppid));
                }
            }
        }
    }
    let mut tree: HashSet<u32> = HashSet::from([pid]);
    loop {
        let before = tree.len();
        for (p, pp) in &parents {
            if tree.contains(pp) {
                tree.insert(*p);
            }
        }
        if tree.len() == before {
            break;
        }
    }
    let mut v: Vec<u32> = tree.into_iter().collect();
    v.sort_unstable();
    v
}

/// User + system CPU time consumed so far by `pid` and its descendants.
pub fn cpu_time(pid: u32) -> Duration {
    let ticks = clock_ticks();
    let total: u64 = process_tree(pid)
        .into_iter()
        .filter_map(|p| {
            let f = stat_fields(p)?;
            // utime and stime are fields 14 and 15 of stat: indexes 11, 12 here.
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    Duration::from_micros(total * 1_000_000 / ticks.max(1))
}

/// Resident memory (VmRSS) of `pid` and its descendants, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .sum()
}

/// CPU seconds used by a process tree between two samples.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    pid: u32,
    start: Duration,
}

impl CpuMeter {
    /// Starts measuring `pid`'s tree.
    pub fn start(pid: u32) -> Self {
        Self {
            pid,
            start: cpu_time(pid),
        }
    }

    /// CPU seconds since [`CpuMeter::start`].
    pub fn elapsed_cpu(&self) -> f64 {
        cpu_time(self.pid).saturating_sub(self.start).as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_this_process() {
        let me = std::process::id();
        let m = CpuMeter::start(me);
        // Burn CPU until at least one clock tick registers (bounded in count).
        let mut x = 0u64;
        for round in 0..2_000u64 {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i ^ round);
            }
            if m.elapsed_cpu() > 0.0 {
                break;
            }
        }
        assert!(x != 1);
        assert!(m.elapsed_cpu() > 0.0);
        assert!(rss_kib(me) > 0);
        assert!(process_tree(me).contains(&me));
    }
}
