//! CPU time and memory of processes (and their descendants) from `/proc`.

use std::collections::HashMap;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use serde::Serialize;

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux when unknown).
pub fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .unwrap_or(100.0)
    })
}

/// The fields after the command name of `/proc/<pid>/stat` (field 3 of proc(5) is index 0).
fn stat_fields(pid: &str) -> Result<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat format")?.1;
    Ok(after.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of one process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    cpu_of(&pid.to_string())
}

/// utime + stime of this process, in seconds.
pub fn self_cpu_seconds() -> Result<f64> {
    cpu_of("self")
}

fn cpu_of(pid: &str) -> Result<f64> {
    let f = stat_fields(pid)?;
    let utime: f64 = f.get(11).context("utime")?.parse()?;
    let stime: f64 = f.get(12).context("stime")?.parse()?;
    Ok((utime + stime) / clk_tck())
}

/// `pid` and all its descendants (nginx's master forks its workers).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Ok(f) = stat_fields(&p.to_string())
                && let Some(ppid) = f.get(1).and_then(|s| s.parse::<u32>().ok())
            {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

/// CPU seconds of `pid` and its descendants.
pub fn tree_cpu_seconds(pid: u32) -> Result<f64> {
    let mut total = 0.0;
    for p in tree(pid) {
        total += cpu_seconds(p)?;
    }
    Ok(total)
}

/// Resident memory, in KiB: all of it (RSS), proportional (PSS), private (clean + dirty, which
/// counts binary pages no other process maps), and anonymous (heap and stacks: what another
/// instance of the same binary adds).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Mem {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub private_kib: u64,
    pub anon_kib: u64,
}

impl std::ops::Add for Mem {
    type Output = Mem;
    fn add(self, o: Mem) -> Mem {
        Mem {
            rss_kib: self.rss_kib + o.rss_kib,
            pss_kib: self.pss_kib + o.pss_kib,
            private_kib: self.private_kib + o.private_kib,
            anon_kib: self.anon_kib + o.anon_kib,
        }
    }
}

/// Memory of one process from `/proc/<pid>/smaps_rollup`.
pub fn mem(pid: u32) -> Result<Mem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let mut m = Mem::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(key), Some(val)) = (it.next(), it.next()) else {
            continue;
        };
        let v: u64 = val.parse().unwrap_or(0);
        match key {
            "Rss:" => m.rss_kib = v,
            "Pss:" => m.pss_kib = v,
            "Anonymous:" => m.anon_kib = v,
            "Private_Clean:" | "Private_Dirty:" | "Private_Hugetlb:" => m.private_kib += v,
            _ => {}
        }
    }
    Ok(m)
}

/// Open file descriptors of one process (the entries of `/proc/<pid>/fd`).
pub fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Memory of `pid` and its descendants, summed.
pub fn tree_mem(pid: u32) -> Result<Mem> {
    let mut total = Mem::default();
    for p in tree(pid) {
        total = total + mem(p)?;
    }
    Ok(total)
}

/// Packets this host's CPUs dropped because their receive backlog was full, summed
/// (`/proc/net/softnet_stat`, second column). Every loopback packet passes through that backlog,
/// `net.core.netdev_max_backlog` packets per CPU at most: a burst past it is dropped.
pub fn backlog_drops() -> Option<u64> {
    parse_backlog_drops(&std::fs::read_to_string("/proc/net/softnet_stat").ok()?)
}

fn parse_backlog_drops(text: &str) -> Option<u64> {
    let mut total = 0u64;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let dropped = line.split_whitespace().nth(1)?;
        total = total.checked_add(u64::from_str_radix(dropped, 16).ok()?)?;
    }
    Some(total)
}

const NETDEV_MAX_BACKLOG: &str = "/proc/sys/net/core/netdev_max_backlog";

/// `net.core.netdev_max_backlog` raised for as long as this lives, then put back.
#[derive(Debug)]
pub struct Backlog {
    /// The value before (`None`: unreadable).
    pub before: Option<u64>,
    /// The value while this lives.
    pub now: Option<u64>,
    /// Why it could not be raised, if it could not.
    pub refused: Option<String>,
    path: std::path::PathBuf,
}

impl Backlog {
    /// Raises the backlog to at least `want` packets per CPU (root only); a value already at
    /// least `want` is left as it is.
    pub fn at_least(want: u64) -> Self {
        Self::at_least_in(NETDEV_MAX_BACKLOG.as_ref(), want)
    }

    fn at_least_in(path: &std::path::Path, want: u64) -> Self {
        let before = read_u64(path);
        let refused = match before {
            Some(b) if b >= want => None,
            _ => std::fs::write(path, want.to_string())
                .err()
                .map(|e| format!("{}: {e}", path.display())),
        };
        Self {
            before,
            now: read_u64(path),
            refused,
            path: path.to_owned(),
        }
    }
}

impl Backlog {
    /// Puts the value from before back, if it was changed (as dropping does): for a run stopped
    /// by a signal, which drops nothing. Calling it again, or dropping after, writes the same.
    pub fn put_back(&self) {
        if let Some(b) = self.before
            && self.now != self.before
        {
            let _ = std::fs::write(&self.path, b.to_string());
        }
    }
}

impl Drop for Backlog {
    fn drop(&mut self) {
        self.put_back();
    }
}

fn read_u64(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_drops_sum_the_second_column_of_every_cpu() {
        let text = "00643b3d 0000afb6 00000005 00000000\n\
                    00654b07 0000b851 00000005 00000000\n";
        assert_eq!(parse_backlog_drops(text), Some(0xafb6 + 0xb851));
        assert_eq!(parse_backlog_drops(""), Some(0));
        assert_eq!(parse_backlog_drops("00643b3d\n"), None, "a short line");
        assert_eq!(parse_backlog_drops("00643b3d zz\n"), None, "not hex");
    }

    #[test]
    fn the_backlog_is_raised_only_when_lower_and_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netdev_max_backlog");
        std::fs::write(&path, "1000\n").unwrap();
        {
            let b = Backlog::at_least_in(&path, 19_000);
            assert_eq!(
                (b.before, b.now, b.refused.as_deref()),
                (Some(1000), Some(19_000), None)
            );
        }
        assert_eq!(read_u64(&path), Some(1000), "put back when dropped");
        {
            // Put back by hand (a signal), then dropped: the value from before, once and for all.
            let b = Backlog::at_least_in(&path, 19_000);
            assert_eq!(read_u64(&path), Some(19_000));
            b.put_back();
            assert_eq!(read_u64(&path), Some(1000), "put back by hand");
        }
        assert_eq!(read_u64(&path), Some(1000));

        std::fs::write(&path, "50000").unwrap();
        drop(Backlog::at_least_in(&path, 19_000));
        assert_eq!(
            read_u64(&path),
            Some(50_000),
            "a higher value is left alone"
        );

        let missing = dir.path().join("no-such-dir").join("netdev_max_backlog");
        let b = Backlog::at_least_in(&missing, 19_000);
        assert_eq!((b.before, b.now), (None, None));
        assert!(
            b.refused
                .as_deref()
                .is_some_and(|w| w.contains("no-such-dir")),
            "says why"
        );
    }
}
